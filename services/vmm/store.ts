// VM records and the journal of in-flight operations, in Redis. A step is
// recorded as done only after it succeeded, and the record of what it made
// (address, NIC id…) is written with it, so a vmm killed at any point knows
// on restart exactly what to undo or finish.
import { createHash } from "node:crypto";
import type { Redis } from "ioredis";
import type { Logger } from "pino";
import { emit, EVENTS } from "../common/events.js";
import { reportInvalid } from "../common/invalid-records.js";
import { isCluster } from "../common/redis.js";
import * as V from "../common/validate.js";
import { OWNER, parseVmRec, storedVmText, VM_ID_RE } from "./schema.js";

export type StepName = "ipam" | "netagent" | "firewall" | "gateway" | "dns" | "boot";
export const STEPS: StepName[] = ["ipam", "netagent", "firewall", "gateway", "dns", "boot"];

export interface VmRec {
  id: string;
  name: string;
  hostId: string;
  vpcId: string;
  subnetId: string;
  kind: "netns" | "qemu" | "firecracker";
  state: "pending" | "running" | "deleting" | "failed";
  statusMessage: string;
  groups: string[];
  wantedAddress: string;
  hostname: string;
  vcpus: number;
  memoryMib: number;
  userData: string; // base64
  sshKeys: { name: string; key: string }[];
  labels: { key: string; value: string }[];
  imds: { tokens: number; endpoint: number; hopLimit?: number };
  clientToken: string;
  createdMs: number;
  startedMs: number;
  /** What the steps made. */
  address: string;
  nicId: string;
  hostIf: string;
  mac: string;
  netns: string;
  pid: number;
  kernelIpArg: string;
  consoleLog: string;
  /** kind=qemu: the accelerator its QEMU got, and why (absent in records written before these existed). */
  accel?: string;
  accelReason?: string;
  /** Steps done, in order, with their timing. */
  done: { step: StepName; startMs: number; endMs: number; detail: string }[];
  /** The operation in flight ("" when none), and journal lines. */
  op: "" | "create" | "delete" | "rollback";
  journal: { t: number; op: string; step: string; state: string; msg: string }[];
}

/**
 * Whether a record needs the vmm's recovery: an operation a crash or a
 * failed rollback left half-done, or a VM in state FAILED. The one
 * predicate of both the recovery (Vmm.recover) and the unsettled set the
 * store's scripts keep beside the records (K.unsettled).
 */
export function needsRecovery(v: Pick<VmRec, "op" | "state">): boolean {
  return v.op === "create" || v.op === "rollback" || v.op === "delete" || v.state === "failed";
}

/** What a VM record holds before any step of its create ran (CreateVm's claim): nothing made, the create in flight. */
export function unstarted(): Pick<
  VmRec,
  "createdMs" | "startedMs" | "address" | "nicId" | "hostIf" | "mac" | "netns" | "pid" | "kernelIpArg" | "consoleLog" | "done" | "op" | "journal"
> {
  return {
    createdMs: Date.now(),
    startedMs: 0,
    address: "",
    nicId: "",
    hostIf: "",
    mac: "",
    netns: "",
    pid: 0,
    kernelIpArg: "",
    consoleLog: "",
    done: [],
    op: "create",
    journal: [],
  };
}

/**
 * Keys. A VM's record, lease and user-data live under its host's hash tag
 * `{host:H}` (one Redis Cluster slot per host, docs/redis-schema.md "Redis
 * Cluster"), which only that host's Redis user may write
 * (services/common/redis-acl.ts: `mvpc:{host:H}:*` and the host-private
 * `mvpc-md:{host:H}:*`), so no other hypervisor can forge, rewrite or delete
 * them. Two keys stay shared, and only nominate:
 *   byName  per-VPC name index, name → "<host>/<id>", under the VPC's tag:
 *           names are unique per VPC across hosts, so one hash every host
 *           writes. A reader takes an entry only if that host's own record
 *           exists, parses and agrees (id, host, name, VPC): a forged entry
 *           can deny a name (or hide a name lookup), never make a vmm act on
 *           a record another host wrote.
 *   hosts   the host ids that have VMs, for ListVms and GetVm of a VM on
 *           another host (written when a vmm starts and on each create); each host's own
 *           set lists its VMs.
 * Creating a VM touches two slots (the host's, the VPC's), so it is two
 * scripts: the host's keys first, then the name (compare-and-set), whose
 * entry is therefore never written before the record it names (see claim()).
 */
export const K = {
  ids: (h: string) => `mvpc:{host:${h}}:vms`,
  /**
   * The ids of H's VMs whose record needs recovery (needsRecovery): written
   * in the same script as the record (claim, put, remove, the move from the
   * earlier names), so recovery reads these records alone rather than every
   * one of the host's. Records an earlier release wrote have no entry: a
   * vmm's first recovery pass reads them all and repairs the set
   * (VmStore.repairUnsettled).
   */
  unsettled: (h: string) => `mvpc:{host:${h}}:vms:unsettled`,
  vm: (h: string, id: string) => `mvpc:{host:${h}}:vm:${id}`,
  lease: (h: string, id: string) => `mvpc:{host:${h}}:vm:${id}:lease`,
  /** The VM's user-data (base64): host-private (docs/redis-acl.md), so no other host's user reads it. */
  userData: (h: string, id: string) => `mvpc-md:{host:${h}}:vm:${id}:userdata`,
  byName: (vpc: string) => `mvpc:{${vpc}}:vm:byname`,
  hosts: "mvpc:vm:hosts",
  /** The fleet's change stream, which WatchVms follows (watch.ts). */
  events: EVENTS,
  /**
   * The names an earlier release kept them under (`mvpc:vm:host:H…`,
   * `mvpc-md:H:…`, `mvpc:vm:vpc:V:byname`). On a single Redis a vmm moves its
   * own host's VMs from there when it starts (VmStore.migrate) and leaves a
   * hash at the old record name (TOMBSTONE), so that an earlier vmm still
   * running on another host, whose name check GETs that key, fails before
   * it writes instead of taking the name of a VM it cannot see. Until every
   * vmm runs this release, this release also writes and checks the earlier
   * name index, and reads other hosts' records at the earlier names.
   */
  previous: {
    ids: (h: string) => `mvpc:vm:host:${h}`,
    vm: (h: string, id: string) => `mvpc:vm:host:${h}:vm:${id}`,
    lease: (h: string, id: string) => `mvpc:vm:host:${h}:lease:${id}`,
    userData: (h: string, id: string) => `mvpc-md:${h}:vm:${id}:userdata`,
    byName: (vpc: string) => `mvpc:vm:vpc:${vpc}:byname`,
  },
};

/** What an earlier release's record name holds once its VM moved (a hash: that release's GET of it fails with WRONGTYPE). */
export const TOMBSTONE = "moved under the host hash tag mvpc:{host:<host>}:vm:<id> (docs/redis-schema.md)";

/** A name-index entry: the host and id of the VM holding the name. */
export const nameEntry = (v: { hostId: string; id: string }) => `${v.hostId}/${v.id}`;

/** How long a VM's lease lives unless renewed (its holder renews it every third of this). */
export const LEASE_MS = 15_000;

/** Records read at once (MGET) when listing a host's VMs. */
const BATCH = 500;

/** A name-index entry: "<host>/<vm id>", or an id alone (written before records were host-scoped). */
const ENTRY_RE = /^(?:([a-z0-9]{1,24})\/)?(vm-[0-9a-f]{12})$/;

/**
 * Lua: deletes the lease at KEYS[k] if ARGV[a], its holder's token, still
 * holds it ('' releases nothing): how a script that ends an operation
 * (the last put of a create, the removal of a deleted VM) also lets the VM
 * go, without a round trip of its own.
 */
const releaseLua = (k: number, a: number) => `if ARGV[${a}] ~= '' and redis.call('GET', KEYS[${k}]) == ARGV[${a}] then redis.call('DEL', KEYS[${k}]) end`;

/** Lua: appends a VM event to KEYS[k] when it is declared (a single Redis; on a cluster the client appends it after: VmStore.event). */
const eventLua = (k: number, kind: string, id: string) =>
  `if KEYS[${k}] then redis.call('XADD', KEYS[${k}], 'MAXLEN', '~', 100000, '*', 'kind', '${kind}', 'vm', ${id}) end`;

/**
 * Lua: keeps VM ARGV[a] in the unsettled set KEYS[k] if flag ARGV[f] is '1'
 * (the record written needs recovery: needsRecovery, computed by the
 * caller), out of it otherwise.
 */
const unsettledLua = (k: number, a: number, f: number) =>
  `if ARGV[${f}] == '1' then redis.call('SADD', KEYS[${k}], ARGV[${a}]) else redis.call('SREM', KEYS[${k}], ARGV[${a}]) end`;

/** needsRecovery as the scripts' flag argument. */
const unsettledFlag = (v: VmRec) => (needsRecovery(v) ? "1" : "0");

/**
 * The host's half of a create (host slot): record, id set, lease, user-data,
 * unsettled set (KEYS[5]; a claim is op "create", so ARGV[6] is '1'); on a
 * single Redis also the tombstone at the earlier record name (KEYS[6]).
 * 0 if the id is taken.
 */
const CLAIM_HOST = `if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
if ARGV[5] ~= '' then redis.call('SET', KEYS[4], ARGV[5]) else redis.call('DEL', KEYS[4]) end
${unsettledLua(5, 2, 6)}
if KEYS[6] then redis.call('DEL', KEYS[6]) redis.call('HSET', KEYS[6], 'moved', '${TOMBSTONE}') end
return 1`;

/**
 * The name's half (VPC slot): name ARGV[1] becomes entry ARGV[2] (VM ARGV[5])
 * unless an entry other than ours or the one the caller judged stale (ARGV[3];
 * ARGV[4] for the earlier index KEYS[2], single Redis only) holds it.
 * Returns {1|0, entry, earlier entry}; KEYS[3]: the event stream (single Redis).
 */
const CLAIM_NAME = `local held = redis.call('HGET', KEYS[1], ARGV[1]) or ''
local prev = ''
if KEYS[2] then prev = redis.call('HGET', KEYS[2], ARGV[1]) or '' end
local mine = ARGV[2]
if (held ~= '' and held ~= mine and held ~= ARGV[3]) or (prev ~= '' and prev ~= mine and prev ~= ARGV[4]) then return {0, held, prev} end
redis.call('HSET', KEYS[1], ARGV[1], mine)
if KEYS[2] then redis.call('HSET', KEYS[2], ARGV[1], mine) end
if held ~= mine then ${eventLua(3, "vm.created", "ARGV[5]")} end
return {1, held, prev}`;

/** Rewrites the record (host slot) and its entry in the unsettled set KEYS[3] (flag ARGV[4]); KEYS[4]: the event stream (single Redis). */
const PUT = `redis.call('SET', KEYS[1], ARGV[1])
${unsettledLua(3, 2, 4)}
${eventLua(4, "vm.updated", "ARGV[2]")}
${releaseLua(2, 3)}
return 1`;

/** The host's half of a removal: record, user-data, id (in the id set and the unsettled set KEYS[5]), lease (if ARGV[2] holds it); KEYS[6]: the tombstone (single Redis). */
const REMOVE_HOST = `redis.call('DEL', KEYS[1], KEYS[3])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[5], ARGV[1])
${releaseLua(4, 2)}
if KEYS[6] then redis.call('DEL', KEYS[6]) end
return 1`;

/**
 * Drops from the unsettled set KEYS[1] each VM ARGV[2j-1] whose record
 * KEYS[j+1] is still the one the caller read and judged settled, gone or
 * refused: its SHA-1 is ARGV[2j] ('' for a record that was gone; a key
 * holding something other than a string counts as gone, as MGET read it).
 * A record rewritten since (a DeleteVm that began, say) stays: its own
 * script put it in the set, and the judgement read before it must not take
 * it out. (A plain SREM would: should that delete then stop half-way, no
 * pass would find it until the vmm restarts; a script is what makes the
 * check and the removal one step. A record compared by its SHA-1, not by
 * the text itself, so that a drop costs a few bytes per VM.) Returns how
 * many left the set.
 */
const SETTLE = `local n = 0
for i = 2, #KEYS do
  local t = redis.pcall('GET', KEYS[i])
  if type(t) == 'table' then t = false end
  local was = ARGV[2 * i - 2]
  if (not t and was == '') or (t and was ~= '' and redis.sha1hex(t) == was) then n = n + redis.call('SREM', KEYS[1], ARGV[2 * i - 3]) end
end
return n`;

/** The name's half of a removal: the entry goes only if it is this VM's (ARGV[2], or ARGV[3], an id alone); KEYS[3]: the event stream. */
const REMOVE_NAME = `for i = 1, 2 do
  if KEYS[i] then
    local held = redis.call('HGET', KEYS[i], ARGV[1])
    if held == ARGV[2] or held == ARGV[3] then redis.call('HDEL', KEYS[i], ARGV[1]) end
  end
end
${eventLua(3, "vm.deleted", "ARGV[3]")}
return 1`;

/**
 * The move of one VM of this host from the earlier names (single Redis, at
 * vmm start): record, lease (with its time left) and user-data renamed, the
 * id to the new set, a tombstone left at the old record name, and the name
 * entry copied to the new index if it names this VM and the new one has
 * none (best effort: the indexes are shared). Only if the record is still
 * the text the caller parsed (ARGV[2]). A record that needs recovery (flag
 * ARGV[5]) joins the unsettled set.
 * KEYS: old record, lease, user-data, ids; new record, lease, user-data, ids;
 * old name index, new name index; unsettled set.
 */
const MOVE_VM = `if redis.call('TYPE', KEYS[1]).ok ~= 'string' or redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
if redis.call('EXISTS', KEYS[5]) == 1 then return 0 end
redis.call('RENAME', KEYS[1], KEYS[5])
for i = 2, 3 do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('RENAME', KEYS[i], KEYS[i + 4]) end
end
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('SADD', KEYS[8], ARGV[1])
if ARGV[5] == '1' then redis.call('SADD', KEYS[11], ARGV[1]) end
redis.call('HSET', KEYS[1], 'moved', '${TOMBSTONE}')
-- The name indexes are shared (any host writes them): a damaged one must not stop the move.
if redis.pcall('HGET', KEYS[9], ARGV[3]) == ARGV[4] then redis.pcall('HSETNX', KEYS[10], ARGV[3], ARGV[4]) end
return 1`;

/**
 * The move from the layout before host-scoped records (`mvpc:vm:<id>`,
 * `mvpc:vmlease:<id>`, `mvpc:vms`) to the earlier host-scoped names, which
 * MOVE_VM then moves on. The old keys are built here rather than declared:
 * a user made by `microvpcd redis-acl` may not write them, and a declared key
 * it may not write fails the whole script, so they are deleted with
 * redis.pcall (an administrator deletes what is left, docs/redis-acl.md).
 */
const MOVE_GLOBAL = `local old = 'mvpc:vm:' .. ARGV[2]
if redis.call('GET', old) ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[6])
if ARGV[7] ~= '' then redis.call('SET', KEYS[5], ARGV[7]) end
local oldLease = 'mvpc:vmlease:' .. ARGV[2]
local holder = redis.call('GET', oldLease)
if holder then
  local ttl = redis.call('PTTL', oldLease)
  if ttl > 0 then redis.call('SET', KEYS[2], holder, 'PX', ttl) elseif ttl == -1 then redis.call('SET', KEYS[2], holder) end
end
if redis.call('HGET', KEYS[3], ARGV[4]) == ARGV[2] then redis.call('HSET', KEYS[3], ARGV[4], ARGV[3]) end
redis.call('SADD', KEYS[4], ARGV[5])
local d = redis.pcall('DEL', old, oldLease)
local z = redis.pcall('ZREM', 'mvpc:vms', ARGV[2])
if type(d) == 'table' and d.err or type(z) == 'table' and z.err then return 2 end
return 1`;

export class VmStore {
  /**
   * hostId: this hypervisor's; every write (record, lease, index) is under
   * its prefix. log: where records refused on reading are reported.
   */
  constructor(
    readonly redis: Redis,
    readonly hostId: string,
    readonly log?: Pick<Logger, "warn" | "info">,
  ) {
    V.hostId("host_id", hostId);
  }

  /**
   * Claims the name in the VPC; returns the name-index entry holding it
   * (nameEntry(v) if ours). Two scripts, one per slot:
   * - the host's keys: the record, with the VM's lease for `leaseToken` (no
   *   DeleteVm can slip in between the record appearing and its create
   *   holding the VM) and its user-data;
   * - then the name, compare-and-set: an entry is in the way only if its
   *   host's own record agrees (holds()), and one judged stale is replaced
   *   only while it is still the entry read. An entry is never written
   *   before its record and ids are not reused, so a record missing at the
   *   check is gone for good.
   * `onLeased` runs once the first holds the lease (its holder renews it from
   * then on). A claim that loses takes its host keys back (no event was sent). A vmm
   * killed between the two leaves a record whose create its recovery rolls
   * back (op "create", no step done), like any create cut short.
   */
  async claim(v: VmRec, leaseToken: string, onLeased?: () => void): Promise<string> {
    const h = this.hostId;
    if (v.hostId !== h) throw new Error(`vmm: a VM of host ${v.hostId} cannot be claimed by host ${h}`);
    const single = !isCluster(this.redis);
    const hostKeys = [K.vm(h, v.id), K.ids(h), K.lease(h, v.id), K.userData(h, v.id), K.unsettled(h), ...(single ? [K.previous.vm(h, v.id)] : [])];
    const made = await this.redis.eval(CLAIM_HOST, hostKeys.length, ...hostKeys, storedVmText(v), v.id, leaseToken, LEASE_MS, v.userData, unsettledFlag(v));
    if (made !== 1) throw new Error(`vmm: VM id ${v.id} is already taken on host ${h}`);
    onLeased?.();
    const mine = nameEntry(v);
    const nameKeys = [K.byName(v.vpcId), ...(single ? [K.previous.byName(v.vpcId), K.events] : [])];
    let stale: [string, string] = ["", ""];
    let last = "";
    for (let attempt = 0; attempt < 4; attempt++) {
      const [won, held, prev] = (await this.redis.eval(CLAIM_NAME, nameKeys.length, ...nameKeys, v.name, mine, ...stale, v.id)) as [number, string, string];
      if (won === 1) {
        if (!single && held !== mine) await this.event("vm.created", v.id);
        // The shared listing other hosts find this host's VMs by: any host may
        // write it, so each create puts this host back (migrate() does at
        // start). Best effort: the create has succeeded.
        await this.redis.sadd(K.hosts, h).catch((err: Error) => this.log?.warn({ err: err.message }, "cannot add this host to mvpc:vm:hosts"));
        return mine;
      }
      for (const e of [held, prev]) {
        if (e === "" || e === mine || !(await this.holds(e, v.name, v.vpcId))) continue;
        await this.removeHost(v, leaseToken);
        return e;
      }
      stale = [held, prev];
      last = held || prev;
    }
    // The entries kept changing under us: another create of the name is racing this one.
    await this.removeHost(v, leaseToken);
    return last;
  }

  /**
   * Whether a name-index entry holds the name: its host's own record exists,
   * parses and agrees. An id alone (an entry written before records were
   * host-scoped) names this host's VM, or, on a single Redis, a record still
   * at `mvpc:vm:<id>` that its host has not moved yet.
   */
  private async holds(entry: string, name: string, vpcId: string): Promise<boolean> {
    const m = ENTRY_RE.exec(entry);
    if (!m) return false;
    const h = m[1] ?? this.hostId;
    // Only what holding a name needs (as the earlier release's Lua check): a
    // record this release would refuse on other grounds still holds its name,
    // so no second VM takes it while that record exists.
    const text = (await this.texts([{ h, id: m[2] }]))[0];
    let o: unknown;
    try {
      o = text === null ? null : JSON.parse(text);
    } catch {
      o = null;
    }
    const r = (o ?? {}) as Record<string, unknown>;
    if (r.id === m[2] && r.hostId === h && r.name === name && r.vpcId === vpcId) return true;
    return !m[1] && !isCluster(this.redis) && (await this.redis.exists(`mvpc:vm:${m[2]}`)) === 1;
  }

  /** Appends a VM event to the fleet's stream after a write (on a cluster; a single Redis appends it in the write's script). */
  private async event(kind: string, id: string): Promise<void> {
    await emit(this.redis, {}, ["kind", kind, "vm", id]);
  }

  // ---- per-VM lease: one operation (create, delete, recovery) at a time ----
  // Only the VM's own host takes its lease (DeleteVm of another host's VM is
  // refused before), so a lease is always under this host's prefix.

  /**
   * Takes the VM's lease unless another holds it. takeOverUnless: a token
   * prefix (this process's); a lease whose holder does not start with it is
   * taken anyway — recovery's, on the assumption the vmm docs make (one vmm
   * per hypervisor: another holder on this host is a previous, dead run).
   */
  async acquireLease(id: string, token: string, takeOverUnless = ""): Promise<boolean> {
    return (await this.leaseScript(id, token, takeOverUnless, false)) === 1;
  }

  /**
   * acquireLease, and the VM's own record as it is once the lease is held,
   * in one script (the round trip DeleteVm would spend on getOwn after it):
   * false when another holds the lease, null when the record is gone.
   */
  async acquireLeaseAndRead(id: string, token: string): Promise<false | VmRec | null> {
    const r = await this.leaseScript(id, token, "", true);
    if (r === 0) return false;
    const [text, userData] = r as [string | null, string | null];
    return this.own(id, text, userData);
  }

  private leaseScript(id: string, token: string, takeOverUnless: string, read: boolean): Promise<unknown> {
    return this.redis.eval(
      `local cur = redis.call('GET', KEYS[1])
       if cur and (ARGV[3] == '' or string.sub(cur, 1, #ARGV[3]) == ARGV[3]) then return 0 end
       redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
       if ARGV[4] == '1' then return {redis.call('GET', KEYS[2]) or false, redis.call('GET', KEYS[3]) or false} end
       return 1`,
      3,
      K.lease(this.hostId, id),
      K.vm(this.hostId, id),
      K.userData(this.hostId, id),
      token,
      LEASE_MS,
      takeOverUnless,
      read ? "1" : "0",
    );
  }

  /** Extends the lease if it is still ours; false if it was lost. */
  async renewLease(id: string, token: string): Promise<boolean> {
    const r = await this.redis.eval(
      "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0",
      1,
      K.lease(this.hostId, id),
      token,
      LEASE_MS,
    );
    return r === 1;
  }

  async releaseLease(id: string, token: string): Promise<void> {
    await this.redis.eval(`${releaseLua(1, 1)} return 0`, 1, K.lease(this.hostId, id), token);
  }

  /** Who holds the VM's lease ("" if nobody). */
  async leaseHolder(id: string): Promise<string> {
    return (await this.redis.get(K.lease(this.hostId, id))) ?? "";
  }

  /**
   * Rewrites the VM's record, with a `vm.updated` event so that WatchVms
   * streams (on any host's vmm) learn of the change: a state, a step done, a
   * journal line. In the same script on a single Redis; on a cluster the
   * stream is in another slot, and the event follows the write.
   */
  async put(v: VmRec, releaseLease = ""): Promise<void> {
    if (v.hostId !== this.hostId) throw new Error(`vmm: host ${this.hostId} does not write VM ${v.id} of host ${v.hostId}`);
    const single = !isCluster(this.redis);
    const keys = [K.vm(this.hostId, v.id), K.lease(this.hostId, v.id), K.unsettled(this.hostId), ...(single ? [K.events] : [])];
    await this.redis.eval(PUT, keys.length, ...keys, storedVmText(v), v.id, releaseLease, unsettledFlag(v));
    if (!single) await this.event("vm.updated", v.id);
  }

  /** Parses a record read from host h's key; a refused one is reported (once) and skipped. */
  private parse(h: string, id: string, text: string | null): VmRec | null {
    if (text === null) return null;
    const p = parseVmRec(text, { id, hostId: h });
    if (p.ok) return p.value;
    reportInvalid(OWNER, "vm", K.vm(h, id), p.reason, this.log);
    return null;
  }

  /**
   * Records as stored, by host and id. On a cluster one MGET per host (a
   * host's slot). On a single Redis, other hosts' records are read at the
   * earlier names first, then at these, and the later read wins: a VM whose
   * host moves it between the two reads is seen by one of them (MGET gives
   * nil for the tombstone a move leaves).
   */
  private async texts(keys: { h: string; id: string }[]): Promise<(string | null)[]> {
    if (keys.length === 0) return [];
    if (isCluster(this.redis)) {
      const out: (string | null)[] = keys.map(() => null);
      const byHost = new Map<string, number[]>();
      keys.forEach((k, i) => byHost.set(k.h, [...(byHost.get(k.h) ?? []), i]));
      await Promise.all(
        [...byHost].map(async ([h, at]) => {
          const t = await this.redis.mget(at.map((i) => K.vm(h, keys[i].id)));
          at.forEach((i, j) => (out[i] = t[j]));
        }),
      );
      return out;
    }
    // (This host's too: a claim's check may run before migrate() moved them.)
    const before = await this.redis.mget(keys.map((k) => K.previous.vm(k.h, k.id)));
    const now = await this.redis.mget(keys.map((k) => K.vm(k.h, k.id)));
    return now.map((t, i) => t ?? before[i] ?? null);
  }

  /** Host h's record of VM id, parsed (null if none or refused). */
  private async record(h: string, id: string): Promise<VmRec | null> {
    return this.parse(h, id, (await this.texts([{ h, id }]))[0]);
  }

  /** This host's VM (the only ones it acts on: deletes, recovery). */
  async getOwn(id: string): Promise<VmRec | null> {
    if (!VM_ID_RE.test(id)) return null;
    const [text, userData] = await this.redis.mget(K.vm(this.hostId, id), K.userData(this.hostId, id));
    return this.own(id, text, userData);
  }

  /** One of this host's records and its host-private user-data, as read. */
  private own(id: string, text: string | null, userData: string | null): VmRec | null {
    const v = this.parse(this.hostId, id, text);
    if (v && userData && !v.userData) {
      // Host-private, so only this host wrote it; still input: checked as the API checks user-data.
      const p = parseVmRec(JSON.stringify({ ...v, userData }), { id, hostId: this.hostId });
      if (p.ok) v.userData = userData;
      else reportInvalid(OWNER, "vm-userdata", K.userData(this.hostId, id), p.reason, this.log);
    }
    return v;
  }

  /** A VM on any host (for views: GetVm, InspectVm): this host's first, then the others'. */
  async get(id: string): Promise<VmRec | null> {
    if (!VM_ID_RE.test(id)) return null;
    const own = await this.getOwn(id);
    if (own) return own;
    const others = (await this.hostIds()).filter((h) => h !== this.hostId);
    const texts = await this.texts(others.map((h) => ({ h, id })));
    for (const [i, h] of others.entries()) {
      const v = this.parse(h, id, texts[i]);
      if (v) return v;
    }
    return null;
  }

  /**
   * The VM holding a name in a VPC, if the index entry and that host's own
   * record agree. On a single Redis the earlier index is read too (a vmm of
   * the earlier release writes only that one).
   */
  async byName(vpcId: string, name: string): Promise<VmRec | null> {
    const keys = [K.byName(vpcId), ...(isCluster(this.redis) ? [] : [K.previous.byName(vpcId)])];
    for (const key of keys) {
      const entry = await this.redis.hget(key, name);
      if (entry === null) continue;
      const m = ENTRY_RE.exec(entry);
      if (!m) {
        reportInvalid(OWNER, "vm-name", key, `${V.show(entry)} is not "<host>/<vm id>"`, this.log, { field: name, vpcId });
        continue;
      }
      // An entry an older version wrote (an id alone): this host's VM, once moved.
      const v = await this.record(m[1] ?? this.hostId, m[2]);
      if (!v) continue;
      if (v.name === name && v.vpcId === vpcId) return v;
      reportInvalid(OWNER, "vm-name", key, `names ${entry}, whose record is ${v.name} in ${v.vpcId}`, this.log, { field: name, vpcId });
    }
    return null;
  }

  /** Host ids with VMs (shared index: validated, and each host's VMs come from its own keys). */
  async hostIds(): Promise<string[]> {
    const ids = await this.redis.smembers(K.hosts);
    const ok = ids.filter((h) => {
      if (V.attempt(() => V.hostId("host", h)).ok) return true;
      reportInvalid(OWNER, "vm-host", K.hosts, `${V.show(h)} is not a host id`, this.log);
      return false;
    });
    return [...new Set([this.hostId, ...ok])].sort();
  }

  /** Host h's VMs; on a single Redis also those not yet moved from the earlier names (that set read first, as texts() reads). */
  async ofHost(hostId: string): Promise<VmRec[]> {
    const sets = [...(!isCluster(this.redis) ? [K.previous.ids(hostId)] : []), K.ids(hostId)];
    const listed: string[] = [];
    for (const key of sets) {
      for (const id of await this.redis.smembers(key)) {
        if (VM_ID_RE.test(id)) listed.push(id);
        else reportInvalid(OWNER, "vm-index", key, `${V.show(id)} is not a VM id`, this.log);
      }
    }
    const ids = [...new Set(listed)];
    const out: VmRec[] = [];
    for (let i = 0; i < ids.length; i += BATCH) {
      const chunk = ids.slice(i, i + BATCH);
      const texts = await this.texts(chunk.map((id) => ({ h: hostId, id })));
      chunk.forEach((id, j) => {
        const v = this.parse(hostId, id, texts[j]);
        if (v) out.push(v);
      });
    }
    return out;
  }

  /**
   * The members of this host's unsettled set (K.unsettled) that are VM ids;
   * anything else is reported and skipped, never made into a key: the set is
   * input like every record.
   */
  async unsettledIds(): Promise<string[]> {
    const key = K.unsettled(this.hostId);
    return (await this.redis.smembers(key)).filter((id) => {
      if (VM_ID_RE.test(id)) return true;
      reportInvalid(OWNER, "vm-unsettled", key, `${V.show(id)} is not a VM id`, this.log);
      return false;
    });
  }

  /**
   * This host's VMs whose record needs recovery, found through the unsettled
   * set alone: its members and their records are read (work in proportion
   * to them, not to the host's VMs). A member whose record is gone, settled
   * or refused leaves the set, if it still is (settle).
   */
  async unsettled(): Promise<VmRec[]> {
    return (await this.settle(await this.unsettledIds())).need;
  }

  /**
   * Makes the unsettled set agree with a read of every record of this host
   * (ofHost, by the caller): `need`, the ids whose record needs recovery,
   * join it (a record an earlier release wrote has no entry; one that
   * settled since the caller's read costs the next pass one read, which
   * drops it); every other member is read again and leaves the set if its
   * record is still gone, settled or refused (settle). Returns the ids added
   * and how many left.
   */
  async repairUnsettled(need: string[]): Promise<{ added: string[]; dropped: number }> {
    const members = new Set(await this.unsettledIds());
    const wanted = new Set(need);
    const added = need.filter((id) => VM_ID_RE.test(id) && !members.has(id));
    for (let i = 0; i < added.length; i += BATCH) await this.redis.sadd(K.unsettled(this.hostId), ...added.slice(i, i + BATCH));
    const { dropped } = await this.settle([...members].filter((id) => !wanted.has(id)));
    return { added, dropped };
  }

  /**
   * Reads the records of these VMs of this host (at this release's names, as
   * getOwn): those that need recovery are returned; the others (gone,
   * settled, refused: nothing recovery can act on) leave the unsettled set
   * by SETTLE, which compares each record with the one read, so that a
   * record rewritten meanwhile keeps the entry its own write gave it. Best
   * effort: a failed SETTLE only leaves an entry the next pass reads again.
   */
  private async settle(ids: string[]): Promise<{ need: VmRec[]; dropped: number }> {
    const h = this.hostId;
    const need: VmRec[] = [];
    let dropped = 0;
    for (let i = 0; i < ids.length; i += BATCH) {
      const chunk = ids.slice(i, i + BATCH);
      // As bytes: SETTLE compares the SHA-1 of exactly what Redis holds.
      const raws = await this.redis.mgetBuffer(chunk.map((id) => K.vm(h, id)));
      const done: string[] = [];
      chunk.forEach((id, j) => {
        const raw = raws[j];
        const v = raw === null ? null : this.parse(h, id, raw.toString());
        if (v && needsRecovery(v)) need.push(v);
        else done.push(id, raw === null ? "" : createHash("sha1").update(raw).digest("hex"));
      });
      if (done.length === 0) continue;
      const keys = [K.unsettled(h), ...done.filter((_, k) => k % 2 === 0).map((id) => K.vm(h, id))];
      try {
        dropped += Number(await this.redis.eval(SETTLE, keys.length, ...keys, ...done));
      } catch (err) {
        this.log?.warn({ err: (err as Error).message }, "cannot drop settled VMs from the set of VMs to recover; the next pass reads them again");
      }
    }
    return { need, dropped };
  }

  async all(): Promise<VmRec[]> {
    return (await Promise.all((await this.hostIds()).map((h) => this.ofHost(h)))).flat();
  }

  /**
   * Removes the VM's record and name entry; with `releaseLease` (the
   * holder's token), its lease too. The host's keys first, then the name
   * (only if it is still this VM's): a vmm killed between leaves an entry
   * whose record is gone, which the next claim of the name replaces.
   */
  async remove(v: VmRec, releaseLease = ""): Promise<void> {
    await this.removeHost(v, releaseLease);
    const single = !isCluster(this.redis);
    const keys = [K.byName(v.vpcId), ...(single ? [K.previous.byName(v.vpcId), K.events] : [])];
    await this.redis.eval(REMOVE_NAME, keys.length, ...keys, v.name, nameEntry(v), v.id);
    if (!single) await this.event("vm.deleted", v.id);
  }

  /** The host's half of remove(), and how a losing claim takes its keys back. */
  private async removeHost(v: VmRec, releaseLease: string): Promise<void> {
    const h = this.hostId;
    const keys = [K.vm(h, v.id), K.ids(h), K.userData(h, v.id), K.lease(h, v.id), K.unsettled(h), ...(isCluster(this.redis) ? [] : [K.previous.vm(h, v.id)])];
    await this.redis.eval(REMOVE_HOST, keys.length, ...keys, v.id, releaseLease);
  }

  /**
   * Moves this host's VMs from the earlier layouts, on vmm start before
   * recovery (a single Redis; a cluster only ever has these names). Returns
   * how many records moved under the host's hash tag.
   * 1. From the layout before host-scoped records: each VM of this host still
   *    at `mvpc:vm:<id>` (listed in the host's `mvpc:vm:host:H` and recording
   *    hostId H; the record must parse) moves to `mvpc:vm:host:H:vm:<id>`,
   *    its lease `mvpc:vmlease:<id>` with its remaining time, its name-index
   *    entry becoming "H/<id>" (MOVE_GLOBAL).
   * 2. From there to the host's hash tag, one script per VM (MOVE_VM).
   * A record that changed since it was read is left for the next start; one
   * already moved is not overwritten.
   */
  async migrate(): Promise<number> {
    await this.redis.sadd(K.hosts, this.hostId);
    if (isCluster(this.redis)) return 0;
    await this.moveGlobal();
    return this.moveHostScoped();
  }

  private async moveGlobal(): Promise<number> {
    const h = this.hostId;
    const P = K.previous;
    const ids = (await this.redis.smembers(P.ids(h))).filter((id) => VM_ID_RE.test(id));
    let moved = 0;
    for (let i = 0; i < ids.length; i += BATCH) {
      const chunk = ids.slice(i, i + BATCH);
      const [olds, news] = await Promise.all([this.redis.mget(chunk.map((id) => `mvpc:vm:${id}`)), this.redis.mget(chunk.map((id) => P.vm(h, id)))]);
      for (const [j, id] of chunk.entries()) {
        const old = olds[j];
        if (old === null || news[j] !== null || (await this.redis.exists(K.vm(h, id))) === 1) continue;
        const p = parseVmRec(old, { id, hostId: h });
        if (!p.ok) {
          reportInvalid(OWNER, "vm", `mvpc:vm:${id}`, `not moved to ${P.vm(h, id)}: ${p.reason}`, this.log);
          continue;
        }
        const r = await this.redis.eval(
          MOVE_GLOBAL,
          5,
          P.vm(h, id),
          P.lease(h, id),
          P.byName(p.value.vpcId),
          K.hosts,
          P.userData(h, id),
          old,
          id,
          nameEntry(p.value),
          p.value.name,
          h,
          storedVmText(p.value),
          p.value.userData,
        );
        if (r === 0) continue;
        moved++;
        this.log?.info({ vm: id, oldKeysLeft: r === 2 }, "moved a VM record to this host's own keys");
      }
    }
    return moved;
  }

  private async moveHostScoped(): Promise<number> {
    const h = this.hostId;
    const P = K.previous;
    const ids = (await this.redis.smembers(P.ids(h))).filter((id) => VM_ID_RE.test(id));
    let moved = 0;
    const failed: string[] = [];
    for (let i = 0; i < ids.length; i += BATCH) {
      const chunk = ids.slice(i, i + BATCH);
      const texts = await this.redis.mget(chunk.map((id) => P.vm(h, id)));
      for (const [j, id] of chunk.entries()) {
        const text = texts[j];
        if (text === null) continue;
        const p = parseVmRec(text, { id, hostId: h });
        if (!p.ok) {
          reportInvalid(OWNER, "vm", P.vm(h, id), `not moved to ${K.vm(h, id)}: ${p.reason}`, this.log);
          continue;
        }
        const keys = [
          P.vm(h, id),
          P.lease(h, id),
          P.userData(h, id),
          P.ids(h),
          K.vm(h, id),
          K.lease(h, id),
          K.userData(h, id),
          K.ids(h),
          P.byName(p.value.vpcId),
          K.byName(p.value.vpcId),
          K.unsettled(h),
        ];
        try {
          if ((await this.redis.eval(MOVE_VM, keys.length, ...keys, id, text, p.value.name, nameEntry(p.value), unsettledFlag(p.value))) !== 1) continue;
        } catch (err) {
          // The others still move; migrate() fails at the end, and the next call tries again.
          failed.push(`${id}: ${(err as Error).message}`);
          continue;
        }
        moved++;
        this.log?.info({ vm: id }, "moved a VM record under its host's hash tag");
      }
    }
    if (failed.length) throw new Error(`${failed.length} VM record(s) not moved under this host's hash tag: ${failed.slice(0, 3).join("; ")}`);
    return moved;
  }
}
