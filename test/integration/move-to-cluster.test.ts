// A deployment on one Redis moved to a Redis Cluster with `microvpcd
// move-to-cluster`, as an operator would: VMs, groups, ACLs, flow logs, a NAT
// gateway, a floating IP, a port forward, a peering, DNS, a VPN endpoint and
// client, the overlay's registry, all made through the real daemons on a
// redis-server; the daemons stopped; the move (refused first while they
// ran); the daemons started on the cluster. Every API then answers what it
// answered before, the VMs keep their traffic rules (allowed flows, denied
// ones denied), a retried create with a client token finds what it made,
// and a new VM gets an address no other holds. The plan's rules, one by
// one, are in test/unit/move-plan.test.ts.
import assert from "node:assert/strict";
import { afterAll, beforeAll, describe, test } from "vitest";
import { Code } from "@connectrpc/connect";
import { DnsService } from "../../gen/microvpc/v1/dns_pb.js";
import { AclAction, Direction, FirewallService, Protocol } from "../../gen/microvpc/v1/firewall_pb.js";
import { GatewayService } from "../../gen/microvpc/v1/gateway_pb.js";
import { SubnetType } from "../../gen/microvpc/v1/subnet_pb.js";
import { ConnectivityResult, VmKind, VmService } from "../../gen/microvpc/v1/vm_pb.js";
import { VpnService } from "../../gen/microvpc/v1/vpn_pb.js";
import { NetAgentService } from "../../gen/microvpc/v1/netagent_pb.js";
import { grpcClient } from "../../services/common/client.js";
import { connectRedis, waitReady } from "../../services/common/redis.js";
import { GW_KEYS } from "../../services/gateway/schema.js";
import { rejectsWith } from "../lib/clients.js";
import { runMicrovpcd, type Daemon } from "../lib/daemon.js";
import { Harness } from "../lib/harness.js";
import { waitFor } from "../lib/netns.js";
import { startRedisCluster, keysLike } from "../lib/redis.js";

/** `microvpcd move-to-cluster`: its exit code and output. */
const move = (args: string[]) => runMicrovpcd(["move-to-cluster", ...args]);

let h: Harness;
let daemons: { fwd: Daemon; gwd: Daemon; vmmd?: Daemon };
const clients = () => {
  const t = { timeoutMs: 30_000 };
  return {
    vmm: grpcClient(VmService, { address: daemons.vmmd!.address, ...t }),
    fw: grpcClient(FirewallService, { address: daemons.fwd.address, ...t }),
    gw: grpcClient(GatewayService, { address: daemons.gwd.address, ...t }),
    dns: grpcClient(DnsService, { address: h.ipamDaemon.address, ...t }),
    vpn: grpcClient(VpnService, { address: h.hosts[1].daemon.address, ...t }),
    agent: grpcClient(NetAgentService, { address: h.hosts[0].daemon.address, ...t }),
  };
};
const ids: Record<string, string> = {};

/** Plain JSON of a message (bigints and bytes as strings), so that views compare with deepEqual. */
const plain = (x: unknown): unknown =>
  JSON.parse(JSON.stringify(x, (_k, v: unknown) => (typeof v === "bigint" ? String(v) : v instanceof Uint8Array ? Buffer.from(v).toString("base64") : v)));

/** What the APIs say about everything the workload made. */
async function views() {
  const c = clients();
  const page = { pageSize: 1000 };
  const vpcs = (await h.ipam.vpc.listVpcs(page)).vpcs;
  const subnets = (await h.ipam.subnet.listSubnets({ ...page })).subnets;
  const allocations = await Promise.all(subnets.map(async (s) => (await h.ipam.ipam.listAllocations({ subnetId: s.id, ...page })).allocations));
  const groups = (await c.fw.listSecurityGroups({ vpc: ids.app })).securityGroups;
  const acls = (await c.fw.listNetworkAcls({ vpc: ids.app })).networkAcls;
  const flowLogs = (await c.fw.listFlowLogConfigs({})).configs;
  const nats = (await c.gw.listNatGateways({ vpc: ids.app })).natGateways;
  const fips = (await c.gw.listFloatingIps({})).floatingIps;
  const peerings = (await h.ipam.peering.listPeerings({})).peerings;
  const vms = (await c.vmm.listVms({})).vms;
  const vpnClients = (await c.vpn.listVpnClients({ vpc: "app" })).clients;
  // Each again by its id alone: what a cluster finds through its catalogs.
  const byId = {
    vpcs: await Promise.all(vpcs.map(async (x) => (await h.ipam.vpc.getVpc({ ref: x.id })).vpc)),
    subnets: await Promise.all(subnets.map(async (x) => (await h.ipam.subnet.getSubnet({ ref: x.id })).subnet)),
    groups: await Promise.all(groups.map(async (x) => (await c.fw.getSecurityGroup({ ref: x.id })).securityGroup)),
    acls: await Promise.all(acls.map(async (x) => (await c.fw.getNetworkAcl({ ref: x.id })).networkAcl)),
    flowLogs: await Promise.all(flowLogs.map(async (x) => (await c.fw.getFlowLogConfig({ id: x.id })).config)),
    nats: await Promise.all(nats.map(async (x) => (await c.gw.getNatGateway({ ref: x.id })).natGateway)),
    fips: await Promise.all(fips.map(async (x) => (await c.gw.getFloatingIp({ ref: x.id })).floatingIp)),
    peerings: await Promise.all(peerings.map(async (x) => (await h.ipam.peering.getPeering({ ref: x.id })).peering)),
    vms: await Promise.all(vms.map(async (x) => (await c.vmm.getVm({ ref: x.id })).vm)),
    vpnClients: await Promise.all(vpnClients.map(async (x) => (await c.vpn.getVpnClient({ client: x.id })).client)),
  };
  return plain({
    byId,
    vpcs,
    subnets,
    allocations,
    groups,
    acls,
    flowLogs,
    bindings: (await c.fw.listNicBindings({ ...page })).bindings,
    nats,
    fips,
    pfs: (await c.gw.listPortForwards({})).portForwards,
    peerings,
    dns: (await c.dns.listDnsRecords({ vpc: "app", ...page })).records,
    dnsConfig: await c.dns.getDnsConfig({ vpc: "app" }),
    vms,
    nics: (await c.agent.listNics({ ...page })).nics,
    vpn: await c.vpn.getVpnEndpoint({ vpc: "app" }),
    vpnClients,
    hosts: (await c.agent.listHosts({})).hosts.map((x) => ({ id: x.id, publicKey: x.publicKey, vpcIds: x.vpcIds })),
  });
}

beforeAll(async () => {
  h = await Harness.start({ hosts: 2, overlay: true, failClosed: true, cluster: false });
  daemons = await h.hostServices(0, { vmm: true, driftMs: 3000 });
}, 120_000);

afterAll(async () => {
  for (const d of [daemons?.vmmd, daemons?.gwd, daemons?.fwd]) await d?.stop().catch(() => undefined);
  const left = await h?.close();
  assert.deepEqual(left ?? [], []);
});

describe("microvpcd move-to-cluster", () => {
  test("a running deployment moves from one Redis to a cluster: every API answers as before, the VMs keep their rules, tokens and addresses stay taken", async () => {
    const { fw, gw, vmm, vpn, dns } = clients();
    // The workload, on one Redis.
    const app = (await h.ipam.vpc.createVpc({ name: "app", cidr: "10.0.0.0/16", clientToken: "t-app" })).vpc!;
    ids.app = app.id;
    const web = (await h.ipam.subnet.createSubnet({ vpc: app.id, name: "web", cidr: "10.0.1.0/24", type: SubnetType.PUBLIC, clientToken: "t-web" })).subnet!;
    await h.ipam.subnet.createSubnet({ vpc: app.id, name: "db", cidr: "10.0.2.0/24" });
    const other = (await h.ipam.vpc.createVpc({ name: "other", cidr: "10.1.0.0/16" })).vpc!;
    await h.ipam.peering.createPeering({ name: "app-other", vpc1: app.id, vpc2: other.id, clientToken: "t-pcx" });
    const sgWeb = (
      await fw.createSecurityGroup({
        vpc: app.id,
        name: "web",
        clientToken: "t-sg",
        rules: [
          { direction: Direction.INGRESS, protocol: Protocol.TCP, portFrom: 80, portTo: 80, peer: { case: "cidr", value: "10.0.0.0/16" } },
          { direction: Direction.INGRESS, protocol: Protocol.ICMP, peer: { case: "cidr", value: "10.0.0.0/16" } },
        ],
      })
    ).securityGroup!;
    await fw.createSecurityGroup({
      vpc: app.id,
      name: "db",
      rules: [{ direction: Direction.INGRESS, protocol: Protocol.TCP, portFrom: 5432, portTo: 5432, peer: { case: "securityGroupId", value: sgWeb.id } }],
    });
    const acl = (
      await fw.createNetworkAcl({
        vpc: app.id,
        name: "open",
        entries: [
          { ruleNumber: 100, direction: Direction.INGRESS, action: AclAction.ALLOW, protocol: Protocol.ALL, cidr: "0.0.0.0/0" },
          { ruleNumber: 100, direction: Direction.EGRESS, action: AclAction.ALLOW, protocol: Protocol.ALL, cidr: "0.0.0.0/0" },
        ],
      })
    ).networkAcl!;
    await fw.associateNetworkAcl({ networkAcl: acl.id, subnet: web.id });
    await fw.createFlowLogConfig({ resourceId: web.id, sampleRate: 0.5 });
    await dns.updateDnsConfig({ vpc: "app", forwarders: { addresses: ["192.168.100.200"] } });
    const a = (await vmm.createVm({ name: "a", vpc: "app", subnet: "web", securityGroups: ["web"], kind: VmKind.NETNS })).vm!;
    const b = (await vmm.createVm({ name: "b", vpc: "app", subnet: "web", securityGroups: ["web"], kind: VmKind.NETNS })).vm!;
    const nat = (await gw.createNatGateway({ vpc: app.id, subnet: web.id, clientToken: "t-nat" })).natGateway!;
    const fip = (await gw.allocateFloatingIp({})).floatingIp!;
    await gw.associateFloatingIp({ floatingIp: fip.id, vpc: app.id, privateAddress: a.nics[0].guest!.address });
    await gw.createPortForward({
      vpc: app.id,
      protocol: Protocol.TCP,
      outsidePort: 8080,
      privateAddress: b.nics[0].guest!.address,
      privatePort: 80,
      clientToken: "t-pf",
    });
    await vpn.setVpnEndpoint({ vpc: "app", hostId: h.hosts[1].id, publicAddress: h.hosts[1].underlayAddress, listenPort: 51820, clientCidr: "10.0.250.0/24" });
    await vpn.createVpnClient({ vpc: "app", name: "laptop", publicKey: "L".repeat(42) + "A=", securityGroups: ["web"] });
    // The endpoint's host has made its interface (the endpoint then shows its public key).
    assert.ok(
      await waitFor(async () => (await vpn.getVpnEndpoint({ vpc: "app" })).endpoint?.publicKey !== "", { timeoutMs: 20_000 }),
      "the VPN endpoint's host applies it",
    );
    const before = await views();
    assert.equal((before as { vms: unknown[] }).vms.length, 2);

    // Refused while the daemons run: a write during the copy would be lost.
    const cluster = await startRedisCluster();
    const refused = await move(["--from", h.redis.url, "--to", cluster.url]);
    assert.equal(refused.code, 2, refused.out);
    assert.match(refused.out, /other client\(s\) are connected to the source .* stop every microvpc daemon first/s);
    const on = connectRedis({ url: cluster.url });
    await waitReady(on);
    try {
      assert.deepEqual(await keysLike(on, "mvpc*"), [], "refused: nothing written");

      for (const d of [daemons.vmmd!, daemons.gwd, daemons.fwd]) await d.stop();
      let copied = 0;
      await h.moveToCluster(async (from, to) => {
        const dry = await move(["--from", from, "--to", to, "--dry-run"]);
        assert.equal(dry.code, 0, dry.out);
        assert.match(dry.out, new RegExp(`copy mvpc:vpc:${app.id} → mvpc:\\{${app.id}\\}:vpc`));
        assert.deepEqual(await keysLike(on, "mvpc*"), [], "a dry run writes nothing");
        const r = await move(["--from", from, "--to", to]);
        assert.equal(r.code, 0, r.out);
        copied = Number(/wrote (\d+) keys/.exec(r.out)?.[1]);
        const again = await move(["--from", from, "--to", to]);
        assert.equal(again.code, 2, "a second move into the same cluster is refused");
        assert.match(again.out, /already holds microvpc keys/);
      }, cluster);
      assert.ok(copied > 50, `keys written: ${copied}`);

      // Nothing on the cluster under a single Redis's name, but the keys both layouts share.
      const shared = /^mvpc:(subnet:subnet-[0-9a-f]{12}|subnets|events|vm:hosts|gw:mdhosts|fw:nic:nic-[0-9a-f]{12}|fw:nics|fw:flowlogs)$/;
      const untagged = (await keysLike(on, "mvpc*")).filter((k) => !/^mvpc(-md)?:\{[^{}]+\}:/.test(k) && !shared.test(k));
      assert.deepEqual(untagged, [], "every other key is under a hash tag");

      daemons = await h.hostServices(0, { vmm: true, driftMs: 3000 });
      const c = clients();
      // A restarted netagent publishes its host record at once, and again with the VPCs it serves once its
      // first pass has read them (overlay/sync.ts, noteVpcs): ListHosts may show none for that moment.
      let now = await views();
      for (
        const until = Date.now() + 15_000;
        JSON.stringify((now as { hosts: unknown }).hosts) !== JSON.stringify((before as { hosts: unknown }).hosts) && Date.now() < until;
      ) {
        await new Promise((r) => setTimeout(r, 250));
        now = await views();
      }
      assert.deepEqual(now, before, "every API answers what it answered on one Redis");
      // The VMs' rules hold on the cluster: ICMP and :80 from the group's range allowed, :22 denied.
      const icmp = await c.vmm.testConnectivity({ source: "a", vpc: "app", target: "b", protocol: Protocol.ICMP });
      assert.equal(icmp.result, ConnectivityResult.REACHABLE, "a → b allowed by the web group");
      const ssh = await c.vmm.testConnectivity({ source: "a", vpc: "app", target: "b", port: 22, protocol: Protocol.TCP, timeoutMs: 800 });
      assert.equal(ssh.result, ConnectivityResult.TIMEOUT, "a → b:22 dropped by the firewall");
      // Client tokens moved with their records: a retry finds what it made.
      const vpcAgain = await h.ipam.vpc.createVpc({ name: "app", cidr: "10.0.0.0/16", clientToken: "t-app" });
      assert.equal(vpcAgain.vpc!.id, app.id);
      const sgAgain = await c.fw.createSecurityGroup({ vpc: app.id, name: "web", clientToken: "t-sg" });
      assert.equal(sgAgain.securityGroup!.id, sgWeb.id);
      const snAgain = await h.ipam.subnet.createSubnet({ vpc: app.id, name: "web", cidr: "10.0.1.0/24", type: SubnetType.PUBLIC, clientToken: "t-web" });
      assert.equal(snAgain.subnet!.id, web.id);
      // A new VM gets an address no other holds, and is reachable under the same rules.
      const cvm = (await c.vmm.createVm({ name: "c", vpc: "app", subnet: "web", securityGroups: ["web"], kind: VmKind.NETNS })).vm!;
      const taken = [a, b].map((v) => v.nics[0].guest!.address);
      assert.ok(!taken.includes(cvm.nics[0].guest!.address), `c got ${cvm.nics[0].guest!.address}, not one of ${taken.join(", ")}`);
      const toC = await c.vmm.testConnectivity({ source: "a", vpc: "app", target: "c", protocol: Protocol.ICMP });
      assert.equal(toC.result, ConnectivityResult.REACHABLE, "a → c (made on the cluster)");
      await c.vmm.deleteVm({ ref: cvm.id });
      // The NAT gateway holds its subnet in the VPC's slot, as one made on the cluster does: a retry replays it, and its subnet, once nothing else holds it, is not deleted under it.
      assert.deepEqual(JSON.parse((await on.hget(GW_KEYS.cluster.natHolds!(app.id), nat.id)) ?? "{}").subnet, web.id, "the move built the NAT gateway's hold");
      assert.equal((await c.gw.createNatGateway({ vpc: app.id, subnet: web.id, clientToken: "t-nat" })).natGateway!.id, nat.id);
      for (const v of [a, b]) await c.vmm.deleteVm({ ref: v.id });
      await c.fw.disassociateNetworkAcl({ subnet: web.id });
      await rejectsWith(h.ipam.subnet.deleteSubnet({ ref: web.id }), Code.FailedPrecondition, new RegExp(`NAT gateway ${nat.id} sits in it`));
      await c.gw.deleteNatGateway({ ref: nat.id });
      assert.equal(await on.hexists(GW_KEYS.cluster.natHolds!(app.id), nat.id), 0, "DeleteNatGateway removed its hold");
    } finally {
      on.disconnect();
    }
  }, 300_000);
});
