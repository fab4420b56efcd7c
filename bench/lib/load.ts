// Load generation for the benchmarks: a closed loop of N concurrent callers,
// bounded in time and in count, recording every call's latency.
import { performance } from "node:perf_hooks";
import { percentile, sorted } from "./stats.js";

export interface LoadOptions {
  /** Concurrent callers, each waiting for its answer before the next call. */
  workers: number;
  /** No call starts after this long. */
  durationMs: number;
  /** No more calls than this in total. */
  maxOps: number;
}

export interface LoadResult {
  ops: number;
  errors: number;
  firstError?: string;
  elapsedMs: number;
  opsPerSec: number;
  /** Latency of each successful call, µs, ascending. */
  latUs: Float64Array;
  p50Us: number;
  p99Us: number;
}

/**
 * Runs op(worker, seq) from `workers` callers until durationMs or maxOps.
 * seq is unique across the run (0, 1, 2 …). Throughput counts completed
 * calls over the time from the first start to the last completion.
 */
export async function closedLoop(op: (worker: number, seq: number) => Promise<unknown>, o: LoadOptions): Promise<LoadResult> {
  const lat = new Float64Array(o.maxOps);
  let next = 0;
  let ok = 0;
  let errors = 0;
  let firstError: string | undefined;
  const start = performance.now();
  const stopAt = start + o.durationMs;
  const worker = async (w: number) => {
    for (;;) {
      if (next >= o.maxOps || performance.now() >= stopAt) return;
      const seq = next++;
      const t0 = performance.now();
      try {
        await op(w, seq);
        lat[ok++] = (performance.now() - t0) * 1000;
      } catch (err) {
        errors++;
        firstError ??= (err as Error).message;
        // A failing target must not spin: give up on this run.
        if (errors > 100) return;
      }
    }
  };
  await Promise.all(Array.from({ length: o.workers }, (_, w) => worker(w)));
  const elapsedMs = performance.now() - start;
  const latUs = sorted(lat.subarray(0, ok));
  return {
    ops: ok,
    errors,
    firstError,
    elapsedMs,
    opsPerSec: (ok / elapsedMs) * 1000,
    latUs,
    p50Us: percentile(latUs, 50),
    p99Us: percentile(latUs, 99),
  };
}
