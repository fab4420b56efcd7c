// A real redis-server for tests and benchmarks, on a spare loopback port,
// with the durability microvpc promises (AOF, appendfsync always), in its own
// temporary directory. Ended by PID only.
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Redis } from "ioredis";

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

function launch(port: number, dir: string, o: RedisOptions): ChildProcess {
  const persist = o.persistence ?? true;
  const args = [
    "--port",
    String(port),
    "--bind",
    "127.0.0.1",
    "--dir",
    dir,
    "--save",
    "",
    "--appendonly",
    persist ? "yes" : "no",
    "--appendfsync",
    o.appendfsync ?? "always",
    "--daemonize",
    "no",
    "--protected-mode",
    "yes",
    "--loglevel",
    "warning",
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
