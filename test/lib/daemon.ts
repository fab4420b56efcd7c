// Starts a real `microvpcd <service>` process, as an operator would, and
// waits until it answers health checks. Ended by PID only.
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { grpcClient } from "../../services/common/client.js";
import { Health, HealthCheckResponse_ServingStatus } from "../../gen/grpc/health/v1/health_pb.js";
import { freePort } from "./redis.js";

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..");

/** Runs one `microvpcd <command> …` to its end (a one-shot command, not a daemon): its exit code and its output, stdout then stderr. */
export function runMicrovpcd(args: string[], timeoutMs = 120_000): Promise<{ code: number; out: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [join(ROOT, "bin", "microvpcd.js"), ...args], { timeout: timeoutMs }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === "number" ? (err as { code: number }).code : -1) : 0;
      resolve({ code, out: `${stdout}${stderr}` });
    });
  });
}

export interface Daemon {
  address: string;
  port: number;
  metricsPort: number;
  proc: ChildProcess;
  output(): string;
  stop(signal?: NodeJS.Signals): Promise<void>;
}

export interface DaemonOptions {
  /** Arguments for node itself, before the script (e.g. --cpu-prof). */
  nodeArgs?: string[];
  /** How long stop() waits after its signal before SIGKILL (default 5 s). */
  stopGraceMs?: number;
  /** The entry script to run instead of bin/microvpcd.js (another build's microvpcd.js). */
  script?: string;
}

class PortTaken extends Error {}

/**
 * The node flags on an entry script's `#!/usr/bin/env -S node …` line
 * (bin/microvpcd.js: the young generation's size), so that a daemon started
 * here as `node <script>` runs as the image, systemd and k8s run it.
 */
export function shebangNodeFlags(script: string): string[] {
  const first = readFileSync(script, "utf8").split("\n", 1)[0];
  const m = /^#!\S*env -S node((?: --?[\w-]+(?:=\S+)?)*)\s*$/.exec(first);
  return m ? m[1].split(" ").filter(Boolean) : [];
}

/** How long a daemon may take to answer SERVING. */
const START_DEADLINE_MS = 60_000;

export async function startDaemon(
  service: string,
  extra: string[] = [],
  env: Record<string, string> = {},
  netns?: string,
  o: DaemonOptions = {},
): Promise<Daemon> {
  // Another process on this shared machine may bind a port between freePort()
  // and the daemon's own bind. Only that case (one of the two ports we chose)
  // is retried with new ports; any other exit is the test's failure.
  for (let attempt = 1; ; attempt++) {
    try {
      return await startDaemonOnce(service, extra, env, netns, o);
    } catch (e) {
      if (!(e instanceof PortTaken) || attempt >= 3) throw e;
    }
  }
}

async function startDaemonOnce(service: string, extra: string[], env: Record<string, string>, netns: string | undefined, o: DaemonOptions): Promise<Daemon> {
  const port = await freePort();
  const metricsPort = await freePort();
  const script = o.script ?? join(ROOT, "bin", "microvpcd.js");
  const args = [
    ...shebangNodeFlags(script),
    ...(o.nodeArgs ?? []),
    script,
    service,
    "--listen",
    `127.0.0.1:${port}`,
    "--metrics-listen",
    `127.0.0.1:${metricsPort}`,
    "--log-level",
    "warn",
    ...extra,
  ];
  const cmd = netns ? "ip" : process.execPath;
  const argv = netns ? ["netns", "exec", netns, process.execPath, ...args] : args;
  const proc = spawn(cmd, argv, { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  proc.stdout!.on("data", (d) => (out += d));
  proc.stderr!.on("data", (d) => (out += d));
  const address = `127.0.0.1:${port}`;
  const health = grpcClient(Health, { address, timeoutMs: 1000 });
  // 60 s, not 20: on a loaded machine a netagent's first pass can run before
  // its Redis connection is up ("Stream isn't writeable"), and it is ready
  // only after the next pass, --reconcile-interval-ms (10 s) later. A healthy
  // start still returns as soon as the check says SERVING.
  const deadline = Date.now() + START_DEADLINE_MS;
  for (;;) {
    if (proc.exitCode !== null) {
      const taken = new RegExp(`EADDRINUSE[^\\n]*127\\.0\\.0\\.1:(${port}|${metricsPort})\\b`).test(out);
      throw new (taken ? PortTaken : Error)(`microvpcd ${service} exited with ${proc.exitCode}:\n${out}`);
    }
    try {
      const r = await health.check({});
      if (r.status === HealthCheckResponse_ServingStatus.SERVING) break;
    } catch {
      // not up yet
    }
    if (Date.now() > deadline) {
      proc.kill("SIGKILL");
      throw new Error(`microvpcd ${service} not healthy after ${START_DEADLINE_MS / 1000} s:\n${out}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    address,
    port,
    metricsPort,
    proc,
    output: () => out,
    async stop(signal: NodeJS.Signals = "SIGTERM") {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      const exited = new Promise((res) => proc.once("exit", res));
      proc.kill(signal);
      const t = setTimeout(() => proc.kill("SIGKILL"), o.stopGraceMs ?? 5000);
      await exited;
      clearTimeout(t);
    },
  };
}
