// The netagent's kernel adapter. Every command netagent runs goes through
// an adapter on services/common/exec.ts (argument arrays, LC_ALL=C, a
// timeout, ExecError on failure): this module for namespaces, links,
// addresses, routes, neighbours, sysctls, qdiscs and nft, and
// overlay/wgkernel.ts for what is the overlay's own (its WireGuard devices,
// `wg`, wireguard-go, the underlay read); nft transactions, this module's
// and peering.ts's, run through services/common/nft (LinuxNft).
// A veth NIC's attach and every DetachNic run in-process (libnl-route and
// libnetfilter_conntrack through koffi: common/rtnl.ts, common/conntrack.ts),
// with the execs below as their fallback. Otherwise a NIC change is one
// `ip -batch` exec (plus `tc -batch` only for rate limits):
// - the VM side of a veth is made from the VPC namespace (`link add … peer
//   … netns VM`); what must happen inside the VM's namespace (address, up,
//   route) is a batch file run by `netns exec VM ip -batch FILE`, a line of
//   the same batch. iproute2 forks for `netns exec` in batch mode (a fork and
//   exec of `ip` from `ip`, no Node child, no shell); it can only name a
//   namespace under /run/netns, so a /proc/PID/ns/net path takes a second
//   exec (nsenter) as before;
// - DetachNic sets the devices down, then deletes them in the background
//   (a veth's delete waits for an RCU grace period, 15–40 ms); without
//   libnl-route it deletes them in one `ip -force -batch`. A NIC without a
//   mark of its own has its conntrack entries cleared then (libnetfilter_
//   conntrack, or one `conntrack -R` entered with nsenter --net, not a line
//   of the batch: `netns exec` would fork it in a mount namespace that
//   copies every mount of the host); a marked NIC's go with its mark
//   (ct-mark-state.ts).
// `Kernel` is an interface so the planner and the service are tested against
// RecordingKernel, which records what would run.
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { run } from "../common/exec.js";
import { forgetNamespace } from "../common/nft/libnftables.js";
import { LinuxNft } from "../common/nft/linux.js";
import { conntrackDelete, conntrackDeleteByMark } from "../common/conntrack.js";
import { markCommands, markFilters, staleFlow, type NicMark } from "./ct-marks.js";
import { attachVeth, deleteLinks, downLinks, upLink, type VethAttach } from "../common/rtnl.js";
import { Counter } from "prom-client";
import { metricsRegistry } from "../common/metrics.js";
import { render, type NftTransaction } from "../common/nft/tx.js";

export interface LinkInfo {
  ifname: string;
  /** "bridge", "veth", "tun", "ifb", … ("" for plain devices like lo). */
  kind: string;
  master?: string;
  alias?: string;
  mac: string;
  mtu: number;
  up: boolean;
  addrs: string[];
  /** Parent (peer) interface index and its namespace id, for veths. */
  linkNetnsId?: number;
}

/** A route as `ip -j route show` lists it. */
export interface RouteInfo {
  dst: string;
  type?: string;
  gateway?: string;
  dev?: string;
  metric?: number;
}

/** A neighbour entry as `ip -j neigh show` lists it. */
export interface NeighInfo {
  dst: string;
  dev: string;
  lladdr?: string;
  state?: string[];
}

export interface QdiscInfo {
  dev: string;
  kind: string;
  root: boolean;
  /** bytes per second, for tbf. */
  rate?: number;
}

export interface Kernel {
  listNetns(): Promise<string[]>;
  addNetns(name: string): Promise<void>;
  delNetns(name: string): Promise<void>;
  links(ns: string): Promise<LinkInfo[]>;
  /** One device, or null if it does not exist. */
  link(ns: string, ifname: string): Promise<LinkInfo | null>;
  qdiscs(ns: string): Promise<QdiscInfo[]>;
  /** `ip -j route show SELECTOR…` (e.g. ["proto", "77"], ["dev", "wg0"]). */
  routes(ns: string, selector: string[]): Promise<RouteInfo[]>;
  /** `ip -j neigh show ADDRESS`. */
  neighbours(ns: string, address: string): Promise<NeighInfo[]>;
  /**
   * Runs `ip -n ns -batch -` (ns "" = the agent's own namespace). Each guest
   * batch runs after `lines`, inside its namespace: from the same exec when
   * the namespace is named (/run/netns/NAME), else by a second exec.
   * `upAfter`: a NIC's batch (nicCreateLines) whose host end may carry
   * nothing until this resolves. In-process the devices are made meanwhile,
   * the host end down, and set up after; an exec waits for it first. If it
   * rejects, that is thrown with the devices left down (the caller removes them).
   */
  ipBatch(ns: string, lines: string[], guests?: GuestBatch[], upAfter?: Promise<unknown>): Promise<void>;
  /**
   * Takes these devices of the namespace down and deletes them (in-process,
   * the deletion after, in the background; or one `ip -force -batch`). A
   * device already gone is no error. The NIC's conntrack entries are
   * clearNic's, once the devices carry nothing.
   */
  unplug(ns: string, devices: string[]): Promise<void>;
  /**
   * The conntrack entries from and to the address, cleared as it chooses:
   * with the NIC's mark index (ct-marks.ts), those with that mark, which
   * the kernel deletes itself; otherwise the namespace's table is dumped
   * and read for the address (`conntrack -R` when the library is not
   * there). Failures clear nothing (0).
   */
  clearNic(ns: string, address: string, markIndex?: number | null): Promise<number>;
  /**
   * Deletes the namespace's flows older than these NICs' marks (ct-marks.ts
   * staleFlow: the checks drop their packets meanwhile), in one dump of its
   * table. In-process only: without the library nothing is deleted (0) and
   * the checks go on dropping them until they expire.
   */
  clearStale(ns: string, marks: NicMark[]): Promise<number>;
  /** Resolves once every device deletion unplug() left running in the background has ended (a daemon's stop). */
  settle?(): Promise<void>;
  /** Runs `ip -batch -` inside the namespace at netnsPath (nsenter). */
  ipBatchAt(netnsPath: string, lines: string[]): Promise<void>;
  /** Runs `tc -n ns -batch -`. */
  tcBatch(ns: string, lines: string[]): Promise<void>;
  sysctl(ns: string, key: string, value: string): Promise<void>;
  /** Several sysctls of the namespace in one exec, in order. */
  sysctls(ns: string, settings: [key: string, value: string][]): Promise<void>;
  /** Runs the transaction inside the namespace (one `nft -f -`, through LinuxNft). */
  nft(ns: string, tx: NftTransaction): Promise<void>;
  /** `nft -j list table FAMILY NAME` in the namespace, parsed; null when there is no such table. */
  nftTable(ns: string, family: string, table: string): Promise<unknown[] | null>;
  /** Link counters from /sys via `ip -s -j link`. */
  stats(ns: string, ifname: string): Promise<LinkStats | null>;
  linksAt(netnsPath: string): Promise<LinkInfo[]>;
}

export interface GuestBatch {
  netnsPath: string;
  lines: string[];
}

/**
 * The in-process form of an ip batch, when it is exactly a veth NIC's attach
 * as nicCreateLines (plan.ts) writes it, without rate limits: the three
 * host lines and the guest's address, links up and optional default route.
 * Anything else (a tap, an ifb, other lines) runs as an exec.
 */
export function vethAttachOf(ns: string, lines: string[], guests: GuestBatch[]): VethAttach | null {
  if (lines.length !== 3 || guests.length !== 1) return null;
  const add = /^link add (\S+) mtu (\d+) type veth peer name (\S+) address (\S+) mtu (\d+) netns (\S+)$/.exec(lines[0]);
  const alias = /^link set dev (\S+) alias (\S+)$/.exec(lines[1]);
  const up = /^link set dev (\S+) mtu (\d+) master (\S+) up$/.exec(lines[2]);
  if (!add || !alias || !up) return null;
  const [, hostIf, mtu, guestIf, mac, peerMtu] = add;
  if (alias[1] !== hostIf || up[1] !== hostIf || up[2] !== mtu || peerMtu !== mtu) return null;
  // The peer's `netns` names the guest's namespace: its name, or the PID of /proc/PID/ns/net.
  const target = namedNetns(guests[0].netnsPath) ?? /^\/proc\/(\d+)\/ns\/net$/.exec(guests[0].netnsPath)?.[1];
  if (target !== add[6]) return null;
  const g = guests[0].lines;
  const addr = /^addr replace (\S+\/\d+) dev (\S+)$/.exec(g[0] ?? "");
  if (!addr || addr[2] !== guestIf || g[1] !== `link set dev ${guestIf} up` || g[2] !== "link set dev lo up") return null;
  let gateway: string | undefined;
  if (g.length === 4) {
    const route = /^route replace default via (\S+) dev (\S+)$/.exec(g[3]);
    if (!route || route[2] !== guestIf) return null;
    gateway = route[1];
  } else if (g.length !== 3) return null;
  return {
    ns,
    hostIf,
    mtu: Number(mtu),
    alias: alias[2],
    bridge: up[3],
    netnsPath: guests[0].netnsPath,
    guestIf,
    mac,
    address: addr[1],
    ...(gateway !== undefined ? { gateway } : {}),
  };
}

/** The name `ip netns exec` takes for a namespace path, or null (a /proc/PID path). */
export function namedNetns(path: string): string | null {
  return /^\/(?:var\/)?run\/netns\/([A-Za-z0-9_.-]+)$/.exec(path)?.[1] ?? null;
}

/** The conntrack commands (a `conntrack -R` file) that clear the flows from and to an address. */
export function conntrackCommands(address: string): string[] {
  return [`-D -s ${address}`, `-D -d ${address}`];
}

/** Splits `ip -force -batch` stderr into the error text of each failed line (1-based). */
export function batchFailures(stderr: string): Map<number, string> {
  const out = new Map<number, string>();
  const re = /Command failed [^\n]*:(\d+)\n?/g;
  let last = 0;
  for (let m = re.exec(stderr); m; m = re.exec(stderr)) {
    out.set(Number(m[1]), stderr.slice(last, m.index));
    last = m.index + m[0].length;
  }
  return out;
}

/** How many flows `conntrack -R` deleted: it prints each one (a line with its tuples). */
export function conntrackDeleted(stdout: string): number {
  return stdout.split("\n").filter((l) => /\bsrc=\S+ dst=/.test(l)).length;
}

let batchDir: string | undefined;
/** A private directory for guest batch files (0700, made once). */
function guestBatchDir(): string {
  batchDir ??= mkdtempSync(join(tmpdir(), "microvpc-nic-"));
  return batchDir;
}

export interface LinkStats {
  rxBytes: bigint;
  rxPackets: bigint;
  rxDropped: bigint;
  rxErrors: bigint;
  txBytes: bigint;
  txPackets: bigint;
  txDropped: bigint;
  txErrors: bigint;
}

function nsArgs(ns: string): string[] {
  return ns ? ["-n", ns] : [];
}

interface IpLinkJson {
  ifname: string;
  address?: string;
  mtu?: number;
  flags?: string[];
  master?: string;
  ifalias?: string;
  link_netnsid?: number;
  linkinfo?: { info_kind?: string };
  addr_info?: { family: string; local: string; prefixlen: number }[];
}

function parseLinks(json: string): LinkInfo[] {
  const links = JSON.parse(json || "[]") as IpLinkJson[];
  return links.map((l) => ({
    ifname: l.ifname,
    kind: l.linkinfo?.info_kind ?? "",
    master: l.master,
    alias: l.ifalias,
    mac: l.address ?? "",
    mtu: l.mtu ?? 0,
    up: (l.flags ?? []).includes("UP"),
    addrs: (l.addr_info ?? []).filter((x) => x.family === "inet").map((x) => `${x.local}/${x.prefixlen}`),
    linkNetnsId: l.link_netnsid,
  }));
}

/**
 * A VPC namespace's sysctls, set once when it is made (before any device):
 * it routes, and it is IPv4 only. IPv6 off, because microvpc's VPCs are
 * IPv4 (the firewall's bridge table drops every other frame a VM sends) and
 * because with it on every port of a subnet bridge gets link-local routes:
 * each link up, down or delete then walks the namespace's whole IPv6 FIB
 * under the rtnl lock (fib6_ifdown), ~3 routes per port, so at 1 000 ports
 * every NIC change paid for all the others (bench:vm, 1 000 VMs vs 0).
 * "default" covers the devices made later, "all" lo and any already there.
 * A kernel without IPv6 (booted with ipv6.disable=1) has no net.ipv6 keys,
 * and nothing to turn off: `ipv6` says whether it has them.
 */
export function vpcNetnsSysctls(ipv6 = existsSync("/proc/sys/net/ipv6")): [string, string][] {
  return [
    ["net.ipv4.ip_forward", "1"],
    ...(ipv6
      ? ([
          ["net.ipv6.conf.all.disable_ipv6", "1"],
          ["net.ipv6.conf.default.disable_ipv6", "1"],
        ] as [string, string][])
      : []),
  ];
}

const deferredDeletes = new Counter({
  name: "microvpc_netagent_deferred_deletes_total",
  help: "Devices DetachNic set down and left to delete in the background, by result (error: still there, down; the reconciler removes it as an orphan).",
  labelNames: ["result"],
  registers: [metricsRegistry],
});

export class LinuxKernel implements Kernel {
  /**
   * Devices DetachNic set down whose deletion is still running:
   * "<ns> <name>" → the deletion. Nothing else sees them meanwhile: links()
   * and link() leave them out (they are not the reconciler's orphans) and a
   * batch or attach that names one waits for its deletion first (a NIC
   * attached again under the same device name).
   */
  private readonly deleting = new Map<string, Promise<void>>();

  /** Waits for the deletions of this namespace's devices that `text` names as a word. */
  private async deletedFirst(ns: string, text: string): Promise<void> {
    if (this.deleting.size === 0) return;
    const waits: Promise<void>[] = [];
    for (const [key, p] of this.deleting) {
      const sp = key.indexOf(" ");
      if (key.slice(0, sp) !== ns) continue;
      const name = key.slice(sp + 1);
      if (new RegExp(`(^|[\\s/])${name.replace(/[.]/g, "\\.")}($|[\\s/])`, "m").test(text)) waits.push(p);
    }
    await Promise.all(waits);
  }

  private pendingIn(ns: string): Set<string> {
    const out = new Set<string>();
    for (const key of this.deleting.keys()) if (key.startsWith(`${ns} `)) out.add(key.slice(ns.length + 1));
    return out;
  }

  /** Deletes devices already down, without the caller waiting: in-process, else one `ip -force -batch`. */
  private deleteInBackground(ns: string, devices: string[]): void {
    const keys = devices.map((d) => `${ns} ${d}`);
    const p = (async () => {
      if (await deleteLinks(ns, devices)) return true;
      const r = await run("ip", [...nsArgs(ns), "-force", "-batch", "-"], { input: devices.map((d) => `link del dev ${d}`).join("\n") + "\n", check: false });
      if (r.exitCode === undefined) return false;
      return [...batchFailures(r.stderr).values()].every((text) => /Cannot find device|does not exist/.test(text));
    })()
      .catch(() => false)
      .then((ok) => {
        deferredDeletes.inc({ result: ok ? "ok" : "error" }, devices.length);
        for (const k of keys) if (this.deleting.get(k) === p) this.deleting.delete(k);
      });
    for (const k of keys) this.deleting.set(k, p);
  }

  async settle(): Promise<void> {
    while (this.deleting.size) await Promise.all([...this.deleting.values()]);
  }

  async listNetns(): Promise<string[]> {
    const r = await run("ip", ["-j", "netns", "list"]);
    return (JSON.parse(r.stdout || "[]") as { name: string }[]).map((n) => n.name);
  }

  async addNetns(name: string): Promise<void> {
    await run("ip", ["netns", "add", name]);
    try {
      // A fresh namespace has lo down; the VPC router needs forwarding.
      await run("ip", ["-n", name, "link", "set", "lo", "up"]);
      await this.sysctls(name, vpcNetnsSysctls());
    } catch (err) {
      // Not half-made: a namespace left here would be taken as made (it exists) by the next pass.
      await run("ip", ["netns", "del", name]).catch(() => {});
      throw err;
    }
  }

  async delNetns(name: string): Promise<void> {
    // Our nft worker's socket in it would keep it (and its devices) alive until the worker's next sweep.
    await forgetNamespace(name);
    await run("ip", ["netns", "del", name]);
  }

  // `ip -d addr show` carries the link attributes too: one exec, not two.
  async links(ns: string): Promise<LinkInfo[]> {
    const all = parseLinks((await run("ip", [...nsArgs(ns), "-j", "-d", "addr", "show"])).stdout);
    const going = this.pendingIn(ns);
    return going.size ? all.filter((l) => !going.has(l.ifname)) : all;
  }

  async link(ns: string, ifname: string): Promise<LinkInfo | null> {
    if (this.deleting.has(`${ns} ${ifname}`)) return null;
    const r = await run("ip", [...nsArgs(ns), "-j", "-d", "addr", "show", "dev", ifname], { check: false });
    if (r.error) {
      if (/does not exist/.test(r.stderr)) return null;
      throw r.error;
    }
    // iproute2 reads a name like "if3…" as an ifindex ("if%u"): only the device with that name counts.
    const l = parseLinks(r.stdout)[0];
    return l && l.ifname === ifname ? l : null;
  }

  async linksAt(netnsPath: string): Promise<LinkInfo[]> {
    return parseLinks((await run("nsenter", [`--net=${netnsPath}`, "ip", "-j", "-d", "addr", "show"])).stdout);
  }

  async qdiscs(ns: string): Promise<QdiscInfo[]> {
    const r = await run("tc", [...nsArgs(ns), "-j", "qdisc", "show"]);
    return (JSON.parse(r.stdout || "[]") as { dev: string; kind: string; root?: boolean; options?: { rate?: number } }[]).map((q) => ({
      dev: q.dev,
      kind: q.kind,
      root: !!q.root,
      rate: q.options?.rate,
    }));
  }

  async routes(ns: string, selector: string[]): Promise<RouteInfo[]> {
    return JSON.parse((await run("ip", [...nsArgs(ns), "-j", "route", "show", ...selector])).stdout || "[]") as RouteInfo[];
  }

  async neighbours(ns: string, address: string): Promise<NeighInfo[]> {
    return JSON.parse((await run("ip", [...nsArgs(ns), "-j", "neigh", "show", address])).stdout || "[]") as NeighInfo[];
  }

  // Batches quote their first lines in the error: ip names only the failing line's number.
  async ipBatch(ns: string, lines: string[], guests: GuestBatch[] = [], upAfter?: Promise<unknown>): Promise<void> {
    await this.deletedFirst(ns, lines.join("\n"));
    try {
      await this.ipBatchOnce(ns, lines, guests, upAfter);
    } catch (err) {
      // A device still being deleted may hold a name in a VM's namespace
      // (its eth0, attached again at once): once this namespace's deletions
      // are done, once more.
      const going = [...this.deleting].filter(([k]) => k.startsWith(`${ns} `)).map(([, p]) => p);
      if (going.length === 0) throw err;
      await Promise.all(going);
      await this.ipBatchOnce(ns, lines, guests, upAfter);
    }
  }

  private async ipBatchOnce(ns: string, lines: string[], guests: GuestBatch[], upAfter?: Promise<unknown>): Promise<void> {
    // A veth NIC's attach (AttachNic's whole batch) runs in-process through
    // libnl-route (common/rtnl.ts). If that fails it has undone itself, and
    // the same batch runs as an exec: ip's own error is the answer.
    const veth = vethAttachOf(ns, lines, guests);
    if (veth && attachVeth({ ...veth, up: !upAfter })) {
      if (!upAfter) return;
      // Made while the caller's other work ran (AttachNic: the NIC's flow
      // mark, which may first clear its address's previous flows); on its
      // bridge, but down until that is done.
      await upAfter;
      if (!(await upLink(ns, veth.hostIf))) await run("ip", [...nsArgs(ns), "link", "set", "dev", veth.hostIf, "up"]);
      return;
    }
    await upAfter;
    const all = [...lines];
    // The guest lines also go in as comments, so an error quotes them.
    const notes: string[] = [];
    const files: string[] = [];
    const later: GuestBatch[] = [];
    try {
      for (const g of guests) {
        const name = namedNetns(g.netnsPath);
        if (!g.lines.length) continue;
        if (!name || /\s/.test(guestBatchDir())) {
          later.push(g);
          continue;
        }
        const file = join(guestBatchDir(), `${randomBytes(8).toString("hex")}.batch`);
        writeFileSync(file, g.lines.join("\n") + "\n", { mode: 0o600 });
        files.push(file);
        all.push(`netns exec ${name} ip -batch ${file}`);
        notes.push(`# ${name}: ${g.lines.join("; ")}`);
      }
      if (all.length) {
        await run("ip", [...nsArgs(ns), "-batch", "-"], { input: [...all, ...notes].join("\n") + "\n", inputInError: true });
      }
    } finally {
      for (const f of files) rmSync(f, { force: true });
    }
    for (const g of later) await this.ipBatchAt(g.netnsPath, g.lines);
  }

  /**
   * In-process: by mark, the kernel deletes the NIC's entries itself (a
   * flush that yields between buckets); by address, a dump of the
   * namespace's table, read here, which holds up every rtnl change on the
   * host while it walks (common/conntrack.ts). Null: no library.
   */
  private clearInProcess(ns: string, address: string, markIndex?: number | null): Promise<number | null> {
    return markIndex ? conntrackDeleteByMark(ns, markFilters(markIndex)) : conntrackDelete(ns, (e) => e.src === address || e.dst === address);
  }

  /** `conntrack -R` of the NIC's delete lines, in the namespace. */
  private async clearByExec(ns: string, address: string, markIndex?: number | null): Promise<number> {
    // conntrack -R opens its file by name (/dev/stdin fails on Node's stdin socket): a private file.
    const file = join(guestBatchDir(), `${randomBytes(8).toString("hex")}.ct`);
    writeFileSync(file, (markIndex ? markCommands(markIndex) : conntrackCommands(address)).join("\n") + "\n", { mode: 0o600 });
    try {
      const ct = await (
        ns ? run("nsenter", [`--net=/run/netns/${ns}`, "conntrack", "-R", file], { check: false }) : run("conntrack", ["-R", file], { check: false })
      ).catch(() => null);
      return ct && ct.exitCode === 0 ? conntrackDeleted(ct.stdout) : 0;
    } finally {
      rmSync(file, { force: true });
    }
  }

  async clearNic(ns: string, address: string, markIndex?: number | null): Promise<number> {
    return (await this.clearInProcess(ns, address, markIndex)) ?? (await this.clearByExec(ns, address, markIndex));
  }

  async clearStale(ns: string, marks: NicMark[]): Promise<number> {
    return (await conntrackDelete(ns, staleFlow(marks))) ?? 0;
  }

  // In-process first: the devices set down, then deleted in the background
  // through libnl-route (common/rtnl.ts; the kernel answers a veth's delete
  // after an RCU grace period, 15–40 ms here, which the daemon awaits on a
  // pool thread); down, they carry nothing, so neither DetachNic nor DeleteVm
  // waits for that. Without the library, one `ip -force -batch`. The NIC's
  // conntrack entries are cleared after (clearNic, by the caller): a NIC
  // marked from its start has them all go with its mark once the mark is
  // out of the table (ct-mark-state.ts, retire); an unmarked one's are read
  // from the table by address at once, each dump a walk of the kernel's
  // whole (global) conntrack hash.
  async unplug(ns: string, devices: string[]): Promise<void> {
    await this.deletedFirst(ns, devices.join("\n"));
    if (await downLinks(ns, devices)) return this.deleteInBackground(ns, devices);
    if (!(await deleteLinks(ns, devices))) await this.deleteByExec(ns, devices);
  }

  /** `ip -force -batch` of the devices' deletion; a device already gone is what detaching wants. */
  private async deleteByExec(ns: string, devices: string[]): Promise<void> {
    const lines = devices.map((d) => `link del dev ${d}`);
    const r = await run("ip", [...nsArgs(ns), "-force", "-batch", "-"], { input: lines.join("\n") + "\n", inputInError: true, check: false });
    if (r.exitCode === undefined) throw r.error!;
    for (const [line, text] of batchFailures(r.stderr)) {
      if (line <= devices.length && !/Cannot find device|does not exist/.test(text)) throw r.error!;
    }
  }

  async ipBatchAt(netnsPath: string, lines: string[]): Promise<void> {
    if (lines.length === 0) return;
    await run("nsenter", [`--net=${netnsPath}`, "ip", "-batch", "-"], { input: lines.join("\n") + "\n", inputInError: true });
  }

  async tcBatch(ns: string, lines: string[]): Promise<void> {
    if (lines.length === 0) return;
    await this.deletedFirst(ns, lines.join("\n"));
    await run("tc", [...nsArgs(ns), "-batch", "-"], { input: lines.join("\n") + "\n", inputInError: true });
  }

  async sysctl(ns: string, key: string, value: string): Promise<void> {
    await this.sysctls(ns, [[key, value]]);
  }

  async sysctls(ns: string, settings: [string, string][]): Promise<void> {
    await run("ip", ["netns", "exec", ns, "sysctl", "-q", "-w", ...settings.map(([k, v]) => `${k}=${v}`)]);
  }

  private readonly nftApplier = new LinuxNft({ inputInError: true });

  async nft(ns: string, tx: NftTransaction): Promise<void> {
    await this.nftApplier.apply(ns, tx);
  }

  nftTable(ns: string, family: string, table: string): Promise<unknown[] | null> {
    return this.nftApplier.listTable(ns, family, table);
  }

  async stats(ns: string, ifname: string): Promise<LinkStats | null> {
    const r = await run("ip", [...nsArgs(ns), "-s", "-j", "link", "show", "dev", ifname], { check: false });
    if (r.exitCode !== 0) return null;
    const s = (JSON.parse(r.stdout)[0] ?? {}).stats64 ?? {};
    const b = (v: unknown) => BigInt(Number(v ?? 0));
    return {
      rxBytes: b(s.rx?.bytes),
      rxPackets: b(s.rx?.packets),
      rxDropped: b(s.rx?.dropped),
      rxErrors: b(s.rx?.errors),
      txBytes: b(s.tx?.bytes),
      txPackets: b(s.tx?.packets),
      txDropped: b(s.tx?.dropped),
      txErrors: b(s.tx?.errors),
    };
  }
}

/** Records every call; answers reads from a scripted state. For unit tests. */
export class RecordingKernel implements Kernel {
  calls: string[] = [];
  netns = new Set<string>();
  linkState = new Map<string, LinkInfo[]>();
  async listNetns() {
    return [...this.netns];
  }
  async addNetns(name: string) {
    this.calls.push(`netns add ${name}`);
    this.netns.add(name);
  }
  async delNetns(name: string) {
    this.calls.push(`netns del ${name}`);
    this.netns.delete(name);
  }
  async links(ns: string) {
    return this.linkState.get(ns) ?? [];
  }
  async link(ns: string, ifname: string) {
    return (this.linkState.get(ns) ?? []).find((l) => l.ifname === ifname) ?? null;
  }
  async linksAt(path: string) {
    return this.linkState.get(path) ?? [];
  }
  async qdiscs() {
    return [];
  }
  async routes() {
    return [];
  }
  async neighbours() {
    return [];
  }
  async ipBatch(ns: string, lines: string[], guests: GuestBatch[] = [], upAfter?: Promise<unknown>) {
    await upAfter;
    const g = guests.filter((x) => x.lines.length).map((x) => `netns exec ${namedNetns(x.netnsPath) ?? x.netnsPath} ip -batch:\n    ${x.lines.join("\n    ")}`);
    if (lines.length || g.length) this.calls.push(`ip -n ${ns} -batch:\n  ${[...lines, ...g].join("\n  ")}`);
  }
  async unplug(ns: string, devices: string[]) {
    this.calls.push(`ip -n ${ns} -force -batch:\n  ${devices.map((d) => `link del dev ${d}`).join("\n  ")}`);
  }
  async clearNic(ns: string, address: string, markIndex?: number | null) {
    this.calls.push(`nsenter ${ns} conntrack -R: ${(markIndex ? markCommands(markIndex) : conntrackCommands(address)).join("; ")}`);
    return 0;
  }
  async clearStale(ns: string, marks: NicMark[]) {
    this.calls.push(`conntrack ${ns}: flows older than the marks of ${marks.map((m) => `${m.address}=${m.index}`).join(", ")}`);
    return 0;
  }
  async ipBatchAt(path: string, lines: string[]) {
    if (lines.length) this.calls.push(`nsenter ${path} ip -batch:\n  ${lines.join("\n  ")}`);
  }
  async tcBatch(ns: string, lines: string[]) {
    if (lines.length) this.calls.push(`tc -n ${ns} -batch:\n  ${lines.join("\n  ")}`);
  }
  async sysctl(ns: string, k: string, v: string) {
    this.calls.push(`sysctl ${ns} ${k}=${v}`);
  }
  async sysctls(ns: string, settings: [string, string][]) {
    this.calls.push(`sysctl ${ns} ${settings.map(([k, v]) => `${k}=${v}`).join(" ")}`);
  }
  async nft(ns: string, tx: NftTransaction) {
    this.calls.push(`nft ${ns}:\n  ${render(tx).trimEnd().split("\n").join("\n  ")}`);
  }
  /** Listings nftTable answers with (none: no table). */
  tables = new Map<string, unknown[]>();
  async nftTable(ns: string, family: string, table: string) {
    return this.tables.get(`${ns} ${family} ${table}`) ?? null;
  }
  async stats() {
    return null;
  }
}
