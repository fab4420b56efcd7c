// One way to connect to Redis for every service. Commands fail fast while
// Redis is unreachable (no offline queue, one retry) so that callers get
// UNAVAILABLE at once instead of hanging; the client keeps reconnecting in
// the background and the service recovers by itself when Redis is back.
//
// Secrets (the password, TLS keys) come from files, never from the URL: a URL
// sits in an environment variable or on a command line, where ps, /proc and
// crash reports show it.
//
// A Redis Cluster is named by redis-cluster://host:port,host:port,... (the
// seeds; issue #18). connectRedis then returns an ioredis Cluster, typed as
// Redis so that every caller compiles unchanged (see there).
//
// A Redis behind Sentinel is named by redis-sentinel://host:port,.../<master
// name> (the sentinels; issue #18): one primary, as redis:// names, found by
// asking the sentinels and asked again after a failover (connectSentinel).
import { readFileSync } from "node:fs";
import { Cluster, Redis, type ClusterOptions, type RedisOptions as IoRedisOptions } from "ioredis";
import type { Logger } from "pino";
import { watchFailover } from "./redis-failover.js";

/** Files holding Redis credentials (--redis-password-file, --redis-tls-*). */
export interface RedisSecretFiles {
  passwordFile?: string;
  /** CA bundle (PEM) that signed the server's certificate; implies TLS. */
  tlsCa?: string;
  /** Client certificate and key (PEM), if Redis requires them. */
  tlsCert?: string;
  tlsKey?: string;
  /** The sentinels' password (--redis-sentinel-password-file), for a redis-sentinel:// URL whose sentinels have requirepass. */
  sentinelPasswordFile?: string;
}

export interface RedisSecrets {
  password?: string;
  tls?: { ca?: Buffer; cert?: Buffer; key?: Buffer };
  sentinelPassword?: string;
}

/**
 * The password in `file`, for the flag that named it: one line, a trailing
 * newline (echo, kubectl create secret --from-file) not part of it; an empty
 * file is refused under that flag's name.
 */
export function passwordIn(flag: string, file: string): string {
  const pw = readFileSync(file, "utf8").replace(/\r?\n$/, "");
  if (!pw) throw new Error(`${flag} ${file} is empty`);
  return pw;
}

export function readRedisSecrets(f: RedisSecretFiles): RedisSecrets {
  const out: RedisSecrets = {};
  if (f.passwordFile) out.password = passwordIn("--redis-password-file", f.passwordFile);
  if (f.sentinelPasswordFile) out.sentinelPassword = passwordIn("--redis-sentinel-password-file", f.sentinelPasswordFile);
  if (!!f.tlsCert !== !!f.tlsKey) throw new Error("--redis-tls-cert and --redis-tls-key go together");
  if (f.tlsCa || f.tlsCert) {
    out.tls = {
      ...(f.tlsCa ? { ca: readFileSync(f.tlsCa) } : {}),
      ...(f.tlsCert ? { cert: readFileSync(f.tlsCert), key: readFileSync(f.tlsKey!) } : {}),
    };
  }
  return out;
}

/** The scheme of a Redis Cluster URL: redis-cluster://host:port,host:port,... */
export const CLUSTER_SCHEME = "redis-cluster://";

/** At most this many seeds in a cluster URL (any one that answers gives the whole cluster's map). */
export const MAX_CLUSTER_SEEDS = 32;

/** True if the URL names a Redis Cluster (redis-cluster://...). */
export function isClusterUrl(url: string): boolean {
  return url.toLowerCase().startsWith(CLUSTER_SCHEME);
}

const IPV4 = /^(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}$/;
const HOST_LABEL = /^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$/;

function validHost(host: string): boolean {
  const labels = host.split(".");
  // All digits and dots: an IPv4 address, so it must be a valid one (not a "hostname" 999.1.1.1).
  if (/^[0-9.]+$/.test(host)) return IPV4.test(host);
  return host.length <= 253 && labels.every((l) => HOST_LABEL.test(l));
}

/** What a list of host:port endpoints in a URL is made of, for the messages about it. */
interface EndpointList {
  /** One endpoint, in messages: "cluster node", "sentinel". */
  noun: string;
  /** The URL's form, as the messages end with it: "use redis-cluster://host:port,...". */
  form: string;
  max: number;
  /** Said when there are more than max. */
  tooMany: string;
}

/**
 * The endpoints of a comma-separated host:port list (the part of a
 * redis-cluster:// or redis-sentinel:// URL between the scheme and the "/"):
 * 1–max of them, each an IPv4 address or a host name and a port 1–65535,
 * none twice. Throws an Error saying what to change.
 */
function parseEndpointList(url: string, list: string, k: EndpointList): { host: string; port: number }[] {
  if (list === "") throw new Error(`--redis ${JSON.stringify(url)} names no ${k.noun}; ${k.form}`);
  const parts = list.split(",");
  if (parts.length > k.max) throw new Error(`--redis names ${parts.length} ${k.noun}s: give at most ${k.max} (${k.tooMany})`);
  const seen = new Set<string>();
  return parts.map((part) => {
    const m = /^([^:]*):([0-9]{1,5})$/.exec(part);
    if (!m) {
      if (part.startsWith("[") || (part.match(/:/g) ?? []).length > 1)
        throw new Error(`--redis: ${k.noun} ${JSON.stringify(part)}: IPv6 addresses are not supported here; use an IPv4 address or a host name`);
      throw new Error(`--redis: ${k.noun} ${JSON.stringify(part)} is not host:port (the port is required); ${k.form}`);
    }
    const [, host, portText] = m;
    const port = Number(portText);
    if (!validHost(host)) throw new Error(`--redis: ${k.noun} ${JSON.stringify(part)}: ${JSON.stringify(host)} is not an IPv4 address or a host name`);
    if (port < 1 || port > 65535 || portText.startsWith("0")) throw new Error(`--redis: ${k.noun} ${JSON.stringify(part)}: port ${portText} is not 1–65535`);
    const key = `${host.toLowerCase()}:${port}`;
    if (seen.has(key)) throw new Error(`--redis: ${k.noun} ${JSON.stringify(part)} is listed twice`);
    seen.add(key);
    return { host, port };
  });
}

/** The refusal of a user or password in a cluster or sentinel URL; the URL itself is not repeated (it may carry the password). */
function credentialsRefused(scheme: string): Error {
  return new Error(`--redis: a ${scheme} URL takes no user or password (ps and the environment show a URL); use --redis-user and --redis-password-file`);
}

/**
 * The seeds of a redis-cluster:// URL: redis-cluster://h1:p1,h2:p2,... with
 * 1–32 seeds, each an IPv4 address or a host name and a port 1–65535, and
 * optionally "/" or "/0" after them (a cluster has database 0 only). No user
 * or password in it: those come from --redis-user and --redis-password-file.
 * Throws an Error saying what to change.
 */
export function parseClusterUrl(url: string): { host: string; port: number }[] {
  const form = `use ${CLUSTER_SCHEME}host:port,host:port,...`;
  if (!isClusterUrl(url)) throw new Error(`--redis ${JSON.stringify(url)} is not a cluster URL: ${form}`);
  let rest = url.slice(CLUSTER_SCHEME.length);
  // Before anything that quotes the URL: "@" can be in no part of it but credentials.
  if (rest.includes("@")) throw credentialsRefused(CLUSTER_SCHEME);
  if (/[?#]/.test(rest)) throw new Error(`--redis ${JSON.stringify(url)}: a cluster URL takes no query or fragment; ${form}`);
  const slash = rest.indexOf("/");
  if (slash !== -1) {
    const db = rest.slice(slash);
    if (db !== "/" && db !== "/0")
      throw new Error(`--redis ${JSON.stringify(url)}: a Redis Cluster has database 0 only; leave ${JSON.stringify(db)} out (${form})`);
    rest = rest.slice(0, slash);
  }
  return parseEndpointList(url, rest, {
    noun: "cluster node",
    form,
    max: MAX_CLUSTER_SEEDS,
    tooMany: "a few primaries are enough, any one gives the whole map",
  });
}

/** The scheme of a Redis-behind-Sentinel URL: redis-sentinel://host:port,host:port,.../<master name> */
export const SENTINEL_SCHEME = "redis-sentinel://";

/** At most this many sentinels in a sentinel URL (any one that answers names the master, and tells of the others). */
export const MAX_SENTINELS = 32;

/**
 * True if the URL names a Redis behind Sentinel (redis-sentinel://...). Such
 * a URL names one primary, as redis:// does: the single-Redis key layout,
 * isCluster() false.
 */
export function isSentinelUrl(url: string): boolean {
  return url.toLowerCase().startsWith(SENTINEL_SCHEME);
}

/**
 * The sentinels and the master's name of a redis-sentinel:// URL:
 * redis-sentinel://h1:p1,h2:p2,.../<master name>, with 1–32 sentinels
 * (host:port as in a cluster URL, the port required) and the name the
 * sentinels monitor the master by (`sentinel monitor <name> …`), 1–64
 * characters of [A-Za-z0-9._-]. The database is 0. No user or password in
 * it: the data nodes' come from --redis-user and --redis-password-file, the
 * sentinels' from --redis-sentinel-password-file. No query. Throws an Error
 * saying what to change.
 */
export function parseSentinelUrl(url: string): { sentinels: { host: string; port: number }[]; name: string } {
  const form = `use ${SENTINEL_SCHEME}host:port,host:port,.../<master name>`;
  if (!isSentinelUrl(url)) throw new Error(`--redis ${JSON.stringify(url)} is not a sentinel URL: ${form}`);
  const rest = url.slice(SENTINEL_SCHEME.length);
  // Before anything that quotes the URL: "@" can be in no part of it but credentials.
  if (rest.includes("@")) throw credentialsRefused(SENTINEL_SCHEME);
  if (/[?#]/.test(rest)) throw new Error(`--redis ${JSON.stringify(url)}: a sentinel URL takes no query or fragment; ${form}`);
  const slash = rest.indexOf("/");
  const name = slash === -1 ? "" : rest.slice(slash + 1);
  if (name === "")
    throw new Error(
      `--redis ${JSON.stringify(url)} names no master: add "/<master name>" after the sentinels, the name of their \`sentinel monitor <name> …\` line (${form})`,
    );
  if (!/^[A-Za-z0-9._-]{1,64}$/.test(name))
    throw new Error(`--redis ${JSON.stringify(url)}: master name ${JSON.stringify(name)} is not 1–64 characters of [A-Za-z0-9._-] (${form})`);
  const sentinels = parseEndpointList(url, rest.slice(0, slash), {
    noun: "sentinel",
    form,
    max: MAX_SENTINELS,
    tooMany: "a few are enough: any one names the master and the others",
  });
  return { sentinels, name };
}

/** True if the URL names an ACL user (redis://user:pw@host). Never for redis-cluster:// or redis-sentinel://, which refuse a user outright (parseClusterUrl, parseSentinelUrl). */
export function urlHasUser(url: string): boolean {
  if (!/^rediss?:\/\//.test(url)) return false;
  try {
    return new URL(url).username !== "";
  } catch {
    return false;
  }
}

/** True if the URL carries a password (redis://:pw@host or redis://user:pw@host). Never for redis-cluster:// or redis-sentinel:// (their parsers refuse one). */
export function urlHasPassword(url: string): boolean {
  if (!/^rediss?:\/\//.test(url)) return false;
  try {
    return new URL(url).password !== "";
  } catch {
    return false;
  }
}

export interface RedisOptions extends RedisSecrets {
  url: string;
  /** ACL user (--redis-user); without it AUTH is the password alone (the "default" user). */
  username?: string;
  /** Per-command timeout; a slow Redis becomes UNAVAILABLE, not a hang. */
  commandTimeoutMs?: number;
  logger?: Logger;
}

/** Reconnect delays of the client (single) and of the cluster's topology refresh: 100 ms doubling to 2 s. */
const retryDelay = (times: number): number => Math.min(50 * 2 ** Math.min(times, 6), 2000);

/**
 * Lua: server_ms(), the Redis server's clock in ms (TIME): what a script
 * compares times by when the daemons that write and read them run on hosts
 * whose clocks may disagree.
 */
export const LUA_SERVER_MS = `
local function server_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
`;

/**
 * The client of every service: a single Redis (redis://, rediss://, a unix
 * socket path), for redis-sentinel:// the primary its sentinels name, or,
 * for redis-cluster://, an ioredis Cluster. Either way commands fail fast
 * while Redis is unreachable (no offline queue, one retry, a per-command
 * timeout) and the client reconnects in the background.
 */
export function connectRedis(opts: RedisOptions): Redis {
  if (opts.sentinelPassword !== undefined && !isSentinelUrl(opts.url))
    throw new Error(`--redis-sentinel-password-file is for a ${SENTINEL_SCHEME} URL only: --redis names no sentinels`);
  const client = isClusterUrl(opts.url) ? connectCluster(opts) : isSentinelUrl(opts.url) ? connectSentinel(opts) : connectSingle(opts);
  let down = false;
  client.on("error", (err: Error) => {
    if (!down) opts.logger?.warn({ err: err.message }, "redis connection lost; reconnecting");
    down = true;
  });
  // A sentinel that cannot be reached, or does not know the master's name
  // ("got an invalid reply: null"): said once per outage, next to the error above.
  let sentinelSaid = false;
  client.on("sentinelError", (err: Error) => {
    if (!sentinelSaid) opts.logger?.warn({ err: err.message }, "redis sentinel did not name the master; asking the next one");
    sentinelSaid = true;
  });
  client.on("ready", () => {
    if (down) opts.logger?.info("redis connection restored");
    down = false;
    sentinelSaid = false;
  });
  return client;
}

/** What a connection to one Redis node carries, single or in a cluster. */
function nodeOptions(opts: RedisOptions) {
  return {
    ...(opts.username ? { username: opts.username } : {}),
    ...(opts.password !== undefined ? { password: opts.password } : {}),
    ...(opts.tls ? { tls: opts.tls } : {}),
    maxRetriesPerRequest: 1,
    commandTimeout: opts.commandTimeoutMs ?? 2000,
    connectTimeout: 2000,
    reconnectOnError: () => false,
  } satisfies IoRedisOptions;
}

/** What a client of one primary (redis://, or the one the sentinels name) adds to the node options: fail fast, auto-pipelined, reconnecting. */
const ONE_PRIMARY = {
  enableOfflineQueue: false,
  enableAutoPipelining: true,
  lazyConnect: false,
  retryStrategy: retryDelay,
} satisfies IoRedisOptions;

function connectSingle(opts: RedisOptions): Redis {
  return new Redis(opts.url, { ...nodeOptions(opts), ...ONE_PRIMARY });
}

/**
 * The primary that the sentinels of a redis-sentinel:// URL name: a single
 * Redis client (the same node options, fail-fast, auto-pipelining) that asks
 * the sentinels for the master at every (re)connection and checks the node
 * it reaches is a master (ioredis's role check), so after a failover it ends
 * up on the promoted replica without a restart. Meanwhile commands fail as
 * they do while one Redis is down (UNAVAILABLE to the callers).
 *
 * Credentials and TLS: the data nodes get --redis-user/--redis-password-file
 * and the TLS files as a single Redis does; the sentinels get no user and
 * the password of --redis-sentinel-password-file (none: no AUTH) and, with
 * TLS, the same TLS files.
 */
function connectSentinel(opts: RedisOptions): Redis {
  const { sentinels, name } = parseSentinelUrl(opts.url);
  const client = new Redis({
    ...nodeOptions(opts),
    sentinels,
    name,
    role: "master",
    ...(opts.sentinelPassword !== undefined ? { sentinelPassword: opts.sentinelPassword } : {}),
    // Without this ioredis speaks plain TCP to the master even with tls set (its `tls` would be the sentinels' only).
    ...(opts.tls ? { enableTLSForSentinelMode: true, sentinelTLS: opts.tls } : {}),
    // A sentinel that hangs is skipped for the next rather than holding the reconnection.
    sentinelCommandTimeout: 1000,
    // Off: ioredis' detector ends the client for good when a failover is announced while it
    // reconnects; watchFailover (below) follows +switch-master instead (redis-failover.ts).
    failoverDetector: false,
    // A master demoted under a connection answers writes with READONLY: drop the connection and
    // ask the sentinels again, instead of failing every write until it drops by itself. (ioredis
    // would resend the command, but with no offline queue it is refused while reconnecting:
    // UNAVAILABLE, safe to retry, READONLY having applied nothing. Commands still awaiting a
    // reply when a connection drops, by this or by the failover watch, are sent again on the
    // new one, as after any dropped connection: the scripts find their own first run.)
    reconnectOnError: (err: Error) => (err.message.startsWith("READONLY") ? 2 : false),
    ...ONE_PRIMARY,
  });
  // Leaves the old master at once on +switch-master, also when it is still up (a switchover, a partition that heals).
  const stopWatch = watchFailover(client, {
    sentinels,
    name,
    ...(opts.sentinelPassword !== undefined ? { password: opts.sentinelPassword } : {}),
    ...(opts.tls ? { tls: opts.tls } : {}),
    retryStrategy: retryDelay,
    ...(opts.logger ? { logger: opts.logger } : {}),
  });
  // The watch ends with the client. Its "end" is not enough: ioredis 5 never emits it for a client
  // disconnected while it waits to reconnect, and the watch's connections would hold the process.
  const disconnect = client.disconnect.bind(client);
  client.disconnect = (reconnect = false) => {
    if (!reconnect) stopWatch();
    disconnect(reconnect);
  };
  return client;
}

function connectCluster(opts: RedisOptions): Redis {
  const seeds = parseClusterUrl(opts.url);
  const options: ClusterOptions = {
    // Per node: credentials, TLS, the command timeout, one retry.
    redisOptions: nodeOptions(opts),
    enableOfflineQueue: false,
    // No auto-pipelining on a cluster: it batches a tick's commands per node,
    // and when a slot moves (resharding, a failover) a batch holding the moved
    // slot and others answers MOVED for one and OK for the rest, which ioredis
    // does not redirect: the callers got "MOVED …", then "All keys in the
    // pipeline should belong to the same slots allocation group", until the
    // map was read again. Sent alone, each command follows its MOVED
    // (redis-cluster.test.ts moves a slot under a client).
    enableAutoPipelining: false,
    lazyConnect: false,
    clusterRetryStrategy: retryDelay,
    // Reads on primaries: a replica may lag, and microvpc reads what it has just written.
    scaleReads: "master",
    // SSUBSCRIBE on the node that owns the channel's slot (wake-ups over sharded pub/sub).
    shardedSubscribers: true,
    // With TLS, keep host names as given: ioredis would resolve them to addresses,
    // which a certificate naming the host does not match.
    ...(opts.tls ? { dnsLookup: (address: string, callback: (err: null, address: string) => void) => callback(null, address) } : {}),
  };
  // Typed as Redis so that the callers compile unchanged: Cluster has the same
  // command API (it is a Commander, as Redis is, with the same generated
  // command methods, events and `status`). What differs is handled here:
  // multi-key commands and scripts must keep their keys in one slot (the key
  // schema's hash tags), and duplicate() takes (startupNodes, options), so
  // callers use duplicateClient(); isCluster() tells the two apart.
  return failFastUnmapped(new Cluster(seeds, options)) as unknown as Redis;
}

/**
 * While a Cluster has no slot map (connecting, or every seed unreachable),
 * ioredis parks auto-pipelined commands, pipelines and MULTIs until its next
 * connection attempt ends, whatever enableOfflineQueue says: each would wait
 * a retry delay plus a whole attempt (up to a second per unreachable seed).
 * With the offline queue off they are refused at once instead, as the single
 * client refuses commands while it is not connected.
 */
function failFastUnmapped(c: Cluster): Cluster {
  const wait = c.delayUntilReady.bind(c);
  c.delayUntilReady = (callback: Parameters<Cluster["delayUntilReady"]>[0]) => {
    if (c.options.enableOfflineQueue) wait(callback);
    else callback(new Error("Cluster isn't ready and enableOfflineQueue options is false"));
  };
  return c;
}

/** True if the client is an ioredis Cluster (connectRedis of a redis-cluster:// URL). */
/**
 * Defines a script command whose key count varies per call (the count is its
 * first argument: extra keys on one layout). On a Redis Cluster the command
 * must stay out of ioredis's auto-pipelining, if a client turns it on: that
 * groups a call by the slot of its first argument, here the count, and so
 * batched it with other commands for that slot's node, which ioredis then
 * refused whole ("All keys in the pipeline should belong to the same slots
 * allocation group") once calls of other slots met in one tick. Sent alone,
 * a call is routed by its keys. (connectRedis's cluster client has
 * auto-pipelining off altogether: connectCluster says why.)
 */
export function defineVariadicCommand(client: Redis, name: string, lua: string): void {
  client.defineCommand(name, { lua });
  if (!isCluster(client)) return;
  const o = client.options as { autoPipeliningIgnoredCommands?: string[] };
  if (!o.autoPipeliningIgnoredCommands?.includes(name)) o.autoPipeliningIgnoredCommands = [...(o.autoPipeliningIgnoredCommands ?? []), name];
}

export function isCluster(client: Redis): boolean {
  return (client as unknown as { isCluster?: boolean }).isCluster === true;
}

/**
 * A new client like `client`, with these options changed: Redis#duplicate
 * for a single client; for a Cluster, a duplicate with the same seeds whose
 * per-node options (redisOptions) take the overrides, and whose cluster-wide
 * options take those that are cluster-wide there (enableOfflineQueue,
 * retryStrategy as clusterRetryStrategy, lazyConnect, enableAutoPipelining),
 * then `clusterOverrides` (ignored for a single client).
 */
export function duplicateClient(client: Redis, overrides: Partial<IoRedisOptions> = {}, clusterOverrides: Partial<ClusterOptions> = {}): Redis {
  if (!isCluster(client)) {
    // Behind Sentinel, a duplicate (the event feeds' blocking readers) gets no failover watch of its own
    // (connectSentinel's is the main client's): a watch holds a connection to every sentinel, so one per
    // reader would multiply the sentinels' clients by the readers of every host. A reader left on a
    // demoted master reads what it replicates from the new one, and asks the sentinels again when that
    // connection drops.
    return client.duplicate(overrides);
  }
  const c = client as unknown as Cluster;
  const { enableOfflineQueue, retryStrategy, lazyConnect, enableAutoPipelining, ...perNode } = overrides;
  // Left out of ClusterOptions.redisOptions: the cluster decides them for its node connections.
  const { port: _port, host: _host, path: _path, sentinels: _sentinels, readOnly: _readOnly, ...nodeOverrides } = perNode;
  const next: ClusterOptions = {
    redisOptions: { ...c.options.redisOptions, ...nodeOverrides },
    ...("enableOfflineQueue" in overrides ? { enableOfflineQueue } : {}),
    ...("retryStrategy" in overrides ? { clusterRetryStrategy: retryStrategy } : {}),
    ...("lazyConnect" in overrides ? { lazyConnect } : {}),
    ...("enableAutoPipelining" in overrides ? { enableAutoPipelining } : {}),
    ...clusterOverrides,
  };
  // Cluster#duplicate(startupNodes, options): no startup nodes means the same seeds; options are merged over the original's.
  return failFastUnmapped(c.duplicate(undefined, next)) as unknown as Redis;
}

/** Resolves once the client is connected (or rejects after timeoutMs). */
export async function waitReady(client: Redis, timeoutMs = 10_000): Promise<void> {
  if (client.status === "ready") return;
  await new Promise<void>((resolve, reject) => {
    const t = setTimeout(() => {
      cleanup();
      reject(new Error(`redis not ready after ${timeoutMs} ms (status ${client.status})`));
    }, timeoutMs);
    const onReady = () => {
      cleanup();
      resolve();
    };
    const cleanup = () => {
      clearTimeout(t);
      client.off("ready", onReady);
    };
    client.on("ready", onReady);
  });
}
