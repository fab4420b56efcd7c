// The firewall's Lua scripts: every change is one script, which appends
// its event to "mvpc:events" in the same step; LOAD_VPC is the read-only
// snapshot a hypervisor compiles from. Registered on a connection by
// defineScripts (ioredis defineCommand: EVALSHA, loaded on first use).
import type { Redis } from "ioredis";
import { K } from "../ipam/schema.js";
import { F, NICADDR, VPN_CLIENTS, VPN_EP } from "./keys.js";
import { LUA_EMIT } from "../common/events.js";

// ---------- Lua ----------

// Shared by every script. Names here must match FK.
const LUA_COMMON = `${LUA_EMIT}
local F = '${F}'
local EV = '${K.events}'
local TOKENS = '${K.tokens}'
local SUBNET_ACL = F .. 'subnet-acl'
local function split(s)
  local t = {}
  if s then for x in string.gmatch(s, '[^,]+') do t[#t + 1] = x end end
  return t
end
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
local function fields_from(first)
  local f = {}
  for i = first, #ARGV do f[#f + 1] = ARGV[i] end
  return f
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

const LUA_ACL = `
-- Points a subnet at an ACL, taking it from its previous one (whose
-- generation rises). Returns the previous ACL id or ''.
local function associate(id, s, now)
  local prev = redis.call('HGET', SUBNET_ACL, s)
  if prev == id then return '' end
  if prev then
    redis.call('SREM', F .. 'acl:' .. prev .. ':subnets', s)
    redis.call('HINCRBY', F .. 'acl:' .. prev, 'gen', 1)
    redis.call('HSET', F .. 'acl:' .. prev, 'updated', now)
  end
  redis.call('HSET', SUBNET_ACL, s, id)
  redis.call('SADD', F .. 'acl:' .. id .. ':subnets', s)
  return prev or ''
end
-- Every subnet must exist (in IPAM) and belong to the VPC.
local function check_subnets(subnets, vpc)
  for _, s in ipairs(subnets) do
    local v = redis.call('HGET', 'mvpc:subnet:' .. s, 'vpc')
    if not v then return {-7, s} end
    if v ~= vpc then return {-6, s .. ',' .. v} end
  end
  return nil
end
`;

/**
 * KEYS: 1 group hash. ARGV: 1 id, 2 vpc, 3 name, 4 client token, 5 peer ids
 * (csv), then field/value pairs. Returns {1, id} created, {0, id} found by
 * token, {-1, id} name taken, {-3, g} peer missing, {-5, "g,vpc"} peer of
 * another VPC, {-4} VPC gone.
 */
const CREATE_SG = `${LUA_COMMON}
local id, vpc, name, tok = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('EXISTS', 'mvpc:vpc:' .. vpc) == 0 then return {-4, vpc} end
if tok ~= '' then
  local prev = redis.call('HGET', TOKENS, 'sg\\n' .. tok)
  if prev and redis.call('EXISTS', F .. 'sg:' .. prev) == 1 then return {0, prev} end
end
local taken = redis.call('HGET', F .. 'vpc:' .. vpc .. ':sg:byname', name)
if taken then return {-1, taken} end
local peers = split(ARGV[5])
local bad = check_groups(peers, vpc, id)
if bad then return bad end
redis.call('HSET', KEYS[1], unpack(fields_from(6)))
redis.call('HSET', F .. 'vpc:' .. vpc .. ':sg:byname', name, id)
redis.call('ZADD', F .. 'vpc:' .. vpc .. ':sgs', 0, name .. '/' .. id)
redis.call('ZADD', F .. 'sgs', 0, name .. '/' .. id)
for _, p in ipairs(peers) do redis.call('SADD', F .. 'sg:' .. p .. ':refby', id) end
if tok ~= '' then redis.call('HSET', TOKENS, 'sg\\n' .. tok, id) end
emit('fw.sg.created', vpc, 'sg', id, 'name', name)
return {1, id}
`;

/**
 * KEYS: 1 group hash. ARGV: 1 id, 2 generation the change was computed
 * from, 3 new peer ids (csv), then field/value pairs. Returns {1, gen},
 * {-2, current gen} changed meanwhile, {-4} gone, {-3}/{-5} as CREATE_SG.
 */
const UPDATE_SG = `${LUA_COMMON}
local id = ARGV[1]
local vpc = redis.call('HGET', KEYS[1], 'vpc')
if not vpc then return {-4, ''} end
local gen = tonumber(redis.call('HGET', KEYS[1], 'gen'))
if gen ~= tonumber(ARGV[2]) then return {-2, gen} end
local peers = split(ARGV[3])
local bad = check_groups(peers, vpc, id)
if bad then return bad end
for _, p in ipairs(split(redis.call('HGET', KEYS[1], 'peers'))) do redis.call('SREM', F .. 'sg:' .. p .. ':refby', id) end
for _, p in ipairs(peers) do redis.call('SADD', F .. 'sg:' .. p .. ':refby', id) end
redis.call('HSET', KEYS[1], 'gen', gen + 1, unpack(fields_from(4)))
emit('fw.sg.updated', vpc, 'sg', id, 'sg_gen', gen + 1)
return {1, gen + 1}
`;

/**
 * KEYS: 1 group hash. ARGV: 1 id. Returns {1} deleted, {0} absent,
 * {-1, nics, n} bound NICs, {-2, groups, n} groups naming it as peer.
 */
const DELETE_SG = `${LUA_COMMON}
local id = ARGV[1]
local vpc = redis.call('HGET', KEYS[1], 'vpc')
if not vpc then return {0, '', 0} end
local nics = redis.call('HKEYS', F .. 'sg:' .. id .. ':members')
if #nics > 0 then
  table.sort(nics)
  return {-1, table.concat(nics, ',', 1, math.min(#nics, 10)), #nics}
end
local refs = {}
for _, g in ipairs(redis.call('SMEMBERS', F .. 'sg:' .. id .. ':refby')) do
  if g ~= id then refs[#refs + 1] = g end
end
if #refs > 0 then
  table.sort(refs)
  return {-2, table.concat(refs, ',', 1, math.min(#refs, 10)), #refs}
end
for _, p in ipairs(split(redis.call('HGET', KEYS[1], 'peers'))) do redis.call('SREM', F .. 'sg:' .. p .. ':refby', id) end
local name = redis.call('HGET', KEYS[1], 'name')
redis.call('DEL', KEYS[1], F .. 'sg:' .. id .. ':members', F .. 'sg:' .. id .. ':refby')
redis.call('HDEL', F .. 'vpc:' .. vpc .. ':sg:byname', name)
redis.call('ZREM', F .. 'vpc:' .. vpc .. ':sgs', name .. '/' .. id)
redis.call('ZREM', F .. 'sgs', name .. '/' .. id)
emit('fw.sg.deleted', vpc, 'sg', id, 'name', name)
return {1, '', 0}
`;

/**
 * KEYS: 1 nic hash. ARGV: 1 nic, 2 sig, 3 host, 4 vpc, 5 subnet, 6 address,
 * 7 group ids (csv), 8 now. Returns {1, gen of its event} changed, {0} already so,
 * {-3}/{-5} as CREATE_SG.
 */
const BIND = `${LUA_COMMON}${LUA_NIC}
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
local nic = ARGV[1]
local old = redis.call('HMGET', KEYS[1], 'sig', 'host', 'vpc', 'groups', 'addr')
if not old[1] then return {0, ''} end
unindex(nic, old[2], old[3], old[4])
redis.call('DEL', KEYS[1])
redis.call('ZREM', F .. 'nics', nic)
local g = emit('fw.binding.removed', old[3], 'nic', nic, 'host', old[2], 'address', old[5], 'groups', old[4] or '')
return {1, old[3], tostring(g), old[2] or ''}
`;

/**
 * KEYS: 1 acl hash. ARGV: 1 id, 2 vpc, 3 name, 4 client token, 5 subnet ids
 * (csv), 6 now, then field/value pairs. Returns {1, id}, {0, id} found by
 * token, {-1, id} name taken, {-4} VPC gone, {-6, "subnet,vpc"} subnet of
 * another VPC, {-7, subnet} no such subnet.
 */
const CREATE_ACL = `${LUA_COMMON}${LUA_ACL}
local id, vpc, name, tok, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[6]
if redis.call('EXISTS', 'mvpc:vpc:' .. vpc) == 0 then return {-4, vpc} end
if tok ~= '' then
  local prev = redis.call('HGET', TOKENS, 'acl\\n' .. tok)
  if prev and redis.call('EXISTS', F .. 'acl:' .. prev) == 1 then return {0, prev} end
end
local taken = redis.call('HGET', F .. 'vpc:' .. vpc .. ':acl:byname', name)
if taken then return {-1, taken} end
local subnets = split(ARGV[5])
local bad = check_subnets(subnets, vpc)
if bad then return bad end
redis.call('HSET', KEYS[1], unpack(fields_from(7)))
redis.call('HSET', F .. 'vpc:' .. vpc .. ':acl:byname', name, id)
redis.call('ZADD', F .. 'vpc:' .. vpc .. ':acls', 0, name .. '/' .. id)
redis.call('ZADD', F .. 'acls', 0, name .. '/' .. id)
local prevs = {}
for _, s in ipairs(subnets) do
  local p = associate(id, s, now)
  if p ~= '' then prevs[#prevs + 1] = p end
end
if tok ~= '' then redis.call('HSET', TOKENS, 'acl\\n' .. tok, id) end
emit('fw.acl.created', vpc, 'acl', id, 'name', name, 'subnets', ARGV[5], 'prev_acls', table.concat(prevs, ','))
return {1, id}
`;

/**
 * KEYS: 1 acl hash. ARGV: 1 id, 2 generation the change was computed
 * from, then field/value pairs. Returns {1, gen}, {-2, gen}, {-4}.
 */
const UPDATE_ACL = `${LUA_COMMON}
local id = ARGV[1]
local vpc = redis.call('HGET', KEYS[1], 'vpc')
if not vpc then return {-4, ''} end
local gen = tonumber(redis.call('HGET', KEYS[1], 'gen'))
if gen ~= tonumber(ARGV[2]) then return {-2, gen} end
redis.call('HSET', KEYS[1], 'gen', gen + 1, unpack(fields_from(3)))
local subnets = redis.call('SMEMBERS', F .. 'acl:' .. id .. ':subnets')
table.sort(subnets)
emit('fw.acl.updated', vpc, 'acl', id, 'acl_gen', gen + 1, 'subnets', table.concat(subnets, ','))
return {1, gen + 1}
`;

/** KEYS: 1 acl hash. ARGV: 1 id. Returns {1} deleted, {0} absent, {-1, subnets, n}. */
const DELETE_ACL = `${LUA_COMMON}
local id = ARGV[1]
local vpc = redis.call('HGET', KEYS[1], 'vpc')
if not vpc then return {0, '', 0} end
local subnets = redis.call('SMEMBERS', F .. 'acl:' .. id .. ':subnets')
if #subnets > 0 then
  table.sort(subnets)
  return {-1, table.concat(subnets, ',', 1, math.min(#subnets, 10)), #subnets}
end
local name = redis.call('HGET', KEYS[1], 'name')
redis.call('DEL', KEYS[1], F .. 'acl:' .. id .. ':subnets')
redis.call('HDEL', F .. 'vpc:' .. vpc .. ':acl:byname', name)
redis.call('ZREM', F .. 'vpc:' .. vpc .. ':acls', name .. '/' .. id)
redis.call('ZREM', F .. 'acls', name .. '/' .. id)
emit('fw.acl.deleted', vpc, 'acl', id, 'name', name)
return {1, '', 0}
`;

/**
 * KEYS: 1 acl hash. ARGV: 1 acl id, 2 subnet id, 3 now. Returns {1, prev}
 * associated (prev = previous ACL or ''), {0, ''} already so, {-4} no
 * ACL, {-6}/{-7} as CREATE_ACL.
 */
const ASSOCIATE = `${LUA_COMMON}${LUA_ACL}
local id, s, now = ARGV[1], ARGV[2], ARGV[3]
local vpc = redis.call('HGET', KEYS[1], 'vpc')
if not vpc then return {-4, ''} end
local bad = check_subnets({s}, vpc)
if bad then return bad end
if redis.call('HGET', SUBNET_ACL, s) == id then return {0, ''} end
local prev = associate(id, s, now)
redis.call('HINCRBY', KEYS[1], 'gen', 1)
redis.call('HSET', KEYS[1], 'updated', now)
emit('fw.acl.associated', vpc, 'acl', id, 'subnet', s, 'prev_acl', prev)
return {1, prev}
`;

/** KEYS: 1 subnet→acl hash. ARGV: 1 subnet, 2 now. Returns {1, prev} or {0, ''}. */
const DISASSOCIATE = `${LUA_COMMON}
local s, now = ARGV[1], ARGV[2]
local prev = redis.call('HGET', KEYS[1], s)
if not prev then return {0, ''} end
redis.call('HDEL', KEYS[1], s)
redis.call('SREM', F .. 'acl:' .. prev .. ':subnets', s)
local vpc = redis.call('HGET', F .. 'acl:' .. prev, 'vpc')
if vpc then
  redis.call('HINCRBY', F .. 'acl:' .. prev, 'gen', 1)
  redis.call('HSET', F .. 'acl:' .. prev, 'updated', now)
end
emit('fw.acl.disassociated', vpc or '', 'acl', prev, 'subnet', s)
return {1, prev}
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
for _, nic in ipairs(ids) do
  local b = get('HMGET', F .. 'nic:' .. nic, 'sig', 'bound', 'updated', 'groups')
  if b and b[1] then
    nics[#nics + 1] = {nic, b[1], b[2], b[3], mine[nic] or false}
    for _, g in ipairs(split(b[4] or nil)) do used[g] = true end
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
-- the binding's sig, and netagent's NIC index listing the address for that
-- NIC. And an address that is a NIC of this host counts only as that NIC.
-- Refused entries come back in {group, nic, addr, reason} for reporting.
local vpc, refused = ARGV[4] or '', {}
local myidx = (ARGV[3] and ARGV[3] ~= '') and (NA1 .. ARGV[3] .. NA2) or nil
local function member_problem(p, nic, addr)
  local b = get('HMGET', F .. 'nic:' .. nic, 'sig', 'host', 'vpc', 'addr', 'groups')
  if not b or not b[1] then return 'has no binding' end
  if b[3] ~= vpc then return 'is bound in another VPC' end
  if b[4] ~= addr then return 'is bound with another address' end
  local inside = false
  for _, g in ipairs(split(b[5] or nil)) do if g == p then inside = true end end
  if not inside then return 'is not bound to this group' end
  local h = b[2]
  if type(h) ~= 'string' or not string.match(h, '^[a-z0-9-]+$') then return 'names no valid host' end
  if get('HGET', F .. 'host:' .. h .. ':sig', nic) ~= b[1] then return 'its host ' .. h .. ' holds no such binding' end
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
    if h and #h > 0 then acls[#acls + 1] = {s, h, get('SMEMBERS', F .. 'acl:' .. a .. ':subnets') or {}} end
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
    mvpcFwAdoptSigs(...args: (string | number)[]): Promise<number>;
  }
}

export function defineScripts(redis: Redis): void {
  if ((redis as unknown as { mvpcFwCreateSg?: unknown }).mvpcFwCreateSg) return;
  const def = (name: string, lua: string) => redis.defineCommand(name, { numberOfKeys: 1, lua });
  def("mvpcFwCreateSg", CREATE_SG);
  def("mvpcFwUpdateSg", UPDATE_SG);
  def("mvpcFwDeleteSg", DELETE_SG);
  def("mvpcFwBind", BIND);
  def("mvpcFwUnbind", UNBIND);
  def("mvpcFwCreateAcl", CREATE_ACL);
  def("mvpcFwUpdateAcl", UPDATE_ACL);
  def("mvpcFwDeleteAcl", DELETE_ACL);
  def("mvpcFwAssociate", ASSOCIATE);
  def("mvpcFwDisassociate", DISASSOCIATE);
  def("mvpcFwLoadVpc", LOAD_VPC);
  def("mvpcFwAdoptSigs", ADOPT_SIGS);
}
