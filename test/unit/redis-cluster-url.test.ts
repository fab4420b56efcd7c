// --redis redis-cluster://host:port,... (issue #18): the seeds are parsed
// strictly, with messages that say what to change; credentials are refused in
// the URL; connectRedis builds an ioredis Cluster with the fail-fast options,
// and duplicateClient carries overrides to the right level. No server here:
// test/integration/redis-cluster.test.ts runs against a real cluster.
import assert from "node:assert/strict";
import type { Cluster } from "ioredis";
import { test } from "vitest";
import { checkRedisUser } from "../../services/common/daemon.js";
import {
  connectRedis,
  duplicateClient,
  isCluster,
  isClusterUrl,
  MAX_CLUSTER_SEEDS,
  parseClusterUrl,
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
    ["redis-cluster://", /names no node/],
    ["redis-cluster:///", /names no node/],
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
  for (const url of ["redis-cluster://:hunter2@h:6379", "redis-cluster://alice:hunter2@h:6379,g:6379", "redis-cluster://alice@h:6379"]) {
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
