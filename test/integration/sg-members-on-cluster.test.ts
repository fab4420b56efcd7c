// Forged security-group members on a real Redis Cluster (3 primaries, 3
// replicas) with per-host Redis ACL users on every node: the case of
// sg-members.test.ts with every daemon on the cluster, each as its own user
// (Harness redisAcl on a cluster), and host B's forgeries written to the
// cluster's names (the VPC's member index mvpc:{V}:fw:sg:G:members, B's
// binding copies and NIC index under B's hash tag). A's firewall refuses
// both forged entries there too, and B's user may not write A's copy.
import "../lib/set-on-cluster.js";
import "./sg-members.test.js";
