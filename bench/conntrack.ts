// Clearing one NIC's conntrack entries at DetachNic (`npm run bench:conntrack`;
// not a timed test): by mark, as the netagent does now (ct-marks.ts; the
// kernel deletes the entries whose mark names the NIC itself, a filtered
// flush), against the ways it did before, in the same run and the same
// namespace:
//   - dump: the namespace's whole table read in-process and picked by
//     address (services/common/conntrack.ts, what an adopted NIC still uses);
//   - `conntrack -R` with `-D -m` lines, the exec fallback of the mark path;
//   - `conntrack -R` with `-D -s ADDR` / `-D -d ADDR` lines, the exec
//     fallback before (the conntrack tool dumps and picks, as the dump does).
// At each level, the namespace holds that many flows of other NICs (marked
// as the netagent marks them, loaded with one `conntrack -R` of `-I`
// lines) plus the NIC's two flows: one from it to a neighbour NIC, one from
// the neighbour to it, both carrying both marks. Every clear must delete
// exactly those two (checked); they are put back, untimed, after each. The
// cases run interleaved round by round, so a busy machine's noise falls on
// all of them alike; each figure is the median over the rounds.
//
// Then what a clear does to the rest of the host: a veth attach through
// libnl-route (AttachNic's, common/rtnl.ts) into a fresh VM namespace,
// timed alone and with two clears started just before it (a detach's
// two filters), by mark and by dump, interleaved. The clears run in a
// namespace of their own holding only the NIC's two flows, as most VPC
// namespaces hold few: a dump with nothing to hand over walks the whole
// host-wide hash in one go, and the attach, an rtnl change, waits on it.
//
// Safety: one named namespace with the run prefix of test/lib/netns.ts;
// the root namespace is never changed (a snapshot before and after is
// compared); the namespace, and with it its conntrack table, is removed at
// the end, also on failure. The flows count against the host-wide
// nf_conntrack_max: the largest level is capped at a tenth of it.
//
// `npm run bench:conntrack -- [--levels 1000,10000,25000] [--rounds 9]
// [--attaches 40]`; --smoke: levels 10,100, 2 rounds, 4 attaches per case
// (bench/lib/run.ts).
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { conntrackDelete, conntrackDeleteByMark, conntrackStartInfo } from "../services/common/conntrack.js";
import { attachVeth } from "../services/common/rtnl.js";
import { markCommands, markFilters } from "../services/netagent/ct-marks.js";
import { createNetns, diffRoot, installCleanupHandlers, rootSnapshot, run, RUN_PREFIX } from "../test/lib/netns.js";
import { heading, num, resultsFile, table, verdictTable, writeJson, type Verdict } from "./lib/report.js";
import { benchArgs, benchClock, intOpt, runBench } from "./lib/run.js";
import { median, percentile, sorted } from "./lib/stats.js";

const opt = benchArgs(
  { levels: { type: "string", default: "1000,10000,25000" }, rounds: { type: "string", default: "9" }, attaches: { type: "string", default: "40" } },
  { levels: "10,100", rounds: "2", attaches: "4" },
);
const ROUNDS = intOpt("rounds", opt.rounds, 3, 50);
const ATTACHES = intOpt("attaches", opt.attaches, 2, 500);
const CT_MAX = Number(readFileSync("/proc/sys/net/netfilter/nf_conntrack_max", "utf8").trim());
const LEVELS = (opt.levels ?? "")
  .split(",")
  .map((x) => intOpt("levels", x, 1, Math.floor(CT_MAX / 10)))
  .sort((a, b) => a - b);

/** The NIC being detached, and its neighbour, with their indexes (ct-marks.ts). */
const NIC = { address: "10.9.0.7", index: 7 };
const PEER = { address: "10.9.0.8", index: 8 };
const hex = (n: number) => `0x${(n >>> 0).toString(16)}`;

const insert = (src: string, dst: string, sport: number, mark: number) =>
  `-I -s ${src} -d ${dst} -p tcp --sport ${sport} --dport 80 --state ESTABLISHED -u SEEN_REPLY -t 900 -m ${hex(mark)}`;
/** The NIC's two flows, marked as the netagent's table marks a flow between two of its NICs. */
const nicFlows = [
  insert(NIC.address, PEER.address, 40001, (NIC.index << 16) | PEER.index),
  insert(PEER.address, NIC.address, 40002, (PEER.index << 16) | NIC.index),
];

const { progress } = benchClock(600_000);

async function main(): Promise<number> {
  installCleanupHandlers();
  const root0 = await rootSnapshot();
  const ns = await createNetns(`${RUN_PREFIX}-ct`);
  const dir = mkdtempSync(join(tmpdir(), "mvpc-bench-ct-"));
  const conntrackR = async (lines: string[]) => {
    const file = join(dir, "lines");
    writeFileSync(file, lines.join("\n") + "\n");
    return run("ip", ["netns", "exec", ns, "conntrack", "-R", file], { check: false });
  };
  const count = async () => Number((await run("ip", ["netns", "exec", ns, "conntrack", "-C"])).stdout.trim());
  const printed = (out: string) => out.split("\n").filter((l) => / src=/.test(l)).length;

  const cases: Record<string, () => Promise<number>> = {
    "by mark (in-process)": async () => {
      const n = await conntrackDeleteByMark(ns, markFilters(NIC.index));
      if (n === null) throw new Error("the in-process conntrack library is not available here");
      return n;
    },
    "dump (in-process)": async () => {
      const n = await conntrackDelete(ns, (e) => e.src === NIC.address || e.dst === NIC.address);
      if (n === null) throw new Error("the in-process conntrack library is not available here");
      return n;
    },
    "conntrack -D -m (exec)": async () => printed((await conntrackR(markCommands(NIC.index))).stdout),
    "conntrack -D -s/-d (exec)": async () => printed((await conntrackR([`-D -s ${NIC.address}`, `-D -d ${NIC.address}`])).stdout),
  };
  const names = Object.keys(cases);
  const results: { flows: number; ms: Record<string, number[]> }[] = [];
  let loaded = 0;
  try {
    for (const level of LEVELS) {
      // Flows of other NICs (indexes 9 and up), up to this level.
      const more: string[] = [];
      for (let i = loaded; i < level; i++) {
        const src = `10.20.${(i >> 8) & 255}.${i & 255}`;
        const dst = `10.21.${(i >> 16) & 255}.${(i >> 8) & 255}`;
        more.push(insert(src, dst, 1024 + (i % 60000), (((9 + (i % 4000)) << 16) | (9 + ((i * 7) % 4000))) >>> 0));
      }
      progress(`loading ${more.length} flows (${level} in all)`);
      for (let i = 0; i < more.length; i += 5000) await conntrackR(more.slice(i, i + 5000));
      loaded = level;
      const ms: Record<string, number[]> = Object.fromEntries(names.map((n) => [n, []]));
      for (let r = -1; r < ROUNDS; r++) {
        for (const name of names) {
          await conntrackR(nicFlows);
          const before = await count();
          const t0 = performance.now();
          const deleted = await cases[name]();
          const dt = performance.now() - t0;
          const after = await count();
          if (deleted !== 2 || before - after !== 2)
            throw new Error(`${name} at ${level} flows deleted ${deleted} (table ${before} → ${after}); expected the NIC's 2`);
          if (r >= 0) ms[name].push(dt);
        }
      }
      results.push({ flows: level, ms });
      progress(`${level} flows: done`);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }

  console.log(heading(`Clearing one NIC's 2 flows, median of ${ROUNDS} rounds (ms per clear; ${JSON.stringify(conntrackStartInfo())})`));
  console.log(
    table(
      ["flows in the namespace", ...names],
      results.map((r) => [String(r.flows), ...names.map((n) => num(median(r.ms[n]), 2))]),
    ),
  );
  const verdicts: Verdict[] = results.map((r) => {
    const mark = median(r.ms["by mark (in-process)"]);
    const dump = median(r.ms["dump (in-process)"]);
    return { measure: `clear by mark, ${r.flows} flows`, value: `${num(mark, 2)} ms`, baseline: `dump ${num(dump, 2)} ms`, ratio: mark / dump, target: "" };
  });
  const first = results[0];
  const last = results[results.length - 1];
  const growth = median(last.ms["by mark (in-process)"]) / median(first.ms["by mark (in-process)"]);
  verdicts.push({ measure: `by mark, ${last.flows} vs ${first.flows} flows`, value: `${num(growth, 2)}×`, baseline: "–", ratio: growth, target: "" });
  const beside = await attachBeside();
  console.log(heading(`A veth attach while two clears run beside it (ms, median of ${ATTACHES} attaches per case, interleaved)`));
  console.log(
    table(
      ["attach", "p50", "p90", "max"],
      Object.entries(beside).map(([k, v]) => [k, num(median(v), 2), num(percentile(sorted(v), 90), 2), num(Math.max(...v), 2)]),
    ),
  );
  const alone = median(beside.alone);
  const byMark = median(beside["beside two clears by mark"]);
  const byDump = median(beside["beside two dumps"]);
  const vsAlone = (v: number) => ({ value: `${num(v, 2)} ms`, baseline: `alone ${num(alone, 2)} ms`, ratio: v / alone });
  verdicts.push({ measure: "veth attach beside two clears by mark", ...vsAlone(byMark), target: "≤ 1.50×", pass: byMark <= 1.5 * alone });
  verdicts.push({ measure: "veth attach beside two dumps", ...vsAlone(byDump), target: "" });
  console.log(heading("Verdict"));
  console.log(verdictTable(verdicts));

  const root1 = await rootSnapshot();
  const diff = diffRoot(root0, root1);
  if (diff.length) throw new Error(`the root namespace changed: ${diff.join("; ")}`);
  const out = resultsFile("conntrack");
  writeJson(out, { rounds: ROUNDS, results, beside, verdicts });
  console.log(`figures written to ${out}`);
  return 0;
}

/** Veth attaches alone and beside two clears of a near-empty namespace (see the top): ms per attach, by case. */
async function attachBeside(): Promise<Record<string, number[]>> {
  const vpc = await createNetns(`${RUN_PREFIX}-ctv`);
  const quiet = await createNetns(`${RUN_PREFIX}-ctq`);
  const dir = mkdtempSync(join(tmpdir(), "mvpc-bench-ctq-"));
  await run("ip", ["-n", vpc, "link", "add", "br0", "type", "bridge"]);
  await run("ip", ["-n", vpc, "link", "set", "br0", "up"]);
  writeFileSync(join(dir, "flows"), nicFlows.join("\n") + "\n");
  const cases: Record<string, () => Promise<unknown>[]> = {
    alone: () => [],
    "beside two clears by mark": () => [conntrackDeleteByMark(quiet, markFilters(NIC.index)), conntrackDeleteByMark(quiet, markFilters(PEER.index))],
    "beside two dumps": () => [conntrackDelete(quiet, (e) => e.src === NIC.address), conntrackDelete(quiet, (e) => e.dst === NIC.address)],
  };
  const out: Record<string, number[]> = Object.fromEntries(Object.keys(cases).map((k) => [k, []]));
  let n = 0;
  try {
    progress(`veth attaches: ${ATTACHES} per case, alone and beside two clears`);
    for (let r = -1; r < ATTACHES; r++) {
      for (const [name, clears] of Object.entries(cases)) {
        await run("ip", ["netns", "exec", quiet, "conntrack", "-R", join(dir, "flows")], { check: false });
        const vm = await createNetns(`${RUN_PREFIX}-ctm${n}`);
        const started = clears();
        // The clears' walks under way on the pool (their first steps run on this thread's next turns).
        await new Promise((r) => setTimeout(r, 2));
        const t0 = performance.now();
        const ok = attachVeth({
          ns: vpc,
          hostIf: `h${n}`,
          mtu: 1500,
          alias: "bench",
          bridge: "br0",
          netnsPath: `/run/netns/${vm}`,
          guestIf: "eth0",
          mac: `02:00:00:00:${((n >> 8) & 255).toString(16).padStart(2, "0")}:${(n & 255).toString(16).padStart(2, "0")}`,
          address: "10.9.0.9/24",
          gateway: "10.9.0.1",
        });
        const dt = performance.now() - t0;
        await Promise.all(started);
        if (!ok) throw new Error("the in-process veth attach is not available here (koffi or libnl-route missing)");
        if (r >= 0) out[name].push(dt);
        await run("ip", ["netns", "del", vm]);
        n++;
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  return out;
}

runBench(main);
