// The netagent's peering loop: reads the peerings of the VPCs this host
// holds, extends the host's VPCs by the ones a peering makes it carry
// (peering-plan.ts explains the path), and applies the plan: veth links
// between VPC namespaces, protocol-77 routes, the pinned next hop, and the
// microvpc_peering nft table. Then it acknowledges each peering in Redis, so
// GetPeering can say when every host has it.
//
// While Redis is unreachable the last peerings read are kept: traffic keeps
// flowing; nothing is removed on a failed read.
import { existsSync } from "node:fs";
import type { Redis } from "ioredis";
import type { Logger } from "pino";
import { LinuxNft, type NftApplier } from "../common/nft/linux.js";
import { followScoped } from "../common/events.js";
import { ackPeering, peeringIdsOf, peeringKeys, peeringsOf, pruneAcks, type PeeringRec } from "../peering/schema.js";
import type { Agent, AgentPeering } from "./agent.js";
import { desiredPeering, planPeering, routedPeers, spanOf, PEERING_NEXTHOP, PEERING_PROTO, type NsObserved } from "./peering-plan.js";
import type { HostDesired } from "./store.js";
import { naKeys } from "./schema.js";

const FULL_EVERY = 6;

export class PeeringSync implements AgentPeering {
  /** Peerings of the VPCs present here, as last read from Redis. */
  peerings: PeeringRec[] = [];
  lastError = "";
  lastChanges: string[] = [];
  /** nft script last applied per namespace. */
  private readonly nftApplied = new Map<string, string>();
  /** Namespaces that had something of ours after the last pass. */
  private touched = new Set<string>();
  private passes = 0;
  private stopped = false;
  private mutex: Promise<unknown> = Promise.resolve();

  constructor(
    readonly agent: Agent,
    readonly redis: Redis,
    readonly log: Logger,
    /** Runs the peering filter's transactions (FakeNft in tests). */
    readonly nft: NftApplier = new LinuxNft(),
  ) {}

  /**
   * Adds to `desired` the VPCs this host carries because of a peering
   * (marked `peered`). Reads Redis; on failure keeps the last peerings.
   */
  async extend(desired: HostDesired): Promise<void> {
    const real = new Set([...desired.vpcs.values()].filter((v) => !v.peered).map((v) => v.vpcId));
    try {
      // Each record is checked by peering/schema.ts; a bad one is skipped and reported.
      const bad = new Map<string, string>();
      const onInvalid = (id: string, reason: string) => bad.set(id, reason);
      const first = await peeringsOf(this.redis, [...real], onInvalid);
      const span = spanOf(real, first);
      // The spanned VPCs' own peerings matter too (their unreachable routes, their links here).
      this.peerings = span.length ? await peeringsOf(this.redis, [...real, ...span], onInvalid) : first;
      this.agent.invalid.report(
        "peering",
        [...bad].map(([id, reason]) => ({ kind: "peering", key: peeringKeys(this.redis).pcx(id), field: "", reason })),
      );
    } catch (err) {
      this.log.warn({ err: (err as Error).message }, "cannot read peerings; keeping the last known ones");
    }
    for (const vpcId of spanOf(real, this.peerings)) {
      if (!desired.vpcs.has(vpcId)) desired.vpcs.set(vpcId, { vpcId, ns: this.agent.nsOf(vpcId), createdMs: 0, peered: true });
    }
  }

  /** For the overlay: the peers of a VPC whose NICs ride its tunnel, and the CIDRs allowed. */
  routedPeers(vpcId: string): { vpcId: string; cidrs: string[] }[] {
    return routedPeers(vpcId, this.peerings);
  }

  /** Follows peering.* events: each one runs a reconcile pass (which ends in sync()). */
  start(): void {
    // A peering names both VPCs: each one's stream has it (common/events.ts).
    void followScoped(
      this.redis,
      // Every event of the VPCs held here arrives, for the rare peering.* among them: in batches.
      { host: this.agent.hostId, vpcs: (r) => r.hkeys(naKeys(r).vpcs(this.agent.hostId)), settleMs: 100 },
      /^peering\./,
      () => this.agent.kick(),
      () => this.stopped,
    );
  }

  /** A pass soon if the VPC has peerings (called when a VPC becomes held here). */
  async kickIfPeered(vpcId: string): Promise<void> {
    try {
      if ((await peeringIdsOf(this.redis, vpcId)).length > 0) void this.agent.kick();
    } catch {
      // the periodic pass catches up
    }
  }

  stop(): void {
    this.stopped = true;
  }

  private async observe(ns: string): Promise<NsObserved> {
    if (!existsSync(`/run/netns/${ns}`)) return { exists: false, links: [], routes: [], neigh: [] };
    const [links, routes, neigh] = await Promise.all([
      this.agent.kernel.links(ns),
      this.agent.kernel.routes(ns, ["proto", String(PEERING_PROTO)]),
      this.agent.kernel.neighbours(ns, PEERING_NEXTHOP),
    ]);
    return { exists: true, links: links.filter((l) => /^pc[0-9a-f]{12}$/.test(l.ifname)), routes, neigh };
  }

  /** One pass over every VPC namespace of this host. */
  sync(): Promise<string[]> {
    const p = this.mutex.then(() => this.syncOnce());
    this.mutex = p.catch(() => undefined);
    return p;
  }

  private async syncOnce(): Promise<string[]> {
    const present = new Set([...this.agent.desired.vpcs.keys()].filter((v) => existsSync(`/run/netns/${this.agent.nsOf(v)}`)));
    const want = desiredPeering(present, this.peerings, (v) => this.agent.nsOf(v));
    const namespaces = new Set([...present].map((v) => this.agent.nsOf(v)));
    // Reading a namespace costs three execs: read the ones a peering concerns
    // (or that we changed), and every namespace on the first pass and every
    // FULL_EVERY-th one (leftovers of a peering deleted while we were down).
    const full = this.passes++ % FULL_EVERY === 0;
    const observed = new Map<string, NsObserved>();
    for (const ns of namespaces) {
      if (full || want.has(ns) || this.touched.has(ns)) observed.set(ns, await this.observe(ns));
    }
    const plan = planPeering(this.agent.hostId, want, observed);
    const errors: string[] = [];
    const step = async (what: Map<string, string[]>) => {
      for (const [ns, lines] of what) {
        try {
          await this.agent.kernel.ipBatch(ns, lines);
        } catch (err) {
          errors.push(`${ns}: ${(err as Error).message}`);
        }
      }
    };
    await step(plan.remove);
    await step(plan.create);
    await step(plan.configure);
    this.touched = new Set([...want.keys()].filter((ns) => namespaces.has(ns)));
    for (const [ns, script] of plan.nft) {
      // Namespaces that never had a peering table from us need no "delete nothing".
      if (this.nftApplied.get(ns) === script || (!want.get(ns)?.links.length && !this.nftApplied.has(ns))) continue;
      try {
        await this.nft.apply(ns, plan.nftTx.get(ns)!);
        this.nftApplied.set(ns, script);
      } catch (err) {
        errors.push(`${ns}: ${(err as Error).message}`);
      }
    }
    for (const ns of [...this.nftApplied.keys()]) if (!namespaces.has(ns)) this.nftApplied.delete(ns);
    this.lastError = errors.join("; ");
    this.lastChanges = plan.changes;
    if (plan.changes.length) this.log.info({ changes: plan.changes }, "peering");
    if (this.lastError) this.log.warn({ err: this.lastError }, "peering sync");
    return plan.changes;
  }

  /** Tells Redis this host applied its peerings (after a pass without errors). */
  async ack(): Promise<void> {
    if (this.lastError) return;
    for (const p of this.peerings) {
      await ackPeering(this.redis, p, this.agent.hostId).catch((err: Error) =>
        this.log.warn({ peering: p.id, err: err.message }, "cannot acknowledge a peering"),
      );
    }
    await pruneAcks(this.redis, this.agent.hostId, new Set(this.peerings.map((p) => p.id))).catch(() => undefined);
  }
}
