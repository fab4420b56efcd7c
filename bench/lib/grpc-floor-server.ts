// The floor of the gRPC stack, for comparison with a real service: a bare
// @connectrpc/connect-node server over node:http2 (h2c), no interceptors, no
// Redis, answering grpc.health.v1.Health/Check at once. Run as its own
// process: `node --import tsx bench/lib/grpc-floor-server.ts PORT`; prints
// "listening" when ready.
import http2 from "node:http2";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { Health, HealthCheckResponse_ServingStatus } from "../../gen/grpc/health/v1/health_pb.js";

const port = Number(process.argv[2]);
const handler = connectNodeAdapter({
  routes: (router) => router.service(Health, { check: async () => ({ status: HealthCheckResponse_ServingStatus.SERVING }) }),
  grpc: true,
  grpcWeb: false,
  connect: true,
});
const server = http2.createServer(handler);
server.listen(port, "127.0.0.1", () => process.stdout.write("listening\n"));
process.on("SIGTERM", () => process.exit(0));
