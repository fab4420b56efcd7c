// The netagent's records in Redis and the one set of rules for them.
//
// Whoever holds the Redis password can write any key, so a record read back
// is input like a request: every field that reaches `ip -batch`, `tc`, nft,
// `wg set` or a route is parsed here, by the same functions the API handlers
// (service.ts) apply to AttachNic/EnsureSubnet, before anything uses it. The
// writer (store.ts) and every reader (the agent, the firewall and gateway
// syncs through HostStore.load, the overlay) go through this module.
//
// Keys (host = this hypervisor's id):
//   mvpc:host:<host>:vpcs      vpc id    → JSON VpcSpec
//   mvpc:host:<host>:subnets   subnet id → JSON SubnetSpec
//   mvpc:host:<host>:nics      nic id    → JSON NicSpec
//   mvpc:host:<host>:nicaddr   "<vpc>/<address>" → nic id (this host's index)
//   mvpc:host:<host>:nictoken  client token → nic id
//   mvpc:nicaddr               "<vpc>/<address>" → "<host>/<nic>" (every host)
import type { Redis } from "ioredis";
import type { Logger } from "pino";
import { InvalidArgumentError } from "../common/errors.js";
import { invalidRecordsTotal } from "../common/invalid-records.js";
import { isCluster } from "../common/redis.js";
import * as V from "../common/validate.js";
import type { Bandwidth, NicSpec, SubnetSpec } from "./plan.js";

// The VPN's records (vpn/schema.ts): the firewall reads a VPC's clients to
// count them as members of their security groups.
export { VK as vpnKeys, VPN_KEYS, vpnKeysOf, parseClient as parseVpnClient, parseEndpoint as parseVpnEndpoint, type VpnKeys } from "./vpn/schema.js";
export type { VpnClientRec } from "./vpn/plan.js";

export const hostKeys = {
  vpcs: (host: string) => `mvpc:host:${host}:vpcs`,
  subnets: (host: string) => `mvpc:host:${host}:subnets`,
  nics: (host: string) => `mvpc:host:${host}:nics`,
  nicaddr: (host: string) => `mvpc:host:${host}:nicaddr`,
  nictoken: (host: string) => `mvpc:host:${host}:nictoken`,
  allNicAddrs: "mvpc:nicaddr",
};

/**
 * Where the netagent's records live: NA_KEYS.single or NA_KEYS.cluster, by
 * the client (naKeys). A single Redis keeps the names above (hostKeys,
 * overlayKeys). On a Redis Cluster a host's records are under its hash tag
 * (`mvpc:{host:H}:…`, the slot of its change stream, its VMs and its
 * firewall indexes); the address claims, split per VPC, and the VPC's
 * overlay hashes under the VPC's (`mvpc:{V}:…`); the host registry under
 * `{hosts}` (one slot: a pass reads every member's record in one MGET).
 */
export interface NetagentKeys {
  vpcs(host: string): string;
  subnets(host: string): string;
  nics(host: string): string;
  /** The host's own index, "<vpc>/<address>" → NIC id. */
  nicaddr(host: string): string;
  nictoken(host: string): string;
  /** Cluster: NICs whose AttachNic has written the record but not yet confirmed the claim (nic id → "<vpc>/<address>"); null on a single Redis (one script). */
  nicPending(host: string): string | null;
  /** Address claims "<vpc>/<address>" → "<host>/<nic>": every VPC's in one hash on a single Redis, the VPC's on a cluster. */
  claims(vpc: string): string;
  /** Cluster: each claim's version, "<vpc>/<address>" → a counter every write of the claim raises (never lowered by a writer of ours; a value that is not a counter starts again at 1); null on a single Redis, whose one script needs none. */
  claimVersions(vpc: string): string | null;
  /** The overlay: a host's registry record (lease), the set of host ids, and a VPC's members and address nominations. */
  overlayHost(host: string): string;
  hostIndex: string;
  overlayMembers(vpc: string): string;
  overlayAddrs(vpc: string): string;
  cluster: boolean;
}

export const NA_KEYS: { single: NetagentKeys; cluster: NetagentKeys } = {
  single: {
    ...hostKeys,
    claims: () => hostKeys.allNicAddrs,
    claimVersions: () => null,
    nicPending: () => null,
    overlayHost: (h) => `mvpc:hosts:${h}`,
    hostIndex: "mvpc:hostindex",
    overlayMembers: (v) => `mvpc:overlay:${v}:members`,
    overlayAddrs: (v) => `mvpc:overlay:${v}:addrs`,
    cluster: false,
  },
  cluster: {
    vpcs: (h) => `mvpc:{host:${h}}:vpcs`,
    subnets: (h) => `mvpc:{host:${h}}:subnets`,
    nics: (h) => `mvpc:{host:${h}}:nics`,
    nicaddr: (h) => `mvpc:{host:${h}}:nicaddr`,
    nictoken: (h) => `mvpc:{host:${h}}:nictoken`,
    claims: (v) => `mvpc:{${v}}:nicaddr`,
    claimVersions: (v) => `mvpc:{${v}}:nicaddr:ver`,
    nicPending: (h) => `mvpc:{host:${h}}:nicpending`,
    overlayHost: (h) => `mvpc:{hosts}:host:${h}`,
    hostIndex: "mvpc:{hosts}:index",
    overlayMembers: (v) => `mvpc:{${v}}:overlay:members`,
    overlayAddrs: (v) => `mvpc:{${v}}:overlay:addrs`,
    cluster: true,
  },
};

/** The layout of the Redis `redis` is (NetagentKeys). */
export function naKeys(redis: Redis): NetagentKeys {
  return isCluster(redis) ? NA_KEYS.cluster : NA_KEYS.single;
}

export interface VpcSpec {
  vpcId: string;
  ns: string;
  createdMs: number;
  /** Not held here: carried only because a peering needs this VPC's namespace here (never stored). */
  peered?: boolean;
}

// ---------------------------------------------------------------------------
// Field rules shared by the API handlers and the record parsers. Each throws
// InvalidArgumentError naming the field.

const IFNAME_RE = /^[A-Za-z][A-Za-z0-9_.-]{0,14}$/;
const NETNS_PATH_RE = /^(\/(?:var\/)?run\/netns\/[A-Za-z0-9_.-]{1,64}|\/proc\/[0-9]{1,10}\/ns\/net)$/;
const DOMAIN_RE = /^(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$/;
export const MTU_MIN = 576;
export const MTU_MAX = 9000;
export const RATE_MAX_MBPS = 100_000;
export const BURST_MIN = 1500;
export const BURST_MAX = 1 << 30;
export const QUEUES_MAX = 64;
/** Subnet prefixes IPAM creates (services/ipam/service.ts: CreateSubnet). */
export const SUBNET_PREFIX = { min: 8, max: 28 };

/** A Linux interface name we create or accept: 1–15 bytes, nothing iproute2 or nft would read as syntax. */
export function ifname(field: string, v: string): string {
  if (!IFNAME_RE.test(v))
    throw new InvalidArgumentError(field, `${V.show(v)} is not an interface name: 1–15 characters of letters, digits and _ . -, starting with a letter`);
  return v;
}

/** Where a veth's far end goes: a named namespace or a process's. */
export function netnsPath(field: string, p: string): string {
  if (!NETNS_PATH_RE.test(p)) throw new InvalidArgumentError(field, `${V.show(p)} is not a network namespace path: use /run/netns/NAME or /proc/PID/ns/net`);
  return p;
}

export function mtu(field: string, v: number): number {
  if (!Number.isInteger(v) || v < MTU_MIN || v > MTU_MAX) throw new InvalidArgumentError(field, `${v} is out of range; use ${MTU_MIN}–${MTU_MAX}`);
  return v;
}

/** A rate in Mbit/s; 0 = unlimited. */
export function rateMbps(field: string, v: number): number {
  if (!Number.isInteger(v) || v < 0) throw new InvalidArgumentError(field, `${v} is not a whole number of Mbit/s`);
  if (v > RATE_MAX_MBPS) throw new InvalidArgumentError(field, `${v} Mbit/s is more than a NIC here carries; use 1–${RATE_MAX_MBPS}, or 0 for no limit`);
  return v;
}

export function burstBytes(field: string, v: number): number {
  if (!Number.isInteger(v) || v < BURST_MIN || v > BURST_MAX)
    throw new InvalidArgumentError(field, `${v} bytes: use ${BURST_MIN} to ${BURST_MAX} (or leave it unset for 10 ms of the rate)`);
  return v;
}

export function queues(field: string, v: number): number {
  if (!Number.isInteger(v) || v < 1 || v > QUEUES_MAX) throw new InvalidArgumentError(field, `${v}: use 1–${QUEUES_MAX}`);
  return v;
}

/** A uid or gid. */
export function uid(field: string, v: number): number {
  if (!Number.isInteger(v) || v < 0 || v >= 2 ** 32 - 1) throw new InvalidArgumentError(field, `${v} is not a user or group id (0–4294967294)`);
  return v;
}

/**
 * A NIC's host-side interface: the derived name (t/v + the id's 12 hex), or
 * for a TAP a name the caller chose. A chosen name must not look like a
 * device of ours (bridges, WireGuard, peering links, ifb, veth far ends) or
 * be the loopback: the planners would treat it as theirs.
 */
export function hostIf(field: string, v: string, nicId: string, kind: "tap" | "veth"): string {
  ifname(field, v);
  const derived = `${kind === "tap" ? "t" : "v"}${nicId.slice(-12)}`;
  if (v === derived) return v;
  if (kind !== "tap") throw new InvalidArgumentError(field, `${V.show(v)} is not this veth NIC's interface (${derived})`);
  if (v === "lo" || /^(br-|wg|pc|mvpc|[tvip][0-9a-f]{12}$)/.test(v))
    throw new InvalidArgumentError(
      field,
      `${V.show(v)} looks like a device microvpc makes (br-…, wg…, pc…, t/v/i/p + 12 hex) or is the loopback; choose another name`,
    );
  return v;
}

/** A DNS search domain ("<vpc-name>.internal"). */
export function domain(field: string, v: string): string {
  if (!DOMAIN_RE.test(v)) throw new InvalidArgumentError(field, `${V.show(v)} is not a DNS domain (lowercase labels of [a-z0-9-] joined by dots)`);
  return v;
}

/** The namespace name of a VPC on a host. */
export function vpcNamespace(hostId: string, vpcId: string): string {
  return `mvpc-${hostId}-${vpcId}`;
}

// ---------------------------------------------------------------------------
// Record parsers: JSON text in, a typed value or the first problem out.

export type Parsed<T> = { ok: true; value: T } | { ok: false; field: string; reason: string };

/** Kinds of record, for the metric and status. */
export type RecordKind = "vpc" | "subnet" | "nic" | "overlay-addr" | "peering";

/** One skipped record, for status and the log. */
export interface InvalidRecord {
  kind: RecordKind;
  /** Redis key, and the hash field within it. */
  key: string;
  field: string;
  reason: string;
}

/** The owning service of a kind of record (the metric's `owner` label). */
export const ownerOf: Record<RecordKind, string> = { vpc: "netagent", subnet: "netagent", nic: "netagent", "overlay-addr": "netagent", peering: "peering" };

/**
 * What the readers of one process skipped: kept per scope ("host",
 * "overlay:<vpc>", "peering") for status, each (key, field, reason) logged
 * and counted once, however many passes see it again.
 */
export class InvalidRecordLog {
  private readonly scopes = new Map<string, InvalidRecord[]>();
  private readonly seen = new Set<string>();

  constructor(readonly log: Logger) {}

  /** Replaces what one scope found on its latest read. */
  report(scope: string, found: InvalidRecord[]): void {
    if (found.length) this.scopes.set(scope, found);
    else this.scopes.delete(scope);
    for (const x of found) {
      const k = `${x.key}\0${x.field}\0${x.reason}`;
      if (this.seen.has(k)) continue;
      if (this.seen.size > 10_000) this.seen.clear();
      this.seen.add(k);
      invalidRecordsTotal.inc({ owner: ownerOf[x.kind], kind: x.kind });
      this.log.warn({ kind: x.kind, key: x.key, field: x.field, reason: x.reason }, "skipping an invalid record from Redis; the rest converges");
    }
  }

  /** Every skipped record now, ordered by key and field. */
  all(): InvalidRecord[] {
    return [...this.scopes.values()].flat().sort((a, b) => a.key.localeCompare(b.key) || a.field.localeCompare(b.field) || a.reason.localeCompare(b.reason));
  }
}

type Obj = Record<string, unknown>;

class Reader {
  constructor(
    readonly o: Obj,
    readonly path = "",
  ) {}
  private f(name: string): string {
    return this.path ? `${this.path}.${name}` : name;
  }
  has(name: string): boolean {
    return this.o[name] !== undefined && this.o[name] !== null;
  }
  str(name: string, max = 256): string {
    const v = this.o[name];
    if (v === undefined || v === null) throw new InvalidArgumentError(this.f(name), "is missing");
    if (typeof v !== "string") throw new InvalidArgumentError(this.f(name), `is ${typeName(v)}, not a string`);
    if (v.length > max) throw new InvalidArgumentError(this.f(name), `is ${v.length} characters long; the limit is ${max}`);
    return v;
  }
  num(name: string): number {
    const v = this.o[name];
    if (v === undefined || v === null) throw new InvalidArgumentError(this.f(name), "is missing");
    if (typeof v !== "number" || !Number.isFinite(v)) throw new InvalidArgumentError(this.f(name), `is ${typeName(v)}, not a number`);
    return v;
  }
  bool(name: string): boolean {
    const v = this.o[name];
    if (typeof v !== "boolean") throw new InvalidArgumentError(this.f(name), v === undefined ? "is missing" : `is ${typeName(v)}, not true or false`);
    return v;
  }
  obj(name: string): Reader {
    const v = this.o[name];
    if (v === undefined || v === null) throw new InvalidArgumentError(this.f(name), "is missing");
    if (typeof v !== "object" || Array.isArray(v)) throw new InvalidArgumentError(this.f(name), `is ${typeName(v)}, not an object`);
    return new Reader(v as Obj, this.f(name));
  }
  strings(name: string, maxItems: number, each: (field: string, v: string) => string): string[] {
    const v = this.o[name];
    if (v === undefined || v === null) throw new InvalidArgumentError(this.f(name), "is missing");
    if (!Array.isArray(v)) throw new InvalidArgumentError(this.f(name), `is ${typeName(v)}, not a list`);
    if (v.length > maxItems) throw new InvalidArgumentError(this.f(name), `has ${v.length} entries; the limit is ${maxItems}`);
    return v.map((x, i) => {
      if (typeof x !== "string") throw new InvalidArgumentError(`${this.f(name)}[${i}]`, `is ${typeName(x)}, not a string`);
      return each(`${this.f(name)}[${i}]`, x);
    });
  }
  /** A timestamp in ms (0 allowed). */
  ms(name: string): number {
    const v = this.num(name);
    if (!Number.isInteger(v) || v < 0 || v > 1e14) throw new InvalidArgumentError(this.f(name), `${v} is not a time in milliseconds`);
    return v;
  }
}

function typeName(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "a list";
  return typeof v === "object" ? "an object" : `a ${typeof v}`;
}

/** Runs a parser body; InvalidArgumentError becomes {field, reason}. */
export function parseWith<T>(raw: string, body: (r: Reader) => T): Parsed<T> {
  let j: unknown;
  try {
    j = JSON.parse(raw);
  } catch {
    return { ok: false, field: "", reason: "record is not JSON" };
  }
  if (typeof j !== "object" || j === null || Array.isArray(j)) return { ok: false, field: "", reason: `record is ${typeName(j)}, not a JSON object` };
  try {
    return { ok: true, value: body(new Reader(j as Obj)) };
  } catch (err) {
    if (err instanceof InvalidArgumentError) return { ok: false, field: err.field, reason: err.message };
    throw err;
  }
}

function keyMatches(field: string, id: string, key: string): void {
  if (id !== key) throw new InvalidArgumentError(field, `${V.show(id)} does not match the record's key ${V.show(key)}`);
}

/** A VPC this host holds. `key` is the hash field the record was stored under. */
export function parseVpcSpec(hostId: string, key: string, raw: string): Parsed<VpcSpec> {
  return parseWith(raw, (r) => {
    const vpcId = V.id("vpcId", r.str("vpcId"), "vpc");
    keyMatches("vpcId", vpcId, key);
    const ns = r.str("ns");
    if (ns !== vpcNamespace(hostId, vpcId))
      throw new InvalidArgumentError("ns", `${V.show(ns)} is not this VPC's namespace on this host (${vpcNamespace(hostId, vpcId)})`);
    if (r.has("peered")) throw new InvalidArgumentError("peered", "is never stored (a peering-only VPC is derived, not written)");
    return { vpcId, ns, createdMs: r.ms("createdMs") };
  });
}

/** The subnet spec of an IPAM subnet: the bridge's gateway is its first address. */
export function subnetSpecOf(s: { id: string; vpcId: string; cidr: string }, mtuValue: number): SubnetSpec {
  const c = V.cidr("cidr", s.cidr, SUBNET_PREFIX);
  return { subnetId: s.id, vpcId: s.vpcId, cidr: c.text, gatewayCidr: `${V.intToIp(c.base + 1)}/${c.prefix}`, mtu: mtuValue };
}

export function parseSubnetSpec(key: string, raw: string): Parsed<SubnetSpec> {
  return parseWith(raw, (r) => {
    const subnetId = V.id("subnetId", r.str("subnetId"), "subnet");
    keyMatches("subnetId", subnetId, key);
    const vpcId = V.id("vpcId", r.str("vpcId"), "vpc");
    const cidr = V.cidr("cidr", r.str("cidr"), SUBNET_PREFIX);
    const gatewayCidr = r.str("gatewayCidr");
    const want = `${V.intToIp(cidr.base + 1)}/${cidr.prefix}`;
    if (gatewayCidr !== want) throw new InvalidArgumentError("gatewayCidr", `${V.show(gatewayCidr)} is not the subnet's gateway (${want})`);
    const spec = { subnetId, vpcId, cidr: cidr.text, gatewayCidr, mtu: mtu("mtu", r.num("mtu")) };
    if (r.str("cidr") !== cidr.text) throw new InvalidArgumentError("cidr", `${V.show(r.str("cidr"))} is not canonical`);
    return spec;
  });
}

function bandwidthOf(r: Reader): Bandwidth {
  const b: Bandwidth = {
    ingressMbps: rateMbps("bandwidth.ingressMbps", r.num("ingressMbps")),
    egressMbps: rateMbps("bandwidth.egressMbps", r.num("egressMbps")),
  };
  if (r.has("ingressBurst")) b.ingressBurst = burstBytes("bandwidth.ingressBurst", r.num("ingressBurst"));
  if (r.has("egressBurst")) b.egressBurst = burstBytes("bandwidth.egressBurst", r.num("egressBurst"));
  return b;
}

/**
 * A NIC of this host. Checks each field alone; `checkNicInSubnet` checks it
 * against its subnet (the address inside, the gateway the subnet's).
 */
export function parseNicSpec(key: string, raw: string): Parsed<NicSpec> {
  return parseWith(raw, (r) => {
    const nicId = V.id("nicId", r.str("nicId"), "nic");
    keyMatches("nicId", nicId, key);
    const kind = r.str("kind");
    if (kind !== "tap" && kind !== "veth") throw new InvalidArgumentError("kind", `${V.show(kind)} is not "tap" or "veth"`);
    const address = r.str("address");
    const addr = V.ipv4("address", address);
    const prefix = r.num("prefix");
    if (!Number.isInteger(prefix) || prefix < SUBNET_PREFIX.min || prefix > SUBNET_PREFIX.max)
      throw new InvalidArgumentError("prefix", `${prefix} is not a subnet prefix (${SUBNET_PREFIX.min}–${SUBNET_PREFIX.max})`);
    const gateway = r.str("gateway");
    const gw = V.ipv4("gateway", gateway);
    const size = 2 ** (32 - prefix);
    if (Math.floor(addr / size) !== Math.floor(gw / size) || addr === gw)
      throw new InvalidArgumentError("gateway", `${gateway} is not another address of ${address}/${prefix}`);
    const hostname = r.str("hostname", 63);
    const spec: NicSpec = {
      nicId,
      owner: V.token("owner", r.str("owner")),
      vpcId: V.id("vpcId", r.str("vpcId"), "vpc"),
      subnetId: V.id("subnetId", r.str("subnetId"), "subnet"),
      kind,
      hostIf: hostIf("hostIf", r.str("hostIf"), nicId, kind),
      mac: r.str("mac"),
      address,
      prefix,
      gateway,
      mtu: mtu("mtu", r.num("mtu")),
      hostname: hostname === "" ? "" : V.name("hostname", hostname),
      guestIf: ifname("guestIf", r.str("guestIf")),
      dns: r.strings("dns", 3, (f, v) => (V.ipv4(f, v), v)),
      bandwidth: bandwidthOf(r.obj("bandwidth")),
      createdMs: r.ms("createdMs"),
      clientToken: V.token("clientToken", r.str("clientToken"), { optional: true }),
    };
    if (V.mac("mac", spec.mac) !== spec.mac) throw new InvalidArgumentError("mac", `${V.show(spec.mac)} is not lowercase`);
    if (r.has("search")) spec.search = r.strings("search", 6, domain);
    if (kind === "tap") {
      if (r.has("veth")) throw new InvalidArgumentError("veth", "is set on a tap NIC");
      const t = r.obj("tap");
      spec.tap = { multiQueue: t.bool("multiQueue"), queues: queues("tap.queues", t.num("queues")) };
      if (t.has("uid")) spec.tap.uid = uid("tap.uid", t.num("uid"));
      if (t.has("gid")) spec.tap.gid = uid("tap.gid", t.num("gid"));
    } else {
      if (r.has("tap")) throw new InvalidArgumentError("tap", "is set on a veth NIC");
      const v = r.obj("veth");
      spec.veth = { netnsPath: netnsPath("veth.netnsPath", v.str("netnsPath")), skipDefaultRoute: v.bool("skipDefaultRoute") };
    }
    return spec;
  });
}

/** Why a NIC does not fit its subnet ("" when it does). */
export function nicSubnetProblem(n: NicSpec, s: SubnetSpec): { field: string; reason: string } | null {
  if (n.vpcId !== s.vpcId) return { field: "vpcId", reason: `vpcId: ${n.vpcId} is not the VPC of subnet ${s.subnetId} (${s.vpcId})` };
  const c = V.cidr("cidr", s.cidr, SUBNET_PREFIX);
  const a = V.ipToInt(n.address);
  if (a <= c.base + 1 || a >= c.base + c.size - 1)
    return { field: "address", reason: `address: ${n.address} is not a host address of subnet ${s.cidr} (network, gateway and broadcast excluded)` };
  if (n.prefix !== c.prefix) return { field: "prefix", reason: `prefix: /${n.prefix} is not the subnet's /${c.prefix}` };
  if (n.gateway !== V.intToIp(c.base + 1)) return { field: "gateway", reason: `gateway: ${n.gateway} is not the subnet's gateway ${V.intToIp(c.base + 1)}` };
  return null;
}

// ---- what other services read of a host (HostReader) ----

export interface HostDesired {
  vpcs: Map<string, VpcSpec>;
  subnets: Map<string, SubnetSpec>;
  nics: Map<string, NicSpec>;
  /** Records skipped because they failed validation (never used). */
  invalid?: InvalidRecord[];
}

/**
 * Overlay keys of a single Redis (NA_KEYS.single; naKeys for the client's
 * layout). `addrs` (NIC address → host id, per VPC) is kept by the NIC
 * scripts of netagent/store.ts; `members` (host id → {"port"}) by each
 * host's overlay; a host's registry record (`host`) carries a lease and
 * disappears with it.
 */
export const overlayKeys = {
  host: NA_KEYS.single.overlayHost,
  hostIndex: NA_KEYS.single.hostIndex,
  members: NA_KEYS.single.overlayMembers,
  addrs: NA_KEYS.single.overlayAddrs,
};

/** The field of an address in the claims, a host's address index and a pending mark: "<vpc>/<address>". */
export const claimField = (vpcId: string, address: string): string => `${vpcId}/${address}`;

/**
 * Where a NIC with this address lives, across every host, or null. The
 * claims are shared (any host's Redis user may write them): a claim counts
 * only where its host's own index and record say so (claimHolder).
 */
export async function locateNic(redis: Redis, vpcId: string, address: string): Promise<{ hostId: string; nicId: string } | null> {
  const field = claimField(vpcId, address);
  return parseClaim(await claimHolder(redis, await redis.hget(naKeys(redis).claims(vpcId), field), field));
}

/**
 * The NIC that holds the address `field` ("<vpc>/<address>") on the host a
 * claim names: "<host>/<nic>" when that host's own index lists a NIC there
 * and its record exists (the NIC the claim names, or a later one of that
 * host), else "" (a stale, forged or malformed claim holds nothing).
 */
export async function claimHolder(redis: Redis, claim: string | null, field: string): Promise<string> {
  const c = parseClaim(claim);
  if (!c) return "";
  const k = naKeys(redis);
  const nicId = await redis.hget(k.nicaddr(c.hostId), field);
  if (!nicId || !/^nic-[0-9a-f]{12}$/.test(nicId)) return "";
  return (await redis.hexists(k.nics(c.hostId), nicId)) === 1 ? `${c.hostId}/${nicId}` : "";
}

/** An address claim's value, "<host>/<nic>" (written by the NIC's host; anything else is no location). */
export function parseClaim(v: string | null | undefined): { hostId: string; nicId: string } | null {
  if (!v) return null;
  const [hostId, nicId, ...rest] = v.split("/");
  if (rest.length || !/^[a-z0-9-]{1,63}$/.test(hostId) || !/^nic-[0-9a-f]{12}$/.test(nicId ?? "")) return null;
  return { hostId, nicId };
}

/** Remembers the last parse of each field's raw text (the result of a pure parser). */
class ParseMemo<T> {
  private last = new Map<string, { raw: string; p: Parsed<T> }>();
  private next?: Map<string, { raw: string; p: Parsed<T> }>;

  /** A parser for one load; the fields it sees replace the memo at the next load (a deleted record's entry goes). */
  parse(fn: (field: string, raw: string) => Parsed<T>): (field: string, raw: string) => Parsed<T> {
    if (this.next) this.last = this.next;
    const next = new Map<string, { raw: string; p: Parsed<T> }>();
    this.next = next;
    return (field, raw) => {
      const hit = this.last.get(field);
      // Shared between loads, so frozen: a reader that changed one would change the next load's too.
      const p = hit && hit.raw === raw ? hit.p : fn(field, raw);
      if (p.ok) Object.freeze(p.value);
      next.set(field, { raw, p });
      return p;
    };
  }
}

/**
 * One host's desired state as every reader sees it: the firewall and the
 * gateway load it each pass; the netagent's HostStore adds the writes.
 * Every record is parsed on read (a bad one is left out and reported).
 */
export class HostReader {
  /** The layout of this client's Redis. */
  readonly keys: NetagentKeys;

  constructor(
    readonly redis: Redis,
    readonly hostId: string,
  ) {
    this.keys = naKeys(redis);
  }

  async load(): Promise<HostDesired> {
    // One transaction (the keys share the host's slot on a cluster): the NICs and which of them are pending, at one moment.
    const pendingKey = this.keys.nicPending(this.hostId);
    const m = this.redis.multi().hgetall(this.keys.vpcs(this.hostId)).hgetall(this.keys.subnets(this.hostId)).hgetall(this.keys.nics(this.hostId));
    if (pendingKey) m.hkeys(pendingKey);
    const res = (await m.exec()) ?? [];
    for (const [err] of res) if (err) throw err;
    const [v, s, n, pending] = res.map(([, r]) => r) as [Record<string, string>, Record<string, string>, Record<string, string>, string[] | undefined];
    // Redis Cluster: a NIC whose AttachNic has not confirmed its address claim is not there yet (HostStore.discardPending).
    for (const id of pending ?? []) delete n[id];
    const invalid: InvalidRecord[] = [];
    const parse = <T>(kind: InvalidRecord["kind"], k: string, h: Record<string, string>, fn: (field: string, raw: string) => Parsed<T>) => {
      const out = new Map<string, T>();
      for (const [field, raw] of Object.entries(h)) {
        const p = fn(field, raw);
        if (p.ok) out.set(field, p.value);
        else invalid.push({ kind, key: k, field, reason: p.reason });
      }
      return out;
    };
    const vpcs = parse(
      "vpc",
      this.keys.vpcs(this.hostId),
      v,
      this.memo.vpcs.parse((f, raw) => parseVpcSpec(this.hostId, f, raw)),
    );
    const subnets = parse("subnet", this.keys.subnets(this.hostId), s, this.memo.subnets.parse(parseSubnetSpec));
    const nics = parse("nic", this.keys.nics(this.hostId), n, this.memo.nics.parse(parseNicSpec));
    // Across records: a NIC must fit its subnet, and two NICs of a VPC
    // cannot share a device or an address (the first by id wins).
    const seen = new Set<string>();
    for (const id of [...nics.keys()].sort()) {
      const nic = nics.get(id)!;
      const sn = subnets.get(nic.subnetId);
      const bad = sn ? nicSubnetProblem(nic, sn) : null;
      let reason = bad?.reason ?? "";
      if (!reason && (seen.has(`${nic.vpcId}/if/${nic.hostIf}`) || seen.has(`${nic.vpcId}/ip/${nic.address}`)))
        reason = `hostIf/address: ${nic.hostIf} or ${nic.address} is already used by another NIC of ${nic.vpcId} on this host`;
      if (reason) {
        nics.delete(id);
        invalid.push({ kind: "nic", key: this.keys.nics(this.hostId), field: id, reason });
        continue;
      }
      seen.add(`${nic.vpcId}/if/${nic.hostIf}`);
      seen.add(`${nic.vpcId}/ip/${nic.address}`);
    }
    // A record that turned invalid keeps the last valid value this reader
    // saw: a corrupt (or hostile) write costs no VM its network, no firewall
    // its rules, and nothing of the bad record is used.
    for (const x of invalid) {
      const [now, last] =
        x.kind === "vpc" ? [vpcs, this.lastValid.vpcs] : x.kind === "subnet" ? [subnets, this.lastValid.subnets] : [nics, this.lastValid.nics];
      const prev = (last as Map<string, unknown>).get(x.field);
      if (prev && !now.has(x.field)) (now as Map<string, unknown>).set(x.field, prev);
    }
    this.lastValid = { vpcs: new Map(vpcs), subnets: new Map(subnets), nics: new Map(nics) };
    return { vpcs, subnets, nics, invalid };
  }

  /**
   * Parsing is pure: a record whose raw text did not change since the last
   * load is not parsed and checked again (at 1 000 NICs, every pass of the
   * firewall, gateway and netagent loads them all).
   */
  private readonly memo = { vpcs: new ParseMemo<VpcSpec>(), subnets: new ParseMemo<SubnetSpec>(), nics: new ParseMemo<NicSpec>() };

  /** The valid records this store last read or wrote (kept for records that later turn invalid). */
  protected lastValid: { vpcs: Map<string, VpcSpec>; subnets: Map<string, SubnetSpec>; nics: Map<string, NicSpec> } = {
    vpcs: new Map(),
    subnets: new Map(),
    nics: new Map(),
  };

  /** Read now from Redis: a pass's snapshot may predate an EnsureVpc that just finished. */
  async hasVpc(vpcId: string): Promise<boolean> {
    return (await this.redis.hexists(this.keys.vpcs(this.hostId), vpcId)) === 1;
  }

  /** A NIC's record, or null if there is none or it is pending (a cluster's AttachNic not confirmed: load() leaves it out too). */
  private async rawNic(nicId: string): Promise<string | null> {
    const pendingKey = this.keys.nicPending(this.hostId);
    const [j, pending] = await Promise.all([this.redis.hget(this.keys.nics(this.hostId), nicId), pendingKey ? this.redis.hexists(pendingKey, nicId) : 0]);
    return pending ? null : j;
  }

  /** One NIC's record as load() would read it alone: absent, invalid (not used), or the NIC. */
  async nicRecord(nicId: string): Promise<{ nic: NicSpec } | "absent" | "invalid"> {
    const j = await this.rawNic(nicId);
    if (j === null) return "absent";
    const p = parseNicSpec(nicId, j);
    return p.ok ? { nic: p.value } : "invalid";
  }

  async getNic(nicId: string): Promise<NicSpec | null> {
    const j = await this.rawNic(nicId);
    if (!j) return null;
    // An invalid record is treated as absent (load() reports it).
    const p = parseNicSpec(nicId, j);
    return p.ok ? p.value : null;
  }
}
