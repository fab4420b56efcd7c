// firewall: its API is defined (proto/microvpc/v1/firewall.proto) but not built
// yet. The daemon starts, serves reflection and health, and answers every
// method with UNIMPLEMENTED, so orchestrators and probes can be wired today.
import type { ServiceDefinition } from "../common/daemon.js";
import { FirewallService } from "../../gen/microvpc/v1/firewall_pb.js";

export const firewallDefinition: ServiceDefinition = {
  name: "firewall",
  summary: "security groups and network ACLs compiled to nftables (not built yet: UNIMPLEMENTED)",
  defaultPort: 7403,
  async build() {
    return { services: [{ desc: FirewallService, impl: {} }] };
  },
};
