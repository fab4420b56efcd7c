// --redis redis-cluster://host:port,... and redis-sentinel://host:port,.../name
// (issue #18): the seeds and the sentinels are parsed strictly (one parser of
// host:port lists), with messages that say what to change; credentials are
// refused in the URL; connectRedis builds an ioredis Cluster, or a single
// client that asks the sentinels, with the fail-fast options, and
// duplicateClient carries overrides to the right level. No server here:
// test/integration/redis-cluster.test.ts and redis-sentinel.test.ts run
// against a real cluster and a real failover.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Cluster, RedisOptions } from "ioredis";
import { test } from "vitest";
import { checkRedisUser } from "../../services/common/daemon.js";
import {
  connectRedis,
  duplicateClient,
  isCluster,
  isClusterUrl,
  isSentinelUrl,
  MAX_CLUSTER_SEEDS,
  MAX_SENTINELS,
  parseClusterUrl,
  parseSentinelUrl,
  readRedisSecrets,
  urlHasPassword,
  urlHasUser,
} from "../../services/common/redis.js";

test("parseClusterUrl: IPv4 addresses and host names with their ports, in order", () => {
  assert.deepEqual(parseClusterUrl("redis-cluster://127.0.0.1:7000"), [{ host: "127.0.0.1", port: 7000 }]);
  assert.deepEqual(parseClusterUrl("redis-cluster://10.0.0.1:6379,redis-1.redis.svc.cluster.local:6380,r2:1/"), [
    { host: "10.0.0.1", port: 6379 },
    { host: "redis-1.redis.svc.cluster.local", port: 6380 },
    { host: "r2", port: 1 },
  ]);
  assert.deepEqual(parseClusterUrl("REDIS-CLUSTER://h:65535/0"), [{ host: "h", port: 65535 }]);
  const many = Array.from({ length: MAX_CLUSTER_SEEDS }, (_, i) => `10.0.0.${i + 1}:6379`).join(",");
  assert.equal(parseClusterUrl(`redis-cluster://${many}`).length, MAX_CLUSTER_SEEDS);
});

test("parseClusterUrl: a bad seed list is refused with a message a person can act on", () => {
  const bad: [string, RegExp][] = [
    ["redis-cluster://", /names no cluster node/],
    ["redis-cluster:///", /names no cluster node/],
    ["redis-cluster://h", /is not host:port \(the port is required\)/],
    ["redis-cluster://h:", /is not host:port/],
    ["redis-cluster://h:0", /port 0 is not 1–65535/],
    ["redis-cluster://h:65536", /port 65536 is not 1–65535/],
    ["redis-cluster://h:06379", /port 06379 is not 1–65535/],
    ["redis-cluster://h:123456", /is not host:port/],
    ["redis-cluster://h:6379,", /"" is not host:port/],
    ["redis-cluster://h:6379,,g:6379", /"" is not host:port/],
    ["redis-cluster://h:6379 ,g:6379", /"h:6379 " is not host:port/],
    ["redis-cluster://256.0.0.1:6379", /"256\.0\.0\.1" is not an IPv4 address or a host name/],
    ["redis-cluster://10.0.0:6379", /not an IPv4 address/],
    ["redis-cluster://010.0.0.1:6379", /not an IPv4 address/],
    ["redis-cluster://-h:6379", /not an IPv4 address or a host name/],
    ["redis-cluster://h_1:6379", /not an IPv4 address or a host name/],
    ["redis-cluster://a..b:6379", /not an IPv4 address or a host name/],
    [`redis-cluster://${"a".repeat(64)}:6379`, /not an IPv4 address or a host name/],
    ["redis-cluster://[::1]:6379", /IPv6 addresses are not supported here/],
    ["redis-cluster://::1:6379", /IPv6 addresses are not supported here/],
    ["redis-cluster://h:6379/1", /database 0 only; leave "\/1" out/],
    ["redis-cluster://h:6379/0/x", /database 0 only/],
    ["redis-cluster://h:6379?tls=1", /no query or fragment/],
    ["redis-cluster://h:6379,H:6379", /listed twice/],
    [`redis-cluster://${Array.from({ length: MAX_CLUSTER_SEEDS + 1 }, (_, i) => `h${i}:6379`).join(",")}`, /give at most 32/],
    ["redis://h:6379", /is not a cluster URL/],
  ];
  for (const [url, why] of bad) assert.throws(() => parseClusterUrl(url), why, url);
});

test("a user or password in a cluster URL is refused, without repeating the URL", () => {
  for (const url of [
    "redis-cluster://:hunter2@h:6379",
    "redis-cluster://alice:hunter2@h:6379,g:6379",
    "redis-cluster://alice@h:6379",
    "redis-cluster://:hunter2@h:1/3",
    "redis-cluster://u:hunter2@h:1#",
    "redis-cluster://u:hunter2@h:1?x",
  ]) {
    assert.throws(
      () => parseClusterUrl(url),
      (e: Error) => /takes no user or password.*--redis-user and --redis-password-file/.test(e.message) && !e.message.includes("hunter2"),
      url,
    );
    // connectRedis refuses it too (the daemon's start fails with this message).
    assert.throws(() => connectRedis({ url }), /takes no user or password/);
  }
  // The single-URL checks of daemon.ts leave cluster URLs alone: parseClusterUrl decides.
  assert.equal(urlHasUser("redis-cluster://alice:pw@h:6379"), false);
  assert.equal(urlHasPassword("redis-cluster://:pw@h:6379"), false);
  assert.doesNotThrow(() => checkRedisUser("redis-cluster://h:6379,g:6379", "microvpc-control", "/etc/pw"));
  assert.throws(() => checkRedisUser("redis-cluster://h:6379", "microvpc-control"), /needs --redis-password-file/);
});

test("isClusterUrl: the scheme only", () => {
  assert.equal(isClusterUrl("redis-cluster://h:1"), true);
  assert.equal(isClusterUrl("Redis-Cluster://h:1"), true);
  for (const u of ["redis://h:1/0", "rediss://h:1", "/run/redis.sock", "redis-clusterx://h:1", ""]) assert.equal(isClusterUrl(u), false, u);
});

test("connectRedis of a cluster URL: an ioredis Cluster with the fail-fast options; duplicateClient carries overrides", () => {
  // Port 1 on loopback: nothing listens, the connection is refused at once.
  const r = connectRedis({ url: "redis-cluster://127.0.0.1:1", commandTimeoutMs: 700, username: "u", password: "p" });
  const d = duplicateClient(r, { enableOfflineQueue: true, commandTimeout: undefined, maxRetriesPerRequest: null }, { slotsRefreshTimeout: 500 });
  try {
    assert.equal(isCluster(r), true);
    const o = (r as unknown as Cluster).options;
    assert.equal(o.enableOfflineQueue, false);
    // Off: a per-node batch does not follow a slot that moved (redis-cluster.test.ts moves one).
    assert.equal(o.enableAutoPipelining, false);
    assert.equal(o.scaleReads, "master");
    assert.equal(o.shardedSubscribers, true);
    assert.equal(typeof o.clusterRetryStrategy, "function");
    assert.deepEqual(
      { ...o.redisOptions, reconnectOnError: undefined },
      { username: "u", password: "p", maxRetriesPerRequest: 1, commandTimeout: 700, connectTimeout: 2000, reconnectOnError: undefined },
    );
    assert.equal(isCluster(d), true);
    const od = (d as unknown as Cluster).options;
    assert.equal(od.enableOfflineQueue, true, "a cluster-wide option goes to the cluster");
    assert.equal(od.slotsRefreshTimeout, 500);
    assert.equal(od.redisOptions!.commandTimeout, undefined, "a per-node option goes to redisOptions");
    assert.equal(od.redisOptions!.maxRetriesPerRequest, null);
    assert.equal(od.redisOptions!.password, "p", "the rest is the original's");
    assert.equal(od.scaleReads, "master");
  } finally {
    r.disconnect();
    d.disconnect();
  }
  const single = connectRedis({ url: "redis://127.0.0.1:1/0" });
  const ds = duplicateClient(single, { enableOfflineQueue: true }, { shardedSubscribers: true });
  try {
    assert.equal(isCluster(single), false);
    assert.equal(isCluster(ds), false);
    assert.equal(ds.options.enableOfflineQueue, true);
  } finally {
    single.disconnect();
    ds.disconnect();
  }
});

test("parseSentinelUrl: the sentinels, in order, and the master's name", () => {
  assert.deepEqual(parseSentinelUrl("redis-sentinel://127.0.0.1:26379/microvpc"), { sentinels: [{ host: "127.0.0.1", port: 26379 }], name: "microvpc" });
  assert.deepEqual(parseSentinelUrl("redis-sentinel://10.0.0.1:26379,microvpc-redis-1.microvpc-redis:26380,s3:1/my_master-1.a"), {
    sentinels: [
      { host: "10.0.0.1", port: 26379 },
      { host: "microvpc-redis-1.microvpc-redis", port: 26380 },
      { host: "s3", port: 1 },
    ],
    name: "my_master-1.a",
  });
  assert.deepEqual(parseSentinelUrl("REDIS-SENTINEL://h:65535/M"), { sentinels: [{ host: "h", port: 65535 }], name: "M" });
  assert.equal(parseSentinelUrl(`redis-sentinel://h:1/${"n".repeat(64)}`).name.length, 64);
  const many = Array.from({ length: MAX_SENTINELS }, (_, i) => `10.0.1.${i + 1}:26379`).join(",");
  assert.equal(parseSentinelUrl(`redis-sentinel://${many}/m`).sentinels.length, MAX_SENTINELS);
});

test("parseSentinelUrl: a bad URL is refused with a message a person can act on", () => {
  const bad: [string, RegExp][] = [
    ["redis-sentinel://h:26379", /names no master: add "\/<master name>" after the sentinels.*sentinel monitor <name>/],
    ["redis-sentinel://h:26379/", /names no master/],
    ["redis-sentinel://", /names no master/],
    ["redis-sentinel:///m", /names no sentinel; use redis-sentinel:\/\/host:port,host:port,...\/<master name>/],
    ["redis-sentinel://h/m", /sentinel "h" is not host:port \(the port is required\)/],
    ["redis-sentinel://h:0/m", /port 0 is not 1–65535/],
    ["redis-sentinel://h:65536/m", /port 65536 is not 1–65535/],
    ["redis-sentinel://h:02637/m", /port 02637 is not 1–65535/],
    ["redis-sentinel://h:26379,/m", /sentinel "" is not host:port/],
    ["redis-sentinel://256.1.1.1:26379/m", /"256\.1\.1\.1" is not an IPv4 address or a host name/],
    ["redis-sentinel://h_1:26379/m", /not an IPv4 address or a host name/],
    ["redis-sentinel://[::1]:26379/m", /IPv6 addresses are not supported here/],
    ["redis-sentinel://h:26379,H:26379/m", /sentinel "H:26379" is listed twice/],
    [`redis-sentinel://${Array.from({ length: MAX_SENTINELS + 1 }, (_, i) => `h${i}:26379`).join(",")}/m`, /names 33 sentinels: give at most 32/],
    ["redis-sentinel://h:26379/my master", /master name "my master" is not 1–64 characters of \[A-Za-z0-9._-\]/],
    ["redis-sentinel://h:26379/a/b", /master name "a\/b" is not 1–64 characters/],
    [`redis-sentinel://h:26379/${"n".repeat(65)}`, /is not 1–64 characters/],
    ["redis-sentinel://h:26379/m?db=1", /takes no query or fragment/],
    ["redis-sentinel://h:26379/m#x", /takes no query or fragment/],
    ["redis://h:6379", /is not a sentinel URL: use redis-sentinel:\/\//],
    ["redis-cluster://h:6379", /is not a sentinel URL/],
  ];
  for (const [url, why] of bad) assert.throws(() => parseSentinelUrl(url), why, url);
  // The cluster parser's messages, from the same list parser, still name cluster nodes.
  assert.throws(() => parseClusterUrl("redis-cluster://h:1,h:1"), /cluster node "h:1" is listed twice/);
});

test("a user or password in a sentinel URL is refused, without repeating the URL; the single-URL checks leave it alone", () => {
  for (const url of ["redis-sentinel://:hunter2@h:26379/m", "redis-sentinel://alice:hunter2@h:26379,g:26379/m", "redis-sentinel://alice@h:26379/m?x=hunter2"]) {
    const refused = (e: Error) =>
      /redis-sentinel:\/\/ URL takes no user or password.*--redis-user and --redis-password-file/.test(e.message) && !e.message.includes("hunter2");
    assert.throws(() => parseSentinelUrl(url), refused, url);
    assert.throws(() => connectRedis({ url }), refused, url);
  }
  assert.equal(urlHasUser("redis-sentinel://alice:pw@h:26379/m"), false);
  assert.equal(urlHasPassword("redis-sentinel://:pw@h:26379/m"), false);
  assert.doesNotThrow(() => checkRedisUser("redis-sentinel://h:26379/m", "microvpc-control", "/etc/pw"));
  assert.throws(() => checkRedisUser("redis-sentinel://h:26379/m", "microvpc-control"), /needs --redis-password-file/);
});

test("isSentinelUrl: the scheme only; a sentinel URL is not a cluster URL", () => {
  assert.equal(isSentinelUrl("redis-sentinel://h:1/m"), true);
  assert.equal(isSentinelUrl("Redis-Sentinel://h:1/m"), true);
  assert.equal(isClusterUrl("redis-sentinel://h:1/m"), false);
  for (const u of ["redis://h:1/0", "redis-cluster://h:1", "/run/redis.sock", "redis-sentinelx://h:1/m", ""]) assert.equal(isSentinelUrl(u), false, u);
});

test("--redis-sentinel-password-file: read like the password file, and for a sentinel URL only", () => {
  const dir = mkdtempSync(join(tmpdir(), "mvpc-sentinel-pw-"));
  try {
    writeFileSync(join(dir, "pw"), "s3cret\n");
    writeFileSync(join(dir, "empty"), "\n");
    assert.equal(readRedisSecrets({ sentinelPasswordFile: join(dir, "pw") }).sentinelPassword, "s3cret");
    assert.throws(() => readRedisSecrets({ sentinelPasswordFile: join(dir, "empty") }), /--redis-sentinel-password-file .* is empty/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  for (const url of ["redis://127.0.0.1:1/0", "redis-cluster://127.0.0.1:1"])
    assert.throws(() => connectRedis({ url, sentinelPassword: "s" }), /--redis-sentinel-password-file is for a redis-sentinel:\/\/ URL only/, url);
});

test("connectRedis of a sentinel URL: a single client asking the sentinels, fail-fast, following failovers; duplicates keep all of it but the watcher", () => {
  // Port 1 on loopback: nothing listens, every connection is refused at once.
  const r = connectRedis({
    url: "redis-sentinel://127.0.0.1:1,127.0.0.1:2/microvpc",
    commandTimeoutMs: 700,
    username: "u",
    password: "p",
    sentinelPassword: "sp",
  });
  r.on("error", () => {});
  const d = duplicateClient(r, { enableOfflineQueue: true, commandTimeout: undefined, maxRetriesPerRequest: null }, { shardedSubscribers: true });
  d.on("error", () => {});
  try {
    assert.equal(isCluster(r), false, "one primary: the single-Redis key layout");
    const o: RedisOptions = r.options;
    assert.deepEqual(o.sentinels, [
      { host: "127.0.0.1", port: 1 },
      { host: "127.0.0.1", port: 2 },
    ]);
    assert.equal(o.name, "microvpc");
    assert.equal(o.role, "master");
    assert.equal(o.username, "u");
    assert.equal(o.password, "p");
    assert.equal(o.sentinelPassword, "sp");
    assert.equal(o.commandTimeout, 700);
    assert.equal(o.maxRetriesPerRequest, 1);
    assert.equal(o.enableOfflineQueue, false);
    assert.equal(o.enableAutoPipelining, true);
    assert.equal(o.failoverDetector, false, "ioredis' detector can end the client for good: redis-failover.ts watches instead");
    assert.equal(o.enableTLSForSentinelMode, false, "no TLS files: plain TCP to the sentinels and the master");
    const reconnect = o.reconnectOnError as (err: Error) => boolean | 1 | 2;
    assert.equal(reconnect(new Error("READONLY You can't write against a read only replica.")), 2, "a demoted master: reconnect via the sentinels");
    assert.equal(reconnect(new Error("ERR wrong number of arguments")), false);
    assert.equal(isCluster(d), false);
    const od: RedisOptions = d.options;
    assert.deepEqual(od.sentinels, o.sentinels, "the event feeds' duplicates ask the same sentinels");
    assert.equal(od.name, "microvpc");
    assert.equal(od.role, "master");
    assert.equal(od.sentinelPassword, "sp");
    assert.equal(od.reconnectOnError, o.reconnectOnError);
    assert.equal(od.password, "p");
    assert.equal(od.enableOfflineQueue, true, "the override");
    assert.equal(od.commandTimeout, undefined);
  } finally {
    r.disconnect();
    d.disconnect();
  }
  const tls = { ca: Buffer.from("ca") };
  const t = connectRedis({ url: "redis-sentinel://127.0.0.1:1/microvpc", tls });
  t.on("error", () => {});
  try {
    // Without enableTLSForSentinelMode ioredis would speak plain TCP to the master.
    assert.equal(t.options.enableTLSForSentinelMode, true);
    assert.deepEqual(t.options.tls, tls);
    assert.deepEqual(t.options.sentinelTLS, tls);
  } finally {
    t.disconnect();
  }
});
