// The few libc calls microvpc makes in-process (through koffi, an FFI with
// prebuilt binaries), and the one rule that makes them safe in a Node
// daemon: a network namespace is per thread, so code that moves the main
// thread (setns, unshare) does it synchronously and moves it back before it
// returns; no other callback of this process can run in between, and
// libuv's pool threads never move. If the way back fails the process exits
// rather than open a socket in the wrong namespace.
//
// Users: common/rtnl.ts and common/conntrack.ts (their netlink sockets,
// opened inside a namespace), and namedNetnsAdd/Del below (what `ip netns
// add|del NAME` does, without the ~15–20 ms exec: the vmm makes one
// namespace per kind=netns VM). common/nft/libnftables.ts keeps the same
// rule on a thread of its own (its worker), and takes only netnsPath and
// loadLibc from here.
import { closeSync, mkdirSync, openSync, unlinkSync } from "node:fs";
import { createRequire } from "node:module";

const CLONE_NEWNET = 0x40000000;
const MS_BIND = 0x1000;
const MS_REC = 0x4000;
const MS_SHARED = 1 << 20;
const MNT_DETACH = 2;
const EINVAL = 22;
const ENOENT = 2;

/** Where `ip netns` keeps named namespaces. */
const NETNS_RUN_DIR = "/run/netns";
/** A namespace name as `ip netns` keeps it under /run/netns (no slash, no dot-dot). */
const NETNS_NAME = /^(?!\.\.?$)[A-Za-z0-9_.-]{1,64}$/;

type Fn = (...args: unknown[]) => unknown;

export interface Libc {
  koffi: typeof import("koffi");
  setns: Fn;
  unshare: Fn;
  mount: Fn;
  umount2: Fn;
  mallopt: Fn;
  fcntl: Fn;
  /** send(2) and recv(2): a library's netlink socket spoken to directly (common/conntrack.ts). */
  send: Fn;
  recv: Fn;
  errno: () => number;
  /** This thread's own network namespace, open for the life of the process. */
  homeFd: number;
}

let libc: Libc | null | undefined;
let loadError = "";

/** libc through koffi, or null (with the reason in libcLoadError()) when it cannot be loaded. */
export function loadLibc(): Libc | null {
  if (libc !== undefined) return libc;
  try {
    const koffi = createRequire(import.meta.url)("koffi") as typeof import("koffi");
    const c = koffi.load("libc.so.6");
    libc = {
      koffi,
      setns: c.func("int setns(int fd, int nstype)") as Fn,
      unshare: c.func("int unshare(int flags)") as Fn,
      mount: c.func("int mount(const char *source, const char *target, const char *fstype, unsigned long flags, const void *data)") as Fn,
      umount2: c.func("int umount2(const char *target, int flags)") as Fn,
      mallopt: c.func("int mallopt(int param, int value)") as Fn,
      fcntl: c.func("int fcntl(int fd, int cmd, ...)") as Fn,
      send: c.func("long send(int fd, const void *buf, unsigned long len, int flags)") as Fn,
      recv: c.func("long recv(int fd, void *buf, unsigned long len, int flags)") as Fn,
      errno: () => koffi.errno(),
      homeFd: openSync("/proc/thread-self/ns/net", "r"),
    };
  } catch (err) {
    loadError = (err as Error).message;
    libc = null;
  }
  return libc;
}

const F_GETFD = 1;
const F_SETFD = 2;
const FD_CLOEXEC = 1;

/**
 * Marks a descriptor a C library opened (a netlink socket: libmnl and
 * libnfnetlink open theirs without SOCK_CLOEXEC) close-on-exec, as Node
 * opens all of its own. Without it every child the daemon starts while the
 * socket is open (the exec helper, the metadata child, wireguard-go)
 * inherits it for life, and a socket keeps its network namespace, and every
 * device in it, alive after the namespace is deleted.
 */
export function closeOnExec(c: Libc, fd: number): void {
  if (fd < 3) return;
  const flags = c.fcntl(fd, F_GETFD) as number;
  if (flags >= 0 && !(flags & FD_CLOEXEC)) c.fcntl(fd, F_SETFD, "int", flags | FD_CLOEXEC);
}

export function libcLoadError(): string {
  return loadError;
}

/**
 * A library called in-process through koffi: opened on first use, once; or
 * not (an env switch set to 1, libc or the library missing), with why.
 */
export class InProcessLibrary<T> {
  private lib: T | null | undefined;
  private why = "";

  constructor(
    /** The environment variable that, set to 1, keeps the exec path. */
    private readonly envOff: string,
    private readonly open: (c: Libc) => T,
  ) {}

  get(): T | null {
    if (this.lib !== undefined) return this.lib;
    this.lib = null;
    const c = process.env[this.envOff] === "1" ? null : loadLibc();
    if (!c) this.why = process.env[this.envOff] === "1" ? `${this.envOff}=1` : libcLoadError();
    else {
      try {
        this.lib = this.open(c);
      } catch (err) {
        this.why = (err as Error).message;
      }
    }
    return this.lib;
  }

  /** For a daemon's start-up line: "in-process", or "exec (why not)". */
  mode(): string {
    return this.get() ? "in-process" : `exec (${this.why || "the library cannot be loaded"})`;
  }
}

/** Moves this thread back to its own namespace, or ends the process (see the file's comment). */
function returnHome(c: Libc, from: string): void {
  if (c.setns(c.homeFd, CLONE_NEWNET) !== 0) {
    process.stderr.write(`microvpc: cannot switch back to our own network namespace after working in ${from}; exiting\n`);
    process.exit(70);
  }
}

/** Errors of the in-process namespace calls, worded as `ip netns` words them. */
export class NetnsError extends Error {
  override name = "NetnsError";
  constructor(
    message: string,
    readonly code: "exists" | "failed",
  ) {
    super(message);
  }
}

/** /run/netns/NAME, for a name that is one (never a path that leaves /run/netns). */
export function netnsPath(name: string): string {
  if (!NETNS_NAME.test(name)) throw new NetnsError(`not a network namespace name: ${JSON.stringify(name)}`, "failed");
  return `${NETNS_RUN_DIR}/${name}`;
}

/**
 * Runs fn, synchronously, with this thread in the named namespace ("" = our
 * own), and moves the thread back before returning or throwing. A missing
 * namespace fails (ENOENT) before the thread moves.
 */
export function inNamedNetns<T>(c: Libc, name: string, fn: () => T): T {
  if (name === "") return fn();
  return inNetnsAt(c, netnsPath(name), fn);
}

/** A namespace file microvpc enters: a named one, or a process's (/proc/PID/ns/net). */
const NETNS_FILE = /^(?:\/(?:var\/)?run\/netns\/(?!\.\.?$)[A-Za-z0-9_.-]{1,64}|\/proc\/[1-9][0-9]{0,9}\/ns\/net)$/;

/** Opens a namespace file (read-only; the caller closes it), after checking the path is one (NETNS_FILE). */
export function openNetnsFile(path: string): number {
  if (!NETNS_FILE.test(path)) throw new NetnsError(`not a network namespace file: ${JSON.stringify(path)}`, "failed");
  return openSync(path, "r");
}

/**
 * inNamedNetns for a namespace file: /run/netns/NAME or /proc/PID/ns/net
 * (a VM process's namespace), nothing else. fn gets the open file's fd
 * (valid until fn returns), e.g. to move a device there.
 */
export function inNetnsAt<T>(c: Libc, path: string, fn: (fd: number) => T): T {
  const fd = openNetnsFile(path);
  try {
    if (c.setns(fd, CLONE_NEWNET) !== 0) throw new Error(`setns into ${path} failed: ${errnoText(c)}`);
    try {
      return fn(fd);
    } finally {
      returnHome(c, path);
    }
  } finally {
    closeSync(fd);
  }
}

function errnoText(c: Libc): string {
  const e = c.errno();
  return `errno ${e}${e === ENOENT ? " (No such file or directory)" : e === EINVAL ? " (Invalid argument)" : ""}`;
}

/**
 * `ip netns add NAME` in-process: /run/netns made a shared mount point (so
 * the namespace file propagates to other mount namespaces, as ip does),
 * the file created exclusively, a new network namespace unshared on this
 * thread and bind-mounted onto the file, and the thread moved back.
 * Throws NetnsError("exists") when the name is taken; nothing is left
 * behind on any failure. Returns false when libc cannot be loaded (the
 * caller execs `ip netns add`).
 */
export function namedNetnsAdd(name: string): boolean {
  const c = loadLibc();
  if (!c) return false;
  const path = netnsPath(name);
  mkdirSync(NETNS_RUN_DIR, { recursive: true, mode: 0o755 });
  let madeMountPoint = false;
  while (c.mount("", NETNS_RUN_DIR, "none", MS_SHARED | MS_REC, null) !== 0) {
    if (c.errno() !== EINVAL || madeMountPoint) throw new NetnsError(`mount --make-shared ${NETNS_RUN_DIR} failed: ${errnoText(c)}`, "failed");
    if (c.mount(NETNS_RUN_DIR, NETNS_RUN_DIR, "none", MS_BIND | MS_REC, null) !== 0) {
      throw new NetnsError(`mount --bind ${NETNS_RUN_DIR} ${NETNS_RUN_DIR} failed: ${errnoText(c)}`, "failed");
    }
    madeMountPoint = true;
  }
  try {
    closeSync(openSync(path, "wx", 0));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "EEXIST") throw new NetnsError(`Cannot create namespace file "${path}": File exists`, "exists");
    throw err;
  }
  let mounted = false;
  let why = "";
  if (c.unshare(CLONE_NEWNET) !== 0) {
    why = `unshare of a network namespace failed: ${errnoText(c)}`;
  } else {
    try {
      mounted = c.mount("/proc/thread-self/ns/net", path, "none", MS_BIND, null) === 0;
      if (!mounted) why = `bind ${path} -> /proc/thread-self/ns/net failed: ${errnoText(c)}`;
    } finally {
      returnHome(c, `the new namespace ${name}`);
    }
  }
  if (!mounted) {
    unlinkSync(path);
    throw new NetnsError(why, "failed");
  }
  return true;
}

/**
 * `ip netns del NAME` in-process: the bind mount detached and the file
 * removed; a name that is not there is fine. Returns false when libc
 * cannot be loaded (the caller execs `ip netns del`).
 */
export function namedNetnsDel(name: string): boolean {
  const c = loadLibc();
  if (!c) return false;
  const path = netnsPath(name);
  if (c.umount2(path, MNT_DETACH) !== 0 && c.errno() !== EINVAL && c.errno() !== ENOENT) {
    throw new NetnsError(`Cannot remove namespace file "${path}": ${errnoText(c)}`, "failed");
  }
  try {
    unlinkSync(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
  }
  return true;
}
