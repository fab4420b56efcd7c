// The netagent planner: desired + observed in, ip/tc batch lines out.
import assert from "node:assert/strict";
import { test } from "vitest";
import { vethAttachOf, vpcNetnsSysctls, type LinkInfo, type QdiscInfo } from "../../services/netagent/kernel.js";
import {
  bandwidthLines,
  bridgeMac,
  kernelIpArg,
  names,
  netnsTarget,
  nicCreateLines,
  planVpc,
  prefixToNetmask,
  type NicSpec,
  type SubnetSpec,
} from "../../services/netagent/plan.js";
import { macFor } from "../../services/netagent/service.js";

const H = "hv1";
const subnet: SubnetSpec = { subnetId: "subnet-aaaaaaaaaaaa", vpcId: "vpc-111111111111", cidr: "10.0.1.0/24", gatewayCidr: "10.0.1.1/24", mtu: 1500 };
const nic = (over: Partial<NicSpec> = {}): NicSpec => ({
  nicId: "nic-bbbbbbbbbbbb",
  owner: "vm-1",
  vpcId: subnet.vpcId,
  subnetId: subnet.subnetId,
  kind: "veth",
  hostIf: "vbbbbbbbbbbbb",
  mac: "02:aa:0a:00:01:04",
  address: "10.0.1.4",
  prefix: 24,
  gateway: "10.0.1.1",
  mtu: 1500,
  hostname: "web-1",
  guestIf: "eth0",
  dns: ["10.0.1.2"],
  veth: { netnsPath: "/run/netns/vm1", skipDefaultRoute: false },
  bandwidth: { ingressMbps: 0, egressMbps: 0 },
  createdMs: 0,
  clientToken: "",
  ...over,
});
const link = (ifname: string, over: Partial<LinkInfo> = {}): LinkInfo => ({ ifname, kind: "", mac: "", mtu: 1500, up: true, addrs: [], ...over });
const goodBridge = link("br-aaaaaaaaaaaa", {
  kind: "bridge",
  alias: "mvpc:hv1:subnet-aaaaaaaaaaaa",
  addrs: ["10.0.1.1/24"],
  mac: bridgeMac("subnet-aaaaaaaaaaaa"),
});
const goodNic = link("vbbbbbbbbbbbb", { kind: "veth", alias: "mvpc:hv1:nic-bbbbbbbbbbbb", master: "br-aaaaaaaaaaaa" });

test("the gateway MAC is fixed per subnet, whatever NICs come and go", () => {
  assert.match(bridgeMac("subnet-aaaaaaaaaaaa"), /^02(:[0-9a-f]{2}){5}$/);
  assert.equal(bridgeMac("subnet-aaaaaaaaaaaa"), bridgeMac("subnet-aaaaaaaaaaaa"));
  assert.notEqual(bridgeMac("subnet-aaaaaaaaaaaa"), bridgeMac("subnet-bbbbbbbbbbbb"));
});

test("names fit in 15 bytes and carry the host", () => {
  assert.equal(names.bridge("subnet-0123456789ab"), "br-0123456789ab");
  assert.equal(names.hostIf("nic-0123456789ab", "tap").length, 13);
  assert.equal(names.netns("hv1", "vpc-0123456789ab"), "mvpc-hv1-vpc-0123456789ab");
  assert.equal(netnsTarget("/run/netns/vm1"), "vm1");
  assert.equal(netnsTarget("/proc/42/ns/net"), "42");
  assert.throws(() => netnsTarget("/tmp/x"));
});

test("an empty namespace gets a bridge with the gateway and a veth NIC configured in the guest", () => {
  const p = planVpc(H, [subnet], [nic()], [link("lo")], []);
  assert.deepEqual(p.ip, [
    `link add br-aaaaaaaaaaaa mtu 1500 address ${bridgeMac("subnet-aaaaaaaaaaaa")} type bridge`,
    "link set dev br-aaaaaaaaaaaa alias mvpc:hv1:subnet-aaaaaaaaaaaa",
    "addr add 10.0.1.1/24 dev br-aaaaaaaaaaaa",
    "link set dev br-aaaaaaaaaaaa up",
    // The far end is made in the VM's namespace with its final name, MAC and MTU.
    "link add vbbbbbbbbbbbb mtu 1500 type veth peer name eth0 address 02:aa:0a:00:01:04 mtu 1500 netns vm1",
    "link set dev vbbbbbbbbbbbb alias mvpc:hv1:nic-bbbbbbbbbbbb",
    "link set dev vbbbbbbbbbbbb mtu 1500 master br-aaaaaaaaaaaa up",
  ]);
  assert.deepEqual(p.guests, [
    {
      nicId: "nic-bbbbbbbbbbbb",
      netnsPath: "/run/netns/vm1",
      lines: ["addr replace 10.0.1.4/24 dev eth0", "link set dev eth0 up", "link set dev lo up", "route replace default via 10.0.1.1 dev eth0"],
    },
  ]);
  assert.deepEqual(p.tc, []);
});

test("a converged namespace plans nothing (adoption after restart changes nothing)", () => {
  const p = planVpc(H, [subnet], [nic()], [link("lo"), goodBridge, goodNic], []);
  assert.deepEqual(p, { ip: [], tc: [], guests: [], changes: [] });
});

test("drift is repaired one device at a time, never by rebuilding", () => {
  const p = planVpc(
    H,
    [subnet],
    [nic()],
    [link("lo"), { ...goodBridge, addrs: ["10.9.9.9/24"], up: false, mac: "02:00:00:00:00:01" }, { ...goodNic, master: undefined }],
    [],
  );
  assert.deepEqual(p.ip, [
    "addr del 10.9.9.9/24 dev br-aaaaaaaaaaaa",
    "addr add 10.0.1.1/24 dev br-aaaaaaaaaaaa",
    `link set dev br-aaaaaaaaaaaa address ${bridgeMac("subnet-aaaaaaaaaaaa")}`,
    "link set dev br-aaaaaaaaaaaa up",
    "link set dev vbbbbbbbbbbbb mtu 1500 master br-aaaaaaaaaaaa up",
  ]);
  assert.equal(p.guests.length, 0, "the guest side is left alone");
});

test("a stray address removed beside the gateway's puts the gateway back after it (the kernel deletes a primary's secondaries with it)", () => {
  // 10.0.1.99/24 was there first (primary), the gateway was added after it (a secondary of the same /24).
  const p = planVpc(H, [subnet], [], [link("lo"), { ...goodBridge, addrs: ["10.0.1.99/24", "10.0.1.1/24"] }], []);
  assert.deepEqual(p.ip, ["addr del 10.0.1.99/24 dev br-aaaaaaaaaaaa", "addr replace 10.0.1.1/24 dev br-aaaaaaaaaaaa"]);
  assert.deepEqual(p.changes, ["remove stray address 10.0.1.99/24 from br-aaaaaaaaaaaa"]);
});

test("two stray addresses of one subnet go secondary first (deleting the primary first would take the secondary with it and fail the batch)", () => {
  const p = planVpc(H, [subnet], [], [link("lo"), { ...goodBridge, addrs: ["10.0.7.1/24", "10.0.7.2/24", "10.0.1.1/24"] }], []);
  assert.deepEqual(p.ip, [
    "addr del 10.0.7.2/24 dev br-aaaaaaaaaaaa",
    "addr del 10.0.7.1/24 dev br-aaaaaaaaaaaa",
    "addr replace 10.0.1.1/24 dev br-aaaaaaaaaaaa",
  ]);
});

test("orphans we own are removed; devices we do not own are never touched", () => {
  const orphan = link("vcccccccccccc", { alias: "mvpc:hv1:nic-cccccccccccc" });
  const otherHost = link("vdddddddddddd", { alias: "mvpc:hv2:nic-dddddddddddd" });
  const foreign = link("eth7");
  const p = planVpc(H, [subnet], [], [link("lo"), goodBridge, orphan, otherHost, foreign], []);
  assert.deepEqual(p.ip, ["link del dev vcccccccccccc"]);
  const partial = planVpc(H, [subnet], [], [link("lo"), goodBridge, orphan], [], { removeOrphans: false });
  assert.deepEqual(partial.ip, [], "a partial plan removes nothing");
});

test("a TAP for a jailed VMM", () => {
  const t = nic({ kind: "tap", hostIf: "tbbbbbbbbbbbb", veth: undefined, tap: { uid: 123, gid: 456, multiQueue: true, queues: 2 } });
  const p = planVpc(H, [subnet], [t], [goodBridge], []);
  assert.deepEqual(p.ip.slice(0, 2), [
    "tuntap add dev tbbbbbbbbbbbb mode tap multi_queue user 123 group 456",
    "link set dev tbbbbbbbbbbbb alias mvpc:hv1:nic-bbbbbbbbbbbb",
  ]);
  assert.equal(p.guests.length, 0);
});

test("bandwidth: tbf toward the VM, ifb + tbf from the VM; lifting removes both", () => {
  const limited = nic({ bandwidth: { ingressMbps: 100, egressMbps: 50 } });
  const add = bandwidthLines(H, limited, [], []);
  assert.deepEqual(add.ip, ["link add ibbbbbbbbbbbb type ifb", "link set dev ibbbbbbbbbbbb alias mvpc:hv1:nic-bbbbbbbbbbbb up"]);
  assert.deepEqual(add.tc, [
    "qdisc replace dev vbbbbbbbbbbbb root tbf rate 100mbit burst 125000 latency 25ms",
    "qdisc add dev vbbbbbbbbbbbb handle ffff: ingress",
    "filter add dev vbbbbbbbbbbbb parent ffff: protocol all prio 1 u32 match u32 0 0 action mirred egress redirect dev ibbbbbbbbbbbb",
    "qdisc replace dev ibbbbbbbbbbbb root tbf rate 50mbit burst 65536 latency 25ms",
  ]);
  const applied: QdiscInfo[] = [
    { dev: "vbbbbbbbbbbbb", kind: "tbf", root: true, rate: 12_500_000 },
    { dev: "vbbbbbbbbbbbb", kind: "ingress", root: false },
    { dev: "ibbbbbbbbbbbb", kind: "tbf", root: true, rate: 6_250_000 },
  ];
  const ifb = link("ibbbbbbbbbbbb", { alias: "mvpc:hv1:nic-bbbbbbbbbbbb" });
  assert.deepEqual(bandwidthLines(H, limited, applied, [ifb]), { ip: [], tc: [] }, "in force: nothing to do");
  const lifted = bandwidthLines(H, nic(), applied, [ifb]);
  assert.deepEqual(lifted, { ip: ["link del dev ibbbbbbbbbbbb"], tc: ["qdisc del dev vbbbbbbbbbbbb root", "qdisc del dev vbbbbbbbbbbbb ingress"] });
});

test("guest configuration without DHCP: ip= argument, netmask, stable MAC", () => {
  assert.equal(prefixToNetmask(24), "255.255.255.0");
  assert.equal(prefixToNetmask(20), "255.255.240.0");
  assert.equal(kernelIpArg(nic(), "255.255.255.0"), "ip=10.0.1.4::10.0.1.1:255.255.255.0:web-1:eth0:off:10.0.1.2");
  assert.match(macFor("vpc-111111111111", "10.0.1.4"), /^02:[0-9a-f]{2}:0a:00:01:04$/);
  assert.notEqual(macFor("vpc-111111111111", "10.0.1.4"), macFor("vpc-222222222222", "10.0.1.4"));
});

test("a detach batch: ip -force output is split per failed line; conntrack -R's printed flows are counted", async () => {
  const { batchFailures, conntrackDeleted, conntrackCommands, namedNetns } = await import("../../services/netagent/kernel.js");
  const stderr = ['Cannot find device "vx"', "Command failed -:1", "some conntrack error", "Command failed -:3", ""].join("\n");
  const f = batchFailures(stderr);
  assert.deepEqual([...f.keys()], [1, 3]);
  assert.match(f.get(1)!, /Cannot find device/);
  const stdout = [
    "tcp      6 99 ESTABLISHED src=10.0.1.4 dst=10.0.1.5 sport=1 dport=80 src=10.0.1.5 dst=10.0.1.4 sport=80 dport=1 mark=0 use=1",
    "udp      17 29 src=10.0.1.9 dst=10.0.1.4 sport=5 dport=53 [UNREPLIED] src=10.0.1.4 dst=10.0.1.9 sport=53 dport=5 mark=0 use=1",
    "",
  ].join("\n");
  assert.equal(conntrackDeleted(stdout), 2);
  assert.equal(conntrackDeleted(""), 0);
  assert.deepEqual(conntrackCommands("10.0.1.4"), ["-D -s 10.0.1.4", "-D -d 10.0.1.4"]);
  assert.equal(namedNetns("/run/netns/vm1"), "vm1");
  assert.equal(namedNetns("/var/run/netns/vm1"), "vm1");
  assert.equal(namedNetns("/proc/42/ns/net"), null);
});

test("a veth NIC's attach batch is recognised for the in-process path exactly as nicCreateLines writes it; anything else stays an exec", () => {
  const as = (n: NicSpec) => {
    const l = nicCreateLines(H, n, "br-aaaaaaaaaaaa");
    return vethAttachOf("vpcns", l.ip, l.guest.length ? [{ netnsPath: n.veth?.netnsPath ?? "", lines: l.guest }] : []);
  };
  assert.deepEqual(as(nic()), {
    ns: "vpcns",
    hostIf: "vbbbbbbbbbbbb",
    mtu: 1500,
    alias: "mvpc:hv1:nic-bbbbbbbbbbbb",
    bridge: "br-aaaaaaaaaaaa",
    netnsPath: "/run/netns/vm1",
    guestIf: "eth0",
    mac: "02:aa:0a:00:01:04",
    address: "10.0.1.4/24",
    gateway: "10.0.1.1",
  });
  assert.equal(as(nic({ veth: { netnsPath: "/proc/4242/ns/net", skipDefaultRoute: true } }))?.gateway, undefined, "no default route asked, none made");
  assert.equal(as(nic({ veth: { netnsPath: "/proc/4242/ns/net", skipDefaultRoute: true } }))?.netnsPath, "/proc/4242/ns/net");
  assert.equal(as(nic({ kind: "tap", tap: { multiQueue: false, queues: 1 }, veth: undefined })), null, "a TAP execs");
  const l = nicCreateLines(H, nic(), "br-aaaaaaaaaaaa");
  assert.equal(
    vethAttachOf("vpcns", [...l.ip, "link add ifb0 type ifb"], [{ netnsPath: "/run/netns/vm1", lines: l.guest }]),
    null,
    "an extra line (limits) execs",
  );
  assert.equal(
    vethAttachOf("vpcns", l.ip, [{ netnsPath: "/run/netns/vm2", lines: l.guest }]),
    null,
    "a guest batch for another namespace than the peer's execs",
  );
  assert.equal(
    vethAttachOf("vpcns", l.ip, [{ netnsPath: "/run/netns/vm1", lines: [...l.guest.slice(0, 3), "route replace default via 10.0.1.1 dev eth1"] }]),
    null,
  );
});

test("a VPC namespace's sysctls: forwarding on and IPv6 off; on a kernel without IPv6 (no net.ipv6 keys) forwarding alone, so its namespaces can still be made", () => {
  assert.deepEqual(vpcNetnsSysctls(true), [
    ["net.ipv4.ip_forward", "1"],
    ["net.ipv6.conf.all.disable_ipv6", "1"],
    ["net.ipv6.conf.default.disable_ipv6", "1"],
  ]);
  assert.deepEqual(vpcNetnsSysctls(false), [["net.ipv4.ip_forward", "1"]]);
});
