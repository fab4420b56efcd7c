// VM records and the journal of in-flight operations, in Redis. A step is
// recorded as done only after it succeeded, and the record of what it made
// (address, NIC id…) is written with it, so a vmm killed at any point knows
// on restart exactly what to undo or finish.
import type { Redis } from "ioredis";
import type { Logger } from "pino";
import { reportInvalid } from "../common/invalid-records.js";
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
 * Keys. A VM's record and lease live under its host's prefix, which only
 * that host's Redis user may write (services/common/redis-acl.ts:
 * `mvpc:vm:host:H` and `mvpc:vm:host:H:*`), so no other hypervisor can
 * forge, rewrite or delete them. Two keys stay shared, and only nominate:
 *   byName  per-VPC name index, name → "<host>/<id>": names are unique per
 *           VPC across hosts, so one hash every host writes. A reader takes
 *           an entry only if that host's own record exists, parses and
 *           agrees (id, host, name, VPC): a forged entry can deny a name
 *           (or hide a name lookup), never make a vmm act on a record
 *           another host wrote.
 *   hosts   the host ids that have VMs, for ListVms and GetVm of a VM on
 *           another host; each host's own set mvpc:vm:host:H lists its VMs.
 * Before this layout (up to the commit that moved them) records were
 * `mvpc:vm:<id>` and leases `mvpc:vmlease:<id>`, with `mvpc:vms` listing
 * every id: VmStore.migrate moves a host's own ones on vmm start.
 */
const K = {
  host: (h: string) => `mvpc:vm:host:${h}`,
  vm: (h: string, id: string) => `mvpc:vm:host:${h}:vm:${id}`,
  lease: (h: string, id: string) => `mvpc:vm:host:${h}:lease:${id}`,
  byName: (vpc: string) => `mvpc:vm:vpc:${vpc}:byname`,
  hosts: "mvpc:vm:hosts",
  /** The VM's user-data (base64): host-private (docs/redis-acl.md), so no other host's user reads it. */
  userData: (h: string, id: string) => `mvpc-md:${h}:vm:${id}:userdata`,
};

/** A name-index entry: the host and id of the VM holding the name. */
export const nameEntry = (v: { hostId: string; id: string }) => `${v.hostId}/${v.id}`;

/** How long a VM's lease lives unless renewed (its holder renews it every third of this). */
export const LEASE_MS = 15_000;

/** Records read at once (MGET) when listing a host's VMs. */
const BATCH = 500;

/**
 * Lua: deletes the lease at KEYS[k] if ARGV[a], its holder's token, still
 * holds it ('' releases nothing): how a script that ends an operation
 * (the last put of a create, the removal of a deleted VM) also lets the VM
 * go, without a round trip of its own.
 */
const releaseLua = (k: number, a: number) => `if ARGV[${a}] ~= '' and redis.call('GET', KEYS[${k}]) == ARGV[${a}] then redis.call('DEL', KEYS[${k}]) end`;

/**
 * Lua: the name index entry HELD (of name ARGV[1] in VPC ARGV[6]) is taken
 * only if the host it names has a record that agrees. Sets `taken`. An entry
 * an older version wrote (just an id) counts if its old-layout record still
 * exists (a host not yet moved) or this host (ARGV[7]) has it.
 */
const NAME_HELD_LUA = `
local taken = false
if held then
  local h, i = string.match(held, '^([a-z0-9]+)/(vm%-[0-9a-f]+)$')
  local legacy = false
  if not h then
    i = string.match(held, '^(vm%-[0-9a-f]+)$')
    h = ARGV[7]
    legacy = true
  end
  if i then
    local rec = redis.call('GET', 'mvpc:vm:host:' .. h .. ':vm:' .. i)
    if rec then
      local ok, o = pcall(cjson.decode, rec)
      if ok and type(o) == 'table' and o.id == i and o.hostId == h and o.name == ARGV[1] and o.vpcId == ARGV[6] then taken = true end
    end
    if legacy and not taken and redis.call('EXISTS', 'mvpc:vm:' .. i) == 1 then taken = true end
  end
end`;

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
   * (nameEntry(v) if ours). A claim that succeeds also takes the VM's lease
   * for `leaseToken`, in the same script: no DeleteVm can slip in between
   * the record appearing and its create holding the VM.
   */
  async claim(v: VmRec, leaseToken: string): Promise<string> {
    if (v.hostId !== this.hostId) throw new Error(`vmm: a VM of host ${v.hostId} cannot be claimed by host ${this.hostId}`);
    const r = await this.redis.eval(
      `local held = redis.call('HGET', KEYS[1], ARGV[1])
       ${NAME_HELD_LUA}
       if taken then return held end
       redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
       redis.call('SET', KEYS[2], ARGV[3])
       redis.call('SET', KEYS[5], ARGV[4], 'PX', ARGV[5])
       redis.call('SADD', KEYS[3], ARGV[8])
       redis.call('SADD', KEYS[4], ARGV[7])
       if ARGV[9] ~= '' then redis.call('SET', KEYS[6], ARGV[9]) else redis.call('DEL', KEYS[6]) end
       redis.call('XADD', 'mvpc:events', 'MAXLEN', '~', 100000, '*', 'kind', 'vm.created', 'vm', ARGV[8])
       return ARGV[2]`,
      6,
      K.byName(v.vpcId),
      K.vm(this.hostId, v.id),
      K.host(this.hostId),
      K.hosts,
      K.lease(this.hostId, v.id),
      K.userData(this.hostId, v.id),
      v.name,
      nameEntry(v),
      storedVmText(v),
      leaseToken,
      LEASE_MS,
      v.vpcId,
      this.hostId,
      v.id,
      v.userData,
    );
    return String(r);
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
   * Rewrites the VM's record, with a `vm.updated` event in the same script so
   * that WatchVms streams (on any host's vmm) learn of the change: a state,
   * a step done, a journal line.
   */
  async put(v: VmRec, releaseLease = ""): Promise<void> {
    if (v.hostId !== this.hostId) throw new Error(`vmm: host ${this.hostId} does not write VM ${v.id} of host ${v.hostId}`);
    await this.redis.eval(
      `redis.call('SET', KEYS[1], ARGV[1])
       redis.call('XADD', 'mvpc:events', 'MAXLEN', '~', 100000, '*', 'kind', 'vm.updated', 'vm', ARGV[2])
       ${releaseLua(2, 3)}
       return 1`,
      2,
      K.vm(this.hostId, v.id),
      K.lease(this.hostId, v.id),
      storedVmText(v),
      v.id,
      releaseLease,
    );
  }

  /** Parses a record read from host h's key; a refused one is reported (once) and skipped. */
  private parse(h: string, id: string, text: string | null): VmRec | null {
    if (text === null) return null;
    const p = parseVmRec(text, { id, hostId: h });
    if (p.ok) return p.value;
    reportInvalid(OWNER, "vm", K.vm(h, id), p.reason, this.log);
    return null;
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

  /** A VM on any host (for views: GetVm, InspectVm): this host's first, then the others', in one round trip. */
  async get(id: string): Promise<VmRec | null> {
    if (!VM_ID_RE.test(id)) return null;
    const own = await this.getOwn(id);
    if (own) return own;
    const others = (await this.hostIds()).filter((h) => h !== this.hostId);
    if (others.length === 0) return null;
    const texts = await this.redis.mget(others.map((h) => K.vm(h, id)));
    for (const [i, h] of others.entries()) {
      const v = this.parse(h, id, texts[i]);
      if (v) return v;
    }
    return null;
  }

  /** The VM holding a name in a VPC, if the index entry and that host's own record agree. */
  async byName(vpcId: string, name: string): Promise<VmRec | null> {
    const key = K.byName(vpcId);
    const entry = await this.redis.hget(key, name);
    if (entry === null) return null;
    const m = /^(?:([a-z0-9]{1,24})\/)?(vm-[0-9a-f]{12})$/.exec(entry);
    if (!m) {
      reportInvalid(OWNER, "vm-name", key, `${V.show(entry)} is not "<host>/<vm id>"`, this.log, { field: name, vpcId });
      return null;
    }
    // An entry an older version wrote (an id alone): this host's VM, once moved.
    const h = m[1] ?? this.hostId;
    const v = this.parse(h, m[2], await this.redis.get(K.vm(h, m[2])));
    if (!v) return null;
    if (v.name !== name || v.vpcId !== vpcId) {
      reportInvalid(OWNER, "vm-name", key, `names ${entry}, whose record is ${v.name} in ${v.vpcId}`, this.log, { field: name, vpcId });
      return null;
    }
    return v;
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

  async ofHost(hostId: string): Promise<VmRec[]> {
    const ids = (await this.redis.smembers(K.host(hostId))).filter((id) => {
      if (VM_ID_RE.test(id)) return true;
      reportInvalid(OWNER, "vm-index", K.host(hostId), `${V.show(id)} is not a VM id`, this.log);
      return false;
    });
    const out: VmRec[] = [];
    for (let i = 0; i < ids.length; i += BATCH) {
      const chunk = ids.slice(i, i + BATCH);
      const texts = await this.redis.mget(chunk.map((id) => K.vm(hostId, id)));
      chunk.forEach((id, j) => {
        const v = this.parse(hostId, id, texts[j]);
        if (v) out.push(v);
      });
    }
    return out;
  }

  async all(): Promise<VmRec[]> {
    return (await Promise.all((await this.hostIds()).map((h) => this.ofHost(h)))).flat();
  }

  /** Removes the VM's record and name entry; with `releaseLease` (the holder's token), its lease too, in the same script. */
  async remove(v: VmRec, releaseLease = ""): Promise<void> {
    await this.redis.eval(
      `local held = redis.call('HGET', KEYS[1], ARGV[1])
       if held == ARGV[2] or held == ARGV[3] then redis.call('HDEL', KEYS[1], ARGV[1]) end
       redis.call('DEL', KEYS[2], KEYS[4]) redis.call('SREM', KEYS[3], ARGV[3])
       redis.call('XADD', 'mvpc:events', 'MAXLEN', '~', 100000, '*', 'kind', 'vm.deleted', 'vm', ARGV[3])
       ${releaseLua(5, 4)}
       return 1`,
      5,
      K.byName(v.vpcId),
      K.vm(this.hostId, v.id),
      K.host(this.hostId),
      K.userData(this.hostId, v.id),
      K.lease(this.hostId, v.id),
      v.name,
      nameEntry(v),
      v.id,
      releaseLease,
    );
  }

  /**
   * Migration from the old layout, run on vmm start before recovery: each
   * VM of this host still at `mvpc:vm:<id>` (listed in this host's own
   * `mvpc:vm:host:H` and recording hostId H; the record must parse) moves,
   * one Lua script per record, to `mvpc:vm:host:H:vm:<id>`; its lease
   * `mvpc:vmlease:<id>` moves with its remaining time; its name-index entry
   * becomes "H/<id>"; H joins `mvpc:vm:hosts`. The script then deletes the
   * old keys and the id's `mvpc:vms` entry with redis.pcall: a user made by
   * this version's `microvpcd redis-acl` may not write them, so there they
   * stay (never read again; an administrator may delete `mvpc:vm:vm-*`,
   * `mvpc:vmlease:*` and `mvpc:vms`). A record that changed since it was
   * read is left for the next start; one already moved is not overwritten.
   * Returns how many records moved.
   */
  async migrate(): Promise<number> {
    await this.redis.sadd(K.hosts, this.hostId);
    const ids = (await this.redis.smembers(K.host(this.hostId))).filter((id) => VM_ID_RE.test(id));
    let moved = 0;
    for (let i = 0; i < ids.length; i += BATCH) {
      const chunk = ids.slice(i, i + BATCH);
      const [olds, news] = await Promise.all([this.redis.mget(chunk.map((id) => `mvpc:vm:${id}`)), this.redis.mget(chunk.map((id) => K.vm(this.hostId, id)))]);
      for (const [j, id] of chunk.entries()) {
        const old = olds[j];
        if (old === null || news[j] !== null) continue;
        const p = parseVmRec(old, { id, hostId: this.hostId });
        if (!p.ok) {
          reportInvalid(OWNER, "vm", `mvpc:vm:${id}`, `not moved to ${K.vm(this.hostId, id)}: ${p.reason}`, this.log);
          continue;
        }
        const r = await this.redis.eval(
          `local old = 'mvpc:vm:' .. ARGV[2]
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
           return 1`,
          5,
          K.vm(this.hostId, id),
          K.lease(this.hostId, id),
          K.byName(p.value.vpcId),
          K.hosts,
          K.userData(this.hostId, id),
          old,
          id,
          nameEntry(p.value),
          p.value.name,
          this.hostId,
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
}
