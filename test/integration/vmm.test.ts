// The vmm end to end on a simulated hypervisor: CreateVm/DeleteVm through
// the real ipam, netagent, firewall and gateway daemons; DeleteVm racing a
// CreateVm, and a vmm SIGKILLed at random points, leave every VM either
// fully up or fully gone. A step failing before or after its work, a
// DeleteVm failing at each step and a rollback that fails and is retried
// are tested over in-memory fakes: test/unit/vmm-saga.test.ts.
import assert from "node:assert/strict";
import { afterAll, beforeAll, describe, test } from "vitest";
import { DnsService } from "../../gen/microvpc/v1/dns_pb.js";
import { Code, ConnectError } from "@connectrpc/connect";
import type { Redis } from "ioredis";
import { Direction, FirewallService, Protocol } from "../../gen/microvpc/v1/firewall_pb.js";
import { ConnectivityResult, VmKind, VmService, VmState } from "../../gen/microvpc/v1/vm_pb.js";
import { SubnetType } from "../../gen/microvpc/v1/subnet_pb.js";
import { grpcClient } from "../../services/common/client.js";
import { MetadataStore } from "../../services/gateway/metadata-store.js";
import { rejectsWith } from "../lib/clients.js";
import type { Daemon } from "../lib/daemon.js";
import { Harness } from "../lib/harness.js";
import { ON_CLUSTER } from "../lib/on-cluster.js";
import { keysLike } from "../lib/redis.js";
import { readFileSync, existsSync } from "node:fs";
import { guestImage } from "../../services/vmm/qemu.js";
import { canPing, listNetns, listNetnsSync, nsExec, sleep, startUdpEcho, tempDir, waitFor } from "../lib/netns.js";

let h: Harness;
let fwd: Daemon, gwd: Daemon, vmmd: Daemon;
let vmm: ReturnType<typeof grpcClient<typeof VmService>>;
let fw: ReturnType<typeof grpcClient<typeof FirewallService>>;
let subnetId: string;
let redis: Redis;
const stateDir = tempDir("vmm-state");

async function startVmm(extra: string[] = []): Promise<void> {
  vmmd = await h.vmm(0, { fwd, gwd, args: extra, env: { MICROVPC_STATE_DIR: stateDir } });
  vmm = grpcClient(VmService, { address: vmmd.address, timeoutMs: 30_000 });
}

/** Everything the host holds for VMs, from every service, so leaks show. */
async function holdings() {
  const hv = h.hosts[0];
  const allocs = (await h.ipam.ipam.listAllocations({ subnetId, pageSize: 1000 })).allocations.map((a) => a.address).sort();
  const nics = (await hv.agent.listNics({ pageSize: 1000 })).nics.map((n) => n.guest!.address).sort();
  const bindings = (await fw.listNicBindings({ pageSize: 1000 })).bindings.map((b) => b.address).sort();
  const metadata = (await new MetadataStore(redis, hv.id).list({ limit: 1000 })).map((m) => m.localIpv4).sort();
  const namespaces = (await listNetns()).filter((n) => n.startsWith(`mvpcvm-${hv.id}-`)).length;
  const running = (await vmm.listVms({})).vms
    .filter((v) => v.state === VmState.RUNNING)
    .map((v) => v.nics[0].guest!.address)
    .sort();
  const records = (await grpcClient(DnsService, { address: h.ipamDaemon.address }).listDnsRecords({ vpc: "app", pageSize: 1000 })).records
    .map((r) => r.address)
    .sort();
  return { allocs, nics, bindings, metadata, namespaces, running, records };
}

function assertConsistent(x: Awaited<ReturnType<typeof holdings>>, what: string) {
  assert.deepEqual(x.allocs, x.running, `${what}: addresses held in IPAM = running VMs`);
  assert.deepEqual(x.nics, x.running, `${what}: NICs = running VMs`);
  assert.deepEqual(x.bindings, x.running, `${what}: firewall bindings = running VMs`);
  assert.deepEqual(x.metadata, x.running, `${what}: metadata records = running VMs`);
  assert.equal(x.namespaces, x.running.length, `${what}: VM namespaces = running VMs`);
  assert.deepEqual(x.records, x.running, `${what}: DNS records = running VMs`);
}

beforeAll(async () => {
  h = await Harness.start({ hosts: 1 });
  const hv = h.hosts[0];
  redis = await h.connectReady();
  ({ fwd, gwd } = await h.hostServices(hv, { driftMs: 3000 }));
  fw = grpcClient(FirewallService, { address: fwd.address, timeoutMs: 20_000 });
  const vpc = await h.vpc("app", "10.0.0.0/16");
  subnetId = (await h.subnet(vpc, "web", "10.0.1.0/24", SubnetType.PUBLIC)).id;
  await fw.createSecurityGroup({
    vpc: vpc.id,
    name: "web",
    rules: [
      { direction: Direction.INGRESS, protocol: Protocol.TCP, portFrom: 80, portTo: 80, peer: { case: "cidr", value: "10.0.0.0/16" } },
      { direction: Direction.INGRESS, protocol: Protocol.ICMP, peer: { case: "cidr", value: "10.0.0.0/16" } },
      { direction: Direction.INGRESS, protocol: Protocol.UDP, portFrom: 5353, portTo: 5354, peer: { case: "cidr", value: "10.0.0.0/16" } },
    ],
  });
  await startVmm();
});

afterAll(async () => {
  redis?.disconnect();
  for (const d of [vmmd, gwd, fwd]) await d?.stop().catch(() => undefined);
  const left = await h?.close();
  assert.deepEqual(left ?? [], []);
});

describe("CreateVm and DeleteVm", () => {
  test("a netns VM gets its address, NIC, groups and metadata; reaches others; deleted, nothing remains", async () => {
    const a = (
      await vmm.createVm({
        name: "a",
        vpc: "app",
        subnet: "web",
        securityGroups: ["web"],
        kind: VmKind.NETNS,
        userData: new TextEncoder().encode("#cloud-config"),
      })
    ).vm!;
    const b = (await vmm.createVm({ name: "b", vpc: "app", subnet: "web", securityGroups: ["web"], kind: VmKind.NETNS })).vm!;
    assert.equal(a.state, VmState.RUNNING);
    assert.match(a.nics[0].guest!.kernelIpArg, /^ip=10\.0\.1\.\d+::10\.0\.1\.1:255\.255\.255\.0:a:eth0:off/);
    assert.ok(await canPing(a.namespace, "10.0.1.1"), "the VM pings its gateway");
    const t = await vmm.testConnectivity({ source: "a", vpc: "app", target: "b", protocol: Protocol.ICMP });
    assert.equal(t.result, ConnectivityResult.REACHABLE, "a → b allowed by the web group");
    const closed = await vmm.testConnectivity({ source: "a", vpc: "app", target: "b", port: 22, protocol: Protocol.TCP, timeoutMs: 800 });
    assert.equal(closed.result, ConnectivityResult.TIMEOUT, "a → b:22 dropped by the firewall");
    // UDP, a datagram and its answer: an echo on an allowed port answers; an allowed port where nothing listens says so
    // (ICMP port unreachable); a port the group does not open is dropped, whatever listens there.
    const echo = await startUdpEcho(b.namespace, 5353);
    const closedEcho = await startUdpEcho(b.namespace, 5400);
    try {
      const udp = await vmm.testConnectivity({ source: "a", vpc: "app", target: "b", port: 5353, protocol: Protocol.UDP, timeoutMs: 1000 });
      assert.deepEqual([ConnectivityResult[udp.result], udp.method], ["REACHABLE", "udp datagram :5353"], "a → b:5353/udp answered");
      const none = await vmm.testConnectivity({ source: "a", vpc: "app", target: "b", port: 5354, protocol: Protocol.UDP, timeoutMs: 1000 });
      assert.equal(ConnectivityResult[none.result], "REFUSED", "a → b:5354/udp: allowed, nothing listens");
      const dropped = await vmm.testConnectivity({ source: "a", vpc: "app", target: "b", port: 5400, protocol: Protocol.UDP, timeoutMs: 500 });
      assert.equal(ConnectivityResult[dropped.result], "TIMEOUT", "a → b:5400/udp dropped by the firewall though an echo listens");
    } finally {
      await echo.stop();
      await closedEcho.stop();
    }
    const again = await vmm.createVm({ name: "a", vpc: "app", subnet: "web", securityGroups: ["web"], kind: VmKind.NETNS });
    assert.equal(again.created, false, "CreateVm is idempotent");
    assert.equal(again.vm!.id, a.id);
    const insp = await vmm.inspectVm({ ref: a.id });
    assert.equal(insp.steps.length, 6, "ipam, netagent, firewall, gateway, dns, boot");
    assert.ok(
      insp.steps.every((s) => s.detail !== ""),
      "every step reports what it did",
    );
    assertConsistent(await holdings(), "two VMs up");
    assert.equal((await vmm.deleteVm({ ref: "a", vpc: "app" })).deleted, true);
    assert.equal((await vmm.deleteVm({ ref: b.id })).deleted, true);
    assert.equal((await vmm.deleteVm({ ref: b.id })).deleted, false, "DeleteVm is idempotent");
    const x = await holdings();
    assertConsistent(x, "after delete");
    assert.equal(x.allocs.length, 0);
  });

  test("the network is enforced when CreateVm returns: a peer's first packet is answered, a VM whose groups deny it is closed", async () => {
    // One echo request, sent right after the return, never repeated (no -w):
    // before the firewall applied bindings inside BindNic, this packet met
    // the "NIC not bound yet" drop for the first 20-80 ms after the return.
    const firstPacket = async (from: string, to: string) =>
      (await nsExec(from, "ping", ["-n", "-q", "-c", "1", "-W", "1", to], { check: false, timeoutMs: 5000 })).code === 0;
    const peer = (await vmm.createVm({ name: "peer", vpc: "app", subnet: "web", securityGroups: ["web"], kind: VmKind.NETNS })).vm!;
    try {
      for (let i = 0; i < 5; i++) {
        const open = (await vmm.createVm({ name: `open${i}`, vpc: "app", subnet: "web", securityGroups: ["web"], kind: VmKind.NETNS })).vm!;
        assert.ok(await firstPacket(peer.namespace, open.nics[0].guest!.address), `round ${i}: the first echo to a VM in "web" is answered`);
        const shut = (await vmm.createVm({ name: `shut${i}`, vpc: "app", subnet: "web", kind: VmKind.NETNS })).vm!;
        assert.ok(!(await firstPacket(peer.namespace, shut.nics[0].guest!.address)), `round ${i}: a VM without groups denies ingress from the start`);
        assert.ok(await firstPacket(shut.namespace, peer.nics[0].guest!.address), `round ${i}: and its own first packet out is allowed (egress open)`);
        await vmm.deleteVm({ ref: open.id });
        await vmm.deleteVm({ ref: shut.id });
      }
    } finally {
      await vmm.deleteVm({ ref: peer.id });
    }
    assertConsistent(await holdings(), "after the rounds");
  });

  test("a group deleted and made again under the same name is the one the next CreateVm binds (lookups are cached, never stale)", async () => {
    const vpcId = (await h.ipam.vpc.getVpc({ ref: "app" })).vpc!.id;
    const rules = [{ direction: Direction.INGRESS, protocol: Protocol.ICMP, peer: { case: "cidr" as const, value: "10.0.0.0/16" } }];
    const first = (await fw.createSecurityGroup({ vpc: vpcId, name: "cached", rules })).securityGroup!;
    const a = (await vmm.createVm({ name: "cache-a", vpc: "app", subnet: "web", securityGroups: ["cached"], kind: VmKind.NETNS })).vm!;
    assert.deepEqual(a.securityGroupIds, [first.id]);
    await vmm.deleteVm({ ref: a.id });
    await fw.deleteSecurityGroup({ ref: first.id });
    const second = (await fw.createSecurityGroup({ vpc: vpcId, name: "cached", rules })).securityGroup!;
    assert.notEqual(second.id, first.id);
    const b = (await vmm.createVm({ name: "cache-b", vpc: "app", subnet: "web", securityGroups: ["cached"], kind: VmKind.NETNS })).vm!;
    assert.deepEqual(b.securityGroupIds, [second.id], "bound to the group that exists now");
    await vmm.deleteVm({ ref: b.id });
    await fw.deleteSecurityGroup({ ref: second.id });
    await rejectsWith(vmm.createVm({ name: "cache-c", vpc: "app", subnet: "web", securityGroups: ["cached"], kind: VmKind.NETNS }), Code.NotFound, /cached/);
  });

  test("bad input: unknown VPC, group or subnet, bad names → the right code, nothing created", async () => {
    await rejectsWith(vmm.createVm({ name: "x", vpc: "nope", subnet: "web" }), Code.NotFound);
    await rejectsWith(vmm.createVm({ name: "x", vpc: "app", subnet: "web", securityGroups: ["nope"] }), Code.NotFound, /security group/);
    await rejectsWith(vmm.createVm({ name: "x;reboot", vpc: "app", subnet: "web" }), Code.InvalidArgument);
    await rejectsWith(vmm.createVm({ name: "x", vpc: "app", subnet: "web", address: "10.0.9.9" }), Code.InvalidArgument, /step ipam.*outside/);
    assertConsistent(await holdings(), "after bad input");
  });
});

describe("exec metrics", () => {
  /** Sum of microvpc_exec_total on a daemon's /metrics, by command; null if the metric is not served at all. */
  async function execCounts(d: Daemon): Promise<Map<string, number> | null> {
    const text = await (await fetch(`http://127.0.0.1:${d.metricsPort}/metrics`)).text();
    if (!/^# TYPE microvpc_exec_total counter$/m.test(text) || !/^# TYPE microvpc_exec_duration_seconds histogram$/m.test(text)) return null;
    const m = new Map<string, number>();
    for (const [, command, n] of text.matchAll(/^microvpc_exec_total\{(?:[^}]*,)?command="([^"]*)"[^}]*\} (\d+)$/gm))
      m.set(command, (m.get(command) ?? 0) + Number(n));
    return m;
  }

  test("every daemon serves microvpc_exec_total and _duration_seconds; a CreateVm's commands are counted", async (t) => {
    const hv = h.hosts[0];
    const daemons = { ipam: h.ipamDaemon, netagent: hv.daemon, firewall: fwd, gateway: gwd, vmm: vmmd };
    const total = (m: Map<string, number>) => [...m.values()].reduce((a, b) => a + b, 0);
    const before = new Map<string, Map<string, number>>();
    for (const [name, d] of Object.entries(daemons)) {
      const m = await execCounts(d);
      assert.ok(m, `${name} serves the exec metrics`);
      before.set(name, m);
    }
    const vm = (await vmm.createVm({ name: "counted", vpc: "app", subnet: "web", securityGroups: ["web"], kind: VmKind.NETNS })).vm!;
    const ran: string[] = [];
    for (const [name, d] of Object.entries(daemons)) {
      const m = (await execCounts(d))!;
      const was = before.get(name)!;
      const diff = [...m].filter(([c, n]) => n > (was.get(c) ?? 0)).map(([c, n]) => `${c}×${n - (was.get(c) ?? 0)}`);
      ran.push(`${name} ${total(m) - total(was)} (${diff.join(", ")})`);
    }
    await t.annotate(`execs during one CreateVm (kind=netns), by daemon: ${ran.join("; ")}`);
    // The VM's namespace and the firewall's nft transactions are made in-process (no exec to count).
    assert.equal((await execCounts(vmmd))!.get("ip netns") ?? 0, before.get("vmm")!.get("ip netns") ?? 0, "the vmm made the namespace without `ip netns add`");
    assert.ok(listNetnsSync().includes(vm.namespace), `the VM's namespace ${vm.namespace} is there for ip netns`);
    for (const [name, d] of Object.entries(daemons)) {
      const nftExecs = ((await execCounts(d))!.get("ip netns exec nft -f") ?? 0) - (before.get(name)!.get("ip netns exec nft -f") ?? 0);
      assert.equal(nftExecs, 0, `${name} ran its nft transactions in-process, not as \`nft -f\` execs`);
    }
    assert.equal((await vmm.deleteVm({ ref: vm.id })).deleted, true);
  });
});

describe("kind=qemu", () => {
  test("CreateVm boots a real guest on its TAP; it answers a VM of its VPC; DeleteVm stops it", { timeout: 180_000 }, async (t) => {
    if (!guestImage()) {
      t.skip("no guest image (deploy/guest/build.sh; test/integration/qemu.test.ts builds it)");
      return;
    }
    const g = (await vmm.createVm({ name: "guest", vpc: "app", subnet: "web", securityGroups: ["web"], kind: VmKind.QEMU, memoryMib: 256 })).vm!;
    assert.ok(g.pid > 0, "a QEMU process");
    // KVM only if the vmm's probe booted this guest to init under it; either way, with the reason.
    const ins = (await vmm.inspectVm({ ref: g.id })).vm!;
    assert.match(ins.accelerator, /^(kvm|tcg)$/);
    assert.ok(ins.acceleratorReason.length > 0, "inspect says why");
    assert.equal(g.accelerator, ins.accelerator);
    await t.annotate(`accelerator ${ins.accelerator}: ${ins.acceleratorReason}`);
    const addr = g.nics[0].guest!.address;
    assert.ok(
      await waitFor(() => existsSync(g.consoleLogPath) && readFileSync(g.consoleLogPath, "utf8").includes(`MVPC-NET eth0 ${addr}/24`), {
        timeoutMs: 90_000,
        intervalMs: 500,
      }),
      "the guest configured eth0 from the ip= argument",
    );
    const peer = (await vmm.createVm({ name: "peer", vpc: "app", subnet: "web", securityGroups: ["web"], kind: VmKind.NETNS })).vm!;
    assert.ok(await waitFor(() => canPing(peer.namespace, addr), { timeoutMs: 30_000, intervalMs: 500 }), "a VM of the VPC reaches the guest");
    await vmm.deleteVm({ ref: g.id });
    await vmm.deleteVm({ ref: peer.id });
    let alive = true;
    try {
      process.kill(g.pid, 0);
    } catch {
      alive = false;
    }
    assert.ok(!alive, "QEMU stopped");
    assertConsistent(await holdings(), "after deleting the guest");
  });
});

describe("failures", () => {
  test("DeleteVm during a CreateVm in flight, 12 times: never interleaved; each VM ends fully up or fully gone, nothing leaked", async () => {
    let deleted = 0;
    for (let i = 0; i < 12; i++) {
      const name = `race${i}`;
      const c = vmm.createVm({ name, vpc: "app", subnet: "web", securityGroups: ["web"] }).catch((e) => e);
      // Somewhere inside the create: its steps take tens of milliseconds.
      await sleep(Math.floor(Math.random() * 80));
      const d = await vmm.deleteVm({ ref: name, vpc: "app" }).catch((e) => e);
      const cr = await c;
      assert.ok(!(cr instanceof ConnectError), `create ${name} is not disturbed by the delete: ${cr}`);
      if (d instanceof ConnectError) {
        assert.equal(Code[d.code], Code[Code.Aborted], `a delete that cannot wait is ABORTED, retryable: ${d.rawMessage}`);
      } else if (d.deleted) {
        deleted++;
        await rejectsWith(vmm.getVm({ ref: cr.vm.id }), Code.NotFound);
      } else {
        assert.equal((await vmm.getVm({ ref: cr.vm.id })).vm!.state, VmState.RUNNING, "a delete that came first found nothing; the VM is up");
      }
      assertConsistent(await holdings(), `after race ${i}`);
    }
    assert.ok(deleted >= 3, `deletes that met a create in flight waited for it and deleted the VM (${deleted})`);
    for (const v of (await vmm.listVms({})).vms) await vmm.deleteVm({ ref: v.id });
    assertConsistent(await holdings(), "after the races");
    assert.equal((await keysLike(redis, "mvpc:{host:*}:vm:*:lease")).length, 0, "no lease left behind");
  });

  // A cluster only ever has this release's names (VmStore): nothing to move there.
  test.skipIf(ON_CLUSTER)(
    "records an older version wrote (mvpc:vm:<id>, mvpc:vmlease:<id>) move under the host's hash tag on start; malformed records are skipped",
    async () => {
      const hv = h.hosts[0];
      const v = (await vmm.createVm({ name: "old", vpc: "app", subnet: "web", securityGroups: ["web"] })).vm!;
      await vmmd.stop();
      // Back to the oldest layout, as that version left it (with a lease its dead run held).
      const rec = `mvpc:{host:${hv.id}}:vm:${v.id}`;
      const text = (await redis.get(rec))!;
      await redis.del(rec, `mvpc:vm:host:${hv.id}:vm:${v.id}`, `mvpc:{${v.vpcId}}:vm:byname`);
      await redis.srem(`mvpc:{host:${hv.id}}:vms`, v.id);
      await redis.sadd(`mvpc:vm:host:${hv.id}`, v.id);
      await redis.set(`mvpc:vm:${v.id}`, text);
      await redis.set(`mvpc:vmlease:${v.id}`, `${hv.id}/1/dead`, "PX", 10_000);
      await redis.zadd("mvpc:vms", 0, v.id);
      await redis.hset(`mvpc:vm:vpc:${v.vpcId}:byname`, "old", v.id);
      // A malformed record of this host, in its own index: skipped and reported, never acted on.
      const bad = "vm-0000000000ba";
      await redis.sadd(`mvpc:vm:host:${hv.id}`, bad);
      await redis.set(`mvpc:vm:host:${hv.id}:vm:${bad}`, JSON.stringify({ ...(JSON.parse(text) as object), id: bad, netns: "x; reboot", op: "delete" }));
      await startVmm();
      try {
        assert.equal(await redis.get(rec), text, "moved as it was");
        assert.equal(await redis.exists(`mvpc:vm:${v.id}`, `mvpc:vmlease:${v.id}`), 0, "the old keys are gone");
        assert.equal(await redis.type(`mvpc:vm:host:${hv.id}:vm:${v.id}`), "hash", "a tombstone where the earlier release looks");
        assert.equal(await redis.zscore("mvpc:vms", v.id), null);
        assert.equal(await redis.get(`mvpc:{host:${hv.id}}:vm:${v.id}:lease`), `${hv.id}/1/dead`, "the lease moved, with its time left");
        assert.ok((await redis.pttl(`mvpc:{host:${hv.id}}:vm:${v.id}:lease`)) > 0);
        assert.equal(await redis.hget(`mvpc:{${v.vpcId}}:vm:byname`, "old"), `${hv.id}/${v.id}`, "the name entry names host and id");
        assert.equal(await redis.hget(`mvpc:vm:vpc:${v.vpcId}:byname`, "old"), `${hv.id}/${v.id}`, "in the earlier index too, which earlier vmms read");
        assert.ok(await redis.sismember("mvpc:vm:hosts", hv.id));
        assert.equal((await vmm.getVm({ ref: "old", vpc: "app" })).vm!.state, VmState.RUNNING);
        assert.ok(!(await vmm.listVms({})).vms.some((x) => x.id === bad), "the malformed record is not listed");
        await rejectsWith(vmm.getVm({ ref: bad }), Code.NotFound);
        assert.match(vmmd.output(), /skipping a record from Redis that does not validate/);
        assert.equal((await redis.get(`mvpc:vm:host:${hv.id}:vm:${bad}`)) !== null, true, "nor acted on (recovery would have deleted it)");
        // The moved lease is honoured: DeleteVm waits until it expires.
        assert.equal((await vmm.deleteVm({ ref: "old", vpc: "app" })).deleted, true);
        assertConsistent(await holdings(), "after deleting the moved VM");
        assert.equal(await redis.exists(`mvpc:vm:host:${hv.id}:vm:${v.id}`), 0, "the delete takes the tombstone");
        assert.deepEqual(
          [await redis.hget(`mvpc:vm:vpc:${v.vpcId}:byname`, "old"), await redis.hget(`mvpc:{${v.vpcId}}:vm:byname`, "old")],
          [null, null],
          "and both name entries",
        );
      } finally {
        await redis.del(`mvpc:vm:host:${hv.id}:vm:${bad}`);
        await redis.srem(`mvpc:vm:host:${hv.id}`, bad);
      }
    },
  );

  test("vmm SIGKILLed at random points of 50 creates: after restart every VM is fully up or fully gone", async () => {
    let killed = 0;
    for (let i = 0; i < 50; i++) {
      const p = vmm.createVm({ name: `k${i}`, vpc: "app", subnet: "web", securityGroups: ["web"] }).catch((e) => e);
      if (i % 3 === 0) {
        // Kill somewhere inside the create: its steps take tens of milliseconds.
        await sleep(Math.floor(Math.random() * 120));
        await vmmd.stop("SIGKILL");
        killed++;
        await p;
        await startVmm();
      } else {
        const r = await p;
        assert.ok(!(r instanceof ConnectError), `create k${i} without a kill: ${r}`);
      }
    }
    assert.ok(killed >= 15);
    const x = await holdings();
    assertConsistent(x, "after the kills");
    const vms = (await vmm.listVms({})).vms;
    assert.ok(
      vms.every((v) => v.state === VmState.RUNNING),
      "no VM half-made",
    );
    assert.ok(vms.length >= 33, `the creates that were not killed are up (${vms.length})`);
    assert.equal(
      await redis.scard(`mvpc:{host:${h.hosts[0].id}}:vms:unsettled`),
      0,
      "the set of VMs to recover is empty: each record settled took its entry with it",
    );
    for (const v of vms) await vmm.deleteVm({ ref: v.id });
    assertConsistent(await holdings(), "after deleting them all");
  });
});
