// DNS's writes to Redis. Changes are Lua scripts (scripts.ts); reads are
// plain commands, in DnsReader (schema.ts), which other services use and
// DnsStore extends. The zone of a VPC is small (one record per VM), so the
// resolver reads it whole.
import type { Redis } from "ioredis";
import { AlreadyExistsError, FailedPreconditionError, NotFoundError } from "../common/errors.js";
import { ipamKeys, shownOwner, type IpamKeys } from "../ipam/schema.js";
import { scriptFor } from "../common/events.js";
import type { Logger } from "pino";
import { reportInvalid } from "../common/invalid-records.js";
import { checkRecord, DnsReader, OWNER, type RecordRec } from "./schema.js";
import * as S from "./scripts.js";

export { DEFAULT_TTL, defaultResolver, DK, DK_CLUSTER, dnsKeys, DnsReader, vpcDnsKeys } from "./schema.js";
export type { RecordRec, StoredConfig } from "./schema.js";

type Reply = (string | number)[];

declare module "ioredis" {
  // eslint-disable-next-line @typescript-eslint/no-unused-vars -- merging needs the same type parameter
  interface RedisCommander<Context> {
    mvpcDnsSet(...args: (string | number)[]): Promise<Reply>;
    mvpcDnsDelete(...args: (string | number)[]): Promise<Reply>;
    mvpcDnsConfig(...args: (string | number)[]): Promise<Reply>;
  }
}

/** The DNS API's store: the reads of DnsReader (schema.ts) and every write (one Lua script each). */
export class DnsStore extends DnsReader {
  /** Where IPAM's VPC records and subnet indexes are, which the scripts check (ipam/keys.ts). */
  private readonly IK: IpamKeys;

  /** log: where skipped records are reported (once per key and reason). */
  constructor(redis: Redis, log?: Pick<Logger, "warn">) {
    super(redis, log);
    this.IK = ipamKeys(redis);
    if (!(redis as unknown as { mvpcDnsSet?: unknown }).mvpcDnsSet) {
      redis.defineCommand("mvpcDnsSet", { numberOfKeys: 4, lua: scriptFor(redis, S.SET_RECORD) });
      redis.defineCommand("mvpcDnsDelete", { numberOfKeys: 3, lua: scriptFor(redis, S.DELETE_RECORDS) });
      redis.defineCommand("mvpcDnsConfig", { numberOfKeys: 3, lua: scriptFor(redis, S.UPDATE_CONFIG) });
    }
  }

  async setRecord(r: Omit<RecordRec, "updatedMs">): Promise<{ record: RecordRec; created: boolean }> {
    checkRecord(r);
    const now = Date.now();
    const [code, detail] = await this.redis.mvpcDnsSet(
      this.IK.vpc(r.vpcId),
      this.DK.records(r.vpcId),
      this.DK.names(r.vpcId),
      this.DK.owners(r.vpcId),
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
    const out = await this.redis.mvpcDnsDelete(this.DK.records(vpcId), this.DK.names(vpcId), this.DK.owners(vpcId), vpcId, name, owner);
    if (out[0] === -1) throw new FailedPreconditionError(`${name} is held by ${out[1]}, not ${owner}; nothing was deleted`);
    return out.slice(1).map(String);
  }

  async updateConfig(vpcId: string, change: { resolver?: { text: string; int: number }; forwarders?: string[] | "inherit"; ttl?: number }): Promise<void> {
    const fmode = change.forwarders === undefined ? "keep" : change.forwarders === "inherit" ? "inherit" : "set";
    const [code, detail] = await this.redis.mvpcDnsConfig(
      vpcId ? this.IK.vpc(vpcId) : this.DK.defaults,
      vpcId ? this.DK.config(vpcId) : this.DK.defaults,
      vpcId ? this.IK.vpcSubnets(vpcId) : this.DK.defaults,
      vpcId,
      change.resolver?.text ?? "",
      change.resolver?.int ?? 0,
      fmode,
      Array.isArray(change.forwarders) ? JSON.stringify(change.forwarders) : "",
      change.ttl ?? "",
      Date.now(),
      this.IK.subnetIn(vpcId, ""),
    );
    if (code === -4) throw new NotFoundError("vpc", vpcId, "it was deleted");
    if (code === -2) {
      throw new FailedPreconditionError(
        `resolver_address ${change.resolver?.text} is allocated to ${shownOwner(String(detail))}; release it or pick a free address (the default subnet layout reserves base + 2 and + 3)`,
      );
    }
    if (code === -5) {
      const key = this.IK.vpcSubnets(vpcId);
      reportInvalid(OWNER, "subnet-index", key, "holds an entry that is not a subnet id", undefined, { vpcId });
      throw new FailedPreconditionError(
        `VPC ${vpcId}: its subnet index in Redis (${key}) holds an entry that is not a subnet id; nothing was changed (it is counted in microvpc_invalid_records)`,
      );
    }
    if (code === -3)
      throw new FailedPreconditionError(
        `resolver_address ${change.resolver?.text} is the network or broadcast address of subnet ${detail}; pick a host address`,
      );
    if (code !== 1) throw new Error(`dns config script returned ${code}`);
  }
}
