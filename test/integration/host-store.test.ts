// HostStore against a real redis-server: the writer refuses what would not
// read back, the reader skips an invalid record (and says why), keeps the last
// valid value of a record that turns invalid, and uses the rest; an address
// of a VPC is attached on one host at a time, also when two hosts race for
// it. No namespaces. host-store-on-cluster.test.ts runs the same cases on a
// Redis Cluster, where AttachNic's claim is a series of one-slot steps
// (netagent/store.ts CLAIM).
import assert from "node:assert/strict";
import type { Redis } from "ioredis";
import { afterAll, beforeAll, describe, onTestFinished, test } from "vitest";
import { InvalidArgumentError } from "../../services/common/errors.js";
import type { NicSpec, SubnetSpec } from "../../services/netagent/plan.js";
import { naKeys, type NetagentKeys } from "../../services/netagent/schema.js";
import { HostStore, locateNic } from "../../services/netagent/store.js";
import { ON_CLUSTER } from "../lib/on-cluster.js";
import { connectReady, startRedis, startRedisCluster } from "../lib/redis.js";
import { gated, intercepted } from "../lib/redis-intercept.js";

const HOST = "hsthv1";
const VPC = "vpc-0123456789ab";
let stop: () => Promise<void>;
let redis: Redis;
let redisUrl: string;
let hostKeys: NetagentKeys;

const subnet: SubnetSpec = { subnetId: "subnet-0123456789ab", vpcId: VPC, cidr: "10.5.1.0/24", gatewayCidr: "10.5.1.1/24", mtu: 1500 };
const nic = (n: number): NicSpec => ({
  nicId: `nic-00000000000${n}`,
  owner: `vm-${n}`,
  vpcId: VPC,
  subnetId: subnet.subnetId,
  kind: "veth",
  hostIf: `v00000000000${n}`,
  mac: `02:00:0a:05:01:0${n}`,
  address: `10.5.1.${10 + n}`,
  prefix: 24,
  gateway: "10.5.1.1",
  mtu: 1500,
  hostname: "",
  guestIf: "eth0",
  dns: ["10.5.0.2"],
  veth: { netnsPath: `/run/netns/vm${n}`, skipDefaultRoute: false },
  bandwidth: { ingressMbps: 0, egressMbps: 0 },
  createdMs: 1,
  clientToken: "",
});

beforeAll(async () => {
  const srv = ON_CLUSTER ? await startRedisCluster() : await startRedis({ appendfsync: "no" });
  stop = () => srv.stop();
  redisUrl = srv.url;
  redis = await connectReady({ url: srv.url });
  hostKeys = naKeys(redis);
}, 60_000);

afterAll(async () => {
  redis?.disconnect();
  await stop?.();
});

describe("HostStore", () => {
  test("the writer refuses a record that would not read back", async () => {
    const s = new HostStore(redis, HOST);
    await assert.rejects(s.putNic({ ...nic(1), hostIf: "x\nnetns exec a b" }), (e) => e instanceof InvalidArgumentError && /hostIf/.test(e.message));
    await assert.rejects(s.addNic({ ...nic(1), mac: 'x"' }), (e) => e instanceof InvalidArgumentError && /mac/.test(e.message));
    await assert.rejects(s.putSubnet({ ...subnet, gatewayCidr: "10.5.1.1/24 dev lo" }), /gatewayCidr/);
    await assert.rejects(s.putVpc({ vpcId: VPC, ns: "other", createdMs: 1 }), /ns/);
    assert.equal(await redis.exists(hostKeys.nics(HOST), hostKeys.subnets(HOST), hostKeys.vpcs(HOST)), 0, "nothing was written");
  });

  test("the reader skips invalid records with a reason, keeps a record's last valid value, uses the rest", async () => {
    const s = new HostStore(redis, HOST);
    await s.putVpc({ vpcId: VPC, ns: `mvpc-${HOST}-${VPC}`, createdMs: 1 });
    await s.putSubnet(subnet);
    assert.equal((await s.addNic(nic(1))).code, 1);
    assert.equal((await s.addNic(nic(2))).code, 1);
    let d = await s.load();
    assert.deepEqual([...d.nics.keys()].sort(), [nic(1).nicId, nic(2).nicId]);
    assert.deepEqual(d.invalid, []);
    // Hostile writes: a new NIC, one outside its subnet, a duplicate address, and nic 2 turned bad.
    await redis.hset(hostKeys.nics(HOST), "nic-000000000009", JSON.stringify({ ...nic(9), hostIf: 'v1" ; flush ruleset ; "' }));
    await redis.hset(hostKeys.nics(HOST), "nic-000000000008", JSON.stringify({ ...nic(8), address: "10.9.9.9" }));
    await redis.hset(hostKeys.nics(HOST), "nic-000000000007", JSON.stringify({ ...nic(7), address: nic(1).address }));
    await redis.hset(hostKeys.nics(HOST), nic(2).nicId, JSON.stringify({ ...nic(2), mtu: "9000" }));
    await redis.hset(hostKeys.subnets(HOST), "subnet-00000000000f", "{not json");
    d = await s.load();
    assert.deepEqual([...d.nics.keys()].sort(), [nic(1).nicId, nic(2).nicId], "only the good NICs, nic 2 at its last valid value");
    assert.equal(d.nics.get(nic(2).nicId)!.mtu, 1500);
    const why = new Map(d.invalid!.map((x) => [x.field, x.reason]));
    assert.match(why.get("nic-000000000009")!, /hostIf/);
    assert.match(why.get("nic-000000000008")!, /address/);
    assert.match(why.get("nic-000000000007")!, /already used/);
    assert.match(why.get(nic(2).nicId)!, /mtu/);
    assert.match(why.get("subnet-00000000000f")!, /not JSON/);
    // A fresh reader never saw nic 2 valid: it leaves it out.
    const fresh = await new HostStore(redis, HOST).load();
    assert.deepEqual([...fresh.nics.keys()], [nic(1).nicId]);
    assert.equal(await new HostStore(redis, HOST).getNic(nic(2).nicId), null, "getNic: an invalid record is no NIC");
    // Detaching forgets the last valid value.
    await s.delNic(nic(2));
    assert.ok(!(await s.load()).nics.has(nic(2).nicId));
  });

  test("locateNic refuses a malformed location, and a claim its host does not back", async () => {
    await redis.hset(hostKeys.claims(VPC), `${VPC}/10.5.1.50`, "hv1/nic-000000000001/extra");
    await redis.hset(hostKeys.claims(VPC), `${VPC}/10.5.1.51`, "hv 1/nic-000000000001");
    await redis.hset(hostKeys.claims(VPC), `${VPC}/10.5.1.52`, "hv1/nic-000000000001");
    assert.equal(await locateNic(redis, VPC, "10.5.1.50"), null);
    assert.equal(await locateNic(redis, VPC, "10.5.1.51"), null);
    // Well formed, but the claims are anyone's: it counts only where hv1's own index and record say so.
    assert.equal(await locateNic(redis, VPC, "10.5.1.52"), null, "a claim its host does not back locates nothing");
    await redis.hset(hostKeys.nicaddr("hv1"), `${VPC}/10.5.1.52`, "nic-000000000001");
    await redis.hset(hostKeys.nics("hv1"), "nic-000000000001", "{}");
    assert.deepEqual(await locateNic(redis, VPC, "10.5.1.52"), { hostId: "hv1", nicId: "nic-000000000001" });
    await redis.del(hostKeys.nicaddr("hv1"), hostKeys.nics("hv1"));
  });
});

describe("an address of a VPC is attached on one host at a time", () => {
  const A = "hsta";
  const B = "hstb";
  const addr = (n: NicSpec, address: string, id: string): NicSpec => ({ ...n, nicId: id, address, hostIf: `v${id.slice(4)}`, clientToken: "" });
  const field = (a: string) => `${VPC}/${a}`;

  test("another host's live NIC refuses it; once it is detached, or its claim is stale or forged, it is free", async () => {
    const [a, b] = [new HostStore(redis, A), new HostStore(redis, B)];
    const x = "10.5.1.100";
    const na = addr(nic(1), x, "nic-0000000a0001");
    assert.deepEqual(await a.addNic(na), { code: 1, id: na.nicId });
    assert.deepEqual(await locateNic(redis, VPC, x), { hostId: A, nicId: na.nicId });
    assert.equal(await redis.hget(hostKeys.overlayAddrs(VPC), x), A, "the overlay's nomination");
    const nb = addr(nic(2), x, "nic-0000000b0001");
    assert.deepEqual(await b.addNic(nb), { code: -2, id: `${A}/${na.nicId}` }, "held by A");
    assert.equal(await redis.hexists(hostKeys.nics(B), nb.nicId), 0, "the refused NIC left nothing on B");
    assert.equal(await redis.hexists(hostKeys.nicaddr(B), field(x)), 0);
    await a.delNic(na);
    assert.equal(await locateNic(redis, VPC, x), null, "the claim went with the NIC");
    assert.equal(await redis.hexists(hostKeys.overlayAddrs(VPC), x), 0);
    assert.equal((await b.addNic(nb)).code, 1, "free once detached");
    await b.delNic(nb);
    // A claim whose host does not hold that NIC (left by a stop, or written by a hostile host) blocks nobody.
    await redis.hset(hostKeys.claims(VPC), field(x), `${A}/nic-0000000a0009`);
    assert.equal((await b.addNic(nb)).code, 1, "a stale or forged claim blocks nobody");
    assert.deepEqual(await locateNic(redis, VPC, x), { hostId: B, nicId: nb.nicId });
    await b.delNic(nb);
  });

  test("this host's own NIC at the address refuses it, and keeps its claim", async () => {
    const a = new HostStore(redis, A);
    const x = "10.5.1.101";
    const n1 = addr(nic(1), x, "nic-0000000a0011");
    const n2 = addr(nic(2), x, "nic-0000000a0012");
    assert.equal((await a.addNic(n1)).code, 1);
    assert.deepEqual(await a.addNic(n2), { code: -1, id: n1.nicId });
    assert.deepEqual(await locateNic(redis, VPC, x), { hostId: A, nicId: n1.nicId }, "the claim names the NIC that holds it");
    assert.equal(await redis.hexists(hostKeys.nics(A), n2.nicId), 0);
    await a.delNic(n1);
  });

  test("a client token answers the first NIC, and finishes its claim", async () => {
    const a = new HostStore(redis, A);
    const x = "10.5.1.102";
    const n1 = { ...addr(nic(1), x, "nic-0000000a0021"), clientToken: "tok-102" };
    assert.equal((await a.addNic(n1)).code, 1);
    if (hostKeys.cluster) {
      // A first call that stopped after writing its record, before confirming its claim: pending, no nomination yet.
      await redis.hdel(hostKeys.overlayAddrs(VPC), x);
      await redis.hset(hostKeys.nicPending(A)!, n1.nicId, field(x));
    }
    assert.deepEqual(await a.addNic({ ...addr(nic(1), x, "nic-0000000a0022"), clientToken: "tok-102" }), { code: 0, id: n1.nicId });
    assert.equal(await redis.hget(hostKeys.overlayAddrs(VPC), x), A, "the retry finished what the first call left");
    if (hostKeys.cluster) assert.equal(await redis.hexists(hostKeys.nicPending(A)!, n1.nicId), 0, "no longer pending");
    await a.delNic(n1);
  });

  test("three hosts racing for one address: exactly one gets it, the others leave nothing", async () => {
    // Each host its own connection, and each of its scripts sent 0–3 ms late: the steps interleave differently every round.
    const conns = await Promise.all([A, B, "hstc"].map(() => connectReady({ url: redisUrl })));
    onTestFinished(() => conns.forEach((c) => c.disconnect()));
    const stores = [A, B, "hstc"].map((h, i) => new HostStore(jittered(conns[i]), h));
    for (let round = 0; round < 20; round++) {
      const x = `10.5.1.${120 + round}`;
      const nics = stores.map((_, i) => addr(nic(i + 1), x, `nic-00000${round.toString(16).padStart(2, "0")}0c00${i}`));
      const got = await Promise.all(stores.map((s, i) => s.addNic(nics[i])));
      const won = got.flatMap((g, i) => (g.code === 1 ? [i] : []));
      assert.equal(won.length, 1, `round ${round}: one winner, got ${JSON.stringify(got)}`);
      const w = won[0];
      for (const [i, g] of got.entries()) if (i !== w) assert.equal(g.code, -2, `round ${round}: host ${i} is refused (${JSON.stringify(g)})`);
      assert.deepEqual(await locateNic(redis, VPC, x), { hostId: stores[w].hostId, nicId: nics[w].nicId });
      for (const [i, s] of stores.entries()) {
        assert.equal(await redis.hexists(hostKeys.nics(s.hostId), nics[i].nicId), i === w ? 1 : 0, `round ${round}: host ${i}'s record`);
        assert.equal(await redis.hexists(hostKeys.nicaddr(s.hostId), field(x)), i === w ? 1 : 0, `round ${round}: host ${i}'s index`);
      }
      await stores[w].delNic(nics[w]);
    }
  });

  // A cluster's steps, made to interleave as they may when two hypervisors
  // are slow at the wrong moment. A single Redis runs one script.
  test.skipIf(!ON_CLUSTER)("a claim replaced between another host's claim and its record: the slower host undoes its record", async () => {
    const x = "10.5.1.140";
    const na = addr(nic(1), x, "nic-0000000a0041");
    const nb = addr(nic(2), x, "nic-0000000b0041");
    const hostStep = gate();
    // A stops after its claim, before its record (HOST declares its host's records first).
    const a = new HostStore(
      gated(redis, (args) => args[2] === hostKeys.nics(A), hostStep.wait),
      A,
    );
    const pa = a.addNic(na);
    await until(async () => (await redis.hget(hostKeys.claims(VPC), field(x))) === `${A}/${na.nicId}`);
    // B finds A's claim with no record behind it (stale, as far as B can tell), replaces it and attaches.
    assert.deepEqual(await new HostStore(redis, B).addNic(nb), { code: 1, id: nb.nicId });
    hostStep.open();
    assert.deepEqual(await pa, { code: -2, id: `${B}/${nb.nicId}` }, "A lost its claim, and says to whom");
    assert.equal(await redis.hexists(hostKeys.nics(A), na.nicId), 0, "A's record is undone");
    assert.equal(await redis.hexists(hostKeys.nicaddr(A), field(x)), 0);
    assert.deepEqual(await locateNic(redis, VPC, x), { hostId: B, nicId: nb.nicId });
    assert.equal(await redis.hget(hostKeys.overlayAddrs(VPC), x), B);
    await new HostStore(redis, B).delNic(nb);
  });

  test.skipIf(!ON_CLUSTER)("a replacement checked before the holder confirmed: it fails, and the holder keeps the address", async () => {
    const x = "10.5.1.141";
    const na = addr(nic(1), x, "nic-0000000a0042");
    const nb = addr(nic(2), x, "nic-0000000b0042");
    const hostStep = gate();
    const replace = gate();
    const a = new HostStore(
      gated(redis, (args) => args[2] === hostKeys.nics(A), hostStep.wait),
      A,
    );
    // B's replacement (CLAIM given the entry it checked: ARGV[3]) waits until A has confirmed.
    let checked = false;
    const b = new HostStore(
      gated(redis, (args) => args[1] === 2 && args[3] === hostKeys.claimVersions(VPC) && args[6] !== "" && (checked = true), replace.wait),
      B,
    );
    const pa = a.addNic(na);
    await until(async () => (await redis.hget(hostKeys.claims(VPC), field(x))) === `${A}/${na.nicId}`);
    const pb = b.addNic(nb);
    await until(async () => checked);
    hostStep.open();
    assert.deepEqual(await pa, { code: 1, id: na.nicId });
    replace.open();
    assert.deepEqual(await pb, { code: -2, id: `${A}/${na.nicId}` }, "B's check was out of date: it looks again, and finds A live");
    assert.equal(await redis.hexists(hostKeys.nics(B), nb.nicId), 0);
    assert.deepEqual(await locateNic(redis, VPC, x), { hostId: A, nicId: na.nicId });
    await a.delNic(na);
  });

  test.skipIf(!ON_CLUSTER)("an AttachNic again on the holding host while another host attaches: the claim stays with the live NIC", async () => {
    const x = "10.5.1.142";
    const n1 = addr(nic(1), x, "nic-0000000a0051");
    const n2 = addr(nic(2), x, "nic-0000000a0052");
    const nb = addr(nic(3), x, "nic-0000000b0051");
    const plain = new HostStore(redis, A);
    assert.equal((await plain.addNic(n1)).code, 1);
    // The same address again on A (no client token: a new NIC id), stopped before A's index refuses it.
    const hostStep = gate();
    let atHost = false;
    const again = new HostStore(
      gated(redis, (args) => args[2] === hostKeys.nics(A) && (atHost = true), hostStep.wait),
      A,
    ).addNic(n2);
    await until(async () => atHost);
    assert.equal(
      await redis.hget(hostKeys.claims(VPC), field(x)),
      `${A}/${n1.nicId}`,
      "the claim itself still names the live NIC (CLAIM leaves this host's entry)",
    );
    assert.deepEqual(await new HostStore(redis, B).addNic(nb), { code: -2, id: `${A}/${n1.nicId}` }, "B is refused meanwhile");
    hostStep.open();
    assert.deepEqual(await again, { code: -1, id: n1.nicId });
    assert.equal(await redis.hget(hostKeys.claims(VPC), field(x)), `${A}/${n1.nicId}`);
    assert.equal(await redis.hexists(hostKeys.nics(B), nb.nicId), 0);
    await plain.delNic(n1);
  });

  /** Waits until HOST is done for NIC `n` of host A: its record is there (still marked, unless confirmed since). */
  const hostDone = (n: NicSpec) => until(async () => (await redis.hexists(hostKeys.nics(A), n.nicId)) === 1);

  // A call whose CONFIRM never comes (its agent stopped, or Redis failed it): gated forever, as a stopped call. Returns once its HOST is done.
  const stopAfterHost = (n: NicSpec) => {
    void new HostStore(
      gated(redis, (args) => args[1] === 3 && args[2] === hostKeys.claims(VPC), new Promise<void>(() => {})),
      A,
    ).addNic(n);
    return hostDone(n);
  };

  test.skipIf(!ON_CLUSTER)("a NIC left pending is in no desired state; the next pass removes it, and its address is free again", async () => {
    const x = "10.5.1.143";
    const n1 = { ...addr(nic(1), x, "nic-0000000a0061"), clientToken: "tok-143" };
    await stopAfterHost(n1);
    const reader = new HostStore(redis, A);
    assert.ok(!(await reader.load()).nics.has(n1.nicId), "load() leaves a pending NIC out: no device, no binding");
    assert.equal(await reader.getNic(n1.nicId), null);
    assert.equal(await reader.nicRecord(n1.nicId), "absent");
    assert.equal(await redis.hget(hostKeys.overlayAddrs(VPC), x), null, "not confirmed: no nomination");
    assert.deepEqual(await reader.discardPending(), { removed: [n1.nicId], failed: [] });
    assert.equal(await redis.hexists(hostKeys.nics(A), n1.nicId), 0, "the record is gone");
    assert.equal(await redis.hexists(hostKeys.nicaddr(A), field(x)), 0);
    assert.equal(await redis.hexists(hostKeys.nicPending(A)!, n1.nicId), 0);
    assert.equal(await redis.hexists(hostKeys.claims(VPC), field(x)), 0, "and its claim");
    // The caller, answered with an error, attaches again.
    const again = { ...addr(nic(1), x, "nic-0000000a0062"), clientToken: "tok-143" };
    assert.deepEqual(await reader.addNic(again), { code: 1, id: again.nicId });
    assert.deepEqual(await reader.discardPending(), { removed: [], failed: [] }, "a confirmed NIC is never removed");
    assert.ok((await reader.load()).nics.has(again.nicId));
    await reader.delNic(again);
  });

  test.skipIf(!ON_CLUSTER)("a retry with the client token finishes a pending NIC, or removes it if another host's NIC holds the address", async () => {
    // (a) Nobody else wants the address: the retry answers with the first NIC, now confirmed.
    const x = "10.5.1.144";
    const n1 = { ...addr(nic(1), x, "nic-0000000a0071"), clientToken: "tok-144" };
    await stopAfterHost(n1);
    const a = new HostStore(redis, A);
    assert.deepEqual(await a.addNic({ ...addr(nic(1), x, "nic-0000000a0072"), clientToken: n1.clientToken }), { code: 0, id: n1.nicId });
    assert.equal(await redis.hexists(hostKeys.nicPending(A)!, n1.nicId), 0);
    assert.equal(await redis.hget(hostKeys.overlayAddrs(VPC), x), A, "confirmed by the retry");
    assert.ok((await a.load()).nics.has(n1.nicId));
    await a.delNic(n1);

    // (b) B took the address while A's record did not exist yet; A then wrote it and stopped before confirming.
    const y = "10.5.1.145";
    const na = { ...addr(nic(1), y, "nic-0000000a0073"), clientToken: "tok-145" };
    const nb = addr(nic(2), y, "nic-0000000b0073");
    const hostStep = gate();
    // A's HOST waits for hostStep, then its CONFIRM forever.
    let calls = 0;
    void new HostStore(
      gated(
        redis,
        (args) => (args[1] === 4 && args[2] === hostKeys.nics(A)) || (args[1] === 3 && args[2] === hostKeys.claims(VPC)),
        () => (++calls === 1 ? hostStep.wait : new Promise<void>(() => {})),
      ),
      A,
    ).addNic(na);
    await until(async () => (await redis.hget(hostKeys.claims(VPC), field(y))) === `${A}/${na.nicId}`);
    assert.equal((await new HostStore(redis, B).addNic(nb)).code, 1, "B found A's claim unbacked and took it");
    hostStep.open();
    await hostDone(na);
    assert.deepEqual(
      await a.addNic({ ...addr(nic(1), y, "nic-0000000a0079"), clientToken: na.clientToken }),
      { code: -2, id: `${B}/${nb.nicId}` },
      "the retry is refused, naming B's NIC",
    );
    assert.equal(await redis.hexists(hostKeys.nics(A), na.nicId), 0, "A's pending record is removed");
    assert.equal(await redis.hexists(hostKeys.nicPending(A)!, na.nicId), 0);
    assert.deepEqual(await locateNic(redis, VPC, y), { hostId: B, nicId: nb.nicId }, "B keeps the address");
    await new HostStore(redis, B).delNic(nb);
  });

  test.skipIf(!ON_CLUSTER)("HOST sent twice (a reconnect) is this NIC's own success; a pending NIC that refuses a new attach is removed first", async () => {
    // HOST run twice: the second answer names this very NIC (by its token, or by the index without one), which is not a refusal.
    for (const [x, id, token] of [
      ["10.5.1.146", "nic-0000000a0081", "tok-146"],
      ["10.5.1.147", "nic-0000000a0082", ""],
    ] as const) {
      const n1 = { ...addr(nic(1), x, id), clientToken: token };
      const twice = intercepted(redis, "eval", async (call, args) => {
        if (args[1] === 4 && args[2] === hostKeys.nics(A) && args[6] === id) await call(...args);
        return call(...args);
      });
      assert.deepEqual(await new HostStore(twice, A).addNic(n1), { code: 1, id }, `token ${JSON.stringify(token)}`);
      assert.equal(await redis.hget(hostKeys.overlayAddrs(VPC), x), A, "confirmed");
      assert.equal(await redis.hexists(hostKeys.nicPending(A)!, id), 0);
      await new HostStore(redis, A).delNic(n1);
    }

    // A NIC left pending at an address: the next attach of that address on this host removes it, and attaches.
    const y = "10.5.1.148";
    const n2 = addr(nic(2), y, "nic-0000000a0083");
    await stopAfterHost(n2);
    const n3 = addr(nic(3), y, "nic-0000000a0084");
    assert.deepEqual(await new HostStore(redis, A).addNic(n3), { code: 1, id: n3.nicId });
    assert.equal(await redis.hexists(hostKeys.nics(A), n2.nicId), 0, "the pending NIC is gone");
    assert.deepEqual(await locateNic(redis, VPC, y), { hostId: A, nicId: n3.nicId });
    await new HostStore(redis, A).delNic(n3);
  });

  test.skipIf(!ON_CLUSTER)("an attach whose last step's reply is lost fails and leaves nothing: no record, no claim, no mark", async () => {
    const x = "10.5.1.150";
    const n1 = addr(nic(1), x, "nic-0000000a00a1");
    // The pending mark's removal applies, and its reply is lost (a timeout): the call cannot know it was attached.
    const lossy = intercepted(redis, "hdel", async (call, args) => {
      const r = await call(...args);
      if (args[0] === hostKeys.nicPending(A) && args[1] === n1.nicId) throw new Error("Command timed out");
      return r;
    });
    await assert.rejects(new HostStore(lossy, A).addNic(n1), /timed out/);
    assert.equal(await redis.hexists(hostKeys.nics(A), n1.nicId), 0, "no record: the caller was told it failed");
    assert.equal(await redis.hexists(hostKeys.nicaddr(A), field(x)), 0);
    assert.equal(await redis.hexists(hostKeys.claims(VPC), field(x)), 0, "no claim");
    assert.equal(await redis.hexists(hostKeys.nicPending(A)!, n1.nicId), 0, "no mark");
    assert.equal((await new HostStore(redis, B).addNic(addr(nic(2), x, "nic-0000000b00a1"))).code, 1, "the address is free");
    await new HostStore(redis, B).delNic(addr(nic(2), x, "nic-0000000b00a1"));
  });

  test.skipIf(!ON_CLUSTER)("a garbled claim version (the hash is shared) wedges nothing", async () => {
    const x = "10.5.1.149";
    const a = new HostStore(redis, A);
    const n1 = addr(nic(1), x, "nic-0000000a0091");
    for (const bad of ["garbage", "-5", "1.5", "99999999999999999999"]) {
      await redis.hset(hostKeys.claimVersions(VPC)!, field(x), bad);
      // Half the time over a stale claim of B's: the compare-and-set path, given the garbled version it read.
      if (bad.length % 2) await redis.hset(hostKeys.claims(VPC), field(x), `${B}/nic-0000000b0091`);
      assert.deepEqual(await a.addNic(n1), { code: 1, id: n1.nicId }, `version ${bad}`);
      assert.match((await redis.hget(hostKeys.claimVersions(VPC)!, field(x)))!, /^[0-9]+$/, `version ${bad} replaced by a counter`);
      await a.delNic(n1);
    }
  });
});

/** `redis`, each of whose EVALs waits 0–3 ms first. */
function jittered(redis: Redis): Redis {
  return gated(
    redis,
    () => true,
    () => new Promise((r) => setTimeout(r, Math.random() * 3)),
  );
}

function gate(): { wait: Promise<void>; open: () => void } {
  let open!: () => void;
  const wait = new Promise<void>((r) => (open = r));
  return { wait, open };
}

async function until(ok: () => Promise<boolean>): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if (await ok()) return;
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error("timed out waiting");
}
