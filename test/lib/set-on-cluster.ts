// Imported first by a test file that runs shared cases against a Redis
// Cluster (on-cluster.ts): ES modules evaluate their imports in order, so the
// cases read it set.
process.env.MICROVPC_TEST_ON_CLUSTER = "1";
