// Starts a gRPC server the same way for every microvpc service, on
// @grpc/grpc-js (grpc-adapter.ts turns our protobuf-es services into its
// handlers): HTTP/2 (h2c on loopback, TLS elsewhere), the gRPC protocol only
// (connect's HTTP/1.1 JSON protocol is no longer served), reflection, health,
// a request id and a trace on every call (tracing.ts), RPC metrics, one
// error mapping, optional bearer-token auth and mutual TLS, and optionally
// grpc.health.v1 alone on its own plaintext listener (for kubelet probes
// while the gRPC port wants TLS and credentials).
import { timingSafeEqual } from "node:crypto";
import http2, { type Http2Session } from "node:http2";
import { isIP } from "node:net";
import { Code, ConnectError } from "@connectrpc/connect";
import * as grpc from "@grpc/grpc-js";
import type { Logger } from "pino";
import { performance } from "node:perf_hooks";
import type { DescMethod, DescService } from "@bufbuild/protobuf";
import { Health } from "../../gen/grpc/health/v1/health_pb.js";
import { grpcService, type CallObserver, type ServiceBinding } from "./grpc-adapter.js";
import { isLoopback } from "./client.js";
import { healthService, SharedReadiness, type ReadyCheck } from "./health.js";
import { codeName as codeLabel, RpcStats } from "./metrics.js";
import { reflectionServices } from "./reflection.js";
import { ReloadingTlsFiles } from "./tls-reload.js";
import { serverCall } from "./tracing.js";
import { buildHeader } from "./version.js";

export type { ServiceBinding } from "./grpc-adapter.js";

export interface GrpcServerOptions {
  listen: string;
  services: ServiceBinding[];
  logger: Logger;
  /** The readiness check, or one SharedReadiness the caller shares with /readyz. */
  ready: ReadyCheck | SharedReadiness;
  tlsCert?: string;
  tlsKey?: string;
  /** CA (PEM file) that must have signed every client's certificate: mutual TLS. */
  tlsClientCa?: string;
  /** How often the TLS files are read again (a renewed certificate is served without a restart); 0: never. Default 60 s. */
  tlsReloadMs?: number;
  token?: string;
  /** host:port of a plaintext (h2c) listener serving grpc.health.v1 only, without auth. */
  healthListen?: string;
  /** Which hosts count as loopback (injectable for tests); default isLoopback. */
  loopback?: (host: string) => boolean;
  /** Largest request accepted, in bytes (default 4 MiB). */
  readMaxBytes?: number;
  /** Serve a bearer token off loopback without TLS (--insecure-plaintext): the token travels in clear text. */
  insecurePlaintext?: boolean;
}

/**
 * What one client connection may hold on every daemon. 256 concurrent streams
 * covers a busy orchestrator's Watch streams and parallel calls; each stream's
 * flow-control window is 64 KiB, so a full session buffers at most 16 MiB, the
 * session memory cap (new streams are refused above it). gRPC metadata is
 * small: 16 KiB of headers in at most 128 fields. Messages themselves are
 * bounded by readMaxBytes (4 MiB by default), enforced by grpc-js as it reads
 * (grpc.max_receive_message_length).
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

/**
 * HTTP2_LIMITS as grpc-js takes them. Its own options cover
 * maxConcurrentStreams (grpc.max_concurrent_streams), maxSessionMemory
 * (grpc-node.max_session_memory), idleTimeoutMs (grpc.max_connection_idle_ms:
 * a connection with no call for that long is closed) and keepalive (a ping
 * every idle interval, the peer dropped if it does not answer in 20 s). The
 * others (initialWindowSize, maxHeaderListSize, maxHeaderListPairs,
 * maxSessionRejectedStreams, maxOutstandingPings, maxSettings,
 * unknownProtocolTimeout) have no grpc-js option: they are node:http2 server
 * options, which grpc-js keeps in a private field (commonServerOptions) that
 * it passes to http2.createServer/createSecureServer; applyHttp2Limits adds
 * them there, and refuses to start if that field ever disappears.
 */
function grpcOptions(readMaxBytes: number): grpc.ServerOptions {
  const L = HTTP2_LIMITS;
  return {
    "grpc.max_concurrent_streams": L.maxConcurrentStreams,
    // Never below what one largest message needs in flight.
    "grpc-node.max_session_memory": Math.max(L.maxSessionMemory, Math.ceil(readMaxBytes / 2 ** 20) + 1),
    "grpc.max_receive_message_length": readMaxBytes,
    "grpc.max_send_message_length": 64 * 1024 * 1024,
    "grpc.max_connection_idle_ms": L.idleTimeoutMs,
    "grpc.keepalive_time_ms": L.idleTimeoutMs,
    "grpc.keepalive_timeout_ms": 20_000,
    // Nothing serves or reads grpc-js's channelz (no channelz service is
    // registered); with it on, every call also builds a tracker of four
    // closures and stamps its session's counters: 44.4 against 47.9 µs of
    // CPU per Health/Check (issue 14). Off, forceShutdown() no longer knows
    // the sessions: shutdown() cuts them itself (openSessions).
    "grpc.enable_channelz": 0,
  };
}

function applyHttp2Limits(server: grpc.Server): void {
  const L = HTTP2_LIMITS;
  const common = (server as unknown as { commonServerOptions?: Record<string, unknown> }).commonServerOptions;
  if (!common || typeof common !== "object") {
    throw new Error("@grpc/grpc-js no longer has Server.commonServerOptions: the HTTP/2 limits (HTTP2_LIMITS) cannot be applied; see server.ts");
  }
  Object.assign(common, {
    settings: {
      ...(common.settings as object),
      maxConcurrentStreams: L.maxConcurrentStreams,
      initialWindowSize: L.initialWindowSize,
      maxHeaderListSize: L.maxHeaderListSize,
      enablePush: false,
    },
    maxHeaderListPairs: L.maxHeaderListPairs,
    maxSessionRejectedStreams: L.maxSessionRejectedStreams,
    maxOutstandingPings: L.maxOutstandingPings,
    maxSettings: L.maxSettings,
    unknownProtocolTimeout: L.unknownProtocolTimeout,
  });
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

export { isLoopback };

export interface ListenerSecurity {
  host: string;
  tls: boolean;
  clientCa: boolean;
  token: boolean;
  /** --insecure-plaintext: a token off loopback without TLS is accepted. */
  insecurePlaintext?: boolean;
}

/**
 * Why a listener may not start, or undefined if it may. Off loopback a caller
 * must prove who it is: a bearer token or a client certificate (mutual TLS).
 * TLS alone only encrypts; it would serve every RPC to anyone who connects.
 * A token without TLS would travel in clear text, readable (and replayable)
 * by anyone on the path: refused unless --insecure-plaintext says so.
 */
export function listenerRefusal(l: ListenerSecurity, loopback: (host: string) => boolean = isLoopback): string | undefined {
  if (l.clientCa && !l.tls) return "--tls-client-ca needs --tls-cert/--tls-key: mutual TLS is TLS";
  if (loopback(l.host) || l.clientCa) return undefined;
  if (l.token && !l.tls) {
    if (l.insecurePlaintext) return undefined;
    return (
      `refusing to listen on ${l.host} with a bearer token but without TLS: every caller would send the token in clear text, for anyone on the network to read and replay; ` +
      "add --tls-cert/--tls-key, or listen on 127.0.0.1, or pass --insecure-plaintext if the network itself is trusted (e.g. a private link or a sidecar's encryption)"
    );
  }
  if (l.token) return undefined;
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

/** What every call of one method shares: its RPC metrics, and its name in the log. */
interface MethodInfo {
  readonly stats: RpcStats;
  readonly rpc: string;
  /** grpc.* (health, reflection): no "rpc ok" debug line. */
  readonly grpcOwn: boolean;
  /** grpc.health.v1.Health: served without the bearer token. */
  readonly health: boolean;
}

/** By method descriptor (one lookup per call), and by name (one RpcStats per series). */
const methodInfos = new Map<DescMethod, MethodInfo>();
const statsByName = new Map<string, RpcStats>();
function methodInfo(service: DescService, method: DescMethod): MethodInfo {
  let m = methodInfos.get(method);
  if (m) return m;
  const rpc = `${service.typeName}/${method.name}`;
  let stats = statsByName.get(rpc);
  if (!stats) statsByName.set(rpc, (stats = new RpcStats(service.typeName, method.name)));
  m = { stats, rpc, grpcOwn: service.typeName.startsWith("grpc."), health: service.typeName === "grpc.health.v1.Health" };
  methodInfos.set(method, m);
  return m;
}

/**
 * Around every call: its request id (the caller's x-request-id, cleaned, or a
 * new one; sent back as a response header, and in the trailers of an error)
 * and its trace (the caller's traceparent continued, or a new trace; a span
 * when tracing is on), the scope the handler runs in (tracing.ts: calls it
 * makes carry both, and so do the lines it logs), the bearer token (health
 * excepted), the RPC metrics and the log line of a failure.
 */
function observer(logger: Logger, token: string | undefined): CallObserver {
  const want = token ? Buffer.from(`Bearer ${token}`) : undefined;
  const build = buildHeader();
  return (ctx) => {
    // Which build answered (`microvpc version` reads it from a health check).
    ctx.addResponseHeader("x-microvpc-build", build);
    const m = methodInfo(ctx.service, ctx.method);
    const call = serverCall((name) => ctx.header(name), ctx.service.typeName, ctx.method.name);
    const { reqId, traceId } = call;
    ctx.addResponseHeader("x-request-id", reqId);
    ctx.scope = call;
    const start = performance.now();
    const done = (err: ConnectError | undefined) => {
      const seconds = (performance.now() - start) / 1000;
      const code = err ? err.code : 0;
      m.stats.record(code, seconds);
      const codeName = codeLabel(code);
      call.end(code, codeName, err?.rawMessage);
      if (err) {
        ctx.responseTrailer.set("x-request-id", reqId);
        const level = code === Code.Internal || code === Code.Unknown ? "error" : code === Code.Unavailable ? "warn" : "info";
        if (!logger.isLevelEnabled(level)) return;
        // reqId and traceId in the line's own fields: done() runs outside the call's scope (these win over logMixin's).
        logger.child({ rpc: m.rpc })[level](
          {
            reqId,
            traceId,
            code: codeName,
            ms: seconds * 1000,
            err: err.rawMessage,
            cause: err.cause instanceof Error && code === Code.Internal ? err.cause.stack : undefined,
          },
          "rpc failed",
        );
      } else if (!m.grpcOwn && logger.isLevelEnabled("debug")) {
        logger.child({ rpc: m.rpc }).debug({ reqId, traceId, ms: seconds * 1000 }, "rpc ok");
      }
    };
    if (want && !m.health) {
      const got = Buffer.from(ctx.header("authorization") ?? "");
      if (got.length !== want.length || !timingSafeEqual(got, want)) {
        const err = new ConnectError("missing or wrong bearer token: send the header 'authorization: Bearer <token>'", Code.Unauthenticated);
        done(err);
        throw err;
      }
    }
    return done;
  };
}

function hostPort(host: string, port: number): string {
  return host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`;
}

/** A grpc-js server with these services, bound; the port it got. */
async function serve(
  bindings: ServiceBinding[],
  observe: CallObserver,
  readMaxBytes: number,
  host: string,
  port: number,
  creds: grpc.ServerCredentials,
): Promise<{ server: grpc.Server; port: number }> {
  const server = new grpc.Server(grpcOptions(readMaxBytes));
  applyHttp2Limits(server);
  for (const b of bindings) {
    const { definition, handlers } = grpcService(b, observe);
    server.addService(definition, handlers);
  }
  const bound = await new Promise<number>((resolve, reject) => {
    server.bindAsync(hostPort(host, port), creds, (err, p) => (err ? reject(err) : resolve(p)));
  });
  if (!openSessions(server)) {
    server.forceShutdown();
    throw new Error("@grpc/grpc-js no longer has Server.http2Servers with each listener's sessions: shutdown could not cut open streams; see server.ts");
  }
  return { server, port: bound };
}

/**
 * The HTTP/2 sessions of a grpc-js server, from its private http2Servers
 * (each listener's sessions): with channelz off (grpcOptions) its
 * forceShutdown() destroys none of them, and a Watch stream would outlive
 * the server. Undefined if the field is gone (serve() refuses to start then).
 */
function openSessions(server: grpc.Server): Http2Session[] | undefined {
  const servers = (server as unknown as { http2Servers?: unknown }).http2Servers;
  if (!(servers instanceof Map)) return undefined;
  const out: Http2Session[] = [];
  for (const info of servers.values() as Iterable<{ sessions?: unknown }>) {
    if (!(info?.sessions instanceof Set)) return undefined;
    for (const s of info.sessions as Set<Http2Session>) out.push(s);
  }
  return out;
}

/** Stops taking calls; those still running (Watch streams) are cut after 2 s. */
function shutdown(server: grpc.Server): Promise<void> {
  return new Promise<void>((resolve) => {
    const timer = setTimeout(() => {
      const sessions = openSessions(server) ?? [];
      server.forceShutdown();
      for (const s of sessions) if (!s.destroyed) s.destroy(undefined, http2.constants.NGHTTP2_CANCEL);
      resolve();
    }, 2000);
    timer.unref();
    server.tryShutdown(() => {
      clearTimeout(timer);
      resolve();
    });
  });
}

export async function startGrpcServer(opts: GrpcServerOptions): Promise<RunningServer> {
  const { host, port } = parseListen(opts.listen);
  const tls = opts.tlsCert && opts.tlsKey;
  if (opts.token !== undefined && !opts.token.trim()) throw new Error("refusing an empty bearer token: it would turn authentication off");
  const refusal = listenerRefusal(
    { host, tls: !!tls, clientCa: !!opts.tlsClientCa, token: !!opts.token, insecurePlaintext: opts.insecurePlaintext },
    opts.loopback,
  );
  if (refusal) throw new Error(refusal);
  const health = opts.healthListen ? parseListen(opts.healthListen) : undefined;
  const readMaxBytes = opts.readMaxBytes ?? 4 * 1024 * 1024;
  // One readiness answer for both listeners' health services.
  const readiness = opts.ready instanceof SharedReadiness ? opts.ready : new SharedReadiness(opts.ready);
  const names = opts.services.map((s) => s.desc.typeName);
  // Read (and checked) now, so bad files stop the start; read again every tlsReloadMs.
  const tlsFiles = tls
    ? new ReloadingTlsFiles({ cert: opts.tlsCert!, key: opts.tlsKey!, ca: opts.tlsClientCa }, opts.tlsReloadMs ?? 60_000, opts.logger)
    : undefined;
  const creds = tlsFiles
    ? // grpc-js's declaration names its parameters (ca, identity), but its code takes the first as
      // the identity (certificate and key) and the second as the CA: one provider serves both, and
      // with --tls-client-ca (mutual TLS) the handshake fails for a client without a certificate that CA signed.
      grpc.experimental.createCertificateProviderServerCredentials(tlsFiles, opts.tlsClientCa ? tlsFiles : null, !!opts.tlsClientCa)
    : grpc.ServerCredentials.createInsecure();
  const main = await serve(
    [...opts.services, ...reflectionServices([...opts.services.map((s) => s.desc), Health]), healthService(names, readiness)],
    observer(opts.logger, opts.token),
    readMaxBytes,
    host,
    port,
    creds,
  ).catch((err: unknown) => {
    // Not serving (the port taken, a grpc-js this server cannot run on): nothing keeps the TLS files' reload timer.
    tlsFiles?.close();
    throw err;
  });
  let healthServer: grpc.Server | undefined;
  let healthPort: number | undefined;
  if (health) {
    // grpc.health.v1 alone, over h2c and without auth: what it tells (SERVING
    // or not) is no secret, and kubelet's gRPC probe speaks neither TLS nor
    // tokens. The same HTTP/2 limits as the gRPC port: this one takes no credentials.
    try {
      ({ server: healthServer, port: healthPort } = await serve(
        [healthService(names, readiness)],
        observer(opts.logger, undefined),
        64 * 1024,
        health.host,
        health.port,
        grpc.ServerCredentials.createInsecure(),
      ));
    } catch (e) {
      main.server.forceShutdown();
      throw e;
    }
  }
  return {
    host,
    port: main.port,
    healthPort,
    close: async () => {
      tlsFiles?.close();
      await Promise.all([shutdown(main.server), healthServer && shutdown(healthServer)]);
    },
  };
}
