// IPAM: VPCs, subnets and address allocation. Validates every request,
// then makes exactly one atomic change through IpamStore.
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { ServiceImpl } from "@connectrpc/connect";
import { Counter, Histogram } from "prom-client";
import { InvalidArgumentError, NotFoundError } from "../common/errors.js";
import { deferredCounter, metricsRegistry } from "../common/metrics.js";
import { decodeIndexToken, decodeNameToken, encodePageToken } from "../common/paging.js";
import * as V from "../common/validate.js";
import { ResourceState } from "../../gen/microvpc/v1/common_pb.js";
import { AllocationSchema, IpamService, type Allocation } from "../../gen/microvpc/v1/ipam_pb.js";
import { SubnetSchema, SubnetService, SubnetType, SubnetUsageSchema, type Subnet } from "../../gen/microvpc/v1/subnet_pb.js";
import { VpcSchema, VpcService, type Vpc } from "../../gen/microvpc/v1/vpc_pb.js";
import { Coalescer } from "../common/coalesce.js";
import { MAX_ALLOCATE_MANY, MAX_BATCH } from "./scripts.js";
import { IpamStore, MAX_EXTRA_RESERVED, reservedIndexes, type AllocateItem, type AllocRec, type SubnetRec, type Usage, type VpcRec } from "./store.js";

/** Allocate results: IPAM's hot path, so counted in plain numbers until a scrape (deferredCounter). */
const countAllocation = deferredCounter<"created" | "existing" | "conflict" | "exhausted" | "error">({
  name: "microvpc_ipam_allocations_total",
  help: "Allocate calls by result (created, existing, conflict, exhausted, error).",
  label: "result",
});
/** Allocate calls of a subnet answered together (allocationGroups), per script run: observed once a group, not once a call. */
const allocateGroup = new Histogram({
  name: "microvpc_ipam_allocate_group_size",
  help: "Allocate calls of one subnet answered by one script because they arrived together; 1 when calls come one at a time.",
  buckets: [1, 2, 4, 8, 16, 32, 64],
  registers: [metricsRegistry],
});
const releases = new Counter({
  name: "microvpc_ipam_releases_total",
  help: "Addresses freed by Release or Reclaim.",
  labelNames: ["via"] as const,
  registers: [metricsRegistry],
});

export const DEFAULT_EXTRA_RESERVED = 2;
/** A batch's request id leaves room for "/<i>" within a request id's 128 characters. */
const MAX_BATCH_REQUEST_ID = 128 - `/${MAX_BATCH - 1}`.length;
const DEFAULT_RECLAIM_GRACE_S = 60;

function vpcMsg(v: VpcRec): Vpc {
  return create(VpcSchema, {
    id: v.id,
    name: v.name,
    cidr: v.cidr,
    description: v.description,
    labels: v.labels,
    state: ResourceState.AVAILABLE,
    createTime: timestampFromMs(v.createdMs),
    subnetCount: v.subnetCount,
    publicCidr: v.publicCidr,
  });
}

function subnetMsg(s: SubnetRec, u: Usage): Subnet {
  const ip = (i: number) => V.intToIp(s.base + i);
  const reserved = reservedIndexes(s.size, s.extraReserved);
  return create(SubnetSchema, {
    id: s.id,
    vpcId: s.vpcId,
    name: s.name,
    cidr: s.cidr,
    type: s.type === "public" ? SubnetType.PUBLIC : SubnetType.PRIVATE,
    gateway: ip(1),
    extraReserved: s.extraReserved,
    reservedAddresses: reserved.map(ip),
    description: s.description,
    labels: s.labels,
    state: ResourceState.AVAILABLE,
    createTime: timestampFromMs(s.createdMs),
    usage: create(SubnetUsageSchema, {
      total: BigInt(u.total),
      reserved: BigInt(u.reserved),
      used: BigInt(u.used),
      free: BigInt(u.free),
    }),
  });
}

function allocMsg(s: SubnetRec, a: AllocRec): Allocation {
  return create(AllocationSchema, {
    subnetId: s.id,
    address: V.intToIp(s.base + a.index),
    prefixLength: s.prefix,
    gateway: V.intToIp(s.base + 1),
    owner: a.owner,
    requestId: a.requestId,
    allocateTime: timestampFromMs(a.timeMs),
  });
}

/** One Allocate call as allocationGroups gathers it: its subnet's record and the call. */
type GroupedAllocate = { s: SubnetRec } & AllocateItem;

/**
 * The Allocate calls of a subnet that arrive together (in one turn of the
 * event loop), answered by one script, ALLOCATE_MANY: what Redis and this
 * daemon spend per call on a script call and its reply is spent once a
 * group (bench:ipam section 1, "together"). A lone call takes ALLOCATE as
 * before. Exported for the benchmark, which drives the store the same way.
 */
export function allocationGroups(store: IpamStore): Coalescer<GroupedAllocate, { alloc: AllocRec; created: boolean }> {
  const alone = (i: GroupedAllocate) =>
    store.allocate(i.s, i.owner, i.requestId, i.wanted).then(
      (value) => ({ ok: true as const, value }),
      (error: Error) => ({ ok: false as const, error }),
    );
  return new Coalescer(
    // A group whose script failed (Redis down or timed out, or an error
    // inside it, which may leave the items before it written) is run again
    // call by call: each caller gets its own outcome, and a call already
    // made is answered as a retry (the same owner and request id).
    (_subnetId, items) =>
      items.length === 1 ? alone(items[0]).then((r) => [r]) : store.allocateMany(items[0].s, items).catch(() => Promise.all(items.map(alone))),
    MAX_ALLOCATE_MANY,
    (n) => allocateGroup.observe(n),
  );
}

export class Ipam {
  /**
   * Subnet records of the hot path (Allocate/Release). A subnet's CIDR never
   * changes and the scripts themselves refuse a deleted subnet, so a stale
   * entry can only turn into NOT_FOUND, never into a wrong address.
   */
  private readonly subnetCache = new Map<string, { rec: SubnetRec; at: number }>();

  /** The Allocate calls of one subnet that arrive together, answered by one script (allocationGroups). */
  private readonly allocs: ReturnType<typeof allocationGroups>;

  constructor(readonly store: IpamStore) {
    this.allocs = allocationGroups(store);
  }

  async cachedSubnet(field: string, id: string): Promise<SubnetRec> {
    const hit = this.subnetCache.get(id);
    if (hit && Date.now() - hit.at < 5_000) return hit.rec;
    const rec = await this.subnetById(field, id);
    if (this.subnetCache.size > 10_000) this.subnetCache.clear();
    this.subnetCache.set(id, { rec, at: Date.now() });
    return rec;
  }

  vpcByRef(field: string, ref: string): Promise<VpcRec> {
    return this.store.vpcByRef(field, ref);
  }

  async subnetById(field: string, id: string): Promise<SubnetRec> {
    V.id(field, id, "subnet");
    const s = await this.store.getSubnet(id);
    if (!s) throw new NotFoundError("subnet", id, "list subnets with `microvpc subnet list`");
    return s;
  }

  async subnetByRef(ref: string, vpcRef: string): Promise<SubnetRec> {
    const r = V.ref("ref", ref, "subnet");
    if (r.id) return this.subnetById("ref", r.id);
    if (vpcRef === "") throw new InvalidArgumentError("vpc", "is required when the subnet is given by name");
    const vpc = await this.vpcByRef("vpc", vpcRef);
    const id = await this.store.resolveSubnet(r, vpc.id);
    const s = id ? await this.store.getSubnet(id) : null;
    if (!s) throw new NotFoundError("subnet", ref, `VPC ${vpc.name} has no such subnet`);
    return s;
  }

  /** Converts an address of the subnet into its bit index, or rejects it. */
  indexOf(s: SubnetRec, field: string, address: string): number {
    const n = V.ipv4(field, address);
    if (n < s.base || n >= s.base + s.size) {
      throw new InvalidArgumentError(field, `${address} is outside subnet ${s.name} (${s.cidr})`);
    }
    return n - s.base;
  }

  readonly vpcService: ServiceImpl<typeof VpcService> = {
    createVpc: async (req) => {
      const name = V.name("name", req.name);
      const c = V.cidr("cidr", req.cidr, { min: 8, max: 28 });
      const isPrivate = V.isPrivate(c);
      if (!isPrivate && !req.allowPublicCidr) {
        throw new InvalidArgumentError(
          "cidr",
          `${c.text} is not in a private range (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10); set allow_public_cidr to use public space`,
        );
      }
      const { vpc } = await this.store.createVpc(
        {
          name,
          cidr: c.text,
          base: c.base,
          prefix: c.prefix,
          description: V.text("description", req.description),
          labels: V.labels("labels", req.labels),
          publicCidr: !isPrivate,
        },
        V.token("client_token", req.clientToken, { optional: true }),
      );
      return { vpc: vpcMsg(vpc) };
    },
    getVpc: async (req) => ({ vpc: vpcMsg(await this.vpcByRef("ref", req.ref)) }),
    listVpcs: async (req) => {
      const size = V.pageSize("page_size", req.pageSize);
      const after = decodeNameToken(req.pageToken);
      const vpcs = await this.store.listVpcs(after ?? "", size + 1);
      const page = vpcs.slice(0, size);
      return {
        vpcs: page.map(vpcMsg),
        nextPageToken: vpcs.length > size ? encodePageToken(page[page.length - 1].name) : "",
      };
    },
    deleteVpc: async (req) => {
      const r = V.ref("ref", req.ref, "vpc");
      const id = await this.store.resolveVpc(r);
      if (!id) return { deleted: false };
      return { deleted: await this.store.deleteVpc(id) };
    },
  };

  readonly subnetService: ServiceImpl<typeof SubnetService> = {
    createSubnet: async (req) => {
      const vpc = await this.vpcByRef("vpc", req.vpc);
      const name = V.name("name", req.name);
      const c = V.cidr("cidr", req.cidr, { min: 8, max: 28 });
      const vc = V.cidr("vpc.cidr", vpc.cidr, { min: 0, max: 32 });
      if (!V.contains(vc, c)) {
        throw new InvalidArgumentError("cidr", `${c.text} is not inside VPC ${vpc.name} (${vpc.cidr}); pick a CIDR within it`);
      }
      const extra = req.extraReserved ?? DEFAULT_EXTRA_RESERVED;
      if (extra > MAX_EXTRA_RESERVED) {
        throw new InvalidArgumentError(
          "extra_reserved",
          `is ${extra}; the limit is ${MAX_EXTRA_RESERVED} (reserve a range for static infrastructure, not most of the subnet: use a smaller subnet instead)`,
        );
      }
      // At least one address must remain for a NIC.
      if (extra > c.size - 4) {
        throw new InvalidArgumentError(
          "extra_reserved",
          `${extra} leaves no usable address in ${c.text} (${c.size} addresses, 3 always reserved); at most ${c.size - 4}`,
        );
      }
      const type = req.type === SubnetType.PUBLIC ? "public" : "private";
      const { subnet } = await this.store.createSubnet(
        {
          vpcId: vpc.id,
          name,
          cidr: c.text,
          base: c.base,
          prefix: c.prefix,
          size: c.size,
          type,
          extraReserved: extra,
          description: V.text("description", req.description),
          labels: V.labels("labels", req.labels),
        },
        V.token("client_token", req.clientToken, { optional: true }),
      );
      return { subnet: subnetMsg(subnet, await this.store.usage(subnet)) };
    },
    getSubnet: async (req) => {
      const s = await this.subnetByRef(req.ref, req.vpc);
      return { subnet: subnetMsg(s, await this.store.usage(s)) };
    },
    listSubnets: async (req) => {
      const size = V.pageSize("page_size", req.pageSize);
      // Within a VPC subnets page by base address (an index), across VPCs by id.
      const after = req.vpc ? decodeIndexToken(req.pageToken) : decodeNameToken(req.pageToken);
      const vpcId = req.vpc ? (await this.vpcByRef("vpc", req.vpc)).id : null;
      const subnets = await this.store.listSubnets(vpcId, after === null ? "" : String(after), size + 1);
      const page = subnets.slice(0, size);
      const last = page[page.length - 1];
      return {
        subnets: await Promise.all(page.map(async (s) => subnetMsg(s, await this.store.usage(s)))),
        nextPageToken: subnets.length > size ? encodePageToken(vpcId ? last.base : last.id) : "",
      };
    },
    deleteSubnet: async (req) => {
      const r = V.ref("ref", req.ref, "subnet");
      let id = r.id ?? null;
      if (!id) {
        if (req.vpc === "") throw new InvalidArgumentError("vpc", "is required when the subnet is given by name");
        const vpcId = await this.store.resolveVpc(V.ref("vpc", req.vpc, "vpc"));
        if (!vpcId) return { deleted: false };
        id = await this.store.resolveSubnet(r, vpcId);
      }
      if (!id) return { deleted: false };
      return { deleted: await this.store.deleteSubnet(id) };
    },
  };

  readonly ipamService: ServiceImpl<typeof IpamService> = {
    allocate: async (req) => {
      V.id("subnet_id", req.subnetId, "subnet");
      const s = await this.cachedSubnet("subnet_id", req.subnetId);
      const owner = V.token("owner", req.owner);
      const requestId = V.token("request_id", req.requestId);
      const wanted = req.address === "" ? -1 : this.indexOf(s, "address", req.address);
      try {
        const { alloc, created } = await this.allocs.add(s.id, { s, owner, requestId, wanted });
        countAllocation(created ? "created" : "existing");
        return { allocation: allocMsg(s, alloc), created };
      } catch (err) {
        const name = (err as Error).name;
        countAllocation(name === "AlreadyExistsError" ? "conflict" : name === "ResourceExhaustedError" ? "exhausted" : "error");
        throw err;
      }
    },
    allocateBatch: async (req) => {
      V.id("subnet_id", req.subnetId, "subnet");
      if (req.count < 1 || req.count > MAX_BATCH) throw new InvalidArgumentError("count", `${req.count}: ask for 1–${MAX_BATCH} addresses`);
      const s = await this.cachedSubnet("subnet_id", req.subnetId);
      const owner = V.token("owner", req.owner);
      const requestId = V.token("request_id", req.requestId);
      if (requestId.length > MAX_BATCH_REQUEST_ID)
        throw new InvalidArgumentError(
          "request_id",
          `is ${requestId.length} characters long; a batch's is at most ${MAX_BATCH_REQUEST_ID} (its addresses are held under "<request_id>/<i>")`,
        );
      try {
        const { allocs, created } = await this.store.allocateBatch(s, owner, requestId, req.count);
        countAllocation(created ? "created" : "existing");
        return { allocations: allocs.map((a) => allocMsg(s, a)), created };
      } catch (err) {
        countAllocation((err as Error).name === "ResourceExhaustedError" ? "exhausted" : "error");
        throw err;
      }
    },
    release: async (req) => {
      V.id("subnet_id", req.subnetId, "subnet");
      const s = await this.cachedSubnet("subnet_id", req.subnetId);
      const owner = V.token("owner", req.owner, { optional: true });
      let index = -1;
      let requestId = "";
      if (req.address !== "") {
        index = this.indexOf(s, "address", req.address);
      } else {
        if (owner === "" || req.requestId === "") {
          throw new InvalidArgumentError("address", "is required, unless owner and request_id name the allocation to release");
        }
        requestId = V.token("request_id", req.requestId);
      }
      const freed = await this.store.release(s, index, owner, requestId);
      if (freed !== null) releases.inc({ via: "release" });
      return { released: freed !== null, address: freed === null ? "" : V.intToIp(s.base + freed) };
    },
    getAllocation: async (req) => {
      const s = await this.subnetById("subnet_id", req.subnetId);
      const i = this.indexOf(s, "address", req.address);
      const a = await this.store.getAllocation(s, i);
      if (!a) throw new NotFoundError("allocation", req.address, `the address is free in subnet ${s.name}`);
      return { allocation: allocMsg(s, a) };
    },
    listAllocations: async (req) => {
      const size = V.pageSize("page_size", req.pageSize);
      const owner = V.token("owner", req.owner, { optional: true });
      if (req.subnetId === "" && owner === "") throw new InvalidArgumentError("subnet_id", "is required unless owner is given");
      if (req.subnetId !== "") {
        // Within a subnet the cursor is the last address index.
        const after = decodeIndexToken(req.pageToken);
        const s = await this.subnetById("subnet_id", req.subnetId);
        const out: AllocRec[] = [];
        let cursor = after ?? -1;
        // Filtering by owner inside a subnet scans pages until one is full.
        while (out.length <= size) {
          const page = await this.store.listBySubnet(s, cursor, 1000);
          if (page.length === 0) break;
          for (const a of page) if (owner === "" || a.owner === owner) out.push(a);
          cursor = page[page.length - 1].index;
        }
        const page = out.slice(0, size);
        return {
          allocations: page.map((a) => allocMsg(s, a)),
          nextPageToken: out.length > size ? encodePageToken(page[page.length - 1].index) : "",
        };
      }
      // By owner it is "vpc/subnet/index" (each VPC keeps its owners' index).
      const after = decodeNameToken(req.pageToken);
      if (after && after.split("/").length !== 3)
        throw new InvalidArgumentError("page_token", "is from an earlier release, which ordered by subnet alone; list again without it");
      const found = await this.store.listByOwner(owner, after ?? "", size + 1);
      const page = found.slice(0, size);
      const subnets = new Map<string, SubnetRec | null>();
      const msgs: Allocation[] = [];
      for (const { alloc: a } of page) {
        if (!subnets.has(a.subnetId)) subnets.set(a.subnetId, await this.store.getSubnet(a.subnetId));
        const s = subnets.get(a.subnetId);
        if (s) msgs.push(allocMsg(s, a));
      }
      return { allocations: msgs, nextPageToken: found.length > size ? encodePageToken(page[page.length - 1].cursor) : "" };
    },
    getUtilization: async (req) => {
      const s = await this.subnetById("subnet_id", req.subnetId);
      const u = await this.store.usage(s);
      return {
        subnetId: s.id,
        usage: create(SubnetUsageSchema, { total: BigInt(u.total), reserved: BigInt(u.reserved), used: BigInt(u.used), free: BigInt(u.free) }),
      };
    },
    reclaim: async (req) => {
      const prefix = req.ownerPrefix;
      if (prefix !== "") V.token("owner_prefix", prefix);
      if (req.liveOwners.length > 100_000) throw new InvalidArgumentError("live_owners", `has ${req.liveOwners.length} entries; the limit is 100000`);
      const live = new Set(req.liveOwners.map((o, i) => V.token(`live_owners[${i}]`, o)));
      const grace = req.graceSeconds ?? DEFAULT_RECLAIM_GRACE_S;
      const cutoff = Date.now() - grace * 1000;
      let subnets: SubnetRec[];
      if (req.subnetId !== "") subnets = [await this.subnetById("subnet_id", req.subnetId)];
      else {
        subnets = [];
        let after = "";
        for (;;) {
          const page = await this.store.listSubnets(null, after, 1000);
          if (page.length === 0) break;
          subnets.push(...page);
          after = page[page.length - 1].id;
        }
      }
      const reclaimed: Allocation[] = [];
      let kept = 0;
      for (const s of subnets) {
        for await (const a of this.store.scanSubnet(s)) {
          if (prefix !== "" && !a.owner.startsWith(prefix)) continue;
          if (live.has(a.owner) || a.timeMs > cutoff) {
            kept++;
            continue;
          }
          if (req.dryRun) {
            reclaimed.push(allocMsg(s, a));
            continue;
          }
          // Compare-and-release: if the address changed hands since it was
          // read, the new holder keeps it.
          const freed = await this.store.release(s, a.index, a.owner, "", String(a.timeMs));
          if (freed !== null) {
            releases.inc({ via: "reclaim" });
            reclaimed.push(allocMsg(s, a));
          } else kept++;
        }
      }
      return { reclaimed, kept };
    },
  };
}
