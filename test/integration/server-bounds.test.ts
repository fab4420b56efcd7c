// Bounds every daemon's gRPC server puts on one client (services/common/
// health.ts), against a real `microvpcd ipam` and redis-server: a health
// Watch that costs Redis the same however many watch.
import assert from "node:assert/strict";
import { Redis } from "ioredis";
import { afterAll, beforeAll, test } from "vitest";
import { Health, HealthCheckResponse_ServingStatus as Status } from "../../gen/grpc/health/v1/health_pb.js";
import { grpcClient, grpcTransport } from "../../services/common/client.js";
import { startDaemon, type Daemon } from "../lib/daemon.js";
import { startRedis, type TestRedis } from "../lib/redis.js";

let redis: TestRedis;
let daemon: Daemon;
let r: Redis;

beforeAll(async () => {
  redis = await startRedis({ appendfsync: "no" });
  daemon = await startDaemon("ipam", ["--redis", redis.url, "--redis-timeout-ms", "500"]);
  r = new Redis(redis.url, { maxRetriesPerRequest: 0, retryStrategy: () => 200 });
  r.on("error", () => {});
});

afterAll(async () => {
  r?.disconnect();
  await daemon?.stop();
  await redis?.stop();
});

const sleep = (ms: number) => new Promise((res) => setTimeout(res, ms));

async function pings(): Promise<number> {
  const m = /cmdstat_ping:calls=(\d+)/.exec(await r.info("commandstats"));
  return m ? Number(m[1]) : 0;
}

/** Opens n Watch streams on one connection; returns their latest statuses and a closer. */
function watchers(n: number) {
  const ac = new AbortController();
  const health = grpcClient(Health, grpcTransport({ address: daemon.address, timeoutMs: 0 }));
  const latest: (Status | undefined)[] = new Array(n).fill(undefined);
  const done = Array.from({ length: n }, async (_, i) => {
    try {
      for await (const m of health.watch({}, { signal: ac.signal, timeoutMs: 60_000 })) latest[i] = m.status;
    } catch {
      // aborted at the end
    }
  });
  return {
    latest,
    async close() {
      ac.abort();
      await Promise.all(done);
    },
  };
}

async function until(what: string, ok: () => boolean, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

test("Health.Watch: N concurrent streams cost Redis the same PINGs as one, and all see a change", async () => {
  const windowMs = 3000;
  const rate = async (n: number) => {
    const w = watchers(n);
    await until(`${n} watchers to see SERVING`, () => w.latest.every((s) => s === Status.SERVING));
    const p0 = await pings();
    await sleep(windowMs);
    const p = (await pings()) - p0;
    return { w, p };
  };
  const one = await rate(1);
  await one.w.close();
  const many = await rate(200);
  try {
    // One periodic check (1 s) whatever the number of watchers: ~3 in 3 s.
    assert.ok(one.p <= windowMs / 1000 + 2, `1 watcher: ${one.p} PINGs in ${windowMs} ms`);
    assert.ok(many.p <= one.p + 2, `200 watchers: ${many.p} PINGs in ${windowMs} ms, 1 watcher: ${one.p}`);
    // The shared status still reaches every stream: Redis down → NOT_SERVING, back → SERVING.
    await redis.kill();
    await until("every watcher to see NOT_SERVING", () => many.w.latest.every((s) => s === Status.NOT_SERVING));
    await redis.restart();
    await until("every watcher to see SERVING again", () => many.w.latest.every((s) => s === Status.SERVING));
  } finally {
    await many.w.close();
  }
  // Check calls share the cached answer too: 100 at once, at most a couple of PINGs.
  const health = grpcClient(Health, { address: daemon.address });
  const p0 = await pings();
  const got = await Promise.all(Array.from({ length: 100 }, () => health.check({})));
  assert.ok(got.every((g) => g.status === Status.SERVING));
  assert.ok((await pings()) - p0 <= 2, "100 concurrent Checks share one probe");
});
