// Per-host Redis ACL users (docs/redis-acl.md) on a real redis-server whose
// users are exactly what `microvpcd redis-acl` prints: ipam runs as
// microvpc-control, host A's netagent, firewall, gateway (and its metadata
// child) and vmm as microvpc-host-<A>, host B's netagent as
// microvpc-host-<B>. The normal flow converges under these users (a VPC, a
// subnet, NICs and a vmm VM on A, firewall applied, nothing refused in any
// daemon's log), and with A's credentials Redis refuses — NOPERM — every
// write to host B's records, IPAM, security groups, NAT, tokens, and every
// administrative command; with B's, every write to A's VM records and
// leases, and a name-index entry B forges does not make A's vmm act on
// anything; A keeps working afterwards. Instance metadata (user-data) is
// A's alone: B's user can neither read nor write it, while A's metadata
// server serves A's VM. A VPN endpoint on A runs as A's user, which may
// write only A's own VPN keys: no client, no endpoint, no reservation.
import assert from "node:assert/strict";
import { readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { create, toBinary } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, test } from "vitest";
import { Health, HealthCheckResponse_ServingStatus } from "../../gen/grpc/health/v1/health_pb.js";
import { Direction, FirewallHealth, FirewallService, Protocol } from "../../gen/microvpc/v1/firewall_pb.js";
import { ResourceState } from "../../gen/microvpc/v1/common_pb.js";
import { GatewayService, InstanceMetadataSchema } from "../../gen/microvpc/v1/gateway_pb.js";
import { SubnetType, type Subnet } from "../../gen/microvpc/v1/subnet_pb.js";
import { VmKind, VmService, VmState } from "../../gen/microvpc/v1/vm_pb.js";
import { VpnService } from "../../gen/microvpc/v1/vpn_pb.js";
import type { Vpc } from "../../gen/microvpc/v1/vpc_pb.js";
import { grpcClient } from "../../services/common/client.js";
import { CONTROL_USER, hostUser } from "../../services/common/redis-acl.js";
import * as V from "../../services/common/validate.js";
import { MetadataStore } from "../../services/gateway/metadata-store.js";
import { interfacesIn } from "../../services/netagent/overlay/wg.js";
import { VpnStore } from "../../services/netagent/vpn/store.js";
import { VmStore, type VmRec } from "../../services/vmm/store.js";
import { rejectsWith } from "../lib/clients.js";
import { startDaemon, type Daemon } from "../lib/daemon.js";
import { FLOATING_POOL, Harness, type Hypervisor, type Vm } from "../lib/harness.js";
import { httpGet, nsExec, onCleanup, ping, tempDir, trackChild, waitFor } from "../lib/netns.js";
import { vmRecord } from "../lib/vmm-fakes.js";

let h: Harness;
let A: Hypervisor, B: Hypervisor;
let fwd: Daemon, gwd: Daemon, vmmd: Daemon, ctlFwd: Daemon, ctlGwd: Daemon;
let vpc: Vpc, sn: Subnet;
let a: Vm, b: Vm;
/** Connections as host A's user and as Redis's default (admin) user. */
let asA: Redis, admin: Redis;

beforeAll(async () => {
  h = await Harness.start({ hosts: 2, redisAcl: true, overlay: true, agentArgs: ["--reconcile-interval-ms", "2000"] });
  [A, B] = h.hosts;
  ({ fwd, gwd, vmmd } = (await h.hostServices(A, { vmm: true, driftMs: 3000, vmmEnv: { MICROVPC_STATE_DIR: tempDir("vmm-state") } })) as {
    fwd: Daemon;
    gwd: Daemon;
    vmmd: Daemon;
  });
  // Security groups, NAT gateways and floating IPs are cluster-wide: their
  // API runs as the control user, in a firewall and a gateway without data plane.
  const ctl = ["--redis", h.redis.url, "--host-id", `${h.prefix}ctl`, "--api-only", ...h.acl!.args(CONTROL_USER)];
  ctlFwd = await startDaemon("firewall", ctl);
  trackChild(ctlFwd.proc);
  ctlGwd = await startDaemon("gateway", [...ctl, "--public-pool", FLOATING_POOL]);
  trackChild(ctlGwd.proc);
  asA = asHost(A);
  admin = new Redis({ port: h.redis.port, host: "127.0.0.1", password: h.acl!.admin });
}, 120_000);

afterAll(async () => {
  asA?.disconnect();
  admin?.disconnect();
  for (const d of [vmmd, gwd, fwd, ctlFwd, ctlGwd]) await d?.stop().catch(() => undefined);
  const left = await h?.close();
  assert.deepEqual(left ?? [], []);
});

/** A connection as that host's Redis user. */
function asHost(hv: Hypervisor): Redis {
  const user = hostUser(hv.id);
  return new Redis({
    port: h.redis.port,
    host: "127.0.0.1",
    username: user,
    password: readFileSync(h.acl!.passwordFile(user), "utf8").trim(),
    maxRetriesPerRequest: 0,
  });
}

/** Redis refused it to this user. */
async function refused(what: string, p: Promise<unknown>): Promise<void> {
  await assert.rejects(p, /NOPERM|can't access at least one of the keys/, `${what}: must be refused`);
}

describe("per-host Redis ACL users", () => {
  test("the daemons run as the users given, each with the rules `microvpcd redis-acl` printed", async () => {
    const clients = (await admin.call("CLIENT", "LIST")) as string;
    const users = new Set([...clients.matchAll(/ user=(\S+)/g)].map((m) => m[1]));
    for (const u of [CONTROL_USER, hostUser(A.id), hostUser(B.id)]) assert.ok(users.has(u), `a connection as ${u} (have ${[...users].join(", ")})`);
    const rules = (await admin.call("ACL", "GETUSER", hostUser(A.id))) as unknown[];
    assert.ok(JSON.stringify(rules).includes(`~mvpc:host:${A.id}:*`), "host A's user writes host A's keys");
    assert.ok(JSON.stringify(rules).includes(`~mvpc-md:${A.id}:*`), "host A's user reads and writes host A's instance metadata");
    assert.ok(!JSON.stringify(rules).includes(`mvpc:host:${B.id}`), "and nothing of host B");
    assert.ok(!JSON.stringify(rules).includes(`mvpc-md:${B.id}`), "nor B's instance metadata");
  });

  test("as host A's user: a VPC, NICs and a vmm VM on A converge, the firewall applies, no daemon is refused anything", async () => {
    vpc = await h.vpc("acl", "10.41.0.0/16");
    sn = await h.subnet(vpc, "web", "10.41.1.0/24", SubnetType.PUBLIC);
    const ctlFw = grpcClient(FirewallService, { address: ctlFwd.address, timeoutMs: 20_000 });
    const sg = (
      await ctlFw.createSecurityGroup({
        vpc: vpc.id,
        name: "web",
        rules: [{ direction: Direction.INGRESS, protocol: Protocol.ICMP, peer: { case: "cidr", value: "10.41.0.0/16" } }],
      })
    ).securityGroup!;
    const fw = grpcClient(FirewallService, { address: fwd.address, timeoutMs: 20_000 });
    // The same call to host A's firewall: its user may not write a group.
    await rejectsWith(
      fw.createSecurityGroup({ vpc: vpc.id, name: "evil", rules: [] }),
      Code.PermissionDenied,
      /Redis user may not make this change.*control user/,
    );

    // NAT and floating IPs likewise: the control gateway may, A's may not.
    const gw = grpcClient(GatewayService, { address: gwd.address, timeoutMs: 20_000 });
    const ctlGw = grpcClient(GatewayService, { address: ctlGwd.address, timeoutMs: 20_000 });
    await rejectsWith(gw.createNatGateway({ vpc: vpc.id, subnet: sn.id }), Code.PermissionDenied, /control user/);
    await rejectsWith(gw.allocateFloatingIp({}), Code.PermissionDenied, /control user/);
    assert.ok((await ctlGw.createNatGateway({ vpc: vpc.id, subnet: sn.id })).natGateway!.id);
    assert.ok((await ctlGw.allocateFloatingIp({})).floatingIp!.address);

    a = await h.vm(A, vpc, sn, "acla");
    assert.ok(a.nicId, "AttachNic on A as A's user");
    const vmm = grpcClient(VmService, { address: vmmd.address, timeoutMs: 30_000 });
    const v = (await vmm.createVm({ name: "aclv", vpc: "acl", subnet: "web", securityGroups: ["web"], kind: VmKind.NETNS })).vm!;
    assert.equal(v.state, VmState.RUNNING, "vmm: IPAM, NIC, binding, metadata, DNS all done");
    await fw.bindNic({ nicId: a.nicId, vpc: vpc.id, subnet: sn.id, securityGroups: [sg.id] });

    const applied = await waitFor(
      async () => {
        const s = await fw.getFirewallStatus({});
        return s.health === FirewallHealth.HEALTHY && s.nicCount === 2 && s.appliedGeneration >= s.desiredGeneration;
      },
      { timeoutMs: 20_000, intervalMs: 250 },
    );
    assert.ok(applied, `host A's firewall applies both NICs: ${JSON.stringify((await fw.getFirewallStatus({})).lastError)}`);
    for (const d of [A.daemon, fwd, gwd, vmmd]) {
      const health = await grpcClient(Health, { address: d.address }).check({});
      assert.equal(health.status, HealthCheckResponse_ServingStatus.SERVING);
    }
    assert.equal((await A.agent.listNics({})).nics.length, 2);
    // NOPERM anywhere would mean the user is too narrow for what the agents do.
    for (const [name, d] of [
      ["control firewall", ctlFwd],
      ["control gateway", ctlGwd],
      ["netagent A", A.daemon],
      ["netagent B", B.daemon],
      ["firewall A", fwd],
      ["gateway A", gwd],
      ["vmm A", vmmd],
      ["ipam", h.ipamDaemon],
    ] as const) {
      assert.doesNotMatch(d.output(), /NOPERM|can't access at least one of the keys/, `${name} was refused something:\n${d.output().slice(-3000)}`);
    }
  });

  test("the overlay joins A and B, each writing the shared overlay keys as its own user", async () => {
    b = await h.vm(B, vpc, sn, "aclb");
    const reaches = async (x: Vm, y: Vm) => (await ping(x.ns, y.address, { count: 2, intervalS: 0.1, deadlineS: 2 })).received > 0;
    assert.ok(await waitFor(async () => (await reaches(a, b)) && (await reaches(b, a)), { timeoutMs: 20_000, intervalMs: 300 }), "a ⇄ b across hosts");
    assert.deepEqual(Object.keys(await admin.hgetall(`mvpc:overlay:${vpc.id}:members`)).sort(), [A.id, B.id].sort());
    for (const d of [A.daemon, B.daemon]) assert.doesNotMatch(d.output(), /NOPERM|can't access at least one of the keys/);
    // The members hash is shared (a hash field cannot be limited to its
    // writer): A may delete B's entry, and B puts it back by itself.
    const members = `mvpc:overlay:${vpc.id}:members`;
    const entryB = await admin.hget(members, B.id);
    assert.equal(await asA.hdel(members, B.id), 1);
    assert.ok(await waitFor(async () => (await admin.hget(members, B.id)) === entryB, { timeoutMs: 20_000, intervalMs: 250 }), "B restores its entry");
    assert.ok(await waitFor(async () => (await reaches(a, b)) && (await reaches(b, a)), { timeoutMs: 20_000, intervalMs: 300 }), "a ⇄ b again");
  });

  test("with host A's credentials: host B's records, IPAM, security groups, NAT, tokens and admin commands are refused", async () => {
    const nicB = (await admin.hget(`mvpc:host:${B.id}:nics`, b.nicId))!;
    assert.ok(nicB, "B's NIC record is there to attack");
    const sgId = (await admin.hget(`mvpc:fw:vpc:${vpc.id}:sg:byname`, "web"))!;

    // Host B's keys.
    await refused("overwrite B's NIC record", asA.hset(`mvpc:host:${B.id}:nics`, b.nicId, "{}"));
    await refused("delete B's NIC records", asA.del(`mvpc:host:${B.id}:nics`));
    await refused("B's NIC address index", asA.hset(`mvpc:host:${B.id}:nicaddr`, `${vpc.id}/10.41.1.99`, b.nicId));
    await refused("B's VPC records", asA.hset(`mvpc:host:${B.id}:vpcs`, vpc.id, "{}"));
    await refused("B's overlay registry record", asA.set(`mvpc:hosts:${B.id}`, "{}"));
    await refused("B's firewall bindings index", asA.sadd(`mvpc:fw:host:${B.id}:vpcs`, "vpc-000000000000"));
    await refused("B's VM index", asA.sadd(`mvpc:{host:${B.id}}:vms`, "vm-000000000000"));
    await refused("B's VM index where the earlier release kept it", asA.sadd(`mvpc:vm:host:${B.id}`, "vm-000000000000"));
    await refused("B's transit indexes", asA.hset(`mvpc:gw:host:${B.id}:transit`, vpc.id, "7"));
    // IPAM.
    await refused("a VPC record", asA.hset(`mvpc:vpc:${vpc.id}`, "cidr", "0.0.0.0/0"));
    await refused("a subnet record", asA.del(`mvpc:subnet:${sn.id}`));
    // A subnet's allocation state and owner index, under the VPC's hash tag, whose change stream hosts do write.
    await refused("an allocation", asA.hset(`mvpc:{${vpc.id}}:sn:${sn.id}:alloc`, "99", "evil"));
    await refused("a subnet's allocation bitmap", asA.setbit(`mvpc:{${vpc.id}}:sn:${sn.id}:bits`, 99, 0));
    await refused("a subnet's used counter", asA.set(`mvpc:{${vpc.id}}:sn:${sn.id}:used`, "0"));
    await refused("an owner's allocations", asA.zadd(`mvpc:{${vpc.id}}:owner:vm-evil`, 0, `${sn.id}/99`));
    await refused("the VPC index", asA.zadd("mvpc:vpcs", 0, "evil"));
    // Security groups, ACLs, NAT, peering, DNS, client tokens.
    await refused("a security group's rules", asA.hset(`mvpc:fw:sg:${sgId}`, "rules", "[]"));
    await refused("a security group", asA.del(`mvpc:fw:sg:${sgId}`));
    await refused("subnet → network ACL", asA.hset("mvpc:fw:subnet-acl", sn.id, "acl-000000000000"));
    await refused("NAT gateways", asA.zadd("mvpc:gw:nats", 0, "evil"));
    await refused("floating IPs", asA.hset("mvpc:gw:fip:byaddr", "192.0.2.1", "evil"));
    await refused("peerings", asA.hset("mvpc:pcx:byname", "evil", "pcx-000000000000"));
    await refused("DNS records", asA.hset(`mvpc:dns:vpc:${vpc.id}:rec`, "evil", "{}"));
    await refused("client tokens", asA.hset("mvpc:tokens", "sg\nevil", sgId));
    await refused("a key outside mvpc:", asA.set("evil", "1"));
    // Through a script: each command inside is checked too.
    await refused("a script writing a VPC record", asA.eval(`return redis.call('HSET', 'mvpc:vpc:${vpc.id}', 'cidr', '0.0.0.0/0')`, 0));
    await refused("a script declaring B's key", asA.eval("return redis.call('HSET', KEYS[1], 'x', '1')", 1, `mvpc:host:${B.id}:nics`));
    // Administration.
    await refused("FLUSHALL", asA.flushall());
    await refused("FLUSHDB", asA.flushdb());
    await refused("CONFIG SET", asA.config("SET", "appendonly", "no"));
    await refused("CONFIG GET", asA.config("GET", "requirepass"));
    await refused("ACL SETUSER", asA.call("ACL", "SETUSER", hostUser(A.id), "~*", "+@all"));
    await refused("ACL LIST", asA.call("ACL", "LIST"));
    await refused("KEYS", asA.keys("*"));
    // Redis refuses DEBUG to everyone by default, and a SHUTDOWN let through
    // would end the test's server: ACL DRYRUN asks what A's user may run.
    for (const cmd of [["DEBUG", "SLEEP", "0"], ["SHUTDOWN", "NOSAVE"], ["MONITOR"], ["BGREWRITEAOF"], ["MIGRATE", "h", "1", "k", "0", "1"]]) {
      const why = (await admin.call("ACL", "DRYRUN", hostUser(A.id), ...cmd)) as string;
      assert.match(why, /no permissions to run/, `${cmd[0]}: ${why}`);
    }
    await refused("MODULE", asA.call("MODULE", "LIST"));
    await refused("SCRIPT FLUSH", asA.script("FLUSH"));
    await refused("FUNCTION FLUSH", asA.call("FUNCTION", "FLUSH"));
    await refused("SAVE", asA.call("SAVE"));
    await refused("REPLICAOF", asA.call("REPLICAOF", "127.0.0.1", "1"));
    await refused("CLIENT KILL", asA.call("CLIENT", "KILL", "USER", hostUser(B.id)));
    await refused("PUBLISH", asA.publish("mvpc:x", "1"));
    // Of pub/sub, the change streams' wakes only (the Redis Cluster feed's, sharded).
    await refused("SPUBLISH to a channel that is no wake", asA.spublish("mvpc:x", "1"));
    assert.equal(await asA.spublish("mvpc:{vpc-000000000001}:wake", "1"), 0, "a wake may be published");
    for (const [channel, allowed] of [
      ["mvpc:x", false],
      [`mvpc:{host:${B.id}}:wake`, true],
    ] as const) {
      const sub = asA.duplicate();
      try {
        if (allowed) assert.equal(await sub.ssubscribe(channel), 1, `SSUBSCRIBE ${channel}`);
        else await refused(`SSUBSCRIBE ${channel}`, sub.ssubscribe(channel));
      } finally {
        sub.disconnect();
      }
    }

    // What A may do: read everything of mvpc:, write its own host's keys.
    assert.equal(await asA.hget(`mvpc:host:${B.id}:nics`, b.nicId), nicB, "reads B's record");
    assert.equal(await asA.hset(`mvpc:host:${A.id}:probe`, "x", "1"), 1);
    assert.equal(await asA.del(`mvpc:host:${A.id}:probe`), 1);

    // A binding record is shared too: B may rewrite the groups of A's NIC. A's
    // firewall compares it with its own copy (host-scoped, only A writes it)
    // and fails closed, naming the record; BindNic on A puts it right.
    const asB = asHost(B);
    try {
      const fw = grpcClient(FirewallService, { address: fwd.address, timeoutMs: 20_000 });
      const sig = (await asB.hget(`mvpc:fw:nic:${a.nicId}`, "sig"))!;
      const forged = JSON.stringify({ ...(JSON.parse(sig) as object), groupIds: [] });
      assert.equal(await asB.hset(`mvpc:fw:nic:${a.nicId}`, "sig", forged), 0, "B may write the shared record");
      await refused("B writes A's own copy", asB.hset(`mvpc:fw:host:${A.id}:sig`, a.nicId, forged));
      await asB.xadd("mvpc:events", "*", "kind", "fw.binding.changed", "vpc", vpc.id);
      assert.ok(
        await waitFor(
          async () => (await fw.getFirewallStatus({})).invalidRecords.some((r) => r.kind === "binding" && r.key.includes(a.nicId) && /own copy/.test(r.reason)),
          { timeoutMs: 20_000, intervalMs: 250 },
        ),
        "A's firewall refuses the rewritten binding",
      );
      const sgId = (await admin.hget(`mvpc:fw:vpc:${vpc.id}:sg:byname`, "web"))!;
      await fw.bindNic({ nicId: a.nicId, vpc: vpc.id, subnet: sn.id, securityGroups: [sgId] });
      assert.equal(await admin.hget(`mvpc:fw:host:${A.id}:sig`, a.nicId), await admin.hget(`mvpc:fw:nic:${a.nicId}`, "sig"), "BindNic on A restores both");

      // VM records, journals and leases are A's own keys: B may not forge, rewrite or delete them.
      const vmm = grpcClient(VmService, { address: vmmd.address, timeoutMs: 30_000 });
      const aclv = (await vmm.getVm({ ref: "aclv", vpc: "acl" })).vm!;
      const recKey = `mvpc:{host:${A.id}}:vm:${aclv.id}`;
      const leaseKey = `mvpc:{host:${A.id}}:vm:${aclv.id}:lease`;
      const recText = (await admin.get(recKey))!;
      assert.ok(recText, "A's VM record is there to attack");
      await refused("B rewrites A's VM record", asB.set(recKey, JSON.stringify({ ...(JSON.parse(recText) as object), op: "delete" })));
      await refused("B deletes A's VM record", asB.del(recKey));
      await refused("B takes A's VM lease", asB.set(leaseKey, `${B.id}/1/x`, "PX", 60_000));
      await refused("B deletes A's VM lease", asB.del(leaseKey));
      await refused("B adds to A's VM index", asB.sadd(`mvpc:{host:${A.id}}:vms`, "vm-000000000000"));
      await refused("B writes a record where the earlier release kept them", asB.set(`mvpc:vm:host:${A.id}:vm:${aclv.id}`, recText));
      await refused("B replaces the tombstone A's earlier vmm would read", asB.del(`mvpc:vm:host:${A.id}:vm:${aclv.id}`));
      await refused("B's script on A's VM record", asB.eval("return redis.call('SET', KEYS[1], ARGV[1])", 1, recKey, "{}"));
      await refused("B writes a record where older versions kept them", asB.set(`mvpc:vm:${aclv.id}`, recText));
      await refused("B writes a lease where older versions kept them", asB.set(`mvpc:vmlease:${aclv.id}`, "x"));
      assert.equal(await admin.get(recKey), recText, "A's VM record untouched");

      // The per-VPC name index is shared, but its entries only nominate.
      const byname = `mvpc:{${vpc.id}}:vm:byname`;
      // "evil" → A's real VM: its record is named aclv, so no VM is called evil, and nothing is deleted.
      await asB.hset(byname, "evil", `${A.id}/${aclv.id}`);
      await rejectsWith(vmm.getVm({ ref: "evil", vpc: "acl" }), Code.NotFound);
      assert.equal((await vmm.deleteVm({ ref: "evil", vpc: "acl" })).deleted, false);
      assert.equal((await vmm.getVm({ ref: aclv.id })).vm!.state, VmState.RUNNING, "aclv still runs");
      // "ghost" → a record B wrote under its own prefix claiming to be A's VM, mid-delete:
      // refused (a record of host A under host B's key), never listed, never recovered or deleted by A.
      const ghost = "vm-00000000beef";
      const ghostKey = `mvpc:{host:${B.id}}:vm:${ghost}`;
      await asB.set(ghostKey, JSON.stringify({ ...(JSON.parse(recText) as object), id: ghost, name: "ghost", op: "delete", state: "deleting" }));
      await asB.sadd(`mvpc:{host:${B.id}}:vms`, ghost);
      await asB.sadd("mvpc:vm:hosts", B.id);
      await asB.hset(byname, "ghost", `${B.id}/${ghost}`);
      await rejectsWith(vmm.getVm({ ref: "ghost", vpc: "acl" }), Code.NotFound);
      await rejectsWith(vmm.getVm({ ref: ghost }), Code.NotFound);
      assert.equal((await vmm.deleteVm({ ref: "ghost", vpc: "acl" })).deleted, false);
      assert.deepEqual(
        (await vmm.listVms({})).vms.map((v) => v.name),
        ["aclv"],
        "ListVms shows A's VM and nothing B forged",
      );
      assert.match(vmmd.output(), /skipping a record from Redis that does not validate/, "the forged record is reported");
      // A name whose entry names a record that does not agree is free: A creates a VM "evil" and deletes it.
      // Its user-data is the tenant's: A's gateway serves it, B's user cannot read it anywhere.
      const secret = "#cloud-config\n# a password of evil's tenant\n";
      const evil = (await vmm.createVm({ name: "evil", vpc: "acl", subnet: "web", kind: VmKind.NETNS, userData: new TextEncoder().encode(secret) })).vm!;
      assert.equal(evil.state, VmState.RUNNING);
      assert.equal(await admin.hget(byname, "evil"), `${A.id}/${evil.id}`);
      const gwA = grpcClient(GatewayService, { address: gwd.address, timeoutMs: 20_000 });
      assert.equal(new TextDecoder().decode((await gwA.getInstanceMetadata({ instanceId: evil.id })).metadata!.userData), secret, "A's metadata has it");
      const evilRec = (await asB.get(`mvpc:{host:${A.id}}:vm:${evil.id}`))!;
      assert.ok(evilRec && !evilRec.includes(Buffer.from(secret).toString("base64")), "the VM record B may read holds no user-data");
      assert.ok(await admin.exists(`mvpc-md:{host:${A.id}}:vm:${evil.id}:userdata`), "the user-data is under A's private keys");
      await refused("B reads the VM's user-data", asB.get(`mvpc-md:{host:${A.id}}:vm:${evil.id}:userdata`));
      assert.equal((await vmm.deleteVm({ ref: "evil", vpc: "acl" })).deleted, true);
      assert.equal(await admin.exists(`mvpc-md:{host:${A.id}}:vm:${evil.id}:userdata`), 0, "and it goes with the VM");
      assert.ok(await admin.exists(ghostKey), "B's own record is B's: A did not act on it");
      await admin.del(ghostKey, `mvpc:{host:${B.id}}:vms`);
      await admin.hdel(byname, "ghost");
    } finally {
      asB.disconnect();
    }

    // Nothing changed, and A still works.
    assert.equal(await admin.hget(`mvpc:host:${B.id}:nics`, b.nicId), nicB, "B's NIC record untouched");
    assert.ok(await admin.exists(`mvpc:subnet:${sn.id}`));
    assert.equal((await B.agent.listNics({})).nics.length, 1);
    const again = await h.vm(A, vpc, sn, "aclc");
    assert.ok(again.nicId, "A attaches another NIC after the attempts");
    const vmm = grpcClient(VmService, { address: vmmd.address, timeoutMs: 30_000 });
    await vmm.deleteVm({ ref: "aclv", vpc: "acl" });
    await rejectsWith(vmm.getVm({ ref: "aclv", vpc: "acl" }), Code.NotFound);
    for (const d of [A.daemon, fwd, gwd, vmmd]) assert.doesNotMatch(d.output(), /NOPERM|can't access at least one of the keys/);
  });

  test("as host A's user, vmm's migration moves A's oldest-layout record under A's hash tag; the old keys it may no longer delete stay", async () => {
    const id = "vm-00000000cafe";
    const rec: VmRec = vmRecord(A.id, id, "legacy", { vpcId: vpc.id, subnetId: sn.id, state: "running", startedMs: Date.now(), op: "" });
    const text = JSON.stringify(rec);
    const byname = `mvpc:vm:vpc:${vpc.id}:byname`;
    // As the previous version left it (written here by the admin: A's user no longer may).
    await admin.set(`mvpc:vm:${id}`, text);
    await admin.set(`mvpc:vmlease:${id}`, `${A.id}/1/dead`, "PX", 60_000);
    await admin.zadd("mvpc:vms", 0, id);
    await admin.hset(byname, "legacy", id);
    await admin.sadd(`mvpc:vm:host:${A.id}`, id);
    const newKey = `mvpc:{host:${A.id}}:vm:${id}`;
    const newByname = `mvpc:{${vpc.id}}:vm:byname`;
    try {
      assert.equal(await new VmStore(asA, A.id).migrate(), 1);
      assert.equal(await admin.get(newKey), text, "moved into A's keys");
      assert.equal(await admin.get(`mvpc:{host:${A.id}}:vm:${id}:lease`), `${A.id}/1/dead`, "with its lease");
      assert.equal(await admin.hget(byname, "legacy"), `${A.id}/${id}`);
      assert.equal(await admin.hget(newByname, "legacy"), `${A.id}/${id}`);
      assert.equal(await admin.type(`mvpc:vm:host:${A.id}:vm:${id}`), "hash", "a tombstone at the earlier host-scoped name");
      assert.equal(await admin.get(`mvpc:vm:${id}`), text, "the old record stays: A's user may not delete it");
      assert.equal(await new VmStore(asA, A.id).migrate(), 0, "once");
      const vmm = grpcClient(VmService, { address: vmmd.address, timeoutMs: 30_000 });
      assert.equal((await vmm.getVm({ ref: "legacy", vpc: "acl" })).vm!.id, id, "A's vmm finds it by name");
    } finally {
      await admin.del(newKey, `mvpc:{host:${A.id}}:vm:${id}:lease`, `mvpc:vm:host:${A.id}:vm:${id}`, `mvpc:vm:${id}`, `mvpc:vmlease:${id}`);
      await admin.zrem("mvpc:vms", id);
      await admin.hdel(byname, "legacy");
      await admin.hdel(newByname, "legacy");
      await admin.srem(`mvpc:vm:host:${A.id}`, id);
      await admin.srem(`mvpc:{host:${A.id}}:vms`, id);
    }
  });

  test("instance metadata is host A's alone: B's user can neither read nor write it; A's metadata server serves A's VM its user-data", async () => {
    const gw = grpcClient(GatewayService, { address: gwd.address, timeoutMs: 20_000 });
    const secret = "#cloud-config\n# secret of acla\n";
    await gw.setInstanceMetadata({
      metadata: {
        instanceId: "i-acla",
        vpcId: vpc.id,
        subnetId: sn.id,
        localIpv4: a.address,
        mac: a.mac,
        hostname: "acla",
        userData: new TextEncoder().encode(secret),
      },
    });
    const userData = () => httpGet(a.ns, "http://169.254.169.254/latest/user-data", 1500);
    assert.ok(await waitFor(async () => (await userData()) === secret, { timeoutMs: 20_000, intervalMs: 250 }), "A's VM reads its user-data");
    const key = `mvpc-md:{host:${A.id}}:inst:i-acla`;
    assert.ok(await asA.exists(key), "stored under A's own prefix");

    const asB = asHost(B);
    try {
      // The attack: B reads A's tenants' user-data, or rewrites what A's VM reads at boot.
      await refused("B reads A's record (user-data)", asB.hget(key, "pb"));
      await refused("B reads A's whole record", asB.hgetall(key));
      await refused("B reads A's address index", asB.hgetall(`mvpc-md:{host:${A.id}}:byaddr`));
      await refused("B lists A's instances", asB.zrange(`mvpc-md:{host:${A.id}}:insts`, 0, -1));
      await refused("B reads A's session tokens", asB.zrange(`mvpc-md:{host:${A.id}}:tokens:i-acla`, 0, -1));
      const forged = Buffer.from(
        toBinary(InstanceMetadataSchema, create(InstanceMetadataSchema, { instanceId: "i-acla", userData: new TextEncoder().encode("#!/bin/sh\nevil\n") })),
      ).toString("base64");
      await refused("B rewrites A's record", asB.hset(key, "pb", forged));
      await refused("B deletes A's record", asB.del(key));
      await refused("B points A's VM's address elsewhere", asB.hset(`mvpc-md:{host:${A.id}}:byaddr`, `${vpc.id}/${a.address}`, "i-evil"));
      await refused("B mints a session token on A", asB.zadd(`mvpc-md:{host:${A.id}}:tokens:i-acla`, Date.now() + 3_600_000, "00".repeat(12)));
      await refused("B bumps A's rev", asB.incr(`mvpc-md:{host:${A.id}}:rev`));
      await refused("a script declaring A's record", asB.eval("return redis.call('HGET', KEYS[1], 'pb')", 1, key));
      await refused("a script naming A's record", asB.eval(`return redis.call('HSET', '${key}', 'pb', 'x')`, 0));
      await refused("B writes A's record under the earlier names", asB.hset(`mvpc-md:${A.id}:inst:i-acla`, "pb", forged));
      // The old shared layout is no longer writable by any host either.
      await refused("B writes the old shared layout", asB.hset("mvpc:gw:md:byaddr", `${vpc.id}/${a.address}`, "i-evil"));
      await refused("B writes an old shared record", asB.hset("mvpc:gw:md:inst:i-acla", "pb", forged));

      // What B may do: its own host's metadata, even a record claiming a's
      // address — A's metadata server never reads it.
      const onB = new MetadataStore(asB, B.id);
      await onB.set(
        create(InstanceMetadataSchema, {
          instanceId: "i-acla",
          vpcId: vpc.id,
          subnetId: sn.id,
          localIpv4: a.address,
          mac: a.mac,
          hostname: "evil",
          userData: new TextEncoder().encode("#!/bin/sh\nevil\n"),
        }),
      );
      assert.equal((await onB.get("i-acla"))?.hostname, "evil");
      await asB.xadd("mvpc:events", "*", "kind", "gw.metadata.set", "instance", "i-acla");
      assert.equal(await userData(), secret, "A's VM still reads its own user-data");
      assert.equal(await httpGet(a.ns, "http://169.254.169.254/latest/meta-data/hostname", 1500), "acla");
      assert.equal(await asA.hget(key, "pb"), await admin.hget(key, "pb"), "A reads its own record");
      await refused("A reads B's record", asA.hget(`mvpc-md:{host:${B.id}}:inst:i-acla`, "pb"));

      // The control plane's gateway sees both hosts' records: a Get by id names the two hosts.
      const ctlGw = grpcClient(GatewayService, { address: ctlGwd.address, timeoutMs: 20_000 });
      await rejectsWith(ctlGw.getInstanceMetadata({ instanceId: "i-acla" }), Code.FailedPrecondition, new RegExp(`on 2 hypervisors .*${A.id}`));
      assert.equal((await onB.delete("i-acla")).deleted, true);
      assert.equal((await ctlGw.getInstanceMetadata({ instanceId: "i-acla" })).metadata?.hostname, "acla", "the control gateway reads A's record");
      await rejectsWith(
        ctlGw.setInstanceMetadata({ metadata: { instanceId: "i-x", vpcId: vpc.id, localIpv4: "10.41.1.200", mac: "02:00:00:00:00:01", hostname: "x" } }),
        Code.FailedPrecondition,
        /--api-only/,
      );
    } finally {
      asB.disconnect();
    }
    await gw.deleteInstanceMetadata({ instanceId: "i-acla" });
    for (const d of [gwd, ctlGwd]) assert.doesNotMatch(d.output(), /NOPERM|can't access at least one of the keys/);
  });

  test("a VPN endpoint on A runs as A's user (its key and applied gen in A's own keys); A may not create clients nor rewrite an endpoint, and its key for another host's endpoint is not read", async () => {
    // The endpoint's wireguard-go (DIR/<host>/vpn/wg): ended by PID if the test fails before A tears it down.
    const stateDir = h.stateDir!;
    onCleanup(() => {
      for (const { ifname, pid } of interfacesIn(join(stateDir, A.id), "vpn")) {
        try {
          if (pid > 0 && readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").includes(ifname)) process.kill(pid, "SIGKILL");
        } catch {
          // gone
        }
        rmSync(`/var/run/wireguard/${ifname}.sock`, { force: true });
      }
    });
    const ctl = new Redis({
      port: h.redis.port,
      host: "127.0.0.1",
      username: CONTROL_USER,
      password: readFileSync(h.acl!.passwordFile(CONTROL_USER), "utf8").trim(),
      maxRetriesPerRequest: 0,
    });
    const asB = asHost(B);
    try {
      const range = V.cidr("client_cidr", "10.41.250.0/24", { min: 20, max: 29 });
      const spec = { vpcId: vpc.id, hostId: A.id, publicAddress: A.underlayAddress, listenPort: 51830, clientCidr: range.text, updatedMs: Date.now() };
      // Through A's netagent, as A's user: refused, nothing written.
      const vpnA = grpcClient(VpnService, { address: A.daemon.address, timeoutMs: 20_000 });
      await rejectsWith(
        vpnA.setVpnEndpoint({ vpc: vpc.id, hostId: A.id, publicAddress: A.underlayAddress, listenPort: 51830, clientCidr: range.text }),
        Code.PermissionDenied,
        /VPN endpoints and clients\) go to a daemon running as the control user/,
      );
      assert.equal(await admin.exists(`mvpc:vpn:ep:${vpc.id}`, `mvpc:vpc:${vpc.id}:reserved`), 0);
      // As the control user (a netagent running as it would do the same).
      const ctlVpn = new VpnStore(ctl);
      const set = await ctlVpn.setEndpoint(spec, range);
      assert.ok("gen" in set, JSON.stringify(set));
      assert.ok(
        await waitFor(async () => !!(await ctlVpn.endpoint(vpc.id, vpc.cidr))?.publicKey, { timeoutMs: 20_000, intervalMs: 100 }),
        `A never wrote its endpoint key\n${A.daemon.output().slice(-2000)}`,
      );
      const key = (await ctlVpn.endpoint(vpc.id, vpc.cidr))!.publicKey;
      assert.equal(await admin.hget(`mvpc:vpn:host:${A.id}:keys`, vpc.id), key, "in A's own key");
      const client = {
        id: "vpnc-0123456789ab",
        name: "laptop",
        vpcId: vpc.id,
        publicKey: "B".repeat(42) + "A=",
        address: "10.41.250.1",
        groupIds: [],
        createdMs: Date.now(),
      };
      const made = await ctlVpn.create(client, range.text);
      assert.ok("gen" in made);
      assert.ok(await waitFor(async () => (await ctlVpn.applied(A.id, vpc.id)) >= made.gen, { timeoutMs: 10_000, intervalMs: 50 }), "A applied the client");
      assert.match((await nsExec(A.ns, "wg", ["show", "all", "peers"], { check: false })).stdout, /B{42}A=/, "A's endpoint has the client as a peer");

      // The attacks, with A's credentials.
      const asAVpn = new VpnStore(asA);
      await refused(
        "create a client",
        asAVpn.create({ ...client, id: "vpnc-0123456789ac", name: "evil", publicKey: "C".repeat(42) + "A=", address: "10.41.250.9" }, range.text),
      );
      await refused("delete a client", asAVpn.delete(client));
      await refused("move the endpoint", asAVpn.setEndpoint({ ...spec, publicAddress: "192.0.2.66" }, range));
      await refused("delete the endpoint (and the range's reservation)", asAVpn.deleteEndpoint(vpc.id));
      await refused("rewrite the endpoint's range", asA.hset(`mvpc:vpn:ep:${vpc.id}`, "cidr", "10.41.1.0/24"));
      await refused("write a client record", asA.hset(`mvpc:vpn:vpc:${vpc.id}:clients`, "evil", "{}"));
      await refused("claim a client address", asA.hset(`mvpc:vpn:vpc:${vpc.id}:addrs`, "10.41.250.9", "evil"));
      await refused("raise the VPN gen", asA.incr("mvpc:vpn:gen"));
      await refused("drop IPAM's reservation of the range", asA.hdel(`mvpc:vpc:${vpc.id}:reserved`, "vpn"));
      await refused("B forges A's endpoint key", asB.hset(`mvpc:vpn:host:${A.id}:keys`, vpc.id, "D".repeat(42) + "A="));
      await refused("B forges A's applied gen", asB.hset(`mvpc:vpn:host:${A.id}:applied`, vpc.id, "999999"));
      // A's own key for a VPC whose endpoint names another host: Redis lets A write it, no reader takes it.
      const other = await h.vpc("aclvpn", "10.43.0.0/16");
      const r2 = V.cidr("client_cidr", "10.43.250.0/24", { min: 20, max: 29 });
      assert.ok("gen" in (await ctlVpn.setEndpoint({ ...spec, vpcId: other.id, hostId: "nohost", clientCidr: r2.text, listenPort: 51831 }, r2)));
      await asA.hset(`mvpc:vpn:host:${A.id}:keys`, other.id, "E".repeat(42) + "A=");
      const ep2 = await ctlVpn.endpoint(other.id, other.cidr);
      assert.equal(ep2?.hostId, "nohost");
      assert.equal(ep2?.publicKey, "", "A's key taken for another host's endpoint");
      assert.ok(await ctlVpn.clientByName(vpc.id, "laptop", range), "the client is still there");
      assert.equal(await ctlVpn.clientByName(vpc.id, "evil", range), null);
      for (const d of [A.daemon, B.daemon]) assert.doesNotMatch(d.output(), /NOPERM|can't access at least one of the keys/);

      // The endpoint moved away: A removes its interface and its own key, as its user.
      assert.ok("gen" in (await ctlVpn.setEndpoint({ ...spec, hostId: "nohost" }, range)));
      assert.ok(
        await waitFor(async () => (await admin.hget(`mvpc:vpn:host:${A.id}:keys`, vpc.id)) === null && interfacesIn(join(stateDir, A.id), "vpn").length === 0, {
          timeoutMs: 20_000,
          intervalMs: 100,
        }),
        "A did not tear its endpoint down",
      );
    } finally {
      asB.disconnect();
      ctl.disconnect();
    }
  }, 90_000);

  test("a peering converges with per-host users: A acknowledges it in its own key, which B may not forge", async () => {
    const other = await h.vpc("aclp", "10.42.0.0/16");
    const osn = await h.subnet(other, "web", "10.42.1.0/24", SubnetType.PUBLIC);
    const vm = await h.vm(A, other, osn, "aclp");
    const pcx = (await h.ipam.peering.createPeering({ vpc1: vpc.id, vpc2: other.id })).peering!;
    try {
      const available = await waitFor(async () => (await h.ipam.peering.getPeering({ ref: pcx.id })).peering!.state === ResourceState.AVAILABLE, {
        timeoutMs: 20_000,
        intervalMs: 300,
      });
      assert.ok(
        available,
        `AVAILABLE once A applied it: ${(await h.ipam.peering.getPeering({ ref: pcx.id })).peering!.statusMessage}\n${A.daemon
          .output()
          .split("\n")
          .filter((l) => /peering|NOPERM|ack/i.test(l))
          .slice(-15)
          .join("\n")}`,
      );
      assert.ok(await admin.hget(`mvpc:host:${A.id}:pcxacks`, pcx.id), "A's ack is in A's own key");
      const asB = asHost(B);
      try {
        await refused("B acknowledges for A", asB.hset(`mvpc:host:${A.id}:pcxacks`, pcx.id, "1"));
      } finally {
        asB.disconnect();
      }
      assert.doesNotMatch(A.daemon.output(), /cannot acknowledge a peering|NOPERM/);
    } finally {
      await h.ipam.peering.deletePeering({ ref: pcx.id });
      await h.removeVm(vm);
    }
  });
});
