// The overlay's registry in Redis, and the only overlay module that touches
// Redis:
// - this host's record, `mvpc:hosts:<hostId>` (public key, underlay
//   address, MTU), a lease renewed by the sync loop;
// - VPC membership, `mvpc:overlay:<vpc>:members` (host → {port});
// - NIC address claims, `mvpc:overlay:<vpc>:addrs` (address → host), and the
//   evidence claims.ts weighs them against (hosts' NIC indexes and records,
//   IPAM's subnets and allocations);
// - the events that announce a change (host.*, overlay.* on mvpc:events).
// Every record of another host is input: it is validated here, and a bad
// one is skipped with its reason, never fatal.
import { isIP } from "node:net";
import ipaddr from "ipaddr.js";
import type { Redis } from "ioredis";
import * as V from "../../common/validate.js";
import { emit, followScoped } from "../../common/events.js";
import { allocRecord, ipamKeys, K } from "../../ipam/schema.js";
import { naKeys, parseNicSpec, type NetagentKeys } from "../schema.js";
import { claimShapeProblem, type ClaimEvidence } from "./claims.js";
import { WG_KEY_RE } from "./keyfile.js";

export interface HostRecord {
  id: string;
  publicKey: string;
  /** Underlay address (ports are per VPC, in the members hash). */
  address: string;
  mtu: number;
  underlayMtu: number;
  vpcIds: string[];
  registeredMs: number;
  keyCreatedMs: number;
  agentVersion: string;
}

/** Another member host of a VPC, from a record and a member entry that passed validation. */
export interface PeerHost {
  hostId: string;
  record: HostRecord;
  port: number;
}

export interface SkippedHost {
  hostId: string;
  reason: string;
}

/** Why a registry record (JSON text of mvpc:hosts:<id>, written by another host) cannot be used; "" when it can. */
export function recordProblem(id: string, raw: string): string {
  let r: Partial<Record<keyof HostRecord, unknown>>;
  try {
    r = JSON.parse(raw) as typeof r;
  } catch {
    return "record is not JSON";
  }
  if (typeof r !== "object" || r === null || Array.isArray(r)) return "record is not a JSON object";
  if (r.id !== id) return `record id ${JSON.stringify(r.id)} does not match its key ${JSON.stringify(id)}`;
  if (typeof r.publicKey !== "string" || !WG_KEY_RE.test(r.publicKey))
    return `public key ${show(r.publicKey)} is not a base64 Curve25519 key (44 characters ending in =)`;
  if (typeof r.address !== "string" || !isIP(r.address)) return `underlay address ${show(r.address)} is not an IPv4 or IPv6 literal`;
  const bad = addressProblem(r.address);
  if (bad) return `underlay address ${r.address} ${bad}`;
  // Jumbo underlays (9000, 9216…) are legitimate; only nonsense is refused.
  if (typeof r.mtu !== "number" || !Number.isInteger(r.mtu) || r.mtu < 576 || r.mtu > 65535) return `mtu ${show(r.mtu)} is not an integer in 576–65535`;
  return "";
}

/** Why an overlay member entry (JSON {port} in mvpc:overlay:<vpc>:members) cannot be used; "" when it can. */
export function memberProblem(raw: string): string {
  let port: unknown;
  try {
    port = (JSON.parse(raw) as { port?: unknown }).port;
  } catch {
    return "member entry is not JSON";
  }
  if (typeof port !== "number" || !Number.isInteger(port) || port < 1 || port > 65535) return `listen port ${show(port)} is not an integer in 1–65535`;
  return "";
}

/** Why an IP literal cannot be a WireGuard endpoint; "" when it can. */
export function addressProblem(address: string): string {
  let range: string;
  try {
    range = ipaddr.parse(address).range();
  } catch {
    return "is not an IPv4 or IPv6 literal";
  }
  if (!isIP(address)) return "is not an IPv4 or IPv6 literal";
  if (range === "unspecified" || range === "broadcast") return `is the ${range} address, not a host's`;
  if (range === "multicast") return "is a multicast address, not a host's";
  return "";
}

/** A value from a record, for a message: strings quoted, others as JSON, cut at 60 characters. */
function show(v: unknown): string {
  const s = typeof v === "string" ? JSON.stringify(v) : (JSON.stringify(v) ?? String(v));
  return s.length > 60 ? `${s.slice(0, 60)}…` : s;
}

/** host.* go to the registry's stream too, overlay.* to the VPC's (common/events.ts). */
function event(redis: Redis, ...fields: string[]): Promise<unknown> {
  const vpc = fields[fields.indexOf("vpc") + 1];
  return emit(redis, { registry: fields[1].startsWith("host."), vpcs: fields.includes("vpc") && vpc ? [vpc] : [] }, fields);
}

export class OverlayRegistry {
  private stopWatch?: () => void;
  /** The layout of this client's Redis. */
  readonly keys: NetagentKeys;

  constructor(
    readonly redis: Redis,
    readonly hostId: string,
  ) {
    this.keys = naKeys(redis);
  }

  /** Renews this host's lease; announces the host when the record was missing or changed key (or as `kind`). */
  async publish(rec: HostRecord, leaseMs: number, kind?: string): Promise<void> {
    const key = this.keys.overlayHost(this.hostId);
    const prev = (await this.redis.call("SET", key, JSON.stringify(rec), "PX", String(leaseMs), "GET")) as string | null;
    let announce = kind;
    if (!announce) {
      if (!prev) announce = "host.registered";
      else if ((JSON.parse(prev) as HostRecord).publicKey !== rec.publicKey) announce = "host.rotated";
    }
    if (!prev) await this.redis.sadd(this.keys.hostIndex, this.hostId);
    if (announce) await event(this.redis, "kind", announce, "host", this.hostId);
  }

  /** Drops this host's record: peers drop it at once instead of after the lease. */
  async leaveHost(): Promise<void> {
    await this.redis.del(this.keys.overlayHost(this.hostId));
    await event(this.redis, "kind", "host.left", "host", this.hostId);
  }

  /** This host's member entry of the VPC, as stored. */
  member(vpcId: string): Promise<string | null> {
    return this.redis.hget(this.keys.overlayMembers(vpcId), this.hostId);
  }

  /**
   * Makes this host's member entry say `port`; true if it had to be written.
   * The members hash is shared (any host's Redis user may write it, see
   * docs/redis-acl.md), so an entry of ours that another host deleted or
   * rewrote is put back here.
   */
  async join(vpcId: string, port: number): Promise<boolean> {
    // The writer applies the readers' rule: an entry every other host would skip as malformed is never written.
    const problem = memberProblem(JSON.stringify({ port }));
    if (problem) throw new Error(`not joining the overlay of ${vpcId}: ${problem}`);
    if ((await this.member(vpcId)) === JSON.stringify({ port })) return false;
    await this.redis.hset(this.keys.overlayMembers(vpcId), this.hostId, JSON.stringify({ port }));
    await event(this.redis, "kind", "overlay.joined", "host", this.hostId, "vpc", vpcId);
    return true;
  }

  async leave(vpcId: string): Promise<void> {
    if (await this.redis.hdel(this.keys.overlayMembers(vpcId), this.hostId)) {
      await event(this.redis, "kind", "overlay.left", "host", this.hostId, "vpc", vpcId);
    }
  }

  /** The VPC's members hash as stored (host → member entry, unchecked). */
  members(vpcId: string): Promise<Record<string, string>> {
    return this.redis.hgetall(this.keys.overlayMembers(vpcId));
  }

  /** The VPC's address claims as stored (address → host, unchecked). */
  claims(vpcId: string): Promise<Record<string, string>> {
    return this.redis.hgetall(this.keys.overlayAddrs(vpcId));
  }

  /** The VPC's CIDR from IPAM's record (null if missing or malformed). */
  async vpcCidr(vpcId: string): Promise<V.Cidr | null> {
    const c = await this.redis.hget(ipamKeys(this.redis).vpc(vpcId), "cidr");
    try {
      return c ? V.cidr("cidr", c, { min: 8, max: 28 }) : null;
    } catch {
      return null;
    }
  }

  /**
   * The registry records of these member hosts, in their order. Records
   * come from other hosts: one that fails validation costs only that host's
   * peer (it is skipped, with the reason), never the mesh; a host whose
   * lease expired is left out and is not a fault.
   */
  async peerHosts(ids: string[], members: Record<string, string>): Promise<{ hosts: PeerHost[]; skipped: SkippedHost[] }> {
    const recs = await this.redis.mget(...ids.map((h) => this.keys.overlayHost(h)));
    const hosts: PeerHost[] = [];
    const skipped: SkippedHost[] = [];
    ids.forEach((h, i) => {
      const raw = recs[i];
      if (!raw) return;
      const problem = recordProblem(h, raw) || memberProblem(members[h]);
      if (problem) skipped.push({ hostId: h, reason: problem });
      else hosts.push({ hostId: h, record: JSON.parse(raw) as HostRecord, port: (JSON.parse(members[h]) as { port: number }).port });
    });
    return { hosts, skipped };
  }

  /**
   * The evidence claims.ts weighs the VPC's addresses against: the NIC
   * indexes of these hosts and, for addresses one host alone lists, that
   * NIC's record, its subnet and IPAM's allocation. `keep` limits the
   * addresses to those this tunnel may carry; null when neither a claim
   * (`claimed`) nor an index names one.
   */
  async claimEvidence(
    vpcId: string,
    hosts: string[],
    within: V.Cidr[],
    keep: (a: string) => boolean,
    claimed: Iterable<string>,
  ): Promise<ClaimEvidence | null> {
    const indexes = await Promise.all(hosts.map((h) => this.redis.hgetall(this.keys.nicaddr(h))));
    const ev: ClaimEvidence = { indexed: new Map(), nicRecords: new Map(), subnets: new Map(), allocOwners: new Map() };
    const prefix = `${vpcId}/`;
    hosts.forEach((h, i) => {
      for (const [k, nicId] of Object.entries(indexes[i])) {
        if (!k.startsWith(prefix)) continue;
        const a = k.slice(prefix.length);
        if (claimShapeProblem(a, h, within) || !keep(a)) continue;
        const l = ev.indexed.get(a) ?? [];
        l.push({ hostId: h, nicId });
        ev.indexed.set(a, l);
      }
    });
    if (ev.indexed.size === 0 && [...claimed].length === 0) return null;
    // Only unambiguous entries need their NIC record, subnet and allocation.
    const single = [...ev.indexed.values()].filter((l) => l.length === 1 && /^nic-[0-9a-f]{12}$/.test(l[0].nicId)).map((l) => l[0]);
    const nicRaw = await Promise.all(single.map((x) => this.redis.hget(this.keys.nics(x.hostId), x.nicId)));
    single.forEach((x, i) => ev.nicRecords.set(`${x.hostId}/${x.nicId}`, nicRaw[i]));
    const nics = single.flatMap((x, i) => {
      const p = nicRaw[i] ? parseNicSpec(x.nicId, nicRaw[i]!) : null;
      return p?.ok ? [p.value] : [];
    });
    const subnetIds = [...new Set(nics.map((n) => n.subnetId))];
    const subs = await Promise.all(subnetIds.map((id) => this.redis.hmget(K.subnet(id), "vpc", "cidr")));
    subnetIds.forEach((id, i) => ev.subnets.set(id, subs[i][0] && subs[i][1] ? { vpcId: subs[i][0]!, cidr: subs[i][1]! } : null));
    const allocKeys: [string, number, string][] = [];
    for (const n of nics) {
      const sn = ev.subnets.get(n.subnetId);
      if (!sn) continue;
      try {
        const idx = V.ipToInt(n.address) - V.cidr("cidr", sn.cidr, { min: 8, max: 28 }).base;
        // The allocation keys are under the subnet's VPC's hash tag; an id that is not one names no key (verifyClaims refuses the subnet).
        if (idx >= 0 && V.attempt(() => V.id("vpc", sn.vpcId, "vpc")).ok) allocKeys.push([n.subnetId, idx, sn.vpcId]);
      } catch {
        // verifyClaims says why
      }
    }
    const allocs = await Promise.all(allocKeys.map(([sid, idx, vpc]) => allocRecord(this.redis, { id: sid, vpcId: vpc }, idx)));
    allocKeys.forEach(([sid, idx], i) => ev.allocOwners.set(`${sid}/${idx}`, allocs[i] === null ? null : allocs[i]!.split("\n")[0]));
    return ev;
  }

  /**
   * Follows this host's scoped streams (common/events.ts: the VPCs held here,
   * its own, the fleet's for host.*) until stopped() and calls kick() for a
   * change of NICs, of an overlay's membership or of another host.
   */
  async watch(kick: () => void, stopped: () => boolean): Promise<void> {
    const w = followScoped(
      this.redis,
      // Each batch is one pass: a VM start's events come in one or two (a peer learns of a NIC at most 20 ms later).
      { host: this.hostId, vpcs: (r) => r.hkeys(naKeys(r).vpcs(this.hostId)), registry: true, settleMs: 20 },
      // gw.nat.*: a NAT gateway's holder changed, or the gateway came or went (its peer's 0.0.0.0/0).
      /^(nic|overlay|host|gw\.nat)\./,
      (events) => {
        // feed.*: a VPC arrived or left, or a stream was trimmed past this host: a pass.
        if (events.some((e) => !(e.kind.startsWith("host.") && e.host === this.hostId))) kick();
      },
      stopped,
    );
    this.stopWatch = w.stop;
    await w.done;
  }

  /** Ends watch() and its connection. */
  closeWatch(): void {
    this.stopWatch?.();
  }
}
