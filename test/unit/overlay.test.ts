// The overlay's pure parts: interface names, `wg show dump` parsing, and the
// `wg set` arguments that turn one peer list into another.
import assert from "node:assert/strict";
import { test } from "node:test";
import { parseDump, peerArgs, wgName, type PeerWant } from "../../services/netagent/overlay.js";

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
  const same: PeerWant[] = [
    { hostId: "a", publicKey: K1, endpoint: "192.168.100.11:40000", allowedIps: ["10.0.1.5/32", "10.0.1.4/32"] },
  ];
  assert.deepEqual(peerArgs({ ...d, peers: [d.peers[0]] }, same), []);
  const args = peerArgs(d, [...same, { hostId: "c", publicKey: K3, endpoint: "192.168.100.12:1", allowedIps: [] }]);
  assert.deepEqual(args, ["peer", K2, "remove", "peer", K3, "endpoint", "192.168.100.12:1", "persistent-keepalive", "25", "allowed-ips", ""]);
  const moved = peerArgs({ ...d, peers: [d.peers[0]] }, [{ ...same[0], allowedIps: ["10.0.1.4/32"] }]);
  assert.deepEqual(moved, ["peer", K1, "endpoint", "192.168.100.11:40000", "persistent-keepalive", "25", "allowed-ips", "10.0.1.4/32"]);
});
