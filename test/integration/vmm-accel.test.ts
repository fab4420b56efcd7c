// The KVM probe's process handling, for real (services/vmm/accel.ts): the
// probe VM is QEMU run through a wrapper, so each outcome happens on any
// machine with QEMU and the built guest, whatever its KVM does:
//   - a guest that never prints (the wrapper pauses it: -accel tcg -S): the
//     probe gives up at its limit, stops QEMU by PID, leaves no process and
//     no files;
//   - a QEMU that exits at once with a message: the message is the reason;
//   - this machine's own answer: KVM or TCG, with a reason, in seconds.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { chmodSync, mkdirSync, readdirSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "vitest";
import { bootKvmProbe, machineDeps, probeAccel } from "../../services/vmm/accel.js";
import { guestImage, QEMU_BIN } from "../../services/vmm/qemu.js";
import { processesWith, tempDir } from "../lib/netns.js";

const guest = guestImage();
const hasQemu = (() => {
  try {
    execFileSync("sh", ["-c", `command -v ${QEMU_BIN}`], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
})();
const skip = !hasQemu
  ? `${QEMU_BIN} is not installed`
  : !guest
    ? "no guest image (deploy/guest/build.sh; test/integration/qemu.test.ts, which runs before this file, builds it)"
    : false;

function wrapper(name: string, body: string): string {
  const f = join(tempDir("accel"), name);
  writeFileSync(f, `#!/bin/sh\n${body}\n`);
  chmodSync(f, 0o755);
  return f;
}

const probeDirs = () => readdirSync(tmpdir()).filter((n) => n.startsWith("microvpc-kvm-probe-"));
/** This process's probe VMs: their console log is in a folder named after our PID. */
const probeProcs = () => processesWith(`microvpc-kvm-probe-${process.pid}-`);

test.skipIf(skip)("a probe guest that never reaches init: timeout at the limit, QEMU stopped by PID, nothing left", { timeout: 30_000 }, async () => {
  // What a vmm SIGKILLed mid-probe leaves (its PID is in the name, and dead): the next probe removes it.
  mkdirSync(join(tmpdir(), "microvpc-kvm-probe-999999999-stale"), { recursive: true });
  const dirs = probeDirs().filter((n) => !n.includes("-999999999-"));
  // Same argv, but TCG (-cpu max for host) and paused (-S): QEMU runs, the guest never prints.
  const w = wrapper("paused-qemu", `for a; do shift; case "$a" in kvm) a=tcg ;; host) a=max ;; esac; set -- "$@" "$a"; done\nexec ${QEMU_BIN} "$@" -S`);
  const t0 = Date.now();
  const r = await bootKvmProbe(guest!, 1500, w);
  assert.equal(r.kind, "timeout", JSON.stringify(r));
  assert.ok(Date.now() - t0 >= 1500 && Date.now() - t0 < 10_000, `${Date.now() - t0} ms`);
  assert.deepEqual(probeProcs(), [], "the probe VM is gone");
  assert.deepEqual(probeDirs(), dirs, "its files are gone");
});

test.skipIf(skip)("a QEMU that exits at once: the outcome carries its status and message", { timeout: 30_000 }, async () => {
  const w = wrapper("refusing-qemu", `echo "qemu-system-x86_64: -accel kvm: failed to initialize kvm: Permission denied" >&2\nexit 3`);
  const r = await bootKvmProbe(guest!, 5000, w);
  assert.equal(r.kind, "exited", JSON.stringify(r));
  if (r.kind !== "exited") return;
  assert.equal(r.status, "3");
  assert.match(r.stderr, /failed to initialize kvm: Permission denied/);
  const d = await probeAccel({ env: undefined, openKvm: () => "ok", guest: () => guest, bootKvm: async () => r });
  assert.equal(d.accel, "tcg");
  assert.match(d.reason, /^QEMU refused -accel kvm: it exited \(3\) before the guest reached init: .*Permission denied/);
});

test.skipIf(skip)(
  "this machine: KVM only if the guest reached init under it; TCG otherwise, with the reason, within the probe's limit",
  { timeout: 60_000 },
  async (t) => {
    const t0 = Date.now();
    const d = await probeAccel({ ...machineDeps(), env: undefined });
    await t.annotate(`${d.accel}: ${d.reason} (${Date.now() - t0} ms)`);
    assert.ok(Date.now() - t0 < 20_000, "bounded");
    assert.ok(d.reason.length > 0);
    if (d.accel === "kvm") assert.match(d.reason, /reached init under KVM/);
    assert.deepEqual(probeProcs(), []);
  },
);
