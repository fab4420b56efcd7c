// The vmm end to end on a real Redis Cluster (3 primaries, 3 replicas): the
// cases of vmm.test.ts with every daemon (ipam, netagent, firewall, gateway
// and its metadata server, vmm) on the cluster. A VM's records are under its
// host's hash tag, its name under its VPC's (vmm/store.ts), and the VM
// events are appended after each write. The cases create, race, SIGKILL and
// restart the vmm and check every service holds exactly the running VMs; the
// move of records an older version wrote is single-Redis only (a cluster
// never had those names).
import "../lib/set-on-cluster.js";
import "./vmm.test.js";
