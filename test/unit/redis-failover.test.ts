// Following a Sentinel failover (services/common/redis-failover.ts): which
// announcements count, what a client does with one in each state, and that
// the watch ends with its client. The real thing, against real sentinels, is
// test/integration/redis-sentinel.test.ts.
import assert from "node:assert/strict";
import { createServer, type Socket } from "node:net";
import { test } from "vitest";
import { addressesOf, parseSwitchMaster, sentinelsWatched, switchAction } from "../../services/common/redis-failover.js";
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

test("the failover watch ends with its client, also one disconnected while it waits to reconnect to the master", async () => {
  // A master that refuses connections (a port just closed), and a "sentinel" that names it: the client
  // keeps reconnecting, waiting between attempts, while its watch stays subscribed to the sentinel.
  const gone = createServer();
  await new Promise<void>((res) => gone.listen(0, "127.0.0.1", res));
  const masterPort = (gone.address() as { port: number }).port;
  await new Promise((res) => gone.close(res));
  const open = new Set<Socket>();
  const sentinel = createServer((sock) => {
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
        else if (c === "subscribe") sock.write(`*3\r\n${bulk("subscribe")}${bulk(args[0])}:1\r\n`);
        else sock.write("+OK\r\n");
      }
    });
  });
  await new Promise<void>((res) => sentinel.listen(0, "127.0.0.1", res));
  const { port } = sentinel.address() as { port: number };
  try {
    const r = connectRedis({ url: `redis-sentinel://127.0.0.1:${port}/microvpc` });
    r.on("error", () => {});
    const since = Date.now();
    // Waiting to reconnect (its last attempt refused), the watch subscribed.
    while (r.status !== "reconnecting" || sentinelsWatched(r) !== 1) {
      assert.ok(Date.now() - since < 5000, `status ${r.status}, ${open.size} connection(s) to the sentinel, ${sentinelsWatched(r)} watched`);
      await new Promise((res) => setTimeout(res, 5));
    }
    r.disconnect();
    assert.equal(sentinelsWatched(r), 0);
    const closed = Date.now();
    while (open.size > 0) {
      assert.ok(Date.now() - closed < 3000, `${open.size} connection(s) to the sentinel still open after the client was disconnected`);
      await new Promise((res) => setTimeout(res, 20));
    }
  } finally {
    for (const s of open) s.destroy();
    await new Promise((res) => sentinel.close(res));
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
