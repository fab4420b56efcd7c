// The two reference tutorials run through the `microvpc` CLI as written (in
// our grammar), with every reachable/blocked pair they imply checked with
// packets:
//   - the agentmetal networking guide (../shared/reference/agentmetal-networking-docs.txt):
//     VPC prod, a public web subnet, a private data subnet, a NAT gateway,
//     the web-sg security group, peering, listing;
//   - the vpcctl tutorial (../shared/reference/vpcctl-guide.txt): the blog
//     VPC, its webserver and database subnets, apps on 8080 and 5432, NAT,
//     apply-policy of database_policy.json (as `acl import`, vpcctl's literal
//     meaning, and as `sg import`, allow-only), peering, delete.
// Peering runs for real: allowed CIDRs, security groups naming the peer VPC's
// CIDR, and refusals (overlap, deleting a peered VPC).
//
// Every "blocked" assertion comes after a "reachable" one on the same path
// (same source, destination and port, with a server listening there) in the
// same test, so a broken probe cannot pass as a block.
//
// Safety: the harness's namespaces and the daemons' carry the run prefix; the
// gateway runs with --host-netns (the hypervisor's namespace) and never
// touches the root namespace.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, test } from "vitest";
import { type Daemon } from "../lib/daemon.js";
import { cliEnv, cliRunner, type CliRun } from "../lib/cli.js";
import { Harness } from "../lib/harness.js";
import { httpGet, listening, tcpConnect, tempDir, trackChild, waitFor } from "../lib/netns.js";

let h: Harness;
let fwd: Daemon | undefined, gwd: Daemon | undefined, vmmd: Daemon | undefined;
let inet: { ns: string; address: string };
let tmp: string;
const servers: ReturnType<typeof spawn>[] = [];

function globals(): string[] {
  const hv = h.hosts[0];
  return ["--server", h.ipamDaemon.address, "--netagent", hv.daemon.address, "--firewall", fwd!.address, "--gateway", gwd!.address, "--vmm", vmmd!.address];
}

const { run, expect, json } = cliRunner(globals, 120_000);

/** A VM as `vm get -o json` shows it: its namespace and address. */
async function vmInfo(name: string, vpc: string): Promise<{ id: string; ns: string; address: string; nic: string }> {
  const v = (await json(["vm", "get", name, "--vpc", vpc])).vm;
  assert.ok(v.namespace, `vm ${name} has a namespace`);
  return { id: v.id, ns: v.namespace, address: v.nics[0].guest.address, nic: v.nics[0].id };
}

const SERVER = `
const http = require("node:http");
const name = process.argv[1];
for (const p of process.argv.slice(2)) http.createServer((q, r) => r.end(name + ":" + p)).listen(Number(p), "0.0.0.0");
process.on("SIGTERM", () => process.exit(0));
`;

/** HTTP servers inside a VM's namespace, answering "NAME:PORT" on each port. */
async function serve(ns: string, name: string, ports: number[]): Promise<void> {
  const child = trackChild(spawn("ip", ["netns", "exec", ns, process.execPath, "-e", SERVER, name, ...ports.map(String)], { stdio: "ignore", env: cliEnv }));
  servers.push(child);
  for (const p of ports) {
    assert.ok(await waitFor(() => listening(ns, p), { timeoutMs: 10_000, intervalMs: 50 }), `server ${name} listening on ${p}`);
  }
}

/** `test-connectivity FROM TARGET:PORT` must say reachable (exit 0). Retried a little: rules apply asynchronously. */
async function reachable(from: string, target: string, vpc: string): Promise<void> {
  let r: CliRun = { code: -1, stdout: "", stderr: "" };
  const ok = await waitFor(async () => (r = await run(["test-connectivity", from, target, "--vpc", vpc])).code === 0, { timeoutMs: 10_000, intervalMs: 300 });
  assert.ok(ok, `${from} → ${target} should be reachable:\nexit ${r.code}\n${r.stdout}${r.stderr}`);
  assert.match(r.stdout, /^reachable: /);
}

/**
 * `test-connectivity FROM TARGET:PORT` must say not reachable (exit 8) because
 * packets are dropped (a timeout, not a refusal: a server listens there).
 */
async function blocked(from: string, target: string, vpc: string): Promise<void> {
  // Rules apply asynchronously: wait for the drop, then require it to hold.
  await waitFor(async () => (await run(["test-connectivity", from, target, "--vpc", vpc, "--wait-ms", "1000"])).code === 8, {
    timeoutMs: 10_000,
    intervalMs: 300,
  });
  const r = await run(["test-connectivity", from, target, "--vpc", vpc, "--wait-ms", "1000", "-o", "json"]);
  assert.equal(r.code, 8, `${from} → ${target} should be blocked:\nexit ${r.code}\n${r.stdout}${r.stderr}`);
  assert.equal(JSON.parse(r.stdout).result, "CONNECTIVITY_RESULT_TIMEOUT", `${from} → ${target}: dropped, not refused: ${r.stdout}`);
}

/** Not reachable in any way (dropped, or an ICMP error on the way): where no route leads there. */
async function unreachable(from: string, target: string, vpc: string): Promise<void> {
  await waitFor(async () => (await run(["test-connectivity", from, target, "--vpc", vpc, "--wait-ms", "1000"])).code !== 0, {
    timeoutMs: 10_000,
    intervalMs: 300,
  });
  const r = await run(["test-connectivity", from, target, "--vpc", vpc, "--wait-ms", "1000"]);
  assert.notEqual(r.code, 0, `${from} → ${target} should not be reachable:\n${r.stdout}${r.stderr}`);
  assert.doesNotMatch(r.stdout, /^reachable/);
}

/** HTTP GET from a namespace; the body, or null. Retried until `want` holds (or not). */
async function httpFrom(ns: string, url: string, want: (body: string | null) => boolean): Promise<string | null> {
  let body: string | null = null;
  await waitFor(async () => want((body = await httpGet(ns, url, 1500))), { timeoutMs: 10_000, intervalMs: 300 });
  return body;
}

const busy = async (p: Promise<unknown>) => {
  try {
    await p;
  } catch {
    // best effort
  }
};

beforeAll(async () => {
  h = await Harness.start({ hosts: 1 });
  const hv = h.hosts[0];
  tmp = tempDir("tutorials");
  inet = await h.internet();
  ({ fwd, gwd, vmmd } = await h.hostServices(hv, { vmm: true, driftMs: 3000 }));
});

afterAll(async () => {
  for (const s of servers) if (s.exitCode === null && s.signalCode === null) s.kill("SIGTERM");
  if (vmmd) {
    const vms = await run(["vm", "list", "-o", "json"]).catch(() => undefined);
    if (vms?.code === 0) for (const v of JSON.parse(vms.stdout).vms) await busy(run(["vm", "delete", v.id]));
  }
  for (const d of [vmmd, gwd, fwd]) await busy(d?.stop() ?? Promise.resolve());
  const left = await h?.close();
  assert.deepEqual(left ?? [], [], "namespaces left behind");
});

test("the agentmetal networking guide, as written, with packets", { timeout: 300_000 }, async () => {
  // Create a VPC; add subnets: the guide's commands word for word (--name).
  await expect(0, ["vpc", "create", "--name", "prod", "--cidr", "10.0.0.0/16"]);
  await expect(0, ["subnet", "create", "--vpc", "prod", "--name", "web", "--cidr", "10.0.1.0/24", "--type", "public"]);
  await expect(0, ["subnet", "create", "--vpc", "prod", "--name", "data", "--cidr", "10.0.2.0/24", "--type", "private"]);

  // Security groups, the guide's command and rule texts.
  let r = await expect(0, [
    "sg",
    "create",
    "--name",
    "web-sg",
    "--vpc",
    "prod",
    "--inbound",
    "tcp:80:0.0.0.0/0",
    "--inbound",
    "tcp:443:0.0.0.0/0",
    "--inbound",
    "tcp:22:10.0.0.0/16",
    "--outbound",
    "all:all:0.0.0.0/0",
  ]);
  assert.match(r.stdout, /web-sg/);

  // Resources in both subnets (the guide's "resources"): two web servers, one in data.
  await expect(0, ["vm", "create", "web1", "--vpc", "prod", "--subnet", "web", "--sg", "web-sg", "--kind", "netns"]);
  await expect(0, ["vm", "create", "web2", "--vpc", "prod", "--subnet", "web", "--sg", "web-sg", "--kind", "netns"]);
  await expect(0, ["vm", "create", "data1", "--vpc", "prod", "--subnet", "data", "--sg", "web-sg", "--kind", "netns"]);
  const web1 = await vmInfo("web1", "prod");
  const web2 = await vmInfo("web2", "prod");
  const data1 = await vmInfo("data1", "prod");
  assert.match(web1.address, /^10\.0\.1\.\d+$/);
  assert.match(web2.address, /^10\.0\.1\.\d+$/);
  assert.notEqual(web2.address, web1.address);
  assert.match(data1.address, /^10\.0\.2\.\d+$/);
  // Servers on the ports the guide names, and on one it does not open (8080).
  await serve(web1.ns, "web1", [80, 443, 22, 8080]);
  await serve(data1.ns, "data1", [80, 22, 8080]);

  // Inside the VPC: 80 and 443 from anywhere, 22 from 10.0.0.0/16; nothing else.
  // (Probes of one step run at once: each is its own CLI run, path and wait, as it was one after another.)
  await Promise.all([
    reachable("web2", `${web1.address}:80`, "prod"),
    reachable("web2", `${web1.address}:443`, "prod"),
    reachable("web2", `${web1.address}:22`, "prod"),
    // Subnet routing: across the two subnets, both ways.
    reachable("data1", `web1:80`, "prod"),
    reachable("data1", `${web1.address}:22`, "prod"),
    reachable("web1", `${data1.address}:22`, "prod"),
    reachable("web1", `${data1.address}:80`, "prod"),
  ]);
  // A port web-sg does not open: dropped. Reachable first on the same path with the port opened.
  await expect(0, ["sg", "rule", "add", "web-sg", "--vpc", "prod", "--inbound", "tcp:8080:10.0.0.0/16"]);
  await Promise.all([reachable("web2", `${web1.address}:8080`, "prod"), reachable("web1", `${data1.address}:8080`, "prod")]);
  await expect(0, ["sg", "rule", "remove", "web-sg", "--vpc", "prod", "--inbound", "tcp:8080:10.0.0.0/16"]);
  await Promise.all([blocked("web2", `${web1.address}:8080`, "prod"), blocked("web1", `${data1.address}:8080`, "prod")]);

  // Public subnet: direct internet access (the internet sees the hypervisor's address).
  const hostAddr = h.hosts[0].underlayAddress;
  const url = `http://${inet.address}/`;
  assert.equal(await httpFrom(web1.ns, url, (b) => b !== null), hostAddr, "web1 (public) reaches the internet");
  // Private subnet: no egress before the NAT gateway …
  assert.equal(await httpGet(data1.ns, url, 2000), null, "data1 (private) must not reach the internet before nat create");
  // … the guide's NAT gateway …
  r = await expect(0, ["nat", "create", "--vpc", "prod", "--subnet", "web"]);
  assert.match(r.stdout, /nat-[0-9a-f]{12}/);
  // The NAT gateway's own address (issue 16), not the hypervisor's.
  let natAddr: string = (await json(["nat", "get", "--vpc", "prod"])).natGateway.address;
  assert.notEqual(natAddr, hostAddr);
  assert.equal(await httpFrom(data1.ns, url, (b) => b !== null), natAddr, "data1 (private) reaches the internet through NAT, as the NAT gateway's address");
  // … and without it, again nothing (blocked after reachable on the same path).
  await expect(0, ["nat", "delete", "--vpc", "prod"]);
  assert.equal(await httpFrom(data1.ns, url, (b) => b === null), null, "data1 stops reaching the internet once the NAT gateway is deleted");
  await expect(0, ["nat", "create", "--vpc", "prod", "--subnet", "web"]);
  natAddr = (await json(["nat", "get", "--vpc", "prod"])).natGateway.address;
  assert.equal(await httpFrom(data1.ns, url, (b) => b !== null), natAddr, "data1 through NAT again");

  // From outside the VPC (the internet, through a floating IP): 80 and 443 yes, 22 (10.0.0.0/16 only) no.
  const fip = (await json(["fip", "allocate"])).floatingIp;
  await expect(0, ["fip", "associate", fip.id, "--vpc", "prod", "--address", web1.address]);
  const fromInternet = async (port: number, want: string) => {
    let got = "";
    await waitFor(async () => (got = await tcpConnect(inet.ns, fip.address, port, 1500)) === want, { timeoutMs: 10_000, intervalMs: 300 });
    return got;
  };
  const [p80, p443] = await Promise.all([fromInternet(80, "connected"), fromInternet(443, "connected")]);
  assert.equal(p80, "connected", "internet → web1 FIP:80");
  assert.equal(p443, "connected", "internet → web1 FIP:443");
  // 22 from the internet: reachable first while web-sg opens it to everyone, then the guide's rule.
  await expect(0, ["sg", "rule", "add", "web-sg", "--vpc", "prod", "--inbound", "tcp:22:0.0.0.0/0"]);
  assert.equal(await fromInternet(22, "connected"), "connected", "internet → web1 FIP:22 while open to 0.0.0.0/0");
  await expect(0, ["sg", "rule", "remove", "web-sg", "--vpc", "prod", "--inbound", "tcp:22:0.0.0.0/0"]);
  assert.equal(await fromInternet(22, "timeout"), "timeout", "internet → web1 FIP:22 dropped (tcp:22 only from 10.0.0.0/16)");
  assert.equal(await tcpConnect(inet.ns, fip.address, 80, 1500), "connected", "internet → web1 FIP:80 still");
  // web1 now leaves as its floating IP.
  assert.equal(await httpFrom(web1.ns, url, (b) => b === fip.address), fip.address);

  // VPC peering: agentmetal vpc peer create --vpc1 prod --vpc2 staging.
  await expect(0, ["vpc", "create", "staging", "--cidr", "10.1.0.0/16"]);
  r = await expect(0, ["vpc", "peer", "create", "--vpc1", "prod", "--vpc2", "staging"]);
  assert.match(r.stdout, /name\W+prod--staging/);
  r = await expect(0, ["vpc", "peer", "list"]);
  assert.match(r.stdout, /prod--staging.*whole VPCs/);
  // A VPC that overlaps is refused (exit 5, FAILED_PRECONDITION).
  await expect(0, ["vpc", "create", "prod-copy", "--cidr", "10.0.0.0/16"]);
  r = await expect(5, ["vpc", "peer", "create", "--vpc1", "prod", "--vpc2", "prod-copy"]);
  assert.match(r.stderr, /overlap/);
  await expect(0, ["vpc", "delete", "prod-copy"]);

  // List resources.
  r = await expect(0, ["vpc", "list"]);
  assert.match(r.stdout, /prod.*10\.0\.0\.0\/16/);
  assert.match(r.stdout, /staging.*10\.1\.0\.0\/16/);
  r = await expect(0, ["subnet", "list", "--vpc", "prod"]);
  assert.match(r.stdout, /web.*10\.0\.1\.0\/24/);
  assert.match(r.stdout, /data.*10\.0\.2\.0\/24/);
  r = await expect(0, ["sg", "list", "--vpc", "prod"]);
  assert.match(r.stdout, /web-sg/);
  for (const t of ["tcp:80:0.0.0.0/0", "tcp:443:0.0.0.0/0", "tcp:22:10.0.0.0/16"]) assert.ok(r.stdout.includes(t), `sg list lacks ${t}\n${r.stdout}`);

  // Tear down through the CLI.
  await expect(0, ["fip", "release", fip.address, "--force"]);
  await expect(0, ["nat", "delete", "--vpc", "prod"]);
  for (const v of ["web1", "web2", "data1"]) await expect(0, ["vm", "delete", v, "--vpc", "prod"]);
  await expect(0, ["sg", "delete", "web-sg", "--vpc", "prod"]);
  await expect(0, ["subnet", "delete", "web", "--vpc", "prod"]);
  await expect(0, ["subnet", "delete", "data", "--vpc", "prod"]);
  // A peered VPC cannot be deleted (exit 5) until its peering is.
  await expect(5, ["vpc", "delete", "staging"]);
  await expect(0, ["vpc", "peer", "delete", "--vpc1", "prod", "--vpc2", "staging"]);
  await expect(0, ["vpc", "delete", "prod"]);
  await expect(0, ["vpc", "delete", "staging"]);
});

test("the vpcctl tutorial's blog, as written, with packets", { timeout: 300_000 }, async () => {
  // Step 1: sudo vpcctl create blog --cidr 10.20.0.0/16
  await expect(0, ["vpc", "create", "blog", "--cidr", "10.20.0.0/16"]);
  // Step 2, 3: add-subnet blog webserver / database.
  await expect(0, ["subnet", "create", "webserver", "--vpc", "blog", "--cidr", "10.20.1.0/24", "--type", "public"]);
  await expect(0, ["subnet", "create", "database", "--vpc", "blog", "--cidr", "10.20.2.0/24", "--type", "private"]);
  // vpcctl has no security groups: everything inside the VPC passes. Our
  // grammar denies ingress by default, so one group stands for that.
  await expect(0, ["sg", "create", "blog-open", "--vpc", "blog", "--inbound", "all:all:10.20.0.0/16"]);

  // Step 4: deploy-app webserver --port 8080, database --port 5432. The
  // tutorial's hosts are .2; our IPAM reserves .1–.3 (gateway and 2 extra,
  // AWS-style), so they get .4, the lowest free address. The database also runs
  // something on 22 (the port the policy denies) and on 3000 (one it does not name).
  await expect(0, ["vm", "create", "webserver", "--vpc", "blog", "--subnet", "webserver", "--sg", "blog-open", "--address", "10.20.1.4"]);
  await expect(0, ["vm", "create", "database", "--vpc", "blog", "--subnet", "database", "--sg", "blog-open", "--address", "10.20.2.4"]);
  const web = await vmInfo("webserver", "blog");
  const db = await vmInfo("database", "blog");
  assert.equal(web.address, "10.20.1.4");
  assert.equal(db.address, "10.20.2.4");
  await serve(web.ns, "webserver", [8080]);
  await serve(db.ns, "database", [5432, 22, 3000]);

  // Step 5: ip netns exec ns-blog-webserver curl -s http://10.20.2.2:5432 (here .4)
  assert.equal(await httpFrom(web.ns, "http://10.20.2.4:5432/", (b) => b !== null), "database:5432");
  await reachable("webserver", "10.20.2.4:5432", "blog");
  // Step 7 (own app): curl -s http://10.20.1.2:8080 (here .4)
  assert.equal(await httpFrom(web.ns, "http://10.20.1.4:8080/", (b) => b !== null), "webserver:8080");
  await Promise.all([
    reachable("database", "10.20.1.4:8080", "blog"),
    reachable("webserver", "10.20.2.4:22", "blog"),
    reachable("webserver", "10.20.2.4:3000", "blog"),
  ]);

  // Step 6: NAT. The public webserver subnet reaches the internet by itself
  // (vpcctl: neither does before enable-nat); the private database does not.
  const url = `http://${inet.address}/`;
  const hostAddr = h.hosts[0].underlayAddress;
  assert.equal(await httpFrom(web.ns, url, (b) => b !== null), hostAddr, "webserver (public) reaches the internet");
  assert.equal(await httpGet(db.ns, url, 2000), null, "database (private) must not reach the internet before nat create");
  // sudo vpcctl enable-nat blog --interface eth0
  await expect(0, ["nat", "create", "--vpc", "blog", "--subnet", "webserver"]);
  const natAddr: string = (await json(["nat", "get", "--vpc", "blog"])).natGateway.address;
  assert.equal(await httpFrom(db.ns, url, (b) => b !== null), natAddr, "database reaches the internet through NAT, as the NAT gateway's address");

  // Step 8: apply-policy blog database_policy.json
  const policy = join(tmp, "database_policy.json");
  writeFileSync(
    policy,
    JSON.stringify(
      {
        subnet: "10.20.2.0/24",
        ingress: [
          { port: 5432, protocol: "tcp", action: "allow" },
          { port: 22, protocol: "tcp", action: "deny" },
        ],
        egress: [
          { port: 80, protocol: "tcp", action: "allow" },
          { port: 443, protocol: "tcp", action: "allow" },
        ],
      },
      null,
      2,
    ),
  );

  // (a) vpcctl's literal meaning: a network ACL on the database subnet; 22 denied, the rest passes.
  let r = await expect(0, ["acl", "import", policy, "--vpc", "blog"]);
  assert.match(r.stdout, /created network ACL policy-database for subnet database/);
  // The block first: it shows the ACL applied, so what passes after it passes under the ACL.
  await blocked("webserver", "10.20.2.4:22", "blog");
  await Promise.all([reachable("webserver", "10.20.2.4:5432", "blog"), reachable("webserver", "10.20.2.4:3000", "blog")]);
  assert.equal(await httpFrom(web.ns, "http://10.20.2.4:5432/", (b) => b !== null), "database:5432");
  assert.equal(await httpFrom(db.ns, url, (b) => b !== null), natAddr, "database → internet:80 (egress allow 80) under the ACL");
  await reachable("database", "10.20.1.4:8080", "blog");
  await expect(0, ["acl", "disassociate", "--subnet", "database", "--vpc", "blog"]);
  await reachable("webserver", "10.20.2.4:22", "blog");
  await expect(0, ["acl", "delete", "policy-database", "--vpc", "blog"]);

  // (b) allow-only: `sg import` makes a group of the allow entries; bound to the database VM.
  r = await expect(0, ["sg", "import", "database-policy", policy, "--vpc", "blog"]);
  assert.match(r.stderr, /warning: .*22/);
  const g = (await json(["sg", "get", "database-policy", "--vpc", "blog"])).securityGroup;
  assert.deepEqual(g.rules.map((x: Record<string, unknown>) => `${x.direction}:${x.protocol}:${x.portFrom}`).sort(), [
    "DIRECTION_EGRESS:PROTOCOL_TCP:443",
    "DIRECTION_EGRESS:PROTOCOL_TCP:80",
    "DIRECTION_INGRESS:PROTOCOL_TCP:5432",
  ]);
  await expect(0, ["sg", "attach", db.nic, "--group", "database-policy"]);
  await Promise.all([
    blocked("webserver", "10.20.2.4:22", "blog"),
    blocked("webserver", "10.20.2.4:3000", "blog"),
    // Egress to a port the policy does not allow: database → webserver:8080 (reachable above) is dropped.
    blocked("database", "10.20.1.4:8080", "blog"),
  ]);
  // What passes under the group, once its blocks show it applied.
  await reachable("webserver", "10.20.2.4:5432", "blog");
  assert.equal(await httpFrom(db.ns, url, (b) => b !== null), natAddr, "database → internet:80 (egress allow 80) under the group");
  // Back to the open group: 22 and 3000 answer again.
  await expect(0, ["sg", "attach", db.nic, "--group", "blog-open"]);
  await Promise.all([reachable("webserver", "10.20.2.4:22", "blog"), reachable("database", "10.20.1.4:8080", "blog")]);

  // Peering (sudo vpcctl peer blog analytics --allow-cidrs 10.20.1.0/24,10.30.1.0/24).
  // analytics runs a report service on 9000; its security group names the
  // peer VPC's CIDR.
  await expect(0, ["vpc", "create", "analytics", "--cidr", "10.30.0.0/16"]);
  await expect(0, ["subnet", "create", "analytics", "--vpc", "analytics", "--cidr", "10.30.1.0/24"]);
  await expect(0, ["sg", "create", "reports-sg", "--vpc", "analytics", "--inbound", "tcp:9000:10.20.0.0/16"]);
  await expect(0, ["vm", "create", "reports", "--vpc", "analytics", "--subnet", "analytics", "--sg", "reports-sg", "--address", "10.30.1.4"]);
  const reports = await vmInfo("reports", "analytics");
  await serve(reports.ns, "reports", [9000]);
  await unreachable("webserver", "10.30.1.4:9000", "blog"); // not peered yet
  // (a) The whole VPCs: both blog subnets reach reports:9000, as its group allows.
  await expect(0, ["vpc", "peer", "create", "--vpc1", "blog", "--vpc2", "analytics"]);
  await Promise.all([reachable("webserver", "10.30.1.4:9000", "blog"), reachable("database", "10.30.1.4:9000", "blog")]);
  assert.equal(await httpFrom(web.ns, "http://10.30.1.4:9000/", (b) => b !== null), "reports:9000");
  // The security group still rules: narrowed to the webserver subnet, the database is dropped.
  await expect(0, ["sg", "rule", "add", "reports-sg", "--vpc", "analytics", "--inbound", "tcp:9000:10.20.1.0/24"]);
  await expect(0, ["sg", "rule", "remove", "reports-sg", "--vpc", "analytics", "--inbound", "tcp:9000:10.20.0.0/16"]);
  await blocked("database", "10.30.1.4:9000", "blog");
  await reachable("webserver", "10.30.1.4:9000", "blog");
  await expect(0, ["sg", "rule", "add", "reports-sg", "--vpc", "analytics", "--inbound", "tcp:9000:10.20.0.0/16"]);
  await reachable("database", "10.30.1.4:9000", "blog");
  // (b) vpcctl's --allow-cidrs: only the webserver subnet and analytics' subnet cross, whatever the groups allow.
  await expect(0, ["vpc", "peer", "delete", "--vpc1", "blog", "--vpc2", "analytics"]);
  await unreachable("webserver", "10.30.1.4:9000", "blog");
  r = await expect(0, ["vpc", "peer", "create", "--vpc1", "blog", "--vpc2", "analytics", "--allow-cidrs", "10.20.1.0/24,10.30.1.0/24"]);
  assert.match(r.stdout, /vpc1\W+vpc-[0-9a-f]{12}: 10\.20\.1\.0\/24/);
  assert.match(r.stdout, /vpc2\W+vpc-[0-9a-f]{12}: 10\.30\.1\.0\/24/);
  await reachable("webserver", "10.30.1.4:9000", "blog");
  await blocked("database", "10.30.1.4:9000", "blog");
  r = await expect(0, ["vpc", "peer", "list", "--vpc", "analytics"]);
  assert.match(r.stdout, /blog--analytics/);
  // A peered VPC cannot be deleted (exit 5); delete the peering first.
  await expect(5, ["vpc", "delete", "analytics"]);
  await expect(0, ["vpc", "peer", "delete", "blog--analytics"]);
  await unreachable("webserver", "10.30.1.4:9000", "blog");
  await expect(0, ["vm", "delete", "reports", "--vpc", "analytics"]);
  await expect(0, ["sg", "delete", "reports-sg", "--vpc", "analytics"]);
  await expect(0, ["subnet", "delete", "analytics", "--vpc", "analytics"]);
  await expect(0, ["vpc", "delete", "analytics"]);

  // list / inspect.
  r = await expect(0, ["vpc", "list"]);
  assert.match(r.stdout, /blog.*10\.20\.0\.0\/16/);
  const v = (await json(["vpc", "get", "blog"])).vpc;
  assert.equal(v.cidr, "10.20.0.0/16");
  r = await expect(0, ["vm", "list", "--vpc", "blog"]);
  assert.match(r.stdout, /webserver.*10\.20\.1\.4/);
  assert.match(r.stdout, /database.*10\.20\.2\.4/);

  // delete blog: refused while it has subnets (exit 5), then piece by piece.
  await expect(5, ["vpc", "delete", "blog"]);
  await expect(0, ["nat", "delete", "--vpc", "blog"]);
  await expect(0, ["vm", "delete", "webserver", "--vpc", "blog"]);
  await expect(0, ["vm", "delete", "database", "--vpc", "blog"]);
  await expect(0, ["sg", "delete", "database-policy", "--vpc", "blog"]);
  await expect(0, ["sg", "delete", "blog-open", "--vpc", "blog"]);
  await expect(0, ["subnet", "delete", "webserver", "--vpc", "blog"]);
  await expect(0, ["subnet", "delete", "database", "--vpc", "blog"]);
  r = await expect(0, ["vpc", "delete", "blog"]);
  assert.match(r.stdout, /blog/);
  assert.deepEqual((await json(["vm", "list"])).vms, []);
});
