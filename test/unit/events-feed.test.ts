// The scoped change feed (services/common/events.ts) against a real
// redis-server: a host hears its VPCs and nothing else, a VPC arriving or
// leaving changes what it reads without losing a change, and a host that was
// away reads on from its last position, or resyncs once when trimming took
// that position. The consumer here is the smallest honest one: it applies
// events as deltas and reads a VPC's state again on feed.joined and
// feed.resync; convergence means its view equals Redis.
//
// Every test runs twice: on one redis-server, where the feed is one XREAD
// BLOCK, and on a real Redis Cluster (3 primaries, 3 replicas), where each
// VPC's stream is a slot of its own and the feed waits on sharded pub/sub
// wakes instead (events.ts). The same assertions hold on both.
import assert from "node:assert/strict";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, test } from "vitest";
import { emit, EventFeed, hostEvents, lostSince, MemoryPositions, vpcEvents, type EventFields } from "../../services/common/events.js";
import { connectRedis, isCluster, waitReady } from "../../services/common/redis.js";
import { aclRules, hostUser } from "../../services/common/redis-acl.js";
import { startRedis, startRedisCluster, type TestRedisCluster } from "../lib/redis.js";

let r: Redis;

let seq = 0;
const vpc = () => `vpc-${(0xa00000000000 + ++seq).toString(16)}`;
const items = (v: string) => `t:${v}:items`;
const held = (h: string) => `t:host:${h}:vpcs`;

/** A change: the item's new value (or its removal) and its event, in one MULTI, as the Lua scripts do. */
async function change(v: string, item: string, value: string | null): Promise<void> {
  const m = r.multi();
  if (value === null) m.hdel(items(v), item);
  else m.hset(items(v), item, value);
  await m.exec();
  await emit(r, { vpcs: [v] }, ["kind", "t.item", "vpc", v, "item", item, "value", value ?? ""]);
}

/** A VPC arrives on a host: its record, then the event on the host's stream (as netagent's ADD_NIC). */
async function arrive(h: string, v: string): Promise<void> {
  await r.hset(held(h), v, "1");
  await emit(r, { vpcs: [v], hosts: [h] }, ["kind", "nic.attached", "host", h, "vpc", v]);
}

async function leave(h: string, v: string): Promise<void> {
  await r.hdel(held(h), v);
  await emit(r, { vpcs: [v], hosts: [h] }, ["kind", "nic.detached", "host", h, "vpc", v]);
}

class Consumer {
  readonly view = new Map<string, Map<string, string>>();
  readonly seen: EventFields[] = [];
  pending: Promise<unknown> = Promise.resolve();
  feed: EventFeed;
  running?: Promise<void>;
  /** Batches handed on (onEvents calls). */
  batches = 0;
  constructor(
    readonly host: string,
    positions = new MemoryPositions(),
    settleMs = 0,
    /** The feed's client (default: the test's, Redis's default user). */
    client: Redis = r,
  ) {
    this.feed = new EventFeed(client, {
      host,
      settleMs,
      vpcs: async () => Object.keys(await r.hgetall(held(host))),
      kinds: /^t\./,
      positions,
      blockMs: 200,
      onEvents: (evs) => {
        this.batches++;
        this.seen.push(...evs);
        // Applied in order, as a sync loop would: a state read is awaited before later deltas.
        for (const e of evs) this.pending = this.pending.then(() => this.apply(e));
      },
    });
  }
  async apply(e: EventFields): Promise<void> {
    if (e.kind === "feed.joined" || e.kind === "feed.resync") {
      this.view.set(e.vpc, new Map(Object.entries(await r.hgetall(items(e.vpc)))));
    } else if (e.kind === "feed.left") this.view.delete(e.vpc);
    else if (e.kind === "t.item") {
      const m = this.view.get(e.vpc);
      if (!m) return;
      if (e.value === "") m.delete(e.item);
      else m.set(e.item, e.value);
    }
  }
  start(): this {
    this.running = this.feed.run();
    return this;
  }
  async stop(): Promise<void> {
    this.feed.stop();
    await this.running;
    await this.pending;
  }
}

async function until(what: string, ok: () => boolean | Promise<boolean>, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await ok())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((res) => setTimeout(res, 20));
  }
}

async function converged(c: Consumer, vs: string[]): Promise<boolean> {
  await c.pending;
  for (const v of vs) {
    const want = JSON.stringify(Object.entries(await r.hgetall(items(v))).sort());
    const have = JSON.stringify([...(c.view.get(v) ?? new Map<string, string>())].sort());
    if (want !== have) return false;
  }
  return true;
}

test("lostSince: a position still in the stream, or right before its first entry, lost nothing", () => {
  assert.equal(lostSince("5-0", { first: "3-0", lastGenerated: "9-0" }), false);
  assert.equal(lostSince("5-0", { first: "5-0", lastGenerated: "9-0" }), false);
  assert.equal(lostSince("5-0", { first: "5-1", lastGenerated: "9-0" }), false);
  assert.equal(lostSince("5-0", { first: "5-2", lastGenerated: "9-0" }), true);
  assert.equal(lostSince("5-0", { first: "7-0", lastGenerated: "9-0" }), true);
  assert.equal(lostSince("9-0", { lastGenerated: "9-0" }), false);
  assert.equal(lostSince("5-0", { lastGenerated: "9-0" }), true);
  assert.equal(lostSince("0-0", { lastGenerated: "0-0" }), false);
});

describe.each([
  ["one redis-server", false],
  ["Redis Cluster", true],
] as const)("on %s", (_what, cluster) => {
  let stop: () => Promise<void>;
  let clusterNodes: TestRedisCluster | undefined;
  beforeAll(async () => {
    if (cluster) {
      const c = await startRedisCluster();
      clusterNodes = c;
      r = connectRedis({ url: c.url });
      stop = () => c.stop();
    } else {
      const server = await startRedis({ persistence: false });
      r = connectRedis({ url: server.url });
      stop = () => server.stop();
    }
    await waitReady(r);
    assert.equal(isCluster(r), cluster);
  }, 60_000);

  afterAll(async () => {
    r?.disconnect();
    await stop?.();
  });

  test("a host hears the VPCs it holds and is not woken by others; a VPC arriving or leaving loses no change", async () => {
    const [mine, other, later] = [vpc(), vpc(), vpc()];
    await arrive("fa", mine);
    await change(mine, "x", "1");
    let wakes = 0;
    const c = new Consumer("fa");
    c.feed.spec.onWake = () => wakes++;
    c.start();
    await c.feed.ready;
    assert.deepEqual(c.feed.vpcs(), [mine]);
    await until("the first read", () => converged(c, [mine]));

    // Another VPC's changes: not one wake-up, not one event.
    const before = wakes;
    for (let i = 0; i < 20; i++) await change(other, `o${i}`, "1");
    await change(mine, "y", "2");
    await until("mine's change", () => converged(c, [mine]));
    assert.equal(wakes - before, 1, "woken once, by its own VPC's change");
    assert.ok(!c.seen.some((e) => e.vpc === other), "an event of a VPC it does not hold reached it");

    // A VPC arrives while it is being changed: every change made from then on shows.
    await change(later, "a", "1");
    const writer = (async () => {
      for (let i = 0; i < 50; i++) await change(later, `k${i % 7}`, String(i));
    })();
    await arrive("fa", later);
    await writer;
    await until("the arrived VPC's state", () => converged(c, [mine, later]));
    assert.ok(c.seen.some((e) => e.kind === "feed.joined" && e.vpc === later));

    // It leaves: its stream is no longer read, its view is dropped.
    await leave("fa", later);
    await until("feed.left", () => c.seen.some((e) => e.kind === "feed.left" && e.vpc === later));
    assert.deepEqual(c.feed.vpcs(), [mine]);
    const n = c.seen.length;
    await change(later, "z", "1");
    await change(mine, "w", "3");
    await until("mine's change", () => converged(c, [mine]));
    assert.ok(!c.seen.slice(n).some((e) => e.vpc === later));
    await c.stop();
  });

  test("a change reaches the host at once, not at the next poll (XREAD BLOCK on one server, the stream's wake on a cluster)", async () => {
    const v = vpc();
    await arrive("fw", v);
    const c = new Consumer("fw");
    c.feed.spec.blockMs = 60_000;
    c.start();
    await c.feed.ready;
    await until("the first read", () => converged(c, [v]));
    for (let i = 0; i < 5; i++) {
      const t0 = performance.now();
      await change(v, "k", String(i));
      await until(`change ${i}`, () => c.view.get(v)?.get("k") === String(i), 2000);
      assert.ok(performance.now() - t0 < 1000, `change ${i} took ${Math.round(performance.now() - t0)} ms`);
    }
    // And a VPC arriving (the host stream's event) is read at once too, with what it holds.
    const w = vpc();
    await change(w, "a", "1");
    await arrive("fw", w);
    await until("the arrived VPC", () => c.view.get(w)?.get("a") === "1", 2000);
    await c.stop();
  });

  test("a host that was away reads on from its last position: the changes it missed, no resync", async () => {
    const v = vpc();
    await arrive("fb", v);
    const positions = new MemoryPositions();
    const c1 = new Consumer("fb", positions).start();
    await c1.feed.ready;
    await until("the first read", () => converged(c1, [v]));
    await change(v, "a", "1");
    await until("the first change", () => converged(c1, [v]));
    const view = c1.view;
    await c1.stop();

    for (let i = 0; i < 30; i++) await change(v, `m${i % 5}`, String(i));
    await change(v, "a", null);
    const c2 = new Consumer("fb", positions);
    for (const [k, m] of view) c2.view.set(k, new Map(m)); // what the host had applied before it went away
    c2.start();
    await until("the catch-up", () => converged(c2, [v]));
    assert.ok(
      !c2.seen.some((e) => e.kind.startsWith("feed.")),
      `caught up without a resync: ${JSON.stringify(c2.seen.filter((e) => e.kind.startsWith("feed.")))}`,
    );
    assert.equal(c2.seen.filter((e) => e.kind === "t.item").length, 31);
    await c2.stop();
  });

  test("a host that was away past a trim resyncs once and converges", async () => {
    const v = vpc();
    await arrive("fc", v);
    const positions = new MemoryPositions();
    const c1 = new Consumer("fc", positions).start();
    await c1.feed.ready;
    await change(v, "a", "1");
    await until("the first change", () => converged(c1, [v]));
    const view = c1.view;
    await c1.stop();

    // Away: changes, then trimming takes the stream past its position (MAXLEN, as a busy VPC's would).
    for (let i = 0; i < 40; i++) await change(v, `t${i % 9}`, String(i));
    await change(v, "a", null);
    await r.xtrim(vpcEvents(v), "MAXLEN", 5);
    await r.xtrim(hostEvents("fc"), "MAXLEN", 0);
    const c2 = new Consumer("fc", positions);
    for (const [k, m] of view) c2.view.set(k, new Map(m));
    c2.start();
    await until("the resync", () => converged(c2, [v]));
    const resyncs = c2.seen.filter((e) => e.kind === "feed.resync");
    assert.equal(resyncs.filter((e) => e.vpc === v).length, 1, JSON.stringify(resyncs));
    // A change after the resync arrives as a delta.
    await change(v, "b", "2");
    await until("the next change", () => converged(c2, [v]));
    assert.equal(c2.seen.filter((e) => e.kind === "feed.resync" && e.vpc === v).length, 1);
    await c2.stop();
  });

  test("an event written to its VPC's stream and to its host's arrives as one batch with both copies (one pass, not one per stream)", async () => {
    const v = vpc();
    await arrive("fc", v);
    const c = new Consumer("fc");
    const batches: EventFields[][] = [];
    const onEvents = c.feed.spec.onEvents;
    c.feed.spec.onEvents = (evs) => {
      batches.push(evs);
      onEvents(evs);
    };
    c.start();
    await c.feed.ready;
    await until("the first read", () => converged(c, [v]));
    for (let i = 0; i < 10; i++) {
      const n = batches.length;
      await emit(r, { vpcs: [v], hosts: ["fc"] }, ["kind", "t.both", "vpc", v, "host", "fc", "n", String(i)]);
      await until(
        `event ${i}`,
        () =>
          batches
            .slice(n)
            .flat()
            .filter((e) => e.n === String(i)).length === 2,
      );
    }
    const split = batches.filter((b) => b.filter((e) => e.kind === "t.both").length % 2 === 1);
    if (!cluster) assert.deepEqual(split, [], "a batch held one copy of an event, its twin came in another");
    // On a cluster the two copies are two slots, written one after the
    // other, each with its own wake: the feed waits a moment after a wake
    // for the other, which is enough nearly always, not always (a split
    // costs one more pass, never a change).
    else assert.ok(split.length <= 4, `${split.length / 2} of 10 events came in two batches`);
    await c.stop();
  });

  test("settleMs: a burst of changes spread over 80 ms comes in a few batches, every one of them, in order", async () => {
    const v = vpc();
    const runs: { settle: number; batches: number }[] = [];
    for (const settle of [0, 50]) {
      const h = `hs${settle}x${seq}`;
      await arrive(h, v);
      const c = new Consumer(h, new MemoryPositions(), settle).start();
      await until("the VPC joined", () => c.view.has(v));
      const from = c.batches;
      const seenFrom = c.seen.length;
      // About a VM start's pace: a change every 8 ms.
      for (let i = 0; i < 10; i++) {
        await change(v, `k${i}`, `${settle}-${i}`);
        await new Promise((res) => setTimeout(res, 8));
      }
      await until("all ten arrived", () => c.seen.slice(seenFrom).filter((e) => e.kind === "t.item").length === 10);
      assert.deepEqual(
        c.seen
          .slice(seenFrom)
          .filter((e) => e.kind === "t.item")
          .map((e) => e.value),
        Array.from({ length: 10 }, (_, i) => `${settle}-${i}`),
        "every change, in order",
      );
      assert.ok(await converged(c, [v]));
      runs.push({ settle, batches: c.batches - from });
      await c.stop();
    }
    const [none, settled] = runs;
    // On a cluster each change takes more round trips (a MULTI per slot, with its wake), so the burst runs a little longer: one batch more.
    assert.ok(settled.batches <= (cluster ? 4 : 3), `with settleMs 50: ${settled.batches} batches`);
    assert.ok(none.batches >= 4, `without: about one per change (${none.batches})`);
  });

  test.runIf(cluster)("a wake lost while the feed's subscriber reconnects is made good when it is back", async () => {
    const v = vpc();
    await arrive("fl", v);
    const c = new Consumer("fl");
    c.feed.spec.pollMs = 600_000;
    c.start();
    await c.feed.ready;
    await until("the first read", () => converged(c, [v]));
    // A change by its wake: the feed is subscribed and waiting.
    await change(v, "warm", "1");
    await until("a change by its wake", () => c.view.get(v)?.get("warm") === "1");
    // A change whose wake nobody hears: appended without one, as while the subscriber is away.
    await r.hset(items(v), "lost", "1");
    await r.xadd(vpcEvents(v), "*", "kind", "t.item", "vpc", v, "item", "lost", "value", "1");
    await new Promise((res) => setTimeout(res, 300));
    assert.equal(c.view.get(v)?.get("lost"), undefined, `read without a wake: the test would prove nothing ${JSON.stringify(c.seen)}`);
    // The node's pub/sub connections dropped: the client reconnects and resubscribes.
    const slot = (await r.cluster("KEYSLOT", vpcEvents(v))) as number;
    const range = (await r.cluster("SLOTS")).find(([lo, hi]) => slot >= lo && slot <= hi)!;
    const owner = new Redis(range[2][1], "127.0.0.1");
    try {
      assert.ok(Number(await owner.client("KILL", "TYPE", "pubsub")) >= 1, "a subscriber was connected");
    } finally {
      owner.disconnect();
    }
    await until("the change, read once the subscriber is back", () => c.view.get(v)?.get("lost") === "1", 10_000);
    await c.stop();
  });

  test.runIf(cluster)("as the host's own ACL user (microvpcd redis-acl's rules, on every node): the feed subscribes and reads its wakes", async () => {
    const host = "facl";
    const password = "feed-acl-test-password";
    for (const n of clusterNodes!.nodes) {
      const admin = new Redis(n.port, "127.0.0.1");
      try {
        // ACL users are per node in a cluster: the operator loads them on each (docs/redis-acl.md).
        await admin.call("ACL", "SETUSER", hostUser(host), ...aclRules({ hostId: host }), `>${password}`);
      } finally {
        admin.disconnect();
      }
    }
    const asHost = connectRedis({ url: clusterNodes!.url, username: hostUser(host), password });
    try {
      await waitReady(asHost);
      const v = vpc();
      await arrive(host, v);
      // The VPC set and the state are the test's (its keys are outside mvpc:); the feed, its streams and wakes are the host user's.
      const c = new Consumer(host, new MemoryPositions(), 0, asHost);
      c.feed.spec.pollMs = 600_000;
      c.start();
      await c.feed.ready;
      await until("the first read", () => converged(c, [v]));
      await change(v, "k", "1");
      await until("a change, by its wake", () => converged(c, [v]), 5_000);
      await c.stop();
    } finally {
      asHost.disconnect();
    }
  });

  // Last: it leaves the cluster with a primary fewer replicas.
  test.runIf(cluster)(
    "a failover of the primary holding a VPC's stream: the feed resubscribes and loses no change",
    async () => {
      const v = vpc();
      await arrive("fo", v);
      const c = new Consumer("fo");
      // No poll to fall back on within the test: what arrives comes by a wake or by the resubscription's read.
      c.feed.spec.pollMs = 600_000;
      c.start();
      await c.feed.ready;
      await until("the first read", () => converged(c, [v]));
      await change(v, "before", "1");
      await until("a change before the failover", () => converged(c, [v]));

      const slot = (await r.cluster("KEYSLOT", vpcEvents(v))) as number;
      const range = (await r.cluster("SLOTS")).find(([lo, hi]) => slot >= lo && slot <= hi)!;
      const primary = clusterNodes!.nodes.find((n) => n.port === range[2][1])!;
      primary.proc.kill("SIGKILL");
      // Writes to the slot fail until a replica takes over (cluster-node-timeout 2 s): retried, bounded.
      const t0 = Date.now();
      for (let i = 0; ; i++) {
        try {
          await change(v, "after", String(i));
          break;
        } catch (err) {
          if (Date.now() - t0 > 20_000) throw err;
          await new Promise((res) => setTimeout(res, 200));
        }
      }
      await until("the change written after the failover", () => converged(c, [v]), 15_000);
      await change(v, "later", "1");
      await until("a change on the promoted primary, by its wake", () => converged(c, [v]), 5_000);
      await c.stop();
    },
    60_000,
  );
});
