// Allocate calls that arrive together (services/ipam/service.ts Ipam.allocs,
// ALLOCATE_MANY): on a real redis-server, one script answers a group, and
// every call gets what it would have got alone, in the order the calls came
// in: created, the same address again for a retry, or its own error, with
// nothing of a refused call written. Over gRPC, a burst of calls to one
// daemon runs far fewer scripts than calls (ipam.test.ts checks the daemon).
import assert from "node:assert/strict";
import type { Redis } from "ioredis";
import { afterAll, beforeAll, test } from "vitest";
import { AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, NotFoundError, ResourceExhaustedError } from "../../services/common/errors.js";
import { intToIp, ipToInt } from "../../services/common/validate.js";
import { K } from "../../services/ipam/keys.js";
import { ALLOCATE, ALLOCATE_MANY, MAX_ALLOCATE_MANY } from "../../services/ipam/scripts.js";
import { Ipam } from "../../services/ipam/service.js";
import { IpamStore, type SubnetRec } from "../../services/ipam/store.js";
import { subnetSpec, vpcSpec } from "../lib/ipam-specs.js";
import { connectReady, startRedis, type TestRedis } from "../lib/redis.js";

let redis: TestRedis;
let r: Redis;
let store: IpamStore;
let vpcId: string;
let n = 0;

beforeAll(async () => {
  redis = await startRedis();
  r = await connectReady({ url: redis.url });
  store = new IpamStore(r);
  const { vpc } = await store.createVpc(vpcSpec("together", "10.62.0.0/16"), "");
  vpcId = vpc.id;
  // Loaded now, so that a first call is one EVALSHA (not a NOSCRIPT and an EVAL) in the counts below.
  for (const lua of [ALLOCATE, ALLOCATE_MANY]) await r.script("LOAD", lua);
}, 30_000);

afterAll(async () => {
  r?.disconnect();
  await redis?.stop();
});

/** A new subnet of the VPC: a /24 (5 reserved: network, gateway, 2 extra, broadcast), or a /28 for `small`. */
async function subnet(small = false): Promise<SubnetRec> {
  const cidr = `${intToIp(ipToInt("10.62.0.0") + 256 * ++n)}/${small ? 28 : 24}`;
  return (await store.createSubnet({ ...subnetSpec(vpcId, `s${n}`, cidr), extraReserved: 2 }, "")).subnet;
}

/** Scripts Redis has run so far (EVALSHA and EVAL, from INFO commandstats). */
async function scriptCalls(): Promise<number> {
  const info = await r.info("commandstats");
  let calls = 0;
  for (const m of info.matchAll(/^cmdstat_(evalsha|eval):calls=(\d+)/gm)) calls += Number(m[2]);
  return calls;
}

/** Entries of the global events stream that say an address was allocated. */
async function allocatedEvents(s: SubnetRec): Promise<number[]> {
  const entries = (await r.xrange(K.events, "-", "+")) as [string, string[]][];
  return entries
    .map(([, f]) => Object.fromEntries(Array.from({ length: f.length / 2 }, (_, i) => [f[2 * i], f[2 * i + 1]])))
    .filter((e) => e.kind === "ipam.allocated" && e.subnet === s.id)
    .map((e) => Number(e.index));
}

test("one script, each call answered as if alone and in order: created, a retry's same address, a conflict, a reused request id, a reserved address; nothing of a refused call written", async () => {
  const s = await subnet();
  const before = await scriptCalls();
  const out = await store.allocateMany(s, [
    { owner: "vm-a", requestId: "r1", wanted: -1 }, // lowest free: index 4 (0–3 reserved)
    { owner: "vm-b", requestId: "r1", wanted: 100 },
    { owner: "vm-c", requestId: "r1", wanted: 100 }, // held by vm-b, just now
    { owner: "vm-a", requestId: "r1", wanted: -1 }, // a retry of the first
    { owner: "vm-b", requestId: "r1", wanted: 101 }, // vm-b's r1 holds 100
    { owner: "vm-d", requestId: "r1", wanted: 255 }, // broadcast
    { owner: "vm-e", requestId: "r1", wanted: -1 }, // next lowest: 5
  ]);
  assert.equal((await scriptCalls()) - before, 1, "one script for the seven calls");
  const shown = out.map((o) => (o.ok ? `${o.value.created ? "created" : "existing"} ${o.value.alloc.index} ${o.value.alloc.owner}` : o.error.constructor.name));
  assert.deepEqual(shown, [
    "created 4 vm-a",
    "created 100 vm-b",
    "AlreadyExistsError",
    "existing 4 vm-a",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "created 5 vm-e",
  ]);
  const err = (i: number) => (out[i] as { error: Error }).error;
  assert.ok(err(2) instanceof AlreadyExistsError && /\.100 is already allocated to vm-b/.test(err(2).message), err(2).message);
  assert.ok(err(4) instanceof FailedPreconditionError && /already holds 10\.62\.\d+\.100, not 10\.62\.\d+\.101/.test(err(4).message), err(4).message);
  assert.ok(err(5) instanceof InvalidArgumentError && /\.255 is reserved/.test(err(5).message), err(5).message);
  // What Redis holds: the three created, nothing for vm-c, vm-d or 101.
  assert.equal(Number(await r.get(K.used(s.vpcId, s.id))), 3);
  assert.equal(await r.bitcount(K.bits(s.vpcId, s.id)), 3 + 5);
  assert.equal(await r.getbit(K.bits(s.vpcId, s.id), 101), 0);
  assert.deepEqual((await store.listByOwner("vm-c", "", 10)).length, 0);
  assert.deepEqual((await store.listByOwner("vm-d", "", 10)).length, 0);
  assert.deepEqual(
    (await store.listByOwner("vm-b", "", 10)).map((a) => a.alloc.index),
    [100],
  );
  assert.deepEqual(
    (await allocatedEvents(s)).sort((a, b) => a - b),
    [4, 5, 100],
    "one event per address created, none for a retry",
  );
});

test("a group larger than the free addresses: the first calls get them, the rest RESOURCE_EXHAUSTED; the subnet is full, not over-full", async () => {
  const s = await subnet(true); // a /28: 16 - 5 reserved = 11 usable
  const out = await store.allocateMany(
    s,
    Array.from({ length: 14 }, (_, i) => ({ owner: `vm-${i}`, requestId: "r", wanted: -1 })),
  );
  assert.deepEqual(
    out.map((o) => o.ok),
    [...Array<boolean>(11).fill(true), false, false, false],
  );
  for (const o of out.slice(11)) assert.ok(!o.ok && o.error instanceof ResourceExhaustedError && /has no free address/.test(o.error.message));
  const idx = out.flatMap((o) => (o.ok ? [o.value.alloc.index] : []));
  assert.deepEqual(idx, [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]);
  assert.equal(Number(await r.get(K.used(s.vpcId, s.id))), 11);
});

test("a deleted subnet: every call of the group NOT_FOUND, nothing written", async () => {
  const s = await subnet();
  assert.equal(await store.deleteSubnet(s.id), true);
  const out = await store.allocateMany(s, [
    { owner: "vm-gone-a", requestId: "r", wanted: -1 },
    { owner: "vm-gone-b", requestId: "r", wanted: 7 },
  ]);
  assert.ok(out.every((o) => !o.ok && o.error instanceof NotFoundError));
  for (const k of [K.used(s.vpcId, s.id), K.bits(s.vpcId, s.id), K.owner(s.vpcId, "vm-gone-a")]) assert.equal(await r.exists(k), 0, k);
  await assert.rejects(
    store.allocateMany(
      s,
      Array.from({ length: MAX_ALLOCATE_MANY + 1 }, () => ({ owner: "o", requestId: "r", wanted: -1 })),
    ),
    /at most 64/,
  );
});

test("the service answers the Allocate calls of a subnet made in one turn with one script per subnet; a call in a later turn runs its own", async () => {
  const ipam = new Ipam(store);
  const [s1, s2] = [await subnet(), await subnet()];
  const call = (s: SubnetRec, owner: string, address = "") =>
    ipam.ipamService.allocate({ subnetId: s.id, owner, requestId: "r", address } as never, {} as never);
  // Warm the subnet cache, so that every call below reaches the store in the same turn.
  await Promise.all([call(s1, "warm"), call(s2, "warm")]);
  const before = await scriptCalls();
  const got = await Promise.allSettled([
    ...Array.from({ length: 40 }, (_, i) => call(s1, `vm-${i}`)),
    ...Array.from({ length: 10 }, (_, i) => call(s2, `vm-${i}`)),
    call(s1, "vm-taken", `${intToIp(s1.base + 4)}`), // "warm" holds it
  ]);
  assert.equal((await scriptCalls()) - before, 2, "one script per subnet for 51 calls");
  const addrs = got.slice(0, 50).map((g) => (g.status === "fulfilled" ? g.value.allocation!.address : String(g.reason)));
  assert.equal(new Set(addrs.slice(0, 40)).size, 40);
  assert.equal(new Set(addrs.slice(40)).size, 10);
  assert.deepEqual(addrs.slice(0, 3), [intToIp(s1.base + 5), intToIp(s1.base + 6), intToIp(s1.base + 7)], "in the order the calls came in");
  const last = got[50];
  assert.ok(last.status === "rejected" && last.reason instanceof AlreadyExistsError && /already allocated to warm/.test((last.reason as Error).message));
  // A later turn: its own script, of one call (ALLOCATE).
  const b = await scriptCalls();
  await call(s1, "vm-late");
  assert.equal((await scriptCalls()) - b, 1);
  assert.equal(Number(await r.get(K.used(s1.vpcId, s1.id))), 42);
});

test("an owner index of another Redis type: that call alone is FAILED_PRECONDITION with nothing written, grouped or alone; the others of its group are allocated", async () => {
  const ipam = new Ipam(store);
  const s = await subnet();
  const call = (owner: string) => ipam.ipamService.allocate({ subnetId: s.id, owner, requestId: "r", address: "" } as never, {} as never);
  await call("warm"); // the subnet cache: index 4
  await r.set(K.owner(s.vpcId, "vm-bad"), "not a sorted set");
  const before = await scriptCalls();
  const got = await Promise.allSettled(["vm-1", "vm-2", "vm-bad", "vm-3"].map(call));
  assert.equal((await scriptCalls()) - before, 1);
  const shown = got.map((g) =>
    g.status === "fulfilled" ? `${g.value.created ? "created" : "retry"} ${g.value.allocation!.address}` : (g.reason as Error).name,
  );
  assert.deepEqual(shown, [`created ${intToIp(s.base + 5)}`, `created ${intToIp(s.base + 6)}`, "FailedPreconditionError", `created ${intToIp(s.base + 7)}`]);
  assert.match(
    (got[2] as PromiseRejectedResult).reason.message,
    /owner index of vm-bad \(mvpc:\{vpc-[0-9a-f]+\}:owner:vm-bad\) is a Redis "string", not a sorted set; nothing was allocated/,
  );
  const again = await Promise.allSettled([call("vm-bad")]);
  assert.equal(again[0].status, "rejected", "alone too");
  const holders = Object.values(await r.hgetall(K.alloc(s.vpcId, s.id))).map((v) => v.split("\n")[0]);
  assert.deepEqual(holders.sort(), ["vm-1", "vm-2", "vm-3", "warm"]);
  assert.equal(Number(await r.get(K.used(s.vpcId, s.id))), 4);
  assert.equal(await r.hexists(K.req(s.vpcId, s.id), "vm-bad\nr"), 0);
});
