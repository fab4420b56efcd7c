// The RPC metrics server.ts keeps per method (metrics.ts RpcStats): counted
// in plain numbers on the call's path, handed to prom-client when read. A
// scrape must show exactly what prom-client's own inc() and observe() would
// have made of the same calls.
import assert from "node:assert/strict";
import { Counter, Histogram, Registry } from "prom-client";
import { test } from "vitest";
import { codeName, deferredCounter, metricsRegistry, RpcStats, rpcDuration } from "../../services/common/metrics.js";

const calls: [number, number][] = [
  [0, 0.0001],
  [0, 0.0005],
  [0, 0.00051],
  [5, 0.003],
  [0, 0.2],
  [16, 7],
  [13, 0.05],
  [0, 1],
];

test("RpcStats: the same series and values as inc() and observe() per call", async () => {
  const stats = new RpcStats("test.v1.Svc", "Method");
  const other = new RpcStats("test.v1.Svc", "Other");
  const ref = new Registry();
  const refRequests = new Counter({ name: "microvpc_rpc_requests_total", help: "x", labelNames: ["service", "method", "code"], registers: [ref] });
  const refDuration = new Histogram({
    name: "microvpc_rpc_duration_seconds",
    help: "x",
    labelNames: ["service", "method"],
    buckets: (rpcDuration as unknown as { upperBounds: number[] }).upperBounds,
    registers: [ref],
  });
  const series = async (r: Registry) =>
    (await r.metrics())
      .split("\n")
      .filter((l) => l.startsWith("microvpc_rpc_") && l.includes('service="test.v1.Svc"'))
      .sort();
  // Twice, with a scrape between: what a scrape hands over is not counted again.
  for (let round = 0; round < 2; round++) {
    for (const [code, s] of calls) {
      stats.record(code, s);
      refRequests.inc({ service: "test.v1.Svc", method: "Method", code: codeName(code) });
      refDuration.observe({ service: "test.v1.Svc", method: "Method" }, s);
    }
    other.record(0, 0.002);
    refRequests.inc({ service: "test.v1.Svc", method: "Other", code: "OK" });
    refDuration.observe({ service: "test.v1.Svc", method: "Other" }, 0.002);
    const got = await series(metricsRegistry);
    assert.ok(got.length > 20, got.join("\n"));
    assert.deepEqual(got, await series(ref));
  }
  // A reset registry starts the series again from what comes next, and drops what was counted but not yet scraped.
  stats.record(0, 0.3);
  other.record(4, 9);
  metricsRegistry.resetMetrics();
  ref.resetMetrics();
  stats.record(3, 0.01);
  refRequests.inc({ service: "test.v1.Svc", method: "Method", code: "InvalidArgument" });
  refDuration.observe({ service: "test.v1.Svc", method: "Method" }, 0.01);
  assert.deepEqual(await series(metricsRegistry), await series(ref));
});

test("deferredCounter: the series inc() would make, counted once per scrape; a reset drops what was not scraped", async () => {
  const count = deferredCounter<"a" | "b">({ name: "microvpc_test_deferred_total", help: "x", label: "result" });
  const series = async () =>
    (await metricsRegistry.metrics())
      .split("\n")
      .filter((l) => l.startsWith("microvpc_test_deferred_total{"))
      .sort();
  count("a");
  count("a");
  count("b");
  assert.deepEqual(await series(), ['microvpc_test_deferred_total{result="a"} 2', 'microvpc_test_deferred_total{result="b"} 1']);
  count("b");
  assert.deepEqual(await series(), ['microvpc_test_deferred_total{result="a"} 2', 'microvpc_test_deferred_total{result="b"} 2']);
  count("a");
  metricsRegistry.resetMetrics();
  count("b");
  assert.deepEqual(await series(), ['microvpc_test_deferred_total{result="b"} 1']);
});

test("codeName: connect's names, OK for 0", () => {
  assert.equal(codeName(0), "OK");
  assert.equal(codeName(5), "NotFound");
  assert.equal(codeName(16), "Unauthenticated");
});
