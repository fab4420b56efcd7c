// Starts a gRPC server the same way for every microvpc service: HTTP/2 (h2c
// on loopback, TLS elsewhere), gRPC + Connect protocols, reflection, health,
// a request id on every call, RPC metrics, one error mapping, optional
// bearer-token auth and mutual TLS, and optionally grpc.health.v1 alone on
// its own plaintext listener (for kubelet probes while the gRPC port wants
// TLS and credentials).
import { randomUUID, timingSafeEqual } from "node:crypto";
import { readFileSync } from "node:fs";
import http2 from "node:http2";
import { isIP } from "node:net";
import type { DescService } from "@bufbuild/protobuf";
import { Code, ConnectError, type ConnectRouter, type Interceptor, type ServiceImpl } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import type { Logger } from "pino";
import { toConnectError } from "./errors.js";
import { Health } from "../../gen/grpc/health/v1/health_pb.js";
import { registerHealth, type ReadyCheck } from "./health.js";
import { rpcDuration, rpcRequests } from "./metrics.js";
import { registerReflection } from "./reflection.js";

export interface ServiceBinding {
  desc: DescService;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  impl: Partial<ServiceImpl<any>>;
}

export interface GrpcServerOptions {
  listen: string;
  services: ServiceBinding[];
  logger: Logger;
  ready: ReadyCheck;
  tlsCert?: string;
  tlsKey?: string;
  /** CA (PEM file) that must have signed every client's certificate: mutual TLS. */
  tlsClientCa?: string;
  token?: string;
  /** host:port of a plaintext (h2c) listener serving grpc.health.v1 only, without auth. */
  healthListen?: string;
  /** Which hosts count as loopback (injectable for tests); default isLoopback. */
  loopback?: (host: string) => boolean;
  /** Largest request accepted, in bytes (default 4 MiB). */
  readMaxBytes?: number;
}

/**
 * What one client connection may hold on every daemon. 256 concurrent streams
 * covers a busy orchestrator's Watch streams and parallel calls; each stream's
 * flow-control window is 64 KiB, so a full session buffers at most 16 MiB, the
 * session memory cap (new streams are refused above it). gRPC metadata is
 * small: 16 KiB of headers in at most 128 fields. Messages themselves are
 * bounded by readMaxBytes (4 MiB by default), enforced by connect as it reads.
 */
export const HTTP2_LIMITS = {
  maxConcurrentStreams: 256,
  initialWindowSize: 65_535,
  maxHeaderListSize: 16 * 1024,
  maxHeaderListPairs: 128,
  /** MB, as node:http2 counts it: maxConcurrentStreams × initialWindowSize. */
  maxSessionMemory: 16,
  /** Refused streams before the session is torn down (ENHANCE_YOUR_CALM). */
  maxSessionRejectedStreams: 100,
  maxOutstandingPings: 10,
  maxSettings: 32,
  /** A connection that does not speak HTTP/2 (or finish TLS) within this is dropped. */
  unknownProtocolTimeout: 10_000,
  /** A session with no activity for this long is closed. */
  idleTimeoutMs: 5 * 60_000,
} as const;

function http2Options(readMaxBytes: number): http2.ServerOptions {
  const L = HTTP2_LIMITS;
  return {
    settings: {
      maxConcurrentStreams: L.maxConcurrentStreams,
      initialWindowSize: L.initialWindowSize,
      maxHeaderListSize: L.maxHeaderListSize,
      enablePush: false,
    },
    maxHeaderListPairs: L.maxHeaderListPairs,
    // Never below what one largest message needs in flight.
    maxSessionMemory: Math.max(L.maxSessionMemory, Math.ceil(readMaxBytes / 2 ** 20) + 1),
    maxSessionRejectedStreams: L.maxSessionRejectedStreams,
    maxOutstandingPings: L.maxOutstandingPings,
    maxSettings: L.maxSettings,
    unknownProtocolTimeout: L.unknownProtocolTimeout,
  };
}

export interface RunningServer {
  host: string;
  port: number;
  /** Port of the health listener, if --health-listen was given. */
  healthPort?: number;
  close(): Promise<void>;
}

export function parseListen(listen: string): { host: string; port: number } {
  const m = /^\[?([^\]]*)\]?:(\d{1,5})$/.exec(listen);
  if (!m || Number(m[2]) > 65535 || (m[1] !== "localhost" && !isIP(m[1]))) {
    throw new Error(`--listen ${JSON.stringify(listen)}: expected HOST:PORT with an IP address, e.g. 127.0.0.1:7401`);
  }
  return { host: m[1], port: Number(m[2]) };
}

export function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || /^127\./.test(host);
}

export interface ListenerSecurity {
  host: string;
  tls: boolean;
  clientCa: boolean;
  token: boolean;
}

/**
 * Why a listener may not start, or undefined if it may. Off loopback a caller
 * must prove who it is: a bearer token or a client certificate (mutual TLS).
 * TLS alone only encrypts; it would serve every RPC to anyone who connects.
 */
export function listenerRefusal(l: ListenerSecurity, loopback: (host: string) => boolean = isLoopback): string | undefined {
  if (l.clientCa && !l.tls) return "--tls-client-ca needs --tls-cert/--tls-key: mutual TLS is TLS";
  if (loopback(l.host) || l.token || l.clientCa) return undefined;
  if (l.tls) {
    return (
      `refusing to listen on ${l.host} with TLS alone: TLS encrypts but authenticates no caller, so every RPC would be open to anyone who connects; ` +
      "add --token-file (a bearer token) or --tls-client-ca (clients must present a certificate signed by that CA), or listen on 127.0.0.1"
    );
  }
  return (
    `refusing to listen on ${l.host} without protection: a non-loopback listener needs --token-file (a bearer token) or ` +
    "--tls-cert/--tls-key with --tls-client-ca (mutual TLS), or listen on 127.0.0.1"
  );
}

function authInterceptor(token: string): Interceptor {
  const want = Buffer.from(`Bearer ${token}`);
  return (next) => async (req) => {
    if (req.service.typeName === "grpc.health.v1.Health") return next(req);
    const got = Buffer.from(req.header.get("authorization") ?? "");
    if (got.length !== want.length || !timingSafeEqual(got, want)) {
      throw new ConnectError("missing or wrong bearer token: send the header 'authorization: Bearer <token>'", Code.Unauthenticated);
    }
    return next(req);
  };
}

function observeInterceptor(logger: Logger): Interceptor {
  return (next) => async (req) => {
    const reqId =
      req.header
        .get("x-request-id")
        ?.slice(0, 64)
        .replace(/[^A-Za-z0-9_.:-]/g, "") || randomUUID();
    const service = req.service.typeName;
    const method = req.method.name;
    const log = logger.child({ reqId, rpc: `${service}/${method}` });
    const start = process.hrtime.bigint();
    const done = (code: Code | 0, err?: ConnectError) => {
      const seconds = Number(process.hrtime.bigint() - start) / 1e9;
      const codeName = code === 0 ? "OK" : Code[code];
      rpcRequests.inc({ service, method, code: codeName });
      rpcDuration.observe({ service, method }, seconds);
      if (err) {
        const level = code === Code.Internal || code === Code.Unknown ? "error" : code === Code.Unavailable ? "warn" : "info";
        log[level](
          {
            code: codeName,
            ms: seconds * 1000,
            err: err.rawMessage,
            cause: err.cause instanceof Error && code === Code.Internal ? err.cause.stack : undefined,
          },
          "rpc failed",
        );
      } else if (!req.service.typeName.startsWith("grpc.")) {
        log.debug({ ms: seconds * 1000 }, "rpc ok");
      }
    };
    try {
      const res = await next(req);
      res.header.set("x-request-id", reqId);
      if (!res.stream) done(0);
      return res;
    } catch (e) {
      const err = toConnectError(e);
      err.metadata.set("x-request-id", reqId);
      done(err.code, err);
      throw err;
    }
  };
}

export async function startGrpcServer(opts: GrpcServerOptions): Promise<RunningServer> {
  const { host, port } = parseListen(opts.listen);
  const tls = opts.tlsCert && opts.tlsKey;
  if (opts.token !== undefined && !opts.token.trim()) throw new Error("refusing an empty bearer token: it would turn authentication off");
  const refusal = listenerRefusal({ host, tls: !!tls, clientCa: !!opts.tlsClientCa, token: !!opts.token }, opts.loopback);
  if (refusal) throw new Error(refusal);
  const health = opts.healthListen ? parseListen(opts.healthListen) : undefined;
  const interceptors: Interceptor[] = [observeInterceptor(opts.logger)];
  if (opts.token) interceptors.push(authInterceptor(opts.token));
  const routes = (router: ConnectRouter) => {
    for (const s of opts.services) router.service(s.desc, s.impl);
    registerReflection(router, [...opts.services.map((s) => s.desc), Health]);
    registerHealth(
      router,
      opts.services.map((s) => s.desc.typeName),
      opts.ready,
    );
  };
  const readMaxBytes = opts.readMaxBytes ?? 4 * 1024 * 1024;
  const handler = connectNodeAdapter({
    routes,
    interceptors,
    readMaxBytes,
    grpc: true,
    grpcWeb: false,
    connect: true,
  });
  const h2 = http2Options(readMaxBytes);
  const server = tls
    ? http2.createSecureServer(
        {
          ...h2,
          cert: readFileSync(opts.tlsCert!),
          key: readFileSync(opts.tlsKey!),
          allowHTTP1: true,
          // Mutual TLS: the handshake fails for a client without a certificate signed by this CA.
          ...(opts.tlsClientCa ? { ca: readFileSync(opts.tlsClientCa), requestCert: true, rejectUnauthorized: true } : {}),
        },
        handler,
      )
    : http2.createServer(h2, handler);
  // Bounds on what one client can hold open.
  server.setTimeout(HTTP2_LIMITS.idleTimeoutMs);
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => resolve());
  });
  const addr = server.address();
  const boundPort = typeof addr === "object" && addr ? addr.port : port;
  const sessions = new Set<http2.ServerHttp2Session>();
  server.on("session", (s) => {
    sessions.add(s);
    s.on("close", () => sessions.delete(s));
  });
  let healthServer: http2.Http2Server | undefined;
  let healthPort: number | undefined;
  if (health) {
    try {
      ({ server: healthServer, port: healthPort } = await startHealthListener(health.host, health.port, opts));
    } catch (e) {
      server.close();
      throw e;
    }
  }
  return {
    host,
    port: boundPort,
    healthPort,
    close: () =>
      new Promise<void>((resolve) => {
        healthServer?.close();
        server.close(() => resolve());
        for (const s of sessions) s.close();
        setTimeout(() => {
          for (const s of sessions) s.destroy();
        }, 2000).unref();
      }),
  };
}

// grpc.health.v1 alone, over h2c and without auth: what it tells (SERVING or
// not) is no secret, and kubelet's gRPC probe speaks neither TLS nor tokens.
async function startHealthListener(host: string, port: number, opts: GrpcServerOptions): Promise<{ server: http2.Http2Server; port: number }> {
  const handler = connectNodeAdapter({
    routes: (router) =>
      registerHealth(
        router,
        opts.services.map((s) => s.desc.typeName),
        opts.ready,
      ),
    interceptors: [observeInterceptor(opts.logger)],
    readMaxBytes: 64 * 1024,
    grpc: true,
    grpcWeb: false,
    connect: true,
  });
  // The same HTTP/2 limits as the gRPC port: this one takes no credentials.
  const server = http2.createServer(http2Options(64 * 1024), handler);
  server.setTimeout(HTTP2_LIMITS.idleTimeoutMs);
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => resolve());
  });
  const addr = server.address();
  return { server, port: typeof addr === "object" && addr ? addr.port : port };
}
