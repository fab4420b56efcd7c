// Pure planning: desired state (what Redis says this host should have) and
// observed state (what the kernel has) in, the smallest list of `ip` and `tc`
// batch lines out. Nothing here runs a command, so every case is unit-tested
// by comparing text. Devices that did not change get no line at all: a
// reconcile never flushes and rebuilds.
import { bridgeMac, netagentNames as names } from "../common/names.js";
import type { LinkInfo, QdiscInfo } from "./kernel.js";

export interface SubnetSpec {
  subnetId: string;
  vpcId: string;
  cidr: string;
  /** Gateway address with prefix, e.g. "10.0.1.1/24". */
  gatewayCidr: string;
  mtu: number;
}

export interface Bandwidth {
  /** Toward the VM (the host side's egress), Mbit/s; 0 = unlimited. */
  ingressMbps: number;
  ingressBurst?: number;
  /** From the VM (the host side's ingress), Mbit/s; 0 = unlimited. */
  egressMbps: number;
  egressBurst?: number;
}

export interface NicSpec {
  nicId: string;
  owner: string;
  vpcId: string;
  subnetId: string;
  kind: "tap" | "veth";
  /** Host-side device in the VPC namespace. */
  hostIf: string;
  mac: string;
  address: string;
  prefix: number;
  gateway: string;
  mtu: number;
  hostname: string;
  guestIf: string;
  dns: string[];
  /** DNS search domains for the guest (the VPC's zone, "<vpc-name>.internal"). */
  search?: string[];
  tap?: { uid?: number; gid?: number; multiQueue: boolean; queues: number };
  veth?: { netnsPath: string; skipDefaultRoute: boolean };
  bandwidth: Bandwidth;
  createdMs: number;
  clientToken: string;
}

// Device names and the bridge MAC are shared with the firewall and the
// gateway: they live in common/names.ts.
export { netagentNames as names, bridgeMac } from "../common/names.js";

export function isOurs(hostId: string, l: LinkInfo): boolean {
  return !!l.alias && l.alias.startsWith(names.aliasPrefix(hostId));
}

/** The netns argument `ip link set … netns X` takes for a path we accept. */
export function netnsTarget(path: string): string {
  const named = /^\/(?:var\/)?run\/netns\/([A-Za-z0-9_.-]+)$/.exec(path);
  if (named) return named[1];
  const pid = /^\/proc\/(\d+)\/ns\/net$/.exec(path);
  if (pid) return pid[1];
  throw new Error(`unsupported netns path ${path}`);
}

function burst(mbps: number, given?: number): number {
  // 10 ms worth of the rate, at least 64 KiB: enough for TCP to reach the rate.
  return given ?? Math.max(65536, Math.ceil((mbps * 1e6) / 8 / 100));
}

export interface VpcPlan {
  /** `ip -n ns -batch` lines, in order. */
  ip: string[];
  /** `tc -n ns -batch` lines, run after ip. */
  tc: string[];
  /** Guest-side batches for veth NICs created by this plan. */
  guests: { nicId: string; netnsPath: string; lines: string[] }[];
  /** Human-readable summary of what changes, for logs and GetHostStatus. */
  changes: string[];
}

export function emptyPlan(): VpcPlan {
  return { ip: [], tc: [], guests: [], changes: [] };
}

export function nicCreateLines(hostId: string, n: NicSpec, bridge: string): { ip: string[]; guest: string[] } {
  const ip: string[] = [];
  if (n.kind === "tap") {
    const t = n.tap!;
    ip.push(
      [
        "tuntap add dev",
        n.hostIf,
        "mode tap",
        t.multiQueue ? "multi_queue" : "",
        t.uid !== undefined ? `user ${t.uid}` : "",
        t.gid !== undefined ? `group ${t.gid}` : "",
      ]
        .filter(Boolean)
        .join(" "),
    );
  } else {
    // The far end is made in the VM's namespace with its final name, MAC
    // and MTU: no rename or relink there. (A peer cannot be brought up at
    // creation, and its address and route need that namespace: guest lines.)
    ip.push(`link add ${n.hostIf} mtu ${n.mtu} type veth peer name ${n.guestIf} address ${n.mac} mtu ${n.mtu} netns ${netnsTarget(n.veth!.netnsPath)}`);
  }
  ip.push(`link set dev ${n.hostIf} alias ${names.alias(hostId, n.nicId)}`);
  ip.push(...attachLines(n, bridge));
  const guest: string[] = [];
  if (n.kind === "veth") {
    guest.push(`addr replace ${n.address}/${n.prefix} dev ${n.guestIf}`, `link set dev ${n.guestIf} up`, `link set dev lo up`);
    if (!n.veth!.skipDefaultRoute) guest.push(`route replace default via ${n.gateway} dev ${n.guestIf}`);
  }
  return { ip, guest };
}

function attachLines(n: NicSpec, bridge: string): string[] {
  return [`link set dev ${n.hostIf} mtu ${n.mtu} master ${bridge} up`];
}

export function bandwidthLines(hostId: string, n: NicSpec, qdiscs: QdiscInfo[], links: LinkInfo[]): { ip: string[]; tc: string[] } {
  const ip: string[] = [];
  const tc: string[] = [];
  const dev = n.hostIf;
  const ifb = names.ifb(n.nicId);
  const root = qdiscs.find((q) => q.dev === dev && q.root);
  const hasIngress = qdiscs.some((q) => q.dev === dev && q.kind === "ingress");
  const ifbRoot = qdiscs.find((q) => q.dev === ifb && q.root);
  const hasIfb = links.some((l) => l.ifname === ifb);
  const b = n.bandwidth;
  if (b.ingressMbps > 0) {
    const rate = (b.ingressMbps * 1e6) / 8;
    if (!(root?.kind === "tbf" && root.rate === rate)) {
      tc.push(`qdisc replace dev ${dev} root tbf rate ${b.ingressMbps}mbit burst ${burst(b.ingressMbps, b.ingressBurst)} latency 25ms`);
    }
  } else if (root?.kind === "tbf") {
    tc.push(`qdisc del dev ${dev} root`);
  }
  if (b.egressMbps > 0) {
    const rate = (b.egressMbps * 1e6) / 8;
    if (!hasIfb) ip.push(`link add ${ifb} type ifb`, `link set dev ${ifb} alias ${names.alias(hostId, n.nicId)} up`);
    if (!hasIngress) {
      tc.push(
        `qdisc add dev ${dev} handle ffff: ingress`,
        `filter add dev ${dev} parent ffff: protocol all prio 1 u32 match u32 0 0 action mirred egress redirect dev ${ifb}`,
      );
    }
    if (!(ifbRoot?.kind === "tbf" && ifbRoot.rate === rate)) {
      tc.push(`qdisc replace dev ${ifb} root tbf rate ${b.egressMbps}mbit burst ${burst(b.egressMbps, b.egressBurst)} latency 25ms`);
    }
  } else {
    if (hasIngress) tc.push(`qdisc del dev ${dev} ingress`);
    if (hasIfb) ip.push(`link del dev ${ifb}`);
  }
  return { ip, tc };
}

/**
 * Plans one VPC namespace: its bridges and NICs. `links` and `qdiscs` are
 * what the kernel has in that namespace now.
 */
export function planVpc(
  hostId: string,
  subnets: SubnetSpec[],
  nics: NicSpec[],
  links: LinkInfo[],
  qdiscs: QdiscInfo[],
  opts: { removeOrphans: boolean } = { removeOrphans: true },
): VpcPlan {
  const plan = emptyPlan();
  const byName = new Map(links.map((l) => [l.ifname, l]));
  const wanted = new Set<string>();
  const bridgeOf = new Map(subnets.map((s) => [s.subnetId, names.bridge(s.subnetId)]));
  for (const s of subnets) wanted.add(names.bridge(s.subnetId));
  for (const n of nics) {
    wanted.add(n.hostIf);
    wanted.add(names.ifb(n.nicId));
  }
  // 1. Orphans first: devices we own that nothing wants (frees their names).
  // A partial plan (one NIC, one subnet) sees only part of the desired
  // state, so it must never remove anything.
  for (const l of opts.removeOrphans ? links : []) {
    if (isOurs(hostId, l) && !wanted.has(l.ifname)) {
      plan.ip.push(`link del dev ${l.ifname}`);
      plan.changes.push(`remove orphan ${l.ifname}`);
    }
  }
  // 2. Bridges with the gateway address.
  for (const s of subnets) {
    const br = names.bridge(s.subnetId);
    const have = byName.get(br);
    if (!have) {
      plan.ip.push(
        `link add ${br} mtu ${s.mtu} address ${bridgeMac(s.subnetId)} type bridge`,
        `link set dev ${br} alias ${names.alias(hostId, s.subnetId)}`,
        `addr add ${s.gatewayCidr} dev ${br}`,
        `link set dev ${br} up`,
      );
      plan.changes.push(`create bridge ${br} ${s.gatewayCidr}`);
      continue;
    }
    if (!isOurs(hostId, have)) {
      plan.changes.push(`bridge ${br} exists but is not ours; left alone`);
      continue;
    }
    const strays = have.addrs.filter((a) => a !== s.gatewayCidr);
    // Last first: the kernel lists a subnet's primary before its
    // secondaries and deletes those with it, so a secondary deleted after
    // its primary would fail the batch (ip -batch stops at an error).
    for (const a of [...strays].reverse()) {
      plan.ip.push(`addr del ${a} dev ${br}`);
      plan.changes.push(`remove stray address ${a} from ${br}`);
    }
    if (!have.addrs.includes(s.gatewayCidr)) {
      plan.ip.push(`addr add ${s.gatewayCidr} dev ${br}`);
      plan.changes.push(`restore gateway ${s.gatewayCidr} on ${br}`);
    } else if (strays.length) {
      // The gateway may be a secondary address of a stray's subnet, which
      // the kernel deletes with that primary (promote_secondaries is off):
      // put it back after the deletions, a no-op if it survived.
      plan.ip.push(`addr replace ${s.gatewayCidr} dev ${br}`);
    }
    if (have.mtu !== s.mtu) plan.ip.push(`link set dev ${br} mtu ${s.mtu}`);
    if (have.mac !== bridgeMac(s.subnetId)) {
      plan.ip.push(`link set dev ${br} address ${bridgeMac(s.subnetId)}`);
      plan.changes.push(`restore gateway MAC of ${br}`);
    }
    if (!have.up) {
      plan.ip.push(`link set dev ${br} up`);
      plan.changes.push(`bring ${br} up`);
    }
  }
  // 3. NICs.
  for (const n of nics) {
    const br = bridgeOf.get(n.subnetId);
    if (!br) {
      plan.changes.push(`nic ${n.nicId}: subnet ${n.subnetId} not on this host; skipped`);
      continue;
    }
    const have = byName.get(n.hostIf);
    if (!have) {
      const { ip, guest } = nicCreateLines(hostId, n, br);
      plan.ip.push(...ip);
      if (guest.length) plan.guests.push({ nicId: n.nicId, netnsPath: n.veth!.netnsPath, lines: guest });
      plan.changes.push(`create ${n.kind} ${n.hostIf} for ${n.nicId} (${n.address})`);
      const bw = bandwidthLines(hostId, n, [], links);
      plan.ip.push(...bw.ip);
      plan.tc.push(...bw.tc);
      continue;
    }
    if (!isOurs(hostId, have)) {
      plan.changes.push(`${n.hostIf} exists but is not ours; left alone`);
      continue;
    }
    if (have.master !== br || !have.up || have.mtu !== n.mtu) {
      plan.ip.push(...attachLines(n, br));
      plan.changes.push(`repair ${n.hostIf} (master ${have.master ?? "none"}, ${have.up ? "up" : "down"}, mtu ${have.mtu})`);
    }
    const bw = bandwidthLines(hostId, n, qdiscs, links);
    plan.ip.push(...bw.ip);
    plan.tc.push(...bw.tc);
    if (bw.ip.length || bw.tc.length) plan.changes.push(`bandwidth of ${n.hostIf}`);
  }
  return plan;
}

/** The `ip=` kernel argument for static guest configuration. */
export function kernelIpArg(n: NicSpec, netmask: string, device = "eth0"): string {
  return `ip=${n.address}::${n.gateway}:${netmask}:${n.hostname}:${device}:off${n.dns[0] ? `:${n.dns[0]}` : ""}`;
}

export function prefixToNetmask(prefix: number): string {
  const m = prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
  return [m >>> 24, (m >>> 16) & 255, (m >>> 8) & 255, m & 255].join(".");
}
