// The per-hypervisor daemons whose APIs are defined but not built yet. They
// start, serve reflection and health, and answer every method with
// UNIMPLEMENTED, so orchestrators and probes can be wired up today.
import type { ServiceDefinition } from "./common/daemon.js";
import { FirewallService } from "../gen/microvpc/v1/firewall_pb.js";
import { GatewayService } from "../gen/microvpc/v1/gateway_pb.js";
import { NetAgentService } from "../gen/microvpc/v1/netagent_pb.js";
import { VmService } from "../gen/microvpc/v1/vm_pb.js";

export const stubDefinitions: ServiceDefinition[] = [
  { name: "netagent", summary: "per-hypervisor data plane: VPC namespaces, subnet bridges, NICs, overlay (not built yet: UNIMPLEMENTED)", defaultPort: 7402, desc: NetAgentService },
  { name: "firewall", summary: "security groups and network ACLs as nftables (not built yet: UNIMPLEMENTED)", defaultPort: 7403, desc: FirewallService },
  { name: "gateway", summary: "NAT, floating IPs, port forwards, instance metadata (not built yet: UNIMPLEMENTED)", defaultPort: 7404, desc: GatewayService },
  { name: "vmm", summary: "metald-style VM manager (not built yet: UNIMPLEMENTED)", defaultPort: 7405, desc: VmService },
].map(({ desc, ...d }) => ({
  ...d,
  async build() {
    return { services: [{ desc, impl: {} }] };
  },
}));
