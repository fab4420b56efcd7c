// The only firewall module that runs commands: `nft -f -` inside a VPC
// namespace (one atomic transaction per call), nft's counters, and conntrack.
// Argument arrays only; the script itself comes from the compiler, whose
// inputs are validated.
import { exec } from "../common/exec.js";

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

export class NftError extends Error {
  constructor(readonly ns: string, readonly output: string, readonly script: string) {
    super(`nft in ${ns}: ${output.trim().split("\n").slice(0, 6).join(" | ")}`);
  }
}

async function run(file: string, args: string[], input?: string): Promise<{ code: number; out: string; err: string }> {
  const r = await exec(file, args, { input, timeoutMs: 60_000 });
  return { code: r.code, out: r.stdout, err: r.stderr };
}

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
  async apply(ns: string, script: string): Promise<void> {
    const r = await run("ip", ["netns", "exec", ns, "nft", "-f", "-"], script);
    if (r.code !== 0) throw new NftError(ns, r.err, script);
  }

  async tableExists(ns: string): Promise<boolean> {
    const r = await run("ip", ["netns", "exec", ns, "nft", "list", "chain", "inet", "microvpc", "forward"]);
    return r.code === 0;
  }

  async counters(ns: string): Promise<Map<string, Counter>> {
    const r = await run("ip", ["netns", "exec", ns, "nft", "-j", "list", "counters", "table", "inet", "microvpc"]);
    const m = new Map<string, Counter>();
    if (r.code !== 0) return m;
    for (const o of (JSON.parse(r.out).nftables ?? []) as { counter?: { name: string; packets: number; bytes: number } }[]) {
      if (o.counter) m.set(o.counter.name, { packets: BigInt(o.counter.packets), bytes: BigInt(o.counter.bytes) });
    }
    return m;
  }

  async conntrackList(ns: string): Promise<CtEntry[]> {
    const r = await run("ip", ["netns", "exec", ns, "conntrack", "-L"]);
    return parseConntrack(r.out);
  }

  async conntrackDelete(ns: string, e: CtEntry): Promise<void> {
    const args = ["netns", "exec", ns, "conntrack", "-D", "-p", e.proto, "-s", e.src, "-d", e.dst];
    if (e.proto === "tcp" || e.proto === "udp") args.push("--sport", String(e.sport), "--dport", String(e.dport));
    await run("ip", args);
  }
}
