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
import { claimField, claimHolder, HostReader, parseClaim, parseNicSpec, parseSubnetSpec, parseVpcSpec, type Parsed, type VpcSpec } from "./schema.js";

export { HostReader, locateNic, NA_KEYS, naKeys, overlayKeys, type NetagentKeys } from "./schema.js";
export type { HostDesired, VpcSpec } from "./schema.js";

/** The writer's check: what it stores must read back. */
function mustParse<T>(what: string, p: Parsed<T>): void {
  if (!p.ok) throw new InvalidArgumentError(p.field || what, `refusing to store an invalid ${what} record: ${p.reason}`);
}

// This host's side of AttachNic, in ADD_NIC and in a cluster's HOST: KEYS 1
// the host's NIC records, 2 its address index, 3 its client tokens; ARGV 1
// the NIC id, 2 "<vpc>/<address>", 3 the client token ('' none). Answers
// {0, id} for a token whose NIC exists, {-1, id} for an address a NIC of
// this host holds.
const LUA_HOST_CHECKS = `
local tok = ARGV[3]
if tok ~= '' then
  local prev = redis.call('HGET', KEYS[3], tok)
  if prev and redis.call('HEXISTS', KEYS[1], prev) == 1 then return {0, prev} end
end
local holder = redis.call('HGET', KEYS[2], ARGV[2])
if holder and redis.call('HEXISTS', KEYS[1], holder) == 1 then return {-1, holder} end
`;

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
const ADD_NIC = `${LUA_EMIT}${LUA_HOST_CHECKS}local g = redis.call('HGET', 'mvpc:nicaddr', ARGV[2])
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
// 0. The NIC is marked pending (nicpending, the host's slot), beside step 1
//    and before its record: no reader uses it (HostReader.load) until the
//    mark goes, which it does last.
// 1. CLAIM, in the VPC's slot: the claim "<vpc>/<address>" → "<host>/<nic>"
//    is written and its version (a counter) raised, unless an entry is
//    there. This host's own entry is left alone ({2}): its own index decides
//    in step 2, and step 3 takes the entry over. Another host's gives {-3,
//    entry, version}, and the client reads that host's own index and NIC
//    record (what ADD_NIC reads in Lua, claimHolder): a live NIC refuses
//    (-2); a stale or forged entry is replaced by CLAIM again, given the
//    entry and version it checked (compare-and-set).
// 2. HOST, in the host's slot: the client token and the host's own index,
//    then the record.
// 3. CONFIRM, in the VPC's slot: the claim names this NIC, another NIC of
//    this host, or nothing, so no other host replaced it since step 1: it is
//    written as this NIC's, its version raised again, and the overlay's
//    nomination written; then the mark goes. Otherwise, or on any error,
//    the call removes what it wrote, the mark last (HostStore.remove).
// Why two hosts cannot both hold an address: a replacer's check of the
// holder's records came either before the holder's record existed, and then
// its replacement (a CAS on the version step 1 raised) lands before the
// holder's CONFIRM, which fails; or after the holder's CONFIRM, which raised
// the version, so the replacement's CAS fails and its next check finds the
// holder live. A call that stops with its NIC marked leaves it to a retry
// with its client token (which finishes it, or removes it if another host's
// live NIC holds the address by then) or to the agent's next pass, which
// removes it (discardPending: its caller was answered with an error, or not
// at all).
// A claim's next version: its stored one plus one, or 1 where the stored one
// is not a plain counter (the hash is shared: a garbled value must not wedge
// the address). Written before the claim.
const LUA_NEXT_VERSION = `
local function next_version(key, field)
  local v = tonumber(redis.call('HGET', key, field) or '0')
  if not v or v < 0 or v >= 1e13 or v % 1 ~= 0 then v = 0 end
  redis.call('HSET', key, field, string.format('%d', v + 1))
end
`;

const CLAIM = `${LUA_NEXT_VERSION}
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur == ARGV[2] then return {1, cur, ''} end
if cur and string.sub(cur, 1, #ARGV[5] + 1) == ARGV[5] .. '/' then return {2, cur, ''} end
if cur then
  local ver = redis.call('HGET', KEYS[2], ARGV[1]) or ''
  if cur ~= ARGV[3] or ver ~= ARGV[4] then return {-3, cur, ver} end
end
next_version(KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return {1, cur or '', ''}
`;

const HOST = `${LUA_HOST_CHECKS}redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[2])
if tok ~= '' then redis.call('HSET', KEYS[3], tok, ARGV[1]) end
return {1, ARGV[1]}
`;

const CONFIRM = `${LUA_NEXT_VERSION}
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and cur ~= ARGV[2] and string.sub(cur, 1, #ARGV[3] + 1) ~= ARGV[3] .. '/' then return {-2, cur, redis.call('HGET', KEYS[2], ARGV[1]) or ''} end
next_version(KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[4], ARGV[3])
return {1, ARGV[2], ''}
`;

/**
 * Removes a record HOST wrote, its index entry and client token: all of it,
 * or nothing if its record was rewritten since, or (unless ARGV[5] is '1':
 * the failing call's own undo, under its VPC's lock) if the NIC is not
 * pending (a NIC reported attached is never undone). Returns 1 when the NIC
 * has no record now, 0 when it keeps one. The pending mark stays: it goes
 * last, once the claim is dropped too (HostStore.remove).
 */
const UNDO_HOST = `
local rec = redis.call('HGET', KEYS[1], ARGV[1])
if rec and ARGV[5] ~= '1' and redis.call('HEXISTS', KEYS[4], ARGV[1]) == 0 then return 0 end
if rec and rec ~= ARGV[2] then return 0 end
if rec then redis.call('HDEL', KEYS[1], ARGV[1]) end
if redis.call('HGET', KEYS[2], ARGV[3]) == ARGV[1] then redis.call('HDEL', KEYS[2], ARGV[3]) end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[3], ARGV[4]) == ARGV[1] then redis.call('HDEL', KEYS[3], ARGV[4]) end
return 1
`;

/** Drops a claim if it still names ARGV[2] (its version stays: a CAS that read it before never matches a later claim), and then the overlay's nomination of the address ARGV[3] ('' leaves it) if it still names the host ARGV[4]. */
const UNCLAIM = `
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  if ARGV[3] ~= '' and redis.call('HGET', KEYS[2], ARGV[3]) == ARGV[4] then redis.call('HDEL', KEYS[2], ARGV[3]) end
end
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
          claimField(n.vpcId, n.address),
          n.clientToken,
          JSON.stringify(n),
          this.hostId,
        )) as [number, string]);
    if (r[0] === 1) this.lastValid.nics.set(n.nicId, n);
    return { code: r[0], id: r[1] };
  }

  /** The cluster's host keys HOST, UNDO_HOST declare: records, index, client tokens, pending marks. */
  private hostKeys(): string[] {
    return [this.keys.nics(this.hostId), this.keys.nicaddr(this.hostId), this.keys.nictoken(this.hostId), this.keys.nicPending(this.hostId)!];
  }

  /**
   * Step 1 (CLAIM), with the check of another host's entry: "" when the
   * claim is this NIC's or this host's, else the live holder ("<host>/<nic>").
   */
  private async claim(n: NicSpec): Promise<string> {
    const field = claimField(n.vpcId, n.address);
    let expect = ["", ""];
    for (let attempt = 0; ; attempt++) {
      const [code, cur, ver] = (await this.redis.eval(
        CLAIM,
        2,
        this.keys.claims(n.vpcId),
        this.keys.claimVersions(n.vpcId)!,
        field,
        `${this.hostId}/${n.nicId}`,
        expect[0],
        expect[1],
        this.hostId,
      )) as [number, string, string];
      if (code > 0) return "";
      const holder = await claimHolder(this.redis, cur, field);
      if (holder) return holder;
      if (attempt + 1 >= CLAIM_ATTEMPTS)
        throw new UnavailableError(`the claim of ${n.address} in ${n.vpcId} changed ${CLAIM_ATTEMPTS} times while this host checked it; try again`);
      expect = [cur, ver];
    }
  }

  /** Step 3 (CONFIRM); "" when the claim is this NIC's, else the entry that replaced it. */
  private async confirm(n: NicSpec): Promise<string> {
    const k = [this.keys.claims(n.vpcId), this.keys.claimVersions(n.vpcId)!, this.keys.overlayAddrs(n.vpcId)];
    const [ok, cur] = (await this.redis.eval(CONFIRM, 3, ...k, claimField(n.vpcId, n.address), `${this.hostId}/${n.nicId}`, this.hostId, n.address)) as [
      number,
      string,
    ];
    return ok === 1 ? "" : cur;
  }

  /**
   * The NIC is attached once its pending mark is gone; the event after it
   * is best effort (a lost one is made up by the readers' periodic passes).
   * If the mark's removal fails, the caller removes the NIC (remove, forced).
   */
  private async attached(n: NicSpec): Promise<void> {
    const event = ["kind", "nic.attached", "host", this.hostId, "nic", n.nicId, "vpc", n.vpcId];
    await Promise.all([
      this.redis.hdel(this.keys.nicPending(this.hostId)!, n.nicId),
      emit(this.redis, { vpcs: [n.vpcId], hosts: [this.hostId] }, event).catch(() => undefined),
    ]);
  }

  /**
   * Removes a NIC whose attach did not finish, in this order: its record,
   * index entry and token (UNDO_HOST; `force`: the failing call's own undo,
   * even if its mark is gone), its claim and nomination if they name it,
   * then its pending mark. Whatever step fails, the mark is still there and
   * the next pass (discardPending) goes on from it.
   */
  private async remove(n: NicSpec, raw: string, force = false): Promise<void> {
    const gone = await this.redis.eval(UNDO_HOST, 4, ...this.hostKeys(), n.nicId, raw, claimField(n.vpcId, n.address), n.clientToken, force ? "1" : "");
    if (gone !== 1) return;
    await this.unclaim(n.vpcId, n.address, n.nicId);
    await this.redis.hdel(this.keys.nicPending(this.hostId)!, n.nicId);
  }

  /** Drops the claim of `address` in `vpcId` if it names this host's `nicId`, and then its nomination. */
  private async unclaim(vpcId: string, address: string, nicId: string, nomination = true): Promise<void> {
    await this.redis.eval(
      UNCLAIM,
      2,
      this.keys.claims(vpcId),
      this.keys.overlayAddrs(vpcId),
      claimField(vpcId, address),
      `${this.hostId}/${nicId}`,
      nomination ? address : "",
      this.hostId,
    );
  }

  /**
   * Finishes a pending NIC of this VPC (a retry with its client token, under
   * the VPC's lock): step 3, taking over a stale or forged claim on the
   * way. Returns "" when the NIC holds its address, or the other host's
   * live NIC that does, after this NIC was removed (it was never reported
   * attached).
   */
  private async finish(n: NicSpec, raw: string): Promise<string> {
    try {
      for (let attempt = 0; attempt < CLAIM_ATTEMPTS; attempt++) {
        const replaced = await this.confirm(n);
        if (!replaced) {
          await this.attached(n);
          return "";
        }
        const holder = await this.claim(n);
        if (holder) {
          await this.remove(n, raw, true);
          return holder;
        }
      }
      throw new UnavailableError(`the claim of ${n.address} in ${n.vpcId} changed ${CLAIM_ATTEMPTS} times while this host confirmed it; try again`);
    } catch (err) {
      await this.remove(n, raw, true).catch(() => undefined);
      throw err;
    }
  }

  /**
   * Cluster: removes every NIC of this host still pending once its VPC's
   * `lock` is free (the agent's VPC lock, which AttachNic and DetachNic
   * hold throughout): its AttachNic ended without confirming, so its caller
   * got an error (or no answer) and will attach again; until then the NIC
   * is in no desired state, so DetachNic by owner would not find it. The
   * agent's full pass. Returns the NICs removed, and those it could not
   * remove now (tried again at the next pass).
   */
  async discardPending(
    lock: <T>(vpcId: string, f: () => Promise<T>) => Promise<T> = (_v, f) => f(),
  ): Promise<{ removed: string[]; failed: { nicId: string; error: string }[] }> {
    const pending = this.keys.nicPending(this.hostId);
    const out = { removed: [] as string[], failed: [] as { nicId: string; error: string }[] };
    if (!pending) return out;
    for (const [nicId, mark] of Object.entries(await this.redis.hgetall(pending))) {
      try {
        // The mark holds "<vpc>/<address>": what a removal stopped half-way still has to drop.
        const m = /^(vpc-[0-9a-f]{12})\/([0-9.]{7,15})$/.exec(mark);
        const raw = await this.redis.hget(this.keys.nics(this.hostId), nicId);
        const p = raw === null ? null : parseNicSpec(nicId, raw);
        if (!m || (p && !p.ok)) {
          // Not a mark this host writes, or a record that is not used (reported by load): nothing of ours to drop.
          if (!m) await this.redis.hdel(pending, nicId);
          continue;
        }
        await lock(m[1], async () => {
          // Its call may have finished it (a retry with the client token) while this waited for the lock.
          if ((await this.redis.hget(pending, nicId)) !== mark || (await this.redis.hget(this.keys.nics(this.hostId), nicId)) !== raw) return;
          if (p?.ok) await this.remove(p.value, raw!);
          else {
            await this.unclaim(m[1], m[2], nicId);
            await this.redis.hdel(pending, nicId);
          }
          this.lastValid.nics.delete(nicId);
          out.removed.push(nicId);
        });
      } catch (err) {
        out.failed.push({ nicId, error: (err as Error).message });
      }
    }
    return out;
  }

  private async addNicInSteps(n: NicSpec): Promise<[number, string]> {
    const field = claimField(n.vpcId, n.address);
    const hk = this.hostKeys();
    // The token first (read-only here; HOST checks it again): a retried call answers without a new claim.
    if (n.clientToken) {
      const prev = await this.redis.hget(hk[2], n.clientToken);
      const raw = prev ? await this.redis.hget(hk[0], prev) : null;
      if (prev && raw !== null) {
        const p = parseNicSpec(prev, raw);
        // A first call stopped between its steps 2 and 3 left it pending: the retry finishes it (under this
        // VPC's lock, which the service holds: a token's NIC of another VPC is left to that VPC's calls and the pass).
        if (p.ok && p.value.vpcId === n.vpcId && (await this.redis.hexists(hk[3], prev))) {
          const heldBy = await this.finish(p.value, raw);
          if (heldBy) return [-2, heldBy];
        }
        return [0, prev];
      }
    }
    // Marked before its record, removed last: whatever happens from here, a NIC whose attach did not finish can be
    // found and removed. The mark goes out beside the claim (a claim without a record blocks nobody), HOST after both.
    const raw = JSON.stringify(n);
    try {
      const [, holder] = await Promise.all([this.redis.hset(hk[3], n.nicId, field), this.claim(n)]);
      if (holder) {
        await this.redis.hdel(hk[3], n.nicId);
        return [-2, holder];
      }
      const host = async () => (await this.redis.eval(HOST, 4, ...hk, n.nicId, field, n.clientToken, raw)) as [number, string];
      let [code, id] = await host();
      // Refused by this host's own index or client token, unless by this very NIC (HOST sent again after a reconnect).
      if (code === -1 && id !== n.nicId) {
        // A NIC of this address whose own attach ended without finishing (in this VPC, whose lock the service holds): it goes, and HOST again.
        const other = await this.redis.hget(hk[0], id);
        const p = other === null ? null : parseNicSpec(id, other);
        if (p?.ok && (await this.redis.hexists(hk[3], id))) {
          await this.remove(p.value, other!);
          [code, id] = await host();
        }
      }
      if (code !== 1 && id !== n.nicId) {
        // The claim this call wrote (if any) goes; a nomination it did not write stays.
        await this.unclaim(n.vpcId, n.address, n.nicId, false);
        await this.redis.hdel(hk[3], n.nicId);
        return [code, id];
      }
      const replaced = await this.confirm(n);
      if (replaced) {
        await this.remove(n, raw, true);
        // Replaced by another host's claim (its NIC live, or being attached); or garbled (by a hostile host: a claim is shared), which names nobody.
        const holder = (await claimHolder(this.redis, replaced, field)) || (parseClaim(replaced) ? replaced : "");
        if (holder) return [-2, holder];
        throw new UnavailableError(`the claim of ${n.address} in ${n.vpcId} was taken while this host attached it; try again`);
      }
      await this.attached(n);
    } catch (err) {
      // Not attached as far as the caller knows: everything of it goes (a reply lost after CONFIRM or the mark's removal
      // applied included); if even that fails, its mark is still there and the next pass removes it.
      await this.remove(n, raw, true).catch(() => undefined);
      throw err;
    }
    return [1, n.nicId];
  }

  /**
   * A Redis Cluster: marks a NIC whose AttachNic failed after its record was
   * confirmed, and whose undo (DetachNic's) failed too, so that the agent's
   * next pass removes it (discardPending). A single Redis keeps the record,
   * as before.
   */
  async abandon(n: NicSpec): Promise<void> {
    const pending = this.keys.nicPending(this.hostId);
    if (pending) await this.redis.hset(pending, n.nicId, claimField(n.vpcId, n.address));
  }

  async putNic(n: NicSpec): Promise<void> {
    mustParse("nic", parseNicSpec(n.nicId, JSON.stringify(n)));
    await this.redis.hset(this.keys.nics(this.hostId), n.nicId, JSON.stringify(n));
    this.lastValid.nics.set(n.nicId, n);
  }

  async delNic(n: NicSpec): Promise<void> {
    this.lastValid.nics.delete(n.nicId);
    const ev = ["kind", "nic.detached", "host", this.hostId, "nic", n.nicId, "vpc", n.vpcId];
    const field = claimField(n.vpcId, n.address);
    if (this.keys.cluster) {
      // The host's record first: a claim left behind by a stop in between is stale, and blocks nobody.
      await this.redis
        .multi()
        .hdel(this.keys.nics(this.hostId), n.nicId)
        .hdel(this.keys.nicPending(this.hostId)!, n.nicId)
        .eval(
          "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end return 0",
          1,
          this.keys.nicaddr(this.hostId),
          field,
          n.nicId,
        )
        .exec();
      await this.unclaim(n.vpcId, n.address, n.nicId);
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
