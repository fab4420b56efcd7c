// What `microvpcd gateway` serves (health and reflection are added by
// server.ts): NAT, floating IPs and port forwards, and instance metadata.
import { route, type ServiceBinding } from "../common/grpc-adapter.js";
import { GatewayService } from "../../gen/microvpc/v1/gateway_pb.js";
import type { MetadataApi } from "./metadata-api.js";
import type { GatewayApi } from "./service.js";

export function gatewayRoutes(api: GatewayApi, metadata: MetadataApi): ServiceBinding[] {
  return [route(GatewayService, { ...api.impl, ...metadata.impl })];
}
