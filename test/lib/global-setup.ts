// vitest's globalSetup, in the main vitest process.
//
// 1. Builds dist/ once per run, before any test file loads. The daemons the
//    integration tests start run bin/microvpcd.js, which runs
//    dist/microvpcd.js, so a single `npx vitest run test/integration/x.test.ts`
//    needs no separate `npm run build`.
//
// 2. Lets the test files clean up when the run is interrupted. Each file runs
//    in a worker process whose netns harness (test/lib/netns.ts) removes what
//    it made on SIGINT/SIGTERM/SIGHUP, synchronously. But vitest's main
//    process exits a millisecond after the signal, and its watchdog then
//    SIGKILLs the workers, half-way through that cleanup (namespaces left for
//    the next run's stale sweep). So on those signals the main process passes
//    SIGTERM to its workers that run a harness (they left a marker with their
//    PID) and waits, blocked, until each has finished its cleanup (which
//    removes the marker; vitest keeps process.exit from ending a worker) or
//    exited, at most 30 s, before vitest's own handlers let it exit.
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { build } from "../../build.mjs";

/** Where test/lib/netns.ts leaves "<run prefix>.pid" files (MARKER_DIR there). */
const MARKER_DIR = "/run/mvpc-test";

function stat(pid: number): { ppid: number; state: string } | undefined {
  try {
    const s = readFileSync(`/proc/${pid}/stat`, "utf8");
    const rest = s.slice(s.lastIndexOf(")") + 2).split(" ");
    return { state: rest[0], ppid: Number(rest[1]) };
  } catch {
    return undefined;
  }
}

type Worker = { pid: number; marker: string };

/** This process's children (vitest's workers) that left a harness marker. */
function workersWithHarness(): Worker[] {
  let files: string[];
  try {
    files = readdirSync(MARKER_DIR).filter((f) => /^mt[0-9a-f]{4}\.pid$/.test(f));
  } catch {
    return [];
  }
  const workers: Worker[] = [];
  for (const f of files) {
    const marker = join(MARKER_DIR, f);
    let pid;
    try {
      pid = Number(readFileSync(marker, "utf8").trim());
    } catch {
      continue;
    }
    if (Number.isInteger(pid) && pid > 1 && stat(pid)?.ppid === process.pid) workers.push({ pid, marker });
  }
  return workers;
}

/** Cleanup finished (marker removed), or the worker is gone or exited and not reaped yet. */
function done(w: Worker): boolean {
  if (!existsSync(w.marker)) return true;
  const s = stat(w.pid);
  return !s || s.state === "Z" || s.state === "X";
}

function waitForWorkerCleanup(signal: NodeJS.Signals): void {
  const workers = workersWithHarness();
  if (workers.length === 0) return;
  for (const w of workers) {
    try {
      process.kill(w.pid, "SIGTERM");
    } catch {
      // already gone
    }
  }
  const t0 = Date.now();
  const sleeper = new Int32Array(new SharedArrayBuffer(4));
  while (Date.now() - t0 < 30_000 && !workers.every(done)) Atomics.wait(sleeper, 0, 0, 50);
  const left = workers.filter((w) => !done(w)).map((w) => w.pid);
  process.stderr.write(
    `${signal}: waited ${Date.now() - t0} ms for ${workers.length} test worker(s) to clean up${left.length ? `; not done: ${left.join(", ")}` : ""}\n`,
  );
}

const SIGNALS = { SIGINT: 130, SIGTERM: 143, SIGHUP: 129 } as const;

function onSignal(signal: NodeJS.Signals): void {
  waitForWorkerCleanup(signal);
  // vitest's own handler exits right after this; if it is gone (a second
  // Ctrl-C), a listener here must not keep the process alive.
  setTimeout(() => process.exit(SIGNALS[signal as keyof typeof SIGNALS]), 1000).unref();
}

export default async function setup(): Promise<() => void> {
  await build({ quiet: true });
  for (const s of Object.keys(SIGNALS)) process.on(s, onSignal);
  return () => {
    for (const s of Object.keys(SIGNALS)) process.off(s, onSignal);
  };
}
