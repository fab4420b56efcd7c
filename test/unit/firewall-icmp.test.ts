// ICMP codes reach the nft script: "icmp:3/4" (destination unreachable,
// fragmentation needed) allows that one code, "icmp:3" every code of type 3 —
// for CIDR peers, group peers and network ACL entries. Before, the compiler
// dropped the code and "icmp:3/4" opened all of type 3.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { describe, test } from "vitest";
import { compile } from "../../services/firewall/compile.js";
import type { AclEntry, BindingRec, SecurityGroupRec, SgRule, VpcFirewallState } from "../../services/firewall/model.js";
import { parseRuleText } from "../../services/firewall/rules.js";

const VPC = "vpc-111111111111";
const SG = "sg-00000000000a";
const PEER = "sg-00000000000b";

const nic = (n: number, address: string, groupIds: string[]): BindingRec => ({
  nicId: `nic-00000000000${n}`,
  vpcId: VPC,
  subnetId: "subnet-aaaaaaaaaaaa",
  address,
  mac: `02:00:0a:00:01:0${n}`,
  hostId: "hv1",
  hostIf: `v00000000000${n}`,
  groupIds,
  boundMs: 0,
  updatedMs: 0,
});

function rule(text: string, dir: "ingress" | "egress" = "ingress"): SgRule {
  const r = parseRuleText(dir, text).rule;
  if (r.groupName) throw new Error("test rules name groups by id");
  return r;
}

function state(rules: SgRule[], acl: AclEntry[] = []): VpcFirewallState {
  const group = (id: string, rs: SgRule[]): SecurityGroupRec => ({
    id,
    vpcId: VPC,
    name: id,
    description: "",
    labels: [],
    rules: rs,
    generation: 1,
    createdMs: 0,
    updatedMs: 0,
  });
  return {
    vpcId: VPC,
    subnets: [{ subnetId: "subnet-aaaaaaaaaaaa", cidr: "10.0.1.0/24", bridge: "br-aaaaaaaaaaaa" }],
    nics: [nic(1, "10.0.1.4", [SG]), nic(2, "10.0.1.5", [PEER])],
    groups: new Map([
      [SG, group(SG, rules)],
      [PEER, group(PEER, [])],
    ]),
    members: new Map([[PEER, ["10.0.1.5"]]]),
    acls: acl.length
      ? new Map([
          [
            "subnet-aaaaaaaaaaaa",
            {
              id: "acl-000000000001",
              vpcId: VPC,
              name: "a",
              description: "",
              labels: [],
              subnetIds: ["subnet-aaaaaaaaaaaa"],
              generation: 1,
              createdMs: 0,
              updatedMs: 0,
              entries: acl,
            },
          ],
        ])
      : new Map(),
  };
}

const elements = (st: VpcFirewallState, set: string) => compile(st).model.sets.get(`inet ${set}`)?.elements ?? [];

describe("ICMP type and code", () => {
  test("the parser keeps the code: icmp:3/4 is type 3 code 4, icmp:3 has no code", () => {
    assert.deepEqual([rule("icmp:3/4:0.0.0.0/0").icmpType, rule("icmp:3/4:0.0.0.0/0").icmpCode], [3, 4]);
    assert.deepEqual([rule("icmp:3:0.0.0.0/0").icmpType, rule("icmp:3:0.0.0.0/0").icmpCode], [3, undefined]);
  });

  test("icmp:3/4 compiles to type 3 code 4 only; icmp:3 to every code of type 3", () => {
    const st = state([rule("icmp:3/4:10.0.0.0/8"), rule("icmp:3:192.0.2.0/24"), rule("icmp:8/0:0.0.0.0/0", "egress")]);
    assert.deepEqual(elements(st, "sg_00000000000a_in_icmp"), ["10.0.0.0/8 . 3 . 4", "192.0.2.0/24 . 3 . 0-255"]);
    assert.deepEqual(elements(st, "sg_00000000000a_out_icmp"), ["0.0.0.0/0 . 8 . 0"]);
    assert.deepEqual(elements(st, "sg_00000000000a_in_icmpany"), [], "a typed rule is not 'any ICMP'");
    assert.match(compile(st).script, /meta l4proto icmp ip saddr \. icmp type \. icmp code @sg_00000000000a_in_icmp accept/);
  });

  test("a group peer's icmp:3/4 is type 3 code 4 only, not every ICMP from the members", () => {
    const st = state([{ ...rule("icmp:3/4:0.0.0.0/0"), cidr: undefined, group: PEER }]);
    assert.deepEqual(elements(st, "sg_00000000000a_in_g_00000000000b_icmp"), ["3 . 4"]);
    const script = compile(st).script;
    assert.match(script, /ip saddr @members_00000000000b icmp type \. icmp code @sg_00000000000a_in_g_00000000000b_icmp accept/);
    assert.doesNotMatch(script, /meta l4proto icmp ip saddr @members_00000000000b accept/, "no rule accepting every ICMP from the members");
    const any = compile(state([{ ...rule("icmp:all:0.0.0.0/0"), cidr: undefined, group: PEER }])).script;
    assert.match(any, /meta l4proto icmp ip saddr @members_00000000000b accept/, "icmp:all from a group still allows every ICMP");
  });

  test("a network ACL entry with a code matches that code", () => {
    const e: AclEntry = {
      ruleNumber: 100,
      dir: "ingress",
      action: "allow",
      proto: "icmp",
      portFrom: 0,
      portTo: 0,
      icmpType: 3,
      icmpCode: 4,
      cidr: "0.0.0.0/0",
      description: "",
    };
    assert.match(compile(state([], [e])).script, /ip saddr 0\.0\.0\.0\/0 meta l4proto icmp icmp type 3 icmp code 4 return comment "rule 100"/);
  });

  test("nft accepts the script (in a throwaway network namespace)", () => {
    const probe = spawnSync("unshare", ["-n", "true"]);
    if (probe.status !== 0) return; // not root: the golden test still pins the text
    const st = state([rule("icmp:3/4:10.0.0.0/8"), rule("icmp:3:192.0.2.0/24"), { ...rule("icmp:3/4:0.0.0.0/0"), cidr: undefined, group: PEER }]);
    const r = spawnSync("unshare", ["-n", "nft", "-f", "-"], { input: compile(st).script, encoding: "utf8" });
    assert.equal(r.status, 0, r.stderr);
  });
});
