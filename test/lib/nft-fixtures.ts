// Inputs that reach every branch of the nft builders: a firewall state in
// four variants (fw(0..3)), gateway VPCs and hosts, two peerings. Shared by
// the byte-for-byte corpus (test/unit/nft-golden.test.ts) and the FakeNft
// replays (test/unit/nft.test.ts).
import type { BindingRec, SecurityGroupRec, SgRule, VpcFirewallState } from "../../services/firewall/model.js";
import { parsePortRanges, type GwVpc, type HostGw } from "../../services/gateway/plan.js";
import type { PeeringLike } from "../../services/netagent/peering-plan.js";

const rule = (r: Partial<SgRule>): SgRule => ({ dir: "ingress", proto: "tcp", portFrom: 0, portTo: 0, description: "", ...r });
const group = (id: string, rules: SgRule[], dropLogging?: { ratePerSecond: number; burst: number }): SecurityGroupRec => ({
  id,
  vpcId: "vpc-111111111111",
  name: id,
  description: "",
  labels: [],
  rules,
  ...(dropLogging ? { dropLogging } : {}),
  generation: 1,
  createdMs: 0,
  updatedMs: 0,
});
export const nic = (n: number, subnet: string, address: string, groupIds: string[]): BindingRec => ({
  nicId: `nic-00000000000${n}`,
  vpcId: "vpc-111111111111",
  subnetId: subnet,
  address,
  mac: `02:00:0a:00:0${n}:04`,
  hostId: "hv1",
  hostIf: `v00000000000${n}`,
  groupIds,
  boundMs: 0,
  updatedMs: 0,
});
export const WEB = "sg-00000000000a";
export const DB = "sg-00000000000b";
export const OPS = "sg-00000000000c";

export function fw(variant: number): VpcFirewallState {
  const st: VpcFirewallState = {
    vpcId: "vpc-111111111111",
    subnets: [
      { subnetId: "subnet-aaaaaaaaaaaa", cidr: "10.0.1.0/24", bridge: "br-aaaaaaaaaaaa" },
      { subnetId: "subnet-bbbbbbbbbbbb", cidr: "10.0.2.0/24", bridge: "br-bbbbbbbbbbbb" },
    ],
    nics: [
      nic(1, "subnet-aaaaaaaaaaaa", "10.0.1.4", [WEB]),
      nic(2, "subnet-bbbbbbbbbbbb", "10.0.2.4", [DB, OPS]),
      nic(3, "subnet-bbbbbbbbbbbb", "10.0.2.5", []),
    ],
    groups: new Map([
      [
        WEB,
        group(WEB, [
          rule({ portFrom: 80, portTo: 80, cidr: "0.0.0.0/0" }),
          rule({ portFrom: 8000, portTo: 8080, cidr: "0.0.0.0/0" }),
          rule({ proto: "udp", cidr: "10.0.0.0/16" }),
          rule({ proto: "icmp", icmpType: 8, cidr: "10.0.0.0/16" }),
          rule({ proto: "icmp", icmpType: 3, icmpCode: 4, cidr: "10.0.0.0/8" }),
          rule({ proto: "icmp", cidr: "192.168.0.0/16" }),
          rule({ dir: "egress", proto: "all", cidr: "0.0.0.0/0" }),
        ]),
      ],
      [
        DB,
        group(
          DB,
          [
            rule({ portFrom: 5432, portTo: 5432, group: WEB }),
            rule({ proto: "icmp", group: WEB }),
            rule({ proto: "icmp", icmpType: 8, group: WEB }),
            rule({ proto: "all", group: OPS }),
            rule({ dir: "egress", proto: "tcp", portFrom: 443, portTo: 443, cidr: "0.0.0.0/0" }),
          ],
          { ratePerSecond: 5, burst: 10 },
        ),
      ],
      [OPS, group(OPS, [rule({ portFrom: 22, portTo: 22, cidr: "10.9.0.0/16" })])],
    ]),
    members: new Map([
      [WEB, ["10.0.1.4", "10.0.3.9"]],
      [OPS, ["10.0.2.4"]],
    ]),
    acls: new Map([
      [
        "subnet-bbbbbbbbbbbb",
        {
          id: "acl-000000000001",
          vpcId: "vpc-111111111111",
          name: "db",
          description: "",
          labels: [],
          subnetIds: ["subnet-bbbbbbbbbbbb"],
          generation: 1,
          createdMs: 0,
          updatedMs: 0,
          entries: [
            { ruleNumber: 200, dir: "ingress", action: "allow", proto: "all", portFrom: 0, portTo: 0, cidr: "0.0.0.0/0", description: "" },
            { ruleNumber: 100, dir: "ingress", action: "deny", proto: "tcp", portFrom: 22, portTo: 22, cidr: "0.0.0.0/0", description: "" },
            { ruleNumber: 150, dir: "ingress", action: "deny", proto: "udp", portFrom: 0, portTo: 0, cidr: "10.0.0.0/8", description: "" },
            {
              ruleNumber: 160,
              dir: "ingress",
              action: "deny",
              proto: "icmp",
              portFrom: 0,
              portTo: 0,
              icmpType: 3,
              icmpCode: 1,
              cidr: "10.0.0.0/8",
              description: "",
            },
            { ruleNumber: 100, dir: "egress", action: "allow", proto: "all", portFrom: 0, portTo: 0, cidr: "0.0.0.0/0", description: "" },
          ],
        },
      ],
    ]),
  };
  if (variant === 1) {
    // a member joins, a rule goes, NIC 3 gets a group with drop logging of its own
    st.members.set(WEB, ["10.0.1.4", "10.0.3.9", "10.0.3.10"]);
    st.groups.set(WEB, { ...st.groups.get(WEB)!, rules: st.groups.get(WEB)!.rules.slice(1) });
    st.nics[2] = { ...st.nics[2], groupIds: [WEB], dropLogging: { ratePerSecond: 1, burst: 2 } };
  }
  if (variant === 2) {
    // NIC 2 and its groups go, the ACL goes
    st.nics = [st.nics[0], st.nics[2]];
    st.acls = new Map();
  }
  if (variant === 3) {
    st.nics = [];
    st.groups = new Map();
    st.members = new Map();
  }
  return st;
}

export const gwVpc = (o: Partial<GwVpc> = {}): GwVpc => ({
  vpcId: "vpc-111111111111",
  transit: 0,
  subnets: [
    { subnetId: "subnet-aaaaaaaaaaaa", cidr: "10.0.1.0/24", public: true },
    { subnetId: "subnet-bbbbbbbbbbbb", cidr: "10.0.2.0/24", public: false },
    { subnetId: "subnet-cccccccccccc", cidr: "10.0.3.0/24", public: false },
  ],
  nat: false,
  natSources: [],
  fips: [
    { address: "203.0.113.5", private: "10.0.1.4" },
    { address: "203.0.113.6", private: "10.0.1.5" },
  ],
  forwards: [
    { proto: "tcp", outsidePort: 443, private: "10.0.1.4", privatePort: 8443 },
    { proto: "udp", outsidePort: 22, private: "10.0.1.4", privatePort: 22 },
  ],
  hopLimits: new Map([
    ["10.0.1.4", 1],
    ["10.0.1.5", 3],
    ["10.0.1.6", 1],
  ]),
  resolver: "10.0.0.2",
  ...o,
});
export const gwHost = (o: Partial<HostGw> = {}): HostGw => ({
  hostId: "hv1",
  uplink: "eth0",
  imdsPort: 8775,
  dnsPort: 53,
  pool: "203.0.113.0/24",
  reservedPorts: parsePortRanges("--reserved-ports", "22"),
  managementCidrs: ["198.51.100.0/24", "10.20.0.0/16"],
  vpcs: [gwVpc(), gwVpc({ vpcId: "vpc-222222222222", transit: 1, fips: [], forwards: [], hopLimits: new Map() })],
  ...o,
});

export const AB: PeeringLike = {
  id: "pcx-00000000000a",
  vpc1Id: "vpc-aaaaaaaaaaaa",
  vpc2Id: "vpc-bbbbbbbbbbbb",
  vpc1Cidr: "10.1.0.0/16",
  vpc2Cidr: "10.2.0.0/16",
  vpc1Allowed: [],
  vpc2Allowed: ["10.2.5.0/24", "10.2.6.0/24"],
};
export const BC: PeeringLike = {
  ...AB,
  id: "pcx-00000000000b",
  vpc1Id: "vpc-bbbbbbbbbbbb",
  vpc2Id: "vpc-cccccccccccc",
  vpc1Cidr: "10.2.0.0/16",
  vpc2Cidr: "10.3.0.0/16",
  vpc2Allowed: [],
};
