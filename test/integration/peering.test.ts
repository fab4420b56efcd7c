// VPC peering end to end: three simulated hypervisors joined by the
// WireGuard overlay, real Redis, real packets. Peered VMs live on different
// hosts, so the path crosses the overlay and the peering link
// (services/netagent/peering-plan.ts). Also VPC-internal DNS across hosts:
// a name registered for a VM on one host resolves from another host's
// resolver, in its VPC only. Needs root; the root namespace is only read,
// and the last test checks it did not change.
import assert from "node:assert/strict";
import { Code } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, test } from "vitest";
import { ResourceState } from "../../gen/microvpc/v1/common_pb.js";
import type { Peering } from "../../gen/microvpc/v1/peering_pb.js";
import type { Vpc } from "../../gen/microvpc/v1/vpc_pb.js";
import { rejectsWith } from "../lib/clients.js";
import { Harness, type Vm } from "../lib/harness.js";
import { createRequire } from "node:module";
import { DnsService } from "../../gen/microvpc/v1/dns_pb.js";
import { grpcClient } from "../../services/common/client.js";
import { startDaemon } from "../lib/daemon.js";
import { httpGet, ipn, nsExec, ping, startHttpServer, trackChild, waitFor } from "../lib/netns.js";

let h: Harness;
let A: Vpc, B: Vpc, C: Vpc;
// a0 on host 0 and a1 on host 1 (A 10.70.1.0/24); b1 (B 10.71.1.0/24, not
// allowed across A–B) on host 1; b2 (B 10.71.2.0/24, allowed) on host 2;
// c0 on host 0 and c2 on host 2 (C).
let a0: Vm, a1: Vm, b1: Vm, b2: Vm, c0: Vm, c2: Vm;
let ab: Peering;

beforeAll(async () => {
  h = await Harness.start({ hosts: 3, overlay: true, agentArgs: ["--reconcile-interval-ms", "2000"] });
  A = await h.vpc("pa", "10.70.0.0/16");
  B = await h.vpc("pb", "10.71.0.0/16");
  C = await h.vpc("pc", "10.72.0.0/16");
  // A VPC overlapping A: it exists, and peering A with it is refused below.
  await h.vpc("pd", "10.70.0.0/16");
  const sA = await h.subnet(A, "s1", "10.70.1.0/24");
  const sB1 = await h.subnet(B, "s1", "10.71.1.0/24");
  const sB2 = await h.subnet(B, "s2", "10.71.2.0/24");
  const sC = await h.subnet(C, "s1", "10.72.1.0/24");
  a0 = await h.vm(0, A, sA, "a0");
  a1 = await h.vm(1, A, sA, "a1");
  b1 = await h.vm(1, B, sB1, "b1");
  b2 = await h.vm(2, B, sB2, "b2");
  c0 = await h.vm(0, C, sC, "c0");
  c2 = await h.vm(2, C, sC, "c2");
  for (const vm of [a0, a1, b1, b2, c0, c2]) await startHttpServer(vm.ns, vm.name, 80);
});

afterAll(async () => {
  const left = await h?.close();
  assert.deepEqual(left ?? [], [], "every namespace of the run is gone");
});

async function reaches(from: Vm, to: Vm): Promise<boolean> {
  return (await ping(from.ns, to.address, { count: 2, intervalS: 0.1, deadlineS: 2 })).received > 0;
}

/** Waits until `from` reaches `to` (true) or the time is up (false). */
function comesUp(from: Vm, to: Vm, timeoutMs = 15_000): Promise<boolean> {
  return waitFor(() => reaches(from, to), { timeoutMs, intervalMs: 300 });
}

async function peeringState(id: string): Promise<Peering> {
  return (await h.ipam.peering.getPeering({ ref: id })).peering!;
}

describe("peering API", () => {
  test("bad requests get the right code and create nothing", async () => {
    const p = h.ipam.peering;
    await rejectsWith(p.createPeering({ vpc1: "pa", vpc2: "pa" }), Code.InvalidArgument, /itself/);
    await rejectsWith(p.createPeering({ vpc1: "pa", vpc2: "nosuchvpc" }), Code.NotFound, /nosuchvpc/);
    await rejectsWith(p.createPeering({ vpc1: "pa", vpc2: "vpc-000000000000" }), Code.NotFound);
    await rejectsWith(p.createPeering({ vpc1: "pa", vpc2: "Bad VPC!" }), Code.InvalidArgument);
    await rejectsWith(p.createPeering({ vpc1: "pa", vpc2: "pd" }), Code.FailedPrecondition, /overlap/);
    await rejectsWith(p.createPeering({ vpc1: "pa", vpc2: "pb", vpc1AllowedCidrs: ["10.71.1.0/24"] }), Code.InvalidArgument, /not inside VPC pa/);
    await rejectsWith(p.createPeering({ vpc1: "pa", vpc2: "pb", vpc2AllowedCidrs: ["10.71.1.0/33"] }), Code.InvalidArgument, /vpc2_allowed_cidrs/);
    await rejectsWith(p.createPeering({ vpc1: "pa", vpc2: "pb", vpc2AllowedCidrs: ["10.71.1.1/24"] }), Code.InvalidArgument, /host bits/);
    await rejectsWith(p.createPeering({ vpc1: "pa", vpc2: "pb", name: "Bad Name" }), Code.InvalidArgument, /name/);
    await rejectsWith(p.getPeering({ ref: "pcx-000000000000" }), Code.NotFound);
    await rejectsWith(p.getPeering({ vpc1: "pa" }), Code.InvalidArgument, /vpc2/);
    await rejectsWith(p.getPeering({ ref: "x", vpc1: "pa", vpc2: "pb" }), Code.InvalidArgument);
    assert.equal((await p.listPeerings({})).peerings.length, 0, "nothing was created");
    assert.equal((await p.deletePeering({ vpc1: "pa", vpc2: "pb" })).deleted, false);
  });

  test("before any peering, the VPCs do not reach each other", async () => {
    assert.ok(await comesUp(a0, a1), "A's own mesh works (a0 → a1 across hosts)");
    assert.equal(await reaches(a0, b2), false, "a0 → b2");
    assert.equal(await reaches(b2, a0), false, "b2 → a0");
  });
});

describe("A–B peering limited to allowed CIDRs", () => {
  test("allowed CIDRs reach each other across hosts, both ways, ICMP and TCP; the rest does not", async () => {
    const res = await h.ipam.peering.createPeering({
      vpc1: "pa",
      vpc2: "pb",
      vpc1AllowedCidrs: ["10.70.1.0/24"],
      vpc2AllowedCidrs: ["10.71.2.0/24"],
      clientToken: "ab-1",
    });
    ab = res.peering!;
    assert.match(ab.id, /^pcx-[0-9a-f]{12}$/);
    assert.equal(ab.name, "pa--pb");
    assert.equal(ab.vpc1Id, A.id);
    assert.deepEqual(ab.vpc2AllowedCidrs, ["10.71.2.0/24"]);
    const t0 = Date.now();
    assert.ok(await comesUp(a0, b2), "a0 (host 0) → b2 (host 2)");
    const ms = Date.now() - t0;
    assert.ok(await comesUp(b2, a0), "b2 → a0");
    assert.ok(await comesUp(a1, b2), "a1 (host 1) → b2 (host 2)");
    assert.equal(await httpGet(a0.ns, `http://${b2.address}/`), "b2", "TCP a0 → b2");
    assert.equal(await httpGet(b2.ns, `http://${a1.address}/`), "a1", "TCP b2 → a1");
    // b1 is in B but outside the allowed CIDRs: neither direction, even on a shared host (a1 and b1 are both on host 1).
    assert.equal(await reaches(a0, b1), false, "a0 → b1 (not allowed)");
    assert.equal(await reaches(a1, b1), false, "a1 → b1 (same host, not allowed)");
    assert.equal(await reaches(b1, a1), false, "b1 → a1 (not allowed)");
    assert.equal(await httpGet(b1.ns, `http://${a0.address}/`, 1500), null, "TCP b1 → a0");
    // A destination in the peer VPC but not allowed is refused at once, not sent to a default route.
    const un = await ping(a0.ns, b1.address, { count: 1, deadlineS: 2 });
    assert.equal(un.received, 0);
    // The peering reports AVAILABLE once every host with NICs of A or B applied it.
    assert.ok(await waitFor(async () => (await peeringState(ab.id)).state === ResourceState.AVAILABLE, { timeoutMs: 15_000, intervalMs: 300 }), "AVAILABLE");
    assert.equal((await peeringState(ab.id)).statusMessage, "");
    console.log(`# a0 → b2 reachable ${ms} ms after CreatePeering`);
  });

  test("the same pair again is ALREADY_EXISTS; the same client token returns the peering; lookups by pair work either way round", async () => {
    await rejectsWith(h.ipam.peering.createPeering({ vpc1: "pb", vpc2: "pa" }), Code.AlreadyExists, /already peered/);
    const again = await h.ipam.peering.createPeering({
      vpc1: "pa",
      vpc2: "pb",
      vpc1AllowedCidrs: ["10.70.1.0/24"],
      vpc2AllowedCidrs: ["10.71.2.0/24"],
      clientToken: "ab-1",
    });
    assert.equal(again.peering!.id, ab.id);
    assert.equal((await h.ipam.peering.getPeering({ vpc1: "pb", vpc2: "pa" })).peering!.id, ab.id);
    assert.equal((await h.ipam.peering.getPeering({ ref: "pa--pb" })).peering!.id, ab.id);
    assert.deepEqual(
      (await h.ipam.peering.listPeerings({ vpc: "pa" })).peerings.map((p) => p.id),
      [ab.id],
    );
  });

  test("a peered VPC cannot be deleted", async () => {
    await rejectsWith(h.ipam.vpc.deleteVpc({ ref: "pa" }), Code.FailedPrecondition, /peer/);
  });
});

describe("non-transitive", () => {
  test("A–B and B–C do not connect A and C; B–C works on one host and across hosts", async () => {
    const bc = (await h.ipam.peering.createPeering({ vpc1: "pb", vpc2: "pc" })).peering!;
    assert.deepEqual(bc.vpc1AllowedCidrs, [], "whole VPCs");
    assert.ok(await comesUp(b2, c2), "b2 → c2 (both on host 2)");
    assert.ok(await comesUp(b2, c0), "b2 (host 2) → c0 (host 0)");
    assert.ok(await comesUp(c0, b2), "c0 → b2");
    assert.ok(await comesUp(b1, c0), "b1 (host 1) → c0 (host 0): B–C allows all of B");
    for (const [x, y] of [
      [a0, c0],
      [a0, c2],
      [a1, c2],
      [c0, a0],
      [c2, a1],
    ] as const) {
      assert.equal(await reaches(x, y), false, `${x.name} → ${y.name} must not pass through B`);
      assert.equal(await httpGet(x.ns, `http://${y.address}/`, 1000), null, `TCP ${x.name} → ${y.name}`);
    }
    // A–B still works beside it.
    assert.ok(await reaches(a0, b2), "a0 → b2 still");
    // Even if A's namespace sent C-bound packets into its link to B (host 0
    // holds A, C, and B for the B–C peering), B's side of that link drops them.
    const aNs = h.hosts[0].vpcNamespace(A.id);
    const bNs = h.hosts[0].vpcNamespace(B.id);
    const link = JSON.parse((await ipn(aNs, ["-j", "link", "show"])).stdout)
      .map((l: { ifname: string }) => l.ifname)
      .find((n: string) => /^pc[0-9a-f]{12}$/.test(n));
    assert.ok(link, "A–B link on host 0");
    const drops = async () => {
      const out = (await nsExec(bNs, "nft", ["list", "chain", "inet", "microvpc_peering", "forward"])).stdout;
      const m = new RegExp(`iifname "${link}" ip daddr != @\\S+ counter packets (\\d+)`).exec(out);
      return Number(m?.[1] ?? -1);
    };
    const before = await drops();
    assert.ok(before >= 0, "the destination filter is in B's namespace");
    await ipn(aNs, ["route", "add", "10.72.1.0/24", "via", "169.254.253.1", "dev", link, "onlink"]);
    try {
      assert.equal(await reaches(a0, c0), false, "a0 → c0 with a forced route");
      assert.ok((await drops()) >= before + 2, "B dropped the C-bound packets at the link");
    } finally {
      await ipn(aNs, ["route", "del", "10.72.1.0/24", "dev", link]);
    }
    await h.ipam.peering.deletePeering({ ref: bc.id });
    assert.ok(await waitFor(async () => !(await reaches(b2, c2)), { timeoutMs: 15_000, intervalMs: 300 }), "B–C deleted: b2 → c2 stops");
  });
});

/** One UDP A query with dns-packet from inside a VM; the addresses answered, or the rcode, or "timeout". */
const QUERY = `
const p = require(${JSON.stringify(createRequire(import.meta.url).resolve("dns-packet"))});
const [server, name] = process.argv.slice(1);
const s = require("node:dgram").createSocket("udp4");
s.on("message", (b) => { const r = p.decode(b); const a = r.answers.filter((x) => x.type === "A").map((x) => x.data); process.stdout.write(a.length ? a.join(",") : r.rcode); process.exit(0); });
setTimeout(() => { process.stdout.write("timeout"); process.exit(0); }, 2000);
s.send(p.encode({ type: "query", id: 7, flags: p.RECURSION_DESIRED, questions: [{ type: "A", name, class: "IN" }] }), 53, server);
`;

describe("VPC-internal DNS across hosts", () => {
  test("a name of a VM on host 0 resolves from hosts 1 and 2 in its VPC, and nowhere else", async () => {
    // A gateway (the resolver) on every host; records as the vmm writes them.
    // Gateways only: no firewall here, so the harness's unbound NICs stay open.
    for (const hv of h.hosts) {
      const d = await startDaemon("gateway", await h.gatewayFlags(hv));
      trackChild(d.proc);
    }
    const dns = grpcClient(DnsService, { address: h.ipamDaemon.address, timeoutMs: 20_000 });
    await dns.setDnsRecord({ vpc: "pa", name: "a0", address: a0.address, owner: "vm-a0" });
    await dns.setDnsRecord({ vpc: "pb", name: "b2", address: b2.address, owner: "vm-b2" });
    const ask = async (vm: Vm, server: string, name: string) =>
      (await nsExec(vm.ns, process.execPath, ["-e", QUERY, server, name], { check: false, timeoutMs: 10_000 })).stdout;
    const eventually = (vm: Vm, server: string, name: string, want: string) =>
      waitFor(async () => (await ask(vm, server, name)) === want, { timeoutMs: 15_000, intervalMs: 300 });
    // Each VPC's resolver is its base + 2.
    assert.ok(await eventually(a1, "10.70.0.2", "a0.pa.internal", a0.address), "a1 (host 1) resolves a0 (host 0)");
    assert.ok(await eventually(a0, "10.70.0.2", "a0.pa.internal", a0.address), "a0 resolves itself on host 0");
    assert.ok(await eventually(b2, "10.71.0.2", "b2.pb.internal", b2.address), "b2 (host 2) resolves its own name");
    // Another VPC's zone is not answered, even on a host holding both VPCs.
    assert.equal(await ask(b1, "10.71.0.2", "a0.pa.internal"), "NXDOMAIN", "b1 (host 1, VPC B) cannot resolve A's names");
    assert.equal(await ask(a1, "10.70.0.2", "b2.pb.internal"), "NXDOMAIN", "a1 cannot resolve B's names");
    // Records follow the VM: moved, every host's resolver answers the new address.
    await dns.setDnsRecord({ vpc: "pa", name: "a0", address: a1.address, owner: "vm-a0" });
    assert.ok(await eventually(a1, "10.70.0.2", "a0.pa.internal", a1.address), "a changed record reaches host 1");
    await dns.deleteDnsRecord({ vpc: "pa", owner: "vm-a0" });
    assert.ok(await eventually(a1, "10.70.0.2", "a0.pa.internal", "NXDOMAIN"), "a deleted record is gone on host 1");
    await dns.deleteDnsRecord({ vpc: "pb", owner: "vm-b2" });
  });
});

describe("agent crash", () => {
  test("a SIGKILLed agent's host keeps forwarding across the peering; restarted, it adopts the link without rebuilding it", async () => {
    const hv = h.hosts[2];
    const ns = hv.vpcNamespace(B.id);
    const ifindex = async () => {
      const links = JSON.parse((await ipn(ns, ["-j", "link", "show"])).stdout) as { ifname: string; ifindex: number }[];
      return links.find((l) => /^pc[0-9a-f]{12}$/.test(l.ifname))?.ifindex;
    };
    const before = await ifindex();
    assert.ok(before, "peering link in B's namespace on host 2");
    await hv.kill();
    assert.ok(await reaches(a0, b2), "a0 → b2 with host 2's agent dead");
    await hv.start();
    // Two reconcile passes (2 s each) later, the same link is still there.
    await new Promise((r) => setTimeout(r, 5000));
    assert.equal(await ifindex(), before, "link adopted, not recreated");
    assert.ok(await reaches(a0, b2), "a0 → b2 after the restart");
    assert.ok(await reaches(b2, a1), "b2 → a1 after the restart");
  });
});

describe("deleting a peering", () => {
  test("cuts the traffic and removes what it built on every host", async () => {
    const ns = h.hosts[2].vpcNamespace(A.id);
    // Host 2 holds no A NIC: A's namespace there exists only for the peering (its link to B).
    const before = await ipn(ns, ["-j", "link", "show"], { check: false });
    assert.match(before.stdout, /"ifname":"pc[0-9a-f]{12}"/, "peering link on host 2");
    assert.equal((await h.ipam.peering.deletePeering({ ref: ab.id })).deleted, true);
    assert.ok(await waitFor(async () => !(await reaches(a0, b2)), { timeoutMs: 15_000, intervalMs: 300 }), "a0 → b2 stops");
    assert.equal(await reaches(b2, a0), false, "b2 → a0");
    assert.ok(
      await waitFor(async () => !(await h.hosts[2].vpcNamespaces()).includes(ns), { timeoutMs: 15_000, intervalMs: 300 }),
      "A's namespace leaves host 2",
    );
    const bNs = h.hosts[2].vpcNamespace(B.id);
    const links = await ipn(bNs, ["-j", "link", "show"]);
    assert.doesNotMatch(links.stdout, /"ifname":"pc[0-9a-f]{12}"/, "no peering link left in B's namespace");
    const routes = await ipn(bNs, ["-j", "route", "show", "proto", "77"]);
    assert.equal(routes.stdout.trim(), "[]", "no peering route left");
    assert.equal((await h.ipam.peering.deletePeering({ ref: ab.id })).deleted, false, "deleting again is a no-op");
    await h.ipam.vpc.deleteVpc({ ref: "pd" });
  });

  test("the root namespace did not change", async () => {
    assert.deepEqual(await h.rootChanges(), []);
  });
});
