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
import type { Redis } from "ioredis";
import type { NicSpec } from "../services/netagent/plan.js";
import { HostStore, naKeys } from "../services/netagent/store.js";
import { clusterOverSingle, compareLayouts, inRoundTrips, noTimings, timer, type LayoutTimings } from "./lib/layouts.js";
import { benchArgs, benchClock, intOpt, runBench } from "./lib/run.js";

const args = benchArgs({ rounds: { type: "string", default: "300" } }, { rounds: "5" });
const ROUNDS = intOpt("rounds", args.rounds, 5, 10_000);
const { progress } = benchClock(10 * 60_000);

const VPC = "vpc-0b0b0b0b0b0b";
const CALLS = ["HSET (baseline)", "AttachNic", "DetachNic", "AttachNic over a stale claim"] as const;
type Call = (typeof CALLS)[number];

interface Layout extends LayoutTimings<Call> {
  redis: Redis;
  a: HostStore;
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
  const timed = timer(l);
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

const main = (): Promise<number> =>
  compareLayouts<Call, Layout>({
    progress,
    calls: CALLS,
    rounds: ROUNDS,
    setUp: (name, redis) => ({ name, redis, a: new HostStore(redis, "ha"), us: noTimings(CALLS) }),
    round,
    report: (one, many) => ({
      title: `The netagent's store: one redis-server vs a 3+3 Redis Cluster (${ROUNDS} rounds)`,
      kind: "hoststore",
      verdicts: [
        // A token read, three steps and the events (one MULTI per stream, sent together).
        inRoundTrips(many, "AttachNic", "HSET (baseline)", "AttachNic on a cluster, in HSET round trips", 10),
        clusterOverSingle(one, many, "AttachNic"),
        clusterOverSingle(one, many, "DetachNic"),
      ],
      extra: { rounds: ROUNDS },
    }),
  });

runBench(main);
