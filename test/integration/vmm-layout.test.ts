// The vmm's keys under its host's hash tag and the name index under its VPC's
// (issue 18, docs/redis-schema.md "Redis Cluster"), on a real Redis and a
// real 3+3 cluster:
// - on a single Redis, a host's VMs move once from the previous release's
//   names (written here by that release's own claim script,
//   test/lib/vmm-previous-scripts.ts), lease time, user-data and name entry
//   with them; a vmm of that release still running on another host can
//   neither take the name of a VM it can no longer see (its claim fails
//   before it writes) nor hide its own VMs from this release's reads;
// - on a cluster, claims of the same names from two hosts at once leave
//   exactly one holder each and nothing of the loser, each script in one slot.
import assert from "node:assert/strict";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, test } from "vitest";
import { Code, createClient, createRouterTransport } from "@connectrpc/connect";
import { pino } from "pino";
import { mapDomainErrors } from "../../services/common/errors.js";
import { Vmm } from "../../services/vmm/service.js";
import { VmService } from "../../gen/microvpc/v1/vm_pb.js";
import { rejectsWith } from "../lib/clients.js";
import { FAKE_VPC, vmRecord, VmmFakes } from "../lib/vmm-fakes.js";
import { scratchRedis } from "../lib/scratch-redis.js";
import { storedVmText } from "../../services/vmm/schema.js";
import { K, nameEntry, VmStore, type VmRec } from "../../services/vmm/store.js";
import { previousClaim, previousKeys as P } from "../lib/vmm-previous-scripts.js";
import { connectReady, startRedisCluster, type TestRedisCluster } from "../lib/redis.js";

const VPC = FAKE_VPC.id;
let seq = 0;

/** A VM record as CreateVm claims it, with a fresh id. */
function vmRec(hostId: string, name: string, userData = ""): VmRec {
  return vmRecord(hostId, `vm-${(0x1000 + seq++).toString(16).padStart(12, "0")}`, name, { userData });
}

/** Kinds of the fleet stream's VM events, oldest first. */
async function vmEvents(r: Redis): Promise<string[]> {
  return (await r.xrange(K.events, "-", "+")).map(([, f]) => `${f[1]} ${f[3]}`);
}

describe("on a single Redis: the move from the previous layout", () => {
  const db = scratchRedis();

  test("a host's VMs move under its hash tag with their lease time, user-data and name entry; a tombstone stays; once", async () => {
    const a = vmRec("hva", "web", "I2Nsb3VkLWNvbmZpZwo=");
    const b = vmRec("hva", "db");
    const other = vmRec("hvb", "cache");
    for (const v of [a, b, other]) assert.equal(await previousClaim(db.r, v, `${v.hostId}/1/dead`), nameEntry(v), "the previous release claims");
    const store = new VmStore(db.r, "hva");
    assert.equal(await store.migrate(), 2, "hva's two VMs, not hvb's");
    for (const v of [a, b]) {
      assert.equal(await db.r.get(K.vm("hva", v.id)), storedVmText(v), "the record, as it was");
      assert.equal(await db.r.get(K.lease("hva", v.id)), "hva/1/dead", "the lease");
      const ttl = await db.r.pttl(K.lease("hva", v.id));
      assert.ok(ttl > 0 && ttl <= 15_000, `with its time left (${ttl} ms)`);
      assert.equal(await db.r.hget(K.byName(VPC), v.name), nameEntry(v), "the name entry, in the VPC's index");
      assert.equal(await db.r.hget(P.byName(VPC), v.name), nameEntry(v), "and still in the earlier one, which earlier vmms read");
      assert.equal(await db.r.type(P.vm("hva", v.id)), "hash", "a tombstone at the earlier record name");
      assert.equal(await db.r.exists(P.lease("hva", v.id), P.userData("hva", v.id)), 0);
    }
    assert.equal(await db.r.get(K.userData("hva", a.id)), a.userData, "user-data, host-private");
    assert.deepEqual((await db.r.smembers(K.ids("hva"))).sort(), [a.id, b.id].sort());
    assert.deepEqual((await db.r.smembers(K.unsettled("hva"))).sort(), [a.id, b.id].sort(), "creates cut short (op create): in the set recovery reads");
    assert.equal(await db.r.exists(P.host("hva")), 0, "the earlier id set is empty");
    assert.equal(await db.r.get(P.vm("hvb", other.id)), storedVmText(other), "hvb's VM is hvb's vmm to move");
    assert.equal(await store.migrate(), 0, "once");
    assert.equal((await store.getOwn(a.id))?.userData, a.userData);
    assert.equal((await store.byName(VPC, "web"))?.id, a.id);
    // The moved lease still holds: another token does not take it; its holder's prefix does (recovery's rule).
    assert.equal(await store.acquireLease(a.id, "hva/2/x", "hva/2/"), true, "a dead run's lease is taken over by recovery");
    assert.equal(await store.acquireLease(b.id, "hva/2/x"), false, "a live holder's is not");
  });

  test("an earlier vmm on another host cannot take the name of a VM it can no longer see: its claim fails before it writes", async () => {
    const old = vmRec("hva", "moved");
    await previousClaim(db.r, old, "t");
    const a = new VmStore(db.r, "hva");
    await a.migrate();
    const fresh = vmRec("hva", "fresh");
    assert.equal(await a.claim(fresh, "t"), nameEntry(fresh));
    for (const name of ["moved", "fresh"]) {
      const rival = vmRec("hvb", name);
      await assert.rejects(previousClaim(db.r, rival, "t"), /WRONGTYPE/, `the earlier release's claim of ${name}`);
      assert.equal(await db.r.exists(P.vm("hvb", rival.id), P.lease("hvb", rival.id), P.host("hvb")), 0, "nothing of the rival written");
      assert.equal(await db.r.hget(P.byName(VPC), name), nameEntry(name === "moved" ? old : fresh), "the entry unchanged");
    }
    // A name no VM of this release holds: the earlier vmm still creates.
    const elsewhere = vmRec("hvb", "elsewhere");
    assert.equal(await previousClaim(db.r, elsewhere, "t"), nameEntry(elsewhere));
  });

  test("a vmm serves no CreateVm or DeleteVm until its host's VMs have moved: UNAVAILABLE while the move fails, then the moved VM's name is held", async () => {
    const old = { ...vmRec("hv1", "old"), state: "running" as const, op: "" as const };
    await previousClaim(db.r, old, "");
    const fakes = new VmmFakes("hv1");
    const store = new VmStore(db.r, "hv1");
    const migrate = store.migrate.bind(store);
    let failures = 1;
    store.migrate = async () => {
      if (failures-- > 0) throw new Error("NOPERM this user has no permissions to access one of the keys");
      return migrate();
    };
    const vmm = new Vmm(store, fakes.clients(), { hostId: "hv1", booters: { qemu: fakes.booter() }, netns: fakes.netns() }, pino({ level: "silent" }));
    const api = createClient(
      VmService,
      createRouterTransport((router) => router.service(VmService, vmm.impl), { router: { interceptors: [mapDomainErrors] } }),
    );
    const e = await rejectsWith(api.createVm({ name: "old", vpc: "app", subnet: "web" }), Code.Unavailable);
    assert.match(e.rawMessage, /not yet moved its host's VMs.*NOPERM.*retry/);
    assert.equal(await db.r.hget(K.byName(VPC), "old"), null, "nothing claimed meanwhile");
    assert.equal(fakes.calls.length, 0, "no step ran");
    // The next call moves them first; the name is the moved VM's.
    const again = await api.createVm({ name: "old", vpc: "app", subnet: "web" });
    assert.deepEqual([again.created, again.vm?.id], [false, old.id], "the same request gets the running VM back, not a second one");
    assert.equal(await db.r.get(K.vm("hv1", old.id)), storedVmText(old), "moved");
    assert.equal(await db.r.sismember(K.unsettled("hv1"), old.id), 0, "running: not in the set recovery reads");
    assert.equal((await api.deleteVm({ ref: "old", vpc: "app" })).deleted, true, "and DeleteVm finds it");
  });

  test("a shared name index another host damaged does not stop a host's move", async () => {
    const v = vmRec("hva", "dmg");
    await previousClaim(db.r, v, "t");
    await db.r.del(P.byName(VPC));
    await db.r.set(P.byName(VPC), "not a hash");
    assert.equal(await new VmStore(db.r, "hva").migrate(), 1);
    assert.equal(await db.r.get(K.vm("hva", v.id)), storedVmText(v));
  });

  test("this release reads what an earlier vmm on another host holds, and does not take its names", async () => {
    const theirs = vmRec("hvb", "theirs");
    await previousClaim(db.r, theirs, "t");
    const a = new VmStore(db.r, "hva");
    await a.migrate();
    assert.equal((await a.get(theirs.id))?.name, "theirs", "GetVm of hvb's VM");
    assert.deepEqual(
      (await a.ofHost("hvb")).map((v) => v.id),
      [theirs.id],
      "ListVms of hvb",
    );
    assert.equal((await a.byName(VPC, "theirs"))?.id, theirs.id, "by name, from the earlier index");
    const mine = vmRec("hva", "theirs");
    assert.equal(await a.claim(mine, "t"), nameEntry(theirs), "the name is taken");
    assert.equal(await a.getOwn(mine.id), null, "the losing claim took its record back");
    assert.equal(await db.r.exists(K.lease("hva", mine.id), P.vm("hva", mine.id)), 0, "and its lease and tombstone");
    assert.equal(await db.r.sismember(K.ids("hva"), mine.id), 0);
    assert.deepEqual(await vmEvents(db.r), ["vm.created " + theirs.id], "no event for a claim that lost");
    // hvb's earlier vmm deletes it (its remove: record, id, entry); the name is free.
    await db.r.del(P.vm("hvb", theirs.id));
    await db.r.srem(P.host("hvb"), theirs.id);
    const again = vmRec("hva", "theirs");
    assert.equal(await a.claim(again, "t"), nameEntry(again), "a stale entry of the earlier index is replaced");
    assert.deepEqual(
      [await db.r.hget(K.byName(VPC), "theirs"), await db.r.hget(P.byName(VPC), "theirs")],
      [nameEntry(again), nameEntry(again)],
      "in both indexes",
    );
  });
});

describe("on a Redis Cluster (3 primaries, 3 replicas)", () => {
  let cluster: TestRedisCluster;
  let ca: Redis;
  let cb: Redis;
  let A: VmStore;
  let B: VmStore;

  beforeAll(async () => {
    cluster = await startRedisCluster();
    [ca, cb] = await Promise.all([connectReady({ url: cluster.url, commandTimeoutMs: 2000 }), connectReady({ url: cluster.url, commandTimeoutMs: 2000 })]);
    A = new VmStore(ca, "hva");
    B = new VmStore(cb, "hvb");
    assert.equal(await A.migrate(), 0, "nothing to move on a cluster");
    await B.migrate();
  }, 60_000);
  afterAll(async () => {
    ca?.disconnect();
    cb?.disconnect();
    await cluster?.stop();
  });

  test("a host's VM keys share its slot (its change stream's); the name index is in the VPC's", async () => {
    const slot = (key: string) => ca.cluster("KEYSLOT", key) as Promise<number>;
    const host = await slot("mvpc:{host:hva}:events");
    for (const key of [
      K.ids("hva"),
      K.unsettled("hva"),
      K.vm("hva", "vm-000000000001"),
      K.lease("hva", "vm-000000000001"),
      K.userData("hva", "vm-000000000001"),
    ]) {
      assert.equal(await slot(key), host, key);
    }
    assert.equal(await slot(K.byName(VPC)), await slot(`mvpc:{${VPC}}:events`));
    assert.notEqual(await slot(K.vm("hvb", "vm-000000000001")), host, "another host's are elsewhere (here)");
  });

  test("two hosts claim the same 12 names at once: one holder each, the loser leaves nothing; a delete frees the name", async () => {
    const before = (await vmEvents(ca)).length;
    const winners: VmRec[] = [];
    for (let i = 0; i < 12; i++) {
      const va = vmRec("hva", `race${i}`, "dXNlcg==");
      const vb = vmRec("hvb", `race${i}`);
      const [ea, eb] = await Promise.all([A.claim(va, "ta"), B.claim(vb, "tb")]);
      assert.equal(ea, eb, `both see one holder of race${i}`);
      const [won, lost, loser] = ea === nameEntry(va) ? [va, vb, B] : [vb, va, A];
      assert.equal(ea, nameEntry(won));
      winners.push(won);
      assert.equal(await loser.getOwn(lost.id), null, "the loser's record is gone");
      assert.equal(await ca.exists(K.lease(lost.hostId, lost.id), K.userData(lost.hostId, lost.id)), 0, "its lease and user-data too");
      assert.equal(await ca.sismember(K.ids(lost.hostId), lost.id), 0, "and its id");
      for (const s of [A, B]) assert.equal((await s.byName(VPC, `race${i}`))?.id, won.id, "both read the winner by name");
    }
    const created = (await vmEvents(ca)).slice(before);
    assert.deepEqual(created.sort(), winners.map((w) => `vm.created ${w.id}`).sort(), "one vm.created per winner, none for a loser");
    for (const w of winners) await (w.hostId === "hva" ? A : B).remove(w, w.hostId === "hva" ? "ta" : "tb");
    assert.equal(await ca.hlen(K.byName(VPC)), 0, "every name is free");
    assert.equal((await vmEvents(ca)).filter((e) => e.startsWith("vm.deleted")).length, 12);
    const again = vmRec("hvb", "race0");
    assert.equal(await B.claim(again, "tb"), nameEntry(again), "and taken again");
    await B.remove(again, "tb");
  });

  test("an entry whose record is gone (a vmm killed between a removal's two steps) is taken by the next claim; one that agrees is not", async () => {
    const a = vmRec("hva", "half");
    assert.equal(await A.claim(a, "ta"), nameEntry(a));
    const b = vmRec("hvb", "half");
    assert.equal(await B.claim(b, "tb"), nameEntry(a), "held while hva's record agrees");
    await ca.del(K.vm("hva", a.id));
    assert.equal(await B.claim(b, "tb"), nameEntry(b), "taken once the record is gone");
    assert.equal((await A.byName(VPC, "half"))?.hostId, "hvb");
    // A forged entry (any host writes the index) names a record that does not agree: the name is free.
    await ca.hset(K.byName(VPC), "forged", nameEntry(b));
    const f = vmRec("hva", "forged");
    assert.equal(await A.claim(f, "ta"), nameEntry(f));
    await A.remove(f, "ta");
    await B.remove(b, "tb");
  });

  test("get, ofHost, all and put read and write each host's slot; user-data stays with its record", async () => {
    const a = vmRec("hva", "ga", "YQ==");
    const b = vmRec("hvb", "gb");
    await A.claim(a, "ta");
    await B.claim(b, "tb");
    assert.equal(await ca.sismember(K.unsettled("hva"), a.id), 1, "a claim is in its host's set of VMs to recover");
    Object.assign(a, { state: "running", op: "" });
    await A.put(a, "ta");
    assert.equal(await ca.sismember(K.unsettled("hva"), a.id), 0, "a running VM is not");
    assert.equal(await ca.exists(K.lease("hva", a.id)), 0, "the last put of a create lets the lease go");
    assert.equal((await B.get(a.id))?.state, "running", "hvb reads hva's VM");
    assert.equal((await B.get(a.id))?.userData, "", "but not its user-data");
    assert.equal((await A.getOwn(a.id))?.userData, "YQ==");
    assert.deepEqual((await A.all()).map((v) => v.name).sort(), ["ga", "gb"]);
    assert.ok((await vmEvents(ca)).includes(`vm.updated ${a.id}`));
    await A.remove(a);
    await B.remove(b, "tb");
    assert.deepEqual(await A.all(), []);
    assert.equal(await cb.exists(K.unsettled("hvb")), 0, "a removed VM leaves the set");
  });
});
