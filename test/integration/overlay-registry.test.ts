// The overlay registry against a real redis-server (and, through
// overlay-registry-on-cluster.test.ts, a 3+3 Redis Cluster, where the host
// records are under "{hosts}" and a VPC's members and nominations under the
// VPC's tag: netagent/schema.ts NetagentKeys).
//
// The writer applies its readers' rule: a member entry every other host
// would skip as malformed (listen port 0, what wireguard-go reports until it
// has seen its link up) is refused, never published. Before, a 0 written
// there left VPC peers unreachable until the host's next full pass, 30 s
// later (the overlay mesh test failed about 1 run in 8).
import assert from "node:assert/strict";
import type { Redis } from "ioredis";
import { afterAll, beforeAll, test } from "vitest";
import { vpcEvents } from "../../services/common/events.js";
import { OverlayRegistry } from "../../services/netagent/overlay/registry.js";
import { naKeys } from "../../services/netagent/schema.js";
import { hostRecord } from "../lib/netagent-fixtures.js";
import { ON_CLUSTER } from "../lib/on-cluster.js";
import { connectReady, startRedis, startRedisCluster } from "../lib/redis.js";

const VPC = "vpc-0123456789ab";
let redis: Redis;
let stop: () => Promise<void>;

beforeAll(async () => {
  const srv = ON_CLUSTER ? await startRedisCluster() : await startRedis({ persistence: false });
  stop = () => srv.stop();
  redis = await connectReady({ url: srv.url });
}, 60_000);

afterAll(async () => {
  redis?.disconnect();
  await stop?.();
});

test("join: port 0 is refused and writes nothing; a real port is written once and announced", async () => {
  const reg = new OverlayRegistry(redis, "hv0");
  await assert.rejects(reg.join(VPC, 0), /listen port 0 is not an integer in 1–65535/);
  assert.deepEqual(await redis.hgetall(naKeys(redis).overlayMembers(VPC)), {});
  assert.equal(await redis.exists(vpcEvents(VPC)), 0, "no overlay.joined for a refused entry");
  assert.equal(await reg.join(VPC, 51820), true);
  assert.deepEqual(await redis.hgetall(naKeys(redis).overlayMembers(VPC)), { hv0: JSON.stringify({ port: 51820 }) });
  assert.equal(await reg.join(VPC, 51820), false, "unchanged: not written again");
  const ev = await redis.xrange(vpcEvents(VPC), "-", "+");
  assert.deepEqual(
    ev.map(([, f]) => f[1]),
    ["overlay.joined"],
  );
  await reg.leave(VPC);
});

test("peers: every member's record in one read; a bad record costs only its host, an expired one is no fault", async () => {
  const rec = (id: string, last: number) => hostRecord(id, `127.0.0.${last}`, [VPC], last);
  const regs = ["hv1", "hv2", "hv3"].map((h) => new OverlayRegistry(redis, h));
  for (const [i, r] of regs.entries()) {
    await r.publish(rec(r.hostId, i + 1), 60_000);
    await r.join(VPC, 51821 + i);
  }
  // hv2's record rewritten by a hostile host; hv4 is a member whose lease ran out.
  await redis.set(naKeys(redis).overlayHost("hv2"), JSON.stringify({ ...rec("hv2", 2), id: "hv9" }));
  await redis.hset(naKeys(redis).overlayMembers(VPC), "hv4", JSON.stringify({ port: 51824 }));
  const members = await regs[0].members(VPC);
  const { hosts, skipped } = await regs[0].peerHosts(Object.keys(members).sort(), members);
  assert.deepEqual(
    hosts.map((h) => [h.hostId, h.port, h.record.address]),
    [
      ["hv1", 51821, "127.0.0.1"],
      ["hv3", 51823, "127.0.0.3"],
    ],
  );
  assert.deepEqual(skipped, [{ hostId: "hv2", reason: 'record id "hv9" does not match its key "hv2"' }]);
  assert.deepEqual((await redis.smembers(naKeys(redis).hostIndex)).sort(), ["hv1", "hv2", "hv3"]);
  await regs[2].leaveHost();
  assert.deepEqual(
    (await regs[0].peerHosts(["hv1", "hv3"], members)).hosts.map((h) => h.hostId),
    ["hv1"],
    "a host that left is gone at once",
  );
});
