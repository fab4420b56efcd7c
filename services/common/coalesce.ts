// Calls that arrive together, answered by one round trip: the calls made in
// one turn of the event loop under the same key (IPAM: one subnet) are
// gathered and handed to `run` in a setImmediate, which runs once the turn's
// I/O callbacks (every request a socket read brought in) and their promise
// continuations are done. A lone call waits for nothing but the rest of its
// own turn; a group never waits for an earlier group's round trip, so
// pipelining is kept. What `run` gives back is item by item: one item's
// error is that caller's alone; a rejection of `run` (the store unreachable)
// is every caller's, the same error object.
//
// The group's work runs in the async context (AsyncLocalStorage) of the call
// that opened the group: what it logs carries that call's request id. Each
// caller's own code after its await runs in its own context.

/** One item's outcome where several are answered together. */
export type Settled<T> = { ok: true; value: T } | { ok: false; error: Error };

interface Group<I, R> {
  items: I[];
  waiters: { resolve: (r: R) => void; reject: (e: Error) => void }[];
}

export class Coalescer<I, R> {
  private readonly open = new Map<string, Group<I, R>>();

  /**
   * run answers one group, item by item in its order; max is the most items
   * one group holds (a full group is handed over and the next call starts
   * another); onGroup hears each group's size as it is handed over.
   */
  constructor(
    private readonly run: (key: string, items: I[]) => Promise<Settled<R>[]>,
    private readonly max: number,
    private readonly onGroup?: (size: number) => void,
  ) {
    if (!(max >= 1)) throw new Error(`Coalescer: max ${max} < 1`);
  }

  add(key: string, item: I): Promise<R> {
    let g = this.open.get(key);
    if (!g) {
      const group: Group<I, R> = { items: [], waiters: [] };
      this.open.set(key, (g = group));
      setImmediate(() => {
        if (this.open.get(key) === group) this.open.delete(key);
        void this.flush(key, group);
      });
    }
    const p = new Promise<R>((resolve, reject) => g.waiters.push({ resolve, reject }));
    g.items.push(item);
    // Full: later calls of this turn start a group of their own (this one still runs in its setImmediate).
    if (g.items.length >= this.max) this.open.delete(key);
    return p;
  }

  private async flush(key: string, g: Group<I, R>): Promise<void> {
    this.onGroup?.(g.items.length);
    try {
      const out = await this.run(key, g.items);
      if (out.length !== g.items.length) throw new Error(`coalesced call of ${g.items.length} answered ${out.length} items`);
      out.forEach((r, i) => (r.ok ? g.waiters[i].resolve(r.value) : g.waiters[i].reject(r.error)));
    } catch (err) {
      // Waiters already answered keep their answer (a settled promise ignores reject).
      const e = err instanceof Error ? err : new Error(String(err));
      for (const w of g.waiters) w.reject(e);
    }
  }
}
