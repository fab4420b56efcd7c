// Every Redis key IPAM uses, in one place. All start with "mvpc:".
import type { Redis } from "ioredis";

export const P = "mvpc:";
export const K = {
  events: `${P}events`,
  tokens: `${P}tokens`,
  vpc: (id: string) => `${P}vpc:${id}`,
  vpcByName: `${P}vpc:byname`,
  vpcNames: `${P}vpcs`,
  vpcSubnets: (vpc: string) => `${P}vpc:${vpc}:subnets`,
  // Other services' indexes DeleteVpc checks (kept by firewall/store.ts and gateway/store.ts).
  fwVpcSgs: (vpc: string) => `${P}fw:vpc:${vpc}:sgs`,
  fwVpcAcls: (vpc: string) => `${P}fw:vpc:${vpc}:acls`,
  fwSubnetAcl: `${P}fw:subnet-acl`,
  gwVpcNat: `${P}gw:vpcnat`,
  /** A NAT gateway's record (kept by gateway/store.ts): DeleteSubnet reads the subnet it sits in. */
  gwNat: (nat: string) => `${P}gw:nat:${nat}`,
  /** Peering ids of a VPC (kept by services/peering/store.ts). */
  vpcPeerings: (vpc: string) => `${P}vpc:${vpc}:peerings`,
  vpcSubnetByName: (vpc: string) => `${P}vpc:${vpc}:subnet:byname`,
  /**
   * Ranges of a VPC no subnet may take: hash owner → JSON Reservation
   * (schema.ts). The VPN client range ("vpn") is written by SetVpnEndpoint's
   * script, which checks the subnets as CreateSubnet's checks this, and
   * deleted by DeleteVpnEndpoint's.
   */
  vpcReserved: (vpc: string) => `${P}vpc:${vpc}:reserved`,
  subnet: (id: string) => `${P}subnet:${id}`,
  allSubnets: `${P}subnets`,
  // A subnet's allocation state and the owner index, under its VPC's hash tag
  // ("mvpc:{<vpc>}:…", the slot of the VPC's change stream): Allocate,
  // AllocateBatch and Release touch one slot of a Redis Cluster (issue 18,
  // docs/redis-schema.md "Redis Cluster"). The subnet id names the VPC's
  // subnet, so readers pass both.
  bits: (vpc: string, sn: string) => `${P}{${vpc}}:sn:${sn}:bits`,
  full: (vpc: string, sn: string) => `${P}{${vpc}}:sn:${sn}:full`,
  used: (vpc: string, sn: string) => `${P}{${vpc}}:sn:${sn}:used`,
  alloc: (vpc: string, sn: string) => `${P}{${vpc}}:sn:${sn}:alloc`,
  req: (vpc: string, sn: string) => `${P}{${vpc}}:sn:${sn}:req`,
  idx: (vpc: string, sn: string) => `${P}{${vpc}}:sn:${sn}:idx`,
  /** The six keys of a subnet's allocation state, in the order the allocation and move scripts take them. */
  state: (vpc: string, sn: string) => [K.used(vpc, sn), K.bits(vpc, sn), K.full(vpc, sn), K.alloc(vpc, sn), K.req(vpc, sn), K.idx(vpc, sn)],
  /** While a subnet's owner entries move from the earlier names: the last address index moved (MIGRATE_SUBNET). */
  moving: (vpc: string, sn: string) => `${P}{${vpc}}:sn:${sn}:moving`,
  /** An owner's allocations in one VPC: zset of "<subnet>/<index>". */
  owner: (vpc: string, owner: string) => `${P}{${vpc}}:owner:${owner}`,
  /**
   * The names an earlier release kept a subnet's allocation state under
   * ("mvpc:sn:<subnet>:…", "mvpc:owner:<owner>"). A single Redis moves them
   * once (MIGRATE_SUBNET) and leaves a tombstone of another type at three of
   * them, so that a replica of that release still running mid-upgrade fails
   * its scripts instead of allocating from an empty bitmap.
   */
  legacy: {
    bits: (sn: string) => `${P}sn:${sn}:bits`,
    full: (sn: string) => `${P}sn:${sn}:full`,
    used: (sn: string) => `${P}sn:${sn}:used`,
    alloc: (sn: string) => `${P}sn:${sn}:alloc`,
    req: (sn: string) => `${P}sn:${sn}:req`,
    idx: (sn: string) => `${P}sn:${sn}:idx`,
    /** As K.state, under the earlier names. */
    state: (sn: string) => [K.legacy.used(sn), K.legacy.bits(sn), K.legacy.full(sn), K.legacy.alloc(sn), K.legacy.req(sn), K.legacy.idx(sn)],
    ownerPrefix: `${P}owner:`,
  },
};

/**
 * Where a VPC's record, IPAM's indexes of its subnets and the VPC catalog
 * live: IpamKeys.single or IpamKeys.cluster, by the client (ipamKeys).
 *
 * On a single Redis they keep the names they have always had: the scripts of
 * five other services (peering, DNS, firewall, flow logs, the VPN) read them
 * there in the same step as their own writes, and a rename would need each
 * of them changed first. A Redis Cluster, where none of those runs yet, has
 * them under hash tags from the start, so that each of IPAM's scripts
 * touches one slot:
 * - a VPC's record and its subnets' indexes, reserved ranges, in-VPC subnet
 *   records and subnet client tokens under the VPC's tag "{<vpc>}" (the slot
 *   of its allocation state and change stream);
 * - the catalog (VPC names, their listing, VPC client tokens) under
 *   "{catalog}".
 * A subnet's record by id (K.subnet) and the listing of every subnet
 * (K.allSubnets) are single keys, read and written alone, under the same
 * names in both. Moving a single Redis to a cluster renames the keys that
 * differ first (docs/redis-schema.md "Redis Cluster").
 */
export interface IpamKeys {
  /** The VPC's record (hash). */
  vpc(vpc: string): string;
  /** The VPC's subnets (zset, score = base). */
  vpcSubnets(vpc: string): string;
  /** The VPC's subnet names → ids (hash). */
  vpcSubnetByName(vpc: string): string;
  /** Ranges of the VPC no subnet may take (hash owner → JSON Reservation). */
  vpcReserved(vpc: string): string;
  /** A subnet's record in its VPC's slot (on a single Redis: K.subnet, the one record). */
  subnetIn(vpc: string, subnet: string): string;
  /** Client tokens of the VPC's subnet creates ("subnet\n<token>" → id). */
  subnetTokens(vpc: string): string;
  /** VPC names → ids (hash). */
  vpcByName: string;
  /** VPC names (zset, score 0: listed by name). */
  vpcNames: string;
  /** Client tokens of VPC creates ("vpc\n<token>" → id). */
  vpcTokens: string;
  /** Whether the keys of a VPC and of the catalog are in different slots (a create or a delete then takes steps). */
  cluster: boolean;
}

const T = (vpc: string) => `${P}{${vpc}}:`;
const CATALOG = `${P}{catalog}:`;

export const IPAM_KEYS: { single: IpamKeys; cluster: IpamKeys } = {
  single: {
    vpc: K.vpc,
    vpcSubnets: K.vpcSubnets,
    vpcSubnetByName: K.vpcSubnetByName,
    vpcReserved: K.vpcReserved,
    subnetIn: (_vpc, sn) => K.subnet(sn),
    subnetTokens: () => K.tokens,
    vpcByName: K.vpcByName,
    vpcNames: K.vpcNames,
    vpcTokens: K.tokens,
    cluster: false,
  },
  cluster: {
    vpc: (v) => `${T(v)}vpc`,
    vpcSubnets: (v) => `${T(v)}subnets`,
    vpcSubnetByName: (v) => `${T(v)}subnet:byname`,
    vpcReserved: (v) => `${T(v)}reserved`,
    subnetIn: (v, sn) => `${T(v)}subnet:${sn}`,
    subnetTokens: (v) => `${T(v)}tokens`,
    vpcByName: `${CATALOG}vpc:byname`,
    vpcNames: `${CATALOG}vpcs`,
    vpcTokens: `${CATALOG}tokens`,
    cluster: true,
  },
};

/** The layout of the Redis `redis` is (IpamKeys). */
export function ipamKeys(redis: Redis): IpamKeys {
  return redis.isCluster ? IPAM_KEYS.cluster : IPAM_KEYS.single;
}
