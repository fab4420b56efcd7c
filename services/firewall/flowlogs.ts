// Flow logs: one JSON line per flow of a local NIC, accepted or rejected,
// from the kernel's own signals, never per packet on the allowed path:
//   * accepted flows: the conntrack DESTROY event of each VPC namespace
//     (`conntrack -E`), with the namespace's own nf_conntrack_acct and
//     nf_conntrack_timestamp on, so the event carries packets, bytes and the
//     flow's lifetime; one event per flow, sampled here by the rate;
//   * rejected flows: the compiled drop rules (a NIC's security groups, its
//     subnet's network ACL, anti-spoofing) log to an NFLOG group (sampled
//     and rate-limited in nft, see compile.ts) and one ulogd2 per namespace
//     turns those packets into JSON on its stdout; the drops of one 5-tuple
//     within the aggregation window are one record.
// Which NICs log, and the share sampled, is the FlowLogConfig resource
// (flowlog-config.ts), resolved per VPC in each firewall pass into
// VpcFirewallState.flowLogs. Records go to <dir>/<host>.jsonl, rotated by size.
import { spawn, type ChildProcess } from "node:child_process";
import { appendFileSync, closeSync, existsSync, mkdirSync, openSync, readSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { createInterface } from "node:readline";
import type { Logger } from "pino";
import { run } from "../common/exec.js";
import type { BindingRec, SecurityGroupRec, VpcFirewallState } from "./model.js";

export { checkSampleRate } from "./flowlog-config.js";

/** The NFLOG group the drop rules log to; each VPC namespace has its own NFLOG instance, so one number serves all. */
export const FLOW_LOG_GROUP = 7461;
/** The conntrack event socket's buffer: room for a burst of some 20 000 events before the kernel drops them. */
const CT_BUFFER_BYTES = 8 * 1024 * 1024;
/** Start times of open flows remembered, across namespaces. */
const MAX_OPEN_FLOWS = 200_000;
/** An accepted flow open this long gets an interim record every this often (--flow-logs-interval-ms). */
export const DEFAULT_INTERVAL_MS = 60_000;
/** Drop records: at most this many logged packets per second per NIC chain (a flood cannot swamp userspace). */
export const DROP_LOG_RATE = 50;

export interface FlowRecord {
  time: string;
  vpc: string;
  nic: string;
  /** The NIC's owner (its VM): "<host>/<vm id>" as vmm attaches NICs becomes the VM id. */
  vm: string;
  src: string;
  dst: string;
  sport: number;
  dport: number;
  proto: string;
  packets: number;
  bytes: number;
  start: string;
  end: string;
  action: "accept" | "reject";
  decided_by: string;
  /** Accepted flows: when the flow began (`start`..`end` is the span this record counts). */
  flow_start?: string;
  /** Accepted flows: an interim record of a flow still open (the last record of a flow has none). */
  interim?: true;
}

export interface FlowLogOptions {
  dir: string;
  hostId: string;
  /** Rotate once the file passes this many bytes. */
  maxBytes?: number;
  /** Keep this many rotated files (<host>.jsonl.1 … .N). */
  keep?: number;
  /** Drops of one 5-tuple with gaps shorter than this are one record (at most ten windows long). */
  aggregateMs?: number;
  /** An accepted flow open this long gets an interim record every interval (its counts since the last); default 60 s. */
  intervalMs?: number;
}

const IPV4 = /^(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}$/;
const PROTOS = new Set(["tcp", "udp", "icmp"]);

/** A flow's tuple and both directions' counts, as conntrack's events and listings give them. */
interface CtFlow {
  proto: string;
  src: string;
  dst: string;
  sport: number;
  dport: number;
  packets: number;
  bytes: number;
}

export interface CtDestroy extends CtFlow {
  endMs: number;
  startMs: number;
}

/**
 * One line of `conntrack -E -e DESTROY -o extended,timestamp`, e.g.
 * `[1796226932.507354]\t[DESTROY] ipv4 2 tcp 6 120 CLOSE src=… dst=… sport=… dport=… packets=1 bytes=60 [UNREPLIED] src=… packets=1 bytes=40 delta-time=0 id=…`:
 * the original direction's tuple, both directions' counts; null for any other line.
 */
export function parseCtDestroy(line: string): CtDestroy | null {
  const e = parseCtEvent(line);
  return e?.type === "DESTROY" ? e : null;
}

/**
 * A NEW or DESTROY line of `conntrack -E -o extended,timestamp,id`: the
 * event's time, the flow's id (the last id=), and for DESTROY the tuple and counts.
 */
export function parseCtEvent(line: string): (CtDestroy & { type: "NEW" | "DESTROY"; id: string }) | null {
  const m = /^\[([0-9]{1,12})\.([0-9]{1,9})\]\s+\[(NEW|DESTROY)\]\s+ipv4\s+2\s+([a-z]+)\s+(.*)$/.exec(line.trim());
  if (!m || !PROTOS.has(m[4])) return null;
  const type = m[3] as "NEW" | "DESTROY";
  const endMs = Number(m[1]) * 1000 + Math.floor(Number(`0.${m[2]}`) * 1000);
  const body = parseCtBody(m[4], m[5], endMs);
  return body && { type, ...body };
}

/** An entry of `conntrack -L -o extended,id`: the flow's id, tuple, TCP state and both directions' counts so far; null for any other line. */
export interface CtEntry extends CtFlow {
  id: string;
  /** TCP's conntrack state (ESTABLISHED, TIME_WAIT …); "" for other protocols. */
  state: string;
}

export function parseCtEntry(line: string): CtEntry | null {
  const m = /^ipv4\s+2\s+([a-z]+)\s+[0-9]+\s+[0-9]+\s+(?:([A-Z_]+)\s+)?(.*)$/.exec(line.trim());
  if (!m || !PROTOS.has(m[1])) return null;
  const b = parseCtBody(m[1], m[3], 0);
  if (!b || b.id === "") return null;
  return { id: b.id, proto: b.proto, state: m[2] ?? "", src: b.src, dst: b.dst, sport: b.sport, dport: b.dport, packets: b.packets, bytes: b.bytes };
}

/** The key=value part of a conntrack line (original tuple first): the flow's tuple, counts, id and delta-time. */
function parseCtBody(proto: string, rest: string, endMs: number): (CtDestroy & { id: string }) | null {
  const kv = [...rest.matchAll(/([a-z-]+)=([0-9.]+)/g)].map((x) => [x[1], x[2]] as const);
  const first = (k: string) => kv.find(([key]) => key === k)?.[1];
  const all = (k: string) => kv.filter(([key]) => key === k).map(([, v]) => Number(v));
  const src = first("src");
  const dst = first("dst");
  if (!src || !dst || !IPV4.test(src) || !IPV4.test(dst)) return null;
  const icmp = proto === "icmp";
  const sport = icmp ? 0 : Number(first("sport") ?? NaN);
  const dport = icmp ? Number(first("type") ?? 0) : Number(first("dport") ?? NaN);
  if (![sport, dport].every((p) => Number.isInteger(p) && p >= 0 && p <= 65535)) return null;
  const sum = (xs: number[]) => xs.filter((x) => Number.isSafeInteger(x)).reduce((a, b) => a + b, 0);
  const delta = Number(first("delta-time") ?? 0);
  const ids = all("id");
  return {
    id: String(ids[ids.length - 1] ?? ""),
    endMs,
    proto,
    src,
    dst,
    sport,
    dport,
    packets: sum(all("packets")),
    bytes: sum(all("bytes")),
    startMs: endMs - (Number.isFinite(delta) ? delta * 1000 : 0),
  };
}

export interface UlogDrop {
  timeMs: number;
  prefix: string;
  proto: string;
  src: string;
  dst: string;
  sport: number;
  dport: number;
  bytes: number;
}

/** One JSON line of ulogd2's JSON output (NFLOG → BASE → IP2STR); null if it is not an IPv4 packet we logged. */
export function parseUlogDrop(line: string): UlogDrop | null {
  let j: Record<string, unknown>;
  try {
    j = JSON.parse(line) as Record<string, unknown>;
  } catch {
    return null;
  }
  const prefix = j["oob.prefix"];
  const src = j["src_ip"];
  const dst = j["dest_ip"];
  if (typeof prefix !== "string" || typeof src !== "string" || typeof dst !== "string" || !IPV4.test(src) || !IPV4.test(dst)) return null;
  const pn = j["ip.protocol"];
  const proto = pn === 6 ? "tcp" : pn === 17 ? "udp" : pn === 1 ? "icmp" : null;
  if (!proto) return null;
  const num = (k: string) => (typeof j[k] === "number" && Number.isInteger(j[k]) ? (j[k] as number) : 0);
  const sec = num("oob.time.sec");
  return {
    timeMs: sec ? sec * 1000 + Math.floor(num("oob.time.usec") / 1000) : Date.now(),
    prefix,
    proto,
    src,
    dst,
    sport: proto === "icmp" ? 0 : num("src_port"),
    dport: proto === "icmp" ? num("icmp.type") : num("dest_port"),
    bytes: num("raw.pktlen"),
  };
}

/**
 * The nft prefix of a logged drop: "<nic hex> <in|out> <decider>" (the
 * decider has no spaces); "-" for the NIC where the rule is a subnet's (an
 * ACL): the collector then finds it by address (in: the destination, out:
 * the source).
 */
export function dropPrefix(nicHex: string, dir: "in" | "out" | "any", decider: string): string {
  return `${nicHex} ${dir} ${decider}`;
}

/** The VM of a NIC owner: vmm attaches a VM's NICs for "<host>/<vm id>"; any other owner is itself. */
export function vmOfOwner(owner: string | undefined): string {
  if (!owner) return "";
  const i = owner.lastIndexOf("/");
  return i >= 0 ? owner.slice(i + 1) : owner;
}

/** The security group (and rule index) that let a flow in or out, as `sg-…#n`, or the default that did. */
export function acceptedBy(st: VpcFirewallState, src: string, dst: string, proto: string, dport: number): string {
  const find = (gs: SecurityGroupRec[], dir: "ingress" | "egress", peer: string): string | undefined => {
    for (const g of gs) {
      const i = g.rules.findIndex((r) => {
        if (r.dir !== dir) return false;
        const peerOk = r.group ? (st.members.get(r.group) ?? []).includes(peer) : inCidr(peer, r.cidr!);
        if (!peerOk) return false;
        if (r.proto === "all") return true;
        if (r.proto !== proto) return false;
        if (r.proto === "icmp") return true;
        return (r.portFrom === 0 && r.portTo === 0) || (dport >= r.portFrom && dport <= r.portTo);
      });
      if (i >= 0) return `${g.id}#${i + 1}`;
    }
    return undefined;
  };
  const groupsOf = (n: BindingRec) => n.groupIds.map((g) => st.groups.get(g)).filter((g): g is SecurityGroupRec => !!g);
  const receiver = st.nics.find((n) => n.address === dst);
  if (receiver) return find(groupsOf(receiver), "ingress", src) ?? "default";
  const sender = st.nics.find((n) => n.address === src);
  if (sender && sender.groupIds.length) return find(groupsOf(sender), "egress", dst) ?? "default";
  return "default-egress-open";
}

function inCidr(ip: string, cidr: string): boolean {
  const n = (a: string) => a.split(".").reduce((x, o) => x * 256 + Number(o), 0);
  const [base, len] = cidr.split("/");
  const size = 2 ** (32 - Number(len));
  return n(ip) >= n(base) && n(ip) < n(base) + size;
}

/** Appends JSON lines to <dir>/<host>.jsonl; past maxBytes the file becomes .1 (and .1 → .2 …, the oldest beyond `keep` deleted). */
export class RotatingJsonl {
  readonly path: string;
  private size: number;
  constructor(
    readonly dir: string,
    name: string,
    readonly maxBytes = 64 * 1024 * 1024,
    readonly keep = 5,
  ) {
    mkdirSync(dir, { recursive: true, mode: 0o750 });
    this.path = join(dir, `${name}.jsonl`);
    this.size = existsSync(this.path) ? statSync(this.path).size : 0;
  }

  write(rec: object): void {
    const line = `${JSON.stringify(rec)}\n`;
    if (this.size > 0 && this.size + line.length > this.maxBytes) this.rotate();
    appendFileSync(this.path, line, { mode: 0o640 });
    this.size += Buffer.byteLength(line);
  }

  private rotate(): void {
    rmSync(`${this.path}.${this.keep}`, { force: true });
    for (let i = this.keep - 1; i >= 1; i--) if (existsSync(`${this.path}.${i}`)) renameSync(`${this.path}.${i}`, `${this.path}.${i + 1}`);
    renameSync(this.path, `${this.path}.1`);
    this.size = 0;
  }
}

/** What the collector needs of the firewall: the applied state of a namespace (with its NICs that log, and their rates) and a NIC's owner. */
export interface FlowLogSource {
  stateOf(ns: string): VpcFirewallState | undefined;
  ownerOf(nicId: string): string | undefined;
}

/** The sample rate of a NIC that logs flows; undefined if it does not. */
const rateOf = (st: VpcFirewallState, n: BindingRec | undefined) => (n ? st.flowLogs?.nics.get(n.nicId) : undefined);

/** Whether the local subnet holding an address logs the drops toward addresses with no bound NIC. */
const subnetLogs = (st: VpcFirewallState, addr: string) => st.subnets.some((s) => st.flowLogs?.subnets?.has(s.subnetId) && inCidr(addr, s.cidr));

/** What a record counts of a flow: its tuple and both directions' totals. */
type CtCounts = Pick<CtEntry, "proto" | "src" | "dst" | "sport" | "dport" | "packets" | "bytes">;

interface OpenFlow {
  startMs: number;
  /** Where the next record's span starts: the flow's start, then the last interim record's end. */
  fromMs: number;
  /** Counted by the records written so far. */
  packets: number;
  bytes: number;
  sampled?: boolean;
}

interface NsReaders {
  startedMs: number;
  ct: ChildProcess;
  ulogd?: ChildProcess;
}

/** Runs a conntrack event reader and a ulogd2 per VPC namespace with flow-logging NICs, and writes the records. */
export class FlowLogCollector {
  private readonly readers = new Map<string, NsReaders>();
  /** Open flows seen NEW, by "<ns> <conntrack id>": their start, what the records so far counted, whether the flow is sampled. */
  private readonly flows = new Map<string, OpenFlow>();
  private readonly pending = new Map<string, { rec: FlowRecord; startMs: number; endMs: number }>();
  readonly out: RotatingJsonl;
  private readonly flushTimer: NodeJS.Timeout;
  private readonly interimTimer: NodeJS.Timeout;
  private listing = false;
  /** The conntrack listing under way, ended with the collector. */
  private lister?: ChildProcess;
  private stopped = false;

  constructor(
    readonly opts: FlowLogOptions,
    readonly source: FlowLogSource,
    readonly log: Logger,
    readonly random: () => number = Math.random,
  ) {
    this.out = new RotatingJsonl(opts.dir, opts.hostId, opts.maxBytes, opts.keep);
    this.flushTimer = setInterval(() => this.flush(false), Math.max(200, (opts.aggregateMs ?? 5000) / 4));
    this.flushTimer.unref();
    this.interimTimer = setInterval(() => void this.interim(), this.intervalMs);
    this.interimTimer.unref();
  }

  get intervalMs(): number {
    return this.opts.intervalMs ?? DEFAULT_INTERVAL_MS;
  }

  /** Makes the readers match the namespaces that need them (called after each firewall pass). */
  async ensure(namespaces: string[]): Promise<void> {
    if (this.stopped) return;
    const logs = (ns: string) => {
      const fl = this.source.stateOf(ns)?.flowLogs;
      return (fl?.nics.size ?? 0) + (fl?.subnets?.size ?? 0) > 0;
    };
    const want = new Set(namespaces.filter(logs));
    for (const [ns, r] of this.readers) {
      const alive = r.ct.exitCode === null && (r.ulogd === undefined || r.ulogd.exitCode === null);
      // A reader that died is restarted, but not more often than every 10 s.
      if (want.has(ns) && (alive || Date.now() - r.startedMs < 10_000)) continue;
      if (!alive) this.log.warn({ ns }, "flow logs: a reader ended; restarting it");
      this.kill(ns, r);
    }
    for (const ns of want) if (!this.readers.has(ns)) await this.startNs(ns);
  }

  private kill(ns: string, r: NsReaders): void {
    this.readers.delete(ns);
    for (const key of this.flows.keys()) if (key.startsWith(`${ns} `)) this.flows.delete(key);
    if (r.ct.exitCode === null) r.ct.kill("SIGTERM");
    if (r.ulogd?.pid && r.ulogd.exitCode === null) {
      try {
        process.kill(-r.ulogd.pid, "SIGTERM");
      } catch {
        // already gone
      }
    }
  }

  private async startNs(ns: string): Promise<void> {
    // Per-namespace sysctls only (ip netns exec): DESTROY events then carry packets, bytes and delta-time.
    await run("ip", ["netns", "exec", ns, "sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1", "net.netfilter.nf_conntrack_timestamp=1"], {
      timeoutMs: 10_000,
    });
    const ct = spawn("ip", ["netns", "exec", ns, "conntrack", "-E", "-e", "NEW,DESTROY", "-o", "extended,timestamp,id", "-b", String(CT_BUFFER_BYTES)], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    createInterface({ input: ct.stdout! }).on("line", (l) => this.onCt(ns, l));
    // A burst past the socket buffer loses events (the kernel says ENOBUFS; conntrack goes on): said, not hidden.
    createInterface({ input: ct.stderr! }).on("line", (l) => {
      if (/ENOBUFS|losing events/i.test(l))
        this.log.warn({ ns }, "flow logs: conntrack events were lost (a burst past the netlink buffer); some accepted flows have no record");
    });
    const r: NsReaders = { ct, startedMs: Date.now() };
    const conf = join(this.opts.dir, `.ulogd-${ns}.conf`);
    if (existsSync(ULOGD)) {
      writeFileSync(conf, ulogdConf(join(this.opts.dir, `.ulogd-${ns}.log`)), { mode: 0o640 });
      // ulogd's JSON output opens its file: /dev/stdout must be a pipe (a
      // child's stdout from node is a socket, which cannot be opened), hence
      // `| cat`; its own process group, so stopping it ends both.
      const u = spawn("ip", ["netns", "exec", ns, "sh", "-c", `${ULOGD} -c "$0" | cat`, conf], { stdio: ["ignore", "pipe", "pipe"], detached: true });
      createInterface({ input: u.stdout! }).on("line", (l) => this.onDrop(ns, l));
      u.stderr!.resume();
      r.ulogd = u;
    } else this.log.warn({ ns }, `flow logs: ${ULOGD} is missing (Debian ulogd2, ulogd2-json): rejected flows are not logged`);
    this.readers.set(ns, r);
    this.log.info({ ns }, "flow logs: reading conntrack events and drop logs");
  }

  private sampled(rate: number): boolean {
    return rate >= 1 || this.random() < rate;
  }

  onCt(ns: string, line: string): void {
    const e = parseCtEvent(line);
    const st = this.source.stateOf(ns);
    if (!e || !st) return;
    // NEW gives the flow's start (conntrack's delta-time is whole seconds); bounded, oldest forgotten first.
    const key = `${ns} ${e.id}`;
    if (e.type === "NEW") {
      this.flows.set(key, { startMs: e.endMs, fromMs: e.endMs, packets: 0, bytes: 0 });
      if (this.flows.size > MAX_OPEN_FLOWS) this.flows.delete(this.flows.keys().next().value!);
      return;
    }
    const f = this.flows.get(key);
    this.flows.delete(key);
    // The last record of the flow: what the interim records have not counted.
    const startMs = f?.startMs ?? e.startMs;
    this.writeAccepted(st, e, f ?? { startMs, fromMs: startMs, packets: 0, bytes: 0 }, e.endMs, false);
  }

  /** Writes an accepted flow's record (if a NIC of it logs and the flow is sampled) counting what `f` has not yet; returns whether it did. */
  private writeAccepted(st: VpcFirewallState, e: CtCounts, f: OpenFlow, endMs: number, interim: boolean): boolean {
    // The NIC of the flow: the sender's if it is local and logs, else the receiver's.
    const nic = [e.src, e.dst].map((a) => st.nics.find((n) => n.address === a)).find((n) => rateOf(st, n) !== undefined);
    if (!nic) return false;
    // Sampling is per flow: decided at its first record, kept for the rest.
    f.sampled ??= this.sampled(rateOf(st, nic)!);
    if (!f.sampled) return false;
    this.out.write({
      time: new Date(endMs).toISOString(),
      vpc: st.vpcId,
      nic: nic.nicId,
      vm: vmOfOwner(this.source.ownerOf(nic.nicId)),
      src: e.src,
      dst: e.dst,
      sport: e.sport,
      dport: e.dport,
      proto: e.proto,
      packets: Math.max(0, e.packets - f.packets),
      bytes: Math.max(0, e.bytes - f.bytes),
      start: new Date(Math.min(f.fromMs, endMs)).toISOString(),
      end: new Date(endMs).toISOString(),
      action: "accept",
      decided_by: acceptedBy(st, e.src, e.dst, e.proto, e.dport),
      flow_start: new Date(Math.min(f.startMs, endMs)).toISOString(),
      ...(interim ? { interim: true as const } : {}),
    } satisfies FlowRecord);
    return true;
  }

  /**
   * Interim records (as AWS writes one per aggregation interval): every
   * interval, each namespace's conntrack table is listed once (the kernel's
   * own counters, conntrack accounting; nothing per packet) and every flow
   * open at least an interval with packets since its last record gets one,
   * counting those. Flows closing (TCP TIME_WAIT, CLOSE) are left to their
   * last record, at DESTROY.
   */
  async interim(): Promise<void> {
    if (this.stopped || this.listing) return;
    this.listing = true;
    try {
      for (const ns of [...this.readers.keys()]) {
        const now = Date.now();
        await this.listNs(ns, (c) => this.onListed(ns, c, now));
      }
    } finally {
      this.listing = false;
    }
  }

  /** One entry of a namespace's conntrack listing at `now`: an interim record if the flow is due one. */
  onListed(ns: string, c: CtEntry, now: number): void {
    const f = this.flows.get(`${ns} ${c.id}`);
    const st = this.source.stateOf(ns);
    if (!f || !st || now - f.startMs < this.intervalMs || c.state === "TIME_WAIT" || c.state === "CLOSE" || c.packets <= f.packets) return;
    if (this.writeAccepted(st, c, f, now, true)) Object.assign(f, { fromMs: now, packets: c.packets, bytes: c.bytes });
  }

  /** Streams `conntrack -L -o extended,id` of a namespace to `each`, bounded by the interval in time. */
  private listNs(ns: string, each: (c: CtEntry) => void): Promise<void> {
    return new Promise((resolve) => {
      const p = spawn("ip", ["netns", "exec", ns, "conntrack", "-L", "-o", "extended,id"], { stdio: ["ignore", "pipe", "ignore"] });
      this.lister = p;
      const timer = setTimeout(() => p.kill("SIGKILL"), this.intervalMs);
      createInterface({ input: p.stdout! }).on("line", (l) => {
        const c = parseCtEntry(l);
        if (c) each(c);
      });
      p.on("error", (err) => this.log.warn({ ns, err: err.message }, "flow logs: cannot list conntrack for interim records"));
      p.on("close", () => {
        clearTimeout(timer);
        this.lister = undefined;
        resolve();
      });
    });
  }

  onDrop(ns: string, line: string): void {
    const d = parseUlogDrop(line);
    const st = this.source.stateOf(ns);
    if (!d || !st) return;
    const [hex, dir, decider] = d.prefix.trim().split(" ");
    const byAddr = (a: string) => st.nics.find((n) => n.address === a);
    // A NIC's own rule names it; a subnet's or the VPC's ("-") is the NIC of the destination (in), the source (out) or either that logs (any).
    let nic: BindingRec | undefined =
      hex?.length === 12
        ? st.nics.find((n) => n.nicId.endsWith(hex))
        : dir === "any"
          ? [byAddr(d.dst), byAddr(d.src)].find((n) => rateOf(st, n) !== undefined)
          : byAddr(dir === "in" ? d.dst : d.src);
    if (rateOf(st, nic) === undefined) {
      // Toward an address whose NIC is not bound yet: no NIC to name; the subnet's (or VPC's) configuration decides.
      if (decider !== "unbound-nic" || !subnetLogs(st, d.dst)) return;
      nic = undefined;
    }
    const key = `${ns} ${nic?.nicId ?? "-"} ${d.proto} ${d.src}:${d.sport} ${d.dst}:${d.dport}`;
    const p = this.pending.get(key);
    if (p) {
      p.rec.packets++;
      p.rec.bytes += d.bytes;
      p.endMs = d.timeMs;
      return;
    }
    // Not sampled again here: nft's numgen already kept this share of the drops.
    this.pending.set(key, {
      startMs: d.timeMs,
      endMs: d.timeMs,
      rec: {
        time: "",
        vpc: st.vpcId,
        nic: nic?.nicId ?? "",
        vm: nic ? vmOfOwner(this.source.ownerOf(nic.nicId)) : "",
        src: d.src,
        dst: d.dst,
        sport: d.sport,
        dport: d.dport,
        proto: d.proto,
        packets: 1,
        bytes: d.bytes,
        start: "",
        end: "",
        action: "reject",
        decided_by: decider ?? "default",
      },
    });
  }

  /** Writes the drop records whose window has passed (all with `all`). */
  flush(all: boolean): void {
    const now = Date.now();
    const window = this.opts.aggregateMs ?? 5000;
    for (const [key, p] of this.pending) {
      // Idle for a window (its retransmissions have stopped), or open for ten: one record.
      if (!all && now - p.endMs < window && now - p.startMs < 10 * window) continue;
      this.pending.delete(key);
      this.out.write({ ...p.rec, time: new Date(p.endMs).toISOString(), start: new Date(p.startMs).toISOString(), end: new Date(p.endMs).toISOString() });
    }
  }

  stop(): void {
    this.stopped = true;
    clearInterval(this.flushTimer);
    clearInterval(this.interimTimer);
    if (this.lister?.exitCode === null) this.lister.kill("SIGTERM");
    for (const [ns, r] of [...this.readers]) this.kill(ns, r);
    this.flush(true);
  }
}

const ULOGD = "/usr/sbin/ulogd";
const ULOGD_PLUGINS = "/usr/lib/x86_64-linux-gnu/ulogd";

/** ulogd2's configuration: the flow-log NFLOG group, decoded, as JSON lines on stdout. */
export function ulogdConf(logfile: string): string {
  const p = (n: string) => `plugin="${ULOGD_PLUGINS}/${n}.so"`;
  return [
    "[global]",
    `logfile="${logfile}"`,
    "loglevel=5",
    p("ulogd_inppkt_NFLOG"),
    p("ulogd_raw2packet_BASE"),
    p("ulogd_filter_IP2STR"),
    p("ulogd_output_JSON"),
    "stack=log1:NFLOG,base1:BASE,ip2str1:IP2STR,json1:JSON",
    "",
    "[log1]",
    `group=${FLOW_LOG_GROUP}`,
    // The kernel batches up to 1 s by default; a drop's record should not wait for that.
    "netlink_qthreshold=8",
    "netlink_qtimeout=10",
    "",
    "[json1]",
    "sync=1",
    'file="/dev/stdout"',
    "",
  ].join("\n");
}

export interface FlowLogFilter {
  nic?: string;
  /** Any of these NICs or VMs (either matches); none: all. */
  nics?: ReadonlySet<string>;
  vms?: ReadonlySet<string>;
  vpc?: string;
  action?: "accept" | "reject";
  sinceMs?: number;
  limit?: number;
}

/** Keeps the records (JSON lines, newest last) that pass the filter, at most `limit`, the newest. */
export function filterFlowLogs(lines: string[], f: FlowLogFilter): FlowRecord[] {
  const out: FlowRecord[] = [];
  for (const l of lines) {
    let r: FlowRecord;
    try {
      r = JSON.parse(l) as FlowRecord;
    } catch {
      continue;
    }
    if (typeof r !== "object" || r === null) continue;
    if (f.nic && r.nic !== f.nic) continue;
    if ((f.nics?.size || f.vms?.size) && !(f.nics?.has(r.nic) || f.vms?.has(r.vm))) continue;
    if (f.vpc && r.vpc !== f.vpc) continue;
    if (f.action && r.action !== f.action) continue;
    if (f.sinceMs && !(Date.parse(r.end) >= f.sinceMs)) continue;
    out.push(r);
  }
  return f.limit ? out.slice(-f.limit) : out;
}

/** How much of the end of the current file ListFlowLogs reads (the newest records). */
export const READ_TAIL_BYTES = 8 * 1024 * 1024;

/** The last `bytes` of a file as whole lines (the first, cut, line dropped). */
export function tailLines(path: string, bytes = READ_TAIL_BYTES): string[] {
  if (!existsSync(path)) return [];
  const size = statSync(path).size;
  const from = Math.max(0, size - bytes);
  const fd = openSync(path, "r");
  try {
    const buf = Buffer.alloc(size - from);
    readSync(fd, buf, 0, buf.length, from);
    const lines = buf.toString("utf8").split("\n");
    if (from > 0) lines.shift();
    return lines.filter(Boolean);
  } finally {
    closeSync(fd);
  }
}
