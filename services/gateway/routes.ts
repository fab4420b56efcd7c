// What `microvpcd gateway` serves (health and reflection are added by
// server.ts): NAT, floating IPs and port forwards, instance metadata, and
// this host's gateway status.
import { route, type ServiceBinding } from "../common/grpc-adapter.js";
import { GatewayService } from "../../gen/microvpc/v1/gateway_pb.js";
import type { MetadataApi } from "./metadata-api.js";
import type { GatewayApi } from "./service.js";
import type { GatewayStatusApi } from "./status-api.js";

export function gatewayRoutes(api: GatewayApi, metadata: MetadataApi, status: Pick<GatewayStatusApi, "impl">): ServiceBinding[] {
  return [route(GatewayService, { ...api.impl, ...metadata.impl, ...status.impl })];
}
