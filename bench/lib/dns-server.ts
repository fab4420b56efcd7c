// The resolver for bench/dns.ts's unthrottled runs, and its baseline. Run
// inside the hypervisor's host namespace in place of the gateway (same
// address and port), so VMs reach it through the real data plane (DNAT in
// the VPC namespace, transit veth, the host's input chain).
//
//   --mode resolver: runResolver() exactly as `microvpcd imds --dns-port`
//     wires it (zones from Redis, bound per transit address), with the
//     per-VM rate limit raised — the daemon has no flag for it — and its
//     10-s safety-net reload off (bench:dns section 3 times record changes);
//   --mode bare: a bare dns-packet UDP server on the same transit address
//     that decodes each query and answers one constant A record: the cost of
//     the path, Node's dgram and dns-packet alone.
// Prints "ready" when bound; SIGTERM ends it.
//
// node --import tsx bench/lib/dns-server.ts --mode resolver|bare --redis URL --host-id ID --address 169.254.k.1 --port 53
import { createSocket } from "node:dgram";
import { parseArgs } from "node:util";
import * as dnsPacket from "dns-packet";
import { pino } from "pino";
import { connectRedis, waitReady } from "../../services/common/redis.js";
import { runResolver } from "../../services/dns/host.js";

const { values: o } = parseArgs({
  options: {
    mode: { type: "string", default: "resolver" },
    redis: { type: "string" },
    "host-id": { type: "string" },
    address: { type: "string" },
    port: { type: "string", default: "53" },
  },
});
const port = Number(o.port);
const logger = pino({ level: "warn", base: { service: "bench-dns", pid: process.pid } });

if (o.mode === "bare") {
  const s = createSocket("udp4");
  s.on("message", (m, r) => {
    let q: dnsPacket.DecodedPacket;
    try {
      q = dnsPacket.decode(m);
    } catch {
      return;
    }
    const name = q.questions?.[0]?.name ?? "";
    s.send(
      dnsPacket.encode({
        id: q.id,
        type: "response",
        flags: dnsPacket.AUTHORITATIVE_ANSWER,
        questions: q.questions,
        answers: [{ type: "A", name, ttl: 60, data: "10.0.1.99" }],
      }),
      r.port,
      r.address,
    );
  });
  s.bind(port, String(o.address), () => process.stdout.write("ready\n"));
  process.on("SIGTERM", () => process.exit(0));
} else {
  const redis = connectRedis({ url: String(o.redis), logger });
  await waitReady(redis);
  // The safety-net reload every 10 s off (an hour): bench:dns section 3 measures what each record change costs, which a whole reload in its window would blur.
  const { resolver, close } = await runResolver(redis, String(o["host-id"]), port, logger, {
    rateLimitPerSecond: 1e9,
    burst: 1e9,
    maxInflightPerCaller: 1e6,
    reloadMs: 3_600_000,
  });
  for (let i = 0; i < 100 && !resolver.bound().includes(String(o.address)); i++) await new Promise((r) => setTimeout(r, 50));
  if (!resolver.bound().includes(String(o.address))) throw new Error(`resolver did not bind ${o.address}`);
  process.stdout.write("ready\n");
  process.on("SIGTERM", () => void close().then(() => process.exit(0)));
}
