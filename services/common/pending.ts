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
 * Lua: sweep(hash, ids, pending_ms) removes from a hash of holds the entries
 * `ids` (comma-separated, found without a record by the caller) that are
 * pending_ms old by the server's clock (their JSON's `ms`); an entry that
 * does not read as a hold is left (the script reading the hash refuses it,
 * and it is reported).
 */
export const LUA_SWEEP = `${LUA_SERVER_MS}
local function sweep(hash, ids, pending_ms)
  local now = server_ms()
  for sid in string.gmatch(ids, '[^,]+') do
    local raw = redis.call('HGET', hash, sid)
    if raw then
      local ok, r = pcall(cjson.decode, raw)
      if ok and type(r) == 'table' and type(r.ms) == 'number' and r.ms < now - pending_ms then redis.call('HDEL', hash, sid) end
    end
  end
end
`;

/**
 * The fields of a hash of holds whose record is missing: the candidates
 * LUA_SWEEP removes if they are old. A field is read back from Redis, so it
 * names a record key only if it is an id of `kind`; any other field has no
 * record and is a candidate as it is (one with a comma could not be passed).
 */
export async function staleHolds(redis: Redis, hash: string, kind: string, recordOf: (id: string) => string): Promise<string[]> {
  const all = await redis.hkeys(hash);
  const ids = all.filter((id) => isId(kind, id));
  const alive = await Promise.all(ids.map((id) => redis.exists(recordOf(id))));
  return [...all.filter((id) => !ids.includes(id) && !id.includes(",")), ...ids.filter((_, i) => alive[i] === 0)];
}
