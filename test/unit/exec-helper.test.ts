// The exec helper (services/common/exec-helper.ts): daemons start their
// commands from a small helper process, so that the big daemon never forks
// (a fork costs it its whole heap in copy-on-write faults). First, every
// test of exec.test.ts again with the helper on: the same results and the
// same errors, whichever process forks. Then what only the helper does: the
// command's parent is the helper, not this process; a helper that dies
// fails the calls in flight with a message saying so, and the next call
// starts a new one.
import assert from "node:assert/strict";
import { afterAll, beforeAll, describe, test } from "vitest";
import { ExecError, run, useExecHelper } from "../../services/common/exec.js";

const helper = useExecHelper(true)!;
beforeAll(() => assert.ok(helper, "the helper is on for this file"));
afterAll(() => useExecHelper(false));

describe("exec.test.ts, with every run() through the helper", async () => {
  await import("./exec.test.js");
});

describe("the helper itself", () => {
  test("the command's parent is the helper process, not this one", async () => {
    const r = await run(process.execPath, ["-e", "process.stdout.write(String(process.ppid))"]);
    assert.equal(Number(r.stdout), helper.pid);
    assert.notEqual(helper.pid, process.pid);
  });

  test("calls in flight when the helper dies fail with a message that says so; the next call starts a new helper", async () => {
    const startedBefore = helper.started;
    const inFlight = run("sleep", ["5"]);
    await new Promise((r) => setTimeout(r, 200));
    process.kill(helper.pid!, "SIGKILL");
    await assert.rejects(
      inFlight,
      (err: unknown) => err instanceof ExecError && /sleep 5: could not start: the exec helper \(pid \d+\) exited \(SIGKILL\)/.test(err.message),
    );
    const r = await run("echo", ["again"]);
    assert.equal(r.stdout, "again\n");
    assert.equal(helper.started, startedBefore + 1);
  });

  test("many commands at once each get their own answer", async () => {
    const rs = await Promise.all(Array.from({ length: 40 }, (_, i) => run("echo", [`n${i}`])));
    assert.deepEqual(
      rs.map((r) => r.stdout),
      Array.from({ length: 40 }, (_, i) => `n${i}\n`),
    );
  });
});
