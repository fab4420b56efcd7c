// The WireGuard overlay between hypervisors: one WireGuard interface per VPC
// on each host, a full mesh between the hosts of that VPC. This module is
// its reconcile loop; the parts it ties together read top-down:
// - keyfile.ts: this host's key pair (only the public key leaves the host);
// - registry.ts: the host records, memberships and address claims in Redis,
//   validated on the way out (a bad record of another host is skipped and
//   reported, never fatal);
// - claims.ts: which claimed NIC addresses go to which host;
// - plan.ts (pure): peers, allowed-ips, `wg set` arguments, /32 routes, MTU;
// - wg.ts: the interfaces' life cycle and state files, through wgkernel.ts
//   (the overlay's commands) and ../kernel.ts.
//
// The host's record has a lease of leaseMs, renewed every refreshMs. A VPC's
// interface gets one peer per other live member host, a /32 route per remote
// NIC in the VPC namespace, and proxy ARP on the subnet bridges, so a VM
// ARPing for a same-subnet VM on another host gets the bridge's MAC.
// Changes travel as events on mvpc:events (nic.*, overlay.*, host.*): every
// host re-reads the registry when one arrives, and every syncMs anyway
// (lease expiry makes no event). While Redis is unreachable nothing is
// removed: the last applied configuration keeps forwarding.
import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import type { Redis } from "ioredis";
import type { Logger } from "pino";
import type { Agent } from "../agent.js";
import { names } from "../plan.js";
import type { InvalidRecord } from "../schema.js";
import { reportInvalid } from "../../common/invalid-records.js";
import * as V from "../../common/validate.js";
import { verifyClaims, type RejectedClaim } from "./claims.js";
import { keyFileIn, loadOrCreateKey, newKey } from "./keyfile.js";
import { gwKeys, parseNat, parseNatHolder } from "../../gateway/schema.js";
import {
  allowedWithin,
  evidenceHosts,
  keepDuringOutage,
  nominate,
  overlayMtu,
  peerArgs,
  peersOf,
  routeLines,
  withNatHolder,
  withVpnRange,
  type PeerWant,
} from "./plan.js";
import { OverlayRegistry, type HostRecord, type SkippedHost } from "./registry.js";
import { WgInterfaces, selectImplementation, wgName, type Dump, type WgImpl, type WgMode } from "./wg.js";
import { vpnRoute } from "../vpn/schema.js";
import { WgKernel, type WgCommands, type WgLogLevel, type WgProbe } from "./wgkernel.js";

export interface OverlayOptions {
  hostId: string;
  /** Namespace holding the underlay ("" = the agent's own). */
  hostNetns: string;
  /** This host's underlay address; default the first global address of underlayInterface. */
  underlayAddress?: string;
  underlayInterface: string;
  stateDir: string;
  leaseMs?: number;
  refreshMs?: number;
  syncMs?: number;
  agentVersion?: string;
  /** Which WireGuard to use (default "auto": the kernel module when usable). */
  wireguard?: WgMode;
  /** For tests: replaces the kernel probe. */
  probe?: WgProbe;
  /** For tests: replaces the commands that make, move, configure and read WireGuard interfaces. */
  commands?: WgCommands;
  /** wireguard-go's log level (--wireguard-log; default "error"), to DIR/wg/<interface>.log. */
  wireguardLog?: WgLogLevel;
}

export class Overlay {
  readonly leaseMs: number;
  readonly refreshMs: number;
  readonly syncMs: number;
  readonly dir: string;
  readonly keyFile: string;
  publicKey = "";
  keyCreatedMs = 0;
  registeredMs = 0;
  address = "";
  underlayMtu = 0;
  mtu = 0;
  /** Last applied peers per VPC (what is kept while Redis is away). */
  readonly applied = new Map<string, PeerWant[]>();
  readonly ports = new Map<string, number>();
  lastError = "";
  /** Why new interfaces get the implementation they get. */
  implWhy = "";
  /** Address claims not installed, with the reason, per VPC (claims.ts). */
  readonly rejected = new Map<string, RejectedClaim[]>();
  /** Registry records or member entries of other hosts that were skipped, with the reason, per VPC. */
  readonly skipped = new Map<string, SkippedHost[]>();
  readonly fullEveryMs = 30_000;
  /** Each (host, reason) is logged once, not every sync. */
  private readonly loggedSkips = new Set<string>();
  /** When a Redis read last failed (0 = never). */
  private redisFailMs = 0;
  /** Per VPC, why its last read of the registry failed (the applied peers were kept), until a read succeeds. */
  private readonly readFailures = new Map<string, string>();
  /** Per VPC, why its last pass failed. */
  private readonly failures = new Map<string, string>();
  private stopped = false;
  private timers: NodeJS.Timeout[] = [];
  private running?: Promise<void>;
  private dirty = false;
  private pendingFull = false;
  private readonly lastFull = new Map<string, { ms: number; port: number; key: string }>();
  private readonly proxyArpDone = new Set<string>();
  private mutex: Promise<unknown> = Promise.resolve();
  private readonly wgk: WgKernel;
  private readonly interfaces: WgInterfaces;
  private readonly registry: OverlayRegistry;

  constructor(
    readonly agent: Agent,
    readonly redis: Redis,
    readonly opts: OverlayOptions,
    readonly log: Logger,
  ) {
    this.leaseMs = opts.leaseMs ?? 15_000;
    this.refreshMs = opts.refreshMs ?? 5_000;
    this.syncMs = opts.syncMs ?? 2_000;
    this.dir = join(opts.stateDir, opts.hostId);
    this.keyFile = keyFileIn(this.dir);
    this.wgk = new WgKernel(opts.commands, opts.wireguardLog);
    this.interfaces = new WgInterfaces(agent, this.wgk, this.dir, opts.hostNetns, log);
    this.registry = new OverlayRegistry(redis, opts.hostId);
  }

  get hostId(): string {
    return this.opts.hostId;
  }

  /** What new interfaces get (adopted ones keep theirs). */
  get impl(): WgImpl {
    return this.interfaces.impl;
  }
  set impl(v: WgImpl) {
    this.interfaces.impl = v;
  }

  /** Reads the underlay (address, MTU), loads or makes the key. Called once before start(). */
  async init(): Promise<void> {
    mkdirSync(join(this.dir, "wg"), { recursive: true, mode: 0o700 });
    const { hostNetns } = this.opts;
    const where = hostNetns ? ` in namespace ${hostNetns}` : "";
    let underlayInterface = this.opts.underlayInterface;
    if (underlayInterface === "auto") {
      underlayInterface = await this.wgk.underlayInterfaceFor(hostNetns, this.opts.underlayAddress);
      if (!underlayInterface) {
        throw new Error(
          `--underlay-interface auto: no interface${where} holds ${this.opts.underlayAddress ?? "the --underlay-address"} and there is no default route; give --underlay-interface`,
        );
      }
    }
    const l = await this.wgk.underlay(hostNetns, underlayInterface).catch((err: Error) => {
      throw new Error(
        `--underlay-interface ${underlayInterface}: no such device${where} (${err.message.split("\n")[0]}); give the interface that carries the underlay (see \`ip link\`)`,
      );
    });
    if (!l) throw new Error(`--underlay-interface ${underlayInterface}: no such device${hostNetns ? ` in ${hostNetns}` : ""}`);
    this.underlayMtu = l.mtu ?? 1500;
    this.address = this.opts.underlayAddress ?? (l.addr_info ?? []).find((a) => a.family === "inet" && a.scope === "global")?.local ?? "";
    if (!this.address) throw new Error(`${underlayInterface} has no global IPv4 address; give --underlay-address`);
    this.mtu = overlayMtu(this.underlayMtu, this.address);
    const sel = await selectImplementation(this.opts.wireguard ?? "auto", this.opts.probe ?? this.wgk.probe(hostNetns));
    this.impl = sel.impl;
    this.implWhy = sel.why;
    const key = await loadOrCreateKey(this.dir, this.wgk);
    this.publicKey = key.publicKey;
    this.keyCreatedMs = key.createdMs;
    this.registeredMs = Date.now();
  }

  record(): HostRecord {
    return {
      id: this.hostId,
      publicKey: this.publicKey,
      address: this.address,
      mtu: this.mtu,
      underlayMtu: this.underlayMtu,
      vpcIds: this.vpcIds(),
      registeredMs: this.registeredMs,
      keyCreatedMs: this.keyCreatedMs,
      agentVersion: this.opts.agentVersion ?? "",
    };
  }

  /** The VPCs this host holds, as its record lists them. */
  private vpcIds(): string[] {
    return [...this.agent.desired.vpcs.keys()].sort();
  }

  /** Whether the VPCs held now are not those the record last published. */
  private vpcsChanged(): boolean {
    return this.vpcIds().join(",") !== this.publishedVpcs;
  }

  /** Renews the lease; announces the host when the record was missing or changed key. */
  async publish(kind?: string): Promise<void> {
    const rec = this.record();
    await this.registry.publish(rec, this.leaseMs, kind);
    this.publishedVpcs = rec.vpcIds.join(",");
    // The VPCs changed while it was on its way (a first pass racing the first publish).
    if (this.vpcsChanged()) this.noteVpcs();
  }

  /** The VPCs the record last published listed (null: not published since start()). */
  private publishedVpcs: string | null = null;
  private republishing: Promise<void> = Promise.resolve();

  /**
   * The VPCs this host holds changed (its first pass after a start, a VPC
   * made or removed here): the record is published again at once when the
   * list it carries differs, so ListHosts/GetHost show them now rather than
   * at the next lease renewal (refreshMs). One at a time; a failure is left
   * to that renewal.
   */
  noteVpcs(): void {
    if (this.stopped || this.publishedVpcs === null) return;
    this.republishing = this.republishing.then(async () => {
      if (this.stopped || !this.vpcsChanged()) return;
      await this.publish().catch((err: Error) => this.log.debug({ err: err.message }, "cannot publish the host record's VPCs; the lease renewal will"));
    });
  }

  start(): void {
    let failing = false;
    const refresh = async () => {
      if (this.stopped) return;
      try {
        await this.publish();
        failing = false;
      } catch (err) {
        if (!failing) this.log.warn({ err: (err as Error).message }, "cannot renew the host lease; retrying");
        failing = true;
      }
      // While Redis is away, retry often: the lease must be back as soon as Redis is.
      if (!this.stopped) this.timers.push(setTimeout(refresh, failing ? 250 : this.refreshMs).unref());
    };
    const periodic = async () => {
      if (this.stopped) return;
      await this.syncAll(false);
      if (!this.stopped) this.timers.push(setTimeout(periodic, this.syncMs).unref());
    };
    void refresh().then(periodic);
    // A relevant event triggers a sync at once.
    void this.registry.watch(
      () => void this.syncAll(),
      () => this.stopped,
    );
  }

  async stop(): Promise<void> {
    this.stopped = true;
    for (const t of this.timers) clearTimeout(t);
    this.registry.closeWatch();
    await this.running?.catch(() => undefined);
    // Leaving gracefully: peers drop this host at once instead of after the lease.
    try {
      await this.registry.leaveHost();
    } catch {
      // the lease runs out by itself
    }
  }

  /** Serialises key changes and syncs. */
  private locked<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.mutex.then(fn, fn);
    this.mutex = p.catch(() => undefined);
    return p;
  }

  /**
   * Runs a sync now, or once more after the running one. `full` (events,
   * API calls) always compares the kernel; otherwise (timers) the kernel is
   * only read when Redis says something changed or every fullEveryMs.
   */
  syncAll(full = true): Promise<void> {
    this.pendingFull ||= full;
    if (this.running) {
      this.dirty = true;
      return this.running;
    }
    this.running = (async () => {
      for (let i = 0; i < 5; i++) {
        this.dirty = false;
        const f = this.pendingFull;
        this.pendingFull = false;
        await this.locked(() => this.syncOnce(f));
        if (!this.dirty || this.stopped) break;
      }
    })().finally(() => (this.running = undefined));
    return this.running;
  }

  private async syncOnce(full: boolean): Promise<void> {
    const errors: string[] = [];
    const vpcs = [...this.agent.desired.vpcs.keys()];
    for (const vpcId of vpcs) {
      if (this.stopped) return;
      if (!existsSync(`/run/netns/${this.agent.nsOf(vpcId)}`)) continue;
      try {
        await this.agent.withLock(vpcId, () => this.syncVpc(vpcId, full));
        this.failures.delete(vpcId);
      } catch (err) {
        this.failures.set(vpcId, (err as Error).message);
      }
    }
    for (const vpc of new Set([...this.failures.keys(), ...this.readFailures.keys()])) {
      if (!this.agent.desired.vpcs.has(vpc)) {
        this.failures.delete(vpc);
        this.readFailures.delete(vpc);
      } else errors.push(`${vpc}: ${this.syncError(vpc)}`);
    }
    // Interfaces of VPCs this host no longer has (only judged on a state read from Redis).
    for (const f of this.agent.loaded ? this.interfaces.list() : []) {
      const vpc = f.vpcId;
      if (!vpc || this.agent.desired.vpcs.has(vpc)) continue;
      await this.agent
        .withLock(vpc, async () => {
          if (this.agent.desired.vpcs.has(vpc) || (await this.agent.store.hasVpc(vpc))) return;
          await this.teardown(vpc);
        })
        .catch((err) => errors.push(`${vpc}: ${(err as Error).message}`));
    }
    this.lastError = errors.join("; ");
    if (this.lastError) this.log.warn({ err: this.lastError }, "overlay sync");
  }

  async syncVpc(vpcId: string, full = true): Promise<string[]> {
    const changes: string[] = [];
    const vns = this.agent.nsOf(vpcId);
    const last = this.lastFull.get(vpcId);
    const me = wgName(this.hostId, vpcId);
    if (!full && last && Date.now() - last.ms < this.fullEveryMs && last.key === this.publicKey && this.interfaces.alive(me)) {
      // Cheap pass: Redis only, no exec, unless something changed.
      try {
        const [mine, fresh] = await Promise.all([this.registry.member(vpcId), this.wantedPeers(vpcId)]);
        this.readFailures.delete(vpcId);
        if (mine === JSON.stringify({ port: last.port }) && JSON.stringify(fresh) === JSON.stringify(this.applied.get(vpcId))) return changes;
      } catch (err) {
        this.readFailed(vpcId, err);
        return changes;
      }
    }
    const { ifname, port, dump } = await this.ensureInterface(vpcId);
    let want = this.applied.get(vpcId);
    try {
      // Checked on every full pass, not only when the port changed (registry.join says why).
      if (await this.registry.join(vpcId, port)) changes.push(`joined overlay of ${vpcId} on port ${port}`);
      this.ports.set(vpcId, port);
      const fresh = await this.wanted(vpcId);
      this.readFailures.delete(vpcId);
      want = want && Date.now() - this.redisFailMs < this.refreshMs + 2000 ? keepDuringOutage(fresh.peers, want, fresh.members) : fresh.peers;
    } catch (err) {
      // Redis away: keep what was applied last.
      this.readFailed(vpcId, err);
      if (!want) throw err;
    }
    if (!want) return changes;
    const args = peerArgs(dump, want);
    if (args.length) {
      await this.interfaces.wg(ifname, ["set", ifname, ...args]);
      changes.push(`peers of ${ifname}: ${want.map((p) => p.hostId).join(",") || "none"}`);
    }
    this.applied.set(vpcId, want);
    this.lastFull.set(vpcId, { ms: Date.now(), port, key: this.publicKey });
    const routes = await this.agent.kernel.routes(vns, ["dev", ifname]);
    const lines = routeLines(
      ifname,
      routes.map((r) => r.dst),
      want,
    );
    if (lines.length) {
      await this.agent.kernel.ipBatch(vns, lines);
      changes.push(`${lines.length} route change(s) in ${vns}`);
    }
    // Proxy ARP on every subnet bridge: a VM ARPing for a remote VM of its
    // subnet gets the bridge's MAC, and the /32 route does the rest. Set as
    // the namespace default too, so a bridge made (or remade) later has it.
    if (!this.proxyArpDone.has(vns) || this.agent.subnetsOf(vpcId).some((s) => !this.proxyArpDone.has(`${vns}/${s.subnetId}`))) {
      const subnets = this.agent.subnetsOf(vpcId);
      const links = new Set((await this.agent.kernel.links(vns)).map((l) => l.ifname));
      const present = subnets.filter((s) => links.has(names.bridge(s.subnetId)));
      await this.agent.kernel.sysctls(vns, [
        ["net.ipv4.conf.default.proxy_arp", "1"],
        ...present.map((s): [string, string] => [`net.ipv4.conf.${names.bridge(s.subnetId)}.proxy_arp`, "1"]),
      ]);
      this.proxyArpDone.add(vns);
      for (const s of present) this.proxyArpDone.add(`${vns}/${s.subnetId}`);
    }
    if (changes.length) this.log.info({ vpc: vpcId, changes }, "overlay");
    return changes;
  }

  /** Makes sure the VPC's interface runs, sits in the VPC namespace, is up with the right key and MTU. */
  async ensureInterface(vpcId: string): Promise<{ ifname: string; port: number; dump: Dump }> {
    const ifname = wgName(this.hostId, vpcId);
    const r = await this.interfaces.ensure(vpcId, ifname, { mtu: this.mtu, publicKey: this.publicKey, keyFile: this.keyFile });
    return { ifname, ...r };
  }

  /** Desired peers of one VPC from Redis; throws if Redis cannot be read. */
  async wantedPeers(vpcId: string): Promise<PeerWant[]> {
    return (await this.wanted(vpcId)).peers;
  }

  /** wantedPeers, and the VPC's member hosts read with them (keepDuringOutage keeps members only). */
  private async wanted(vpcId: string): Promise<{ peers: PeerWant[]; members: string[] }> {
    // A peered VPC's NICs ride this VPC's tunnel to their host (peering-plan.ts): they join that host's allowed-ips.
    const routed = this.agent.peering?.routedPeers(vpcId) ?? [];
    const [members, own, ...peerAddrs] = await Promise.all([
      this.registry.members(vpcId),
      this.registry.claims(vpcId),
      ...routed.map((r) => this.registry.claims(r.vpcId)),
    ]);
    // Every claim is checked (claims.ts says how) before it reaches `wg set` or a route.
    const memberHosts = Object.keys(members);
    const addrs: Record<string, string> = {};
    const rejected: RejectedClaim[] = [];
    const invalid: InvalidRecord[] = [];
    const mine = await this.registry.vpcCidr(vpcId);
    const sources = [{ vpcId, within: mine ? [mine] : [], allowed: null as V.Cidr[] | null, raw: own }];
    for (const [i, r] of routed.entries()) {
      const peer = await this.registry.vpcCidr(r.vpcId);
      sources.push({ vpcId: r.vpcId, within: peer ? [peer] : [], allowed: allowedWithin(peer, r.cidrs), raw: peerAddrs[i] });
    }
    for (const src of sources) {
      const r = await this.verifiedClaims(src.vpcId, src.within, src.allowed, src.raw, memberHosts);
      for (const [a, h] of r.accepted) addrs[a] = h;
      rejected.push(...r.rejected);
      for (const x of r.rejected)
        invalid.push({
          kind: "overlay-addr",
          key: this.registry.keys.overlayAddrs(src.vpcId),
          field: x.address,
          reason: `claimed by ${x.hostId}: ${x.reason}`,
        });
    }
    if (rejected.length)
      this.rejected.set(
        vpcId,
        rejected.sort((x, y) => x.address.localeCompare(y.address)),
      );
    else this.rejected.delete(vpcId);
    this.agent.invalid.report(`overlay:${vpcId}`, invalid);
    const others = memberHosts.filter((h) => h !== this.hostId).sort();
    if (others.length === 0) return { peers: [], members: memberHosts };
    const { hosts, skipped } = await this.registry.peerHosts(others, members);
    this.noteSkipped(vpcId, skipped);
    const vpn = mine ? await vpnRoute(this.redis, vpcId, mine.text) : null;
    return { peers: withVpnRange(withNatHolder(peersOf(hosts, this.publicKey, addrs), await this.natHolder(vpcId)), vpn), members: memberHosts };
  }

  /**
   * The host holding the VPC's NAT gateway address (gateway/sync.ts), if
   * another: the VPC has a NAT gateway with an address (its record checked
   * as the gateway API checks it) and the lease names a host id. Only a
   * registered member host has a peer at all, so a lease naming anything
   * else gets no route (withNatHolder).
   */
  async natHolder(vpcId: string): Promise<string | undefined> {
    const gw = gwKeys(this.redis);
    const [natId, lease] = await Promise.all([this.redis.hget(gw.vpcNat, vpcId), this.redis.get(gw.natLease(vpcId))]);
    if (!natId || lease === null || lease === this.hostId) return undefined;
    const holder = parseNatHolder(lease);
    if (!holder.ok) return undefined;
    const nat = parseNat(await this.redis.hgetall(gw.nat(natId)), natId);
    if (!nat.ok || nat.value.vpcId !== vpcId || !nat.value.address) return undefined;
    return holder.value;
  }

  /**
   * Where each NIC address of one VPC goes, from the evidence claims.ts
   * names (the addrs hash only nominates), as [address, host].
   */
  private async verifiedClaims(
    vpcId: string,
    within: V.Cidr[],
    allowed: V.Cidr[] | null,
    raw: Record<string, string>,
    memberHosts: string[],
  ): Promise<{ accepted: [string, string][]; rejected: RejectedClaim[] }> {
    const { claims, rejected, wanted } = nominate(this.hostId, raw, within, allowed);
    const ev = await this.registry.claimEvidence(vpcId, evidenceHosts(this.hostId, memberHosts, claims), within, wanted, claims.keys());
    if (!ev) return { accepted: [], rejected };
    const addresses = [...new Set([...claims.keys(), ...ev.indexed.keys()])];
    const local = new Set(this.agent.nicsOf(vpcId).map((n) => n.address));
    const r = verifyClaims(vpcId, addresses, claims, ev, local);
    return { accepted: r.accepted, rejected: [...rejected, ...r.rejected] };
  }

  /** Why the VPC's last pass did not finish, or its registry was not read (GetOverlayStatus sync_error); "" if neither. */
  syncError(vpcId: string): string {
    const read = this.readFailures.get(vpcId);
    return [this.failures.get(vpcId), read !== undefined ? `host registry not read, the peers applied before kept: ${read}` : undefined]
      .filter(Boolean)
      .join("; ");
  }

  /** A read of the registry failed: the grace of keepDuringOutage starts, and the reason stays visible (syncError) until a read succeeds. */
  private readFailed(vpcId: string, err: unknown): void {
    this.redisFailMs = Date.now();
    this.readFailures.set(vpcId, (err as Error).message ?? String(err));
  }

  /** Keeps the skipped hosts for GetOverlayStatus and logs each (host, reason) once. */
  private noteSkipped(vpcId: string, skipped: SkippedHost[]): void {
    if (skipped.length) this.skipped.set(vpcId, skipped);
    else this.skipped.delete(vpcId);
    for (const x of skipped) {
      const k = `${x.hostId}\0${x.reason}`;
      if (this.loggedSkips.has(k)) continue;
      if (this.loggedSkips.size > 10_000) this.loggedSkips.clear();
      this.loggedSkips.add(k);
      // Counted in microvpc_invalid_records_total too (logged below, once, as before).
      reportInvalid("netagent", "overlay-host", this.registry.keys.overlayHost(x.hostId), x.reason, undefined, { vpcId });
      this.log.warn(
        { vpc: vpcId, host: x.hostId, reason: x.reason },
        "skipping a malformed host registry entry: that host gets no peer until it publishes a valid record",
      );
    }
  }

  /** Forgets proxy ARP state so the next sync sets it again (e.g. after a bridge was recreated). */
  forgetBridges(vpcId: string): void {
    this.lastFull.delete(vpcId);
    const ns = this.agent.nsOf(vpcId);
    for (const k of [...this.proxyArpDone]) if (k === ns || k.startsWith(`${ns}/`)) this.proxyArpDone.delete(k);
  }

  /** Ends the VPC's wireguard-go (by its PID) or deletes its kernel device, removes the membership. */
  async teardown(vpcId: string): Promise<void> {
    await this.interfaces.remove(vpcId, wgName(this.hostId, vpcId));
    this.applied.delete(vpcId);
    this.ports.delete(vpcId);
    this.lastFull.delete(vpcId);
    this.forgetBridges(vpcId);
    try {
      await this.registry.leave(vpcId);
    } catch (err) {
      this.log.warn({ vpc: vpcId, err: (err as Error).message }, "cannot leave the overlay in Redis; the lease and the next sync clean up");
    }
  }

  /** New key pair, applied to every local interface, then published. */
  async rotate(): Promise<{ previous: string; rotatedMs: number }> {
    return this.locked(async () => {
      const previous = this.publicKey;
      const key = await newKey(this.dir, this.wgk);
      this.publicKey = key.publicKey;
      this.keyCreatedMs = key.createdMs;
      const rotatedMs = Date.now();
      for (const f of this.interfaces.list()) {
        if (!this.interfaces.alive(f.ifname)) continue;
        await this.interfaces.wg(f.ifname, ["set", f.ifname, "private-key", this.keyFile]);
      }
      await this.publish("host.rotated");
      this.log.info({ publicKey: this.publicKey }, "host key rotated");
      return { previous, rotatedMs };
    });
  }

  /** Hosts of the local VPCs whose latest handshake with us is after sinceMs. */
  async peersHandshakenSince(sinceMs: number): Promise<{ updated: string[]; pending: string[] }> {
    const updated = new Set<string>();
    const all = new Set<string>();
    for (const [vpcId, peers] of this.applied) {
      const d = await this.dump(wgName(this.hostId, vpcId));
      for (const p of peers) {
        all.add(p.hostId);
        const dp = d?.peers.find((x) => x.publicKey === p.publicKey);
        if (dp && dp.latestHandshakeS * 1000 >= sinceMs - 1000) updated.add(p.hostId);
      }
    }
    const pending = [...all].filter((h) => !updated.has(h)).sort();
    return { updated: [...updated].sort(), pending };
  }

  /** VPCs with a running interface here, known to the desired state or not (e.g. right after a restart). */
  runningVpcs(): string[] {
    return this.interfaces
      .list()
      .filter((f) => f.vpcId && this.interfaces.alive(f.ifname))
      .map((f) => f.vpcId);
  }

  dump(ifname: string): Promise<Dump | null> {
    return this.interfaces.dump(ifname);
  }

  /** The implementation behind an interface of this host. */
  implementationOf(ifname: string): WgImpl {
    return this.interfaces.implementationOf(ifname);
  }
}
