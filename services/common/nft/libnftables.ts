// nft's own library, in this process: libnftables (the library the `nft`
// binary is a thin front end of, from the same Debian package) called
// through koffi (an FFI with prebuilt binaries: nothing is compiled at
// install). One `nft -f -` exec costs ~15–20 ms of wall time and most of
// that in CPU on these machines (fork, `ip netns exec`'s mount namespace,
// loading nft and its libraries, reading the ruleset cache); the same
// transaction through the library costs ~0.2 ms. A CreateVm applies two or
// three of them (issue 14), and each firewall pass one per VPC.
//
// The namespace: a netlink socket belongs to the network namespace of the
// thread that opened it, and libnftables opens (and, when a cache dump is
// interrupted, re-opens) its socket inside nft_run_cmd_from_buffer. So every
// run switches this thread into the target namespace first and back after,
// with nothing else in between: setns(2) of a network namespace moves only
// the calling thread, and the whole sequence is synchronous JavaScript, so
// no other callback of this process runs while the main thread is away
// (libuv's pool threads, where DNS lookups and file I/O run, never move).
// If the way back fails the process cannot know where its sockets would go,
// and it exits rather than touch the wrong namespace.
//
// Memory: libnftables builds, per table in the namespace, hash tables of
// 128 KiB and more for its cache, and frees them at the end of the run.
// glibc serves blocks that size with a fresh mmap and unmaps them on free,
// so every run page-faulted ~0.5 MiB per table back in: from the fourth
// table on (a VPC namespace holds the firewall's two, the gateway's two and
// the VPN's), a one-element change cost 5.7 ms instead of 0.3 ms, +1.3 ms
// per further table (measured here; page faults are dear in these VMs).
// At load we raise glibc's mmap threshold to 4 MiB and its trim threshold
// to 16 MiB (mallopt), so those blocks come from the heap and stay mapped:
// at most that much freed memory is kept. V8's heap does not use malloc.
//
// What stays an exec (LinuxNft decides): scripts over MAX_INPROCESS_BYTES
// (~0.35 ms per KiB here: a whole-table replace of thousands of rules would
// hold the event loop for tens of milliseconds; an exec does not), reads with output, and
// everything when koffi or libnftables cannot be loaded or
// MICROVPC_NFT_EXEC=1 is set (then the exec path is what ran before).
import { Counter, Histogram } from "prom-client";
import { metricsRegistry } from "../metrics.js";
import { inNamedNetns, libcLoadError, loadLibc, type Libc } from "../ns-syscalls.js";

/** Scripts up to this size run in-process; larger ones exec `nft -f -`. */
export const MAX_INPROCESS_BYTES = 32 * 1024;

/** glibc mallopt(3) parameters. */
const M_TRIM_THRESHOLD = -1;
const M_MMAP_THRESHOLD = -3;

const runs = new Counter({
  name: "microvpc_nft_library_runs_total",
  help: "nft transactions (and the netagent's table reads) run in-process through libnftables (not counted in microvpc_exec_total), by result.",
  labelNames: ["result"] as const,
  registers: [metricsRegistry],
});
const runSeconds = new Histogram({
  name: "microvpc_nft_library_run_seconds",
  help: "Time of one in-process libnftables transaction, namespace switches included (the event loop waits for it).",
  buckets: [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1],
  registers: [metricsRegistry],
});

/** nft's refusal of a script: its own error text, as `nft -f` prints it on stderr. */
export class NftLibraryError extends Error {
  override name = "NftLibraryError";
  constructor(readonly nftError: string) {
    super(nftError.trim() || "nft refused the script");
  }
}

type Fn = (...args: unknown[]) => unknown;

interface Lib {
  c: Libc;
  ctxNew: Fn;
  ctxFree: Fn;
  bufferOutput: Fn;
  bufferError: Fn;
  errorBuffer: Fn;
  outputBuffer: Fn;
  setOutputFlags: Fn;
  runCmd: Fn;
}

/** nft_ctx_output_set_flags: NFT_CTX_OUTPUT_JSON (`nft -j`). */
const NFT_CTX_OUTPUT_JSON = 1 << 4;

let lib: Lib | null | undefined;
let loadError = "";

function load(): Lib | null {
  if (lib !== undefined) return lib;
  if (process.env.MICROVPC_NFT_EXEC === "1") {
    loadError = "MICROVPC_NFT_EXEC=1";
    return (lib = null);
  }
  try {
    const c = loadLibc();
    if (!c) throw new Error(libcLoadError());
    const nft = c.koffi.load("libnftables.so.1");
    lib = {
      c,
      ctxNew: nft.func("void *nft_ctx_new(uint32_t flags)") as Fn,
      ctxFree: nft.func("void nft_ctx_free(void *ctx)") as Fn,
      bufferOutput: nft.func("int nft_ctx_buffer_output(void *ctx)") as Fn,
      bufferError: nft.func("int nft_ctx_buffer_error(void *ctx)") as Fn,
      errorBuffer: nft.func("const char *nft_ctx_get_error_buffer(void *ctx)") as Fn,
      outputBuffer: nft.func("const char *nft_ctx_get_output_buffer(void *ctx)") as Fn,
      setOutputFlags: nft.func("void nft_ctx_output_set_flags(void *ctx, unsigned int flags)") as Fn,
      runCmd: nft.func("int nft_run_cmd_from_buffer(void *ctx, const char *buf)") as Fn,
    };
    c.mallopt(M_MMAP_THRESHOLD, 4 << 20);
    c.mallopt(M_TRIM_THRESHOLD, 16 << 20);
  } catch (err) {
    loadError = (err as Error).message;
    lib = null;
  }
  return lib;
}

/** Whether transactions can run in-process; if not, why (for the daemon's start-up log). */
export function libnftablesStatus(): { available: boolean; reason: string } {
  const l = load();
  return { available: l !== null, reason: l ? "libnftables.so.1 through koffi" : loadError };
}

/** For a daemon's "serving" log line: how its nft transactions run. */
export function nftStartInfo(): Record<string, unknown> {
  const st = libnftablesStatus();
  return { nft: st.available ? "in-process" : `exec (${st.reason})` };
}

/**
 * Runs an nft script as one transaction in the named namespace ("" = this
 * thread's own). Returns false when the library is not available (the
 * caller execs nft instead); throws NftLibraryError with nft's message when
 * nft refuses the script (nothing of it is applied: one transaction).
 */
export function runInProcess(ns: string, script: string): boolean {
  return runIn(ns, script, false) !== null;
}

/**
 * Runs a read (`list …`) in the named namespace and returns what `nft -j`
 * would print, or null when the library is not available (the caller execs
 * `nft -j`). Throws NftLibraryError with nft's message when nft refuses it
 * (e.g. the table does not exist).
 */
export function listInProcess(ns: string, command: string): string | null {
  return runIn(ns, command, true);
}

function runIn(ns: string, script: string, json: boolean): string | null {
  const l = load();
  if (!l) return null;
  const t0 = process.hrtime.bigint();
  let result: { ok: true; out: string } | { ok: false; err: string };
  try {
    result = inNamedNetns(l.c, ns, () => {
      const ctx = l.ctxNew(0);
      if (!ctx) throw new Error("nft_ctx_new failed");
      try {
        if (json) l.setOutputFlags(ctx, NFT_CTX_OUTPUT_JSON);
        l.bufferOutput(ctx);
        l.bufferError(ctx);
        return l.runCmd(ctx, script) === 0
          ? { ok: true as const, out: json ? String(l.outputBuffer(ctx) ?? "") : "" }
          : { ok: false as const, err: String(l.errorBuffer(ctx) ?? "") };
      } finally {
        l.ctxFree(ctx);
      }
    });
  } finally {
    runSeconds.observe(Number(process.hrtime.bigint() - t0) / 1e9);
  }
  runs.inc({ result: result.ok ? "ok" : "error" });
  if (!result.ok) throw new NftLibraryError(result.err);
  return result.out;
}
