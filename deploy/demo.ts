// The quickstart's demo: the vpcctl tutorial's blog, built through the
// microvpc APIs and spread over the three simulated hypervisors that
// deploy/quickstart.sh started (joined by the WireGuard overlay), a second VPC
// with the same CIDR beside it, then a reachability matrix checked with real
// packets (allowed and denied pairs), what the internet sees, and a VPN
// client in the internet namespace reaching web-1 (and nothing else).
//   node --import tsx deploy/demo.ts
// Addresses come from MICROVPC_* variables set by the quickstart.
import { execFile, spawn } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import Table from "cli-table3";
import { Direction, FirewallService, Protocol } from "../gen/microvpc/v1/firewall_pb.js";
import { GatewayService } from "../gen/microvpc/v1/gateway_pb.js";
import { SubnetService, SubnetType } from "../gen/microvpc/v1/subnet_pb.js";
import { VmKind, VmService, type Vm } from "../gen/microvpc/v1/vm_pb.js";
import { VpcService } from "../gen/microvpc/v1/vpc_pb.js";
import { VpnService } from "../gen/microvpc/v1/vpn_pb.js";
import { grpcClient } from "../services/common/client.js";
import { wgName } from "../services/common/names.js";
import { parseClientConfig, startVpnClient, type ClientConfig } from "./vpn-client.js";

const pexec = promisify(execFile);
const env = (k: string, d: string) => process.env[k] ?? d;
const INET_NS = env("MICROVPC_DEMO_INTERNET_NS", "mvpcqs-inet");
const INET_ADDR = env("MICROVPC_DEMO_INTERNET_ADDR", "192.168.250.200");
const HOST_ADDR = env("MICROVPC_DEMO_HOST_ADDR", "192.168.250.10");
/** The hypervisors: `hostId=vmm address`, comma-separated (the quickstart's three). */
const HOSTS = env("MICROVPC_DEMO_HOSTS", `qs=${env("MICROVPC_VMM", "127.0.0.1:7405")}`)
  .split(",")
  .map((x) => {
    const [id, address] = x.split("=");
    return { id, vmm: grpcClient(VmService, { address, timeoutMs: 30_000 }) };
  });
/** The VPN endpoint of blog: `hostId=address:port` (the quickstart: host 2's uplink), or host 1 at HOST_ADDR. */
const VPN_EP = /^([a-z0-9]+)=([0-9.]+):([0-9]+)$/.exec(env("MICROVPC_DEMO_VPN_ENDPOINT", `${HOSTS[0].id}=${HOST_ADDR}:51820`));
/** The netagent the VPN calls go to: the endpoint host's, which applies a new client at once (another host's leaves it to the endpoint's next poll). */
const VPN_NETAGENT = env("MICROVPC_DEMO_VPN_NETAGENT", env("MICROVPC_NETAGENT", "127.0.0.1:7402"));
/** The VPN client's wireguard-go interface in the internet namespace; its PID goes to RUN_DIR/vpn/IFNAME.pid for `down`. */
const VPN_IF = env("MICROVPC_DEMO_VPN_IFNAME", "mvpcqs-laptop");
const RUN_DIR = env("MICROVPC_DEMO_RUN_DIR", ".run");
/** The CLI beside the demo (dist/demo.js and deploy/demo.ts alike): the client's wg-quick file is what it prints. */
const CLI = fileURLToPath(new URL("../bin/microvpc.js", import.meta.url));
/** The i-th hypervisor (or the last one when there are fewer). */
const hv = (i: number) => HOSTS[Math.min(i, HOSTS.length - 1)];

const c = {
  vpc: grpcClient(VpcService, { address: env("MICROVPC_SERVER", "127.0.0.1:7401") }),
  subnet: grpcClient(SubnetService, { address: env("MICROVPC_SERVER", "127.0.0.1:7401") }),
  fw: grpcClient(FirewallService, { address: env("MICROVPC_FIREWALL", "127.0.0.1:7403") }),
  gw: grpcClient(GatewayService, { address: env("MICROVPC_GATEWAY", "127.0.0.1:7404") }),
  vpn: grpcClient(VpnService, { address: VPN_NETAGENT, timeoutMs: 30_000 }),
};

const say = (s: string) => process.stdout.write(`\x1b[1m→ ${s}\x1b[0m\n`);

const PROBE = `const s=require("net").connect({host:process.argv[1],port:+process.argv[2]});setTimeout(()=>{process.stdout.write("blocked");process.exit(0)},1500);
s.on("connect",()=>{process.stdout.write("open");process.exit(0)});s.on("error",(e)=>{process.stdout.write(e.code==="ECONNREFUSED"?"refused":"blocked");process.exit(0)})`;
const GET = `require("http").get({host:process.argv[1],port:+process.argv[2],path:process.argv[3],timeout:2000},(r)=>{let b="";r.on("data",(d)=>b+=d);r.on("end",()=>{process.stdout.write(b);process.exit(0)})}).on("error",()=>{process.stdout.write("—");process.exit(0)}).on("timeout",()=>{process.stdout.write("—");process.exit(0)})`;

async function inNs(ns: string, script: string, ...args: string[]): Promise<string> {
  return (await pexec("ip", ["netns", "exec", ns, process.execPath, "-e", script, ...args], { timeout: 10_000 })).stdout.trim();
}

/** The address busybox nslookup gets for name from the VPC resolver (10.0.0.2), or "—". */
async function lookup(ns: string, name: string): Promise<string> {
  try {
    const out = (await pexec("ip", ["netns", "exec", ns, "busybox", "nslookup", name, "10.0.0.2"], { timeout: 10_000 })).stdout;
    return /Name:[^\n]*\nAddress:? *([0-9.]+)/.exec(out)?.[1] ?? "—";
  } catch {
    return "—";
  }
}

function serve(ns: string, port: number, body: string): void {
  const p = spawn("ip", ["netns", "exec", ns, process.execPath, "-e", `require("http").createServer((q,r)=>r.end(${JSON.stringify(body)})).listen(${port})`], {
    stdio: "ignore",
    detached: true,
  });
  p.unref();
}

const tcp = (port: number, cidr: string) => ({
  direction: Direction.INGRESS,
  protocol: Protocol.TCP,
  portFrom: port,
  portTo: port,
  peer: { case: "cidr" as const, value: cidr },
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Polls until probe() holds (or timeoutMs passes); whether it held. */
async function until(probe: () => Promise<boolean>, timeoutMs: number): Promise<boolean> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    if (await probe()) return true;
    if (Date.now() > end) return false;
    await sleep(300);
  }
}

/** Peers of a VPC's WireGuard interface on one host, and the bytes sent and received over it ("—" if none). */
async function overlayTraffic(hostId: string, vpcId: string): Promise<string> {
  try {
    const out = (await pexec("ip", ["netns", "exec", `mvpc-${hostId}-${vpcId}`, "wg", "show", wgName(hostId, vpcId), "transfer"], { timeout: 10_000 })).stdout;
    let rx = 0;
    let tx = 0;
    let peers = 0;
    for (const line of out.trim().split("\n").filter(Boolean)) {
      const f = line.split(/\s+/);
      rx += Number(f[1]);
      tx += Number(f[2]);
      peers++;
    }
    return `${peers} peers, ${tx} B sent, ${rx} B received`;
  } catch {
    return "—";
  }
}

const VPN_GROUP = "vpn-web";
const VPN_CLIENT_CIDR = "10.0.250.0/24";

/**
 * Remote access, before the client exists: blog's VPN endpoint on VPN_EP's
 * host, a group that lets clients reach web-1:80 and nothing else, and a
 * client added with the CLI, whose printed wg-quick file is returned. Runs
 * while the overlay settles.
 */
async function prepareVpn(web: Vm): Promise<{ config: ClientConfig; text: string; command: string }> {
  if (!VPN_EP) throw new Error("MICROVPC_DEMO_VPN_ENDPOINT is not HOSTID=ADDRESS:PORT");
  await c.vpn.setVpnEndpoint({ vpc: "blog", hostId: VPN_EP[1], publicAddress: VPN_EP[2], listenPort: Number(VPN_EP[3]), clientCidr: VPN_CLIENT_CIDR });
  const to = `${web.nics[0].guest!.address}/32`;
  await c.fw.createSecurityGroup({
    vpc: web.vpcId,
    name: VPN_GROUP,
    rules: [{ direction: Direction.EGRESS, protocol: Protocol.TCP, portFrom: 80, portTo: 80, peer: { case: "cidr", value: to } }],
  });
  const args = ["vpn", "client", "add", "--vpc", "blog", "--name", "laptop", "--security-group", VPN_GROUP];
  const text = (await pexec(process.execPath, [CLI, "--netagent", VPN_NETAGENT, ...args], { timeout: 30_000 })).stdout;
  // CreateVpnClient returns before the endpoint host has the client's peer;
  // a handshake that comes first is dropped and WireGuard retries only 5 s
  // later. Wait (bounded) for the peer on the endpoint, as a user would not
  // notice but a one-minute demo does.
  const key = (await c.vpn.getVpnClient({ client: "laptop", vpc: "blog" })).client!.publicKey;
  const peers = () =>
    pexec("ip", ["netns", "exec", `mvpc-${VPN_EP[1]}-${web.vpcId}`, "wg", "show", "all", "peers"], { timeout: 10_000 }).then(
      (r) => r.stdout.includes(key),
      () => false,
    );
  if (!(await until(peers, 10_000))) console.log(`(the endpoint on ${VPN_EP[1]} had no peer for laptop within 10 s)`);
  return { config: parseClientConfig(text), text, command: `microvpc ${args.join(" ")}` };
}

/** The client's WireGuard interface: its peer, the last handshake and the bytes over it. */
async function clientTunnel(): Promise<string> {
  try {
    const out = (await pexec("ip", ["netns", "exec", INET_NS, "wg", "show", VPN_IF, "dump"], { timeout: 10_000 })).stdout;
    const f = out.trim().split("\n")[1]?.split("\t") ?? [];
    const ago = Math.max(0, Math.round(Date.now() / 1000 - Number(f[4])));
    return `peer ${f[2]}, handshake ${Number(f[4]) > 0 ? `${ago} s ago` : "none"}, ${f[6]} B sent, ${f[5]} B received`;
  } catch {
    return "—";
  }
}
/** Flow logs on for web-1's NIC (a FlowLogConfig; the quickstart's firewalls run with --flow-logs). A re-run finds it made. */
async function logFlowsOf(v: Vm): Promise<void> {
  // The demo's subject is the matrix: a failure here is said, not fatal.
  await c.fw.createFlowLogConfig({ resourceId: v.nics[0].id, description: "demo" }).catch((e: Error) => {
    if (!/already has flow-log config/.test(e.message)) console.log(`(flow logs for ${v.name} not turned on: ${e.message})`);
  });
}

/**
 * A flow-log excerpt after the matrix: `microvpc flow-logs --vm web-1
 * --since 5m` on web-1's host. Rejected probes are there within a second;
 * an accepted flow's record comes when its conntrack entry expires (TIME_WAIT,
 * up to two minutes): those of an earlier run, if any, are shown too.
 */
async function flowLogExcerpt(v: Vm): Promise<string | null> {
  const ask = () => c.fw.listFlowLogs({ vmIds: [v.id], since: { seconds: BigInt(Math.floor(Date.now() / 1000) - 300), nanos: 0 }, limit: 8 });
  const got = await until(async () => (await ask()).records.some((r) => r.action === "reject"), 8_000).catch(() => false);
  const recs = await ask().then(
    (r) => r.records,
    () => [],
  );
  if (!got && recs.length === 0) return "Flow logs: no records of web-1 yet (does the firewall run with --flow-logs?)";
  const t = new Table({ head: ["end", "vm", "src → dst", "proto", "packets", "action", "decided by"], style: { head: [], border: [] } });
  for (const r of recs.slice(-6))
    t.push([
      new Date(Number(r.endTime?.seconds ?? 0n) * 1000).toISOString().slice(11, 19),
      r.vmId,
      `${r.src}:${r.srcPort} → ${r.dst}:${r.dstPort}`,
      r.protocol,
      String(r.packets),
      r.action,
      r.decidedBy,
    ]);
  return `Flow logs of web-1 (\`microvpc flow-logs --vm web-1 --vpc blog --since 5m\`, the newest):\n${t.toString()}`;
}

async function main(): Promise<void> {
  const t0 = Date.now();
  /** Where the time goes (said at the end): the machine's load moves all of it. */
  const phases: [string, number][] = [];
  const phase = (what: string) => phases.push([what, Date.now()]);
  const [h1, h2, h3] = [hv(0), hv(1), hv(2)];
  say("VPC blog 10.0.0.0/16 with a public web subnet and a private db subnet");
  const vpc = (await c.vpc.createVpc({ name: "blog", cidr: "10.0.0.0/16", clientToken: "demo-blog" })).vpc!;
  await c.subnet.createSubnet({ vpc: "blog", name: "web", cidr: "10.0.1.0/24", type: SubnetType.PUBLIC, clientToken: "demo-web" });
  await c.subnet.createSubnet({ vpc: "blog", name: "db", cidr: "10.0.2.0/24", type: SubnetType.PRIVATE, clientToken: "demo-db" });
  say("security groups: web (80 from anywhere, 22 from the VPC), db (5432 from web only)");
  const web = (await c.fw.createSecurityGroup({ vpc: vpc.id, name: "web", rules: [tcp(80, "0.0.0.0/0"), tcp(22, "10.0.0.0/16")] })).securityGroup!;
  await c.fw.createSecurityGroup({
    vpc: vpc.id,
    name: "db",
    rules: [{ direction: Direction.INGRESS, protocol: Protocol.TCP, portFrom: 5432, portTo: 5432, peer: { case: "securityGroupId", value: web.id } }],
  });
  say("NAT gateway in web, with its own public address, for the private db subnet");
  const nat = (await c.gw.createNatGateway({ vpc: "blog", subnet: "web", clientToken: "demo-nat" })).natGateway!;
  say(`VMs (kind=netns) spread over ${HOSTS.length} hypervisors: web-1 and db-3 on ${h1.id}, db-1 on ${h2.id}, db-2 on ${h3.id}`);
  const [w, d, d2, d3] = await Promise.all([
    h1.vmm.createVm({ name: "web-1", vpc: "blog", subnet: "web", securityGroups: ["web"], kind: VmKind.NETNS }),
    h2.vmm.createVm({ name: "db-1", vpc: "blog", subnet: "db", securityGroups: ["db"], kind: VmKind.NETNS }),
    h3.vmm.createVm({ name: "db-2", vpc: "blog", subnet: "db", securityGroups: ["db"], kind: VmKind.NETNS }),
    h1.vmm.createVm({ name: "db-3", vpc: "blog", subnet: "db", securityGroups: ["db"], kind: VmKind.NETNS }),
  ]).then((r) => r.map((x) => x.vm!));
  say(`VPC shop, the same 10.0.0.0/16 as blog, with one VM on ${h1.id} (web-1's host): isolated from blog`);
  const shop = (await c.vpc.createVpc({ name: "shop", cidr: "10.0.0.0/16", clientToken: "demo-shop" })).vpc!;
  await c.subnet.createSubnet({ vpc: "shop", name: "db", cidr: "10.0.2.0/24", type: SubnetType.PRIVATE, clientToken: "demo-shop-db" });
  await c.fw.createSecurityGroup({ vpc: shop.id, name: "open", rules: [tcp(80, "0.0.0.0/0")] });
  const s1 = (await h1.vmm.createVm({ name: "shop-1", vpc: "shop", subnet: "db", securityGroups: ["open"], kind: VmKind.NETNS })).vm!;
  say(`flow logs on for web-1's NIC (FlowLogConfig; ${h1.id}'s firewall writes them)`);
  await logFlowsOf(w);
  const addr = (v: Vm) => v.nics[0].guest!.address;
  const where = (v: Vm) => `${v.name}@${v.hostId}`;
  serve(w.namespace, 80, "blog front page");
  serve(w.namespace, 22, "ssh");
  serve(d.namespace, 5432, "postgres");
  serve(d.namespace, 22, "ssh");
  serve(d2.namespace, 5432, "postgres");
  serve(s1.namespace, 80, "shop front page");
  say("a floating IP for web-1");
  const fip = (await c.gw.allocateFloatingIp({})).floatingIp!;
  await c.gw.associateFloatingIp({ floatingIp: fip.id, vpc: "blog", privateAddress: addr(w) });
  say(`VPN: blog's endpoint on ${VPN_EP?.[1]} (${VPN_EP?.[2]}:${VPN_EP?.[3]}, clients ${VPN_CLIENT_CIDR}), group ${VPN_GROUP} (web-1:80 only), client laptop`);
  const vpnT = { start: Date.now(), added: 0, up: 0, reached: 0 };
  const vpnPrep = prepareVpn(w).then((x) => ((vpnT.added = Date.now()), x));
  vpnPrep.catch(() => {}); // awaited below; its error is the demo's

  type Check = [from: string, ns: string, to: string, host: string, port: number, expect: "reachable" | "blocked"];
  const checks: Check[] = [
    [where(w), w.namespace, `${where(d)} ${addr(d)}`, addr(d), 5432, "reachable"],
    [where(w), w.namespace, `${where(d2)} ${addr(d2)}`, addr(d2), 5432, "reachable"],
    [where(d), d.namespace, `${where(w)} ${addr(w)}`, addr(w), 80, "reachable"],
    [where(d2), d2.namespace, `${where(w)} ${addr(w)}`, addr(w), 22, "reachable"],
    [where(w), w.namespace, `${where(d)} ${addr(d)}`, addr(d), 22, "blocked"],
    [where(d2), d2.namespace, `${where(d)} ${addr(d)}`, addr(d), 5432, "blocked"],
    [`${where(s1)} (shop)`, s1.namespace, `${where(w)} ${addr(w)}`, addr(w), 80, "blocked"],
    ["internet", INET_NS, `web-1 via FIP ${fip.address}`, fip.address, 80, "reachable"],
    ["internet", INET_NS, `web-1 via FIP ${fip.address}`, fip.address, 22, "blocked"],
    ["internet", INET_NS, `${where(d)} ${addr(d)}`, addr(d), 5432, "blocked"],
  ];
  const probe = (list: Check[]) =>
    Promise.all(
      list.map(async ([from, ns, to, host, port, expect]) => {
        const got = (await inNs(ns, PROBE, host, String(port))) === "open" ? "reachable" : "blocked";
        return [from, `${to}:${port}`, got === "reachable" ? "allowed" : "denied", got === expect ? "✓ as designed" : "✗ UNEXPECTED"];
      }),
    );
  // The internet's rows toward private addresses go first: once the VPN
  // client is up in the internet namespace, the VPC CIDR is routed into its
  // tunnel. Then the client, from the file the CLI printed, comes up while
  // the overlay and the NAT path settle.
  const direct = checks.filter(([, ns, , host]) => ns === INET_NS && host.startsWith("10."));
  const directRows = probe(direct);
  let tunneled = false;
  const vpnUp = (async () => {
    await directRows;
    const vpn = await vpnPrep;
    await startVpnClient({
      ns: INET_NS,
      ifname: VPN_IF,
      config: vpn.text,
      dir: join(RUN_DIR, "vpn"),
      detached: true,
      onPid: (pid) => writeFileSync(join(RUN_DIR, "vpn", `${VPN_IF}.pid`), `${pid}\n`),
    });
    vpnT.up = Date.now();
    say(`VPN client laptop up: wireguard-go ${VPN_IF} in ${INET_NS}, from the wg-quick file \`${vpn.command}\` printed`);
    tunneled = await until(async () => (await inNs(INET_NS, PROBE, addr(w), "80")) === "open", 30_000);
    vpnT.reached = Date.now();
    if (!tunneled) console.log("(the VPN client did not reach web-1:80 within 30 s)");
    return vpn;
  })();
  vpnUp.catch(() => {});

  // The overlay and the NAT holder take a pass or two to settle: wait for
  // the first cross-host flow and for the NAT path rather than a fixed time.
  phase("made");
  const meshed = await until(async () => (await inNs(w.namespace, PROBE, addr(d), "5432")) === "open", 30_000);
  if (!meshed) console.log("(the overlay did not carry web-1 → db-1 within 30 s)");
  await until(async () => (await Promise.all([d, d2, d3].map((v) => inNs(v.namespace, GET, INET_ADDR, "80", "/")))).every((x) => x === nat.address), 20_000);
  // And for the floating IP: its association reaches web-1's host at that
  // gateway's next pass, which may come after the checks start.
  await until(async () => (await inNs(INET_NS, PROBE, fip.address, "80")) === "open", 20_000);
  const vpn = await vpnUp;

  phase("settled");
  const laptop = `VPN laptop ${vpn.config.address}`;
  const others = checks.filter((x) => !direct.includes(x));
  const [before, otherRows, vpnRows] = await Promise.all([
    directRows,
    probe(others),
    probe([
      [laptop, INET_NS, `${where(w)} ${addr(w)}`, addr(w), 80, "reachable"],
      [laptop, INET_NS, `${where(w)} ${addr(w)}`, addr(w), 22, "blocked"],
      [laptop, INET_NS, `${where(s1)} (shop) ${addr(s1)}`, addr(s1), 80, "blocked"],
    ]),
  ]);
  const rows = [...checks.map((x) => (direct.includes(x) ? before[direct.indexOf(x)] : otherRows[others.indexOf(x)])), ...vpnRows];
  phase("matrix");
  const table = new Table({ head: ["from", "to", "result", "check"], style: { head: [], border: [] } });
  table.push(...rows);
  console.log(`\nReachability matrix (packets, not rules):\n${table.toString()}`);
  const allowed = rows.filter((r) => r[2] === "allowed").length;
  console.log(`${allowed} allowed, ${rows.length - allowed} denied`);

  console.log(`\nCross-host: web-1 on ${h1.id} reached db-1 on ${h2.id} and db-2 on ${h3.id} through the WireGuard overlay:`);
  const ov = new Table({ head: ["hypervisor", `blog's WireGuard interface (VPC ${vpc.id})`], style: { head: [], border: [] } });
  for (const h of HOSTS) ov.push([h.id, await overlayTraffic(h.id, vpc.id)]);
  console.log(ov.toString());

  const twin = [d, d2, d3].find((v) => addr(v) === addr(s1)) ?? d;
  console.log(
    `\nOverlapping CIDRs: shop-1 (VPC shop) is ${addr(s1)} and ${twin.name} (VPC blog) is ${addr(twin)}, both in 10.0.0.0/16; shop-1 reaches nothing of blog, not even web-1:80, which blog opens to 0.0.0.0/0.`,
  );

  const seen = new Table({
    head: ["VM", "host", "the internet sees", "instance-id from 169.254.169.254", "web-1.blog.internal (VPC DNS)"],
    style: { head: [], border: [] },
  });
  const seenAs: string[] = [];
  for (const v of [w, d, d2, d3]) {
    const s = await inNs(v.namespace, GET, INET_ADDR, "80", "/");
    if (v !== w) seenAs.push(s);
    seen.push([
      v.name,
      v.hostId,
      s,
      await inNs(v.namespace, GET, "169.254.169.254", "80", "/latest/meta-data/instance-id"),
      await lookup(v.namespace, "web-1.blog.internal"),
    ]);
  }
  console.log(`\n${seen.toString()}`);
  const holder = (await c.gw.getNatGateway({ vpc: "blog" })).natGateway!.holderHostId || "no host yet";
  const one = seenAs.every((x) => x === nat.address);
  console.log(
    one
      ? `NAT gateway: the private VMs on ${[d3, d, d2].map((v) => v.hostId).join(", ")} leave as one address, the NAT gateway's own ${nat.address} (held by ${holder}), not as their hypervisors; web-1 as its floating IP ${fip.address}.`
      : `NAT gateway ${nat.address} (held by ${holder}): the private VMs were seen as ${seenAs.join(", ")} — ✗ UNEXPECTED (the hypervisor is ${HOST_ADDR})`,
  );
  console.log(
    `\nVPN client: \`${vpn.command}\` printed a wg-quick file (Address ${vpn.config.address}/32, AllowedIPs ${vpn.config.peer.allowedIps.join(", ")}, Endpoint ${vpn.config.peer.endpoint.host}:${vpn.config.peer.endpoint.port}); wireguard-go brought it up as ${VPN_IF} in ${INET_NS}: ${await clientTunnel()}. (The endpoint set and the client added in ${((vpnT.added - vpnT.start) / 1000).toFixed(1)} s; web-1:80 answered ${((vpnT.reached - vpnT.up) / 1000).toFixed(1)} s after wireguard-go was up.)`,
  );
  const vpnResults = rows.slice(checks.length);
  console.log(
    vpnResults.every((r) => r[3].includes("as designed"))
      ? `laptop reached web-1:80 on ${w.hostId} through the endpoint on ${VPN_EP?.[1]} and the overlay; not web-1:22, which web opens to the VPC but ${VPN_GROUP} does not; and nothing of shop: ${addr(s1)} through blog's VPN is blog's address, never shop-1's.`
      : `laptop: ${vpnResults.map((r) => `${r[1]} ${r[2]}`).join(", ")} — ✗ UNEXPECTED (${VPN_GROUP} allows web-1:80 only)`,
  );
  const logs = await flowLogExcerpt(w);
  if (logs) console.log(`\n${logs}`);
  phase("the rest");
  const took = phases.map(([what, t], i) => `${what} ${((t - (i ? phases[i - 1][1] : t0)) / 1000).toFixed(1)} s`);
  console.log(`demo done in ${((Date.now() - t0) / 1000).toFixed(1)} s (${took.join(", ")})`);
  if (!meshed || !one || !tunneled || rows.some((r) => r[3].includes("UNEXPECTED"))) process.exit(1);
}

main().catch((e) => {
  console.error(`demo failed: ${e instanceof Error ? e.message : e}`);
  process.exit(1);
});
