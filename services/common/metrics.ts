// Prometheus metrics, one registry per process. Every RPC is counted and
// timed by the interceptor in server.ts; services add their own counters to
// the same registry.
import { createServer, type Server } from "node:http";
import { Code } from "@connectrpc/connect";
import type { Redis } from "ioredis";
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from "prom-client";
import { BUILD } from "./version.js";
import { sentinelsWatched } from "./redis-failover.js";

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
  collect: () => flushRpcStats(),
});

const RPC_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5];

export const rpcDuration = new Histogram({
  name: "microvpc_rpc_duration_seconds",
  help: "gRPC request latency, by service and method.",
  labelNames: ["service", "method"] as const,
  buckets: RPC_BUCKETS,
  registers: [metricsRegistry],
  collect: () => flushRpcStats(),
});

/** What prom-client keeps per label set of a histogram (lib/histogram.js createBaseValues). */
interface HistogramEntry {
  labels: Record<string, string>;
  bucketValues: Record<number, number>;
  sum: number;
  count: number;
}

const allRpcStats: RpcStats[] = [];

/**
 * What a reset of metricsRegistry must also drop: the counts a hot path
 * keeps in plain numbers until a scrape hands them over (RpcStats,
 * deferredCounter). Without it a count made before resetMetrics() would
 * show after it.
 */
const pendingDrops: (() => void)[] = [];
const resetRegistry = metricsRegistry.resetMetrics.bind(metricsRegistry);
metricsRegistry.resetMetrics = () => {
  for (const drop of pendingDrops) drop();
  resetRegistry();
};

/**
 * A counter of one label for a hot path: inc(value) adds to a plain number,
 * handed to prom-client when the counter is read (a scrape), as RpcStats
 * does for the RPC metrics: prom-client hashes the label set on every
 * inc(). What a scrape shows is the same series with the same values.
 */
export function deferredCounter<V extends string>(c: { name: string; help: string; label: string }): (value: V) => void {
  const pending = new Map<V, number>();
  pendingDrops.push(() => pending.clear());
  new Counter({
    name: c.name,
    help: c.help,
    labelNames: [c.label],
    registers: [metricsRegistry],
    collect() {
      for (const [value, n] of pending) {
        if (n === 0) continue;
        pending.set(value, 0);
        this.inc({ [c.label]: value }, n);
      }
    },
  });
  return (value) => pending.set(value, (pending.get(value) ?? 0) + 1);
}

/**
 * The RPC metrics of one method, counted in plain numbers as calls end and
 * handed to microvpc_rpc_requests_total and microvpc_rpc_duration_seconds
 * when they are read (a scrape, metricsRegistry.metrics(), or get()). Even
 * through labels() handles prom-client builds and hashes the label set on
 * every inc() and observe(): a few per cent of a unary call's CPU, and its
 * garbage, on a daemon serving tens of thousands of calls a second. What
 * a scrape shows is the same series with the same values.
 */
export class RpcStats {
  /** Calls ended since the last flush, by gRPC code (0–16). */
  private readonly codes = new Float64Array(17);
  /** Durations since the last flush, by bucket (RPC_BUCKETS; the last: above all of them). */
  private readonly buckets = new Float64Array(RPC_BUCKETS.length + 1);
  private sum = 0;
  private count = 0;
  private readonly labels: { service: string; method: string };

  constructor(
    readonly service: string,
    readonly method: string,
  ) {
    this.labels = { service, method };
    allRpcStats.push(this);
    pendingDrops.push(() => this.drop());
  }

  /** Forgets what was counted since the last flush (a reset of the registry). */
  private drop(): void {
    this.codes.fill(0);
    this.buckets.fill(0);
    this.sum = 0;
    this.count = 0;
  }

  /** A call ended with this gRPC code, after this long. */
  record(code: number, seconds: number): void {
    this.codes[code >= 0 && code <= 16 ? code : 2]++;
    let b = 0;
    while (b < RPC_BUCKETS.length && seconds > RPC_BUCKETS[b]) b++;
    this.buckets[b]++;
    this.sum += seconds;
    this.count++;
  }

  /** Adds what was counted since the last flush to the prom-client metrics. */
  flush(): void {
    for (let c = 0; c < this.codes.length; c++) {
      const n = this.codes[c];
      if (n === 0) continue;
      this.codes[c] = 0;
      rpcRequests.inc({ service: this.service, method: this.method, code: codeName(c) }, n);
    }
    if (this.count === 0) return;
    const e = histogramEntry(this.labels);
    for (let b = 0; b < RPC_BUCKETS.length; b++) {
      e.bucketValues[RPC_BUCKETS[b]] += this.buckets[b];
      this.buckets[b] = 0;
    }
    this.buckets[RPC_BUCKETS.length] = 0;
    e.sum += this.sum;
    e.count += this.count;
    this.sum = 0;
    this.count = 0;
  }
}

/** The code label of a gRPC code: connect's Code names (Canceled, NotFound, …), "OK" for 0. */
export function codeName(code: number): string {
  return code === 0 ? "OK" : Code[code];
}

/**
 * rpcDuration's entry for these labels, made as observe() makes it (zero()
 * with the same labels), so that what flush() adds shows as if each call
 * had been observed.
 */
function histogramEntry(labels: { service: string; method: string }): HistogramEntry {
  const h = rpcDuration as unknown as { hashMap: Record<string, HistogramEntry> };
  for (const e of Object.values(h.hashMap)) if (e.labels.service === labels.service && e.labels.method === labels.method) return e;
  rpcDuration.zero({ ...labels });
  for (const e of Object.values(h.hashMap)) if (e.labels.service === labels.service && e.labels.method === labels.method) return e;
  throw new Error("prom-client's Histogram no longer keeps its series in hashMap: see RpcStats in metrics.ts");
}

let flushing = false;
/** Hands every method's pending counts to prom-client (the collect() of both RPC metrics). */
export function flushRpcStats(): void {
  if (flushing) return;
  flushing = true;
  try {
    for (const s of allRpcStats) s.flush();
  } finally {
    flushing = false;
  }
}

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

// What every operator dashboard starts from: which build runs where.
export const buildInfo = new Gauge({
  name: "microvpc_build_info",
  help: "Always 1; the labels say which build this daemon runs: package version, git commit, Node.js version.",
  labelNames: ["version", "commit", "node"] as const,
  registers: [metricsRegistry],
});
buildInfo.set({ version: BUILD.version, commit: BUILD.commit, node: BUILD.node }, 1);

// Per reconciler (netagent, firewall, gateway, overlay): one label value
// each, so these stay a handful of series per daemon.
export const reconcileLastSuccess = new Gauge({
  name: "microvpc_reconcile_last_success_timestamp_seconds",
  help: "Unix time of the reconciler's last whole pass that applied everything without an error (0: none yet since start).",
  labelNames: ["reconciler"] as const,
  registers: [metricsRegistry],
});

export const reconcileErrors = new Counter({
  name: "microvpc_reconcile_errors_total",
  help: "Reconcile passes (whole or targeted) that ended with an error for any part of what they covered.",
  labelNames: ["reconciler"] as const,
  registers: [metricsRegistry],
});

export const reconcileDuration = new Histogram({
  name: "microvpc_reconcile_duration_seconds",
  help: "Wall time of one reconcile pass (whole or targeted, failed or not).",
  labelNames: ["reconciler"] as const,
  buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
  registers: [metricsRegistry],
});

/** How long a Redis reachability answer is reused: a scrape storm is not a PING storm. */
export const REDIS_UP_CACHE_MS = 1000;

/**
 * microvpc_redis_up from this daemon's own connection: 1 when the client is
 * connected and answers a PING (at most one PING per REDIS_UP_CACHE_MS, with
 * the connection's own command timeout), else 0.
 */
export function watchRedis(redis: Pick<Redis, "status" | "ping">): void {
  watchSentinels(redis);
  let at = 0;
  let value = 0;
  let inflight: Promise<number> | undefined;
  const probe = async (): Promise<number> => {
    if (redis.status !== "ready") return 0;
    try {
      return (await redis.ping()) === "PONG" ? 1 : 0;
    } catch {
      return 0;
    }
  };
  metricsRegistry.removeSingleMetric("microvpc_redis_up");
  new Gauge({
    name: "microvpc_redis_up",
    help: "1 if this daemon's Redis connection is up and answered a PING at the last scrape (reused for 1 s), else 0.",
    registers: [metricsRegistry],
    async collect() {
      if (Date.now() - at >= REDIS_UP_CACHE_MS) {
        inflight ??= probe().finally(() => (inflight = undefined));
        value = await inflight;
        at = Date.now();
      }
      this.set(value);
    },
  });
}

/** microvpc_redis_sentinels_watched, for a client behind Sentinel (redis-failover.ts). */
function watchSentinels(redis: object): void {
  metricsRegistry.removeSingleMetric("microvpc_redis_sentinels_watched");
  if (sentinelsWatched(redis) === undefined) return;
  new Gauge({
    name: "microvpc_redis_sentinels_watched",
    help: "Behind Redis Sentinel: the sentinels this daemon's failover watch is subscribed to (+switch-master). 0: a switchover whose old master stays up goes unseen until the sentinels demote it.",
    registers: [metricsRegistry],
    collect() {
      this.set(sentinelsWatched(redis) ?? 0);
    },
  });
}

export function setDefaultLabels(labels: Record<string, string>): void {
  metricsRegistry.setDefaultLabels(labels);
}

/** What /readyz answers from: the daemon's shared readiness, and why it is not ready. */
export interface ReadyzSource {
  get(): Promise<boolean>;
  /** The reasons of the last not-ready answer (empty when ready or unknown). */
  problems?(): string[];
}

/**
 * Serves GET /metrics, /healthz (liveness: the process answers) and /readyz
 * (readiness: the same answer as grpc.health.v1, 503 with the reasons when
 * not ready) on their own listener.
 */
export async function serveMetrics(host: string, port: number, readiness?: ReadyzSource): Promise<Server> {
  const server = createServer(async (req, res) => {
    const path = (req.url ?? "").split("?")[0];
    if (path === "/metrics") {
      try {
        const body = await metricsRegistry.metrics();
        res.setHeader("content-type", metricsRegistry.contentType);
        res.end(body);
      } catch (err) {
        res.statusCode = 500;
        res.end(`cannot collect metrics: ${(err as Error).message}\n`);
      }
    } else if (path === "/healthz") {
      res.end("ok\n");
    } else if (path === "/readyz" && readiness) {
      const ok = await readiness.get().catch(() => false);
      res.statusCode = ok ? 200 : 503;
      res.setHeader("content-type", "text/plain; charset=utf-8");
      res.end(ok ? "ok\n" : `not ready\n${(readiness.problems?.() ?? []).map((p) => `- ${p}\n`).join("")}`);
    } else {
      res.statusCode = 404;
      res.end("not found: try /metrics, /healthz or /readyz\n");
    }
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, host, () => resolve());
  });
  return server;
}
