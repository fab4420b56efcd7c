// The firewall's Lua scripts: every change is one script, which appends
// its event to the VPC's stream (and on a single Redis "mvpc:events") in the
// same step; the groups' and ACLs' declare every key (a Redis Cluster runs
// them, each in its VPC's slot; keys.ts FirewallKeys); LOAD_VPC is the read-only
// snapshot a hypervisor compiles from. Registered on a connection by
// defineScripts (ioredis defineCommand: EVALSHA, loaded on first use).
import type { Redis } from "ioredis";
import { K } from "../ipam/schema.js";
import { F, NICADDR, VPN_CLIENTS, VPN_EP } from "./keys.js";
import { LUA_EMIT, scriptFor } from "../common/events.js";
import { defineVariadicCommand } from "../common/redis.js";

// ---------- Lua ----------

export const LUA_UTIL = `
-- A change counter any host may write (docs/redis-acl.md) that INCR would
-- refuse: checked before a script writes anything, so that it does not
-- fail half-way at its INCR.
local function counter_bad(gk)
  local c = redis.call('GET', gk)
  if not c then return false end
  return not (c == '0' or (string.match(c, '^%-?[1-9]%d*$') and #c <= 18))
end
local function counter_refused(gk)
  return redis.error_reply('the firewall change counter ' .. gk .. ' holds no integer (another host wrote it); set it to a number above the last event gen')
end
local function split(s)
  local t = {}
  if s then for x in string.gmatch(s, '[^,]+') do t[#t + 1] = x end end
  return t
end
local function fields_from(first)
  local f = {}
  for i = first, #ARGV do f[#f + 1] = ARGV[i] end
  return f
end
`;

// Shared by the bindings' scripts (single Redis names). Names here must match FK.
const LUA_COMMON = `${LUA_EMIT}
local F = '${F}'
local EV = '${K.events}'
local SUBNET_ACL = F .. 'subnet-acl'
${LUA_UTIL}
-- Appends one event; every firewall event carries kind, vpc and gen.
local function emit(kind, vpc, ...)
  local g = redis.call('INCR', F .. 'gen')
  redis.call('XADD', EV, 'MAXLEN', '~', 100000, '*', 'kind', kind, 'vpc', vpc, 'gen', g, ...)
  mvpc_scoped({vpc}, {}, 'kind', kind, 'vpc', vpc, 'gen', g, ...)
  return g
end
-- Every id must be a group of the VPC ('self' is the group being written).
local function check_groups(ids, vpc, self)
  for _, g in ipairs(ids) do
    if g ~= self then
      local v = redis.call('HGET', F .. 'sg:' .. g, 'vpc')
      if not v then return {-3, g} end
      if v ~= vpc then return {-5, g .. ',' .. v} end
    end
  end
  return nil
end
`;

const LUA_NIC = `
local function unindex(nic, host, vpc, gcsv)
  redis.call('ZREM', F .. 'host:' .. host .. ':nics', nic)
  redis.call('HDEL', F .. 'host:' .. host .. ':sig', nic)
  redis.call('ZREM', F .. 'vpc:' .. vpc .. ':nics', nic)
  local hv = F .. 'host:' .. host .. ':vpc:' .. vpc .. ':nics'
  redis.call('SREM', hv, nic)
  if redis.call('SCARD', hv) == 0 then redis.call('SREM', F .. 'host:' .. host .. ':vpcs', vpc) end
  for _, g in ipairs(split(gcsv)) do redis.call('HDEL', F .. 'sg:' .. g .. ':members', nic) end
end
local function index(nic, host, vpc, groups, addr)
  redis.call('ZADD', F .. 'nics', 0, nic)
  redis.call('ZADD', F .. 'host:' .. host .. ':nics', 0, nic)
  redis.call('ZADD', F .. 'vpc:' .. vpc .. ':nics', 0, nic)
  redis.call('SADD', F .. 'host:' .. host .. ':vpc:' .. vpc .. ':nics', nic)
  redis.call('SADD', F .. 'host:' .. host .. ':vpcs', vpc)
  for _, g in ipairs(groups) do redis.call('HSET', F .. 'sg:' .. g .. ':members', nic, addr) end
end
`;

// ---- groups and ACLs: every key declared (FirewallKeys, keys.ts) ----

// The prelude of the declared-key scripts. A script takes the keys of the
// groups or ACLs its change names (peers, an ACL a subnet leaves) from the
// caller, who read them first, and refuses with {-8, …} (or {-2, gen}) when
// what it finds differs from what the caller read: the caller reads again
// and retries.
const LUA_DECLARED = `${LUA_EMIT}${LUA_UTIL}
-- Appends one event, with the VPC's next change count (gk: its counter).
local function emit(gk, kind, vpc, ...)
  local g = redis.call('INCR', gk)
  mvpc_emit({vpc}, {}, 'kind', kind, 'vpc', vpc, 'gen', g, ...)
  return g
end
-- Every peer (KEYS[first + i - 1] its record) must be a group of the VPC ('self' is the group being written).
local function check_peers(ids, first, vpc, self)
  for i, g in ipairs(ids) do
    if g ~= self then
      local v = redis.call('HGET', KEYS[first + i - 1], 'vpc')
      if not v then return {-3, g} end
      if v ~= vpc then return {-5, g .. ',' .. v} end
    end
  end
  return nil
end
-- A client token's earlier create (KEYS[k] the record of the id the caller
-- found for it, ARGV[a] that id or ''): the id if its record is there; {-9}
-- if the token names another id now (the caller reads it again).
local function by_token(tokens, field, k, a)
  local prev = redis.call('HGET', tokens, field)
  if (prev or '') ~= ARGV[a] then return nil, {-9, prev or ''} end
  if prev and redis.call('EXISTS', KEYS[k]) == 1 then return prev, nil end
  return nil, nil
end
`;

/**
 * KEYS: 1 group hash, 2 the VPC's record (IPAM), 3 client tokens, 4 the
 * VPC's names → ids, 5 the VPC's listing, 6 its change counter, 7 the
 * record of the group the client token names (ARGV[6]; else KEYS[1]), then
 * per peer (ARGV[5], in order) its record, then per peer its refby set,
 * and on a single Redis last the listing of every group.
 * ARGV: 1 id, 2 vpc, 3 name, 4 client token, 5 peer ids (csv), 6 the group
 * the token named when the caller read it (''), then field/value pairs.
 * Returns {1, id} created, {0, id} found by token, {-1, id} name taken,
 * {-3, g} peer missing, {-5, "g,vpc"} peer of another VPC, {-4} VPC gone,
 * {-9, id} the token names another group now.
 */
const CREATE_SG = `${LUA_DECLARED}
if counter_bad(KEYS[6]) then return counter_refused(KEYS[6]) end
local id, vpc, name, tok = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local peers = split(ARGV[5])
if redis.call('EXISTS', KEYS[2]) == 0 then return {-4, vpc} end
if tok ~= '' then
  local prev, changed = by_token(KEYS[3], 'sg\\n' .. tok, 7, 6)
  if changed then return changed end
  if prev then return {0, prev} end
end
local taken = redis.call('HGET', KEYS[4], name)
if taken then return {-1, taken} end
local bad = check_peers(peers, 8, vpc, id)
if bad then return bad end
redis.call('PERSIST', KEYS[2])
redis.call('HSET', KEYS[1], unpack(fields_from(7)))
redis.call('HSET', KEYS[4], name, id)
redis.call('ZADD', KEYS[5], 0, name .. '/' .. id)
if #KEYS > 7 + 2 * #peers then redis.call('ZADD', KEYS[#KEYS], 0, name .. '/' .. id) end
for i = 1, #peers do redis.call('SADD', KEYS[7 + #peers + i], id) end
if tok ~= '' then redis.call('HSET', KEYS[3], 'sg\\n' .. tok, id) end
emit(KEYS[6], 'fw.sg.created', vpc, 'sg', id, 'name', name)
return {1, id}
`;

/**
 * KEYS: 1 group hash, 2 the VPC's change counter, then per old peer
 * (ARGV[3]) its refby set, then per new peer (ARGV[4]) its record, then per
 * new peer its refby set.
 * ARGV: 1 id, 2 vpc, 3 the old peer ids (csv) and 4 the generation the
 * change was computed from, 5 new peer ids (csv), then field/value pairs.
 * Returns {1, gen}, {-2, current gen} changed meanwhile (or its peers are
 * not those read at that generation), {-4} gone, {-3}/{-5} as CREATE_SG.
 */
const UPDATE_SG = `${LUA_DECLARED}
if counter_bad(KEYS[2]) then return counter_refused(KEYS[2]) end
local id, vpc = ARGV[1], ARGV[2]
local cur = redis.call('HMGET', KEYS[1], 'vpc', 'gen', 'peers')
if cur[1] ~= vpc then return {-4, ''} end
local gen = tonumber(cur[2])
if gen ~= tonumber(ARGV[4]) or (cur[3] or '') ~= ARGV[3] then return {-2, gen or 0} end
local old, peers = split(ARGV[3]), split(ARGV[5])
local first = 3 + #old
local bad = check_peers(peers, first, vpc, id)
if bad then return bad end
for i = 1, #old do redis.call('SREM', KEYS[2 + i], id) end
for i = 1, #peers do redis.call('SADD', KEYS[first + #peers + i - 1], id) end
redis.call('HSET', KEYS[1], 'gen', gen + 1, unpack(fields_from(6)))
emit(KEYS[2], 'fw.sg.updated', vpc, 'sg', id, 'sg_gen', gen + 1)
return {1, gen + 1}
`;

/**
 * KEYS: 1 group hash, 2 its members, 3 its refby set, 4 the VPC's names →
 * ids, 5 the VPC's listing, 6 its change counter, then per peer (ARGV[3])
 * its refby set, and on a single Redis last the listing of every group.
 * ARGV: 1 id, 2 vpc, 3 the peer ids the caller read (csv).
 * Returns {1, name} deleted, {0} absent, {-1, nics, n} bound NICs, {-2,
 * groups, n} groups naming it as peer, {-8} its peers are not those read.
 */
const DELETE_SG = `${LUA_DECLARED}
if counter_bad(KEYS[6]) then return counter_refused(KEYS[6]) end
local id, vpc = ARGV[1], ARGV[2]
local cur = redis.call('HMGET', KEYS[1], 'vpc', 'name', 'peers')
if cur[1] ~= vpc then return {0, '', 0} end
if (cur[3] or '') ~= ARGV[3] then return {-8, '', 0} end
local nics = redis.call('HKEYS', KEYS[2])
if #nics > 0 then
  table.sort(nics)
  return {-1, table.concat(nics, ',', 1, math.min(#nics, 10)), #nics}
end
local refs = {}
for _, g in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  if g ~= id then refs[#refs + 1] = g end
end
if #refs > 0 then
  table.sort(refs)
  return {-2, table.concat(refs, ',', 1, math.min(#refs, 10)), #refs}
end
local peers = split(ARGV[3])
for i = 1, #peers do redis.call('SREM', KEYS[6 + i], id) end
local name = cur[2]
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('HDEL', KEYS[4], name)
redis.call('ZREM', KEYS[5], name .. '/' .. id)
if #KEYS > 6 + #peers then redis.call('ZREM', KEYS[#KEYS], name .. '/' .. id) end
emit(KEYS[6], 'fw.sg.deleted', vpc, 'sg', id, 'name', name)
return {1, name, 0}
`;

/**
 * KEYS: 1 nic hash. ARGV: 1 nic, 2 sig, 3 host, 4 vpc, 5 subnet, 6 address,
 * 7 group ids (csv), 8 now. Returns {1, gen of its event} changed, {0} already so,
 * {-3}/{-5} as CREATE_SG.
 */
const BIND = `${LUA_COMMON}${LUA_NIC}
if counter_bad(F .. 'gen') then return counter_refused(F .. 'gen') end
local nic, sig, host, vpc, subnet, addr, gcsv, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local groups = split(gcsv)
local bad = check_groups(groups, vpc, '')
if bad then return bad end
local old = redis.call('HMGET', KEYS[1], 'sig', 'host', 'vpc', 'groups', 'bound')
-- The host's own copy (see FK.hostSigs); also for a binding made before it existed.
if old[1] == sig then redis.call('HSET', F .. 'host:' .. host .. ':sig', nic, sig) return {0, ''} end
local bound = now
local extra = {}
if old[1] then
  bound = old[5]
  unindex(nic, old[2], old[3], old[4])
  extra = {'prev_groups', old[4] or ''}
  if old[2] ~= host then extra[#extra + 1] = 'prev_host'; extra[#extra + 1] = old[2] end
  if old[3] ~= vpc then
    emit('fw.binding.removed', old[3], 'nic', nic, 'host', old[2], 'groups', old[4] or '')
  end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'sig', sig, 'host', host, 'vpc', vpc, 'subnet', subnet, 'addr', addr, 'groups', gcsv, 'bound', bound, 'updated', now)
index(nic, host, vpc, groups, addr)
redis.call('HSET', F .. 'host:' .. host .. ':sig', nic, sig)
local g = emit('fw.binding.changed', vpc, 'nic', nic, 'host', host, 'address', addr, 'groups', gcsv, unpack(extra))
return {1, tostring(g)}
`;

/** KEYS: 1 nic hash. ARGV: 1 nic. Returns {1, vpc, gen of its event} removed, {0} absent. */
const UNBIND = `${LUA_COMMON}${LUA_NIC}
if counter_bad(F .. 'gen') then return counter_refused(F .. 'gen') end
local nic = ARGV[1]
local old = redis.call('HMGET', KEYS[1], 'sig', 'host', 'vpc', 'groups', 'addr')
if not old[1] then return {0, ''} end
unindex(nic, old[2], old[3], old[4])
redis.call('DEL', KEYS[1])
redis.call('ZREM', F .. 'nics', nic)
local g = emit('fw.binding.removed', old[3], 'nic', nic, 'host', old[2], 'address', old[5], 'groups', old[4] or '')
return {1, old[3], tostring(g), old[2] or ''}
`;

// Subnets and their previous ACLs, for CREATE_ACL and ASSOCIATE: ARGV[sa]
// the subnet ids (csv), KEYS[sk + i - 1] their records in the VPC (IPAM),
// ARGV[pa] the ACL each subnet had when the caller read (csv, aligned, ''
// for none), and from KEYS[pk] a hash and a subnets set per ACL named there
// (in order of first appearance).
const LUA_ACL = `
local function subnets_ok(subnets, sk, vpc)
  for i, s in ipairs(subnets) do
    local v = redis.call('HGET', KEYS[sk + i - 1], 'vpc')
    if not v then return {-7, s} end
    if v ~= vpc then return {-6, s .. ',' .. v} end
  end
  return nil
end
-- The keys of each previous ACL, or {-8} if a subnet's ACL is not the one read.
local function previous(subnets, sacl, pa, pk)
  local was, keys, n = {}, {}, 0
  local i = 0
  for x in string.gmatch(ARGV[pa] .. ',', '([^,]*),') do
    i = i + 1
    if subnets[i] then
      -- A value that is no ACL id counts as none, here as for the caller (who passes '' and no keys for it).
      local cur = redis.call('HGET', sacl, subnets[i]) or ''
      if not string.match(cur, '^acl%-[0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]$') then cur = '' end
      if cur ~= x then return nil, {-8, subnets[i]} end
      was[i] = x
      if x ~= '' and not keys[x] then keys[x] = {KEYS[pk + 2 * n], KEYS[pk + 2 * n + 1]} n = n + 1 end
    end
  end
  return {was, keys}, nil
end
-- Points subnet i at the ACL (id, its subnets set), taking it from its
-- previous one (whose generation rises). Returns the previous ACL id or ''.
local function associate(id, subnets_key, sacl, s, prev, pkeys, now)
  if prev == id then return '' end
  if prev ~= '' then
    redis.call('SREM', pkeys[prev][2], s)
    redis.call('HINCRBY', pkeys[prev][1], 'gen', 1)
    redis.call('HSET', pkeys[prev][1], 'updated', now)
  end
  redis.call('HSET', sacl, s, id)
  redis.call('SADD', subnets_key, s)
  return prev
end
`;

/**
 * KEYS: 1 acl hash, 2 its subnets set, 3 the VPC's record (IPAM), 4 client
 * tokens, 5 the VPC's names → ids, 6 its listing, 7 its change counter, 8
 * the VPC's subnet → ACL hash, 9 the record of the ACL the client token
 * names (ARGV[7]; else KEYS[1]), then per subnet (ARGV[5]) its record in the
 * VPC, then per previous ACL (ARGV[8], LUA_ACL) its hash and subnets set,
 * and on a single Redis last the listing of every ACL.
 * ARGV: 1 id, 2 vpc, 3 name, 4 client token, 5 subnet ids (csv), 6 now, 7
 * the ACL the token named when read (''), 8 each subnet's ACL when read,
 * 9 how many previous ACLs, then field/value pairs.
 * Returns {1, id}, {0, id} found by token, {-1, id} name taken, {-4} VPC
 * gone, {-6, "subnet,vpc"} subnet of another VPC, {-7, subnet} no such
 * subnet, {-8, subnet} its ACL changed since read, {-9} the token names
 * another ACL now.
 */
const CREATE_ACL = `${LUA_DECLARED}${LUA_ACL}
if counter_bad(KEYS[7]) then return counter_refused(KEYS[7]) end
local id, vpc, name, tok, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[6]
if redis.call('EXISTS', KEYS[3]) == 0 then return {-4, vpc} end
if tok ~= '' then
  local prev, changed = by_token(KEYS[4], 'acl\\n' .. tok, 9, 7)
  if changed then return changed end
  if prev then return {0, prev} end
end
local taken = redis.call('HGET', KEYS[5], name)
if taken then return {-1, taken} end
local subnets = split(ARGV[5])
local bad = subnets_ok(subnets, 10, vpc)
if bad then return bad end
local pk = 10 + #subnets
local prev, changed = previous(subnets, KEYS[8], 8, pk)
if changed then return changed end
redis.call('PERSIST', KEYS[3])
redis.call('HSET', KEYS[1], unpack(fields_from(10)))
redis.call('HSET', KEYS[5], name, id)
redis.call('ZADD', KEYS[6], 0, name .. '/' .. id)
if #KEYS > pk + 2 * tonumber(ARGV[9]) - 1 then redis.call('ZADD', KEYS[#KEYS], 0, name .. '/' .. id) end
local prevs = {}
for i, s in ipairs(subnets) do
  local p = associate(id, KEYS[2], KEYS[8], s, prev[1][i], prev[2], now)
  if p ~= '' then prevs[#prevs + 1] = p end
end
if tok ~= '' then redis.call('HSET', KEYS[4], 'acl\\n' .. tok, id) end
emit(KEYS[7], 'fw.acl.created', vpc, 'acl', id, 'name', name, 'subnets', ARGV[5], 'prev_acls', table.concat(prevs, ','))
return {1, id}
`;

/**
 * KEYS: 1 acl hash, 2 its subnets set, 3 the VPC's change counter.
 * ARGV: 1 id, 2 vpc, 3 generation the change was computed from, then
 * field/value pairs. Returns {1, gen}, {-2, gen}, {-4}.
 */
const UPDATE_ACL = `${LUA_DECLARED}
if counter_bad(KEYS[3]) then return counter_refused(KEYS[3]) end
local id, vpc = ARGV[1], ARGV[2]
local cur = redis.call('HMGET', KEYS[1], 'vpc', 'gen')
if cur[1] ~= vpc then return {-4, ''} end
local gen = tonumber(cur[2])
if gen ~= tonumber(ARGV[3]) then return {-2, gen or 0} end
redis.call('HSET', KEYS[1], 'gen', gen + 1, unpack(fields_from(4)))
local subnets = redis.call('SMEMBERS', KEYS[2])
table.sort(subnets)
emit(KEYS[3], 'fw.acl.updated', vpc, 'acl', id, 'acl_gen', gen + 1, 'subnets', table.concat(subnets, ','))
return {1, gen + 1}
`;

/**
 * KEYS: 1 acl hash, 2 its subnets set, 3 the VPC's names → ids, 4 its
 * listing, 5 its change counter, and on a single Redis last the listing of
 * every ACL. ARGV: 1 id, 2 vpc.
 * Returns {1, name} deleted, {0} absent, {-1, subnets, n}.
 */
const DELETE_ACL = `${LUA_DECLARED}
if counter_bad(KEYS[5]) then return counter_refused(KEYS[5]) end
local id, vpc = ARGV[1], ARGV[2]
local cur = redis.call('HMGET', KEYS[1], 'vpc', 'name')
if cur[1] ~= vpc then return {0, '', 0} end
local subnets = redis.call('SMEMBERS', KEYS[2])
if #subnets > 0 then
  table.sort(subnets)
  return {-1, table.concat(subnets, ',', 1, math.min(#subnets, 10)), #subnets}
end
local name = cur[2]
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HDEL', KEYS[3], name)
redis.call('ZREM', KEYS[4], name .. '/' .. id)
if KEYS[6] then redis.call('ZREM', KEYS[6], name .. '/' .. id) end
emit(KEYS[5], 'fw.acl.deleted', vpc, 'acl', id, 'name', name)
return {1, name, 0}
`;

/**
 * KEYS: 1 acl hash, 2 its subnets set, 3 the VPC's subnet → ACL hash, 4 its
 * change counter, 5 the subnet's record in the VPC (IPAM), then the
 * previous ACL's hash and subnets set if the subnet had one (LUA_ACL).
 * ARGV: 1 acl id, 2 vpc, 3 subnet id, 4 now, 5 the subnet's ACL when read ('').
 * Returns {1, prev} associated (prev = previous ACL or ''), {0, ''} already
 * so, {-4} no ACL, {-6}/{-7}/{-8} as CREATE_ACL.
 */
const ASSOCIATE = `${LUA_DECLARED}${LUA_ACL}
if counter_bad(KEYS[4]) then return counter_refused(KEYS[4]) end
local id, vpc, s, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('HGET', KEYS[1], 'vpc') ~= vpc then return {-4, ''} end
local bad = subnets_ok({s}, 5, vpc)
if bad then return bad end
if redis.call('HGET', KEYS[3], s) == id then return {0, ''} end
local prev, changed = previous({s}, KEYS[3], 5, 6)
if changed then return changed end
local p = associate(id, KEYS[2], KEYS[3], s, prev[1][1], prev[2], now)
redis.call('HINCRBY', KEYS[1], 'gen', 1)
redis.call('HSET', KEYS[1], 'updated', now)
emit(KEYS[4], 'fw.acl.associated', vpc, 'acl', id, 'subnet', s, 'prev_acl', p)
return {1, p}
`;

/**
 * KEYS: 1 the VPC's subnet → ACL hash, 2 its change counter, 3 and 4 the
 * hash and subnets set of the ACL the subnet had when read (ARGV[4]).
 * ARGV: 1 subnet, 2 now, 3 vpc, 4 the subnet's ACL when read.
 * Returns {1, prev}, {0, ''} none, {-8} another ACL now.
 */
const DISASSOCIATE = `${LUA_DECLARED}
if counter_bad(KEYS[2]) then return counter_refused(KEYS[2]) end
local s, now, vpc = ARGV[1], ARGV[2], ARGV[3]
local prev = redis.call('HGET', KEYS[1], s)
if not prev then return {0, ''} end
if prev ~= ARGV[4] then return {-8, prev} end
redis.call('HDEL', KEYS[1], s)
redis.call('SREM', KEYS[4], s)
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HINCRBY', KEYS[3], 'gen', 1)
  redis.call('HSET', KEYS[3], 'updated', now)
end
emit(KEYS[2], 'fw.acl.disassociated', vpc, 'acl', prev, 'subnet', s)
return {1, prev}
`;

// ---- bindings on a Redis Cluster, in steps of one slot each (store.ts bindInSteps, unbindInSteps) ----

/**
 * The NIC in its VPC's slot: its entries in the member indexes of the groups
 * it leaves and joins, and the VPC's listing of bound NICs.
 * KEYS: 1 the VPC's bound NICs, 2 its change counter (checked first: the
 *       event that ends the bind raises it), then the member hashes of the
 *       groups the NIC leaves (ARGV[3] of them), then of those it joins
 *       (ARGV[7]).
 * ARGV: 1 nic, 2 address, 3 how many groups it leaves, 4 "1" to list the NIC
 *       in the VPC or "0" to unlist it, 5 the VPC, 6 the prefix of the VPC's
 *       group records, 7 the groups it joins (csv).
 * The groups it joins must be groups of the VPC. Their records are read in
 * this slot without being declared: the hosts' users run this, and Redis
 * checks a script's declared keys as writable, which a host's user may not
 * write (docs/redis-acl.md).
 * Returns {1}, {-3, g} no such group, {-5, "g,vpc"} a group of another VPC.
 */
const VPC_MEMBERS = `${LUA_UTIL}
if counter_bad(KEYS[2]) then return counter_refused(KEYS[2]) end
local nic, addr, nl, vpc = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[5]
local join = split(ARGV[7])
for _, g in ipairs(join) do
  local v = redis.call('HGET', ARGV[6] .. g, 'vpc')
  if not v then return {-3, g} end
  if v ~= vpc then return {-5, g .. ',' .. v} end
end
for i = 1, nl do redis.call('HDEL', KEYS[2 + i], nic) end
for i = 1, #join do redis.call('HSET', KEYS[2 + nl + i], nic, addr) end
if ARGV[4] == '1' then redis.call('ZADD', KEYS[1], 0, nic) else redis.call('ZREM', KEYS[1], nic) end
return {1}
`;

/**
 * The NIC in its host's slot: the host's indexes and its own copy of the
 * binding's sig.
 * KEYS: 1 the host's bound NICs, 2 its VPCs with bindings, 3 its sig copies,
 *       4 its NICs of the VPC, 5 its NICs of the VPC the NIC leaves (else
 *       KEYS[4] again).
 * ARGV: 1 nic, 2 the sig ('' when the NIC leaves the host), 3 the VPC, 4 the
 *       VPC the NIC leaves on this host ('' none).
 */
const HOST_INDEX = `
local nic, sig, vpc, left = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local function leave(k, v)
  redis.call('SREM', k, nic)
  if redis.call('SCARD', k) == 0 then redis.call('SREM', KEYS[2], v) end
end
if left ~= '' and left ~= vpc then leave(KEYS[5], left) end
if sig == '' then
  redis.call('ZREM', KEYS[1], nic)
  redis.call('HDEL', KEYS[3], nic)
  leave(KEYS[4], vpc)
else
  redis.call('ZADD', KEYS[1], 0, nic)
  redis.call('SADD', KEYS[4], nic)
  redis.call('SADD', KEYS[2], vpc)
  redis.call('HSET', KEYS[3], nic, sig)
end
return {1}
`;

/**
 * The shared record, written or deleted only if it is still what the caller
 * read. KEYS: 1 the record. ARGV: 1 its sig when read ('' none), then the
 * field/value pairs to write (none: delete). Returns {1}, or {-8} changed
 * meanwhile (the caller reads again).
 */
const RECORD = `${LUA_UTIL}
if (redis.call('HGET', KEYS[1], 'sig') or '') ~= ARGV[1] then return {-8} end
redis.call('DEL', KEYS[1])
if #ARGV > 1 then redis.call('HSET', KEYS[1], unpack(fields_from(2))) end
return {1}
`;

/** KEYS: 1 a change counter. Refuses (an error) if it holds what INCR would refuse: BindNic's check before its first step on a cluster. */
const COUNTER_OK = `${LUA_UTIL}
if counter_bad(KEYS[1]) then return counter_refused(KEYS[1]) end
return 1
`;

/** One firewall event in a VPC's slot. KEYS: 1 the VPC's change counter. ARGV: 1 kind, 2 vpc, then field/value pairs. Returns its gen. */
const VPC_EVENT = `${LUA_DECLARED}
return emit(KEYS[1], ARGV[1], ARGV[2], unpack(fields_from(3)))
`;

/**
 * Read-only snapshot of one VPC for one host. KEYS: 1 host+vpc nic set.
 * ARGV: 1 nic ids (csv; "*" = the NICs bound on the host in the VPC),
 * 2 subnet ids (csv), 3 host, 4 VPC, and for a delta 5 the peer groups
 * the caller holds members of, 6 groups it knows were joined or left (csv).
 * Returns {nics, groups, members, acls}:
 *   nics    {nic, sig, bound, updated} per bound NIC
 *   groups  {group id, HGETALL…} of every group the NICs use and every group those name as peer
 *   members {group, nic, addr, nic, addr, …} per peer group
 *   acls    {subnet, HGETALL of its ACL, subnet ids of the ACL} per subnet with one
 *   vpn     false, or (when a peer group was loaded) {VPC cidr, HGETALL of its VPN
 *           endpoint, HGETALL of its VPN clients}
 */
const LOAD_VPC = `${LUA_COMMON}
local NA1, NA2 = '${NICADDR[0]}', '${NICADDR[1]}'
-- A key holding another type than its schema says is skipped and named in
-- bad, so one bad key cannot stop the VPC's snapshot.
local bad = {}
local function get(cmd, key, ...)
  local r = redis.pcall(cmd, key, ...)
  if type(r) == 'table' and r.err then bad[#bad + 1] = key return nil end
  return r
end
local ids
if ARGV[1] == '*' then ids = get('SMEMBERS', KEYS[1]) or {} else ids = split(ARGV[1]) end
local nics, used = {}, {}
-- ARGV[3]: the host, whose own copy of each sig comes along (false if none):
-- only the listed NICs' (a delta names one or two; the hash has every NIC of the host).
local mine = {}
if ARGV[3] and ARGV[3] ~= '' and #ids > 0 then
  local hk = F .. 'host:' .. ARGV[3] .. ':sig'
  if ARGV[1] == '*' then
    local own = get('HGETALL', hk) or {}
    for i = 1, #own, 2 do mine[own[i]] = own[i + 1] end
  else
    for first = 1, #ids, 500 do
      local last = math.min(first + 499, #ids)
      local own = get('HMGET', hk, unpack(ids, first, last))
      if own then for i = first, last do if own[i - first + 1] then mine[ids[i]] = own[i - first + 1] end end end
    end
  end
end
-- A binding's sig (JSON), or nil: what its host's copy vouches for. The
-- record's other fields (host, vpc, addr, groups) are anyone's to rewrite.
local function sig_of(raw)
  local ok, s = pcall(cjson.decode, raw)
  if ok and type(s) == 'table' then return s end
  return nil
end
local function groups_of(s)
  if s and type(s.groupIds) == 'table' then return s.groupIds end
  return {}
end
for _, nic in ipairs(ids) do
  local b = get('HMGET', F .. 'nic:' .. nic, 'sig', 'bound', 'updated')
  if (not b or not b[1]) and mine[nic] then
    -- No record (or a key of another type), but this host holds a copy: removed by someone else (an UnbindNic removes the copy first). Held closed.
    nics[#nics + 1] = {nic, '', false, false, mine[nic]}
  elseif b and b[1] then
    nics[#nics + 1] = {nic, b[1], b[2], b[3], mine[nic] or false}
    for _, g in ipairs(groups_of(sig_of(b[1]))) do if type(g) == 'string' then used[g] = true end end
  end
end
local groups, loaded, peers = {}, {}, {}
local function load(g)
  if loaded[g] then return end
  loaded[g] = true
  local h = get('HGETALL', F .. 'sg:' .. g)
  if h and #h > 0 then
    table.insert(h, 1, g)
    groups[#groups + 1] = h
  end
end
for g, _ in pairs(used) do
  load(g)
  local p = get('HGET', F .. 'sg:' .. g, 'peers')
  for _, x in ipairs(split(p or nil)) do peers[x] = true end
end
-- A delta (FirewallSync): ARGV[5] the peer groups the caller holds
-- members of; those among ARGV[6] or the loaded NICs' groups are read too
-- (a NIC that joins or leaves them changes their members).
local touched = {}
for _, g in ipairs(split(ARGV[6])) do touched[g] = true end
for g, _ in pairs(used) do touched[g] = true end
for _, p in ipairs(split(ARGV[5])) do if touched[p] then peers[p] = true end end
-- A member entry (shared key: any host may write it) counts only if the
-- NIC's own host vouches for it in keys only that host writes: its copy of
-- the binding's sig (whose VPC, address and groups are read from the sig,
-- not from the record's other fields, which any host may rewrite), and
-- netagent's NIC index listing the address for that NIC. And an address that is a NIC of this host counts only as that NIC.
-- Refused entries come back in {group, nic, addr, reason} for reporting.
local vpc, refused = ARGV[4] or '', {}
local myidx = (ARGV[3] and ARGV[3] ~= '') and (NA1 .. ARGV[3] .. NA2) or nil
local function member_problem(p, nic, addr)
  local b = get('HMGET', F .. 'nic:' .. nic, 'sig', 'host')
  if not b or not b[1] then return 'has no binding' end
  local h = b[2]
  if type(h) ~= 'string' or not string.match(h, '^[a-z0-9-]+$') then return 'names no valid host' end
  if get('HGET', F .. 'host:' .. h .. ':sig', nic) ~= b[1] then return 'its host ' .. h .. ' holds no such binding' end
  -- The sig, which that copy vouches for, says where and in which groups the NIC is.
  local s = sig_of(b[1])
  if not s then return 'has a sig that is not JSON' end
  if s.hostId ~= h then return 'its sig names another host' end
  if s.vpcId ~= vpc then return 'is bound in another VPC' end
  if s.address ~= addr then return 'is bound with another address' end
  local inside = false
  for _, g in ipairs(groups_of(s)) do if g == p then inside = true end end
  if not inside then return 'is not bound to this group' end
  if get('HGET', NA1 .. h .. NA2, vpc .. '/' .. addr) ~= nic then return 'its host ' .. h .. ' lists no such NIC at that address' end
  if myidx and h ~= ARGV[3] and get('HGET', myidx, vpc .. '/' .. addr) then return 'the address is a NIC of this host' end
  return nil
end
local members = {}
for p, _ in pairs(peers) do
  load(p)
  local m = get('HGETALL', F .. 'sg:' .. p .. ':members') or {}
  local ok = {p}
  for i = 1, #m - 1, 2 do
    local why = member_problem(p, m[i], m[i + 1])
    if why then refused[#refused + 1] = {p, m[i], m[i + 1], why} else ok[#ok + 1] = m[i] ok[#ok + 1] = m[i + 1] end
  end
  members[#members + 1] = ok
end
-- The VPC's VPN clients are members of their groups too: when a peer group
-- is loaded, the VPC's CIDR, its VPN endpoint and its clients come along
-- (raw: the caller parses them with the VPN's own validators).
local vpn = false
if next(peers) ~= nil and vpc ~= '' then
  local vc = get('HGET', '${K.vpc("")}' .. vpc, 'cidr')
  vpn = {vc or '', get('HGETALL', '${VPN_EP}' .. vpc) or {}, get('HGETALL', '${VPN_CLIENTS[0]}' .. vpc .. '${VPN_CLIENTS[1]}') or {}}
end
local acls = {}
for _, s in ipairs(split(ARGV[2])) do
  local a = get('HGET', SUBNET_ACL, s)
  if a then
    local h = get('HGETALL', F .. 'acl:' .. a)
    -- Named but not there: the subnet's ACL denies everything (the caller stands a closed ACL in for it).
    if h and #h > 0 then acls[#acls + 1] = {s, h, get('SMEMBERS', F .. 'acl:' .. a .. ':subnets') or {}} else acls[#acls + 1] = {s, {}, {}} end
  end
end
return {nics, groups, members, acls, bad, refused, vpn}
`;

/**
 * Upgrade: bindings made before hosts kept their own copy of each sig have
 * none, and group membership (LOAD_VPC) counts only NICs whose host holds a
 * copy. The host copies the sig of each NIC bound on it, once, at start
 * (trusting the shared record as an older version did, one last time).
 * KEYS: 1 the host's NIC index. ARGV: 1 host id, 2 its sig hash. Returns the count.
 */
const ADOPT_SIGS = `${LUA_COMMON}
local n = 0
for _, nic in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if redis.call('HEXISTS', ARGV[2], nic) == 0 then
    local b = redis.call('HMGET', F .. 'nic:' .. nic, 'sig', 'host')
    if b[1] and b[2] == ARGV[1] then redis.call('HSET', ARGV[2], nic, b[1]) n = n + 1 end
  end
end
return n
`;

export type Reply = [number, string | number, number?];

declare module "ioredis" {
  // eslint-disable-next-line @typescript-eslint/no-unused-vars -- merging needs the same type parameter
  interface RedisCommander<Context> {
    mvpcFwCreateSg(...args: (string | number)[]): Promise<Reply>;
    mvpcFwUpdateSg(...args: (string | number)[]): Promise<Reply>;
    mvpcFwDeleteSg(...args: (string | number)[]): Promise<Reply>;
    mvpcFwBind(...args: (string | number)[]): Promise<Reply>;
    mvpcFwUnbind(...args: (string | number)[]): Promise<Reply>;
    mvpcFwCreateAcl(...args: (string | number)[]): Promise<Reply>;
    mvpcFwUpdateAcl(...args: (string | number)[]): Promise<Reply>;
    mvpcFwDeleteAcl(...args: (string | number)[]): Promise<Reply>;
    mvpcFwAssociate(...args: (string | number)[]): Promise<Reply>;
    mvpcFwDisassociate(...args: (string | number)[]): Promise<Reply>;
    mvpcFwLoadVpc(...args: (string | number)[]): Promise<unknown>;
    mvpcFwVpcMembers(...args: (string | number)[]): Promise<Reply>;
    mvpcFwHostIndex(...args: (string | number)[]): Promise<Reply>;
    mvpcFwRecord(...args: (string | number)[]): Promise<Reply>;
    mvpcFwVpcEvent(...args: (string | number)[]): Promise<number>;
    mvpcFwCounterOk(...args: (string | number)[]): Promise<number>;
    mvpcFwAdoptSigs(...args: (string | number)[]): Promise<number>;
  }
}

export function defineScripts(redis: Redis): void {
  if ((redis as unknown as { mvpcFwCreateSg?: unknown }).mvpcFwCreateSg) return;
  const def = (name: string, lua: string) => redis.defineCommand(name, { numberOfKeys: 1, lua });
  // The groups' and ACLs' scripts: the key count first, then the keys (FirewallKeys).
  const declared = (name: string, lua: string) => defineVariadicCommand(redis, name, scriptFor(redis, lua));
  declared("mvpcFwCreateSg", CREATE_SG);
  declared("mvpcFwUpdateSg", UPDATE_SG);
  declared("mvpcFwDeleteSg", DELETE_SG);
  declared("mvpcFwCreateAcl", CREATE_ACL);
  declared("mvpcFwUpdateAcl", UPDATE_ACL);
  declared("mvpcFwDeleteAcl", DELETE_ACL);
  declared("mvpcFwAssociate", ASSOCIATE);
  declared("mvpcFwDisassociate", DISASSOCIATE);
  declared("mvpcFwVpcMembers", VPC_MEMBERS);
  declared("mvpcFwHostIndex", HOST_INDEX);
  declared("mvpcFwRecord", RECORD);
  declared("mvpcFwVpcEvent", VPC_EVENT);
  declared("mvpcFwCounterOk", COUNTER_OK);
  def("mvpcFwBind", BIND);
  def("mvpcFwUnbind", UNBIND);
  def("mvpcFwLoadVpc", LOAD_VPC);
  def("mvpcFwAdoptSigs", ADOPT_SIGS);
}
