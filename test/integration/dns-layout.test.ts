// DNS's keys on a single Redis and on a real 3+3 Redis Cluster (issue 18,
// docs/redis-schema.md "Redis Cluster"): the same store calls on both. On a
// cluster a VPC's zone and configuration are under its hash tag, beside
// IPAM's record of the VPC, and the defaults under "{hosts}", so each script
// (the VPC exists, the name's owner, the resolver address is free) runs in
// one slot and announces its change on that slot's stream with its wake.
// A single Redis keeps the earlier names.
import assert from "node:assert/strict";
import type { Redis } from "ioredis";
import { afterAll, beforeAll, describe, test } from "vitest";
import { AlreadyExistsError, FailedPreconditionError, NotFoundError } from "../../services/common/errors.js";
import { REGISTRY_EVENTS, vpcEvents, wakeChannel } from "../../services/common/events.js";
import { connectRedis, duplicateClient, waitReady } from "../../services/common/redis.js";
import { ipToInt } from "../../services/common/validate.js";
import { DK, DK_CLUSTER, DnsStore } from "../../services/dns/store.js";
import { IpamStore, type SubnetRec, type VpcRec } from "../../services/ipam/store.js";
import { subnetSpec } from "../lib/ipam-specs.js";
import { startRedis, startRedisCluster } from "../lib/redis.js";

describe.each([["a single Redis"], ["a Redis Cluster (3 primaries, 3 replicas)"]])("on %s", (where) => {
  const onCluster = where.includes("Cluster");
  let stop: () => Promise<void>;
  let r: Redis;
  let dns: DnsStore;
  let ipam: IpamStore;
  let vpc: VpcRec;
  let sn: SubnetRec;

  beforeAll(async () => {
    // Both layouts in every run, whatever MICROVPC_TEST_ON_CLUSTER says: the
    // point is comparing them, so no startDaemonsRedis/scratchRedis here.
    if (onCluster) {
      const c = await startRedisCluster();
      stop = () => c.stop();
      r = connectRedis({ url: c.url, commandTimeoutMs: 2000 });
    } else {
      const s = await startRedis({ persistence: false });
      stop = () => s.stop();
      r = connectRedis({ url: s.url, commandTimeoutMs: 2000 });
    }
    await waitReady(r);
    ipam = new IpamStore(r);
    dns = new DnsStore(r);
    vpc = (
      await ipam.createVpc({ name: "zone", cidr: "10.80.0.0/16", base: ipToInt("10.80.0.0"), prefix: 16, description: "", labels: [], publicCidr: false }, "")
    ).vpc;
    sn = (await ipam.createSubnet(subnetSpec(vpc.id, "a", "10.80.1.0/24"), "")).subnet;
  }, 60_000);
  afterAll(async () => {
    r?.disconnect();
    await stop?.();
  });

  test("records: set, replace, owner conflict, list, delete by owner; each change on the VPC's stream", async () => {
    const K = onCluster ? DK_CLUSTER : DK;
    const globalBefore = await r.xlen("mvpc:events");
    const base = { vpcId: vpc.id, ttl: 60 };
    assert.equal((await dns.setRecord({ ...base, name: "web", address: "10.80.1.10", owner: "vm-1" })).created, true);
    assert.equal((await dns.setRecord({ ...base, name: "web", address: "10.80.1.11", owner: "vm-1" })).created, false);
    await assert.rejects(dns.setRecord({ ...base, name: "web", address: "10.80.1.12", owner: "vm-2" }), AlreadyExistsError);
    await dns.setRecord({ ...base, name: "db", address: "10.80.1.20", owner: "vm-2" });
    assert.deepEqual(
      (await dns.listRecords(vpc.id, "", 10)).map((x) => [x.name, x.address]),
      [
        ["db", "10.80.1.20"],
        ["web", "10.80.1.11"],
      ],
    );
    assert.equal(await r.hexists(K.records(vpc.id), "web"), 1, "under this layout's name");
    assert.equal(await r.exists((onCluster ? DK : DK_CLUSTER).records(vpc.id)), 0, "and not under the other's");
    assert.deepEqual(await dns.deleteRecords(vpc.id, "", "vm-2"), ["db"]);
    if (onCluster) assert.equal(await r.xlen("mvpc:events"), globalBefore, "a script on a cluster leaves the global stream (another slot) alone");
    await assert.rejects(dns.setRecord({ ...base, vpcId: "vpc-000000000000", name: "x", address: "10.0.0.1", owner: "o" }), NotFoundError);
    const events = (await r.xrange(vpcEvents(vpc.id), "-", "+")).map(([, f]) => Object.fromEntries(f.flatMap((x, i) => (i % 2 ? [] : [[x, f[i + 1]]]))));
    // Each names the records it changed: the resolvers read those again, not the whole zone (dns/host.ts).
    assert.deepEqual(
      events.filter((e) => e.kind === "dns.record").map((e) => e.names),
      ["web", "web", "db", "db"],
      "set, replace, set, delete",
    );
  });

  test("config: an allocated resolver address and the broadcast are refused; a free one is taken; the defaults on the fleet stream", async () => {
    const a = await ipam.allocate(sn, "vm-9", "r1", 50);
    await assert.rejects(dns.updateConfig(vpc.id, { resolver: { text: "10.80.1.50", int: ipToInt("10.80.1.50") } }), FailedPreconditionError);
    await assert.rejects(dns.updateConfig(vpc.id, { resolver: { text: "10.80.1.255", int: ipToInt("10.80.1.255") } }), /network or broadcast/);
    await dns.updateConfig(vpc.id, { resolver: { text: "10.80.1.53", int: ipToInt("10.80.1.53") }, forwarders: ["192.0.2.53:53"] });
    assert.equal((await dns.getConfig(vpc.id)).resolver, "10.80.1.53");
    await ipam.release(sn, a.alloc.index, "vm-9", "");
    // The defaults: on a cluster in the slot of the fleet stream, which their event goes to.
    const sub = duplicateClient(r);
    let woke = false;
    if (onCluster) {
      await waitReady(sub);
      sub.on("smessage", () => (woke = true));
      await sub.ssubscribe(wakeChannel(REGISTRY_EVENTS));
    }
    try {
      const before = (await r.xrange(REGISTRY_EVENTS, "-", "+")).length;
      await dns.updateConfig("", { forwarders: ["192.0.2.1:53"], ttl: 30 });
      assert.deepEqual(await dns.getConfig(""), { forwarders: ["192.0.2.1:53"], ttl: 30, updatedMs: (await dns.getConfig("")).updatedMs });
      assert.equal((await r.xrange(REGISTRY_EVENTS, "-", "+")).length, before + 1);
      if (onCluster) {
        for (let i = 0; i < 50 && !woke; i++) await new Promise((res) => setTimeout(res, 20));
        assert.ok(woke, "the fleet stream's wake was published");
      }
    } finally {
      sub.disconnect();
    }
  });

  test("DeleteVpc takes the zone and configuration with it", async () => {
    await dns.setRecord({ vpcId: vpc.id, ttl: 60, name: "left", address: "10.80.1.30", owner: "vm-3" });
    await ipam.deleteSubnet(sn.id);
    assert.equal(await ipam.deleteVpc(vpc.id), true);
    const K = onCluster ? DK_CLUSTER : DK;
    for (const key of [K.records(vpc.id), K.names(vpc.id), K.owners(vpc.id), K.config(vpc.id)]) assert.equal(await r.exists(key), 0, key);
    assert.equal(await r.hexists(K.records(vpc.id), "left"), 0);
  });
});
