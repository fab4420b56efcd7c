// The VPN's Redis adapter: endpoint and client records (schema.ts has the
// layout), written atomically by small Lua scripts, read back through the
// parsers in schema.ts.
import type { Redis } from "ioredis";
import * as V from "../../common/validate.js";
import { reportInvalid } from "../../common/invalid-records.js";
import { emit, LUA_EMIT, scriptFor } from "../../common/events.js";
import { fwKeys, parseGroup, parseMember } from "../../firewall/schema.js";
import { ipamKeys, LUA_RANGE_CHECKS, reservationValue } from "../../ipam/schema.js";
import { parseClient, parseEndpoint, vpnKeysOf, type VpnKeys } from "./schema.js";
import type { VpnClientRec, VpnEndpointRec } from "./plan.js";

const OWNER = "netagent";

export type SecurityGroupRec = Extract<ReturnType<typeof parseGroup>, { ok: true }>["value"];

// The event a client change appends to its VPC's stream: the firewall of
// every host of the VPC puts the client's address in (or takes it out of)
// the member sets of its groups (firewall/store.ts loadVpcState).
// Refused if the endpoint is gone by now, or its client range is no longer
// the one the address was taken from (ARGV[9]): DeleteVpnEndpoint's script
// deletes it only while the VPC has no client, so no client outlives it.
// A SetVpnEndpoint that narrows the range checks the clients' addresses in
// its script (the addrs hash, same slot): whichever of the two runs second
// is refused.
// KEYS: clients keys addrs client-index gen ep; ARGV: name key address vpc id groups(csv) json index range
const CREATE = `${LUA_EMIT}
if redis.call('HGET', KEYS[6], 'cidr') ~= ARGV[9] then return 'endpoint' end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 'name' end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return 'key' end
if redis.call('HEXISTS', KEYS[3], ARGV[3]) == 1 then return 'addr' end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[7])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[3], ARGV[1])
redis.call('SET', KEYS[4], ARGV[8])
local g = redis.call('INCR', KEYS[5])
mvpc_emit({ARGV[4]}, {}, 'kind', 'vpn.client.created', 'vpc', ARGV[4], 'client', ARGV[5], 'address', ARGV[3], 'groups', ARGV[6])
return tostring(g)
`;
// KEYS: clients keys addrs client-index gen; ARGV: name key address vpc id groups(csv)
const DELETE = `${LUA_EMIT}
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return '0' end
if redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[1] then redis.call('HDEL', KEYS[2], ARGV[2]) end
if redis.call('HGET', KEYS[3], ARGV[3]) == ARGV[1] then redis.call('HDEL', KEYS[3], ARGV[3]) end
redis.call('DEL', KEYS[4])
local g = redis.call('INCR', KEYS[5])
mvpc_emit({ARGV[4]}, {}, 'kind', 'vpn.client.deleted', 'vpc', ARGV[4], 'client', ARGV[5], 'address', ARGV[3], 'groups', ARGV[6])
return tostring(g)
`;
// The endpoint and IPAM's reservation of its client range, in one step with
// the check that no subnet of the VPC overlaps the range: CreateSubnet's
// script checks the reservation the same way (ipam/schema.ts
// LUA_RANGE_CHECKS), so whichever runs second is refused.
// KEYS: vpc, vpc subnets, vpc reserved, ep, gen, the VPC's client addresses; ARGV: vpc base size
// reservation, the prefix of the subnets' records (IpamKeys.subnetIn), then the ep's field/value pairs.
// Returns {1, gen}, {-4} no VPC, {-2, subnet id} overlaps a subnet, {-6, owner} overlaps another reservation,
// {-7, "name (address), …"} clients (up to 3 named) hold addresses that are not hosts of the new range.
// The listing of endpoints (eps) is written before it and again after it, apart: on a cluster it is in another slot.
const SET_ENDPOINT = `${LUA_EMIT}${LUA_RANGE_CHECKS}
if redis.call('EXISTS', KEYS[1]) == 0 then return {-4, ''} end
local base, size = tonumber(ARGV[2]), tonumber(ARGV[3])
local s = subnet_overlapping(KEYS[2], base, size, ARGV[5])
if s then return {-2, s} end
local o = reservation_overlapping(KEYS[3], base, size, 'vpn')
if o then return {-6, o} end
local held, outside = redis.call('HGETALL', KEYS[6]), {}
for i = 1, #held - 1, 2 do
  local o1, o2, o3, o4 = string.match(held[i], '^(%d+)%.(%d+)%.(%d+)%.(%d+)$')
  local a = o1 and ((tonumber(o1) * 256 + tonumber(o2)) * 256 + tonumber(o3)) * 256 + tonumber(o4)
  if not a or a <= base or a >= base + size - 1 then
    outside[#outside + 1] = held[i + 1] .. ' (' .. held[i] .. ')'
    if #outside == 3 then break end
  end
end
if #outside > 0 then return {-7, table.concat(outside, ', ')} end
redis.call('HSET', KEYS[3], 'vpn', ARGV[4])
local f = {}
for i = 6, #ARGV do f[#f + 1] = ARGV[i] end
redis.call('HSET', KEYS[4], unpack(f))
local g = redis.call('INCR', KEYS[5])
mvpc_emit({ARGV[1]}, {}, 'kind', 'vpn.endpoint.set', 'vpc', ARGV[1])
return {1, g}
`;

// The endpoint and IPAM's reservation of its client range go together, and
// only while the VPC has no client (a client's address is from the range).
// KEYS: ep, clients, vpc reserved, gen; ARGV: vpc.
// Returns {1, gen}, {0, ''} no endpoint, {-1, number of clients} the VPC still has clients.
// The listing of endpoints (eps) is taken out after it, apart: on a cluster it is in another slot.
const DELETE_ENDPOINT = `${LUA_EMIT}
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, ''} end
local n = redis.call('HLEN', KEYS[2])
if n > 0 then return {-1, n} end
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[3], 'vpn')
local g = redis.call('INCR', KEYS[4])
mvpc_emit({ARGV[1]}, {}, 'kind', 'vpn.endpoint.deleted', 'vpc', ARGV[1])
return {1, g}
`;

/** CREATE's and DELETE's first KEYS (the VPC's name, key and address indexes, the record, the generation). */
function clientKeys(k: VpnKeys, c: VpnClientRec): string[] {
  return [k.clients(c.vpcId), k.keys(c.vpcId), k.addrs(c.vpcId), k.client(c.vpcId, c.id), k.gen(c.vpcId)];
}

/** CREATE's and DELETE's first ARGV. */
function clientArgs(c: VpnClientRec): string[] {
  return [c.name, c.publicKey, c.address, c.vpcId, c.id, c.groupIds.join(",")];
}

export class VpnStore {
  /** The layout of this client's Redis. */
  readonly keys: VpnKeys;

  constructor(readonly redis: Redis) {
    this.keys = vpnKeysOf(redis);
  }

  /** The VPC's VPN change counter (on a single Redis one counter for every VPC). */
  async gen(vpcId: string): Promise<number> {
    return Number((await this.redis.get(this.keys.gen(vpcId))) ?? 0);
  }

  /**
   * Writes the endpoint and reserves its client range in IPAM, unless a
   * subnet (or another reservation) overlaps the range by now: then which.
   * The public key stays (the host keeps its key).
   */
  async setEndpoint(
    e: Omit<VpnEndpointRec, "publicKey">,
    range: V.Cidr,
  ): Promise<{ gen: number } | { overlapsSubnet: string } | { overlapsReservation: string } | { clientsOutside: string } | { noVpc: true }> {
    const what = `the VPN client range of VPC ${e.vpcId}'s endpoint on host ${e.hostId} (${e.publicAddress}:${e.listenPort})`;
    const L = ipamKeys(this.redis);
    // Listed first: a sync that reads the counter this script raises then lists the VPC (a listed VPC without an endpoint record is skipped).
    await this.redis.sadd(this.keys.eps, e.vpcId);
    const [code, ref] = (await this.redis.eval(
      scriptFor(this.redis, SET_ENDPOINT),
      6,
      L.vpc(e.vpcId),
      L.vpcSubnets(e.vpcId),
      L.vpcReserved(e.vpcId),
      this.keys.ep(e.vpcId),
      this.keys.gen(e.vpcId),
      this.keys.addrs(e.vpcId),
      e.vpcId,
      range.base,
      range.size,
      reservationValue({ cidr: range.text, base: range.base, size: range.size, what }),
      L.subnetIn(e.vpcId, ""),
      ...Object.entries({
        vpc: e.vpcId,
        host: e.hostId,
        addr: e.publicAddress,
        port: String(e.listenPort),
        cidr: e.clientCidr,
        updated: String(e.updatedMs),
      }).flat(),
    )) as [number, string | number];
    if (code === -4) return { noVpc: true };
    if (code === -2) return { overlapsSubnet: String(ref) };
    if (code === -6) return { overlapsReservation: String(ref) };
    if (code === -7) return { clientsOutside: String(ref) };
    // Listed again after: a DeleteVpnEndpoint that ran between the first SADD and the script took the VPC out (deleteEndpoint says why this is enough).
    await this.redis.sadd(this.keys.eps, e.vpcId);
    return { gen: Number(ref) };
  }

  /**
   * Deletes the endpoint and IPAM's reservation of its client range (in the
   * VPC's slot, one script), unless the VPC still has clients: then how
   * many. null if the VPC has no endpoint. The endpoint host's sync tears
   * its interface down on its next pass (it no longer serves the VPC).
   */
  async deleteEndpoint(vpcId: string): Promise<{ gen: number } | { clients: number } | null> {
    const L = ipamKeys(this.redis);
    const [code, n] = (await this.redis.eval(
      scriptFor(this.redis, DELETE_ENDPOINT),
      4,
      this.keys.ep(vpcId),
      this.keys.clients(vpcId),
      L.vpcReserved(vpcId),
      this.keys.gen(vpcId),
      vpcId,
    )) as [number, string | number];
    if (code === 0) return null;
    if (code === -1) return { clients: Number(n) };
    // Unlisted after the script (a listed VPC without an endpoint is skipped). A
    // SetEndpoint racing this one lists the VPC before and after its script: if
    // its script ran after ours and before the check below, the check lists the
    // VPC again; if after the check, its own second SADD comes after our SREM.
    await this.redis.srem(this.keys.eps, vpcId);
    if (await this.redis.exists(this.keys.ep(vpcId))) await this.redis.sadd(this.keys.eps, vpcId);
    return { gen: Number(n) };
  }

  async endpointVpcs(): Promise<string[]> {
    return (await this.redis.smembers(this.keys.eps)).filter((v) => /^vpc-[0-9a-f]{12}$/.test(v)).sort();
  }

  /** The endpoint, parsed against the VPC CIDR, with the public key its host wrote; null if none or invalid (reported). */
  async endpoint(vpcId: string, vpcCidr: string): Promise<VpnEndpointRec | null> {
    const h = await this.redis.hgetall(this.keys.ep(vpcId));
    if (!h.vpc) return null;
    const p = parseEndpoint(h, vpcCidr, null);
    if (!p.ok || p.value.vpcId !== vpcId) {
      reportInvalid(OWNER, "vpn endpoint", this.keys.ep(vpcId), p.ok ? "names another VPC" : p.reason, undefined, { vpcId });
      return null;
    }
    // Only the host the endpoint names may stand for its key (its own, host-scoped hash).
    const key = await this.redis.hget(this.keys.hostKeys(p.value.hostId), vpcId);
    return { ...p.value, publicKey: key && /^[A-Za-z0-9+/]{43}=$/.test(key) ? key : "" };
  }

  async setEndpointKey(hostId: string, vpcId: string, key: string): Promise<void> {
    await this.redis.hset(this.keys.hostKeys(hostId), vpcId, key);
  }

  async setApplied(hostId: string, vpcId: string, gen: number): Promise<void> {
    await this.redis.hset(this.keys.hostApplied(hostId), vpcId, String(gen));
  }

  /** The gen the endpoint's host applied for the VPC (-1: none, or not a number). */
  async applied(hostId: string, vpcId: string): Promise<number> {
    const v = await this.redis.hget(this.keys.hostApplied(hostId), vpcId);
    return v !== null && /^[0-9]{1,15}$/.test(v) ? Number(v) : -1;
  }

  /**
   * The VPC's namespace is new on this host for its VPN endpoint: said on the
   * host's own stream, so that this host's firewall compiles the VPC now
   * (replacing the netagent's fail-closed table) rather than at its next
   * periodic pass; until it does, nothing is forwarded there, clients' packets neither.
   */
  async announceHeld(hostId: string, vpcId: string): Promise<void> {
    await emit(this.redis, { hosts: [hostId] }, ["kind", "vpn.endpoint.held", "host", hostId, "vpc", vpcId]);
  }

  /** This host no longer serves the VPC: its key and applied gen go. */
  async forgetEndpoint(hostId: string, vpcId: string): Promise<void> {
    await this.redis.multi().hdel(this.keys.hostKeys(hostId), vpcId).hdel(this.keys.hostApplied(hostId), vpcId).exec();
  }

  async clients(vpcId: string, range: V.Cidr): Promise<VpnClientRec[]> {
    const h = await this.redis.hgetall(this.keys.clients(vpcId));
    const out: VpnClientRec[] = [];
    for (const [name, raw] of Object.entries(h)) {
      const p = parseClient(raw, vpcId, range);
      if (p.ok && p.value.name === name) out.push(p.value);
      else reportInvalid(OWNER, "vpn client", this.keys.clients(vpcId), p.ok ? `entry ${V.show(name)} holds ${p.value.name}` : p.reason, undefined, { vpcId });
    }
    return out.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  async usedAddresses(vpcId: string): Promise<Set<string>> {
    return new Set(await this.redis.hkeys(this.keys.addrs(vpcId)));
  }

  /** A new client, its address taken from `clientCidr`, the endpoint's range as read ("endpoint": gone or moved to another range since). */
  async create(c: VpnClientRec, clientCidr: string): Promise<{ gen: number } | { taken: "name" | "key" | "addr" | "endpoint" }> {
    // Cluster: the id's catalog entry first (the id is new), so that no client exists that its id does not find; dropped if refused.
    const catalog = this.keys.clientCatalog(c.id);
    if (catalog) await this.redis.set(catalog, `${c.vpcId}/${c.name}`);
    const r = (await this.redis.eval(
      scriptFor(this.redis, CREATE),
      6,
      ...clientKeys(this.keys, c),
      this.keys.ep(c.vpcId),
      ...clientArgs(c),
      JSON.stringify(c),
      `${c.vpcId}/${c.name}`,
      clientCidr,
    )) as string;
    if (r === "name" || r === "key" || r === "addr" || r === "endpoint") {
      if (catalog) await this.redis.del(catalog);
      return { taken: r };
    }
    return { gen: Number(r) };
  }

  async delete(c: VpnClientRec): Promise<number | null> {
    const r = (await this.redis.eval(scriptFor(this.redis, DELETE), 5, ...clientKeys(this.keys, c), ...clientArgs(c))) as string;
    const catalog = this.keys.clientCatalog(c.id);
    if (catalog) await this.redis.del(catalog);
    return r === "0" ? null : Number(r);
  }

  /** "<vpc>/<name>" of a client id, checked. */
  async locate(id: string): Promise<{ vpcId: string; name: string } | null> {
    const v = await this.redis.get(this.keys.clientCatalog(id) ?? this.keys.client("", id));
    const m = v ? /^(vpc-[0-9a-f]{12})\/([a-z][a-z0-9-]{0,62})$/.exec(v) : null;
    return m ? { vpcId: m[1], name: m[2] } : null;
  }

  async clientByName(vpcId: string, name: string, range: V.Cidr): Promise<VpnClientRec | null> {
    const raw = await this.redis.hget(this.keys.clients(vpcId), name);
    if (!raw) return null;
    const p = parseClient(raw, vpcId, range);
    if (!p.ok || p.value.name !== name) {
      reportInvalid(OWNER, "vpn client", this.keys.clients(vpcId), p.ok ? "name mismatch" : p.reason, undefined, { vpcId });
      return null;
    }
    return p.value;
  }

  // ---- the firewall's security groups, read through its schema ----

  async groupIdByName(vpcId: string, name: string): Promise<string | null> {
    return await this.redis.hget(fwKeys(this.redis).sgByName(vpcId), name);
  }

  async group(vpcId: string, id: string): Promise<SecurityGroupRec | null> {
    const key = fwKeys(this.redis).sg(vpcId, id);
    const h = await this.redis.hgetall(key);
    if (!h.id) return null;
    const p = parseGroup(h, id);
    if (!p.ok) {
      reportInvalid(OWNER, "security group", key, p.reason);
      return null;
    }
    return p.value;
  }

  async members(vpcId: string, groupId: string): Promise<string[]> {
    const h = await this.redis.hgetall(fwKeys(this.redis).sgMembers(vpcId, groupId));
    return Object.entries(h).flatMap(([nic, a]) => {
      const p = parseMember(nic, a);
      return p.ok ? [p.value] : [];
    });
  }
}
