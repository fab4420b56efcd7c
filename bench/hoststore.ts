// The netagent's store on a single Redis and on a Redis Cluster
// (`npm run bench:hoststore`; not a timed test). From one run it prints, and
// writes as JSON to bench/results/hoststore-<date>.json, the latency of the
// Redis side of AttachNic and DetachNic, through the real HostStore, on:
//   - one redis-server, where AttachNic's address claim is one script
//     (ADD_NIC) and DetachNic one MULTI;
//   - a 3+3 Redis Cluster on loopback, where AttachNic takes one-slot steps
//     (CLAIM in the VPC's slot, HOST in the host's, CONFIRM, then the
//     events) and DetachNic three (docs/redis-schema.md "netagent");
// each beside the baseline of the same run: one HSET round trip to that
// Redis (on the cluster, to a key of the VPC's slot). Rounds alternate the
// two. "AttachNic over a stale claim" attaches an address whose claim names
// a NIC another host no longer has: the cluster checks that host's records
// from the client and replaces the claim (the path of an address released
// on one hypervisor and attached on another).
//
// Redis only: no namespace, no kernel. Processes are ended by PID; every
// loop is bounded in count and time. Options (after `npm run bench:hoststore
// --`): --rounds N (default 300). --smoke: 5 rounds.
import { performance } from "node:perf_hooks";
import type { Redis } from "ioredis";
import { connectRedis, waitReady } from "../services/common/redis.js";
import type { NicSpec } from "../services/netagent/plan.js";
import { HostStore, naKeys } from "../services/netagent/store.js";
import { startRedis, startRedisCluster } from "../test/lib/redis.js";
import { check, dur, heading, num, resultsFile, table, verdictTable, writeJson, type Verdict } from "./lib/report.js";
import { benchArgs, benchClock, intOpt, runBench } from "./lib/run.js";
import { percentile, sorted } from "./lib/stats.js";

const args = benchArgs({ rounds: { type: "string", default: "300" } }, { rounds: "5" });
const ROUNDS = intOpt("rounds", args.rounds, 5, 10_000);
const { progress } = benchClock(10 * 60_000);

const VPC = "vpc-0b0b0b0b0b0b";
const CALLS = ["HSET (baseline)", "AttachNic", "DetachNic", "AttachNic over a stale claim"] as const;
type Call = (typeof CALLS)[number];

interface Layout {
  name: "single" | "cluster";
  redis: Redis;
  a: HostStore;
  us: Record<Call, number[]>;
}

const nic = (i: number, address: string): NicSpec => {
  const id = (0xa00000000000 + i).toString(16);
  return {
    nicId: `nic-${id}`,
    owner: `vm-${i}`,
    vpcId: VPC,
    subnetId: "subnet-0b0b0b0b0b0b",
    kind: "veth",
    hostIf: `v${id}`,
    mac: "02:00:0a:5b:00:01",
    address,
    prefix: 16,
    gateway: "10.91.0.1",
    mtu: 1500,
    hostname: "",
    guestIf: "eth0",
    dns: [],
    veth: { netnsPath: `/run/netns/vm${i}`, skipDefaultRoute: false },
    bandwidth: { ingressMbps: 0, egressMbps: 0 },
    createdMs: 1,
    clientToken: `tok-${i}`,
  };
};
const addrOf = (i: number) => `10.91.${1 + Math.floor(i / 250)}.${2 + (i % 250)}`;

async function round(l: Layout, i: number): Promise<void> {
  const timed = async <T>(call: Call, f: () => Promise<T>): Promise<T> => {
    const t = performance.now();
    const out = await f();
    l.us[call].push((performance.now() - t) * 1000);
    return out;
  };
  const k = naKeys(l.redis);
  await timed("HSET (baseline)", () => l.redis.hset(`${k.claims(VPC)}:bench`, "f", String(i)));
  const n = nic(10_000 + i, addrOf(i + 100));
  const got = await timed("AttachNic", () => l.a.addNic(n));
  if (got.code !== 1) throw new Error(`${l.name}: AttachNic answered ${JSON.stringify(got)}`);
  await timed("DetachNic", () => l.a.delNic(n));
  // A claim left by host "hb", whose records no longer have that NIC.
  const stale = nic(20_000 + i, addrOf(i + 5000));
  await l.redis.hset(k.claims(VPC), `${VPC}/${stale.address}`, `hb/nic-${(0xbb0000000000 + i).toString(16)}`);
  const over = await timed("AttachNic over a stale claim", () => l.a.addNic(stale));
  if (over.code !== 1) throw new Error(`${l.name}: AttachNic over a stale claim answered ${JSON.stringify(over)}`);
  await l.a.delNic(stale);
}

async function main(): Promise<number> {
  progress("starting one redis-server and a 3+3 Redis Cluster");
  const single = await startRedis({ persistence: false });
  const cluster = await startRedisCluster();
  const conns: Redis[] = [];
  try {
    const layouts: Layout[] = [];
    for (const [name, url] of [
      ["single", single.url],
      ["cluster", cluster.url],
    ] as const) {
      const redis = connectRedis({ url, commandTimeoutMs: 5000 });
      conns.push(redis);
      await waitReady(redis);
      layouts.push({ name, redis, a: new HostStore(redis, "ha"), us: Object.fromEntries(CALLS.map((c) => [c, []])) as never });
    }
    // One round each first, not counted: scripts loaded on every node, connections to every primary open.
    for (const l of layouts) {
      await round(l, -1);
      for (const c of CALLS) l.us[c] = [];
    }
    progress(`${ROUNDS} rounds`);
    for (let i = 0; i < ROUNDS; i++) for (const l of i % 2 ? [...layouts].reverse() : layouts) await round(l, i);

    const p50 = (l: Layout, call: Call) => percentile(sorted(l.us[call]), 50);
    const p99 = (l: Layout, call: Call) => percentile(sorted(l.us[call]), 99);
    const [one, many] = layouts;
    console.log(heading(`The netagent's store: one redis-server vs a 3+3 Redis Cluster (${ROUNDS} rounds)`));
    console.log(
      table(
        ["call", "single p50", "p99", "× HSET", "cluster p50", "p99", "× HSET"],
        CALLS.map((call) => [
          call,
          dur(p50(one, call)),
          dur(p99(one, call)),
          num(p50(one, call) / p50(one, "HSET (baseline)"), 1),
          dur(p50(many, call)),
          dur(p99(many, call)),
          num(p50(many, call) / p50(many, "HSET (baseline)"), 1),
        ]),
      ),
    );
    // AttachNic on a cluster: a token read, three steps and the events (one MULTI per stream, sent together).
    const attachRt = p50(many, "AttachNic") / p50(many, "HSET (baseline)");
    const verdicts: Verdict[] = [
      {
        measure: "AttachNic on a cluster, in HSET round trips",
        value: dur(p50(many, "AttachNic")),
        baseline: dur(p50(many, "HSET (baseline)")),
        ratio: attachRt,
        ...check(attachRt, { max: 10 }),
      },
      {
        measure: "AttachNic, cluster / single",
        value: dur(p50(many, "AttachNic")),
        baseline: dur(p50(one, "AttachNic")),
        ratio: p50(many, "AttachNic") / p50(one, "AttachNic"),
        target: "",
      },
      {
        measure: "DetachNic, cluster / single",
        value: dur(p50(many, "DetachNic")),
        baseline: dur(p50(one, "DetachNic")),
        ratio: p50(many, "DetachNic") / p50(one, "DetachNic"),
        target: "",
      },
    ];
    console.log("\nVerdict");
    console.log(verdictTable(verdicts));
    const file = resultsFile("hoststore");
    writeJson(file, {
      rounds: ROUNDS,
      rows: CALLS.map((call) => ({
        call,
        single: { p50Us: p50(one, call), p99Us: p99(one, call) },
        cluster: { p50Us: p50(many, call), p99Us: p99(many, call) },
      })),
      verdicts,
    });
    console.log(`figures written to ${file}`);
    return verdicts.every((v) => v.pass !== false) ? 0 : 2;
  } finally {
    for (const r of conns) r.disconnect();
    await cluster.stop();
    await single.stop();
  }
}

runBench(main);
