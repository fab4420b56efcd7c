// Records read from Redis are input, on a running host: hostile NIC, subnet,
// VPC and peering records written straight into Redis (as a compromised
// hypervisor sharing the Redis password could) never reach a command. Real
// redis-server, ipam, netagent and firewall daemons, real namespaces. Needs
// root; everything carries the run's prefix and goes at the end.
import assert from "node:assert/strict";
import { existsSync, rmSync } from "node:fs";
import { randomBytes } from "node:crypto";
import type { Redis } from "ioredis";
import { afterAll, beforeAll, describe, test } from "vitest";
import { grpcClient } from "../../services/common/client.js";
import { naKeys } from "../../services/netagent/schema.js";
import { peeringKeys } from "../../services/peering/schema.js";
import { Direction, FirewallService, Protocol } from "../../gen/microvpc/v1/firewall_pb.js";
import type { Daemon } from "../lib/daemon.js";
import { bindRequest, Harness, type Hypervisor, type Vm } from "../lib/harness.js";
import { links, nsExec, ping, routes, waitFor } from "../lib/netns.js";

let h: Harness;
let hv: Hypervisor;
let fwd: Daemon;
let redis: Redis;
let vm0: Vm;
let vm1: Vm;
const tag = randomBytes(4).toString("hex");
/** Files a successful injection would create. */
const markers = [0, 1, 2, 3, 4].map((i) => `/tmp/mvpc-hostile-${tag}-${i}`);

beforeAll(async () => {
  h = await Harness.start({ hosts: 1, agentArgs: ["--reconcile-interval-ms", "1000"] });
  hv = h.hosts[0];
  fwd = await h.firewall(hv, { driftMs: 2000 });
  redis = await h.connectReady();
  const vpc = await h.vpc("hostile", "10.77.0.0/16");
  const sn = await h.subnet(vpc, "s1", "10.77.1.0/24");
  vm0 = await h.vm(hv, vpc, sn, "h0");
  vm1 = await h.vm(hv, vpc, sn, "h1");
  // The firewall in force: ICMP within the VPC is the allowed flow.
  const fw = grpcClient(FirewallService, { address: fwd.address, timeoutMs: 20_000 });
  const sg = (
    await fw.createSecurityGroup({
      vpc: vpc.id,
      name: "icmp",
      rules: [{ direction: Direction.INGRESS, protocol: Protocol.ICMP, peer: { case: "cidr", value: "10.77.0.0/16" } }],
    })
  ).securityGroup!.id;
  for (const vm of [vm0, vm1]) await fw.bindNic(bindRequest(vm, [sg]));
}, 120_000);

afterAll(async () => {
  redis?.disconnect();
  await fwd?.stop().catch(() => undefined);
  const left = await h?.close();
  for (const m of markers) rmSync(m, { force: true });
  assert.deepEqual(left ?? [], [], "every namespace of the run is gone");
}, 60_000);

async function reaches(from: Vm, to: Vm): Promise<boolean> {
  return (await ping(from.ns, to.address, { count: 2, intervalS: 0.1, deadlineS: 2 })).received > 0;
}

async function metric(d: Daemon, kind: string): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${d.metricsPort}/metrics`)).text();
  const re = new RegExp(`^microvpc_invalid_records_total\\{[^}]*kind="${kind}"[^}]*\\} (\\d+)`, "m");
  return Number(re.exec(text)?.[1] ?? 0);
}

describe("hostile records written straight into Redis", () => {
  test("nothing reaches a command, no file appears, the metric and status show them, the good NICs keep working", async () => {
    assert.ok(await waitFor(() => reaches(vm0, vm1), { timeoutMs: 10_000, intervalMs: 300 }), "baseline: h0 reaches h1");
    // Both readers (agent and firewall) have read both good NICs once: what
    // they keep when a record later turns invalid.
    const ns0 = vm0.vpcNs;
    assert.ok(
      await waitFor(
        async () => {
          const r = (await nsExec(ns0, "nft", ["list", "set", "bridge", "microvpc", "nic_ok"], { check: false })).stdout;
          return r.includes(vm0.address) && r.includes(vm1.address);
        },
        { timeoutMs: 10_000, intervalMs: 250 },
      ),
      "the firewall has both NICs",
    );
    const nicsKey = naKeys(redis).nics(hv.id);
    const good = JSON.parse((await redis.hget(nicsKey, vm0.nicId))!) as Record<string, unknown>;
    const ns = vm0.vpcNs;
    const nic = (n: number, over: Record<string, unknown>) => {
      const id = `nic-${tag.slice(0, 6)}00${n.toString(16).padStart(4, "0")}`;
      return [id, JSON.stringify({ ...good, nicId: id, hostIf: `v${id.slice(-12)}`, address: `10.77.1.${200 + n}`, clientToken: "", ...over })] as const;
    };
    const hostile: (readonly [string, string])[] = [
      // newline: the first line succeeds (a tap), the second is `netns exec` in ip -batch
      nic(1, {
        kind: "tap",
        veth: undefined,
        tap: { multiQueue: false, queues: 1 },
        hostIf: `z${tag.slice(0, 6)} mode tap\nnetns exec ${ns} /bin/touch ${markers[0]}\nlink show`,
      }),
      nic(2, { hostIf: `v1" ; add rule bridge microvpc prerouting accept ; "` }), // quote: out of the nft script
      nic(3, { mac: "02:00:00:00:00:01 } } table bridge x { chain y {" }), // brace
      nic(4, { guestIf: "eth0;touch" }), // semicolon
      nic(5, { owner: "vm-a\u0000b" }), // NUL
      nic(6, { hostIf: "v".repeat(400) }), // over-long
      nic(7, { mtu: "1500\nlink set dev lo down" }), // wrong type, with a newline
      nic(8, { bandwidth: undefined }), // missing field
      nic(9, { veth: { netnsPath: `/run/netns/${ns}\nnetns exec ${ns} /bin/touch ${markers[1]}`, skipDefaultRoute: false } }),
      nic(10, { address: "10.77.1.210/0 dev lo\nroute add 0.0.0.0/1 dev lo" }),
    ];
    for (const [k, v] of hostile) await redis.hset(nicsKey, k, v);
    // A good NIC's record overwritten with a hostile one keeps its last valid value.
    await redis.hset(
      nicsKey,
      vm1.nicId,
      JSON.stringify({
        ...JSON.parse((await redis.hget(nicsKey, vm1.nicId))!),
        hostIf: `y${tag.slice(0, 6)} type dummy\nnetns exec ${ns} /bin/touch ${markers[2]}\nlink add y${tag.slice(0, 5)}`,
      }),
    );
    // Subnet and VPC records.
    const subnetsKey = naKeys(redis).subnets(hv.id);
    const goodSn = JSON.parse((await redis.hget(subnetsKey, vm0.subnet.id))!) as Record<string, unknown>;
    const snId = `subnet-${tag}0001`;
    await redis.hset(
      subnetsKey,
      snId,
      JSON.stringify({
        ...goodSn,
        subnetId: snId,
        cidr: "10.77.9.0/24",
        gatewayCidr: `10.77.9.1/24 dev br-${snId.slice(-12)}\nnetns exec ${ns} /bin/touch ${markers[3]}\naddr add 10.77.9.2/24`,
      }),
    );
    await redis.hset(
      subnetsKey,
      `subnet-${tag}0002`,
      JSON.stringify({ ...goodSn, subnetId: `subnet-${tag}0002`, cidr: "0.0.0.0/0", gatewayCidr: "0.0.0.1/0" }),
    );
    const vpcsKey = naKeys(redis).vpcs(hv.id);
    await redis.hset(vpcsKey, `vpc-${tag}0001`, JSON.stringify({ vpcId: `vpc-${tag}0001`, ns: `x\nnetns exec ${ns} /bin/touch ${markers[4]}`, createdMs: 1 }));
    await redis.hset(vpcsKey, `vpc-x;touch ${markers[4]}`, JSON.stringify({ vpcId: `vpc-x;touch ${markers[4]}`, ns: "mvpc-x", createdMs: 1 }));
    // A peering of the VPC whose allowed CIDRs claim the internet.
    const pcx = `pcx-${tag}0001`;
    const PL = peeringKeys(redis);
    await redis.hset(PL.pcx(pcx), {
      id: pcx,
      name: "evil",
      vpc1: vm0.vpc.id,
      vpc2: `vpc-${tag}0009`,
      cidr1: "10.77.0.0/16",
      cidr2: "10.78.0.0/16",
      allowed1: '["0.0.0.0/1","128.0.0.0/1"]',
      allowed2: "[]",
      description: "",
      labels: "[]",
      created: "1",
    });
    // The VPC's list of peerings: a set on a single Redis, on a cluster a hash of reservations of the peer's range (as CreateVpcPeering's script writes them).
    if (PL.cluster) await redis.hset(PL.peers(vm0.vpc.id), pcx, JSON.stringify({ base: 0x0a4e0000, size: 65536, ms: Date.now() }));
    else await redis.sadd(PL.peers(vm0.vpc.id), pcx);

    const expected = hostile.length + 1 + 2 + 2 + 1;
    assert.ok(
      await waitFor(async () => (await hv.agent.getHostStatus({})).invalidRecords.length >= expected, { timeoutMs: 10_000, intervalMs: 250 }),
      `status lists ${expected} invalid records: ${JSON.stringify((await hv.agent.getHostStatus({})).invalidRecords.map((x) => [x.field, x.reason]))}`,
    );
    // A few more passes of the agent and the firewall.
    await new Promise((r) => setTimeout(r, 4500));
    const st = await hv.agent.getHostStatus({});
    const byField = new Map(st.invalidRecords.map((x) => [x.field, x]));
    for (const [k] of hostile) assert.ok(byField.has(k), `status shows NIC ${k}`);
    assert.match(byField.get(hostile[0][0])!.reason, /hostIf/);
    assert.match(byField.get(hostile[1][0])!.reason, /hostIf/);
    assert.match(byField.get(hostile[2][0])!.reason, /mac/);
    assert.match(byField.get(hostile[3][0])!.reason, /guestIf/);
    assert.match(byField.get(hostile[4][0])!.reason, /owner/);
    assert.match(byField.get(hostile[6][0])!.reason, /mtu/);
    assert.match(byField.get(hostile[7][0])!.reason, /bandwidth/);
    assert.match(byField.get(vm1.nicId)!.reason, /hostIf/);
    assert.match(byField.get(snId)!.reason, /gatewayCidr/);
    assert.ok(
      st.invalidRecords.some((x) => x.kind === "peering" && /allowed1/.test(x.reason)),
      "status shows the peering",
    );
    assert.ok(st.invalidRecords.filter((x) => x.kind === "vpc").length === 2, "status shows both VPC records");
    assert.equal(await metric(hv.daemon, "nic"), hostile.length + 1, "nic records counted once each");
    assert.equal(await metric(hv.daemon, "subnet"), 2);
    assert.equal(await metric(hv.daemon, "vpc"), 2);
    assert.equal(await metric(hv.daemon, "peering"), 1);

    for (const m of markers) assert.ok(!existsSync(m), `${m} must not exist: a command was injected`);
    const names = (await links(ns)).map((l) => l.name).sort();
    assert.deepEqual(
      names.filter((n) => n !== "lo"),
      [`br-${vm0.subnet.id.slice(-12)}`, vm0.hostInterface, vm1.hostInterface].sort(),
      "only the good bridge and NICs exist in the VPC namespace",
    );
    const rt = await routes(ns);
    assert.ok(!rt.some((r) => /10\.77\.9\.|0\.0\.0\.0\/1|^default/.test(r)), `no hostile route: ${rt.join(" | ")}`);
    const nft = (await nsExec(ns, "nft", ["list", "ruleset"], { check: false })).stdout;
    assert.ok(!/10\.77\.1\.2\d\d|02:00:00:00:00:01|table bridge x/.test(nft), "no hostile NIC in the firewall's ruleset");
    assert.ok(nft.includes(vm0.address) && nft.includes(vm1.address), "the good NICs are in the firewall's ruleset");
    assert.deepEqual(await h.rootChanges(), [], "the root namespace did not change");

    // The allowed flow, both ways, and the host still converges: a deleted
    // good device is recreated from its last valid record.
    assert.ok(await reaches(vm0, vm1), "h0 still reaches h1");
    assert.ok(await reaches(vm1, vm0), "h1 still reaches h0");
    await nsExec(ns, "ip", ["link", "del", vm0.hostInterface]);
    assert.ok(await waitFor(() => reaches(vm0, vm1), { timeoutMs: 15_000, intervalMs: 500 }), "h0's NIC is repaired and reaches h1 again");
    assert.equal((await hv.agent.getHostStatus({})).errors.length, 0, "no reconcile error");
  }, 60_000);
});
