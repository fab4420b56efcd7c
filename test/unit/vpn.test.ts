// The VPN's pure parts (services/netagent/vpn/plan.ts, schema.ts): what the
// API and the record parsers accept, address allocation, the wg-quick file a
// client gets, the nft table that confines clients, and the overlay's route
// of the client range to the endpoint host.
import assert from "node:assert/strict";
import { test } from "vitest";
import { render } from "../../services/common/nft/tx.js";
import * as V from "../../services/common/validate.js";
import { parseReservation, reservationValue } from "../../services/ipam/schema.js";
import { withVpnRange } from "../../services/netagent/overlay/plan.js";
import { allocate, clientConfig, clientRange, publicAddress, publicKey, ruleLines, vpnTx } from "../../services/netagent/vpn/plan.js";
import { parseClient, parseEndpoint } from "../../services/netagent/vpn/schema.js";
import { x25519Pair } from "../../cli/commands/vpn.js";

const KEY = "jTUbSIco1ZJdQDGw+2Plb5IBrmbm9sEJ/C6mLDX+jmQ=";

test("public keys, addresses and ranges are checked with the field named", () => {
  assert.equal(publicKey("public_key", KEY), KEY);
  for (const bad of ["", "x", KEY.slice(0, -1), `${KEY.slice(0, 42)}b=`, `${KEY}\n`, `${KEY.slice(0, 20)};rm -rf /${KEY.slice(29)}`]) {
    assert.throws(() => publicKey("public_key", bad), /^InvalidArgumentError: public_key: /);
  }
  assert.equal(publicAddress("public_address", "vpn.example.com"), "vpn.example.com");
  assert.equal(publicAddress("public_address", "192.0.2.1"), "192.0.2.1");
  for (const bad of ["", "1.2.3", "a b", "-x.com", "x.com;id", "999.1.1.1"]) assert.throws(() => publicAddress("public_address", bad), /public_address/);
  assert.equal(clientRange("client_cidr", "10.0.250.0/24", "10.0.0.0/16", [{ name: "web", cidr: "10.0.1.0/24" }]).text, "10.0.250.0/24");
  assert.throws(
    () => clientRange("client_cidr", "10.0.1.0/25", "10.0.0.0/16", [{ name: "web", cidr: "10.0.1.0/24" }]),
    /overlaps subnet web \(10\.0\.1\.0\/24\)/,
  );
  assert.throws(() => clientRange("client_cidr", "10.1.0.0/24", "10.0.0.0/16"), /outside the VPC CIDR 10\.0\.0\.0\/16/);
  assert.throws(() => clientRange("client_cidr", "10.0.0.0/16", "10.0.0.0/16"), /allowed are \/20 to \/29/);
  assert.throws(() => clientRange("client_cidr", "10.0.250.1/24", "10.0.0.0/16"), /host bits set/);
});

test("allocation takes the lowest free address, never the network or broadcast address; null when full", () => {
  const r = V.cidr("c", "10.0.250.0/29", { min: 0, max: 32 });
  assert.equal(allocate(r, new Set()), "10.0.250.1");
  assert.equal(allocate(r, new Set(["10.0.250.1", "10.0.250.3"])), "10.0.250.2");
  const all = new Set(["1", "2", "3", "4", "5", "6"].map((x) => `10.0.250.${x}`));
  assert.equal(allocate(r, all), null);
});

test("the wg-quick file: the address, the VPC CIDR as AllowedIPs, the endpoint", () => {
  const text = clientConfig({
    privateKey: "P".repeat(43) + "=",
    address: "10.0.250.1",
    endpointPublicKey: KEY,
    endpoint: { address: "192.0.2.1", port: 51820 },
    vpcCidr: "10.0.0.0/16",
    name: "laptop",
    vpcName: "prod",
  });
  assert.equal(
    text,
    [
      "# microvpc VPN client laptop of VPC prod",
      "[Interface]",
      `PrivateKey = ${"P".repeat(43)}=`,
      "Address = 10.0.250.1/32",
      "",
      "[Peer]",
      `PublicKey = ${KEY}`,
      "AllowedIPs = 10.0.0.0/16",
      "Endpoint = 192.0.2.1:51820",
      "PersistentKeepalive = 25",
      "",
    ].join("\n"),
  );
  assert.match(
    clientConfig({ address: "10.0.250.1", endpointPublicKey: KEY, endpoint: { address: "h", port: 1 }, vpcCidr: "10.0.0.0/16", name: "a", vpcName: "b" }),
    /^PrivateKey = <the private key/m,
  );
});

test("the CLI's key pair has WireGuard's key format (raw X25519 in base64); two pairs differ", () => {
  const a = x25519Pair();
  const b = x25519Pair();
  assert.equal(publicKey("k", a.publicKey), a.publicKey);
  assert.match(a.privateKey, /^[A-Za-z0-9+/]{43}=$/);
  assert.notEqual(a.privateKey, b.privateKey);
});

test("the VPN table: a chain per client from its groups' egress rules, confined to the VPC, nothing toward clients", () => {
  assert.deepEqual(ruleLines({ proto: "tcp", portFrom: 22, portTo: 22, peers: ["10.0.0.0/16"] }), [
    "ip daddr { 10.0.0.0/16 } meta l4proto tcp th dport 22 accept",
  ]);
  assert.deepEqual(ruleLines({ proto: "udp", portFrom: 0, portTo: 0, peers: ["10.0.1.5", "10.0.1.4"] }), [
    "ip daddr { 10.0.1.4, 10.0.1.5 } meta l4proto udp accept",
  ]);
  assert.deepEqual(ruleLines({ proto: "icmp", portFrom: 0, portTo: 0, icmpType: 8, peers: ["10.0.0.0/16"] }), [
    "ip daddr { 10.0.0.0/16 } meta l4proto icmp icmp type 8 accept",
  ]);
  // A group rule whose peer group has no member allows nothing.
  assert.deepEqual(ruleLines({ proto: "all", portFrom: 0, portTo: 0, peers: [] }), []);
  const script = render(
    vpnTx("wg0123456789abc", "10.0.0.0/16", [
      { id: "vpnc-0123456789ab", address: "10.0.250.1", rules: [{ proto: "tcp", portFrom: 22, portTo: 22, peers: ["10.0.0.0/16"] }] },
    ]),
  );
  assert.match(script, /10\.0\.250\.1 : jump c_0123456789ab/);
  assert.match(script, /chain c_0123456789ab \{\n\s*ip daddr \{ 10\.0\.0\.0\/16 \} meta l4proto tcp th dport 22 accept\n\s*counter drop/);
  assert.match(script, /iifname "wg0123456789abc" ip daddr != 10\.0\.0\.0\/16 counter drop/);
  assert.match(script, /oifname "wg0123456789abc" counter drop/);
  assert.throws(() => vpnTx("wg x", "10.0.0.0/16", []), /ifname/);
  assert.throws(() => vpnTx("wg0", "10.0.0.0/16", [{ id: "vpnc-x", address: "10.0.250.1", rules: [] }]), /client/);
});

test("records read back are parsed like requests", () => {
  const range = V.cidr("c", "10.0.250.0/24", { min: 0, max: 32 });
  const rec = {
    id: "vpnc-0123456789ab",
    name: "laptop",
    vpcId: "vpc-0123456789ab",
    publicKey: KEY,
    address: "10.0.250.1",
    groupIds: ["sg-0123456789ab"],
    createdMs: 1,
  };
  const ok = parseClient(JSON.stringify(rec), rec.vpcId, range);
  assert.ok(ok.ok);
  for (const bad of [
    { ...rec, address: "10.0.1.5" },
    { ...rec, address: "10.0.250.255" },
    { ...rec, publicKey: "x" },
    { ...rec, vpcId: "vpc-ffffffffffff" },
    { ...rec, groupIds: ["sg-x"] },
    { ...rec, name: "Bad Name" },
  ]) {
    assert.equal(parseClient(JSON.stringify(bad), rec.vpcId, range).ok, false, JSON.stringify(bad));
  }
  assert.equal(parseClient("{", rec.vpcId, range).ok, false);
  const h = { vpc: "vpc-0123456789ab", host: "hv0", addr: "192.0.2.1", port: "51820", cidr: "10.0.250.0/24", updated: "1" };
  assert.ok(parseEndpoint(h, "10.0.0.0/16", null).ok);
  assert.equal(parseEndpoint({ ...h, cidr: "10.1.0.0/24" }, "10.0.0.0/16", null).ok, false);
  assert.equal(parseEndpoint({ ...h, port: "0" }, "10.0.0.0/16", null).ok, false);
  assert.equal(parseEndpoint({ ...h, host: "HV;x" }, "10.0.0.0/16", null).ok, false);
});

test("the overlay gives the endpoint host's peer the client range, and only that peer", () => {
  const peers = [
    { hostId: "a", publicKey: "k1", endpoint: "x:1", allowedIps: ["10.0.1.4/32"] },
    { hostId: "b", publicKey: "k2", endpoint: "y:1", allowedIps: ["10.0.1.5/32"] },
  ];
  assert.deepEqual(withVpnRange(peers, null), peers);
  const w = withVpnRange(peers, { hostId: "b", cidr: "10.0.250.0/24" });
  assert.deepEqual(
    w.map((p) => p.allowedIps),
    [["10.0.1.4/32"], ["10.0.1.5/32", "10.0.250.0/24"]],
  );
  assert.deepEqual(withVpnRange(peers, { hostId: "zz", cidr: "10.0.250.0/24" }), peers);
});

test("IPAM's reservation of a client range reads back only as written: base and size must be its CIDR's", () => {
  const c = V.cidr("client_cidr", "10.0.250.0/24", { min: 20, max: 29 });
  const raw = reservationValue({ cidr: c.text, base: c.base, size: c.size, what: "the VPN client range of VPC x's endpoint on host hv0 (192.0.2.1:51820)" });
  assert.deepEqual(parseReservation("vpn", raw), { owner: "vpn", cidr: "10.0.250.0/24", base: c.base, size: 256, what: JSON.parse(raw).what });
  // A base or size that disagrees with the CIDR (what the scripts compare) is refused, as is a bad owner or CIDR.
  assert.throws(() => parseReservation("vpn", raw.replace(`"size":256`, `"size":1`)), /base\/size .* are not those of 10\.0\.250\.0\/24/);
  assert.throws(() => parseReservation("vpn", raw.replace(`"base":${c.base}`, `"base":"${c.base}"`)), /are not those of/);
  assert.throws(() => parseReservation("vpn", raw.replace("10.0.250.0/24", "10.0.250.1/24")), /cidr/);
  assert.throws(() => parseReservation("VPN;x", raw), /owner/);
  assert.throws(() => parseReservation("vpn", "{"), /reservation/);
});
