// The shared readiness answer behind grpc.health.v1: one probe however many
// ask, a ready answer reused for an interval, a not-ready one only briefly,
// so a daemon whose Redis comes up just after its listener is SERVING at
// once rather than a second later (bench:startup saw ipam wait ~1 s so).
import assert from "node:assert/strict";
import { test } from "vitest";
import { HEALTH_INTERVAL_MS, NOT_READY_REUSE_MS, SharedReadiness } from "../../services/common/health.js";

test("not ready is asked again after a tenth of a second, ready only after the interval; concurrent askers share one probe", async () => {
  let ready = false;
  let probes = 0;
  const r = new SharedReadiness(async () => {
    probes++;
    await new Promise((res) => setTimeout(res, 5));
    return ready;
  });
  assert.deepEqual(await Promise.all([r.get(), r.get(), r.get()]), [false, false, false]);
  assert.equal(probes, 1, "one probe for three askers");
  ready = true;
  assert.equal(await r.get(), false, "within the reuse time: the cached answer");
  await new Promise((res) => setTimeout(res, NOT_READY_REUSE_MS + 20));
  assert.equal(await r.get(), true, "ready as soon as the reuse time is over");
  const before = probes;
  ready = false;
  await new Promise((res) => setTimeout(res, NOT_READY_REUSE_MS + 20));
  assert.equal(await r.get(), true, "a ready answer is reused for the interval");
  assert.equal(probes, before);
  assert.ok(HEALTH_INTERVAL_MS > NOT_READY_REUSE_MS * 5);
});
