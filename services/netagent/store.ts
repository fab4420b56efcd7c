// Desired state of one hypervisor, in Redis: which VPCs, subnets and NICs it
// should have. Written before the kernel is touched, so an agent that dies
// half-way finds the intent on restart and finishes (or undoes) it.
//
// Every record is parsed on read by schema.ts (the rules the API applies to
// requests): a bad one is left out of the desired state and reported in
// `invalid`, the rest is used. The writer checks with the same parsers.
import type { Redis } from "ioredis";
import { InvalidArgumentError } from "../common/errors.js";
import { EVENTS, hostEvents, LUA_EMIT, SCOPED_MAXLEN, vpcEvents } from "../common/events.js";
import type { NicSpec, SubnetSpec } from "./plan.js";
import { HostReader, hostKeys, overlayKeys, parseNicSpec, parseSubnetSpec, parseVpcSpec, type Parsed, type VpcSpec } from "./schema.js";

export { HostReader, locateNic, overlayKeys } from "./schema.js";
export type { HostDesired, VpcSpec } from "./schema.js";

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

/** The netagent's store: the reads of HostReader (schema.ts) and every write, each checked by the parser that reads it back. */
export class HostStore extends HostReader {
  constructor(redis: Redis, hostId: string) {
    super(redis, hostId);
    if (!(redis as unknown as { mvpcAddNic?: unknown }).mvpcAddNic) redis.defineCommand("mvpcAddNic", { numberOfKeys: 3, lua: ADD_NIC });
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

  async delNic(n: NicSpec): Promise<void> {
    this.lastValid.nics.delete(n.nicId);
    const ev = ["kind", "nic.detached", "host", this.hostId, "nic", n.nicId, "vpc", n.vpcId];
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
      .xadd(EVENTS, "MAXLEN", "~", "100000", "*", ...ev)
      .xadd(vpcEvents(n.vpcId), "MAXLEN", "~", String(SCOPED_MAXLEN), "*", ...ev)
      .xadd(hostEvents(this.hostId), "MAXLEN", "~", String(SCOPED_MAXLEN), "*", ...ev)
      .exec();
  }
}
