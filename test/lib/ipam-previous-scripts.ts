// The IPAM scripts of the release before the layout move (main at 9b0b249,
// 4 December 2026), verbatim: what a replica of that release still running
// during an upgrade would run. test/integration/ipam-layout.test.ts makes
// the earlier layout with them and checks that, once a subnet has moved
// under its VPC's hash tag, they fail before writing anything.
import { LUA_EMIT } from "../../services/common/events.js";

const CHUNK_BITS = 4096;

const chunkHelpers = `
local CHUNK_BITS = ${CHUNK_BITS}
local CHUNK_BYTES = CHUNK_BITS / 8
local function chunk_range(idx, size)
  local c = math.floor(idx / CHUNK_BITS)
  local sb = c * CHUNK_BYTES
  local eb = math.min(sb + CHUNK_BYTES - 1, size / 8 - 1)
  return c, sb, eb
end
local function refresh_chunk(bits, full, idx, size)
  local c, sb, eb = chunk_range(idx, size)
  local n = redis.call('BITCOUNT', bits, sb, eb)
  if n == (eb - sb + 1) * 8 then
    redis.call('SETBIT', full, c, 1)
  else
    redis.call('SETBIT', full, c, 0)
  end
end
`;

/**
 * KEYS: 1 subnet hash, 2 bits, 3 full, 4 alloc, 5 req, 6 idx zset, 7 used,
 *       8 owner zset, 9 events stream
 * ARGV: 1 owner, 2 request id, 3 wanted index (-1 = lowest free), 4 now ms,
 *       5 subnet id
 * Returns {1, idx} created, {0, idx} existing (retry), or an error table:
 *   {-1, holder} wanted address held by another, {-2} subnet full,
 *   {-3, idx} request id already used for another address, {-4} no subnet,
 *   {-5} wanted address is reserved.
 */
export const ALLOCATE = `${chunkHelpers}
local owner, reqid, wanted, now, sid = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local size = tonumber(redis.call('HGET', KEYS[1], 'size'))
if not size then return {-4, ''} end
local reqkey = owner .. '\\n' .. reqid
local prev = redis.call('HGET', KEYS[5], reqkey)
if prev then
  if wanted >= 0 and tonumber(prev) ~= wanted then return {-3, prev} end
  return {0, prev}
end
local idx
if wanted >= 0 then
  if redis.call('GETBIT', KEYS[2], wanted) == 1 then
    local holder = redis.call('HGET', KEYS[4], wanted)
    if holder then return {-1, holder} end
    return {-5, ''}
  end
  idx = wanted
else
  local nchunks = math.ceil(size / CHUNK_BITS)
  local c = redis.call('BITPOS', KEYS[3], 0)
  if c < 0 or c >= nchunks then return {-2, ''} end
  local _, sb, eb = chunk_range(c * CHUNK_BITS, size)
  idx = redis.call('BITPOS', KEYS[2], 0, sb, eb)
  if idx < 0 or idx >= size then
    -- The summary was stale (cannot happen unless edited by hand): repair it.
    redis.call('SETBIT', KEYS[3], c, 1)
    return {-2, 'summary repaired'}
  end
end
redis.call('SETBIT', KEYS[2], idx, 1)
refresh_chunk(KEYS[2], KEYS[3], idx, size)
redis.call('HSET', KEYS[4], idx, owner .. '\\n' .. reqid .. '\\n' .. now)
redis.call('HSET', KEYS[5], reqkey, idx)
redis.call('ZADD', KEYS[6], idx, idx)
redis.call('INCR', KEYS[7])
redis.call('ZADD', KEYS[8], 0, sid .. '/' .. idx)
redis.call('XADD', KEYS[9], 'MAXLEN', '~', 100000, '*', 'kind', 'ipam.allocated', 'subnet', sid, 'index', idx, 'owner', owner)
return {1, idx}
`;

/**
 * AllocateBatch: count addresses, the lowest free ones, all or nothing.
 * Item i is held under request id "<request id>/<i>" (as if allocated alone).
 * KEYS: as ALLOCATE (1 subnet hash, 2 bits, 3 full, 4 alloc, 5 req, 6 idx
 *       zset, 7 used, 8 owner zset, 9 events stream)
 * ARGV: 1 owner, 2 batch request id, 3 count, 4 now ms, 5 subnet id
 * Returns {1, idx…} created (item order = address order), {0, idx or -1…}
 * a retry (-1 = that item was released since), or an error table:
 *   {-2, free} fewer than count free, {-3} the request id was used for a
 *   larger batch, {-4} no subnet.
 */
export const ALLOCATE_BATCH = `${chunkHelpers}
local owner, reqid, count, now, sid = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local size = tonumber(redis.call('HGET', KEYS[1], 'size'))
if not size then return {-4, ''} end
local base = owner .. '\\n' .. reqid .. '/'
local fields = {}
for i = 0, count - 1 do fields[i + 1] = base .. i end
local prev = redis.call('HMGET', KEYS[5], unpack(fields))
local retry = false
for i = 1, count do if prev[i] then retry = true end end
if retry or redis.call('HEXISTS', KEYS[5], base .. count) == 1 then
  if redis.call('HEXISTS', KEYS[5], base .. count) == 1 then return {-3, ''} end
  local out = {0}
  for i = 1, count do out[i + 1] = prev[i] and tonumber(prev[i]) or -1 end
  return out
end
local reserved = tonumber(redis.call('HGET', KEYS[1], 'extra') or '0') + 3
local free = size - reserved - tonumber(redis.call('GET', KEYS[7]) or '0')
if free < count then return {-2, free} end
local nchunks = math.ceil(size / CHUNK_BITS)
local got = {}
for n = 1, count do
  local c = redis.call('BITPOS', KEYS[3], 0)
  local idx = -1
  if c >= 0 and c < nchunks then
    local _, sb, eb = chunk_range(c * CHUNK_BITS, size)
    idx = redis.call('BITPOS', KEYS[2], 0, sb, eb)
    if idx < 0 or idx >= size then
      redis.call('SETBIT', KEYS[3], c, 1)
      idx = -1
    end
  end
  if idx < 0 then
    -- The used count and the bitmap disagree (edited by hand): undo, nothing allocated.
    for _, j in ipairs(got) do
      redis.call('SETBIT', KEYS[2], j, 0)
      refresh_chunk(KEYS[2], KEYS[3], j, size)
    end
    return {-2, n - 1}
  end
  redis.call('SETBIT', KEYS[2], idx, 1)
  refresh_chunk(KEYS[2], KEYS[3], idx, size)
  got[n] = idx
end
local arec, areq, aidx, aown = {}, {}, {}, {}
for n, idx in ipairs(got) do
  local r = reqid .. '/' .. (n - 1)
  arec[#arec + 1] = idx
  arec[#arec + 1] = owner .. '\\n' .. r .. '\\n' .. now
  areq[#areq + 1] = owner .. '\\n' .. r
  areq[#areq + 1] = idx
  aidx[#aidx + 1] = idx
  aidx[#aidx + 1] = idx
  aown[#aown + 1] = 0
  aown[#aown + 1] = sid .. '/' .. idx
end
redis.call('HSET', KEYS[4], unpack(arec))
redis.call('HSET', KEYS[5], unpack(areq))
redis.call('ZADD', KEYS[6], unpack(aidx))
redis.call('INCRBY', KEYS[7], count)
redis.call('ZADD', KEYS[8], unpack(aown))
for _, idx in ipairs(got) do
  redis.call('XADD', KEYS[9], 'MAXLEN', '~', 100000, '*', 'kind', 'ipam.allocated', 'subnet', sid, 'index', idx, 'owner', owner)
end
local out = {1}
for n, idx in ipairs(got) do out[n + 1] = idx end
return out
`;

/**
 * KEYS: 1 subnet hash, 2 bits, 3 full, 4 alloc, 5 req, 6 idx zset, 7 used,
 *       8 events stream
 * ARGV: 1 index (-1 = look up by owner+request id), 2 owner ('' = any),
 *       3 request id, 4 subnet id, 5 owner-key prefix, 6 expected alloc
 *       time ('' = any; Reclaim's compare-and-release)
 * Returns {1, idx} released, {0, ''} nothing held, {-1, holder} held by
 * another owner, {-4} no subnet, {-6, record} changed since it was read.
 */
export const RELEASE = `${chunkHelpers}
local idx, owner, reqid, sid, okp, expect = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local size = tonumber(redis.call('HGET', KEYS[1], 'size'))
if not size then return {-4, ''} end
if idx < 0 then
  local found = redis.call('HGET', KEYS[5], owner .. '\\n' .. reqid)
  if not found then return {0, ''} end
  idx = tonumber(found)
end
local rec = redis.call('HGET', KEYS[4], idx)
if not rec then return {0, ''} end
local nl1 = string.find(rec, '\\n', 1, true)
local nl2 = string.find(rec, '\\n', nl1 + 1, true)
local holder = string.sub(rec, 1, nl1 - 1)
local hreq = string.sub(rec, nl1 + 1, nl2 - 1)
local htime = string.sub(rec, nl2 + 1)
if owner ~= '' and holder ~= owner then return {-1, holder} end
if expect ~= '' and htime ~= expect then return {-6, rec} end
redis.call('SETBIT', KEYS[2], idx, 0)
refresh_chunk(KEYS[2], KEYS[3], idx, size)
redis.call('HDEL', KEYS[4], idx)
redis.call('HDEL', KEYS[5], holder .. '\\n' .. hreq)
redis.call('ZREM', KEYS[6], idx)
redis.call('DECR', KEYS[7])
-- The owner index key is derived from the record, so it cannot be declared
-- up front: microvpc supports single-instance Redis and Sentinel, not Cluster.
redis.call('ZREM', okp .. holder, sid .. '/' .. idx)
redis.call('XADD', KEYS[8], 'MAXLEN', '~', 100000, '*', 'kind', 'ipam.released', 'subnet', sid, 'index', idx, 'owner', holder)
return {1, idx}
`;

/**
 * KEYS: 1 subnet hash, 2 vpc subnets zset, 3 vpc subnet byname, 4 bits,
 *       5 full, 6 used, 7 alloc, 8 req, 9 idx, 10 events, 11 all-subnets zset,
 *       12 the firewall's subnet → ACL hash, 13 the gateway's VPC → NAT hash
 * ARGV: 1 id
 * Returns {1} deleted, {0} absent, {-1, n} n addresses still allocated,
 * {-2, what} a network ACL is associated or the VPC's NAT gateway sits in it.
 */
export const DELETE_SUBNET = `${LUA_EMIT}
local name = redis.call('HGET', KEYS[1], 'name')
if not name then return {0, ''} end
local used = tonumber(redis.call('GET', KEYS[6]) or '0')
if used > 0 then return {-1, used} end
local vpc = redis.call('HGET', KEYS[1], 'vpc')
local acl = redis.call('HGET', KEYS[12], ARGV[1])
if acl then return {-2, 'network ACL ' .. acl .. ' is associated with it (microvpc acl disassociate)'} end
local nat = redis.call('HGET', KEYS[13], vpc)
if nat and redis.call('HGET', 'mvpc:gw:nat:' .. nat, 'subnet') == ARGV[1] then
  return {-2, 'NAT gateway ' .. nat .. ' sits in it (microvpc nat delete)'}
end
redis.call('DEL', KEYS[1], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], name)
redis.call('ZREM', KEYS[11], ARGV[1])
redis.call('XADD', KEYS[10], 'MAXLEN', '~', 100000, '*', 'kind', 'subnet.deleted', 'vpc', vpc, 'subnet', ARGV[1])
mvpc_scoped({vpc}, {}, 'kind', 'subnet.deleted', 'vpc', vpc, 'subnet', ARGV[1])
return {1, ''}
`;
