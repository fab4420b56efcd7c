// HostStore against a real redis-server: the writer refuses what would not
// read back, the reader skips an invalid record (and says why), keeps the last
// valid value of a record that turns invalid, and uses the rest. No namespaces.
import assert from "node:assert/strict";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, test } from "vitest";
import { InvalidArgumentError } from "../../services/common/errors.js";
import type { NicSpec, SubnetSpec } from "../../services/netagent/plan.js";
import { hostKeys } from "../../services/netagent/schema.js";
import { HostStore, locateNic } from "../../services/netagent/store.js";
import { startRedis, type TestRedis } from "../lib/redis.js";

const HOST = "hsthv1";
const VPC = "vpc-0123456789ab";
let srv: TestRedis;
let redis: Redis;

const subnet: SubnetSpec = { subnetId: "subnet-0123456789ab", vpcId: VPC, cidr: "10.5.1.0/24", gatewayCidr: "10.5.1.1/24", mtu: 1500 };
const nic = (n: number): NicSpec => ({
  nicId: `nic-00000000000${n}`,
  owner: `vm-${n}`,
  vpcId: VPC,
  subnetId: subnet.subnetId,
  kind: "veth",
  hostIf: `v00000000000${n}`,
  mac: `02:00:0a:05:01:0${n}`,
  address: `10.5.1.${10 + n}`,
  prefix: 24,
  gateway: "10.5.1.1",
  mtu: 1500,
  hostname: "",
  guestIf: "eth0",
  dns: ["10.5.0.2"],
  veth: { netnsPath: `/run/netns/vm${n}`, skipDefaultRoute: false },
  bandwidth: { ingressMbps: 0, egressMbps: 0 },
  createdMs: 1,
  clientToken: "",
});

beforeAll(async () => {
  srv = await startRedis({ appendfsync: "no" });
  redis = new Redis(srv.url);
}, 30_000);

afterAll(async () => {
  redis?.disconnect();
  await srv?.stop();
});

describe("HostStore", () => {
  test("the writer refuses a record that would not read back", async () => {
    const s = new HostStore(redis, HOST);
    await assert.rejects(s.putNic({ ...nic(1), hostIf: "x\nnetns exec a b" }), (e) => e instanceof InvalidArgumentError && /hostIf/.test(e.message));
    await assert.rejects(s.addNic({ ...nic(1), mac: 'x"' }), (e) => e instanceof InvalidArgumentError && /mac/.test(e.message));
    await assert.rejects(s.putSubnet({ ...subnet, gatewayCidr: "10.5.1.1/24 dev lo" }), /gatewayCidr/);
    await assert.rejects(s.putVpc({ vpcId: VPC, ns: "other", createdMs: 1 }), /ns/);
    assert.equal(await redis.exists(hostKeys.nics(HOST), hostKeys.subnets(HOST), hostKeys.vpcs(HOST)), 0, "nothing was written");
  });

  test("the reader skips invalid records with a reason, keeps a record's last valid value, uses the rest", async () => {
    const s = new HostStore(redis, HOST);
    await s.putVpc({ vpcId: VPC, ns: `mvpc-${HOST}-${VPC}`, createdMs: 1 });
    await s.putSubnet(subnet);
    assert.equal((await s.addNic(nic(1))).code, 1);
    assert.equal((await s.addNic(nic(2))).code, 1);
    let d = await s.load();
    assert.deepEqual([...d.nics.keys()].sort(), [nic(1).nicId, nic(2).nicId]);
    assert.deepEqual(d.invalid, []);
    // Hostile writes: a new NIC, one outside its subnet, a duplicate address, and nic 2 turned bad.
    await redis.hset(hostKeys.nics(HOST), "nic-000000000009", JSON.stringify({ ...nic(9), hostIf: 'v1" ; flush ruleset ; "' }));
    await redis.hset(hostKeys.nics(HOST), "nic-000000000008", JSON.stringify({ ...nic(8), address: "10.9.9.9" }));
    await redis.hset(hostKeys.nics(HOST), "nic-000000000007", JSON.stringify({ ...nic(7), address: nic(1).address }));
    await redis.hset(hostKeys.nics(HOST), nic(2).nicId, JSON.stringify({ ...nic(2), mtu: "9000" }));
    await redis.hset(hostKeys.subnets(HOST), "subnet-00000000000f", "{not json");
    d = await s.load();
    assert.deepEqual([...d.nics.keys()].sort(), [nic(1).nicId, nic(2).nicId], "only the good NICs, nic 2 at its last valid value");
    assert.equal(d.nics.get(nic(2).nicId)!.mtu, 1500);
    const why = new Map(d.invalid!.map((x) => [x.field, x.reason]));
    assert.match(why.get("nic-000000000009")!, /hostIf/);
    assert.match(why.get("nic-000000000008")!, /address/);
    assert.match(why.get("nic-000000000007")!, /already used/);
    assert.match(why.get(nic(2).nicId)!, /mtu/);
    assert.match(why.get("subnet-00000000000f")!, /not JSON/);
    // A fresh reader never saw nic 2 valid: it leaves it out.
    const fresh = await new HostStore(redis, HOST).load();
    assert.deepEqual([...fresh.nics.keys()], [nic(1).nicId]);
    assert.equal(await new HostStore(redis, HOST).getNic(nic(2).nicId), null, "getNic: an invalid record is no NIC");
    // Detaching forgets the last valid value.
    await s.delNic(nic(2));
    assert.ok(!(await s.load()).nics.has(nic(2).nicId));
  });

  test("locateNic refuses a malformed location", async () => {
    await redis.hset("mvpc:nicaddr", `${VPC}/10.5.1.50`, "hv1/nic-000000000001/extra");
    await redis.hset("mvpc:nicaddr", `${VPC}/10.5.1.51`, "hv 1/nic-000000000001");
    await redis.hset("mvpc:nicaddr", `${VPC}/10.5.1.52`, "hv1/nic-000000000001");
    assert.equal(await locateNic(redis, VPC, "10.5.1.50"), null);
    assert.equal(await locateNic(redis, VPC, "10.5.1.51"), null);
    assert.deepEqual(await locateNic(redis, VPC, "10.5.1.52"), { hostId: "hv1", nicId: "nic-000000000001" });
  });
});
