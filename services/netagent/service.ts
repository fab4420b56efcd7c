// NetAgentService: validates a request, records the desired state in Redis,
// then changes the kernel under the VPC's lock through the planner. The
// catalog (VPCs, subnets, allocations) is IPAM's, read from the same Redis.
import { createHash, randomBytes } from "node:crypto";
import { existsSync, statSync } from "node:fs";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { ServiceImpl } from "@connectrpc/connect";
import { AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, NotFoundError, ResourceExhaustedError } from "../common/errors.js";
import { ExecError } from "../common/exec.js";
import * as V from "../common/validate.js";
import { ResourceState } from "../../gen/microvpc/v1/common_pb.js";
import {
  Datapath,
  GuestNetworkConfigSchema,
  HostHealth,
  HostSchema,
  HostSubnetSchema,
  InvalidRecordSchema,
  RejectedAddressSchema,
  OverlayPeerSchema,
  SkippedHostSchema,
  WireGuardImplementation,
  VpcOverlaySchema,
  type Host,
  HostVpcSchema,
  NetAgentService,
  NicCountersSchema,
  NicKind,
  NicSchema,
  type BandwidthLimit,
  type Nic,
  type AttachNicRequest,
  type AttachNicResponseSchema,
} from "../../gen/microvpc/v1/netagent_pb.js";
import { defaultResolver, DnsReader } from "../dns/schema.js";
import type { IpamReader, SubnetRec, VpcRec } from "../ipam/schema.js";
import type { Agent } from "./agent.js";
import { recordProblem, type HostRecord } from "./overlay/registry.js";
import type { Overlay } from "./overlay/sync.js";
import { wgName } from "./overlay/wg.js";
import * as S from "./schema.js";
import type { Kernel } from "./kernel.js";
import { bandwidthLines, kernelIpArg, names, nicCreateLines, planVpc, prefixToNetmask, type Bandwidth, type NicSpec, type SubnetSpec } from "./plan.js";

export interface NetAgentOptions {
  hostId: string;
  mtu: number;
  overlay?: Overlay;
}

const HOST_REF_RE = /^[a-z0-9-]{1,63}$/;

// Field rules shared with the record parsers (schema.ts): what the API
// accepts is exactly what a reader of the stored record accepts.
const { ifname } = S;

function bandwidthFrom(b: BandwidthLimit | undefined): Bandwidth {
  const rate = (field: string, mbps: number | undefined) => (mbps === undefined || mbps === 0 ? 0 : S.rateMbps(field, mbps));
  const burst = (field: string, v: number | undefined) => (v === undefined ? undefined : S.burstBytes(field, v));
  return {
    ingressMbps: rate("bandwidth.ingress.rate_mbps", b?.ingress?.rateMbps),
    ingressBurst: burst("bandwidth.ingress.burst_bytes", b?.ingress?.burstBytes),
    egressMbps: rate("bandwidth.egress.rate_mbps", b?.egress?.rateMbps),
    egressBurst: burst("bandwidth.egress.burst_bytes", b?.egress?.burstBytes),
  };
}

/** A stable, locally administered MAC from the VPC and the address. */
export function macFor(vpcId: string, address: string): string {
  const h = createHash("sha256").update(vpcId).digest();
  const ip = address.split(".").map((x) => Number(x).toString(16).padStart(2, "0"));
  return ["02", h[0].toString(16).padStart(2, "0"), ...ip].join(":");
}

/** Ports a Linux bridge takes: BR_MAX_PORTS (1024) less port 0, which the kernel never hands out. */
export const BRIDGE_MAX_PORTS = 1023;

function bridgeFull(subnet: string, hostId: string): ResourceExhaustedError {
  return new ResourceExhaustedError(
    `subnet ${subnet} already has ${BRIDGE_MAX_PORTS} NICs on hypervisor ${hostId}, as many as its Linux bridge takes; attach this one on another hypervisor, or in another subnet`,
  );
}

/** A NIC AttachNic validated, not yet stored nor built. */
interface PendingNic {
  spec: NicSpec;
  vpc: VpcRec;
  subnet: SubnetRec;
  /** A TAP with a name the caller chose, which may already exist. */
  namedTap: boolean;
}

export class NetAgent {
  constructor(
    readonly agent: Agent,
    readonly kernel: Kernel,
    readonly ipam: IpamReader,
    readonly opts: NetAgentOptions,
  ) {}

  private async vpc(ref: string, field = "vpc"): Promise<VpcRec> {
    const r = V.ref(field, ref, "vpc");
    const id = await this.ipam.resolveVpc(r);
    const v = id ? await this.ipam.getVpc(id) : null;
    if (!v) throw new NotFoundError("vpc", ref, "create it with IPAM first (microvpc vpc create)");
    return v;
  }

  private async subnet(ref: string, vpc: VpcRec, field = "subnet"): Promise<SubnetRec> {
    const r = V.ref(field, ref, "subnet");
    const id = await this.ipam.resolveSubnet(r, vpc.id);
    const s = id ? await this.ipam.getSubnet(id) : null;
    if (!s || s.vpcId !== vpc.id) throw new NotFoundError("subnet", ref, `VPC ${vpc.name} has no such subnet`);
    return s;
  }

  private subnetSpec(s: SubnetRec): SubnetSpec {
    return S.subnetSpecOf(s, this.opts.mtu);
  }

  /** Records and creates the VPC namespace. Caller holds the lock. */
  private async ensureVpcLocked(v: VpcRec): Promise<boolean> {
    const ns = this.agent.nsOf(v.id);
    // A VPC carried only for a peering becomes one this host holds: stored, so it outlives the peering.
    if (!this.agent.desired.vpcs.has(v.id) || this.agent.desired.vpcs.get(v.id)!.peered) {
      const spec = { vpcId: v.id, ns, createdMs: Date.now() };
      await this.agent.store.putVpc(spec);
      this.agent.rememberVpc(spec);
      // A VPC new here may be the far side of a peering: the other side's namespace must come along.
      void this.agent.peering?.kickIfPeered(v.id);
    }
    return this.agent.ensureNetns(v.id);
  }

  /** Records and creates the subnet bridge. Caller holds the lock. */
  private async ensureSubnetLocked(v: VpcRec, s: SubnetRec, opts: { trustCache?: boolean } = {}): Promise<boolean> {
    const changed = await this.ensureVpcLocked(v);
    const spec = this.subnetSpec(s);
    const same = JSON.stringify(this.agent.desired.subnets.get(s.id)) === JSON.stringify(spec);
    if (same && opts.trustCache && this.agent.readyBridges.has(s.id)) return changed;
    if (!same) {
      await this.agent.store.putSubnet(spec);
      this.agent.desired.subnets.set(s.id, spec);
    }
    const ns = this.agent.nsOf(v.id);
    const br = await this.kernel.link(ns, names.bridge(s.id));
    const plan = planVpc(this.opts.hostId, [spec], [], br ? [br] : [], [], { removeOrphans: false });
    this.agent.readyBridges.delete(s.id);
    await this.agent.apply(ns, plan);
    this.agent.readyBridges.add(s.id);
    return changed || plan.ip.length > 0;
  }

  hostVpc(v: VpcRec) {
    const ns = this.agent.nsOf(v.id);
    return create(HostVpcSchema, {
      vpcId: v.id,
      vpcName: v.name,
      cidr: v.cidr,
      namespace: ns,
      netnsPath: `/run/netns/${ns}`,
      subnetIds: this.agent.subnetsOf(v.id).map((s) => s.subnetId),
      nicCount: this.agent.nicsOf(v.id).length,
      state: ResourceState.AVAILABLE,
    });
  }

  nicMsg(n: NicSpec, state = ResourceState.AVAILABLE, message = ""): Nic {
    const ns = this.agent.nsOf(n.vpcId);
    const netmask = prefixToNetmask(n.prefix);
    return create(NicSchema, {
      id: n.nicId,
      owner: n.owner,
      vpcId: n.vpcId,
      subnetId: n.subnetId,
      kind: n.kind === "tap" ? NicKind.TAP : NicKind.VETH,
      state,
      statusMessage: message,
      hostId: this.opts.hostId,
      hostInterface: n.hostIf,
      vpcNamespace: ns,
      vpcNetnsPath: `/run/netns/${ns}`,
      guest: create(GuestNetworkConfigSchema, {
        address: n.address,
        prefixLength: n.prefix,
        netmask,
        gateway: n.gateway,
        mac: n.mac,
        mtu: n.mtu,
        dnsServers: n.dns,
        searchDomains: n.search ?? [],
        hostname: n.hostname,
        interface: n.guestIf,
        kernelIpArg: kernelIpArg(n, netmask, n.guestIf),
      }),
      bandwidth:
        n.bandwidth.ingressMbps || n.bandwidth.egressMbps
          ? {
              ingress: n.bandwidth.ingressMbps ? { rateMbps: n.bandwidth.ingressMbps, burstBytes: n.bandwidth.ingressBurst } : undefined,
              egress: n.bandwidth.egressMbps ? { rateMbps: n.bandwidth.egressMbps, burstBytes: n.bandwidth.egressBurst } : undefined,
            }
          : undefined,
      details:
        n.kind === "tap"
          ? { case: "tap", value: { ownerUid: n.tap!.uid, ownerGid: n.tap!.gid, multiQueue: n.tap!.multiQueue, queues: n.tap!.queues } }
          : { case: "veth", value: { netnsPath: n.veth!.netnsPath, skipDefaultRoute: n.veth!.skipDefaultRoute } },
      createTime: timestampFromMs(n.createdMs),
    });
  }

  /** A NIC by id ("nic-…") or by its host-side interface name. */
  private async nicByRef(ref: string, field = "nic"): Promise<NicSpec | null> {
    if (ref === "") throw new InvalidArgumentError(field, "is required (a NIC id or its host-side interface name)");
    if (/^nic-[0-9a-f]{12}$/.test(ref)) return this.agent.desired.nics.get(ref) ?? (await this.agent.store.getNic(ref));
    ifname(field, ref);
    return [...this.agent.desired.nics.values()].find((n) => n.hostIf === ref) ?? null;
  }

  /** Creates a NIC's devices if missing. Caller holds the VPC lock. */
  private async ensureNicLocked(n: NicSpec, subnet: SubnetSpec): Promise<boolean> {
    const ns = this.agent.nsOf(n.vpcId);
    const [br, have] = await Promise.all([this.kernel.link(ns, names.bridge(subnet.subnetId)), this.kernel.link(ns, n.hostIf)]);
    const links = [br, have].filter((x): x is NonNullable<typeof x> => !!x);
    const qdiscs = have ? await this.kernel.qdiscs(ns) : [];
    const plan = planVpc(this.opts.hostId, [subnet], [n], links, qdiscs, { removeOrphans: false });
    // A NIC that has lived before may have flows older than a mark it gets now: adopted.
    await this.agent.marks.attach(ns, n.address, { adopted: true });
    await this.agent.apply(ns, plan);
    return plan.ip.length > 0;
  }

  /**
   * Undoes a NIC whose attach failed after its record was written. If that
   * fails too, on a Redis Cluster the NIC is marked so that the agent's next
   * pass removes it (HostStore.abandon): its caller is told the attach failed.
   */
  private async undoAttach(spec: NicSpec): Promise<void> {
    await this.detachLocked(spec).catch(async () => {
      if (!this.agent.store.keys.cluster) return;
      this.agent.desired.nics.delete(spec.nicId);
      await this.agent.store.abandon(spec).catch(() => {});
    });
  }

  /**
   * The NIC's devices go (by the names this agent gave them in its own VPC
   * namespace; the ifb only where egress is limited, the reconciler removes
   * a stray one) and so do the conntrack entries from and to its address:
   * stale ones would let a reused address inherit flows. A NIC marked from
   * its start has every flow carrying its mark: they are cleared with the
   * mark, after the answer and before any NIC of this host can have the
   * address (ct-mark-state.ts), so DetachNic only takes the devices down.
   * A NIC without a mark of its own (adopted, or none) has its entries
   * found now by a dump of the table, and again once its mark is out.
   * Returns the entries cleared before the answer.
   */
  private async detachLocked(n: NicSpec): Promise<number> {
    const ns = this.agent.nsOf(n.vpcId);
    const devices = n.bandwidth.egressMbps > 0 ? [n.hostIf, names.ifb(n.nicId)] : [n.hostIf];
    const mark = await this.agent.marks.detach(ns, n.address);
    const clearNic = (index: number | null) => this.kernel.clearNic(ns, n.address, index);
    await this.kernel.unplug(ns, devices);
    // By address now: a NIC without a mark of its own, or one whose mark this agent can no
    // longer retire (the namespace's marks are being read again).
    const retired = mark !== null && this.agent.marks.retire(ns, mark, clearNic);
    const cleared = mark && retired && !mark.adopted ? 0 : await clearNic(null);
    await this.agent.store.delNic(n);
    this.agent.desired.nics.delete(n.nicId);
    return cleared;
  }

  private requireOverlay(): Overlay {
    if (!this.opts.overlay) throw new FailedPreconditionError("the WireGuard overlay is not enabled on this host; start netagent with --overlay");
    return this.opts.overlay;
  }

  private hostMsg(r: HostRecord, pttlMs: number, invalidReason = ""): Host {
    const str = (v: unknown) => (typeof v === "string" ? v : "");
    const u32 = (v: unknown) => (typeof v === "number" && Number.isInteger(v) && v >= 0 && v < 2 ** 32 ? v : 0);
    const ms = (v: unknown) => typeof v === "number" && Number.isInteger(v) && v > 0 && v < 1e14;
    // A malformed record (from another host) is shown as it is, with the
    // reason, field by field where the field has the right type.
    return create(HostSchema, {
      id: str(r.id),
      publicKey: str(r.publicKey),
      endpoint: str(r.address),
      mtu: u32(r.mtu),
      underlayMtu: u32(r.underlayMtu),
      vpcIds: Array.isArray(r.vpcIds) ? r.vpcIds.filter((x) => typeof x === "string") : [],
      invalidReason,
      leaseExpireTime: pttlMs > 0 ? timestampFromMs(Date.now() + pttlMs) : undefined,
      registerTime: ms(r.registeredMs) ? timestampFromMs(r.registeredMs) : undefined,
      keyCreateTime: ms(r.keyCreatedMs) ? timestampFromMs(r.keyCreatedMs) : undefined,
      agentVersion: str(r.agentVersion),
    });
  }

  /** Registry records of these hosts whose lease is current, in the given order. */
  private async liveHosts(ids: string[]): Promise<Host[]> {
    if (ids.length === 0) return [];
    const p = this.agent.store.redis.pipeline();
    for (const id of ids) p.get(this.agent.store.keys.overlayHost(id)).pttl(this.agent.store.keys.overlayHost(id));
    const res = (await p.exec()) ?? [];
    const out: Host[] = [];
    ids.forEach((_, i) => {
      const j = res[2 * i]?.[1] as string | null;
      const ttl = Number(res[2 * i + 1]?.[1] ?? -2);
      if (!j) return;
      const problem = recordProblem(ids[i], j);
      let rec: HostRecord;
      try {
        const parsed = JSON.parse(j) as unknown;
        rec = (typeof parsed === "object" && parsed !== null && !Array.isArray(parsed) ? parsed : {}) as HostRecord;
      } catch {
        rec = {} as HostRecord;
      }
      out.push(this.hostMsg({ ...rec, id: ids[i] }, ttl, problem));
    });
    return out;
  }

  /**
   * AttachNic's request, validated against IPAM (the address is allocated,
   * to this owner) and the host (a veth's far end is a VM's namespace), as
   * the NIC record to store. Reads only: nothing is changed yet.
   */
  private async nicSpecFrom(req: AttachNicRequest): Promise<PendingNic> {
    const v = await this.vpc(req.vpc);
    const s = await this.subnet(req.subnet, v);
    const owner = V.token("owner", req.owner);
    const clientToken = V.token("client_token", req.clientToken, { optional: true });
    const addr = V.ipv4("address", req.address);
    if (addr < s.base || addr >= s.base + s.size) throw new InvalidArgumentError("address", `${req.address} is outside subnet ${s.name} (${s.cidr})`);
    const idx = addr - s.base;
    if (idx < 2 + s.extraReserved || idx === s.size - 1) {
      throw new InvalidArgumentError(
        "address",
        `${req.address} is reserved in ${s.cidr} (network, gateway, ${s.extraReserved} extra, broadcast); a NIC needs an allocated address`,
      );
    }
    // The VPC's resolver (default VPC base + 2, DnsService config), which
    // the gateway serves in every subnet of the VPC: read beside the allocation.
    const [alloc, dnsConfig] = await Promise.all([this.ipam.getAllocation(s, addr - s.base), new DnsReader(this.ipam.redis).getConfig(v.id)]);
    if (!alloc)
      throw new FailedPreconditionError(`${req.address} is not allocated in subnet ${s.name}; allocate it first (IpamService.Allocate / microvpc ip allocate)`);
    if (owner && alloc.owner !== owner) throw new FailedPreconditionError(`${req.address} is allocated to ${alloc.owner}, not ${owner}`);
    const mac = req.mac ? V.mac("mac", req.mac) : macFor(v.id, req.address);
    const mtu = S.mtu("mtu", req.mtu ?? this.opts.mtu);
    const hostname = req.hostname ? V.name("hostname", req.hostname) : "";
    const guestIf = ifname("guest_interface", req.guestInterface || "eth0");
    const bandwidth = bandwidthFrom(req.bandwidth);
    const nicId = `nic-${randomBytes(6).toString("hex")}`;
    let kind: "tap" | "veth";
    let tap: NicSpec["tap"];
    let veth: NicSpec["veth"];
    let hostIf: string;
    if (req.kind === NicKind.TAP) {
      if (req.options.case === "veth") throw new InvalidArgumentError("options", "kind is TAP but veth options were given");
      const o = req.options.case === "tap" ? req.options.value : undefined;
      const queues = S.queues("tap.queues", o?.queues ?? (o?.multiQueue ? 2 : 1));
      kind = "tap";
      tap = {
        uid: o?.ownerUid === undefined ? undefined : S.uid("tap.owner_uid", o.ownerUid),
        gid: o?.ownerGid === undefined ? undefined : S.uid("tap.owner_gid", o.ownerGid),
        multiQueue: !!o?.multiQueue,
        queues,
      };
      hostIf = o?.name ? S.hostIf("tap.name", o.name, nicId, "tap") : names.hostIf(nicId, "tap");
    } else if (req.kind === NicKind.VETH) {
      if (req.options.case !== "veth")
        throw new InvalidArgumentError("veth", "is required for kind VETH (veth.netns_path: the namespace the far end goes into)");
      const p = req.options.value.netnsPath;
      S.netnsPath("veth.netns_path", p);
      if (!existsSync(p)) throw new InvalidArgumentError("veth.netns_path", `${p} does not exist; create the namespace first (ip netns add NAME)`);
      // The far end must go into a VM's namespace, never the agent's own:
      // that would change the hypervisor's network.
      const target = statSync(p);
      const self = statSync("/proc/self/ns/net");
      if (target.ino === self.ino && target.dev === self.dev)
        throw new InvalidArgumentError("veth.netns_path", `${p} is the agent's own network namespace; give the VM's namespace`);
      for (const [vpcId] of this.agent.desired.vpcs) {
        const vns = `/run/netns/${this.agent.nsOf(vpcId)}`;
        if (existsSync(vns) && statSync(vns).ino === target.ino)
          throw new InvalidArgumentError("veth.netns_path", `${p} is a VPC namespace of this host; give the VM's namespace`);
      }
      kind = "veth";
      veth = { netnsPath: p, skipDefaultRoute: req.options.value.skipDefaultRoute };
      hostIf = names.hostIf(nicId, "veth");
    } else {
      throw new InvalidArgumentError("kind", "is required: NIC_KIND_TAP for a VM, NIC_KIND_VETH for a namespace");
    }
    const resolver = dnsConfig.resolver ?? defaultResolver(v.base);
    const spec: NicSpec = {
      nicId,
      owner: owner || alloc.owner,
      vpcId: v.id,
      subnetId: s.id,
      kind,
      hostIf,
      mac,
      address: req.address,
      prefix: s.prefix,
      gateway: V.intToIp(s.base + 1),
      mtu,
      hostname,
      guestIf,
      dns: [resolver],
      search: [`${v.name}.internal`],
      tap,
      veth,
      bandwidth,
      createdMs: Date.now(),
      clientToken,
    };
    return { spec, vpc: v, subnet: s, namedTap: kind === "tap" && req.options.case === "tap" && !!req.options.value.name };
  }

  /** Stores the NIC and builds its devices in one ip batch; undoes both on failure. Caller holds the VPC's lock. */
  private async attachLocked({ spec, vpc: v, subnet: s, namedTap }: PendingNic): Promise<MessageInitShape<typeof AttachNicResponseSchema>> {
    const { nicId, kind, hostIf, veth, guestIf, address } = spec;
    await this.ensureSubnetLocked(v, s, { trustCache: true });
    const ns = this.agent.nsOf(v.id);
    if (namedTap) {
      const taken = await this.kernel.link(ns, hostIf);
      if (taken) throw new AlreadyExistsError(`interface ${hostIf} already exists in ${ns}; choose another tap.name`);
    }
    const added = await this.agent.store.addNic(spec);
    if (added.code === -2) {
      throw new FailedPreconditionError(
        `${address} is held in VPC ${v.name} by NIC ${added.id.split("/")[1]} on hypervisor ${added.id.split("/")[0]}; detach it there first`,
      );
    }
    if (added.code !== 1) {
      const prev = this.agent.desired.nics.get(added.id) ?? (await this.agent.store.getNic(added.id));
      if (!prev) throw new AlreadyExistsError(`NIC ${added.id} holds ${address}`);
      if (added.code === -1 && (prev.owner !== spec.owner || prev.subnetId !== spec.subnetId || prev.kind !== spec.kind)) {
        throw new AlreadyExistsError(`${address} is already attached in VPC ${v.name} on this host as ${prev.nicId} (owner ${prev.owner}); detach it first`);
      }
      this.agent.desired.nics.set(prev.nicId, prev);
      await this.ensureNicLocked(prev, this.agent.desired.subnets.get(s.id)!);
      return { nic: this.nicMsg(prev), created: false };
    }
    // A Linux bridge takes at most BRIDGE_MAX_PORTS ports (the kernel's
    // BR_MAX_PORTS less port 0); the next one fails with EXFULL deep in
    // the ip batch. Say so before touching the kernel.
    const onBridge = [...this.agent.desired.nics.values()].filter((n) => n.subnetId === s.id).length;
    if (onBridge >= BRIDGE_MAX_PORTS) {
      await this.undoAttach(spec);
      throw bridgeFull(s.name, this.opts.hostId);
    }
    this.agent.desired.nics.set(nicId, spec);
    let marked: Promise<unknown> | undefined;
    try {
      // A new NIC has a fresh id, so its devices cannot exist yet: build
      // them without reading the kernel first.
      // One `ip -batch` (the VM side included); `tc -batch` only for limits.
      const lines = nicCreateLines(this.opts.hostId, spec, names.bridge(s.id));
      const bw = bandwidthLines(this.opts.hostId, spec, [], []);
      // Its flows' mark before its first packet: every packet the NIC ever
      // carries finds it (ct-marks.ts). Taking the mark over from the
      // address's previous NIC first clears that NIC's flows (a walk of the
      // host's conntrack hash, on the pool); the devices are made meanwhile,
      // their host end down until the mark is ready.
      marked = this.agent.marks.attach(ns, address, { fresh: true });
      marked.catch(() => {});
      await this.kernel.ipBatch(ns, [...lines.ip, ...bw.ip], lines.guest.length ? [{ netnsPath: veth!.netnsPath, lines: lines.guest }] : [], marked);
      await this.kernel.tcBatch(ns, bw.tc);
    } catch (err) {
      // Undo: nothing half-applied stays behind (the mark's attach settled first: the undo retires it).
      await marked?.catch(() => {});
      await this.undoAttach(spec);
      this.agent.readyBridges.delete(s.id);
      const out = err instanceof ExecError ? err.stderr : "";
      if (kind === "veth" && /File exists/.test(out))
        throw new AlreadyExistsError(`${veth!.netnsPath} already has an interface ${guestIf}; pick another guest_interface`);
      if (/Exchange full/.test(out)) throw bridgeFull(s.name, this.opts.hostId);
      if (/No such device|Cannot find device/.test(out))
        throw new FailedPreconditionError(`the subnet bridge vanished while attaching (${out.trim()}); it is being repaired — retry`);
      throw err;
    }
    return { nic: this.nicMsg(spec), created: true };
  }

  readonly impl: ServiceImpl<typeof NetAgentService> = {
    ensureVpc: async (req) => {
      const v = await this.vpc(req.vpc);
      const changed = await this.agent.withLock(v.id, () => this.ensureVpcLocked(v));
      if (changed) void this.opts.overlay?.syncAll();
      return { vpc: this.hostVpc(v), changed };
    },

    deleteVpc: async (req) => {
      const r = V.ref("vpc", req.vpc, "vpc");
      const id = r.id ?? (await this.ipam.resolveVpc(r));
      if (!id) return { deleted: false, detachedNicIds: [] };
      return this.agent.withLock(id, async () => {
        const nics = this.agent.nicsOf(id);
        if (nics.length && !req.force) {
          throw new FailedPreconditionError(
            `VPC ${id} still has ${nics.length} NIC(s) on this host (${nics
              .slice(0, 3)
              .map((n) => n.nicId)
              .join(", ")}…); detach them or pass force`,
          );
        }
        for (const n of nics) await this.detachLocked(n);
        for (const s of this.agent.subnetsOf(id)) {
          await this.agent.store.delSubnet(s.subnetId);
          this.agent.desired.subnets.delete(s.subnetId);
        }
        const existed = this.agent.desired.vpcs.has(id);
        await this.agent.store.delVpc(id);
        this.agent.desired.vpcs.delete(id);
        this.opts.overlay?.noteVpcs();
        await this.opts.overlay?.teardown(id);
        const ns = this.agent.nsOf(id);
        // The NICs' marks out (and their flows cleared again) before the namespace goes.
        await this.agent.marks.settle(ns);
        if ((await this.kernel.listNetns()).includes(ns)) await this.kernel.delNetns(ns);
        this.agent.marks.forget(ns);
        return { deleted: existed, detachedNicIds: nics.map((n) => n.nicId) };
      });
    },

    ensureSubnet: async (req) => {
      if (req.vpc === "" && !req.subnet.startsWith("subnet-")) throw new InvalidArgumentError("vpc", "is required when the subnet is given by name");
      let v: VpcRec;
      let s: SubnetRec;
      if (req.vpc === "") {
        V.id("subnet", req.subnet, "subnet");
        const found = await this.ipam.getSubnet(req.subnet);
        if (!found) throw new NotFoundError("subnet", req.subnet);
        s = found;
        v = await this.vpc(s.vpcId);
      } else {
        v = await this.vpc(req.vpc);
        s = await this.subnet(req.subnet, v);
      }
      const changed = await this.agent.withLock(v.id, () => this.ensureSubnetLocked(v, s));
      return {
        subnet: create(HostSubnetSchema, {
          subnetId: s.id,
          vpcId: v.id,
          cidr: s.cidr,
          gateway: V.intToIp(s.base + 1),
          datapath: Datapath.BRIDGED,
          bridge: names.bridge(s.id),
          namespace: this.agent.nsOf(v.id),
          mtu: this.opts.mtu,
          nicCount: this.agent.nicsOf(v.id).filter((n) => n.subnetId === s.id).length,
          state: ResourceState.AVAILABLE,
        }),
        changed,
      };
    },

    deleteSubnet: async (req) => {
      V.ref("subnet", req.subnet, "subnet");
      let id: string | null = req.subnet.startsWith("subnet-") ? req.subnet : null;
      if (!id) {
        if (req.vpc === "") throw new InvalidArgumentError("vpc", "is required when the subnet is given by name");
        const vid = await this.ipam.resolveVpc(V.ref("vpc", req.vpc, "vpc"));
        id = vid ? await this.ipam.resolveSubnet({ name: req.subnet }, vid) : null;
      }
      const spec = id ? this.agent.desired.subnets.get(id) : undefined;
      if (!spec) return { deleted: false, detachedNicIds: [] };
      return this.agent.withLock(spec.vpcId, async () => {
        const nics = this.agent.nicsOf(spec.vpcId).filter((n) => n.subnetId === spec.subnetId);
        if (nics.length && !req.force)
          throw new FailedPreconditionError(`subnet ${spec.subnetId} still has ${nics.length} NIC(s) on this host; detach them or pass force`);
        for (const n of nics) await this.detachLocked(n);
        const ns = this.agent.nsOf(spec.vpcId);
        const br = await this.kernel.link(ns, names.bridge(spec.subnetId));
        if (br && br.alias === names.alias(this.opts.hostId, spec.subnetId)) await this.kernel.ipBatch(ns, [`link del dev ${br.ifname}`]);
        await this.agent.store.delSubnet(spec.subnetId);
        this.agent.desired.subnets.delete(spec.subnetId);
        return { deleted: true, detachedNicIds: nics.map((n) => n.nicId) };
      });
    },

    attachNic: async (req) => {
      const nic = await this.nicSpecFrom(req);
      return this.agent.withLock(nic.vpc.id, () => this.attachLocked(nic));
    },

    detachNic: async (req) => {
      if ((req.nic === "") === (req.owner === ""))
        throw new InvalidArgumentError("nic", "give exactly one of nic (a NIC id or interface name) and owner (every NIC of that owner)");
      let nics: NicSpec[];
      if (req.nic) {
        const n = await this.nicByRef(req.nic);
        nics = n ? [n] : [];
      } else {
        const owner = V.token("owner", req.owner);
        nics = [...this.agent.desired.nics.values()].filter((n) => n.owner === owner);
      }
      let cleared = 0;
      for (const n of nics) cleared += await this.agent.withLock(n.vpcId, () => this.detachLocked(n));
      return { detachedNicIds: nics.map((n) => n.nicId), conntrackEntriesCleared: cleared };
    },

    getNic: async (req) => {
      const n = await this.nicByRef(req.ref, "ref");
      if (!n) throw new NotFoundError("nic", req.ref, "list NICs with ListNics");
      const l = await this.kernel.link(this.agent.nsOf(n.vpcId), n.hostIf);
      return { nic: l ? this.nicMsg(n) : this.nicMsg(n, ResourceState.FAILED, `device ${n.hostIf} is missing; the reconciler recreates it`) };
    },

    listNics: async (req) => {
      const size = V.pageSize("page_size", req.pageSize);
      let nics = [...this.agent.desired.nics.values()].sort((a, b) => a.nicId.localeCompare(b.nicId));
      if (req.vpc) {
        const v = await this.vpc(req.vpc);
        nics = nics.filter((n) => n.vpcId === v.id);
      }
      if (req.subnet) nics = nics.filter((n) => n.subnetId === req.subnet);
      if (req.owner) nics = nics.filter((n) => n.owner === req.owner);
      if (req.pageToken) nics = nics.filter((n) => n.nicId > Buffer.from(req.pageToken, "base64url").toString());
      const page = nics.slice(0, size);
      return {
        nics: page.map((n) => this.nicMsg(n)),
        nextPageToken: nics.length > size ? Buffer.from(page[page.length - 1].nicId).toString("base64url") : "",
      };
    },

    nicStats: async (req) => {
      let nics = req.nics.length ? await Promise.all(req.nics.map((id, i) => this.nicByRef(id, `nics[${i}]`))) : [...this.agent.desired.nics.values()];
      const missing = req.nics.filter((_, i) => !nics[i]);
      if (missing.length) throw new NotFoundError("nic", missing[0]);
      if (req.vpc) {
        const v = await this.vpc(req.vpc);
        nics = nics.filter((n) => n!.vpcId === v.id);
      }
      const out = [];
      for (const n of nics.slice(0, V.pageSize("page_size", req.pageSize))) {
        const s = await this.kernel.stats(this.agent.nsOf(n!.vpcId), n!.hostIf);
        if (!s) continue;
        // The host side's tx is what the VM received.
        out.push(
          create(NicCountersSchema, {
            nicId: n!.nicId,
            hostInterface: n!.hostIf,
            rxBytes: s.txBytes,
            rxPackets: s.txPackets,
            rxDropped: s.txDropped,
            rxErrors: s.txErrors,
            txBytes: s.rxBytes,
            txPackets: s.rxPackets,
            txDropped: s.rxDropped,
            txErrors: s.rxErrors,
            readTime: timestampFromMs(Date.now()),
          }),
        );
      }
      return { nics: out, nextPageToken: "" };
    },

    setNicBandwidth: async (req) => {
      const n = await this.nicByRef(req.nic);
      if (!n) throw new NotFoundError("nic", req.nic);
      const bandwidth = bandwidthFrom(req.bandwidth);
      return this.agent.withLock(n.vpcId, async () => {
        const updated = { ...n, bandwidth };
        await this.agent.store.putNic(updated);
        this.agent.desired.nics.set(n.nicId, updated);
        const ns = this.agent.nsOf(n.vpcId);
        const [qdiscs, ifb] = await Promise.all([this.kernel.qdiscs(ns), this.kernel.link(ns, names.ifb(n.nicId))]);
        const bw = bandwidthLines(this.opts.hostId, updated, qdiscs, ifb ? [ifb] : []);
        // Order: the ifb must exist before a filter redirects to it, and
        // must outlive the filter that points at it.
        if (bandwidth.egressMbps > 0) {
          await this.kernel.ipBatch(ns, bw.ip);
          await this.kernel.tcBatch(ns, bw.tc);
        } else {
          await this.kernel.tcBatch(ns, bw.tc);
          await this.kernel.ipBatch(ns, bw.ip);
        }
        return { nic: this.nicMsg(updated) };
      });
    },

    getHost: async (req) => {
      const ref = req.ref || this.opts.hostId;
      if (!HOST_REF_RE.test(ref)) throw new InvalidArgumentError("ref", `${V.show(ref)} is not a host id: 1–63 characters of [a-z0-9-]`);
      const [h] = await this.liveHosts([ref]);
      if (!h) throw new NotFoundError("host", ref, "it is not registered or its lease expired (is its netagent running with --overlay?)");
      return { host: h };
    },

    listHosts: async (req) => {
      const size = V.pageSize("page_size", req.pageSize);
      let ids: string[];
      if (req.vpc) {
        const v = await this.vpc(req.vpc);
        ids = await this.agent.store.redis.hkeys(this.agent.store.keys.overlayMembers(v.id));
      } else {
        ids = await this.agent.store.redis.smembers(this.agent.store.keys.hostIndex);
      }
      ids = ids.filter((id) => HOST_REF_RE.test(id)).sort();
      if (req.pageToken) {
        const after = Buffer.from(req.pageToken, "base64url").toString();
        ids = ids.filter((id) => id > after);
      }
      const hosts: Host[] = [];
      // Expired hosts are skipped, so read in chunks until the page is full.
      for (let i = 0; i < ids.length && hosts.length <= size; i += size + 1) hosts.push(...(await this.liveHosts(ids.slice(i, i + size + 1))));
      const page = hosts.slice(0, size);
      return { hosts: page, nextPageToken: hosts.length > size ? Buffer.from(page[page.length - 1].id).toString("base64url") : "" };
    },

    rotateHostKey: async (req) => {
      const o = this.requireOverlay();
      const timeoutS = req.waitTimeoutSeconds ?? 10;
      if (timeoutS < 1 || timeoutS > 120) throw new InvalidArgumentError("wait_timeout_seconds", `${timeoutS}: use 1–120`);
      const { previous, rotatedMs } = await o.rotate();
      let peers = { updated: [] as string[], pending: [] as string[] };
      if (req.waitForPeers) {
        const deadline = Date.now() + timeoutS * 1000;
        for (let i = 0; i < 1200 && Date.now() < deadline; i++) {
          peers = await o.peersHandshakenSince(rotatedMs);
          if (peers.pending.length === 0) break;
          await new Promise((r) => setTimeout(r, 100));
        }
      }
      const [h] = await this.liveHosts([this.opts.hostId]);
      return { host: h ?? this.hostMsg(o.record(), 0), previousPublicKey: previous, peersUpdated: peers.updated, peersPending: peers.pending };
    },

    getOverlayStatus: async (req) => {
      // A malformed or unknown VPC is an error even where the overlay is off.
      const only = req.vpc ? (await this.vpc(req.vpc)).id : undefined;
      const o = this.opts.overlay;
      if (!o) return { vpcs: [] };
      let vpcIds = [...new Set([...this.agent.desired.vpcs.keys(), ...o.runningVpcs()])].sort();
      if (only) vpcIds = vpcIds.filter((id) => id === only);
      const vpcs = [];
      for (const vpcId of vpcIds) {
        const ifname = wgName(this.opts.hostId, vpcId);
        const d = await o.dump(ifname);
        if (!d) continue;
        const byKey = new Map((o.applied.get(vpcId) ?? []).map((p) => [p.publicKey, p.hostId]));
        const peers = d.peers
          .map((p) =>
            create(OverlayPeerSchema, {
              hostId: byKey.get(p.publicKey) ?? "",
              publicKey: p.publicKey,
              endpoint: p.endpoint,
              allowedIps: p.allowedIps,
              latestHandshakeTime: p.latestHandshakeS > 0 ? timestampFromMs(p.latestHandshakeS * 1000) : undefined,
              rxBytes: p.rxBytes,
              txBytes: p.txBytes,
              persistentKeepaliveSeconds: p.keepalive,
            }),
          )
          .sort((a, b) => a.hostId.localeCompare(b.hostId));
        const implementation = o.implementationOf(ifname) === "kernel" ? WireGuardImplementation.KERNEL : WireGuardImplementation.WIREGUARD_GO;
        const skippedHosts = (o.skipped.get(vpcId) ?? []).map((x) => create(SkippedHostSchema, x)).sort((a, b) => a.hostId.localeCompare(b.hostId));
        const rejectedAddresses = (o.rejected.get(vpcId) ?? []).map((x) => create(RejectedAddressSchema, x));
        vpcs.push(
          create(VpcOverlaySchema, {
            vpcId,
            interface: ifname,
            listenPort: d.listenPort,
            mtu: o.mtu,
            publicKey: d.publicKey,
            peers,
            implementation,
            skippedHosts,
            rejectedAddresses,
            syncError: o.syncError(vpcId),
          }),
        );
      }
      return { vpcs };
    },

    getHostStatus: async () => {
      const st = this.agent.status;
      const vpcs = [];
      for (const id of this.agent.desired.vpcs.keys()) {
        const v = await this.ipam.getVpc(id).catch(() => null);
        if (v) vpcs.push(this.hostVpc(v));
      }
      // A stuck overlay (a VPC whose peers cannot be read or set) degrades the host as a failed reconcile does.
      const overlayError = this.opts.overlay?.lastError ? `overlay: ${this.opts.overlay.lastError}` : "";
      return {
        hostId: this.opts.hostId,
        health: st.lastError || overlayError ? HostHealth.DEGRADED : HostHealth.HEALTHY,
        datapath: Datapath.BRIDGED,
        startTime: timestampFromMs(this.agent.startedMs),
        lastReconcileTime: st.lastReconcileMs ? timestampFromMs(st.lastReconcileMs) : undefined,
        lastReconcileChanges: st.lastChanges.length,
        redisConnected: this.agent.store.redis.status === "ready",
        vpcs,
        errors: [st.lastError, overlayError].filter(Boolean).map((message) => ({ message })),
        invalidRecords: this.agent.invalid.all().map((x) => create(InvalidRecordSchema, x)),
      };
    },
  };
}
