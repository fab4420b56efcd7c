// The vmm's one adapter to the kernel for kind=netns VMs: the VM's own
// network namespace (made before its NIC, removed after it) and the probes
// TestConnectivity runs inside it. The namespace is made and removed
// in-process (common/ns-syscalls.ts: what `ip netns add|del` does, without a
// ~15–20 ms exec on every CreateVm and DeleteVm), unless libc cannot be
// loaded through koffi or MICROVPC_NETNS_EXEC=1 is set: then, like every
// probe, through common/exec.ts run() (argv arrays, LC_ALL=C, timeouts,
// microvpc_exec_* metrics). The service takes this as an interface, so the
// saga tests run without root.
import { run } from "../common/exec.js";
import { NetnsError, libcLoadError, loadLibc, namedNetnsAdd, namedNetnsDel } from "../common/ns-syscalls.js";

const inProcess = process.env.MICROVPC_NETNS_EXEC !== "1";

/** For the vmm's "serving" log line: how VM namespaces are made. */
export function netnsStartInfo(): Record<string, unknown> {
  if (!inProcess) return { netns: "exec (MICROVPC_NETNS_EXEC=1)" };
  return { netns: loadLibc() ? "in-process" : `exec (${libcLoadError()})` };
}

export type ProbeResult = "connected" | "refused" | "timeout" | "unreachable";

export interface NetnsAdapter {
  /** Creates the named namespace; one that exists already is fine. */
  add(name: string): Promise<void>;
  /** Removes the named namespace; one that is gone already is fine. */
  del(name: string): Promise<void>;
  /** One ICMP echo from inside ns to target; true if answered within timeoutMs. */
  ping(ns: string, target: string, timeoutMs: number): Promise<boolean>;
  /** One TCP connect from inside ns to target:port within timeoutMs. */
  tcpProbe(ns: string, target: string, port: number, timeoutMs: number): Promise<ProbeResult>;
  /**
   * One UDP datagram from inside ns to target:port: "connected" if a datagram
   * came back within timeoutMs, "refused" on ICMP port unreachable,
   * "unreachable" on host/network unreachable, else "timeout" (dropped, or a
   * service that does not answer: UDP cannot tell them apart).
   */
  udpProbe(ns: string, target: string, port: number, timeoutMs: number): Promise<ProbeResult>;
}

// Run by this node binary inside the namespace: the daemon's own sockets live
// in the root namespace, so the connect has to come from a child there.
const TCP_PROBE = `const s=require("net").connect({host:process.argv[1],port:+process.argv[2]});const t=setTimeout(()=>{process.stdout.write("timeout");process.exit(0)},+process.argv[3]);
s.on("connect",()=>{process.stdout.write("connected");process.exit(0)});s.on("error",(e)=>{process.stdout.write(e.code==="ECONNREFUSED"?"refused":"unreachable");process.exit(0)})`;

// The same for UDP: a connected socket, so that an ICMP port unreachable comes back as ECONNREFUSED.
const UDP_PROBE = `const d=require("dgram").createSocket("udp4");const t=setTimeout(()=>{process.stdout.write("timeout");process.exit(0)},+process.argv[3]);
d.on("message",()=>{process.stdout.write("connected");process.exit(0)});d.on("error",(e)=>{process.stdout.write(e.code==="ECONNREFUSED"?"refused":"unreachable");process.exit(0)});
d.connect(+process.argv[2],process.argv[1],(err)=>{if(err){d.emit("error",err);return}d.send(Buffer.from("microvpc connectivity probe\\n"),(e)=>{if(e)d.emit("error",e)})})`;

/** Runs a probe script (TCP_PROBE, UDP_PROBE) with this node binary inside ns: its one-word answer. */
async function probe(script: string, ns: string, target: string, port: number, timeoutMs: number): Promise<ProbeResult> {
  const { stdout } = await run(process.execPath, ["-e", script, target, String(port), String(timeoutMs)], {
    netns: ns,
    timeoutMs: timeoutMs + 3000,
    check: false,
  });
  for (const r of ["connected", "refused", "timeout"] as const) if (stdout.includes(r)) return r;
  return "unreachable";
}

export const kernelNetns: NetnsAdapter = {
  async add(name) {
    try {
      if (inProcess && namedNetnsAdd(name)) return;
    } catch (err) {
      if (err instanceof NetnsError && err.code === "exists") return;
      throw err;
    }
    const r = await run("ip", ["netns", "add", name], { timeoutMs: 10_000, check: false });
    if (r.error && !/File exists/.test(r.stderr)) throw r.error;
  },

  async del(name) {
    if (inProcess && namedNetnsDel(name)) return;
    const r = await run("ip", ["netns", "del", name], { timeoutMs: 10_000, check: false });
    if (r.error && !/No such file/.test(r.stderr)) throw r.error;
  },

  async ping(ns, target, timeoutMs) {
    // -W in seconds, fractions allowed (iputils 20190709 and later): a 300 ms probe waits 300 ms, not 1 s.
    const r = await run("ping", ["-c", "1", "-W", (timeoutMs / 1000).toFixed(3), target], { netns: ns, timeoutMs: timeoutMs + 3000, check: false });
    return / 1 received/.test(r.stdout);
  },

  tcpProbe: (ns, target, port, timeoutMs) => probe(TCP_PROBE, ns, target, port, timeoutMs),
  udpProbe: (ns, target, port, timeoutMs) => probe(UDP_PROBE, ns, target, port, timeoutMs),
};
