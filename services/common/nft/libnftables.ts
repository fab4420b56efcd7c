// nft's own library, in this process: libnftables (the library the `nft`
// binary is a thin front end of, from the same Debian package) called
// through koffi (an FFI with prebuilt binaries: nothing is compiled at
// install). One `nft -f -` exec costs ~15–20 ms of wall time and most of
// that in CPU on these machines (fork, `ip netns exec`'s mount namespace,
// loading nft and its libraries, reading the ruleset cache); the same
// transaction through the library costs ~0.2 ms. A CreateVm applies two or
// three of them (issue 14), and each firewall pass one per VPC.
//
// The thread: the kernel answers some transactions only after an RCU grace
// period (anything deleted: 7–12 ms per transaction on the 6.18
// kernels here), and a run on the main thread held the event loop that
// long: every other call of the daemon waited, and a DetachNic answered
// 13 ms late behind its NIC mark's removal. So every run goes to one worker
// thread (its own OS thread, started on first use), in order; the event
// loop runs meanwhile.
//
// The namespace: a netlink socket belongs to the network namespace of the
// thread that opened it, and libnftables opens (and, when a cache dump is
// interrupted, re-opens) its socket inside nft_ctx_new and
// nft_run_cmd_from_buffer. So the worker switches its own thread into the
// target namespace before a run and back after it, with nothing else in
// between: setns(2) of a network namespace moves only the calling thread,
// and the worker does one run at a time, synchronously. The main thread and
// libuv's pool threads never move. If the worker's way back fails, nothing
// can know where its sockets would go: the whole process exits rather than
// touch the wrong namespace.
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
// Contexts: one per namespace, kept between runs. Freeing a context closes
// its netlink socket, and the kernel makes the close of a netfilter netlink
// socket wait while any nft transaction's deletions (anyone's, in any
// namespace) are still queued for release: it flushes that queue, which
// waits for an RCU grace period (nf_tables' NETLINK_URELEASE handler). A
// transaction that deleted anything thus cost 10–28 ms here, nearly all of
// it in the close after the commit (strace: close(3) 5–12 ms, the commit
// itself 0.05 ms); one that only added, ~1 ms. So the worker keeps each
// namespace's context, and with it libnftables' cache, which nft itself
// refreshes when the ruleset's generation moved. A context is let go when
// its namespace is deleted or replaced under the same name (checked by the
// namespace file's inode before each run and every CONTEXT_SWEEP_MS: our
// socket would keep a deleted namespace, and every device in it, alive),
// after CONTEXT_IDLE_MS without a run, after a run nft refused, and at
// forgetNamespace().
//
// What stays an exec (LinuxNft decides): scripts over MAX_INPROCESS_BYTES
// (~0.35 ms per KiB here: a whole-table replace of thousands of rules would
// hold the worker, and every transaction queued behind it, for tens of
// milliseconds; an exec does not), reads with output, and
// everything when koffi or libnftables cannot be loaded or
// MICROVPC_NFT_EXEC=1 is set (then the exec path is what ran before).
import { createRequire } from "node:module";
import { Worker } from "node:worker_threads";
import { Counter, Histogram } from "prom-client";
import { metricsRegistry } from "../metrics.js";
import { libcLoadError, loadLibc, netnsPath, type Libc } from "../ns-syscalls.js";

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
  help: "Time of one in-process libnftables transaction, from the request to the nft worker thread to its answer (queueing and namespace switches included; the event loop runs meanwhile).",
  buckets: [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1],
  registers: [metricsRegistry],
});

const contextsOpened = new Counter({
  name: "microvpc_nft_library_contexts_total",
  help: "libnftables contexts (each with its netlink socket) the nft worker thread opened: one per namespace while it is in use, again after it was idle, replaced, or a run was refused.",
  registers: [metricsRegistry],
});

/** A namespace's context is let go after this long without a run. */
export const CONTEXT_IDLE_MS = 5_000;
/** How often the worker looks for idle contexts and namespaces deleted or replaced under their name. */
export const CONTEXT_SWEEP_MS = 250;

/** nft's refusal of a script: its own error text, as `nft -f` prints it on stderr. */
export class NftLibraryError extends Error {
  override name = "NftLibraryError";
  constructor(readonly nftError: string) {
    super(nftError.trim() || "nft refused the script");
  }
}

/** The library as the main thread holds it: loaded (so that its absence is known at start), never run here. */
interface Lib {
  c: Libc;
}

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
    // The functions the worker calls: a library without them fails here, at start, not on the first run.
    for (const f of WORKER_FUNCTIONS) nft.func(f);
    lib = { c };
    // Process-wide (glibc's thresholds hold for every thread's arena, the worker's too).
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

/** The libnftables functions the worker binds, as koffi declares them. */
const WORKER_FUNCTIONS = [
  "void *nft_ctx_new(uint32_t flags)",
  "void nft_ctx_free(void *ctx)",
  "int nft_ctx_buffer_output(void *ctx)",
  "int nft_ctx_buffer_error(void *ctx)",
  "const char *nft_ctx_get_error_buffer(void *ctx)",
  "const char *nft_ctx_get_output_buffer(void *ctx)",
  "void nft_ctx_output_set_flags(void *ctx, unsigned int flags)",
  "int nft_run_cmd_from_buffer(void *ctx, const char *buf)",
] as const;

/**
 * The worker thread (CommonJS, evaluated as is: nothing of the bundle is
 * needed there). One request at a time: into the namespace file (checked by
 * the main thread: /run/netns/NAME), the namespace's context (kept, see
 * "Contexts" above), the run, back home. A failed way back posts `fatal`
 * and ends the worker; the main thread then ends the process.
 */
const WORKER_SOURCE = String.raw`
"use strict";
const { parentPort, workerData } = require("node:worker_threads");
const fs = require("node:fs");
const koffi = require(workerData.koffi);
const CLONE_NEWNET = 0x40000000;
const NFT_CTX_OUTPUT_JSON = 1 << 4;
const libc = koffi.load("libc.so.6");
const setns = libc.func("int setns(int fd, int nstype)");
const fcntl = libc.func("int fcntl(int fd, int cmd, ...)");
// libnftables opens its socket without SOCK_CLOEXEC: mark every descriptor
// that lacks it (Node opens all of its own with it), so that no child the
// daemon starts inherits a kept context's socket, which would keep its
// namespace alive for the child's life (see closeOnExec, ns-syscalls.ts).
// Run after a context opens; a socket libnftables reopens inside a run (an
// interrupted cache dump) stays unmarked until another context opens: a rare window.
const F_GETFD = 1;
const F_SETFD = 2;
const FD_CLOEXEC = 1;
function closeOnExecAll() {
  for (const name of fs.readdirSync("/proc/self/fd")) {
    const fd = Number(name);
    if (!(fd > 2)) continue;
    const flags = fcntl(fd, F_GETFD);
    if (flags >= 0 && !(flags & FD_CLOEXEC)) fcntl(fd, F_SETFD, "int", flags | FD_CLOEXEC);
  }
}
// A signal handled on this thread while nft waits for the kernel's answer
// in select(), which no handler restarts, fails the run with "Interrupted
// system call" after the kernel may already have committed the transaction.
// V8's sampling profiler (--cpu-prof, the inspector's) signals every JS
// thread, this one too. Signals are held off for each run and delivered
// after it (glibc's sigset_t: 128 bytes; SIG_BLOCK 0, SIG_SETMASK 2).
const sigmask = libc.func("int pthread_sigmask(int how, void *set, void *old)");
const ALL_SIGNALS = Buffer.alloc(128, 0xff);
const savedMask = Buffer.alloc(128);
function withSignalsHeld(f) {
  if (sigmask(0, ALL_SIGNALS, savedMask) !== 0) return f();
  try {
    return f();
  } finally {
    sigmask(2, savedMask, null);
  }
}
const nft = koffi.load("libnftables.so.1");
const [ctxNew, ctxFree, bufferOutput, bufferError, errorBuffer, outputBuffer, setOutputFlags, runCmd] = workerData.functions.map((f) => nft.func(f));
const home = fs.openSync("/proc/thread-self/ns/net", "r");
// Namespace file path ("" = our own) -> { ctx, dev, ino, used }: the context
// whose socket was opened in that namespace, while it is the same one.
const contexts = new Map();
function drop(path) {
  const c = contexts.get(path);
  if (!c) return;
  contexts.delete(path);
  ctxFree(c.ctx);
}
// A namespace deleted (or replaced under its name) is let go at once: our
// socket would keep it, and every device in it, alive. An idle one too.
setInterval(() => {
  const now = Date.now();
  for (const [path, c] of contexts) {
    let same = path === "";
    if (!same) {
      try {
        const st = fs.statSync(path);
        same = st.dev === c.dev && st.ino === c.ino;
      } catch {}
    }
    if (!same || now - c.used > workerData.idleMs) drop(path);
  }
}, workerData.sweepMs);
parentPort.on("message", (m) => {
  let answer;
  let fd = -1;
  let moved = false;
  try {
    if (m.drop !== undefined) {
      drop(m.drop);
      answer = { id: m.id, ok: true, out: "", opened: false };
    } else {
      let dev = 0;
      let ino = 0;
      if (m.path !== "") {
        fd = fs.openSync(m.path, "r");
        const st = fs.fstatSync(fd);
        dev = st.dev;
        ino = st.ino;
        if (setns(fd, CLONE_NEWNET) !== 0) throw new Error("setns into " + m.path + " failed: errno " + koffi.errno());
        moved = true;
      }
      let c = contexts.get(m.path);
      if (c && (c.dev !== dev || c.ino !== ino)) {
        drop(m.path);
        c = undefined;
      }
      const opened = !c;
      if (!c) {
        // Opens its socket here, in the namespace this thread is in now.
        const ctx = ctxNew(0);
        if (!ctx) throw new Error("nft_ctx_new failed");
        closeOnExecAll();
        bufferOutput(ctx);
        bufferError(ctx);
        c = { ctx, dev, ino, used: 0 };
        contexts.set(m.path, c);
      }
      c.used = Date.now();
      setOutputFlags(c.ctx, m.json ? NFT_CTX_OUTPUT_JSON : 0);
      const rc = withSignalsHeld(() => runCmd(c.ctx, m.script));
      // Both buffers read (and so emptied) after every run.
      const out = String(outputBuffer(c.ctx) ?? "");
      const err = String(errorBuffer(c.ctx) ?? "");
      answer = rc === 0 ? { id: m.id, ok: true, out: m.json ? out : "", opened } : { id: m.id, ok: false, err, opened };
      // After a refusal, the next run starts from a fresh context.
      if (rc !== 0) drop(m.path);
    }
  } catch (e) {
    answer = { id: m.id, ok: false, failure: String(e && e.message), code: e && e.code };
  } finally {
    if (fd >= 0) fs.closeSync(fd);
    if (moved && setns(home, CLONE_NEWNET) !== 0) {
      parentPort.postMessage({ fatal: "cannot switch the nft worker back to our own network namespace after working in " + m.path });
      process.exit(70);
    }
  }
  parentPort.postMessage(answer);
});
`;

/** The worker's answer to one run; `opened`: the run opened a new context. */
type Answer = { id: number; opened?: boolean } & ({ ok: true; out: string } | { ok: false; err?: string; failure?: string; code?: string });

let worker: Worker | undefined;
let nextId = 0;
const pending = new Map<number, { resolve: (a: Answer) => void; reject: (e: Error) => void }>();

/** The worker, started on first use; referenced (keeps the process up) only while a run is pending. */
function nftWorker(): Worker {
  if (worker) return worker;
  const w = new Worker(WORKER_SOURCE, {
    eval: true,
    workerData: { koffi: createRequire(import.meta.url).resolve("koffi"), functions: WORKER_FUNCTIONS, idleMs: CONTEXT_IDLE_MS, sweepMs: CONTEXT_SWEEP_MS },
  });
  w.unref();
  w.on("message", (m: Answer | { fatal: string }) => {
    if ("fatal" in m) {
      process.stderr.write(`microvpc: ${m.fatal}; exiting\n`);
      process.exit(70);
    }
    const p = pending.get(m.id);
    pending.delete(m.id);
    if (pending.size === 0) w.unref();
    p?.resolve(m);
  });
  const fail = (err: Error) => {
    if (worker === w) worker = undefined;
    for (const p of pending.values()) p.reject(err);
    pending.clear();
  };
  w.on("error", fail);
  w.on("exit", (code) => fail(new Error(`the nft worker thread exited (code ${code})`)));
  return (worker = w);
}

function onWorker(msg: { path: string; script: string; json: boolean } | { drop: string }): Promise<Answer> {
  const w = nftWorker();
  const id = nextId++;
  return new Promise((resolve, reject) => {
    pending.set(id, { resolve, reject });
    w.ref();
    w.postMessage({ id, ...msg });
  });
}

/**
 * Lets go of the worker's context in the named namespace (its socket would
 * keep the namespace alive), after the runs already queued: a daemon that
 * is about to delete a namespace calls this first, so that the namespace
 * and its devices go with the deletion rather than at the next sweep.
 */
export async function forgetNamespace(ns: string): Promise<void> {
  if (!lib || !worker) return;
  await onWorker({ drop: netnsPath(ns) }).catch(() => {});
}

/**
 * Runs an nft script as one transaction in the named namespace ("" = the
 * process's own), on the nft worker thread. Resolves false when the library
 * is not available (the caller execs nft instead); rejects with
 * NftLibraryError and nft's message when nft refuses the script (nothing of
 * it is applied: one transaction), with NetnsError for a name that is not a
 * namespace's, and with code ENOENT when the namespace does not exist.
 */
export async function runInProcess(ns: string, script: string): Promise<boolean> {
  return (await runIn(ns, script, false)) !== null;
}

/**
 * Runs a read (`list …`) in the named namespace and resolves with what `nft
 * -j` would print, or null when the library is not available (the caller
 * execs `nft -j`). Rejects with NftLibraryError and nft's message when nft
 * refuses it (e.g. the table does not exist).
 */
export function listInProcess(ns: string, command: string): Promise<string | null> {
  return runIn(ns, command, true);
}

async function runIn(ns: string, script: string, json: boolean): Promise<string | null> {
  const l = load();
  if (!l) return null;
  const path = ns === "" ? "" : netnsPath(ns);
  const t0 = process.hrtime.bigint();
  let a: Answer;
  try {
    a = await onWorker({ path, script, json });
  } catch (err) {
    // The worker itself failed (it could not start, or died): from here on
    // the exec path, as when the library is missing, and the start-up status says why.
    lib = null;
    loadError = `the nft worker thread failed: ${(err as Error).message}`;
    process.stderr.write(`microvpc: ${loadError}; nft transactions exec nft from now on\n`);
    return null;
  } finally {
    runSeconds.observe(Number(process.hrtime.bigint() - t0) / 1e9);
  }
  // Not run (no such namespace): not counted, as before the worker.
  if (!a.ok && a.failure !== undefined) throw Object.assign(new Error(a.failure), a.code ? { code: a.code } : {});
  runs.inc({ result: a.ok ? "ok" : "error" });
  if (a.opened) contextsOpened.inc();
  if (a.ok) return a.out;
  throw new NftLibraryError(a.err ?? "");
}
