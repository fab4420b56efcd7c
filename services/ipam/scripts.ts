// The Lua scripts that make every IPAM change atomic. Each runs as one Redis
// script: another client sees all of it or none of it, and with
// appendfsync=always it is on disk before the caller hears back.
//
// Allocation bitmaps: bit i of `bits` is address base+i (1 = held or
// reserved). So that finding a free address costs the same on an empty /28 as
// on a nearly full /8, a summary bitmap `full` keeps one bit per 4096-address
// chunk (1 = chunk full). An allocation is: BITPOS over the summary (at most
// 512 bytes for a /8), BITPOS inside one chunk (512 bytes), SETBIT, and a
// BITCOUNT of that chunk (512 bytes) to keep the summary right.
//
// Error replies are tables {code, detail}: negative codes are domain errors
// the TypeScript side turns into gRPC statuses.
import { LUA_TOKEN, TOKEN_MOVED } from "../common/client-token.js";
import { DELETED_VPC_STREAM_TTL_MS, LUA_EMIT } from "../common/events.js";
import { LUA_RANGE_CHECKS } from "./schema.js";
import { LUA_SWEEP, PENDING_MS } from "../common/pending.js";

export const CHUNK_BITS = 4096;

/**
 * What a tombstone holds: the string left at a subnet's req and alloc, and
 * the field of the hash left at its used counter, under an earlier
 * release's names. Each has the wrong type for that release's scripts (a
 * hash read of a string, a GET of a hash), whose first command on it fails
 * with WRONGTYPE before any write: a replica of that release still running
 * during an upgrade can neither allocate from an empty bitmap nor delete a
 * subnet whose addresses it cannot see.
 */
export const TOMBSTONE = "moved under the VPC hash tag mvpc:{<vpc>}:sn:<subnet>:* (docs/redis-schema.md)";

const LUA_TOMBSTONES = `
local function tombstone(req, alloc, used)
  redis.call('SET', req, '${TOMBSTONE}')
  redis.call('SET', alloc, '${TOMBSTONE}')
  redis.call('HSET', used, 'moved', '${TOMBSTONE}')
end
`;

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
 * One allocation, as ALLOCATE and ALLOCATE_MANY make it: KEYS[1..6] are the
 * subnet's state (the caller has checked that KEYS[1] exists), ownerkey the
 * owner's index, events the global stream or nil (a cluster). Returns
 * ALLOCATE's reply table.
 */
const LUA_ALLOC_ONE = `
local function alloc_one(ownerkey, events, owner, reqid, wanted, now, sid, size)
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
  -- The one key of the call's own that is written: of another type, the writes below would stop half-way.
  local ot = redis.call('TYPE', ownerkey).ok
  if ot ~= 'zset' and ot ~= 'none' then return {-6, ot} end
  redis.call('SETBIT', KEYS[2], idx, 1)
  refresh_chunk(KEYS[2], KEYS[3], idx, size)
  redis.call('HSET', KEYS[4], idx, owner .. '\\n' .. reqid .. '\\n' .. now)
  redis.call('HSET', KEYS[5], reqkey, idx)
  redis.call('ZADD', KEYS[6], idx, idx)
  redis.call('INCR', KEYS[1])
  redis.call('ZADD', ownerkey, 0, sid .. '/' .. idx)
  if events then
    redis.call('XADD', events, 'MAXLEN', '~', 100000, '*', 'kind', 'ipam.allocated', 'subnet', sid, 'index', idx, 'owner', owner)
  end
  return {1, idx}
end
`;

/**
 * KEYS: 1 used counter, 2 bits, 3 full, 4 alloc, 5 req, 6 idx zset, 7 owner
 *       zset, all under the VPC's hash tag (one slot); 8 the global events
 *       stream, only on a single Redis (ALLOC_EVENTS_KEY)
 * ARGV: 1 owner, 2 request id, 3 wanted index (-1 = lowest free), 4 now ms,
 *       5 subnet id, 6 subnet size
 * The subnet's size comes from its record, read and validated by the caller
 * (it never changes); the used counter, which CreateSubnet makes and
 * DeleteSubnet removes with the bitmaps, stands for the subnet here.
 * Returns {1, idx} created, {0, idx} existing (retry), or an error table:
 *   {-1, holder} wanted address held by another, {-2} subnet full,
 *   {-3, idx} request id already used for another address, {-4} no
 *   allocation state under this name (the subnet was deleted, or its state
 *   is still under an earlier release's names: IpamStore moves it),
 *   {-5} wanted address is reserved, {-6, type} the owner's index (KEYS[7])
 *   is of another Redis type (nothing written).
 */
export const ALLOCATE = `${chunkHelpers}${LUA_ALLOC_ONE}
if redis.call('EXISTS', KEYS[1]) == 0 then return {-4, ''} end
return alloc_one(KEYS[7], KEYS[8], ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], tonumber(ARGV[6]))
`;

/** The most Allocate calls IPAM answers with one ALLOCATE_MANY (the script runs for about 20 µs an address, Redis doing nothing else meanwhile). */
export const MAX_ALLOCATE_MANY = 64;

/**
 * n Allocate calls of one subnet, each as if ALLOCATE ran alone, one after
 * the other in the order given: what IPAM runs for the calls that arrive
 * together (service.ts). Items are independent: one item's error table
 * does not undo another's allocation, as separate calls would not.
 * KEYS: 1–6 as ALLOCATE; 7 … 6+n the owner index of each item; 7+n the
 *       global events stream, only on a single Redis
 * ARGV: 1 n, 2 subnet id, 3 subnet size, then per item i (from 0) at
 *       4+4i owner, 5+4i request id, 6+4i wanted index, 7+4i now ms
 * Returns {1, code, detail, code, detail, …} (each item's pair as ALLOCATE
 * returns it), or {-4} with nothing done (no allocation state under this
 * name, as ALLOCATE).
 */
export const ALLOCATE_MANY = `${chunkHelpers}${LUA_ALLOC_ONE}
local n, sid, size = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 0 then return {-4} end
local events = KEYS[7 + n]
local out = {1}
for i = 0, n - 1 do
  local a = 4 + 4 * i
  local r = alloc_one(KEYS[7 + i], events, ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3], sid, size)
  out[#out + 1] = r[1]
  out[#out + 1] = r[2]
end
return out
`;

/** The most addresses one AllocateBatch hands out. */
export const MAX_BATCH = 1024;

/**
 * AllocateBatch: count addresses, the lowest free ones, all or nothing.
 * Item i is held under request id "<request id>/<i>" (as if allocated alone).
 * KEYS: as ALLOCATE (1 used counter, 2 bits, 3 full, 4 alloc, 5 req, 6 idx
 *       zset, 7 owner zset; 8 events stream on a single Redis)
 * ARGV: 1 owner, 2 batch request id, 3 count, 4 now ms, 5 subnet id,
 *       6 subnet size, 7 extra reserved addresses (both from its record)
 * Returns {1, idx…} created (item order = address order), {0, idx or -1…}
 * a retry (-1 = that item was released since), or an error table:
 *   {-2, free} fewer than count free, {-3} the request id was used for a
 *   larger batch, {-4} no allocation state under this name (as ALLOCATE).
 */
export const ALLOCATE_BATCH = `${chunkHelpers}
local owner, reqid, count, now, sid, size = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], tonumber(ARGV[6])
if redis.call('EXISTS', KEYS[1]) == 0 then return {-4, ''} end
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
local reserved = tonumber(ARGV[7]) + 3
local free = size - reserved - tonumber(redis.call('GET', KEYS[1]) or '0')
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
redis.call('INCRBY', KEYS[1], count)
redis.call('ZADD', KEYS[7], unpack(aown))
if KEYS[8] then
  for _, idx in ipairs(got) do
    redis.call('XADD', KEYS[8], 'MAXLEN', '~', 100000, '*', 'kind', 'ipam.allocated', 'subnet', sid, 'index', idx, 'owner', owner)
  end
end
local out = {1}
for n, idx in ipairs(got) do out[n + 1] = idx end
return out
`;

/**
 * KEYS: 1 used counter, 2 bits, 3 full, 4 alloc, 5 req, 6 idx zset, 7 the
 *       owner zset of ARGV[7], all under the VPC's hash tag; on a single
 *       Redis 8 the events stream and 9 the holder's owner zset under the
 *       earlier name (its entry, if a move of the subnet has not reached it
 *       yet, goes with the allocation: MIGRATE_SUBNET)
 * ARGV: 1 index (-1 = look up by owner+request id), 2 owner ('' = any),
 *       3 request id, 4 subnet id, 5 subnet size, 6 expected alloc time
 *       ('' = any; Reclaim's compare-and-release), 7 the holder KEYS[7] is
 *       the owner index of
 * Returns {1, idx} released, {0, ''} nothing held, {-1, holder} held by
 * another owner, {-4} no allocation state under this name (as ALLOCATE),
 * {-6, record} changed since it was read, {-7, holder} held by holder,
 * whose owner index is not KEYS[7]: call again with it (the caller names
 * the index it expects, so that every key is declared).
 */
export const RELEASE = `${chunkHelpers}
local idx, owner, reqid, sid, size, expect = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
if redis.call('EXISTS', KEYS[1]) == 0 then return {-4, ''} end
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
if holder ~= ARGV[7] then return {-7, holder} end
redis.call('SETBIT', KEYS[2], idx, 0)
refresh_chunk(KEYS[2], KEYS[3], idx, size)
redis.call('HDEL', KEYS[4], idx)
redis.call('HDEL', KEYS[5], holder .. '\\n' .. hreq)
redis.call('ZREM', KEYS[6], idx)
redis.call('DECR', KEYS[1])
redis.call('ZREM', KEYS[7], sid .. '/' .. idx)
if KEYS[9] then redis.call('ZREM', KEYS[9], sid .. '/' .. idx) end
if KEYS[8] then
  redis.call('XADD', KEYS[8], 'MAXLEN', '~', 100000, '*', 'kind', 'ipam.released', 'subnet', sid, 'index', idx, 'owner', holder)
end
return {1, idx}
`;

/**
 * A VPC's name (and client token) in the catalog, the second step of
 * CreateVpc: its record is written first, in its own slot, so that a name
 * never names a VPC that was not made (IpamStore.createVpc).
 * KEYS: 1 byname hash, 2 names zset, 3 tokens hash (IpamKeys: one slot);
 *       on a single Redis 4 the VPC's record, whose expiry goes in the same
 *       step (on a cluster it is in another slot: the caller removes it next,
 *       and the creates that take the VPC remove it too)
 * ARGV: 1 id, 2 name, 3 client token field ('' none), 4 the id the token
 *       named when read ('' none), 5 '1' if that id's record existed then,
 *       6 the holder of the name when read if its record was gone then ('':
 *       none, or alive; a name a deleted VPC left, or a forged one, is taken
 *       over, never a live one)
 * Returns {1, id} claimed, {0, id} the token names a live VPC (this create
 * is a retry), {-1, holder} the name is taken, {TOKEN_MOVED} the token names
 * another VPC than was read (read again).
 */
export const CLAIM_VPC = `
local id, name, field, seen, alive, stale = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if field ~= '' then
  local prev = redis.call('HGET', KEYS[3], field) or ''
  if prev ~= seen then return {${TOKEN_MOVED}, ''} end
  if prev ~= '' and alive == '1' then return {0, prev} end
end
local holder = redis.call('HGET', KEYS[1], name)
if holder and holder ~= stale then return {-1, holder} end
redis.call('HSET', KEYS[1], name, id)
redis.call('ZADD', KEYS[2], 0, name)
if field ~= '' then redis.call('HSET', KEYS[3], field, id) end
if KEYS[4] then redis.call('PERSIST', KEYS[4]) end
return {1, id}
`;

/**
 * Frees a VPC's name in the catalog if it still names that VPC: the last
 * step of DeleteVpc on a cluster, and what a CreateVpc that lost does not
 * need (it never claimed).
 * KEYS: 1 byname hash, 2 names zset; ARGV: 1 name, 2 id. Returns 1 freed, 0 not held.
 */
export const UNCLAIM_VPC = `
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
`;

/** What of the firewall a VPC still has (its security groups' and network ACLs' listings): DeleteVpc refuses while any is left. */
const LUA_FIREWALL_LEFT = `
local function firewall_left(sgs_key, acls_key)
  local left = {}
  local sgs = redis.call('ZCARD', sgs_key)
  if sgs > 0 then left[#left + 1] = sgs .. ' security group(s)' end
  local acls = redis.call('ZCARD', acls_key)
  if acls > 0 then left[#left + 1] = acls .. ' network ACL(s)' end
  return left
end
`;

/**
 * DeleteVpc on a cluster, in the VPC's slot: the record and IPAM's indexes
 * of the VPC, if it has no subnet, no peering and no security group or
 * network ACL (the firewall keeps those under the VPC's tag there). The
 * gateway's NAT gateway index is in another slot: the caller checks it
 * first (docs/redis-schema.md "Redis Cluster"). That check is enough: a
 * CreateNatGateway holds its subnet in this slot before it writes its
 * record, only while the subnet stands, and DELETE_SUBNET refuses while the
 * hold is there, so a gateway made after the check has a subnet, which
 * this refuses on.
 * KEYS: 1 vpc hash, 2 subnets zset, 3 subnet byname, 4 reserved, 5 subnet
 *       tokens, 6 the VPC's peers (peering/schema.ts: a peering create
 *       reserves its range there first, so a delete and a create of a
 *       peering of this VPC each see the other), 7 the VPC's security
 *       groups and 8 its network ACLs (the firewall's listings), 9 its VPN
 *       endpoint (netagent/vpn/schema.ts VpnKeys.ep, under its tag), 10..
 *       the VPC's other keys that go with it (its DNS zone and
 *       configuration, the firewall's change counter and names, the VPN's
 *       change counter, the gateway's NAT gateway holds, under its tag on a
 *       cluster)
 * ARGV: 1 the peers entries found without a record (swept here if made
 *       before the cutoff: LUA_SWEEP, staleReservations), 2 the cutoff
 * Returns {1, name} deleted, {0, ''} absent, {-1, n} still has n subnets,
 * {-2, n} still has n peerings (or creates of one under way), {-3, what}
 * still has groups or ACLs, {-4} still has a VPN endpoint (as DELETE_VPC).
 */
export const DROP_VPC = `${LUA_SWEEP}${LUA_FIREWALL_LEFT}
local name = redis.call('HGET', KEYS[1], 'name')
if not name then return {0, ''} end
-- Peerings before subnets, as DELETE_VPC on a single Redis: the same refusal on both layouts.
sweep(KEYS[6], ARGV[1], tonumber(ARGV[2]))
local p = redis.call('HLEN', KEYS[6])
if p > 0 then return {-2, p} end
local n = redis.call('ZCARD', KEYS[2])
if n > 0 then return {-1, n} end
if redis.call('EXISTS', KEYS[9]) == 1 then return {-4, ''} end
local left = firewall_left(KEYS[7], KEYS[8])
if #left > 0 then return {-3, table.concat(left, ', ')} end
for i = 1, #KEYS do
  if i ~= 2 and i ~= 9 then redis.call('DEL', KEYS[i]) end
end
return {1, name}
`;

/**
 * KEYS: 1 vpc hash, 2 byname hash, 3 names zset, 4 vpc subnets zset, 5 events,
 *       6 vpc peerings set, 7 the firewall's security groups of the VPC
 *       (zset), 8 its network ACLs (zset), 9 the gateway's VPC → NAT
 *       gateway hash, 10 the VPC's VPN endpoint (netagent/vpn/schema.ts
 *       VpnKeys.ep), 11 the VPC's change stream (it gets the vpc.deleted
 *       event, then its expiry: DELETED_VPC_STREAM_TTL_MS), 12.. the VPC's
 *       DNS keys (records, names, owners, config) and its reserved ranges:
 *       a deleted VPC leaves no records behind, and a VPC created later with
 *       the same name starts with an empty zone.
 * ARGV: 1 id
 * Returns {1} deleted, {0} absent, {-1, n} still has n subnets, {-2, n}
 * still has n peerings, {-3, what} still has groups, ACLs or a NAT gateway
 * (deleting it would leave them dangling), {-4} still has a VPN endpoint
 * (its clients, its host's interface and its reserved range would be left:
 * DeleteVpnEndpoint takes them down; SetVpnEndpoint's script writes the
 * endpoint only while the VPC's record stands, so one of the two is refused).
 */
export const DELETE_VPC = `${LUA_EMIT}${LUA_FIREWALL_LEFT}
local name = redis.call('HGET', KEYS[1], 'name')
if not name then return {0, ''} end
local p = redis.call('SCARD', KEYS[6])
if p > 0 then return {-2, p} end
local n = redis.call('ZCARD', KEYS[4])
if n > 0 then return {-1, n} end
if redis.call('EXISTS', KEYS[10]) == 1 then return {-4, ''} end
local left = firewall_left(KEYS[7], KEYS[8])
if redis.call('HEXISTS', KEYS[9], ARGV[1]) == 1 then left[#left + 1] = 'a NAT gateway' end
if #left > 0 then return {-3, table.concat(left, ', ')} end
redis.call('DEL', KEYS[1])
for i = 12, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('HDEL', KEYS[2], name)
redis.call('ZREM', KEYS[3], name)
redis.call('XADD', KEYS[5], 'MAXLEN', '~', 100000, '*', 'kind', 'vpc.deleted', 'vpc', ARGV[1])
mvpc_scoped({ARGV[1]}, {}, 'kind', 'vpc.deleted', 'vpc', ARGV[1])
redis.call('PEXPIRE', KEYS[11], ${DELETED_VPC_STREAM_TTL_MS})
return {1, ''}
`;

/**
 * KEYS (IpamKeys; 1–10 in the VPC's slot): 1 vpc hash, 2 vpc subnets zset
 *       (score = base), 3 vpc subnet byname, 4 the subnet's record in its
 *       VPC, 5 bits, 6 full, 7 used, 8 subnet tokens, 9 the VPC's reserved
 *       ranges, 10 the record of the subnet the client token named when
 *       read (withClientToken); on a single Redis also 11 the global events
 *       stream, 12 the all-subnets zset, 13, 14, 15 the subnet's req, alloc
 *       and used under an earlier release's names (K.legacy), where
 *       tombstones go. On a cluster the caller writes the subnet's record by
 *       id and the all-subnets entry before and after, and the event.
 * ARGV: 1 id, 2 name, 3 base, 4 size, 5 client token, 6 extra reserved
 *       (addresses after the gateway), 7 the id the token named ('' none),
 *       8 the VPC's subnet records' name less the id (IpamKeys.subnetIn(vpc, "")),
 *       then field/value pairs of the hash.
 * The reserved addresses are bits 0 .. extra+1 (network, gateway, extra) and
 * size-1 (broadcast): one SETRANGE of a run of 0xff bytes built here plus a
 * partial byte, one SETBIT, and a BITCOUNT per chunk touched — a handful of
 * commands whatever the extra count (a per-address loop over a /8 used to
 * keep every other Redis client waiting for seconds).
 * Returns {1, id} created, {0, id} found by client token, {-1, id} name taken,
 * {-2, id} overlaps subnet id, {-4} VPC gone, {-5} extra reserved out of
 * range (the service checks it first; this keeps the script bounded anyway),
 * {-6, owner, value} overlaps a reserved range (the VPN client range),
 * {TOKEN_MOVED} the client token names another subnet now (read again).
 */
export const CREATE_SUBNET = `${LUA_EMIT}${chunkHelpers}${LUA_RANGE_CHECKS}${LUA_TOKEN}
local id, name, base, size, tok = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
-- Reserved run: network, gateway and the extra addresses after it.
local run = tonumber(ARGV[6]) + 2
if run < 2 or run > size - 2 or run % 1 ~= 0 then return {-5, ''} end
if redis.call('EXISTS', KEYS[1]) == 0 then return {-4, ''} end
-- A VPC whose name was claimed but whose create stopped before keeping its
-- record (IpamStore.createVpc): a subnet in it keeps it.
redis.call('PERSIST', KEYS[1])
if tok ~= '' then
  local prev = token_held(KEYS[8], 'subnet\\n' .. tok, ARGV[7], KEYS[10])
  if prev == false then return {${TOKEN_MOVED}, ''} end
  if prev then return {0, prev} end
end
local taken = redis.call('HGET', KEYS[3], name)
if taken then return {-1, taken} end
local other = subnet_overlapping(KEYS[2], base, size, ARGV[8])
if other then return {-2, other} end
local rowner, rvalue = reservation_overlapping(KEYS[9], base, size, nil)
if rowner then return {-6, rowner, rvalue} end
local fields = {}
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[4], unpack(fields))
redis.call('ZADD', KEYS[2], base, id)
redis.call('HSET', KEYS[3], name, id)
redis.call('SET', KEYS[7], 0)
redis.call('DEL', KEYS[5], KEYS[6])
local whole = math.floor(run / 8)
local head = string.rep('\\255', whole)
if run % 8 > 0 then head = head .. string.char(256 - 2 ^ (8 - run % 8)) end
redis.call('SETRANGE', KEYS[5], 0, head)
redis.call('SETBIT', KEYS[5], size - 1, 1)
for c = 0, math.floor((run - 1) / CHUNK_BITS) do
  refresh_chunk(KEYS[5], KEYS[6], c * CHUNK_BITS, size)
end
refresh_chunk(KEYS[5], KEYS[6], size - 1, size)
if tok ~= '' then redis.call('HSET', KEYS[8], 'subnet\\n' .. tok, id) end
if KEYS[11] then
  ${LUA_TOMBSTONES}
  redis.call('ZADD', KEYS[12], 0, id)
  if KEYS[15] then tombstone(KEYS[13], KEYS[14], KEYS[15]) end
  local ev_vpc = redis.call('HGET', KEYS[4], 'vpc')
  redis.call('XADD', KEYS[11], 'MAXLEN', '~', 100000, '*', 'kind', 'subnet.created', 'vpc', ev_vpc, 'subnet', id)
  mvpc_scoped({ev_vpc}, {}, 'kind', 'subnet.created', 'vpc', ev_vpc, 'subnet', id)
end
return {1, id}
`;

/**
 * KEYS (1–10 in the VPC's slot): 1 the subnet's record in its VPC, 2 vpc
 *       subnets zset, 3 vpc subnet byname, 4–9 its state (K.state: used,
 *       bits, full, alloc, req, idx), 10 the cursor of a move of its owner
 *       entries (K.moving); on a single Redis also 11 events, 12 all-subnets
 *       zset, 13 the firewall's subnet → ACL hash, 14 the gateway's VPC →
 *       NAT hash, 15, 16, 17 the subnet's req, alloc and used under an
 *       earlier release's names (its tombstones, deleted with it); on a
 *       cluster 11 the firewall's subnet → ACL hash of the VPC (under its
 *       tag there) and 12 the gateway's NAT gateway holds of the VPC
 *       (gateway/schema.ts GatewayKeys.natHolds, under its tag: the
 *       gateway's records are in another slot, so a CreateNatGateway holds
 *       the subnet here before it writes its record, only while the
 *       subnet's record stands). On a cluster the caller removes the record
 *       by id and the all-subnets entry and sends the event after.
 * ARGV: 1 id; on a cluster 2 the holds the caller found without a NAT
 *       gateway record (comma-separated, staleNatHolds), removed here if
 *       made before the cutoff (LUA_SWEEP: what a create that stopped
 *       between its hold and its record left), 3 the cutoff (PENDING_MS
 *       before the caller read the holds, by this server's clock)
 * Returns {1} deleted, {0} absent, {-1, n} n addresses still allocated,
 * {-2, what} a network ACL is associated or a NAT gateway sits in it (on a
 * cluster: a hold names it, of a gateway with a record, or of a create under
 * way), {-3} its allocation state is still under the earlier names
 * (MIGRATE_SUBNET first: what it holds would not be counted), {-5, field} on
 * a cluster, a NAT gateway hold that does not read as one (read back from
 * Redis: it might name this subnet, so nothing is deleted while it is there).
 */
export const DELETE_SUBNET = `${LUA_EMIT}${LUA_SWEEP}
local name = redis.call('HGET', KEYS[1], 'name')
if not name then return {0, ''} end
if KEYS[17] and redis.call('TYPE', KEYS[17]).ok == 'string' then return {-3, ''} end
local used = tonumber(redis.call('GET', KEYS[4]) or '0')
if used > 0 then return {-1, used} end
local vpc = redis.call('HGET', KEYS[1], 'vpc')
local single = #KEYS > 12
if KEYS[11] then
  local acl = redis.call('HGET', single and KEYS[13] or KEYS[11], ARGV[1])
  if acl then return {-2, 'network ACL ' .. acl .. ' is associated with it (microvpc acl disassociate)'} end
end
if single then
  local nat = redis.call('HGET', KEYS[14], vpc)
  if nat and redis.call('HGET', 'mvpc:gw:nat:' .. nat, 'subnet') == ARGV[1] then
    return {-2, 'NAT gateway ' .. nat .. ' sits in it (microvpc nat delete)'}
  end
else
  sweep(KEYS[12], ARGV[2], tonumber(ARGV[3]))
  local pending = {}
  for sid in string.gmatch(ARGV[2], '[^,]+') do pending[sid] = true end
  local holds = redis.call('HGETALL', KEYS[12])
  for i = 1, #holds - 1, 2 do
    local ok, h = pcall(cjson.decode, holds[i + 1])
    -- A time that is not one (NaN, inf) or lies past the read by more than a hold can live would keep it young forever: refused as unreadable.
    if not ok or type(h) ~= 'table' or type(h.subnet) ~= 'string' or type(h.ms) ~= 'number' or h.ms ~= h.ms or h.ms > tonumber(ARGV[3]) + ${3 * PENDING_MS} then return {-5, holds[i]} end
    if h.subnet == ARGV[1] then
      if not string.match(holds[i], '^nat%-' .. string.rep('[0-9a-f]', 12) .. '$') then return {-5, holds[i]} end
      if pending[holds[i]] then return {-2, 'a NAT gateway is being created in it (' .. holds[i] .. '); retry'} end
      return {-2, 'NAT gateway ' .. holds[i] .. ' sits in it (microvpc nat delete)'}
    end
  end
end
redis.call('DEL', KEYS[1], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], name)
if single then
  if KEYS[17] then redis.call('DEL', KEYS[15], KEYS[16], KEYS[17]) end
  redis.call('ZREM', KEYS[12], ARGV[1])
  redis.call('XADD', KEYS[11], 'MAXLEN', '~', 100000, '*', 'kind', 'subnet.deleted', 'vpc', vpc, 'subnet', ARGV[1])
  mvpc_scoped({vpc}, {}, 'kind', 'subnet.deleted', 'vpc', vpc, 'subnet', ARGV[1])
end
return {1, ''}
`;

/** How many allocations' owner entries one MIGRATE_SUBNET call moves (about 7 ms of Redis time per call, measured). */
export const MIGRATE_BATCH = 1000;

/**
 * Moves one subnet's allocation state from an earlier release's names
 * ("mvpc:sn:<subnet>:…", its holders' "mvpc:owner:<owner>" entries) to the
 * names under its VPC's hash tag. Single Redis only: the earlier names are in
 * other slots, so on a Redis Cluster the move is made before the data is
 * imported (docs/redis-schema.md).
 *
 * The first call RENAMEs the six keys and leaves tombstones (TOMBSTONE) at
 * once, in one script: from then on the subnet is served under the tag and
 * the earlier release's scripts fail on it. The owner entries follow in
 * steps of ARGV[4] allocations, one call each, in address order (the idx
 * zset by score, from the last index moved, kept in KEYS[13]): a cursor
 * that means the same after a restart or a failover, which an HSCAN cursor
 * does not (fields are hashed with a per-process seed). No call holds
 * Redis for long whatever the subnet's size. A step takes each allocation
 * as it is now: one made meanwhile is already in the tagged index (a second
 * ZADD changes nothing); one released meanwhile took its earlier entry
 * with it (RELEASE's KEYS[9] on a single Redis).
 * KEYS: 1–6 the earlier used, bits, full, alloc, req, idx; 7–12 the same
 *       under the VPC's tag; 13 the step cursor (under the tag)
 * ARGV: 1 subnet id, 2 the earlier owner index prefix ("mvpc:owner:"),
 *       3 the tagged one ("mvpc:{<vpc>}:owner:"), 4 allocations per step
 * Returns {moved, more, skipped}: moved 1 if this call renamed, 0 if it was
 * under the tag already, -1 if there is nothing to move (no such subnet, or
 * deleted); more 1 while owner entries are left to move (call again);
 * skipped, the allocations of this step whose holder is not an owner token
 * (V.token's alphabet and length): left out of the owner index. The owner
 * index keys are built here from each holder, which is what the earlier
 * layout did and why it could not run on a cluster.
 */
export const MIGRATE_SUBNET = `${LUA_TOMBSTONES}
local moved = 0
if redis.call('EXISTS', KEYS[7]) == 0 then
  if redis.call('TYPE', KEYS[1]).ok ~= 'string' then return {-1, 0, 0} end
  for i = 1, 6 do
    if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('RENAME', KEYS[i], KEYS[i + 6]) end
  end
  tombstone(KEYS[5], KEYS[4], KEYS[1])
  if redis.call('EXISTS', KEYS[12]) == 1 then redis.call('SET', KEYS[13], '-1') end
  moved = 1
end
local last = redis.call('GET', KEYS[13])
if not last then return {moved, 0, 0} end
local n = tonumber(ARGV[4])
local idxs = redis.call('ZRANGEBYSCORE', KEYS[12], '(' .. last, '+inf', 'LIMIT', 0, n)
local skipped = 0
if #idxs > 0 then
  local recs = redis.call('HMGET', KEYS[10], unpack(idxs))
  for i, idx in ipairs(idxs) do
    local rec = recs[i]
    if rec then
      local holder = string.match(rec, '^[^\\n]*')
      if string.match(holder, '^[A-Za-z0-9_.:/-]+$') and #holder <= 128 then
        local m = ARGV[1] .. '/' .. idx
        redis.call('ZREM', ARGV[2] .. holder, m)
        redis.call('ZADD', ARGV[3] .. holder, 0, m)
      else
        skipped = skipped + 1
      end
    end
  end
end
if #idxs < n then
  redis.call('DEL', KEYS[13])
  return {moved, 0, skipped}
end
redis.call('SET', KEYS[13], idxs[#idxs])
return {moved, 1, skipped}
`;
