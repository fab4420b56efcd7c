// The only DNS module that talks to Redis. Changes are Lua scripts
// (scripts.ts); reads are plain commands. The zone of a VPC is small (one
// record per VM), so the resolver reads it whole.
import type { Redis } from "ioredis";
import { AlreadyExistsError, FailedPreconditionError, NotFoundError } from "../common/errors.js";
import { intToIp } from "../common/validate.js";
import { K as IK } from "../ipam/keys.js";
import type { Logger } from "pino";
import { reportInvalid } from "../common/invalid-records.js";
import { checkRecord, DK, OWNER, parseConfig, parseRecord, type RecordRec, type StoredConfig } from "./schema.js";
import * as S from "./scripts.js";

export { DK } from "./schema.js";
export type { RecordRec, StoredConfig } from "./schema.js";

/** Every key of a VPC's DNS state (what DeleteVpc removes). */
export function vpcDnsKeys(vpc: string): string[] {
  return [DK.records(vpc), DK.names(vpc), DK.owners(vpc), DK.config(vpc)];
}

export const DEFAULT_TTL = 60;

type Reply = (string | number)[];

declare module "ioredis" {
  // eslint-disable-next-line @typescript-eslint/no-unused-vars -- merging needs the same type parameter
  interface RedisCommander<Context> {
    mvpcDnsSet(...args: (string | number)[]): Promise<Reply>;
    mvpcDnsDelete(...args: (string | number)[]): Promise<Reply>;
    mvpcDnsConfig(...args: (string | number)[]): Promise<Reply>;
  }
}

/** A record that does not validate is reported and skipped. */
function checkedRecord(vpcId: string, name: string, v: string, log?: Pick<Logger, "warn">): RecordRec | null {
  const p = parseRecord(vpcId, name, v);
  if (p.ok) return p.value;
  reportInvalid(OWNER, "record", DK.records(vpcId), p.reason, log, { field: name, vpcId });
  return null;
}

/** The VPC's resolver address by default: its base address + 2 (as AWS). */
export function defaultResolver(vpcBase: number): string {
  return intToIp(vpcBase + 2);
}

export class DnsStore {
  /** log: where skipped records are reported (once per key and reason). */
  constructor(
    readonly redis: Redis,
    readonly log?: Pick<Logger, "warn">,
  ) {
    if (!(redis as unknown as { mvpcDnsSet?: unknown }).mvpcDnsSet) {
      redis.defineCommand("mvpcDnsSet", { numberOfKeys: 4, lua: S.SET_RECORD });
      redis.defineCommand("mvpcDnsDelete", { numberOfKeys: 3, lua: S.DELETE_RECORDS });
      redis.defineCommand("mvpcDnsConfig", { numberOfKeys: 3, lua: S.UPDATE_CONFIG });
    }
  }

  async setRecord(r: Omit<RecordRec, "updatedMs">): Promise<{ record: RecordRec; created: boolean }> {
    checkRecord(r);
    const now = Date.now();
    const [code, detail] = await this.redis.mvpcDnsSet(
      IK.vpc(r.vpcId),
      DK.records(r.vpcId),
      DK.names(r.vpcId),
      DK.owners(r.vpcId),
      r.vpcId,
      r.name,
      r.owner,
      r.address,
      r.ttl,
      now,
    );
    if (code === -4) throw new NotFoundError("vpc", r.vpcId, "it was deleted");
    if (code === -1) throw new AlreadyExistsError(`${r.name} is held by ${detail}, not ${r.owner}; delete it first or pick another name`);
    const stored = await this.getRecord(r.vpcId, r.name);
    return { record: stored ?? { ...r, updatedMs: now }, created: code === 1 };
  }

  /** name "" deletes every record of owner. Returns the names deleted. */
  async deleteRecords(vpcId: string, name: string, owner: string): Promise<string[]> {
    const out = await this.redis.mvpcDnsDelete(DK.records(vpcId), DK.names(vpcId), DK.owners(vpcId), vpcId, name, owner);
    if (out[0] === -1) throw new FailedPreconditionError(`${name} is held by ${out[1]}, not ${owner}; nothing was deleted`);
    return out.slice(1).map(String);
  }

  async getRecord(vpcId: string, name: string): Promise<RecordRec | null> {
    const v = await this.redis.hget(DK.records(vpcId), name);
    return v ? checkedRecord(vpcId, name, v, this.log) : null;
  }

  /** Records ordered by name, after `after` (exclusive), at most limit. */
  async listRecords(vpcId: string, after: string, limit: number): Promise<RecordRec[]> {
    const names = await this.redis.zrangebylex(DK.names(vpcId), after ? `(${after}` : "-", "+", "LIMIT", 0, limit);
    if (names.length === 0) return [];
    const vals = await this.redis.hmget(DK.records(vpcId), ...names);
    return names.flatMap((n, i) => {
      const r = vals[i] ? checkedRecord(vpcId, n, vals[i]!, this.log) : null;
      return r ? [r] : [];
    });
  }

  /** Every record of the VPC (the resolver's zone). */
  async allRecords(vpcId: string): Promise<RecordRec[]> {
    const h = await this.redis.hgetall(DK.records(vpcId));
    return Object.entries(h).flatMap(([n, v]) => {
      const r = checkedRecord(vpcId, n, v, this.log);
      return r ? [r] : [];
    });
  }

  /** The stored config; one that does not validate is reported and read as unset (defaults apply). */
  async getConfig(vpcId: string): Promise<StoredConfig> {
    const key = vpcId ? DK.config(vpcId) : DK.defaults;
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

  async updateConfig(vpcId: string, change: { resolver?: { text: string; int: number }; forwarders?: string[] | "inherit"; ttl?: number }): Promise<void> {
    const fmode = change.forwarders === undefined ? "keep" : change.forwarders === "inherit" ? "inherit" : "set";
    const [code, detail] = await this.redis.mvpcDnsConfig(
      vpcId ? IK.vpc(vpcId) : DK.defaults,
      vpcId ? DK.config(vpcId) : DK.defaults,
      vpcId ? IK.vpcSubnets(vpcId) : DK.defaults,
      vpcId,
      change.resolver?.text ?? "",
      change.resolver?.int ?? 0,
      fmode,
      Array.isArray(change.forwarders) ? JSON.stringify(change.forwarders) : "",
      change.ttl ?? "",
      Date.now(),
    );
    if (code === -4) throw new NotFoundError("vpc", vpcId, "it was deleted");
    if (code === -2)
      throw new FailedPreconditionError(
        `resolver_address ${change.resolver?.text} is allocated to ${detail}; release it or pick a free address (the default subnet layout reserves base + 2 and + 3)`,
      );
    if (code === -3)
      throw new FailedPreconditionError(
        `resolver_address ${change.resolver?.text} is the network or broadcast address of subnet ${detail}; pick a host address`,
      );
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
