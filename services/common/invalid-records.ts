// Records read back from Redis are input: a reader that finds one its
// schema refuses skips it and reports it here. Each (key, reason) is logged
// once and counted once, so a bad record left in Redis neither floods the
// log nor inflates the metric on every pass; the rest keeps converging.
import type { Logger } from "pino";
import { Counter } from "prom-client";
import { metricsRegistry } from "./metrics.js";

export const invalidRecordsTotal = new Counter({
  name: "microvpc_invalid_records_total",
  help: "Records read from Redis that their schema refused and that were skipped, by owner and kind (each key and reason once).",
  labelNames: ["owner", "kind"] as const,
  registers: [metricsRegistry],
});

export interface InvalidRecord {
  owner: string;
  kind: string;
  key: string;
  reason: string;
  firstSeenMs: number;
  lastSeenMs: number;
}

const seen = new Map<string, InvalidRecord>();
/** Whoever writes Redis could write a million bad keys: remember this many. */
const MAX_REMEMBERED = 10_000;

/** Skipped a record: log and count it the first time this key fails for this reason. */
export function reportInvalid(owner: string, kind: string, key: string, reason: string, logger?: Pick<Logger, "warn">): void {
  const id = `${owner}\n${key}\n${reason}`;
  const now = Date.now();
  const prev = seen.get(id);
  if (prev) {
    prev.lastSeenMs = now;
    return;
  }
  if (seen.size >= MAX_REMEMBERED) seen.delete(seen.keys().next().value!);
  seen.set(id, { owner, kind, key, reason, firstSeenMs: now, lastSeenMs: now });
  invalidRecordsTotal.inc({ owner, kind });
  // JSON.stringify: the key and reason may hold whatever was written into Redis.
  logger?.warn({ owner, kind, key: JSON.stringify(key), reason }, "skipping a record from Redis that does not validate");
}

/** What reportInvalid has seen (of one owner), for status RPCs; most recently seen first. */
export function invalidRecords(owner?: string): InvalidRecord[] {
  return [...seen.values()].filter((r) => !owner || r.owner === owner).sort((a, b) => b.lastSeenMs - a.lastSeenMs);
}
