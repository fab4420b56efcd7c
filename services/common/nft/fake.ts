// FakeNft: nft in memory, for tests (after knftables' fake.go). It applies
// the same transaction values LinuxNft hands to nft, per namespace, with
// nft's semantics where our code depends on them: add creates if missing,
// create fails if present, flush and delete fail on what is missing, a chain
// or set still referenced (a jump, an @set, a named counter) cannot be
// deleted, a chain with rules cannot be deleted, a rule may only name sets,
// chains and counters that exist. A transaction that fails changes nothing
// (nft's atomicity). dump() prints the state as sorted nft text, so tests
// compare golden text.
import { CLOSED_CHAIN } from "./fail-closed.js";
import type { Counter, CtEntry, NftRunner } from "./linux.js";
import { renderOp, renderTable, type BaseChainSpec, type NftObject, type NftTransaction, type Op, type SetSpec, type TableItem } from "./tx.js";

interface FakeChain {
  base?: BaseChainSpec;
  rules: string[];
}
interface FakeSet {
  spec: Omit<SetSpec, "elements" | "bareElements"> & { kind: "set" | "map" };
  elements: Set<string>;
}
interface FakeTable {
  family: string;
  name: string;
  chains: Map<string, FakeChain>;
  sets: Map<string, FakeSet>;
  counters: Set<string>;
}
type State = Map<string, FakeTable>;

/** A transaction nft would refuse: which operation, and nft's reason. */
export class FakeNftError extends Error {
  constructor(
    readonly op: string,
    readonly reason: string,
  ) {
    super(`Error: Could not process rule: ${reason}\n${op}`);
    this.name = "FakeNftError";
  }
}

function clone(s: State): State {
  const out: State = new Map();
  for (const [k, t] of s) {
    out.set(k, {
      family: t.family,
      name: t.name,
      chains: new Map([...t.chains].map(([n, c]) => [n, { ...c, rules: [...c.rules] }])),
      sets: new Map([...t.sets].map(([n, x]) => [n, { spec: x.spec, elements: new Set(x.elements) }])),
      counters: new Set(t.counters),
    });
  }
  return out;
}

/** Names a rule (or a map element's verdict) refers to. */
function refs(text: string): { sets: string[]; chains: string[]; counters: string[] } {
  const unquoted = text.replace(/"[^"]*"/g, '""');
  return {
    sets: [...unquoted.matchAll(/@([A-Za-z][A-Za-z0-9_.-]*)/g)].map((m) => m[1]),
    chains: [...unquoted.matchAll(/\b(?:jump|goto) ([A-Za-z][A-Za-z0-9_.-]*)/g)].map((m) => m[1]),
    counters: [...unquoted.matchAll(/\bcounter name ([A-Za-z][A-Za-z0-9_.-]*)/g)].map((m) => m[1]),
  };
}

class Applier {
  constructor(
    readonly st: State,
    readonly op: Op,
  ) {}

  fail(reason: string): never {
    throw new FakeNftError(renderOp(this.op).split("\n")[0], reason);
  }

  table(family: string, name: string): FakeTable {
    return this.st.get(`${family} ${name}`) ?? this.fail("No such file or directory (table)");
  }

  /** Everything in the table that refers to `kind` `name`. */
  usedBy(t: FakeTable, kind: "sets" | "chains" | "counters", name: string): boolean {
    for (const c of t.chains.values()) if (c.rules.some((r) => refs(r)[kind].includes(name))) return true;
    if (kind === "chains") for (const s of t.sets.values()) for (const e of s.elements) if (refs(e).chains.includes(name)) return true;
    return false;
  }

  checkRefs(t: FakeTable, text: string): void {
    const r = refs(text);
    for (const s of r.sets) if (!t.sets.has(s)) this.fail(`No such file or directory (set ${s})`);
    for (const c of r.chains) if (!t.chains.has(c)) this.fail(`No such file or directory (chain ${c})`);
    for (const c of r.counters) if (!t.counters.has(c)) this.fail(`No such file or directory (counter ${c})`);
  }

  addSet(t: FakeTable, s: SetSpec & { kind: "set" | "map" }, create: boolean): void {
    const have = t.sets.get(s.name);
    if (have && create) this.fail("File exists");
    const spec = { kind: s.kind, name: s.name, type: s.type, size: s.size, flags: s.flags, autoMerge: s.autoMerge, counter: s.counter };
    if (have && (have.spec.type !== s.type || have.spec.kind !== s.kind)) this.fail("File exists (with another type)");
    const set = have ?? { spec, elements: new Set<string>() };
    t.sets.set(s.name, set);
    for (const e of s.elements ?? []) this.addElement(t, set, e, false);
  }

  addElement(t: FakeTable, s: FakeSet, e: string, create: boolean): void {
    if (create && s.elements.has(e)) this.fail("File exists (element)");
    if (s.spec.kind === "map") this.checkRefs(t, e);
    s.elements.add(e);
  }

  addChain(t: FakeTable, name: string, base: BaseChainSpec | undefined, create: boolean): FakeChain {
    const have = t.chains.get(name);
    if (have && create) this.fail("File exists");
    const c = have ?? { rules: [] };
    if (base) c.base = base;
    t.chains.set(name, c);
    return c;
  }

  addItem(t: FakeTable, it: TableItem): void {
    if (it.kind === "counter") t.counters.add(it.name);
    else if (it.kind === "chain") {
      const c = this.addChain(t, it.name, it.base, false);
      for (const r of it.rules) {
        this.checkRefs(t, r);
        c.rules.push(r);
      }
    } else this.addSet(t, it, false);
  }

  run(): void {
    const { verb, obj } = this.op;
    const o: NftObject = obj;
    if (o.kind === "table") {
      const key = `${o.family} ${o.name}`;
      const have = this.st.get(key);
      if (verb === "add" || verb === "create") {
        if (have && verb === "create") this.fail("File exists");
        const t = have ?? { family: o.family, name: o.name, chains: new Map(), sets: new Map(), counters: new Set<string>() };
        this.st.set(key, t);
        // Sets and counters first, as nft resolves a block's references.
        const content = o.content ?? [];
        for (const it of content) if (it.kind !== "chain") this.addItem(t, it);
        for (const it of content) if (it.kind === "chain") this.addChain(t, it.name, it.base, false);
        for (const it of content) if (it.kind === "chain") this.addItem(t, { ...it, base: undefined });
        return;
      }
      const t = this.table(o.family, o.name);
      if (verb === "delete") this.st.delete(key);
      else if (verb === "flush") {
        for (const c of t.chains.values()) c.rules = [];
        for (const s of t.sets.values()) s.elements.clear();
      }
      return;
    }
    const t = this.table(o.family, o.table);
    switch (o.kind) {
      case "chain": {
        if (verb === "add" || verb === "create") return void this.addChain(t, o.name, o.base, verb === "create");
        const c = t.chains.get(o.name) ?? this.fail("No such file or directory (chain)");
        if (verb === "flush") c.rules = [];
        else {
          if (c.rules.length) this.fail("Device or resource busy (the chain has rules)");
          if (this.usedBy(t, "chains", o.name)) this.fail("Device or resource busy (a jump refers to the chain)");
          t.chains.delete(o.name);
        }
        return;
      }
      case "rule": {
        const c = t.chains.get(o.chain) ?? this.fail("No such file or directory (chain)");
        this.checkRefs(t, o.rule);
        if (verb === "insert") c.rules.unshift(o.rule);
        else c.rules.push(o.rule);
        return;
      }
      case "set":
      case "map": {
        if (verb === "add" || verb === "create") return this.addSet(t, o, verb === "create");
        const s = t.sets.get(o.name) ?? this.fail(`No such file or directory (${o.kind})`);
        if (verb === "flush") s.elements.clear();
        else {
          if (this.usedBy(t, "sets", o.name)) this.fail(`Device or resource busy (a rule uses the ${o.kind})`);
          t.sets.delete(o.name);
        }
        return;
      }
      case "element": {
        const s = t.sets.get(o.set) ?? this.fail("No such file or directory (set)");
        for (const e of o.elements) {
          if (verb === "delete") {
            if (!s.elements.delete(e)) this.fail(`No such file or directory (element ${e})`);
          } else this.addElement(t, s, e, verb === "create");
        }
        return;
      }
      case "counter": {
        if (verb === "add" || verb === "create") {
          if (verb === "create" && t.counters.has(o.name)) this.fail("File exists");
          t.counters.add(o.name);
          return;
        }
        if (!t.counters.has(o.name)) this.fail("No such file or directory (counter)");
        if (this.usedBy(t, "counters", o.name)) this.fail("Device or resource busy (a rule uses the counter)");
        t.counters.delete(o.name);
      }
    }
  }
}

const byName = <T>(m: Map<string, T>) => [...m].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));

export class FakeNft implements NftRunner {
  private readonly states = new Map<string, State>();
  /** Conntrack entries per namespace: tests put flows here; conntrackClear removes them. */
  readonly conntrack = new Map<string, CtEntry[]>();
  /** Every transaction applied (or refused), in order, with its namespace. */
  readonly applied: { ns: string; tx: NftTransaction; error?: string }[] = [];

  async apply(ns: string, tx: NftTransaction): Promise<void> {
    this.applySync(ns, tx);
  }

  /** apply() without the promise: throws FakeNftError and leaves the namespace as it was. */
  applySync(ns: string, tx: NftTransaction): void {
    const next = clone(this.states.get(ns) ?? new Map());
    try {
      for (const op of tx.ops) new Applier(next, op).run();
    } catch (err) {
      this.applied.push({ ns, tx, error: (err as Error).message });
      throw err;
    }
    this.applied.push({ ns, tx });
    this.states.set(ns, next);
  }

  /** The namespace's ruleset as nft text, tables, counters, sets, chains and elements sorted by name (rules in order). */
  dump(ns: string): string {
    const out: string[] = [];
    for (const [, t] of byName(this.states.get(ns) ?? new Map<string, FakeTable>())) {
      const content: TableItem[] = [
        ...[...t.counters].sort().map((name): TableItem => ({ kind: "counter", name })),
        ...byName(t.sets).map(([, s]): TableItem => ({ ...s.spec, elements: [...s.elements].sort() })),
        ...byName(t.chains).map(([name, c]): TableItem => ({ kind: "chain", name, base: c.base, rules: c.rules })),
      ];
      out.push(renderTable({ kind: "table", family: t.family as never, name: t.name, content }));
    }
    return out.length ? out.join("\n") + "\n" : "";
  }

  /** Namespaces with at least one table. */
  namespaces(): string[] {
    return [...this.states]
      .filter(([, s]) => s.size > 0)
      .map(([ns]) => ns)
      .sort();
  }

  async tableExists(ns: string): Promise<boolean> {
    // As LinuxNft's: the firewall's forward chain, and no skeleton chain merged into its tables.
    const st = this.states.get(ns);
    const merged = ["inet microvpc", "bridge microvpc"].some((t) => st?.get(t)?.chains.has(CLOSED_CHAIN));
    return !merged && (st?.get("inet microvpc")?.chains.has("forward") ?? false);
  }

  /** As LinuxNft.counters, at zero (no packets flow here): the element counters of table inet microvpc's sets ("set/element") and bridge microvpc's named counters. */
  async counters(ns: string): Promise<Map<string, Counter>> {
    const zero = () => ({ packets: 0n, bytes: 0n });
    const m = new Map<string, Counter>();
    for (const s of this.states.get(ns)?.get("inet microvpc")?.sets.values() ?? [])
      if (s.spec.counter) for (const e of s.elements) m.set(`${s.spec.name}/${e}`, zero());
    for (const c of this.states.get(ns)?.get("bridge microvpc")?.counters ?? []) m.set(c, zero());
    return m;
  }

  async conntrackList(ns: string): Promise<CtEntry[]> {
    return [...(this.conntrack.get(ns) ?? [])];
  }

  async conntrackClear(ns: string, pick: (e: CtEntry) => boolean): Promise<number> {
    const all = this.conntrack.get(ns) ?? [];
    const kept = all.filter((x) => !pick(x));
    this.conntrack.set(ns, kept);
    return all.length - kept.length;
  }
}
