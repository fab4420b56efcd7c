// Byte-for-byte pin of every nft text the three builders produce (firewall
// full replace and incremental diffs, the netagent's fail-closed skeleton,
// the gateway's two tables, the peering filter), over inputs that reach each
// branch. Recorded before the builders moved onto the nft transaction value
// (services/common/nft/), so it proves that move changed no text.
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "vitest";
import { compile, elementDiff, failClosedScript, removeScript } from "../../services/firewall/compile.js";
import { hostNft, vpcNft } from "../../services/gateway/plan.js";
import { desiredPeering, peeringNft } from "../../services/netagent/peering-plan.js";
import { ROOT } from "../lib/daemon.js";
import { AB, BC, fw, gwHost, gwVpc } from "../lib/nft-fixtures.js";

const FILE = join(ROOT, "test", "unit", "golden", "nft-corpus.txt");

function corpus(): string {
  const out: [string, string][] = [];
  for (let a = 0; a < 4; a++) {
    out.push([`firewall full ${a}`, compile(fw(a)).script]);
    for (let b = 0; b < 4; b++) {
      const d = elementDiff(compile(fw(a)).model, compile(fw(b)).model);
      out.push([`firewall diff ${a}->${b}`, d ? `${d.deletions} ${d.revokes}\n${d.script}` : "null"]);
    }
  }
  out.push(["fail closed", failClosedScript()], ["remove", removeScript()]);
  out.push(["gw vpc", vpcNft(gwVpc(), 8775)]);
  out.push(["gw vpc nat dns ct", vpcNft(gwVpc({ nat: true }), 8775, 53, 100)]);
  out.push(["gw vpc nat sources", vpcNft(gwVpc({ nat: true, natSources: ["subnet-cccccccccccc"], resolver: undefined }), 8775, 53)]);
  out.push([
    "gw vpc empty",
    vpcNft(gwVpc({ subnets: [{ subnetId: "subnet-aaaaaaaaaaaa", cidr: "10.0.1.0/24", public: false }], fips: [], forwards: [] }), 8775),
  ]);
  out.push(["gw host", hostNft(gwHost())]);
  out.push(["gw host bare", hostNft(gwHost({ dnsPort: 0, managementCidrs: undefined, vpcs: [] }))]);
  const want = desiredPeering(new Set(["vpc-aaaaaaaaaaaa", "vpc-bbbbbbbbbbbb", "vpc-cccccccccccc"]), [AB, BC], (v) => `ns-${v.slice(-4)}`);
  for (const [ns, w] of [...want].sort()) out.push([`peering ${ns}`, peeringNft(w)]);
  out.push(["peering none", peeringNft(undefined)]);
  return out.map(([k, v]) => `=== ${k}\n${v}`).join("");
}

test("golden: the nft text of every builder, byte for byte", () => {
  const text = corpus();
  if (process.env.UPDATE_GOLDEN) writeFileSync(FILE, text);
  assert.equal(text, readFileSync(FILE, "utf8"), "nft text changed: review it, then UPDATE_GOLDEN=1");
});
