// Links, addresses and routes in-process: libnl-route (the netlink library
// NetworkManager and iw build on, Debian `libnl-route-3-200`) called
// through koffi, as common/nft/libnftables.ts calls libnftables. On these
// machines an `ip` exec costs 8–15 ms before it does anything (a bare
// fork+exec is ~5 ms) and a NIC's attach was one `ip -batch` with a nested
// `ip netns exec` fork for the VM's side: ~36 ms of a CreateVm's ~64 ms.
// The same netlink requests from this process take well under a millisecond.
//
// A netlink socket belongs to the network namespace of the thread that
// opened it. Each operation opens its sockets inside the namespace it works
// on (ns-syscalls.ts inNamedNetns/inNetnsAt: a synchronous switch of the
// main thread and back), sends its requests there and closes them before
// the thread moves back.
//
// Only what the netagent needs is here: a veth NIC's attach (attachVeth)
// and deleting devices (deleteLinks: DetachNic, TAPs and their ifbs too).
// Both answer false when they did not do it: the library not loaded, or a
// refusal (counted in microvpc_rtnl_runs_total{result="error"}; a failed
// attach first deletes the device it made). The caller then runs the same
// change as `ip -batch`, whose error text (the one operators know, and the one the
// netagent maps to gRPC codes) is the answer. A failure to load the
// library, or MICROVPC_RTNL_EXEC=1, leaves the exec path as it was.
import { closeSync } from "node:fs";
import { Counter, Histogram } from "prom-client";
import { metricsRegistry } from "./metrics.js";
import { inNamedNetns, inNetnsAt, InProcessLibrary, openNetnsFile, type Libc } from "./ns-syscalls.js";

const NETLINK_ROUTE = 0;
const AF_INET = 2;
const AF_LLC = 26;
const IFF_UP = 1;
const NLM_F_REPLACE = 0x100;
const NLM_F_EXCL = 0x200;
const NLM_F_CREATE = 0x400;
const RTPROT_BOOT = 3;
/** libnl's "object not found" and "no such device": a device already gone. */
const NLE_OBJ_NOTFOUND = 12;
const NLE_NODEV = 31;

const runs = new Counter({
  name: "microvpc_rtnl_runs_total",
  help: "Link changes made in-process through libnl-route (not counted in microvpc_exec_total), by operation and result; an error falls back to an `ip -batch` exec.",
  labelNames: ["op", "result"] as const,
  registers: [metricsRegistry],
});
const runSeconds = new Histogram({
  name: "microvpc_rtnl_run_seconds",
  help: "Time of one in-process libnl-route operation, namespace switches included (the event loop waits for it).",
  labelNames: ["op"] as const,
  buckets: [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05],
  registers: [metricsRegistry],
});

/** A netlink request libnl or the kernel refused: which step, and libnl's text for the error. */
export class RtnlError extends Error {
  override name = "RtnlError";
  constructor(
    readonly step: string,
    readonly code: number,
    text: string,
  ) {
    super(`${step}: ${text} (libnl error ${code})`);
  }
}

type Fn = (...args: unknown[]) => unknown;
type Ptr = unknown;

interface Lib {
  c: Libc;
  geterror: Fn;
  sockAlloc: Fn;
  sockFree: Fn;
  connect: Fn;
  addrParse: Fn;
  addrPut: Fn;
  linkAlloc: Fn;
  vethAlloc: Fn;
  vethPeer: Fn;
  linkPut: Fn;
  linkSetName: Fn;
  linkSetMtu: Fn;
  linkSetAddr: Fn;
  linkSetNsFd: Fn;
  linkSetIfalias: Fn;
  linkSetMaster: Fn;
  linkSetFlags: Fn;
  linkUnsetFlags: Fn;
  linkAdd: Fn;
  linkChange: Fn;
  linkDelete: Fn;
  linkGetKernel: Fn;
  linkIfindex: Fn;
  rAddrAlloc: Fn;
  rAddrPut: Fn;
  rAddrSetFamily: Fn;
  rAddrSetIfindex: Fn;
  rAddrSetLocal: Fn;
  rAddrAdd: Fn;
  routeAlloc: Fn;
  routePut: Fn;
  routeSetFamily: Fn;
  routeSetDst: Fn;
  routeSetProtocol: Fn;
  nhAlloc: Fn;
  nhSetIfindex: Fn;
  nhSetGateway: Fn;
  routeAddNexthop: Fn;
  routeAdd: Fn;
}

const library = new InProcessLibrary<Lib>("MICROVPC_RTNL_EXEC", (c) => {
  const k = c.koffi;
  const nl = k.load("libnl-3.so.200");
  const r = k.load("libnl-route-3.so.200");
  return {
    c,
    geterror: nl.func("const char *nl_geterror(int error)") as Fn,
    sockAlloc: nl.func("void *nl_socket_alloc(void)") as Fn,
    sockFree: nl.func("void nl_socket_free(void *sk)") as Fn,
    connect: nl.func("int nl_connect(void *sk, int protocol)") as Fn,
    addrParse: nl.func("int nl_addr_parse(const char *addr, int hint, _Out_ void **result)") as Fn,
    addrPut: nl.func("void nl_addr_put(void *addr)") as Fn,
    linkAlloc: r.func("void *rtnl_link_alloc(void)") as Fn,
    vethAlloc: r.func("void *rtnl_link_veth_alloc(void)") as Fn,
    vethPeer: r.func("void *rtnl_link_veth_get_peer(void *link)") as Fn,
    linkPut: r.func("void rtnl_link_put(void *link)") as Fn,
    linkSetName: r.func("void rtnl_link_set_name(void *link, const char *name)") as Fn,
    linkSetMtu: r.func("void rtnl_link_set_mtu(void *link, unsigned int mtu)") as Fn,
    linkSetAddr: r.func("void rtnl_link_set_addr(void *link, void *addr)") as Fn,
    linkSetNsFd: r.func("void rtnl_link_set_ns_fd(void *link, int fd)") as Fn,
    linkSetIfalias: r.func("void rtnl_link_set_ifalias(void *link, const char *alias)") as Fn,
    linkSetMaster: r.func("void rtnl_link_set_master(void *link, int ifindex)") as Fn,
    linkSetFlags: r.func("void rtnl_link_set_flags(void *link, unsigned int flags)") as Fn,
    linkUnsetFlags: r.func("void rtnl_link_unset_flags(void *link, unsigned int flags)") as Fn,
    linkAdd: r.func("int rtnl_link_add(void *sk, void *link, int flags)") as Fn,
    linkChange: r.func("int rtnl_link_change(void *sk, void *orig, void *changes, int flags)") as Fn,
    linkDelete: r.func("int rtnl_link_delete(void *sk, void *link)") as Fn,
    linkGetKernel: r.func("int rtnl_link_get_kernel(void *sk, int ifindex, const char *name, _Out_ void **result)") as Fn,
    linkIfindex: r.func("int rtnl_link_get_ifindex(void *link)") as Fn,
    rAddrAlloc: r.func("void *rtnl_addr_alloc(void)") as Fn,
    rAddrPut: r.func("void rtnl_addr_put(void *addr)") as Fn,
    rAddrSetFamily: r.func("void rtnl_addr_set_family(void *addr, int family)") as Fn,
    rAddrSetIfindex: r.func("void rtnl_addr_set_ifindex(void *addr, int ifindex)") as Fn,
    rAddrSetLocal: r.func("int rtnl_addr_set_local(void *addr, void *local)") as Fn,
    rAddrAdd: r.func("int rtnl_addr_add(void *sk, void *addr, int flags)") as Fn,
    routeAlloc: r.func("void *rtnl_route_alloc(void)") as Fn,
    routePut: r.func("void rtnl_route_put(void *route)") as Fn,
    routeSetFamily: r.func("int rtnl_route_set_family(void *route, uint8_t family)") as Fn,
    routeSetDst: r.func("int rtnl_route_set_dst(void *route, void *addr)") as Fn,
    routeSetProtocol: r.func("void rtnl_route_set_protocol(void *route, uint8_t protocol)") as Fn,
    nhAlloc: r.func("void *rtnl_route_nh_alloc(void)") as Fn,
    nhSetIfindex: r.func("void rtnl_route_nh_set_ifindex(void *nh, int ifindex)") as Fn,
    nhSetGateway: r.func("void rtnl_route_nh_set_gateway(void *nh, void *addr)") as Fn,
    routeAddNexthop: r.func("void rtnl_route_add_nexthop(void *route, void *nh)") as Fn,
    routeAdd: r.func("int rtnl_route_add(void *sk, void *route, int flags)") as Fn,
  };
});
const load = () => library.get();

/** How link changes run, for a daemon's start-up line. */
export function rtnlStartInfo(): Record<string, unknown> {
  return { rtnl: library.mode() };
}

/** The libnl objects one operation allocates, freed together at its end. */
class Scope {
  private readonly frees: (() => void)[] = [];
  constructor(readonly l: Lib) {}

  own<T extends Ptr>(p: T | null, free: Fn, what: string): T {
    if (!p) throw new RtnlError(what, 0, "out of memory");
    this.frees.push(() => free(p));
    return p;
  }

  check(step: string, rc: unknown): void {
    const n = rc as number;
    if (n < 0) throw new RtnlError(step, -n, String(this.l.geterror(n)));
  }

  socket(): Ptr {
    const sk = this.own(this.l.sockAlloc(), this.l.sockFree, "nl_socket_alloc");
    this.check("nl_connect", this.l.connect(sk, NETLINK_ROUTE));
    return sk;
  }

  addr(text: string, family: number): Ptr {
    const out: Ptr[] = [null];
    this.check(`parse ${text}`, this.l.addrParse(text, family, out));
    return this.own(out[0], this.l.addrPut, `parse ${text}`);
  }

  ifindex(sk: Ptr, name: string): number {
    const out: Ptr[] = [null];
    this.check(`find ${name}`, this.l.linkGetKernel(sk, 0, name, out));
    const link = this.own(out[0], this.l.linkPut, `find ${name}`);
    return this.l.linkIfindex(link) as number;
  }

  /** RTM_NEWLINK on an existing device, found by name: flags and alias. */
  changeLink(sk: Ptr, name: string, set: { up?: boolean; alias?: string }): void {
    const orig = this.own(this.l.linkAlloc(), this.l.linkPut, "rtnl_link_alloc");
    const ch = this.own(this.l.linkAlloc(), this.l.linkPut, "rtnl_link_alloc");
    this.l.linkSetName(ch, name);
    if (set.up) this.l.linkSetFlags(ch, IFF_UP);
    if (set.alias !== undefined) this.l.linkSetIfalias(ch, set.alias);
    this.check(`link set dev ${name}${set.up ? " up" : ""}${set.alias !== undefined ? " alias" : ""}`, this.l.linkChange(sk, orig, ch, 0));
  }

  close(): void {
    for (const f of this.frees.splice(0).reverse()) f();
  }
}

/** fn's answer, or false when it throws: counted either way, and the caller runs the exec instead. */
function counted(op: string, fn: () => boolean): boolean {
  const t0 = process.hrtime.bigint();
  try {
    const r = fn();
    runs.inc({ op, result: "ok" });
    return r;
  } catch {
    runs.inc({ op, result: "error" });
    return false;
  } finally {
    runSeconds.observe({ op }, Number(process.hrtime.bigint() - t0) / 1e9);
  }
}

/** A veth NIC as AttachNic makes it: the host end on the subnet's bridge, the VM end configured in the VM's namespace. */
export interface VethAttach {
  /** The VPC namespace the host end lives in ("" = ours). */
  ns: string;
  hostIf: string;
  mtu: number;
  alias: string;
  bridge: string;
  /** The VM's namespace file: /run/netns/NAME or /proc/PID/ns/net. */
  netnsPath: string;
  guestIf: string;
  mac: string;
  /** "a.b.c.d/len" */
  address: string;
  /** The default route's gateway; none when the VM gets no default route. */
  gateway?: string;
  /** False: the host end is made down (on its bridge, carrying nothing) and set up later (upLink). */
  up?: boolean;
}

/**
 * `ip link add HOST mtu M type veth peer name GUEST address MAC mtu M netns
 * VM; link set dev HOST alias A; link set dev HOST mtu M master BR up` in
 * the VPC namespace, then `addr replace ADDRESS dev GUEST; link set dev
 * GUEST up; link set dev lo up; route replace default via GW dev GUEST` in
 * the VM's. Returns false when libnl-route is not loaded (the caller
 * execs), or when a request failed, after removing the veth it made, if it made it.
 */
export function attachVeth(a: VethAttach): boolean {
  const l = load();
  if (!l) return false;
  return counted("attach-veth", () => {
    const peerNs = openNetnsFile(a.netnsPath);
    let made = false;
    try {
      session(
        l,
        (f) => inNamedNetns(l.c, a.ns, f),
        (s, sk) => {
          const master = s.ifindex(sk, a.bridge);
          const link = s.own(l.vethAlloc(), l.linkPut, "rtnl_link_veth_alloc");
          l.linkSetName(link, a.hostIf);
          l.linkSetMtu(link, a.mtu);
          l.linkSetMaster(link, master);
          if (a.up !== false) l.linkSetFlags(link, IFF_UP);
          const peer = s.own(l.vethPeer(link), l.linkPut, "rtnl_link_veth_get_peer");
          l.linkSetName(peer, a.guestIf);
          l.linkSetMtu(peer, a.mtu);
          l.linkSetAddr(peer, s.addr(a.mac, AF_LLC));
          l.linkSetNsFd(peer, peerNs);
          s.check(`link add ${a.hostIf} type veth peer name ${a.guestIf}`, l.linkAdd(sk, link, NLM_F_CREATE | NLM_F_EXCL));
          made = true;
          s.changeLink(sk, a.hostIf, { alias: a.alias });
        },
      );
      session(
        l,
        (f) => inNetnsAt(l.c, a.netnsPath, f),
        (s, sk) => {
          const idx = s.ifindex(sk, a.guestIf);
          const addr = s.own(l.rAddrAlloc(), l.rAddrPut, "rtnl_addr_alloc");
          l.rAddrSetFamily(addr, AF_INET);
          l.rAddrSetIfindex(addr, idx);
          s.check(`addr ${a.address}`, l.rAddrSetLocal(addr, s.addr(a.address, AF_INET)));
          s.check(`addr replace ${a.address} dev ${a.guestIf}`, l.rAddrAdd(sk, addr, NLM_F_REPLACE));
          s.changeLink(sk, a.guestIf, { up: true });
          s.changeLink(sk, "lo", { up: true });
          if (a.gateway !== undefined) {
            const route = s.own(l.routeAlloc(), l.routePut, "rtnl_route_alloc");
            s.check("route family", l.routeSetFamily(route, AF_INET));
            s.check("route dst", l.routeSetDst(route, s.addr("default", AF_INET)));
            l.routeSetProtocol(route, RTPROT_BOOT);
            // The route owns its nexthop once added (freed with it).
            const nh = l.nhAlloc();
            if (!nh) throw new RtnlError("rtnl_route_nh_alloc", 0, "out of memory");
            l.nhSetIfindex(nh, idx);
            l.nhSetGateway(nh, s.addr(a.gateway, AF_INET));
            l.routeAddNexthop(route, nh);
            s.check(`route replace default via ${a.gateway} dev ${a.guestIf}`, l.routeAdd(sk, route, NLM_F_REPLACE));
          }
        },
      );
    } catch (err) {
      if (made) attempt(() => removeLinks(l, a.ns, [a.hostIf]));
      throw err;
    } finally {
      closeSync(peerNs);
    }
    return true;
  });
}

/**
 * `ip -force -batch` of `link del dev NAME` lines in the named namespace
 * ("" = ours), in-process: a device already gone is fine. The socket is
 * opened in the namespace on this thread; the deletes run on a pool thread
 * (koffi's async calls), because the kernel answers a veth's delete only
 * after an RCU grace period: 15–40 ms measured here, which would hold the
 * event loop. Resolves false when libnl-route is not loaded or refused any
 * other way (after trying every device): the caller execs.
 */
export function deleteLinks(ns: string, names: string[]): Promise<boolean> {
  return eachDevice("detach", ns, names, `link del dev`, (l, s, sk, name) => {
    const link = s.own(l.linkAlloc(), l.linkPut, "rtnl_link_alloc");
    l.linkSetName(link, name);
    return onPool<number>(l.linkDelete, sk, link);
  });
}

/**
 * Sets devices down, in-process (`ip link set dev X down`): a down device
 * neither sends nor receives, on its bridge or to its peer. A device that is
 * not there counts as done. Fast (no RCU grace period: the kernel's
 * synchronize_net under RTNL is the expedited one), but on the pool all the
 * same. Resolves false when libnl-route is not loaded or refused: the
 * caller then deletes the devices and waits for it.
 */
export function downLinks(ns: string, names: string[]): Promise<boolean> {
  return setUp(ns, names, false);
}

/**
 * Sets a device up, in-process (`ip link set dev X up`): a NIC made with its
 * host end down (attachVeth's `up: false`) joins its bridge. Resolves false
 * when libnl-route is not loaded or refused, or the device is not there: the
 * caller then execs the same.
 */
export function upLink(ns: string, name: string): Promise<boolean> {
  return setUp(ns, [name], true);
}

function setUp(ns: string, names: string[], up: boolean): Promise<boolean> {
  const op = up ? "up" : "down";
  return eachDevice(
    op,
    ns,
    names,
    `link set ${op} dev`,
    (l, s, sk, name) => {
      const orig = s.own(l.linkAlloc(), l.linkPut, "rtnl_link_alloc");
      const ch = s.own(l.linkAlloc(), l.linkPut, "rtnl_link_alloc");
      l.linkSetName(ch, name);
      if (up) l.linkSetFlags(ch, IFF_UP);
      else l.linkUnsetFlags(ch, IFF_UP);
      return onPool<number>(l.linkChange, sk, orig, ch, 0);
    },
    // Down: a device that is gone is as good; up: it is not.
    !up,
  );
}

/**
 * One netlink request per device of a namespace (made by `request`, awaited
 * on the pool), counted in microvpc_rtnl_runs_total{op}. A device that is
 * not there counts as done (unless `missingOk` is false); every device is
 * tried. False when the library is not loaded or refused one of them.
 */
async function eachDevice(
  op: string,
  ns: string,
  names: string[],
  what: string,
  request: (l: Lib, s: Scope, sk: Ptr, name: string) => Promise<number>,
  missingOk = true,
): Promise<boolean> {
  const l = load();
  if (!l) return false;
  const t0 = process.hrtime.bigint();
  const s = new Scope(l);
  try {
    const sk = inNamedNetns(l.c, ns, () => s.socket());
    let first: RtnlError | undefined;
    for (const name of names) {
      const rc = await request(l, s, sk, name);
      if (rc < 0 && !(missingOk && (-rc === NLE_OBJ_NOTFOUND || -rc === NLE_NODEV))) first ??= new RtnlError(`${what} ${name}`, -rc, String(l.geterror(rc)));
    }
    if (first) throw first;
    runs.inc({ op, result: "ok" });
    return true;
  } catch {
    runs.inc({ op, result: "error" });
    return false;
  } finally {
    s.close();
    runSeconds.observe({ op }, Number(process.hrtime.bigint() - t0) / 1e9);
  }
}

/** A koffi function called on libuv's pool (its `async` member): the event loop runs meanwhile. */
export function onPool<T>(fn: Fn, ...args: unknown[]): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    (fn as unknown as { async: (...a: unknown[]) => void }).async(...args, (err: Error | null, res: T) => (err ? reject(err) : resolve(res)));
  });
}

/** Undoes a failed attach (synchronously: a rare path, and the exec after it needs the name free). */
function removeLinks(l: Lib, ns: string, names: string[]): void {
  let first: RtnlError | undefined;
  session(
    l,
    (f) => inNamedNetns(l.c, ns, f),
    (s, sk) => {
      for (const name of names) {
        const link = s.own(l.linkAlloc(), l.linkPut, "rtnl_link_alloc");
        l.linkSetName(link, name);
        const rc = l.linkDelete(sk, link) as number;
        if (rc < 0 && -rc !== NLE_OBJ_NOTFOUND && -rc !== NLE_NODEV) first ??= new RtnlError(`link del dev ${name}`, -rc, String(l.geterror(rc)));
      }
    },
  );
  if (first) throw first;
}

function attempt(fn: () => void): void {
  try {
    fn();
  } catch {
    // undoing a failed attach: the exec that follows reports what is wrong
  }
}

/**
 * Runs fn with a route socket opened in the namespace `enter` puts this
 * thread in (the socket stays bound to it), and frees what fn allocated
 * before the thread moves back.
 */
function session<T>(l: Lib, enter: (fn: () => T) => T, fn: (s: Scope, sk: Ptr) => T): T {
  return enter(() => {
    const s = new Scope(l);
    try {
      return fn(s, s.socket());
    } finally {
      s.close();
    }
  });
}
