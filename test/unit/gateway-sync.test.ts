// GatewaySync as a state table, in the tailscale style (as
// firewall-sync.test.ts): each case is a desired world of this host's VPCs
// ({name, desired}) and what the kernel must hold after a pass (want: every
// namespace's links, addresses, routes, rules, proxy neighbours and nft
// ruleset, in test/unit/golden/gateway-sync.txt). The cases are replayed in
// many random orders (seeded, printed on failure), each twice in a row: every
// transition — a VPC arriving, changing, leaving the host — must land exactly
// on the target's state, and a pass with nothing new runs nothing. Then the
// drift pass and a failing VPC.
import assert from "node:assert/strict";
import { join } from "node:path";
import { pino } from "pino";
import { test } from "vitest";
import { render } from "../../services/common/nft/tx.js";
import * as V from "../../services/common/validate.js";
import type { StoredConfig } from "../../services/dns/store.js";
import type { SubnetRec, VpcRec } from "../../services/ipam/store.js";
import { names as gwNames } from "../../services/gateway/plan.js";
import type { FipRec, NatRec, PfRec } from "../../services/gateway/schema.js";
import { GatewaySync } from "../../services/gateway/sync.js";
import { names } from "../../services/netagent/plan.js";
import type { HostDesired } from "../../services/netagent/store.js";
import type { NicSpec } from "../../services/netagent/plan.js";
import { FakeGwKernel } from "../lib/fake-gw-kernel.js";
import { ROOT } from "../lib/daemon.js";
import { assertGolden, replayOrders } from "../lib/state-table.js";

const FILE = join(ROOT, "test", "unit", "golden", "gateway-sync.txt");
const HOST = "hv1";
const HNS = "gwhost";
const UPLINK = "eth0";
const A = "vpc-aaaaaaaaaaaa";
const B = "vpc-bbbbbbbbbbbb";
/** The transit index the store hands each VPC (fixed: the state must not depend on arrival order). */
const TRANSIT = new Map([
  [A, 0],
  [B, 1],
]);
const VPC_CIDR = "10.0.0.0/16";

interface VpcWorld {
  subnets: { id: string; cidr: string; public: boolean }[];
  nics: { id: string; subnet: string; address: string }[];
  nat?: string[];
  fips?: { address: string; private: string }[];
  pfs?: { proto: "tcp" | "udp"; outsidePort: number; private: string; privatePort: number }[];
  /** The VPC's own resolver (DNS config); unset: the default, base + 2. */
  resolver?: string;
  /** IMDS hop limits by address (unset: 1). */
  hops?: Record<string, number>;
}
type World = Map<string, VpcWorld>;

interface Case {
  name: string;
  desired: World;
}

const a1: VpcWorld = {
  subnets: [{ id: "subnet-a00000000001", cidr: "10.0.1.0/24", public: true }],
  nics: [{ id: "nic-a00000000001", subnet: "subnet-a00000000001", address: "10.0.1.4" }],
};
const a2: VpcWorld = {
  subnets: [...a1.subnets, { id: "subnet-a00000000002", cidr: "10.0.2.0/24", public: false }],
  nics: [...a1.nics, { id: "nic-a00000000002", subnet: "subnet-a00000000002", address: "10.0.2.5" }],
  nat: [],
  fips: [{ address: "203.0.113.10", private: "10.0.2.5" }],
  pfs: [{ proto: "tcp", outsidePort: 8080, private: "10.0.1.4", privatePort: 80 }],
  resolver: "10.0.255.53",
  hops: { "10.0.1.4": 2 },
};
const a3: VpcWorld = {
  ...a2,
  fips: [
    { address: "203.0.113.10", private: "10.0.1.4" },
    { address: "203.0.113.11", private: "10.0.2.5" },
  ],
  pfs: [],
  resolver: undefined,
  hops: {},
};
const b1: VpcWorld = {
  subnets: [{ id: "subnet-b00000000001", cidr: "10.0.1.0/24", public: false }],
  nics: [{ id: "nic-b00000000001", subnet: "subnet-b00000000001", address: "10.0.1.4" }],
  nat: ["subnet-b00000000001"],
  fips: [{ address: "203.0.113.12", private: "10.0.1.4" }],
};

const cases: Case[] = [
  { name: "one VPC, a public subnet, one NIC", desired: new Map([[A, a1]]) },
  { name: "a NAT gateway for the private subnet, a floating IP, a port forward, its own resolver, a hop limit", desired: new Map([[A, a2]]) },
  { name: "the floating IP moves to the other NIC, a second arrives, the port forward, resolver and hop limit go", desired: new Map([[A, a3]]) },
  {
    name: "a second VPC with the same addresses joins, with a floating IP",
    desired: new Map([
      [A, a1],
      [B, b1],
    ]),
  },
  { name: "the first VPC leaves the host", desired: new Map([[B, b1]]) },
  { name: "no VPC here", desired: new Map() },
];

/** The fakes GatewaySync reads: the netagent's records, the gateway's, IPAM's, the DNS config, from one world. */
class Sources {
  now: World = new Map();
  /** Transit indexes handed out and not released. */
  readonly transits = new Set<string>();

  host = {
    load: async (): Promise<HostDesired> => {
      const vpcs = [...this.now.keys()];
      return {
        vpcs: new Map(vpcs.map((v) => [v, { vpcId: v, ns: names.netns(HOST, v), createdMs: 0 }])),
        subnets: new Map(
          vpcs.flatMap((v) => this.now.get(v)!.subnets.map((s) => [s.id, { subnetId: s.id, vpcId: v, cidr: s.cidr, gatewayCidr: "", mtu: 1500 }] as const)),
        ),
        nics: new Map(
          vpcs.flatMap((v) => this.now.get(v)!.nics.map((n) => [n.id, { nicId: n.id, vpcId: v, subnetId: n.subnet, address: n.address }] as const)),
        ) as unknown as HostDesired["nics"],
      };
    },
    nicRecord: async (id: string) => {
      for (const [v, w] of this.now) {
        const n = w.nics.find((x) => x.id === id);
        if (n) return { nic: { nicId: n.id, vpcId: v, subnetId: n.subnet, address: n.address } as unknown as NicSpec };
      }
      return "absent" as const;
    },
  };

  private each<T>(f: (vpcId: string, w: VpcWorld) => T[]): T[] {
    return [...this.now].flatMap(([v, w]) => f(v, w));
  }

  store = {
    listNats: async (): Promise<NatRec[]> =>
      this.each((vpcId, w) =>
        w.nat ? [{ id: `nat-${vpcId.slice(-12)}`, vpcId, subnetId: "", sources: w.nat, address: "", description: "", createdMs: 0 }] : [],
      ),
    listFips: async (): Promise<FipRec[]> =>
      this.each((vpcId, w) =>
        (w.fips ?? []).map((f) => ({
          id: "",
          address: f.address,
          vpcId,
          private: f.private,
          nicId: "",
          hostId: HOST,
          description: "",
          allocatedMs: 0,
          associatedMs: 0,
        })),
      ),
    listPfs: async (): Promise<PfRec[]> =>
      this.each((vpcId, w) => (w.pfs ?? []).map((p) => ({ ...p, id: "", vpcId, hostId: HOST, nicId: "", description: "", createdMs: 0 }))),
    transitIndex: async (_host: string, vpcId: string): Promise<number> => {
      this.transits.add(vpcId);
      return TRANSIT.get(vpcId)!;
    },
    transitMap: async (): Promise<Map<string, number>> => new Map([...this.transits].map((v) => [v, TRANSIT.get(v)!])),
    releaseTransit: async (_host: string, vpcId: string): Promise<number | undefined> => (this.transits.delete(vpcId) ? TRANSIT.get(vpcId) : undefined),
  };

  ipam = {
    getVpc: async (id: string) => ({ id, cidr: VPC_CIDR, base: V.cidr("cidr", VPC_CIDR, { min: 0, max: 32 }).base }) as VpcRec,
    getSubnet: async (id: string) => {
      const s = this.each((_v, w) => w.subnets).find((x) => x.id === id);
      return s ? ({ id, type: s.public ? "public" : "private" } as SubnetRec) : null;
    },
  };

  dns = { getConfig: async (vpcId: string): Promise<StoredConfig> => ({ resolver: this.now.get(vpcId)?.resolver }) };

  hopOf = async (vpcId: string, address: string): Promise<number | undefined> => this.now.get(vpcId)?.hops?.[address];

  hops = async (): Promise<Map<string, number>> => new Map(this.each((v, w) => Object.entries(w.hops ?? {}).map(([a, n]) => [`${v}/${a}`, n] as const)));
}

function setup() {
  const src = new Sources();
  const kernel = new FakeGwKernel(HNS, [UPLINK]);
  const sync = new GatewaySync(
    src.store,
    src.ipam,
    src.host,
    {
      hostId: HOST,
      hostNetns: HNS,
      uplink: UPLINK,
      imdsPort: 8169,
      dnsPort: 8053,
      pool: "203.0.113.0/24",
      hopLimits: src.hops,
      hopLimitOf: src.hopOf,
      reservedPorts: [[22, 22]],
      conntrackLimitPerVm: 1000,
      managementCidrs: async () => ["192.0.2.0/24"],
    },
    pino({ level: "silent" }),
    { kernel, dns: src.dns, nsExists: (ns) => [...src.now.keys()].some((v) => names.netns(HOST, v) === ns) },
  );
  /** The world changes: VPCs that left lose their namespace (the netagent deletes it). */
  const to = (w: World) => {
    for (const v of src.now.keys()) if (!w.has(v)) kernel.removeNetns(names.netns(HOST, v));
    src.now = w;
  };
  return { src, kernel, sync, to };
}

/** The kernel's state a world leaves: the host namespace and each of its VPCs' namespaces. */
const dump = (kernel: FakeGwKernel, w: World) =>
  [HNS, ...[...w.keys()].sort().map((v) => names.netns(HOST, v))].map((ns) => `--- ${ns}\n${kernel.dump(ns)}`).join("");

/** Each case's state after a pass from nothing: the want column. */
async function wants(): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for (const c of cases) {
    const { kernel, sync, to } = setup();
    to(c.desired);
    await sync.syncOnce();
    assert.equal(sync.status.lastError, "", c.name);
    assert.deepEqual([...sync.vpcFailures.keys()], [], c.name);
    out.set(c.name, dump(kernel, c.desired));
  }
  return out;
}

/** Kernel changes since `mark`: ip batches and nft transactions (empty ones run nothing). */
const changes = (kernel: FakeGwKernel, mark: { b: number; n: number }) =>
  kernel.batches.length - mark.b + kernel.nft.applied.slice(mark.n).filter((a) => render(a.tx) !== "").length;
const mark = (kernel: FakeGwKernel) => ({ b: kernel.batches.length, n: kernel.nft.applied.length });

test("golden: the kernel's state for each case after a pass", async () => {
  assertGolden(FILE, await wants(), "the gateway's kernel state");
});

test("the cases replayed in random orders: every transition lands exactly on the target; a pass with nothing new runs nothing", async () => {
  const want = await wants();
  for (const { seed, order } of replayOrders(cases)) {
    const { kernel, sync, to } = setup();
    let prev: Case | undefined;
    for (const c of order) {
      to(c.desired);
      const m = mark(kernel);
      await sync.syncOnce();
      const at = `seed ${seed}: ${prev?.name ?? "(start)"} → ${c.name}`;
      assert.equal(sync.status.lastError, "", at);
      assert.deepEqual([...sync.vpcFailures.keys()], [], at);
      assert.equal(dump(kernel, c.desired), want.get(c.name), at);
      if (prev === c) assert.equal(changes(kernel, m), 0, `${at}: nothing changed, nothing run`);
      prev = c;
    }
  }
});

test("a transit link deleted behind the gateway's back is put back, with its routes, by the drift pass", async () => {
  const c = cases[2];
  const { kernel, sync, to } = setup();
  to(c.desired);
  await sync.syncOnce();
  const want = dump(kernel, c.desired);
  kernel.deleteLink(HNS, gwNames.hostSide(A));
  await sync.syncOnce();
  assert.notEqual(dump(kernel, c.desired), want, "a pass with nothing new does not look at the kernel");
  await sync.syncOnce(true);
  assert.equal(dump(kernel, c.desired), want);
});

test("a VPC whose nft transaction fails is retried with backoff; the other VPC converges meanwhile", async () => {
  const c = cases[3];
  const { kernel, sync, to } = setup();
  const real = kernel.apply.bind(kernel);
  const ns = names.netns(HOST, A);
  let fail = true;
  kernel.apply = async (n, tx) => {
    if (n === ns && fail) throw new Error("Error: Could not process rule: No buffer space available");
    return real(n, tx);
  };
  to(c.desired);
  await sync.syncOnce();
  assert.equal(sync.status.lastError, "", "one VPC failing is not the pass failing");
  assert.match(sync.vpcFailures.get(A)?.error ?? "", /No buffer space available/);
  assert.equal(kernel.dump(names.netns(HOST, B)), (await wants()).get(c.name)!.split(`--- ${names.netns(HOST, B)}\n`)[1]);
  fail = false;
  await sync.syncOnce();
  assert.ok(sync.vpcFailures.has(A), "not before its backoff is due");
  sync.vpcFailures.get(A)!.retryAt = 0;
  await sync.syncOnce();
  assert.deepEqual([...sync.vpcFailures.keys()], []);
  assert.equal(dump(kernel, c.desired), (await wants()).get(c.name));
});

test("a floating IP's route deleted behind the gateway's back is put back by the drift pass", async () => {
  const c = cases[1];
  const { kernel, sync, to } = setup();
  to(c.desired);
  await sync.syncOnce();
  const want = dump(kernel, c.desired);
  assert.match(want, /route 203\.0\.113\.10\/32 /, "the floating IP has its host route");
  await kernel.hostBatch(["route del 203.0.113.10/32"], true);
  assert.notEqual(dump(kernel, c.desired), want, "the route is gone");
  await sync.syncOnce(true);
  assert.equal(dump(kernel, c.desired), want, "the drift pass re-applies the VPC's host routes");
});

test("a transit link whose VPC side failed half-way is finished by the VPC's next attempt", async () => {
  const c = cases[0];
  const { kernel, sync, to } = setup();
  to(c.desired);
  kernel.failNext.set(names.netns(HOST, A), "RTNETLINK answers: No buffer space available");
  await sync.syncOnce();
  assert.match(sync.vpcFailures.get(A)?.error ?? "", /No buffer space available/, "the VPC side failed after the host side was made");
  sync.vpcFailures.get(A)!.retryAt = 0;
  await sync.syncOnce();
  assert.deepEqual([...sync.vpcFailures.keys()], []);
  assert.equal(dump(kernel, c.desired), (await wants()).get(c.name));
});

test("a NIC or an instance's metadata coming or going asks for a whole pass only when it changes what is applied, and skipping it changes nothing", async () => {
  const { kernel, sync, to } = setup();
  const base = new Map([[A, a2]]);
  to(base);
  await sync.syncOnce();
  const nic = (id: string, address: string, subnet = "subnet-a00000000001") => ({ id, subnet, address });
  /** The world moves to w; returns whether the gateway asks for a pass, after checking that a whole pass then changes nothing when it does not. */
  const step = async (w: World, keys: string[]): Promise<boolean> => {
    to(w);
    const asks = await sync.changesApplied(new Set(keys));
    const m = mark(kernel);
    await sync.syncOnce();
    if (!asks) assert.equal(changes(kernel, m), 0, `${keys.join(", ")}: skipped, but a whole pass changed the kernel`);
    return asks;
  };
  const w1 = new Map([[A, { ...a2, nics: [...a2.nics, nic("nic-a00000000009", "10.0.1.9")] }]]);
  assert.equal(await step(w1, ["nic vpc-aaaaaaaaaaaa nic-a00000000009"]), false, "a NIC with nothing of its own here");
  const w2 = new Map([[A, { ...w1.get(A)!, hops: { ...a2.hops, "10.0.1.9": 3 } }]]);
  assert.equal(await step(w2, ["addr vpc-aaaaaaaaaaaa 10.0.1.9"]), true, "its hop limit set to 3");
  const w3 = new Map([[A, { ...w2.get(A)!, nics: [...w2.get(A)!.nics, nic("nic-a00000000010", "10.0.1.10")], hops: { ...w2.get(A)!.hops, "10.0.1.10": 3 } }]]);
  assert.equal(await step(w3, ["nic vpc-aaaaaaaaaaaa nic-a00000000010"]), true, "a NIC whose instance has hop limit 3 already");
  const w4 = new Map([[A, { ...w3.get(A)!, nics: w3.get(A)!.nics.filter((n) => n.address !== "10.0.2.5") }]]);
  assert.equal(await step(w4, ["nic vpc-aaaaaaaaaaaa nic-a00000000002"]), true, "the NIC holding the floating IP leaves");
  const w5 = new Map([[A, { ...w4.get(A)!, hops: { ...w4.get(A)!.hops, "10.0.1.20": 1 } }]]);
  assert.equal(await step(w5, ["addr vpc-aaaaaaaaaaaa 10.0.1.20"]), false, "metadata with the default hop limit");
  const w6 = new Map([[A, { ...w5.get(A)!, nics: w5.get(A)!.nics.filter((n) => n.address !== "10.0.1.9") }]]);
  assert.equal(await step(w6, ["nic vpc-aaaaaaaaaaaa nic-a00000000009"]), true, "the NIC with hop limit 3 leaves");
  const w7 = new Map([
    [A, { ...w6.get(A)!, nics: w6.get(A)!.nics.filter((n) => n.address !== "10.0.1.10") }],
    [B, b1],
  ]);
  assert.equal(await sync.changesApplied(new Set(["nic vpc-bbbbbbbbbbbb nic-b00000000001"])), true, "a VPC not here at the last pass");
  to(w7);
});
