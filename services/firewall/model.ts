// The firewall's normalized desired state: what the API stores (validated,
// canonical) and what the pure nft compiler consumes. Everything here is
// plain data; strings in it have passed validation (CIDRs canonical, names
// and ids matching their patterns), so the compiler can print them safely.

export type Proto = "tcp" | "udp" | "icmp" | "all";
export type Dir = "ingress" | "egress";

export interface SgRule {
  dir: Dir;
  proto: Proto;
  /** Inclusive port range for tcp/udp; 0–0 = all ports. */
  portFrom: number;
  portTo: number;
  /** For icmp: type (and code); undefined = any. */
  icmpType?: number;
  icmpCode?: number;
  /** Exactly one of cidr / group is set. cidr is canonical "a.b.c.d/n". */
  cidr?: string;
  /** Id of the peer security group ("sg-<12 hex>"). */
  group?: string;
  description: string;
}

export interface SecurityGroupRec {
  id: string;
  vpcId: string;
  name: string;
  description: string;
  labels: { key: string; value: string }[];
  rules: SgRule[];
  dropLogging?: { ratePerSecond: number; burst: number };
  generation: number;
  createdMs: number;
  updatedMs: number;
}

export interface AclEntry {
  ruleNumber: number;
  dir: Dir;
  action: "allow" | "deny";
  proto: Proto;
  portFrom: number;
  portTo: number;
  icmpType?: number;
  icmpCode?: number;
  cidr: string;
  description: string;
}

export interface NetworkAclRec {
  id: string;
  vpcId: string;
  name: string;
  description: string;
  labels: { key: string; value: string }[];
  entries: AclEntry[];
  subnetIds: string[];
  generation: number;
  createdMs: number;
  updatedMs: number;
}

export interface BindingRec {
  nicId: string;
  vpcId: string;
  subnetId: string;
  address: string;
  mac: string;
  hostId: string;
  hostIf: string;
  groupIds: string[];
  dropLogging?: { ratePerSecond: number; burst: number };
  boundMs: number;
  updatedMs: number;
}

/** Everything one hypervisor needs to compile its firewall, per VPC. */
export interface VpcFirewallState {
  vpcId: string;
  /** Subnets of the VPC present on this host: id, cidr, bridge name. */
  subnets: { subnetId: string; cidr: string; bridge: string }[];
  /** NICs on this host and their bindings (unbound NICs have groupIds []). */
  nics: BindingRec[];
  /** Every group a local NIC uses, and every group their rules name as peer. */
  groups: Map<string, SecurityGroupRec>;
  /** Member addresses of the groups named as peers (NICs on any host). */
  members: Map<string, string[]>;
  /** ACL of each local subnet that has one. */
  acls: Map<string, NetworkAclRec>;
  /**
   * Flow logs (flowlogs.ts): the local NICs whose flows are logged → the
   * share sampled (0 < r ≤ 1), from the FlowLogConfigs (flowlog-config.ts);
   * `subnets`: the local subnets whose configuration (or their VPC's) covers
   * the drops toward an address with no bound NIC yet.
   */
  flowLogs?: { nics: ReadonlyMap<string, number>; subnets?: ReadonlyMap<string, number> };
}

export const MAX_GROUPS_PER_NIC = 16;
export const MAX_RULES_PER_GROUP = 10_000;

/** The binding change a caller of FirewallSync.enforce waits for. */
export interface EnforcedChange {
  /** The NIC whose binding changed: its pass can be a delta even before the event arrives. */
  nicId?: string;
  /** The change's generation (its event's `gen`): the pass that event started answers. */
  gen?: string;
  /** An UnbindNic with `detaching`: the NIC leaves the tables while still attached (FirewallSync's `leaving`). */
  leaving?: boolean;
}
