import { Option } from "commander";
import type { ServiceDefinition } from "../common/daemon.js";
import { MANAGEMENT_AUTO, parseManagementCidrs } from "../common/management.js";
import { DnsApi } from "../dns/service.js";
import { Peerings } from "../peering/service.js";
import { PeeringStore } from "../peering/store.js";
import { DEFAULT_MAX_SUBNET_SERIES, registerIpamMetrics } from "./metrics.js";
import { ipamRoutes } from "./routes.js";
import { Ipam } from "./service.js";
import { IpamStore } from "./store.js";

/** How often a daemon looks for deleted VPCs' change streams without an expiry. */
const ORPHAN_SWEEP_MS = 3600_000;

export const ipamDefinition: ServiceDefinition = {
  name: "ipam",
  summary: "VPCs, subnets and address allocation (stateless; run N replicas over one Redis)",
  defaultPort: 7401,
  options: [
    new Option(
      "--management-cidrs <list>",
      "the hypervisors' management network (IPv4 CIDRs/addresses, e.g. 10.20.0.0/16): UpdateDnsConfig refuses VPC forwarders inside it; empty: none (the gateways still refuse to use them)",
    )
      .env("MICROVPC_MANAGEMENT_CIDRS")
      .default(""),
    new Option("--metrics-max-subnets <n>", "most subnets with address-usage series on /metrics (the lowest subnet ids)")
      .env("MICROVPC_METRICS_MAX_SUBNETS")
      .default(String(DEFAULT_MAX_SUBNET_SERIES)),
  ],
  async build({ flags, logger, redis }) {
    const mgmt = parseManagementCidrs("--management-cidrs", String(flags.managementCidrs ?? ""));
    // "auto" is the gateway's view of its own host; the ipam daemon runs anywhere.
    if (mgmt === MANAGEMENT_AUTO) throw new Error('--management-cidrs "auto" is for the gateway; give the ipam daemon the CIDRs (e.g. 10.20.0.0/16)');
    const store = new IpamStore(redis);
    // Before serving: subnets an earlier release kept under "mvpc:sn:<id>:…" move under their VPC's hash tag, once
    // (docs/redis-schema.md "Redis Cluster"; a subnet a replica of that release makes later moves on first use).
    const moved = await store.migrateAll();
    if (moved > 0) logger.info({ subnets: moved }, "moved subnets' allocation state under their VPC's hash tag");
    const ipam = new Ipam(store);
    if (!/^[0-9]{1,6}$/.test(String(flags.metricsMaxSubnets)))
      throw new Error(`--metrics-max-subnets ${JSON.stringify(flags.metricsMaxSubnets)}: use 0–999999`);
    registerIpamMetrics(store, Number(flags.metricsMaxSubnets));
    // Deleted VPCs' change streams left without an expiry get one (IpamStore.expireOrphanStreams): hourly,
    // from a random point of the first hour, so that replicas and restarts spread out.
    const sweep = () =>
      store.expireOrphanStreams().then(
        (r) => (r.expired > 0 ? logger.info(r, "gave deleted VPCs' change streams their expiry") : undefined),
        (err: Error) => logger.warn({ err: err.message }, "sweep of deleted VPCs' change streams failed; the next runs in an hour"),
      );
    let every: NodeJS.Timeout | undefined;
    const first = setTimeout(() => {
      void sweep();
      every = setInterval(() => void sweep(), ORPHAN_SWEEP_MS).unref();
    }, Math.random() * ORPHAN_SWEEP_MS).unref();
    return {
      services: ipamRoutes(ipam, new Peerings(ipam, new PeeringStore(redis)), new DnsApi(store, mgmt)),
      close: async () => {
        clearTimeout(first);
        clearInterval(every);
      },
    };
  },
};
