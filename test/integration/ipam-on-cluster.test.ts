// IPAM end to end on a real Redis Cluster (3 primaries, 3 replicas): the
// cases of ipam.test.ts, through a `microvpcd ipam` started with a
// redis-cluster:// URL. Each VPC's record and indexes are under its hash tag
// and the catalog under {catalog} (services/ipam/keys.ts IpamKeys), so
// CreateVpc, CreateSubnet, DeleteSubnet and DeleteVpc run in steps of one
// slot each; a script that reached another slot would fail these with
// CROSSSLOT.
import "../lib/set-on-cluster.js";
import "./ipam.test.js";
