// Prometheus metrics, one registry per process. Every RPC is counted and
// timed by the interceptor in server.ts; services add their own counters to
// the same registry.
import { createServer, type Server } from "node:http";
import { collectDefaultMetrics, Counter, Histogram, Registry } from "prom-client";

export const metricsRegistry = new Registry();
// The process and Node.js metrics under their standard names
// (process_cpu_user_seconds_total, nodejs_heap_size_used_bytes, …), which
// stock Node dashboards and alerts expect; a prefix made them
// microvpc_process_process_… and matched nothing.
collectDefaultMetrics({ register: metricsRegistry });

export const rpcRequests = new Counter({
  name: "microvpc_rpc_requests_total",
  help: "gRPC requests handled, by service, method and status code.",
  labelNames: ["service", "method", "code"] as const,
  registers: [metricsRegistry],
});

export const rpcDuration = new Histogram({
  name: "microvpc_rpc_duration_seconds",
  help: "gRPC request latency, by service and method.",
  labelNames: ["service", "method"] as const,
  buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
  registers: [metricsRegistry],
});

// Every process a daemon starts (services/common/exec.ts; `command` is its
// commandLabel(): program, plus the subcommand for ip/tc/nft/wg). Defined
// here so that every daemon's /metrics carries them, execs or not.
export const execTotal = new Counter({
  name: "microvpc_exec_total",
  help: "Processes started, by command (program name, plus the subcommand for ip/tc/nft/wg; namespace wrappers as a prefix).",
  labelNames: ["command"] as const,
  registers: [metricsRegistry],
});

export const execDuration = new Histogram({
  name: "microvpc_exec_duration_seconds",
  help: "Wall time of commands run to completion, by command (long-lived children are counted in microvpc_exec_total only).",
  labelNames: ["command"] as const,
  buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
  registers: [metricsRegistry],
});

export function setDefaultLabels(labels: Record<string, string>): void {
  metricsRegistry.setDefaultLabels(labels);
}

/** Serves GET /metrics (and /healthz) on its own listener. */
export async function serveMetrics(host: string, port: number): Promise<Server> {
  const server = createServer(async (req, res) => {
    if (req.url === "/metrics") {
      res.setHeader("content-type", metricsRegistry.contentType);
      res.end(await metricsRegistry.metrics());
    } else if (req.url === "/healthz") {
      res.end("ok\n");
    } else {
      res.statusCode = 404;
      res.end("not found: try /metrics\n");
    }
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => resolve());
  });
  return server;
}
