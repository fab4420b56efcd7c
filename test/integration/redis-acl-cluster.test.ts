// The per-host Redis ACL users (`microvpcd redis-acl`, services/common/redis-acl.ts)
// on a real Redis Cluster (3 primaries, 3 replicas; ACL rules are per node,
// so every node gets them, as docs/redis-acl.md says to apply them). The
// netagent's cluster layout (netagent/schema.ts NA_KEYS.cluster, the VPN's
// VPN_KEYS.cluster) puts a host's records under its hash tag and a VPC's
// shared claims and overlay hashes under the VPC's: as host A's user, A's
// AttachNic in one-slot steps, its finishing pass, DetachNic, its overlay
// registry record and membership and its VPN keys are all allowed, while B's
// records, B's registry record, IPAM's records, the VPN's endpoints and the
// firewall's groups in the same slots are refused with NOPERM. Redis only:
// no namespace.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { Redis } from "ioredis";
import { afterAll, beforeAll, test } from "vitest";
import { aclRules, CONTROL_USER, hostUser } from "../../services/common/redis-acl.js";
import { vpcEvents } from "../../services/common/events.js";
import { connectRedis, waitReady } from "../../services/common/redis.js";
import { FW_KEYS } from "../../services/firewall/keys.js";
import { GW_KEYS } from "../../services/gateway/schema.js";
import { GatewayStore } from "../../services/gateway/store.js";
import { IPAM_KEYS } from "../../services/ipam/keys.js";
import { OverlayRegistry } from "../../services/netagent/overlay/registry.js";
import type { NicSpec } from "../../services/netagent/plan.js";
import { HostStore, NA_KEYS } from "../../services/netagent/store.js";
import { VPN_KEYS } from "../../services/netagent/vpn/schema.js";
import { VpnStore } from "../../services/netagent/vpn/store.js";
import { hostRecord } from "../lib/netagent-fixtures.js";
import { startRedisCluster, type TestRedisCluster } from "../lib/redis.js";
import { gated } from "../lib/redis-intercept.js";

const VPC = "vpc-0a0c0a0c0a0c";
const [A, B] = ["aclhva", "aclhvb"];
const K = NA_KEYS.cluster;
let cluster: TestRedisCluster;
const pw = randomBytes(12).toString("hex");
const clients: Redis[] = [];
let a: Redis;
let b: Redis;

const nic = (id: string, address: string): NicSpec => ({
  nicId: id,
  owner: `vm-${id.slice(-4)}`,
  vpcId: VPC,
  subnetId: "subnet-0a0c0a0c0a0c",
  kind: "veth",
  hostIf: `v${id.slice(4)}`,
  mac: "02:00:0a:0c:00:01",
  address,
  prefix: 24,
  gateway: "10.12.1.1",
  mtu: 1500,
  hostname: "",
  guestIf: "eth0",
  dns: [],
  veth: { netnsPath: "/run/netns/aclvm", skipDefaultRoute: false },
  bandwidth: { ingressMbps: 0, egressMbps: 0 },
  createdMs: 1,
  clientToken: "",
});

/** A client as `user` (an ACL user of the test's own, not a harness's): what its rules allow is the subject here. */
async function as(user: string): Promise<Redis> {
  const c = connectRedis({ url: cluster.url, username: user, password: pw, commandTimeoutMs: 5000 });
  clients.push(c);
  await waitReady(c);
  return c;
}

beforeAll(async () => {
  const admin = randomBytes(12).toString("hex");
  cluster = await startRedisCluster({ password: admin });
  // The rules `microvpcd redis-acl` prints, on every node (ACLs are not replicated).
  for (const n of cluster.nodes) {
    const c = new Redis({ port: n.port, host: "127.0.0.1", password: admin, lazyConnect: true, maxRetriesPerRequest: 0 });
    await c.connect();
    for (const [user, who] of [
      [CONTROL_USER, { control: true as const }],
      [hostUser(A), { hostId: A }],
      [hostUser(B), { hostId: B }],
    ] as const)
      await c.call("ACL", "SETUSER", user, ...aclRules(who), `>${pw}`);
    c.disconnect();
  }
  a = await as(hostUser(A));
  b = await as(hostUser(B));
}, 60_000);

afterAll(async () => {
  for (const c of clients) c.disconnect();
  await cluster?.stop();
});

const refused = (p: Promise<unknown>, what: string) => assert.rejects(p, /NOPERM/, `${what} should be refused`);

test("as host A's user: A's AttachNic steps, finishing pass, DetachNic, overlay and VPN keys are allowed; B's, IPAM's, the VPN's and the firewall's keys are refused", async () => {
  const sa = new HostStore(a, A);
  const sb = new HostStore(b, B);
  await sa.putVpc({ vpcId: VPC, ns: `mvpc-${A}-${VPC}`, createdMs: 1 });
  await sa.putSubnet({ subnetId: "subnet-0a0c0a0c0a0c", vpcId: VPC, cidr: "10.12.1.0/24", gatewayCidr: "10.12.1.1/24", mtu: 1500 });
  // Every step of A's attach, as A.
  const na = nic("nic-0000000aac01", "10.12.1.10");
  assert.deepEqual(await sa.addNic(na), { code: 1, id: na.nicId });
  assert.equal(await a.hexists(K.nicPending(A)!, na.nicId), 0, "its pending mark removed as A");
  assert.ok(
    (await a.xrange(vpcEvents(VPC), "-", "+")).some(([, f]) => f.includes("nic.attached") && f.includes(na.nicId)),
    "its event appended as A",
  );
  // A NIC left pending (its CONFIRM never sent), removed by A's pass as A.
  const stuck = nic("nic-0000000aac05", "10.12.1.15");
  const never = gated(a, (args) => args[1] === 3 && args[2] === K.claims(VPC), new Promise<void>(() => {}));
  void new HostStore(never, A).addNic(stuck);
  for (let i = 0; i < 200 && !(await a.hexists(K.nics(A), stuck.nicId)); i++) await new Promise((r) => setTimeout(r, 10));
  assert.deepEqual(await sa.discardPending(), { removed: [stuck.nicId], failed: [] });
  assert.equal(await a.hexists(K.nics(A), stuck.nicId), 0);
  // B, as B, is refused A's address (it reads A's keys, which every host may read) and replaces a claim A does not back.
  assert.deepEqual(await sb.addNic(nic("nic-0000000bac01", "10.12.1.10")), { code: -2, id: `${A}/${na.nicId}` });
  await b.hset(K.claims(VPC), `${VPC}/10.12.1.11`, `${A}/nic-0000000aac09`);
  assert.equal((await sb.addNic(nic("nic-0000000bac02", "10.12.1.11"))).code, 1, "B replaces a claim A does not back");
  await sa.delNic(na);
  assert.equal((await sb.addNic(nic("nic-0000000bac01", "10.12.1.10"))).code, 1, "free once A detached it");

  // A's overlay registry record, its membership of the VPC, and its VPN keys.
  const reg = new OverlayRegistry(a, A);
  const rec = hostRecord(A, "127.0.0.9", [VPC]);
  await reg.publish(rec, 60_000);
  assert.equal(await reg.join(VPC, 51820), true);
  const vpn = new VpnStore(a);
  await vpn.setEndpointKey(A, VPC, `${"B".repeat(42)}A=`);
  await vpn.setApplied(A, VPC, 3);

  // What A's user may not write, each in a slot A's scripts also use.
  await refused(a.hset(K.nics(B), "nic-0000000bac09", "{}"), "B's NIC records");
  await refused(a.hset(K.nicaddr(B), `${VPC}/10.12.1.99`, "nic-0000000bac09"), "B's NIC index");
  await refused(a.hset(K.nicPending(B)!, "nic-0000000bac01", "x"), "B's pending marks");
  await refused(a.set(K.overlayHost(B), JSON.stringify({ ...rec, id: B })), "B's registry record");
  await refused(a.hset(VPN_KEYS.cluster.hostKeys(B), VPC, "x"), "B's VPN keys");
  await refused(a.hset(IPAM_KEYS.cluster.vpc(VPC), "cidr", "0.0.0.0/0"), "IPAM's record of the VPC");
  await refused(a.hset(IPAM_KEYS.cluster.vpcReserved(VPC), "vpn", "{}"), "IPAM's reserved ranges");
  await refused(a.hset(VPN_KEYS.cluster.ep(VPC), "host", A), "the VPC's VPN endpoint");
  await refused(a.hset(VPN_KEYS.cluster.clients(VPC), "x", "{}"), "the VPC's VPN clients");
  await refused(a.hset(FW_KEYS.cluster.sg(VPC, "sg-0a0c0a0c0a0c"), "rules", "[]"), "a security group of the VPC");
  // …and the same through a script: a declared key A may not write fails the whole script, before any write.
  await refused(a.eval("redis.call('HSET', KEYS[1], 'x', '1') return 0", 1, K.nics(B)), "a script declaring B's records");
  await refused(a.eval("return 0", 1, IPAM_KEYS.cluster.vpc(VPC)), "a script declaring IPAM's record of the VPC");
  await refused(vpn.deleteEndpoint(VPC), "DeleteVpnEndpoint's script (the VPC's endpoint, its reserved ranges)");
  assert.equal(await b.hexists(K.nics(B), "x"), 0);
  await sb.delNic(nic("nic-0000000bac01", "10.12.1.10"));
  await sb.delNic(nic("nic-0000000bac02", "10.12.1.11"));
});

test("as host A's user: the gateway's host steps (NAT lease, transit indexes) are allowed; NAT gateways, floating IPs, port forwards and B's transit are refused", async () => {
  const G = GW_KEYS.cluster;
  const ga = new GatewayStore(a);
  // The lease of the VPC's NAT address (its slot, with the VPC's stream): taken and announced as A.
  assert.deepEqual(await ga.natLease(VPC, A, 60_000), { held: true, taken: true, holder: A });
  assert.ok(
    (await a.xrange(vpcEvents(VPC), "-", "+")).some(([, f]) => f.includes("gw.nat.holder") && f.includes(A)),
    "its event appended as A",
  );
  assert.deepEqual(await new GatewayStore(b).natLease(VPC, B, 60_000), { held: false, taken: false, holder: A }, "B may compete for it, and loses to A");
  assert.equal(await ga.natUnlease(VPC, A), true);
  // A's transit indexes, under its own tag.
  assert.equal(await ga.transitIndex(A, VPC), 0);
  assert.equal(await ga.releaseTransit(A, VPC), 0);
  // The control plane's records under {gw}, and B's transit, are not A's to write.
  await refused(a.hset(G.nat("nat-0a0c0a0c0a0c"), "vpc", VPC), "a NAT gateway's record");
  await refused(a.hset(G.vpcNat, VPC, "nat-0a0c0a0c0a0c"), "the VPC → NAT gateway index");
  await refused(a.hset(G.fipByAddr, "203.0.113.9", "fip-0a0c0a0c0a0c"), "the floating pool's address index");
  await refused(a.hset(G.fip("fip-0a0c0a0c0a0c"), "host", A), "a floating IP's record");
  await refused(a.hset(G.hostPorts(A), "tcp/22", "pf-0a0c0a0c0a0c"), "the port-forward index, even of A's own ports");
  await refused(a.hset(G.tokens, "nat\nx", "nat-0a0c0a0c0a0c"), "the gateway's client tokens");
  await refused(a.hset(G.transit(B), VPC, "7"), "B's transit indexes");
  await refused(new GatewayStore(a).allocateFip({ first: 3405803777, last: 3405803778 }, "", "x"), "AllocateFloatingIp's script");
});
