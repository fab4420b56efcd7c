// Flow-log configurations: which NICs log their flows (those of a VPC, a
// subnet or one NIC) and the share sampled. Stored in Redis by the
// cluster-wide API (one Lua script per change, its event in the same step);
// every hypervisor's firewall reads its VPCs' configurations in each pass
// (sync.ts), so a configuration made or deleted anywhere, or while a
// firewall was down, is applied by the next pass. Where the output goes
// (directory, rotation) stays the daemon's flags: it is the host's disk.
import { ReplyError, type Redis } from "ioredis";
import type { Logger } from "pino";
import { LUA_EMIT, scriptFor } from "../common/events.js";
import { AlreadyExistsError, InvalidArgumentError } from "../common/errors.js";
import { idOrNull, isId, newId } from "../common/ids.js";
import { defineVariadicCommand } from "../common/redis.js";
import { reportInvalid } from "../common/invalid-records.js";
import { ipamKeys, P, type IpamKeys } from "../ipam/schema.js";
import { F, FK, fwKeys, type FirewallKeys } from "./keys.js";
import type { BindingRec } from "./model.js";
import { AbortedError } from "./store.js";
import { LUA_UTIL } from "./scripts.js";
import { parseFlowLogConfig, type FlowLogConfigRec } from "./schema.js";

// The record and its checks are the firewall's contract with its readers (schema.ts).
export { checkResource, checkSampleRate, parseFlowLogConfig, RESOURCE_RE, type FlowLogConfigRec } from "./schema.js";

/**
 * The NICs of `nics` that log, and each one's sample rate: the most
 * specific configuration covering it decides (NIC, then subnet, then VPC).
 * `extra` (the daemon's --flow-logs-scope, kept for hosts configured by
 * flag) counts as configurations of its own.
 */
export function flowLogNics(nics: BindingRec[], configs: FlowLogConfigRec[], extra?: { scope: ReadonlySet<string>; sampleRate: number }): Map<string, number> {
  return flowLogRates(nics, [], configs, extra).nics;
}

/**
 * flowLogNics, and the rate of each subnet (its own configuration, else its
 * VPC's) for the drops that name no bound NIC (toward an address whose NIC
 * is not bound yet). A configuration of a resource that is not among them
 * covers nothing; a NIC's made for another binding of the NIC (unbound and
 * bound again since) neither: a stale record is ignored until the garbage
 * collection (FlowLogConfigStore.collectGarbage) deletes it.
 */
export function flowLogRates(
  nics: BindingRec[],
  subnets: { subnetId: string; vpcId?: string }[],
  configs: FlowLogConfigRec[],
  extra?: { scope: ReadonlySet<string>; sampleRate: number },
): { nics: Map<string, number>; subnets: Map<string, number> } {
  const byRes = new Map<string, number>();
  const nicBound = new Map<string, number>();
  for (const c of configs) {
    byRes.set(c.resourceId, Math.max(byRes.get(c.resourceId) ?? 0, c.sampleRate));
    if (c.nicBoundMs !== undefined) nicBound.set(c.resourceId, c.nicBoundMs);
  }
  for (const id of extra?.scope ?? []) byRes.set(id, Math.max(byRes.get(id) ?? 0, extra!.sampleRate));
  const out = new Map<string, number>();
  for (const n of nics) {
    const own = nicBound.has(n.nicId) && nicBound.get(n.nicId) !== n.boundMs && !extra?.scope.has(n.nicId) ? undefined : byRes.get(n.nicId);
    const r = own ?? byRes.get(n.subnetId) ?? byRes.get(n.vpcId);
    if (r !== undefined) out.set(n.nicId, r);
  }
  const subs = new Map<string, number>();
  for (const s of subnets) {
    const r = byRes.get(s.subnetId) ?? (s.vpcId !== undefined ? byRes.get(s.vpcId) : undefined);
    if (r !== undefined) subs.set(s.subnetId, r);
  }
  return { nics: out, subnets: subs };
}

// Every key declared (FirewallKeys, keys.ts): a cluster runs these in the VPC's slot.
// KEYS: 1 config hash, 2 the VPC's resource → id hash, 3 the VPC's ids, 4 the
// VPC's IPAM record, 5 its change counter, 6 the config the resource named
// when the caller read (ARGV[4]; else KEYS[1]), and on a single Redis 7 all ids.
// ARGV: 1 id, 2 resource, 3 vpc, 4 that config's id (''), then the hash's field/value pairs.
// Returns {1, id} created, {-1, id} the resource has one, {-2, vpc} the VPC
// is gone, {-8} the resource names another config now (the caller reads again).
const CREATE = `${LUA_EMIT}${LUA_UTIL}
if counter_bad(KEYS[5]) then return counter_refused(KEYS[5]) end
local id, res, vpc = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', KEYS[4]) == 0 then return {-2, vpc} end
local prev = redis.call('HGET', KEYS[2], res)
if (prev or '') ~= ARGV[4] then return {-8, ''} end
if prev and redis.call('EXISTS', KEYS[6]) == 1 then return {-1, prev} end
redis.call('PERSIST', KEYS[4])
redis.call('HSET', KEYS[1], unpack(fields_from(5)))
if KEYS[7] then redis.call('ZADD', KEYS[7], 0, id) end
redis.call('HSET', KEYS[2], res, id)
redis.call('SADD', KEYS[3], id)
local g = redis.call('INCR', KEYS[5])
mvpc_emit({vpc}, {}, 'kind', 'fw.flowlog.created', 'vpc', vpc, 'gen', g, 'flowlog', id)
return {1, id}
`;

// KEYS: 1 config hash, 2 the VPC's resource → id hash, 3 the VPC's ids, 4
// its change counter, and on a single Redis 5 all ids. ARGV: 1 id, 2 the VPC
// the caller read. Returns {1} deleted, {0} absent.
const DELETE = `${LUA_EMIT}${LUA_UTIL}
if counter_bad(KEYS[4]) then return counter_refused(KEYS[4]) end
local id = ARGV[1]
local vpc = redis.call('HGET', KEYS[1], 'vpc')
local res = redis.call('HGET', KEYS[1], 'resource')
if KEYS[5] then redis.call('ZREM', KEYS[5], id) end
if vpc ~= ARGV[2] then return {0} end
redis.call('DEL', KEYS[1])
if res and redis.call('HGET', KEYS[2], res) == id then redis.call('HDEL', KEYS[2], res) end
redis.call('SREM', KEYS[3], id)
local g = redis.call('INCR', KEYS[4])
mvpc_emit({vpc}, {}, 'kind', 'fw.flowlog.deleted', 'vpc', vpc, 'gen', g, 'flowlog', id, unpack(ARGV, 3))
return {1}
`;

// On a single Redis: deletes the configurations whose resource is gone: the VPC (IPAM's hash),
// the subnet (IPAM's hash, in the config's VPC) or the NIC's binding (in the
// config's VPC, the binding it was made for: same bound time). KEYS: 1 all
// ids, 2 by resource. ARGV: 1 IPAM's key prefix, then config ids.
// Returns the ids deleted.
const GC = `${LUA_EMIT}${LUA_UTIL}
local F = '${F}'
if counter_bad(F .. 'gen') then return counter_refused(F .. 'gen') end
local P = ARGV[1]
local gone = {}
for i = 2, #ARGV do
  local id = ARGV[i]
  local key = F .. 'flowlog:' .. id
  local c = redis.call('HMGET', key, 'vpc', 'resource', 'bound')
  local vpc, res, bound = c[1], c[2], c[3]
  local stale = false
  if not vpc or not res then
    stale = redis.call('EXISTS', key) == 0
  elseif redis.call('EXISTS', P .. 'vpc:' .. vpc) == 0 then
    stale = true
  elseif string.sub(res, 1, 7) == 'subnet-' then
    stale = redis.call('HGET', P .. 'subnet:' .. res, 'vpc') ~= vpc
  elseif string.sub(res, 1, 4) == 'nic-' then
    local b = redis.call('HMGET', F .. 'nic:' .. res, 'vpc', 'bound')
    stale = b[1] ~= vpc or (bound ~= false and b[2] ~= bound)
  end
  if stale then
    redis.call('ZREM', KEYS[1], id)
    if vpc then
      redis.call('DEL', key)
      if res and redis.call('HGET', KEYS[2], res) == id then redis.call('HDEL', KEYS[2], res) end
      redis.call('SREM', F .. 'vpc:' .. vpc .. ':flowlogs', id)
      local g = redis.call('INCR', F .. 'gen')
      mvpc_emit({vpc}, {}, 'kind', 'fw.flowlog.deleted', 'vpc', vpc, 'gen', g, 'flowlog', id, 'reason', 'resource-gone')
    end
    gone[#gone + 1] = id
  end
end
return gone
`;

declare module "ioredis" {
  // eslint-disable-next-line @typescript-eslint/no-unused-vars -- merging needs the same type parameter
  interface RedisCommander<Context> {
    mvpcCreateFlowLog(...args: (string | number)[]): Promise<[number, string]>;
    mvpcDeleteFlowLog(...args: (string | number)[]): Promise<[number]>;
    mvpcGcFlowLogs(...args: (string | number)[]): Promise<string[]>;
  }
}

/** At most this many configurations are listed (one a resource; far more than a VPC has subnets). */
export const MAX_FLOW_LOG_CONFIGS = 10_000;

export class FlowLogConfigStore {
  private readonly L: FirewallKeys;
  private readonly I: IpamKeys;

  constructor(readonly redis: Redis) {
    if (!(redis as unknown as { mvpcCreateFlowLog?: unknown }).mvpcCreateFlowLog) {
      defineVariadicCommand(redis, "mvpcCreateFlowLog", scriptFor(redis, CREATE));
      defineVariadicCommand(redis, "mvpcDeleteFlowLog", scriptFor(redis, DELETE));
      redis.defineCommand("mvpcGcFlowLogs", { numberOfKeys: 2, lua: GC });
    }
    this.L = fwKeys(redis);
    this.I = ipamKeys(redis);
  }

  async create(c: Omit<FlowLogConfigRec, "id" | "createdMs">): Promise<FlowLogConfigRec> {
    const id = newId("fl");
    const fields: Record<string, string> = {
      id,
      vpc: c.vpcId,
      resource: c.resourceId,
      rate: String(c.sampleRate),
      description: c.description,
      created: String(Date.now()),
      ...(c.nicBoundMs !== undefined ? { bound: String(c.nicBoundMs) } : {}),
    };
    // The writer applies the readers' check: what it stores reads back.
    const check = parseFlowLogConfig(fields, id);
    if (!check.ok) throw new InvalidArgumentError("config", `refusing to store an invalid flow-log config: ${check.reason}`);
    const L = this.L;
    const v = c.vpcId;
    if (L.flowLogVpc) await this.redis.hset(L.flowLogVpc, id, v);
    let reply: [number, string] = [-8, ""];
    for (let attempt = 0; attempt < 5 && reply[0] === -8; attempt++) {
      const prev = (await this.redis.hget(L.flowLogByRes(v), c.resourceId)) ?? "";
      const keys = [
        L.flowLog(v, id),
        L.flowLogByRes(v),
        L.vpcFlowLogs(v),
        this.I.vpc(v),
        L.gen(v),
        isId("fl", prev) ? L.flowLog(v, prev) : L.flowLog(v, id),
        ...(L.cluster ? [] : [L.allFlowLogs]),
      ];
      reply = await this.redis
        .mvpcCreateFlowLog(keys.length, ...keys, id, c.resourceId, v, prev, ...Object.entries(fields).flat())
        .catch(async (err: unknown) => {
          // Refused by Redis and not made: its catalog entry goes (after a timeout the script may have run, and it stays).
          if (L.flowLogVpc && err instanceof ReplyError && (await this.redis.exists(L.flowLog(v, id)).catch(() => 1)) === 0)
            await this.redis.hdel(L.flowLogVpc, id).catch(() => undefined);
          throw err;
        });
    }
    const [code, ref] = reply;
    if (code !== 1 && L.flowLogVpc) await this.redis.hdel(L.flowLogVpc, id);
    if (code === -8) throw new AbortedError(`${c.resourceId}: its flow-log config kept changing while this one was created; retry`);
    if (code === -1) throw new AlreadyExistsError(`${c.resourceId} already has flow-log config ${ref}; delete it first to change its sample rate`);
    if (code === -2) throw new InvalidArgumentError("resource_id", `the VPC ${ref} was deleted`);
    if (L.cluster) await this.redis.zadd(L.allFlowLogs, 0, id);
    return check.value;
  }

  /** The VPC a configuration is in: on a cluster from the catalog (null if not there); on a single Redis "" (its keys do not name it). */
  private async vpcOf(id: string): Promise<string | null> {
    if (!this.L.flowLogVpc) return "";
    return idOrNull("vpc", await this.redis.hget(this.L.flowLogVpc, id));
  }

  /** One configuration; null if absent. A record that fails its check is reported and treated as absent. */
  async get(id: string, vpcId?: string): Promise<FlowLogConfigRec | null> {
    const v = vpcId ?? (await this.vpcOf(id));
    if (v === null) return null;
    const key = this.L.flowLog(v, id);
    const h = await this.redis.hgetall(key);
    if (Object.keys(h).length === 0) return null;
    const p = parseFlowLogConfig(h, id);
    if (!p.ok || (this.L.cluster && p.value.vpcId !== v)) {
      reportInvalid("firewall", "flowlog", key, p.ok ? `names VPC ${p.value.vpcId}, but is kept under ${v}` : p.reason);
      return null;
    }
    return p.value;
  }

  async list(vpcId?: string): Promise<FlowLogConfigRec[]> {
    const ids = vpcId
      ? (await this.redis.smembers(this.L.vpcFlowLogs(vpcId))).sort()
      : await this.redis.zrangebylex(this.L.allFlowLogs, "-", "+", "LIMIT", 0, MAX_FLOW_LOG_CONFIGS);
    const recs = await Promise.all(ids.slice(0, MAX_FLOW_LOG_CONFIGS).map((id) => (isId("fl", id) ? this.get(id, vpcId) : null)));
    return recs.filter((r): r is FlowLogConfigRec => r !== null && (!vpcId || r.vpcId === vpcId));
  }

  /**
   * Deletes the configurations (the given ids, else all, at most
   * MAX_FLOW_LOG_CONFIGS) whose VPC, subnet or NIC binding is gone, each with
   * its fw.flowlog.deleted event; returns their ids. On a single Redis atomic
   * per batch: a configuration is checked and deleted in one step. On a
   * cluster its resource is in other slots: it is checked from here, then
   * deleted by id (a resource made again has another id, or for a NIC
   * another bound time, so what was found stale stays stale).
   */
  async collectGarbage(ids?: string[]): Promise<string[]> {
    const all = ids ?? (await this.redis.zrangebylex(this.L.allFlowLogs, "-", "+", "LIMIT", 0, MAX_FLOW_LOG_CONFIGS));
    const valid = all.filter((id) => isId("fl", id));
    if (this.L.cluster) return this.collectInSteps(valid);
    const gone: string[] = [];
    for (let i = 0; i < valid.length; i += 500) gone.push(...(await this.redis.mvpcGcFlowLogs(FK.allFlowLogs, FK.flowLogByRes, P, ...valid.slice(i, i + 500))));
    return gone;
  }

  private async collectInSteps(ids: string[]): Promise<string[]> {
    const L = this.L;
    const gone: string[] = [];
    for (const id of ids) {
      const v = await this.vpcOf(id);
      const c = v === null ? null : await this.redis.hmget(L.flowLog(v, id), "vpc", "resource", "bound");
      if (v === null || c?.[0] === null || c?.[1] === null) {
        // No record: only its listing entries are left.
        if (v === null || (await this.redis.exists(L.flowLog(v, id))) === 0) {
          await this.redis.zrem(L.allFlowLogs, id);
          if (L.flowLogVpc) await this.redis.hdel(L.flowLogVpc, id);
          gone.push(id);
        }
        continue;
      }
      const [, res, bound] = c!;
      let stale = (await this.redis.exists(this.I.vpc(v))) === 0;
      if (!stale && res!.startsWith("subnet-")) stale = (await this.redis.hget(this.I.subnetIn(v, res!), "vpc")) !== v;
      else if (!stale && res!.startsWith("nic-")) {
        const [bv, bb] = await this.redis.hmget(L.nic(res!), "vpc", "bound");
        stale = bv !== v || (bound !== null && bb !== bound);
      }
      if (!stale) continue;
      await this.deleteIn(v, id, ["reason", "resource-gone"]);
      gone.push(id);
    }
    return gone;
  }

  private async deleteIn(v: string, id: string, extra: string[] = []): Promise<boolean> {
    const L = this.L;
    const keys = [L.flowLog(v, id), L.flowLogByRes(v), L.vpcFlowLogs(v), L.gen(v), ...(L.cluster ? [] : [L.allFlowLogs])];
    const [code] = await this.redis.mvpcDeleteFlowLog(keys.length, ...keys, id, v, ...extra);
    if (L.cluster) {
      await this.redis.zrem(L.allFlowLogs, id);
      if (L.flowLogVpc) await this.redis.hdel(L.flowLogVpc, id);
    }
    return code === 1;
  }

  /** The id of the configuration stored for a resource of the VPC, if any. */
  async idOf(resourceId: string, vpcId: string): Promise<string | null> {
    return await this.redis.hget(this.L.flowLogByRes(vpcId), resourceId);
  }

  async delete(id: string): Promise<boolean> {
    const L = this.L;
    const at = await this.vpcOf(id);
    if (at === null) return false;
    // On a single Redis the record names its VPC (its set of ids is named by it).
    const raw = await this.redis.hget(L.flowLog(at, id), "vpc");
    if (raw === null) {
      if (!L.cluster) await this.redis.zrem(L.allFlowLogs, id);
      return false;
    }
    return this.deleteIn(L.cluster ? at : raw, id);
  }
}

/**
 * Every `everyMs`, deletes the configurations whose VPC, subnet or NIC
 * binding is gone (FlowLogConfigStore.collectGarbage). Every firewall runs
 * it; one whose Redis user may not write the configurations (a hypervisor's,
 * docs/redis-acl.md) says so once and leaves it to the control plane's.
 */
export function startFlowLogGc(store: FlowLogConfigStore, log: Logger, everyMs: number): { stop(): void } {
  let warned = false;
  const timer = setInterval(
    () => {
      store.collectGarbage().then(
        (gone) => {
          if (gone.length) log.info({ configs: gone }, "flow logs: deleted the configs whose VPC, subnet or NIC is gone");
        },
        (err: Error) => {
          if (!warned) log.warn({ err: err.message }, "flow logs: cannot delete the configs whose resource is gone (the control plane's firewall does)");
          warned = true;
        },
      );
    },
    Number.isFinite(everyMs) ? Math.max(1000, everyMs) : 30_000,
  );
  timer.unref();
  return { stop: () => clearInterval(timer) };
}
