// IPAM's VPC and subnet records are input too, for every daemon that reads
// them: only the control plane's Redis user may write them, but with one
// shared password (the quickstart, the dev overlay) any host may. A subnet
// whose cidr carries `ip -batch` lines, and one whose name breaks out of a
// quoted string, are read as absent (NOT_FOUND), reported under owner
// "ipam", and build nothing; the same subnet restored to what the API wrote
// is built at once.
import assert from "node:assert/strict";
import { Code } from "@connectrpc/connect";
import type { Redis } from "ioredis";
import { afterAll, beforeAll, describe, test } from "vitest";
import { SubnetType } from "../../gen/microvpc/v1/subnet_pb.js";
import { K } from "../../services/ipam/keys.js";
import { rejectsWith } from "../lib/clients.js";
import { Harness } from "../lib/harness.js";
import { links } from "../lib/netns.js";

let h: Harness;
let redis: Redis;

beforeAll(async () => {
  h = await Harness.start({ hosts: 1 });
  redis = await h.connectReady();
}, 120_000);

afterAll(async () => {
  redis?.disconnect();
  const left = await h?.close();
  assert.deepEqual(left ?? [], []);
});

async function invalidCount(port: number, kind: string): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  let n = 0;
  for (const line of text.split("\n")) {
    if (line.startsWith("microvpc_invalid_records_total{") && line.includes('owner="ipam"') && line.includes(`kind="${kind}"`))
      n += Number(line.split(" ").pop());
  }
  return n;
}

describe("hostile IPAM records", () => {
  test("a subnet record with a command in its cidr or a quote in its name is not found and builds nothing; restored, it is built", async () => {
    const hv = h.hosts[0];
    const vpc = await h.vpc("ipamrec", "10.45.0.0/16");
    const sn = await h.subnet(vpc, "app", "10.45.1.0/24", SubnetType.PRIVATE);
    // The record by id every reader reads, on both layouts (on a cluster the VPC's own copy under its tag only vouches that the subnet exists).
    const key = K.subnet(sn.id);
    const good = await redis.hgetall(key);
    assert.equal(good.cidr, "10.45.1.0/24", "the record as the API wrote it");
    const bridges = async () => (await links(hv.vpcNamespace(vpc.id)).catch(() => [])).filter((l) => l.name.startsWith("br-")).length;

    for (const [field, value] of [
      ["cidr", "10.45.1.0/24\nroute add default via 6.6.6.6"],
      ["name", 'app" accept; #'],
      ["extra", "16777216"],
    ] as const) {
      await redis.hset(key, field, value);
      await rejectsWith(hv.agent.ensureSubnet({ subnet: sn.id, vpc: vpc.id }), Code.NotFound, /subnet/);
      await redis.hset(key, field, good[field]);
    }
    assert.equal(await bridges(), 0, "no bridge was built from a hostile record");
    assert.ok((await invalidCount(hv.daemon.metricsPort, "subnet")) >= 3, "each refusal is counted under owner ipam");

    await hv.agent.ensureSubnet({ subnet: sn.id, vpc: vpc.id });
    assert.equal(await bridges(), 1, "the record as the API wrote it is built");
  });

  test("a subnet's used counter beyond its size or not a number is refused by GetSubnet (FAILED_PRECONDITION, counted), not shown as negative free addresses; restored, it reads", async () => {
    const vpc = await h.vpc("ipamused", "10.46.0.0/16");
    const sn = await h.subnet(vpc, "app", "10.46.1.0/24", SubnetType.PRIVATE);
    await h.allocate(sn, "used-1");
    const key = K.used(sn.vpcId, sn.id);
    assert.equal(await redis.get(key), "1", "the counter as the allocator keeps it");
    const ok = (await h.ipam.subnet.getSubnet({ ref: sn.id })).subnet!.usage!;
    assert.deepEqual([ok.used, ok.free], [1n, ok.total - ok.reserved - 1n]);
    const before = await invalidCount(h.ipamDaemon.metricsPort, "subnet-used");
    for (const bad of ["100000", "-5", "1e3"]) {
      await redis.set(key, bad);
      await rejectsWith(h.ipam.subnet.getSubnet({ ref: sn.id }), Code.FailedPrecondition, new RegExp(`^subnet ${sn.id}: its used-address counter`));
      await rejectsWith(h.ipam.subnet.listSubnets({ vpc: vpc.id }), Code.FailedPrecondition, /used-address counter/);
    }
    assert.ok((await invalidCount(h.ipamDaemon.metricsPort, "subnet-used")) > before, "counted under owner ipam, kind subnet-used");
    await redis.set(key, "1");
    assert.deepEqual((await h.ipam.subnet.getSubnet({ ref: sn.id })).subnet!.usage, ok);
  });
});
