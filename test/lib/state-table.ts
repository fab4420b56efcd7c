// What the reconcilers' state-table tests (firewall-sync, gateway-sync) share:
// the seeded orders their cases are replayed in, and the golden file of what
// each case leaves in the fakes.
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";

function mulberry32(seed: number): () => number {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Each case twice, in `seeds` seeded random orders (the same orders on every run). */
export function replayOrders<C>(cases: readonly C[], seeds = 25): { seed: number; order: C[] }[] {
  const out: { seed: number; order: C[] }[] = [];
  for (let seed = 1; seed <= seeds; seed++) {
    const rnd = mulberry32(seed);
    out.push({ seed, order: [...cases, ...cases].sort(() => rnd() - 0.5) });
  }
  return out;
}

/** The state of each case (name → dump) against the golden file; UPDATE_GOLDEN=1 rewrites it. */
export function assertGolden(file: string, states: Map<string, string>, what: string): void {
  const text = [...states].map(([name, dump]) => `=== ${name}\n${dump}`).join("");
  if (process.env.UPDATE_GOLDEN) writeFileSync(file, text);
  assert.equal(text, readFileSync(file, "utf8"), `${what} changed: review it, then UPDATE_GOLDEN=1`);
}
