// Conntrack tables in-process: libnetfilter_conntrack (the library the
// `conntrack` tool is built on, Debian `libnetfilter-conntrack3`, which
// `conntrack` depends on) through koffi, as common/nft/libnftables.ts calls
// libnftables. Reading or clearing a namespace's table was a `conntrack`
// exec (through `ip netns exec` or nsenter): ~10–20 ms here before it read
// a single entry, once per DetachNic and once per firewall revoke. The same
// dump from this process takes well under a millisecond for a VPC's table.
//
// A netlink socket belongs to the network namespace of the thread that
// opened it: each call opens its handle inside the namespace
// (ns-syscalls.ts inNamedNetns) and the thread moves back at once; the dump
// itself runs on libuv's pool (see dump()). It calls back into JavaScript
// for each entry (one callback registered for the life of the process,
// pointed at the current dump's visitor); entries to delete are kept
// (NFCT_CB_STOLEN) and deleted after the dump, on the same handle.
//
// Clearing by mark does not dump at all: it asks the kernel to delete the
// entries whose mark matches (IPCTNL_MSG_CT_DELETE with CTA_MARK and
// CTA_MARK_MASK and no tuple: the kernel's filtered flush, which
// libnetfilter_conntrack 1.0.9 cannot send, so the message is built here
// and sent on the library's own socket). Both walk the kernel's host-wide
// hash (262 144 buckets here), but a dump with little to hand over walks
// it in one go without yielding (ctnetlink_dump_table; ~10 ms of system
// time here), and every rtnl change on the host waits meanwhile: a veth
// attach made beside two dumps took 6–11 ms instead of 1–1.5, beside two
// flushes the same as alone (bench:conntrack's "beside" rows). The flush
// (nf_ct_iterate_cleanup_net) yields between buckets.
//
// Only IPv4 entries (microvpc's VPCs are IPv4), as `conntrack -L` and
// `conntrack -D -s|-d ADDRESS` saw them: the original direction's tuple.
// Callers fall back to those execs when this returns null (koffi or the
// library cannot be loaded, MICROVPC_CONNTRACK_EXEC=1, or the kernel refused).
import { readFileSync } from "node:fs";
import { release } from "node:os";
import { Counter, Histogram } from "prom-client";
import { metricsRegistry } from "./metrics.js";
import { closeOnExec, inNamedNetns, InProcessLibrary, type Libc } from "./ns-syscalls.js";
import { onPool } from "./rtnl.js";

/** One conntrack entry: the original direction's tuple (ports 0 for protocols without them), and its mark where the reader gives it. */
export interface CtEntry {
  proto: string;
  src: string;
  dst: string;
  sport: number;
  dport: number;
  /** The connection mark (the in-process dump always gives it; `conntrack -L` lines when they print one). */
  mark?: number;
}

const CONNTRACK = 1; // NFNL_SUBSYS_CTNETLINK
const NFCT_T_ALL = 7;
const NFCT_Q_DESTROY = 2;
const NFCT_Q_DUMP = 5;
const NFCT_Q_DUMP_FILTER = 8;
const NFCT_FILTER_DUMP_MARK = 0;
const NFCT_FILTER_DUMP_L3NUM = 1;
const NFCT_CB_CONTINUE = 1;
const NFCT_CB_STOLEN = 2;
const ATTR_ORIG_IPV4_SRC = 0;
const ATTR_ORIG_IPV4_DST = 1;
const ATTR_ORIG_PORT_SRC = 8;
const ATTR_ORIG_PORT_DST = 9;
const ATTR_ORIG_L4PROTO = 17;
const ATTR_MARK = 25;
const AF_INET = 2;
const ENOENT = 2;
/** Protocol numbers as `conntrack -L` names them; the ones with ports. */
const PROTOS: Record<number, string> = { 1: "icmp", 6: "tcp", 17: "udp", 33: "dccp", 47: "gre", 132: "sctp", 136: "udplite" };
const WITH_PORTS = new Set([6, 17, 33, 132, 136]);

const runs = new Counter({
  name: "microvpc_conntrack_library_runs_total",
  help: "Conntrack table dumps (and the deletes after them), and flushes by mark, run in-process through libnetfilter_conntrack (not counted in microvpc_exec_total), by operation and result; an error falls back to a conntrack exec.",
  labelNames: ["op", "result"] as const,
  registers: [metricsRegistry],
});
const runSeconds = new Histogram({
  name: "microvpc_conntrack_library_run_seconds",
  help: "Time of one in-process conntrack dump (with its deletes) or flush by mark, namespace switches included (the event loop waits for it).",
  labelNames: ["op"] as const,
  buckets: [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1],
  registers: [metricsRegistry],
});

type Fn = (...args: unknown[]) => unknown;

interface Lib {
  c: Libc;
  open: Fn;
  close: Fn;
  fd: Fn;
  register: Fn;
  query: Fn;
  destroy: Fn;
  u8: Fn;
  u16: Fn;
  u32: Fn;
  filterCreate: Fn;
  filterDestroy: Fn;
  filterSet: Fn;
  filterSetU8: Fn;
  /** The one registered callback, and what it hands each entry to. */
  cb: unknown;
}

/** The running dump's visitor: what the registered callback calls (null between dumps). */
let visitor: ((ct: unknown) => number) | null = null;

const library = new InProcessLibrary<Lib>("MICROVPC_CONNTRACK_EXEC", (c) => {
  const k = c.koffi;
  const n = k.load("libnetfilter_conntrack.so.3");
  const cbType = k.pointer(k.proto("int", ["int", "void *", "void *"]));
  return {
    c,
    open: n.func("void *nfct_open(uint8_t subsys, unsigned int subscriptions)") as Fn,
    close: n.func("int nfct_close(void *h)") as Fn,
    fd: n.func("int nfct_fd(void *h)") as Fn,
    register: n.func("nfct_callback_register", "int", ["void *", "int", cbType, "void *"]) as Fn,
    query: n.func("int nfct_query(void *h, int query, const void *data)") as Fn,
    destroy: n.func("void nfct_destroy(void *ct)") as Fn,
    u8: n.func("uint8_t nfct_get_attr_u8(void *ct, int attr)") as Fn,
    u16: n.func("uint16_t nfct_get_attr_u16(void *ct, int attr)") as Fn,
    u32: n.func("uint32_t nfct_get_attr_u32(void *ct, int attr)") as Fn,
    filterCreate: n.func("void *nfct_filter_dump_create(void)") as Fn,
    filterDestroy: n.func("void nfct_filter_dump_destroy(void *f)") as Fn,
    filterSet: n.func("void nfct_filter_dump_set_attr(void *f, int type, const void *data)") as Fn,
    filterSetU8: n.func("void nfct_filter_dump_set_attr_u8(void *f, int type, uint8_t data)") as Fn,
    cb: k.register((_type: number, ct: unknown) => (visitor ? visitor(ct) : NFCT_CB_CONTINUE), cbType),
  };
});
const load = () => library.get();

/** How conntrack tables are read and cleared, for a daemon's start-up line. */
export function conntrackStartInfo(): Record<string, unknown> {
  return { conntrack: library.mode() };
}

/** An address the kernel gives in network byte order, read as a little-endian u32. */
function ipv4(n: number): string {
  return `${n & 255}.${(n >>> 8) & 255}.${(n >>> 16) & 255}.${n >>> 24}`;
}

const ntohs = (n: number) => ((n & 255) << 8) | (n >>> 8);

function entryOf(l: Lib, ct: unknown): CtEntry {
  const p = l.u8(ct, ATTR_ORIG_L4PROTO) as number;
  const ports = WITH_PORTS.has(p);
  return {
    proto: PROTOS[p] ?? "unknown",
    src: ipv4(l.u32(ct, ATTR_ORIG_IPV4_SRC) as number),
    dst: ipv4(l.u32(ct, ATTR_ORIG_IPV4_DST) as number),
    sport: ports ? ntohs(l.u16(ct, ATTR_ORIG_PORT_SRC) as number) : 0,
    dport: ports ? ntohs(l.u16(ct, ATTR_ORIG_PORT_DST) as number) : 0,
    mark: (l.u32(ct, ATTR_MARK) as number) >>> 0,
  };
}

/**
 * Dumps and flushes run one at a time: the one registered callback serves
 * one visitor, and each walk of the host's hash takes a pool thread.
 */
let queue: Promise<unknown> = Promise.resolve();
function oneAtATime<T>(run: () => Promise<T>): Promise<T> {
  const next = queue.then(run);
  queue = next.catch(() => undefined);
  return next;
}

/** A library handle whose socket is opened in the named namespace ("" = ours), close-on-exec. */
function openIn(l: Lib, ns: string): unknown {
  const h = inNamedNetns(l.c, ns, () => l.open(CONNTRACK, 0));
  if (!h) throw new Error(`cannot open a conntrack netlink socket in ${ns || "our namespace"}: errno ${l.c.errno()}`);
  closeOnExec(l.c, l.fd(h) as number);
  return h;
}

/**
 * Closes a handle on the pool, not awaited: the kernel makes the close of a
 * netfilter netlink socket wait while any nft deletion (anyone's) is queued
 * for release, an RCU grace period (see nft/libnftables.ts, "Contexts"),
 * which must hold neither the event loop nor the caller.
 */
function closeLater(l: Lib, h: unknown): void {
  void onPool(l.close, h).catch(() => {});
}

/**
 * A kernel-side filter on the connection mark: the dump carries only the
 * entries whose `mark & mask` is `value` (ctnetlink filters while it walks;
 * libnetfilter_conntrack's NFCT_Q_DUMP_FILTER, as `conntrack -L -m V/M`).
 */
export interface MarkFilter {
  value: number;
  mask: number;
}

/**
 * Dumps the IPv4 conntrack table of the named namespace ("" = ours), hands
 * each entry to `del`, and deletes the entries it picks. With mark filters,
 * one dump per filter, each carrying only the entries with that mark (the
 * kernel filters); without, one dump of the whole table. Resolves to the
 * entries dumped and how many were deleted, or null when the library is
 * not loaded or the kernel refused (counted). The handle is opened in the
 * namespace on this thread; each dump runs on a pool thread (koffi's async
 * call: the kernel walks the whole, host-wide conntrack hash for it, which
 * must not hold the event loop), its callbacks come back to this thread,
 * and the deletes (lookups by tuple) run here.
 */
function dump(op: string, ns: string, del: (e: CtEntry) => boolean, marks: MarkFilter[] = []): Promise<{ entries: CtEntry[]; deleted: number } | null> {
  const l = load();
  if (!l) return Promise.resolve(null);
  return oneAtATime(() => dumpNow(l, op, ns, del, marks));
}

async function dumpNow(
  l: Lib,
  op: string,
  ns: string,
  del: (e: CtEntry) => boolean,
  marks: MarkFilter[],
): Promise<{ entries: CtEntry[]; deleted: number } | null> {
  const t0 = process.hrtime.bigint();
  const doomed: unknown[] = [];
  const filters: unknown[] = [];
  let h: unknown = null;
  try {
    h = openIn(l, ns);
    if ((l.register(h, NFCT_T_ALL, l.cb, null) as number) < 0) throw new Error(`nfct_callback_register failed: errno ${l.c.errno()}`);
    const entries: CtEntry[] = [];
    const queries: [number, unknown][] = [];
    if (marks.length === 0) {
      const family = Buffer.alloc(4);
      family.writeUInt32LE(AF_INET);
      queries.push([NFCT_Q_DUMP, family]);
    }
    for (const m of marks) {
      const f = l.filterCreate();
      if (!f) throw new Error("nfct_filter_dump_create failed");
      filters.push(f);
      // struct nfct_filter_dump_mark { uint32_t val; uint32_t mask; }, in host order (the library converts); copied by the library.
      const mark = Buffer.alloc(8);
      mark.writeUInt32LE(m.value >>> 0, 0);
      mark.writeUInt32LE(m.mask >>> 0, 4);
      l.filterSet(f, NFCT_FILTER_DUMP_MARK, mark);
      l.filterSetU8(f, NFCT_FILTER_DUMP_L3NUM, AF_INET);
      queries.push([NFCT_Q_DUMP_FILTER, f]);
    }
    visitor = (ct) => {
      const e = entryOf(l, ct);
      entries.push(e);
      if (!del(e)) return NFCT_CB_CONTINUE;
      doomed.push(ct);
      return NFCT_CB_STOLEN;
    };
    try {
      for (const [query, data] of queries) {
        if ((await onPool<number>(l.query, h, query, data)) < 0) throw new Error(`the conntrack dump of ${ns || "our namespace"} failed`);
      }
    } finally {
      visitor = null;
    }
    let deleted = 0;
    for (const ct of doomed) {
      // One that expired meanwhile is gone already (ENOENT), as `conntrack -D` would find;
      // so is one two filters both carried (a flow between two of the marked NICs' fields).
      if ((l.query(h, NFCT_Q_DESTROY, ct) as number) === 0) deleted++;
      else if (l.c.errno() !== ENOENT) throw new Error(`conntrack delete failed: errno ${l.c.errno()}`);
    }
    runs.inc({ op, result: "ok" });
    return { entries, deleted };
  } catch {
    runs.inc({ op, result: "error" });
    return null;
  } finally {
    for (const ct of doomed) l.destroy(ct);
    for (const f of filters) l.filterDestroy(f);
    if (h) closeLater(l, h);
    runSeconds.observe({ op }, Number(process.hrtime.bigint() - t0) / 1e9);
  }
}

/** `conntrack -L` of the named namespace, in-process; null when that could not be done (the caller execs). */
export async function conntrackList(ns: string): Promise<CtEntry[] | null> {
  return (await dump("list", ns, () => false))?.entries ?? null;
}

/** Deletes the entries `match` picks (`conntrack -D …`), in-process; how many, or null when that could not be done (the caller execs). */
export async function conntrackDelete(ns: string, match: (e: CtEntry) => boolean): Promise<number | null> {
  return (await dump("delete", ns, match))?.deleted ?? null;
}

/**
 * Deletes every entry whose mark matches one of the filters (`conntrack -D
 * -m V/M` for each), in-process: the kernel hands over only those entries,
 * not the namespace's whole table. How many, or null when that could not
 * be done (the caller execs).
 */
export async function conntrackDeleteByMark(ns: string, marks: MarkFilter[]): Promise<number | null> {
  if (marks.length === 0) return 0;
  const l = load();
  if (!l) return null;
  if (FLUSH_BY_MARK) {
    const flushed = await oneAtATime(() => flushByMark(l, ns, marks));
    if (flushed !== null) return flushed;
  }
  // A kernel that refuses the filtered flush: the filtered dumps, and their deletes.
  return (await dump("delete-by-mark", ns, () => true, marks))?.deleted ?? null;
}

const IPCTNL_MSG_CT_DELETE = (CONNTRACK << 8) | 2;
const NLM_F_REQUEST = 1;
const NLM_F_ACK = 4;
const NLMSG_ERROR = 2;
const CTA_MARK = 8;
const CTA_MARK_MASK = 21;

/**
 * The kernel's delete request for every entry whose mark, masked, is the
 * value: a netlink header, an nfgenmsg of version 0 (no family filter) and
 * CTA_MARK and CTA_MARK_MASK, in network order; no tuple, so the kernel
 * flushes by the filter (ctnetlink_flush_conntrack).
 */
export function markFlushMessage(m: MarkFilter, seq: number): Buffer {
  const b = Buffer.alloc(36);
  b.writeUInt32LE(36, 0);
  b.writeUInt16LE(IPCTNL_MSG_CT_DELETE, 4);
  b.writeUInt16LE(NLM_F_REQUEST | NLM_F_ACK, 6);
  b.writeUInt32LE(seq >>> 0, 8);
  b.writeUInt32LE(0, 12);
  b.writeUInt8(AF_INET, 16);
  b.writeUInt8(0, 17);
  b.writeUInt16BE(0, 18);
  b.writeUInt16LE(8, 20);
  b.writeUInt16LE(CTA_MARK, 22);
  b.writeUInt32BE(m.value >>> 0, 24);
  b.writeUInt16LE(8, 28);
  b.writeUInt16LE(CTA_MARK_MASK, 30);
  b.writeUInt32BE(m.mask >>> 0, 32);
  return b;
}

/** The error of the kernel's answer to one request (0: done), or null when the answer is not an ack. */
export function ackError(b: Buffer, n: number): number | null {
  if (n < 20 || b.readUInt16LE(4) !== NLMSG_ERROR) return null;
  return b.readInt32LE(16);
}

let flushSeq = 1;

/**
 * Whether the kernel flushes by mark alone. Before Linux 4.x's
 * ctnetlink_flush_conntrack took CTA_MARK as a filter, the same request
 * flushed the namespace's whole table, and acked it: on a kernel older
 * than 5.0 (microvpc needs a far newer one for its nftables anyway) the
 * filtered dumps are used instead.
 */
export function kernelFlushesByMark(release: string): boolean {
  const major = /^(\d+)\./.exec(release)?.[1];
  return major !== undefined && Number(major) >= 5;
}
const FLUSH_BY_MARK = kernelFlushesByMark(release());

/**
 * Deletes the entries matching each filter with the kernel's filtered
 * flush (see the top of the file), on the handle's own socket, opened in
 * the namespace. How many: the namespace's entry count before less after,
 * an approximation (a flow of the namespace that began or ended meanwhile
 * counts too; flushes and dumps of this process run one at a time): for
 * metrics and logs, never for a decision. Null when the kernel refused or
 * the request could not be made: the caller dumps instead.
 */
async function flushByMark(l: Lib, ns: string, marks: MarkFilter[]): Promise<number | null> {
  const t0 = process.hrtime.bigint();
  let h: unknown = null;
  try {
    h = openIn(l, ns);
    const fd = l.fd(h) as number;
    const before = conntrackCount(ns);
    const answer = Buffer.alloc(256);
    for (const m of marks) {
      const msg = markFlushMessage(m, flushSeq++);
      // The kernel walks its hash inside send(): on the pool.
      if (Number(await onPool<number>(l.c.send, fd, msg, msg.length, 0)) !== msg.length) throw new Error("the conntrack flush request could not be sent");
      const n = Number(await onPool<number>(l.c.recv, fd, answer, answer.length, 0));
      const err = ackError(answer, n);
      if (err !== 0) throw new Error(`the kernel refused a conntrack flush by mark: ${err === null ? "no ack" : `errno ${-err}`}`);
    }
    const after = conntrackCount(ns);
    runs.inc({ op: "flush-by-mark", result: "ok" });
    return before !== null && after !== null ? Math.max(0, before - after) : 0;
  } catch {
    runs.inc({ op: "flush-by-mark", result: "error" });
    return null;
  } finally {
    if (h) closeLater(l, h);
    runSeconds.observe({ op: "flush-by-mark" }, Number(process.hrtime.bigint() - t0) / 1e9);
  }
}

/**
 * How many entries the named namespace's conntrack table holds (its own
 * nf_conntrack_count, read with this thread in the namespace), or null when
 * that cannot be done in-process.
 */
export function conntrackCount(ns: string): number | null {
  const l = load();
  if (!l) return null;
  try {
    const n = Number(inNamedNetns(l.c, ns, () => readFileSync("/proc/sys/net/netfilter/nf_conntrack_count", "utf8")).trim());
    return Number.isInteger(n) && n >= 0 ? n : null;
  } catch {
    return null;
  }
}
