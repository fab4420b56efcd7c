// The firewall's drop counters on /metrics. They already exist in nft: every
// NIC's chains count into its address's element counters in the sets
// cnt_in_drop and cnt_out_drop of each VPC namespace's `inet microvpc`
// table, and anti-spoofing into the named counter "spoofed" of its
// `bridge microvpc` table. They are read at scrape time (LinuxNft.counters:
// two `nft -j list` per VPC namespace), at most once per
// NFT_COUNTERS_CACHE_MS however often Prometheus (or several) scrapes.
//
// Cardinality: the VPC series are one per local VPC namespace; the NIC
// series are capped at --metrics-max-nic-series (sorted by NIC id, the first
// ones kept). Drops of the NICs past the cap still count in their VPC's
// series, and microvpc_firewall_nic_series_omitted says how many were left
// out. Counters restart at 0 when a table is replaced whole (start, drift):
// Prometheus's rate() treats that as a counter reset.
import { Counter, Gauge } from "prom-client";
import { metricsRegistry } from "../common/metrics.js";
import type { Counter as NftCounter, NftRunner } from "../common/nft/linux.js";
import { nicCounter } from "./compile.js";
import type { VpcFirewallState } from "./model.js";

/** How long one reading of the kernel's counters is reused. */
export const NFT_COUNTERS_CACHE_MS = 5000;
/** Default of --metrics-max-nic-series. */
export const DEFAULT_MAX_NIC_SERIES = 500;

interface Reading {
  nics: { vpc: string; nic: string; direction: "ingress" | "egress"; packets: number }[];
  vpcs: { vpc: string; reason: "policy" | "spoofed"; packets: number }[];
  omitted: number;
}

export interface DropSource {
  /** What was last applied per VPC namespace (FirewallSync.applied). */
  readonly applied: ReadonlyMap<string, { state: Pick<VpcFirewallState, "vpcId" | "nics"> }>;
}

/** The counters of every applied namespace, as series: NICs capped at maxNicSeries. */
export async function readDrops(source: DropSource, nft: Pick<NftRunner, "counters">, maxNicSeries: number): Promise<Reading> {
  const out: Reading = { nics: [], vpcs: [], omitted: 0 };
  const all: Reading["nics"] = [];
  for (const [ns, applied] of [...source.applied].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) {
    let counters: Map<string, NftCounter>;
    try {
      counters = await nft.counters(ns);
    } catch {
      continue;
    }
    const vpc = applied.state.vpcId;
    const get = (name: string) => Number(counters.get(name)?.packets ?? 0n);
    let policy = 0;
    for (const n of applied.state.nics) {
      for (const [direction, name] of [
        ["ingress", nicCounter("cnt_in_drop", n.address)],
        ["egress", nicCounter("cnt_out_drop", n.address)],
      ] as const) {
        const packets = get(name);
        policy += packets;
        all.push({ vpc, nic: n.nicId, direction, packets });
      }
    }
    out.vpcs.push({ vpc, reason: "policy", packets: policy }, { vpc, reason: "spoofed", packets: get("spoofed") });
  }
  all.sort((a, b) => (a.nic < b.nic ? -1 : a.nic > b.nic ? 1 : 0));
  const kept = new Set<string>();
  for (const s of all) {
    if (!kept.has(s.nic) && kept.size >= maxNicSeries) continue;
    kept.add(s.nic);
    out.nics.push(s);
  }
  out.omitted = new Set(all.map((s) => s.nic)).size - kept.size;
  return out;
}

/** Registers the drop series, read from `source` through `nft` at scrape time. */
export function registerDropMetrics(source: DropSource, nft: Pick<NftRunner, "counters">, maxNicSeries = DEFAULT_MAX_NIC_SERIES): void {
  let cached: { at: number; reading: Promise<Reading> } | undefined;
  const reading = (): Promise<Reading> => {
    if (!cached || Date.now() - cached.at >= NFT_COUNTERS_CACHE_MS) {
      cached = { at: Date.now(), reading: readDrops(source, nft, maxNicSeries).catch(() => ({ nics: [], vpcs: [], omitted: 0 })) };
    }
    return cached.reading;
  };
  for (const name of ["microvpc_firewall_nic_dropped_packets_total", "microvpc_firewall_vpc_dropped_packets_total", "microvpc_firewall_nic_series_omitted"]) {
    metricsRegistry.removeSingleMetric(name);
  }
  new Counter({
    name: "microvpc_firewall_nic_dropped_packets_total",
    help: `Packets the security groups dropped, per NIC and direction (the element counters of the NIC's address in the nft sets cnt_in_drop/cnt_out_drop, read at most every ${NFT_COUNTERS_CACHE_MS / 1000} s; at most --metrics-max-nic-series NICs, the lowest NIC ids; reset when the VPC's table is replaced whole).`,
    labelNames: ["vpc", "nic", "direction"] as const,
    registers: [metricsRegistry],
    async collect() {
      const r = await reading();
      this.reset();
      for (const s of r.nics) this.inc({ vpc: s.vpc, nic: s.nic, direction: s.direction }, s.packets);
    },
  });
  new Counter({
    name: "microvpc_firewall_vpc_dropped_packets_total",
    help: "Packets dropped in a VPC namespace of this host, by reason: policy (every NIC's security-group drops, capped NICs included) or spoofed (anti-spoofing).",
    labelNames: ["vpc", "reason"] as const,
    registers: [metricsRegistry],
    async collect() {
      const r = await reading();
      this.reset();
      for (const s of r.vpcs) this.inc({ vpc: s.vpc, reason: s.reason }, s.packets);
    },
  });
  new Gauge({
    name: "microvpc_firewall_nic_series_omitted",
    help: "NICs of this host whose drop series were left out of microvpc_firewall_nic_dropped_packets_total by --metrics-max-nic-series (their drops still count per VPC).",
    registers: [metricsRegistry],
    async collect() {
      this.set((await reading()).omitted);
    },
  });
}
