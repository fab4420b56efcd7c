// IPAM's public module: its Redis keys, its records, how a record is read
// back, and the reads other services make (IpamReader). Other services
// import IPAM only through this file; ipam/store.ts builds its writes on it.
import type { Redis } from "ioredis";
import { pageOver } from "../common/paging.js";
import { FailedPreconditionError, InvalidArgumentError, NotFoundError } from "../common/errors.js";
import { reportInvalid } from "../common/invalid-records.js";
import { idOrNull, isId } from "../common/ids.js";
import * as V from "../common/validate.js";
import { ipamKeys, K, type IpamKeys } from "./keys.js";

export { IPAM_KEYS, ipamKeys, K, P, type IpamKeys } from "./keys.js";

export interface Label {
  key: string;
  value: string;
}

export interface VpcRec {
  id: string;
  name: string;
  cidr: string;
  base: number;
  prefix: number;
  description: string;
  labels: Label[];
  createdMs: number;
  publicCidr: boolean;
  subnetCount: number;
}

export type SubnetKind = "public" | "private";

/** What names a subnet's allocation keys: its id and its VPC's (K.alloc and the rest are under the VPC's hash tag). */
export type SubnetRef = Pick<SubnetRec, "id" | "vpcId">;

export interface SubnetRec {
  id: string;
  vpcId: string;
  name: string;
  cidr: string;
  base: number;
  prefix: number;
  size: number;
  type: SubnetKind;
  extraReserved: number;
  description: string;
  labels: Label[];
  createdMs: number;
}

export interface AllocRec {
  subnetId: string;
  index: number;
  owner: string;
  requestId: string;
  timeMs: number;
}

export interface Usage {
  total: number;
  reserved: number;
  used: number;
  free: number;
}

/**
 * Most addresses a subnet may reserve after its gateway (CreateSubnet's
 * extra_reserved). The extra range is for infrastructure a tenant places by
 * hand (DNS, appliances, room to grow): clouds reserve 2–3. 1024 leaves room
 * for a /22 of statics while keeping what scales with it bounded: every
 * Subnet message lists its reserved addresses (≤ 1027, about 17 KiB), and
 * the create script sets the range in a single SETRANGE of ≤ 129 bytes. Without
 * a cap, a /8 with size−4 extra built a 140 MB script argument and a 16 M-step
 * loop inside Redis, blocking every other client for seconds.
 */
export const MAX_EXTRA_RESERVED = 1024;

/** The owner IPAM's records are reported under (microvpc_invalid_records_total, status RPCs). */
export const OWNER = "ipam";

/** How many addresses a subnet never hands out: network, gateway, extra, broadcast. */
export function reservedCount(extra: number): number {
  return extra + 3;
}

/** Indexes (offsets from the network address) that are never handed out. */
export function reservedIndexes(size: number, extra: number): number[] {
  const r = [0, 1];
  for (let i = 0; i < extra; i++) r.push(2 + i);
  r.push(size - 1);
  return r;
}

/**
 * A range of a VPC that no subnet may take (K.vpcReserved): the VPN client
 * range. base and size are what the scripts compare (LUA_RANGE_CHECKS); the
 * rest names it in CreateSubnet's refusal.
 */
export interface Reservation {
  owner: string;
  cidr: string;
  base: number;
  size: number;
  /** What holds it, for messages: "the VPN client range of the endpoint on host hv0 (203.0.113.10:51820)". */
  what: string;
}

const RESERVATION_OWNER_RE = /^[a-z]{1,16}$/;

/** A reservation's stored value. */
export function reservationValue(r: Omit<Reservation, "owner">): string {
  return JSON.stringify({ cidr: r.cidr, base: r.base, size: r.size, what: r.what });
}

/** A reservation read back (a hash entry owner → value), checked like the request that made it: base and size must be its CIDR's. */
export function parseReservation(owner: string, raw: string): Reservation {
  if (!RESERVATION_OWNER_RE.test(owner)) throw new InvalidArgumentError("owner", `${V.show(owner)} is not a reservation owner`);
  const o = V.jsonObject("reservation", V.storedJson("reservation", raw, 4096));
  const c = V.cidr("cidr", V.jsonString("cidr", o.cidr), { min: 8, max: 32 });
  if (o.base !== c.base || o.size !== c.size)
    throw new InvalidArgumentError("base", `base/size ${V.show(String(o.base))}/${V.show(String(o.size))} are not those of ${c.text}`);
  return { owner, cidr: c.text, base: c.base, size: c.size, what: V.text("what", V.jsonString("what", o.what)) };
}

/**
 * Lua shared by IPAM's CreateSubnet and the VPN's SetVpnEndpoint scripts, so
 * that a subnet and a reserved range never overlap whichever is written
 * first: each checks the other's key in the same script that writes its own.
 *   subnet_overlapping(subnets_zset, base, size, records) → the id of a
 *     subnet of the VPC overlapping [base, base+size), or nil; `records` is
 *     the name of its subnets' records less the id (IpamKeys.subnetIn(vpc,
 *     "")), in the VPC's slot;
 *   reservation_overlapping(reserved_hash, base, size, except) → owner, raw
 *     value of an overlapping reservation (a value that does not read as one
 *     overlaps everything: refused, never ignored), or nil.
 */
export const LUA_RANGE_CHECKS = `
local function subnet_overlapping(zset, base, size, records)
  local before = redis.call('ZREVRANGEBYSCORE', zset, base, '-inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #before > 0 then
    local psize = tonumber(redis.call('HGET', records .. before[1], 'size'))
    if not psize or tonumber(before[2]) + psize > base then return before[1] end
  end
  local after = redis.call('ZRANGEBYSCORE', zset, base, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #after > 0 and tonumber(after[2]) < base + size then return after[1] end
  return nil
end
local function reservation_overlapping(hash, base, size, except)
  local all = redis.call('HGETALL', hash)
  for i = 1, #all - 1, 2 do
    if all[i] ~= except then
      local ok, r = pcall(cjson.decode, all[i + 1])
      if not ok or type(r) ~= 'table' or type(r.base) ~= 'number' or type(r.size) ~= 'number' then return all[i], all[i + 1] end
      if r.base < base + size and base < r.base + r.size then return all[i], all[i + 1] end
    end
  end
  return nil
end
`;

/** A stored CIDR with its base and prefix fields, which must agree with it. */
function storedCidr(h: Record<string, string>): V.Cidr {
  const c = V.cidr("cidr", V.jsonString("cidr", h.cidr), { min: 8, max: 28 });
  if (h.base !== String(c.base) || h.prefix !== String(c.prefix)) {
    throw new InvalidArgumentError("base", `base ${V.show(String(h.base))} / prefix ${V.show(String(h.prefix))} do not match cidr ${c.text}`);
  }
  return c;
}

/**
 * A VPC record read back from Redis, checked by the validators the API
 * writes it with (throws InvalidArgumentError naming the field): a record
 * someone else wrote reaches no namespace name, route or nft rule unchecked.
 */
export function parseVpc(h: Record<string, string>, subnetCount: number): VpcRec {
  const c = storedCidr(h);
  return {
    id: V.id("id", V.jsonString("id", h.id), "vpc"),
    name: V.name("name", V.jsonString("name", h.name)),
    cidr: c.text,
    base: c.base,
    prefix: c.prefix,
    description: V.text("description", h.description ?? ""),
    labels: V.storedLabels("labels", h.labels),
    createdMs: V.storedInt("created", h.created, 0, Number.MAX_SAFE_INTEGER),
    publicCidr: h.public === "1",
    subnetCount,
  };
}

/** A subnet record read back from Redis, checked as parseVpc checks a VPC. */
export function parseSubnet(h: Record<string, string>): SubnetRec {
  const c = storedCidr(h);
  if (h.size !== String(c.size)) throw new InvalidArgumentError("size", `${V.show(String(h.size))} is not the size of ${c.text}`);
  if (h.type !== "public" && h.type !== "private") throw new InvalidArgumentError("type", `${V.show(String(h.type))} is neither public nor private`);
  return {
    id: V.id("id", V.jsonString("id", h.id), "subnet"),
    vpcId: V.id("vpc", V.jsonString("vpc", h.vpc), "vpc"),
    name: V.name("name", V.jsonString("name", h.name)),
    cidr: c.text,
    base: c.base,
    prefix: c.prefix,
    size: c.size,
    type: h.type,
    extraReserved: V.storedInt("extra", h.extra, 0, Math.min(MAX_EXTRA_RESERVED, c.size - 4)),
    description: V.text("description", h.description ?? ""),
    labels: V.storedLabels("labels", h.labels),
    createdMs: V.storedInt("created", h.created, 0, Number.MAX_SAFE_INTEGER),
  };
}

/** An allocation record ("owner\nrequest id\ntime"), checked like the Allocate request that made it. */
export function parseAlloc(subnetId: string, index: number, rec: string): AllocRec {
  const [owner, requestId, time, ...rest] = rec.split("\n");
  if (rest.length) throw new InvalidArgumentError("allocation", "has more than owner, request id and time");
  return {
    subnetId,
    index,
    owner: V.token("owner", owner ?? ""),
    requestId: V.token("request_id", requestId ?? "", { optional: true }),
    timeMs: V.storedInt("time", time, 0, Number.MAX_SAFE_INTEGER),
  };
}

/** A subnet's counts from its stored used counter (absent: 0), which may never exceed the subnet's allocatable addresses. */
export function subnetUsage(s: SubnetRec, rawUsed: string | null | undefined): Usage {
  const reserved = reservedCount(s.extraReserved);
  const used = V.storedInt("used", rawUsed ?? "0", 0, s.size - reserved);
  return { total: s.size, reserved, used, free: s.size - reserved - used };
}

/** Parses with `parse`; a record that does not validate is reported (once per key and reason) and read as absent. */
export function checked<T>(key: string, kind: string, parse: () => T, vpcId?: string): T | null {
  const p = V.attempt(parse);
  if (p.ok) return p.value;
  reportInvalid(OWNER, kind, key, p.reason, undefined, vpcId ? { vpcId } : {});
  return null;
}

/**
 * The stored allocation record of one address ("owner\nrequest id\ntime"),
 * unchecked, or null. The hosts' readers (AttachNic, the overlay's claim
 * check) upgrade before the control plane: until the IPAM daemon has moved a
 * subnet's state under its VPC's tag (IpamStore.migrateSubnet), a record not
 * found there is read under the earlier name; once moved, that name holds a
 * tombstone of another type: the tagged name is read again (the move may
 * have come between the two reads). Not on a cluster, which only ever has
 * the tagged names.
 */
export async function allocRecord(redis: Redis, s: SubnetRef, index: number): Promise<string | null> {
  const rec = await redis.hget(K.alloc(s.vpcId, s.id), String(index));
  if (rec !== null || redis.isCluster) return rec;
  try {
    return await redis.hget(K.legacy.alloc(s.id), String(index));
  } catch (err) {
    if (!(err as Error).message.startsWith("WRONGTYPE")) throw err;
    // A tombstone: the subnet has moved, maybe since the first read. Its record, if any, is under the tag now.
    return await redis.hget(K.alloc(s.vpcId, s.id), String(index));
  }
}

/** An owner read back from an allocation record, for a message: shown only if it is one (V.token). */
export function shownOwner(raw: string): string {
  return V.attempt(() => V.token("owner", raw)).ok ? raw : "an owner whose allocation record does not validate";
}

/** A record read under one id must say that id: a record copied or forged under another key is refused. */
function sameId<T extends { id: string }>(rec: T, id: string): T {
  if (rec.id !== id) throw new InvalidArgumentError("id", `${V.show(rec.id)} is not the id it is stored under (${V.show(id)})`);
  return rec;
}

/** What other services read of IPAM: VPCs, subnets and allocations, never a write. */
export class IpamReader {
  /** Where the VPC records, subnet indexes and catalog are on this Redis (keys.ts IpamKeys). */
  readonly L: IpamKeys;

  constructor(readonly redis: Redis) {
    this.L = ipamKeys(redis);
  }

  // ---- VPCs ----

  async resolveVpc(ref: { id?: string; name?: string }): Promise<string | null> {
    if (ref.id) return ref.id;
    // Read back from Redis: it names keys only if it is a VPC id.
    return idOrNull("vpc", await this.redis.hget(this.L.vpcByName, ref.name!));
  }

  async getVpc(id: string): Promise<VpcRec | null> {
    if (!isId("vpc", id)) return null;
    const [h, n] = await Promise.all([this.redis.hgetall(this.L.vpc(id)), this.redis.zcard(this.L.vpcSubnets(id))]);
    return h.id ? checked(this.L.vpc(id), "vpc", () => sameId(parseVpc(h, n), id), id) : null;
  }

  /**
   * VPCs by name after `afterName`, at most `limit`. A name whose VPC is gone
   * (a create or delete stopped between its steps, or a forged entry) is
   * skipped and the next names read, so that a page is short only at the end.
   */
  async listVpcs(afterName: string, limit: number): Promise<VpcRec[]> {
    return pageOver(afterName, limit, async (after) => {
      const names = await this.redis.zrangebylex(this.L.vpcNames, after ? `(${after}` : "-", "+", "LIMIT", 0, limit);
      const ids = (names.length ? await this.redis.hmget(this.L.vpcByName, ...names) : []).map((x) => idOrNull("vpc", x));
      const vpcs = await Promise.all(ids.map((id) => (id ? this.getVpc(id) : null)));
      return { items: vpcs, cursors: names };
    });
  }

  /** The VPC a request names (id or name), validated; NotFoundError if there is none. */
  async vpcByRef(field: string, ref: string): Promise<VpcRec> {
    const r = V.ref(field, ref, "vpc");
    const id = await this.resolveVpc(r);
    const vpc = id ? await this.getVpc(id) : null;
    if (!vpc) throw new NotFoundError("vpc", ref, "list VPCs with `microvpc vpc list`");
    return vpc;
  }

  // ---- Subnets ----

  async resolveSubnet(ref: { id?: string; name?: string }, vpcId: string | null): Promise<string | null> {
    if (ref.id) return ref.id;
    if (!vpcId) throw new InvalidArgumentError("vpc", "is required when the subnet is named rather than given by id");
    return idOrNull("subnet", await this.redis.hget(this.L.vpcSubnetByName(vpcId), ref.name!));
  }

  /**
   * A subnet by id. On a cluster its record by id is written before the
   * VPC's script makes the subnet (IpamStore.createSubnet), so it counts only
   * while the VPC holds the subnet's record too.
   */
  async getSubnet(id: string): Promise<SubnetRec | null> {
    if (!isId("subnet", id)) return null;
    const h = await this.redis.hgetall(K.subnet(id));
    const s = h.id ? checked(K.subnet(id), "subnet", () => sameId(parseSubnet(h), id), h.vpc) : null;
    if (s && this.L.cluster && (await this.redis.exists(this.L.subnetIn(s.vpcId, s.id))) === 0) return null;
    return s;
  }

  /** A VPC's subnets by base address after `after` (a base), or every subnet by id after `after` (an id); skips what is gone, as listVpcs. */
  async listSubnets(vpcId: string | null, after: string, limit: number): Promise<SubnetRec[]> {
    return pageOver(after, limit, async (cursor) => {
      let ids: string[];
      let cursors: string[];
      if (vpcId) {
        const flat = await this.redis.zrangebyscore(this.L.vpcSubnets(vpcId), cursor ? `(${cursor}` : "-inf", "+inf", "WITHSCORES", "LIMIT", 0, limit);
        ids = flat.filter((_, i) => i % 2 === 0);
        cursors = flat.filter((_, i) => i % 2 === 1);
      } else {
        ids = cursors = await this.redis.zrangebylex(K.allSubnets, cursor ? `(${cursor}` : "-", "+", "LIMIT", 0, limit);
      }
      return { items: await Promise.all(ids.map((id) => this.getSubnet(id))), cursors };
    });
  }

  /**
   * The subnet's address counts. Its used counter is validated like every
   * record read back (another host may have written it); an invalid one is
   * reported and refused, never shown as a negative or impossible count.
   */
  async usage(s: SubnetRec): Promise<Usage> {
    const key = K.used(s.vpcId, s.id);
    const raw = await this.redis.get(key);
    const u = V.attempt(() => subnetUsage(s, raw));
    if (u.ok) return u.value;
    reportInvalid(OWNER, "subnet-used", key, u.reason, undefined, { vpcId: s.vpcId });
    throw new FailedPreconditionError(
      `subnet ${s.id}: its used-address counter in Redis (${key}) is invalid: ${u.reason}; it is counted in microvpc_invalid_records`,
    );
  }

  // ---- Allocations (a subnet's are under its VPC's hash tag, so a read names both) ----

  async getAllocation(s: SubnetRef, index: number): Promise<AllocRec | null> {
    const rec = await allocRecord(this.redis, s, index);
    return rec ? checked(K.alloc(s.vpcId, s.id), "allocation", () => parseAlloc(s.id, index, rec), s.vpcId) : null;
  }

  async listBySubnet(s: SubnetRef, afterIndex: number, limit: number): Promise<AllocRec[]> {
    const idx = await this.redis.zrangebyscore(K.idx(s.vpcId, s.id), `(${afterIndex}`, "+inf", "LIMIT", 0, limit);
    if (idx.length === 0) return [];
    const key = K.alloc(s.vpcId, s.id);
    const recs = await this.redis.hmget(key, ...idx);
    const out: AllocRec[] = [];
    idx.forEach((i, n) => {
      const a = recs[n] ? checked(key, "allocation", () => parseAlloc(s.id, Number(i), recs[n]!), s.vpcId) : null;
      if (a) out.push(a);
    });
    return out;
  }

  /**
   * Allocations of one owner across VPCs, ordered by VPC id, then by
   * "subnet/index" member: each VPC keeps its own owners' index in its slot
   * (K.owner), so this reads one index per VPC, in pipelined rounds of 100.
   * `after` is the last one's cursor ("<vpc>/<subnet>/<index>"). For the
   * CLI and operators, not for a VM's path.
   */
  async listByOwner(owner: string, after: string, limit: number): Promise<{ alloc: AllocRec; cursor: string }[]> {
    const [afterVpc, ...rest] = after ? after.split("/") : [""];
    const afterMember = rest.join("/");
    const ids = [...new Set(await this.redis.hvals(this.L.vpcByName))].filter((id) => V.attempt(() => V.id("vpc", id, "vpc")).ok && id >= afterVpc).sort();
    const found: { vpcId: string; member: string }[] = [];
    for (let i = 0; i < ids.length && found.length < limit; i += 100) {
      const round = ids.slice(i, i + 100);
      const pages = await Promise.all(
        round.map((v) => this.redis.zrangebylex(K.owner(v, owner), v === afterVpc && afterMember ? `(${afterMember}` : "-", "+", "LIMIT", 0, limit)),
      );
      round.forEach((v, n) => {
        for (const m of pages[n]) found.push({ vpcId: v, member: m });
      });
    }
    const page = found.slice(0, limit);
    const allocs = await Promise.all(
      page.map(async ({ vpcId, member }) => {
        const [sid, i] = member.split("/");
        const a = V.attempt(() => V.id("subnet", sid, "subnet")).ok ? await this.getAllocation({ id: sid, vpcId }, Number(i)) : null;
        return a ? { alloc: a, cursor: `${vpcId}/${member}` } : null;
      }),
    );
    return allocs.filter((x): x is { alloc: AllocRec; cursor: string } => !!x);
  }

  /** Every allocation of a subnet, streamed in pages. */
  async *scanSubnet(s: SubnetRef): AsyncGenerator<AllocRec> {
    let after = -1;
    for (;;) {
      const page = await this.listBySubnet(s, after, 1000);
      if (page.length === 0) return;
      yield* page;
      after = page[page.length - 1].index;
    }
  }
}
