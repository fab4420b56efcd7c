// Instance metadata records (what IMDS serves) and their IMDSv2 session
// tokens, in Redis. The only metadata module that talks to Redis. Every
// change is one Lua script, which appends its event to the host's change
// stream (which the host's gateway follows) in the same step; the IMDS hot
// path is one read script per request.
//
// Records belong to the hypervisor whose metadata server serves them (the
// gateway its vmm called SetInstanceMetadata on), under a prefix of that
// host alone, "mvpc-md:{host:<host id>}:" (see mdKeys) — outside "mvpc:",
// which every host's Redis user may read: only that host's user (and the
// control user) may read or write them (docs/redis-acl.md). The braces are
// the host's Redis Cluster hash tag: every key below, the host's change
// stream and the vmm's keys of the host are in one slot, and every script
// declares the keys it uses. Per host:
//   inst:<instance id>     hash: id vpc addr hop rev updated pb (base64 of the
//                          InstanceMetadata protobuf, update_time set)
//   byaddr                 hash "vpc/address" → instance id: who a caller is
//   hop                    hash "vpc/address" → token hop limit (1–64), for
//                          the data plane's IP TTL of IMDS responses
//   insts                  lex zset of the host's instance ids
//   vpc:<vpc>:insts        lex zset of the instance ids of one VPC
//   tokens:<instance id>   zset session-token nonce → expiry (ms); a token
//                          is live only while its nonce is here
//   rev                    counter; every write gives the record a new rev, so
//                          IMDS can cache decoded records and re-read only
//                          what changed
// and, shared, "mvpc:gw:mdhosts": the set of host ids with records, so that
// the control plane's gateway (--api-only, FleetMetadataStore) finds them.
// It only lists; the records it leads to are host-scoped.
//
// The release before 5 December kept them under "mvpc-md:<host id>:"; a
// host's gateway moves its own when it starts (MetadataStore.moveFromPrevious),
// before it serves. Versions before host-scoped metadata kept every host's
// records under "mvpc:gw:md:"; a host's gateway copies the ones of its own
// NICs at start (MetadataStore.adoptLegacy).
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { Redis } from "ioredis";
import type { Logger } from "pino";
import { hostEvents, SCOPED_MAXLEN, wakeChannel } from "../common/events.js";
import { reportInvalid } from "../common/invalid-records.js";
import { defineVariadicCommand, isCluster } from "../common/redis.js";
import { FailedPreconditionError, InvalidArgumentError, UnavailableError } from "../common/errors.js";
import * as V from "../common/validate.js";
import { MAX_GROUPS_PER_NIC } from "../firewall/schema.js";
import { ipamKeys, K } from "../ipam/schema.js";
import { naKeys } from "../netagent/schema.js";
import {
  ImdsHttpEndpoint,
  ImdsHttpTokens,
  ImdsOptionsSchema,
  InstanceMetadataSchema,
  PlacementSchema,
  SshPublicKeySchema,
  type InstanceMetadata,
} from "../../gen/microvpc/v1/gateway_pb.js";

/** The shared set of host ids that have metadata records (a listing for the control plane). */
export const MD_HOSTS = "mvpc:gw:mdhosts";

/** One host's metadata keys under a prefix (this release's, or the earlier one's). */
function keysUnder(M: string) {
  return {
    prefix: M,
    inst: (id: string) => `${M}inst:${id}`,
    byAddr: `${M}byaddr`,
    hop: `${M}hop`,
    all: `${M}insts`,
    vpc: (vpc: string) => `${M}vpc:${vpc}:insts`,
    tokens: (id: string) => `${M}tokens:${id}`,
    rev: `${M}rev`,
  };
}
export type MdKeyset = ReturnType<typeof keysUnder>;

/**
 * The keys of one host's metadata; the host id is checked, as it becomes part
 * of every key. `events`: the host's change stream (same slot); `global`: the
 * fleet's stream and `hosts` the shared listing, written in the scripts on a
 * single Redis only (on a cluster they are in other slots: the client writes
 * `hosts` after, and the fleet stream is not written there).
 */
export function mdKeys(hostId: string) {
  const h = V.hostId("host id", hostId);
  return {
    ...keysUnder(`mvpc-md:{host:${h}}:`),
    events: hostEvents(h),
    wake: wakeChannel(hostEvents(h)),
    global: K.events,
    hosts: MD_HOSTS,
    /** The earlier release's names (until 5 December): moved from by MetadataStore.moveFromPrevious. */
    previous: keysUnder(`mvpc-md:${h}:`),
  };
}
export type MdKeys = ReturnType<typeof mdKeys>;

/** Where versions before host-scoped metadata kept every host's records (read by adoptLegacy only). */
export const LEGACY_MK = {
  prefix: "mvpc:gw:md:",
  inst: (id: string) => `mvpc:gw:md:inst:${id}`,
  byAddr: "mvpc:gw:md:byaddr",
};

/** The key IMDS, the hop-limit map and the index use for a caller: "vpcId/address". */
export function callerKey(vpcId: string, address: string): string {
  return `${vpcId}/${address}`;
}

/** The VPC id of a caller key (or a VPC id), if it names one: for reporting a bad record. */
function vpcOfCaller(k: string): string | undefined {
  const v = k.split("/")[0];
  return /^vpc-[0-9a-f]{12}$/.test(v) ? v : undefined;
}

// ---- limits (from gateway.proto) ----
export const MAX_USER_DATA_BYTES = 16384;
export const MAX_PUBLIC_KEYS = 32;
export const MAX_OPENSSH_KEY_CHARS = 16384;
export const MAX_TAGS = 50;
export const DEFAULT_HOP_LIMIT = 1;
/** Live session tokens kept per instance; minting more evicts the soonest-expiring. */
export const MAX_TOKENS_PER_INSTANCE = 5000;

const INSTANCE_ID_RE = /^[A-Za-z0-9_.:-]{1,128}$/;
const ZONE_RE = /^[a-z0-9-]{1,63}$/;
const KEY_NAME_RE = /^[A-Za-z0-9_.@-]{1,63}$/;
const DNS_LABEL_RE = /^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$/;
// "type base64 [comment]": one public key as in authorized_keys, without the
// options prefix (an options field like command="…" is not a key).
const OPENSSH_RE = /^(ssh|ecdsa|sk)-[A-Za-z0-9@._-]+ [A-Za-z0-9+/]+={0,3}( [\x20-\x7e]*)?$/;

/** An instance id as gateway.proto allows it; throws INVALID_ARGUMENT naming the field. */
export function instanceId(field: string, value: string): string {
  if (value === "") throw new InvalidArgumentError(field, 'is required (the VM id, e.g. "vm-3f2a9c0d1e7b")');
  if (!INSTANCE_ID_RE.test(value)) {
    throw new InvalidArgumentError(field, `${V.show(value)} is not valid: use 1–128 characters of letters, digits and _ . : -`);
  }
  return value;
}

function hostname(field: string, value: string): string {
  if (value === "") throw new InvalidArgumentError(field, 'is required (a DNS name such as "web-1" or "web-1.prod.internal")');
  const bad = () =>
    new InvalidArgumentError(
      field,
      `${V.show(value)} is not a DNS name: use dot-separated labels of 1–63 letters, digits and '-' (not at either end), 253 characters at most, no trailing dot`,
    );
  if (value.length > 253) throw bad();
  if (!value.split(".").every((l) => DNS_LABEL_RE.test(l))) throw bad();
  return value;
}

function zoneOrRegion(field: string, value: string): string {
  if (value !== "" && !ZONE_RE.test(value)) {
    throw new InvalidArgumentError(
      field,
      `${V.show(value)} is not valid: use 1–63 characters of [a-z0-9-] (e.g. "microvpc-1a"), or leave it empty for the hypervisor's configured value`,
    );
  }
  return value;
}

function distinct(field: string, values: string[], check: (f: string, v: string) => string): string[] {
  const seen = new Set<string>();
  return values.map((v, i) => {
    const ok = check(`${field}[${i}]`, v);
    if (seen.has(ok)) throw new InvalidArgumentError(`${field}[${i}]`, `${V.show(v)} appears twice`);
    seen.add(ok);
    return ok;
  });
}

/**
 * Validates every field of a record as gateway.proto describes it and returns
 * the canonical copy that is stored (MAC lower case, unknown fields and the
 * client's update_time dropped). Throws InvalidArgumentError naming the field
 * ("metadata.public_keys[3].openssh_key") and saying what to change.
 */
export function validateInstanceMetadata(md: InstanceMetadata, prefix = "metadata."): InstanceMetadata {
  const f = (name: string) => `${prefix}${name}`;
  const id = instanceId(f("instance_id"), md.instanceId);
  const vpcId = V.id(f("vpc_id"), md.vpcId, "vpc");
  const subnetId = md.subnetId === "" ? "" : V.id(f("subnet_id"), md.subnetId, "subnet");
  V.ipv4(f("local_ipv4"), md.localIpv4);
  if (md.mac === "") throw new InvalidArgumentError(f("mac"), 'is required (the NIC\'s MAC, e.g. "02:00:0a:00:01:05")');
  const mac = V.mac(f("mac"), md.mac);
  const host = hostname(f("hostname"), md.hostname);
  if (md.publicIpv4 !== "") V.ipv4(f("public_ipv4"), md.publicIpv4);

  if (md.securityGroupNames.length > MAX_GROUPS_PER_NIC) {
    throw new InvalidArgumentError(f("security_group_names"), `has ${md.securityGroupNames.length} names; a NIC has at most ${MAX_GROUPS_PER_NIC} groups`);
  }
  const sgNames = distinct(f("security_group_names"), md.securityGroupNames, V.name);
  if (md.securityGroupIds.length > MAX_GROUPS_PER_NIC) {
    throw new InvalidArgumentError(f("security_group_ids"), `has ${md.securityGroupIds.length} ids; a NIC has at most ${MAX_GROUPS_PER_NIC} groups`);
  }
  const sgIds = distinct(f("security_group_ids"), md.securityGroupIds, (fl, v) => V.id(fl, v, "sg"));

  const placement = create(PlacementSchema, {
    availabilityZone: zoneOrRegion(f("placement.availability_zone"), md.placement?.availabilityZone ?? ""),
    region: zoneOrRegion(f("placement.region"), md.placement?.region ?? ""),
  });

  if (md.publicKeys.length > MAX_PUBLIC_KEYS) {
    throw new InvalidArgumentError(f("public_keys"), `has ${md.publicKeys.length} keys; the limit is ${MAX_PUBLIC_KEYS}`);
  }
  const keyNames = new Set<string>();
  const publicKeys = md.publicKeys.map((k, i) => {
    const fk = f(`public_keys[${i}]`);
    if (k.name !== "") {
      if (!KEY_NAME_RE.test(k.name))
        throw new InvalidArgumentError(
          `${fk}.name`,
          `${V.show(k.name)} is not valid: use 1–63 characters of [A-Za-z0-9_.@-], or leave it empty for "key-${i}"`,
        );
    }
    const effective = k.name || `key-${i}`;
    if (keyNames.has(effective)) throw new InvalidArgumentError(`${fk}.name`, `${V.show(effective)} names two keys; give each key its own name`);
    keyNames.add(effective);
    if (k.opensshKey === "") throw new InvalidArgumentError(`${fk}.openssh_key`, 'is required (one line such as "ssh-ed25519 AAAA… user@host")');
    if (k.opensshKey.length > MAX_OPENSSH_KEY_CHARS) {
      throw new InvalidArgumentError(`${fk}.openssh_key`, `is ${k.opensshKey.length} characters long; the limit is ${MAX_OPENSSH_KEY_CHARS}`);
    }
    if (/[\r\n]/.test(k.opensshKey)) throw new InvalidArgumentError(`${fk}.openssh_key`, "must be one line: give each key its own entry");
    if (!OPENSSH_RE.test(k.opensshKey)) {
      throw new InvalidArgumentError(
        `${fk}.openssh_key`,
        `${V.show(k.opensshKey)} is not an OpenSSH public key: expected "TYPE BASE64 [comment]" such as "ssh-ed25519 AAAAC3Nz… user@host", printable ASCII, no options prefix`,
      );
    }
    return create(SshPublicKeySchema, { name: k.name, opensshKey: k.opensshKey });
  });

  if (md.userData.length > MAX_USER_DATA_BYTES) {
    throw new InvalidArgumentError(
      f("user_data"),
      `is ${md.userData.length} bytes; the limit is ${MAX_USER_DATA_BYTES} (compress it, e.g. gzip, which cloud-init accepts, or fetch the rest from elsewhere)`,
    );
  }
  if (md.instanceType.length > 63 || !/^[\x20-\x7e]*$/.test(md.instanceType)) {
    throw new InvalidArgumentError(
      f("instance_type"),
      `${V.show(md.instanceType)} is not valid: use up to 63 printable ASCII characters (e.g. "qemu.1x256"), or leave it empty`,
    );
  }

  if (md.tags.length > MAX_TAGS) throw new InvalidArgumentError(f("tags"), `has ${md.tags.length} tags; the limit is ${MAX_TAGS}`);
  const tags = V.labels(
    f("tags"),
    md.tags.map((t) => ({ key: t.key, value: t.value })),
  );
  tags.forEach((t, i) => {
    // A tag key is a path segment (meta-data/tags/instance/KEY).
    if (t.key === "." || t.key === "..")
      throw new InvalidArgumentError(`${f("tags")}[${i}].key`, `${V.show(t.key)} cannot be served as meta-data/tags/instance/KEY; choose another key`);
  });

  const o = md.options;
  const httpTokens = o?.httpTokens ?? ImdsHttpTokens.UNSPECIFIED;
  if (!(httpTokens in ImdsHttpTokens)) {
    throw new InvalidArgumentError(
      f("options.http_tokens"),
      `${httpTokens} is not an ImdsHttpTokens value; use IMDS_HTTP_TOKENS_OPTIONAL or IMDS_HTTP_TOKENS_REQUIRED`,
    );
  }
  const httpEndpoint = o?.httpEndpoint ?? ImdsHttpEndpoint.UNSPECIFIED;
  if (!(httpEndpoint in ImdsHttpEndpoint)) {
    throw new InvalidArgumentError(
      f("options.http_endpoint"),
      `${httpEndpoint} is not an ImdsHttpEndpoint value; use IMDS_HTTP_ENDPOINT_ENABLED or IMDS_HTTP_ENDPOINT_DISABLED`,
    );
  }
  const hop = o?.httpPutResponseHopLimit;
  if (hop !== undefined && (!Number.isInteger(hop) || hop < 1 || hop > 64)) {
    throw new InvalidArgumentError(f("options.http_put_response_hop_limit"), `${hop} is out of range; use 1–64, or leave it unset for ${DEFAULT_HOP_LIMIT}`);
  }

  return create(InstanceMetadataSchema, {
    instanceId: id,
    vpcId,
    subnetId,
    localIpv4: md.localIpv4,
    mac,
    hostname: host,
    publicIpv4: md.publicIpv4,
    securityGroupNames: sgNames,
    securityGroupIds: sgIds,
    placement,
    publicKeys,
    userData: md.userData,
    instanceType: md.instanceType,
    tags,
    options: create(ImdsOptionsSchema, { httpTokens, httpEndpoint, httpPutResponseHopLimit: hop }),
  });
}

export function hopLimitOf(md: InstanceMetadata): number {
  return md.options?.httpPutResponseHopLimit ?? DEFAULT_HOP_LIMIT;
}

// ---- scripts ----

/**
 * Lua: appends a metadata event to the host's stream (KEYS[e]) and wakes its
 * readers (Redis Cluster: common/events.ts); on a single Redis also to the
 * fleet's stream KEYS[e + 1], with the host added to (`SADD`) or, when it has
 * no record left, taken out of (`SREM`) the shared listing KEYS[e + 2].
 */
const mdEmit = (e: number) => `
local function md_emit(listing, ...)
  redis.call('XADD', KEYS[${e}], 'MAXLEN', '~', ${SCOPED_MAXLEN}, '*', ...)
  redis.call('SPUBLISH', ARGV[#ARGV], '1')
  if KEYS[${e + 1}] then redis.call('XADD', KEYS[${e + 1}], 'MAXLEN', '~', 100000, '*', ...) end
  if KEYS[${e + 2}] then redis.call(listing, KEYS[${e + 2}], ARGV[#ARGV - 1]) end
end
`;

/**
 * KEYS: 1 inst hash, 2 byaddr, 3 hop, 4 all zset, 5 vpc zset, 6 the zset of
 *       the VPC the caller read as the record's (5 if none), 7 rev counter,
 *       8 tokens zset, 9 host stream; single Redis: 10 fleet stream,
 *       11 hosts set (shared)
 * ARGV: 1 id, 2 vpc, 3 address, 4 pb (base64), 5 hop limit, 6 now ms,
 *       7 the record's VPC the caller read ('' none), 8 host id, 9 wake channel
 * Returns {1, rev} created, {0, rev} replaced, {-1, holder} another instance
 * holds the VPC and address, {-2, vpc} the record's VPC is not ARGV[7] (read
 * again and retry).
 */
const SET = `${mdEmit(9)}
local id, vpc, addr, pb, hop, now, host = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[8]
local oldvpc = redis.call('HGET', KEYS[1], 'vpc')
if (oldvpc or '') ~= ARGV[7] then return {-2, oldvpc or ''} end
local key = vpc .. '/' .. addr
local holder = redis.call('HGET', KEYS[2], key)
if holder and holder ~= id then return {-1, holder} end
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
  if oldvpc ~= vpc then redis.call('ZREM', KEYS[6], id) end
  -- Tokens are bound to the old VPC and address; they can never verify again.
  redis.call('DEL', KEYS[8])
end
local rev = redis.call('INCR', KEYS[7])
redis.call('HSET', KEYS[1], 'id', id, 'vpc', vpc, 'addr', addr, 'hop', hop, 'rev', rev, 'updated', now, 'pb', pb)
redis.call('HSET', KEYS[2], key, id)
redis.call('HSET', KEYS[3], key, hop)
redis.call('ZADD', KEYS[4], 0, id)
redis.call('ZADD', KEYS[5], 0, id)
if moved then
  md_emit('SADD', 'kind', 'gw.metadata.set', 'host', host, 'instance', id, 'vpc', vpc, 'address', addr,
    'hop_limit', hop, 'created', created, 'old_vpc', oldvpc, 'old_address', oldaddr)
else
  md_emit('SADD', 'kind', 'gw.metadata.set', 'host', host, 'instance', id, 'vpc', vpc, 'address', addr,
    'hop_limit', hop, 'created', created)
end
return {created, rev}
`;

/**
 * KEYS: 1 inst hash, 2 byaddr, 3 hop, 4 all zset, 5 tokens zset, 6 the zset
 *       of the VPC the caller read as the record's, 7 host stream; single
 *       Redis: 8 fleet stream, 9 hosts set (shared)
 * ARGV: 1 id, 2 now ms, 3 the record's VPC the caller read, 4 host id,
 *       5 wake channel
 * Returns {1, live tokens revoked} deleted, {0, 0} absent, {-2, vpc} the
 * record's VPC is not ARGV[3] (read again and retry).
 */
const DELETE = `${mdEmit(7)}
local id, now, host = ARGV[1], ARGV[2], ARGV[4]
local vpc = redis.call('HGET', KEYS[1], 'vpc')
if not vpc then return {0, 0} end
if vpc ~= ARGV[3] then return {-2, vpc} end
local addr = redis.call('HGET', KEYS[1], 'addr')
local key = vpc .. '/' .. addr
if redis.call('HGET', KEYS[2], key) == id then
  redis.call('HDEL', KEYS[2], key)
  redis.call('HDEL', KEYS[3], key)
end
redis.call('ZREM', KEYS[4], id)
redis.call('ZREM', KEYS[6], id)
local n = redis.call('ZCOUNT', KEYS[5], '(' .. now, '+inf')
redis.call('DEL', KEYS[1], KEYS[5])
local listing = 'SADD'
if redis.call('ZCARD', KEYS[4]) == 0 then listing = 'SREM' end
md_emit(listing, 'kind', 'gw.metadata.deleted', 'host', host, 'instance', id, 'vpc', vpc, 'address', addr, 'tokens_revoked', n)
return {1, n}
`;

/**
 * The IMDS hot path, read-only: who is the caller, has their record changed
 * since the rev IMDS has cached, and is the presented token's nonce live.
 * KEYS: 1 byaddr, 2 the record of the instance the caller expects there
 *       (ARGV[5]), 3 its tokens zset
 * ARGV: 1 "vpc/address", 2 cached rev ('' = none), 3 token nonce ('' = no
 *       token), 4 now ms, 5 the instance id expected ('' = none known)
 * Returns {0} unknown caller, {2, id} another instance than ARGV[5] is
 * there (call again with its keys), or {1, id, rev, pb ('' = unchanged),
 * token} with token -1 none presented, 0 not live, 1 live.
 */
const RESOLVE = `
local id = redis.call('HGET', KEYS[1], ARGV[1])
if not id then return {0} end
if id ~= ARGV[5] then return {2, id} end
local rev = redis.call('HGET', KEYS[2], 'rev')
if not rev then return {0} end
local pb = ''
if rev ~= ARGV[2] then pb = redis.call('HGET', KEYS[2], 'pb') end
local tok = -1
if ARGV[3] ~= '' then
  local exp = redis.call('ZSCORE', KEYS[3], ARGV[3])
  if exp and tonumber(exp) > tonumber(ARGV[4]) then tok = 1 else tok = 0 end
end
return {1, id, rev, pb, tok}
`;

/**
 * The move of one instance from the earlier release's names (single Redis,
 * when the host's gateway starts): its record and tokens RENAMEd (the
 * tokens keep their expiry), its address and hop-limit entries and index
 * entries moved, the rev counter carried over so that revs keep rising.
 * Only if the record still has the VPC and address the caller read, and
 * no other instance holds that address under this release's names (one
 * made since, e.g. after a start whose move failed: the earlier record
 * stays where it is, never served, for Delete to remove).
 * KEYS: earlier inst, tokens, byaddr, hop, all, vpc zset, rev; then the same
 *       seven under this release's names
 * ARGV: 1 id, 2 vpc, 3 "vpc/address"
 * Returns 1 moved, 0 not (gone, changed, or already there), {-1, holder}
 * another instance holds the address.
 */
const MOVE = `
if redis.call('TYPE', KEYS[1]).ok ~= 'hash' or redis.call('HGET', KEYS[1], 'vpc') ~= ARGV[2] then return 0 end
if redis.call('HGET', KEYS[1], 'vpc') .. '/' .. redis.call('HGET', KEYS[1], 'addr') ~= ARGV[3] then return 0 end
if redis.call('EXISTS', KEYS[8]) == 1 then return 0 end
local holder = redis.call('HGET', KEYS[10], ARGV[3])
if holder and holder ~= ARGV[1] then return {-1, holder} end
local rev = tonumber(redis.call('GET', KEYS[7]) or '0')
if tonumber(redis.call('GET', KEYS[14]) or '0') < rev then redis.call('SET', KEYS[14], rev) end
redis.call('RENAME', KEYS[1], KEYS[8])
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('RENAME', KEYS[2], KEYS[9]) end
if redis.call('HGET', KEYS[3], ARGV[3]) == ARGV[1] then
  redis.call('HDEL', KEYS[3], ARGV[3])
  redis.call('HSET', KEYS[10], ARGV[3], ARGV[1])
  local hop = redis.call('HGET', KEYS[4], ARGV[3])
  if hop then
    redis.call('HDEL', KEYS[4], ARGV[3])
    redis.call('HSET', KEYS[11], ARGV[3], hop)
  end
end
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZADD', KEYS[12], 0, ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('ZADD', KEYS[13], 0, ARGV[1])
return 1
`;

/**
 * Records a minted session token.
 * KEYS: 1 inst hash, 2 tokens zset
 * ARGV: 1 vpc, 2 address (the instance must still be there), 3 nonce,
 *       4 expiry ms, 5 now ms, 6 cap
 * Returns 1 recorded, 0 the instance is gone or moved.
 */
const MINT = `
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

type Reply = [number, string | number];

declare module "ioredis" {
  // eslint-disable-next-line @typescript-eslint/no-unused-vars -- merging needs the same type parameter
  interface RedisCommander<Context> {
    mvpcMdSet(...args: (string | number)[]): Promise<Reply>;
    mvpcMdDelete(...args: (string | number)[]): Promise<Reply>;
    mvpcMdResolve(...args: (string | number)[]): Promise<[0] | [2, string] | [1, string, string, string, number]>;
    mvpcMdMint(...args: (string | number)[]): Promise<number>;
    mvpcMdMove(...args: (string | number)[]): Promise<number | [number, string]>;
  }
}

function defineScripts(redis: Redis): void {
  if ((redis as unknown as { mvpcMdSet?: unknown }).mvpcMdSet) return;
  // Set and Delete declare two keys more on a single Redis (the fleet's stream and the hosts listing): the count is the first argument.
  defineVariadicCommand(redis, "mvpcMdSet", SET);
  defineVariadicCommand(redis, "mvpcMdDelete", DELETE);
  redis.defineCommand("mvpcMdResolve", { numberOfKeys: 3, lua: RESOLVE });
  redis.defineCommand("mvpcMdMint", { numberOfKeys: 2, lua: MINT });
  redis.defineCommand("mvpcMdMove", { numberOfKeys: 14, lua: MOVE });
}

function decode(pb: string): InstanceMetadata {
  return fromBinary(InstanceMetadataSchema, Buffer.from(pb, "base64"));
}

/** What IMDS learns about a caller in one round trip. */
export interface CallerState {
  instanceId: string;
  /** Changes on every write of the record. */
  rev: string;
  /** The record, unless it is unchanged since the rev the caller passed. */
  metadata?: InstanceMetadata;
  /** Whether the presented token nonce is live: "none" if none was presented. */
  token: "none" | "live" | "dead";
}

/** One entry of the hop-limit hash: "vpc-…/a.b.c.d" → 1–64. */
export function parseHopLimit(key: string, value: string): V.Parsed<number> {
  return V.attempt(() => {
    const [vpc, addr, ...rest] = key.split("/");
    if (rest.length) throw new InvalidArgumentError("key", `${V.show(key)} is not "vpc/address"`);
    V.id("vpc", vpc, "vpc");
    V.ipv4("address", addr ?? "");
    return V.storedInt("hop", value, 1, 64);
  });
}

/** A stored record (base64 protobuf), decoded and checked as SetInstanceMetadata checks it. */
export function parseStoredMetadata(pb: string): V.Parsed<InstanceMetadata> {
  return V.attempt(() => {
    if (!/^[A-Za-z0-9+/]*={0,2}$/.test(pb)) throw new InvalidArgumentError("pb", "is not base64");
    const md = decode(pb);
    const checked = validateInstanceMetadata(md, "");
    checked.updateTime = md.updateTime;
    return checked;
  });
}

/** What the GatewayService metadata calls need: one host's store, or the control plane's view of every host. */
export interface MetadataView {
  set(input: InstanceMetadata): Promise<{ metadata: InstanceMetadata; created: boolean }>;
  get(instanceId: string): Promise<InstanceMetadata | null>;
  getByAddress(vpcId: string, address: string): Promise<InstanceMetadata | null>;
  delete(instanceId: string): Promise<{ deleted: boolean; tokensRevoked: number }>;
  list(opts: { vpcId?: string; after?: string; limit: number }): Promise<InstanceMetadata[]>;
  resolveVpcName(name: string): Promise<string | null>;
}

/** A stored record checked; one that does not validate is reported and read as absent. */
function checkedRecord(log: Pick<Logger, "warn"> | undefined, key: string, pb: string, vpcId?: string): InstanceMetadata | null {
  const p = parseStoredMetadata(pb);
  if (p.ok) return p.value;
  reportInvalid("gateway", "imds-metadata", key, p.reason, log, { field: "pb", vpcId: vpcOfCaller(vpcId ?? "") });
  return null;
}

/** How many callers' instance ids IMDS remembers (resolveCaller's key guess); past it, it starts afresh. */
const CALLER_IDS_MAX = 65_536;
/** How often a script that found its record changed under it (SET, DELETE: -2) is tried again. */
const RETRIES = 4;

/**
 * The metadata of one hypervisor: what its metadata server serves, its data
 * plane's hop limits, and the metadata calls of its gateway. Reads and
 * writes only that host's keys (mdKeys(hostId)); `previous`: under the
 * earlier release's names instead (FleetMetadataStore, for a host whose
 * gateway has not moved them yet).
 */
export class MetadataStore implements MetadataView {
  readonly keys: MdKeys;
  /** The names used: this release's, or with `previous` the earlier release's. */
  private readonly at: MdKeyset;
  /** The names this store reads and writes (this.keys, or the earlier release's). */
  get names(): MdKeyset {
    return this.at;
  }
  /** IMDS: the instance id last found at each caller, so that its keys can be declared (RESOLVE). */
  private readonly callerIds = new Map<string, string>();

  constructor(
    readonly redis: Redis,
    readonly hostId: string,
    readonly log?: Pick<Logger, "warn" | "info">,
    previous = false,
  ) {
    this.keys = mdKeys(hostId);
    this.at = previous ? this.keys.previous : this.keys;
    defineScripts(redis);
  }

  /** The keys a single Redis declares in SET and DELETE besides the host's own (none on a cluster). */
  private fleetKeys(): string[] {
    return isCluster(this.redis) ? [] : [this.keys.global, this.keys.hosts];
  }

  /**
   * On a cluster, the shared listing is written after the script: the host
   * in it while it has a record. Added again if a set raced the removal.
   */
  private async listing(add: boolean): Promise<void> {
    if (!isCluster(this.redis)) return;
    if (add) {
      await this.redis.sadd(this.keys.hosts, this.hostId);
      return;
    }
    await this.redis.srem(this.keys.hosts, this.hostId);
    if ((await this.redis.zcard(this.at.all)) > 0) await this.redis.sadd(this.keys.hosts, this.hostId);
  }

  /**
   * Validates and stores a whole record, replacing any previous record of
   * the instance. FAILED_PRECONDITION if another instance holds the same VPC
   * and address (gateway.proto's contract).
   */
  async set(input: InstanceMetadata): Promise<{ metadata: InstanceMetadata; created: boolean }> {
    const md = validateInstanceMetadata(input);
    const now = Date.now();
    md.updateTime = timestampFromMs(now);
    const pb = Buffer.from(toBinary(InstanceMetadataSchema, md)).toString("base64");
    const hop = hopLimitOf(md);
    const MK = this.at;
    let [code, detail]: Reply = [-2, ""];
    for (let attempt = 0; attempt < RETRIES && code === -2; attempt++) {
      // The record's VPC now, whose index the script takes the instance out of if it moves VPC.
      const oldVpc = (await this.redis.hget(MK.inst(md.instanceId), "vpc")) ?? "";
      if (oldVpc !== "") V.id("vpc", oldVpc, "vpc");
      const keys = [
        MK.inst(md.instanceId),
        MK.byAddr,
        MK.hop,
        MK.all,
        MK.vpc(md.vpcId),
        MK.vpc(oldVpc || md.vpcId),
        MK.rev,
        MK.tokens(md.instanceId),
        this.keys.events,
        ...this.fleetKeys(),
      ];
      [code, detail] = await this.redis.mvpcMdSet(
        keys.length,
        ...keys,
        md.instanceId,
        md.vpcId,
        md.localIpv4,
        pb,
        hop,
        now,
        oldVpc,
        this.hostId,
        this.keys.wake,
      );
    }
    if (code === -1) {
      throw new FailedPreconditionError(
        `instance ${detail} already holds ${md.localIpv4} in ${md.vpcId}; delete its metadata first (DeleteInstanceMetadata instance_id=${detail}) or give ${md.instanceId} another address`,
      );
    }
    if (code === -2) throw new UnavailableError(`the metadata of ${md.instanceId} kept changing while it was written; retry`);
    if (code !== 0 && code !== 1) throw new Error(`metadata set script returned ${code}`);
    await this.listing(true);
    return { metadata: md, created: code === 1 };
  }

  private checked(key: string, pb: string, vpcId?: string): InstanceMetadata | null {
    return checkedRecord(this.log, key, pb, vpcId);
  }

  async get(instanceId: string): Promise<InstanceMetadata | null> {
    const pb = await this.redis.hget(this.at.inst(instanceId), "pb");
    return pb ? this.checked(this.at.inst(instanceId), pb) : null;
  }

  async getByAddress(vpcId: string, address: string): Promise<InstanceMetadata | null> {
    const id = await this.redis.hget(this.at.byAddr, callerKey(vpcId, address));
    if (!id) return null;
    const ok = V.attempt(() => instanceId("id", id));
    if (ok.ok) return this.get(ok.value);
    reportInvalid("gateway", "imds-byaddr", this.at.byAddr, ok.reason, this.log, { field: callerKey(vpcId, address), vpcId });
    return null;
  }

  /**
   * Deletes a record and revokes its session tokens; on a single Redis also
   * one still under the earlier release's names (a record the host's move
   * left there: never served, but its VM's deletion removes it).
   */
  async delete(id: string): Promise<{ deleted: boolean; tokensRevoked: number }> {
    const r = await this.deleteAt(id);
    if (this.at === this.keys.previous || isCluster(this.redis) || (await this.redis.exists(this.keys.previous.inst(id))) === 0) return r;
    // Not the host listing: the host's records are the ones under this release's names.
    const earlier = await new MetadataStore(this.redis, this.hostId, this.log, true).deleteAt(id, false);
    return { deleted: r.deleted || earlier.deleted, tokensRevoked: r.tokensRevoked + earlier.tokensRevoked };
  }

  /** delete() under this store's names; `listing`: whether the shared host listing follows (false for a record left under the earlier names). */
  private async deleteAt(id: string, listing = true): Promise<{ deleted: boolean; tokensRevoked: number }> {
    const MK = this.at;
    for (let attempt = 0; attempt < RETRIES; attempt++) {
      const vpc = await this.redis.hget(MK.inst(id), "vpc");
      if (vpc === null) return { deleted: false, tokensRevoked: 0 };
      V.id("vpc", vpc, "vpc");
      const keys = [MK.inst(id), MK.byAddr, MK.hop, MK.all, MK.tokens(id), MK.vpc(vpc), this.keys.events, ...this.fleetKeys().slice(0, listing ? 2 : 1)];
      const [code, n] = await this.redis.mvpcMdDelete(keys.length, ...keys, id, Date.now(), vpc, this.hostId, this.keys.wake);
      if (code === -2) continue;
      if (code === 1 && listing) await this.listing(false);
      return { deleted: code === 1, tokensRevoked: Number(n) };
    }
    throw new UnavailableError(`the metadata of ${id} kept changing while it was deleted; retry`);
  }

  /** Records ordered by instance id, after `after` (exclusive), optionally of one VPC. */
  async list(opts: { vpcId?: string; after?: string; limit: number }): Promise<InstanceMetadata[]> {
    const key = opts.vpcId ? this.at.vpc(opts.vpcId) : this.at.all;
    const ids = await this.redis.zrangebylex(key, opts.after ? `(${opts.after}` : "-", "+", "LIMIT", 0, opts.limit);
    if (ids.length === 0) return [];
    // One host's keys: one slot, so one pipeline also on a cluster.
    const p = this.redis.pipeline();
    for (const id of ids) p.hget(this.at.inst(id), "pb");
    const res = (await p.exec()) ?? [];
    const out: InstanceMetadata[] = [];
    for (const [i, [err, pb]] of res.entries()) {
      if (err) throw err;
      const md = typeof pb === "string" && pb !== "" ? this.checked(this.at.inst(ids[i]), pb, opts.vpcId) : null;
      if (md) out.push(md);
    }
    return out;
  }

  /** The VPC id of a VPC name (IPAM's index), or null. */
  async resolveVpcName(name: string): Promise<string | null> {
    return await this.redis.hget(ipamKeys(this.redis).vpcByName, name);
  }

  /**
   * IMDS: the instance at (vpcId, address), in one read-only round trip.
   * cachedRev: the rev of the record the caller has decoded ("" = none); the
   * record is returned only if it changed. tokenNonce: hex nonce of a
   * presented token ("" = none). null: no instance holds the address.
   */
  async resolveCaller(vpcId: string, address: string, cachedRev: string, tokenNonce: string): Promise<CallerState | null> {
    const caller = callerKey(vpcId, address);
    let guess = this.callerIds.get(caller) ?? "";
    let r: Awaited<ReturnType<Redis["mvpcMdResolve"]>> = [0];
    // The keys of the instance last found there; another there now costs one more round trip.
    for (let attempt = 0; attempt < 3; attempt++) {
      r = await this.redis.mvpcMdResolve(this.at.byAddr, this.at.inst(guess), this.at.tokens(guess), caller, cachedRev, tokenNonce, Date.now(), guess);
      if (r[0] !== 2) break;
      const id = V.attempt(() => instanceId("id", r[1] as string));
      if (!id.ok) {
        reportInvalid("gateway", "imds-byaddr", this.at.byAddr, id.reason, this.log, { field: caller, vpcId });
        return null;
      }
      if (this.callerIds.size >= CALLER_IDS_MAX) this.callerIds.clear();
      this.callerIds.set(caller, id.value);
      guess = id.value;
    }
    if (r[0] !== 1) {
      if (r[0] === 0) this.callerIds.delete(caller);
      return null;
    }
    const [, foundId, rev, pb, tok] = r;
    let metadata: InstanceMetadata | undefined;
    if (pb) {
      const md = this.checked(this.at.inst(foundId), pb, vpcId);
      // A caller whose record does not validate is served as one without a record.
      if (!md) return null;
      metadata = md;
    }
    return {
      instanceId: foundId,
      rev: String(rev),
      metadata,
      token: tok === 1 ? "live" : tok === 0 ? "dead" : "none",
    };
  }

  /** Records a session token of an instance; false if the instance left (vpcId, address). */
  async recordToken(instanceId: string, vpcId: string, address: string, nonce: string, expiresMs: number): Promise<boolean> {
    const ok = await this.redis.mvpcMdMint(
      this.at.inst(instanceId),
      this.at.tokens(instanceId),
      vpcId,
      address,
      nonce,
      expiresMs,
      Date.now(),
      MAX_TOKENS_PER_INSTANCE,
    );
    return ok === 1;
  }

  /**
   * For the data plane: "vpcId/address" → the IP TTL IMDS token responses
   * must leave with (http_put_response_hop_limit, default 1), for every
   * instance of this host with a record. Follow "gw.metadata.set"/"gw.metadata.deleted"
   * on mvpc:events to know when to read it again.
   */
  async hopLimits(): Promise<Map<string, number>> {
    const h = await this.redis.hgetall(this.at.hop);
    const out = new Map<string, number>();
    for (const [k, v] of Object.entries(h)) {
      // The value becomes an nft set name and TTL: checked as the API checks it.
      const p = parseHopLimit(k, v);
      if (p.ok) out.set(k, p.value);
      else reportInvalid("gateway", "imds-hop", this.at.hop, p.reason, this.log, { field: k, vpcId: vpcOfCaller(k) });
    }
    return out;
  }

  /** The hop limit of one caller, or undefined if no instance holds the address. */
  async tokenHopLimitOf(vpcId: string, address: string): Promise<number | undefined> {
    const v = await this.redis.hget(this.at.hop, callerKey(vpcId, address));
    if (v === null) return undefined;
    const p = parseHopLimit(callerKey(vpcId, address), v);
    if (p.ok) return p.value;
    reportInvalid("gateway", "imds-hop", this.at.hop, p.reason, this.log, { field: callerKey(vpcId, address), vpcId: vpcOfCaller(vpcId) });
    return DEFAULT_HOP_LIMIT;
  }

  /**
   * Moves this host's records from the earlier release's names
   * (`mvpc-md:<host>:`) under its hash tag, one script per instance (MOVE):
   * on a single Redis, when the host's gateway starts, before its API, its
   * data plane's passes and its metadata child run, so that nothing of this
   * host writes them meanwhile. A record another writer changed between the
   * read and the script (the control plane's delete) is left for the next
   * start. On a cluster there is nothing to move. Returns how many moved.
   */
  async moveFromPrevious(): Promise<number> {
    if (isCluster(this.redis)) return 0;
    const P = this.keys.previous;
    const ids = await this.redis.zrange(P.all, 0, -1);
    let moved = 0;
    const failed: string[] = [];
    for (const raw of ids) {
      const id = V.attempt(() => instanceId("id", raw));
      if (!id.ok) {
        reportInvalid("gateway", "imds-index", P.all, id.reason, this.log, { field: raw });
        continue;
      }
      const [vpc, addr] = await this.redis.hmget(P.inst(id.value), "vpc", "addr");
      const vpcOk = V.attempt(() => V.id("vpc", vpc ?? "", "vpc"));
      const addrOk = V.attempt(() => {
        V.ipv4("address", addr ?? "");
        return addr ?? "";
      });
      if (!vpcOk.ok || !addrOk.ok) {
        reportInvalid(
          "gateway",
          "imds-metadata",
          P.inst(id.value),
          `not moved to ${this.keys.inst(id.value)}: ${vpcOk.ok ? "" : vpcOk.reason}${addrOk.ok ? "" : addrOk.reason}`,
          this.log,
        );
        continue;
      }
      const K7 = (k: MdKeyset) => [k.inst(id.value), k.tokens(id.value), k.byAddr, k.hop, k.all, k.vpc(vpcOk.value), k.rev];
      const caller = callerKey(vpcOk.value, addrOk.value);
      let r: Awaited<ReturnType<Redis["mvpcMdMove"]>>;
      try {
        r = await this.redis.mvpcMdMove(...K7(P), ...K7(this.keys), id.value, vpcOk.value, caller);
      } catch (err) {
        // The others still move; the start fails at the end, and the next one tries again.
        failed.push(`${id.value}: ${(err as Error).message}`);
        continue;
      }
      if (r === 1) moved++;
      else if (Array.isArray(r)) {
        reportInvalid(
          "gateway",
          "imds-metadata",
          P.inst(id.value),
          `not moved to ${this.keys.inst(id.value)}: ${caller} is ${V.show(r[1])}'s now; DeleteInstanceMetadata removes it`,
          this.log,
          {
            vpcId: vpcOk.value,
          },
        );
      }
    }
    // The earlier counter, once nothing is left to carry it over for.
    if ((await this.redis.exists(P.all)) === 0) await this.redis.del(P.rev);
    if (moved > 0) this.log?.info({ moved }, "instance metadata moved under this host's hash tag");
    if (failed.length) throw new Error(`${failed.length} instance metadata record(s) not moved under this host's hash tag: ${failed.slice(0, 3).join("; ")}`);
    return moved;
  }

  /**
   * Migration from the shared layout (LEGACY_MK, versions before host-scoped
   * metadata): copies the legacy records of instances whose VPC and address
   * are a NIC of this host (its own index mvpc:host:H:nicaddr: the
   * instances only this host's metadata server can serve) into this host's
   * keys, unless this host already has a record of that instance. Each is
   * validated and stored as SetInstanceMetadata stores it (a new rev and
   * update_time); session tokens are not copied (a guest's IMDSv2 client
   * gets 401 once and asks for a new token). The legacy keys are only read —
   * a host's Redis user may no longer write them; the operator deletes them
   * once every gateway has run this (docs/redis-acl.md). Returns what it did.
   */
  async adoptLegacy(): Promise<{ adopted: string[]; skipped: { instanceId: string; reason: string }[] }> {
    const adopted: string[] = [];
    const skipped: { instanceId: string; reason: string }[] = [];
    const legacy = await this.redis.hgetall(LEGACY_MK.byAddr);
    if (Object.keys(legacy).length === 0) return { adopted, skipped };
    const local = new Set(await this.redis.hkeys(naKeys(this.redis).nicaddr(this.hostId)));
    const mine = Object.entries(legacy).filter(([k]) => local.has(k));
    for (const [k, rawId] of mine) {
      const id = V.attempt(() => instanceId("id", rawId));
      if (!id.ok) {
        reportInvalid("gateway", "imds-legacy", LEGACY_MK.byAddr, id.reason, this.log, { field: k, vpcId: vpcOfCaller(k) });
        continue;
      }
      if (await this.redis.exists(this.at.inst(id.value))) continue;
      const pb = await this.redis.hget(LEGACY_MK.inst(id.value), "pb");
      const md = pb ? this.checked(LEGACY_MK.inst(id.value), pb, k) : null;
      if (!md) {
        skipped.push({ instanceId: id.value, reason: "no valid legacy record" });
        continue;
      }
      if (md.instanceId !== id.value || callerKey(md.vpcId, md.localIpv4) !== k) {
        skipped.push({ instanceId: id.value, reason: `the legacy record is of ${md.instanceId} at ${callerKey(md.vpcId, md.localIpv4)}, not ${k}` });
        continue;
      }
      try {
        await this.set(md);
        adopted.push(id.value);
      } catch (err) {
        if (!(err instanceof FailedPreconditionError)) throw err;
        skipped.push({ instanceId: id.value, reason: err.message });
      }
    }
    return { adopted, skipped };
  }
}

/**
 * The control plane's view (`gateway --api-only`, as the control user, who
 * may read every host's metadata): Get, List and Delete across the hosts
 * named in MD_HOSTS. Set is refused — a record belongs to the host whose
 * metadata server serves it, and the request does not say which host that is.
 */
export class FleetMetadataStore implements MetadataView {
  constructor(
    readonly redis: Redis,
    readonly log?: Pick<Logger, "warn" | "info">,
  ) {
    defineScripts(redis);
  }

  /** The hosts that have records; an entry that is not a host id is reported and skipped. */
  async hosts(): Promise<string[]> {
    const out: string[] = [];
    for (const h of (await this.redis.smembers(MD_HOSTS)).sort()) {
      const p = V.attempt(() => V.hostId("host", h));
      if (p.ok) out.push(p.value);
      else reportInvalid("gateway", "imds-hosts", MD_HOSTS, p.reason, this.log, { field: h });
    }
    return out;
  }

  set(): Promise<{ metadata: InstanceMetadata; created: boolean }> {
    return Promise.reject(
      new FailedPreconditionError(
        "this gateway runs with --api-only and serves no instance metadata: a record belongs to the hypervisor whose metadata server serves it; send SetInstanceMetadata to that hypervisor's gateway (its vmm does, on CreateVm)",
      ),
    );
  }

  /**
   * Host h's store. On a single Redis, under the earlier release's names while
   * h's gateway has not moved them (it has an index there and none here).
   */
  private async storeOf(h: string): Promise<MetadataStore> {
    const k = mdKeys(h);
    const previous = !isCluster(this.redis) && (await this.redis.exists(k.all)) === 0 && (await this.redis.exists(k.previous.all)) === 1;
    return new MetadataStore(this.redis, h, this.log, previous);
  }

  /** One record of each host in `hosts` whose key `keyOf(host)` holds `field`: [host, value]. Each host's keys are a slot of their own on a cluster: one read each. */
  private async perHost(hosts: string[], keyOf: (k: MdKeyset) => string, field: string): Promise<[string, string, MetadataStore][]> {
    const stores = await Promise.all(hosts.map((h) => this.storeOf(h)));
    const values = await Promise.all(stores.map((st) => this.redis.hget(keyOf(st.names), field)));
    const out: [string, string, MetadataStore][] = [];
    values.forEach((v, i) => {
      if (typeof v === "string" && v !== "") out.push([hosts[i], v, stores[i]]);
    });
    return out;
  }

  /** The one record found, null for none; FAILED_PRECONDITION if several hosts hold one. */
  private one(what: string, found: [string, InstanceMetadata | null][]): InstanceMetadata | null {
    const ok = found.filter((f): f is [string, InstanceMetadata] => f[1] !== null);
    if (ok.length > 1) {
      throw new FailedPreconditionError(
        `${what} has metadata on ${ok.length} hypervisors (${ok.map((f) => f[0]).join(", ")}); ask each one's gateway (GetInstanceMetadata), and delete the stale record there`,
      );
    }
    return ok[0]?.[1] ?? null;
  }

  async get(instanceId: string): Promise<InstanceMetadata | null> {
    const found = await this.perHost(await this.hosts(), (k) => k.inst(instanceId), "pb");
    return this.one(
      `instance ${instanceId}`,
      found.map(([h, pb, st]) => [h, checkedRecord(this.log, st.names.inst(instanceId), pb)]),
    );
  }

  async getByAddress(vpcId: string, address: string): Promise<InstanceMetadata | null> {
    const ids = await this.perHost(await this.hosts(), (k) => k.byAddr, callerKey(vpcId, address));
    const found: [string, InstanceMetadata | null][] = [];
    for (const [h, , st] of ids) found.push([h, await st.getByAddress(vpcId, address)]);
    return this.one(`${vpcId}/${address}`, found);
  }

  /** Deletes the instance's record on every host that has one. */
  async delete(instanceId: string): Promise<{ deleted: boolean; tokensRevoked: number }> {
    const found = await this.perHost(await this.hosts(), (k) => k.inst(instanceId), "vpc");
    let deleted = false;
    let tokensRevoked = 0;
    for (const [, , st] of found) {
      const r = await st.delete(instanceId);
      deleted ||= r.deleted;
      tokensRevoked += r.tokensRevoked;
    }
    return { deleted, tokensRevoked };
  }

  /**
   * Records of every host ordered by instance id, after `after` (exclusive),
   * optionally of one VPC. An id held by several hosts (a stale record) is
   * listed once per host, and a page never ends between them.
   */
  async list(opts: { vpcId?: string; after?: string; limit: number }): Promise<InstanceMetadata[]> {
    const all: InstanceMetadata[] = [];
    for (const h of await this.hosts()) all.push(...(await (await this.storeOf(h)).list(opts)));
    all.sort((a, b) => (a.instanceId < b.instanceId ? -1 : a.instanceId > b.instanceId ? 1 : 0));
    let n = Math.min(opts.limit, all.length);
    while (n > 0 && n < all.length && all[n].instanceId === all[n - 1].instanceId) n++;
    return all.slice(0, n);
  }

  async resolveVpcName(name: string): Promise<string | null> {
    return await this.redis.hget(ipamKeys(this.redis).vpcByName, name);
  }
}
