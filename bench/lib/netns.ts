// Network-namespace helpers the benchmarks need beyond test/lib/netns.ts
// (which they reuse for the run prefix, cleanup, namespaces and probes).
//
// iperf3WithCpu: like test/lib/netns.ts's iperf3(), but also returns the CPU
// iperf3 reports for each end, so that a path's cost per byte can be compared
// even when a neighbour on a shared machine takes the cores (throughput then
// drops, CPU per byte much less). Same rules: argument arrays only, the server
// is a one-off (`-s -1`) tracked by PID and ended afterwards, every wait bounded.
import { spawn, type ChildProcess } from "node:child_process";
import { listening, nsExec, sleep, trackChild } from "../../test/lib/netns.js";

export interface IperfCpuResult {
  /** Throughput the receiver saw, Gbit/s. */
  gbps: number;
  retransmits: number;
  /** Bytes the receiver got, and over how many seconds. */
  bytes: number;
  seconds: number;
  /** CPU of each iperf3 process over the test, % of one CPU (iperf3's own cpu_utilization_percent; includes softirq work done in its context). */
  senderCpuPct: number;
  receiverCpuPct: number;
  /** (sender + receiver) CPU ms per GB moved. */
  cpuMsPerGB: number;
}

function alive(c: ChildProcess): boolean {
  return c.exitCode === null && c.signalCode === null;
}

async function stop(c: ChildProcess, ms: number): Promise<void> {
  if (!alive(c)) return;
  const exited = new Promise((r) => c.once("exit", r));
  c.kill("SIGTERM");
  const t = setTimeout(() => alive(c) && c.kill("SIGKILL"), ms);
  await exited;
  clearTimeout(t);
}

/** One iperf3 TCP stream from clientNs to serverAddr (a one-off server in serverNs). */
export async function iperf3WithCpu(clientNs: string, serverNs: string, serverAddr: string, o: { seconds: number; port?: number }): Promise<IperfCpuResult> {
  const seconds = Math.min(30, Math.max(1, Math.round(o.seconds)));
  const port = o.port ?? 5201;
  const server = trackChild(
    spawn("ip", ["netns", "exec", serverNs, "iperf3", "-s", "-1", "-p", String(port)], { env: { ...process.env, LC_ALL: "C" }, stdio: "ignore" }),
  );
  try {
    const deadline = Date.now() + 5000;
    let up = false;
    for (let i = 0; i < 200 && Date.now() < deadline; i++) {
      if (!alive(server)) throw new Error(`iperf3 server in ${serverNs} exited (${server.exitCode ?? server.signalCode})`);
      if (await listening(serverNs, port)) {
        up = true;
        break;
      }
      await sleep(25);
    }
    if (!up) throw new Error(`iperf3 server in ${serverNs} not listening on ${port} after 5 s`);
    const r = await nsExec(clientNs, "iperf3", ["-c", serverAddr, "-p", String(port), "-t", String(seconds), "-J", "--connect-timeout", "2000"], {
      check: false,
      timeoutMs: (seconds + 15) * 1000,
    });
    type J = {
      error?: string;
      end?: {
        sum_received?: { bits_per_second: number; bytes: number; seconds: number };
        sum_sent?: { retransmits?: number };
        cpu_utilization_percent?: { host_total: number; remote_total: number };
      };
    };
    let j: J;
    try {
      j = JSON.parse(r.stdout) as J;
    } catch {
      throw new Error(`iperf3 ${clientNs} → ${serverAddr}: no JSON (exit ${r.code}): ${r.stderr.trim() || r.stdout.slice(0, 300)}`);
    }
    const e = j.end;
    if (j.error || !e?.sum_received) throw new Error(`iperf3 ${clientNs} → ${serverAddr}: ${j.error ?? "no result"}`);
    const cpu = e.cpu_utilization_percent ?? { host_total: Number.NaN, remote_total: Number.NaN };
    const secs = e.sum_received.seconds;
    const cpuMs = ((cpu.host_total + cpu.remote_total) / 100) * secs * 1000;
    return {
      gbps: e.sum_received.bits_per_second / 1e9,
      retransmits: e.sum_sent?.retransmits ?? 0,
      bytes: e.sum_received.bytes,
      seconds: secs,
      senderCpuPct: cpu.host_total,
      receiverCpuPct: cpu.remote_total,
      cpuMsPerGB: cpuMs / (e.sum_received.bytes / 1e9),
    };
  } finally {
    await stop(server, 2000);
  }
}
