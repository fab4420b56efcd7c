// The netagent's reconciler: makes the kernel of this hypervisor match the
// desired state in Redis, one VPC namespace at a time, under a per-VPC lock
// shared with the API calls. It adopts what already exists, repairs drift,
// removes what it owns and nothing wants, and never touches the rest.
import { existsSync } from "node:fs";
import type { Logger } from "pino";
import { Counter, Gauge } from "prom-client";
import { ReconcileHealth } from "../common/health.js";
import { metricsRegistry } from "../common/metrics.js";
import { failClosedTx, FIREWALL_TABLE, firewallTablesIntact } from "../common/nft/fail-closed.js";
import { CtMarks } from "./ct-mark-state.js";
import { vpcNetnsSysctls, type Kernel } from "./kernel.js";
import { names, planVpc, type NicSpec, type SubnetSpec, type VpcPlan } from "./plan.js";
import { InvalidRecordLog } from "./schema.js";
import type { HostDesired, HostStore, VpcSpec } from "./store.js";

const reconciles = new Counter({
  name: "microvpc_netagent_reconciles_total",
  help: "Reconcile passes by result.",
  labelNames: ["result"] as const,
  registers: [metricsRegistry],
});
const repairs = new Counter({
  name: "microvpc_netagent_changes_total",
  help: "Kernel changes made by reconciles (creates, repairs, orphan removals).",
  registers: [metricsRegistry],
});
const nicsGauge = new Gauge({ name: "microvpc_netagent_nics", help: "NICs this host should have.", registers: [metricsRegistry] });

/**
 * What the reconciler needs of VPC peering (peering.ts's PeeringSync). An
 * interface, so that agent.ts and peering.ts do not import each other.
 */
export interface AgentPeering {
  lastError: string;
  readonly lastChanges: string[];
  /** Adds the VPCs a peering makes this host carry. */
  extend(desired: HostDesired): Promise<void>;
  sync(): Promise<string[]>;
  ack(): Promise<void>;
  /** For the overlay: the peers of a VPC whose NICs ride its tunnel, and the CIDRs allowed. */
  routedPeers(vpcId: string): { vpcId: string; cidrs: string[] }[];
  /** A pass soon if the VPC has peerings (for the API, when a VPC becomes held here). */
  kickIfPeered(vpcId: string): Promise<void>;
}

export interface AgentStatus {
  lastReconcileMs: number;
  lastError: string;
  lastChanges: string[];
  reconciles: number;
}

/**
 * A Map that counts its changes. The API handlers change the agent's desired
 * state in memory (under a VPC lock) right after writing it to Redis; a
 * reconcile pass that read Redis before such a write must not replace the
 * in-memory state with its older snapshot, or the change is forgotten (a
 * DetachNic by owner would then find nothing to detach).
 */
class TrackedMap<K, V> extends Map<K, V> {
  constructor(
    entries: Iterable<readonly [K, V]>,
    private readonly onChange?: () => void,
  ) {
    super(entries);
  }
  override set(k: K, v: V): this {
    this.onChange?.();
    return super.set(k, v);
  }
  override delete(k: K): boolean {
    this.onChange?.();
    return super.delete(k);
  }
  override clear(): void {
    this.onChange?.();
    super.clear();
  }
}

export class Agent {
  /** Bumped by every change to `desired` in memory. */
  private version = 0;
  private state: HostDesired = this.track({ vpcs: new Map(), subnets: new Map(), nics: new Map() });
  get desired(): HostDesired {
    return this.state;
  }
  set desired(d: HostDesired) {
    this.state = this.track(d);
  }
  private track(d: HostDesired): HostDesired {
    const bump = () => void this.version++;
    return { ...d, vpcs: new TrackedMap(d.vpcs, bump), subnets: new TrackedMap(d.subnets, bump), nics: new TrackedMap(d.nics, bump) };
  }
  status: AgentStatus = { lastReconcileMs: 0, lastError: "", lastChanges: [], reconciles: 0 };
  /** microvpc_reconcile_*{reconciler="netagent"} and readiness: the first whole pass succeeded, and recently. */
  readonly health = new ReconcileHealth("netagent", 10_000);
  readonly startedMs = Date.now();
  private locks = new Map<string, Promise<unknown>>();
  private timer?: NodeJS.Timeout;
  /** True once the desired state was read from Redis (orphans are only removed then). */
  loaded = false;
  /** The WireGuard overlay, when enabled (--overlay). */
  overlay?: { syncAll(full?: boolean): Promise<void>; teardown(vpcId: string): Promise<void>; forgetBridges(vpcId: string): void; noteVpcs(): void };
  /** VPC peering (services/netagent/peering.ts). */
  peering?: AgentPeering;
  /**
   * A namespace this agent creates forwards nothing until the firewall's
   * first pass replaces its tables (failClosedTx). False
   * (--open-until-firewall): no skeleton, the namespace forwards everything
   * until a firewall applies — for labs and tests without a firewall.
   */
  failClosed = true;

  /** Records read from Redis that failed validation (host state, overlay claims, peerings). */
  readonly invalid: InvalidRecordLog;

  constructor(
    readonly kernel: Kernel,
    readonly store: HostStore,
    readonly hostId: string,
    readonly log: Logger,
  ) {
    this.invalid = new InvalidRecordLog(log);
    this.marks = new CtMarks(kernel, log);
  }

  /** The NIC marks of each VPC namespace (ct-mark-state.ts). */
  readonly marks: CtMarks;

  nsOf(vpcId: string): string {
    return names.netns(this.hostId, vpcId);
  }

  /** Runs fn with the VPC's lock held: API calls and reconciles never interleave on one namespace. */
  async withLock<T>(vpcId: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(vpcId) ?? Promise.resolve();
    let release!: () => void;
    const mine = new Promise<void>((r) => (release = r));
    const chained = prev.then(() => mine);
    this.locks.set(vpcId, chained);
    await prev.catch(() => {});
    try {
      return await fn();
    } finally {
      release();
      if (this.locks.get(vpcId) === chained) this.locks.delete(vpcId);
    }
  }

  subnetsOf(vpcId: string): SubnetSpec[] {
    return [...this.desired.subnets.values()].filter((s) => s.vpcId === vpcId);
  }

  nicsOf(vpcId: string): NicSpec[] {
    return [...this.desired.nics.values()].filter((n) => n.vpcId === vpcId);
  }

  /** Bridges known to be right since the last ensure or reconcile: attach skips re-checking them. */
  readonly readyBridges = new Set<string>();

  /** VPC namespaces whose sysctls (vpcNetnsSysctls) this process has set: made here, or found at its first pass. */
  private readonly sysctlsSet = new Set<string>();

  async ensureNetns(vpcId: string): Promise<boolean> {
    const ns = this.nsOf(vpcId);
    // /run/netns/NAME is how iproute2 names a namespace: no exec needed.
    if (existsSync(`/run/netns/${ns}`)) {
      // One an earlier release made has IPv6 on (kernel.ts vpcNetnsSysctls): set them once per process.
      if (!this.sysctlsSet.has(ns)) {
        await this.kernel.sysctls(ns, vpcNetnsSysctls());
        this.sysctlsSet.add(ns);
      }
      return false;
    }
    await this.kernel.addNetns(ns);
    this.sysctlsSet.add(ns);
    // Before any bridge or NIC: nothing is forwarded until the firewall applies.
    // If this fails the namespace goes, so the next attempt starts afresh.
    // Its NIC-mark table too (ct-marks.ts), before any NIC.
    try {
      if (this.failClosed)
        await this.kernel.nft(ns, failClosedTx()).catch(async (err: Error) => {
          // The firewall's pass came first (failClosedTx): its tables hold the namespace already.
          if (!firewallTablesIntact(await this.kernel.nftTable(ns, "inet", FIREWALL_TABLE).catch(() => null))) throw err;
        });
      await this.marks.created(ns);
    } catch (err) {
      await this.kernel.delNetns(ns).catch(() => {});
      this.marks.forget(ns);
      throw err;
    }
    return true;
  }

  /** Plans and applies one VPC. Caller holds the lock. Returns the changes made. */
  async reconcileVpc(vpcId: string): Promise<string[]> {
    const ns = this.nsOf(vpcId);
    const created = await this.ensureNetns(vpcId);
    const [links, qdiscs] = await Promise.all([this.kernel.links(ns), this.kernel.qdiscs(ns)]);
    // A veth whose guest namespace is gone cannot be recreated; leave it for
    // DetachNic rather than failing the whole namespace's batch.
    const nics = this.nicsOf(vpcId).filter((n) => n.kind !== "veth" || existsSync(n.veth!.netnsPath) || links.some((l) => l.ifname === n.hostIf));
    const subnets = this.subnetsOf(vpcId);
    // Every desired NIC's mark (a missing one adopted), and no other, before any device is made.
    const markChanges = await this.marks.reconcile(
      ns,
      this.nicsOf(vpcId).map((n) => n.address),
      true,
    );
    const plan = planVpc(this.hostId, subnets, nics, links, qdiscs);
    for (const s of subnets) this.readyBridges.delete(s.subnetId);
    await this.apply(ns, plan);
    for (const s of subnets) this.readyBridges.add(s.subnetId);
    if (created) this.overlay?.forgetBridges(vpcId);
    const changes = [...(created ? [`create namespace ${ns}`] : []), ...markChanges, ...plan.changes];
    if (plan.ip.length || plan.tc.length || plan.guests.length) repairs.inc(plan.ip.length + plan.tc.length);
    return changes;
  }

  async apply(ns: string, plan: VpcPlan): Promise<void> {
    await this.kernel.ipBatch(ns, plan.ip, plan.guests);
    await this.kernel.tcBatch(ns, plan.tc);
  }

  /**
   * One full pass. If Redis cannot be read, the last known desired state is
   * used and nothing is removed: a host keeps forwarding while Redis is away.
   * Returns what failed ("" if nothing did): a pass that could not read the
   * desired state has not converged either.
   */
  async reconcileAll(): Promise<string> {
    let fresh = true;
    if (this.store.keys.cluster) {
      // Redis Cluster: NICs whose AttachNic ended before confirming their address claim (HostStore.discardPending),
      // before the read below, which leaves out those still pending.
      try {
        const { removed, failed } = await this.store.discardPending((vpcId, f) => this.withLock(vpcId, f));
        for (const nic of removed) {
          this.desired.nics.delete(nic);
          this.log.warn({ nic }, "a NIC whose attach did not finish is removed; its caller was answered with an error");
        }
        for (const f of failed) this.log.warn({ nic: f.nicId, err: f.error }, "cannot remove a NIC whose attach did not finish; the next pass tries again");
      } catch (err) {
        this.log.warn({ err: (err as Error).message }, "cannot read the pending NIC attaches; the next pass tries again");
      }
    }
    try {
      // Read again while an API call changed the in-memory state during the
      // read: the snapshot may predate its write. After a few tries (a
      // steady stream of calls), keep the in-memory state for this pass.
      for (let attempt = 1; ; attempt++) {
        const before = this.version;
        const desired = await this.store.load();
        this.invalid.report("host", desired.invalid ?? []);
        await this.peering?.extend(desired);
        if (this.version === before) {
          this.desired = desired;
          this.loaded = true;
          this.overlay?.noteVpcs();
          break;
        }
        if (attempt === 5) {
          this.log.info("desired state kept from memory this pass: API calls kept changing it during the read");
          break;
        }
      }
    } catch (err) {
      fresh = false;
      this.log.warn({ err: (err as Error).message }, "cannot read desired state; keeping the last known one");
    }
    nicsGauge.set(this.desired.nics.size);
    const changes: string[] = [];
    let error = "";
    for (const vpcId of this.desired.vpcs.keys()) {
      try {
        changes.push(...(await this.withLock(vpcId, () => this.reconcileVpc(vpcId))));
      } catch (err) {
        error = `${vpcId}: ${(err as Error).message}`;
        this.log.error({ vpc: vpcId, err: (err as Error).message }, "reconcile failed");
      }
    }
    const prefix = names.netnsPrefix(this.hostId);
    const wanted = new Set([...this.desired.vpcs.keys()].map((v) => this.nsOf(v)));
    // The namespace of a VPC whose record is invalid is not an orphan: kept, not touched.
    for (const x of this.invalid.all()) if (x.kind === "vpc" && /^vpc-[0-9a-f]{12}$/.test(x.field)) wanted.add(this.nsOf(x.field));
    const orphans = fresh ? (await this.kernel.listNetns()).filter((ns) => ns.startsWith(prefix) && !wanted.has(ns)) : [];
    // A host whose desired state is empty while its VPC namespaces exist is
    // far more likely pointed at a wiped or wrong Redis than told to drop
    // every VM network at once: keep them, and say so loudly.
    if (orphans.length && this.desired.vpcs.size === 0) {
      error = `the desired state for host ${this.hostId} is empty but ${orphans.length} of its VPC namespaces exist (${orphans.slice(0, 3).join(", ")}); refusing to remove them — check --redis, or remove them with DeleteVpc(force)`;
      this.log.error({ orphans }, "desired state empty: keeping existing VPC namespaces");
    } else if (fresh) {
      for (const ns of orphans) {
        if (ns.startsWith(prefix) && !wanted.has(ns)) {
          const vpcId = ns.slice(prefix.length);
          try {
            // Under the VPC's lock and against Redis as it is now: the
            // snapshot above may predate an EnsureVpc that just made it.
            const removed = await this.withLock(vpcId, async () => {
              if (this.desired.vpcs.has(vpcId) || (await this.store.hasVpc(vpcId))) return false;
              await this.marks.settle(ns);
              await this.kernel.delNetns(ns);
              this.marks.forget(ns);
              return true;
            });
            if (removed) changes.push(`remove orphan namespace ${ns}`);
          } catch (err) {
            error = `${ns}: ${(err as Error).message}`;
          }
        }
      }
    }
    this.status = { lastReconcileMs: Date.now(), lastError: error, lastChanges: changes.slice(-50), reconciles: this.status.reconciles + 1 };
    reconciles.inc({ result: error ? "error" : "ok" });
    if (changes.length) this.log.info({ changes }, "reconciled");
    if (this.peering) {
      const peering = this.peering;
      await peering.sync().catch((err: Error) => (peering.lastError = err.message));
      if (peering.lastError) this.status.lastError = [this.status.lastError, `peering: ${peering.lastError}`].filter(Boolean).join("; ");
      if (peering.lastChanges.length) this.status.lastChanges = [...this.status.lastChanges, ...peering.lastChanges].slice(-50);
      // Acknowledged once the overlay carries the peers' NICs too.
      void Promise.resolve(this.overlay?.syncAll(false)).then(() => peering.ack());
    } else if (this.overlay) void this.overlay.syncAll(false);
    return [fresh ? "" : "cannot read the desired state from Redis", this.status.lastError].filter(Boolean).join("; ");
  }

  private passing?: Promise<void>;
  private again = false;

  /** A pass now, or one more right after the running one (changes arriving mid-pass are not lost). */
  kick(): Promise<void> {
    if (this.passing) {
      this.again = true;
      return this.passing;
    }
    this.passing = (async () => {
      do {
        this.again = false;
        const t0 = process.hrtime.bigint();
        let error: string | undefined;
        try {
          error = (await this.reconcileAll()) || undefined;
        } catch (err) {
          error = (err as Error).message;
          this.log.error({ err: error }, "reconcile pass failed");
        }
        this.health.observe({ whole: true, seconds: Number(process.hrtime.bigint() - t0) / 1e9, error });
      } while (this.again);
    })().finally(() => (this.passing = undefined));
    return this.passing;
  }

  start(intervalMs: number): void {
    this.health.periodMs = intervalMs;
    const loop = async () => {
      await this.kick();
      // After a failed pass (Redis not reachable yet, say) try again soon, backing off to the interval:
      // a host whose first pass failed is not left unready for a whole interval.
      const failures = this.health.failuresInRow;
      this.timer = setTimeout(loop, failures ? Math.min(intervalMs, 250 * 2 ** Math.min(failures, 10)) : intervalMs);
      this.timer.unref();
    };
    void loop();
  }

  stop(): void {
    if (this.timer) clearTimeout(this.timer);
  }

  rememberVpc(v: VpcSpec): void {
    this.desired.vpcs.set(v.vpcId, v);
    this.overlay?.noteVpcs();
  }
}
