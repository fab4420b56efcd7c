// The instance metadata server for bench/gateway.ts's "unthrottled" runs:
// runImds() of services/gateway/main.ts, the same wiring as `microvpcd imds`
// (transit map → VPC, MetadataStore in Redis, floating IPs for public-ipv4),
// but with the per-caller rate limit and burst given on the command line —
// the daemon has no flag for them.
// Run inside the hypervisor's host namespace in place of the gateway's own
// server (same port), so the VMs reach it through the real data plane.
//
// SIGUSR1 switches to "floor" mode: every request is answered at once with a
// constant body, no Redis, no lookup, no limit — the cost of the HTTP server
// and the path alone. SIGUSR2 switches back. Each switch is acknowledged on
// stdout ("mode floor" / "mode imds"). SIGTERM/SIGINT end it.
//
// node --import tsx bench/lib/imds-server.ts --redis URL --host-id ID --port 8775 --rate N --burst N
import type { IncomingMessage, ServerResponse } from "node:http";
import { parseArgs } from "node:util";
import { pino } from "pino";
import { connectRedis, waitReady } from "../../services/common/redis.js";
import { runImds } from "../../services/gateway/main.js";

const { values: o } = parseArgs({
  options: {
    redis: { type: "string" },
    "host-id": { type: "string" },
    port: { type: "string", default: "8775" },
    rate: { type: "string", default: "50" },
    burst: { type: "string", default: "100" },
  },
});

const logger = pino({ level: "warn", base: { service: "bench-imds", pid: process.pid } });
const redis = connectRedis({ url: String(o.redis), logger });
await waitReady(redis);
// The daemon's own wiring, with the limits from the command line.
const imds = await runImds(redis, String(o["host-id"]), Number(o.port), logger, { rateLimitPerSecond: Number(o.rate), burst: Number(o.burst) });

let floor = false;
const original = imds.server.listeners("request") as ((req: IncomingMessage, res: ServerResponse) => void)[];
imds.server.removeAllListeners("request");
imds.server.on("request", (req: IncomingMessage, res: ServerResponse) => {
  if (!floor) {
    for (const l of original) l.call(imds.server, req, res);
    return;
  }
  req.resume();
  res.setHeader("Content-Type", "text/plain");
  res.setHeader("Content-Length", 7);
  res.end("i-floor");
});
process.on("SIGUSR1", () => {
  floor = true;
  process.stdout.write("mode floor\n");
});
process.on("SIGUSR2", () => {
  floor = false;
  process.stdout.write("mode imds\n");
});

process.stdout.write("listening\n");
const stop = async () => {
  await imds.close();
  redis.disconnect();
  process.exit(0);
};
process.on("SIGTERM", () => void stop());
process.on("SIGINT", () => void stop());
