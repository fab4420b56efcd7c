// Network namespaces for the data-plane tests: a per-run prefix, namespaces
// and commands inside them, and probes that pass real packets (ping, TCP
// connect, HTTP, iperf3).
//
// Safety rules this module keeps (and asks its callers to keep):
// - it never changes the root network namespace: every namespace it creates
//   carries the run prefix, and every `ip` command that changes something
//   names a namespace (`ip -n NS …` / `ip netns exec NS …`);
// - commands are argument arrays (execFile/spawn), never shell strings;
// - everything it creates (namespaces, processes, temporary directories) is
//   in a registry that is emptied on close, on process exit and on
//   SIGINT/SIGTERM, synchronously (execFileSync), so an interrupted or failing
//   run leaves nothing behind; processes are ended by PID only;
// - every wait is bounded in count and in time.
import { execFile, execFileSync, spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, unlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

// ---------------------------------------------------------------------------
// The run prefix

const PREFIX_RE = /^mt[0-9a-f]{4}$/;

/**
 * Prefix of everything this run creates: "mt" + 4 random hex characters.
 * Namespaces are named `<prefix>-…`; hypervisor ids are `<prefix>hv<i>`, so
 * the namespaces netagent makes for them (`mvpc-<hostId>-<vpcId>`) start with
 * `mvpc-<prefix>hv`. MVPC_TEST_PREFIX overrides it (same format).
 */
export const RUN_PREFIX: string = (() => {
  const fromEnv = process.env.MVPC_TEST_PREFIX;
  if (fromEnv !== undefined) {
    if (!PREFIX_RE.test(fromEnv)) throw new Error(`MVPC_TEST_PREFIX=${JSON.stringify(fromEnv)}: expected "mt" and 4 hex characters`);
    return fromEnv;
  }
  // Re-roll while another run (live or not yet swept) uses the same prefix.
  let existing: string[] = [];
  try {
    existing = execFileSync("ip", ["netns", "list"], { encoding: "utf8", timeout: 10_000 })
      .split("\n")
      .map((l) => l.trim().split(/\s+/)[0]);
  } catch {
    // no namespaces yet
  }
  for (let i = 0; i < 50; i++) {
    const p = "mt" + randomBytes(2).toString("hex");
    if (existsSync(`/run/mvpc-test/${p}.pid`)) continue;
    if (existing.some((n) => n.startsWith(`${p}-`) || n.startsWith(`mvpc-${p}`))) continue;
    return p;
  }
  throw new Error("no free run prefix after 50 tries");
})();

/** True if a namespace name belongs to the run with this prefix. */
export function ownedNamespace(name: string, prefix = RUN_PREFIX): boolean {
  return name.startsWith(`${prefix}-`) || name.startsWith(`mvpc-${prefix}hv`) || name.startsWith(`mvpcvm-${prefix}hv`);
}

const NS_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$/;

function checkNsName(ns: string): void {
  if (!NS_NAME_RE.test(ns)) throw new Error(`bad namespace name ${JSON.stringify(ns)}`);
}

// ---------------------------------------------------------------------------
// Running commands

export interface ExecResult {
  code: number;
  stdout: string;
  stderr: string;
  /** True if the command was killed because it ran past its timeout. */
  timedOut: boolean;
}

export interface ExecOptions {
  /** Hard limit; the command is SIGKILLed after it. Default 15 s. */
  timeoutMs?: number;
  /** Throw (with stderr in the message) on a non-zero exit. Default true. */
  check?: boolean;
  input?: string;
}

const ENV = { ...process.env, LC_ALL: "C", LANG: "C" };

/** Runs a command (argument array, no shell) and collects its output. */
export function run(cmd: string, args: string[], o: ExecOptions = {}): Promise<ExecResult> {
  const timeoutMs = o.timeoutMs ?? 15_000;
  return new Promise((resolve, reject) => {
    const child = execFile(
      cmd,
      args,
      { env: ENV, timeout: timeoutMs, killSignal: "SIGKILL", maxBuffer: 64 * 1024 * 1024, encoding: "utf8" },
      (err, stdout, stderr) => {
        const e = err as (NodeJS.ErrnoException & { code?: number | string; killed?: boolean; signal?: string }) | null;
        if (e && typeof e.code === "string") {
          reject(new Error(`${cmd}: ${e.message}`));
          return;
        }
        const timedOut = !!(e && e.killed && e.signal === "SIGKILL");
        const code = e ? (typeof e.code === "number" ? e.code : 128) : 0;
        const r: ExecResult = { code, stdout, stderr, timedOut };
        if ((o.check ?? true) && code !== 0) {
          reject(
            new Error(
              `${[cmd, ...args].join(" ")} failed (${timedOut ? `timed out after ${timeoutMs} ms` : `exit ${code}`}): ${stderr.trim() || stdout.trim()}`,
            ),
          );
          return;
        }
        resolve(r);
      },
    );
    if (o.input !== undefined) {
      // A command that exits without reading all of its input (or any: bench:gateway feeds "" to sysctl) makes
      // this write fail with EPIPE; unhandled, that error ended the whole process. Its exit code and stderr say
      // what happened.
      child.stdin!.on("error", () => undefined);
      child.stdin!.end(o.input);
    }
  });
}

/** `ip -n NS args…` (cheaper than `ip netns exec NS ip …`). */
export function ipn(ns: string, args: string[], o: ExecOptions = {}): Promise<ExecResult> {
  checkNsName(ns);
  return run("ip", ["-n", ns, ...args], o);
}

/** `ip netns exec NS cmd args…`. */
export function nsExec(ns: string, cmd: string, args: string[], o: ExecOptions = {}): Promise<ExecResult> {
  checkNsName(ns);
  return run("ip", ["netns", "exec", ns, cmd, ...args], o);
}

// ---------------------------------------------------------------------------
// Cleanup registry

const children = new Map<number, ChildProcess>();
const tempDirs = new Set<string>();
const syncHooks: (() => void)[] = [];
const MARKER_DIR = "/run/mvpc-test";
let markerWritten = false;

/** Remembers a spawned process so that cleanup ends it (by PID). */
export function trackChild(child: ChildProcess): ChildProcess {
  const pid = child.pid;
  if (pid === undefined) return child;
  children.set(pid, child);
  child.once("exit", () => children.delete(pid));
  return child;
}

/** A synchronous hook run by cleanup before namespaces are deleted (e.g. remove a temp dir). */
export function onCleanup(fn: () => void): void {
  syncHooks.push(fn);
}

export function tempDir(tag: string): string {
  const d = mkdtempSync(join(tmpdir(), `${RUN_PREFIX}-${tag}-`));
  tempDirs.add(d);
  return d;
}

function alive(child: ChildProcess): boolean {
  return child.exitCode === null && child.signalCode === null;
}

function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

/** Kills (SIGKILL, by PID) every process still inside a namespace of the run. */
function killProcessesIn(ns: string): number {
  let out;
  try {
    out = execFileSync("ip", ["netns", "pids", ns], { env: ENV, encoding: "utf8", timeout: 10_000 });
  } catch {
    return 0;
  }
  let n = 0;
  for (const p of out
    .split("\n")
    .map((x) => Number(x.trim()))
    .filter((x) => Number.isInteger(x) && x > 1 && x !== process.pid)) {
    try {
      process.kill(p, "SIGKILL");
      n++;
    } catch {
      // gone
    }
  }
  return n;
}

/** Deletes namespaces of a run, after ending what still runs inside them. */
function deleteNamespacesSync(prefix: string): string[] {
  const removed: string[] = [];
  // Two passes: a namespace can be busy for a moment after its last process.
  for (let pass = 0; pass < 2; pass++) {
    const mine = listNetnsSync().filter((n) => ownedNamespace(n, prefix));
    if (mine.length === 0) break;
    let killed = 0;
    for (const ns of mine) killed += killProcessesIn(ns);
    if (killed > 0) sleepSync(100);
    for (const ns of mine) {
      try {
        execFileSync("ip", ["netns", "delete", ns], { env: ENV, stdio: "ignore", timeout: 10_000 });
        removed.push(ns);
      } catch {
        // retried in the second pass
      }
    }
  }
  return removed;
}

/** True if pid runs (a zombie, dead but not reaped yet, counts as gone). */
function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const state = stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
    return state !== "Z" && state !== "X";
  } catch {
    return false;
  }
}

/**
 * PIDs of the running processes (zombies excluded) whose command line, its
 * arguments joined by spaces, contains `fragment`: a plain substring, not a
 * pattern (pgrep took "-name x" for options and found nothing, ever). Give a
 * fragment only this test's processes have (a path under its own temp
 * folder, its PID): the machine is shared.
 */
export function processesWith(fragment: string): number[] {
  const found: number[] = [];
  for (const d of readdirSync("/proc")) {
    const pid = Number(d);
    if (!Number.isInteger(pid) || pid === process.pid) continue;
    let cmd: string;
    try {
      cmd = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").join(" ");
    } catch {
      continue;
    }
    if (cmd.includes(fragment) && pidAlive(pid)) found.push(pid);
  }
  return found;
}

/** Names of every named network namespace (ip netns list). */
export function listNetnsSync(): string[] {
  let out;
  try {
    out = execFileSync("ip", ["netns", "list"], { env: ENV, encoding: "utf8", timeout: 10_000 });
  } catch {
    return [];
  }
  return out
    .split("\n")
    .map((l) => l.trim().split(/\s+/)[0])
    .filter((n) => n && n.length > 0);
}

export async function listNetns(): Promise<string[]> {
  const r = await run("ip", ["netns", "list"], { check: false });
  return r.stdout
    .split("\n")
    .map((l) => l.trim().split(/\s+/)[0])
    .filter((n) => n && n.length > 0);
}

/**
 * Ends every process of the registry (SIGKILL by PID, waiting at most 3 s for
 * them to go), runs the hooks, and deletes every namespace of the run.
 * Synchronous, so it can run from an 'exit' handler. Safe to call twice.
 */
export function cleanupSync(prefix = RUN_PREFIX): { killed: number; namespaces: string[] } {
  let killed = 0;
  const pids: number[] = [];
  for (const [pid, child] of children) {
    if (!alive(child)) continue;
    try {
      child.kill("SIGKILL");
      killed++;
      pids.push(pid);
    } catch {
      // already gone
    }
  }
  // The agents reconcile: they must be gone before their namespaces are
  // deleted, or one could recreate what we remove.
  const deadline = Date.now() + 3000;
  for (let i = 0; i < 300 && Date.now() < deadline && pids.some(pidAlive); i++) sleepSync(10);
  children.clear();
  for (const fn of syncHooks.splice(0)) {
    try {
      fn();
    } catch {
      // best effort
    }
  }
  const removed = deleteNamespacesSync(prefix);
  for (const d of tempDirs) rmSync(d, { recursive: true, force: true });
  tempDirs.clear();
  if (markerWritten && prefix === RUN_PREFIX) {
    try {
      unlinkSync(join(MARKER_DIR, `${prefix}.pid`));
    } catch {
      // already gone
    }
    markerWritten = false;
  }
  return { killed, namespaces: removed };
}

let handlersInstalled = false;

/** Installs the exit/SIGINT/SIGTERM handlers that run cleanupSync (once per process). */
export function installCleanupHandlers(): void {
  if (handlersInstalled) return;
  handlersInstalled = true;
  process.on("exit", () => {
    cleanupSync();
  });
  // `on`, not `once`: the listener stays, so a second signal during the
  // cleanup (the test runner forwards one) is caught instead of killing us
  // half-way.
  let exiting = false;
  for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
    process.on(sig, () => {
      if (exiting) return;
      exiting = true;
      const t0 = Date.now();
      const r = cleanupSync();
      // vitest ends every worker with SIGTERM when its file is done: say
      // something only when there was something to clean.
      if (r.killed > 0 || r.namespaces.length > 0) {
        process.stderr.write(`netns cleanup on ${sig}: ended ${r.killed} process(es), deleted ${r.namespaces.length} namespace(s) in ${Date.now() - t0} ms\n`);
      }
      try {
        process.exit(sig === "SIGINT" ? 130 : sig === "SIGTERM" ? 143 : 129);
      } catch {
        // vitest replaces process.exit in a worker running tests with one
        // that throws: the test would go on and start processes nobody ends.
        process.kill(process.pid, "SIGKILL");
      }
    });
  }
  // Leave a marker so that a later run can remove what a run killed with
  // SIGKILL (which no handler sees) left behind.
  try {
    mkdirSync(MARKER_DIR, { recursive: true });
    writeFileSync(join(MARKER_DIR, `${RUN_PREFIX}.pid`), String(process.pid));
    markerWritten = true;
  } catch {
    // not fatal: only the stale sweep needs it
  }
}

/**
 * Removes the namespaces of earlier runs whose process is gone (a run killed
 * with SIGKILL cannot clean up after itself). Only runs that left a marker
 * with a dead PID are touched; returns the namespaces removed.
 */
export function sweepStale(): string[] {
  const removed: string[] = [];
  if (!existsSync(MARKER_DIR)) return removed;
  for (const f of readdirSync(MARKER_DIR).slice(0, 1000)) {
    const m = /^(mt[0-9a-f]{4})\.pid$/.exec(f);
    if (!m || m[1] === RUN_PREFIX) continue;
    const pid = Number(readFileSync(join(MARKER_DIR, f), "utf8").trim());
    if (Number.isInteger(pid) && pid > 0 && pidAlive(pid)) continue;
    removed.push(...deleteNamespacesSync(m[1]));
    for (const d of readdirSync(tmpdir())
      .filter((x) => x.startsWith(`${m[1]}-`))
      .slice(0, 1000)) {
      rmSync(join(tmpdir(), d), { recursive: true, force: true });
    }
    try {
      unlinkSync(join(MARKER_DIR, f));
    } catch {
      // gone
    }
  }
  return removed;
}

// ---------------------------------------------------------------------------
// Namespaces and links

/** Creates a namespace of this run (the name must carry the run prefix) with lo up. */
export async function createNetns(name: string): Promise<string> {
  installCleanupHandlers();
  checkNsName(name);
  if (!name.startsWith(`${RUN_PREFIX}-`)) throw new Error(`namespace ${name} does not carry the run prefix ${RUN_PREFIX}-`);
  await run("ip", ["netns", "add", name]);
  await ipn(name, ["link", "set", "lo", "up"]);
  return name;
}

/** Deletes a namespace of this run; succeeds if it is already gone. */
export async function deleteNetns(name: string): Promise<void> {
  if (!ownedNamespace(name)) throw new Error(`refusing to delete namespace ${name}: not of run ${RUN_PREFIX}`);
  const r = await run("ip", ["netns", "delete", name], { check: false });
  if (r.code !== 0 && !/No such file|Cannot remove namespace file/.test(r.stderr)) {
    throw new Error(`ip netns delete ${name}: ${r.stderr.trim()}`);
  }
}

export function netnsPath(name: string): string {
  return `/run/netns/${name}`;
}

export async function netnsExists(name: string): Promise<boolean> {
  return (await listNetns()).includes(name);
}

export interface LinkInfo {
  name: string;
  ifindex: number;
  /** "veth", "bridge", "tun", "ifb", … ; "" for loopback and plain devices. */
  kind: string;
  master?: string;
  mac?: string;
  mtu: number;
  up: boolean;
  operstate: string;
  alias?: string;
}

/** Links of a namespace (`ip -n NS -d -j link show`). */
export async function links(ns: string): Promise<LinkInfo[]> {
  const r = await ipn(ns, ["-d", "-j", "link", "show"]);
  const raw = JSON.parse(r.stdout || "[]") as Record<string, unknown>[];
  return raw.map((l) => {
    const info = l.linkinfo as { info_kind?: string } | undefined;
    const flags = (l.flags as string[] | undefined) ?? [];
    return {
      name: String(l.ifname),
      ifindex: Number(l.ifindex),
      kind: info?.info_kind ?? "",
      master: l.master as string | undefined,
      mac: l.address as string | undefined,
      mtu: Number(l.mtu),
      up: flags.includes("UP"),
      operstate: String(l.operstate ?? ""),
      alias: l.ifalias as string | undefined,
    };
  });
}

/**
 * After DetachNic: the device is down (it carries nothing) or already gone
 * when the call returns, and gone within timeoutMs (the netagent deletes it
 * in the background: a veth's delete waits for an RCU grace period).
 * Returns why not, or "" when it was so.
 */
export async function detachedProblem(ns: string, name: string, timeoutMs = 3000): Promise<string> {
  const l = (await links(ns)).find((x) => x.name === name);
  if (l?.up) return `${name} in ${ns} is still up after DetachNic returned`;
  if (!(await waitFor(async () => !(await links(ns)).some((x) => x.name === name), { timeoutMs, intervalMs: 50 })))
    return `${name} in ${ns} is still there ${timeoutMs} ms after DetachNic returned`;
  return "";
}

/** A VM's end of a detached veth (its state follows the host end): gone within timeoutMs. */
export async function goneWithin(ns: string, name: string, timeoutMs = 3000): Promise<boolean> {
  return waitFor(async () => !(await links(ns)).some((x) => x.name === name), { timeoutMs, intervalMs: 50 });
}

export async function linkNames(ns: string): Promise<string[]> {
  return (await links(ns)).map((l) => l.name).sort();
}

export interface AddrInfo {
  ifname: string;
  local: string;
  prefixlen: number;
}

/** IPv4 addresses of a namespace. */
export async function addresses(ns: string): Promise<AddrInfo[]> {
  const r = await ipn(ns, ["-4", "-j", "addr", "show"]);
  const raw = JSON.parse(r.stdout || "[]") as { ifname: string; addr_info?: { local: string; prefixlen: number; family: string }[] }[];
  const out: AddrInfo[] = [];
  for (const l of raw) for (const a of l.addr_info ?? []) if (a.family === "inet") out.push({ ifname: l.ifname, local: a.local, prefixlen: a.prefixlen });
  return out;
}

/** IPv4 routes of a namespace's main table, as `ip route` prints them. */
export async function routes(ns: string): Promise<string[]> {
  const r = await ipn(ns, ["-4", "route", "show"]);
  return r.stdout
    .split("\n")
    .map((l) => l.trim())
    .filter(Boolean);
}

/** Neighbour entries of a namespace (`ip neigh`), as objects. */
export async function neighbours(ns: string): Promise<{ dst: string; dev: string; lladdr?: string; state: string[] }[]> {
  const r = await ipn(ns, ["-4", "-j", "neigh", "show"]);
  return (JSON.parse(r.stdout || "[]") as { dst: string; dev: string; lladdr?: string; state?: string[] }[]).map((n) => ({ ...n, state: n.state ?? [] }));
}

/**
 * Creates a veth pair between two namespaces of the run (`ip -n A link add
 * nameA type veth peer name nameB netns B`): nothing touches the root
 * namespace. Both ends are set up; addresses are optional ("10.0.0.1/24").
 */
export async function vethBetween(a: { ns: string; name: string; address?: string }, b: { ns: string; name: string; address?: string }): Promise<void> {
  await ipn(a.ns, ["link", "add", a.name, "type", "veth", "peer", "name", b.name, "netns", b.ns]);
  for (const end of [a, b]) {
    if (end.address) await ipn(end.ns, ["addr", "add", end.address, "dev", end.name]);
    await ipn(end.ns, ["link", "set", end.name, "up"]);
  }
}

// ---------------------------------------------------------------------------
// Probes

export interface PingResult {
  transmitted: number;
  received: number;
  /** Duplicates reported by ping (DUP!). */
  duplicates: number;
  output: string;
}

export interface PingOptions {
  count?: number;
  /** Seconds between packets (below 0.2 needs root, which we are). Default 0.2. */
  intervalS?: number;
  /** ping -w: stop after this many seconds whatever happened. Default count × interval + 2. */
  deadlineS?: number;
  /** ping -W: seconds to wait for each reply. Default 1. */
  replyTimeoutS?: number;
  /** Source address or interface (ping -I). */
  source?: string;
}

function parsePing(out: string): PingResult {
  const m = /(\d+) packets transmitted, (\d+) (?:packets )?received(?:, \+(\d+) duplicates)?/.exec(out);
  return { transmitted: m ? Number(m[1]) : 0, received: m ? Number(m[2]) : 0, duplicates: m && m[3] ? Number(m[3]) : 0, output: out };
}

function pingArgs(addr: string, o: PingOptions): string[] {
  const count = o.count ?? 3;
  const interval = o.intervalS ?? 0.2;
  const deadline = o.deadlineS ?? Math.ceil(count * interval + 2);
  const args = ["-n", "-q", "-c", String(count), "-i", String(interval), "-w", String(deadline), "-W", String(o.replyTimeoutS ?? 1)];
  if (o.source) args.push("-I", o.source);
  args.push(addr);
  return args;
}

/** Pings addr from inside ns; never throws for lost packets. */
export async function ping(ns: string, addr: string, o: PingOptions = {}): Promise<PingResult> {
  const args = pingArgs(addr, o);
  const deadline = Number(args[args.indexOf("-w") + 1]);
  const r = await nsExec(ns, "ping", args, { check: false, timeoutMs: (deadline + 5) * 1000 });
  return parsePing(r.stdout + r.stderr);
}

/** True if at least one of `count` pings (default 3, 0.2 s apart, 2 s deadline) is answered. */
export async function canPing(ns: string, addr: string, o: PingOptions = {}): Promise<boolean> {
  const r = await ping(ns, addr, { count: 3, intervalS: 0.2, deadlineS: 2, ...o });
  return r.received > 0;
}

/** A ping running in the background (e.g. across an agent restart). */
export interface BackgroundPing {
  pid: number;
  /** Waits for ping to finish (it stops by itself at count or deadline). */
  result(): Promise<PingResult>;
}

export function pingInBackground(ns: string, addr: string, o: PingOptions): BackgroundPing {
  checkNsName(ns);
  const args = pingArgs(addr, o);
  const deadline = Number(args[args.indexOf("-w") + 1]);
  const child = trackChild(spawn("ip", ["netns", "exec", ns, "ping", ...args], { env: ENV, stdio: ["ignore", "pipe", "pipe"] }));
  let out = "";
  child.stdout!.on("data", (d) => (out += d));
  child.stderr!.on("data", (d) => (out += d));
  const done = new Promise<PingResult>((resolve) => {
    const t = setTimeout(() => child.kill("SIGKILL"), (deadline + 5) * 1000);
    child.once("exit", () => {
      clearTimeout(t);
      resolve(parsePing(out));
    });
  });
  return { pid: child.pid!, result: () => done };
}

export type TcpOutcome = "connected" | "refused" | "timeout" | "unreachable" | "error";

const TCP_SCRIPT = `
const [host, port, ms] = process.argv.slice(1);
const net = require("node:net");
const s = net.connect({ host, port: Number(port) });
const hard = setTimeout(() => { process.stdout.write("timeout"); process.exit(0); }, Number(ms));
s.on("connect", () => { clearTimeout(hard); process.stdout.write("connected"); s.destroy(); process.exit(0); });
s.on("error", (e) => {
  clearTimeout(hard);
  const c = e && e.code;
  process.stdout.write(c === "ECONNREFUSED" ? "refused" : c === "EHOSTUNREACH" || c === "ENETUNREACH" ? "unreachable" : c === "ETIMEDOUT" ? "timeout" : "error:" + c);
  process.exit(0);
});
`;

/** Connects from ns to host:port (a node one-liner run with ip netns exec) and says what happened. */
export async function tcpConnect(ns: string, host: string, port: number, timeoutMs = 1500): Promise<TcpOutcome> {
  const r = await nsExec(ns, process.execPath, ["-e", TCP_SCRIPT, host, String(port), String(timeoutMs)], { check: false, timeoutMs: timeoutMs + 10_000 });
  const out = r.stdout.trim();
  if (out === "connected" || out === "refused" || out === "timeout" || out === "unreachable") return out;
  return "error";
}

/** True if a TCP connection from ns to host:port is established within timeoutMs. */
export async function tcpProbe(ns: string, host: string, port: number, timeoutMs = 1500): Promise<boolean> {
  return (await tcpConnect(ns, host, port, timeoutMs)) === "connected";
}

const HTTP_SCRIPT = `
const [url, ms] = process.argv.slice(1);
const req = require("node:http").get(url, { timeout: Number(ms) }, (res) => {
  let body = "";
  res.setEncoding("utf8");
  res.on("data", (d) => (body += d));
  res.on("end", () => { process.stdout.write(JSON.stringify({ status: res.statusCode, body })); process.exit(0); });
});
req.on("timeout", () => { req.destroy(); process.exit(2); });
req.on("error", () => process.exit(1));
setTimeout(() => process.exit(3), Number(ms) + 500);
`;

/**
 * GETs a URL from inside ns (a node one-liner; busybox wget crashes on this
 * machine). The body of a 200 answer, or null if there was none.
 */
export async function httpGet(ns: string, url: string, timeoutMs = 2000): Promise<string | null> {
  const r = await nsExec(ns, process.execPath, ["-e", HTTP_SCRIPT, url, String(timeoutMs)], { check: false, timeoutMs: timeoutMs + 10_000 });
  if (r.code !== 0) return null;
  try {
    const j = JSON.parse(r.stdout) as { status: number; body: string };
    return j.status === 200 ? j.body : null;
  } catch {
    return null;
  }
}

/** True if something in ns listens on this TCP port (any address). */
export async function listening(ns: string, port: number): Promise<boolean> {
  const r = await nsExec(ns, "ss", ["-Hltn", "sport", "=", `:${port}`], { check: false, timeoutMs: 5000 });
  return r.code === 0 && r.stdout.trim().length > 0;
}

async function waitListening(ns: string, port: number, child: ChildProcess, what: string, timeoutMs = 5000, proto: "tcp" | "udp" = "tcp"): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (let i = 0; i < 500; i++) {
    if (!alive(child)) throw new Error(`${what} in ${ns} exited (${child.exitCode ?? child.signalCode}) before listening on ${port}`);
    if (proto === "tcp" ? await listening(ns, port) : await udpBound(ns, port)) return;
    if (Date.now() > deadline) break;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`${what} in ${ns} not listening on ${port} after ${timeoutMs} ms`);
}

async function stopChild(child: ChildProcess, timeoutMs = 3000): Promise<void> {
  if (!alive(child)) return;
  const exited = new Promise((res) => child.once("exit", res));
  child.kill("SIGTERM");
  const t = setTimeout(() => alive(child) && child.kill("SIGKILL"), timeoutMs);
  await exited;
  clearTimeout(t);
}

export interface NsServer {
  ns: string;
  port: number;
  pid: number;
  stop(): Promise<void>;
}

/**
 * An HTTP server inside ns (busybox httpd, foreground, all addresses),
 * serving `body` at /. Its PID is kept (ip netns exec execs the command).
 */
export async function startHttpServer(ns: string, body: string, port = 80): Promise<NsServer> {
  checkNsName(ns);
  const dir = tempDir("www");
  writeFileSync(join(dir, "index.html"), body);
  const child = trackChild(
    spawn("ip", ["netns", "exec", ns, "/bin/busybox", "httpd", "-f", "-p", `0.0.0.0:${port}`, "-h", dir], { env: ENV, stdio: "ignore" }),
  );
  await waitListening(ns, port, child, "httpd");
  return { ns, port, pid: child.pid!, stop: () => stopChild(child) };
}

const TCP_SERVER_SCRIPT = `
const net = require("node:net");
const srv = net.createServer((s) => { s.on("error", () => {}); s.end(process.argv[2] + "\\n"); });
srv.listen(Number(process.argv[1]), "0.0.0.0");
process.on("SIGTERM", () => process.exit(0));
`;

const UNIX_FORWARD_SCRIPT = `
const net = require("node:net");
for (const pair of process.argv.slice(1)) {
  const i = pair.indexOf("=");
  const port = Number(pair.slice(0, i)), path = pair.slice(i + 1);
  net.createServer((c) => {
    const u = net.connect(path);
    const end = () => { c.destroy(); u.destroy(); };
    c.on("error", end); u.on("error", end); c.on("close", end); u.on("close", end);
    c.pipe(u); u.pipe(c);
  }).listen(port, "127.0.0.1");
}
process.on("SIGTERM", () => process.exit(0));
`;

/**
 * Inside ns, 127.0.0.1:port of each pair forwards to a unix socket of the
 * filesystem (node one-liner). A Redis Cluster's nodes announce
 * 127.0.0.1:port of the root namespace; with this a client in ns (the
 * gateway's metadata server) reaches them by the same addresses.
 */
export async function startUnixForward(ns: string, pairs: { port: number; socket: string }[]): Promise<NsServer> {
  checkNsName(ns);
  const args = pairs.map((p) => `${p.port}=${p.socket}`);
  const child = trackChild(spawn("ip", ["netns", "exec", ns, process.execPath, "-e", UNIX_FORWARD_SCRIPT, ...args], { env: ENV, stdio: "ignore" }));
  for (const p of pairs) await waitListening(ns, p.port, child, "unix forwarder");
  return { ns, port: pairs[0]?.port ?? 0, pid: child.pid!, stop: () => stopChild(child) };
}

/**
 * The Redis URL for a process inside namespace `ns` of the run (a gateway's
 * metadata server), where 127.0.0.1 of the root namespace is out of reach:
 * the cluster's URL with each node's 127.0.0.1:port forwarded to that node's
 * unix socket in the namespace (startUnixForward, ended with the run), or
 * else the redis-server's unix socket. Each call with a cluster starts a
 * forwarder: once per namespace (Harness.redisFrom keeps them).
 */
export async function redisUrlIn(
  ns: string,
  r: { server?: { socket: string }; cluster?: { url: string; nodes: { port: number; socket: string }[] } },
): Promise<string> {
  if (r.cluster) {
    await startUnixForward(ns, r.cluster.nodes);
    return r.cluster.url;
  }
  if (!r.server) throw new Error("redisUrlIn: neither a redis-server nor a cluster");
  return r.server.socket;
}

/** A TCP server inside ns (node one-liner) that writes `banner` to each client and closes. */
/** True if a UDP socket in ns is bound to this port (any address). */
async function udpBound(ns: string, port: number): Promise<boolean> {
  const r = await nsExec(ns, "ss", ["-Hlun", "sport", "=", `:${port}`], { check: false, timeoutMs: 5000 });
  return r.code === 0 && r.stdout.trim().length > 0;
}

const UDP_ECHO_SCRIPT = `
const s = require("node:dgram").createSocket("udp4");
s.on("message", (m, r) => s.send(m, r.port, r.address));
s.bind(Number(process.argv[1]), "0.0.0.0");
process.on("SIGTERM", () => process.exit(0));
`;

/** A UDP server inside ns that sends every datagram back to its sender. */
export async function startUdpEcho(ns: string, port: number): Promise<NsServer> {
  checkNsName(ns);
  const child = trackChild(spawn("ip", ["netns", "exec", ns, process.execPath, "-e", UDP_ECHO_SCRIPT, String(port)], { env: ENV, stdio: "ignore" }));
  await waitListening(ns, port, child, "udp echo", 5000, "udp");
  return { ns, port, pid: child.pid!, stop: () => stopChild(child) };
}

export async function startTcpServer(ns: string, port: number, banner = "hello"): Promise<NsServer> {
  checkNsName(ns);
  const child = trackChild(spawn("ip", ["netns", "exec", ns, process.execPath, "-e", TCP_SERVER_SCRIPT, String(port), banner], { env: ENV, stdio: "ignore" }));
  await waitListening(ns, port, child, "tcp server");
  return { ns, port, pid: child.pid!, stop: () => stopChild(child) };
}

export interface IperfResult {
  /** Throughput the receiver saw, Gbit/s. */
  gbps: number;
  /** Throughput the sender sent, Gbit/s. */
  sentGbps: number;
  retransmits: number;
}

export interface IperfOptions {
  /** Test duration, seconds (1–30). Default 3. */
  seconds?: number;
  /** Server sends, client receives (iperf3 -R). Default false: client sends. */
  reverse?: boolean;
  port?: number;
}

/**
 * Runs iperf3 between two namespaces: a one-off server (`iperf3 -s -1`) in
 * serverNs, and a client in clientNs connecting to serverAddr. Returns the
 * receiver's throughput. Both processes are bounded in time and killed by PID
 * afterwards.
 */
export async function iperf3(clientNs: string, serverNs: string, serverAddr: string, o: IperfOptions = {}): Promise<IperfResult> {
  checkNsName(clientNs);
  checkNsName(serverNs);
  const seconds = Math.min(30, Math.max(1, o.seconds ?? 3));
  const port = o.port ?? 5201;
  const server = trackChild(spawn("ip", ["netns", "exec", serverNs, "iperf3", "-s", "-1", "-p", String(port)], { env: ENV, stdio: "ignore" }));
  try {
    await waitListening(serverNs, port, server, "iperf3 server");
    const args = ["-c", serverAddr, "-p", String(port), "-t", String(seconds), "-J", "--connect-timeout", "2000"];
    if (o.reverse) args.push("-R");
    const r = await nsExec(clientNs, "iperf3", args, { check: false, timeoutMs: (seconds + 15) * 1000 });
    let j: { error?: string; end?: { sum_received?: { bits_per_second: number }; sum_sent?: { bits_per_second: number; retransmits?: number } } };
    try {
      j = JSON.parse(r.stdout);
    } catch {
      throw new Error(`iperf3 client ${clientNs} → ${serverAddr}: no JSON (exit ${r.code}): ${r.stderr.trim() || r.stdout.slice(0, 500)}`);
    }
    if (j.error || !j.end?.sum_received) throw new Error(`iperf3 client ${clientNs} → ${serverAddr}: ${j.error ?? "no result"}`);
    return {
      gbps: j.end.sum_received.bits_per_second / 1e9,
      sentGbps: (j.end.sum_sent?.bits_per_second ?? 0) / 1e9,
      retransmits: j.end.sum_sent?.retransmits ?? 0,
    };
  } finally {
    await stopChild(server, 2000);
  }
}

/** Sleeps ms milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * Polls fn until it returns true, at most `tries` times and `timeoutMs` in
 * total, `intervalMs` apart. Returns whether it became true.
 */
export async function waitFor(fn: () => Promise<boolean> | boolean, o: { timeoutMs?: number; intervalMs?: number; tries?: number } = {}): Promise<boolean> {
  const timeoutMs = o.timeoutMs ?? 10_000;
  const intervalMs = o.intervalMs ?? 100;
  const tries = o.tries ?? Math.ceil(timeoutMs / intervalMs) + 1;
  const deadline = Date.now() + timeoutMs;
  for (let i = 0; i < tries; i++) {
    if (await fn()) return true;
    if (Date.now() + intervalMs > deadline) break;
    await sleep(intervalMs);
  }
  return false;
}

// ---------------------------------------------------------------------------
// The root namespace, read only

export interface RootSnapshot {
  links: string[];
  addresses: string[];
  routes: string[];
  sysctls: Record<string, string>;
  nftHash: string;
}

const ROOT_SYSCTLS = ["net/ipv4/ip_forward", "net/ipv4/conf/all/forwarding", "net/ipv4/conf/all/proxy_arp", "net/bridge/bridge-nf-call-iptables"];

/**
 * What the tests promise not to change in the root namespace, read without
 * changing anything: link names and kinds, IPv4 addresses, main-table routes,
 * a few forwarding sysctls, and a digest of the nftables ruleset.
 */
export async function rootSnapshot(): Promise<RootSnapshot> {
  const l = JSON.parse((await run("ip", ["-d", "-j", "link", "show"])).stdout) as { ifname: string; linkinfo?: { info_kind?: string } }[];
  const a = JSON.parse((await run("ip", ["-4", "-j", "addr", "show"])).stdout) as { ifname: string; addr_info?: { local: string; prefixlen: number }[] }[];
  const r = (await run("ip", ["-4", "route", "show", "table", "main"])).stdout
    .split("\n")
    .map((x) => x.trim())
    .filter(Boolean);
  const sysctls: Record<string, string> = {};
  for (const s of ROOT_SYSCTLS) {
    try {
      sysctls[s] = readFileSync(`/proc/sys/${s}`, "utf8").trim();
    } catch {
      sysctls[s] = "absent";
    }
  }
  const nft = await run("nft", ["list", "ruleset"], { check: false });
  const { createHash } = await import("node:crypto");
  return {
    links: l.map((x) => `${x.ifname}:${x.linkinfo?.info_kind ?? ""}`).sort(),
    addresses: a.flatMap((x) => (x.addr_info ?? []).map((ai) => `${x.ifname}:${ai.local}/${ai.prefixlen}`)).sort(),
    routes: r.sort(),
    sysctls,
    nftHash: createHash("sha256").update(nft.stdout).digest("hex"),
  };
}

/** Differences between two root snapshots, as readable lines; empty if none. */
export function diffRoot(a: RootSnapshot, b: RootSnapshot): string[] {
  const out: string[] = [];
  const setDiff = (what: string, x: string[], y: string[]) => {
    const xs = new Set(x);
    const ys = new Set(y);
    for (const v of y) if (!xs.has(v)) out.push(`${what} added: ${v}`);
    for (const v of x) if (!ys.has(v)) out.push(`${what} removed: ${v}`);
  };
  setDiff("link", a.links, b.links);
  setDiff("address", a.addresses, b.addresses);
  setDiff("route", a.routes, b.routes);
  for (const k of Object.keys(a.sysctls)) if (a.sysctls[k] !== b.sysctls[k]) out.push(`sysctl ${k}: ${a.sysctls[k]} → ${b.sysctls[k]}`);
  if (a.nftHash !== b.nftHash) out.push("nftables ruleset changed");
  return out;
}

/**
 * The firewall chain a VM's traffic jumps to in its VPC namespace (through
 * the nic_in / nic_out map): its own nic_<id>_* if its drops are logged,
 * else the grp_* chain it shares with the NICs in the same groups; "" while
 * its address has none.
 */
export async function nicChain(vm: { vpcNs: string; address: string }, dir: "in" | "out"): Promise<string> {
  const r = await nsExec(vm.vpcNs, "nft", ["list", "map", "inet", "microvpc", `nic_${dir}`], { check: false });
  const m = new RegExp(`(?:^|[\\s{,])${vm.address.replace(/\./g, "\\.")} : jump ([A-Za-z0-9_]+)`).exec(r.stdout);
  return m?.[1] ?? "";
}

/** The rules of the chain nicChain names, as nft lists them ("" if none). */
export async function nicChainText(vm: { vpcNs: string; address: string }, dir: "in" | "out"): Promise<string> {
  const chain = await nicChain(vm, dir);
  return chain ? (await nsExec(vm.vpcNs, "nft", ["list", "chain", "inet", "microvpc", chain], { check: false })).stdout : "";
}
