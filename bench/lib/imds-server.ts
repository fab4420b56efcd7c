// The instance metadata server for bench/gateway.ts's "unthrottled" runs:
// the same createImdsServer() and the same wiring as `microvpcd imds`
// (services/gateway/main.ts runImds: transit map → VPC, MetadataStore in
// Redis, floating IPs for public-ipv4), but with the per-caller rate limit
// and burst given on the command line — the daemon has no flag for them.
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
import { createImdsServer } from "../../services/gateway/imds.js";
import { MetadataStore } from "../../services/gateway/metadata-store.js";
import { GatewayStore } from "../../services/gateway/store.js";
import { GatewaySync } from "../../services/gateway/sync.js";

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
const hostId = String(o["host-id"]);
const gw = new GatewayStore(redis);
let transit = new Map<string, number>();
let fips: { vpcId: string; private: string; address: string }[] = [];
const refresh = async () => {
  try {
    transit = await gw.transitMap(hostId);
    fips = (await gw.listFips()).filter((f) => f.private);
  } catch (err) {
    logger.warn({ err: (err as Error).message }, "cannot refresh the transit map; keeping the last one");
  }
};
await refresh();
const timer = setInterval(refresh, 1000);
const imds = createImdsServer({
  lookupVpc: (local) => GatewaySync.vpcOfTransit(transit, local),
  store: new MetadataStore(redis),
  publicIpOf: async (vpcId, address) => fips.find((f) => f.vpcId === vpcId && f.private === address)?.address,
  rateLimitPerSecond: Number(o.rate),
  burst: Number(o.burst),
  logger,
});

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

await new Promise<void>((resolve, reject) => {
  imds.server.once("error", reject);
  imds.server.listen(Number(o.port), () => resolve());
});
process.stdout.write("listening\n");
const stop = async () => {
  clearInterval(timer);
  await imds.close();
  redis.disconnect();
  process.exit(0);
};
process.on("SIGTERM", () => void stop());
process.on("SIGINT", () => void stop());
