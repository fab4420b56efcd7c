// Redis behind Sentinel (issue #18), failing over for real: a primary, a
// replica and three sentinels (test/lib/redis-sentinel.ts), and a real
// `microvpcd ipam` given --redis redis-sentinel://<the sentinels>/microvpc.
// The primary is SIGKILLed after an allocation has reached the replica; the
// daemon, not restarted, must answer again once the sentinels have promoted
// the replica (UNAVAILABLE meanwhile, with a message that says to retry),
// with what it wrote before still held; and when the old primary comes back
// (empty: no persistence here) and the sentinels make it a replica, the
// daemon keeps writing to the new master. Then a switchover (SENTINEL
// FAILOVER) whose old master stays up: the daemon moves to the promoted node
// too, at once.
import assert from "node:assert/strict";
import { Code, ConnectError } from "@connectrpc/connect";
import { afterAll, beforeAll, test } from "vitest";
import { SubnetType } from "../../gen/microvpc/v1/subnet_pb.js";
import { ipamClients } from "../lib/clients.js";
import { startDaemon, type Daemon } from "../lib/daemon.js";
import { onPort, startRedisSentinel, type TestRedisSentinel } from "../lib/redis-sentinel.js";

let set: TestRedisSentinel;
let daemon: Daemon;
let c: ReturnType<typeof ipamClients>;

/** How long the daemon may take to answer again after the primary is killed. */
const RECOVERY_MS = 20_000;

beforeAll(async () => {
  // failover-timeout bounds a promotion the sentinels wait to see: on a loaded machine 2 s aborted the switchover below (-failover-abort-slave-timeout).
  set = await startRedisSentinel({ replicas: 1, downAfterMs: 1000, failoverTimeoutMs: 10_000 });
  daemon = await startDaemon("ipam", ["--redis", set.url, "--redis-timeout-ms", "500"]);
  c = ipamClients(daemon.address);
}, 60_000);

afterAll(async () => {
  await daemon?.stop();
  await set?.stop();
});

/** Every key of the subnet on one node, with its content, as one string (what that node holds of it). */
async function subnetState(port: number, subnetId: string): Promise<string> {
  return onPort(port, async (r) => {
    const keys = (await r.keys(`*${subnetId}*`)).sort();
    const parts: string[] = [];
    for (const k of keys) {
      const type = await r.type(k);
      const v = type === "hash" ? await r.hgetall(k) : type === "zset" ? await r.zrange(k, 0, -1, "WITHSCORES") : type === "string" ? await r.get(k) : type;
      parts.push(`${k}=${JSON.stringify(v)}`);
    }
    return parts.join("\n");
  });
}

/**
 * Allocate, retried every 100 ms as a client would, until the daemon answers:
 * each failure meanwhile must be UNAVAILABLE saying to retry, and the daemon
 * must answer within RECOVERY_MS of `since` (what happened then: `what`).
 */
async function allocateOnceAnswered(subnetId: string, owner: string, requestId: string, since: number, what: string) {
  const unavailable: string[] = [];
  for (;;) {
    try {
      const { allocation } = await c.ipam.allocate({ subnetId, owner, requestId }, { timeoutMs: 3000 });
      return { allocation, unavailable };
    } catch (e) {
      assert.ok(e instanceof ConnectError, `expected a ConnectError, got ${e}`);
      assert.equal(Code[e.code], Code[Code.Unavailable], e.rawMessage);
      assert.match(e.rawMessage, /state store \(Redis\) unavailable: .*retry/);
      unavailable.push(e.rawMessage);
      assert.ok(
        Date.now() - since < RECOVERY_MS,
        `the daemon still fails ${RECOVERY_MS} ms after ${what}: ${e.rawMessage}; its log:\n${daemon.output().split("\n").slice(-30).join("\n")}`,
      );
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

test("the daemon follows a Sentinel failover without a restart: what it wrote is kept, and it writes to the new master", async () => {
  const oldPrimary = await set.masterPort();
  assert.equal(oldPrimary, set.nodes[0].port);
  const [replica] = set.nodes.slice(1).map((n) => n.port);

  await c.vpc.createVpc({ name: "sent", cidr: "10.50.0.0/16" });
  const sn = (await c.subnet.createSubnet({ vpc: "sent", name: "s1", cidr: "10.50.1.0/24", type: SubnetType.PRIVATE })).subnet!;
  const a = (await c.ipam.allocate({ subnetId: sn.id, owner: "vm-a", requestId: "r-a" })).allocation!;
  // The write is on the replica before the primary dies: what a failover keeps.
  assert.ok(((await onPort(oldPrimary, (r) => r.call("WAIT", "1", "2000"))) as number) >= 1, "the replica acknowledged the writes");

  const killedAt = Date.now();
  await set.kill(oldPrimary);
  const newMaster = await set.waitNewMaster(oldPrimary, 15_000);
  const failoverMs = Date.now() - killedAt;
  assert.equal(newMaster, replica);

  // Allocate until it answers, as a client would retry: UNAVAILABLE meanwhile, saying to retry.
  const { allocation: b, unavailable } = await allocateOnceAnswered(sn.id, "vm-b", "r-b", killedAt, "the kill");
  const recoveredMs = Date.now() - killedAt;
  console.log(
    `sentinel failover: new master after ${failoverMs} ms, the daemon answering after ${recoveredMs} ms (${unavailable.length} UNAVAILABLE meanwhile${unavailable.length ? `, first: ${unavailable[0]}` : ""})`,
  );
  assert.notEqual(b!.address, a.address);

  // What was allocated before the failover is still held: the same request answers the same address.
  const again = await c.ipam.allocate({ subnetId: sn.id, owner: "vm-a", requestId: "r-a" });
  assert.equal(again.allocation!.address, a.address);
  assert.equal(again.created, false);

  // The new master holds both: the daemon wrote there, not somewhere else.
  assert.equal((await set.role(newMaster)).role, "master");
  const state = await subnetState(newMaster, sn.id);
  for (const owner of ["vm-a", "vm-b"]) assert.ok(state.includes(owner), `${owner} on the new master:\n${state}`);

  // The old primary comes back (empty, as it kept nothing) as a master; the sentinels make it a replica of the new one.
  await set.restart(oldPrimary);
  const demoted = Date.now();
  for (;;) {
    const r = await set.role(oldPrimary).catch(() => undefined);
    if (r?.role === "slave" && r.masterPort === newMaster) break;
    assert.ok(Date.now() - demoted < 10_000, `the sentinels did not make ${oldPrimary} a replica of ${newMaster} (role ${JSON.stringify(r)})`);
    await new Promise((res) => setTimeout(res, 100));
  }
  console.log(`sentinel failover: the restarted old primary a replica after ${Date.now() - demoted} ms`);

  // The daemon kept to the new master: no error (READONLY or other) reaches the client, and the writes are there.
  for (const i of [1, 2, 3]) {
    const x = await c.ipam.allocate({ subnetId: sn.id, owner: `vm-c${i}`, requestId: `r-c${i}` }, { timeoutMs: 3000 });
    assert.equal(x.created, true);
  }
  const after = await subnetState(newMaster, sn.id);
  for (const i of [1, 2, 3]) assert.ok(after.includes(`vm-c${i}`), `vm-c${i} on the new master`);
  assert.doesNotMatch(daemon.output(), /READONLY/);

  // A failover whose old master stays up (SENTINEL FAILOVER, an operator's switchover): the sentinels
  // make it a replica only some time after +switch-master (4 hello periods: 2 s here, 8 s by default),
  // and until then it takes writes that its resync will throw away. The daemon must leave it at once
  // (failoverDetector: +switch-master) and write to the promoted node; every write checked below is there.
  // Replication is asynchronous: a switchover keeps only what the replica has. The restarted node may
  // still be loading its first sync when the sentinels take it for a good replica, so wait for it to
  // acknowledge the writes above, as for the kill.
  assert.ok(((await onPort(newMaster, (r) => r.call("WAIT", "1", "5000"))) as number) >= 1, "the restarted node acknowledged the writes");
  const switchedAt = Date.now();
  for (;;) {
    const r = await onPort(set.sentinels[0].port, (x) => x.call("SENTINEL", "FAILOVER", set.masterName)).catch((e: Error) => e);
    if (!(r instanceof Error)) break;
    // NOGOODSLAVE until the sentinels have seen the restarted node in sync; INPROG not here.
    assert.ok(Date.now() - switchedAt < 5_000, `SENTINEL FAILOVER refused: ${r.message}`);
    await new Promise((res) => setTimeout(res, 100));
  }
  assert.equal(await set.waitNewMaster(newMaster, 10_000), oldPrimary);
  const switchMs = Date.now() - switchedAt;
  const { unavailable: during } = await allocateOnceAnswered(sn.id, "vm-d", "r-d", switchedAt, "SENTINEL FAILOVER");
  console.log(
    `sentinel switchover: new master after ${switchMs} ms, the daemon writing there after ${Date.now() - switchedAt} ms (${during.length} UNAVAILABLE meanwhile${during.length ? `, first: ${during[0]}` : ""})`,
  );
  for (const i of [1, 2, 3]) {
    const x = await c.ipam.allocate({ subnetId: sn.id, owner: `vm-e${i}`, requestId: `r-e${i}` }, { timeoutMs: 3000 });
    assert.equal(x.created, true);
  }
  const switched = await subnetState(oldPrimary, sn.id);
  for (const owner of ["vm-a", "vm-b", "vm-c1", "vm-d", "vm-e1", "vm-e2", "vm-e3"]) assert.ok(switched.includes(owner), `${owner} on the promoted node`);
});
