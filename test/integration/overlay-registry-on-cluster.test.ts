// The overlay registry on a real Redis Cluster (3 primaries, 3 replicas): the
// cases of overlay-registry.test.ts. Every host's record is under "{hosts}",
// so a pass reads its VPC's members' records in one MGET.
import "../lib/set-on-cluster.js";
import "./overlay-registry.test.js";
