// The firewall's per-hypervisor loop: for every VPC namespace on this host,
// compile the desired firewall and make the kernel match it — a full atomic
// replace on start and when drift is found, set-element updates when only
// membership or rules changed. Every host converges by itself from the
// change events in Redis; nobody calls each host.
import { existsSync } from "node:fs";
import type { Redis } from "ioredis";
import type { Logger } from "pino";
import { Counter, Gauge, Histogram } from "prom-client";
import { reportInvalid } from "../common/invalid-records.js";
import type { EventFields } from "../common/events.js";
import { SyncLoop } from "../common/sync-loop.js";
import { metricsRegistry } from "../common/metrics.js";
import { attempt } from "../common/validate.js";
import { netagentNames as names } from "../common/names.js";
import { NA_KEYS, naKeys, nicSubnetProblem, type HostReader } from "../netagent/schema.js";
import type { NftRunner } from "../common/nft/linux.js";
import type { NftTransaction } from "../common/nft/tx.js";
import { compile, elementDiff, flowAllowed, MAX_ELEMENT_DELETIONS, patchModel, sharedChainKey, type FwModel } from "./compile.js";
import type { BindingRec, EnforcedChange, SecurityGroupRec, VpcFirewallState } from "./model.js";
import { NicIndex } from "./nic-index.js";
import { checkBinding, OWNER, parseLocalSubnet } from "./schema.js";

const applies = new Counter({
  name: "microvpc_firewall_nft_applies_total",
  help: "nft transactions by kind (full, elements, delta) and result.",
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
const leavingNics = new Gauge({
  name: "microvpc_firewall_leaving_nics",
  help: "NICs still attached here that an UnbindNic with detaching took out of the tables, waiting for their DetachNic (closed both ways until then); one that stays names a DetachNic that never came.",
  registers: [metricsRegistry],
});
const ctCleared = new Counter({
  name: "microvpc_firewall_conntrack_cleared_total",
  help: "Conntrack entries removed because the policy no longer allows them.",
  registers: [metricsRegistry],
});

export interface StateSource {
  /**
   * Firewall state of one VPC given its local subnets and NICs; for a delta
   * only the NICs that changed, plus the members `delta` names (see
   * FirewallStore.loadVpcState).
   */
  loadVpcState(
    hostId: string,
    vpcId: string,
    subnets: { subnetId: string; cidr: string; bridge: string }[],
    nics: BindingRec[],
    delta?: { held: string[]; touched: string[] },
  ): Promise<VpcFirewallState>;
  /** Bindings (group ids) of the given NICs, by nic id. */
  bindingsOf(nicIds: string[]): Promise<Map<string, BindingRec>>;
}

export interface FwStatus {
  lastApplyMs: number;
  lastApplyDurationMs: number;
  lastError: string;
  lastErrorMs: number;
}

/**
 * What the change events since the last pass over a VPC say changed there:
 * the input of a delta (FirewallSync.delta).
 */
interface Hint {
  /** NICs of this host whose record (netagent) or binding changed. */
  nics: Set<string>;
  /** Groups a NIC (of any host) joined or left: their members changed. */
  groups: Set<string>;
  /** Something else (a group's rules, an ACL, an event that does not read well): the VPC is compiled whole. */
  whole: boolean;
}

const NIC_ID = /^nic-[0-9a-f]{12}$/;
/**
 * How long a NIC attached here waits for a pass of its own. Until its pass,
 * the new port sends nothing and nothing reaches it (compile.ts: nic_ok and
 * "NIC not bound yet"); the pass opens what an unbound NIC may do. A
 * CreateVm binds the NIC within milliseconds, and that BindNic's pass reads
 * the attached NIC too (its hint is noted at once): so one delta per new
 * NIC, not one for the attach and another for the bind.
 */
export const ATTACH_PASS_DELAY_MS = 100;
const SG_ID = /^sg-[0-9a-f]{12}$/;
const csv = (v: string | undefined) => (v ? v.split(",").filter(Boolean) : []);

/** A VPC id, if the (possibly bad) record's field holds one. */
const vpcIdOr = (v: string) => (/^vpc-[0-9a-f]{12}$/.test(v) ? v : undefined);

export class FirewallSync {
  /** What was last applied per VPC namespace: diffing against it makes updates incremental. */
  readonly applied = new Map<string, { model: FwModel; state: VpcFirewallState; index: NicIndex }>();
  status: FwStatus = { lastApplyMs: 0, lastApplyDurationMs: 0, lastError: "", lastErrorMs: 0 };
  /** The last error of each VPC's pass; a VPC that applies cleanly is removed. */
  private readonly errors = new Map<string, string>();
  /** Per VPC, the newest change generation its events carried (`gen`: the VPC's counter on a cluster, the shared one on a single Redis). */
  private readonly seenGen = new Map<string, number>();
  /** Per VPC, what seenGen said when its last pass that applied without an error started. */
  private readonly appliedGen = new Map<string, number>();
  /**
   * Flow logs (flowlogs.ts), if the daemon has them on: which NICs of a VPC
   * log, and at what sample rate (read in each pass from the FlowLogConfigs,
   * flowlog-config.ts). Compiled into the drop rules.
   */
  flowLogs?: (st: VpcFirewallState) => Promise<VpcFirewallState["flowLogs"]>;
  /** Per VPC, what the events since its last pass say changed (a delta's input). */
  private readonly hints = new Map<string, Hint>();
  /** Called after each pass with the namespaces applied (the flow-log collector follows them). */
  onPass?: (namespaces: string[]) => Promise<void>;
  /**
   * Wakes on fw/nic events for a pass over their VPC (others for a whole
   * pass), retries failed passes, answers enforce() after its pass and only
   * then clears conntrack entries.
   */
  private readonly loop: SyncLoop<Clear[]>;
  /**
   * Namespaces whose conntrack tables a revoke left to clear, with the local
   * addresses to look at (undefined: every local NIC's). Cleared one at a
   * time against the policy applied when the clear runs, beside the loop:
   * a clear (a dump of the host-wide conntrack hash) never holds up the next pass.
   */
  private readonly toClear = new Map<string, Set<string> | undefined>();
  private clearing: Promise<void> | undefined;
  /**
   * NICs still attached here that an UnbindNic with `detaching` took out of
   * the tables (DeleteVm unbinds beside its DetachNic, so the firewall's
   * deletions wait for the same kernel grace period as the netagent's):
   * every pass leaves them out, as if detached already, so their ports send
   * and receive nothing (nic_ok, "NIC not bound yet"). A NIC leaves the set
   * with its nic.detached or nic.attached event, when a whole pass finds its
   * netagent record gone, or when a BindNic or a plain UnbindNic names it
   * again. In memory only: after a restart such a NIC, if still
   * attached, is an attached NIC without groups again.
   */
  private readonly leaving = new Set<string>();

  /** Takes `nicId` off `leaving`; whether it was on it. */
  private unmark(nicId: string): boolean {
    const was = this.leaving.delete(nicId);
    if (was) leavingNics.set(this.leaving.size);
    return was;
  }

  constructor(
    readonly nft: NftRunner,
    readonly source: StateSource,
    /** nicRecord: a delta reads one NIC's record (without it, every pass compiles its VPCs whole). */
    readonly host: Pick<HostReader, "load"> & Partial<Pick<HostReader, "nicRecord" | "keys">>,
    readonly hostId: string,
    readonly log: Logger,
    /** Whether a VPC's namespace exists here (tests, with FakeNft, have none). */
    readonly nsExists: (ns: string) => boolean = (ns) => existsSync(`/run/netns/${ns}`),
  ) {
    this.loop = new SyncLoop({
      log,
      events: /^(fw\.|nic\.|subnet\.|vpc\.|vpn\.)/,
      // Only the streams of the VPCs held here (and this host's): common/events.ts.
      scope: { host: hostId, vpcs: (redis) => redis.hkeys(naKeys(redis).vpcs(hostId)) },
      // Firewall and NIC events name their VPC: a pass over that VPC only. A
      // NIC attached or detached on another host changes nothing here (its
      // binding's fw event does). Anything else (a VPC or subnet made or
      // deleted) asks for a whole pass.
      route: (e) => {
        if (e.kind.startsWith("nic.") && e.host && e.host !== this.hostId) return undefined;
        if ((e.kind.startsWith("fw.") || e.kind.startsWith("nic.") || e.kind.startsWith("vpn.")) && e.vpc) {
          this.noteEvent(e);
          if (e.kind === "nic.attached") {
            const vpc = e.vpc;
            // Unless a pass has read the NIC meanwhile (a BindNic's): then nothing is left to do.
            setTimeout(() => {
              if (this.hints.has(vpc)) this.loop.target(vpc);
            }, ATTACH_PASS_DELAY_MS).unref();
            return undefined;
          }
          return { key: e.vpc };
        }
        return "all";
      },
      // A firewall change's event carries its generation (scripts.ts emit).
      tokenOf: (e) => (e.gen && e.vpc ? `gen ${e.vpc} ${e.gen}` : undefined),
      pass: (r) => this.pass(r.first, r.drift, r.only),
      failedAt: () => (this.errors.size > 0 ? this.status.lastErrorMs : undefined),
      errorOf: (vpcId) => this.errors.get(vpcId) ?? this.errors.get(""),
      after: async (clears) => {
        void this.clearLater(clears);
      },
      reconciler: "firewall",
      errorAfterPass: () => this.status.lastError || undefined,
    });
  }

  /** Local VPCs with their subnets and NICs, from the netagent's desired state. */
  async localState(only?: ReadonlySet<string>): Promise<Map<string, { subnets: { subnetId: string; cidr: string; bridge: string }[]; nics: BindingRec[] }>> {
    const d = await this.host.load();
    // Host records the shared reader skipped: this reader skipped them too, and counts them.
    for (const x of d.invalid ?? []) reportInvalid(OWNER, `host-${x.kind}`, x.key, x.reason, this.log, { field: x.field });
    for (const id of this.leaving) if (!d.nics.has(id)) this.unmark(id);
    const nicIds = [...d.nics.values()].filter((n) => !only || only.has(n.vpcId)).map((n) => n.nicId);
    const bindings = await this.source.bindingsOf(nicIds);
    const out = new Map<string, { subnets: { subnetId: string; cidr: string; bridge: string }[]; nics: BindingRec[] }>();
    for (const vpcId of d.vpcs.keys()) if (!only || only.has(vpcId)) out.set(vpcId, { subnets: [], nics: [] });
    // The netagent's records reach nft here (cidrs, interface names, MACs,
    // addresses): checked as a binding is, a bad one skipped and reported.
    for (const s of d.subnets.values()) {
      const p = parseLocalSubnet(s);
      if (!p.ok) {
        reportInvalid(OWNER, "local-subnet", (this.host.keys ?? NA_KEYS.single).subnets(this.hostId), p.reason, this.log, {
          field: s.subnetId,
          vpcId: vpcIdOr(s.vpcId),
        });
        continue;
      }
      out.get(s.vpcId)?.subnets.push({ ...p.value, bridge: names.bridge(p.value.subnetId) });
    }
    for (const n of d.nics.values()) {
      if (!out.has(n.vpcId) || this.leaving.has(n.nicId)) continue;
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
        reportInvalid(OWNER, "local-nic", (this.host.keys ?? NA_KEYS.single).nics(this.hostId), bad.reason, this.log, {
          field: n.nicId,
          vpcId: vpcIdOr(n.vpcId),
        });
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

  /**
   * Queues the conntrack clears a pass left for after its waiters were
   * answered; resolves once the queue is empty. Clears of one namespace
   * queued meanwhile merge into one.
   */
  clearLater(clears: Clear[]): Promise<void> {
    for (const c of clears) {
      if (!this.toClear.has(c.ns)) this.toClear.set(c.ns, c.addresses && new Set(c.addresses));
      else {
        const prev = this.toClear.get(c.ns);
        this.toClear.set(c.ns, prev && c.addresses ? new Set([...prev, ...c.addresses]) : undefined);
      }
    }
    if (this.toClear.size > 0) this.clearing ??= this.drainClears();
    return this.clearing ?? Promise.resolve();
  }

  private async drainClears(): Promise<void> {
    try {
      for (let next = this.toClear.entries().next(); !next.done; next = this.toClear.entries().next()) {
        const [ns, addresses] = next.value;
        this.toClear.delete(ns);
        // What the kernel enforces now, which may be newer than the pass that asked.
        const st = this.applied.get(ns)?.state;
        if (st) await this.clearDisallowed(ns, st, addresses).catch((err: Error) => this.log.warn({ ns, err: err.message }, "cannot clear conntrack entries"));
      }
    } finally {
      this.clearing = undefined;
    }
  }

  /**
   * GetFirewallStatus's generations: `desired` sums, over this host's VPCs,
   * the newest change generation their events carried; `applied` the same
   * as far as a pass that started after it applied without an error. Equal
   * when every change this host heard of is in its tables; lower while one
   * waits for its pass or its VPC keeps failing (a stuck reconciler shows).
   */
  generations(): { desired: number; applied: number } {
    let desired = 0;
    let applied = 0;
    for (const [vpcId, g] of this.seenGen) {
      desired += g;
      applied += Math.min(g, this.appliedGen.get(vpcId) ?? 0);
    }
    return { desired, applied };
  }

  /** The hint of a change event over a VPC (the loop's route; tests): which NICs and groups it touched, or that the VPC must be compiled whole. */
  noteEvent(e: Record<string, string>): void {
    if (/^[0-9]{1,15}$/.test(e.gen ?? "")) this.seenGen.set(e.vpc, Math.max(this.seenGen.get(e.vpc) ?? 0, Number(e.gen)));
    const h = this.hintOf(e.vpc);
    const binding = e.kind === "fw.binding.changed" || e.kind === "fw.binding.removed";
    const groups = [...csv(e.groups), ...csv(e.prev_groups)];
    // A VPN client made or deleted: only the members of its groups moved (no NIC of this host).
    if (e.kind === "vpn.client.created" || e.kind === "vpn.client.deleted") {
      if (groups.every((g) => SG_ID.test(g))) for (const g of groups) h.groups.add(g);
      else h.whole = true;
      return;
    }
    // Fields of a record anyone may have written: anything unexpected compiles the VPC whole.
    if ((!binding && e.kind !== "nic.attached" && e.kind !== "nic.detached") || !NIC_ID.test(e.nic ?? "") || !groups.every((g) => SG_ID.test(g))) {
      h.whole = true;
      return;
    }
    for (const g of groups) h.groups.add(g);
    // nic.* events of other hosts were dropped (route); a binding names its host and the one it left.
    if (!binding || e.host === this.hostId || e.prev_host === this.hostId) h.nics.add(e.nic);
    // Detached (or attached anew after that): no longer leaving (see `leaving`).
    if (!binding) this.unmark(e.nic);
  }

  private hintOf(vpcId: string): Hint {
    let h = this.hints.get(vpcId);
    if (!h) this.hints.set(vpcId, (h = { nics: new Set(), groups: new Set(), whole: false }));
    return h;
  }

  /** Sets st.flowLogs from the VPC's flow-log configs (flowlog-config.ts), if the daemon has flow logs on. */
  private async withFlowLogs(st: VpcFirewallState): Promise<VpcFirewallState> {
    if (this.flowLogs) st.flowLogs = await this.flowLogs(st);
    return st;
  }

  /** One pass (see syncAll); returns the conntrack clears it leaves to run. */
  private async pass(full: boolean, checkDrift: boolean, only?: ReadonlySet<string>): Promise<Clear[]> {
    const t0 = Date.now();
    const cleanups: Clear[] = [];
    // What each VPC's events had said when this pass started: what it applies at least (it reads the state after).
    const seen = new Map(this.seenGen);
    const caughtUp = (vpcId: string) => {
      const g = seen.get(vpcId);
      if (g !== undefined && g > (this.appliedGen.get(vpcId) ?? 0)) this.appliedGen.set(vpcId, g);
    };
    // A targeted pass applies each VPC's changes as a delta where the events
    // say what changed; the others (and every whole pass) compile whole.
    let whole = only;
    if (!only) this.hints.clear();
    else {
      const rest = new Set<string>();
      for (const vpcId of only) {
        const hint = this.hints.get(vpcId);
        this.hints.delete(vpcId);
        if (full || checkDrift || !hint || hint.whole || !(await this.delta(vpcId, hint, cleanups))) rest.add(vpcId);
        else caughtUp(vpcId);
      }
      whole = rest;
    }
    try {
      const local = whole?.size === 0 ? new Map<string, never>() : await this.localState(whole);
      for (const [vpcId, l] of local) {
        const ns = names.netns(this.hostId, vpcId);
        if (!this.nsExists(ns)) {
          // No namespace here yet: nothing of the VPC forwards here, nothing to apply (its netagent's status says why).
          this.errors.delete(vpcId);
          caughtUp(vpcId);
          continue;
        }
        try {
          const st = await this.withFlowLogs(await this.source.loadVpcState(this.hostId, vpcId, l.subnets, l.nics));
          const cleanup = await this.syncVpc(ns, st, full, checkDrift, true);
          if (cleanup) cleanups.push(cleanup);
          this.errors.delete(vpcId);
          caughtUp(vpcId);
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
        for (const m of [this.seenGen, this.appliedGen]) for (const vpcId of m.keys()) if (!local.has(vpcId)) m.delete(vpcId);
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
    };
    return cleanups;
  }

  /**
   * Makes one namespace's tables match `st`. A change that takes something
   * away also clears the conntrack entries the policy no longer allows: at
   * once, or (deferClear) returned, to run once the callers waiting for the
   * apply have their answer.
   */
  async syncVpc(ns: string, st: VpcFirewallState, full: boolean, checkDrift = false, deferClear = false): Promise<Clear | undefined> {
    const t0 = process.hrtime.bigint();
    const compiled = compile(st);
    const model = compiled.model;
    const prev = this.applied.get(ns);
    // Not applied by this process yet, but a table there: the one before it (a restart), or a pass
    // that gave up on a delta, enforced a policy whose flows this one may no longer allow.
    const inherited = !prev && (await this.nft.tableExists(ns));
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
    // The deltas' index of the NICs, made here where the pass is whole anyway.
    this.applied.set(ns, { model, state: st, index: NicIndex.of(st) });
    applySeconds.observe({ kind }, Number(process.hrtime.bigint() - t0) / 1e9);
    // Only a change that takes something away can leave a flow the policy no
    // longer allows; a NIC bound or a member added cannot (and listing the
    // conntrack table is the costliest command of a pass). A table this
    // process found in place may have allowed anything: its flows are read.
    if (kind !== "none" && (prev || inherited) && revokes) {
      if (!deferClear) await this.clearDisallowed(ns, st);
      else return { ns };
    }
    return undefined;
  }

  /**
   * Resolves once this host's kernel enforces what Redis holds for `vpcId`
   * now: a pass over that VPC that started after this call has applied it.
   * Rejects with the pass's error, or after `timeoutMs`. Calls made while a
   * pass runs share the next one, so 100 binds at once cost a few passes.
   */
  enforce(vpcId: string, timeoutMs = 10_000, change: EnforcedChange = {}): Promise<void> {
    const { nicId, gen, leaving = false } = change;
    const t0 = process.hrtime.bigint();
    // The NIC whose binding changed: its pass can be a delta even before the event arrives.
    let wasLeaving = false;
    if (nicId !== undefined && NIC_ID.test(nicId)) {
      this.hintOf(vpcId).nics.add(nicId);
      // Unbound while it is being detached: out of the tables now (see `leaving`).
      if (leaving) leavingNics.set(this.leaving.add(nicId).size);
      else wasLeaving = this.unmark(nicId);
    }
    return new Promise<void>((resolve, reject) => {
      let withdraw = () => {};
      const timer = setTimeout(() => {
        withdraw();
        enforceSeconds.observe({ result: "timeout" }, Number(process.hrtime.bigint() - t0) / 1e9);
        reject(new Error(`this host's firewall did not apply VPC ${vpcId} within ${timeoutMs} ms (last error: ${this.status.lastError || "none"})`));
      }, timeoutMs);
      // With the change's generation, the pass its own event started answers (it read the change);
      // not when this call marks or unmarks a leaving NIC: that pass may have started before.
      withdraw = this.loop.target(
        vpcId,
        (err?: Error) => {
          clearTimeout(timer);
          enforceSeconds.observe({ result: err ? "error" : "ok" }, Number(process.hrtime.bigint() - t0) / 1e9);
          if (err) reject(err);
          else resolve();
        },
        !leaving && !wasLeaving && gen !== undefined && /^\d{1,20}$/.test(gen) ? `gen ${vpcId} ${gen}` : undefined,
      );
    });
  }

  /**
   * Applies what changed in one VPC (`hint`) as one nft transaction of
   * element and chain updates over what is applied there, reading only the
   * changed NICs' records and bindings, their groups and the members that
   * moved: the cost of a NIC bound, unbound, attached or detached does not
   * grow with the NICs of the host. False (nothing applied, the caller
   * compiles the VPC whole) where a delta cannot be exact: nothing applied
   * yet, a record that does not validate or clashes with another NIC, a group
   * or ACL that changed meanwhile, a transaction the kernel refuses (a stale
   * base: then the next apply replaces the table).
   */
  private async delta(vpcId: string, hint: Hint, cleanups: Clear[]): Promise<boolean> {
    const ns = names.netns(this.hostId, vpcId);
    const cur = this.applied.get(ns);
    const nicRecord = this.host.nicRecord?.bind(this.host);
    if (!cur || !nicRecord || !this.nsExists(ns)) return false;
    const t0 = process.hrtime.bigint();
    const st0 = cur.state;
    // Made by the whole pass, then kept up to date by each delta.
    const { index } = cur;
    const byId = index.byId;
    try {
      // The changed NICs' records, checked as localState checks them.
      const ids = [...hint.nics].sort();
      // A leaving NIC is compiled as if detached whatever its record says, so it is not read
      // (its mark goes with its nic.* event, or at a whole pass that finds the record gone).
      const recs = await Promise.all(ids.map((id) => (this.leaving.has(id) ? ("leaving" as const) : nicRecord(id))));
      const before = ids.flatMap((id) => byId.get(id) ?? []);
      const now: BindingRec[] = [];
      // The interfaces and addresses of the changed NICs' new records (the others' are in the index).
      const taken = new Set<string>();
      for (const [i, r] of recs.entries()) {
        if (r === "invalid") return false;
        // Leaving (see `leaving`): compiled as if detached already.
        if (r === "leaving") continue;
        if (r === "absent" || r.nic.vpcId !== vpcId) {
          if (r !== "absent" && byId.has(ids[i])) return false;
          continue;
        }
        const n = r.nic;
        const sub = st0.subnets.find((x) => x.subnetId === n.subnetId);
        if (!sub || nicSubnetProblem(n, { subnetId: sub.subnetId, vpcId, cidr: sub.cidr, gatewayCidr: "", mtu: 0 })) return false;
        if (taken.has(`if ${n.hostIf}`) || taken.has(`ip ${n.address}`) || index.ifTaken(n.hostIf, before) || index.addressTaken(n.address, before))
          return false;
        taken.add(`if ${n.hostIf}`).add(`ip ${n.address}`);
        const rec: BindingRec = {
          nicId: n.nicId,
          vpcId,
          subnetId: n.subnetId,
          address: n.address,
          mac: n.mac,
          hostId: this.hostId,
          hostIf: n.hostIf,
          groupIds: [],
          boundMs: 0,
          updatedMs: 0,
        };
        if (!attempt(() => checkBinding(rec)).ok) return false;
        now.push(rec);
      }
      const touched = new Set(hint.groups);
      for (const b of before) for (const g of b.groupIds) touched.add(g);
      const held = [...st0.members.keys()];
      const heldTouched = held.filter((g) => touched.has(g));
      if (now.length === 0 && before.length === 0 && heldTouched.length === 0) return true;
      // NICs that only left, of groups no rule here names as a peer: nothing to read (an ACL
      // changed meanwhile has its own event, which compiles the VPC whole).
      const mini =
        now.length === 0 && heldTouched.length === 0
          ? { ...st0, nics: [], groups: new Map<string, SecurityGroupRec>(), members: new Map<string, string[]>() }
          : await this.source.loadVpcState(this.hostId, vpcId, st0.subnets, now, { held, touched: heldTouched });

      // Only NICs and members may have moved: a group or ACL that differs from what is applied compiles the VPC whole.
      const usedByOthers = index.groupsUsed(before);
      for (const [gid, g] of mini.groups) {
        const old = st0.groups.get(gid);
        if (old ? !sameGroup(old, g) : usedByOthers.has(gid)) return false;
      }
      for (const n of mini.nics) for (const g of n.groupIds) if (!mini.groups.has(g) && st0.groups.has(g)) return false;
      for (const sid of new Set([...st0.acls.keys(), ...mini.acls.keys()])) {
        const a = st0.acls.get(sid);
        const b = mini.acls.get(sid);
        if (!a || !b ? a !== b : a.id !== b.id || a.generation !== b.generation || a.entries.length !== b.entries.length) return false;
      }

      const groups = new Map(st0.groups);
      for (const [gid, g] of mini.groups) if (!groups.has(gid)) groups.set(gid, g);
      const members = new Map(st0.members);
      const moved = new Set<string>();
      // A group that lost a member narrows every rule naming it, on any local NIC.
      let shrunk = false;
      for (const [gid, m] of mini.members) {
        const old = st0.members.get(gid) ?? [];
        if (old.length !== m.length || old.some((x, i) => x !== m[i])) moved.add(gid);
        if (!shrunk && old.length > 0) {
          const left = new Set(m);
          shrunk = old.some((x) => !left.has(x));
        }
        members.set(gid, m);
      }
      const others = st0.nics.filter((n) => !hint.nics.has(n.nicId));
      const st1 = await this.withFlowLogs({ ...st0, nics: [...others, ...mini.nics].sort(byNicId), groups, members });
      // Flow logs add subnet-wide rules (an ACL's log rules follow every logging NIC of its subnet),
      // which a NIC's part alone does not compile exactly: a VPC that logs is compiled whole.
      const logs = (st: VpcFirewallState) => (st.flowLogs?.nics.size ?? 0) + (st.flowLogs?.subnets?.size ?? 0) > 0;
      if (logs(st0) || logs(st1)) return false;

      // The part of the VPC the change touches, compiled before and after:
      // the changed NICs, with the other NICs' groups that they share or
      // that name a group whose members moved (so those compile whole on both sides).
      let a: FwModel;
      let b: FwModel;
      if (before.length === 0 && mini.nics.length === 0) {
        // Only members moved (a NIC of another host): their sets alone, whatever the size of the groups naming them.
        a = { ...cur.model, sets: new Map(), chains: new Map() };
        b = { ...a, sets: new Map() };
        for (const g of moved) {
          const key = `inet members_${g.slice(-12)}`;
          const set = cur.model.sets.get(key);
          if (!set) continue;
          a.sets.set(key, { ...set, elements: [...new Set(st0.members.get(g))].sort() });
          b.sets.set(key, { ...set, elements: [...new Set(st1.members.get(g))].sort() });
        }
      } else {
        const mine = new Set([...before, ...mini.nics].flatMap((n) => n.groupIds));
        const peers = new Set(moved);
        for (const g of mine) for (const r of groups.get(g)?.rules ?? []) if (r.group) peers.add(r.group);
        const alsoUsed = [...usedByOthers].filter((g) => mine.has(g) || (groups.get(g)?.rules ?? []).some((r) => r.group && peers.has(r.group)));
        // The chains the changed NICs share with NICs left out stay on both sides.
        const alsoShared = new Set([...before.map((n) => sharedChainKey(n, st0)), ...mini.nics.map((n) => sharedChainKey(n, st1))]);
        const kept = [...alsoShared].filter((k): k is string => k !== undefined && index.sharedUsed(k, before));
        a = compile({ ...st0, nics: before }, alsoUsed, kept).model;
        b = compile({ ...st1, nics: mini.nics }, alsoUsed, kept).model;
      }
      const model = patchModel(cur.model, a, b);
      const d = elementDiff(a, b, true);
      if (!model || !d || d.deletions > MAX_ELEMENT_DELETIONS) return false;
      if (!d.tx.empty) {
        try {
          await this.nft.apply(ns, d.tx);
          applies.inc({ kind: "delta", result: "ok" });
        } catch (err) {
          applies.inc({ kind: "delta", result: "error" });
          this.log.warn(
            { vpc: vpcId, err: (err as Error).message },
            "firewall delta refused (the kernel's table is not what was applied); replacing the table",
          );
          this.applied.delete(ns);
          return false;
        }
        // What this delta can take away is the changed NICs' own access, unless
        // a group lost members. A NIC that left this host has nothing here to
        // clear (the netagent's detach clears its address's flows).
        if (d.revokes) {
          const still = new Set(mini.nics.map((n) => n.address));
          if (shrunk) cleanups.push({ ns });
          else if (still.size > 0) cleanups.push({ ns, addresses: still });
        }
      }
      for (const b of before) index.remove(b.nicId);
      for (const n of mini.nics) index.add(n, st1);
      this.applied.set(ns, { model, state: st1, index });
      this.errors.delete(vpcId);
      applySeconds.observe({ kind: "delta" }, Number(process.hrtime.bigint() - t0) / 1e9);
      return true;
    } catch (err) {
      // Reading failed (Redis): the whole pass says why.
      this.log.debug({ vpc: vpcId, err: (err as Error).message }, "firewall delta not possible; compiling the VPC whole");
      return false;
    }
  }

  /** Removes conntrack entries of local NICs (of those at `addresses`, if given) that the policy `st` does not allow. */
  async clearDisallowed(ns: string, st: VpcFirewallState, addresses?: ReadonlySet<string>): Promise<number> {
    const local = new Set(st.nics.map((n) => n.address).filter((a) => !addresses || addresses.has(a)));
    if (local.size === 0) return 0;
    // One pass over the table: the entries of those NICs that the policy refuses.
    const n = await this.nft.conntrackClear(ns, (e) => (local.has(e.src) || local.has(e.dst)) && !flowAllowed(st, e.src, e.dst, e.proto, e.dport));
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

  /** Change events, as the feed start() follows hands them (tests hand them here). */
  onEvents(events: Record<string, string>[]): void {
    this.loop.onEvents(events as EventFields[]);
  }

  /** The loop alone, without the change feed: passes as enforce() and kick() ask (tests). */
  run(driftIntervalMs: number): Promise<void> {
    return this.loop.run(driftIntervalMs);
  }

  stop(): void {
    this.loop.stop();
  }

  /** The loop's reconcile health: ready once every local VPC's tables are applied, and recently. */
  get health() {
    return this.loop.health!;
  }
}

/** A conntrack clear a revoke leaves: the namespace, and the local addresses whose access narrowed (undefined: any). */
interface Clear {
  ns: string;
  addresses?: ReadonlySet<string>;
}

const byNicId = (a: BindingRec, b: BindingRec) => (a.nicId < b.nicId ? -1 : a.nicId > b.nicId ? 1 : 0);

/** The same version of a group (a change raises its generation; a refused record's stand-in has none). */
function sameGroup(a: SecurityGroupRec, b: SecurityGroupRec): boolean {
  return (
    a.generation === b.generation &&
    a.updatedMs === b.updatedMs &&
    a.name === b.name &&
    a.rules.length === b.rules.length &&
    JSON.stringify(a.dropLogging) === JSON.stringify(b.dropLogging)
  );
}
