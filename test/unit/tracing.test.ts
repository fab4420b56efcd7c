// tracing.ts without the SDK: when tracing is configured, what a call served
// carries (request id, traceparent passed on as it came) into the calls it
// makes and the lines it logs. The SDK side is tested across real daemons:
// test/integration/tracing.test.ts.
import assert from "node:assert/strict";
import { test } from "vitest";
import {
  cleanRequestId,
  currentScope,
  injectCallHeaders,
  logMixin,
  serverCall,
  tracingConfig,
  tracingEnabled,
  validTraceparent,
  validTracestate,
  withSpan,
} from "../../services/common/tracing.js";

const TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

test("tracingConfig: the flag (a base URL), the standard variables, or nothing", () => {
  assert.equal(tracingConfig(undefined, {}), undefined);
  assert.equal(tracingConfig("  ", {}), undefined);
  assert.deepEqual(tracingConfig("http://127.0.0.1:4318", {}), { url: "http://127.0.0.1:4318/v1/traces" });
  assert.deepEqual(tracingConfig("https://otel.example:4318/base/", {}), { url: "https://otel.example:4318/base/v1/traces" });
  assert.deepEqual(tracingConfig(undefined, { OTEL_EXPORTER_OTLP_ENDPOINT: "http://c:4318" }), {});
  assert.deepEqual(tracingConfig(undefined, { OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: "http://c:4318/v1/traces" }), {});
  assert.equal(tracingConfig(undefined, { OTEL_EXPORTER_OTLP_ENDPOINT: "" }), undefined);
  assert.equal(tracingConfig("http://c:4318", { OTEL_SDK_DISABLED: "true" }), undefined);
  assert.equal(tracingConfig(undefined, { OTEL_EXPORTER_OTLP_ENDPOINT: "http://c:4318", OTEL_TRACES_EXPORTER: "none" }), undefined);
  assert.throws(() => tracingConfig("127.0.0.1:4318", {}), /--otlp-endpoint/);
  assert.throws(() => tracingConfig("ftp://c", {}), /http:\/\/ or https:\/\//);
});

test("traceparent and tracestate: the W3C form only", () => {
  assert.equal(validTraceparent(TP), TP);
  assert.equal(validTraceparent(` ${TP} `), TP);
  for (const bad of [
    undefined,
    "",
    TP.toUpperCase(),
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
    `${TP}\nx-request-id: evil`,
  ]) {
    assert.equal(validTraceparent(bad), undefined, String(bad));
  }
  assert.equal(validTracestate("congo=t61rcWkgMzE"), "congo=t61rcWkgMzE");
  assert.equal(validTracestate("a=b\r\nc"), undefined);
  assert.equal(validTracestate("x".repeat(513)), undefined);
});

test("request ids: the caller's, cleaned, or a new one", () => {
  assert.equal(cleanRequestId("req-42<script>"), "req-42script");
  assert.equal(cleanRequestId("a".repeat(100)).length, 64);
  assert.match(cleanRequestId(undefined), /^[0-9a-f-]{36}$/);
  assert.match(cleanRequestId("<>"), /^[0-9a-f-]{36}$/);
});

test("without the SDK: a call's request id and traceparent reach the calls it makes and the lines it logs", async () => {
  assert.equal(tracingEnabled(), false);
  const headers: Record<string, string> = { "x-request-id": "req-7", traceparent: TP, tracestate: "congo=t61rcWkgMzE" };
  const call = serverCall((n) => headers[n], "microvpc.v1.VmService", "CreateVm");
  assert.equal(call.reqId, "req-7");
  assert.equal(call.traceId, "4bf92f3577b34da6a3ce929d0e0e4736");
  const out = await call.run(() =>
    withSpan("step ipam", {}, async () => {
      await new Promise((r) => setTimeout(r, 1));
      const h = new Headers();
      injectCallHeaders(h);
      return { h, mixin: logMixin(), scope: currentScope() };
    }),
  );
  assert.equal(out.h.get("x-request-id"), "req-7");
  assert.equal(out.h.get("traceparent"), TP);
  assert.equal(out.h.get("tracestate"), "congo=t61rcWkgMzE");
  assert.deepEqual(out.mixin, { reqId: "req-7", traceId: "4bf92f3577b34da6a3ce929d0e0e4736" });
  // Headers the caller set itself are kept.
  const own = call.run(() => {
    const h = new Headers({ "x-request-id": "mine" });
    injectCallHeaders(h);
    return h.get("x-request-id");
  });
  assert.equal(own, "mine");
  // Outside a call: nothing added, nothing logged.
  const h = new Headers();
  injectCallHeaders(h);
  assert.deepEqual([...h.keys()], []);
  assert.deepEqual(logMixin(), {});
  call.end(0, "OK");
});

test("without the SDK: a bad traceparent is dropped, a new request id made; no trace id on the lines", () => {
  const call = serverCall((n) => ({ traceparent: "nope", tracestate: "a=b" })[n], "microvpc.v1.IpamService", "Allocate");
  assert.match(call.reqId, /^[0-9a-f-]{36}$/);
  assert.equal(call.traceId, undefined);
  const h = call.run(() => {
    const h = new Headers();
    injectCallHeaders(h);
    return h;
  });
  assert.equal(h.get("traceparent"), null);
  assert.equal(h.get("tracestate"), null);
  assert.deepEqual(
    call.run(() => logMixin()),
    { reqId: call.reqId },
  );
});
