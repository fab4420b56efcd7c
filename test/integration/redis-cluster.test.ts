// Redis Cluster groundwork (issue #18), on a real cluster: six redis-server
// processes in cluster mode (3 primaries, 3 replicas) on loopback ports,
// joined by redis-cli --cluster create (test/lib/redis.ts). What is asserted
// here is partly microvpc's client (connectRedis of a redis-cluster:// URL,
// duplicateClient, fail-fast) and partly Redis's own rules, written down as
// tests because the key schema has to follow them: keys of one command or
// one script in one slot (a hash tag), and sharded pub/sub in the slot of
// its channel.
import assert from "node:assert/strict";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, test } from "vitest";
import { connectRedis, duplicateClient, isCluster, waitReady } from "../../services/common/redis.js";
import { startDaemon, type Daemon } from "../lib/daemon.js";
import { freePort, startRedisCluster, type TestRedisCluster } from "../lib/redis.js";

let cluster: TestRedisCluster;
let r: Redis;
const opened: Redis[] = [];

/** A client of the test's cluster (disconnected in afterAll). */
function client(commandTimeoutMs = 1000): Redis {
  const c = connectRedis({ url: cluster.url, commandTimeoutMs });
  opened.push(c);
  return c;
}

/** A plain connection to one node (not a cluster client). */
function node(port: number): Redis {
  const c = new Redis({ port, host: "127.0.0.1", lazyConnect: false, maxRetriesPerRequest: 1 });
  c.on("error", () => {});
  opened.push(c);
  return c;
}

/** The port of the primary serving a slot (CLUSTER SLOTS of any node). */
async function ownerOf(key: string): Promise<number> {
  const slot = (await r.cluster("KEYSLOT", key)) as number;
  const range = (await r.cluster("SLOTS")).find(([lo, hi]) => slot >= lo && slot <= hi);
  assert.ok(range?.[2], `slot ${slot} is served`);
  return range[2][1];
}

/** A hash tag {k<i>} whose slot differs from `key`'s and whose primary is (or is not) the same node. */
async function tagWhere(key: string, sameNode: boolean): Promise<string> {
  const owner = await ownerOf(key);
  const slot = await r.cluster("KEYSLOT", key);
  for (let i = 0; i < 1000; i++) {
    const k = `t:{k${i}}:x`;
    if ((await r.cluster("KEYSLOT", k)) === slot) continue;
    if (((await ownerOf(k)) === owner) === sameNode) return k;
  }
  throw new Error("no such key found");
}

/** The error a promise rejects with (fails if it resolves). */
async function errorOf(p: Promise<unknown>): Promise<Error> {
  try {
    const v = await p;
    assert.fail(`expected an error, got ${JSON.stringify(v)}`);
  } catch (e) {
    if (e instanceof assert.AssertionError) throw e;
    return e as Error;
  }
}

beforeAll(async () => {
  cluster = await startRedisCluster({ primaries: 3, replicasPerPrimary: 1 });
  r = client();
  await waitReady(r, 10_000);
});

afterAll(async () => {
  for (const c of opened) c.disconnect();
  await cluster?.stop();
});

test("the harness: six nodes, three primaries with a replica each, every node says cluster_state:ok with all 16384 slots", async () => {
  assert.equal(cluster.nodes.length, 6);
  assert.equal(new Set(cluster.nodes.flatMap((n) => [n.port, n.busPort])).size, 12, "client and bus ports all distinct");
  const primaries = await cluster.primaries();
  assert.equal(primaries.length, 3);
  assert.match(cluster.url, /^redis-cluster:\/\/127\.0\.0\.1:\d+,127\.0\.0\.1:\d+,127\.0\.0\.1:\d+$/);
  assert.deepEqual(
    cluster.url
      .slice("redis-cluster://".length)
      .split(",")
      .map((s) => Number(s.split(":")[1]))
      .sort((a, b) => a - b),
    primaries,
  );
  for (const n of cluster.nodes) {
    const info = (await node(n.port).cluster("INFO")) as string;
    assert.match(info, /^cluster_state:ok\r?$/m, `node ${n.port}`);
    assert.match(info, /^cluster_slots_assigned:16384\r?$/m);
    assert.match(info, /^cluster_known_nodes:6\r?$/m);
    assert.match(info, /^cluster_size:3\r?$/m, "three primaries serve slots");
  }
  const lines = ((await node(primaries[0]).cluster("NODES")) as string).trim().split("\n");
  assert.equal(lines.filter((l) => l.split(" ")[2].includes("slave")).length, 3, "three replicas");
  assert.equal(r.status, "ready", "waitReady works on a Cluster: its status becomes ready too");
  assert.equal(isCluster(r), true);
});

test("connectRedis(redis-cluster://): keys in many slots are written and read; a multi-key command is one slot or CROSSSLOT", async () => {
  const keys = Array.from({ length: 200 }, (_, i) => `t:{k${i}}`);
  await Promise.all(keys.map((k, i) => r.set(k, String(i))));
  assert.deepEqual(
    await Promise.all(keys.map((k) => r.get(k))),
    keys.map((_, i) => String(i)),
  );
  const slots = new Set(await Promise.all(keys.map((k) => r.cluster("KEYSLOT", k))));
  assert.ok(slots.size > 150, `200 keys in ${slots.size} slots`);
  // Spread over every primary (read straight from each node, not through the cluster client).
  for (const p of await cluster.primaries()) assert.ok((await node(p).dbsize()) > 20, `primary ${p} holds some of them`);
  // Two slots in one command: Redis refuses it (CROSSSLOT, on any node)...
  const viaNode = await errorOf(node(cluster.nodes[0].port).mset("t:{a}:x", "1", "t:{b}:y", "2"));
  assert.match(viaNode.message, /^CROSSSLOT Keys in request don't hash to the same slot$/);
  // ...and through microvpc's Cluster client too.
  const viaClient = await errorOf(r.mset("t:{a}:x", "1", "t:{b}:y", "2"));
  assert.match(viaClient.message, /^CROSSSLOT Keys in request don't hash to the same slot$/);
  assert.equal((await r.exists("t:{a}:x")) + (await r.exists("t:{b}:y")), 0, "nothing written");
  // The same hash tag: one slot, one command.
  assert.equal(await r.mset("t:{a}:x", "1", "t:{a}:y", "2"), "OK");
  assert.deepEqual(await r.mget("t:{a}:x", "t:{a}:y"), ["1", "2"]);
  // MULTI over one slot works; over two it is refused as a whole.
  assert.deepEqual(await r.multi().incr("t:{a}:n").incr("t:{a}:n").exec(), [
    [null, 1],
    [null, 2],
  ]);
  const multi = await errorOf(r.multi().incr("t:{a}:n").incr("t:{b}:n").exec());
  assert.match(multi.message, /^All keys in the pipeline should belong to the same slots allocation group$/);
  assert.equal(await r.get("t:{a}:n"), "2");
});

test("a slot moved to another primary under a client (resharding): its commands follow it, also mixed with other slots of the old node in one tick, a MULTI and a script", async () => {
  const c = client(2000);
  await waitReady(c);
  const primaries = await cluster.primaries();
  const ids = new Map<number, string>();
  for (const p of primaries) ids.set(p, (await node(p).cluster("MYID")) as string);
  const key = "t:{moving}:x";
  const slot = (await r.cluster("KEYSLOT", key)) as number;
  const from = await ownerOf(key);
  const to = primaries.find((p) => p !== from)!;
  // Eight keys of other slots that stay on the old node: with the moved one, one batch per node if the client batched.
  const stay: string[] = [];
  for (let i = 0; stay.length < 8; i++) {
    const k = `t:{stay${i}}:x`;
    if ((await r.cluster("KEYSLOT", k)) !== slot && (await ownerOf(k)) === from) stay.push(k);
  }
  const move = async (a: number, b: number) => {
    await node(b).cluster("SETSLOT", slot, "IMPORTING", ids.get(a)!);
    await node(a).cluster("SETSLOT", slot, "MIGRATING", ids.get(b)!);
    if ((await node(a).exists(key)) === 1) await node(a).call("MIGRATE", "127.0.0.1", String(b), "", "0", "5000", "KEYS", key);
    for (const p of primaries) await node(p).cluster("SETSLOT", slot, "NODE", ids.get(b)!);
  };
  await c.set(key, "before");
  await move(from, to);
  // The client's map still says `from`: every command must be redirected, none may fail.
  const writes = await Promise.allSettled([c.set(key, "after"), ...stay.map((k) => c.set(k, "v"))]);
  assert.deepEqual(
    writes.filter((x) => x.status === "rejected").map((x) => String((x as PromiseRejectedResult).reason)),
    [],
  );
  assert.equal(await node(to).get(key), "after", "written on the new owner");
  await move(to, from);
  const mixed = await Promise.all([c.multi().set(key, "m").get(key).exec(), c.eval("return redis.call('GET', KEYS[1])", 1, key), ...stay.map((k) => c.get(k))]);
  assert.deepEqual(mixed[0], [
    [null, "OK"],
    [null, "m"],
  ]);
  assert.ok(["after", "m"].includes(String(mixed[1])));
  assert.deepEqual(
    mixed.slice(2),
    stay.map(() => "v"),
  );
  assert.equal(await node(from).get(key), "m", "back on the first owner");
});

describe("Lua scripts (EVAL): the keys of a script are one slot", () => {
  const SET2 = "redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1]); return redis.call('GET', KEYS[2])";

  test("declared keys in one hash tag run; declared keys of two slots get CROSSSLOT", async () => {
    assert.equal(await r.eval(SET2, 2, "t:{s}:a", "t:{s}:b", "v1"), "v1");
    const viaNode = await errorOf(node(cluster.nodes[0].port).eval(SET2, 2, "t:{s}:a", "t:{other}:b", "v2"));
    assert.match(viaNode.message, /^CROSSSLOT Keys in request don't hash to the same slot$/);
    const viaClient = await errorOf(r.eval(SET2, 2, "t:{s}:a", "t:{other}:b", "v2"));
    assert.match(viaClient.message, /^CROSSSLOT Keys in request don't hash to the same slot$/);
    assert.equal(await r.get("t:{s}:a"), "v1", "the refused script did not run");
  });

  test("an undeclared key: of another node's slot it is refused; of another slot of the same node it runs (Redis 7.0); of the same slot it runs", async () => {
    const UNDECLARED = "redis.call('SET', KEYS[1], 'd'); return redis.call('SET', ARGV[1], 'u')";
    // Another node: refused when the script reaches the key, after its first write (no rollback).
    const remote = await tagWhere("t:{u}:a", false);
    const e = await errorOf(r.eval(UNDECLARED, 1, "t:{u}:a", remote));
    assert.match(e.message, /Script attempted to access a non local key in a cluster node/);
    assert.equal(await r.get("t:{u}:a"), "d", "the write before the refused call stays: a script error does not roll back");
    assert.equal(await r.get(remote), null);
    // Another slot on the same node: Redis 7.0.15 does not check slots of undeclared keys, only the node.
    // It runs, but the key's slot may move to another node (resharding, failover of a part): never rely on it.
    const local = await tagWhere("t:{u}:b", true);
    assert.equal(await r.eval(UNDECLARED, 1, "t:{u}:b", local), "OK");
    assert.equal(await r.get(local), "u");
    // The same slot (the declared key's hash tag): runs.
    assert.equal(await r.eval(UNDECLARED, 1, "t:{u}:c", "t:{u}:undeclared"), "OK");
    assert.equal(await r.get("t:{u}:undeclared"), "u");
  });
});

test("duplicateClient of a cluster client honours its overrides: a blocking XREAD outlives the original's command timeout", async () => {
  const stream = "t:{s1}:stream";
  const sub = duplicateClient(r, { enableOfflineQueue: true, commandTimeout: undefined, maxRetriesPerRequest: null });
  opened.push(sub);
  sub.on("error", () => {});
  assert.equal(isCluster(sub), true);
  // Offline queue on: a command before the duplicate is ready waits for it instead of failing.
  assert.equal(await sub.ping(), "PONG");
  // The original (command timeout 1000 ms) gives up on a 2 s block...
  const timedOut = await errorOf(r.xread("BLOCK", 2000, "STREAMS", stream, "$"));
  assert.match(timedOut.message, /Command timed out/);
  // ...the duplicate (no command timeout) waits, and returns when another client appends.
  const t0 = Date.now();
  const read = sub.xread("BLOCK", 10_000, "STREAMS", stream, "$");
  setTimeout(() => void r.xadd(stream, "*", "kind", "x"), 1500);
  const got = (await read) as [string, [string, string[]][]][];
  assert.equal(got[0][0], stream);
  assert.deepEqual(got[0][1][0][1], ["kind", "x"]);
  assert.ok(Date.now() - t0 >= 1400, "it blocked");
});

describe("sharded pub/sub (wake-ups)", () => {
  const vpc = "vpc-000000000001";
  const wake = `mvpc:{${vpc}}:wake`;
  const events = `mvpc:{${vpc}}:events`;
  let sub: Redis;
  const got: [string, string][] = [];
  let heard: (() => void) | undefined;

  const next = (ms = 5000) =>
    new Promise<[string, string]>((resolve, reject) => {
      const n = got.length;
      const t = setTimeout(() => reject(new Error(`no smessage within ${ms} ms`)), ms);
      heard = () => {
        if (got.length > n) {
          clearTimeout(t);
          resolve(got[n]);
        }
      };
    });

  beforeAll(async () => {
    sub = duplicateClient(r, { enableOfflineQueue: true, commandTimeout: undefined, maxRetriesPerRequest: null });
    opened.push(sub);
    sub.on("error", () => {});
    sub.on("smessage", (channel: string, message: string) => {
      got.push([channel, message]);
      heard?.();
    });
    await waitReady(sub);
    await sub.ssubscribe(wake);
  });

  test("an SPUBLISH from another client reaches the SSUBSCRIBEd duplicate", async () => {
    const p = next();
    assert.equal(await r.spublish(wake, "from-client"), 1, "one subscriber on the channel's shard");
    assert.deepEqual(await p, [wake, "from-client"]);
  });

  test("a script can XADD to the stream and SPUBLISH the wake of its slot (Redis 7.0.15)", async () => {
    const XADD_WAKE = "local id = redis.call('XADD', KEYS[1], '*', 'kind', 'k'); redis.call('SPUBLISH', ARGV[1], '1'); return id";
    const p = next();
    const id = (await r.eval(XADD_WAKE, 1, events, wake)) as string;
    assert.match(id, /^\d+-\d+$/);
    assert.deepEqual(await p, [wake, "1"]);
    assert.equal(await r.xlen(events), 1);
    // The wake of another slot, from the same script: refused like any other key of another node.
    const otherWake = await tagWhere(events, false);
    const e = await errorOf(r.eval(XADD_WAKE, 1, events, otherWake));
    assert.match(e.message, /non local key/);
  });
});

describe("fail-fast", () => {
  /** Runs a SET, a PING and a MULTI a few times; each must be refused within boundMs. */
  async function refusedQuickly(c: Redis, boundMs: number): Promise<string[]> {
    const seen: string[] = [];
    for (let i = 0; i < 3; i++) {
      for (const cmd of [() => c.set("t:{f}:x", "1"), () => c.ping(), () => c.multi().incr("t:{f}:n").exec()]) {
        const t0 = Date.now();
        const e = await errorOf(cmd());
        const ms = Date.now() - t0;
        assert.ok(ms < boundMs, `refused in ${ms} ms (bound ${boundMs}): ${e.message}`);
        seen.push(e.message);
      }
      await new Promise((res) => setTimeout(res, 400));
    }
    return seen;
  }

  test("a Cluster client whose seeds do not answer refuses commands at once, and keeps doing so", async () => {
    const [p1, p2] = [await freePort(), await freePort()];
    const dead = connectRedis({ url: `redis-cluster://127.0.0.1:${p1},127.0.0.1:${p2}`, commandTimeoutMs: 1000 });
    opened.push(dead);
    // No slot map: not even pipelined commands wait for the next connection attempt (failFastUnmapped).
    for (const m of await refusedQuickly(dead, 1000)) assert.equal(m, "Cluster isn't ready and enableOfflineQueue options is false");
    await assert.rejects(waitReady(dead, 500), /redis not ready after 500 ms/);
  });

  test("a Cluster client whose whole cluster goes away refuses commands within the bound", async () => {
    const gone = await startRedisCluster({ primaries: 3, replicasPerPrimary: 0 });
    let c: Redis | undefined;
    try {
      c = connectRedis({ url: gone.url, commandTimeoutMs: 1000 });
      opened.push(c);
      await waitReady(c);
      assert.equal(await c.set("t:{f}:x", "1"), "OK");
      await gone.stop();
      // "Connection is closed." from the node connection of a slot, then "Cluster isn't ready..." once the client knows.
      for (const m of await refusedQuickly(c, 5000))
        assert.match(m, /^(Connection is closed\.|Cluster isn't ready and enableOfflineQueue options is false|None of startup nodes is available)$/);
    } finally {
      await gone.stop();
    }
  });
});

describe("microvpcd ipam on the cluster", () => {
  let daemon: Daemon;

  afterAll(async () => {
    await daemon?.stop();
  });

  test("starts with --redis redis-cluster://... (no switch: every service runs there, and move-to-cluster moves a deployment), answers SERVING and reports microvpc_redis_up 1", async () => {
    // startDaemon returns once grpc.health says SERVING (its readiness: a PING through the Cluster client).
    daemon = await startDaemon("ipam", ["--redis", cluster.url, "--redis-timeout-ms", "500"]);
    const text = await (await fetch(`http://127.0.0.1:${daemon.metricsPort}/metrics`)).text();
    assert.match(text, /^microvpc_redis_up(\{[^}]*\})? 1$/m);
    const ready = await fetch(`http://127.0.0.1:${daemon.metricsPort}/readyz`);
    assert.equal(ready.status, 200);
  });

  test("a user or password in the cluster URL stops the daemon with a message, without showing the password", async () => {
    const err = await startDaemon("ipam", ["--redis", cluster.url.replace("redis-cluster://", "redis-cluster://:hunter2@")]).then(
      () => assert.fail("started"),
      (e: Error) => e,
    );
    assert.match(err.message, /takes no user or password/);
    assert.doesNotMatch(err.message.split("\n").slice(1).join("\n"), /hunter2/);
  });
});
