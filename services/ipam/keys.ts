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
  bits: (sn: string) => `${P}sn:${sn}:bits`,
  full: (sn: string) => `${P}sn:${sn}:full`,
  used: (sn: string) => `${P}sn:${sn}:used`,
  alloc: (sn: string) => `${P}sn:${sn}:alloc`,
  req: (sn: string) => `${P}sn:${sn}:req`,
  idx: (sn: string) => `${P}sn:${sn}:idx`,
  ownerPrefix: `${P}owner:`,
  owner: (owner: string) => `${P}owner:${owner}`,
};
