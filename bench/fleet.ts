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
//   cluster  — the scoped feed on a Redis Cluster (3 primaries, 3 replicas,
//              real redis-server processes): every VPC's keys and stream in
//              its own slot; a writer appends to the VPC's stream and
//              publishes its wake (SPUBLISH) in one script in that slot, and
//              a VM change's copy for its host in the host's slot; each host
//              waits on its streams' wakes (events.ts). Its commands and
//              bytes are summed over the primaries, its CPU over all six.
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
import { hostEvents, LUA_EMIT, SCOPED_MAXLEN, vpcEvents, wakeChannel } from "../services/common/events.js";
import { connectRedis, waitReady } from "../services/common/redis.js";
import { startRedis, startRedisCluster } from "../test/lib/redis.js";
import type { FleetMode, FromWorker, HostSpec, ToWorker } from "./lib/fleet-host.js";
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
    modes: { type: "string", default: "scoped,global,cluster" },
  },
  // Smoke: 20 changes at 100/s (0.2 s of writes per mode; a smoke's figures mean nothing).
  { hosts: "4", changes: "20", rate: "100", workers: "2" },
);
const NS = String(args.hosts)
  .split(",")
  .map((x) => intOpt("hosts", x, 2, 5000));
const CHANGES = intOpt("changes", args.changes, 10, 100_000);
const RATE = intOpt("rate", args.rate, 1, 5000);
const SPREAD = intOpt("spread", args.spread, 1, 50);
const WORKERS = intOpt("workers", args.workers, 1, 64);
const MODES = String(args.modes)
  .split(",")
  .map((m) => {
    if (m !== "scoped" && m !== "global" && m !== "cluster") throw new Error(`--modes: ${JSON.stringify(m)} is not scoped, global or cluster`);
    return m as FleetMode;
  });
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

/**
 * The cluster's writer: one VPC's change in its slot (KEYS: the VPC's state,
 * its stream), its wake published after the append. ARGV as WRITE_SCOPED's
 * (member, value, then the event's fields), then the wake channel.
 */
const WRITE_CLUSTER = `
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local f = {}
for i = 3, #ARGV - 1 do f[#f + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ${SCOPED_MAXLEN}, '*', unpack(f))
redis.call('SPUBLISH', ARGV[#ARGV], '1')
`;

/** Where a phase runs: one redis-server, or a cluster (its primaries and every node). */
interface Target {
  url: string;
  r: Redis;
  primaries: Redis[];
  all: Redis[];
}

interface Info {
  calls: Map<string, number>;
  cpu: number;
  bytesIn: number;
  bytesOut: number;
}

/** INFO summed: commands and bytes over the primaries, CPU over every node (cpuMax: the busiest node's). */
async function info(t: Target): Promise<Info & { cpuByNode: number[] }> {
  const calls = new Map<string, number>();
  let bytesIn = 0;
  let bytesOut = 0;
  const cpuByNode: number[] = [];
  for (const node of t.all) {
    const text = (await node.info("all")) as string;
    const primary = t.primaries.includes(node);
    let cpu = 0;
    for (const line of text.split("\r\n")) {
      const c = /^used_cpu_(sys|user):([\d.]+)/.exec(line);
      if (c) cpu += Number(c[2]);
      if (!primary) continue;
      const m = /^cmdstat_([a-z_|]+):calls=(\d+)/.exec(line);
      if (m) calls.set(m[1], (calls.get(m[1]) ?? 0) + Number(m[2]));
      const b = /^total_net_(input|output)_bytes:(\d+)/.exec(line);
      if (b) {
        if (b[1] === "input") bytesIn += Number(b[2]);
        else bytesOut += Number(b[2]);
      }
    }
    cpuByNode.push(cpu);
  }
  return { calls, cpu: cpuByNode.reduce((a, x) => a + x, 0), cpuByNode, bytesIn, bytesOut };
}

interface PhaseResult {
  n: number;
  mode: FleetMode;
  changes: number;
  seconds: number;
  commandsPerChange: number;
  byCommand: Record<string, number>;
  bytesPerChange: number;
  redisCpuPct: number;
  /** The busiest node's CPU (one redis-server: the same figure). */
  redisCpuMaxNodePct: number;
  wakesPerChange: number;
  /** Wakes per change whose batch concerned none of the host's VPCs (a host that holds none of the change's VPCs woken). */
  idleWakesPerChange: number;
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

async function phase(t: Target, n: number, mode: FleetMode): Promise<PhaseResult> {
  const { r } = t;
  for (const node of t.primaries) await node.flushall();
  const spread = Math.min(SPREAD, n);
  // VPC v is held by hosts v … v+spread−1: every host holds `spread` VPCs.
  const holders = (v: number) => Array.from({ length: spread }, (_, j) => (v + j) % n);
  if (mode === "cluster") {
    // Keys of many slots: no pipeline across them (the client pipelines per node itself).
    const writes: Promise<unknown>[] = [];
    for (let v = 0; v < n; v++) {
      for (const h of holders(v)) writes.push(r.hset(simKeys.hostVpcs(hostId(h)), vpcId(v), "1"));
      for (let m = 0; m < 8; m++) writes.push(r.hset(simKeys.state(vpcId(v)), `m${m}`, "0"));
    }
    await Promise.all(writes);
  } else {
    const setup = r.pipeline();
    for (let v = 0; v < n; v++) {
      for (const h of holders(v)) setup.hset(simKeys.hostVpcs(hostId(h)), vpcId(v), "1");
      for (let m = 0; m < 8; m++) setup.hset(simKeys.state(vpcId(v)), `m${m}`, "0");
    }
    await setup.exec();
  }
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
      c.send({ op: "start", url: t.url, mode, hosts } satisfies ToWorker);
    });
    await Promise.all(ready);
    // Every host blocked in its XREAD (the global readers start at "$": a change before that would be missed).
    // Cluster: nothing blocks; a feed reads each stream once after subscribing to its wake, from the position it took before "ready".
    for (let i = 0; i < (mode === "cluster" ? 0 : 600); i++) {
      const b = Number(/blocked_clients:(\d+)/.exec((await r.info("clients")) as string)?.[1] ?? 0);
      if (b >= n) break;
      await new Promise((res) => setTimeout(res, 50));
    }
    const script = mode === "scoped" ? WRITE_SCOPED : mode === "cluster" ? WRITE_CLUSTER : WRITE_GLOBAL;
    // On a cluster the script is loaded on every primary (EVALSHA runs where the keys' slot is).
    let sha = "";
    for (const node of t.primaries) sha = (await node.script("LOAD", script)) as string;
    const before = await info(t);
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
      if (mode === "cluster") {
        // One script per VPC, in its slot; a VM's copy for its host in the host's slot.
        const wakes = vpcs.map((x) => wakeChannel(vpcEvents(vpcId(x))));
        await Promise.all([
          ...vpcs.map((x, j) => r.evalsha(sha, 2, simKeys.state(vpcId(x)), vpcEvents(vpcId(x)), `m${i % 8}`, String(i), ...fields, wakes[j])),
          ...(kind === "vm"
            ? [
                r
                  .multi()
                  .xadd(hostEvents(host), "MAXLEN", "~", String(SCOPED_MAXLEN), "*", ...fields)
                  .spublish(wakeChannel(hostEvents(host)), "1")
                  .exec(),
              ]
            : []),
        ]);
      } else await r.evalsha(sha, vpcs.length, ...vpcs.map((x) => simKeys.state(vpcId(x))), `m${i % 8}`, String(i), ...fields);
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
    const after = await info(t);
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
      redisCpuMaxNodePct: (Math.max(...after.cpuByNode.map((c, k) => c - before.cpuByNode[k])) / secs) * 100,
      wakesPerChange: sum((x) => x.wakes) / CHANGES,
      idleWakesPerChange: sum((x) => x.idleWakes) / CHANGES,
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
  const single: Target = { url: server.url, r, primaries: [r], all: [r] };
  let cluster: Target | undefined;
  const stopCluster: (() => Promise<void>)[] = [];
  try {
    // The hosts' connections: two each, beside the bench's own.
    await r.config("SET", "maxclients", String(Math.max(10_000, Math.max(...NS) * 2 + 100)));
    if (MODES.includes("cluster")) {
      progress("starting a Redis Cluster (3 primaries, 3 replicas)");
      const c = await startRedisCluster();
      const cr = connectRedis({ url: c.url, commandTimeoutMs: 10_000 });
      stopCluster.push(async () => {
        cr.disconnect();
        await c.stop();
      });
      await waitReady(cr, 30_000);
      const ports = await c.primaries();
      const all = c.nodes.map((nd) => new Redis(nd.port, "127.0.0.1"));
      stopCluster.unshift(async () => all.forEach((x) => x.disconnect()));
      // A host's cluster clients: commands and its feed's, a connection per primary each, and the feed's sharded subscribers.
      for (const x of all) await x.config("SET", "maxclients", String(Math.max(10_000, Math.max(...NS) * 8 + 100)));
      cluster = { url: c.url, r: cr, primaries: all.filter((_, k) => ports.includes(c.nodes[k].port)), all };
    }
    const out: PhaseResult[] = [];
    for (const n of NS) {
      for (const mode of MODES) {
        progress(`N=${n} ${mode}: ${CHANGES} changes at ${RATE}/s`);
        out.push(await phase(mode === "cluster" ? cluster! : single, n, mode));
      }
    }
    p(heading(`Fleet: ${CHANGES} changes at ${RATE}/s, each VPC on ${SPREAD} hosts, hosts in ${WORKERS} worker processes`));
    const cmdCols = ["xread", "xadd", "hgetall", "xinfo", "hkeys", "evalsha", "spublish"];
    p(
      table(
        [
          "N",
          "feed",
          "cmds/change",
          ...cmdCols.map((c) => `${c}/chg`),
          "bytes/change",
          "Redis CPU %",
          "busiest node %",
          "woken/change",
          "idle/change",
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
          num(x.redisCpuMaxNodePct, 1),
          num(x.wakesPerChange, 1),
          num(x.idleWakesPerChange, 2),
          num(x.eventsPerChange, 1),
          num(x.p50ms, 1),
          num(x.p99ms, 1),
          String(x.missing),
        ]),
      ),
    );
    p("(woken/change: XREAD replies the hosts got per change; a host holding a changed VPC wakes at least once, any other wake is waste.)");
    p("(idle/change: of those, replies that carried nothing of a VPC the host holds: a host woken that holds none of the change's VPCs.)");
    p("(cluster: commands and bytes over the 3 primaries, Redis CPU over all 6 nodes, busiest node: the one that worked most.)");
    const v: Verdict[] = [];
    /** The verdicts of one feed against its baseline at N hosts: cpu is the figure the target holds for (cluster: the busiest node). */
    const feedVerdicts = (label: string, x: PhaseResult, base: PhaseResult, cpu: (r: PhaseResult) => number): Verdict[] => {
      const holders = Math.min(SPREAD, x.n) * 1.1;
      return [
        {
          measure: `${label}: hosts woken per change`,
          value: num(x.wakesPerChange, 1),
          baseline: num(base.wakesPerChange, 1),
          ratio: x.wakesPerChange / base.wakesPerChange,
          target: `≤ ${num(holders * 2, 1)} (holders, each stream)`,
          pass: x.wakesPerChange <= holders * 2,
        },
        {
          measure: `${label}: wakes of hosts holding none of the change's VPCs, per change`,
          value: num(x.idleWakesPerChange, 2),
          baseline: num(base.idleWakesPerChange, 2),
          ratio: base.idleWakesPerChange ? x.idleWakesPerChange / base.idleWakesPerChange : 0,
          target: "0",
          pass: x.idleWakesPerChange === 0,
        },
        {
          measure: `${label}: Redis commands per change`,
          value: num(x.commandsPerChange, 1),
          baseline: num(base.commandsPerChange, 1),
          ratio: x.commandsPerChange / base.commandsPerChange,
          target: "",
        },
        {
          measure: `${label}: Redis CPU %${x.mode === "cluster" ? " (busiest node)" : ""}`,
          value: num(cpu(x), 1),
          baseline: num(base.redisCpuPct, 1),
          ratio: cpu(x) / base.redisCpuPct,
          target: x.n >= 1000 ? "≤ 50 %" : "",
          pass: x.n >= 1000 ? cpu(x) <= 50 : undefined,
        },
        {
          measure: `${label}: applied on every holder, p99 ms`,
          value: num(x.p99ms, 1),
          baseline: num(base.p99ms, 1),
          ratio: x.p99ms / base.p99ms,
          target: "≤ 2000 ms",
          pass: x.p99ms <= 2000,
        },
        {
          measure: `${label}: changes not applied on every holder`,
          value: String(x.missing),
          baseline: String(base.missing),
          ratio: 0,
          target: "0",
          pass: x.missing === 0,
        },
      ];
    };
    for (const n of NS) {
      const s = out.find((x) => x.n === n && x.mode === "scoped");
      const g = out.find((x) => x.n === n && x.mode === "global");
      const cl = out.find((x) => x.n === n && x.mode === "cluster");
      // The cluster beside the scoped feed on one redis-server, same workload, same run.
      if (cl && s) v.push(...feedVerdicts(`N=${n} cluster`, cl, s, (x) => x.redisCpuMaxNodePct));
      if (s && g) v.push(...feedVerdicts(`N=${n}`, s, g, (x) => x.redisCpuPct));
    }
    p(heading("Verdict"));
    p(verdictTable(v));
    const file = resultsFile("fleet");
    p(`figures written to ${file}`);
    writeJson(file, {
      args: { hosts: NS, changes: CHANGES, rate: RATE, spread: SPREAD, workers: WORKERS, modes: MODES },
      loadavgAtEnd: loadavg(),
      phases: out,
      verdicts: v,
    });
    return out.some((x) => x.mode !== "global" && x.missing > 0) ? 1 : 0;
  } finally {
    for (const f of stopCluster) await f();
    r.disconnect();
    await server.stop();
  }
}

runBench(main);
