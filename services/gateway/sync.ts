// The gateway's per-hypervisor loop: builds this host's HostGw from Redis
// (the netagent's VPCs and subnets here, NAT gateways, floating IPs and port
// forwards of local NICs, IMDS hop limits) and applies it: transit links and
// routes with `ip -batch`, one nft transaction per namespace. Re-applies only
// what changed; follows the change events; a periodic pass repairs drift.
// What to run comes from the planner (plan.ts); it all runs through one
// adapter (kernel.ts).
import { existsSync } from "node:fs";
import type { Redis } from "ioredis";
import ipaddr from "ipaddr.js";
import type { Logger } from "pino";
import { Counter } from "prom-client";
import { render } from "../common/nft/tx.js";
import { reportInvalid } from "../common/invalid-records.js";
import * as V from "../common/validate.js";
import { metricsRegistry } from "../common/metrics.js";
import { SyncLoop } from "../common/sync-loop.js";
import { defaultResolver, DnsReader } from "../dns/schema.js";
import type { IpamReader } from "../ipam/schema.js";
import { netagentNames as naNames, wgName } from "../common/names.js";
import { NA_KEYS, naKeys, type HostReader } from "../netagent/schema.js";
import { LinuxGatewayKernel, type GatewayKernel } from "./kernel.js";
import {
  DEFAULT_HOP_LIMIT,
  hostRouteDiff,
  hostTx,
  names,
  natSteerLines,
  RESOLVER_LABEL,
  resolverAddrLines,
  transitAddrs,
  transitCreateLines,
  transitRepairLines,
  undoHostLines,
  transitReleaseLines,
  vpcHostLines,
  vpcTx,
  type GwVpc,
  type HostGw,
  type PortRanges,
} from "./plan.js";
import { OWNER, parseGwSubnet } from "./schema.js";
import type { GatewayStore } from "./store.js";

/** Backoff of a VPC whose apply failed: 0.5 s, doubling, at most 30 s. */
const VPC_RETRY_BASE_MS = 500;
const VPC_RETRY_MAX_MS = 30_000;

const applies = new Counter({
  name: "microvpc_gateway_applies_total",
  help: "Gateway kernel updates by namespace kind (host, vpc) and result.",
  labelNames: ["where", "result"] as const,
  registers: [metricsRegistry],
});

export interface GatewaySyncOptions {
  hostId: string;
  /** Namespace of the hypervisor's uplink ("" = the daemon's own). */
  hostNetns: string;
  uplink: string;
  imdsPort: number;
  /** Port of the VPC resolver on the transit addresses (0: no resolver). */
  dnsPort?: number;
  pool: string;
  hopLimits: () => Promise<Map<string, number>>;
  /** One instance's hop limit (its "vpcId/address" in hopLimits()), undefined if none; unset: every NIC or metadata event runs a whole pass. */
  hopLimitOf?: (vpcId: string, address: string) => Promise<number | undefined>;
  /** Ports the hypervisor serves itself: never port-forwarded. */
  reservedPorts?: PortRanges;
  /** Flows a VM may hold through the host's NAT at once (0: no limit). */
  conntrackLimitPerVm?: number;
  /** The management CIDRs now (read each pass: "auto" follows the host's addresses); unset: none. */
  managementCidrs?: () => Promise<string[]>;
  /**
   * TTL of the lease on a NAT gateway's address (default 6000 ms), renewed
   * every third of it by the holder; the other hosts of the VPC check it as
   * often and take it when it has run out.
   */
  natLeaseMs?: number;
}

const VPC_ID = /^vpc-[0-9a-f]{12}$/;
const NIC_ID = /^nic-[0-9a-f]{12}$/;

/** Default TTL of a NAT gateway's address lease. */
export const DEFAULT_NAT_LEASE_MS = 6000;

/** The change events a hypervisor's gateway follows (on its host's stream, its VPCs' and the fleet's). */
export const GATEWAY_EVENTS = /^(gw\.|nic\.|subnet\.|vpc\.|dns\.config)/;

/** What GatewaySync runs and reads beside its stores; each defaults to the real one. */
export interface GatewaySyncDeps {
  kernel?: GatewayKernel;
  dns?: Pick<DnsReader, "getConfig">;
  nsExists?: (ns: string) => boolean;
}

export class GatewaySync {
  status = { lastApplyMs: 0, lastError: "" };
  private lastHost = "";
  private lastVpc = new Map<string, string>();
  private lastRoutes = new Map<string, string[]>();
  private lastResolver = new Map<string, string | undefined>();
  /** NAT steering applied per VPC (natSteerLines' inputs). */
  private lastSteer = new Map<string, string>();
  /** VPCs that left this host and whose transit index is not freed yet. */
  private readonly leaving = new Set<string>();
  private readonly dns: Pick<DnsReader, "getConfig">;
  /** The kernel: ip batches, its two reads, nft (fakes in tests). */
  readonly kernel: GatewayKernel;
  /** Whether a VPC's namespace exists here (tests have none). */
  private readonly nsExists: (ns: string) => boolean;
  /** Every matching event asks for a whole pass; a drift pass forgets what is known applied. */
  private readonly loop: SyncLoop<void>;

  /**
   * What the last whole pass that succeeded used of this host's NICs: their
   * addresses, and the local addresses that have a floating IP, a port
   * forward or a hop limit other than the default (the only things a NIC's
   * coming or going changes here).
   */
  private seen?: { vpcs: Set<string>; nics: Map<string, { vpcId: string; address: string }>; special: Set<string> };
  private pendingSeen?: GatewaySync["seen"];

  constructor(
    readonly store: Pick<GatewayStore, "listNats" | "listFips" | "listPfs" | "transitIndex" | "transitMap" | "releaseTransit"> &
      Partial<Pick<GatewayStore, "natHolder" | "natLease" | "natUnlease">>,
    readonly ipam: Pick<IpamReader, "getVpc" | "getSubnet"> & Partial<Pick<IpamReader, "redis" | "listSubnets">>,
    readonly host: Pick<HostReader, "load"> & Partial<Pick<HostReader, "nicRecord" | "keys">>,
    readonly opts: GatewaySyncOptions,
    readonly log: Logger,
    deps: GatewaySyncDeps = {},
  ) {
    this.kernel = deps.kernel ?? new LinuxGatewayKernel(opts.hostNetns);
    this.nsExists = deps.nsExists ?? ((ns) => existsSync(`/run/netns/${ns}`));
    if (deps.dns) this.dns = deps.dns;
    else if (ipam.redis) this.dns = new DnsReader(ipam.redis, log);
    else throw new Error("GatewaySync: no DnsStore and no Redis to make one");
    this.loop = new SyncLoop({
      log,
      events: GATEWAY_EVENTS,
      // The streams of the VPCs held here, this host's, and the fleet's (the default DNS configuration): common/events.ts.
      // A VM start's events (address, NIC, binding, metadata, name) in one or two batches, not one wake-up each.
      scope: { host: opts.hostId, vpcs: (redis) => redis.hkeys(naKeys(redis).vpcs(opts.hostId)), registry: true, settleMs: 20 },
      // A NIC of this host, or an instance's metadata, coming or going: a
      // check of that one address first (eventKey); a whole pass only if it
      // changes what the gateway applies. Another host's NIC changes nothing here.
      route: (e) => {
        if (e.kind === "nic.attached" || e.kind === "nic.detached") {
          if (e.host !== opts.hostId) return undefined;
          return VPC_ID.test(e.vpc ?? "") && NIC_ID.test(e.nic ?? "") ? { key: `nic ${e.vpc} ${e.nic}` } : "all";
        }
        if (e.kind === "gw.metadata.set" || e.kind === "gw.metadata.deleted") {
          if (e.host !== opts.hostId) return undefined;
          return VPC_ID.test(e.vpc ?? "") && ipaddr.IPv4.isValidFourPartDecimal(e.address ?? "") ? { key: `addr ${e.vpc} ${e.address}` } : "all";
        }
        return "all";
      },
      pass: async (r) => {
        if (!r.only || (await this.changesApplied(r.only))) await this.syncOnce(r.drift);
      },
      failedAt: () => (this.status.lastError ? this.status.lastApplyMs : undefined),
      // A failed VPC when its backoff is due.
      due: () => this.retryDue(),
      reconciler: "gateway",
      // A VPC failing (and backing off) is a failed pass too, though the others applied.
      errorAfterPass: () => this.status.lastError || [...this.vpcFailures].map(([vpc, f]) => `${vpc}: ${f.error}`).join("; ") || undefined,
    });
  }

  /**
   * Whether NIC or metadata changes (route's keys) change what this gateway
   * applies: a NIC's address, or an instance's, that has a floating IP, a
   * port forward or a hop limit other than the default, now or at the last
   * whole pass; a VPC new here; anything it cannot tell (true).
   */
  async changesApplied(keys: ReadonlySet<string>): Promise<boolean> {
    const seen = this.seen;
    if (!seen || !this.opts.hopLimitOf || !this.host.nicRecord || this.status.lastError) return true;
    try {
      for (const key of keys) {
        const [what, vpcId, id] = key.split(" ");
        if (!seen.vpcs.has(vpcId)) return true;
        let address = id;
        if (what === "nic") {
          const r = await this.host.nicRecord(id);
          if (r === "invalid") return true;
          const before = seen.nics.get(id);
          if (r !== "absent" && (r.nic.vpcId !== vpcId || (before && before.address !== r.nic.address))) return true;
          const now = r === "absent" ? undefined : r.nic.address;
          if (before && seen.special.has(`${vpcId}/${before.address}`)) return true;
          if (!now) continue;
          address = now;
        }
        if (seen.special.has(`${vpcId}/${address}`)) return true;
        const hop = await this.opts.hopLimitOf(vpcId, address);
        if (hop !== undefined && hop !== DEFAULT_HOP_LIMIT) return true;
      }
      return false;
    } catch {
      return true;
    }
  }

  /** The VPC's resolver address, if the resolver is on. */
  private async resolverOf(vpcId: string): Promise<string | undefined> {
    if (!this.opts.dnsPort) return undefined;
    // DnsReader checks the stored config (dns/schema.ts); a bad one reads as unset.
    const own = (await this.dns.getConfig(vpcId)).resolver;
    if (own) return own;
    const base = await this.vpcBase(vpcId);
    return base === undefined ? undefined : defaultResolver(base);
  }

  /** The VPC's base address from IPAM's record, checked against its CIDR; undefined if absent or bad. */
  private async vpcBase(vpcId: string): Promise<number | undefined> {
    const key = `mvpc:vpc:${vpcId}`;
    try {
      const vpc = await this.ipam.getVpc(vpcId);
      if (!vpc) return undefined;
      const c = V.cidr("cidr", vpc.cidr, { min: 0, max: 32 });
      if (c.base !== vpc.base) throw new Error(`base: ${V.show(String(vpc.base))} is not the base of cidr ${c.text}`);
      return c.base;
    } catch (err) {
      reportInvalid(OWNER, "vpc", key, (err as Error).message, this.log, { vpcId });
      return undefined;
    }
  }

  /** Whether IPAM says the subnet is public; a record that cannot be read is private (no egress). */
  private async subnetPublic(subnetId: string, vpcId: string): Promise<boolean> {
    try {
      return (await this.ipam.getSubnet(subnetId))?.type === "public";
    } catch (err) {
      reportInvalid(OWNER, "subnet", `mvpc:subnet:${subnetId}`, (err as Error).message, this.log, { vpcId });
      return false;
    }
  }

  /** VPCs here whose NAT gateway has an address (their leases are this host's concern). */
  private natVpcs = new Set<string>();
  private natAddrs = new Map<string, string>();
  /** The holder of each such VPC's address as last read (undefined: none). */
  private readonly natHolders = new Map<string, string | undefined>();
  private leaseTimer?: NodeJS.Timeout;
  private leaseStopped = false;
  get natLeaseMs(): number {
    return this.opts.natLeaseMs ?? DEFAULT_NAT_LEASE_MS;
  }

  /**
   * The host holding the VPC's NAT address, after taking the lease if it was
   * free (or held by a value that is no registered host of the VPC) and
   * renewing it if this host holds it. A change of holder is an event
   * (gw.nat.holder) when this host takes the lease; a lease that ran out
   * makes none, and the hosts that check it find out themselves.
   */
  private async claimNat(vpcId: string): Promise<string | undefined> {
    if (!this.store.natHolder || !this.store.natLease) return undefined;
    const cur = await this.store.natHolder(vpcId);
    let holder = cur.holder;
    if (holder === undefined || holder === this.opts.hostId) {
      const r = await this.store.natLease(vpcId, this.opts.hostId, this.natLeaseMs, cur.bad ?? "");
      // Another host won the race: it is the holder once the registry vouches for it.
      holder = r.held ? this.opts.hostId : (await this.store.natHolder(vpcId)).holder;
      if (r.taken) this.log.info({ vpc: vpcId }, "gateway: this host took the NAT gateway's address");
    }
    const before = this.natHolders.get(vpcId);
    if (this.natHolders.has(vpcId) && before !== holder)
      this.log.info({ vpc: vpcId, from: before ?? "none", to: holder ?? "none" }, "gateway: NAT holder changed");
    this.natHolders.set(vpcId, holder);
    return holder;
  }

  private async unleaseNat(vpcId: string): Promise<void> {
    this.natHolders.delete(vpcId);
    try {
      if (await this.store.natUnlease?.(vpcId, this.opts.hostId)) this.log.info({ vpc: vpcId }, "gateway: gave up the NAT gateway's address");
    } catch (err) {
      this.log.warn({ vpc: vpcId, err: (err as Error).message }, "gateway: cannot give up the NAT lease; it runs out by itself");
    }
  }

  /**
   * The lease pass, every natLeaseMs/3 between the sync passes: renews this
   * host's leases, takes those that ran out, and starts a sync pass when a
   * holder changed.
   */
  async leaseTick(): Promise<void> {
    let changed = false;
    for (const vpcId of this.natVpcs) {
      const before = this.natHolders.get(vpcId);
      try {
        if ((await this.claimNat(vpcId)) !== before) changed = true;
      } catch (err) {
        this.log.warn({ vpc: vpcId, err: (err as Error).message }, "gateway: NAT lease check failed");
      }
    }
    if (changed) this.kick();
  }

  /** Gives up every lease this host holds (a stopping gateway): the next host takes over at once, not after the TTL. */
  async releaseNatLeases(): Promise<void> {
    for (const id of [...this.natVpcs]) {
      if (this.natHolders.get(id) !== this.opts.hostId) continue;
      await this.unleaseNat(id);
      // Its proxy entry would answer ARP beside the next holder's.
      const a = this.natAddrs.get(id);
      if (a) await this.kernel.hostBatch([`neigh del proxy ${a} dev ${this.opts.uplink}`], true).catch(() => undefined);
    }
  }

  /** CIDRs of the NAT gateway's source subnets in the whole VPC: its private subnets, or `sources` of them. */
  private async natCidrs(vpcId: string, sources: string[]): Promise<string[]> {
    if (!this.ipam.listSubnets) return [];
    const out: string[] = [];
    for (const s of await this.ipam.listSubnets(vpcId, "", 10_000)) {
      if (s.vpcId !== vpcId || s.type === "public" || (sources.length > 0 && !sources.includes(s.id))) continue;
      const p = parseGwSubnet({ subnetId: s.id, cidr: s.cidr });
      if (p.ok) out.push(p.value.cidr);
      else reportInvalid(OWNER, "subnet", `mvpc:subnet:${s.id}`, p.reason, this.log, { vpcId });
    }
    return out.sort();
  }

  async desired(): Promise<HostGw> {
    const d = await this.host.load();
    // Host records the shared reader skipped: this reader skipped them too, and counts them.
    for (const x of d.invalid ?? []) reportInvalid(OWNER, `host-${x.kind}`, x.key, x.reason, this.log, { field: x.field });
    const [nats, fips, pfs, hops] = await Promise.all([this.store.listNats(), this.store.listFips(), this.store.listPfs(), this.opts.hopLimits()]);
    const vpcs: GwVpc[] = [];
    for (const vpcId of d.vpcs.keys()) {
      if (!VPC_ID.test(vpcId) || !this.nsExists(naNames.netns(this.opts.hostId, vpcId))) continue;
      // One VPC whose records do not validate is left as it is; the others converge.
      let transit: number;
      try {
        transit = await this.store.transitIndex(this.opts.hostId, vpcId);
      } catch (err) {
        this.log.warn({ vpc: vpcId, err: (err as Error).message }, "skipping a VPC without a valid transit index");
        continue;
      }
      const subnets = [];
      for (const s of d.subnets.values()) {
        if (s.vpcId !== vpcId) continue;
        // cidr reaches nft: checked even though the netagent wrote it.
        const p = parseGwSubnet(s);
        if (!p.ok) {
          reportInvalid(OWNER, "subnet", (this.host.keys ?? NA_KEYS.single).subnets(this.opts.hostId), p.reason, this.log, { field: s.subnetId, vpcId });
          continue;
        }
        subnets.push({ ...p.value, public: await this.subnetPublic(s.subnetId, vpcId) });
      }
      const nat = nats.find((n) => n.vpcId === vpcId);
      const natAddress = nat?.address ?? "";
      const holder = natAddress ? await this.claimNat(vpcId) : undefined;
      const localAddrs = new Set([...d.nics.values()].filter((n) => n.vpcId === vpcId && ipaddr.IPv4.isValidFourPartDecimal(n.address)).map((n) => n.address));
      const hopLimits = new Map<string, number>();
      for (const a of localAddrs) hopLimits.set(a, hops.get(`${vpcId}/${a}`) ?? DEFAULT_HOP_LIMIT);
      vpcs.push({
        vpcId,
        transit,
        subnets,
        nat: !!nat,
        natSources: nat?.sources ?? [],
        natAddress,
        natRole: !natAddress ? undefined : holder === this.opts.hostId ? "holder" : holder ? "steer" : "none",
        natCidrs: nat && natAddress ? await this.natCidrs(vpcId, nat.sources) : [],
        overlayIf: wgName(this.opts.hostId, vpcId),
        fips: fips
          .filter((f) => f.vpcId === vpcId && f.hostId === this.opts.hostId && localAddrs.has(f.private))
          .map((f) => ({ address: f.address, private: f.private })),
        forwards: pfs
          .filter((p) => p.vpcId === vpcId && p.hostId === this.opts.hostId && localAddrs.has(p.private))
          .map((p) => ({ proto: p.proto, outsidePort: p.outsidePort, private: p.private, privatePort: p.privatePort })),
        hopLimits,
        resolver: await this.resolverOf(vpcId),
      });
    }
    // Leases of VPCs no longer here (or no longer with a NAT address) are given up.
    this.pendingSeen = {
      vpcs: new Set(d.vpcs.keys()),
      nics: new Map([...d.nics].map(([id, n]) => [id, { vpcId: n.vpcId, address: n.address }])),
      special: new Set([
        ...fips.filter((f) => f.hostId === this.opts.hostId).map((f) => `${f.vpcId}/${f.private}`),
        ...pfs.filter((p) => p.hostId === this.opts.hostId).map((p) => `${p.vpcId}/${p.private}`),
        ...[...hops].filter(([, h]) => h !== DEFAULT_HOP_LIMIT).map(([k]) => k),
      ]),
    };
    const natHere = new Set(vpcs.filter((v) => v.natAddress).map((v) => v.vpcId));
    this.natAddrs = new Map(vpcs.filter((v) => v.natAddress).map((v) => [v.vpcId, v.natAddress!]));
    for (const id of [...this.natVpcs]) if (!natHere.has(id)) await this.unleaseNat(id);
    this.natVpcs = natHere;
    return {
      hostId: this.opts.hostId,
      uplink: this.opts.uplink,
      imdsPort: this.opts.imdsPort,
      dnsPort: this.opts.dnsPort ?? 0,
      pool: this.opts.pool,
      reservedPorts: this.opts.reservedPorts,
      managementCidrs: (await this.opts.managementCidrs?.()) ?? [],
      vpcs,
    };
  }

  /** VPCs whose last apply failed: retried with backoff, the others converge meanwhile. */
  readonly vpcFailures = new Map<string, { count: number; retryAt: number; error: string }>();

  /** Whether a failed VPC's retry is due. */
  private retryDue(now = Date.now()): boolean {
    for (const f of this.vpcFailures.values()) if (f.retryAt <= now) return true;
    return false;
  }

  /** Forgets what is known applied for one VPC: it is checked afresh on its next apply. */
  private forgetVpc(vpcId: string): void {
    this.lastVpc.delete(vpcId);
    this.lastRoutes.delete(vpcId);
    this.lastResolver.delete(vpcId);
    this.lastSteer.delete(vpcId);
  }

  /**
   * Frees the transit index of a VPC that left this host: only once its
   * namespace and its transit link are gone (until then the index still
   * names a live link). Removes its policy rule and the uplink's proxy
   * entries and /32 routes it had. True when nothing of it is left.
   */
  private async releaseTransit(vpcId: string): Promise<boolean> {
    if (/^vpc-[0-9a-f]{12}$/.test(vpcId) && this.nsExists(naNames.netns(this.opts.hostId, vpcId))) return false;
    if (await this.kernel.hostLinkExists(names.hostSide(vpcId))) return false;
    const k = await this.store.releaseTransit(this.opts.hostId, vpcId);
    const undo = transitReleaseLines(this.lastRoutes.get(vpcId) ?? [], k);
    if (undo.length) await this.kernel.hostBatch(undo, true);
    if (k !== undefined) this.log.info({ vpc: vpcId, transit: k }, "gateway: VPC left this host; its transit index is free again");
    return true;
  }

  /** Transit link, resolver address, routes and nft of one VPC. Throws on the first failure. */
  private async applyVpc(v: GwVpc, fresh: boolean): Promise<void> {
    const vns = naNames.netns(this.opts.hostId, v.vpcId);
    const known = !fresh && this.lastVpc.has(v.vpcId);
    if (!known) {
      if (!(await this.kernel.hostLinkExists(names.hostSide(v.vpcId)))) {
        const lines = transitCreateLines(this.opts.hostId, v, vns);
        await this.kernel.hostBatch(lines.host);
        await this.kernel.vpcBatch(vns, lines.vpc);
        this.forgetVpc(v.vpcId);
      } else {
        // The link is there, but a create that failed half-way (or someone
        // else) may have left either side unconfigured: set it again.
        const lines = transitRepairLines(this.opts.hostId, v, vns);
        await this.kernel.hostBatch(lines.host);
        await this.kernel.vpcBatch(vns, lines.vpc);
      }
    }
    if (!known || !this.lastResolver.has(v.vpcId) || this.lastResolver.get(v.vpcId) !== v.resolver) {
      // Only addresses carrying our label are read and removed.
      const lines = resolverAddrLines(await this.kernel.vpcLoAddrs(vns, RESOLVER_LABEL), v.resolver);
      if (lines.length) await this.kernel.vpcBatch(vns, lines);
      this.lastResolver.set(v.vpcId, v.resolver);
    }
    const routes = vpcHostLines(v, this.opts.uplink);
    const wasHolder = (this.lastRoutes.get(v.vpcId) ?? []).some((l) => v.natAddress && l === `neigh replace proxy ${v.natAddress} dev ${this.opts.uplink}`);
    // Not the holder, and nothing known applied (a restart): a proxy entry
    // or route this host left for the address when it held it goes.
    if (!known && v.natAddress && v.natRole !== "holder")
      await this.kernel.hostBatch([`neigh del proxy ${v.natAddress} dev ${this.opts.uplink}`, `route del ${v.natAddress}/32`], true);
    // Known applied: only the difference. Otherwise (start, after an error,
    // the drift pass) all of it again, so a route or proxy entry deleted
    // behind our back comes back.
    const last = this.lastRoutes.get(v.vpcId);
    const lines = known ? hostRouteDiff(routes, last) : [...undoHostLines(last ?? [], routes), ...routes];
    if (lines.length) {
      await this.kernel.hostBatch(lines, true);
      this.lastRoutes.set(v.vpcId, routes);
    }
    const steerKey = JSON.stringify([v.natAddress, v.natRole, v.natCidrs, v.overlayIf]);
    if (!known || this.lastSteer.get(v.vpcId) !== steerKey) {
      const { del, add } = natSteerLines(v.natAddress || this.lastSteer.has(v.vpcId) || !known ? await this.kernel.vpcRules(vns) : [], v);
      if (del.length) await this.kernel.vpcBatch(vns, del, true);
      if (add.length) await this.kernel.vpcBatch(vns, add);
      if (v.natAddress) this.lastSteer.set(v.vpcId, steerKey);
      else this.lastSteer.delete(v.vpcId);
    }
    const tx = vpcTx(v, this.opts.imdsPort, this.opts.dnsPort ?? 0, this.opts.conntrackLimitPerVm ?? 0);
    const text = render(tx);
    if (this.lastVpc.get(v.vpcId) !== text) {
      await this.kernel.apply(vns, tx);
      applies.inc({ where: "vpc", result: "ok" });
      this.lastVpc.set(v.vpcId, text);
    }
    // Just took the address: the uplink's neighbours learn it moved here.
    if (v.natAddress && v.natRole === "holder" && !wasHolder && this.kernel.announce) {
      const err = await this.kernel.announce(this.opts.uplink, v.natAddress);
      if (!err) this.log.info({ vpc: v.vpcId, address: v.natAddress }, "gateway: announced the NAT gateway's address on the uplink (unsolicited ARP)");
      else
        this.log.warn(
          { vpc: v.vpcId, address: v.natAddress, err },
          "gateway: cannot announce the NAT gateway's address (arping -U needs iputils-arping and net.ipv4.ip_nonlocal_bind=1 in the uplink's namespace); neighbours learn it at their next ARP request",
        );
    }
  }

  async syncOnce(force = false): Promise<void> {
    const hns = this.opts.hostNetns;
    try {
      const h = await this.desired();
      if (force) {
        this.lastHost = "";
        this.lastVpc.clear();
        this.lastResolver.clear();
      }
      // Kernel checks only when nothing is known to be applied (start, after
      // an error, the drift pass): a change need not pay an exec for each.
      const fresh = this.lastHost === "";
      // A VPC that left this host (its namespace, and the transit link with
      // it, gone) is checked afresh if it comes back.
      // Its transit index is freed once its namespace and link are gone; the
      // drift pass (fresh) also frees indexes no VPC here uses (a VPC that
      // left while the gateway was down).
      const here = new Set(h.vpcs.map((v) => v.vpcId));
      for (const id of [...this.lastVpc.keys(), ...this.vpcFailures.keys()]) if (!here.has(id)) this.leaving.add(id);
      if (fresh) for (const id of (await this.store.transitMap(this.opts.hostId)).keys()) if (!here.has(id)) this.leaving.add(id);
      for (const id of [...this.leaving]) {
        if (here.has(id)) {
          this.leaving.delete(id);
          continue;
        }
        this.lastVpc.delete(id);
        this.lastResolver.delete(id);
        this.vpcFailures.delete(id);
        // Its routes stay known until released: their undo needs them.
        if (await this.releaseTransit(id)) {
          this.leaving.delete(id);
          this.lastRoutes.delete(id);
        }
      }
      if (fresh) await this.kernel.enableForwarding();
      // Each VPC on its own: one that fails (a device in the way, a bad
      // record) is logged, counted and retried with backoff, and every other
      // tenant's NAT, floating IPs and metadata keep converging.
      const now = Date.now();
      for (const v of h.vpcs) {
        const failed = this.vpcFailures.get(v.vpcId);
        if (failed && failed.retryAt > now && !force) continue;
        try {
          await this.applyVpc(v, fresh);
          if (failed) this.log.info({ vpc: v.vpcId, attempts: failed.count }, "gateway: VPC applied again after failures");
          this.vpcFailures.delete(v.vpcId);
        } catch (err) {
          applies.inc({ where: "vpc", result: "error" });
          const count = (failed?.count ?? 0) + 1;
          const delayMs = Math.min(VPC_RETRY_MAX_MS, VPC_RETRY_BASE_MS * 2 ** Math.min(count - 1, 10));
          const error = (err as Error).message;
          this.vpcFailures.set(v.vpcId, { count, retryAt: Date.now() + delayMs, error });
          this.forgetVpc(v.vpcId);
          this.log.error({ vpc: v.vpcId, err: error, attempts: count, retryInMs: delayMs }, "gateway: applying a VPC failed; the others go on, retrying it");
        }
      }
      const tx = hostTx(h);
      const text = render(tx);
      if (text !== this.lastHost) {
        try {
          await this.kernel.apply(hns, tx);
          applies.inc({ where: "host", result: "ok" });
        } catch (e) {
          applies.inc({ where: "host", result: "error" });
          throw e;
        }
        this.lastHost = text;
      }
      this.status = { lastApplyMs: Date.now(), lastError: "" };
      this.seen = this.vpcFailures.size === 0 ? this.pendingSeen : undefined;
    } catch (err) {
      this.seen = undefined;
      this.status = { lastApplyMs: Date.now(), lastError: (err as Error).message };
      this.log.error({ err: (err as Error).message }, "gateway sync failed; retrying");
      this.lastHost = "";
      this.lastVpc.clear();
      this.lastResolver.clear();
    }
  }

  kick(): void {
    this.loop.kick();
  }

  /** The first pass, then a pass on each change event; every driftMs a pass that checks the kernel afresh. */
  start(redis: Redis, driftMs: number): void {
    this.loop.start(redis, driftMs);
    this.leaseStopped = false;
    const tick = () => {
      if (this.leaseStopped) return;
      this.leaseTimer = setTimeout(() => void this.leaseTick().finally(tick), Math.max(100, Math.floor(this.natLeaseMs / 3)));
      this.leaseTimer.unref();
    };
    tick();
  }

  stop(): void {
    this.loop.stop();
    this.leaseStopped = true;
    clearTimeout(this.leaseTimer);
    this.leaseTimer = undefined;
  }

  /** The loop's reconcile health (readiness: first whole pass applied, the last one recent). */
  get health() {
    return this.loop.health!;
  }

  /** vpcId of a host-side transit address, for the metadata server. */
  static vpcOfTransit(map: Map<string, number>, local: string): string | undefined {
    for (const [vpcId, k] of map) if (transitAddrs(k).host === local) return vpcId;
    return undefined;
  }
}
