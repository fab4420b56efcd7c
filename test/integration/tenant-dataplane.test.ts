// One trust boundary, data plane: what one tenant (or the outside) can do to
// another on the same hypervisor, with real packets.
//   * a port forward takes the hypervisor's uplink address only — not another
//     tenant's floating IP on the same port — and never a port the
//     hypervisor serves itself;
//   * a packet with a link-local source gets no pass around security groups,
//     neither from the internet nor from the hypervisor's side of the transit
//     link, while the metadata service still answers VMs;
//   * a VM's flows through the host's NAT are capped (--conntrack-limit-per-vm)
//     without affecting its neighbours.
// Every attack is asserted next to the allowed flow it imitates.
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { afterAll, beforeAll, describe, test } from "vitest";
import { Code } from "@connectrpc/connect";
import { Direction, FirewallService, Protocol } from "../../gen/microvpc/v1/firewall_pb.js";
import { GatewayService, type FloatingIp } from "../../gen/microvpc/v1/gateway_pb.js";
import { SubnetType } from "../../gen/microvpc/v1/subnet_pb.js";
import { grpcClient } from "../../services/common/client.js";
import { names } from "../../services/gateway/plan.js";
import { rejectsWith } from "../lib/clients.js";
import { type Daemon } from "../lib/daemon.js";
import { Harness, type Vm } from "../lib/harness.js";
import { httpGet, nsExec, sleep, startHttpServer, tcpConnect, trackChild, waitFor } from "../lib/netns.js";

/** Small on purpose: the conntrack test opens a few more than this. */
const CT_LIMIT = 4;
/** A link-local address the "internet" spoofs from (added to its own interface only). */
const SPOOF = "169.254.77.7";
const UDP_OPEN = 5001; // tenant B's group allows it
const UDP_CLOSED = 5002; // tenant B's group does not

let h: Harness;
let gwd: Daemon;
let fwd: Daemon;
let gw: ReturnType<typeof grpcClient<typeof GatewayService>>;
let fw: ReturnType<typeof grpcClient<typeof FirewallService>>;
let inet: { ns: string; address: string };
let hostAddr: string;
let a1: Vm, b1: Vm, c1: Vm, c2: Vm, d1: Vm, d2: Vm, d3: Vm;
let fipB: string;
let udp: UdpListener;

async function eventually(probe: () => Promise<boolean>, what: string, timeoutMs = 15_000): Promise<void> {
  assert.ok(await waitFor(probe, { timeoutMs, intervalMs: 250 }), what);
}

const tcpRule = (port: number) => ({
  direction: Direction.INGRESS,
  protocol: Protocol.TCP,
  portFrom: port,
  portTo: port,
  peer: { case: "cidr" as const, value: "0.0.0.0/0" },
});
const udpRule = (port: number) => ({
  direction: Direction.INGRESS,
  protocol: Protocol.UDP,
  portFrom: port,
  portTo: port,
  peer: { case: "cidr" as const, value: "0.0.0.0/0" },
});

interface UdpListener {
  /** Datagrams received so far: port, sender address, payload. */
  got: { port: number; from: string; msg: string }[];
  child: ChildProcess;
}

const UDP_LISTENER = `
const dgram = require("node:dgram");
const ports = process.argv.slice(1).map(Number);
let bound = 0;
for (const port of ports) {
  const s = dgram.createSocket("udp4");
  s.on("message", (m, r) => process.stdout.write(JSON.stringify({ port, from: r.address, msg: m.toString() }) + "\\n"));
  s.bind(port, "0.0.0.0", () => { if (++bound === ports.length) process.stdout.write("ready\\n"); });
}
process.on("SIGTERM", () => process.exit(0));
`;

/** UDP listeners in a VM, recording every datagram with its source address. */
async function udpListener(vm: Vm, ports: number[]): Promise<UdpListener> {
  const child = trackChild(
    spawn("ip", ["netns", "exec", vm.ns, process.execPath, "-e", UDP_LISTENER, ...ports.map(String)], { stdio: ["ignore", "pipe", "inherit"] }),
  );
  const got: UdpListener["got"] = [];
  let buf = "";
  let ready!: () => void;
  const isReady = new Promise<void>((r) => (ready = r));
  child.stdout!.setEncoding("utf8");
  child.stdout!.on("data", (d: string) => {
    buf += d;
    for (let i = buf.indexOf("\n"); i >= 0; i = buf.indexOf("\n")) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      if (line === "ready") ready();
      else got.push(JSON.parse(line));
    }
  });
  await isReady;
  return { got, child };
}

const UDP_SENDER = `
const [dst, port, msg, from] = process.argv.slice(1);
const s = require("node:dgram").createSocket("udp4");
const send = (n) => s.send(msg, Number(port), dst, () => (n > 1 ? setTimeout(() => send(n - 1), 50) : s.close()));
if (from) s.bind(0, from, () => send(3)); else send(3);
`;

/** Sends a tagged datagram (three times) from ns; from = a local source address to bind. */
async function udpSend(ns: string, dst: string, port: number, msg: string, from?: string): Promise<void> {
  await nsExec(ns, process.execPath, ["-e", UDP_SENDER, dst, String(port), msg, ...(from ? [from] : [])], { timeoutMs: 10_000 });
}

const arrived = (msg: string) => udp.got.filter((g) => g.msg === msg);

/** The address of an interface in a namespace. */
async function addrOf(ns: string, dev: string): Promise<string> {
  const j = JSON.parse((await nsExec(ns, "ip", ["-j", "-4", "addr", "show", "dev", dev])).stdout) as { addr_info: { local: string }[] }[];
  return j[0].addr_info[0].local;
}

/** HTTP GET of the metadata service from inside a VM: the body of a 200, or null. */
const imds = (vm: Vm, path: string) => httpGet(vm.ns, `http://169.254.169.254${path}`, 3000);

beforeAll(async () => {
  h = await Harness.start({ hosts: 1 });
  const hv = h.hosts[0];
  hostAddr = hv.underlayAddress;
  inet = await h.internet();
  ({ fwd, gwd } = await h.hostServices(hv, { driftMs: 3000, gatewayArgs: ["--conntrack-limit-per-vm", String(CT_LIMIT)] }));
  gw = grpcClient(GatewayService, { address: gwd.address, timeoutMs: 20_000 });
  fw = grpcClient(FirewallService, { address: fwd.address, timeoutMs: 20_000 });

  // Tenant A: a web VM published through a port forward of tcp/443.
  const va = await h.vpc("tenant-a", "10.0.0.0/16");
  a1 = await h.vm(0, va, await h.subnet(va, "web", "10.0.1.0/24", SubnetType.PUBLIC), "a1");
  // Tenant B: a web VM with a floating IP, also serving 443.
  const vb = await h.vpc("tenant-b", "10.1.0.0/16");
  b1 = await h.vm(0, vb, await h.subnet(vb, "web", "10.1.1.0/24", SubnetType.PUBLIC), "b1");
  // Tenant C: two VMs that go out through the host's NAT.
  const vc = await h.vpc("tenant-c", "10.2.0.0/16");
  const sc = await h.subnet(vc, "web", "10.2.1.0/24", SubnetType.PUBLIC);
  c1 = await h.vm(0, vc, sc, "c1");
  c2 = await h.vm(0, vc, sc, "c2");
  // Tenant D: ICMP by type and code (d2 allows echo code 0 only, d3 every echo code).
  const vd = await h.vpc("tenant-d", "10.3.0.0/16");
  const sd = await h.subnet(vd, "s", "10.3.1.0/24", SubnetType.PUBLIC);
  d1 = await h.vm(0, vd, sd, "d1");
  d2 = await h.vm(0, vd, sd, "d2");
  d3 = await h.vm(0, vd, sd, "d3");

  const sgA = (await fw.createSecurityGroup({ vpc: va.id, name: "web", rules: [tcpRule(443)] })).securityGroup!.id;
  const sgB = (await fw.createSecurityGroup({ vpc: vb.id, name: "web", rules: [tcpRule(443), udpRule(UDP_OPEN)] })).securityGroup!.id;
  const bind = (vm: Vm, groups: string[]) =>
    fw.bindNic({
      nicId: vm.nicId,
      vpc: vm.vpc.id,
      subnet: vm.subnet.id,
      address: vm.address,
      mac: vm.mac,
      hostInterface: vm.hostInterface,
      securityGroups: groups,
    });
  await bind(a1, [sgA]);
  await bind(b1, [sgB]);
  await bind(c1, []);
  await bind(c2, []);
  const icmp = (type: number, code?: number) => ({
    direction: Direction.INGRESS,
    protocol: Protocol.ICMP,
    icmpType: type,
    icmpCode: code,
    peer: { case: "cidr" as const, value: "10.3.0.0/16" },
  });
  await bind(d1, []);
  await bind(d2, [(await fw.createSecurityGroup({ vpc: vd.id, name: "echo-code-0", rules: [icmp(8, 0)] })).securityGroup!.id]);
  await bind(d3, [(await fw.createSecurityGroup({ vpc: vd.id, name: "echo-any-code", rules: [icmp(8)] })).securityGroup!.id]);

  await startHttpServer(a1.ns, "tenant A", 443);
  await startHttpServer(b1.ns, "tenant B", 443);
  udp = await udpListener(b1, [UDP_OPEN, UDP_CLOSED]);
  await gw.setInstanceMetadata({
    metadata: { instanceId: "i-tenant-b", vpcId: vb.id, subnetId: b1.subnet.id, localIpv4: b1.address, mac: b1.mac, hostname: "b1" },
  });

  await gw.createPortForward({ vpc: va.id, protocol: Protocol.TCP, outsidePort: 443, privateAddress: a1.address });
  const fip = (await gw.allocateFloatingIp({})).floatingIp!;
  await gw.associateFloatingIp({ floatingIp: fip.id, vpc: vb.id, privateAddress: b1.address });
  fipB = fip.address;
}, 180_000);

afterAll(async () => {
  udp?.child.kill("SIGTERM");
  await gwd?.stop();
  await fwd?.stop();
  const root = h ? await h.rootChanges() : [];
  const left = await h?.close();
  assert.deepEqual(root, [], "the root namespace was not changed");
  assert.deepEqual(left ?? [], []);
}, 60_000);

describe("port forwards take the uplink address only", () => {
  test("tenant A's forward of tcp/443: the host's :443 reaches A; B's floating IP :443 still reaches B, not A", async () => {
    await eventually(async () => (await httpGet(inet.ns, `http://${hostAddr}:443/`)) === "tenant A", "uplink:443 → tenant A's VM (the forward works)");
    await eventually(async () => (await httpGet(inet.ns, `http://${fipB}:443/`)) !== null, "B's floating IP answers on 443");
    // The hijack: before the fix the forward DNATed every address's :443 on the uplink to A.
    for (let i = 0; i < 3; i++) assert.equal(await httpGet(inet.ns, `http://${fipB}:443/`), "tenant B", "B's FIP:443 reaches B's VM, not A's");
  }, 60_000);

  test("a forward on a port the hypervisor serves (SSH, gRPC, metrics) is refused with FAILED_PRECONDITION, nothing applied", async () => {
    for (const port of [22, 7401, 7405, 9403]) {
      await rejectsWith(
        gw.createPortForward({ vpc: "tenant-a", protocol: Protocol.TCP, outsidePort: port, privateAddress: a1.address }),
        Code.FailedPrecondition,
        new RegExp(`outside port ${port} is reserved.*--reserved-ports`),
      );
    }
    await rejectsWith(
      gw.createPortForward({ vpc: "tenant-a", protocol: Protocol.UDP, outsidePort: 7403, privateAddress: a1.address }),
      Code.FailedPrecondition,
      /reserved/,
    );
    assert.deepEqual(
      (await gw.listPortForwards({})).portForwards.map((p) => p.outsidePort),
      [443],
      "only the allowed forward exists",
    );
    const map = (await nsExec(h.hosts[0].ns, "nft", ["list", "map", "ip", "microvpc_gw", "port_forward"])).stdout;
    assert.match(map, /tcp \. 443 :/);
    assert.doesNotMatch(map, /\. (22|740[1-5]|940[1-5]) :/, "no reserved port in the host's forward map");
  }, 60_000);

  test("a neighbour routing the transit range at the hypervisor does not reach the forward around the uplink address", async () => {
    const transitA = await addrOf(a1.vpcNs, names.vpcSide(a1.vpc.id));
    await nsExec(inet.ns, "ip", ["route", "replace", "169.254.0.0/16", "via", hostAddr]);
    try {
      assert.equal(await httpGet(inet.ns, `http://${hostAddr}:443/`), "tenant A", "the allowed path still works");
      assert.notEqual(
        await tcpConnect(inet.ns, transitA, 443, 1500),
        "connected",
        `${transitA}:443 (the VPC end of the transit link) is not reachable from outside`,
      );
    } finally {
      await nsExec(inet.ns, "ip", ["route", "del", "169.254.0.0/16"]);
    }
  }, 60_000);
});

describe("link-local sources get no pass around security groups", () => {
  test("from the internet: a spoofed 169.254.x.y source reaches neither a closed nor an open port of a floating IP", async () => {
    // Allowed flow first: an ordinary source reaches the open port.
    await eventually(async () => {
      await udpSend(inet.ns, fipB, UDP_OPEN, "plain-open");
      return arrived("plain-open").length > 0;
    }, "an ordinary datagram to FIP:5001 (allowed by the group) arrives");
    await udpSend(inet.ns, fipB, UDP_CLOSED, "plain-closed");
    // The spoof: a link-local source on the internet's own interface, the
    // hypervisor's MAC for the floating IP pinned so no ARP carries it.
    const mac = (JSON.parse((await nsExec(h.hosts[0].ns, "ip", ["-j", "link", "show", "dev", "ul0"])).stdout) as { address: string }[])[0].address;
    await nsExec(inet.ns, "ip", ["addr", "add", `${SPOOF}/32`, "dev", "eth0"]);
    await nsExec(inet.ns, "ip", ["neigh", "replace", fipB, "lladdr", mac, "dev", "eth0", "nud", "permanent"]);
    // A probe table of the test's own (the gateway re-applies its tables, and
    // their counters, on every drift pass): did the spoofed packets reach
    // the hypervisor at all?
    await nsExec(h.hosts[0].ns, "nft", ["-f", "-"], {
      input: `table ip tenant_probe {\n  counter spoofed { }\n  chain pre { type filter hook prerouting priority -400; policy accept;\n    iifname "ul0" ip saddr ${SPOOF} counter name spoofed\n  }\n}\n`,
    });
    try {
      await udpSend(inet.ns, fipB, UDP_CLOSED, "spoof-closed", SPOOF);
      await udpSend(inet.ns, fipB, UDP_OPEN, "spoof-open", SPOOF);
      await sleep(1500);
    } finally {
      await nsExec(inet.ns, "ip", ["addr", "del", `${SPOOF}/32`, "dev", "eth0"]);
    }
    const probe = JSON.parse((await nsExec(h.hosts[0].ns, "nft", ["-j", "list", "counter", "ip", "tenant_probe", "spoofed"])).stdout) as {
      nftables: { counter?: { packets: number } }[];
    };
    await nsExec(h.hosts[0].ns, "nft", ["delete", "table", "ip", "tenant_probe"]);
    assert.equal(probe.nftables.find((o) => o.counter)?.counter?.packets, 6, "all six spoofed datagrams reached the hypervisor's uplink");
    assert.equal(arrived("plain-closed").length, 0, "control: the group closes 5002 to ordinary sources");
    assert.deepEqual(arrived("spoof-closed"), [], "a link-local source does not open a closed port");
    assert.deepEqual(arrived("spoof-open"), [], "a link-local source from the uplink is dropped at the host, open port or not");
  }, 60_000);

  test("inside the VPC: a link-local source from the transit link (not a metadata answer) meets the groups like any other", async () => {
    // Sent from the hypervisor's namespace: routed to the FIP through the
    // transit link with the host's transit address (169.254.k.1) as source —
    // the host-side rule does not see it, only the VPC's firewall does.
    await udpSend(h.hosts[0].ns, fipB, UDP_OPEN, "transit-open");
    await udpSend(h.hosts[0].ns, fipB, UDP_CLOSED, "transit-closed");
    await eventually(async () => arrived("transit-open").length > 0, "allowed port: arrives");
    assert.match(arrived("transit-open")[0].from, /^169\.254\./, "it did carry a link-local source");
    await sleep(1000);
    assert.deepEqual(arrived("transit-closed"), [], "closed port: a link-local source is not accepted before the groups");
  }, 60_000);

  test("the metadata service still answers the VM (its link-local answers are ours)", async () => {
    await eventually(async () => (await imds(b1, "/latest/meta-data/instance-id")) === "i-tenant-b", "IMDS from tenant B's VM");
  }, 60_000);
});

// Echo requests with a chosen ICMP code from a raw socket (ping always sends
// code 0); prints how many of three got an echo reply.
const ECHO = `
import os, socket, struct, sys, time
dst, code = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(0.3)
ident = os.getpid() & 0xFFFF
def csum(b):
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    t = (t >> 16) + (t & 0xFFFF)
    t += t >> 16
    return ~t & 0xFFFF
got = 0
for seq in range(3):
    body = b"microvpc-icmp-code!!"
    c = csum(struct.pack("!BBHHH", 8, code, 0, ident, seq) + body)
    s.sendto(struct.pack("!BBHHH", 8, code, c, ident, seq) + body, (dst, 0))
    end = time.time() + 0.6
    while time.time() < end:
        try:
            data, addr = s.recvfrom(2048)
        except socket.timeout:
            break
        ihl = (data[0] & 15) * 4
        t, _, _, i, q = struct.unpack("!BBHHH", data[ihl:ihl + 8])
        if addr[0] == dst and t == 0 and i == ident and q == seq:
            got += 1
            break
print(got)
`;

/** Echo replies (of three requests with this ICMP code) that came back. */
async function echoReplies(from: Vm, to: Vm, code: number): Promise<number> {
  return Number((await nsExec(from.ns, "python3", ["-c", ECHO, to.address, String(code)], { timeoutMs: 15_000 })).stdout.trim());
}

describe("ICMP codes (icmp:TYPE/CODE)", () => {
  test("a group allowing echo code 0 only answers code 0 and not code 1; one allowing type 8 answers both", async () => {
    await eventually(async () => (await echoReplies(d1, d2, 0)) > 0, "icmp:8/0 lets echo code 0 in");
    await eventually(async () => (await echoReplies(d1, d3, 1)) > 0, "icmp:8 (every code) lets echo code 1 in");
    assert.equal(await echoReplies(d1, d2, 1), 0, "icmp:8/0 does not let echo code 1 in (the code used to be dropped by the compiler)");
    assert.ok((await echoReplies(d1, d2, 0)) > 0, "and still lets code 0 in");
  }, 60_000);
});

const HOLDER = `
const net = require("node:net");
const [host, port, n] = process.argv.slice(1);
const one = () => new Promise((r) => {
  const s = net.connect({ host, port: Number(port) });
  const t = setTimeout(() => { s.destroy(); r("timeout"); }, 3000);
  s.once("connect", () => { clearTimeout(t); r("connected"); });
  s.once("error", (e) => { clearTimeout(t); r(e.code || "error"); });
});
(async () => {
  const out = [];
  for (let i = 0; i < Number(n); i++) out.push(await one());
  process.stdout.write(JSON.stringify(out) + "\\n");
  process.stdin.resume(); // hold every connection until stdin closes
  process.stdin.on("end", () => process.exit(0));
})();
`;

describe("conntrack limit per VM (--conntrack-limit-per-vm)", () => {
  test(`a VM past ${CT_LIMIT} flows through the host's NAT has the excess refused, also after the gateway replaced the VPC's NAT table; another VM of the VPC still connects`, async () => {
    let fipC: FloatingIp | undefined;
    await eventually(async () => (await tcpConnect(c2.ns, inet.address, 80, 1500)) === "connected", "c2 reaches the internet (egress works)");
    const holder = trackChild(
      spawn("ip", ["netns", "exec", c1.ns, process.execPath, "-e", HOLDER, inet.address, "80", String(CT_LIMIT + 3)], { stdio: ["pipe", "pipe", "inherit"] }),
    );
    try {
      const line = await new Promise<string>((resolve, reject) => {
        let buf = "";
        holder.stdout!.setEncoding("utf8");
        holder.stdout!.on("data", (d: string) => {
          buf += d;
          if (buf.includes("\n")) resolve(buf.trim());
        });
        holder.once("exit", (c) => reject(new Error(`holder exited ${c}: ${buf}`)));
      });
      const got = JSON.parse(line) as string[];
      assert.deepEqual(got.slice(0, CT_LIMIT), Array(CT_LIMIT).fill("connected"), `the first ${CT_LIMIT} connect`);
      for (const r of got.slice(CT_LIMIT)) assert.notEqual(r, "connected", `past the limit: refused (${got.join(", ")})`);
      assert.ok(
        got.slice(CT_LIMIT).every((r) => r === "EHOSTUNREACH"),
        `refused at once (admin-prohibited), not left to time out: ${got.join(", ")}`,
      );
      // While c1 holds its flows, its neighbour is not affected.
      assert.equal(await tcpConnect(c2.ns, inet.address, 80, 2000), "connected", "another VM of the same VPC still connects");
      // Metadata requests are host conntrack entries too: counted the same way.
      assert.equal(await tcpConnect(c1.ns, "169.254.169.254", 80, 2000), "unreachable", "c1 at its limit opens no metadata flow either");
      assert.equal(await tcpConnect(c2.ns, "169.254.169.254", 80, 2000), "connected", "c2 reaches the metadata server");
      // The attack: make the gateway replace the VPC's NAT table (here a
      // floating IP for c2; the drift pass does the same every interval).
      // The counts used to live in that table, so each replacement let c1
      // open CT_LIMIT flows more. They now survive it.
      fipC = (await gw.allocateFloatingIp({})).floatingIp!;
      await gw.associateFloatingIp({ floatingIp: fipC.id, vpc: c2.vpc.id, privateAddress: c2.address });
      const fipAddr = fipC.address;
      await eventually(
        async () => (await nsExec(c2.vpcNs, "nft", ["list", "map", "ip", "microvpc_gw", "fip_in"], { check: false })).stdout.includes(fipAddr),
        "the gateway replaced the VPC's NAT table (c2's floating IP is in it)",
      );
      assert.equal(await tcpConnect(c1.ns, inet.address, 80, 2000), "unreachable", "c1 is still at its limit after the NAT table was replaced");
      assert.equal(await tcpConnect(c1.ns, "169.254.169.254", 80, 2000), "unreachable", "…for metadata flows too");
      assert.equal(await tcpConnect(c2.ns, inet.address, 80, 2000), "connected", "c2 still connects");
    } finally {
      holder.stdin!.end();
      if (fipC) await gw.releaseFloatingIp({ floatingIp: fipC.id, force: true }).catch(() => undefined);
    }
    // Flows closed: c1 connects again.
    await eventually(async () => (await tcpConnect(c1.ns, inet.address, 80, 1500)) === "connected", "c1 connects again once its flows are closed", 30_000);
  }, 90_000);
});
