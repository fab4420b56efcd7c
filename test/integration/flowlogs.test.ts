// Flow logs with real packets: the firewall daemon runs with --flow-logs and
// the FlowLogConfig API says which NICs log (web1 by NIC, subnet b by
// subnet). A blocked probe and an allowed TCP connection to web1 each
// appear once in <dir>/<host>.jsonl with their tuple, action, deciding rule
// and VM; a probe the subnet's network ACL denies and a packet web1 sends
// from a forged address are logged with the ACL rule and "antispoof"; a NIC
// outside every configuration (quiet) logs nothing, until a configuration
// made while the daemon was down covers it: the restarted daemon reads it.
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, test } from "vitest";
import { AclAction, Direction, FirewallService, NetworkAclEntrySchema, Protocol } from "../../gen/microvpc/v1/firewall_pb.js";
import { grpcClient } from "../../services/common/client.js";
import { FlowLogConfigStore } from "../../services/firewall/flowlog-config.js";
import { FLOW_LOG_GROUP, type FlowRecord } from "../../services/firewall/flowlogs.js";
import { cliRunner } from "../lib/cli.js";
import { rejectsWith } from "../lib/clients.js";
import type { Daemon } from "../lib/daemon.js";
import { Harness, type Vm, bindRequest } from "../lib/harness.js";
import { ipn, nicChain, nicChainText, nsExec, sleep, startTcpServer, tcpConnect, tcpProbe, tempDir, waitFor } from "../lib/netns.js";

let h: Harness;
let fwd: Daemon;
let fw: ReturnType<typeof grpcClient<typeof FirewallService>>;
let client: Vm, web1: Vm, quiet: Vm, db: Vm;
let webSg: string;
let aclId: string;
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
const mine = () => records().slice(skip);

const startFirewall = async () => {
  fwd = await h.firewall(0, { driftMs: 2000, args: ["--flow-logs", dir, "--flow-logs-aggregate-ms", "3000"] });
  fw = grpcClient(FirewallService, { address: fwd.address, timeoutMs: 20_000 });
};

/** Waits (bounded) until `ok` holds of the new records; reaping expired conntrack entries at once (listing does) so DESTROY comes soon. */
const recordsUntil = async (ok: (rs: FlowRecord[]) => boolean, what: string) => {
  const got = await waitFor(
    async () => {
      await nsExec(client.vpcNs, "conntrack", ["-L"], { check: false });
      return ok(mine());
    },
    { timeoutMs: 20_000, intervalMs: 500 },
  );
  if (!got) {
    const ulog = join(dir, `.ulogd-${web1.vpcNs}.log`);
    const nft = await nsExec(web1.vpcNs, "nft", ["list", "ruleset"], { check: false });
    assert.fail(`${what}: records ${JSON.stringify(mine())}\nulogd: ${existsSync(ulog) ? readFileSync(ulog, "utf8") : "no log"}\n${nft.stdout}`);
  }
};

const aclEntry = (n: number, dir: Direction, action: AclAction, protocol: Protocol, port: number) =>
  create(NetworkAclEntrySchema, { ruleNumber: n, direction: dir, action, protocol, portFrom: port, portTo: port, cidr: "0.0.0.0/0" });

beforeAll(async () => {
  h = await Harness.start({ hosts: 1, underlay: false });
  const vpc = await h.vpc("logs", "10.0.0.0/16");
  const a = await h.subnet(vpc, "a", "10.0.1.0/24");
  const b = await h.subnet(vpc, "b", "10.0.2.0/24");
  client = await h.vm(0, vpc, a, "client");
  web1 = await h.vm(0, vpc, a, "web1");
  quiet = await h.vm(0, vpc, a, "quiet");
  db = await h.vm(0, vpc, b, "db");
  for (const vm of [web1, quiet]) for (const port of [22, 80]) await startTcpServer(vm.ns, port, vm.name);
  for (const port of [23, 80]) await startTcpServer(db.ns, port, db.name);
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
  await startFirewall();
  webSg = (
    await fw.createSecurityGroup({
      vpc: vpc.id,
      name: "web",
      rules: [
        { direction: Direction.INGRESS, protocol: Protocol.TCP, portFrom: 80, portTo: 80, peer: { case: "cidr", value: "10.0.0.0/16" } },
        { direction: Direction.INGRESS, protocol: Protocol.TCP, portFrom: 23, portTo: 23, peer: { case: "cidr", value: "10.0.0.0/16" } },
      ],
    })
  ).securityGroup!.id;
  // Subnet b's ACL denies telnet, whatever the groups allow (they allow it).
  aclId = (
    await fw.createNetworkAcl({
      vpc: vpc.id,
      name: "no-telnet",
      entries: [
        aclEntry(100, Direction.INGRESS, AclAction.DENY, Protocol.TCP, 23),
        aclEntry(200, Direction.INGRESS, AclAction.ALLOW, Protocol.ALL, 0),
        aclEntry(100, Direction.EGRESS, AclAction.ALLOW, Protocol.ALL, 0),
      ],
      subnets: [b.id],
    })
  ).networkAcl!.id;
  for (const vm of [client, web1, quiet, db]) await fw.bindNic(bindRequest(vm, vm === client ? [] : [webSg]));
  await fw.createFlowLogConfig({ resourceId: web1.nicId, description: "web1 only" });
  await fw.createFlowLogConfig({ resourceId: b.id, sampleRate: 1 });
  // The readers start after the pass that applied the configs (probed through quiet, which logs nothing, so the test's records are the test's alone).
  assert.ok(await waitFor(() => tcpProbe(client.ns, quiet.address, 80), { timeoutMs: 10_000, intervalMs: 300 }), "quiet:80 reachable");
  assert.ok(
    await waitFor(async () => (await nsExec(web1.vpcNs, "nft", ["list", "table", "bridge", "microvpc"], { check: false })).stdout.includes("antispoof"), {
      timeoutMs: 10_000,
      intervalMs: 300,
    }),
    "the configs are applied",
  );
  await sleep(3000);
  skip = records().length;
}, 180_000);

afterAll(async () => {
  await fwd?.stop();
  await h?.close();
});

describe("flow logs", () => {
  test("an allowed connection and a blocked probe each appear once with their VM; an ACL-denied probe and a spoofed packet name what decided; a NIC outside every config logs nothing", async () => {
    assert.equal(await tcpConnect(client.ns, web1.address, 80), "connected");
    assert.equal(await tcpConnect(client.ns, web1.address, 22, 2500), "timeout");
    // The ACL decides db:23 (its group allows it); db:80 passes.
    assert.equal(await tcpConnect(client.ns, db.address, 23, 2500), "timeout");
    assert.equal(await tcpConnect(client.ns, db.address, 80), "connected");
    // The same for the NIC without flow logs.
    assert.equal(await tcpConnect(client.ns, quiet.address, 80), "connected");
    assert.equal(await tcpConnect(client.ns, quiet.address, 22, 2500), "timeout");
    // web1 forges its source: the neighbour entry is static, so the forged packet itself leaves (its ARP would be dropped first).
    await ipn(web1.ns, ["neigh", "replace", client.address, "lladdr", client.mac, "dev", "eth0"]);
    await ipn(web1.ns, ["addr", "add", "10.0.1.199/24", "dev", "eth0"]);
    try {
      const r = await nsExec(web1.ns, "ping", ["-c", "2", "-i", "0.2", "-W", "1", "-I", "10.0.1.199", client.address], { check: false });
      assert.match(r.stdout, / 0 received/, "the spoofed packets do not get through");
    } finally {
      await ipn(web1.ns, ["addr", "del", "10.0.1.199/24", "dev", "eth0"]);
    }

    await recordsUntil(
      (rs) =>
        rs.some((r) => r.action === "accept" && r.dport === 80 && r.dst === web1.address) &&
        rs.some((r) => r.action === "reject" && r.dport === 22) &&
        rs.some((r) => r.action === "reject" && r.dport === 23) &&
        rs.some((r) => r.decided_by === "antispoof"),
      "web1's, db's and the spoofed records",
    );
    await sleep(3000); // anything that would be a second record has come by now
    const recs = mine();
    const accepted = recs.filter((r) => r.action === "accept" && r.src === client.address && r.dst === web1.address && r.dport === 80);
    const rejected = recs.filter((r) => r.action === "reject" && r.src === client.address && r.dst === web1.address && r.dport === 22);
    assert.equal(accepted.length, 1, JSON.stringify(recs));
    assert.equal(rejected.length, 1, JSON.stringify(recs));
    const a = accepted[0];
    assert.equal(a.nic, web1.nicId);
    assert.equal(a.vm, web1.owner);
    assert.equal(a.vpc, web1.vpc.id);
    assert.equal(a.proto, "tcp");
    assert.ok(a.sport > 1023);
    assert.ok(a.packets >= 3 && a.bytes > 0, `counts ${a.packets}/${a.bytes}`);
    assert.equal(a.decided_by, `${webSg}#1`);
    assert.ok(Date.parse(a.start) <= Date.parse(a.end));
    const r = rejected[0];
    assert.equal(r.nic, web1.nicId);
    assert.equal(r.vm, web1.owner);
    assert.equal(r.proto, "tcp");
    assert.equal(r.decided_by, "sg-default-deny");
    assert.ok(r.packets >= 1);
    // The ACL's drop: db's NIC (its subnet logs), the entry that denied it, once.
    const denied = recs.filter((x) => x.action === "reject" && x.dst === db.address && x.dport === 23);
    assert.equal(denied.length, 1, JSON.stringify(recs));
    assert.deepEqual([denied[0].nic, denied[0].vm, denied[0].src, denied[0].decided_by], [db.nicId, db.owner, client.address, `${aclId}#100`]);
    assert.equal(recs.filter((x) => x.action === "accept" && x.dst === db.address && x.dport === 80).length, 1, JSON.stringify(recs));
    // The forged packets: web1's NIC, the forged source, one record.
    const spoofed = recs.filter((x) => x.decided_by === "antispoof");
    assert.equal(spoofed.length, 1, JSON.stringify(recs));
    assert.deepEqual(
      [spoofed[0].nic, spoofed[0].src, spoofed[0].dst, spoofed[0].proto, spoofed[0].action],
      [web1.nicId, "10.0.1.199", client.address, "icmp", "reject"],
    );
    // Nothing of quiet's flows.
    assert.deepEqual(
      recs.filter((x) => x.src === quiet.address || x.dst === quiet.address),
      [],
    );
  }, 90_000);

  test("ListFlowLogs filters on the server, by NIC or VM; the CLI reads it; bad requests are INVALID_ARGUMENT with the field", async () => {
    const rejects = await fw.listFlowLogs({ nicIds: [web1.nicId], action: "reject" });
    assert.ok(rejects.records.length >= 1);
    assert.ok(rejects.records.every((r) => r.action === "reject" && r.nicId === web1.nicId));
    const byVm = await fw.listFlowLogs({ vmIds: [db.owner] });
    assert.ok(
      byVm.records.length >= 2 && byVm.records.every((r) => r.vmId === db.owner && r.nicId === db.nicId),
      JSON.stringify(byVm.records.map((r) => [r.nicId, r.vmId, r.dstPort, r.action])),
    );
    assert.deepEqual((await fw.listFlowLogs({ nicIds: [quiet.nicId] })).records, []);
    assert.equal((await fw.listFlowLogs({ limit: 1 })).records.length, 1);
    const out = await cli.json(["flow-logs", "--nic", web1.nicId, "--action", "accept", "--since", "5m"]);
    assert.ok(out.records.length >= 1 && out.records.every((r: { action: string }) => r.action === "accept"), JSON.stringify(out));
    await rejectsWith(fw.listFlowLogs({ action: "drop" }), Code.InvalidArgument, /^action: "drop": use "accept", "reject"/);
    await rejectsWith(fw.listFlowLogs({ nicIds: ["web1"] }), Code.InvalidArgument, /^nic_ids\[0\]: "web1" is not a NIC id/);
    await rejectsWith(fw.listFlowLogs({ vmIds: ["a b"] }), Code.InvalidArgument, /^vm_ids\[0\]: "a b" is not valid/);
    await rejectsWith(fw.listFlowLogs({ limit: 5000 }), Code.InvalidArgument, /^limit: 5000: at most 1000/);
    const bad = await cli.run(["flow-logs", "--since", "5 minutes"]);
    assert.notEqual(bad.code, 0);
    assert.match(bad.stderr, /a duration like 90s, 5m/);
  }, 60_000);

  test("configs: validated, one per resource, sample rate compiled; one made while the firewall is down is applied when it starts, a deleted one stops", async () => {
    await rejectsWith(
      fw.createFlowLogConfig({ resourceId: "sg-000000000001" }),
      Code.InvalidArgument,
      /^resource_id: "sg-000000000001" is not a VPC, subnet or NIC id/,
    );
    await rejectsWith(
      fw.createFlowLogConfig({ resourceId: web1.vpc.id, sampleRate: 1.5 }),
      Code.InvalidArgument,
      /^sample_rate: a sample rate is a number with 0 < rate ≤ 1/,
    );
    await rejectsWith(fw.createFlowLogConfig({ resourceId: web1.vpc.id, sampleRate: Number.NaN }), Code.InvalidArgument, /^sample_rate/);
    await rejectsWith(fw.createFlowLogConfig({ resourceId: "nic-00000000dead" }), Code.NotFound, /must be bound/);
    await rejectsWith(fw.createFlowLogConfig({ resourceId: web1.nicId }), Code.AlreadyExists, /already has flow-log config fl-/);
    await rejectsWith(fw.getFlowLogConfig({ id: "fl-000000000000" }), Code.NotFound, /flow-log config/);
    await rejectsWith(fw.deleteFlowLogConfig({ id: "x" }), Code.InvalidArgument, /^id:/);
    const listed = (await cli.json(["flow-logs", "config", "list", "--vpc", web1.vpc.id])).configs as { resourceId: string }[];
    assert.deepEqual(listed.map((c) => c.resourceId).sort(), [db.subnet.id, web1.nicId].sort());

    // quiet, while this firewall is down: stored as any firewall's API stores it (another host's answered).
    await fwd.stop();
    const redis = await h.connectReady();
    let cfg;
    try {
      cfg = await new FlowLogConfigStore(redis).create({ vpcId: quiet.vpc.id, resourceId: quiet.nicId, sampleRate: 0.5, description: "" });
    } finally {
      redis.disconnect();
    }
    await startFirewall();
    const shown = await cli.json(["flow-logs", "config", "get", cfg.id]);
    assert.deepEqual([shown.config.resourceId, shown.config.sampleRate], [quiet.nicId, 0.5]);
    const applied = await waitFor(async () => (await nicChainText(quiet, "in")).includes("numgen random mod 1000 < 500"), {
      timeoutMs: 15_000,
      intervalMs: 300,
    });
    assert.ok(applied, "quiet's drops are logged at 1/2");
    const gone = await cli.json(["flow-logs", "config", "delete", cfg.id]);
    assert.equal(gone.deleted, true);
    assert.equal((await fw.deleteFlowLogConfig({ id: cfg.id })).deleted, false);
    const off = await waitFor(
      async () => {
        // Back on the chain it shares with the NICs in its groups.
        const chain = await nicChainText(quiet, "in");
        return chain.includes("@cnt_in_drop") && !chain.includes(`group ${FLOW_LOG_GROUP}`) && (await nicChain(quiet, "in")).startsWith("grp_");
      },
      { timeoutMs: 15_000, intervalMs: 300 },
    );
    assert.ok(off, "deleting the config stops quiet's logging");
  }, 90_000);
});
