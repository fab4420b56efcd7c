// grpc.health.v1, so Kubernetes gRPC probes and grpc_health_probe work. The
// overall status ("") and each service's status follow a readiness check the
// service supplies (for most: "can I reach Redis?").
import { Code, ConnectError, type ConnectRouter } from "@connectrpc/connect";
import { Health, HealthCheckResponse_ServingStatus as Status } from "../../gen/grpc/health/v1/health_pb.js";

export type ReadyCheck = () => Promise<boolean>;

export function registerHealth(router: ConnectRouter, serviceNames: string[], ready: ReadyCheck): void {
  const known = new Set(["", ...serviceNames]);
  const status = async (service: string): Promise<Status> => {
    if (!known.has(service)) throw new ConnectError(`unknown service ${JSON.stringify(service)}`, Code.NotFound);
    return (await ready().catch(() => false)) ? Status.SERVING : Status.NOT_SERVING;
  };
  router.service(Health, {
    check: async (req) => ({ status: await status(req.service) }),
    list: async () => {
      const s = await status("");
      return { statuses: Object.fromEntries([...known].map((n) => [n, { status: s }])) };
    },
    async *watch(req, ctx) {
      let last: Status | undefined;
      while (!ctx.signal.aborted) {
        const s = await status(req.service);
        if (s !== last) {
          last = s;
          yield { status: s };
        }
        await new Promise((r) => setTimeout(r, 1000));
      }
    },
  });
}
