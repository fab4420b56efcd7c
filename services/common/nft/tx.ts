// An nft transaction as a plain value, after kubernetes-sigs/knftables
// (transaction.go, objects.go): built with add / create / insert / flush /
// delete of typed objects (Table, Chain, Rule, Set/Map, Element, Counter),
// each validated as it is added, so a bad name, element or rule throws
// before anything is rendered; render() is the one place that turns a
// transaction into nft script text, and LinuxNft (linux.ts) the one place
// that hands that text to nft. FakeNft (fake.ts) applies the same value in
// memory.
//
// A table added with `content` renders as nft's declarative block
// (`table inet t { … }`, which nft treats as "add" of the table and of
// everything in it); every other operation is one command line. Our
// builders use both, and render() reproduces their historical text byte for
// byte (test/unit/golden/nft-corpus.txt).

export const FAMILIES = ["ip", "ip6", "inet", "arp", "bridge", "netdev"] as const;
export type Family = (typeof FAMILIES)[number];

const CHAIN_TYPES = ["filter", "nat", "route"] as const;
const HOOKS = ["prerouting", "input", "forward", "output", "postrouting", "ingress", "egress"] as const;
const SET_FLAGS = ["constant", "interval", "timeout", "dynamic"] as const;

/** Where an object lives. */
export interface TableRef {
  family: Family;
  table: string;
}

export interface BaseChainSpec {
  type: (typeof CHAIN_TYPES)[number];
  hook: (typeof HOOKS)[number];
  /** A number ("-10") or a standard name with an optional offset ("filter", "filter - 10", "dstnat"). */
  priority: string;
  policy?: "accept" | "drop";
}

export interface SetSpec {
  name: string;
  /** nft data type, e.g. "ipv4_addr . inet_proto . inet_service"; a map's is "key : value" ("ipv4_addr : verdict"). */
  type: string;
  size?: number;
  flags?: (typeof SET_FLAGS)[number][];
  autoMerge?: boolean;
  /** A counter on every element, counting the packets a lookup matched (nft "counter;" in the set's declaration). */
  counter?: boolean;
  /** Only inside a table block: the elements declared with the set. */
  elements?: string[];
  /**
   * Render "elements = { … } }" without the ";" after the element list (the
   * peering table's historical text; nft reads both).
   */
  bareElements?: boolean;
}

/** What a table block may hold (family and table are the block's). */
export type TableItem =
  { kind: "counter"; name: string } | ({ kind: "set" | "map" } & SetSpec) | { kind: "chain"; name: string; base?: BaseChainSpec; rules: string[] };

export interface Table {
  kind: "table";
  family: Family;
  name: string;
  /** Given (even empty): the table renders as a declarative block holding these, in this order. */
  content?: TableItem[];
}
export interface Chain extends TableRef {
  kind: "chain";
  name: string;
  base?: BaseChainSpec;
}
export interface Rule extends TableRef {
  kind: "rule";
  chain: string;
  rule: string;
}
export interface NftSet extends TableRef, SetSpec {
  kind: "set" | "map";
}
export interface Element extends TableRef {
  kind: "element";
  /** The set or map. */
  set: string;
  /** Keys ("10.0.0.1", "tcp . 80"), or for a map "key : value". */
  elements: string[];
}
export interface Counter extends TableRef {
  kind: "counter";
  name: string;
}

export type NftObject = Table | Chain | Rule | NftSet | Element | Counter;
export type Verb = "add" | "create" | "insert" | "flush" | "delete";
export interface Op {
  verb: Verb;
  obj: NftObject;
}

/** A value refused before anything was rendered: which field, and why. */
export class NftValidationError extends Error {
  constructor(
    readonly field: string,
    readonly value: string,
    readonly reason: string,
  ) {
    super(`nft ${field} ${JSON.stringify(value)}: ${reason}`);
    this.name = "NftValidationError";
  }
}

const NAME_RE = /^[A-Za-z][A-Za-z0-9_.-]*$/;
const TYPE_RE = /^[a-z][a-z0-9_]*(?: [.:] [a-z][a-z0-9_]*)*$/;
const PRIORITY_RE = /^(?:-?[0-9]{1,9}|[a-z]+(?: [-+] [0-9]{1,9})?)$/;
/** Inside an element, quotes hold an interface name and nothing else. */
const ELEMENT_RE = /^(?:"[A-Za-z0-9_.:@-]{1,15}"|[A-Za-z0-9_.:/ -])+$/;

function bad(field: string, value: string, reason: string): never {
  throw new NftValidationError(field, value, reason);
}

export function checkName(field: string, v: string): void {
  if (typeof v !== "string" || !NAME_RE.test(v)) bad(field, String(v), "not a name (a letter, then letters, digits, _ . -)");
  if (v.length > 255) bad(field, v.slice(0, 40) + "…", "longer than 255 characters");
}

function checkFamily(v: string): void {
  if (!(FAMILIES as readonly string[]).includes(v)) bad("family", v, `not one of ${FAMILIES.join(", ")}`);
}

/**
 * A rule (or anything spliced into one) as our compilers write it: one
 * line of printable ASCII, quotes balanced, and outside quotes no ";" or "#"
 * (which would end the statement or start a comment) and balanced braces
 * (anonymous sets, `{ tcp, udp }`).
 */
export function checkStatement(field: string, v: string): void {
  if (typeof v !== "string" || v.trim() === "") bad(field, String(v), "empty");
  if (!/^[\x20-\x7e]*$/.test(v)) bad(field, v, "has a newline or a character that is not printable ASCII");
  let quoted = false;
  let depth = 0;
  for (const c of v) {
    if (c === '"') quoted = !quoted;
    else if (quoted) {
      if (c === "\\") bad(field, v, "has a backslash inside quotes");
    } else if (c === ";") bad(field, v, 'has ";" outside quotes');
    else if (c === "#") bad(field, v, 'has "#" outside quotes');
    else if (c === "{") depth++;
    else if (c === "}" && --depth < 0) bad(field, v, "has unbalanced braces");
  }
  if (quoted) bad(field, v, "has unbalanced quotes");
  if (depth !== 0) bad(field, v, "has unbalanced braces");
}

/** One set or map element: addresses, ranges, ports, MACs, "quoted" interface names, "k : v", "jump chain". */
export function checkElement(field: string, v: string): void {
  if (typeof v !== "string" || !ELEMENT_RE.test(v) || v !== v.trim()) {
    bad(field, String(v), "not an element (no quotes but around an interface name, no newlines, braces, commas or semicolons)");
  }
}

function checkRef(o: TableRef): void {
  checkFamily(o.family);
  checkName("table", o.table);
}

function checkBase(where: string, b: BaseChainSpec): void {
  if (!(CHAIN_TYPES as readonly string[]).includes(b.type)) bad(`${where} type`, b.type, `not one of ${CHAIN_TYPES.join(", ")}`);
  if (!(HOOKS as readonly string[]).includes(b.hook)) bad(`${where} hook`, b.hook, `not one of ${HOOKS.join(", ")}`);
  if (!PRIORITY_RE.test(b.priority)) bad(`${where} priority`, b.priority, 'not a number or a name with an optional offset ("filter - 10")');
  if (b.policy !== undefined && b.policy !== "accept" && b.policy !== "drop") bad(`${where} policy`, b.policy, "not accept or drop");
}

function checkSet(s: SetSpec & { kind: "set" | "map" }, inBlock: boolean): void {
  checkName(`${s.kind} name`, s.name);
  if (!TYPE_RE.test(s.type)) bad(`${s.kind} ${s.name} type`, s.type, 'not an nft type ("ipv4_addr", "ipv4_addr . inet_service", "k : v")');
  if (s.type.includes(" : ") !== (s.kind === "map"))
    bad(`${s.kind} ${s.name} type`, s.type, s.kind === "map" ? 'a map\'s type is "key : value"' : "a set's type has no value");
  if (s.size !== undefined && !(Number.isInteger(s.size) && s.size > 0 && s.size < 2 ** 32))
    bad(`${s.kind} ${s.name} size`, String(s.size), "not a positive integer");
  for (const f of s.flags ?? []) if (!(SET_FLAGS as readonly string[]).includes(f)) bad(`${s.kind} ${s.name} flag`, f, `not one of ${SET_FLAGS.join(", ")}`);
  if (s.elements !== undefined) {
    if (!inBlock) bad(`${s.kind} ${s.name}`, "elements", "elements go in a table block or an element object");
    for (const e of s.elements) checkElement(`${s.kind} ${s.name} element`, e);
  }
}

function checkItem(t: string, it: TableItem): void {
  if (it.kind === "counter") checkName("counter name", it.name);
  else if (it.kind === "chain") {
    checkName("chain name", it.name);
    if (it.base) checkBase(`chain ${it.name}`, it.base);
    for (const r of it.rules) checkStatement(`rule in ${t} ${it.name}`, r);
  } else if (it.kind === "set" || it.kind === "map") checkSet(it, true);
  else bad("table item", String((it as { kind: unknown }).kind), "not a counter, set, map or chain");
}

const VERBS: Record<NftObject["kind"], readonly Verb[]> = {
  table: ["add", "create", "flush", "delete"],
  chain: ["add", "create", "flush", "delete"],
  // Deleting or replacing one rule needs its kernel handle, which a value built before the apply never has.
  rule: ["add", "insert"],
  set: ["add", "create", "flush", "delete"],
  map: ["add", "create", "flush", "delete"],
  element: ["add", "create", "delete"],
  counter: ["add", "create", "delete"],
};

function check(verb: Verb, o: NftObject): void {
  if (!VERBS[o.kind]?.includes(verb)) bad("operation", `${verb} ${String(o.kind)}`, "not an nft operation we render");
  if (o.kind === "table") {
    checkFamily(o.family);
    checkName("table", o.name);
    if (o.content !== undefined) {
      if (verb !== "add") bad("operation", `${verb} table`, "only add takes a table's content");
      for (const it of o.content) checkItem(o.name, it);
    }
    return;
  }
  checkRef(o);
  switch (o.kind) {
    case "chain":
      checkName("chain name", o.name);
      if (o.base) {
        if (verb !== "add" && verb !== "create") bad("operation", `${verb} chain`, "only add and create take a base chain's hook");
        checkBase(`chain ${o.name}`, o.base);
      }
      return;
    case "rule":
      checkName("chain name", o.chain);
      checkStatement(`rule in ${o.table} ${o.chain}`, o.rule);
      return;
    case "set":
    case "map":
      checkSet(o, false);
      return;
    case "element":
      checkName("set name", o.set);
      if (o.elements.length === 0) bad(`element of ${o.set}`, "", "no elements");
      for (const e of o.elements) checkElement(`element of ${o.set}`, e);
      return;
    case "counter":
      checkName("counter name", o.name);
  }
}

const copySet = <T extends SetSpec>(x: T): T => ({ ...x, ...(x.flags ? { flags: [...x.flags] } : {}), ...(x.elements ? { elements: [...x.elements] } : {}) });

function copyItem(i: TableItem): TableItem {
  if (i.kind === "chain") return { ...i, ...(i.base ? { base: { ...i.base } } : {}), rules: [...i.rules] };
  return i.kind === "counter" ? { ...i } : copySet(i);
}

/** A copy the caller cannot change afterwards: what is checked is what is rendered. */
function snapshot(o: NftObject): NftObject {
  switch (o.kind) {
    case "table":
      return { ...o, ...(o.content ? { content: o.content.map(copyItem) } : {}) };
    case "chain":
      return { ...o, ...(o.base ? { base: { ...o.base } } : {}) };
    case "element":
      return { ...o, elements: [...o.elements] };
    case "set":
    case "map":
      return copySet(o);
    default:
      return { ...o };
  }
}

export class NftTransaction {
  private readonly list: Op[] = [];

  /** One transaction running the operations of each in turn (they were validated when added). */
  static concat(...txs: NftTransaction[]): NftTransaction {
    const out = new NftTransaction();
    for (const t of txs) out.list.push(...t.list);
    return out;
  }

  /** The operations in order (read-only copies of what was validated). */
  get ops(): readonly Op[] {
    return this.list;
  }

  get empty(): boolean {
    return this.list.length === 0;
  }

  private push(verb: Verb, o: NftObject): this {
    const obj = snapshot(o);
    check(verb, obj);
    this.list.push({ verb, obj });
    return this;
  }

  /** Creates if missing (a rule: appends; an element: adds, present or not). */
  add(o: NftObject): this {
    return this.push("add", o);
  }
  /** As add, but fails the transaction if the object exists. */
  create(o: Exclude<NftObject, Rule>): this {
    return this.push("create", o);
  }
  /** A rule at the head of its chain. */
  insert(o: Rule): this {
    return this.push("insert", o);
  }
  /** Empties a table, chain, set or map; fails the transaction if it is missing. */
  flush(o: Table | Chain | NftSet): this {
    return this.push("flush", o);
  }
  /** Fails the transaction if the object is missing. */
  delete(o: Exclude<NftObject, Rule>): this {
    return this.push("delete", o);
  }
}

// ---- render ----

function setBody(s: SetSpec): string {
  const parts = [`type ${s.type}`];
  if (s.size !== undefined) parts.push(`size ${s.size}`);
  if (s.flags?.length) parts.push(`flags ${s.flags.join(", ")}`);
  if (s.autoMerge) parts.push("auto-merge");
  if (s.counter) parts.push("counter");
  let text = parts.map((p) => `${p}; `).join("");
  if (s.elements?.length) text += s.bareElements ? `elements = { ${s.elements.join(", ")} } ` : `elements = { ${s.elements.join(", ")} }; `;
  return `{ ${text}}`;
}

const baseLine = (b: BaseChainSpec) => `type ${b.type} hook ${b.hook} priority ${b.priority};${b.policy ? ` policy ${b.policy};` : ""}`;

function renderItem(it: TableItem): string {
  if (it.kind === "counter") return `  counter ${it.name} { }`;
  if (it.kind === "chain")
    return [`  chain ${it.name} {`, ...(it.base ? [`    ${baseLine(it.base)}`] : []), ...it.rules.map((r) => `    ${r}`), `  }`].join("\n");
  return `  ${it.kind} ${it.name} ${setBody(it)}`;
}

export function renderOp({ verb, obj: o }: Op): string {
  if (o.kind === "table") {
    if (o.content) return [`table ${o.family} ${o.name} {`, ...o.content.map(renderItem), `}`].join("\n");
    return `${verb} table ${o.family} ${o.name}`;
  }
  const where = `${o.family} ${o.table}`;
  switch (o.kind) {
    case "chain":
      return `${verb} chain ${where} ${o.name}${o.base ? ` { ${baseLine(o.base)} }` : ""}`;
    case "rule":
      return `${verb} rule ${where} ${o.chain} ${o.rule}`;
    case "set":
    case "map":
      return verb === "add" || verb === "create" ? `${verb} ${o.kind} ${where} ${o.name} ${setBody(o)}` : `${verb} ${o.kind} ${where} ${o.name}`;
    case "element":
      return `${verb} element ${where} ${o.set} { ${o.elements.join(", ")} }`;
    case "counter":
      return `${verb} counter ${where} ${o.name}`;
  }
}

/** The transaction as nft script text ("" for an empty one): one `nft -f` runs it atomically. */
export function render(tx: NftTransaction): string {
  return tx.empty ? "" : tx.ops.map(renderOp).join("\n") + "\n";
}

/** Renders one table block's items (for FakeNft's dump). */
export function renderTable(t: Table): string {
  return renderOp({ verb: "add", obj: t });
}
