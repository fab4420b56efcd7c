// Transit indexes (one /30 per VPC per hypervisor, 16 000 per host) are
// reused: a VPC that leaves frees its index for the next one, so a host that
// sees VPCs come and go never runs out (it used to, and then the metadata
// server answered 404 to every new VPC). Against a real redis-server, or with
// MICROVPC_TEST_ON_CLUSTER=1 a 3+3 Redis Cluster (test/lib/on-cluster.ts),
// where a host's indexes are under its hash tag (GatewayKeys.transit).
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import type { Redis } from "ioredis";
import { afterAll, beforeAll, describe, test } from "vitest";
import { gwKeys, MAX_TRANSIT, type GatewayKeys } from "../../services/gateway/schema.js";
import { GatewayStore } from "../../services/gateway/store.js";
import { connectReady, startDaemonsRedis, type DaemonsRedis } from "../lib/redis.js";
import { ON_CLUSTER } from "../lib/on-cluster.js";

let server: DaemonsRedis;
let redis: Redis;
let keys: GatewayKeys;
let store: GatewayStore;
const HOST = "hv-transit";
const vpcId = () => `vpc-${randomBytes(6).toString("hex")}`;

beforeAll(async () => {
  server = await startDaemonsRedis({ appendfsync: "no" });
  // 1000 scripts at once (the second case): room over the services' 2 s per command for a machine the suite shares.
  redis = await connectReady({ url: server.url, commandTimeoutMs: 10_000 });
  keys = gwKeys(redis);
  store = new GatewayStore(redis);
});

afterAll(async () => {
  redis?.disconnect();
  await server?.stop();
});

describe("transit indexes", () => {
  test("VPCs arriving and leaving 12 000 times reuse the same few indexes", async () => {
    const seen = new Set<number>();
    for (let round = 0; round < 120; round++) {
      const ids = Array.from({ length: 100 }, vpcId);
      const got = await Promise.all(ids.map((id) => store.transitIndex(HOST, id)));
      assert.equal(new Set(got).size, ids.length, "no two VPCs share an index");
      for (const k of got) seen.add(k);
      assert.deepEqual(await Promise.all(ids.map((id) => store.transitIndex(HOST, id))), got, "a VPC keeps its index while it is here");
      const freed = await Promise.all(ids.map((id) => store.releaseTransit(HOST, id)));
      assert.deepEqual(freed, got);
    }
    assert.equal(seen.size, 100, "only as many indexes as VPCs at once");
    assert.ok(Math.max(...seen) < 100);
    assert.equal((await store.transitMap(HOST)).size, 0);
    assert.equal(await store.releaseTransit(HOST, vpcId()), undefined, "freeing a VPC without an index frees nothing");
  });

  test(`all ${MAX_TRANSIT} in use: the next VPC is refused, not given an index out of range; one leaving lets it in`, async () => {
    const ids = Array.from({ length: MAX_TRANSIT }, vpcId);
    for (let i = 0; i < ids.length; i += 1000) await Promise.all(ids.slice(i, i + 1000).map((id) => store.transitIndex(HOST, id)));
    const late = vpcId();
    await assert.rejects(store.transitIndex(HOST, late), /transit indexes of hv-transit are in use/);
    const k = await store.releaseTransit(HOST, ids[1234]);
    assert.equal(await store.transitIndex(HOST, late), k, "the freed index goes to the waiting VPC");
    // Every VPC's index, and the next never used, in the host's transit hash of this layout (one slot: the host's).
    // Named here, not through gwKeys: a wrong layout in gwKeys must fail this.
    assert.equal(keys.transit(HOST), ON_CLUSTER ? `mvpc:{host:${HOST}}:gw:transit` : `mvpc:gw:host:${HOST}:transit`);
    assert.equal(await redis.hlen(keys.transit(HOST)), MAX_TRANSIT + 1);
    await redis.del(keys.transit(HOST), keys.transitFree(HOST));
  });
});
