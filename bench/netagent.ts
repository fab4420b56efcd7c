// netagent benchmark (`npm run bench:netagent`; not a timed test). From one
// run it prints, and writes as JSON to bench/results/netagent-<date>.json:
//   1. AttachNic and DetachNic latency (p50/p99 of the gRPC call) through a
//      real `microvpcd netagent`, kind=VETH into a fresh VM namespace made
//      beforehand, with the address allocated in IPAM beforehand: only the
//      netagent call is timed. At 10, 100 and 500 NICs already on the host,
//      all in one VPC and one /22 subnet (so all on one bridge: the harsh
//      case for the per-port cost), made through the same API (a veth's
//      attach and every detach run in-process: libnl-route and
//      libnetfilter_conntrack). Then, from the bench, the `ip`/`nsenter`/
//      `conntrack` execs AttachNic and DetachNic fall back to, timed one by
//      one, at each level; the execs microvpcd
//      ran per call (its microvpc_exec_total); and, in the same run, the CNI
//      reference bridge plugin's ADD/DEL (containernetworking-plugins, static
//      IPAM) on a bridge with as many ports, in a namespace of the run;
//   2. VM↔VM TCP throughput with iperf3 (one stream): two VMs in one subnet
//      (through the subnet bridge), two VMs in two subnets of the VPC (routed
//      in the VPC namespace), beside a raw veth pair between two plain
//      namespaces made in the same run; plus experiments: the same two VM
//      paths with net.bridge.bridge-nf-call-iptables=0 in the VPC namespace,
//      and a routed /32-per-veth path (no bridge) built by the bench itself;
// then a verdict table against the targets of issue 3.
//
// Redis runs with appendfsync no: this bench is about the data plane, and the
// two Redis writes of an attach are not what it measures.
//
// Throughput runs go through bench/lib/netns.ts (iperf3 with each end's CPU,
// so the cost per byte can be compared when a neighbour takes the cores);
// namespaces, probes and cleanup come from test/lib/netns.ts.
//
// Safety: everything is a named network namespace carrying the run prefix of
// test/lib/netns.ts ("mt" + 4 hex; the agent's host id is <prefix>hv, so its
// VPC namespaces are mvpc-<prefix>hv-…). The root namespace is never changed
// (checked: a snapshot of its links, addresses, routes, sysctls and nft
// ruleset before and after). Every namespace and process of the run is
// removed at the end, also on failure, on Ctrl-C and past the time budget
// (test/lib/netns.ts's exit/signal handlers, which end processes by PID).
// Every loop is bounded in count and in time; the run takes 3–4 minutes.
//
// Options (after `npm run bench:netagent --`): --samples N (attach+detach
// pairs per level, default 30), --iperf-seconds S (default 3), --iperf-runs N
// (default 5: the machine is shared and noisy, so more short runs, paired
// round by round with the raw pair, rather than few long ones), --levels
// 10,100,500. Each run records the CPU pressure (PSI "some": the share of
// time a runnable task waited for a CPU), which shows when a neighbour took
// the cores; a run with pressure above 40% is repeated (at most twice, and
// only while the time budget allows) and the least disturbed attempt kept.
//
// The levels are measured going up (10, 100, 500) and then, after detaching
// back down to 10 through the API, at 10 again: the machine's load drifts by
// the minute, and the 10-NIC figure used for the 500-vs-10 ratio pools both
// passes so that the drift falls on both sides of the comparison.
//
// --smoke: levels 1,3, 2 pairs each, 1 iperf3 round of 1 s, no retries
// (bench/lib/run.ts).
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { loadavg } from "node:os";
import { performance } from "node:perf_hooks";
import type { Client } from "@connectrpc/connect";
import { Health } from "../gen/grpc/health/v1/health_pb.js";
import { NetAgentService, NicKind } from "../gen/microvpc/v1/netagent_pb.js";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { grpcClient, grpcTransport } from "../services/common/client.js";
import { ipamClients } from "../test/lib/clients.js";
import { startDaemon, type Daemon } from "../test/lib/daemon.js";
import {
  RUN_PREFIX,
  canPing,
  cleanupSync,
  createNetns,
  diffRoot,
  installCleanupHandlers,
  ipn,
  listNetnsSync,
  nsExec,
  onCleanup,
  ownedNamespace,
  rootSnapshot,
  run,
  trackChild,
  vethBetween,
  type RootSnapshot,
} from "../test/lib/netns.js";
import { startRedis, type TestRedis } from "../test/lib/redis.js";
import { machineEnv, cpuUs } from "./lib/cpu.js";
import { iperf3WithCpu, type IperfCpuResult } from "./lib/netns.js";
import { check, heading, num, pct, spr, resultsFile, table, verdictTable, writeJson, type Verdict } from "./lib/report.js";
import { benchArgs, benchClock, intOpt, pick, runBench } from "./lib/run.js";
import { interleaved, percentile, sorted, spread, type BenchCase, type Spread } from "./lib/stats.js";

const opt = benchArgs(
  {
    samples: { type: "string", default: "30" },
    "iperf-seconds": { type: "string", default: "3" },
    "iperf-runs": { type: "string", default: "5" },
    levels: { type: "string", default: "10,100,500" },
  },
  { samples: "2", "iperf-seconds": "1", "iperf-runs": "1", levels: "1,3" },
);

const SAMPLES = intOpt("samples", opt.samples, 10, 200);
const WARMUP = pick(3, 1);
const IPERF_S = intOpt("iperf-seconds", opt["iperf-seconds"], 1, 30);
const IPERF_RUNS = intOpt("iperf-runs", opt["iperf-runs"], 1, 10);
/** Warm-up rounds of the traffic cases (a smoke run has none: each costs a whole iperf3 run per case). */
const TRAFFIC_WARMUP = pick(1, 0);
const LEVELS = (opt.levels ?? "")
  .split(",")
  .map((x) => intOpt("levels", x, 1, 900))
  .sort((a, b) => a - b);
/** Timed exec samples per level for the per-exec breakdown. */
const DIAG = pick(15, 2);
/** API samples at the top level into an empty subnet of the same VPC. */
const EMPTY_SUBNET_SAMPLES = pick(15, 2);
/** Repeat an iperf3 run whose CPU pressure is above this (a neighbour took the cores)… */
const PRESSURE_MAX = 0.4;
/** …at most this many times… */
const RETRIES = pick(2, 0);
/** …and only while the run is younger than this. */
const RETRY_UNTIL_MS = 200_000;
/** The second pass at the first level is skipped if the run is already older than this. */
const DOWN_PASS_BEFORE_MS = 150_000;
/** Detaching back down to the first level must finish within this. */
const SHRINK_LIMIT_MS = 90_000;
/** Hard stop for the whole run: past it, cleanup runs and the process exits. */
const HARD_LIMIT_MS = pick(420_000, 120_000);
/** The CNI reference's background ports must be made within this. */
const CNI_GROW_LIMIT_MS = 120_000;
/** Background NICs must be made within this. */
const GROW_LIMIT_MS = 120_000;
/** Each level's samples must finish within this. */
const LEVEL_LIMIT_MS = 45_000;

const P = RUN_PREFIX;
const HOST = `${P}hv`;
const { t0, progress } = benchClock(HARD_LIMIT_MS);

// ------------------------------------------------------------ safety rails

installCleanupHandlers();

function own(ns: string): string {
  if (!ownedNamespace(ns)) throw new Error(`refusing to touch namespace ${ns}: not of run ${P}`);
  return ns;
}

/** Many `ip netns add|del` in one `ip -batch` exec (names checked against the run prefix). */
async function netnsBatch(verb: "add" | "del", names: string[]): Promise<void> {
  for (let i = 0; i < names.length; i += 200) {
    const chunk = names.slice(i, i + 200).map(own);
    // Deleting goes on past a namespace that is already gone (-force); adding stops at the first error.
    const r = await run("ip", [...(verb === "del" ? ["-force"] : []), "-batch", "-"], {
      input: chunk.map((n) => `netns ${verb} ${n}`).join("\n") + "\n",
      check: false,
      timeoutMs: 60_000,
    });
    if (r.code !== 0 && verb === "add") throw new Error(`ip netns add (batch): ${r.stderr.trim()}`);
  }
}

// ------------------------------------------------------------ measuring

const msSince = (t: number) => performance.now() - t;

interface Lat {
  p50: number;
  p99: number;
  mean: number;
  n: number;
}

function lat(xs: number[]): Lat {
  const s = sorted(xs);
  return { p50: percentile(s, 50), p99: percentile(s, 99), mean: xs.reduce((a, b) => a + b, 0) / (xs.length || 1), n: xs.length };
}

const fms = (x: number) => (Number.isFinite(x) ? `${num(x)} ms` : "–");

const CLK_TCK = (() => {
  try {
    return Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).trim()) || 100;
  } catch {
    return 100;
  }
})();

/** Busy share of all CPUs since a /proc/stat snapshot (everything on the machine, not only this run). */
function cpuTimes(): { busy: number; total: number } {
  const f = readFileSync("/proc/stat", "utf8").split("\n")[0].trim().split(/\s+/).slice(1).map(Number);
  const total = f.slice(0, 8).reduce((a, b) => a + b, 0);
  return { busy: total - f[3] - f[4], total };
}

/** Total µs some task waited for a CPU (PSI, /proc/pressure/cpu "some"); NaN where PSI is off. */
function psiCpuUs(): number {
  try {
    const m = /^some .*total=(\d+)/m.exec(readFileSync("/proc/pressure/cpu", "utf8"));
    return m ? Number(m[1]) : Number.NaN;
  } catch {
    return Number.NaN;
  }
}

/** CPU ms of the reaped children of pid (cutime + cstime): the execs a daemon ran. */
function childCpuMs(pid: number): number {
  try {
    const s = readFileSync(`/proc/${pid}/stat`, "utf8");
    const f = s.slice(s.lastIndexOf(")") + 2).split(" ");
    return ((Number(f[13]) + Number(f[14])) * 1000) / CLK_TCK;
  } catch {
    return Number.NaN;
  }
}

// ------------------------------------------------------------ the system

let redis: TestRedis | undefined;
let ipamD: Daemon | undefined;
let agentD: Daemon | undefined;

type NetAgentClient = Client<typeof NetAgentService>;

interface World {
  na: NetAgentClient;
  health: Client<typeof Health>;
  ipam: ReturnType<typeof ipamClients>;
  vpcId: string;
  vpcNs: string;
  fleet: { id: string; bridge: string; gateway: string };
  spare: { id: string; bridge: string; gateway: string };
  t1: { id: string; gateway: string };
  t2: { id: string; gateway: string };
}

async function allocate(w: World, subnetId: string, owner: string): Promise<string> {
  const r = await w.ipam.ipam.allocate({ subnetId, owner, requestId: owner });
  if (!r.allocation?.address) throw new Error(`IPAM gave no address for ${owner}`);
  return r.allocation.address;
}

async function attach(w: World, subnetId: string, vmNs: string, address: string, owner: string): Promise<string> {
  const r = await w.na.attachNic({
    vpc: w.vpcId,
    subnet: subnetId,
    kind: NicKind.VETH,
    options: { case: "veth", value: { netnsPath: `/run/netns/${own(vmNs)}` } },
    address,
    owner,
  });
  if (!r.created || !r.nic) throw new Error(`AttachNic ${owner}: not created`);
  return r.nic.id;
}

async function detach(w: World, nicId: string): Promise<void> {
  const r = await w.na.detachNic({ nic: nicId });
  if (r.detachedNicIds.length !== 1) throw new Error(`DetachNic ${nicId}: detached ${r.detachedNicIds.length}`);
}

// ------------------------------------------------------------ part 1

interface PassResult extends PairSamples {
  nics: number;
  attach: Lat;
  detach: Lat;
  /** Without the samples that overlapped a reconcile pass. */
  attachNoReconcile: Lat;
  detachNoReconcile: Lat;
}

function passResult(nics: number, r: PairSamples): PassResult {
  return {
    nics,
    ...r,
    attach: lat(r.attachMs),
    detach: lat(r.detachMs),
    attachNoReconcile: lat(r.attachMs.filter((_, i) => !r.attachOverlap[i])),
    detachNoReconcile: lat(r.detachMs.filter((_, i) => !r.detachOverlap[i])),
  };
}

interface LevelResult extends PassResult {
  /** Per-exec breakdown, ms per exec: name → latency. */
  execs: Record<string, Lat>;
  /** The bench's own CPU per exec it spawns (parent side). */
  parentCpuMsPerExec: number;
}

const EXEC_NAMES = {
  floor: "ip -n VPC link show dev lo (floor of one exec)",
  oneAttach: "AttachNic's exec fallback: one ip -n VPC -batch (veth into VM, alias, master+up; VM side by netns exec VM ip -batch FILE)",
  oneDetach: "DetachNic's exec fallback: ip -n VPC -force -batch (link del) beside nsenter VPC conntrack -R (-D -s, -D -d)",
  hostBatch: "before: AttachNic ip -n VPC -batch (veth add, alias, master+up)",
  guestBatch: "before: AttachNic nsenter VM ip -batch (rename, mac, addr, up, route)",
  addOnly: "  split: veth add + alias only",
  joinOnly: "  split: link set master BR up only",
  lookup: "before: DetachNic ip -n VPC -j -d addr show dev X (×2)",
  del: "before: DetachNic ip -n VPC -batch link del",
  conntrack: "before: DetachNic ip netns exec VPC conntrack -D (×2)",
  altDel: "  alternative: one ip -force -batch deleting veth + (absent) ifb",
  altConntrack: "  alternative: nsenter --net=VPC conntrack -D",
  grpcFloor: "gRPC floor: Health/Check to the same microvpcd (no exec)",
  reconcileRead: "reconcile pass: ip -j -d addr show + tc -j qdisc show (whole VPC ns)",
};

/** Times the execs AttachNic and DetachNic run, one by one, from the bench, against the same VPC namespace and bridge. */
async function execBreakdown(w: World, level: number, addrs: string[]): Promise<{ execs: Record<string, Lat>; parentCpuMsPerExec: number }> {
  const V = w.vpcNs;
  const br = w.fleet.bridge;
  const t: Record<keyof typeof EXEC_NAMES, number[]> = {
    floor: [],
    oneAttach: [],
    oneDetach: [],
    hostBatch: [],
    guestBatch: [],
    addOnly: [],
    joinOnly: [],
    lookup: [],
    del: [],
    conntrack: [],
    altDel: [],
    altConntrack: [],
    grpcFloor: [],
    reconcileRead: [],
  };
  /** The bench's own CPU (parent side of each exec: fork, pipes, callbacks). */
  const parentCpu: number[] = [];
  const vms = Array.from({ length: DIAG }, (_, i) => `${P}-d${level}-${i}`);
  await netnsBatch("add", vms);
  try {
    for (let i = 0; i < DIAG; i++) {
      const vm = vms[i];
      const hex = randomBytes(4).toString("hex");
      const a = `xa${hex}`; // host side, like netagent's v<12 hex>
      const ap = `ya${hex}`;
      const b = `xb${hex}`;
      const bp = `yb${hex}`;
      let s = performance.now();
      const c0 = process.cpuUsage();
      await ipn(V, ["link", "show", "dev", "lo"]);
      const c = process.cpuUsage(c0);
      parentCpu.push((c.user + c.system) / 1000);
      t.floor.push(msSince(s));
      s = performance.now();
      await w.health.check({});
      t.grpcFloor.push(msSince(s));
      // The exact host-side batch of AttachNic.
      s = performance.now();
      await ipn(V, ["-batch", "-"], {
        input:
          [
            `link add ${a} mtu 1500 type veth peer name ${ap} mtu 1500 netns ${vm}`,
            `link set dev ${a} alias mbench`,
            `link set dev ${a} mtu 1500 master ${br} up`,
          ].join("\n") + "\n",
      });
      t.hostBatch.push(msSince(s));
      // The exact guest-side batch (nsenter, as kernel.ts runs it).
      s = performance.now();
      await run("nsenter", [`--net=/run/netns/${vm}`, "ip", "-batch", "-"], {
        input:
          [
            `link set dev ${ap} name eth0`,
            `link set dev eth0 address 02:00:00:00:${(i >> 8) & 255}:${i & 255} mtu 1500`,
            `addr replace ${addrs[i]}/22 dev eth0`,
            "link set dev eth0 up",
            "link set dev lo up",
            `route replace default via ${w.fleet.gateway} dev eth0`,
          ].join("\n") + "\n",
      });
      t.guestBatch.push(msSince(s));
      // The same host-side work split in two execs: what joining the bridge costs.
      s = performance.now();
      await ipn(V, ["-batch", "-"], {
        input: [`link add ${b} mtu 1500 type veth peer name ${bp} mtu 1500 netns ${vm}`, `link set dev ${b} alias mbench`].join("\n") + "\n",
      });
      t.addOnly.push(msSince(s));
      s = performance.now();
      await ipn(V, ["-batch", "-"], { input: `link set dev ${b} mtu 1500 master ${br} up\n` });
      t.joinOnly.push(msSince(s));
      // DetachNic's execs.
      s = performance.now();
      await ipn(V, ["-j", "-d", "addr", "show", "dev", a]);
      t.lookup.push(msSince(s));
      s = performance.now();
      await ipn(V, ["-batch", "-"], { input: `link del dev ${a}\n` });
      t.del.push(msSince(s));
      s = performance.now();
      await nsExec(V, "conntrack", ["-D", "-s", addrs[i]], { check: false });
      t.conntrack.push(msSince(s));
      // Alternatives for DetachNic: no lookups, one exec for both devices; nsenter instead of ip netns exec.
      s = performance.now();
      await ipn(V, ["-force", "-batch", "-"], { input: `link del dev ${b}\nlink del dev ib${hex}\n`, check: false });
      t.altDel.push(msSince(s));
      s = performance.now();
      await run("nsenter", [`--net=/run/netns/${V}`, "conntrack", "-D", "-s", addrs[i]], { check: false });
      t.altConntrack.push(msSince(s));
      // What AttachNic and DetachNic run now: one exec each.
      const cv = `xc${hex}`;
      const gfile = join(benchTmp(), `g${hex}.batch`);
      writeFileSync(gfile, [`addr replace ${addrs[i]}/22 dev eth1`, "link set dev eth1 up", "link set dev lo up"].join("\n") + "\n");
      s = performance.now();
      await ipn(V, ["-batch", "-"], {
        input:
          [
            `link add ${cv} mtu 1500 type veth peer name eth1 address 02:00:00:01:${(i >> 8) & 255}:${i & 255} mtu 1500 netns ${vm}`,
            `link set dev ${cv} alias mbench`,
            `link set dev ${cv} mtu 1500 master ${br} up`,
            `netns exec ${vm} ip -batch ${gfile}`,
          ].join("\n") + "\n",
      });
      t.oneAttach.push(msSince(s));
      rmSync(gfile, { force: true });
      const ctfile = join(benchTmp(), `c${hex}.ct`);
      writeFileSync(ctfile, `-D -s ${addrs[i]}\n-D -d ${addrs[i]}\n`);
      s = performance.now();
      await Promise.all([
        ipn(V, ["-force", "-batch", "-"], { input: `link del dev ${cv}\n`, check: false }),
        run("nsenter", [`--net=/run/netns/${V}`, "conntrack", "-R", ctfile], { check: false }),
      ]);
      t.oneDetach.push(msSince(s));
      rmSync(ctfile, { force: true });
      if (i < 5) {
        s = performance.now();
        await ipn(V, ["-j", "-d", "addr", "show"]);
        await run("tc", ["-n", V, "-j", "qdisc", "show"]);
        t.reconcileRead.push(msSince(s));
      }
    }
  } finally {
    await netnsBatch("del", vms);
  }
  return { execs: Object.fromEntries(Object.entries(t).map(([k, xs]) => [k, lat(xs)])), parentCpuMsPerExec: lat(parentCpu).p50 };
}

/** ~SAMPLES attach+detach pairs into fresh VM namespaces, only the gRPC calls timed. */
interface PairSamples {
  attachMs: number[];
  detachMs: number[];
  /** Execs microvpcd ran per measured AttachNic / DetachNic, by command (its exec metrics; the reconciler's reads included). */
  attachExecs: Record<string, number>;
  detachExecs: Record<string, number>;
  /** Per sample: did a reconcile pass of the agent (which holds the VPC lock) end during the call? */
  attachOverlap: boolean[];
  detachOverlap: boolean[];
  cpuPerPairMs: { daemon: number; execs: number };
  /** Share of both CPUs busy (whole machine) during the measured pairs. */
  machineBusy: number;
  /** CPU pressure (PSI some) during the measured pairs. */
  pressure: number;
  sanityPing: boolean;
}

/**
 * Attach+detach pairs into fresh VM namespaces, only the gRPC calls timed.
 * With several target subnets the pairs alternate between them (after
 * WARMUP pairs into each), so that every target sees the same moments of a
 * noisy machine. Returns one PairSamples per target (CPU, busy and pressure
 * are over all of the measured pairs, shared).
 */
async function samplePairs(w: World, tag: string, targets: { id: string; gateway: string }[], counts: number[]): Promise<PairSamples[]> {
  // The order: warm-ups (round robin), then measured pairs (round robin while a target still needs some).
  const plan: { k: number; warm: boolean }[] = [];
  for (let i = 0; i < WARMUP; i++) for (let k = 0; k < targets.length; k++) plan.push({ k, warm: true });
  const left = [...counts];
  for (let guard = 0; left.some((x) => x > 0) && guard < 10_000; guard++) {
    for (let k = 0; k < targets.length; k++) {
      if (left[k] > 0) {
        plan.push({ k, warm: false });
        left[k]--;
      }
    }
  }
  const measured = plan.filter((x) => !x.warm).length;
  const vms = plan.map((_, i) => `${P}-s${tag}-${i}`);
  await netnsBatch("add", vms);
  const addrs: string[] = [];
  for (let i = 0; i < plan.length; i++) addrs.push(await allocate(w, targets[plan[i].k].id, `vm-s${tag}-${i}`));
  const out: PairSamples[] = targets.map(() => ({
    attachMs: [],
    detachMs: [],
    attachOverlap: [],
    detachOverlap: [],
    attachExecs: {},
    detachExecs: {},
    cpuPerPairMs: { daemon: Number.NaN, execs: Number.NaN },
    machineBusy: Number.NaN,
    pressure: Number.NaN,
    sanityPing: false,
  }));
  const pid = agentD!.proc.pid!;
  let cpu0 = 0;
  let kids0 = 0;
  let busy0 = cpuTimes();
  let psi0 = psiCpuUs();
  let wall0 = performance.now();
  // When the agent's last reconcile pass ended (untimed call between samples).
  const lastReconcile = async () => {
    const st = await w.na.getHostStatus({});
    return st.lastReconcileTime ? timestampMs(st.lastReconcileTime) : 0;
  };
  let rec = await lastReconcile();
  const deadline = Date.now() + LEVEL_LIMIT_MS;
  const pinged = new Set<number>();
  try {
    for (let i = 0; i < plan.length; i++) {
      const { k, warm } = plan[i];
      const target = targets[k];
      if (!warm && (i === 0 || plan[i - 1].warm)) {
        cpu0 = cpuUs(pid);
        kids0 = childCpuMs(pid);
        busy0 = cpuTimes();
        psi0 = psiCpuUs();
        wall0 = performance.now();
      }
      if (Date.now() > deadline) throw new Error(`samples at ${tag}: past ${LEVEL_LIMIT_MS / 1000} s after ${i} pairs`);
      const e0 = await execTotals();
      let wall = Date.now();
      let s = performance.now();
      const nic = await attach(w, target.id, vms[i], addrs[i], `vm-s${tag}-${i}`);
      const a = msSince(s);
      const e1 = await execTotals();
      let r = await lastReconcile();
      const aOver = r !== rec && r >= wall;
      rec = r;
      // Once per target, untimed: the NIC really works (the VM reaches its gateway).
      if (!pinged.has(k)) {
        pinged.add(k);
        out[k].sanityPing = await canPing(vms[i], target.gateway, { count: 2, deadlineS: 3 });
      }
      wall = Date.now();
      const e2 = await execTotals();
      s = performance.now();
      await detach(w, nic);
      const d = msSince(s);
      const e3 = await execTotals();
      if (!warm) {
        const n = out[k].attachMs.length + 1;
        addExecs(out[k].attachExecs, e0, e1, n);
        addExecs(out[k].detachExecs, e2, e3, n);
      }
      r = await lastReconcile();
      const dOver = r !== rec && r >= wall;
      rec = r;
      if (!warm) {
        out[k].attachMs.push(a);
        out[k].detachMs.push(d);
        out[k].attachOverlap.push(aOver);
        out[k].detachOverlap.push(dOver);
      }
    }
    // Includes the untimed status calls between samples (small next to the execs).
    const cpuPerPairMs = { daemon: (cpuUs(pid) - cpu0) / 1000 / measured, execs: (childCpuMs(pid) - kids0) / measured };
    const b = cpuTimes();
    const machineBusy = (b.busy - busy0.busy) / (b.total - busy0.total);
    const pressure = (psiCpuUs() - psi0) / 1000 / msSince(wall0);
    for (const o of out) Object.assign(o, { cpuPerPairMs, machineBusy, pressure });
  } finally {
    await netnsBatch("del", vms);
  }
  return out;
}

/** microvpc_exec_total of the agent, by command. */
async function execTotals(): Promise<Map<string, number>> {
  const text = await (await fetch(`http://127.0.0.1:${agentD!.metricsPort}/metrics`)).text();
  const m = new Map<string, number>();
  for (const [, command, n] of text.matchAll(/^microvpc_exec_total\{(?:[^}]*,)?command="([^"]*)"[^}]*\} (\d+)$/gm))
    m.set(command, (m.get(command) ?? 0) + Number(n));
  return m;
}

/** Folds the execs between two snapshots into a running mean per op (n = samples so far, this one included). */
function addExecs(acc: Record<string, number>, before: Map<string, number>, after: Map<string, number>, n: number): void {
  for (const k of new Set([...Object.keys(acc), ...after.keys()])) {
    const d = (after.get(k) ?? 0) - (before.get(k) ?? 0);
    acc[k] = ((acc[k] ?? 0) * (n - 1) + d) / n;
  }
  for (const k of Object.keys(acc)) if (acc[k] === 0) delete acc[k];
}

const fmtExecs = (e: Record<string, number>) =>
  Object.entries(e)
    .sort((a, b) => b[1] - a[1])
    .map(([k, v]) => `${k} ${num(v)}`)
    .join(", ") || "none";

let tmpDir: string | undefined;
function benchTmp(): string {
  if (!tmpDir) {
    const d = mkdtempSync(join(tmpdir(), "mvpc-bench-"));
    tmpDir = d;
    onCleanup(() => rmSync(d, { recursive: true, force: true }));
  }
  return tmpDir;
}

// ------------------------------------------------------------ CNI reference (same run)
// The reference bridge plugin (Debian containernetworking-plugins) with the
// static IPAM plugin (the address is given, as ours is allocated beforehand),
// run as a runtime would, one exec per ADD/DEL, inside a namespace of the run
// playing the host (`ip netns exec`, which also gives it that namespace's
// /sys): its bridge, at the same number of ports as ours, and fresh VM
// namespaces. The wrapper's own cost is measured too (floor).

const CNI_DIR = ["/usr/lib/cni", "/opt/cni/bin"].find((d) => existsSync(`${d}/bridge`) && existsSync(`${d}/static`));
const CNI_HOST = `${P}-cnihost`;
let cniNext = 10;
const cniFree: number[] = [];
const cniAddr = (n: number) => `10.71.${n >> 8}.${n & 255}`;

function cniConfig(n: number): string {
  return JSON.stringify({
    cniVersion: "1.0.0",
    name: "mvpc-bench",
    type: "bridge",
    bridge: "cnibr0",
    isGateway: true,
    ipMasq: false,
    mtu: 1500,
    ipam: { type: "static", addresses: [{ address: `${cniAddr(n)}/16`, gateway: "10.71.0.1" }], routes: [{ dst: "0.0.0.0/0", gw: "10.71.0.1" }] },
  });
}

function cniExec(cmd: "ADD" | "DEL", vmNs: string, n: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = execFile(
      "ip",
      ["netns", "exec", own(CNI_HOST), `${CNI_DIR}/bridge`],
      {
        env: {
          ...process.env,
          LC_ALL: "C",
          CNI_COMMAND: cmd,
          CNI_CONTAINERID: vmNs,
          CNI_NETNS: `/run/netns/${own(vmNs)}`,
          CNI_IFNAME: "eth0",
          CNI_PATH: CNI_DIR,
        },
        timeout: 30_000,
      },
      (err, stdout, stderr) => (err ? reject(new Error(`CNI ${cmd} ${vmNs}: ${err.message} ${stdout} ${stderr}`)) : resolve()),
    );
    child.stdin!.end(cniConfig(n));
  });
}

interface CniLevel {
  nics: number;
  add: Lat;
  del: Lat;
  /** `ip netns exec HOST true`: the wrapper's share of each ADD/DEL. */
  wrapperFloor: Lat;
  sanityPing: boolean;
}

const cniBg: { vm: string; n: number }[] = [];

/** Grows the CNI bridge to `level` ports, then WARMUP + SAMPLES ADD/DEL pairs into fresh namespaces. */
async function cniLevel(level: number): Promise<CniLevel> {
  const need = level - cniBg.length;
  const deadline = Date.now() + CNI_GROW_LIMIT_MS;
  if (need > 0) {
    const vms = Array.from({ length: need }, (_, i) => `${P}-c${cniBg.length + i}`);
    await netnsBatch("add", vms);
    for (const vm of vms) {
      if (Date.now() > deadline) throw new Error(`CNI background ports not made within ${CNI_GROW_LIMIT_MS / 1000} s (${cniBg.length} made)`);
      const n = cniNext++;
      await cniExec("ADD", vm, n);
      cniBg.push({ vm, n });
    }
  }
  const total = WARMUP + SAMPLES;
  const vms = Array.from({ length: total }, (_, i) => `${P}-cs${level}-${i}`);
  await netnsBatch("add", vms);
  const add: number[] = [];
  const del: number[] = [];
  const floor: number[] = [];
  let sanityPing = false;
  try {
    for (let i = 0; i < total; i++) {
      const n = cniFree.pop() ?? cniNext++;
      let s = performance.now();
      await cniExec("ADD", vms[i], n);
      const a = msSince(s);
      if (i === 0) sanityPing = await canPing(vms[i], "10.71.0.1", { count: 2, deadlineS: 3 });
      s = performance.now();
      await cniExec("DEL", vms[i], n);
      const d = msSince(s);
      cniFree.push(n);
      s = performance.now();
      await run("ip", ["netns", "exec", own(CNI_HOST), "true"]);
      const f = msSince(s);
      if (i >= WARMUP) {
        add.push(a);
        del.push(d);
        floor.push(f);
      }
    }
  } finally {
    await netnsBatch("del", vms);
  }
  return { nics: level, add: lat(add), del: lat(del), wrapperFloor: lat(floor), sanityPing };
}

// ------------------------------------------------------------ part 2

interface TputRun extends IperfCpuResult {
  /** CPU pressure (PSI some) during the run: the share of time a runnable task waited for a CPU. */
  pressure: number;
  /** Every attempt of this run (more than one when a neighbour took the cores). */
  attempts: { gbps: number; pressure: number }[];
}

interface TputCase {
  name: string;
  label: string;
  client: string;
  server: string;
  addr: string;
  /** Value of net.bridge.bridge-nf-call-iptables in the VPC namespace during the run; undefined: not a VPC path. */
  brnf?: 0 | 1;
}

async function setBrnf(vpcNs: string, v: 0 | 1): Promise<void> {
  // Inside the VPC namespace only (a per-namespace sysctl on this kernel).
  await nsExec(own(vpcNs), "sysctl", ["-q", "-w", `net.bridge.bridge-nf-call-iptables=${v}`]);
}

async function readBrnf(ns: string): Promise<string> {
  const r = await nsExec(own(ns), "sysctl", ["-n", "net.bridge.bridge-nf-call-iptables"], { check: false });
  return r.stdout.trim() || r.stderr.trim();
}

/** Two plain namespaces joined through a router namespace by veths, /32 routes, no bridge (the routed model). */
async function buildRouted(): Promise<{ x: string; y: string; yAddr: string; router: string }> {
  const r = await createNetns(`${P}-rr`);
  const x = await createNetns(`${P}-rx`);
  const y = await createNetns(`${P}-ry`);
  await nsExec(r, "sysctl", ["-q", "-w", "net.ipv4.ip_forward=1"]);
  await ipn(r, ["addr", "add", "169.254.1.1/32", "dev", "lo"]);
  const ends: [string, string, string][] = [
    [x, "rvx", "10.98.0.2"],
    [y, "rvy", "10.98.0.3"],
  ];
  for (const [vm, hostIf, addr] of ends) {
    await vethBetween({ ns: r, name: hostIf }, { ns: vm, name: "eth0" });
    await ipn(vm, ["addr", "add", `${addr}/32`, "dev", "eth0"]);
    await ipn(vm, ["route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"]);
    await ipn(vm, ["route", "add", "default", "via", "169.254.1.1", "dev", "eth0"]);
    await ipn(r, ["route", "add", `${addr}/32`, "dev", hostIf]);
  }
  return { x, y, yAddr: "10.98.0.3", router: r };
}

// ------------------------------------------------------------ main

async function main(): Promise<number> {
  const rootBefore: RootSnapshot = await rootSnapshot();
  progress(`run prefix ${P}; starting redis-server, microvpcd ipam and microvpcd netagent (host id ${HOST})`);
  redis = await startRedis({ appendfsync: "no" });
  trackChild(redis.proc);
  const redisDir = redis.dir;
  onCleanup(() => rmSync(redisDir, { recursive: true, force: true }));
  ipamD = await startDaemon("ipam", ["--redis", redis.url]);
  trackChild(ipamD.proc);
  agentD = await startDaemon("netagent", ["--redis", redis.url, "--host-id", HOST, "--open-until-firewall"]);
  trackChild(agentD.proc);

  const env = {
    ...machineEnv(),
    iperf3: execFileSync("iperf3", ["--version"], { encoding: "utf8" }).split("\n")[0].trim(),
    iproute2: execFileSync("ip", ["-V"], { encoding: "utf8" }).trim(),
    redisAppendfsync: "no",
    prefix: P,
    hostId: HOST,
    samples: SAMPLES,
    warmup: WARMUP,
    levels: LEVELS,
    iperfSeconds: IPERF_S,
    iperfRuns: IPERF_RUNS,
  };

  const ipam = ipamClients(ipamD.address);
  const agentTransport = grpcTransport({ address: agentD.address, timeoutMs: 30_000 });
  const na = grpcClient(NetAgentService, agentTransport);
  const health = grpcClient(Health, agentTransport);
  const { vpc } = await ipam.vpc.createVpc({ name: `bench-${P}`, cidr: "10.70.0.0/16" });
  const mk = async (name: string, cidr: string) => {
    const { subnet } = await ipam.subnet.createSubnet({ vpc: vpc!.id, name, cidr });
    const r = await na.ensureSubnet({ vpc: vpc!.id, subnet: subnet!.id });
    return { id: subnet!.id, gateway: subnet!.gateway, bridge: r.subnet!.bridge, ns: r.subnet!.namespace };
  };
  const fleet = await mk("fleet", "10.70.0.0/22");
  const spare = await mk("spare", "10.70.8.0/24");
  const t1 = await mk("t1", "10.70.9.0/24");
  const t2 = await mk("t2", "10.70.10.0/24");
  const w: World = { na, health, ipam, vpcId: vpc!.id, vpcNs: own(fleet.ns), fleet, spare, t1, t2 };
  const brnfDefault = await readBrnf(w.vpcNs);
  progress(`VPC ${w.vpcId} in namespace ${w.vpcNs}; fleet subnet ${fleet.id} on bridge ${fleet.bridge}; bridge-nf-call-iptables there = ${brnfDefault}`);

  if (CNI_DIR) {
    await createNetns(CNI_HOST);
    await nsExec(CNI_HOST, "ip", ["link", "set", "lo", "up"]);
  }
  const cniLevels: CniLevel[] = [];

  // ---- 1. latency at each level
  const bg: { nic: string; vm: string }[] = [];
  const growMs: { count: number; ms: number }[] = [];
  const levels: LevelResult[] = [];
  let emptySubnet: (PairSamples & { attach: Lat; detach: Lat }) | undefined;
  const growDeadline = Date.now() + GROW_LIMIT_MS;
  for (const level of LEVELS) {
    const need = level - bg.length;
    if (need > 0) {
      progress(`growing the host to ${level} NICs (+${need}, through AttachNic)`);
      const vms = Array.from({ length: need }, (_, i) => `${P}-v${bg.length + i}`);
      await netnsBatch("add", vms);
      for (let i = 0; i < need; i++) {
        if (Date.now() > growDeadline) throw new Error(`background NICs not made within ${GROW_LIMIT_MS / 1000} s (${bg.length} made)`);
        const owner = `vm-bg-${bg.length}`;
        const addr = await allocate(w, fleet.id, owner);
        const s = performance.now();
        const nic = await attach(w, fleet.id, vms[i], addr, owner);
        growMs.push({ count: bg.length, ms: msSince(s) });
        bg.push({ nic, vm: vms[i] });
      }
    }
    const top = level === LEVELS[LEVELS.length - 1];
    progress(
      `${level} NICs on the host: ${WARMUP} warm-up + ${SAMPLES} attach+detach pairs` +
        (top ? `, alternating with ${EMPTY_SUBNET_SAMPLES} into an empty /24 of the same VPC` : ""),
    );
    const [r, e] = await samplePairs(w, String(level), top ? [fleet, spare] : [fleet], top ? [SAMPLES, EMPTY_SUBNET_SAMPLES] : [SAMPLES]);
    if (e) emptySubnet = { ...e, attach: lat(e.attachMs), detach: lat(e.detachMs) };
    progress(`  attach p50 ${fms(lat(r.attachMs).p50)}, detach p50 ${fms(lat(r.detachMs).p50)}; timing the execs one by one`);
    const diagAddrs: string[] = [];
    for (let i = 0; i < DIAG; i++) diagAddrs.push(await allocate(w, fleet.id, `vm-d${level}-${i}`));
    const { execs, parentCpuMsPerExec } = await execBreakdown(w, level, diagAddrs);
    levels.push({ ...passResult(level, r), execs, parentCpuMsPerExec });
    progress(`  execs per AttachNic: ${fmtExecs(r.attachExecs)}; per DetachNic: ${fmtExecs(r.detachExecs)}`);
    if (CNI_DIR) {
      progress(`  CNI bridge plugin at ${level} ports: ${WARMUP} warm-up + ${SAMPLES} ADD/DEL pairs`);
      const c = await cniLevel(level);
      cniLevels.push(c);
      progress(`  CNI ADD p50 ${fms(c.add.p50)}, DEL p50 ${fms(c.del.p50)} (wrapper floor ${fms(c.wrapperFloor.p50)})`);
    }
  }

  // ---- 1b. back down to the first level, and measure it again
  const shrinkMs: { count: number; ms: number }[] = [];
  let down: PassResult | undefined;
  let downSkipped = "";
  if (LEVELS.length < 2) downSkipped = "one level only";
  else if (Date.now() - t0 > DOWN_PASS_BEFORE_MS) downSkipped = `run already ${((Date.now() - t0) / 1000).toFixed(0)} s old`;
  else {
    const target = LEVELS[0];
    progress(`back down to ${target} NICs (−${bg.length - target}, through DetachNic), then ${SAMPLES} pairs at ${target} again`);
    const shrinkDeadline = Date.now() + SHRINK_LIMIT_MS;
    const gone: string[] = [];
    while (bg.length > target) {
      if (Date.now() > shrinkDeadline) throw new Error(`detaching back down to ${target} NICs took over ${SHRINK_LIMIT_MS / 1000} s (${bg.length} left)`);
      const b = bg.pop()!;
      const s = performance.now();
      await detach(w, b.nic);
      shrinkMs.push({ count: bg.length + 1, ms: msSince(s) });
      gone.push(b.vm);
    }
    await netnsBatch("del", gone);
    down = passResult(target, (await samplePairs(w, `${target}b`, [fleet], [SAMPLES]))[0]);
    progress(`  attach p50 ${fms(down.attach.p50)}, detach p50 ${fms(down.detach.p50)}`);
  }
  /** The first level, both passes pooled (what the 500-vs-10 ratio uses). */
  const first: PassResult = down
    ? passResult(LEVELS[0], {
        ...levels[0],
        attachMs: [...levels[0].attachMs, ...down.attachMs],
        detachMs: [...levels[0].detachMs, ...down.detachMs],
        attachOverlap: [...levels[0].attachOverlap, ...down.attachOverlap],
        detachOverlap: [...levels[0].detachOverlap, ...down.detachOverlap],
        cpuPerPairMs: {
          daemon: (levels[0].cpuPerPairMs.daemon + down.cpuPerPairMs.daemon) / 2,
          execs: (levels[0].cpuPerPairMs.execs + down.cpuPerPairMs.execs) / 2,
        },
        machineBusy: (levels[0].machineBusy + down.machineBusy) / 2,
        pressure: (levels[0].pressure + down.pressure) / 2,
        sanityPing: levels[0].sanityPing && down.sanityPing,
      })
    : levels[0];

  // ---- 2. throughput
  progress(`throughput: attaching 3 VMs (2 in subnet t1, 1 in t2), a raw veth pair, a routed pair`);
  const tvm = { a: `${P}-ta`, b: `${P}-tb`, c: `${P}-tc` };
  await netnsBatch("add", Object.values(tvm));
  const tAddr = { a: await allocate(w, t1.id, "vm-ta"), b: await allocate(w, t1.id, "vm-tb"), c: await allocate(w, t2.id, "vm-tc") };
  await attach(w, t1.id, tvm.a, tAddr.a, "vm-ta");
  await attach(w, t1.id, tvm.b, tAddr.b, "vm-tb");
  await attach(w, t2.id, tvm.c, tAddr.c, "vm-tc");
  const rawA = await createNetns(`${P}-ra`);
  const rawB = await createNetns(`${P}-rb`);
  await vethBetween({ ns: rawA, name: "eth0", address: "10.99.0.1/24" }, { ns: rawB, name: "eth0", address: "10.99.0.2/24" });
  const routed = await buildRouted();
  const cases: TputCase[] = [
    { name: "raw", label: "raw veth pair, two plain namespaces", client: rawA, server: rawB, addr: "10.99.0.2" },
    { name: "same-subnet", label: "VM↔VM, one subnet (bridge)", client: tvm.a, server: tvm.b, addr: tAddr.b, brnf: 1 },
    { name: "cross-subnet", label: "VM↔VM, two subnets (routed in the VPC ns)", client: tvm.a, server: tvm.c, addr: tAddr.c, brnf: 1 },
    { name: "same-subnet-nf0", label: "  experiment: one subnet, bridge-nf-call-iptables=0", client: tvm.a, server: tvm.b, addr: tAddr.b, brnf: 0 },
    { name: "cross-subnet-nf0", label: "  experiment: two subnets, bridge-nf-call-iptables=0", client: tvm.a, server: tvm.c, addr: tAddr.c, brnf: 0 },
    { name: "routed", label: "  experiment: routed /32 veths, no bridge", client: routed.x, server: routed.y, addr: routed.yAddr },
  ];
  const reach: Record<string, boolean> = {};
  for (const c of cases) reach[c.name] = await canPing(c.client, c.addr, { count: 2, deadlineS: 3 });
  // VPC isolation sanity for the record: the raw pair's address space is not reachable from a VM.
  const unreachable = !(await canPing(tvm.a, "10.99.0.2", { count: 1, deadlineS: 1 }));
  const bad = Object.entries(reach).filter(([, ok]) => !ok);
  if (bad.length) throw new Error(`no ping for ${bad.map(([n]) => n).join(", ")}: the paths are not up`);
  progress(`iperf3: ${cases.length} paths × ${IPERF_RUNS} runs × ${IPERF_S} s, interleaved (+${TRAFFIC_WARMUP} warm-up round of 1 s)`);
  const benchCases: BenchCase<TputRun>[] = cases.map((c) => ({
    name: c.name,
    async run(round, warmup) {
      if (c.brnf !== undefined) await setBrnf(w.vpcNs, c.brnf);
      try {
        let best: TputRun | undefined;
        const tried: { gbps: number; pressure: number }[] = [];
        for (let a = 0; a < (warmup ? 1 : 1 + RETRIES); a++) {
          if (a > 0 && Date.now() - t0 > RETRY_UNTIL_MS) break;
          const psi0 = psiCpuUs();
          const s = performance.now();
          const r = await iperf3WithCpu(c.client, c.server, c.addr, { seconds: warmup ? 1 : IPERF_S });
          const pressure = (psiCpuUs() - psi0) / 1000 / msSince(s);
          tried.push({ gbps: r.gbps, pressure });
          if (!best || pressure < best.pressure) best = { ...r, pressure, attempts: tried };
          if (!(pressure > PRESSURE_MAX)) break;
        }
        if (!warmup)
          progress(`  round ${round + 1}: ${c.name} ${tried.map((x) => `${x.gbps.toFixed(2)} Gbit/s (pressure ${pct(x.pressure)})`).join(", then ")}`);
        return best!;
      } finally {
        if (c.brnf === 0) await setBrnf(w.vpcNs, 1);
      }
    },
  }));
  const tputRuns = await interleaved(benchCases, { rounds: IPERF_RUNS, warmupRounds: TRAFFIC_WARMUP, minRounds: IPERF_RUNS });
  const brnfAfter = await readBrnf(w.vpcNs);
  const tput: Record<
    string,
    { label: string; gbps: Spread; retransmits: number[]; runs: TputRun[]; pairedVsRaw: Spread; pressure: Spread; cpuMsPerGB: Spread }
  > = {};
  const rawRuns = tputRuns.get("raw")!;
  for (const c of cases) {
    const runs = tputRuns.get(c.name)!;
    tput[c.name] = {
      label: c.label,
      gbps: spread(runs.map((x) => x.gbps)),
      retransmits: runs.map((x) => x.retransmits),
      runs,
      pairedVsRaw: spread(runs.map((x, i) => x.gbps / rawRuns[i].gbps)),
      pressure: spread(runs.map((x) => x.pressure)),
      cpuMsPerGB: spread(runs.map((x) => x.cpuMsPerGB)),
    };
  }

  const elapsedMeasureS = (Date.now() - t0) / 1000;
  const loadAtEnd = loadavg().map((x) => Number(x.toFixed(2)));

  // ---- teardown (also done by the exit handlers if anything above threw)
  progress("done measuring; stopping the daemons and removing every namespace of the run");
  const tc0 = performance.now();
  await agentD.stop();
  await ipamD.stop();
  await netnsBatch("del", [...bg.map((b) => b.vm), ...Object.values(tvm)]);
  await redis.stop();
  const cleaned = cleanupSync();
  const teardownMs = msSince(tc0);
  const leftovers = listNetnsSync().filter((n) => ownedNamespace(n));
  const rootAfter = await rootSnapshot();
  const rootDiff = diffRoot(rootBefore, rootAfter);

  // ================================================================ report
  const out: string[] = [];
  const p = (s = "") => out.push(s);
  p(heading("microvpc netagent benchmark"));
  p(
    `${env.date} · node ${env.node} · kernel ${env.kernel} · ${env.cores} × ${env.cpu} · load avg ${env.loadavgAtStart.join(" ")} at start, ${loadAtEnd.join(" ")} at end`,
  );
  p(`${env.iproute2} · ${env.iperf3} · Redis appendfsync no (data-plane bench: the two Redis writes per call are not what is measured)`);
  p(`run prefix ${P}, host id ${HOST}, VPC namespace ${w.vpcNs}; bridge-nf-call-iptables in it: ${brnfDefault} by default, ${brnfAfter} after the experiments`);

  p(heading("1. AttachNic / DetachNic latency (gRPC call to microvpcd netagent, kind=VETH, fresh VM namespace, address pre-allocated)"));
  p(`All NICs in one VPC and one /22 subnet, so on one bridge. ${WARMUP} warm-up + ${SAMPLES} pairs per level; p99 is nearest-rank, so`);
  p(`with ${SAMPLES} samples it is the slowest one. CPU per pair: microvpcd's own threads + the execs it ran (ip, nsenter, conntrack).`);
  p(`"reconcile": samples during which the agent's 10-s reconcile pass (it holds the VPC lock) ended; "busy": both CPUs, whole machine;`);
  p(`"pressure": PSI cpu some, the share of the time a runnable task waited for a CPU.`);
  p(
    CNI_DIR
      ? `CNI: the reference bridge plugin (${CNI_DIR}/bridge + static IPAM) measured in this run at the same number of bridge ports, ${SAMPLES} ADD/DEL pairs per level, each exec'd through \`ip netns exec HOST\` (its floor is in the CNI table).`
      : "CNI: the reference plugins are not installed (apt-get install containernetworking-plugins): not measured.",
  );
  const cni: Record<number, [number, number]> = Object.fromEntries(cniLevels.map((c) => [c.nics, [c.add.p50, c.del.p50]]));
  const nOver = (xs: boolean[]) => xs.filter(Boolean).length;
  const row = (label: string, l: PassResult, withCni: boolean) => [
    label,
    fms(l.attach.p50),
    fms(l.attach.p99),
    fms(l.attachNoReconcile.p99),
    fms(l.detach.p50),
    fms(l.detach.p99),
    `${nOver(l.attachOverlap)} / ${nOver(l.detachOverlap)}`,
    `${num(l.cpuPerPairMs.daemon)} + ${num(l.cpuPerPairMs.execs)}`,
    `${pct(l.machineBusy)} / ${pct(l.pressure)}`,
    withCni && cni[l.nics] ? `${num(cni[l.nics][0])} / ${num(cni[l.nics][1])} ms` : "",
    l.sanityPing ? "yes" : "NO",
  ];
  const latRows = levels.map((l) => row(`${l.nics} ↑`, l, true));
  if (emptySubnet)
    latRows.push(
      row(
        `${LEVELS[LEVELS.length - 1]} ↑, empty /24*`,
        {
          nics: LEVELS[LEVELS.length - 1],
          ...emptySubnet,
          attachNoReconcile: lat(emptySubnet.attachMs.filter((_, i) => !emptySubnet!.attachOverlap[i])),
          detachNoReconcile: lat(emptySubnet.detachMs.filter((_, i) => !emptySubnet!.detachOverlap[i])),
        },
        false,
      ),
    );
  if (down) {
    latRows.push(row(`${down.nics} ↓ (back down)`, down, false));
    latRows.push(row(`${down.nics} ↑↓ pooled`, first, true));
  }
  p(
    table(
      [
        "NICs on host",
        "attach p50",
        "p99",
        "p99 w/o reconcile",
        "detach p50",
        "p99",
        "reconcile a/d",
        "CPU ms/pair",
        "busy / pressure",
        "CNI ADD/DEL p50",
        "VM pings gw",
      ],
      latRows,
    ),
  );
  p(
    `Execs microvpcd ran per call (its microvpc_exec_total, mean over the measured calls; a reconcile pass that fell inside a call adds its reads): ` +
      levels.map((l) => `${l.nics} NICs: AttachNic ${fmtExecs(l.attachExecs)}; DetachNic ${fmtExecs(l.detachExecs)}`).join(" · "),
  );
  if (cniLevels.length)
    p(
      table(
        ["bridge ports", "CNI ADD p50", "p99", "CNI DEL p50", "p99", "wrapper floor p50", "VM pings gw", "AttachNic / ADD p50", "DetachNic / DEL p50"],
        cniLevels.map((c) => {
          const l = levels.find((x) => x.nics === c.nics)!;
          return [
            String(c.nics),
            fms(c.add.p50),
            fms(c.add.p99),
            fms(c.del.p50),
            fms(c.del.p99),
            fms(c.wrapperFloor.p50),
            c.sanityPing ? "yes" : "NO",
            num(l.attach.p50 / c.add.p50),
            num(l.detach.p50 / c.del.p50),
          ];
        }),
      ),
    );
  if (emptySubnet)
    p(
      `* ${EMPTY_SUBNET_SAMPLES} pairs into a subnet whose bridge has no other port (the VPC namespace holding the other ${LEVELS[LEVELS.length - 1]} NICs), alternating with the row above.`,
    );
  const bucket = (lo: number, hi: number) => lat(growMs.filter((g) => g.count >= lo && g.count < hi).map((g) => g.ms));
  const buckets: [number, number][] = [];
  {
    let lo = 0;
    for (const l of LEVELS) {
      buckets.push([lo, l]);
      lo = l;
    }
  }
  p(
    `Background attaches while growing the host (same call, sequential): ${buckets.map(([lo, hi]) => `${lo}–${hi}: p50 ${fms(bucket(lo, hi).p50)} p99 ${fms(bucket(lo, hi).p99)} (n=${bucket(lo, hi).n})`).join(" · ")}`,
  );
  if (down) {
    const sb = (lo: number, hi: number) => lat(shrinkMs.filter((g) => g.count > lo && g.count <= hi).map((g) => g.ms));
    const steps = [...LEVELS].reverse();
    const parts: string[] = [];
    for (let i = 0; i + 1 < steps.length; i++) {
      const x = sb(steps[i + 1], steps[i]);
      parts.push(`${steps[i]}–${steps[i + 1]}: p50 ${fms(x.p50)} p99 ${fms(x.p99)} (n=${x.n})`);
    }
    p(`Background detaches going back down (same call, sequential): ${parts.join(" · ")}`);
  } else p(`Second pass at ${LEVELS[0]} NICs skipped: ${downSkipped}.`);
  p();
  p(`Where the time goes: the execs AttachNic/DetachNic run, re-run one by one from the bench (Node execFile) into the same`);
  p(`VPC namespace and bridge, p50 (p99) of ${DIAG} each (reconcile read: of 5). The bench's own CPU per exec it spawns (parent`);
  p(`side: fork, pipes, callbacks): ${levels.map((l) => fms(l.parentCpuMsPerExec)).join(" / ")} at ${levels.map((l) => l.nics).join(" / ")} NICs.`);
  p(
    table(
      ["exec", ...levels.map((l) => `${l.nics} NICs`)],
      (Object.keys(EXEC_NAMES) as (keyof typeof EXEC_NAMES)[]).map((k) => [
        EXEC_NAMES[k],
        ...levels.map((l) => `${fms(l.execs[k].p50)} (${num(l.execs[k].p99)})`),
      ]),
    ),
  );
  const est = levels.map((l) => ({
    nics: l.nics,
    attachExecs: l.execs.hostBatch.p50 + l.execs.guestBatch.p50,
    detachExecs: 2 * l.execs.lookup.p50 + l.execs.del.p50 + 2 * l.execs.conntrack.p50,
    detachAlt: l.execs.altDel.p50 + 2 * l.execs.altConntrack.p50,
  }));
  p(
    table(
      ["NICs", "attach p50", "its 2 execs (sum of p50s)", "rest (gRPC, Redis, JS)", "detach p50", "its 5 execs", "rest", "detach alt.: 3 execs"],
      levels.map((l, i) => [
        String(l.nics),
        fms(l.attach.p50),
        fms(est[i].attachExecs),
        fms(l.attach.p50 - est[i].attachExecs),
        fms(l.detach.p50),
        fms(est[i].detachExecs),
        fms(l.detach.p50 - est[i].detachExecs),
        fms(est[i].detachAlt),
      ]),
    ),
  );
  p(`detach alt.: one \`ip -force -batch\` deleting both devices without looking them up + 2 × \`nsenter conntrack -D\` (sum of p50s).`);

  p(heading(`2. VM↔VM TCP throughput (iperf3, 1 stream, ${IPERF_S} s, ${IPERF_RUNS} runs interleaved with the others, median (min–max))`));
  p(
    table(
      ["path", "Gbit/s", "of raw (medians)", "of raw, paired by round", "CPU ms/GB (snd+rcv)", "raw's CPU/GB ÷ this", "CPU pressure", "retr."],
      cases.map((c) => {
        const t = tput[c.name];
        return [
          t.label,
          spr(t.gbps, (x) => num(x)),
          c.name === "raw" ? "–" : pct(t.gbps.median / tput.raw.gbps.median),
          c.name === "raw" ? "–" : `${pct(t.pairedVsRaw.median)} (${pct(t.pairedVsRaw.min)}–${pct(t.pairedVsRaw.max)})`,
          spr(t.cpuMsPerGB, (x) => num(x, 0)),
          c.name === "raw" ? "–" : pct(tput.raw.cpuMsPerGB.median / t.cpuMsPerGB.median),
          spr(t.pressure, pct),
          num(spread(t.retransmits).median, 0),
        ];
      }),
    ),
  );
  p(`Per round (Gbit/s, CPU pressure in brackets; a neighbour on the 2 cores shows as pressure; a run above ${pct(PRESSURE_MAX)} was repeated`);
  p(`up to ${RETRIES} times while the budget allowed, keeping the least disturbed attempt):`);
  p(
    table(
      ["round", ...cases.map((c) => c.name)],
      rawRuns.map((_, i) => [
        String(i + 1),
        ...cases.map((c) => {
          const r = tput[c.name].runs[i];
          return `${num(r.gbps)} (${pct(r.pressure)}${r.attempts.length > 1 ? `, best of ${r.attempts.length}` : ""})`;
        }),
      ]),
    ),
  );
  p(`CPU ms/GB: iperf3's own CPU figures (sender + receiver, softirq work done in their context included) per GB received;`);
  p(`it moves much less than throughput when a neighbour takes the cores, so "raw's CPU/GB ÷ this" is the contention-robust cost ratio.`);
  p(`A VM cannot reach the raw pair's 10.99.0.2 (other namespaces are not routed to): ${unreachable ? "yes" : "NO"}.`);

  // ---- verdicts
  const v: Verdict[] = [];
  for (const l of levels) {
    if (down && l === levels[0]) continue; // the pooled row below stands for it
    v.push({
      measure: `AttachNic p50, ${l.nics} NICs on host`,
      value: fms(l.attach.p50),
      baseline: "30 ms limit",
      ratio: l.attach.p50 / 30,
      ...check(l.attach.p50 / 30, { max: 1 }),
    });
    v.push({
      measure: `AttachNic p99, ${l.nics} NICs on host`,
      value: fms(l.attach.p99),
      baseline: "100 ms limit",
      ratio: l.attach.p99 / 100,
      ...check(l.attach.p99 / 100, { max: 1 }),
    });
  }
  const lo = first;
  const hi = levels[levels.length - 1];
  if (levels.length > 1) {
    if (down) {
      v.push({
        measure: `AttachNic p50, ${lo.nics} NICs, ↑↓ pooled`,
        value: fms(lo.attach.p50),
        baseline: "30 ms limit",
        ratio: lo.attach.p50 / 30,
        ...check(lo.attach.p50 / 30, { max: 1 }),
      });
      v.push({
        measure: `AttachNic p99, ${lo.nics} NICs, ↑↓ pooled`,
        value: fms(lo.attach.p99),
        baseline: "100 ms limit",
        ratio: lo.attach.p99 / 100,
        ...check(lo.attach.p99 / 100, { max: 1 }),
      });
    }
    v.push({
      measure: `AttachNic p50 at ${hi.nics} vs at ${lo.nics}${down ? " (↑↓)" : ""} NICs`,
      value: fms(hi.attach.p50),
      baseline: fms(lo.attach.p50),
      ratio: hi.attach.p50 / lo.attach.p50,
      ...check(hi.attach.p50 / lo.attach.p50, { max: 1.3 }),
    });
    v.push({ measure: `  same, p99`, value: fms(hi.attach.p99), baseline: fms(lo.attach.p99), ratio: hi.attach.p99 / lo.attach.p99, target: "" });
    if (emptySubnet) {
      v.push({
        measure: `  at ${hi.nics}: ${hi.nics}-port bridge vs empty bridge`,
        value: fms(hi.attach.p50),
        baseline: fms(emptySubnet.attach.p50),
        ratio: hi.attach.p50 / emptySubnet.attach.p50,
        target: "",
      });
    }
  }
  for (const l of levels) {
    const c = cni[l.nics];
    v.push({
      measure: `AttachNic p50 vs CNI bridge ADD p50, ${l.nics} ports`,
      value: fms(l.attach.p50),
      baseline: c ? `CNI ADD ${fms(c[0])}` : "– (CNI not measured)",
      ratio: c ? l.attach.p50 / c[0] : Number.NaN,
      ...(c ? check(l.attach.p50 / c[0], { max: 1 }) : { target: "" }),
    });
    v.push({
      measure: `DetachNic p50 vs CNI bridge DEL p50, ${l.nics} ports`,
      value: `${fms(l.detach.p50)} (p99 ${num(l.detach.p99)})`,
      baseline: c ? `CNI DEL ${fms(c[1])}` : "– (CNI not measured)",
      ratio: c ? l.detach.p50 / c[1] : Number.NaN,
      ...(c ? check(l.detach.p50 / c[1], { max: 1 }) : { target: "" }),
    });
  }
  const raw = tput.raw.gbps.median;
  const tv = (name: string, measure: string, target: boolean) => {
    const t = tput[name];
    const r = t.gbps.median / raw;
    const base = { measure, value: `${num(t.gbps.median)} Gbit/s`, baseline: `${num(raw)} raw veth`, ratio: r };
    v.push(target ? { ...base, ...check(r, { min: 0.9 }) } : { ...base, target: "" });
  };
  const cv = (name: string, measure: string) => {
    const t = tput[name];
    v.push({
      measure,
      value: `${num(t.cpuMsPerGB.median, 0)} ms/GB`,
      baseline: `${num(tput.raw.cpuMsPerGB.median, 0)} raw veth`,
      ratio: tput.raw.cpuMsPerGB.median / t.cpuMsPerGB.median,
      target: "",
    });
  };
  tv("same-subnet", "VM↔VM throughput, one subnet", true);
  tv("cross-subnet", "VM↔VM throughput, two subnets", true);
  tv("same-subnet-nf0", "  one subnet, bridge-nf-call-iptables=0", false);
  tv("cross-subnet-nf0", "  two subnets, bridge-nf-call-iptables=0", false);
  tv("routed", "  routed /32 veths, no bridge (not netagent)", false);
  cv("same-subnet", "  CPU/GB ratio (raw ÷ path), one subnet");
  cv("cross-subnet", "  CPU/GB ratio (raw ÷ path), two subnets");
  cv("same-subnet-nf0", "  CPU/GB ratio, one subnet, nf-call=0");
  cv("cross-subnet-nf0", "  CPU/GB ratio, two subnets, nf-call=0");
  cv("routed", "  CPU/GB ratio, routed /32, no bridge");
  p(heading("Verdict"));
  p(verdictTable(v));
  const misses = v.filter((x) => x.pass === false).length;
  p(`${v.filter((x) => x.pass === true).length} PASS, ${misses} MISS · measured in ${elapsedMeasureS.toFixed(0)} s, teardown ${num(teardownMs / 1000)} s`);
  p(
    `Cleanup: ${cleaned.namespaces.length} namespaces removed by the registry after the batch delete, ${leftovers.length} of run ${P} left` +
      `${leftovers.length ? ` (${leftovers.slice(0, 5).join(", ")})` : ""}; root namespace ${rootDiff.length ? `CHANGED: ${rootDiff.join("; ")}` : "unchanged (links, addresses, routes, sysctls, nft ruleset)"}.`,
  );

  const file = resultsFile("netagent");
  p();
  p(`figures written to ${file}`);
  console.log(out.join("\n"));
  writeJson(file, {
    env: { ...env, loadAtEnd, brnfDefault, brnfAfter },
    elapsedMeasureS,
    teardownMs,
    latency: {
      levels: levels.map((l) => ({ ...l })),
      emptySubnet,
      down,
      firstPooled: first,
      growMs,
      shrinkMs,
      cni: cniLevels,
    },
    throughput: tput,
    reach,
    vmCannotReachRawPair: unreachable,
    cleanup: { leftovers, rootDiff },
    verdicts: v,
  });
  return rootDiff.length || leftovers.length ? 2 : 0;
}

runBench(main, () => [["netagent", agentD]]);
