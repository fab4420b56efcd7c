// Peerings on a single Redis and on a real 3+3 Redis Cluster (issue 18,
// docs/redis-schema.md "Redis Cluster"): the same store calls on both. On a
// cluster a create reserves the peer's range in each VPC's slot (the VPC
// exists, its peers do not overlap), then claims name, pair and token with
// the record in the peerings' slot; a refusal takes the reservations back, a
// stopped create's reservation is skipped by readers and cleared once old.
import assert from "node:assert/strict";
import type { Redis } from "ioredis";
import { afterAll, beforeAll, describe, test, vi } from "vitest";
import { AlreadyExistsError, FailedPreconditionError, UnavailableError } from "../../services/common/errors.js";
import { vpcEvents } from "../../services/common/events.js";
import { cidr, ipToInt } from "../../services/common/validate.js";
import { IpamStore, type VpcRec } from "../../services/ipam/store.js";
import { naKeys } from "../../services/netagent/schema.js";
import { ackPeering, PEERING_KEYS, peeringKeys, peeringsOf, pruneAcks } from "../../services/peering/schema.js";
import { PeeringStore, PENDING_MS, type PeeringRec } from "../../services/peering/store.js";
import { connectReady, startRedis, startRedisCluster } from "../lib/redis.js";
import { takenBack } from "../lib/pending.js";

describe.each([["a single Redis"], ["a Redis Cluster (3 primaries, 3 replicas)"]])("on %s", (where) => {
  const onCluster = where.includes("Cluster");
  let stop: () => Promise<void>;
  const clients: Redis[] = [];
  let ipam: IpamStore;
  let pcx: PeeringStore;
  let n = 0;
  let url: string;

  beforeAll(async () => {
    if (onCluster) {
      const c = await startRedisCluster();
      stop = () => c.stop();
      url = c.url;
    } else {
      const s = await startRedis({ persistence: false });
      stop = () => s.stop();
      url = s.url;
    }
    clients.push(...(await Promise.all([0, 1, 2].map(() => connectReady({ url, commandTimeoutMs: 2000 })))));
    ipam = new IpamStore(clients[0]);
    pcx = new PeeringStore(clients[0]);
  }, 60_000);
  afterAll(async () => {
    for (const c of clients) c.disconnect();
    await stop?.();
  });

  async function vpc(cidrText: string): Promise<VpcRec> {
    const c = cidr("cidr", cidrText, { min: 8, max: 28 });
    return (await ipam.createVpc({ name: `v${n++}`, cidr: c.text, base: c.base, prefix: c.prefix, description: "", labels: [], publicCidr: false }, "")).vpc;
  }
  const spec = (a: VpcRec, b: VpcRec) => ({
    vpc1Id: a.id,
    vpc2Id: b.id,
    vpc1Cidr: a.cidr,
    vpc2Cidr: b.cidr,
    vpc1Allowed: [],
    vpc2Allowed: [],
    description: "",
    labels: [],
  });
  const peer = (st: PeeringStore, a: VpcRec, b: VpcRec, name: string, token = "") => st.create(spec(a, b), () => name, token);

  test("create, retry by token, name and pair taken, a peer overlapping another peer refused, delete; readers see it", async () => {
    const [a, b, c] = [await vpc("10.1.0.0/16"), await vpc("10.2.0.0/16"), await vpc("10.2.128.0/17")];
    const first = await peer(pcx, a, b, "a-b", "orch-1");
    assert.equal(first.created, true);
    const again = await peer(pcx, a, b, "a-b", "orch-1");
    assert.deepEqual([again.created, again.peering.id], [false, first.peering.id], "a retry by client token");
    await assert.rejects(peer(pcx, a, c, "a-b"), AlreadyExistsError, "the name");
    await assert.rejects(peer(pcx, b, a, "b-a"), /already peered/);
    await assert.rejects(
      peer(pcx, a, c, "a-c"),
      (e: Error) => e instanceof FailedPreconditionError && e.message.includes(`peering ${first.peering.id} already connects`),
    );
    assert.deepEqual(
      (await peeringsOf(clients[1], [a.id])).map((p) => p.id),
      [first.peering.id],
    );
    assert.deepEqual(
      (await pcx.list("", 10, b.id)).map((p) => p.name),
      ["a-b"],
    );
    await assert.rejects(ipam.deleteVpc(b.id), /is still peered/);
    assert.equal(await pcx.delete(first.peering), true);
    assert.deepEqual(await peeringsOf(clients[1], [a.id, b.id]), []);
    assert.equal((await peer(pcx, a, c, "a-c")).created, true, "c's range is free once a-b is gone");
    if (onCluster) assert.deepEqual(await clients[0].hkeys(PEERING_KEYS.cluster.peers(b.id)), [], "no entry of the deleted peering is left");
  });

  test("a host's ack: in its own key (its tag on a cluster), counted by convergence; none for a deleted peering; pruned", async () => {
    const [a, b] = [await vpc("10.31.0.0/16"), await vpc("10.32.0.0/16")];
    const { peering: p } = await peer(pcx, a, b, "acks");
    const r = clients[1];
    // Two hosts hold NICs of the pair (their overlay nominations name them).
    await r.hset(naKeys(r).overlayAddrs(a.id), "10.31.0.5", "ackhv1");
    await r.hset(naKeys(r).overlayAddrs(b.id), "10.32.0.5", "ackhv2");
    await ackPeering(r, p, "ackhv1");
    const key = peeringKeys(r).hostAcks("ackhv1");
    assert.equal(key, onCluster ? "mvpc:{host:ackhv1}:pcxacks" : "mvpc:host:ackhv1:pcxacks");
    assert.equal(await r.hget(key, p.id), String(p.createdMs));
    assert.deepEqual(await pcx.convergence(p), { hosts: ["ackhv1", "ackhv2"], pending: ["ackhv2"] }, "ackhv1 applied it, ackhv2 not yet");
    await ackPeering(r, p, "ackhv2");
    assert.deepEqual((await pcx.convergence(p)).pending, []);
    assert.equal(await pcx.delete(p), true);
    await ackPeering(r, p, "ackhv3");
    assert.equal(await r.hexists(peeringKeys(r).hostAcks("ackhv3"), p.id), 0, "no ack of a deleted peering");
    await pruneAcks(r, "ackhv1", new Set());
    assert.equal(await r.hexists(key, p.id), 0, "pruned once the host no longer has it");
  });

  test("two creates whose peers overlap, from two clients at once: one wins each time, the loser leaves nothing", async () => {
    const stores = clients.map((c) => new PeeringStore(c));
    for (let i = 0; i < 6; i++) {
      const [a, b, c] = [await vpc(`10.${10 + i}.0.0/16`), await vpc("10.50.0.0/16"), await vpc("10.50.0.0/17")];
      const r = await Promise.allSettled([peer(stores[0], a, b, `r${i}-ab`), peer(stores[1], a, c, `r${i}-ac`)]);
      const won = r.flatMap((x) => (x.status === "fulfilled" ? [x.value.peering] : []));
      assert.equal(won.length, 1, `trial ${i}: ${r.map((x) => (x.status === "rejected" ? String(x.reason) : "ok")).join(" / ")}`);
      // On a cluster the loser may meet the winner's reservation before its record: "under way, retry".
      for (const x of r)
        if (x.status === "rejected")
          assert.ok(x.reason instanceof FailedPreconditionError || (onCluster && x.reason instanceof UnavailableError), String(x.reason));
      assert.deepEqual(
        (await peeringsOf(clients[2], [a.id])).map((p: PeeringRec) => p.id),
        won.map((p) => p.id),
      );
      if (onCluster) {
        const loser = won[0].vpc2Id === b.id ? c : b;
        assert.deepEqual(await clients[0].hkeys(PEERING_KEYS.cluster.peers(loser.id)), [], `trial ${i}: the loser's reservation is gone`);
        assert.deepEqual(await clients[0].hkeys(PEERING_KEYS.cluster.peers(a.id)), [won[0].id]);
      }
    }
  });

  test.runIf(onCluster)("a stopped create's reservation: readers skip it; it blocks while young, and is cleared once old", async () => {
    const L = PEERING_KEYS.cluster;
    const [a, b, c] = [await vpc("10.60.0.0/16"), await vpc("10.61.0.0/16"), await vpc("10.61.0.0/16")];
    const ghost = "pcx-00000000dead";
    const entry = (ms: number) => JSON.stringify({ base: ipToInt("10.61.0.0"), size: 65536, ms });
    await clients[0].hset(L.peers(a.id), ghost, entry(Date.now()));
    assert.deepEqual(await peeringsOf(clients[0], [a.id]), [], "no record: not a peering");
    await assert.rejects(
      peer(pcx, a, b, "young"),
      (e: Error) => e instanceof UnavailableError && /under way/.test(e.message),
      "a young reservation may be a create under way",
    );
    await clients[0].hset(L.peers(a.id), ghost, entry(Date.now() - 2 * PENDING_MS));
    assert.equal((await peer(pcx, a, c, "old")).created, true);
    assert.equal(await clients[0].hexists(L.peers(a.id), ghost), 0, "the old one was cleared");
  });

  test.runIf(onCluster)("a VPC's peerings key of another Redis type refuses a create as FAILED_PRECONDITION naming it, not a raw WRONGTYPE", async () => {
    const L = PEERING_KEYS.cluster;
    const [a, b] = [await vpc("10.62.0.0/16"), await vpc("10.63.0.0/16")];
    await clients[0].set(L.peers(a.id), "not a hash");
    await assert.rejects(
      peer(pcx, a, b, "wrongtype"),
      (e: Error) => e instanceof FailedPreconditionError && e.message.includes(`(${L.peers(a.id)}) holds another Redis type than its schema says`),
    );
    assert.deepEqual(await clients[0].hkeys(L.peers(b.id)), [], "nothing reserved in b");
    await clients[0].del(L.peers(a.id));
    assert.equal((await peer(pcx, a, b, "wrongtype")).created, true);
  });

  test.runIf(onCluster)("two creates of one name on other pairs at once: the claim refuses one, whose reservations go back", async () => {
    const L = PEERING_KEYS.cluster;
    const stores = clients.map((c) => new PeeringStore(c));
    const [a, b, c, d] = [await vpc("10.70.0.0/16"), await vpc("10.71.0.0/16"), await vpc("10.72.0.0/16"), await vpc("10.73.0.0/16")];
    const r = await Promise.allSettled([peer(stores[0], a, b, "same"), peer(stores[1], c, d, "same")]);
    const won = r.flatMap((x) => (x.status === "fulfilled" ? [x.value.peering] : []));
    assert.equal(won.length, 1);
    for (const x of r) if (x.status === "rejected") assert.ok(x.reason instanceof AlreadyExistsError, String(x.reason));
    const losers = won[0].vpc1Id === a.id ? [c, d] : [a, b];
    for (const v of losers) assert.deepEqual(await clients[0].hkeys(L.peers(v.id)), [], `${v.name}: nothing reserved is left`);
  });

  test.runIf(onCluster)("a claim whose reply is lost keeps its reservations: the peering it wrote is whole", async () => {
    const L = PEERING_KEYS.cluster;
    const c = await connectReady({
      url: (clients[0] as unknown as { startupNodes: { host: string; port: number }[] }).startupNodes.map((x) => `redis-cluster://${x.host}:${x.port}`)[0],
      commandTimeoutMs: 2000,
    });
    try {
      const st = new PeeringStore(c);
      const scripts = (c as unknown as { scriptsSet: Record<string, { execute(c: unknown, a: unknown[], o: object): Promise<unknown> }> }).scriptsSet;
      c.mvpcClaimPeering = (async (...a: (string | number)[]) => {
        await scripts.mvpcClaimPeering.execute(c, [...a], { replyEncoding: "utf8" });
        throw new Error("Command timed out");
      }) as never;
      const [a, b] = [await vpc("10.80.0.0/16"), await vpc("10.81.0.0/16")];
      await assert.rejects(peer(st, a, b, "lost"), /timed out/);
      const seen = await peeringsOf(clients[1], [a.id]);
      assert.deepEqual(
        seen.map((p) => p.name),
        ["lost"],
        "the record was written, and both VPCs still list it",
      );
      assert.deepEqual(await clients[0].hkeys(L.peers(b.id)), [seen[0].id]);
    } finally {
      c.disconnect();
    }
  });

  /** performance.now() of this process `ms` ahead (as if a step had taken that long), until the returned restore. */
  function later(ms: number): () => void {
    const now = performance.now.bind(performance);
    const spy = vi.spyOn(performance, "now").mockImplementation(() => now() + ms);
    return () => spy.mockRestore();
  }

  test.runIf(onCluster)(
    "a claim that ends past PENDING_MS/2 after the reservations, written or its reply lost, is taken back: another create that swept a reservation meanwhile is the only peer of that range",
    async () => {
      const L = PEERING_KEYS.cluster;
      const c = await connectReady({ url, commandTimeoutMs: 2000 });
      const st = new PeeringStore(c);
      const claim = c.mvpcClaimPeering.bind(c);
      const drop = c.mvpcDropPeering.bind(c);
      try {
        for (const way of ["written", "reply lost", "take-back failed"] as const) {
          // b and c overlap: a VPC may be peered with one of them, never both.
          const [a, b, other] = [await vpc("10.100.0.0/16"), await vpc("10.101.0.0/16"), await vpc("10.101.0.0/17")];
          let swept: PeeringRec | undefined;
          let restore = () => {};
          // The claim stalls: meanwhile its reservations grow PENDING_MS old by the server's clock, and a create of a-other finds a's without a record, sweeps it and reserves an overlapping range in its place.
          c.mvpcClaimPeering = (async (...args: (string | number)[]) => {
            const [id] = await clients[1].hkeys(L.peers(b.id));
            for (const v of [a, b]) {
              const e = JSON.parse((await clients[1].hget(L.peers(v.id), id))!) as { ms: number };
              await clients[1].hset(L.peers(v.id), id, JSON.stringify({ ...e, ms: Date.now() - 2 * PENDING_MS }));
            }
            swept = (await peer(pcx, a, other, `swept-${n}`)).peering;
            const reply = await claim(...args);
            restore = later(PENDING_MS);
            if (way === "reply lost") throw new Error("Command timed out");
            return reply;
          }) as never;
          if (way === "take-back failed")
            c.mvpcDropPeering = (async () => {
              throw new Error("Connection is closed.");
            }) as never;
          const name = `late-${n}`;
          try {
            const late = peer(st, a, b, name);
            if (way === "take-back failed") {
              let named = "";
              await assert.rejects(late, (e: Error) => {
                named = /\(microvpc vpc peer delete (pcx-[0-9a-f]+)\), then retry$/.exec(e.message)?.[1] ?? "";
                return e instanceof UnavailableError && named !== "";
              });
              // What the message names is there to delete.
              const left = await pcx.get(named);
              assert.equal(left?.name, name);
              assert.equal(await pcx.delete(left!), true);
              continue;
            }
            await assert.rejects(late, takenBack(way));
          } finally {
            restore();
            c.mvpcDropPeering = drop;
          }
          assert.ok(swept, "the other create ran while the claim stalled");
          assert.deepEqual(
            (await peeringsOf(clients[2], [a.id, b.id])).map((p) => p.id),
            [swept.id],
            `${way}: the late peering is gone, the one that swept its reservation stands`,
          );
          assert.equal(await pcx.idByName(name), null, `${way}: its name is free`);
          assert.equal(await pcx.idByPair(a.id, b.id), null, `${way}: a and b are not peered`);
          assert.deepEqual(await clients[0].hkeys(L.peers(a.id)), [swept.id], `${way}: a reserves one peer range`);
          assert.deepEqual(await clients[0].hkeys(L.peers(b.id)), [], `${way}: nothing of the late create is left in b`);
        }
      } finally {
        c.disconnect();
      }
    },
  );

  test.runIf(onCluster)(
    "a claim that ends past PENDING_MS/2 with nothing overlapping let in keeps its record, reserved afresh: a retry by client token answered with it meanwhile does not lose it; a VPC deleted meanwhile still takes it back",
    async () => {
      const L = PEERING_KEYS.cluster;
      const c = await connectReady({ url, commandTimeoutMs: 2000 });
      const st = new PeeringStore(c);
      const retry = new PeeringStore(clients[2]);
      const claim = c.mvpcClaimPeering.bind(c);
      const age = async (id: string, ...vpcs: VpcRec[]) => {
        for (const v of vpcs) {
          const e = JSON.parse((await clients[1].hget(L.peers(v.id), id))!) as { ms: number };
          await clients[1].hset(L.peers(v.id), id, JSON.stringify({ ...e, ms: Date.now() - 2 * PENDING_MS }));
        }
      };
      const events = async (v: VpcRec, id: string) =>
        (await clients[1].xrange(vpcEvents(v.id), "-", "+")).filter(([, f]) => f.includes(id)).map(([, f]) => f[f.indexOf("kind") + 1]);
      try {
        for (const way of ["written", "reply lost"] as const) {
          const [a, b] = [await vpc("10.102.0.0/16"), await vpc("10.103.0.0/16")];
          const token = `kept-${way}`;
          let answered: PeeringRec | undefined;
          let restore = () => {};
          // The claim stalls past the deadline (its reservations PENDING_MS old by the server's clock, swept by nobody); the record lands, the client gives up waiting and retries with its token (answered with that record), then the first create finds itself late.
          c.mvpcClaimPeering = (async (...args: (string | number)[]) => {
            const [id] = await clients[1].hkeys(L.peers(b.id));
            await age(id, a, b);
            const reply = await claim(...args);
            answered = (await peer(retry, a, b, `kept-${n}`, token)).peering;
            restore = later(PENDING_MS);
            if (way === "reply lost") throw new Error("Command timed out");
            return reply;
          }) as never;
          let kept: { peering: PeeringRec; created: boolean };
          try {
            kept = await peer(st, a, b, `kept-${n}`, token);
          } finally {
            restore();
            c.mvpcClaimPeering = claim;
          }
          const id = kept.peering.id;
          assert.equal(kept.created, true, `${way}: the late create answers with the record it made`);
          assert.equal(answered?.id, id, `${way}: the retry was answered with the record the late create kept`);
          assert.equal((await pcx.get(id))?.name, kept.peering.name, `${way}: it still exists`);
          assert.equal(await pcx.idByPair(a.id, b.id), id);
          const [now] = await clients[0].time();
          for (const v of [a, b]) {
            assert.deepEqual(await clients[0].hkeys(L.peers(v.id)), [id], `${way}: ${v.name} reserves its peer`);
            const e = JSON.parse((await clients[0].hget(L.peers(v.id), id))!) as { ms: number };
            assert.ok(Number(now) * 1000 - e.ms < PENDING_MS / 2, `${way}: ${v.name}'s reservation was written afresh`);
            assert.deepEqual(await events(v, id), ["peering.created"], `${way}: ${v.name}'s hosts are told of it, once`);
            await assert.rejects(ipam.deleteVpc(v.id), (e: Error) => e instanceof FailedPreconditionError && /still peered/.test(e.message));
          }
          assert.equal(await pcx.delete(kept.peering), true);
          for (const v of [a, b]) assert.equal(await ipam.deleteVpc(v.id), true);
        }
        // A DeleteVpc swept the stalled reservation and deleted the VPC meanwhile: nothing to reserve afresh, the record goes.
        const [a, b] = [await vpc("10.104.0.0/16"), await vpc("10.105.0.0/16")];
        let restore = () => {};
        c.mvpcClaimPeering = (async (...args: (string | number)[]) => {
          const [id] = await clients[1].hkeys(L.peers(b.id));
          await age(id, a, b);
          assert.equal(await ipam.deleteVpc(a.id), true);
          const reply = await claim(...args);
          restore = later(PENDING_MS);
          return reply;
        }) as never;
        const name = `gone-${n}`;
        try {
          await assert.rejects(peer(st, a, b, name), takenBack("written"));
        } finally {
          restore();
          c.mvpcClaimPeering = claim;
        }
        assert.equal(await pcx.idByName(name), null, "its name is free");
        assert.equal(await pcx.idByPair(a.id, b.id), null);
        assert.deepEqual(await peeringsOf(clients[2], [b.id]), []);
        assert.deepEqual(await clients[0].hkeys(L.peers(b.id)), [], "nothing of it is left in b");
        assert.equal(await ipam.deleteVpc(b.id), true);
      } finally {
        c.disconnect();
      }
    },
  );

  test.runIf(onCluster)("DeleteVpc is refused while a peering create is under way in it, and sweeps what a stopped one left", async () => {
    const L = PEERING_KEYS.cluster;
    const a = await vpc("10.90.0.0/16");
    const ghost = "pcx-00000000beef";
    await clients[0].hset(L.peers(a.id), ghost, JSON.stringify({ base: ipToInt("10.91.0.0"), size: 65536, ms: Date.now() }));
    await assert.rejects(ipam.deleteVpc(a.id), /still peered \(1 peering\(s\), or creates of one under way\)/);
    await clients[0].hset(L.peers(a.id), ghost, JSON.stringify({ base: ipToInt("10.91.0.0"), size: 65536, ms: Date.now() - 2 * PENDING_MS }));
    assert.equal(await ipam.deleteVpc(a.id), true);
    assert.equal(await clients[0].exists(L.peers(a.id)), 0);
  });

  test.runIf(onCluster)("one client token from three clients at once: one peering; each call answers it or says retry", async () => {
    const stores = clients.map((c) => new PeeringStore(c));
    const [a, b] = [await vpc("10.95.0.0/16"), await vpc("10.96.0.0/16")];
    const r = await Promise.allSettled(stores.map((st) => peer(st, a, b, "tok", "orch-9")));
    const ids = new Set(r.flatMap((x) => (x.status === "fulfilled" ? [x.value.peering.id] : [])));
    assert.equal(ids.size, 1, r.map((x) => (x.status === "rejected" ? String(x.reason) : "ok")).join(" / "));
    for (const x of r) if (x.status === "rejected") assert.ok(x.reason instanceof UnavailableError || x.reason instanceof AlreadyExistsError, String(x.reason));
    assert.equal((await peeringsOf(clients[0], [a.id])).length, 1);
  });
});
