// The gateway's pure planner. Each VPC namespace on a hypervisor is joined to
// the hypervisor's own namespace ("host") by a transit veth with link-local
// addresses unique per VPC on that host:
//
//   VM 10.0.1.4 ─ bridge ─ [VPC ns] gv<vpc> 169.254.k.2 ══ 169.254.k.1 gh<vpc> [host ns] ─ uplink ─ outside
//
// * Egress: the VPC namespace masquerades allowed sources to 169.254.k.2
//   (public subnets always; private subnets only while the VPC has a NAT
//   gateway); the host masquerades that to its uplink address. The outside
//   never sees a VM address, and overlapping VPCs never share NAT state:
//   each has its own namespace and transit address.
// * Floating IPs: the host answers ARP for the address on the uplink (proxy
//   neighbour) and routes it to the VPC; the VPC namespace does 1:1 DNAT/SNAT
//   to the VM, so the VM's security groups (in the same namespace) decide.
// * Port forwards: host uplink:port → 169.254.k.2:port → VM:port. Only
//   packets to an address of the uplink itself are forwarded: a floating IP
//   (routed, not local) keeps its own ports, so one tenant's forward of :443
//   never takes another tenant's FIP:443. Ports the hypervisor serves itself
//   (reservedPorts) are never forwarded.
// * Link-local sources: nothing from the uplink with a 169.254.0.0/16 source
//   is forwarded toward a VPC (inside a VPC link-local skips the security
//   groups only for the metadata/resolver answers on the transit link).
// * Conntrack: every VM flow leaving through the transit link is a conntrack
//   entry in the host namespace, the table every VPC's NAT shares; the VPC
//   namespace refuses a VM's new flows past ctLimitPerVm.
// * IMDS: 169.254.169.254:80 → 169.254.k.1:IMDS_PORT with the VM's source
//   address untouched; the metadata server knows the VPC by which transit
//   address it was reached at and the VM by its (anti-spoofed) address. A
//   policy-routing rule per VPC sends its replies back the right way even
//   when VM addresses overlap across VPCs.
// * DNS: the VPC's resolver address (default VPC base + 2) :53 udp+tcp →
//   169.254.k.1:DNS_PORT, the same way: the resolver (dns/resolver.ts)
//   knows the VPC by the transit address. The resolver address is held on
//   the namespace's lo (label lo:mvpcdns), so the namespace answers ARP for
//   it when it lies inside a VM's own subnet; outside every subnet VMs route
//   it to their gateway. Either way the prerouting DNAT takes it.
// Everything here is plain data in, command lines and nft transactions out.
import { gatewayNames as names, transitAddrs } from "../common/names.js";
import { NftTransaction, render, type Chain, type Table } from "../common/nft/tx.js";

export const IMDS_ADDRESS = "169.254.169.254";
export const TABLE = "microvpc_gw";
/** Label of the resolver address on a VPC namespace's lo: ours to replace and delete. */
export const RESOLVER_LABEL = "lo:mvpcdns";

export interface GwVpc {
  vpcId: string;
  /** Index of the VPC's transit /30 on this host (0-based, unique per host). */
  transit: number;
  /** Subnets of the VPC present on this host. */
  subnets: { subnetId: string; cidr: string; public: boolean }[];
  /** True while the VPC has a NAT gateway; natSources limits which private subnets use it (empty: all). */
  nat: boolean;
  natSources: string[];
  /**
   * The NAT gateway's public address ("" or unset: none, or a gateway of an
   * older version without one, whose sources are masqueraded by each host).
   */
  natAddress?: string;
  /**
   * With natAddress: "holder" — this host holds the address (proxy ARP, /32
   * route, SNAT of natCidrs to it); "steer" — another host does, and the
   * sources' egress goes to it over the overlay (natSteerLines); "none" —
   * nobody holds it yet: the sources have no egress.
   */
  natRole?: "holder" | "steer" | "none";
  /** CIDRs of the NAT's source subnets in the whole VPC (not only those on this host). */
  natCidrs?: string[];
  /** The VPC's WireGuard interface in its namespace (netagent/overlay/wg.ts wgName), for "steer". */
  overlayIf?: string;
  /** Floating IPs of NICs on this host: public → private. */
  fips: { address: string; private: string }[];
  /** Port forwards to NICs on this host. */
  forwards: { proto: "tcp" | "udp"; outsidePort: number; private: string; privatePort: number }[];
  /** IMDS hop limits: VM address → IP TTL the token responses leave with. */
  hopLimits: Map<string, number>;
  /** The VPC's resolver address (undefined: no resolver in this VPC). */
  resolver?: string;
}

export interface HostGw {
  hostId: string;
  /** The hypervisor's uplink interface (in the host namespace). */
  uplink: string;
  imdsPort: number;
  /** Port of the VPC resolver on the host's transit addresses; 0 or unset: no resolver. */
  dnsPort?: number;
  /** The floating IP pool (CIDR), never masqueraded. */
  pool: string;
  /** Ports the hypervisor serves itself: never port-forwarded, whatever Redis holds. */
  reservedPorts?: PortRanges;
  /**
   * The management network (common/management.ts): VMs reach none of it
   * through this host, but for the metadata server and the resolver on the
   * transit addresses. Floating IPs (the pool) are left out of it.
   */
  managementCidrs?: string[];
  vpcs: GwVpc[];
}

/** Inclusive port ranges, e.g. [[22, 22], [7401, 7405]]. */
export type PortRanges = readonly (readonly [number, number])[];

/** SSH, the five daemons' gRPC ports, their health ports (gRPC + 1000, --health-listen) and metrics ports (gRPC + 2000). */
export const DEFAULT_RESERVED_PORTS = "22,7401-7405,8401-8405,9401-9405";
/** Default of --conntrack-limit-per-vm: a VM's flows through the host's NAT at once. */
export const DEFAULT_CONNTRACK_LIMIT_PER_VM = 16384;

/** Parses "22,7401-7405" (empty: none); throws naming `flag` on anything else. */
export function parsePortRanges(flag: string, text: string): PortRanges {
  const out: [number, number][] = [];
  for (const part of text.split(",").map((x) => x.trim())) {
    if (part === "") continue;
    const m = /^([0-9]{1,5})(?:-([0-9]{1,5}))?$/.exec(part);
    const from = m ? Number(m[1]) : NaN;
    const to = m ? Number(m[2] ?? m[1]) : NaN;
    if (!m || from < 1 || to > 65535 || to < from)
      throw new Error(`${flag} ${JSON.stringify(text)}: ${JSON.stringify(part)} is not a port or range; use e.g. "22,7401-7405" (1–65535)`);
    out.push([from, to]);
  }
  return out;
}

export const portReserved = (r: PortRanges | undefined, port: number): boolean => (r ?? []).some(([a, b]) => port >= a && port <= b);

export const showPortRanges = (r: PortRanges): string => r.map(([a, b]) => (a === b ? `${a}` : `${a}-${b}`)).join(",") || "none";

// Transit names and addresses are shared with the firewall and the resolver: common/names.ts.
export { gatewayNames as names, transitAddrs } from "../common/names.js";

/** ip -batch lines to create the transit link (run in the host namespace). */
export function transitCreateLines(hostId: string, v: GwVpc, vpcNs: string): { host: string[]; vpc: string[] } {
  const t = transitAddrs(v.transit);
  const h = names.hostSide(v.vpcId);
  const g = names.vpcSide(v.vpcId);
  return {
    host: [
      `link add ${h} type veth peer name ${g} netns ${vpcNs}`,
      `link set dev ${h} alias mvpc:${hostId}:gw:${v.vpcId}`,
      `addr add ${t.host}/30 dev ${h}`,
      `link set dev ${h} up`,
    ],
    vpc: [
      `addr add ${t.vpc}/30 dev ${g}`,
      `link set dev ${g} up`,
      `route replace default via ${t.host} dev ${g}`,
      // Some guests ARP for the metadata address instead of routing to their
      // gateway: holding it locally makes every subnet bridge answer for it;
      // the DNAT in prerouting still sends the request to the server.
      `addr replace ${IMDS_ADDRESS}/32 dev lo`,
    ],
  };
}

/**
 * What transitCreateLines sets up, as lines that may run again on a link
 * that exists (replace, not add): for a transit link found at start, after
 * an error or by the drift pass, which a half-failed create may have left
 * unconfigured on either side.
 */
export function transitRepairLines(hostId: string, v: GwVpc, vpcNs: string): { host: string[]; vpc: string[] } {
  const made = transitCreateLines(hostId, v, vpcNs);
  const replace = (l: string) => l.replace(/^addr add /, "addr replace ");
  return { host: made.host.slice(1).map(replace), vpc: made.vpc.map(replace) };
}

/**
 * ip lines (in the VPC namespace) that make `want` the resolver address on
 * lo, given the addresses labelled RESOLVER_LABEL there now.
 */
export function resolverAddrLines(present: string[], want: string | undefined): string[] {
  const lines = present.filter((a) => a !== want).map((a) => `addr del ${a}/32 dev lo`);
  if (want !== undefined && !present.includes(want)) lines.push(`addr replace ${want}/32 dev lo label ${RESOLVER_LABEL}`);
  return lines;
}

/** Host-namespace routes and rules of one VPC: FIPs to it, IMDS replies back to it. */
export function hostRouteLines(v: GwVpc, uplink: string): string[] {
  const t = transitAddrs(v.transit);
  const h = names.hostSide(v.vpcId);
  const lines = [`route replace default via ${t.vpc} dev ${h} table ${names.table(v.transit)}`];
  const held = v.natAddress && v.natRole === "holder" ? [{ address: v.natAddress }] : [];
  for (const f of [...v.fips, ...held]) {
    lines.push(`route replace ${f.address}/32 via ${t.vpc} dev ${h}`);
    lines.push(`neigh replace proxy ${f.address} dev ${uplink}`);
  }
  return lines;
}

/**
 * Everything one VPC has in the host namespace's routing: its policy rule
 * (deleted and added again, so a rule left with another source is replaced)
 * and hostRouteLines. Run with `ip -force -batch`: the delete of a missing
 * rule is skipped.
 */
export function vpcHostLines(v: GwVpc, uplink: string): string[] {
  const t = transitAddrs(v.transit);
  return [
    `rule del pref ${names.rulePref(v.transit)}`,
    `rule add from ${t.host} lookup ${names.table(v.transit)} pref ${names.rulePref(v.transit)}`,
    ...hostRouteLines(v, uplink),
  ];
}

/**
 * Lines that take away the floating-IP routes and proxy neighbours among
 * `applied` (lines of vpcHostLines) that `keep` no longer has. Only those
 * two: the default route lives in the VPC's own table, and the rule is
 * replaced by vpcHostLines or deleted by transitReleaseLines.
 */
export function undoHostLines(applied: readonly string[], keep: readonly string[] = []): string[] {
  return applied
    .filter((l) => l.startsWith("neigh replace proxy") || (l.startsWith("route replace") && l.includes("/32")))
    .filter((l) => !keep.includes(l))
    .map((l) =>
      l.startsWith("neigh") ? l.replace("neigh replace proxy", "neigh del proxy") : l.replace("route replace", "route del").replace(/ via .*$/, ""),
    );
}

/**
 * The host-namespace route diff of one VPC: given the lines it wants now
 * (vpcHostLines) and those last applied (undefined: none known), the lines
 * to run with `ip -force -batch` — none when nothing changed, else the
 * removals of what went, then every wanted line (replace is idempotent).
 */
export function hostRouteDiff(want: readonly string[], applied: readonly string[] | undefined): string[] {
  const prev = applied ?? [];
  if (prev.length === want.length && prev.every((l, i) => l === want[i])) return [];
  return [...undoHostLines(prev, want), ...want];
}

/**
 * Lines (`ip -force -batch`, host namespace) that remove what a VPC that
 * left this host had there: the routes and proxy neighbours among `applied`,
 * and the policy rule of its transit index if it still had one.
 */
export function transitReleaseLines(applied: readonly string[], transit: number | undefined): string[] {
  const lines = undoHostLines(applied);
  if (transit !== undefined) lines.push(`rule del pref ${names.rulePref(transit)}`);
  return lines;
}

/** Policy-routing preferences and table of the NAT steering in a VPC namespace (natSteerLines). */
export const NAT_STEER_PREF = 1000;
export const NAT_STEER_TABLE = 1000;

/** A policy rule of a VPC namespace as `ip -j rule show` lists it. */
export interface RuleInfo {
  priority: number;
  src?: string;
  srclen?: number;
}

/**
 * The NAT steering of a VPC namespace where another host holds the NAT
 * gateway's address: traffic from the NAT's source subnets that no route of
 * the main table but its default takes (other subnets, remote NICs over the
 * overlay, the transit link, peerings) goes out the VPC's WireGuard
 * interface, whose peer for the holder has 0.0.0.0/0 among its allowed-ips
 * (netagent/overlay/plan.ts). Per source CIDR:
 *   pref 1000: from CIDR lookup main suppress_prefixlength 0
 *   pref 1001: from CIDR lookup 1000   (table 1000: default dev wgX)
 * Given the rules present at those preferences, returns the removals (run
 * with -force) and the additions (which must succeed). Not steering: every
 * such rule goes, and the table with them.
 */
export function natSteerLines(present: readonly RuleInfo[], v: GwVpc): { del: string[]; add: string[] } {
  const steer = !!v.natAddress && v.natRole === "steer" && !!v.overlayIf;
  const cidrs = steer ? [...new Set(v.natCidrs ?? [])].sort() : [];
  const want = new Set(cidrs.flatMap((c) => [`${NAT_STEER_PREF} ${c}`, `${NAT_STEER_PREF + 1} ${c}`]));
  const have = new Set(
    present
      .filter((r) => (r.priority === NAT_STEER_PREF || r.priority === NAT_STEER_PREF + 1) && r.src !== undefined)
      .map((r) => `${r.priority} ${r.src}/${r.srclen ?? 32}`),
  );
  const del = [...have].filter((k) => !want.has(k)).map((k) => `rule del from ${k.split(" ")[1]} pref ${k.split(" ")[0]}`);
  const add: string[] = [];
  if (!steer) {
    if (have.size) del.push(`route flush table ${NAT_STEER_TABLE}`);
    return { del, add };
  }
  add.push(`route replace default dev ${v.overlayIf} table ${NAT_STEER_TABLE}`);
  for (const c of cidrs) {
    if (!have.has(`${NAT_STEER_PREF} ${c}`)) add.push(`rule add from ${c} lookup main suppress_prefixlength 0 pref ${NAT_STEER_PREF}`);
    if (!have.has(`${NAT_STEER_PREF + 1} ${c}`)) add.push(`rule add from ${c} lookup ${NAT_STEER_TABLE} pref ${NAT_STEER_PREF + 1}`);
  }
  return { del, add };
}

/**
 * The VPC namespace's NAT table. ctLimitPerVm > 0: a VM may hold at most that
 * many flows through the transit link (new ones past it are refused).
 */
export function vpcTx(v: GwVpc, imdsPort: number, dnsPort = 0, ctLimitPerVm = 0): NftTransaction {
  const t = transitAddrs(v.transit);
  const dns = dnsPort > 0 && v.resolver !== undefined;
  const g = names.vpcSide(v.vpcId);
  // A NAT gateway with an address: its sources leave as that address from
  // the holder only (nat_src); without one (older records), as this host.
  const legacyNat = v.nat && !v.natAddress;
  const egress = v.subnets
    .filter((s) => s.public || (legacyNat && (v.natSources.length === 0 || v.natSources.includes(s.subnetId))))
    .map((s) => s.cidr)
    .sort();
  const natSrc = v.natAddress && v.natRole === "holder" ? [...(v.natCidrs ?? [])].sort() : [];
  const fipIn = v.fips.map((f) => `${f.address} : ${f.private}`).sort();
  const fipOut = v.fips.map((f) => `${f.private} : ${f.address}`).sort();
  const fipPriv = v.fips.map((f) => f.private).sort();
  const pf = v.forwards.map((f) => `${f.proto} . ${f.outsidePort} : ${f.private} . ${f.privatePort}`).sort();
  const table = { kind: "table", family: "ip", name: TABLE } as const;
  const tx = new NftTransaction()
    .add(table)
    .delete(table)
    .add({
      ...table,
      content: [
        { kind: "set", name: "egress_ok", type: "ipv4_addr", flags: ["interval"], elements: egress },
        // Sources translated to the NAT gateway's address (this host holds it):
        // its own VMs' and, arriving over the overlay, the other hosts'.
        { kind: "set", name: "nat_src", type: "ipv4_addr", flags: ["interval"], autoMerge: true, elements: natSrc },
        { kind: "set", name: "fip_private", type: "ipv4_addr", elements: fipPriv },
        { kind: "map", name: "fip_in", type: "ipv4_addr : ipv4_addr", elements: fipIn },
        { kind: "map", name: "fip_out", type: "ipv4_addr : ipv4_addr", elements: fipOut },
        { kind: "map", name: "port_forward", type: "inet_proto . inet_service : ipv4_addr . inet_service", elements: pf },
        {
          kind: "chain",
          name: "prerouting",
          base: { type: "nat", hook: "prerouting", priority: "dstnat", policy: "accept" },
          rules: [
            `ip daddr ${IMDS_ADDRESS} tcp dport 80 dnat to ${t.host}:${imdsPort}`,
            ...(dns
              ? [`ip daddr ${v.resolver} udp dport 53 dnat to ${t.host}:${dnsPort}`, `ip daddr ${v.resolver} tcp dport 53 dnat to ${t.host}:${dnsPort}`]
              : []),
            `iifname "${g}" ip daddr @fip_in dnat to ip daddr map @fip_in`,
            `iifname "${g}" ip daddr ${t.vpc} dnat ip to meta l4proto . th dport map @port_forward`,
          ],
        },
        {
          kind: "chain",
          name: "postrouting",
          base: { type: "nat", hook: "postrouting", priority: "srcnat", policy: "accept" },
          rules: [
            `oifname "${g}" ip daddr ${t.host} return`,
            `oifname "${g}" ip saddr @fip_private snat to ip saddr map @fip_out`,
            ...(natSrc.length ? [`oifname "${g}" ip saddr @nat_src snat to ${v.natAddress}`] : []),
            `oifname "${g}" ip saddr @egress_ok masquerade`,
          ],
        },
        {
          kind: "chain",
          name: "forward",
          // Before the firewall (priority filter): what may leave the VPC at all.
          base: { type: "filter", hook: "forward", priority: "-10", policy: "accept" },
          rules: [
            `oifname "${g}" ip daddr ${t.host} tcp dport ${imdsPort} accept`,
            // The resolver is for every subnet, NAT gateway or not (as AWS).
            ...(dns ? [`oifname "${g}" ip daddr ${t.host} meta l4proto { tcp, udp } th dport ${dnsPort} accept`] : []),
            `oifname "${g}" ct state established,related accept`,
            `oifname "${g}" ip saddr @fip_private accept`,
            `oifname "${g}" ip saddr @egress_ok accept`,
            `oifname "${g}" ip saddr @nat_src accept`,
            `oifname "${g}" counter drop comment "private subnet without NAT gateway"`,
          ],
        },
        { kind: "chain", name: "output", base: { type: "filter", hook: "output", priority: "filter", policy: "accept" }, rules: [] },
      ],
    })
    .add(ctLimitTable)
    .flush(ctLimitChain);
  if (ctLimitPerVm > 0)
    tx.add({
      kind: "rule",
      family: ctLimitChain.family,
      table: ctLimitChain.table,
      chain: ctLimitChain.name,
      rule: `oifname "${g}" ct state new add @ct_per_vm { ip saddr ct count over ${ctLimitPerVm} } counter reject with icmp type admin-prohibited comment "conntrack limit per VM"`,
    });
  return tx;
}

/**
 * The per-VM conntrack limit lives in a table of its own, which is never
 * deleted: its dynamic set holds each VM's count of open flows, and the NAT
 * table above is replaced on every change of the VPC (a NIC, a floating IP).
 * Were the set in that table, every such change would forget the counts, and
 * a VM at its limit could open as many flows again each time another VM of
 * its VPC was created. Each apply only replaces the chain's one rule.
 *
 * Each flow out of the VPC (metadata and resolver requests included) is also
 * an entry in the host namespace's conntrack table, which every VPC's NAT
 * shares: one VM must not fill it. Counted per VM address (anti-spoofed by the
 * bridge table). Priority -20: before the NAT table's forward chain (-10).
 */
export const CT_LIMIT_TABLE = "microvpc_gw_ctlimit";
const ctLimitTable: Table = {
  kind: "table",
  family: "ip",
  name: CT_LIMIT_TABLE,
  content: [
    { kind: "set", name: "ct_per_vm", type: "ipv4_addr", size: 65535, flags: ["dynamic"] },
    { kind: "chain", name: "forward", base: { type: "filter", hook: "forward", priority: "-20", policy: "accept" }, rules: [] },
  ],
};
const ctLimitChain: Chain = { kind: "chain", family: "ip", table: CT_LIMIT_TABLE, name: "forward" };

/** vpcTx as nft script text. */
export function vpcNft(v: GwVpc, imdsPort: number, dnsPort = 0, ctLimitPerVm = 0): string {
  return render(vpcTx(v, imdsPort, dnsPort, ctLimitPerVm));
}

/** The IMDS hop limit of a VM whose metadata sets none (AWS's default for IMDSv2 tokens). */
export const DEFAULT_HOP_LIMIT = 1;

/** The host namespace's table: masquerade to the uplink, port forwards, what VPCs may reach. */
export function hostTx(h: HostGw): NftTransaction {
  const dnsPort = h.dnsPort ?? 0;
  const transitIfs = h.vpcs.map((v) => `"${names.hostSide(v.vpcId)}"`).sort();
  const pf: string[] = [];
  // nft cannot set the TTL from a map, so one set (and rule) per hop limit
  // in use; the default (1) is the last rule, for every VPC's transit
  // address, so that a VM coming or going with the default hop limit does
  // not change this table (it was one element per VM, and every NIC event
  // replaced the table).
  const ttl = new Map<number, string[]>();
  const imdsSrc: string[] = [];
  for (const v of h.vpcs) {
    const t = transitAddrs(v.transit);
    // A forward on a port the hypervisor serves (made before the API checked,
    // or through another host's gateway with another list) is not applied.
    for (const f of v.forwards.filter((f) => !portReserved(h.reservedPorts, f.outsidePort)))
      pf.push(`${f.proto} . ${f.outsidePort} : ${t.vpc} . ${f.outsidePort}`);
    imdsSrc.push(t.host);
    for (const [addr, hop] of v.hopLimits) if (hop !== DEFAULT_HOP_LIMIT) ttl.set(hop, [...(ttl.get(hop) ?? []), `${t.host} . ${addr}`]);
  }
  const hops = [...ttl.keys()].sort((a, b) => a - b);
  const table = { kind: "table", family: "ip", name: TABLE } as const;
  return new NftTransaction()
    .add(table)
    .delete(table)
    .add({
      ...table,
      content: [
        { kind: "set", name: "transit_ifs", type: "ifname", elements: transitIfs },
        { kind: "set", name: "pool", type: "ipv4_addr", flags: ["interval"], elements: [h.pool] },
        { kind: "map", name: "port_forward", type: "inet_proto . inet_service : ipv4_addr . inet_service", elements: pf.sort() },
        { kind: "set", name: "management", type: "ipv4_addr", flags: ["interval"], autoMerge: true, elements: [...(h.managementCidrs ?? [])].sort() },
        // IMDS answers leave with TTL = hop limit + 1: the VPC namespace is one
        // routed hop, so the VM receives the hop limit (1: a container behind a
        // NAT inside the VM cannot use them).
        { kind: "set", name: "imds_src", type: "ipv4_addr", elements: imdsSrc.sort() },
        ...hops.map((n) => ({ kind: "set" as const, name: `imds_hop_${n}`, type: "ipv4_addr . ipv4_addr", elements: ttl.get(n)!.sort() })),
        {
          kind: "chain",
          name: "prerouting",
          base: { type: "nat", hook: "prerouting", priority: "dstnat", policy: "accept" },
          // Only to an address of the uplink itself ("fib daddr . iif type local"):
          // floating IPs are routed through here, not local, and keep their ports.
          rules: [`iifname "${h.uplink}" fib daddr . iif type local dnat ip to meta l4proto . th dport map @port_forward`],
        },
        {
          kind: "chain",
          name: "postrouting",
          base: { type: "nat", hook: "postrouting", priority: "srcnat", policy: "accept" },
          rules: [`oifname "${h.uplink}" iifname @transit_ifs ip saddr != @pool masquerade`],
        },
        {
          kind: "chain",
          name: "input",
          // A VM reaches nothing of the hypervisor but the metadata server.
          base: { type: "filter", hook: "input", priority: "filter", policy: "accept" },
          rules: [
            `tcp dport ${h.imdsPort} iifname != @transit_ifs iifname != "lo" drop comment "the metadata server is for VMs only"`,
            // The resolver binds transit addresses only; nothing else may reach them
            // on its port. The host's own :53 elsewhere is left alone.
            ...(dnsPort
              ? [
                  `ip daddr 169.254.0.0/16 meta l4proto { tcp, udp } th dport ${dnsPort} iifname != @transit_ifs iifname != "lo" drop comment "the VPC resolver is for VMs only"`,
                ]
              : []),
            `iifname != @transit_ifs accept`,
            `ct state established,related accept`,
            // From a VM: the metadata server and the resolver on the transit
            // address only, never a port of the host's management addresses.
            `ip daddr @management ip daddr != 169.254.0.0/16 counter drop comment "management network"`,
            `tcp dport ${h.imdsPort} accept`,
            ...(dnsPort ? [`meta l4proto { tcp, udp } th dport ${dnsPort} accept`] : []),
            `counter drop`,
          ],
        },
        {
          kind: "chain",
          name: "forward",
          base: { type: "filter", hook: "forward", priority: "filter", policy: "accept" },
          rules: [
            // Link-local on the uplink is never ours: a spoofed 169.254.x.y source
            // toward a floating IP or port forward would look like the metadata or
            // resolver path inside the VPC. (Input is left alone: the hypervisor may
            // use its own cloud's link-local services.)
            `iifname "${h.uplink}" ip saddr 169.254.0.0/16 counter drop comment "link-local source from the uplink"`,
            // Nor a new flow to a link-local destination we did not translate to: a
            // neighbour routing 169.254.k.2 at us would reach a VPC's transit end
            // directly, around the port-forward rule. (Answers to the VMs' own
            // masqueraded flows are replies: they pass.)
            `iifname "${h.uplink}" ip daddr 169.254.0.0/16 ct direction original ct status & dnat == 0 counter drop comment "link-local destination from the uplink"`,
            `iifname @transit_ifs oifname @transit_ifs counter drop comment "VPCs never reach each other through the host"`,
            // Redis, other hypervisors' gRPC and metrics, SSH: never from a VM,
            // whatever its groups, NAT gateway or floating IP (a floating IP of
            // another VM on the same subnet is not management).
            // Only flows a VM starts: its answers to a management host that reached
            // it through a floating IP or port forward still leave.
            `iifname @transit_ifs ip daddr @management ip daddr != @pool ct direction original counter drop comment "management network"`,
            `iifname @transit_ifs oifname != "${h.uplink}" counter drop`,
          ],
        },
        {
          kind: "chain",
          name: "output",
          base: { type: "route", hook: "output", priority: "mangle", policy: "accept" },
          rules: [
            ...hops.map((n) => `tcp sport ${h.imdsPort} ip saddr . ip daddr @imds_hop_${n} ip ttl set ${n + 1} accept`),
            `tcp sport ${h.imdsPort} ip saddr @imds_src ip ttl set ${DEFAULT_HOP_LIMIT + 1}`,
          ],
        },
      ],
    });
}

/** hostTx as nft script text. */
export function hostNft(h: HostGw): string {
  return render(hostTx(h));
}
