// What `microvpcd vmm` serves (health and reflection are added by server.ts).
import { route, type ServiceBinding } from "../common/grpc-adapter.js";
import { VmService } from "../../gen/microvpc/v1/vm_pb.js";
import type { Vmm } from "./service.js";

export function vmmRoutes(vmm: Vmm): ServiceBinding[] {
  return [route(VmService, vmm.impl)];
}
