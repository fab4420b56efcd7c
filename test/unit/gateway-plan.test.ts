// The gateway planner's tenant boundary, as text: port forwards only to the
// uplink's own address and never on reserved ports, link-local dropped from
// the uplink, the per-VM conntrack limit. The packets are in
// test/integration/tenant-dataplane.test.ts.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { describe, test } from "vitest";
import { managementFromAddrs, managementHolding, parseManagementCidrs } from "../../services/common/management.js";
import { DEFAULT_RESERVED_PORTS, hostNft, parsePortRanges, portReserved, vpcNft, type GwVpc, type HostGw } from "../../services/gateway/plan.js";

const vpc = (): GwVpc => ({
  vpcId: "vpc-111111111111",
  transit: 0,
  subnets: [{ subnetId: "subnet-aaaaaaaaaaaa", cidr: "10.0.1.0/24", public: true }],
  nat: false,
  natSources: [],
  fips: [{ address: "203.0.113.5", private: "10.0.1.4" }],
  forwards: [
    { proto: "tcp", outsidePort: 443, private: "10.0.1.4", privatePort: 443 },
    { proto: "tcp", outsidePort: 22, private: "10.0.1.4", privatePort: 22 },
  ],
  hopLimits: new Map([["10.0.1.4", 1]]),
  resolver: "10.0.0.2",
});

const host = (o: Partial<HostGw> = {}): HostGw => ({
  hostId: "hv1",
  uplink: "eth0",
  imdsPort: 8775,
  dnsPort: 53,
  pool: "203.0.113.0/24",
  reservedPorts: parsePortRanges("--reserved-ports", DEFAULT_RESERVED_PORTS),
  // Overlapping on purpose (auto gives the subnet and the host's /32 in it); the pool is inside.
  managementCidrs: ["198.51.100.0/24", "198.51.100.7/32", "203.0.113.0/24", "10.20.0.0/16"],
  vpcs: [vpc()],
  ...o,
});

describe("reserved ports", () => {
  test("the default is SSH, the daemons' gRPC ports, their health ports and their metrics ports", () => {
    const r = parsePortRanges("--reserved-ports", DEFAULT_RESERVED_PORTS);
    for (const p of [22, 7401, 7403, 7405, 8401, 8405, 9401, 9405]) assert.ok(portReserved(r, p), `${p} reserved`);
    for (const p of [21, 23, 443, 7400, 7406, 8400, 8406, 8775, 9400, 9406]) assert.ok(!portReserved(r, p), `${p} free`);
  });

  test("the flag's syntax: empty is none, bad parts name the flag", () => {
    assert.deepEqual(parsePortRanges("--reserved-ports", ""), []);
    assert.deepEqual(parsePortRanges("--reserved-ports", " 22 , 8000-8010 "), [
      [22, 22],
      [8000, 8010],
    ]);
    for (const bad of ["0", "65536", "10-5", "ssh", "22;23", "1-2-3"]) assert.throws(() => parsePortRanges("--reserved-ports", bad), /--reserved-ports/);
  });
});

describe("host table", () => {
  test("port forwards DNAT only the uplink's own address, and never a reserved port", () => {
    const text = hostNft(host());
    assert.match(text, /iifname "eth0" fib daddr \. iif type local dnat ip to meta l4proto \. th dport map @port_forward/);
    assert.match(text, /elements = \{ tcp \. 443 : 169\.254\.1\.2 \. 443 \}/);
    assert.doesNotMatch(text, /tcp \. 22 :/, "a stored forward on 22 is not applied");
  });

  test("link-local sources from the uplink are dropped before any VPC; so are new flows to link-local it did not DNAT", () => {
    const text = hostNft(host());
    assert.match(text, /iifname "eth0" ip saddr 169\.254\.0\.0\/16 counter drop/);
    assert.match(text, /iifname "eth0" ip daddr 169\.254\.0\.0\/16 ct direction original ct status & dnat == 0 counter drop/);
  });
});

describe("management network", () => {
  test("new flows from the transit links to it are dropped, floating IPs and the transit addresses excepted", () => {
    const text = hostNft(host());
    assert.match(
      text,
      /set management \{ type ipv4_addr; flags interval; auto-merge; elements = \{ 10\.20\.0\.0\/16, 198\.51\.100\.0\/24, 198\.51\.100\.7\/32, 203\.0\.113\.0\/24 \}; \}/,
    );
    assert.match(text, /iifname @transit_ifs ip daddr @management ip daddr != @pool ct direction original counter drop comment "management network"/);
    const input = text.slice(text.indexOf("chain input"), text.indexOf("chain forward"));
    const at = (re: RegExp) => input.split("\n").findIndex((l) => re.test(l));
    const drop = at(/ip daddr @management ip daddr != 169\.254\.0\.0\/16 counter drop/);
    assert.ok(drop > at(/iifname != @transit_ifs accept/), "only from the transit links");
    assert.ok(drop < at(/tcp dport 8775 accept/), "before the metadata port is accepted");
    assert.match(hostNft(host({ managementCidrs: undefined })), /set management \{ type ipv4_addr; flags interval; auto-merge; \}/, "none: empty set");
  });

  test("--management-cidrs: auto, a list (a bare address is a /32), empty; bad parts name the flag", () => {
    assert.equal(parseManagementCidrs("--management-cidrs", "auto"), "auto");
    assert.deepEqual(parseManagementCidrs("--management-cidrs", ""), []);
    assert.deepEqual(parseManagementCidrs("--management-cidrs", " 10.20.0.0/16, 192.0.2.7 ,192.0.2.7"), ["10.20.0.0/16", "192.0.2.7/32"]);
    for (const bad of ["10.20.0.1/16", "eth0", "10.20.0.0/33", "::1"])
      assert.throws(() => parseManagementCidrs("--management-cidrs", bad), /--management-cidrs/);
    assert.equal(managementHolding(["10.20.0.0/16"], "10.20.3.4"), "10.20.0.0/16");
    assert.equal(managementHolding(["10.20.0.0/16"], "10.21.0.1"), undefined);
  });

  test("auto: the uplink's subnets and the host's own global addresses; never lo, link-local or a transit link", () => {
    const ip = JSON.stringify([
      { ifname: "lo", addr_info: [{ family: "inet", local: "127.0.0.1", prefixlen: 8, scope: "host" }] },
      {
        ifname: "eth0",
        addr_info: [
          { family: "inet", local: "192.168.100.10", prefixlen: 24, scope: "global" },
          { family: "inet6", local: "fe80::1", prefixlen: 64, scope: "link" },
        ],
      },
      { ifname: "mgmt1", addr_info: [{ family: "inet", local: "10.99.0.5", prefixlen: 16, scope: "global" }] },
      {
        ifname: "gh111111111111",
        ifalias: "mvpc:hv1:gw:vpc-111111111111",
        addr_info: [{ family: "inet", local: "169.254.1.1", prefixlen: 30, scope: "global" }],
      },
      { ifname: "eth9", addr_info: [{ family: "inet", local: "169.254.7.7", prefixlen: 16, scope: "link" }] },
    ]);
    assert.deepEqual(managementFromAddrs(ip, "eth0"), ["10.99.0.5/32", "192.168.100.0/24", "192.168.100.10/32"]);
  });
});

describe("VPC table", () => {
  test("the conntrack limit counts a VM's new flows out of the transit link, in a table a re-apply does not reset", () => {
    const text = vpcNft(vpc(), 8775, 53, 100);
    const [nat, limit] = text.split("table ip microvpc_gw_ctlimit {");
    // The counts live in their own table, never deleted: the NAT table is
    // replaced on every change of the VPC, and a set in it would forget them.
    assert.doesNotMatch(nat, /ct_per_vm/);
    assert.match(nat, /delete table ip microvpc_gw\n/);
    assert.doesNotMatch(text, /delete table ip microvpc_gw_ctlimit/);
    assert.match(limit, /set ct_per_vm \{ type ipv4_addr; size 65535; flags dynamic; \}/);
    // Before the NAT table's forward chain (-10): metadata and resolver flows are host conntrack entries too.
    assert.match(limit, /type filter hook forward priority -20; policy accept;/);
    assert.match(nat, /type filter hook forward priority -10; policy accept;/);
    // Each apply replaces only the chain's rule.
    assert.match(
      limit,
      /flush chain ip microvpc_gw_ctlimit forward\nadd rule ip microvpc_gw_ctlimit forward oifname "gv111111111111" ct state new add @ct_per_vm \{ ip saddr ct count over 100 \} counter reject/,
    );
    const off = vpcNft(vpc(), 8775, 53, 0);
    assert.match(off, /flush chain ip microvpc_gw_ctlimit forward\n?$/, "0: no limit, and a limit set before is removed");
    assert.doesNotMatch(off, /add @ct_per_vm/);
  });

  test("nft loads both tables (in a throwaway network namespace)", () => {
    if (spawnSync("unshare", ["-n", "true"]).status !== 0) return; // not root
    const r = spawnSync(
      "unshare",
      ["-n", "sh", "-c", "nft -f /dev/fd/3 3<<'A'\n" + hostNft(host()) + "A\nnft -f /dev/fd/3 3<<'B'\n" + vpcNft(vpc(), 8775, 53, 100) + "B\n"],
      { encoding: "utf8" },
    );
    assert.equal(r.status, 0, r.stderr);
  });
});

describe("IMDS hop limits", () => {
  test("VMs with the default hop limit do not change the host's table; another limit gets its own set, ahead of the default", () => {
    const one = hostNft(host());
    const withMore = { ...vpc(), hopLimits: new Map([["10.0.1.4", 1], ...Array.from({ length: 50 }, (_, i) => [`10.0.1.${10 + i}`, 1] as [string, number])]) };
    assert.equal(hostNft(host({ vpcs: [withMore] })), one, "50 more VMs at the default: the same table, nothing to apply");
    const three = hostNft(host({ vpcs: [{ ...vpc(), hopLimits: new Map([["10.0.1.4", 3]]) }] }));
    const out = /chain output \{[^}]*\}/.exec(three)![0];
    assert.match(three, /set imds_hop_3 \{ type ipv4_addr \. ipv4_addr; elements = \{ 169\.254\.\d+\.\d+ \. 10\.0\.1\.4 \}; \}/);
    assert.ok(
      out.indexOf("@imds_hop_3 ip ttl set 4 accept") > 0 && out.indexOf("@imds_hop_3") < out.indexOf("@imds_src ip ttl set 2"),
      `the VM's own limit, then accept, before the default:\n${out}`,
    );
  });
});
