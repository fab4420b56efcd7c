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
// and prints medians of the rounds; the figures go to bench/results/dns-<date>.json.
//
// Safety: every namespace carries the run prefix of test/lib/netns.ts; the
// root namespace is never changed (compared before and after). Processes are
// ended by PID; every loop is bounded in count and time. About 1 minute.
//
// Options (after `npm run bench:dns --`): --seconds S (default 3),
// --rounds N (default 3), --concurrency C (default 16). --smoke: 1 s, 1 round,
// 4 in flight (bench/lib/run.ts).
import { spawn, type ChildProcess } from "node:child_process";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { DnsService } from "../gen/microvpc/v1/dns_pb.js";
import { SubnetType } from "../gen/microvpc/v1/subnet_pb.js";
import { grpcClient } from "../services/common/client.js";
import { transitAddrs } from "../services/gateway/plan.js";
import { GatewayStore } from "../services/gateway/store.js";
import { startDaemon } from "../test/lib/daemon.js";
import { Harness, MANAGEMENT_CIDRS } from "../test/lib/harness.js";
import { nsExec, trackChild, waitFor } from "../test/lib/netns.js";
import { Redis } from "ioredis";
import { resultsFile, writeJson } from "./lib/report.js";
import { benchArgs, benchClock, runBench } from "./lib/run.js";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const DNS_PACKET = createRequire(import.meta.url).resolve("dns-packet");
const o = benchArgs(
  { seconds: { type: "string", default: "3" }, rounds: { type: "string", default: "3" }, concurrency: { type: "string", default: "16" } },
  { seconds: "1", rounds: "1", concurrency: "4" },
);
const SECONDS = Math.min(Math.max(Number(o.seconds), 1), 30);
const ROUNDS = Math.min(Math.max(Number(o.rounds), 1), 10);
const CONC = Math.min(Math.max(Number(o.concurrency), 1), 256);

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

/** Hard stop: past it, the harness's exit handlers end the processes and remove the namespaces. */
const { progress } = benchClock(120_000);

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
    const file = resultsFile("dns");
    writeJson(file, { seconds: SECONDS, rounds: ROUNDS, concurrency: CONC, node: process.version, daemon, rounds_: rounds, ratio });
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
