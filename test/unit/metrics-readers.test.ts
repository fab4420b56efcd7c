// The scrape-time readers behind /metrics, without a kernel: readiness of a
// reconciler (first whole pass, staleness, reasons), the firewall's drop
// series and their cap, the WireGuard reader on real `wg show dump` output,
// and the gateway's relay of its metadata child's throttle totals.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { afterEach, beforeEach, test, vi } from "vitest";
import { pino } from "pino";
import { ReadyChecks, ReconcileHealth, redisReachable } from "../../services/common/health.js";
import { metricsRegistry } from "../../services/common/metrics.js";
import { SyncLoop } from "../../services/common/sync-loop.js";
import { readDrops } from "../../services/firewall/metrics.js";
import { imdsThrottled, reportChildThrottle } from "../../services/gateway/imds.js";
import { readWireguard } from "../../services/netagent/overlay/metrics.js";
import { parseDump, wgName } from "../../services/netagent/overlay/wg.js";
import { ROOT } from "../lib/daemon.js";

beforeEach(() => vi.useFakeTimers({ now: 1_000_000_000 }));
afterEach(() => vi.useRealTimers());

const sample = async (name: string, labels: Record<string, string>) => {
  const m = (await metricsRegistry.getSingleMetric(name)!.get()) as { values: { labels: Record<string, string | number>; value: number }[] };
  return m.values.find((v) => Object.entries(labels).every(([k, x]) => v.labels[k] === x))?.value;
};

test("a reconciler is ready after its first whole pass succeeds, and until stalePeriods periods pass without another", async () => {
  const r = new ReconcileHealth("unit-a", 1000, 3);
  assert.match(r.problem()!, /no whole reconcile pass has succeeded yet/);
  assert.equal(await sample("microvpc_reconcile_last_success_timestamp_seconds", { reconciler: "unit-a" }), 0, "the series exists from the start");
  r.observe({ whole: false, seconds: 0.01 });
  assert.ok(r.problem(), "a targeted pass is not a whole one");
  r.observe({ whole: true, seconds: 0.02 });
  assert.equal(r.problem(), undefined);
  assert.equal(await sample("microvpc_reconcile_last_success_timestamp_seconds", { reconciler: "unit-a" }), 1_000_000);
  vi.advanceTimersByTime(2000);
  r.observe({ whole: true, seconds: 0.5, error: "nft: No such file or directory" });
  assert.equal(r.problem(), undefined, "one failed pass within the window: still ready");
  assert.equal(await sample("microvpc_reconcile_errors_total", { reconciler: "unit-a" }), 1);
  vi.advanceTimersByTime(1000);
  assert.match(r.problem()!, /last successful reconcile 3\.0 s ago, more than 3 periods of 1000 ms \(last error: nft: No such file/);
  assert.equal(await sample("microvpc_reconcile_last_success_timestamp_seconds", { reconciler: "unit-a" }), 1_000_000, "frozen while failing");
  r.observe({ whole: true, seconds: 0.01 });
  assert.equal(r.problem(), undefined);
});

test("ReadyChecks: ready when every condition holds; the reasons of the last answer, a throwing condition included", async () => {
  let redisUp = true;
  const c = new ReadyChecks([
    () => undefined,
    redisReachable({ ping: async () => (redisUp ? "PONG" : Promise.reject(new Error("Connection is closed."))) } as never),
    () => {
      throw new Error("child gone");
    },
  ]);
  assert.equal(await c.check(), false);
  assert.deepEqual(c.problems(), ["child gone"]);
  redisUp = false;
  await c.check();
  assert.deepEqual(c.problems(), ["Redis does not answer PING (Redis: Connection is closed.)", "child gone"]);
});

test("SyncLoop: every pass timed; a whole pass that leaves an error is a failure, a clean one a success", async () => {
  let err: string | undefined = "boom";
  let failedAt: number | undefined;
  const loop = new SyncLoop<void>({
    log: pino({ level: "silent" }),
    events: /^x\./,
    pass: async () => void (failedAt = err ? Date.now() : undefined),
    failedAt: () => failedAt,
    reconciler: "unit-loop",
  });
  const done = loop.run(10_000);
  await vi.advanceTimersByTimeAsync(10);
  assert.ok(loop.health!.problem());
  assert.equal(loop.health!.periodMs, 10_000, "the period is the drift interval");
  err = undefined;
  await vi.advanceTimersByTimeAsync(1500);
  assert.equal(loop.health!.problem(), undefined, "the retry a second later succeeded");
  assert.equal(await sample("microvpc_reconcile_errors_total", { reconciler: "unit-loop" }), 1);
  loop.stop();
  await vi.advanceTimersByTimeAsync(600);
  await done;
});

test("drop series: per NIC and direction from its address's element counters, per VPC by reason; NICs past the cap only in their VPC's", async () => {
  const nic = (i: number) => ({ nicId: `nic-00000000000${i}`, address: `10.0.0.${i}` });
  const applied = new Map([
    ["ns-b", { state: { vpcId: "vpc-bbbbbbbbbbbb", nics: [nic(3)] } }],
    ["ns-a", { state: { vpcId: "vpc-aaaaaaaaaaaa", nics: [nic(2), nic(1)] } }],
  ]);
  const counters: Record<string, Record<string, number>> = {
    "ns-a": { "cnt_in_drop/10.0.0.1": 5, "cnt_out_drop/10.0.0.1": 1, "cnt_in_drop/10.0.0.2": 7, "cnt_in_new/10.0.0.2": 9, spoofed: 2 },
    "ns-b": { "cnt_in_drop/10.0.0.3": 11 },
  };
  const nft = {
    counters: async (ns: string) => new Map(Object.entries(counters[ns] ?? {}).map(([k, v]) => [k, { packets: BigInt(v), bytes: 0n }])),
  };
  const r = await readDrops({ applied } as never, nft, 2);
  assert.deepEqual(r.nics, [
    { vpc: "vpc-aaaaaaaaaaaa", nic: "nic-000000000001", direction: "ingress", packets: 5 },
    { vpc: "vpc-aaaaaaaaaaaa", nic: "nic-000000000001", direction: "egress", packets: 1 },
    { vpc: "vpc-aaaaaaaaaaaa", nic: "nic-000000000002", direction: "ingress", packets: 7 },
    { vpc: "vpc-aaaaaaaaaaaa", nic: "nic-000000000002", direction: "egress", packets: 0 },
  ]);
  assert.equal(r.omitted, 1);
  assert.deepEqual(r.vpcs, [
    { vpc: "vpc-aaaaaaaaaaaa", reason: "policy", packets: 13 },
    { vpc: "vpc-aaaaaaaaaaaa", reason: "spoofed", packets: 2 },
    { vpc: "vpc-bbbbbbbbbbbb", reason: "policy", packets: 11 },
    { vpc: "vpc-bbbbbbbbbbbb", reason: "spoofed", packets: 0 },
  ]);
});

test("WireGuard reader on real `wg show dump` output: peers per VPC, handshake age by peer host, +Inf before the first", async () => {
  const text = readFileSync(join(ROOT, "test", "unit", "golden", "wg-show-dump.txt"), "utf8");
  const real = parseDump(text);
  assert.equal(real.peers.length, 2);
  assert.ok(
    real.peers.every((p) => p.latestHandshakeS === 0),
    "captured before any handshake",
  );
  // The same output once the first peer has handshaken at t = 1000 s.
  const after = parseDump(text.replace(/^([^\t\n]+\t\(none\)\t[^\t]+\t[^\t]+\t)0\t/m, "$1999970\t"));
  const [k1, k2] = real.peers.map((p) => p.publicKey);
  const src = {
    hostId: "hv0",
    applied: new Map([
      [
        "vpc-aaaaaaaaaaaa",
        [
          { hostId: "hv1", publicKey: k1, endpoint: "", allowedIps: [] },
          { hostId: "hv2", publicKey: k2, endpoint: "", allowedIps: [] },
        ],
      ],
    ]),
    dump: async (ifname: string) => (ifname === wgName("hv0", "vpc-aaaaaaaaaaaa") ? after : null),
  };
  const r = await readWireguard(src, 10, 1_000_000);
  assert.deepEqual(r.peers, [{ vpc: "vpc-aaaaaaaaaaaa", n: 2 }]);
  assert.deepEqual(r.handshakes, [
    { vpc: "vpc-aaaaaaaaaaaa", peer: "hv1", ageSeconds: 30 },
    { vpc: "vpc-aaaaaaaaaaaa", peer: "hv2", ageSeconds: Infinity },
  ]);
  assert.equal((await readWireguard(src, 1, 1_000_000)).handshakes.length, 1, "capped");
});

test("the gateway adds what its metadata child's throttle totals grew by, and ignores what does not parse or goes back", async () => {
  const get = async () => (await imdsThrottled.get()).values.find((v) => v.labels.reason === "rate")?.value ?? 0;
  const base = await get();
  const last = { rate: 0, connections: 0 };
  const line = (rate: unknown) => JSON.stringify({ level: 30, msg: "imds throttle totals", rate, connections: 0 });
  assert.equal(reportChildThrottle(line(10), last), true);
  assert.equal(reportChildThrottle(line(25), last), true);
  assert.equal(await get(), base + 25);
  reportChildThrottle(line(3), last);
  reportChildThrottle(line("1e9"), last);
  reportChildThrottle(line(1.5), last);
  assert.equal(reportChildThrottle('{"msg":"imds throttle totals", "rate": 9', last), false);
  assert.equal(reportChildThrottle(JSON.stringify({ msg: "something else", rate: 99 }), last), false);
  assert.equal(await get(), base + 25);
});
