// deploy/vpn-client.ts, without root: the wg-quick file `microvpc vpn client
// add` prints is read strictly (each bad value named, nothing reaches a
// command), and `wg-quick up` as data — the wg setconf text without
// wg-quick's own keys, and the argv of each command.
import assert from "node:assert/strict";
import { test } from "vitest";
import { parseClientConfig, upPlan } from "../../deploy/vpn-client.js";
import { clientConfig } from "../../services/netagent/vpn/plan.js";

const PRIV = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
const PUB = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
const printed = clientConfig({
  privateKey: PRIV,
  address: "10.0.250.1",
  endpointPublicKey: PUB,
  endpoint: { address: "192.168.250.11", port: 51820 },
  vpcCidr: "10.0.0.0/16",
  name: "laptop",
  vpcName: "blog",
});

test("the file the CLI prints parses to its values", () => {
  assert.deepEqual(parseClientConfig(printed), {
    privateKey: PRIV,
    address: "10.0.250.1",
    peer: { publicKey: PUB, allowedIps: ["10.0.0.0/16"], endpoint: { host: "192.168.250.11", port: 51820 }, keepalive: 25 },
  });
});

test("wg-quick up as data: setconf without Address, then the address, the link and a route per AllowedIPs", () => {
  const p = upPlan("mvpcqs-inet", "mvpcqs-laptop", parseClientConfig(printed), "/run/x/mvpcqs-laptop.conf", ["10.1.0.0/16"]);
  assert.equal(
    p.setconf,
    `[Interface]\nPrivateKey = ${PRIV}\n\n[Peer]\nPublicKey = ${PUB}\nAllowedIPs = 10.0.0.0/16, 10.1.0.0/16\nEndpoint = 192.168.250.11:51820\nPersistentKeepalive = 25\n`,
  );
  assert.deepEqual(p.commands, [
    ["ip", "netns", "exec", "mvpcqs-inet", "wg", "setconf", "mvpcqs-laptop", "/run/x/mvpcqs-laptop.conf"],
    ["ip", "-n", "mvpcqs-inet", "addr", "add", "10.0.250.1/32", "dev", "mvpcqs-laptop"],
    ["ip", "-n", "mvpcqs-inet", "link", "set", "mvpcqs-laptop", "up"],
    ["ip", "-n", "mvpcqs-inet", "route", "replace", "10.0.0.0/16", "dev", "mvpcqs-laptop"],
    ["ip", "-n", "mvpcqs-inet", "route", "replace", "10.1.0.0/16", "dev", "mvpcqs-laptop"],
  ]);
});

test("bad files are refused with the key named: nothing unchecked reaches wg or ip", () => {
  const bad: [string, string, RegExp][] = [
    ["PrivateKey = " + PRIV, "PrivateKey = <the private key of the public key you gave>", /^PrivateKey: is a placeholder/],
    ["PrivateKey = " + PRIV, "PrivateKey = x\nPostUp = rm -rf /", /^PrivateKey: .* is not a WireGuard/],
    ["Address = 10.0.250.1/32", "Address = 10.0.250.1/24", /^Address: .* prefix \/24/],
    ["Address = 10.0.250.1/32", "Address = 10.0.250.1/32; ip link del eth0", /^Address: .* is not an IPv4 CIDR/],
    ["AllowedIPs = 10.0.0.0/16", "AllowedIPs = 10.0.0.0/16, 10.0.0.1/16", /^AllowedIPs: .* host bits set/],
    ["AllowedIPs = 10.0.0.0/16", "AllowedIPs = 10.0.0.0/16 dev lo", /^AllowedIPs: .* is not an IPv4 CIDR/],
    [`PublicKey = ${PUB}`, "PublicKey = ", /^PublicKey: is required/],
    ["Endpoint = 192.168.250.11:51820", "Endpoint = 192.168.250.11", /^Endpoint: .* is not HOST:PORT/],
    ["Endpoint = 192.168.250.11:51820", "Endpoint = 192.168.250.11:70000", /^Endpoint: 70000 is not a port/],
    ["Endpoint = 192.168.250.11:51820", "Endpoint = -oProxyCommand=x:51820", /^Endpoint: .* neither an IPv4 address nor a DNS name/],
    ["PersistentKeepalive = 25", "PersistentKeepalive = 25s", /^PersistentKeepalive: .* is not 0–65535/],
    ["[Peer]", "[Peer]\n[Peer]", /^\[Peer\]: appears twice/],
    ["[Peer]", "[Pier]", /^config: .* is neither a \[section\]/],
  ];
  /** The message itself, not String(err) (which starts with the class name). */
  const says = (re: RegExp) => (e: Error) => re.test(e.message);
  for (const [from, to, err] of bad) {
    assert.ok(printed.includes(from), from);
    assert.throws(() => parseClientConfig(printed.replace(from, to)), says(err), to);
  }
  assert.throws(() => parseClientConfig(""), says(/^config: needs an \[Interface\] and a \[Peer\]/));
  assert.throws(() => upPlan("ns", "bad name", parseClientConfig(printed), "/f"), says(/^ifname: /));
  assert.throws(() => upPlan("ns", "wgc0", parseClientConfig(printed), "/f", ["0/0"]), says(/^extraAllowed: /));
});
