// Connection marks per NIC, so that DetachNic clears a NIC's conntrack
// entries by mark instead of dumping the VPC namespace's whole table.
//
// The netagent keeps one table in each VPC namespace, inet microvpc_ct: at
// mangle priority (after conntrack has looked the packet up), a new flow
// gets a 32-bit ct mark of two 16-bit NIC indexes,
//   (index of the NIC whose address is the source) << 16 | (index of the NIC whose address is the destination),
// 0 for an end that is no NIC of this host (the gateway, a peer host, a
// peered VPC). The source half is a map lookup (nic_src: address → index
// << 16); the destination half cannot be a second lookup (nft ORs only
// constants into a mark), so nic_dst maps the address to a chain of the NIC
// that ORs its index in. A flow between two NICs of the host carries both.
// Clearing a NIC is then two mark-filtered dumps (mark & 0xffff0000 and
// mark & 0xffff), which the kernel filters: only that NIC's entries come
// to user space, and only those are deleted.
//
// The index lives only in this table: the chain's name carries it
// ("nic7"). A NIC whose mark this agent installed before its devices
// existed is "nicN": every flow it ever had is marked. A NIC found without a
// mark (the table was missing or damaged, or the NIC predates this table)
// gets "adoptedN": its older flows carry no mark, so its detach dumps the
// table as before. An index is reused only after its NIC's entries were
// cleared. This module is pure: the transactions and the reading of `nft -j
// list table`; ct-mark-state.ts applies them.
//
// The same marks close a hole: a flow that began while a NIC's address was
// no NIC of this host (a VM elsewhere had it, or nobody) carries 0 in that
// NIC's half. Once the address is a NIC here, the firewall's `ct state
// established accept` would pass that flow's packets to and from the new
// VM, which its security groups never admitted (a VM kept a UDP flow to an
// address alive until the address was given to a VM on its own host). So
// the address of every "nicN" mark (never an adopted one, whose own flows
// may carry no mark) is in the set nic_chk, and an established or related
// packet of a flow whose half is 0 at an end whose original address (the
// pre-NAT tuple the mark was made from) is in the set is dropped, here, at
// mangle priority, before any accept, and counted. A flow between two NICs
// of the host has both halves set and is never looked up; the lookups cost
// only flows with an end outside the host. (A half that names another NIC
// cannot occur: a detached NIC's flows are cleared by its index before its
// address has another NIC.)
import { isIPv4 } from "node:net";
import { NftTransaction, type TableItem } from "../common/nft/tx.js";

export const CT_TABLE = "microvpc_ct";
const FAMILY = "inet" as const;
/** Indexes 1..65535; 0 is "no NIC of this host". */
export const MAX_INDEX = 0xffff;

export interface NicMark {
  address: string;
  index: number;
  /** Found without a mark: flows older than the mark may carry none (their clear dumps the table). */
  adopted: boolean;
}

export const chainOf = (m: Pick<NicMark, "index" | "adopted">) => `${m.adopted ? "adopted" : "nic"}${m.index}`;
const hex = (n: number) => `0x${(n >>> 0).toString(16).padStart(8, "0")}`;

const RULES = [
  "ct state new ct mark set ip saddr map @nic_src",
  "ct state new ip daddr vmap @nic_dst",
  // The checks (see the top): a flow older than the NIC's mark does not reach or leave it.
  "ct state established,related ct mark and 0xffff0000 == 0 ct original ip saddr @nic_chk counter drop",
  "ct state established,related ct mark and 0x0000ffff == 0 ct original ip daddr @nic_chk counter drop",
];

/** How many rules an earlier netagent's base chains hold (the first two of RULES: no checks). */
const EARLIER_RULES = 2;

/** A NIC's check: its address in nic_chk (see the top). */
function checkTx(m: NicMark, tx: NftTransaction): NftTransaction {
  tx.add({ kind: "element", family: FAMILY, table: CT_TABLE, set: "nic_chk", elements: [m.address] });
  return tx;
}

/** The table with no NIC: maps and the two base chains (forwarded and bridged flows, and the namespace's own). */
export function tableTx(): NftTransaction {
  const base = (name: "prerouting" | "output"): TableItem => ({
    kind: "chain",
    name,
    base: { type: "filter", hook: name, priority: "mangle", policy: "accept" },
    rules: RULES,
  });
  return new NftTransaction().add({
    kind: "table",
    family: FAMILY,
    name: CT_TABLE,
    content: [
      { kind: "map", name: "nic_src", type: "ipv4_addr : mark" },
      { kind: "map", name: "nic_dst", type: "ipv4_addr : verdict" },
      { kind: "set", name: "nic_chk", type: "ipv4_addr" },
      base("prerouting"),
      base("output"),
    ],
  });
}

/** Adds a NIC's mark: its chain, then the two elements; a "nicN" mark its check too. */
export function addTx(m: NicMark, tx = new NftTransaction()): NftTransaction {
  const at = { family: FAMILY, table: CT_TABLE } as const;
  tx.add({ kind: "chain", ...at, name: chainOf(m) });
  tx.add({ kind: "rule", ...at, chain: chainOf(m), rule: `ct mark set ct mark or ${hex(m.index)}` });
  tx.add({ kind: "element", ...at, set: "nic_src", elements: [`${m.address} : ${hex(m.index << 16)}`] });
  tx.add({ kind: "element", ...at, set: "nic_dst", elements: [`${m.address} : jump ${chainOf(m)}`] });
  if (!m.adopted) checkTx(m, tx);
  return tx;
}

/** Removes what addTx added (elements before the chains they jump to); `check`: its check too (one it has whole). */
export function delTx(m: NicMark, tx = new NftTransaction(), check = !m.adopted): NftTransaction {
  const at = { family: FAMILY, table: CT_TABLE } as const;
  if (check) tx.delete({ kind: "element", ...at, set: "nic_chk", elements: [m.address] });
  tx.delete({ kind: "element", ...at, set: "nic_dst", elements: [m.address] });
  tx.delete({ kind: "element", ...at, set: "nic_src", elements: [m.address] });
  tx.delete({ kind: "chain", ...at, name: chainOf(m) });
  return tx;
}

/**
 * The flows the checks of these "nicN" marks drop (see the top): a "nicN"
 * mark's address is the original source (destination) and the source
 * (destination) half is 0, i.e. a flow older than the mark. Deleting them
 * lets the same 5-tuple start again as a new flow, which the NIC's groups
 * judge; left, a sender that keeps one alive would find it dropped for as
 * long as it sends (ct-mark-state.ts deletes them when the checks' count
 * grows). An entry whose mark is unknown is never picked.
 */
export function staleFlow(marks: NicMark[]): (e: { src: string; dst: string; mark?: number }) => boolean {
  const checked = new Set(marks.filter((m) => !m.adopted).map((m) => m.address));
  return (e) => e.mark !== undefined && ((checked.has(e.src) && e.mark >>> 16 === 0) || (checked.has(e.dst) && (e.mark & 0xffff) === 0));
}

/** The two kernel-side filters that find a NIC's flows: it is the source, or the destination. */
export function markFilters(index: number): { value: number; mask: number }[] {
  return [
    { value: (index << 16) >>> 0, mask: 0xffff0000 },
    { value: index, mask: 0x0000ffff },
  ];
}

/** `conntrack -R` lines doing what markFilters' in-process clear does. */
export function markCommands(index: number): string[] {
  return markFilters(index).map((f) => `-D -m ${hex(f.value)}/${hex(f.mask)}`);
}

/** The lowest index not taken; 0 when all are. */
export function freeIndex(taken: Set<number>): number {
  for (let i = 1; i <= MAX_INDEX; i++) if (!taken.has(i)) return i;
  return 0;
}

/** What a listing of the table holds, read as untrusted input: the well-formed marks, and what is not. */
export interface Listed {
  /** Whether the base chains hold exactly our rules (else the table is replaced), or an earlier netagent's (`earlier`). */
  intact: boolean;
  /** An earlier netagent's table (its two rules per base chain, no checks): the checks are added to it, its marks kept. */
  earlier: boolean;
  marks: Map<string, NicMark>;
  /** Elements and chains that are not a whole, consistent mark or check: removed by the next pass. */
  strays: { dst: string[]; src: string[]; chk: string[]; chains: string[] };
  /** "nicN" marks whose address is missing from nic_chk: put back by the next pass. */
  unchecked: NicMark[];
  /** The packets the checks have dropped (their rules' counters, in both base chains). */
  drops: number;
}

type Json = Record<string, unknown>;
const obj = (v: unknown): Json | undefined => (v && typeof v === "object" && !Array.isArray(v) ? (v as Json) : undefined);

/** Reads `nft -j list table inet microvpc_ct` (its "nftables" array). */
export function parseListing(items: unknown[]): Listed {
  const src = new Map<string, unknown>();
  const dst = new Map<string, unknown>();
  const chk = new Set<string>();
  let chkSet = false;
  const chains = new Set<string>();
  const ruleCount = new Map<string, number>();
  let drops = 0;
  for (const it of items) {
    const o = obj(it);
    const map = obj(o?.map);
    if (map && (map.name === "nic_src" || map.name === "nic_dst")) {
      const into = map.name === "nic_src" ? src : dst;
      for (const e of Array.isArray(map.elem) ? map.elem : []) {
        if (Array.isArray(e) && e.length === 2 && typeof e[0] === "string") into.set(e[0], e[1]);
      }
    }
    const set = obj(o?.set);
    if (set && set.name === "nic_chk") {
      chkSet = true;
      for (const e of Array.isArray(set.elem) ? set.elem : []) if (typeof e === "string") chk.add(e);
    }
    const chain = obj(o?.chain);
    if (chain && typeof chain.name === "string") chains.add(chain.name);
    const rule = obj(o?.rule);
    if (rule && typeof rule.chain === "string") {
      ruleCount.set(rule.chain, (ruleCount.get(rule.chain) ?? 0) + 1);
      if (rule.chain === "prerouting" || rule.chain === "output") {
        for (const e of Array.isArray(rule.expr) ? rule.expr : []) {
          const n = obj(obj(e)?.counter)?.packets;
          if (typeof n === "number" && Number.isSafeInteger(n) && n >= 0) drops += n;
        }
      }
    }
  }
  // A key that is no address cannot be named in a delete: the table is replaced instead.
  const keysOk = [...src.keys(), ...dst.keys(), ...chk].every((k) => isIPv4(k));
  const rulesAre = (n: number) => ["prerouting", "output"].every((c) => chains.has(c) && ruleCount.get(c) === n);
  const earlier = keysOk && !chkSet && rulesAre(EARLIER_RULES);
  const intact = keysOk && (earlier || rulesAre(RULES.length));
  const marks = new Map<string, NicMark>();
  const used = new Set<number>();
  const strays = { dst: [] as string[], src: [] as string[], chk: [] as string[], chains: [] as string[] };
  for (const [address, v] of dst) {
    const target = obj(obj(v)?.jump)?.target;
    const m = typeof target === "string" ? /^(nic|adopted)([1-9][0-9]{0,4})$/.exec(target) : null;
    const index = m ? Number(m[2]) : 0;
    const ok =
      isIPv4(address) &&
      m !== null &&
      index <= MAX_INDEX &&
      !used.has(index) &&
      chains.has(target as string) &&
      ruleCount.get(target as string) === 1 &&
      src.get(address) === (index << 16) >>> 0;
    if (!ok) {
      strays.dst.push(address);
      if (src.has(address)) strays.src.push(address);
      continue;
    }
    used.add(index);
    marks.set(address, { address, index, adopted: m[1] === "adopted" });
  }
  for (const address of src.keys()) if (!marks.has(address) && !strays.src.includes(address)) strays.src.push(address);
  // Checks: every "nicN" mark's address is in nic_chk (one missing gets it back); any other address there is a stray.
  const ours = new Set([...marks.values()].map(chainOf));
  const unchecked = [...marks.values()].filter((m) => !m.adopted && !chk.has(m.address));
  for (const address of chk) {
    const m = marks.get(address);
    if (!m || m.adopted) strays.chk.push(address);
  }
  for (const c of chains) if (c !== "prerouting" && c !== "output" && !ours.has(c)) strays.chains.push(c);
  return { intact, earlier, marks, strays, unchecked, drops };
}

/**
 * One pass over a namespace's table: the transaction that makes it hold a
 * mark for each desired address (new ones adopted: they may have flows
 * older than their mark) and, with removeOrphans, none other; and the marks
 * after it. `listing` null: the table does not exist.
 */
export function planMarks(
  listing: Listed | null,
  desired: string[],
  opts: { removeOrphans: boolean },
): { tx: NftTransaction; marks: Map<string, NicMark>; added: NicMark[]; removed: NicMark[] } {
  let tx = new NftTransaction();
  const marks = new Map<string, NicMark>();
  const removed: NicMark[] = [];
  const at = { family: FAMILY, table: CT_TABLE } as const;
  if (!listing || !listing.intact) {
    if (listing) tx.delete({ kind: "table", family: FAMILY, name: CT_TABLE });
    tx = NftTransaction.concat(tx, tableTx());
  } else {
    const { strays } = listing;
    if (listing.earlier) {
      // An earlier netagent's table: its marks stand; the checks' set and rules join it (every "nicN" mark is unchecked).
      tx.add({ kind: "set", ...at, name: "nic_chk", type: "ipv4_addr" });
      for (const chain of ["prerouting", "output"]) for (const rule of RULES.slice(EARLIER_RULES)) tx.add({ kind: "rule", ...at, chain, rule });
    }
    if (strays.chk.length) tx.delete({ kind: "element", ...at, set: "nic_chk", elements: strays.chk });
    if (strays.dst.length) tx.delete({ kind: "element", ...at, set: "nic_dst", elements: strays.dst });
    if (strays.src.length) tx.delete({ kind: "element", ...at, set: "nic_src", elements: strays.src });
    for (const c of strays.chains) tx.delete({ kind: "chain", ...at, name: c });
    const want = new Set(desired);
    const unchecked = new Set(listing.unchecked);
    for (const m of listing.marks.values()) {
      if (want.has(m.address) || !opts.removeOrphans) {
        marks.set(m.address, m);
        // Its address back in nic_chk.
        if (unchecked.has(m)) checkTx(m, tx);
      } else {
        // A mark whose address is not in nic_chk has no check to delete.
        delTx(m, tx, !m.adopted && !unchecked.has(m));
        removed.push(m);
      }
    }
  }
  // An index removed in this pass is not given out in it: its flows were not cleared.
  const taken = new Set([...[...marks.values()].map((m) => m.index), ...removed.map((m) => m.index)]);
  const added: NicMark[] = [];
  for (const address of desired) {
    if (marks.has(address)) continue;
    const index = freeIndex(taken);
    if (index === 0) break;
    taken.add(index);
    const m = { address, index, adopted: true };
    addTx(m, tx);
    marks.set(address, m);
    added.push(m);
  }
  return { tx, marks, added, removed };
}
