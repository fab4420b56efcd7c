// What `microvpcd ipam` serves: VPCs, subnets, addresses, peerings and the
// VPCs' DNS records (health and reflection are added by server.ts).
import { route, type ServiceBinding } from "../common/grpc-adapter.js";
import { DnsService } from "../../gen/microvpc/v1/dns_pb.js";
import { IpamService } from "../../gen/microvpc/v1/ipam_pb.js";
import { PeeringService } from "../../gen/microvpc/v1/peering_pb.js";
import { SubnetService } from "../../gen/microvpc/v1/subnet_pb.js";
import { VpcService } from "../../gen/microvpc/v1/vpc_pb.js";
import type { DnsApi } from "../dns/service.js";
import type { Peerings } from "../peering/service.js";
import type { Ipam } from "./service.js";

export function ipamRoutes(ipam: Ipam, peerings: Peerings, dns: DnsApi): ServiceBinding[] {
  return [
    route(VpcService, ipam.vpcService),
    route(SubnetService, ipam.subnetService),
    route(IpamService, ipam.ipamService),
    route(PeeringService, peerings.impl),
    route(DnsService, dns.impl),
  ];
}
