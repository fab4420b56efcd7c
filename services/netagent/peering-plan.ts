// Pure planning of VPC peering on one hypervisor: the peerings of the VPCs
// this host holds, and what the kernel has, in; `ip -batch` lines and an nft
// transaction per VPC namespace out.
//
// The path of a packet (V = the peering's vpc1, W = vpc2):
//
//   V-VM (host a) → V ns a ══ V's WireGuard ══ V ns b ─ pcX ─ W ns b → W-VM (host b)
//
// The crossing between the two VPCs always happens on the host of the W
// side's NIC, in both directions, so each namespace on the way sees both
// directions of a connection (stateful rules and conntrack stay right). For
// that, V's namespace (and V's WireGuard mesh) extends to every host where W
// is present ("span"): there a veth pair pcX joins the two namespaces. V's
// WireGuard peers carry the W NICs of each host in their allowed-ips (the
// overlay does that), so V routes a remote W NIC over its own tunnel to that
// NIC's host, and accepts W sources only from the host they live on.
//
// In each namespace:
// - routes (protocol 77, so ours are told apart): the peer's allowed CIDRs
//   via the link, to a next hop that no device holds (169.254.253.1) and
//   whose MAC is pinned by a permanent neighbour entry — no addresses on the
//   link, so nothing to collide with the transit /30s;
// - an `unreachable` route (metric 4000) for the peer's whole CIDR: a
//   destination the peering does not allow gets an ICMP error at once instead
//   of leaking to the NAT gateway;
// - table inet microvpc_peering: a packet arriving over a link must come
//   from the peer's allowed CIDRs and go to ours (non-transitive: B never
//   forwards A's packets on to C, whatever A sends).
import { createHash } from "node:crypto";
import { NftTransaction, render, type TableItem } from "../common/nft/tx.js";
import type { PeeringRec } from "../peering/schema.js";
import type { LinkInfo, NeighInfo, RouteInfo } from "./kernel.js";

/** What the planner needs of a peering record. */
export type PeeringLike = Pick<PeeringRec, "id" | "vpc1Id" | "vpc2Id" | "vpc1Cidr" | "vpc2Cidr" | "vpc1Allowed" | "vpc2Allowed">;

export const PEERING_PROTO = 77;
export const PEERING_NEXTHOP = "169.254.253.1";
export const UNREACHABLE_METRIC = 4000;
export const PEERING_TABLE = "microvpc_peering";
const LINK_RE = /^pc[0-9a-f]{12}$/;

export const peeringNames = {
  link: (peeringId: string) => `pc${peeringId.slice(-12)}`,
  // Not "mvpc:HOST:…": that prefix is the VPC planner's, which removes what it does not want.
  alias: (hostId: string, peeringId: string) => `mvpc-peering:${hostId}:${peeringId}`,
};

/** Fixed, locally administered MAC of one end (side 1 = in vpc1's namespace). */
export function linkMac(peeringId: string, side: 1 | 2): string {
  const h = createHash("sha256").update(`peering:${peeringId}:${side}`).digest();
  return ["02", ...[...h.subarray(0, 5)].map((b) => b.toString(16).padStart(2, "0"))].join(":");
}

/** A side's allowed CIDRs; empty means the whole VPC. */
export function allowedOf(p: PeeringLike, side: 1 | 2): string[] {
  const a = side === 1 ? p.vpc1Allowed : p.vpc2Allowed;
  return a.length ? [...a] : [side === 1 ? p.vpc1Cidr : p.vpc2Cidr];
}

/** VPCs whose namespace must exist here only because of a peering: vpc1 of every peering whose vpc2 is here. */
export function spanOf(real: Set<string>, peerings: PeeringLike[]): string[] {
  const out = new Set<string>();
  for (const p of peerings) if (real.has(p.vpc2Id) && !real.has(p.vpc1Id)) out.add(p.vpc1Id);
  return [...out].sort();
}

/** For the overlay: the peers whose NICs ride V's tunnel (V = vpc1), with the CIDRs allowed. */
export function routedPeers(vpcId: string, peerings: PeeringLike[]): { vpcId: string; cidrs: string[] }[] {
  return peerings.filter((p) => p.vpc1Id === vpcId).map((p) => ({ vpcId: p.vpc2Id, cidrs: allowedOf(p, 2) }));
}

export interface LinkWant {
  ifname: string;
  peeringId: string;
  side: 1 | 2;
  mac: string;
  peerMac: string;
  /** The other namespace (the link is created from side 1). */
  peerNs: string;
  /** Where the link's packets may come from (the peer's allowed CIDRs) and go to (ours). */
  src: string[];
  dst: string[];
}

export interface NsWant {
  ns: string;
  vpcId: string;
  links: LinkWant[];
  /** Peer VPC CIDRs. */
  unreachable: string[];
}

/** What every namespace of this host should have, for the VPCs present (held or spanned). */
export function desiredPeering(present: Set<string>, peerings: PeeringLike[], nsOf: (vpcId: string) => string): Map<string, NsWant> {
  const out = new Map<string, NsWant>();
  const get = (vpcId: string) => {
    const ns = nsOf(vpcId);
    let w = out.get(ns);
    if (!w) out.set(ns, (w = { ns, vpcId, links: [], unreachable: [] }));
    return w;
  };
  for (const p of [...peerings].sort((a, b) => a.id.localeCompare(b.id))) {
    const has1 = present.has(p.vpc1Id);
    const has2 = present.has(p.vpc2Id);
    if (has1) get(p.vpc1Id).unreachable.push(p.vpc2Cidr);
    if (has2) get(p.vpc2Id).unreachable.push(p.vpc1Cidr);
    if (!(has1 && has2)) continue;
    const ifname = peeringNames.link(p.id);
    const a1 = allowedOf(p, 1);
    const a2 = allowedOf(p, 2);
    get(p.vpc1Id).links.push({ ifname, peeringId: p.id, side: 1, mac: linkMac(p.id, 1), peerMac: linkMac(p.id, 2), peerNs: nsOf(p.vpc2Id), src: a2, dst: a1 });
    get(p.vpc2Id).links.push({ ifname, peeringId: p.id, side: 2, mac: linkMac(p.id, 2), peerMac: linkMac(p.id, 1), peerNs: nsOf(p.vpc1Id), src: a1, dst: a2 });
  }
  return out;
}

export type RouteObs = RouteInfo;
export type NeighObs = NeighInfo;

export interface NsObserved {
  exists: boolean;
  /** Links named like ours (pc + 12 hex). */
  links: LinkInfo[];
  /** Routes of protocol PEERING_PROTO. */
  routes: RouteObs[];
  /** Neighbour entries of PEERING_NEXTHOP. */
  neigh: NeighObs[];
}

export interface PeeringPlan {
  /** Per namespace, run first: removals (stale or broken links). */
  remove: Map<string, string[]>;
  /** Per namespace (side 1's), run second: link creation. */
  create: Map<string, string[]>;
  /** Per namespace, run last: link settings, neighbours, routes. */
  configure: Map<string, string[]>;
  /** Per namespace: the nft script making the table what it should be (nftTx's text). */
  nft: Map<string, string>;
  /** Per namespace: the transaction itself, for LinuxNft. */
  nftTx: Map<string, NftTransaction>;
  changes: string[];
}

const cidr32 = (d: string) => (d.includes("/") ? d : `${d}/32`);

function push(m: Map<string, string[]>, ns: string, ...lines: string[]): void {
  if (!lines.length) return;
  const l = m.get(ns) ?? [];
  l.push(...lines);
  m.set(ns, l);
}

/** The transaction making one namespace's peering filter what it should be (delete-and-recreate, atomically). */
export function peeringTx(w: NsWant | undefined): NftTransaction {
  const table = { kind: "table", family: "inet", name: PEERING_TABLE } as const;
  const tx = new NftTransaction().add(table).delete(table);
  if (!w || w.links.length === 0) return tx;
  const sets: TableItem[] = [];
  const rules: string[] = [];
  for (const l of w.links) {
    const h = l.ifname;
    sets.push({ kind: "set", name: `${h}_src`, type: "ipv4_addr", flags: ["interval"], elements: l.src, bareElements: true });
    sets.push({ kind: "set", name: `${h}_dst`, type: "ipv4_addr", flags: ["interval"], elements: l.dst, bareElements: true });
    rules.push(`iifname "${h}" meta nfproto != ipv4 counter drop`);
    rules.push(`iifname "${h}" ip saddr != @${h}_src counter drop comment "source not allowed by ${l.peeringId}"`);
    rules.push(`iifname "${h}" ip daddr != @${h}_dst counter drop comment "destination not allowed by ${l.peeringId}"`);
  }
  return tx.add({
    ...table,
    content: [
      ...sets,
      // Before the firewall's chain (priority filter): a packet the peering
      // does not allow never reaches the security groups.
      { kind: "chain", name: "forward", base: { type: "filter", hook: "forward", priority: "filter - 10", policy: "accept" }, rules },
    ],
  });
}

/** peeringTx as nft script text. */
export function peeringNft(w: NsWant | undefined): string {
  return render(peeringTx(w));
}

/**
 * Plans every namespace of the host. `observed` has an entry for every
 * namespace that exists; namespaces not in `want` lose everything of ours.
 */
export function planPeering(hostId: string, want: Map<string, NsWant>, observed: Map<string, NsObserved>): PeeringPlan {
  const plan: PeeringPlan = { remove: new Map(), create: new Map(), configure: new Map(), nft: new Map(), nftTx: new Map(), changes: [] };
  const aliasPrefix = peeringNames.alias(hostId, "pcx-");
  // 1. Links: each wanted one must exist at both ends; ours not wanted go.
  for (const [ns, obs] of observed) {
    const w = want.get(ns);
    const wanted = new Set((w?.links ?? []).map((l) => l.ifname));
    for (const l of obs.links) {
      if (!LINK_RE.test(l.ifname) || !(l.alias ?? "").startsWith(aliasPrefix)) continue;
      if (!wanted.has(l.ifname)) {
        push(plan.remove, ns, `link del dev ${l.ifname}`);
        plan.changes.push(`remove peering link ${l.ifname} from ${ns}`);
      }
    }
  }
  for (const [ns, w] of want) {
    const obs = observed.get(ns);
    if (!obs?.exists) continue;
    for (const l of w.links) {
      if (l.side !== 1) continue;
      const peerObs = observed.get(l.peerNs);
      if (!peerObs?.exists) continue;
      const here = obs.links.find((x) => x.ifname === l.ifname);
      const there = peerObs.links.find((x) => x.ifname === l.ifname);
      // A veth's ends vanish together; one end alone is a leftover (or not ours): rebuild.
      if (here && there && here.kind === "veth" && there.kind === "veth") continue;
      if (here) push(plan.remove, ns, `link del dev ${l.ifname}`);
      if (there) push(plan.remove, l.peerNs, `link del dev ${l.ifname}`);
      push(plan.create, ns, `link add ${l.ifname} type veth peer name ${l.ifname} netns ${l.peerNs}`);
      plan.changes.push(`create peering link ${l.ifname} between ${ns} and ${l.peerNs}`);
      // Fresh ends: settings below must not trust what was observed of the old ones.
      obs.links = obs.links.filter((x) => x.ifname !== l.ifname);
      peerObs.links = peerObs.links.filter((x) => x.ifname !== l.ifname);
      obs.routes = obs.routes.filter((r) => r.dev !== l.ifname);
      peerObs.routes = peerObs.routes.filter((r) => r.dev !== l.ifname);
      obs.neigh = obs.neigh.filter((n) => n.dev !== l.ifname);
      peerObs.neigh = peerObs.neigh.filter((n) => n.dev !== l.ifname);
    }
  }
  // 2. Per namespace: link settings, the pinned next hop, routes.
  for (const [ns, obs] of observed) {
    if (!obs.exists) continue;
    const w = want.get(ns);
    const lines: string[] = [];
    const wantRoutes = new Map<string, string>();
    for (const l of w?.links ?? []) {
      if (!observed.get(l.peerNs)?.exists) continue;
      const have = obs.links.find((x) => x.ifname === l.ifname);
      const alias = peeringNames.alias(hostId, l.peeringId);
      if (!have || have.mac !== l.mac || have.alias !== alias || !have.up) {
        lines.push(`link set dev ${l.ifname} address ${l.mac} alias ${alias} up`);
        if (have) plan.changes.push(`repair peering link ${l.ifname} in ${ns}`);
      }
      const n = obs.neigh.find((x) => x.dev === l.ifname);
      if (!n || n.lladdr !== l.peerMac || !(n.state ?? []).includes("PERMANENT")) {
        lines.push(`neigh replace ${PEERING_NEXTHOP} lladdr ${l.peerMac} dev ${l.ifname} nud permanent`);
      }
      for (const c of l.src) wantRoutes.set(`${c} via ${l.ifname}`, `route replace ${c} via ${PEERING_NEXTHOP} dev ${l.ifname} onlink proto ${PEERING_PROTO}`);
    }
    for (const c of w?.unreachable ?? []) {
      wantRoutes.set(`${c} unreachable`, `route replace unreachable ${c} metric ${UNREACHABLE_METRIC} proto ${PEERING_PROTO}`);
    }
    const haveRoutes = new Set<string>();
    for (const r of obs.routes) {
      const key = r.type === "unreachable" ? `${cidr32(r.dst)} unreachable` : `${cidr32(r.dst)} via ${r.dev}`;
      const ok = r.type === "unreachable" ? r.metric === UNREACHABLE_METRIC : r.gateway === PEERING_NEXTHOP;
      if (wantRoutes.has(key) && ok) {
        haveRoutes.add(key);
        continue;
      }
      // Routes through a link being removed go with it.
      if (r.dev && !(w?.links ?? []).some((l) => l.ifname === r.dev)) continue;
      lines.push(
        r.type === "unreachable"
          ? `route del unreachable ${cidr32(r.dst)}${r.metric ? ` metric ${r.metric}` : ""} proto ${PEERING_PROTO}`
          : `route del ${cidr32(r.dst)} dev ${r.dev} proto ${PEERING_PROTO}`,
      );
    }
    for (const [key, line] of wantRoutes) if (!haveRoutes.has(key)) lines.push(line);
    if (lines.length) {
      push(plan.configure, ns, ...lines);
      plan.changes.push(`${lines.length} peering change(s) in ${ns}`);
    }
    const tx = peeringTx(w);
    plan.nftTx.set(ns, tx);
    plan.nft.set(ns, render(tx));
  }
  return plan;
}
