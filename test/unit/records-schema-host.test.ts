// Records read back from Redis are input: every field of the netagent's host
// records and of a peering, set to each hostile value, is refused by the
// parsers with a reason naming the field; valid records round-trip. Also the
// overlay claim rule (claims.ts) on hand-made evidence.
import assert from "node:assert/strict";
import { describe, test } from "vitest";
import { claimShapeProblem, verifyClaims, type ClaimEvidence } from "../../services/netagent/overlay/claims.js";
import type { NicSpec, SubnetSpec } from "../../services/netagent/plan.js";
import { nicSubnetProblem, parseNicSpec, parseSubnetSpec, parseVpcSpec, type Parsed } from "../../services/netagent/schema.js";
import { parsePeeringRecord } from "../../services/peering/schema.js";
import * as V from "../../services/common/validate.js";

const HOST = "hv1";
const VPC = "vpc-0123456789ab";
const SUBNET = "subnet-0123456789ab";
const NIC = "nic-0123456789ab";

const vpc = { vpcId: VPC, ns: `mvpc-${HOST}-${VPC}`, createdMs: 1700000000000 };
const subnet: SubnetSpec = { subnetId: SUBNET, vpcId: VPC, cidr: "10.1.2.0/24", gatewayCidr: "10.1.2.1/24", mtu: 1500 };
const vethNic: NicSpec = {
  nicId: NIC,
  owner: "vm-a",
  vpcId: VPC,
  subnetId: SUBNET,
  kind: "veth",
  hostIf: "v0123456789ab",
  mac: "02:aa:0a:01:02:05",
  address: "10.1.2.5",
  prefix: 24,
  gateway: "10.1.2.1",
  mtu: 1500,
  hostname: "web-1",
  guestIf: "eth0",
  dns: ["10.1.0.2"],
  search: ["prod.internal"],
  veth: { netnsPath: "/run/netns/vm-a", skipDefaultRoute: false },
  bandwidth: { ingressMbps: 0, egressMbps: 100, egressBurst: 65536 },
  createdMs: 1700000000000,
  clientToken: "tok-1",
};
const tapNic: NicSpec = {
  ...vethNic,
  kind: "tap",
  hostIf: "tap-web1",
  veth: undefined,
  tap: { uid: 1000, gid: 1000, multiQueue: true, queues: 4 },
};

const HOSTILE_STRINGS: [string, string][] = [
  ["newline", "x\nnetns exec mvpc-hv1-x /bin/touch /tmp/pwned"],
  ["quote", 'x" ; add rule bridge microvpc prerouting accept ; "'],
  ["brace", "x } table inet y {"],
  ["semicolon", "x;reboot"],
  ["NUL", "x\u0000y"],
  ["over-long", "a".repeat(300)],
];

type Json = Record<string, unknown>;

/** Every leaf path of a record ("bandwidth.egressMbps", "dns[0]", …) with its value. */
function leaves(o: unknown, path = ""): [string, unknown][] {
  if (Array.isArray(o)) return [[path, o], ...o.flatMap((x, i) => leaves(x, `${path}[${i}]`))];
  if (o && typeof o === "object")
    return [...(path ? [[path, o] as [string, unknown]] : []), ...Object.entries(o).flatMap(([k, v]) => leaves(v, path ? `${path}.${k}` : k))];
  return [[path, o]];
}

function setPath(o: Json, path: string, v: unknown): Json {
  const c = structuredClone(o);
  const parts = path.split(/\.|(?=\[)/);
  let cur: Record<string, unknown> | unknown[] = c;
  for (const [i, p] of parts.entries()) {
    const key = p.startsWith("[") ? Number(p.slice(1, -1)) : p;
    if (i === parts.length - 1) {
      if (v === undefined) {
        if (Array.isArray(cur)) cur.splice(key as number, 1);
        else delete (cur as Record<string, unknown>)[key as string];
      } else (cur as Record<string | number, unknown>)[key] = v;
    } else cur = (cur as Record<string | number, unknown>)[key] as Record<string, unknown>;
  }
  return c;
}

/** The wrong JSON type for a value. */
function wrongType(v: unknown): unknown {
  if (typeof v === "string") return 42;
  if (typeof v === "number") return String(v);
  if (typeof v === "boolean") return "true";
  if (Array.isArray(v)) return "not-a-list";
  return [];
}

/** The name a reason must mention: the last path segment without [i]. */
function fieldName(path: string): string {
  return path
    .replace(/\[\d+\]$/, "")
    .split(".")
    .pop()!;
}

function assertRejected<T>(p: Parsed<T>, path: string, what: string): void {
  assert.equal(p.ok, false, `${path} ${what} must be refused`);
  if (!p.ok)
    assert.ok(p.reason.includes(fieldName(path)) || p.field.includes(fieldName(path)), `${path} ${what}: reason ${JSON.stringify(p.reason)} names the field`);
}

/** Runs the whole hostile table over one record. */
function hostileTable(name: string, valid: Json, parse: (raw: string) => Parsed<unknown>, optional: Set<string>, freeText = new Set<string>()): void {
  describe(name, () => {
    test("the valid record round-trips", () => {
      const p = parse(JSON.stringify(valid));
      assert.ok(p.ok, p.ok ? "" : p.reason);
      assert.deepEqual(JSON.parse(JSON.stringify(p.value)), JSON.parse(JSON.stringify(valid)));
    });
    const paths = leaves(valid);
    for (const [path, value] of paths) {
      if (typeof value === "string" && !freeText.has(path)) {
        for (const [what, bad] of HOSTILE_STRINGS)
          test(`${path} × ${what}`, () => assertRejected(parse(JSON.stringify(setPath(valid, path, bad))), path, what));
      }
      test(`${path} × wrong JSON type`, () => assertRejected(parse(JSON.stringify(setPath(valid, path, wrongType(value)))), path, "of the wrong type"));
      if (!optional.has(path) && !/\[\d+\]$/.test(path))
        test(`${path} × missing`, () => assertRejected(parse(JSON.stringify(setPath(valid, path, undefined))), path, "missing"));
    }
    test("not JSON, or not an object", () => {
      for (const raw of ["{", "null", "[]", '"x"', "1"]) assert.equal(parse(raw).ok, false, raw);
    });
  });
}

hostileTable("VpcSpec", vpc, (raw) => parseVpcSpec(HOST, VPC, raw), new Set());
hostileTable("SubnetSpec", subnet as unknown as Json, (raw) => parseSubnetSpec(SUBNET, raw), new Set());
hostileTable("NicSpec (veth)", vethNic as unknown as Json, (raw) => parseNicSpec(NIC, raw), new Set(["search", "bandwidth.egressBurst"]));
hostileTable(
  "NicSpec (tap)",
  JSON.parse(JSON.stringify(tapNic)) as Json,
  (raw) => parseNicSpec(NIC, raw),
  new Set(["search", "bandwidth.egressBurst", "tap.uid", "tap.gid"]),
);

describe("records that are well-formed but wrong", () => {
  test("the hash key must match the id inside", () => {
    assert.match((parseNicSpec("nic-ffffffffffff", JSON.stringify(vethNic)) as { reason: string }).reason, /nicId.*key/);
    assert.match((parseSubnetSpec("subnet-ffffffffffff", JSON.stringify(subnet)) as { reason: string }).reason, /subnetId.*key/);
    assert.match((parseVpcSpec(HOST, "vpc-ffffffffffff", JSON.stringify(vpc)) as { reason: string }).reason, /vpcId.*key/);
  });
  test("a VPC's namespace is derived, and 'peered' is never stored", () => {
    assert.equal(parseVpcSpec(HOST, VPC, JSON.stringify({ ...vpc, ns: "mvpc-other-x" })).ok, false);
    assert.equal(parseVpcSpec("hv2", VPC, JSON.stringify(vpc)).ok, false);
    assert.equal(parseVpcSpec(HOST, VPC, JSON.stringify({ ...vpc, peered: true })).ok, false);
  });
  test("a subnet's gateway is its first address; its CIDR canonical", () => {
    assert.equal(parseSubnetSpec(SUBNET, JSON.stringify({ ...subnet, gatewayCidr: "10.1.2.7/24" })).ok, false);
    assert.equal(parseSubnetSpec(SUBNET, JSON.stringify({ ...subnet, cidr: "10.1.2.5/24" })).ok, false);
    assert.equal(parseSubnetSpec(SUBNET, JSON.stringify({ ...subnet, cidr: "0.0.0.0/0", gatewayCidr: "0.0.0.1/0" })).ok, false);
    assert.equal(parseSubnetSpec(SUBNET, JSON.stringify({ ...subnet, mtu: 65000 })).ok, false);
  });
  test("a NIC's interface cannot impersonate a device of ours; a veth's is derived", () => {
    for (const hostIf of ["br-0123456789ab", "wg0123456789abc", "pc0123456789ab", "i0123456789ab", "lo"]) {
      assert.equal(parseNicSpec(NIC, JSON.stringify({ ...tapNic, hostIf })).ok, false, hostIf);
    }
    assert.equal(parseNicSpec(NIC, JSON.stringify({ ...vethNic, hostIf: "myveth" })).ok, false);
    assert.ok(parseNicSpec(NIC, JSON.stringify({ ...tapNic, hostIf: "t0123456789ab" })).ok);
  });
  test("numbers in range only: MTU, rates, bursts, queues, uid", () => {
    const bad: Partial<NicSpec>[] = [
      { mtu: 100 },
      { mtu: 1500.5 },
      { prefix: 0 },
      { bandwidth: { ingressMbps: -1, egressMbps: 0 } },
      { bandwidth: { ingressMbps: 1e9, egressMbps: 0 } },
      { bandwidth: { ingressMbps: 0, egressMbps: 0, egressBurst: 10 } },
      { tap: { multiQueue: true, queues: 65 } },
      { tap: { multiQueue: true, queues: 1, uid: -1 } },
      { createdMs: -5 },
    ];
    for (const b of bad) assert.equal(parseNicSpec(NIC, JSON.stringify({ ...tapNic, ...b })).ok, false, JSON.stringify(b));
  });
  test("a NIC must fit its subnet", () => {
    assert.equal(nicSubnetProblem(vethNic, subnet), null);
    assert.match(nicSubnetProblem({ ...vethNic, address: "10.9.9.9" }, subnet)!.reason, /address/);
    assert.match(nicSubnetProblem({ ...vethNic, address: "10.1.2.1" }, subnet)!.reason, /address/);
    assert.match(nicSubnetProblem({ ...vethNic, vpcId: "vpc-ffffffffffff" }, subnet)!.reason, /vpcId/);
    assert.match(nicSubnetProblem({ ...vethNic, gateway: "10.1.2.9" }, subnet)!.reason, /gateway/);
  });
});

// ---------------------------------------------------------------------------
// peering records (a Redis hash of strings)

const peering: Record<string, string> = {
  id: "pcx-0123456789ab",
  name: "a--b",
  vpc1: "vpc-0000000000a1",
  vpc2: "vpc-0000000000b2",
  cidr1: "10.1.0.0/16",
  cidr2: "10.2.0.0/16",
  allowed1: JSON.stringify([]),
  allowed2: JSON.stringify(["10.2.1.0/24"]),
  description: "",
  labels: JSON.stringify([{ key: "env", value: "prod" }]),
  created: "1700000000000",
};

describe("peering record", () => {
  test("the valid record round-trips", () => {
    const p = parsePeeringRecord(peering.id, peering);
    assert.ok(p.ok, p.ok ? "" : p.reason);
    assert.deepEqual(p.value.vpc2Allowed, ["10.2.1.0/24"]);
  });
  for (const f of Object.keys(peering)) {
    for (const [what, bad] of HOSTILE_STRINGS) {
      if (f === "description" && what === "quote") continue; // free text: quotes are fine, controls are not
      if (f === "description" && (what === "brace" || what === "semicolon")) continue;
      test(`${f} × ${what}`, () => {
        const p = parsePeeringRecord(peering.id, { ...peering, [f]: bad });
        assert.equal(p.ok, false);
        if (!p.ok) assert.ok(p.reason.includes(f.replace(/\d$/, "")) || p.field.includes(f), `${f}: ${p.reason}`);
      });
    }
  }
  test("allowed CIDRs: wrong JSON type, outside the VPC, the whole internet, not canonical", () => {
    for (const allowed2 of [
      "{}",
      '"10.2.0.0/16"',
      "[1]",
      '["0.0.0.0/1","128.0.0.0/1"]',
      '["10.9.0.0/16"]',
      '["10.2.1.0/24","10.2.0.0/24"]',
      '["10.2.1.7/24"]',
    ]) {
      const p = parsePeeringRecord(peering.id, { ...peering, allowed2 });
      assert.equal(p.ok, false, allowed2);
      if (!p.ok) assert.match(p.reason, /allowed2/);
    }
  });
  test("VPCs: the same one twice, overlapping CIDRs, a missing field", () => {
    assert.equal(parsePeeringRecord(peering.id, { ...peering, vpc2: peering.vpc1 }).ok, false);
    assert.equal(parsePeeringRecord(peering.id, { ...peering, cidr2: "10.1.128.0/17" }).ok, false);
    for (const f of ["id", "vpc1", "vpc2", "cidr1", "cidr2", "name", "created"]) {
      const h = { ...peering };
      delete h[f];
      assert.equal(parsePeeringRecord(peering.id, h).ok, false, f);
    }
  });
});

// ---------------------------------------------------------------------------
// overlay address claims

describe("overlay address claims (claims.ts)", () => {
  const within = [V.cidr("vpc", "10.1.0.0/16", { min: 8, max: 28 })];
  const nicOn = (nicId: string, address: string, owner: string): string =>
    JSON.stringify({ ...vethNic, nicId, hostIf: `v${nicId.slice(-12)}`, address, owner });
  const evidence = (): ClaimEvidence => ({
    indexed: new Map([
      ["10.1.2.5", [{ hostId: "hva", nicId: "nic-00000000000a" }]],
      ["10.1.2.6", [{ hostId: "hvb", nicId: "nic-00000000000b" }]],
    ]),
    nicRecords: new Map([
      ["hva/nic-00000000000a", nicOn("nic-00000000000a", "10.1.2.5", "vm-a")],
      ["hvb/nic-00000000000b", nicOn("nic-00000000000b", "10.1.2.6", "vm-b")],
    ]),
    subnets: new Map([[SUBNET, { vpcId: VPC, cidr: "10.1.2.0/24" }]]),
    allocOwners: new Map([
      [`${SUBNET}/5`, "vm-a"],
      [`${SUBNET}/6`, "vm-b"],
    ]),
  });
  const claims = (...c: [string, string][]) => new Map(c);

  test("shape: IPv4 inside the VPC, a host id", () => {
    assert.equal(claimShapeProblem("10.1.2.5", "hva", within), "");
    for (const [a, h] of [
      ["0.0.0.0/1", "hvb"],
      ["128.0.0.0/1", "hvb"],
      ["10.1.2.5/32", "hvb"],
      ["10.1.2.5,0.0.0.0/0", "hvb"],
      ["10.9.9.9", "hvb"],
      ["10.1.2.5\n", "hvb"],
      ["10.1.2.5", "hv b"],
      ["010.1.2.5", "hvb"],
    ])
      assert.notEqual(claimShapeProblem(a, h, within), "", `${a} → ${h}`);
  });

  test("genuine claims pass; the evidence, not the claim, says where an address goes", () => {
    const r = verifyClaims(VPC, ["10.1.2.5", "10.1.2.6"], claims(["10.1.2.5", "hva"], ["10.1.2.6", "hvb"]), evidence(), new Set());
    assert.deepEqual(r.accepted, [
      ["10.1.2.5", "hva"],
      ["10.1.2.6", "hvb"],
    ]);
    assert.deepEqual(r.rejected, []);
  });

  test("hijack by rewriting the claim: hva keeps its VM's address, hvb's claim is rejected", () => {
    const r = verifyClaims(VPC, ["10.1.2.5"], claims(["10.1.2.5", "hvb"]), evidence(), new Set());
    assert.deepEqual(r.accepted, [["10.1.2.5", "hva"]]);
    assert.equal(r.rejected[0].hostId, "hvb");
    assert.match(r.rejected[0].reason, /NIC of hva/);
  });

  test("hijack with a forged index and NIC record of hvb: contested, installed for nobody", () => {
    const ev = evidence();
    ev.indexed.set("10.1.2.5", [
      { hostId: "hva", nicId: "nic-00000000000a" },
      { hostId: "hvb", nicId: "nic-0000000000ff" },
    ]);
    ev.nicRecords.set("hvb/nic-0000000000ff", nicOn("nic-0000000000ff", "10.1.2.5", "vm-a"));
    const r = verifyClaims(VPC, ["10.1.2.5"], claims(["10.1.2.5", "hvb"]), ev, new Set());
    assert.deepEqual(r.accepted, []);
    assert.match(r.rejected[0].reason, /contested/);
  });

  test("an address nobody indexes, another owner, unallocated, or an invalid NIC record: not installed", () => {
    assert.match(verifyClaims(VPC, ["10.1.2.9"], claims(["10.1.2.9", "hvb"]), evidence(), new Set()).rejected[0].reason, /no host's NIC index/);
    const ev2 = evidence();
    ev2.allocOwners.set(`${SUBNET}/6`, "vm-other");
    assert.match(verifyClaims(VPC, ["10.1.2.6"], claims(), ev2, new Set()).rejected[0].reason, /allocated to/);
    const ev3 = evidence();
    ev3.allocOwners.set(`${SUBNET}/6`, null);
    assert.match(verifyClaims(VPC, ["10.1.2.6"], claims(), ev3, new Set()).rejected[0].reason, /not allocated/);
    const ev4 = evidence();
    ev4.nicRecords.set("hvb/nic-00000000000b", nicOn("nic-00000000000b", "10.1.2.6", "vm-b").replace('"eth0"', '"eth0\\nx"'));
    assert.match(verifyClaims(VPC, ["10.1.2.6"], claims(), ev4, new Set()).rejected[0].reason, /invalid/);
    const ev5 = evidence();
    ev5.subnets.set(SUBNET, { vpcId: "vpc-ffffffffffff", cidr: "10.1.2.0/24" });
    assert.match(verifyClaims(VPC, ["10.1.2.6"], claims(), ev5, new Set()).rejected[0].reason, /not a subnet of/);
  });

  test("a local NIC's address is never routed into the tunnel", () => {
    const r = verifyClaims(VPC, ["10.1.2.6"], claims(["10.1.2.6", "hvb"]), evidence(), new Set(["10.1.2.6"]));
    assert.deepEqual(r.accepted, []);
    assert.match(r.rejected[0].reason, /this host/);
  });
});
