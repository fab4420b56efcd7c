// Overlay address claims: which NIC addresses of a VPC this host sends into
// the tunnel to which other host (WireGuard allowed-ips and /32 routes).
//
// `mvpc:overlay:<vpc>:addrs` (address → host) is written by each NIC's host,
// so a claim alone proves nothing: every hypervisor shares the Redis password.
// A claim (address A → host H) is installed only if all of these hold:
//
//  1. A is a dotted-quad IPv4 inside the VPC's CIDR (IPAM's VPC record) or,
//     for a peered VPC's NIC riding this VPC's tunnel, inside that peering's
//     allowed CIDRs; H is a well-formed host id;
//  2. `mvpc:nicaddr` names H and a NIC id for <vpc>/A, and H's own NIC record
//     (`mvpc:host:H:nics`, parsed by schema.ts) has that address in that VPC,
//     in a subnet of that VPC (IPAM's subnet record) that contains A;
//  3. IPAM allocated A in that subnet, to the NIC's owner (AttachNic refuses
//     any other owner, so a real NIC always matches its allocation). IPAM's
//     allocation records are written by the IPAM service, not by hosts, which
//     is what the claiming host cannot make up: it can only claim addresses
//     IPAM handed out, with their owner;
//  4. no other host indexes A in that VPC as one of its NICs
//     (`mvpc:host:<other>:nicaddr`): a contested address goes to nobody — a
//     host that copies another's NIC record gets a dropped address, not a
//     hijacked one;
//  5. no NIC of this host holds A: a local NIC's address is never routed into
//     the tunnel (its bridge's connected route must stay the only path).
//
// A claim failing any of these is left out alone and reported (with the
// reason) in GetOverlayStatus.rejected_addresses and the invalid-records
// metric; the other claims, and so `wg set` for the VPC, are unaffected.
import * as V from "../common/validate.js";
import { parseNicSpec } from "./schema.js";

const HOST_RE = /^[a-z0-9-]{1,63}$/;

export interface ClaimEvidence {
  /** Where each claimed address's NIC lives according to mvpc:nicaddr ("host/nic"). */
  located: Map<string, string | null>;
  /** Raw NIC records by "host/nic". */
  nicRecords: Map<string, string | null>;
  /** IPAM subnets by id (null: no such subnet). */
  subnets: Map<string, { vpcId: string; cidr: string } | null>;
  /** IPAM allocation owner by "subnet/index" (null: not allocated). */
  allocOwners: Map<string, string | null>;
  /** Hosts whose per-host index lists the address in this VPC. */
  holders: Map<string, string[]>;
}

export interface RejectedClaim {
  address: string;
  hostId: string;
  reason: string;
}

/** First checks (1): which claims are worth looking up. */
export function claimShapeProblem(address: string, hostId: string, within: V.Cidr[]): string {
  if (!HOST_RE.test(hostId)) return `host ${V.show(hostId)} is not a host id`;
  if (!/^[0-9.]{7,15}$/.test(address) || !isQuad(address)) return `${V.show(address)} is not an IPv4 address`;
  const n = V.ipToInt(address);
  if (!within.some((c) => n >= c.base && n < c.base + c.size)) return `${address} is outside ${within.map((c) => c.text).join(", ") || "the VPC (no CIDR known)"}`;
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
 * Checks (2)–(5) for claims that passed claimShapeProblem. `local` are the
 * addresses NICs of this host hold in the VPC.
 */
export function verifyClaims(
  vpcId: string,
  claims: [string, string][],
  ev: ClaimEvidence,
  local: Set<string>,
): { accepted: [string, string][]; rejected: RejectedClaim[] } {
  const accepted: [string, string][] = [];
  const rejected: RejectedClaim[] = [];
  for (const [address, hostId] of claims) {
    const reason = claimProblem(vpcId, address, hostId, ev, local);
    if (reason) rejected.push({ address, hostId, reason });
    else accepted.push([address, hostId]);
  }
  return { accepted, rejected };
}

function claimProblem(vpcId: string, address: string, hostId: string, ev: ClaimEvidence, local: Set<string>): string {
  if (local.has(address)) return `${address} is held by a NIC of this host; never routed into the tunnel`;
  const others = (ev.holders.get(address) ?? []).filter((h) => h !== hostId);
  if (others.length) return `${address} is also recorded as a NIC of ${others.sort().join(", ")}: contested, installed for nobody`;
  const loc = ev.located.get(address);
  if (!loc) return `${address} has no NIC location in mvpc:nicaddr`;
  const [h, nicId, ...rest] = loc.split("/");
  if (rest.length || h !== hostId || !/^nic-[0-9a-f]{12}$/.test(nicId ?? "")) return `mvpc:nicaddr places ${address} at ${V.show(loc)}, not on ${hostId}`;
  if (!(ev.holders.get(address) ?? []).includes(hostId)) return `${hostId}'s own NIC index does not list ${address}`;
  const raw = ev.nicRecords.get(`${h}/${nicId}`);
  if (!raw) return `${hostId} has no NIC record ${nicId}`;
  const p = parseNicSpec(nicId, raw);
  if (!p.ok) return `${hostId}'s NIC record ${nicId} is invalid: ${p.reason}`;
  const nic = p.value;
  if (nic.vpcId !== vpcId || nic.address !== address) return `${hostId}'s NIC ${nicId} is ${nic.address} in ${nic.vpcId}, not ${address} in ${vpcId}`;
  const sn = ev.subnets.get(nic.subnetId);
  if (!sn || sn.vpcId !== vpcId) return `subnet ${nic.subnetId} of NIC ${nicId} is not a subnet of ${vpcId} in IPAM`;
  let c: V.Cidr;
  try {
    c = V.cidr("cidr", sn.cidr, { min: 8, max: 28 });
  } catch {
    return `IPAM subnet ${nic.subnetId} has no valid CIDR`;
  }
  const n = V.ipToInt(address);
  if (n < c.base || n >= c.base + c.size) return `${address} is outside its NIC's subnet ${c.text}`;
  const owner = ev.allocOwners.get(`${nic.subnetId}/${n - c.base}`);
  if (!owner) return `${address} is not allocated in IPAM`;
  if (owner !== nic.owner) return `${address} is allocated to ${V.show(owner)} in IPAM, not to the NIC's owner ${V.show(nic.owner)}`;
  return "";
}
