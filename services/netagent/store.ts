// Desired state of one hypervisor, in Redis: which VPCs, subnets and NICs it
// should have. Written before the kernel is touched, so an agent that dies
// half-way finds the intent on restart and finishes (or undoes) it.
//
// Every record is parsed on read by schema.ts (the rules the API applies to
// requests): a bad one is left out of the desired state and reported in
// `invalid`, the rest is used. The writer checks with the same parsers.
import type { Redis } from "ioredis";
import { InvalidArgumentError, UnavailableError } from "../common/errors.js";
import { emit, EVENTS, hostEvents, LUA_EMIT, SCOPED_MAXLEN, vpcEvents } from "../common/events.js";
import type { NicSpec, SubnetSpec } from "./plan.js";
import { HostReader, parseClaim, parseNicSpec, parseSubnetSpec, parseVpcSpec, type Parsed, type VpcSpec } from "./schema.js";

export { HostReader, locateNic, NA_KEYS, naKeys, overlayKeys, type NetagentKeys } from "./schema.js";
export type { HostDesired, VpcSpec } from "./schema.js";

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
// A single Redis only: it reads another host's keys, named from data. A
// Redis Cluster runs the same rules in steps (HostStore.addNicInSteps).
const ADD_NIC = `${LUA_EMIT}
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
mvpc_emit({vpc}, {ARGV[5]}, 'kind', 'nic.attached', 'host', ARGV[5], 'nic', ARGV[1], 'vpc', vpc or '')
return {1, ARGV[1]}
`;

// ---- a Redis Cluster: AttachNic's address claim in one-slot steps ----
//
// 1. CLAIM, in the VPC's slot: the claim "<vpc>/<address>" → "<host>/<nic>"
//    is written, stamped with the slot's clock, unless another host's entry
//    is there: then {-3, entry, stamp} and the client reads that host's own
//    index and NIC record (what ADD_NIC reads in Lua). A live holder refuses
//    (-2); a stale or forged entry is replaced by CLAIM again, given the
//    entry and stamp it checked (compare-and-set: if the holder confirmed
//    in between, the stamp changed and the client looks again).
// 2. HOST, in the host's slot: the client token and the host's own index,
//    then the record, as ADD_NIC's first half.
// 3. CONFIRM, in the VPC's slot: the claim still names this host, so no
//    other host replaced it since step 1: it is stamped again (a replacer
//    that checked before this host's record existed now fails its CAS), and
//    the overlay's nomination written. Otherwise the host's record is
//    removed again (UNDO_HOST) and the call answers as for a live holder.
// The entry of this host's own other NIC (same host) is replaced in step
// 1: the host's index decides in step 2, and a refusal there puts the entry
// back (RESTORE).
const CLAIM = `
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and cur ~= ARGV[2] and string.sub(cur, 1, #ARGV[5] + 1) ~= ARGV[5] .. '/' then
  local at = redis.call('HGET', KEYS[2], ARGV[1]) or ''
  if cur ~= ARGV[3] or at ~= ARGV[4] then return {-3, cur, at} end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], tostring(now))
return {1, cur or '', ''}
`;

const HOST = `
local tok = ARGV[3]
if tok ~= '' then
  local prev = redis.call('HGET', KEYS[3], tok)
  if prev and redis.call('HEXISTS', KEYS[1], prev) == 1 then return {0, prev} end
end
local holder = redis.call('HGET', KEYS[2], ARGV[2])
if holder and redis.call('HEXISTS', KEYS[1], holder) == 1 then return {-1, holder} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
if tok ~= '' then redis.call('HSET', KEYS[3], tok, ARGV[1]) end
return {1, ARGV[1]}
`;

const CONFIRM = `
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur ~= ARGV[2] and (not cur or string.sub(cur, 1, #ARGV[3] + 1) ~= ARGV[3] .. '/') then return {-2, cur or ''} end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], tostring(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)))
redis.call('HSET', KEYS[3], ARGV[4], ARGV[3])
return {1, ARGV[2]}
`;

const UNDO_HOST = `
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end
if redis.call('HGET', KEYS[2], ARGV[3]) == ARGV[1] then redis.call('HDEL', KEYS[2], ARGV[3]) end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[3], ARGV[4]) == ARGV[1] then redis.call('HDEL', KEYS[3], ARGV[4]) end
return 0
`;

/** Puts back (RESTORE) or drops (ARGV[3] = '') a claim if it still names ARGV[2]; and the overlay's nomination if it still names the host. */
const UNCLAIM = `
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) redis.call('HDEL', KEYS[2], ARGV[1])
  else redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[3], ARGV[4]) == ARGV[5] then redis.call('HDEL', KEYS[3], ARGV[4]) end
return 0
`;

/** How often AttachNic on a cluster replaces a stale claim before it gives up (each replacement is raced by a confirm). */
const CLAIM_ATTEMPTS = 5;

/** The netagent's store: the reads of HostReader (schema.ts) and every write, each checked by the parser that reads it back. */
export class HostStore extends HostReader {
  constructor(redis: Redis, hostId: string) {
    super(redis, hostId);
    if (!(redis as unknown as { mvpcAddNic?: unknown }).mvpcAddNic) redis.defineCommand("mvpcAddNic", { numberOfKeys: 3, lua: ADD_NIC });
  }

  async putVpc(v: VpcSpec): Promise<void> {
    mustParse("vpc", parseVpcSpec(this.hostId, v.vpcId, JSON.stringify(v)));
    await this.redis.hset(this.keys.vpcs(this.hostId), v.vpcId, JSON.stringify(v));
    this.lastValid.vpcs.set(v.vpcId, v);
  }

  async delVpc(vpcId: string): Promise<void> {
    await this.redis.hdel(this.keys.vpcs(this.hostId), vpcId);
    this.lastValid.vpcs.delete(vpcId);
  }

  async putSubnet(s: SubnetSpec): Promise<void> {
    mustParse("subnet", parseSubnetSpec(s.subnetId, JSON.stringify(s)));
    await this.redis.hset(this.keys.subnets(this.hostId), s.subnetId, JSON.stringify(s));
    this.lastValid.subnets.set(s.subnetId, s);
  }

  async delSubnet(subnetId: string): Promise<void> {
    await this.redis.hdel(this.keys.subnets(this.hostId), subnetId);
    this.lastValid.subnets.delete(subnetId);
  }

  /** Adds a NIC with its address claim: one script on a single Redis, one-slot steps on a cluster (CLAIM above). */
  async addNic(n: NicSpec): Promise<{ code: number; id: string }> {
    mustParse("nic", parseNicSpec(n.nicId, JSON.stringify(n)));
    const r = this.keys.cluster
      ? await this.addNicInSteps(n)
      : ((await (this.redis as unknown as { mvpcAddNic: (...a: string[]) => Promise<[number, string]> }).mvpcAddNic(
          this.keys.nics(this.hostId),
          this.keys.nicaddr(this.hostId),
          this.keys.nictoken(this.hostId),
          n.nicId,
          `${n.vpcId}/${n.address}`,
          n.clientToken,
          JSON.stringify(n),
          this.hostId,
        )) as [number, string]);
    if (r[0] === 1) this.lastValid.nics.set(n.nicId, n);
    return { code: r[0], id: r[1] };
  }

  /** Whether `claim` ("<host>/<nic>") names a NIC its host holds at this address: its own index and record agree (ADD_NIC's rule). */
  private async claimHeld(claim: string, field: string): Promise<boolean> {
    const c = parseClaim(claim);
    if (!c || c.hostId === this.hostId) return false;
    const [listed, exists] = await Promise.all([this.redis.hget(this.keys.nicaddr(c.hostId), field), this.redis.hexists(this.keys.nics(c.hostId), c.nicId)]);
    return listed === c.nicId && exists === 1;
  }

  /** Step 3 of addNicInSteps (CONFIRM). */
  private async confirm(n: NicSpec): Promise<[number, string]> {
    const k = [this.keys.claims(n.vpcId), this.keys.claimedAt(n.vpcId)!, this.keys.overlayAddrs(n.vpcId)];
    return (await this.redis.eval(CONFIRM, 3, ...k, `${n.vpcId}/${n.address}`, `${this.hostId}/${n.nicId}`, this.hostId, n.address)) as [number, string];
  }

  private async addNicInSteps(n: NicSpec): Promise<[number, string]> {
    const field = `${n.vpcId}/${n.address}`;
    const me = `${this.hostId}/${n.nicId}`;
    const claims = this.keys.claims(n.vpcId);
    const at = this.keys.claimedAt(n.vpcId)!;
    const addrs = this.keys.overlayAddrs(n.vpcId);
    const hostKeys = [this.keys.nics(this.hostId), this.keys.nicaddr(this.hostId), this.keys.nictoken(this.hostId)];
    // The token first (read-only here; HOST checks it again): a retried call answers without touching the claim.
    if (n.clientToken) {
      const prev = await this.redis.hget(hostKeys[2], n.clientToken);
      const rec = prev ? await this.nicRecord(prev) : "absent";
      if (rec !== "absent") {
        // A first call stopped between its steps 2 and 3 left the claim unconfirmed: the retry finishes it.
        if (rec !== "invalid") await this.confirm(rec.nic);
        return [0, prev!];
      }
    }
    // 1. The claim.
    let before: string;
    let expect = ["", ""];
    for (let attempt = 0; ; attempt++) {
      const [code, cur, stamp] = (await this.redis.eval(CLAIM, 2, claims, at, field, me, expect[0], expect[1], this.hostId)) as [number, string, string];
      if (code === 1) {
        before = cur;
        break;
      }
      if (await this.claimHeld(cur, field)) return [-2, cur];
      if (attempt + 1 >= CLAIM_ATTEMPTS)
        throw new UnavailableError(`the claim of ${n.address} in ${n.vpcId} changed ${CLAIM_ATTEMPTS} times while this host checked it; try again`);
      expect = [cur, stamp];
    }
    // 2. The host's record. A refusal puts back what step 1 replaced (this host's own entry).
    const [code, id] = (await this.redis.eval(HOST, 3, ...hostKeys, n.nicId, field, n.clientToken, JSON.stringify(n))) as [number, string];
    if (code !== 1) {
      await this.redis.eval(UNCLAIM, 3, claims, at, addrs, field, me, before, "", "");
      return [code, id];
    }
    // 3. Still ours: stamped again, and nominated to the overlay; or another host replaced it, and this record goes.
    const [ok, holder] = await this.confirm(n);
    if (ok !== 1) {
      await this.redis.eval(UNDO_HOST, 3, ...hostKeys, n.nicId, JSON.stringify(n), field, n.clientToken);
      // Replaced by another host's claim; or removed or garbled (by a hostile host: a claim is shared), which names nobody to detach.
      if (parseClaim(holder)) return [-2, holder];
      throw new UnavailableError(`the claim of ${n.address} in ${n.vpcId} was removed while this host attached it; try again`);
    }
    await emit(this.redis, { vpcs: [n.vpcId], hosts: [this.hostId] }, ["kind", "nic.attached", "host", this.hostId, "nic", n.nicId, "vpc", n.vpcId]);
    return [1, n.nicId];
  }

  async putNic(n: NicSpec): Promise<void> {
    mustParse("nic", parseNicSpec(n.nicId, JSON.stringify(n)));
    await this.redis.hset(this.keys.nics(this.hostId), n.nicId, JSON.stringify(n));
    this.lastValid.nics.set(n.nicId, n);
  }

  async delNic(n: NicSpec): Promise<void> {
    this.lastValid.nics.delete(n.nicId);
    const ev = ["kind", "nic.detached", "host", this.hostId, "nic", n.nicId, "vpc", n.vpcId];
    const field = `${n.vpcId}/${n.address}`;
    if (this.keys.cluster) {
      // The host's record first: a claim left behind by a stop in between is stale, and blocks nobody.
      await this.redis
        .multi()
        .hdel(this.keys.nics(this.hostId), n.nicId)
        .eval(
          "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end return 0",
          1,
          this.keys.nicaddr(this.hostId),
          field,
          n.nicId,
        )
        .exec();
      const [claims, at, addrs] = [this.keys.claims(n.vpcId), this.keys.claimedAt(n.vpcId)!, this.keys.overlayAddrs(n.vpcId)];
      await this.redis.eval(UNCLAIM, 3, claims, at, addrs, field, `${this.hostId}/${n.nicId}`, "", n.address, this.hostId);
      await emit(this.redis, { vpcs: [n.vpcId], hosts: [this.hostId] }, ev);
      return;
    }
    await this.redis
      .multi()
      .hdel(this.keys.nics(this.hostId), n.nicId)
      .eval(
        "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[3] then redis.call('HDEL', KEYS[2], ARGV[1]) end if redis.call('HGET', KEYS[3], ARGV[4]) == ARGV[5] then redis.call('HDEL', KEYS[3], ARGV[4]) end return 0",
        3,
        this.keys.nicaddr(this.hostId),
        this.keys.claims(n.vpcId),
        this.keys.overlayAddrs(n.vpcId),
        field,
        n.nicId,
        `${this.hostId}/${n.nicId}`,
        n.address,
        this.hostId,
      )
      .xadd(EVENTS, "MAXLEN", "~", "100000", "*", ...ev)
      .xadd(vpcEvents(n.vpcId), "MAXLEN", "~", String(SCOPED_MAXLEN), "*", ...ev)
      .xadd(hostEvents(this.hostId), "MAXLEN", "~", String(SCOPED_MAXLEN), "*", ...ev)
      .exec();
  }
}
