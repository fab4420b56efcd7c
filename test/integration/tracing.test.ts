// Request ids, traces and spans across real daemons (tracing.ts): an OTLP/HTTP
// receiver in this test collects what ipam, netagent, firewall, gateway and
// the vmm export; one CreateVm (kind=netns) is one trace through all five,
// the daemons' RPC spans under the vmm's step spans, and one request id on
// every daemon's log lines for it. A vmm without an endpoint loads no SDK and
// exports nothing, and still passes the request id and the caller's
// traceparent on.
import assert from "node:assert/strict";
import { createServer, type Server } from "node:http";
import { join } from "node:path";
import { afterAll, beforeAll, describe, test } from "vitest";
import { Direction, FirewallService, Protocol } from "../../gen/microvpc/v1/firewall_pb.js";
import { SubnetType } from "../../gen/microvpc/v1/subnet_pb.js";
import { VmKind, VmService } from "../../gen/microvpc/v1/vm_pb.js";
import { grpcClient } from "../../services/common/client.js";
import { BUILD } from "../../services/common/version.js";
import { ROOT, type Daemon } from "../lib/daemon.js";
import { Harness, type Hypervisor } from "../lib/harness.js";
import { tempDir, waitFor } from "../lib/netns.js";

interface Span {
  path: string;
  service: string;
  resource: Record<string, unknown>;
  traceId: string;
  spanId: string;
  parentSpanId: string;
  name: string;
  attributes: Record<string, unknown>;
}

type AnyValue = { stringValue?: string; intValue?: number | string; boolValue?: boolean; doubleValue?: number };
type KeyValue = { key: string; value: AnyValue };

function attrs(list: KeyValue[] | undefined): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const { key, value } of list ?? []) {
    out[key] = value.stringValue ?? (value.intValue !== undefined ? Number(value.intValue) : (value.boolValue ?? value.doubleValue));
  }
  return out;
}

/** Every OTLP/HTTP request the receiver got: path and content type, and the spans of the JSON ones. */
const requests: { path: string; contentType: string }[] = [];
const spans: Span[] = [];
let receiver: Server;
let endpoint: string;

function startReceiver(): Promise<void> {
  receiver = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      const path = req.url ?? "";
      const contentType = req.headers["content-type"] ?? "";
      requests.push({ path, contentType });
      if (contentType.startsWith("application/json")) {
        const body = JSON.parse(Buffer.concat(chunks).toString("utf8")) as {
          resourceSpans?: {
            resource?: { attributes?: KeyValue[] };
            scopeSpans?: { spans?: { traceId: string; spanId: string; parentSpanId?: string; name: string; attributes?: KeyValue[] }[] }[];
          }[];
        };
        for (const rs of body.resourceSpans ?? []) {
          const resource = attrs(rs.resource?.attributes);
          for (const ss of rs.scopeSpans ?? []) {
            for (const s of ss.spans ?? []) {
              spans.push({
                path,
                service: String(resource["service.name"]),
                resource,
                traceId: s.traceId,
                spanId: s.spanId,
                parentSpanId: s.parentSpanId ?? "",
                name: s.name,
                attributes: attrs(s.attributes),
              });
            }
          }
        }
      }
      res.writeHead(200, { "content-type": "application/json" });
      res.end("{}");
    });
  });
  return new Promise((resolve) => {
    receiver.listen(0, "127.0.0.1", () => {
      const a = receiver.address();
      endpoint = `http://127.0.0.1:${typeof a === "object" && a ? a.port : 0}`;
      resolve();
    });
  });
}

const HOOK = join(ROOT, "test", "lib", "module-trace.mjs");
const DEBUG = ["--log-level", "debug"];
const DAEMONS = ["microvpc-vmm", "microvpc-ipam", "microvpc-netagent", "microvpc-firewall", "microvpc-gateway"];

let h: Harness;
let hv: Hypervisor;
let fwd: Daemon, gwd: Daemon, vmmd: Daemon;
const stateDir = tempDir("trace-vmm-state");
const saved: Record<string, string | undefined> = {};

async function startVmm(extra: string[], env: Record<string, string> = {}): Promise<Daemon> {
  return h.vmm(hv, { fwd, gwd, args: [...DEBUG, ...extra], env: { MICROVPC_STATE_DIR: stateDir, ...env }, daemon: { nodeArgs: ["--import", HOOK] } });
}

/** The JSON log lines of a daemon that carry this request id. */
function linesOf(d: Daemon, reqId: string): Record<string, unknown>[] {
  return d
    .output()
    .split("\n")
    .filter((l) => l.startsWith("{"))
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .filter((l) => l.reqId === reqId);
}

function daemons(): [string, Daemon][] {
  return [
    ["vmm", vmmd],
    ["ipam", h.ipamDaemon],
    ["netagent", hv.daemon],
    ["firewall", fwd],
    ["gateway", gwd],
  ];
}

/** Each daemon's log lines for this request id: at least one, each with the host id and the version. */
function assertLogged(reqId: string, traceId: string | undefined): void {
  for (const [name, d] of daemons()) {
    const lines = linesOf(d, reqId);
    assert.ok(lines.length > 0, `${name} logged lines with reqId ${reqId}:\n${d.output().slice(-3000)}`);
    for (const l of lines) {
      assert.equal(l.version, BUILD.version, `${name}: version on every line`);
      assert.equal(typeof l.hostId, "string", `${name}: hostId on every line`);
      if (name !== "ipam") assert.equal(l.hostId, hv.id, `${name}: its --host-id`);
      if (traceId) assert.equal(l.traceId, traceId, `${name}: the trace id on the line`);
    }
  }
}

const STEP_RPCS: Record<string, [string, string]> = {
  ipam: ["microvpc-ipam", "microvpc.v1.IpamService/Allocate"],
  netagent: ["microvpc-netagent", "microvpc.v1.NetAgentService/AttachNic"],
  firewall: ["microvpc-firewall", "microvpc.v1.FirewallService/BindNic"],
  gateway: ["microvpc-gateway", "microvpc.v1.GatewayService/SetInstanceMetadata"],
  dns: ["microvpc-ipam", "microvpc.v1.DnsService/SetDnsRecord"],
};

/** The trace of the CreateVm of VM `name`: waits until the vmm's and every step RPC's spans are in. */
async function createTrace(name: string): Promise<Span[]> {
  let trace: Span[] = [];
  const ok = await waitFor(
    () => {
      const root = spans.find((s) => s.service === "microvpc-vmm" && s.name === "CreateVm" && s.attributes["microvpc.vm.name"] === name);
      if (!root) return false;
      trace = spans.filter((s) => s.traceId === root.traceId);
      return (
        Object.values(STEP_RPCS).every(([svc, rpc]) => trace.some((s) => s.service === svc && s.name === rpc)) && trace.some((s) => s.name === "step boot")
      );
    },
    { timeoutMs: 20_000 },
  );
  assert.ok(ok, `the spans of CreateVm ${name} arrived: ${JSON.stringify(trace.map((s) => `${s.service} ${s.name}`))}`);
  return trace;
}

beforeAll(async () => {
  await startReceiver();
  // The daemons the harness starts inherit these: the standard variables.
  for (const k of ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_BSP_SCHEDULE_DELAY"]) saved[k] = process.env[k];
  process.env.OTEL_EXPORTER_OTLP_ENDPOINT = endpoint;
  process.env.OTEL_BSP_SCHEDULE_DELAY = "100";
  h = await Harness.start({ hosts: 1, ipamArgs: DEBUG, agentArgs: DEBUG });
  hv = h.hosts[0];
  ({ fwd, gwd } = await h.hostServices(hv, { firewallArgs: DEBUG, gatewayArgs: DEBUG }));
  const vpc = await h.vpc("app", "10.0.0.0/16");
  await h.subnet(vpc, "web", "10.0.1.0/24", SubnetType.PUBLIC);
  await grpcClient(FirewallService, { address: fwd.address, timeoutMs: 20_000 }).createSecurityGroup({
    vpc: vpc.id,
    name: "web",
    rules: [{ direction: Direction.INGRESS, protocol: Protocol.TCP, portFrom: 80, portTo: 80, peer: { case: "cidr", value: "10.0.0.0/16" } }],
  });
  // The vmm by the flag (a base URL with a path of its own, so its spans can be told apart), the others by the variable.
  vmmd = await startVmm(["--otlp-endpoint", `${endpoint}/via-flag`]);
});

afterAll(async () => {
  for (const [k, v] of Object.entries(saved)) {
    if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  }
  for (const d of [vmmd, gwd, fwd]) await d?.stop().catch(() => undefined);
  const left = await h?.close();
  receiver?.close();
  assert.deepEqual(left ?? [], []);
});

describe("with an OTLP endpoint", () => {
  test("one CreateVm is one trace through vmm, ipam, netagent, firewall and gateway; RPC spans under the step spans; one request id in every daemon's logs", async () => {
    const vmm = grpcClient(VmService, { address: vmmd.address, timeoutMs: 30_000 });
    const reqId = "trace-it-1";
    const vm = (
      await vmm.createVm({ name: "t1", vpc: "app", subnet: "web", securityGroups: ["web"], kind: VmKind.NETNS }, { headers: { "x-request-id": reqId } })
    ).vm!;
    const trace = await createTrace("t1");
    const traceId = trace[0].traceId;
    assert.match(traceId, /^[0-9a-f]{32}$/);

    // Every daemon took part, under the same trace; the only Allocate so far is this one.
    for (const svc of DAEMONS)
      assert.ok(
        trace.some((s) => s.service === svc),
        `${svc} has spans in the trace`,
      );
    assert.deepEqual(
      spans.filter((s) => s.name === "microvpc.v1.IpamService/Allocate").map((s) => s.traceId),
      [traceId],
    );

    // vmm: server span (a new trace: the caller sent no traceparent) → CreateVm → step spans.
    const server = trace.find((s) => s.service === "microvpc-vmm" && s.name === "microvpc.v1.VmService/CreateVm");
    assert.ok(server, "the vmm's RPC span");
    assert.equal(server.parentSpanId, "", "a root span: the caller sent no traceparent");
    const create = trace.find((s) => s.service === "microvpc-vmm" && s.name === "CreateVm")!;
    assert.equal(create.parentSpanId, server.spanId, "CreateVm under the vmm's RPC span");
    for (const step of ["ipam", "netagent", "firewall", "gateway", "dns", "boot"]) {
      const st = trace.find((s) => s.service === "microvpc-vmm" && s.name === `step ${step}`);
      assert.ok(st, `span step ${step}`);
      assert.equal(st.parentSpanId, create.spanId, `step ${step} under CreateVm`);
      assert.equal(st.attributes["microvpc.vm.id"], vm.id);
      assert.equal(st.attributes["microvpc.op"], "create");
      const rpc = STEP_RPCS[step];
      if (!rpc) continue;
      const child = trace.find((s) => s.service === rpc[0] && s.name === rpc[1]);
      assert.ok(child, `${rpc[0]} span ${rpc[1]}`);
      assert.equal(child.parentSpanId, st.spanId, `${rpc[1]} is a child of step ${step}`);
      const [service, method] = rpc[1].split("/");
      assert.deepEqual(
        [child.attributes["rpc.system"], child.attributes["rpc.service"], child.attributes["rpc.method"], child.attributes["rpc.grpc.status_code"]],
        ["grpc", service, method, 0],
      );
    }

    // Resources: service.name, service.version, host id; the vmm's spans went where its flag said.
    for (const s of trace) {
      assert.equal(s.resource["service.version"], BUILD.version);
      if (s.service !== "microvpc-ipam") assert.equal(s.resource["host.id"], hv.id, `${s.service}: host.id`);
      assert.equal(s.path, s.service === "microvpc-vmm" ? "/via-flag/v1/traces" : "/v1/traces");
    }
    assert.ok(
      spans.some((s) => s.name === "reconcile" && (s.service === "microvpc-firewall" || s.service === "microvpc-gateway")),
      "reconcile passes are spans",
    );
    assertLogged(reqId, traceId);

    // A second CreateVm, without a request id or traceparent: a new trace, and the vmm's new request id downstream.
    let vmmReqId = "";
    await vmm.createVm({ name: "t2", vpc: "app", subnet: "web", kind: VmKind.NETNS }, { onHeader: (hd) => (vmmReqId = hd.get("x-request-id") ?? "") });
    const trace2 = await createTrace("t2");
    assert.notEqual(trace2[0].traceId, traceId, "a second CreateVm is a second trace");
    assert.match(vmmReqId, /^[0-9a-f-]{36}$/);
    assertLogged(vmmReqId, trace2[0].traceId);

    // A caller's traceparent is continued by the vmm too: its RPC span is the caller's span's child.
    const callerTrace = "0af7651916cd43dd8448eb211c80319c";
    const callerSpan = "b7ad6b7169203331";
    await vmm.createVm({ name: "t4", vpc: "app", subnet: "web", kind: VmKind.NETNS }, { headers: { traceparent: `00-${callerTrace}-${callerSpan}-01` } });
    const trace4 = await createTrace("t4");
    assert.equal(trace4[0].traceId, callerTrace);
    const server4 = trace4.find((s) => s.service === "microvpc-vmm" && s.name === "microvpc.v1.VmService/CreateVm");
    assert.equal(server4?.parentSpanId, callerSpan, "the vmm's RPC span continues the caller's trace");
    for (const svc of DAEMONS)
      assert.ok(
        trace4.some((s) => s.service === svc),
        `${svc} in the caller's trace`,
      );

    // DeleteVm: its span, the undo steps under it.
    for (const n of ["t1", "t2", "t4"]) assert.equal((await vmm.deleteVm({ ref: n, vpc: "app" })).deleted, true);
    assert.ok(
      await waitFor(() => {
        const del = spans.filter((s) => s.service === "microvpc-vmm" && s.name === "DeleteVm");
        return del.length === 3 && del.every((d) => spans.some((s) => s.name === "undo ipam" && s.parentSpanId === d.spanId));
      }),
      "DeleteVm spans with their undo steps",
    );
    assert.ok(/module-loaded .*@opentelemetry\/sdk-trace/.test(vmmd.output()), "a traced vmm loads the SDK (the hook sees it)");
  });
});

describe("without an endpoint", () => {
  test("no SDK loaded, no spans exported; the request id and the caller's traceparent still reach the daemons", async () => {
    await vmmd.stop();
    // Whatever the stopped vmm had buffered was exported at shutdown.
    await new Promise((r) => setTimeout(r, 500));
    const vmmSpans = spans.filter((s) => s.service === "microvpc-vmm").length;
    vmmd = await startVmm([], { OTEL_EXPORTER_OTLP_ENDPOINT: "" });
    const vmm = grpcClient(VmService, { address: vmmd.address, timeoutMs: 30_000 });
    const reqId = "trace-it-3";
    const traceId = "4bf92f3577b34da6a3ce929d0e0e4736";
    const parent = "00f067aa0ba902b7";
    await vmm.createVm(
      { name: "t3", vpc: "app", subnet: "web", kind: VmKind.NETNS },
      { headers: { "x-request-id": reqId, traceparent: `00-${traceId}-${parent}-01` } },
    );
    // The daemons continue the caller's trace: the vmm passed the traceparent on as it came.
    assert.ok(
      await waitFor(() =>
        Object.values(STEP_RPCS).every(([svc, rpc]) =>
          spans.some((s) => s.service === svc && s.name === rpc && s.traceId === traceId && s.parentSpanId === parent),
        ),
      ),
      `the daemons' spans continue the caller's trace: ${JSON.stringify(spans.filter((s) => s.traceId === traceId).map((s) => `${s.service} ${s.name}`))}`,
    );
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(spans.filter((s) => s.service === "microvpc-vmm").length, vmmSpans, "the vmm exported nothing");
    // @opentelemetry/api alone is loaded anyway (prom-client's process metrics require it); no SDK, exporter or resource package is.
    const loaded = vmmd
      .output()
      .split("\n")
      .filter((l) => l.startsWith("module-loaded ") && !l.includes("/node_modules/@opentelemetry/api/"));
    assert.deepEqual(loaded, [], "the vmm loaded no OpenTelemetry SDK module");
    assertLogged(reqId, traceId);
    assert.equal((await vmm.deleteVm({ ref: "t3", vpc: "app" })).deleted, true);
    assert.ok(requests.every((r) => r.contentType.startsWith("application/json")));
  });
});
