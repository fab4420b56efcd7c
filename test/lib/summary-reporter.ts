// The last line of a test run, which CI reads: "N passed, N failed", then
// ", N skipped" when tests were skipped. Counts are of tests, with what vitest
// itself would not count as a failed test counted as failed, so that the line
// never says "0 failed" when the run failed:
// - a test that did not run because a beforeAll of its suite or file threw
//   (vitest shows it as skipped);
// - a suite or file with its own error and no failed test to show for it (an
//   afterAll that threw, a file that failed to import);
// - an error outside any test (unhandled rejection, uncaught exception).
// Each of these is named above the line. vitest's exit code is not changed
// (non-zero on any of them).
// Above the notes: the slowest files with their wall time (queued to end:
// worker start, import, hooks and tests), to see where a run's time goes.
import type { Reporter, SerializedError, TestCase, TestModule, TestSuite, Vitest } from "vitest/node";

type Parent = TestSuite | TestModule;

function firstLine(e: { message?: string } | undefined): string {
  return (e?.message ?? String(e)).split("\n")[0];
}

function where(p: Parent): string {
  return p.type === "module" ? p.relativeModuleId : `${p.module.relativeModuleId} > ${p.fullName}`;
}

/** The nearest suite or file above t (or t itself) that has errors of its own. */
function failedAncestor(t: TestCase): Parent | undefined {
  for (let p: Parent | undefined = t.parent; p; p = p.type === "suite" ? p.parent : undefined) {
    if (p.errors().length > 0) return p;
  }
  return undefined;
}

/** How many of the slowest files the summary lists. */
const SLOWEST = 15;

/** The table of the slowest files, one "  12.3 s  test/x.test.ts" line each. */
export function slowestFiles(wallMs: ReadonlyMap<string, number>, n = SLOWEST): string[] {
  const rows = [...wallMs].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1)).slice(0, n);
  if (rows.length === 0) return [];
  const total = [...wallMs.values()].reduce((a, b) => a + b, 0);
  return [
    `slowest ${rows.length} of ${wallMs.size} files (wall time; all files ${(total / 1000).toFixed(1)} s):\n`,
    ...rows.map(([f, ms]) => `${(ms / 1000).toFixed(1).padStart(8)} s  ${f}\n`),
  ];
}

export class SummaryReporter implements Reporter {
  private lines: string[] | undefined;
  private readonly queued = new Map<string, number>();
  private readonly wallMs = new Map<string, number>();

  // Printed when vitest closes, after its workers are stopped: a worker's
  // output as it exits would otherwise come after the line.
  onInit(vitest: Vitest): void {
    vitest.onClose(() => {
      if (this.lines) process.stdout.write(this.lines.join(""));
      this.lines = undefined;
    });
  }

  onTestModuleQueued(m: TestModule): void {
    this.queued.set(m.moduleId, performance.now());
  }

  onTestModuleEnd(m: TestModule): void {
    const start = this.queued.get(m.moduleId);
    const d = m.diagnostic();
    // Without a queued time (a reporter added late), the parts vitest measured.
    const ms =
      start !== undefined ? performance.now() - start : d.environmentSetupDuration + d.prepareDuration + d.collectDuration + d.setupDuration + d.duration;
    this.wallMs.set(m.relativeModuleId, ms);
  }

  onTestRunEnd(modules: ReadonlyArray<TestModule>, unhandled: ReadonlyArray<SerializedError>): void {
    let passed = 0;
    let failed = 0;
    let skipped = 0;
    const notes: string[] = [];
    const blamed = new Set<Parent>();
    for (const m of modules) {
      for (const t of m.children.allTests()) {
        const r = t.result();
        if (r.state === "passed") passed++;
        else if (r.state === "failed") {
          failed++;
          const a = failedAncestor(t);
          if (a) blamed.add(a);
        } else if (r.state === "skipped" && t.options.mode === "run" && r.note === undefined && failedAncestor(t)) {
          // Not skipped by the test: its suite's beforeAll (or the file) failed first.
          const a = failedAncestor(t)!;
          failed++;
          blamed.add(a);
          notes.push(`failed (did not run: ${where(a)} failed: ${firstLine(a.errors()[0])}): ${m.relativeModuleId} > ${t.fullName}`);
        } else if (r.state === "skipped") skipped++;
        else {
          // pending: the run ended (timeout, interrupt) before the test finished.
          failed++;
          notes.push(`failed (did not finish): ${m.relativeModuleId} > ${t.fullName}`);
        }
      }
      for (const p of [m, ...m.children.allSuites()]) {
        if (p.errors().length > 0 && !blamed.has(p)) {
          failed++;
          notes.push(`failed (${where(p)}, outside any test): ${firstLine(p.errors()[0])}`);
        }
      }
    }
    for (const e of unhandled) {
      failed++;
      notes.push(`failed (unhandled error outside any test): ${firstLine(e)}`);
    }
    this.lines = [
      ...slowestFiles(this.wallMs),
      ...notes.map((n) => `${n}\n`),
      `${passed} passed, ${failed} failed${skipped > 0 ? `, ${skipped} skipped` : ""}\n`,
    ];
  }
}
