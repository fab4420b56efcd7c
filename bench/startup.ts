// Daemon start-up benchmark (`npm run bench:startup`; not a timed test). How
// long a `microvpcd <service>` takes from spawn until it serves, as the
// compiled build runs it (`node bin/microvpcd.js …` → dist/, what the image
// and systemd run) against the same entry through tsx at run time (`node
// --import tsx cli/microvpcd.ts …`: how the daemons ran before dist/, "the
// before"), in the same run, the cases interleaved round by round:
//   - wall time from spawn() until a grpc.health.v1.Health/Check answers
//     SERVING (the bench dials h2c every POLL_MS with a bare node:http2
//     client: a refused connection costs ~nothing on either side);
//   - CPU time of the process until then (/proc/PID/stat utime + stime, every
//     thread, tsx's loader thread included; clock ticks, so 10 ms steps);
//   - its RSS at that point (/proc/PID/status VmRSS), and its peak (VmHWM);
// for `microvpcd ipam` and `microvpcd vmm` (both against a real
// redis-server of test/lib/redis.ts, without persistence; the vmm's peers
// are not started: it serves before it calls them). The baseline, in the
// same rounds: a bare `node -e` node:http2 server answering the same Check
// with a hand-made SERVING reply: the cost of starting Node and listening.
// Median (min–max) of N rounds after a warm-up round (which also fills
// tsx's transform cache: the tsx figures are with a warm cache, its best case).
//
// Every process is spawned by the bench and ended by PID (SIGTERM, SIGKILL
// after 3 s); only 127.0.0.1 is used; no namespaces. About 1 minute.
//
// Options (after `npm run bench:startup --`): --rounds N (default 7),
// --services ipam,vmm. --smoke: 1 round, no warm-up (bench/lib/run.ts).
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { readFileSync } from "node:fs";
import http2 from "node:http2";
import { loadavg } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { ROOT } from "../test/lib/daemon.js";
import { freePort, startRedis, type TestRedis } from "../test/lib/redis.js";
import { machineEnv } from "./lib/cpu.js";
import { heading, num, resultsFile, spr, table, verdictTable, writeJson, type Verdict } from "./lib/report.js";
import { benchArgs, benchClock, intOpt, pick, runBench } from "./lib/run.js";
import { interleaved, spread, type BenchCase, type Spread } from "./lib/stats.js";

const opt = benchArgs({ rounds: { type: "string", default: "7" }, services: { type: "string", default: "ipam,vmm" } }, { rounds: "1" });
const ROUNDS = intOpt("rounds", opt.rounds, 3, 30);
/** Warm-up rounds (a smoke run has none: its tsx figures then include filling the transform cache). */
const WARMUP = pick(1, 0);
const SERVICES = String(opt.services)
  .split(",")
  .filter(Boolean)
  .map((s) => {
    if (s !== "ipam" && s !== "vmm") throw new Error(`--services ${opt.services}: ipam and/or vmm`);
    return s;
  });
/** Between two Check attempts while a process starts. */
const POLL_MS = 5;
/** A start that does not serve within this fails the run. */
const START_LIMIT_MS = 30_000;
const HARD_LIMIT_MS = 240_000;

const { t0, progress } = benchClock(HARD_LIMIT_MS);

const CLK_TCK = (() => {
  try {
    return Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).trim()) || 100;
  } catch {
    return 100;
  }
})();

// ------------------------------------------------------------ the processes

/**
 * The baseline: node:http2 alone, answering /grpc.health.v1.Health/Check with
 * HealthCheckResponse{status: SERVING} (field 1, varint 1), gRPC-framed.
 */
const BARE = `
const http2 = require("node:http2");
const reply = Buffer.from([0, 0, 0, 0, 2, 0x08, 0x01]);
const s = http2.createServer();
s.on("stream", (st) => {
  st.on("data", () => {});
  st.on("end", () => {
    st.respond({ ":status": 200, "content-type": "application/grpc" }, { waitForTrailers: true });
    st.on("wantTrailers", () => st.sendTrailers({ "grpc-status": "0" }));
    st.end(reply);
  });
});
s.listen(Number(process.argv[1]), "127.0.0.1");
process.on("SIGTERM", () => process.exit(0));
`;

type Variant = "bare" | "compiled" | "tsx";

function argv(variant: Variant, service: string, port: number, metricsPort: number, redisUrl: string): string[] {
  if (variant === "bare") return ["-e", BARE, String(port)];
  const flags = [
    service,
    "--listen",
    `127.0.0.1:${port}`,
    "--metrics-listen",
    `127.0.0.1:${metricsPort}`,
    "--log-level",
    "warn",
    "--redis",
    redisUrl,
    ...(service === "vmm" ? ["--host-id", "benchstartup"] : []),
  ];
  return variant === "compiled" ? [join(ROOT, "bin", "microvpcd.js"), ...flags] : ["--import", "tsx", join(ROOT, "cli", "microvpcd.ts"), ...flags];
}

/** One bare HTTP/2 Health/Check: "SERVING", another status, or undefined when nothing answers (yet). */
function check(port: number, timeoutMs = 1000): Promise<string | undefined> {
  return new Promise((resolve) => {
    let done = false;
    const finish = (v: string | undefined) => {
      if (done) return;
      done = true;
      clearTimeout(t);
      s.destroy();
      resolve(v);
    };
    const t = setTimeout(() => finish(undefined), timeoutMs);
    const s = http2.connect(`http://127.0.0.1:${port}`);
    s.on("error", () => finish(undefined));
    const req = s.request({ ":method": "POST", ":path": "/grpc.health.v1.Health/Check", "content-type": "application/grpc", te: "trailers" });
    req.on("error", () => finish(undefined));
    const chunks: Buffer[] = [];
    let status = "";
    req.on("data", (d: Buffer) => chunks.push(d));
    req.on("trailers", (tr) => (status = String(tr["grpc-status"] ?? "")));
    req.on("end", () => {
      const body = Buffer.concat(chunks);
      if (status !== "0" || body.length < 5) return finish(`grpc-status ${status || "?"}`);
      // HealthCheckResponse: field 1 (status), varint; absent = UNKNOWN (0). SERVING = 1.
      const msg = body.subarray(5);
      const v = msg.length >= 2 && msg[0] === 0x08 ? msg[1] : 0;
      finish(v === 1 ? "SERVING" : `status ${v}`);
    });
    req.end(Buffer.alloc(5));
  });
}

/** utime + stime of every thread of pid so far, ms (/proc/PID/stat). */
function cpuMs(pid: number): number {
  const s = readFileSync(`/proc/${pid}/stat`, "utf8");
  const f = s.slice(s.lastIndexOf(")") + 2).split(" ");
  return ((Number(f[11]) + Number(f[12])) * 1000) / CLK_TCK;
}

/** VmRSS and VmHWM of pid, MiB. */
function rssMiB(pid: number): { rss: number; hwm: number } {
  const s = readFileSync(`/proc/${pid}/status`, "utf8");
  const kib = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, "m").exec(s)?.[1] ?? Number.NaN);
  return { rss: kib("VmRSS") / 1024, hwm: kib("VmHWM") / 1024 };
}

const live = new Set<ChildProcess>();

async function stop(c: ChildProcess): Promise<void> {
  if (c.exitCode !== null || c.signalCode !== null) return;
  const gone = new Promise((r) => c.once("exit", r));
  c.kill("SIGTERM");
  const t = setTimeout(() => c.kill("SIGKILL"), 3000);
  await gone;
  clearTimeout(t);
}

interface Start {
  wallMs: number;
  cpuMs: number;
  rssMiB: number;
  hwmMiB: number;
  checks: number;
}

/** Spawns one process, polls Check until SERVING, reads its CPU and memory at once, ends it. */
async function startOnce(variant: Variant, service: string, redis: TestRedis): Promise<Start> {
  const port = await freePort();
  const metricsPort = await freePort();
  const s = performance.now();
  const c = spawn(process.execPath, argv(variant, service, port, metricsPort, redis.url), { cwd: ROOT, stdio: ["ignore", "pipe", "pipe"] });
  live.add(c);
  let out = "";
  c.stdout!.on("data", (d) => (out += d));
  c.stderr!.on("data", (d) => (out += d));
  try {
    let checks = 0;
    let last: string | undefined;
    for (;;) {
      if (c.exitCode !== null || c.signalCode !== null)
        throw new Error(`${variant} ${service} exited (${c.exitCode ?? c.signalCode}) before serving:\n${out.slice(-2000)}`);
      if (performance.now() - s > START_LIMIT_MS)
        throw new Error(`${variant} ${service} not SERVING after ${START_LIMIT_MS / 1000} s (last: ${last ?? "no answer"}):\n${out.slice(-2000)}`);
      checks++;
      last = await check(port);
      if (last === "SERVING") break;
      await new Promise((r) => setTimeout(r, POLL_MS));
    }
    const wallMs = performance.now() - s;
    const cpu = cpuMs(c.pid!);
    const m = rssMiB(c.pid!);
    return { wallMs, cpuMs: cpu, rssMiB: m.rss, hwmMiB: m.hwm, checks };
  } finally {
    await stop(c);
    live.delete(c);
  }
}

// ------------------------------------------------------------ main

let redis: TestRedis | undefined;

async function main(): Promise<number> {
  const env = { ...machineEnv(), rounds: ROUNDS, services: SERVICES, pollMs: POLL_MS };
  progress("starting redis-server (no persistence) for the daemons");
  redis = await startRedis({ persistence: false });
  try {
    const cases: BenchCase<Start>[] = [{ name: "bare", run: () => startOnce("bare", "", redis!) }];
    for (const service of SERVICES)
      for (const v of ["compiled", "tsx"] as const) cases.push({ name: `${service} ${v}`, run: () => startOnce(v, service, redis!) });
    progress(`${cases.length} cases (${cases.map((c) => c.name).join(", ")}), ${WARMUP} warm-up + ${ROUNDS} interleaved rounds`);
    const res = await interleaved(
      cases.map((c) => ({
        name: c.name,
        async run(round, warm) {
          const r = await c.run(round, warm);
          if (!warm) progress(`  round ${round + 1}: ${c.name}: serving after ${num(r.wallMs)} ms, CPU ${num(r.cpuMs)} ms, RSS ${num(r.rssMiB)} MiB`);
          return r;
        },
      })),
      { rounds: ROUNDS, warmupRounds: WARMUP, minRounds: ROUNDS },
    );
    const loadAtEnd = loadavg().map((x) => Number(x.toFixed(2)));
    const sum = Object.fromEntries(
      [...res].map(([name, runs]) => [
        name,
        {
          wallMs: spread(runs.map((r) => r.wallMs)),
          cpuMs: spread(runs.map((r) => r.cpuMs)),
          rssMiB: spread(runs.map((r) => r.rssMiB)),
          hwmMiB: spread(runs.map((r) => r.hwmMiB)),
          checks: spread(runs.map((r) => r.checks)),
        },
      ]),
    ) as Record<string, { wallMs: Spread; cpuMs: Spread; rssMiB: Spread; hwmMiB: Spread; checks: Spread }>;

    const out: string[] = [];
    const p = (s = "") => out.push(s);
    p(heading("microvpc daemon start-up benchmark"));
    p(
      `${env.date} · node ${env.node} · kernel ${env.kernel} · ${env.cores} × ${env.cpu} · load avg ${env.loadavgAtStart.join(" ")} at start, ${loadAtEnd.join(" ")} at end`,
    );
    p(`From spawn() to the first Health/Check answering SERVING (polled every ${POLL_MS} ms); CPU = utime+stime of the process until then`);
    p(`(/proc/PID/stat, 10 ms ticks); RSS / peak RSS at that moment. median (min–max) of ${ROUNDS} interleaved rounds after ${WARMUP} warm-up.`);
    p(`compiled: node bin/microvpcd.js SERVICE (dist/, esbuild); tsx: node --import tsx cli/microvpcd.ts SERVICE (warm tsx cache);`);
    p(`bare: node -e with a node:http2 server answering the same Check (the floor: Node's own start-up and a listening socket).`);
    p(
      table(
        ["case", "wall ms", "CPU ms", "RSS MiB", "peak RSS MiB", "checks"],
        [...Object.entries(sum)].map(([name, x]) => [name, spr(x.wallMs), spr(x.cpuMs), spr(x.rssMiB), spr(x.hwmMiB), num(x.checks.median, 0)]),
      ),
    );
    const v: Verdict[] = [];
    const bare = sum.bare;
    for (const service of SERVICES) {
      const c = sum[`${service} compiled`];
      const t = sum[`${service} tsx`];
      v.push({
        measure: `${service}: wall, compiled vs tsx`,
        value: `${num(c.wallMs.median)} ms`,
        baseline: `${num(t.wallMs.median)} ms tsx`,
        ratio: c.wallMs.median / t.wallMs.median,
        target: "",
      });
      v.push({
        measure: `${service}: CPU, compiled vs tsx`,
        value: `${num(c.cpuMs.median)} ms`,
        baseline: `${num(t.cpuMs.median)} ms tsx`,
        ratio: c.cpuMs.median / t.cpuMs.median,
        target: "",
      });
      v.push({
        measure: `${service}: RSS, compiled vs tsx`,
        value: `${num(c.rssMiB.median)} MiB`,
        baseline: `${num(t.rssMiB.median)} MiB tsx`,
        ratio: c.rssMiB.median / t.rssMiB.median,
        target: "",
      });
      v.push({
        measure: `${service}: wall, compiled vs bare node`,
        value: `${num(c.wallMs.median)} ms`,
        baseline: `${num(bare.wallMs.median)} ms bare`,
        ratio: c.wallMs.median / bare.wallMs.median,
        target: "",
      });
      v.push({
        measure: `${service}: CPU, compiled vs bare node`,
        value: `${num(c.cpuMs.median)} ms`,
        baseline: `${num(bare.cpuMs.median)} ms bare`,
        ratio: c.cpuMs.median / bare.cpuMs.median,
        target: "",
      });
    }
    p(heading("Verdict"));
    p(verdictTable(v));
    p(`(ratio < 1: the compiled build is cheaper; no targets, informative rows.) Measured in ${num((Date.now() - t0) / 1000)} s.`);
    const file = resultsFile("startup");
    p();
    p(`figures written to ${file}`);
    console.log(out.join("\n"));
    writeJson(file, { env: { ...env, loadAtEnd }, runs: Object.fromEntries(res), summary: sum, verdicts: v });
    return 0;
  } finally {
    for (const c of live) await stop(c);
    await redis.stop();
  }
}

// Past the time budget or on Ctrl-C: end what is still running, by PID.
const endAll = () => {
  for (const c of live) if (c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
  if (redis && redis.proc.exitCode === null && redis.proc.signalCode === null) redis.proc.kill("SIGKILL");
};
process.on("exit", endAll);
process.on("SIGINT", () => process.exit(130));
process.on("SIGTERM", () => process.exit(143));

runBench(main);
