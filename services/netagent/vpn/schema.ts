// VPN records in Redis: the contract between the VpnService (any netagent),
// the endpoint host's sync (vpn/sync.ts) and the overlay of the other hosts
// (which routes the client range to the endpoint host). Every record read
// back is parsed with the validators the API uses (plan.ts).
//
// Key layout (all under "mvpc:vpn:"):
//   gen                     counter raised by every VPN change
//   eps                     set of VPC ids with an endpoint (a listed VPC without an ep is skipped)
//   ep:<vpc>                hash: vpc host addr port cidr updated (written by the API, with
//                           IPAM's reservation of the range, mvpc:vpc:<vpc>:reserved "vpn";
//                           DeleteVpnEndpoint deletes both in one script, refused while the VPC
//                           has clients, then takes the VPC out of eps; DeleteVpc is refused
//                           while it exists)
//   host:<host>:keys        hash vpc → the public key of that host's endpoint interface of the VPC
//   host:<host>:applied     hash vpc → the gen that host last applied for the VPC
//                           (host-scoped: only <host>'s Redis user writes them, and a reader
//                           takes them only from the host the endpoint names)
//   vpc:<vpc>:clients       hash name → JSON VpnClientRec
//   vpc:<vpc>:keys          hash public key → name
//   vpc:<vpc>:addrs         hash address → name
//   client:<id>             "<vpc>/<name>": the id index
// On a Redis Cluster: VpnKeys below.
import type { Redis } from "ioredis";
import { isCluster } from "../../common/redis.js";
import * as V from "../../common/validate.js";
import { checkEndpoint, checkClient, type VpnClientRec, type VpnEndpointRec } from "./plan.js";

export const P = "mvpc:vpn:";
export const VK = {
  gen: `${P}gen`,
  eps: `${P}eps`,
  ep: (vpc: string) => `${P}ep:${vpc}`,
  hostKeys: (host: string) => `${P}host:${host}:keys`,
  hostApplied: (host: string) => `${P}host:${host}:applied`,
  clients: (vpc: string) => `${P}vpc:${vpc}:clients`,
  keys: (vpc: string) => `${P}vpc:${vpc}:keys`,
  addrs: (vpc: string) => `${P}vpc:${vpc}:addrs`,
  client: (id: string) => `${P}client:${id}`,
};

/**
 * Where the VPN's records live: VPN_KEYS.single (VK's names) or
 * VPN_KEYS.cluster, by the client (vpnKeysOf). On a Redis Cluster a VPC's
 * endpoint, clients, their indexes and its change counter are under the
 * VPC's tag, beside IPAM's record of the VPC and its reserved ranges (the
 * endpoint's scripts check, write and delete them); a host's keys and applied
 * counters under the host's; the listing of endpoints and the id → VPC
 * catalog under "{vpn}", written beside the VPC's step.
 */
export interface VpnKeys {
  /** The counter every change of the VPC's VPN raises: one for every VPC on a single Redis, the VPC's on a cluster. */
  gen(vpc: string): string;
  eps: string;
  ep(vpc: string): string;
  hostKeys(host: string): string;
  hostApplied(host: string): string;
  clients(vpc: string): string;
  keys(vpc: string): string;
  addrs(vpc: string): string;
  /** "<vpc>/<name>" of a client: in the VPC's slot (the scripts' copy) … */
  client(vpc: string, id: string): string;
  /** … and, on a cluster, in the catalog, which a call that gives only the id reads (null on a single Redis: client() is the catalog). */
  clientCatalog(id: string): string | null;
  cluster: boolean;
}

export const VPN_KEYS: { single: VpnKeys; cluster: VpnKeys } = {
  single: {
    gen: () => VK.gen,
    eps: VK.eps,
    ep: VK.ep,
    hostKeys: VK.hostKeys,
    hostApplied: VK.hostApplied,
    clients: VK.clients,
    keys: VK.keys,
    addrs: VK.addrs,
    client: (_v, id) => VK.client(id),
    clientCatalog: () => null,
    cluster: false,
  },
  cluster: {
    gen: (v) => `mvpc:{${v}}:vpn:gen`,
    eps: "mvpc:{vpn}:eps",
    ep: (v) => `mvpc:{${v}}:vpn:ep`,
    hostKeys: (h) => `mvpc:{host:${h}}:vpn:keys`,
    hostApplied: (h) => `mvpc:{host:${h}}:vpn:applied`,
    clients: (v) => `mvpc:{${v}}:vpn:clients`,
    keys: (v) => `mvpc:{${v}}:vpn:keys`,
    addrs: (v) => `mvpc:{${v}}:vpn:addrs`,
    client: (v, id) => `mvpc:{${v}}:vpn:client:${id}`,
    clientCatalog: (id) => `mvpc:{vpn}:client:${id}`,
    cluster: true,
  },
};

/** The layout of the Redis `redis` is (VpnKeys). */
export function vpnKeysOf(redis: Redis): VpnKeys {
  return isCluster(redis) ? VPN_KEYS.cluster : VPN_KEYS.single;
}

export function parseEndpoint(h: Record<string, string>, vpcCidr: string, publicKey: string | null): V.Parsed<VpnEndpointRec> {
  return V.attempt(() => ({
    ...checkEndpoint(
      {
        vpcId: V.id("vpc", V.field(h, "vpc"), "vpc"),
        hostId: V.field(h, "host"),
        publicAddress: V.field(h, "addr"),
        listenPort: V.storedInt("port", h.port, 1, 65535),
        clientCidr: V.field(h, "cidr"),
      },
      vpcCidr,
    ),
    publicKey: publicKey ?? "",
    updatedMs: V.storedInt("updated", h.updated),
  }));
}

export function parseClient(raw: string, vpcId: string, cidr: V.Cidr): V.Parsed<VpnClientRec> {
  return V.attempt(() => {
    const o = V.jsonObject("client", V.storedJson("client", raw, 64 * 1024));
    const groups = V.jsonArray("groupIds", o.groupIds, 16).map((g, i) => V.id(`groups[${i}]`, V.jsonString(`groups[${i}]`, g), "sg"));
    return checkClient(
      {
        id: V.jsonString("id", o.id),
        name: V.jsonString("name", o.name),
        vpcId: V.jsonString("vpc", o.vpcId),
        publicKey: V.jsonString("publicKey", o.publicKey),
        address: V.jsonString("address", o.address),
        groupIds: groups,
        createdMs: V.jsonInt("createdMs", o.createdMs, 0, Number.MAX_SAFE_INTEGER),
      },
      vpcId,
      cidr,
    );
  });
}

/** Which host serves each VPC's VPN and its client range: what the overlay of the other hosts routes there (null once the endpoint is deleted). */
export async function vpnRoute(redis: Redis, vpcId: string, vpcCidr: string): Promise<{ hostId: string; cidr: string } | null> {
  const h = await redis.hgetall(vpnKeysOf(redis).ep(vpcId));
  if (!h.vpc) return null;
  const p = parseEndpoint(h, vpcCidr, null);
  return p.ok ? { hostId: p.value.hostId, cidr: p.value.clientCidr } : null;
}
