// A host's instance metadata under its hash tag (issue 18, docs/redis-schema.md
// "Redis Cluster"), on a real Redis and a real 3+3 cluster:
// - on a single Redis, records a gateway of the previous release wrote (with
//   that release's own scripts, test/lib/gateway-previous-scripts.ts) move
//   when the host's gateway starts, with their tokens (and their expiry), the
//   address and hop-limit entries, the indexes and a rev that keeps rising;
//   the control plane's view reads a host not moved yet where it is;
// - every change appends its event to the host's change stream, which the
//   host's gateway follows (before, only to the fleet's stream, which a
//   gateway on scoped feeds no longer reads: it learnt of a hop-limit change
//   only at its next drift pass);
// - on a cluster, Set, Get, List, Delete, the IMDS read and token minting run
//   (each script in the host's slot, every key declared), and the shared
//   host listing follows the records.
import assert from "node:assert/strict";
import { create, toBinary, type MessageInitShape } from "@bufbuild/protobuf";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, test } from "vitest";
import { followScoped, hostEvents, type EventFields } from "../../services/common/events.js";
import { InstanceMetadataSchema } from "../../gen/microvpc/v1/gateway_pb.js";
import { FleetMetadataStore, MD_HOSTS, mdKeys, MetadataStore } from "../../services/gateway/metadata-store.js";
import { GATEWAY_EVENTS } from "../../services/gateway/sync.js";
import { waitFor } from "../lib/netns.js";
import { previousMdKeys as P, previousMint, previousSet } from "../lib/gateway-previous-scripts.js";
import { connectReady, startRedisCluster, type TestRedisCluster } from "../lib/redis.js";
import { scratchRedis } from "../lib/scratch-redis.js";

const VPC = "vpc-0123456789ab";

function md(over: MessageInitShape<typeof InstanceMetadataSchema> = {}) {
  return create(InstanceMetadataSchema, {
    instanceId: "vm-1",
    vpcId: VPC,
    subnetId: "subnet-aaaaaaaaaaaa",
    localIpv4: "10.0.1.5",
    mac: "02:00:0A:00:01:05",
    hostname: "vm-1",
    userData: new TextEncoder().encode("#cloud-config\n"),
    ...over,
  });
}
const pbOf = (m: ReturnType<typeof md>) => Buffer.from(toBinary(InstanceMetadataSchema, m)).toString("base64");

/**
 * What the host's gateway hears of a metadata change: a feed with the
 * gateway's scope (its host's stream, its VPCs', the fleet's) and kinds,
 * while `change` runs. Its data plane applies a hop limit on this event;
 * without it, only at its next drift pass.
 */
async function gatewayHears(r: Redis, change: () => Promise<unknown>): Promise<string[]> {
  const heard: EventFields[] = [];
  let stop = false;
  const f = followScoped(
    r,
    { host: "hv1", vpcs: async () => [VPC], registry: true },
    GATEWAY_EVENTS,
    (es) => heard.push(...es),
    () => stop,
  );
  try {
    // Its streams' positions are taken once it has joined the VPC.
    assert.ok(await waitFor(() => heard.some((e) => e.kind === "feed.joined"), { timeoutMs: 5_000, intervalMs: 20 }), "the feed started");
    await change();
    await waitFor(async () => heard.some((e) => e.kind?.startsWith("gw.metadata.")), { timeoutMs: 5_000, intervalMs: 50 });
  } finally {
    stop = true;
    f.stop();
    await f.done.catch(() => {});
  }
  return heard.filter((e) => e.kind?.startsWith("gw.metadata.")).map((e) => `${e.kind} ${e.instance} hop ${e.hop_limit}`);
}

/** The kinds and instances of the events on a stream. */
async function events(r: Redis, stream: string): Promise<string[]> {
  return (await r.xrange(stream, "-", "+")).map(([, f]) => {
    const o = Object.fromEntries(f.flatMap((_, i) => (i % 2 ? [] : [[f[i], f[i + 1]]])));
    return `${o.kind} ${o.instance}`;
  });
}

describe("on a single Redis: the move from the previous layout", () => {
  const db = scratchRedis();

  test("a host's records move under its hash tag with tokens, entries and indexes; revs keep rising; once", async () => {
    const expires = Date.now() + 60_000;
    for (const [id, addr, hop] of [
      ["vm-a", "10.0.1.5", 1],
      ["vm-b", "10.0.1.6", 3],
    ] as const) {
      assert.equal((await previousSet(db.r, "hv1", id, VPC, addr, pbOf(md({ instanceId: id, localIpv4: addr })), hop))[0], 1);
    }
    assert.equal(await previousMint(db.r, "hv1", "vm-a", VPC, "10.0.1.5", "ab".repeat(12), expires), 1);
    await previousSet(db.r, "hv2", "vm-c", VPC, "10.0.1.7", pbOf(md({ instanceId: "vm-c", localIpv4: "10.0.1.7" })), 1);
    const oldRev = Number(await db.r.get(P("hv1").rev));
    const store = new MetadataStore(db.r, "hv1");
    const K = mdKeys("hv1");
    assert.equal(await store.moveFromPrevious(), 2);
    assert.equal(await db.r.hget(K.inst("vm-b"), "id"), "vm-b", "the record");
    assert.deepEqual(await db.r.hgetall(K.byAddr), { [`${VPC}/10.0.1.5`]: "vm-a", [`${VPC}/10.0.1.6`]: "vm-b" }, "who each caller is");
    assert.deepEqual(await db.r.hgetall(K.hop), { [`${VPC}/10.0.1.5`]: "1", [`${VPC}/10.0.1.6`]: "3" }, "the hop limits");
    assert.deepEqual(await db.r.zrange(K.all, 0, -1), ["vm-a", "vm-b"]);
    assert.deepEqual(await db.r.zrange(K.vpc(VPC), 0, -1), ["vm-a", "vm-b"]);
    assert.ok((await db.r.pttl(K.tokens("vm-a"))) > 0, "the tokens, with their expiry");
    assert.equal((await db.r.keys("mvpc-md:hv1:*")).length, 0, "nothing left under the earlier names but the counter");
    assert.equal(await db.r.hget(P("hv2").inst("vm-c"), "id"), "vm-c", "hv2's records are hv2's gateway's to move");
    assert.equal(await store.moveFromPrevious(), 0, "once");
    // IMDS serves them, the token still verifies, and a write gives a higher rev than any before.
    const st = await store.resolveCaller(VPC, "10.0.1.5", "", "ab".repeat(12));
    assert.equal(st?.instanceId, "vm-a");
    assert.equal(st?.token, "live");
    assert.equal((await store.hopLimits()).get(`${VPC}/10.0.1.6`), 3);
    await store.set(md({ instanceId: "vm-b", localIpv4: "10.0.1.6", hostname: "renamed" }));
    assert.ok(Number(await db.r.hget(K.inst("vm-b"), "rev")) > oldRev, "revs keep rising");
  });

  test("a record whose address another instance holds now stays where it is, never served, and goes with its instance's delete", async () => {
    // hv1's move failed once; meanwhile vm-a's address went to vm-c under this release's names.
    await previousSet(db.r, "hv1", "vm-a", VPC, "10.0.1.5", pbOf(md({ instanceId: "vm-a", hostname: "stale" })), 1);
    const store = new MetadataStore(db.r, "hv1");
    await store.set(md({ instanceId: "vm-c", hostname: "current" }));
    assert.equal(await store.moveFromPrevious(), 0);
    assert.equal(await db.r.hget(mdKeys("hv1").byAddr, `${VPC}/10.0.1.5`), "vm-c", "the address stays vm-c's");
    assert.equal((await store.resolveCaller(VPC, "10.0.1.5", "", ""))?.metadata?.hostname, "current", "IMDS serves vm-c");
    assert.equal(await store.get("vm-a"), null, "vm-a is not served");
    assert.equal(await db.r.hget(P("hv1").inst("vm-a"), "id"), "vm-a", "but stays under the earlier names");
    assert.equal((await store.delete("vm-a")).deleted, true, "its VM's delete removes it");
    assert.equal(await db.r.exists(P("hv1").inst("vm-a")), 0);
    assert.equal(await db.r.hget(mdKeys("hv1").byAddr, `${VPC}/10.0.1.5`), "vm-c", "and leaves vm-c's entry");
    assert.deepEqual(await db.r.smembers(MD_HOSTS), ["hv1"], "and hv1 in the host listing, which vm-c keeps it in");
  });

  test("the control plane reads, lists and deletes a host's records where they are, moved or not", async () => {
    await previousSet(db.r, "hv2", "vm-c", VPC, "10.0.1.7", pbOf(md({ instanceId: "vm-c", localIpv4: "10.0.1.7" })), 1);
    await new MetadataStore(db.r, "hv1").set(md({ instanceId: "vm-a" }));
    const fleet = new FleetMetadataStore(db.r);
    assert.deepEqual(await fleet.hosts(), ["hv1", "hv2"]);
    assert.equal((await fleet.get("vm-c"))?.localIpv4, "10.0.1.7", "hv2, not moved yet");
    assert.equal((await fleet.getByAddress(VPC, "10.0.1.5"))?.instanceId, "vm-a", "hv1");
    assert.deepEqual(
      (await fleet.list({ limit: 10 })).map((m) => m.instanceId),
      ["vm-a", "vm-c"],
    );
    assert.equal((await fleet.delete("vm-c")).deleted, true);
    assert.equal(await db.r.exists(P("hv2").inst("vm-c")), 0, "deleted where it was");
    assert.deepEqual(await db.r.smembers(MD_HOSTS), ["hv1"], "hv2 has no record left");
  });

  test("every change appends its event to the host's stream (which its gateway follows), and the fleet's", async () => {
    const store = new MetadataStore(db.r, "hv1");
    await store.set(md({ instanceId: "vm-e", options: { httpPutResponseHopLimit: 2 } }));
    await store.set(md({ instanceId: "vm-e", localIpv4: "10.0.1.8" }));
    await store.delete("vm-e");
    const want = ["gw.metadata.set vm-e", "gw.metadata.set vm-e", "gw.metadata.deleted vm-e"];
    assert.deepEqual(await events(db.r, hostEvents("hv1")), want);
    assert.deepEqual(await events(db.r, "mvpc:events"), want);
    assert.deepEqual(await events(db.r, hostEvents("hv2")), [], "another host's stream hears nothing");
  });

  test("the host's gateway hears a hop-limit change at once (its feed), not at its next drift pass", async () => {
    const store = new MetadataStore(db.r, "hv1");
    assert.deepEqual(await gatewayHears(db.r, () => store.set(md({ instanceId: "vm-h", options: { httpPutResponseHopLimit: 3 } }))), [
      "gw.metadata.set vm-h hop 3",
    ]);
  });

  test("a record moved to another VPC leaves the old VPC's index, also when the VPC its writer read was stale", async () => {
    const store = new MetadataStore(db.r, "hv1");
    const K = mdKeys("hv1");
    await store.set(md({ instanceId: "vm-m" }));
    // The writer reads the record's VPC, then the script checks it: a stale read is refused and read again.
    const hget = db.r.hget.bind(db.r);
    let reads = 0;
    db.r.hget = ((...a: Parameters<typeof hget>) => (reads++ === 0 ? Promise.resolve("vpc-ffffffffffff") : hget(...a))) as typeof db.r.hget;
    try {
      await store.set(md({ instanceId: "vm-m", vpcId: "vpc-ba9876543210", localIpv4: "10.9.0.5" }));
    } finally {
      db.r.hget = hget;
    }
    assert.equal(reads, 2, "read again after the script refused the stale VPC");
    assert.deepEqual(await db.r.zrange(K.vpc(VPC), 0, -1), []);
    assert.deepEqual(await db.r.zrange(K.vpc("vpc-ba9876543210"), 0, -1), ["vm-m"]);
    assert.deepEqual(
      (await store.list({ vpcId: VPC, limit: 10 })).map((m) => m.instanceId),
      [],
    );
  });
});

describe("on a Redis Cluster (3 primaries, 3 replicas)", () => {
  let cluster: TestRedisCluster;
  let c: Redis;

  beforeAll(async () => {
    cluster = await startRedisCluster();
    c = await connectReady({ url: cluster.url, commandTimeoutMs: 2000 });
  }, 60_000);
  afterAll(async () => {
    c?.disconnect();
    await cluster?.stop();
  });

  test("a host's metadata keys share the slot of its change stream", async () => {
    const slot = (key: string) => c.cluster("KEYSLOT", key) as Promise<number>;
    const K = mdKeys("hv1");
    const want = await slot(hostEvents("hv1"));
    for (const key of [K.inst("vm-1"), K.byAddr, K.hop, K.all, K.vpc(VPC), K.tokens("vm-1"), K.rev]) assert.equal(await slot(key), want, key);
  });

  test("Set, IMDS, tokens, List, the control plane's view and Delete run; the host listing follows the records", async () => {
    const a = new MetadataStore(c, "hv1");
    const b = new MetadataStore(c, "hv2");
    assert.equal((await a.set(md({ instanceId: "vm-1", options: { httpPutResponseHopLimit: 2 } }))).created, true);
    assert.equal((await b.set(md({ instanceId: "vm-2", localIpv4: "10.0.1.9" }))).created, true);
    assert.deepEqual((await c.smembers(MD_HOSTS)).sort(), ["hv1", "hv2"]);
    assert.equal(await a.recordToken("vm-1", VPC, "10.0.1.5", "cd".repeat(12), Date.now() + 60_000), true);
    const st = await a.resolveCaller(VPC, "10.0.1.5", "", "cd".repeat(12));
    assert.equal(st?.instanceId, "vm-1");
    assert.equal(st?.token, "live");
    assert.equal(st?.metadata?.hostname, "vm-1");
    assert.equal((await a.resolveCaller(VPC, "10.0.1.5", st!.rev, ""))?.metadata, undefined, "unchanged since the cached rev");
    // Another instance takes the address: IMDS finds it (its keys were not the ones guessed).
    await a.delete("vm-1");
    await a.set(md({ instanceId: "vm-3" }));
    assert.equal((await a.resolveCaller(VPC, "10.0.1.5", "", ""))?.instanceId, "vm-3");
    assert.equal((await a.hopLimits()).get(`${VPC}/10.0.1.5`), 1);
    const fleet = new FleetMetadataStore(c);
    assert.equal((await fleet.get("vm-2"))?.localIpv4, "10.0.1.9");
    assert.deepEqual(
      (await fleet.list({ limit: 10 })).map((m) => m.instanceId),
      ["vm-2", "vm-3"],
    );
    assert.equal((await fleet.delete("vm-2")).deleted, true);
    assert.deepEqual(await c.smembers(MD_HOSTS), ["hv1"], "hv2 has no record left");
    assert.deepEqual(await events(c, hostEvents("hv1")), ["gw.metadata.set vm-1", "gw.metadata.deleted vm-1", "gw.metadata.set vm-3"]);
    assert.equal(await c.exists("mvpc:events"), 0, "the fleet's stream is not written on a cluster");
    await a.delete("vm-3");
    assert.deepEqual(await c.smembers(MD_HOSTS), []);
    assert.deepEqual(
      await gatewayHears(c, () => a.set(md({ instanceId: "vm-4", options: { httpPutResponseHopLimit: 4 } }))),
      ["gw.metadata.set vm-4 hop 4"],
      "and its gateway hears it (the stream's wake)",
    );
  });
});
