// The peering record (hash mvpc:pcx:<id>) and its one set of rules, shared by
// the API (service.ts), the writer (store.ts) and every reader (the ipam
// daemon's Get/List, each netagent's peering loop). A record read back is
// input: its VPC ids name namespaces and its CIDRs become routes, nft sets and
// WireGuard allowed-ips on every host of either VPC, so a record failing any
// rule is skipped (and reported) rather than used.
//
// Keys (all "mvpc:"):
//   pcx:<id>            hash of the peering
//   pcx:byname          name → id
//   pcxs                names (sorted set, for listing in name order)
//   pcx:bypair          "<lower vpc id>|<higher vpc id>" → id
//   vpc:<vpc>:peerings  set of peering ids of a VPC (read by every netagent)
//   pcx:<id>:acks       host id → create time of the peering it applied (legacy, read only)
//   mvpc:host:<host>:pcxacks   (mvpc:{host:<host>}:pcxacks on a Redis Cluster)
//                              peering id → create time: what that host applied; written
//                              by its netagent under its own Redis user (docs/redis-acl.md)
import { InvalidArgumentError } from "../common/errors.js";
import { isId } from "../common/ids.js";
import * as V from "../common/validate.js";
import { NO_STALE_HOLDS, staleHolds, type StaleHolds } from "../common/pending.js";
import type { Redis } from "ioredis";
import { K } from "../ipam/schema.js";

export interface PeeringRec {
  id: string;
  name: string;
  vpc1Id: string;
  vpc2Id: string;
  /** The two VPCs' CIDRs (a VPC's CIDR never changes). */
  vpc1Cidr: string;
  vpc2Cidr: string;
  /** Allowed CIDRs of each side; empty = the whole VPC. */
  vpc1Allowed: string[];
  vpc2Allowed: string[];
  description: string;
  labels: { key: string; value: string }[];
  createdMs: number;
}

export const PK = {
  pcx: (id: string) => `mvpc:pcx:${id}`,
  byName: "mvpc:pcx:byname",
  names: "mvpc:pcxs",
  byPair: "mvpc:pcx:bypair",
  vpcPeerings: K.vpcPeerings,
  /** Legacy (before per-host Redis users): host id → create time; still read, no longer written. */
  acks: (id: string) => `mvpc:pcx:${id}:acks`,
  /** A host's own acks: peering id → create time of the peering it applied (host-scoped: only that host writes it). */
  hostAcks: (hostId: string) => `mvpc:host:${hostId}:pcxacks`,
};

/**
 * Where peerings live: PEERING_KEYS.single (PK's names) or .cluster, by the
 * client (peeringKeys). On a Redis Cluster the records and their name, pair
 * and client-token indexes share one slot ("{peerings}"), and each VPC lists
 * its peerings in its own slot ("{<vpc>}:peers", beside IPAM's record of
 * it) as a hash id → the peer's range ({base, size, ms}), so that the check
 * that a VPC's peers do not overlap runs there: a create reserves both sides
 * first, then claims the name and pair with the record (the commit point;
 * store.ts). A single Redis keeps PK: one script does all of it.
 */
export interface PeeringKeys {
  pcx(id: string): string;
  byName: string;
  names: string;
  byPair: string;
  tokens: string;
  /** A VPC's peerings: a set of ids (single Redis) or a hash id → reserved peer range (cluster). */
  peers(vpc: string): string;
  /** A host's own acks (PK.hostAcks; on a cluster under the host's tag, with its other records). */
  hostAcks(hostId: string): string;
  cluster: boolean;
}

export const PEERING_KEYS: { single: PeeringKeys; cluster: PeeringKeys } = {
  single: {
    pcx: PK.pcx,
    byName: PK.byName,
    names: PK.names,
    byPair: PK.byPair,
    tokens: K.tokens,
    peers: PK.vpcPeerings,
    hostAcks: PK.hostAcks,
    cluster: false,
  },
  cluster: {
    pcx: (id) => `mvpc:{peerings}:pcx:${id}`,
    byName: "mvpc:{peerings}:byname",
    names: "mvpc:{peerings}:names",
    byPair: "mvpc:{peerings}:bypair",
    tokens: "mvpc:{peerings}:tokens",
    peers: (vpc) => `mvpc:{${vpc}}:peers`,
    hostAcks: (h) => `mvpc:{host:${h}}:pcxacks`,
    cluster: true,
  },
};

/** The peering keys of the Redis `redis` is. */
export function peeringKeys(redis: Redis): PeeringKeys {
  return redis.isCluster ? PEERING_KEYS.cluster : PEERING_KEYS.single;
}

/** The peering ids a VPC lists (on a cluster also reservations of creates under way or stopped: a reader keeps those whose record exists). */
export async function peeringIdsOf(redis: Redis, vpcId: string): Promise<string[]> {
  const L = peeringKeys(redis);
  return L.cluster ? redis.hkeys(L.peers(vpcId)) : redis.smembers(L.peers(vpcId));
}

// A VPC's reservations are holds (common/pending.ts): a create that stopped
// between its steps leaves one without a record, swept once PENDING_MS old.
export { LUA_SWEEP, PENDING_MS } from "../common/pending.js";

/** On a cluster, a VPC's reservations whose peering has no record (the candidates the sweep removes if old). */
export async function staleReservations(redis: Redis, vpc: string): Promise<StaleHolds> {
  const L = peeringKeys(redis);
  if (!L.cluster) return NO_STALE_HOLDS;
  return staleHolds(redis, L.peers(vpc), "pcx", L.pcx, {
    what: `the peerings of VPC ${vpc}`,
    // Its entries list the VPC's peerings: removing it would hide them, and let overlapping ones in.
    repair: `rebuild that key from the peering records naming the VPC (a hash: peering id → {"base", "size", "ms"} of its peer's range; docs/redis-schema.md)`,
  });
}

export function pairKey(a: string, b: string): string {
  return a < b ? `${a}|${b}` : `${b}|${a}`;
}

export const MAX_ALLOWED = 64;
/** VPC CIDRs IPAM creates (services/ipam/service.ts: CreateVpc). */
const VPC_PREFIX = { min: 8, max: 28 };

/** Allowed CIDRs of one side: each inside the VPC, no duplicates; sorted. */
export function allowedCidrs(field: string, values: string[], vpc: { name: string; cidr: string }): string[] {
  if (values.length > MAX_ALLOWED) throw new InvalidArgumentError(field, `has ${values.length} CIDRs; the limit is ${MAX_ALLOWED}`);
  const outer = V.cidr("vpc", vpc.cidr, { min: 0, max: 32 });
  const out = new Set<string>();
  for (const [i, text] of values.entries()) {
    const c = V.cidr(`${field}[${i}]`, text, { min: 8, max: 32 });
    if (!V.contains(outer, c)) throw new InvalidArgumentError(`${field}[${i}]`, `${c.text} is not inside VPC ${vpc.name} (${vpc.cidr})`);
    out.add(c.text);
  }
  return [...out].sort();
}

export type ParsedPeering = { ok: true; value: PeeringRec } | { ok: false; field: string; reason: string };

function jsonField(field: string, raw: string | undefined, fallback: string): unknown {
  try {
    return JSON.parse(raw ?? fallback);
  } catch {
    throw new InvalidArgumentError(field, "is not JSON");
  }
}

function stringList(field: string, v: unknown): string[] {
  if (!Array.isArray(v) || v.some((x) => typeof x !== "string")) throw new InvalidArgumentError(field, "is not a list of strings");
  return v as string[];
}

/**
 * Parses the hash of mvpc:pcx:<key>. Empty hash = no peering (null value
 * is left to the caller: returns ok:false with field "").
 */
export function parsePeeringRecord(key: string, h: Record<string, string>): ParsedPeering {
  try {
    const id = V.id("id", h.id ?? "", "pcx");
    if (id !== key) throw new InvalidArgumentError("id", `${V.show(id)} does not match the record's key ${V.show(key)}`);
    const vpc1Id = V.id("vpc1", h.vpc1 ?? "", "vpc");
    const vpc2Id = V.id("vpc2", h.vpc2 ?? "", "vpc");
    if (vpc1Id === vpc2Id) throw new InvalidArgumentError("vpc2", "is the same VPC as vpc1");
    const c1 = V.cidr("cidr1", h.cidr1 ?? "", VPC_PREFIX);
    const c2 = V.cidr("cidr2", h.cidr2 ?? "", VPC_PREFIX);
    if (c1.text !== h.cidr1) throw new InvalidArgumentError("cidr1", `${V.show(h.cidr1)} is not canonical`);
    if (c2.text !== h.cidr2) throw new InvalidArgumentError("cidr2", `${V.show(h.cidr2)} is not canonical`);
    if (V.overlaps(c1, c2)) throw new InvalidArgumentError("cidr2", `${c2.text} overlaps cidr1 ${c1.text}`);
    const a1 = stringList("allowed1", jsonField("allowed1", h.allowed1, "[]"));
    const a2 = stringList("allowed2", jsonField("allowed2", h.allowed2, "[]"));
    const vpc1Allowed = allowedCidrs("allowed1", a1, { name: vpc1Id, cidr: c1.text });
    const vpc2Allowed = allowedCidrs("allowed2", a2, { name: vpc2Id, cidr: c2.text });
    if (vpc1Allowed.join(",") !== a1.join(",")) throw new InvalidArgumentError("allowed1", "is not canonical (sorted, no duplicates)");
    if (vpc2Allowed.join(",") !== a2.join(",")) throw new InvalidArgumentError("allowed2", "is not canonical (sorted, no duplicates)");
    const labelsRaw = jsonField("labels", h.labels, "[]");
    if (
      !Array.isArray(labelsRaw) ||
      labelsRaw.some(
        (l) => typeof l !== "object" || l === null || typeof (l as { key?: unknown }).key !== "string" || typeof (l as { value?: unknown }).value !== "string",
      )
    ) {
      throw new InvalidArgumentError("labels", "is not a list of {key, value} strings");
    }
    const labels = V.labels(
      "labels",
      (labelsRaw as { key: string; value: string }[]).map((l) => ({ key: l.key, value: l.value })),
    );
    const created = Number(h.created);
    if (!/^[0-9]{1,15}$/.test(h.created ?? "") || !Number.isSafeInteger(created))
      throw new InvalidArgumentError("created", `${V.show(h.created ?? "")} is not a time in milliseconds`);
    return {
      ok: true,
      value: {
        id,
        name: V.name("name", h.name ?? ""),
        vpc1Id,
        vpc2Id,
        vpc1Cidr: c1.text,
        vpc2Cidr: c2.text,
        vpc1Allowed,
        vpc2Allowed,
        description: V.text("description", h.description ?? ""),
        labels,
        createdMs: created,
      },
    };
  } catch (err) {
    if (err instanceof InvalidArgumentError) return { ok: false, field: err.field, reason: err.message };
    throw err;
  }
}

/**
 * A peering hash as read from Redis, checked by schema.ts; null when absent
 * or invalid (onInvalid hears why: readers log, count and show it).
 */
export function parsePeering(h: Record<string, string>, key = h.id ?? "", onInvalid?: (field: string, reason: string) => void): PeeringRec | null {
  if (Object.keys(h).length === 0) return null;
  const p = parsePeeringRecord(key, h);
  if (p.ok) return p.value;
  onInvalid?.(p.field, p.reason);
  return null;
}

/** The peerings of some VPCs (what a netagent reads for the VPCs it holds). */
export async function peeringsOf(redis: Redis, vpcIds: string[], onInvalid?: (id: string, reason: string) => void): Promise<PeeringRec[]> {
  if (vpcIds.length === 0) return [];
  const L = peeringKeys(redis);
  const sets = await Promise.all(vpcIds.map((v) => peeringIdsOf(redis, v)));
  // Read back from Redis, an entry names a key only if it is a peering id.
  const ids = [...new Set(sets.flat())].filter((id) => isId("pcx", id)).sort();
  const recs = await Promise.all(ids.map((id) => redis.hgetall(L.pcx(id))));
  return (
    recs
      .map((h, i) => parsePeering(h, ids[i], (_, reason) => onInvalid?.(ids[i], reason)))
      // A peering must concern a VPC whose set listed it.
      .filter((p): p is PeeringRec => !!p && (vpcIds.includes(p.vpc1Id) || vpcIds.includes(p.vpc2Id)))
  );
}

/**
 * A netagent says it applied the peering (its create time tells one peering
 * of a pair from a later one), in its own host's key: with per-host Redis
 * users a host may write nothing shared for this.
 */
export async function ackPeering(redis: Redis, p: PeeringRec, hostId: string): Promise<void> {
  const L = peeringKeys(redis);
  const key = L.hostAcks(hostId);
  if ((await redis.hget(key, p.id)) === String(p.createdMs)) return;
  if (L.cluster) {
    // The record is in another slot: checked first, then written (an ack
    // that lands just after a delete is pruned by the host's next pass).
    if (await redis.exists(L.pcx(p.id))) await redis.hset(key, p.id, String(p.createdMs));
    return;
  }
  // Only while the peering exists: a late ack must not outlive it.
  // The peering's key is named in ARGV, not KEYS: Redis ACL takes declared
  // keys as read-write, and a host may only read the peering.
  await redis.eval(
    "if redis.call('EXISTS', ARGV[3]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end return 0",
    1,
    key,
    p.id,
    String(p.createdMs),
    peeringKeys(redis).pcx(p.id),
  );
}

/** Drops a host's acks of peerings it no longer has (deleted ones): keeps its key from growing. */
export async function pruneAcks(redis: Redis, hostId: string, current: ReadonlySet<string>): Promise<void> {
  const key = peeringKeys(redis).hostAcks(hostId);
  const stale = (await redis.hkeys(key)).filter((id) => !current.has(id));
  if (stale.length) await redis.hdel(key, ...stale);
}
