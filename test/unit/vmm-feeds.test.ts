// What the vmm hears of the fleet (issue 18: a host hears only what
// concerns it): the change feeds of the VPCs whose lookups it has cached,
// and the fleet's VM events only while a WatchVms is open. A real
// redis-server carries the streams; the daemons the vmm calls are the
// in-memory fakes of test/lib/vmm-fakes.ts. No root, no kernel.
import assert from "node:assert/strict";
import { createClient, createRouterTransport, type Client } from "@connectrpc/connect";
import { Redis } from "ioredis";
import { pino } from "pino";
import { afterAll, beforeAll, describe, test } from "vitest";
import { mapDomainErrors } from "../../services/common/errors.js";
import { emit, EVENTS } from "../../services/common/events.js";
import { metricsRegistry } from "../../services/common/metrics.js";
import { Vmm } from "../../services/vmm/service.js";
import { VmStore } from "../../services/vmm/store.js";
import { VmKind, VmService, VmWatchEventType } from "../../gen/microvpc/v1/vm_pb.js";
import { waitFor } from "../lib/netns.js";
import { startRedis, type TestRedis } from "../lib/redis.js";
import { FAKE_VPC, VmmFakes } from "../lib/vmm-fakes.js";

const HOST = "hv1";
const OTHER_VPC = "vpc-0000000000b2";

let redis: TestRedis;
let r: Redis;
let stopped = false;
let vmm: Vmm;
let api: Client<typeof VmService>;
let getVpcCalls = 0;

async function batches(feed: "lookups" | "watch"): Promise<number> {
  const m = (await metricsRegistry.getMetricsAsJSON()).find((x) => x.name === "microvpc_vmm_event_batches_total");
  return Number(m?.values.find((v) => v.labels.feed === feed)?.value ?? 0);
}

const create = (name: string) => api.createVm({ name, vpc: "app", subnet: "web", securityGroups: ["web"], kind: VmKind.NETNS });
const sgEvent = (vpc: string) => emit(r, { vpcs: [vpc] }, ["kind", "fw.sg.updated", "vpc", vpc, "gen", "1", "sg", "sg-0000000000c3", "sg_gen", "2"]);

beforeAll(async () => {
  redis = await startRedis({ persistence: false });
  r = new Redis(redis.url);
  const fakes = new VmmFakes(HOST);
  const clients = fakes.clients();
  const getVpc = clients.vpc.getVpc.bind(clients.vpc);
  clients.vpc = { ...clients.vpc, getVpc: (req, opts) => (getVpcCalls++, getVpc(req, opts)) };
  vmm = new Vmm(new VmStore(r, HOST), clients, { hostId: HOST, booters: {}, netns: fakes.netns() }, pino({ level: "silent" }));
  vmm.followInvalidations(r, () => stopped);
  api = createClient(
    VmService,
    createRouterTransport((router) => router.service(VmService, vmm.impl), { router: { interceptors: [mapDomainErrors] } }),
  );
});

afterAll(async () => {
  stopped = true;
  vmm?.watchHub.close();
  r?.disconnect();
  await redis?.stop();
});

describe("the vmm's change feeds", () => {
  test("it reads the feed of the VPCs it has cached lookups of, and drops them on their changes; other VPCs' changes do not wake it", async () => {
    assert.equal(vmm.lookupVpcs().size, 0);
    await create("a1");
    assert.deepEqual([...vmm.lookupVpcs()], [FAKE_VPC.id], "the lookups CreateVm cached belong to its VPC");
    // The feed starts following the VPC within its block time, 5 s (and drops
    // what was cached before it had its position: a change in between
    // would be lost); from then on the lookups stay cached.
    await new Promise((res) => setTimeout(res, 5500));
    await create("a2");
    const calls0 = getVpcCalls;
    await create("a3");
    assert.equal(getVpcCalls, calls0, "the next CreateVm in the VPC used the cached lookups");
    const b0 = await batches("lookups");
    await sgEvent(FAKE_VPC.id);
    assert.ok(await waitFor(async () => (await batches("lookups")) > b0, { timeoutMs: 5000 }), "a group change in the cached VPC never reached the vmm");
    await new Promise((res) => setTimeout(res, 200));
    await create("a4");
    assert.equal(getVpcCalls, calls0 + 1, "the VPC's cached lookups were dropped: the next CreateVm looked it up again");
    assert.deepEqual([...vmm.lookupVpcs()], [FAKE_VPC.id], "and the VPC is still followed");

    // Changes elsewhere in the fleet: another VPC's stream, another host's, the global stream.
    await new Promise((res) => setTimeout(res, 1500));
    const b1 = await batches("lookups");
    for (let i = 0; i < 5; i++) {
      await sgEvent(OTHER_VPC);
      await emit(r, { hosts: ["hv2"], vpcs: [OTHER_VPC] }, ["kind", "nic.attached", "host", "hv2", "nic", "nic-00000000000d", "vpc", OTHER_VPC]);
      await r.xadd(EVENTS, "*", "kind", "vpc.deleted", "vpc", OTHER_VPC);
    }
    await new Promise((res) => setTimeout(res, 600));
    assert.equal(await batches("lookups"), b1, "the vmm woke for a VPC it holds nothing of");
    await create("a5");
    assert.equal(getVpcCalls, calls0 + 1, "and kept its cache");
  });

  test("the fleet's VM events are read only while a WatchVms is open", async () => {
    assert.equal(vmm.watchHub.following, false, "no watch open: the fleet's VM events are not read");
    const w0 = await batches("watch");
    await create("b1");
    await new Promise((res) => setTimeout(res, 300));
    assert.equal(await batches("watch"), w0, "VM changes woke a vmm nobody watches");

    const ac = new AbortController();
    const stream = api.watchVms({ vpc: "app" }, { signal: ac.signal })[Symbol.asyncIterator]();
    const seen: string[] = [];
    for (;;) {
      const m = (await stream.next()).value!;
      if (m.type === VmWatchEventType.SYNCED) break;
      seen.push(m.vm!.name);
    }
    assert.ok(seen.includes("b1"), `the watch lists the VPC's VMs: ${seen.join(",")}`);
    assert.equal(vmm.watchHub.following, true);
    // A change made now, right after SYNCED, arrives.
    await create("b2");
    for (;;) {
      const m = (await stream.next()).value!;
      if (m.type === VmWatchEventType.ADDED && m.vm!.name === "b2") break;
    }
    assert.ok((await batches("watch")) > w0);
    ac.abort();
    await stream.return?.();
  });
});
