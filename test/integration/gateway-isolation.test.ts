// One VPC's failure stays its own: the gateway applies each VPC in its own
// try. A device planted in one VPC's namespace (where the gateway's transit
// link goes) makes that VPC's apply fail; it is counted (applies_total
// result=error) and retried, and meanwhile another VPC on the same host gets
// a new floating IP with real packets. Once the device is gone the failed
// VPC converges again. A VPC that leaves frees its transit index for the
// next one. The metadata/DNS child, killed, is restarted while the gateway's
// health says NOT_SERVING.
import assert from "node:assert/strict";
import { afterAll, beforeAll, describe, test } from "vitest";
import { readdirSync, readFileSync } from "node:fs";
import { Health, HealthCheckResponse_ServingStatus as Status } from "../../gen/grpc/health/v1/health_pb.js";
import { GatewayService } from "../../gen/microvpc/v1/gateway_pb.js";
import { SubnetType } from "../../gen/microvpc/v1/subnet_pb.js";
import { grpcClient } from "../../services/common/client.js";
import { names } from "../../services/gateway/plan.js";
import { gwKeys } from "../../services/gateway/schema.js";
import { type Daemon } from "../lib/daemon.js";
import { Harness, type Vm } from "../lib/harness.js";
import { httpGet, ipn, waitFor } from "../lib/netns.js";

let h: Harness;
let gwd: Daemon;
let gw: ReturnType<typeof grpcClient<typeof GatewayService>>;
let inet: { ns: string; address: string };
let a: Vm, b: Vm;
let hostAddr: string;

async function eventually(probe: () => Promise<boolean>, what: string, timeoutMs = 15_000): Promise<void> {
  assert.ok(await waitFor(probe, { timeoutMs, intervalMs: 250 }), what);
}

const whoami = (vm: Vm) => httpGet(vm.ns, `http://${inet.address}/`, 1500);

/** microvpc_gateway_applies_total{where="vpc",result="error"} of the gateway. */
async function vpcErrors(): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${gwd.metricsPort}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith("microvpc_gateway_applies_total{") && l.includes('where="vpc"') && l.includes('result="error"'));
  return line ? Number(line.split(" ").pop()) : 0;
}

beforeAll(async () => {
  h = await Harness.start({ hosts: 1 });
  const hv = h.hosts[0];
  hostAddr = hv.underlayAddress;
  inet = await h.internet();
  ({ gwd } = await h.hostServices(hv, { driftMs: 2000 }));
  gw = grpcClient(GatewayService, { address: gwd.address, timeoutMs: 20_000 });
  const va = await h.vpc("iso-a", "10.20.0.0/16");
  const vb = await h.vpc("iso-b", "10.21.0.0/16");
  a = await h.vm(0, va, await h.subnet(va, "s", "10.20.1.0/24", SubnetType.PUBLIC), "isoa");
  b = await h.vm(0, vb, await h.subnet(vb, "s", "10.21.1.0/24", SubnetType.PUBLIC), "isob");
});

afterAll(async () => {
  await gwd?.stop();
  const left = await h?.close();
  assert.deepEqual(left ?? [], []);
});

describe("gateway: one VPC's failure does not freeze the others", () => {
  test("a VPC whose transit link cannot be made fails alone; another VPC's floating IP works meanwhile; the failed one recovers", async () => {
    await eventually(async () => (await whoami(a)) === hostAddr && (await whoami(b)) === hostAddr, "both VPCs reach the internet");
    const errorsBefore = await vpcErrors();

    // Break A: its transit link gone (the drift pass recreates it) and a
    // device with the name of the link's VPC end planted in A's namespace.
    const vpcSide = names.vpcSide(a.vpc.id);
    await ipn(a.host.ns, ["link", "del", names.hostSide(a.vpc.id)]);
    await ipn(a.vpcNs, ["link", "add", vpcSide, "type", "bridge"]);
    await eventually(async () => (await vpcErrors()) > errorsBefore, "A's failed apply is counted (result=error)");
    assert.equal(await whoami(a), null, "A has no way out while its transit link cannot be made");

    // B converges meanwhile: a new floating IP, with real packets.
    const fip = (await gw.allocateFloatingIp({})).floatingIp!;
    await gw.associateFloatingIp({ floatingIp: fip.id, vpc: b.vpc.id, privateAddress: b.address });
    await eventually(async () => (await whoami(b)) === fip.address, "B's egress leaves as its new floating IP while A keeps failing");
    const once = await vpcErrors();
    await eventually(async () => (await vpcErrors()) > once, "A is retried (and fails again) while B converges");

    // The planted device removed: A is retried and works again; B unchanged.
    await ipn(a.vpcNs, ["link", "del", vpcSide]);
    await eventually(async () => (await whoami(a)) === hostAddr, "A converges again after its retry");
    assert.equal(await whoami(b), fip.address);
    await gw.disassociateFloatingIp({ floatingIp: fip.id });
    await gw.releaseFloatingIp({ floatingIp: fip.id });
  });

  test("a VPC that leaves the host frees its transit index; the next VPC to arrive reuses it and works", async () => {
    const redis = await h.connectReady();
    try {
      const key = gwKeys(redis).transit(a.host.id);
      const old = Number(await redis.hget(key, a.vpc.id));
      assert.ok(Number.isInteger(old), "A holds a transit index");
      await h.removeVm(a);
      await a.host.agent.deleteVpc({ vpc: a.vpc.id });
      await eventually(async () => (await redis.hget(key, a.vpc.id)) === null, "A's index is freed once A left the host");
      const vc = await h.vpc("iso-c", "10.22.0.0/16");
      const c = await h.vm(0, vc, await h.subnet(vc, "s", "10.22.1.0/24", SubnetType.PUBLIC), "isoc");
      await eventually(async () => (await whoami(c)) === hostAddr, "C reaches the internet");
      assert.equal(Number(await redis.hget(key, vc.id)), old, "C reuses A's index");
      assert.equal(await whoami(b), hostAddr, "B unaffected");
    } finally {
      redis.disconnect();
    }
  });
});

/** Children of a process (every thread's), from /proc. */
function childrenOf(pid: number): number[] {
  const out: number[] = [];
  for (const t of readdirSync(`/proc/${pid}/task`)) {
    try {
      out.push(...readFileSync(`/proc/${pid}/task/${t}/children`, "utf8").split(/\s+/).filter(Boolean).map(Number));
    } catch {
      // thread gone
    }
  }
  return out;
}

/** The gateway's metadata/DNS child (`microvpcd imds` inside --host-netns). */
function imdsChild(): number | undefined {
  return childrenOf(gwd.proc.pid!).find((p) => {
    try {
      return readFileSync(`/proc/${p}/cmdline`, "utf8").split("\0").includes("imds");
    } catch {
      return false;
    }
  });
}

describe("gateway: its metadata child", () => {
  test("killed, it is restarted; health goes NOT_SERVING until it is back, then SERVING, and the metadata service answers again", async () => {
    const health = grpcClient(Health, { address: gwd.address, timeoutMs: 2000 });
    const vm = b;
    await gw.setInstanceMetadata({
      metadata: { instanceId: "i-isob", vpcId: vm.vpc.id, subnetId: vm.subnet.id, localIpv4: vm.address, mac: vm.mac, hostname: "isob" },
    });
    const meta = () => httpGet(vm.ns, "http://169.254.169.254/latest/meta-data/instance-id", 1500);
    await eventually(async () => (await meta()) === "i-isob", "the metadata service answers");
    assert.equal((await health.check({})).status, Status.SERVING);
    const pid = imdsChild();
    assert.ok(pid, "the gateway has its metadata child");

    const seen: Status[] = [];
    let watching = true;
    const watcher = (async () => {
      while (watching) {
        const s = (await health.check({}).catch(() => undefined))?.status;
        if (s !== undefined && s !== seen.at(-1)) seen.push(s);
        await new Promise((r) => setTimeout(r, 50));
      }
    })();
    process.kill(pid, "SIGKILL");
    await eventually(async () => seen.includes(Status.NOT_SERVING), "NOT_SERVING while the child is down");
    await eventually(async () => seen.at(-1) === Status.SERVING, "SERVING once it is back");
    watching = false;
    await watcher;
    assert.deepEqual(seen, [Status.SERVING, Status.NOT_SERVING, Status.SERVING]);
    const again = imdsChild();
    assert.ok(again && again !== pid, "a new child");
    await eventually(async () => (await meta()) === "i-isob", "the metadata service answers again");
  });
});
