// CPU time of processes, to see where a benchmark's time goes: the sum over
// every thread of /proc/<pid>/task/<tid>/schedstat (nanoseconds on a CPU).
// Linux only; elsewhere the figures are NaN.
import { readdirSync, readFileSync } from "node:fs";
import { availableParallelism, loadavg, release } from "node:os";

/** CPU time used so far by every thread of pid, in µs (NaN if unreadable). */
export function cpuUs(pid: number): number {
  let tasks: string[];
  try {
    tasks = readdirSync(`/proc/${pid}/task`);
  } catch {
    return Number.NaN;
  }
  let ns = 0;
  for (const t of tasks) {
    try {
      ns += Number(readFileSync(`/proc/${pid}/task/${t}/schedstat`, "utf8").split(" ")[0]);
    } catch {
      // the thread ended between the listing and the read
    }
  }
  return ns / 1000;
}

export type CpuSnapshot = Record<string, number>;

/** CPU µs of each named process now. */
export function cpuSnapshot(pids: Record<string, number | undefined>): CpuSnapshot {
  const out: CpuSnapshot = {};
  for (const [name, pid] of Object.entries(pids)) out[name] = pid === undefined ? Number.NaN : cpuUs(pid);
  return out;
}

/** CPU µs each process used between two snapshots. */
export function cpuDelta(before: CpuSnapshot, after: CpuSnapshot): CpuSnapshot {
  const out: CpuSnapshot = {};
  for (const k of Object.keys(after)) out[k] = after[k] - (before[k] ?? Number.NaN);
  return out;
}

export function cpuModel(): string {
  try {
    const m = /model name\s*:\s*(.*)/.exec(readFileSync("/proc/cpuinfo", "utf8"));
    return m ? m[1].trim() : "unknown";
  } catch {
    return "unknown";
  }
}

/** What every benchmark records of the machine it ran on, at its start. */
export function machineEnv(): { date: string; node: string; kernel: string; cpu: string; cores: number; loadavgAtStart: number[] } {
  return {
    date: new Date().toISOString(),
    node: process.version,
    kernel: release(),
    cpu: cpuModel(),
    cores: availableParallelism(),
    loadavgAtStart: loadavg().map((x) => Number(x.toFixed(2))),
  };
}
