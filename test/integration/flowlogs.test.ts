// Flow logs with real packets: the firewall daemon runs with --flow-logs for
// one NIC (web1), a blocked probe and an allowed TCP connection to it each
// appear once in <dir>/<host>.jsonl with their tuple, action and deciding
// rule; a NIC outside the scope (quiet) logs nothing.
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { Code } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, test } from "vitest";
import { Direction, FirewallService, Protocol } from "../../gen/microvpc/v1/firewall_pb.js";
import { grpcClient } from "../../services/common/client.js";
import type { FlowRecord } from "../../services/firewall/flowlogs.js";
import { cliRunner } from "../lib/cli.js";
import { rejectsWith } from "../lib/clients.js";
import { startDaemon, type Daemon } from "../lib/daemon.js";
import { Harness, type Vm, bindRequest } from "../lib/harness.js";
import { nsExec, sleep, startTcpServer, tcpConnect, tcpProbe, tempDir, trackChild, waitFor } from "../lib/netns.js";

let h: Harness;
let fwd: Daemon;
let fw: ReturnType<typeof grpcClient<typeof FirewallService>>;
let client: Vm, web1: Vm, quiet: Vm;
let webSg: string;
let dir: string;
/** Records written before the test (the setup's probes). */
let skip = 0;

const cli = cliRunner(() => ["--firewall", fwd.address], 60_000);

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
    await fw.bindNic(bindRequest(vm, vm === client ? [] : [webSg]));
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
    // The kernel reports a flow's end when it reaps the expired entry (its gc
    // runs every few seconds to a minute); listing the table reaps expired
    // entries at once, so the wait here is short.
    const got = await waitFor(
      async () => {
        await nsExec(client.vpcNs, "conntrack", ["-L"], { check: false });
        return mine().some((r) => r.action === "accept" && r.dport === 80) && mine().some((r) => r.action === "reject" && r.dport === 22);
      },
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

  test("ListFlowLogs filters on the server; the CLI reads it; bad requests are INVALID_ARGUMENT with the field", async () => {
    const rejects = await fw.listFlowLogs({ nicIds: [web1.nicId], action: "reject" });
    assert.ok(rejects.records.length >= 1);
    assert.ok(rejects.records.every((r) => r.action === "reject" && r.nicId === web1.nicId));
    assert.equal(rejects.records.at(-1)!.decidedBy, "sg-default-deny");
    assert.deepEqual((await fw.listFlowLogs({ nicIds: [quiet.nicId] })).records, []);
    assert.equal((await fw.listFlowLogs({ limit: 1 })).records.length, 1);
    const out = await cli.json(["flow-logs", "--nic", web1.nicId, "--action", "accept", "--since", "5m"]);
    assert.ok(out.records.length >= 1 && out.records.every((r: { action: string }) => r.action === "accept"), JSON.stringify(out));
    await rejectsWith(fw.listFlowLogs({ action: "drop" }), Code.InvalidArgument, /^action: "drop": use "accept", "reject"/);
    await rejectsWith(fw.listFlowLogs({ nicIds: ["web1"] }), Code.InvalidArgument, /^nic_ids\[0\]: "web1" is not a NIC id/);
    await rejectsWith(fw.listFlowLogs({ limit: 5000 }), Code.InvalidArgument, /^limit: 5000: at most 1000/);
    const bad = await cli.run(["flow-logs", "--since", "5 minutes"]);
    assert.notEqual(bad.code, 0);
    assert.match(bad.stderr, /a duration like 90s, 5m/);
  }, 60_000);
});
