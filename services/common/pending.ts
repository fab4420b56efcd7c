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

/**
 * The fields of a hash of holds whose record is missing: the candidates
 * LUA_SWEEP removes if they are old. A field is read back from Redis, so it
 * names a record key only if it is an id of `kind`; any other field has no
 * record and is a candidate as it is (one with a comma could not be passed).
 */
export async function staleHolds(redis: Redis, hash: string, kind: string, recordOf: (id: string) => string): Promise<StaleHolds> {
  // The time first, with the fields: a record missing now was missing at that time.
  const [readMs, all] = (await redis.eval_ro(READ_HOLDS, 1, hash)) as [number, string[]];
  const ids = all.filter((id) => isId(kind, id));
  const alive = await Promise.all(ids.map((id) => redis.exists(recordOf(id))));
  return {
    ids: [...all.filter((id) => !ids.includes(id) && !id.includes(",")), ...ids.filter((_, i) => alive[i] === 0)],
    cutoff: readMs - PENDING_MS,
  };
}

/** No hold to sweep (a single Redis has none): a cutoff before any hold. */
export const NO_STALE_HOLDS: StaleHolds = { ids: [], cutoff: 0 };
