// Lua scripts of every DNS change: each check (the VPC exists, the name's
// owner, the resolver address is free) and its write happen in one script,
// so two callers racing for a name, or a record racing a DeleteVpc, cannot
// interleave. Each change appends an event with the VPC id (empty for the
// defaults): `dns.record` with the names it changed (resolvers read those
// again, dns/host.ts) or `dns.config` (the gateway too: the resolver address
// is in its nft rules), so every hypervisor follows by itself.
//
// A record is one hash field, name → "address\nttl\nowner\nupdated_ms"; a
// lex zset of names gives ordered pages, a lex zset of "owner\nname" finds an
// owner's records. All keys of a VPC are fixed per VPC, so DeleteVpc can
// remove them in its own script (see ipam/scripts.ts DELETE_VPC, DROP_VPC).
// On a Redis Cluster the keys are under the VPC's hash tag (schema.ts
// DK_CLUSTER), beside IPAM's record of it, and each script announces its
// change on its own slot's stream (common/events.ts scriptFor).
import { LUA_EMIT } from "../common/events.js";

const EVENT = (kind: string, vpc: string) => `mvpc_emit({${vpc}}, {}, 'kind', '${kind}', 'vpc', ${vpc})`;

/**
 * How many names a `dns.record` event lists at most. The resolvers patch
 * those names in their zone (dns/host.ts) instead of reading the whole zone
 * again; a change of more names (DeleteDnsRecords of an owner's many) says
 * none and they reload the zone.
 */
export const EVENT_NAMES_MAX = 64;

/** A `dns.record` event naming the records that changed (Lua table `names`), comma-separated: a name is a DNS label. */
const RECORD_EVENT = (vpc: string, names: string) =>
  `if #${names} <= ${EVENT_NAMES_MAX} then mvpc_emit({${vpc}}, {}, 'kind', 'dns.record', 'vpc', ${vpc}, 'names', table.concat(${names}, ',')) else ${EVENT("dns.record", vpc)} end`;

/**
 * KEYS: 1 vpc hash, 2 records hash, 3 names zset, 4 owners zset
 * ARGV: 1 vpc id, 2 name, 3 owner, 4 address, 5 ttl, 6 now ms
 * Returns {1, ''} created, {0, ''} replaced (or unchanged), {-1, holder}
 * held by another owner, {-4, ''} no such VPC.
 */
export const SET_RECORD = `${LUA_EMIT}
if redis.call('EXISTS', KEYS[1]) == 0 then return {-4, ''} end
-- On a cluster a VPC is named a moment before its create keeps its record
-- (ipam/store.ts createVpc): what is made in it keeps it.
redis.call('PERSIST', KEYS[1])
local vpc, name, owner, addr, ttl, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local prev = redis.call('HGET', KEYS[2], name)
if prev then
  local a, t, o = string.match(prev, '^([^\\n]*)\\n([^\\n]*)\\n([^\\n]*)\\n')
  if o ~= owner then return {-1, o} end
  if a == addr and t == ttl then return {0, ''} end
end
redis.call('HSET', KEYS[2], name, addr .. '\\n' .. ttl .. '\\n' .. owner .. '\\n' .. now)
redis.call('ZADD', KEYS[3], 0, name)
redis.call('ZADD', KEYS[4], 0, owner .. '\\n' .. name)
${RECORD_EVENT("vpc", "{name}")}
if prev then return {0, ''} end
return {1, ''}
`;

/**
 * KEYS: 1 records hash, 2 names zset, 3 owners zset
 * ARGV: 1 vpc id, 2 name ('' = every record of owner), 3 owner ('' = any)
 * Returns {1, names...} deleted, {0} nothing to delete, {-1, holder} the
 * name is held by another owner than the one given.
 */
export const DELETE_RECORDS = `${LUA_EMIT}
local vpc, name, owner = ARGV[1], ARGV[2], ARGV[3]
local names = {}
if name ~= '' then
  local prev = redis.call('HGET', KEYS[1], name)
  if not prev then return {0} end
  local o = string.match(prev, '^[^\\n]*\\n[^\\n]*\\n([^\\n]*)\\n')
  if owner ~= '' and o ~= owner then return {-1, o} end
  redis.call('ZREM', KEYS[3], o .. '\\n' .. name)
  names[1] = name
else
  local members = redis.call('ZRANGEBYLEX', KEYS[3], '[' .. owner .. '\\n', '(' .. owner .. '\\v')
  for _, m in ipairs(members) do
    names[#names + 1] = string.sub(m, #owner + 2)
    redis.call('ZREM', KEYS[3], m)
  end
  if #names == 0 then return {0} end
end
for _, n in ipairs(names) do
  redis.call('HDEL', KEYS[1], n)
  redis.call('ZREM', KEYS[2], n)
end
${RECORD_EVENT("vpc", "names")}
local out = {1}
for _, n in ipairs(names) do out[#out + 1] = n end
return out
`;

/**
 * KEYS: 1 vpc hash ('' key name unused for the defaults), 2 config hash,
 *       3 vpc subnets zset (score = base)
 * ARGV: 1 vpc id ('' = defaults), 2 resolver ('' = unchanged),
 *       3 resolver as integer, 4 forwarders: 'keep' | 'set' | 'inherit',
 *       5 forwarders JSON, 6 ttl ('' = unchanged), 7 now ms, 8 the VPC's
 *       subnet records' name less the id (ipam IpamKeys.subnetIn(vpc, ""))
 * Returns {1, ''} changed, {-2, holder} a NIC (allocation) holds the
 * resolver address, {-3, subnet} it is a subnet's network or broadcast
 * address, {-4, ''} no such VPC, {-5, ''} the VPC's subnet index holds an
 * entry that is not a subnet id (nothing changed).
 */
export const UPDATE_CONFIG = `${LUA_EMIT}
local vpc, resolver, rint, fmode, fjson, ttl, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6], ARGV[7]
if vpc ~= '' and redis.call('EXISTS', KEYS[1]) == 0 then return {-4, ''} end
if vpc ~= '' then redis.call('PERSIST', KEYS[1]) end
if resolver ~= '' then
  local sn = redis.call('ZREVRANGEBYSCORE', KEYS[3], rint, '-inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #sn > 0 then
    -- Read back from Redis, it names keys below only if it is a subnet id.
    if not string.match(sn[1], '^subnet%-[0-9a-f]+$') then return {-5, ''} end
    local base = tonumber(sn[2])
    local size = tonumber(redis.call('HGET', ARGV[8] .. sn[1], 'size') or '0')
    if rint < base + size then
      local idx = rint - base
      if idx == 0 or idx == size - 1 then return {-3, sn[1]} end
      local holder = redis.call('HGET', 'mvpc:{' .. vpc .. '}:sn:' .. sn[1] .. ':alloc', idx)
      if holder then return {-2, string.match(holder, '^[^\\n]*')} end
    end
  end
  redis.call('HSET', KEYS[2], 'resolver', resolver)
end
if fmode == 'set' then redis.call('HSET', KEYS[2], 'forwarders', fjson) end
if fmode == 'inherit' then redis.call('HDEL', KEYS[2], 'forwarders') end
if ttl ~= '' then redis.call('HSET', KEYS[2], 'ttl', ttl) end
redis.call('HSET', KEYS[2], 'updated', now)
${EVENT("dns.config", "vpc")}
return {1, ''}
`;
