// A bench that times the same calls through a service's store
// on one redis-server and on a Redis Cluster (bench:fwstore, bench:hoststore,
// bench:gwstore):
// each call's p50 and p99 on both, in round trips of that Redis's own
// baseline call, then the verdicts, and the figures as JSON.
import { performance } from "node:perf_hooks";
import type { Redis } from "ioredis";
import { connectRedis, waitReady } from "../../services/common/redis.js";
import { startRedis, startRedisCluster } from "../../test/lib/redis.js";
import { check, dur, heading, num, resultsFile, table, verdictTable, writeJson, type Verdict } from "./report.js";
import { SMOKE } from "./run.js";
import { percentile, sorted } from "./stats.js";

/** One layout's timings: microseconds per call, in the order measured. */
export interface LayoutTimings<C extends string> {
  name: "single" | "cluster";
  us: Record<C, number[]>;
}

export const p50 = <C extends string>(l: LayoutTimings<C>, call: C): number => percentile(sorted(l.us[call]), 50);
export const p99 = <C extends string>(l: LayoutTimings<C>, call: C): number => percentile(sorted(l.us[call]), 99);

/**
 * Starts one redis-server and a 3+3 Redis Cluster on loopback, connects to
 * both (ready), runs `f` with the two clients, then ends both by PID.
 */
async function onBothLayouts<T>(progress: (msg: string) => void, f: (single: Redis, cluster: Redis) => Promise<T>): Promise<T> {
  progress("starting one redis-server and a 3+3 Redis Cluster");
  const single = await startRedis({ persistence: false });
  const cluster = await startRedisCluster().catch(async (e: unknown) => {
    await single.stop();
    throw e;
  });
  const conns: Redis[] = [];
  try {
    for (const url of [single.url, cluster.url]) conns.push(connectRedis({ url, commandTimeoutMs: 5000 }));
    await Promise.all(conns.map((c) => waitReady(c)));
    return await f(conns[0], conns[1]);
  } finally {
    for (const r of conns) r.disconnect();
    await cluster.stop();
    await single.stop();
  }
}

/** A verdict on a cluster's p50 of `call` in round trips of its own baseline (`max`: the target, none if undefined). */
export function inRoundTrips<C extends string>(many: LayoutTimings<C>, call: C, baseline: C, measure: string, max?: number): Verdict {
  const r = p50(many, call) / p50(many, baseline);
  return { measure, value: dur(p50(many, call)), baseline: dur(p50(many, baseline)), ratio: r, ...(max === undefined ? { target: "" } : check(r, { max })) };
}

/** The call timer of one layout: runs `f` and records its microseconds under `call`. */
export function timer<C extends string>(l: LayoutTimings<C>): <T>(call: C, f: () => Promise<T>) => Promise<T> {
  return async (call, f) => {
    const t = performance.now();
    const out = await f();
    l.us[call].push((performance.now() - t) * 1000);
    return out;
  };
}

/**
 * One round of each layout first, not counted (scripts loaded on every
 * node, connections to every primary open), then `rounds` rounds, which
 * layout goes first alternating, so that a noisy moment weighs on both.
 */
async function alternate<C extends string, L extends LayoutTimings<C>>(
  layouts: L[],
  calls: readonly C[],
  rounds: number,
  round: (l: L, i: number) => Promise<void>,
): Promise<void> {
  for (const l of layouts) {
    await round(l, -1);
    for (const c of calls) l.us[c] = [];
  }
  for (let i = 0; i < rounds; i++) for (const l of i % 2 ? [...layouts].reverse() : layouts) await round(l, i);
}

/** A verdict with no target: one layout's p50 of a call against the other's. */
export function clusterOverSingle<C extends string>(one: LayoutTimings<C>, many: LayoutTimings<C>, call: C): Verdict {
  return {
    measure: `${call}, cluster / single`,
    value: dur(p50(many, call)),
    baseline: dur(p50(one, call)),
    ratio: p50(many, call) / p50(one, call),
    target: "",
  };
}

/** Prints the table and the verdicts, writes the JSON (with `extra`), and returns the exit code: 2 if a verdict failed, but 0 in a smoke run, whose figures mean nothing (bench-smoke checks that it runs to its end). */
function reportLayouts<C extends string>(o: {
  title: string;
  kind: string;
  calls: readonly C[];
  baseline: C;
  one: LayoutTimings<C>;
  many: LayoutTimings<C>;
  verdicts: Verdict[];
  extra: Record<string, unknown>;
}): number {
  const { one, many, baseline } = o;
  console.log(heading(o.title));
  console.log(
    table(
      ["call", "single p50", "p99", `× ${baseline.replace(/ \(baseline\)$/, "")}`, "cluster p50", "p99", `× ${baseline.replace(/ \(baseline\)$/, "")}`],
      o.calls.map((call) => [
        call,
        dur(p50(one, call)),
        dur(p99(one, call)),
        num(p50(one, call) / p50(one, baseline), 1),
        dur(p50(many, call)),
        dur(p99(many, call)),
        num(p50(many, call) / p50(many, baseline), 1),
      ]),
    ),
  );
  console.log("\nVerdict");
  console.log(verdictTable(o.verdicts));
  const file = resultsFile(o.kind);
  writeJson(file, {
    ...o.extra,
    rows: o.calls.map((call) => ({
      call,
      single: { p50Us: p50(one, call), p99Us: p99(one, call) },
      cluster: { p50Us: p50(many, call), p99Us: p99(many, call) },
    })),
    verdicts: o.verdicts,
  });
  console.log(`figures written to ${file}`);
  return SMOKE || o.verdicts.every((v) => v.pass !== false) ? 0 : 2;
}

/** The timings of `calls`, none measured yet (a layout's `us` to start with). */
export function noTimings<C extends string>(calls: readonly C[]): Record<C, number[]> {
  return Object.fromEntries(calls.map((c) => [c, []])) as unknown as Record<C, number[]>;
}

/**
 * A store bench's whole run: one redis-server and a 3+3 cluster
 * (onBothLayouts), a layout set up on each (`setUp`, its timings empty),
 * `rounds` alternating rounds (alternate), then the report of `calls`
 * against "HSET (baseline)" with what `report` says of the two.
 */
export function compareLayouts<C extends string, L extends LayoutTimings<C>>(o: {
  progress: (msg: string) => void;
  calls: readonly C[];
  rounds: number;
  /** What the progress line says of a round besides the count, e.g. ", 50 members in the peer group". */
  roundsNote?: string;
  setUp: (name: LayoutTimings<C>["name"], redis: Redis) => Promise<L> | L;
  round: (l: L, i: number) => Promise<void>;
  report: (one: L, many: L) => { title: string; kind: string; verdicts: Verdict[]; extra: Record<string, unknown> };
}): Promise<number> {
  return onBothLayouts(o.progress, async (single, cluster) => {
    const [one, many] = [await o.setUp("single", single), await o.setUp("cluster", cluster)];
    o.progress(`${o.rounds} rounds${o.roundsNote ?? ""}`);
    await alternate([one, many], o.calls, o.rounds, o.round);
    return reportLayouts({ ...o.report(one, many), calls: o.calls, baseline: "HSET (baseline)" as C, one, many });
  });
}
