// Plain-text reporting for the benchmarks: aligned tables, number formats,
// and the closing verdict table (measure, value, baseline, ratio, target).
import { mkdirSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { SMOKE } from "./run.js";
import type { Spread } from "./stats.js";

/** An aligned text table; numeric-looking cells are right-aligned. */
export function table(headers: string[], rows: string[][]): string {
  const all = [headers, ...rows];
  const widths = headers.map((_, i) => Math.max(...all.map((r) => (r[i] ?? "").length)));
  const numeric = (s: string) => /^[-≈~]?[0-9]/.test(s);
  const line = (r: string[]) =>
    r
      .map((c, i) => {
        const cell = c ?? "";
        return numeric(cell) ? cell.padStart(widths[i]) : cell.padEnd(widths[i]);
      })
      .join("  ")
      .trimEnd();
  const sep = widths.map((w) => "─".repeat(w)).join("  ");
  return [line(headers), sep, ...rows.map(line)].join("\n");
}

/** 12345.6 → "12 346"; small values keep some decimals. */
export function num(x: number, digits?: number): string {
  if (!Number.isFinite(x)) return "–";
  const d = digits ?? (Math.abs(x) >= 100 ? 0 : Math.abs(x) >= 10 ? 1 : 2);
  const [int, frac] = x.toFixed(d).split(".");
  const grouped = int.replace(/\B(?=(\d{3})+(?!\d))/g, " ");
  return frac ? `${grouped}.${frac}` : grouped;
}

/** Microseconds, switching to ms above 10 ms. */
export function dur(us: number): string {
  if (!Number.isFinite(us)) return "–";
  return us >= 10_000 ? `${num(us / 1000)} ms` : `${num(us)} µs`;
}

/** "median (min–max)" of a spread, with the given formatter. */
export function spr(s: Spread, f: (x: number) => string = num): string {
  if (s.runs === 0) return "–";
  return `${f(s.median)} (${f(s.min)}–${f(s.max)})`;
}

export function ratio(x: number): string {
  return Number.isFinite(x) ? `${x.toFixed(2)}×` : "–";
}

export function pct(x: number): string {
  return Number.isFinite(x) ? `${(x * 100).toFixed(0)}%` : "–";
}

export interface Verdict {
  measure: string;
  value: string;
  baseline: string;
  /** value / baseline (or whatever the target compares). */
  ratio: number;
  /** e.g. "≥ 0.50", "≤ 1.5"; "" for an informative row. */
  target: string;
  /** undefined for an informative row. */
  pass?: boolean;
}

/** A target check: ratio ≥ min or ratio ≤ max. */
export function check(r: number, t: { min?: number; max?: number }): { target: string; pass: boolean } {
  if (t.min !== undefined) return { target: `≥ ${t.min.toFixed(2)}×`, pass: r >= t.min };
  return { target: `≤ ${t.max!.toFixed(2)}×`, pass: r <= t.max! };
}

export function verdictTable(vs: Verdict[]): string {
  return table(
    ["measure", "value", "baseline", "ratio", "target", "result"],
    vs.map((v) => [v.measure, v.value, v.baseline, ratio(v.ratio), v.target || "–", v.pass === undefined ? "info" : v.pass ? "PASS" : "MISS"]),
  );
}

/** A section heading. */
export function heading(title: string): string {
  return `\n${title}\n${"═".repeat(Math.min(100, title.length))}`;
}

export function writeJson(path: string, data: unknown): void {
  mkdirSync(dirname(path), { recursive: true });
  writeFileSync(
    path,
    JSON.stringify(data, (_k, v) => (v instanceof Float64Array ? undefined : typeof v === "number" && !Number.isFinite(v) ? null : v), 2) + "\n",
  );
}

/**
 * Where a run's figures go: bench/results/<kind>-<date>.json; a smoke run's
 * (whose figures mean nothing) under the temporary directory instead.
 */
export function resultsFile(kind: string): string {
  const dir = SMOKE ? join(tmpdir(), "microvpc-bench-smoke") : join(dirname(fileURLToPath(import.meta.url)), "..", "results");
  return join(dir, `${kind}-${stamp()}.json`);
}

/** 2026-11-22T10-41-14 (local time), for result file names. */
export function stamp(d = new Date()): string {
  const p = (n: number) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}-${p(d.getMinutes())}-${p(d.getSeconds())}`;
}
