// Property tests of the allocator against a real Redis: across thousands of
// random operation sequences no address is handed out twice, none lies
// outside its subnet, no reserved one is handed out, and release and
// reallocate behave like a simple model (a set of held addresses). On one
// redis-server, or with MICROVPC_TEST_ON_CLUSTER=1 a 3+3 Redis Cluster
// (test/lib/on-cluster.ts): a subnet's bitmaps are under its VPC's hash tag
// in both layouts (K.bits, K.full).
import assert from "node:assert/strict";
import fc from "fast-check";
import type { Redis } from "ioredis";
import { afterAll, beforeAll, test } from "vitest";
import { K } from "../../services/ipam/keys.js";
import { IpamStore, MAX_EXTRA_RESERVED, reservedIndexes, type SubnetRec } from "../../services/ipam/store.js";
import { CHUNK_BITS } from "../../services/ipam/scripts.js";
import { intToIp, ipToInt } from "../../services/common/validate.js";
import { connectReady, startDaemonsRedis, type DaemonsRedis } from "../lib/redis.js";

let redis: DaemonsRedis;
let client: Redis;
let store: IpamStore;
let vpcId: string;
let seq = 0;

beforeAll(async () => {
  // fsync "no": these tests check logic, not durability, and run thousands of sequences.
  redis = await startDaemonsRedis({ appendfsync: "no" });
  // The services' client (auto-pipelining on one Redis, as before; not on a
  // cluster: connectRedis says why). Filling a /19 sends 8 187 allocations
  // at once (under a second here): room over the services' 2 s per command
  // for a machine the suite shares.
  client = await connectReady({ url: redis.url, commandTimeoutMs: 10_000 });
  store = new IpamStore(client);
  const { vpc } = await store.createVpc(
    { name: "prop", cidr: "10.0.0.0/8", base: ipToInt("10.0.0.0"), prefix: 8, description: "", labels: [], publicCidr: false },
    "",
  );
  vpcId = vpc.id;
});

afterAll(async () => {
  client?.disconnect();
  await redis?.stop();
});

async function freshSubnet(prefix: number, extra: number): Promise<SubnetRec> {
  const size = 2 ** (32 - prefix);
  // Each run gets its own block of 10.0.0.0/8, so subnets never overlap.
  const base = ipToInt("10.0.0.0") + ((seq++ * 65536) % 2 ** 24);
  const { subnet } = await store.createSubnet(
    { vpcId, name: `s${seq}`, cidr: `${intToIp(base)}/${prefix}`, base, prefix, size, type: "private", extraReserved: extra, description: "", labels: [] },
    "",
  );
  return subnet;
}

type Op =
  | { t: "any"; owner: number; req: number }
  | { t: "want"; owner: number; req: number; at: number }
  | { t: "release"; pick: number }
  | { t: "releaseByReq"; pick: number };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 5, arbitrary: fc.record({ t: fc.constant("any" as const), owner: fc.nat(3), req: fc.nat(40) }) },
  { weight: 2, arbitrary: fc.record({ t: fc.constant("want" as const), owner: fc.nat(3), req: fc.nat(40), at: fc.nat(255) }) },
  { weight: 3, arbitrary: fc.record({ t: fc.constant("release" as const), pick: fc.nat(1000) }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant("releaseByReq" as const), pick: fc.nat(1000) }) },
);

test("random operation sequences keep every invariant", async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.integer({ min: 24, max: 28 }),
      fc.integer({ min: 0, max: 3 }),
      fc.array(opArb, { minLength: 1, maxLength: 40 }),
      async (prefix, extra, ops) => {
        const s = await freshSubnet(prefix, extra);
        const reserved = new Set(reservedIndexes(s.size, extra));
        const usable = s.size - reserved.size;
        // The model: index -> "owner\nreq", and "owner\nreq" -> index.
        const held = new Map<number, string>();
        const byReq = new Map<string, number>();
        for (const op of ops) {
          if (op.t === "any" || op.t === "want") {
            const owner = `o${op.owner}`;
            const req = `r${op.req}`;
            const key = `${owner}\n${req}`;
            const wanted = op.t === "want" ? op.at % s.size : -1;
            let result: number | string;
            try {
              result = (await store.allocate(s, owner, req, wanted)).alloc.index;
            } catch (e) {
              result = (e as Error).name;
            }
            const prev = byReq.get(key);
            if (prev !== undefined) {
              if (wanted >= 0 && wanted !== prev) assert.equal(result, "FailedPreconditionError");
              else assert.equal(result, prev, "a retry returns the same address");
            } else if (wanted >= 0) {
              if (reserved.has(wanted)) assert.equal(result, "InvalidArgumentError");
              else if (held.has(wanted)) assert.equal(result, "AlreadyExistsError");
              else assert.equal(result, wanted);
            } else if (held.size === usable) {
              assert.equal(result, "ResourceExhaustedError");
            } else {
              // Lowest free address, never a reserved or held one.
              let lowest = 0;
              while (reserved.has(lowest) || held.has(lowest)) lowest++;
              assert.equal(result, lowest);
            }
            if (typeof result === "number" && prev === undefined) {
              held.set(result, key);
              byReq.set(key, result);
            }
          } else {
            const list = [...held.entries()];
            if (list.length === 0) continue;
            const [idx, key] = list[op.pick % list.length];
            const [owner, req] = key.split("\n");
            const freed = op.t === "release" ? await store.release(s, idx, "", "") : await store.release(s, -1, owner, req);
            assert.equal(freed, idx);
            held.delete(idx);
            byReq.delete(key);
          }
        }
        // The store agrees with the model, and its bitmap with its records.
        const listed = new Map<number, string>();
        for await (const a of store.scanSubnet(s)) listed.set(a.index, `${a.owner}\n${a.requestId}`);
        assert.deepEqual(new Map([...listed].sort()), new Map([...held].sort()));
        const u = await store.usage(s);
        assert.equal(u.used, held.size);
        assert.equal(await client.bitcount(K.bits(s.vpcId, s.id)), held.size + reserved.size);
        // Clean up so subnets can be deleted (keeps Redis small).
        for (const idx of held.keys()) await store.release(s, idx, "", "");
        await store.deleteSubnet(s.id);
      },
    ),
    { numRuns: 1500 },
  );
});

test("the chunk summary stays right across chunk borders: fill a /19, free a few, get exactly those back", async () => {
  const s = await freshSubnet(19, 2);
  const usable = s.size - 5;
  assert.ok(s.size > CHUNK_BITS, "spans more than one summary chunk");
  const got = await Promise.all(Array.from({ length: usable }, (_, i) => store.allocate(s, "fill", `r${i}`, -1)));
  const idx = got.map((g) => g.alloc.index);
  assert.equal(new Set(idx).size, usable);
  await assert.rejects(store.allocate(s, "fill", "extra", -1), { name: "ResourceExhaustedError" });
  await fc.assert(
    fc.asyncProperty(fc.uniqueArray(fc.integer({ min: 4, max: s.size - 2 }), { minLength: 1, maxLength: 12 }), async (free) => {
      for (const i of free) assert.equal(await store.release(s, i, "", ""), i);
      const again: number[] = [];
      for (let n = 0; n < free.length; n++) again.push((await store.allocate(s, "refill", `x${seq++}`, -1)).alloc.index);
      assert.deepEqual(
        again,
        [...free].sort((a, b) => a - b),
        "lowest free first, across chunks",
      );
      await assert.rejects(store.allocate(s, "fill", `extra${seq++}`, -1), { name: "ResourceExhaustedError" });
    }),
    { numRuns: 100 },
  );
});

test("a new subnet reserves exactly network, gateway, extra and broadcast, from /8 to /28, with the summary right", async () => {
  let run = 0;
  await fc.assert(
    fc.asyncProperty(fc.integer({ min: 8, max: 28 }), fc.nat(), async (prefix, pick) => {
      const size = 2 ** (32 - prefix);
      const extra = pick % (Math.min(MAX_EXTRA_RESERVED, size - 4) + 1);
      const { vpc } = await store.createVpc(
        { name: `layout-${run++}`, cidr: "10.0.0.0/8", base: ipToInt("10.0.0.0"), prefix: 8, description: "", labels: [], publicCidr: false },
        "",
      );
      const base = ipToInt("10.0.0.0");
      const { subnet: s } = await store.createSubnet(
        { vpcId: vpc.id, name: "s", cidr: `10.0.0.0/${prefix}`, base, prefix, size, type: "private", extraReserved: extra, description: "", labels: [] },
        "",
      );
      const want = reservedIndexes(size, extra);
      assert.equal(await client.bitcount(K.bits(s.vpcId, s.id)), want.length, "as many bits set as addresses reserved");
      for (const i of [0, 1, extra, extra + 1, extra + 2, size - 2, size - 1]) {
        assert.equal(await client.getbit(K.bits(s.vpcId, s.id), i), want.includes(i) ? 1 : 0, `bit ${i} of /${prefix} with ${extra} extra`);
      }
      assert.equal(await client.strlen(K.bits(s.vpcId, s.id)), size / 8);
      const fullChunks = Array.from({ length: Math.ceil(size / CHUNK_BITS) }, (_, c) => {
        const n = Math.min(CHUNK_BITS, size - c * CHUNK_BITS);
        return want.filter((i) => i >= c * CHUNK_BITS && i < c * CHUNK_BITS + n).length === n;
      });
      assert.equal(await client.bitcount(K.full(s.vpcId, s.id)), fullChunks.filter(Boolean).length, "summary marks exactly the full chunks");
      assert.equal((await store.allocate(s, "o", "r", -1)).alloc.index, extra + 2, "first free address follows the extra range");
      assert.equal((await store.usage(s)).reserved, want.length);
      await store.release(s, extra + 2, "", "");
      await store.deleteSubnet(s.id);
      await store.deleteVpc(vpc.id);
    }),
    { numRuns: 150 },
  );
});

test("the store refuses an extra_reserved above the cap or leaving no address, creating nothing", async () => {
  const { vpc } = await store.createVpc(
    { name: "cap", cidr: "10.0.0.0/8", base: ipToInt("10.0.0.0"), prefix: 8, description: "", labels: [], publicCidr: false },
    "",
  );
  const base = ipToInt("10.0.0.0");
  const mk = (prefix: number, extra: number) =>
    store.createSubnet(
      {
        vpcId: vpc.id,
        name: "s",
        cidr: `10.0.0.0/${prefix}`,
        base,
        prefix,
        size: 2 ** (32 - prefix),
        type: "private",
        extraReserved: extra,
        description: "",
        labels: [],
      },
      "",
    );
  await assert.rejects(mk(8, MAX_EXTRA_RESERVED + 1), { name: "InvalidArgumentError" });
  await assert.rejects(mk(8, 2 ** 24 - 4), { name: "InvalidArgumentError" });
  await assert.rejects(mk(28, 13), { name: "InvalidArgumentError" });
  assert.equal((await store.getVpc(vpc.id))!.subnetCount, 0);
  await store.deleteVpc(vpc.id);
});
