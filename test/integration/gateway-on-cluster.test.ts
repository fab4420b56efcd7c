// The gateway end to end on a real Redis Cluster (3 primaries, 3 replicas):
// the cases of gateway.test.ts, with the gateway's records in their cluster
// layout (gateway/schema.ts GatewayKeys: NAT gateways, floating IPs and
// port forwards under {gw}, a VPC's NAT lease under the VPC's tag) and the
// metadata server, in the hypervisor's namespace, reading the cluster
// through forwards of the nodes' ports (Harness.redisFrom). Real packets:
// NAT egress, floating IPs, port forwards, IMDS tokens and hop limits.
import "../lib/set-on-cluster.js";
import "./gateway.test.js";
