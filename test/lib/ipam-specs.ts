// What IpamStore's creates take, built from a CIDR: the tests that call the
// store directly (not through the API, which derives these itself).
import { cidr } from "../../services/common/validate.js";
import type { SubnetRec, VpcRec } from "../../services/ipam/store.js";

/** CreateVpc's input for `cidrText` (a /8 to /28). */
export function vpcSpec(name: string, cidrText: string): Omit<VpcRec, "id" | "createdMs" | "subnetCount"> {
  const c = cidr("cidr", cidrText, { min: 8, max: 28 });
  return { name, cidr: c.text, base: c.base, prefix: c.prefix, description: "", labels: [], publicCidr: false };
}

/** CreateSubnet's input for a private subnet of `cidrText` in VPC `vpcId`. */
export function subnetSpec(vpcId: string, name: string, cidrText: string): Omit<SubnetRec, "id" | "createdMs"> {
  const c = cidr("cidr", cidrText, { min: 8, max: 28 });
  return { vpcId, name, cidr: c.text, base: c.base, prefix: c.prefix, size: c.size, type: "private", extraReserved: 0, description: "", labels: [] };
}
