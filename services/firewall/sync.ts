// The firewall's per-hypervisor loop: for every VPC namespace on this host,
// compile the desired firewall and make the kernel match it — a full atomic
// replace on start and when drift is found, set-element updates when only
// membership or rules changed. Every host converges by itself from the
// change events in Redis; nobody calls each host.
import { existsSync } from "node:fs";
import type { Redis } from "ioredis";
import type { Logger } from "pino";
import { Counter, Histogram } from "prom-client";
import { reportInvalid } from "../common/invalid-records.js";
import { SyncLoop } from "../common/sync-loop.js";
import { metricsRegistry } from "../common/metrics.js";
import { attempt } from "../common/validate.js";
import { netagentNames as names } from "../common/names.js";
import { hostKeys, type HostReader } from "../netagent/schema.js";
import type { NftRunner } from "../common/nft/linux.js";
import type { NftTransaction } from "../common/nft/tx.js";
import { compile, elementDiff, flowAllowed, MAX_ELEMENT_DELETIONS, type FwModel } from "./compile.js";
import type { BindingRec, VpcFirewallState } from "./model.js";
import { checkBinding, OWNER, parseLocalSubnet } from "./schema.js";

const applies = new Counter({
  name: "microvpc_firewall_nft_applies_total",
  help: "nft transactions by kind (full, elements) and result.",
  labelNames: ["kind", "result"] as const,
  registers: [metricsRegistry],
});
const applySeconds = new Histogram({
  name: "microvpc_firewall_apply_seconds",
  help: "Compile + apply time of one VPC's firewall.",
  labelNames: ["kind"] as const,
  buckets: [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5],
  registers: [metricsRegistry],
});
const enforceSeconds = new Histogram({
  name: "microvpc_firewall_enforce_seconds",
  help: "From a BindNic/UnbindNic asking for its VPC to be applied until the kernel has it (or the apply failed).",
  labelNames: ["result"] as const,
  buckets: [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 5],
  registers: [metricsRegistry],
});
const ctCleared = new Counter({
  name: "microvpc_firewall_conntrack_cleared_total",
  help: "Conntrack entries removed because the policy no longer allows them.",
  registers: [metricsRegistry],
});

export interface StateSource {
  /** Firewall state of one VPC given its local subnets and NICs. */
  loadVpcState(hostId: string, vpcId: string, subnets: { subnetId: string; cidr: string; bridge: string }[], nics: BindingRec[]): Promise<VpcFirewallState>;
  /** Bindings (group ids) of the given NICs, by nic id. */
  bindingsOf(nicIds: string[]): Promise<Map<string, BindingRec>>;
}

export interface FwStatus {
  lastApplyMs: number;
  lastApplyDurationMs: number;
  lastError: string;
  lastErrorMs: number;
  generation: number;
  applied: number;
}

/** A VPC id, if the (possibly bad) record's field holds one. */
const vpcIdOr = (v: string) => (/^vpc-[0-9a-f]{12}$/.test(v) ? v : undefined);

export class FirewallSync {
  /** What was last applied per VPC namespace: diffing against it makes updates incremental. */
  readonly applied = new Map<string, { model: FwModel; state: VpcFirewallState }>();
  status: FwStatus = { lastApplyMs: 0, lastApplyDurationMs: 0, lastError: "", lastErrorMs: 0, generation: 0, applied: 0 };
  /** The last error of each VPC's pass; a VPC that applies cleanly is removed. */
  private readonly errors = new Map<string, string>();
  /**
   * Flow logs (flowlogs.ts), if the daemon has them on: which NICs log (by
   * NIC, subnet or VPC id; empty = every NIC of this host) and the sample
   * rate. Compiled into the NIC chains' drop rules.
   */
  flowLogs?: { scope: ReadonlySet<string>; sampleRate: number };
  /** Called after each pass with the namespaces applied (the flow-log collector follows them). */
  onPass?: (namespaces: string[]) => Promise<void>;
  /**
   * Wakes on fw/nic events for a pass over their VPC (others for a whole
   * pass), retries failed passes, answers enforce() after its pass and only
   * then clears conntrack entries.
   */
  private readonly loop: SyncLoop<(() => Promise<unknown>)[]>;

  constructor(
    readonly nft: NftRunner,
    readonly source: StateSource,
    readonly host: Pick<HostReader, "load">,
    readonly hostId: string,
    readonly log: Logger,
    /** Whether a VPC's namespace exists here (tests, with FakeNft, have none). */
    readonly nsExists: (ns: string) => boolean = (ns) => existsSync(`/run/netns/${ns}`),
  ) {
    this.loop = new SyncLoop({
      log,
      events: /^(fw\.|nic\.|subnet\.|vpc\.)/,
      // Only the streams of the VPCs held here (and this host's): common/events.ts.
      scope: { host: hostId, vpcs: (redis) => redis.hkeys(hostKeys.vpcs(hostId)) },
      // Firewall and NIC events name their VPC: a pass over that VPC only. A
      // NIC attached or detached on another host changes nothing here (its
      // binding's fw event does). Anything else (a VPC or subnet made or
      // deleted) asks for a whole pass.
      route: (e) => {
        if (e.kind.startsWith("nic.") && e.host && e.host !== this.hostId) return undefined;
        if ((e.kind.startsWith("fw.") || e.kind.startsWith("nic.")) && e.vpc) return { key: e.vpc };
        return "all";
      },
      pass: (r) => this.pass(r.first, r.drift, r.only),
      failedAt: () => (this.errors.size > 0 ? this.status.lastErrorMs : undefined),
      errorOf: (vpcId) => this.errors.get(vpcId) ?? this.errors.get(""),
      after: (cleanups) => this.clearLater(cleanups),
      reconciler: "firewall",
      errorAfterPass: () => this.status.lastError || undefined,
    });
  }

  /** Local VPCs with their subnets and NICs, from the netagent's desired state. */
  async localState(only?: ReadonlySet<string>): Promise<Map<string, { subnets: { subnetId: string; cidr: string; bridge: string }[]; nics: BindingRec[] }>> {
    const d = await this.host.load();
    // Host records the shared reader skipped: this reader skipped them too, and counts them.
    for (const x of d.invalid ?? []) reportInvalid(OWNER, `host-${x.kind}`, x.key, x.reason, this.log, { field: x.field });
    const nicIds = [...d.nics.values()].filter((n) => !only || only.has(n.vpcId)).map((n) => n.nicId);
    const bindings = await this.source.bindingsOf(nicIds);
    const out = new Map<string, { subnets: { subnetId: string; cidr: string; bridge: string }[]; nics: BindingRec[] }>();
    for (const vpcId of d.vpcs.keys()) if (!only || only.has(vpcId)) out.set(vpcId, { subnets: [], nics: [] });
    // The netagent's records reach nft here (cidrs, interface names, MACs,
    // addresses): checked as a binding is, a bad one skipped and reported.
    for (const s of d.subnets.values()) {
      const p = parseLocalSubnet(s);
      if (!p.ok) {
        reportInvalid(OWNER, "local-subnet", hostKeys.subnets(this.hostId), p.reason, this.log, { field: s.subnetId, vpcId: vpcIdOr(s.vpcId) });
        continue;
      }
      out.get(s.vpcId)?.subnets.push({ ...p.value, bridge: names.bridge(p.value.subnetId) });
    }
    for (const n of d.nics.values()) {
      if (!out.has(n.vpcId)) continue;
      const b = bindings.get(n.nicId);
      const bad = attempt(() =>
        checkBinding({
          nicId: n.nicId,
          vpcId: n.vpcId,
          subnetId: n.subnetId,
          address: n.address,
          mac: n.mac,
          hostId: this.hostId,
          hostIf: n.hostIf,
          groupIds: [],
        }),
      );
      if (!bad.ok) {
        reportInvalid(OWNER, "local-nic", hostKeys.nics(this.hostId), bad.reason, this.log, { field: n.nicId, vpcId: vpcIdOr(n.vpcId) });
        continue;
      }
      out.get(n.vpcId)?.nics.push({
        nicId: n.nicId,
        vpcId: n.vpcId,
        subnetId: n.subnetId,
        address: n.address,
        mac: n.mac,
        hostId: this.hostId,
        hostIf: n.hostIf,
        groupIds: b?.groupIds ?? [],
        dropLogging: b?.dropLogging,
        boundMs: b?.boundMs ?? 0,
        updatedMs: b?.updatedMs ?? 0,
      });
    }
    return out;
  }

  /**
   * One pass over every local VPC (or only those in `only`). `full` forces a
   * table replace (start); `checkDrift` first asks the kernel whether our
   * table is still there (a periodic check, not per change: listing a table
   * with 10 000 set elements costs ~60 ms).
   */
  async syncAll(full = false, checkDrift = false, only?: ReadonlySet<string>): Promise<void> {
    await this.clearLater(await this.pass(full, checkDrift, only));
  }

  /** Runs the conntrack clean-ups a pass left for after its waiters were answered. */
  private async clearLater(cleanups: (() => Promise<unknown>)[]): Promise<void> {
    for (const c of cleanups) await c().catch((err: Error) => this.log.warn({ err: err.message }, "cannot clear conntrack entries"));
  }

  /** One pass (see syncAll); returns the conntrack clean-ups it leaves to run. */
  private async pass(full: boolean, checkDrift: boolean, only?: ReadonlySet<string>): Promise<(() => Promise<unknown>)[]> {
    const t0 = Date.now();
    const cleanups: (() => Promise<unknown>)[] = [];
    try {
      const local = await this.localState(only);
      for (const [vpcId, l] of local) {
        const ns = names.netns(this.hostId, vpcId);
        if (!this.nsExists(ns)) {
          this.errors.delete(vpcId);
          continue;
        }
        try {
          const st = await this.source.loadVpcState(this.hostId, vpcId, l.subnets, l.nics);
          if (this.flowLogs) {
            const { scope, sampleRate } = this.flowLogs;
            const on = st.nics.filter((n) => scope.size === 0 || scope.has(n.nicId) || scope.has(n.subnetId) || scope.has(n.vpcId));
            st.flowLogs = { nics: new Set(on.map((n) => n.nicId)), sampleRate };
          }
          const cleanup = await this.syncVpc(ns, st, full, checkDrift, true);
          if (cleanup) cleanups.push(cleanup);
          this.errors.delete(vpcId);
        } catch (err) {
          this.errors.set(vpcId, (err as Error).message);
          this.log.error({ vpc: vpcId, err: (err as Error).message }, "firewall sync failed; will retry with a full replace");
          // The next pass rebuilds this namespace from scratch.
          this.applied.delete(ns);
        }
      }
      if (!only) {
        for (const ns of this.applied.keys()) {
          if (![...local.keys()].some((v) => names.netns(this.hostId, v) === ns)) this.applied.delete(ns);
        }
        for (const vpcId of this.errors.keys()) if (vpcId !== "" && !local.has(vpcId)) this.errors.delete(vpcId);
      }
      this.errors.delete("");
    } catch (err) {
      // Reading the desired state failed (Redis): every VPC asked for is unknown.
      this.errors.set("", (err as Error).message);
    }
    if (this.onPass) await this.onPass([...this.applied.keys()]).catch((err: Error) => this.log.warn({ err: err.message }, "flow logs: cannot start a reader"));
    const error = [...this.errors].map(([v, e]) => (v ? `${v}: ${e}` : e)).join("; ");
    this.status = {
      ...this.status,
      lastApplyMs: Date.now(),
      lastApplyDurationMs: Date.now() - t0,
      lastError: error,
      lastErrorMs: error ? Date.now() : this.status.lastErrorMs,
      generation: this.status.generation + 1,
    };
    return cleanups;
  }

  /**
   * Makes one namespace's tables match `st`. A change that takes something
   * away also clears the conntrack entries the policy no longer allows: at
   * once, or (deferClear) returned as a function to run once the callers
   * waiting for the apply have their answer.
   */
  async syncVpc(ns: string, st: VpcFirewallState, full: boolean, checkDrift = false, deferClear = false): Promise<(() => Promise<unknown>) | undefined> {
    const t0 = process.hrtime.bigint();
    const compiled = compile(st);
    const model = compiled.model;
    const prev = this.applied.get(ns);
    let kind: "full" | "elements" | "none" = "full";
    let tx: NftTransaction | undefined;
    let revokes = true;
    if (!full && prev && (!checkDrift || (await this.nft.tableExists(ns)))) {
      const d = elementDiff(prev.model, model);
      if (d !== null && d.deletions <= MAX_ELEMENT_DELETIONS) {
        kind = d.tx.empty ? "none" : "elements";
        tx = d.tx;
        revokes = d.revokes;
      }
    }
    if (kind === "full") tx = compiled.tx;
    if (kind !== "none") {
      try {
        await this.nft.apply(ns, tx!);
        applies.inc({ kind, result: "ok" });
      } catch (err) {
        applies.inc({ kind, result: "error" });
        throw err;
      }
    }
    this.applied.set(ns, { model, state: st });
    applySeconds.observe({ kind }, Number(process.hrtime.bigint() - t0) / 1e9);
    // Only a change that takes something away can leave a flow the policy no
    // longer allows; a NIC bound or a member added cannot (and listing the
    // conntrack table is the costliest command of a pass).
    if (kind !== "none") this.status.applied++;
    if (kind !== "none" && prev && revokes) {
      if (!deferClear) await this.clearDisallowed(ns, st);
      else return () => this.clearDisallowed(ns, st);
    }
    return undefined;
  }

  /**
   * Resolves once this host's kernel enforces what Redis holds for `vpcId`
   * now: a pass over that VPC that started after this call has applied it.
   * Rejects with the pass's error, or after `timeoutMs`. Calls made while a
   * pass runs share the next one, so 100 binds at once cost a few passes.
   */
  enforce(vpcId: string, timeoutMs = 10_000): Promise<void> {
    const t0 = process.hrtime.bigint();
    return new Promise<void>((resolve, reject) => {
      let withdraw = () => {};
      const timer = setTimeout(() => {
        withdraw();
        enforceSeconds.observe({ result: "timeout" }, Number(process.hrtime.bigint() - t0) / 1e9);
        reject(new Error(`this host's firewall did not apply VPC ${vpcId} within ${timeoutMs} ms (last error: ${this.status.lastError || "none"})`));
      }, timeoutMs);
      withdraw = this.loop.target(vpcId, (err?: Error) => {
        clearTimeout(timer);
        enforceSeconds.observe({ result: err ? "error" : "ok" }, Number(process.hrtime.bigint() - t0) / 1e9);
        if (err) reject(err);
        else resolve();
      });
    });
  }

  /** Removes conntrack entries of local NICs that the new policy would not allow. */
  async clearDisallowed(ns: string, st: VpcFirewallState): Promise<number> {
    const local = new Set(st.nics.map((n) => n.address));
    let n = 0;
    for (const e of await this.nft.conntrackList(ns)) {
      if (!local.has(e.src) && !local.has(e.dst)) continue;
      const proto = e.proto === "icmp" ? "icmp" : e.proto;
      if (!flowAllowed(st, e.src, e.dst, proto, e.dport)) {
        await this.nft.conntrackDelete(ns, e);
        n++;
      }
    }
    if (n) {
      ctCleared.inc(n);
      this.log.info({ ns, cleared: n }, "cleared conntrack entries the policy no longer allows");
    }
    return n;
  }

  /** Asks for a pass soon; passes never overlap, and requests during one coalesce. */
  kick(): void {
    this.loop.kick();
  }

  /**
   * Start: `prepare` (retried each second until Redis answers it), a full
   * replace, then follow the change events; a periodic pass catches drift.
   */
  start(redis: Redis, driftIntervalMs: number, prepare?: () => Promise<unknown>): void {
    this.loop.start(redis, driftIntervalMs, prepare);
  }

  stop(): void {
    this.loop.stop();
  }

  /** The loop's reconcile health: ready once every local VPC's tables are applied, and recently. */
  get health() {
    return this.loop.health!;
  }
}
