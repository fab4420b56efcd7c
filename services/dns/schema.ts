// DNS records and resolver configuration in Redis: keys, types, and the
// checks shared by the API (service.ts), the writer (store.ts) and every
// reader. The resolver address reaches `ip addr` and nft on every
// hypervisor (gateway/sync.ts) and the forwarders reach the resolver's
// sockets, so what is read back is checked as a request would be: a config
// that does not validate is skipped (reported) and the VPC runs on defaults.
import type { Redis } from "ioredis";
import type { Logger } from "pino";
import { InvalidArgumentError } from "../common/errors.js";
import { reportInvalid } from "../common/invalid-records.js";
import { managementHolding } from "../common/management.js";
import * as V from "../common/validate.js";
import { parseForwarder } from "./zone.js";

export const OWNER = "dns";

/** Where a VPC's DNS state and the defaults live: DK on a single Redis, DK_CLUSTER on a cluster (dnsKeys). */
export interface DnsKeys {
  records(vpc: string): string;
  names(vpc: string): string;
  owners(vpc: string): string;
  config(vpc: string): string;
  defaults: string;
}

export const DK: DnsKeys = {
  records: (vpc: string) => `mvpc:dns:vpc:${vpc}:rec`,
  names: (vpc: string) => `mvpc:dns:vpc:${vpc}:names`,
  owners: (vpc: string) => `mvpc:dns:vpc:${vpc}:own`,
  config: (vpc: string) => `mvpc:dns:vpc:${vpc}:cfg`,
  defaults: "mvpc:dns:defaults",
};

/**
 * On a Redis Cluster: a VPC's DNS state under its hash tag, beside IPAM's
 * record of the VPC (ipam/keys.ts IpamKeys), so that each script checks the
 * VPC and writes in one slot; the defaults under "{hosts}", the slot of the
 * fleet stream their change is announced on. A single Redis keeps DK, as
 * IPAM keeps its names there.
 */
export const DK_CLUSTER: DnsKeys = {
  records: (vpc: string) => `mvpc:{${vpc}}:dns:rec`,
  names: (vpc: string) => `mvpc:{${vpc}}:dns:names`,
  owners: (vpc: string) => `mvpc:{${vpc}}:dns:own`,
  config: (vpc: string) => `mvpc:{${vpc}}:dns:cfg`,
  defaults: "mvpc:{hosts}:dns:defaults",
};

/** The DNS keys of the Redis `redis` is. */
export function dnsKeys(redis: Redis): DnsKeys {
  return redis.isCluster ? DK_CLUSTER : DK;
}

export interface RecordRec {
  vpcId: string;
  name: string;
  address: string;
  ttl: number;
  owner: string;
  updatedMs: number;
}

/** What is stored for a VPC (or the defaults); unset fields inherit. */
export interface StoredConfig {
  resolver?: string;
  forwarders?: string[];
  ttl?: number;
  updatedMs?: number;
}

export const LABEL_RE = /^[a-z0-9]([a-z0-9-]{0,62})$/;
export const MAX_FORWARDERS = 4;
export const MIN_TTL = 1;
export const MAX_TTL = 86400;

export function label(field: string, value: string): string {
  if (value === "") throw new InvalidArgumentError(field, 'is required (a label such as "web1")');
  if (!LABEL_RE.test(value)) {
    throw new InvalidArgumentError(
      field,
      `${V.show(value)} is not a DNS label: use 1–63 characters of lowercase letters, digits and '-', starting with a letter or digit (e.g. "web1")`,
    );
  }
  return value;
}

export function ttl(field: string, value: number): number {
  if (!Number.isInteger(value) || value < MIN_TTL || value > MAX_TTL)
    throw new InvalidArgumentError(field, `${value} is out of range; use ${MIN_TTL}–${MAX_TTL} seconds`);
  return value;
}

/**
 * Forwarders "a.b.c.d[:port]", at most 4. Never 0.0.0.0/8, multicast or
 * reserved space; a VPC's own list also never the hypervisor's loopback or
 * link-local (a tenant must not aim the resolver at the host's services),
 * while the defaults (an operator's choice) may name a host-local resolver.
 * `management` (the ipam daemon's --management-cidrs): a VPC's own list
 * never names an address inside it either.
 */
export function forwarders(field: string, list: string[], forVpc: boolean, management: readonly string[] = []): string[] {
  V.jsonArray(field, list, Number.MAX_SAFE_INTEGER);
  if (list.length > MAX_FORWARDERS) throw new InvalidArgumentError(field, `has ${list.length} addresses; at most ${MAX_FORWARDERS}`);
  const out: string[] = [];
  for (const [i, s] of list.entries()) {
    let f: { host: string; port: number };
    V.jsonString(`${field}[${i}]`, s);
    try {
      f = parseForwarder(s);
    } catch (e) {
      throw new InvalidArgumentError(`${field}[${i}]`, `${(e as Error).message} (e.g. "192.0.2.53" or "192.0.2.53:5353")`);
    }
    const first = Number(f.host.split(".")[0]);
    const second = Number(f.host.split(".")[1]);
    if (first === 0 || first >= 224) throw new InvalidArgumentError(`${field}[${i}]`, `${f.host} is not a unicast address`);
    if (forVpc && (first === 127 || (first === 169 && second === 254))) {
      throw new InvalidArgumentError(
        `${field}[${i}]`,
        `${f.host} is the hypervisor's own (loopback or link-local); a VPC may only forward to a routable resolver`,
      );
    }
    const mgmt = forVpc ? managementHolding(management, f.host) : undefined;
    if (mgmt) {
      throw new InvalidArgumentError(
        `${field}[${i}]`,
        `${f.host} is inside the management network (${mgmt}); a VPC may only forward to a resolver outside it (hypervisors never forward there)`,
      );
    }
    const canon = `${f.host}:${f.port}`;
    if (out.some((o) => o === canon)) throw new InvalidArgumentError(`${field}[${i}]`, `${s} appears twice`);
    out.push(canon);
  }
  return out;
}

/** A stored config hash (a VPC's, or the defaults when forVpc is false). */
export function parseConfig(h: Record<string, string>, forVpc: boolean): V.Parsed<StoredConfig> {
  return V.attempt(() => {
    const c: StoredConfig = {};
    if (h.resolver) {
      if (!forVpc) throw new InvalidArgumentError("resolver", "is set in the defaults; each VPC has its own address");
      V.ipv4("resolver", h.resolver);
      c.resolver = h.resolver;
    }
    if (h.forwarders !== undefined) {
      const list = V.storedJson("forwarders", h.forwarders, 4096) as string[];
      const canon = forwarders("forwarders", list, forVpc);
      // Stored canonical ("a.b.c.d:port"), so the check must not change it.
      if (JSON.stringify(canon) !== JSON.stringify(list)) throw new InvalidArgumentError("forwarders", `${V.show(h.forwarders)} is not in canonical form`);
      c.forwarders = canon;
    }
    if (h.ttl) c.ttl = ttl("ttl", V.storedInt("ttl", h.ttl, MIN_TTL, MAX_TTL));
    if (h.updated) c.updatedMs = V.storedInt("updated", h.updated);
    return c;
  });
}

/** A record's fields, as the writer stores them and a reader gets them back. */
export function checkRecord(r: Omit<RecordRec, "updatedMs">): void {
  V.id("vpc", r.vpcId, "vpc");
  label("name", r.name);
  V.ipv4("address", r.address);
  ttl("ttl", r.ttl);
  V.token("owner", r.owner);
}

/** A stored record: "address\nttl\nowner\nupdated" under its name. */
export function parseRecord(vpcId: string, name: string, v: string): V.Parsed<RecordRec> {
  return V.attempt(() => {
    const parts = v.split("\n");
    if (parts.length !== 4) throw new InvalidArgumentError("value", `has ${parts.length} lines, not 4 (address, ttl, owner, updated)`);
    const [address, t, owner, updated] = parts;
    const r = { vpcId, name, address, ttl: V.storedInt("ttl", t, MIN_TTL, MAX_TTL), owner, updatedMs: V.storedInt("updated", updated) };
    checkRecord(r);
    return r;
  });
}

/** Every key of a VPC's DNS state (what DeleteVpc removes). */
export function vpcDnsKeys(vpc: string, keys: DnsKeys = DK): string[] {
  return [keys.records(vpc), keys.names(vpc), keys.owners(vpc), keys.config(vpc)];
}

export const DEFAULT_TTL = 60;

/** A record that does not validate is reported (under its key) and skipped. */
function checkedRecord(key: string, vpcId: string, name: string, v: string, log?: Pick<Logger, "warn">): RecordRec | null {
  const p = parseRecord(vpcId, name, v);
  if (p.ok) return p.value;
  reportInvalid(OWNER, "record", key, p.reason, log, { field: name, vpcId });
  return null;
}

/** The VPC's resolver address by default: its base address + 2 (as AWS). */
export function defaultResolver(vpcBase: number): string {
  return V.intToIp(vpcBase + 2);
}

/** What other services read of DNS (the resolver's zone, a VPC's config), never a write. */
export class DnsReader {
  /** Where the DNS state is on this Redis (DnsKeys). */
  readonly DK: DnsKeys;

  /** log: where skipped records are reported (once per key and reason). */
  constructor(
    readonly redis: Redis,
    readonly log?: Pick<Logger, "warn">,
  ) {
    this.DK = dnsKeys(redis);
  }

  async getRecord(vpcId: string, name: string): Promise<RecordRec | null> {
    const v = await this.redis.hget(this.DK.records(vpcId), name);
    return v ? checkedRecord(this.DK.records(vpcId), vpcId, name, v, this.log) : null;
  }

  /**
   * The named records of a VPC, read at once (HMGET): name → record, or null
   * where there is none or it does not validate (reported, as everywhere).
   */
  async records(vpcId: string, names: string[]): Promise<Map<string, RecordRec | null>> {
    const out = new Map<string, RecordRec | null>();
    if (names.length === 0) return out;
    const vals = await this.redis.hmget(this.DK.records(vpcId), ...names);
    names.forEach((n, i) => out.set(n, vals[i] ? checkedRecord(this.DK.records(vpcId), vpcId, n, vals[i]!, this.log) : null));
    return out;
  }

  /** Records ordered by name, after `after` (exclusive), at most limit. */
  async listRecords(vpcId: string, after: string, limit: number): Promise<RecordRec[]> {
    const names = await this.redis.zrangebylex(this.DK.names(vpcId), after ? `(${after}` : "-", "+", "LIMIT", 0, limit);
    return [...(await this.records(vpcId, names)).values()].filter((r): r is RecordRec => r !== null);
  }

  /** Every record of the VPC (the resolver's zone). */
  async allRecords(vpcId: string): Promise<RecordRec[]> {
    const h = await this.redis.hgetall(this.DK.records(vpcId));
    return Object.entries(h).flatMap(([n, v]) => {
      const r = checkedRecord(this.DK.records(vpcId), vpcId, n, v, this.log);
      return r ? [r] : [];
    });
  }

  /** The stored config; one that does not validate is reported and read as unset (defaults apply). */
  async getConfig(vpcId: string): Promise<StoredConfig> {
    const key = vpcId ? this.DK.config(vpcId) : this.DK.defaults;
    let h: Record<string, string>;
    try {
      h = await this.redis.hgetall(key);
    } catch (err) {
      if (!/WRONGTYPE/.test((err as Error).message)) throw err;
      reportInvalid(OWNER, "config", key, "is not a hash", this.log, { vpcId: vpcId || undefined });
      return {};
    }
    const p = parseConfig(h, vpcId !== "");
    if (p.ok) return p.value;
    const named = /^([A-Za-z_][A-Za-z0-9_]*)/.exec(p.reason)?.[1];
    reportInvalid(OWNER, "config", key, p.reason, this.log, {
      field: named !== undefined && Object.hasOwn(h, named) ? named : undefined,
      vpcId: vpcId || undefined,
    });
    return {};
  }

  /** The effective configuration of a VPC whose base address is vpcBase. */
  async effective(vpcId: string, vpcBase: number): Promise<{ resolver: string; forwarders: string[]; inherited: boolean; ttl: number; updatedMs?: number }> {
    const [own, defs] = await Promise.all([this.getConfig(vpcId), this.getConfig("")]);
    return {
      resolver: own.resolver ?? defaultResolver(vpcBase),
      forwarders: own.forwarders ?? defs.forwarders ?? [],
      inherited: own.forwarders === undefined,
      ttl: own.ttl ?? defs.ttl ?? DEFAULT_TTL,
      updatedMs: own.updatedMs,
    };
  }
}
