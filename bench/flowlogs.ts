// Flow-log benchmark (`npm run bench:flowlogs`; not a timed test): what flow
// logs cost the traffic of a NIC. One simulated hypervisor, two VPCs of the
// same shape (a client and a server VM, the server's group allowing TCP from
// the VPC); `microvpcd firewall --flow-logs` logs the flows of VPC "on" only
// (a FlowLogConfig of that VPC, made through the API), so VPC "off" has no
// conntrack accounting, no event reader, no log rule. In the same run, interleaved rounds (order rotating):
//   1. iperf3, one TCP stream client → server: throughput and CPU ms per GB
//      (both iperf3 ends, bench/lib/netns.ts);
//   2. short TCP connections (one per flow record): connections per second.
// Medians, then a verdict against the target of issue 16: within 5 %.
//
// Safety: as the other benches (test/lib/netns.ts): every namespace carries
// the run prefix, the root namespace is compared before and after, processes
// are ended by PID, everything of the run is removed at the end.
//
// Options (after `npm run bench:flowlogs --`): --rounds N (default 7),
// --iperf-seconds S (default 3), --conns N (connections per round, default
// 200). --smoke: 1 round of 1 s and 20 connections.
import { existsSync, readFileSync } from "node:fs";
import { loadavg } from "node:os";
import { join } from "node:path";
import { Direction, FirewallService, Protocol } from "../gen/microvpc/v1/firewall_pb.js";
import { grpcClient } from "../services/common/client.js";
import { FLOW_LOG_GROUP } from "../services/firewall/flowlogs.js";
import { startDaemon, type Daemon } from "../test/lib/daemon.js";
import { Harness, type Vm, bindRequest } from "../test/lib/harness.js";
import { nicChainText, nsExec, sleep, startTcpServer, tempDir, trackChild } from "../test/lib/netns.js";
import { machineEnv } from "./lib/cpu.js";
import { iperf3WithCpu, type IperfCpuResult } from "./lib/netns.js";
import { heading, num, resultsFile, verdictTable, writeJson, type Verdict } from "./lib/report.js";
import { benchArgs, benchClock, intOpt, runBench } from "./lib/run.js";
import { interleaved, median } from "./lib/stats.js";

const opt = benchArgs(
  { rounds: { type: "string", default: "7" }, "iperf-seconds": { type: "string", default: "3" }, conns: { type: "string", default: "200" } },
  { rounds: "1", "iperf-seconds": "1", conns: "20" },
);
const ROUNDS = intOpt("rounds", opt.rounds, 3, 50);
const SECS = intOpt("iperf-seconds", opt["iperf-seconds"], 1, 30);
const CONNS = intOpt("conns", opt.conns, 10, 10_000);
const { progress } = benchClock(15 * 60_000);
let fwd: Daemon | undefined;

const CONN_SCRIPT = `
const [host, n] = process.argv.slice(1);
const net = require("node:net");
let left = Number(n);
const t0 = process.hrtime.bigint();
const next = () => {
  if (left-- === 0) { process.stdout.write(String(Number(process.hrtime.bigint() - t0) / 1e9)); return; }
  const s = net.connect({ host, port: 80 }, () => s.end());
  s.resume();
  s.on("close", next);
  s.on("error", (e) => { process.stdout.write("error " + e.code); process.exit(2); });
};
next();
`;

async function connsPerSecond(client: Vm, server: Vm): Promise<number> {
  const r = await nsExec(client.ns, process.execPath, ["-e", CONN_SCRIPT, server.address, String(CONNS)], { timeoutMs: 120_000, check: false });
  const secs = Number(r.stdout.trim());
  if (r.code !== 0 || !(secs > 0))
    throw new Error(`${CONNS} connections ${client.name} → ${server.address}:80: exit ${r.code}, ${r.stdout.trim()} ${r.stderr.trim()}`);
  return CONNS / secs;
}

async function main(): Promise<number> {
  progress("starting redis-server, microvpcd ipam and netagent (one simulated hypervisor)");
  const h = await Harness.start({ hosts: 1, underlay: false });
  const dir = tempDir("flowlogs-bench");
  let rootDiff: string[];
  let leftovers: string[];
  let results: Map<string, { iperf: IperfCpuResult; cps: number }[]>;
  let records: number;
  try {
    const pairs: Record<"on" | "off", { client: Vm; server: Vm }> = {} as never;
    for (const name of ["on", "off"] as const) {
      const vpc = await h.vpc(name, "10.0.0.0/16");
      const sub = await h.subnet(vpc, "a", "10.0.1.0/24");
      pairs[name] = { client: await h.vm(0, vpc, sub, `${name}-client`), server: await h.vm(0, vpc, sub, `${name}-server`) };
      await startTcpServer(pairs[name].server.ns, 80, name);
      // Closed connections leave conntrack after 1 s, not 120 s of TIME_WAIT (both VPCs alike), so their records come within the run.
      await nsExec(pairs[name].server.vpcNs, "sysctl", [
        "-qw",
        "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1",
        "net.netfilter.nf_conntrack_tcp_timeout_close=1",
      ]);
    }
    // Interim records every second (the shortest interval the daemon takes): each iperf3 flow of the "on" VPC gets some, at their highest cost.
    fwd = await startDaemon("firewall", ["--redis", h.redis.url, "--host-id", h.hosts[0].id, "--flow-logs", dir, "--flow-logs-interval-ms", "1000"]);
    trackChild(fwd.proc);
    const fw = grpcClient(FirewallService, { address: fwd.address, timeoutMs: 20_000 });
    for (const name of ["on", "off"] as const) {
      const { client, server } = pairs[name];
      const sg = (
        await fw.createSecurityGroup({
          vpc: server.vpc.id,
          name: "srv",
          rules: [{ direction: Direction.INGRESS, protocol: Protocol.TCP, peer: { case: "cidr", value: "10.0.0.0/16" } }],
        })
      ).securityGroup!.id;
      for (const vm of [client, server]) await fw.bindNic(bindRequest(vm, vm === server ? [sg] : []));
    }
    await fw.createFlowLogConfig({ resourceId: pairs.on.server.vpc.id });
    // Applied by the firewall's next pass: its drop rule then logs (bounded wait).
    for (let i = 0; i < 100; i++) {
      const text = await nicChainText(pairs.on.server, "in");
      if (text.includes(`group ${FLOW_LOG_GROUP}`)) break;
      if (i === 99) throw new Error(`the flow-log config of VPC "on" was not applied within 20 s:\n${text}`);
      await sleep(200);
    }
    progress(`${ROUNDS} interleaved rounds: iperf3 ${SECS} s, then ${CONNS} short connections, flow logs on vs off`);
    results = await interleaved(
      (["on", "off"] as const).map((name) => ({
        name,
        run: async () => {
          const { client, server } = pairs[name];
          const iperf = await iperf3WithCpu(client.ns, server.ns, server.address, { seconds: SECS });
          const cps = await connsPerSecond(client, server);
          return { iperf, cps };
        },
      })),
      { rounds: ROUNDS, warmupRounds: 1 },
    );
    // Listing the table reaps the expired entries (their DESTROY events) at once.
    await sleep(1500);
    await nsExec(pairs.on.server.vpcNs, "conntrack", ["-L"], { check: false });
    await sleep(1000);
    const file = join(dir, `${h.hosts[0].id}.jsonl`);
    records = existsSync(file) ? readFileSync(file, "utf8").split("\n").filter(Boolean).length : 0;
    rootDiff = await h.rootChanges();
  } finally {
    await fwd?.stop();
    leftovers = await h.close();
  }
  const m = (name: string, f: (x: { iperf: IperfCpuResult; cps: number }) => number) => median(results.get(name)!.map(f));
  const on = { gbps: m("on", (x) => x.iperf.gbps), cpu: m("on", (x) => x.iperf.cpuMsPerGB), cps: m("on", (x) => x.cps) };
  const off = { gbps: m("off", (x) => x.iperf.gbps), cpu: m("off", (x) => x.iperf.cpuMsPerGB), cps: m("off", (x) => x.cps) };
  const v: Verdict[] = [
    { measure: "iperf3 throughput, Gbit/s", value: num(on.gbps, 2), baseline: num(off.gbps, 2), ratio: on.gbps / off.gbps, target: "≥ 0.95" },
    { measure: "CPU ms per GB (both iperf3 ends)", value: num(on.cpu, 1), baseline: num(off.cpu, 1), ratio: on.cpu / off.cpu, target: "≤ 1.05" },
    { measure: "short TCP connections per second", value: num(on.cps, 0), baseline: num(off.cps, 0), ratio: on.cps / off.cps, target: "" },
  ];
  for (const x of v) if (x.target) x.pass = x.target.startsWith("≥") ? x.ratio >= 0.95 : x.ratio <= 1.05;
  console.log(heading("Verdict"));
  console.log(verdictTable(v));
  console.log(`flow records written during the run: ${records}`);
  const out = resultsFile("flowlogs");
  console.log(`figures written to ${out}`);
  writeJson(out, {
    env: { ...machineEnv(), loadavgAtEnd: loadavg(), rounds: ROUNDS, seconds: SECS, conns: CONNS },
    on,
    off,
    records,
    verdicts: v,
    cleanup: { leftovers, rootDiff },
  });
  return rootDiff.length || leftovers.length ? 2 : 0;
}

runBench(main, () => [["firewall", fwd]]);
