import { Option } from "commander";
import type { ServiceDefinition } from "../common/daemon.js";
import { MANAGEMENT_AUTO, parseManagementCidrs } from "../common/management.js";
import { DnsService } from "../../gen/microvpc/v1/dns_pb.js";
import { IpamService } from "../../gen/microvpc/v1/ipam_pb.js";
import { PeeringService } from "../../gen/microvpc/v1/peering_pb.js";
import { SubnetService } from "../../gen/microvpc/v1/subnet_pb.js";
import { VpcService } from "../../gen/microvpc/v1/vpc_pb.js";
import { DnsApi } from "../dns/service.js";
import { Peerings } from "../peering/service.js";
import { PeeringStore } from "../peering/store.js";
import { Ipam } from "./service.js";
import { IpamStore } from "./store.js";

export const ipamDefinition: ServiceDefinition = {
  name: "ipam",
  summary: "VPCs, subnets and address allocation (stateless; run N replicas over one Redis)",
  defaultPort: 7401,
  options: [
    new Option(
      "--management-cidrs <list>",
      "the hypervisors' management network (IPv4 CIDRs/addresses, e.g. 10.20.0.0/16): UpdateDnsConfig refuses VPC forwarders inside it; empty: none (the gateways still refuse to use them)",
    )
      .env("MICROVPC_MANAGEMENT_CIDRS")
      .default(""),
  ],
  async build({ flags, redis }) {
    const mgmt = parseManagementCidrs("--management-cidrs", String(flags.managementCidrs ?? ""));
    // "auto" is the gateway's view of its own host; the ipam daemon runs anywhere.
    if (mgmt === MANAGEMENT_AUTO) throw new Error('--management-cidrs "auto" is for the gateway; give the ipam daemon the CIDRs (e.g. 10.20.0.0/16)');
    const store = new IpamStore(redis);
    const ipam = new Ipam(store);
    return {
      services: [
        { desc: VpcService, impl: ipam.vpcService },
        { desc: SubnetService, impl: ipam.subnetService },
        { desc: IpamService, impl: ipam.ipamService },
        { desc: PeeringService, impl: new Peerings(ipam, new PeeringStore(redis)).impl },
        { desc: DnsService, impl: new DnsApi(store, mgmt).impl },
      ],
    };
  },
};
