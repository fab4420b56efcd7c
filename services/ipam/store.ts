// The only IPAM module that talks to Redis. Every change is one Lua script
// (scripts.ts); reads are plain commands. Returns plain records; the service
// layer turns them into API messages.
import { randomBytes } from "node:crypto";
import type { Redis } from "ioredis";
import { AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, NotFoundError, ResourceExhaustedError } from "../common/errors.js";
import { intToIp } from "../common/validate.js";
import { vpcDnsKeys } from "../dns/store.js";
import { K } from "./keys.js";
import * as S from "./scripts.js";

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

export function newId(kind: string): string {
  return `${kind}-${randomBytes(6).toString("hex")}`;
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

type Reply = [number, string | number];

declare module "ioredis" {
  // eslint-disable-next-line @typescript-eslint/no-unused-vars -- merging needs the same type parameter
  interface RedisCommander<Context> {
    mvpcAllocate(...args: (string | number)[]): Promise<Reply>;
    mvpcAllocateBatch(...args: (string | number)[]): Promise<number[]>;
    mvpcRelease(...args: (string | number)[]): Promise<Reply>;
    mvpcCreateVpc(...args: (string | number)[]): Promise<Reply>;
    mvpcDeleteVpc(...args: (string | number)[]): Promise<Reply>;
    mvpcCreateSubnet(...args: (string | number)[]): Promise<Reply>;
    mvpcDeleteSubnet(...args: (string | number)[]): Promise<Reply>;
  }
}

export function defineScripts(redis: Redis): void {
  if ((redis as unknown as { mvpcAllocate?: unknown }).mvpcAllocate) return;
  redis.defineCommand("mvpcAllocate", { numberOfKeys: 9, lua: S.ALLOCATE });
  redis.defineCommand("mvpcAllocateBatch", { numberOfKeys: 9, lua: S.ALLOCATE_BATCH });
  redis.defineCommand("mvpcRelease", { numberOfKeys: 8, lua: S.RELEASE });
  redis.defineCommand("mvpcCreateVpc", { numberOfKeys: 5, lua: S.CREATE_VPC });
  redis.defineCommand("mvpcDeleteVpc", { numberOfKeys: 13, lua: S.DELETE_VPC });
  redis.defineCommand("mvpcCreateSubnet", { numberOfKeys: 10, lua: S.CREATE_SUBNET });
  redis.defineCommand("mvpcDeleteSubnet", { numberOfKeys: 13, lua: S.DELETE_SUBNET });
}

function parseVpc(h: Record<string, string>, subnetCount: number): VpcRec {
  return {
    id: h.id,
    name: h.name,
    cidr: h.cidr,
    base: Number(h.base),
    prefix: Number(h.prefix),
    description: h.description ?? "",
    labels: JSON.parse(h.labels ?? "[]"),
    createdMs: Number(h.created),
    publicCidr: h.public === "1",
    subnetCount,
  };
}

function parseSubnet(h: Record<string, string>): SubnetRec {
  return {
    id: h.id,
    vpcId: h.vpc,
    name: h.name,
    cidr: h.cidr,
    base: Number(h.base),
    prefix: Number(h.prefix),
    size: Number(h.size),
    type: h.type === "public" ? "public" : "private",
    extraReserved: Number(h.extra),
    description: h.description ?? "",
    labels: JSON.parse(h.labels ?? "[]"),
    createdMs: Number(h.created),
  };
}

function parseAlloc(subnetId: string, index: number, rec: string): AllocRec {
  const [owner, requestId, time] = rec.split("\n");
  return { subnetId, index, owner, requestId, timeMs: Number(time) };
}

function flat(obj: Record<string, string | number>): (string | number)[] {
  return Object.entries(obj).flat();
}

/** The nine KEYS of the allocate scripts (ALLOCATE and ALLOCATE_BATCH), in their order. */
function allocateKeys(subnetId: string, owner: string): string[] {
  return [
    K.subnet(subnetId),
    K.bits(subnetId),
    K.full(subnetId),
    K.alloc(subnetId),
    K.req(subnetId),
    K.idx(subnetId),
    K.used(subnetId),
    K.owner(owner),
    K.events,
  ];
}

export class IpamStore {
  constructor(readonly redis: Redis) {
    defineScripts(redis);
  }

  // ---- VPCs ----

  async createVpc(v: Omit<VpcRec, "id" | "createdMs" | "subnetCount">, clientToken: string): Promise<{ vpc: VpcRec; created: boolean }> {
    const id = newId("vpc");
    const createdMs = Date.now();
    const fields = {
      id,
      name: v.name,
      cidr: v.cidr,
      base: v.base,
      prefix: v.prefix,
      description: v.description,
      labels: JSON.stringify(v.labels),
      created: createdMs,
      public: v.publicCidr ? "1" : "0",
    };
    const [code, ref] = await this.redis.mvpcCreateVpc(K.vpc(id), K.vpcByName, K.vpcNames, K.tokens, K.events, id, v.name, clientToken, ...flat(fields));
    if (code === -1) throw new AlreadyExistsError(`a VPC named ${JSON.stringify(v.name)} already exists (${ref}); pick another name or use it`);
    const vpc = await this.getVpc(String(ref));
    if (!vpc) throw new NotFoundError("vpc", String(ref), "it was deleted while being created");
    return { vpc, created: code === 1 };
  }

  async resolveVpc(ref: { id?: string; name?: string }): Promise<string | null> {
    if (ref.id) return ref.id;
    return await this.redis.hget(K.vpcByName, ref.name!);
  }

  async getVpc(id: string): Promise<VpcRec | null> {
    const [h, n] = await Promise.all([this.redis.hgetall(K.vpc(id)), this.redis.zcard(K.vpcSubnets(id))]);
    return h.id ? parseVpc(h, n) : null;
  }

  async listVpcs(afterName: string, limit: number): Promise<VpcRec[]> {
    const names = await this.redis.zrangebylex(K.vpcNames, afterName ? `(${afterName}` : "-", "+", "LIMIT", 0, limit);
    if (names.length === 0) return [];
    const ids = await this.redis.hmget(K.vpcByName, ...names);
    const vpcs = await Promise.all(ids.filter((x): x is string => !!x).map((id) => this.getVpc(id)));
    return vpcs.filter((x): x is VpcRec => !!x);
  }

  async deleteVpc(id: string): Promise<boolean> {
    const [code, n] = await this.redis.mvpcDeleteVpc(
      K.vpc(id),
      K.vpcByName,
      K.vpcNames,
      K.vpcSubnets(id),
      K.events,
      K.vpcPeerings(id),
      K.fwVpcSgs(id),
      K.fwVpcAcls(id),
      K.gwVpcNat,
      ...vpcDnsKeys(id),
      id,
    );
    if (code === -1) throw new FailedPreconditionError(`VPC ${id} still has ${n} subnet(s); delete them first (microvpc subnet list --vpc ${id})`);
    if (code === -2) throw new FailedPreconditionError(`VPC ${id} is still peered (${n} peering(s)); delete them first (microvpc vpc peer list --vpc ${id})`);
    if (code === -3) throw new FailedPreconditionError(`VPC ${id} still has ${n}; delete them first (microvpc sg list / acl list / nat delete --vpc ${id})`);
    return code === 1;
  }

  // ---- Subnets ----

  async createSubnet(s: Omit<SubnetRec, "id" | "createdMs">, clientToken: string): Promise<{ subnet: SubnetRec; created: boolean }> {
    const id = newId("subnet");
    const createdMs = Date.now();
    const fields = {
      id,
      vpc: s.vpcId,
      name: s.name,
      cidr: s.cidr,
      base: s.base,
      prefix: s.prefix,
      size: s.size,
      type: s.type,
      extra: s.extraReserved,
      description: s.description,
      labels: JSON.stringify(s.labels),
      created: createdMs,
    };
    if (!Number.isSafeInteger(s.extraReserved) || s.extraReserved < 0 || s.extraReserved > Math.min(MAX_EXTRA_RESERVED, s.size - 4)) {
      throw new InvalidArgumentError("extra_reserved", `${s.extraReserved} is out of range for ${s.cidr}: 0 to ${Math.min(MAX_EXTRA_RESERVED, s.size - 4)}`);
    }
    const [code, ref] = await this.redis.mvpcCreateSubnet(
      K.vpc(s.vpcId),
      K.vpcSubnets(s.vpcId),
      K.vpcSubnetByName(s.vpcId),
      K.subnet(id),
      K.bits(id),
      K.full(id),
      K.used(id),
      K.tokens,
      K.events,
      K.allSubnets,
      id,
      s.name,
      s.base,
      s.size,
      clientToken,
      s.extraReserved,
      ...flat(fields),
    );
    if (code === -4) throw new NotFoundError("vpc", s.vpcId);
    if (code === -5) throw new InvalidArgumentError("extra_reserved", `${s.extraReserved} leaves no usable address in ${s.cidr}`);
    if (code === -1) throw new AlreadyExistsError(`VPC ${s.vpcId} already has a subnet named ${JSON.stringify(s.name)} (${ref})`);
    if (code === -2) {
      const other = await this.getSubnet(String(ref));
      throw new AlreadyExistsError(
        `${s.cidr} overlaps subnet ${other?.name ?? ref} (${other?.cidr ?? "?"}) of the same VPC; choose a CIDR that does not overlap`,
      );
    }
    const subnet = await this.getSubnet(String(ref));
    if (!subnet) throw new NotFoundError("subnet", String(ref), "it was deleted while being created");
    return { subnet, created: code === 1 };
  }

  async resolveSubnet(ref: { id?: string; name?: string }, vpcId: string | null): Promise<string | null> {
    if (ref.id) return ref.id;
    if (!vpcId) throw new InvalidArgumentError("vpc", "is required when the subnet is named rather than given by id");
    return await this.redis.hget(K.vpcSubnetByName(vpcId), ref.name!);
  }

  async getSubnet(id: string): Promise<SubnetRec | null> {
    const h = await this.redis.hgetall(K.subnet(id));
    return h.id ? parseSubnet(h) : null;
  }

  async listSubnets(vpcId: string | null, after: string, limit: number): Promise<SubnetRec[]> {
    let ids: string[];
    if (vpcId) {
      ids = await this.redis.zrangebyscore(K.vpcSubnets(vpcId), after ? `(${after}` : "-inf", "+inf", "LIMIT", 0, limit);
    } else {
      ids = await this.redis.zrangebylex(K.allSubnets, after ? `(${after}` : "-", "+", "LIMIT", 0, limit);
    }
    const subnets = await Promise.all(ids.map((id) => this.getSubnet(id)));
    return subnets.filter((x): x is SubnetRec => !!x);
  }

  async deleteSubnet(id: string): Promise<boolean> {
    const s = await this.getSubnet(id);
    if (!s) return false;
    const [code, n] = await this.redis.mvpcDeleteSubnet(
      K.subnet(id),
      K.vpcSubnets(s.vpcId),
      K.vpcSubnetByName(s.vpcId),
      K.bits(id),
      K.full(id),
      K.used(id),
      K.alloc(id),
      K.req(id),
      K.idx(id),
      K.events,
      K.allSubnets,
      K.fwSubnetAcl,
      K.gwVpcNat,
      id,
    );
    if (code === -1)
      throw new FailedPreconditionError(`subnet ${s.name} (${id}) still has ${n} allocated address(es); release them first (microvpc ip list --subnet ${id})`);
    if (code === -2) throw new FailedPreconditionError(`subnet ${s.name} (${id}): ${n}; remove that first`);
    return code === 1;
  }

  async usage(s: SubnetRec): Promise<Usage> {
    const used = Number((await this.redis.get(K.used(s.id))) ?? 0);
    const reserved = reservedCount(s.extraReserved);
    return { total: s.size, reserved, used, free: s.size - reserved - used };
  }

  // ---- Allocations ----

  /** wanted = index inside the subnet, or -1 for the lowest free one. */
  async allocate(s: SubnetRec, owner: string, requestId: string, wanted: number): Promise<{ alloc: AllocRec; created: boolean }> {
    const now = Date.now();
    const [code, detail] = await this.redis.mvpcAllocate(...allocateKeys(s.id, owner), owner, requestId, wanted, now, s.id);
    const addr = (i: number) => intToIp(s.base + i);
    switch (code) {
      case 1:
        return { alloc: { subnetId: s.id, index: Number(detail), owner, requestId, timeMs: now }, created: true };
      case 0: {
        const a = await this.getAllocation(s.id, Number(detail));
        return { alloc: a ?? { subnetId: s.id, index: Number(detail), owner, requestId, timeMs: now }, created: false };
      }
      case -1: {
        const holder = String(detail).split("\n")[0];
        throw new AlreadyExistsError(`${addr(wanted)} is already allocated to ${holder}; ask for another address or leave it empty for the next free one`);
      }
      case -2:
        throw new ResourceExhaustedError(`subnet ${s.name} (${s.cidr}) has no free address; release addresses or create a larger subnet`);
      case -3:
        throw new FailedPreconditionError(
          `request id ${JSON.stringify(requestId)} of ${owner} already holds ${addr(Number(detail))}, not ${addr(wanted)}; use a new request id for a different address`,
        );
      case -4:
        throw new NotFoundError("subnet", s.id, "it was deleted");
      case -5:
        throw new InvalidArgumentError(
          "address",
          `${addr(wanted)} is reserved in ${s.cidr} (network, gateway, ${s.extraReserved} extra, broadcast); ask for an address from ${addr(2 + s.extraReserved)} to ${addr(s.size - 2)}`,
        );
      default:
        throw new Error(`allocate script returned ${code}`);
    }
  }

  /**
   * count addresses in one script, all or nothing; item i is held under
   * request id "<requestId>/<i>". A retry returns the items still held.
   */
  async allocateBatch(s: SubnetRec, owner: string, requestId: string, count: number): Promise<{ allocs: AllocRec[]; created: boolean }> {
    const now = Date.now();
    const r = await this.redis.mvpcAllocateBatch(...allocateKeys(s.id, owner), owner, requestId, count, now, s.id);
    const code = Number(r[0]);
    switch (code) {
      case 1:
        return {
          allocs: r.slice(1).map((idx, i) => ({ subnetId: s.id, index: Number(idx), owner, requestId: `${requestId}/${i}`, timeMs: now })),
          created: true,
        };
      case 0: {
        const held = r.slice(1).map(Number);
        const live = held.filter((i) => i >= 0);
        const recs = live.length ? await this.redis.hmget(K.alloc(s.id), ...live.map(String)) : [];
        const allocs: AllocRec[] = [];
        live.forEach((idx, n) => {
          if (recs[n]) allocs.push(parseAlloc(s.id, idx, recs[n]!));
        });
        return { allocs, created: false };
      }
      case -2:
        throw new ResourceExhaustedError(
          `subnet ${s.name} (${s.cidr}) has ${Number(r[1])} free address(es), fewer than the ${count} asked for; nothing was allocated (ask for fewer, release addresses or create a larger subnet)`,
        );
      case -3:
        throw new FailedPreconditionError(
          `request id ${JSON.stringify(requestId)} of ${owner} was used for a batch of more than ${count}; use a new request id`,
        );
      case -4:
        throw new NotFoundError("subnet", s.id, "it was deleted");
      default:
        throw new Error(`allocate batch script returned ${code}`);
    }
  }

  /** index = -1 releases by owner+requestId. Returns the index freed, or null. */
  async release(s: SubnetRec, index: number, owner: string, requestId: string, expectTime = ""): Promise<number | null> {
    const [code, detail] = await this.redis.mvpcRelease(
      K.subnet(s.id),
      K.bits(s.id),
      K.full(s.id),
      K.alloc(s.id),
      K.req(s.id),
      K.idx(s.id),
      K.used(s.id),
      K.events,
      index,
      owner,
      requestId,
      s.id,
      K.ownerPrefix,
      expectTime,
    );
    if (code === 1) return Number(detail);
    if (code === 0 || code === -4 || code === -6) return null;
    if (code === -1) throw new FailedPreconditionError(`${intToIp(s.base + index)} is held by ${detail}, not ${owner}; nothing was released`);
    throw new Error(`release script returned ${code}`);
  }

  async getAllocation(subnetId: string, index: number): Promise<AllocRec | null> {
    const rec = await this.redis.hget(K.alloc(subnetId), String(index));
    return rec ? parseAlloc(subnetId, index, rec) : null;
  }

  async listBySubnet(subnetId: string, afterIndex: number, limit: number): Promise<AllocRec[]> {
    const idx = await this.redis.zrangebyscore(K.idx(subnetId), `(${afterIndex}`, "+inf", "LIMIT", 0, limit);
    if (idx.length === 0) return [];
    const recs = await this.redis.hmget(K.alloc(subnetId), ...idx);
    const out: AllocRec[] = [];
    idx.forEach((i, n) => {
      if (recs[n]) out.push(parseAlloc(subnetId, Number(i), recs[n]!));
    });
    return out;
  }

  /** Allocations of one owner, ordered by "subnet/index" member. */
  async listByOwner(owner: string, after: string, limit: number): Promise<{ allocs: AllocRec[]; last: string }> {
    const members = await this.redis.zrangebylex(K.owner(owner), after ? `(${after}` : "-", "+", "LIMIT", 0, limit);
    const allocs = await Promise.all(
      members.map(async (m) => {
        const [sid, i] = m.split("/");
        return this.getAllocation(sid, Number(i));
      }),
    );
    return { allocs: allocs.filter((x): x is AllocRec => !!x), last: members.at(-1) ?? "" };
  }

  /** Every allocation of a subnet, streamed in pages. */
  async *scanSubnet(subnetId: string): AsyncGenerator<AllocRec> {
    let after = -1;
    for (;;) {
      const page = await this.listBySubnet(subnetId, after, 1000);
      if (page.length === 0) return;
      yield* page;
      after = page[page.length - 1].index;
    }
  }
}
