// The gateway's store on a single Redis and on a Redis Cluster
// (`npm run bench:gwstore`; not a timed test). From one run it prints, and
// writes as JSON to bench/results/gwstore-<date>.json, the latency of the
// Redis side of the gateway API's writes, through the real GatewayStore, on:
//   - one redis-server, where each is one script that also appends its
//     event;
//   - a 3+3 Redis Cluster on loopback, where the script runs in the {gw}
//     slot and the store appends the event to the VPC's stream after it
//     (one MULTI and its wake), and DeleteNatGateway deletes the lease in
//     the VPC's slot after its record (docs/redis-schema.md "Gateway");
// each beside the baseline of the same run: one HSET round trip to that
// Redis (on the cluster, to a key of the {gw} slot). Rounds alternate the
// two. A round: CreateNatGateway (with a client token, read first),
// AllocateFloatingIp, AssociateFloatingIp, DisassociateFloatingIp,
// ReleaseFloatingIp, DeleteNatGateway, each for a VPC of its own.
// CreateNatGateway is what the API's store path does
// (GatewayStore.createNatInSubnet): on a single Redis the record's script and
// the read that the subnet still stands; on a cluster the hold on the subnet
// in the VPC's slot, then the record's script (docs/redis-schema.md "NAT
// gateway holds"). Each round's VPC and subnet are made by the real
// IpamStore beforehand and removed after, untimed.
//
// Redis only: no namespace, no kernel. Processes are ended by PID; every
// loop is bounded in count and time. Options (after `npm run bench:gwstore
// --`): --rounds N (default 300). --smoke: 5 rounds.
import type { Redis } from "ioredis";
import { ipToInt } from "../services/common/validate.js";
import { GatewayStore } from "../services/gateway/store.js";
import { IpamStore } from "../services/ipam/store.js";
import { subnetSpec, vpcSpec } from "../test/lib/ipam-specs.js";
import { clusterOverSingle, compareLayouts, inRoundTrips, noTimings, timer, type LayoutTimings } from "./lib/layouts.js";
import { benchArgs, benchClock, intOpt, runBench } from "./lib/run.js";

const args = benchArgs({ rounds: { type: "string", default: "300" } }, { rounds: "5" });
const ROUNDS = intOpt("rounds", args.rounds, 5, 10_000);
const { progress } = benchClock(10 * 60_000);

const CALLS = [
  "HSET (baseline)",
  "CreateNatGateway",
  "AllocateFloatingIp",
  "AssociateFloatingIp",
  "DisassociateFloatingIp",
  "ReleaseFloatingIp",
  "DeleteNatGateway",
] as const;
type Call = (typeof CALLS)[number];

interface Layout extends LayoutTimings<Call> {
  redis: Redis;
  gw: GatewayStore;
  ipam: IpamStore;
}

/** Every round gives back what it took: two addresses of the pool at a time. */
const POOL = { first: ipToInt("198.18.7.1"), last: ipToInt("198.18.7.8") };
const hex12 = (n: number) => (0xc00000000000 + n).toString(16);

async function round(l: Layout, i: number): Promise<void> {
  const timed = timer(l);
  const r = i + 1;
  // The round's VPC and public subnet, untimed: CreateNatGateway holds (or checks) the subnet.
  const { vpc } = await l.ipam.createVpc(vpcSpec(`gwbench-${r}`, "10.92.0.0/16"), "");
  const { subnet } = await l.ipam.createSubnet({ ...subnetSpec(vpc.id, "pub", "10.92.0.0/24"), type: "public" }, "");
  const vpcId = vpc.id;
  await timed("HSET (baseline)", () => l.redis.hset(`${l.gw.keys.nats}:bench`, "f", String(i)));
  const nat = await timed("CreateNatGateway", () =>
    l.gw.createNatInSubnet({ vpcId, subnetId: subnet.id, sources: [], description: "bench" }, `tok-${l.name}-${r}`, POOL),
  );
  const fip = await timed("AllocateFloatingIp", () => l.gw.allocateFip(POOL, "", "bench"));
  const target = { vpcId, private: "10.92.0.10", nicId: `nic-${hex12(r)}`, hostId: "hbench" };
  await timed("AssociateFloatingIp", () => l.gw.setFipTarget(fip, target));
  await timed("DisassociateFloatingIp", () => l.gw.setFipTarget({ ...fip, ...target }, null));
  const released = await timed("ReleaseFloatingIp", () => l.gw.releaseFip(fip));
  if (!released) throw new Error(`${l.name}: ReleaseFloatingIp released nothing`);
  const deleted = await timed("DeleteNatGateway", () => l.gw.deleteNat(nat));
  if (!deleted) throw new Error(`${l.name}: DeleteNatGateway deleted nothing`);
  if (!(await l.ipam.deleteSubnet(subnet.id)) || !(await l.ipam.deleteVpc(vpc.id))) throw new Error(`${l.name}: the round's subnet or VPC was not removed`);
}

const main = (): Promise<number> =>
  compareLayouts<Call, Layout>({
    progress,
    calls: CALLS,
    rounds: ROUNDS,
    setUp: (name, redis) => ({ name, redis, gw: new GatewayStore(redis), ipam: new IpamStore(redis), us: noTimings(CALLS) }),
    round,
    report: (one, many) => ({
      title: `The gateway's store: one redis-server vs a 3+3 Redis Cluster (${ROUNDS} rounds)`,
      kind: "gwstore",
      verdicts: [
        // The token read, the hold, the record's script, the record read back, and the event (a MULTI to the VPC's stream with its wake, plus the rolling-upgrade copy).
        inRoundTrips(many, "CreateNatGateway", "HSET (baseline)", "CreateNatGateway on a cluster, in HSET round trips", 7),
        clusterOverSingle(one, many, "CreateNatGateway"),
        clusterOverSingle(one, many, "AssociateFloatingIp"),
        clusterOverSingle(one, many, "DeleteNatGateway"),
      ],
      extra: { rounds: ROUNDS },
    }),
  });

runBench(main);
