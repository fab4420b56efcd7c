// One trust boundary, with real packets:
//   * VMs with public egress (masquerade) or a floating IP reach the
//     internet but nothing of the management network: not the hypervisor's
//     own underlay address, not another hypervisor's ("redis" and a daemon's
//     gRPC port listen on both), while the internet stays reachable;
//   * a VPC's DNS forwarder inside the management network is refused by the
//     API (the ipam daemon's --management-cidrs) and, written around the API,
//     never used by the resolver;
//   * a VPC namespace made with no firewall running forwards nothing (fail
//     closed), and forwards once the firewall applies a policy allowing it;
//     the firewall is not ready while bridge-nf-call-iptables is 0 there.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";
import { Code } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, test } from "vitest";
import { Health, HealthCheckResponse_ServingStatus } from "../../gen/grpc/health/v1/health_pb.js";
import { DnsService } from "../../gen/microvpc/v1/dns_pb.js";
import { Direction, FirewallHealth, FirewallService, Protocol } from "../../gen/microvpc/v1/firewall_pb.js";
import { GatewayService } from "../../gen/microvpc/v1/gateway_pb.js";
import { SubnetType } from "../../gen/microvpc/v1/subnet_pb.js";
import { grpcClient } from "../../services/common/client.js";
import { DnsStore } from "../../services/dns/store.js";
import { rejectsWith } from "../lib/clients.js";
import type { Daemon } from "../lib/daemon.js";
import { bindRequest, Harness, MANAGEMENT_CIDRS, type Vm } from "../lib/harness.js";
import { canPing, httpGet, nsExec, startTcpServer, tcpProbe, tempDir, trackChild, waitFor } from "../lib/netns.js";

let h: Harness;
let gwd: Daemon;
let fwd: Daemon;
let inet: { ns: string; address: string };
let pub: Vm, fipVm: Vm, natVm: Vm;

const whoami = (vm: Vm) => httpGet(vm.ns, `http://${inet.address}/`, 1500);

/** A UDP listener that appends one line per datagram to `file` (a fake DNS upstream). */
const UDP_LOG = `
const [port, file] = process.argv.slice(1);
const s = require("node:dgram").createSocket("udp4");
s.on("message", (b, r) => require("node:fs").appendFileSync(file, r.address + "\\n"));
s.bind(Number(port), "0.0.0.0");`;

/** One UDP A query with dns-packet from inside a VM: the addresses answered, or the rcode, or "timeout". */
const QUERY = `
const p = require(${JSON.stringify(createRequire(import.meta.url).resolve("dns-packet"))});
const [server, name] = process.argv.slice(1);
const s = require("node:dgram").createSocket("udp4");
s.on("message", (b) => { const r = p.decode(b); const a = r.answers.filter((x) => x.type === "A").map((x) => x.data); process.stdout.write(a.length ? a.join(",") : r.rcode); process.exit(0); });
setTimeout(() => { process.stdout.write("timeout"); process.exit(0); }, 2500);
s.send(p.encode({ type: "query", id: 7, flags: p.RECURSION_DESIRED, questions: [{ type: "A", name, class: "IN" }] }), 53, server);
`;

beforeAll(async () => {
  // Two hypervisors; the agents fail closed (no --open-until-firewall), as in production.
  h = await Harness.start({ hosts: 2, failClosed: true, ipamArgs: ["--management-cidrs", MANAGEMENT_CIDRS] });
  inet = await h.internet();
  ({ fwd, gwd } = await h.hostServices(0));
  const fw = grpcClient(FirewallService, { address: fwd.address, timeoutMs: 20_000 });
  const vpc = await h.vpc("mgmt", "10.40.0.0/16");
  const web = await h.subnet(vpc, "web", "10.40.1.0/24", SubnetType.PUBLIC);
  const db = await h.subnet(vpc, "db", "10.40.2.0/24", SubnetType.PRIVATE);
  pub = await h.vm(0, vpc, web, "mpub");
  fipVm = await h.vm(0, vpc, web, "mfip");
  natVm = await h.vm(0, vpc, db, "mnat");
  for (const vm of [pub, fipVm, natVm]) {
    await fw.bindNic(bindRequest(vm, []));
  }
  const gw = grpcClient(GatewayService, { address: gwd.address, timeoutMs: 20_000 });
  const fip = (await gw.allocateFloatingIp({})).floatingIp!;
  await gw.associateFloatingIp({ floatingIp: fip.id, vpc: "mgmt", privateAddress: fipVm.address });
  await gw.createNatGateway({ vpc: "mgmt", subnet: "web" });
  // "Redis" and a daemon's gRPC port on both hypervisors' namespaces (every address, the underlay's included).
  for (const hv of h.hosts) {
    await startTcpServer(hv.ns, 6379, "redis");
    await startTcpServer(hv.ns, 7401, "ipam");
  }
});

afterAll(async () => {
  await gwd?.stop();
  await fwd?.stop();
  const left = await h?.close();
  assert.deepEqual(left ?? [], []);
});

describe("the management network", () => {
  test("public, floating-IP and NAT'd VMs reach the internet, but no hypervisor's Redis or gRPC port", async () => {
    const [hv0, hv1] = h.hosts;
    for (const vm of [pub, fipVm, natVm]) {
      assert.ok(await waitFor(async () => (await whoami(vm)) !== null, { timeoutMs: 15_000, intervalMs: 250 }), `${vm.name} reaches the internet`);
    }
    // The listeners are there: the internet (not management) reaches them.
    assert.ok(await tcpProbe(inet.ns, hv1.underlayAddress, 6379), "control: hv1's redis port answers on the underlay");
    assert.ok(await tcpProbe(inet.ns, hv0.underlayAddress, 7401), "control: hv0's gRPC port answers on the underlay");
    for (const vm of [pub, fipVm, natVm]) {
      for (const [addr, port] of [
        [hv0.underlayAddress, 6379],
        [hv0.underlayAddress, 7401],
        [hv1.underlayAddress, 6379],
        [hv1.underlayAddress, 7401],
      ] as const) {
        assert.equal(await tcpProbe(vm.ns, addr, port), false, `${vm.name} → ${addr}:${port} is management`);
      }
      // In the same breath, the internet is still there.
      assert.notEqual(await whoami(vm), null, `${vm.name} still reaches the internet`);
    }
    // The gateway's rule is what dropped them (counters restart when the gateway
    // replaces its table, so one more attempt right before reading).
    assert.equal(await tcpProbe(pub.ns, hv1.underlayAddress, 6379, 500), false);
    const rules = (await nsExec(hv0.ns, "nft", ["list", "chain", "ip", "microvpc_gw", "forward"])).stdout;
    const dropped = /ip daddr @management ip daddr != @pool ct direction original counter packets (\d+)/.exec(rules);
    assert.ok(Number(dropped?.[1] ?? 0) > 0, `the forward drop counted the attempts:\n${rules}`);
  });

  test("a VPC's DNS forwarder inside the management network: refused by the API, never used by the resolver", async () => {
    const dns = grpcClient(DnsService, { address: h.ipamDaemon.address, timeoutMs: 20_000 });
    const hv1 = h.hosts[1];
    await rejectsWith(
      dns.updateDnsConfig({ vpc: "mgmt", forwarders: { addresses: [`${hv1.underlayAddress}:5353`] } }),
      Code.InvalidArgument,
      /management network \(192\.168\.100\.0\/25\)/,
    );
    // Fake upstreams: one on a management address, one on the internet.
    const dir = tempDir("mgmt-dns");
    const logs = { mgmt: join(dir, "mgmt.log"), inet: join(dir, "inet.log") };
    trackChild(spawn("ip", ["netns", "exec", hv1.ns, process.execPath, "-e", UDP_LOG, "5353", logs.mgmt], { stdio: "ignore" }));
    trackChild(spawn("ip", ["netns", "exec", inet.ns, process.execPath, "-e", UDP_LOG, "5353", logs.inet], { stdio: "ignore" }));
    const seen = (f: string) => {
      try {
        return readFileSync(f, "utf8").split("\n").filter(Boolean).length;
      } catch {
        return 0;
      }
    };
    const ask = async () => (await nsExec(pub.ns, process.execPath, ["-e", QUERY, "10.40.0.2", "example.com"], { check: false, timeoutMs: 10_000 })).stdout;
    // Written around the API (an older config, another ipam without the flag).
    // First a forwarder on the internet: it gets the query (and answers
    // nothing: SERVFAIL). Then one on a management address: the resolver
    // leaves it out, so with none left the answer turns REFUSED, and the
    // management address never sees a packet.
    const redis = await h.connectReady();
    try {
      await new DnsStore(redis).updateConfig(pub.vpc.id, { forwarders: [`${inet.address}:5353`] });
      assert.ok(await waitFor(async () => (await ask(), seen(logs.inet) > 0), { timeoutMs: 15_000, intervalMs: 500 }), "the internet forwarder gets the query");
      assert.equal(await ask(), "SERVFAIL");
      await new DnsStore(redis).updateConfig(pub.vpc.id, { forwarders: [`${hv1.underlayAddress}:5353`] });
      assert.ok(await waitFor(async () => (await ask()) === "REFUSED", { timeoutMs: 15_000, intervalMs: 500 }), "no usable forwarder: REFUSED");
      for (let i = 0; i < 3; i++) assert.equal(await ask(), "REFUSED");
      assert.equal(seen(logs.mgmt), 0, "nothing was sent to the management address");
    } finally {
      redis.disconnect();
    }
    // The defaults are the operator's: a management address is accepted there.
    await dns.updateDnsConfig({ vpc: "", forwarders: { addresses: [hv1.underlayAddress] } });
    await dns.updateDnsConfig({ vpc: "", forwarders: { addresses: [] } });
  });
});

describe("fail closed", () => {
  test("a VPC namespace made with no firewall forwards nothing; the firewall's policy opens it; bridge-nf-call-iptables 0 is not ready", async () => {
    const hv1 = h.hosts[1];
    const vpc = await h.vpc("closed", "10.41.0.0/16");
    const s1 = await h.subnet(vpc, "a", "10.41.1.0/24");
    const s2 = await h.subnet(vpc, "b", "10.41.2.0/24");
    const a = await h.vm(1, vpc, s1, "ca");
    const b = await h.vm(1, vpc, s1, "cb");
    const c = await h.vm(1, vpc, s2, "cc");
    const ns = hv1.vpcNamespace(vpc.id);
    const tables = (await nsExec(ns, "nft", ["list", "tables"])).stdout;
    assert.match(tables, /table inet microvpc/);
    assert.match(tables, /table bridge microvpc/);
    assert.equal(await canPing(a.ns, b.address, { count: 2, deadlineS: 3 }), false, "same subnet, bridged: nothing");
    assert.equal(await canPing(a.ns, c.address, { count: 2, deadlineS: 3 }), false, "another subnet, routed: nothing");

    const fwd1 = await h.firewall(hv1, { driftMs: 2000 });
    try {
      const fw = grpcClient(FirewallService, { address: fwd1.address, timeoutMs: 20_000 });
      const sg = (
        await fw.createSecurityGroup({
          vpc: vpc.id,
          name: "icmp",
          rules: [{ direction: Direction.INGRESS, protocol: Protocol.ICMP, peer: { case: "cidr", value: "10.41.0.0/16" } }],
        })
      ).securityGroup!.id;
      for (const vm of [a, b, c]) {
        await fw.bindNic(bindRequest(vm, [sg]));
      }
      const opens = (to: Vm) => waitFor(() => canPing(a.ns, to.address, { count: 1, deadlineS: 1 }), { timeoutMs: 15_000, intervalMs: 300 });
      assert.ok(await opens(b), "bridged: forwards once the firewall applied");
      assert.ok(await opens(c), "routed: forwards once the firewall applied");

      const health = grpcClient(Health, { address: fwd1.address, timeoutMs: 10_000 });
      const status = async () => (await health.check({ service: "" })).status;
      // Health answers are shared for up to 1 s (one probe for every caller), so a change shows within ~1 s.
      const becomes = (want: HealthCheckResponse_ServingStatus) => waitFor(async () => (await status()) === want, { timeoutMs: 5_000, intervalMs: 200 });
      assert.equal(await status(), HealthCheckResponse_ServingStatus.SERVING);
      await nsExec(ns, "sysctl", ["-q", "-w", "net.bridge.bridge-nf-call-iptables=0"]);
      try {
        assert.ok(await becomes(HealthCheckResponse_ServingStatus.NOT_SERVING), "bridged traffic bypasses nft: not ready");
        const st = await fw.getFirewallStatus({});
        assert.equal(st.health, FirewallHealth.DEGRADED);
        assert.match(st.lastError, new RegExp(`${ns}: net\\.bridge\\.bridge-nf-call-iptables is 0`));
      } finally {
        await nsExec(ns, "sysctl", ["-q", "-w", "net.bridge.bridge-nf-call-iptables=1"]);
      }
      assert.ok(await becomes(HealthCheckResponse_ServingStatus.SERVING), "back to 1: ready");
    } finally {
      await fwd1.stop();
    }
  });
});
