// The overlay's kernel adapter: every command the WireGuard overlay runs
// goes through here — `ip link` on its own devices, `wg`, wireguard-go, the
// underlay read — on services/common/exec.ts (argument arrays, LC_ALL=C, a
// timeout). What the overlay does in a VPC namespace besides its device
// (routes, proxy ARP, batches) goes through ../kernel.ts like the rest of
// netagent. Tests replace the commands (WgCommands) with a fake.
import { randomBytes } from "node:crypto";
import { closeSync, existsSync, openSync, renameSync } from "node:fs";
import { run, startDaemon, type Daemon, type RunOptions, type RunResult } from "../../common/exec.js";

/** The commands behind an interface's life cycle: services/common/exec.ts's run. */
export interface WgCommands {
  run(file: string, args: string[], o?: RunOptions): Promise<RunResult>;
}

export interface WgProbe {
  /** /sys/module/wireguard exists (the module is loaded or built in). */
  moduleLoaded(): boolean;
  /** `ip link add <probe> type wireguard` succeeded in the host namespace (the probe device is deleted again). */
  canCreate(): Promise<boolean>;
}

/** What `ip -j addr show dev IF` says of the underlay interface. */
export interface UnderlayLink {
  mtu?: number;
  addr_info?: { family: string; local: string; scope: string }[];
}

function nsArgs(ns: string): string[] {
  return ns ? ["-n", ns] : [];
}

/** How much wireguard-go logs (--wireguard-log): nothing, its errors, or every handshake and keepalive (for debugging a tunnel). */
export type WgLogLevel = "off" | "error" | "verbose";
export const WG_LOG_LEVELS: readonly WgLogLevel[] = ["off", "error", "verbose"];

export class WgKernel {
  constructor(
    private readonly cmd: WgCommands = { run },
    /** wireguard-go's log level; its log goes to the file startUserspace is given. */
    readonly logLevel: WgLogLevel = "error",
  ) {}

  /** The real probe: a throwaway kernel WireGuard device in the namespace ("" = our own). */
  probe(ns: string): WgProbe {
    return {
      moduleLoaded: () => existsSync("/sys/module/wireguard"),
      canCreate: async () => {
        const probe = `wgp${randomBytes(6).toString("hex")}`;
        const r = await this.cmd.run("ip", [...nsArgs(ns), "link", "add", probe, "type", "wireguard"], { check: false });
        if (r.exitCode !== 0) return false;
        await this.cmd.run("ip", [...nsArgs(ns), "link", "del", probe], { check: false });
        return true;
      },
    };
  }

  /** The underlay interface, undefined if `ip` lists nothing; throws (ExecError) if it does not exist. */
  async underlay(ns: string, ifname: string): Promise<UnderlayLink | undefined> {
    const { stdout } = await this.cmd.run("ip", [...nsArgs(ns), "-j", "addr", "show", "dev", ifname]);
    return (JSON.parse(stdout || "[]") as UnderlayLink[])[0];
  }

  /**
   * For `--underlay-interface auto`: the interface holding `address` if
   * given, else the one the default route leaves by; "" if neither is found.
   */
  async underlayInterfaceFor(ns: string, address: string | undefined): Promise<string> {
    if (address) {
      const { stdout } = await this.cmd.run("ip", [...nsArgs(ns), "-j", "addr", "show"]);
      const links = JSON.parse(stdout || "[]") as { ifname?: string; addr_info?: { local?: string }[] }[];
      const hit = links.find((l) => (l.addr_info ?? []).some((a) => a.local === address));
      if (hit?.ifname) return hit.ifname;
    }
    const { stdout } = await this.cmd.run("ip", [...nsArgs(ns), "-j", "route", "show", "default"]);
    return (JSON.parse(stdout || "[]") as { dev?: string }[]).find((r) => r.dev)?.dev ?? "";
  }

  /** A new private key, or null if `wg genkey` failed. */
  async genkey(): Promise<string | null> {
    const g = await this.cmd.run("wg", ["genkey"], { check: false });
    return g.exitCode === 0 ? g.stdout.trim() : null;
  }

  /** The public key of a private key, or null if wg refused it (no error quotes the private key). */
  async pubkey(priv: string): Promise<string | null> {
    const r = await this.cmd.run("wg", ["pubkey"], { input: priv.trim() + "\n", check: false });
    return r.exitCode === 0 ? r.stdout.trim() : null;
  }

  async addDevice(ns: string, ifname: string): Promise<void> {
    await this.cmd.run("ip", [...nsArgs(ns), "link", "add", ifname, "type", "wireguard"]);
  }

  async setMtu(ns: string, ifname: string, mtu: number): Promise<void> {
    await this.cmd.run("ip", [...nsArgs(ns), "link", "set", "dev", ifname, "mtu", String(mtu)]);
  }

  async moveDevice(ns: string, ifname: string, to: string): Promise<void> {
    await this.cmd.run("ip", [...nsArgs(ns), "link", "set", "dev", ifname, "netns", to]);
  }

  /**
   * Runs wg for an interface: a kernel device is reached over netlink, so
   * from inside its VPC namespace (vpcNs); wireguard-go (vpcNs null) through
   * its global socket.
   */
  wg(vpcNs: string | null, args: string[], o?: RunOptions): Promise<RunResult> {
    return vpcNs ? this.cmd.run("ip", ["netns", "exec", vpcNs, "wg", ...args], o) : this.cmd.run("wg", args, o);
  }

  /** Sets the CPUs (a hex mask) that take the device's receive work (RPS). */
  async setRps(vpcNs: string, ifname: string, mask: string): Promise<void> {
    await this.cmd.run("ip", ["netns", "exec", vpcNs, "tee", `/sys/class/net/${ifname}/queues/rx-0/rps_cpus`], { input: mask });
  }

  /**
   * Starts `wireguard-go -f IFNAME` in the namespace, detached: it outlives
   * this agent, and the next one adopts it. Its output goes to `logFile`
   * (mode 0600; the previous process's log kept as `logFile`.1, so a log
   * holds at most one process's life), at this.logLevel; nowhere with "off".
   */
  async startUserspace(ns: string, ifname: string, logFile: string): Promise<Daemon> {
    const env = { WG_PROCESS_FOREGROUND: "1", LOG_LEVEL: this.logLevel === "off" ? "silent" : this.logLevel };
    let fd: number | undefined;
    if (this.logLevel !== "off") {
      if (existsSync(logFile)) renameSync(logFile, `${logFile}.1`);
      fd = openSync(logFile, "a", 0o600);
    }
    try {
      return await startDaemon("wireguard-go", ["-f", ifname], { netns: ns, detached: true, env, ...(fd !== undefined && { stdio: ["ignore", fd, fd] }) });
    } finally {
      // The child holds its own copy.
      if (fd !== undefined) closeSync(fd);
    }
  }
}
