// startGrpcServer's close(): calls in flight (a Watch stream) are cut after
// 2 s. grpc-js runs with channelz off (server.ts grpcOptions), and then its
// forceShutdown() no longer destroys the sessions: close() does.
import assert from "node:assert/strict";
import { createClient } from "@connectrpc/connect";
import pino from "pino";
import { test } from "vitest";
import { Health, HealthCheckResponse_ServingStatus as Status } from "../../gen/grpc/health/v1/health_pb.js";
import { grpcJsTransport } from "../../services/common/grpc-adapter.js";
import { startGrpcServer } from "../../services/common/server.js";

test("close(): a Watch stream still open is cut after 2 s, and close() returns", async () => {
  const server = await startGrpcServer({ listen: "127.0.0.1:0", services: [], logger: pino({ level: "silent" }), ready: async () => true });
  const transport = grpcJsTransport({ address: `127.0.0.1:${server.port}` });
  try {
    const client = createClient(Health, transport);
    assert.equal((await client.check({})).status, Status.SERVING);
    const seen: Status[] = [];
    const watching = (async () => {
      try {
        for await (const r of client.watch({})) seen.push(r.status);
        return "ended";
      } catch {
        return "cut";
      }
    })();
    while (seen.length === 0) await new Promise((r) => setTimeout(r, 10));
    const t0 = Date.now();
    await server.close();
    const ms = Date.now() - t0;
    assert.ok(ms >= 1500 && ms < 5000, `close() took ${ms} ms`);
    const how = await Promise.race([watching, new Promise((r) => setTimeout(() => r("still open"), 3000))]);
    assert.notEqual(how, "still open");
    assert.deepEqual(seen, [Status.SERVING]);
  } finally {
    transport.close();
  }
});
