// The VPN's Redis adapter: endpoint and client records (schema.ts has the
// layout), written atomically by small Lua scripts, read back through the
// parsers in schema.ts.
import type { Redis } from "ioredis";
import * as V from "../../common/validate.js";
import { reportInvalid } from "../../common/invalid-records.js";
import { FK, parseGroup, parseMember } from "../../firewall/schema.js";
import { parseClient, parseEndpoint, VK } from "./schema.js";
import type { VpnClientRec, VpnEndpointRec } from "./plan.js";

const OWNER = "netagent";

export type SecurityGroupRec = Extract<ReturnType<typeof parseGroup>, { ok: true }>["value"];

// KEYS: clients keys addrs client-index gen; ARGV: name key address id json
const CREATE = `
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 'name' end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return 'key' end
if redis.call('HEXISTS', KEYS[3], ARGV[3]) == 1 then return 'addr' end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[3], ARGV[1])
redis.call('SET', KEYS[4], ARGV[6])
return tostring(redis.call('INCR', KEYS[5]))
`;
// KEYS: clients keys addrs client-index gen; ARGV: name key address
const DELETE = `
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return '0' end
if redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[1] then redis.call('HDEL', KEYS[2], ARGV[2]) end
if redis.call('HGET', KEYS[3], ARGV[3]) == ARGV[1] then redis.call('HDEL', KEYS[3], ARGV[3]) end
redis.call('DEL', KEYS[4])
return tostring(redis.call('INCR', KEYS[5]))
`;

/** CREATE's and DELETE's KEYS (the VPC's name, key and address indexes, the record, the generation) and first ARGV. */
function clientKeysAndArgs(c: VpnClientRec): string[] {
  return [VK.clients(c.vpcId), VK.keys(c.vpcId), VK.addrs(c.vpcId), VK.client(c.id), VK.gen, c.name, c.publicKey, c.address];
}

export class VpnStore {
  constructor(readonly redis: Redis) {}

  async gen(): Promise<number> {
    return Number((await this.redis.get(VK.gen)) ?? 0);
  }

  /** Writes the endpoint; returns the new gen. The public key stays (the host keeps its key). */
  async setEndpoint(e: Omit<VpnEndpointRec, "publicKey">): Promise<number> {
    const r = await this.redis
      .multi()
      .hset(VK.ep(e.vpcId), {
        vpc: e.vpcId,
        host: e.hostId,
        addr: e.publicAddress,
        port: String(e.listenPort),
        cidr: e.clientCidr,
        updated: String(e.updatedMs),
      })
      .sadd(VK.eps, e.vpcId)
      .incr(VK.gen)
      .exec();
    return Number(r?.[2]?.[1] ?? 0);
  }

  async endpointVpcs(): Promise<string[]> {
    return (await this.redis.smembers(VK.eps)).filter((v) => /^vpc-[0-9a-f]{12}$/.test(v)).sort();
  }

  /** The endpoint, parsed against the VPC CIDR; null if none or invalid (reported). */
  async endpoint(vpcId: string, vpcCidr: string): Promise<VpnEndpointRec | null> {
    const [h, key] = await Promise.all([this.redis.hgetall(VK.ep(vpcId)), this.redis.get(VK.epKey(vpcId))]);
    if (!h.vpc) return null;
    const p = parseEndpoint(h, vpcCidr, key && /^[A-Za-z0-9+/]{43}=$/.test(key) ? key : null);
    if (!p.ok || p.value.vpcId !== vpcId) {
      reportInvalid(OWNER, "vpn endpoint", VK.ep(vpcId), p.ok ? "names another VPC" : p.reason, undefined, { vpcId });
      return null;
    }
    return p.value;
  }

  async setEndpointKey(vpcId: string, key: string): Promise<void> {
    await this.redis.set(VK.epKey(vpcId), key);
  }

  async setApplied(vpcId: string, gen: number): Promise<void> {
    await this.redis.set(VK.epApplied(vpcId), String(gen));
  }

  async applied(vpcId: string): Promise<number> {
    return Number((await this.redis.get(VK.epApplied(vpcId))) ?? -1);
  }

  async clients(vpcId: string, range: V.Cidr): Promise<VpnClientRec[]> {
    const h = await this.redis.hgetall(VK.clients(vpcId));
    const out: VpnClientRec[] = [];
    for (const [name, raw] of Object.entries(h)) {
      const p = parseClient(raw, vpcId, range);
      if (p.ok && p.value.name === name) out.push(p.value);
      else reportInvalid(OWNER, "vpn client", VK.clients(vpcId), p.ok ? `entry ${V.show(name)} holds ${p.value.name}` : p.reason, undefined, { vpcId });
    }
    return out.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  async usedAddresses(vpcId: string): Promise<Set<string>> {
    return new Set(await this.redis.hkeys(VK.addrs(vpcId)));
  }

  /** The new generation when written, else which of name/key/addr was taken. */
  async create(c: VpnClientRec): Promise<{ gen: number } | { taken: "name" | "key" | "addr" }> {
    const r = (await this.redis.eval(CREATE, 5, ...clientKeysAndArgs(c), c.id, JSON.stringify(c), `${c.vpcId}/${c.name}`)) as string;
    return r === "name" || r === "key" || r === "addr" ? { taken: r } : { gen: Number(r) };
  }

  async delete(c: VpnClientRec): Promise<number | null> {
    const r = (await this.redis.eval(DELETE, 5, ...clientKeysAndArgs(c))) as string;
    return r === "0" ? null : Number(r);
  }

  /** "<vpc>/<name>" of a client id, checked. */
  async locate(id: string): Promise<{ vpcId: string; name: string } | null> {
    const v = await this.redis.get(VK.client(id));
    const m = v ? /^(vpc-[0-9a-f]{12})\/([a-z][a-z0-9-]{0,62})$/.exec(v) : null;
    return m ? { vpcId: m[1], name: m[2] } : null;
  }

  async clientByName(vpcId: string, name: string, range: V.Cidr): Promise<VpnClientRec | null> {
    const raw = await this.redis.hget(VK.clients(vpcId), name);
    if (!raw) return null;
    const p = parseClient(raw, vpcId, range);
    if (!p.ok || p.value.name !== name) {
      reportInvalid(OWNER, "vpn client", VK.clients(vpcId), p.ok ? "name mismatch" : p.reason, undefined, { vpcId });
      return null;
    }
    return p.value;
  }

  // ---- the firewall's security groups, read through its schema ----

  async groupIdByName(vpcId: string, name: string): Promise<string | null> {
    return await this.redis.hget(FK.sgByName(vpcId), name);
  }

  async group(id: string): Promise<SecurityGroupRec | null> {
    const h = await this.redis.hgetall(FK.sg(id));
    if (!h.id) return null;
    const p = parseGroup(h, id);
    if (!p.ok) {
      reportInvalid(OWNER, "security group", FK.sg(id), p.reason);
      return null;
    }
    return p.value;
  }

  async members(groupId: string): Promise<string[]> {
    const h = await this.redis.hgetall(FK.sgMembers(groupId));
    return Object.entries(h).flatMap(([nic, a]) => {
      const p = parseMember(nic, a);
      return p.ok ? [p.value] : [];
    });
  }
}
