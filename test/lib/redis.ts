// A real redis-server for tests and benchmarks, on a spare loopback port,
// with the durability microvpc promises (AOF, appendfsync always), in its own
// temporary directory. Ended by PID only. startRedisCluster (below): a real
// Redis Cluster of such processes.
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { Redis, type Cluster } from "ioredis";
import { connectRedis, waitReady, type RedisOptions as ClientOptions } from "../../services/common/redis.js";

const pexecFile = promisify(execFile);

// Ports are handed out below the kernel's ephemeral range. A port from
// listen(0) is itself ephemeral: between our close() and the daemon's bind(),
// any outgoing connection on the machine (a Redis client, a gRPC dial) may be
// given the same port, and the daemon dies with EADDRINUSE. Below the range
// only explicit binds compete, and a port is never handed out twice by this
// process.
const given = new Set<number>();

function ephemeralLow(): number {
  try {
    const low = Number(readFileSync("/proc/sys/net/ipv4/ip_local_port_range", "utf8").trim().split(/\s+/)[0]);
    return Number.isInteger(low) ? low : 32768;
  } catch {
    return 32768;
  }
}

function tryBind(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createServer();
    s.unref();
    s.once("error", () => resolve(false));
    s.listen(port, "127.0.0.1", () => s.close(() => resolve(true)));
  });
}

export async function freePort(): Promise<number> {
  const low = ephemeralLow();
  const first = 20000;
  if (low - first >= 1000) {
    for (let i = 0; i < 200; i++) {
      const port = first + Math.floor(Math.random() * (low - first));
      if (given.has(port)) continue;
      if (await tryBind(port)) {
        given.add(port);
        return port;
      }
    }
  }
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.unref();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      given.add(port);
      s.close(() => resolve(port));
    });
  });
}

export interface TestRedis {
  port: number;
  url: string;
  /** Path of the unix socket (reachable from any network namespace). */
  socket: string;
  dir: string;
  proc: ChildProcess;
  /** SIGKILL the server (a crash), keeping its data directory. */
  kill(): Promise<void>;
  /** Start it again on the same port from the same AOF. */
  restart(): Promise<void>;
  stop(): Promise<void>;
}

export interface RedisOptions {
  appendfsync?: "always" | "everysec" | "no";
  persistence?: boolean;
  /** Require AUTH with this password (--requirepass; on redis-server's own argv, which is the test's, not microvpc's). */
  password?: string;
}

async function waitPing(port: number, timeoutMs = 10_000, password?: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const c = new Redis({ port, host: "127.0.0.1", password, lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
    c.on("error", () => {});
    try {
      await c.connect();
      if ((await c.ping()) === "PONG") {
        c.disconnect();
        return;
      }
    } catch {
      // not up yet (or still loading the AOF)
    }
    c.disconnect();
    if (Date.now() > deadline) throw new Error(`redis on ${port} did not answer within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** What every test redis-server gets: its port on loopback, its directory, no RDB snapshots, in the foreground. */
export function commonArgs(port: number, dir: string): string[] {
  return ["--port", String(port), "--bind", "127.0.0.1", "--dir", dir, "--save", "", "--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning"];
}

function launch(port: number, dir: string, o: RedisOptions): ChildProcess {
  const persist = o.persistence ?? true;
  const args = [
    ...commonArgs(port, dir),
    "--appendonly",
    persist ? "yes" : "no",
    "--appendfsync",
    o.appendfsync ?? "always",
    // Also a unix socket: processes inside test namespaces cannot reach 127.0.0.1 of the root namespace.
    "--unixsocket",
    join(dir, "redis.sock"),
    "--unixsocketperm",
    "700",
    ...(o.password ? ["--requirepass", o.password] : []),
  ];
  const p = spawn("redis-server", args, { stdio: ["ignore", "ignore", "inherit"] });
  return p;
}

export async function startRedis(o: RedisOptions = {}): Promise<TestRedis> {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), "mvpc-redis-"));
  const r: TestRedis = {
    port,
    url: `redis://127.0.0.1:${port}/0`,
    socket: join(dir, "redis.sock"),
    dir,
    proc: launch(port, dir, o),
    async kill() {
      const p = r.proc;
      if (p.exitCode !== null || p.signalCode !== null) return;
      const exited = new Promise((res) => p.once("exit", res));
      p.kill("SIGKILL");
      await exited;
    },
    async restart() {
      await r.kill();
      r.proc = launch(port, dir, o);
      await waitPing(port, undefined, o.password);
    },
    async stop() {
      await r.kill();
      rmSync(dir, { recursive: true, force: true });
    },
  };
  await waitPing(port, undefined, o.password);
  return r;
}

// ---------------------------------------------------------------------------
// A real Redis Cluster (issue #18): redis-server processes in cluster mode on
// spare loopback ports, joined by `redis-cli --cluster create`, each node in
// its own directory under one temporary directory. No durability (no AOF, no
// RDB): the cluster tests are about slots, not crashes. Ended by PID only.

export interface TestRedisClusterNode {
  port: number;
  /** The cluster bus port (--cluster-port), from freePort too: port+10000 may fall in the ephemeral range. */
  busPort: number;
  proc: ChildProcess;
  dir: string;
  /** Its unix socket, reachable from any network namespace (Harness forwards the port to it inside a hypervisor's namespace). */
  socket: string;
}

export interface TestRedisCluster {
  /** "redis-cluster://127.0.0.1:p1,127.0.0.1:p2,..." with every primary as a seed. */
  url: string;
  nodes: TestRedisClusterNode[];
  /** Ports of the nodes that are primaries now (CLUSTER NODES of a node that answers), sorted. */
  primaries(): Promise<number[]>;
  /** Ends every process started here (SIGTERM, then SIGKILL), removes the directories. Safe to call twice. */
  stop(): Promise<void>;
}

export interface RedisClusterOptions {
  /** Primaries (at least 3, as redis-cli --cluster create wants); default 3. */
  primaries?: number;
  /** Replicas of each primary; default 1. */
  replicasPerPrimary?: number;
  /** Require AUTH with this password (--requirepass and --masterauth on every node). */
  password?: string;
}

/** How long a cluster may take to agree (every node: cluster_state:ok, all slots assigned, every node known). */
const CLUSTER_READY_MS = 20_000;
/** How long a node may take to exit after SIGTERM before SIGKILL. */
const CLUSTER_STOP_GRACE_MS = 5_000;

function launchClusterNode(port: number, busPort: number, dir: string, password: string | undefined): ChildProcess {
  const args = [
    ...commonArgs(port, dir),
    "--cluster-enabled",
    "yes",
    "--cluster-config-file",
    join(dir, "nodes.conf"),
    "--cluster-node-timeout",
    "2000",
    "--cluster-port",
    String(busPort),
    "--appendonly",
    "no",
    // As the single redis-server's: 127.0.0.1 of the root namespace is out of reach from a test namespace.
    "--unixsocket",
    join(dir, "redis.sock"),
    "--unixsocketperm",
    "700",
    // A replica syncs at once (the default waits 5 s for more replicas), and
    // one that never synced refuses to fail over: tests that kill a primary
    // need the replicas in sync first (startRedisCluster waits for it).
    "--repl-diskless-sync-delay",
    "0",
    "--enable-debug-command",
    "no",
    // In the node's directory, so that a failed start can show it.
    "--logfile",
    join(dir, "redis.log"),
    ...(password ? ["--requirepass", password, "--masterauth", password] : []),
  ];
  const p = spawn("redis-server", args, { stdio: ["ignore", "ignore", "inherit"] });
  // A spawn failure (no redis-server) is an 'error' event: without a listener it would end the test process.
  p.on("error", () => {});
  return p;
}

/** The last lines of a node's log in its directory, for an error message. */
export function logTail(dir: string, file = "redis.log"): string {
  try {
    return readFileSync(join(dir, file), "utf8").split("\n").slice(-15).join("\n");
  } catch {
    return "(no log)";
  }
}

/** Ends a redis-server this process started, by its PID: SIGTERM, then SIGKILL past the grace. */
export async function endByPid(p: ChildProcess): Promise<void> {
  if (p.pid === undefined || p.exitCode !== null || p.signalCode !== null) return;
  const exited = new Promise((res) => p.once("exit", res));
  p.kill("SIGTERM");
  const t = setTimeout(() => p.kill("SIGKILL"), CLUSTER_STOP_GRACE_MS);
  await exited;
  clearTimeout(t);
}

/** One-off connection to one node on loopback (not a cluster client): runs fn, then disconnects. */
export async function onNode<T>(port: number, password: string | undefined, fn: (c: Redis) => Promise<T>, commandTimeout?: number): Promise<T> {
  const c = new Redis({
    port,
    host: "127.0.0.1",
    password,
    lazyConnect: true,
    maxRetriesPerRequest: 0,
    retryStrategy: () => null,
    connectTimeout: 1000,
    ...(commandTimeout ? { commandTimeout } : {}),
  });
  c.on("error", () => {});
  try {
    await c.connect();
    return await fn(c);
  } finally {
    c.disconnect();
  }
}

/** CLUSTER NODES: "<id> <ip:port@cport[,hostname]> <flags> <primary id|-> <ping> <pong> <epoch> <link> [slot ...]" per line. */
function parseClusterNodes(text: string): { port: number; flags: string[]; link: string; slots: boolean }[] {
  return text
    .split("\n")
    .filter((l) => l.trim())
    .map((l) => {
      const f = l.trim().split(" ");
      return { port: Number(/:(\d+)@/.exec(f[1])?.[1]), flags: f[2].split(","), link: f[7], slots: f.length > 8 };
    });
}

function infoField(info: string, field: string): string | undefined {
  return new RegExp(`^${field}:(\\S*)`, "m").exec(info)?.[1];
}

export async function startRedisCluster(o: RedisClusterOptions = {}): Promise<TestRedisCluster> {
  const nPrimaries = o.primaries ?? 3;
  const replicas = o.replicasPerPrimary ?? 1;
  if (!Number.isInteger(nPrimaries) || nPrimaries < 3)
    throw new Error(`startRedisCluster: primaries ${nPrimaries}: redis-cli --cluster create needs at least 3`);
  if (!Number.isInteger(replicas) || replicas < 0) throw new Error(`startRedisCluster: replicasPerPrimary ${replicas}: use 0 or more`);
  const total = nPrimaries * (1 + replicas);
  const root = mkdtempSync(join(tmpdir(), "mvpc-rcluster-"));
  const nodes: TestRedisClusterNode[] = [];
  let stopped: Promise<void> | undefined;
  const cluster: TestRedisCluster = {
    url: "",
    nodes,
    async primaries() {
      let last: unknown;
      for (const n of nodes) {
        try {
          const view = parseClusterNodes(await onNode(n.port, o.password, (c) => c.call("CLUSTER", "NODES") as Promise<string>));
          return view
            .filter((v) => v.flags.includes("master") && !v.flags.includes("fail") && v.slots)
            .map((v) => v.port)
            .sort((a, b) => a - b);
        } catch (e) {
          last = e;
        }
      }
      throw new Error(`no cluster node answers CLUSTER NODES: ${(last as Error)?.message}`);
    },
    stop() {
      // Twice (or concurrently): the same ending.
      stopped ??= (async () => {
        await Promise.all(nodes.map((n) => endByPid(n.proc)));
        rmSync(root, { recursive: true, force: true });
      })();
      return stopped;
    },
  };
  try {
    for (let i = 0; i < total; i++) {
      const port = await freePort();
      const busPort = await freePort();
      const dir = join(root, `node-${port}`);
      mkdirSync(dir);
      nodes.push({ port, busPort, dir, socket: join(dir, "redis.sock"), proc: launchClusterNode(port, busPort, dir, o.password) });
    }
    await Promise.all(
      nodes.map((n) =>
        waitPing(n.port, undefined, o.password).catch((e: Error) => {
          throw new Error(`${e.message}; its log:\n${logTail(n.dir)}`, { cause: e });
        }),
      ),
    );
    // redis-cli picks nPrimaries of them as primaries and makes the rest their replicas.
    const addrs = nodes.map((n) => `127.0.0.1:${n.port}`);
    try {
      await pexecFile("redis-cli", ["--cluster", "create", ...addrs, "--cluster-replicas", String(replicas), "--cluster-yes"], {
        timeout: 30_000,
        // The password in the environment, not on redis-cli's argv (ps shows argv).
        env: { ...process.env, ...(o.password ? { REDISCLI_AUTH: o.password } : {}) },
      });
    } catch (e) {
      const x = e as Error & { stdout?: string; stderr?: string };
      throw new Error(`redis-cli --cluster create failed: ${x.message}\n${x.stdout ?? ""}${x.stderr ?? ""}`, { cause: e });
    }
    const deadline = Date.now() + CLUSTER_READY_MS;
    for (const n of nodes) {
      for (;;) {
        let state = "";
        try {
          const [info, text] = await onNode(n.port, o.password, (c) =>
            Promise.all([c.call("CLUSTER", "INFO") as Promise<string>, c.call("CLUSTER", "NODES") as Promise<string>]),
          );
          const ok = infoField(info, "cluster_state") === "ok";
          const slots = Number(infoField(info, "cluster_slots_assigned"));
          // Right after create, a replica-to-be is still a primary without slots in the others' view: wait until the roles have spread too.
          const view = parseClusterNodes(text);
          const up = view.filter((v) => v.link === "connected" && !v.flags.some((f) => f === "fail" || f === "fail?" || f === "handshake" || f === "noaddr"));
          const prim = up.filter((v) => v.flags.includes("master") && v.slots).length;
          const repl = up.filter((v) => v.flags.includes("slave")).length;
          if (ok && slots === 16384 && view.length === total && prim === nPrimaries && repl === total - nPrimaries) break;
          state = `cluster_state:${infoField(info, "cluster_state")} cluster_slots_assigned:${slots}; sees ${view.length}/${total} nodes, ${prim}/${nPrimaries} primaries with slots, ${repl}/${total - nPrimaries} replicas`;
        } catch (e) {
          state = (e as Error).message;
        }
        if (Date.now() > deadline)
          throw new Error(`redis cluster node ${n.port} not ready within ${CLUSTER_READY_MS} ms (${state}); its log:\n${logTail(n.dir)}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    // Every replica in sync with its primary (master_link_status:up), so that a failover can happen.
    for (const n of nodes) {
      for (;;) {
        const repl = await onNode(n.port, o.password, (c) => c.call("INFO", "replication") as Promise<string>).catch((e: Error) => e.message);
        if (infoField(repl, "role") === "master" || infoField(repl, "master_link_status") === "up") break;
        if (Date.now() > deadline) throw new Error(`redis cluster replica ${n.port} not in sync within ${CLUSTER_READY_MS} ms; its log:\n${logTail(n.dir)}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    cluster.url = `redis-cluster://${(await cluster.primaries()).map((p) => `127.0.0.1:${p}`).join(",")}`;
    return cluster;
  } catch (e) {
    await cluster.stop();
    throw e;
  }
}

/** Every key matching `pattern`: KEYS on each primary of a cluster (a cluster client sends KEYS to one node), or on the one Redis. */
export async function keysLike(r: Redis, pattern: string): Promise<string[]> {
  return (await Promise.all(primaryNodes(r).map((n) => n.keys(pattern)))).flat().sort();
}

/** The primaries of a cluster client (what holds the keys), or the one Redis. */
export function primaryNodes(r: Redis): Redis[] {
  return r.isCluster ? (r as unknown as Cluster).nodes("master") : [r];
}

/**
 * microvpc's client (connectRedis: a redis:// or a redis-cluster:// URL),
 * once it is ready; 5 s per command unless told. The caller disconnects it.
 */
export function connectReady(o: ClientOptions): Promise<Redis> {
  return whenReady(connectRedis({ commandTimeoutMs: 5000, ...o }));
}

/** The client once it is ready (waitReady); disconnected if it does not become so. */
export async function whenReady(c: Redis): Promise<Redis> {
  try {
    await waitReady(c);
  } catch (e) {
    c.disconnect();
    throw e;
  }
  return c;
}

/** The Redis of a test file that starts its own daemons (startDaemonsRedis): what they take is its URL. */
export interface DaemonsRedis {
  /** redis://… of the redis-server, or redis-cluster://… of the cluster (every daemon takes either). */
  url: string;
  /** The redis-server (undefined on a cluster). */
  server?: TestRedis;
  /** The cluster (with MICROVPC_TEST_ON_CLUSTER=1). */
  cluster?: TestRedisCluster;
  /** Its processes (to track: trackChild). */
  procs: ChildProcess[];
  stop(): Promise<void>;
}

/**
 * For a test file that starts daemons on a Redis of its own (not through the
 * Harness): one redis-server, or with MICROVPC_TEST_ON_CLUSTER=1 a 3+3 Redis
 * Cluster, as the Harness does (test/lib/on-cluster.ts). `o` is the
 * redis-server's (a cluster keeps no data on disk).
 */
export async function startDaemonsRedis(o: RedisOptions = {}): Promise<DaemonsRedis> {
  if (process.env.MICROVPC_TEST_ON_CLUSTER === "1") {
    const cluster = await startRedisCluster({ password: o.password });
    return { url: cluster.url, cluster, procs: cluster.nodes.map((n) => n.proc), stop: () => cluster.stop() };
  }
  const server = await startRedis(o);
  return { url: server.url, server, procs: [server.proc], stop: () => server.stop() };
}
