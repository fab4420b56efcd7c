// Following a Sentinel failover (services/common/redis-failover.ts): which
// announcements count, what a client does with one in each state, and that
// the watch ends with its client. The real thing, against real sentinels, is
// test/integration/redis-sentinel.test.ts.
import assert from "node:assert/strict";
import { createServer, type Socket } from "node:net";
import { Redis } from "ioredis";
import { test } from "vitest";
import { addressesOf, parseSwitchMaster, sentinelsWatched, switchAction, watchFailover } from "../../services/common/redis-failover.js";
import { connectRedis } from "../../services/common/redis.js";

test("+switch-master names the master and where it is now; anything else is no announcement", () => {
  assert.deepEqual(parseSwitchMaster("microvpc 10.0.0.1 6379 10.0.0.2 6380"), { name: "microvpc", to: "10.0.0.2:6380" });
  assert.deepEqual(parseSwitchMaster("other 127.0.0.1 7000 127.0.0.1 7001"), { name: "other", to: "127.0.0.1:7001" });
  for (const m of ["", "microvpc", "microvpc 10.0.0.1 6379 10.0.0.2", "microvpc 10.0.0.1 6379 10.0.0.2 port", "microvpc 10.0.0.1 6379 10.0.0.2 6380 extra"])
    assert.equal(parseSwitchMaster(m), undefined, JSON.stringify(m));
});

test("a connected client leaves a master that is no longer the announced one, and stays on the announced one", () => {
  for (const status of ["ready", "connect"]) {
    assert.equal(switchAction(status, "10.0.0.1:6379", ["10.0.0.2:6380"]), "reconnect", status);
    assert.equal(switchAction(status, "10.0.0.2:6380", ["10.0.0.2:6380"]), "stay", status);
    // A name that resolves to several addresses: on any of them is on it.
    assert.equal(switchAction(status, "10.0.0.3:6380", ["10.0.0.2:6380", "10.0.0.3:6380"]), "stay", status);
    // Same host, another port: another node.
    assert.equal(switchAction(status, "10.0.0.2:6379", ["10.0.0.2:6380"]), "reconnect", status);
    // No socket to compare: ask the sentinels again.
    assert.equal(switchAction(status, undefined, ["10.0.0.2:6380"]), "reconnect", status);
  }
});

test("a client between connections is never disconnected (ioredis would end it for good): where it lands is checked instead", () => {
  for (const status of ["connecting", "reconnecting", "close"]) {
    assert.equal(switchAction(status, undefined, ["10.0.0.2:6380"]), "recheck", status);
    assert.equal(switchAction(status, "10.0.0.1:6379", ["10.0.0.2:6380"]), "recheck", status);
  }
  // Ended (shut down) or not started: nothing to move.
  for (const status of ["end", "wait"]) assert.equal(switchAction(status, undefined, ["10.0.0.2:6380"]), "stay", status);
});

test("an announced host name is compared by the addresses it resolves to (sentinels with announce-hostnames)", async () => {
  assert.deepEqual(await addressesOf("10.0.0.2:6380"), ["10.0.0.2:6380"]);
  assert.deepEqual(await addressesOf("::1:6380"), ["::1:6380"]);
  assert.ok((await addressesOf("localhost:6380")).some((a) => a === "127.0.0.1:6380" || a === "::1:6380"));
  // Not resolvable: itself, which no socket matches (the client asks the sentinels again).
  assert.deepEqual(await addressesOf("no-such-host.invalid:6380"), ["no-such-host.invalid:6380"]);
});

/** RESP requests in `buf` (arrays of bulk strings), and what is left of it. */
function requests(buf: string): { cmds: string[][]; rest: string } {
  const cmds: string[][] = [];
  let i = 0;
  for (;;) {
    const m = /^\*(\d+)\r\n/.exec(buf.slice(i));
    if (!m) break;
    let j = i + m[0].length;
    const args: string[] = [];
    for (let k = 0; k < Number(m[1]); k++) {
      const b = /^\$(\d+)\r\n/.exec(buf.slice(j));
      if (!b || buf.length < j + b[0].length + Number(b[1]) + 2) return { cmds, rest: buf.slice(i) };
      args.push(buf.substr(j + b[0].length, Number(b[1])));
      j += b[0].length + Number(b[1]) + 2;
    }
    cmds.push(args);
    i = j;
  }
  return { cmds, rest: buf.slice(i) };
}

const bulk = (s: string) => `$${Buffer.byteLength(s)}\r\n${s}\r\n`;

/**
 * A "sentinel" on a loopback port that names `masterPort` as the master,
 * answers INFO, SUBSCRIBE and (while `answerPing`) PING, and keeps its open
 * connections in `open`.
 */
async function fakeSentinel(masterPort: number) {
  const open = new Set<Socket>();
  const state = { answerPing: true, subscribes: 0 };
  const server = createServer((sock) => {
    open.add(sock);
    sock.on("close", () => open.delete(sock));
    sock.on("error", () => {});
    let buf = "";
    sock.on("data", (d) => {
      const r = requests(buf + d.toString("latin1"));
      buf = r.rest;
      for (const [cmd, ...args] of r.cmds) {
        const c = cmd.toLowerCase();
        if (c === "sentinel" && args[0] === "get-master-addr-by-name") sock.write(`*2\r\n${bulk("127.0.0.1")}${bulk(String(masterPort))}`);
        else if (c === "sentinel") sock.write("*0\r\n");
        else if (c === "info") sock.write(bulk("# Server\r\nloading:0\r\n"));
        else if (c === "subscribe") {
          state.subscribes++;
          sock.write(`*3\r\n${bulk("subscribe")}${bulk(args[0])}:1\r\n`);
        } else if (c === "ping") {
          if (state.answerPing) sock.write(`*2\r\n${bulk("pong")}${bulk("")}`);
        } else sock.write("+OK\r\n");
      }
    });
  });
  await new Promise<void>((res) => server.listen(0, "127.0.0.1", res));
  return {
    port: (server.address() as { port: number }).port,
    open,
    state,
    async close() {
      for (const s of open) s.destroy();
      await new Promise((res) => server.close(res));
    },
  };
}

/** A loopback port nothing listens on (a master that is down). */
async function closedPort(): Promise<number> {
  const gone = createServer();
  await new Promise<void>((res) => gone.listen(0, "127.0.0.1", res));
  const port = (gone.address() as { port: number }).port;
  await new Promise((res) => gone.close(res));
  return port;
}

async function until(what: () => string | undefined, timeoutMs: number): Promise<void> {
  const since = Date.now();
  for (let why = what(); why !== undefined; why = what()) {
    assert.ok(Date.now() - since < timeoutMs, why);
    await new Promise((res) => setTimeout(res, 5));
  }
}

test("the failover watch ends with its client, also one disconnected while it waits to reconnect to the master", async () => {
  // A master that refuses connections: the client keeps reconnecting, waiting between attempts, while its watch stays subscribed.
  const sentinel = await fakeSentinel(await closedPort());
  try {
    const r = connectRedis({ url: `redis-sentinel://127.0.0.1:${sentinel.port}/microvpc` });
    r.on("error", () => {});
    await until(
      () => (r.status === "reconnecting" && sentinelsWatched(r) === 1 ? undefined : `status ${r.status}, ${sentinelsWatched(r)} sentinel(s) watched`),
      5000,
    );
    r.disconnect();
    assert.equal(sentinelsWatched(r), 0);
    await until(
      () => (sentinel.open.size === 0 ? undefined : `${sentinel.open.size} connection(s) to the sentinel still open after the client was disconnected`),
      3000,
    );
  } finally {
    await sentinel.close();
  }
});

test("a sentinel that stops answering is no longer counted as watched, and is connected to and subscribed to again", async () => {
  const sentinel = await fakeSentinel(await closedPort());
  const client = new Redis({ lazyConnect: true });
  const stop = watchFailover(client, { sentinels: [{ host: "127.0.0.1", port: sentinel.port }], name: "microvpc", retryStrategy: () => 50, pingMs: 200 });
  try {
    await until(() => (sentinelsWatched(client) === 1 ? undefined : "never subscribed"), 3000);
    // A link that died silently: the connection stays open, nothing answers.
    sentinel.state.answerPing = false;
    await until(() => (sentinelsWatched(client) === 0 ? undefined : "still counted as watched with its PINGs unanswered"), 3000);
    const before = sentinel.state.subscribes;
    sentinel.state.answerPing = true;
    await until(() => (sentinelsWatched(client) === 1 && sentinel.state.subscribes > before ? undefined : "not subscribed again"), 3000);
  } finally {
    stop();
    client.disconnect();
    await sentinel.close();
  }
});

test("a client not behind Sentinel has no failover watch", () => {
  const r = connectRedis({ url: "redis://127.0.0.1:1" });
  r.on("error", () => {});
  try {
    assert.equal(sentinelsWatched(r), undefined);
  } finally {
    r.disconnect();
  }
});
