// What `microvpcd netagent` serves (health and reflection are added by server.ts).
import { route, type ServiceBinding } from "../common/grpc-adapter.js";
import { NetAgentService } from "../../gen/microvpc/v1/netagent_pb.js";
import { VpnService } from "../../gen/microvpc/v1/vpn_pb.js";
import type { NetAgent } from "./service.js";
import type { Vpn } from "./vpn/service.js";

export function netagentRoutes(agent: NetAgent, vpn?: Vpn): ServiceBinding[] {
  return [route(NetAgentService, agent.impl), ...(vpn ? [route(VpnService, vpn.impl)] : [])];
}
