// The WireGuard interfaces of this host, one per VPC: their life cycle and
// their state files. Commands run through the overlay's kernel adapter
// (wgkernel.ts) and ../kernel.ts.
//
// - A kernel WireGuard device when the module is usable (probed at start,
//   --wireguard), else `wireguard-go -f NAME`; made in the host namespace
//   (where the underlay is), given its MTU there, then moved into the VPC
//   namespace: its UDP socket stays in the host namespace.
// - NAME is "wg" + 13 hex of sha256(host/vpc): unique per machine
//   (wireguard-go's control socket /var/run/wireguard/NAME.sock is global)
//   and at most 15 bytes.
// - DIR/wg/NAME.pid keeps the VPC, the implementation, the MTU and
//   (wireguard-go) the PID, so that a restarted agent adopts the interface
//   (traffic keeps flowing) and a deleted VPC ends exactly that process or
//   deletes exactly that device.
import { existsSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { availableParallelism } from "node:os";
import { join } from "node:path";
import type { Logger } from "pino";
import type { Kernel, LinkInfo } from "../kernel.js";
import type { WgKernel, WgProbe } from "./wgkernel.js";

/** Which WireGuard runs an interface: the kernel module, or wireguard-go (userspace) where it is missing. */
export type WgImpl = "kernel" | "wireguard-go";
/** --wireguard: "auto" takes the kernel module when this host can make a kernel device. */
export type WgMode = "auto" | WgImpl;

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

/** What the interfaces need of the agent. */
export interface WgHost {
  readonly kernel: Kernel;
  nsOf(vpcId: string): string;
}

/** The interface's state file: wireguard-go's PID (0 for a kernel device), its VPC, implementation and MTU. */
interface WgState {
  pid: number;
  vpcId: string;
  impl: WgImpl;
  mtu: number;
  rps?: boolean;
}

/** How long wireguard-go gets to read an MTU change (a netlink event) before its device leaves its namespace. */
const WG_MTU_SETTLE_MS = 150;
/** How long ensure() waits for a device's UDP port after bringing it up (wireguard-go polls the link state once a second), and how often it looks. */
const WG_PORT_WAIT_MS = 3000;
const WG_PORT_POLL_MS = 25;
const WG_IF_RE = /^wg[0-9a-f]{13}$/;

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

/** The WireGuard interface of a VPC on a host (common/names.ts: the gateway steers NAT egress into it). */
export { wgName } from "../../common/names.js";

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

export class WgInterfaces {
  /** What new interfaces get (adopted ones keep theirs). */
  impl: WgImpl = "wireguard-go";
  private readonly stateDir: string;

  constructor(
    private readonly host: WgHost,
    private readonly wgk: WgKernel,
    /** The host's state directory (DIR): state files are in DIR/wg. */
    dir: string,
    /** Namespace holding the underlay ("" = the agent's own). */
    private readonly hostNetns: string,
    private readonly log: Logger,
  ) {
    this.stateDir = join(dir, "wg");
  }

  private stateFile(ifname: string): string {
    return join(this.stateDir, `${ifname}.pid`);
  }

  private readState(ifname: string): WgState {
    try {
      const j = JSON.parse(readFileSync(this.stateFile(ifname), "utf8")) as Partial<WgState>;
      return { pid: j.pid ?? 0, vpcId: j.vpcId ?? "", impl: j.impl === "kernel" ? "kernel" : "wireguard-go", mtu: j.mtu ?? 0, ...(j.rps ? { rps: true } : {}) };
    } catch {
      return { pid: 0, vpcId: "", impl: this.impl, mtu: 0 };
    }
  }

  private writeState(ifname: string, st: Partial<WgState>): void {
    writeFileSync(this.stateFile(ifname), JSON.stringify(st), { mode: 0o600 });
  }

  /** The interfaces with a state file, and their VPC. */
  list(): { ifname: string; vpcId: string; pid: number }[] {
    const out = [];
    let files: string[];
    try {
      files = readdirSync(this.stateDir);
    } catch {
      return [];
    }
    for (const f of files) {
      const m = /^(wg[0-9a-f]{13})\.pid$/.exec(f);
      if (!m) continue;
      try {
        const j = JSON.parse(readFileSync(join(this.stateDir, f), "utf8")) as { pid: number; vpcId: string };
        out.push({ ifname: m[1], vpcId: j.vpcId, pid: j.pid });
      } catch {
        // half-written: ignored
      }
    }
    return out;
  }

  /** The implementation behind an interface of this host. */
  implementationOf(ifname: string): WgImpl {
    return this.readState(ifname).impl;
  }

  /** Cheap liveness: wireguard-go's process, or (kernel) the VPC namespace that holds the device. */
  alive(ifname: string): boolean {
    const st = this.readState(ifname);
    if (st.impl === "kernel") return st.vpcId !== "" && existsSync(`/run/netns/${this.host.nsOf(st.vpcId)}`);
    return pidAlive(st.pid, ifname);
  }

  /** The namespace wg reaches the interface from: the VPC's for a kernel device, null (the global socket) for wireguard-go. */
  private wgNs(ifname: string): string | null {
    const st = this.readState(ifname);
    return st.impl === "kernel" && st.vpcId ? this.host.nsOf(st.vpcId) : null;
  }

  /** Runs `wg ARGS` for the interface; returns its output. */
  async wg(ifname: string, args: string[]): Promise<string> {
    return (await this.wgk.wg(this.wgNs(ifname), args)).stdout;
  }

  async dump(ifname: string): Promise<Dump | null> {
    const r = await this.wgk.wg(this.wgNs(ifname), ["show", ifname, "dump"], { check: false });
    if (r.exitCode !== 0) return null;
    return parseDump(r.stdout);
  }

  /** Makes sure the VPC's interface runs, sits in the VPC namespace, is up with the right key and MTU. */
  async ensure(vpcId: string, ifname: string, want: { mtu: number; publicKey: string; keyFile: string }): Promise<{ port: number; dump: Dump }> {
    const { kernel } = this.host;
    const vns = this.host.nsOf(vpcId);
    const hns = this.hostNetns;
    const st = this.readState(ifname);
    let inVpc: LinkInfo | null;
    // An interface keeps the implementation it was made with (a restarted
    // agent adopts it, traffic never stops); a new one gets this.impl.
    const kernelDev = async () => {
      const l = (await kernel.link(vns, ifname)) ?? (await kernel.link(hns, ifname));
      return l?.kind === "wireguard";
    };
    const impl = st.vpcId === vpcId && st.impl === "kernel" && (await kernelDev()) ? "kernel" : this.impl;
    if (impl === "kernel") {
      inVpc = await kernel.link(vns, ifname);
      if (inVpc && inVpc.kind !== "wireguard") {
        // A wireguard-go device left from before: replaced by a kernel one.
        await this.killPid(st.pid, ifname);
        await kernel.ipBatch(vns, [`link del dev ${ifname}`]);
        rmSync(`/var/run/wireguard/${ifname}.sock`, { force: true });
        inVpc = null;
      }
      if (!inVpc && !(await kernel.link(hns, ifname))) {
        // Made in the host namespace so that its UDP socket lives there, then moved.
        await this.wgk.addDevice(hns, ifname);
        this.log.info({ vpc: vpcId, interface: ifname }, "created kernel WireGuard interface");
      }
      if (st.impl !== "kernel" || st.vpcId !== vpcId) this.writeState(ifname, { pid: 0, vpcId, impl: "kernel" });
    } else {
      inVpc = await this.startUserspace(vpcId, ifname, want.mtu);
    }
    if (!inVpc) {
      // The MTU is set before the move, where wireguard-go runs: it learns
      // its MTU only from link events in its own namespace (for the ifindex
      // it created) and pads every packet up to the MTU it knows. Set after
      // the move, it kept its default 1420 under a 1440 device, padded each
      // full-size packet to 1452 and the underlay fragmented every one of
      // them (measured: two fragments per data packet, reassembly and a
      // full UDP buffer on the receiver).
      const l = await kernel.link(hns, ifname);
      if (l && l.mtu !== want.mtu) {
        await this.wgk.setMtu(hns, ifname, want.mtu);
        if (impl === "wireguard-go") await sleep(WG_MTU_SETTLE_MS);
      }
      this.writeState(ifname, { ...this.readState(ifname), vpcId, impl, mtu: want.mtu });
      await this.wgk.moveDevice(hns, ifname, vns);
      inVpc = await kernel.link(vns, ifname);
      if (!inVpc) throw new Error(`${ifname} did not arrive in ${vns}`);
    }
    let dump = await this.dump(ifname);
    if (!dump) throw new Error(`wg show ${ifname} failed`);
    if (dump.publicKey !== want.publicKey) {
      await this.wg(ifname, ["set", ifname, "private-key", want.keyFile, ...(dump.listenPort ? [] : ["listen-port", "0"])]);
    }
    if (!inVpc.up || inVpc.mtu !== want.mtu) await kernel.ipBatch(vns, [`link set dev ${ifname} mtu ${want.mtu} up`]);
    await this.spreadReceive(vpcId, ifname);
    if (dump.publicKey !== want.publicKey || !inVpc.up) dump = (await this.dump(ifname)) ?? dump;
    // wireguard-go opens its UDP socket only once it sees the link up, and in
    // the VPC namespace (its netlink listener stayed in the host's) it learns
    // that by polling once a second: until then it reports port 0. Published,
    // that 0 made every other host skip this one as malformed, and nothing
    // looked again before the next full pass, 30 s later.
    for (const t0 = Date.now(); !dump.listenPort && Date.now() - t0 < WG_PORT_WAIT_MS;) {
      await sleep(WG_PORT_POLL_MS);
      dump = (await this.dump(ifname)) ?? dump;
    }
    if (!dump.listenPort) throw new Error(`${ifname} has no UDP listen port ${WG_PORT_WAIT_MS} ms after it was set up`);
    return { port: dump.listenPort, dump };
  }

  /**
   * wireguard-go for the interface: adopts the running process (by its
   * state file) or starts one in the host namespace. Returns the device if
   * it is already in the VPC namespace.
   */
  private async startUserspace(vpcId: string, ifname: string, mtu: number): Promise<LinkInfo | null> {
    const { kernel } = this.host;
    const vns = this.host.nsOf(vpcId);
    const hns = this.hostNetns;
    const { pid } = this.readState(ifname);
    let alive = pid > 0 && pidAlive(pid, ifname);
    const inVpc = alive ? await kernel.link(vns, ifname) : null;
    if (alive && !inVpc && !(await kernel.link(hns, ifname))) {
      // Its device is gone (the namespace was deleted under it): start over.
      await this.killPid(pid, ifname);
      alive = false;
    }
    if (alive && inVpc && this.readState(ifname).mtu !== mtu) {
      // It runs with another MTU than this agent's (the underlay changed, or
      // an agent from before the MTU was set in place): wireguard-go cannot
      // learn a new one once moved, so it is restarted (a brief interruption).
      this.log.warn({ vpc: vpcId, interface: ifname, mtu: this.readState(ifname).mtu || "unknown", want: mtu }, "restarting wireguard-go to change its MTU");
      await this.killPid(pid, ifname);
      alive = false;
    }
    if (alive) return inVpc;
    rmSync(`/var/run/wireguard/${ifname}.sock`, { force: true });
    const stale = await kernel.link(vns, ifname);
    if (stale) await kernel.ipBatch(vns, [`link del dev ${ifname}`]);
    const { proc: child, pid: childPid } = await this.wgk.startUserspace(hns, ifname, join(this.stateDir, `${ifname}.log`));
    this.writeState(ifname, { pid: childPid, vpcId, impl: "wireguard-go" });
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
      await this.wgk.setRps(this.host.nsOf(vpcId), ifname, mask);
      this.writeState(ifname, { ...st, rps: true });
    } catch (err) {
      this.log.warn({ vpc: vpcId, interface: ifname, err: (err as Error).message }, "cannot set RPS on the overlay interface; it forwards, more slowly");
    }
  }

  /** Ends the VPC's wireguard-go (by its PID) or deletes its kernel device, and forgets its state. */
  async remove(vpcId: string, ifname: string): Promise<void> {
    const st = this.readState(ifname);
    if (st.impl === "kernel") {
      // No process: the device goes (it would with the namespace, but DeleteVpc may keep the namespace a moment longer).
      for (const ns of [this.host.nsOf(vpcId), this.hostNetns]) {
        const l = await this.host.kernel.link(ns, ifname).catch(() => null);
        if (l?.kind === "wireguard") await this.host.kernel.ipBatch(ns, [`link del dev ${ifname}`]);
      }
    }
    await this.killPid(st.pid, ifname);
    rmSync(`/var/run/wireguard/${ifname}.sock`, { force: true });
    rmSync(this.stateFile(ifname), { force: true });
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
}
