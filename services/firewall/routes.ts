// What `microvpcd firewall` serves (health and reflection are added by
// server.ts): the API half (with the flow-log configs), and GetFirewallStatus
// and ListFlowLogs from the sync half.
import type { ServiceImpl } from "@connectrpc/connect";
import { route, type ServiceBinding } from "../common/grpc-adapter.js";
import { FirewallService } from "../../gen/microvpc/v1/firewall_pb.js";
import type { FlowLogConfigApi } from "./flowlog-service.js";
import type { FirewallApi } from "./service.js";

export function firewallRoutes(
  api: FirewallApi,
  status: Pick<ServiceImpl<typeof FirewallService>, "getFirewallStatus" | "listFlowLogs">,
  flowLogConfigs: FlowLogConfigApi,
): ServiceBinding[] {
  return [route(FirewallService, { ...api.impl, ...status, ...flowLogConfigs.impl })];
}
