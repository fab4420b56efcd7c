// The overlay registry's writer applies its readers' rule: a member entry
// every other host would skip as malformed (listen port 0, what wireguard-go
// reports until it has seen its link up) is refused, never published.
// Before, a 0 written there left VPC peers unreachable until the host's next
// full pass, 30 s later (the overlay mesh test failed about 1 run in 8).
import assert from "node:assert/strict";
import { test } from "vitest";
import { OverlayRegistry } from "../../services/netagent/overlay/registry.js";
import { overlayKeys } from "../../services/netagent/store.js";
import { scratchRedis } from "../lib/scratch-redis.js";

const redis = scratchRedis();
const VPC = "vpc-0123456789ab";

test("join: port 0 is refused and writes nothing; a real port is written once and announced", async () => {
  const reg = new OverlayRegistry(redis.r, "hv0");
  await assert.rejects(reg.join(VPC, 0), /listen port 0 is not an integer in 1–65535/);
  assert.deepEqual(await redis.r.hgetall(overlayKeys.members(VPC)), {});
  assert.equal(await redis.r.exists(`mvpc:{${VPC}}:events`), 0, "no overlay.joined for a refused entry");
  assert.equal(await reg.join(VPC, 51820), true);
  assert.deepEqual(await redis.r.hgetall(overlayKeys.members(VPC)), { hv0: JSON.stringify({ port: 51820 }) });
  assert.equal(await reg.join(VPC, 51820), false, "unchanged: not written again");
  const ev = await redis.r.xrange(`mvpc:{${VPC}}:events`, "-", "+");
  assert.deepEqual(
    ev.map(([, f]) => f[1]),
    ["overlay.joined"],
  );
});
