// VM records and the journal of in-flight operations, in Redis. A step is
// recorded as done only after it succeeded, and the record of what it made
// (address, NIC id…) is written with it, so a vmm killed at any point knows
// on restart exactly what to undo or finish.
import type { Redis } from "ioredis";

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

const K = {
  vm: (id: string) => `mvpc:vm:${id}`,
  byName: (vpc: string) => `mvpc:vm:vpc:${vpc}:byname`,
  host: (h: string) => `mvpc:vm:host:${h}`,
  all: "mvpc:vms",
  lease: (id: string) => `mvpc:vmlease:${id}`,
};

/** How long a VM's lease lives unless renewed (its holder renews it every third of this). */
export const LEASE_MS = 15_000;

export class VmStore {
  constructor(readonly redis: Redis) {}

  /**
   * Claims the name in the VPC; returns the id holding it (ours or another).
   * A claim that succeeds also takes the VM's lease for `leaseToken`, in
   * the same script: no DeleteVm can slip in between the record appearing
   * and its create holding the VM.
   */
  async claim(v: VmRec, leaseToken: string): Promise<string> {
    const r = await this.redis.eval(
      `local held = redis.call('HGET', KEYS[1], ARGV[1])
       if held and redis.call('EXISTS', 'mvpc:vm:' .. held) == 1 then return held end
       redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
       redis.call('SET', KEYS[2], ARGV[3])
       redis.call('SET', KEYS[5], ARGV[4], 'PX', ARGV[5])
       redis.call('SADD', KEYS[3], ARGV[2])
       redis.call('ZADD', KEYS[4], 0, ARGV[2])
       redis.call('XADD', 'mvpc:events', 'MAXLEN', '~', 100000, '*', 'kind', 'vm.created', 'vm', ARGV[2])
       return ARGV[2]`,
      5,
      K.byName(v.vpcId),
      K.vm(v.id),
      K.host(v.hostId),
      K.all,
      K.lease(v.id),
      v.name,
      v.id,
      JSON.stringify(v),
      leaseToken,
      LEASE_MS,
    );
    return String(r);
  }

  // ---- per-VM lease: one operation (create, delete, recovery) at a time ----

  /**
   * Takes the VM's lease unless another holds it. takeOverUnless: a token
   * prefix (this process's); a lease whose holder does not start with it is
   * taken anyway — recovery's, on the assumption the vmm docs make (one vmm
   * per hypervisor: another holder on this host is a previous, dead run).
   */
  async acquireLease(id: string, token: string, takeOverUnless = ""): Promise<boolean> {
    const r = await this.redis.eval(
      `local cur = redis.call('GET', KEYS[1])
       if cur and (ARGV[3] == '' or string.sub(cur, 1, #ARGV[3]) == ARGV[3]) then return 0 end
       redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1`,
      1,
      K.lease(id),
      token,
      LEASE_MS,
      takeOverUnless,
    );
    return r === 1;
  }

  /** Extends the lease if it is still ours; false if it was lost. */
  async renewLease(id: string, token: string): Promise<boolean> {
    const r = await this.redis.eval(
      "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0",
      1,
      K.lease(id),
      token,
      LEASE_MS,
    );
    return r === 1;
  }

  async releaseLease(id: string, token: string): Promise<void> {
    await this.redis.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end return 0", 1, K.lease(id), token);
  }

  /** Who holds the VM's lease ("" if nobody). */
  async leaseHolder(id: string): Promise<string> {
    return (await this.redis.get(K.lease(id))) ?? "";
  }

  async put(v: VmRec): Promise<void> {
    await this.redis.set(K.vm(v.id), JSON.stringify(v));
  }

  async get(id: string): Promise<VmRec | null> {
    const j = await this.redis.get(K.vm(id));
    return j ? (JSON.parse(j) as VmRec) : null;
  }

  async byName(vpcId: string, name: string): Promise<VmRec | null> {
    const id = await this.redis.hget(K.byName(vpcId), name);
    return id ? this.get(id) : null;
  }

  async ofHost(hostId: string): Promise<VmRec[]> {
    const ids = await this.redis.smembers(K.host(hostId));
    return (await Promise.all(ids.map((id) => this.get(id)))).filter((x): x is VmRec => !!x);
  }

  async all(): Promise<VmRec[]> {
    const ids = await this.redis.zrange(K.all, 0, -1);
    return (await Promise.all(ids.map((id) => this.get(id)))).filter((x): x is VmRec => !!x);
  }

  async remove(v: VmRec): Promise<void> {
    await this.redis.eval(
      `if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end
       redis.call('DEL', KEYS[2]) redis.call('SREM', KEYS[3], ARGV[2]) redis.call('ZREM', KEYS[4], ARGV[2])
       redis.call('XADD', 'mvpc:events', 'MAXLEN', '~', 100000, '*', 'kind', 'vm.deleted', 'vm', ARGV[2])
       return 1`,
      4,
      K.byName(v.vpcId),
      K.vm(v.id),
      K.host(v.hostId),
      K.all,
      v.name,
      v.id,
    );
  }
}
