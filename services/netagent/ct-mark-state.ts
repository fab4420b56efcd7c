// The NIC marks of each VPC namespace this agent holds (ct-marks.ts says
// what they are): read from the kernel's table once per namespace, then
// kept here and changed with the table, one small nft transaction per NIC.
// Callers hold the VPC's lock (Agent.withLock), so one namespace's marks
// never change under two callers at once.
//
// A detached NIC's mark is retired after DetachNic has answered: taking
// elements out of an nft map costs an RCU grace period in the kernel, which
// DeleteVm need not wait for. A NIC marked from its start has every flow it
// ever had carrying its index, so its flows are cleared then too, by that
// index, once the mark is out of the table (a flow a peer starts toward the
// address while the mark is still there gets the index as well): DetachNic
// takes its devices down and answers without walking the kernel's
// conntrack hash (service.ts). An adopted NIC's flows may carry no mark:
// they are cleared by address before the answer, and again here. Until
// then the mark is "retiring": its index is not given out again, and an
// attach of its address either takes the mark over (below) or waits for
// it, so that no NIC inherits a flow of its address's previous NIC.
//
// The retiring marks of a namespace leave together, in one transaction,
// RETIRE_DELAY_MS after the first (or at once when something must see the
// table settled: a reconcile pass, DeleteVpc, shutdown): a burst of
// DeleteVms pays one grace period, not one each, and it does not land on
// the firewall's UnbindNic beside each DetachNic. An attach of an address
// whose mark has not started to leave takes it over as it is (same index,
// nothing changed in the table), after clearing every flow that carries
// it: the usual "VM deleted, next VM gets the lowest free address" costs no
// deletion at all.
//
// A mark whose NIC is gone without this (the agent stopped between a
// detach and its retire) is found in the table: a reconcile pass removes it
// as an orphan and clears its flows, and a new NIC of its address, if it
// comes first, has them cleared before it is handed the mark.
//
// A new NIC's mark comes with its check (ct-marks.ts): flows that began
// while its address was no NIC of this host are dropped from then on, and
// counted. A reconcile pass that finds a check's count grown deletes them
// (one dump of the namespace's table for all such NICs): the same 5-tuple
// can then start again as a new flow, which the NIC's groups judge. The
// dump walks the host's whole conntrack hash (common/conntrack.ts), so it
// runs only where a stale flow did send something, never on an attach.
import type { Logger } from "pino";
import { Counter } from "prom-client";
import { metricsRegistry } from "../common/metrics.js";
import { NftTransaction } from "../common/nft/tx.js";
import type { Kernel } from "./kernel.js";
import { addTx, CT_TABLE, delTx, freeIndex, parseListing, planMarks, tableTx, type NicMark } from "./ct-marks.js";

const cleared = new Counter({
  name: "microvpc_netagent_nic_flows_cleared_total",
  help: "Conntrack entries of NICs cleared by their mark or address (by mark: the namespace's table shrinking meanwhile, an approximation), by when: retire (the mark out of the table, after DetachNic answered), takeover (before the next NIC of the address got the mark), orphan (a mark left without its NIC, found by a reconcile pass or a new NIC of its address), stale (flows that began while a NIC's address was no NIC of this host, which its check dropped; deleted by the next reconcile pass).",
  labelNames: ["when"],
  registers: [metricsRegistry],
});

const retires = new Counter({
  name: "microvpc_netagent_mark_retires_total",
  help: "Detached NICs' marks after DetachNic answered, their flows cleared again, by result: ok (taken out of the NIC-mark table), reused (taken over by the next NIC of the same address), error (left for the next reconcile pass).",
  labelNames: ["result"],
  registers: [metricsRegistry],
});

/** How long a namespace's first retiring mark waits for others to leave with it (one transaction, one RCU grace period). */
export const RETIRE_DELAY_MS = 500;

interface Retiring {
  mark: NicMark;
  clearAgain: (markIndex: number | null) => Promise<number>;
  /** Its removal from the table has begun (or it was taken over): no longer cancellable. */
  started: boolean;
  /** Resolves when it is out of the table and its flows cleared again, or taken over. */
  done: Promise<void>;
  finish: () => void;
}

export class CtMarks {
  /** Namespace → address → mark, as the table holds them (retiring ones aside). */
  private readonly byNs = new Map<string, Map<string, NicMark>>();
  /** Namespace → address → a detached NIC's mark on its way out of the table. */
  private readonly retiring = new Map<string, Map<string, Retiring>>();
  /** Namespace → the timer that takes its retiring marks out. */
  private readonly flushTimers = new Map<string, NodeJS.Timeout>();
  /** Namespace → the packets its checks had dropped at the last reconcile pass. */
  private readonly dropsSeen = new Map<string, number>();

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
  async attach(ns: string, address: string, opts: { adopted?: boolean; fresh?: boolean } = {}): Promise<NicMark> {
    const prev = this.retiring.get(ns)?.get(address);
    if (prev && !prev.started && !prev.mark.adopted && !opts.adopted) return await this.takeOver(ns, prev);
    // The address's previous NIC: out of the table, and its flows cleared, first.
    await prev?.done;
    const marks = await this.marksOf(ns);
    const have = marks.get(address);
    if (have && opts.fresh) {
      // A new NIC finds a mark of its address: one left without its NIC (see the top). Its flows go first.
      const n = await this.kernel.clearNic(ns, address, have.adopted ? null : have.index);
      cleared.inc({ when: "orphan" }, n);
      this.log.info({ ns, address, index: have.index, flows: n }, "a new NIC's address had a mark left in the table; its flows cleared first");
    }
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
   * After the detached NIC's devices are down: its mark leaves the table in
   * the background, with the namespace's other retiring marks
   * (RETIRE_DELAY_MS), then `clearAgain` clears the flows that carry it (a
   * table that cannot be changed: by address, and the next pass removes
   * the mark). An attach of the address takes the mark over until its
   * removal has begun, and waits for it after. False when the mark is no
   * longer this agent's to retire (the namespace's marks were dropped
   * meanwhile, to be read again): the caller clears the flows itself.
   */
  retire(ns: string, m: NicMark, clearAgain: (markIndex: number | null) => Promise<number>): boolean {
    const marks = this.byNs.get(ns);
    if (marks?.get(m.address) !== m) return false;
    marks.delete(m.address);
    const out = this.retiring.get(ns) ?? new Map<string, Retiring>();
    this.retiring.set(ns, out);
    let finish!: () => void;
    const done = new Promise<void>((r) => (finish = r));
    out.set(m.address, { mark: m, clearAgain, started: false, done, finish });
    if (!this.flushTimers.has(ns)) {
      const t = setTimeout(() => void this.flush(ns), RETIRE_DELAY_MS);
      t.unref();
      this.flushTimers.set(ns, t);
    }
    return true;
  }

  /** Takes every retiring mark of the namespace whose removal has not begun out of the table, in one transaction. */
  private async flush(ns: string): Promise<void> {
    clearTimeout(this.flushTimers.get(ns));
    this.flushTimers.delete(ns);
    const out = this.retiring.get(ns);
    const batch = [...(out?.values() ?? [])].filter((r) => !r.started);
    if (!out || batch.length === 0) return;
    for (const r of batch) r.started = true;
    let removed = true;
    try {
      const tx = new NftTransaction();
      for (const r of batch) delTx(r.mark, tx);
      await this.kernel.nft(ns, tx);
    } catch (err) {
      removed = false;
      // Left in the table, the indexes still mark new flows to and from the addresses: read the table again next time.
      if (this.retiring.get(ns) === out) this.byNs.delete(ns);
      const addresses = batch.map((r) => r.mark.address);
      this.log.warn({ ns, addresses, err: (err as Error).message }, "cannot remove detached NICs' marks; the next pass removes them");
    }
    await Promise.all(
      batch.map((r) =>
        r
          .clearAgain(removed && !r.mark.adopted ? r.mark.index : null)
          .then((n) => void cleared.inc({ when: "retire" }, n))
          .catch((err: Error) => this.log.warn({ ns, address: r.mark.address, err: err.message }, "cannot clear a detached NIC's flows again")),
      ),
    );
    for (const r of batch) {
      retires.inc({ result: removed ? "ok" : "error" });
      this.finishRetire(ns, r);
    }
  }

  /**
   * The next NIC of a retiring mark's address takes the mark over: the
   * flows that got it since the detach are cleared first, and then it is
   * the new NIC's, index, chain and elements as the table holds them.
   */
  private async takeOver(ns: string, r: Retiring): Promise<NicMark> {
    r.started = true;
    try {
      cleared.inc({ when: "takeover" }, await r.clearAgain(r.mark.index));
    } catch (err) {
      this.log.warn({ ns, address: r.mark.address, err: (err as Error).message }, "cannot clear a detached NIC's flows again");
    } finally {
      // No longer retiring, whatever follows: marksOf below may read the
      // table, and that read settles the namespace first (reconcile), which
      // would wait for this very mark.
      this.finishRetire(ns, r);
    }
    const marks = await this.marksOf(ns);
    marks.set(r.mark.address, r.mark);
    retires.inc({ result: "reused" });
    return r.mark;
  }

  private finishRetire(ns: string, r: Retiring): void {
    const out = this.retiring.get(ns);
    if (out?.get(r.mark.address) === r) out.delete(r.mark.address);
    if (out && out.size === 0 && this.retiring.get(ns) === out) this.retiring.delete(ns);
    r.finish();
  }

  /** Takes the retiring marks of the namespace (of every one, without ns) out now, and resolves once they are out. */
  async settle(ns?: string): Promise<void> {
    for (;;) {
      const nss = ns ? [ns] : [...this.retiring.keys()];
      const pending = nss.flatMap((n) => [...(this.retiring.get(n)?.values() ?? [])]);
      if (pending.length === 0) return;
      await Promise.all([...nss.map((n) => this.flush(n)), ...pending.map((p) => p.done)]);
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
    // An orphan's NIC is gone, and so must its flows be before its address has another NIC.
    for (const m of plan.removed) cleared.inc({ when: "orphan" }, await this.kernel.clearNic(ns, m.address, m.adopted ? null : m.index));
    const changes: string[] = [];
    // Only a pass sweeps: the first read of a namespace (marksOf) may come from an attach, which must not dump.
    const swept = removeOrphans ? await this.sweepStale(ns, plan.marks, listing?.drops ?? 0) : 0;
    if (swept) changes.push(`delete ${swept} flow(s) older than their NIC's mark`);
    if (!listing) changes.push(`create table inet ${CT_TABLE}`);
    else if (!listing.intact) changes.push(`replace table inet ${CT_TABLE}`);
    else {
      if (listing.earlier) changes.push(`add the NIC checks to an earlier netagent's table inet ${CT_TABLE}`);
      const { dst, src, chk, chains } = listing.strays;
      const n = dst.length + src.length + chk.length + chains.length;
      if (n) changes.push(`remove ${n} stray ${CT_TABLE} entries`);
      for (const m of listing.unchecked) if (plan.marks.get(m.address) === m) changes.push(`restore the check of NIC mark ${m.index} for ${m.address}`);
    }
    for (const m of plan.added) changes.push(`adopt NIC mark ${m.index} for ${m.address}`);
    for (const m of plan.removed) changes.push(`remove NIC mark ${m.index} of ${m.address}`);
    return changes;
  }

  /**
   * The flows older than their NIC's mark (ct-marks.ts staleFlow), deleted
   * in one dump of the table when the checks dropped packets since the last
   * pass (a table made again counts from 0). Returns how many.
   */
  private async sweepStale(ns: string, marks: Map<string, NicMark>, drops: number): Promise<number> {
    const seen = this.dropsSeen.get(ns) ?? 0;
    this.dropsSeen.set(ns, drops);
    // Below what was seen: the counters started again (a table made again).
    const grew = drops < seen ? drops : drops - seen;
    const checked = [...marks.values()].filter((m) => !m.adopted);
    if (grew === 0 || checked.length === 0) return 0;
    const flows = await this.kernel.clearStale(ns, checked);
    cleared.inc({ when: "stale" }, flows);
    this.log.info({ ns, flows, dropped: grew }, "flows from before their NIC's mark (begun while its address was no NIC of this host) sent packets; deleted");
    return flows;
  }

  /** The namespace is gone (a retiring mark's work then fails quietly with it). */
  forget(ns: string): void {
    this.byNs.delete(ns);
    clearTimeout(this.flushTimers.get(ns));
    this.flushTimers.delete(ns);
    // Marks whose removal had not begun have nothing left to leave.
    for (const r of this.retiring.get(ns)?.values() ?? []) if (!r.started) r.finish();
    this.retiring.delete(ns);
    this.dropsSeen.delete(ns);
  }
}
