// netagent end to end on a real Redis Cluster (3 primaries, 3 replicas): the
// cases of netagent.test.ts, with the ipam and netagent daemons started on
// the cluster. A host's records are under its hash tag, a VPC's address
// claims under the VPC's (netagent/schema.ts NetagentKeys), and AttachNic's
// claim runs in one-slot steps; the cases attach, detach and reuse
// addresses, restart an agent and pass real packets between VMs of two
// hypervisors.
import "../lib/set-on-cluster.js";
import "./netagent.test.js";
