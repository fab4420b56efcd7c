// The only firewall module that talks to Redis. Every change is one Lua
// script: another client (and every hypervisor's sync loop) sees all of it or
// none of it, and each script appends its change event to "mvpc:events" in
// the same step, so an event is never lost or early. Reads are plain
// commands, except loadVpcState, which is one read-only script so that a
// hypervisor compiles from a consistent snapshot.
//
// Key layout (all under "mvpc:fw:"; see FK):
//   gen                          counter raised by every firewall change (events carry it)
//   sg:<id>                      hash: id vpc name description labels rules(JSON SgRule[])
//                                      peers(csv of peer group ids) logging(JSON|"") gen created updated
//   sg:<id>:members              hash nic id → address: the member index ("addresses of G" = HVALS);
//                                shared, so LOAD_VPC counts an entry only if the NIC's host vouches
//                                for it (its host:<host>:sig copy and netagent's NIC address index)
//   sg:<id>:refby                set of group ids whose rules name <id> as peer
//   vpc:<vpc>:sg:byname          hash name → id
//   vpc:<vpc>:sgs, sgs           lex zsets of "name/id" (per VPC, all)
//   acl:<id>                     hash: id vpc name description labels entries(JSON AclEntry[]) gen created updated
//   acl:<id>:subnets             set of associated subnet ids
//   vpc:<vpc>:acl:byname         hash name → id
//   vpc:<vpc>:acls, acls         lex zsets of "name/id"
//   subnet-acl                   hash subnet id → acl id (a subnet has at most one)
//   nic:<nic>                    hash: sig(JSON binding without times) host vpc subnet addr groups(csv) bound updated
//   nics                         lex zset of bound nic ids (all hosts)
//   host:<host>:nics             lex zset of nic ids bound on a host
//   vpc:<vpc>:nics               lex zset of nic ids bound in a VPC
//   host:<host>:vpc:<vpc>:nics   set: the local NICs of one VPC on one host
//   host:<host>:vpcs             set of VPC ids with bindings on a host
//   host:<host>:sig              hash nic id → sig: the host's own copy of its NICs' bindings.
//                                nic:<nic> is shared (every host's Redis user may write it,
//                                docs/redis-acl.md); only the NIC's host writes this one, and
//                                the host's sync refuses (fails closed on) a binding whose sig
//                                differs from it
// Client tokens share IPAM's "mvpc:tokens" hash ("sg\n<token>", "acl\n<token>").
//
// Keys derived from stored records (a NIC's old host, a group's peers) are
// built inside the scripts: like IPAM, this needs single-instance Redis or
// Sentinel, not Cluster.
import { randomBytes } from "node:crypto";
import { Code } from "@connectrpc/connect";
import type { Redis } from "ioredis";
import type { Logger } from "pino";
import { reportInvalid, type InvalidWhere } from "../common/invalid-records.js";
import * as V from "../common/validate.js";
import { AlreadyExistsError, DomainError, FailedPreconditionError, InvalidArgumentError, NotFoundError } from "../common/errors.js";
import { K } from "../ipam/keys.js";
import { hostKeys } from "../netagent/schema.js";
import {
  MAX_GROUPS_PER_NIC,
  MAX_RULES_PER_GROUP,
  type AclEntry,
  type BindingRec,
  type NetworkAclRec,
  type SecurityGroupRec,
  type SgRule,
  type VpcFirewallState,
} from "./model.js";
import {
  checkBinding,
  OWNER,
  parseAcl,
  parseBinding,
  parseGroup,
  parseMember,
  storedEntriesText,
  storedLoggingText,
  storedRulesText,
  type BindingSpec,
} from "./schema.js";

/** The resource changed since it was read (expected_generation no longer matches). */
export class AbortedError extends DomainError {
  readonly code = Code.Aborted;
}

const F = "mvpc:fw:";
/** netagent's host-scoped NIC address index, "<vpc>/<address>" → nic id, as prefix and suffix around the host id (for LOAD_VPC). */
const NICADDR = hostKeys.nicaddr("\u0000").split("\u0000") as [string, string];
export const FK = {
  gen: `${F}gen`,
  sg: (id: string) => `${F}sg:${id}`,
  sgMembers: (id: string) => `${F}sg:${id}:members`,
  sgRefBy: (id: string) => `${F}sg:${id}:refby`,
  sgByName: (vpc: string) => `${F}vpc:${vpc}:sg:byname`,
  vpcSgs: (vpc: string) => `${F}vpc:${vpc}:sgs`,
  allSgs: `${F}sgs`,
  acl: (id: string) => `${F}acl:${id}`,
  aclSubnets: (id: string) => `${F}acl:${id}:subnets`,
  aclByName: (vpc: string) => `${F}vpc:${vpc}:acl:byname`,
  vpcAcls: (vpc: string) => `${F}vpc:${vpc}:acls`,
  allAcls: `${F}acls`,
  subnetAcl: `${F}subnet-acl`,
  nic: (id: string) => `${F}nic:${id}`,
  allNics: `${F}nics`,
  hostNics: (host: string) => `${F}host:${host}:nics`,
  vpcNics: (vpc: string) => `${F}vpc:${vpc}:nics`,
  hostVpcNics: (host: string, vpc: string) => `${F}host:${host}:vpc:${vpc}:nics`,
  hostVpcs: (host: string) => `${F}host:${host}:vpcs`,
  hostSigs: (host: string) => `${F}host:${host}:sig`,
};

/** Kinds of the events appended to "mvpc:events" (field "kind"). */
export const EVENT_KINDS = [
  "fw.sg.created",
  "fw.sg.updated",
  "fw.sg.deleted",
  "fw.binding.changed",
  "fw.binding.removed",
  "fw.acl.created",
  "fw.acl.updated",
  "fw.acl.deleted",
  "fw.acl.associated",
  "fw.acl.disassociated",
] as const;

// ---------- Lua ----------

// Shared by every script. Names here must match FK.
const LUA_COMMON = `
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
 * 7 group ids (csv), 8 now. Returns {1} changed, {0} already so,
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
emit('fw.binding.changed', vpc, 'nic', nic, 'host', host, 'address', addr, 'groups', gcsv, unpack(extra))
return {1, ''}
`;

/** KEYS: 1 nic hash. ARGV: 1 nic. Returns {1, vpc} removed, {0} absent. */
const UNBIND = `${LUA_COMMON}${LUA_NIC}
local nic = ARGV[1]
local old = redis.call('HMGET', KEYS[1], 'sig', 'host', 'vpc', 'groups', 'addr')
if not old[1] then return {0, ''} end
unindex(nic, old[2], old[3], old[4])
redis.call('DEL', KEYS[1])
redis.call('ZREM', F .. 'nics', nic)
emit('fw.binding.removed', old[3], 'nic', nic, 'host', old[2], 'address', old[5], 'groups', old[4] or '')
return {1, old[3]}
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
 * 2 subnet ids (csv). Returns {nics, groups, members, acls}:
 *   nics    {nic, sig, bound, updated} per bound NIC
 *   groups  {group id, HGETALL…} of every group the NICs use and every group those name as peer
 *   members {group, nic, addr, nic, addr, …} per peer group
 *   acls    {subnet, HGETALL of its ACL, subnet ids of the ACL} per subnet with one
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
-- ARGV[3]: the host, whose own copy of each sig comes along (false if none).
local own = ARGV[3] and ARGV[3] ~= '' and get('HGETALL', F .. 'host:' .. ARGV[3] .. ':sig') or {}
local mine = {}
for i = 1, #own, 2 do mine[own[i]] = own[i + 1] end
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
local acls = {}
for _, s in ipairs(split(ARGV[2])) do
  local a = get('HGET', SUBNET_ACL, s)
  if a then
    local h = get('HGETALL', F .. 'acl:' .. a)
    if h and #h > 0 then acls[#acls + 1] = {s, h, get('SMEMBERS', F .. 'acl:' .. a .. ':subnets') or {}} end
  end
end
return {nics, groups, members, acls, bad, refused}
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

type Reply = [number, string | number, number?];

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

function defineScripts(redis: Redis): void {
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

// ---------- records ----------

export function newId(kind: "sg" | "acl"): string {
  return `${kind}-${randomBytes(6).toString("hex")}`;
}

type Logging = { ratePerSecond: number; burst: number } | undefined;

function flat(obj: Record<string, string | number>): (string | number)[] {
  return Object.entries(obj).flat();
}

function pairs(a: string[]): Record<string, string> {
  const h: Record<string, string> = {};
  for (let i = 0; i + 1 < a.length; i += 2) h[a[i]] = a[i + 1];
  return h;
}

export type { BindingSpec } from "./schema.js";

function bindingSig(b: BindingSpec): string {
  const s: BindingSpec = {
    nicId: b.nicId,
    vpcId: b.vpcId,
    subnetId: b.subnetId,
    address: b.address,
    mac: b.mac,
    hostId: b.hostId,
    hostIf: b.hostIf,
    groupIds: b.groupIds,
  };
  if (b.dropLogging) s.dropLogging = { ratePerSecond: b.dropLogging.ratePerSecond, burst: b.dropLogging.burst };
  return JSON.stringify(s);
}

/** Peer group ids named by rules, sorted, once each. */
export function peersOf(rules: SgRule[]): string[] {
  return [...new Set(rules.flatMap((r) => (r.group ? [r.group] : [])))].sort();
}

export interface GroupChange {
  rules?: SgRule[];
  description?: string;
  /** null turns drop logging off; undefined leaves it. */
  dropLogging?: Logging | null;
}

export interface AclChange {
  entries?: AclEntry[];
  description?: string;
}

export type BindingIndex = { kind: "all" } | { kind: "host"; hostId: string } | { kind: "vpc"; vpcId: string } | { kind: "group"; groupId: string };

/** The subset of a NIC loadVpcState needs when the caller lists the local NICs. */
export type LocalNic = Pick<BindingRec, "nicId" | "vpcId" | "subnetId" | "address" | "mac" | "hostIf"> & Partial<BindingRec>;

/** The hash field a refused record's reason names first, if the hash has it (for status). */
function namedField(h: Record<string, string>, p: V.Parsed<unknown>): string | undefined {
  if (p.ok) return undefined;
  const named = /^([A-Za-z_][A-Za-z0-9_]*)/.exec(p.reason)?.[1];
  return named !== undefined && Object.hasOwn(h, named) ? named : undefined;
}

/** Where a binding is: its "sig" field, and the VPC it names if that reads as a VPC id. */
function bindingWhere(sig: string): InvalidWhere {
  let vpcId: unknown;
  try {
    vpcId = (JSON.parse(sig) as { vpcId?: unknown } | null)?.vpcId;
  } catch {
    vpcId = undefined;
  }
  return { field: "sig", vpcId: typeof vpcId === "string" && /^vpc-[0-9a-f]{12}$/.test(vpcId) ? vpcId : undefined };
}

export class FirewallStore {
  /** log: where skipped records are reported (once per key and reason). */
  constructor(
    readonly redis: Redis,
    readonly log?: Pick<Logger, "warn">,
  ) {
    defineScripts(redis);
  }

  /** The value of a record that parsed; otherwise reports it (logged and counted once) and gives null. */
  private ok<T>(kind: string, key: string, p: V.Parsed<T>, where?: () => InvalidWhere): T | null {
    if (p.ok) return p.value;
    reportInvalid(OWNER, kind, key, p.reason, this.log, where?.());
    return null;
  }

  /** HGETALL that reads a key holding something other than a hash as a bad record. */
  private async hash(kind: string, key: string): Promise<Record<string, string> | null> {
    try {
      return await this.redis.hgetall(key);
    } catch (err) {
      if (!/WRONGTYPE/.test((err as Error).message)) throw err;
      reportInvalid(OWNER, kind, key, "is not a hash", this.log);
      return null;
    }
  }

  private groupError(code: number, detail: string | number, field: string, vpcId: string): never {
    const [g, other] = String(detail).split(",");
    if (code === -3) throw new NotFoundError("security group", g, `${field} names it; it was deleted`);
    if (code === -5) throw new InvalidArgumentError(field, `security group ${g} belongs to VPC ${other}, not ${vpcId}; groups must be in the same VPC`);
    if (code === -4) throw new NotFoundError("vpc", vpcId, "it was deleted");
    throw new Error(`firewall script returned ${code} ${detail}`);
  }

  // ---- security groups ----

  /** Creates a group; rules must be normalized and their peers resolved to ids. */
  async createGroup(
    g: Omit<SecurityGroupRec, "generation" | "createdMs" | "updatedMs" | "id"> & { id?: string },
    clientToken: string,
  ): Promise<{ group: SecurityGroupRec; created: boolean }> {
    const id = g.id ?? newId("sg");
    if (g.rules.length > MAX_RULES_PER_GROUP)
      throw new InvalidArgumentError("rules", `has ${g.rules.length} rules; a group holds at most ${MAX_RULES_PER_GROUP}`);
    const now = Date.now();
    const peers = peersOf(g.rules);
    const fields = {
      id,
      vpc: g.vpcId,
      name: g.name,
      description: g.description,
      labels: JSON.stringify(g.labels),
      rules: storedRulesText(g.rules),
      peers: peers.join(","),
      logging: storedLoggingText(g.dropLogging),
      gen: 1,
      created: now,
      updated: now,
    };
    const [code, ref] = await this.redis.mvpcFwCreateSg(FK.sg(id), id, g.vpcId, g.name, clientToken, peers.join(","), ...flat(fields));
    if (code === -1)
      throw new AlreadyExistsError(
        `VPC ${g.vpcId} already has a security group named ${JSON.stringify(g.name)} (${ref}); pick another name or update that group`,
      );
    if (code < 0) this.groupError(code, ref, "rules", g.vpcId);
    const group = await this.getGroup(String(ref));
    if (!group) throw new NotFoundError("security group", String(ref), "it was deleted while being created");
    return { group, created: code === 1 };
  }

  async getGroup(id: string): Promise<SecurityGroupRec | null> {
    const h = await this.hash("security-group", FK.sg(id));
    return h && Object.keys(h).length ? this.ok("security-group", FK.sg(id), parseGroup(h, id)) : null;
  }

  async resolveGroup(vpcId: string, name: string): Promise<string | null> {
    return await this.redis.hget(FK.sgByName(vpcId), name);
  }

  /** NICs bound to each group, on every host. */
  async memberCounts(ids: string[]): Promise<number[]> {
    if (ids.length === 0) return [];
    const p = this.redis.pipeline();
    for (const id of ids) p.hlen(FK.sgMembers(id));
    const r = (await p.exec()) ?? [];
    return r.map(([err, n]) => {
      if (err) throw err;
      return Number(n);
    });
  }

  /** Members of a group: nic id → address. */
  async groupMembers(id: string): Promise<Map<string, string>> {
    const out = new Map<string, string>();
    for (const [nic, addr] of Object.entries((await this.hash("member", FK.sgMembers(id))) ?? {})) {
      const a = this.ok("member", FK.sgMembers(id), parseMember(nic, addr), () => ({ field: nic }));
      if (a !== null) out.set(nic, a);
    }
    return out;
  }

  /** Groups ordered by name (then id), after the cursor "name/id". */
  async listGroups(vpcId: string | null, after: string, limit: number): Promise<SecurityGroupRec[]> {
    const key = vpcId ? FK.vpcSgs(vpcId) : FK.allSgs;
    const members = await this.redis.zrangebylex(key, after ? `(${after}` : "-", "+", "LIMIT", 0, limit);
    const groups = await Promise.all(members.map((m) => this.getGroup(m.slice(m.lastIndexOf("/") + 1))));
    return groups.filter((x): x is SecurityGroupRec => !!x);
  }

  /**
   * Writes a change computed from the group at generation `fromGeneration`.
   * AbortedError if the group changed meanwhile (the caller re-reads and
   * recomputes, or reports ABORTED when the client asked for a generation).
   */
  async updateGroup(g: SecurityGroupRec, fromGeneration: number, change: GroupChange): Promise<SecurityGroupRec> {
    const fields: Record<string, string | number> = { updated: Date.now() };
    let peers = peersOf(g.rules);
    if (change.rules) {
      if (change.rules.length > MAX_RULES_PER_GROUP)
        throw new InvalidArgumentError("rules", `the group would have ${change.rules.length} rules; a group holds at most ${MAX_RULES_PER_GROUP}`);
      fields.rules = storedRulesText(change.rules);
      peers = peersOf(change.rules);
      fields.peers = peers.join(",");
    }
    if (change.description !== undefined) fields.description = change.description;
    if (change.dropLogging !== undefined) fields.logging = storedLoggingText(change.dropLogging);
    const [code, detail] = await this.redis.mvpcFwUpdateSg(FK.sg(g.id), g.id, fromGeneration, peers.join(","), ...flat(fields));
    if (code === -2) {
      throw new AbortedError(
        `security group ${g.name} (${g.id}) is at generation ${detail}, not ${fromGeneration}; it changed meanwhile: get it again and retry`,
      );
    }
    if (code === -4) throw new NotFoundError("security group", g.id, "it was deleted");
    if (code < 0) this.groupError(code, detail, "rules", g.vpcId);
    const after = await this.getGroup(g.id);
    if (!after) throw new NotFoundError("security group", g.id, "it was deleted");
    return after;
  }

  /** FailedPreconditionError while NICs are bound to it or other groups name it. */
  async deleteGroup(id: string): Promise<boolean> {
    const [code, list, n] = await this.redis.mvpcFwDeleteSg(FK.sg(id), id);
    const more = (n ?? 0) > 10 ? ` and ${(n ?? 0) - 10} more` : "";
    if (code === -1) {
      throw new FailedPreconditionError(
        `security group ${id} is still bound to ${n} NIC(s): ${String(list).split(",").join(", ")}${more}; unbind them or bind them to other groups first (microvpc sg bindings --group ${id})`,
      );
    }
    if (code === -2) {
      throw new FailedPreconditionError(
        `security group ${id} is named as peer by the rules of ${n} other group(s): ${String(list).split(",").join(", ")}${more}; remove those rules first`,
      );
    }
    return code === 1;
  }

  // ---- NIC bindings ----

  /** Upgrade step at start (ADOPT_SIGS): this host's copy of each of its older bindings' sig; the number copied. */
  async adoptOwnSigs(hostId: string): Promise<number> {
    return this.redis.mvpcFwAdoptSigs(FK.hostNics(hostId), hostId, FK.hostSigs(hostId));
  }

  /** Binds (or rebinds) a NIC; changed=false if the binding was already exactly so. */
  async bind(b: BindingSpec): Promise<{ binding: BindingRec; changed: boolean }> {
    if (b.groupIds.length > MAX_GROUPS_PER_NIC) {
      throw new InvalidArgumentError("security_groups", `has ${b.groupIds.length} groups; a NIC can be in at most ${MAX_GROUPS_PER_NIC}`);
    }
    checkBinding(b);
    const [code, detail] = await this.redis.mvpcFwBind(
      FK.nic(b.nicId),
      b.nicId,
      bindingSig(b),
      b.hostId,
      b.vpcId,
      b.subnetId,
      b.address,
      b.groupIds.join(","),
      Date.now(),
    );
    if (code < 0) this.groupError(code, detail, "security_groups", b.vpcId);
    const binding = await this.getBinding(b.nicId);
    if (!binding) throw new NotFoundError("binding", b.nicId, "it was removed while being made");
    return { binding, changed: code === 1 };
  }

  /** Returns false if the NIC had no binding. */
  async unbind(nicId: string): Promise<boolean> {
    const [code] = await this.redis.mvpcFwUnbind(FK.nic(nicId), nicId);
    return code === 1;
  }

  async getBinding(nicId: string): Promise<BindingRec | null> {
    const [sig, bound, updated] = await this.redis.hmget(FK.nic(nicId), "sig", "bound", "updated");
    return sig ? this.ok("binding", FK.nic(nicId), parseBinding(sig, bound, updated, nicId), () => bindingWhere(sig)) : null;
  }

  /** Bindings of the given NICs that exist, by nic id (one round trip). */
  async bindingsOf(nicIds: string[]): Promise<Map<string, BindingRec>> {
    const out = new Map<string, BindingRec>();
    if (nicIds.length === 0) return out;
    const p = this.redis.pipeline();
    for (const id of nicIds) p.hmget(FK.nic(id), "sig", "bound", "updated");
    const r = (await p.exec()) ?? [];
    r.forEach(([err, v], i) => {
      if (err) throw err;
      const [sig, bound, updated] = v as (string | null)[];
      const b = sig ? this.ok("binding", FK.nic(nicIds[i]), parseBinding(sig, bound, updated, nicIds[i]), () => bindingWhere(sig)) : null;
      if (b) out.set(nicIds[i], b);
    });
    return out;
  }

  /** Nic ids of one index, ordered, after the cursor. */
  async listBindingIds(index: BindingIndex, after: string, limit: number): Promise<string[]> {
    if (index.kind === "group") {
      const ids = (await this.redis.hkeys(FK.sgMembers(index.groupId))).sort();
      return ids.filter((id) => id > after).slice(0, limit);
    }
    const key = index.kind === "host" ? FK.hostNics(index.hostId) : index.kind === "vpc" ? FK.vpcNics(index.vpcId) : FK.allNics;
    return await this.redis.zrangebylex(key, after ? `(${after}` : "-", "+", "LIMIT", 0, limit);
  }

  /** VPC ids with at least one NIC bound on the host, sorted. */
  async vpcsWithBindingsOnHost(hostId: string): Promise<string[]> {
    return (await this.redis.smembers(FK.hostVpcs(hostId))).sort();
  }

  // ---- network ACLs ----

  async createAcl(
    a: Omit<NetworkAclRec, "id" | "generation" | "createdMs" | "updatedMs">,
    clientToken: string,
  ): Promise<{ acl: NetworkAclRec; created: boolean }> {
    const id = newId("acl");
    const now = Date.now();
    const fields = {
      id,
      vpc: a.vpcId,
      name: a.name,
      description: a.description,
      labels: JSON.stringify(a.labels),
      entries: storedEntriesText(a.entries),
      gen: 1,
      created: now,
      updated: now,
    };
    const subnets = [...new Set(a.subnetIds)];
    const [code, ref] = await this.redis.mvpcFwCreateAcl(FK.acl(id), id, a.vpcId, a.name, clientToken, subnets.join(","), now, ...flat(fields));
    if (code === -1)
      throw new AlreadyExistsError(`VPC ${a.vpcId} already has a network ACL named ${JSON.stringify(a.name)} (${ref}); pick another name or update that ACL`);
    if (code < 0) this.subnetError(code, ref, "subnets", a.vpcId);
    const acl = await this.getAcl(String(ref));
    if (!acl) throw new NotFoundError("network ACL", String(ref), "it was deleted while being created");
    return { acl, created: code === 1 };
  }

  private subnetError(code: number, detail: string | number, field: string, vpcId: string): never {
    const [s, other] = String(detail).split(",");
    if (code === -4) throw new NotFoundError("vpc", vpcId, "it was deleted");
    if (code === -7) throw new NotFoundError("subnet", s, "it was deleted");
    if (code === -6) throw new InvalidArgumentError(field, `subnet ${s} belongs to VPC ${other}, not ${vpcId}; an ACL only applies to subnets of its VPC`);
    throw new Error(`firewall script returned ${code} ${detail}`);
  }

  async getAcl(id: string): Promise<NetworkAclRec | null> {
    const [h, subnets] = await Promise.all([this.hash("network-acl", FK.acl(id)), this.redis.smembers(FK.aclSubnets(id)).catch(() => [] as string[])]);
    return h && Object.keys(h).length ? this.ok("network-acl", FK.acl(id), parseAcl(h, subnets, id)) : null;
  }

  async resolveAcl(vpcId: string, name: string): Promise<string | null> {
    return await this.redis.hget(FK.aclByName(vpcId), name);
  }

  async listAcls(vpcId: string | null, after: string, limit: number): Promise<NetworkAclRec[]> {
    const key = vpcId ? FK.vpcAcls(vpcId) : FK.allAcls;
    const members = await this.redis.zrangebylex(key, after ? `(${after}` : "-", "+", "LIMIT", 0, limit);
    const acls = await Promise.all(members.map((m) => this.getAcl(m.slice(m.lastIndexOf("/") + 1))));
    return acls.filter((x): x is NetworkAclRec => !!x);
  }

  /** As updateGroup: AbortedError if the ACL changed since fromGeneration. */
  async updateAcl(a: NetworkAclRec, fromGeneration: number, change: AclChange): Promise<NetworkAclRec> {
    const fields: Record<string, string | number> = { updated: Date.now() };
    if (change.entries) fields.entries = storedEntriesText(change.entries);
    if (change.description !== undefined) fields.description = change.description;
    const [code, detail] = await this.redis.mvpcFwUpdateAcl(FK.acl(a.id), a.id, fromGeneration, ...flat(fields));
    if (code === -2)
      throw new AbortedError(`network ACL ${a.name} (${a.id}) is at generation ${detail}, not ${fromGeneration}; it changed meanwhile: get it again and retry`);
    if (code === -4) throw new NotFoundError("network ACL", a.id, "it was deleted");
    const after = await this.getAcl(a.id);
    if (!after) throw new NotFoundError("network ACL", a.id, "it was deleted");
    return after;
  }

  /** FailedPreconditionError while subnets are associated. */
  async deleteAcl(id: string): Promise<boolean> {
    const [code, list, n] = await this.redis.mvpcFwDeleteAcl(FK.acl(id), id);
    if (code === -1) {
      const more = (n ?? 0) > 10 ? ` and ${(n ?? 0) - 10} more` : "";
      throw new FailedPreconditionError(
        `network ACL ${id} is still associated with ${n} subnet(s): ${String(list).split(",").join(", ")}${more}; disassociate them (or associate them with another ACL) first`,
      );
    }
    return code === 1;
  }

  /** Associates; returns whether anything changed and the subnet's previous ACL ('' if none). */
  async associate(aclId: string, vpcId: string, subnetId: string): Promise<{ changed: boolean; previous: string }> {
    const [code, prev] = await this.redis.mvpcFwAssociate(FK.acl(aclId), aclId, subnetId, Date.now());
    if (code === -4) throw new NotFoundError("network ACL", aclId, "it was deleted");
    if (code < 0) this.subnetError(code, prev, "subnet", vpcId);
    return { changed: code === 1, previous: String(prev) };
  }

  /** Returns the ACL the subnet had, or ''. */
  async disassociate(subnetId: string): Promise<string> {
    const [, prev] = await this.redis.mvpcFwDisassociate(FK.subnetAcl, subnetId, Date.now());
    return String(prev);
  }

  async aclOfSubnet(subnetId: string): Promise<string | null> {
    return await this.redis.hget(FK.subnetAcl, subnetId);
  }

  async aclsOfSubnets(subnetIds: string[]): Promise<(string | null)[]> {
    if (subnetIds.length === 0) return [];
    return await this.redis.hmget(FK.subnetAcl, ...subnetIds);
  }

  // ---- what a hypervisor compiles ----

  /** The firewall change counter; every event carries its value as "gen". */
  async generation(): Promise<number> {
    return Number((await this.redis.get(FK.gen)) ?? 0);
  }

  /**
   * Everything one hypervisor needs to compile one VPC, read in one atomic
   * snapshot. `nics` are the VPC's NICs on this host (e.g. from netagent's
   * desired state); each gets its binding's groups, drop logging and times
   * from the snapshot (groupIds [] if unbound), the rest as given. Without
   * `nics`, the NICs bound on this host in the VPC are used as bound.
   * `acls` is keyed by subnet id: the subnets given plus the NICs' subnets.
   * `members` holds, for every group named as peer, its members' addresses
   * on every host (sorted, once each).
   */
  async loadVpcState(
    hostId: string,
    vpcId: string,
    subnets: { subnetId: string; cidr: string; bridge: string }[],
    nics?: LocalNic[],
  ): Promise<VpcFirewallState> {
    const subnetIds = [...new Set([...subnets.map((s) => s.subnetId), ...(nics ?? []).map((n) => n.subnetId)])];
    const raw = (await this.redis.mvpcFwLoadVpc(
      FK.hostVpcNics(hostId, vpcId),
      nics ? nics.map((n) => n.nicId).join(",") : "*",
      subnetIds.join(","),
      hostId,
      vpcId,
    )) as [
      [string, string, string, string, string | null][],
      string[][],
      string[][],
      [string, string[], string[]][],
      string[],
      [string, string, string, string][],
    ];
    // Fail closed: what a refused record governed is denied, not opened. A
    // NIC whose binding is refused, and a group that is refused, become the
    // empty group CLOSED_GROUP (nothing allowed either way); a refused ACL
    // becomes an ACL without entries (the subnet's default deny).
    const refusedBinding = new Set<string>();
    const [rawNics, rawGroups, rawMembers, rawAcls, wrongType, refusedMembers] = raw;
    for (const key of wrongType ?? []) reportInvalid(OWNER, "key", key, "holds another Redis type than its schema says", this.log, { vpcId });
    // Member entries no host vouches for (docs/redis-acl.md): left out, so
    // "from group G" admits only addresses G's members' own hosts stand for.
    for (const [gid, nic, addr, why] of refusedMembers ?? []) {
      reportInvalid(OWNER, "member", FK.sgMembers(gid), `${V.show(nic)} at ${V.show(addr)}: ${why}`, this.log, { field: nic, vpcId });
    }

    // A binding, group, member or ACL that does not validate is skipped (a
    // NIC whose binding is bad is compiled as unbound); the rest converges.
    const bound = new Map<string, BindingRec>();
    for (const [nic, sig, b, u, own] of rawNics) {
      // Another host may have rewritten the shared record (docs/redis-acl.md):
      // refused unless it is what this host bound. No copy: a binding from
      // before the copy existed, taken as it is (BindNic makes the copy).
      if (own !== null && own !== sig) {
        reportInvalid(OWNER, "binding", FK.nic(nic), `differs from this host's own copy in ${FK.hostSigs(hostId)}: rewritten by someone else`, this.log, {
          field: "sig",
          vpcId: bindingWhere(sig).vpcId ?? vpcId,
        });
        refusedBinding.add(nic);
        continue;
      }
      const rec = this.ok("binding", FK.nic(nic), parseBinding(sig, b, u, nic), () => ({ field: "sig", vpcId: bindingWhere(sig).vpcId ?? vpcId }));
      if (rec) bound.set(nic, rec);
      else refusedBinding.add(nic);
    }
    let out: BindingRec[];
    if (nics) {
      out = nics.map((n) => {
        const b = bound.get(n.nicId);
        const rec: BindingRec = {
          nicId: n.nicId,
          vpcId: n.vpcId,
          subnetId: n.subnetId,
          address: n.address,
          mac: n.mac,
          hostId,
          hostIf: n.hostIf,
          groupIds: refusedBinding.has(n.nicId) ? [CLOSED_GROUP] : (b?.groupIds ?? []),
          boundMs: b?.boundMs ?? 0,
          updatedMs: b?.updatedMs ?? 0,
        };
        if (b?.dropLogging) rec.dropLogging = b.dropLogging;
        return rec;
      });
    } else {
      out = [...bound.values()];
    }
    out.sort((a, b) => (a.nicId < b.nicId ? -1 : a.nicId > b.nicId ? 1 : 0));

    const groups = new Map<string, SecurityGroupRec>();
    for (const [gid, ...h] of rawGroups) {
      const gh = pairs(h);
      const pg = parseGroup(gh, gid);
      const g = this.ok("security-group", FK.sg(gid), pg, () => ({ field: namedField(gh, pg), vpcId }));
      if (g) groups.set(g.id, g);
      else if (SG_ID.test(gid)) groups.set(gid, closedGroup(gid, vpcId));
    }
    if (refusedBinding.size) groups.set(CLOSED_GROUP, closedGroup(CLOSED_GROUP, vpcId));
    for (const key of wrongType ?? []) {
      const m = /^mvpc:fw:sg:(sg-[0-9a-f]{12})$/.exec(key);
      if (m && !groups.has(m[1])) groups.set(m[1], closedGroup(m[1], vpcId));
    }
    const members = new Map<string, string[]>();
    for (const [gid, ...kv] of rawMembers) {
      const addrs = new Set<string>();
      for (let i = 1; i < kv.length; i += 2) {
        const a = this.ok("member", FK.sgMembers(gid), parseMember(kv[i - 1], kv[i]), () => ({ field: kv[i - 1], vpcId }));
        if (a !== null) addrs.add(a);
      }
      members.set(gid, [...addrs].sort(compareIp));
    }
    const acls = new Map<string, NetworkAclRec>();
    for (const [subnetId, h, subs] of rawAcls) {
      const hh = pairs(h);
      const pa = parseAcl(hh, subs);
      const a = this.ok("network-acl", FK.acl(String(hh.id)), pa, () => ({ field: namedField(hh, pa), vpcId }));
      acls.set(subnetId, a ?? closedAcl(subnetId, vpcId));
    }
    return { vpcId, subnets, nics: out, groups, members, acls };
  }
}

const SG_ID = /^sg-[0-9a-f]{12}$/;
/** The group a NIC whose binding was refused is put in: no rules, so nothing passes. */
export const CLOSED_GROUP = "sg-000000000000";

function closedGroup(id: string, vpcId: string): SecurityGroupRec {
  return {
    id,
    vpcId,
    name: "refused-record",
    description: "stands for a record that did not validate: allows nothing",
    labels: [],
    rules: [],
    generation: 0,
    createdMs: 0,
    updatedMs: 0,
  };
}

function closedAcl(subnetId: string, vpcId: string): NetworkAclRec {
  return {
    id: "acl-000000000000",
    vpcId,
    name: "refused-record",
    description: "stands for a record that did not validate: denies everything",
    labels: [],
    entries: [],
    subnetIds: [subnetId],
    generation: 0,
    createdMs: 0,
    updatedMs: 0,
  };
}

function compareIp(a: string, b: string): number {
  const n = (s: string) => s.split(".").reduce((acc, x) => acc * 256 + Number(x), 0);
  return n(a) - n(b);
}
