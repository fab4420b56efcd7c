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
import { render, type NftTransaction } from "../../services/common/nft/tx.js";
import { removeTx } from "../../services/firewall/compile.js";
import type { BindingRec, VpcFirewallState } from "../../services/firewall/model.js";
import { FirewallSync, type StateSource } from "../../services/firewall/sync.js";
import { names } from "../../services/netagent/plan.js";
import type { HostDesired } from "../../services/netagent/store.js";
import { ROOT } from "../lib/daemon.js";
import { assertGolden, replayOrders } from "../lib/state-table.js";
import { fw, WEB } from "../lib/nft-fixtures.js";

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

test("a flow the new policy no longer allows loses its conntrack entry; one still allowed keeps it", async () => {
  const { world, nft, sync } = setup();
  world.now = cases[0].desired;
  await sync.syncAll(true);
  const gone = { proto: "tcp", src: "198.51.100.7", dst: "10.0.1.4", sport: 40000, dport: 80 };
  const kept = { proto: "tcp", src: "198.51.100.7", dst: "10.0.1.4", sport: 40001, dport: 8000 };
  nft.conntrack.set(NS, [gone, kept]);
  world.now = cases[1].desired; // the :80 rule goes
  await sync.syncAll();
  assert.deepEqual(await nft.conntrackList(NS), [kept]);
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
  await sync.syncAll();
  assert.match(sync.status.lastError, /^vpc-111111111111: Error: Could not process rule: No buffer space available$/);
  assert.equal(sync.applied.has(NS), false, "forgotten: the next pass starts from scratch");
  nft.apply = real;
  const before = nft.applied.length;
  await sync.syncAll();
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
