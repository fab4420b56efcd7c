// Overlay address claims are not trusted: three simulated hypervisors joined
// by the WireGuard overlay (wireguard-go), real Redis, real packets. Host B
// (hv1, "compromised": it shares the Redis password) claims host A's VM
// address and the whole internet; neither A nor C installs any of it, and
// A's VM keeps talking to C's. Needs root; the root namespace is only read.
import assert from "node:assert/strict";
import type { Redis } from "ioredis";
import { afterAll, beforeAll, describe, test } from "vitest";
import type { Vpc } from "../../gen/microvpc/v1/vpc_pb.js";
import { emit } from "../../services/common/events.js";
import { wgName } from "../../services/netagent/overlay/wg.js";
import { naKeys, type NetagentKeys } from "../../services/netagent/schema.js";
import { Harness, type Hypervisor, type Vm } from "../lib/harness.js";
import { ping, routes, waitFor } from "../lib/netns.js";

let h: Harness;
let A: Hypervisor, B: Hypervisor, C: Hypervisor;
let vpc: Vpc;
let a0: Vm, b0: Vm, c0: Vm;
let r: Redis;
/** Where this Redis keeps the netagent's records (per host and per VPC hash tag on a cluster). */
let K: NetagentKeys;

beforeAll(async () => {
  h = await Harness.start({ hosts: 3, overlay: true, agentArgs: ["--reconcile-interval-ms", "2000"] });
  [A, B, C] = h.hosts;
  r = await h.connectReady();
  K = naKeys(r);
  vpc = await h.vpc("claims", "10.81.0.0/16");
  const sn = await h.subnet(vpc, "s1", "10.81.1.0/24");
  a0 = await h.vm(A, vpc, sn, "ca0");
  b0 = await h.vm(B, vpc, sn, "cb0");
  c0 = await h.vm(C, vpc, sn, "cc0");
}, 120_000);

afterAll(async () => {
  r?.disconnect();
  const left = await h?.close();
  assert.deepEqual(left ?? [], [], "every namespace of the run is gone");
}, 60_000);

async function reaches(from: Vm, to: Vm): Promise<boolean> {
  return (await ping(from.ns, to.address, { count: 2, intervalS: 0.1, deadlineS: 2 })).received > 0;
}

/** allowed-ips per peer host on x's WireGuard interface of the VPC (GetOverlayStatus reads `wg show … dump`). */
async function allowedIps(x: Hypervisor): Promise<Map<string, string[]>> {
  const st = (await x.agent.getOverlayStatus({ vpc: vpc.id })).vpcs[0];
  return new Map((st?.peers ?? []).map((p) => [p.hostId, [...p.allowedIps].sort()]));
}

/** Routes through x's WireGuard interface in its VPC namespace. */
async function tunnelRoutes(x: Hypervisor): Promise<string[]> {
  const dev = wgName(x.id, vpc.id);
  return (await routes(x.vpcNamespace(vpc.id)))
    .filter((l) => l.includes(`dev ${dev}`))
    .map((l) => l.split(" ")[0])
    .sort();
}

async function rejected(x: Hypervisor): Promise<{ address: string; hostId: string; reason: string }[]> {
  return (await x.agent.getOverlayStatus({ vpc: vpc.id })).vpcs[0]?.rejectedAddresses ?? [];
}

// To the VPC's change stream (and the global one), as a writer of the layout would: the hosts of the VPC look again at once.
const kick = () => emit(r, { vpcs: [vpc.id] }, ["kind", "nic.attached", "vpc", vpc.id, "host", B.id, "nic", "nic-000000000000"]);

describe("overlay address claims", () => {
  test("host B claims A's VM and 0.0.0.0/1: A and C install neither, A's VM still reaches C's, B gets nothing of A's", async () => {
    const pings = [a0, b0, c0];
    assert.ok(
      await waitFor(
        async () => {
          for (const x of pings) for (const y of pings) if (x !== y && !(await reaches(x, y))) return false;
          return true;
        },
        { timeoutMs: 20_000, intervalMs: 300 },
      ),
      "baseline: the mesh is up",
    );
    const addrs = K.overlayAddrs(vpc.id);
    // B rewrites the claim and the global location of A's VM, and adds
    // claims for half the internet each, an address outside the VPC, an
    // unallocated one and a malformed entry (a newline in the field).
    await r.hset(addrs, a0.address, B.id);
    await r.hset(K.claims(vpc.id), `${vpc.id}/${a0.address}`, `${B.id}/${b0.nicId}`);
    const hostile: Record<string, string> = {
      "0.0.0.0/1": B.id,
      "128.0.0.0/1": B.id,
      "10.99.0.5": B.id,
      "10.81.1.200": B.id,
      "10.81.1.7\nallowed-ips 0.0.0.0/0": B.id,
      "10.81.1.8": `${B.id} 0.0.0.0/0`,
    };
    for (const [k, v] of Object.entries(hostile)) await r.hset(addrs, k, v);
    await kick();

    for (const x of [A, C]) {
      assert.ok(
        await waitFor(async () => (await rejected(x)).length >= Object.keys(hostile).length + 1, { timeoutMs: 10_000, intervalMs: 250 }),
        `${x.id} reports the hostile claims: ${JSON.stringify(await rejected(x))}`,
      );
    }
    // Another two sync rounds with the claims in place.
    await new Promise((res) => setTimeout(res, 4500));
    const onC = await allowedIps(C);
    assert.deepEqual(onC.get(A.id), [`${a0.address}/32`], "C: A's VM stays A's");
    assert.deepEqual(onC.get(B.id), [`${b0.address}/32`], "C: B gets only its own VM");
    assert.deepEqual(await tunnelRoutes(C), [a0.address, b0.address].sort(), "C: one /32 per remote VM, no 0.0.0.0/1");
    const onA = await allowedIps(A);
    assert.deepEqual(onA.get(B.id), [`${b0.address}/32`], "A: B gets only its own VM, never A's local one");
    assert.ok(!(await tunnelRoutes(A)).includes(a0.address), "A never routes its own VM into the tunnel");
    assert.ok(!(await tunnelRoutes(A)).some((x) => x.includes("/")), "A: no prefix routes");
    const rc = await rejected(C);
    assert.ok(
      rc.some((x) => x.address === a0.address && x.hostId === B.id && /NIC of/.test(x.reason)),
      `C: B's claim of ${a0.address} rejected`,
    );
    assert.ok(rc.some((x) => x.address === "0.0.0.0/1" && /not an IPv4 address/.test(x.reason)));
    assert.ok(rc.some((x) => x.address === "10.99.0.5" && /outside/.test(x.reason)));
    assert.ok(rc.some((x) => x.address === "10.81.1.200" && /no host's NIC index/.test(x.reason)));
    assert.ok(
      rc.some((x) => /\\n/.test(x.address) && /not an IPv4 address/.test(x.reason)),
      "the malformed entry is shown escaped",
    );
    const st = await C.agent.getHostStatus({});
    assert.ok(
      st.invalidRecords.some((x) => x.kind === "overlay-addr" && x.field === "0.0.0.0/1"),
      "C: GetHostStatus lists the bad claims",
    );
    const metrics = await (await fetch(`http://127.0.0.1:${C.daemon.metricsPort}/metrics`)).text();
    assert.match(metrics, /microvpc_invalid_records_total\{[^}]*kind="overlay-addr"[^}]*\} [1-9]/);
    // The allowed flow, both ways, while the claims are in place.
    assert.ok(await reaches(a0, c0), "A's VM reaches C's");
    assert.ok(await reaches(c0, a0), "C's VM reaches A's (its packets go to A, not B)");
    assert.ok(await reaches(b0, c0), "B's own VM still works");

    // B also forges its own NIC index and a NIC record for A's VM address:
    // now the address is contested and goes to nobody (a visible denial of
    // service, never a hijack); A still keeps it local.
    const forged = `nic-${"f".repeat(12)}`;
    const rec = JSON.parse((await r.hget(K.nics(A.id), a0.nicId))!) as Record<string, unknown>;
    const copy = { ...rec, nicId: forged, kind: "tap", hostIf: `t${"f".repeat(12)}`, veth: undefined, tap: { multiQueue: false, queues: 1 }, clientToken: "" };
    await r.hset(K.nics(B.id), forged, JSON.stringify(copy));
    await r.hset(K.nicaddr(B.id), `${vpc.id}/${a0.address}`, forged);
    await kick();
    assert.ok(
      await waitFor(async () => (await rejected(C)).some((x) => x.address === a0.address && /contested/.test(x.reason)), {
        timeoutMs: 10_000,
        intervalMs: 250,
      }),
      `C: ${a0.address} is contested: ${JSON.stringify(await rejected(C))}`,
    );
    assert.ok(!(await allowedIps(C)).get(B.id)!.includes(`${a0.address}/32`), "C: never to B");
    assert.ok(!(await tunnelRoutes(A)).includes(a0.address), "A: still never into the tunnel");
    assert.deepEqual((await allowedIps(A)).get(B.id), [`${b0.address}/32`]);

    // B's forgeries go: A's VM is reachable from C again.
    await r.hdel(K.nicaddr(B.id), `${vpc.id}/${a0.address}`);
    await r.hdel(K.nics(B.id), forged);
    await r.hset(addrs, a0.address, A.id);
    await r.hdel(addrs, ...Object.keys(hostile));
    await kick();
    assert.ok(await waitFor(() => reaches(c0, a0), { timeoutMs: 15_000, intervalMs: 500 }), "C's VM reaches A's again");
    assert.ok(await waitFor(async () => (await rejected(C)).length === 0, { timeoutMs: 10_000, intervalMs: 250 }), "nothing rejected once the claims are gone");
    assert.deepEqual(await h.rootChanges(), [], "the root namespace did not change");
  }, 90_000);
});
