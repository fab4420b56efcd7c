// The firewall's per-hypervisor loop: for every VPC namespace on this host,
// compile the desired firewall and make the kernel match it — a full atomic
// replace on start and when drift is found, set-element updates when only
// membership or rules changed. Every host converges by itself from the
// change events in Redis; nobody calls each host.
import { existsSync } from "node:fs";
import type { Redis } from "ioredis";
import type { Logger } from "pino";
import { Counter, Histogram } from "prom-client";
import { followEvents } from "../common/events.js";
import { reportInvalid } from "../common/invalid-records.js";
import { metricsRegistry } from "../common/metrics.js";
import { attempt } from "../common/validate.js";
import { names } from "../netagent/plan.js";
import { hostKeys } from "../netagent/schema.js";
import type { HostStore } from "../netagent/store.js";
import type { NftRunner } from "./apply.js";
import { compile, diff, flowAllowed, type FwModel } from "./compile.js";
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
  private running = false;
  private stopped = false;
  private pending = false;
  private wake?: () => void;

  constructor(
    readonly nft: NftRunner,
    readonly source: StateSource,
    readonly host: HostStore,
    readonly hostId: string,
    readonly log: Logger,
  ) {}

  /** Local VPCs with their subnets and NICs, from the netagent's desired state. */
  async localState(): Promise<Map<string, { subnets: { subnetId: string; cidr: string; bridge: string }[]; nics: BindingRec[] }>> {
    const d = await this.host.load();
    const bindings = await this.source.bindingsOf([...d.nics.keys()]);
    const out = new Map<string, { subnets: { subnetId: string; cidr: string; bridge: string }[]; nics: BindingRec[] }>();
    for (const vpcId of d.vpcs.keys()) out.set(vpcId, { subnets: [], nics: [] });
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
   * One pass over every local VPC. `full` forces a table replace (start);
   * `checkDrift` first asks the kernel whether our table is still there
   * (a periodic check, not per change: listing a table with 10 000 set
   * elements costs ~60 ms).
   */
  async syncAll(full = false, checkDrift = false): Promise<void> {
    const t0 = Date.now();
    let error = "";
    try {
      const local = await this.localState();
      for (const [vpcId, l] of local) {
        const ns = names.netns(this.hostId, vpcId);
        if (!existsSync(`/run/netns/${ns}`)) continue;
        try {
          const st = await this.source.loadVpcState(this.hostId, vpcId, l.subnets, l.nics);
          await this.syncVpc(ns, st, full, checkDrift);
        } catch (err) {
          error = `${vpcId}: ${(err as Error).message}`;
          this.log.error({ vpc: vpcId, err: (err as Error).message }, "firewall sync failed; will retry with a full replace");
          // The next pass rebuilds this namespace from scratch.
          this.applied.delete(ns);
        }
      }
      for (const ns of this.applied.keys()) {
        if (![...local.keys()].some((v) => names.netns(this.hostId, v) === ns)) this.applied.delete(ns);
      }
    } catch (err) {
      error = (err as Error).message;
    }
    this.status = {
      ...this.status,
      lastApplyMs: Date.now(),
      lastApplyDurationMs: Date.now() - t0,
      lastError: error,
      lastErrorMs: error ? Date.now() : this.status.lastErrorMs,
      generation: this.status.generation + 1,
    };
  }

  async syncVpc(ns: string, st: VpcFirewallState, full: boolean, checkDrift = false): Promise<void> {
    const t0 = process.hrtime.bigint();
    const { model, script } = compile(st);
    const prev = this.applied.get(ns);
    let kind: "full" | "elements" | "none" = "full";
    let text = script;
    if (!full && prev && (!checkDrift || (await this.nft.tableExists(ns)))) {
      const d = diff(prev.model, model);
      if (d !== null) {
        kind = d === "" ? "none" : "elements";
        text = d;
      }
    }
    if (kind !== "none") {
      try {
        await this.nft.apply(ns, text);
        applies.inc({ kind, result: "ok" });
      } catch (err) {
        applies.inc({ kind, result: "error" });
        throw err;
      }
    }
    this.applied.set(ns, { model, state: st });
    applySeconds.observe({ kind }, Number(process.hrtime.bigint() - t0) / 1e9);
    if (kind !== "none" && prev) await this.clearDisallowed(ns, st);
    if (kind !== "none") this.status.applied++;
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
    this.pending = true;
    this.wake?.();
  }

  /** Start: full replace, then follow the change events; a periodic pass catches drift. */
  start(redis: Redis, driftIntervalMs: number): void {
    const loop = async () => {
      await this.syncAll(true);
      let lastDrift = Date.now();
      while (!this.stopped) {
        if (!this.pending) {
          await new Promise<void>((r) => {
            this.wake = r;
            setTimeout(r, 500).unref();
          });
        }
        if (this.stopped) break;
        // A failed pass (Redis not up yet, an nft error) is retried soon, not at the next drift check.
        if (this.status.lastError) {
          await new Promise((r) => setTimeout(r, 1000));
          this.pending = true;
        }
        const drift = Date.now() - lastDrift > driftIntervalMs;
        if (!this.pending && !drift) continue;
        this.pending = false;
        if (drift) lastDrift = Date.now();
        await this.syncAll(false, drift);
      }
    };
    void loop();
    void followEvents(
      redis,
      /^(fw\.|nic\.|subnet\.|vpc\.)/,
      () => this.kick(),
      () => this.stopped,
    );
  }

  stop(): void {
    this.stopped = true;
    this.wake?.();
  }
}
