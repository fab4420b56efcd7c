// Runs the resolver on one hypervisor: keeps a socket pair bound on every
// transit host address of this host (a VPC's transit link appears when the
// gateway creates it; binding is retried every second until it exists) and
// each VPC's zone in memory, reloaded on dns.* / vpc.* events and every
// reloadMs as a safety net.
import type { Redis } from "ioredis";
import { followScoped } from "../common/events.js";
import { managementHolding } from "../common/management.js";
import type { ServerLogger } from "../common/net.js";
import { transitAddrs } from "../common/names.js";
import { GatewayReader } from "../gateway/schema.js";
import { IpamReader } from "../ipam/schema.js";
import { naKeys } from "../netagent/schema.js";
import { Resolver, type ResolverOptions } from "./resolver.js";
import { DnsStore } from "./store.js";
import type { Zone } from "./zone.js";

/**
 * A VPC's zone. A VPC's own forwarders inside the management CIDRs are left
 * out (the ipam daemon may not know this host's list, or the config predates
 * it): `refused` gets each one. Inherited defaults are the operator's choice.
 */
export async function loadZone(
  ipam: IpamReader,
  dns: DnsStore,
  vpcId: string,
  management: readonly string[] = [],
  refused: (forwarder: string, cidr: string) => void = () => {},
): Promise<Zone | undefined> {
  const vpc = await ipam.getVpc(vpcId);
  if (!vpc) return undefined;
  const [eff, recs] = await Promise.all([dns.effective(vpcId, vpc.base), dns.allRecords(vpcId)]);
  const forwarders = eff.inherited
    ? eff.forwarders
    : eff.forwarders.filter((f) => {
        const cidr = managementHolding(management, f.replace(/:[0-9]+$/, ""));
        if (cidr) refused(f, cidr);
        return !cidr;
      });
  return {
    vpcId,
    domain: `${vpc.name}.internal`,
    records: new Map(recs.map((r) => [r.name, { address: r.address, ttl: r.ttl }])),
    forwarders,
  };
}

export async function runResolver(
  redis: Redis,
  hostId: string,
  port: number,
  logger: ServerLogger,
  o: Partial<ResolverOptions> & { reloadMs?: number; management?: () => Promise<string[]> } = {},
): Promise<{ resolver: Resolver; close: () => Promise<void> }> {
  const gw = new GatewayReader(redis, logger);
  const ipam = new IpamReader(redis);
  const dns = new DnsStore(redis, logger);
  /** transit host address → zone */
  let zones = new Map<string, Zone>();
  const resolver = new Resolver({ ...o, port, logger, zoneOf: (local) => zones.get(local) });
  let stopped = false;
  let loading: Promise<void> | null = null;
  let again = false;
  let transitSig = "";
  /** VPC forwarders refused as management: logged once each. */
  const warned = new Set<string>();
  const reload = async (): Promise<void> => {
    if (loading) {
      again = true;
      return loading;
    }
    loading = (async () => {
      do {
        again = false;
        try {
          const transit = await gw.transitMap(hostId);
          transitSig = JSON.stringify([...transit].sort());
          const management = (await o.management?.()) ?? [];
          const next = new Map<string, Zone>();
          for (const [vpcId, k] of transit) {
            const z = await loadZone(ipam, dns, vpcId, management, (forwarder, cidr) => {
              const key = `${vpcId} ${forwarder}`;
              if (warned.has(key)) return;
              warned.add(key);
              logger.warn({ vpc: vpcId, forwarder, managementCidr: cidr }, "dns: not forwarding to a VPC forwarder inside the management network");
            });
            if (z) next.set(transitAddrs(k).host, z);
          }
          zones = next;
        } catch (err) {
          logger.warn({ err: (err as Error).message }, "dns: cannot reload zones; keeping the last ones");
        }
      } while (again && !stopped);
      loading = null;
    })();
    return loading;
  };
  const rebind = async () => {
    for (const addr of zones.keys()) {
      if (resolver.bound().includes(addr)) continue;
      // EADDRNOTAVAIL until the gateway has created the transit link: retried.
      await resolver.bind(addr).catch((err) => logger.debug({ err: (err as Error).message, addr }, "dns: cannot bind yet"));
    }
    for (const addr of resolver.bound()) if (!zones.has(addr)) resolver.unbind(addr);
  };
  await reload();
  await rebind();
  // A VPC new on this host gets its transit index from the gateway without
  // an event of ours: the transit map is polled (one HGETALL a second).
  const poll = async () => {
    try {
      const sig = JSON.stringify([...(await gw.transitMap(hostId))].sort());
      if (sig !== transitSig) await reload();
    } catch {
      // Redis away: keep serving what is known
    }
    await rebind();
  };
  const bindTimer = setInterval(() => void poll(), 1000);
  bindTimer.unref();
  const reloadTimer = setInterval(() => void reload().then(rebind), o.reloadMs ?? 10_000);
  reloadTimer.unref();
  // The streams of the VPCs held here, and the fleet's (the default DNS configuration): common/events.ts.
  void followScoped(
    redis,
    // Each batch reloads the zones: a VM start's record and its neighbours' come in one (a name answers at most 50 ms later).
    { host: hostId, vpcs: (r) => r.hkeys(naKeys(r).vpcs(hostId)), registry: true, settleMs: 50 },
    /^(dns\.|vpc\.|subnet\.)/,
    () => void reload().then(rebind),
    () => stopped,
  );
  logger.info({ port }, "VPC resolver running");
  return {
    resolver,
    close: async () => {
      stopped = true;
      clearInterval(bindTimer);
      clearInterval(reloadTimer);
      await resolver.close();
    },
  };
}
