// Flow logs, the gaps docs/flow-logs.md listed, with real packets:
//   * a FlowLogConfig does not outlive what it names: a NIC unbound and
//     bound again, or a VPC (and its subnet) deleted and made again under the
//     same name, logs nothing; the daemon's garbage collection deletes the
//     stale records from Redis;
//   * drops of `ct state invalid` and toward an address with no bound NIC
//     are logged ("ct-invalid", "unbound-nic"), those of places that do not
//     log are not;
//   * a long-lived accepted flow gets interim records every interval whose
//     bytes add up to the transfer, and one last record; a short flow one.
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { Code } from "@connectrpc/connect";
import type { Redis } from "ioredis";
import { afterAll, beforeAll, describe, test } from "vitest";
import { Direction, FirewallService, Protocol } from "../../gen/microvpc/v1/firewall_pb.js";
import { grpcClient } from "../../services/common/client.js";
import { FLOW_LOG_GROUP, type FlowRecord } from "../../services/firewall/flowlogs.js";
import { fwKeys } from "../../services/firewall/keys.js";
import { rejectsWith } from "../lib/clients.js";
import type { Daemon } from "../lib/daemon.js";
import { Harness, type Vm, bindRequest } from "../lib/harness.js";
import { ipn, nicChainText, nsExec, sleep, tcpConnect, tempDir, trackChild, waitFor } from "../lib/netns.js";
import { spawn } from "node:child_process";

const INTERVAL_MS = 2000;

let h: Harness;
let fwd: Daemon;
let fw: ReturnType<typeof grpcClient<typeof FirewallService>>;
let redis: Redis;
let client: Vm, web1: Vm, quiet: Vm, db: Vm, other: Vm;
let dir: string;
let skip = 0;

const records = (): FlowRecord[] => {
  const p = join(dir, `${h.hosts[0].id}.jsonl`);
  if (!existsSync(p)) return [];
  return readFileSync(p, "utf8")
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as FlowRecord);
};
const mine = () => records().slice(skip);

/** Waits (bounded) until `ok` holds of the new records; listing conntrack in the namespaces reaps expired entries, so DESTROY comes soon. */
const recordsUntil = async (namespaces: string[], ok: (rs: FlowRecord[]) => boolean, what: string) => {
  const got = await waitFor(
    async () => {
      for (const ns of namespaces) await nsExec(ns, "conntrack", ["-L"], { check: false });
      return ok(mine());
    },
    { timeoutMs: 20_000, intervalMs: 500 },
  );
  if (!got) assert.fail(`${what}: records ${JSON.stringify(mine())}`);
};

const shortTimeouts = (ns: string) =>
  nsExec(ns, "sysctl", [
    "-qw",
    "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1",
    "net.netfilter.nf_conntrack_tcp_timeout_close=1",
    "net.netfilter.nf_conntrack_tcp_timeout_fin_wait=1",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait=1",
    "net.netfilter.nf_conntrack_tcp_timeout_last_ack=1",
  ]);

/** Whether a chain of a VPC namespace logs to the flow-log group. */
const chainLogs = async (vm: Vm, dirn: "in" | "out" = "in") => (await nicChainText(vm, dirn)).includes(`group ${FLOW_LOG_GROUP}`);

// A TCP segment with SYN and FIN both set (conntrack: "invalid tcp flag combination"), sent 3 times from a raw socket.
const SYNFIN = `
import socket, struct, sys
src, dst, sport, dport = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def csum(b):
    if len(b) % 2: b += b"\\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
h = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x03, 64240, 0, 0)
c = csum(socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(h)) + h)
h = h[:16] + struct.pack("!H", c) + h[18:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
for _ in range(3): s.sendto(h, (dst, 0))
`;

// A sink: counts what one connection sends and answers the count when it ends.
const SINK = `require("net").createServer((s) => { let n = 0; s.on("data", (d) => (n += d.length)); s.on("end", () => s.end(String(n))); s.on("error", () => {}); }).listen(Number(process.argv[1]), "0.0.0.0", () => console.log("listening"));`;
// Sends `chunks` of 64 KiB every 100 ms, then prints its local port and the count the sink answered.
const SENDER = `const [host, port, chunks] = process.argv.slice(1); let sport = 0; const s = require("net").connect(Number(port), host, () => { sport = s.localPort; let i = 0; const t = setInterval(() => { s.write(Buffer.alloc(65536, 7)); if (++i >= Number(chunks)) { clearInterval(t); s.end(); } }, 100); }); let got = ""; s.on("data", (d) => (got += d)); s.on("close", () => console.log(JSON.stringify({ sport, received: Number(got) })));`;

const startSink = async (vm: Vm, port: number) => {
  const p = trackChild(spawn("ip", ["netns", "exec", vm.ns, process.execPath, "-e", SINK, String(port)], { stdio: ["ignore", "pipe", "ignore"] }));
  await new Promise<void>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error("sink did not start")), 10_000);
    p.stdout!.once("data", () => {
      clearTimeout(t);
      resolve();
    });
  });
};

beforeAll(async () => {
  h = await Harness.start({ hosts: 1, underlay: false });
  redis = await h.connectReady();
  const vpc = await h.vpc("gaps", "10.0.0.0/16");
  const a = await h.subnet(vpc, "a", "10.0.1.0/24");
  const b = await h.subnet(vpc, "b", "10.0.2.0/24");
  const c = await h.subnet(vpc, "c", "10.0.3.0/24");
  client = await h.vm(0, vpc, a, "client");
  web1 = await h.vm(0, vpc, a, "web1");
  quiet = await h.vm(0, vpc, a, "quiet");
  db = await h.vm(0, vpc, b, "db");
  other = await h.vm(0, vpc, c, "other");
  await startSink(web1, 80);
  await startSink(quiet, 80);
  await shortTimeouts(client.vpcNs);
  dir = tempDir("flowlogs-gaps");
  fwd = await h.firewall(0, { driftMs: 2000, args: ["--flow-logs", dir, "--flow-logs-aggregate-ms", "3000", "--flow-logs-interval-ms", String(INTERVAL_MS)] });
  fw = grpcClient(FirewallService, { address: fwd.address, timeoutMs: 20_000 });
  const sg = (
    await fw.createSecurityGroup({
      vpc: vpc.id,
      name: "web",
      rules: [{ direction: Direction.INGRESS, protocol: Protocol.TCP, portFrom: 80, portTo: 80, peer: { case: "cidr", value: "10.0.0.0/16" } }],
    })
  ).securityGroup!.id;
  for (const vm of [client, web1, quiet, db, other]) await fw.bindNic(bindRequest(vm, vm === client ? [] : [sg]));
  // web1 logs by NIC, subnet b by subnet (its NIC db, and addresses of b with no bound NIC); a, c and quiet do not.
  await fw.createFlowLogConfig({ resourceId: web1.nicId });
  await fw.createFlowLogConfig({ resourceId: b.id });
  assert.ok(await waitFor(() => chainLogs(web1), { timeoutMs: 15_000, intervalMs: 300 }), "web1's config is applied");
  assert.ok(
    await waitFor(async () => (await nsExec(client.vpcNs, "nft", ["list", "chain", "inet", "microvpc", "forward"])).stdout.includes("unbound-nic"), {
      timeoutMs: 15_000,
      intervalMs: 300,
    }),
    "the VPC-wide drops are logged",
  );
  await sleep(1000);
  skip = records().length;
}, 180_000);

afterAll(async () => {
  redis?.disconnect();
  await fwd?.stop();
  await h?.close();
});

describe("flow logs: the gaps", () => {
  test("ct-invalid and unbound-nic drops are logged once each with what decided; those of NICs and subnets that do not log are not", async () => {
    // SYN+FIN segments: conntrack calls them invalid; to web1 (logs) and to quiet (does not).
    for (const [vm, sport] of [
      [web1, 40401],
      [quiet, 40402],
    ] as const)
      await nsExec(client.ns, "python3", ["-c", SYNFIN, client.address, vm.address, String(sport), "80"]);
    // Toward addresses of subnets b (logs) and c (does not) that no bound NIC has: the VPC
    // namespace is told a MAC for them, so the packets reach the firewall's "NIC not bound yet" drop.
    const ghosts = [
      ["10.0.2.77", db],
      ["10.0.3.77", other],
    ] as const;
    for (const [addr, vm] of ghosts) {
      const dev = `br-${vm.subnet.id.slice(-12)}`;
      await ipn(client.vpcNs, ["neigh", "replace", addr, "lladdr", "02:00:00:00:77:77", "dev", dev, "nud", "permanent"]);
      assert.equal(await tcpConnect(client.ns, addr, 80, 2500), "timeout");
    }
    await recordsUntil(
      [],
      (rs) => rs.some((r) => r.decided_by === "ct-invalid") && rs.some((r) => r.decided_by === "unbound-nic"),
      "the ct-invalid and unbound-nic records",
    );
    await sleep(4000); // past the aggregation window: anything that would be a second record has come
    const recs = mine();
    const invalid = recs.filter((r) => r.decided_by === "ct-invalid");
    assert.equal(invalid.length, 1, JSON.stringify(recs));
    assert.deepEqual(
      [invalid[0].action, invalid[0].nic, invalid[0].vm, invalid[0].src, invalid[0].dst, invalid[0].sport, invalid[0].dport, invalid[0].proto],
      ["reject", web1.nicId, web1.owner, client.address, web1.address, 40401, 80, "tcp"],
    );
    assert.equal(invalid[0].packets, 3);
    const unbound = recs.filter((r) => r.decided_by === "unbound-nic");
    assert.equal(unbound.length, 1, JSON.stringify(recs));
    assert.deepEqual(
      [unbound[0].action, unbound[0].nic, unbound[0].vpc, unbound[0].src, unbound[0].dst, unbound[0].dport],
      ["reject", "", web1.vpc.id, client.address, "10.0.2.77", 80],
    );
    // Nothing of quiet's invalid segments, nor of subnet c.
    assert.deepEqual(
      recs.filter((r) => r.dst === quiet.address || r.dst === "10.0.3.77"),
      [],
    );
    skip = records().length;
  }, 60_000);

  test("a long transfer has interim records every interval whose bytes add up to it, and one last record; a short flow has one record", async () => {
    const out = await nsExec(client.ns, process.execPath, ["-e", SENDER, web1.address, "80", "70"], { timeoutMs: 30_000 });
    const sent = 70 * 65536;
    const { sport, received } = JSON.parse(out.stdout.trim()) as { sport: number; received: number };
    assert.equal(received, sent);
    // A short connection to web1, and one to quiet (logs nothing).
    assert.equal(await tcpConnect(client.ns, web1.address, 80), "connected");
    assert.equal(await tcpConnect(client.ns, quiet.address, 80), "connected");
    const long = (rs: FlowRecord[]) => rs.filter((r) => r.action === "accept" && r.sport === sport && r.dst === web1.address);
    const short = (rs: FlowRecord[]) => rs.filter((r) => r.action === "accept" && r.sport !== sport && r.dst === web1.address);
    await recordsUntil([client.vpcNs], (rs) => long(rs).some((r) => !r.interim) && short(rs).length >= 1, "the long flow's last record and the short flow's");
    await sleep(INTERVAL_MS + 500); // a tick later: nothing more comes
    const recs = mine();
    const l = long(recs);
    const interim = l.filter((r) => r.interim);
    assert.ok(interim.length >= 2, `≥2 interim records: ${JSON.stringify(l)}`);
    assert.equal(l.filter((r) => !r.interim).length, 1, JSON.stringify(l));
    assert.ok(!l[l.length - 1].interim, "the last record is the last one written");
    // Bytes: the payload plus the IP and TCP headers of both directions (a few %); no interval counted twice.
    const bytes = l.reduce((s, r) => s + r.bytes, 0);
    assert.ok(bytes >= sent && bytes <= sent * 1.1, `bytes ${bytes} vs ${sent} sent`);
    // Spans follow each other: each record starts where the one before ended; all name the flow's start.
    for (let i = 1; i < l.length; i++) assert.equal(l[i].start, l[i - 1].end, JSON.stringify(l));
    assert.ok(l.every((r) => r.flow_start === l[0].start && r.nic === web1.nicId && r.src === client.address && r.dport === 80));
    const s = short(recs);
    assert.equal(s.length, 1, JSON.stringify(s));
    assert.ok(!s[0].interim && s[0].packets >= 3);
    assert.deepEqual(
      recs.filter((r) => r.dst === quiet.address),
      [],
    );
    skip = records().length;
  }, 90_000);

  test("a config does not outlive its NIC binding, subnet or VPC: one of the same name made again logs nothing, and the stale records are deleted", async () => {
    const vpc = await h.vpc("gone", "10.1.0.0/16");
    const g = await h.subnet(vpc, "g", "10.1.1.0/24");
    const gc = await h.vm(0, vpc, g, "gc-client");
    const tmp = await h.vm(0, vpc, g, "tmp");
    await shortTimeouts(gc.vpcNs);
    for (const vm of [gc, tmp]) await fw.bindNic(bindRequest(vm, []));
    const probe = async (from: Vm, to: Vm) => assert.equal(await tcpConnect(from.ns, to.address, 22, 2000), "timeout");
    const probed = (to: Vm) => mine().filter((r) => r.action === "reject" && r.dst === to.address && r.dport === 22);

    // The NIC's config logs its blocked probe, once.
    const nicCfg = (await fw.createFlowLogConfig({ resourceId: tmp.nicId })).config!;
    assert.ok(await waitFor(() => chainLogs(tmp), { timeoutMs: 15_000, intervalMs: 300 }), "tmp's config is applied");
    await probe(gc, tmp);
    await recordsUntil([], (rs) => rs.some((r) => r.dst === tmp.address), "tmp's probe");
    await sleep(3500);
    assert.equal(probed(tmp).length, 1, JSON.stringify(mine()));
    assert.equal(probed(tmp)[0].nic, tmp.nicId);

    // Unbound and bound again: a new binding of the same NIC id does not inherit the config; the daemon deletes it.
    await fw.unbindNic({ nicId: tmp.nicId });
    await fw.bindNic(bindRequest(tmp, []));
    assert.ok(
      await waitFor(async () => (await redis.exists(fwKeys(redis).flowLog(tmp.vpc.id, nicCfg.id))) === 0, { timeoutMs: 15_000, intervalMs: 300 }),
      "the NIC's config is deleted",
    );
    assert.equal(await redis.hget(fwKeys(redis).flowLogByRes(tmp.vpc.id), tmp.nicId), null);
    assert.ok(await waitFor(async () => !(await chainLogs(tmp)), { timeoutMs: 15_000, intervalMs: 300 }), "tmp logs nothing");
    skip = records().length;
    await probe(gc, tmp);
    await sleep(4000);
    assert.deepEqual(probed(tmp), []);

    // The VPC's and the subnet's configs: gone with the VPC (its VMs, bindings, subnet deleted first).
    const vpcCfg = (await fw.createFlowLogConfig({ resourceId: vpc.id })).config!;
    const subCfg = (await fw.createFlowLogConfig({ resourceId: g.id })).config!;
    for (const vm of [gc, tmp]) {
      await fw.unbindNic({ nicId: vm.nicId });
      await h.removeVm(vm);
    }
    await h.ipam.subnet.deleteSubnet({ ref: g.id });
    await h.ipam.vpc.deleteVpc({ ref: vpc.id });
    for (const id of [vpcCfg.id, subCfg.id])
      assert.ok(
        await waitFor(async () => (await redis.exists(fwKeys(redis).flowLog(vpc.id, id))) === 0, { timeoutMs: 15_000, intervalMs: 300 }),
        `${id} is deleted`,
      );
    await rejectsWith(fw.getFlowLogConfig({ id: vpcCfg.id }), Code.NotFound, /flow-log config/);
    assert.equal(await redis.sismember(fwKeys(redis).vpcFlowLogs(vpc.id), vpcCfg.id), 0);

    // Made again under the same names: nothing logs.
    const vpc2 = await h.vpc("gone", "10.1.0.0/16");
    const g2 = await h.subnet(vpc2, "g", "10.1.1.0/24");
    const gc2 = await h.vm(0, vpc2, g2, "gc-client2");
    const tmp2 = await h.vm(0, vpc2, g2, "tmp2");
    for (const vm of [gc2, tmp2]) await fw.bindNic(bindRequest(vm, []));
    assert.deepEqual((await fw.listFlowLogConfigs({ vpc: "gone" })).configs, []);
    assert.ok(await waitFor(async () => (await nicChainText(tmp2, "in")).includes("@cnt_in_drop"), { timeoutMs: 15_000, intervalMs: 300 }));
    assert.equal(await chainLogs(tmp2), false);
    skip = records().length;
    await probe(gc2, tmp2);
    await sleep(4000);
    assert.deepEqual(
      mine().filter((r) => r.vpc === vpc2.id || r.vpc === vpc.id),
      [],
    );
    // web1's config, untouched by all this, still logs.
    assert.equal(await chainLogs(web1), true);
  }, 120_000);
});
