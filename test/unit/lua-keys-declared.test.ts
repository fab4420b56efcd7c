// Redis Cluster needs every script to declare the keys it touches (KEYS),
// all in one slot (issue 18, docs/redis-schema.md "Redis Cluster"). Today
// many scripts still build key names inside Lua from stored data ('mvpc:vpc:'
// .. vpc). This reads every Lua script in services/ and counts, per script,
// the redis.call()s whose key is built in the script rather than taken from
// KEYS: a ratchet. A new one fails the test (declare the key instead); one
// that goes away fails it too, until the allowance below is lowered, so the
// inventory stays exact as the key layout moves.
//
// Read from the source text: a key that is a bare variable (an alias of a
// KEYS entry, a helper's parameter) is not counted; a key with a string
// literal or a `..` concatenation in it is.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "vitest";
import { builtKeys, tsFiles } from "../lib/lua-keys.js";

const ROOT = join(import.meta.dirname, "..", "..");

/** Built keys per script (file:constant), as of 4 December (on 5 December IPAM's Release declared its owner index, the gateway's ALLOC_FIP its record, the vmm's and the instance metadata's scripts theirs, under the host's and the VPC's hash tags). Lower a figure when a script declares its keys. */
const ALLOWED: Record<string, number> = {
  "services/common/events.ts:LUA_EMIT": 4,
  // The cluster's variant (scriptFor): the streams of the script's own slot, one loop.
  "services/common/events.ts:LUA_EMIT_CLUSTER": 1,
  "services/dns/scripts.ts:UPDATE_CONFIG": 2,
  // BindNic's step in the VPC's slot on a cluster reads the groups it joins there without declaring them: the hosts' users run it, and may not write them (docs/redis-acl.md).
  "services/firewall/scripts.ts:VPC_MEMBERS": 1,
  "services/ipam/schema.ts:LUA_RANGE_CHECKS": 1,
  // Its built key (a NAT gateway's record) is read on a single Redis only; on a cluster the NAT holds its subnet in the VPC's slot (gw nat-holds), a declared key.
  "services/ipam/scripts.ts:DELETE_SUBNET": 1,
};

/**
 * Scripts that never run on a cluster, by design, with their built keys: the
 * moves of a single Redis's data from an earlier layout (IpamStore.migrateSubnet
 * and VmStore.migrate return before them on a cluster, which only ever has the
 * tagged names). MOVE_GLOBAL builds the oldest layout's keys on purpose: a
 * host's ACL user may not write them, and a declared key it may not write
 * fails the whole script (it deletes them with redis.pcall). And a single
 * Redis's one-script form of a change that a cluster runs in declared
 * steps (peering/store.ts: RESERVE, CLAIM and DROP there; the firewall's
 * bindings below).
 */
const SINGLE_REDIS_ONLY: Record<string, number> = {
  "services/ipam/scripts.ts:MIGRATE_SUBNET": 2,
  "services/vmm/store.ts:MOVE_GLOBAL": 5,
  "services/peering/store.ts:CREATE": 5,
  "services/peering/store.ts:DELETE": 2,
  // The firewall's bindings, hosts' snapshot and flow-log collection: a
  // cluster runs them in declared steps or reads from the client
  // (firewall/store.ts bindInSteps, unbindInSteps, loadInSteps; flowlog-config.ts collectInSteps).
  "services/firewall/flowlog-config.ts:GC": 8,
  "services/firewall/scripts.ts:ADOPT_SIGS": 1,
  "services/firewall/scripts.ts:BIND": 2,
  "services/firewall/scripts.ts:LOAD_VPC": 16,
  "services/firewall/scripts.ts:LUA_COMMON": 3,
  "services/firewall/scripts.ts:LUA_NIC": 13,
  "services/firewall/scripts.ts:UNBIND": 1,
  // AttachNic's claim of an address across hosts: a cluster runs it in
  // one-slot steps, the other host's records read from the client
  // (netagent/store.ts CLAIM, HOST, CONFIRM).
  "services/netagent/store.ts:ADD_NIC": 5,
};

test("every script's keys built inside Lua are the known ones (Redis Cluster: declare them in KEYS)", () => {
  const found = new Map<string, string[]>();
  for (const f of tsFiles(join(ROOT, "services"))) for (const [k, v] of builtKeys(ROOT, f, readFileSync(f, "utf8"))) found.set(k, v);
  const more: string[] = [];
  const fewer: string[] = [];
  for (const [k, calls] of found) {
    const allowed = ALLOWED[k] ?? SINGLE_REDIS_ONLY[k] ?? 0;
    if (calls.length > allowed) more.push(`${k}: ${calls.length} (allowed ${allowed}): ${calls.join(" | ")}`);
    else if (calls.length < allowed) fewer.push(`${k}: ${calls.length}, allowance ${allowed}`);
  }
  for (const k of Object.keys(ALLOWED)) if (!found.has(k)) fewer.push(`${k}: 0, allowance ${ALLOWED[k]}`);
  for (const k of Object.keys(SINGLE_REDIS_ONLY)) if (!found.has(k)) fewer.push(`${k}: 0, allowance ${SINGLE_REDIS_ONLY[k]}`);
  assert.deepEqual(more, [], "a script builds a key name from data instead of declaring it in KEYS, which Redis Cluster refuses; pass it as a KEYS entry");
  assert.deepEqual(fewer, [], "fewer keys built in Lua than allowed: lower ALLOWED in this test to the new count");
});

test("the scan sees keys held in Lua locals and passed through a wrapper of redis.pcall", () => {
  const src = [
    "const COMMON = `",
    "local TOKENS = 'mvpc:tokens'",
    "`;",
    "const A = `${COMMON}",
    "local hk = F .. 'host:' .. h .. ':sig'",
    "local field = ARGV[1]",
    "redis.call('HGET', TOKENS, field)",
    "redis.call('HDEL', hk, field)",
    "redis.call('HGET', KEYS[1], field)",
    "local function get(cmd, key, ...)",
    "  local r = redis.pcall(cmd, key, ...)",
    "  return r",
    "end",
    "get('HGET', 'mvpc:vpc:' .. v, 'cidr')",
    "get('SMEMBERS', KEYS[2])",
    "`;",
  ].join("\n");
  const got = builtKeys(ROOT, join(ROOT, "x.ts"), src);
  assert.deepEqual(got.get("x.ts:A"), ["HGET TOKENS", "HDEL hk", "HGET 'mvpc:vpc:' .. v"]);
});

test("the scan sees what it must: a built key counts, a KEYS entry, a bare variable and a channel do not", () => {
  const src = [
    "const A = `",
    "redis.call('HGET', KEYS[1], 'x')",
    "redis.call('HGET', 'mvpc:vpc:' .. ARGV[1], 'base')",
    "redis.call('SREM', okp .. holder, id)",
    "redis.call('SETBIT', bits, idx, 1)",
    "redis.call('SPUBLISH', 'mvpc:{' .. v .. '}:wake', '1')",
    "`;",
    "const B = `",
    "redis.pcall('XADD', 'mvpc:{' .. v .. '}:events', '*', 'k', 'v')",
    "`;",
  ].join("\n");
  const got = builtKeys(ROOT, join(ROOT, "x.ts"), src);
  assert.deepEqual([...got.keys()], ["x.ts:A", "x.ts:B"]);
  assert.deepEqual(got.get("x.ts:A"), ["HGET 'mvpc:vpc:' .. ARGV[1]", "SREM okp .. holder"]);
  assert.equal(got.get("x.ts:B")?.length, 1);
});
