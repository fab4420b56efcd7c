// The generated references under docs/ (tools/gen-docs.ts) match what the
// sources say today: an edited .proto comment without `npm run docs` fails.
import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { generatedDocs, renderApiReference } from "../../tools/gen-docs.js";

describe("generated docs", () => {
  for (const [path, text] of generatedDocs()) {
    it(`${path.replace(/.*\/docs\//, "docs/")} is up to date (npm run docs)`, () => {
      expect(readFileSync(path, "utf8")).toBe(text);
    });
  }

  it("the API reference has every service and method with its proto comment", () => {
    const api = renderApiReference();
    for (const s of [
      "VpcService",
      "SubnetService",
      "IpamService",
      "NetAgentService",
      "FirewallService",
      "GatewayService",
      "VmService",
      "DnsService",
      "PeeringService",
    ]) {
      expect(api, s).toContain(`### ${s}\n`);
    }
    expect(api).toMatch(
      /\| `CreateVpc` \| \[CreateVpcRequest\]\(#createvpcrequest\) → \[CreateVpcResponse\]\(#createvpcresponse\) \| Creates a VPC\. ALREADY_EXISTS/,
    );
    expect(api).toContain("| 3 | `cidr` | `string` | IPv4 CIDR of the VPC, between /8 and /28, host bits zero. |");
  });
});
