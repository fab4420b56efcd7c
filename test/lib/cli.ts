// Running the `microvpc` CLI as a user does, for the CLI tests: a child
// process with the given global options, the exit code checked, JSON output
// parsed. The caller's MICROVPC_* variables are dropped so they cannot leak
// into what is tested.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { ROOT } from "./daemon.js";

export interface CliRun {
  code: number;
  stdout: string;
  stderr: string;
}

const BIN = join(ROOT, "bin", "microvpc.js");
export const cliEnv = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("MICROVPC_")));

/** run / expect / json bound to the global options `globals()` gives (daemon addresses), unless a call gives its own. */
export function cliRunner(globals: () => string[], timeoutMs: number) {
  /** `env` adds variables (MICROVPC_CONFIG, …) to the cleaned environment. */
  const run = (args: string[], g: string[] = globals(), env: Record<string, string> = {}): Promise<CliRun> =>
    new Promise((resolve) => {
      execFile(process.execPath, [BIN, ...g, ...args], { cwd: ROOT, env: { ...cliEnv, ...env }, timeout: timeoutMs }, (err, stdout, stderr) => {
        const code = err ? (typeof err.code === "number" ? err.code : -1) : 0;
        resolve({ code, stdout, stderr });
      });
    });
  /** Runs and asserts the exit code, showing the output if it differs. */
  const expect = async (code: number, args: string[], g?: string[], env?: Record<string, string>): Promise<CliRun> => {
    const r = await run(args, g, env);
    assert.equal(r.code, code, `microvpc ${args.join(" ")} exited ${r.code}, wanted ${code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
    return r;
  };
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  const json = async (args: string[]): Promise<any> => JSON.parse((await expect(0, [...args, "-o", "json"])).stdout);
  return { run, expect, json };
}
