// The README's first command, as a user runs it: `up` builds the stack and
// the demo in namespaces and every reachability check holds; `down` and
// Ctrl-C leave no process and no namespace behind.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { join } from "node:path";
import { test } from "vitest";
import { ROOT } from "../lib/daemon.js";
import { listNetns } from "../lib/netns.js";

const SCRIPT = join(ROOT, "deploy", "quickstart.sh");

function runScript(arg: string, onOutput?: (all: string, child: ReturnType<typeof spawn>) => void): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn("bash", [SCRIPT, arg], { cwd: ROOT, detached: true, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    const on = (d: Buffer) => {
      out += d;
      onOutput?.(out, child);
    };
    child.stdout!.on("data", on);
    child.stderr!.on("data", on);
    const t = setTimeout(() => process.kill(-child.pid!, "SIGKILL"), 240_000);
    child.on("exit", (code) => {
      clearTimeout(t);
      resolve({ code, out });
    });
  });
}

const leftovers = async () => (await listNetns()).filter((n) => /^(mvpcqs-|mvpc-qs-|mvpcvm-qs-)/.test(n));

test("quickstart up: the demo's reachability matrix holds; down leaves nothing", { timeout: 300_000 }, async () => {
  const up = await runScript("up");
  assert.equal(up.code, 0, up.out.slice(-3000));
  assert.equal((up.out.match(/✓ as designed/g) ?? []).length, 7, up.out.slice(-3000));
  assert.doesNotMatch(up.out, /UNEXPECTED/);
  assert.match(up.out, /instance-id from 169\.254\.169\.254/);
  const down = await runScript("down");
  assert.equal(down.code, 0);
  assert.deepEqual(await leftovers(), []);
});

test("Ctrl-C during up leaves nothing behind", { timeout: 300_000 }, async () => {
  let sent = false;
  const r = await runScript("up", (out, child) => {
    if (!sent && out.includes("stack up")) {
      sent = true;
      process.kill(-child.pid!, "SIGINT");
    }
  });
  assert.ok(sent, "the stack came up before the interrupt");
  assert.notEqual(r.code, 0);
  await new Promise((res) => setTimeout(res, 1500));
  assert.deepEqual(await leftovers(), []);
});
