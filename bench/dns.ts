// VPC resolver benchmark (`npm run bench:dns`; not a timed test). One
// simulated hypervisor, one VPC, one VM namespace; a closed-loop UDP client
// inside the VM (C queries in flight, S seconds) asking RESOLVER:53 for
// NAME.bench.internal, through the real data plane (DNAT in the VPC
// namespace, transit veth, the host's input chain). It measures:
//   1. the gateway daemon's own resolver (per-VM limit 200 q/s, burst 400):
//      shows the limit holds (one VM cannot get more);
//   2. with the gateway stopped (its tables stay in the kernel), interleaved
//      rounds of (a) the same resolver code (runResolver, zones from Redis)
//      with the limit raised and (b) a bare dns-packet UDP server on the same
//      transit address answering a constant record: bench/lib/dns-server.ts;
//   3. a record change in a VPC of 10 records, then of --records (default
//      10 000): --changes record writes (a new name each, 100 ms apart,
//      through the DNS store's script as the API writes them; a quarter as
//      many unmeasured ones first) while (a)'s resolver runs; its CPU per change (schedstat of its threads), that
//      the last name then answers, and beside it what reading the zone whole
//      costs at that size (HGETALL + the record check, in this process),
//      which every change cost each resolver before dns.record events named
//      their records. Target: 10 000 records within 1.2x of 10;
// and prints medians of the rounds; the figures go to bench/results/dns-<date>.json.
//
// Safety: every namespace carries the run prefix of test/lib/netns.ts; the
// root namespace is never changed (compared before and after). Processes are
// ended by PID; every loop is bounded in count and time. About 1½ minutes.
//
// Options (after `npm run bench:dns --`): --seconds S (default 3),
// --rounds N (default 3), --concurrency C (default 16), --records N (default
// 10 000), --changes N (default 60). --smoke: 1 s, 1 round, 4 in flight,
// 200 records, 4 changes (bench/lib/run.ts).
import { spawn, type ChildProcess } from "node:child_process";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { performance } from "node:perf_hooks";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { DnsService } from "../gen/microvpc/v1/dns_pb.js";
import { SubnetType } from "../gen/microvpc/v1/subnet_pb.js";
import { grpcClient } from "../services/common/client.js";
import { transitAddrs } from "../services/gateway/plan.js";
import { DnsStore } from "../services/dns/store.js";
import { GatewayStore } from "../services/gateway/store.js";
import { startDaemon } from "../test/lib/daemon.js";
import { Harness, MANAGEMENT_CIDRS } from "../test/lib/harness.js";
import { nsExec, sleep, trackChild, waitFor } from "../test/lib/netns.js";
import { Redis } from "ioredis";
import { cpuUs } from "./lib/cpu.js";
import { resultsFile, writeJson } from "./lib/report.js";
import { benchArgs, benchClock, runBench } from "./lib/run.js";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const DNS_PACKET = createRequire(import.meta.url).resolve("dns-packet");
const o = benchArgs(
  {
    seconds: { type: "string", default: "3" },
    rounds: { type: "string", default: "3" },
    concurrency: { type: "string", default: "16" },
    records: { type: "string", default: "10000" },
    changes: { type: "string", default: "60" },
  },
  { seconds: "1", rounds: "1", concurrency: "4", records: "200", changes: "4" },
);
const SECONDS = Math.min(Math.max(Number(o.seconds), 1), 30);
const ROUNDS = Math.min(Math.max(Number(o.rounds), 1), 10);
const CONC = Math.min(Math.max(Number(o.concurrency), 1), 256);
const RECORDS = Math.min(Math.max(Number(o.records), 20), 50_000);
const CHANGES = Math.min(Math.max(Number(o.changes), 2), 500);
/** The smaller zone of section 3, the baseline of the larger. */
const SMALL = 10;

/** One A query; prints the first address, or the rcode. */
const ONE = `
const p = require(${JSON.stringify(DNS_PACKET)});
const [server, name] = process.argv.slice(1);
const s = require("node:dgram").createSocket("udp4");
s.on("message", (m) => { const r = p.decode(m); process.stdout.write(String(r.answers.find((a) => a.type === "A")?.data ?? r.rcode)); process.exit(0); });
s.send(p.encode({ type: "query", id: 7, questions: [{ type: "A", name }] }), 53, server);
setTimeout(() => process.exit(3), 2000);
`;

/** Closed loop: CONC queries in flight for S seconds; prints {answers, lost, p50us, p99us}. */
const CLIENT = `
const p = require(${JSON.stringify(DNS_PACKET)});
const [server, seconds, conc, name] = process.argv.slice(1).map((x, i) => (i === 0 || i === 3 ? x : Number(x)));
const s = require("node:dgram").createSocket("udp4");
const out = new Map(); let id = 0, answers = 0, lost = 0; const lat = [];
const send = () => { id = (id + 1) & 0xffff; out.set(id, process.hrtime.bigint()); s.send(p.encode({ type: "query", id, questions: [{ type: "A", name }] }), 53, server); };
s.on("message", (m) => { const i = m.readUInt16BE(0); const t = out.get(i); if (t === undefined) return; out.delete(i); answers++; lat.push(Number(process.hrtime.bigint() - t) / 1000); if (!stop) send(); });
let stop = false;
const sweep = setInterval(() => { const now = process.hrtime.bigint(); for (const [i, t] of out) if (now - t > 500000000n) { out.delete(i); lost++; if (!stop) send(); } }, 50);
s.bind(0, () => { for (let i = 0; i < conc; i++) send(); });
setTimeout(() => { stop = true; clearInterval(sweep); lat.sort((a, b) => a - b);
  process.stdout.write(JSON.stringify({ qps: answers / seconds, lost, p50us: lat[Math.floor(lat.length / 2)] ?? 0, p99us: lat[Math.floor(lat.length * 0.99)] ?? 0 })); process.exit(0); }, seconds * 1000);
`;

interface Result {
  qps: number;
  lost: number;
  p50us: number;
  p99us: number;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function load(ns: string, resolver: string, name: string): Promise<Result> {
  const r = await nsExec(ns, process.execPath, ["-e", CLIENT, resolver, String(SECONDS), String(CONC), name], { timeoutMs: (SECONDS + 10) * 1000 });
  return JSON.parse(r.stdout);
}

async function helper(hostNs: string, mode: string, redisUrl: string, hostId: string, address: string): Promise<ChildProcess> {
  const child = trackChild(
    spawn(
      "ip",
      [
        "netns",
        "exec",
        hostNs,
        process.execPath,
        "--import",
        "tsx",
        join(ROOT, "bench", "lib", "dns-server.ts"),
        "--mode",
        mode,
        "--redis",
        redisUrl,
        "--host-id",
        hostId,
        "--address",
        address,
      ],
      {
        cwd: ROOT,
        stdio: ["ignore", "pipe", "inherit"],
      },
    ),
  );
  const rl = createInterface({ input: child.stdout! });
  const ready = await Promise.race([
    new Promise<boolean>((r) => rl.on("line", (l) => l === "ready" && r(true))),
    new Promise<boolean>((r) => setTimeout(() => r(false), 20_000)),
    new Promise<boolean>((r) => child.once("exit", () => r(false))),
  ]);
  if (!ready) throw new Error(`dns-server --mode ${mode} did not start`);
  return child;
}

async function stopChild(c: ChildProcess): Promise<void> {
  if (c.exitCode !== null || c.signalCode !== null) return;
  const gone = new Promise((r) => c.once("exit", r));
  c.kill("SIGTERM");
  const t = setTimeout(() => c.kill("SIGKILL"), 3000);
  await gone;
  clearTimeout(t);
}

interface ZoneLevel {
  records: number;
  cpuMsPerChange: number;
  answered: boolean;
  wholeZoneMs: number;
}

/**
 * Section 3: the resolver (bench/lib/dns-server.ts --mode resolver, its own
 * process) with the VPC's zone at SMALL records, then at RECORDS; CHANGES
 * new names written at each level, 100 ms apart (past the feed's 50 ms
 * settle: one event batch each), the resolver's CPU over them.
 */
async function zoneChanges(
  redisUrl: string,
  redisSocket: string,
  hostNs: string,
  hostId: string,
  transit: string,
  vpcId: string,
  vmNs: string,
  resolver: string,
): Promise<{ changes: number; levels: ZoneLevel[] }> {
  const r = new Redis(redisUrl);
  const store = new DnsStore(r);
  const c = await helper(hostNs, "resolver", redisSocket, hostId, transit);
  const levels: ZoneLevel[] = [];
  try {
    let have = (await store.allRecords(vpcId)).length;
    for (const want of [SMALL, RECORDS]) {
      // Fill the zone up to `want` (fillers 64 at a time), then let the resolver settle.
      for (let i = have; i < want; i += 64) {
        const n = Math.min(64, want - i);
        await Promise.all(
          Array.from({ length: n }, (_, j) =>
            store.setRecord({ vpcId, name: `fill${i + j}`, address: `10.0.${2 + ((i + j) >> 8)}.${(i + j) & 255}`, ttl: 60, owner: "fill" }),
          ),
        );
      }
      have = Math.max(have, want);
      // Unmeasured changes first (the resolver's code warm, the fill's events behind it).
      for (let i = 0; i < Math.max(2, CHANGES >> 2); i++) {
        await store.setRecord({ vpcId, name: `warm${want}x${i}`, address: "10.0.1.78", ttl: 60, owner: "bench" });
        await sleep(100);
      }
      await sleep(1000);
      const t0 = performance.now();
      const whole = await store.allRecords(vpcId);
      const wholeZoneMs = performance.now() - t0;
      const cpu0 = cpuUs(c.pid!);
      for (let i = 0; i < CHANGES; i++) {
        await store.setRecord({ vpcId, name: `chg${want}x${i}`, address: "10.0.1.77", ttl: 60, owner: "bench" });
        await sleep(100);
      }
      await sleep(300);
      const cpuMsPerChange = (cpuUs(c.pid!) - cpu0) / 1000 / CHANGES;
      const last = await nsExec(vmNs, process.execPath, ["-e", ONE, resolver, `chg${want}x${CHANGES - 1}.bench.internal`], { check: false, timeoutMs: 5000 });
      levels.push({ records: whole.length, cpuMsPerChange, answered: last.stdout === "10.0.1.77", wholeZoneMs });
    }
  } finally {
    await stopChild(c);
    r.disconnect();
  }
  return { changes: CHANGES, levels };
}

/** Hard stop: past it, the harness's exit handlers end the processes and remove the namespaces. */
const { progress } = benchClock(180_000);

async function main(): Promise<number> {
  progress("starting the harness (redis, ipam, netagent, host namespaces) and microvpcd gateway");
  const h = await Harness.start({ hosts: 1 });
  let left: string[];
  try {
    const hv = h.hosts[0];
    const gwd = await startDaemon("gateway", [
      "--redis",
      h.redis.url,
      "--host-id",
      hv.id,
      "--host-netns",
      hv.ns,
      "--uplink",
      "ul0",
      "--imds-redis",
      h.redis.socket,
      "--management-cidrs",
      MANAGEMENT_CIDRS,
    ]);
    trackChild(gwd.proc);
    const dns = grpcClient(DnsService, { address: h.ipamDaemon.address });
    const vpc = await h.vpc("bench", "10.0.0.0/16");
    const subnet = await h.subnet(vpc, "s", "10.0.1.0/24", SubnetType.PUBLIC);
    const vm = await h.vm(0, vpc, subnet, "client");
    await dns.setDnsRecord({ vpc: "bench", name: "target", address: "10.0.1.99", owner: "bench" });
    const name = "target.bench.internal";
    const resolver = "10.0.0.2";
    const up = await waitFor(
      async () => (await nsExec(vm.ns, "busybox", ["nslookup", name, resolver], { check: false, timeoutMs: 5000 })).stdout.includes("10.0.1.99"),
      {
        timeoutMs: 20_000,
        intervalMs: 250,
      },
    );
    if (!up) throw new Error("the gateway's resolver does not answer");
    const daemon = await load(vm.ns, resolver, name);
    await gwd.stop();
    const r = new Redis(h.redis.url);
    const k = (await new GatewayStore(r).transitMap(hv.id)).get(vpc.id)!;
    r.disconnect();
    const transit = transitAddrs(k).host;
    const rounds: { resolver: Result; bare: Result }[] = [];
    for (let i = 0; i < ROUNDS; i++) {
      const res: Partial<{ resolver: Result; bare: Result }> = {};
      for (const mode of i % 2 === 0 ? (["resolver", "bare"] as const) : (["bare", "resolver"] as const)) {
        const c = await helper(hv.ns, mode, h.redis.socket, hv.id, transit);
        try {
          res[mode] = await load(vm.ns, resolver, name);
        } finally {
          await stopChild(c);
        }
      }
      rounds.push(res as { resolver: Result; bare: Result });
    }
    progress(`a record change in a VPC of ${SMALL}, then ${RECORDS} records: the resolver's CPU per change`);
    const zone = await zoneChanges(h.redis.url, h.redis.socket, hv.ns, hv.id, transit, vpc.id, vm.ns, resolver);
    const row = (label: string, xs: Result[]) =>
      `${label.padEnd(44)} ${String(Math.round(median(xs.map((x) => x.qps)))).padStart(8)} q/s   p50 ${String(Math.round(median(xs.map((x) => x.p50us)))).padStart(6)} µs   p99 ${String(Math.round(median(xs.map((x) => x.p99us)))).padStart(7)} µs   lost ${xs.reduce((a, x) => a + x.lost, 0)}`;
    console.log(`VPC resolver, one VM, ${CONC} queries in flight, ${SECONDS} s per run, medians of ${ROUNDS} interleaved rounds (node ${process.version})`);
    console.log(row("gateway daemon (limit 200 q/s, burst 400)", [daemon]));
    console.log(
      row(
        "resolver code, limit raised",
        rounds.map((x) => x.resolver),
      ),
    );
    console.log(
      row(
        "bare dns-packet server, same path",
        rounds.map((x) => x.bare),
      ),
    );
    const ratio = median(rounds.map((x) => x.resolver.qps / x.bare.qps));
    console.log(`resolver / bare: ${(ratio * 100).toFixed(0)} % (median of per-round ratios)`);
    console.log();
    console.log(`A record change (${CHANGES} new names, 100 ms apart, written as the DNS API writes them) reaching the resolver:`);
    for (const z of zone.levels)
      console.log(
        `  ${String(z.records).padStart(6)} records: resolver CPU ${z.cpuMsPerChange.toFixed(3)} ms per change; the last name answers: ${z.answered ? "yes" : "NO"}; reading the zone whole (the cost per change before): ${z.wholeZoneMs.toFixed(2)} ms`,
      );
    const zr = zone.levels[1].cpuMsPerChange / Math.max(zone.levels[0].cpuMsPerChange, 1e-6);
    const zoneOk = zr <= 1.2 && zone.levels.every((z) => z.answered);
    console.log(`  ${zone.levels[1].records} vs ${zone.levels[0].records} records: ${zr.toFixed(2)}x (target <= 1.2x): ${zoneOk ? "PASS" : "MISS"}`);
    const file = resultsFile("dns");
    writeJson(file, {
      seconds: SECONDS,
      rounds: ROUNDS,
      concurrency: CONC,
      node: process.version,
      daemon,
      rounds_: rounds,
      ratio,
      zone: { ...zone, ratio: zr },
    });
    console.log(`figures written to ${file}`);
    const changed = await h.rootChanges();
    if (changed.length) throw new Error(`root namespace changed: ${changed.join("; ")}`);
  } finally {
    left = await h.close();
  }
  if (left.length) console.error(`namespaces of the run left: ${left.join(", ")}`);
  return left.length ? 2 : 0;
}

runBench(main);
