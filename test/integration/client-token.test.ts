// A create's client token (services/common/client-token.ts) against a real
// redis-server, or with MICROVPC_TEST_ON_CLUSTER=1 a 3+3 Redis Cluster
// (test/lib/on-cluster.ts), where a VPC create's tokens are in the catalog's
// slot (IpamKeys.vpcTokens): the id the token names is read from the client
// and its record declared to the script, which checks that the token still
// names it. A retry gets the first create's record; a token that moved
// between the read and the script is read again; one naming a record that is
// gone, or holding something that is not an id, is taken over by the next
// create.
import assert from "node:assert/strict";
import { test } from "vitest";
import { ipamKeys } from "../../services/ipam/schema.js";
import { IpamStore } from "../../services/ipam/store.js";
import { ipToInt } from "../../services/common/validate.js";
import { subnetSpec } from "../lib/ipam-specs.js";
import { scratchRedis } from "../lib/scratch-redis.js";
import { ON_CLUSTER } from "../lib/on-cluster.js";

// Each test on an empty Redis (every primary of a cluster).
const db = scratchRedis({ followSwitch: true });
const keys = () => ipamKeys(db.r);

const vpc = (name: string) => ({ name, cidr: "10.70.0.0/16", base: ipToInt("10.70.0.0"), prefix: 16, description: "", labels: [], publicCidr: false });

test("a retry with the same token gets the first create's VPC; another token makes another", async () => {
  const s = new IpamStore(db.r);
  const a = await s.createVpc(vpc("a"), "tok-1");
  const again = await s.createVpc(vpc("a"), "tok-1");
  assert.deepEqual([a.created, again.created, again.vpc.id], [true, false, a.vpc.id]);
  const b = await s.createVpc(vpc("b"), "tok-2");
  assert.notEqual(b.vpc.id, a.vpc.id);
});

test("a token that moves between the client's read and the script is read again", async () => {
  const s = new IpamStore(db.r);
  const first = await s.createVpc(vpc("moving"), "tok-m");
  // The client reads an id the token no longer names (another create of it landed in between).
  const hget = db.r.hget.bind(db.r);
  let reads = 0;
  db.r.hget = ((...a: Parameters<typeof hget>) =>
    a[0] === keys().vpcTokens && reads++ === 0 ? Promise.resolve("vpc-ffffffffffff") : hget(...a)) as typeof db.r.hget;
  try {
    const again = await s.createVpc(vpc("moving"), "tok-m");
    assert.deepEqual([again.created, again.vpc.id], [false, first.vpc.id]);
  } finally {
    db.r.hget = hget;
  }
  assert.equal(reads, 2, "the script refused the stale id and the token was read again");
});

test("a token naming a VPC that is gone, or holding no id at all, is taken over by the next create", async () => {
  const s = new IpamStore(db.r);
  const gone = await s.createVpc(vpc("gone"), "tok-g");
  assert.equal(await s.deleteVpc(gone.vpc.id), true);
  const next = await s.createVpc(vpc("gone"), "tok-g");
  assert.equal(next.created, true);
  assert.notEqual(next.vpc.id, gone.vpc.id);
  assert.equal(await db.r.hget(keys().vpcTokens, "vpc\ntok-g"), next.vpc.id, "the token names the new one");
  // Another host's (or a bug's) write: the field holds something that is not a VPC id. No key is made of it.
  await db.r.hset(keys().vpcTokens, "vpc\ntok-x", "vpc-../../mvpc:tokens");
  const x = await s.createVpc(vpc("x"), "tok-x");
  assert.equal(x.created, true);
  assert.equal(await db.r.hget(keys().vpcTokens, "vpc\ntok-x"), x.vpc.id);
});

test("a subnet's client token works the same way", async () => {
  const s = new IpamStore(db.r);
  const { vpc: v } = await s.createVpc(vpc("sn"), "");
  const spec = subnetSpec(v.id, "a", "10.70.1.0/24");
  const a = await s.createSubnet(spec, "tok-s");
  const again = await s.createSubnet(spec, "tok-s");
  assert.deepEqual([a.created, again.created, again.subnet.id], [true, false, a.subnet.id]);
  // Named here, not through ipamKeys: a wrong layout in ipamKeys must fail this.
  assert.equal(keys().subnetTokens(v.id), ON_CLUSTER ? `mvpc:{${v.id}}:tokens` : "mvpc:tokens");
  assert.equal(
    await db.r.hget(keys().subnetTokens(v.id), "subnet\ntok-s"),
    a.subnet.id,
    "the token is in the VPC's tokens (the shared mvpc:tokens on one Redis)",
  );
});
