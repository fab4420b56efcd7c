// IPAM's writes to Redis. Every change is one Lua script (scripts.ts); reads
// are plain commands, in IpamReader (schema.ts), which other services use and
// IpamStore extends. Returns plain records; the service layer turns them into
// API messages.
import { createHash } from "node:crypto";
import type { Cluster, Redis } from "ioredis";
import { AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, NotFoundError, ResourceExhaustedError } from "../common/errors.js";
import * as V from "../common/validate.js";
import { dnsKeys, vpcDnsKeys } from "../dns/schema.js";
import { PEERING_KEYS, staleReservations } from "../peering/schema.js";
import { NO_STALE_HOLDS, type StaleHolds } from "../common/pending.js";
import { FW_KEYS } from "../firewall/schema.js";
import { GW_KEYS, staleNatHolds } from "../gateway/schema.js";
import { vpnKeysOf } from "../netagent/schema.js";
import { reportInvalid } from "../common/invalid-records.js";
import {
  checked,
  IpamReader,
  K,
  MAX_EXTRA_RESERVED,
  OWNER,
  parseAlloc,
  parseReservation,
  shownOwner,
  type AllocRec,
  type SubnetRec,
  type VpcRec,
} from "./schema.js";
import { TOKEN_MOVED, withClientToken } from "../common/client-token.js";
import { UnavailableError } from "../common/errors.js";
import { DELETED_VPC_STREAM_TTL_MS, emit, vpcEvents } from "../common/events.js";
import { defineVariadicCommand } from "../common/redis.js";
import type { Settled } from "../common/coalesce.js";
import { isId, newId } from "../common/ids.js";
import * as S from "./scripts.js";

export { newId };
export { IpamReader, MAX_EXTRA_RESERVED, reservedCount, reservedIndexes } from "./schema.js";
export type { AllocRec, Label, SubnetKind, SubnetRec, Usage, VpcRec } from "./schema.js";

type Reply = [number, string | number];

/** One Allocate call: wanted = index inside the subnet, or -1 for the lowest free one. */
export interface AllocateItem {
  owner: string;
  requestId: string;
  wanted: number;
}

declare module "ioredis" {
  // eslint-disable-next-line @typescript-eslint/no-unused-vars -- merging needs the same type parameter
  interface RedisCommander<Context> {
    mvpcAllocate(...args: (string | number)[]): Promise<Reply>;
    mvpcAllocateMany(...args: (string | number)[]): Promise<(string | number)[]>;
    mvpcAllocateBatch(...args: (string | number)[]): Promise<number[]>;
    mvpcRelease(...args: (string | number)[]): Promise<Reply>;
    mvpcClaimVpc(...args: (string | number)[]): Promise<Reply>;
    mvpcUnclaimVpc(...args: (string | number)[]): Promise<number>;
    mvpcDropVpc(...args: (string | number)[]): Promise<Reply>;
    mvpcDeleteVpc(...args: (string | number)[]): Promise<Reply>;
    mvpcCreateSubnet(...args: (string | number)[]): Promise<Reply>;
    mvpcDeleteSubnet(...args: (string | number)[]): Promise<Reply>;
    mvpcMigrateSubnet(...args: (string | number)[]): Promise<[number, number, number]>;
  }
}

export function defineScripts(redis: Redis): void {
  if ((redis as unknown as { mvpcAllocate?: unknown }).mvpcAllocate) return;
  // The variadic ones take their key count first: the global events stream,
  // the tombstones of the earlier layout and what only one layout has are
  // declared where they exist (common/redis.ts defineVariadicCommand).
  defineVariadicCommand(redis, "mvpcAllocate", S.ALLOCATE);
  defineVariadicCommand(redis, "mvpcAllocateMany", S.ALLOCATE_MANY);
  defineVariadicCommand(redis, "mvpcAllocateBatch", S.ALLOCATE_BATCH);
  defineVariadicCommand(redis, "mvpcRelease", S.RELEASE);
  defineVariadicCommand(redis, "mvpcClaimVpc", S.CLAIM_VPC);
  redis.defineCommand("mvpcUnclaimVpc", { numberOfKeys: 2, lua: S.UNCLAIM_VPC });
  defineVariadicCommand(redis, "mvpcDropVpc", S.DROP_VPC);
  redis.defineCommand("mvpcDeleteVpc", { numberOfKeys: 16, lua: S.DELETE_VPC });
  defineVariadicCommand(redis, "mvpcCreateSubnet", S.CREATE_SUBNET);
  defineVariadicCommand(redis, "mvpcDeleteSubnet", S.DELETE_SUBNET);
  redis.defineCommand("mvpcMigrateSubnet", { numberOfKeys: 13, lua: S.MIGRATE_SUBNET });
}

function flat(obj: Record<string, string | number>): (string | number)[] {
  return Object.entries(obj).flat();
}

/**
 * The KEYS of ALLOCATE, ALLOCATE_BATCH and RELEASE: the subnet's state and
 * one owner index, in its VPC's slot, and on a single Redis the global
 * events stream.
 */
function stateKeys(redis: Redis, s: SubnetRec, owner: string): string[] {
  const keys = [...K.state(s.vpcId, s.id), K.owner(s.vpcId, owner)];
  if (!redis.isCluster) keys.push(K.events);
  return keys;
}

const ALLOCATE_SHA = createHash("sha1").update(S.ALLOCATE).digest("hex");

/** The KEYS of ALLOCATE but the owner's (stateKeys, count first), per subnet record: made once while Ipam caches the record. */
const allocateKeys = new WeakMap<SubnetRec, (string | number)[]>();

/** ALLOCATE's arguments: its KEYS, count first (stateKeys), then owner, request id, wanted, now, subnet id and size. */
function allocateArgs(redis: Redis, s: SubnetRec, owner: string, requestId: string, wanted: number, now: number): (string | number)[] {
  let keys = allocateKeys.get(s);
  if (!keys) allocateKeys.set(s, (keys = counted(stateKeys(redis, s, ""))));
  const a = keys.slice();
  // stateKeys: the six state keys, the owner index, then (single Redis) the events stream.
  a[7] = K.owner(s.vpcId, owner);
  a.push(owner, requestId, wanted, now, s.id, s.size);
  return a;
}

/** A subnet's req, alloc and used under the earlier names, where tombstones go: none on a cluster (K.legacy). */
function tombstoneKeys(redis: Redis, subnetId: string): string[] {
  return redis.isCluster ? [] : [K.legacy.req(subnetId), K.legacy.alloc(subnetId), K.legacy.used(subnetId)];
}

/**
 * What IpamStore.migrateSubnet found: it moved the subnet's state, another
 * caller had (a concurrent first use: call the script again either way), or
 * there is none to move (no such subnet, deleted, or a cluster).
 */
export type Moved = "moved" | "already" | "none";

/** A call's KEYS, count first. */
function counted(keys: string[]): (string | number)[] {
  return [keys.length, ...keys];
}

/**
 * How long a VPC's record, written before its name is claimed, lives unless
 * the claim succeeds: what a daemon killed between the two leaves behind
 * goes away by itself. On a cluster also the age from which DeleteSubnet
 * removes a subnet's record by id that its VPC does not hold.
 */
export const PENDING_TTL_MS = 60_000;

/** DeleteVpc's refusal while the VPC has a VPN endpoint (DELETE_VPC, DROP_VPC): its clients and its host's interface go with DeleteVpnEndpoint. */
function vpnLeft(id: string): FailedPreconditionError {
  return new FailedPreconditionError(
    `VPC ${id} still has a VPN endpoint; delete it first (microvpc vpn endpoint delete --vpc ${id}, once its clients are deleted: microvpc vpn client list --vpc ${id})`,
  );
}

/** How often a create runs its claim again when its client token moved under it. */
const CLAIM_ATTEMPTS = 4;

/**
 * The IPAM daemon's store: the reads of IpamReader (schema.ts) and every
 * write. A write is one Lua script where its keys share a slot; a VPC's
 * create and delete, and on a cluster a subnet's, take steps in a stated
 * order (below) so that no state between them is one a reader could act on
 * wrongly.
 */
export class IpamStore extends IpamReader {
  constructor(redis: Redis) {
    super(redis);
    defineScripts(redis);
  }

  // ---- VPCs ----

  /**
   * Two steps, each in one slot: the record (held for PENDING_TTL_MS until
   * claimed), then the name and client token in the catalog (CLAIM_VPC).
   * A name therefore never names a VPC that was not made; a create that
   * loses the name removes its record. The event follows from the client.
   */
  async createVpc(v: Omit<VpcRec, "id" | "createdMs" | "subnetCount">, clientToken: string): Promise<{ vpc: VpcRec; created: boolean }> {
    const L = this.L;
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
    const field = clientToken ? `vpc\n${clientToken}` : "";
    const alive = async (x: string | null) => !!x && isId("vpc", x) && (await this.redis.exists(L.vpc(x))) === 1;
    let wrote = false;
    const found = async (ref: string) => {
      if (wrote) await this.redis.del(L.vpc(id));
      return ref;
    };
    let claimed: { ref: string; created: boolean } | undefined;
    // The holder of the name the claim may take over: none at first (the
    // usual case costs no read); a holder the claim reports is looked at, and
    // the claim runs again if its record is gone.
    let stale = "";
    for (let attempt = 0; attempt < CLAIM_ATTEMPTS && !claimed; attempt++) {
      const seen = field ? ((await this.redis.hget(L.vpcTokens, field)) ?? "") : "";
      const seenAlive = await alive(seen);
      if (!seenAlive && !wrote) {
        await this.redis.multi().hset(L.vpc(id), fields).pexpire(L.vpc(id), PENDING_TTL_MS).exec();
        wrote = true;
      }
      const keys = [L.vpcByName, L.vpcNames, L.vpcTokens, ...(L.cluster ? [] : [L.vpc(id)])];
      const reply = await this.redis.mvpcClaimVpc(keys.length, ...keys, id, v.name, field, seen, seenAlive ? "1" : "0", stale);
      // A claim run twice (ioredis sends a command again after a reconnect) finds its own first run: that is this create's success.
      const [code, ref] = String(reply[1]) === id ? [1, id] : reply;
      if (code === TOKEN_MOVED) continue;
      if (code === -1 && String(ref) !== stale && !(await alive(String(ref)))) {
        stale = String(ref);
        continue;
      }
      if (code === -1) {
        await found(String(ref));
        throw new AlreadyExistsError(`a VPC named ${JSON.stringify(v.name)} already exists (${ref}); pick another name or use it`);
      }
      if (code === 1) {
        await Promise.all([this.redis.persist(L.vpc(id)), emit(this.redis, { vpcs: [id] }, ["kind", "vpc.created", "vpc", id])]);
        claimed = { ref: id, created: true };
      } else {
        claimed = { ref: await found(String(ref)), created: false };
        // A retry of a create that stopped between its claim and keeping its record.
        await this.redis.persist(L.vpc(claimed.ref));
      }
    }
    if (!claimed) {
      await found("");
      throw new UnavailableError(`other creates with the same client token kept landing while this one ran; retry`);
    }
    const vpc = await this.getVpc(claimed.ref);
    if (!vpc) throw new NotFoundError("vpc", claimed.ref, "it was deleted while being created");
    return { vpc, created: claimed.created };
  }

  async deleteVpc(id: string): Promise<boolean> {
    if (this.L.cluster) return this.deleteVpcInSteps(id);
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
      vpnKeysOf(this.redis).ep(id),
      vpcEvents(id),
      ...vpcDnsKeys(id),
      K.vpcReserved(id),
      id,
    );
    if (code === -1) throw new FailedPreconditionError(`VPC ${id} still has ${n} subnet(s); delete them first (microvpc subnet list --vpc ${id})`);
    if (code === -2) throw new FailedPreconditionError(`VPC ${id} is still peered (${n} peering(s)); delete them first (microvpc vpc peer list --vpc ${id})`);
    if (code === -3) throw new FailedPreconditionError(`VPC ${id} still has ${n}; delete them first (microvpc sg list / acl list / nat delete --vpc ${id})`);
    if (code === -4) throw vpnLeft(id);
    return code === 1;
  }

  /**
   * DeleteVpc on a cluster, where the gateway's index of NAT gateways is in
   * another slot: that index is checked from here (a NAT gateway needs a
   * subnet, which its create holds in the VPC's slot before it writes its
   * record, and DROP_VPC refuses while the VPC has one: no gateway can be
   * made in the VPC once this passes); then the record goes if the VPC has
   * no subnet, no peering or peering create under way, and no security group
   * or network ACL (DROP_VPC, its slot, with its DNS zone and the firewall's
   * counter and names), then the name if it still names it. A delete stopped
   * half-way leaves a name whose record is gone, which lists skip and the
   * next create of that name takes over.
   */
  private async deleteVpcInSteps(id: string): Promise<boolean> {
    const [nat, stale] = await Promise.all([this.redis.hexists(GW_KEYS.cluster.vpcNat, id), staleReservations(this.redis, id)]);
    if (nat) throw new FailedPreconditionError(`VPC ${id} still has a NAT gateway; delete it first (microvpc nat delete --vpc ${id})`);
    return this.dropVpc(id, stale);
  }

  /** deleteVpcInSteps after the NAT check: DROP_VPC in the VPC's slot, then the name. */
  private async dropVpc(id: string, stale: StaleHolds): Promise<boolean> {
    const L = this.L;
    const FW = FW_KEYS.cluster;
    const VPN = vpnKeysOf(this.redis);
    const keys = [
      L.vpc(id),
      L.vpcSubnets(id),
      L.vpcSubnetByName(id),
      L.vpcReserved(id),
      L.subnetTokens(id),
      PEERING_KEYS.cluster.peers(id),
      FW.vpcSgs(id),
      FW.vpcAcls(id),
      VPN.ep(id),
      ...vpcDnsKeys(id, dnsKeys(this.redis)),
      FW.gen(id),
      FW.sgByName(id),
      FW.aclByName(id),
      FW.subnetAcl(id),
      // The VPN's change counter of the VPC (its own on a cluster), which DeleteVpnEndpoint leaves.
      VPN.gen(id),
      // The gateway's NAT gateway holds: none is left once no subnet is (DELETE_SUBNET refuses while one names its subnet), but for entries that never read as one.
      GW_KEYS.cluster.natHolds!(id),
    ];
    const [code, n] = await this.redis.mvpcDropVpc(keys.length, ...keys, stale.ids.join(","), stale.cutoff);
    if (code === -1) throw new FailedPreconditionError(`VPC ${id} still has ${n} subnet(s); delete them first (microvpc subnet list --vpc ${id})`);
    if (code === -2)
      throw new FailedPreconditionError(
        `VPC ${id} is still peered (${n} peering(s), or creates of one under way); delete them first (microvpc vpc peer list --vpc ${id})`,
      );
    if (code === -3) throw new FailedPreconditionError(`VPC ${id} still has ${n}; delete them first (microvpc sg list / acl list --vpc ${id})`);
    if (code === -4) throw vpnLeft(id);
    if (code !== 1) return false;
    await this.redis.mvpcUnclaimVpc(L.vpcByName, L.vpcNames, String(n), id);
    await emit(this.redis, { vpcs: [id] }, ["kind", "vpc.deleted", "vpc", id]);
    // As DELETE_VPC does on one Redis: the stream goes once its readers have had the event.
    await this.redis.pexpire(vpcEvents(id), DELETED_VPC_STREAM_TTL_MS);
    return true;
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
    const L = this.L;
    const V_ = s.vpcId;
    // On a cluster the record by id comes first, so that no subnet of a VPC
    // is ever without it: readers that start from a subnet id find its VPC
    // there (and count it only while the VPC holds the subnet: getSubnet).
    if (L.cluster) await this.redis.hset(K.subnet(id), fields);
    const sent = await withClientToken(
      this.redis,
      L.subnetTokens(V_),
      clientToken ? `subnet\n${clientToken}` : null,
      { kind: "subnet", recordOf: (x) => L.subnetIn(V_, x), fresh: L.subnetIn(V_, id) },
      (seen, rec) =>
        this.redis.mvpcCreateSubnet(
          ...counted([
            L.vpc(V_),
            L.vpcSubnets(V_),
            L.vpcSubnetByName(V_),
            L.subnetIn(V_, id),
            K.bits(V_, id),
            K.full(V_, id),
            K.used(V_, id),
            L.subnetTokens(V_),
            L.vpcReserved(V_),
            rec,
            ...(L.cluster ? [] : [K.events, K.allSubnets, ...tombstoneKeys(this.redis, id)]),
          ]),
          id,
          s.name,
          s.base,
          s.size,
          clientToken,
          s.extraReserved,
          seen,
          L.subnetIn(V_, ""),
          ...flat(fields),
        ),
    );
    // A script run twice (ioredis sends a command again after a reconnect) finds its own first run (name, overlap or token): this create's success.
    const reply: Reply = sent[0] !== 1 && String(sent[1]) === id ? [1, id] : sent;
    if (L.cluster) await this.finishSubnetCreate(V_, id, reply);
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
      const r = checked(L.vpcReserved(s.vpcId), "reservation", () => parseReservation(owner, raw), s.vpcId);
      throw new FailedPreconditionError(
        r
          ? `${s.cidr} overlaps ${r.cidr}, reserved for ${r.what}; choose a CIDR outside it (or move that range: microvpc vpn endpoint set --client-cidr; or free it: microvpc vpn endpoint delete --vpc ${s.vpcId})`
          : `${s.cidr}: VPC ${s.vpcId} has a reserved range ${V.show(owner)} that does not read as one (${L.vpcReserved(s.vpcId)}, counted in microvpc_invalid_records); no subnet is created until it is fixed`,
      );
    }
    const subnet = await this.getSubnet(String(ref));
    if (!subnet) throw new NotFoundError("subnet", String(ref), "it was deleted while being created");
    return { subnet, created: code === 1 };
  }

  /**
   * A cluster's steps after CreateSubnet's script (reply): a created subnet
   * keeps its record by id and joins the listing of every subnet, then the
   * event; a retry of a create that stopped before those finishes them from
   * the record in the VPC; a refused create removes the record it wrote.
   */
  private async finishSubnetCreate(vpcId: string, id: string, reply: Reply): Promise<void> {
    const [code, ref] = reply;
    if (code !== 1) await this.redis.del(K.subnet(id));
    if (code !== 1 && code !== 0) return;
    const sid = String(ref);
    if (code === 0 && (await this.redis.exists(K.subnet(sid))) === 0) {
      const h = await this.redis.hgetall(this.L.subnetIn(vpcId, sid));
      if (!h.id) return;
      await this.redis.hset(K.subnet(sid), h);
      // A DeleteSubnet may have run meanwhile: what it removed stays removed.
      if ((await this.redis.exists(this.L.subnetIn(vpcId, sid))) === 0) {
        await this.redis.del(K.subnet(sid));
        return;
      }
    }
    await this.redis.zadd(K.allSubnets, 0, sid);
    // A DeleteSubnet between the VPC's script and here removed the entry before it was added: what it removed stays removed.
    if ((await this.redis.exists(this.L.subnetIn(vpcId, sid))) === 0) {
      await this.redis.zrem(K.allSubnets, sid);
      await this.redis.del(K.subnet(sid));
      return;
    }
    if (code === 1) await emit(this.redis, { vpcs: [vpcId] }, ["kind", "subnet.created", "vpc", vpcId, "subnet", sid]);
  }

  async deleteSubnet(id: string): Promise<boolean> {
    const s = await this.getSubnet(id);
    const L = this.L;
    if (!s) {
      if (L.cluster) await this.dropLeftover(id);
      return false;
    }
    if (!L.cluster) return this.dropSubnet(s, NO_STALE_HOLDS);
    const [stale, nat] = await Promise.all([staleNatHolds(this.redis, s.vpcId), this.natIn(s)]);
    if (nat) throw new FailedPreconditionError(`subnet ${s.name} (${id}): NAT gateway ${nat} sits in it (microvpc nat delete); remove that first`);
    return this.dropSubnet(s, stale);
  }

  /**
   * On a cluster, the VPC's NAT gateway if its record names subnet `s`: read
   * from the client, in the gateway's slot. The hold DELETE_SUBNET checks is
   * what makes the delete safe against a create under way; this catches a
   * gateway whose hold was lost (a failover before the hold was copied to a
   * replica, a hand-edited hash).
   */
  private async natIn(s: SubnetRec): Promise<string | null> {
    const G = GW_KEYS.cluster;
    const natId = await this.redis.hget(G.vpcNat, s.vpcId);
    if (natId === null || !isId("nat", natId)) return null;
    return (await this.redis.hget(G.nat(natId), "subnet")) === s.id ? natId : null;
  }

  /**
   * deleteSubnet once the subnet is known: DELETE_SUBNET, then on a cluster
   * its record by id. On a cluster the script reads the gateway's NAT
   * gateway holds of the VPC, in its slot (a NAT gateway's record is in
   * another), and sweeps those in `stale` (found without a record) that
   * were already PENDING_MS old when they were read (LUA_SWEEP).
   */
  private async dropSubnet(s: SubnetRec, stale: StaleHolds): Promise<boolean> {
    const L = this.L;
    const id = s.id;
    const holds = GW_KEYS.cluster.natHolds!(s.vpcId);
    const call = () =>
      this.redis.mvpcDeleteSubnet(
        ...counted([
          L.subnetIn(s.vpcId, id),
          L.vpcSubnets(s.vpcId),
          L.vpcSubnetByName(s.vpcId),
          ...K.state(s.vpcId, id),
          K.moving(s.vpcId, id),
          ...(L.cluster ? [FW_KEYS.cluster.subnetAcl(s.vpcId), holds] : [K.events, K.allSubnets, K.fwSubnetAcl, K.gwVpcNat, ...tombstoneKeys(this.redis, id)]),
        ]),
        id,
        ...(L.cluster ? [stale.ids.join(","), stale.cutoff] : []),
      );
    // Made by a replica of the earlier release mid-upgrade: its state moves first, so that its addresses are counted.
    const [code, n] = await this.movedFirst(s, call, (r) => r[0] === -3);
    if (code === -1)
      throw new FailedPreconditionError(`subnet ${s.name} (${id}) still has ${n} allocated address(es); release them first (microvpc ip list --subnet ${id})`);
    // A create under way says retry itself; what stands (an ACL, a NAT gateway) is to be removed.
    if (code === -2) throw new FailedPreconditionError(`subnet ${s.name} (${id}): ${n}${/; retry$/.test(String(n)) ? "" : "; remove that first"}`);
    if (code === -3) throw new Error(`subnet ${id}: its allocation state could not be moved from the earlier layout`);
    if (code === -5) {
      const why = `${V.show(String(n))} does not read as a NAT gateway hold ({"subnet": <subnet id>, "ms": <server ms>}, field a NAT id)`;
      reportInvalid("gateway", "nat-hold", holds, why, undefined, { field: String(n), vpcId: s.vpcId });
      throw new FailedPreconditionError(
        `subnet ${s.name} (${id}): the VPC's NAT gateway holds (${holds}) have an entry ${why}; it might name this subnet, so nothing was deleted: remove that field (HDEL) once no CreateNatGateway of VPC ${s.vpcId} is under way, then retry`,
      );
    }
    if (L.cluster) {
      // The record by id goes last: until then a delete stopped half-way can be run again.
      await this.redis.zrem(K.allSubnets, id);
      await this.redis.del(K.subnet(id));
      if (code === 1) await emit(this.redis, { vpcs: [s.vpcId] }, ["kind", "subnet.deleted", "vpc", s.vpcId, "subnet", id]);
    }
    return code === 1;
  }

  /**
   * On a cluster, a subnet's record by id that its VPC does not hold, left by
   * a create killed before its VPC's script: removed once it is older than
   * PENDING_TTL_MS (a younger one may be a create still under way).
   */
  private async dropLeftover(id: string): Promise<void> {
    const h = await this.redis.hgetall(K.subnet(id));
    if (!h.id) {
      await this.redis.zrem(K.allSubnets, id);
      return;
    }
    if (!isId("vpc", h.vpc ?? "") || !(Number(h.created) < Date.now() - PENDING_TTL_MS)) return;
    if ((await this.redis.exists(this.L.subnetIn(h.vpc, id))) === 1) return;
    await this.redis.zrem(K.allSubnets, id);
    await this.redis.del(K.subnet(id));
  }

  // ---- The layout move (docs/redis-schema.md "Redis Cluster") ----

  /**
   * Moves one subnet's allocation state from the earlier release's names to
   * its VPC's hash tag (MIGRATE_SUBNET), and finishes moving its owner
   * entries if a move stopped half-way. On a cluster there is nothing to
   * move: the data was moved before its import.
   */
  async migrateSubnet(s: SubnetRec): Promise<Moved> {
    if (this.redis.isCluster) return "none";
    let moved: Moved | undefined;
    let skipped = 0;
    // The first call renames (the subnet is served under the tag from then on); the owner entries follow in steps.
    for (;;) {
      const [code, more, n] = await this.migrateStep(s);
      moved ??= code === 1 ? "moved" : code === 0 ? "already" : "none";
      skipped += Number(n);
      if (Number(more) !== 1) break;
    }
    if (skipped > 0)
      reportInvalid(
        OWNER,
        "allocation",
        K.alloc(s.vpcId, s.id),
        `${skipped} allocation(s) name a holder that is not an owner token; left out of the owner index`,
        undefined,
        {
          vpcId: s.vpcId,
        },
      );
    return moved;
  }

  /**
   * A script's reply, called again once the subnet's state has moved if the
   * first reply says it is not under the tag yet (`notMoved`): a subnet a
   * replica of the earlier release made moves on its first use.
   */
  private async movedFirst<T>(s: SubnetRec, call: () => Promise<T>, notMoved: (reply: T) => boolean): Promise<T> {
    const reply = await call();
    return notMoved(reply) && (await this.migrateSubnet(s)) !== "none" ? await call() : reply;
  }

  /** One call of MIGRATE_SUBNET (its reply: moved, more, skipped); single Redis only. */
  async migrateStep(s: SubnetRec, batch = S.MIGRATE_BATCH): Promise<[number, number, number]> {
    const L = K.legacy;
    const r = await this.redis.mvpcMigrateSubnet(
      ...L.state(s.id),
      ...K.state(s.vpcId, s.id),
      K.moving(s.vpcId, s.id),
      s.id,
      L.ownerPrefix,
      K.owner(s.vpcId, ""),
      batch,
    );
    return [Number(r[0]), Number(r[1]), Number(r[2])];
  }

  /**
   * Gives every VPC change stream whose VPC is gone, and that has no expiry,
   * the expiry DeleteVpc gives it (DELETED_VPC_STREAM_TTL_MS): what DeleteVpc
   * could not (a cluster delete that failed after its record went, before
   * the expiry was set) and what a late writer brought back after the
   * stream had expired (a floating IP of the VPC released later, a flow-log
   * cleanup), so that no deleted VPC keeps a stream for good. SCAN on each
   * primary, `count` keys a step; each stream's VPC record is read in its
   * slot, and PEXPIRE NX leaves an expiry already set as it is. Returns the
   * streams looked at and those given an expiry.
   */
  async expireOrphanStreams(count = 1000): Promise<{ streams: number; expired: number }> {
    const nodes: Redis[] = this.L.cluster ? (this.redis as unknown as Cluster).nodes("master") : [this.redis];
    let streams = 0;
    let expired = 0;
    const expire = async (vpc: string) =>
      (await this.redis.exists(this.L.vpc(vpc))) === 0 && (await this.redis.pexpire(vpcEvents(vpc), DELETED_VPC_STREAM_TTL_MS, "NX")) === 1;
    for (const node of nodes) {
      let cursor = "0";
      do {
        const [next, keys] = await node.scan(cursor, "MATCH", "mvpc:{vpc-*}:events", "COUNT", count);
        cursor = next;
        const vpcs = keys.map((k) => /^mvpc:\{(vpc-[0-9a-f]{12})\}:events$/.exec(k)?.[1]).filter((v): v is string => v !== undefined);
        streams += vpcs.length;
        // One SCAN step's streams at once, each through the client (its slot's node).
        expired += (await Promise.all(vpcs.map(expire))).filter(Boolean).length;
      } while (cursor !== "0");
    }
    return { streams, expired };
  }

  /**
   * Moves every subnet's allocation state still under the earlier names, and
   * finishes a move a stopped daemon left half-way (the IPAM daemon's start,
   * before it serves). Returns how many subnets it renamed. Pages over the
   * raw ids, so that a page of records that do not validate does not end it.
   * A subnet a replica of the earlier release makes later moves on its
   * first Allocate, Release or DeleteSubnet.
   */
  async migrateAll(): Promise<number> {
    if (this.redis.isCluster) return 0;
    let moved = 0;
    let after = "";
    for (;;) {
      const ids = await this.redis.zrangebylex(K.allSubnets, after ? `(${after}` : "-", "+", "LIMIT", 0, 200);
      if (ids.length === 0) return moved;
      const subnets = await Promise.all(ids.map((id) => (V.attempt(() => V.id("subnet", id, "subnet")).ok ? this.getSubnet(id) : null)));
      const done = await Promise.all(subnets.map((s) => (s ? this.migrateSubnet(s) : "none")));
      moved += done.filter((m) => m === "moved").length;
      after = ids[ids.length - 1];
    }
  }

  // ---- Allocations ----

  /**
   * ALLOCATE's reply, the hot path of IPAM: its arguments built in one
   * array, the subnet's keys made once per subnet record (Ipam caches the
   * records), and on a single Redis the script called by EVALSHA of its
   * cached SHA1 straight through the client (auto-pipelined), without
   * ioredis' Script wrapper (a subclass, a closure and a promise per call):
   * NOSCRIPT (a Redis restarted or flushed) falls back to the defined
   * command, which loads the script. A cluster takes the defined command
   * alone (it is kept out of auto-pipelining there: its first argument is no key).
   */
  private async allocateReply(s: SubnetRec, owner: string, requestId: string, wanted: number, now: number): Promise<Reply> {
    const args = allocateArgs(this.redis, s, owner, requestId, wanted, now);
    if (this.redis.isCluster) return this.redis.mvpcAllocate(...args);
    try {
      return (await (this.redis.evalsha as (sha: string, ...a: (string | number)[]) => Promise<unknown>).call(this.redis, ALLOCATE_SHA, ...args)) as Reply;
    } catch (err) {
      if (!String((err as Error)?.message).includes("NOSCRIPT")) throw err;
      return this.redis.mvpcAllocate(...args);
    }
  }

  /** wanted = index inside the subnet, or -1 for the lowest free one. */
  async allocate(s: SubnetRec, owner: string, requestId: string, wanted: number): Promise<{ alloc: AllocRec; created: boolean }> {
    const now = Date.now();
    let reply = await this.allocateReply(s, owner, requestId, wanted, now);
    // Not under the VPC's tag yet (a subnet a replica of the earlier release made): moved on its first use.
    if (reply[0] === -4 && (await this.migrateSubnet(s)) !== "none") reply = await this.allocateReply(s, owner, requestId, wanted, now);
    return this.allocated(s, { owner, requestId, wanted }, reply, now);
  }

  /**
   * Several Allocate calls of one subnet (at most S.MAX_ALLOCATE_MANY) in
   * one script, each as if made alone and in the order given: item i's
   * result at i, an allocation or the error allocate() would have thrown.
   * What fails the call itself (Redis) rejects the whole.
   */
  async allocateMany(s: SubnetRec, items: readonly AllocateItem[]): Promise<Settled<{ alloc: AllocRec; created: boolean }>[]> {
    if (items.length > S.MAX_ALLOCATE_MANY) throw new Error(`allocateMany: ${items.length} items, at most ${S.MAX_ALLOCATE_MANY}`);
    const now = Date.now();
    const keys = [...K.state(s.vpcId, s.id), ...items.map((i) => K.owner(s.vpcId, i.owner))];
    if (!this.redis.isCluster) keys.push(K.events);
    const args: (string | number)[] = [...counted(keys), items.length, s.id, s.size];
    for (const i of items) args.push(i.owner, i.requestId, i.wanted, now);
    const r = await this.movedFirst(
      s,
      () => this.redis.mvpcAllocateMany(...args),
      (x) => Number(x[0]) === -4,
    );
    const code = Number(r[0]);
    if (code === -4) return items.map(() => ({ ok: false, error: new NotFoundError("subnet", s.id, "it was deleted") }));
    if (code !== 1 || r.length !== 1 + 2 * items.length) throw new Error(`allocate script for ${items.length} calls returned ${code} with ${r.length} values`);
    return Promise.all(
      items.map(async (item, n) => {
        try {
          return { ok: true as const, value: await this.allocated(s, item, [Number(r[1 + 2 * n]), r[2 + 2 * n]], now) };
        } catch (error) {
          return { ok: false as const, error: error as Error };
        }
      }),
    );
  }

  /** An ALLOCATE reply (or one item's of ALLOCATE_MANY) as the allocation, or the error a caller acts on. */
  private async allocated(s: SubnetRec, item: AllocateItem, [code, detail]: Reply, now: number): Promise<{ alloc: AllocRec; created: boolean }> {
    const { owner, requestId, wanted } = item;
    const addr = (i: number) => V.intToIp(s.base + i);
    switch (code) {
      case 1:
        return { alloc: { subnetId: s.id, index: Number(detail), owner, requestId, timeMs: now }, created: true };
      case 0: {
        const a = await this.getAllocation(s, Number(detail));
        return { alloc: a ?? { subnetId: s.id, index: Number(detail), owner, requestId, timeMs: now }, created: false };
      }
      case -1: {
        const holder = String(detail).split("\n")[0];
        throw new AlreadyExistsError(
          `${addr(wanted)} is already allocated to ${shownOwner(holder)}; ask for another address or leave it empty for the next free one`,
        );
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
      case -6: {
        const key = K.owner(s.vpcId, owner);
        reportInvalid(OWNER, "owner-index", key, `is a ${V.show(String(detail))}, not a sorted set`, undefined, { vpcId: s.vpcId });
        throw new FailedPreconditionError(
          `the owner index of ${owner} (${key}) is a Redis ${V.show(String(detail))}, not a sorted set; nothing was allocated. It is counted in microvpc_invalid_records: move it aside (RENAME) and retry`,
        );
      }
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
    const call = () => this.redis.mvpcAllocateBatch(...counted(stateKeys(this.redis, s, owner)), owner, requestId, count, now, s.id, s.size, s.extraReserved);
    const r = await this.movedFirst(s, call, (x) => Number(x[0]) === -4);
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
        const recs = live.length ? await this.redis.hmget(K.alloc(s.vpcId, s.id), ...live.map(String)) : [];
        const allocs: AllocRec[] = [];
        live.forEach((idx, n) => {
          const a = recs[n] ? checked(K.alloc(s.vpcId, s.id), "allocation", () => parseAlloc(s.id, idx, recs[n]!), s.vpcId) : null;
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

  /**
   * index = -1 releases by owner+requestId. Returns the index freed, or null.
   * The script names the owner index it changes (its KEYS): the owner's, or
   * when any owner may hold it, the holder the script reports on a first try.
   */
  async release(s: SubnetRec, index: number, owner: string, requestId: string, expectTime = ""): Promise<number | null> {
    let holder = owner;
    for (let tries = 0; ; tries++) {
      // On a single Redis also the holder's index under the earlier name (RELEASE's KEYS[9]: a move not done yet).
      const keys = [...stateKeys(this.redis, s, holder), ...(this.redis.isCluster ? [] : [`${K.legacy.ownerPrefix}${holder}`])];
      const [code, detail] = await this.redis.mvpcRelease(...counted(keys), index, owner, requestId, s.id, s.size, expectTime, holder);
      if (code === -4 && tries < 4 && (await this.migrateSubnet(s)) !== "none") continue;
      // Held by another than the index named: name that one (the address changed hands in between at most a few times).
      if (code === -7 && tries < 4) {
        const h = V.attempt(() => V.token("owner", String(detail)));
        if (!h.ok) {
          reportInvalid(OWNER, "allocation", K.alloc(s.vpcId, s.id), h.reason, undefined, { vpcId: s.vpcId });
          throw new FailedPreconditionError(
            `${V.intToIp(s.base + index)}: its allocation record names no valid owner (${h.reason}); it is counted in microvpc_invalid_records`,
          );
        }
        holder = h.value;
        continue;
      }
      if (code === 1) return Number(detail);
      if (code === 0 || code === -4 || code === -6) return null;
      if (code === -1)
        throw new FailedPreconditionError(`${V.intToIp(s.base + index)} is held by ${shownOwner(String(detail))}, not ${owner}; nothing was released`);
      throw new Error(`release script returned ${code}`);
    }
  }
}
