// Every process a microvpc daemon starts goes through this module, on execa:
// - an argument array, never a shell string (execa's `shell` is never set);
// - LC_ALL=C merged into the environment, so output and errors parse;
// - a timeout on every run() (default 30 s; SIGTERM, then SIGKILL 5 s later
//   unless killSignal says otherwise);
// - one result shape (RunResult) and one error (ExecError: the argv, exit
//   code or signal, timedOut and stderr, in a message a person can act on);
// - counted: microvpc_exec_total{command} and
//   microvpc_exec_duration_seconds{command} (services/common/metrics.ts),
//   served by every daemon's /metrics. `command` is commandLabel(): the
//   program's basename, plus the subcommand for ip/tc/nft/wg ("ip link",
//   "ip -batch", "nft -f", "wg show"), with the wrappers that only change
//   namespace kept as a prefix ("ip netns exec nft -f", "nsenter ip -batch").
//   Namespace names, interface names and paths never reach the label, so
//   its values are the fixed set of commands in this code base.
// Long-lived children (wireguard-go, QEMU, Firecracker, the gateway's IMDS
// child) start with startDaemon(): same environment, counted in
// microvpc_exec_total (not timed: they run until stopped).
//
// Cost, measured with bench/exec.ts (npm run bench:exec) (Node 24, execa 10 then, `ip -V` ×100
// per case, cases interleaved, median of 7 and of 11 rounds) on the shared
// 2-core dev machine at load ~15 and ~25, so absolute times are inflated:
//   execFile 14.4 / 37.6 ms wall, 2.2 / 3.0 ms of our own CPU per call;
//   execa    24.8 / 55.7 ms wall, 3.8 / 5.0 ms CPU;
//   run()    24.0 / 55.1 ms wall, 3.9 / 5.2 ms CPU (execa + metrics).
// So execa costs ~1.7x execFile's parent CPU (+1.6–2 ms per command), and
// the metrics nothing measurable; the old "4.3 vs 7.1 ms" claim in
// netagent/kernel.ts pointed the same way. A netns CreateVm runs ~10
// commands across the daemons (test/integration/vmm.test.ts prints them):
// execa adds ~20 ms of CPU to it, for one way of timing out, failing and
// counting.
import { basename } from "node:path";
import type { ChildProcess } from "node:child_process";
import { execa, execaSync, type Options, type Result, type SyncResult } from "execa";
import { ExecHelper, type HelperResult } from "./exec-helper.js";
import { execDuration, execTotal } from "./metrics.js";

export const DEFAULT_TIMEOUT_MS = 30_000;

export interface RunOptions {
  /** Written to the command's stdin (then closed). */
  input?: string;
  /** Killed after this long (default DEFAULT_TIMEOUT_MS). */
  timeoutMs?: number;
  /** Signal sent on timeout (default SIGTERM, SIGKILL 5 s later if still alive). */
  killSignal?: NodeJS.Signals;
  /** Run inside this named network namespace (`ip netns exec NS …`); "" = our own. */
  netns?: string;
  /** Default true: anything but exit code 0 throws an ExecError. False: resolve with the result, whatever it is. */
  check?: boolean;
  /** Quote the first lines of `input` in the error (batches; never for secrets). */
  inputInError?: boolean;
}

export interface RunResult {
  /** Undefined when the command could not start or was killed by a signal. */
  exitCode: number | undefined;
  signal: string | undefined;
  timedOut: boolean;
  stdout: string;
  stderr: string;
  /** The error run() would have thrown with check: true (undefined on success). */
  error?: ExecError;
}

export class ExecError extends Error {
  override name = "ExecError";
  constructor(
    readonly argv: string[],
    readonly exitCode: number | undefined,
    readonly signal: string | undefined,
    readonly timedOut: boolean,
    readonly stderr: string,
    /** Why, when it is not the exit code: "timed out after 30000 ms", "could not start: spawn nft ENOENT". */
    why: string,
    inputHint = "",
  ) {
    const err = stderr.trim().split("\n").slice(0, 8).join(" | ");
    super(`${displayArgv(argv)}: ${why}${err ? `: ${err.length > 2000 ? `${err.slice(0, 2000)}…` : err}` : ""}${inputHint}`);
  }
}

/** argv as a person would type it: words with spaces or shell characters in single quotes. */
export function displayArgv(argv: readonly string[]): string {
  return argv.map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`)).join(" ");
}

/** argv that runs a command inside a named network namespace ("" = our own). */
export function inNetns(ns: string, cmd: string[]): [string, string[]] {
  return ns ? ["ip", ["netns", "exec", ns, ...cmd]] : [cmd[0], cmd.slice(1)];
}

const SUBCOMMANDS = new Set(["ip", "tc", "nft", "wg"]);

/** The metrics label of a command (see the header): bounded, never carries names or addresses. */
export function commandLabel(file: string, args: readonly string[]): string {
  const prog = basename(file);
  if (prog === "ip" && args[0] === "netns" && args[1] === "exec" && args.length > 3) return `ip netns exec ${commandLabel(args[3], args.slice(4))}`;
  if (prog === "nsenter") {
    const dd = args.indexOf("--");
    const i = dd >= 0 ? dd + 1 : args.findIndex((a) => !a.startsWith("-"));
    return i >= 0 && i < args.length ? `nsenter ${commandLabel(args[i], args.slice(i + 1))}` : prog;
  }
  if (!SUBCOMMANDS.has(prog)) return prog;
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (a === "-batch" || (prog === "nft" && a === "-f")) return `${prog} ${a}`;
    if (a === "-n" || a === "-netns")
      i++; // ip/tc: the namespace name
    else if (!a.startsWith("-")) return /^[a-z]{1,16}$/.test(a) ? `${prog} ${a}` : prog;
  }
  return prog;
}

const MAX_BUFFER = 256 * 1024 * 1024;

/** execa's options for run() and runSync(): output kept as printed, failures as results (settle() decides). */
function execaOptions(o: RunOptions) {
  const timeout = o.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  return {
    input: o.input,
    timeout,
    killSignal: o.killSignal ?? "SIGTERM",
    env: { LC_ALL: "C" },
    stripFinalNewline: false,
    maxBuffer: MAX_BUFFER,
    reject: false,
  } as const;
}

function toResult(argv: string[], r: Result | SyncResult | HelperResult, o: RunOptions): RunResult {
  const stdout = String(r.stdout ?? "");
  const stderr = String(r.stderr ?? "");
  const out: RunResult = { exitCode: r.exitCode, signal: r.signal, timedOut: r.timedOut, stdout, stderr };
  if (!r.failed) return out;
  const why = r.timedOut
    ? `timed out after ${o.timeoutMs ?? DEFAULT_TIMEOUT_MS} ms (killed with ${o.killSignal ?? "SIGTERM"})`
    : r.isMaxBuffer
      ? `output over ${MAX_BUFFER} bytes (killed)`
      : r.exitCode !== undefined
        ? `exit code ${r.exitCode}`
        : r.signal
          ? `killed by ${r.signal}`
          : `could not start: ${r.originalMessage ?? r.shortMessage ?? "unknown error"}`;
  const hint = o.inputInError && o.input ? ` (input: ${o.input.split("\n").slice(0, 8).join("; ")})` : "";
  out.error = new ExecError(argv, r.exitCode, r.signal, r.timedOut, stderr, why, hint);
  return out;
}

function settle(argv: string[], label: string, t0: bigint, r: Result | SyncResult | HelperResult, o: RunOptions): RunResult {
  execDuration.observe({ command: label }, Number(process.hrtime.bigint() - t0) / 1e9);
  const res = toResult(argv, r, o);
  if (res.error && o.check !== false) throw res.error;
  return res;
}

let helper: ExecHelper | undefined;

/**
 * From now on run() starts commands from a small helper process instead of
 * this one (exec-helper.ts says why: a fork of a big daemon costs it
 * hundreds of milliseconds in copy-on-write faults). Daemons call this at
 * start; MICROVPC_EXEC_HELPER=0 keeps every command on execa in-process.
 */
export function useExecHelper(on = process.env.MICROVPC_EXEC_HELPER !== "0"): ExecHelper | undefined {
  if (!on) {
    helper?.stop();
    helper = undefined;
  } else helper ??= new ExecHelper();
  return helper;
}

/**
 * Runs a command to completion. Rejects with an ExecError unless it exits 0
 * (check: false resolves with the result instead, and never rejects).
 */
export async function run(file: string, args: string[], o: RunOptions = {}): Promise<RunResult> {
  const [f, a] = inNetns(o.netns ?? "", [file, ...args]);
  const argv = [f, ...a];
  const label = commandLabel(f, a);
  execTotal.inc({ command: label });
  const t0 = process.hrtime.bigint();
  if (helper) {
    const x = execaOptions(o);
    const r = await helper.run(f, a, { input: x.input, timeout: x.timeout, killSignal: x.killSignal, env: x.env, maxBuffer: x.maxBuffer });
    return settle(argv, label, t0, r, o);
  }
  return settle(argv, label, t0, await execa(f, a, execaOptions(o)), o);
}

/** run() that blocks the event loop: only for answers needed synchronously (the KVM probe). */
export function runSync(file: string, args: string[], o: RunOptions = {}): RunResult {
  const [f, a] = inNetns(o.netns ?? "", [file, ...args]);
  const label = commandLabel(f, a);
  execTotal.inc({ command: label });
  const t0 = process.hrtime.bigint();
  return settle([f, ...a], label, t0, execaSync(f, a, execaOptions(o)), o);
}

export interface DaemonOptions {
  netns?: string;
  /** Added to the environment (LC_ALL=C always). */
  env?: Record<string, string>;
  /** stdin, stdout, stderr: "ignore", "inherit", "pipe" (read it from proc) or an open file descriptor (default all "ignore"). */
  stdio?: ["ignore" | "inherit" | number, "ignore" | "inherit" | "pipe" | number, "ignore" | "inherit" | number];
  /** Own process group and not holding our event loop: it outlives a restart of the daemon. Otherwise it is killed when we exit. */
  detached?: boolean;
}

export interface Daemon {
  /** The Node child, for its pid, exitCode/signalCode, kill() and "exit" events. */
  proc: ChildProcess;
  pid: number;
  /** Resolves (never rejects) when it ends, with ExecError in `error` unless it exited 0. */
  exited: Promise<RunResult>;
}

/**
 * Starts a long-lived child. Resolves once it is running; rejects with an
 * ExecError if it cannot start (e.g. the binary is missing).
 */
export async function startDaemon(file: string, args: string[], o: DaemonOptions = {}): Promise<Daemon> {
  const [f, a] = inNetns(o.netns ?? "", [file, ...args]);
  const argv = [f, ...a];
  execTotal.inc({ command: commandLabel(f, a) });
  // An open fd goes to the child as is (execa's types list only fds 0–9), so a detached VM's log never passes through us.
  const [stdin, stdout, stderr] = (o.stdio ?? ["ignore", "ignore", "ignore"]) as ["ignore", "ignore", "ignore"];
  const opts: Options = { stdin, stdout, stderr, env: { ...o.env, LC_ALL: "C" }, detached: !!o.detached, cleanup: !o.detached, buffer: false, reject: false };
  const sub = execa(f, a, opts);
  const exited = sub.then((r) => toResult(argv, r, {}));
  // execa 9: the subprocess is the ChildProcess itself (with the promise methods added).
  const proc = sub as unknown as ChildProcess;
  await new Promise<void>((resolve, reject) => {
    proc.once("spawn", resolve);
    exited.then((r) => reject(r.error ?? new ExecError(argv, r.exitCode, r.signal, false, "", "exited at once")));
  });
  if (o.detached) proc.unref();
  return { proc, pid: proc.pid!, exited };
}
