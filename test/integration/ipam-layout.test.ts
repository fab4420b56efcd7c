// A subnet's allocation state under its VPC's hash tag (issue 18, docs/redis-schema.md
// "Redis Cluster"), on a real Redis and a real 3+3 cluster:
// - on a single Redis, state the previous release made (with that release's
//   own scripts, test/lib/ipam-previous-scripts.ts) moves once, every
//   allocation and owner entry with it; that release's scripts then fail with
//   WRONGTYPE before writing, so a replica of it still running mid-upgrade
//   hands out no address twice and deletes no subnet in use;
// - on a cluster, Allocate, AllocateBatch and Release run (each script in one
//   slot) from several clients at once, and the previous layout's Allocate is
//   refused there (CROSSSLOT).
import assert from "node:assert/strict";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, test, vi } from "vitest";
import { connectRedis, LUA_SERVER_MS, waitReady } from "../../services/common/redis.js";
import { AlreadyExistsError, FailedPreconditionError } from "../../services/common/errors.js";
import { PENDING_MS } from "../../services/common/pending.js";
import { intToIp, ipToInt } from "../../services/common/validate.js";
import { IPAM_KEYS, K } from "../../services/ipam/keys.js";
import { allocRecord } from "../../services/ipam/schema.js";
import { TOMBSTONE } from "../../services/ipam/scripts.js";
import { FW_KEYS } from "../../services/firewall/keys.js";
import { GW_KEYS, LUA_NAT_HOLD, natHold } from "../../services/gateway/schema.js";
import { GatewayStore, type NatRec } from "../../services/gateway/store.js";
import { IpamStore, PENDING_TTL_MS, type SubnetRec } from "../../services/ipam/store.js";
import { DnsStore } from "../../services/dns/store.js";
import { PeeringStore } from "../../services/peering/store.js";
import { ipamClients } from "../lib/clients.js";
import { subnetSpec, vpcSpec as vpcOf } from "../lib/ipam-specs.js";
import { scratchRedis } from "../lib/scratch-redis.js";
import { startDaemon } from "../lib/daemon.js";
import * as Previous from "../lib/ipam-previous-scripts.js";
import { primaryNodes, startRedis, startRedisCluster, type TestRedis, type TestRedisCluster } from "../lib/redis.js";
import { takenBack } from "../lib/pending.js";

/** The keys of the previous release's ALLOCATE (its KEYS order) for a subnet and owner. */
function previousAllocateKeys(s: SubnetRec, owner: string): string[] {
  const L = K.legacy;
  return [K.subnet(s.id), L.bits(s.id), L.full(s.id), L.alloc(s.id), L.req(s.id), L.idx(s.id), L.used(s.id), `${L.ownerPrefix}${owner}`, K.events];
}

/** Runs the previous release's ALLOCATE_BATCH: count addresses for one owner. */
async function previousAllocateBatch(r: Redis, s: SubnetRec, owner: string, req: string, count: number): Promise<number[]> {
  return (await r.eval(Previous.ALLOCATE_BATCH, 9, ...previousAllocateKeys(s, owner), owner, req, count, Date.now(), s.id)) as number[];
}

/** Runs the previous release's RELEASE (index -1: by owner and request id). */
async function previousRelease(r: Redis, s: SubnetRec, index: number, owner: string, req: string): Promise<unknown> {
  const L = K.legacy;
  return await r.eval(
    Previous.RELEASE,
    8,
    K.subnet(s.id),
    L.bits(s.id),
    L.full(s.id),
    L.alloc(s.id),
    L.req(s.id),
    L.idx(s.id),
    L.used(s.id),
    K.events,
    index,
    owner,
    req,
    s.id,
    L.ownerPrefix,
    "",
  );
}

/** Runs the previous release's ALLOCATE (lowest free address): what one of its replicas does on Allocate. */
async function previousAllocate(r: Redis, s: SubnetRec, owner: string, req: string): Promise<[number, string | number]> {
  return (await r.eval(Previous.ALLOCATE, 9, ...previousAllocateKeys(s, owner), owner, req, -1, Date.now(), s.id)) as [number, string | number];
}

describe("on a single Redis: the move from the previous layout", () => {
  let redis: TestRedis;
  let r: Redis;
  let store: IpamStore;
  let vpcId: string;
  let n = 0;

  beforeAll(async () => {
    redis = await startRedis({ appendfsync: "no" });
    r = new Redis(redis.url);
    store = new IpamStore(r);
    const { vpc } = await store.createVpc(
      { name: "layout", cidr: "10.60.0.0/16", base: ipToInt("10.60.0.0"), prefix: 16, description: "", labels: [], publicCidr: false },
      "",
    );
    vpcId = vpc.id;
  });
  afterAll(async () => {
    r?.disconnect();
    await redis?.stop();
  });

  /** Puts a new subnet's state under the earlier names, as the previous release's CreateSubnet left it: no tombstones (the bitmaps are the same bytes). */
  async function asPreviousLayout(s: SubnetRec): Promise<void> {
    const [tagged, earlier] = [K.state(s.vpcId, s.id), K.legacy.state(s.id)];
    await r.del(K.legacy.req(s.id), K.legacy.alloc(s.id), K.legacy.used(s.id));
    for (const [i, k] of tagged.entries()) if (await r.exists(k)) await r.rename(k, earlier[i]);
  }

  /** A new subnet (a /24, or a /22 for `big`), made by this release. */
  async function subnet(big = false): Promise<SubnetRec> {
    const base = ipToInt("10.60.0.0") + 1024 * ++n;
    const [prefix, size] = big ? [22, 1024] : [24, 256];
    const { subnet: s } = await store.createSubnet(
      { vpcId, name: `s${n}`, cidr: `${intToIp(base)}/${prefix}`, base, prefix, size, type: "private", extraReserved: 0, description: "", labels: [] },
      "",
    );
    return s;
  }

  /**
   * A subnet as the previous release left it: its state under "mvpc:sn:<id>:…"
   * (the bitmaps its CreateSubnet wrote are the same bytes), no tombstones,
   * and three addresses allocated by that release's own ALLOCATE.
   */
  async function previousSubnet(): Promise<{ s: SubnetRec; held: Map<number, string> }> {
    const s = await subnet();
    await asPreviousLayout(s);
    const held = new Map<number, string>();
    for (const owner of ["vm-aaa", "vm-bbb", "vm-aaa"]) {
      const [code, idx] = await previousAllocate(r, s, owner, `req-${held.size}`);
      assert.equal(code, 1, "the previous release allocates in its own layout");
      held.set(Number(idx), owner);
    }
    assert.equal(await r.exists(K.used(s.vpcId, s.id)), 0);
    return { s, held };
  }

  test("state the previous release made moves once, with every allocation and owner entry; that release's scripts then fail before writing", async () => {
    const { s, held } = await previousSubnet();
    // The hosts' reader finds the allocation under the earlier name until the move (netagents upgrade first).
    const [firstIdx, firstOwner] = [...held][0];
    assert.match((await allocRecord(r, s, firstIdx))!, new RegExp(`^${firstOwner}\n`));

    assert.equal(await store.migrateAll(), 1, "one subnet to move");
    assert.equal(await store.migrateAll(), 0, "moved once");
    assert.deepEqual(new Map((await store.listBySubnet(s, -1, 100)).map((a) => [a.index, a.owner])), held);
    assert.equal((await store.usage(s)).used, 3);
    const aaa = await store.listByOwner("vm-aaa", "", 10);
    assert.deepEqual(
      aaa.map((x) => x.alloc.index).sort(),
      [...held]
        .filter(([, o]) => o === "vm-aaa")
        .map(([i]) => i)
        .sort(),
    );
    assert.equal(await r.exists(`${K.legacy.ownerPrefix}vm-aaa`, `${K.legacy.ownerPrefix}vm-bbb`), 0, "the earlier owner index emptied");
    assert.match((await allocRecord(r, s, firstIdx))!, new RegExp(`^${firstOwner}\n`), "read under the tag now");
    assert.equal(await allocRecord(r, s, 200), null, "a free address reads as free, the tombstone as absent");

    // Allowed: this release allocates past what was held.
    const next = await store.allocate(s, "vm-ccc", "r1", -1);
    assert.ok(!held.has(next.alloc.index), `a new address, not one held (${next.alloc.index})`);

    // Forbidden: a replica of the previous release still running.
    const before = await r.bitcount(K.bits(s.vpcId, s.id));
    await assert.rejects(previousAllocate(r, s, "vm-evil", "x"), /WRONGTYPE/, "its Allocate fails");
    await assert.rejects(previousAllocateBatch(r, s, "vm-evil", "b", 8), /WRONGTYPE/, "its AllocateBatch fails");
    await assert.rejects(previousRelease(r, s, firstIdx, "", ""), /WRONGTYPE/, "its Release by address fails");
    await assert.rejects(previousRelease(r, s, -1, firstOwner, "req-0"), /WRONGTYPE/, "its Release by request id fails");
    await assert.rejects(
      r.eval(
        Previous.DELETE_SUBNET,
        13,
        K.subnet(s.id),
        K.vpcSubnets(s.vpcId),
        K.vpcSubnetByName(s.vpcId),
        K.legacy.bits(s.id),
        K.legacy.full(s.id),
        K.legacy.used(s.id),
        K.legacy.alloc(s.id),
        K.legacy.req(s.id),
        K.legacy.idx(s.id),
        K.events,
        K.allSubnets,
        K.fwSubnetAcl,
        K.gwVpcNat,
        s.id,
      ),
      /WRONGTYPE/,
      "its DeleteSubnet fails",
    );
    assert.equal(await r.bitcount(K.bits(s.vpcId, s.id)), before, "nothing allocated");
    assert.equal(
      await r.exists(K.legacy.bits(s.id), K.legacy.full(s.id), K.legacy.idx(s.id), `${K.legacy.ownerPrefix}vm-evil`),
      0,
      "no earlier-layout state made again",
    );
    assert.ok(await store.getSubnet(s.id), "the subnet is still there");
    assert.equal((await store.usage(s)).used, 4);
    assert.deepEqual(
      new Map((await store.listBySubnet(s, -1, 100)).filter((a) => a.owner !== "vm-ccc").map((a) => [a.index, a.owner])),
      held,
      "every allocation kept",
    );
    assert.equal(await r.get(K.legacy.req(s.id)), TOMBSTONE);
  });

  test("a subnet this release makes refuses the previous release's Allocate as well; its own allocations work", async () => {
    const s = await subnet();
    await assert.rejects(previousAllocate(r, s, "vm-evil", "x"), /WRONGTYPE/);
    const a = await store.allocate(s, "vm-ddd", "r1", -1);
    assert.equal(a.alloc.index, 2, "the first address after network and gateway");
    assert.equal(await r.exists(K.legacy.bits(s.id)), 0);
  });

  test("a subnet the previous release makes after this one started moves on its first allocation; DeleteSubnet counts what it held", async () => {
    const { s } = await previousSubnet();
    await assert.rejects(store.deleteSubnet(s.id), (e: Error) => e instanceof FailedPreconditionError && /still has 3 allocated/.test(e.message));
    assert.ok(await store.getSubnet(s.id), "not deleted");
    assert.equal(await r.get(K.legacy.req(s.id)), TOMBSTONE, "moved by the delete's check");
    await assert.rejects(previousAllocate(r, s, "vm-evil", "x"), /WRONGTYPE/);
    const { s: s2, held: held2 } = await previousSubnet();
    // Two first uses at once: one moves it, the other finds it moved; both allocate.
    const [a, b] = await Promise.all([store.allocate(s2, "vm-eee", "r1", -1), store.allocate(s2, "vm-eee", "r2", -1)]);
    assert.ok(a.created && b.created && a.alloc.index !== b.alloc.index);
    assert.ok(!held2.has(a.alloc.index) && !held2.has(b.alloc.index));
    assert.equal((await store.usage(s2)).used, 5);
    // Calls answered together (ALLOCATE_MANY) on such a subnet: moved first, then every call allocated once.
    const { s: s3, held: held3 } = await previousSubnet();
    const many = await store.allocateMany(
      s3,
      ["vm-mmm", "vm-nnn", "vm-ooo"].map((owner) => ({ owner, requestId: "m1", wanted: -1 })),
    );
    const idx = many.map((m) => (m.ok && m.value.created ? m.value.alloc.index : -1));
    assert.equal(new Set(idx).size, 3);
    assert.ok(
      idx.every((i) => i >= 2 && !held3.has(i)),
      `${idx}`,
    );
    assert.equal(await r.get(K.legacy.req(s3.id)), TOMBSTONE);
    assert.equal((await store.usage(s3)).used, 6);
  });

  test("Release without an owner names the holder's owner index (declared, not built in the script)", async () => {
    const s = await subnet();
    const a = await store.allocate(s, "vm-fff", "r1", -1);
    assert.equal(await r.zcard(K.owner(s.vpcId, "vm-fff")), 1);
    assert.equal(await store.release(s, a.alloc.index, "", ""), a.alloc.index);
    assert.equal(await r.zcard(K.owner(s.vpcId, "vm-fff")), 0, "the holder's entry went with it");
    assert.equal(await store.release(s, a.alloc.index, "", ""), null, "a second release frees nothing");
    // Forbidden: another owner's release of it.
    const b = await store.allocate(s, "vm-ggg", "r1", -1);
    await assert.rejects(store.release(s, b.alloc.index, "vm-fff", ""), FailedPreconditionError);
    assert.equal((await store.getAllocation(s, b.alloc.index))?.owner, "vm-ggg", "still held");
    assert.equal(await r.zcard(K.owner(s.vpcId, "vm-ggg")), 1);
  });

  test("DNS's resolver check reads the allocation under the tag: an allocated address is refused, a free one taken; a hostile subnet index entry names no key", async () => {
    const s = await subnet();
    const dns = new DnsStore(r);
    const a = await store.allocate(s, "vm-dns", "r1", -1);
    const at = (i: number) => ({ text: intToIp(s.base + i), int: s.base + i });
    await assert.rejects(
      dns.updateConfig(vpcId, { resolver: at(a.alloc.index) }),
      (e: Error) => e instanceof FailedPreconditionError && /allocated to vm-dns/.test(e.message),
    );
    await dns.updateConfig(vpcId, { resolver: at(a.alloc.index + 1) });
    assert.equal((await dns.getConfig(vpcId)).resolver, intToIp(s.base + a.alloc.index + 1));
    // Forbidden: an entry of IPAM's subnet index that is not a subnet id reaches no key name.
    const evil = ipToInt("10.60.250.0");
    await r.zadd(K.vpcSubnets(vpcId), evil, "x}:evil");
    try {
      await assert.rejects(dns.updateConfig(vpcId, { resolver: { text: "10.60.250.5", int: evil + 5 } }), /not a subnet id/);
      assert.equal((await dns.getConfig(vpcId)).resolver, intToIp(s.base + a.alloc.index + 1), "unchanged");
    } finally {
      await r.zrem(K.vpcSubnets(vpcId), "x}:evil");
    }
  });

  test("microvpcd ipam moves them when it starts, before it answers; then Allocate and ListAllocations over gRPC see the moved allocations", async () => {
    const { s, held } = await previousSubnet();
    const d = await startDaemon("ipam", ["--redis", redis.url, "--log-level", "info"]);
    try {
      assert.match(d.output(), /moved subnets' allocation state under their VPC's hash tag/);
      assert.equal(await r.get(K.legacy.req(s.id)), TOMBSTONE, "moved before SERVING");
      const c = ipamClients(d.address);
      const a = await c.ipam.allocate({ subnetId: s.id, owner: "vm-aaa", requestId: "over-grpc" });
      const idx = ipToInt(a.allocation!.address) - s.base;
      assert.ok(!held.has(idx), `a free address (${a.allocation!.address}), not one the earlier release handed out`);
      const mine = await c.ipam.listAllocations({ owner: "vm-aaa", pageSize: 1 });
      // The rest in one page: earlier tests of this file left vm-aaa addresses in other subnets of the VPC too.
      const second = await c.ipam.listAllocations({ owner: "vm-aaa", pageSize: 100, pageToken: mine.nextPageToken });
      const listed = [...mine.allocations, ...second.allocations].filter((x) => x.subnetId === s.id).map((x) => ipToInt(x.address) - s.base);
      assert.deepEqual(listed.sort(), [...[...held].filter(([, o]) => o === "vm-aaa").map(([i]) => i), idx].sort(), "paged by VPC, then subnet/index");
    } finally {
      await d.stop();
    }
  });

  test("a large subnet's owner entries move in steps; a move a stopped daemon left half-way is finished by the next start", async () => {
    const s = await subnet(true);
    await asPreviousLayout(s);
    const owners = ["vm-p", "vm-q", "vm-r"];
    for (const [i, o] of owners.entries()) assert.equal((await previousAllocateBatch(r, s, o, `b${i}`, 300))[0], 1);
    const earlier = await Promise.all(owners.map((o) => r.zcard(`${K.legacy.ownerPrefix}${o}`)));
    assert.deepEqual(earlier, [300, 300, 300], "before the move every owner entry is under the earlier name");
    // One step, as a daemon stopped after its first call would leave it: renamed, tombstoned, the first 100 owner entries
    // (in address order) moved. The cursor is an address index, which means the same after a restart or a failover.
    const L = K.legacy;
    const one = await store.migrateStep(s, 100);
    assert.deepEqual(one.slice(0, 2), [1, 1], "renamed, more to move");
    assert.equal(await r.get(K.moving(s.vpcId, s.id)), "101", "the last index moved: 2 (first after network and gateway) + 99");
    const movedSoFar = (await Promise.all(owners.map((o) => r.zcard(K.owner(s.vpcId, o))))).reduce((x, y) => x + y, 0);
    assert.equal(movedSoFar, 100, "one step moved 100 entries");
    await assert.rejects(previousAllocate(r, s, "vm-evil", "x"), /WRONGTYPE/, "tombstoned from the first step");
    // Served meanwhile: an allocation, and the release of an entry the move has not reached (vm-r holds the highest).
    const fresh = await store.allocate(s, "vm-p", "fresh", -1);
    assert.ok(fresh.created);
    const lastR = Math.max(...(await store.listBySubnet(s, -1, 2000)).filter((x) => x.owner === "vm-r").map((x) => x.index));
    assert.equal(await store.release(s, lastR, "vm-r", ""), lastR);
    // The next start finishes it.
    assert.equal(await store.migrateAll(), 0, "nothing left to rename");
    assert.equal(await r.exists(K.moving(s.vpcId, s.id)), 0, "the step cursor is gone");
    for (const o of owners) assert.equal(await r.exists(`${L.ownerPrefix}${o}`), 0, `${o}'s earlier index emptied, the released entry too`);
    const counts = await Promise.all(owners.map((o) => r.zcard(K.owner(s.vpcId, o))));
    assert.deepEqual(counts, [301, 300, 299], "every live entry in the tagged index, with the one made meanwhile, without the one released");
    assert.equal((await store.listByOwner("vm-p", "", 1000)).length, 301);
  });
});

describe("on a single Redis: a VPC's two steps", () => {
  const db = scratchRedis();

  test("the claim keeps the record in the same step: a create stopped right after it leaves no VPC that expires", async () => {
    const st = new IpamStore(db.r);
    const L = IPAM_KEYS.single;
    const id = "vpc-00000000c0de";
    const spec = vpcOf("stopped", "10.77.0.0/16");
    await db.r
      .multi()
      .hset(L.vpc(id), { ...spec, id, labels: "[]", created: Date.now(), public: "0" })
      .pexpire(L.vpc(id), PENDING_TTL_MS)
      .exec();
    // What createVpc sends next; the daemon is taken to die right after it.
    assert.deepEqual(await db.r.mvpcClaimVpc(4, L.vpcByName, L.vpcNames, L.vpcTokens, L.vpc(id), id, "stopped", "", "", "0", ""), [1, id]);
    assert.equal(await db.r.pttl(L.vpc(id)), -1);
    assert.equal((await st.vpcByRef("vpc", "stopped")).id, id);
  });

  test("a record copied under another id, and a name or subnet index naming something that is not an id, are no VPC or subnet", async () => {
    const st = new IpamStore(db.r);
    const { vpc } = await st.createVpc(vpcOf("real", "10.78.0.0/16"), "");
    const copy = "vpc-0000000000aa";
    await db.r.hset(IPAM_KEYS.single.vpc(copy), await db.r.hgetall(IPAM_KEYS.single.vpc(vpc.id)));
    assert.equal(await st.getVpc(copy), null, "its record says another id");
    await db.r.hset(IPAM_KEYS.single.vpcByName, "forged", "mvpc:vpc:../x");
    assert.equal(await st.resolveVpc({ name: "forged" }), null);
    await db.r.hset(IPAM_KEYS.single.vpcSubnetByName(vpc.id), "forged", "subnet-x}{");
    assert.equal(await st.resolveSubnet({ name: "forged" }, vpc.id), null);
    assert.equal(await st.getSubnet("not-an-id"), null);
  });
});

describe("on a Redis Cluster (3 primaries, 3 replicas)", () => {
  let cluster: TestRedisCluster;
  const clients: Redis[] = [];
  let s: SubnetRec;
  let vpcId: string;

  beforeAll(async () => {
    cluster = await startRedisCluster();
    for (let i = 0; i < 4; i++) clients.push(connectRedis({ url: cluster.url, commandTimeoutMs: 2000 }));
    await Promise.all(clients.map((c) => waitReady(c)));
    // Made on the cluster itself: the VPC's record and indexes under its tag, the catalog under {catalog} (IpamKeys).
    const st = new IpamStore(clients[0]);
    const { vpc } = await st.createVpc(
      { name: "cl", cidr: "10.61.0.0/16", base: ipToInt("10.61.0.0"), prefix: 16, description: "", labels: [], publicCidr: false },
      "",
    );
    vpcId = vpc.id;
    s = (await st.createSubnet(subnetSpec(vpc.id, "a", "10.61.0.0/22"), "")).subnet;
  }, 60_000);
  afterAll(async () => {
    for (const c of clients) c.disconnect();
    await cluster?.stop();
  });

  test("a subnet's state, its owner indexes and its VPC's change stream share one slot", async () => {
    const c = clients[0];
    const slot = (key: string) => c.cluster("KEYSLOT", key) as Promise<number>;
    const want = await slot(`mvpc:{${s.vpcId}}:events`);
    for (const key of [...K.state(s.vpcId, s.id), K.owner(s.vpcId, "vm-x")]) assert.equal(await slot(key), want, key);
  });

  test("Allocate, AllocateBatch and Release run, from four clients at once; no address twice", async () => {
    const stores = clients.map((c) => new IpamStore(c));
    const got = await Promise.all(Array.from({ length: 200 }, (_, i) => stores[i % 4].allocate(s, `vm-${i % 7}`, `r${i}`, -1)));
    const idx = got.map((g) => g.alloc.index);
    assert.equal(new Set(idx).size, 200, "200 distinct addresses");
    assert.ok(idx.every((i) => i >= 2 && i < 1023));
    const again = await stores[1].allocate(s, "vm-3", "r3", -1);
    assert.deepEqual([again.created, again.alloc.index], [false, got[3].alloc.index], "a retry gets its address back");
    const batch = await stores[2].allocateBatch(s, "vm-batch", "b1", 50);
    assert.equal(new Set([...idx, ...batch.allocs.map((a) => a.index)]).size, 250);
    assert.equal((await stores[0].usage(s)).used, 250);
    // Calls answered together: one script naming 20 owners' indexes, all in the VPC's slot.
    const many = await stores[3].allocateMany(
      s,
      Array.from({ length: 20 }, (_, i) => ({ owner: `vm-m${i}`, requestId: "m", wanted: -1 })),
    );
    const manyIdx = many.map((m) => (m.ok ? m.value.alloc.index : -1));
    assert.equal(new Set([...idx, ...batch.allocs.map((a) => a.index), ...manyIdx]).size, 270, "20 more, none twice");
    assert.equal((await stores[0].usage(s)).used, 270);
    assert.deepEqual(
      (await stores[1].listByOwner("vm-m7", "", 10)).map((a) => a.alloc.index),
      [manyIdx[7]],
    );
    // Release by owner, and without one (the holder's index is named on the second try).
    assert.equal(await stores[3].release(s, got[0].alloc.index, "vm-0", ""), got[0].alloc.index);
    assert.equal(await stores[3].release(s, got[1].alloc.index, "", ""), got[1].alloc.index);
    await assert.rejects(stores[0].release(s, got[2].alloc.index, "vm-0", ""), FailedPreconditionError, "another owner's address is not released");
    assert.equal((await stores[0].usage(s)).used, 268);
    const mine = await stores[0].listByOwner("vm-batch", "", 100);
    assert.equal(mine.length, 50);
  });

  /** Every key matching `pattern` on the cluster's primaries. */
  async function keysLike(pattern: string): Promise<string[]> {
    return (await Promise.all(primaryNodes(clients[0]).map((n) => n.keys(pattern)))).flat().sort();
  }

  const vpcSpec = (name: string) => vpcOf(name, "10.70.0.0/16");

  test("a VPC's record and IPAM's indexes of it share its slot; the catalog has one slot; what counts keeps no expiry", async () => {
    const c = clients[0];
    const L = IPAM_KEYS.cluster;
    const slot = (key: string) => c.cluster("KEYSLOT", key) as Promise<number>;
    const want = await slot(K.used(vpcId, s.id));
    for (const key of [L.vpc(vpcId), L.vpcSubnets(vpcId), L.vpcSubnetByName(vpcId), L.vpcReserved(vpcId), L.subnetIn(vpcId, s.id), L.subnetTokens(vpcId)])
      assert.equal(await slot(key), want, key);
    const cat = await slot(L.vpcByName);
    for (const key of [L.vpcNames, L.vpcTokens]) assert.equal(await slot(key), cat, key);
    assert.equal(await c.exists(K.vpc(vpcId)), 0, "the single-Redis name is not written on a cluster");
    // Written ahead of the step that makes them count, they expire unless it succeeded.
    assert.equal(await c.pttl(L.vpc(vpcId)), -1, "the VPC's record");
    assert.equal(await c.pttl(K.subnet(s.id)), -1, "the subnet's record by id");
    assert.equal(await c.zscore(K.allSubnets, s.id), "0");
    const ev = await c.xrange(`mvpc:{${vpcId}}:events`, "-", "+");
    assert.deepEqual(
      ev.map(([, f]) => f[1]),
      ["vpc.created", "subnet.created"],
      "each step's event on the VPC's stream",
    );
  });

  test("CreateVpc of 8 names, each from four clients at once: one VPC per name, the losers' records removed", async () => {
    const stores = clients.map((c) => new IpamStore(c));
    const before = await keysLike("mvpc:{vpc-*}:vpc");
    const results = await Promise.allSettled(Array.from({ length: 32 }, (_, i) => stores[i % 4].createVpc(vpcSpec(`race-${i % 8}`), "")));
    const won = results.flatMap((r) => (r.status === "fulfilled" ? [r.value.vpc] : []));
    for (const r of results) if (r.status === "rejected") assert.ok(r.reason instanceof AlreadyExistsError, String(r.reason));
    assert.deepEqual(
      won.map((v) => v.name).sort(),
      [0, 1, 2, 3, 4, 5, 6, 7].map((i) => `race-${i}`),
    );
    const added = (await keysLike("mvpc:{vpc-*}:vpc")).filter((k) => !before.includes(k));
    assert.deepEqual(added, won.map((v) => IPAM_KEYS.cluster.vpc(v.id)).sort(), "only the winners' records");
    for (const v of won) assert.equal(await clients[0].hget(IPAM_KEYS.cluster.vpcByName, v.name), v.id);
  });

  test("one client token from four clients at once: one VPC, every call answered with it", async () => {
    const stores = clients.map((c) => new IpamStore(c));
    const before = await keysLike("mvpc:{vpc-*}:vpc");
    const got = await Promise.all(Array.from({ length: 8 }, (_, i) => stores[i % 4].createVpc(vpcSpec("tok-race"), "orch-7")));
    assert.equal(new Set(got.map((g) => g.vpc.id)).size, 1);
    assert.equal(got.filter((g) => g.created).length, 1);
    assert.equal((await keysLike("mvpc:{vpc-*}:vpc")).filter((k) => !before.includes(k)).length, 1);
  });

  test("a name whose VPC record is gone (a delete stopped half-way, a forged entry) is taken over; a live one is not", async () => {
    const c = clients[0];
    const L = IPAM_KEYS.cluster;
    const st = new IpamStore(c);
    await c.hset(L.vpcByName, "ghost", "vpc-000000000000", "junk", "not an id");
    await c.zadd(L.vpcNames, 0, "ghost", 0, "junk");
    const listed = (await st.listVpcs("", 1000)).map((v) => v.name);
    assert.ok(!listed.includes("ghost") && !listed.includes("junk"), "lists skip them");
    const g = await st.createVpc(vpcSpec("ghost"), "");
    assert.equal(g.created, true);
    assert.equal(await c.hget(L.vpcByName, "ghost"), g.vpc.id);
    assert.equal((await st.createVpc(vpcSpec("junk"), "")).created, true);
    await assert.rejects(st.createVpc(vpcSpec("ghost"), ""), AlreadyExistsError);
  });

  test("DeleteVpc and DeleteSubnet in steps: refused while another service holds the VPC or subnet, then every key goes", async () => {
    const c = clients[0];
    const L = IPAM_KEYS.cluster;
    const st = new IpamStore(c);
    const { vpc } = await st.createVpc(vpcSpec("del"), "");
    const other = (await st.createVpc({ ...vpcSpec("del-peer"), cidr: "10.71.0.0/16", base: ipToInt("10.71.0.0") }, "")).vpc;
    const pcx = new PeeringStore(c);
    const { peering } = await pcx.create(
      { vpc1Id: vpc.id, vpc2Id: other.id, vpc1Cidr: vpc.cidr, vpc2Cidr: other.cidr, vpc1Allowed: [], vpc2Allowed: [], description: "", labels: [] },
      () => "del-peer",
      "",
    );
    await assert.rejects(st.deleteVpc(vpc.id), /is still peered \(1 peering/);
    await pcx.delete(peering);
    // The firewall's groups and ACLs of the VPC are in its slot (FW_KEYS.cluster): DROP_VPC checks them.
    await c.zadd(FW_KEYS.cluster.vpcSgs(vpc.id), 0, "g/sg-000000000001");
    await c.zadd(FW_KEYS.cluster.vpcAcls(vpc.id), 0, "a/acl-000000000001");
    await assert.rejects(st.deleteVpc(vpc.id), /still has 1 security group\(s\), 1 network ACL\(s\)/);
    await c.del(FW_KEYS.cluster.vpcSgs(vpc.id), FW_KEYS.cluster.vpcAcls(vpc.id));
    // The gateway's NAT gateway index is in another slot ({gw}): checked from the client first.
    const GW = GW_KEYS.cluster;
    await c.hset(GW.vpcNat, vpc.id, "nat-000000000001");
    await assert.rejects(st.deleteVpc(vpc.id), /still has a NAT gateway/);
    const sn = (await st.createSubnet(subnetSpec(vpc.id, "x", "10.70.1.0/24"), "")).subnet;
    // A refused create leaves no record by id behind.
    const byId = await keysLike("mvpc:subnet:*");
    await assert.rejects(st.createSubnet(subnetSpec(vpc.id, "y", "10.70.1.0/25"), ""), /overlaps subnet x/);
    await assert.rejects(st.createSubnet(subnetSpec(vpc.id, "x", "10.70.2.0/24"), ""), /already has a subnet named "x"/);
    assert.deepEqual(await keysLike("mvpc:subnet:*"), byId);
    await c.hset(FW_KEYS.cluster.subnetAcl(vpc.id), sn.id, "acl-000000000001");
    await assert.rejects(st.deleteSubnet(sn.id), /network ACL acl-000000000001 is associated/);
    await c.hdel(FW_KEYS.cluster.subnetAcl(vpc.id), sn.id);
    // The VPC's NAT gateway sitting in the subnet: its record under {gw}, its hold on the subnet in the VPC's slot; the single Redis's names count for nothing here.
    await c.hset(GW.nat("nat-000000000001"), "subnet", sn.id);
    await c.hset(GW.natHolds!(vpc.id), "nat-000000000001", natHold(sn.id, 0));
    await assert.rejects(st.deleteSubnet(sn.id), /NAT gateway nat-000000000001 sits in it \(microvpc nat delete\)/);
    // Its hold lost (a failover before the hold reached a replica): the VPC's gateway, read from the client, still refuses.
    await c.hdel(GW.natHolds!(vpc.id), "nat-000000000001");
    await assert.rejects(st.deleteSubnet(sn.id), /NAT gateway nat-000000000001 sits in it \(microvpc nat delete\)/);
    await c.hdel(GW.vpcNat, vpc.id);
    // The single Redis's names hold no NAT gateway on a cluster, for DeleteVpc and DeleteSubnet (below).
    await c.hset(K.gwVpcNat, vpc.id, "nat-000000000001");
    await c.hset(K.gwNat("nat-000000000001"), "subnet", sn.id);
    await assert.rejects(st.deleteVpc(vpc.id), /still has 1 subnet/);
    assert.equal(await st.deleteSubnet(sn.id), true);
    for (const key of [GW.nat("nat-000000000001"), K.gwNat("nat-000000000001"), K.gwVpcNat]) await c.del(key);
    for (const key of [K.subnet(sn.id), L.subnetIn(vpc.id, sn.id), K.used(vpc.id, sn.id)]) assert.equal(await c.exists(key), 0, key);
    assert.equal(await c.zscore(K.allSubnets, sn.id), null);
    assert.equal(await st.deleteVpc(vpc.id), true);
    assert.deepEqual([await c.exists(L.vpc(vpc.id)), await c.hget(L.vpcByName, "del"), await c.zscore(L.vpcNames, "del")], [0, null, null]);
    assert.equal(await st.deleteVpc(vpc.id), false, "a second delete is a no-op");
  });

  /**
   * A client of its own whose DeleteSubnet scripts (DELETE_SUBNET, its last
   * step, after it read which NAT gateway holds have no record) each run
   * `before` first: a delete stalled there.
   */
  async function stalledDeletes(before: () => Promise<void>): Promise<{ c: Redis; st: IpamStore }> {
    const c = connectRedis({ url: cluster.url, commandTimeoutMs: 2000 });
    await waitReady(c);
    const st = new IpamStore(c);
    const script = c.mvpcDeleteSubnet.bind(c);
    c.mvpcDeleteSubnet = async (...a) => {
      await before();
      return script(...a);
    };
    return { c, st };
  }

  /**
   * A GatewayStore whose CreateNatGateway runs `between` after its hold on
   * the subnet and before its record (createNat): a create stalled, or
   * stopped if `between` throws, between its two steps.
   */
  function stalledCreates(c: Redis, between: () => Promise<void>): GatewayStore {
    const gs = new GatewayStore(c);
    const record = gs.createNat.bind(gs);
    gs.createNat = async (...a) => {
      await between();
      return record(...a);
    };
    return gs;
  }

  /** A step of an interleaving: `passed` settles once `open` is called. */
  function gate(): { open: () => void; passed: Promise<void> } {
    let open!: () => void;
    const passed = new Promise<void>((r) => (open = r));
    return { open, passed };
  }

  /** Date.now() of this process `ms` off (another host's clock), until the returned restore. */
  function skewed(ms: number): () => void {
    const now = Date.now.bind(Date);
    const spy = vi.spyOn(Date, "now").mockImplementation(() => now() + ms);
    return () => spy.mockRestore();
  }

  /** performance.now() of this process `ms` ahead (as if a step had taken that long), until the returned restore. */
  function later(ms: number): () => void {
    const now = performance.now.bind(performance);
    const spy = vi.spyOn(performance, "now").mockImplementation(() => now() + ms);
    return () => spy.mockRestore();
  }

  const natPool = { first: ipToInt("198.18.9.1"), last: ipToInt("198.18.9.62") };
  const natIn = (sn: SubnetRec) => ({ vpcId: sn.vpcId, subnetId: sn.id, sources: [], description: "" });
  /** Writes a hold as HOLD_NAT does, `age` ms before now by the Redis server's clock (the clock the sweep goes by). */
  const AGED_HOLD = `${LUA_SERVER_MS}${LUA_NAT_HOLD}
local now = server_ms()
redis.call('HSET', KEYS[1], ARGV[1], nat_hold(ARGV[2], now - tonumber(ARGV[3])))
return now`;
  const agedHold = (c: Redis, vpc: string, nat: string, subnet: string, age: number) => c.eval(AGED_HOLD, 1, GW_KEYS.cluster.natHolds!(vpc), nat, subnet, age);

  /** The NAT gateways of a VPC (its index entry, read back) and whether its subnet `sn` stands. */
  async function site(gs: GatewayStore, sn: SubnetRec): Promise<{ nat: string | null; subnet: boolean }> {
    const nat = await gs.natOfVpc(sn.vpcId);
    return { nat: nat?.id ?? null, subnet: (await new IpamStore(clients[0]).getSubnet(sn.id)) !== null };
  }

  test("CreateNatGateway against DeleteSubnet of its subnet, each interleaving of their steps: the subnet gone and no NAT gateway, or both standing, never a NAT gateway in a deleted subnet", async () => {
    const st = new IpamStore(clients[0]);
    const { vpc } = await st.createVpc(vpcSpec("natsteps"), "");
    const holds = GW_KEYS.cluster.natHolds!(vpc.id);
    const plain = new GatewayStore(clients[1]);
    let n = 0;
    const fresh = async () => (await st.createSubnet({ ...subnetSpec(vpc.id, `n${n}`, `10.70.${10 + n++}.0/24`), type: "public" }, "")).subnet;
    /** After a round: one of the two outcomes, then cleaned up. */
    const outcome = async (sn: SubnetRec, want: "deleted" | "nat") => {
      const got = await site(plain, sn);
      if (want === "deleted") assert.deepEqual(got, { nat: null, subnet: false }, "the subnet is gone and no NAT gateway was kept");
      else {
        assert.equal(got.subnet, true, "the NAT gateway stands, and so does its subnet");
        const nat = (await plain.natOfVpc(vpc.id))!;
        assert.equal(nat.subnetId, sn.id);
        assert.deepEqual(JSON.parse((await clients[2].hget(holds, nat.id))!).subnet, sn.id, "its hold names its subnet");
        assert.equal(await plain.deleteNat(nat), true);
        assert.equal(await st.deleteSubnet(sn.id), true, "DeleteNatGateway, then DeleteSubnet succeeds");
      }
      assert.equal(await clients[2].hlen(holds), 0, "no hold left");
    };

    // 1. The whole delete first: the create's hold finds no subnet.
    let sn = await fresh();
    assert.equal(await st.deleteSubnet(sn.id), true);
    await assert.rejects(
      plain.createNatInSubnet(natIn(sn), "", natPool),
      (e: Error) => e instanceof FailedPreconditionError && /is gone or being deleted/.test(e.message),
    );
    await outcome(sn, "deleted");

    // 2. The create holds, and stalls before its record while a whole delete runs: refused, a create is under way.
    sn = await fresh();
    let deleted: Promise<boolean> | undefined;
    const s2 = sn;
    const gs2 = stalledCreates(clients[1], async () => {
      deleted = st.deleteSubnet(s2.id);
      await assert.rejects(
        deleted,
        (e: Error) => e instanceof FailedPreconditionError && /a NAT gateway is being created in it \(nat-[0-9a-f]{12}\); retry/.test(e.message),
      );
    });
    await gs2.createNatInSubnet(natIn(sn), "", natPool);
    assert.ok(deleted, "the delete ran between the create's steps");
    await outcome(sn, "nat");

    // 3. The delete reads the holds' records, then stalls before its script while a whole create runs: its script sees the hold.
    sn = await fresh();
    let created: Promise<unknown> | undefined;
    const s3 = sn;
    let once = true;
    const stalled3 = await stalledDeletes(async () => {
      if (!once) return;
      once = false;
      created = plain.createNatInSubnet(natIn(s3), "", natPool);
      await created;
    });
    try {
      await assert.rejects(
        stalled3.st.deleteSubnet(sn.id),
        (e: Error) => e instanceof FailedPreconditionError && /NAT gateway nat-[0-9a-f]{12} sits in it \(microvpc nat delete\)/.test(e.message),
      );
    } finally {
      stalled3.c.disconnect();
    }
    assert.ok(created, "the create ran inside the delete");
    await outcome(sn, "nat");

    // 4. The create holds and stalls; the delete finds that hold without a record and stalls; the record lands; the script: a young hold, refused.
    sn = await fresh();
    const record4 = gate();
    const held4 = gate();
    const gs4 = stalledCreates(clients[1], async () => {
      held4.open();
      await record4.passed;
    });
    const creating = gs4.createNatInSubnet(natIn(sn), "", natPool);
    await held4.passed;
    const stalled4 = await stalledDeletes(async () => {
      record4.open();
      await creating;
    });
    try {
      await assert.rejects(
        stalled4.st.deleteSubnet(sn.id),
        (e: Error) => e instanceof FailedPreconditionError && /a NAT gateway is being created in it.*; retry/.test(e.message),
      );
    } finally {
      stalled4.c.disconnect();
    }
    await outcome(sn, "nat");

    // 5. The delete reads (nothing held), stalls; the create holds and stalls before its record; the script sees the hold and refuses; the record lands.
    sn = await fresh();
    const record5 = gate();
    const held5 = gate();
    const gs5 = stalledCreates(clients[1], async () => {
      held5.open();
      await record5.passed;
    });
    let creating5: Promise<unknown> | undefined;
    const s5 = sn;
    const stalled5 = await stalledDeletes(async () => {
      creating5 ??= gs5.createNatInSubnet(natIn(s5), "", natPool);
      await held5.passed;
    });
    try {
      await assert.rejects(
        stalled5.st.deleteSubnet(sn.id),
        (e: Error) => e instanceof FailedPreconditionError && /NAT gateway nat-[0-9a-f]{12} sits in it/.test(e.message),
      );
    } finally {
      stalled5.c.disconnect();
    }
    record5.open();
    await creating5;
    await outcome(sn, "nat");

    // 6. Ten rounds of the two at once, from two clients: either outcome, never a NAT gateway in a deleted subnet.
    const won = { deleted: 0, nat: 0 };
    for (let i = 0; i < 10; i++) {
      sn = await fresh();
      const [c, d] = await Promise.allSettled([plain.createNatInSubnet(natIn(sn), "", natPool), new IpamStore(clients[3]).deleteSubnet(sn.id)]);
      if (c.status === "rejected") assert.ok(c.reason instanceof FailedPreconditionError, `a create that lost: ${c.reason}`);
      if (d.status === "rejected") assert.ok(d.reason instanceof FailedPreconditionError, `a delete that lost: ${d.reason}`);
      assert.notEqual(c.status === "fulfilled", d.status === "fulfilled" && d.value, `round ${i}: exactly one of the two won`);
      const w = c.status === "fulfilled" ? "nat" : "deleted";
      won[w]++;
      await outcome(sn, w);
    }
    console.log(`# ipam-layout: CreateNatGateway vs DeleteSubnet at once, 10 rounds: the gateway won ${won.nat}, the delete ${won.deleted}`);
    assert.equal(await st.deleteVpc(vpc.id), true);
  });

  test("a hold a create left between its steps: a young one refuses DeleteSubnet (retry), whatever the deleter's clock says; swept once PENDING_MS old by the server's clock; a hold with a record never is", async () => {
    const c = clients[2];
    const st = new IpamStore(clients[0]);
    const { vpc } = await st.createVpc(vpcSpec("natstale"), "");
    const holds = GW_KEYS.cluster.natHolds!(vpc.id);
    const a = (await st.createSubnet({ ...subnetSpec(vpc.id, "a", "10.70.30.0/24"), type: "public" }, "")).subnet;
    const b = (await st.createSubnet({ ...subnetSpec(vpc.id, "b", "10.70.31.0/24"), type: "public" }, "")).subnet;
    // A create that stopped between its hold and its record (its reply lost: the hold stays, as its record might have been written).
    const crashed = stalledCreates(clients[1], () => Promise.reject(new Error("connection lost")));
    await assert.rejects(crashed.createNatInSubnet(natIn(a), "", natPool), /connection lost/);
    const [ghost] = await c.hkeys(holds);
    assert.match(ghost ?? "", /^nat-[0-9a-f]{12}$/, "the stopped create's hold is there");
    const [sec] = await c.time();
    const hold = JSON.parse((await c.hget(holds, ghost))!) as { subnet: string; ms: number };
    assert.equal(hold.subnet, a.id);
    assert.ok(Math.abs(hold.ms - Number(sec) * 1000) < 5000, "made at the server's time");
    // A deleter whose clock is two PENDING_MS ahead: the hold is young by the server's clock, so it stays and refuses.
    const restore = skewed(2 * PENDING_MS);
    try {
      await assert.rejects(
        st.deleteSubnet(a.id),
        (e: Error) => e instanceof FailedPreconditionError && new RegExp(`a NAT gateway is being created in it \\(${ghost}\\); retry`).test(e.message),
      );
    } finally {
      restore();
    }
    assert.equal(await c.hexists(holds, ghost), 1);
    // A real gateway in b whose hold is as old: it has a record, so it is never stale.
    const nat = await new GatewayStore(clients[1]).createNatInSubnet(natIn(b), "", natPool);
    await agedHold(c, vpc.id, nat.id, b.id, 2 * PENDING_MS);
    await agedHold(c, vpc.id, ghost, a.id, PENDING_MS + 1000);
    await assert.rejects(
      st.deleteSubnet(b.id),
      (e: Error) => e instanceof FailedPreconditionError && new RegExp(`NAT gateway ${nat.id} sits in it \\(microvpc nat delete\\)`).test(e.message),
    );
    assert.equal(await c.hexists(holds, nat.id), 1, "a hold with a record is not swept");
    // The stopped create's hold, old now: swept by the next DeleteSubnet, which goes ahead.
    assert.equal(await st.deleteSubnet(a.id), true);
    assert.equal(await c.hexists(holds, ghost), 0, "swept");
    // DeleteNatGateway removes the record, then its hold; DeleteSubnet then succeeds.
    assert.equal(await new GatewayStore(clients[1]).deleteNat(nat), true);
    assert.equal(await c.hexists(holds, nat.id), 0, "DeleteNatGateway removed its hold");
    assert.equal(await st.deleteSubnet(b.id), true);
    // A hold left in a VPC without subnets (only an entry that never read as one can be) goes with it.
    await c.hset(holds, "junk", "{");
    assert.equal(await st.deleteVpc(vpc.id), true);
    assert.equal(await c.exists(holds), 0, "DeleteVpc leaves no holds behind");
  });

  test("a DeleteSubnet that stalls after reading the holds judges a hold's age at that read: a create that wrote its record meanwhile keeps its hold, however long the delete took", async () => {
    const c = clients[2];
    const st0 = new IpamStore(clients[0]);
    const { vpc } = await st0.createVpc(vpcSpec("natstall"), "");
    const sn = (await st0.createSubnet({ ...subnetSpec(vpc.id, "s", "10.70.50.0/24"), type: "public" }, "")).subnet;
    const holds = GW_KEYS.cluster.natHolds!(vpc.id);
    const nat = "nat-0000000000e1";
    // A create's hold, young when the delete reads it (no record yet: a candidate), PENDING_MS old 2 s later.
    await agedHold(c, vpc.id, nat, sn.id, PENDING_MS - 1500);
    // Between the delete's read and its script, the create writes its record, and the delete stalls for 2 s.
    const { c: dc, st } = await stalledDeletes(async () => {
      await c.hset(GW_KEYS.cluster.nat(nat), "subnet", sn.id);
      await new Promise((r) => setTimeout(r, 2000));
    });
    try {
      await assert.rejects(st.deleteSubnet(sn.id), (e: Error) => e instanceof FailedPreconditionError && e.message.includes(nat));
    } finally {
      dc.disconnect();
    }
    assert.equal(await c.hexists(holds, nat), 1, "the hold of a gateway with a record stays");
    assert.equal((await st0.getSubnet(sn.id))?.id, sn.id, "the subnet stands under its gateway");
    await c.del(GW_KEYS.cluster.nat(nat));
    await c.del(holds);
    assert.equal(await st0.deleteSubnet(sn.id), true);
    assert.equal(await st0.deleteVpc(vpc.id), true);
  });

  test("a NAT gateway record that lands past PENDING_MS/2 after its hold, or whose reply is lost past it, is taken back: a DeleteSubnet that swept the hold meanwhile leaves no gateway in a deleted subnet", async () => {
    const c = clients[2];
    const st = new IpamStore(clients[0]);
    for (const way of ["written", "reply lost"] as const) {
      const { vpc } = await st.createVpc(vpcSpec(`natlate${way === "written" ? 1 : 2}`), "");
      const sn = (await st.createSubnet({ ...subnetSpec(vpc.id, "s", "10.70.60.0/24"), type: "public" }, "")).subnet;
      const holds = GW_KEYS.cluster.natHolds!(vpc.id);
      const gs = new GatewayStore(clients[1]);
      const record = gs.createNat.bind(gs);
      let restore = () => {};
      // The record step stalls: meanwhile the hold grows PENDING_MS old by the server's clock, and a DeleteSubnet finds it without a record, sweeps it and deletes the subnet; then the record lands.
      gs.createNat = async (...a) => {
        const [held] = await c.hkeys(holds);
        await agedHold(c, vpc.id, held, sn.id, PENDING_MS + 1000);
        assert.equal(await st.deleteSubnet(sn.id), true, "the stale hold swept, the subnet deleted");
        const nat = await record(...a);
        restore = later(PENDING_MS);
        if (way === "reply lost") throw new Error("Command timed out");
        return nat;
      };
      try {
        await assert.rejects(gs.createNatInSubnet(natIn(sn), "", natPool), takenBack(way));
      } finally {
        restore();
      }
      assert.deepEqual(await site(gs, sn), { nat: null, subnet: false }, `${way}: no NAT gateway in the deleted subnet`);
      assert.deepEqual(await keysLike(`*${vpc.id}*nat*`), [], `${way}: no hold or lease left`);
      assert.equal(await st.deleteVpc(vpc.id), true);
    }
  });

  test("a late NAT gateway record whose subnet still stands is kept, held afresh: a retry by client token answered with it meanwhile does not lose it, and DeleteSubnet still refuses", async () => {
    const st = new IpamStore(clients[0]);
    for (const way of ["written", "reply lost"] as const) {
      const { vpc } = await st.createVpc(vpcSpec(`natkept${way === "written" ? 1 : 2}`), "");
      const sn = (await st.createSubnet({ ...subnetSpec(vpc.id, "s", "10.70.61.0/24"), type: "public" }, "")).subnet;
      const gs = new GatewayStore(clients[1]);
      const retry = new GatewayStore(clients[2]);
      const record = gs.createNat.bind(gs);
      const token = `kept-${way}`;
      let restore = () => {};
      let answered: NatRec | undefined;
      // The record lands, the client gives up waiting and retries with its token (answered with that record), then the first create finds itself late.
      gs.createNat = async (...a) => {
        const nat = await record(...a);
        answered = await retry.createNatInSubnet(natIn(sn), token, natPool);
        restore = later(PENDING_MS);
        if (way === "reply lost") throw new Error("Command timed out");
        return nat;
      };
      let nat: NatRec;
      try {
        nat = await gs.createNatInSubnet(natIn(sn), token, natPool);
      } finally {
        restore();
      }
      assert.equal(answered?.id, nat.id, `${way}: the retry was answered with the record the late create kept`);
      assert.deepEqual(await site(gs, sn), { nat: nat.id, subnet: true }, `${way}: the gateway stands in its subnet`);
      await assert.rejects(
        st.deleteSubnet(sn.id),
        (e: Error) => e instanceof FailedPreconditionError && /sits in it/.test(e.message),
        `${way}: its subnet is held`,
      );
      assert.equal(await gs.deleteNat(nat), true);
      assert.equal(await st.deleteSubnet(sn.id), true);
      assert.equal(await st.deleteVpc(vpc.id), true);
    }
  });

  test("NAT gateway holds read back from Redis are input: one that does not read as a hold refuses DeleteSubnet, naming it, and breaks no script; a field that is not a NAT id is swept like any stale hold", async () => {
    const c = clients[2];
    const st = new IpamStore(clients[0]);
    const { vpc } = await st.createVpc(vpcSpec("natbad"), "");
    const holds = GW_KEYS.cluster.natHolds!(vpc.id);
    const x = (await st.createSubnet({ ...subnetSpec(vpc.id, "x", "10.70.40.0/24"), type: "public" }, "")).subnet;
    const bad: [string, string][] = [
      ["nat-0000000000f1", "not json"],
      ["nat-0000000000f2", "[]"],
      ["nat-0000000000f3", JSON.stringify({ subnet: x.id })],
      // Young: an old one without a record is swept whatever else it says (it is stale).
      ["nat-0000000000f4", JSON.stringify({ subnet: 7, ms: Date.now() })],
      ["nat-0000000000f5", '"a string"'],
      // A time no hold can have (past the read by more than a hold lives, or infinite) would keep it young forever.
      ["nat-0000000000f7", JSON.stringify({ subnet: x.id, ms: 9e15 })],
      ["nat-0000000000f8", `{"subnet":${JSON.stringify(x.id)},"ms":1e999}`],
      ["junk\nfield", "{"],
      ["not-a-nat", JSON.stringify({ subnet: x.id, ms: Date.now() })],
    ];
    for (const [field, value] of bad) {
      await c.hset(holds, field, value);
      await assert.rejects(
        st.deleteSubnet(x.id),
        (e: Error) =>
          e instanceof FailedPreconditionError && /does not read as a NAT gateway hold/.test(e.message) && e.message.includes(JSON.stringify(field)),
        `${JSON.stringify(field)} → ${value}`,
      );
      assert.equal((await st.getSubnet(x.id))?.id, x.id, "nothing deleted");
      await c.hdel(holds, field);
    }
    // A field that is no NAT id has no record: once old it is swept as a stopped create's hold is.
    await agedHold(c, vpc.id, "not-a-nat", x.id, PENDING_MS + 1000);
    // A hold of another subnet that reads as one is no business of this delete.
    await c.hset(holds, "nat-0000000000f6", JSON.stringify({ subnet: "subnet-0000000000f6", ms: Date.now() }));
    assert.equal(await st.deleteSubnet(x.id), true);
    assert.deepEqual(await c.hkeys(holds), ["nat-0000000000f6"]);
    assert.equal(await st.deleteVpc(vpc.id), true);
  });

  test("CreateNatGateway with a client token reads the token once; a retry answers with the same gateway, which keeps its hold", async () => {
    const st = new IpamStore(clients[0]);
    const gs = new GatewayStore(clients[1]);
    const { vpc } = await st.createVpc(vpcSpec("nattoken"), "");
    const sn = (await st.createSubnet({ ...subnetSpec(vpc.id, "t", "10.70.43.0/24"), type: "public" }, "")).subnet;
    const hget = vi.spyOn(clients[1], "hget");
    const tokenReads = () => hget.mock.calls.filter(([key]) => key === GW_KEYS.cluster.tokens).length;
    try {
      const nat = await gs.createNatInSubnet(natIn(sn), "orch-nat-1", natPool);
      assert.equal(tokenReads(), 1, "one read of the client token");
      assert.equal((await gs.createNatInSubnet(natIn(sn), "orch-nat-1", natPool)).id, nat.id, "a retry by client token");
      assert.equal(tokenReads(), 2);
      assert.equal(JSON.parse((await clients[2].hget(GW_KEYS.cluster.natHolds!(vpc.id), nat.id))!).subnet, sn.id, "its hold names its subnet");
      assert.equal(await clients[2].hlen(GW_KEYS.cluster.natHolds!(vpc.id)), 1, "no other hold");
      assert.equal(await gs.deleteNat(nat), true);
    } finally {
      hget.mockRestore();
    }
    assert.equal(await st.deleteSubnet(sn.id), true);
    assert.equal(await st.deleteVpc(vpc.id), true);
  });

  test("NAT gateway holds of another Redis type refuse DeleteSubnet and CreateNatGateway as FAILED_PRECONDITION naming the key and its repair, not a raw WRONGTYPE; removed, both go ahead", async () => {
    const c = clients[2];
    const st = new IpamStore(clients[0]);
    const gs = new GatewayStore(clients[1]);
    const { vpc } = await st.createVpc(vpcSpec("natwrongtype"), "");
    const holds = GW_KEYS.cluster.natHolds!(vpc.id);
    const [x, y] = [
      (await st.createSubnet({ ...subnetSpec(vpc.id, "x", "10.70.41.0/24"), type: "public" }, "")).subnet,
      (await st.createSubnet({ ...subnetSpec(vpc.id, "y", "10.70.42.0/24"), type: "public" }, "")).subnet,
    ];
    await c.set(holds, "not a hash");
    const named = (e: Error) =>
      e instanceof FailedPreconditionError &&
      !e.message.startsWith("WRONGTYPE") &&
      e.message.includes(`(${holds}) holds another Redis type than its schema says (a hash); nothing was changed: remove that key (DEL ${holds})`);
    await assert.rejects(st.deleteSubnet(x.id), named, "DeleteSubnet");
    await assert.rejects(gs.createNatInSubnet(natIn(y), "", natPool), named, "CreateNatGateway");
    assert.equal((await st.getSubnet(x.id))?.id, x.id, "nothing deleted");
    assert.equal(await gs.natOfVpc(vpc.id), null, "nothing created");
    assert.equal(await c.get(holds), "not a hash", "the key is left for a person to look at");
    await c.del(holds);
    assert.equal(await st.deleteSubnet(x.id), true);
    const nat = await gs.createNatInSubnet(natIn(y), "", natPool);
    assert.equal(await gs.deleteNat(nat), true);
    assert.equal(await st.deleteSubnet(y.id), true);
    assert.equal(await st.deleteVpc(vpc.id), true);
  });

  test("a subnet record by id a create left before its VPC's script is not a subnet; DeleteSubnet removes it once it is old", async () => {
    const c = clients[0];
    const st = new IpamStore(c);
    const rec = await c.hgetall(K.subnet(s.id));
    const [young, old] = ["subnet-0000000000aa", "subnet-0000000000bb"];
    await c.hset(K.subnet(young), { ...rec, id: young, name: "young" });
    await c.hset(K.subnet(old), { ...rec, id: old, name: "old", created: String(Date.now() - 2 * PENDING_TTL_MS) });
    for (const x of [young, old]) assert.equal(await st.getSubnet(x), null, `${x}: not a subnet`);
    assert.equal(await st.deleteSubnet(young), false);
    assert.equal(await c.exists(K.subnet(young)), 1, "a young one may be a create under way: left");
    assert.equal(await st.deleteSubnet(old), false);
    assert.equal(await c.exists(K.subnet(old)), 0, "an old one is removed");
    await c.del(K.subnet(young));
  });

  test("a create whose script runs twice (ioredis resends after a reconnect) is answered as created, its records kept", async () => {
    const c = connectRedis({ url: cluster.url, commandTimeoutMs: 2000 });
    try {
      await waitReady(c);
      const st = new IpamStore(c);
      // The script itself, run twice per call (ioredis's Script, not the
      // client's method: its auto-pipelining would call the wrapper again).
      const scripts = (c as unknown as { scriptsSet: Record<string, { execute(c: unknown, a: unknown[], o: object): Promise<unknown> }> }).scriptsSet;
      const twice = (name: "mvpcClaimVpc" | "mvpcCreateSubnet") => {
        const run = (a: (string | number)[]) => scripts[name].execute(c, [...a], { replyEncoding: "utf8" });
        c[name] = (async (...a: (string | number)[]) => {
          await run(a);
          return run(a);
        }) as never;
      };
      twice("mvpcClaimVpc");
      twice("mvpcCreateSubnet");
      const { vpc, created } = await st.createVpc(vpcSpec("twice"), "");
      assert.equal(created, true);
      assert.equal(await c.exists(IPAM_KEYS.cluster.vpc(vpc.id)), 1);
      const sn = await st.createSubnet(subnetSpec(vpc.id, "t", "10.70.9.0/24"), "");
      assert.equal(sn.created, true);
      assert.ok(await st.getSubnet(sn.subnet.id), "its record by id is kept");
    } finally {
      c.disconnect();
    }
  });

  test("lists skip names and entries whose record is gone, and still fill their pages", async () => {
    const c = clients[0];
    const L = IPAM_KEYS.cluster;
    const st = new IpamStore(c);
    for (let i = 0; i < 4; i++) await st.createVpc(vpcSpec(`pg-${i}`), "");
    // Stale names between the live ones (a delete or create stopped between its steps).
    for (const n of ["pg-0a", "pg-0b", "pg-0c", "pg-1a", "pg-1b"]) {
      await c.hset(L.vpcByName, n, "vpc-00000000beef");
      await c.zadd(L.vpcNames, 0, n);
    }
    const page = await st.listVpcs("pg-", 3);
    assert.deepEqual(
      page.map((v) => v.name),
      ["pg-0", "pg-1", "pg-2"],
    );
  });

  test("Allocate calls and reads of every node's keys in one tick from one client: none refused by the client's batching", async () => {
    // ioredis's auto-pipelining grouped a script call whose key count comes
    // first by the slot of that count, beside other commands for that node,
    // and refused the batch when the call's keys were on another node.
    const c = clients[1];
    const st = new IpamStore(c);
    const nodeOf = async (key: string) => {
      const slot = (await c.cluster("KEYSLOT", key)) as number;
      return (await c.cluster("SLOTS")).find(([lo, hi]) => slot >= lo && slot <= hi)![2][1];
    };
    // A subnet whose keys are on another node than the slot of Allocate's key count (7 on a cluster).
    let sub: SubnetRec | undefined;
    for (let i = 0; i < 20 && !sub; i++) {
      const { vpc } = await st.createVpc(vpcSpec(`mix-${i}`), "");
      const sn = (await st.createSubnet(subnetSpec(vpc.id, "m", "10.70.0.0/24"), "")).subnet;
      if ((await nodeOf(K.used(vpc.id, sn.id))) !== (await nodeOf("7"))) sub = sn;
    }
    assert.ok(sub, "a subnet on another node than slot('7')");
    const calls: Promise<unknown>[] = [];
    for (let i = 0; i < 60; i++) {
      calls.push(st.allocate(sub, `vm-mix-${i}`, "r", -1));
      calls.push(c.hgetall(`mvpc:{probe-${i}}:x`));
    }
    const r = await Promise.allSettled(calls);
    assert.deepEqual(
      r.flatMap((x) => (x.status === "rejected" ? [String(x.reason)] : [])),
      [],
    );
  });

  test("the previous layout's Allocate is refused on a cluster (its keys are in several slots)", async () => {
    const keys = previousAllocateKeys(s, "vm-x");
    // ioredis refuses it before sending; the node that serves its first key refuses it too.
    await assert.rejects(clients[0].eval(Previous.ALLOCATE, 9, ...keys, "vm-x", "x", -1, Date.now(), s.id), /same slot/);
    const slot = (await clients[0].cluster("KEYSLOT", keys[0])) as number;
    const port = (await clients[0].cluster("SLOTS")).find(([lo, hi]) => slot >= lo && slot <= hi)![2][1];
    const node = new Redis({ port, host: "127.0.0.1", maxRetriesPerRequest: 1 });
    try {
      await assert.rejects(node.eval(Previous.ALLOCATE, 9, ...keys, "vm-x", "x", -1, Date.now(), s.id), /CROSSSLOT/);
    } finally {
      node.disconnect();
    }
  });
});
