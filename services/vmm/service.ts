// VmService: the metald-style VM manager of one hypervisor. CreateVm runs
// ipam → netagent → firewall → gateway → dns → boot over gRPC, journaling each step
// in Redis; if a step fails, every step already done is undone in reverse and
// the error names the step. Every undo is idempotent and keyed by the VM id,
// so a vmm killed at any point rolls the operation back (or finishes a
// delete) on restart: a VM is either fully up or fully gone.
//
// Read top-down: routes.ts → this class (validation, the steps, the journal,
// rollback and recovery) → its adapters: VmStore (Redis), the Booters
// (QEMU/Firecracker) and NetnsAdapter (netns.ts: the VM namespace and the
// connectivity probes). The other daemons are typed clients (Clients):
// grpc-js in main.ts, in-memory fakes in test/unit/vmm-saga.test.ts, which
// fails every step there (this file has no fault injection of its own).
import { randomBytes, randomUUID } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type Client, type ServiceImpl } from "@connectrpc/connect";
import type { Redis } from "ioredis";
import type { Logger } from "pino";
import { Counter, Histogram } from "prom-client";
import { DomainError, FailedPreconditionError, InvalidArgumentError, NotFoundError } from "../common/errors.js";
import { probeOf } from "./probe.js";
import { EVENTS, followEvents, followScoped, streamHead, type EventFields } from "../common/events.js";
import { newId } from "../common/ids.js";
import { metricsRegistry } from "../common/metrics.js";
import { runInScope, withSpan } from "../common/tracing.js";
import * as V from "../common/validate.js";
import { FirewallService } from "../../gen/microvpc/v1/firewall_pb.js";
import { DnsService } from "../../gen/microvpc/v1/dns_pb.js";
import { GatewayService, ImdsHttpEndpoint, ImdsHttpTokens } from "../../gen/microvpc/v1/gateway_pb.js";
import { IpamService } from "../../gen/microvpc/v1/ipam_pb.js";
import { NetAgentService, NicKind } from "../../gen/microvpc/v1/netagent_pb.js";
import { SubnetService } from "../../gen/microvpc/v1/subnet_pb.js";
import {
  ConnectivityResult,
  VmJournalEntrySchema,
  VmKind,
  VmOperation,
  VmSchema,
  VmService,
  VmState,
  VmStep,
  VmStepReportSchema,
  VmStepState,
  type CreateVmRequest,
  type Vm,
} from "../../gen/microvpc/v1/vm_pb.js";
import { VpcService } from "../../gen/microvpc/v1/vpc_pb.js";
import { kernelNetns, type NetnsAdapter, type ProbeResult } from "./netns.js";
import { LEASE_MS, nameEntry, needsRecovery, STEPS, unstarted, type StepName, type VmRec, type VmStore } from "./store.js";
import { VmWatchHub, watchVms } from "./watch.js";

/** How long DeleteVm waits for an operation in flight on the same VM (a CreateVm) before ABORTED. */
const LEASE_WAIT_MS = 20_000;

const stepSeconds = new Histogram({
  name: "microvpc_vmm_step_seconds",
  help: "Duration of each CreateVm/DeleteVm step.",
  labelNames: ["step", "op"] as const,
  buckets: [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 5],
  registers: [metricsRegistry],
});

const recoveries = new Counter({
  name: "microvpc_vmm_recoveries_total",
  help: "Recovery attempts of VMs a crash or a failed rollback left half-done, by result (ok, error: retried with backoff, gave_up: after the last attempt).",
  labelNames: ["result"] as const,
  registers: [metricsRegistry],
});

const eventBatches = new Counter({
  name: "microvpc_vmm_event_batches_total",
  help: "Batches of change events the vmm read, by feed: lookups (the VPCs whose lookups it has cached: their VPC, subnet and group changes), watch (the fleet's VM changes, read only while a WatchVms is open).",
  labelNames: ["feed"] as const,
  registers: [metricsRegistry],
});

/** Recovery of one VM: retried after 1 s, doubling to 60 s, at most this many attempts (then state FAILED until DeleteVm or a restart). */
const RECOVERY_ATTEMPTS = 8;
const RECOVERY_BASE_MS = 1000;
const RECOVERY_MAX_MS = 60_000;

export interface Clients {
  vpc: Client<typeof VpcService>;
  subnet: Client<typeof SubnetService>;
  ipam: Client<typeof IpamService>;
  netagent: Client<typeof NetAgentService>;
  firewall: Client<typeof FirewallService>;
  gateway: Client<typeof GatewayService>;
  dns: Client<typeof DnsService>;
}

/** Boots and stops real guests (kind=qemu/firecracker); kind=netns needs none. */
export interface Booter {
  boot(v: VmRec, netnsPath: string): Promise<{ pid: number; consoleLog: string; accel?: string; accelReason?: string }>;
  stop(v: VmRec): Promise<void>;
}

export interface VmmOptions {
  hostId: string;
  booters: Partial<Record<"qemu" | "firecracker", Booter>>;
  /** kind=netns namespaces and probes (default: the kernel's, through `ip netns`). */
  netns?: NetnsAdapter;
}

const STEP_ENUM: Record<StepName, VmStep> = {
  ipam: VmStep.IPAM,
  netagent: VmStep.NETAGENT,
  firewall: VmStep.FIREWALL,
  gateway: VmStep.GATEWAY,
  dns: VmStep.DNS,
  boot: VmStep.BOOT,
};

/**
 * The pause between reads of a change feed: a VM start appends a dozen
 * events, of which the vmm wants the rare vpc/subnet/group change (its
 * lookup cache) and, while a WatchVms is open, its own vm.* ones. Read in
 * batches, they cost a few reads per VM instead of one per event; a watch
 * hears of a change at most this much later.
 */
const EVENT_SETTLE_MS = 50;

/** How long a cached VPC/subnet/group lookup may be used without an event. */
const LOOKUP_TTL_MS = 30_000;

/**
 * CreateVm's steps in the order they depend on each other: the address, then
 * the NIC, then what needs only the NIC (at once), then the guest.
 */
const PHASES: StepName[][] = [["ipam"], ["netagent"], ["firewall", "gateway", "dns"], ["boot"]];
if (PHASES.flat().join() !== STEPS.join()) throw new Error("vmm: PHASES must list STEPS in order");
/**
 * How many of the first PHASES the claim's record already names (so no
 * write of their own precedes them): the address and the NIC, both undone
 * by the VM's owner string and namespace name alone, which the claim holds,
 * so a crash anywhere in them is rolled back from the NIC down.
 */
const CLAIMED_PHASES = 2;
/**
 * DeleteVm's undos: the guest stopped; then at once the DNS name, the
 * metadata, the NIC (DetachNic takes its devices down and clears the
 * address's conntrack entries by the NIC's mark) and the firewall binding.
 * The binding goes with `detaching`: the firewall takes the NIC out of its
 * tables altogether rather than keeping it as an attached NIC without
 * groups, so it has no flows to clear (that is one walk of the host's
 * whole conntrack hash per VM fewer) and makes one change, not two. Its
 * deletions and the netagent's wait for the kernel's RCU grace periods
 * side by side (7–12 ms each here), instead of one after the other. The
 * address last, once nothing on the host has it, so no new VM gets it while
 * it is in use.
 */
export const DELETE_PHASES: StepName[][] = [["boot"], ["dns", "gateway", "netagent", "firewall"], ["ipam"]];
if ([...DELETE_PHASES.flat()].sort().join() !== [...STEPS].sort().join()) throw new Error("vmm: DELETE_PHASES must list every step once");

/** How long a failed move of the host's VMs (VmStore.migrate) is answered as is before it is tried again. */
const MIGRATION_RETRY_MS = 5_000;

export class Vmm {
  private readonly netns: NetnsAdapter;

  constructor(
    readonly store: VmStore,
    readonly c: Clients,
    readonly opts: VmmOptions,
    readonly log: Logger,
  ) {
    this.netns = opts.netns ?? kernelNetns;
  }

  /** Prefix of every lease token this process takes. */
  private get leasePrefix(): string {
    return `${this.opts.hostId}/${process.pid}/`;
  }

  private leaseToken(): string {
    return `${this.leasePrefix}${randomBytes(6).toString("hex")}`;
  }

  /**
   * Renews a lease taken (by claim or acquireLease) until the returned
   * release is called; release(true) only stops renewing (the script that
   * ended the operation has dropped the lease already).
   */
  private hold(id: string, token: string): (released?: boolean) => Promise<void> {
    const timer = setInterval(() => {
      this.store.renewLease(id, token).then(
        (ok) => {
          if (!ok) this.log.error({ vm: id }, "lost the VM's lease while an operation ran");
        },
        (err) => this.log.warn({ vm: id, err: (err as Error).message }, "cannot renew the VM's lease"),
      );
    }, LEASE_MS / 3);
    timer.unref();
    return async (released = false) => {
      clearInterval(timer);
      if (released) return;
      await this.store.releaseLease(id, token).catch((err) => this.log.warn({ vm: id, err: (err as Error).message }, "cannot release the VM's lease"));
    };
  }

  /**
   * Waits (up to waitMs) for the VM's lease and holds it, with the VM's
   * record as it is once held (null: gone); ABORTED if another operation on
   * the VM (a CreateVm in flight) keeps it longer.
   */
  private async lease(id: string, waitMs: number): Promise<{ token: string; release: (released?: boolean) => Promise<void>; v: VmRec | null }> {
    const token = this.leaseToken();
    const deadline = Date.now() + waitMs;
    let pause = 20;
    for (;;) {
      const v = await this.store.acquireLeaseAndRead(id, token);
      if (v !== false) return { token, release: this.hold(id, token), v };
      if (Date.now() >= deadline) {
        const holder = await this.store.leaseHolder(id);
        throw new ConnectError(
          `VM ${id} is busy with another operation (a CreateVm or DeleteVm in flight${holder ? `, lease held by ${holder}` : ""}); retry`,
          Code.Aborted,
        );
      }
      await new Promise((r) => setTimeout(r, pause));
      pause = Math.min(pause * 2, 250);
    }
  }

  /**
   * What CreateVm looked up (a VPC, subnet or group by reference, each
   * checked by its owning service when first asked), kept until a VPC,
   * subnet or security-group event says something changed, and at most
   * LOOKUP_TTL_MS. A stale entry cannot create a VM where it should not:
   * the steps themselves (Allocate, AttachNic, BindNic) check again.
   */
  private readonly lookups = new Map<string, { value: unknown; vpc: string; atMs: number }>();
  /**
   * The VPCs the lookup feed follows, each until LOOKUP_TTL_MS after its
   * last lookup: so every cached entry's VPC is followed, and one whose
   * entries a change just dropped stays followed for the lookups that come
   * next (rather than leaving the feed and joining it again).
   */
  private readonly followed = new Map<string, number>();
  /** Asks the lookup feed to read the VPC set again (followInvalidations). */
  private refreshLookupFeed = () => {};

  /** `vpcOf`: the VPC the looked-up value belongs to, whose change feed then drops it. */
  private async lookup<T>(hits: { cached: boolean }, key: string, load: () => Promise<T>, vpcOf: (v: T) => string): Promise<T> {
    const hit = this.lookups.get(key);
    if (hit && Date.now() - hit.atMs < LOOKUP_TTL_MS) {
      hits.cached = true;
      return hit.value as T;
    }
    const value = await load();
    if (this.lookups.size >= 10_000) this.lookups.clear();
    const vpc = vpcOf(value);
    const known = (this.followed.get(vpc) ?? 0) > Date.now();
    this.followed.set(vpc, Date.now() + LOOKUP_TTL_MS);
    this.lookups.set(key, { value, vpc, atMs: Date.now() });
    if (!known) this.refreshLookupFeed();
    return value;
  }

  /** The VPCs the lookup feed follows: every VPC looked up in the last LOOKUP_TTL_MS. */
  lookupVpcs(): Set<string> {
    const now = Date.now();
    for (const [v, until] of this.followed) if (until <= now) this.followed.delete(v);
    return new Set(this.followed.keys());
  }

  /** Drops the cached lookups of these VPCs (all, given null). */
  private dropLookups(vpcs: Set<string> | null): void {
    if (!vpcs) return this.lookups.clear();
    for (const [k, e] of this.lookups) if (vpcs.has(e.vpc)) this.lookups.delete(k);
  }

  /** The open WatchVms streams (watch.ts), woken by vm.* events. */
  readonly watchHub = new VmWatchHub();

  /**
   * What the vmm hears of the fleet, and only that:
   * - its cached lookups: the change feed of each VPC they belong to (and
   *   this host's stream, as every host feed), whose VPC, subnet and
   *   security-group events drop that VPC's entries; a VPC nothing is
   *   cached of is not read;
   * - while a WatchVms is open (and WATCH_LINGER_MS after), the VM events
   *   of the whole fleet, which such a watch asks for (`mvpc:events`).
   */
  followInvalidations(redis: Redis, stopped: () => boolean): void {
    const feed = followScoped(
      redis,
      // A VPC whose lookups were just cached is followed once the feed's
      // blocked read returns (its default, 5 s, on a single Redis; until then
      // a change in it is met by CreateVm's retry with fresh lookups). An
      // idle vmm pays one XREAD per 5 s: 1 000 hosts are 200 commands/s.
      { host: this.opts.hostId, vpcs: async () => this.lookupVpcs(), settleMs: EVENT_SETTLE_MS },
      /^(vpc\.|subnet\.|fw\.sg\.)/,
      (events) => {
        eventBatches.inc({ feed: "lookups" });
        // Every event here names its VPC; one that does not (a resync of the host stream) drops them all.
        const vpcs = new Set<string>();
        for (const e of events) {
          if (!e.vpc) return this.dropLookups(null);
          vpcs.add(e.vpc);
        }
        this.dropLookups(vpcs);
      },
      stopped,
    );
    this.refreshLookupFeed = feed.refresh;
    this.watchHub.setFollower(() => {
      let ended = false;
      // The position first: a watch reads the VMs after `ready`, so a change made meanwhile is read again, never missed.
      const from = streamHead(redis, EVENTS).then(
        (h) => h.lastGenerated,
        () => "$",
      );
      const onMatch = (events: EventFields[]) => {
        eventBatches.inc({ feed: "watch" });
        this.watchHub.notify(events.map((e) => e.vm ?? ""));
      };
      void from.then((id) => followEvents(redis, /^vm\./, onMatch, () => ended || stopped(), EVENT_SETTLE_MS, id));
      return {
        ready: from.then(() => {}),
        stop: () => (ended = true),
      };
    });
  }

  owner(v: VmRec): string {
    return `${v.hostId}/${v.id}`;
  }

  vmNetns(v: VmRec): string {
    return `mvpcvm-${v.hostId}-${v.id.slice(-12)}`;
  }

  private journal(v: VmRec, op: string, step: string, state: string, msg = ""): void {
    v.journal.push({ t: Date.now(), op, step, state, msg });
    if (v.journal.length > 200) v.journal.splice(0, v.journal.length - 200);
  }

  // ---- steps and their undos; every undo is idempotent ----

  private async doStep(v: VmRec, step: StepName): Promise<string> {
    switch (step) {
      case "ipam": {
        const r = await this.c.ipam.allocate({ subnetId: v.subnetId, owner: this.owner(v), requestId: v.id, address: v.wantedAddress });
        v.address = r.allocation!.address;
        return v.address;
      }
      case "netagent": {
        let nic;
        if (v.kind === "netns") {
          v.netns = this.vmNetns(v);
          await this.netns.add(v.netns);
          nic = (
            await this.c.netagent.attachNic({
              vpc: v.vpcId,
              subnet: v.subnetId,
              kind: NicKind.VETH,
              options: { case: "veth", value: { netnsPath: `/run/netns/${v.netns}` } },
              address: v.address,
              owner: this.owner(v),
              hostname: v.hostname,
              guestInterface: "eth0",
              clientToken: v.id,
            })
          ).nic!;
        } else {
          nic = (
            await this.c.netagent.attachNic({
              vpc: v.vpcId,
              subnet: v.subnetId,
              kind: NicKind.TAP,
              options: { case: "tap", value: {} },
              address: v.address,
              owner: this.owner(v),
              hostname: v.hostname,
              clientToken: v.id,
            })
          ).nic!;
          v.netns = nic.vpcNamespace;
        }
        v.nicId = nic.id;
        v.hostIf = nic.hostInterface;
        v.mac = nic.guest?.mac ?? "";
        v.kernelIpArg = nic.guest?.kernelIpArg ?? "";
        return `${nic.id} ${nic.hostInterface}`;
      }
      case "firewall":
        await this.c.firewall.bindNic({
          nicId: v.nicId,
          vpc: v.vpcId,
          subnet: v.subnetId,
          address: v.address,
          mac: v.mac,
          hostInterface: v.hostIf,
          securityGroups: v.groups,
        });
        return v.groups.join(",") || "no groups (ingress denied, egress open)";
      case "gateway":
        await this.c.gateway.setInstanceMetadata({
          metadata: {
            instanceId: v.id,
            vpcId: v.vpcId,
            subnetId: v.subnetId,
            localIpv4: v.address,
            mac: v.mac,
            hostname: v.hostname || v.name,
            securityGroupIds: v.groups,
            userData: Buffer.from(v.userData, "base64"),
            publicKeys: v.sshKeys.map((k) => ({ name: k.name, opensshKey: k.key })),
            tags: v.labels,
            options: { httpTokens: v.imds.tokens, httpEndpoint: v.imds.endpoint, httpPutResponseHopLimit: v.imds.hopLimit },
          },
        });
        return "metadata registered";
      case "dns": {
        // VM names are DNS labels by construction (validate.name is a subset
        // of a label), so every VM gets NAME.VPC.internal. A name held by
        // another owner (an operator's record) fails the create: ALREADY_EXISTS,
        // everything undone, rather than a VM that silently has no name.
        const r = await this.c.dns.setDnsRecord({ vpc: v.vpcId, name: v.name, address: v.address, owner: v.id });
        return r.record!.fqdn;
      }
      case "boot": {
        if (v.kind === "netns") return "namespace ready";
        const b = this.opts.booters[v.kind];
        if (!b) throw new FailedPreconditionError(`kind ${v.kind} cannot boot on this hypervisor (no booter configured)`);
        const r = await b.boot(v, `/run/netns/${v.netns}`);
        v.pid = r.pid;
        v.consoleLog = r.consoleLog;
        v.accel = r.accel;
        v.accelReason = r.accelReason;
        return `pid ${r.pid}${r.accel ? `, ${r.accel} (${r.accelReason})` : ""}`;
      }
    }
  }

  private async undoStep(v: VmRec, step: StepName): Promise<void> {
    const ignoreMissing = (e: unknown) => {
      if (e instanceof ConnectError && e.code === Code.NotFound) return;
      throw e;
    };
    switch (step) {
      case "boot":
        if (v.kind !== "netns") await this.opts.booters[v.kind]?.stop(v);
        return;
      case "dns":
        // By owner: removes what this VM holds and nothing else (NOT_FOUND: the VPC is gone, and its records with it).
        await this.c.dns.deleteDnsRecord({ vpc: v.vpcId, owner: v.id }).catch(ignoreMissing);
        return;
      case "gateway":
        await this.c.gateway.deleteInstanceMetadata({ instanceId: v.id }).catch(ignoreMissing);
        return;
      case "firewall":
        // The netagent's undo detaches the NIC (in DeleteVm at the same time, in a rollback next).
        if (v.nicId) await this.c.firewall.unbindNic({ nicId: v.nicId, detaching: true }).catch(ignoreMissing);
        return;
      case "netagent":
        await this.c.netagent.detachNic({ owner: this.owner(v) });
        if (v.kind === "netns") await this.netns.del(this.vmNetns(v));
        return;
      case "ipam":
        await this.c.ipam.release({ subnetId: v.subnetId, owner: this.owner(v), requestId: v.id }).catch(ignoreMissing);
        return;
    }
  }

  /** Undoes every step of v that may have happened, in reverse, and forgets v. */
  async rollback(v: VmRec, upTo: StepName): Promise<void> {
    v.op = "rollback";
    const last = STEPS.indexOf(upTo);
    for (let i = last; i >= 0; i--) {
      const step = STEPS[i];
      const t0 = Date.now();
      await withSpan(`undo ${step}`, stepAttrs(v, step, "undo"), () => this.undoStep(v, step));
      stepSeconds.observe({ step, op: "undo" }, (Date.now() - t0) / 1000);
      this.journal(v, "rollback", step, "undone");
    }
    await this.store.remove(v);
  }

  /**
   * Creates in phases; the steps of one phase do not depend on each other
   * (the firewall binding, the metadata record and the DNS name all need
   * only the NIC) and run at once. Before a phase starts, the record says
   * which steps it runs (one write, carrying the previous phase's results
   * too): after a crash, recovery rolls back from the last step on record,
   * and every undo is idempotent, so a step that never ran costs nothing.
   */
  async create(v: VmRec, leaseToken: string): Promise<VmRec> {
    v.op = "create";
    for (const [i, phase] of PHASES.entries()) {
      for (const step of phase) this.journal(v, "create", step, "running");
      // The attempts are on record before they start: the first phases by the
      // claim (CLAIMED_PHASES); a netns VM's boot touches nothing (a crash
      // there leaves nothing to undo), so its record is the last one.
      if (i >= CLAIMED_PHASES && !(v.kind === "netns" && phase.every((s) => s === "boot"))) await this.store.put(v);
      const results = await Promise.allSettled(
        phase.map(async (step) => {
          const t0 = Date.now();
          const detail = await withSpan(`step ${step}`, stepAttrs(v, step, "create"), () => this.doStep(v, step));
          v.done.push({ step, startMs: t0, endMs: Date.now(), detail });
          stepSeconds.observe({ step, op: "create" }, (Date.now() - t0) / 1000);
          this.journal(v, "create", step, "done", detail);
        }),
      );
      v.done.sort((a, b) => STEPS.indexOf(a.step as StepName) - STEPS.indexOf(b.step as StepName));
      const failedAt = results.findIndex((r) => r.status === "rejected");
      if (failedAt < 0) continue;
      const step = phase[failedAt];
      const err = (results[failedAt] as PromiseRejectedResult).reason as unknown;
      const cause = errorText(err);
      this.log.warn({ vm: v.id, step, err: cause }, "CreateVm step failed; rolling back");
      this.journal(v, "create", step, "failed", cause);
      try {
        await this.rollback(v, phase[phase.length - 1]);
      } catch (undoErr) {
        v.state = "failed";
        v.statusMessage = `step ${step} failed (${cause}) and the rollback failed: ${errorText(undoErr)}; the vmm retries on restart`;
        await this.store.put(v);
        throw new ConnectError(v.statusMessage, Code.Internal);
      }
      const code = err instanceof ConnectError ? err.code : err instanceof DomainError ? err.code : Code.Internal;
      throw new ConnectError(`CreateVm failed at step ${step}: ${cause}; every step done before it was undone`, code);
    }
    v.op = "";
    v.state = "running";
    v.startedMs = Date.now();
    // The last write lets the VM's lease go.
    await this.store.put(v, leaseToken);
    return v;
  }

  /** Deletes v; with `leaseToken` (the lease held for it), the record's removal drops the lease too. */
  async delete(v: VmRec, leaseToken = ""): Promise<void> {
    v.op = "delete";
    v.state = "deleting";
    this.journal(v, "delete", "all", "running");
    await this.store.put(v);
    for (const phase of DELETE_PHASES) {
      // All of a phase's undos are tried before the first failure is thrown.
      const results = await Promise.allSettled(
        phase.map(async (step) => {
          const t0 = Date.now();
          await withSpan(`undo ${step}`, stepAttrs(v, step, "delete"), () => this.undoStep(v, step));
          stepSeconds.observe({ step, op: "delete" }, (Date.now() - t0) / 1000);
        }),
      );
      const failed = results.find((r) => r.status === "rejected");
      if (failed) throw (failed as PromiseRejectedResult).reason;
    }
    await this.store.remove(v, leaseToken);
  }

  /** VMs whose recovery failed: attempts so far, when the next is due, the last error. */
  readonly recoveryFailures = new Map<string, { attempts: number; nextMs: number; error: string }>();
  private recovering = false;
  /**
   * Whether a recovery pass of this process has completed: until one has,
   * each pass reads every record of the host and repairs the unsettled set
   * from them (records an earlier release wrote have no entry there).
   */
  private recoveredOnce = false;
  /** The move of this host's VMs from earlier layouts (VmStore.migrate), once it succeeded. */
  private migration?: Promise<void>;

  /**
   * Resolves once this host's VMs are under the names this release reads
   * (VmStore.migrate, run once per process; a failure is tried again on the
   * next call). Until then a CreateVm or DeleteVm would not see this host's
   * earlier VMs (and could take the name of one), so they wait for it, and
   * fail with UNAVAILABLE while it cannot be done.
   */
  private migrated(background = false): Promise<void> {
    // The recovery loop (every second) tries again only every MIGRATION_RETRY_MS after a failure; a call does at once.
    if (background && this.migrationFailure && Date.now() - this.migrationFailure.atMs < MIGRATION_RETRY_MS) return Promise.reject(this.migrationFailure.err);
    this.migration ??= this.store.migrate().then(
      () => {
        this.migrationFailure = undefined;
      },
      (err: unknown) => {
        this.migration = undefined;
        const e = new ConnectError(`this vmm has not yet moved its host's VMs from the earlier Redis layout (${errorText(err)}); retry`, Code.Unavailable);
        this.migrationFailure = { atMs: Date.now(), err: e };
        throw e;
      },
    );
    return this.migration;
  }
  private migrationFailure?: { atMs: number; err: ConnectError };

  /**
   * Rolls back creates and finishes deletes that a crash (or a failed
   * rollback) left half-done. A VM whose recovery fails is retried with
   * backoff (RECOVERY_*), visible in microvpc_vmm_recoveries_total and in
   * InspectVm (status message and journal). Each VM is recovered under its
   * lease: never while this process's CreateVm or DeleteVm of it runs.
   *
   * Which VMs: until a pass of this process has completed, every record of
   * the host is read (an earlier release's records have no entry in the
   * unsettled set), and the set is repaired from them; after that, a pass
   * reads the unsettled set and its members' records alone (the store's
   * scripts keep it with each record), so an idle pass costs one SMEMBERS,
   * however many VMs the host runs.
   */
  async recover(): Promise<void> {
    if (this.recovering) return;
    this.recovering = true;
    try {
      // First, once: records earlier versions wrote under other names move under this host's hash tag (VmStore.migrate).
      await this.migrated(true);
      let todo: VmRec[];
      if (this.recoveredOnce) todo = await this.store.unsettled();
      else {
        todo = (await this.store.ofHost(this.opts.hostId)).filter(needsRecovery);
        const { added, dropped } = await this.store.repairUnsettled(todo.map((v) => v.id));
        if (added.length || dropped) this.log.info({ added: added.length, dropped }, "repaired the set of VMs to recover from this host's records");
      }
      for (const v0 of todo) {
        const f = this.recoveryFailures.get(v0.id);
        if (f && (f.attempts >= RECOVERY_ATTEMPTS || f.nextMs > Date.now())) continue;
        const token = this.leaseToken();
        // Held by this process: an operation in flight, not a leftover.
        if (!(await this.store.acquireLease(v0.id, token, this.leasePrefix))) continue;
        const release = this.hold(v0.id, token);
        try {
          // A request id of its own (on the vmm's lines and every daemon's it calls), and a trace of its own.
          await runInScope({ reqId: `recover-${randomUUID()}` }, () => withSpan("recover", { "microvpc.vm.id": v0.id }, () => this.recoverOne(v0.id, f)));
        } finally {
          await release();
        }
      }
      this.recoveredOnce = true;
    } finally {
      this.recovering = false;
    }
  }

  private async recoverOne(id: string, f: { attempts: number } | undefined): Promise<void> {
    const v = await this.store.getOwn(id);
    if (!v || !needsRecovery(v)) {
      this.recoveryFailures.delete(id);
      return;
    }
    try {
      if (v.op === "create" || v.op === "rollback") {
        const current = v.journal.filter((j) => j.op === "create").at(-1)?.step as StepName | undefined;
        this.log.info({ vm: v.id, at: current, attempt: (f?.attempts ?? 0) + 1 }, "rolling back an interrupted create");
        await this.rollback(v, current && STEPS.includes(current) ? current : "boot");
      } else {
        this.log.info({ vm: v.id, attempt: (f?.attempts ?? 0) + 1 }, "finishing an interrupted delete");
        await this.delete(v);
      }
      this.recoveryFailures.delete(id);
      recoveries.inc({ result: "ok" });
    } catch (err) {
      const error = errorText(err);
      const attempts = (f?.attempts ?? 0) + 1;
      const delayMs = Math.min(RECOVERY_MAX_MS, RECOVERY_BASE_MS * 2 ** (attempts - 1));
      const last = attempts >= RECOVERY_ATTEMPTS;
      this.recoveryFailures.set(id, { attempts, nextMs: Date.now() + delayMs, error });
      recoveries.inc({ result: last ? "gave_up" : "error" });
      v.state = "failed";
      v.statusMessage = last
        ? `recovery failed ${attempts} times, giving up (last: ${error}); DeleteVm or a vmm restart tries again`
        : `recovery attempt ${attempts}/${RECOVERY_ATTEMPTS} failed (${error}); retrying in ${Math.round(delayMs / 1000)} s`;
      this.journal(v, "recover", "all", last ? "gave up" : "failed", v.statusMessage);
      // Only a record still there: a recovery that got as far as removing it is done.
      if (await this.store.getOwn(id)) await this.store.put(v);
      this.log.error(
        { vm: id, err: error, attempts, retryInMs: last ? undefined : delayMs },
        last ? "recovery failed; giving up" : "recovery failed; will retry",
      );
    }
  }

  /** Retries recovery in the background (every intervalMs; each VM on its own backoff). */
  startRecoveryRetries(intervalMs = 1000): () => void {
    const timer = setInterval(() => {
      this.recover().catch((err) => this.log.warn({ err: (err as Error).message }, "recovery pass failed; retrying"));
    }, intervalMs);
    timer.unref();
    return () => clearInterval(timer);
  }

  /**
   * A VM by id or name (in the VPC vpcRef, if given). `field` and `vpcField`
   * name the request fields the two came from, so a refusal names them too
   * (and not the field of the VpcService call made with them).
   */
  async resolve(ref: string, vpcRef: string, field = "ref", vpcField = "vpc"): Promise<VmRec | null> {
    if (/^vm-[0-9a-f]{12}$/.test(ref)) return this.store.get(ref);
    V.name(field, ref);
    if (vpcRef) V.ref(vpcField, vpcRef, "vpc");
    if (!vpcRef) {
      const all = (await this.store.ofHost(this.opts.hostId)).filter((v) => v.name === ref);
      if (all.length > 1) throw new InvalidArgumentError("vpc", `several VMs are named ${ref}; say which VPC`);
      return all[0] ?? null;
    }
    const vpc = (await this.c.vpc.getVpc({ ref: vpcRef })).vpc!;
    return this.store.byName(vpc.id, ref);
  }

  vmMsg(v: VmRec): Vm {
    const kind = { netns: VmKind.NETNS, qemu: VmKind.QEMU, firecracker: VmKind.FIRECRACKER }[v.kind];
    const state = { pending: VmState.PENDING, running: VmState.RUNNING, deleting: VmState.DELETING, failed: VmState.FAILED }[v.state];
    return create(VmSchema, {
      id: v.id,
      name: v.name,
      vpcId: v.vpcId,
      subnetId: v.subnetId,
      kind,
      state,
      statusMessage: v.statusMessage,
      hostId: v.hostId,
      securityGroupIds: v.groups,
      hostname: v.hostname,
      vcpus: v.vcpus,
      memoryMib: v.memoryMib,
      pid: v.pid,
      namespace: v.netns,
      consoleLogPath: v.consoleLog,
      accelerator: v.accel ?? "",
      acceleratorReason: v.accelReason ?? "",
      labels: v.labels,
      nics: v.nicId
        ? [
            {
              id: v.nicId,
              vpcId: v.vpcId,
              subnetId: v.subnetId,
              hostInterface: v.hostIf,
              guest: { address: v.address, mac: v.mac, kernelIpArg: v.kernelIpArg },
            },
          ]
        : [],
      createTime: timestampFromMs(v.createdMs),
      startTime: v.startedMs ? timestampFromMs(v.startedMs) : undefined,
    });
  }

  /** CreateVm; `hits` records whether a cached lookup was used (see lookup). */
  private async createVmOnce(req: CreateVmRequest, hits: { cached: boolean }): Promise<{ vm: Vm; created: boolean }> {
    const name = V.name("name", req.name);
    // Checked here, so a refusal names this request's fields (VpcService's would say "ref").
    V.ref("vpc", req.vpc, "vpc");
    V.ref("subnet", req.subnet, "subnet");
    for (const [i, g] of req.securityGroups.entries()) V.ref(`security_groups[${i}]`, g, "sg");
    const vpc = await this.lookup(
      hits,
      `vpc ${req.vpc}`,
      async () => (await this.c.vpc.getVpc({ ref: req.vpc })).vpc!,
      (v) => v.id,
    );
    const subnet = await this.lookup(
      hits,
      `subnet ${vpc.id} ${req.subnet}`,
      async () => (await this.c.subnet.getSubnet({ ref: req.subnet, vpc: vpc.id })).subnet!,
      (s) => s.vpcId,
    );
    if (subnet.vpcId !== vpc.id) throw new InvalidArgumentError("subnet", `subnet ${subnet.name} is not in VPC ${vpc.name}`);
    if (req.address) V.ipv4("address", req.address);
    if (req.securityGroups.length > 16) throw new InvalidArgumentError("security_groups", `has ${req.securityGroups.length}; at most 16`);
    const groups: string[] = [];
    for (const [i, g] of req.securityGroups.entries()) {
      try {
        groups.push(
          await this.lookup(
            hits,
            `sg ${vpc.id} ${g}`,
            async () => (await this.c.firewall.getSecurityGroup({ ref: g, vpc: vpc.id })).securityGroup!.id,
            () => vpc.id,
          ),
        );
      } catch (e) {
        if (e instanceof ConnectError && e.code === Code.NotFound)
          throw new NotFoundError("security group", g, `security_groups[${i}] is not a group of VPC ${vpc.name}`);
        throw e;
      }
    }
    if (!(req.kind in VmKind)) throw new InvalidArgumentError("kind", `${req.kind} is not a VM kind; use VM_KIND_NETNS, VM_KIND_QEMU or VM_KIND_FIRECRACKER`);
    for (const [f, v, e] of [
      ["imds_options.http_tokens", req.imdsOptions?.httpTokens, ImdsHttpTokens],
      ["imds_options.http_endpoint", req.imdsOptions?.httpEndpoint, ImdsHttpEndpoint],
    ] as const) {
      if (v !== undefined && !(v in e)) throw new InvalidArgumentError(f, `${v} is not one of its values`);
    }
    const kind = req.kind === VmKind.QEMU ? "qemu" : req.kind === VmKind.FIRECRACKER ? "firecracker" : "netns";
    if (kind !== "netns" && !this.opts.booters[kind])
      throw new FailedPreconditionError(`kind ${kind} is not available on this hypervisor; use NETNS${kind === "firecracker" ? " or QEMU" : ""}`);
    if (req.userData.length > 16384) throw new InvalidArgumentError("user_data", `is ${req.userData.length} bytes; at most 16384`);
    const v: VmRec = {
      id: newId("vm"),
      name,
      hostId: this.opts.hostId,
      vpcId: vpc.id,
      subnetId: subnet.id,
      kind,
      state: "pending",
      statusMessage: "",
      groups,
      wantedAddress: req.address,
      hostname: req.hostname ? V.name("hostname", req.hostname) : name,
      vcpus: req.vcpus ?? 1,
      memoryMib: req.memoryMib ?? 256,
      userData: Buffer.from(req.userData).toString("base64"),
      sshKeys: req.sshKeys.map((k) => ({ name: k.name, key: k.opensshKey })),
      labels: V.labels("labels", req.labels),
      imds: { tokens: req.imdsOptions?.httpTokens ?? 0, endpoint: req.imdsOptions?.httpEndpoint ?? 0, hopLimit: req.imdsOptions?.httpPutResponseHopLimit },
      clientToken: V.token("client_token", req.clientToken, { optional: true }),
      ...unstarted(),
    };
    // The claim's record names the first phases' steps (CLAIMED_PHASES), so
    // that it is all a crash in them needs: one write fewer before the NIC.
    for (const step of PHASES.slice(0, CLAIMED_PHASES).flat()) this.journal(v, "create", step, "queued");
    const token = this.leaseToken();
    // The VM's lease, taken with the claim's first step: a DeleteVm waits for
    // this create. Renewed from then on, since the claim's second step (the
    // name) may take a while when Redis does.
    let holding: ((released?: boolean) => Promise<void>) | undefined;
    let held: string;
    try {
      // The claim refuses a name some VM holds; only then is that VM read (the same request again gets it back).
      held = await this.store.claim(v, token, () => (holding = this.hold(v.id, token)));
    } catch (err) {
      // A record left by a claim cut short is recovery's (op create): let the lease go for it.
      await holding?.();
      throw err;
    }
    if (held !== nameEntry(v)) {
      // The claim took its record and lease back.
      await holding?.(true);
      const existing = await this.store.byName(vpc.id, name);
      if (!existing) {
        throw new ConnectError(`VM ${name} is being created in VPC ${vpc.name} (index entry ${V.show(held)}); retry to get it`, Code.AlreadyExists);
      }
      if (existing.state === "running" && existing.subnetId === subnet.id && (req.clientToken === "" || existing.clientToken === req.clientToken)) {
        return { vm: this.vmMsg(existing), created: false };
      }
      throw new ConnectError(
        existing.state === "pending"
          ? `VM ${name} is being created in VPC ${vpc.name} (${existing.id} on ${existing.hostId}, ${existing.state}); retry to get it`
          : `VM ${name} already exists in VPC ${vpc.name} (${existing.id}, ${existing.state}); delete it or pick another name`,
        Code.AlreadyExists,
      );
    }
    // A claim that won holds the lease (onLeased ran).
    const release = holding ?? this.hold(v.id, token);
    let released = false;
    try {
      const done = await this.create(v, token);
      released = true;
      return { vm: this.vmMsg(done), created: true };
    } finally {
      await release(released);
    }
  }

  readonly impl: ServiceImpl<typeof VmService> = {
    // CreateVm and DeleteVm are spans of their own (when tracing is on:
    // tracing.ts), the steps' spans under them, the daemons' RPC spans under those.
    createVm: (req) =>
      withSpan("CreateVm", { "microvpc.vm.name": req.name, "microvpc.vpc": req.vpc, "microvpc.subnet": req.subnet }, async () => {
        await this.migrated();
        const hits = { cached: false };
        try {
          return await this.createVmOnce(req, hits);
        } catch (err) {
          // A lookup served from the cache may be stale (a group deleted and
          // made again a moment ago, before its event arrived): everything was
          // undone, so forget the cache and try once more with fresh lookups.
          const stale = err instanceof ConnectError && [Code.NotFound, Code.InvalidArgument, Code.FailedPrecondition].includes(err.code);
          if (!hits.cached || !stale) throw err;
          this.lookups.clear();
          return await this.createVmOnce(req, { cached: false });
        }
      }),

    deleteVm: (req) =>
      withSpan("DeleteVm", { "microvpc.vm.ref": req.ref, "microvpc.vpc": req.vpc }, async () => {
        await this.migrated();
        const v = await this.resolve(req.ref, req.vpc);
        if (!v) return { deleted: false };
        if (v.hostId !== this.opts.hostId) throw new FailedPreconditionError(`VM ${v.id} runs on hypervisor ${v.hostId}; ask its vmm`);
        // Never interleaved with a CreateVm (or another DeleteVm) of the same
        // VM: wait for its lease, then act on the record as it is now.
        const { token, release, v: now } = await this.lease(v.id, LEASE_WAIT_MS);
        let released = false;
        try {
          if (!now) return { deleted: false };
          // The record's removal drops the lease too.
          await this.delete(now, token);
          released = true;
          return { deleted: true };
        } finally {
          await release(released);
        }
      }),

    getVm: async (req) => {
      const v = await this.resolve(req.ref, req.vpc);
      if (!v) throw new NotFoundError("vm", req.ref);
      return { vm: this.vmMsg(v) };
    },

    listVms: async (req) => {
      let vms = await this.store.all();
      if (req.vpc) {
        V.ref("vpc", req.vpc, "vpc");
        const vpc = (await this.c.vpc.getVpc({ ref: req.vpc })).vpc!;
        vms = vms.filter((v) => v.vpcId === vpc.id);
      }
      if (req.subnet) vms = vms.filter((v) => v.subnetId === req.subnet);
      return { vms: vms.sort((a, b) => a.name.localeCompare(b.name)).map((v) => this.vmMsg(v)), nextPageToken: "" };
    },

    inspectVm: async (req) => {
      const v = await this.resolve(req.ref, req.vpc);
      if (!v) throw new NotFoundError("vm", req.ref);
      const steps = STEPS.map((s) => {
        const d = v.done.find((x) => x.step === s);
        return create(VmStepReportSchema, {
          step: STEP_ENUM[s],
          state: d ? VmStepState.DONE : VmStepState.PENDING,
          detail: d?.detail ?? "",
          startTime: d ? timestampFromMs(d.startMs) : undefined,
          endTime: d ? timestampFromMs(d.endMs) : undefined,
          durationUs: d ? BigInt((d.endMs - d.startMs) * 1000) : 0n,
        });
      });
      const opEnum = { "": VmOperation.UNSPECIFIED, create: VmOperation.CREATE, delete: VmOperation.DELETE, rollback: VmOperation.ROLLBACK }[v.op];
      return {
        vm: this.vmMsg(v),
        steps,
        operation: opEnum,
        journal: v.journal.map((j) =>
          create(VmJournalEntrySchema, {
            time: timestampFromMs(j.t),
            message: `${j.op} ${j.step} ${j.state}${j.msg ? `: ${j.msg}` : ""}`,
            step: STEP_ENUM[j.step as StepName] ?? VmStep.UNSPECIFIED,
          }),
        ),
      };
    },

    watchVms: (req, ctx) =>
      watchVms(
        {
          store: this.store,
          resolve: (ref, vpc) => this.resolve(ref, vpc),
          vpcId: async (ref) => (await this.c.vpc.getVpc({ ref })).vpc!.id,
          vmMsg: (v) => this.vmMsg(v),
        },
        this.watchHub,
        req,
        ctx.signal,
      ),

    testConnectivity: async (req) => {
      const p = probeOf(req);
      const src = await this.resolve(req.source, req.vpc, "source");
      if (!src) throw new NotFoundError("vm", req.source);
      if (src.kind !== "netns")
        throw new FailedPreconditionError(`TestConnectivity runs probes inside kind=netns VMs; ${src.name} is ${src.kind} (use its console)`);
      let target = req.target;
      let targetVm = "";
      if (!ipLike(target)) {
        const t = await this.resolve(target, src.vpcId, "target");
        if (!t) throw new NotFoundError("vm", target, `no VM of that name in the source's VPC`);
        target = t.address;
        targetVm = t.id;
      } else V.ipv4("target", target);
      const t0 = process.hrtime.bigint();
      let result: ConnectivityResult;
      let method: string;
      if (p.proto === "icmp") {
        method = "icmp echo";
        result = (await this.netns.ping(src.netns, target, p.timeoutMs)) ? ConnectivityResult.REACHABLE : ConnectivityResult.TIMEOUT;
      } else if (p.proto === "tcp") {
        method = `tcp connect :${p.port}`;
        result = PROBE_RESULT[await this.netns.tcpProbe(src.netns, target, p.port, p.timeoutMs)];
      } else {
        method = `udp datagram :${p.port}`;
        result = PROBE_RESULT[await this.netns.udpProbe(src.netns, target, p.port, p.timeoutMs)];
      }
      const us = Number((process.hrtime.bigint() - t0) / 1000n);
      return {
        reachable: result === ConnectivityResult.REACHABLE,
        result,
        latencyUs: result === ConnectivityResult.REACHABLE ? us : 0,
        sourceAddress: src.address,
        targetAddress: target,
        targetVmId: targetVm,
        method,
        detail: "",
      };
    },
  };
}

/** The attributes of a step's span. */
function stepAttrs(v: VmRec, step: StepName, op: string): Record<string, string> {
  return { "microvpc.step": step, "microvpc.op": op, "microvpc.vm.id": v.id, "microvpc.vm.kind": v.kind };
}

const PROBE_RESULT: Record<ProbeResult, ConnectivityResult> = {
  connected: ConnectivityResult.REACHABLE,
  refused: ConnectivityResult.REFUSED,
  timeout: ConnectivityResult.TIMEOUT,
  unreachable: ConnectivityResult.UNREACHABLE,
};

/** An error's own message, without the "[code] " prefix ConnectError.message carries (its code is said elsewhere). */
function errorText(err: unknown): string {
  return err instanceof ConnectError ? err.rawMessage : err instanceof Error ? err.message : String(err);
}

function ipLike(s: string): boolean {
  return /^[0-9.]+$/.test(s);
}
