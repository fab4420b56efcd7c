// The NIC marks of each VPC namespace this agent holds (ct-marks.ts says
// what they are): read from the kernel's table once per namespace, then
// kept here and changed with the table, one small nft transaction per NIC.
// Callers hold the VPC's lock (Agent.withLock), so one namespace's marks
// never change under two callers at once.
//
// A detached NIC's mark is retired after DetachNic has answered: taking
// elements out of an nft map waits for an RCU grace period in the kernel
// (~10–15 ms on some kernels), which DeleteVm need not wait for. Its flows
// are cleared before the answer (the devices are down by then); a flow a
// peer starts toward the address while the mark is still in the table gets
// the old index, so once the mark is out its flows are cleared once more.
// Until then the mark is "retiring": its index is not given out again and
// an attach of its address waits for it, so that no NIC inherits a flow
// its own detach would not find.
import type { Logger } from "pino";
import { Counter } from "prom-client";
import { metricsRegistry } from "../common/metrics.js";
import type { Kernel } from "./kernel.js";
import { addTx, CT_TABLE, delTx, freeIndex, parseListing, planMarks, tableTx, type NicMark } from "./ct-marks.js";

const retires = new Counter({
  name: "microvpc_netagent_mark_retires_total",
  help: "Detached NICs' marks taken out of the NIC-mark table after DetachNic answered, their flows cleared again, by result (error: the mark is left for the next reconcile pass).",
  labelNames: ["result"],
  registers: [metricsRegistry],
});

export class CtMarks {
  /** Namespace → address → mark, as the table holds them (retiring ones aside). */
  private readonly byNs = new Map<string, Map<string, NicMark>>();
  /** Namespace → address → a detached NIC's mark on its way out of the table, and when it is out and its flows cleared again. */
  private readonly retiring = new Map<string, Map<string, { mark: NicMark; done: Promise<void> }>>();

  constructor(
    private readonly kernel: Kernel,
    private readonly log: Logger,
  ) {}

  /** The namespace's marks, reading (and, where it is missing or damaged, repairing) the table the first time. */
  private async marksOf(ns: string): Promise<Map<string, NicMark>> {
    const known = this.byNs.get(ns);
    if (known) return known;
    await this.reconcile(ns, [], false);
    return this.byNs.get(ns)!;
  }

  /** A namespace this agent just created: an empty table, nothing to read. */
  async created(ns: string): Promise<void> {
    this.byNs.delete(ns);
    await this.kernel.nft(ns, tableTx());
    this.byNs.set(ns, new Map());
  }

  /**
   * A NIC's mark, installed before its devices exist so that every flow it
   * has is marked; `adopted` when the NIC may have lived without one (its
   * flows then may carry none). Present already: kept as it is.
   */
  async attach(ns: string, address: string, opts: { adopted?: boolean } = {}): Promise<NicMark> {
    // The address's previous NIC: out of the table, and its flows cleared, first.
    await this.retiring.get(ns)?.get(address)?.done;
    const marks = await this.marksOf(ns);
    const have = marks.get(address);
    if (have) return have;
    const retiring = [...(this.retiring.get(ns)?.values() ?? [])].map((r) => r.mark.index);
    const index = freeIndex(new Set([...marks.values()].map((m) => m.index).concat(retiring)));
    if (index === 0) throw new Error(`${ns}: all ${CT_TABLE} NIC indexes are in use`);
    const m: NicMark = { address, index, adopted: opts.adopted ?? false };
    await this.kernel.nft(ns, addTx(m));
    marks.set(address, m);
    return m;
  }

  /**
   * A NIC is detached: its mark, whose flows the caller clears now, then
   * hands to retire(). Null when the NIC had none or the marks cannot be
   * read (the caller then clears by dumping the table).
   */
  async detach(ns: string, address: string): Promise<NicMark | null> {
    let marks: Map<string, NicMark>;
    try {
      marks = await this.marksOf(ns);
    } catch (err) {
      this.log.warn({ ns, address, err: (err as Error).message }, "cannot read the NIC marks; clearing the NIC's flows by a dump of the table");
      return null;
    }
    return marks.get(address) ?? null;
  }

  /**
   * After the detached NIC's flows were cleared: its mark leaves the table,
   * in the background, then `clearAgain` clears the flows that got the
   * mark meanwhile (a table that cannot be changed: the next pass removes
   * the mark, and `clearAgain` runs anyway). An attach of the address
   * waits for this; done() resolves when it is over.
   */
  retire(ns: string, m: NicMark, clearAgain: (markIndex: number | null) => Promise<unknown>): void {
    const marks = this.byNs.get(ns);
    if (marks?.get(m.address) !== m) return;
    marks.delete(m.address);
    const out = this.retiring.get(ns) ?? new Map<string, { mark: NicMark; done: Promise<void> }>();
    this.retiring.set(ns, out);
    const done = (async () => {
      let removed = true;
      try {
        await this.kernel.nft(ns, delTx(m));
      } catch (err) {
        removed = false;
        // Left in the table, the index still marks new flows to and from the address: read the table again next time.
        if (this.retiring.get(ns) === out) this.byNs.delete(ns);
        this.log.warn({ ns, address: m.address, err: (err as Error).message }, "cannot remove a detached NIC's mark; the next pass removes it");
      }
      await clearAgain(removed && !m.adopted ? m.index : null).catch((err: Error) =>
        this.log.warn({ ns, address: m.address, err: err.message }, "cannot clear a detached NIC's flows again"),
      );
      retires.inc({ result: removed ? "ok" : "error" });
    })().finally(() => {
      if (out.get(m.address)?.done === done) out.delete(m.address);
      if (out.size === 0 && this.retiring.get(ns) === out) this.retiring.delete(ns);
    });
    out.set(m.address, { mark: m, done });
  }

  /** Resolves once every retiring mark of the namespace (of every one, without ns) is out. */
  async settle(ns?: string): Promise<void> {
    for (;;) {
      const pending = ns ? [...(this.retiring.get(ns)?.values() ?? [])] : [...this.retiring.values()].flatMap((m) => [...m.values()]);
      if (pending.length === 0) return;
      await Promise.all(pending.map((p) => p.done));
    }
  }

  /**
   * The drift check of a reconcile pass: the table read back and made to
   * hold exactly the desired NICs' marks (a missing one is adopted; with
   * removeOrphans, a NIC's mark that is no longer desired goes). Returns
   * the changes made.
   */
  async reconcile(ns: string, desired: string[], removeOrphans: boolean): Promise<string[]> {
    // A retiring mark is still in the table: read it once it is out.
    await this.settle(ns);
    const items = await this.kernel.nftTable(ns, "inet", CT_TABLE);
    const listing = items ? parseListing(items) : null;
    const plan = planMarks(listing, desired, { removeOrphans });
    if (!plan.tx.empty) await this.kernel.nft(ns, plan.tx);
    this.byNs.set(ns, plan.marks);
    const changes: string[] = [];
    if (!listing) changes.push(`create table inet ${CT_TABLE}`);
    else if (!listing.intact) changes.push(`replace table inet ${CT_TABLE}`);
    else {
      const { dst, src, chains } = listing.strays;
      if (dst.length + src.length + chains.length) changes.push(`remove ${dst.length + src.length + chains.length} stray ${CT_TABLE} entries`);
    }
    for (const m of plan.added) changes.push(`adopt NIC mark ${m.index} for ${m.address}`);
    for (const m of plan.removed) changes.push(`remove NIC mark ${m.index} of ${m.address}`);
    return changes;
  }

  /** The namespace is gone (a retiring mark's work then fails quietly with it). */
  forget(ns: string): void {
    this.byNs.delete(ns);
    this.retiring.delete(ns);
  }
}
