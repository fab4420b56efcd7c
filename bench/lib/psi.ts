// CPU pressure (PSI, /proc/pressure/cpu "some"): the share of time a runnable
// task waited for a CPU. On a shared 2-core machine it shows when a
// neighbour took the cores during a measured run.
import { readFileSync } from "node:fs";
import { performance } from "node:perf_hooks";

/** Total µs some task waited for a CPU; NaN where PSI is off. */
export function psiCpuUs(): number {
  try {
    const m = /^some .*total=(\d+)/m.exec(readFileSync("/proc/pressure/cpu", "utf8"));
    return m ? Number(m[1]) : Number.NaN;
  } catch {
    return Number.NaN;
  }
}

/** Starts a pressure window; the function returned gives the share of the window's wall time. */
export function pressureWindow(): () => number {
  const p0 = psiCpuUs();
  const t0 = performance.now();
  return () => (psiCpuUs() - p0) / 1000 / (performance.now() - t0);
}
