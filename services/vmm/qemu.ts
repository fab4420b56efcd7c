// kind=qemu: the thin runner that boots a real guest on a NIC's TAP.
//
// QEMU runs inside the VPC's namespace (`ip netns exec NS qemu-system-x86_64
// …`, which execs, so the PID we keep is QEMU's own) and opens the TAP that
// netagent's AttachNic(kind=TAP) created there by name:
//   -netdev tap,id=n0,ifname=TAP,script=no,downscript=no
//   -device virtio-net-pci,netdev=n0,mac=MAC
// The guest (deploy/guest/build.sh: Debian's cloud kernel and a busybox
// initramfs) configures eth0 from the `ip=` kernel argument netagent returns
// (guest.kernel_ip_arg) and reports on its serial console, which goes to a
// file (consoleLog) that waitFor() reads.
//
// Pure parts (argument and command-line builders, validation, parsers of the
// guest's console lines) are separate from the part that spawns, and are
// unit-tested (test/unit/qemu.test.ts). Commands are argument arrays; QEMU is
// stopped by its PID only.
import type { ChildProcess } from "node:child_process";
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, rmSync } from "node:fs";
import { connect } from "node:net";
import { dirname, isAbsolute } from "node:path";
import { run, startDaemon } from "../common/exec.js";
import { qemuAccel } from "./accel.js";

/** A terminal escape sequence (CSI or a two-byte escape), as the guest's console may print. */
// eslint-disable-next-line no-control-regex -- the escape character is what this matches
export const ANSI_ESCAPE = /\x1b(\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_a-z])/g;

export type Accel = "kvm" | "tcg";

/** The QEMU binary: $MICROVPC_QEMU or qemu-system-x86_64 on PATH. */
export const QEMU_BIN = process.env.MICROVPC_QEMU || "qemu-system-x86_64";

/** Where deploy/guest/build.sh puts the guest: $MICROVPC_GUEST_DIR or /var/cache/microvpc/guest. */
export function guestDir(): string {
  return process.env.MICROVPC_GUEST_DIR || "/var/cache/microvpc/guest";
}

/** The built guest's kernel and initrd, or null if build.sh has not run. */
export function guestImage(dir = guestDir()): { kernel: string; initrd: string } | null {
  const kernel = `${dir}/vmlinuz`;
  const initrd = `${dir}/initrd.img`;
  return existsSync(kernel) && existsSync(initrd) ? { kernel, initrd } : null;
}

// ---------------------------------------------------------------------------
// Options and validation (pure)

export interface QemuOptions {
  /** The VPC namespace: a name (`mvpc-<host>-<vpc>`) or a path (/run/netns/NAME, /proc/PID/ns/net): AttachNic's vpc_netns_path works as is. */
  netns: string;
  /** The TAP in that namespace (AttachNic's host_interface). */
  tap: string;
  /** The guest's MAC (AttachNic's guest.mac). */
  mac: string;
  /** Kernel (bzImage) and initrd, absolute paths: guestImage(). */
  kernel: string;
  initrd: string;
  /** Kernel command line: guestCmdline(). */
  cmdline: string;
  vcpus: number;
  memoryMib: number;
  /** File the serial console goes to (absolute; its folder is created). */
  consoleLog: string;
  /** Default: qemuAccel() (KVM only if it boots this guest to init; else TCG). */
  accel?: Accel;
  /** `-name`, visible in ps and /proc/PID/cmdline (adoptQemu checks it). Default `microvpc-<tap>`. */
  name?: string;
  /** QMP socket (used to know QEMU is up). Default `<consoleLog>.qmp`. */
  qmpSocket?: string;
  /** QEMU's own stdout/stderr. Default `<consoleLog>.qemu`. */
  stderrLog?: string;
  /** Binary. Default QEMU_BIN. */
  qemu?: string;
}

const IFNAME_RE = /^[A-Za-z][A-Za-z0-9_.-]{0,14}$/;
const MAC_RE = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/i;
const NETNS_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$/;
const NETNS_PATH_RE = /^(\/(?:var\/)?run\/netns\/([A-Za-z0-9][A-Za-z0-9_.-]{0,200})|\/proc\/[0-9]{1,10}\/ns\/net)$/;
// QEMU splits option values at commas (",," escapes one); paths we pass are
// plain, so anything outside this set is refused rather than escaped.
const PATH_RE = /^\/[A-Za-z0-9_./+@-]{1,250}$/;
const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;
/** x86's COMMAND_LINE_SIZE is 2048 including the NUL. */
export const MAX_CMDLINE = 2047;

function fail(field: string, msg: string): never {
  throw new Error(`${field}: ${msg}`);
}

/** Throws an Error naming the field for anything QEMU or the kernel would reject or misread. */
export function validateQemuOptions(o: QemuOptions): void {
  if (!NETNS_NAME_RE.test(o.netns) && !NETNS_PATH_RE.test(o.netns))
    fail("netns", `${JSON.stringify(o.netns)} is neither a namespace name nor /run/netns/NAME or /proc/PID/ns/net`);
  if (o.netns.includes("/") && !NETNS_PATH_RE.test(o.netns)) fail("netns", `${JSON.stringify(o.netns)}: use /run/netns/NAME or /proc/PID/ns/net`);
  if (!IFNAME_RE.test(o.tap)) fail("tap", `${JSON.stringify(o.tap)} is not an interface name`);
  if (!MAC_RE.test(o.mac)) fail("mac", `${JSON.stringify(o.mac)} is not a MAC address (aa:bb:cc:dd:ee:ff)`);
  if (parseInt(o.mac.slice(0, 2), 16) & 1) fail("mac", `${o.mac} is a multicast address`);
  for (const f of ["kernel", "initrd", "consoleLog"] as const) {
    if (!PATH_RE.test(o[f]) || o[f].includes("..")) fail(f, `${JSON.stringify(o[f])}: an absolute path of letters, digits and _ . / + @ -`);
  }
  for (const f of ["qmpSocket", "stderrLog"] as const) {
    const v = o[f];
    if (v !== undefined && (!PATH_RE.test(v) || v.includes(".."))) fail(f, `${JSON.stringify(v)}: an absolute path of letters, digits and _ . / + @ -`);
  }
  if (qmpPath(o).length > 100) fail("qmpSocket", `${qmpPath(o)} is longer than a unix socket path may be (100)`);
  if (o.name !== undefined && !NAME_RE.test(o.name)) fail("name", `${JSON.stringify(o.name)}: 1–63 of letters, digits and _ . -`);
  if (o.cmdline.length > MAX_CMDLINE) fail("cmdline", `${o.cmdline.length} characters; the kernel takes at most ${MAX_CMDLINE}`);
  if (!/^[\x20-\x7e]*$/.test(o.cmdline)) fail("cmdline", "printable ASCII only (no newlines or control characters)");
  if (!Number.isInteger(o.vcpus) || o.vcpus < 1 || o.vcpus > 64) fail("vcpus", `${o.vcpus}: use 1–64`);
  if (!Number.isInteger(o.memoryMib) || o.memoryMib < 64 || o.memoryMib > 262144)
    fail("memoryMib", `${o.memoryMib}: use 64–262144 (the guest kernel needs at least 64)`);
  if (o.accel !== undefined && o.accel !== "kvm" && o.accel !== "tcg") fail("accel", `${JSON.stringify(o.accel)}: kvm or tcg`);
}

function qmpPath(o: Pick<QemuOptions, "qmpSocket" | "consoleLog">): string {
  return o.qmpSocket ?? `${o.consoleLog}.qmp`;
}

function stderrPath(o: Pick<QemuOptions, "stderrLog" | "consoleLog">): string {
  return o.stderrLog ?? `${o.consoleLog}.qemu`;
}

// ---------------------------------------------------------------------------
// Argument builders (pure)

/** QEMU's arguments (without the binary) for these options. */
export function qemuArgv(o: QemuOptions & { accel: Accel }): string[] {
  validateQemuOptions(o);
  const name = o.name ?? `microvpc-${o.tap}`;
  return [
    "-name",
    name,
    "-M",
    "q35",
    "-accel",
    o.accel,
    ...(o.accel === "kvm" ? ["-cpu", "host"] : []),
    "-smp",
    String(o.vcpus),
    "-m",
    String(o.memoryMib),
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    "-display",
    "none",
    "-no-reboot",
    "-kernel",
    o.kernel,
    "-initrd",
    o.initrd,
    "-append",
    o.cmdline,
    "-chardev",
    `file,id=con0,path=${o.consoleLog}`,
    "-serial",
    "chardev:con0",
    "-chardev",
    `socket,id=qmp0,path=${qmpPath(o)},server=on,wait=off`,
    "-mon",
    "chardev=qmp0,mode=control",
    "-netdev",
    `tap,id=n0,ifname=${o.tap},script=no,downscript=no`,
    "-device",
    `virtio-net-pci,netdev=n0,mac=${o.mac.toLowerCase()}`,
  ];
}

/**
 * The command that runs `bin args…` inside a network namespace, as an
 * argument array: `ip netns exec NAME …` for a name (or /run/netns/NAME),
 * `nsenter --net=PATH -- …` for /proc/PID/ns/net. Both exec, so the PID of
 * the spawned process is that of `bin`.
 */
export function inNetns(netns: string, bin: string, args: string[]): { file: string; args: string[] } {
  const m = NETNS_PATH_RE.exec(netns);
  if (m && m[2]) return { file: "ip", args: ["netns", "exec", m[2], bin, ...args] };
  if (m) return { file: "nsenter", args: [`--net=${netns}`, "--", bin, ...args] };
  if (!NETNS_NAME_RE.test(netns)) fail("netns", `${JSON.stringify(netns)} is not a namespace name`);
  return { file: "ip", args: ["netns", "exec", netns, bin, ...args] };
}

// ---------------------------------------------------------------------------
// The guest's kernel command line and console (pure)

export interface GuestCmdlineOptions {
  /** netagent's guest.kernel_ip_arg: `ip=<client>::<gw>:<netmask>:<host>:<dev>:off[:<dns>]`. */
  ipArg: string;
  /**
   * Checks the guest runs once, in order: "ping:IP", "tcp:IP:PORT",
   * "http:HOST[:PORT]/PATH"; each is retried (1 s apart) until it passes, up
   * to `tries` times, or N times with a "~N" suffix ("tcp:10.0.2.4:22~1": a
   * check expected to fail need not wait).
   */
  checks?: string[];
  /** Ports the guest serves HTTP on (busybox httpd). */
  listen?: number[];
  /** Tries per check until it passes (1–99; the guest's default is 3). */
  tries?: number;
  /** After MVPC-DONE: keep running (default) or power off (QEMU exits under -no-reboot). */
  done?: "idle" | "poweroff";
  /** Power off this many seconds after MVPC-DONE (1–99999): a VM whose owner died ends by itself. */
  ttlSeconds?: number;
  /** The serial console device: ttyS0 (QEMU's and Firecracker's 8250). */
  console?: string;
  /** Extra kernel arguments (each one word), e.g. Firecracker's "pci=off". */
  extra?: string[];
}

const CHECK_RE = /^(ping:\d{1,3}(\.\d{1,3}){3}|tcp:\d{1,3}(\.\d{1,3}){3}:\d{1,5}|http:[A-Za-z0-9.-]+(:\d{1,5})?(\/[A-Za-z0-9._\-/?=&%]*)?)(~[1-9]\d?)?$/;
const WORD_RE = /^[\x21-\x7e]+$/;

/** The kernel command line for the microvpc guest. */
export function guestCmdline(o: GuestCmdlineOptions): string {
  const ip = parseKernelIpArg(o.ipArg); // throws on a malformed one
  if (!ip) fail("ipArg", `${JSON.stringify(o.ipArg)} is not an ip= argument`);
  const words = [`console=${o.console ?? "ttyS0"}`, "quiet", "loglevel=3", "panic=-1", o.ipArg];
  for (const c of o.checks ?? []) {
    if (!CHECK_RE.test(c)) fail("checks", `${JSON.stringify(c)}: use ping:IP, tcp:IP:PORT or http:HOST[:PORT]/PATH`);
    words.push(`mvpc.check=${c}`);
  }
  for (const p of o.listen ?? []) {
    if (!Number.isInteger(p) || p < 1 || p > 65535) fail("listen", `${p}: a port 1–65535`);
    words.push(`mvpc.listen=${p}`);
  }
  if (o.tries !== undefined) {
    if (!Number.isInteger(o.tries) || o.tries < 1 || o.tries > 99) fail("tries", `${o.tries}: use 1–99`);
    words.push(`mvpc.tries=${o.tries}`);
  }
  if (o.done === "poweroff") words.push("mvpc.done=poweroff");
  if (o.ttlSeconds !== undefined) {
    if (!Number.isInteger(o.ttlSeconds) || o.ttlSeconds < 1 || o.ttlSeconds > 99999) fail("ttlSeconds", `${o.ttlSeconds}: use 1–99999`);
    words.push(`mvpc.ttl=${o.ttlSeconds}`);
  }
  for (const e of o.extra ?? []) {
    if (!WORD_RE.test(e)) fail("extra", `${JSON.stringify(e)}: one word of printable ASCII`);
    words.push(e);
  }
  const s = words.join(" ");
  if (s.length > MAX_CMDLINE) fail("cmdline", `${s.length} characters; the kernel takes at most ${MAX_CMDLINE}`);
  return s;
}

export interface KernelIpConfig {
  client: string;
  server: string;
  gateway: string;
  netmask: string;
  hostname: string;
  device: string;
  autoconf: string;
  dns: string[];
}

/** Parses `ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>[:<dns0>[:<dns1>]]` (the guest's /init reads the same fields). */
export function parseKernelIpArg(arg: string): KernelIpConfig | null {
  if (!arg.startsWith("ip=") || !WORD_RE.test(arg)) return null;
  const f = arg.slice(3).split(":");
  if (f.length > 10) return null;
  const [client = "", server = "", gateway = "", netmask = "", hostname = "", device = "", autoconf = "", dns0 = "", dns1 = ""] = f;
  const ipv4 = (s: string) => /^\d{1,3}(\.\d{1,3}){3}$/.test(s) && s.split(".").every((x) => Number(x) <= 255);
  if (!ipv4(client)) return null;
  for (const a of [server, gateway, netmask, dns0, dns1]) if (a !== "" && !ipv4(a)) return null;
  return { client, server, gateway, netmask, hostname, device, autoconf, dns: [dns0, dns1].filter(Boolean) };
}

export interface CheckResult {
  kind: string;
  target: string;
  ok: boolean;
  /** "ok", "fail" or "error". */
  status: string;
  /** For http: the body (one line, at most 512 bytes). */
  body?: string;
}

export interface GuestReport {
  /** `MVPC-NET <dev> <addr/prefix> gw <gw> mac <mac>`, if the guest got that far. */
  net?: { device: string; address: string; gateway: string; mac: string };
  netError?: string;
  listening: number[];
  checks: CheckResult[];
  done: boolean;
}

/** Reads the guest's MVPC- lines out of its console text (kernel messages and partial lines are skipped). */
export function parseGuestConsole(text: string): GuestReport {
  const r: GuestReport = { listening: [], checks: [], done: false };
  for (const raw of text.split(/\r?\n/)) {
    // Firmware may leave terminal escapes before the first line: start at the marker.
    const at = raw.indexOf("MVPC-");
    if (at < 0) continue;
    const line = raw.slice(at).trim();
    let m: RegExpExecArray | null;
    if ((m = /^MVPC-NET (\S+) (\S+) gw (\S+) mac (\S+)$/.exec(line))) r.net = { device: m[1], address: m[2], gateway: m[3], mac: m[4] };
    else if ((m = /^MVPC-NET (error .*|none.*)$/.exec(line))) r.netError = m[1];
    else if ((m = /^MVPC-LISTEN (\d+)$/.exec(line))) r.listening.push(Number(m[1]));
    else if ((m = /^MVPC-CHECK (\S+) (\S+) (ok|fail|error)(?: (.*))?$/.exec(line))) {
      const c: CheckResult = { kind: m[1], target: m[2], ok: m[3] === "ok", status: m[3] };
      if (m[1] === "http" && m[3] === "ok") c.body = (m[4] ?? "").trim();
      r.checks.push(c);
    } else if (line === "MVPC-DONE") r.done = true;
  }
  return r;
}

// ---------------------------------------------------------------------------
// Acceleration: accel.ts (qemuAccel) boots this guest under KVM to decide.

// ---------------------------------------------------------------------------
// Running QEMU

export interface VmProcess {
  pid: number;
  consoleLog: string;
  /** The child, when this process started it (not for adopted ones). */
  proc?: ChildProcess;
  /** True once the process is gone. */
  exited(): boolean;
  /** SIGTERM by PID, SIGKILL after 5 s; resolves when it is gone. */
  stop(): Promise<void>;
  /**
   * Resolves with the console line where `re` first matches (tested against
   * the whole console text, so it may span lines); rejects on timeout or if
   * the VM exits first, with the console's tail in the message.
   */
  waitFor(re: RegExp, timeoutMs: number): Promise<string>;
  /** The console text so far. */
  console(): string;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
  // A zombie (exited, not yet reaped) is gone for our purposes.
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z";
  } catch {
    return false;
  }
}

function readText(path: string): string {
  try {
    return readFileSync(path, "latin1");
  } catch {
    return "";
  }
}

/** A console line without terminal escapes (firmware clears the screen before the guest's first line) or a trailing CR. */
export function stripEscapes(line: string): string {
  return line.replace(ANSI_ESCAPE, "").replace(/\r$/, "");
}

function tail(s: string, n = 1500): string {
  return s.length > n ? `…${s.slice(-n)}` : s;
}

/** A handle on a VM process (ours or adopted): waitFor reads consoleLog, stop signals the PID. */
export function vmProcess(
  pid: number,
  consoleLog: string,
  opts: {
    /** Our child: its exit is known for sure. */
    proc?: ChildProcess;
    /** For a process we did not start: is this PID still that VM? Checked before every signal, so a reused PID is never signalled. */
    verify?: () => boolean;
    stderrLog?: string;
    onStopped?: () => void;
  } = {},
): VmProcess {
  const proc = opts.proc;
  let gone = false;
  const exited = () => {
    if (gone) return true;
    if (proc) gone = proc.exitCode !== null || proc.signalCode !== null;
    else gone = !pidAlive(pid) || (opts.verify !== undefined && !opts.verify());
    return gone;
  };
  const why = () => {
    const err = opts.stderrLog ? readText(opts.stderrLog).trim() : "";
    return `${err ? `the VMM said: ${tail(err, 800)}; ` : ""}console: ${tail(readText(consoleLog)) || "(empty)"}`;
  };
  return {
    pid,
    consoleLog,
    proc,
    exited,
    console: () => readText(consoleLog),
    async stop() {
      const waitGone = async (ms: number) => {
        const until = Date.now() + ms;
        for (let i = 0; i < 1000 && Date.now() < until; i++) {
          if (exited()) return true;
          await sleep(20);
        }
        return exited();
      };
      if (!exited()) {
        try {
          process.kill(pid, "SIGTERM");
        } catch {
          // already gone
        }
        if (!(await waitGone(5000))) {
          try {
            if (!exited()) process.kill(pid, "SIGKILL");
          } catch {
            // already gone
          }
          if (!(await waitGone(3000))) throw new Error(`VM process ${pid} did not exit after SIGKILL`);
        }
      }
      opts.onStopped?.();
    },
    async waitFor(re, timeoutMs) {
      const rx = new RegExp(re.source, re.flags.replace(/[gy]/g, ""));
      const until = Date.now() + timeoutMs;
      for (let i = 0; ; i++) {
        const text = readText(consoleLog);
        const m = rx.exec(text);
        if (m) {
          const start = text.lastIndexOf("\n", m.index) + 1;
          const end = text.indexOf("\n", m.index + m[0].length);
          return stripEscapes(text.slice(start, end < 0 ? undefined : end));
        }
        if (exited()) throw new Error(`VM ${pid} exited before ${re} appeared on its console; ${why()}`);
        if (Date.now() >= until || i > 100_000) throw new Error(`timed out after ${timeoutMs} ms waiting for ${re} on the console of VM ${pid}; ${why()}`);
        await sleep(100);
      }
    },
  };
}

/** Connects to a QMP socket, reads the greeting, leaves negotiation mode, runs `execute` and returns its "return". */
export function qmpCommand(socket: string, execute: string, timeoutMs = 3000): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const s = connect(socket);
    let buf = "";
    let step = 0;
    const done = (err: Error | null, v?: unknown) => {
      clearTimeout(t);
      s.destroy();
      if (err) reject(err);
      else resolve(v);
    };
    const t = setTimeout(() => done(new Error(`QMP ${socket}: no answer in ${timeoutMs} ms`)), timeoutMs);
    s.setEncoding("utf8");
    s.on("error", (e) => done(e));
    s.on("close", () => done(new Error(`QMP ${socket}: closed`)));
    s.on("data", (d: string) => {
      buf += d;
      if (buf.length > 1 << 20) return done(new Error(`QMP ${socket}: answer too long`));
      let nl: number;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (!line) continue;
        let msg: Record<string, unknown>;
        try {
          msg = JSON.parse(line);
        } catch {
          return done(new Error(`QMP ${socket}: not JSON: ${line.slice(0, 200)}`));
        }
        if ("event" in msg) continue;
        if ("error" in msg) return done(new Error(`QMP ${execute}: ${JSON.stringify(msg.error)}`));
        if (step === 0 && "QMP" in msg) {
          step = 1;
          s.write(JSON.stringify({ execute: "qmp_capabilities" }) + "\n");
        } else if (step === 1 && "return" in msg) {
          step = 2;
          s.write(JSON.stringify({ execute }) + "\n");
        } else if (step === 2 && "return" in msg) {
          return done(null, msg.return);
        }
      }
    });
  });
}

/**
 * Throws unless `tap` exists in the namespace and is a TAP (tun) device.
 * Read-only (`ip -d -j link show dev TAP` in the namespace).
 */
export async function assertTap(netns: string, tap: string): Promise<void> {
  if (!IFNAME_RE.test(tap)) fail("tap", `${JSON.stringify(tap)} is not an interface name`);
  const cmd = inNetns(netns, "ip", ["-d", "-j", "link", "show", "dev", tap]);
  const r = await run(cmd.file, cmd.args, { timeoutMs: 10_000, killSignal: "SIGKILL", check: false });
  if (r.exitCode !== 0) {
    throw new Error(
      `TAP ${tap} does not exist in ${netns}: attach the NIC first (netagent AttachNic, kind=TAP)${r.stderr.trim() ? ` (${r.stderr.trim()})` : ""}`,
    );
  }
  let kind: string | undefined;
  try {
    kind = (JSON.parse(r.stdout) as { linkinfo?: { info_kind?: string } }[])[0]?.linkinfo?.info_kind;
  } catch {
    kind = undefined;
  }
  if (kind !== "tun") throw new Error(`${tap} in ${netns} is not a TAP (it is ${kind ?? "of unknown kind"})`);
}

/**
 * Starts QEMU in the VPC namespace on the TAP and resolves once QEMU is up
 * (its QMP monitor answers, so the TAP is open and the guest is running);
 * rejects, with QEMU's own message, if it exits first or is not up in 15 s.
 * QEMU is started detached (own process group, not tied to the caller's
 * life): a vmm restart does not take its VMs down; adoptQemu() finds them
 * again. The caller stops it with stop().
 */
export async function startQemu(o: QemuOptions & { startTimeoutMs?: number }): Promise<VmProcess> {
  const accel = o.accel ?? (await qemuAccel()).accel;
  const args = qemuArgv({ ...o, accel });
  for (const f of [o.kernel, o.initrd]) if (!existsSync(f)) throw new Error(`${f} does not exist: run deploy/guest/build.sh`);
  // QEMU, as root, would create a missing TAP itself: a NIC on no bridge.
  await assertTap(o.netns, o.tap);
  const cmd = inNetns(o.netns, o.qemu ?? QEMU_BIN, args);
  const qmp = qmpPath(o);
  const errLog = stderrPath(o);
  for (const p of [o.consoleLog, qmp, errLog]) mkdirSync(dirname(p), { recursive: true });
  rmSync(o.consoleLog, { force: true });
  rmSync(qmp, { force: true });
  const fd = openSync(errLog, "w");
  let child: ChildProcess;
  try {
    // Rejects with an ExecError ("could not start: …") if it cannot be run.
    ({ proc: child } = await startDaemon(cmd.file, cmd.args, { stdio: ["ignore", fd, fd], detached: true }));
  } finally {
    closeSync(fd);
  }
  const vm = vmProcess(child.pid!, o.consoleLog, { proc: child, stderrLog: errLog, onStopped: () => rmSync(qmp, { force: true }) });
  const until = Date.now() + (o.startTimeoutMs ?? 15_000);
  let last: unknown;
  for (let i = 0; i < 1000 && Date.now() < until; i++) {
    if (vm.exited()) {
      const err = readText(errLog).trim();
      throw new Error(`QEMU exited at start (code ${child.exitCode ?? child.signalCode}): ${tail(err, 1500) || "no message"}`);
    }
    if (existsSync(qmp)) {
      try {
        await qmpCommand(qmp, "query-status", 2000);
        return vm;
      } catch (e) {
        last = e;
      }
    }
    await sleep(50);
  }
  await vm.stop().catch(() => undefined);
  throw new Error(
    `QEMU did not come up in ${o.startTimeoutMs ?? 15_000} ms (${last instanceof Error ? last.message : "no QMP socket"}); ${tail(readText(errLog))}`,
  );
}

/**
 * A handle on a QEMU started earlier (by a vmm that has since restarted):
 * checks that the PID is alive and its command line carries `-name NAME`,
 * so a reused PID is never signalled. Null if it is not that VM.
 */
export function adoptQemu(pid: number, name: string, consoleLog: string): VmProcess | null {
  if (!Number.isInteger(pid) || pid <= 1 || !pidAlive(pid)) return null;
  const isIt = () => {
    try {
      const argv = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
      const i = argv.indexOf("-name");
      return i >= 0 && argv[i + 1] === name && /qemu/.test(argv[0] ?? "");
    } catch {
      return false;
    }
  };
  return isIt() ? vmProcess(pid, consoleLog, { verify: isIt }) : null;
}

/** Absolute-path check for callers that build paths from ids. */
export function isSafePath(p: string): boolean {
  return isAbsolute(p) && PATH_RE.test(p) && !p.includes("..");
}
