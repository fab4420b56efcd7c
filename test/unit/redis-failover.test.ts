// Following a Sentinel failover (services/common/redis-failover.ts): which
// announcements count, and what a client does with one in each state. The
// real thing, against real sentinels, is test/integration/redis-sentinel.test.ts.
import assert from "node:assert/strict";
import { test } from "vitest";
import { parseSwitchMaster, switchAction } from "../../services/common/redis-failover.js";

test("+switch-master names the master and where it is now; anything else is no announcement", () => {
  assert.deepEqual(parseSwitchMaster("microvpc 10.0.0.1 6379 10.0.0.2 6380"), { name: "microvpc", to: "10.0.0.2:6380" });
  assert.deepEqual(parseSwitchMaster("other 127.0.0.1 7000 127.0.0.1 7001"), { name: "other", to: "127.0.0.1:7001" });
  for (const m of ["", "microvpc", "microvpc 10.0.0.1 6379 10.0.0.2", "microvpc 10.0.0.1 6379 10.0.0.2 port", "microvpc 10.0.0.1 6379 10.0.0.2 6380 extra"])
    assert.equal(parseSwitchMaster(m), undefined, JSON.stringify(m));
});

test("a connected client leaves a master that is no longer the announced one, and stays on the announced one", () => {
  for (const status of ["ready", "connect"]) {
    assert.equal(switchAction(status, "10.0.0.1:6379", "10.0.0.2:6380"), "reconnect", status);
    assert.equal(switchAction(status, "10.0.0.2:6380", "10.0.0.2:6380"), "stay", status);
    // Same host, another port: another node.
    assert.equal(switchAction(status, "10.0.0.2:6379", "10.0.0.2:6380"), "reconnect", status);
  }
});

test("a client between connections is never disconnected (ioredis would end it for good): where it lands is checked instead", () => {
  for (const status of ["connecting", "reconnecting", "close"]) {
    assert.equal(switchAction(status, undefined, "10.0.0.2:6380"), "recheck", status);
    assert.equal(switchAction(status, "10.0.0.1:6379", "10.0.0.2:6380"), "recheck", status);
  }
  // Ended (shut down) or not started: nothing to move.
  for (const status of ["end", "wait"]) assert.equal(switchAction(status, undefined, "10.0.0.2:6380"), "stay", status);
});
