// The firewall's kernel adapter: LinuxNft (services/common/nft/linux.ts,
// the only code that starts nft) runs its transactions, reads its counters
// and clears conntrack; this module adds the br_netfilter check.
import { existsSync, readdirSync } from "node:fs";
import { run } from "../common/exec.js";

export { LinuxNft, parseConntrack, type Counter, type CtEntry, type NftRunner } from "../common/nft/linux.js";

/**
 * Why bridged traffic in a VPC namespace would not reach the inet table (the
 * security groups between VMs of one subnet), or "" if it does:
 * net.bridge.bridge-nf-call-iptables is per namespace (Linux ≥ 5.3) and
 * exists only with br_netfilter loaded.
 */
export async function bridgeNfProblem(ns: string): Promise<string> {
  const r = await run("ip", ["netns", "exec", ns, "sysctl", "-n", "net.bridge.bridge-nf-call-iptables"], { timeoutMs: 10_000, check: false });
  if (r.exitCode !== 0) {
    return existsSync(`/run/netns/${ns}`)
      ? `${ns}: net.bridge.bridge-nf-call-iptables is missing (load br_netfilter): bridged traffic would bypass the security groups`
      : "";
  }
  return r.stdout.trim() === "1"
    ? ""
    : `${ns}: net.bridge.bridge-nf-call-iptables is ${r.stdout.trim()}: bridged traffic bypasses the security groups (set it to 1 in that namespace)`;
}

/** Problems of every namespace of this host whose name matches `own` (see bridgeNfProblem). */
export async function bridgeNfProblems(own: RegExp): Promise<string[]> {
  let names: string[];
  try {
    names = readdirSync("/run/netns").filter((n) => own.test(n));
  } catch {
    return [];
  }
  const out: string[] = [];
  for (const ns of names.sort()) {
    const p = await bridgeNfProblem(ns);
    if (p) out.push(p);
  }
  return out;
}
