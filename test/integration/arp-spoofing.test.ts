// ARP spoofing inside one subnet, with real frames: a VM (the attacker)
// crafts ARP on its own interface (a raw AF_PACKET socket, so any sender
// MAC/IP it likes) to take over the subnet's gateway address, another VM's
// address, or to point its own address at a MAC that is not its own. The
// bridge table's anti-spoofing (services/firewall/compile.ts) lets an ARP
// frame through only when the port, the frame's source MAC, the ARP sender
// MAC and the ARP sender address are the port's own binding, so:
//   * the victim's neighbour entries keep the real MACs;
//   * the victim's traffic to the gateway and the outside still flows, and
//     none of it reaches the attacker (counted on the attacker's ingress);
//   * normal ARP resolution (victim <-> attacker, victim <-> gateway) works.
import assert from "node:assert/strict";
import { afterAll, beforeAll, describe, test } from "vitest";
import { Direction, FirewallService, Protocol } from "../../gen/microvpc/v1/firewall_pb.js";
import { SubnetType } from "../../gen/microvpc/v1/subnet_pb.js";
import { grpcClient } from "../../services/common/client.js";
import { type Daemon } from "../lib/daemon.js";
import { Harness, type Vm } from "../lib/harness.js";
import { canPing, httpGet, ipn, neighbours, nsExec, sleep, waitFor } from "../lib/netns.js";

let h: Harness;
let gwd: Daemon;
let fwd: Daemon;
let inet: { ns: string; address: string };
let victim: Vm, attacker: Vm, other: Vm;
/** The real MAC of the subnet's gateway (the bridge in the VPC namespace). */
let gatewayMac: string;
const FAKE_MAC = "02:de:ad:be:ef:01";
const BROADCAST = "ff:ff:ff:ff:ff:ff";

/**
 * Sends `count` ARP frames, 100 ms apart, on eth0 of a namespace:
 * ethernet src/dst, then op (1 request, 2 reply), sender MAC/IP, target MAC/IP.
 */
const ARP_SENDER = `
import socket, sys, time
dev, esrc, edst, op, sha, spa, tha, tpa, count = sys.argv[1:]
mac = lambda s: bytes.fromhex(s.replace(":", ""))
frame = (mac(edst) + mac(esrc) + b"\\x08\\x06" + b"\\x00\\x01\\x08\\x00\\x06\\x04" + int(op).to_bytes(2, "big")
         + mac(sha) + socket.inet_aton(spa) + mac(tha) + socket.inet_aton(tpa))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((dev, 0))
for _ in range(int(count)):
    s.send(frame)
    time.sleep(0.1)
`;

interface Arp {
  ethSrc: string;
  ethDst: string;
  op: 1 | 2;
  sha: string;
  spa: string;
  tha: string;
  tpa: string;
}

async function sendArp(vm: Vm, a: Arp, count = 20): Promise<void> {
  await nsExec(vm.ns, "python3", ["-c", ARP_SENDER, "eth0", a.ethSrc, a.ethDst, String(a.op), a.sha, a.spa, a.tha, a.tpa, String(count)], {
    timeoutMs: 20_000,
  });
}

/** The MAC the victim's neighbour table holds for an address (undefined: none). */
async function neighMac(vm: Vm, address: string): Promise<string | undefined> {
  return (await neighbours(vm.ns)).find((n) => n.dst === address && n.dev === "eth0")?.lladdr;
}

/**
 * A spy on the attacker's own interface: an ingress (netdev) counter of IPv4
 * frames from the victim to anything but the attacker's address, i.e. the
 * victim's traffic for the gateway or the outside, had it been redirected.
 */
async function installSpy(): Promise<void> {
  const script = [
    "table netdev spy {",
    "  counter stolen { }",
    "  chain in {",
    `    type filter hook ingress device "eth0" priority 0; policy accept;`,
    `    ether type ip ip saddr ${victim.address} ip daddr != ${attacker.address} counter name stolen`,
    "  }",
    "}",
    "",
  ].join("\n");
  await nsExec(attacker.ns, "nft", ["-f", "-"], { input: script });
}

async function stolen(): Promise<number> {
  const r = await nsExec(attacker.ns, "nft", ["-j", "list", "counter", "netdev", "spy", "stolen"]);
  const j = JSON.parse(r.stdout) as { nftables: { counter?: { packets: number } }[] };
  return j.nftables.find((x) => x.counter)!.counter!.packets;
}

const outside = (vm: Vm) => httpGet(vm.ns, `http://${inet.address}/`, 1500);

/** The victim reaches the outside and the gateway, and its entries for the gateway and the attacker are the real ones. */
async function victimUnharmed(what: string): Promise<void> {
  assert.notEqual(await outside(victim), null, `${what}: the victim still reaches the outside`);
  assert.ok(await canPing(victim.ns, victim.gateway), `${what}: the victim still reaches its gateway`);
  assert.equal(await neighMac(victim, victim.gateway), gatewayMac, `${what}: the victim's entry for the gateway is the real MAC`);
  const forAttacker = await neighMac(victim, attacker.address);
  assert.ok(
    forAttacker === undefined || forAttacker === attacker.mac,
    `${what}: the victim's entry for the attacker is the attacker's own MAC (${forAttacker})`,
  );
  const forOther = await neighMac(victim, other.address);
  assert.ok(forOther === undefined || forOther === other.mac, `${what}: the victim's entry for the other VM is its real MAC (${forOther})`);
  assert.equal(await stolen(), 0, `${what}: none of the victim's traffic reached the attacker`);
}

/** While the attack runs, the victim keeps talking to the outside (so its entries are in use and get replaced if the kernel believes the attacker). */
async function underAttack(a: Arp, what: string): Promise<void> {
  const attack = sendArp(attacker, a, 30);
  const traffic = (async () => {
    for (let i = 0; i < 6; i++) {
      await outside(victim);
      await canPing(victim.ns, other.address, { count: 1, deadlineS: 1 });
      await sleep(300);
    }
  })();
  await Promise.all([attack, traffic]);
  await victimUnharmed(what);
}

beforeAll(async () => {
  h = await Harness.start({ hosts: 1 });
  inet = await h.internet();
  ({ fwd, gwd } = await h.hostServices(0, { driftMs: 3000 }));
  const fw = grpcClient(FirewallService, { address: fwd.address, timeoutMs: 20_000 });
  const vpc = await h.vpc("arp", "10.4.0.0/16");
  const subnet = await h.subnet(vpc, "web", "10.4.1.0/24", SubnetType.PUBLIC);
  victim = await h.vm(0, vpc, subnet, "victim");
  attacker = await h.vm(0, vpc, subnet, "attacker");
  other = await h.vm(0, vpc, subnet, "other");
  // Everything within the VPC is allowed in: the VMs ping each other.
  const sg = await fw.createSecurityGroup({
    vpc: vpc.id,
    name: "vpc",
    rules: [{ direction: Direction.INGRESS, protocol: Protocol.ALL, peer: { case: "cidr", value: "10.4.0.0/16" } }],
  });
  for (const vm of [victim, attacker, other]) {
    await fw.bindNic({
      nicId: vm.nicId,
      vpc: vm.vpc.id,
      subnet: vm.subnet.id,
      address: vm.address,
      mac: vm.mac,
      hostInterface: vm.hostInterface,
      securityGroups: [sg.securityGroup!.id],
    });
  }
  const addrs = JSON.parse((await ipn(victim.vpcNs, ["-j", "-4", "addr", "show"])).stdout) as { ifname: string; addr_info: { local: string }[] }[];
  const bridge = addrs.find((l) => l.addr_info.some((a) => a.local === victim.gateway))!.ifname;
  gatewayMac = (JSON.parse((await ipn(victim.vpcNs, ["-j", "link", "show", "dev", bridge])).stdout) as { address: string }[])[0].address;
  assert.match(gatewayMac, /^[0-9a-f:]{17}$/, `the gateway's MAC (${bridge} in the VPC namespace)`);
  // Allowed flow first: ordinary ARP resolution and the way out.
  assert.ok(await waitFor(async () => (await outside(victim)) !== null, { timeoutMs: 20_000, intervalMs: 300 }), "the victim reaches the outside");
  const reaches = (from: Vm, to: string) => waitFor(() => canPing(from.ns, to, { count: 1, deadlineS: 1 }), { timeoutMs: 20_000, intervalMs: 300 });
  assert.ok(await reaches(victim, attacker.address), "the victim resolves and reaches the attacker");
  assert.ok(await reaches(victim, other.address), "the victim resolves and reaches the other VM");
  assert.ok(await reaches(attacker, victim.gateway), "the attacker resolves and reaches its gateway");
  await installSpy();
  await victimUnharmed("before any attack");
}, 180_000);

afterAll(async () => {
  await gwd?.stop();
  await fwd?.stop();
  const root = h ? await h.rootChanges() : [];
  const left = await h?.close();
  assert.deepEqual(root, [], "the root namespace was not changed");
  assert.deepEqual(left, [], "no namespace of the run is left");
});

describe("ARP spoofing within a subnet", () => {
  test("gratuitous ARP (broadcast request) claiming the gateway's address with the attacker's MAC is dropped", async () => {
    const g = victim.gateway;
    await underAttack({ ethSrc: attacker.mac, ethDst: BROADCAST, op: 1, sha: attacker.mac, spa: g, tha: "00:00:00:00:00:00", tpa: g }, "gratuitous request");
  });

  test("gratuitous ARP reply (broadcast) claiming the gateway's address is dropped", async () => {
    const g = victim.gateway;
    await underAttack({ ethSrc: attacker.mac, ethDst: BROADCAST, op: 2, sha: attacker.mac, spa: g, tha: BROADCAST, tpa: g }, "gratuitous reply");
  });

  test("an unsolicited ARP reply to the victim claiming the gateway's address is dropped", async () => {
    await underAttack(
      { ethSrc: attacker.mac, ethDst: victim.mac, op: 2, sha: attacker.mac, spa: victim.gateway, tha: victim.mac, tpa: victim.address },
      "reply for the gateway",
    );
  });

  test("an ARP reply to the victim claiming another VM's address is dropped", async () => {
    await underAttack(
      { ethSrc: attacker.mac, ethDst: victim.mac, op: 2, sha: attacker.mac, spa: other.address, tha: victim.mac, tpa: victim.address },
      "reply for another VM",
    );
  });

  test("a frame with a forged source MAC (the gateway's) claiming the gateway is dropped", async () => {
    await underAttack(
      { ethSrc: gatewayMac, ethDst: victim.mac, op: 2, sha: attacker.mac, spa: victim.gateway, tha: victim.mac, tpa: victim.address },
      "forged frame source",
    );
  });

  test("the attacker's own address with a sender MAC that is not its own (here the gateway's) is dropped", async () => {
    // Frame source and sender address are the attacker's own: only the ARP
    // sender MAC lies. Believed, the victim would send the attacker's traffic
    // to the gateway's MAC, or to any MAC the attacker names.
    await underAttack(
      { ethSrc: attacker.mac, ethDst: victim.mac, op: 2, sha: gatewayMac, spa: attacker.address, tha: victim.mac, tpa: victim.address },
      "lying sender MAC (gateway's)",
    );
    await underAttack(
      { ethSrc: attacker.mac, ethDst: BROADCAST, op: 1, sha: FAKE_MAC, spa: attacker.address, tha: "00:00:00:00:00:00", tpa: attacker.address },
      "lying sender MAC (made up)",
    );
  });

  test("a stock tool (busybox arping -U / -A) run by an attacker that configured the gateway's address on itself changes nothing", async () => {
    // What an attacker without a raw-socket helper does: take the address, announce it.
    await nsExec(attacker.ns, "ip", ["addr", "add", `${victim.gateway}/32`, "dev", "eth0", "nodad"]);
    try {
      for (const mode of ["-U", "-A"]) {
        const traffic = (async () => {
          for (let i = 0; i < 5; i++) {
            await outside(victim);
            await sleep(300);
          }
        })();
        const r = await nsExec(attacker.ns, "/bin/busybox", ["arping", mode, "-c", "10", "-w", "3", "-I", "eth0", "-s", victim.gateway, victim.gateway], {
          check: false,
          timeoutMs: 10_000,
        });
        assert.ok(/ARPING/.test(r.stdout + r.stderr), `busybox arping ${mode} ran: ${r.stdout}${r.stderr}`);
        await traffic;
        await victimUnharmed(`busybox arping ${mode}`);
      }
    } finally {
      await nsExec(attacker.ns, "ip", ["addr", "del", `${victim.gateway}/32`, "dev", "eth0"]);
    }
  });

  test("allowed: after all that, ordinary resolution still works both ways and the attacker's real entry is learnt", async () => {
    await nsExec(victim.ns, "ip", ["neigh", "flush", "dev", "eth0"]);
    await nsExec(attacker.ns, "ip", ["neigh", "flush", "dev", "eth0"]);
    assert.ok(await canPing(attacker.ns, victim.address), "the attacker resolves the victim");
    assert.ok(await canPing(victim.ns, attacker.address), "the victim resolves the attacker");
    assert.equal(await neighMac(victim, attacker.address), attacker.mac);
    assert.ok(await canPing(victim.ns, victim.gateway));
    assert.equal(await neighMac(victim, victim.gateway), gatewayMac);
    assert.notEqual(await outside(victim), null);
    assert.equal(await stolen(), 0);
  });
});
