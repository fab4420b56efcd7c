// The netagent's host records on a real Redis Cluster (3 primaries, 3
// replicas): the cases of host-store.test.ts. A host's records are under its
// hash tag, a VPC's address claims under the VPC's (netagent/schema.ts
// NetagentKeys); AttachNic's claim is a series of one-slot steps, and two
// hosts racing for one address must still leave one holder.
import "../lib/set-on-cluster.js";
import "./host-store.test.js";
