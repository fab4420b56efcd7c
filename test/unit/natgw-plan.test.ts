// The pure parts of a NAT gateway's own address (issue 16 part 1): the
// holder's NAT table and host routes, the other hosts' steering rules, the
// overlay's 0.0.0.0/0 for the holder's peer, and the lease value's check.
import assert from "node:assert/strict";
import { test } from "vitest";
import { render } from "../../services/common/nft/tx.js";
import { hostRouteLines, natSteerLines, vpcTx, type GwVpc } from "../../services/gateway/plan.js";
import { checkNat, parseNat, parseNatHolder } from "../../services/gateway/schema.js";
import { NAT_ALLOWED, routeLines, withNatHolder, type PeerWant } from "../../services/netagent/overlay/plan.js";

const base: GwVpc = {
  vpcId: "vpc-aaaaaaaaaaaa",
  transit: 0,
  subnets: [
    { subnetId: "subnet-aaaaaaaaaaa1", cidr: "10.0.1.0/24", public: true },
    { subnetId: "subnet-aaaaaaaaaaa2", cidr: "10.0.2.0/24", public: false },
  ],
  nat: true,
  natSources: [],
  natAddress: "192.0.2.130",
  natCidrs: ["10.0.2.0/24", "10.0.3.0/24"],
  overlayIf: "wg0123456789abc",
  fips: [],
  forwards: [],
  hopLimits: new Map(),
};

test("the holder SNATs every source CIDR of the VPC (not only those here) to the address, and proxies it on the uplink", () => {
  const v = { ...base, natRole: "holder" as const };
  const text = render(vpcTx(v, 8775));
  assert.match(text, /set nat_src \{[^}]*elements = \{ 10\.0\.2\.0\/24, 10\.0\.3\.0\/24 \}/);
  assert.match(text, /oifname "gvaaaaaaaaaaaa" ip saddr @nat_src snat to 192\.0\.2\.130/);
  assert.match(text, /oifname "gvaaaaaaaaaaaa" ip saddr @nat_src accept/);
  // Private subnets are no longer masqueraded as the host.
  assert.match(text, /set egress_ok \{[^}]*elements = \{ 10\.0\.1\.0\/24 \}/);
  const routes = hostRouteLines(v, "eth0");
  assert.ok(routes.includes("route replace 192.0.2.130/32 via 169.254.1.2 dev ghaaaaaaaaaaaa"), routes.join("\n"));
  assert.ok(routes.includes("neigh replace proxy 192.0.2.130 dev eth0"));
});

test("a host that does not hold the address neither translates to it nor proxies it, and its private sources have no local egress", () => {
  for (const role of ["steer", "none"] as const) {
    const v = { ...base, natRole: role };
    const text = render(vpcTx(v, 8775));
    assert.doesNotMatch(text, /snat to 192\.0\.2\.130/);
    assert.match(text, /set egress_ok \{[^}]*elements = \{ 10\.0\.1\.0\/24 \}/);
    assert.ok(!hostRouteLines(v, "eth0").some((l) => l.includes("192.0.2.130")));
  }
});

test("a NAT record without an address (an older version's) keeps the per-host masquerade", () => {
  const text = render(vpcTx({ ...base, natAddress: "", natRole: undefined }, 8775));
  assert.match(text, /set egress_ok \{[^}]*elements = \{ 10\.0\.1\.0\/24, 10\.0\.2\.0\/24 \}/);
  assert.doesNotMatch(text, /snat to 192/);
});

test("steering: per source a suppress-default rule then the wg table; only what differs; undone when not steering", () => {
  const v = { ...base, natRole: "steer" as const };
  const first = natSteerLines([], v);
  assert.deepEqual(first.del, []);
  assert.deepEqual(first.add, [
    "route replace default dev wg0123456789abc table 1000",
    "rule add from 10.0.2.0/24 lookup main suppress_prefixlength 0 pref 1000",
    "rule add from 10.0.2.0/24 lookup 1000 pref 1001",
    "rule add from 10.0.3.0/24 lookup main suppress_prefixlength 0 pref 1000",
    "rule add from 10.0.3.0/24 lookup 1000 pref 1001",
  ]);
  const present = [
    { priority: 0, src: "all" },
    { priority: 1000, src: "10.0.2.0", srclen: 24 },
    { priority: 1001, src: "10.0.2.0", srclen: 24 },
    { priority: 1000, src: "10.0.9.0", srclen: 24 },
    { priority: 32766, src: "all" },
  ];
  const again = natSteerLines(present, v);
  assert.deepEqual(again.del, ["rule del from 10.0.9.0/24 pref 1000"]);
  assert.ok(!again.add.some((l) => l.includes("10.0.2.0/24")));
  const off = natSteerLines(present, { ...v, natRole: "holder" });
  assert.deepEqual(off.add, []);
  assert.deepEqual(off.del.sort(), [
    "route flush table 1000",
    "rule del from 10.0.2.0/24 pref 1000",
    "rule del from 10.0.2.0/24 pref 1001",
    "rule del from 10.0.9.0/24 pref 1000",
  ]);
  assert.deepEqual(natSteerLines([], { ...v, natRole: "none" }), { del: [], add: [] });
});

test("overlay: the holder's peer gets 0.0.0.0/0, which makes no route; an unknown holder gets nothing", () => {
  const peers: PeerWant[] = [
    { hostId: "hv1", publicKey: "k1", endpoint: "192.168.100.11:51820", allowedIps: ["10.0.2.5/32"] },
    { hostId: "hv2", publicKey: "k2", endpoint: "192.168.100.12:51820", allowedIps: ["10.0.2.6/32"] },
  ];
  const w = withNatHolder(peers, "hv2");
  assert.deepEqual(w[1].allowedIps, [NAT_ALLOWED, "10.0.2.6/32"]);
  assert.deepEqual(w[0].allowedIps, ["10.0.2.5/32"]);
  assert.deepEqual(withNatHolder(peers, "hv9"), peers);
  assert.deepEqual(routeLines("wgx", [], w).sort(), ["route replace 10.0.2.5/32 dev wgx", "route replace 10.0.2.6/32 dev wgx"]);
  assert.deepEqual(routeLines("wgx", ["10.0.2.5", "10.0.2.6"], w), []);
});

test("records: a NAT address and a lease holder are checked as the API checks them", () => {
  const h = { id: "nat-0123456789ab", vpc: "vpc-aaaaaaaaaaaa", subnet: "subnet-aaaaaaaaaaa1", sources: "[]", created: "1" };
  assert.equal(parseNat({ ...h, address: "192.0.2.130" }).ok, true);
  assert.equal(parseNat(h).ok, true, "no address: an older record");
  for (const bad of ["192.0.2.130\nrule add", "192.0.2.300", "x"]) assert.equal(parseNat({ ...h, address: bad }).ok, false, bad);
  assert.throws(() => checkNat({ id: h.id, vpcId: h.vpc, subnetId: h.subnet, sources: [], address: "1.2.3.4/8", description: "", createdMs: 0 }));
  assert.equal(parseNatHolder("hv1").ok, true);
  for (const bad of ["", "HV1", "hv1\nx", "a".repeat(40), "hv-1 "]) assert.equal(parseNatHolder(bad).ok, false, JSON.stringify(bad));
});
