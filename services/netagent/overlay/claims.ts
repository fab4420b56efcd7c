// Overlay address claims: which NIC addresses of a VPC this host sends into
// the tunnel to which other host (WireGuard allowed-ips and /32 routes).
//
// `mvpc:overlay:<vpc>:addrs` (address → host) is written by each NIC's host,
// so a claim alone proves nothing: every hypervisor may write that hash (it
// is one of the shared keys even with per-host Redis users, docs/redis-acl.md).
// The claims are therefore not what is installed; the evidence is. An
// address A of the VPC is sent to host H only if all of these hold:
//
//  1. A is a dotted-quad IPv4 inside the VPC's CIDR (IPAM's VPC record) or,
//     for a peered VPC's NIC riding this VPC's tunnel, inside that peering's
//     allowed CIDRs (peering/schema.ts checks those);
//  2. H's own NIC index (`mvpc:host:H:nicaddr`, "<vpc>/A" → NIC id) lists A,
//     and H's NIC record (`mvpc:host:H:nics`, parsed by schema.ts) has that
//     address in that VPC, in a subnet of that VPC (IPAM's subnet record)
//     that contains A;
//  3. IPAM allocated A in that subnet, to the NIC's owner (AttachNic refuses
//     any other owner, so a real NIC always matches its allocation). IPAM's
//     allocations are written by the IPAM service, not by hosts: a host can
//     only point at an address IPAM handed out, with its owner;
//  4. no other host's index lists A in the VPC: a contested address goes to
//     nobody — a host that copies another's NIC record gets a dropped
//     address, not a hijacked one (a denial of service that stays visible in
//     GetOverlayStatus; nothing here can tell the copy from the original);
//  5. no NIC of this host holds A: a local NIC's address is never routed into
//     the tunnel (its bridge's connected route must stay the only path).
//
// The addrs hash only nominates: an entry naming another host than the
// evidence (e.g. a host claiming a VM that lives elsewhere) is rejected while
// the evidence's host keeps the address; a malformed entry is rejected
// alone. Every rejection is reported with its reason (GetOverlayStatus
// rejected_addresses, the invalid-records metric); the other addresses, and
// so `wg set` for the VPC, are unaffected.
import * as V from "../../common/validate.js";
import { parseNicSpec } from "../schema.js";

const HOST_RE = /^[a-z0-9-]{1,63}$/;

export interface ClaimEvidence {
  /** Per address: the hosts whose own NIC index lists it in this VPC, with the NIC id. */
  indexed: Map<string, { hostId: string; nicId: string }[]>;
  /** Raw NIC records by "host/nic". */
  nicRecords: Map<string, string | null>;
  /** IPAM subnets by id (null: no such subnet). */
  subnets: Map<string, { vpcId: string; cidr: string } | null>;
  /** IPAM allocation owner by "subnet/index" (null: not allocated). */
  allocOwners: Map<string, string | null>;
}

export interface RejectedClaim {
  address: string;
  hostId: string;
  reason: string;
}

/** First check (1) on an addrs entry or an index entry. */
export function claimShapeProblem(address: string, hostId: string, within: V.Cidr[]): string {
  if (!HOST_RE.test(hostId)) return `host ${V.show(hostId)} is not a host id`;
  if (!/^[0-9.]{7,15}$/.test(address) || !isQuad(address)) return `${V.show(address)} is not an IPv4 address`;
  const n = V.ipToInt(address);
  if (!within.some((c) => n >= c.base && n < c.base + c.size))
    return `${address} is outside ${within.map((c) => c.text).join(", ") || "the VPC (no CIDR known)"}`;
  return "";
}

function isQuad(a: string): boolean {
  try {
    V.ipv4("address", a);
    return true;
  } catch {
    return false;
  }
}

/**
 * Checks (2)–(5). `addresses` passed claimShapeProblem; `claims` are the
 * addrs entries (address → host) among them; `local` the addresses NICs of
 * this host hold in the VPC. Returns where each verified address goes.
 */
export function verifyClaims(
  vpcId: string,
  addresses: string[],
  claims: Map<string, string>,
  ev: ClaimEvidence,
  local: Set<string>,
): { accepted: [string, string][]; rejected: RejectedClaim[] } {
  const accepted: [string, string][] = [];
  const rejected: RejectedClaim[] = [];
  for (const address of [...new Set(addresses)].sort()) {
    const claimer = claims.get(address) ?? "";
    const r = evidenceFor(vpcId, address, ev, local);
    if ("reason" in r) {
      rejected.push({ address, hostId: claimer || r.hostId, reason: r.reason });
      continue;
    }
    accepted.push([address, r.hostId]);
    if (claimer && claimer !== r.hostId)
      rejected.push({
        address,
        hostId: claimer,
        reason: `${address} is a NIC of ${r.hostId} (its index, NIC record and IPAM allocation agree), not of ${claimer}`,
      });
  }
  return { accepted, rejected };
}

function evidenceFor(vpcId: string, address: string, ev: ClaimEvidence, local: Set<string>): { hostId: string } | { hostId: string; reason: string } {
  const idx = ev.indexed.get(address) ?? [];
  if (local.has(address)) return { hostId: "", reason: `${address} is held by a NIC of this host; never routed into the tunnel` };
  if (idx.length === 0) return { hostId: "", reason: `no host's NIC index lists ${address}` };
  if (idx.length > 1)
    return {
      hostId: "",
      reason: `${address} is listed as a NIC of ${idx
        .map((x) => x.hostId)
        .sort()
        .join(" and ")}: contested, installed for nobody`,
    };
  const { hostId, nicId } = idx[0];
  if (!/^nic-[0-9a-f]{12}$/.test(nicId)) return { hostId, reason: `${hostId}'s index names ${V.show(nicId)}, not a NIC id` };
  const raw = ev.nicRecords.get(`${hostId}/${nicId}`);
  if (!raw) return { hostId, reason: `${hostId} has no NIC record ${nicId}` };
  const p = parseNicSpec(nicId, raw);
  if (!p.ok) return { hostId, reason: `${hostId}'s NIC record ${nicId} is invalid: ${p.reason}` };
  const nic = p.value;
  if (nic.vpcId !== vpcId || nic.address !== address)
    return { hostId, reason: `${hostId}'s NIC ${nicId} is ${nic.address} in ${nic.vpcId}, not ${address} in ${vpcId}` };
  const sn = ev.subnets.get(nic.subnetId);
  if (!sn || sn.vpcId !== vpcId) return { hostId, reason: `subnet ${nic.subnetId} of NIC ${nicId} is not a subnet of ${vpcId} in IPAM` };
  let c: V.Cidr;
  try {
    c = V.cidr("cidr", sn.cidr, { min: 8, max: 28 });
  } catch {
    return { hostId, reason: `IPAM subnet ${nic.subnetId} has no valid CIDR` };
  }
  const n = V.ipToInt(address);
  if (n < c.base || n >= c.base + c.size) return { hostId, reason: `${address} is outside its NIC's subnet ${c.text}` };
  const owner = ev.allocOwners.get(`${nic.subnetId}/${n - c.base}`);
  if (!owner) return { hostId, reason: `${address} is not allocated in IPAM` };
  if (owner !== nic.owner) return { hostId, reason: `${address} is allocated to ${V.show(owner)} in IPAM, not to the NIC's owner ${V.show(nic.owner)}` };
  return { hostId };
}
