// The gateway's per-hypervisor loop: builds this host's HostGw from Redis
// (the netagent's VPCs and subnets here, NAT gateways, floating IPs and port
// forwards of local NICs, IMDS hop limits) and applies it: transit links and
// routes with `ip -batch`, one nft transaction per namespace. Re-applies only
// what changed; follows the change events; a periodic pass repairs drift.
import { existsSync } from "node:fs";
import type { Redis } from "ioredis";
import ipaddr from "ipaddr.js";
import type { Logger } from "pino";
import { Counter } from "prom-client";
import { followEvents } from "../common/events.js";
import { run } from "../common/exec.js";
import { reportInvalid } from "../common/invalid-records.js";
import * as V from "../common/validate.js";
import { metricsRegistry } from "../common/metrics.js";
import { defaultResolver, DnsStore } from "../dns/store.js";
import type { IpamStore } from "../ipam/store.js";
import { names as naNames } from "../netagent/plan.js";
import type { HostStore } from "../netagent/store.js";
import {
  hostNft,
  hostRouteLines,
  names,
  RESOLVER_LABEL,
  resolverAddrLines,
  transitAddrs,
  transitCreateLines,
  vpcNft,
  type GwVpc,
  type HostGw,
  type PortRanges,
} from "./plan.js";
import { OWNER, parseGwSubnet } from "./schema.js";
import type { GatewayStore } from "./store.js";

const applies = new Counter({
  name: "microvpc_gateway_applies_total",
  help: "Gateway kernel updates by namespace kind (host, vpc) and result.",
  labelNames: ["where", "result"] as const,
  registers: [metricsRegistry],
});

/** An `ip -batch -` run: the batch's first lines go into the error (ip names only the failing line's number). */
const batch = (lines: string[], netns = "") => ({ input: lines.join("\n") + "\n", inputInError: true, netns });

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
  /** Ports the hypervisor serves itself: never port-forwarded. */
  reservedPorts?: PortRanges;
  /** Flows a VM may hold through the host's NAT at once (0: no limit). */
  conntrackLimitPerVm?: number;
  /** The management CIDRs now (read each pass: "auto" follows the host's addresses); unset: none. */
  managementCidrs?: () => Promise<string[]>;
}

export class GatewaySync {
  status = { lastApplyMs: 0, lastError: "" };
  private lastHost = "";
  private lastVpc = new Map<string, string>();
  private lastRoutes = new Map<string, string[]>();
  private lastResolver = new Map<string, string | undefined>();
  private readonly dns: DnsStore;
  private pending = true;
  private stopped = false;
  private wake?: () => void;

  constructor(
    readonly store: GatewayStore,
    readonly ipam: IpamStore,
    readonly host: HostStore,
    readonly opts: GatewaySyncOptions,
    readonly log: Logger,
  ) {
    this.dns = new DnsStore(ipam.redis, log);
  }

  /** The VPC's resolver address, if the resolver is on. */
  private async resolverOf(vpcId: string): Promise<string | undefined> {
    if (!this.opts.dnsPort) return undefined;
    // DnsStore checks the stored config (dns/schema.ts); a bad one reads as unset.
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
      reportInvalid(OWNER, "vpc", key, (err as Error).message, this.log);
      return undefined;
    }
  }

  /** Whether IPAM says the subnet is public; a record that cannot be read is private (no egress). */
  private async subnetPublic(subnetId: string): Promise<boolean> {
    try {
      return (await this.ipam.getSubnet(subnetId))?.type === "public";
    } catch (err) {
      reportInvalid(OWNER, "subnet", `mvpc:subnet:${subnetId}`, (err as Error).message, this.log);
      return false;
    }
  }

  async desired(): Promise<HostGw> {
    const d = await this.host.load();
    const [nats, fips, pfs, hops] = await Promise.all([this.store.listNats(), this.store.listFips(), this.store.listPfs(), this.opts.hopLimits()]);
    const vpcs: GwVpc[] = [];
    for (const vpcId of d.vpcs.keys()) {
      if (!/^vpc-[0-9a-f]{12}$/.test(vpcId) || !existsSync(`/run/netns/${naNames.netns(this.opts.hostId, vpcId)}`)) continue;
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
          reportInvalid(OWNER, "subnet", `netagent subnet ${s.subnetId}`, p.reason, this.log);
          continue;
        }
        subnets.push({ ...p.value, public: await this.subnetPublic(s.subnetId) });
      }
      const nat = nats.find((n) => n.vpcId === vpcId);
      const localAddrs = new Set([...d.nics.values()].filter((n) => n.vpcId === vpcId && ipaddr.IPv4.isValidFourPartDecimal(n.address)).map((n) => n.address));
      const hopLimits = new Map<string, number>();
      for (const a of localAddrs) hopLimits.set(a, hops.get(`${vpcId}/${a}`) ?? 1);
      vpcs.push({
        vpcId,
        transit,
        subnets,
        nat: !!nat,
        natSources: nat?.sources ?? [],
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
      for (const id of [...this.lastVpc.keys()]) {
        if (!h.vpcs.some((v) => v.vpcId === id)) {
          this.lastVpc.delete(id);
          this.lastRoutes.delete(id);
          this.lastResolver.delete(id);
        }
      }
      if (fresh) await run("sysctl", ["-q", "-w", "net.ipv4.ip_forward=1"], { netns: hns });
      for (const v of h.vpcs) {
        const vns = naNames.netns(this.opts.hostId, v.vpcId);
        const hostIf = names.hostSide(v.vpcId);
        const known = !fresh && this.lastVpc.has(v.vpcId);
        if (!known && (await run("ip", ["-j", "link", "show", "dev", hostIf], { netns: hns, check: false })).exitCode !== 0) {
          const lines = transitCreateLines(this.opts.hostId, v, vns);
          await run("ip", ["-batch", "-"], batch(lines.host, hns));
          await run("ip", ["-n", vns, "-batch", "-"], batch(lines.vpc));
          this.lastVpc.delete(v.vpcId);
          this.lastRoutes.delete(v.vpcId);
          this.lastResolver.delete(v.vpcId);
        }
        if (!known || !this.lastResolver.has(v.vpcId) || this.lastResolver.get(v.vpcId) !== v.resolver) {
          // Only addresses carrying our label are read and removed.
          const { stdout: out } = await run("ip", ["-n", vns, "-j", "addr", "show", "dev", "lo"]);
          const present = ((JSON.parse(out || "[]") as { addr_info?: { local: string; label?: string; family: string }[] }[])[0]?.addr_info ?? [])
            .filter((a) => a.family === "inet" && a.label === RESOLVER_LABEL)
            .map((a) => a.local);
          const lines = resolverAddrLines(present, v.resolver);
          if (lines.length) await run("ip", ["-n", vns, "-batch", "-"], batch(lines));
          this.lastResolver.set(v.vpcId, v.resolver);
        }
        // Routes and the policy rule: replace is idempotent; -force skips a missing rule on delete.
        const t = transitAddrs(v.transit);
        const routes = [
          `rule del pref ${names.rulePref(v.transit)}`,
          `rule add from ${t.host} lookup ${names.table(v.transit)} pref ${names.rulePref(v.transit)}`,
          ...hostRouteLines(v, this.opts.uplink),
        ];
        const prev = this.lastRoutes.get(v.vpcId) ?? [];
        const gone = prev.filter((l) => l.startsWith("neigh replace proxy") || (l.startsWith("route replace") && l.includes("/32")));
        const stale = gone
          .filter((l) => !routes.includes(l))
          .map((l) =>
            l.startsWith("neigh") ? l.replace("neigh replace proxy", "neigh del proxy") : l.replace("route replace", "route del").replace(/ via .*$/, ""),
          );
        if (JSON.stringify(prev) !== JSON.stringify(routes)) {
          await run("ip", ["-force", "-batch", "-"], { ...batch([...stale, ...routes], hns), check: false });
          this.lastRoutes.set(v.vpcId, routes);
        }
        const text = vpcNft(v, this.opts.imdsPort, this.opts.dnsPort ?? 0, this.opts.conntrackLimitPerVm ?? 0);
        if (this.lastVpc.get(v.vpcId) !== text) {
          try {
            await run("ip", ["netns", "exec", vns, "nft", "-f", "-"], { input: text });
            applies.inc({ where: "vpc", result: "ok" });
          } catch (e) {
            applies.inc({ where: "vpc", result: "error" });
            throw e;
          }
          this.lastVpc.set(v.vpcId, text);
        }
      }
      const text = hostNft(h);
      if (text !== this.lastHost) {
        try {
          await run("nft", ["-f", "-"], { netns: hns, input: text });
          applies.inc({ where: "host", result: "ok" });
        } catch (e) {
          applies.inc({ where: "host", result: "error" });
          throw e;
        }
        this.lastHost = text;
      }
      this.status = { lastApplyMs: Date.now(), lastError: "" };
    } catch (err) {
      this.status = { lastApplyMs: Date.now(), lastError: (err as Error).message };
      this.log.error({ err: (err as Error).message }, "gateway sync failed; retrying");
      this.lastHost = "";
      this.lastVpc.clear();
      this.lastResolver.clear();
    }
  }

  kick(): void {
    this.pending = true;
    this.wake?.();
  }

  start(redis: Redis, driftMs: number): void {
    void (async () => {
      let last = 0;
      while (!this.stopped) {
        const drift = Date.now() - last > driftMs;
        if (this.pending || drift) {
          this.pending = false;
          await this.syncOnce(drift && last !== 0);
          if (drift) last = Date.now();
          // A failed pass is retried soon, not at the next drift check.
          if (this.status.lastError) this.pending = true;
        }
        // A change that arrived during the pass is applied at once.
        if (this.pending) continue;
        await new Promise<void>((r) => {
          this.wake = r;
          setTimeout(r, 500).unref();
        });
      }
    })();
    void followEvents(
      redis,
      /^(gw\.|nic\.|subnet\.|vpc\.|dns\.config)/,
      () => this.kick(),
      () => this.stopped,
    );
  }

  stop(): void {
    this.stopped = true;
    this.wake?.();
  }

  /** vpcId of a host-side transit address, for the metadata server. */
  static vpcOfTransit(map: Map<string, number>, local: string): string | undefined {
    for (const [vpcId, k] of map) if (transitAddrs(k).host === local) return vpcId;
    return undefined;
  }
}
