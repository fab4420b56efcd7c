// Every daemon starts the same way, serves health and reflection, and
// answers the methods not built yet with UNIMPLEMENTED.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { Code } from "@connectrpc/connect";
import { grpcClient } from "../../services/common/client.js";
import { VmService } from "../../gen/microvpc/v1/vm_pb.js";
import { rejectsWith } from "../lib/clients.js";
import { startDaemon } from "../lib/daemon.js";
import { startRedis, type TestRedis } from "../lib/redis.js";

let redis: TestRedis;
before(async () => {
  redis = await startRedis({ persistence: false });
});
after(async () => {
  await redis?.stop();
});

const cases = [
  ["vmm", (a: string) => grpcClient(VmService, { address: a }).listVms({})],
] as const;

for (const [name, call] of cases) {
  test(`${name}: healthy, and unbuilt methods answer UNIMPLEMENTED`, async () => {
    const d = await startDaemon(name, ["--redis", redis.url]);
    try {
      await rejectsWith(call(d.address), Code.Unimplemented);
      const metrics = await (await fetch(`http://127.0.0.1:${d.metricsPort}/metrics`)).text();
      assert.match(metrics, /microvpc_rpc_requests_total\{.*code="Unimplemented"/);
    } finally {
      await d.stop();
    }
  });
}
