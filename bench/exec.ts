// Per-call cost of starting a command: plain execFile, execa, and the
// daemons' adapter (services/common/exec.ts's run(): execa plus the metrics).
// `npm run bench:exec -- [--calls 100] [--rounds 7] [--file ip] [--smoke] [-- args…]`
// Runs `ip -V` (default) --calls times per case, the cases interleaved round
// by round so a busy machine's noise falls on all of them alike, and prints
// the median over the rounds of: wall ms per call, and the parent's own CPU
// ms per call (process.cpuUsage: what each call costs the daemon).
import { execFile } from "node:child_process";
import { parseArgs } from "node:util";
import { execa } from "execa";
import { run } from "../services/common/exec.js";

const { values, positionals } = parseArgs({
  options: {
    calls: { type: "string", default: "100" },
    rounds: { type: "string", default: "7" },
    file: { type: "string", default: "ip" },
    smoke: { type: "boolean", default: false },
  },
  allowPositionals: true,
});
// --smoke: the same cases, a handful of calls (the test suite runs it so the bench cannot rot).
const calls = values.smoke ? 5 : Number(values.calls);
const rounds = values.smoke ? 2 : Number(values.rounds);
const file = values.file!;
const args = positionals.length ? positionals : ["-V"];
const env = { ...process.env, LC_ALL: "C" };

const cases: Record<string, () => Promise<unknown>> = {
  execFile: () => new Promise((res, rej) => execFile(file, args, { env, timeout: 30_000 }, (e, out) => (e ? rej(e) : res(out)))),
  execa: () => execa(file, args, { env: { LC_ALL: "C" }, timeout: 30_000 }),
  "run()": () => run(file, args),
};

async function measure(f: () => Promise<unknown>): Promise<{ wall: number; cpu: number }> {
  const c0 = process.cpuUsage();
  const t0 = performance.now();
  for (let i = 0; i < calls; i++) await f();
  const c = process.cpuUsage(c0);
  return { wall: (performance.now() - t0) / calls, cpu: (c.user + c.system) / 1000 / calls };
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1];
const samples: Record<string, { wall: number; cpu: number }[]> = Object.fromEntries(Object.keys(cases).map((k) => [k, []]));
for (const f of Object.values(cases)) await measure(f); // warm-up
for (let r = 0; r < rounds; r++) for (const [k, f] of Object.entries(cases)) samples[k].push(await measure(f));
console.log(`${file} ${args.join(" ")} ×${calls}, median of ${rounds} rounds (Node ${process.version})`);
for (const [k, s] of Object.entries(samples)) {
  console.log(
    `${k.padEnd(9)} wall ${median(s.map((x) => x.wall)).toFixed(2)} ms/call (${s.map((x) => x.wall.toFixed(1)).join(" ")}), parent CPU ${median(s.map((x) => x.cpu)).toFixed(2)} ms/call`,
  );
}
