// A create on a Redis Cluster whose record lives in another slot than the
// VPC it concerns writes a *hold* in the VPC's slot first (keyed by the new
// record's id, with the time it was made by the Redis server's clock), then
// its record in its own slot; a delete in the VPC's slot refuses while a
// hold stands. A create that stopped between its two steps leaves a hold
// without a record: the delete removes it once it is PENDING_MS old, the
// caller having found no record for it (staleHolds). Peerings reserve their
// range this way (peering/store.ts), NAT gateways their subnet
// (gateway/store.ts); the hashes are theirs, the rule is this one.
import type { Redis } from "ioredis";
import { DomainError, FailedPreconditionError, UnavailableError } from "./errors.js";
import { isId } from "./ids.js";
import { LUA_SERVER_MS } from "./redis.js";

/**
 * How old a hold without a record must be, by the Redis server's clock,
 * before it counts as stale: what a create that stopped between its steps
 * left (one under way takes well under this, and gives up past half of it).
 */
export const PENDING_MS = 60_000;

/**
 * Lua: sweep(hash, ids, cutoff) removes from a hash of holds the entries
 * `ids` (comma-separated, found without a record by the caller) made before
 * `cutoff` (server ms; staleHolds: PENDING_MS before the moment the caller
 * read the hash, by the server's clock). So a hold goes only if it was
 * already PENDING_MS old when its record was seen missing, however long the
 * caller took since: its create had then given up (it gives up past
 * PENDING_MS/2), and a record written after that read is taken back by it.
 * Judged by the time of the sweep instead, a delete that stalled after its
 * read could remove the hold of a create that wrote its record meanwhile.
 * An entry that does not read as a hold is left (the script reading the
 * hash refuses it, and it is reported).
 */
export const LUA_SWEEP = `
local function sweep(hash, ids, cutoff)
  for sid in string.gmatch(ids, '[^,]+') do
    local raw = redis.call('HGET', hash, sid)
    if raw then
      local ok, r = pcall(cjson.decode, raw)
      if ok and type(r) == 'table' and type(r.ms) == 'number' and r.ms == r.ms and r.ms < cutoff then redis.call('HDEL', hash, sid) end
    end
  end
end
`;

/** The hash's fields and the server's time, read together (read-only: per-host ACL users may run it). */
const READ_HOLDS = `${LUA_SERVER_MS}
return {server_ms(), redis.call('HKEYS', KEYS[1])}
`;

/** What staleHolds found: the candidates, and the cutoff LUA_SWEEP judges them by. */
export interface StaleHolds {
  ids: string[];
  /** PENDING_MS before the hash was read, by the server's clock. */
  cutoff: number;
}

/** A hash of holds, for a person: what it is ("the VPC's NAT gateway holds") and how to repair it if it holds another Redis type. */
export interface HoldsName {
  what: string;
  repair: string;
}

/**
 * For a command on a hash of holds (`.catch(wrongTypeOf(hash, name))`): a
 * WRONGTYPE reply (the key holds another Redis type than a hash) as
 * FAILED_PRECONDITION naming the key and its repair, instead of the raw
 * reply; any other error as it is.
 */
export function wrongTypeOf(hash: string, name: HoldsName): (err: unknown) => never {
  return (err) => {
    if (err instanceof Error && /WRONGTYPE/.test(err.message))
      throw new FailedPreconditionError(
        `${name.what} (${hash}) holds another Redis type than its schema says (a hash); nothing was changed: ${name.repair}, then retry`,
        { cause: err },
      );
    throw err;
  };
}

/**
 * The fields of a hash of holds whose record is missing: the candidates
 * LUA_SWEEP removes if they are old. A field is read back from Redis, so it
 * names a record key only if it is an id of `kind`; any other field has no
 * record and is a candidate as it is (one with a comma could not be passed).
 * A key of another type is refused, naming it (wrongTypeOf).
 */
export async function staleHolds(redis: Redis, hash: string, kind: string, recordOf: (id: string) => string, name: HoldsName): Promise<StaleHolds> {
  // The time first, with the fields: a record missing now was missing at that time.
  const [readMs, all] = (await redis.eval_ro(READ_HOLDS, 1, hash).catch(wrongTypeOf(hash, name))) as [number, string[]];
  const ids = all.filter((id) => isId(kind, id));
  const alive = await Promise.all(ids.map((id) => redis.exists(recordOf(id))));
  return {
    ids: [...all.filter((id) => !ids.includes(id) && !id.includes(",")), ...ids.filter((_, i) => alive[i] === 0)],
    cutoff: readMs - PENDING_MS,
  };
}

/** No hold to sweep (a single Redis has none): a cutoff before any hold. */
export const NO_STALE_HOLDS: StaleHolds = { ids: [], cutoff: 0 };

/**
 * When a create began to hold, on two clocks: this process's monotonic
 * clock (performance.now(), which no wall-clock step moves) and the wall
 * clock (Date.now(), which runs on while the host or its VM is suspended
 * or paused, when the monotonic clock stops but the Redis server's clock,
 * by which a hold's age is judged, does not).
 */
export interface HoldClock {
  mono: number;
  wall: number;
}

/** Now, on both clocks: taken before a create writes its first hold. */
export function holdClock(): HoldClock {
  return { mono: performance.now(), wall: Date.now() };
}

/** What recordUnderHold needs of a create besides its record step. */
export interface UnderHold<T> {
  /** What is being created, for the messages: "the NAT gateway", "peering pcx-…". */
  what: string;
  /** holdClock() taken before the create wrote its first hold. */
  heldAt: HoldClock;
  /** Whether the step's result is a record this create wrote (not a refusal, nor another create's record answered by client token). */
  wrote: (result: T) => boolean;
  /** Removes this create's holds; nothing of it was written. A failure is ignored: a hold without a record is swept once PENDING_MS old. */
  release: () => Promise<void>;
  /** Removes the record this create wrote or may have written, if it is there, then its holds. */
  takeBack: () => Promise<void>;
  /**
   * Past the deadline, before taking back: the record this create wrote (as
   * the step's result would give it), if it is there and its holds could
   * be written afresh now by the script that wrote them, which refuses
   * whatever they keep out (NAT gateways: HOLD_NAT writes only while the
   * subnet stands; peerings: RESERVE only while the VPC stands and no other
   * entry overlaps the range), or null. A record so held is kept: a retry
   * with the same client token may have been answered with it meanwhile,
   * and the sweep that could have passed the old hold by is over (what it
   * let in would have made the new hold fail). Null, or a keep that fails:
   * taken back, holds written afresh included. Unset: always taken back.
   */
  keep?: () => Promise<T | null>;
  /** The command a person runs to remove the record when takeBack failed: "microvpc nat delete nat-…". */
  undo: string;
}

/**
 * The second step of a create that holds in one slot and writes its record
 * in another: `step` writes the record, and its outcome is judged by the
 * hold's deadline, PENDING_MS/2 after `heldAt` (past it, another client may
 * find the hold PENDING_MS old by the server's clock with no record yet,
 * and sweep it, then make what the hold kept out). The rule, for every
 * such create (peerings, NAT gateways):
 * - past the deadline before the step: nothing is written, the holds go,
 *   UNAVAILABLE "retry";
 * - the step refused (a DomainError: it answered, nothing of this create
 *   was written) or answered with what is not this create's record: the
 *   holds go, and the error or result is the caller's;
 * - the step wrote the record within the deadline: the result;
 * - the step wrote the record past the deadline, or failed without an
 *   answer (a timeout, a lost connection: the record may have been
 *   written) past it: the record if `keep` holds it afresh; else what it
 *   may have written is taken back (record, then holds), and UNAVAILABLE
 *   "nothing was kept, retry"; if that fails too, UNAVAILABLE naming the
 *   command that removes it (`undo`);
 * - the step failed without an answer within the deadline: the error, and
 *   the holds stay (a record written must keep them; without one they are
 *   swept once old).
 * The deadline is measured from before the hold was written, on this
 * process's monotonic clock and on its wall clock, and passes when either
 * says so: the monotonic clock stands still while the host is suspended
 * (or its VM paused), which the server's clock does not; the wall clock
 * may be stepped back, which the monotonic one is not. So it passes no
 * later than the hold's age by the server's clock (which counts from when
 * the hold was written) reaches PENDING_MS/2, unless this host's wall
 * clock is stepped back while it is suspended. A wall clock stepped
 * forward only makes a create give up, or keep, early.
 */
export async function recordUnderHold<T>(step: () => Promise<T>, o: UnderHold<T>): Promise<T> {
  const late = () => Math.max(performance.now() - o.heldAt.mono, Date.now() - o.heldAt.wall) > PENDING_MS / 2;
  const release = () => o.release().catch(() => undefined);
  const s = PENDING_MS / 2000;
  if (late()) {
    await release();
    throw new UnavailableError(`creating ${o.what} took over ${s} s between its steps; nothing was created, retry`);
  }
  let result: T;
  let failed = "";
  try {
    result = await step();
  } catch (err) {
    if (err instanceof DomainError) {
      await release();
      throw err;
    }
    if (!late()) throw err;
    failed = ` and its record's step failed without an answer (${errorMessage(err)})`;
  }
  if (!failed) {
    if (!o.wrote(result!)) {
      await release();
      return result!;
    }
    if (!late()) return result!;
  }
  // The hold could pass for stale by now: what was written may have been made while it was gone.
  const kept = o.keep ? await o.keep().catch(() => null) : null;
  if (kept !== null) return kept;
  try {
    await o.takeBack();
  } catch (err) {
    throw new UnavailableError(
      `creating ${o.what} took over ${s} s between its steps${failed}, and taking back what it may have written failed (${errorMessage(err)}): remove it once Redis answers (${o.undo}), then retry`,
    );
  }
  throw new UnavailableError(
    `creating ${o.what} took over ${s} s between its steps${failed}: its hold could have passed for stale meanwhile, so what it wrote was taken back; nothing was kept, retry`,
  );
}

function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
