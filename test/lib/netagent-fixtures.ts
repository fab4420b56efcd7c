// Records of the netagent that several test files write by hand.
import type { HostRecord } from "../../services/netagent/overlay/registry.js";

/** A host's overlay registry record that passes recordProblem: a valid key (ending "<n>A="), the given underlay address, members of `vpcIds`. */
export function hostRecord(id: string, address: string, vpcIds: string[], n = 0): HostRecord {
  return {
    id,
    publicKey: `${"A".repeat(41)}${n % 10}A=`,
    address,
    mtu: 1420,
    underlayMtu: 1500,
    vpcIds,
    registeredMs: 1,
    keyCreatedMs: 1,
    agentVersion: "test",
  };
}
