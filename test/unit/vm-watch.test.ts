// WatchVms (services/vmm/watch.ts) against an in-memory store: the initial
// listing then SYNCED, a message per change and none for an event that
// changes nothing, DELETED ending a watch of one VM, an overflow of events
// answered with one re-listing, and a cancelled watch unsubscribing.
import assert from "node:assert/strict";
import { create } from "@bufbuild/protobuf";
import { test } from "vitest";
import { VmSchema, VmState, VmWatchEventType, WatchVmsRequestSchema, type Vm } from "../../gen/microvpc/v1/vm_pb.js";
import type { VmRec, VmStore } from "../../services/vmm/store.js";
import { VmWatchHub, watchVms, type WatchDeps } from "../../services/vmm/watch.js";

const rec = (id: string, name: string, state: VmRec["state"] = "running", vpcId = "vpc-000000000001"): VmRec =>
  ({ id, name, state, vpcId, subnetId: "subnet-000000000001" }) as VmRec;

function deps(vms: Map<string, VmRec>): WatchDeps {
  const store = {
    get: async (id: string) => vms.get(id) ?? null,
    all: async () => [...vms.values()],
  } as unknown as VmStore;
  return {
    store,
    resolve: async (ref) => [...vms.values()].find((v) => v.id === ref || v.name === ref) ?? null,
    vpcId: async (ref) => ref,
    vmMsg: (v): Vm =>
      create(VmSchema, {
        id: v.id,
        name: v.name,
        vpcId: v.vpcId,
        state: { pending: VmState.PENDING, running: VmState.RUNNING, deleting: VmState.DELETING, failed: VmState.FAILED }[v.state],
      }),
  };
}

/** Reads n messages from the stream, failing after 2 s. */
async function take(it: AsyncIterator<{ type?: VmWatchEventType; vm?: { id?: string; state?: VmState } }>, n: number) {
  const out: { type?: VmWatchEventType; id?: string; state?: VmState }[] = [];
  for (let i = 0; i < n; i++) {
    const r = await Promise.race([it.next(), new Promise<never>((_, rej) => setTimeout(() => rej(new Error(`message ${i + 1} of ${n} did not come`)), 2000))]);
    assert.ok(!r.done, "the stream ended early");
    out.push({ type: r.value.type, id: r.value.vm?.id, state: r.value.vm?.state });
  }
  return out;
}

const T = VmWatchEventType;

test("initial listing, SYNCED, then ADDED/MODIFIED/DELETED; an event that changes nothing sends nothing", async () => {
  const vms = new Map([["vm-00000000000b", rec("vm-00000000000b", "b")]]);
  vms.set("vm-00000000000a", rec("vm-00000000000a", "a"));
  const hub = new VmWatchHub();
  const ac = new AbortController();
  const it = watchVms(deps(vms), hub, create(WatchVmsRequestSchema, {}), ac.signal)[Symbol.asyncIterator]();
  assert.deepEqual(
    (await take(it, 3)).map((m) => [m.type, m.id]),
    [
      [T.INITIAL, "vm-00000000000a"],
      [T.INITIAL, "vm-00000000000b"],
      [T.SYNCED, undefined],
    ],
  );
  assert.equal(hub.size, 1);
  vms.set("vm-00000000000c", rec("vm-00000000000c", "c", "pending"));
  hub.notify(["vm-00000000000c", "not-a-vm-id"]);
  assert.deepEqual(await take(it, 1), [{ type: T.ADDED, id: "vm-00000000000c", state: VmState.PENDING }]);
  // A repeated (or forged) event: nothing changed, nothing sent; the next real change comes next.
  hub.notify(["vm-00000000000a"]);
  vms.set("vm-00000000000c", rec("vm-00000000000c", "c", "running"));
  hub.notify(["vm-00000000000c"]);
  assert.deepEqual(await take(it, 1), [{ type: T.MODIFIED, id: "vm-00000000000c", state: VmState.RUNNING }]);
  vms.delete("vm-00000000000b");
  hub.notify(["vm-00000000000b"]);
  assert.deepEqual(
    (await take(it, 1)).map((m) => [m.type, m.id]),
    [[T.DELETED, "vm-00000000000b"]],
  );
  ac.abort();
  assert.equal((await it.next()).done, true);
  assert.equal(hub.size, 0, "a cancelled watch unsubscribes");
});

test("a watch of one VM (ref) sees only it and ends after its DELETED; a vpc filter leaves other VPCs out", async () => {
  const vms = new Map([
    ["vm-00000000000a", rec("vm-00000000000a", "a")],
    ["vm-00000000000b", rec("vm-00000000000b", "b", "running", "vpc-000000000002")],
  ]);
  const hub = new VmWatchHub();
  const one = watchVms(deps(vms), hub, create(WatchVmsRequestSchema, { ref: "a" }), new AbortController().signal)[Symbol.asyncIterator]();
  const acVpc = new AbortController();
  const inVpc = watchVms(deps(vms), hub, create(WatchVmsRequestSchema, { vpc: "vpc-000000000002" }), acVpc.signal)[Symbol.asyncIterator]();
  assert.deepEqual(
    (await take(one, 2)).map((m) => [m.type, m.id]),
    [
      [T.INITIAL, "vm-00000000000a"],
      [T.SYNCED, undefined],
    ],
  );
  assert.deepEqual(
    (await take(inVpc, 2)).map((m) => [m.type, m.id]),
    [
      [T.INITIAL, "vm-00000000000b"],
      [T.SYNCED, undefined],
    ],
  );
  vms.set("vm-00000000000b", rec("vm-00000000000b", "b", "failed", "vpc-000000000002"));
  vms.delete("vm-00000000000a");
  hub.notify(["vm-00000000000b", "vm-00000000000a"]);
  assert.deepEqual(
    (await take(one, 1)).map((m) => [m.type, m.id]),
    [[T.DELETED, "vm-00000000000a"]],
  );
  assert.equal((await one.next()).done, true, "the watch of one VM ends with it");
  assert.deepEqual(await take(inVpc, 1), [{ type: T.MODIFIED, id: "vm-00000000000b", state: VmState.FAILED }]);
  // The server aborts the handler's signal when the client cancels: the watch wakes and ends.
  acVpc.abort();
  assert.equal((await inVpc.next()).done, true);
  assert.equal(hub.size, 0);
});

test("more events than a stream keeps ids for: one re-listing, and every difference still sent", async () => {
  const vms = new Map<string, VmRec>();
  const hub = new VmWatchHub();
  const ac = new AbortController();
  const it = watchVms(deps(vms), hub, create(WatchVmsRequestSchema, {}), ac.signal)[Symbol.asyncIterator]();
  assert.deepEqual(
    (await take(it, 1)).map((m) => m.type),
    [T.SYNCED],
  );
  const ids: string[] = [];
  for (let i = 0; i < 1500; i++) ids.push(`vm-${i.toString(16).padStart(12, "0")}`);
  for (const id of ids.slice(0, 3)) vms.set(id, rec(id, id));
  hub.notify(ids);
  hub.notifyAll();
  const got = await take(it, 3);
  assert.deepEqual(
    got.map((m) => [m.type, m.id]),
    ids.slice(0, 3).map((id) => [T.ADDED, id]),
  );
  ac.abort();
  assert.equal((await it.next()).done, true);
});

test("the hub reads the fleet's VM events from the first watch until a linger after the last, and a watch waits for its position", async () => {
  const hub = new VmWatchHub(50);
  const log: string[] = [];
  let position!: () => void;
  hub.setFollower(() => {
    log.push("start");
    return { ready: new Promise<void>((r) => (position = r)), stop: () => log.push("stop") };
  });
  assert.equal(hub.following, false, "nobody watches: nothing is read");
  const off1 = hub.subscribe(() => {});
  const off2 = hub.subscribe(() => {});
  assert.deepEqual(log, ["start"], "one follower for every watch");
  let ready = false;
  void hub.ready().then(() => (ready = true));
  await new Promise((r) => setTimeout(r, 10));
  assert.equal(ready, false, "a watch does not read before the follower has its position");
  position();
  await hub.ready();
  off1();
  off2();
  assert.equal(hub.following, true, "still read for a while after the last watch");
  const off3 = hub.subscribe(() => {});
  await new Promise((r) => setTimeout(r, 80));
  assert.deepEqual(log, ["start"], "a watch within the linger finds it running");
  off3();
  await new Promise((r) => setTimeout(r, 80));
  assert.deepEqual(log, ["start", "stop"]);
  assert.equal(hub.following, false);
});
