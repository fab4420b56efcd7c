// GatewayStore against a real redis-server: NAT gateways take their address
// out of the floating pool (one per VPC, the lowest free one, given back on
// delete), floating IPs, port forwards (an outside port unique per
// hypervisor), client tokens, NAT leases, transit indexes, the change events
// each write appends, and where the records live. No namespaces.
// gateway-store-on-cluster.test.ts runs the same cases on a Redis Cluster,
// where the {gw} scripts append no event and the store appends it from the
// client (GatewayStore.emitted): the assertions are the same, one behaviour.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import type { Redis } from "ioredis";
import { afterAll, beforeAll, describe, test } from "vitest";
import { AlreadyExistsError, FailedPreconditionError, ResourceExhaustedError } from "../../services/common/errors.js";
import { fieldsOf, REGISTRY_EVENTS, vpcEvents, type EventFields } from "../../services/common/events.js";
import { intToIp, ipToInt } from "../../services/common/validate.js";
import { GK, GW_KEYS, gwKeys, type GatewayKeys, type NatRec, type PfRec } from "../../services/gateway/schema.js";
import { GatewayStore } from "../../services/gateway/store.js";
import { ON_CLUSTER } from "../lib/on-cluster.js";
import { connectReady, startRedis, startRedisCluster } from "../lib/redis.js";

type Pool = { first: number; last: number };

let stop: () => Promise<void>;
let redis: Redis;
/** A second connection, so that racing writers are two clients. */
let redis2: Redis;
let keys: GatewayKeys;
let store: GatewayStore;

const hex = (bytes: number) => randomBytes(bytes).toString("hex");
const newVpc = () => `vpc-${hex(6)}`;
const newSubnet = () => `subnet-${hex(6)}`;
const newNic = () => `nic-${hex(6)}`;
const newHost = () => `gwsh${hex(4)}`;

/** Each call a pool of its own (16-aligned blocks of 198.18.0.0/15), so that cases share no address. */
let nextBlock = 0;
function newPool(size: number): Pool {
  assert.ok(size <= 16);
  const first = ipToInt("198.18.0.0") + 16 * nextBlock++;
  return { first, last: first + size - 1 };
}

const natSpec = (vpcId: string): Omit<NatRec, "id" | "createdMs" | "address"> => ({
  vpcId,
  subnetId: newSubnet(),
  sources: [newSubnet()],
  description: "egress",
});

const pfSpec = (vpcId: string, hostId: string, proto: "tcp" | "udp", outsidePort: number): Omit<PfRec, "id" | "createdMs"> => ({
  vpcId,
  proto,
  hostId,
  outsidePort,
  private: "10.7.1.10",
  privatePort: 80,
  nicId: newNic(),
  description: "web",
});

/** The addresses of `pool` held in the floating pool's address index (NAT gateways' and floating IPs'), lowest first. */
async function taken(pool: Pool): Promise<string[]> {
  const h = await redis.hgetall(keys.fipByAddr);
  return Object.keys(h)
    .filter((a) => ipToInt(a) >= pool.first && ipToInt(a) <= pool.last)
    .sort((a, b) => ipToInt(a) - ipToInt(b));
}

/** A stream's entries as field maps, oldest first. */
async function entries(stream: string): Promise<EventFields[]> {
  return (await redis.xrange(stream, "-", "+")).map(([, flat]) => fieldsOf(flat));
}

beforeAll(async () => {
  const srv = ON_CLUSTER ? await startRedisCluster() : await startRedis({ appendfsync: "no" });
  stop = () => srv.stop();
  [redis, redis2] = await Promise.all([connectReady({ url: srv.url }), connectReady({ url: srv.url })]);
  keys = gwKeys(redis);
  store = new GatewayStore(redis);
}, 60_000);

afterAll(async () => {
  redis?.disconnect();
  redis2?.disconnect();
  await stop?.();
});

describe("GatewayStore", () => {
  test("a NAT gateway takes the lowest free pool address, one per VPC, and gives it back on delete", async () => {
    const pool = { first: ipToInt("203.0.113.8"), last: ipToInt("203.0.113.11") };
    const [v1, v2, v3] = [newVpc(), newVpc(), newVpc()];
    const host = newHost();

    const nat = await store.createNat(natSpec(v1), "", pool);
    assert.equal(nat.address, "203.0.113.8", "the lowest free address");
    assert.equal(nat.vpcId, v1);
    assert.match(nat.id, /^nat-[0-9a-f]{12}$/);

    const fip = await store.allocateFip(pool, "", "web");
    assert.equal(fip.address, "203.0.113.9", "the next address, never the NAT gateway's");

    // A second NAT gateway for the VPC: refused, naming the one it has.
    await assert.rejects(store.createNat(natSpec(v1), "", pool), (e) => e instanceof AlreadyExistsError && e.message.includes(nat.id));
    // A wanted address a floating IP holds: refused.
    await assert.rejects(store.createNat(natSpec(v2), "", pool, "203.0.113.9"), (e) => e instanceof AlreadyExistsError && e.message.includes(fip.id));
    assert.equal(await store.natOfVpc(v2), null, "a refused create leaves no NAT gateway");
    const nat2 = await store.createNat(natSpec(v2), "", pool, "203.0.113.10");
    assert.equal(nat2.address, "203.0.113.10", "a free wanted address is taken");
    assert.equal((await store.allocateFip(pool, "", "last")).address, "203.0.113.11");
    assert.deepEqual(await taken(pool), ["203.0.113.8", "203.0.113.9", "203.0.113.10", "203.0.113.11"]);

    // The pool exhausted: neither a NAT gateway nor a floating IP.
    await assert.rejects(store.createNat(natSpec(v3), "", pool), ResourceExhaustedError);
    await assert.rejects(store.allocateFip(pool, "", "more"), ResourceExhaustedError);
    assert.equal(await store.natOfVpc(v3), null);

    // Read back.
    assert.deepEqual(await store.natOfVpc(v1), nat);
    assert.deepEqual(await store.getNat(nat.id), nat);
    const listed = (await store.listNats()).map((n) => n.id);
    assert.ok(listed.includes(nat.id) && listed.includes(nat2.id));

    // Delete: the address goes back to the pool, the lease with it.
    assert.equal((await store.natLease(v1, host, 30_000)).taken, true);
    assert.equal(await redis.exists(keys.natLease(v1)), 1);
    assert.equal(await store.deleteNat(nat), true);
    assert.equal(await store.deleteNat(nat), false, "deleted once");
    assert.equal(await redis.exists(keys.natLease(v1)), 0, "the lease is gone with the NAT gateway");
    assert.equal(await store.getNat(nat.id), null);
    assert.equal(await store.natOfVpc(v1), null);
    assert.ok(!(await store.listNats()).some((n) => n.id === nat.id));
    assert.deepEqual(await store.natOfVpc(v2), nat2, "the other VPC's NAT gateway stays");
    assert.equal((await store.allocateFip(pool, "", "reuse")).address, "203.0.113.8", "the freed address is allocated again");
  });

  test("a client token makes a create answer a retry with the first create's record", async () => {
    const pool = newPool(4);
    const vpc = newVpc();
    const token = `tok-${hex(4)}`;
    const a = await store.createNat(natSpec(vpc), token, pool);
    const b = await store.createNat(natSpec(vpc), token, pool);
    assert.deepEqual(b, a, "the same NAT gateway");
    assert.equal((await store.listNats()).filter((n) => n.vpcId === vpc).length, 1, "one record");
    assert.deepEqual(await taken(pool), [a.address], "one address taken");
    // Another token for the same VPC is another create: refused.
    await assert.rejects(store.createNat(natSpec(vpc), `${token}x`, pool), AlreadyExistsError);

    const host = newHost();
    const p1 = await store.createPf(pfSpec(vpc, host, "tcp", 2201), token);
    const p2 = await store.createPf(pfSpec(vpc, host, "tcp", 2201), token);
    assert.deepEqual(p2, p1, "the same port forward");
    assert.equal((await store.listPfs()).filter((p) => p.hostId === host).length, 1, "one record");
    assert.deepEqual(await redis.hgetall(keys.hostPorts(host)), { "tcp/2201": p1.id });
    await assert.rejects(store.createPf(pfSpec(vpc, host, "tcp", 2201), `${token}x`), AlreadyExistsError);
    // A NAT gateway's token and a port forward's are apart: the same token made both.
    assert.notEqual(p1.id, a.id);
  });

  test("a floating IP is associated and disassociated, and released only when unassociated", async () => {
    const pool = newPool(4);
    const vpc = newVpc();
    const host = newHost();
    const nicId = newNic();
    const fip = await store.allocateFip(pool, "", "db");
    assert.deepEqual([fip.vpcId, fip.private, fip.nicId, fip.hostId], ["", "", "", ""], "allocated unassociated");
    assert.equal(fip.address, intToIp(pool.first));
    const target = { vpcId: vpc, private: "10.7.1.20", nicId, hostId: host };

    await store.setFipTarget(fip, target);
    const on = (await store.getFip(fip.id))!;
    assert.deepEqual([on.vpcId, on.private, on.nicId, on.hostId], [vpc, "10.7.1.20", nicId, host]);
    assert.ok(on.associatedMs > 0);
    assert.deepEqual(await store.fipByAddress(fip.address), on);

    await assert.rejects(store.releaseFip(on), FailedPreconditionError, "associated: not released");
    assert.ok(await store.getFip(fip.id), "still there");
    assert.deepEqual(await taken(pool), [fip.address]);

    await store.setFipTarget(on, null);
    const off = (await store.getFip(fip.id))!;
    assert.deepEqual([off.vpcId, off.private, off.nicId, off.hostId, off.associatedMs], ["", "", "", "", 0]);

    // A release from a copy read before an associate (another caller's, in between): the stored record decides.
    await store.setFipTarget(off, target);
    await assert.rejects(
      store.releaseFip(off),
      (e) => e instanceof FailedPreconditionError && e.message.includes("associated with 10.7.1.20 now"),
      "a stale unassociated copy does not release an associated floating IP",
    );
    assert.equal((await store.getFip(fip.id))?.private, "10.7.1.20", "still associated, still allocated");
    await store.setFipTarget(off, null);

    assert.equal(await store.releaseFip(off), true);
    assert.equal(await store.getFip(fip.id), null);
    assert.equal(await store.fipByAddress(fip.address), null);
    assert.deepEqual(await taken(pool), [], "the address is free again");
    assert.ok(!(await store.listFips()).some((f) => f.id === fip.id));
  });

  test("an outside port is unique per hypervisor and protocol, and free again once deleted", async () => {
    const vpc = newVpc();
    const [a, b] = [newHost(), newHost()];
    const first = await store.createPf(pfSpec(vpc, a, "tcp", 8080), "");
    assert.equal(first.outsidePort, 8080);
    await assert.rejects(
      store.createPf(pfSpec(newVpc(), a, "tcp", 8080), ""),
      (e) => e instanceof AlreadyExistsError && e.message.includes(first.id),
      "same proto and port on the same host",
    );
    const onB = await store.createPf(pfSpec(vpc, b, "tcp", 8080), "");
    const udp = await store.createPf(pfSpec(vpc, a, "udp", 8080), "");
    assert.deepEqual(await store.getPf(onB.id), onB);
    assert.deepEqual(await store.getPf(udp.id), udp);
    assert.deepEqual(await redis.hgetall(keys.hostPorts(a)), { "tcp/8080": first.id, "udp/8080": udp.id });

    assert.equal(await store.deletePf(first), true);
    assert.equal(await store.deletePf(first), false, "deleted once");
    assert.equal(await store.getPf(first.id), null);
    const again = await store.createPf(pfSpec(vpc, a, "tcp", 8080), "");
    assert.notEqual(again.id, first.id);
    assert.deepEqual(await redis.hgetall(keys.hostPorts(a)), { "tcp/8080": again.id, "udp/8080": udp.id });
  });

  test("a NAT lease is taken when free, renewed by its holder, refused to others unless replaced", async () => {
    const vpc = newVpc();
    const [a, b] = [newHost(), newHost()];
    assert.deepEqual(await store.natLease(vpc, a, 5_000), { held: true, taken: true, holder: a });
    assert.deepEqual(await store.natLease(vpc, a, 60_000), { held: true, taken: false, holder: a }, "renewed");
    assert.ok((await redis.pttl(keys.natLease(vpc))) > 5_000, "the renewal set the new TTL");
    assert.deepEqual(await store.natLease(vpc, b, 60_000), { held: false, taken: false, holder: a }, "held by another");
    assert.deepEqual(await store.natLease(vpc, b, 60_000, newHost()), { held: false, taken: false, holder: a }, "replace names someone else");
    assert.equal(await redis.get(keys.natLease(vpc)), a);
    assert.deepEqual(await store.natLease(vpc, b, 60_000, a), { held: true, taken: true, holder: b }, "replacing the holder");
    assert.equal(await redis.get(keys.natLease(vpc)), b);

    assert.equal(await store.natUnlease(vpc, a), false, "not the holder");
    assert.equal(await redis.get(keys.natLease(vpc)), b);
    assert.equal(await store.natUnlease(vpc, b), true);
    assert.equal(await redis.exists(keys.natLease(vpc)), 0);
    assert.deepEqual(await store.natLease(vpc, a, 5_000), { held: true, taken: true, holder: a }, "free again");
  });

  test("transit indexes: lowest first, stable per VPC, freed ones reused lowest first, per host", async () => {
    const [h, other] = [newHost(), newHost()];
    const [v1, v2, v3, v4, v5] = [newVpc(), newVpc(), newVpc(), newVpc(), newVpc()];
    assert.equal(await store.transitIndex(h, v1), 0);
    assert.equal(await store.transitIndex(h, v2), 1);
    assert.equal(await store.transitIndex(h, v3), 2);
    assert.equal(await store.transitIndex(h, v2), 1, "the same index again");
    assert.equal(await store.releaseTransit(h, v3), 2);
    assert.equal(await store.releaseTransit(h, v1), 0);
    assert.equal(await store.releaseTransit(h, v1), undefined, "freed once");
    assert.equal(await store.transitIndex(h, v4), 0, "the lowest freed index");
    assert.equal(await store.transitIndex(h, v5), 2, "then the next freed one");
    assert.equal(await store.transitIndex(h, v1), 3, "then a never-used one");
    assert.deepEqual(
      await store.transitMap(h),
      new Map([
        [v2, 1],
        [v4, 0],
        [v5, 2],
        [v1, 3],
      ]),
    );
    assert.equal(await store.transitIndex(other, v2), 0, "another host counts from 0");
  });

  test("each write appends its event to the VPC's stream, a floating IP of no VPC to the fleet's", async () => {
    const pool = newPool(4);
    const vpc = newVpc();
    const host = newHost();
    const nat = await store.createNat(natSpec(vpc), "", pool);
    const fip = await store.allocateFip(pool, "", "ev");
    await store.setFipTarget(fip, { vpcId: vpc, private: "10.7.1.30", nicId: newNic(), hostId: host });
    const pf = await store.createPf(pfSpec(vpc, host, "tcp", 9443), "");
    await store.deletePf(pf);
    await store.natLease(vpc, host, 30_000);
    await store.deleteNat(nat);
    // Moved to another VPC: both VPCs' hosts hear it (the old one has rules to remove).
    const other = newVpc();
    await store.setFipTarget(fip, { vpcId: other, private: "10.7.2.30", nicId: newNic(), hostId: host });
    await store.setFipTarget(fip, null);
    await store.releaseFip((await store.getFip(fip.id))!);

    const got = (await entries(vpcEvents(vpc))).map((e) => [e.kind, e.id, e.host]);
    assert.deepEqual(got, [
      ["gw.nat.created", nat.id, undefined],
      ["gw.fip.associated", fip.id, undefined],
      ["gw.pf.created", pf.id, undefined],
      ["gw.pf.deleted", pf.id, undefined],
      ["gw.nat.holder", vpc, host],
      ["gw.nat.deleted", nat.id, undefined],
      ["gw.fip.associated", fip.id, undefined],
    ]);
    assert.deepEqual(
      (await entries(vpcEvents(other))).map((e) => [e.kind, e.id]),
      [
        ["gw.fip.associated", fip.id],
        ["gw.fip.disassociated", fip.id],
      ],
      "the VPC it moved to, then left",
    );
    const fleet = (await entries(REGISTRY_EVENTS)).filter((e) => [nat.id, fip.id, pf.id, vpc, other].includes(e.id));
    assert.deepEqual(
      fleet.map((e) => [e.kind, e.id]),
      [
        ["gw.fip.allocated", fip.id],
        ["gw.fip.released", fip.id],
      ],
      "the fleet stream has the allocation and the release (no VPC), and none of the VPCs' events",
    );
  });

  test("the records are where the client's layout puts them", async () => {
    const pool = newPool(2);
    const vpc = newVpc();
    const host = newHost();
    const nat = await store.createNat(natSpec(vpc), "", pool);
    await store.natLease(vpc, host, 30_000);
    assert.equal(keys.cluster, ON_CLUSTER);

    assert.deepEqual(await redis.hmget(keys.nat(nat.id), "id", "vpc", "address"), [nat.id, vpc, nat.address]);
    assert.equal(await redis.hget(keys.vpcNat, vpc), nat.id);
    assert.equal(await redis.hget(keys.fipByAddr, nat.address), nat.id);
    assert.equal(await redis.get(keys.natLease(vpc)), host);
    assert.equal(await store.transitIndex(host, vpc), 0);
    assert.equal(await redis.hget(keys.transit(host), vpc), "0");

    if (ON_CLUSTER) {
      assert.equal(keys, GW_KEYS.cluster);
      assert.ok(keys.nat(nat.id).startsWith("mvpc:{gw}:"), keys.nat(nat.id));
      assert.ok(keys.fipByAddr.startsWith("mvpc:{gw}:") && keys.tokens.startsWith("mvpc:{gw}:"));
      assert.equal(keys.natLease(vpc), `mvpc:{${vpc}}:gw:natlease`);
      assert.equal(keys.transit(host), `mvpc:{host:${host}}:gw:transit`);
      // The single-Redis names hold nothing.
      assert.equal(await redis.exists(GK.nat(nat.id)), 0, GK.nat(nat.id));
      assert.equal(await redis.exists(GK.natLease(vpc)), 0, GK.natLease(vpc));
      assert.equal(await redis.hget(GK.vpcNat, vpc), null);
      assert.equal(await redis.hget(GK.fipByAddr, nat.address), null);
      assert.equal(await redis.exists(GK.transit(host)), 0);
    } else {
      assert.equal(keys, GW_KEYS.single);
      assert.equal(keys.nat(nat.id), `mvpc:gw:nat:${nat.id}`);
      assert.equal(keys.natLease(vpc), `mvpc:gw:lease:nat:${vpc}`);
      assert.equal(keys.vpcNat, "mvpc:gw:vpcnat");
      assert.equal(keys.fipByAddr, "mvpc:gw:fip:byaddr");
      assert.equal(keys.tokens, "mvpc:tokens");
      assert.equal(keys.transit(host), `mvpc:gw:host:${host}:transit`);
      // The cluster's names hold nothing.
      assert.equal(await redis.exists(GW_KEYS.cluster.nat(nat.id)), 0);
      assert.equal(await redis.exists(GW_KEYS.cluster.natLease(vpc)), 0);
      assert.equal(await redis.exists(GW_KEYS.cluster.transit(host)), 0);
    }
  });

  test("racing creates: one NAT gateway per VPC, distinct floating IPs until the pool is exhausted", async () => {
    const stores = [store, new GatewayStore(redis2)];
    const natPool = newPool(4);
    const vpc = newVpc();
    const outcomes = await Promise.allSettled(Array.from({ length: 8 }, (_, i) => stores[i % 2].createNat(natSpec(vpc), "", natPool)));
    const won = outcomes.filter((o): o is PromiseFulfilledResult<NatRec> => o.status === "fulfilled").map((o) => o.value);
    const lost = outcomes.filter((o): o is PromiseRejectedResult => o.status === "rejected").map((o) => o.reason as Error);
    assert.equal(won.length, 1, "exactly one create succeeds");
    assert.equal(lost.length, 7);
    for (const e of lost) assert.ok(e instanceof AlreadyExistsError && e.message.includes(won[0].id), e.message);
    assert.deepEqual(await taken(natPool), [won[0].address], "exactly one address taken");
    assert.equal((await store.listNats()).filter((n) => n.vpcId === vpc).length, 1);

    const pool = newPool(10);
    const fips = await Promise.all(Array.from({ length: 10 }, (_, i) => stores[i % 2].allocateFip(pool, "", `race ${i}`)));
    const addrs = fips.map((f) => f.address).sort((a, b) => ipToInt(a) - ipToInt(b));
    assert.equal(new Set(addrs).size, 10, "10 distinct addresses");
    assert.deepEqual(
      addrs,
      Array.from({ length: 10 }, (_, i) => intToIp(pool.first + i)),
    );
    assert.deepEqual(await taken(pool), addrs);
    await assert.rejects(store.allocateFip(pool, "", "11th"), ResourceExhaustedError);
  });
});
