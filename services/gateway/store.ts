// NAT gateways, floating IPs and port forwards in Redis. Each change is one
// Lua script that also appends a change event (on a Redis Cluster the store
// appends it right after: GatewayKeys), so every hypervisor's gateway loop
// converges by itself.
import { randomBytes } from "node:crypto";
import type { Redis } from "ioredis";
import { AlreadyExistsError, FailedPreconditionError, NotFoundError, ResourceExhaustedError, UnavailableError } from "../common/errors.js";
import { LUA_TOKEN, TOKEN_MOVED, withClientToken } from "../common/client-token.js";
import { emit, LUA_EMIT, scriptFor } from "../common/events.js";
import type { Logger } from "pino";
import { reportInvalid, type InvalidWhere } from "../common/invalid-records.js";
import { intToIp, type Parsed } from "../common/validate.js";
import { naKeys } from "../netagent/schema.js";
import { IPAM_KEYS } from "../ipam/schema.js";
import { isId } from "../common/ids.js";
import { holdClock, PENDING_MS, recordUnderHold, wrongTypeOf } from "../common/pending.js";
import { LUA_SERVER_MS } from "../common/redis.js";
import {
  checkFip,
  checkNat,
  checkPf,
  GatewayReader,
  LUA_NAT_HOLD,
  MAX_TRANSIT,
  natHoldsName,
  OWNER,
  parseFip,
  parseNat,
  parseNatHolder,
  parsePf,
  parseTransit,
  vpcIdOf,
  type FipRec,
  type NatRec,
  type PfRec,
} from "./schema.js";

export { GatewayReader, vpcIdOf } from "./schema.js";
export type { FipRec, NatRec, PfRec } from "./schema.js";

/**
 * LUA_EMIT's functions as no-ops: on a Redis Cluster the scripts whose keys
 * are under {gw} may not append to a VPC's stream (another slot); the store
 * appends the event after the script (GatewayStore.emitted).
 */
const LUA_NO_EMIT = `
local function mvpc_scoped(vpcs, hosts, ...) end
local function mvpc_emit(vpcs, hosts, ...) end
`;

// The record's VPC (read before a delete removes it) names the scoped stream (common/events.ts).
const EVENT = `mvpc_emit({ev_vpc}, {}, 'kind', ARGV[1], 'id', ARGV[2])`;

// KEYS: 1 record, 2 unique index hash, 3 list zset, 4 tokens, 5 the record
// the client token named when read (withClientToken); ARGV: 1 event kind,
// 2 id, 3 unique key, 4 client token field ('' none), 5 the id it named
// ('' none), then hash fields. {1,id} created, {0,id} token seen, {-1,id}
// unique key taken, {TOKEN_MOVED} the token names another record now.
const CREATE = `${LUA_EMIT}${LUA_TOKEN}
if ARGV[4] ~= '' then
  local prev = token_held(KEYS[4], ARGV[4], ARGV[5], KEYS[5])
  if prev == false then return {${TOKEN_MOVED}, ''} end
  if prev then return {0, prev} end
end
local held = redis.call('HGET', KEYS[2], ARGV[3])
if held then return {-1, held} end
local f = {}
for i = 6, #ARGV do f[#f + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(f))
redis.call('HSET', KEYS[2], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[3], 0, ARGV[2])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[4], ARGV[4], ARGV[2]) end
local ev_vpc = redis.call('HGET', KEYS[1], 'vpc')
${EVENT}
return {1, ARGV[2]}
`;

// KEYS: 1 record, 2 unique index hash, 3 list zset; ARGV: 1 kind, 2 id,
// 3 unique key, 4 '1': only if the stored record is unassociated (a
// floating IP: the caller's copy may be older than an AssociateFloatingIp).
// {1,vpc} deleted (vpc: the record's, its event's stream), {0,''} none,
// {-1,private} associated.
const DELETE = `${LUA_EMIT}
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, ''} end
local ev_vpc = redis.call('HGET', KEYS[1], 'vpc')
if ARGV[4] == '1' then
  local private = redis.call('HGET', KEYS[1], 'private')
  if private and private ~= '' then return {-1, private} end
end
redis.call('DEL', KEYS[1])
if redis.call('HGET', KEYS[2], ARGV[3]) == ARGV[2] then redis.call('HDEL', KEYS[2], ARGV[3]) end
redis.call('ZREM', KEYS[3], ARGV[2])
${EVENT}
return {1, ev_vpc or ''}
`;

// Allocates the lowest free address of the pool. KEYS: 1 byaddr, 2 fips zset,
// 3 the new record; ARGV: 1 kind, 2 id, 3 first, 4 last (as integers),
// 5 wanted ('' = lowest), then hash fields (without address).
const ALLOC_FIP = `${LUA_EMIT}
local addr
local function ip(n) return string.format('%d.%d.%d.%d', math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256, math.floor(n / 256) % 256, n % 256) end
if ARGV[5] ~= '' then
  if redis.call('HEXISTS', KEYS[1], ARGV[5]) == 1 then return {-1, redis.call('HGET', KEYS[1], ARGV[5])} end
  addr = ARGV[5]
else
  for n = tonumber(ARGV[3]), tonumber(ARGV[4]) do
    local a = ip(n)
    if redis.call('HEXISTS', KEYS[1], a) == 0 then addr = a break end
  end
  if not addr then return {-2, ''} end
end
local f = {'address', addr}
for i = 6, #ARGV do f[#f + 1] = ARGV[i] end
redis.call('HSET', KEYS[3], unpack(f))
redis.call('HSET', KEYS[1], addr, ARGV[2])
redis.call('ZADD', KEYS[2], 0, ARGV[2])
local ev_vpc = redis.call('HGET', KEYS[3], 'vpc')
${EVENT}
return {1, addr}
`;

// Sets fields of an existing record (a floating IP's target). KEYS: 1
// record; ARGV: 1 kind, 2 id, then fields. The event goes to the VPC the
// record named before and to the one it names now (a floating IP moved from
// one VPC to another: both VPCs' hosts have rules to change), to the fleet's
// stream if neither. {1, the VPC before} set, {0,''} no such record.
const UPDATE = `${LUA_EMIT}
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, ''} end
local old = redis.call('HGET', KEYS[1], 'vpc') or ''
local f = {}
for i = 3, #ARGV do f[#f + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(f))
local ev_vpc = redis.call('HGET', KEYS[1], 'vpc') or ''
mvpc_emit({old, ev_vpc}, {}, 'kind', ARGV[1], 'id', ARGV[2])
return {1, old}
`;

// Creates a NAT gateway and takes its address out of the floating pool, in
// one step. KEYS: 1 record, 2 vpcnat, 3 nats zset, 4 tokens, 5 fip byaddr,
// 6 the record the client token named when read (withClientToken);
// ARGV: 1 kind, 2 id, 3 vpc, 4 client token field ('' none), 5 first,
// 6 last, 7 wanted address ('' = lowest free), 8 the id the token named
// ('' none), then hash fields (without address).
// {1,id} created, {0,id} token seen, {-1,id} VPC has one, {-2,''} pool
// exhausted, {-3,holder} wanted address taken, {TOKEN_MOVED} the token names
// another NAT gateway now.
const CREATE_NAT = `${LUA_EMIT}${LUA_TOKEN}
if ARGV[4] ~= '' then
  local prev = token_held(KEYS[4], ARGV[4], ARGV[8], KEYS[6])
  if prev == false then return {${TOKEN_MOVED}, ''} end
  if prev then return {0, prev} end
end
local held = redis.call('HGET', KEYS[2], ARGV[3])
if held then return {-1, held} end
local function ip(n) return string.format('%d.%d.%d.%d', math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256, math.floor(n / 256) % 256, n % 256) end
local addr
if ARGV[7] ~= '' then
  local by = redis.call('HGET', KEYS[5], ARGV[7])
  if by then return {-3, by} end
  addr = ARGV[7]
else
  for n = tonumber(ARGV[5]), tonumber(ARGV[6]) do
    local a = ip(n)
    if redis.call('HEXISTS', KEYS[5], a) == 0 then addr = a break end
  end
  if not addr then return {-2, ''} end
end
local f = {'address', addr}
for i = 9, #ARGV do f[#f + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(f))
redis.call('HSET', KEYS[2], ARGV[3], ARGV[2])
redis.call('HSET', KEYS[5], addr, ARGV[2])
redis.call('ZADD', KEYS[3], 0, ARGV[2])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[4], ARGV[4], ARGV[2]) end
local ev_vpc = ARGV[3]
${EVENT}
return {1, ARGV[2]}
`;

// Deletes a NAT gateway, gives its address back to the pool and ends its
// lease. KEYS: 1 record, 2 vpcnat, 3 nats zset, 4 fip byaddr, 5 lease (a
// single Redis; a cluster's is in the VPC's slot, and the store deletes it
// after); ARGV: 1 kind, 2 id, 3 vpc, 4 address ('' none).
const DELETE_NAT = `${LUA_EMIT}
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('DEL', KEYS[1])
if redis.call('HGET', KEYS[2], ARGV[3]) == ARGV[2] then redis.call('HDEL', KEYS[2], ARGV[3]) end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[4], ARGV[4]) == ARGV[2] then redis.call('HDEL', KEYS[4], ARGV[4]) end
if KEYS[5] then redis.call('DEL', KEYS[5]) end
redis.call('ZREM', KEYS[3], ARGV[2])
local ev_vpc = ARGV[3]
${EVENT}
return 1
`;

// On a Redis Cluster, a NAT gateway's hold on its subnet (GatewayKeys.natHolds,
// in the VPC's slot), written before its record and only while the subnet's
// record stands there: DELETE_SUBNET removes that record in the same slot
// and refuses while a hold names the subnet, so one of the two is refused.
// The time is the Redis server's (its age decides when a hold left by a
// stopped create is stale: common/pending.ts). A gateway's hold written
// again (a replay) keeps its place with a new time.
// KEYS: 1 the subnet's record in its VPC (IPAM_KEYS.cluster.subnetIn),
// 2 the VPC's NAT holds; ARGV: 1 NAT id, 2 subnet id. 1 held, 0 no subnet.
const HOLD_NAT = `${LUA_SERVER_MS}${LUA_NAT_HOLD}
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], nat_hold(ARGV[2], server_ms()))
return 1
`;

// Takes or renews the lease on a VPC's NAT address. KEYS: 1 lease; ARGV:
// 1 this host, 2 ttl ms, 3 vpc, 4 a holder to replace ('' none: only a free
// lease is taken). {1,me} renewed, {2,me} taken (and announced), {0,holder}
// held by another host.
const NAT_LEASE = `${LUA_EMIT}
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return {1, cur} end
if (not cur) or (ARGV[4] ~= '' and cur == ARGV[4]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  mvpc_emit({ARGV[3]}, {}, 'kind', 'gw.nat.holder', 'id', ARGV[3], 'host', ARGV[1])
  return {2, ARGV[1]}
end
return {0, cur}
`;

// Gives up this host's lease. KEYS: 1 lease; ARGV: 1 this host, 2 vpc.
const NAT_UNLEASE = `${LUA_EMIT}
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
mvpc_emit({ARGV[2]}, {}, 'kind', 'gw.nat.holder', 'id', ARGV[2], 'host', '')
return 1
`;

type R = [number, string];

/**
 * Where in a bad hash record the problem is, for the status RPC: the field
 * the reason names first (if the hash has it) and the record's VPC (if its
 * "vpc" field holds a VPC id).
 */
export function invalidWhere(h: Record<string, string>, reason: string): InvalidWhere {
  const named = /^([A-Za-z_][A-Za-z0-9_]*)/.exec(reason)?.[1];
  return { field: named !== undefined && Object.hasOwn(h, named) ? named : undefined, vpcId: vpcIdOf(h.vpc) };
}
const newId = (kind: string) => `${kind}-${randomBytes(6).toString("hex")}`;

/**
 * The gateway API's store: the reads of GatewayReader (schema.ts) and every
 * write (one Lua script each, in one slot on a Redis Cluster: see
 * GatewayKeys).
 */
export class GatewayStore extends GatewayReader {
  /** log: where skipped records are reported (once per key and reason). */
  constructor(redis: Redis, log?: Pick<Logger, "warn">) {
    super(redis, log);
    const r = redis as unknown as Record<string, unknown>;
    if (!r.mvpcGwCreate) {
      // {gw}'s scripts: their event from the client on a cluster; the leases' in their VPC's slot.
      const gw = (lua: string) => (this.keys.cluster ? lua.replace(LUA_EMIT, LUA_NO_EMIT) : lua);
      redis.defineCommand("mvpcGwCreate", { numberOfKeys: 5, lua: gw(CREATE) });
      redis.defineCommand("mvpcGwDelete", { numberOfKeys: 3, lua: gw(DELETE) });
      redis.defineCommand("mvpcGwAllocFip", { numberOfKeys: 3, lua: gw(ALLOC_FIP) });
      redis.defineCommand("mvpcGwUpdate", { numberOfKeys: 1, lua: gw(UPDATE) });
      redis.defineCommand("mvpcGwCreateNat", { numberOfKeys: 6, lua: gw(CREATE_NAT) });
      redis.defineCommand("mvpcGwDeleteNat", { numberOfKeys: this.keys.cluster ? 4 : 5, lua: gw(DELETE_NAT) });
      redis.defineCommand("mvpcGwHoldNat", { numberOfKeys: 2, lua: HOLD_NAT });
      redis.defineCommand("mvpcGwNatLease", { numberOfKeys: 1, lua: scriptFor(redis, NAT_LEASE) });
      redis.defineCommand("mvpcGwNatUnlease", { numberOfKeys: 1, lua: scriptFor(redis, NAT_UNLEASE) });
    }
  }

  private cmd(name: string, ...args: (string | number)[]): Promise<unknown> {
    return (this.redis as unknown as Record<string, (...a: (string | number)[]) => Promise<unknown>>)[name](...args);
  }

  /**
   * On a Redis Cluster, the event a {gw} script appends on a single Redis:
   * to the VPC's stream, or the fleet's for a record of no VPC (an
   * unassociated floating IP), as mvpc_emit does. The change is made by
   * then: an event lost (a crash, Redis failing in between) costs the hosts
   * their next periodic pass (--drift-interval-ms), not the change, so it
   * does not fail the call.
   */
  private async emitted(done: boolean, kind: string, id: string, ...vpcIds: string[]): Promise<void> {
    if (!done || !this.keys.cluster) return;
    const vpcs = vpcIds.filter(Boolean);
    await emit(this.redis, vpcs.length ? { vpcs } : { registry: true }, ["kind", kind, "id", id]).catch((err: Error) =>
      this.log?.warn({ kind, id, vpcs, err: err.message }, "change made, its event not appended: the hosts apply it at their next periodic pass"),
    );
  }

  /**
   * Reads and checks one record; a record its schema refuses (or a key
   * holding something else than a hash) is reported and read as absent.
   */
  private async read<T>(kind: string, key: string, parse: (h: Record<string, string>) => Parsed<T>): Promise<T | null> {
    let h: Record<string, string>;
    try {
      h = await this.redis.hgetall(key);
    } catch (err) {
      if (!/WRONGTYPE/.test((err as Error).message)) throw err;
      reportInvalid(OWNER, kind, key, "is not a hash", this.log);
      return null;
    }
    if (Object.keys(h).length === 0) return null;
    const p = parse(h);
    if (p.ok) return p.value;
    reportInvalid(OWNER, kind, key, p.reason, this.log, invalidWhere(h, p.reason));
    return null;
  }

  // ---- NAT gateways: at most one per VPC ----

  /**
   * CreateNatGateway: the VPC's NAT gateway in subnet `n.subnetId`, made
   * only while that subnet stands, whatever DeleteSubnet runs meanwhile.
   * On a Redis Cluster the subnet is in its VPC's slot and the gateway in
   * {gw}, so it takes two steps, as a peering create does
   * (common/pending.ts): a hold on the subnet in the VPC's slot (HOLD_NAT,
   * refused once the subnet's record is gone), then the record (createNat);
   * DeleteSubnet refuses while a hold names the subnet. A create that took
   * over PENDING_MS/2 between the steps gives up and takes back what it
   * wrote, or may have written: its hold could pass for stale by then
   * (recordUnderHold, the rule the peerings' creates keep too). On a single Redis the
   * record is written first and the subnet read after it: a DeleteSubnet
   * either saw the record (DELETE_SUBNET reads the NAT index) and refused,
   * or its result is seen here and the gateway goes back.
   * A retry with the same client token is answered with the gateway its
   * create made, which keeps (or gets) its hold.
   */
  async createNatInSubnet(
    n: Omit<NatRec, "id" | "createdMs" | "address">,
    clientToken: string,
    pool: { first: number; last: number },
    wanted = "",
  ): Promise<NatRec> {
    const id = newId("nat");
    checkNat({ ...n, id, address: wanted, createdMs: 0 });
    if (!this.keys.cluster) return this.keptIfSubnetStands(await this.createNat(n, clientToken, pool, wanted, id));
    const K = this.keys;
    // The client token, read once: answered before anything is held (the gateway its create made keeps its subnet held), else passed to the record's step.
    let seen: string | undefined;
    if (clientToken) {
      seen = (await this.redis.hget(K.tokens, `nat\n${clientToken}`)) ?? "";
      const prev = isId("nat", seen) ? await this.getNat(seen) : null;
      if (prev) return this.replayed(prev);
    }
    const heldAt = holdClock();
    if (!(await this.holdSubnet(id, n))) throw this.subnetGone(n);
    const nat = await recordUnderHold(() => this.createNat(n, clientToken, pool, wanted, id, seen), {
      what: "the NAT gateway",
      heldAt,
      // Another create with the same client token made its gateway meanwhile: that one is the answer, with its own hold.
      wrote: (nat) => nat.id === id,
      release: () => this.redis.hdel(K.natHolds!(n.vpcId), id).then(() => undefined),
      // deleteNat removes the hold after the record.
      takeBack: async () => {
        const nat = await this.getNat(id);
        if (nat) await this.deleteNat(nat);
      },
      undo: `microvpc nat delete ${id}`,
      // Held afresh while its subnet stands, as a replay by client token holds it (that replay may have answered with it).
      keep: async () => {
        const nat = await this.getNat(id);
        return nat && (await this.holdSubnet(id, nat)) ? nat : null;
      },
    });
    return nat.id === id ? nat : await this.replayed(nat);
  }

  /**
   * On a cluster, HOLD_NAT: the NAT gateway `id`'s hold on its subnet, in
   * the VPC's slot; false if the subnet's record is gone (deleted, or being
   * deleted: DELETE_SUBNET removes it in the same slot).
   */
  private async holdSubnet(id: string, n: { vpcId: string; subnetId: string }): Promise<boolean> {
    const K = this.keys;
    const holds = K.natHolds!(n.vpcId);
    return (
      (await this.cmd("mvpcGwHoldNat", IPAM_KEYS.cluster.subnetIn(n.vpcId, n.subnetId), holds, id, n.subnetId).catch(
        wrongTypeOf(holds, natHoldsName(n.vpcId)),
      )) === 1
    );
  }

  /** On a cluster, a gateway an earlier create made (a replay by client token): it keeps its hold, or goes if its subnet is gone. */
  private async replayed(nat: NatRec): Promise<NatRec> {
    if (await this.holdSubnet(nat.id, nat)) return nat;
    await this.deleteNat(nat);
    throw this.subnetGone(nat, "; its NAT gateway was taken back");
  }

  /**
   * On a single Redis, the gateway just written (or replayed) stays only
   * where its subnet stands: read after the write, a DeleteSubnet's result
   * is seen here. Taken back also when the subnet cannot be read: never a
   * gateway in a subnet that is gone.
   */
  private async keptIfSubnetStands(nat: NatRec): Promise<NatRec> {
    let vpc: string | null;
    try {
      vpc = await this.redis.hget(IPAM_KEYS.single.subnetIn(nat.vpcId, nat.subnetId), "vpc");
    } catch (err) {
      const back = await this.deleteNat(nat).then(
        () => "nothing was kept",
        (e: Error) => `and taking it back failed too (${e.message}): delete NAT gateway ${nat.id} once Redis answers`,
      );
      throw new UnavailableError(`cannot check subnet ${nat.subnetId} after making its NAT gateway (${(err as Error).message}); ${back}; retry`);
    }
    if (vpc === nat.vpcId) return nat;
    await this.deleteNat(nat);
    throw this.subnetGone(nat, "; nothing was kept");
  }

  private subnetGone(n: { vpcId: string; subnetId: string }, after = ""): FailedPreconditionError {
    return new FailedPreconditionError(`subnet ${n.subnetId} of VPC ${n.vpcId} is gone or being deleted${after}; a NAT gateway needs a subnet that stands`);
  }

  /**
   * The NAT gateway's record, in one script: the VPC's gateway with an
   * address of the pool, `wanted` or the lowest free one ("" wanted), held
   * in fip:byaddr, so that no floating IP takes it, until deleteNat. Its
   * subnet is not checked here (CreateNatGateway goes through
   * createNatInSubnet). Returns the gateway with id `id`, or the one an
   * earlier create with the same client token made (another id).
   */
  async createNat(
    n: Omit<NatRec, "id" | "createdMs" | "address">,
    clientToken: string,
    pool: { first: number; last: number },
    wanted = "",
    id = newId("nat"),
    seen?: string,
  ): Promise<NatRec> {
    checkNat({ ...n, id, address: wanted, createdMs: 0 });
    const field = clientToken ? `nat\n${clientToken}` : null;
    const tokenIds = { kind: "nat", recordOf: this.keys.nat, fresh: this.keys.nat(id) };
    const script = async (seen: string, rec: string) =>
      (await this.cmd(
        "mvpcGwCreateNat",
        this.keys.nat(id),
        this.keys.vpcNat,
        this.keys.nats,
        this.keys.tokens,
        this.keys.fipByAddr,
        rec,
        "gw.nat.created",
        id,
        n.vpcId,
        field ?? "",
        pool.first,
        pool.last,
        wanted,
        seen,
        "id",
        id,
        "vpc",
        n.vpcId,
        "subnet",
        n.subnetId,
        "sources",
        JSON.stringify(n.sources),
        "description",
        n.description,
        "created",
        Date.now(),
      )) as R;
    // The id the client token named when the caller read it (`seen`, with a token only) goes to the first try
    // unread again: the script checks the token still names it, and answers TOKEN_MOVED (read again) otherwise.
    const first = field && seen !== undefined ? await script(seen, isId("nat", seen) ? tokenIds.recordOf(seen) : tokenIds.fresh) : null;
    const [code, ref] = first && first[0] !== TOKEN_MOVED ? first : await withClientToken(this.redis, this.keys.tokens, field, tokenIds, script);
    // A script run twice (ioredis sends it again after a reconnect) finds its own first run: this call's gateway, made.
    const own = String(ref) === id;
    if (code === -1 && !own)
      throw new AlreadyExistsError(`VPC ${n.vpcId} already has NAT gateway ${ref}; a VPC has one (it serves every private subnet, or those in source_subnets)`);
    if (code === -3) throw new AlreadyExistsError(`${wanted} is already allocated (${ref}); leave address empty for the lowest free one`);
    if (code === -2)
      throw new ResourceExhaustedError(`the floating IP pool ${intToIp(pool.first)}–${intToIp(pool.last)} is exhausted; release unused floating IPs`);
    await this.emitted(code === 1, "gw.nat.created", id, n.vpcId);
    const nat = await this.getNat(String(ref));
    if (!nat) throw new UnavailableError(`NAT gateway ${String(ref)} was deleted while being made or replayed; retry`);
    return nat;
  }

  async getNat(id: string): Promise<NatRec | null> {
    return this.read("nat", this.keys.nat(id), (h) => parseNat(h, id));
  }

  async natOfVpc(vpcId: string): Promise<NatRec | null> {
    const id = await this.redis.hget(this.keys.vpcNat, vpcId);
    return id ? this.getNat(id) : null;
  }

  async listNats(): Promise<NatRec[]> {
    const ids = await this.redis.zrange(this.keys.nats, 0, -1);
    return (await Promise.all(ids.map((id) => this.getNat(id)))).filter((x): x is NatRec => !!x);
  }

  async deleteNat(n: NatRec): Promise<boolean> {
    const K = this.keys;
    const lease = K.cluster ? [] : [K.natLease(n.vpcId)];
    const done = (await this.cmd("mvpcGwDeleteNat", K.nat(n.id), K.vpcNat, K.nats, K.fipByAddr, ...lease, "gw.nat.deleted", n.id, n.vpcId, n.address)) === 1;
    // A cluster: the lease, in the VPC's slot, after the record (a lease left by a crash names a host for no NAT gateway, which every reader ignores, and the next CreateNat's holder replaces).
    if (done && K.cluster)
      await this.redis
        .del(K.natLease(n.vpcId))
        .catch((err: Error) =>
          this.log?.warn({ vpc: n.vpcId, err: err.message }, "NAT gateway deleted, its lease not: it runs out by itself (--nat-lease-ms)"),
        );
    // And its hold on the subnet, after the record too: one left by a crash has no record, and the next DeleteSubnet sweeps it once PENDING_MS old.
    if (K.cluster)
      await this.redis
        .hdel(K.natHolds!(n.vpcId), n.id)
        .catch((err: Error) =>
          this.log?.warn(
            { vpc: n.vpcId, nat: n.id, err: err.message },
            `NAT gateway deleted, its hold on subnet ${n.subnetId} not: DeleteSubnet sweeps it once ${PENDING_MS / 1000} s old`,
          ),
        );
    await this.emitted(done, "gw.nat.deleted", n.id, n.vpcId);
    return done;
  }

  // ---- NAT leases: which host of the VPC holds its NAT gateway's address ----

  /**
   * The host holding the VPC's NAT address, or undefined: none, or a value
   * that is not a host id, or a host that is not a registered host of the
   * VPC — its own (host-scoped) VPC records must list the VPC and, where the
   * VPC has an overlay, its registry record `mvpc:hosts:H` must be live and
   * it a member of the VPC's overlay. `bad` is set to such a refused value
   * (reported), so that a host competing for the lease may replace it.
   */
  async natHolder(vpcId: string): Promise<{ holder?: string; bad?: string }> {
    const key = this.keys.natLease(vpcId);
    const v = await this.redis.get(key);
    if (v === null) return {};
    const p = parseNatHolder(v);
    if (!p.ok) {
      reportInvalid(OWNER, "nat-lease", key, p.reason, this.log, { vpcId: vpcIdOf(vpcId) });
      return { bad: v };
    }
    const na = naKeys(this.redis);
    const [hasVpc, overlay, registered, member] = await Promise.all([
      this.redis.hexists(na.vpcs(p.value), vpcId),
      this.redis.exists(na.overlayMembers(vpcId)),
      this.redis.exists(na.overlayHost(p.value)),
      this.redis.hexists(na.overlayMembers(vpcId), p.value),
    ]);
    const why =
      hasVpc !== 1
        ? `holder: ${p.value} has no namespace of the VPC`
        : overlay === 1 && (registered !== 1 || member !== 1)
          ? `holder: ${p.value} is not a registered host of the VPC's overlay`
          : "";
    if (why) {
      reportInvalid(OWNER, "nat-lease", key, why, this.log, { vpcId: vpcIdOf(vpcId) });
      return { bad: v };
    }
    return { holder: p.value };
  }

  /** Takes the VPC's NAT lease if it is free (or held by `replace`), or renews it if held by hostId. */
  async natLease(vpcId: string, hostId: string, ttlMs: number, replace = ""): Promise<{ held: boolean; taken: boolean; holder: string }> {
    const [code, holder] = (await this.cmd("mvpcGwNatLease", this.keys.natLease(vpcId), hostId, ttlMs, vpcId, replace)) as R;
    return { held: code > 0, taken: code === 2, holder: String(holder) };
  }

  /** Gives the lease up if hostId holds it (a stopping gateway, a VPC leaving this host). */
  async natUnlease(vpcId: string, hostId: string): Promise<boolean> {
    return (await this.cmd("mvpcGwNatUnlease", this.keys.natLease(vpcId), hostId, vpcId)) === 1;
  }

  // ---- floating IPs ----

  async allocateFip(pool: { first: number; last: number }, wanted: string, description: string): Promise<FipRec> {
    const id = newId("fip");
    const [code, detail] = (await this.cmd(
      "mvpcGwAllocFip",
      this.keys.fipByAddr,
      this.keys.fips,
      this.keys.fip(id),
      "gw.fip.allocated",
      id,
      pool.first,
      pool.last,
      wanted,
      "id",
      id,
      "vpc",
      "",
      "private",
      "",
      "nic",
      "",
      "host",
      "",
      "description",
      description,
      "allocated",
      Date.now(),
      "associated",
      0,
    )) as R;
    if (code === -1) throw new AlreadyExistsError(`${wanted} is already allocated (${detail}); leave address empty for the next free one`);
    if (code === -2)
      throw new ResourceExhaustedError(`the floating IP pool ${intToIp(pool.first)}–${intToIp(pool.last)} is exhausted; release unused floating IPs`);
    await this.emitted(code === 1, "gw.fip.allocated", id, "");
    return (await this.getFip(id))!;
  }

  async getFip(id: string): Promise<FipRec | null> {
    return this.read("fip", this.keys.fip(id), (h) => parseFip(h, id));
  }

  async fipByAddress(address: string): Promise<FipRec | null> {
    const id = await this.redis.hget(this.keys.fipByAddr, address);
    return id ? this.getFip(id) : null;
  }

  async listFips(): Promise<FipRec[]> {
    const ids = await this.redis.zrange(this.keys.fips, 0, -1);
    return (await Promise.all(ids.map((id) => this.getFip(id)))).filter((x): x is FipRec => !!x);
  }

  async setFipTarget(f: FipRec, t: { vpcId: string; private: string; nicId: string; hostId: string } | null): Promise<void> {
    checkFip({ ...f, vpcId: t?.vpcId ?? "", private: t?.private ?? "", nicId: t?.nicId ?? "", hostId: t?.hostId ?? "" });
    const [ok, old] = (await this.cmd(
      "mvpcGwUpdate",
      this.keys.fip(f.id),
      t ? "gw.fip.associated" : "gw.fip.disassociated",
      f.id,
      "vpc",
      t?.vpcId ?? "",
      "private",
      t?.private ?? "",
      "nic",
      t?.nicId ?? "",
      "host",
      t?.hostId ?? "",
      "associated",
      t ? Date.now() : 0,
    )) as R;
    if (ok !== 1) throw new NotFoundError("floating ip", f.id);
    await this.emitted(true, t ? "gw.fip.associated" : "gw.fip.disassociated", f.id, String(old), t?.vpcId ?? "");
  }

  async releaseFip(f: FipRec): Promise<boolean> {
    if (f.private) throw new FailedPreconditionError(`${f.address} is associated with ${f.private}; disassociate it first (or pass force)`);
    const [code, detail] = (await this.cmd(
      "mvpcGwDelete",
      this.keys.fip(f.id),
      this.keys.fipByAddr,
      this.keys.fips,
      "gw.fip.released",
      f.id,
      f.address,
      "1",
    )) as R;
    // Associated since the caller read it: nothing is released.
    if (code === -1) throw new FailedPreconditionError(`${f.address} is associated with ${detail} now; disassociate it first (or pass force)`);
    await this.emitted(code === 1, "gw.fip.released", f.id, String(detail));
    return code === 1;
  }

  // ---- port forwards: an outside port is unique per hypervisor ----

  async createPf(p: Omit<PfRec, "id" | "createdMs">, clientToken: string): Promise<PfRec> {
    const id = newId("pf");
    checkPf({ ...p, id, createdMs: 0 });
    const field = clientToken ? `pf\n${clientToken}` : null;
    const [code, ref] = await withClientToken(
      this.redis,
      this.keys.tokens,
      field,
      { kind: "pf", recordOf: this.keys.pf, fresh: this.keys.pf(id) },
      async (seen, rec) =>
        (await this.cmd(
          "mvpcGwCreate",
          this.keys.pf(id),
          this.keys.hostPorts(p.hostId),
          this.keys.pfs,
          this.keys.tokens,
          rec,
          "gw.pf.created",
          id,
          `${p.proto}/${p.outsidePort}`,
          field ?? "",
          seen,
          "id",
          id,
          "vpc",
          p.vpcId,
          "proto",
          p.proto,
          "host",
          p.hostId,
          "outside",
          p.outsidePort,
          "private",
          p.private,
          "private_port",
          p.privatePort,
          "nic",
          p.nicId,
          "description",
          p.description,
          "created",
          Date.now(),
        )) as R,
    );
    if (code === -1)
      throw new AlreadyExistsError(`${p.proto} port ${p.outsidePort} of hypervisor ${p.hostId} is already forwarded (${ref}); pick another outside port`);
    await this.emitted(code === 1, "gw.pf.created", id, p.vpcId);
    return (await this.getPf(String(ref)))!;
  }

  async getPf(id: string): Promise<PfRec | null> {
    return this.read("pf", this.keys.pf(id), (h) => parsePf(h, id));
  }

  async listPfs(): Promise<PfRec[]> {
    const ids = await this.redis.zrange(this.keys.pfs, 0, -1);
    return (await Promise.all(ids.map((id) => this.getPf(id)))).filter((x): x is PfRec => !!x);
  }

  async deletePf(p: PfRec): Promise<boolean> {
    const K = this.keys;
    const [code, vpc] = (await this.cmd(
      "mvpcGwDelete",
      K.pf(p.id),
      K.hostPorts(p.hostId),
      K.pfs,
      "gw.pf.deleted",
      p.id,
      `${p.proto}/${p.outsidePort}`,
      "",
    )) as R;
    await this.emitted(code === 1, "gw.pf.deleted", p.id, String(vpc));
    return code === 1;
  }

  // ---- transit indexes: one /30 per VPC per hypervisor ----

  /**
   * The VPC's transit index on this host, kept while the VPC is here: the
   * lowest freed index if any (releaseTransit), else the next never used.
   * Past MAX_TRANSIT in use the VPC is refused (and skipped), never given an
   * index out of range.
   */
  async transitIndex(hostId: string, vpcId: string): Promise<number> {
    const got = await this.redis.eval(
      `local v = redis.call('HGET', KEYS[1], ARGV[1]) if v then return tonumber(v) end
       local n
       local free = redis.call('ZPOPMIN', KEYS[2])
       if free[1] then n = tonumber(free[1])
       else
         n = tonumber(redis.call('HGET', KEYS[1], '#next') or '0')
         if n >= tonumber(ARGV[2]) then return -1 end
         redis.call('HSET', KEYS[1], '#next', n + 1)
       end
       redis.call('HSET', KEYS[1], ARGV[1], n) return n`,
      2,
      this.keys.transit(hostId),
      this.keys.transitFree(hostId),
      vpcId,
      MAX_TRANSIT,
    );
    if (got === -1) throw new Error(`all ${MAX_TRANSIT} transit indexes of ${hostId} are in use; ${vpcId} is skipped until one is freed`);
    const t = parseTransit(vpcId, String(got));
    if (!t.ok) {
      reportInvalid(OWNER, "transit", this.keys.transit(hostId), t.reason, this.log, { field: vpcId, vpcId: vpcIdOf(vpcId) });
      throw new Error(`the transit index of ${vpcId} on ${hostId} is not valid (${t.reason}); the VPC is skipped`);
    }
    return t.value;
  }

  /**
   * Frees the VPC's transit index for reuse (the VPC left this host and its
   * transit link is gone). Only the index it holds now, and only a valid one,
   * goes to the free list. Returns the index freed, or undefined.
   */
  async releaseTransit(hostId: string, vpcId: string): Promise<number | undefined> {
    const got = await this.redis.eval(
      `local v = redis.call('HGET', KEYS[1], ARGV[1]) if not v then return -1 end
       redis.call('HDEL', KEYS[1], ARGV[1])
       local n = tonumber(v)
       if n and n >= 0 and n < tonumber(ARGV[2]) and n == math.floor(n) then redis.call('ZADD', KEYS[2], n, n) return n end
       return -1`,
      2,
      this.keys.transit(hostId),
      this.keys.transitFree(hostId),
      vpcId,
      MAX_TRANSIT,
    );
    return typeof got === "number" && got >= 0 ? got : undefined;
  }
}
