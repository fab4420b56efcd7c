// Every Redis key IPAM uses, in one place. All start with "mvpc:".
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
  /** Peering ids of a VPC (kept by services/peering/store.ts). */
  vpcPeerings: (vpc: string) => `${P}vpc:${vpc}:peerings`,
  vpcSubnetByName: (vpc: string) => `${P}vpc:${vpc}:subnet:byname`,
  /**
   * Ranges of a VPC no subnet may take: hash owner → JSON Reservation
   * (schema.ts). The VPN client range ("vpn") is written by SetVpnEndpoint's
   * script, which checks the subnets as CreateSubnet's checks this.
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
