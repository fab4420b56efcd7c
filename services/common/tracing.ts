// Request ids and traces across the daemons. Every call served runs in a
// scope (AsyncLocalStorage) holding its request id (the caller's
// x-request-id, cleaned, or a new one) and where it sits in a trace; the
// grpc-js clients of client.ts send both on every call made inside it
// (x-request-id, W3C traceparent and tracestate), and every log line written
// inside it carries them (logMixin). So one CreateVm is one request id, and
// one trace, in the vmm and in every daemon it calls.
//
// OpenTelemetry spans are made only when an OTLP endpoint is configured
// (--otlp-endpoint, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
// OTEL_EXPORTER_OTLP_ENDPOINT): startTracing() then loads the SDK (otel.ts,
// with `await import`, so a daemon without tracing never loads it) and every
// RPC served, every vmm step and every reconcile pass is a span, exported
// over OTLP/HTTP. Without an endpoint nothing is loaded and withSpan() is a
// plain call; the incoming traceparent is still passed on unchanged, so a
// trace crosses a daemon that does not export.
import { AsyncLocalStorage } from "node:async_hooks";
import { randomUUID } from "node:crypto";

/** What a call served carries through everything it does. */
export interface CallScope {
  readonly reqId: string;
  /** The trace this call is part of (32 hex digits), if any. */
  readonly traceId?: string;
  /** Without the SDK: the caller's traceparent and tracestate, passed on as they came. */
  readonly traceparent?: string;
  readonly tracestate?: string;
}

const scopes = new AsyncLocalStorage<CallScope>();

/** The scope of the call being served here, if any. */
export function currentScope(): CallScope | undefined {
  return scopes.getStore();
}

/** Runs fn inside a scope (a call served; tests). */
export function runInScope<T>(scope: CallScope, fn: () => T): T {
  return scopes.run(scope, fn);
}

/** A caller's x-request-id as we keep it (at most 64 of [A-Za-z0-9_.:-]), or a new one. */
export function cleanRequestId(raw: string | undefined): string {
  return raw?.slice(0, 64).replace(/[^A-Za-z0-9_.:-]/g, "") || randomUUID();
}

const TRACEPARENT = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$/;

/** A W3C traceparent we accept (version 00, non-zero ids), or undefined. */
export function validTraceparent(raw: string | undefined): string | undefined {
  const m = raw === undefined ? null : TRACEPARENT.exec(raw.trim());
  if (!m || m[1] === "ff" || /^0+$/.test(m[2]) || /^0+$/.test(m[3])) return undefined;
  return m[0];
}

/** A tracestate we pass on: printable ASCII, at most 512 characters (the W3C's 32 members of up to 256 are rarely all kept). */
export function validTracestate(raw: string | undefined): string | undefined {
  if (!raw || raw.length > 512 || !/^[\x20-\x7e]+$/.test(raw)) return undefined;
  return raw;
}

/** The span of a call served: run the handler with run(), and end() it with the call's gRPC status. */
export interface ServerSpan {
  readonly traceId: string;
  run<T>(fn: () => T): T;
  end(code: number, codeName: string, message?: string): void;
}

/** What otel.ts provides once the SDK is loaded. */
export interface TracingBackend {
  serverSpan(service: string, method: string, traceparent: string | undefined, tracestate: string | undefined): ServerSpan;
  span<T>(name: string, attributes: Record<string, string | number | boolean>, fn: () => Promise<T>): Promise<T>;
  /** Sets traceparent (and tracestate) of the active span on outgoing headers. */
  inject(h: Headers): void;
  shutdown(): Promise<void>;
}

let backend: TracingBackend | undefined;

/** Whether spans are made (an OTLP endpoint is configured and the SDK started). */
export function tracingEnabled(): boolean {
  return backend !== undefined;
}

export interface ServerCall {
  readonly reqId: string;
  readonly traceId?: string;
  run<T>(fn: () => T): T;
  end(code: number, codeName: string, message?: string): void;
}

/**
 * A call served without a span: one object is both the call and the scope
 * it runs in, so a call costs no closures (this runs on every RPC).
 */
class PlainServerCall implements ServerCall, CallScope {
  readonly traceId: string | undefined;
  constructor(
    readonly reqId: string,
    readonly traceparent: string | undefined,
    readonly tracestate: string | undefined,
  ) {
    this.traceId = traceparent?.slice(3, 35);
  }
  run<T>(fn: () => T): T {
    return scopes.run(this, fn);
  }
  end(): void {}
}

/**
 * A call served: its scope, and its span when tracing is on (none for
 * grpc.* services: health probes and reflection would be most spans). The
 * handler runs inside run(); end() closes the span.
 */
export function serverCall(header: (name: string) => string | undefined, service: string, method: string): ServerCall {
  const reqId = cleanRequestId(header("x-request-id"));
  const tp = header("traceparent");
  const traceparent = tp === undefined ? undefined : validTraceparent(tp);
  const tracestate = traceparent ? validTracestate(header("tracestate")) : undefined;
  if (backend && !service.startsWith("grpc.")) {
    const span = backend.serverSpan(service, method, traceparent, tracestate);
    const scope: CallScope = { reqId, traceId: span.traceId };
    return { reqId, traceId: span.traceId, run: (fn) => scopes.run(scope, () => span.run(fn)), end: (c, n, m) => span.end(c, n, m) };
  }
  return new PlainServerCall(reqId, traceparent, tracestate);
}

/** fn inside a span named `name` (a child of the active one) when tracing is on; else just fn(). */
export function withSpan<T>(name: string, attributes: Record<string, string | number | boolean>, fn: () => Promise<T>): Promise<T> {
  return backend ? backend.span(name, attributes, fn) : fn();
}

/** Headers of a call made from inside a call served: its request id, and where it sits in the trace. */
export function injectCallHeaders(h: Headers): void {
  const scope = scopes.getStore();
  if (scope && !h.has("x-request-id")) h.set("x-request-id", scope.reqId);
  if (h.has("traceparent")) return;
  if (backend) backend.inject(h);
  else if (scope?.traceparent) {
    h.set("traceparent", scope.traceparent);
    if (scope.tracestate) h.set("tracestate", scope.tracestate);
  }
}

/** pino's mixin: the request id and trace id on every line written inside a call served. */
export function logMixin(): Record<string, string> {
  const s = scopes.getStore();
  if (!s) return {};
  return s.traceId ? { reqId: s.reqId, traceId: s.traceId } : { reqId: s.reqId };
}

export interface TracingConfig {
  /** Where spans go: the OTLP/HTTP traces URL, or undefined for the exporter's own reading of the OTEL_* variables. */
  url?: string;
}

/**
 * Whether to trace, and where to: --otlp-endpoint (a base URL, like
 * OTEL_EXPORTER_OTLP_ENDPOINT: spans go to <it>/v1/traces), else the
 * standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT.
 * None, OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none: no tracing.
 */
export function tracingConfig(flag: string | undefined, env: NodeJS.ProcessEnv = process.env): TracingConfig | undefined {
  if (env.OTEL_SDK_DISABLED?.trim().toLowerCase() === "true") return undefined;
  if (env.OTEL_TRACES_EXPORTER?.trim().toLowerCase() === "none") return undefined;
  if (flag?.trim()) {
    const base = flag.trim();
    let u: URL;
    try {
      u = new URL(base);
    } catch {
      throw new Error(`--otlp-endpoint ${JSON.stringify(base)}: expected a URL such as http://127.0.0.1:4318`);
    }
    if (u.protocol !== "http:" && u.protocol !== "https:") throw new Error(`--otlp-endpoint ${JSON.stringify(base)}: use http:// or https://`);
    return { url: `${base.replace(/\/+$/, "")}/v1/traces` };
  }
  if (env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT?.trim() || env.OTEL_EXPORTER_OTLP_ENDPOINT?.trim()) return {};
  return undefined;
}

export interface TracingOptions {
  /** The daemon (ipam, vmm, …): service.name is microvpc-<it>. */
  service: string;
  hostId: string;
  /** --otlp-endpoint. */
  endpoint?: string;
  env?: NodeJS.ProcessEnv;
}

/** Starts the SDK if an endpoint is configured; false (and nothing loaded) if none is. */
export async function startTracing(o: TracingOptions): Promise<boolean> {
  const cfg = tracingConfig(o.endpoint, o.env);
  if (!cfg) return false;
  const { startOtel } = await import("./otel.js");
  backend = startOtel({ service: o.service, hostId: o.hostId, url: cfg.url });
  return true;
}

/** Exports what is still buffered and stops (at shutdown). */
export async function stopTracing(): Promise<void> {
  const b = backend;
  backend = undefined;
  await b?.shutdown();
}
