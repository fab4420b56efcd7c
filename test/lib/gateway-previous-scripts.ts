// The previous release's instance-metadata scripts (services/gateway/metadata-store.ts
// at d09214e), kept verbatim: they write the layout a gateway of that release
// left (`mvpc-md:<host>:…`), which this release's gateway moves when it starts
// (test/integration/gateway-metadata-layout.test.ts).
import type { Redis } from "ioredis";

/**
 * KEYS: 1 inst hash, 2 byaddr, 3 hop, 4 all zset, 5 vpc zset, 6 events,
 *       7 rev counter, 8 tokens zset, 9 hosts set (shared)
 * ARGV: 1 id, 2 vpc, 3 address, 4 pb (base64), 5 hop limit, 6 now ms,
 *       7 vpc-zset key prefix, 8 host id
 * Returns {1, rev} created, {0, rev} replaced, {-1, holder} another instance
 * holds the VPC and address.
 */
export const SET = `
local id, vpc, addr, pb, hop, now, vpfx, host = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local key = vpc .. '/' .. addr
local holder = redis.call('HGET', KEYS[2], key)
if holder and holder ~= id then return {-1, holder} end
local oldvpc = redis.call('HGET', KEYS[1], 'vpc')
local oldaddr = redis.call('HGET', KEYS[1], 'addr')
local created = 0
local moved = false
if not oldvpc then
  created = 1
elseif oldvpc ~= vpc or oldaddr ~= addr then
  moved = true
  local oldkey = oldvpc .. '/' .. oldaddr
  if redis.call('HGET', KEYS[2], oldkey) == id then
    redis.call('HDEL', KEYS[2], oldkey)
    redis.call('HDEL', KEYS[3], oldkey)
  end
  if oldvpc ~= vpc then redis.call('ZREM', vpfx .. oldvpc .. ':insts', id) end
  -- Tokens are bound to the old VPC and address; they can never verify again.
  redis.call('DEL', KEYS[8])
end
local rev = redis.call('INCR', KEYS[7])
redis.call('HSET', KEYS[1], 'id', id, 'vpc', vpc, 'addr', addr, 'hop', hop, 'rev', rev, 'updated', now, 'pb', pb)
redis.call('HSET', KEYS[2], key, id)
redis.call('HSET', KEYS[3], key, hop)
redis.call('ZADD', KEYS[4], 0, id)
redis.call('ZADD', KEYS[5], 0, id)
redis.call('SADD', KEYS[9], host)
if moved then
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', 100000, '*', 'kind', 'gw.metadata.set', 'host', host, 'instance', id, 'vpc', vpc, 'address', addr,
    'hop_limit', hop, 'created', created, 'old_vpc', oldvpc, 'old_address', oldaddr)
else
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', 100000, '*', 'kind', 'gw.metadata.set', 'host', host, 'instance', id, 'vpc', vpc, 'address', addr,
    'hop_limit', hop, 'created', created)
end
return {created, rev}
`;

/**
 * Records a minted session token.
 * KEYS: 1 inst hash, 2 tokens zset
 * ARGV: 1 vpc, 2 address (the instance must still be there), 3 nonce,
 *       4 expiry ms, 5 now ms, 6 cap
 * Returns 1 recorded, 0 the instance is gone or moved.
 */
export const MINT = `
if redis.call('HGET', KEYS[1], 'vpc') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'addr') ~= ARGV[2] then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
local n = redis.call('ZCARD', KEYS[2])
local cap = tonumber(ARGV[6])
if n > cap then redis.call('ZPOPMIN', KEYS[2], n - cap) end
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[2], last[2])
return 1
`;

/** The previous release's names of host h's metadata. */
export const previousMdKeys = (h: string) => {
  const M = `mvpc-md:${h}:`;
  return {
    inst: (id: string) => `${M}inst:${id}`,
    byAddr: `${M}byaddr`,
    hop: `${M}hop`,
    all: `${M}insts`,
    vpcPrefix: `${M}vpc:`,
    vpc: (vpc: string) => `${M}vpc:${vpc}:insts`,
    tokens: (id: string) => `${M}tokens:${id}`,
    rev: `${M}rev`,
  };
};

/** SetInstanceMetadata as a gateway of the previous release stored it (pb: the base64 protobuf). */
export async function previousSet(r: Redis, h: string, id: string, vpc: string, addr: string, pb: string, hop: number): Promise<[number, number]> {
  const K = previousMdKeys(h);
  return (await r.eval(
    SET,
    9,
    K.inst(id),
    K.byAddr,
    K.hop,
    K.all,
    K.vpc(vpc),
    "mvpc:events",
    K.rev,
    K.tokens(id),
    "mvpc:gw:mdhosts",
    id,
    vpc,
    addr,
    pb,
    hop,
    Date.now(),
    K.vpcPrefix,
    h,
  )) as [number, number];
}

/** A session token as the previous release's metadata child recorded it. */
export async function previousMint(r: Redis, h: string, id: string, vpc: string, addr: string, nonce: string, expiresMs: number): Promise<number> {
  const K = previousMdKeys(h);
  return (await r.eval(MINT, 2, K.inst(id), K.tokens(id), vpc, addr, nonce, expiresMs, Date.now(), 5000)) as number;
}
