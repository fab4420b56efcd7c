// A VPC address is held by one NIC across every hypervisor, not per host:
// after IPAM releases an address whose NIC is still attached on one host and
// hands it out again, AttachNic of that address on another host is refused,
// naming the holder; once the first NIC is detached it succeeds.
import assert from "node:assert/strict";
import { Code } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, test } from "vitest";
import { NicKind } from "../../gen/microvpc/v1/netagent_pb.js";
import { SubnetType } from "../../gen/microvpc/v1/subnet_pb.js";
import { rejectsWith } from "../lib/clients.js";
import { Harness } from "../lib/harness.js";
import { createNetns, netnsPath } from "../lib/netns.js";

let h: Harness;

beforeAll(async () => {
  h = await Harness.start({ hosts: 2 });
});

afterAll(async () => {
  const left = await h?.close();
  assert.deepEqual(left ?? [], [], "every namespace of the run is gone");
});

describe("NIC address claim", () => {
  test("a VPC address attached on one host cannot be attached on another until it is detached there", async () => {
    const [hv0, hv1] = h.hosts;
    const vpc = await h.vpc("claim", "10.30.0.0/16");
    const sn = await h.subnet(vpc, "s", "10.30.1.0/24", SubnetType.PRIVATE);
    const first = await h.vm(hv0, vpc, sn, "claimx", { address: "10.30.1.20" });

    // IPAM forgets the address (its NIC still attached on hv0) and hands it to another VM.
    await h.ipam.ipam.release({ subnetId: sn.id, address: first.address });
    const ns = await createNetns(`${h.prefix}-vm-claimy`);
    await h.allocate(sn, "vm-claimy", first.address);
    await hv1.agent.ensureVpc({ vpc: vpc.id });
    await hv1.agent.ensureSubnet({ subnet: sn.id, vpc: vpc.id });
    const req = {
      vpc: vpc.id,
      subnet: sn.id,
      kind: NicKind.VETH,
      options: { case: "veth" as const, value: { netnsPath: netnsPath(ns) } },
      address: first.address,
      owner: "vm-claimy",
      guestInterface: "eth0",
    };
    const err = await rejectsWith(hv1.agent.attachNic(req), Code.FailedPrecondition, new RegExp(`${first.nicId}.*${hv0.id}`));
    assert.ok(err, "refused, naming the NIC and the hypervisor holding the address");
    assert.equal((await hv1.agent.listNics({})).nics.length, 0, "nothing attached on hv1");

    // The same address on the same host in another VPC is no conflict.
    const other = await h.vpc("claim-other", "10.30.0.0/16");
    const osn = await h.subnet(other, "s", "10.30.1.0/24", SubnetType.PRIVATE);
    await h.vm(hv1, other, osn, "claimz", { address: first.address });

    await hv0.agent.detachNic({ nic: first.nicId });
    const ok = await hv1.agent.attachNic(req);
    assert.equal(ok.created, true, "after DetachNic on hv0, hv1 gets the address");
    assert.equal(ok.nic!.guest?.address, first.address);
  });
});
