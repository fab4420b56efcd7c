// `npm run bench:fleet`: N synthetic hypervisors in a few worker processes
// (bench/lib/fleet-host.ts), each following change events with the real
// event code and running a targeted pass against a fake kernel, while this
// process drives a workload through one Redis: VMs created and deleted on the
// hosts of a VPC, security-group membership changes, peerings. For each N,
// the same workload runs twice in the same run:
//   scoped   — writers append to the global and the scoped streams (as the
//              scripts do now), each host reads its own (EventFeed);
//   global   — the baseline, today's: writers append to mvpc:events only,
//              every host reads it (followEvents) and drops what it does not
//              hold.
// Measured per change: Redis commands and bytes (INFO commandstats and stats
// deltas), Redis CPU (INFO cpu), hosts woken, and the time from the write
// until every host holding the VPC applied it (p50, p99).
//
// Each VPC is held by `--spread` hosts (consecutive ids, so that every host
// holds about `spread` VPCs); a peering links VPC i with VPC i+N/2.
import { fork, type ChildProcess } from "node:child_process";
import { loadavg } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { Redis } from "ioredis";
import { LUA_EMIT } from "../services/common/events.js";
import { startRedis, type TestRedis } from "../test/lib/redis.js";
import type { FromWorker, HostSpec, ToWorker } from "./lib/fleet-host.js";
import { simKeys } from "./lib/fleet-host.js";
import { num, heading, resultsFile, table, verdictTable, writeJson, type Verdict } from "./lib/report.js";
import { benchArgs, benchClock, intOpt, runBench, SMOKE } from "./lib/run.js";
import { percentile, sorted } from "./lib/stats.js";

const args = benchArgs(
  {
    hosts: { type: "string", default: "10,100,1000" },
    changes: { type: "string", default: "500" },
    rate: { type: "string", default: "50" },
    spread: { type: "string", default: "3" },
    workers: { type: "string", default: "4" },
  },
  { hosts: "4", changes: "20", rate: "20", workers: "2" },
);
const NS = String(args.hosts)
  .split(",")
  .map((x) => intOpt("hosts", x, 2, 5000));
const CHANGES = intOpt("changes", args.changes, 10, 100_000);
const RATE = intOpt("rate", args.rate, 1, 5000);
const SPREAD = intOpt("spread", args.spread, 1, 50);
const WORKERS = intOpt("workers", args.workers, 1, 64);
const { progress } = benchClock(SMOKE ? undefined : 40 * 60_000);
const p = (s: string) => process.stdout.write(`${s}\n`);

const vpcId = (i: number) => `vpc-${(0xf0000000000 + i).toString(16).padStart(12, "0")}`;
const hostId = (i: number) => `h${i}`;

/** The writers: one script per change, as every microvpc change is. Scoped: today's scripts (global + scoped streams). */
const WRITE_SCOPED = `${LUA_EMIT}
for i = 1, #KEYS do redis.call('HSET', KEYS[i], ARGV[1], ARGV[2]) end
local f = {}
for i = 3, #ARGV do f[#f + 1] = ARGV[i] end
local vpcs = {}
for i = 1, #KEYS do vpcs[#vpcs + 1] = string.match(KEYS[i], '{(.-)}') end
mvpc_emit(vpcs, {ARGV[8]}, unpack(f))
`;
/** The baseline's writer: the global stream alone (before scoped streams). */
const WRITE_GLOBAL = `
for i = 1, #KEYS do redis.call('HSET', KEYS[i], ARGV[1], ARGV[2]) end
local f = {}
for i = 3, #ARGV do f[#f + 1] = ARGV[i] end
redis.call('XADD', 'mvpc:events', 'MAXLEN', '~', 100000, '*', unpack(f))
`;

interface Info {
  calls: Map<string, number>;
  cpu: number;
  bytesIn: number;
  bytesOut: number;
}

async function info(r: Redis): Promise<Info> {
  const text = (await r.info("all")) as string;
  const calls = new Map<string, number>();
  let cpu = 0;
  let bytesIn = 0;
  let bytesOut = 0;
  for (const line of text.split("\r\n")) {
    const m = /^cmdstat_([a-z_|]+):calls=(\d+)/.exec(line);
    if (m) calls.set(m[1], Number(m[2]));
    const c = /^used_cpu_(sys|user):([\d.]+)/.exec(line);
    if (c) cpu += Number(c[2]);
    const b = /^total_net_(input|output)_bytes:(\d+)/.exec(line);
    if (b) {
      if (b[1] === "input") bytesIn = Number(b[2]);
      else bytesOut = Number(b[2]);
    }
  }
  return { calls, cpu, bytesIn, bytesOut };
}

interface PhaseResult {
  n: number;
  mode: "scoped" | "global";
  changes: number;
  seconds: number;
  commandsPerChange: number;
  byCommand: Record<string, number>;
  bytesPerChange: number;
  redisCpuPct: number;
  wakesPerChange: number;
  eventsPerChange: number;
  readsPerChange: number;
  p50ms: number;
  p99ms: number;
  missing: number;
}

function waitMsg<T extends FromWorker["op"]>(c: ChildProcess, op: T): Promise<Extract<FromWorker, { op: T }>> {
  return new Promise((resolve, reject) => {
    const exit = (code: number | null) => reject(new Error(`fleet worker exited with ${code}`));
    const on = (m: FromWorker) => {
      if (m.op === op) {
        c.off("message", on);
        c.off("exit", exit);
        resolve(m as Extract<FromWorker, { op: T }>);
      }
    };
    c.on("message", on);
    c.once("exit", exit);
  });
}

async function phase(server: TestRedis, r: Redis, n: number, mode: "scoped" | "global"): Promise<PhaseResult> {
  await r.flushall();
  const spread = Math.min(SPREAD, n);
  // VPC v is held by hosts v … v+spread−1: every host holds `spread` VPCs.
  const holders = (v: number) => Array.from({ length: spread }, (_, j) => (v + j) % n);
  const setup = r.pipeline();
  for (let v = 0; v < n; v++) {
    for (const h of holders(v)) setup.hset(simKeys.hostVpcs(hostId(h)), vpcId(v), "1");
    for (let m = 0; m < 8; m++) setup.hset(simKeys.state(vpcId(v)), `m${m}`, "0");
  }
  await setup.exec();
  const workers: ChildProcess[] = [];
  const nw = Math.min(WORKERS, n);
  const here = fileURLToPath(new URL(".", import.meta.url));
  for (let i = 0; i < nw; i++) {
    const c = fork(join(here, "lib", "fleet-host.ts"), [], { execArgv: ["--import", "tsx"], stdio: ["ignore", "inherit", "inherit", "ipc"] });
    workers.push(c);
  }
  try {
    const ready = workers.map((c) => waitMsg(c, "ready"));
    workers.forEach((c, i) => {
      const hosts: HostSpec[] = [];
      for (let h = i; h < n; h += nw) hosts.push({ id: hostId(h) });
      c.send({ op: "start", url: server.url, mode, hosts } satisfies ToWorker);
    });
    await Promise.all(ready);
    // Every host blocked in its XREAD (the global readers start at "$": a change before that would be missed).
    for (let i = 0; i < 600; i++) {
      const b = Number(/blocked_clients:(\d+)/.exec((await r.info("clients")) as string)?.[1] ?? 0);
      if (b >= n) break;
      await new Promise((res) => setTimeout(res, 50));
    }
    const script = mode === "scoped" ? WRITE_SCOPED : WRITE_GLOBAL;
    const sha = (await r.script("LOAD", script)) as string;
    const before = await info(r);
    const t0 = performance.timeOrigin + performance.now();
    const written = new Map<string, { t: number; expect: number }>();
    let expectTotal = 0;
    for (let i = 0; i < CHANGES; i++) {
      const due = t0 + (i * 1000) / RATE;
      const wait = due - (performance.timeOrigin + performance.now());
      if (wait > 1) await new Promise((res) => setTimeout(res, wait));
      const v = (i * 7919) % n;
      const kind = i % 10 === 9 ? "peering" : i % 10 >= 6 ? "sg" : "vm";
      const vpcs = kind === "peering" ? [v, (v + Math.floor(n / 2)) % n] : [v];
      const hostsOf = new Set(vpcs.flatMap(holders));
      const host = hostId(holders(v)[i % spread]);
      const cid = `c${i}`;
      const fields = ["kind", `fleet.${kind}`, "cid", cid, "host", kind === "vm" ? host : ""];
      if (kind === "peering") fields.push("vpc1", vpcId(vpcs[0]), "vpc2", vpcId(vpcs[1]));
      else fields.push("vpc", vpcId(v));
      const tw = performance.timeOrigin + performance.now();
      // ARGV: member, value, then the event's fields: ARGV[8] is the host field's value (a VM's host: its stream too).
      await r.evalsha(sha, vpcs.length, ...vpcs.map((x) => simKeys.state(vpcId(x))), `m${i % 8}`, String(i), ...fields);
      written.set(cid, { t: tw, expect: hostsOf.size });
      expectTotal += hostsOf.size;
    }
    // Until every host holding a changed VPC applied it (bounded).
    const deadline = Date.now() + 30_000;
    for (;;) {
      const st = await Promise.all(
        workers.map((c) => {
          const m = waitMsg(c, "status");
          c.send({ op: "status" } satisfies ToWorker);
          return m;
        }),
      );
      if (st.reduce((a, s) => a + s.applied, 0) >= expectTotal || Date.now() > deadline) break;
      await new Promise((res) => setTimeout(res, 50));
    }
    const t1 = performance.timeOrigin + performance.now();
    const after = await info(r);
    const results = await Promise.all(
      workers.map((c) => {
        const m = waitMsg(c, "result");
        c.send({ op: "finish" } satisfies ToWorker);
        return m;
      }),
    );
    const applied = new Map<string, [number, number]>();
    for (const res of results) {
      for (const [cid, [cnt, t]] of Object.entries(res.applied)) {
        const a = applied.get(cid);
        applied.set(cid, a ? [a[0] + cnt, Math.max(a[1], t)] : [cnt, t]);
      }
    }
    const lat: number[] = [];
    let missing = 0;
    for (const [cid, w] of written) {
      const a = applied.get(cid);
      if (!a || a[0] < w.expect) missing++;
      else lat.push(a[1] - w.t);
    }
    const s = sorted(lat);
    const byCommand: Record<string, number> = {};
    let total = 0;
    for (const [k, v] of after.calls) {
      const d = v - (before.calls.get(k) ?? 0) - (k === "info" ? 1 : 0);
      if (d > 0) {
        byCommand[k] = d / CHANGES;
        total += d;
      }
    }
    const secs = (t1 - t0) / 1000;
    const sum = (f: (x: (typeof results)[number]) => number) => results.reduce((a, x) => a + f(x), 0);
    return {
      n,
      mode,
      changes: CHANGES,
      seconds: secs,
      commandsPerChange: total / CHANGES,
      byCommand,
      bytesPerChange: (after.bytesIn - before.bytesIn + after.bytesOut - before.bytesOut) / CHANGES,
      redisCpuPct: ((after.cpu - before.cpu) / secs) * 100,
      wakesPerChange: sum((x) => x.wakes) / CHANGES,
      eventsPerChange: sum((x) => x.events) / CHANGES,
      readsPerChange: sum((x) => x.reads) / CHANGES,
      p50ms: percentile(s, 50),
      p99ms: percentile(s, 99),
      missing,
    };
  } finally {
    for (const c of workers) if (c.exitCode === null && c.pid) c.kill("SIGTERM");
  }
}

async function main(): Promise<number> {
  const server = await startRedis({ persistence: false });
  const r = new Redis(server.url);
  try {
    // The hosts' connections: two each, beside the bench's own.
    await r.config("SET", "maxclients", String(Math.max(10_000, Math.max(...NS) * 2 + 100)));
    const out: PhaseResult[] = [];
    for (const n of NS) {
      for (const mode of ["scoped", "global"] as const) {
        progress(`N=${n} ${mode}: ${CHANGES} changes at ${RATE}/s`);
        out.push(await phase(server, r, n, mode));
      }
    }
    p(heading(`Fleet: ${CHANGES} changes at ${RATE}/s, each VPC on ${SPREAD} hosts, hosts in ${WORKERS} worker processes`));
    const cmdCols = ["xread", "xadd", "hgetall", "xinfo", "hkeys", "evalsha"];
    p(
      table(
        [
          "N",
          "feed",
          "cmds/change",
          ...cmdCols.map((c) => `${c}/chg`),
          "bytes/change",
          "Redis CPU %",
          "woken/change",
          "events/change",
          "p50 ms",
          "p99 ms",
          "missing",
        ],
        out.map((x) => [
          String(x.n),
          x.mode,
          num(x.commandsPerChange, 1),
          ...cmdCols.map((c) => num(x.byCommand[c] ?? 0, 1)),
          num(x.bytesPerChange, 0),
          num(x.redisCpuPct, 1),
          num(x.wakesPerChange, 1),
          num(x.eventsPerChange, 1),
          num(x.p50ms, 1),
          num(x.p99ms, 1),
          String(x.missing),
        ]),
      ),
    );
    p("(woken/change: XREAD replies the hosts got per change; a host holding a changed VPC wakes at least once, any other wake is waste.)");
    const v: Verdict[] = [];
    for (const n of NS) {
      const s = out.find((x) => x.n === n && x.mode === "scoped")!;
      const g = out.find((x) => x.n === n && x.mode === "global")!;
      const holders = Math.min(SPREAD, n) * 1.1;
      v.push({
        measure: `N=${n}: hosts woken per change`,
        value: num(s.wakesPerChange, 1),
        baseline: num(g.wakesPerChange, 1),
        ratio: s.wakesPerChange / g.wakesPerChange,
        target: `≤ ${num(holders * 2, 1)} (holders, each stream)`,
        pass: s.wakesPerChange <= holders * 2,
      });
      v.push({
        measure: `N=${n}: Redis commands per change`,
        value: num(s.commandsPerChange, 1),
        baseline: num(g.commandsPerChange, 1),
        ratio: s.commandsPerChange / g.commandsPerChange,
        target: "",
      });
      v.push({
        measure: `N=${n}: Redis CPU %`,
        value: num(s.redisCpuPct, 1),
        baseline: num(g.redisCpuPct, 1),
        ratio: s.redisCpuPct / g.redisCpuPct,
        target: n >= 1000 ? "≤ 50 %" : "",
        pass: n >= 1000 ? s.redisCpuPct <= 50 : undefined,
      });
      v.push({
        measure: `N=${n}: applied on every holder, p99 ms`,
        value: num(s.p99ms, 1),
        baseline: num(g.p99ms, 1),
        ratio: s.p99ms / g.p99ms,
        target: "≤ 2000 ms",
        pass: s.p99ms <= 2000,
      });
      v.push({
        measure: `N=${n}: changes not applied on every holder`,
        value: String(s.missing),
        baseline: String(g.missing),
        ratio: 0,
        target: "0",
        pass: s.missing === 0,
      });
    }
    p(heading("Verdict"));
    p(verdictTable(v));
    const file = resultsFile("fleet");
    p(`figures written to ${file}`);
    writeJson(file, { args: { hosts: NS, changes: CHANGES, rate: RATE, spread: SPREAD, workers: WORKERS }, loadavgAtEnd: loadavg(), phases: out, verdicts: v });
    return out.some((x) => x.mode === "scoped" && x.missing > 0) ? 1 : 0;
  } finally {
    r.disconnect();
    await server.stop();
  }
}

runBench(main);
