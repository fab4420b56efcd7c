// Records read back from Redis are input. A table of hostile records — each
// field × newline, quote, brace, semicolon, NUL, over-long, wrong type,
// missing — goes through the gateway's, the firewall's and DNS's schema
// parsers: every one is refused with a reason naming the field, and the
// valid records round-trip unchanged.
import assert from "node:assert/strict";
import { describe, test } from "vitest";
import * as DS from "../../services/dns/schema.js";
import * as FS from "../../services/firewall/schema.js";
import type { SgRule } from "../../services/firewall/model.js";
import * as GS from "../../services/gateway/schema.js";
import { create, toBinary } from "@bufbuild/protobuf";
import { InstanceMetadataSchema } from "../../gen/microvpc/v1/gateway_pb.js";
import { parseHopLimit, parseStoredMetadata } from "../../services/gateway/metadata-store.js";
import type { Parsed } from "../../services/common/validate.js";

const VPC = "vpc-0123456789ab";
const SUBNET = "subnet-0123456789ab";
const NIC = "nic-0123456789ab";
const SG = "sg-0123456789ab";
const INJECT = "route replace default via 6.6.6.6";

type Kind = "newline" | "quote" | "open-brace" | "close-brace" | "semicolon" | "nul" | "over-long" | "wrong-type" | "missing";

interface FieldSpec {
  /** Field name as stored. */
  name: string;
  /** What the reason must name (default: name; a list: any of them). */
  reason?: string | string[];
  /** Free text (a description): quotes, braces and semicolons are allowed there. */
  freeText?: boolean;
  /** May be absent. */
  optional?: boolean;
  /** A value of the wrong type (default: a JSON list in a string). */
  wrongType?: unknown;
}

/** Hostile variants of a valid (string) value. */
function hostile(valid: string, f: FieldSpec): [Kind, unknown][] {
  const out: [Kind, unknown][] = [
    ["newline", `${valid}\n${INJECT}`],
    ["nul", `${valid}\u0000`],
    ["over-long", valid + "1".repeat(5000)],
  ];
  if (!f.freeText) {
    out.push(
      ["quote", `${valid}"`],
      ["open-brace", `${valid} {`],
      ["close-brace", `${valid} }`],
      ["semicolon", `${valid}; add rule inet microvpc forward accept`],
    );
    out.push(["wrong-type", f.wrongType ?? `["${valid}"]`]);
  } else if (f.wrongType !== undefined) {
    out.push(["wrong-type", f.wrongType]);
  }
  if (!f.optional) out.push(["missing", undefined]);
  return out;
}

/** Runs the table for one record kind: `parse` gets the record with one field replaced (undefined: removed). */
function table(kind: string, valid: Record<string, unknown>, fields: FieldSpec[], parse: (rec: Record<string, unknown>) => Parsed<unknown>): void {
  describe(kind, () => {
    test("the valid record parses", () => {
      const p = parse(valid);
      assert.ok(p.ok, p.ok ? "" : p.reason);
    });
    for (const f of fields) {
      const v = valid[f.name];
      const base = typeof v === "string" ? v : JSON.stringify(v);
      for (const [k, bad] of hostile(base, f)) {
        test(`${f.name} × ${k}: refused, the reason names the field`, () => {
          const rec = { ...valid };
          if (bad === undefined) delete rec[f.name];
          else rec[f.name] = bad;
          const p = parse(rec);
          assert.equal(p.ok, false, `${f.name} = ${JSON.stringify(bad)?.slice(0, 60)} was accepted`);
          const names = [f.reason ?? f.name].flat();
          if (!p.ok)
            assert.ok(
              names.some((n) => p.reason.includes(n)),
              `reason ${JSON.stringify(p.reason)} does not name ${names.join(" or ")}`,
            );
        });
      }
    }
  });
}

/** A hash: every value a string (the parsers get what HGETALL returns). */
const asHash = (r: Record<string, unknown>) => Object.fromEntries(Object.entries(r).map(([k, v]) => [k, typeof v === "string" ? v : JSON.stringify(v)]));

// ---------- gateway ----------

const fip = {
  id: "fip-0123456789ab",
  address: "192.168.100.130",
  vpc: VPC,
  private: "10.0.1.5",
  nic: NIC,
  host: "h0",
  description: "web",
  allocated: "1",
  associated: "2",
};
table(
  "gateway floating IP",
  fip,
  [
    { name: "id" },
    { name: "address" },
    { name: "vpc" },
    { name: "private" },
    { name: "nic" },
    { name: "host" },
    { name: "description", freeText: true, optional: true },
    { name: "allocated", optional: true, wrongType: "twelve" },
    { name: "associated", optional: true, wrongType: "1e3" },
  ],
  (r) => GS.parseFip(asHash(r) as Record<string, string>, "fip-0123456789ab"),
);

const pf = {
  id: "pf-0123456789ab",
  vpc: VPC,
  proto: "tcp",
  host: "h0",
  outside: "8080",
  private: "10.0.1.5",
  private_port: "80",
  nic: NIC,
  description: "",
  created: "1",
};
table(
  "gateway port forward",
  pf,
  [
    { name: "id" },
    { name: "vpc" },
    { name: "proto" },
    { name: "host" },
    { name: "outside", wrongType: "http" },
    { name: "private" },
    { name: "private_port", wrongType: "80.5" },
    { name: "nic" },
    { name: "description", freeText: true, optional: true },
    { name: "created", optional: true, wrongType: "now" },
  ],
  (r) => GS.parsePf(asHash(r) as Record<string, string>, "pf-0123456789ab"),
);

const nat = { id: "nat-0123456789ab", vpc: VPC, subnet: SUBNET, sources: JSON.stringify([SUBNET]), description: "", created: "1" };
table(
  "gateway NAT gateway",
  nat,
  [
    { name: "id" },
    { name: "vpc" },
    { name: "subnet" },
    { name: "sources", optional: true, wrongType: JSON.stringify({ a: SUBNET }) },
    { name: "description", freeText: true, optional: true },
    { name: "created", optional: true, wrongType: "x" },
  ],
  (r) => GS.parseNat(asHash(r) as Record<string, string>, "nat-0123456789ab"),
);

table("gateway transit index", { value: "3" }, [{ name: "value", reason: "transit", wrongType: "three" }], (r) => GS.parseTransit(VPC, r.value as string));
table("IMDS hop limit", { value: "2" }, [{ name: "value", reason: "hop", wrongType: "two" }], (r) => parseHopLimit(`${VPC}/10.0.1.5`, r.value as string));
table("gateway subnet (cidr reaching nft)", { subnetId: SUBNET, cidr: "10.0.1.0/24" }, [{ name: "subnetId", reason: "subnet" }, { name: "cidr" }], (r) =>
  GS.parseGwSubnet(r as { subnetId: string; cidr: string }),
);

// ---------- dns ----------

table(
  "dns config",
  { resolver: "10.0.0.2", forwarders: JSON.stringify(["192.0.2.53:53"]), ttl: "60" },
  [
    { name: "resolver", optional: true },
    { name: "forwarders", optional: true, wrongType: JSON.stringify([53]) },
    { name: "ttl", optional: true, wrongType: "sixty" },
  ],
  (r) => DS.parseConfig(asHash(r) as Record<string, string>, true),
);

// A stored DNS record is one string "address\nttl\nowner\nupdated": each line is a
// field; a newline inside one makes a fifth line, refused as a whole ("value").
table(
  "dns record",
  { address: "10.0.1.5", ttl: "60", owner: "vm-1", updated: "1" },
  [
    { name: "address", reason: ["address", "value"] },
    { name: "ttl", reason: ["ttl", "value"], wrongType: "sixty" },
    { name: "owner", reason: ["owner", "value"] },
    { name: "updated", reason: ["updated", "value"], wrongType: "x" },
  ],
  (r) => DS.parseRecord(VPC, "web", [r.address, r.ttl, r.owner, r.updated].map((x) => (x === undefined ? "" : String(x))).join("\n")),
);

// ---------- firewall ----------

const rule: SgRule = { dir: "ingress", proto: "tcp", portFrom: 80, portTo: 80, cidr: "0.0.0.0/0", description: "web" };
const group = {
  id: SG,
  vpc: VPC,
  name: "web",
  description: "",
  labels: JSON.stringify([{ key: "team", value: "blue" }]),
  rules: JSON.stringify([rule]),
  logging: JSON.stringify({ ratePerSecond: 5, burst: 5 }),
  gen: "1",
  created: "1",
  updated: "1",
};
table(
  "firewall security group",
  group,
  [
    { name: "id" },
    { name: "vpc" },
    { name: "name" },
    { name: "description", freeText: true, optional: true },
    { name: "labels", optional: true, wrongType: JSON.stringify({ team: "blue" }) },
    { name: "rules", optional: true, wrongType: JSON.stringify({ dir: "ingress" }) },
    { name: "logging", reason: "drop_logging", optional: true, wrongType: JSON.stringify([5, 5]) },
    { name: "gen", wrongType: "one" },
  ],
  (r) => FS.parseGroup(asHash(r) as Record<string, string>, SG),
);

// One rule inside a group's rules: each of its JSON fields.
table(
  "firewall rule (in a group)",
  { ...rule, cidr: "0.0.0.0/0" },
  [
    { name: "dir", reason: "rules[0].direction", wrongType: 1 },
    { name: "proto", reason: "rules[0].protocol", wrongType: 6 },
    { name: "portFrom", reason: "rules[0].port_from", wrongType: "80" },
    { name: "portTo", reason: "rules[0].port_to", wrongType: "80" },
    { name: "cidr", reason: "rules[0]", wrongType: 0 },
    { name: "description", reason: "rules[0].description", freeText: true, optional: true, wrongType: 5 },
  ],
  (r) => {
    // Numbers given as hostile strings must be refused too.
    return FS.parseGroup({ ...group, rules: JSON.stringify([r]) }, SG);
  },
);

table(
  "firewall rule with a peer group",
  { dir: "ingress", proto: "all", portFrom: 0, portTo: 0, group: SG, description: "" },
  [{ name: "group", reason: "rules[0]", wrongType: 7 }],
  (r) => FS.parseGroup({ ...group, rules: JSON.stringify([r]) }, SG),
);

const entry = { ruleNumber: 100, dir: "ingress", action: "allow", proto: "tcp", portFrom: 22, portTo: 22, cidr: "10.0.0.0/8", description: "" };
const acl = {
  id: "acl-0123456789ab",
  vpc: VPC,
  name: "edge",
  description: "",
  labels: "[]",
  entries: JSON.stringify([entry]),
  gen: "1",
  created: "1",
  updated: "1",
};
table(
  "firewall network ACL",
  acl,
  [{ name: "id" }, { name: "vpc" }, { name: "name" }, { name: "entries", optional: true, wrongType: JSON.stringify("all") }, { name: "gen", wrongType: "x" }],
  (r) => FS.parseAcl(asHash(r) as Record<string, string>, [SUBNET], "acl-0123456789ab"),
);
table(
  "firewall ACL entry",
  entry,
  [
    { name: "ruleNumber", reason: "entries[0].rule_number", wrongType: "100" },
    { name: "action", reason: "entries[0].action", wrongType: true },
    { name: "proto", reason: "entries[0].protocol", wrongType: 6 },
    { name: "portFrom", reason: "entries[0].port_from", wrongType: "22" },
    { name: "cidr", reason: "entries[0].cidr", wrongType: 10 },
  ],
  (r) => FS.parseAcl({ ...acl, entries: JSON.stringify([r]) }, [SUBNET], "acl-0123456789ab"),
);

const spec = {
  nicId: NIC,
  vpcId: VPC,
  subnetId: SUBNET,
  address: "10.0.1.5",
  mac: "02:00:0a:00:01:05",
  hostId: "h0",
  hostIf: "vt0123456789ab",
  groupIds: [SG],
  dropLogging: { ratePerSecond: 5, burst: 10 },
};
table(
  "firewall binding (sig)",
  spec,
  [
    { name: "nicId", reason: "nic_id", wrongType: 5 },
    { name: "vpcId", reason: "vpc", wrongType: 5 },
    { name: "subnetId", reason: "subnet", wrongType: 5 },
    { name: "address", wrongType: 167772421 },
    { name: "mac", wrongType: 2 },
    { name: "hostId", reason: "host_id", wrongType: 0 },
    { name: "hostIf", reason: "host_interface", wrongType: ["eth0"] },
    { name: "groupIds", reason: "security_groups", wrongType: SG },
    { name: "dropLogging", reason: "drop_logging", optional: true, wrongType: "5/second" },
  ],
  (r) => FS.parseBinding(JSON.stringify(r), "1", "2", NIC),
);
table("firewall group member", { address: "10.0.1.5" }, [{ name: "address", wrongType: "ten" }], (r) => FS.parseMember(NIC, r.address as string));

// ---------- round trips ----------

describe("valid records round-trip", () => {
  test("gateway", () => {
    const f: GS.FipRec = {
      id: "fip-0123456789ab",
      address: "192.168.100.130",
      vpcId: VPC,
      private: "10.0.1.5",
      nicId: NIC,
      hostId: "h0",
      description: "web",
      allocatedMs: 1,
      associatedMs: 2,
    };
    assert.deepEqual(GS.parseFip(fip, f.id), { ok: true, value: GS.checkFip(f) });
    const free = { ...fip, vpc: "", private: "", nic: "", host: "" };
    assert.ok(GS.parseFip(free).ok, "an unassociated floating IP");
    const half = { ...fip, private: "" };
    assert.equal(GS.parseFip(half).ok, false, "a target without its private address");
    const p = GS.parsePf(pf);
    assert.ok(p.ok && p.value.outsidePort === 8080 && p.value.privatePort === 80 && p.value.proto === "tcp");
    const n = GS.parseNat(nat);
    assert.ok(n.ok && n.value.sources[0] === SUBNET);
    assert.equal(GS.parseFip(fip, "fip-ffffffffffff").ok, false, "a record under another id's key");
  });

  test("firewall", () => {
    const g = FS.parseGroup(group, SG);
    assert.ok(g.ok);
    assert.deepEqual(g.value.rules, [rule]);
    assert.deepEqual(g.value.dropLogging, { ratePerSecond: 5, burst: 5 });
    const b = FS.parseBinding(JSON.stringify(spec), "1", "2", NIC);
    assert.deepEqual(b, { ok: true, value: { ...spec, boundMs: 1, updatedMs: 2 } });
    assert.deepEqual(FS.checkBinding(spec), spec);
    const a = FS.parseAcl(acl, [SUBNET]);
    assert.ok(a.ok && a.value.entries[0].cidr === "10.0.0.0/8");
    assert.equal(FS.parseGroup({ ...group, rules: JSON.stringify([{ ...rule, cidr: "10.0.0.5/8" }]) }).ok, false, "host bits set");
    assert.equal(FS.parseGroup({ ...group, rules: JSON.stringify([{ ...rule, extra: 1 }]) }).ok, false, "an unknown field");
    assert.equal(FS.parseBinding(JSON.stringify({ ...spec, mac: "02:00:0A:00:01:05" }), "1", "2").ok, false, "a MAC not as written");
  });

  test("dns", () => {
    assert.deepEqual(DS.parseConfig({ resolver: "10.0.0.2", forwarders: '["192.0.2.53:53"]', ttl: "60" }, true), {
      ok: true,
      value: { resolver: "10.0.0.2", forwarders: ["192.0.2.53:53"], ttl: 60 },
    });
    assert.equal(DS.parseConfig({ forwarders: '["127.0.0.1:53"]' }, true).ok, false, "a VPC never forwards to the host");
    assert.ok(DS.parseConfig({ forwarders: '["127.0.0.1:53"]' }, false).ok, "the defaults may");
    assert.deepEqual(DS.parseRecord(VPC, "web", "10.0.1.5\n60\nvm-1\n1"), {
      ok: true,
      value: { vpcId: VPC, name: "web", address: "10.0.1.5", ttl: 60, owner: "vm-1", updatedMs: 1 },
    });
  });
});

describe("IMDS records (base64 protobuf) are checked as SetInstanceMetadata checks them", () => {
  const md = { instanceId: "i-1", vpcId: VPC, subnetId: SUBNET, localIpv4: "10.0.1.5", mac: "02:00:0a:00:01:05", hostname: "web-1" };
  const pb = (m: Record<string, unknown>) => Buffer.from(toBinary(InstanceMetadataSchema, create(InstanceMetadataSchema, m))).toString("base64");
  test("a valid record round-trips", () => {
    const p = parseStoredMetadata(pb(md));
    assert.ok(p.ok && p.value.hostname === "web-1" && p.value.localIpv4 === "10.0.1.5");
  });
  for (const [field, bad] of [
    ["hostname", { hostname: `web-1\n${INJECT}` }],
    ["local_ipv4", { localIpv4: "10.0.1.5; rm -rf /" }],
    ["mac", { mac: '02:00:0a:00:01:05"' }],
    ["vpc_id", { vpcId: "vpc-{}" }],
    ["public_ipv4", { publicIpv4: "1.2.3.4\u0000" }],
    ["instance_type", { instanceType: "x".repeat(300) }],
  ] as const) {
    test(`${field}: refused, the reason names it`, () => {
      const p = parseStoredMetadata(pb({ ...md, ...bad }));
      assert.equal(p.ok, false);
      if (!p.ok) assert.ok(p.reason.includes(field), p.reason);
    });
  }
  test("not base64, or not the message: refused", () => {
    assert.equal(parseStoredMetadata("}{;\n").ok, false);
    assert.equal(parseStoredMetadata(Buffer.from("\u00ff\u00ff\u00ff").toString("base64")).ok, false);
  });
});

describe("reportInvalid", () => {
  test("logs and counts each key and reason once; lists it for status", async () => {
    const { invalidRecords, invalidRecordsTotal, reportInvalid } = await import("../../services/common/invalid-records.js");
    const count = async () => (await invalidRecordsTotal.get()).values.find((v) => v.labels.owner === "test" && v.labels.kind === "fip")?.value ?? 0;
    const lines: unknown[] = [];
    const log = { warn: (o: unknown) => void lines.push(o) };
    const before = await count();
    reportInvalid("test", "fip", "mvpc:gw:fip:x\ny", "address: bad", log);
    reportInvalid("test", "fip", "mvpc:gw:fip:x\ny", "address: bad", log);
    assert.equal((await count()) - before, 1);
    assert.equal(lines.length, 1);
    reportInvalid("test", "fip", "mvpc:gw:fip:x\ny", "vpc: bad", log);
    assert.equal((await count()) - before, 2);
    assert.equal(lines.length, 2);
    assert.equal(JSON.stringify(lines[0]).includes("\\n"), true, "the key is logged escaped, not as a raw newline");
    assert.deepEqual(
      invalidRecords("test")
        .map((r) => r.reason)
        .sort(),
      ["address: bad", "vpc: bad"],
    );
  });

  test("the field and VPC of a record, for status per VPC: the same key and reason in two fields are two records", async () => {
    const { invalidRecords, reportInvalid } = await import("../../services/common/invalid-records.js");
    const { invalidWhere } = await import("../../services/gateway/store.js");
    reportInvalid("test-where", "transit", "mvpc:gw:host:hv1:transit", "transit: bad", undefined, { field: "vpc-aaaaaaaaaaaa", vpcId: "vpc-aaaaaaaaaaaa" });
    reportInvalid("test-where", "transit", "mvpc:gw:host:hv1:transit", "transit: bad", undefined, { field: "vpc-bbbbbbbbbbbb", vpcId: "vpc-bbbbbbbbbbbb" });
    assert.deepEqual(
      invalidRecords(["test-where"])
        .map((r) => `${r.field} ${r.vpcId}`)
        .sort(),
      ["vpc-aaaaaaaaaaaa vpc-aaaaaaaaaaaa", "vpc-bbbbbbbbbbbb vpc-bbbbbbbbbbbb"],
    );
    // A whole-hash record: the field its reason names, if the hash has it; its VPC, if it reads as one.
    assert.deepEqual(invalidWhere({ address: "x", vpc: "vpc-aaaaaaaaaaaa" }, 'address: "x" is not an IPv4 address'), {
      field: "address",
      vpcId: "vpc-aaaaaaaaaaaa",
    });
    assert.deepEqual(invalidWhere({ vpc: "vpc-x\n" }, "private_port: missing"), { field: undefined, vpcId: undefined });
  });

  test("a child's log line of a skipped record is reported in the parent, with key, field and VPC; other lines are not", async () => {
    const { invalidRecords, reportChildLine, reportInvalid } = await import("../../services/common/invalid-records.js");
    const lines: string[] = [];
    // The child's line, as pino writes it (msg and the bindings in one JSON object).
    const child = { warn: (o: object, msg?: string) => void lines.push(JSON.stringify({ level: 40, ...o, msg })) };
    reportInvalid("test-child", "imds-metadata", "mvpc:gw:md:inst:i-x\n", "pb: is not base64", child, { field: "pb", vpcId: "vpc-cccccccccccc" });
    assert.equal(lines.length, 1);
    const before = invalidRecords("test-child").length;
    // The parent has not seen it: the same line, once more under another owner, stands for the child's.
    const asChild = lines[0].replace('"owner":"test-child"', '"owner":"test-child2"');
    assert.equal(reportChildLine(asChild), true);
    const got = invalidRecords("test-child2");
    assert.deepEqual(
      got.map((r) => [r.kind, r.key, r.field, r.vpcId, r.reason]),
      [["imds-metadata", "mvpc:gw:md:inst:i-x\n", "pb", "vpc-cccccccccccc", "pb: is not base64"]],
    );
    assert.equal(invalidRecords("test-child").length, before);
    for (const other of [
      '{"msg":"instance metadata server listening"}',
      "skipping a record from Redis that does not validate",
      '{"msg":"skipping a record from Redis that does not validate","owner":"x","kind":"y","key":"not json text","reason":"r"}',
      '{"msg":"skipping a record from Redis that does not validate","owner":"x","kind":"y","key":"\\"k\\"","reason":5}',
    ]) {
      assert.equal(reportChildLine(other), false, other);
    }
  });
});
