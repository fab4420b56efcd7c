// Firewall rule parsing and validation: every accepted syntax, and the bad
// inputs with the exact messages a person sees.
import assert from "node:assert/strict";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { describe, test } from "vitest";
import { InvalidArgumentError } from "../../services/common/errors.js";
import {
  AclAction,
  Direction,
  NetworkAclEntrySchema,
  Protocol,
  SecurityGroupRuleSchema,
  type NetworkAclEntry,
  type SecurityGroupRule,
} from "../../gen/microvpc/v1/firewall_pb.js";
import { normalizeRules, parseRuleText, parseVpcctlPolicy, validateAclEntries, validateAclEntry, validateSgRule } from "../../services/firewall/rules.js";

const F = "ingress_rules[0]";

function throwsExactly(fn: () => unknown, message: string) {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof InvalidArgumentError, `expected InvalidArgumentError, got ${e}`);
    assert.equal(e.message, message);
    return true;
  });
}

describe("rule texts", () => {
  test("every syntax parses into the canonical rule", () => {
    const p = (t: string, dir: "ingress" | "egress" = "ingress") => parseRuleText(dir, t, F).rule;
    assert.deepEqual(p("tcp:80:0.0.0.0/0"), { dir: "ingress", proto: "tcp", portFrom: 80, portTo: 80, cidr: "0.0.0.0/0", description: "" });
    assert.deepEqual(p("tcp:8000-8080:10.0.0.0/16"), { dir: "ingress", proto: "tcp", portFrom: 8000, portTo: 8080, cidr: "10.0.0.0/16", description: "" });
    assert.deepEqual(p("udp:53:10.0.0.0/8", "egress"), { dir: "egress", proto: "udp", portFrom: 53, portTo: 53, cidr: "10.0.0.0/8", description: "" });
    assert.deepEqual(p("tcp:all:10.0.0.0/8"), { dir: "ingress", proto: "tcp", portFrom: 0, portTo: 0, cidr: "10.0.0.0/8", description: "" });
    assert.deepEqual(p("tcp:22-22:10.0.0.0/8"), { dir: "ingress", proto: "tcp", portFrom: 22, portTo: 22, cidr: "10.0.0.0/8", description: "" });
    assert.deepEqual(p("icmp:all:0.0.0.0/0"), { dir: "ingress", proto: "icmp", portFrom: 0, portTo: 0, cidr: "0.0.0.0/0", description: "" });
    assert.deepEqual(p("icmp:8:10.0.0.0/8"), { dir: "ingress", proto: "icmp", portFrom: 0, portTo: 0, icmpType: 8, cidr: "10.0.0.0/8", description: "" });
    assert.deepEqual(p("icmp:3/4:10.0.0.0/8"), {
      dir: "ingress",
      proto: "icmp",
      portFrom: 0,
      portTo: 0,
      icmpType: 3,
      icmpCode: 4,
      cidr: "10.0.0.0/8",
      description: "",
    });
    assert.deepEqual(p("icmp:0/0:10.0.0.0/8"), {
      dir: "ingress",
      proto: "icmp",
      portFrom: 0,
      portTo: 0,
      icmpType: 0,
      icmpCode: 0,
      cidr: "10.0.0.0/8",
      description: "",
    });
    assert.deepEqual(p("all:all:0.0.0.0/0", "egress"), { dir: "egress", proto: "all", portFrom: 0, portTo: 0, cidr: "0.0.0.0/0", description: "" });
    assert.deepEqual(p("tcp:1-65535:192.168.1.7/32"), { dir: "ingress", proto: "tcp", portFrom: 1, portTo: 65535, cidr: "192.168.1.7/32", description: "" });
    assert.deepEqual(p("tcp:5432:sg-0123456789ab"), { dir: "ingress", proto: "tcp", portFrom: 5432, portTo: 5432, group: "sg-0123456789ab", description: "" });
    assert.deepEqual(p("tcp:5432:web-sg"), { dir: "ingress", proto: "tcp", portFrom: 5432, portTo: 5432, groupName: "web-sg", description: "" });
  });

  test("a bare address is read as /32, with a warning", () => {
    const r = parseRuleText("ingress", "tcp:22:10.1.2.3", F);
    assert.equal(r.rule.cidr, "10.1.2.3/32");
    assert.deepEqual(r.warnings, [`${F}: "tcp:22:10.1.2.3": the bare address 10.1.2.3 is read as 10.1.2.3/32`]);
  });

  test("bad texts: exact messages", () => {
    const bad: [string, string][] = [
      ["tcp:70000:0.0.0.0/0", `${F}: "tcp:70000:0.0.0.0/0": port 70000 is out of range; use 1–65535 (or all)`],
      ["tcp:0:0.0.0.0/0", `${F}: "tcp:0:0.0.0.0/0": port 0 is out of range; use 1–65535 (or all)`],
      ["tcp:90-80:0.0.0.0/0", `${F}: "tcp:90-80:0.0.0.0/0": range 90-80 is backwards; a range is FROM-TO with FROM ≤ TO (did you mean 80-90?)`],
      ["tcp:8o:0.0.0.0/0", `${F}: "tcp:8o:0.0.0.0/0": ports "8o" are not valid; use all, N or N-M with 1 ≤ N ≤ M ≤ 65535`],
      ["tcp:1-2-3:0.0.0.0/0", `${F}: "tcp:1-2-3:0.0.0.0/0": ports "1-2-3" are not valid; use all, N or N-M with 1 ≤ N ≤ M ≤ 65535`],
      ["tcp::0.0.0.0/0", `${F}: "tcp::0.0.0.0/0": PORTS is empty; use all, N or N-M (or for icmp: all, TYPE or TYPE/CODE)`],
      ["tcp:80:10.0.0.1/8", `${F}: "10.0.0.1/8" has host bits set; did you mean "10.0.0.0/8"?`],
      ["tcp:80:10.0.0.0/33", `${F}: "10.0.0.0/33" has prefix /33; allowed are /0 to /32`],
      ["tcp:80:999.0.0.0/8", `${F}: "999.0.0.0/8" is not an IPv4 CIDR (expected a.b.c.d/n, e.g. "10.0.0.0/16")`],
      ["tcp:80:10.0.0.0/", `${F}: "10.0.0.0/" is not an IPv4 CIDR (expected a.b.c.d/n, e.g. "10.0.0.0/16")`],
      ["tcp:80:10.0.0", `${F}: "10.0.0" is not an IPv4 address in dotted-quad form (e.g. 10.0.1.5)`],
      ["tcp:80:-x", `${F}: "tcp:80:-x": peer "-x" is not a CIDR (a.b.c.d/n), an address, a group id (sg-…) or a group name`],
      ["tcp:80:", `${F}: "tcp:80:": PEER is empty; give a CIDR (a.b.c.d/n), an address, a group id (sg-…) or a group name`],
      ["sctp:80:0.0.0.0/0", `${F}: "sctp:80:0.0.0.0/0": protocol "sctp" is not known; use tcp, udp, icmp or all`],
      ["gre:all:0.0.0.0/0", `${F}: "gre:all:0.0.0.0/0": protocol "gre" is not known; use tcp, udp, icmp or all`],
      ["all:80:0.0.0.0/0", `${F}: "all:80:0.0.0.0/0": protocol all matches every port; write "all:all:PEER"`],
      ["icmp:300:0.0.0.0/0", `${F}: "icmp:300:0.0.0.0/0": ICMP type 300 is out of range; use 0–255`],
      ["icmp:8/999:0.0.0.0/0", `${F}: "icmp:8/999:0.0.0.0/0": ICMP code 999 is out of range; use 0–255`],
      ["icmp:echo:0.0.0.0/0", `${F}: "icmp:echo:0.0.0.0/0": ICMP "echo" is not valid; use all, TYPE or TYPE/CODE with numbers 0–255`],
      [
        "tcp:80",
        `${F}: "tcp:80" has 2 parts; a rule is PROTO:PORTS:PEER, e.g. "tcp:80:0.0.0.0/0", "tcp:8000-8080:10.0.0.0/16", "icmp:8:10.0.0.0/8" or "all:all:0.0.0.0/0"`,
      ],
      [
        "tcp:80:0.0.0.0/0:x",
        `${F}: "tcp:80:0.0.0.0/0:x" has 4 parts; a rule is PROTO:PORTS:PEER, e.g. "tcp:80:0.0.0.0/0", "tcp:8000-8080:10.0.0.0/16", "icmp:8:10.0.0.0/8" or "all:all:0.0.0.0/0"`,
      ],
      ["", `${F}: is empty; a rule is PROTO:PORTS:PEER, e.g. "tcp:80:0.0.0.0/0", "tcp:8000-8080:10.0.0.0/16", "icmp:8:10.0.0.0/8" or "all:all:0.0.0.0/0"`],
      ["TCP:80:0.0.0.0/0", `${F}: "TCP:80:0.0.0.0/0" has capital letters; write it in lowercase: "tcp:80:0.0.0.0/0"`],
      // nft syntax and shell metacharacters never reach a parser, let alone nft.
      [
        "tcp:80:0.0.0.0/0; flush ruleset",
        `${F}: "tcp:80:0.0.0.0/0; flush ruleset" contains ";", " "; a rule text may only use a-z 0-9 . : / - (PROTO:PORTS:PEER, e.g. "tcp:80:0.0.0.0/0")`,
      ],
      [
        "tcp:80:0.0.0.0/0\nflush ruleset",
        `${F}: "tcp:80:0.0.0.0/0\\nflush ruleset" contains "\\n", " "; a rule text may only use a-z 0-9 . : / - (PROTO:PORTS:PEER, e.g. "tcp:80:0.0.0.0/0")`,
      ],
      [
        "tcp:80:$(reboot)",
        `${F}: "tcp:80:$(reboot)" contains "$", "(", ")"; a rule text may only use a-z 0-9 . : / - (PROTO:PORTS:PEER, e.g. "tcp:80:0.0.0.0/0")`,
      ],
      ["tcp:80:web`id`", `${F}: "tcp:80:web\`id\`" contains "\`"; a rule text may only use a-z 0-9 . : / - (PROTO:PORTS:PEER, e.g. "tcp:80:0.0.0.0/0")`],
      [
        "tcp:80:{ 10.0.0.0/8 }",
        `${F}: "tcp:80:{ 10.0.0.0/8 }" contains "{", " ", "}"; a rule text may only use a-z 0-9 . : / - (PROTO:PORTS:PEER, e.g. "tcp:80:0.0.0.0/0")`,
      ],
      [
        "tcp:80:0.0.0.0/0\u0000",
        `${F}: "tcp:80:0.0.0.0/0\\u0000" contains "\\u0000"; a rule text may only use a-z 0-9 . : / - (PROTO:PORTS:PEER, e.g. "tcp:80:0.0.0.0/0")`,
      ],
      ["x".repeat(100_000), `${F}: is 100000 characters long; a rule text is at most 100 (PROTO:PORTS:PEER, e.g. "tcp:80:0.0.0.0/0")`],
    ];
    for (const [text, msg] of bad) throwsExactly(() => parseRuleText("ingress", text, F), msg);
  });

  test("the default field name is 'rule'", () => {
    throwsExactly(() => parseRuleText("egress", "tcp:70000:0.0.0.0/0"), 'rule: "tcp:70000:0.0.0.0/0": port 70000 is out of range; use 1–65535 (or all)');
  });
});

interface RuleInit {
  direction?: Direction;
  protocol?: Protocol;
  portFrom?: number;
  portTo?: number;
  icmpType?: number;
  icmpCode?: number;
  description?: string;
  cidr?: string;
  group?: string;
}

function sgRule(init: RuleInit): SecurityGroupRule {
  const { cidr, group, ...rest } = init;
  return create(SecurityGroupRuleSchema, {
    direction: Direction.INGRESS,
    protocol: Protocol.TCP,
    ...rest,
    peer: group !== undefined ? { case: "securityGroupId", value: group } : cidr !== undefined ? { case: "cidr", value: cidr } : { case: undefined },
  });
}

describe("security group rule messages", () => {
  test("valid rules normalize", () => {
    assert.deepEqual(validateSgRule("rules[0]", sgRule({ portFrom: 80, cidr: "0.0.0.0/0" })), {
      dir: "ingress",
      proto: "tcp",
      portFrom: 80,
      portTo: 80,
      cidr: "0.0.0.0/0",
      description: "",
    });
    assert.deepEqual(validateSgRule("rules[0]", sgRule({ portFrom: 8000, portTo: 8080, cidr: "10.0.0.0/16", description: "app" })), {
      dir: "ingress",
      proto: "tcp",
      portFrom: 8000,
      portTo: 8080,
      cidr: "10.0.0.0/16",
      description: "app",
    });
    assert.deepEqual(validateSgRule("rules[0]", sgRule({ protocol: Protocol.UDP, cidr: "10.0.0.5" })), {
      dir: "ingress",
      proto: "udp",
      portFrom: 0,
      portTo: 0,
      cidr: "10.0.0.5/32",
      description: "",
    });
    assert.deepEqual(
      validateSgRule("rules[0]", sgRule({ direction: Direction.EGRESS, protocol: Protocol.ICMP, icmpType: 8, icmpCode: 0, cidr: "0.0.0.0/0" })),
      {
        dir: "egress",
        proto: "icmp",
        portFrom: 0,
        portTo: 0,
        icmpType: 8,
        icmpCode: 0,
        cidr: "0.0.0.0/0",
        description: "",
      },
    );
    assert.deepEqual(validateSgRule("rules[0]", sgRule({ protocol: Protocol.ALL, group: "sg-00000000000a" })), {
      dir: "ingress",
      proto: "all",
      portFrom: 0,
      portTo: 0,
      group: "sg-00000000000a",
      description: "",
    });
    assert.deepEqual(validateSgRule("rules[0]", sgRule({ portFrom: 5432, group: "web" })), {
      dir: "ingress",
      proto: "tcp",
      portFrom: 5432,
      portTo: 5432,
      groupName: "web",
      description: "",
    });
  });

  test("bad rules: the field and the fix", () => {
    const bad: [SecurityGroupRule, string][] = [
      [sgRule({ portFrom: 90, portTo: 80, cidr: "0.0.0.0/0" }), "rules[2].port_to: 80 is below port_from 90; a range is FROM-TO with FROM ≤ TO"],
      [sgRule({ portFrom: 70000, cidr: "0.0.0.0/0" }), "rules[2].port_from: 70000 is not a port; use 1–65535"],
      [sgRule({ portFrom: 80, portTo: 70000, cidr: "0.0.0.0/0" }), "rules[2].port_to: 70000 is not a port; use 1–65535"],
      [sgRule({ portTo: 80, cidr: "0.0.0.0/0" }), "rules[2].port_from: is 0 while port_to is 80; set port_from too (0 and 0 mean every port)"],
      [
        sgRule({ protocol: Protocol.ICMP, portFrom: 80, cidr: "0.0.0.0/0" }),
        "rules[2].port_from: ports apply to tcp and udp only; leave port_from and port_to 0 for icmp",
      ],
      [
        sgRule({ protocol: Protocol.ALL, portTo: 80, cidr: "0.0.0.0/0" }),
        "rules[2].port_to: ports apply to tcp and udp only; leave port_from and port_to 0 for all",
      ],
      [sgRule({ icmpType: 8, cidr: "0.0.0.0/0" }), "rules[2].icmp_type: applies to icmp only; leave it unset for tcp"],
      [sgRule({ protocol: Protocol.ICMP, icmpType: 256, cidr: "0.0.0.0/0" }), "rules[2].icmp_type: 256 is out of range; use 0–255 (e.g. 8 for echo request)"],
      [
        sgRule({ protocol: Protocol.ICMP, icmpCode: 1, cidr: "0.0.0.0/0" }),
        "rules[2].icmp_code: needs icmp_type; set the type too (e.g. 3 for destination unreachable)",
      ],
      [sgRule({ protocol: Protocol.ICMP, icmpType: 3, icmpCode: 300, cidr: "0.0.0.0/0" }), "rules[2].icmp_code: 300 is out of range; use 0–255"],
      [sgRule({ direction: Direction.UNSPECIFIED, cidr: "0.0.0.0/0" }), "rules[2].direction: is required (DIRECTION_INGRESS or DIRECTION_EGRESS)"],
      [sgRule({ direction: 9 as Direction, cidr: "0.0.0.0/0" }), "rules[2].direction: 9 is not a direction; use DIRECTION_INGRESS or DIRECTION_EGRESS"],
      [
        sgRule({ protocol: Protocol.UNSPECIFIED, cidr: "0.0.0.0/0" }),
        "rules[2].protocol: is required (PROTOCOL_TCP, PROTOCOL_UDP, PROTOCOL_ICMP or PROTOCOL_ALL)",
      ],
      [
        sgRule({ protocol: 47 as Protocol, cidr: "0.0.0.0/0" }),
        "rules[2].protocol: 47 is not a protocol; use PROTOCOL_TCP, PROTOCOL_UDP, PROTOCOL_ICMP or PROTOCOL_ALL",
      ],
      [sgRule({}), 'rules[2]: needs a peer: set cidr (e.g. "0.0.0.0/0") or security_group_id'],
      [sgRule({ cidr: "" }), 'rules[2].cidr: is required (a CIDR such as "10.0.0.0/16")'],
      [sgRule({ cidr: "10.0.0.1/8" }), 'rules[2].cidr: "10.0.0.1/8" has host bits set; did you mean "10.0.0.0/8"?'],
      [sgRule({ cidr: "0.0.0.0/0; flush ruleset" }), 'rules[2].cidr: "0.0.0.0/0; flush ruleset" is not an IPv4 CIDR (expected a.b.c.d/n, e.g. "10.0.0.0/16")'],
      [sgRule({ cidr: "fe80::/10" }), 'rules[2].cidr: "fe80::/10" is not an IPv4 CIDR (expected a.b.c.d/n, e.g. "10.0.0.0/16")'],
      [sgRule({ group: "Web SG" }), 'rules[2].security_group_id: "Web SG" is neither a group id (sg- and 12 hex digits) nor a group name'],
      [sgRule({ group: "" }), "rules[2].security_group_id: is empty; give a group id (sg-…) or a group name of the VPC"],
      [sgRule({ cidr: "0.0.0.0/0", description: "a\nb" }), "rules[2].description: must not contain control characters or newlines"],
      [sgRule({ cidr: "0.0.0.0/0", description: "x".repeat(256) }), "rules[2].description: is 256 characters long; the limit is 255"],
    ];
    for (const [m, msg] of bad) throwsExactly(() => validateSgRule("rules[2]", m), msg);
  });

  test("normalizeRules: ingress then egress, duplicates (but for description) kept once", () => {
    const r = (dir: "ingress" | "egress", port: number, description = "") => ({
      dir,
      proto: "tcp" as const,
      portFrom: port,
      portTo: port,
      cidr: "0.0.0.0/0",
      description,
    });
    const dups: [number, number][] = [];
    const out = normalizeRules([r("egress", 1), r("ingress", 2), r("ingress", 2, "again"), r("ingress", 3)], (i, f) => dups.push([i, f]));
    assert.deepEqual(out, [r("ingress", 2), r("ingress", 3), r("egress", 1)]);
    assert.deepEqual(dups, [[2, 1]]);
  });
});

function aclEntry(init: MessageInitShape<typeof NetworkAclEntrySchema>): NetworkAclEntry {
  return create(NetworkAclEntrySchema, {
    ruleNumber: 100,
    direction: Direction.INGRESS,
    action: AclAction.ALLOW,
    protocol: Protocol.TCP,
    cidr: "0.0.0.0/0",
    ...init,
  });
}

describe("network ACL entries", () => {
  test("valid entries", () => {
    assert.deepEqual(validateAclEntry("entries[0]", aclEntry({ portFrom: 1024, portTo: 65535 })), {
      ruleNumber: 100,
      dir: "ingress",
      action: "allow",
      proto: "tcp",
      portFrom: 1024,
      portTo: 65535,
      cidr: "0.0.0.0/0",
      description: "",
    });
    assert.deepEqual(
      validateAclEntry(
        "entries[0]",
        aclEntry({ ruleNumber: 32766, direction: Direction.EGRESS, action: AclAction.DENY, protocol: Protocol.ALL, cidr: "10.9.0.0/16" }),
      ),
      {
        ruleNumber: 32766,
        dir: "egress",
        action: "deny",
        proto: "all",
        portFrom: 0,
        portTo: 0,
        cidr: "10.9.0.0/16",
        description: "",
      },
    );
  });

  test("bad entries", () => {
    const bad: [NetworkAclEntry, string][] = [
      [aclEntry({ ruleNumber: 0 }), "entries[1].rule_number: is required (1–32766)"],
      [aclEntry({ ruleNumber: 32767 }), "entries[1].rule_number: 32767 is out of range; use 1–32766"],
      [aclEntry({ action: AclAction.UNSPECIFIED }), "entries[1].action: is required (ACL_ACTION_ALLOW or ACL_ACTION_DENY)"],
      [aclEntry({ cidr: "" }), 'entries[1].cidr: is required (a CIDR such as "10.0.0.0/16"; "0.0.0.0/0" for any)'],
      [aclEntry({ cidr: "10.0.0.0/8 accept" }), 'entries[1].cidr: "10.0.0.0/8 accept" is not an IPv4 CIDR (expected a.b.c.d/n, e.g. "10.0.0.0/16")'],
      [aclEntry({ portFrom: 90, portTo: 80 }), "entries[1].port_to: 80 is below port_from 90; a range is FROM-TO with FROM ≤ TO"],
      [aclEntry({ protocol: Protocol.UNSPECIFIED }), "entries[1].protocol: is required (PROTOCOL_TCP, PROTOCOL_UDP, PROTOCOL_ICMP or PROTOCOL_ALL)"],
    ];
    for (const [m, msg] of bad) throwsExactly(() => validateAclEntry("entries[1]", m), msg);
  });

  test("lists: unique numbers per direction, sorted, at most 1000", () => {
    const out = validateAclEntries("entries", [
      aclEntry({ ruleNumber: 200, direction: Direction.EGRESS }),
      aclEntry({ ruleNumber: 200 }),
      aclEntry({ ruleNumber: 100 }),
    ]);
    assert.deepEqual(
      out.map((e) => `${e.dir}/${e.ruleNumber}`),
      ["ingress/100", "ingress/200", "egress/200"],
    );
    throwsExactly(
      () =>
        validateAclEntries("entries", [aclEntry({ ruleNumber: 100 }), aclEntry({ ruleNumber: 110 }), aclEntry({ ruleNumber: 100, action: AclAction.DENY })]),
      "entries[2].rule_number: 100 is already used by entries[0] for ingress; rule numbers are unique per direction",
    );
    const many = Array.from({ length: 1001 }, (_, i) => aclEntry({ ruleNumber: i + 1 }));
    throwsExactly(() => validateAclEntries("entries", many), "entries: has 1001 entries; an ACL holds at most 1000");
  });
});

describe("vpcctl policy documents", () => {
  const doc = {
    subnet: "10.10.1.0/24",
    ingress: [
      { port: 80, protocol: "tcp", action: "allow" },
      { port: 443, protocol: "tcp", action: "allow" },
      { port: 22, protocol: "tcp", action: "deny" },
    ],
    egress: [
      { port: 25, protocol: "tcp", action: "deny" },
      { port: "8000-8080", protocol: "tcp", action: "allow", cidr: "10.0.0.0/8" },
      { protocol: "icmp", action: "allow" },
    ],
  };

  test("entries numbered 100, 110, … per direction, plus vpcctl's accept-the-rest", () => {
    const p = parseVpcctlPolicy(JSON.stringify(doc));
    assert.equal(p.subnetCidr, "10.10.1.0/24");
    const e = (
      ruleNumber: number,
      dir: "ingress" | "egress",
      action: "allow" | "deny",
      proto: "tcp" | "icmp" | "all",
      from: number,
      to: number,
      cidr = "0.0.0.0/0",
      description = "",
    ) => ({ ruleNumber, dir, action, proto, portFrom: from, portTo: to, cidr, description });
    const catchAll = (dir: "ingress" | "egress") => e(32766, dir, "allow", "all", 0, 0, "0.0.0.0/0", "vpcctl default: what the policy does not match passes");
    assert.deepEqual(p.aclEntries, [
      e(100, "ingress", "allow", "tcp", 80, 80),
      e(110, "ingress", "allow", "tcp", 443, 443),
      e(120, "ingress", "deny", "tcp", 22, 22),
      catchAll("ingress"),
      e(100, "egress", "deny", "tcp", 25, 25),
      e(110, "egress", "allow", "tcp", 8000, 8080, "10.0.0.0/8"),
      e(120, "egress", "allow", "icmp", 0, 0),
      catchAll("egress"),
    ]);
    assert.deepEqual(p.rules, [
      { dir: "ingress", proto: "tcp", portFrom: 80, portTo: 80, cidr: "0.0.0.0/0", description: "" },
      { dir: "ingress", proto: "tcp", portFrom: 443, portTo: 443, cidr: "0.0.0.0/0", description: "" },
      { dir: "egress", proto: "tcp", portFrom: 8000, portTo: 8080, cidr: "10.0.0.0/8", description: "" },
      { dir: "egress", proto: "icmp", portFrom: 0, portTo: 0, cidr: "0.0.0.0/0", description: "" },
    ]);
    assert.deepEqual(p.warnings, [
      "vpcctl_policy_json.ingress[2]: deny tcp 22 0.0.0.0/0 is kept as network ACL entry 120 only; a security group can only allow",
      "vpcctl_policy_json.egress[0]: deny tcp 25 0.0.0.0/0 is kept as network ACL entry 100 only; a security group can only allow",
    ]);
  });

  test("default DENY appends nothing; an empty direction is fine", () => {
    const p = parseVpcctlPolicy(JSON.stringify({ subnet: "10.10.2.0/24", ingress: [{ port: 5432, protocol: "tcp", action: "allow" }], egress: [] }), {
      defaultAction: "deny",
    });
    assert.deepEqual(
      p.aclEntries.map((x) => `${x.dir}/${x.ruleNumber}`),
      ["ingress/100"],
    );
    const q = parseVpcctlPolicy(JSON.stringify({ subnet: "10.10.2.0/24" }));
    assert.deepEqual(
      q.aclEntries.map((x) => `${x.dir}/${x.ruleNumber}/${x.action}`),
      ["ingress/32766/allow", "egress/32766/allow"],
    );
  });

  test("bad documents name the JSON path", () => {
    const f = "vpcctl_policy_json";
    const bad: [string, string][] = [
      ["{", `${f}: is not valid JSON (${jsonError("{")}); expected {"subnet": "a.b.c.d/n", "ingress": [...], "egress": [...]}`],
      ["[]", `${f}: must be a JSON object: {"subnet": "a.b.c.d/n", "ingress": [...], "egress": [...]}`],
      [JSON.stringify({ ingress: [] }), `${f}.subnet: is required (the subnet's CIDR, e.g. "10.10.1.0/24")`],
      [JSON.stringify({ subnet: "10.10.1.1/24" }), `${f}.subnet: "10.10.1.1/24" has host bits set; did you mean "10.10.1.0/24"?`],
      [
        JSON.stringify({ subnet: "10.10.1.0/24", ingress: {} }),
        `${f}.ingress: must be a list of entries like {"port": 80, "protocol": "tcp", "action": "allow"}`,
      ],
      [
        JSON.stringify({ subnet: "10.10.1.0/24", ingress: [{ port: 70000, protocol: "tcp", action: "allow" }] }),
        `${f}.ingress[0].port: 70000 is not a port; use 1–65535 (or "all")`,
      ],
      [
        JSON.stringify({ subnet: "10.10.1.0/24", ingress: [{ port: "90-80", protocol: "tcp", action: "allow" }] }),
        `${f}.ingress[0].port: range 90-80 is backwards; a range is FROM-TO with FROM ≤ TO`,
      ],
      [
        JSON.stringify({ subnet: "10.10.1.0/24", ingress: [{ port: "80; flush ruleset", protocol: "tcp", action: "allow" }] }),
        `${f}.ingress[0].port: "80; flush ruleset" is not valid; use a port such as 80, a range "8000-8080" or "all"`,
      ],
      [
        JSON.stringify({ subnet: "10.10.1.0/24", egress: [{}, { port: 1, protocol: "sctp", action: "allow" }] }),
        `${f}.egress[0].protocol: is required (tcp, udp or icmp)`,
      ],
      [
        JSON.stringify({ subnet: "10.10.1.0/24", egress: [{ port: 1, protocol: "sctp", action: "allow" }] }),
        `${f}.egress[0].protocol: "sctp" is not known; use tcp, udp or icmp`,
      ],
      [
        JSON.stringify({ subnet: "10.10.1.0/24", egress: [{ port: 1, protocol: "tcp", action: "reject" }] }),
        `${f}.egress[0].action: "reject" is not known; use allow or deny`,
      ],
      [
        JSON.stringify({ subnet: "10.10.1.0/24", egress: [{ protocol: "tcp", action: "allow" }] }),
        `${f}.egress[0].port: is required for tcp (a port such as 80, a range "8000-8080" or "all")`,
      ],
      [
        JSON.stringify({ subnet: "10.10.1.0/24", egress: [{ port: 8, protocol: "icmp", action: "allow" }] }),
        `${f}.egress[0].port: icmp has no ports; leave "port" out or use "all"`,
      ],
      [
        JSON.stringify({ subnet: "10.10.1.0/24", egress: [{ port: 1, protocol: "tcp", action: "allow", cidr: "10.0.0.0/33" }] }),
        `${f}.egress[0].cidr: "10.0.0.0/33" has prefix /33; allowed are /0 to /32`,
      ],
    ];
    for (const [json, msg] of bad) throwsExactly(() => parseVpcctlPolicy(json), msg);
    throwsExactly(() => parseVpcctlPolicy(" ".repeat(1024 * 1024 + 1)), `${f}: is 1048577 bytes; a policy document is at most 1048576 (1 MiB)`);
  });

  test("unknown keys and bare addresses are warnings, not errors", () => {
    const p = parseVpcctlPolicy(
      JSON.stringify({ subnet: "10.10.1.0/24", name: "web", ingress: [{ port: 22, protocol: "TCP", action: "Allow", cidr: "10.0.0.9", note: "x" }] }),
    );
    assert.deepEqual(p.warnings, [
      'vpcctl_policy_json: key "name" is not part of a vpcctl policy and was ignored',
      'vpcctl_policy_json.ingress[0]: key "note" is not part of a vpcctl rule and was ignored',
      "vpcctl_policy_json.ingress[0].cidr: the bare address 10.0.0.9 is read as 10.0.0.9/32",
    ]);
    assert.equal(p.rules[0].cidr, "10.0.0.9/32");
  });
});

function jsonError(s: string): string {
  try {
    JSON.parse(s);
  } catch (e) {
    return (e as Error).message;
  }
  return "";
}
