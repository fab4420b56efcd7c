// The NIC marks of each VPC namespace this agent holds (ct-marks.ts says
// what they are): read from the kernel's table once per namespace, then
// kept here and changed with the table, one small nft transaction per NIC.
// Callers hold the VPC's lock (Agent.withLock), so one namespace's marks
// never change under two callers at once, and an index a detach took out
// cannot be given out again before that detach has cleared its flows.
import type { Logger } from "pino";
import type { Kernel } from "./kernel.js";
import { addTx, CT_TABLE, delTx, freeIndex, parseListing, planMarks, tableTx, type NicMark } from "./ct-marks.js";

export class CtMarks {
  /** Namespace → address → mark, as the table holds them. */
  private readonly byNs = new Map<string, Map<string, NicMark>>();

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
    const marks = await this.marksOf(ns);
    const have = marks.get(address);
    if (have) return have;
    const index = freeIndex(new Set([...marks.values()].map((m) => m.index)));
    if (index === 0) throw new Error(`${ns}: all ${CT_TABLE} NIC indexes are in use`);
    const m: NicMark = { address, index, adopted: opts.adopted ?? false };
    await this.kernel.nft(ns, addTx(m));
    marks.set(address, m);
    return m;
  }

  /**
   * Takes a NIC's mark out of the table, so no new flow gets it. Returns
   * the mark whose flows to clear (under the same lock, before its index can
   * be given out again); null when the NIC had none or the table could not
   * be changed (the caller then clears by dumping the table).
   */
  async detach(ns: string, address: string): Promise<NicMark | null> {
    let marks: Map<string, NicMark>;
    try {
      marks = await this.marksOf(ns);
    } catch (err) {
      this.log.warn({ ns, address, err: (err as Error).message }, "cannot read the NIC marks; clearing the NIC's flows by a dump of the table");
      return null;
    }
    const m = marks.get(address);
    if (!m) return null;
    marks.delete(address);
    try {
      await this.kernel.nft(ns, delTx(m));
    } catch (err) {
      // Left in the table, the index still marks new flows to and from the address; the next pass removes it.
      this.byNs.delete(ns);
      this.log.warn({ ns, address, err: (err as Error).message }, "cannot remove the NIC's mark; clearing its flows by a dump of the table");
      return null;
    }
    return m;
  }

  /**
   * The drift check of a reconcile pass: the table read back and made to
   * hold exactly the desired NICs' marks (a missing one is adopted; with
   * removeOrphans, a NIC's mark that is no longer desired goes). Returns
   * the changes made.
   */
  async reconcile(ns: string, desired: string[], removeOrphans: boolean): Promise<string[]> {
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

  /** The namespace is gone. */
  forget(ns: string): void {
    this.byNs.delete(ns);
  }
}
