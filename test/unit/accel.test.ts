// kind=qemu's accelerator decision (services/vmm/accel.ts) with faked
// machines: KVM only when the guest reached init under it; every other
// outcome is TCG with the reason; the env override wins; answers are cached
// (except "no guest built yet") and probed once at a time.
import assert from "node:assert/strict";
import { test } from "vitest";
import { accelProbe, ENV, kvmProbeArgv, lastLine, probeAccel, PROBE_TIMEOUT_MS, type KvmBootOutcome, type ProbeDeps } from "../../services/vmm/accel.js";
import { guestCmdline, qemuArgv } from "../../services/vmm/qemu.js";

const GUEST = { kernel: "/var/cache/microvpc/guest/vmlinuz", initrd: "/var/cache/microvpc/guest/initrd.img" };

/** A machine: /dev/kvm opens, a guest is built, and the KVM boot ends as `boot` says. */
function machine(o: Partial<Omit<ProbeDeps, "bootKvm">> & { boot?: KvmBootOutcome } = {}): ProbeDeps & { boots: number; timeoutMs: number } {
  const m = {
    boots: 0,
    timeoutMs: 0,
    env: o.env,
    openKvm: o.openKvm ?? (() => "ok"),
    guest: o.guest ?? (() => GUEST),
    async bootKvm(g: { kernel: string; initrd: string }, timeoutMs: number): Promise<KvmBootOutcome> {
      m.boots++;
      assert.deepEqual(g, GUEST);
      m.timeoutMs = timeoutMs;
      return o.boot ?? { kind: "init", ms: 640, line: "MVPC-NET eth0 192.0.2.2/24 gw 192.0.2.1 mac 02:00:00:00:00:01" };
    },
  };
  return m;
}

test("the guest reached init under KVM: kvm, with the time it took", async () => {
  const m = machine();
  assert.deepEqual(await probeAccel(m), { accel: "kvm", reason: "the guest kernel reached init under KVM in 640 ms", final: true, probeMs: 640 });
  assert.equal(m.boots, 1);
  assert.equal(m.timeoutMs, PROBE_TIMEOUT_MS);
});

test("no /dev/kvm, or one that does not open: tcg without booting anything", async () => {
  const none = machine({ openKvm: () => "missing" });
  assert.deepEqual(await probeAccel(none), { accel: "tcg", reason: "no /dev/kvm", final: true, probeMs: 0 });
  const denied = machine({ openKvm: () => "EACCES: permission denied" });
  assert.deepEqual(await probeAccel(denied), { accel: "tcg", reason: "/dev/kvm not openable: EACCES: permission denied", final: true, probeMs: 0 });
  assert.equal(none.boots + denied.boots, 0);
});

test("QEMU refuses -accel kvm (exits before init): tcg with QEMU's error, not its warnings", async () => {
  const d = await probeAccel(
    machine({
      boot: {
        kind: "exited",
        ms: 410,
        status: "SIGABRT",
        stderr: "qemu-system-x86_64: warning: hub 0 is not connected to host network\nqemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\n",
        console: "",
      },
    }),
  );
  assert.equal(d.accel, "tcg");
  assert.equal(d.final, true);
  assert.match(d.reason, /^QEMU refused -accel kvm: it exited \(SIGABRT\) before the guest reached init: qemu-system-x86_64: error: failed to set MSR 0x10a/);
  assert.doesNotMatch(d.reason, /hub 0/);
});

test("the guest does not reach init in time (nested KVM): tcg, naming the limit and the console's last line", async () => {
  const d = await probeAccel(machine({ boot: { kind: "timeout", ms: 8100, console: "\x1b[2J\x1b[01;01HProbing EDD (edd=off to disable)... ok\r\n" } }));
  assert.equal(d.accel, "tcg");
  assert.equal(d.reason, `the guest kernel did not reach init under KVM within 8 s (console: "Probing EDD (edd=off to disable)... ok")`);
  assert.equal(d.probeMs, 8100);
  const m = machine({ boot: { kind: "timeout", ms: 5000, console: "" } });
  const silent = await probeAccel(m, 5000);
  assert.equal(m.timeoutMs, 5000);
  assert.match(silent.reason, /within 5 s \(console: nothing\)$/);
});

test("QEMU cannot be started: tcg with the error", async () => {
  const d = await probeAccel(machine({ boot: { kind: "error", ms: 3, message: "spawn qemu-system-x86_64 ENOENT" } }));
  assert.deepEqual(d, { accel: "tcg", reason: "QEMU could not be started for the KVM probe: spawn qemu-system-x86_64 ENOENT", final: true, probeMs: 3 });
});

test("no guest built: tcg, not final (probed again once there is one)", async () => {
  const m = machine({ guest: () => null });
  const d = await probeAccel(m);
  assert.equal(d.accel, "tcg");
  assert.equal(d.final, false);
  assert.match(d.reason, /^no guest kernel built \(deploy\/guest\/build\.sh\)/);
  assert.equal(m.boots, 0);
});

test(`${ENV}=kvm|tcg wins without probing; another value is ignored, and said so`, async () => {
  for (const env of ["kvm", "tcg"] as const) {
    const m = machine({ env, openKvm: () => "missing" });
    assert.deepEqual(await probeAccel(m), { accel: env, reason: `forced by ${ENV}`, final: true, probeMs: 0 });
    assert.equal(m.boots, 0);
  }
  const odd = await probeAccel(machine({ env: "hvf", openKvm: () => "missing" }));
  assert.deepEqual(odd, { accel: "tcg", reason: `${ENV}="hvf" ignored (use kvm or tcg); no /dev/kvm`, final: true, probeMs: 0 });
});

test("accelProbe: one probe in flight, the answer cached and logged once; not-final answers are asked again", async () => {
  let env: string | undefined;
  let guest: typeof GUEST | null = null;
  let boots = 0;
  const logged: [string, Record<string, unknown>, string][] = [];
  const log = {
    info: (f: Record<string, unknown>, m: string) => logged.push(["info", f, m]),
    warn: (f: Record<string, unknown>, m: string) => logged.push(["warn", f, m]),
  };
  const p = accelProbe(() => ({
    env,
    openKvm: () => "ok",
    guest: () => guest,
    bootKvm: async () => {
      boots++;
      await new Promise((r) => setTimeout(r, 20));
      return { kind: "timeout", ms: 20, console: "Probing EDD (edd=off to disable)... ok" };
    },
  }));
  p.setLogger(log as never);
  // No guest yet: TCG, and the next call looks again.
  assert.equal((await p.get()).final, false);
  guest = GUEST;
  const [a, b] = await Promise.all([p.get(), p.get()]);
  assert.equal(boots, 1, "concurrent callers share the probe");
  assert.equal(a, b);
  assert.equal(a.accel, "tcg");
  assert.equal(await p.get(), a, "cached");
  assert.equal(boots, 1);
  assert.deepEqual(
    logged.map(([lvl, f]) => [lvl, f.accel]),
    [
      ["info", "tcg"],
      ["warn", "tcg"],
    ],
    "each answer logged once (a provisional one as info)",
  );
  assert.match(String(logged[1][1].reason), /did not reach init under KVM/);
  // The override wins over the cache, and is not probed.
  env = "kvm";
  assert.deepEqual(await p.get(), { accel: "kvm", reason: `forced by ${ENV}`, final: true, probeMs: 0 });
  assert.equal(boots, 1);
  env = undefined;
  await p.get({ refresh: true });
  assert.equal(boots, 2, "refresh probes again");
});

test("accelProbe: a probe that throws is TCG with the reason, and asked again", async () => {
  let fail = true;
  const p = accelProbe(() => ({
    env: undefined,
    openKvm: () => {
      if (fail) throw new Error("boom");
      return "missing";
    },
    guest: () => GUEST,
    bootKvm: async () => ({ kind: "error", ms: 0, message: "unused" }),
  }));
  assert.deepEqual(await p.get(), { accel: "tcg", reason: "the KVM probe failed: boom", final: false, probeMs: 0 });
  fail = false;
  assert.equal((await p.get()).reason, "no /dev/kvm");
});

test("kvmProbeArgv: the argv a VM gets under KVM (the guest's kernel, initrd, command line, -cpu host), the NIC on a hub port instead of a TAP", () => {
  const p = kvmProbeArgv(GUEST, "/tmp/microvpc-kvm-probe-abc");
  const i = p.indexOf("-netdev");
  assert.equal(p[i + 1], "hubport,id=n0,hubid=0");
  const vm = qemuArgv({
    accel: "kvm",
    netns: "kvm-probe",
    tap: "kvmprobe0",
    mac: "02:00:00:00:00:01",
    ...GUEST,
    cmdline: guestCmdline({ ipArg: "ip=192.0.2.2::192.0.2.1:255.255.255.0:kvm-probe:eth0:off", done: "poweroff" }),
    vcpus: 1,
    memoryMib: 256,
    consoleLog: "/tmp/microvpc-kvm-probe-abc/console.log",
    name: "microvpc-kvm-probe",
  });
  assert.deepEqual(
    p.filter((_, j) => j !== i + 1),
    vm.filter((_, j) => j !== i + 1),
  );
  const at = (f: string) => p[p.indexOf(f) + 1];
  assert.equal(at("-accel"), "kvm");
  assert.equal(at("-cpu"), "host");
  assert.equal(at("-kernel"), GUEST.kernel);
  assert.equal(at("-initrd"), GUEST.initrd);
  assert.match(at("-append"), /^console=ttyS0 .* mvpc\.done=poweroff$/);
  assert.ok(p.includes("-no-reboot"));
});

test("lastLine: the console's last non-empty line without escapes, shortened", () => {
  assert.equal(lastLine("\x1b[2J\x1b[01;01Ha\r\nProbing EDD (edd=off to disable)... ok\r\n\r\n"), "Probing EDD (edd=off to disable)... ok");
  assert.equal(lastLine(""), "");
  assert.equal(lastLine("x".repeat(300)).length, 161);
});
