// Peerings in Redis. Every change is one Lua script, so that the checks a
// peering depends on (both VPCs exist, the name and the pair are free, no
// other peer of either VPC overlaps the new one) hold at the moment it is
// written; a VPC being deleted at the same time either sees the peering and
// refuses, or the peering sees the VPC gone.
import type { Redis } from "ioredis";
import { AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, NotFoundError, UnavailableError } from "../common/errors.js";
import { HOST_ID_RE } from "../common/host.js";
import { idOrNull, isId, newId } from "../common/ids.js";
import { ipamKeys, K } from "../ipam/schema.js";
import { naKeys } from "../netagent/schema.js";
import * as V from "../common/validate.js";
import {
  LUA_SWEEP,
  pairKey,
  parsePeering,
  parsePeeringRecord,
  peeringKeys,
  peeringsOf,
  PK,
  staleReservations,
  type PeeringKeys,
  type PeeringRec,
} from "./schema.js";
import { LUA_TOKEN, TOKEN_MOVED, withClientToken } from "../common/client-token.js";
import { emit, LUA_EMIT } from "../common/events.js";
import { LUA_SERVER_MS } from "../common/redis.js";
import { holdClock, recordUnderHold } from "../common/pending.js";

export { ackPeering, pairKey, parsePeering, PEERING_KEYS, peeringKeys, peeringsOf, PENDING_MS, PK } from "./schema.js";
export type { PeeringRec } from "./schema.js";

/**
 * Lua shared by the single Redis's CREATE and the cluster's CLAIM:
 * claim_checks(tokens, token, seen, seen_record, byname, name, bypair, pair)
 * → the reply that ends the create ({0, id} the client token's peering,
 * {TOKEN_MOVED}, {-1, id} name taken, {-2, id} pair peered), or nil.
 */
const LUA_CLAIM_CHECKS = `${LUA_TOKEN}
local function claim_checks(tokens, tok, seen, seen_record, byname, name, bypair, pair)
  if tok ~= '' then
    local prev = token_held(tokens, 'pcx\\n' .. tok, seen, seen_record)
    if prev == false then return {${TOKEN_MOVED}, ''} end
    if prev then return {0, prev} end
  end
  local taken = redis.call('HGET', byname, name)
  if taken then return {-1, taken} end
  local same = redis.call('HGET', bypair, pair)
  if same then return {-2, same} end
  return nil
end
`;

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
const CREATE = `${LUA_EMIT}${LUA_CLAIM_CHECKS}
local id, name, tok, pair, v1, v2 = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if redis.call('EXISTS', KEYS[9]) == 0 then return {-4, v1} end
if redis.call('EXISTS', KEYS[10]) == 0 then return {-4, v2} end
local claimed = claim_checks(KEYS[7], tok, ARGV[7], KEYS[11], KEYS[2], name, KEYS[4], pair)
if claimed then return claimed end
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

/**
 * On a cluster, the first step of a create, in one VPC's slot: that VPC
 * exists and none of its peers overlaps the new peer's range; then the
 * reservation (peers hash: id → {base, size, ms}).
 * KEYS: 1 the VPC's record (IPAM), 2 its peers hash
 * ARGV: 1 id, 2 peer base, 3 peer size, 4 the sweep's cutoff, 5 ids of
 *       reservations the caller found without a record, removed here if made
 *       before the cutoff (staleReservations: PENDING_MS before the caller
 *       read them, by this server's clock; LUA_SWEEP)
 * Returns {1, id}, {-4, ''} VPC gone, {-3, peering} overlaps that peering's
 * range, {-5, entry} an entry that does not read as a range (refused, never
 * ignored).
 */
const RESERVE = `${LUA_SERVER_MS}${LUA_SWEEP}
if redis.call('EXISTS', KEYS[1]) == 0 then return {-4, ''} end
-- A VPC named a moment before its create kept its record (ipam/store.ts createVpc): a peering of it keeps it.
redis.call('PERSIST', KEYS[1])
sweep(KEYS[2], ARGV[5], tonumber(ARGV[4]))
local now = server_ms()
local base, size = tonumber(ARGV[2]), tonumber(ARGV[3])
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all - 1, 2 do
  if all[i] ~= ARGV[1] then
    local ok, r = pcall(cjson.decode, all[i + 1])
    if not ok or type(r) ~= 'table' or type(r.base) ~= 'number' or type(r.size) ~= 'number' then return {-5, all[i]} end
    if r.base < base + size and base < r.base + r.size then return {-3, all[i]} end
  end
end
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode({base = base, size = size, ms = now}))
return {1, ARGV[1]}
`;

/**
 * On a cluster, the commit point of a create, in the peerings' slot: the
 * client token, the name and the pair, then the record and its indexes.
 * KEYS: 1 pcx hash, 2 byname, 3 names zset, 4 bypair, 5 tokens, 6 the record
 *       of the peering the client token named when read (withClientToken)
 * ARGV: 1 id, 2 name, 3 client token, 4 pair key, 5 the id the token named
 *       ('' none), then field/value pairs of the hash.
 * Returns {1, id}, {0, id} found by client token, {-1, id} name taken, {-2,
 * id} pair already peered, {TOKEN_MOVED}.
 */
const CLAIM = `${LUA_CLAIM_CHECKS}
local id, name, tok, pair = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local claimed = claim_checks(KEYS[5], tok, ARGV[5], KEYS[6], KEYS[2], name, KEYS[4], pair)
if claimed then return claimed end
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('HSET', KEYS[2], name, id)
redis.call('ZADD', KEYS[3], 0, name)
redis.call('HSET', KEYS[4], pair, id)
if tok ~= '' then redis.call('HSET', KEYS[5], 'pcx\\n' .. tok, id) end
return {1, id}
`;

/**
 * On a cluster, the first step of a delete (its commit point), in the
 * peerings' slot; the VPCs' entries go after it.
 * KEYS: 1 pcx hash, 2 byname, 3 names zset, 4 bypair; ARGV: 1 pair key
 * Returns {1} deleted, {0} absent.
 */
const DROP = `
local name = redis.call('HGET', KEYS[1], 'name')
if not name then return {0} end
local id = redis.call('HGET', KEYS[1], 'id')
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], name)
redis.call('ZREM', KEYS[3], name)
if redis.call('HGET', KEYS[4], ARGV[1]) == id then redis.call('HDEL', KEYS[4], ARGV[1]) end
return {1}
`;

type Reply = [number, string, string?];

declare module "ioredis" {
  // eslint-disable-next-line @typescript-eslint/no-unused-vars -- merging needs the same type parameter
  interface RedisCommander<Context> {
    mvpcCreatePeering(...args: (string | number)[]): Promise<Reply>;
    mvpcDeletePeering(...args: (string | number)[]): Promise<Reply>;
    mvpcReservePeer(...args: (string | number)[]): Promise<Reply>;
    mvpcClaimPeering(...args: (string | number)[]): Promise<Reply>;
    mvpcDropPeering(...args: (string | number)[]): Promise<Reply>;
  }
}

export class PeeringStore {
  /** Where peerings are on this Redis (schema.ts PeeringKeys). */
  readonly L: PeeringKeys;

  constructor(readonly redis: Redis) {
    this.L = peeringKeys(redis);
    if (!(redis as unknown as { mvpcCreatePeering?: unknown }).mvpcCreatePeering) {
      redis.defineCommand("mvpcCreatePeering", { numberOfKeys: 11, lua: CREATE });
      redis.defineCommand("mvpcDeletePeering", { numberOfKeys: 6, lua: DELETE });
      redis.defineCommand("mvpcReservePeer", { numberOfKeys: 2, lua: RESERVE });
      redis.defineCommand("mvpcClaimPeering", { numberOfKeys: 6, lua: CLAIM });
      redis.defineCommand("mvpcDropPeering", { numberOfKeys: 4, lua: DROP });
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
    if (this.L.cluster) return this.createInSteps(check.value, fields, clientToken);
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
    return this.answer(code, String(ref), String(other ?? ""), { ...p, name: nm });
  }

  /** A create's reply as its result or the error a person can act on. */
  private async answer(
    code: number,
    ref: string,
    other: string,
    p: { vpc1Id: string; vpc2Id: string; name: string },
  ): Promise<{ peering: PeeringRec; created: boolean }> {
    if (code === -1) throw new AlreadyExistsError(`a peering named ${JSON.stringify(p.name)} already exists (${ref}); pick another name`);
    if (code === -2) throw new AlreadyExistsError(`VPCs ${p.vpc1Id} and ${p.vpc2Id} are already peered (${ref}); change that peering or delete it first`);
    if (code === -3) {
      throw new FailedPreconditionError(
        `peering ${ref} already connects one of these VPCs to ${other}, whose CIDR overlaps the other side: a VPC's peers must not overlap each other (its routes to them would be ambiguous)`,
      );
    }
    if (code === -4) throw new NotFoundError("vpc", ref, "it was deleted; list VPCs with `microvpc vpc list`");
    if (code === -5)
      throw new FailedPreconditionError(`a VPC's peering index holds an entry (${V.show(ref)}) that does not read as a peer range; nothing was created`);
    const peering = await this.get(ref);
    if (!peering) throw new NotFoundError("peering", ref, "it was deleted while being created");
    return { peering, created: code === 1 };
  }

  /**
   * A create on a cluster, in steps of one slot each: each VPC reserves the
   * peer's range (RESERVE: it exists, its peers do not overlap), then the
   * record is written with its name, pair and token (CLAIM, the commit
   * point); a refusal at any step takes the reservations back. A retry with
   * the same client token is answered before anything is reserved. A
   * reservation left by a create that stopped has no record: readers skip
   * it, and a create in that VPC or its DeleteVpc removes it once it is
   * PENDING_MS old (by the server's clock). So the claim runs under the
   * reservations' deadline (recordUnderHold, common/pending.ts): a record
   * written, or perhaps written, over PENDING_MS/2 after they were made is
   * kept only if both reservations can be written afresh (reservedAfresh:
   * a retry with the same client token may have been answered with it
   * meanwhile); else it is taken back, since one of them could have been
   * swept meanwhile and an overlapping peer reserved in its place, or its
   * VPC deleted. A record kept is announced (peering.created) as any other.
   */
  private async createInSteps(p: PeeringRec, fields: Record<string, string | number>, clientToken: string): Promise<{ peering: PeeringRec; created: boolean }> {
    const L = this.L;
    const field = clientToken ? `pcx\n${clientToken}` : null;
    if (field) {
      const seen = await this.redis.hget(L.tokens, field);
      if (seen && (await this.get(seen))) return this.answer(0, seen, "", p);
    }
    // Answered before reserving, for the message: the claim checks them again.
    const [byName, byPair] = await Promise.all([this.redis.hget(L.byName, p.name), this.redis.hget(L.byPair, pairKey(p.vpc1Id, p.vpc2Id))]);
    if (byName) return this.answer(-1, byName, "", p);
    if (byPair) return this.answer(-2, byPair, "", p);
    const reserved: string[] = [];
    // Without their record, reservations that cannot be removed now are swept once old.
    const release = () =>
      Promise.all(reserved.map((vpc) => this.redis.hdel(L.peers(vpc), p.id))).then(
        () => undefined,
        () => undefined,
      );
    const heldAt = holdClock();
    // In VPC id order: two creates that share a VPC reserve it first, so that they cannot each hold what the other needs.
    const sides = [
      [p.vpc1Id, p.vpc2Cidr],
      [p.vpc2Id, p.vpc1Cidr],
    ].sort((x, y) => (x[0] < y[0] ? -1 : 1));
    for (const [vpc, peer] of sides) {
      const c = V.cidr("cidr", peer, { min: 0, max: 32 });
      // A read that fails (a key of another type, Redis gone) leaves nothing of this VPC's: what the others reserved goes back.
      const stale = await staleReservations(this.redis, vpc).catch(async (err: unknown) => {
        await release();
        throw err;
      });
      // A reservation whose reply was lost (a timeout, a failover) stays: without a record it is swept once old (staleReservations).
      const [code, ref] = await this.redis.mvpcReservePeer(
        ipamKeys(this.redis).vpc(vpc),
        L.peers(vpc),
        p.id,
        c.base,
        c.size,
        stale.cutoff,
        stale.ids.join(","),
      );
      if (code !== 1) {
        try {
          // The holder first: CLAIM writes a record and its client token in
          // one step, so once the holder's record is read, a create with the
          // same token that committed meanwhile is seen by the token and
          // answers this one.
          const holder = code === -3 ? await this.get(String(ref)) : null;
          const prev = field ? await this.redis.hget(L.tokens, field) : null;
          const mine = prev ? await this.get(prev) : null;
          if (mine) return { peering: mine, created: false };
          if (code === -3 && !holder)
            throw new UnavailableError(`a create of a peering whose range overlaps this one (${V.show(String(ref))}) is under way in VPC ${vpc}; retry`);
          const other = holder ? (holder.vpc1Id === vpc ? holder.vpc2Id : holder.vpc1Id) : "another VPC";
          return await this.answer(code, code === -4 ? vpc : String(ref), other, p);
        } finally {
          await release();
        }
      }
      reserved.push(vpc);
    }
    // The commit point, under the reservations' deadline.
    const reply = await recordUnderHold(
      async () => {
        const r = await withClientToken(this.redis, L.tokens, field, { kind: "pcx", recordOf: L.pcx, fresh: L.pcx(p.id) }, (seen, rec) =>
          this.redis.mvpcClaimPeering(
            L.pcx(p.id),
            L.byName,
            L.names,
            L.byPair,
            L.tokens,
            rec,
            p.id,
            p.name,
            clientToken,
            pairKey(p.vpc1Id, p.vpc2Id),
            seen,
            ...Object.entries(fields).flat(),
          ),
        );
        // A claim run twice (ioredis sends a command again after a reconnect) finds its own first run: this create's success.
        return String(r[1]) === p.id ? ([1, p.id] as Reply) : r;
      },
      {
        what: `peering ${p.id}`,
        heldAt,
        wrote: ([code]) => code === 1,
        release,
        takeBack: () => this.takeBack(p),
        undo: `microvpc vpc peer delete ${p.id}`,
        keep: () => this.reservedAfresh(p, sides),
      },
    );
    const [code, ref] = reply;
    if (code !== 1) return await this.answer(code, String(ref), "", p);
    await emit(this.redis, { vpcs: [p.vpc1Id, p.vpc2Id] }, ["kind", "peering.created", "peering", p.id, "vpc1", p.vpc1Id, "vpc2", p.vpc2Id]);
    return await this.answer(1, p.id, "", p);
  }

  /**
   * On a cluster, past a create's deadline (recordUnderHold's keep): if the
   * record it wrote is there, its reservations written afresh by RESERVE in
   * each VPC, in the create's order (VPC id), with a new time. RESERVE skips
   * this peering's own entry (or writes it again if it was swept) and
   * refuses if the VPC is gone (a DeleteVpc that swept the reservation went
   * on to delete it) or another entry overlaps the range (a create that
   * swept it reserved an overlapping peer, committed or under way): what
   * the old reservation kept out got in, and the record is taken back.
   * Nothing is swept here: an overlapping entry, even one that will pass
   * for stale, is one that could only be reserved while this create's was
   * gone, so it refuses; the retry the caller is told to make sweeps as
   * any create does. The reply the claim gave ({1, id}) if both are held
   * and the record is still there after them, else null (a refusal or an
   * error in either, or the peering deleted meanwhile: the take-back
   * removes both entries, one written afresh here included).
   */
  private async reservedAfresh(p: PeeringRec, sides: string[][]): Promise<Reply | null> {
    if (!(await this.get(p.id))) return null;
    for (const [vpc, peer] of sides) {
      const c = V.cidr("cidr", peer, { min: 0, max: 32 });
      const [code] = await this.redis.mvpcReservePeer(ipamKeys(this.redis).vpc(vpc), this.L.peers(vpc), p.id, c.base, c.size, 0, "");
      if (code !== 1) return null;
    }
    // A DeletePeering between the read above and the reservations: they name a record that is gone, and
    // the take-back (null) removes them instead of leaving them to block overlapping creates until swept.
    if (!(await this.get(p.id))) return null;
    return [1, p.id];
  }

  /**
   * On a cluster, what a create past its deadline may have written: its
   * record with its name and pair entries (DROP; absent if the claim never
   * ran or was refused; its client token's field is left naming a record
   * that is gone, which a retry takes over), then its reservations. An
   * event if there was a record (readers may have seen it); like any
   * event, one lost costs the hosts a periodic pass, not the change.
   */
  private async takeBack(p: PeeringRec): Promise<void> {
    const L = this.L;
    const [code] = await this.redis.mvpcDropPeering(L.pcx(p.id), L.byName, L.names, L.byPair, pairKey(p.vpc1Id, p.vpc2Id));
    // Without their record, reservations left here are swept once old.
    await Promise.all([this.redis.hdel(L.peers(p.vpc1Id), p.id), this.redis.hdel(L.peers(p.vpc2Id), p.id)]).catch(() => undefined);
    if (code === 1)
      await emit(this.redis, { vpcs: [p.vpc1Id, p.vpc2Id] }, ["kind", "peering.deleted", "peering", p.id, "vpc1", p.vpc1Id, "vpc2", p.vpc2Id]).catch(
        () => undefined,
      );
  }

  async get(id: string): Promise<PeeringRec | null> {
    // Also what other code read back from Redis: only an id names a key.
    if (!isId("pcx", id)) return null;
    return parsePeering(await this.redis.hgetall(this.L.pcx(id)), id);
  }

  async idByName(name: string): Promise<string | null> {
    return idOrNull("pcx", await this.redis.hget(this.L.byName, name));
  }

  async idByPair(a: string, b: string): Promise<string | null> {
    return idOrNull("pcx", await this.redis.hget(this.L.byPair, pairKey(a, b)));
  }

  async list(afterName: string, limit: number, vpcId: string): Promise<PeeringRec[]> {
    if (vpcId) {
      const all = await peeringsOf(this.redis, [vpcId]);
      return all
        .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0))
        .filter((p) => p.name > afterName)
        .slice(0, limit);
    }
    const names = await this.redis.zrangebylex(this.L.names, afterName ? `(${afterName}` : "-", "+", "LIMIT", 0, limit);
    if (names.length === 0) return [];
    const ids = await this.redis.hmget(this.L.byName, ...names);
    const recs = await Promise.all(ids.filter((x): x is string => !!x).map((id) => this.get(id)));
    return recs.filter((x): x is PeeringRec => !!x);
  }

  async delete(p: PeeringRec): Promise<boolean> {
    if (this.L.cluster) {
      // The record first (the commit point), then each VPC's entry.
      const L = this.L;
      const [code] = await this.redis.mvpcDropPeering(L.pcx(p.id), L.byName, L.names, L.byPair, pairKey(p.vpc1Id, p.vpc2Id));
      await Promise.all([this.redis.hdel(L.peers(p.vpc1Id), p.id), this.redis.hdel(L.peers(p.vpc2Id), p.id)]);
      if (code === 1) await emit(this.redis, { vpcs: [p.vpc1Id, p.vpc2Id] }, ["kind", "peering.deleted", "peering", p.id, "vpc1", p.vpc1Id, "vpc2", p.vpc2Id]);
      return code === 1;
    }
    const [code] = await this.redis.mvpcDeletePeering(PK.pcx(p.id), PK.byName, PK.names, PK.byPair, K.events, PK.acks(p.id), pairKey(p.vpc1Id, p.vpc2Id));
    return code === 1;
  }

  /**
   * Hosts that must apply the peering (those with NICs of either VPC) and
   * those that have not yet.
   */
  async convergence(p: PeeringRec): Promise<{ hosts: string[]; pending: string[] }> {
    const [a1, a2, legacy] = await Promise.all([
      this.redis.hvals(naKeys(this.redis).overlayAddrs(p.vpc1Id)),
      this.redis.hvals(naKeys(this.redis).overlayAddrs(p.vpc2Id)),
      this.redis.hgetall(PK.acks(p.id)),
    ]);
    // Host ids come from a shared hash: only well-formed ones name a key.
    const hosts = [...new Set([...a1, ...a2])].filter((h) => HOST_ID_RE.test(h)).sort();
    // One read per host (its own key; on a cluster each in its own slot).
    const L = peeringKeys(this.redis);
    const acks = await Promise.all(hosts.map((h) => this.redis.hget(L.hostAcks(h), p.id)));
    const pending = hosts.filter((h, i) => Number(acks[i] ?? legacy[h] ?? 0) !== p.createdMs);
    return { hosts, pending };
  }
}
