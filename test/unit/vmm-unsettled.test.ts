// The set of VMs to recover (VmStore's K.unsettled, `mvpc:{host:H}:vms:unsettled`):
// kept by the scripts that write a VM's record, so that a recovery pass after
// the first reads the records of the VMs that need it and no other; the
// first pass of a process reads them all and repairs the set (an earlier
// release's records have no entry). A real redis-server, the daemons'
// in-memory fakes (test/lib/vmm-fakes.ts).
import assert from "node:assert/strict";
import { createClient, createRouterTransport, type Client } from "@connectrpc/connect";
import type { Redis } from "ioredis";
import { pino } from "pino";
import { describe, test } from "vitest";
import { mapDomainErrors } from "../../services/common/errors.js";
import { invalidRecords } from "../../services/common/invalid-records.js";
import { aclRules, hostUser } from "../../services/common/redis-acl.js";
import { storedVmText } from "../../services/vmm/schema.js";
import { Vmm } from "../../services/vmm/service.js";
import { K, VmStore, type VmRec } from "../../services/vmm/store.js";
import { VmKind, VmService } from "../../gen/microvpc/v1/vm_pb.js";
import { scratchRedis } from "../lib/scratch-redis.js";
import { vmRecord, VmmFakes } from "../lib/vmm-fakes.js";

const HOST = "hv1";
const db = scratchRedis();

let seq = 0;
/** A record as CreateVm claims it (op "create"), with a fresh id; `over` changes fields. */
const newVm = (name: string, over: Partial<VmRec> = {}) => vmRecord(HOST, `vm-${(0x5000 + seq++).toString(16).padStart(12, "0")}`, name, over);

const isMember = async (id: string) => (await db.r.sismember(K.unsettled(HOST), id)) === 1;

/** A record key of this host's VMs (not its lease, not the id sets). */
const RECORD_KEY = /^mvpc:\{host:hv1\}:vm:vm-[0-9a-f]{12}$/;

interface Rig {
  fakes: VmmFakes;
  store: VmStore;
  vmm: Vmm;
  api: Client<typeof VmService>;
  /** The record keys the store read from the client (GET, MGET), in order. */
  reads: string[];
  /** Every key the client's reads named. */
  keysRead: string[];
  /** Calls of store.ofHost (the full scan). */
  scans: { n: number };
  client: Redis;
}

/** A vmm over its own client of the scratch Redis, whose record reads and full scans are counted. */
function rig(): Rig {
  const client = db.r.duplicate();
  const reads: string[] = [];
  const keysRead: string[] = [];
  for (const m of ["get", "mget", "mgetBuffer", "getBuffer"] as const) {
    const orig = (client[m] as (...a: unknown[]) => Promise<unknown>).bind(client);
    Object.assign(client, {
      [m]: (...a: unknown[]) => {
        const keys = a.flat().filter((k): k is string => typeof k === "string");
        keysRead.push(...keys);
        reads.push(...keys.filter((k) => RECORD_KEY.test(k)));
        return orig(...a);
      },
    });
  }
  const store = new VmStore(client, HOST);
  const scans = { n: 0 };
  const ofHost = store.ofHost.bind(store);
  store.ofHost = async (h) => {
    scans.n++;
    return ofHost(h);
  };
  const fakes = new VmmFakes(HOST);
  const vmm = new Vmm(store, fakes.clients(), { hostId: HOST, booters: { qemu: fakes.booter() }, netns: fakes.netns() }, pino({ level: "silent" }));
  const api = createClient(
    VmService,
    createRouterTransport((router) => router.service(VmService, vmm.impl), { router: { interceptors: [mapDomainErrors] } }),
  );
  return { fakes, store, vmm, api, reads, keysRead, scans, client };
}

describe("the unsettled set follows the record, in the record's own script", () => {
  test("claim → member; put of a running record → not; put with state failed → member; a delete begun → member; remove → not", async () => {
    const store = new VmStore(db.r, HOST);
    const v = newVm("a");
    await store.claim(v, "t");
    assert.ok(await isMember(v.id), "a claim is op create: to recover if nothing else finishes it");
    Object.assign(v, { op: "", state: "running" });
    await store.put(v, "t");
    assert.equal(await isMember(v.id), false, "a running VM is settled");
    v.state = "failed";
    await store.put(v);
    assert.ok(await isMember(v.id), "a FAILED one needs recovery");
    v.state = "running";
    await store.put(v);
    assert.equal(await isMember(v.id), false);
    Object.assign(v, { op: "delete", state: "deleting" });
    await store.put(v);
    assert.ok(await isMember(v.id), "a delete in flight");
    await store.remove(v);
    assert.equal(await isMember(v.id), false, "a removed VM leaves the set");
    assert.equal(await db.r.exists(K.unsettled(HOST)), 0, "which is empty, so gone");
  });

  test("a claim that loses the name takes its entry back with its record", async () => {
    const store = new VmStore(db.r, HOST);
    const first = newVm("same");
    await store.claim(first, "t1");
    const second = newVm("same");
    await store.claim(second, "t2");
    assert.equal(await store.getOwn(second.id), null, "the loser's record is gone");
    assert.deepEqual(await db.r.smembers(K.unsettled(HOST)), [first.id], "and its entry");
  });

  test("the host's Redis user (microvpcd redis-acl) may write the set, another host's may not", async () => {
    const pw = "unsettled-test";
    for (const h of [HOST, "hv2"]) await db.r.call("ACL", "SETUSER", hostUser(h), ...aclRules({ hostId: h }), `>${pw}`);
    const asHost = db.r.duplicate({ username: hostUser(HOST), password: pw });
    const asOther = db.r.duplicate({ username: hostUser("hv2"), password: pw });
    try {
      const store = new VmStore(asHost, HOST);
      const v = newVm("acl");
      await store.claim(v, "t");
      assert.ok(await isMember(v.id));
      Object.assign(v, { op: "", state: "running" });
      await store.put(v, "t");
      assert.equal(await isMember(v.id), false);
      v.state = "failed";
      await store.put(v);
      assert.ok(await isMember(v.id));
      await store.remove(v);
      assert.equal(await isMember(v.id), false);
      await assert.rejects(asOther.sadd(K.unsettled(HOST), "vm-000000000001"), /NOPERM/, "another host cannot make this host recover a VM");
      await assert.rejects(asOther.srem(K.unsettled(HOST), "vm-000000000001"), /NOPERM/, "nor hide one from its recovery");
    } finally {
      asHost.disconnect();
      asOther.disconnect();
    }
  });
});

describe("recovery passes", () => {
  test("the first pass reads every record; a later one only the unsettled set and its members, and still recovers a VM left half-done since", async () => {
    const x = rig();
    try {
      const running: string[] = [];
      for (let i = 0; i < 6; i++) running.push((await x.api.createVm({ name: `r${i}`, vpc: "app", subnet: "web", kind: VmKind.NETNS })).vm!.id);
      assert.equal(await db.r.exists(K.unsettled(HOST)), 0, "running VMs are not in the set");
      x.reads.length = 0;

      await x.vmm.recover();
      assert.equal(x.scans.n, 1, "the first pass of a process scans the host's records");
      assert.deepEqual([...new Set(x.reads)].sort(), running.map((id) => K.vm(HOST, id)).sort(), "all of them");

      x.reads.length = 0;
      await x.vmm.recover();
      assert.equal(x.scans.n, 1, "the second does not");
      assert.deepEqual(x.reads, [], "and reads no record: nothing needs recovery");

      // A create left half-done after the first pass (its vmm's request cut
      // short, its lease gone): written through the store, op "create".
      const half = newVm("half");
      await x.store.claim(half, "gone");
      await x.store.releaseLease(half.id, "gone");
      assert.ok(await isMember(half.id));
      x.reads.length = 0;
      await x.vmm.recover();
      assert.equal(x.scans.n, 1, "still no scan");
      assert.equal(await x.store.getOwn(half.id), null, "the half-done VM was rolled back and removed");
      assert.equal(await isMember(half.id), false, "and left the set");
      assert.ok(x.reads.length > 0, "its record was read");
      assert.deepEqual([...new Set(x.reads)], [K.vm(HOST, half.id)], "and no other");
      assert.equal((await x.api.listVms({})).vms.length, running.length, "the running VMs untouched");
    } finally {
      x.client.disconnect();
    }
  });

  test("a pass that fails (Redis unreachable, say) leaves the next one a full scan", async () => {
    const x = rig();
    try {
      // The first scan fails (counted, as every call: rig's wrapper is inside this one).
      const ofHost = x.store.ofHost.bind(x.store);
      let fail = 1;
      x.store.ofHost = async (h) => {
        if (fail-- > 0) {
          x.scans.n++;
          throw new Error("connect ECONNREFUSED");
        }
        return ofHost(h);
      };
      await assert.rejects(x.vmm.recover(), /ECONNREFUSED/);
      assert.equal(x.scans.n, 1);
      await x.vmm.recover();
      assert.equal(x.scans.n, 2, "the pass after the failed one scans");
      await x.vmm.recover();
      assert.equal(x.scans.n, 2, "the one after a completed pass does not");
    } finally {
      x.client.disconnect();
    }
  });

  test("records an earlier release wrote (no entry in the set) are found by the first pass, which repairs the set", async () => {
    const x = rig();
    try {
      // As an earlier release left them: record and id, no entry in the set.
      const deleting = newVm("deleting", { op: "delete", state: "deleting" });
      const creating = newVm("creating");
      const busy = newVm("busy", { op: "delete", state: "deleting" });
      for (const v of [deleting, creating, busy]) {
        await db.r.set(K.vm(HOST, v.id), storedVmText(v));
        await db.r.sadd(K.ids(HOST), v.id);
      }
      // busy: an operation of this process holds its lease, so no pass touches it yet; only the set can find it later.
      const token = `${HOST}/${process.pid}/busy`;
      assert.ok(await x.store.acquireLease(busy.id, token));
      // And entries the set should not have: a settled VM's, a VM's that is gone.
      const settled = newVm("settled", { op: "", state: "running" });
      await db.r.set(K.vm(HOST, settled.id), storedVmText(settled));
      await db.r.sadd(K.ids(HOST), settled.id);
      await db.r.sadd(K.unsettled(HOST), settled.id, "vm-00000000dead");

      await x.vmm.recover();
      assert.equal(x.scans.n, 1);
      for (const v of [deleting, creating]) {
        assert.equal(await x.store.getOwn(v.id), null, `${v.name}: recovered by the first pass`);
        assert.equal(await isMember(v.id), false);
      }
      assert.deepEqual(await db.r.smembers(K.unsettled(HOST)), [busy.id], "the set repaired: the skipped VM added, the settled and gone ones dropped");

      // Its operation ends without finishing it (the lease goes): a later pass, without a scan, recovers it.
      await x.store.releaseLease(busy.id, token);
      await x.vmm.recover();
      assert.equal(x.scans.n, 1, "no scan");
      assert.equal(await x.store.getOwn(busy.id), null, "the delete finished");
      assert.equal(await db.r.exists(K.unsettled(HOST)), 0);
      assert.ok(await x.store.getOwn(settled.id), "the settled VM untouched");
    } finally {
      x.client.disconnect();
    }
  });

  test("a member read as settled but rewritten before it is dropped (a DeleteVm begun meanwhile) stays in the set", async () => {
    const x = rig();
    try {
      await x.vmm.recover();
      const v = newVm("racing", { op: "", state: "running" });
      await x.store.claim(v, "t");
      await x.store.put(v, "t");
      // A stale entry (as the repair of a first pass may leave one) of a running VM.
      await db.r.sadd(K.unsettled(HOST), v.id);
      // Between the pass's read of the record and its drop, the VM's delete begins (a put: op delete).
      const read = x.client.mgetBuffer.bind(x.client) as (...a: unknown[]) => Promise<unknown>;
      let once = true;
      Object.assign(x.client, {
        mgetBuffer: async (...a: unknown[]) => {
          const r = await read(...a);
          if (once) {
            once = false;
            await new VmStore(db.r, HOST).put({ ...v, op: "delete", state: "deleting" });
          }
          return r;
        },
      });
      // The lease is this process's: the pass reads the set and leaves the VM alone.
      assert.ok(await x.store.acquireLease(v.id, `${HOST}/${process.pid}/delete`));
      await x.vmm.recover();
      assert.equal(once, false, "the pass read it");
      assert.ok(await isMember(v.id), "the delete in flight is still in the set, for recovery should it stop half-way");
      assert.equal((await x.store.getOwn(v.id))?.op, "delete");
    } finally {
      x.client.disconnect();
    }
  });

  test("a member that is not a VM id is reported and skipped, never made into a key", async () => {
    const x = rig();
    try {
      const garbage = "x; rm -rf";
      await x.vmm.recover();
      await db.r.sadd(K.unsettled(HOST), garbage, "vm-0000000000zz");
      const half = newVm("beside");
      await x.store.claim(half, "gone");
      await x.store.releaseLease(half.id, "gone");
      x.keysRead.length = 0;
      await x.vmm.recover();
      assert.equal(x.scans.n, 1, "a pass of the set");
      assert.equal(await x.store.getOwn(half.id), null, "the valid member beside it is recovered");
      assert.ok(!x.keysRead.some((k) => k.includes("rm -rf") || k.includes("vm-0000000000zz")), `no key made of them: ${x.keysRead.join(" ")}`);
      const reported = invalidRecords("vmm").filter((r) => r.key === K.unsettled(HOST));
      for (const m of [garbage, "vm-0000000000zz"])
        assert.ok(
          reported.some((r) => r.reason.includes(JSON.stringify(m))),
          `${m} reported: ${JSON.stringify(reported)}`,
        );
    } finally {
      x.client.disconnect();
    }
  });
});
