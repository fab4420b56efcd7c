// Issue 16 part 2: remote access into a VPC. Two simulated hypervisors
// joined by the WireGuard overlay, real Redis, wireguard-go, real packets.
// The VPN endpoint of VPC prod runs on hv0; its VM web-1 lives on hv1, so
// every client packet crosses the overlay. A wireguard-go client in the
// "internet" namespace uses the wg-quick file `microvpc vpn client add`
// printed (key pair made by the CLI):
//   * it reaches web-1:22, which its group allows, and not web-1:80, which
//     it does not — in the same test;
//   * widening its own AllowedIPs to VPC other (a VM of other runs on the
//     endpoint host itself), it still reaches nothing of other;
//   * deleted, it is cut: new connections fail and its open flow's
//     conntrack entry on the endpoint is gone when DeleteVpnClient returns;
//   * the endpoint's netagent restarted (by PID), a client registered before
//     reaches web-1 again (the records are in Redis, the interface is adopted);
//   * the client range is reserved in IPAM: a subnet inside it is refused,
//     naming the range and the endpoint, and SetVpnEndpoint racing
//     CreateSubnet over one range never lets both win;
//   * every host runs fail-closed with its own firewall, and the endpoint
//     host hv0 holds no NIC of prod: its firewall compiles prod's namespace
//     (no subnet there) and forwards the clients' packets;
//   * a client is a member of its groups for other groups' rules: web-1's
//     "22 from group ssh-only" (enforced by hv1's firewall) admits the
//     ssh-only client and not a client of prod in another group; deleted,
//     the client leaves hv1's member set;
//   * the endpoint deleted (DeleteVpnEndpoint): refused while a client is
//     left, which still gets through; once the clients are gone it cuts
//     them, its host tears its interface down, the other host stops routing
//     the range, and a subnet may take the range.
// vpn-on-cluster.test.ts runs the same on a Redis Cluster, where a VPC's VPN
// records and change counter are under its hash tag (vpn/schema.ts VpnKeys).
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { Code } from "@connectrpc/connect";
import { afterAll, beforeAll, test } from "vitest";
import { Direction, FirewallService, Protocol } from "../../gen/microvpc/v1/firewall_pb.js";
import { SubnetService } from "../../gen/microvpc/v1/subnet_pb.js";
import { VpnService } from "../../gen/microvpc/v1/vpn_pb.js";
import type { Vpc } from "../../gen/microvpc/v1/vpc_pb.js";
import { startVpnClient, wgSocket } from "../../deploy/vpn-client.js";
import { grpcClient } from "../../services/common/client.js";
import { emit } from "../../services/common/events.js";
import { ipamKeys } from "../../services/ipam/schema.js";
import { vpnKeysOf } from "../../services/netagent/schema.js";
import { vpnRoute } from "../../services/netagent/vpn/schema.js";
import * as V from "../../services/common/validate.js";
import { VpnStore } from "../../services/netagent/vpn/store.js";
import { vpnIfName } from "../../services/netagent/vpn/sync.js";
import { interfacesIn } from "../../services/netagent/overlay/wg.js";
import { cliRunner } from "../lib/cli.js";
import { rejectsWith } from "../lib/clients.js";
import type { Daemon } from "../lib/daemon.js";
import { bindRequest, Harness, type Vm } from "../lib/harness.js";
import { ipn, nsExec, onCleanup, startTcpServer, tcpProbe, tempDir, trackChild, waitFor } from "../lib/netns.js";

let h: Harness;
let prod: Vpc;
let web1: Vm;
let other1: Vm;
let inet: string;
let fwAddr: string;
/** Each host's own firewall (hv0: the endpoint, with no NIC of prod; hv1: web-1's host). */
let hvfw: Daemon[] = [];
const hostFw = (i: number) => grpcClient(FirewallService, { address: hvfw[i].address, timeoutMs: 20_000 });
const dir = tempDir("vpn");
const clients: { ifname: string; proc: ChildProcess }[] = [];

const vpn = () => grpcClient(VpnService, { address: h.hosts[1].daemon.address, timeoutMs: 20_000 });
const subnets = () => grpcClient(SubnetService, { address: h.ipamDaemon.address, timeoutMs: 20_000 });
const cli = () => cliRunner(() => ["--server", h.ipamDaemon.address, "--netagent", h.hosts[1].daemon.address, "--firewall", fwAddr], 30_000);

/** A wireguard-go client in the internet namespace from a wg-quick file, brought up as wg-quick would (deploy/vpn-client.ts, shared with the quickstart's demo). */
async function startClient(config: string, extraAllowed: string[] = []): Promise<{ ifname: string; address: string }> {
  const ifname = `wgc${randomBytes(5).toString("hex")}`;
  onCleanup(() => rmSync(wgSocket(ifname), { force: true }));
  const c = await startVpnClient({ ns: inet, ifname, config, dir, extraAllowed });
  clients.push({ ifname, proc: trackChild(c.proc) });
  return { ifname, address: c.address };
}

/** What the endpoint, the VM's host and the client have, when a check fails. */
async function diagnose(): Promise<string> {
  const q = async (ns: string, cmd: string, args: string[]) =>
    `$ ${cmd} ${args.join(" ")} (${ns})\n${(await nsExec(ns, cmd, args, { check: false })).stdout.trim()}`;
  const out = [await q(inet, "wg", ["show", "all"]), await q(inet, "ip", ["route"])];
  for (const hv of h.hosts) {
    const vns = hv.vpcNamespace(prod.id);
    out.push(await q(vns, "ip", ["route"]), await q(vns, "ip", ["link"]), await q(vns, "nft", ["list", "ruleset"]));
  }
  out.push((await nsExec(h.hosts[0].ns, "wg", ["show", "all"], { check: false })).stdout);
  out.push(
    await vpn()
      .getVpnEndpoint({ vpc: "prod" })
      .then(
        (r) => `${r.endpoint?.hostId} ${r.endpoint?.publicKey}`,
        (e: Error) => e.message,
      ),
  );
  return out.join("\n");
}

async function addClient(name: string, groups: string[]): Promise<string> {
  const r = await cli().expect(0, ["vpn", "client", "add", "--vpc", "prod", "--name", name, ...groups.flatMap((g) => ["--security-group", g])]);
  return r.stdout;
}

beforeAll(async () => {
  // Fail closed, as in production: a VPC namespace forwards nothing until its host's firewall compiled it.
  h = await Harness.start({ hosts: 2, overlay: true, failClosed: true, agentArgs: ["--reconcile-interval-ms", "2000"] });
  inet = (await h.internet()).ns;
  // The endpoint's wireguard-go keeps its state beside the overlay's (DIR/<host>/vpn/wg): ended by PID, its global socket removed.
  const stateDir = h.stateDir!;
  const ids = h.hosts.map((hv) => hv.id);
  onCleanup(() => {
    for (const id of ids) {
      for (const { ifname, pid } of interfacesIn(join(stateDir, id), "vpn")) {
        try {
          if (pid > 0 && readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").includes(ifname)) process.kill(pid, "SIGKILL");
        } catch {
          // gone
        }
        rmSync(`/var/run/wireguard/${ifname}.sock`, { force: true });
      }
    }
  });
  const fwd = await h.firewall(0, { args: ["--api-only"] });
  fwAddr = fwd.address;
  prod = await h.vpc("prod", "10.0.0.0/16");
  const web = await h.subnet(prod, "web", "10.0.1.0/24");
  const other = await h.vpc("other", "10.1.0.0/16");
  const osub = await h.subnet(other, "app", "10.1.1.0/24");
  // Each host's own firewall, at its default drift period (30 s): what happens sooner was driven by events.
  hvfw = [];
  for (const hv of h.hosts) {
    hvfw.push(await h.firewall(hv));
  }
  web1 = await h.vm(1, prod, web, "web-1");
  other1 = await h.vm(0, other, osub, "other-1");
  for (const vm of [web1, other1]) {
    await startTcpServer(vm.ns, 22);
    await startTcpServer(vm.ns, 80);
  }
  const fw = grpcClient(FirewallService, { address: fwAddr, timeoutMs: 20_000 });
  // The VMs' own groups let 22 and 80 in from their VPC (other-1: from anywhere): what stops a client is the VPN's doing.
  const open = (cidr: string) =>
    [22, 80].map((port) => ({
      direction: Direction.INGRESS,
      protocol: Protocol.TCP,
      portFrom: port,
      portTo: port,
      peer: { case: "cidr" as const, value: cidr },
    }));
  await fw.createSecurityGroup({ vpc: prod.id, name: "vm-web", rules: open("10.0.0.0/16") });
  await fw.createSecurityGroup({ vpc: other.id, name: "open", rules: open("0.0.0.0/0") });
  await hostFw(1).bindNic(bindRequest(web1, ["vm-web"]));
  await hostFw(0).bindNic(bindRequest(other1, ["open"]));
  await fw.createSecurityGroup({
    vpc: prod.id,
    name: "ssh-only",
    rules: [{ direction: Direction.EGRESS, protocol: Protocol.TCP, portFrom: 22, portTo: 22, peer: { case: "cidr", value: "10.0.0.0/16" } }],
  });
  await cli().expect(0, [
    "vpn",
    "endpoint",
    "set",
    "--vpc",
    "prod",
    "--host-id",
    h.hosts[0].id,
    "--address",
    h.hosts[0].underlayAddress,
    "--port",
    "51820",
    "--client-cidr",
    "10.0.250.0/24",
  ]);
}, 120_000);

afterAll(async () => {
  for (const c of clients) if (c.proc.exitCode === null) c.proc.kill("SIGKILL");
  for (const d of hvfw) await d.stop().catch(() => undefined);
  const left = await h?.close();
  assert.deepEqual(left ?? [], []);
});

test("bad input is refused with the field named, and nothing is stored", async () => {
  await rejectsWith(
    vpn().setVpnEndpoint({ vpc: "prod", hostId: h.hosts[0].id, publicAddress: "192.168.100.10", listenPort: 51820, clientCidr: "10.0.1.0/24" }),
    Code.InvalidArgument,
    /client_cidr: .*overlaps subnet web/,
  );
  await rejectsWith(
    vpn().setVpnEndpoint({ vpc: "prod", hostId: h.hosts[0].id, publicAddress: "192.168.100.10", listenPort: 51820, clientCidr: "10.9.0.0/24" }),
    Code.InvalidArgument,
    /outside the VPC CIDR/,
  );
  await rejectsWith(
    vpn().createVpnClient({ vpc: "prod", name: "x", publicKey: "not-a-key" }),
    Code.InvalidArgument,
    /public_key: .* is not a WireGuard public key/,
  );
  await rejectsWith(
    vpn().createVpnClient({ vpc: "prod", name: "x", publicKey: "A".repeat(43) + "=", securityGroups: ["nope"] }),
    Code.NotFound,
    /security group/,
  );
  assert.equal((await vpn().listVpnClients({ vpc: "prod" })).clients.length, 0);
});

test("a client reaches the VM port its group allows and not the one it does not; it reaches nothing of another VPC", async () => {
  // The endpoint host holds no NIC of prod and runs fail-closed: its firewall has replaced the netagent's closed table there.
  const vns0 = h.hosts[0].vpcNamespace(prod.id);
  const ruleset0 = async () => (await nsExec(vns0, "nft", ["list", "ruleset"], { check: false })).stdout;
  assert.ok(
    await waitFor(async () => /table inet mvpc_vpn/.test(await ruleset0()) && !/chain closed/.test(await ruleset0()), { timeoutMs: 15_000, intervalMs: 100 }),
    `the endpoint host's firewall did not compile prod (drift period 30 s)\n${await ruleset0()}`,
  );
  const config = await addClient("laptop", ["ssh-only"]);
  assert.match(config, /^\[Interface\]\nPrivateKey = [A-Za-z0-9+/]{43}=\nAddress = 10\.0\.250\.1\/32$/m);
  assert.match(config, /^AllowedIPs = 10\.0\.0\.0\/16$/m);
  assert.match(config, new RegExp(`^Endpoint = ${h.hosts[0].underlayAddress.replace(/\./g, "\\.")}:51820$`, "m"));
  // The attack: its own AllowedIPs widened to VPC other, routes to it through the tunnel.
  await startClient(config, ["10.1.0.0/16"]);
  assert.ok(
    await waitFor(() => tcpProbe(inet, web1.address, 22, 1000), { timeoutMs: 20_000, intervalMs: 200 }),
    `the client never reached web-1:22\n${await diagnose()}`,
  );
  assert.equal(await tcpProbe(inet, web1.address, 80, 1500), false, "web-1:80 is not in the client's group");
  assert.equal(await tcpProbe(inet, other1.address, 22, 1500), false, "VPC other reached through prod's VPN");
  assert.equal(await tcpProbe(inet, other1.address, 80, 1500), false);
  // Both reachable otherwise: the VMs do listen.
  assert.equal(await tcpProbe(web1.ns, web1.address, 80, 1500), true);
  const list = await cli().json(["vpn", "client", "list", "--vpc", "prod"]);
  assert.deepEqual(
    list.clients.map((c: { name: string; address: string }) => [c.name, c.address]),
    [["laptop", "10.0.250.1"]],
  );
}, 60_000);

test("the client range is reserved in IPAM: a subnet in it is refused naming the range and the endpoint; racing SetVpnEndpoint never lets both win", async () => {
  const ep = h.hosts[0].id;
  for (const cidr of ["10.0.250.128/25", "10.0.240.0/20"]) {
    await rejectsWith(
      subnets().createSubnet({ vpc: "prod", name: "in-range", cidr }),
      Code.FailedPrecondition,
      new RegExp(`${cidr.replace(/\./g, "\\.")} overlaps 10\\.0\\.250\\.0/24, reserved for the VPN client range of VPC ${prod.id}'s endpoint on host ${ep} `),
    );
  }
  // Beside the range: allowed.
  const beside = (await subnets().createSubnet({ vpc: "prod", name: "beside", cidr: "10.0.251.0/24" })).subnet!;
  assert.equal(beside.cidr, "10.0.251.0/24");
  await subnets().deleteSubnet({ ref: beside.id });
  assert.equal((await vpn().listVpnClients({ vpc: "prod" })).clients.length, 1, "nothing else changed");

  // The race: each round, SetVpnEndpoint and CreateSubnet over the same /24
  // at once. Exactly one wins; the loser is refused and wrote nothing.
  const race = await h.vpc("race", "10.3.0.0/16");
  const wins = { endpoint: 0, subnet: 0 };
  for (let i = 0; i < 12; i++) {
    const cidr = `10.3.${i}.0/24`;
    const [e, sn] = await Promise.allSettled([
      vpn().setVpnEndpoint({ vpc: race.id, hostId: "nohost", publicAddress: "192.0.2.1", listenPort: 51820, clientCidr: cidr }),
      subnets().createSubnet({ vpc: race.id, name: `s${i}`, cidr }),
    ]);
    assert.equal([e, sn].filter((x) => x.status === "fulfilled").length, 1, `round ${i}: exactly one of them wins (${JSON.stringify([e.status, sn.status])})`);
    if (e.status === "fulfilled") {
      wins.endpoint++;
      assert.match(String((sn as PromiseRejectedResult).reason), /overlaps .*reserved for the VPN client range/);
    } else {
      wins.subnet++;
      assert.match(String(e.reason), /client_cidr: .*overlaps subnet s/);
    }
    const got = await vpn()
      .getVpnEndpoint({ vpc: race.id })
      .catch(() => null);
    const have = (await subnets().listSubnets({ vpc: race.id })).subnets;
    for (const s of have) assert.notEqual(s.cidr, got?.endpoint?.clientCidr, `subnet ${s.name} holds the client range ${s.cidr}`);
  }
  // Both orders happened, or the check proved nothing about the scripts.
  console.log(`race: endpoint won ${wins.endpoint}, subnet won ${wins.subnet}`);
  for (const s of (await subnets().listSubnets({ vpc: race.id })).subnets) await subnets().deleteSubnet({ ref: s.id });
}, 60_000);

test("narrowing the client range is refused while clients hold addresses outside it, naming them; racing CreateVpnClient never leaves a client outside the range", async () => {
  const v = await h.vpc("narrow", "10.4.0.0/16");
  const key = () => randomBytes(32).toString("base64");
  const set = (clientCidr: string) =>
    vpn().setVpnEndpoint({ vpc: v.id, hostId: h.hosts[0].id, publicAddress: "192.168.100.10", listenPort: 51821, clientCidr });
  await set("10.4.250.0/24");
  // Six clients fill the hosts of 10.4.250.0/29 (.1–.6).
  const six = [];
  for (let i = 0; i < 6; i++) six.push((await vpn().createVpnClient({ vpc: v.id, name: `c${i}`, publicKey: key() })).client!);
  assert.deepEqual(
    six.map((c) => c.address),
    ["10.4.250.1", "10.4.250.2", "10.4.250.3", "10.4.250.4", "10.4.250.5", "10.4.250.6"],
  );
  await rejectsWith(
    set("10.4.250.128/25"),
    Code.FailedPrecondition,
    /clients c0 \(10\.4\.250\.1\), c1 \(10\.4\.250\.2\), c2 \(10\.4\.250\.3\) hold addresses outside 10\.4\.250\.128\/25/,
  );
  assert.equal((await vpn().getVpnEndpoint({ vpc: v.id })).endpoint!.clientCidr, "10.4.250.0/24", "refused: the range is as it was");
  // The race: a seventh client (it would get .7, the /29's broadcast) against the narrowing to the /29. One wins; no client is ever outside.
  const won = { client: 0, narrowing: 0 };
  for (let i = 0; i < 8; i++) {
    // The narrowing a little later each round: a create reads before its script, so at once the narrowing always lands first.
    const [c, e] = await Promise.allSettled([
      vpn().createVpnClient({ vpc: v.id, name: `late${i}`, publicKey: key() }),
      new Promise((r) => setTimeout(r, i * 3)).then(() => set("10.4.250.0/29")),
    ]);
    const range = (await vpn().getVpnEndpoint({ vpc: v.id })).endpoint!.clientCidr;
    const { base, size } = V.cidr("range", range, { min: 0, max: 32 });
    for (const x of (await vpn().listVpnClients({ vpc: v.id })).clients) {
      const a = V.ipToInt(x.address);
      assert.ok(a > base && a < base + size - 1, `round ${i}: client ${x.name} (${x.address}) is a host of the endpoint's range ${range}`);
    }
    if (c.status === "fulfilled") {
      won.client++;
      assert.equal(e.status, "rejected", `round ${i}: the narrowing after the client is refused`);
      assert.match(
        String((e as PromiseRejectedResult).reason),
        new RegExp(`late${i} \\(10\\.4\\.250\\.7\\) holds? addresses outside|clients late${i} \\(10\\.4\\.250\\.7\\) hold addresses outside`),
      );
      await vpn().deleteVpnClient({ client: c.value.client!.id });
    } else {
      won.narrowing++;
      await set("10.4.250.0/24");
    }
  }
  console.log(`narrowing race: client won ${won.client}, narrowing won ${won.narrowing}`);
  for (const c of (await vpn().listVpnClients({ vpc: v.id })).clients) await vpn().deleteVpnClient({ client: c.id });
  await vpn().deleteVpnEndpoint({ vpc: v.id });
}, 60_000);

test("a client is a member of its groups for other groups' rules: web-1's '22 from group ssh-only' admits the ssh-only client, not another client of the VPC", async () => {
  const fw = grpcClient(FirewallService, { address: fwAddr, timeoutMs: 20_000 });
  const sshOnly = (await fw.getSecurityGroup({ vpc: prod.id, ref: "ssh-only" })).securityGroup!;
  await fw.createSecurityGroup({
    vpc: prod.id,
    name: "vm-ssh",
    rules: [{ direction: Direction.INGRESS, protocol: Protocol.TCP, portFrom: 22, portTo: 22, peer: { case: "securityGroupId", value: "ssh-only" } }],
  });
  // "dev" lets its clients out to tcp/22 of the VPC too: only web-1's own group can stop them.
  await fw.createSecurityGroup({
    vpc: prod.id,
    name: "dev",
    rules: [{ direction: Direction.EGRESS, protocol: Protocol.TCP, portFrom: 22, portTo: 22, peer: { case: "cidr", value: "10.0.0.0/16" } }],
  });
  // web-1 now lets tcp/22 in from group ssh-only alone.
  await hostFw(1).bindNic(bindRequest(web1, ["vm-ssh"]));
  const set = `members_${sshOnly.id.slice(-12)}`;
  const vns1 = h.hosts[1].vpcNamespace(prod.id);
  const members = async () => (await nsExec(vns1, "nft", ["list", "ruleset"], { check: false })).stdout;
  assert.ok(
    await waitFor(async () => new RegExp(`set ${set} \\{[^}]*elements = \\{ 10\\.0\\.250\\.1 \\}`).test(await members()), {
      timeoutMs: 15_000,
      intervalMs: 100,
    }),
    `hv1's member set of ssh-only does not hold the laptop client\n${await members()}`,
  );
  assert.ok(
    await waitFor(() => tcpProbe(inet, web1.address, 22, 1000), { timeoutMs: 15_000, intervalMs: 200 }),
    "the ssh-only client no longer reaches web-1:22",
  );

  // Another client of prod, in group dev: its packets pass the endpoint, and web-1's group drops them.
  const dev = await startClient(await addClient("dev", ["dev"]));
  assert.equal(dev.address, "10.0.250.2");
  const wg1 = clients[0].ifname;
  try {
    // Its route took 10.0.0.0/16: the internet namespace now speaks as dev (source 10.0.250.2).
    const handshake = async () => /latest handshake/.test((await nsExec(inet, "wg", ["show", dev.ifname], { check: false })).stdout);
    await tcpProbe(inet, web1.address, 22, 1000);
    assert.ok(await waitFor(handshake, { timeoutMs: 10_000, intervalMs: 100 }), "the dev client never reached the endpoint");
    assert.equal(await tcpProbe(inet, web1.address, 22, 1500), false, "a client outside ssh-only reached web-1:22");
    assert.doesNotMatch(await members(), /10\.0\.250\.2/, "the dev client is in a member set");
  } finally {
    await ipn(inet, ["route", "replace", "10.0.0.0/16", "dev", wg1]);
  }
  // Records written around the API (anyone with Redis's password): a "client"
  // of ssh-only at an address outside the client range (web-1's subnet), one
  // with a group list that is not one. The firewall parses each with the
  // VPN's own validators: neither joins the member set; both are reported.
  const redis = await h.connectReady();
  const clientsKey = vpnKeysOf(redis).clients(prod.id);
  try {
    const forged = (name: string, address: string, groupIds: unknown) =>
      JSON.stringify({ id: `vpnc-${"f".repeat(11)}${name.length}`, name, vpcId: prod.id, publicKey: "F".repeat(42) + "A=", address, groupIds, createdMs: 1 });
    await redis.hset(clientsKey, "forged", forged("forged", "10.0.1.77", [sshOnly.id]), "forged-two", forged("forged-two", "10.0.250.77", sshOnly.id));
    const ev = ["kind", "vpn.client.created", "vpc", prod.id, "client", "vpnc-ffffffffffff", "address", "10.0.1.77", "groups", sshOnly.id];
    await emit(redis, { vpcs: [prod.id] }, ev);
    const reported = async () => (await hostFw(1).getFirewallStatus({})).invalidRecords.filter((r) => r.kind === "vpn-client").map((r) => r.reason);
    assert.ok(
      await waitFor(async () => (await reported()).length >= 2, { timeoutMs: 15_000, intervalMs: 100 }),
      `hv1's firewall did not report the forged clients: ${JSON.stringify(await reported())}`,
    );
    assert.match((await reported()).join("\n"), /10\.0\.1\.77 is not a client address of 10\.0\.250\.0\/24/);
    assert.doesNotMatch(await members(), /10\.0\.1\.77|10\.0\.250\.77/, "a forged client joined a member set");
  } finally {
    await redis.hdel(clientsKey, "forged", "forged-two");
    redis.disconnect();
  }

  // Back to the laptop: the same port, admitted.
  assert.ok(await waitFor(() => tcpProbe(inet, web1.address, 22, 1000), { timeoutMs: 10_000, intervalMs: 200 }), "the ssh-only client was not admitted again");
  await cli().expect(0, ["vpn", "client", "delete", "dev", "--vpc", "prod"]);
}, 90_000);

test("a client survives its endpoint's netagent restart; a deleted client is cut, its open flow too", async () => {
  const c = await vpn().getVpnClient({ client: "laptop", vpc: "prod" });
  const ep = h.hosts[0];
  await ep.kill();
  await ep.start();
  assert.ok(await waitFor(() => tcpProbe(inet, web1.address, 22, 1000), { timeoutMs: 20_000, intervalMs: 200 }), "not reachable after the restart");
  // An open flow: a connection held by a child in the internet namespace.
  const holder = trackChild(
    spawn(
      "ip",
      [
        "netns",
        "exec",
        inet,
        process.execPath,
        "-e",
        `const s=require("net").connect(22,"${web1.address}");s.on("data",()=>{});setInterval(()=>s.write("x"),100);setTimeout(()=>process.exit(0),30000)`,
      ],
      { stdio: "ignore" },
    ),
  );
  const vns = ep.vpcNamespace(prod.id);
  const entries = async () => (await nsExec(vns, "conntrack", ["-L", "-s", c.client!.address], { check: false })).stdout.trim();
  assert.ok(await waitFor(async () => (await entries()) !== "", { timeoutMs: 10_000, intervalMs: 100 }), "no flow of the client on the endpoint");
  await cli().expect(0, ["vpn", "client", "delete", c.client!.id]);
  assert.equal(await entries(), "", "the deleted client's flow is still tracked on the endpoint");
  assert.equal(await tcpProbe(inet, web1.address, 22, 1500), false, "a deleted client still connects");
  {
    const ruleset = async () => (await nsExec(h.hosts[1].vpcNamespace(prod.id), "nft", ["list", "ruleset"], { check: false })).stdout;
    assert.ok(
      await waitFor(async () => !(await ruleset()).includes(c.client!.address), { timeoutMs: 10_000, intervalMs: 100 }),
      "the deleted client is still in hv1's member set",
    );
  }
  const wg = (await nsExec(ep.ns, "wg", ["show", "all", "peers"], { check: false })).stdout;
  assert.doesNotMatch(wg, new RegExp(c.client!.publicKey.replace(/[+/]/g, "\\$&")));
  holder.kill("SIGKILL");
  await rejectsWith(vpn().getVpnClient({ client: c.client!.id }), Code.NotFound, /VPN client/);
}, 90_000);

test("DeleteVpnEndpoint is refused while a client is left (which still reaches web-1); then it cuts the clients, tears the interface down and frees the range; a bad VPC reference is refused", async () => {
  // (c) Bad references: malformed, and well-formed but unknown (an id, a name).
  await rejectsWith(vpn().deleteVpnEndpoint({ vpc: "Not a VPC!" }), Code.InvalidArgument, /^vpc: /);
  await rejectsWith(vpn().deleteVpnEndpoint({ vpc: "vpc-0123456789ab" }), Code.NotFound, /vpc "vpc-0123456789ab" not found/);
  await rejectsWith(vpn().deleteVpnEndpoint({ vpc: "no-such-vpc" }), Code.NotFound, /vpc "no-such-vpc" not found/);

  // (a) A client is left: refused, naming how many and how to list them; the client still gets through.
  const ep = h.hosts[0];
  const vns0 = ep.vpcNamespace(prod.id);
  const vns1 = h.hosts[1].vpcNamespace(prod.id);
  await startClient(await addClient("last", ["ssh-only"]));
  assert.ok(
    await waitFor(() => tcpProbe(inet, web1.address, 22, 1000), { timeoutMs: 15_000, intervalMs: 200 }),
    `the client never reached web-1:22\n${await diagnose()}`,
  );
  await rejectsWith(
    vpn().deleteVpnEndpoint({ vpc: "prod" }),
    Code.FailedPrecondition,
    /the VPN endpoint of VPC prod still has 1 client; list them with `microvpc vpn client list --vpc prod`/,
  );
  assert.equal(await tcpProbe(inet, web1.address, 22, 1500), true, "the refused delete cut the client");
  const range = "10.0.250.0/24";
  const hv1Route = async () => (await nsExec(vns1, "ip", ["route", "show", range], { check: false })).stdout.trim();
  assert.notEqual(await hv1Route(), "", "hv1's overlay does not route the client range to the endpoint host");

  // (b) The client deleted, the endpoint goes; the call returns once the endpoint host tore it down.
  assert.equal((await vpn().deleteVpnClient({ client: "last", vpc: "prod" })).deleted, true);
  const ifname = vpnIfName(ep.id, prod.id);
  assert.deepEqual(
    interfacesIn(join(h.stateDir!, ep.id), "vpn").map((i) => i.ifname),
    [ifname],
    "the endpoint's interface before the delete",
  );
  assert.equal((await vpn().deleteVpnEndpoint({ vpc: "prod" })).deleted, true);
  assert.deepEqual(interfacesIn(join(h.stateDir!, ep.id), "vpn"), [], "the endpoint's wireguard-go state is still there");
  assert.notEqual((await nsExec(vns0, "ip", ["link", "show", ifname], { check: false })).code, 0, `${ifname} is still in ${vns0}`);
  assert.doesNotMatch((await nsExec(vns0, "nft", ["list", "ruleset"], { check: false })).stdout, /table inet mvpc_vpn/);
  assert.equal((await nsExec(vns0, "ip", ["route", "show", range], { check: false })).stdout.trim(), "", "the endpoint host still routes the range");
  const redis = await h.connectReady();
  try {
    const k = vpnKeysOf(redis);
    assert.equal(await redis.exists(k.ep(prod.id)), 0, "the endpoint record is still there");
    assert.equal(await redis.sismember(k.eps, prod.id), 0, "the VPC is still listed");
    assert.equal(await redis.hget(ipamKeys(redis).vpcReserved(prod.id), "vpn"), null, "IPAM still reserves the range");
    assert.equal(await redis.hget(k.hostKeys(ep.id), prod.id), null, "the endpoint host still has a key entry");
    assert.equal(await redis.hget(k.hostApplied(ep.id), prod.id), null, "the endpoint host still has an applied entry");
    assert.equal(await vpnRoute(redis, prod.id, prod.cidr), null, "the other hosts' overlay still reads a route");
    // A CreateVpnClient that read the endpoint before it went: its script refuses, so no client outlives the endpoint.
    const late = { id: "vpnc-0123456789ab", name: "late", vpcId: prod.id, publicKey: "G".repeat(42) + "A=", address: "10.0.250.9", groupIds: [], createdMs: 1 };
    assert.deepEqual(await new VpnStore(redis).create(late, "10.0.250.0/24"), { taken: "endpoint" });
    assert.equal(await redis.hlen(k.clients(prod.id)), 0);
  } finally {
    redis.disconnect();
  }
  await rejectsWith(vpn().getVpnEndpoint({ vpc: "prod" }), Code.NotFound, /VPN endpoint of VPC "prod" not found/);
  assert.equal(await tcpProbe(inet, web1.address, 22, 1500), false, "a client of the deleted endpoint still connects");
  assert.ok(await waitFor(async () => (await hv1Route()) === "", { timeoutMs: 10_000, intervalMs: 100 }), `hv1 still routes ${range}: ${await hv1Route()}`);

  // The range is free: a subnet in it, refused before, is made.
  const inRange = (await subnets().createSubnet({ vpc: "prod", name: "in-range", cidr: "10.0.250.128/25" })).subnet!;
  assert.equal(inRange.cidr, "10.0.250.128/25");
  await subnets().deleteSubnet({ ref: inRange.id });

  // Again: nothing to delete (through the CLI).
  const again = await cli().expect(0, ["vpn", "endpoint", "delete", "--vpc", "prod"]);
  assert.match(again.stdout, /VPC prod has no VPN endpoint; nothing to delete/);
  assert.equal((await vpn().deleteVpnEndpoint({ vpc: prod.id })).deleted, false);
}, 60_000);
