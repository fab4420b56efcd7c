// kind=firecracker: drives a `firecracker` binary through its API socket.
//
// Firecracker is not in Debian's or npm's registries, so it is used only when
// a binary is on PATH (or named by $MICROVPC_FIRECRACKER); otherwise
// startFirecracker throws a FailedPreconditionError that says so (kind=qemu
// works on any machine with Debian's qemu-system-x86).
//
// Like QEMU, it runs in the VPC's namespace (`ip netns exec NS firecracker
// --api-sock SOCK --id ID`; in production the jailer's `--netns
// /run/netns/NS` does the same, plus the chroot and cgroups), and the NIC is
// the TAP netagent's AttachNic(kind=TAP) made there: network-interfaces
// host_dev_name = the TAP, guest_mac = guest.mac. The guest's console
// (Firecracker's emulated 8250, ttyS0) is Firecracker's stdout, which goes to
// consoleLog, so the same waitFor() and parseGuestConsole() work.
//
// Firecracker on x86_64 boots an uncompressed ELF vmlinux, not a bzImage:
// the guest build's vmlinuz (Debian's, LZ4-compressed) does not do as is;
// give startFirecracker an ELF kernel (e.g. extracted from it with the
// kernel's scripts/extract-vmlinux and Debian's lz4) and the same initrd.
// The request and argument builders are pure and unit-tested
// (test/unit/firecracker.test.ts); there is no firecracker here to run.
import type { ChildProcess } from "node:child_process";
import { accessSync, closeSync, constants, existsSync, mkdirSync, openSync, readSync, rmSync, statSync } from "node:fs";
import { request } from "node:http";
import { delimiter, dirname, join } from "node:path";
import { FailedPreconditionError } from "../common/errors.js";
import { startDaemon } from "../common/exec.js";
import { inNetns, isSafePath, validateQemuOptions, vmProcess, type GuestCmdlineOptions, guestCmdline, type VmProcess } from "./qemu.js";

export const FIRECRACKER_MISSING =
  "firecracker is not on PATH; install it from the Firecracker releases (a static binary: github.com/firecracker-microvm/firecracker/releases) into /usr/local/bin, or set MICROVPC_FIRECRACKER to its path; kind=qemu works here";

export interface FirecrackerOptions {
  /** VM id: Firecracker's --id (letters, digits, -; 1–64). */
  id: string;
  /** The VPC namespace, as for QEMU (name or /run/netns/NAME). */
  netns: string;
  tap: string;
  mac: string;
  /** An uncompressed ELF vmlinux. */
  kernel: string;
  initrd?: string;
  cmdline: string;
  vcpus: number;
  memoryMib: number;
  consoleLog: string;
  /** The API socket. Default `<consoleLog>.sock`. */
  apiSocket?: string;
  /** Optional root drive (an ext4 image, say); the busybox guest needs none. */
  rootfs?: { path: string; readOnly?: boolean };
  /** Binary: default $MICROVPC_FIRECRACKER or `firecracker` on PATH. */
  firecracker?: string;
}

export interface FcRequest {
  method: "PUT" | "PATCH" | "GET";
  path: string;
  body?: Record<string, unknown>;
}

const ID_RE = /^[A-Za-z0-9-]{1,64}$/;

/** The full path of an executable `name` on $PATH (or `name` itself if it has a slash and is executable), else null. */
export function which(name: string, path = process.env.PATH ?? ""): string | null {
  const ok = (p: string) => {
    try {
      accessSync(p, constants.X_OK);
      return statSync(p).isFile();
    } catch {
      return false;
    }
  };
  if (name.includes("/")) return ok(name) ? name : null;
  for (const dir of path.split(delimiter).slice(0, 100)) {
    if (dir && ok(join(dir, name))) return join(dir, name);
  }
  return null;
}

/** The firecracker binary to use, or null if there is none. */
export function findFirecracker(bin?: string): string | null {
  return which(bin ?? (process.env.MICROVPC_FIRECRACKER || "firecracker"));
}

function apiSocketOf(o: Pick<FirecrackerOptions, "apiSocket" | "consoleLog">): string {
  return o.apiSocket ?? `${o.consoleLog}.sock`;
}

/** Throws on anything Firecracker would reject or that could be misread (same rules as QEMU's, plus the id). */
export function validateFirecrackerOptions(o: FirecrackerOptions): void {
  if (!ID_RE.test(o.id)) throw new Error(`id: ${JSON.stringify(o.id)}: 1–64 letters, digits and -`);
  validateQemuOptions({ ...o, initrd: o.initrd ?? o.kernel, qmpSocket: apiSocketOf(o) });
  if (o.vcpus > 32) throw new Error(`vcpus: ${o.vcpus}: Firecracker takes at most 32`);
  if (o.rootfs && !isSafePath(o.rootfs.path))
    throw new Error(`rootfs.path: ${JSON.stringify(o.rootfs.path)}: an absolute path of letters, digits and _ . / + @ -`);
}

/** The kernel command line for the microvpc guest under Firecracker (virtio over MMIO, no PCI, no keyboard controller). */
export function firecrackerCmdline(o: GuestCmdlineOptions): string {
  return guestCmdline({
    ...o,
    extra: ["reboot=k", "pci=off", "i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd", ...(o.extra ?? [])],
  });
}

/** `firecracker --api-sock SOCK --id ID`, run in the VPC namespace. */
export function firecrackerArgv(o: FirecrackerOptions, bin = "firecracker"): { file: string; args: string[] } {
  validateFirecrackerOptions(o);
  return inNetns(o.netns, bin, ["--api-sock", apiSocketOf(o), "--id", o.id]);
}

/** The API calls that configure and start the VM, in order (InstanceStart last). */
export function firecrackerRequests(o: FirecrackerOptions): FcRequest[] {
  validateFirecrackerOptions(o);
  const reqs: FcRequest[] = [
    { method: "PUT", path: "/machine-config", body: { vcpu_count: o.vcpus, mem_size_mib: o.memoryMib, smt: false } },
    {
      method: "PUT",
      path: "/boot-source",
      body: { kernel_image_path: o.kernel, boot_args: o.cmdline, ...(o.initrd ? { initrd_path: o.initrd } : {}) },
    },
  ];
  if (o.rootfs) {
    reqs.push({
      method: "PUT",
      path: "/drives/rootfs",
      body: { drive_id: "rootfs", path_on_host: o.rootfs.path, is_root_device: true, is_read_only: o.rootfs.readOnly ?? false },
    });
  }
  reqs.push(
    { method: "PUT", path: "/network-interfaces/eth0", body: { iface_id: "eth0", host_dev_name: o.tap, guest_mac: o.mac.toLowerCase() } },
    { method: "PUT", path: "/actions", body: { action_type: "InstanceStart" } },
  );
  return reqs;
}

/** One API call over the unix socket; resolves with the body on 2xx, rejects with Firecracker's fault_message otherwise. */
export function fcRequest(socketPath: string, r: FcRequest, timeoutMs = 5000): Promise<string> {
  return new Promise((resolve, reject) => {
    const body = r.body === undefined ? undefined : JSON.stringify(r.body);
    const req = request(
      {
        socketPath,
        method: r.method,
        path: r.path,
        headers: {
          Accept: "application/json",
          ...(body !== undefined ? { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) } : {}),
        },
        timeout: timeoutMs,
      },
      (res) => {
        let text = "";
        res.setEncoding("utf8");
        res.on("data", (d: string) => {
          if (text.length < 65536) text += d;
        });
        res.on("end", () => {
          const status = res.statusCode ?? 0;
          if (status >= 200 && status < 300) return resolve(text);
          let fault = text.trim();
          try {
            fault = (JSON.parse(text) as { fault_message?: string }).fault_message ?? fault;
          } catch {
            // not JSON: keep the text
          }
          reject(new Error(`firecracker ${r.method} ${r.path}: HTTP ${status}: ${fault || "(no message)"}`));
        });
      },
    );
    req.on("timeout", () => req.destroy(new Error(`firecracker ${r.method} ${r.path}: no answer in ${timeoutMs} ms`)));
    req.on("error", reject);
    if (body !== undefined) req.write(body);
    req.end();
  });
}

/** True if the file starts with the ELF magic (what Firecracker boots on x86_64). */
export function isElf(path: string): boolean {
  try {
    const fd = openSync(path, "r");
    try {
      const b = Buffer.alloc(4);
      return readSync(fd, b, 0, 4, 0) === 4 && b.equals(Buffer.from([0x7f, 0x45, 0x4c, 0x46]));
    } finally {
      closeSync(fd);
    }
  } catch {
    return false;
  }
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/**
 * Starts Firecracker in the VPC namespace, configures it over its API socket
 * and starts the instance. Throws FailedPreconditionError when there is no
 * firecracker binary or the kernel is not an ELF vmlinux; on any later
 * failure the process is stopped (by PID) before the error is thrown.
 */
export async function startFirecracker(o: FirecrackerOptions & { startTimeoutMs?: number }): Promise<VmProcess> {
  const bin = findFirecracker(o.firecracker);
  if (!bin) throw new FailedPreconditionError(FIRECRACKER_MISSING);
  const cmd = firecrackerArgv(o, bin);
  const reqs = firecrackerRequests(o);
  if (!isElf(o.kernel)) {
    throw new FailedPreconditionError(
      `${o.kernel} is not an uncompressed ELF vmlinux, which is what Firecracker boots on x86_64 (a bzImage such as the guest build's vmlinuz is not); use kind=qemu, or give an ELF kernel`,
    );
  }
  for (const f of [o.initrd, o.rootfs?.path]) if (f && !existsSync(f)) throw new FailedPreconditionError(`${f} does not exist`);
  const sock = apiSocketOf(o);
  const errLog = `${o.consoleLog}.firecracker`;
  for (const p of [o.consoleLog, sock]) mkdirSync(dirname(p), { recursive: true });
  rmSync(sock, { force: true });
  const out = openSync(o.consoleLog, "w");
  const err = openSync(errLog, "w");
  let child: ChildProcess;
  try {
    ({ proc: child } = await startDaemon(cmd.file, cmd.args, { stdio: ["ignore", out, err], detached: true }));
  } finally {
    closeSync(out);
    closeSync(err);
  }
  const vm = vmProcess(child.pid!, o.consoleLog, { proc: child, stderrLog: errLog, onStopped: () => rmSync(sock, { force: true }) });
  try {
    const until = Date.now() + (o.startTimeoutMs ?? 10_000);
    let up = false;
    for (let i = 0; i < 1000 && Date.now() < until && !vm.exited(); i++) {
      if (existsSync(sock)) {
        try {
          await fcRequest(sock, { method: "GET", path: "/" }, 1000);
          up = true;
          break;
        } catch {
          // not answering yet
        }
      }
      await sleep(20);
    }
    if (!up) throw new Error(vm.exited() ? `firecracker exited at start: ${vm.console().slice(-1000)}` : `firecracker's API socket ${sock} did not answer`);
    for (const r of reqs) await fcRequest(sock, r);
    return vm;
  } catch (e) {
    await vm.stop().catch(() => undefined);
    throw e;
  }
}
