// gateway: its API is defined (proto/microvpc/v1/gateway.proto) but not built
// yet. The daemon starts, serves reflection and health, and answers every
// method with UNIMPLEMENTED, so orchestrators and probes can be wired today.
import type { ServiceDefinition } from "../common/daemon.js";
import { GatewayService } from "../../gen/microvpc/v1/gateway_pb.js";

export const gatewayDefinition: ServiceDefinition = {
  name: "gateway",
  summary: "NAT gateways, floating IPs, port forwards, instance metadata (not built yet: UNIMPLEMENTED)",
  defaultPort: 7404,
  async build() {
    return { services: [{ desc: GatewayService, impl: {} }] };
  },
};
