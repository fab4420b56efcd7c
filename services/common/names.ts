// Kernel names every daemon of a host agrees on: the netagent creates these
// devices and namespaces, the firewall, the gateway and the DNS resolver find
// them by the same names. Derived from validated ids only; Linux interface
// names are at most 15 bytes.
import { createHash } from "node:crypto";

const hex = (id: string) => id.slice(-12);

/** The netagent's namespaces and devices (VPC namespace, subnet bridge, NIC device, IFB). */
export const netagentNames = {
  netns: (hostId: string, vpcId: string) => `mvpc-${hostId}-${vpcId}`,
  netnsPrefix: (hostId: string) => `mvpc-${hostId}-`,
  bridge: (subnetId: string) => `br-${hex(subnetId)}`,
  hostIf: (nicId: string, kind: "tap" | "veth") => `${kind === "tap" ? "t" : "v"}${hex(nicId)}`,
  ifb: (nicId: string) => `i${hex(nicId)}`,
  alias: (hostId: string, id: string) => `mvpc:${hostId}:${id}`,
  aliasPrefix: (hostId: string) => `mvpc:${hostId}:`,
};

/**
 * The subnet bridge's MAC, fixed and derived from the subnet id. Left to
 * itself a bridge takes the lowest MAC of its ports, so the gateway's MAC
 * would change as NICs come and go and VMs would keep a stale one.
 */
export function bridgeMac(subnetId: string): string {
  const h = createHash("sha256").update(`bridge:${subnetId}`).digest();
  return ["02", ...[...h.subarray(0, 5)].map((b) => b.toString(16).padStart(2, "0"))].join(":");
}

/** The WireGuard interface of a VPC on a host (netagent overlay): unique per machine, 15 bytes. */
export function wgName(hostId: string, vpcId: string): string {
  return `wg${createHash("sha256").update(`${hostId}/${vpcId}`).digest("hex").slice(0, 13)}`;
}

/** The gateway's transit link of a VPC (host side, VPC side) and its routing table and rule. */
export const gatewayNames = {
  hostSide: (vpcId: string) => `gh${hex(vpcId)}`,
  vpcSide: (vpcId: string) => `gv${hex(vpcId)}`,
  table: (k: number) => 1000 + k,
  rulePref: (k: number) => 1000 + k,
};

/** The transit link's addresses for transit index k (gateway/schema.ts GK.transit keeps the index). */
export function transitAddrs(k: number): { host: string; vpc: string; cidr: string } {
  if (k < 0 || k >= 16000) throw new Error(`transit index ${k} out of range`);
  // 169.254.0.0/16 minus 169.254.169.0/24 (IMDS): /30s from 169.254.1.0.
  const n = 256 + k * 4;
  const third = Math.floor(n / 256) >= 169 ? Math.floor(n / 256) + 1 : Math.floor(n / 256);
  const fourth = n % 256;
  return { host: `169.254.${third}.${fourth + 1}`, vpc: `169.254.${third}.${fourth + 2}`, cidr: `169.254.${third}.${fourth}/30` };
}
