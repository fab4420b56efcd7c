// Firewall benchmark (`npm run bench:firewall`; not a timed test). From one
// run it prints, and writes as JSON to bench/results/firewall-<date>.json:
//   1. compile + apply time of one security group of 10, 1 000 and 10 000
//      rules bound to a NIC: services/firewall/compile.ts's compile() in this
//      process, then its full-replace script through LinuxNft.applyText
//      (`ip netns exec NS nft -f -`, the daemon's own applier) into a scratch
//      namespace of the run — direct, not through the daemon. Beside it, in
//      the same rounds: the same rules as one linear nft rule each (the
//      design the issue's measurements warn about) and the floor of one
//      `nft -f` exec (a script that changes nothing);
//   2. one membership change with 10, 1 000 and 10 000 rules loaded: a NIC of
//      another host joins (then leaves) the group a rule of the bound group
//      names as its peer: compile(next) + diff(prev, next) + LinuxNft.applyText of
//      the incremental script (one `add element` / `delete element` line);
//   3. through the real daemons (a harness of two simulated hypervisors,
//      `microvpcd firewall` on each): the same membership change at 10 and
//      10 000 rules, timed from BindNic to the host-0 daemon's
//      applies counter moving (its /metrics), with the daemon's own timer;
//      adding / removing the 9 995 extra rules through UpdateSecurityGroup;
//      and VM↔VM traffic between two VMs of one subnet with the receiver's
//      group holding its 5 allow rules only vs 10 000 rules (the 5 + 9 995
//      non-matching CIDR/port rules; 10 000 is the per-group maximum):
//      iperf3 (one TCP stream), ping RTT, and new TCP connections per second
//      (the packets that do go through the group's sets: established traffic
//      is accepted before any per-NIC chain);
// then a verdict table against the targets of issue 4.
//
// Safety: every namespace carries the run prefix of test/lib/netns.ts; the
// root namespace is never changed (snapshot of links, addresses, routes,
// sysctls and the nft ruleset before and after, compared). Everything of the
// run is removed at the end, also on failure, Ctrl-C and past the time
// budget; processes are ended by PID. Every loop is bounded in count and
// time. The run takes about 3 minutes.
//
// Options (after `npm run bench:firewall --`): --rounds N (apply rounds per
// size, default 7), --toggles N (membership changes per size, default 20),
// --daemon-toggles N (per rule count through the daemons, default 10),
// --iperf-seconds S (default 3), --iperf-runs N (default 5). --smoke: 1 round,
// 2 toggles, groups of 10 / 100 / 1 000 rules (1 000 through the daemons),
// 1 traffic round of 1 s (bench/lib/run.ts).
import { execFileSync } from "node:child_process";
import { loadavg } from "node:os";
import { performance } from "node:perf_hooks";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { Redis } from "ioredis";
import { Direction, FirewallService, Protocol, type SecurityGroupRuleSchema } from "../gen/microvpc/v1/firewall_pb.js";
import { SubnetType } from "../gen/microvpc/v1/subnet_pb.js";
import { grpcClient } from "../services/common/client.js";
import { LinuxNft } from "../services/firewall/apply.js";
import { MAX_ELEMENT_DELETIONS, compile, diff, elementDiff, type FwModel } from "../services/firewall/compile.js";
import type { BindingRec, SecurityGroupRec, SgRule, VpcFirewallState } from "../services/firewall/model.js";
import { names } from "../services/netagent/plan.js";
import { startDaemon, type Daemon } from "../test/lib/daemon.js";
import { Harness, type Vm } from "../test/lib/harness.js";
import { RUN_PREFIX, createNetns, deleteNetns, nsExec, ownedNamespace, startTcpServer, tcpProbe, trackChild, waitFor } from "../test/lib/netns.js";
import { machineEnv } from "./lib/cpu.js";
import { iperf3WithCpu, type IperfCpuResult } from "./lib/netns.js";
import { scrape, sum } from "./lib/prom.js";
import { pressureWindow } from "./lib/psi.js";
import { memoryByFamily } from "./lib/redis-memory.js";
import { check, heading, num, pct, resultsFile, spr, table, verdictTable, writeJson, type Verdict } from "./lib/report.js";
import { benchArgs, benchClock, intOpt, pick, runBench } from "./lib/run.js";
import { interleaved, percentile, sorted, spread, type BenchCase } from "./lib/stats.js";

const opt = benchArgs(
  {
    rounds: { type: "string", default: "7" },
    toggles: { type: "string", default: "20" },
    "daemon-toggles": { type: "string", default: "10" },
    "iperf-seconds": { type: "string", default: "3" },
    "iperf-runs": { type: "string", default: "5" },
  },
  { rounds: "1", toggles: "2", "daemon-toggles": "1", "iperf-seconds": "1", "iperf-runs": "1" },
);
const ROUNDS = intOpt("rounds", opt.rounds, 3, 30);
const TOGGLES = intOpt("toggles", opt.toggles, 4, 200);
const DAEMON_TOGGLES = intOpt("daemon-toggles", opt["daemon-toggles"], 2, 50);
const IPERF_S = intOpt("iperf-seconds", opt["iperf-seconds"], 1, 30);
const IPERF_RUNS = intOpt("iperf-runs", opt["iperf-runs"], 1, 10);
/** Warm-up rounds of the traffic cases (a smoke run has none: each costs a whole iperf3 run per case). */
const TRAFFIC_WARMUP = pick(1, 0);
/** Group sizes of parts 1 and 2 (a smoke run: a tenth of them; the top one still past diff()'s cut-off in the bulk change). */
const SIZES = pick([10, 1000, 10_000], [10, 100, 1000]);
const [LO, MID, TOP] = SIZES;
/** Rules of the receiver's group in part 3 with and without the extra rules. */
const BIG = pick(10_000, 1000);
/** Targets of issue 4. */
const APPLY_LIMIT_MS = 200;
const MEMBER_LIMIT_MS = 20;
const FLAT_MAX = 1.5;
const TPUT_MIN = 0.95;
/** Hard stop for the whole run: past it, cleanup runs and the process exits. */
const HARD_LIMIT_MS = 300_000;
/** Waiting for a daemon to apply one change. */
const APPLY_WAIT_MS = 15_000;

const P = RUN_PREFIX;
const { t0, progress } = benchClock(HARD_LIMIT_MS);

const msSince = (t: number) => performance.now() - t;
const fms = (x: number) => (Number.isFinite(x) ? `${num(x)} ms` : "–");
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Lat {
  p50: number;
  p99: number;
  n: number;
}
function lat(xs: number[]): Lat {
  const s = sorted(xs);
  return { p50: percentile(s, 50), p99: percentile(s, 99), n: xs.length };
}

function own(ns: string): string {
  if (!ownedNamespace(ns)) throw new Error(`refusing to touch namespace ${ns}: not of run ${P}`);
  return ns;
}

// ------------------------------------------------------------ rules

/**
 * The i-th non-matching rule: ingress from a /32 of 172.16.0.0/12 (never a
 * VPC address here), tcp or udp, one port or (every fifth) a range of 10.
 * Distinct peers, so no two set elements overlap.
 */
function extraRule(i: number): SgRule {
  const cidr = `172.${16 + Math.floor(i / 65536)}.${(i >> 8) & 255}.${i & 255}/32`;
  const port = 1024 + ((i * 7919) % 60000);
  const proto = i % 4 === 3 ? "udp" : "tcp";
  return { dir: "ingress", proto, portFrom: port, portTo: i % 5 === 0 ? port + 9 : port, cidr, description: "" };
}

const toApi = (r: SgRule): MessageInitShape<typeof SecurityGroupRuleSchema> => ({
  direction: r.dir === "ingress" ? Direction.INGRESS : Direction.EGRESS,
  protocol: r.proto === "tcp" ? Protocol.TCP : r.proto === "udp" ? Protocol.UDP : r.proto === "icmp" ? Protocol.ICMP : Protocol.ALL,
  portFrom: r.portFrom,
  portTo: r.portTo,
  peer: { case: "cidr", value: r.cidr! },
});

// ------------------------------------------------------------ scratch state (parts 1 and 2)

const VPC_ID = "vpc-00000000b0b0";
const SUBNET_ID = "subnet-00000000b001";
const GROUP = "sg-00000000a001";
const PEER_GROUP = "sg-00000000a002";
const RECV_NIC = "nic-00000000c001";
const SEND_NIC = "nic-00000000c002";
const EGRESS_ALL: SgRule = { dir: "egress", proto: "all", portFrom: 0, portTo: 0, cidr: "0.0.0.0/0", description: "" };
const PEER_RULE: SgRule = { dir: "ingress", proto: "tcp", portFrom: 5432, portTo: 5432, group: PEER_GROUP, description: "" };

function binding(nicId: string, address: string, groups: string[]): BindingRec {
  const last = address.split(".").map(Number)[3];
  return {
    nicId,
    vpcId: VPC_ID,
    subnetId: SUBNET_ID,
    address,
    mac: `02:00:0a:00:01:${last.toString(16).padStart(2, "0")}`,
    hostId: `${P}hv0`,
    hostIf: names.hostIf(nicId, "veth"),
    groupIds: groups,
    boundMs: 0,
    updatedMs: 0,
  };
}

function groupRec(id: string, rules: SgRule[]): SecurityGroupRec {
  return { id, vpcId: VPC_ID, name: id, description: "", labels: [], rules, generation: 1, createdMs: 0, updatedMs: 0 };
}

/**
 * One subnet, a receiving NIC bound to a group of `total` rules (the default
 * egress rule, optionally the peer-group rule, and non-matching ingress
 * rules up to the total), and an unbound sending NIC. With `members`, the
 * peer group's member addresses.
 */
function scratchState(total: number, members?: string[]): VpcFirewallState {
  const fixed = members ? [EGRESS_ALL, PEER_RULE] : [EGRESS_ALL];
  const rules = [...fixed, ...Array.from({ length: total - fixed.length }, (_, i) => extraRule(i))];
  return {
    vpcId: VPC_ID,
    subnets: [{ subnetId: SUBNET_ID, cidr: "10.0.1.0/24", bridge: names.bridge(SUBNET_ID) }],
    nics: [binding(RECV_NIC, "10.0.1.5", [GROUP]), binding(SEND_NIC, "10.0.1.6", [])],
    groups: new Map([[GROUP, groupRec(GROUP, rules)]]),
    members: members ? new Map([[PEER_GROUP, members]]) : new Map(),
    acls: new Map(),
  };
}

/** The same rules as one linear nft rule each (the baseline design), as a full-replace script. */
function linearScript(total: number): string {
  const rules = Array.from({ length: total - 1 }, (_, i) => extraRule(i)).map(
    (r) => `    ip saddr ${r.cidr} meta l4proto ${r.proto} th dport ${r.portFrom === r.portTo ? r.portFrom : `${r.portFrom}-${r.portTo}`} accept`,
  );
  return [
    "add table inet bench_linear",
    "delete table inet bench_linear",
    "table inet bench_linear {",
    "  chain nic_in {",
    ...rules,
    "    drop",
    "  }",
    "  chain forward {",
    "    type filter hook forward priority filter; policy accept;",
    "    ct state established,related accept",
    "    ip daddr 10.0.1.5 jump nic_in",
    "  }",
    "}",
    "",
  ].join("\n");
}

const nft = new LinuxNft({ timeoutMs: 60_000 });
/** An existence check that reads one small set of the table (the alternative measured beside LinuxNft.tableExists). */
const SMALL_CHECK = ["list", "set", "inet", "microvpc", "intra_subnet"];

/** Whether `nft list set` output lists this address as an element. */
function hasElement(listing: string, addr: string): boolean {
  return new RegExp(`[{,\\s]${addr.replace(/\./g, "\\.")}[,}\\s]`).test(listing);
}

async function setElementCount(ns: string, family: string, table: string, set: string): Promise<number> {
  const r = await nsExec(ns, "nft", ["-j", "list", "set", family, table, set], { timeoutMs: 30_000 });
  const j = JSON.parse(r.stdout) as { nftables: { set?: { elem?: unknown[] } }[] };
  return j.nftables.find((o) => o.set)?.set?.elem?.length ?? 0;
}

// ------------------------------------------------------------ part 1

interface ApplySample {
  compileMs: number;
  applyMs: number;
  totalMs: number;
}

interface Part1 {
  size: number;
  scriptBytes: number;
  /** First apply into the empty namespace. */
  create: ApplySample;
  /** Replaces of the same table (what start and drift repair do). */
  replace: ApplySample[];
  linearCreateMs: number;
  linearReplaceMs: number[];
  floorMs: number[];
  elementsInKernel: number;
  linearRulesInKernel: number;
}

/**
 * Part 1's bulk experiment: the 10 000-rule group shrunk to 10 rules and grown back, by element (elementDiff: what
 * diff() would apply without its cut-off) and by full replace; `chosen`: what diff() itself picks each way.
 */
const bulk = {
  elements: 0,
  shrinkElementsMs: [] as number[],
  growElementsMs: [] as number[],
  shrinkFullMs: [] as number[],
  growFullMs: [] as number[],
  chosen: { shrink: "", grow: "" },
};

async function part1(): Promise<Part1[]> {
  const out: Part1[] = [];
  const ns: Record<number, { mv: string; lin: string }> = {};
  const states = new Map<number, { script: string }>();
  for (const size of SIZES) {
    ns[size] = { mv: await createNetns(`${P}-a${size}`), lin: await createNetns(`${P}-l${size}`) };
  }
  const floorNs = await createNetns(`${P}-floor`);
  await nft.applyText(floorNs, "table inet bench_floor {\n  set s { type ipv4_addr; }\n}\n");
  // A script that changes nothing: one exec of ip netns exec + nft, one empty transaction.
  const floorScript = "add table inet bench_floor\n";
  for (const size of SIZES) {
    const st = scratchState(size);
    let s = performance.now();
    const { script } = compile(st);
    const compileMs = msSince(s);
    s = performance.now();
    await nft.applyText(ns[size].mv, script);
    const applyMs = msSince(s);
    s = performance.now();
    await nft.applyText(ns[size].lin, linearScript(size));
    const linearCreateMs = msSince(s);
    states.set(size, { script });
    out.push({
      size,
      scriptBytes: script.length,
      create: { compileMs, applyMs, totalMs: compileMs + applyMs },
      replace: [],
      linearCreateMs,
      linearReplaceMs: [],
      floorMs: [],
      elementsInKernel: await setElementCount(ns[size].mv, "inet", "microvpc", `sg_${GROUP.slice(-12)}_in_ports`),
      linearRulesInKernel: Number.NaN,
    });
    const lr = await nsExec(ns[size].lin, "nft", ["-a", "list", "chain", "inet", "bench_linear", "nic_in"], { timeoutMs: 30_000 });
    out[out.length - 1].linearRulesInKernel = lr.stdout.split("\n").filter((l) => /accept|drop/.test(l)).length;
    progress(
      `  ${size} rules: created in ${fms(compileMs + applyMs)} (script ${num(script.length / 1024)} KiB), ${out[out.length - 1].elementsInKernel} set elements in the kernel`,
    );
  }
  // Interleaved rounds: each round replaces every size once, the linear table once, and runs the floor.
  const cases: BenchCase<void>[] = [];
  for (const r of out) {
    cases.push({
      name: `mv${r.size}`,
      async run(_round, warm) {
        // compile() runs each time: it is part of what the daemon does on start and drift.
        const st = scratchState(r.size);
        let s = performance.now();
        const { script } = compile(st);
        const compileMs = msSince(s);
        s = performance.now();
        await nft.applyText(ns[r.size].mv, script);
        const applyMs = msSince(s);
        if (!warm) r.replace.push({ compileMs, applyMs, totalMs: compileMs + applyMs });
      },
    });
    cases.push({
      name: `lin${r.size}`,
      async run(_round, warm) {
        const script = linearScript(r.size);
        const s = performance.now();
        await nft.applyText(ns[r.size].lin, script);
        if (!warm) r.linearReplaceMs.push(msSince(s));
      },
    });
    cases.push({
      name: `floor${r.size}`,
      async run(_round, warm) {
        const s = performance.now();
        await nft.applyText(floorNs, floorScript);
        if (!warm) r.floorMs.push(msSince(s));
      },
    });
  }
  await interleaved(cases, { rounds: ROUNDS, warmupRounds: 1, minRounds: ROUNDS });
  // Removing (and adding back) all but 10 of the 10 000 rules: by element (the skeleton is unchanged, so the
  // element script exists; diff() itself replaces the table past MAX_ELEMENT_DELETIONS deletions, a cut-off
  // this experiment keeps honest) and by full replace, twice each, alternating.
  {
    const top = SIZES[SIZES.length - 1];
    const bottom = SIZES[0];
    const big = compile(scratchState(top));
    const little = compile(scratchState(bottom));
    const shrink = elementDiff(big.model, little.model);
    const grow = elementDiff(little.model, big.model);
    if (!shrink || !grow) throw new Error(`the ${top}- and the ${bottom}-rule group compile to different skeletons: no element script to time`);
    const shrinkEl = shrink.script;
    const growEl = grow.script;
    const choice = (d: string | null) => (d === null ? "full replace" : "by element");
    bulk.chosen = { shrink: choice(diff(big.model, little.model)), grow: choice(diff(little.model, big.model)) };
    const timed = async (script: string) => {
      const s = performance.now();
      await nft.applyText(ns[top].mv, script);
      return msSince(s);
    };
    for (let i = 0; i < 2; i++) {
      bulk.shrinkElementsMs.push(await timed(shrinkEl));
      bulk.growElementsMs.push(await timed(growEl));
      bulk.shrinkFullMs.push(await timed(little.script));
      bulk.growFullMs.push(await timed(big.script));
    }
    bulk.elements = top - bottom;
  }
  for (const size of SIZES) {
    await deleteNetns(own(ns[size].mv));
    await deleteNetns(own(ns[size].lin));
  }
  await deleteNetns(own(floorNs));
  return out;
}

// ------------------------------------------------------------ part 2

interface ToggleSample {
  kind: "join" | "leave";
  compileMs: number;
  diffMs: number;
  applyMs: number;
  totalMs: number;
  lines: number;
  /** LinuxNft.tableExists (`nft list chain inet microvpc forward`), the daemon's kernel table check. */
  checkMs: number;
  /** \`nft list set inet microvpc intra_subnet\` (one small set of the same table), for comparison. */
  smallCheckMs: number;
}

interface Part2 {
  size: number;
  samples: ToggleSample[];
  memberSeen: boolean;
}

async function part2(): Promise<Part2[]> {
  const base = Array.from({ length: 8 }, (_, i) => `10.0.2.${10 + i}`);
  const out: Part2[] = [];
  const ctx = new Map<number, { ns: string; model: FwModel; inSet: boolean; k: number }>();
  for (const size of SIZES) {
    const ns = await createNetns(`${P}-m${size}`);
    const { model, script } = compile(scratchState(size, base));
    await nft.applyText(ns, script);
    ctx.set(size, { ns, model, inSet: false, k: 0 });
    out.push({ size, samples: [], memberSeen: false });
  }
  const cases: BenchCase<void>[] = out.map((r) => ({
    name: `m${r.size}`,
    async run(_round, warm) {
      const c = ctx.get(r.size)!;
      // Join: a new address in the peer group; leave: it goes again.
      const joining = !c.inSet;
      const addr = `10.0.2.${100 + (c.k % 100)}`;
      const members = joining ? [...base, addr] : base;
      let s = performance.now();
      const { model } = compile(scratchState(r.size, members));
      const compileMs = msSince(s);
      s = performance.now();
      const d = diff(c.model, model);
      const diffMs = msSince(s);
      if (d === null || d === "") throw new Error(`membership change at ${r.size} rules: diff gave ${d === null ? "a full replace" : "nothing"}`);
      s = performance.now();
      await nft.applyText(c.ns, d);
      const applyMs = msSince(s);
      s = performance.now();
      const exists = await nft.tableExists(c.ns);
      const checkMs = msSince(s);
      if (!exists) throw new Error(`table check at ${r.size} rules: no table`);
      // A check that reads one small set of the table instead: what it would cost if the daemon asked that way.
      s = performance.now();
      const small = await nsExec(c.ns, "nft", SMALL_CHECK, { check: false });
      const smallCheckMs = msSince(s);
      if (small.code !== 0) throw new Error(`nft ${SMALL_CHECK.join(" ")} at ${r.size} rules: ${small.stderr.trim()}`);
      c.model = model;
      c.inSet = joining;
      if (!joining) c.k++;
      if (joining && !r.memberSeen) {
        const set = await nsExec(c.ns, "nft", ["list", "set", "inet", "microvpc", `members_${PEER_GROUP.slice(-12)}`]);
        r.memberSeen = hasElement(set.stdout, addr);
      }
      if (!warm)
        r.samples.push({
          kind: joining ? "join" : "leave",
          compileMs,
          diffMs,
          applyMs,
          totalMs: compileMs + diffMs + applyMs,
          lines: d.trim().split("\n").length,
          checkMs,
          smallCheckMs,
        });
    },
  }));
  // Each round toggles every size once; an even number of rounds leaves every set as it started.
  await interleaved(cases, { rounds: TOGGLES + (TOGGLES % 2), warmupRounds: 2, minRounds: TOGGLES });
  for (const size of SIZES) await deleteNetns(own(ctx.get(size)!.ns));
  return out;
}

// ------------------------------------------------------------ part 3 (daemons)

type FwClient = ReturnType<typeof grpcClient<typeof FirewallService>>;

interface DaemonApply {
  /** From the start of the API call to the applies counter moving. */
  e2eMs: number;
  apiMs: number;
  /** The daemon's own timer (microvpc_firewall_apply_seconds) for the pass: compile, diff, nft (and a table check if it makes one). */
  daemonMs: number;
  kind: string;
  /** GetFirewallStatus last_apply_duration_ms: the whole pass (Redis reads, conntrack clean-up included). */
  passMs: number;
}

/** Counts of the host-0 daemon's successful applies and its apply timer, by kind. */
/** The daemon's applies: whole (full) and partial — an element diff of a pass, or a NIC's delta (kind "delta", sync.ts). */
async function fwCounters(port: number): Promise<{ full: number; elements: number; delta: number; sumFull: number; sumEl: number }> {
  const s = await scrape(port);
  const delta = sum(s, "microvpc_firewall_nft_applies_total", { kind: "delta", result: "ok" });
  return {
    full: sum(s, "microvpc_firewall_nft_applies_total", { kind: "full", result: "ok" }),
    elements: sum(s, "microvpc_firewall_nft_applies_total", { kind: "elements", result: "ok" }) + delta,
    delta,
    sumFull: sum(s, "microvpc_firewall_apply_seconds_sum", { kind: "full" }),
    sumEl: sum(s, "microvpc_firewall_apply_seconds_sum", { kind: "elements" }) + sum(s, "microvpc_firewall_apply_seconds_sum", { kind: "delta" }),
  };
}

/** Polling the daemon's /metrics costs it ~1.5 ms of CPU per scrape (measured): poll no faster than this. */
const METRICS_POLL_MS = 10;

/**
 * Runs `change` and waits (bounded) until it is applied: until `inKernel()` is true when given (an exec the bench
 * runs, which costs the daemon nothing), else until the daemon's applies counter moves (its /metrics, every
 * METRICS_POLL_MS). Then reads the daemon's own timer for the pass, and its whole-pass duration.
 */
async function timedApply(fw0: FwClient, metricsPort: number, change: () => Promise<unknown>, inKernel?: () => Promise<boolean>): Promise<DaemonApply> {
  const before = await fwCounters(metricsPort);
  const gen0 = (await fw0.getFirewallStatus({ nicIds: ["-"] }).catch(() => ({ appliedGeneration: 0n }))).appliedGeneration;
  const s = performance.now();
  await change();
  const apiMs = msSince(s);
  const deadline = performance.now() + APPLY_WAIT_MS;
  let seen = false;
  if (inKernel) {
    for (let i = 0; i < 5000 && performance.now() < deadline; i++) if ((seen = await inKernel())) break;
  }
  let after = before;
  let e2eMs = msSince(s);
  for (let i = 0; i < 5000 && performance.now() < deadline; i++) {
    after = await fwCounters(metricsPort);
    if (after.full + after.elements > before.full + before.elements) break;
    await sleep(METRICS_POLL_MS);
  }
  if (!inKernel) e2eMs = msSince(s);
  if (after.full + after.elements <= before.full + before.elements || (inKernel && !seen))
    throw new Error(`the firewall daemon applied nothing within ${APPLY_WAIT_MS / 1000} s`);
  const kind = after.full > before.full ? "full" : after.delta > before.delta ? "delta" : "elements";
  const daemonMs = (after.sumFull - before.sumFull + (after.sumEl - before.sumEl)) * 1000;
  // The whole pass: wait for the status's applied generation to move past the change's (bounded; each call runs an nft exec in the daemon).
  let passMs = Number.NaN;
  for (let i = 0; i < 100; i++) {
    const st = await fw0.getFirewallStatus({ nicIds: ["-"] });
    if (st.appliedGeneration > gen0) {
      passMs = st.lastApplyDurationMs;
      break;
    }
    await sleep(50);
  }
  return { e2eMs, apiMs, daemonMs, kind, passMs };
}

const PING_COUNT = pick(200, 20);
/** ms of new TCP connections per traffic run (the warm-up round: CONNECT_WARM_MS). */
const CONNECT_MS = pick(1500, 300);
const CONNECT_WARM_MS = pick(500, 200);

async function pingRtt(ns: string, addr: string): Promise<{ p50: number; p99: number; mean: number; lost: number }> {
  const r = await nsExec(ns, "ping", ["-n", "-c", String(PING_COUNT), "-i", "0.005", "-W", "1", "-w", "10", addr], { check: false, timeoutMs: 20_000 });
  const t = [...r.stdout.matchAll(/time=([0-9.]+) ms/g)].map((m) => Number(m[1]));
  const s = sorted(t);
  return { p50: percentile(s, 50), p99: percentile(s, 99), mean: t.reduce((a, b) => a + b, 0) / (t.length || 1), lost: PING_COUNT - t.length };
}

const CONNECT_SCRIPT = `
const [host, port, ms, max] = process.argv.slice(1);
const net = require("node:net");
const lat = [];
let fail = 0;
const end = performance.now() + Number(ms);
function one() {
  if (performance.now() >= end || lat.length + fail >= Number(max)) return done();
  const s = performance.now();
  let fin = false;
  const c = net.connect({ host, port: Number(port) });
  const to = setTimeout(() => { if (!fin) { fin = true; fail++; c.destroy(); one(); } }, 1000);
  c.on("connect", () => { if (fin) return; fin = true; clearTimeout(to); lat.push(performance.now() - s); c.destroy(); setImmediate(one); });
  c.on("error", () => { if (fin) return; fin = true; clearTimeout(to); fail++; setImmediate(one); });
}
function done() {
  lat.sort((a, b) => a - b);
  const q = (p) => lat.length ? lat[Math.min(lat.length - 1, Math.max(0, Math.ceil(p / 100 * lat.length) - 1))] : null;
  process.stdout.write(JSON.stringify({ n: lat.length, fail, ms: Number(ms), p50: q(50), p99: q(99) }));
  process.exit(0);
}
one();
`;

async function connectRate(ns: string, addr: string, port: number, ms: number): Promise<{ perSec: number; p50: number; p99: number; fail: number }> {
  const r = await nsExec(ns, process.execPath, ["-e", CONNECT_SCRIPT, addr, String(port), String(ms), "100000"], { timeoutMs: ms + 15_000 });
  const j = JSON.parse(r.stdout) as { n: number; fail: number; ms: number; p50: number; p99: number };
  return { perSec: (j.n / j.ms) * 1000, p50: j.p50, p99: j.p99, fail: j.fail };
}

interface TrafficRun {
  tput: IperfCpuResult;
  pressure: number;
  ping: { p50: number; p99: number; mean: number; lost: number };
  connects: { perSec: number; p50: number; p99: number; fail: number };
}

// ------------------------------------------------------------ main

let h: Harness | undefined;
const daemons: Daemon[] = [];

async function main(): Promise<number> {
  const env = {
    ...machineEnv(),
    nft: execFileSync("nft", ["--version"], { encoding: "utf8" }).trim(),
    iperf3: execFileSync("iperf3", ["--version"], { encoding: "utf8" }).split("\n")[0].trim(),
    prefix: P,
    rounds: ROUNDS,
    toggles: TOGGLES,
    daemonToggles: DAEMON_TOGGLES,
    iperfSeconds: IPERF_S,
    iperfRuns: IPERF_RUNS,
  };
  progress(`run prefix ${P}; starting the harness (redis, ipam, two netagents)`);
  // The harness installs the cleanup handlers and snapshots the root namespace first.
  h = await Harness.start({ hosts: 2, underlay: false });

  // ---- 1. compile + apply, direct
  progress(`part 1: compile + apply of one group of ${SIZES.join(" / ")} rules into scratch namespaces (${ROUNDS} interleaved rounds)`);
  const p1 = await part1();

  // ---- 2. membership change, direct
  progress(`part 2: membership change (compile + diff + nft) at ${SIZES.join(" / ")} rules, ${TOGGLES} changes each`);
  const p2 = await part2();

  // ---- 3. the daemons
  progress("part 3: VMs, firewall daemons, groups");
  const vpc = await h.vpc(`fw-${P}`, "10.0.0.0/16");
  const web = await h.subnet(vpc, "web", "10.0.1.0/24", SubnetType.PUBLIC);
  const a = await h.vm(0, vpc, web, "snd");
  const b = await h.vm(0, vpc, web, "rcv");
  const c = await h.vm(1, vpc, web, "peer");
  const startFw = async (i: number) => {
    const d = await startDaemon("firewall", ["--redis", h!.redis.url, "--host-id", h!.hosts[i].id, "--drift-interval-ms", "600000"]);
    trackChild(d.proc);
    daemons.push(d);
    return d;
  };
  const fwd0 = await startFw(0);
  const fwd1 = await startFw(1);
  const fw0: FwClient = grpcClient(FirewallService, { address: fwd0.address, timeoutMs: 60_000 });
  const fw1: FwClient = grpcClient(FirewallService, { address: fwd1.address, timeoutMs: 60_000 });
  const vpcCidr = "10.0.0.0/16";
  const peers = (await fw0.createSecurityGroup({ vpc: vpc.id, name: "peers", rules: [] })).securityGroup!.id;
  const small: MessageInitShape<typeof SecurityGroupRuleSchema>[] = [
    { direction: Direction.INGRESS, protocol: Protocol.TCP, portFrom: 5201, portTo: 5201, peer: { case: "cidr", value: vpcCidr } },
    { direction: Direction.INGRESS, protocol: Protocol.TCP, portFrom: 5301, portTo: 5301, peer: { case: "cidr", value: vpcCidr } },
    { direction: Direction.INGRESS, protocol: Protocol.ICMP, peer: { case: "cidr", value: vpcCidr } },
    { direction: Direction.INGRESS, protocol: Protocol.TCP, portFrom: 5432, portTo: 5432, peer: { case: "securityGroupId", value: peers } },
  ];
  const recvGroup = (await fw0.createSecurityGroup({ vpc: vpc.id, name: "recv", rules: small })).securityGroup!;
  const recv = recvGroup.id;
  const smallCount = recvGroup.rules.length;
  const extraCount = BIG - smallCount;
  const extras = Array.from({ length: extraCount }, (_, i) => toApi(extraRule(i)));
  const bindArgs = (vm: Vm, groups: string[]) => ({
    nicId: vm.nicId,
    vpc: vm.vpc.id,
    subnet: vm.subnet.id,
    address: vm.address,
    mac: vm.mac,
    hostInterface: vm.hostInterface,
    securityGroups: groups,
  });
  await fw0.bindNic(bindArgs(a, []));
  await fw0.bindNic(bindArgs(b, [recv]));
  await fw1.bindNic(bindArgs(c, []));
  await startTcpServer(b.ns, 5301, "rcv");
  const up = await waitFor(() => tcpProbe(a.ns, b.address, 5301, 800), { timeoutMs: 15_000, intervalMs: 200 });
  if (!up) throw new Error("snd cannot reach rcv:5301 through the firewall");
  const blocked = !(await tcpProbe(a.ns, b.address, 5302, 500));
  progress(
    `  group recv has ${smallCount} rules (${small.length} + the default egress); +${extraCount} makes ${BIG}; snd → rcv:5301 open, :5302 ${blocked ? "closed" : "OPEN (unexpected)"}`,
  );

  // Membership through the daemons: peer (on host 1) joins / leaves "peers".
  const member = { small: [] as DaemonApply[], big: [] as DaemonApply[] };
  const switches: { to: "big" | "small"; r: DaemonApply }[] = [];
  let bigNow = false;
  // What a rule costs in Redis: the group's keys (MEMORY USAGE) before and after the first growth by extraCount rules.
  const ruleMemory = { rules: extraCount, bytesPerRule: NaN, groupBytesSmall: NaN, groupBytesBig: NaN };
  const groupBytes = async () => {
    const rm = new Redis(h!.redis.url);
    try {
      return (await memoryByFamily(rm, [{ name: "group", match: new RegExp(`^mvpc:fw:sg:${recv}(:|$)`) }])).get("group")!.bytes;
    } finally {
      rm.disconnect();
    }
  };
  const setBig = async (on: boolean) => {
    if (on === bigNow) return;
    if (on && Number.isNaN(ruleMemory.groupBytesSmall)) ruleMemory.groupBytesSmall = await groupBytes();
    const r = await timedApply(fw0, fwd0.metricsPort, () => fw0.updateSecurityGroup(on ? { ref: recv, addRules: extras } : { ref: recv, removeRules: extras }));
    switches.push({ to: on ? "big" : "small", r });
    bigNow = on;
    if (on && Number.isNaN(ruleMemory.groupBytesBig)) {
      ruleMemory.groupBytesBig = await groupBytes();
      ruleMemory.bytesPerRule = (ruleMemory.groupBytesBig - ruleMemory.groupBytesSmall) / extraCount;
    }
    progress(
      `  recv → ${on ? BIG : smallCount} rules: API ${fms(r.apiMs)}, applied (${r.kind}) after ${fms(r.e2eMs)}, daemon timer ${fms(r.daemonMs)}, whole pass ${fms(r.passMs)}`,
    );
  };
  const inSitu = { check: [] as number[], small: [] as number[] };
  let cMember = false;
  const membersSet = `members_${peers.slice(-12)}`;
  const toggle = async (into: DaemonApply[]) => {
    cMember = !cMember;
    const want = cMember;
    // Applied when host 0's kernel set has (or no longer has) the address: polled with nft, ~10 ms a look.
    const inKernel = async () =>
      hasElement((await nsExec(b.vpcNs, "nft", ["list", "set", "inet", "microvpc", membersSet], { check: false })).stdout, c.address) === want;
    into.push(await timedApply(fw0, fwd0.metricsPort, () => fw1.bindNic(bindArgs(c, want ? [peers] : [])), inKernel));
  };
  progress(`part 3a: membership changes through the daemons, ${DAEMON_TOGGLES} at ${smallCount} rules, then ${DAEMON_TOGGLES} at ${BIG}`);
  for (let i = 0; i < 2; i++) await toggle([]); // warm-up
  for (let i = 0; i < DAEMON_TOGGLES; i++) await toggle(member.small);
  await setBig(true);
  {
    const n = await setElementCount(b.vpcNs, "inet", "microvpc", `sg_${recv.slice(-12)}_in_ports`);
    progress(`  kernel: ${n} elements in recv's port set`);
    // The daemon's table check, timed in its own namespace now that it holds the 10 000 rules.
    for (let i = 0; i < 7; i++) {
      let s = performance.now();
      await nft.tableExists(b.vpcNs);
      inSitu.check.push(msSince(s));
      s = performance.now();
      await nsExec(b.vpcNs, "nft", SMALL_CHECK);
      inSitu.small.push(msSince(s));
    }
  }
  for (let i = 0; i < 2; i++) await toggle([]);
  for (let i = 0; i < DAEMON_TOGGLES; i++) await toggle(member.big);
  if (cMember) await toggle([]);
  let memberSetOk;
  {
    await toggle([]);
    const set = await nsExec(b.vpcNs, "nft", ["list", "set", "inet", "microvpc", membersSet]);
    memberSetOk = hasElement(set.stdout, c.address);
    await toggle([]);
  }

  // ---- 3b. traffic with and without the extra rules
  progress(
    `part 3b: traffic snd → rcv, ${IPERF_RUNS} rounds (iperf3 ${IPERF_S} s, ${PING_COUNT} pings, ${CONNECT_MS / 1000} s of connects), ${smallCount} vs ${BIG} rules`,
  );
  const cases: BenchCase<TrafficRun>[] = (["small", "big"] as const).map((name) => ({
    name,
    async run(round, warm) {
      await setBig(name === "big");
      const pw = pressureWindow();
      const tput = await iperf3WithCpu(a.ns, b.ns, b.address, { seconds: warm ? 1 : IPERF_S });
      const pressure = pw();
      const ping = await pingRtt(a.ns, b.address);
      const connects = await connectRate(a.ns, b.address, 5301, warm ? CONNECT_WARM_MS : CONNECT_MS);
      if (!warm)
        progress(
          `  round ${round + 1}: ${name === "big" ? BIG : smallCount} rules: ${num(tput.gbps)} Gbit/s (pressure ${pct(pressure)}), ping p50 ${num(ping.p50, 3)} ms, ${num(connects.perSec, 0)} connects/s`,
        );
      return { tput, pressure, ping, connects };
    },
  }));
  const runs = await interleaved(cases, { rounds: IPERF_RUNS, warmupRounds: TRAFFIC_WARMUP, minRounds: IPERF_RUNS });
  // rcv's counters before the switch back: that one replaces the table, and the counters with it.
  const status = await fw0.getFirewallStatus({ nicIds: [b.nicId] });
  await setBig(false);
  const recvCounters = status.nics.find((n) => n.nicId === b.nicId);

  const elapsedMeasureS = (Date.now() - t0) / 1000;
  const loadAtEnd = loadavg().map((x) => Number(x.toFixed(2)));

  // ---- teardown (also done by the exit handlers if anything above threw)
  progress("done measuring; stopping the daemons and removing every namespace of the run");
  const tc0 = performance.now();
  for (const d of daemons) await d.stop();
  const leftovers = await h.close();
  const teardownMs = msSince(tc0);
  const rootDiff = await h.rootChanges();

  // ================================================================ report
  const out: string[] = [];
  const p = (s = "") => out.push(s);
  p(heading("microvpc firewall benchmark"));
  p(
    `${env.date} · node ${env.node} · kernel ${env.kernel} · ${env.cores} × ${env.cpu} · load avg ${env.loadavgAtStart.join(" ")} at start, ${loadAtEnd.join(" ")} at end`,
  );
  p(`${env.nft} · ${env.iperf3} · run prefix ${P}`);

  p(heading(`1. Compile + apply of one group bound to a NIC (direct: compile() here, then LinuxNft.apply = ip netns exec NS nft -f -)`));
  p(`Full-replace script (delete + recreate both tables in one transaction), into a scratch namespace holding the same table;`);
  p(`median (min–max) of ${ROUNDS} rounds, interleaved with the linear-rule baseline and the floor. "create": the first apply, into an`);
  p(`empty namespace. The group's rules are the default egress rule + non-matching ingress /32 CIDR rules (tcp/udp, every fifth a`);
  p(`10-port range), all in one concatenated interval set (peer . proto . port).`);
  const sp = (xs: number[]) => spread(xs);
  p(
    table(
      [
        "rules",
        "compile",
        "nft -f",
        "compile + apply",
        "create (1st)",
        "script",
        "set elements in kernel",
        "linear rules: nft -f",
        "linear create",
        "floor: nft -f no-op",
      ],
      p1.map((r) => [
        num(r.size, 0),
        spr(sp(r.replace.map((x) => x.compileMs))),
        spr(sp(r.replace.map((x) => x.applyMs))),
        spr(sp(r.replace.map((x) => x.totalMs))),
        fms(r.create.totalMs),
        `${num(r.scriptBytes / 1024)} KiB`,
        num(r.elementsInKernel, 0),
        spr(sp(r.linearReplaceMs)),
        fms(r.linearCreateMs),
        spr(sp(r.floorMs)),
      ]),
    ),
  );
  p(`Issue 4's measurements on these machines (context, not re-measured): replacing a table of 10 / 1k / 10k set elements 19 / 24 / 68 ms,`);
  p(`of 10 / 1k / 10k linear rules 19 / 50 / 394 ms.`);
  p(`Removing ${num(bulk.elements, 0)} of the ${num(SIZES[SIZES.length - 1], 0)} rules at once and adding them back (nft -f only, 2 times each, every time):`);
  p(`  by element (the skeleton is unchanged): delete ${bulk.shrinkElementsMs.map(fms).join(", ")}; add ${bulk.growElementsMs.map(fms).join(", ")}`);
  p(
    `  by full replace of the table: to ${SIZES[0]} rules ${bulk.shrinkFullMs.map(fms).join(", ")}; to ${num(SIZES[SIZES.length - 1], 0)} rules ${bulk.growFullMs.map(fms).join(", ")}`,
  );
  p(
    `  diff() picks: removing them ${bulk.chosen.shrink}, adding them ${bulk.chosen.grow} (it replaces the table past ${MAX_ELEMENT_DELETIONS} element deletions).`,
  );

  p(heading(`2. One membership change with the rules loaded (direct: compile(next) + diff(prev, next) + LinuxNft.applyText of the diff)`));
  p(`The bound group also has a rule "tcp 5432 from members of group P"; an address joins P (one \`add element\` line into P's`);
  p(`members set), then leaves it (one \`delete element\`). ${TOGGLES} changes per size (half each way), interleaved across sizes, p50 (p99).`);
  const tg = (r: Part2, kind: "join" | "leave", f: (x: ToggleSample) => number) => lat(r.samples.filter((x) => x.kind === kind).map(f));
  const lp = (l: Lat) => `${fms(l.p50)} (${num(l.p99)})`;
  p(
    table(
      [
        "rules",
        "join: compile",
        "diff",
        "nft -f",
        "total",
        "leave: compile",
        "diff",
        "nft -f",
        "total",
        "lines",
        "in kernel",
        "table check*",
        "small-set check",
      ],
      p2.map((r) => [
        num(r.size, 0),
        lp(tg(r, "join", (x) => x.compileMs)),
        lp(tg(r, "join", (x) => x.diffMs)),
        lp(tg(r, "join", (x) => x.applyMs)),
        lp(tg(r, "join", (x) => x.totalMs)),
        lp(tg(r, "leave", (x) => x.compileMs)),
        lp(tg(r, "leave", (x) => x.diffMs)),
        lp(tg(r, "leave", (x) => x.applyMs)),
        lp(tg(r, "leave", (x) => x.totalMs)),
        String(Math.max(...r.samples.map((x) => x.lines))),
        r.memberSeen ? "yes" : "NO",
        lp(lat(r.samples.map((x) => x.checkMs))),
        lp(lat(r.samples.map((x) => x.smallCheckMs))),
      ]),
    ),
  );
  p(`* LinuxNft.tableExists (\`nft list chain inet microvpc forward\`), the daemon's kernel table check; not in "total".`);
  p(`  "small-set check": \`nft ${SMALL_CHECK.join(" ")}\` (a set of the same table with one element per subnet), for comparison.`);

  p(heading(`3. Through the daemons (two simulated hypervisors; microvpcd firewall on each, drift pass every 600 s)`));
  p(`Membership: VM "peer" on host 1 joins / leaves group "peers" (BindNic on host 1's daemon); host 0's daemon, which holds "rcv"`);
  p(`(bound to "recv", whose rule names "peers"), updates one element. e2e: from the BindNic call to the address being in (or gone`);
  p(`from) host 0's kernel set (\`nft list set\` by the bench, ~10 ms a look, so the daemon is not disturbed by the polling);`);
  p(`daemon timer: its microvpc_firewall_apply_seconds for that pass (compile, diff, nft -f, and`);
  p(`the kernel table check where the daemon makes one); whole pass: GetFirewallStatus last_apply_duration_ms (Redis reads and the`);
  p(`conntrack clean-up too).`);
  const dl = (xs: DaemonApply[], f: (x: DaemonApply) => number) => lat(xs.map(f));
  p(
    table(
      ["recv's rules", "changes", "BindNic API", "e2e to applied", "daemon timer", "whole pass", "kinds"],
      (
        [
          ["small", smallCount],
          ["big", BIG],
        ] as const
      ).map(([k, n]) => [
        num(n, 0),
        String(member[k].length),
        lp(dl(member[k], (x) => x.apiMs)),
        lp(dl(member[k], (x) => x.e2eMs)),
        lp(dl(member[k], (x) => x.daemonMs)),
        lp(dl(member[k], (x) => x.passMs)),
        [...new Set(member[k].map((x) => x.kind))].join(","),
      ]),
    ),
  );
  p(`The member's address in host 0's kernel set while it is a member: ${memberSetOk ? "yes" : "NO"}. In rcv's VPC namespace with the ${BIG} rules,`);
  p(`LinuxNft.tableExists takes ${lp(lat(inSitu.check))}, \`nft ${SMALL_CHECK.join(" ")}\` ${lp(lat(inSitu.small))} (p50 (p99) of ${inSitu.check.length}).`);
  p(`Adding / removing the ${extraCount} extra rules (UpdateSecurityGroup add_rules / remove_rules), each time (e2e: to the daemon's`);
  p(`applies counter moving, its /metrics polled every ${METRICS_POLL_MS} ms):`);
  p(
    table(
      ["to", "UpdateSecurityGroup API", "e2e to applied", "daemon timer", "whole pass", "kind"],
      switches.map((s) => [
        s.to === "big" ? `${BIG} rules` : `${smallCount} rules`,
        fms(s.r.apiMs),
        fms(s.r.e2eMs),
        fms(s.r.daemonMs),
        fms(s.r.passMs),
        s.r.kind,
      ]),
    ),
  );

  p(
    `Redis: the group's keys take ${num(ruleMemory.groupBytesSmall, 0)} bytes with ${smallCount} rules and ${num(ruleMemory.groupBytesBig, 0)} with ${BIG}: ${num(ruleMemory.bytesPerRule, 0)} bytes per rule (MEMORY USAGE).`,
  );

  const rs = runs.get("small")!;
  const rb = runs.get("big")!;
  const tS = spread(rs.map((x) => x.tput.gbps));
  const tB = spread(rb.map((x) => x.tput.gbps));
  const paired = spread(rb.map((x, i) => x.tput.gbps / rs[i].tput.gbps));
  p(heading(`4. VM↔VM traffic, snd → rcv (one subnet, one bridge), receiver's group ${smallCount} vs ${BIG} rules; ${IPERF_RUNS} rounds, median (min–max)`));
  p(
    table(
      [
        "recv's rules",
        "iperf3 Gbit/s",
        "paired ÷ small",
        "CPU ms/GB",
        "pressure",
        "retr.",
        "ping p50 ms",
        "ping p99 ms",
        "lost",
        "connects/s",
        "connect p50 ms",
        "p99 ms",
      ],
      (
        [
          ["small", smallCount, rs],
          ["big", BIG, rb],
        ] as const
      ).map(([k, n, r]) => [
        num(n, 0),
        spr(k === "small" ? tS : tB),
        k === "small" ? "–" : `${pct(paired.median)} (${pct(paired.min)}–${pct(paired.max)})`,
        spr(spread(r.map((x) => x.tput.cpuMsPerGB)), (x) => num(x, 0)),
        spr(spread(r.map((x) => x.pressure)), pct),
        num(spread(r.map((x) => x.tput.retransmits)).median, 0),
        spr(spread(r.map((x) => x.ping.p50)), (x) => num(x, 3)),
        spr(spread(r.map((x) => x.ping.p99)), (x) => num(x, 3)),
        String(r.reduce((s, x) => s + x.ping.lost, 0)),
        spr(spread(r.map((x) => x.connects.perSec)), (x) => num(x, 0)),
        spr(spread(r.map((x) => x.connects.p50)), (x) => num(x, 3)),
        spr(spread(r.map((x) => x.connects.p99)), (x) => num(x, 3)),
      ]),
    ),
  );
  p(
    `Per round (Gbit/s, CPU pressure): ${rs.map((x, i) => `${i + 1}: ${num(x.tput.gbps)} (${pct(x.pressure)}) vs ${num(rb[i].tput.gbps)} (${pct(rb[i].pressure)})`).join(" · ")}`,
  );
  p(`Established packets are accepted before the per-NIC chains, so iperf3's stream and ping's echo flow meet the group's sets once`);
  p(
    `(their first packet); each new TCP connection meets them on its SYN. rcv's counters since the table was last replaced (every switch to ${smallCount} rules replaces it): ${recvCounters ? `${recvCounters.ingress!.acceptedPackets} new flows accepted, ${recvCounters.ingress!.droppedPackets} dropped` : "–"}.`,
  );
  p(`Issue 4's measurements (context): 1000 linear rules cost 40% of forwarding throughput; 1000 entries in one set cost nothing.`);

  // ---- verdicts
  const v: Verdict[] = [];
  const rTop = p1.find((r) => r.size === TOP)!;
  for (const r of p1) {
    const m = spread(r.replace.map((x) => x.totalMs)).median;
    const lin = spread(r.linearReplaceMs).median;
    if (r.size === TOP)
      v.push({
        measure: `compile + apply, ${num(r.size, 0)} rules`,
        value: fms(m),
        baseline: `${APPLY_LIMIT_MS} ms limit`,
        ratio: m / APPLY_LIMIT_MS,
        ...check(m / APPLY_LIMIT_MS, { max: 1 }),
      });
    v.push({
      measure: `${r.size === TOP ? "  " : ""}compile + apply, ${num(r.size, 0)} rules vs linear`,
      value: fms(m),
      baseline: `${fms(lin)} linear`,
      ratio: m / lin,
      target: "",
    });
  }
  {
    const c = spread(rTop.replace.map((x) => x.compileMs)).median;
    const a10 = spread(rTop.replace.map((x) => x.applyMs)).median;
    v.push({
      measure: `  of which nft -f, ${num(TOP, 0)} rules`,
      value: fms(a10),
      baseline: `${fms(spread(rTop.floorMs).median)} no-op`,
      ratio: a10 / spread(rTop.floorMs).median,
      target: "",
    });
    v.push({
      measure: `  of which compile(), ${num(TOP, 0)} rules`,
      value: fms(c),
      baseline: fms(spread(rTop.replace.map((x) => x.totalMs)).median),
      ratio: c / spread(rTop.replace.map((x) => x.totalMs)).median,
      target: "",
    });
  }
  {
    // Whether diff()'s cut-off still picks the faster way for a bulk removal (and what adding them back by element costs).
    const sEl = spread(bulk.shrinkElementsMs).median;
    const sFull = spread(bulk.shrinkFullMs).median;
    v.push({
      measure: `remove ${num(bulk.elements, 0)} rules: full replace vs by element`,
      value: `${fms(sFull)} (${bulk.chosen.shrink === "full replace" ? "diff() picks it" : "diff() picks elements"})`,
      baseline: `${fms(sEl)} by element`,
      ratio: sFull / sEl,
      target: "",
    });
    const gEl = spread(bulk.growElementsMs).median;
    const gFull = spread(bulk.growFullMs).median;
    v.push({
      measure: `add ${num(bulk.elements, 0)} rules: by element vs full replace`,
      value: `${fms(gEl)} (${bulk.chosen.grow === "by element" ? "diff() picks it" : "diff() picks full"})`,
      baseline: `${fms(gFull)} full`,
      ratio: gEl / gFull,
      target: "",
    });
  }
  const j = (size: number, f: (x: ToggleSample) => number = (x) => x.totalMs) =>
    tg(
      p2.find((r) => r.size === size)!,
      "join",
      f,
    ).p50;
  v.push({
    measure: `membership join, ${num(TOP, 0)} rules (compile+diff+nft)`,
    value: fms(j(TOP)),
    baseline: `${MEMBER_LIMIT_MS} ms limit`,
    ratio: j(TOP) / MEMBER_LIMIT_MS,
    ...check(j(TOP) / MEMBER_LIMIT_MS, { max: 1 }),
  });
  v.push({
    measure: `  flat: at ${num(TOP, 0)} vs at ${LO} rules`,
    value: fms(j(TOP)),
    baseline: fms(j(LO)),
    ratio: j(TOP) / j(LO),
    ...check(j(TOP) / j(LO), { max: FLAT_MAX }),
  });
  v.push({ measure: `  same, at ${num(MID, 0)} vs at ${LO} rules`, value: fms(j(MID)), baseline: fms(j(LO)), ratio: j(MID) / j(LO), target: "" });
  v.push({
    measure: `  nft -f of the element add alone, ${num(TOP, 0)} vs ${LO}`,
    value: fms(j(TOP, (x) => x.applyMs)),
    baseline: fms(j(LO, (x) => x.applyMs)),
    ratio: j(TOP, (x) => x.applyMs) / j(LO, (x) => x.applyMs),
    target: "",
  });
  {
    const ck = (size: number) => lat(p2.find((r) => r.size === size)!.samples.map((x) => x.checkMs)).p50;
    v.push({
      measure: `  table check (nft list chain), ${num(TOP, 0)} vs ${LO}`,
      value: fms(ck(TOP)),
      baseline: fms(ck(LO)),
      ratio: ck(TOP) / ck(LO),
      target: "",
    });
    const tk = (size: number) => lat(p2.find((r) => r.size === size)!.samples.map((x) => x.smallCheckMs)).p50;
    v.push({ measure: `  small-set check instead, ${num(TOP, 0)} vs ${LO}`, value: fms(tk(TOP)), baseline: fms(tk(LO)), ratio: tk(TOP) / tk(LO), target: "" });
  }
  {
    const lv = (size: number) =>
      tg(
        p2.find((r) => r.size === size)!,
        "leave",
        (x) => x.totalMs,
      ).p50;
    v.push({
      measure: `membership leave, ${num(TOP, 0)} rules`,
      value: fms(lv(TOP)),
      baseline: `${MEMBER_LIMIT_MS} ms limit`,
      ratio: lv(TOP) / MEMBER_LIMIT_MS,
      ...check(lv(TOP) / MEMBER_LIMIT_MS, { max: 1 }),
    });
  }
  {
    const dS = dl(member.small, (x) => x.e2eMs).p50;
    const dB = dl(member.big, (x) => x.e2eMs).p50;
    v.push({ measure: `daemon: membership BindNic → applied, ${BIG} vs ${smallCount}`, value: fms(dB), baseline: fms(dS), ratio: dB / dS, target: "" });
    const tS2 = dl(member.small, (x) => x.daemonMs).p50;
    const tB2 = dl(member.big, (x) => x.daemonMs).p50;
    v.push({
      measure: `daemon timer (apply_seconds), ${BIG} rules`,
      value: fms(tB2),
      baseline: `${MEMBER_LIMIT_MS} ms limit`,
      ratio: tB2 / MEMBER_LIMIT_MS,
      ...check(tB2 / MEMBER_LIMIT_MS, { max: 1 }),
    });
    v.push({
      measure: `  flat: daemon timer, ${BIG} vs ${smallCount} rules`,
      value: fms(tB2),
      baseline: fms(tS2),
      ratio: tB2 / tS2,
      ...check(tB2 / tS2, { max: FLAT_MAX }),
    });
  }
  v.push({
    measure: `VM↔VM throughput, ${BIG} vs ${smallCount} rules`,
    value: `${num(tB.median)} Gbit/s`,
    baseline: `${num(tS.median)} Gbit/s`,
    ratio: tB.median / tS.median,
    ...check(tB.median / tS.median, { min: TPUT_MIN }),
  });
  v.push({ measure: "  paired by round (median of ratios)", value: pct(paired.median), baseline: "–", ratio: paired.median, target: "" });
  {
    const cpuS = spread(rs.map((x) => x.tput.cpuMsPerGB)).median;
    const cpuB = spread(rb.map((x) => x.tput.cpuMsPerGB)).median;
    v.push({ measure: "  CPU per GB (small ÷ big)", value: `${num(cpuB, 0)} ms/GB`, baseline: `${num(cpuS, 0)} ms/GB`, ratio: cpuS / cpuB, target: "" });
    const pS = spread(rs.map((x) => x.ping.p50)).median;
    const pB = spread(rb.map((x) => x.ping.p50)).median;
    v.push({ measure: "ping RTT p50", value: `${num(pB, 3)} ms`, baseline: `${num(pS, 3)} ms`, ratio: pB / pS, target: "" });
    const cS = spread(rs.map((x) => x.connects.perSec)).median;
    const cB = spread(rb.map((x) => x.connects.perSec)).median;
    v.push({ measure: "new TCP connections/s", value: num(cB, 0), baseline: num(cS, 0), ratio: cB / cS, target: "" });
  }
  p(heading("Verdict"));
  p(verdictTable(v));
  const misses = v.filter((x) => x.pass === false).length;
  p(`${v.filter((x) => x.pass === true).length} PASS, ${misses} MISS · measured in ${elapsedMeasureS.toFixed(0)} s, teardown ${num(teardownMs / 1000)} s`);
  p(
    `Cleanup: ${leftovers.length} namespaces of run ${P} left${leftovers.length ? ` (${leftovers.slice(0, 5).join(", ")})` : ""}; root namespace ` +
      `${rootDiff.length ? `CHANGED: ${rootDiff.join("; ")}` : "unchanged (links, addresses, routes, sysctls, nft ruleset)"}.`,
  );
  const file = resultsFile("firewall");
  p();
  p(`figures written to ${file}`);
  console.log(out.join("\n"));
  writeJson(file, {
    env: { ...env, loadAtEnd },
    ruleMemory,
    elapsedMeasureS,
    teardownMs,
    applyDirect: p1,
    bulkChange: bulk,
    membershipDirect: p2,
    daemon: { smallCount, big: BIG, membership: member, switches, memberSetOk, inSitu },
    traffic: { small: rs, big: rb, paired },
    cleanup: { leftovers, rootDiff },
    verdicts: v,
  });
  return rootDiff.length || leftovers.length ? 2 : 0;
}

runBench(main, () => daemons.map((d) => ["daemon", d] as const));
