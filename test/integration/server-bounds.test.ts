// Bounds every daemon's gRPC server puts on one client (services/common/
// server.ts, health.ts), against a real `microvpcd ipam` and redis-server:
// HTTP/2 stream limits, a health Watch that costs Redis the same however
// many watch, and the request id every call carries.
import assert from "node:assert/strict";
import { connect, type Socket } from "node:net";
import { Code, ConnectError } from "@connectrpc/connect";
import { Redis } from "ioredis";
import { afterAll, beforeAll, test } from "vitest";
import { Health, HealthCheckResponse_ServingStatus as Status } from "../../gen/grpc/health/v1/health_pb.js";
import { grpcClient, grpcTransport } from "../../services/common/client.js";
import { HTTP2_LIMITS } from "../../services/common/server.js";
import { startDaemon, type Daemon } from "../lib/daemon.js";
import { startRedis, type TestRedis } from "../lib/redis.js";

let redis: TestRedis;
let daemon: Daemon;
let r: Redis;

beforeAll(async () => {
  redis = await startRedis({ appendfsync: "no" });
  daemon = await startDaemon("ipam", ["--redis", redis.url, "--redis-timeout-ms", "500"]);
  r = new Redis(redis.url, { maxRetriesPerRequest: 0, retryStrategy: () => 200 });
  r.on("error", () => {});
});

afterAll(async () => {
  r?.disconnect();
  await daemon?.stop();
  await redis?.stop();
});

const sleep = (ms: number) => new Promise((res) => setTimeout(res, ms));

async function pings(): Promise<number> {
  const m = /cmdstat_ping:calls=(\d+)/.exec(await r.info("commandstats"));
  return m ? Number(m[1]) : 0;
}

/** Opens n Watch streams on one connection; returns their latest statuses and a closer. */
function watchers(n: number) {
  const ac = new AbortController();
  const health = grpcClient(Health, grpcTransport({ address: daemon.address, timeoutMs: 0 }));
  const latest: (Status | undefined)[] = new Array(n).fill(undefined);
  const done = Array.from({ length: n }, async (_, i) => {
    try {
      for await (const m of health.watch({}, { signal: ac.signal, timeoutMs: 60_000 })) latest[i] = m.status;
    } catch {
      // aborted at the end
    }
  });
  return {
    latest,
    async close() {
      ac.abort();
      await Promise.all(done);
    },
  };
}

async function until(what: string, ok: () => boolean, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

test("Health.Watch: N concurrent streams cost Redis the same PINGs as one, and all see a change", async () => {
  const windowMs = 3000;
  const rate = async (n: number) => {
    const w = watchers(n);
    await until(`${n} watchers to see SERVING`, () => w.latest.every((s) => s === Status.SERVING));
    const p0 = await pings();
    await sleep(windowMs);
    const p = (await pings()) - p0;
    return { w, p };
  };
  const one = await rate(1);
  await one.w.close();
  const many = await rate(200);
  try {
    // One periodic check (1 s) whatever the number of watchers: ~3 in 3 s.
    assert.ok(one.p <= windowMs / 1000 + 2, `1 watcher: ${one.p} PINGs in ${windowMs} ms`);
    assert.ok(many.p <= one.p + 2, `200 watchers: ${many.p} PINGs in ${windowMs} ms, 1 watcher: ${one.p}`);
    // The shared status still reaches every stream: Redis down → NOT_SERVING, back → SERVING.
    await redis.kill();
    await until("every watcher to see NOT_SERVING", () => many.w.latest.every((s) => s === Status.NOT_SERVING));
    await redis.restart();
    await until("every watcher to see SERVING again", () => many.w.latest.every((s) => s === Status.SERVING));
  } finally {
    await many.w.close();
  }
  // Check calls share the cached answer too: 100 at once, at most a couple of PINGs.
  const health = grpcClient(Health, { address: daemon.address });
  const p0 = await pings();
  const got = await Promise.all(Array.from({ length: 100 }, () => health.check({})));
  assert.ok(got.every((g) => g.status === Status.SERVING));
  assert.ok((await pings()) - p0 <= 2, "100 concurrent Checks share one probe");
});

// A minimal HTTP/2 client that ignores the server's SETTINGS_MAX_CONCURRENT_STREAMS,
// as a hostile one would: literal HPACK headers, frames counted by type.
function frame(type: number, flags: number, stream: number, payload: Buffer): Buffer {
  const h = Buffer.alloc(9);
  h.writeUIntBE(payload.length, 0, 3);
  h[3] = type;
  h[4] = flags;
  h.writeUInt32BE(stream, 5);
  return Buffer.concat([h, payload]);
}

function hpackLiteral(headers: [string, string][]): Buffer {
  const parts: Buffer[] = [];
  for (const [k, v] of headers) {
    assert.ok(k.length < 127 && v.length < 127);
    parts.push(Buffer.from([0x00, k.length]), Buffer.from(k), Buffer.from([v.length]), Buffer.from(v));
  }
  return Buffer.concat(parts);
}

test("HTTP/2: a client opening more streams than allowed gets them refused; a call on another connection still works", async () => {
  const max = HTTP2_LIMITS.maxConcurrentStreams;
  const extra = 20;
  const sock: Socket = connect(daemon.port, "127.0.0.1");
  await new Promise<void>((res, rej) => sock.once("connect", res).once("error", rej));
  const seen = { rst: new Map<number, number>(), headers: new Set<number>(), goaway: -1, maxStreams: -1 };
  let buf = Buffer.alloc(0);
  sock.on("data", (d: Buffer) => {
    buf = Buffer.concat([buf, d]);
    while (buf.length >= 9) {
      const len = buf.readUIntBE(0, 3);
      if (buf.length < 9 + len) break;
      const type = buf[3];
      const flags = buf[4];
      const id = buf.readUInt32BE(5) & 0x7fffffff;
      const p = buf.subarray(9, 9 + len);
      if (type === 4 && !(flags & 1)) {
        for (let o = 0; o + 6 <= p.length; o += 6) if (p.readUInt16BE(o) === 3) seen.maxStreams = p.readUInt32BE(o + 2);
        sock.write(frame(4, 1, 0, Buffer.alloc(0))); // ACK
      }
      if (type === 1) seen.headers.add(id);
      if (type === 3) seen.rst.set(id, p.readUInt32BE(0));
      if (type === 7) seen.goaway = p.readUInt32BE(4);
      buf = buf.subarray(9 + len);
    }
  });
  sock.on("error", () => {});
  const headers = hpackLiteral([
    [":method", "POST"],
    [":scheme", "http"],
    [":path", "/grpc.health.v1.Health/Watch"],
    [":authority", daemon.address],
    ["content-type", "application/grpc"],
    ["te", "trailers"],
  ]);
  const out: Buffer[] = [Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), frame(4, 0, 0, Buffer.alloc(0))];
  for (let i = 0; i < max + extra; i++) {
    const id = 1 + 2 * i;
    out.push(frame(1, 0x4, id, headers), frame(0, 0x1, id, Buffer.alloc(5))); // HEADERS, then an empty request with END_STREAM
  }
  sock.write(Buffer.concat(out));
  try {
    await until("answers to every stream", () => seen.headers.size + seen.rst.size >= max + extra || seen.goaway >= 0);
    assert.equal(seen.maxStreams, max, "the server announces its limit");
    const refused = [...seen.rst.values()].filter((code) => code === 7).length;
    assert.ok(refused >= extra || seen.goaway >= 0, `refused: ${refused} streams (RST_STREAM REFUSED_STREAM), GOAWAY ${seen.goaway}`);
    assert.ok(seen.headers.size <= max, `${seen.headers.size} streams were served, more than ${max}`);
    // Meanwhile another connection is served normally.
    const health = grpcClient(Health, { address: daemon.address, timeoutMs: 5000 });
    assert.equal((await health.check({})).status, Status.SERVING);
  } finally {
    sock.destroy();
  }
});

test("every call carries a request id: the caller's (cleaned) or a new one, in the headers, and in the trailers of an error", async () => {
  const health = grpcClient(Health, { address: daemon.address, timeoutMs: 5000 });
  let header: Headers | undefined;
  await health.check({}, { headers: { "x-request-id": "req-42<script>" }, onHeader: (h) => (header = h) });
  assert.equal(header?.get("x-request-id"), "req-42script");
  await health.check({}, { onHeader: (h) => (header = h) });
  assert.match(header?.get("x-request-id") ?? "", /^[0-9a-f-]{36}$/);
  // An error keeps its code and message, and names its request id.
  try {
    await health.check({ service: "no.such.Service" }, { headers: { "x-request-id": "req-43" } });
    assert.fail("an unknown service was answered");
  } catch (e) {
    const err = ConnectError.from(e);
    assert.equal(err.code, Code.NotFound);
    assert.match(err.rawMessage, /unknown service "no\.such\.Service"/);
    assert.equal(err.metadata.get("x-request-id"), "req-43");
  }
});
