// Running a command the one way microvpc allows: an argument array (never a
// shell string), LC_ALL=C so errors are parseable, a timeout, stdin when a
// batch is piped in. Never rejects: callers decide what a non-zero exit means.
import { execFile } from "node:child_process";

export interface ExecResult {
  code: number;
  stdout: string;
  stderr: string;
}

export function exec(file: string, args: string[], o: { input?: string; timeoutMs?: number } = {}): Promise<ExecResult> {
  return new Promise((resolve) => {
    const child = execFile(
      file,
      args,
      { env: { ...process.env, LC_ALL: "C" }, timeout: o.timeoutMs ?? 30_000, maxBuffer: 256 * 1024 * 1024 },
      (err, stdout, stderr) => {
        const code = err ? (typeof (err as { code?: unknown }).code === "number" ? (err as { code: number }).code : 1) : 0;
        resolve({ code, stdout: String(stdout), stderr: String(stderr) || (err ? err.message : "") });
      },
    );
    if (o.input !== undefined) child.stdin!.end(o.input);
  });
}

/** argv that runs a command inside a named network namespace ("" = our own). */
export function inNetns(ns: string, cmd: string[]): [string, string[]] {
  return ns ? ["ip", ["netns", "exec", ns, ...cmd]] : [cmd[0], cmd.slice(1)];
}
