// Flow logs with real packets: the firewall daemon runs with --flow-logs for
// one NIC (web1), a blocked probe and an allowed TCP connection to it each
// appear once in <dir>/<host>.jsonl with their tuple, action and deciding
// rule; a NIC outside the scope (quiet) logs nothing.
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, test } from "vitest";
import { Direction, FirewallService, Protocol } from "../../gen/microvpc/v1/firewall_pb.js";
import { grpcClient } from "../../services/common/client.js";
import type { FlowRecord } from "../../services/firewall/flowlogs.js";
import { startDaemon, type Daemon } from "../lib/daemon.js";
import { Harness, type Vm } from "../lib/harness.js";
import { nsExec, sleep, startTcpServer, tcpConnect, tcpProbe, tempDir, trackChild, waitFor } from "../lib/netns.js";

let h: Harness;
let fwd: Daemon;
let fw: ReturnType<typeof grpcClient<typeof FirewallService>>;
let client: Vm, web1: Vm, quiet: Vm;
let webSg: string;
let dir: string;
/** Records written before the test (the setup's probes). */
let skip = 0;

const records = (): FlowRecord[] => {
  const p = join(dir, `${h.hosts[0].id}.jsonl`);
  if (!existsSync(p)) return [];
  return readFileSync(p, "utf8")
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as FlowRecord);
};

beforeAll(async () => {
  h = await Harness.start({ hosts: 1, underlay: false });
  const vpc = await h.vpc("logs", "10.0.0.0/16");
  const sub = await h.subnet(vpc, "a", "10.0.1.0/24");
  client = await h.vm(0, vpc, sub, "client");
  web1 = await h.vm(0, vpc, sub, "web1");
  quiet = await h.vm(0, vpc, sub, "quiet");
  for (const vm of [web1, quiet]) for (const port of [22, 80]) await startTcpServer(vm.ns, port, vm.name);
  // Closed TCP flows leave conntrack at once in this test's VPC namespace (not 120 s of TIME_WAIT), so their DESTROY comes soon.
  await nsExec(client.vpcNs, "sysctl", [
    "-qw",
    "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1",
    "net.netfilter.nf_conntrack_tcp_timeout_close=1",
    "net.netfilter.nf_conntrack_tcp_timeout_fin_wait=1",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait=1",
    "net.netfilter.nf_conntrack_tcp_timeout_last_ack=1",
  ]);
  dir = tempDir("flowlogs");
  fwd = await startDaemon("firewall", [
    "--redis",
    h.redis.url,
    "--host-id",
    h.hosts[0].id,
    "--drift-interval-ms",
    "2000",
    "--flow-logs",
    dir,
    "--flow-logs-scope",
    web1.nicId,
    "--flow-logs-aggregate-ms",
    "3000",
  ]);
  trackChild(fwd.proc);
  fw = grpcClient(FirewallService, { address: fwd.address, timeoutMs: 20_000 });
  webSg = (
    await fw.createSecurityGroup({
      vpc: vpc.id,
      name: "web",
      rules: [{ direction: Direction.INGRESS, protocol: Protocol.TCP, portFrom: 80, portTo: 80, peer: { case: "cidr", value: "10.0.0.0/16" } }],
    })
  ).securityGroup!.id;
  for (const vm of [client, web1, quiet]) {
    await fw.bindNic({
      nicId: vm.nicId,
      vpc: vm.vpc.id,
      subnet: vm.subnet.id,
      address: vm.address,
      mac: vm.mac,
      hostInterface: vm.hostInterface,
      securityGroups: vm === client ? [] : [webSg],
    });
  }
  // The readers start after the pass that applied the bindings.
  // (Probed through quiet, which logs nothing, so the test's records are the test's alone.)
  assert.ok(await waitFor(() => tcpProbe(client.ns, quiet.address, 80), { timeoutMs: 10_000, intervalMs: 300 }), "quiet:80 reachable");
  await sleep(3000);
  skip = records().length;
}, 180_000);

afterAll(async () => {
  await fwd?.stop();
  await h?.close();
});

describe("flow logs", () => {
  test("an allowed connection and a blocked probe each appear once, a NIC outside the scope logs nothing", async () => {
    assert.equal(await tcpConnect(client.ns, web1.address, 80), "connected");
    assert.equal(await tcpConnect(client.ns, web1.address, 22, 2500), "timeout");
    // The same for the NIC without flow logs.
    assert.equal(await tcpConnect(client.ns, quiet.address, 80), "connected");
    assert.equal(await tcpConnect(client.ns, quiet.address, 22, 2500), "timeout");

    const mine = () => records().slice(skip);
    const got = await waitFor(
      () => mine().some((r) => r.action === "accept" && r.dport === 80) && mine().some((r) => r.action === "reject" && r.dport === 22),
      { timeoutMs: 20_000, intervalMs: 500 },
    );
    if (!got) {
      const ulog = join(dir, `.ulogd-${web1.vpcNs}.log`);
      const nft = await nsExec(web1.vpcNs, "nft", ["list", "table", "inet", "microvpc"], { check: false });
      assert.fail(`records: ${JSON.stringify(records())}\nulogd: ${existsSync(ulog) ? readFileSync(ulog, "utf8") : "no log"}\n${nft.stdout}`);
    }
    await sleep(3000); // anything that would be a second record has come by now
    const recs = mine();
    const accepted = recs.filter((r) => r.action === "accept" && r.src === client.address && r.dst === web1.address && r.dport === 80);
    const rejected = recs.filter((r) => r.action === "reject" && r.src === client.address && r.dst === web1.address && r.dport === 22);
    assert.equal(accepted.length, 1, JSON.stringify(recs));
    assert.equal(rejected.length, 1, JSON.stringify(recs));
    const a = accepted[0];
    assert.equal(a.nic, web1.nicId);
    assert.equal(a.vpc, web1.vpc.id);
    assert.equal(a.proto, "tcp");
    assert.ok(a.sport > 1023);
    assert.ok(a.packets >= 3 && a.bytes > 0, `counts ${a.packets}/${a.bytes}`);
    assert.equal(a.decided_by, `${webSg}#1`);
    assert.ok(Date.parse(a.start) <= Date.parse(a.end));
    const r = rejected[0];
    assert.equal(r.nic, web1.nicId);
    assert.equal(r.proto, "tcp");
    assert.equal(r.decided_by, "sg-default-deny");
    assert.ok(r.packets >= 1);
    // Nothing of quiet's flows.
    assert.deepEqual(
      recs.filter((x) => x.src === quiet.address || x.dst === quiet.address),
      [],
    );
  }, 60_000);
});
