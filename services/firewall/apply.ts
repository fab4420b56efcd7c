// The only firewall module that runs commands: `nft -f -` inside a VPC
// namespace (one atomic transaction per call), nft's counters, and conntrack.
// Through services/common/exec.ts (argument arrays only, 60 s timeout here:
// a large ruleset is one transaction); the script itself comes from the
// compiler, whose inputs are validated.
import { existsSync, readdirSync } from "node:fs";
import { run, type RunOptions } from "../common/exec.js";

export interface CtEntry {
  proto: string;
  src: string;
  dst: string;
  sport: number;
  dport: number;
}

export interface Counter {
  packets: bigint;
  bytes: bigint;
}

export interface NftRunner {
  apply(ns: string, script: string): Promise<void>;
  counters(ns: string): Promise<Map<string, Counter>>;
  tableExists(ns: string): Promise<boolean>;
  conntrackList(ns: string): Promise<CtEntry[]>;
  conntrackDelete(ns: string, e: CtEntry): Promise<void>;
}

/** Reads: the caller looks at the exit code (no table yet, no conntrack entries). */
const READ: RunOptions = { timeoutMs: 60_000, check: false };

/** Parses `conntrack -L` lines: the original direction's tuple. */
export function parseConntrack(text: string): CtEntry[] {
  const out: CtEntry[] = [];
  for (const line of text.split("\n")) {
    const m = /^(\w+)\s+\d+\s.*?src=(\S+) dst=(\S+)(?: sport=(\d+) dport=(\d+))?/.exec(line.trim());
    if (!m) continue;
    out.push({ proto: m[1], src: m[2], dst: m[3], sport: Number(m[4] ?? 0), dport: Number(m[5] ?? 0) });
  }
  return out;
}

export class LinuxNft implements NftRunner {
  /** Rejects with an ExecError carrying nft's own message. */
  async apply(ns: string, script: string): Promise<void> {
    await run("ip", ["netns", "exec", ns, "nft", "-f", "-"], { timeoutMs: 60_000, input: script });
  }

  async tableExists(ns: string): Promise<boolean> {
    const r = await run("ip", ["netns", "exec", ns, "nft", "list", "chain", "inet", "microvpc", "forward"], READ);
    return r.exitCode === 0;
  }

  async counters(ns: string): Promise<Map<string, Counter>> {
    const r = await run("ip", ["netns", "exec", ns, "nft", "-j", "list", "counters", "table", "inet", "microvpc"], READ);
    const m = new Map<string, Counter>();
    if (r.exitCode !== 0) return m;
    for (const o of (JSON.parse(r.stdout).nftables ?? []) as { counter?: { name: string; packets: number; bytes: number } }[]) {
      if (o.counter) m.set(o.counter.name, { packets: BigInt(o.counter.packets), bytes: BigInt(o.counter.bytes) });
    }
    return m;
  }

  async conntrackList(ns: string): Promise<CtEntry[]> {
    const r = await run("ip", ["netns", "exec", ns, "conntrack", "-L"], READ);
    return parseConntrack(r.stdout);
  }

  async conntrackDelete(ns: string, e: CtEntry): Promise<void> {
    const args = ["netns", "exec", ns, "conntrack", "-D", "-p", e.proto, "-s", e.src, "-d", e.dst];
    if (e.proto === "tcp" || e.proto === "udp") args.push("--sport", String(e.sport), "--dport", String(e.dport));
    await run("ip", args, READ);
  }
}

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
