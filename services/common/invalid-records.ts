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
  /** The hash field (or the record's field the reason names), when known. */
  field?: string;
  /** The VPC the record belongs to, when the reader knows it. */
  vpcId?: string;
  reason: string;
  firstSeenMs: number;
  lastSeenMs: number;
}

const seen = new Map<string, InvalidRecord>();
/** Whoever writes Redis could write a million bad keys: remember this many. */
const MAX_REMEMBERED = 10_000;

/** Where a record was read from, beyond its key: for status RPCs that list skipped records per VPC. */
export interface InvalidWhere {
  field?: string;
  vpcId?: string;
}

/** Skipped a record: log and count it the first time this key (and field) fails for this reason. */
export function reportInvalid(owner: string, kind: string, key: string, reason: string, logger?: Pick<Logger, "warn">, where: InvalidWhere = {}): void {
  const id = `${owner}\n${key}\n${where.field ?? ""}\n${reason}`;
  const now = Date.now();
  const prev = seen.get(id);
  if (prev) {
    prev.lastSeenMs = now;
    // A reader that knows the VPC completes what one that did not left out.
    prev.vpcId ??= where.vpcId;
    return;
  }
  if (seen.size >= MAX_REMEMBERED) seen.delete(seen.keys().next().value!);
  seen.set(id, { owner, kind, key, ...where, reason, firstSeenMs: now, lastSeenMs: now });
  invalidRecordsTotal.inc({ owner, kind });
  // JSON.stringify: the key and reason may hold whatever was written into Redis.
  logger?.warn(
    {
      owner,
      kind,
      key: JSON.stringify(key),
      ...(where.field === undefined ? {} : { field: JSON.stringify(where.field) }),
      ...(where.vpcId === undefined ? {} : { vpc: where.vpcId }),
      reason,
    },
    INVALID_RECORD_MSG,
  );
}

/** The message of reportInvalid's log line (a parent reads its children's: reportChildLine). */
export const INVALID_RECORD_MSG = "skipping a record from Redis that does not validate";

/**
 * A log line of a child process (pino JSON): if it is the child's
 * reportInvalid line, the record is reported here too, so that this
 * process's status RPC and metric hold what its child skipped (the gateway's
 * metadata child has neither). Not logged again: the child's line is in the
 * log already. Returns whether the line was one.
 */
export function reportChildLine(line: string): boolean {
  if (!line.includes(INVALID_RECORD_MSG)) return false;
  let o: Record<string, unknown>;
  try {
    o = JSON.parse(line) as Record<string, unknown>;
  } catch {
    return false;
  }
  if (o === null || typeof o !== "object" || o.msg !== INVALID_RECORD_MSG) return false;
  const str = (v: unknown) => (typeof v === "string" ? v : undefined);
  const unquote = (v: unknown) => {
    try {
      const u = typeof v === "string" ? (JSON.parse(v) as unknown) : undefined;
      return typeof u === "string" ? u : undefined;
    } catch {
      return undefined;
    }
  };
  const [owner, kind, key, reason] = [str(o.owner), str(o.kind), unquote(o.key), str(o.reason)];
  if (owner === undefined || kind === undefined || key === undefined || reason === undefined) return false;
  const vpc = str(o.vpc);
  reportInvalid(owner, kind, key, reason, undefined, { field: unquote(o.field), vpcId: vpc !== undefined && /^vpc-[0-9a-f]{12}$/.test(vpc) ? vpc : undefined });
  return true;
}

/** What reportInvalid has seen (of one owner), for status RPCs; most recently seen first. */
export function invalidRecords(owner?: string | string[]): InvalidRecord[] {
  const owners = owner === undefined ? undefined : new Set([owner].flat());
  return [...seen.values()].filter((r) => !owners || owners.has(r.owner)).sort((a, b) => b.lastSeenMs - a.lastSeenMs);
}
