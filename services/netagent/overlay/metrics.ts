// The overlay's WireGuard state on /metrics: peers per VPC interface and
// the seconds since each peer's latest handshake, from `wg show NAME dump`
// (one per local VPC interface) at scrape time, reused for
// WG_DUMP_CACHE_MS. A peer is named by its host id (what the overlay
// applied for that public key), never by its key.
//
// Cardinality: one peers series per local VPC; handshake series capped at
// --metrics-max-peer-series (VPC, then host id order).
import { Gauge } from "prom-client";
import { metricsRegistry } from "../../common/metrics.js";
import type { PeerWant } from "./plan.js";
import { wgName, type Dump } from "./wg.js";

/** How long one reading of the interfaces is reused. */
export const WG_DUMP_CACHE_MS = 5000;
export const DEFAULT_MAX_PEER_SERIES = 1000;

export interface WgSource {
  readonly hostId: string;
  readonly applied: ReadonlyMap<string, PeerWant[]>;
  dump(ifname: string): Promise<Dump | null>;
}

export interface WgReading {
  peers: { vpc: string; n: number }[];
  /** Seconds since the latest handshake; Infinity: none yet. */
  handshakes: { vpc: string; peer: string; ageSeconds: number }[];
}

/** Reads every local VPC interface: its peers, and each known peer's handshake age at `nowS`. */
export async function readWireguard(src: WgSource, max: number, nowS = Date.now() / 1000): Promise<WgReading> {
  const out: WgReading = { peers: [], handshakes: [] };
  for (const vpc of [...src.applied.keys()].sort()) {
    const d = await src.dump(wgName(src.hostId, vpc)).catch(() => null);
    if (!d) continue;
    out.peers.push({ vpc, n: d.peers.length });
    const hostOf = new Map((src.applied.get(vpc) ?? []).map((p) => [p.publicKey, p.hostId]));
    const rows = d.peers
      .map((p) => ({ peer: hostOf.get(p.publicKey), s: p.latestHandshakeS }))
      .filter((r): r is { peer: string; s: number } => r.peer !== undefined)
      .sort((a, b) => (a.peer < b.peer ? -1 : a.peer > b.peer ? 1 : 0));
    for (const r of rows) {
      if (out.handshakes.length >= max) break;
      const valid = Number.isFinite(r.s) && r.s > 0;
      out.handshakes.push({ vpc, peer: r.peer, ageSeconds: valid ? Math.max(0, nowS - r.s) : Infinity });
    }
  }
  return out;
}

export function registerWireguardMetrics(src: WgSource, max = DEFAULT_MAX_PEER_SERIES): void {
  let cached: { at: number; reading: Promise<WgReading> } | undefined;
  const reading = () => {
    if (!cached || Date.now() - cached.at >= WG_DUMP_CACHE_MS) {
      cached = { at: Date.now(), reading: readWireguard(src, max).catch(() => ({ peers: [], handshakes: [] })) };
    }
    return cached.reading;
  };
  for (const n of ["microvpc_wireguard_peers", "microvpc_wireguard_peer_last_handshake_age_seconds"]) metricsRegistry.removeSingleMetric(n);
  new Gauge({
    name: "microvpc_wireguard_peers",
    help: "Peers configured on this host's WireGuard interface of a VPC (wg show dump).",
    labelNames: ["vpc"] as const,
    registers: [metricsRegistry],
    async collect() {
      const r = await reading();
      this.reset();
      for (const p of r.peers) this.set({ vpc: p.vpc }, p.n);
    },
  });
  new Gauge({
    name: "microvpc_wireguard_peer_last_handshake_age_seconds",
    help: `Seconds since the latest handshake with a peer host on a VPC's WireGuard interface (+Inf: none yet); read at most every ${WG_DUMP_CACHE_MS / 1000} s. A live peer handshakes every 2 minutes while traffic or keepalives flow.`,
    labelNames: ["vpc", "peer"] as const,
    registers: [metricsRegistry],
    async collect() {
      const r = await reading();
      this.reset();
      for (const h of r.handshakes) this.set({ vpc: h.vpc, peer: h.peer }, h.ageSeconds);
    },
  });
}
