// FirewallSync as a state table, in the tailscale style: each case is a
// desired world for one VPC ({name, desired}) and the ruleset FakeNft must
// hold after a pass (want, in test/unit/golden/firewall-sync.txt). The cases
// are replayed in many random orders (seeded, printed on failure), each
// twice in a row, so every transition between two worlds is an incremental
// change that must land exactly on the target's ruleset, and a pass with
// nothing new applies nothing. Then the failure paths: a refused transaction
// and a table gone behind the daemon's back end in a full replace.
import assert from "node:assert/strict";
import { join } from "node:path";
import { pino } from "pino";
import { test } from "vitest";
import { FakeNft } from "../../services/common/nft/fake.js";
import { NftTransaction as NftTransactionOf, render, type NftTransaction } from "../../services/common/nft/tx.js";
import type { CtEntry } from "../../services/common/nft/linux.js";
import { flowAllowed, removeTx, sharedChainName, type FwModel } from "../../services/firewall/compile.js";
import type { BindingRec, SecurityGroupRec, VpcFirewallState } from "../../services/firewall/model.js";
import { ATTACH_PASS_DELAY_MS, FirewallSync, type StateSource } from "../../services/firewall/sync.js";
import { metricsRegistry } from "../../services/common/metrics.js";
import { names } from "../../services/netagent/plan.js";
import type { HostDesired } from "../../services/netagent/store.js";
import type { NicSpec } from "../../services/netagent/plan.js";
import { ROOT } from "../lib/daemon.js";
import { assertGolden, replayOrders } from "../lib/state-table.js";
import { DB, fw, nic, OPS, WEB } from "../lib/nft-fixtures.js";

const FILE = join(ROOT, "test", "unit", "golden", "firewall-sync.txt");
const HOST = "hv1";
const VPC = "vpc-111111111111";
const NS = names.netns(HOST, VPC);

interface Case {
  name: string;
  desired: VpcFirewallState;
}

const cases: Case[] = [
  { name: "web, db and ops groups, an ACL, a NIC without groups", desired: fw(0) },
  { name: "a member joins, a rule goes, the third NIC gets a group with its own drop logging", desired: fw(1) },
  { name: "the db NIC and the ACL go", desired: fw(2) },
  { name: "no NICs, no groups", desired: fw(3) },
  {
    name: "the web group opens 443 and loses its ICMP rules",
    desired: (() => {
      const st = fw(0);
      const web = st.groups.get(WEB)!;
      st.groups.set(WEB, { ...web, rules: [...web.rules.filter((r) => r.proto !== "icmp"), { ...web.rules[0], portFrom: 443, portTo: 443 }] });
      return st;
    })(),
  },
];

/** The world the fakes serve: the netagent's records and the firewall's Redis state, from one case. */
class World implements StateSource {
  now: VpcFirewallState = fw(3);

  host = {
    load: async (): Promise<HostDesired> => ({
      vpcs: new Map([[VPC, { vpcId: VPC, ns: NS, createdMs: 0 }]]),
      subnets: new Map(this.now.subnets.map((s) => [s.subnetId, { subnetId: s.subnetId, vpcId: VPC, cidr: s.cidr, gatewayCidr: "", mtu: 1500 }])),
      nics: new Map(
        this.now.nics.map((n) => [n.nicId, { ...n, owner: "", kind: "veth", prefix: 24, gateway: "", mtu: 1500, hostname: "", guestIf: "" }]),
      ) as unknown as HostDesired["nics"],
    }),
  };

  async bindingsOf(nicIds: string[]): Promise<Map<string, BindingRec>> {
    return new Map(this.now.nics.filter((n) => nicIds.includes(n.nicId)).map((n) => [n.nicId, n]));
  }

  async loadVpcState(_host: string, vpcId: string, subnets: VpcFirewallState["subnets"], nics: BindingRec[]): Promise<VpcFirewallState> {
    return { ...this.now, vpcId, subnets, nics };
  }
}

function setup() {
  const world = new World();
  const nft = new FakeNft();
  const sync = new FirewallSync(nft, world, world.host, HOST, pino({ level: "silent" }), () => true);
  return { world, nft, sync };
}

/** Each case's ruleset after a pass from nothing: the want column. */
async function wants(): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for (const c of cases) {
    const { world, nft, sync } = setup();
    world.now = c.desired;
    await sync.syncAll(true);
    assert.equal(sync.status.lastError, "", c.name);
    out.set(c.name, nft.dump(NS));
  }
  return out;
}

const isReplace = (tx: NftTransaction) => /^delete table inet microvpc$/m.test(render(tx));

test("golden: the ruleset of each case after a pass", async () => {
  assertGolden(FILE, await wants(), "the firewall's ruleset");
});

test("the cases replayed in random orders: every transition is incremental and lands exactly on the target", async () => {
  const want = await wants();
  for (const { seed, order } of replayOrders(cases)) {
    const { world, nft, sync } = setup();
    let prev: Case | undefined;
    for (const c of order) {
      world.now = c.desired;
      const before = nft.applied.length;
      await sync.syncAll(prev === undefined);
      const at = `seed ${seed}: ${prev?.name ?? "(start)"} → ${c.name}`;
      assert.equal(sync.status.lastError, "", at);
      assert.equal(nft.dump(NS), want.get(c.name), at);
      const txs = nft.applied.slice(before);
      if (prev === undefined) assert.ok(txs.length === 1 && isReplace(txs[0].tx), `${at}: the start replaces the table`);
      else if (prev === c) assert.equal(txs.length, 0, `${at}: nothing changed, nothing applied`);
      else assert.ok(txs.length === 1 && !isReplace(txs[0].tx), `${at}: by element and chain, not a new table`);
      prev = c;
    }
  }
});

/** Two open connections to 10.0.1.4: one to :80, whose rule cases[1] removes, and one to :8000, which it keeps. */
const gone = { proto: "tcp", src: "198.51.100.7", dst: "10.0.1.4", sport: 40000, dport: 80 };
const kept = { proto: "tcp", src: "198.51.100.7", dst: "10.0.1.4", sport: 40001, dport: 8000 };

/** A daemon that applied cases[0], with both connections in the namespace's conntrack table. */
async function withOpenFlows() {
  const s = setup();
  s.world.now = cases[0].desired;
  await s.sync.syncAll(true);
  s.nft.conntrack.set(NS, [gone, kept]);
  return s;
}

test("a flow the new policy no longer allows loses its conntrack entry; one still allowed keeps it", async () => {
  const { world, nft, sync } = await withOpenFlows();
  world.now = cases[1].desired; // the :80 rule goes
  await sync.syncAll();
  assert.deepEqual(await nft.conntrackList(NS), [kept]);
});

test("a rule removed while the daemon was down: the restarted daemon's first pass cuts the flows it allowed, and keeps the rest", async () => {
  const { world, nft } = await withOpenFlows();
  // The daemon stops; the :80 rule goes meanwhile (another host's firewall serves the API); a new process starts.
  world.now = cases[1].desired;
  const restarted = new FirewallSync(nft, world, world.host, HOST, pino({ level: "silent" }), () => true);
  await restarted.syncAll(true);
  assert.deepEqual(await nft.conntrackList(NS), [kept], "the open :80 connection does not outlive its rule");
  // A VPC namespace this host never had a table in (its first NIC here): no table to inherit, nothing read.
  const fresh = setup();
  fresh.world.now = cases[1].desired;
  fresh.nft.conntrack.set(NS, [gone]);
  let reads = 0;
  const clear = fresh.nft.conntrackClear.bind(fresh.nft);
  fresh.nft.conntrackClear = (ns, pick) => (reads++, clear(ns, pick));
  await fresh.sync.syncAll(true);
  assert.equal(reads, 0, "a first table in a namespace reads no conntrack table");
});

test("a refused transaction is reported, and the next pass replaces the table whole", async () => {
  const { world, nft, sync } = setup();
  world.now = cases[0].desired;
  await sync.syncAll(true);
  const real = nft.apply.bind(nft);
  nft.apply = async () => {
    throw new Error("Error: Could not process rule: No buffer space available");
  };
  world.now = cases[1].desired;
  // The change's event (its generation), as the loop hears it.
  sync.noteEvent({ kind: "fw.sg.updated", vpc: VPC, gen: "41" });
  await sync.syncAll(false, false, new Set([VPC]));
  assert.match(sync.status.lastError, /^vpc-111111111111: Error: Could not process rule: No buffer space available$/);
  assert.equal(sync.applied.has(NS), false, "forgotten: the next pass starts from scratch");
  assert.deepEqual(sync.generations(), { desired: 41, applied: 0 }, "the change is heard, not applied: the status shows the lag");
  await sync.syncAll();
  assert.deepEqual(sync.generations(), { desired: 41, applied: 0 }, "still failing: still behind");
  nft.apply = real;
  const before = nft.applied.length;
  await sync.syncAll();
  assert.deepEqual(sync.generations(), { desired: 41, applied: 41 }, "applied: caught up");
  assert.equal(sync.status.lastError, "");
  assert.ok(isReplace(nft.applied[before].tx));
  assert.equal(nft.dump(NS), (await wants()).get(cases[1].name));
});

test("a table removed behind the daemon's back is found by the drift check and put back whole", async () => {
  const { world, nft, sync } = setup();
  world.now = cases[2].desired;
  await sync.syncAll(true);
  const want = nft.dump(NS);
  await nft.apply(NS, removeTx());
  await sync.syncAll(false, false);
  assert.equal(nft.dump(NS), "", "without the drift check a pass with nothing new applies nothing");
  await sync.syncAll(false, true);
  assert.equal(nft.dump(NS), want);
});

// ---- the delta path: a NIC's change applied as elements and chains of that NIC alone ----

const SUBNET = { a: "subnet-aaaaaaaaaaaa", b: "subnet-bbbbbbbbbbbb" } as const;

/**
 * A world that changes one NIC at a time, served as the real sources serve
 * it: the netagent's NIC records one by one (nicRecord), and loadVpcState
 * reading only the NICs it is given and the members a delta names (as
 * LOAD_VPC does). Members of a group: its local NICs' addresses and the
 * remote ones.
 */
class NicWorld implements StateSource {
  base = fw(0);
  records = new Map<string, BindingRec>();
  bindings = new Map<string, string[]>();
  remote = new Map<string, string[]>([[WEB, ["10.0.3.9"]]]);
  loads = 0;

  host = {
    load: async (): Promise<HostDesired> => {
      this.loads++;
      return {
        vpcs: new Map([[VPC, { vpcId: VPC, ns: NS, createdMs: 0 }]]),
        subnets: new Map(this.base.subnets.map((s) => [s.subnetId, { subnetId: s.subnetId, vpcId: VPC, cidr: s.cidr, gatewayCidr: "", mtu: 1500 }])),
        nics: new Map([...this.records.values()].map((n) => [n.nicId, this.spec(n)])) as unknown as HostDesired["nics"],
      };
    },
    nicRecord: async (nicId: string) => {
      const n = this.records.get(nicId);
      return n ? { nic: this.spec(n) as unknown as NicSpec } : ("absent" as const);
    },
  };

  spec(n: BindingRec) {
    const gateway = n.subnetId === SUBNET.a ? "10.0.1.1" : "10.0.2.1";
    return { ...n, owner: "", kind: "veth", prefix: 24, gateway, mtu: 1500, hostname: "", guestIf: "" };
  }

  members(g: string): string[] {
    const local = [...this.records.values()].filter((n) => this.bindings.get(n.nicId)?.includes(g)).map((n) => n.address);
    return [...new Set([...local, ...(this.remote.get(g) ?? [])])].sort();
  }

  async bindingsOf(nicIds: string[]): Promise<Map<string, BindingRec>> {
    return new Map(nicIds.filter((id) => this.bindings.has(id)).map((id) => [id, { ...this.records.get(id)!, groupIds: this.bindings.get(id)! }]));
  }

  async loadVpcState(
    _host: string,
    vpcId: string,
    subnets: VpcFirewallState["subnets"],
    nics: BindingRec[],
    delta?: { held: string[]; touched: string[] },
  ): Promise<VpcFirewallState> {
    const out = nics.map((n) => ({ ...n, groupIds: this.bindings.get(n.nicId) ?? [] }));
    const used = new Set(out.flatMap((n) => n.groupIds));
    const groups = new Map<string, SecurityGroupRec>();
    const peers = new Set<string>();
    for (const g of used) {
      const rec = this.base.groups.get(g);
      if (!rec) continue;
      groups.set(g, rec);
      for (const r of rec.rules) if (r.group) peers.add(r.group);
    }
    for (const p of delta?.held ?? []) if (used.has(p) || delta!.touched.includes(p)) peers.add(p);
    for (const p of peers) if (this.base.groups.has(p)) groups.set(p, this.base.groups.get(p)!);
    return { vpcId, subnets, nics: out, groups, members: new Map([...peers].map((p) => [p, this.members(p)])), acls: this.base.acls };
  }
}

/** A model as comparable data (sets and chains sorted by name). */
const modelData = (m: FwModel) => ({
  skeleton: m.skeleton,
  sets: [...m.sets].sort(([a], [b]) => (a < b ? -1 : 1)),
  chains: [...m.chains].sort(([a], [b]) => (a < b ? -1 : 1)),
});

/** What a whole pass over the world makes of it: the ruleset and the model. */
async function fromScratch(world: NicWorld) {
  const nft = new FakeNft();
  const sync = new FirewallSync(nft, world, { load: world.host.load }, HOST, pino({ level: "silent" }), () => true);
  await sync.syncAll(true);
  return { dump: nft.dump(NS), model: sync.applied.get(NS)!.model };
}

/** Flows the policy `st` allows between its NICs and a few peers (what the kernel's conntrack table could hold). */
function allowedFlows(st: VpcFirewallState): CtEntry[] {
  const peers = ["10.0.3.9", "10.0.3.21", "198.51.100.7", ...st.nics.map((n) => n.address)];
  const out: CtEntry[] = [];
  for (const n of st.nics) {
    for (const p of peers) {
      if (p === n.address) continue;
      for (const [proto, dport] of [
        ["tcp", 80],
        ["tcp", 22],
        ["icmp", 8],
      ] as const) {
        for (const [src, dst] of [
          [n.address, p],
          [p, n.address],
        ]) {
          if (flowAllowed(st, src, dst, proto, dport)) out.push({ proto, src, dst, sport: 40000 + out.length, dport });
        }
      }
    }
  }
  return out;
}

const sortFlows = (xs: CtEntry[]) => xs.map((e) => `${e.proto} ${e.src}:${e.sport} > ${e.dst}:${e.dport}`).sort();

test("NIC changes are deltas: only the changed NIC is read, one transaction of its elements and chains, landing exactly where a whole pass lands", async () => {
  for (let seed = 1; seed <= 12; seed++) {
    const rnd = mulberry(seed);
    const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)];
    const world = new NicWorld();
    const nft = new FakeNft();
    const sync = new FirewallSync(nft, world, world.host, HOST, pino({ level: "silent" }), () => true);
    await sync.syncAll(true);
    for (let step = 0; step < 30; step++) {
      const n = 1 + Math.floor(rnd() * 8);
      const id = `nic-00000000000${n}`;
      const rec = world.records.get(id);
      const op = pick(["attach", "bind", "bind", "unbind", "detach", "remote"] as const);
      let event: Record<string, string>;
      if (op === "remote") {
        const g = pick([WEB, OPS, DB]);
        const addrs = world.remote.get(g) ?? [];
        const addr = `10.0.3.${20 + n}`;
        world.remote.set(g, addrs.includes(addr) ? addrs.filter((a) => a !== addr) : [...addrs, addr]);
        event = { kind: "fw.binding.changed", vpc: VPC, nic: "nic-0000000000ff", host: "hv2", groups: g };
      } else if (op === "attach" || (op === "bind" && !rec)) {
        if (rec) continue;
        const sub = n % 2 ? SUBNET.a : SUBNET.b;
        world.records.set(id, nic(n, sub, `10.0.${sub === SUBNET.a ? 1 : 2}.${10 + n}`, []));
        event = { kind: "nic.attached", vpc: VPC, nic: id, host: HOST };
      } else if (op === "bind") {
        const prev = world.bindings.get(id) ?? [];
        const groups = [WEB, DB, OPS].filter(() => rnd() < 0.4);
        world.bindings.set(id, groups);
        event = { kind: "fw.binding.changed", vpc: VPC, nic: id, host: HOST, groups: groups.join(","), prev_groups: prev.join(",") };
      } else if (op === "unbind") {
        const prev = world.bindings.get(id);
        if (!prev) continue;
        world.bindings.delete(id);
        event = { kind: "fw.binding.removed", vpc: VPC, nic: id, host: HOST, groups: prev.join(",") };
      } else {
        if (!rec) continue;
        world.records.delete(id);
        event = { kind: "nic.detached", vpc: VPC, nic: id, host: HOST };
      }
      const at = `seed ${seed} step ${step}: ${op} ${id}`;
      const flows = allowedFlows(sync.applied.get(NS)!.state);
      nft.conntrack.set(NS, flows);
      const before = nft.applied.length;
      const loads = world.loads;
      sync.noteEvent(event);
      await sync.syncAll(false, false, new Set([VPC]));
      assert.equal(sync.status.lastError, "", at);
      // Conntrack: every flow of a local NIC the new policy refuses is gone, every one it allows is kept
      // (a detached NIC's own flows are the netagent's to clear).
      const st1 = sync.applied.get(NS)!.state;
      const local = new Set(st1.nics.map((x) => x.address));
      const keep = flows.filter((e) => (!local.has(e.src) && !local.has(e.dst)) || flowAllowed(st1, e.src, e.dst, e.proto, e.dport));
      assert.deepEqual(sortFlows(await nft.conntrackList(NS)), sortFlows(keep), `${at}: conntrack`);
      assert.equal(world.loads, loads, `${at}: the host's NICs are not read`);
      const want = await fromScratch(world);
      assert.equal(nft.dump(NS), want.dump, at);
      assert.deepEqual(modelData(sync.applied.get(NS)!.model), modelData(want.model), `${at}: the patched model is the whole compile's`);
      const txs = nft.applied.slice(before);
      assert.ok(txs.length <= 1 && txs.every((t) => !isReplace(t.tx)), `${at}: one transaction, no new table`);
    }
  }
});

test("a conntrack clear left by a revoke does not hold up the next binding: it runs beside the loop, against the policy applied by then", async () => {
  const world = new NicWorld();
  const [a, b] = ["nic-000000000001", "nic-000000000002"];
  world.records.set(a, nic(1, SUBNET.a, "10.0.1.11", []));
  world.bindings.set(a, [WEB]);
  const nft = new FakeNft();
  const sync = new FirewallSync(nft, world, world.host, HOST, pino({ level: "silent" }), () => true);
  let release = () => {};
  const held = new Promise<void>((r) => (release = r));
  const lists: string[] = [];
  const clear = nft.conntrackClear.bind(nft);
  const list = nft.conntrackList.bind(nft);
  nft.conntrackClear = async (ns, pick) => {
    lists.push(ns);
    await held;
    return clear(ns, pick);
  };
  const done = sync.run(60_000);
  try {
    await sync.enforce(VPC, 5_000);
    // Unbinding a takes access away: a clear is queued, and blocks in `conntrack -L`.
    world.bindings.delete(a);
    await sync.enforce(VPC, 5_000, { nicId: a });
    await new Promise((r) => setTimeout(r, 20));
    assert.deepEqual(lists, [NS], "the unbind left one clear, now running");
    // b attached and bound meanwhile: enforced while the clear still waits on the kernel.
    world.records.set(b, nic(2, SUBNET.b, "10.0.2.12", []));
    world.bindings.set(b, [DB]);
    await sync.enforce(VPC, 2_000, { nicId: b });
    assert.match(nft.dump(NS), /chain nic_000000000002_in \{/);
    // a flow a no longer may have (its ingress is closed now), and one that b's group allows
    nft.conntrack.set(NS, [
      { proto: "tcp", src: "10.0.3.9", dst: "10.0.1.11", sport: 40000, dport: 80 },
      { proto: "tcp", src: "10.0.1.11", dst: "198.51.100.7", sport: 40001, dport: 443 },
    ]);
    release();
    await sync.clearLater([]);
    await new Promise((r) => setTimeout(r, 20));
    assert.deepEqual(await list(NS), [{ proto: "tcp", src: "10.0.1.11", dst: "198.51.100.7", sport: 40001, dport: 443 }]);
  } finally {
    release();
    sync.stop();
    await done;
  }
});

test("a delta on a stale base (the kernel's table changed behind the daemon) falls back to a whole replace; no NIC is left open", async () => {
  const world = new NicWorld();
  world.records.set("nic-000000000001", nic(1, SUBNET.a, "10.0.1.11", []));
  world.bindings.set("nic-000000000001", [WEB]);
  const nft = new FakeNft();
  const sync = new FirewallSync(nft, world, world.host, HOST, pino({ level: "silent" }), () => true);
  await sync.syncAll(true);

  // A stale chain the NIC about to come will use (that of NICs without groups), accepting everything: the delta flushes it before filling it.
  const stale = `${sharedChainName("")}_in`;
  await nft.apply(NS, new NftTransactionOf().add({ kind: "chain", family: "inet", table: "microvpc", name: stale }));
  await nft.apply(NS, new NftTransactionOf().add({ kind: "rule", family: "inet", table: "microvpc", chain: stale, rule: "accept" }));
  world.records.set("nic-000000000002", nic(2, SUBNET.b, "10.0.2.12", []));
  sync.noteEvent({ kind: "nic.attached", vpc: VPC, nic: "nic-000000000002", host: HOST });
  await sync.syncAll(false, false, new Set([VPC]));
  assert.equal(nft.dump(NS), (await fromScratch(world)).dump);
  assert.doesNotMatch(nft.dump(NS), new RegExp(`chain ${stale} \\{\\n\\s*accept`));

  // The table gone: the delta's transaction is refused, and the same pass replaces the table whole.
  await nft.apply(NS, removeTx());
  world.bindings.set("nic-000000000002", [DB]);
  const before = nft.applied.length;
  sync.noteEvent({ kind: "fw.binding.changed", vpc: VPC, nic: "nic-000000000002", host: HOST, groups: DB });
  await sync.syncAll(false, false, new Set([VPC]));
  assert.equal(sync.status.lastError, "");
  assert.equal(nft.dump(NS), (await fromScratch(world)).dump);
  assert.ok(
    nft.applied.slice(before).some((t) => isReplace(t.tx)),
    "replaced whole",
  );

  // A group that changed since it was applied: not a delta (the whole VPC is compiled).
  const web = world.base.groups.get(WEB)!;
  world.base.groups.set(WEB, { ...web, generation: 2, rules: web.rules.slice(2) });
  world.bindings.set("nic-000000000002", [WEB]);
  const loads = world.loads;
  sync.noteEvent({ kind: "fw.binding.changed", vpc: VPC, nic: "nic-000000000002", host: HOST, groups: WEB, prev_groups: DB });
  await sync.syncAll(false, false, new Set([VPC]));
  assert.equal(world.loads, loads + 1, "compiled whole");
  assert.equal(nft.dump(NS), (await fromScratch(world)).dump);
});

function mulberry(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

test("a NIC attached and bound at once costs one delta; one attached and never bound is passed over after ATTACH_PASS_DELAY_MS", async () => {
  const world = new NicWorld();
  const nft = new FakeNft();
  const sync = new FirewallSync(nft, world, world.host, HOST, pino({ level: "silent" }), () => true);
  await sync.syncAll(true);
  const loop = sync.run(60_000);
  const settle = () => new Promise((r) => setTimeout(r, ATTACH_PASS_DELAY_MS + 100));
  try {
    await settle(); // the loop's own first pass
    // CreateVm's order: the NIC attached (its event), then bound, BindNic waiting for enforcement.
    const a = "nic-000000000001";
    let before = nft.applied.length;
    world.records.set(a, nic(1, SUBNET.a, "10.0.1.11", []));
    sync.onEvents([{ kind: "nic.attached", vpc: VPC, nic: a, host: HOST }]);
    // BindNic's lookups and script take a few milliseconds.
    await new Promise((r) => setTimeout(r, 20));
    world.bindings.set(a, [WEB]);
    await sync.enforce(VPC, 5000, { nicId: a });
    assert.equal(nft.dump(NS), (await fromScratch(world)).dump, "enforced: the NIC with its group");
    await settle();
    assert.equal(nft.applied.length - before, 1, "one transaction for the attach and the bind together");
    assert.equal(nft.dump(NS), (await fromScratch(world)).dump, "and nothing changed after it");

    // Attached and left unbound (AttachNic alone): its port is closed until its pass, which comes after the delay.
    const b = "nic-000000000002";
    before = nft.applied.length;
    world.records.set(b, nic(2, SUBNET.b, "10.0.2.12", []));
    sync.onEvents([{ kind: "nic.attached", vpc: VPC, nic: b, host: HOST }]);
    await new Promise((r) => setTimeout(r, 10));
    assert.doesNotMatch(nft.dump(NS), /"veth2h"|10\.0\.2\.12/, "not applied yet: the port sends nothing, nothing reaches it");
    await settle();
    assert.equal(nft.applied.length - before, 1, "then one transaction");
    assert.equal(nft.dump(NS), (await fromScratch(world)).dump, "the unbound NIC as a whole pass has it");
    assert.match(nft.dump(NS), /10\.0\.2\.12/);
  } finally {
    sync.stop();
    await loop;
  }
});

const leavingGauge = async () => (await metricsRegistry.getSingleMetric("microvpc_firewall_leaving_nics")!.get()).values[0]?.value;

test("UnbindNic with detaching takes a NIC still attached out of the tables in one delta of deletions; passes keep it out until its record goes or it is bound again", async () => {
  const world = new NicWorld();
  const nft = new FakeNft();
  const sync = new FirewallSync(nft, world, world.host, HOST, pino({ level: "silent" }), () => true);
  const a = "nic-000000000001";
  const b = "nic-000000000002";
  world.records.set(a, nic(1, SUBNET.a, "10.0.1.11", []));
  world.records.set(b, nic(2, SUBNET.a, "10.0.1.12", []));
  world.bindings.set(a, [WEB]);
  world.bindings.set(b, [WEB]);
  await sync.syncAll(true);
  const loop = sync.run(60_000);
  const settle = () => new Promise((r) => setTimeout(r, ATTACH_PASS_DELAY_MS + 100));
  /** The world as a whole pass sees it with `id` detached already. */
  const detached = async (id: string) => {
    const rec = world.records.get(id)!;
    world.records.delete(id);
    const want = await fromScratch(world);
    world.records.set(id, rec);
    return want.dump;
  };
  try {
    await settle();
    // A plain UnbindNic keeps the attached NIC as one without groups: its address stays in the tables.
    world.bindings.delete(b);
    await sync.enforce(VPC, 5000, { nicId: b });
    assert.match(nft.dump(NS), /10\.0\.1\.12/, "a plain unbind: attached without groups");
    assert.equal(nft.dump(NS), (await fromScratch(world)).dump);

    // DeleteVm's: the binding removed with `detaching`, the NIC's record still there (DetachNic runs beside it).
    world.bindings.delete(a);
    const before = nft.applied.length;
    const reads: string[] = [];
    const { nicRecord } = world.host;
    const loadVpcState = world.loadVpcState.bind(world);
    world.host.nicRecord = (id) => (reads.push(`record ${id}`), nicRecord(id));
    world.loadVpcState = (...args) => (reads.push("vpc state"), loadVpcState(...args));
    await sync.enforce(VPC, 5000, { nicId: a, leaving: true });
    assert.deepEqual(reads, [], "nothing read: neither the NIC's record nor, its groups being no peer here, the VPC's state");
    assert.equal(await leavingGauge(), 1, "microvpc_firewall_leaving_nics counts it");
    assert.doesNotMatch(nft.dump(NS), /10\.0\.1\.11|"veth1h"/, "enforced: nothing of the NIC is left (its port sends nothing, nothing reaches it)");
    assert.equal(nft.dump(NS), await detached(a), "exactly where the tables are once it is detached");
    const txs = nft.applied.slice(before);
    assert.equal(txs.length, 1, "one transaction");
    assert.doesNotMatch(render(txs[0].tx), /^add element/m, "of deletions only: nothing re-added as an unbound NIC");

    // Neither a whole pass nor the drift check puts it back while it is still attached.
    await sync.syncAll(true);
    assert.equal(nft.dump(NS), await detached(a), "a table replace leaves it out");
    sync.noteEvent({ kind: "fw.binding.removed", vpc: VPC, nic: a, host: HOST, groups: WEB });
    await sync.syncAll(false, false, new Set([VPC]));
    assert.equal(nft.dump(NS), await detached(a), "its own late event's delta too");

    // Bound again (a BindNic before the detach came): back in, with its group. Its own
    // event comes first and its pass runs while the NIC is still marked: the BindNic
    // must not take that pass's answer (its generation) for its own.
    world.bindings.set(a, [WEB]);
    sync.onEvents([{ kind: "fw.binding.changed", vpc: VPC, nic: a, host: HOST, groups: WEB, gen: "7" }]);
    await new Promise((r) => setTimeout(r, 50));
    await sync.enforce(VPC, 5000, { nicId: a, gen: "7" });
    assert.match(nft.dump(NS), /10\.0\.1\.11/, "bound again: back in the tables when BindNic returns");
    assert.equal(nft.dump(NS), (await fromScratch(world)).dump);

    // Unbound with detaching, then detached: the mark goes with the record, and a NIC of that id attached later is an ordinary one.
    world.bindings.delete(a);
    await sync.enforce(VPC, 5000, { nicId: a, leaving: true });
    assert.equal(await leavingGauge(), 1);
    world.records.delete(a);
    sync.onEvents([{ kind: "nic.detached", vpc: VPC, nic: a, host: HOST }]);
    await settle();
    assert.equal(await leavingGauge(), 0, "detached: no longer leaving");
    assert.equal(nft.dump(NS), (await fromScratch(world)).dump);
    world.records.set(a, nic(1, SUBNET.a, "10.0.1.11", []));
    sync.onEvents([{ kind: "nic.attached", vpc: VPC, nic: a, host: HOST }]);
    await settle();
    assert.match(nft.dump(NS), /10\.0\.1\.11/, "attached again: in the tables as an unbound NIC");
    assert.equal(nft.dump(NS), (await fromScratch(world)).dump);
  } finally {
    sync.stop();
    await loop;
  }
});
