// The RPC fuzzer on a real Redis Cluster (3 primaries, 3 replicas): the
// cases of rpc-fuzz.test.ts with every daemon (ipam, netagent, firewall,
// gateway, vmm) on the cluster and its keys in the cluster layout (hash tags
// per VPC, host, {gw}, {catalog}, {fw}, …). Hostile and malformed requests
// to every RPC, and a rejected or read-only call changes nothing: the Redis
// snapshot reads every primary's keyspace (test/lib/rpc-fuzz.ts), the
// self-check writes a key on each.
import "../lib/set-on-cluster.js";
import "./rpc-fuzz.test.js";
