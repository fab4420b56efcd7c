// Remote access into a VPC on a real Redis Cluster (3 primaries, 3
// replicas): the cases of vpn.test.ts, with the ipam, netagent and firewall
// daemons on the cluster. The endpoint's record, the client range's
// reservation and the VPC's change counter are written in the VPC's slot by
// one script; a client's records in that slot, its id in the "{vpn}"
// catalog; the endpoint host's sync polls each endpoint VPC's counter.
import "../lib/set-on-cluster.js";
import "./vpn.test.js";
