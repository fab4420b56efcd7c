// The firewall's Redis keys (the contract other services and docs/redis-schema.md
// read) and the kinds of the events its scripts append. The scripts
// (scripts.ts) build the same names in Lua from F.
//
// Key layout (all under "mvpc:fw:"; see FK):
//   gen                          counter raised by every firewall change (events carry it)
//   sg:<id>                      hash: id vpc name description labels rules(JSON SgRule[])
//                                      peers(csv of peer group ids) logging(JSON|"") gen created updated
//   sg:<id>:members              hash nic id → address: the member index ("addresses of G" = HVALS);
//                                shared, so LOAD_VPC counts an entry only if the NIC's host vouches
//                                for it (its host:<host>:sig copy and netagent's NIC address index)
//   sg:<id>:refby                set of group ids whose rules name <id> as peer
//   vpc:<vpc>:sg:byname          hash name → id
//   vpc:<vpc>:sgs, sgs           lex zsets of "name/id" (per VPC, all)
//   acl:<id>                     hash: id vpc name description labels entries(JSON AclEntry[]) gen created updated
//   acl:<id>:subnets             set of associated subnet ids
//   vpc:<vpc>:acl:byname         hash name → id
//   vpc:<vpc>:acls, acls         lex zsets of "name/id"
//   subnet-acl                   hash subnet id → acl id (a subnet has at most one)
//   nic:<nic>                    hash: sig(JSON binding without times) host vpc subnet addr groups(csv) bound updated
//   nics                         lex zset of bound nic ids (all hosts)
//   host:<host>:nics             lex zset of nic ids bound on a host
//   vpc:<vpc>:nics               lex zset of nic ids bound in a VPC
//   host:<host>:vpc:<vpc>:nics   set: the local NICs of one VPC on one host
//   host:<host>:vpcs             set of VPC ids with bindings on a host
//   host:<host>:sig              hash nic id → sig: the host's own copy of its NICs' bindings.
//                                nic:<nic> is shared (every host's Redis user may write it,
//                                docs/redis-acl.md); only the NIC's host writes this one, and
//                                the host's sync refuses (fails closed on) a binding whose sig
//                                differs from it
//   flowlog:<id>                 hash: id vpc resource rate description created (flowlog-config.ts)
//   flowlogs                     lex zset of flow-log config ids
//   flowlog-byres                hash resource id (vpc, subnet or nic) → flow-log config id
//   vpc:<vpc>:flowlogs           set of the flow-log config ids of a VPC
// Client tokens share IPAM's "mvpc:tokens" hash ("sg\n<token>", "acl\n<token>").
//
// Groups' and ACLs' keys on a Redis Cluster: FirewallKeys below. The
// bindings' scripts (BIND, UNBIND, LOAD_VPC, ADOPT_SIGS) still build the
// single Redis's names in Lua from stored records (a NIC's old host, a
// group's members on every host): they run on one Redis or Sentinel only.
import type { Redis } from "ioredis";
import { IPAM_KEYS, K } from "../ipam/schema.js";
import { hostKeys, vpnKeys } from "../netagent/schema.js";

export const F = "mvpc:fw:";
/** netagent's host-scoped NIC address index, "<vpc>/<address>" → nic id, as prefix and suffix around the host id (for LOAD_VPC). */
export const NICADDR = hostKeys.nicaddr("\u0000").split("\u0000") as [string, string];
/** The VPN's endpoint hash of a VPC (prefix) and its clients hash (around the VPC id), for LOAD_VPC. */
export const VPN_EP = vpnKeys.ep("");
export const VPN_CLIENTS = vpnKeys.clients("\u0000").split("\u0000") as [string, string];
export const FK = {
  gen: `${F}gen`,
  sg: (id: string) => `${F}sg:${id}`,
  sgMembers: (id: string) => `${F}sg:${id}:members`,
  sgRefBy: (id: string) => `${F}sg:${id}:refby`,
  sgByName: (vpc: string) => `${F}vpc:${vpc}:sg:byname`,
  vpcSgs: (vpc: string) => `${F}vpc:${vpc}:sgs`,
  allSgs: `${F}sgs`,
  acl: (id: string) => `${F}acl:${id}`,
  aclSubnets: (id: string) => `${F}acl:${id}:subnets`,
  aclByName: (vpc: string) => `${F}vpc:${vpc}:acl:byname`,
  vpcAcls: (vpc: string) => `${F}vpc:${vpc}:acls`,
  allAcls: `${F}acls`,
  subnetAcl: `${F}subnet-acl`,
  nic: (id: string) => `${F}nic:${id}`,
  allNics: `${F}nics`,
  hostNics: (host: string) => `${F}host:${host}:nics`,
  vpcNics: (vpc: string) => `${F}vpc:${vpc}:nics`,
  hostVpcNics: (host: string, vpc: string) => `${F}host:${host}:vpc:${vpc}:nics`,
  hostVpcs: (host: string) => `${F}host:${host}:vpcs`,
  hostSigs: (host: string) => `${F}host:${host}:sig`,
  flowLog: (id: string) => `${F}flowlog:${id}`,
  allFlowLogs: `${F}flowlogs`,
  flowLogByRes: `${F}flowlog-byres`,
  vpcFlowLogs: (vpc: string) => `${F}vpc:${vpc}:flowlogs`,
};

/**
 * Where a VPC's security groups and network ACLs live: FW_KEYS.single or
 * FW_KEYS.cluster, by the client (fwKeys). Every script that writes them
 * declares each key it touches, on both layouts.
 *
 * A single Redis keeps the names above (FK): the bindings' scripts read the
 * groups there. On a Redis Cluster a VPC's groups, ACLs, their indexes, the
 * subnet → ACL associations, the change counter and the client tokens are
 * under the VPC's tag, "mvpc:{<vpc>}:fw:…" (the slot of IPAM's record of the
 * VPC and of its subnets, which the creates check, and of the VPC's change
 * stream); a group is in one VPC, so its create, update and delete each
 * touch one slot. What is read by id alone (GetSecurityGroup, DeleteNetworkAcl
 * by id) finds the VPC in the catalog under "{fw}" (id → VPC), written
 * before the VPC's step and removed after it, with the listing of every
 * group and ACL, written after.
 */
export interface FirewallKeys {
  sg(vpc: string, id: string): string;
  sgMembers(vpc: string, id: string): string;
  sgRefBy(vpc: string, id: string): string;
  sgByName(vpc: string): string;
  vpcSgs(vpc: string): string;
  acl(vpc: string, id: string): string;
  aclSubnets(vpc: string, id: string): string;
  aclByName(vpc: string): string;
  vpcAcls(vpc: string): string;
  /** Subnet id → ACL id (a subnet has at most one): the VPC's on a cluster. */
  subnetAcl(vpc: string): string;
  /** The change counter every firewall event carries ("gen"): the VPC's on a cluster. */
  gen(vpc: string): string;
  /** Client tokens of the creates ("sg\n<token>", "acl\n<token>" → id). */
  tokens(vpc: string): string;
  /** A NIC's binding (hash, the shared record: every host's user may write it): the same name on both, alone in its slot on a cluster. */
  nic(id: string): string;
  /** Every bound NIC (lex zset): the same name on both, written alone on a cluster. */
  allNics: string;
  /** The VPC's bound NICs (lex zset). */
  vpcNics(vpc: string): string;
  /** A host's bound NICs (lex zset), its NICs of one VPC (set), its VPCs with bindings (set), and its own copy of each binding's sig (hash): under the host's tag on a cluster. */
  hostNics(host: string): string;
  hostVpcNics(host: string, vpc: string): string;
  hostVpcs(host: string): string;
  hostSigs(host: string): string;
  /** A flow-log configuration (hash), the VPC's configurations (set), resource → configuration id (the VPC's on a cluster: a resource is in one VPC). */
  flowLog(vpc: string, id: string): string;
  vpcFlowLogs(vpc: string): string;
  flowLogByRes(vpc: string): string;
  /** Every configuration id (lex zset): the same name on both, written alone on a cluster. */
  allFlowLogs: string;
  /** Configuration id → VPC id (a cluster's catalog; null on a single Redis). */
  flowLogVpc: string | null;
  allSgs: string;
  allAcls: string;
  /** Group id → VPC id, and ACL id → VPC id (a cluster's catalog; null on a single Redis, whose keys do not name the VPC). */
  sgVpc: string | null;
  aclVpc: string | null;
  cluster: boolean;
}

const T = (vpc: string) => `mvpc:{${vpc}}:fw:`;
const H = (host: string) => `mvpc:{host:${host}}:fw:`;
const CATALOG = "mvpc:{fw}:";

export const FW_KEYS: { single: FirewallKeys; cluster: FirewallKeys } = {
  single: {
    sg: (_v, id) => FK.sg(id),
    sgMembers: (_v, id) => FK.sgMembers(id),
    sgRefBy: (_v, id) => FK.sgRefBy(id),
    sgByName: FK.sgByName,
    vpcSgs: FK.vpcSgs,
    acl: (_v, id) => FK.acl(id),
    aclSubnets: (_v, id) => FK.aclSubnets(id),
    aclByName: FK.aclByName,
    vpcAcls: FK.vpcAcls,
    subnetAcl: () => FK.subnetAcl,
    gen: () => FK.gen,
    tokens: () => K.tokens,
    nic: FK.nic,
    allNics: FK.allNics,
    vpcNics: FK.vpcNics,
    hostNics: FK.hostNics,
    hostVpcNics: FK.hostVpcNics,
    hostVpcs: FK.hostVpcs,
    hostSigs: FK.hostSigs,
    flowLog: (_v, id) => FK.flowLog(id),
    vpcFlowLogs: FK.vpcFlowLogs,
    flowLogByRes: () => FK.flowLogByRes,
    allFlowLogs: FK.allFlowLogs,
    flowLogVpc: null,
    allSgs: FK.allSgs,
    allAcls: FK.allAcls,
    sgVpc: null,
    aclVpc: null,
    cluster: false,
  },
  cluster: {
    sg: (v, id) => `${T(v)}sg:${id}`,
    sgMembers: (v, id) => `${T(v)}sg:${id}:members`,
    sgRefBy: (v, id) => `${T(v)}sg:${id}:refby`,
    sgByName: (v) => `${T(v)}sg:byname`,
    vpcSgs: (v) => `${T(v)}sgs`,
    acl: (v, id) => `${T(v)}acl:${id}`,
    aclSubnets: (v, id) => `${T(v)}acl:${id}:subnets`,
    aclByName: (v) => `${T(v)}acl:byname`,
    vpcAcls: (v) => `${T(v)}acls`,
    subnetAcl: (v) => `${T(v)}subnet-acl`,
    gen: (v) => `${T(v)}gen`,
    tokens: IPAM_KEYS.cluster.subnetTokens,
    nic: FK.nic,
    allNics: FK.allNics,
    vpcNics: (v) => `${T(v)}nics`,
    hostNics: (h) => `${H(h)}nics`,
    hostVpcNics: (h, v) => `${H(h)}vpc:${v}:nics`,
    hostVpcs: (h) => `${H(h)}vpcs`,
    hostSigs: (h) => `${H(h)}sig`,
    flowLog: (v, id) => `${T(v)}flowlog:${id}`,
    vpcFlowLogs: (v) => `${T(v)}flowlogs`,
    flowLogByRes: (v) => `${T(v)}flowlog-byres`,
    allFlowLogs: FK.allFlowLogs,
    flowLogVpc: `${CATALOG}flowlog:vpc`,
    allSgs: `${CATALOG}sgs`,
    allAcls: `${CATALOG}acls`,
    sgVpc: `${CATALOG}sg:vpc`,
    aclVpc: `${CATALOG}acl:vpc`,
    cluster: true,
  },
};

/** The layout of the Redis `redis` is (FirewallKeys). */
export function fwKeys(redis: Redis): FirewallKeys {
  return redis.isCluster ? FW_KEYS.cluster : FW_KEYS.single;
}

/** Kinds of the events appended to "mvpc:events" (field "kind"). */
export const EVENT_KINDS = [
  "fw.sg.created",
  "fw.sg.updated",
  "fw.sg.deleted",
  "fw.binding.changed",
  "fw.binding.removed",
  "fw.acl.created",
  "fw.acl.updated",
  "fw.acl.deleted",
  "fw.acl.associated",
  "fw.acl.disassociated",
  "fw.flowlog.created",
  "fw.flowlog.deleted",
] as const;
