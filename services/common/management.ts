// The management network: addresses VMs must never reach through a
// hypervisor (Redis, the daemons' gRPC and metrics ports, SSH, other
// hypervisors), whatever their security groups, floating IPs or NAT say.
//
// `--management-cidrs` (MICROVPC_MANAGEMENT_CIDRS) is either "auto" or a
// comma list of IPv4 CIDRs or addresses ("" = none). "auto" is computed from
// the hypervisor's own namespace: the subnet of every IPv4 address on the
// uplink (the underlay, where Redis and the other hypervisors are) plus every
// global IPv4 address of the namespace as a /32 (its own other addresses).
// Loopback, link-local (the transit links, 169.254/16) and the gateway's own
// transit links never count. The gateway enforces the list in the host
// namespace's nft table; the resolver refuses a VPC's forwarders inside it.
import { run } from "./exec.js";
import * as V from "./validate.js";

export const MANAGEMENT_AUTO = "auto";

/** "auto", or the CIDRs of an explicit list (canonical, a bare address as /32). */
export type ManagementSpec = "auto" | string[];

/** Parses the flag; throws naming `flag` with what to give instead. */
export function parseManagementCidrs(flag: string, text: string): ManagementSpec {
  if (text.trim() === MANAGEMENT_AUTO) return MANAGEMENT_AUTO;
  const out: string[] = [];
  for (const part of text.split(",").map((x) => x.trim())) {
    if (part === "") continue;
    const withLen = part.includes("/") ? part : `${part}/32`;
    let c: V.Cidr;
    try {
      c = V.cidr(flag, withLen, { min: 0, max: 32 });
    } catch (e) {
      throw new Error(`${flag} ${JSON.stringify(text)}: ${(e as Error).message}; use "auto" or e.g. "10.20.0.0/16,192.0.2.7"`, { cause: e });
    }
    if (!out.includes(c.text)) out.push(c.text);
  }
  return out;
}

interface AddrJson {
  ifname?: string;
  ifalias?: string;
  flags?: string[];
  addr_info?: { family: string; local: string; prefixlen: number; scope?: string }[];
}

const skipped = (ip: string) => ip.startsWith("127.") || ip.startsWith("169.254.");

/**
 * The "auto" list from `ip -j addr show` of the hypervisor's namespace: the
 * uplink's subnets and every global address of the namespace as a /32.
 * Transit links (ours, alias mvpc:<host>:gw:<vpc>) and loopback are left out.
 */
export function managementFromAddrs(ipJson: string, uplink: string): string[] {
  const out = new Set<string>();
  for (const l of JSON.parse(ipJson || "[]") as AddrJson[]) {
    if (l.ifname === "lo" || /^mvpc:[^:]+:gw:/.test(l.ifalias ?? "") || /^gh[0-9a-f]{12}$/.test(l.ifname ?? "")) continue;
    for (const a of l.addr_info ?? []) {
      if (a.family !== "inet" || skipped(a.local)) continue;
      if (a.scope !== undefined && a.scope !== "global") continue;
      out.add(`${a.local}/32`);
      if (l.ifname === uplink && a.prefixlen < 32) {
        const size = 2 ** (32 - a.prefixlen);
        const n = V.ipToInt(a.local);
        out.add(`${V.intToIp(n - (n % size))}/${a.prefixlen}`);
      }
    }
  }
  return [...out].sort();
}

/** The effective list: the explicit one, or "auto" read from the namespace now ("" = our own). */
export async function managementCidrs(spec: ManagementSpec, uplink: string, netns = ""): Promise<string[]> {
  if (spec !== MANAGEMENT_AUTO) return spec;
  const { stdout } = await run("ip", ["-j", "addr", "show"], { netns });
  return managementFromAddrs(stdout, uplink);
}

/** Whether an IPv4 address lies inside one of the CIDRs (the first that holds it, or undefined). */
export function managementHolding(cidrs: readonly string[], ip: string): string | undefined {
  if (!/^[0-9]{1,3}(\.[0-9]{1,3}){3}$/.test(ip)) return undefined;
  const n = V.ipToInt(ip);
  return cidrs.find((c) => {
    const [base, len] = c.split("/");
    const size = 2 ** (32 - Number(len));
    const b = V.ipToInt(base);
    return n >= b && n < b + size;
  });
}
