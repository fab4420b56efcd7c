// The reconciler's safety valve, against a recording kernel and a fake store.
import assert from "node:assert/strict";
import { pino } from "pino";
import { test } from "vitest";
import { Agent } from "../../services/netagent/agent.js";
import { RecordingKernel } from "../../services/netagent/kernel.js";
import type { HostStore } from "../../services/netagent/store.js";

const emptyStore = (vpcs: string[] = []) =>
  ({
    load: async () => ({ vpcs: new Map(vpcs.map((v) => [v, { vpcId: v, ns: `mvpc-hv1-${v}`, createdMs: 0 }])), subnets: new Map(), nics: new Map() }),
    hasVpc: async () => false,
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
