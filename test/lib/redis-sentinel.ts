// A real Redis behind Sentinel (issue #18): a primary and its replicas
// (redis-server processes, --replicaof) and three sentinels (Debian's
// redis-server run as `redis-server <conf> --sentinel`), all on spare
// loopback ports, each in its own directory under one temporary directory.
// Tuned to fail over in seconds: down-after-milliseconds 1000, a small
// failover-timeout, and SENTINEL DEBUG's periods shortened (hello messages,
// INFO refreshes), so that the sentinels find each other, and a restarted old
// primary is made a replica, within a second or two instead of 10–20 s. No
// durability (no AOF, no RDB): these tests are about failing over. Ended by
// PID only (SIGTERM, then SIGKILL).
import { spawn, type ChildProcess } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Redis } from "ioredis";
import { commonArgs, endByPid, freePort, logTail, onNode } from "./redis.js";

export interface TestSentinelNode {
  port: number;
  dir: string;
  proc: ChildProcess;
}

export interface TestRedisSentinel {
  /** redis-sentinel://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/<masterName> */
  url: string;
  masterName: string;
  /** The data nodes: [0] started as the primary, the rest as its replicas. */
  nodes: TestSentinelNode[];
  sentinels: TestSentinelNode[];
  /** The master's port as the first sentinel that answers names it (SENTINEL get-master-addr-by-name). */
  masterPort(): Promise<number>;
  /** Polls until every sentinel names a master other than `oldPort`, and the same one; its port. */
  waitNewMaster(oldPort: number, timeoutMs: number): Promise<number>;
  /** One-off connection to a sentinel, with the sentinels' password if they have one: runs fn, then disconnects. */
  onSentinel<T>(port: number, fn: (c: Redis) => Promise<T>): Promise<T>;
  /**
   * Polls until every sentinel lists the data node on `port` as a replica
   * that reports itself one (role-reported slave). A sentinel that has not
   * seen it as a replica yet turns it back into one when a switchover
   * promotes it, which aborts the switchover.
   */
  waitReplicaSeen(port: number, timeoutMs: number): Promise<void>;
  /** ROLE of a data node: "master", "slave", ..., and for a replica the port of its master. */
  role(port: number): Promise<{ role: string; masterPort?: number }>;
  /** SIGKILL a data node (a crash); resolves once it has exited. */
  kill(port: number): Promise<void>;
  /** Start a data node again on its port, as it was first started (a primary comes back as a primary). */
  restart(port: number): Promise<void>;
  stop(): Promise<void>;
}

export interface RedisSentinelOptions {
  /** Replicas of the primary; default 1. */
  replicas?: number;
  /** The name the sentinels monitor the primary by; default "microvpc". */
  masterName?: string;
  /** sentinel down-after-milliseconds; default 1000. */
  downAfterMs?: number;
  /** sentinel failover-timeout; default 2000 (also bounds the leader election). */
  failoverTimeoutMs?: number;
  /** The sentinels' requirepass (and the password they give each other); default none. What this starter asks the sentinels is sent with it. */
  sentinelPassword?: string;
}

const READY_MS = 15_000;

/** One-off connection to one process (a data node or a sentinel): runs fn, then disconnects. */
export function onPort<T>(port: number, fn: (c: Redis) => Promise<T>): Promise<T> {
  return onNode(port, undefined, fn, 1000);
}

/** A sentinel's flat field list (SENTINEL MASTER, each of SENTINEL REPLICAS) as a map. */
function fields(flat: string[]): Map<string, string> {
  const m = new Map<string, string>();
  for (let i = 0; i + 1 < flat.length; i += 2) m.set(flat[i], flat[i + 1]);
  return m;
}

function infoField(info: string, field: string): string | undefined {
  return new RegExp(`^${field}:(\\S*)`, "m").exec(info)?.[1];
}

function launchDataNode(port: number, dir: string, primaryPort: number | undefined): ChildProcess {
  const args = [
    ...commonArgs(port, dir),
    "--appendonly",
    "no",
    // Replication and role changes show at notice (the last value of an option wins).
    "--loglevel",
    "notice",
    "--logfile",
    join(dir, "redis.log"),
    // A replica syncs at once (the default waits 5 s for more replicas).
    "--repl-diskless-sync-delay",
    "0",
    ...(primaryPort !== undefined ? ["--replicaof", "127.0.0.1", String(primaryPort)] : []),
  ];
  const p = spawn("redis-server", args, { stdio: ["ignore", "ignore", "inherit"] });
  // A spawn failure (no redis-server) is an 'error' event: without a listener it would end the test process.
  p.on("error", () => {});
  return p;
}

function launchSentinel(
  port: number,
  dir: string,
  name: string,
  primaryPort: number,
  o: Required<Omit<RedisSentinelOptions, "sentinelPassword">>,
  password: string | undefined,
): ChildProcess {
  // Sentinel rewrites its config file as it learns the topology: one per sentinel, in its directory.
  const conf = join(dir, "sentinel.conf");
  writeFileSync(
    conf,
    [
      `port ${port}`,
      "bind 127.0.0.1",
      `dir ${dir}`,
      "daemonize no",
      `logfile ${join(dir, "sentinel.log")}`,
      `sentinel monitor ${name} 127.0.0.1 ${primaryPort} 2`,
      `sentinel down-after-milliseconds ${name} ${o.downAfterMs}`,
      `sentinel failover-timeout ${name} ${o.failoverTimeoutMs}`,
      `sentinel parallel-syncs ${name} 1`,
      ...(password !== undefined ? [`requirepass ${password}`, `sentinel sentinel-pass ${password}`] : []),
      "",
    ].join("\n"),
  );
  const p = spawn("redis-server", [conf, "--sentinel"], { stdio: ["ignore", "ignore", "inherit"] });
  p.on("error", () => {});
  return p;
}

async function until<T>(what: string, timeoutMs: number, probe: () => Promise<T | undefined>, explain: () => string = () => ""): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last = "";
  for (;;) {
    try {
      const v = await probe();
      if (v !== undefined) return v;
    } catch (e) {
      last = (e as Error).message;
    }
    if (Date.now() > deadline) throw new Error(`${what} not within ${timeoutMs} ms${last ? ` (last error: ${last})` : ""}${explain()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export async function startRedisSentinel(opts: RedisSentinelOptions = {}): Promise<TestRedisSentinel> {
  const { sentinelPassword, ...rest } = opts;
  const o: Required<Omit<RedisSentinelOptions, "sentinelPassword">> = {
    replicas: 1,
    masterName: "microvpc",
    downAfterMs: 1000,
    failoverTimeoutMs: 2000,
    ...rest,
  };
  const onSentinel = <T>(port: number, fn: (c: Redis) => Promise<T>) => onNode(port, sentinelPassword, fn, 1000);
  const root = mkdtempSync(join(tmpdir(), "mvpc-rsentinel-"));
  const nodes: TestSentinelNode[] = [];
  const sentinels: TestSentinelNode[] = [];
  const primaryOf = new Map<number, number | undefined>();
  let stopped: Promise<void> | undefined;
  const node = (port: number) => {
    const n = nodes.find((x) => x.port === port);
    if (!n) throw new Error(`no data node on ${port}`);
    return n;
  };
  const masterOf = (s: TestSentinelNode) =>
    onSentinel(s.port, (c) => c.call("SENTINEL", "get-master-addr-by-name", o.masterName) as Promise<[string, string] | null>).then((a) =>
      a ? Number(a[1]) : undefined,
    );
  const set: TestRedisSentinel = {
    url: "",
    masterName: o.masterName,
    nodes,
    sentinels,
    onSentinel,
    async masterPort() {
      let last: unknown;
      for (const s of sentinels) {
        try {
          const p = await masterOf(s);
          if (p !== undefined) return p;
        } catch (e) {
          last = e;
        }
      }
      throw new Error(`no sentinel names the master: ${(last as Error)?.message ?? "none knows it"}`);
    },
    waitNewMaster(oldPort, timeoutMs) {
      return until(
        `the sentinels agreeing on a master other than ${oldPort}`,
        timeoutMs,
        async () => {
          const seen = await Promise.all(sentinels.map((s) => masterOf(s)));
          return seen.every((p) => p !== undefined && p !== oldPort && p === seen[0]) ? seen[0] : undefined;
        },
        () => `; sentinel logs:\n${sentinels.map((s) => logTail(s.dir, "sentinel.log")).join("\n--\n")}`,
      );
    },
    async waitReplicaSeen(port, timeoutMs) {
      const reported = (s: TestSentinelNode) =>
        onSentinel(s.port, (c) => c.call("SENTINEL", "REPLICAS", o.masterName) as Promise<string[][]>).then((replicas) =>
          replicas
            .map(fields)
            .find((r) => Number(r.get("port")) === port)
            ?.get("role-reported"),
        );
      await until(
        `every sentinel seeing ${port} as a replica`,
        timeoutMs,
        async () => ((await Promise.all(sentinels.map(reported))).every((r) => r === "slave") ? true : undefined),
        () => `; sentinel logs:\n${sentinels.map((s) => logTail(s.dir, "sentinel.log")).join("\n--\n")}`,
      );
    },
    role(port) {
      return onPort(port, async (c) => {
        const r = (await c.call("ROLE")) as unknown[];
        return { role: String(r[0]), ...(r[0] === "slave" ? { masterPort: Number(r[2]) } : {}) };
      });
    },
    async kill(port) {
      const p = node(port).proc;
      if (p.exitCode !== null || p.signalCode !== null) return;
      const exited = new Promise((res) => p.once("exit", res));
      p.kill("SIGKILL");
      await exited;
    },
    async restart(port) {
      await set.kill(port);
      const n = node(port);
      n.proc = launchDataNode(port, n.dir, primaryOf.get(port));
      await until(`redis on ${port} answering PING again`, READY_MS, () => onPort(port, (c) => c.ping()).then((r) => (r === "PONG" ? true : undefined)));
    },
    stop() {
      // Twice (or concurrently): the same ending.
      stopped ??= (async () => {
        await Promise.all([...sentinels, ...nodes].map((n) => endByPid(n.proc)));
        rmSync(root, { recursive: true, force: true });
      })();
      return stopped;
    },
  };
  try {
    for (let i = 0; i <= o.replicas; i++) {
      const port = await freePort();
      const dir = join(root, `redis-${port}`);
      mkdirSync(dir);
      const primary = i === 0 ? undefined : nodes[0].port;
      primaryOf.set(port, primary);
      nodes.push({ port, dir, proc: launchDataNode(port, dir, primary) });
    }
    // Every replica in sync before the sentinels start: their first INFO of the primary lists it.
    for (const n of nodes) {
      await until(
        `redis ${n.port} up${n === nodes[0] ? "" : " and in sync with its primary"}`,
        READY_MS,
        () =>
          onPort(n.port, (c) => c.info("replication")).then((info) =>
            infoField(info, "role") === "master" || infoField(info, "master_link_status") === "up" ? true : undefined,
          ),
        () => `; its log:\n${logTail(n.dir, "redis.log")}`,
      );
    }
    for (let i = 0; i < 3; i++) {
      const port = await freePort();
      const dir = join(root, `sentinel-${port}`);
      mkdirSync(dir);
      sentinels.push({ port, dir, proc: launchSentinel(port, dir, o.masterName, nodes[0].port, o, sentinelPassword) });
    }
    for (const s of sentinels) {
      await until(
        `sentinel ${s.port} up`,
        READY_MS,
        // Hello messages every 0.5 s instead of 2 (the sentinels find each other, and wait 4 periods before
        // turning a restarted old primary into a replica), INFO every 0.5 s instead of 10 (how soon they
        // see a node's role change), no 30 s TILT after a scheduling hiccup on a loaded machine.
        () => onSentinel(s.port, (c) => c.call("SENTINEL", "DEBUG", "info-period", "500", "publish-period", "500", "tilt-period", "1000")).then(() => true),
        () => `; its log:\n${logTail(s.dir, "sentinel.log")}`,
      );
    }
    // Every sentinel knows the other two and the replicas: a failover can be voted and has a replica to promote.
    for (const s of sentinels) {
      await until(
        `sentinel ${s.port} seeing the other sentinels and the replicas`,
        READY_MS,
        () =>
          onSentinel(s.port, (c) => c.call("SENTINEL", "MASTER", o.masterName) as Promise<string[]>).then((flat) => {
            const m = fields(flat);
            return Number(m.get("num-other-sentinels")) === 2 && Number(m.get("num-slaves")) === o.replicas ? true : undefined;
          }),
        () => `; its log:\n${logTail(s.dir, "sentinel.log")}`,
      );
    }
    set.url = `redis-sentinel://${sentinels.map((s) => `127.0.0.1:${s.port}`).join(",")}/${o.masterName}`;
    return set;
  } catch (e) {
    await set.stop();
    throw e;
  }
}
