// What every benchmark does around its measurements: a progress line on
// stderr with the seconds since the start, a hard time budget past which
// the run exits (test/lib/netns.ts's exit handler then ends the daemons by
// PID and removes every namespace of the run), and the end: exit with
// main's code, or print the error and the tail of the daemons' output.
import type { Daemon } from "../../test/lib/daemon.js";

export function benchClock(hardLimitMs?: number): { t0: number; progress: (msg: string) => void } {
  const t0 = Date.now();
  const progress = (msg: string) => process.stderr.write(`[${((Date.now() - t0) / 1000).toFixed(0).padStart(3)} s] ${msg}\n`);
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
