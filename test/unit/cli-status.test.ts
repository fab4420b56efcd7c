// `microvpc status`'s overlay section, from a GetOverlayStatus answer: which
// WireGuard runs each interface, and hosts left out of the mesh because their
// registry record was malformed. Pure; no daemons.
import assert from "node:assert/strict";
import { create } from "@bufbuild/protobuf";
import { test } from "vitest";
import { overlayText } from "../../cli/commands/status.js";
import { GetOverlayStatusResponseSchema, WireGuardImplementation } from "../../gen/microvpc/v1/netagent_pb.js";

const why = () => "unavailable";

test("status shows the WireGuard implementation per interface and warns about skipped hosts", () => {
  const value = create(GetOverlayStatusResponseSchema, {
    vpcs: [
      {
        vpcId: "vpc-aaaaaaaaaaaa",
        interface: "wg0123456789abc",
        listenPort: 51820,
        implementation: WireGuardImplementation.WIREGUARD_GO,
        peers: [{ hostId: "hv1", endpoint: "192.168.100.11:40000", rxBytes: 10n, txBytes: 20n }],
        skippedHosts: [{ hostId: "hv9", reason: "public key is not a WireGuard key" }],
      },
      { vpcId: "vpc-bbbbbbbbbbbb", interface: "wgfedcba9876543", listenPort: 51821, implementation: WireGuardImplementation.KERNEL },
    ],
  });
  const out = overlayText({ ok: true, value }, why);
  assert.match(out, /wg0123456789abc :51820 \(wireguard-go\)/);
  assert.match(out, /wgfedcba9876543 :51821 \(kernel\)/);
  assert.match(out, /hv1.*192\.168\.100\.11:40000/);
  assert.match(out, /\(no peers\)/);
  assert.match(out, /warning: vpc-aaaaaaaaaaaa: host hv9 left out of the mesh: public key is not a WireGuard key/);
  assert.doesNotMatch(overlayText({ ok: true, value: create(GetOverlayStatusResponseSchema, { vpcs: [value.vpcs[1]] }) }, why), /warning/);
  assert.equal(overlayText({ ok: true, value: create(GetOverlayStatusResponseSchema, {}) }, why), "overlay: no VPC of this host spans another host");
});
