// The overlay's pure parts: interface names, `wg show dump` parsing, and the
// `wg set` arguments that turn one peer list into another.
import assert from "node:assert/strict";
import { test } from "vitest";
import * as V from "../../services/common/validate.js";
import { allowedWithin, keepDuringOutage, nominate, overlayMtu, peerArgs, peersOf, routeLines, type PeerWant } from "../../services/netagent/overlay/plan.js";
import { addressProblem, memberProblem, recordProblem } from "../../services/netagent/overlay/registry.js";
import { parseDump, selectImplementation, wgName } from "../../services/netagent/overlay/wg.js";
import type { WgProbe } from "../../services/netagent/overlay/wgkernel.js";

const K1 = "x".repeat(43) + "=";
const K2 = "y".repeat(43) + "=";
const K3 = "z".repeat(43) + "=";

const DUMP = [
  ["PRIVATEKEYNEVERKEPT", "pubSelf", "51820", "off"].join("\t"),
  [K1, "(none)", "192.168.100.11:40000", "10.0.1.5/32,10.0.1.4/32", "1700000000", "100", "200", "25"].join("\t"),
  [K2, "(none)", "(none)", "(none)", "0", "0", "0", "off"].join("\t"),
].join("\n");

test("interface names are 15 bytes, stable and distinct per host and VPC", () => {
  const a = wgName("hv0", "vpc-000000000001");
  assert.equal(a.length, 15);
  assert.match(a, /^wg[0-9a-f]{13}$/);
  assert.equal(a, wgName("hv0", "vpc-000000000001"));
  assert.notEqual(a, wgName("hv1", "vpc-000000000001"));
  assert.notEqual(a, wgName("hv0", "vpc-000000000002"));
});

test("parseDump keeps peers and never the private key", () => {
  const d = parseDump(DUMP);
  assert.equal(d.publicKey, "pubSelf");
  assert.equal(d.listenPort, 51820);
  assert.ok(!JSON.stringify(d, (_, v) => (typeof v === "bigint" ? String(v) : v)).includes("PRIVATEKEY"));
  assert.deepEqual(d.peers[0].allowedIps, ["10.0.1.4/32", "10.0.1.5/32"]);
  assert.equal(d.peers[0].keepalive, 25);
  assert.equal(d.peers[0].rxBytes, 100n);
  assert.equal(d.peers[1].endpoint, "");
  assert.deepEqual(d.peers[1].allowedIps, []);
});

test("peerArgs: nothing when equal; removes the departed, adds and updates the rest", () => {
  const d = parseDump(DUMP);
  const same: PeerWant[] = [{ hostId: "a", publicKey: K1, endpoint: "192.168.100.11:40000", allowedIps: ["10.0.1.5/32", "10.0.1.4/32"] }];
  assert.deepEqual(peerArgs({ ...d, peers: [d.peers[0]] }, same), []);
  const args = peerArgs(d, [...same, { hostId: "c", publicKey: K3, endpoint: "192.168.100.12:1", allowedIps: [] }]);
  assert.deepEqual(args, ["peer", K2, "remove", "peer", K3, "endpoint", "192.168.100.12:1", "persistent-keepalive", "25", "allowed-ips", ""]);
  const moved = peerArgs({ ...d, peers: [d.peers[0]] }, [{ ...same[0], allowedIps: ["10.0.1.4/32"] }]);
  assert.deepEqual(moved, ["peer", K1, "endpoint", "192.168.100.11:40000", "persistent-keepalive", "25", "allowed-ips", "10.0.1.4/32"]);
});

// A real key: 32 bytes in base64, so the last character before "=" carries 2 zero bits.
const GOOD_KEY = Buffer.alloc(32, 7).toString("base64");
const rec = (o: Record<string, unknown> = {}) =>
  JSON.stringify({ id: "hv1", publicKey: GOOD_KEY, address: "192.168.100.11", mtu: 1440, underlayMtu: 1500, vpcIds: [], ...o });

test("recordProblem accepts a well-formed record, IPv4 or IPv6", () => {
  assert.equal(recordProblem("hv1", rec()), "");
  assert.equal(recordProblem("hv1", rec({ address: "fd00::11" })), "");
  assert.equal(recordProblem("hv1", rec({ mtu: 9156 })), "", "a jumbo underlay (9216 − 60)");
});

test("recordProblem names what is wrong with a record from another host", () => {
  const cases: [string, string, RegExp][] = [
    ["not JSON", "{nope", /not JSON/],
    ["an array", "[1,2]", /not a JSON object/],
    ["another host's id", rec({ id: "hv2" }), /does not match its key/],
    ["a short key", rec({ publicKey: "abc=" }), /public key "abc=" is not a base64 Curve25519 key/],
    ["a key with 2 non-zero tail bits", rec({ publicKey: "B".repeat(43) + "=" }), /not a base64 Curve25519 key/],
    ["a key with a space (argv injection)", rec({ publicKey: GOOD_KEY.slice(0, 40) + " rm=" }), /not a base64/],
    ["no key", rec({ publicKey: undefined }), /public key/],
    ["a host name for the address", rec({ address: "hv1.example" }), /underlay address "hv1.example" is not an IPv4 or IPv6 literal/],
    ["an address with a port", rec({ address: "192.168.100.11:51820" }), /not an IPv4 or IPv6 literal/],
    ["an address with an option", rec({ address: "1.2.3.4 persistent-keepalive" }), /not an IPv4 or IPv6 literal/],
    ["the unspecified address", rec({ address: "0.0.0.0" }), /unspecified address/],
    ["a multicast address", rec({ address: "ff02::1" }), /multicast address/],
    ["a number for the address", rec({ address: 3232261131 }), /underlay address/],
    ["a silly MTU", rec({ mtu: 70000 }), /mtu 70000 is not an integer in 576–65535/],
    ["an MTU as text", rec({ mtu: "1440" }), /mtu "1440" is not an integer/],
  ];
  for (const [what, raw, want] of cases) assert.match(recordProblem("hv1", raw), want, what);
});

test("memberProblem: the listen port must be an integer in 1–65535", () => {
  assert.equal(memberProblem(JSON.stringify({ port: 51820 })), "");
  for (const bad of [0, 65536, -1, 1.5, "51820", null])
    assert.match(memberProblem(JSON.stringify({ port: bad })), /listen port .* is not an integer in 1–65535/, String(bad));
  assert.match(memberProblem("{"), /not JSON/);
});

test("addressProblem: --underlay-address must be a host's IP literal", () => {
  assert.equal(addressProblem("10.0.0.1"), "");
  assert.equal(addressProblem("2001:db8::1"), "");
  assert.match(addressProblem("eth0"), /not an IPv4 or IPv6 literal/);
  assert.match(addressProblem("10.0.0.256"), /not an IPv4 or IPv6 literal/);
  assert.match(addressProblem("::"), /unspecified/);
  assert.match(addressProblem("255.255.255.255"), /broadcast/);
});

function fakeProbe(module: boolean, create: boolean): WgProbe & { tried: number } {
  const p = {
    tried: 0,
    moduleLoaded: () => module,
    canCreate: async () => {
      p.tried++;
      return create;
    },
  };
  return p;
}

test("selectImplementation: the kernel module when a kernel device can be made, else wireguard-go", async () => {
  const table: { name: string; mode: "auto" | "kernel" | "wireguard-go"; module: boolean; create: boolean; want: string | RegExp; probes: number }[] = [
    { name: "module loaded, device made", mode: "auto", module: true, create: true, want: "kernel", probes: 1 },
    { name: "module loads on demand", mode: "auto", module: false, create: true, want: "kernel", probes: 1 },
    { name: "no module (these machines)", mode: "auto", module: false, create: false, want: "wireguard-go", probes: 1 },
    { name: "module visible, creation refused", mode: "auto", module: true, create: false, want: "wireguard-go", probes: 1 },
    { name: "forced wireguard-go: no probe", mode: "wireguard-go", module: true, create: true, want: "wireguard-go", probes: 0 },
    { name: "forced kernel", mode: "kernel", module: true, create: true, want: "kernel", probes: 1 },
    {
      name: "forced kernel, no module",
      mode: "kernel",
      module: false,
      create: false,
      want: /--wireguard kernel: .*no wireguard module: modprobe wireguard/,
      probes: 1,
    },
    { name: "forced kernel, creation refused", mode: "kernel", module: true, create: false, want: /CAP_NET_ADMIN/, probes: 1 },
  ];
  for (const c of table) {
    const probe = fakeProbe(c.module, c.create);
    if (c.want instanceof RegExp) {
      await assert.rejects(selectImplementation(c.mode, probe), c.want, c.name);
    } else {
      const r = await selectImplementation(c.mode, probe);
      assert.equal(r.impl, c.want, c.name);
      assert.ok(r.why.length > 0, c.name);
    }
    assert.equal(probe.tried, c.probes, `${c.name}: probes`);
  }
});

const hostRec = (id: string, publicKey: string, address: string) => ({
  id,
  publicKey,
  address,
  mtu: 1500,
  underlayMtu: 1500,
  vpcIds: [],
  registeredMs: 1,
  keyCreatedMs: 1,
  agentVersion: "",
});

test("peersOf: one peer per other host with its addresses as /32s; a host holding our own key gets none", () => {
  const hosts = [
    { hostId: "hv1", record: hostRec("hv1", K1, "192.168.100.11"), port: 40000 },
    { hostId: "hv2", record: hostRec("hv2", K2, "fd00::2"), port: 40001 },
    { hostId: "hv3", record: hostRec("hv3", K3, "192.168.100.13"), port: 40002 },
  ];
  const addrs = { "10.0.1.5": "hv1", "10.0.1.4": "hv1", "10.0.2.9": "hv2", "10.0.3.1": "hv3" };
  assert.deepEqual(peersOf(hosts, K3, addrs), [
    { hostId: "hv1", publicKey: K1, endpoint: "192.168.100.11:40000", allowedIps: ["10.0.1.4/32", "10.0.1.5/32"] },
    { hostId: "hv2", publicKey: K2, endpoint: "[fd00::2]:40001", allowedIps: ["10.0.2.9/32"] },
  ]);
});

test("keepDuringOutage: fresh peers first, then the applied hosts Redis no longer lists that are still members", () => {
  const p = (hostId: string, ip: string): PeerWant => ({ hostId, publicKey: hostId, endpoint: "", allowedIps: [ip] });
  const applied = [p("hv1", "10.0.0.1/32"), p("hv2", "10.0.0.2/32"), p("hv3", "10.0.0.3/32")];
  // hv2's lease ran out during the outage (still a member); hv3 left the VPC (its member entry is gone).
  assert.deepEqual(keepDuringOutage([p("hv1", "10.0.0.9/32")], applied, ["hv0", "hv1", "hv2"]), [p("hv1", "10.0.0.9/32"), p("hv2", "10.0.0.2/32")]);
  assert.deepEqual(keepDuringOutage([], applied, []), [], "no member left: nothing kept");
});

test("routeLines: deletes routes no peer wants (a bare dst is a /32), adds the missing ones", () => {
  const want: PeerWant[] = [{ hostId: "hv1", publicKey: K1, endpoint: "", allowedIps: ["10.0.1.5/32", "10.0.1.6/32"] }];
  assert.deepEqual(routeLines("wg0", ["10.0.1.5", "10.0.1.7"], want), ["route del 10.0.1.7/32 dev wg0", "route replace 10.0.1.6/32 dev wg0"]);
  assert.deepEqual(routeLines("wg0", ["10.0.1.5/32", "10.0.1.6"], want), []);
});

test("nominate: malformed claims are rejected, our own and unwanted ones dropped silently", () => {
  const vpc = V.cidr("cidr", "10.0.0.0/16", { min: 8, max: 28 });
  const raw = { "10.0.1.5": "hv1", "10.0.1.6": "hv0", "10.9.0.1": "hv1", "10.0.2.1": "hv2" };
  const own = nominate("hv0", raw, [vpc], null);
  assert.deepEqual(
    [...own.claims],
    [
      ["10.0.1.5", "hv1"],
      ["10.0.2.1", "hv2"],
    ],
  );
  assert.deepEqual(
    own.rejected.map((r) => r.address),
    ["10.9.0.1"],
  );
  const peered = nominate("hv0", raw, [vpc], allowedWithin(vpc, ["10.0.2.0/24", "10.1.0.0/24", "junk"]));
  assert.deepEqual([...peered.claims], [["10.0.2.1", "hv2"]]);
  assert.equal(peered.wanted("10.0.1.5"), false);
  assert.deepEqual(allowedWithin(null, ["10.0.2.0/24"]), []);
});

test("overlayMtu: 60 bytes of WireGuard over IPv4, 80 over IPv6", () => {
  assert.equal(overlayMtu(1500, "192.168.100.10"), 1440);
  assert.equal(overlayMtu(9000, "fd00::1"), 8920);
});
