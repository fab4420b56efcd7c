// Peerings in Redis. Every change is one Lua script, so that the checks a
// peering depends on (both VPCs exist, the name and the pair are free, no
// other peer of either VPC overlaps the new one) hold at the moment it is
// written; a VPC being deleted at the same time either sees the peering and
// refuses, or the peering sees the VPC gone.
import type { Redis } from "ioredis";
import { AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, NotFoundError } from "../common/errors.js";
import { HOST_ID_RE } from "../common/host.js";
import { newId } from "../common/ids.js";
import { K } from "../ipam/schema.js";
import { pairKey, parsePeering, parsePeeringRecord, peeringsOf, PK, type PeeringRec } from "./schema.js";
import { LUA_TOKEN, TOKEN_MOVED, withClientToken } from "../common/client-token.js";
import { LUA_EMIT } from "../common/events.js";

export { ackPeering, pairKey, parsePeering, peeringsOf, PK } from "./schema.js";
export type { PeeringRec } from "./schema.js";

/**
 * KEYS: 1 pcx hash, 2 byname, 3 names zset, 4 bypair, 5 vpc1 peerings,
 *       6 vpc2 peerings, 7 tokens, 8 events, 9 vpc1 hash, 10 vpc2 hash,
 *       11 the record of the peering the client token named when read
 *       (withClientToken)
 * ARGV: 1 id, 2 name, 3 client token, 4 pair key, 5 vpc1 id, 6 vpc2 id,
 *       7 the id the token named ('' none), then field/value pairs of the hash.
 * Returns {1, id} created, {0, id} found by client token, {TOKEN_MOVED}
 * the token names another peering now (read again), or an error:
 *   {-1, id} name taken, {-2, id} pair already peered, {-3, peering, vpc}
 *   a peer of one side overlaps the other side, {-4, vpc} VPC gone.
 */
const CREATE = `${LUA_EMIT}${LUA_TOKEN}
local id, name, tok, pair, v1, v2 = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if redis.call('EXISTS', KEYS[9]) == 0 then return {-4, v1} end
if redis.call('EXISTS', KEYS[10]) == 0 then return {-4, v2} end
if tok ~= '' then
  local prev = token_held(KEYS[7], 'pcx\\n' .. tok, ARGV[7], KEYS[11])
  if prev == false then return {${TOKEN_MOVED}, ''} end
  if prev then return {0, prev} end
end
local taken = redis.call('HGET', KEYS[2], name)
if taken then return {-1, taken} end
local same = redis.call('HGET', KEYS[4], pair)
if same then return {-2, same} end
-- A VPC's peers must not overlap each other: its routes to them would.
local function span(vpc)
  local b = tonumber(redis.call('HGET', 'mvpc:vpc:' .. vpc, 'base'))
  local p = tonumber(redis.call('HGET', 'mvpc:vpc:' .. vpc, 'prefix'))
  if not b or not p then return nil end
  return b, b + 2 ^ (32 - p)
end
local function check(side, newPeer)
  local nb, ne = span(newPeer)
  for _, pid in ipairs(redis.call('SMEMBERS', 'mvpc:vpc:' .. side .. ':peerings')) do
    local a = redis.call('HGET', 'mvpc:pcx:' .. pid, 'vpc1')
    local b = redis.call('HGET', 'mvpc:pcx:' .. pid, 'vpc2')
    local other = a
    if a == side then other = b end
    if other then
      local ob, oe = span(other)
      if ob and nb and ob < ne and nb < oe then return {-3, pid, other} end
    end
  end
  return nil
end
local bad = check(v1, v2) or check(v2, v1)
if bad then return bad end
local fields = {}
for i = 8, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('HSET', KEYS[2], name, id)
redis.call('ZADD', KEYS[3], 0, name)
redis.call('HSET', KEYS[4], pair, id)
redis.call('SADD', KEYS[5], id)
redis.call('SADD', KEYS[6], id)
if tok ~= '' then redis.call('HSET', KEYS[7], 'pcx\\n' .. tok, id) end
redis.call('XADD', KEYS[8], 'MAXLEN', '~', 100000, '*', 'kind', 'peering.created', 'peering', id, 'vpc1', v1, 'vpc2', v2)
mvpc_scoped({v1, v2}, {}, 'kind', 'peering.created', 'peering', id, 'vpc1', v1, 'vpc2', v2)
return {1, id}
`;

/**
 * KEYS: 1 pcx hash, 2 byname, 3 names zset, 4 bypair, 5 events, 6 acks
 * Returns {1} deleted, {0} absent.
 */
const DELETE = `${LUA_EMIT}
local name = redis.call('HGET', KEYS[1], 'name')
if not name then return {0, ''} end
local v1 = redis.call('HGET', KEYS[1], 'vpc1')
local v2 = redis.call('HGET', KEYS[1], 'vpc2')
local id = redis.call('HGET', KEYS[1], 'id')
redis.call('DEL', KEYS[1], KEYS[6])
redis.call('HDEL', KEYS[2], name)
redis.call('ZREM', KEYS[3], name)
if redis.call('HGET', KEYS[4], ARGV[1]) == id then redis.call('HDEL', KEYS[4], ARGV[1]) end
redis.call('SREM', 'mvpc:vpc:' .. v1 .. ':peerings', id)
redis.call('SREM', 'mvpc:vpc:' .. v2 .. ':peerings', id)
redis.call('XADD', KEYS[5], 'MAXLEN', '~', 100000, '*', 'kind', 'peering.deleted', 'peering', id, 'vpc1', v1, 'vpc2', v2)
mvpc_scoped({v1, v2}, {}, 'kind', 'peering.deleted', 'peering', id, 'vpc1', v1, 'vpc2', v2)
return {1, ''}
`;

type Reply = [number, string, string?];

declare module "ioredis" {
  // eslint-disable-next-line @typescript-eslint/no-unused-vars -- merging needs the same type parameter
  interface RedisCommander<Context> {
    mvpcCreatePeering(...args: (string | number)[]): Promise<Reply>;
    mvpcDeletePeering(...args: (string | number)[]): Promise<Reply>;
  }
}

export class PeeringStore {
  constructor(readonly redis: Redis) {
    if (!(redis as unknown as { mvpcCreatePeering?: unknown }).mvpcCreatePeering) {
      redis.defineCommand("mvpcCreatePeering", { numberOfKeys: 11, lua: CREATE });
      redis.defineCommand("mvpcDeletePeering", { numberOfKeys: 6, lua: DELETE });
    }
  }

  async create(
    p: Omit<PeeringRec, "id" | "createdMs" | "name">,
    name: (id: string) => string,
    clientToken: string,
  ): Promise<{ peering: PeeringRec; created: boolean }> {
    const id = newId("pcx");
    const nm = name(id);
    const fields = {
      id,
      name: nm,
      vpc1: p.vpc1Id,
      vpc2: p.vpc2Id,
      cidr1: p.vpc1Cidr,
      cidr2: p.vpc2Cidr,
      allowed1: JSON.stringify(p.vpc1Allowed),
      allowed2: JSON.stringify(p.vpc2Allowed),
      description: p.description,
      labels: JSON.stringify(p.labels),
      created: Date.now(),
    };
    // The writer applies the readers' rules: what it stores reads back.
    const check = parsePeeringRecord(id, Object.fromEntries(Object.entries(fields).map(([k, v]) => [k, String(v)])));
    if (!check.ok) throw new InvalidArgumentError(check.field, `refusing to store an invalid peering: ${check.reason}`);
    const [code, ref, other] = await withClientToken(
      this.redis,
      K.tokens,
      clientToken ? `pcx\n${clientToken}` : null,
      { kind: "pcx", recordOf: PK.pcx, fresh: PK.pcx(id) },
      (seen, rec) =>
        this.redis.mvpcCreatePeering(
          PK.pcx(id),
          PK.byName,
          PK.names,
          PK.byPair,
          PK.vpcPeerings(p.vpc1Id),
          PK.vpcPeerings(p.vpc2Id),
          K.tokens,
          K.events,
          K.vpc(p.vpc1Id),
          K.vpc(p.vpc2Id),
          rec,
          id,
          nm,
          clientToken,
          pairKey(p.vpc1Id, p.vpc2Id),
          p.vpc1Id,
          p.vpc2Id,
          seen,
          ...Object.entries(fields).flat(),
        ),
    );
    if (code === -1) throw new AlreadyExistsError(`a peering named ${JSON.stringify(nm)} already exists (${ref}); pick another name`);
    if (code === -2) throw new AlreadyExistsError(`VPCs ${p.vpc1Id} and ${p.vpc2Id} are already peered (${ref}); change that peering or delete it first`);
    if (code === -3) {
      throw new FailedPreconditionError(
        `peering ${ref} already connects one of these VPCs to ${other}, whose CIDR overlaps the other side: a VPC's peers must not overlap each other (its routes to them would be ambiguous)`,
      );
    }
    if (code === -4) throw new NotFoundError("vpc", String(ref), "it was deleted; list VPCs with `microvpc vpc list`");
    const peering = await this.get(String(ref));
    if (!peering) throw new NotFoundError("peering", String(ref), "it was deleted while being created");
    return { peering, created: code === 1 };
  }

  async get(id: string): Promise<PeeringRec | null> {
    return parsePeering(await this.redis.hgetall(PK.pcx(id)), id);
  }

  async idByName(name: string): Promise<string | null> {
    return this.redis.hget(PK.byName, name);
  }

  async idByPair(a: string, b: string): Promise<string | null> {
    return this.redis.hget(PK.byPair, pairKey(a, b));
  }

  async list(afterName: string, limit: number, vpcId: string): Promise<PeeringRec[]> {
    if (vpcId) {
      const all = await peeringsOf(this.redis, [vpcId]);
      return all
        .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))
        .filter((p) => p.name > afterName)
        .slice(0, limit);
    }
    const names = await this.redis.zrangebylex(PK.names, afterName ? `(${afterName}` : "-", "+", "LIMIT", 0, limit);
    if (names.length === 0) return [];
    const ids = await this.redis.hmget(PK.byName, ...names);
    const recs = await Promise.all(ids.filter((x): x is string => !!x).map((id) => this.get(id)));
    return recs.filter((x): x is PeeringRec => !!x);
  }

  async delete(p: PeeringRec): Promise<boolean> {
    const [code] = await this.redis.mvpcDeletePeering(PK.pcx(p.id), PK.byName, PK.names, PK.byPair, K.events, PK.acks(p.id), pairKey(p.vpc1Id, p.vpc2Id));
    return code === 1;
  }

  /**
   * Hosts that must apply the peering (those with NICs of either VPC) and
   * those that have not yet.
   */
  async convergence(p: PeeringRec): Promise<{ hosts: string[]; pending: string[] }> {
    const [a1, a2, legacy] = await Promise.all([
      this.redis.hvals(`mvpc:overlay:${p.vpc1Id}:addrs`),
      this.redis.hvals(`mvpc:overlay:${p.vpc2Id}:addrs`),
      this.redis.hgetall(PK.acks(p.id)),
    ]);
    // Host ids come from a shared hash: only well-formed ones name a key.
    const hosts = [...new Set([...a1, ...a2])].filter((h) => HOST_ID_RE.test(h)).sort();
    const p2 = this.redis.pipeline();
    for (const h of hosts) p2.hget(PK.hostAcks(h), p.id);
    const acks = ((await p2.exec()) ?? []).map(([, v]) => v);
    const pending = hosts.filter((h, i) => Number(acks[i] ?? legacy[h] ?? 0) !== p.createdMs);
    return { hosts, pending };
  }
}
