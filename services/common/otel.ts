// The OpenTelemetry SDK behind tracing.ts, loaded by startTracing() only
// when an OTLP endpoint is configured (a daemon without one never imports
// this file or the SDK). Spans go in batches to the OTLP/HTTP (JSON)
// exporter; the batch processor and the exporter read the standard OTEL_*
// variables (OTEL_BSP_SCHEDULE_DELAY, OTEL_EXPORTER_OTLP_HEADERS, …).
import { context, propagation, ROOT_CONTEXT, SpanKind, SpanStatusCode, trace, type Context } from "@opentelemetry/api";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { resourceFromAttributes } from "@opentelemetry/resources";
import { BatchSpanProcessor, NodeTracerProvider } from "@opentelemetry/sdk-trace-node";
import { ATTR_SERVICE_NAME, ATTR_SERVICE_VERSION } from "@opentelemetry/semantic-conventions";
import { BUILD } from "./version.js";
import type { ServerSpan, TracingBackend } from "./tracing.js";

/** gRPC codes a server's span is an error for (the others are the caller's doing): OpenTelemetry's RPC conventions. */
const SERVER_ERRORS = new Set([2, 4, 12, 13, 14, 15]);

const headerGetter = {
  keys: (c: Record<string, string | undefined>) => Object.keys(c),
  get: (c: Record<string, string | undefined>, k: string) => c[k],
};
const headerSetter = { set: (h: Headers, k: string, v: string) => void (h.has(k) || h.set(k, v)) };

export function startOtel(o: { service: string; hostId: string; url?: string }): TracingBackend {
  const provider = new NodeTracerProvider({
    resource: resourceFromAttributes({
      [ATTR_SERVICE_NAME]: `microvpc-${o.service}`,
      [ATTR_SERVICE_VERSION]: BUILD.version,
      "service.namespace": "microvpc",
      "host.id": o.hostId,
      "microvpc.commit": BUILD.commit,
    }),
    spanProcessors: [new BatchSpanProcessor(new OTLPTraceExporter(o.url ? { url: o.url } : {}))],
  });
  // The global tracer provider, the AsyncLocalStorage context manager and the W3C trace-context propagator.
  provider.register();
  const tracer = trace.getTracer("microvpc", BUILD.version);

  return {
    serverSpan(service, method, traceparent, tracestate): ServerSpan {
      const parent: Context = traceparent ? propagation.extract(ROOT_CONTEXT, { traceparent, tracestate }, headerGetter) : ROOT_CONTEXT;
      const span = tracer.startSpan(
        `${service}/${method}`,
        { kind: SpanKind.SERVER, attributes: { "rpc.system": "grpc", "rpc.service": service, "rpc.method": method } },
        parent,
      );
      const ctx = trace.setSpan(parent, span);
      return {
        traceId: span.spanContext().traceId,
        run: (fn) => context.with(ctx, fn),
        end(code, codeName, message) {
          span.setAttributes({ "rpc.grpc.status_code": code, "rpc.response.status_code": codeName });
          if (SERVER_ERRORS.has(code)) span.setStatus({ code: SpanStatusCode.ERROR, message });
          span.end();
        },
      };
    },
    span(name, attributes, fn) {
      return tracer.startActiveSpan(name, { attributes }, async (span) => {
        try {
          return await fn();
        } catch (err) {
          span.setStatus({ code: SpanStatusCode.ERROR, message: err instanceof Error ? err.message : String(err) });
          throw err;
        } finally {
          span.end();
        }
      });
    },
    inject(h) {
      propagation.inject(context.active(), h, headerSetter);
    },
    shutdown: () => provider.shutdown(),
  };
}
