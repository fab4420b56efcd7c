// Security groups and network ACLs with real packets on a real Redis Cluster
// (3 primaries, 3 replicas): the cases of firewall.test.ts, with the ipam,
// netagent and firewall daemons started on the cluster. The firewall's sync
// reads its host's NICs from the netagent's records under the host's tag,
// binds in one-slot steps and reads its VPCs' snapshots from the client
// (firewall/store.ts loadInSteps), so every allowed and every forbidden
// flow of firewall.test.ts is checked against the cluster's layout.
import "../lib/set-on-cluster.js";
import "./firewall.test.js";
