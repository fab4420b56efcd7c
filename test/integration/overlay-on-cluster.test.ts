// The WireGuard overlay end to end on a real Redis Cluster (3 primaries, 3
// replicas): the cases of overlay.test.ts, three hypervisors' netagents
// started on the cluster. The host registry is under "{hosts}", a VPC's
// members and nominations under the VPC's tag (netagent/schema.ts
// NetagentKeys); the mesh must converge and pass packets as on one Redis.
import "../lib/set-on-cluster.js";
import "./overlay.test.js";
