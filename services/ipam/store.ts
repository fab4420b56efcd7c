// IPAM's writes to Redis. Every change is one Lua script (scripts.ts); reads
// are plain commands, in IpamReader (schema.ts), which other services use and
// IpamStore extends. Returns plain records; the service layer turns them into
// API messages.
import type { Redis } from "ioredis";
import { AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, NotFoundError, ResourceExhaustedError } from "../common/errors.js";
import * as V from "../common/validate.js";
import { vpcDnsKeys } from "../dns/schema.js";
import { checked, IpamReader, K, MAX_EXTRA_RESERVED, parseAlloc, parseReservation, type AllocRec, type SubnetRec, type VpcRec } from "./schema.js";
import { newId } from "../common/ids.js";
import * as S from "./scripts.js";

export { newId };
export { IpamReader, MAX_EXTRA_RESERVED, reservedCount, reservedIndexes } from "./schema.js";
export type { AllocRec, Label, SubnetKind, SubnetRec, Usage, VpcRec } from "./schema.js";

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
  redis.defineCommand("mvpcDeleteVpc", { numberOfKeys: 14, lua: S.DELETE_VPC });
  redis.defineCommand("mvpcCreateSubnet", { numberOfKeys: 11, lua: S.CREATE_SUBNET });
  redis.defineCommand("mvpcDeleteSubnet", { numberOfKeys: 13, lua: S.DELETE_SUBNET });
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

/** The IPAM daemon's store: the reads of IpamReader (schema.ts) and every write (one Lua script each). */
export class IpamStore extends IpamReader {
  constructor(redis: Redis) {
    super(redis);
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
      K.vpcReserved(id),
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
    const reply = await this.redis.mvpcCreateSubnet(
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
      K.vpcReserved(s.vpcId),
      id,
      s.name,
      s.base,
      s.size,
      clientToken,
      s.extraReserved,
      ...flat(fields),
    );
    const [code, ref] = reply;
    if (code === -4) throw new NotFoundError("vpc", s.vpcId);
    if (code === -5) throw new InvalidArgumentError("extra_reserved", `${s.extraReserved} leaves no usable address in ${s.cidr}`);
    if (code === -1) throw new AlreadyExistsError(`VPC ${s.vpcId} already has a subnet named ${JSON.stringify(s.name)} (${ref})`);
    if (code === -2) {
      const other = await this.getSubnet(String(ref));
      throw new AlreadyExistsError(
        `${s.cidr} overlaps subnet ${other?.name ?? ref} (${other?.cidr ?? "?"}) of the same VPC; choose a CIDR that does not overlap`,
      );
    }
    if (code === -6) {
      const [, owner, raw] = reply as unknown as [number, string, string];
      const r = checked(K.vpcReserved(s.vpcId), "reservation", () => parseReservation(owner, raw), s.vpcId);
      throw new FailedPreconditionError(
        r
          ? `${s.cidr} overlaps ${r.cidr}, reserved for ${r.what}; choose a CIDR outside it (or move that range: microvpc vpn endpoint set --client-cidr)`
          : `${s.cidr}: VPC ${s.vpcId} has a reserved range ${V.show(owner)} that does not read as one (${K.vpcReserved(s.vpcId)}, counted in microvpc_invalid_records); no subnet is created until it is fixed`,
      );
    }
    const subnet = await this.getSubnet(String(ref));
    if (!subnet) throw new NotFoundError("subnet", String(ref), "it was deleted while being created");
    return { subnet, created: code === 1 };
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

  // ---- Allocations ----

  /** wanted = index inside the subnet, or -1 for the lowest free one. */
  async allocate(s: SubnetRec, owner: string, requestId: string, wanted: number): Promise<{ alloc: AllocRec; created: boolean }> {
    const now = Date.now();
    const [code, detail] = await this.redis.mvpcAllocate(...allocateKeys(s.id, owner), owner, requestId, wanted, now, s.id);
    const addr = (i: number) => V.intToIp(s.base + i);
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
          const a = recs[n] ? checked(K.alloc(s.id), "allocation", () => parseAlloc(s.id, idx, recs[n]!), s.vpcId) : null;
          if (a) allocs.push(a);
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
    if (code === -1) throw new FailedPreconditionError(`${V.intToIp(s.base + index)} is held by ${detail}, not ${owner}; nothing was released`);
    throw new Error(`release script returned ${code}`);
  }
}
