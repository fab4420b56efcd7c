// A daemon's commands are started by a small helper process, not by the
// daemon itself. Starting a command forks the process that starts it, and a
// fork marks every private page of the parent copy-on-write: each page the
// daemon writes afterwards (V8's collector touches most of its heap) faults
// and is copied. On these machines (virtualised, a fault costs ~14 µs) a
// 150 MiB process that forks and then touches its memory spends ~530 ms in
// faults, against ~1 ms without the fork (measured with a scratch script,
// 3 December); after one fork, a 0.4 ms in-process nft transaction took
// 8.7 ms. The firewall, netagent and gateway fork for every NIC change.
// The helper is a bare `node -e` (a few MiB of heap, started once, lazily):
// its forks are cheap, and the daemon never forks for a command.
//
// Protocol: one JSON object per line each way. The daemon sends {id, file,
// args, input, timeout, killSignal, env, maxBuffer}; the helper spawns the
// argv (an argument array: no shell, ever), writes `input` to its stdin and
// closes it, kills it with killSignal at the timeout and with SIGKILL 5 s
// later (execa's rule), and answers {id, exitCode, signal, timedOut,
// stdout, stderr, failed, isMaxBuffer, originalMessage} (absent ones left
// out): the fields of an execa result that exec.ts reads, so errors and
// metrics do not change.
// If the helper dies, the calls in flight fail with a message saying so
// and the next call starts a new helper. Long-lived children (wireguard-go,
// QEMU) and runSync() keep using execa directly.
import { spawn, type ChildProcessWithoutNullStreams } from "node:child_process";
import { createInterface } from "node:readline";

/**
 * The helper's whole program (node -e): node:child_process only, so it
 * starts in tens of milliseconds. Its first line names it in `ps` (and lets
 * bench:vm count its CPU with the daemon's execs).
 */
export const HELPER_MARK = "microvpc exec helper";
const HELPER = String.raw`"use strict"; // ${HELPER_MARK}
const { spawn } = require("node:child_process");
const send = (m) => process.stdout.write(JSON.stringify(m) + "\n");
require("node:readline").createInterface({ input: process.stdin }).on("line", (line) => {
  let q;
  try { q = JSON.parse(line); } catch { return; }
  const res = { id: q.id, timedOut: false, stdout: "", stderr: "", failed: false, isMaxBuffer: false };
  let done = false, killTimer, timer;
  const finish = () => { if (done) return; done = true; clearTimeout(timer); clearTimeout(killTimer); send(res); };
  let p;
  try {
    const env = { ...process.env, ...q.env };
    for (const k of q.unset || []) delete env[k];
    p = spawn(q.file, q.args, { env, stdio: ["pipe", "pipe", "pipe"] });
  } catch (e) {
    res.failed = true; res.originalMessage = String(e && e.message); return finish();
  }
  const out = [], err = []; let nOut = 0, nErr = 0;
  p.stdout.on("data", (b) => { nOut += b.length; if (nOut > q.maxBuffer) { res.isMaxBuffer = true; p.kill("SIGKILL"); } else out.push(b); });
  p.stderr.on("data", (b) => { nErr += b.length; if (nErr > q.maxBuffer) { res.isMaxBuffer = true; p.kill("SIGKILL"); } else err.push(b); });
  timer = setTimeout(() => { res.timedOut = true; p.kill(q.killSignal); killTimer = setTimeout(() => p.kill("SIGKILL"), 5000); }, q.timeout);
  p.on("error", (e) => { res.failed = true; res.originalMessage = String(e && e.message); if (p.pid === undefined) finish(); });
  p.on("close", (code, signal) => {
    if (code !== null) res.exitCode = code;
    if (signal !== null) res.signal = signal;
    res.stdout = Buffer.concat(out).toString(); res.stderr = Buffer.concat(err).toString();
    res.failed = res.failed || res.timedOut || res.isMaxBuffer || code !== 0;
    finish();
  });
  p.stdin.on("error", () => {});
  p.stdin.end(q.input == null ? undefined : q.input);
}).on("close", () => process.exit(0));
`;

export interface HelperRequest {
  input?: string;
  timeout: number;
  killSignal: string;
  env: Record<string, string>;
  maxBuffer: number;
}

/** The fields of an execa result that exec.ts reads. */
export interface HelperResult {
  exitCode?: number;
  signal?: string;
  timedOut: boolean;
  stdout: string;
  stderr: string;
  failed: boolean;
  isMaxBuffer: boolean;
  originalMessage?: string;
  shortMessage?: string;
}

export class ExecHelper {
  private proc: ChildProcessWithoutNullStreams | undefined;
  /** The environment the helper started with: each call sends what changed since, so the command sees ours as it is now. */
  private startEnv: NodeJS.ProcessEnv = {};
  private readonly pending = new Map<number, (r: HelperResult) => void>();
  private nextId = 1;
  /** Helpers started so far (1 unless one died). */
  started = 0;

  get pid(): number | undefined {
    return this.proc?.pid;
  }

  private start(): ChildProcessWithoutNullStreams {
    // Small heap: the helper holds only the output of the commands in flight.
    const p = spawn(process.execPath, ["--max-old-space-size=64", "-e", HELPER], {
      stdio: ["pipe", "pipe", "pipe"],
      env: { ...process.env, NODE_OPTIONS: "" },
    });
    this.started++;
    const lines = createInterface({ input: p.stdout });
    lines.on("line", (line) => {
      let w: HelperResult & { id: number };
      try {
        w = JSON.parse(line) as HelperResult & { id: number };
      } catch {
        return;
      }
      const resolve = this.pending.get(w.id);
      if (!resolve) return;
      this.pending.delete(w.id);
      this.refs();
      resolve(w);
    });
    let stderr = "";
    p.stderr.on("data", (b: Buffer) => void (stderr = (stderr + b.toString()).slice(-2000)));
    p.stdin.on("error", () => {});
    p.on("exit", (code, signal) => {
      if (this.proc === p) this.proc = undefined;
      const why = `the exec helper (pid ${p.pid}) exited (${signal ?? `code ${code}`})${stderr.trim() ? `: ${stderr.trim()}` : ""}`;
      for (const [id, resolve] of this.pending) {
        this.pending.delete(id);
        resolve({ timedOut: false, stdout: "", stderr: "", failed: true, isMaxBuffer: false, originalMessage: why });
      }
    });
    return p;
  }

  /** Holds the daemon's event loop open only while calls are in flight. */
  private refs(): void {
    const p = this.proc;
    if (!p) return;
    const on = this.pending.size > 0;
    for (const h of [p, p.stdin, p.stdout, p.stderr] as unknown as { ref?: () => void; unref?: () => void }[]) {
      if (on) h.ref?.();
      else h.unref?.();
    }
  }

  run(file: string, args: string[], o: HelperRequest): Promise<HelperResult> {
    this.proc ??= this.start();
    const id = this.nextId++;
    const env: Record<string, string> = {};
    const unset: string[] = [];
    for (const [k, v] of Object.entries(process.env)) if (v !== undefined && this.startEnv[k] !== v) env[k] = v;
    for (const k of Object.keys(this.startEnv)) if (process.env[k] === undefined) unset.push(k);
    return new Promise<HelperResult>((resolve) => {
      this.pending.set(id, resolve);
      this.refs();
      this.proc!.stdin.write(JSON.stringify({ id, file, args, ...o, env: { ...env, ...o.env }, unset }) + "\n");
    });
  }

  /** Ends the helper (its stdin closes; commands in flight finish on their own). */
  stop(): void {
    this.proc?.stdin.end();
    this.proc = undefined;
  }
}
