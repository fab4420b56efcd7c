// The reconciler's safety valve, against a recording kernel and a fake store.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { pino } from "pino";
import { test } from "vitest";
import { compile, failClosedScript } from "../../services/firewall/compile.js";
import { Agent } from "../../services/netagent/agent.js";
import { RecordingKernel } from "../../services/netagent/kernel.js";
import { tableTx } from "../../services/netagent/ct-marks.js";
import { render } from "../../services/common/nft/tx.js";
import { NA_KEYS, type HostStore } from "../../services/netagent/store.js";

const emptyStore = (vpcs: string[] = []) =>
  ({
    load: async () => ({ vpcs: new Map(vpcs.map((v) => [v, { vpcId: v, ns: `mvpc-hv1-${v}`, createdMs: 0 }])), subnets: new Map(), nics: new Map() }),
    hasVpc: async () => false,
    keys: NA_KEYS.single,
  }) as unknown as HostStore;

test("an empty desired state never tears down existing VPC namespaces (wiped or wrong Redis)", async () => {
  const k = new RecordingKernel();
  k.netns.add("mvpc-hv1-vpc-aaaaaaaaaaaa");
  k.netns.add("mvpc-hv1-vpc-bbbbbbbbbbbb");
  const a = new Agent(k, emptyStore(), "hv1", pino({ level: "silent" }));
  await a.reconcileAll();
  assert.ok(!k.calls.some((c) => c.startsWith("netns del")), k.calls.join("\n"));
  assert.match(a.status.lastError, /desired state for host hv1 is empty but 2 of its VPC namespaces exist/);
});

test("with a desired state, a namespace nothing wants is removed; others' namespaces never", async () => {
  const k = new RecordingKernel();
  k.netns.add("mvpc-hv1-vpc-aaaaaaaaaaaa");
  k.netns.add("mvpc-hv2-vpc-cccccccccccc");
  k.netns.add("something-else");
  const a = new Agent(k, emptyStore(["vpc-bbbbbbbbbbbb"]), "hv1", pino({ level: "silent" }));
  await a.reconcileAll();
  assert.ok(k.calls.includes("netns del mvpc-hv1-vpc-aaaaaaaaaaaa"));
  assert.ok(!k.calls.some((c) => c.includes("hv2") || c.includes("something-else")));
});

test("a NIC attached while a pass reads Redis is not forgotten when the pass's older snapshot lands", async () => {
  // The race bench:vm hit: the pass reads Redis, then an AttachNic writes
  // Redis and memory, then the pass's snapshot (without the NIC) replaced
  // memory, so a DetachNic by owner found nothing to detach.
  const k = new RecordingKernel();
  const vpc = "vpc-aaaaaaaaaaaa";
  let redisNics = new Map<string, unknown>();
  let reads = 0;
  let gate: (() => void) | undefined;
  const store = {
    load: async () => {
      reads++;
      const snapshot = { vpcs: new Map([[vpc, { vpcId: vpc, ns: `mvpc-hv1-${vpc}`, createdMs: 0 }]]), subnets: new Map(), nics: new Map(redisNics) };
      if (reads === 1) await new Promise<void>((r) => (gate = r));
      return snapshot;
    },
    hasVpc: async () => true,
    keys: NA_KEYS.single,
  } as unknown as HostStore;
  const a = new Agent(k, store, "hv1", pino({ level: "silent" }));
  const pass = a.reconcileAll();
  while (!gate) await new Promise((r) => setTimeout(r, 1));
  // AttachNic: Redis first, then memory, while the pass holds its old snapshot.
  const nic = { nicId: "nic-111111111111", vpcId: vpc, owner: "vm-1" };
  redisNics = new Map([[nic.nicId, nic]]);
  a.desired.nics.set(nic.nicId, nic as never);
  gate();
  await pass;
  assert.equal(reads, 2, "the pass read Redis again");
  assert.ok(a.desired.nics.has(nic.nicId), "the attached NIC is still known");
  // Without a concurrent change, one read is enough.
  await a.reconcileAll();
  assert.equal(reads, 3);
  assert.ok(a.desired.nics.has(nic.nicId));
});

test("fail closed: a namespace the agent creates gets the firewall's tables with default-drop forwarding first; --open-until-firewall: none", async () => {
  const k = new RecordingKernel();
  const a = new Agent(k, emptyStore(), "hv1", pino({ level: "silent" }));
  assert.equal(await a.ensureNetns("vpc-dddddddddddd"), true);
  assert.equal(k.calls[0], "netns add mvpc-hv1-vpc-dddddddddddd");
  assert.equal(k.calls[1], `nft mvpc-hv1-vpc-dddddddddddd:\n  ${failClosedScript().trimEnd().split("\n").join("\n  ")}`);
  // Then the NIC-mark table (ct-marks.ts), empty, before any NIC.
  const marks = `nft mvpc-hv1-vpc-dddddddddddd:\n  ${render(tableTx()).trimEnd().split("\n").join("\n  ")}`;
  assert.equal(k.calls[2], marks);
  assert.equal(k.calls.length, 3);
  const open = new RecordingKernel();
  const b = new Agent(open, emptyStore(), "hv1", pino({ level: "silent" }));
  b.failClosed = false;
  await b.ensureNetns("vpc-dddddddddddd");
  assert.deepEqual(open.calls, ["netns add mvpc-hv1-vpc-dddddddddddd", marks], "no firewall skeleton; the NIC marks all the same");
});

test("the skeleton drops forwarded and bridged traffic, and the firewall's one transaction replaces it (in a throwaway namespace)", () => {
  if (spawnSync("unshare", ["-n", "true"]).status !== 0) return; // not root
  const st = { vpcId: "vpc-dddddddddddd", subnets: [], nics: [], groups: new Map(), members: new Map(), acls: new Map() };
  const sh = (script: string) => spawnSync("unshare", ["-n", "sh", "-c", script], { encoding: "utf8" });
  const skel = sh(`nft -f /dev/fd/3 3<<'A'\n${failClosedScript()}A\nnft list ruleset`);
  assert.equal(skel.status, 0, skel.stderr);
  assert.match(skel.stdout, /table inet microvpc \{\s+chain closed \{\s+type filter hook forward priority filter; policy drop;/);
  assert.match(skel.stdout, /table bridge microvpc \{\s+chain closed \{\s+type filter hook forward priority filter; policy drop;/);
  const taken = sh(`nft -f /dev/fd/3 3<<'A'\n${failClosedScript()}A\nnft -f /dev/fd/4 4<<'B'\n${compile(st).script}B\nnft list ruleset`);
  assert.equal(taken.status, 0, taken.stderr);
  assert.doesNotMatch(taken.stdout, /chain closed/, "the firewall's table replaced the skeleton");
  assert.match(taken.stdout, /chain forward/);
});
