// Security-group membership is written to a shared key (mvpc:fw:sg:G:members,
// which every hypervisor's Redis user may write: docs/redis-acl.md), so a
// member entry counts only if the NIC's own host vouches for it in keys only
// that host writes. The attack: host B, with its own Redis user, tries to
// give a VM on host A the access of group "clients" — by adding that VM's
// NIC to the member list, and by inventing a NIC of its own at that VM's
// address with a binding, a sig copy and a NIC-index entry it may write, and
// by rewriting the fields of that VM's shared binding record beside the sig
// A's copy vouches for (until 5 December that gave the VM the access). A's
// firewall refuses both entries (reported in GetFirewallStatus) and the VM
// stays locked out, while the real member still gets through: same test.
import assert from "node:assert/strict";
import type { Redis } from "ioredis";
import { afterAll, beforeAll, describe, test } from "vitest";
import { Direction, FirewallHealth, FirewallService, Protocol } from "../../gen/microvpc/v1/firewall_pb.js";
import { SubnetType } from "../../gen/microvpc/v1/subnet_pb.js";
import { grpcClient } from "../../services/common/client.js";
import { CONTROL_USER, hostUser } from "../../services/common/redis-acl.js";
import { fwKeys } from "../../services/firewall/keys.js";
import { naKeys } from "../../services/netagent/schema.js";
import { startDaemon, type Daemon } from "../lib/daemon.js";
import { Harness, type Hypervisor } from "../lib/harness.js";
import { canPing, nsExec, trackChild, waitFor } from "../lib/netns.js";

let h: Harness;
let A: Hypervisor, B: Hypervisor;
let fwd: Daemon, gwd: Daemon, ctlFwd: Daemon;
let asB: Redis;

beforeAll(async () => {
  h = await Harness.start({ hosts: 2, redisAcl: true, failClosed: true });
  [A, B] = h.hosts;
  ({ fwd, gwd } = await h.hostServices(A, { driftMs: 1000 }));
  ctlFwd = await startDaemon("firewall", ["--redis", h.redisUrl, "--host-id", `${h.prefix}ctl`, "--api-only", ...h.acl!.args(CONTROL_USER)]);
  trackChild(ctlFwd.proc);
  asB = h.connect(hostUser(B.id));
}, 120_000);

afterAll(async () => {
  asB?.disconnect();
  for (const d of [gwd, fwd, ctlFwd]) await d?.stop().catch(() => undefined);
  const left = await h?.close();
  assert.deepEqual(left ?? [], []);
});

describe("security-group members another host wrote", () => {
  test("a forged member entry gives no VM the group's access; the real member keeps it", async () => {
    const vpc = await h.vpc("sgm", "10.43.0.0/16");
    const sn = await h.subnet(vpc, "app", "10.43.1.0/24", SubnetType.PRIVATE);
    const ctl = grpcClient(FirewallService, { address: ctlFwd.address, timeoutMs: 20_000 });
    const clients = (await ctl.createSecurityGroup({ vpc: vpc.id, name: "clients", rules: [] })).securityGroup!;
    const db = (
      await ctl.createSecurityGroup({
        vpc: vpc.id,
        name: "db",
        rules: [{ direction: Direction.INGRESS, protocol: Protocol.ICMP, peer: { case: "securityGroupId", value: clients.id } }],
      })
    ).securityGroup!;
    const fw = grpcClient(FirewallService, { address: fwd.address, timeoutMs: 20_000 });
    const server = await h.vm(A, vpc, sn, "sgm-db");
    const member = await h.vm(A, vpc, sn, "sgm-c1");
    const outsider = await h.vm(A, vpc, sn, "sgm-x1");
    await fw.bindNic({ nicId: server.nicId, securityGroups: [db.id] });
    await fw.bindNic({ nicId: member.nicId, securityGroups: [clients.id] });
    await fw.bindNic({ nicId: outsider.nicId, securityGroups: [] });
    if (!(await canPing(member.ns, server.address))) {
      // What the kernel held when the first packets were refused, and whether a later pass opened it (late, or never).
      const ruleset = (await nsExec(server.vpcNs, "nft", ["list", "ruleset"], { check: false })).stdout;
      const st = await fw.getFirewallStatus({});
      const later = await canPing(member.ns, server.address);
      assert.fail(
        `a member of clients (${member.nicId} at ${member.address}) does not reach db (${server.address}) after BindNic returned; ` +
          `${later ? "it does a moment later" : "nor a moment later"}. Firewall: ${st.health}, generations ${st.appliedGeneration}/${st.desiredGeneration}, last error ${JSON.stringify(st.lastError)}\n${ruleset}\nThe firewall's log:\n${fwd.output().slice(-8000)}`,
      );
    }
    assert.ok(!(await canPing(outsider.ns, server.address)), "a NIC in no group does not");

    // Host B's user may write the shared member list and its own host keys
    // (their names in the run's layout: one redis-server's, or a cluster's).
    const F = fwKeys(asB);
    const members = F.sgMembers(vpc.id, clients.id);
    await asB.hset(members, outsider.nicId, outsider.address);
    // …and the outsider's shared record, to name the group (its sig, which A's copy vouches for, is left as A wrote it).
    await asB.hset(F.nic(outsider.nicId), "groups", clients.id);
    const fake = "nic-0badc0ffee00";
    const sig = JSON.stringify({ nicId: fake, vpcId: vpc.id, subnetId: sn.id, address: outsider.address, hostId: B.id, groupIds: [clients.id] });
    await asB.hset(F.nic(fake), "sig", sig, "host", B.id, "vpc", vpc.id, "subnet", sn.id, "addr", outsider.address, "groups", clients.id);
    await asB.hset(F.hostSigs(B.id), fake, sig);
    await asB.hset(naKeys(asB).nicaddr(B.id), `${vpc.id}/${outsider.address}`, fake);
    await asB.hset(members, fake, outsider.address);
    // …but not A's copy of the outsider's binding, which would put it in the group.
    await assert.rejects(asB.hset(F.hostSigs(A.id), outsider.nicId, sig), /NOPERM|can't access/);

    // Several firewall passes (drift every second) with the forged entries in Redis.
    const leaked = await waitFor(() => canPing(outsider.ns, server.address), { timeoutMs: 6000, intervalMs: 500 });
    assert.ok(!leaked, "the outsider never reaches db through a forged member entry");
    const reported = await waitFor(
      async () => {
        const bad = (await fw.getFirewallStatus({})).invalidRecords.filter((r) => r.kind === "member" && r.key.includes(clients.id));
        return (
          bad.some((r) => r.field === outsider.nicId && /not bound to this group/.test(r.reason)) &&
          bad.some((r) => r.field === fake && /a NIC of this host/.test(r.reason))
        );
      },
      { timeoutMs: 20_000, intervalMs: 250 },
    );
    const st = await fw.getFirewallStatus({});
    assert.ok(reported, `both forged entries are refused and reported: ${JSON.stringify(st.invalidRecords.map((r) => [r.kind, r.field, r.reason]))}`);
    assert.equal(st.health, FirewallHealth.HEALTHY, "the rest of the VPC converged");
    assert.ok(await canPing(member.ns, server.address), "the real member still does");
  });
});
