// The quickstart's demo: the vpcctl tutorial's blog, built through the
// microvpc APIs on the single-host stack that deploy/quickstart.sh started,
// then a reachability matrix checked with real packets.
//   node --import tsx deploy/demo.ts
// Addresses come from MICROVPC_* variables set by the quickstart.
import { execFile, spawn } from "node:child_process";
import { promisify } from "node:util";
import Table from "cli-table3";
import { Direction, FirewallService, Protocol } from "../gen/microvpc/v1/firewall_pb.js";
import { GatewayService } from "../gen/microvpc/v1/gateway_pb.js";
import { SubnetService, SubnetType } from "../gen/microvpc/v1/subnet_pb.js";
import { VmKind, VmService, type Vm } from "../gen/microvpc/v1/vm_pb.js";
import { VpcService } from "../gen/microvpc/v1/vpc_pb.js";
import { grpcClient } from "../services/common/client.js";

const pexec = promisify(execFile);
const env = (k: string, d: string) => process.env[k] ?? d;
const INET_NS = env("MICROVPC_DEMO_INTERNET_NS", "mvpcqs-inet");
const INET_ADDR = env("MICROVPC_DEMO_INTERNET_ADDR", "192.168.250.200");
const HOST_ADDR = env("MICROVPC_DEMO_HOST_ADDR", "192.168.250.10");

const c = {
  vpc: grpcClient(VpcService, { address: env("MICROVPC_SERVER", "127.0.0.1:7401") }),
  subnet: grpcClient(SubnetService, { address: env("MICROVPC_SERVER", "127.0.0.1:7401") }),
  fw: grpcClient(FirewallService, { address: env("MICROVPC_FIREWALL", "127.0.0.1:7403") }),
  gw: grpcClient(GatewayService, { address: env("MICROVPC_GATEWAY", "127.0.0.1:7404") }),
  vmm: grpcClient(VmService, { address: env("MICROVPC_VMM", "127.0.0.1:7405"), timeoutMs: 30_000 }),
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

async function main(): Promise<void> {
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
  say("NAT gateway in web, for the private db subnet");
  const nat = (await c.gw.createNatGateway({ vpc: "blog", subnet: "web", clientToken: "demo-nat" })).natGateway!;
  say("two VMs (kind=netns): web-1 in web, db-1 in db");
  const w = (await c.vmm.createVm({ name: "web-1", vpc: "blog", subnet: "web", securityGroups: ["web"], kind: VmKind.NETNS })).vm!;
  const d = (await c.vmm.createVm({ name: "db-1", vpc: "blog", subnet: "db", securityGroups: ["db"], kind: VmKind.NETNS })).vm!;
  const addr = (v: Vm) => v.nics[0].guest!.address;
  serve(w.namespace, 80, "blog front page");
  serve(w.namespace, 22, "ssh");
  serve(d.namespace, 5432, "postgres");
  say("a floating IP for web-1");
  const fip = (await c.gw.allocateFloatingIp({})).floatingIp!;
  await c.gw.associateFloatingIp({ floatingIp: fip.id, vpc: "blog", privateAddress: addr(w) });
  await new Promise((r) => setTimeout(r, 2500));

  const rows: [string, string, string, string][] = [];
  const check = async (from: string, ns: string, to: string, host: string, port: number, expect: string) => {
    const got = await inNs(ns, PROBE, host, String(port));
    rows.push([
      from,
      `${to}:${port}`,
      got === "open" ? "reachable" : "blocked",
      got === "open" ? (expect === "reachable" ? "✓ as designed" : "✗ UNEXPECTED") : expect === "blocked" ? "✓ as designed" : "✗ UNEXPECTED",
    ]);
  };
  await check("web-1", w.namespace, `db-1 ${addr(d)}`, addr(d), 5432, "reachable");
  await check("db-1", d.namespace, `web-1 ${addr(w)}`, addr(w), 80, "reachable");
  await check("db-1", d.namespace, `web-1 ${addr(w)}`, addr(w), 22, "reachable");
  serve(d.namespace, 22, "ssh");
  await check("web-1", w.namespace, `db-1 ${addr(d)}`, addr(d), 22, "blocked");
  await check("internet", INET_NS, `web-1 via FIP ${fip.address}`, fip.address, 80, "reachable");
  await check("internet", INET_NS, `web-1 via FIP ${fip.address}`, fip.address, 22, "blocked");
  await check("internet", INET_NS, `db-1 ${addr(d)}`, addr(d), 5432, "blocked");
  const table = new Table({ head: ["from", "to", "result", "check"], style: { head: [], border: [] } });
  table.push(...rows);
  console.log(`\nReachability (packets, not rules):\n${table.toString()}`);
  const seen = new Table({
    head: ["VM", "the internet sees", "instance-id from 169.254.169.254", "web-1.blog.internal (VPC DNS)"],
    style: { head: [], border: [] },
  });
  for (const v of [w, d]) {
    seen.push([
      v.name,
      await inNs(v.namespace, GET, INET_ADDR, "80", "/"),
      await inNs(v.namespace, GET, "169.254.169.254", "80", "/latest/meta-data/instance-id"),
      await lookup(v.namespace, "web-1.blog.internal"),
    ]);
  }
  console.log(seen.toString());
  console.log(
    `web-1 leaves as its floating IP ${fip.address}; db-1 (private) leaves as the NAT gateway's own address ${nat.address} (held by ${(await c.gw.getNatGateway({ vpc: "blog" })).natGateway!.holderHostId || "no host yet"}), not as the hypervisor ${HOST_ADDR}.`,
  );
  if (rows.some((r) => r[3].includes("UNEXPECTED"))) process.exit(1);
}

main().catch((e) => {
  console.error(`demo failed: ${e instanceof Error ? e.message : e}`);
  process.exit(1);
});
