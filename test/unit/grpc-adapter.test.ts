// services/common/grpc-adapter.ts without a daemon: a protobuf-es service on
// a grpc-js server, called through the grpc-js transport. Errors keep their
// code, message, metadata and details (grpc-status-details-bin); server
// streams end when the client cancels; a refusing observer is seen as the
// error it throws.
import assert from "node:assert/strict";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import * as grpc from "@grpc/grpc-js";
import { afterAll, beforeAll, test } from "vitest";
import { Health, HealthCheckResponse_ServingStatus as Status, HealthCheckResponseSchema } from "../../gen/grpc/health/v1/health_pb.js";
import { grpcJsTransport, grpcService, route, type CallObserver } from "../../services/common/grpc-adapter.js";

const server = new grpc.Server();
let port = 0;
const ended: (ConnectError | undefined)[] = [];
let watchAborted = false;

const observe: CallObserver = (ctx) => {
  if (ctx.header("x-refuse")) throw new ConnectError("refused by the observer", Code.PermissionDenied);
  ctx.addResponseHeader("x-seen", ctx.method.name);
  return (err) => ended.push(err);
};

beforeAll(async () => {
  const { definition, handlers } = grpcService(
    route(Health, {
      check: async (req, ctx) => {
        if (req.service === "fail") {
          const err = new ConnectError("it failed", Code.FailedPrecondition, { "x-why": "test" });
          err.details.push({ desc: HealthCheckResponseSchema, value: { status: Status.SERVICE_UNKNOWN } });
          throw err;
        }
        if (req.service === "crash") throw new Error("boom");
        ctx.responseTrailer.set("x-trailer", "t");
        return { status: Status.SERVING };
      },
      list: async () => ({ statuses: {} }),
      async *watch(_req, ctx) {
        ctx.signal.addEventListener("abort", () => (watchAborted = true));
        for (let i = 0; ; i++) {
          yield { status: i % 2 ? Status.NOT_SERVING : Status.SERVING };
          await new Promise((r) => setTimeout(r, 10));
          if (ctx.signal.aborted) return;
        }
      },
    }),
    observe,
  );
  server.addService(definition, handlers);
  port = await new Promise<number>((resolve, reject) =>
    server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (e, p) => (e ? reject(e) : resolve(p))),
  );
});

afterAll(() => server.forceShutdown());

const client = () => createClient(Health, grpcJsTransport({ address: `127.0.0.1:${port}`, timeoutMs: 5000 }));

test("unary: the answer, the observer's header, the handler's trailer", async () => {
  let header: Headers | undefined;
  let trailer: Headers | undefined;
  const r = await client().check({}, { onHeader: (h) => (header = h), onTrailer: (t) => (trailer = t) });
  assert.equal(r.status, Status.SERVING);
  assert.equal(header?.get("x-seen"), "Check");
  assert.equal(trailer?.get("x-trailer"), "t");
  assert.equal(ended.at(-1), undefined);
});

test("a ConnectError keeps its code, message, metadata and details; anything else is INTERNAL", async () => {
  const err = await client()
    .check({ service: "fail" })
    .then(
      () => assert.fail("no error"),
      (e: unknown) => ConnectError.from(e),
    );
  assert.equal(err.code, Code.FailedPrecondition);
  assert.equal(err.rawMessage, "it failed");
  assert.equal(err.metadata.get("x-why"), "test");
  const details = err.findDetails(HealthCheckResponseSchema);
  assert.deepEqual(details, [create(HealthCheckResponseSchema, { status: Status.SERVICE_UNKNOWN })]);
  assert.equal(ended.at(-1)?.code, Code.FailedPrecondition);
  const crash = await client()
    .check({ service: "crash" })
    .then(
      () => assert.fail("no error"),
      (e: unknown) => ConnectError.from(e),
    );
  assert.equal(crash.code, Code.Internal);
  assert.match(crash.rawMessage, /internal error: boom/);
});

test("an observer that throws refuses the call with its error", async () => {
  const err = await client()
    .check({}, { headers: { "x-refuse": "1" } })
    .then(
      () => assert.fail("no error"),
      (e: unknown) => ConnectError.from(e),
    );
  assert.equal(err.code, Code.PermissionDenied);
  assert.equal(err.rawMessage, "refused by the observer");
});

test("server streaming: messages in order; the client's cancel aborts the handler's signal", async () => {
  const ac = new AbortController();
  const seen: Status[] = [];
  await assert.rejects(async () => {
    for await (const m of client().watch({}, { signal: ac.signal })) {
      seen.push(m.status);
      if (seen.length === 4) ac.abort();
    }
  });
  assert.deepEqual(seen, [Status.SERVING, Status.NOT_SERVING, Status.SERVING, Status.NOT_SERVING]);
  const deadline = Date.now() + 2000;
  while (!watchAborted && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
  assert.ok(watchAborted, "the handler's signal was aborted");
});
