// Whether a test file runs its cases against a Redis Cluster: a file that
// imports set-on-cluster.ts before the shared cases (e.g.
// ipam-on-cluster.test.ts) sets it for its own process (vitest runs each
// file in its own fork).
export const ON_CLUSTER = process.env.MICROVPC_TEST_ON_CLUSTER === "1";
