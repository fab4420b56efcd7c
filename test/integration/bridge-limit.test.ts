// A Linux bridge takes at most 1023 ports, and every NIC of a subnet on a
// hypervisor is a port of that subnet's bridge. The 1024th AttachNic used to
// fail deep inside the ip batch ("Exchange full", INTERNAL); now it is
// RESOURCE_EXHAUSTED with what to do, and nothing of it stays behind — while
// another subnet of the same VPC still attaches, and a freed port is usable.
import assert from "node:assert/strict";
import { Code } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, test } from "vitest";
import { NicKind } from "../../gen/microvpc/v1/netagent_pb.js";
import { SubnetType } from "../../gen/microvpc/v1/subnet_pb.js";
import { rejectsWith } from "../lib/clients.js";
import { Harness } from "../lib/harness.js";
import { links } from "../lib/netns.js";

const PORTS = 1023;
let h: Harness;

beforeAll(async () => {
  h = await Harness.start({ hosts: 1 });
}, 120_000);

afterAll(async () => {
  const left = await h?.close();
  assert.deepEqual(left ?? [], []);
});

describe("a subnet's bridge is full", () => {
  test("the 1024th NIC of a subnet on one host: RESOURCE_EXHAUSTED, nothing half-made; another subnet and a freed port still work", async () => {
    const hv = h.hosts[0];
    const vpc = await h.vpc("full", "10.44.0.0/16");
    const big = await h.subnet(vpc, "big", "10.44.0.0/21", SubnetType.PRIVATE);
    const other = await h.subnet(vpc, "other", "10.44.8.0/24", SubnetType.PRIVATE);
    const addrs = (await h.ipam.ipam.allocateBatch({ subnetId: big.id, owner: "pool", requestId: "b", count: PORTS + 1 })).allocations.map((a) => a.address);
    const attach = (address: string, subnet = big.id) => hv.agent.attachNic({ vpc: vpc.id, subnet, kind: NicKind.TAP, address, owner: "pool" });
    const nics: string[] = [];
    for (let i = 0; i < PORTS; i++) nics.push((await attach(addrs[i])).nic!.id);

    const ns = hv.vpcNamespace(vpc.id);
    const taps = async () => (await links(ns)).filter((l) => l.master === `br-${big.id.slice(-12)}`).length;
    assert.equal(await taps(), PORTS, "1023 ports on the bridge");
    await rejectsWith(attach(addrs[PORTS]), Code.ResourceExhausted, /already has 1023 NICs on hypervisor .*another hypervisor, or in another subnet/);
    assert.equal(await taps(), PORTS, "no device of the refused NIC");
    let records = 0;
    for (let token = "", first = true; first || token; first = false) {
      const page = await hv.agent.listNics({ subnet: big.id, pageSize: 500, pageToken: token });
      records += page.nics.length;
      token = page.nextPageToken;
    }
    assert.equal(records, PORTS, "no record of it either");

    const elsewhere = await attach(await h.allocate(other, "pool"), other.id);
    assert.ok(elsewhere.nic!.id, "another subnet of the VPC still attaches");
    await hv.agent.detachNic({ nic: nics[0] });
    assert.ok((await attach(addrs[PORTS])).nic!.id, "a freed port is taken");
    assert.equal(await taps(), PORTS);
  }, 300_000);
});
