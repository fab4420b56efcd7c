// microvpcd netagent: the data plane of one hypervisor.
import { hostname } from "node:os";
import { Option } from "commander";
import type { ServiceDefinition } from "../common/daemon.js";
import { NetAgentService } from "../../gen/microvpc/v1/netagent_pb.js";
import { IpamStore } from "../ipam/store.js";
import { Agent } from "./agent.js";
import { LinuxKernel } from "./kernel.js";
import { NetAgent } from "./service.js";
import { HostStore } from "./store.js";

const HOST_ID_RE = /^[a-z0-9]{1,24}$/;

export function defaultHostId(): string {
  return hostname().toLowerCase().replace(/[^a-z0-9]/g, "").slice(0, 24) || "host";
}

export const netagentDefinition: ServiceDefinition = {
  name: "netagent",
  summary: "per-hypervisor data plane: a network namespace per VPC, a bridge per subnet, TAP/veth NICs, bandwidth limits",
  defaultPort: 7402,
  options: [
    new Option("--host-id <id>", "this hypervisor's id (1–24 of [a-z0-9]); part of every namespace name, so unique per machine").env("MICROVPC_HOST_ID").default(defaultHostId()),
    new Option("--mtu <bytes>", "MTU of subnet bridges and NICs").env("MICROVPC_MTU").default("1500"),
    new Option("--reconcile-interval-ms <ms>", "how often the kernel is compared with the desired state").env("MICROVPC_RECONCILE_INTERVAL_MS").default("10000"),
  ],
  async build({ flags, redis, logger }) {
    const hostId = String(flags.hostId);
    if (!HOST_ID_RE.test(hostId)) throw new Error(`--host-id ${JSON.stringify(hostId)}: use 1–24 characters of [a-z0-9]`);
    const mtu = Number(flags.mtu);
    if (!Number.isInteger(mtu) || mtu < 576 || mtu > 9000) throw new Error(`--mtu ${flags.mtu}: use 576–9000`);
    const kernel = new LinuxKernel();
    const agent = new Agent(kernel, new HostStore(redis, hostId), hostId, logger);
    const svc = new NetAgent(agent, kernel, new IpamStore(redis), { hostId, mtu });
    // Adopt what the kernel has before answering: the first pass only
    // changes what differs from the desired state.
    agent.start(Number(flags.reconcileIntervalMs));
    return {
      services: [{ desc: NetAgentService, impl: svc.impl }],
      close: async () => agent.stop(),
    };
  },
};
