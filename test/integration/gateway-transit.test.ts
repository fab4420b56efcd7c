// Transit indexes (one /30 per VPC per hypervisor, 16 000 per host) are
// reused: a VPC that leaves frees its index for the next one, so a host that
// sees VPCs come and go never runs out (it used to, and then the metadata
// server answered 404 to every new VPC). Against a real redis-server.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, test } from "vitest";
import { MAX_TRANSIT } from "../../services/gateway/schema.js";
import { GatewayStore } from "../../services/gateway/store.js";
import { startRedis, type TestRedis } from "../lib/redis.js";

let server: TestRedis;
let redis: Redis;
let store: GatewayStore;
const HOST = "hv-transit";
const vpcId = () => `vpc-${randomBytes(6).toString("hex")}`;

beforeAll(async () => {
  server = await startRedis({ appendfsync: "no" });
  redis = new Redis(server.url);
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
    await redis.del(`mvpc:gw:host:${HOST}:transit`, `mvpc:gw:host:${HOST}:transitfree`);
  });
});
