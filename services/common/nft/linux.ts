// LinuxNft: the only code that starts nft. A transaction (tx.ts) goes in
// as one nft script inside a network namespace ("" = our own), so it is one
// atomic kernel transaction; nft's own message is in the ExecError. Scripts
// up to 32 KiB run in-process through libnftables (libnftables.ts: ~0.2 ms
// instead of a ~15–20 ms `nft -f -` exec); larger ones, and all of them when
// the library cannot be loaded, exec `nft -f -`. Plus the
// reads the firewall needs (its counters, whether its table is there) and
// conntrack, which the firewall clears beside its nft changes. Everything
// runs through services/common/exec.ts (argument arrays, LC_ALL=C, a
// timeout, counted).
import { conntrackDelete, conntrackList, type CtEntry } from "../conntrack.js";
import { ExecError, inNetns, run, type RunOptions } from "../exec.js";
import { firewallTablesIntact } from "./fail-closed.js";
import { listInProcess, MAX_INPROCESS_BYTES, NftLibraryError, runInProcess } from "./libnftables.js";
import { render, type NftTransaction } from "./tx.js";

export type { CtEntry };

export interface Counter {
  packets: bigint;
  bytes: bigint;
}

/** What applies nft transactions: LinuxNft, or FakeNft in tests. */
export interface NftApplier {
  /** Runs the transaction atomically in the namespace ("" = our own); an empty one runs nothing. Rejects with nft's message. */
  apply(ns: string, tx: NftTransaction): Promise<void>;
}

/** What the firewall needs of the kernel. */
export interface NftRunner extends NftApplier {
  /** The per-NIC element counters ("cnt_in_drop/10.0.1.5") and bridge microvpc's named counters ("spoofed"). */
  counters(ns: string): Promise<Map<string, Counter>>;
  tableExists(ns: string): Promise<boolean>;
  conntrackList(ns: string): Promise<CtEntry[]>;
  /** Deletes the entries `pick` chooses (one pass over the table); how many. */
  conntrackClear(ns: string, pick: (e: CtEntry) => boolean): Promise<number>;
}

/** Parses `conntrack -L` lines: the original direction's tuple. */
export function parseConntrack(text: string): CtEntry[] {
  const out: CtEntry[] = [];
  for (const line of text.split("\n")) {
    const m = /^(\w+)\s+\d+\s.*?src=(\S+) dst=(\S+)(?: sport=(\d+) dport=(\d+))?/.exec(line.trim());
    if (!m) continue;
    const mark = / mark=(\d+)/.exec(line);
    out.push({ proto: m[1], src: m[2], dst: m[3], sport: Number(m[4] ?? 0), dport: Number(m[5] ?? 0), ...(mark ? { mark: Number(mark[1]) } : {}) });
  }
  return out;
}

export interface LinuxNftOptions {
  /** Of one `nft -f -` (default exec's 30 s; the firewall gives 60 s: a large ruleset is one transaction). */
  timeoutMs?: number;
  /** Quote the script's first lines in the error (the netagent's fail-closed skeleton, as before). */
  inputInError?: boolean;
}

export class LinuxNft implements NftRunner {
  constructor(readonly opts: LinuxNftOptions = {}) {}

  /** Rejects with an ExecError carrying nft's own message. */
  async apply(ns: string, tx: NftTransaction): Promise<void> {
    const text = render(tx);
    if (text !== "") await this.applyText(ns, text);
  }

  /**
   * Script text as it is, for the benchmarks' hand-written comparison
   * tables only: the daemons build a transaction and call apply().
   */
  async applyText(ns: string, text: string): Promise<void> {
    if (Buffer.byteLength(text) <= MAX_INPROCESS_BYTES) {
      try {
        if (await runInProcess(ns, text)) return;
      } catch (err) {
        // The same error an exec of `nft -f -` gives, so callers and messages do not change.
        const [file, args] = inNetns(ns, ["nft", "-f", "-"]);
        if ((err as NodeJS.ErrnoException).code === "ENOENT") {
          const stderr = `Cannot open network namespace "${ns}": No such file or directory`;
          throw new ExecError([file, ...args], 255, undefined, false, stderr, "exit code 255");
        }
        if (!(err instanceof NftLibraryError)) throw err;
        const hint = this.opts.inputInError ? ` (input: ${text.split("\n").slice(0, 8).join("; ")})` : "";
        throw new ExecError([file, ...args], 1, undefined, false, err.nftError, "exit code 1", hint);
      }
    }
    await run("nft", ["-f", "-"], {
      netns: ns,
      input: text,
      ...(this.opts.timeoutMs ? { timeoutMs: this.opts.timeoutMs } : {}),
      ...(this.opts.inputInError ? { inputInError: true } : {}),
    });
  }

  /**
   * What `nft -j list TABLE` prints for a table of the namespace, parsed (the
   * "nftables" array), or null when the table does not exist. In-process
   * where libnftables loads, else one exec.
   */
  listTable(ns: string, family: string, table: string): Promise<unknown[] | null> {
    return this.listJson(ns, `list table ${family} ${table}`);
  }

  /** What `nft -j <cmd>` prints, parsed (the "nftables" array); null when what it lists does not exist. */
  private async listJson(ns: string, cmd: string): Promise<unknown[] | null> {
    let text: string | null;
    try {
      text = await listInProcess(ns, cmd);
    } catch (err) {
      if (err instanceof NftLibraryError && /No such file or directory/.test(err.nftError)) return null;
      throw err;
    }
    if (text === null) {
      const r = await this.read(ns, ["nft", "-j", ...cmd.split(" ")]);
      if (r.exitCode !== 0) {
        if (/No such file or directory/.test(r.stderr)) return null;
        throw r.error ?? new Error(`nft ${cmd} failed: ${r.stderr.trim()}`);
      }
      text = r.stdout;
    }
    const parsed = JSON.parse(text) as { nftables?: unknown };
    return Array.isArray(parsed.nftables) ? parsed.nftables : [];
  }

  /** Reads: the caller looks at the exit code (no table yet, no conntrack entries). */
  private read(ns: string, cmd: string[]) {
    const o: RunOptions = { timeoutMs: 60_000, check: false, netns: ns };
    return run(cmd[0], cmd.slice(1), o);
  }

  async tableExists(ns: string): Promise<boolean> {
    // The chains alone (no rules, no elements): cheap at any table size.
    return firewallTablesIntact(await this.listJson(ns, "list chains"));
  }

  /**
   * The firewall's counters: every element counter of the sets of table
   * inet microvpc, as "set/element" (the per-NIC counts: compile.ts keeps
   * them in sets, not named counters, so that a NIC's change does not make
   * nft load thousands of objects), and the named counters of table bridge
   * microvpc ("spoofed"). Two reads, at scrape time only.
   */
  async counters(ns: string): Promise<Map<string, Counter>> {
    const m = new Map<string, Counter>();
    type Listed = {
      set?: { name: string; elem?: ({ elem?: { val: unknown; counter?: { packets: number; bytes: number } } } | string)[] };
      counter?: { name: string; packets: number; bytes: number };
    };
    const listed = async (cmd: string[]): Promise<Listed[]> => {
      const r = await this.read(ns, cmd);
      return r.exitCode === 0 ? (((JSON.parse(r.stdout) as { nftables?: Listed[] }).nftables ?? []) as Listed[]) : [];
    };
    for (const o of await listed(["nft", "-j", "list", "sets", "table", "inet", "microvpc"])) {
      for (const e of o.set?.elem ?? []) {
        if (typeof e === "object" && e.elem?.counter && typeof e.elem.val === "string") {
          m.set(`${o.set!.name}/${e.elem.val}`, { packets: BigInt(e.elem.counter.packets), bytes: BigInt(e.elem.counter.bytes) });
        }
      }
    }
    for (const o of await listed(["nft", "-j", "list", "counters", "table", "bridge", "microvpc"])) {
      if (o.counter) m.set(o.counter.name, { packets: BigInt(o.counter.packets), bytes: BigInt(o.counter.bytes) });
    }
    return m;
  }

  // In-process through libnetfilter_conntrack (common/conntrack.ts) where it loads; the exec otherwise, or if it fails.
  async conntrackList(ns: string): Promise<CtEntry[]> {
    const listed = await conntrackList(ns);
    if (listed) return listed;
    const r = await this.read(ns, ["conntrack", "-L"]);
    return parseConntrack(r.stdout);
  }

  async conntrackClear(ns: string, pick: (e: CtEntry) => boolean): Promise<number> {
    const cleared = await conntrackDelete(ns, pick);
    if (cleared !== null) return cleared;
    let n = 0;
    for (const e of await this.conntrackList(ns)) {
      if (!pick(e)) continue;
      await this.execDelete(ns, e);
      n++;
    }
    return n;
  }

  /** `conntrack -D` of one entry's tuple (the exec path). */
  private async execDelete(ns: string, e: CtEntry): Promise<void> {
    const args = ["conntrack", "-D", "-p", e.proto, "-s", e.src, "-d", e.dst];
    if (e.proto === "tcp" || e.proto === "udp") args.push("--sport", String(e.sport), "--dport", String(e.dport));
    await this.read(ns, args);
  }
}
