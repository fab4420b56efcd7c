// AttachNic makes a veth NIC's devices while the NIC's flow mark is being
// readied (ct-marks: taking over the address's previous mark first clears
// that NIC's conntrack entries). Until the mark is ready the NIC must carry
// nothing: LinuxKernel.ipBatch's `upAfter` keeps the host end down, on its
// bridge, and sets it up only once the promise resolves. Real namespaces,
// a real veth and bridge, real pings.
import assert from "node:assert/strict";
import { afterAll, beforeAll, describe, test } from "vitest";
import { LinuxKernel } from "../../services/netagent/kernel.js";
import { RUN_PREFIX, createNetns, deleteNetns, netnsPath, nsExec } from "../lib/netns.js";

const VPC = `${RUN_PREFIX}-upafter-vpc`;
const VM1 = `${RUN_PREFIX}-upafter-vm1`;
const VM2 = `${RUN_PREFIX}-upafter-vm2`;
const kernel = new LinuxKernel();

/** nicCreateLines' veth batch (plan.ts), which runs in-process. */
function nic(host: string, vm: string, address: string): [string[], { netnsPath: string; lines: string[] }[]] {
  return [
    [
      `link add ${host} mtu 1500 type veth peer name eth0 address 02:00:0a:09:00:0${address.slice(-1)} mtu 1500 netns ${vm}`,
      `link set dev ${host} alias mvpc-test-${host}`,
      `link set dev ${host} mtu 1500 master br0 up`,
    ],
    [
      {
        netnsPath: netnsPath(vm),
        lines: [`addr replace ${address}/24 dev eth0`, "link set dev eth0 up", "link set dev lo up", "route replace default via 10.9.0.1 dev eth0"],
      },
    ],
  ];
}

async function linkState(ns: string, dev: string): Promise<{ up: boolean; master: string } | null> {
  const r = await nsExec(ns, "ip", ["-j", "link", "show", "dev", dev], { check: false });
  if (r.code !== 0) return null;
  const [l] = JSON.parse(r.stdout) as { flags: string[]; master?: string }[];
  return { up: l.flags.includes("UP"), master: l.master ?? "" };
}

const pings = async (from: string) => (await nsExec(from, "ping", ["-c", "1", "-W", "1", "10.9.0.1"], { check: false })).code === 0;

function deferred(): { promise: Promise<void>; resolve: () => void; reject: (e: Error) => void } {
  let resolve!: () => void;
  let reject!: (e: Error) => void;
  const promise = new Promise<void>((res, rej) => ((resolve = res), (reject = rej)));
  return { promise, resolve, reject };
}

beforeAll(async () => {
  for (const ns of [VPC, VM1, VM2]) await createNetns(ns);
  await nsExec(VPC, "ip", ["link", "add", "br0", "type", "bridge"]);
  await nsExec(VPC, "ip", ["addr", "add", "10.9.0.1/24", "dev", "br0"]);
  await nsExec(VPC, "ip", ["link", "set", "br0", "up"]);
});

afterAll(async () => {
  for (const ns of [VM1, VM2, VPC]) await deleteNetns(ns).catch(() => {});
});

describe("a NIC's host end stays down until its mark is ready (ipBatch upAfter)", () => {
  test("made at once, on its bridge but down, carrying nothing; up and carrying once the promise resolves", async () => {
    const gate = deferred();
    const [lines, guests] = nic("vh1", VM1, "10.9.0.5");
    const done = kernel.ipBatch(VPC, lines, guests, gate.promise);
    let settled = false;
    void done.finally(() => (settled = true));
    // The devices exist before the gate opens (made meanwhile, not after it).
    let st: Awaited<ReturnType<typeof linkState>> = null;
    for (let i = 0; i < 50 && !st; i++) {
      st = await linkState(VPC, "vh1");
      if (!st) await new Promise((r) => setTimeout(r, 20));
    }
    assert.deepEqual(st, { up: false, master: "br0" }, "the host end is on its bridge and down");
    assert.equal((await linkState(VM1, "eth0"))?.up, true, "the VM end is configured");
    assert.equal(await pings(VM1), false, "a down host end carries nothing");
    assert.equal(settled, false, "ipBatch waits for the gate");
    gate.resolve();
    await done;
    assert.deepEqual(await linkState(VPC, "vh1"), { up: true, master: "br0" });
    // Carrier and the bridge port come up a moment after the link, and the first ping waits for ARP.
    let carried = false;
    for (let i = 0; i < 5 && !carried; i++) carried = await pings(VM1);
    assert.equal(carried, true, "up, the NIC carries packets");
  });

  test("a gate that fails: the batch fails with its error and the host end stays down", async () => {
    const gate = deferred();
    const [lines, guests] = nic("vh2", VM2, "10.9.0.6");
    const done = kernel.ipBatch(VPC, lines, guests, gate.promise);
    gate.reject(new Error("the mark could not be readied"));
    await assert.rejects(done, /the mark could not be readied/);
    assert.deepEqual(await linkState(VPC, "vh2"), { up: false, master: "br0" }, "left down for the caller to remove");
    assert.equal(await pings(VM2), false);
  });
});
