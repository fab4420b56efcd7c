// The nft compiler: golden output, incremental diffs, and the policy
// evaluator that decides which conntrack entries a change must remove.
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "vitest";
import fc from "fast-check";
import { compile, diff, flowAllowed, patchSorted, sharedChainName } from "../../services/firewall/compile.js";
import type { BindingRec, SecurityGroupRec, SgRule, VpcFirewallState } from "../../services/firewall/model.js";
import { ROOT } from "../lib/daemon.js";

const GOLDEN = join(ROOT, "test", "unit", "golden");

const rule = (r: Partial<SgRule>): SgRule => ({ dir: "ingress", proto: "tcp", portFrom: 0, portTo: 0, description: "", ...r });
const group = (id: string, rules: SgRule[]): SecurityGroupRec => ({
  id,
  vpcId: "vpc-111111111111",
  name: id,
  description: "",
  labels: [],
  rules,
  generation: 1,
  createdMs: 0,
  updatedMs: 0,
});
const nic = (n: number, subnet: string, address: string, groupIds: string[]): BindingRec => ({
  nicId: `nic-00000000000${n}`,
  vpcId: "vpc-111111111111",
  subnetId: subnet,
  address,
  mac: `02:00:0a:00:0${n}:04`,
  hostId: "hv1",
  hostIf: `v00000000000${n}`,
  groupIds,
  boundMs: 0,
  updatedMs: 0,
});

const WEB = "sg-00000000000a";
const DB = "sg-00000000000b";

function state(): VpcFirewallState {
  return {
    vpcId: "vpc-111111111111",
    subnets: [
      { subnetId: "subnet-aaaaaaaaaaaa", cidr: "10.0.1.0/24", bridge: "br-aaaaaaaaaaaa" },
      { subnetId: "subnet-bbbbbbbbbbbb", cidr: "10.0.2.0/24", bridge: "br-bbbbbbbbbbbb" },
    ],
    nics: [nic(1, "subnet-aaaaaaaaaaaa", "10.0.1.4", [WEB]), nic(2, "subnet-bbbbbbbbbbbb", "10.0.2.4", [DB]), nic(3, "subnet-bbbbbbbbbbbb", "10.0.2.5", [])],
    groups: new Map([
      [
        WEB,
        group(WEB, [
          rule({ portFrom: 80, portTo: 80, cidr: "0.0.0.0/0" }),
          rule({ portFrom: 443, portTo: 443, cidr: "0.0.0.0/0" }),
          rule({ portFrom: 22, portTo: 22, cidr: "10.0.0.0/16" }),
          rule({ proto: "icmp", icmpType: 8, cidr: "10.0.0.0/16" }),
          rule({ dir: "egress", proto: "all", cidr: "0.0.0.0/0" }),
        ]),
      ],
      [DB, group(DB, [rule({ portFrom: 5432, portTo: 5432, group: WEB }), rule({ dir: "egress", proto: "all", cidr: "0.0.0.0/0" })])],
    ]),
    members: new Map([[WEB, ["10.0.1.4"]]]),
    acls: new Map([
      [
        "subnet-bbbbbbbbbbbb",
        {
          id: "acl-000000000001",
          vpcId: "vpc-111111111111",
          name: "db",
          description: "",
          labels: [],
          subnetIds: ["subnet-bbbbbbbbbbbb"],
          generation: 1,
          createdMs: 0,
          updatedMs: 0,
          entries: [
            { ruleNumber: 200, dir: "ingress", action: "allow", proto: "all", portFrom: 0, portTo: 0, cidr: "0.0.0.0/0", description: "" },
            { ruleNumber: 100, dir: "ingress", action: "deny", proto: "tcp", portFrom: 22, portTo: 22, cidr: "0.0.0.0/0", description: "" },
            { ruleNumber: 100, dir: "egress", action: "allow", proto: "all", portFrom: 0, portTo: 0, cidr: "0.0.0.0/0", description: "" },
          ],
        },
      ],
    ]),
  };
}

test("golden: web and db groups, an ACL, a NIC without groups", () => {
  const { script } = compile(state());
  const file = join(GOLDEN, "firewall-web-db.nft");
  if (process.env.UPDATE_GOLDEN) writeFileSync(file, script);
  assert.equal(script, readFileSync(file, "utf8"), "compiler output changed: review it, then UPDATE_GOLDEN=1");
});

test("anti-spoofing: ARP passes only with the port's own frame source MAC, ARP sender MAC and sender address", () => {
  const { model } = compile(state());
  const rules = model.skeleton
    .slice(model.skeleton.indexOf("table bridge"))
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => /^(ether type|counter name spoofed)/.test(l));
  const arp = rules.filter((r) => r.startsWith("ether type arp"));
  assert.equal(arp.length, 1, "one ARP rule");
  // A VM that sends "<its address> is at <another MAC>" from its own frame
  // source poisons its neighbours unless the ARP sender MAC is checked too.
  assert.ok(arp[0].includes("iifname . ether saddr . arp saddr ip @nic_ok"), "frame source MAC and sender address");
  assert.ok(arp[0].includes("iifname . arp saddr ether . arp saddr ip @nic_ok"), "ARP sender MAC and sender address");
  assert.ok(arp[0].includes("arp htype 1 arp ptype ip arp hlen 6 arp plen 4"), "Ethernet/IPv4 ARP only (fixed offsets)");
  assert.ok(arp[0].endsWith("accept"));
  assert.equal(rules.at(-1), "counter name spoofed drop", "everything else from a VM port is dropped");
  const ok = model.sets.get("bridge nic_ok")!.elements;
  assert.ok(ok.includes('"v000000000001" . 02:00:0a:00:01:04 . 10.0.1.4'), ok.join(", "));
});

test("a rule's port range is one set element, not one per port", () => {
  const st = state();
  st.groups.get(WEB)!.rules.push(rule({ portFrom: 8000, portTo: 9000, cidr: "10.0.0.0/8" }));
  const { model } = compile(st);
  assert.ok(model.sets.get("inet sg_00000000000a_in_ports")!.elements.includes("10.0.0.0/8 . tcp . 8000-9000"));
});

test("membership, rule, NIC and group changes are incremental; the skeleton never changes within a VPC", () => {
  const a = compile(state()).model;
  const st = state();
  st.members.set(WEB, ["10.0.1.4", "10.0.1.9"]);
  assert.equal(diff(a, compile(st).model), "add element inet microvpc members_00000000000a { 10.0.1.9 }\n");
  const st2 = state();
  st2.groups.get(WEB)!.rules.splice(0, 1);
  assert.equal(diff(a, compile(st2).model), "delete element inet microvpc sg_00000000000a_in_ports { 0.0.0.0/0 . tcp . 80 }\n");
  assert.equal(diff(a, compile(state()).model), "", "nothing changed: nothing to apply");
  const st3 = state();
  st3.nics.push(nic(4, "subnet-aaaaaaaaaaaa", "10.0.1.5", [WEB]));
  const d3 = diff(a, compile(st3).model)!;
  assert.ok(d3 !== null, "a new NIC is added elements, not a new table");
  const web = sharedChainName(WEB);
  const none = sharedChainName("");
  assert.deepEqual(
    d3.trim().split("\n").sort(),
    [
      'add element bridge microvpc nic_ok { "v000000000004" . 02:00:0a:00:04:04 . 10.0.1.5 }',
      'add element bridge microvpc nic_ports { "v000000000004" }',
      ...["cnt_in_drop", "cnt_in_new", "cnt_out_drop", "cnt_out_new"].map((s) => `add element inet microvpc ${s} { 10.0.1.5 }`),
      `add element inet microvpc nic_in { 10.0.1.5 : jump ${web}_in }`,
      `add element inet microvpc nic_out { 10.0.1.5 : jump ${web}_out }`,
    ],
    "a NIC joining groups another NIC has: its elements only, into the chains they share (no chain of its own)",
  );
  const st4 = state();
  st4.nics[2].groupIds = [WEB];
  const d4 = diff(a, compile(st4).model)!;
  assert.match(d4, new RegExp(`^delete element inet microvpc nic_in \\{ 10\\.0\\.2\\.5 : jump ${none}_in \\}$`, "m"));
  assert.match(d4, new RegExp(`^add element inet microvpc nic_in \\{ 10\\.0\\.2\\.5 : jump ${web}_in \\}$`, "m"));
  assert.match(d4, new RegExp(`^delete chain inet microvpc ${none}_in$`, "m"), "a NIC's groups changed: it moves to their chains; the chains nobody uses go");
  const st5 = state();
  st5.nics[0].dropLogging = { ratePerSecond: 5, burst: 5 };
  const d5 = diff(a, compile(st5).model)!;
  assert.match(d5, /^add chain inet microvpc nic_000000000001_in$/m, "a NIC whose drops are logged has chains of its own (the prefix names it)");
  assert.match(d5, /^add rule inet microvpc nic_000000000001_in limit rate 5\/second burst 5 packets log prefix "microvpc-drop 000000000001 in "$/m);
});

test("10 000 rules compile to 10 000 elements behind a constant number of rules", () => {
  const st = state();
  const many: SgRule[] = [];
  for (let i = 0; i < 10_000; i++) many.push(rule({ portFrom: 1 + (i % 60000), portTo: 1 + (i % 60000), cidr: `10.${(i >> 8) & 255}.${i & 255}.0/24` }));
  st.groups.set(WEB, group(WEB, many));
  const t0 = performance.now();
  const { model, script } = compile(st);
  const ms = performance.now() - t0;
  assert.equal(model.sets.get("inet sg_00000000000a_in_ports")!.elements.length, 10_000);
  const rules = (m: typeof model) => [...m.chains.values()].flat().length + m.skeleton.split("\n").length;
  assert.equal(rules(model), rules(compile(state()).model), "same number of rules");
  assert.ok(script.length > 100_000);
  assert.ok(ms < 2000, `compile took ${ms} ms`);
});

test("flowAllowed: what a change leaves allowed, for conntrack cleanup", () => {
  const st = state();
  assert.ok(flowAllowed(st, "192.0.2.1", "10.0.1.4", "tcp", 80), "80 from anywhere to web");
  assert.ok(!flowAllowed(st, "192.0.2.1", "10.0.1.4", "tcp", 22), "22 only from the VPC");
  assert.ok(flowAllowed(st, "10.0.2.4", "10.0.1.4", "tcp", 22));
  assert.ok(flowAllowed(st, "10.0.1.4", "10.0.2.4", "tcp", 5432), "web member to db");
  assert.ok(!flowAllowed(st, "10.0.2.5", "10.0.2.4", "tcp", 5432), "non-member to db");
  assert.ok(!flowAllowed(st, "10.0.1.4", "10.0.2.5", "tcp", 80), "no groups: ingress denied");
  st.members.set(WEB, []);
  assert.ok(!flowAllowed(st, "10.0.1.4", "10.0.2.4", "tcp", 5432), "after leaving web");
});

test("patchSorted: a sorted set's elements patched by binary search equal the set rebuilt and sorted", () => {
  const uniq = (xs: string[]) => [...new Set(xs)].sort();
  const elem = fc.oneof(fc.ipV4(), fc.constantFrom("10.0.0.1", "10.0.0.10", "10.0.0.2", '"v0001"', "a", "B"));
  fc.assert(
    fc.property(fc.array(elem, { maxLength: 40 }), fc.array(elem, { maxLength: 8 }), fc.array(elem, { maxLength: 8 }), (xs, gone, added) => {
      const base = uniq(xs);
      const want = uniq([...base.filter((e) => !gone.includes(e)), ...added]);
      assert.deepEqual(patchSorted(base, gone, uniq(added)), want);
      assert.deepEqual(base, uniq(xs), "the base is not changed");
    }),
    { numRuns: 500, seed: 14 },
  );
});
