// Statistics shared by the benchmarks: percentiles of one run, the median and
// spread of several runs, and running several cases interleaved so that a
// noisy machine's drift hits every case alike.

/** Nearest-rank percentile (p in 0..100) of an ascending array. */
export function percentile(sorted: ArrayLike<number>, p: number): number {
  const n = sorted.length;
  if (n === 0) return Number.NaN;
  const rank = Math.ceil((p / 100) * n);
  return sorted[Math.min(n - 1, Math.max(0, rank - 1))];
}

/** An ascending copy (the input is left alone). */
export function sorted(xs: ArrayLike<number>): Float64Array {
  return Float64Array.from(xs).sort();
}

export function median(xs: ArrayLike<number>): number {
  return percentile(sorted(xs), 50);
}

/** Median and range of one figure over several runs. */
export interface Spread {
  median: number;
  min: number;
  max: number;
  runs: number;
}

export function spread(xs: number[]): Spread {
  if (xs.length === 0) return { median: Number.NaN, min: Number.NaN, max: Number.NaN, runs: 0 };
  const s = sorted(xs);
  // For an even count, the mean of the two middle runs.
  const mid = s.length % 2 === 1 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
  return { median: mid, min: s[0], max: s[s.length - 1], runs: s.length };
}

/** Spread of one numeric field over a list of run results. */
export function spreadOf<T>(runs: T[], f: (r: T) => number): Spread {
  return spread(runs.map(f));
}

export interface BenchCase<T> {
  name: string;
  /** One measured (or warm-up) run. */
  run(round: number, warmup: boolean): Promise<T>;
}

export interface InterleaveOptions {
  /** Measured rounds (each case runs once per round). */
  rounds: number;
  /** Warm-up rounds, discarded. */
  warmupRounds?: number;
  /** Stop starting new rounds after this instant (Date.now() ms); at least minRounds still run. */
  deadline?: number;
  minRounds?: number;
}

/**
 * Runs every case once per round, rotating the order each round, after the
 * warm-up rounds. Returns the measured results of each case by name.
 */
export async function interleaved<T>(cases: BenchCase<T>[], o: InterleaveOptions): Promise<Map<string, T[]>> {
  const out = new Map<string, T[]>(cases.map((c) => [c.name, []]));
  for (let w = 0; w < (o.warmupRounds ?? 1); w++) {
    for (const c of cases) await c.run(-1, true);
  }
  for (let r = 0; r < o.rounds; r++) {
    if (o.deadline !== undefined && r >= (o.minRounds ?? 3) && Date.now() > o.deadline) break;
    for (let i = 0; i < cases.length; i++) {
      const c = cases[(i + r) % cases.length];
      out.get(c.name)!.push(await c.run(r, false));
    }
  }
  return out;
}
