// A `microvpcd <service>` started like test/lib/daemon.ts's startDaemon, but
// under `node --cpu-prof` (which NODE_OPTIONS does not allow): the profile is
// written to dir when the daemon exits (its SIGTERM handler calls
// process.exit). Summarise it with ./profile.ts. Ended by PID only; the
// caller tracks the process (trackChild) like any other daemon.
import { spawn } from "node:child_process";
import { join } from "node:path";
import { Health, HealthCheckResponse_ServingStatus } from "../../gen/grpc/health/v1/health_pb.js";
import { grpcClient } from "../../services/common/client.js";
import { ROOT, type Daemon } from "../../test/lib/daemon.js";
import { freePort } from "../../test/lib/redis.js";

export async function startProfiledDaemon(service: string, extra: string[], dir: string): Promise<Daemon> {
  const port = await freePort();
  const metricsPort = await freePort();
  const args = [
    "--cpu-prof",
    `--cpu-prof-dir=${dir}`,
    join(ROOT, "bin", "microvpcd.js"),
    service,
    "--listen",
    `127.0.0.1:${port}`,
    "--metrics-listen",
    `127.0.0.1:${metricsPort}`,
    "--log-level",
    "warn",
    ...extra,
  ];
  const proc = spawn(process.execPath, args, { env: process.env, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  proc.stdout!.on("data", (d) => (out += d));
  proc.stderr!.on("data", (d) => (out += d));
  const address = `127.0.0.1:${port}`;
  const health = grpcClient(Health, { address, timeoutMs: 1000 });
  const deadline = Date.now() + 20_000;
  for (let i = 0; i < 400; i++) {
    if (proc.exitCode !== null) throw new Error(`microvpcd ${service} (profiled) exited with ${proc.exitCode}:\n${out}`);
    try {
      if ((await health.check({})).status === HealthCheckResponse_ServingStatus.SERVING) break;
    } catch {
      // not up yet
    }
    if (Date.now() > deadline) {
      proc.kill("SIGKILL");
      throw new Error(`microvpcd ${service} (profiled) not healthy after 20 s:\n${out}`);
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
      // Writing a long profile takes a moment: more grace than startDaemon's 5 s.
      const t = setTimeout(() => proc.kill("SIGKILL"), 15_000);
      await exited;
      clearTimeout(t);
    },
  };
}
