// Runs the resolver on one hypervisor: keeps a socket pair bound on every
// transit host address of this host (a VPC's transit link appears when the
// gateway creates it; binding is retried every second until it exists) and
// each VPC's zone in memory. A `dns.record` event that names its records
// (dns/scripts.ts) patches those names in the zone: one HMGET, so a VM's
// record costs the same in a VPC of ten names as in one of ten thousand,
// on every host that serves the VPC. Anything else (a config, VPC or subnet
// change, a feed resync, an event without names) reloads the zones whole, as
// does a timer every reloadMs, the safety net.
import type { Redis } from "ioredis";
import { Counter } from "prom-client";
import { followScoped, type EventFields } from "../common/events.js";
import { managementHolding } from "../common/management.js";
import { metricsRegistry } from "../common/metrics.js";
import type { ServerLogger } from "../common/net.js";
import { transitAddrs } from "../common/names.js";
import * as V from "../common/validate.js";
import { GatewayReader } from "../gateway/schema.js";
import { IpamReader } from "../ipam/schema.js";
import { naKeys } from "../netagent/schema.js";
import { Resolver, type ResolverOptions } from "./resolver.js";
import { label } from "./schema.js";
import { EVENT_NAMES_MAX } from "./scripts.js";
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

const zoneLoads = new Counter({
  name: "microvpc_dns_zone_loads_total",
  help: 'The resolver\'s zone updates: kind="full" every zone of the host read again (start, a config, VPC or subnet change, a feed resync, the timer), kind="names" only the records a dns.record event named. A steady climb of "full" with VM churn means events without names (an earlier release writing).',
  labelNames: ["kind"] as const,
  registers: [metricsRegistry],
});

/** What a batch of events asks of the zones: a whole reload, or the named records of some VPCs read again. */
export type ZoneWork = { full: true } | { full: false; names: Map<string, Set<string>> };

/**
 * The work a batch of events makes (pure). Only `dns.record` events that
 * carry a VPC id and names patch; each name must be a DNS label and the VPC
 * an id (an event is input like any record: a malformed one reloads whole,
 * it never names a key).
 */
export function zoneWork(events: EventFields[]): ZoneWork {
  const names = new Map<string, Set<string>>();
  for (const e of events) {
    if (e.kind !== "dns.record" || e.names === undefined || e.vpc === undefined) return { full: true };
    const vpc = e.vpc;
    const list = e.names.split(",");
    if (list.length > EVENT_NAMES_MAX) return { full: true };
    if (!V.attempt(() => V.id("vpc", vpc, "vpc")).ok || !list.every((n) => V.attempt(() => label("name", n)).ok)) return { full: true };
    addNames(names, vpc, list);
  }
  return { full: false, names };
}

/** Adds a VPC's names to a by-VPC map of names. */
function addNames(into: Map<string, Set<string>>, vpc: string, names: Iterable<string>): void {
  const set = into.get(vpc) ?? new Set<string>();
  for (const n of names) set.add(n);
  into.set(vpc, set);
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
  /** What is owed to the zones: a whole reload, and/or names to read again (by VPC); one worker does it in order. */
  let full = false;
  const owed = new Map<string, Set<string>>();
  let working: Promise<void> | null = null;
  let transitSig = "";
  /** VPC forwarders refused as management: logged once each. */
  const warned = new Set<string>();
  const loadAll = async (): Promise<void> => {
    zoneLoads.inc({ kind: "full" });
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
  };
  /** The named records read again into the zones serving their VPC; a failed read reloads whole. */
  const patch = async (byVpc: Map<string, Set<string>>): Promise<void> => {
    zoneLoads.inc({ kind: "names" });
    for (const [vpcId, names] of byVpc) {
      const served = [...zones.values()].filter((z) => z.vpcId === vpcId);
      if (served.length === 0) continue;
      try {
        const recs = await dns.records(vpcId, [...names]);
        for (const z of served) {
          for (const [name, r] of recs) {
            if (r) z.records.set(name, { address: r.address, ttl: r.ttl });
            else z.records.delete(name);
          }
        }
      } catch (err) {
        logger.warn({ err: (err as Error).message, vpc: vpcId }, "dns: cannot read changed records; reloading the zones");
        full = true;
      }
    }
  };
  const work = (w: ZoneWork): Promise<void> => {
    if (w.full) full = true;
    else for (const [vpc, names] of w.names) addNames(owed, vpc, names);
    working ??= (async () => {
      // Never done before `working` holds it: its end (below) must clear what was assigned.
      await Promise.resolve();
      while (!stopped && (full || owed.size)) {
        if (full) {
          // A whole reload reads every name: what was owed is in it.
          full = false;
          owed.clear();
          await loadAll();
        } else {
          const batch = new Map(owed);
          owed.clear();
          await patch(batch);
        }
      }
      working = null;
    })();
    return working;
  };
  const reload = (): Promise<void> => work({ full: true });
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
    // Each batch patches or reloads the zones: a VM start's record and its neighbours' come in one (a name answers at most 50 ms later).
    { host: hostId, vpcs: (r) => r.hkeys(naKeys(r).vpcs(hostId)), registry: true, settleMs: 50 },
    /^(dns\.|vpc\.|subnet\.)/,
    (events) => {
      const w = zoneWork(events);
      void work(w).then(() => (w.full ? rebind() : undefined));
    },
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
