// The gateway with real packets: NAT for private subnets, public egress,
// floating IPs and port forwards from an "internet" namespace, and the
// instance metadata service reached at 169.254.169.254 from inside VMs,
// including two VMs with the same address in two VPCs.
import assert from "node:assert/strict";
import { Code, type ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, test } from "vitest";
import { Direction, FirewallService, Protocol } from "../../gen/microvpc/v1/firewall_pb.js";
import { GatewayService, ImdsHttpTokens } from "../../gen/microvpc/v1/gateway_pb.js";
import { SubnetType } from "../../gen/microvpc/v1/subnet_pb.js";
import { grpcClient } from "../../services/common/client.js";
import { connectRedis, waitReady } from "../../services/common/redis.js";
import { PENDING_MS } from "../../services/common/pending.js";
import { GW_KEYS } from "../../services/gateway/schema.js";
import { rejectsWith } from "../lib/clients.js";
import { type Daemon } from "../lib/daemon.js";
import { Harness, type Vm } from "../lib/harness.js";
import { ON_CLUSTER } from "../lib/on-cluster.js";
import { httpGet, nsExec, startHttpServer, tcpProbe, waitFor } from "../lib/netns.js";

let h: Harness;
let gwd: Daemon;
let fwd: Daemon;
let gw: ReturnType<typeof grpcClient<typeof GatewayService>>;
let fw: ReturnType<typeof grpcClient<typeof FirewallService>>;
let inet: { ns: string; address: string };
let pub: Vm, priv: Vm, twinA: Vm, twinB: Vm;
let hostAddr: string;

async function eventually(probe: () => Promise<boolean>, want: boolean, what: string): Promise<void> {
  assert.ok(await waitFor(async () => (await probe()) === want, { timeoutMs: 12_000, intervalMs: 250 }), `${what}: expected ${want}`);
}

/** What the internet's whoami server says the VM's address is (null: unreachable). */
const whoami = (vm: Vm) => httpGet(vm.ns, `http://${inet.address}/`, 1500);

/** HTTP from a VM to the metadata service, with optional method and headers. */
async function imds(vm: Vm, path: string, o: { method?: string; headers?: Record<string, string> } = {}): Promise<{ status: number; body: string } | null> {
  const script = `
const [path, method, headers] = process.argv.slice(1);
const req = require("node:http").request({ host: "169.254.169.254", port: 80, path, method, headers: JSON.parse(headers), timeout: 3000 }, (res) => {
  let b = ""; res.setEncoding("utf8"); res.on("data", (d) => (b += d));
  res.on("end", () => { process.stdout.write(JSON.stringify({ status: res.statusCode, body: b })); process.exit(0); });
});
req.on("timeout", () => { req.destroy(); process.exit(2); });
req.on("error", () => process.exit(1));
req.end();`;
  const r = await nsExec(vm.ns, process.execPath, ["-e", script, path, o.method ?? "GET", JSON.stringify(o.headers ?? {})], {
    check: false,
    timeoutMs: 10_000,
  });
  if (r.code !== 0) return null;
  return JSON.parse(r.stdout);
}

beforeAll(async () => {
  h = await Harness.start({ hosts: 1 });
  const hv = h.hosts[0];
  hostAddr = hv.underlayAddress;
  inet = await h.internet();
  ({ fwd, gwd } = await h.hostServices(hv, { driftMs: 3000 }));
  gw = grpcClient(GatewayService, { address: gwd.address, timeoutMs: 20_000 });
  fw = grpcClient(FirewallService, { address: fwd.address, timeoutMs: 20_000 });

  const vpc = await h.vpc("blog", "10.0.0.0/16");
  const web = await h.subnet(vpc, "web", "10.0.1.0/24", SubnetType.PUBLIC);
  const db = await h.subnet(vpc, "db", "10.0.2.0/24", SubnetType.PRIVATE);
  pub = await h.vm(0, vpc, web, "pub");
  priv = await h.vm(0, vpc, db, "priv");
  const sg = (
    await fw.createSecurityGroup({
      vpc: vpc.id,
      name: "web",
      rules: [{ direction: Direction.INGRESS, protocol: Protocol.TCP, portFrom: 80, portTo: 80, peer: { case: "cidr", value: "0.0.0.0/0" } }],
    })
  ).securityGroup!.id;
  for (const vm of [pub, priv]) {
    await fw.bindNic({
      nicId: vm.nicId,
      vpc: vm.vpc.id,
      subnet: vm.subnet.id,
      address: vm.address,
      mac: vm.mac,
      hostInterface: vm.hostInterface,
      securityGroups: vm === pub ? [sg] : [],
    });
  }
  await startHttpServer(pub.ns, "web of pub", 80);
  await startHttpServer(pub.ns, "ssh-ish", 22);
  // Two VPCs with the same CIDR and the same VM address.
  const a = await h.vpc("twin-a", "10.9.0.0/16");
  const b = await h.vpc("twin-b", "10.9.0.0/16");
  twinA = await h.vm(0, a, await h.subnet(a, "s", "10.9.1.0/24", SubnetType.PUBLIC), "twina", { address: "10.9.1.10" });
  twinB = await h.vm(0, b, await h.subnet(b, "s", "10.9.1.0/24", SubnetType.PUBLIC), "twinb", { address: "10.9.1.10" });
  for (const [vm, id] of [
    [twinA, "i-twin-a"],
    [twinB, "i-twin-b"],
    [pub, "i-pub"],
  ] as const) {
    await gw.setInstanceMetadata({
      metadata: {
        instanceId: id,
        vpcId: vm.vpc.id,
        subnetId: vm.subnet.id,
        localIpv4: vm.address,
        mac: vm.mac,
        hostname: vm.name,
        userData: new TextEncoder().encode(`#cloud-config for ${id}`),
      },
    });
  }
});

afterAll(async () => {
  await gwd?.stop();
  await fwd?.stop();
  const left = await h?.close();
  assert.deepEqual(left ?? [], []);
});

describe("NAT", () => {
  test("public subnet: egress by default, the outside sees the hypervisor's address", async () => {
    await eventually(async () => (await whoami(pub)) === hostAddr, true, "pub reaches the internet as the host");
  });

  test("private subnet: no egress without a NAT gateway; with one, egress as its own address (not the host's); deleting it stops it", async () => {
    await eventually(async () => (await whoami(pub)) !== null, true, "the gateway is up");
    assert.equal(await whoami(priv), null, "no NAT gateway: no egress");
    const nat = (await gw.createNatGateway({ vpc: "blog", subnet: "web" })).natGateway!;
    const last = Number(/^192\.168\.100\.([0-9]+)$/.exec(nat.address)?.[1]);
    assert.ok(last >= 129 && last <= 190, `${nat.address}: an address of the floating pool`);
    await eventually(async () => (await whoami(priv)) === nat.address, true, "through the NAT gateway, seen as its address");
    // One host, no overlay: it holds the address itself.
    assert.equal((await gw.getNatGateway({ ref: nat.id })).natGateway!.holderHostId, h.hosts[0].id);
    await gw.deleteNatGateway({ ref: nat.id });
    await eventually(async () => (await whoami(priv)) === null, true, "NAT gateway deleted: no egress");
  });

  test("CreateNatGateway racing DeleteSubnet of its subnet, 10 times: never a NAT gateway left in a subnet that is gone", async () => {
    const vpc = await h.vpc("natrace", "10.77.0.0/16");
    const won = { nat: 0, delete: 0, halfway: 0 };
    for (let i = 0; i < 10; i++) {
      const s = await h.subnet(vpc, `r${i}`, `10.77.${i}.0/24`, SubnetType.PUBLIC);
      const [c, d] = await Promise.allSettled([gw.createNatGateway({ vpc: vpc.id, subnet: s.id }), h.ipam.subnet.deleteSubnet({ ref: s.id })]);
      // A create after the whole delete: NOT_FOUND; one that met it half-way: FAILED_PRECONDITION (on a cluster its hold found no subnet; on one server its read after the write did, and it took the gateway back).
      if (c.status === "rejected") {
        const code = (c.reason as ConnectError).code;
        assert.ok(code === Code.NotFound || code === Code.FailedPrecondition, `a create that lost: NOT_FOUND or FAILED_PRECONDITION, ${c.reason}`);
        if (code === Code.FailedPrecondition) won.halfway++;
      }
      if (d.status === "rejected") assert.equal(Code[(d.reason as ConnectError).code], Code[Code.FailedPrecondition], `a delete that lost: ${d.reason}`);
      const subnetLeft = await h.ipam.subnet.getSubnet({ ref: s.id }).then(
        () => true,
        () => false,
      );
      const nats = (await gw.listNatGateways({ vpc: vpc.id })).natGateways;
      if (!subnetLeft) {
        assert.deepEqual(nats, [], `round ${i}: the subnet is gone, and so is any NAT gateway in it`);
        won.delete++;
        continue;
      }
      assert.equal(d.status, "rejected", `round ${i}: the subnet stands, so its delete failed`);
      assert.deepEqual(
        nats.map((n) => n.subnetId),
        [s.id],
        `round ${i}: the subnet stands because its NAT gateway does`,
      );
      won.nat++;
      await gw.deleteNatGateway({ ref: nats[0].id });
      await h.ipam.subnet.deleteSubnet({ ref: s.id });
    }
    console.log(
      `# gateway: CreateNatGateway vs DeleteSubnet: the gateway won ${won.nat}, the delete ${won.delete} (${won.halfway} create(s) refused half-way: at the hold on a cluster, after the write on one server)`,
    );
    await h.ipam.vpc.deleteVpc({ ref: vpc.id });
  });

  test.skipIf(!ON_CLUSTER)(
    "a cluster: CreateNatGateway holds its subnet in the VPC's slot before its record; DeleteSubnet refuses while a hold names the subnet (a gateway: nat delete; a create under way: retry), sweeps a stopped create's hold once PENDING_MS old, and refuses a hold that does not read as one; a retry's replay gets its hold back",
    async () => {
      const vpc = await h.vpc("nathold", "10.78.0.0/16");
      const s = await h.subnet(vpc, "s", "10.78.1.0/24", SubnetType.PUBLIC);
      const t = await h.subnet(vpc, "t", "10.78.2.0/24", SubnetType.PUBLIC);
      const holds = GW_KEYS.cluster.natHolds!(vpc.id);
      const r = connectRedis({ url: h.redisUrl });
      /** A hold as HOLD_NAT writes it, `age` ms before now by the Redis server's clock. */
      const hold = (nat: string, subnet: string, age: number) =>
        r.eval(
          `local t = redis.call('TIME') redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({subnet = ARGV[2], ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[3])}))`,
          1,
          holds,
          nat,
          subnet,
          age,
        );
      try {
        await waitReady(r);
        const nat = (await gw.createNatGateway({ vpc: vpc.id, subnet: s.id, clientToken: "nathold-1" })).natGateway!;
        assert.equal((JSON.parse((await r.hget(holds, nat.id)) ?? "{}") as { subnet?: string }).subnet, s.id, "the gateway's hold names its subnet");
        await rejectsWith(
          h.ipam.subnet.deleteSubnet({ ref: s.id }),
          Code.FailedPrecondition,
          new RegExp(`NAT gateway ${nat.id} sits in it \\(microvpc nat delete\\)`),
        );
        // A hold lost (by hand): a retry with the same client token answers the same gateway and holds its subnet again.
        await r.hdel(holds, nat.id);
        assert.equal((await gw.createNatGateway({ vpc: vpc.id, subnet: s.id, clientToken: "nathold-1" })).natGateway!.id, nat.id);
        assert.equal(await r.hexists(holds, nat.id), 1, "the replay made sure of its hold");
        assert.deepEqual(
          (await gw.listNatGateways({ vpc: vpc.id })).natGateways.map((n) => n.id),
          [nat.id],
          "one gateway, no hold of a fresh id left",
        );
        assert.deepEqual(await r.hkeys(holds), [nat.id]);
        // What a create that stopped between its hold and its record leaves: young, it refuses (retry); PENDING_MS old by the server's clock, it is swept.
        await hold("nat-0000000000c1", t.id, 0);
        await rejectsWith(
          h.ipam.subnet.deleteSubnet({ ref: t.id }),
          Code.FailedPrecondition,
          /a NAT gateway is being created in it \(nat-0000000000c1\); retry/,
        );
        await hold("nat-0000000000c1", t.id, PENDING_MS + 1000);
        // A hold that does not read as one: refused, naming it, and the daemon answers on.
        await r.hset(holds, "junk", "{not json");
        await rejectsWith(h.ipam.subnet.deleteSubnet({ ref: t.id }), Code.FailedPrecondition, /"junk" does not read as a NAT gateway hold/);
        await r.hdel(holds, "junk");
        assert.equal((await h.ipam.subnet.deleteSubnet({ ref: t.id })).deleted, true, "the stopped create's hold, old, was swept");
        assert.deepEqual(await r.hkeys(holds), [nat.id]);
        // DeleteNatGateway takes the record, then its hold; DeleteSubnet then succeeds.
        await gw.deleteNatGateway({ ref: nat.id });
        assert.equal(await r.exists(holds), 0, "DeleteNatGateway removed its hold");
        assert.equal((await h.ipam.subnet.deleteSubnet({ ref: s.id })).deleted, true);
        // A subnet that is gone: the create's hold is refused, nothing is made.
        await rejectsWith(gw.createNatGateway({ vpc: vpc.id, subnet: s.id }), Code.NotFound);
        await h.ipam.vpc.deleteVpc({ ref: vpc.id });
      } finally {
        r.disconnect();
      }
    },
  );

  test("VMs with the same address in two VPCs both get out, each on its own NAT state", async () => {
    const [a, b] = await Promise.all([whoami(twinA), whoami(twinB)]);
    assert.equal(a, hostAddr);
    assert.equal(b, hostAddr);
  });
});

describe("floating IPs and port forwards", () => {
  test("nothing reaches a VM from outside without a floating IP or port forward", async () => {
    // Even a neighbour on the uplink that routes the VPC's range at the hypervisor gets nowhere.
    await nsExec(inet.ns, "ip", ["route", "replace", "10.0.0.0/16", "via", hostAddr]);
    try {
      assert.ok(!(await tcpProbe(inet.ns, pub.address, 80, 800)), "the private address is not reachable from outside");
      assert.ok(!(await tcpProbe(inet.ns, hostAddr, 8775, 800)), "nor is the metadata server");
    } finally {
      await nsExec(inet.ns, "ip", ["route", "del", "10.0.0.0/16"]);
    }
  });

  test("a floating IP: reachable on the ports its groups allow, and the VM's egress leaves as the floating IP", async () => {
    const fip = (await gw.allocateFloatingIp({})).floatingIp!;
    await gw.associateFloatingIp({ floatingIp: fip.id, vpc: "blog", privateAddress: pub.address });
    await eventually(() => tcpProbe(inet.ns, fip.address, 80, 800), true, "FIP:80 (allowed by the group)");
    assert.equal(await httpGet(inet.ns, `http://${fip.address}/`), "web of pub");
    assert.ok(!(await tcpProbe(inet.ns, fip.address, 22, 800)), "FIP:22 is not allowed by the group");
    await eventually(async () => (await whoami(pub)) === fip.address, true, "egress as the floating IP");
    await gw.disassociateFloatingIp({ floatingIp: fip.id });
    await eventually(() => tcpProbe(inet.ns, fip.address, 80, 800), false, "after disassociation");
    await gw.releaseFloatingIp({ floatingIp: fip.id });
  });

  test("a port forward: host:8080 → VM:80, still subject to the VM's groups", async () => {
    const pf = (await gw.createPortForward({ vpc: "blog", protocol: Protocol.TCP, outsidePort: 8080, privateAddress: pub.address, privatePort: 80 }))
      .portForward!;
    await eventually(async () => (await httpGet(inet.ns, `http://${hostAddr}:8080/`)) === "web of pub", true, "through the port forward");
    const pf22 = (await gw.createPortForward({ vpc: "blog", protocol: Protocol.TCP, outsidePort: 2222, privateAddress: pub.address, privatePort: 22 }))
      .portForward!;
    await new Promise((r) => setTimeout(r, 1500));
    assert.ok(!(await tcpProbe(inet.ns, hostAddr, 2222, 800)), "a forward to a port the groups close stays closed");
    await gw.deletePortForward({ ref: pf.id });
    await gw.deletePortForward({ ref: pf22.id });
    await eventually(() => tcpProbe(inet.ns, hostAddr, 8080, 800), false, "after deletion");
  });

  test("bad input: the right code and nothing applied", async () => {
    await rejectsWith(gw.allocateFloatingIp({ address: "10.0.0.1" }), Code.InvalidArgument, /outside the floating IP pool/);
    await rejectsWith(
      gw.createPortForward({ vpc: "blog", protocol: Protocol.TCP, outsidePort: 0, privateAddress: pub.address }),
      Code.InvalidArgument,
      /outside_port/,
    );
    await rejectsWith(
      gw.createPortForward({ vpc: "blog", protocol: Protocol.TCP, outsidePort: 70000, privateAddress: pub.address }),
      Code.InvalidArgument,
      /outside_port/,
    );
    await rejectsWith(
      gw.createPortForward({ vpc: "twin-a", protocol: Protocol.TCP, outsidePort: 9000, privateAddress: pub.address }),
      Code.FailedPrecondition,
      /no NIC has/,
    );
    await rejectsWith(gw.createNatGateway({ vpc: "blog", subnet: "db" }), Code.FailedPrecondition, /private/);
    assert.equal((await gw.listPortForwards({})).portForwards.length, 0);
  });
});

describe("instance metadata", () => {
  test("two VMs with the same address in two VPCs read two different instance-ids", async () => {
    await eventually(async () => (await imds(twinA, "/latest/meta-data/instance-id"))?.body === "i-twin-a", true, "twin A");
    assert.equal((await imds(twinB, "/latest/meta-data/instance-id"))?.body, "i-twin-b");
    assert.equal((await imds(twinA, "/latest/user-data"))?.body, "#cloud-config for i-twin-a");
    assert.equal((await imds(pub, "/latest/meta-data/local-ipv4"))?.body, pub.address);
  });

  test("tokens (IMDSv2): minted by PUT, required mode refuses tokenless reads, X-Forwarded-For refused", async () => {
    const tok = await imds(pub, "/latest/api/token", { method: "PUT", headers: { "X-aws-ec2-metadata-token-ttl-seconds": "60" } });
    assert.equal(tok?.status, 200);
    assert.ok(tok!.body.length > 10);
    const xff = await imds(pub, "/latest/api/token", {
      method: "PUT",
      headers: { "X-aws-ec2-metadata-token-ttl-seconds": "60", "X-Forwarded-For": "1.2.3.4" },
    });
    assert.equal(xff?.status, 403);
    await gw.setInstanceMetadata({
      metadata: {
        instanceId: "i-pub",
        vpcId: pub.vpc.id,
        subnetId: pub.subnet.id,
        localIpv4: pub.address,
        mac: pub.mac,
        hostname: "pub",
        options: { httpTokens: ImdsHttpTokens.REQUIRED },
      },
    });
    await eventually(async () => (await imds(pub, "/latest/meta-data/instance-id"))?.status === 401, true, "required mode");
    assert.equal((await imds(pub, "/latest/meta-data/instance-id", { headers: { "X-aws-ec2-metadata-token": tok!.body } }))?.body, "i-pub");
    // A token of one VM is worthless to another.
    const other = await imds(twinA, "/latest/meta-data/instance-id", { headers: { "X-aws-ec2-metadata-token": tok!.body } });
    assert.notEqual(other?.body, "i-pub");
  });

  test("a guest that ARPs for 169.254.169.254 (an on-link route) is answered too", async () => {
    await nsExec(twinB.ns, "ip", ["route", "replace", "169.254.169.254/32", "dev", "eth0"]);
    try {
      await nsExec(twinB.ns, "ip", ["neigh", "flush", "all"]);
      assert.equal((await imds(twinB, "/latest/meta-data/instance-id"))?.body, "i-twin-b");
      const neigh = (await nsExec(twinB.ns, "ip", ["neigh", "show", "169.254.169.254"])).stdout;
      assert.match(neigh, /lladdr/, "the bridge answered the ARP request");
    } finally {
      await nsExec(twinB.ns, "ip", ["route", "del", "169.254.169.254/32", "dev", "eth0"]);
    }
  });

  test("nothing in the request changes whose data is read; a VM without a record gets nothing", async () => {
    const r = await imds(twinB, "/latest/meta-data/instance-id", { headers: { Host: "169.254.169.254", "X-Forwarded-For": twinA.address } });
    assert.equal(r?.body, "i-twin-b");
    assert.equal((await imds(priv, "/latest/meta-data/instance-id"))?.status, 404, "no record for this VM");
  });

  test("token answers reach the VM with IP TTL 1 (hop limit): nothing behind a NAT inside the VM gets them; a VM given hop limit 3 gets 3", async () => {
    // Count, inside the VM, metadata packets arriving with TTL 1, with TTL 3, and with any other TTL.
    const ttls = async (vm: Vm) => {
      const rules = `add table ip ttlprobe
delete table ip ttlprobe
table ip ttlprobe {
  counter ttl1 { }
  counter ttl3 { }
  counter other { }
  chain input { type filter hook input priority 0; policy accept;
    ip saddr 169.254.169.254 ip ttl 1 counter name ttl1
    ip saddr 169.254.169.254 ip ttl 3 counter name ttl3
    ip saddr 169.254.169.254 ip ttl != 1 ip ttl != 3 counter name other
  }
}`;
      await nsExec(vm.ns, "nft", ["-f", "-"], { input: rules });
      const tok = await imds(vm, "/latest/api/token", { method: "PUT", headers: { "X-aws-ec2-metadata-token-ttl-seconds": "30" } });
      assert.equal(tok?.status, 200);
      const out = (await nsExec(vm.ns, "nft", ["-j", "list", "counters", "table", "ip", "ttlprobe"])).stdout;
      const c = Object.fromEntries(
        (JSON.parse(out).nftables as { counter?: { name: string; packets: number } }[])
          .filter((o) => o.counter)
          .map((o) => [o.counter!.name, o.counter!.packets]),
      );
      return { ttl1: c.ttl1 > 0, ttl3: c.ttl3 > 0, other: c.other };
    };
    assert.deepEqual(await ttls(twinA), { ttl1: true, ttl3: false, other: 0 }, "answers arrive with TTL 1, none with a larger TTL");
    // twinB has twinA's address in another VPC: its hop limit is its own.
    await gw.setInstanceMetadata({
      metadata: {
        instanceId: "i-twin-b",
        vpcId: twinB.vpc.id,
        subnetId: twinB.subnet.id,
        localIpv4: twinB.address,
        mac: twinB.mac,
        hostname: twinB.name,
        userData: new TextEncoder().encode("#cloud-config for i-twin-b"),
        options: { httpPutResponseHopLimit: 3 },
      },
    });
    await eventually(async () => (await ttls(twinB)).ttl3, true, "twinB's answers with TTL 3");
    assert.deepEqual(await ttls(twinB), { ttl1: false, ttl3: true, other: 0 }, "only TTL 3 for twinB");
    assert.deepEqual(await ttls(twinA), { ttl1: true, ttl3: false, other: 0 }, "twinA, same address in another VPC, keeps 1");
  });
});
