// Address usage per subnet on /metrics, for "IPAM nearly full" alerts: read
// from Redis at scrape time (the subnet records and their used counters,
// each validated as the API reads them), reused for IPAM_USAGE_CACHE_MS.
// Every ipam replica serves the same values: aggregate with max by (subnet).
//
// Cardinality: at most --metrics-max-subnets subnets (in subnet-id order),
// three series each; microvpc_ipam_subnets counts them all.
import { Gauge } from "prom-client";
import { reportInvalid } from "../common/invalid-records.js";
import { metricsRegistry } from "../common/metrics.js";
import { K } from "./keys.js";
import { OWNER, subnetUsage, type IpamReader, type SubnetRec, type Usage } from "./schema.js";

/** How long one reading of every subnet's usage is reused. */
export const IPAM_USAGE_CACHE_MS = 5000;
/** Default of --metrics-max-subnets. */
export const DEFAULT_MAX_SUBNET_SERIES = 1000;

export interface SubnetUsage {
  vpc: string;
  subnet: string;
  cidr: string;
  used: number;
  free: number;
  reserved: number;
}

/** The usage of the first `max` subnets (by id) and how many subnets there are. */
export async function readUsage(reader: IpamReader, max: number): Promise<{ subnets: SubnetUsage[]; total: number }> {
  const redis = reader.redis;
  const total = await redis.zcard(K.allSubnets);
  const out: SubnetUsage[] = [];
  let after = "";
  while (out.length < max) {
    const ids = await redis.zrangebylex(K.allSubnets, after ? `(${after}` : "-", "+", "LIMIT", 0, Math.min(200, max - out.length));
    if (ids.length === 0) break;
    after = ids[ids.length - 1];
    // getSubnet validates each record (a bad one is reported and skipped).
    const page = (await Promise.all(ids.map((id) => reader.getSubnet(id)))).filter((s): s is SubnetRec => !!s);
    const used = await Promise.all(page.map((s) => redis.get(K.used(s.vpcId, s.id))));
    page.forEach((s, i) => {
      let u: Usage;
      try {
        // The allocator's counter, validated as the API reads it.
        u = subnetUsage(s, used[i]);
      } catch (err) {
        reportInvalid(OWNER, "subnet-used", K.used(s.vpcId, s.id), (err as Error).message, undefined, { vpcId: s.vpcId });
        return;
      }
      out.push({ vpc: s.vpcId, subnet: s.id, cidr: s.cidr, used: u.used, free: u.free, reserved: u.reserved });
    });
    if (ids.length < 200) break;
  }
  return { subnets: out, total };
}

/** Registers microvpc_ipam_subnet_addresses and microvpc_ipam_subnets. */
export function registerIpamMetrics(reader: IpamReader, max = DEFAULT_MAX_SUBNET_SERIES): void {
  let cached: { at: number; reading: Promise<{ subnets: SubnetUsage[]; total: number } | undefined> } | undefined;
  const reading = () => {
    if (!cached || Date.now() - cached.at >= IPAM_USAGE_CACHE_MS) {
      cached = { at: Date.now(), reading: readUsage(reader, max).catch(() => undefined) };
    }
    return cached.reading;
  };
  for (const n of ["microvpc_ipam_subnet_addresses", "microvpc_ipam_subnets"]) metricsRegistry.removeSingleMetric(n);
  new Gauge({
    name: "microvpc_ipam_subnet_addresses",
    help: `Addresses of a subnet by state: used (allocated), free (allocatable), reserved (network, gateway, broadcast, extra). Read from Redis at most every ${IPAM_USAGE_CACHE_MS / 1000} s; at most --metrics-max-subnets subnets (lowest ids).`,
    labelNames: ["vpc", "subnet", "cidr", "state"] as const,
    registers: [metricsRegistry],
    async collect() {
      const r = await reading();
      this.reset();
      for (const s of r?.subnets ?? []) {
        for (const state of ["used", "free", "reserved"] as const) this.set({ vpc: s.vpc, subnet: s.subnet, cidr: s.cidr, state }, s[state]);
      }
    },
  });
  new Gauge({
    name: "microvpc_ipam_subnets",
    help: "Subnets in IPAM (all of them, also those past --metrics-max-subnets); absent while Redis does not answer.",
    registers: [metricsRegistry],
    async collect() {
      const r = await reading();
      this.reset();
      if (r) this.set(r.total);
    },
  });
}
