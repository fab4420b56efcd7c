import type { Transport } from "@connectrpc/connect";
import { grpcClient, grpcTransport } from "../../services/common/client.js";
import { PeeringService } from "../../gen/microvpc/v1/peering_pb.js";
import { IpamService } from "../../gen/microvpc/v1/ipam_pb.js";
import { SubnetService } from "../../gen/microvpc/v1/subnet_pb.js";
import { VpcService } from "../../gen/microvpc/v1/vpc_pb.js";
import { Code, ConnectError } from "@connectrpc/connect";
import assert from "node:assert/strict";

export function ipamClients(address: string, token?: string) {
  const t: Transport = grpcTransport({ address, token });
  return {
    vpc: grpcClient(VpcService, t),
    subnet: grpcClient(SubnetService, t),
    ipam: grpcClient(IpamService, t),
    peering: grpcClient(PeeringService, t),
  };
}

/** Asserts that the promise fails with this gRPC code and a message matching re. */
export async function rejectsWith(p: Promise<unknown>, code: Code, re?: RegExp): Promise<ConnectError> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof ConnectError, `expected a ConnectError, got ${e}`);
    assert.equal(Code[e.code], Code[code], `wrong code for: ${e.rawMessage}`);
    if (re) assert.match(e.rawMessage, re);
    return e;
  }
  assert.fail(`expected ${Code[code]}, but the call succeeded`);
}
