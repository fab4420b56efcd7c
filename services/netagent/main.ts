// netagent: its API is defined (proto/microvpc/v1/netagent.proto) but not built
// yet. The daemon starts, serves reflection and health, and answers every
// method with UNIMPLEMENTED, so orchestrators and probes can be wired today.
import type { ServiceDefinition } from "../common/daemon.js";
import { NetAgentService } from "../../gen/microvpc/v1/netagent_pb.js";

export const netagentDefinition: ServiceDefinition = {
  name: "netagent",
  summary: "per-hypervisor data plane: VPC namespaces, subnet bridges, NICs, overlay (not built yet: UNIMPLEMENTED)",
  defaultPort: 7402,
  async build() {
    return { services: [{ desc: NetAgentService, impl: {} }] };
  },
};
