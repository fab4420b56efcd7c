// The gateway's records on a real Redis Cluster (3 primaries, 3 replicas):
// the cases of gateway-store.test.ts. NAT gateways, floating IPs, port
// forwards and their indexes are under {gw}, a VPC's NAT lease under the
// VPC's tag, a host's transit indexes under the host's (gateway/schema.ts
// GatewayKeys); the {gw} scripts append no event there and the store appends
// it from the client, and the events read back must be the same.
import "../lib/set-on-cluster.js";
import "./gateway-store.test.js";
