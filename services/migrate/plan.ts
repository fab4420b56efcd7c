// The move of a deployment from one Redis (or Sentinel) to a Redis Cluster,
// as a plan: which key of the single Redis becomes which key(s) of the
// cluster, what is built there that a single Redis does not keep, what is
// left behind and why, and what stops the move. Pure: it reads a snapshot of
// the source (move.ts takes it) and returns operations; nothing here talks
// to Redis.
//
// The names on each side are the services' own layouts (IPAM_KEYS, DNS_KEYS,
// PEERING_KEYS, NA_KEYS, VPN_KEYS, FW_KEYS, GW_KEYS: their `single` and
// `cluster` halves), so that a layout change that is not taught here shows
// as a key this plan does not know, which stops the move. A key of the
// single Redis whose cluster name needs a VPC its name does not carry (a
// security group, an ACL, a flow-log configuration) takes it from its
// record, parsed by the parser the service itself reads it with: a record
// that does not parse stops the move, naming the key, since its place on
// the cluster cannot be known.
import { isId } from "../common/ids.js";
import { HOST_ID_RE } from "../common/host.js";
import * as V from "../common/validate.js";
import { DK_CLUSTER } from "../dns/schema.js";
import { FW_KEYS, parseAcl, parseFlowLogConfig, parseGroup } from "../firewall/schema.js";
import { GW_KEYS, natHold, parseNat } from "../gateway/schema.js";
import { IPAM_KEYS, parseSubnet } from "../ipam/schema.js";
import { NA_KEYS, VPN_KEYS } from "../netagent/schema.js";
import { PEERING_KEYS, parsePeeringRecord } from "../peering/schema.js";

/** What move.ts read from the source: every key's type, and the contents of those `wanted` names. */
export interface Snapshot {
  /** Every key under "mvpc:" and "mvpc-md:" → its Redis type. */
  types: Map<string, string>;
  /** Hash contents, for the keys wanted() asked for. */
  hashes: Map<string, Record<string, string>>;
  /** String values, for the keys wanted() asked for. */
  strings: Map<string, string>;
  /** Set members, for the keys wanted() asked for. */
  sets: Map<string, string[]>;
}

export type Op =
  /** The key as it is (DUMP/RESTORE, with its remaining time to live), under each name of `to`. */
  | { op: "copy"; from: string; to: string[] }
  /** A hash built here (split from a shared one, or kept on a cluster only). */
  | { op: "hash"; to: string; fields: Record<string, string> }
  /** A string built here (a per-VPC counter). */
  | { op: "string"; to: string; value: string };

export interface Plan {
  ops: Op[];
  /** Keys not carried over, with why (tombstones, names no release reads any more). */
  skipped: { key: string; why: string }[];
  /** What stops the move: nothing is written while any is left. */
  refusals: string[];
}

const C = {
  ipam: IPAM_KEYS.cluster,
  dns: DK_CLUSTER,
  pcx: PEERING_KEYS.cluster,
  na: NA_KEYS.cluster,
  vpn: VPN_KEYS.cluster,
  fw: FW_KEYS.cluster,
  gw: GW_KEYS.cluster,
};
const S = {
  ipam: IPAM_KEYS.single,
  pcx: PEERING_KEYS.single,
  na: NA_KEYS.single,
  vpn: VPN_KEYS.single,
  fw: FW_KEYS.single,
  gw: GW_KEYS.single,
};

const ID = "[a-z]+-[0-9a-f]{12}";
const VPN_ORPHAN = "a VPN record of a deleted VPC (DeleteVpc did not check for an endpoint before 5 December)";
const VPC = "vpc-[0-9a-f]{12}";
const HOST = "[a-z0-9]{1,24}";

/** The records and indexes the plan reads (compiled once: the plan and wanted() meet every key of the source). */
const RE = {
  subnet: new RegExp(`^mvpc:subnet:(${ID})$`),
  fwRecord: new RegExp(`^mvpc:fw:(sg|acl|flowlog):(${ID})$`),
  fwWanted: new RegExp(`^mvpc:fw:(sg|acl|flowlog|nic):${ID}$`),
  fwNic: new RegExp(`^mvpc:fw:nic:(${ID})$`),
  hostSigs: new RegExp(`^mvpc:fw:host:${HOST}:sig$`),
  pcx: new RegExp(`^mvpc:pcx:(${ID})$`),
  nat: new RegExp(`^mvpc:gw:nat:(${ID})$`),
  pcxAcks: new RegExp(`^mvpc:pcx:(${ID}):acks$`),
  hostAcks: new RegExp(`^mvpc:host:${HOST}:pcxacks$`),
  vpnClient: new RegExp(`^mvpc:vpn:client:${ID}$`),
  peerings: new RegExp(`^mvpc:vpc:${VPC}:peerings$`),
};

/** The single Redis's shared keys whose contents the plan needs (split by owner, or read for a VPC). */
const SHARED = {
  tokens: S.ipam.vpcTokens,
  claims: S.na.claims(""),
  subnetAcl: S.fw.subnetAcl(""),
  flowLogByRes: S.fw.flowLogByRes(""),
  fwGen: S.fw.gen(""),
  vpnGen: S.vpn.gen(""),
};

/** Whether the plan reads this key's contents (move.ts loads them before plan()). */
export function wanted(key: string, type: string): boolean {
  if (Object.values(SHARED).includes(key)) return true;
  if (type === "hash") {
    return [RE.subnet, RE.fwWanted, RE.hostSigs, RE.pcx, RE.pcxAcks, RE.hostAcks, RE.nat].some((re) => re.test(key));
  }
  if (type === "string") return RE.vpnClient.test(key);
  if (type === "set") return RE.peerings.test(key);
  return false;
}

/** A rule: a single Redis key's name (anchored) and what it becomes. */
type Rule = [RegExp, (m: RegExpExecArray, key: string) => void];

/** The plan of the move of `snap` (the source's keys) to a cluster. */
export function plan(snap: Snapshot): Plan {
  const ops: Op[] = [];
  const skipped: Plan["skipped"] = [];
  const refusals: string[] = [];
  const built = new Map<string, Record<string, string>>();
  const add = (to: string, field: string, value: string) => {
    let h = built.get(to);
    if (!h) built.set(to, (h = {}));
    h[field] = value;
  };
  const copy = (from: string, ...to: string[]) => ops.push({ op: "copy", from, to });
  const skip = (key: string, why: string) => skipped.push({ key, why });
  const refuse = (why: string) => refusals.push(why);
  const hash = (k: string) => snap.hashes.get(k) ?? {};

  // The records that say which VPC a key of theirs belongs to, parsed as their service reads them.
  const vpcOf = new Map<string, string>();
  /** Group and ACL ids → their names: a cluster's catalog entry is "<vpc>/<name>". */
  const nameOf = new Map<string, string>();
  /** Ids whose own record was refused: their other keys are not refused again. */
  const refusedIds = new Set<string>();
  const unplaced = (key: string, reason: string) =>
    refuse(`${key}: ${reason}; its VPC, and so its name on the cluster, cannot be known: fix or delete it, then run the move again`);
  for (const [key, h] of snap.hashes) {
    const sn = RE.subnet.exec(key);
    const fw = RE.fwRecord.exec(key);
    if (sn) {
      const p = V.attempt(() => parseSubnet(h));
      if (p.ok && p.value.id === sn[1]) vpcOf.set(sn[1], p.value.vpcId);
      else {
        refusedIds.add(sn[1]);
        unplaced(key, p.ok ? `its id is ${p.value.id}` : p.reason);
      }
    } else if (fw) {
      const p = fw[1] === "sg" ? parseGroup(h, fw[2]) : fw[1] === "acl" ? parseAcl(h, [], fw[2]) : parseFlowLogConfig(h, fw[2]);
      if (p.ok) {
        vpcOf.set(fw[2], p.value.vpcId);
        if ("name" in p.value) nameOf.set(fw[2], p.value.name);
      } else {
        refusedIds.add(fw[2]);
        unplaced(key, p.reason);
      }
    }
  }
  const peerings = new Map<string, { vpc1Id: string; vpc2Id: string; vpc1Cidr: string; vpc2Cidr: string; createdMs: number }>();
  for (const [key, h] of snap.hashes) {
    const m = RE.pcx.exec(key);
    if (!m) continue;
    const p = parsePeeringRecord(m[1], h);
    if (p.ok) peerings.set(m[1], p.value);
    else refuse(`${key}: ${p.reason}: the peering's ranges go into both VPCs' peer indexes on the cluster: fix or delete it, then run the move again`);
  }
  /** The VPC of record `id` (a subnet, group, ACL or flow-log configuration), for key `key`; refuses when unknown. */
  const vpcFor = (id: string, key: string): string | undefined => {
    const v = vpcOf.get(id);
    if (!v && !refusedIds.has(id)) refuse(`${key}: no record of ${id} says which VPC it is in; delete the key if ${id} is gone, then run the move again`);
    return v;
  };
  const vpcs = new Set<string>();
  /** Whether VPC `v` has no record (deleted). */
  const gone = (v: string) => !snap.types.has(S.ipam.vpc(v));
  const vpnKey = (m: RegExpExecArray, k: string) => {
    if (m[2]) {
      vpcs.add(m[2]);
      copy(k, C.vpn.ep(m[2]));
    } else copy(k, C.vpn[m[4] as "clients" | "keys" | "addrs"](m[3]));
  };

  const rules: Rule[] = [
    // Under the same name on both: already tagged (IPAM's allocation state, the vmm's records, the change streams, host metadata) or alone in their slot.
    [
      new RegExp(`^mvpc:\\{${VPC}\\}:sn:${ID}:moving$`),
      (_m, k) =>
        refuse(`${k}: a subnet's allocations are still moving from an earlier release's names; start the ipam daemon once on a single Redis to finish it`),
    ],
    [/^(mvpc|mvpc-md):\{[^{}]+\}:/, (_m, k) => copy(k, k)],
    [/^mvpc:(events|subnets|vm:hosts|gw:mdhosts|fw:nics|fw:flowlogs)$/, (_m, k) => copy(k, k)],
    [new RegExp(`^mvpc:fw:nic:${ID}$`), (_m, k) => copy(k, k)],
    // IPAM: a subnet's record keeps its name and is copied under its VPC's tag too.
    [
      new RegExp(`^mvpc:subnet:(${ID})$`),
      (m, k) => {
        const v = vpcFor(m[1], k);
        if (v) copy(k, k, C.ipam.subnetIn(v, m[1]));
      },
    ],
    [new RegExp(`^mvpc:vpc:(${VPC})$`), (m, k) => (vpcs.add(m[1]), copy(k, C.ipam.vpc(m[1])))],
    [/^mvpc:vpc:byname$/, (_m, k) => copy(k, C.ipam.vpcByName)],
    [/^mvpc:vpcs$/, (_m, k) => copy(k, C.ipam.vpcNames)],
    [new RegExp(`^mvpc:vpc:(${VPC}):subnets$`), (m, k) => copy(k, C.ipam.vpcSubnets(m[1]))],
    [new RegExp(`^mvpc:vpc:(${VPC}):subnet:byname$`), (m, k) => copy(k, C.ipam.vpcSubnetByName(m[1]))],
    [new RegExp(`^mvpc:vpc:(${VPC}):reserved$`), (m, k) => copy(k, C.ipam.vpcReserved(m[1]))],
    // A VPC's set of peering ids becomes the hash id → the peer's range that a cluster's creates check overlaps in.
    [
      new RegExp(`^mvpc:vpc:(${VPC}):peerings$`),
      (m, k) => {
        for (const id of snap.sets.get(k) ?? []) {
          const p = peerings.get(id);
          if (!p) {
            skip(`${k} ${id}`, "no record of that peering (a create or delete that stopped part-way)");
            continue;
          }
          if (p.vpc1Id !== m[1] && p.vpc2Id !== m[1]) {
            refuse(`${k}: lists ${id}, which peers ${p.vpc1Id} and ${p.vpc2Id}; fix the set, then run the move again`);
            continue;
          }
          const c = V.cidr("cidr", p.vpc1Id === m[1] ? p.vpc2Cidr : p.vpc1Cidr, { min: 0, max: 32 });
          add(C.pcx.peers(m[1]), id, JSON.stringify({ base: c.base, size: c.size, ms: p.createdMs }));
        }
      },
    ],
    // Legacy IPAM names an ipam daemon of this release has moved from: tombstones and leftovers.
    [
      new RegExp(`^mvpc:sn:${ID}:(bits|full|used|alloc|req|idx)$`),
      (_m, k) => skip(k, "an earlier release's allocation state, moved under its VPC's tag (a tombstone)"),
    ],
    [/^mvpc:owner:/, (_m, k) => skip(k, "an earlier release's owner index, moved under its VPC's tag")],
    // DNS
    [
      new RegExp(`^mvpc:dns:vpc:(${VPC}):(rec|names|own|cfg)$`),
      (m, k) => copy(k, { rec: C.dns.records, names: C.dns.names, own: C.dns.owners, cfg: C.dns.config }[m[2]]!(m[1])),
    ],
    [/^mvpc:dns:defaults$/, (_m, k) => copy(k, C.dns.defaults)],
    // Peerings
    [new RegExp(`^mvpc:pcx:(${ID})$`), (m, k) => copy(k, C.pcx.pcx(m[1]))],
    [/^mvpc:pcx:byname$/, (_m, k) => copy(k, C.pcx.byName)],
    [/^mvpc:pcxs$/, (_m, k) => copy(k, C.pcx.names)],
    [/^mvpc:pcx:bypair$/, (_m, k) => copy(k, C.pcx.byPair)],
    // A host's acks, with the legacy per-peering acks (host → time) folded in where the host has none of its own.
    [new RegExp(`^mvpc:host:(${HOST}):pcxacks$`), (m, k) => Object.entries(hash(k)).forEach(([id, t]) => add(C.pcx.hostAcks(m[1]), id, t))],
    [new RegExp(`^mvpc:pcx:(${ID}):acks$`), () => undefined],
    // netagent
    [new RegExp(`^mvpc:host:(${HOST}):(vpcs|subnets|nics|nicaddr|nictoken)$`), (m, k) => copy(k, `mvpc:{host:${m[1]}}:${m[2]}`)],
    [new RegExp(`^mvpc:hosts:(${HOST})$`), (m, k) => copy(k, C.na.overlayHost(m[1]))],
    [/^mvpc:hostindex$/, (_m, k) => copy(k, C.na.hostIndex)],
    [new RegExp(`^mvpc:overlay:(${VPC}):members$`), (m, k) => copy(k, C.na.overlayMembers(m[1]))],
    [new RegExp(`^mvpc:overlay:(${VPC}):addrs$`), (m, k) => copy(k, C.na.overlayAddrs(m[1]))],
    [/^mvpc:nicaddr$/, () => undefined],
    // VPN
    [/^mvpc:vpn:gen$/, () => undefined],
    [/^mvpc:vpn:eps$/, (_m, k) => copy(k, C.vpn.eps)],
    // A VPC's VPN keys whose VPC is gone: what a DeleteVpc before 5 December left (it did not check for an endpoint).
    [new RegExp(`^mvpc:vpn:(ep:(${VPC})|vpc:(${VPC}):(clients|keys|addrs))$`), (m, k) => (gone(m[2] ?? m[3]) ? skip(k, VPN_ORPHAN) : vpnKey(m, k))],
    [new RegExp(`^mvpc:vpn:host:(${HOST}):keys$`), (m, k) => copy(k, C.vpn.hostKeys(m[1]))],
    [new RegExp(`^mvpc:vpn:host:(${HOST}):applied$`), (m, k) => copy(k, C.vpn.hostApplied(m[1]))],

    [
      new RegExp(`^mvpc:vpn:client:(${ID})$`),
      (m, k) => {
        const v = /^(vpc-[0-9a-f]{12})\/[^/]+$/.exec(snap.strings.get(k) ?? "")?.[1];
        if (v && gone(v)) skip(k, VPN_ORPHAN);
        else if (v) copy(k, C.vpn.client(v, m[1]), C.vpn.clientCatalog(m[1])!);
        else refuse(`${k}: ${V.show(snap.strings.get(k) ?? "")} is not "<vpc>/<name>"; fix or delete it, then run the move again`);
      },
    ],
    // Firewall: a group's, an ACL's and a flow-log configuration's keys under their record's VPC, with the catalog id → VPC.
    [/^mvpc:fw:gen$/, () => undefined],
    [/^mvpc:tokens$/, () => undefined],
    [
      new RegExp(`^mvpc:fw:(?:(sg):(${ID})(:members|:refby)?|(acl):(${ID})(:subnets)?|(flowlog):(${ID}))$`),
      (g, k) => {
        // One kind per alternative: [kind, id, part].
        const m = ["", g[1] ?? g[4] ?? g[7], g[2] ?? g[5] ?? g[8], g[3] ?? g[6]];
        const v = vpcFor(m[2], k);
        if (!v) return;
        vpcs.add(v);
        const id = m[2];
        if (m[1] === "sg") {
          copy(k, m[3] === ":members" ? C.fw.sgMembers(v, id) : m[3] === ":refby" ? C.fw.sgRefBy(v, id) : C.fw.sg(v, id));
          if (!m[3]) add(C.fw.sgVpc!, id, `${v}/${nameOf.get(id)}`);
        } else if (m[1] === "acl") {
          copy(k, m[3] === ":subnets" ? C.fw.aclSubnets(v, id) : C.fw.acl(v, id));
          if (!m[3]) add(C.fw.aclVpc!, id, `${v}/${nameOf.get(id)}`);
        } else {
          copy(k, C.fw.flowLog(v, id));
          add(C.fw.flowLogVpc!, id, v);
        }
      },
    ],
    [new RegExp(`^mvpc:fw:vpc:(${VPC}):(sg:byname|sgs|acl:byname|acls|nics|flowlogs)$`), (m, k) => (vpcs.add(m[1]), copy(k, fwVpcKey(m[2], m[1])))],
    [/^mvpc:fw:sgs$/, (_m, k) => copy(k, C.fw.allSgs)],
    [/^mvpc:fw:acls$/, (_m, k) => copy(k, C.fw.allAcls)],
    [/^mvpc:fw:(subnet-acl|flowlog-byres)$/, () => undefined],
    [new RegExp(`^mvpc:fw:host:(${HOST}):nics$`), (m, k) => copy(k, C.fw.hostNics(m[1]))],
    [new RegExp(`^mvpc:fw:host:(${HOST}):vpcs$`), (m, k) => copy(k, C.fw.hostVpcs(m[1]))],
    [new RegExp(`^mvpc:fw:host:(${HOST}):sig$`), (m, k) => copy(k, C.fw.hostSigs(m[1]))],
    [new RegExp(`^mvpc:fw:host:(${HOST}):vpc:(${VPC}):nics$`), (m, k) => copy(k, C.fw.hostVpcNics(m[1], m[2]))],
    // Gateway. A NAT gateway also holds its subnet in its VPC's slot, where a cluster's DeleteSubnet looks (GatewayKeys.natHolds): a hold with a record is never stale.
    [
      RE.nat,
      (m, k) => {
        const p = parseNat(hash(k), m[1]);
        if (!p.ok) {
          refuse(
            `${k}: ${p.reason}; its hold on its subnet cannot be made on the cluster (a DeleteSubnet there could delete the subnet under it): fix or delete it, then run the move again`,
          );
          return;
        }
        copy(k, C.gw.nat(m[1]));
        add(C.gw.natHolds!(p.value.vpcId), m[1], natHold(p.value.subnetId, p.value.createdMs));
      },
    ],
    [new RegExp(`^mvpc:gw:(fip|pf):(${ID})$`), (m, k) => copy(k, C.gw[m[1] as "fip" | "pf"](m[2]))],
    [/^mvpc:gw:(nats|vpcnat|fips|pfs)$/, (m, k) => copy(k, { nats: C.gw.nats, vpcnat: C.gw.vpcNat, fips: C.gw.fips, pfs: C.gw.pfs }[m[1]]!)],
    [/^mvpc:gw:fip:byaddr$/, (_m, k) => copy(k, C.gw.fipByAddr)],
    [new RegExp(`^mvpc:gw:lease:nat:(${VPC})$`), (m, k) => copy(k, C.gw.natLease(m[1]))],
    [new RegExp(`^mvpc:gw:host:(${HOST}):ports$`), (m, k) => copy(k, C.gw.hostPorts(m[1]))],
    [new RegExp(`^mvpc:gw:host:(${HOST}):transit$`), (m, k) => copy(k, C.gw.transit(m[1]))],
    [new RegExp(`^mvpc:gw:host:(${HOST}):transitfree$`), (m, k) => copy(k, C.gw.transitFree(m[1]))],
    // Earlier releases' names that a daemon of this release moves from when it starts: the move waits for those starts.
    [
      /^mvpc:gw:md:/,
      (_m, k) =>
        refuse(
          `${k}: instance metadata of a release before host-scoped records; start every gateway once on this release (it adopts them), then run the move again`,
        ),
    ],
    [
      new RegExp(`^mvpc-md:${HOST}:`),
      (_m, k) => refuse(`${k}: instance metadata under the names before 5 December; start that host's gateway once on this release, then run the move again`),
    ],
    [
      new RegExp(`^mvpc:vm:host:${HOST}(:vm:${ID}|:lease:${ID})?$`),
      (_m, k) =>
        snap.types.get(k) === "hash"
          ? skip(k, "a tombstone of the vmm's move under its host's tag")
          : refuse(`${k}: a VM record under an earlier release's names; start that host's vmm once on this release, then run the move again`),
    ],
    [
      new RegExp(`^mvpc:vm:vpc:${VPC}:byname$`),
      (_m, k) => skip(k, "an earlier release's name index; this release keeps the one under the VPC's tag beside it"),
    ],
    [
      new RegExp(`^mvpc:(vm:${ID}|vmlease:${ID}|vms)$`),
      (_m, k) => refuse(`${k}: a VM record of a release before host-scoped records; start every vmm once on this release, then run the move again`),
    ],
  ];

  const keys = [...snap.types.keys()].sort();
  for (const key of keys) {
    const rule = rules.find(([re]) => re.test(key));
    if (!rule) {
      refuse(`${key}: not a key this release knows; delete it, or move it by hand after the move`);
      continue;
    }
    rule[1](rule[0].exec(key)!, key);
  }

  // The shared hashes of a single Redis, split by owner.
  splitTokens(hash(SHARED.tokens), vpcOf, peerings, add, skip, refuse);
  for (const [field, claim] of Object.entries(hash(SHARED.claims))) {
    const v = /^(vpc-[0-9a-f]{12})\//.exec(field)?.[1];
    if (!v) refuse(`${SHARED.claims} field ${V.show(field)}: not "<vpc>/<address>"; fix or delete it, then run the move again`);
    else {
      add(C.na.claims(v), field, claim);
      add(C.na.claimVersions(v)!, field, "1");
    }
  }
  // By the subnet's VPC, where a cluster looks an association up, and the ACL id as it is: an association whose ACL has no record closes its subnet on both layouts, and must go on doing so.
  for (const [subnet, acl] of Object.entries(hash(SHARED.subnetAcl))) {
    const v = vpcOf.get(subnet);
    if (v) add(C.fw.subnetAcl(v), subnet, acl);
    else
      refuse(
        `${SHARED.subnetAcl} field ${V.show(subnet)}: no subnet record says which VPC it is in; delete the field if the subnet is gone, then run the move again`,
      );
  }
  // A binding without its host's copy of the signature (made before the copies existed) is trusted by a single Redis and held closed by a cluster.
  for (const [key, h] of snap.hashes) {
    const m = RE.fwNic.exec(key);
    if (!m || h.sig === undefined) continue;
    const host = h.host ?? "";
    if (!HOST_ID_RE.test(host)) refuse(`${key}: host ${V.show(host)} is not a host id; fix or delete the binding, then run the move again`);
    else if (hash(S.fw.hostSigs(host))[m[1]] !== h.sig)
      refuse(
        `${key}: its host's copy of the binding (${S.fw.hostSigs(host)}) is missing or differs: start ${host}'s firewall once on this release (it copies its bindings'), or unbind the NIC, then run the move again`,
      );
  }
  for (const [res, cfg] of Object.entries(hash(SHARED.flowLogByRes))) {
    const v = vpcOf.get(cfg);
    if (v) add(C.fw.flowLogByRes(v), res, cfg);
    else skip(`${SHARED.flowLogByRes} ${res}`, `its configuration ${cfg} has no record`);
  }
  // Legacy acks: host → time of one peering; a host's own ack of it wins.
  for (const [key, h] of snap.hashes) {
    const m = RE.pcxAcks.exec(key);
    if (!m) continue;
    for (const [host, t] of Object.entries(h)) {
      if (!HOST_ID_RE.test(host)) refuse(`${key} field ${V.show(host)}: not a host id; fix or delete it, then run the move again`);
      else if (built.get(C.pcx.hostAcks(host))?.[m[1]] === undefined) add(C.pcx.hostAcks(host), m[1], t);
    }
  }
  // The change counters: one for every VPC on a single Redis, each VPC's own on a cluster, started where the shared one stands, so that no host sees a generation go back.
  for (const [shared, each] of [
    [SHARED.fwGen, C.fw.gen],
    [SHARED.vpnGen, C.vpn.gen],
  ] as const) {
    const g = snap.strings.get(shared);
    if (g === undefined) continue;
    if (!/^[0-9]{1,18}$/.test(g)) refuse(`${shared}: ${V.show(g)} is not a counter; fix it, then run the move again`);
    else for (const v of [...vpcs].sort()) ops.push({ op: "string", to: each(v), value: g });
  }
  for (const [to, fields] of built) ops.push({ op: "hash", to, fields });
  // Two sources on one cluster key (a tagged key already there under a name the move builds, or two rules meeting): one would overwrite or merge into the other.
  const targets = new Map<string, string>();
  for (const op of ops)
    for (const to of op.op === "copy" ? op.to : [op.to]) {
      const from = op.op === "copy" ? op.from : `(built ${op.op})`;
      const prev = targets.get(to);
      if (prev !== undefined)
        refuse(`${to}: both ${prev} and ${from} would be written there; delete the one that is not this release's, then run the move again`);
      else targets.set(to, from);
    }
  return { ops, skipped, refusals };
}

function fwVpcKey(what: string, v: string): string {
  const f = C.fw;
  return { "sg:byname": f.sgByName, sgs: f.vpcSgs, "acl:byname": f.aclByName, acls: f.vpcAcls, nics: f.vpcNics, flowlogs: f.vpcFlowLogs }[what]!(v);
}

/** The shared client tokens hash ("<kind>\n<token>" → id) split into each kind's hash on a cluster. */
function splitTokens(
  tokens: Record<string, string>,
  vpcOf: Map<string, string>,
  peerings: Map<string, unknown>,
  add: (to: string, field: string, value: string) => void,
  skip: (key: string, why: string) => void,
  refuse: (why: string) => void,
): void {
  const key = SHARED.tokens;
  for (const [field, id] of Object.entries(tokens)) {
    const kind = field.slice(0, field.indexOf("\n"));
    if (!isId(kind === "subnet" || kind === "vpc" || kind === "sg" || kind === "acl" || kind === "pcx" || kind === "nat" || kind === "pf" ? kind : "-", id)) {
      refuse(`${key} field ${V.show(field)}: names ${V.show(id)}, not an id of its kind; fix or delete it, then run the move again`);
      continue;
    }
    if (kind === "vpc") add(C.ipam.vpcTokens, field, id);
    else if (kind === "pcx") {
      if (peerings.has(id)) add(C.pcx.tokens, field, id);
      else skip(`${key} ${JSON.stringify(field)}`, `its peering ${id} is gone`);
    } else if (kind === "nat" || kind === "pf") add(C.gw.tokens, field, id);
    else {
      // subnet, sg, acl: the VPC's own tokens hash.
      const v = vpcOf.get(id);
      if (v) add(kind === "subnet" ? C.ipam.subnetTokens(v) : C.fw.tokens(v), field, id);
      else skip(`${key} ${JSON.stringify(field)}`, `its ${kind} ${id} is gone`);
    }
  }
}
