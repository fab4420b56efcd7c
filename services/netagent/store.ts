// Desired state of one hypervisor, in Redis: which VPCs, subnets and NICs it
// should have. Written before the kernel is touched, so an agent that dies
// half-way finds the intent on restart and finishes (or undoes) it.
//
// Every record is parsed on read by schema.ts (the rules the API applies to
// requests): a bad one is left out of the desired state and reported in
// `invalid`, the rest is used. The writer checks with the same parsers.
import type { Redis } from "ioredis";
import { InvalidArgumentError } from "../common/errors.js";
import type { NicSpec, SubnetSpec } from "./plan.js";
import { hostKeys, nicSubnetProblem, parseNicSpec, parseSubnetSpec, parseVpcSpec, type InvalidRecord, type Parsed, type VpcSpec } from "./schema.js";

export type { VpcSpec } from "./schema.js";

export interface HostDesired {
  vpcs: Map<string, VpcSpec>;
  subnets: Map<string, SubnetSpec>;
  nics: Map<string, NicSpec>;
  /** Records skipped because they failed validation (never used). */
  invalid?: InvalidRecord[];
}

const key = (host: string, what: "vpcs" | "subnets" | "nics" | "nicaddr" | "nictoken") => hostKeys[what](host);

/** The writer's check: what it stores must read back. */
function mustParse<T>(what: string, p: Parsed<T>): void {
  if (!p.ok) throw new InvalidArgumentError(p.field || what, `refusing to store an invalid ${what} record: ${p.reason}`);
}

// Adds a NIC unless its address is taken in that VPC on this host or on
// any other, or its client token was used: {1, id} added, {0, id} token
// seen, {-1, id} address held by that NIC of this host, {-2, "host/nic"}
// address held by a live NIC of another host. The address is unique per VPC
// across hosts: after a release and a reallocation, a second host cannot
// attach a VPC address a NIC elsewhere still holds. The global index
// (mvpc:nicaddr) only names the holder; it counts when the holder's own
// host index and NIC record agree (a stale or forged entry blocks nobody).
const ADD_NIC = `
local tok = ARGV[3]
if tok ~= '' then
  local prev = redis.call('HGET', KEYS[3], tok)
  if prev and redis.call('HEXISTS', KEYS[1], prev) == 1 then return {0, prev} end
end
local holder = redis.call('HGET', KEYS[2], ARGV[2])
if holder and redis.call('HEXISTS', KEYS[1], holder) == 1 then return {-1, holder} end
local g = redis.call('HGET', 'mvpc:nicaddr', ARGV[2])
if g then
  local gh, gn = string.match(g, '^([a-z0-9-]+)/(nic%-[0-9a-f]+)$')
  if gh and gh ~= ARGV[5] and redis.call('HGET', 'mvpc:host:' .. gh .. ':nicaddr', ARGV[2]) == gn
    and redis.call('HEXISTS', 'mvpc:host:' .. gh .. ':nics', gn) == 1 then
    return {-2, g}
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
if tok ~= '' then redis.call('HSET', KEYS[3], tok, ARGV[1]) end
redis.call('HSET', 'mvpc:nicaddr', ARGV[2], ARGV[5] .. '/' .. ARGV[1])
local vpc, addr = string.match(ARGV[2], '^([^/]+)/(.+)$')
if vpc then redis.call('HSET', 'mvpc:overlay:' .. vpc .. ':addrs', addr, ARGV[5]) end
redis.call('XADD', 'mvpc:events', 'MAXLEN', '~', 100000, '*', 'kind', 'nic.attached', 'host', ARGV[5], 'nic', ARGV[1], 'vpc', vpc or '')
return {1, ARGV[1]}
`;

/**
 * Overlay keys. `addrs` (NIC address → host id, per VPC) is kept by the NIC
 * scripts above; `members` (host id → {"port"}) by each host's overlay; a
 * host's registry record (`host`) carries a lease and disappears with it.
 */
export const overlayKeys = {
  host: (hostId: string) => `mvpc:hosts:${hostId}`,
  hostIndex: "mvpc:hostindex",
  members: (vpcId: string) => `mvpc:overlay:${vpcId}:members`,
  addrs: (vpcId: string) => `mvpc:overlay:${vpcId}:addrs`,
};

/** Where a NIC with this address lives, across every host: "host/nic-…", or null. */
export async function locateNic(redis: Redis, vpcId: string, address: string): Promise<{ hostId: string; nicId: string } | null> {
  const v = await redis.hget("mvpc:nicaddr", `${vpcId}/${address}`);
  if (!v) return null;
  const [hostId, nicId, ...rest] = v.split("/");
  // Written by the NIC's host; anything else is no location.
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

export class HostStore {
  constructor(
    readonly redis: Redis,
    readonly hostId: string,
  ) {
    if (!(redis as unknown as { mvpcAddNic?: unknown }).mvpcAddNic) redis.defineCommand("mvpcAddNic", { numberOfKeys: 3, lua: ADD_NIC });
  }

  async load(): Promise<HostDesired> {
    const [v, s, n] = await Promise.all([
      this.redis.hgetall(key(this.hostId, "vpcs")),
      this.redis.hgetall(key(this.hostId, "subnets")),
      this.redis.hgetall(key(this.hostId, "nics")),
    ]);
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
      key(this.hostId, "vpcs"),
      v,
      this.memo.vpcs.parse((f, raw) => parseVpcSpec(this.hostId, f, raw)),
    );
    const subnets = parse("subnet", key(this.hostId, "subnets"), s, this.memo.subnets.parse(parseSubnetSpec));
    const nics = parse("nic", key(this.hostId, "nics"), n, this.memo.nics.parse(parseNicSpec));
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
        invalid.push({ kind: "nic", key: key(this.hostId, "nics"), field: id, reason });
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
  private lastValid: { vpcs: Map<string, VpcSpec>; subnets: Map<string, SubnetSpec>; nics: Map<string, NicSpec> } = {
    vpcs: new Map(),
    subnets: new Map(),
    nics: new Map(),
  };

  /** Read now from Redis: a pass's snapshot may predate an EnsureVpc that just finished. */
  async hasVpc(vpcId: string): Promise<boolean> {
    return (await this.redis.hexists(key(this.hostId, "vpcs"), vpcId)) === 1;
  }

  async putVpc(v: VpcSpec): Promise<void> {
    mustParse("vpc", parseVpcSpec(this.hostId, v.vpcId, JSON.stringify(v)));
    await this.redis.hset(key(this.hostId, "vpcs"), v.vpcId, JSON.stringify(v));
    this.lastValid.vpcs.set(v.vpcId, v);
  }

  async delVpc(vpcId: string): Promise<void> {
    await this.redis.hdel(key(this.hostId, "vpcs"), vpcId);
    this.lastValid.vpcs.delete(vpcId);
  }

  async putSubnet(s: SubnetSpec): Promise<void> {
    mustParse("subnet", parseSubnetSpec(s.subnetId, JSON.stringify(s)));
    await this.redis.hset(key(this.hostId, "subnets"), s.subnetId, JSON.stringify(s));
    this.lastValid.subnets.set(s.subnetId, s);
  }

  async delSubnet(subnetId: string): Promise<void> {
    await this.redis.hdel(key(this.hostId, "subnets"), subnetId);
    this.lastValid.subnets.delete(subnetId);
  }

  /** Adds a NIC atomically with its address claim. */
  async addNic(n: NicSpec): Promise<{ code: number; id: string }> {
    mustParse("nic", parseNicSpec(n.nicId, JSON.stringify(n)));
    const r = (await (this.redis as unknown as { mvpcAddNic: (...a: string[]) => Promise<[number, string]> }).mvpcAddNic(
      key(this.hostId, "nics"),
      key(this.hostId, "nicaddr"),
      key(this.hostId, "nictoken"),
      n.nicId,
      `${n.vpcId}/${n.address}`,
      n.clientToken,
      JSON.stringify(n),
      this.hostId,
    )) as [number, string];
    if (r[0] === 1) this.lastValid.nics.set(n.nicId, n);
    return { code: r[0], id: r[1] };
  }

  async putNic(n: NicSpec): Promise<void> {
    mustParse("nic", parseNicSpec(n.nicId, JSON.stringify(n)));
    await this.redis.hset(key(this.hostId, "nics"), n.nicId, JSON.stringify(n));
    this.lastValid.nics.set(n.nicId, n);
  }

  async getNic(nicId: string): Promise<NicSpec | null> {
    const j = await this.redis.hget(key(this.hostId, "nics"), nicId);
    if (!j) return null;
    // An invalid record is treated as absent (load() reports it).
    const p = parseNicSpec(nicId, j);
    return p.ok ? p.value : null;
  }

  async delNic(n: NicSpec): Promise<void> {
    this.lastValid.nics.delete(n.nicId);
    await this.redis
      .multi()
      .hdel(key(this.hostId, "nics"), n.nicId)
      .eval(
        "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[3] then redis.call('HDEL', KEYS[2], ARGV[1]) end if redis.call('HGET', KEYS[3], ARGV[4]) == ARGV[5] then redis.call('HDEL', KEYS[3], ARGV[4]) end return 0",
        3,
        key(this.hostId, "nicaddr"),
        "mvpc:nicaddr",
        overlayKeys.addrs(n.vpcId),
        `${n.vpcId}/${n.address}`,
        n.nicId,
        `${this.hostId}/${n.nicId}`,
        n.address,
        this.hostId,
      )
      .xadd("mvpc:events", "MAXLEN", "~", "100000", "*", "kind", "nic.detached", "host", this.hostId, "nic", n.nicId, "vpc", n.vpcId)
      .exec();
  }
}
