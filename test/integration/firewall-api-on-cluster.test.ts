// The firewall's control plane on a real Redis Cluster (3 primaries, 3
// replicas): the cases of firewall-api.test.ts. A VPC's security groups and
// network ACLs are under its hash tag, beside IPAM's records of the VPC and
// its subnets, which their scripts check (services/firewall/keys.ts
// FirewallKeys); a script that reached another slot would fail these with
// CROSSSLOT.
import "../lib/set-on-cluster.js";
import "./firewall-api.test.js";
