// vmm: its API is defined (proto/microvpc/v1/vm.proto) but not built
// yet. The daemon starts, serves reflection and health, and answers every
// method with UNIMPLEMENTED, so orchestrators and probes can be wired today.
import type { ServiceDefinition } from "../common/daemon.js";
import { VmService } from "../../gen/microvpc/v1/vm_pb.js";

export const vmmDefinition: ServiceDefinition = {
  name: "vmm",
  summary: "metald-style VM manager (not built yet: UNIMPLEMENTED)",
  defaultPort: 7405,
  async build() {
    return { services: [{ desc: VmService, impl: {} }] };
  },
};
