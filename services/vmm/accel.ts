// Which accelerator kind=qemu guests get: KVM only when KVM is proved to boot
// the real guest, else TCG, always with a reason.
//
// "/dev/kvm opens and QEMU accepts -accel kvm" is not proof. Where KVM is
// itself nested in another hypervisor (the test machines: an L1 VM whose
// KVM is the kvm_pvm module, PVM, because the L0 hides SVM/VMX), QEMU starts
// and SeaBIOS runs, but an unmodified guest kernel runs orders of magnitude
// slower than under TCG: it seems to hang right after "Probing EDD" (it is
// in the bzImage decompressor) and reaches init only minutes later, if at
// all. So the probe boots what the VMs boot: the guest kernel and initramfs
// of deploy/guest/build.sh, with the argv a VM gets (qemuArgv with
// -accel kvm; only the NIC's backend is a hub port instead of a TAP, which
// needs a namespace and an AttachNic), and requires the guest's /init to
// print its first line (MVPC-NET) on the serial console within a few
// seconds (PROBE_TIMEOUT_MS; a working KVM needs well under one). The probe
// VM is then stopped by its PID (SIGTERM, SIGKILL after 5 s) and, started
// under `setpriv --pdeathsig KILL`, cannot outlive the vmm either.
//
// The answer is cached for the life of the process, except "no guest
// built yet" (asked again next time), and logged once. The vmm starts the
// probe at start-up (startAccelProbe) so CreateVm finds it done, or waits for
// the one in flight. $MICROVPC_QEMU_ACCEL=kvm|tcg skips it.
import type { ChildProcess } from "node:child_process";
import { runSync, startDaemon } from "../common/exec.js";
import { closeSync, constants, mkdtempSync, openSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Logger } from "pino";
import { ANSI_ESCAPE, guestCmdline, guestImage, pidAlive, QEMU_BIN, qemuArgv, vmProcess, type Accel } from "./qemu.js";

export interface AccelDecision {
  accel: Accel;
  /** Why: "forced by MICROVPC_QEMU_ACCEL", "no /dev/kvm", "the guest reached init under KVM in 640 ms", … */
  reason: string;
  /** False when the answer may change without a restart (no guest built yet): not cached. */
  final: boolean;
  /** What the probe took (0 when nothing was booted). */
  probeMs: number;
}

/** How the probe VM under -accel kvm ended. */
export type KvmBootOutcome =
  /** /init printed its first line: `line`. */
  | { kind: "init"; ms: number; line: string }
  /** QEMU exited first (it refused -accel kvm or -cpu host, or the guest died). */
  | { kind: "exited"; ms: number; status: string; stderr: string; console: string }
  /** Nothing from /init in time. */
  | { kind: "timeout"; ms: number; console: string }
  /** QEMU could not be started at all. */
  | { kind: "error"; ms: number; message: string };

/** What the decision needs from the machine; faked in the unit tests. */
export interface ProbeDeps {
  /** $MICROVPC_QEMU_ACCEL. */
  env: string | undefined;
  /** "ok", "missing", or why /dev/kvm does not open read-write. */
  openKvm(): string;
  /** The built guest, or null. */
  guest(): { kernel: string; initrd: string } | null;
  /** Boots the guest under -accel kvm with this argv; `consoleLog` is where its serial console goes. */
  bootKvm(guest: { kernel: string; initrd: string }, timeoutMs: number): Promise<KvmBootOutcome>;
}

export const ENV = "MICROVPC_QEMU_ACCEL";
/** Seconds a guest gets to reach init under KVM: working KVM takes well under one; TCG takes several. */
export const PROBE_TIMEOUT_MS = 8000;
/** What the probe guest's /init prints first: it got through the kernel and the initramfs to PID 1. */
export const INIT_MARKER = /MVPC-NET /;
/** The probe guest's ip= (TEST-NET-1: nothing is reachable; the NIC is a hub port with no host side). */
const PROBE_IP = "ip=192.0.2.2::192.0.2.1:255.255.255.0:kvm-probe:eth0:off";

const secs = (ms: number) => `${Math.round(ms / 100) / 10} s`;

/** The last non-empty console line, without terminal escapes, for a reason. */
export function lastLine(text: string): string {
  const lines = text
    .split(/\r?\n/)
    .map((l) => l.replace(ANSI_ESCAPE, "").trim())
    .filter(Boolean);
  const l = lines.at(-1) ?? "";
  return l.length > 160 ? `${l.slice(0, 160)}…` : l;
}

/** The decision for an env value alone: kvm|tcg forces it; anything else is ignored (with a note). */
export function forcedAccel(env: string | undefined): AccelDecision | null {
  if (env === "kvm" || env === "tcg") return { accel: env, reason: `forced by ${ENV}`, final: true, probeMs: 0 };
  return null;
}

/**
 * The decision, in order: the env override; /dev/kvm present; /dev/kvm
 * opens read-write; a guest is built; that guest reaches init under KVM
 * within timeoutMs. Every "no" is TCG with the reason.
 */
export async function probeAccel(d: ProbeDeps, timeoutMs = PROBE_TIMEOUT_MS): Promise<AccelDecision> {
  const forced = forcedAccel(d.env);
  if (forced) return forced;
  const note = d.env ? `${ENV}=${JSON.stringify(d.env)} ignored (use kvm or tcg); ` : "";
  const tcg = (reason: string, final = true, probeMs = 0): AccelDecision => ({ accel: "tcg", reason: `${note}${reason}`, final, probeMs });
  const kvm = d.openKvm();
  if (kvm === "missing") return tcg("no /dev/kvm");
  if (kvm !== "ok") return tcg(`/dev/kvm not openable: ${kvm}`);
  const guest = d.guest();
  if (!guest) return tcg("no guest kernel built (deploy/guest/build.sh), so KVM could not be proved; probed again at the next VM", false);
  const r = await d.bootKvm(guest, timeoutMs);
  switch (r.kind) {
    case "init":
      return { accel: "kvm", reason: `${note}the guest kernel reached init under KVM in ${r.ms} ms`, final: true, probeMs: r.ms };
    case "error":
      return tcg(`QEMU could not be started for the KVM probe: ${r.message}`, true, r.ms);
    case "exited": {
      const said = firstError(r.stderr);
      const where = lastLine(r.console);
      return tcg(
        `QEMU refused -accel kvm: it exited (${r.status}) before the guest reached init${said ? `: ${said}` : ""}${where ? ` (console: ${JSON.stringify(where)})` : ""}`,
        true,
        r.ms,
      );
    }
    case "timeout": {
      const where = lastLine(r.console);
      return tcg(`the guest kernel did not reach init under KVM within ${secs(timeoutMs)} (console: ${where ? JSON.stringify(where) : "nothing"})`, true, r.ms);
    }
  }
}

/** QEMU's message, without its warnings (e.g. "hub 0 is not connected to host network"). */
function firstError(stderr: string): string {
  const lines = stderr
    .split("\n")
    .map((l) => l.trim())
    .filter(Boolean);
  const errs = lines.filter((l) => !/warning:/i.test(l));
  const s = (errs.length ? errs : lines).slice(0, 2).join(" | ");
  return s.length > 300 ? `${s.slice(0, 300)}…` : s;
}

// ---------------------------------------------------------------------------
// The probe VM (not pure)

/**
 * The probe VM's QEMU argv: exactly what qemuArgv gives a VM under KVM
 * (machine, -cpu host, 1 vCPU and 256 MiB as CreateVm's defaults, the guest
 * kernel, initrd and command line, serial console, QMP, virtio-net), except
 * the NIC's backend: a hub port rather than a TAP in a VPC namespace.
 */
export function kvmProbeArgv(guest: { kernel: string; initrd: string }, dir: string): string[] {
  const argv = qemuArgv({
    accel: "kvm",
    netns: "kvm-probe",
    tap: "kvmprobe0",
    mac: "02:00:00:00:00:01",
    kernel: guest.kernel,
    initrd: guest.initrd,
    // The VMs' command line, powering off after MVPC-DONE (QEMU exits under -no-reboot).
    cmdline: guestCmdline({ ipArg: PROBE_IP, done: "poweroff" }),
    vcpus: 1,
    memoryMib: 256,
    consoleLog: join(dir, "console.log"),
    name: "microvpc-kvm-probe",
  });
  const i = argv.findIndex((a, j) => argv[j - 1] === "-netdev" && a.startsWith("tap,"));
  if (i < 0) throw new Error("kvmProbeArgv: qemuArgv has no -netdev tap");
  argv[i] = "hubport,id=n0,hubid=0";
  return argv;
}

let setprivOk: boolean | undefined;
function hasSetpriv(): boolean {
  setprivOk ??= runSync("setpriv", ["--pdeathsig", "KILL", "--", "true"], { timeoutMs: 5000, check: false }).exitCode === 0;
  return setprivOk;
}

/** Boots the probe VM under KVM, waits for INIT_MARKER, stops it by PID, removes its files. */
export async function bootKvmProbe(guest: { kernel: string; initrd: string }, timeoutMs: number, qemu = QEMU_BIN): Promise<KvmBootOutcome> {
  const t0 = Date.now();
  const ms = () => Date.now() - t0;
  let dir: string;
  try {
    // The folder is named after this process: one a vmm killed mid-probe left is removed by the next probe.
    const base = tmpdir();
    for (const n of readdirSync(base)) {
      const m = /^microvpc-kvm-probe-(\d{1,10})-/.exec(n);
      if (m && !pidAlive(Number(m[1]))) rmSync(join(base, n), { recursive: true, force: true });
    }
    dir = mkdtempSync(join(base, `microvpc-kvm-probe-${process.pid}-`));
  } catch (e) {
    return { kind: "error", ms: ms(), message: `temporary folder: ${(e as Error).message}` };
  }
  const consoleLog = join(dir, "console.log");
  const errLog = join(dir, "qemu.log");
  try {
    const argv = kvmProbeArgv(guest, dir);
    // setpriv execs QEMU, so the PID is QEMU's; --pdeathsig ends it if the vmm dies first.
    const [file, args] = hasSetpriv() ? ["setpriv", ["--pdeathsig", "KILL", "--", qemu, ...argv]] : [qemu, argv];
    const fd = openSync(errLog, "w");
    let child: ChildProcess;
    try {
      ({ proc: child } = await startDaemon(file as string, args as string[], { stdio: ["ignore", fd, fd] }));
    } catch (e) {
      return { kind: "error", ms: ms(), message: (e as Error).message };
    } finally {
      closeSync(fd);
    }
    if (child.pid === undefined) return { kind: "error", ms: ms(), message: "QEMU has no PID" };
    const vm = vmProcess(child.pid, consoleLog, { proc: child, stderrLog: errLog });
    try {
      const line = await vm.waitFor(INIT_MARKER, timeoutMs);
      return { kind: "init", ms: ms(), line };
    } catch {
      const text = vm.console();
      if (vm.exited()) {
        // Let the exit status land.
        for (let i = 0; i < 20 && child.exitCode === null && child.signalCode === null; i++) await new Promise((r) => setTimeout(r, 10));
        return { kind: "exited", ms: ms(), status: String(child.exitCode ?? child.signalCode ?? "?"), stderr: read(errLog), console: text };
      }
      return { kind: "timeout", ms: ms(), console: text };
    } finally {
      await vm.stop().catch(() => undefined);
    }
  } catch (e) {
    return { kind: "error", ms: ms(), message: (e as Error).message };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

function read(path: string): string {
  try {
    return readFileSync(path, "utf8");
  } catch {
    return "";
  }
}

/** The machine's facts, for probeAccel. */
export function machineDeps(qemu = QEMU_BIN): ProbeDeps {
  return {
    env: process.env[ENV],
    openKvm() {
      try {
        closeSync(openSync("/dev/kvm", constants.O_RDWR));
        return "ok";
      } catch (e) {
        const err = e as NodeJS.ErrnoException;
        return err.code === "ENOENT" ? "missing" : `${err.code ?? "error"}: ${err.message.replace(/^\w+: /, "").replace(/, open '\/dev\/kvm'$/, "")}`;
      }
    },
    guest: () => guestImage(),
    bootKvm: (g, t) => bootKvmProbe(g, t, qemu),
  };
}

// ---------------------------------------------------------------------------
// The per-process answer

/** A cached probe: one in flight at a time, the answer kept while final, logged once per answer. */
export function accelProbe(deps: () => ProbeDeps, timeoutMs = () => PROBE_TIMEOUT_MS) {
  let cached: Promise<AccelDecision> | undefined;
  let log: Logger | undefined;
  return {
    /** Where the answer is logged (the vmm's logger). */
    setLogger(l: Logger) {
      log = l;
    },
    /** The answer: the env override if set, else the cached or in-flight probe, else a new one. */
    get(o: { refresh?: boolean } = {}): Promise<AccelDecision> {
      const d = deps();
      const forced = forcedAccel(d.env);
      if (forced) return Promise.resolve(forced);
      if (cached && !o.refresh) return cached;
      const p = probeAccel(d, timeoutMs())
        .catch((e): AccelDecision => ({ accel: "tcg", reason: `the KVM probe failed: ${(e as Error).message}`, final: false, probeMs: 0 }))
        .then((r) => {
          if (!r.final && cached === p) cached = undefined;
          const fields = { accel: r.accel, reason: r.reason, probeMs: r.probeMs };
          if (r.accel === "kvm") log?.info(fields, "kind=qemu guests run under KVM");
          else if (!r.final) log?.info(fields, "kind=qemu guests run under TCG for now");
          else log?.warn(fields, "kind=qemu guests run under TCG (software emulation)");
          return r;
        });
      cached = p;
      return p;
    },
  };
}

function envTimeout(): number {
  const v = Number(process.env.MICROVPC_KVM_PROBE_MS);
  return Number.isInteger(v) && v >= 500 && v <= 120_000 ? v : PROBE_TIMEOUT_MS;
}

const processProbe = accelProbe(() => machineDeps(), envTimeout);

/** This process's accelerator for kind=qemu, with the reason (probed once; see the top of this file). */
export function qemuAccel(o: { refresh?: boolean } = {}): Promise<AccelDecision> {
  return processProbe.get(o);
}

/** At vmm start-up: probe in the background, logging the answer, so CreateVm need not wait for it. */
export function startAccelProbe(log: Logger): void {
  processProbe.setLogger(log);
  qemuAccel().catch((e) => log.error({ err: (e as Error).message }, "KVM probe failed"));
}
