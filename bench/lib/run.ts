// What every benchmark does around its measurements: a progress line on
// stderr with the seconds since the start, a hard time budget past which
// the run exits (test/lib/netns.ts's exit handler then ends the daemons by
// PID and removes every namespace of the run), and the end: exit with
// main's code, or print the error and the tail of the daemons' output.
//
// Smoke mode: `--smoke` on any benchmark's command line runs it with tiny
// counts (each bench gives its own through benchArgs) through the same code
// paths, the baseline included, within SMOKE_LIMIT_MS; the figures mean
// nothing, the point is that the bench still runs to its end, and any error
// exits non-zero. test/integration/bench-smoke.test.ts runs every bench so.
import { parseArgs, type ParseArgsOptionsConfig } from "node:util";
import type { Daemon } from "../../test/lib/daemon.js";

/** Whether this run is a smoke run (`--smoke`). */
export const SMOKE = process.argv.slice(2).includes("--smoke");
/** A smoke run's hard time limit, whatever the bench's own. */
export const SMOKE_LIMIT_MS = 90_000;

/**
 * The bench's command-line options (node:util parseArgs, strict), plus
 * --smoke. In a smoke run the defaults are replaced by `smoke`'s values
 * (options given on the command line still win).
 */
export function benchArgs<const O extends ParseArgsOptionsConfig>(options: O, smoke: { [K in keyof O]?: string | boolean } = {}) {
  const all: ParseArgsOptionsConfig = { ...options, smoke: { type: "boolean", default: false } };
  if (SMOKE) for (const [k, v] of Object.entries(smoke)) if (v !== undefined) all[k] = { ...all[k], default: v } as ParseArgsOptionsConfig[string];
  return parseArgs({ options: all as O, strict: true, allowPositionals: false }).values;
}

/** An integer option in min–max; a smoke run may go below min (down to 1, or 0 if min is 0). */
export function intOpt(name: string, v: unknown, min: number, max = Number.MAX_SAFE_INTEGER): number {
  const lo = SMOKE ? Math.min(min, 1) : min;
  const n = Number(v);
  if (!Number.isInteger(n) || n < lo || n > max) throw new Error(`--${name} ${String(v)}: expected an integer in ${lo}–${max}`);
  return n;
}

/** `full` normally, `smoke` in a smoke run: for the counts a bench fixes in its code. */
export function pick<T>(full: T, smoke: T): T {
  return SMOKE ? smoke : full;
}

export function benchClock(hardLimitMs?: number): { t0: number; progress: (msg: string) => void } {
  const t0 = Date.now();
  if (SMOKE) hardLimitMs = Math.min(hardLimitMs ?? SMOKE_LIMIT_MS, SMOKE_LIMIT_MS);
  const progress = (msg: string) => process.stderr.write(`[${((Date.now() - t0) / 1000).toFixed(0).padStart(3)} s] ${SMOKE ? "(smoke) " : ""}${msg}\n`);
  if (hardLimitMs) {
    setTimeout(() => {
      progress(`past the ${hardLimitMs / 1000} s budget: cleaning up and exiting`);
      process.exit(124);
    }, hardLimitMs).unref();
  }
  return { t0, progress };
}

/** Runs main and exits with its code; on an error, prints it and the tail of each daemon's output. */
export function runBench(main: () => Promise<number>, daemons: () => (readonly [string, Daemon | undefined])[] = () => []): void {
  main().then(
    (code) => process.exit(code),
    (err) => {
      console.error(err);
      for (const [name, d] of daemons()) if (d) console.error(`--- microvpcd ${name} output (tail):\n${d.output().slice(-3000)}`);
      process.exit(1);
    },
  );
}
