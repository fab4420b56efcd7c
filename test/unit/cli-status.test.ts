// `microvpc status`'s overlay section, from a GetOverlayStatus answer: which
// WireGuard runs each interface, and hosts left out of the mesh because their
// registry record was malformed. Pure; no daemons.
import assert from "node:assert/strict";
import { create } from "@bufbuild/protobuf";
import { test } from "vitest";
import { gatewayStatusText, overlayText } from "../../cli/commands/status.js";
import { GatewayHealth, GetGatewayStatusResponseSchema } from "../../gen/microvpc/v1/gateway_pb.js";
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

test("status lists the gateway's skipped records per VPC, key and field quoted", () => {
  const gs = create(GetGatewayStatusResponseSchema, {
    hostId: "hv1",
    health: GatewayHealth.HEALTHY,
    invalidRecordCount: 3,
    invalidRecords: [
      { owner: "gateway", kind: "fip", key: "mvpc:gw:fip:fip-aaaaaaaaaaa1", field: "address", vpc: "vpc-bbbbbbbbbbbb", reason: "address: bad" },
      { owner: "gateway", kind: "fip", key: "mvpc:gw:fip:fip-aaaaaaaaaaa5", reason: "is not a hash" },
      { owner: "gateway", kind: "imds-hop", key: "mvpc:gw:md:hop", field: "vpc-aaaaaaaaaaaa/10.0.1.5\n", vpc: "vpc-aaaaaaaaaaaa", reason: "hop: bad" },
    ],
  });
  const text = gatewayStatusText(gs);
  const lines = text.split("\n");
  assert.match(lines[1], /skipped 3 record\(s\)/);
  assert.deepEqual(
    lines.slice(2).map((l) => l.trim()),
    [
      "vpc-aaaaaaaaaaaa:",
      'imds-hop "mvpc:gw:md:hop" "vpc-aaaaaaaaaaaa/10.0.1.5\\n": hop: bad',
      "vpc-bbbbbbbbbbbb:",
      'fip "mvpc:gw:fip:fip-aaaaaaaaaaa1" "address": address: bad',
      "(no VPC known):",
      'fip "mvpc:gw:fip:fip-aaaaaaaaaaa5": is not a hash',
    ],
  );
  assert.equal(gatewayStatusText(create(GetGatewayStatusResponseSchema, { health: GatewayHealth.HEALTHY })).split("\n").length, 1, "nothing skipped: one line");
});
