// The overlay's pure part: from validated registry records and verified
// address claims to what a VPC's WireGuard interface should have — one peer
// per other live member host, allowed-ips = that host's NIC /32s in the VPC
// (and in peered VPCs riding this tunnel), keepalive 25 s — and the `wg set`
// arguments and /32 routes that get it there. Nothing here reads Redis or
// runs a command.
//
// MTU: overlay MTU = underlay MTU − 60 over IPv4 (outer IPv4 20 + UDP 8 +
// WireGuard 32: type/receiver/counter 16 + Poly1305 tag 16), − 80 over IPv6
// (outer header 40). The WireGuard interface, the bridges and the NICs all
// get it, so a VM never sends a packet the tunnel would have to fragment: a
// too-big packet with DF set is refused at the VM's own NIC (EMSGSIZE / ICMP
// frag-needed), never dropped silently.
import * as V from "../../common/validate.js";
import { claimShapeProblem, type RejectedClaim } from "./claims.js";
import type { PeerHost } from "./registry.js";
import type { Dump } from "./wg.js";

export const WG_OVERHEAD_V4 = 60;
export const WG_OVERHEAD_V6 = 80;
const KEEPALIVE = 25;

export interface PeerWant {
  hostId: string;
  publicKey: string;
  endpoint: string;
  allowedIps: string[];
}

export function overlayMtu(underlayMtu: number, address: string): number {
  return underlayMtu - (address.includes(":") ? WG_OVERHEAD_V6 : WG_OVERHEAD_V4);
}

/**
 * A peering's allowed CIDRs (validated by peering/schema.ts) that also lie
 * in the peer VPC: only those of its NICs ride this VPC's tunnel.
 */
export function allowedWithin(peer: V.Cidr | null, cidrs: string[]): V.Cidr[] {
  if (!peer) return [];
  return cidrs.flatMap((c) => {
    try {
      const x = V.cidr("allowed", c, { min: 8, max: 32 });
      return V.contains(peer, x) ? [x] : [];
    } catch {
      return [];
    }
  });
}

/**
 * The addrs hash of one VPC split into well-formed claims of other hosts
 * (address → host) and rejected entries. `allowed` (a peered VPC's NICs):
 * only addresses inside these are this tunnel's (`wanted`); others are
 * silently not wanted here. Our own claims are never installed here.
 */
export function nominate(
  hostId: string,
  raw: Record<string, string>,
  within: V.Cidr[],
  allowed: V.Cidr[] | null,
): { claims: Map<string, string>; rejected: RejectedClaim[]; wanted: (a: string) => boolean } {
  const wanted = (a: string) =>
    !allowed ||
    allowed.some((c) => {
      const n = V.ipToInt(a);
      return n >= c.base && n < c.base + c.size;
    });
  const rejected: RejectedClaim[] = [];
  const claims = new Map<string, string>();
  for (const [a, h] of Object.entries(raw)) {
    const bad = claimShapeProblem(a, h, within);
    if (bad) {
      // Shown as found when printable, else quoted with escapes.
      const shown = (v: string) => (/^[\x21-\x7e]{1,64}$/.test(v) ? v : V.show(v));
      rejected.push({ address: shown(a), hostId: shown(h), reason: bad });
      continue;
    }
    if (h === hostId || !wanted(a)) continue;
    claims.set(a, h);
  }
  return { claims, rejected, wanted };
}

/** The hosts whose NIC indexes are evidence: every member host and every claiming host, well-formed and not this one. */
export function evidenceHosts(hostId: string, memberHosts: string[], claims: Map<string, string>): string[] {
  return [...new Set([...memberHosts, ...claims.values()])].filter((h) => /^[a-z0-9-]{1,63}$/.test(h) && h !== hostId).sort();
}

/** One peer per other host (not one holding our own key), with the addresses claims.ts gave it (address → host). */
export function peersOf(hosts: PeerHost[], ownKey: string, addrs: Record<string, string>): PeerWant[] {
  return hosts
    .filter((h) => h.record.publicKey !== ownKey)
    .map(({ hostId, record, port }) => ({
      hostId,
      publicKey: record.publicKey,
      endpoint: record.address.includes(":") ? `[${record.address}]:${port}` : `${record.address}:${port}`,
      allowedIps: Object.entries(addrs)
        .filter(([, host]) => host === hostId)
        .map(([a]) => `${a}/32`)
        .sort(),
    }));
}

/** What a NAT gateway's holder gets beside its NICs (gateway/plan.ts natSteerLines sends the egress there). */
export const NAT_ALLOWED = "0.0.0.0/0";

/**
 * The peer of the host holding the VPC's NAT gateway address also gets
 * 0.0.0.0/0: WireGuard sends it what the VPC namespace steers to the
 * interface for the outside, and takes the answers (any source) from it. The
 * other peers keep their /32s, which win by longest prefix. A holder that is
 * no peer (not a registered member host) gets nothing.
 */
export function withNatHolder(peers: PeerWant[], holder: string | undefined): PeerWant[] {
  if (!holder) return peers;
  return peers.map((p) => (p.hostId === holder ? { ...p, allowedIps: [...p.allowedIps, NAT_ALLOWED].sort() } : p));
}

/**
 * The peer of the host running the VPC's VPN endpoint (vpn/sync.ts) also
 * gets the client range: answers to VPN clients go there through the
 * tunnel, and the clients' packets (their sources) are taken from it. Like
 * the NAT holder, a host that is no peer gets nothing.
 */
export function withVpnRange(peers: PeerWant[], vpn: { hostId: string; cidr: string } | null): PeerWant[] {
  if (!vpn) return peers;
  return peers.map((p) => (p.hostId === vpn.hostId ? { ...p, allowedIps: [...new Set([...p.allowedIps, vpn.cidr])].sort() } : p));
}

/**
 * Just after a Redis outage every lease may have run out while nobody could
 * renew it: the hosts applied before stay until they had time to register
 * again. Only those still members of the VPC (`members`, read with `fresh`):
 * a host whose member entry is gone left the VPC (DeleteVpc on it), and is
 * dropped at once, outage or not.
 */
export function keepDuringOutage(fresh: PeerWant[], applied: PeerWant[], members: Iterable<string>): PeerWant[] {
  const ids = new Set(fresh.map((p) => p.hostId));
  const still = new Set(members);
  return [...fresh, ...applied.filter((p) => !ids.has(p.hostId) && still.has(p.hostId))];
}

/** `wg set` arguments that turn the dump into the wanted peers; [] when nothing differs. */
export function peerArgs(dump: Dump, want: PeerWant[]): string[] {
  const args: string[] = [];
  const wanted = new Map(want.map((p) => [p.publicKey, p]));
  for (const p of dump.peers) if (!wanted.has(p.publicKey)) args.push("peer", p.publicKey, "remove");
  const have = new Map(dump.peers.map((p) => [p.publicKey, p]));
  for (const w of want) {
    const h = have.get(w.publicKey);
    const allowed = [...w.allowedIps].sort();
    if (h && h.endpoint === w.endpoint && h.keepalive === KEEPALIVE && h.allowedIps.join(",") === allowed.join(",")) continue;
    args.push("peer", w.publicKey, "endpoint", w.endpoint, "persistent-keepalive", String(KEEPALIVE), "allowed-ips", allowed.join(","));
  }
  return args;
}

/** `ip -batch` lines that leave one /32 route through the interface per remote NIC (`have`: the routes' dst as listed). */
export function routeLines(ifname: string, have: string[], want: PeerWant[]): string[] {
  const cur = new Set(have.map((dst) => (dst.includes("/") ? dst : `${dst}/32`)));
  // The NAT holder's 0.0.0.0/0 is no route of the main table: the default
  // stays the transit link, and only the NAT's sources are steered (policy
  // routing, gateway/plan.ts natSteerLines).
  const wantR = new Set(want.flatMap((p) => p.allowedIps).filter((a) => a !== NAT_ALLOWED));
  const lines: string[] = [];
  for (const r of cur) if (!wantR.has(r) && r !== "default" && r !== NAT_ALLOWED) lines.push(`route del ${r} dev ${ifname}`);
  for (const r of wantR) if (!cur.has(r)) lines.push(`route replace ${r} dev ${ifname}`);
  return lines;
}
