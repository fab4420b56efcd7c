// The service-boundary lint rule (eslint.config.js, docs/architecture.md
// "Boundaries"): a service reaches another only through its schema.ts.
import assert from "node:assert/strict";
import { ESLint } from "eslint";
import { test } from "vitest";

const eslint = new ESLint();

async function boundaryErrors(filePath: string, code: string): Promise<string[]> {
  const [r] = await eslint.lintText(code, { filePath });
  return r.messages.filter((m) => m.ruleId === "microvpc/boundaries").map((m) => m.message);
}

test("a service importing another's store, planner or main fails lint, at any depth", async () => {
  for (const [file, spec] of [
    ["services/netagent/x.ts", "../ipam/store.js"],
    ["services/netagent/overlay/x.ts", "../../ipam/keys.js"],
    ["services/dns/x.ts", "../gateway/plan.js"],
    ["services/firewall/x.ts", "../netagent/main.js"],
    ["services/ipam/x.ts", "../dns/store.js"],
  ]) {
    const errs = await boundaryErrors(file, `export { x } from "${spec}";\n`);
    assert.equal(errs.length, 1, `${file} → ${spec}`);
    assert.match(errs[0], /only through \.\.\/[a-z]+\/schema\.js/);
  }
});

test("schema.ts, common/, gen/, the service's own modules and the composition exceptions pass", async () => {
  for (const [file, spec] of [
    ["services/netagent/x.ts", "../ipam/schema.js"],
    ["services/netagent/overlay/x.ts", "../../ipam/schema.js"],
    ["services/netagent/overlay/x.ts", "../store.js"],
    ["services/dns/x.ts", "../common/names.js"],
    ["services/dns/x.ts", "../../gen/microvpc/v1/dns_pb.js"],
    ["services/ipam/main.ts", "../peering/store.js"],
    ["services/gateway/main.ts", "../dns/host.js"],
  ]) {
    assert.deepEqual(await boundaryErrors(file, `export { x } from "${spec}";\n`), [], `${file} → ${spec}`);
  }
});
