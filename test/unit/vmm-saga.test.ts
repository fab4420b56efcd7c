// The vmm's saga (CreateVm's steps, their rollback, DeleteVm, recovery)
// against in-memory fakes of the daemons it calls (test/lib/vmm-fakes.ts),
// with a real redis-server for the VmStore: every step failing before its
// work and after it (the reply lost). No root, no kernel.
import assert from "node:assert/strict";
import { Code, ConnectError, createClient, createRouterTransport, type Client } from "@connectrpc/connect";
import { pino } from "pino";
import { describe, test } from "vitest";
import { mapDomainErrors } from "../../services/common/errors.js";
import { metricsRegistry } from "../../services/common/metrics.js";
import { DELETE_PHASES, Vmm } from "../../services/vmm/service.js";
import { STEPS, VmStore, type StepName, type VmRec } from "../../services/vmm/store.js";
import { VmKind, VmOperation, VmService, VmState } from "../../gen/microvpc/v1/vm_pb.js";
import { rejectsWith } from "../lib/clients.js";
import { scratchRedis } from "../lib/scratch-redis.js";
import { FAULT_CODE, faultMessage, STEP_CALLS, VmmFakes } from "../lib/vmm-fakes.js";

const HOST = "hv1";
const PHASES: StepName[][] = [["ipam"], ["netagent"], ["firewall", "gateway", "dns"], ["boot"]];
const phaseOf = (s: StepName) => PHASES.findIndex((p) => p.includes(s));
/** When DeleteVm undoes a step (DELETE_PHASES: the guest, then the rest at once but the address, then the address). */
const deletePhaseOf = (s: StepName) => DELETE_PHASES.findIndex((p) => p.includes(s));
const NOTHING = { ipam: [], netagent: [], firewall: [], gateway: [], dns: [], booter: [], netns: [] };

const db = scratchRedis();

interface Rig {
  fakes: VmmFakes;
  vmm: Vmm;
  api: Client<typeof VmService>;
  /** Every record the store removed, as it was at that moment (its last journal). */
  removed: VmRec[];
}

function rig(): Rig {
  const fakes = new VmmFakes(HOST);
  const store = new VmStore(db.r, HOST);
  const removed: VmRec[] = [];
  const remove = store.remove.bind(store);
  store.remove = async (v, releaseLease) => {
    removed.push(structuredClone(v));
    await remove(v, releaseLease);
  };
  const vmm = new Vmm(store, fakes.clients(), { hostId: HOST, booters: { qemu: fakes.booter() }, netns: fakes.netns() }, pino({ level: "silent" }));
  const api = createClient(
    VmService,
    createRouterTransport((router) => router.service(VmService, vmm.impl), { router: { interceptors: [mapDomainErrors] } }),
  );
  return { fakes, vmm, api, removed };
}

/** The vmm's keys left in Redis (the shared hosts index aside): under the host's and the VPC's tags, user-data, and the earlier names (tombstones). */
async function vmKeys(): Promise<string[]> {
  const keys = (await Promise.all(["mvpc:vm:*", "mvpc:{*}:vm*", "mvpc-md:*"].map((p) => db.r.keys(p)))).flat();
  return keys.filter((k) => k !== "mvpc:vm:hosts").sort();
}

const kindEnum = { netns: VmKind.NETNS, qemu: VmKind.QEMU } as const;

/** Afterwards nothing is left anywhere: recovery finds nothing to do, DeleteVm nothing to delete. */
async function assertNothingLeft(x: Rig, name: string, what: string): Promise<void> {
  const before = x.fakes.calls.length;
  await x.vmm.recover();
  assert.equal((await x.api.deleteVm({ ref: name, vpc: "app" })).deleted, false, `${what}: DeleteVm finds no VM`);
  assert.deepEqual(x.fakes.held(), NOTHING, `${what}: no fake holds anything`);
  assert.deepEqual(await vmKeys(), [], `${what}: no VM record, lease or name entry in Redis`);
  assert.equal(x.fakes.calls.length, before, `${what}: recovery and DeleteVm called nobody`);
}

describe("CreateVm failing at each step", () => {
  for (const kind of ["qemu", "netns"] as const) {
    // kind=netns has no boot call to fail (its namespace is made with the NIC).
    for (const step of STEPS.filter((s) => kind === "qemu" || s !== "boot")) {
      for (const at of ["before", "after"] as const) {
        test(`kind=${kind}, ${step} fails ${at} its work: the step's code and name, everything undone in reverse, journaled, nothing left`, async () => {
          const x = rig();
          const call = STEP_CALLS[step];
          x.fakes.fail(call.do, at);
          const name = `f-${step}-${at}`;
          const err = await rejectsWith(x.api.createVm({ name, vpc: "app", subnet: "web", securityGroups: ["web"], kind: kindEnum[kind] }), FAULT_CODE[at]);
          const cause = faultMessage(call.svc, call.do, at);
          assert.equal(err.rawMessage, `CreateVm failed at step ${step}: ${cause}; every step done before it was undone`);

          // What ran: every step of the phases up to the failing one (a phase's steps run at once), none after.
          const ran = PHASES.slice(0, phaseOf(step) + 1).flat();
          const did = x.fakes.calls.filter((c) => Object.values(STEP_CALLS).some((s) => s.do === c.method)).map((c) => c.method);
          assert.deepEqual(did.sort(), ran.map((s) => STEP_CALLS[s].do).sort(), "the steps up to the failing phase were asked, no later one");
          // The rollback: every step that may have run, undone one by one in reverse order.
          const undid = x.fakes.calls.filter((c) => Object.values(STEP_CALLS).some((s) => s.undo === c.method)).map((c) => c.method);
          assert.deepEqual(
            undid,
            [...ran].reverse().map((s) => STEP_CALLS[s].undo),
            "each step undone, last first",
          );
          const doneAt = x.fakes.calls.findIndex((c) => c.method === call.do);
          const firstUndo = x.fakes.calls.findIndex((c) => c.method === STEP_CALLS[ran.at(-1)!].undo);
          assert.ok(firstUndo > doneAt, "undone after the failure");
          // Including what the failing call itself made before its reply was lost.
          assert.deepEqual(x.fakes.held(), NOTHING, "no fake holds anything");

          // The journal, as the record was when removed.
          assert.equal(x.removed.length, 1, "the record is removed once");
          const j = x.removed[0].journal.map((e) => `${e.op} ${e.step} ${e.state}${e.msg ? `: ${e.msg}` : ""}`);
          assert.ok(j.includes(`create ${step} failed: ${cause}`), `the journal names the step and cause: ${j.join(" | ")}`);
          assert.deepEqual(
            j.filter((e) => e.startsWith("rollback ")),
            [...ran].reverse().map((s) => `rollback ${s} undone`),
            "and every undo",
          );
          assert.equal(x.removed[0].op, "rollback");

          await assertNothingLeft(x, name, `after a failure ${at} ${step}`);
          // The name is free again.
          const vm = (await x.api.createVm({ name, vpc: "app", subnet: "web", securityGroups: ["web"], kind: kindEnum[kind] })).vm!;
          assert.equal(vm.state, VmState.RUNNING);
          assert.equal((await x.api.deleteVm({ ref: vm.id })).deleted, true);
          await assertNothingLeft(x, name, "after the second create and its delete");
        });
      }
    }
  }
});

describe("DeleteVm failing at each step", () => {
  for (const step of STEPS) {
    for (const at of ["before", "after"] as const) {
      const then = at === "before" ? "DeleteVm again" : "recovery";
      test(`${step}'s undo fails ${at} its work: the error, state DELETING, the rest kept for ${then}, which leaves nothing`, async () => {
        const x = rig();
        const name = `d-${step}-${at}`;
        const vm = (await x.api.createVm({ name, vpc: "app", subnet: "web", securityGroups: ["web"], kind: VmKind.QEMU })).vm!;
        assert.equal(vm.state, VmState.RUNNING);
        const call = STEP_CALLS[step];
        x.fakes.fail(call.undo, at);
        const err = await rejectsWith(x.api.deleteVm({ ref: name, vpc: "app" }), FAULT_CODE[at]);
        assert.equal(err.rawMessage, faultMessage(call.svc, call.undo, at));

        const i = await x.api.inspectVm({ ref: vm.id });
        assert.equal(i.vm!.state, VmState.DELETING, "the record stays, DELETING");
        assert.equal(i.operation, VmOperation.DELETE, "with the delete on record, for recovery to finish");
        assert.ok(i.journal.some((e) => e.message === "delete all running"));
        // Undone: every phase DeleteVm runs before the failing step's, and its phase-mates (a phase's undos are all tried); kept: the phases after.
        const held = x.fakes.held();
        const svcOf = (s: StepName) => STEP_CALLS[s].svc as keyof typeof held;
        for (const s of STEPS) {
          const kept = deletePhaseOf(s) > deletePhaseOf(step) || (s === step && at === "before");
          assert.equal(held[svcOf(s)].length, kept ? 1 : 0, `${s} ${kept ? "kept" : "undone"} when ${step}'s undo fails ${at}`);
        }

        if (at === "before") {
          assert.equal((await x.api.deleteVm({ ref: name, vpc: "app" })).deleted, true, "DeleteVm again finishes it");
        } else {
          const from = x.fakes.calls.length;
          await x.vmm.recover();
          await rejectsWith(x.api.getVm({ ref: vm.id }), Code.NotFound);
          // The recovery's calls carry one request id of its own.
          const ids = new Set(x.fakes.calls.slice(from).map((c) => c.reqId));
          assert.equal(ids.size, 1, `one request id for the recovery: ${[...ids].join()}`);
          assert.match([...ids][0] ?? "", /^recover-[0-9a-f-]{36}$/);
        }
        const undos = x.fakes.calls.filter((c) => c.method === call.undo);
        assert.equal(undos.length, 2, "the failed undo was tried again");
        await assertNothingLeft(x, name, `after ${then}`);
      });
    }
  }
});

describe("a rollback that fails", () => {
  test("state FAILED and INTERNAL; retried with backoff in the background (metric, InspectVm) until nothing is left", { timeout: 30_000 }, async () => {
    const metric = async (result: string) =>
      (await metricsRegistry.getSingleMetric("microvpc_vmm_recoveries_total")!.get()).values.find((v) => v.labels.result === result)?.value ?? 0;
    const [error0, ok0] = [await metric("error"), await metric("ok")];
    const x = rig();
    x.fakes.fail("boot", "before");
    x.fakes.fail("unbindNic", "before", 2);
    const name = "rb";
    const err = await rejectsWith(x.api.createVm({ name, vpc: "app", subnet: "web", securityGroups: ["web"], kind: VmKind.QEMU }), Code.Internal);
    assert.equal(
      err.rawMessage,
      `step boot failed (${faultMessage("booter", "boot", "before")}) and the rollback failed: ${faultMessage("firewall", "unbindNic", "before")}; the vmm retries on restart`,
    );
    const id = (await x.api.getVm({ ref: name, vpc: "app" })).vm!.id;
    assert.equal((await x.api.getVm({ ref: id })).vm!.state, VmState.FAILED);
    assert.deepEqual(x.fakes.held().firewall.length, 1, "the binding whose undo failed is still there");
    assert.deepEqual(x.fakes.held().ipam.length, 1, "and what comes before it");

    const stop = x.vmm.startRecoveryRetries(50);
    let seen = "";
    try {
      const deadline = Date.now() + 20_000;
      for (;;) {
        try {
          const m = (await x.api.inspectVm({ ref: id })).vm!.statusMessage;
          if (/recovery attempt \d\/\d+ failed/.test(m)) seen = m;
        } catch (e) {
          if (e instanceof ConnectError && e.code === Code.NotFound) break;
          throw e;
        }
        assert.ok(Date.now() < deadline, "rolled back by a retry within 20 s");
        await new Promise((res) => setTimeout(res, 50));
      }
    } finally {
      stop();
    }
    assert.match(seen, new RegExp(`^recovery attempt \\d/8 failed \\(${faultMessage("firewall", "unbindNic", "before")}\\); retrying in \\d+ s$`));
    assert.equal((await metric("error")) - error0, 1, "one failed attempt counted (the create's own rollback is not a recovery)");
    assert.equal((await metric("ok")) - ok0, 1, "and the one that worked");
    assert.equal(x.fakes.calls.filter((c) => c.method === "unbindNic").length, 3, "the undo tried by the create, then by two recoveries");
    await assertNothingLeft(x, name, "after the retried recovery");
  });
});

describe("a crash between the claim and the next write", () => {
  test("the claim's record alone has recovery undo the NIC, its namespace and the address", async () => {
    for (const kind of ["netns", "qemu"] as const) {
      const x = rig();
      // The first write after the claim (before the firewall, metadata and
      // DNS steps) never happens: the process is gone, as far as Redis knows.
      const put = x.vmm.store.put.bind(x.vmm.store);
      let puts = 0;
      x.vmm.store.put = async (v, releaseLease) => {
        if (++puts === 1) throw new Error("crashed");
        await put(v, releaseLease);
      };
      const name = `crash-${kind}`;
      await rejectsWith(x.api.createVm({ name, vpc: "app", subnet: "web", securityGroups: ["web"], kind: kindEnum[kind] }), Code.Internal);
      const held = x.fakes.held();
      assert.equal(held.ipam.length, 1, "the address was allocated");
      assert.equal(held.netagent.length, 1, "and the NIC attached");
      assert.equal(held.firewall.length + held.gateway.length + held.dns.length, 0, "nothing after them ran");
      const rec = (await x.api.inspectVm({ ref: name, vpc: "app" })).journal.map((e) => e.message);
      assert.deepEqual(rec, ["create ipam queued", "create netagent queued"], "what the claim wrote is all there is");

      await x.vmm.recover();
      assert.deepEqual(x.fakes.held(), NOTHING, `${kind}: recovery undid the NIC, the namespace and the address`);
      const undid = x.fakes.calls.filter((c) => Object.values(STEP_CALLS).some((s) => s.undo === c.method)).map((c) => c.method);
      assert.deepEqual(undid, ["detachNic", "release"], "from the NIC down, last first");
      await assertNothingLeft(x, name, "after the recovery");
    }
  });
});

describe("a name taken", () => {
  test("the same CreateVm again gets the running VM back and calls nobody; another client's gets ALREADY_EXISTS naming it", async () => {
    const x = rig();
    const req = { name: "dup", vpc: "app", subnet: "web", securityGroups: ["web"], kind: VmKind.NETNS, clientToken: "t1" };
    const vm = (await x.api.createVm(req)).vm!;
    const calls = x.fakes.calls.length;
    const again = (await x.api.createVm(req)).vm!;
    assert.equal(again.id, vm.id, "the same VM");
    assert.equal(again.state, VmState.RUNNING);
    const err = await rejectsWith(x.api.createVm({ ...req, clientToken: "t2" }), Code.AlreadyExists);
    assert.equal(err.rawMessage, `VM dup already exists in VPC app (${vm.id}, running); delete it or pick another name`);
    assert.equal(x.fakes.calls.length, calls, "neither called a step");
    assert.equal((await x.api.listVms({})).vms.length, 1, "and nothing was added");
    assert.equal((await x.api.deleteVm({ ref: vm.id })).deleted, true);
    await assertNothingLeft(x, "dup", "after the delete");
  });
});

describe("DeleteVm's firewall undo", () => {
  test("unbinds with detaching, in the phase that detaches the NIC, before the address is released; a rollback's unbind says detaching too", async () => {
    assert.equal(deletePhaseOf("firewall"), deletePhaseOf("netagent"), "the binding goes beside the NIC");
    assert.ok(deletePhaseOf("ipam") > deletePhaseOf("firewall"), "the address after both");
    const x = rig();
    const vm = (await x.api.createVm({ name: "u1", vpc: "app", subnet: "web", securityGroups: ["web"], kind: VmKind.NETNS })).vm!;
    assert.equal((await x.api.deleteVm({ ref: vm.id })).deleted, true);
    const order = x.fakes.calls.filter((c) => ["unbindNic", "detachNic", "release"].includes(c.method)).map((c) => c.method);
    assert.equal(order.at(-1), "release", `the address last: ${order.join()}`);
    assert.deepEqual(x.fakes.unbindDetaching, [true], "DeleteVm's UnbindNic says the NIC is going");

    // A CreateVm that fails after its firewall step undoes the binding the same way (its NIC is detached next).
    x.fakes.fail("setDnsRecord", "before");
    await rejectsWith(x.api.createVm({ name: "u2", vpc: "app", subnet: "web", securityGroups: ["web"], kind: VmKind.NETNS }), FAULT_CODE.before);
    assert.deepEqual(x.fakes.unbindDetaching, [true, true]);
    await assertNothingLeft(x, "u2", "after the rollback");
  });
});
