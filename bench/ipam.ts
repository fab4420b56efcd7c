// IPAM benchmark (`npm run bench:ipam`; not a timed test). From one run it
// prints, and writes as JSON to bench/results/ipam-<date>.json:
//   1. the allocate script called straight on Redis (the limit of this
//      design): through ioredis at 1/16/64 callers, and from redis-benchmark;
//      at 16/64 also through allocationGroups, as microvpcd answers the
//      calls of a subnet that arrive together (one ALLOCATE_MANY a group);
//   2. gRPC Allocate through a real `microvpcd ipam` at 1/16/64 clients, over
//      one shared HTTP/2 connection and over one connection per client (the
//      CLI's connect-node transport), from a lean client (node:http2 with
//      hand-framed requests, bench/lib/h2-unary.ts, 4 connections) and from
//      the frames client (HTTP/2 frames written and read by hand over 4 TCP
//      connections, bench/lib/h2-raw.ts: what h2load is to bench:rpc, for a
//      method whose every request must differ; the target is judged on it), as a
//      ratio of the raw-script rate at the same concurrency, next to a bare
//      connect-node server (bench/lib/grpc-floor-server.ts) as the floor of
//      the CLI's gRPC stack, and at 64 the ceiling of a daemon on this stack
//      that runs one script a call: the frames client against a bare
//      @grpc/grpc-js server that runs the allocate script through ioredis
//      with nothing of microvpc's per call
//      (bench/lib/grpc-ipam-ceiling-server.ts);
//   3. first-free vs last-free address of a /16;
//   4. a /24 vs a /8 (empty and filled to all but the last address);
//   5. batch allocation: AllocateBatch of 64 through microvpcd at 1 and 16
//      clients next to the batch script straight through ioredis, in
//      addresses per second (beside single Allocate's calls per second,
//      which are addresses per second too);
//   6. the catalog: CreateVpc, CreateSubnet, DeleteSubnet and DeleteVpc
//      through the store (each a few one-slot steps since 5 December, so that
//      they run on a Redis Cluster), latency and Redis commands per call,
//      beside one write round trip (HSET) in the same rounds;
// then a verdict table against the targets of issue 2.
//
// Everything runs against the durable Redis microvpc ships (AOF, appendfsync
// always): that is the headline. Where the CPU cost must be isolated, the
// figures also come from Redis' own per-command timer (SLOWLOG, which excludes
// the network and the fsync) or from a pass with appendfsync=no, labelled as
// such. Every figure is the median of at least 5 runs after a warm-up, with
// the cases interleaved round by round so that the noise of a shared 2-core
// machine falls on all of them alike.
//
// CPU time per call of each process (bench client, microvpcd, redis-server)
// comes from /proc/<pid>/task/*/schedstat. The whole run takes 2–3 minutes.
//
// Options (after `npm run bench:ipam --`): --runs N (default 5, at least 5),
// --run-ms MS (per throughput run, default 1000), --pairs N (per latency run,
// default 2000), --skip-cpu-only, --profile (CPU-profile microvpcd during the
// measured runs and print where its time went; slows it down).
// --smoke: 1 round of 100 ms per case, 10 pairs, small warm-ups (bench/lib/run.ts).
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";
import type { Client } from "@connectrpc/connect";
import type { Redis } from "ioredis";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { AllocateRequestSchema, AllocateResponseSchema, IpamService } from "../gen/microvpc/v1/ipam_pb.js";
import { grpcFrame, h2Sessions, unaryCall } from "./lib/h2-unary.js";
import { rawH2Connections, type RawH2Connection } from "./lib/h2-raw.js";
import { grpcClient, grpcTransport } from "../services/common/client.js";
import { connectRedis, waitReady } from "../services/common/redis.js";
import { cidr as parseCidr } from "../services/common/validate.js";
import { K } from "../services/ipam/keys.js";
import { createHash } from "node:crypto";
import { ALLOCATE, CHUNK_BITS, RELEASE } from "../services/ipam/scripts.js";
import { allocationGroups, DEFAULT_EXTRA_RESERVED } from "../services/ipam/service.js";
import { IpamStore, reservedIndexes, type SubnetRec } from "../services/ipam/store.js";
import { Health } from "../gen/grpc/health/v1/health_pb.js";
import { ROOT, shebangNodeFlags, startDaemon, type Daemon } from "../test/lib/daemon.js";
import { freePort, startRedis, type TestRedis } from "../test/lib/redis.js";
import { cpuDelta, machineEnv, cpuSnapshot } from "./lib/cpu.js";
import { closedLoop } from "./lib/load.js";
import { summarize } from "./lib/profile.js";
import { check, dur, heading, num, pct, spr, resultsFile, table, verdictTable, writeJson, type Verdict } from "./lib/report.js";
import { benchArgs, benchClock, intOpt, pick, runBench } from "./lib/run.js";
import { interleaved, median, percentile, sorted, spread, spreadOf, type BenchCase, type Spread } from "./lib/stats.js";

const HERE = dirname(fileURLToPath(import.meta.url));

const opt = benchArgs(
  {
    runs: { type: "string", default: "5" },
    "run-ms": { type: "string", default: "1000" },
    pairs: { type: "string", default: "2000" },
    "skip-cpu-only": { type: "boolean", default: false },
    profile: { type: "boolean", default: false },
  },
  { runs: "1", "run-ms": "100", pairs: "10" },
);

const RUNS = intOpt("runs", opt.runs, 5);
const RUN_MS = intOpt("run-ms", opt["run-ms"], 100);
const WARM_MS = pick(Math.max(300, RUN_MS / 2), 100);
/** A /16 has 65 531 usable addresses: a throughput run never fills its subnet. */
const MAX_OPS = 60_000;
const CONCURRENCY = [1, 16, 64];
const RB_CLIENTS = 50;
const WARM_CALLS = pick(4_000, 200);
/** Connections of the lean client (bench/lib/h2-unary.ts), as h2load's -c in bench:rpc. */
const LEAN_CONNECTIONS = 4;
const RB_REQUESTS = pick(20_000, 1_000);
const PAIRS = intOpt("pairs", opt.pairs, 10);
const PAIR_WARM = pick(200, 10);
const PAIR_MAX_MS = 2_500;
/** Soft budget: optional passes are skipped once past it (the brief: < ~4 min). */
const BUDGET_MS = 200_000;
const EXTRA = DEFAULT_EXTRA_RESERVED;
/** Section 6: VPC + subnet life cycles measured (interleaved with the raw round trip). */
const LIFECYCLES = pick(200, 5);

const { t0, progress } = benchClock();

// ---------------------------------------------------------------- processes

let redis: TestRedis | undefined;
let daemon: Daemon | undefined;
let conn: Redis | undefined;
let benchChild: ChildProcess | undefined;
/** The frames client's connections (bench/lib/h2-raw.ts), closed at cleanup. */
let framesConns: RawH2Connection[] = [];
let floorProc: ChildProcess | undefined;
let ceilingProc: ChildProcess | undefined;
let profileDir: string | undefined;
let cleaned = false;

async function cleanup(): Promise<void> {
  if (cleaned) return;
  cleaned = true;
  for (const c of [benchChild, floorProc, ceilingProc]) if (c && c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
  for (const c of framesConns) c.close();
  conn?.disconnect();
  await daemon?.stop().catch(() => {});
  await redis?.stop().catch(() => {});
}

// Past the time budget (benchClock exits) or on any other exit before
// cleanup() ran: end every process of the run by PID, synchronously.
process.on("exit", () => {
  if (cleaned) return;
  for (const c of [benchChild, floorProc, ceilingProc, daemon?.proc, redis?.proc]) if (c && c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
});

process.on("SIGINT", () => {
  progress("interrupted; stopping redis-server and microvpcd");
  void cleanup().then(() => process.exit(130));
});

/**
 * Loaded into microvpcd with NODE_OPTIONS=--import (which refuses --cpu-prof):
 * starts V8's sampling profiler on SIGUSR2, so the warm-up stays out of the
 * profile, and writes it when the daemon exits.
 */
const PROFILER_HOOK = `
import { Session } from "node:inspector";
import { writeFileSync } from "node:fs";
const s = new Session();
s.connect();
let on = false;
process.on("SIGUSR2", () => {
  if (on) return;
  on = true;
  s.post("Profiler.enable");
  s.post("Profiler.setSamplingInterval", { interval: 250 });
  s.post("Profiler.start");
});
process.on("exit", () => {
  if (!on) return;
  s.post("Profiler.stop", (err, r) => {
    if (!err) writeFileSync(process.env.MVPC_PROFILE_DIR + "/daemon-" + process.pid + ".cpuprofile", JSON.stringify(r.profile));
  });
});
`;

/** Starts a bench/lib server (grpc-floor-server.ts, grpc-ipam-ceiling-server.ts) as its own process; returns it and its address. */
async function startLibServer(file: string, args: string[] = [], nodeFlags: string[] = []): Promise<{ proc: ChildProcess; address: string }> {
  const port = await freePort();
  const p = spawn(process.execPath, [...nodeFlags, "--import", "tsx", join(HERE, "lib", file), String(port), ...args], {
    cwd: ROOT,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  p.stderr!.on("data", (d) => (out += d));
  await new Promise<void>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`${file} not up after 20 s: ${out}`)), 20_000);
    p.stdout!.on("data", (d) => {
      if (String(d).includes("listening")) {
        clearTimeout(t);
        resolve();
      }
    });
    p.once("exit", (code) => {
      clearTimeout(t);
      reject(new Error(`${file} exited with ${code}: ${out}`));
    });
  });
  return { proc: p, address: `127.0.0.1:${port}` };
}

// ------------------------------------------------------------- Redis state

/**
 * Section 6: `n` rounds of one HSET round trip (the baseline) and a VPC and
 * subnet life cycle through the store; each call's latency, and in a second,
 * shorter pass the Redis commands each kind of call costs (INFO stats).
 */
async function catalogLifecycles(n: number): Promise<{ rows: { call: string; p50Us: number; p99Us: number; commands: number }[] }> {
  await resetDb();
  const st = store();
  const calls = ["HSET (baseline)", "CreateVpc", "CreateSubnet", "DeleteSubnet", "DeleteVpc"] as const;
  const us: Record<string, number[]> = Object.fromEntries(calls.map((c) => [c, []]));
  const commands: Record<string, number> = Object.fromEntries(calls.map((c) => [c, 0]));
  const processed = async () => Number((await info("stats")).total_commands_processed);
  const countN = Math.min(n, 20);
  for (let i = 0; i < n; i++) {
    const counting = i < countN;
    const timed = async (call: (typeof calls)[number], f: () => Promise<unknown>) => {
      const c0 = counting ? await processed() : 0;
      const t = performance.now();
      await f();
      us[call].push((performance.now() - t) * 1000);
      // INFO itself is one command: not the call's.
      if (counting) commands[call] += (await processed()) - c0 - 1;
    };
    await timed("HSET (baseline)", () => conn!.hset("bench:rt", "f", String(i)));
    let vpcId = "";
    await timed("CreateVpc", async () => (vpcId = await newVpc(`cat-${i}`, "10.20.0.0/16")));
    let sn: SubnetRec | undefined;
    await timed("CreateSubnet", async () => (sn = await newSubnet(vpcId, "s", "10.20.1.0/24")));
    await timed("DeleteSubnet", () => st.deleteSubnet(sn!.id));
    await timed("DeleteVpc", () => st.deleteVpc(vpcId));
  }
  return {
    rows: calls.map((call) => {
      const s = sorted(us[call]);
      return { call, p50Us: percentile(s, 50), p99Us: percentile(s, 99), commands: commands[call] / countN };
    }),
  };
}

function store(): IpamStore {
  return new IpamStore(conn!);
}

async function info(section: string): Promise<Record<string, string>> {
  const text = await conn!.info(section);
  const out: Record<string, string> = {};
  for (const line of text.split("\r\n")) {
    const i = line.indexOf(":");
    if (i > 0) out[line.slice(0, i)] = line.slice(i + 1);
  }
  return out;
}

/**
 * Empties the database and, if the AOF has grown, compacts it now, so that
 * Redis' automatic rewrite (a fork at 64 MB) never lands inside a run.
 */
async function resetDb(): Promise<void> {
  await conn!.flushdb();
  const p = await info("persistence");
  if (Number(p.aof_current_size ?? 0) > 16 * 1024 * 1024 && p.aof_rewrite_in_progress === "0") {
    await conn!.bgrewriteaof();
  }
  for (;;) {
    const q = await info("persistence");
    if (q.aof_rewrite_in_progress !== "1" && q.aof_rewrite_scheduled !== "1") break;
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function newVpc(name: string, cidrText: string): Promise<string> {
  const c = parseCidr("cidr", cidrText, { min: 8, max: 28 });
  const { vpc } = await store().createVpc({ name, cidr: c.text, base: c.base, prefix: c.prefix, description: "bench", labels: [], publicCidr: false }, "");
  return vpc.id;
}

async function newSubnet(vpcId: string, name: string, cidrText: string): Promise<SubnetRec> {
  const c = parseCidr("cidr", cidrText, { min: 8, max: 28 });
  const { subnet } = await store().createSubnet(
    { vpcId, name, cidr: c.text, base: c.base, prefix: c.prefix, size: c.size, type: "private", extraReserved: EXTRA, description: "bench", labels: [] },
    "",
  );
  return subnet;
}

/** An empty database with one VPC holding one empty /16. */
async function freshSlash16(): Promise<SubnetRec> {
  await resetDb();
  return newSubnet(await newVpc("bench", "10.0.0.0/8"), "s", "10.1.0.0/16");
}

/**
 * Marks every address of the subnet but the last usable one (size-2) as held,
 * writing the bitmap directly and keeping the invariants of scripts.ts: the
 * bits, the summary bitmap (1 = 4096-bit chunk full) and the used counter.
 * The per-address records (alloc/req/idx hashes) are not written, so these
 * addresses look reserved; the allocate path never reads them.
 */
async function fillAllButLast(s: SubnetRec): Promise<void> {
  const bits = Buffer.alloc(s.size / 8, 0xff);
  const last = s.size - 2;
  bits[last >> 3] &= ~(0x80 >> (last & 7));
  const nchunks = Math.ceil(s.size / CHUNK_BITS);
  const full = Buffer.alloc(Math.ceil(nchunks / 8), 0);
  const lastChunk = Math.floor(last / CHUNK_BITS);
  for (let c = 0; c < nchunks; c++) if (c !== lastChunk) full[c >> 3] |= 0x80 >> (c & 7);
  const used = s.size - reservedIndexes(s.size, s.extraReserved).length - 1;
  await conn!.multi().set(K.bits(s.vpcId, s.id), bits).set(K.full(s.vpcId, s.id), full).set(K.used(s.vpcId, s.id), used).exec();
}

const VERIFY = `
local size, CB = tonumber(ARGV[1]), ${CHUNK_BITS}
local bad = 0
for c = 0, math.ceil(size / CB) - 1 do
  local sb = c * CB / 8
  local eb = math.min(sb + CB / 8 - 1, size / 8 - 1)
  local isfull = (redis.call('BITCOUNT', KEYS[1], sb, eb) == (eb - sb + 1) * 8) and 1 or 0
  if redis.call('GETBIT', KEYS[2], c) ~= isfull then bad = bad + 1 end
end
return {bad, redis.call('BITCOUNT', KEYS[1]), tonumber(redis.call('GET', KEYS[3]) or '0')}
`;

/** Checks summary vs bits and bits vs used counter; throws on a mismatch. */
async function verifyInvariants(s: SubnetRec): Promise<void> {
  const [bad, set, used] = (await conn!.eval(VERIFY, 3, K.bits(s.vpcId, s.id), K.full(s.vpcId, s.id), K.used(s.vpcId, s.id), s.size)) as number[];
  const reserved = reservedIndexes(s.size, s.extraReserved).length;
  if (bad !== 0 || set - reserved !== used) {
    throw new Error(`subnet ${s.cidr}: ${bad} summary chunk(s) disagree with the bits, or ${set} bits set - ${reserved} reserved != used ${used}`);
  }
}

// ------------------------------------------------------------ throughput

type Pids = Record<string, number | undefined>;

interface TputRun {
  ops: number;
  errors: number;
  firstError?: string;
  elapsedMs: number;
  opsPerSec: number;
  p50Us: number;
  p99Us: number;
  /** CPU µs per allocation, per process. */
  cpuPerOp: Record<string, number>;
  /** CPU cores busy on average (sum over processes). */
  cores: number;
  /** Addresses the used counter says were created; must equal ops. */
  created: number;
}

type OpFactory = (s: SubnetRec) => (worker: number, seq: number) => Promise<unknown>;

interface Mode {
  name: string;
  make: OpFactory;
  /** Each call allocates one address (checked against the used counter). */
  allocates: boolean;
}

async function throughputRun(workers: number, mode: Mode, durationMs: number, pids: Pids): Promise<TputRun> {
  const s = await freshSlash16();
  const op = mode.make(s);
  const before = cpuSnapshot(pids);
  const r = await closedLoop(op, { workers, durationMs, maxOps: MAX_OPS });
  const cpu = cpuDelta(before, cpuSnapshot(pids));
  const created = mode.allocates ? Number((await conn!.get(K.used(s.vpcId, s.id))) ?? 0) : r.ops;
  if (r.errors > 0) progress(`  ${r.errors} error(s), first: ${r.firstError}`);
  const cpuPerOp: Record<string, number> = {};
  let total = 0;
  for (const [k, v] of Object.entries(cpu)) {
    cpuPerOp[k] = v / Math.max(1, r.ops);
    total += Number.isFinite(v) ? v : 0;
  }
  return {
    ops: r.ops,
    errors: r.errors,
    firstError: r.firstError,
    elapsedMs: r.elapsedMs,
    opsPerSec: r.opsPerSec,
    p50Us: r.p50Us,
    p99Us: r.p99Us,
    cpuPerOp,
    cores: total / 1000 / r.elapsedMs,
    created,
  };
}

interface TputSummary {
  name: string;
  workers: number;
  runs: TputRun[];
  opsPerSec: Spread;
  p50Us: Spread;
  p99Us: Spread;
  cpuPerOp: Record<string, number>;
  cores: number;
  errors: number;
  lost: number;
}

function summarizeTput(name: string, workers: number, runs: TputRun[]): TputSummary {
  const cpuPerOp: Record<string, number> = {};
  for (const k of Object.keys(runs[0]?.cpuPerOp ?? {})) cpuPerOp[k] = median(runs.map((r) => r.cpuPerOp[k]));
  return {
    name,
    workers,
    runs,
    opsPerSec: spreadOf(runs, (r) => r.opsPerSec),
    p50Us: spreadOf(runs, (r) => r.p50Us),
    p99Us: spreadOf(runs, (r) => r.p99Us),
    cpuPerOp,
    cores: median(runs.map((r) => r.cores)),
    errors: runs.reduce((a, r) => a + r.errors, 0),
    lost: runs.reduce((a, r) => a + (r.ops - r.created), 0),
  };
}

/** Paired ratios a[i]/b[i] of runs made in the same round. */
function pairedRatios(a: TputRun[], b: TputRun[]): Spread {
  const n = Math.min(a.length, b.length);
  return spread(Array.from({ length: n }, (_, i) => a[i].opsPerSec / b[i].opsPerSec));
}

// -------------------------------------------------------- redis-benchmark

interface RbRun {
  rps: number;
  p50Ms: number;
  p99Ms: number;
  requests: number;
  created: number;
  redisCpuPerOpUs: number;
}

async function redisBenchmarkRun(sha: string, clients: number, requests: number, port: number, redisPid: number): Promise<RbRun> {
  const s = await freshSlash16();
  // Each __rand_int__ is replaced independently per request (-r): the
  // request id is unique, so every call takes the allocation path. The owner
  // zset key and the owner argument get different random values: the cost is
  // that of a real call (one new small zset per allocation), the owner index
  // is meaningless, and the subnet is thrown away after the run.
  const v = s.vpcId;
  const keys = [...K.state(v, s.id), K.owner(v, "vm-__rand_int__"), K.events];
  const argv = ["vm-__rand_int__", "req-__rand_int__", "-1", String(Date.now()), s.id, String(s.size)];
  const args = [
    "-h",
    "127.0.0.1",
    "-p",
    String(port),
    "-c",
    String(clients),
    "-n",
    String(requests),
    "-r",
    "2147483647",
    "--csv",
    "EVALSHA",
    sha,
    String(keys.length),
    ...keys,
    ...argv,
  ];
  const cpu0 = cpuSnapshot({ redis: redisPid });
  const out = await new Promise<string>((resolve, reject) => {
    const child = spawn("redis-benchmark", args, { stdio: ["ignore", "pipe", "pipe"] });
    benchChild = child;
    let stdout = "";
    let stderr = "";
    child.stdout!.on("data", (d) => (stdout += d));
    child.stderr!.on("data", (d) => (stderr += d));
    const timer = setTimeout(() => child.kill("SIGKILL"), 60_000);
    child.on("error", (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on("exit", (code, signal) => {
      clearTimeout(timer);
      benchChild = undefined;
      if (code === 0) resolve(stdout);
      else reject(new Error(`redis-benchmark exited with ${code ?? signal}: ${stderr.trim() || stdout.trim()}`));
    });
  });
  const cpu = cpuDelta(cpu0, cpuSnapshot({ redis: redisPid }));
  // CSV: "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
  const line = out
    .trim()
    .split("\n")
    .filter((l) => /^"EVALSHA/i.test(l))
    .at(-1);
  const nums = line ? [...line.matchAll(/"([0-9.]+)"/g)].map((m) => Number(m[1])) : [];
  if (nums.length < 7) throw new Error(`cannot read redis-benchmark output: ${out.slice(0, 300)}`);
  const [rps, , , p50, , p99] = nums.slice(-7);
  const created = Number((await conn!.get(K.used(s.vpcId, s.id))) ?? 0);
  return { rps, p50Ms: p50, p99Ms: p99, requests, created, redisCpuPerOpUs: cpu.redis / requests };
}

// ----------------------------------------------------- per-op latency

interface PairRun {
  pairs: number;
  /** Client-observed allocate latency, µs. */
  allocP50Us: number;
  allocP99Us: number;
  /** Time the allocate script ran inside Redis (SLOWLOG), µs. */
  scriptP50Us: number;
  scriptMeanUs: number;
  releaseScriptP50Us: number;
}

/** Single caller: allocate the next free address, then release it, n times. */
async function pairRun(s: SubnetRec, expectIndex: number, n: number, tag: string): Promise<PairRun> {
  const st = store();
  await conn!.call("SLOWLOG", "RESET");
  const lat = new Float64Array(n);
  const deadline = performance.now() + PAIR_MAX_MS;
  let i = 0;
  for (; i < n && performance.now() < deadline; i++) {
    const owner = `vm-${tag}-${i}`;
    const t = performance.now();
    const { alloc } = await st.allocate(s, owner, "nic0", -1);
    lat[i] = (performance.now() - t) * 1000;
    if (alloc.index !== expectIndex) throw new Error(`${s.cidr}: allocate gave index ${alloc.index}, expected ${expectIndex}: the fill is wrong`);
    await st.release(s, alloc.index, owner, "");
  }
  const log = (await conn!.call("SLOWLOG", "GET", String(4 * n + 100))) as [number, number, number, string[]][];
  const allocUs: number[] = [];
  const releaseUs: number[] = [];
  for (const e of log) {
    const a = e[3];
    if (!/^eval(sha)?$/i.test(a[0] ?? "")) continue;
    // By the script's SHA1 (EVALSHA's first argument): both take the same keys.
    if (a[1] === ALLOCATE_SHA) allocUs.push(e[2]);
    else if (a[1] === RELEASE_SHA) releaseUs.push(e[2]);
  }
  const sl = sorted(lat.subarray(0, i));
  return {
    pairs: i,
    allocP50Us: percentile(sl, 50),
    allocP99Us: percentile(sl, 99),
    scriptP50Us: median(allocUs),
    scriptMeanUs: allocUs.reduce((a, b) => a + b, 0) / Math.max(1, allocUs.length),
    releaseScriptP50Us: median(releaseUs),
  };
}

const ALLOCATE_SHA = createHash("sha1").update(ALLOCATE).digest("hex");
const RELEASE_SHA = createHash("sha1").update(RELEASE).digest("hex");

/** SLOWLOG time of a plain command, median of n calls, µs. */
async function commandUs(n: number, ...cmd: string[]): Promise<number> {
  await conn!.call("SLOWLOG", "RESET");
  for (let i = 0; i < n; i++) await conn!.call(cmd[0], ...cmd.slice(1));
  const log = (await conn!.call("SLOWLOG", "GET", String(n + 10))) as [number, number, number, string[]][];
  return median(log.filter((e) => e[3][0]?.toUpperCase() === cmd[0].toUpperCase()).map((e) => e[2]));
}

// ------------------------------------------------------------------- main

async function main(): Promise<number> {
  try {
    return await measureAndReport();
  } finally {
    // Every process this bench started, by PID: redis-server, microvpcd,
    // the floor server, a redis-benchmark still running.
    await cleanup();
    if (profileDir) rmSync(profileDir, { recursive: true, force: true });
  }
}

async function measureAndReport(): Promise<number> {
  let daemonEnv: Record<string, string> = {};
  if (opt.profile) {
    profileDir = mkdtempSync(join(tmpdir(), "mvpc-prof-"));
    writeFileSync(join(profileDir, "hook.mjs"), PROFILER_HOOK);
    daemonEnv = { NODE_OPTIONS: `--import ${join(profileDir, "hook.mjs")}`, MVPC_PROFILE_DIR: profileDir };
  }
  progress("starting redis-server (AOF, appendfsync always) and microvpcd ipam");
  redis = await startRedis();
  daemon = await startDaemon("ipam", ["--redis", redis.url], daemonEnv);
  const fl0 = await startLibServer("grpc-floor-server.ts");
  floorProc = fl0.proc;
  const floorAddress = fl0.address;
  // With microvpcd's node flags (its #! line: the young generation's size), as bench:rpc's bare grpc-js server.
  const ce0 = await startLibServer("grpc-ipam-ceiling-server.ts", [redis.url], shebangNodeFlags(join(ROOT, "bin", "microvpcd.js")));
  ceilingProc = ce0.proc;
  conn = connectRedis({ url: redis.url, commandTimeoutMs: 10_000 });
  await waitReady(conn);
  const pids: Pids = { bench: process.pid, daemon: daemon.proc.pid, redis: redis.proc.pid, floor: floorProc.pid, ceiling: ceilingProc.pid };
  const redisInfo = await info("server");
  const persistence = await conn.config("GET", "appendfsync");
  const env = {
    ...machineEnv(),
    redis: redisInfo.redis_version,
    appendfsync: (persistence as string[])[1],
    runs: RUNS,
    runMs: RUN_MS,
    pairs: PAIRS,
  };

  const shared = grpcClient(IpamService, grpcTransport({ address: daemon.address }));
  const perConn: Client<typeof IpamService>[] = Array.from({ length: Math.max(...CONCURRENCY) }, () =>
    grpcClient(IpamService, grpcTransport({ address: daemon!.address })),
  );
  const rawOp: OpFactory = (s) => {
    const st = store();
    return (_w, seq) => st.allocate(s, `vm-${seq}`, `req-${seq}`, -1);
  };
  // As microvpcd calls the store for the Allocate calls of a subnet that arrive together (one script a group).
  const rawTogetherOp: OpFactory = (s) => {
    const groups = allocationGroups(store());
    return (_w, seq) => groups.add(s.id, { s, owner: `vm-${seq}`, requestId: `req-${seq}`, wanted: -1 });
  };
  const grpcSharedOp: OpFactory = (s) => (_w, seq) => shared.allocate({ subnetId: s.id, owner: `vm-${seq}`, requestId: `req-${seq}` });
  const grpcConnOp: OpFactory = (s) => (w, seq) => perConn[w].allocate({ subnetId: s.id, owner: `vm-${seq}`, requestId: `req-${seq}` });
  const lean = await h2Sessions(daemon.address, LEAN_CONNECTIONS);
  const frames = await rawH2Connections(daemon.address, LEAN_CONNECTIONS);
  const ceilingFrames = await rawH2Connections(ce0.address, LEAN_CONNECTIONS);
  framesConns = [...frames, ...ceilingFrames];
  const ALLOCATE_PATH = `/${IpamService.typeName}/${IpamService.method.allocate.name}`;
  /** Allocate over a hand-framed unary call (`call`: the lean or the frames client), each call a new owner and request id. */
  const framedAllocateOp =
    (call: (w: number, framed: Buffer) => Promise<Buffer>): OpFactory =>
    (s) =>
    async (w, seq) => {
      const req = toBinary(AllocateRequestSchema, create(AllocateRequestSchema, { subnetId: s.id, owner: `vm-${seq}`, requestId: `req-${seq}` }));
      const res = fromBinary(AllocateResponseSchema, await call(w, grpcFrame(req)));
      if (!res.created) throw new Error(`Allocate vm-${seq}/req-${seq} did not allocate`);
    };
  const grpcLeanOp = framedAllocateOp((w, framed) => unaryCall(lean[w % lean.length], ALLOCATE_PATH, framed));
  const framesOp = (conns: RawH2Connection[]) => framedAllocateOp((w, framed) => conns[w % conns.length].call(ALLOCATE_PATH, framed));
  const grpcFramesOp = framesOp(frames);
  const ceilingOp = framesOp(ceilingFrames);
  const floor = grpcClient(Health, grpcTransport({ address: floorAddress }));
  const floorOp: OpFactory = () => () => floor.check({});

  const modes = (c: number, only?: string[]): Mode[] => {
    const all: Mode[] = [
      { name: "raw", make: rawOp, allocates: true },
      { name: "raw-together", make: rawTogetherOp, allocates: true },
      { name: "grpc-shared", make: grpcSharedOp, allocates: true },
      { name: "grpc-per-conn", make: grpcConnOp, allocates: true },
      { name: "grpc-lean", make: grpcLeanOp, allocates: true },
      { name: "grpc-frames", make: grpcFramesOp, allocates: true },
      { name: "grpc-floor", make: floorOp, allocates: false },
      { name: "grpc-ceiling", make: ceilingOp, allocates: true },
    ];
    // At one client both gRPC modes are one connection; the framework floor
    // and the stack's ceiling are measured at the concurrency of the target only.
    const at64 = ["grpc-floor", "grpc-ceiling"];
    return all.filter(
      (m) => (c > 1 || (m.name !== "grpc-per-conn" && m.name !== "raw-together")) && (c === 64 || !at64.includes(m.name)) && (!only || only.includes(m.name)),
    );
  };
  const tputCases = (c: number, only?: string[]): BenchCase<TputRun>[] =>
    modes(c, only).map((m) => ({
      name: m.name,
      run: (_round, warm) => throughputRun(c, m, warm ? WARM_MS : RUN_MS, pids),
    }));

  // ---- Warm-up by call count, so that V8 has optimised the hot paths of the
  // bench client and of microvpcd before the first measured run (a time-based
  // warm-up at one caller would be a few hundred calls only).
  progress(`warm-up: ${WARM_CALLS} calls each through ioredis, the shared gRPC transport and the ${perConn.length} per-client transports`);
  const warmStart = performance.now();
  for (const m of modes(64)) {
    const s = await freshSlash16();
    const r = await closedLoop(m.make(s), { workers: 64, durationMs: 30_000, maxOps: WARM_CALLS });
    if (r.errors > 0) throw new Error(`warm-up failed: ${r.firstError}`);
  }
  const warmMs = performance.now() - warmStart;
  if (profileDir) process.kill(daemon.proc.pid!, "SIGUSR2");

  // ---- 1a + 2: raw script and gRPC, interleaved per concurrency level
  const tput: Record<string, Record<number, TputSummary>> = {
    raw: {},
    "raw-together": {},
    "grpc-shared": {},
    "grpc-per-conn": {},
    "grpc-lean": {},
    "grpc-frames": {},
    "grpc-floor": {},
    "grpc-ceiling": {},
  };
  for (const c of CONCURRENCY) {
    progress(`throughput at ${c} concurrent caller(s): raw script vs gRPC, ${RUNS} interleaved rounds of ${RUN_MS} ms`);
    const res = await interleaved(tputCases(c), { rounds: RUNS, warmupRounds: 1 });
    for (const [m, runs] of res) tput[m][c] = summarizeTput(m, c, runs);
  }

  // ---- 1b: redis-benchmark
  let rb: { runs: RbRun[]; rps: Spread; p50Ms: Spread; p99Ms: Spread; note: string } | { skipped: string };
  try {
    progress(`redis-benchmark: EVALSHA allocate, ${RB_CLIENTS} clients, ${RB_REQUESTS} requests per run`);
    const sha = (await conn.script("LOAD", ALLOCATE)) as string;
    const runs: RbRun[] = [];
    await redisBenchmarkRun(sha, RB_CLIENTS, RB_REQUESTS / 4, redis.port, redis.proc.pid!); // warm-up
    for (let i = 0; i < RUNS; i++) runs.push(await redisBenchmarkRun(sha, RB_CLIENTS, RB_REQUESTS, redis.port, redis.proc.pid!));
    const collisions = runs.reduce((a, r) => a + r.requests - r.created, 0);
    rb = {
      runs,
      rps: spreadOf(runs, (r) => r.rps),
      p50Ms: spreadOf(runs, (r) => r.p50Ms),
      p99Ms: spreadOf(runs, (r) => r.p99Ms),
      note:
        `unique random request ids (-r): ${collisions} of ${runs.length * RB_REQUESTS} calls hit an existing id instead of allocating; ` +
        `one fresh /16 per run, so every run measures an almost empty bitmap`,
    };
  } catch (err) {
    rb = { skipped: `redis-benchmark skipped: ${(err as Error).message}` };
    progress(rb.skipped);
  }

  // ---- 5: batch allocation, addresses per second
  const BATCH = 64;
  const BATCH_CLIENTS = [1, 16];
  const batchModes: { name: string; make: (s: SubnetRec) => (w: number, seq: number) => Promise<unknown> }[] = [
    {
      name: "raw batch script",
      make: (s) => {
        const st = store();
        return (_w, seq) => st.allocateBatch(s, `pool-${seq}`, `b-${seq}`, BATCH);
      },
    },
    {
      name: "gRPC AllocateBatch",
      make: (s) => (w, seq) => perConn[w].allocateBatch({ subnetId: s.id, owner: `pool-${seq}`, requestId: `b-${seq}`, count: BATCH }),
    },
  ];
  const batchRun = async (workers: number, make: (s: SubnetRec) => (w: number, seq: number) => Promise<unknown>, ms: number) => {
    const sn = await freshSlash16();
    // A /16 holds 1023 batches of 64: the run stops before it is full.
    const r = await closedLoop(make(sn), { workers, durationMs: ms, maxOps: Math.floor((sn.size - 8) / BATCH) - workers });
    const used = Number((await conn!.get(K.used(sn.vpcId, sn.id))) ?? 0);
    if (r.errors > 0) progress(`  ${r.errors} error(s), first: ${r.firstError}`);
    return {
      calls: r.ops,
      errors: r.errors,
      addrsPerSec: (r.ops * BATCH) / (r.elapsedMs / 1000),
      p50Us: r.p50Us,
      p99Us: r.p99Us,
      used,
      ok: used === r.ops * BATCH,
    };
  };
  type BatchRun = Awaited<ReturnType<typeof batchRun>>;
  const batch: Record<string, Record<number, { runs: BatchRun[]; addrsPerSec: Spread; p50Us: Spread }>> = {};
  progress(`batch allocation: ${BATCH} addresses a call, ${BATCH_CLIENTS.join("/")} clients, raw script vs gRPC, ${RUNS} interleaved rounds of ${RUN_MS} ms`);
  {
    const cases: BenchCase<BatchRun>[] = [];
    for (const c of BATCH_CLIENTS)
      for (const m of batchModes) cases.push({ name: `${m.name}@${c}`, run: (_round, warm) => batchRun(c, m.make, warm ? WARM_MS : RUN_MS) });
    const res = await interleaved(cases, { rounds: RUNS, warmupRounds: 1 });
    for (const [k, runs] of res) {
      const [m, c] = k.split("@");
      (batch[m] ??= {})[Number(c)] = { runs, addrsPerSec: spreadOf(runs, (r) => r.addrsPerSec), p50Us: spreadOf(runs, (r) => r.p50Us) };
    }
  }

  // ---- CPU-only pass at 64: the same comparison with appendfsync=no
  let cpuOnly: Record<string, TputSummary> | { skipped: string };
  if (opt["skip-cpu-only"]) cpuOnly = { skipped: "skipped (--skip-cpu-only)" };
  else if (Date.now() - t0 > BUDGET_MS * 0.6) cpuOnly = { skipped: `skipped: the run is already ${((Date.now() - t0) / 1000).toFixed(0)} s in` };
  else {
    progress("CPU-only pass at 64 callers (CONFIG SET appendfsync no; restored afterwards)");
    await conn.config("SET", "appendfsync", "no");
    try {
      const res = await interleaved(tputCases(64, ["raw", "grpc-shared", "grpc-per-conn"]), { rounds: RUNS, warmupRounds: 1 });
      cpuOnly = {};
      for (const [m, runs] of res) cpuOnly[m] = summarizeTput(m, 64, runs);
    } finally {
      await conn.config("SET", "appendfsync", "always");
    }
  }

  // ---- 3 + 4: first-free vs last-free, /24 vs /8
  progress(`per-op latency: /16, /24, /8, empty vs filled to all but the last address; ${RUNS} interleaved rounds of ${PAIRS} allocate+release`);
  await resetDb();
  const vSmall = await newVpc("sizes", "10.0.0.0/8");
  const vBigEmpty = await newVpc("slash8-empty", "10.0.0.0/8");
  const vBigFull = await newVpc("slash8-full", "10.0.0.0/8");
  const subnets = {
    "/16 first-free": await newSubnet(vSmall, "s16-empty", "10.1.0.0/16"),
    "/16 last-free": await newSubnet(vSmall, "s16-full", "10.2.0.0/16"),
    "/24 first-free": await newSubnet(vSmall, "s24-empty", "10.3.0.0/24"),
    "/24 last-free": await newSubnet(vSmall, "s24-full", "10.3.1.0/24"),
    "/8 first-free": await newSubnet(vBigEmpty, "s8-empty", "10.0.0.0/8"),
    "/8 last-free": await newSubnet(vBigFull, "s8-full", "10.0.0.0/8"),
  };
  const fillStart = performance.now();
  for (const [name, s] of Object.entries(subnets)) {
    if (name.endsWith("last-free")) await fillAllButLast(s);
    await verifyInvariants(s);
  }
  const fillMs = performance.now() - fillStart;
  const expected = (name: string, s: SubnetRec) => (name.endsWith("last-free") ? s.size - 2 : 2 + s.extraReserved);
  await conn.config("SET", "slowlog-log-slower-than", "0");
  await conn.config("SET", "slowlog-max-len", String(4 * PAIRS + 100));
  let pairRes: Map<string, PairRun[]>;
  let naive: { slash8Us: number; slash16Us: number };
  try {
    pairRes = await interleaved(
      Object.entries(subnets).map(([name, s]) => ({
        name,
        run: (round, warm) => pairRun(s, expected(name, s), warm ? PAIR_WARM : PAIRS, `${round}`),
      })),
      { rounds: RUNS, warmupRounds: 1 },
    );
    for (const s of Object.values(subnets)) await verifyInvariants(s);
    // What the summary bitmap saves: BITPOS from bit 0 over the whole bitmap.
    naive = {
      slash8Us: await commandUs(21, "BITPOS", K.bits(subnets["/8 last-free"].vpcId, subnets["/8 last-free"].id), "0"),
      slash16Us: await commandUs(21, "BITPOS", K.bits(subnets["/16 last-free"].vpcId, subnets["/16 last-free"].id), "0"),
    };
  } finally {
    await conn.config("SET", "slowlog-log-slower-than", "10000");
    await conn.config("SET", "slowlog-max-len", "128");
  }
  const pairs: Record<
    string,
    { runs: PairRun[]; allocP50Us: Spread; allocP99Us: Spread; scriptP50Us: Spread; scriptMeanUs: Spread; releaseScriptP50Us: Spread }
  > = {};
  for (const [name, runs] of pairRes) {
    pairs[name] = {
      runs,
      allocP50Us: spreadOf(runs, (r) => r.allocP50Us),
      allocP99Us: spreadOf(runs, (r) => r.allocP99Us),
      scriptP50Us: spreadOf(runs, (r) => r.scriptP50Us),
      scriptMeanUs: spreadOf(runs, (r) => r.scriptMeanUs),
      releaseScriptP50Us: spreadOf(runs, (r) => r.releaseScriptP50Us),
    };
  }

  progress(`6. the catalog: ${LIFECYCLES} VPC and subnet life cycles`);
  const catalog = await catalogLifecycles(LIFECYCLES);

  const elapsedS = (Date.now() - t0) / 1000;
  const loadAtEnd = loadavg().map((x) => Number(x.toFixed(2)));
  progress("done measuring; stopping processes");
  await cleanup();

  // ================================================================ report
  const out: string[] = [];
  const p = (s = "") => out.push(s);
  p(heading("microvpc IPAM benchmark"));
  p(
    `${env.date} · node ${env.node} · redis ${env.redis} · ${env.cores} × ${env.cpu} · load avg ${env.loadavgAtStart.join(" ")} at start, ${loadAtEnd.join(" ")} at end`,
  );
  p(`Redis: AOF, appendfsync ${env.appendfsync} (durable, as shipped) unless a row says otherwise. ${RUNS} measured runs per figure after a`);
  p(`warm-up, cases interleaved round by round; figures are "median (min–max over runs)". Each throughput run: ${RUN_MS} ms (or`);
  p(`${num(MAX_OPS)} calls) on a fresh /16, after a warm-up of ${num(WARM_CALLS)} calls per path (${num(warmMs / 1000)} s). The bench client, microvpcd`);
  p(`and redis-server share the same ${env.cores} cores (with whatever else runs on the machine: see the load average).`);

  p(heading("1. Baseline: the allocate script straight on Redis"));
  p("(a) IpamStore.allocate (the script once a call) over one ioredis connection, auto-pipelined like the daemon's: the baseline of every");
  p("    ratio. together = the same callers through allocationGroups, as microvpcd answers the calls of a subnet that arrive in one turn");
  p("    of its event loop: one ALLOCATE_MANY script a group (services/ipam/service.ts).");
  p(
    table(
      ["callers", "path", "ops/s", "p50", "p99", "CPU µs/op bench+redis", "cores busy"],
      CONCURRENCY.flatMap((c) =>
        (["raw", "raw-together"] as const).flatMap((m) => {
          const t = tput[m][c];
          if (!t) return [];
          const path = m === "raw" ? "a script a call" : "together";
          return [
            [String(c), path, spr(t.opsPerSec), spr(t.p50Us, dur), spr(t.p99Us, dur), `${num(t.cpuPerOp.bench)} + ${num(t.cpuPerOp.redis)}`, num(t.cores)],
          ];
        }),
      ),
    ),
  );
  {
    const [one, tog] = [tput.raw[64], tput["raw-together"][64]];
    if (one && tog)
      p(
        `    at 64: answered together, Redis spends ${num(tog.cpuPerOp.redis)} µs per address against ${num(one.cpuPerOp.redis)}, the caller ${num(tog.cpuPerOp.bench)} against ${num(one.cpuPerOp.bench)}.`,
      );
  }
  p();
  if ("skipped" in rb) p(`(b) ${rb.skipped}`);
  else {
    p(`(b) redis-benchmark -c ${RB_CLIENTS} -n ${num(RB_REQUESTS)} -r 2147483647 EVALSHA <allocate> with __rand_int__ owner and request ids`);
    p(
      table(
        ["clients", "ops/s", "p50", "p99", "redis CPU µs/op"],
        [
          [
            String(RB_CLIENTS),
            spr(rb.rps),
            spr(rb.p50Ms, (x) => dur(x * 1000)),
            spr(rb.p99Ms, (x) => dur(x * 1000)),
            num(median(rb.runs.map((r) => r.redisCpuPerOpUs))),
          ],
        ],
      ),
    );
    p(`    ${rb.note}.`);
    p(`    (issue 2 measured a bare BITPOS+SETBIT script at ≈ 67k ops/s; this script also writes 2 hashes, 2 zsets, a counter, a stream entry)`);
  }

  p(heading("2. gRPC Allocate through microvpcd ipam"));
  p("shared = every caller on one transport (one HTTP/2 connection, multiplexed); per-conn = one transport, so one connection, per caller;");
  p(`both are connect-node's gRPC transport (the CLI's). lean = node:http2 with hand-framed requests over ${LEAN_CONNECTIONS} connections`);
  p(`(bench/lib/h2-unary.ts); frames = HTTP/2 frames written and read by hand over ${LEAN_CONNECTIONS} TCP connections (bench/lib/h2-raw.ts):`);
  p("the client's cost kept low (frames: what h2load is to bench:rpc), so that the row shows what the daemon costs. The target is judged on frames.");
  const rows2: string[][] = [];
  for (const c of CONCURRENCY) {
    for (const m of ["grpc-shared", "grpc-per-conn", "grpc-lean", "grpc-frames"]) {
      const t = tput[m][c];
      if (!t) continue;
      const raw = tput.raw[c];
      const pr = pairedRatios(t.runs, raw.runs);
      rows2.push([
        String(c),
        m === "grpc-lean" || m === "grpc-frames" ? m.replace("grpc-", "") : c === 1 ? "single" : m.replace("grpc-", ""),
        spr(t.opsPerSec),
        spr(t.p50Us, dur),
        spr(t.p99Us, dur),
        `${pct(t.opsPerSec.median / raw.opsPerSec.median)} (${pct(pr.min)}–${pct(pr.max)})`,
        `${num(t.cpuPerOp.bench)} + ${num(t.cpuPerOp.daemon)} + ${num(t.cpuPerOp.redis)}`,
        num(t.cores),
      ]);
    }
  }
  // The 64-client rows of the two bare servers, each beside the raw script of the same runs.
  const fl = tput["grpc-floor"][64];
  const ce = tput["grpc-ceiling"][64];
  for (const [t, label, server] of [
    [fl, "floor*", fl?.cpuPerOp.floor],
    [ce, "ceiling†", ce?.cpuPerOp.ceiling],
  ] as const) {
    if (!t) continue;
    const raw = tput.raw[64];
    const pr = pairedRatios(t.runs, raw.runs);
    rows2.push([
      "64",
      label,
      spr(t.opsPerSec),
      spr(t.p50Us, dur),
      spr(t.p99Us, dur),
      `${pct(t.opsPerSec.median / raw.opsPerSec.median)} (${pct(pr.min)}–${pct(pr.max)})`,
      `${num(t.cpuPerOp.bench)} + ${num(server ?? 0)} + ${num(t.cpuPerOp.redis)}`,
      num(t.cores),
    ]);
  }
  p(table(["clients", "transport", "ops/s", "p50", "p99", "of raw (paired)", "CPU µs/op client+server+redis", "cores busy"], rows2));
  p("* floor: a bare connect-node server (bench/lib/grpc-floor-server.ts: no interceptors, no Redis) answering Health/Check, shared");
  p("  transport: the most any service on this gRPC stack could do here.");
  p("† ceiling: the frames client against a bare @grpc/grpc-js server (bench/lib/grpc-ipam-ceiling-server.ts) whose Allocate decodes the");
  p("  request, runs the allocate script once through ioredis and answers, with nothing of microvpc's per call (no request id, metrics,");
  p("  validation, logging, adapter): the most a daemon on grpc-js + protobuf-es + ioredis could do with one script a call. microvpcd");
  p("  answers the calls of a subnet that arrive together with one script (ALLOCATE_MANY), so it can pass this row.");
  const errs = Object.values(tput)
    .flatMap((x) => Object.values(x))
    .reduce((a, t) => a + t.errors + t.lost, 0);
  p(`errors or calls that did not allocate: ${errs}`);
  {
    const g = tput["grpc-shared"][64];
    const raw = tput.raw[64];
    const d = g.cpuPerOp.daemon;
    p();
    p(
      `Where the CPU goes at 64 clients (shared transport), µs per Allocate: gRPC client ${num(g.cpuPerOp.bench)}, microvpcd ${num(d)}, redis-server ${num(g.cpuPerOp.redis)};`,
    );
    p(
      `raw script: ioredis caller ${num(raw.cpuPerOp.bench)}, redis-server ${num(raw.cpuPerOp.redis)}.` +
        (fl ? ` Bare connect-node: client ${num(fl.cpuPerOp.bench)}, server ${num(fl.cpuPerOp.floor)}.` : ""),
    );
    const l = tput["grpc-frames"][64];
    if (l) {
      p(
        `Frames client at 64: client ${num(l.cpuPerOp.bench)}, microvpcd ${num(l.cpuPerOp.daemon)}, redis-server ${num(l.cpuPerOp.redis)} µs per Allocate, ` +
          `${num(l.cores)} of the 2 cores busy: the three processes share the cores, so the client's share is taken from the daemon's.`,
      );
      if (ce) {
        p(
          `The bare grpc-js + ioredis server (a script a call) from the same client: server ${num(ce.cpuPerOp.ceiling)} µs per Allocate against microvpcd's ${num(l.cpuPerOp.daemon)}, ` +
            `redis-server ${num(ce.cpuPerOp.redis)} against ${num(l.cpuPerOp.redis)}: microvpc's own per-call work (adapter, request id and scope, metrics, validation, ` +
            `subnet cache, the store's reply handling) against what answering the calls that arrive together with one script saves.`,
        );
      }
    }
    p(`One microvpcd core tops out near ${num(1e6 / d)} Allocate/s; with the clients on other machines, these 2 cores would carry`);
    p(
      `≈ ${num(2e6 / (d + g.cpuPerOp.redis))} Allocate/s through microvpcd vs ≈ ${num(2e6 / (raw.cpuPerOp.bench + raw.cpuPerOp.redis))}/s for the raw script (CPU arithmetic, not measured).`,
    );
  }
  if (!("skipped" in cpuOnly)) {
    p();
    p("CPU-only comparison at 64 callers (appendfsync no: no fsync wait, so the ceiling is the CPU):");
    const raw = cpuOnly.raw;
    p(
      table(
        ["path", "ops/s", "p50", "p99", "of raw", "CPU µs/op client+daemon+redis", "cores busy"],
        Object.values(cpuOnly).map((t) => [
          t.name,
          spr(t.opsPerSec),
          spr(t.p50Us, dur),
          spr(t.p99Us, dur),
          t.name === "raw" ? "–" : pct(t.opsPerSec.median / raw.opsPerSec.median),
          `${num(t.cpuPerOp.bench)} + ${t.name === "raw" ? "0" : num(t.cpuPerOp.daemon)} + ${num(t.cpuPerOp.redis)}`,
          num(t.cores),
        ]),
      ),
    );
  } else p(`CPU-only comparison ${cpuOnly.skipped}`);

  p(heading(`5. Batch allocation: ${BATCH} addresses a call (AllocateBatch), addresses per second`));
  p(`Median (min–max) of ${RUNS} interleaved runs of ${RUN_MS} ms, a fresh /16 each; one Lua script execution per call, all or nothing.`);
  p(`Single Allocate for comparison (one address a call, same runs as section 1/2): raw script and gRPC per connection.`);
  p(
    table(
      [
        "clients",
        "raw batch script addr/s",
        "gRPC AllocateBatch addr/s",
        "gRPC / raw",
        "gRPC call p50",
        "single Allocate gRPC addr/s",
        "single raw script addr/s",
        "batch ÷ single (gRPC)",
      ],
      BATCH_CLIENTS.map((c) => {
        const raw = batch["raw batch script"][c];
        const g = batch["gRPC AllocateBatch"][c];
        const single = tput[c > 1 ? "grpc-per-conn" : "grpc-shared"][c]?.opsPerSec.median ?? Number.NaN;
        return [
          String(c),
          spr(raw.addrsPerSec, (x) => num(x, 0)),
          spr(g.addrsPerSec, (x) => num(x, 0)),
          num(g.addrsPerSec.median / raw.addrsPerSec.median),
          dur(g.p50Us.median),
          num(single, 0),
          num(tput.raw[c]?.opsPerSec.median ?? Number.NaN, 0),
          num(g.addrsPerSec.median / single),
        ];
      }),
    ),
  );
  const batchBad = Object.values(batch)
    .flatMap((byC) => Object.values(byC).flatMap((x) => x.runs))
    .filter((r) => !r.ok || r.errors);
  p(`Every run: used counter = calls × ${BATCH}${batchBad.length ? ` — NOT in ${batchBad.length} run(s)` : " (checked)"}.`);

  p(heading("3 + 4. Cost vs fill and size: one caller, allocate then release the same address"));
  p(`"last-free": every address but the last usable one held (bitmap, summary and used counter written directly, ${num(fillMs)} ms for all).`);
  p(`client = allocate latency seen by the caller (durable: includes the fsync); script = time the script ran inside Redis (SLOWLOG).`);
  p(
    table(
      ["subnet", "address given", "pairs/run", "client p50", "client p99", "script p50", "script mean", "release script p50"],
      Object.entries(pairs).map(([name, r]) => {
        const s = subnets[name as keyof typeof subnets];
        return [
          name,
          `index ${num(expected(name, s), 0)}`,
          num(median(r.runs.map((x) => x.pairs)), 0),
          spr(r.allocP50Us, dur),
          spr(r.allocP99Us, dur),
          spr(r.scriptP50Us, dur),
          spr(r.scriptMeanUs, dur),
          spr(r.releaseScriptP50Us, dur),
        ];
      }),
    ),
  );
  const us1 = (x: number) => (x < 1 ? "< 1 µs" : dur(x));
  p(
    `for scale, a plain BITPOS from bit 0 (what the summary avoids): ${us1(naive.slash8Us)} on the nearly full /8 (2 MiB), ${us1(naive.slash16Us)} on the nearly full /16 (8 KiB).`,
  );

  p(heading("6. The catalog: VPC and subnet creates and deletes through the store (durable Redis)"));
  p(
    `${num(LIFECYCLES, 0)} life cycles (CreateVpc, CreateSubnet, DeleteSubnet, DeleteVpc), each beside one HSET round trip; commands = Redis commands per call (INFO).`,
  );
  p(
    table(
      ["call", "p50", "p99", "p50 ÷ one HSET round trip", "Redis commands / call"],
      catalog.rows.map((r) => [
        r.call,
        dur(r.p50Us),
        dur(r.p99Us),
        r.call === "HSET (baseline)" ? "1" : num(r.p50Us / catalog.rows[0].p50Us, 1),
        num(r.commands, 1),
      ]),
    ),
  );

  // ---- verdicts
  const v: Verdict[] = [];
  for (const c of CONCURRENCY) {
    for (const m of ["grpc-shared", "grpc-per-conn", "grpc-lean", "grpc-frames"]) {
      const t = tput[m][c];
      if (!t) continue;
      const raw = tput.raw[c];
      const r = t.opsPerSec.median / raw.opsPerSec.median;
      const label =
        m === "grpc-frames"
          ? ", frames client"
          : m === "grpc-lean"
            ? ", lean client"
            : c === 1
              ? ""
              : m === "grpc-shared"
                ? ", shared conn"
                : ", conn per client";
      const base = {
        measure: `gRPC Allocate ops/s, ${c} client${c > 1 ? "s" : ""}${label}`,
        value: num(t.opsPerSec.median),
        baseline: `${num(raw.opsPerSec.median)} raw@${c}`,
        ratio: r,
      };
      // The target is the daemon's: judged from the client that costs least beside it (frames, what h2load is to bench:rpc).
      v.push(c === 64 && m === "grpc-frames" ? { ...base, ...check(r, { min: 0.5 }) } : { ...base, target: "" });
    }
  }
  /** An info row: `t`'s throughput against `base`'s (named `label`), no target. */
  const infoRow = (measure: string, t: { opsPerSec: { median: number } }, base: { opsPerSec: { median: number } }, label: string) => ({
    measure,
    value: num(t.opsPerSec.median),
    baseline: `${num(base.opsPerSec.median)} ${label}`,
    ratio: t.opsPerSec.median / base.opsPerSec.median,
    target: "",
  });
  if (fl) {
    const raw = tput.raw[64];
    v.push(infoRow("bare connect-node floor, 64 clients", fl, raw, "raw@64"));
    const g = tput["grpc-shared"][64];
    v.push(infoRow("gRPC Allocate vs that floor, 64 clients, shared", g, fl, "floor"));
  }
  // The issue's baseline is the script a call; the same grouping done straight on Redis is faster still: shown beside it.
  const together = tput["raw-together"][64];
  const frames64 = tput["grpc-frames"][64];
  if (together && frames64) v.push(infoRow("gRPC Allocate vs the store answering together, 64 frames", frames64, together, "together@64"));
  const ceil = tput["grpc-ceiling"][64];
  if (ceil) {
    const raw = tput.raw[64];
    v.push(infoRow("bare grpc-js + ioredis, a script a call, 64 frames clients", ceil, raw, "raw@64"));
    const l = tput["grpc-frames"][64];
    if (l) {
      v.push(infoRow("gRPC Allocate vs that bare server, 64 frames clients", l, ceil, "bare"));
    }
  }
  if (!("skipped" in rb)) {
    const t = tput["grpc-shared"][64];
    v.push({
      measure: "gRPC ops/s, 64 clients shared vs redis-benchmark",
      value: num(t.opsPerSec.median),
      baseline: `${num(rb.rps.median)} rb@${RB_CLIENTS}`,
      ratio: t.opsPerSec.median / rb.rps.median,
      target: "",
    });
  }
  if (!("skipped" in cpuOnly)) {
    for (const m of ["grpc-shared", "grpc-per-conn"]) {
      const t = cpuOnly[m];
      v.push({
        measure: `  same, appendfsync no, 64 ${m.replace("grpc-", "")}`,
        value: num(t.opsPerSec.median),
        baseline: `${num(cpuOnly.raw.opsPerSec.median)} raw@64`,
        ratio: t.opsPerSec.median / cpuOnly.raw.opsPerSec.median,
        target: "",
      });
    }
  }
  const cmp = (measure: string, a: string, b: string, f: "allocP50Us" | "scriptP50Us", max: number) => {
    const x = pairs[a][f].median;
    const y = pairs[b][f].median;
    v.push({
      measure,
      value: dur(x),
      baseline: `${dur(y)} ${b.split(" ")[0]} ${b.split(" ")[1].replace("-free", "")}`,
      ratio: x / y,
      ...check(x / y, { max }),
    });
  };
  cmp("/16 last-free vs first-free, client p50", "/16 last-free", "/16 first-free", "allocP50Us", 1.5);
  cmp("/16 last-free vs first-free, script p50", "/16 last-free", "/16 first-free", "scriptP50Us", 1.5);
  cmp("/8 nearly full vs /24 empty, client p50", "/8 last-free", "/24 first-free", "allocP50Us", 2);
  cmp("/8 nearly full vs /24 empty, script p50", "/8 last-free", "/24 first-free", "scriptP50Us", 2);
  cmp("/8 nearly full vs /24 nearly full, script", "/8 last-free", "/24 last-free", "scriptP50Us", 2);
  p(heading("Verdict"));
  p(verdictTable(v));
  const misses = v.filter((x) => x.pass === false).length;
  p(`${v.filter((x) => x.pass === true).length} PASS, ${misses} MISS · whole run ${elapsedS.toFixed(0)} s`);

  let profile: ReturnType<typeof summarize> | undefined;
  if (profileDir) {
    const f = existsSync(profileDir) ? readdirSync(profileDir).find((x) => x.endsWith(".cpuprofile")) : undefined;
    if (f) {
      profile = summarize(join(profileDir, f));
      p(heading("Where microvpcd spent its CPU (--profile; the profiler slows it, so the figures above are low)"));
      p(
        `busy ${num(profile.busyMs)} ms of ${num(profile.totalMs)} ms profiled; microvpc's own code (services/, gen/): ${pct(profile.projectShare)} of the busy time`,
      );
      p(
        table(
          ["area", "self ms", "share"],
          profile.areas.map((a) => [a.area, num(a.ms), pct(a.share)]),
        ),
      );
      p();
      p(
        table(
          ["function", "area", "self ms", "share"],
          profile.functions.map((a) => [a.fn, a.area, num(a.ms), pct(a.share)]),
        ),
      );
    } else p("(--profile: no .cpuprofile was written by the daemon)");
  }

  const file = resultsFile("ipam");
  p();
  p(`figures written to ${file}`);
  console.log(out.join("\n"));
  writeJson(file, {
    env: { ...env, loadAtEnd, warmMs },
    elapsedS,
    throughput: Object.fromEntries(Object.entries(tput).map(([m, byC]) => [m, byC])),
    redisBenchmark: rb,
    batch: { size: BATCH, byMode: batch },
    cpuOnly64: cpuOnly,
    latency: { fillMs, pairs, naiveBitposUs: naive },
    catalog,
    verdicts: v,
    profile,
  });
  return 0;
}

runBench(main);
