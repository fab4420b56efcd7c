// The nft compiler: a VPC's firewall state in, one nftables script out. Pure
// (no I/O), so golden tests pin its output. The per-packet cost does not grow
// with the number of rules or NICs:
//   * NICs are reached through verdict maps keyed by address (anti-spoofing
//     in the bridge table makes the address trustworthy);
//   * a security group's CIDR rules live in concatenated interval sets
//     (peer . protocol . port range), so 10 000 rules are 10 000 elements
//     behind one rule, and a port range is one element, not one per port;
//   * a group named as a peer is a set of member addresses that changes by
//     element when a NIC joins or leaves.
// Every name is a constant or derived from a validated id.
import { createHash } from "node:crypto";
import { NftTransaction, render, renderTable, type Table, type TableItem } from "../common/nft/tx.js";
import { gatewayNames as gwNames } from "../common/names.js";
import { failClosedTx, FIREWALL_TABLE } from "../common/nft/fail-closed.js";
import { dropPrefix, DROP_LOG_RATE, FLOW_LOG_GROUP } from "./flowlogs.js";
import type { AclEntry, BindingRec, SecurityGroupRec, SgRule, VpcFirewallState } from "./model.js";

/** The firewall's table (inet and bridge); common/nft/fail-closed.ts holds its name. */
export const TABLE = FIREWALL_TABLE;
export { failClosedTx };
/** Packet-mark bit meaning "egress allowed", so the ingress check still runs. */
export const EGRESS_OK = 0x00100000;
const hex = (id: string) => id.slice(-12);

export interface SetModel {
  family: "inet" | "bridge";
  name: string;
  kind: "set" | "map";
  /** nft type, e.g. "ipv4_addr . inet_proto . inet_service". */
  type: string;
  interval?: boolean;
  elements: string[];
  /**
   * A set that exists only while something uses it (a group's rule sets, a
   * peer group's members): added and deleted by an incremental change. The
   * others (the NIC and ACL maps, the bridge sets) are part of the skeleton.
   */
  dynamic?: boolean;
}

export interface FwModel {
  /** The fixed part of both tables (base chains, maps, fixed sets), as nft text: if this differs, the table is replaced. */
  skeleton: string;
  sets: Map<string, SetModel>;
  /**
   * The inet table's regular chains (one per group and direction, per NIC
   * and direction, per ACL and direction), name → rules, in render order.
   * They come and go by incremental change: a new NIC is an added chain and
   * map elements, not a new table.
   */
  chains: Map<string, string[]>;
}

function portRange(r: { portFrom: number; portTo: number }): string {
  if (r.portFrom === 0 && r.portTo === 0) return "0-65535";
  return r.portFrom === r.portTo ? String(r.portFrom) : `${r.portFrom}-${r.portTo}`;
}

function protoNum(p: "tcp" | "udp"): string {
  return p;
}

interface GroupSets {
  ports: string[];
  all: string[];
  /** peer . type . code (range): "icmp:3/4" is 3 . 4, "icmp:3" is 3 . 0-255. */
  icmp: string[];
  icmpAny: string[];
  /** peer group id -> port elements (proto . range), ICMP elements (type . code range), whether any ICMP / "all" is allowed. */
  peers: Map<string, { ports: string[]; icmp: string[]; icmpAny: boolean; all: boolean }>;
}

/** type . code of an ICMP rule with a type: one code, or every code as the range 0-255. */
function icmpElement(r: { icmpType?: number; icmpCode?: number }): string {
  return `${r.icmpType} . ${r.icmpCode === undefined ? "0-255" : r.icmpCode}`;
}

function groupSets(rules: SgRule[], dir: "ingress" | "egress"): GroupSets {
  const g: GroupSets = { ports: [], all: [], icmp: [], icmpAny: [], peers: new Map() };
  for (const r of rules) {
    if (r.dir !== dir) continue;
    if (r.group) {
      const p = g.peers.get(r.group) ?? { ports: [], icmp: [], icmpAny: false, all: false };
      if (r.proto === "all") p.all = true;
      else if (r.proto === "icmp") {
        if (r.icmpType === undefined) p.icmpAny = true;
        else p.icmp.push(icmpElement(r));
      } else p.ports.push(`${protoNum(r.proto)} . ${portRange(r)}`);
      g.peers.set(r.group, p);
      continue;
    }
    const cidr = r.cidr!;
    if (r.proto === "all") g.all.push(cidr);
    else if (r.proto === "icmp") {
      if (r.icmpType === undefined) g.icmpAny.push(cidr);
      else g.icmp.push(`${cidr} . ${icmpElement(r)}`);
    } else g.ports.push(`${cidr} . ${protoNum(r.proto)} . ${portRange(r)}`);
  }
  return g;
}

/**
 * The sets whose element counters count each NIC's new flows and drops per
 * direction (element: the NIC's address).
 */
export const CNT_SETS = ["cnt_in_new", "cnt_in_drop", "cnt_out_new", "cnt_out_drop"] as const;

/** A NIC's counter as LinuxNft.counters names it ("cnt_in_drop/10.0.1.5"): for metrics.ts and GetFirewallStatus. */
export const nicCounter = (set: (typeof CNT_SETS)[number], address: string) => `${set}/${address}`;

function uniq(xs: string[]): string[] {
  return [...new Set(xs)].sort();
}

function aclRule(e: AclEntry, peer: "saddr" | "daddr", logged?: (decider: string) => string): string[] {
  const m = [`ip ${peer} ${e.cidr}`];
  if (e.proto === "tcp" || e.proto === "udp") {
    m.push(`meta l4proto ${e.proto}`);
    if (!(e.portFrom === 0 && e.portTo === 0)) m.push(`th dport ${portRange(e)}`);
  } else if (e.proto === "icmp") {
    m.push("meta l4proto icmp");
    if (e.icmpType !== undefined) m.push(`icmp type ${e.icmpType}`);
    if (e.icmpCode !== undefined) m.push(`icmp code ${e.icmpCode}`);
  }
  // Allow continues to the security groups; deny ends here (logged first, in a rule of its own, for flow logs).
  const rule = `${m.join(" ")} ${e.action === "allow" ? "return" : "counter drop"} comment "rule ${e.ruleNumber}"`;
  return logged && e.action === "deny" ? [`${m.join(" ")} ${logged(`#${e.ruleNumber}`)}`, rule] : [rule];
}

/**
 * Flow logs: a logged drop goes to the NFLOG group in a rule of its own
 * before the drop, sampled (numgen) and rate-limited in the kernel, so a
 * flood cannot swamp the reader and the drop happens whatever the limit says.
 */
function flowLogStmt(rate: number, nicHex: string, dir: "in" | "out" | "any", decider: string): string {
  const sample = rate >= 1 ? "" : `numgen random mod 1000 < ${Math.max(1, Math.round(rate * 1000))} `;
  return `${sample}limit rate ${DROP_LOG_RATE}/second burst ${DROP_LOG_RATE} packets log group ${FLOW_LOG_GROUP} prefix "${dropPrefix(nicHex, dir, decider)}"`;
}

/** nft type with "; flags interval" → the set's type and whether it holds intervals. */
type Decl = [type: string, interval?: "interval"];

/** The drop logging a NIC has: its binding's, else the first of its groups' that logs. */
function dropLoggingOf(n: BindingRec, st: VpcFirewallState): { ratePerSecond: number; burst: number } | undefined {
  return n.dropLogging ?? n.groupIds.map((g) => st.groups.get(g)?.dropLogging).find((x) => x);
}

/**
 * The key of the chains a NIC shares with every NIC in the same groups (in
 * the same order): its groups that `st` has, joined; undefined if the NIC
 * has chains of its own (its drops are logged, with its id in the prefix).
 */
export function sharedChainKey(n: BindingRec, st: VpcFirewallState): string | undefined {
  if (st.flowLogs?.nics.has(n.nicId) || dropLoggingOf(n, st)) return undefined;
  return n.groupIds.filter((g) => st.groups.has(g)).join(",");
}

/** The name (without _in/_out) of the chains shared by the NICs whose sharedChainKey is `key`. */
export const sharedChainName = (key: string) => `grp_${createHash("sha256").update(key).digest("hex").slice(0, 16)}`;

/**
 * Compiles one VPC namespace's firewall: returns its model and the full
 * replace transaction (and its text). `alsoUsed`: groups compiled as if a
 * NIC used them, and `alsoShared`: keys (sharedChainKey) whose shared
 * chains are compiled as if a NIC had them (a delta's part of the VPC, see
 * patchModel: the groups and chains its NICs share with the NICs left out).
 */
export function compile(
  st: VpcFirewallState,
  alsoUsed?: Iterable<string>,
  alsoShared?: Iterable<string>,
): { model: FwModel; tx: NftTransaction; script: string } {
  const sets = new Map<string, SetModel>();
  const addSet = (family: "inet" | "bridge", name: string, [type, interval]: Decl, elements: string[], dynamic = true) =>
    sets.set(`${family} ${name}`, {
      family,
      name,
      kind: "set",
      type,
      ...(interval ? { interval: true } : {}),
      elements: uniq(elements),
      ...(dynamic ? { dynamic } : {}),
    });
  const chains = new Map<string, string[]>();
  const transit = gwNames.vpcSide(st.vpcId);
  const nicIn: string[] = [];
  const nicOut: string[] = [];
  /** The NICs' addresses: the elements of the cnt_* sets. */
  const counted: string[] = [];

  // Groups used by local NICs, with their chains and rule sets.
  const used = new Set<string>(alsoUsed);
  for (const n of st.nics) n.groupIds.forEach((g) => used.add(g));
  const peerGroups = new Set<string>();
  for (const gid of [...used].sort()) {
    const g = st.groups.get(gid);
    if (!g) continue;
    for (const dir of ["ingress", "egress"] as const) {
      const d = dir === "ingress" ? "in" : "out";
      const peer = dir === "ingress" ? "saddr" : "daddr";
      const verdict = dir === "ingress" ? "accept" : `meta mark set meta mark | ${EGRESS_OK} return`;
      const s = groupSets(g.rules, dir);
      const base = `sg_${hex(gid)}_${d}`;
      addSet("inet", `${base}_ports`, ["ipv4_addr . inet_proto . inet_service", "interval"], s.ports);
      addSet("inet", `${base}_all`, ["ipv4_addr", "interval"], s.all);
      addSet("inet", `${base}_icmp`, ["ipv4_addr . icmp_type . icmp_code", "interval"], s.icmp);
      addSet("inet", `${base}_icmpany`, ["ipv4_addr", "interval"], s.icmpAny);
      const rules = [
        `ip ${peer} . meta l4proto . th dport @${base}_ports ${verdict}`,
        `ip ${peer} @${base}_all ${verdict}`,
        `meta l4proto icmp ip ${peer} . icmp type . icmp code @${base}_icmp ${verdict}`,
        `meta l4proto icmp ip ${peer} @${base}_icmpany ${verdict}`,
      ];
      for (const [pg, p] of [...s.peers.entries()].sort()) {
        peerGroups.add(pg);
        const ps = `${base}_g_${hex(pg)}`;
        addSet("inet", ps, ["inet_proto . inet_service", "interval"], p.ports);
        addSet("inet", `${ps}_icmp`, ["icmp_type . icmp_code", "interval"], p.icmp);
        rules.push(`ip ${peer} @members_${hex(pg)} meta l4proto . th dport @${ps} ${verdict}`);
        rules.push(`meta l4proto icmp ip ${peer} @members_${hex(pg)} icmp type . icmp code @${ps}_icmp ${verdict}`);
        if (p.icmpAny) rules.push(`meta l4proto icmp ip ${peer} @members_${hex(pg)} ${verdict}`);
        if (p.all) rules.push(`ip ${peer} @members_${hex(pg)} ${verdict}`);
      }
      chains.set(base, rules);
    }
  }
  for (const pg of [...peerGroups].sort()) addSet("inet", `members_${hex(pg)}`, ["ipv4_addr"], st.members.get(pg) ?? []);

  // A NIC's traffic jumps, through the address maps, to one chain per
  // direction: shared by every NIC in the same groups, unless its drops are
  // logged (then its own, since the log prefix names it). Not a chain per
  // NIC: libnftables loads every chain of the table before each change, so
  // 2 000 of them made one NIC's change cost ~1.5 ms more at 1 000 NICs.
  // The log is its own rule, ahead of the drop: a limit that is exceeded
  // ends the rule it is in, so "limit … drop" would let the packets over the
  // rate through.
  const logOf = (n: BindingRec, d: string): string[] => {
    const l = dropLoggingOf(n, st);
    return l ? [`limit rate ${l.ratePerSecond}/second burst ${l.burst} packets log prefix "microvpc-drop ${hex(n.nicId)} ${d} "`] : [];
  };
  // Flow logs: the security groups' drops of a NIC that logs flows.
  const flowLog = (n: BindingRec, d: "in" | "out"): string[] => {
    const rate = st.flowLogs?.nics.get(n.nicId);
    return rate === undefined ? [] : [flowLogStmt(rate, hex(n.nicId), d, "sg-default-deny")];
  };
  // The NIC's counts are its address's element counters in the cnt_* sets
  // (a lookup that matches counts): named counters, four per NIC, made nft
  // load every one of them before each change. The count and the drop are
  // separate rules, so the drop never depends on the lookup.
  const nicChains = (name: string, groups: string[], own?: BindingRec) => {
    const jIn = groups.map((g) => `jump sg_${hex(g)}_in`);
    const jOut = groups.map((g) => `jump sg_${hex(g)}_out`);
    const logs = (d: "in" | "out") => (own ? [...flowLog(own, d), ...logOf(own, d)] : []);
    chains.set(`${name}_in`, [`ip daddr @cnt_in_new`, ...jIn, ...logs("in"), `ip daddr @cnt_in_drop`, `drop`]);
    // No groups: egress is open (the default); with groups, only what they allow.
    const outTail = groups.length ? [`meta mark & ${EGRESS_OK} == ${EGRESS_OK} return`, ...logs("out"), `ip saddr @cnt_out_drop`, `drop`] : ["return"];
    chains.set(`${name}_out`, [`ip saddr @cnt_out_new`, ...jOut, ...outTail]);
  };
  const shared = (key: string) => {
    const name = sharedChainName(key);
    if (!chains.has(`${name}_in`)) nicChains(name, key ? key.split(",") : []);
    return name;
  };
  for (const key of alsoShared ?? []) shared(key);
  for (const n of [...st.nics].sort((a, b) => (a.nicId < b.nicId ? -1 : a.nicId > b.nicId ? 1 : 0))) {
    const key = sharedChainKey(n, st);
    let name: string;
    if (key === undefined) {
      name = `nic_${hex(n.nicId)}`;
      nicChains(
        name,
        n.groupIds.filter((g) => st.groups.has(g)),
        n,
      );
    } else name = shared(key);
    counted.push(n.address);
    nicIn.push(`${n.address} : jump ${name}_in`);
    nicOut.push(`${n.address} : jump ${name}_out`);
  }

  // Network ACLs: stateless, ordered, default deny; not applied inside one subnet.
  const aclIn: string[] = [];
  const aclOut: string[] = [];
  const intra: string[] = [];
  for (const s of [...st.subnets].sort((a, b) => (a.subnetId < b.subnetId ? -1 : a.subnetId > b.subnetId ? 1 : 0))) {
    intra.push(`"${s.bridge}" . "${s.bridge}"`);
    const acl = st.acls.get(s.subnetId);
    if (!acl) continue;
    const h = hex(s.subnetId);
    const ordered = [...acl.entries].sort((a, b) => a.ruleNumber - b.ruleNumber);
    // Flow logs: the ACL's drops are logged if a NIC of the subnet logs (the
    // collector keeps those of logging NICs), at the highest of their rates.
    const rates = st.nics.filter((n) => n.subnetId === s.subnetId).map((n) => st.flowLogs?.nics.get(n.nicId) ?? 0);
    const rate = Math.max(0, ...rates);
    const logged = (d: "in" | "out") => (rate > 0 ? (decider: string) => flowLogStmt(rate, "-", d, `${acl.id}${decider}`) : undefined);
    const tail = (d: "in" | "out") => [...(rate > 0 ? [logged(d)!("#default-deny")] : []), `counter drop comment "default deny"`];
    const inR = ordered.filter((e) => e.dir === "ingress").flatMap((e) => aclRule(e, "saddr", logged("in")));
    const outR = ordered.filter((e) => e.dir === "egress").flatMap((e) => aclRule(e, "daddr", logged("out")));
    chains.set(`acl_${h}_in`, [...inR, ...tail("in")]);
    chains.set(`acl_${h}_out`, [...outR, ...tail("out")]);
    aclIn.push(`${s.cidr} : jump acl_${h}_in`);
    aclOut.push(`${s.cidr} : jump acl_${h}_out`);
  }

  // Flow logs: the VPC-wide drops (ct state invalid, toward a NIC not bound
  // yet) are logged if anything of the VPC logs, at the highest rate; the
  // collector keeps those of a logging NIC or subnet (prefix "- <dir> <decider>").
  const vpcRate = Math.max(0, ...(st.flowLogs?.nics.values() ?? []), ...(st.flowLogs?.subnets?.values() ?? []));
  const vpcLog = (d: "in" | "any", decider: string, match: string) => (vpcRate > 0 ? [`${match}${flowLogStmt(vpcRate, "-", d, decider)}`] : []);

  // Maps are part of the skeleton: their elements jump to chains that must exist.
  const fixedInet: TableItem[] = [
    { kind: "set", name: "intra_subnet", type: "ifname . ifname" },
    { kind: "map", name: "nic_in", type: "ipv4_addr : verdict" },
    { kind: "map", name: "nic_out", type: "ipv4_addr : verdict" },
    { kind: "map", name: "acl_in", type: "ipv4_addr : verdict", flags: ["interval"] },
    { kind: "map", name: "acl_out", type: "ipv4_addr : verdict", flags: ["interval"] },
    ...CNT_SETS.map((name): TableItem => ({ kind: "set", name, type: "ipv4_addr", counter: true })),
  ];
  const forward: TableItem = {
    kind: "chain",
    name: "forward",
    base: { type: "filter", hook: "forward", priority: "filter", policy: "accept" },
    rules: [
      ...vpcLog("any", "ct-invalid", "ct state invalid "),
      `ct state invalid counter drop`,
      // Link-local is the gateway's only where it is ours: a VM's request to
      // the metadata server or the resolver, which the gateway's prerouting
      // DNATs to the host end of the transit link, and the answers to it. As
      // in AWS, neither ACLs nor security groups apply to those two. A packet
      // that merely carries a link-local source (spoofed from outside through
      // a floating IP or port forward, or sent by the hypervisor) is an
      // ordinary packet for the ACLs and groups below.
      `oifname "${transit}" ip daddr 169.254.0.0/16 ct direction original ct status dnat accept`,
      `iifname "${transit}" ip saddr 169.254.0.0/16 ct direction reply ct status dnat accept`,
      `iifname . oifname != @intra_subnet ip saddr vmap @acl_out`,
      `iifname . oifname != @intra_subnet ip daddr vmap @acl_in`,
      `ct state established,related accept`,
      `ip saddr vmap @nic_out`,
      `ip daddr vmap @nic_in`,
      // Toward a VM port but not a NIC this table knows: a NIC attached a
      // moment ago whose binding is not applied yet. Closed until it is, so
      // "network ready" never means "open to everything" for those ~100 ms.
      ...vpcLog("in", "unbound-nic", `oifname "br-*" `),
      `oifname "br-*" counter drop comment "NIC not bound yet"`,
    ],
  };
  const mapElems: Record<string, string[]> = {
    nic_in: uniq(nicIn),
    nic_out: uniq(nicOut),
    acl_in: uniq(aclIn),
    acl_out: uniq(aclOut),
    intra_subnet: uniq(intra),
  };
  for (const name of CNT_SETS) mapElems[name] = uniq(counted);

  // Anti-spoofing: a VM port may only send from its own MAC and address.
  const ports = st.nics.map((n) => `"${n.hostIf}"`);
  const ok = st.nics.map((n) => `"${n.hostIf}" . ${n.mac} . ${n.address}`);
  addSet("bridge", "nic_ports", ["ifname"], ports, false);
  addSet("bridge", "nic_ok", ["ifname . ether_addr . ipv4_addr"], ok, false);
  const bridge: Table = {
    kind: "table",
    family: "bridge",
    name: TABLE,
    content: [
      { kind: "counter", name: "spoofed" },
      { kind: "set", name: "nic_ports", type: "ifname" },
      { kind: "set", name: "nic_ok", type: "ifname . ether_addr . ipv4_addr" },
      {
        kind: "chain",
        name: "prerouting",
        base: { type: "filter", hook: "prerouting", priority: "filter", policy: "accept" },
        rules: [
          // Every frame entering here comes from a VM port: it passes only with
          // its own MAC and address; a port not bound yet sends nothing.
          `ether type ip iifname . ether saddr . ip saddr @nic_ok accept`,
          // ARP is checked twice: the frame's source MAC and the ARP sender MAC
          // are both the port's own, with the port's own address. Checking the
          // frame alone let a VM send "my address is at <any MAC>" (the gateway's,
          // a neighbour's) from its own frame source, and its neighbours believed
          // the ARP payload. Only well-formed Ethernet/IPv4 requests and replies
          // (the fixed offsets of the checks above hold only for those).
          `ether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp operation { request, reply } iifname . ether saddr . arp saddr ip @nic_ok iifname . arp saddr ether . arp saddr ip @nic_ok accept`,
          // Flow logs: a spoofed IPv4 packet of a NIC that logs flows (only
          // frames that failed the checks above get here, never the allowed path).
          ...st.nics
            .filter((n) => st.flowLogs?.nics.has(n.nicId))
            .sort((a, b) => (a.nicId < b.nicId ? -1 : 1))
            .map((n) => `ether type ip iifname "${n.hostIf}" ${flowLogStmt(st.flowLogs!.nics.get(n.nicId)!, hex(n.nicId), "out", "antispoof")}`),
          `counter name spoofed drop`,
        ],
      },
    ],
  };
  const skeleton = `${renderTable({ kind: "table", family: "inet", name: TABLE, content: [...fixedInet, forward] })}\n${renderTable(bridge)}`;
  // The maps' elements are data too: record them as sets for diffing.
  for (const [name, elements] of Object.entries(mapElems)) {
    const it = fixedInet.find((i) => i.name === name);
    if (it?.kind !== "set" && it?.kind !== "map") throw new Error(`no fixed set ${name}`);
    sets.set(`inet ${name}`, { family: "inet", name, kind: it.kind, type: it.type, ...(it.flags ? { interval: true } : {}), elements });
  }
  const model: FwModel = { skeleton, sets, chains };
  // The full script is rendered only when asked for (a table replace): an
  // incremental change needs the model alone, and at 1 000 NICs rendering
  // every chain is most of a compile.
  let tx: NftTransaction | undefined;
  let rendered: string | undefined;
  return {
    model,
    get tx() {
      return (tx ??= fullTx(model, fixedInet, forward, bridge));
    },
    get script() {
      return (rendered ??= render(this.tx));
    },
  };
}

const setItem = (s: SetModel): TableItem => ({ kind: s.kind, name: s.name, type: s.type, ...(s.interval ? { flags: ["interval"] } : {}) });

/** The full replace: one transaction that creates-if-missing, deletes, recreates and fills both tables. */
function fullTx(m: FwModel, fixedInet: TableItem[], forward: TableItem, bridge: Table): NftTransaction {
  const dynamicInet = [...m.sets.values()].filter((s) => s.family === "inet" && s.dynamic);
  const inet = { kind: "table", family: "inet", name: TABLE } as const;
  const bridge0 = { kind: "table", family: "bridge", name: TABLE } as const;
  // An observer sees the old table or the new one, never a half-built one.
  const tx = new NftTransaction().add(inet).delete(inet).add(bridge0).delete(bridge0);
  tx.add({
    ...inet,
    content: [...dynamicInet.map(setItem), ...fixedInet, ...[...m.chains].map(([name, rules]): TableItem => ({ kind: "chain", name, rules })), forward],
  });
  tx.add(bridge);
  for (const s of m.sets.values()) if (s.elements.length) tx.add({ kind: "element", family: s.family, table: TABLE, set: s.name, elements: s.elements });
  return tx;
}

/**
 * nft deletes set elements one by one (9 990 took 2.4 s in bench:firewall, a
 * full replace 30–60 ms): past this many deletions, diff() replaces the table
 * instead, which is faster and just as atomic.
 */
export const MAX_ELEMENT_DELETIONS = 500;

/**
 * The incremental transaction that turns `prev` into `next` without
 * replacing the table, whatever its size: the script ("" if nothing
 * changed), how many set elements it deletes one by one, and whether it
 * takes anything away (an element or a chain's rule: then established flows
 * may need their conntrack entries cleared); null if the skeleton changed.
 *
 * Order matters inside the one transaction: new sets and (empty)
 * chains first, so every rule and map element can name them; then element
 * deletions (a map element jumping to a chain that goes); then the new and
 * changed chains' rules; then element additions; last the chains, sets and
 * sets nobody references any more. A new NIC is therefore two chains and a
 * few elements, not a new table.
 */
export function elementDiff(
  prev: FwModel,
  next: FwModel,
  /** Flush a chain `prev` does not have before filling it (a delta: the kernel may hold a stale one). */
  flushNew = false,
): { tx: NftTransaction; script: string; deletions: number; revokes: boolean } | null {
  if (prev.skeleton !== next.skeleton) return null;
  const at = { family: "inet", table: TABLE } as const;
  const setOf = (s: SetModel) => ({
    kind: s.kind,
    family: s.family,
    table: TABLE,
    name: s.name,
    type: s.type,
    ...(s.interval ? { flags: ["interval" as const] } : {}),
  });
  const head = new NftTransaction();
  const delElements = new NftTransaction();
  const body = new NftTransaction();
  const addElements = new NftTransaction();
  const tail = new NftTransaction();
  let deletions = 0;
  let revokes = false;

  for (const s of next.sets.values()) if (s.dynamic && !prev.sets.has(`${s.family} ${s.name}`)) head.add(setOf(s));
  for (const name of next.chains.keys()) if (!prev.chains.has(name)) head.add({ kind: "chain", ...at, name });

  for (const [key, s] of next.sets) {
    const before = new Set(prev.sets.get(key)?.elements ?? []);
    const after = new Set(s.elements);
    const del = [...before].filter((e) => !after.has(e));
    const add = [...after].filter((e) => !before.has(e));
    deletions += del.length;
    const el = { kind: "element", family: s.family, table: TABLE, set: s.name } as const;
    if (del.length) delElements.delete({ ...el, elements: del });
    if (add.length) addElements.add({ ...el, elements: add });
  }
  if (deletions) revokes = true;

  for (const [name, rules] of next.chains) {
    const before = prev.chains.get(name);
    if (before && before.join("\n") === rules.join("\n")) continue;
    if (before) {
      body.flush({ kind: "chain", ...at, name });
      revokes = true;
    } else if (flushNew) body.flush({ kind: "chain", ...at, name });
    for (const rule of rules) body.add({ kind: "rule", ...at, chain: name, rule });
  }

  const gone = [...prev.chains.keys()].filter((n) => !next.chains.has(n));
  if (gone.length) revokes = true;
  for (const name of gone) tail.flush({ kind: "chain", ...at, name });
  for (const name of gone) tail.delete({ kind: "chain", ...at, name });
  for (const [key, s] of prev.sets) if (s.dynamic && !next.sets.has(key)) tail.delete(setOf(s));

  const tx = NftTransaction.concat(head, delElements, body, addElements, tail);
  return { tx, script: render(tx), deletions, revokes };
}

/**
 * A delta: `model` (a whole VPC's) with the part `before` replaced by
 * `after`. `before` and `after` are compiles of the same VPC restricted to
 * the NICs that changed (old and new records), with the groups those NICs
 * share with the others as `alsoUsed`, so that every set and chain
 * either belongs to the changed NICs alone or is compiled whole on both
 * sides. The result equals compile() of the whole new state; null if the
 * skeleton differs (then the caller compiles the VPC whole).
 */
export function patchModel(model: FwModel, before: FwModel, after: FwModel): FwModel | null {
  if (model.skeleton !== after.skeleton || before.skeleton !== after.skeleton) return null;
  const sets = new Map(model.sets);
  for (const key of before.sets.keys()) if (!after.sets.has(key)) sets.delete(key);
  for (const [key, s] of after.sets) {
    const old = before.sets.get(key)?.elements ?? [];
    if (old.length === s.elements.length && old.every((e, i) => e === s.elements[i]) && sets.has(key)) continue;
    sets.set(key, { ...s, elements: patchSorted(model.sets.get(key)?.elements ?? [], old, s.elements) });
  }
  const chains = new Map(model.chains);
  for (const name of before.chains.keys()) if (!after.chains.has(name)) chains.delete(name);
  for (const [name, rules] of after.chains) chains.set(name, rules);
  return { skeleton: model.skeleton, sets, chains };
}

/**
 * uniq([...base without `gone`, ...added]) for a sorted, duplicate-free
 * `base` (every set's elements are: compile() sorts them), by binary search:
 * a NIC's change touches a few elements of sets that hold one per NIC, and
 * sorting those sets again cost most of a delta at 1 000 NICs.
 */
export function patchSorted(base: readonly string[], gone: readonly string[], added: readonly string[]): string[] {
  const out = base.slice();
  const at = (e: string) => {
    let lo = 0;
    let hi = out.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (out[mid] < e) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  };
  for (const e of gone) {
    const i = at(e);
    if (out[i] === e) out.splice(i, 1);
  }
  for (const e of added) {
    const i = at(e);
    if (out[i] !== e) out.splice(i, 0, e);
  }
  return out;
}

/**
 * The incremental script that turns `prev` into `next`, or null if the
 * skeleton changed or more than MAX_ELEMENT_DELETIONS elements go (then the
 * caller replaces the table).
 */
export function diff(prev: FwModel, next: FwModel): string | null {
  const d = elementDiff(prev, next);
  return d && d.deletions <= MAX_ELEMENT_DELETIONS ? d.script : null;
}

/** failClosedTx as nft script text. */
export function failClosedScript(): string {
  return render(failClosedTx());
}

/** The transaction that removes microvpc's tables from a namespace. */
export function removeTx(): NftTransaction {
  const inet = { kind: "table", family: "inet", name: TABLE } as const;
  const bridge = { kind: "table", family: "bridge", name: TABLE } as const;
  return new NftTransaction().add(inet).delete(inet).add(bridge).delete(bridge);
}

/** removeTx as nft script text. */
export function removeScript(): string {
  return render(removeTx());
}

// ---- policy evaluation, for clearing conntrack entries a change no longer allows ----

function ipInt(ip: string): number {
  const p = ip.split(".").map(Number);
  return ((p[0] << 24) >>> 0) + (p[1] << 16) + (p[2] << 8) + p[3];
}

function inCidr(ip: string, cidr: string): boolean {
  const [base, len] = cidr.split("/");
  const size = 2 ** (32 - Number(len));
  const b = ipInt(base);
  const a = ipInt(ip);
  return a >= b && a < b + size;
}

function ruleMatches(r: SgRule, peer: string, proto: string, port: number, members: Map<string, string[]>): boolean {
  const peerOk = r.group ? (members.get(r.group) ?? []).includes(peer) : inCidr(peer, r.cidr!);
  if (!peerOk) return false;
  if (r.proto === "all") return true;
  if (r.proto !== proto) return false;
  if (r.proto === "icmp") return true;
  return (r.portFrom === 0 && r.portTo === 0) || (port >= r.portFrom && port <= r.portTo);
}

function groupsAllow(
  groups: SecurityGroupRec[],
  dir: "ingress" | "egress",
  peer: string,
  proto: string,
  port: number,
  members: Map<string, string[]>,
): boolean {
  return groups.some((g) => g.rules.some((r) => r.dir === dir && ruleMatches(r, peer, proto, port, members)));
}

/** Would a new flow src→dst proto/dport be allowed by the security groups in `st`? */
export function flowAllowed(st: VpcFirewallState, src: string, dst: string, proto: string, dport: number): boolean {
  const sender = st.nics.find((n) => n.address === src);
  if (sender && sender.groupIds.length) {
    const gs = sender.groupIds.map((g) => st.groups.get(g)).filter((g): g is SecurityGroupRec => !!g);
    if (!groupsAllow(gs, "egress", dst, proto, dport, st.members)) return false;
  }
  const receiver = st.nics.find((n) => n.address === dst);
  if (receiver) {
    const gs = receiver.groupIds.map((g) => st.groups.get(g)).filter((g): g is SecurityGroupRec => !!g);
    if (!groupsAllow(gs, "ingress", src, proto, dport, st.members)) return false;
  }
  return true;
}
