// The firewall's store on a single Redis and on a Redis Cluster
// (`npm run bench:fwstore`; not a timed test). From one run it prints, and
// writes as JSON to bench/results/fwstore-<date>.json, the latency of each
// call the firewall API and a host's sync make to Redis, through the real
// FirewallStore, on:
//   - one redis-server, where each change is one script (and the host's
//     snapshot LOAD_VPC one read-only script);
//   - a 3+3 Redis Cluster on loopback, where a group's or ACL's change is
//     one script in its VPC's slot, BindNic and UnbindNic take one-slot
//     steps and the snapshot is read from the client (docs/redis-schema.md
//     "Firewall");
// each beside the baseline of the same run: one HSET round trip to that
// Redis (on the cluster, to a key of the VPC's slot). Rounds alternate the
// two, so a noisy moment weighs on both. The snapshot is a host's view of a
// VPC whose NIC is in a group whose rules name a peer group of --members
// member NICs on another host (each member vouched for: the record, that
// host's copy, its NIC index).
//
// Redis only: no namespace, no kernel. Processes are ended by PID; every
// loop is bounded in count and time. Options (after `npm run bench:fwstore
// --`): --rounds N (default 200), --members N (default 50). --smoke: 5
// rounds, 5 members.
import type { Redis } from "ioredis";
import { ipToInt } from "../services/common/validate.js";
import { FirewallStore, type BindingSpec } from "../services/firewall/store.js";
import { IpamStore } from "../services/ipam/store.js";
import { naKeys } from "../services/netagent/schema.js";
import { subnetSpec } from "../test/lib/ipam-specs.js";
import { clusterOverSingle, compareLayouts, inRoundTrips, noTimings, timer, type LayoutTimings } from "./lib/layouts.js";
import { benchArgs, benchClock, intOpt, runBench } from "./lib/run.js";

const args = benchArgs({ rounds: { type: "string", default: "200" }, members: { type: "string", default: "50" } }, { rounds: "5", members: "5" });
const ROUNDS = intOpt("rounds", args.rounds, 20, 10_000);
const MEMBERS = intOpt("members", args.members, 1, 1000);
const { progress } = benchClock(15 * 60_000);

const CALLS = [
  "HSET (baseline)",
  "CreateSecurityGroup",
  "UpdateSecurityGroup",
  "BindNic",
  "BindNic (other groups)",
  "snapshot (LOAD_VPC)",
  "UnbindNic",
  "DeleteSecurityGroup",
] as const;
type Call = (typeof CALLS)[number];

interface Layout extends LayoutTimings<Call> {
  redis: Redis;
  fw: FirewallStore;
  vpcId: string;
  subnetId: string;
  /** The group a bound NIC joins, whose rules name `peer`; `peer` has MEMBERS members on host "hb". */
  web: string;
  peer: string;
}

const nicOf = (i: number) => `nic-${(0xb00000000000 + i).toString(16)}`;
const addrOf = (i: number) => `10.90.${1 + Math.floor(i / 250)}.${2 + (i % 250)}`;

function binding(l: Layout, nic: string, address: string, host: string, groups: string[]): BindingSpec {
  return {
    nicId: nic,
    vpcId: l.vpcId,
    subnetId: l.subnetId,
    address,
    mac: "02:00:0a:5a:00:01",
    hostId: host,
    hostIf: `t${nic.slice(-12)}`,
    groupIds: groups,
  };
}

async function setUp(name: Layout["name"], redis: Redis): Promise<Layout> {
  const ipam = new IpamStore(redis);
  const fw = new FirewallStore(redis);
  const vpc = (
    await ipam.createVpc({ name: "fwbench", cidr: "10.90.0.0/16", base: ipToInt("10.90.0.0"), prefix: 16, description: "", labels: [], publicCidr: false }, "")
  ).vpc;
  const subnet = (await ipam.createSubnet(subnetSpec(vpc.id, "a", "10.90.0.0/20"), "")).subnet;
  const base = { vpcId: vpc.id, description: "", labels: [], dropLogging: undefined };
  const peer = (await fw.createGroup({ ...base, name: "peer", rules: [] }, "")).group;
  const web = (
    await fw.createGroup({ ...base, name: "web", rules: [{ dir: "ingress", proto: "tcp", portFrom: 80, portTo: 80, group: peer.id, description: "" }] }, "")
  ).group;
  const l: Layout = {
    name,
    redis,
    fw,
    vpcId: vpc.id,
    subnetId: subnet.id,
    web: web.id,
    peer: peer.id,
    us: noTimings(CALLS),
  };
  // The peer group's members, on host "hb", each vouched for by that host's keys.
  for (let i = 0; i < MEMBERS; i++) {
    await fw.bind(binding(l, nicOf(i), addrOf(i), "hb", [peer.id]));
    await redis.hset(naKeys(redis).nicaddr("hb"), `${vpc.id}/${addrOf(i)}`, nicOf(i));
  }
  return l;
}

async function round(l: Layout, i: number): Promise<void> {
  const timed = timer(l);
  const rt = l.name === "cluster" ? `mvpc:{${l.vpcId}}:bench` : "mvpc:bench";
  await timed("HSET (baseline)", () => l.redis.hset(rt, "f", String(i)));
  const base = { vpcId: l.vpcId, description: "", labels: [], dropLogging: undefined };
  const g = await timed("CreateSecurityGroup", () => l.fw.createGroup({ ...base, name: `g${i}`, rules: [] }, ""));
  await timed("UpdateSecurityGroup", () => l.fw.updateGroup(g.group, g.group.generation, { description: "changed" }));
  const nic = nicOf(5000 + i);
  const address = addrOf(1000 + (i % 2000));
  await timed("BindNic", () => l.fw.bind(binding(l, nic, address, "ha", [l.web])));
  await timed("BindNic (other groups)", () => l.fw.bind(binding(l, nic, address, "ha", [l.web, g.group.id])));
  const st = await timed("snapshot (LOAD_VPC)", () => l.fw.loadVpcState("ha", l.vpcId, [{ subnetId: l.subnetId, cidr: "10.90.0.0/20", bridge: "br-b" }]));
  if ((st.members.get(l.peer)?.length ?? 0) !== MEMBERS)
    throw new Error(`${l.name}: the snapshot has ${st.members.get(l.peer)?.length ?? 0} members of the peer group, not ${MEMBERS}`);
  await timed("UnbindNic", () => l.fw.unbind(nic));
  if (!(await timed("DeleteSecurityGroup", () => l.fw.deleteGroup(g.group.id)))) throw new Error(`${l.name}: group ${g.group.id} was not deleted`);
}

const main = (): Promise<number> =>
  compareLayouts<Call, Layout>({
    progress,
    calls: CALLS,
    rounds: ROUNDS,
    roundsNote: `, ${MEMBERS} members in the peer group`,
    setUp,
    round,
    report: (one, many) => ({
      title: `The firewall's store: one redis-server vs a 3+3 Redis Cluster (${ROUNDS} rounds, ${MEMBERS} peer members)`,
      kind: "fwstore",
      verdicts: [
        // The cluster's steps, in round trips of its own baseline: BindNic reads the record and writes four steps (VPC, host, record, event).
        inRoundTrips(many, "BindNic", "HSET (baseline)", "BindNic on a cluster, in HSET round trips", 10),
        // Informative: its rounds are few and fixed, but each member costs three reads (record, copy, NIC index), so the ratio grows with --members.
        inRoundTrips(many, "snapshot (LOAD_VPC)", "HSET (baseline)", `host snapshot on a cluster (${MEMBERS} members), in HSET round trips`),
        clusterOverSingle(one, many, "BindNic"),
      ],
      extra: { rounds: ROUNDS, members: MEMBERS },
    }),
  });

runBench(main);
