// The WireGuard overlay between hypervisors: one WireGuard interface per VPC
// on each host, a full mesh between the hosts of that VPC.
//
// - Identity: DIR/<hostId>/wg.key (mode 0600), made with `wg genkey` on first
//   start; only the public key leaves the host (registry record in Redis,
//   `mvpc:hosts:<hostId>`, with a lease of leaseMs renewed every refreshMs).
// - Interface: a kernel WireGuard device when the module is usable (probed
//   at start, --wireguard), else `wireguard-go -f NAME`; made in the host
//   namespace (where the underlay is), given its MTU there, then moved into
//   the VPC namespace: its UDP socket stays in the host namespace. NAME is "wg" + 13 hex of sha256(host/vpc): unique
//   per machine (wireguard-go's control socket /var/run/wireguard/NAME.sock
//   is global) and at most 15 bytes. DIR/<hostId>/wg/NAME.pid keeps the
//   VPC, the implementation, the MTU and (wireguard-go) the PID, so that a
//   restarted agent adopts it (traffic keeps flowing) and a deleted VPC ends
//   exactly that process or deletes exactly that device.
// - Peers' records come from other hosts: each is validated before anything
//   of it reaches `wg set`; a bad one is skipped and reported, never fatal.
// - Peers: one per other live member host of the VPC (its lease current),
//   allowed-ips = that host's NIC /32s in the VPC, keepalive 25 s; a /32
//   route per remote NIC in the VPC namespace and proxy ARP on the subnet
//   bridges, so a VM ARPing for a same-subnet VM on another host gets the
//   bridge's MAC.
// - MTU: overlay MTU = underlay MTU − 60 over IPv4 (outer IPv4 20 + UDP 8 +
//   WireGuard 32: type/receiver/counter 16 + Poly1305 tag 16), − 80 over
//   IPv6 (outer header 40). The WireGuard interface, the bridges and the NICs
//   all get it, so a VM never sends a packet the tunnel would have to
//   fragment: a too-big packet with DF set is refused at the VM's own NIC
//   (EMSGSIZE / ICMP frag-needed), never dropped silently.
// - Changes travel as events on mvpc:events (nic.*, overlay.*, host.*):
//   every host re-reads the registry when one arrives, and every syncMs
//   anyway (lease expiry makes no event). While Redis is unreachable nothing
//   is removed: the last applied configuration keeps forwarding.
import { createHash, randomBytes } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, readFileSync, readdirSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { isIP } from "node:net";
import { availableParallelism } from "node:os";
import { join } from "node:path";
import ipaddr from "ipaddr.js";
import type { Redis } from "ioredis";
import type { Logger } from "pino";
import type { Agent } from "./agent.js";
import { run, startDaemon, type RunOptions, type RunResult } from "../common/exec.js";
import * as V from "../common/validate.js";
import type { LinkInfo } from "./kernel.js";
import { names } from "./plan.js";
import { K } from "../ipam/keys.js";
import { claimShapeProblem, verifyClaims, type ClaimEvidence, type RejectedClaim } from "./overlay/claims.js";
import { hostKeys, parseNicSpec, type InvalidRecord } from "./schema.js";
import { overlayKeys } from "./store.js";

export interface OverlayOptions {
  hostId: string;
  /** Namespace holding the underlay ("" = the agent's own). */
  hostNetns: string;
  /** This host's underlay address; default the first global address of underlayInterface. */
  underlayAddress?: string;
  underlayInterface: string;
  stateDir: string;
  leaseMs?: number;
  refreshMs?: number;
  syncMs?: number;
  agentVersion?: string;
  /** Which WireGuard to use (default "auto": the kernel module when usable). */
  wireguard?: WgMode;
  /** For tests: replaces the kernel probe. */
  probe?: WgProbe;
  /** For tests: replaces the commands that make, move, configure and read WireGuard interfaces. */
  commands?: WgCommands;
}

/** The commands behind an interface's life cycle: services/common/exec.ts's run. */
export interface WgCommands {
  run(file: string, args: string[], o?: RunOptions): Promise<RunResult>;
}

export interface HostRecord {
  id: string;
  publicKey: string;
  /** Underlay address (ports are per VPC, in the members hash). */
  address: string;
  mtu: number;
  underlayMtu: number;
  vpcIds: string[];
  registeredMs: number;
  keyCreatedMs: number;
  agentVersion: string;
}

export interface PeerWant {
  hostId: string;
  publicKey: string;
  endpoint: string;
  allowedIps: string[];
}

export interface DumpPeer {
  publicKey: string;
  endpoint: string;
  allowedIps: string[];
  latestHandshakeS: number;
  rxBytes: bigint;
  txBytes: bigint;
  keepalive: number;
}

export interface Dump {
  publicKey: string;
  listenPort: number;
  peers: DumpPeer[];
}

export const WG_OVERHEAD_V4 = 60;
export const WG_OVERHEAD_V6 = 80;
const KEEPALIVE = 25;
/** How long wireguard-go gets to read an MTU change (a netlink event) before its device leaves its namespace. */
const WG_MTU_SETTLE_MS = 150;
const WG_IF_RE = /^wg[0-9a-f]{13}$/;
const KEY_RE = /^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$/;

/** Which WireGuard runs an interface: the kernel module, or wireguard-go (userspace) where it is missing. */
export type WgImpl = "kernel" | "wireguard-go";
/** --wireguard: "auto" takes the kernel module when this host can make a kernel device. */
export type WgMode = "auto" | WgImpl;

export interface WgProbe {
  /** /sys/module/wireguard exists (the module is loaded or built in). */
  moduleLoaded(): boolean;
  /** `ip link add <probe> type wireguard` succeeded in the host namespace (the probe device is deleted again). */
  canCreate(): Promise<boolean>;
}

/**
 * The implementation new interfaces get. A loaded module alone is not enough
 * (a container may see /sys/module without being allowed to make devices),
 * and an unloaded one may still load on demand: the probe device decides.
 */
export async function selectImplementation(mode: WgMode, probe: WgProbe): Promise<{ impl: WgImpl; why: string }> {
  if (mode === "wireguard-go") return { impl: "wireguard-go", why: "--wireguard wireguard-go" };
  const ok = await probe.canCreate();
  if (ok) return { impl: "kernel", why: probe.moduleLoaded() ? "wireguard module loaded" : "wireguard module loaded on demand" };
  if (mode === "kernel") {
    throw new Error(
      `--wireguard kernel: cannot create a kernel WireGuard device (${probe.moduleLoaded() ? "the module is loaded but `ip link add … type wireguard` failed: missing CAP_NET_ADMIN?" : "no wireguard module: modprobe wireguard, or use --wireguard auto to fall back to wireguard-go"})`,
    );
  }
  return { impl: "wireguard-go", why: probe.moduleLoaded() ? "kernel device creation failed" : "no wireguard kernel module" };
}

/** Why a registry record (JSON text of mvpc:hosts:<id>, written by another host) cannot be used; "" when it can. */
export function recordProblem(id: string, raw: string): string {
  let r: Partial<Record<keyof HostRecord, unknown>>;
  try {
    r = JSON.parse(raw) as typeof r;
  } catch {
    return "record is not JSON";
  }
  if (typeof r !== "object" || r === null || Array.isArray(r)) return "record is not a JSON object";
  if (r.id !== id) return `record id ${JSON.stringify(r.id)} does not match its key ${JSON.stringify(id)}`;
  if (typeof r.publicKey !== "string" || !KEY_RE.test(r.publicKey))
    return `public key ${show(r.publicKey)} is not a base64 Curve25519 key (44 characters ending in =)`;
  if (typeof r.address !== "string" || !isIP(r.address)) return `underlay address ${show(r.address)} is not an IPv4 or IPv6 literal`;
  const bad = addressProblem(r.address);
  if (bad) return `underlay address ${r.address} ${bad}`;
  // Jumbo underlays (9000, 9216…) are legitimate; only nonsense is refused.
  if (typeof r.mtu !== "number" || !Number.isInteger(r.mtu) || r.mtu < 576 || r.mtu > 65535) return `mtu ${show(r.mtu)} is not an integer in 576–65535`;
  return "";
}

/** Why an overlay member entry (JSON {port} in mvpc:overlay:<vpc>:members) cannot be used; "" when it can. */
export function memberProblem(raw: string): string {
  let port: unknown;
  try {
    port = (JSON.parse(raw) as { port?: unknown }).port;
  } catch {
    return "member entry is not JSON";
  }
  if (typeof port !== "number" || !Number.isInteger(port) || port < 1 || port > 65535) return `listen port ${show(port)} is not an integer in 1–65535`;
  return "";
}

/** Why an IP literal cannot be a WireGuard endpoint; "" when it can. */
export function addressProblem(address: string): string {
  let range: string;
  try {
    range = ipaddr.parse(address).range();
  } catch {
    return "is not an IPv4 or IPv6 literal";
  }
  if (!isIP(address)) return "is not an IPv4 or IPv6 literal";
  if (range === "unspecified" || range === "broadcast") return `is the ${range} address, not a host's`;
  if (range === "multicast") return "is a multicast address, not a host's";
  return "";
}

/** A value from a record, for a message: strings quoted, others as JSON, cut at 60 characters. */
function show(v: unknown): string {
  const s = typeof v === "string" ? JSON.stringify(v) : (JSON.stringify(v) ?? String(v));
  return s.length > 60 ? `${s.slice(0, 60)}…` : s;
}

/** The WireGuard interface of a VPC on a host: unique per machine, 15 bytes. */
export function wgName(hostId: string, vpcId: string): string {
  return `wg${createHash("sha256").update(`${hostId}/${vpcId}`).digest("hex").slice(0, 13)}`;
}

/** Parses `wg show NAME dump`. The first line's private key is dropped here and never kept. */
export function parseDump(out: string): Dump {
  const lines = out.split("\n").filter((l) => l.trim() !== "");
  const first = (lines[0] ?? "").split("\t");
  const dump: Dump = { publicKey: first[1] ?? "", listenPort: Number(first[2] ?? 0), peers: [] };
  for (const l of lines.slice(1)) {
    const f = l.split("\t");
    if (f.length < 8) continue;
    dump.peers.push({
      publicKey: f[0],
      endpoint: f[2] === "(none)" ? "" : f[2],
      allowedIps: f[3] === "(none)" ? [] : f[3].split(",").filter(Boolean).sort(),
      latestHandshakeS: Number(f[4]),
      rxBytes: BigInt(f[5]),
      txBytes: BigInt(f[6]),
      keepalive: f[7] === "off" ? 0 : Number(f[7]),
    });
  }
  return dump;
}

/** `wg set` arguments that turn the dump into the wanted peers; [] when nothing differs. */
export function peerArgs(dump: Dump, want: PeerWant[]): string[] {
  const args: string[] = [];
  const wanted = new Map(want.map((p) => [p.publicKey, p]));
  for (const p of dump.peers) if (!wanted.has(p.publicKey)) args.push("peer", p.publicKey, "remove");
  const have = new Map(dump.peers.map((p) => [p.publicKey, p]));
  for (const w of want) {
    const h = have.get(w.publicKey);
    const allowed = [...w.allowedIps].sort();
    if (h && h.endpoint === w.endpoint && h.keepalive === KEEPALIVE && h.allowedIps.join(",") === allowed.join(",")) continue;
    args.push("peer", w.publicKey, "endpoint", w.endpoint, "persistent-keepalive", String(KEEPALIVE), "allowed-ips", allowed.join(","));
  }
  return args;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

function pidAlive(pid: number, ifname: string): boolean {
  try {
    const cmd = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
    return cmd.some((c) => c.endsWith("wireguard-go")) && cmd.includes(ifname);
  } catch {
    return false;
  }
}

export class Overlay {
  readonly leaseMs: number;
  readonly refreshMs: number;
  readonly syncMs: number;
  readonly dir: string;
  readonly keyFile: string;
  publicKey = "";
  keyCreatedMs = 0;
  registeredMs = 0;
  address = "";
  underlayMtu = 0;
  mtu = 0;
  /** Last applied peers per VPC (what is kept while Redis is away). */
  readonly applied = new Map<string, PeerWant[]>();
  readonly ports = new Map<string, number>();
  lastError = "";
  /** What new interfaces get (adopted ones keep theirs) and why. */
  impl: WgImpl = "wireguard-go";
  implWhy = "";
  /** Address claims not installed, with the reason, per VPC (claims.ts). */
  readonly rejected = new Map<string, RejectedClaim[]>();
  /** Registry records or member entries of other hosts that were skipped, with the reason, per VPC. */
  readonly skipped = new Map<string, { hostId: string; reason: string }[]>();
  /** Each (host, reason) is logged once, not every sync. */
  private readonly loggedSkips = new Set<string>();
  /** When a Redis read last failed (0 = never). */
  private redisFailMs = 0;
  private stopped = false;
  private timers: NodeJS.Timeout[] = [];
  private sub?: Redis;
  private running?: Promise<void>;
  private dirty = false;
  private mutex: Promise<unknown> = Promise.resolve();

  constructor(
    readonly agent: Agent,
    readonly redis: Redis,
    readonly opts: OverlayOptions,
    readonly log: Logger,
  ) {
    this.leaseMs = opts.leaseMs ?? 15_000;
    this.refreshMs = opts.refreshMs ?? 5_000;
    this.syncMs = opts.syncMs ?? 2_000;
    this.dir = join(opts.stateDir, opts.hostId);
    this.keyFile = join(this.dir, "wg.key");
  }

  get hostId(): string {
    return this.opts.hostId;
  }

  /** Serialises key changes and syncs. */
  private locked<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.mutex.then(fn, fn);
    this.mutex = p.catch(() => undefined);
    return p;
  }

  private ipArgs(ns: string): string[] {
    return ns ? ["-n", ns] : [];
  }

  private get cmd(): WgCommands {
    return this.opts.commands ?? { run };
  }

  /** The real probe: a throwaway kernel WireGuard device in the host namespace. */
  private kernelProbe(): WgProbe {
    return {
      moduleLoaded: () => existsSync("/sys/module/wireguard"),
      canCreate: async () => {
        const probe = `wgp${randomBytes(6).toString("hex")}`;
        const r = await this.cmd.run("ip", [...this.ipArgs(this.opts.hostNetns), "link", "add", probe, "type", "wireguard"], { check: false });
        if (r.exitCode !== 0) return false;
        await this.cmd.run("ip", [...this.ipArgs(this.opts.hostNetns), "link", "del", probe], { check: false });
        return true;
      },
    };
  }

  /** Runs wg for an interface: a kernel device is reached over netlink, so from inside its VPC namespace; wireguard-go through its global socket. */
  private async wgRun(ifname: string, args: string[]): Promise<string> {
    const st = this.readState(ifname);
    const r =
      st.impl === "kernel" && st.vpcId ? await this.cmd.run("ip", ["netns", "exec", this.agent.nsOf(st.vpcId), "wg", ...args]) : await this.cmd.run("wg", args);
    return r.stdout;
  }

  /** The interface's state file: wireguard-go's PID (0 for a kernel device), its VPC and implementation. */
  private readState(ifname: string): { pid: number; vpcId: string; impl: WgImpl; mtu: number; rps?: boolean } {
    try {
      const j = JSON.parse(readFileSync(this.pidFile(ifname), "utf8")) as { pid?: number; vpcId?: string; impl?: WgImpl; mtu?: number; rps?: boolean };
      return { pid: j.pid ?? 0, vpcId: j.vpcId ?? "", impl: j.impl === "kernel" ? "kernel" : "wireguard-go", mtu: j.mtu ?? 0, ...(j.rps ? { rps: true } : {}) };
    } catch {
      return { pid: 0, vpcId: "", impl: this.impl, mtu: 0 };
    }
  }

  /**
   * RPS on a wireguard-go interface: this wireguard-go writes each decrypted
   * packet to its TUN, and the kernel routes, bridges and delivers it to the
   * VM inside that write(), on the thread that drains the receive queue in
   * order. With RPS that work goes to a softirq on another CPU and the
   * writer returns at once (bench:overlay, 10 interleaved rounds: 0.305 →
   * 0.360 Gbit/s, 80 % → 94 % of the raw tunnel). A device setting of the
   * VPC namespace; done once per interface (recorded in its state file).
   */
  private async spreadReceive(vpcId: string, ifname: string): Promise<void> {
    const st = this.readState(ifname);
    const cpus = Math.min(availableParallelism(), 32);
    if (st.rps || st.impl !== "wireguard-go" || cpus < 2) return;
    const mask = (2 ** cpus - 1).toString(16);
    try {
      await this.cmd.run("ip", ["netns", "exec", this.agent.nsOf(vpcId), "tee", `/sys/class/net/${ifname}/queues/rx-0/rps_cpus`], { input: mask });
      writeFileSync(this.pidFile(ifname), JSON.stringify({ ...st, rps: true }), { mode: 0o600 });
    } catch (err) {
      this.log.warn({ vpc: vpcId, interface: ifname, err: (err as Error).message }, "cannot set RPS on the overlay interface; it forwards, more slowly");
    }
  }

  /** The implementation behind an interface of this host. */
  implementationOf(ifname: string): WgImpl {
    return this.readState(ifname).impl;
  }

  /** Cheap liveness: wireguard-go's process, or (kernel) the VPC namespace that holds the device. */
  private interfaceAlive(ifname: string): boolean {
    const st = this.readState(ifname);
    if (st.impl === "kernel") return st.vpcId !== "" && existsSync(`/run/netns/${this.agent.nsOf(st.vpcId)}`);
    return pidAlive(st.pid, ifname);
  }

  /** Reads the underlay (address, MTU), loads or makes the key. Called once before start(). */
  async init(): Promise<void> {
    mkdirSync(join(this.dir, "wg"), { recursive: true, mode: 0o700 });
    const where = this.opts.hostNetns ? ` in namespace ${this.opts.hostNetns}` : "";
    const { stdout: out } = await run("ip", [...this.ipArgs(this.opts.hostNetns), "-j", "addr", "show", "dev", this.opts.underlayInterface]).catch(
      (err: Error) => {
        throw new Error(
          `--underlay-interface ${this.opts.underlayInterface}: no such device${where} (${err.message.split("\n")[0]}); give the interface that carries the underlay (see \`ip link\`)`,
        );
      },
    );
    const l = (JSON.parse(out || "[]") as { mtu?: number; addr_info?: { family: string; local: string; scope: string }[] }[])[0];
    if (!l) throw new Error(`--underlay-interface ${this.opts.underlayInterface}: no such device${this.opts.hostNetns ? ` in ${this.opts.hostNetns}` : ""}`);
    this.underlayMtu = l.mtu ?? 1500;
    this.address = this.opts.underlayAddress ?? (l.addr_info ?? []).find((a) => a.family === "inet" && a.scope === "global")?.local ?? "";
    if (!this.address) throw new Error(`${this.opts.underlayInterface} has no global IPv4 address; give --underlay-address`);
    this.mtu = this.underlayMtu - (this.address.includes(":") ? WG_OVERHEAD_V6 : WG_OVERHEAD_V4);
    const sel = await selectImplementation(this.opts.wireguard ?? "auto", this.opts.probe ?? this.kernelProbe());
    this.impl = sel.impl;
    this.implWhy = sel.why;
    if (existsSync(this.keyFile)) {
      chmodSync(this.keyFile, 0o600);
      this.keyCreatedMs = Date.now();
      this.publicKey = await this.pubkeyOf(readFileSync(this.keyFile, "utf8"));
      try {
        const m = JSON.parse(readFileSync(join(this.dir, "wg.meta"), "utf8")) as { keyCreatedMs?: number };
        if (m.keyCreatedMs) this.keyCreatedMs = m.keyCreatedMs;
      } catch {
        // no metadata: keep now
      }
    } else {
      await this.newKey();
    }
    this.registeredMs = Date.now();
  }

  private async pubkeyOf(priv: string): Promise<string> {
    // check: false and a message of our own: no error ever quotes the private key.
    const r = await run("wg", ["pubkey"], { input: priv.trim() + "\n", check: false });
    if (r.exitCode !== 0) throw new Error(`${this.keyFile}: wg pubkey failed (not a WireGuard private key?)`);
    const pub = r.stdout.trim();
    if (!KEY_RE.test(pub)) throw new Error(`${this.keyFile}: not a WireGuard private key`);
    return pub;
  }

  /** Makes a new key pair: written 0600 then renamed over the old one. Never logged. */
  private async newKey(): Promise<void> {
    const g = await run("wg", ["genkey"], { check: false });
    if (g.exitCode !== 0) throw new Error("wg genkey failed");
    const priv = g.stdout.trim();
    const pub = await this.pubkeyOf(priv);
    const tmp = `${this.keyFile}.tmp`;
    writeFileSync(tmp, priv + "\n", { mode: 0o600 });
    chmodSync(tmp, 0o600);
    renameSync(tmp, this.keyFile);
    this.publicKey = pub;
    this.keyCreatedMs = Date.now();
    writeFileSync(join(this.dir, "wg.meta"), JSON.stringify({ keyCreatedMs: this.keyCreatedMs }), { mode: 0o600 });
  }

  record(): HostRecord {
    return {
      id: this.hostId,
      publicKey: this.publicKey,
      address: this.address,
      mtu: this.mtu,
      underlayMtu: this.underlayMtu,
      vpcIds: [...this.agent.desired.vpcs.keys()].sort(),
      registeredMs: this.registeredMs,
      keyCreatedMs: this.keyCreatedMs,
      agentVersion: this.opts.agentVersion ?? "",
    };
  }

  /** Renews the lease; announces the host when the record was missing or changed key. */
  async publish(kind?: string): Promise<void> {
    const key = overlayKeys.host(this.hostId);
    const rec = JSON.stringify(this.record());
    const prev = (await this.redis.call("SET", key, rec, "PX", String(this.leaseMs), "GET")) as string | null;
    let announce = kind;
    if (!announce) {
      if (!prev) announce = "host.registered";
      else if ((JSON.parse(prev) as HostRecord).publicKey !== this.publicKey) announce = "host.rotated";
    }
    if (!prev) await this.redis.sadd(overlayKeys.hostIndex, this.hostId);
    if (announce) await this.redis.xadd("mvpc:events", "MAXLEN", "~", "100000", "*", "kind", announce, "host", this.hostId);
  }

  start(): void {
    let failing = false;
    const refresh = async () => {
      if (this.stopped) return;
      try {
        await this.publish();
        failing = false;
      } catch (err) {
        if (!failing) this.log.warn({ err: (err as Error).message }, "cannot renew the host lease; retrying");
        failing = true;
      }
      // While Redis is away, retry often: the lease must be back as soon as Redis is.
      if (!this.stopped) this.timers.push(setTimeout(refresh, failing ? 250 : this.refreshMs).unref());
    };
    const periodic = async () => {
      if (this.stopped) return;
      await this.syncAll(false);
      if (!this.stopped) this.timers.push(setTimeout(periodic, this.syncMs).unref());
    };
    void refresh().then(periodic);
    void this.watch();
  }

  /** Follows mvpc:events on its own connection; a relevant event triggers a sync at once. */
  private async watch(): Promise<void> {
    this.sub = this.redis.duplicate();
    this.sub.on("error", () => undefined);
    let last = "$";
    while (!this.stopped) {
      try {
        const r = (await this.sub.xread("COUNT", 1000, "BLOCK", 1000, "STREAMS", "mvpc:events", last)) as [string, [string, string[]][]][] | null;
        if (!r) continue;
        let kick = false;
        for (const [, entries] of r) {
          for (const [id, fields] of entries) {
            last = id;
            const kind = fields[fields.indexOf("kind") + 1] ?? "";
            const host = fields[fields.indexOf("host") + 1] ?? "";
            if (/^(nic|overlay|host)\./.test(kind) && !(kind.startsWith("host.") && host === this.hostId)) kick = true;
          }
        }
        if (kick) void this.syncAll();
      } catch {
        if (!this.stopped) await sleep(500);
      }
    }
  }

  /**
   * Runs a sync now, or once more after the running one. `full` (events,
   * API calls) always compares the kernel; otherwise (timers) the kernel is
   * only read when Redis says something changed or every fullEveryMs.
   */
  syncAll(full = true): Promise<void> {
    this.pendingFull ||= full;
    if (this.running) {
      this.dirty = true;
      return this.running;
    }
    this.running = (async () => {
      for (let i = 0; i < 5; i++) {
        this.dirty = false;
        const f = this.pendingFull;
        this.pendingFull = false;
        await this.locked(() => this.syncOnce(f));
        if (!this.dirty || this.stopped) break;
      }
    })().finally(() => (this.running = undefined));
    return this.running;
  }

  private pendingFull = false;
  private readonly lastFull = new Map<string, { ms: number; port: number; key: string }>();
  readonly fullEveryMs = 30_000;

  private async syncOnce(full: boolean): Promise<void> {
    const errors: string[] = [];
    const vpcs = [...this.agent.desired.vpcs.keys()];
    for (const vpcId of vpcs) {
      if (this.stopped) return;
      if (!existsSync(`/run/netns/${this.agent.nsOf(vpcId)}`)) continue;
      try {
        await this.agent.withLock(vpcId, () => this.syncVpc(vpcId, full));
      } catch (err) {
        errors.push(`${vpcId}: ${(err as Error).message}`);
      }
    }
    // Interfaces of VPCs this host no longer has (only judged on a state read from Redis).
    for (const f of this.agent.loaded ? this.pidFiles() : []) {
      const vpc = f.vpcId;
      if (!vpc || this.agent.desired.vpcs.has(vpc)) continue;
      await this.agent
        .withLock(vpc, async () => {
          if (this.agent.desired.vpcs.has(vpc) || (await this.agent.store.hasVpc(vpc))) return;
          await this.teardown(vpc);
        })
        .catch((err) => errors.push(`${vpc}: ${(err as Error).message}`));
    }
    this.lastError = errors.join("; ");
    if (this.lastError) this.log.warn({ err: this.lastError }, "overlay sync");
  }

  /** VPCs with a running interface here, known to the desired state or not (e.g. right after a restart). */
  runningVpcs(): string[] {
    return this.pidFiles()
      .filter((f) => f.vpcId && this.interfaceAlive(f.ifname))
      .map((f) => f.vpcId);
  }

  private pidFiles(): { ifname: string; vpcId: string; pid: number }[] {
    const out = [];
    let files: string[];
    try {
      files = readdirSync(join(this.dir, "wg"));
    } catch {
      return [];
    }
    for (const f of files) {
      const m = /^(wg[0-9a-f]{13})\.pid$/.exec(f);
      if (!m) continue;
      try {
        const j = JSON.parse(readFileSync(join(this.dir, "wg", f), "utf8")) as { pid: number; vpcId: string };
        out.push({ ifname: m[1], vpcId: j.vpcId, pid: j.pid });
      } catch {
        // half-written: ignored
      }
    }
    return out;
  }

  private pidFile(ifname: string): string {
    return join(this.dir, "wg", `${ifname}.pid`);
  }

  private readPid(ifname: string): number {
    try {
      return (JSON.parse(readFileSync(this.pidFile(ifname), "utf8")) as { pid: number }).pid;
    } catch {
      return 0;
    }
  }

  async dump(ifname: string): Promise<Dump | null> {
    const st = this.readState(ifname);
    const r =
      st.impl === "kernel" && st.vpcId
        ? await this.cmd.run("ip", ["netns", "exec", this.agent.nsOf(st.vpcId), "wg", "show", ifname, "dump"], { check: false })
        : await this.cmd.run("wg", ["show", ifname, "dump"], { check: false });
    if (r.exitCode !== 0) return null;
    return parseDump(r.stdout);
  }

  /** Makes sure the VPC's interface runs, sits in the VPC namespace, is up with the right key and MTU. */
  async ensureInterface(vpcId: string): Promise<{ ifname: string; port: number; dump: Dump }> {
    const ifname = wgName(this.hostId, vpcId);
    const vns = this.agent.nsOf(vpcId);
    const hns = this.opts.hostNetns;
    const st = this.readState(ifname);
    let inVpc: LinkInfo | null;
    // An interface keeps the implementation it was made with (a restarted
    // agent adopts it, traffic never stops); a new one gets this.impl.
    const kernelDev = async () => {
      const l = (await this.agent.kernel.link(vns, ifname)) ?? (await this.agent.kernel.link(hns, ifname));
      return l?.kind === "wireguard";
    };
    const impl = st.vpcId === vpcId && st.impl === "kernel" && (await kernelDev()) ? "kernel" : this.impl;
    if (impl === "kernel") {
      inVpc = await this.agent.kernel.link(vns, ifname);
      if (inVpc && inVpc.kind !== "wireguard") {
        // A wireguard-go device left from before: replaced by a kernel one.
        await this.killPid(st.pid, ifname);
        await this.agent.kernel.ipBatch(vns, [`link del dev ${ifname}`]);
        rmSync(`/var/run/wireguard/${ifname}.sock`, { force: true });
        inVpc = null;
      }
      if (!inVpc && !(await this.agent.kernel.link(hns, ifname))) {
        // Made in the host namespace so that its UDP socket lives there, then moved.
        await this.cmd.run("ip", [...this.ipArgs(hns), "link", "add", ifname, "type", "wireguard"]);
        this.log.info({ vpc: vpcId, interface: ifname }, "created kernel WireGuard interface");
      }
      if (st.impl !== "kernel" || st.vpcId !== vpcId) writeFileSync(this.pidFile(ifname), JSON.stringify({ pid: 0, vpcId, impl: "kernel" }), { mode: 0o600 });
    } else {
      inVpc = await this.startUserspace(vpcId, ifname);
    }
    if (!inVpc) {
      // The MTU is set before the move, where wireguard-go runs: it learns
      // its MTU only from link events in its own namespace (for the ifindex
      // it created) and pads every packet up to the MTU it knows. Set after
      // the move, it kept its default 1420 under a 1440 device, padded each
      // full-size packet to 1452 and the underlay fragmented every one of
      // them (measured: two fragments per data packet, reassembly and a
      // full UDP buffer on the receiver).
      const l = await this.agent.kernel.link(hns, ifname);
      if (l && l.mtu !== this.mtu) {
        await this.cmd.run("ip", [...this.ipArgs(hns), "link", "set", "dev", ifname, "mtu", String(this.mtu)]);
        if (impl === "wireguard-go") await sleep(WG_MTU_SETTLE_MS);
      }
      writeFileSync(this.pidFile(ifname), JSON.stringify({ ...this.readState(ifname), vpcId, impl, mtu: this.mtu }), { mode: 0o600 });
      await this.cmd.run("ip", [...this.ipArgs(hns), "link", "set", "dev", ifname, "netns", vns]);
      inVpc = await this.agent.kernel.link(vns, ifname);
      if (!inVpc) throw new Error(`${ifname} did not arrive in ${vns}`);
    }
    let dump = await this.dump(ifname);
    if (!dump) throw new Error(`wg show ${ifname} failed`);
    if (dump.publicKey !== this.publicKey) {
      await this.wgRun(ifname, ["set", ifname, "private-key", this.keyFile, ...(dump.listenPort ? [] : ["listen-port", "0"])]);
    }
    if (!inVpc.up || inVpc.mtu !== this.mtu) await this.agent.kernel.ipBatch(vns, [`link set dev ${ifname} mtu ${this.mtu} up`]);
    await this.spreadReceive(vpcId, ifname);
    if (dump.publicKey !== this.publicKey || !inVpc.up) dump = (await this.dump(ifname)) ?? dump;
    return { ifname, port: dump.listenPort, dump };
  }

  /** wireguard-go for the interface: adopts the running process (by its PID file) or starts one in the host namespace. Returns the device if it is already in the VPC namespace. */
  private async startUserspace(vpcId: string, ifname: string): Promise<LinkInfo | null> {
    const vns = this.agent.nsOf(vpcId);
    const hns = this.opts.hostNetns;
    const pid = this.readPid(ifname);
    let alive = pid > 0 && pidAlive(pid, ifname);
    const inVpc = alive ? await this.agent.kernel.link(vns, ifname) : null;
    if (alive && !inVpc && !(await this.agent.kernel.link(hns, ifname))) {
      // Its device is gone (the namespace was deleted under it): start over.
      await this.killPid(pid, ifname);
      alive = false;
    }
    if (alive && inVpc && this.readState(ifname).mtu !== this.mtu) {
      // It runs with another MTU than this agent's (the underlay changed, or
      // an agent from before the MTU was set in place): wireguard-go cannot
      // learn a new one once moved, so it is restarted (a brief interruption).
      this.log.warn(
        { vpc: vpcId, interface: ifname, mtu: this.readState(ifname).mtu || "unknown", want: this.mtu },
        "restarting wireguard-go to change its MTU",
      );
      await this.killPid(pid, ifname);
      alive = false;
    }
    if (alive) return inVpc;
    rmSync(`/var/run/wireguard/${ifname}.sock`, { force: true });
    const stale = await this.agent.kernel.link(vns, ifname);
    if (stale) await this.agent.kernel.ipBatch(vns, [`link del dev ${ifname}`]);
    const { proc: child, pid: childPid } = await startDaemon("wireguard-go", ["-f", ifname], {
      netns: hns,
      detached: true,
      env: { WG_PROCESS_FOREGROUND: "1", LOG_LEVEL: "error" },
    });
    writeFileSync(this.pidFile(ifname), JSON.stringify({ pid: childPid, vpcId, impl: "wireguard-go" }), { mode: 0o600 });
    let ok = false;
    for (let i = 0; i < 200 && !ok; i++) {
      if (child.exitCode !== null) break;
      ok = existsSync(`/var/run/wireguard/${ifname}.sock`);
      if (!ok) await sleep(10);
    }
    if (!ok) {
      try {
        process.kill(childPid, "SIGKILL");
      } catch {
        // gone
      }
      throw new Error(`wireguard-go ${ifname} did not start`);
    }
    this.log.info({ vpc: vpcId, interface: ifname, pid: childPid }, "started wireguard-go");
    return null;
  }

  /** Desired peers of one VPC from Redis; throws if Redis cannot be read. */
  async wantedPeers(vpcId: string): Promise<PeerWant[]> {
    // A peered VPC's NICs ride this VPC's tunnel to their host (peering-plan.ts): they join that host's allowed-ips.
    const routed = this.agent.peering?.routedPeers(vpcId) ?? [];
    const [members, own, ...peerAddrs] = await Promise.all([
      this.redis.hgetall(overlayKeys.members(vpcId)),
      this.redis.hgetall(overlayKeys.addrs(vpcId)),
      ...routed.map((r) => this.redis.hgetall(overlayKeys.addrs(r.vpcId))),
    ]);
    // Every claim is checked (claims.ts says how) before it reaches `wg set` or a route.
    const memberHosts = Object.keys(members);
    const addrs: Record<string, string> = {};
    const rejected: RejectedClaim[] = [];
    const invalid: InvalidRecord[] = [];
    const mine = await this.vpcCidr(vpcId);
    const sources = [{ vpcId, within: mine ? [mine] : [], allowed: null as V.Cidr[] | null, raw: own }];
    for (const [i, r] of routed.entries()) {
      const peer = await this.vpcCidr(r.vpcId);
      // The peering's allowed CIDRs (validated by peering/schema.ts) must also lie in the peer VPC.
      const allowed = peer
        ? r.cidrs.flatMap((c) => {
            try {
              const x = V.cidr("allowed", c, { min: 8, max: 32 });
              return V.contains(peer, x) ? [x] : [];
            } catch {
              return [];
            }
          })
        : [];
      sources.push({ vpcId: r.vpcId, within: peer ? [peer] : [], allowed, raw: peerAddrs[i] });
    }
    for (const src of sources) {
      const r = await this.verifiedClaims(src.vpcId, src.within, src.allowed, src.raw, memberHosts);
      for (const [a, h] of r.accepted) addrs[a] = h;
      rejected.push(...r.rejected);
      for (const x of r.rejected)
        invalid.push({ kind: "overlay-addr", key: overlayKeys.addrs(src.vpcId), field: x.address, reason: `claimed by ${x.hostId}: ${x.reason}` });
    }
    if (rejected.length)
      this.rejected.set(
        vpcId,
        rejected.sort((x, y) => x.address.localeCompare(y.address)),
      );
    else this.rejected.delete(vpcId);
    this.agent.invalid.report(`overlay:${vpcId}`, invalid);
    const others = Object.keys(members)
      .filter((h) => h !== this.hostId)
      .sort();
    if (others.length === 0) return [];
    const recs = await this.redis.mget(...others.map((h) => overlayKeys.host(h)));
    const want: PeerWant[] = [];
    const skipped: { hostId: string; reason: string }[] = [];
    others.forEach((h, i) => {
      // Records come from other hosts: nothing unchecked reaches `wg set`,
      // and one bad record costs only that host's peer, never the mesh.
      const raw = recs[i];
      if (!raw) return; // lease expired: not a fault
      const problem = recordProblem(h, raw) || memberProblem(members[h]);
      if (problem) {
        skipped.push({ hostId: h, reason: problem });
        return;
      }
      const rec = JSON.parse(raw) as HostRecord;
      if (rec.publicKey === this.publicKey) return;
      const port = (JSON.parse(members[h]) as { port: number }).port;
      const allowed = Object.entries(addrs)
        .filter(([, host]) => host === h)
        .map(([a]) => `${a}/32`)
        .sort();
      const ep = rec.address.includes(":") ? `[${rec.address}]:${port}` : `${rec.address}:${port}`;
      want.push({ hostId: h, publicKey: rec.publicKey, endpoint: ep, allowedIps: allowed });
    });
    this.noteSkipped(vpcId, skipped);
    return want;
  }

  /** The VPC's CIDR from IPAM's record (null if missing or malformed). */
  private async vpcCidr(vpcId: string): Promise<V.Cidr | null> {
    const c = await this.redis.hget(K.vpc(vpcId), "cidr");
    try {
      return c ? V.cidr("cidr", c, { min: 8, max: 28 }) : null;
    } catch {
      return null;
    }
  }

  /**
   * Where each NIC address of one VPC goes, from the evidence claims.ts
   * names (the addrs hash only nominates), as [address, host].
   * `allowed` (a peered VPC's NICs): only addresses inside these are this
   * tunnel's; others are silently not wanted here.
   */
  private async verifiedClaims(
    vpcId: string,
    within: V.Cidr[],
    allowed: V.Cidr[] | null,
    raw: Record<string, string>,
    memberHosts: string[],
  ): Promise<{ accepted: [string, string][]; rejected: RejectedClaim[] }> {
    const rejected: RejectedClaim[] = [];
    const wanted = (a: string) =>
      !allowed ||
      allowed.some((c) => {
        const n = V.ipToInt(a);
        return n >= c.base && n < c.base + c.size;
      });
    const claims = new Map<string, string>();
    for (const [a, h] of Object.entries(raw)) {
      const bad = claimShapeProblem(a, h, within);
      if (bad) {
        // Shown as found when printable, else quoted with escapes.
        const shown = (v: string) => (/^[\x21-\x7e]{1,64}$/.test(v) ? v : V.show(v));
        rejected.push({ address: shown(a), hostId: shown(h), reason: bad });
        continue;
      }
      if (h === this.hostId || !wanted(a)) continue; // our own claims are never installed here
      claims.set(a, h);
    }
    // The NIC indexes of every member host and every claiming host.
    const hosts = [...new Set([...memberHosts, ...claims.values()])].filter((h) => /^[a-z0-9-]{1,63}$/.test(h) && h !== this.hostId).sort();
    const indexes = await Promise.all(hosts.map((h) => this.redis.hgetall(hostKeys.nicaddr(h))));
    const ev: ClaimEvidence = { indexed: new Map(), nicRecords: new Map(), subnets: new Map(), allocOwners: new Map() };
    const prefix = `${vpcId}/`;
    hosts.forEach((h, i) => {
      for (const [k, nicId] of Object.entries(indexes[i])) {
        if (!k.startsWith(prefix)) continue;
        const a = k.slice(prefix.length);
        if (claimShapeProblem(a, h, within) || !wanted(a)) continue;
        const l = ev.indexed.get(a) ?? [];
        l.push({ hostId: h, nicId });
        ev.indexed.set(a, l);
      }
    });
    const addresses = [...new Set([...claims.keys(), ...ev.indexed.keys()])];
    if (addresses.length === 0) return { accepted: [], rejected };
    // Only unambiguous entries need their NIC record, subnet and allocation.
    const single = [...ev.indexed.values()].filter((l) => l.length === 1 && /^nic-[0-9a-f]{12}$/.test(l[0].nicId)).map((l) => l[0]);
    const nicRaw = await Promise.all(single.map((x) => this.redis.hget(hostKeys.nics(x.hostId), x.nicId)));
    single.forEach((x, i) => ev.nicRecords.set(`${x.hostId}/${x.nicId}`, nicRaw[i]));
    const nics = single.flatMap((x, i) => {
      const p = nicRaw[i] ? parseNicSpec(x.nicId, nicRaw[i]!) : null;
      return p?.ok ? [p.value] : [];
    });
    const subnetIds = [...new Set(nics.map((n) => n.subnetId))];
    const subs = await Promise.all(subnetIds.map((id) => this.redis.hmget(K.subnet(id), "vpc", "cidr")));
    subnetIds.forEach((id, i) => ev.subnets.set(id, subs[i][0] && subs[i][1] ? { vpcId: subs[i][0]!, cidr: subs[i][1]! } : null));
    const allocKeys: [string, number][] = [];
    for (const n of nics) {
      const sn = ev.subnets.get(n.subnetId);
      if (!sn) continue;
      try {
        const idx = V.ipToInt(n.address) - V.cidr("cidr", sn.cidr, { min: 8, max: 28 }).base;
        if (idx >= 0) allocKeys.push([n.subnetId, idx]);
      } catch {
        // verifyClaims says why
      }
    }
    const allocs = await Promise.all(allocKeys.map(([sid, idx]) => this.redis.hget(K.alloc(sid), String(idx))));
    allocKeys.forEach(([sid, idx], i) => ev.allocOwners.set(`${sid}/${idx}`, allocs[i] === null ? null : allocs[i]!.split("\n")[0]));
    const local = new Set(this.agent.nicsOf(vpcId).map((n) => n.address));
    const r = verifyClaims(vpcId, addresses, claims, ev, local);
    return { accepted: r.accepted, rejected: [...rejected, ...r.rejected] };
  }

  /** Keeps the skipped hosts for GetOverlayStatus and logs each (host, reason) once. */
  private noteSkipped(vpcId: string, skipped: { hostId: string; reason: string }[]): void {
    if (skipped.length) this.skipped.set(vpcId, skipped);
    else this.skipped.delete(vpcId);
    for (const x of skipped) {
      const k = `${x.hostId}\0${x.reason}`;
      if (this.loggedSkips.has(k)) continue;
      if (this.loggedSkips.size > 10_000) this.loggedSkips.clear();
      this.loggedSkips.add(k);
      this.log.warn(
        { vpc: vpcId, host: x.hostId, reason: x.reason },
        "skipping a malformed host registry entry: that host gets no peer until it publishes a valid record",
      );
    }
  }

  async syncVpc(vpcId: string, full = true): Promise<string[]> {
    const changes: string[] = [];
    const vns = this.agent.nsOf(vpcId);
    const last = this.lastFull.get(vpcId);
    const me = wgName(this.hostId, vpcId);
    if (!full && last && Date.now() - last.ms < this.fullEveryMs && last.key === this.publicKey && this.interfaceAlive(me)) {
      // Cheap pass: Redis only, no exec, unless something changed.
      try {
        const [mine, fresh] = await Promise.all([this.redis.hget(overlayKeys.members(vpcId), this.hostId), this.wantedPeers(vpcId)]);
        if (mine === JSON.stringify({ port: last.port }) && JSON.stringify(fresh) === JSON.stringify(this.applied.get(vpcId))) return changes;
      } catch {
        this.redisFailMs = Date.now();
        return changes;
      }
    }
    const { ifname, port, dump } = await this.ensureInterface(vpcId);
    let want = this.applied.get(vpcId);
    try {
      // Checked on every full pass, not only when the port changed: the
      // members hash is shared (any host's Redis user may write it, see
      // docs/redis-acl.md), so an entry of ours that another host deleted or
      // rewrote is put back here.
      {
        const cur = await this.redis.hget(overlayKeys.members(vpcId), this.hostId);
        if (cur !== JSON.stringify({ port })) {
          await this.redis.hset(overlayKeys.members(vpcId), this.hostId, JSON.stringify({ port }));
          await this.redis.xadd("mvpc:events", "MAXLEN", "~", "100000", "*", "kind", "overlay.joined", "host", this.hostId, "vpc", vpcId);
          changes.push(`joined overlay of ${vpcId} on port ${port}`);
        }
        this.ports.set(vpcId, port);
      }
      const fresh = await this.wantedPeers(vpcId);
      // Just after an outage every lease may have run out while nobody could
      // renew it: keep the hosts we had until they had time to register again.
      if (want && Date.now() - this.redisFailMs < this.refreshMs + 2000) {
        const ids = new Set(fresh.map((p) => p.hostId));
        want = [...fresh, ...want.filter((p) => !ids.has(p.hostId))];
      } else {
        want = fresh;
      }
    } catch (err) {
      // Redis away: keep what was applied last.
      this.redisFailMs = Date.now();
      if (!want) throw err;
    }
    if (!want) return changes;
    const args = peerArgs(dump, want);
    if (args.length) {
      await this.wgRun(ifname, ["set", ifname, ...args]);
      changes.push(`peers of ${ifname}: ${want.map((p) => p.hostId).join(",") || "none"}`);
    }
    this.applied.set(vpcId, want);
    this.lastFull.set(vpcId, { ms: Date.now(), port, key: this.publicKey });
    // Routes: one /32 per remote NIC through the interface.
    const rout = await run("ip", ["-n", vns, "-j", "route", "show", "dev", ifname]);
    const have = new Set((JSON.parse(rout.stdout || "[]") as { dst: string }[]).map((r) => (r.dst.includes("/") ? r.dst : `${r.dst}/32`)));
    const wantR = new Set(want.flatMap((p) => p.allowedIps));
    const lines: string[] = [];
    for (const r of have) if (!wantR.has(r)) lines.push(`route del ${r} dev ${ifname}`);
    for (const r of wantR) if (!have.has(r)) lines.push(`route replace ${r} dev ${ifname}`);
    if (lines.length) {
      await this.agent.kernel.ipBatch(vns, lines);
      changes.push(`${lines.length} route change(s) in ${vns}`);
    }
    // Proxy ARP on every subnet bridge: a VM ARPing for a remote VM of its
    // subnet gets the bridge's MAC, and the /32 route does the rest. Set as
    // the namespace default too, so a bridge made (or remade) later has it.
    if (!this.proxyArpDone.has(vns) || this.agent.subnetsOf(vpcId).some((s) => !this.proxyArpDone.has(`${vns}/${s.subnetId}`))) {
      const subnets = this.agent.subnetsOf(vpcId);
      const links = new Set((await this.agent.kernel.links(vns)).map((l) => l.ifname));
      const present = subnets.filter((s) => links.has(names.bridge(s.subnetId)));
      await run("ip", [
        "netns",
        "exec",
        vns,
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.conf.default.proxy_arp=1",
        ...present.map((s) => `net.ipv4.conf.${names.bridge(s.subnetId)}.proxy_arp=1`),
      ]);
      this.proxyArpDone.add(vns);
      for (const s of present) this.proxyArpDone.add(`${vns}/${s.subnetId}`);
    }
    if (changes.length) this.log.info({ vpc: vpcId, changes }, "overlay");
    return changes;
  }

  private readonly proxyArpDone = new Set<string>();

  /** Forgets proxy ARP state so the next sync sets it again (e.g. after a bridge was recreated). */
  forgetBridges(vpcId: string): void {
    this.lastFull.delete(vpcId);
    const ns = this.agent.nsOf(vpcId);
    for (const k of [...this.proxyArpDone]) if (k === ns || k.startsWith(`${ns}/`)) this.proxyArpDone.delete(k);
  }

  /** Ends the VPC's wireguard-go (by its PID) or deletes its kernel device, removes the membership. */
  async teardown(vpcId: string): Promise<void> {
    const ifname = wgName(this.hostId, vpcId);
    const st = this.readState(ifname);
    if (st.impl === "kernel") {
      // No process: the device goes (it would with the namespace, but DeleteVpc may keep the namespace a moment longer).
      for (const ns of [this.agent.nsOf(vpcId), this.opts.hostNetns]) {
        const l = await this.agent.kernel.link(ns, ifname).catch(() => null);
        if (l?.kind === "wireguard") await this.agent.kernel.ipBatch(ns, [`link del dev ${ifname}`]);
      }
    }
    await this.killPid(st.pid, ifname);
    rmSync(`/var/run/wireguard/${ifname}.sock`, { force: true });
    rmSync(this.pidFile(ifname), { force: true });
    this.applied.delete(vpcId);
    this.ports.delete(vpcId);
    this.lastFull.delete(vpcId);
    this.forgetBridges(vpcId);
    try {
      if (await this.redis.hdel(overlayKeys.members(vpcId), this.hostId)) {
        await this.redis.xadd("mvpc:events", "MAXLEN", "~", "100000", "*", "kind", "overlay.left", "host", this.hostId, "vpc", vpcId);
      }
    } catch (err) {
      this.log.warn({ vpc: vpcId, err: (err as Error).message }, "cannot leave the overlay in Redis; the lease and the next sync clean up");
    }
  }

  /** Ends one wireguard-go by PID (checked to be that interface's). */
  private async killPid(pid: number, ifname: string): Promise<void> {
    if (!(pid > 0 && pidAlive(pid, ifname))) return;
    try {
      process.kill(pid, "SIGTERM");
      for (let i = 0; i < 100 && pidAlive(pid, ifname); i++) await sleep(10);
      if (pidAlive(pid, ifname)) process.kill(pid, "SIGKILL");
    } catch {
      // already gone
    }
  }

  /** New key pair, applied to every local interface, then published. */
  async rotate(): Promise<{ previous: string; rotatedMs: number }> {
    return this.locked(async () => {
      const previous = this.publicKey;
      await this.newKey();
      const rotatedMs = Date.now();
      for (const f of this.pidFiles()) {
        if (!this.interfaceAlive(f.ifname)) continue;
        await this.wgRun(f.ifname, ["set", f.ifname, "private-key", this.keyFile]);
      }
      await this.publish("host.rotated");
      this.log.info({ publicKey: this.publicKey }, "host key rotated");
      return { previous, rotatedMs };
    });
  }

  /** Hosts of the local VPCs whose latest handshake with us is after sinceMs. */
  async peersHandshakenSince(sinceMs: number): Promise<{ updated: string[]; pending: string[] }> {
    const updated = new Set<string>();
    const all = new Set<string>();
    for (const [vpcId, peers] of this.applied) {
      const d = await this.dump(wgName(this.hostId, vpcId));
      for (const p of peers) {
        all.add(p.hostId);
        const dp = d?.peers.find((x) => x.publicKey === p.publicKey);
        if (dp && dp.latestHandshakeS * 1000 >= sinceMs - 1000) updated.add(p.hostId);
      }
    }
    const pending = [...all].filter((h) => !updated.has(h)).sort();
    return { updated: [...updated].sort(), pending };
  }

  async stop(): Promise<void> {
    this.stopped = true;
    for (const t of this.timers) clearTimeout(t);
    this.sub?.disconnect();
    await this.running?.catch(() => undefined);
    // Leaving gracefully: peers drop this host at once instead of after the lease.
    try {
      await this.redis.del(overlayKeys.host(this.hostId));
      await this.redis.xadd("mvpc:events", "MAXLEN", "~", "100000", "*", "kind", "host.left", "host", this.hostId);
    } catch {
      // the lease runs out by itself
    }
  }
}

/** For cleanup code: the WireGuard interface names a state directory knows of. */
export function interfacesIn(stateDir: string, hostId: string): { ifname: string; pid: number }[] {
  const d = join(stateDir, hostId, "wg");
  let files: string[];
  try {
    files = readdirSync(d);
  } catch {
    return [];
  }
  const out = [];
  for (const f of files) {
    const m = /^(wg[0-9a-f]{13})\.pid$/.exec(f);
    if (!m || !WG_IF_RE.test(m[1])) continue;
    try {
      out.push({ ifname: m[1], pid: (JSON.parse(readFileSync(join(d, f), "utf8")) as { pid: number }).pid });
    } catch {
      out.push({ ifname: m[1], pid: 0 });
    }
  }
  return out;
}
