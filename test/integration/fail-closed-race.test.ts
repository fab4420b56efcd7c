// A new VPC namespace is fail closed: the netagent installs a skeleton of
// the firewall's tables that drops everything forwarded, and the firewall's
// first pass replaces it. The firewall follows the VPC's feed, which a host
// joins as the netagent makes the namespace, so its pass can land between
// the namespace's creation and the skeleton. The skeleton used to be *added*
// then: its drop chain joined the firewall's tables, every packet of the VPC
// was dropped, and the firewall's element updates and drift checks went on
// beside it (sg-members-on-cluster's rare "a member of clients reaches db"
// failure). Now the skeleton is created, so it fails whole over the
// firewall's tables and the netagent takes that for success; and a skeleton
// merged by anything else is drift, which the next pass replaces.
// Real namespaces, a real bridge and veths, real nft, real pings.
import assert from "node:assert/strict";
import { pino } from "pino";
import { afterAll, beforeAll, describe, test } from "vitest";
import { failClosedTx } from "../../services/common/nft/fail-closed.js";
import { LinuxNft } from "../../services/common/nft/linux.js";
import { render } from "../../services/common/nft/tx.js";
import { Agent } from "../../services/netagent/agent.js";
import { LinuxKernel } from "../../services/netagent/kernel.js";
import type { HostStore } from "../../services/netagent/store.js";
import { RUN_PREFIX, createNetns, deleteNetns, nsExec } from "../lib/netns.js";

const HOST = `${RUN_PREFIX}hv9`;
const VPC_FIRST = "vpc-00000000f1a5";
const VPC_LATE = "vpc-00000000f1a6";
const VM1 = `${RUN_PREFIX}-fcr-vm1`;
const VM2 = `${RUN_PREFIX}-fcr-vm2`;
const nft = new LinuxNft();

/** The firewall's tables as its pass leaves them, reduced to what matters here: forward chains that pass what the policy allows (here everything). */
const FIREWALL = `add table inet microvpc
delete table inet microvpc
table inet microvpc {
  chain forward {
    type filter hook forward priority filter; policy accept;
  }
}
add table bridge microvpc
delete table bridge microvpc
table bridge microvpc {
  chain forward {
    type filter hook forward priority filter; policy accept;
  }
}
`;

/** A kernel whose new namespaces get the firewall's tables at once: the firewall's pass landing before the netagent's skeleton. */
class FirewallFirst extends LinuxKernel {
  override async addNetns(name: string): Promise<void> {
    await super.addNetns(name);
    await nft.applyText(name, FIREWALL);
  }
}

const agent = (kernel: LinuxKernel) => new Agent(kernel, {} as HostStore, HOST, pino({ level: "silent" }));

/** Two "VMs" on one bridge in `ns`: the VPC's bridged path, which table bridge microvpc filters. */
async function wire(ns: string): Promise<void> {
  await nsExec(ns, "ip", ["link", "add", "br0", "type", "bridge"]);
  await nsExec(ns, "ip", ["link", "set", "br0", "up"]);
  for (const [i, vm] of [VM1, VM2].entries()) {
    await nsExec(ns, "ip", ["link", "add", `fcr${i}`, "type", "veth", "peer", "name", "eth0", "netns", vm]);
    await nsExec(ns, "ip", ["link", "set", `fcr${i}`, "master", "br0", "up"]);
    await nsExec(vm, "ip", ["addr", "replace", `10.9.7.${i + 5}/24`, "dev", "eth0"]);
    await nsExec(vm, "ip", ["link", "set", "eth0", "up"]);
  }
}

async function unwire(ns: string): Promise<void> {
  for (const i of [0, 1]) await nsExec(ns, "ip", ["link", "del", `fcr${i}`], { check: false });
}

/** Whether VM1 reaches VM2: a few tries where it should (the ports and ARP come up a moment after the links), one where it should not. */
async function carries(tries = 4): Promise<boolean> {
  for (let i = 0; i < tries; i++) if ((await nsExec(VM1, "ping", ["-c", "1", "-W", "1", "10.9.7.6"], { check: false })).code === 0) return true;
  return false;
}

const chains = async (ns: string) => (await nsExec(ns, "nft", ["list", "chains"])).stdout;

beforeAll(async () => {
  for (const ns of [VM1, VM2]) await createNetns(ns);
});

afterAll(async () => {
  for (const v of [VPC_FIRST, VPC_LATE]) await deleteNetns(`mvpc-${HOST}-${v}`).catch(() => {});
  for (const ns of [VM1, VM2]) await deleteNetns(ns).catch(() => {});
});

describe("the netagent's fail-closed skeleton and the firewall's first pass, in either order", () => {
  test("the firewall first: the skeleton adds nothing to its tables and the VPC forwards; a skeleton merged anyway is drift", async () => {
    const ns = `mvpc-${HOST}-${VPC_FIRST}`;
    assert.equal(await agent(new FirewallFirst()).ensureNetns(VPC_FIRST), true, "the namespace is made, the skeleton's refusal taken for success");
    assert.doesNotMatch(await chains(ns), /chain closed/, "no drop chain joined the firewall's tables");
    assert.equal(await nft.tableExists(ns), true, "the firewall's drift check finds its tables as it made them");
    await wire(ns);
    assert.equal(await carries(), true, "what the firewall allows flows");

    // The skeleton as it used to be applied (added): every packet dropped, and the drift check says so.
    await nsExec(ns, "nft", ["-f", "-"], {
      input: "table bridge microvpc {\n  chain closed {\n    type filter hook forward priority filter; policy drop;\n  }\n}\n",
    });
    assert.equal(await carries(1), false, "a merged skeleton drops the VPC's traffic");
    assert.equal(await nft.tableExists(ns), false, "…which the drift check takes for drift (the next pass replaces the tables)");
    await nft.applyText(ns, FIREWALL);
    assert.equal(await nft.tableExists(ns), true);
    assert.equal(await carries(), true, "replaced, the VPC forwards again");
    await unwire(ns);
  });

  test("the skeleton first: nothing forwards until the firewall's pass replaces it, then what it allows flows", async () => {
    const ns = `mvpc-${HOST}-${VPC_LATE}`;
    assert.equal(await agent(new LinuxKernel()).ensureNetns(VPC_LATE), true);
    assert.match(await chains(ns), /chain closed/);
    assert.equal(await nft.tableExists(ns), false, "the skeleton is not the firewall's table");
    await wire(ns);
    assert.equal(await carries(1), false, "fail closed: nothing forwards before the firewall");
    await nft.applyText(ns, FIREWALL);
    assert.doesNotMatch(await chains(ns), /chain closed/, "the firewall's full replace takes the skeleton's place");
    assert.equal(await carries(), true);
    // The skeleton's transaction over tables that exist fails whole and changes nothing.
    await assert.rejects(nft.apply(ns, failClosedTx()), /File exists/);
    assert.doesNotMatch(await chains(ns), /chain closed/);
    assert.match(render(failClosedTx()), /^create table inet microvpc$/m);
    await unwire(ns);
  });
});
