// The `microvpc` CLI end to end: a real Redis, a real `microvpcd ipam`, and
// the CLI run as a child process exactly as an operator or a script runs it.
import { execFile } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import assert from "node:assert/strict";
import { afterAll, beforeAll, test } from "vitest";
import { startDaemon, type Daemon } from "../lib/daemon.js";
import { cliRunner } from "../lib/cli.js";
import { freePort, startDaemonsRedis, type DaemonsRedis } from "../lib/redis.js";

const UUID = /[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/;

let redis: DaemonsRedis | undefined;
let daemon: Daemon | undefined;
let tmp: string;

const cli = cliRunner(() => ["--server", daemon!.address], 30_000);
const { json } = cli;
/** expect, optionally against another server address. */
const expect = (code: number, args: string[], server?: string) => cli.expect(code, args, server === undefined ? undefined : ["--server", server]);

/** Everything the IPAM holds, to show that a failed or dry command changed nothing. */
async function snapshot(): Promise<string> {
  const vpcs = await json(["vpc", "list"]);
  const subnets = await json(["subnet", "list"]);
  const allocs = [];
  for (const s of subnets.subnets) allocs.push(await json(["ip", "list", "--subnet", s.id]));
  return JSON.stringify({ vpcs, subnets, allocs });
}

beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), "mvpc-cli-"));
  redis = await startDaemonsRedis();
  daemon = await startDaemon("ipam", ["--redis", redis.url]);
});

afterAll(async () => {
  await daemon?.stop();
  await redis?.stop();
  if (tmp) rmSync(tmp, { recursive: true, force: true });
});

test("vpcctl/agentmetal flow: vpc, two subnets, allocate, list, usage, release, delete order", async () => {
  let r = await expect(0, ["vpc", "create", "prod", "--cidr", "10.0.0.0/16", "--label", "env=prod"]);
  assert.match(r.stdout, /prod/);
  assert.match(r.stdout, /10\.0\.0\.0\/16/);
  await expect(0, ["subnet", "create", "web", "--vpc", "prod", "--cidr", "10.0.1.0/24", "--type", "public"]);
  r = await expect(0, ["subnet", "create", "data", "--vpc", "prod", "--cidr", "10.0.2.0/24", "--type", "private"]);
  assert.match(r.stdout, /private/);

  r = await expect(0, ["subnet", "list", "--vpc", "prod"]);
  assert.match(r.stdout, /web.*10\.0\.1\.0\/24.*public/);
  assert.match(r.stdout, /data.*10\.0\.2\.0\/24.*private/);
  const web = (await json(["subnet", "get", "web", "--vpc", "prod"])).subnet.id;

  // By name with --vpc, and without --request-id: a UUID is made and shown.
  r = await expect(0, ["ip", "allocate", "--subnet", "web", "--vpc", "prod", "--owner", "vm-a"]);
  assert.match(r.stdout, /10\.0\.1\.4\/24/);
  assert.match(r.stdout, UUID);
  r = await expect(0, ["ip", "allocate", "--subnet", web, "--owner", "vm-b", "--request-id", "req-b"]);
  assert.match(r.stdout, /10\.0\.1\.5\/24/);
  // A retry returns the same address.
  r = await expect(0, ["ip", "allocate", "--subnet", web, "--owner", "vm-b", "--request-id", "req-b"]);
  assert.match(r.stdout, /10\.0\.1\.5\/24/);
  assert.match(r.stdout, /^created:\s+no/m);

  r = await expect(0, ["ip", "list", "--subnet", web]);
  assert.match(r.stdout, /10\.0\.1\.4\/24.*vm-a/);
  assert.match(r.stdout, /10\.0\.1\.5\/24.*vm-b.*req-b/);
  r = await expect(0, ["ip", "list", "--owner", "vm-b"]);
  assert.match(r.stdout, /vm-b/);
  assert.doesNotMatch(r.stdout, /vm-a/);
  r = await expect(0, ["ip", "get", "10.0.1.4", "--subnet", web]);
  assert.match(r.stdout, /vm-a/);

  r = await expect(0, ["ip", "usage", "--subnet", web]);
  assert.match(r.stdout, /2 used, 249 free of 256 \(5 reserved\), 0\.8% full/);

  // Delete order is enforced, and the message says what to do instead.
  r = await expect(5, ["vpc", "delete", "prod"]);
  assert.match(r.stderr, /^error: .*still has 2 subnet\(s\); delete them first/);
  assert.match(r.stderr, /microvpc subnet list --vpc/);
  assert.match(r.stderr, /\(failed_precondition\)/);
  r = await expect(5, ["subnet", "delete", "web", "--vpc", "prod"]);
  assert.match(r.stderr, /release them first/);

  // Only the holder may release by owner.
  await expect(5, ["ip", "release", "--subnet", web, "--address", "10.0.1.4", "--owner", "vm-b"]);
  r = await expect(0, ["ip", "release", "--subnet", web, "--address", "10.0.1.4"]);
  assert.match(r.stdout, /released 10\.0\.1\.4/);
  r = await expect(0, ["ip", "release", "--subnet", "web", "--vpc", "prod", "--owner", "vm-b", "--request-id", "req-b"]);
  assert.match(r.stdout, /released 10\.0\.1\.5/);
  r = await expect(0, ["ip", "release", "--subnet", web, "--address", "10.0.1.5"]);
  assert.match(r.stdout, /already free/);
  r = await expect(0, ["ip", "usage", "--subnet", web]);
  assert.match(r.stdout, /0 used, 251 free/);
  await expect(3, ["ip", "get", "10.0.1.4", "--subnet", web]);

  await expect(0, ["subnet", "delete", "web", "--vpc", "prod"]);
  await expect(0, ["subnet", "delete", "data", "--vpc", "prod"]);
  r = await expect(0, ["vpc", "delete", "prod"]);
  assert.match(r.stdout, /deleted vpc prod/);
  await expect(3, ["vpc", "get", "prod"]);
  // Idempotent: deleting what is gone succeeds.
  r = await expect(0, ["vpc", "delete", "prod"]);
  assert.match(r.stdout, /does not exist/);
});

test("-o json prints the API's messages, every field present", async () => {
  const c = await json(["vpc", "create", "jsonvpc", "--cidr", "10.1.0.0/16", "--description", "for scripts"]);
  assert.match(c.vpc.id, /^vpc-[0-9a-f]{12}$/);
  assert.equal(c.vpc.name, "jsonvpc");
  assert.equal(c.vpc.cidr, "10.1.0.0/16");
  assert.equal(c.vpc.description, "for scripts");
  assert.equal(c.vpc.subnetCount, 0);
  assert.equal(c.vpc.publicCidr, false);
  assert.ok(!Number.isNaN(Date.parse(c.vpc.createTime)));

  const s = await json(["subnet", "create", "tiny", "--vpc", c.vpc.id, "--cidr", "10.1.0.0/28", "--extra-reserved", "0"]);
  assert.match(s.subnet.id, /^subnet-[0-9a-f]{12}$/);
  assert.equal(s.subnet.vpcId, c.vpc.id);
  assert.equal(s.subnet.type, "SUBNET_TYPE_PRIVATE");
  assert.equal(s.subnet.gateway, "10.1.0.1");
  assert.deepEqual(s.subnet.reservedAddresses, ["10.1.0.0", "10.1.0.1", "10.1.0.15"]);
  assert.deepEqual(s.subnet.usage, { total: "16", reserved: "3", used: "0", free: "13" });

  const a = await json(["ip", "allocate", "--subnet", s.subnet.id, "--owner", "hv1/vm-j", "--request-id", "rq-1", "--address", "10.1.0.9"]);
  assert.deepEqual(
    { ...a.allocation, allocateTime: undefined },
    { subnetId: s.subnet.id, address: "10.1.0.9", prefixLength: 28, gateway: "10.1.0.1", owner: "hv1/vm-j", requestId: "rq-1", allocateTime: undefined },
  );
  assert.equal(a.created, true);

  const u = await json(["ip", "usage", "--subnet", s.subnet.id]);
  assert.deepEqual(u, { subnetId: s.subnet.id, usage: { total: "16", reserved: "3", used: "1", free: "12" } });
  const l = await json(["ip", "list", "--subnet", s.subnet.id]);
  assert.equal(l.allocations.length, 1);
  assert.equal(l.nextPageToken, "");

  // Lists follow every page; --limit stops early and hands back the token.
  await json(["vpc", "create", "jsonvpc2", "--cidr", "10.2.0.0/16"]);
  const all = await json(["vpc", "list"]);
  assert.deepEqual(
    all.vpcs.map((v: Record<string, unknown>) => v.name),
    ["jsonvpc", "jsonvpc2"],
  );
  assert.equal(all.nextPageToken, "");
  const one = await json(["vpc", "list", "--limit", "1"]);
  assert.deepEqual(
    one.vpcs.map((v: Record<string, unknown>) => v.name),
    ["jsonvpc"],
  );
  assert.notEqual(one.nextPageToken, "");

  const rel = await json(["ip", "release", "--subnet", s.subnet.id, "--address", "10.1.0.9"]);
  assert.deepEqual(rel, { released: true, address: "10.1.0.9" });
  assert.deepEqual(await json(["subnet", "delete", s.subnet.id]), { deleted: true });
  assert.deepEqual(await json(["vpc", "delete", "jsonvpc"]), { deleted: true });
  assert.deepEqual(await json(["vpc", "delete", "jsonvpc2"]), { deleted: true });
});

test("bad input: right exit code, a message on stderr, nothing changed", async () => {
  await expect(0, ["vpc", "create", "stage", "--cidr", "10.3.0.0/16"]);
  await expect(0, ["subnet", "create", "app", "--vpc", "stage", "--cidr", "10.3.1.0/24"]);
  await expect(0, ["ip", "allocate", "--subnet", "app", "--vpc", "stage", "--owner", "vm-s", "--request-id", "r1"]);
  const before = await snapshot();

  const cases: [number, string[], RegExp][] = [
    [7, ["vpc", "create", "x", "--cidr", "10.0.0/16"], /cidr: .*not an IPv4 CIDR/],
    [7, ["vpc", "create", "x", "--cidr", "10.0.0.0/33"], /has prefix \/33; allowed are \/8 to \/28/],
    [7, ["vpc", "create", "x", "--cidr", "10.0.0.1/16"], /host bits set; did you mean "10\.0\.0\.0\/16"/],
    [7, ["vpc", "create", "x", "--cidr", "8.8.0.0/16"], /not in a private range/],
    [7, ["vpc", "create", "web;rm", "--cidr", "10.9.0.0/16"], /name: "web;rm" is not a valid name/],
    [7, ["subnet", "create", "a;b", "--vpc", "stage", "--cidr", "10.3.2.0/24"], /not a valid name/],
    [7, ["subnet", "create", "out", "--vpc", "stage", "--cidr", "10.4.0.0/24"], /not inside VPC stage/],
    [3, ["subnet", "create", "x", "--vpc", "nosuch", "--cidr", "10.3.2.0/24"], /vpc "nosuch" not found/],
    [3, ["vpc", "get", "nosuch"], /not found; list VPCs with `microvpc vpc list`/],
    [3, ["ip", "usage", "--subnet", "app", "--vpc", "nosuch"], /vpc "nosuch" not found/],
    [4, ["vpc", "create", "stage", "--cidr", "10.8.0.0/16"], /already exists/],
    [4, ["subnet", "create", "app2", "--vpc", "stage", "--cidr", "10.3.1.128/25"], /overlaps subnet app/],
    [4, ["ip", "allocate", "--subnet", "app", "--vpc", "stage", "--owner", "vm-t", "--request-id", "r2", "--address", "10.3.1.4"], /already allocated to vm-s/],
    [7, ["ip", "allocate", "--subnet", "app", "--vpc", "stage", "--owner", "vm;t"], /owner: .*is not valid/],
    // A generated request id is shown, so that an uncertain failure can be retried.
    [
      7,
      ["ip", "allocate", "--subnet", "app", "--vpc", "stage", "--owner", "vm-t", "--address", "10.3.1.1"],
      /^note: request id was [0-9a-f-]{36}; retry with --request-id(.|\n)*reserved/,
    ],
    [2, ["vpc", "create", "x"], /required option '--cidr/],
    [2, ["vpc", "frobnicate"], /unknown command/],
    [2, ["vpc", "list", "--bogus"], /unknown option/],
    [2, ["subnet", "create", "x", "--vpc", "stage", "--cidr", "10.3.2.0/24", "--type", "dmz"], /Allowed choices are public, private/],
    [2, ["ip", "allocate", "--subnet", "app", "--owner", "vm-t"], /not a subnet id; .*--vpc/],
    [2, ["ip", "release", "--subnet", "app", "--vpc", "stage"], /give --address, or --owner and --request-id/],
    [2, ["ip", "reclaim"], /--live OWNER\.\.\. or --live-file/],
  ];
  // Independent failures, so they may run side by side.
  await Promise.all(
    cases.map(async ([code, args, msg]) => {
      const r = await expect(code, args);
      assert.match(r.stderr, /^error: /m, `stderr of ${args.join(" ")}`);
      assert.match(r.stderr, msg, `stderr of ${args.join(" ")}`);
      assert.equal(r.stdout, "", `stdout of ${args.join(" ")}`);
    }),
  );
  assert.equal(await snapshot(), before);

  const r = await expect(6, ["vpc", "list"], `127.0.0.1:${await freePort()}`);
  assert.match(r.stderr, /is microvpcd ipam running at 127\.0\.0\.1:\d+\?/);
  assert.match(r.stderr, /\(unavailable\)/);
});

test("--dry-run validates, prints the request, and changes nothing", async () => {
  await expect(0, ["vpc", "create", "dry", "--cidr", "10.5.0.0/16"]);
  await expect(0, ["subnet", "create", "s1", "--vpc", "dry", "--cidr", "10.5.1.0/24"]);
  const sid = (await json(["subnet", "get", "s1", "--vpc", "dry"])).subnet.id;
  await expect(0, ["ip", "allocate", "--subnet", sid, "--owner", "vm-d", "--request-id", "r1"]);
  const before = await snapshot();

  let r = await expect(0, ["vpc", "create", "dry2", "--cidr", "10.6.0.0/16", "--label", "a=b", "--dry-run"]);
  assert.match(r.stdout, /VpcService\/CreateVpc/);
  assert.match(r.stdout, /"cidr": "10\.6\.0\.0\/16"/);
  assert.match(r.stdout, /nothing was sent/);
  const j = JSON.parse(
    (await expect(0, ["subnet", "create", "s2", "--vpc", "dry", "--cidr", "10.5.2.0/24", "--type", "public", "--dry-run", "-o", "json"])).stdout,
  );
  assert.deepEqual(
    { dryRun: j.dryRun, method: j.method, name: j.request.name, type: j.request.type },
    { dryRun: true, method: "microvpc.v1.SubnetService/CreateSubnet", name: "s2", type: "SUBNET_TYPE_PUBLIC" },
  );
  r = await expect(0, ["ip", "allocate", "--subnet", "s1", "--vpc", "dry", "--owner", "vm-e", "--dry-run"]);
  assert.match(r.stdout, new RegExp(`"subnetId": "${sid}"`));
  assert.match(r.stdout, UUID);
  await expect(0, ["ip", "release", "--subnet", sid, "--address", "10.5.1.4", "--dry-run"]);
  await expect(0, ["subnet", "delete", "s1", "--vpc", "dry", "--dry-run"]);
  await expect(0, ["vpc", "delete", "dry", "--dry-run"]);

  // Local validation needs no server at all.
  const nowhere = `127.0.0.1:${await freePort()}`;
  await expect(0, ["vpc", "create", "dry3", "--cidr", "10.7.0.0/16", "--dry-run"], nowhere);
  r = await expect(7, ["vpc", "create", "dry;3", "--cidr", "10.7.0.0/16", "--dry-run"], nowhere);
  assert.match(r.stderr, /not a valid name/);
  r = await expect(7, ["vpc", "create", "dry3", "--cidr", "10.7.0.0/8", "--dry-run"], nowhere);
  assert.match(r.stderr, /host bits set/);

  // Reclaim's dry run is the server's: it reports, frees nothing.
  r = await expect(0, ["ip", "reclaim", "--subnet", sid, "--live", "vm-other", "--grace-seconds", "0", "--dry-run"]);
  assert.match(r.stdout, /10\.5\.1\.4\/24.*vm-d/);
  assert.match(r.stdout, /would reclaim 1 address\(es\), kept 0/);

  assert.equal(await snapshot(), before);
});

test("ip reclaim frees only dead owners past the grace period", async () => {
  await expect(0, ["vpc", "create", "rec", "--cidr", "10.10.0.0/16"]);
  await expect(0, ["subnet", "create", "s", "--vpc", "rec", "--cidr", "10.10.1.0/24"]);
  for (const vm of ["hv1/vm-1", "hv1/vm-2", "hv2/vm-3"]) await expect(0, ["ip", "allocate", "--subnet", "s", "--vpc", "rec", "--owner", vm]);

  // Within the default 60 s grace, nothing goes.
  let r = await expect(0, ["ip", "reclaim", "--owner-prefix", "hv1/", "--live-file", "/dev/null"]);
  assert.match(r.stdout, /reclaimed 0 address\(es\), kept 2/);

  const live = join(tmp, "live");
  writeFileSync(live, "# owners alive on hv1\nhv1/vm-1\n\n");
  r = await expect(0, ["ip", "reclaim", "--owner-prefix", "hv1/", "--live-file", live, "--grace-seconds", "0"]);
  assert.match(r.stdout, /hv1\/vm-2/);
  assert.match(r.stdout, /reclaimed 1 address\(es\), kept 1/);
  const left = await json(["ip", "list", "--subnet", "s", "--vpc", "rec"]);
  assert.deepEqual(left.allocations.map((a: Record<string, unknown>) => a.owner).sort(), ["hv1/vm-1", "hv2/vm-3"]);
});

test("dns: records and resolver configuration, with exit codes, -o json and --dry-run", async () => {
  await expect(0, ["vpc", "create", "dnsv", "--cidr", "10.7.0.0/16"]);
  let r = await expect(0, ["dns", "record", "set", "web1", "10.7.1.4", "--vpc", "dnsv", "--owner", "vm-aaaaaaaaaaaa"]);
  assert.match(r.stdout, /created/);
  assert.match(r.stdout, /web1\.dnsv\.internal/);
  r = await expect(0, ["dns", "record", "list", "--vpc", "dnsv"]);
  assert.match(r.stdout, /web1\.dnsv\.internal.*10\.7\.1\.4.*60.*vm-aaaaaaaaaaaa/);
  const listed = await json(["dns", "record", "list", "--vpc", "dnsv"]);
  assert.equal(listed.records[0].fqdn, "web1.dnsv.internal");
  await expect(4, ["dns", "record", "set", "web1", "10.7.1.5", "--vpc", "dnsv", "--owner", "someone-else"]);
  r = await expect(7, ["dns", "record", "set", "Web_1", "10.7.1.5", "--vpc", "dnsv", "--owner", "x"]);
  assert.match(r.stderr, /name: .*not a DNS label/);
  await expect(7, ["dns", "record", "set", "web2", "10.8.1.5", "--vpc", "dnsv", "--owner", "x"]);
  await expect(3, ["dns", "record", "list", "--vpc", "nosuch"]);
  // --dry-run validates locally and sends nothing.
  r = await expect(0, ["dns", "record", "set", "web2", "10.7.1.5", "--vpc", "dnsv", "--owner", "x", "--dry-run"]);
  assert.match(r.stdout, /DnsService\/SetDnsRecord/);
  await expect(7, ["dns", "record", "set", "web2", "999.7.1.5", "--vpc", "dnsv", "--owner", "x", "--dry-run"]);
  assert.equal((await json(["dns", "record", "list", "--vpc", "dnsv"])).records.length, 1);

  r = await expect(0, ["dns", "config", "get", "--vpc", "dnsv"]);
  assert.match(r.stdout, /^resolver:\s+10\.7\.0\.2/m);
  assert.match(r.stdout, /inherited/);
  await expect(0, ["dns", "config", "update", "--forwarder", "192.0.2.53"]);
  r = await expect(0, ["dns", "config", "update", "--vpc", "dnsv", "--forwarder", "192.0.2.54:5353", "--resolver", "10.7.0.53"]);
  assert.match(r.stdout, /192\.0\.2\.54:5353/);
  const cfg = await json(["dns", "config", "get", "--vpc", "dnsv"]);
  assert.deepEqual([cfg.config.resolverAddress, cfg.config.forwarders.addresses], ["10.7.0.53", ["192.0.2.54:5353"]]);
  r = await expect(0, ["dns", "config", "update", "--vpc", "dnsv", "--inherit-forwarders"]);
  assert.match(r.stdout, /192\.0\.2\.53 \(inherited/);
  await expect(7, ["dns", "config", "update", "--vpc", "dnsv", "--forwarder", "127.0.0.1"]);
  await expect(2, ["dns", "config", "update", "--forwarder", "192.0.2.1", "--no-forwarders"]);
  await expect(2, ["dns", "record", "delete", "--vpc", "dnsv"]);

  r = await expect(0, ["dns", "record", "delete", "--vpc", "dnsv", "--owner", "vm-aaaaaaaaaaaa"]);
  assert.match(r.stdout, /deleted web1/);
  r = await expect(0, ["dns", "record", "delete", "web1", "--vpc", "dnsv"]);
  assert.match(r.stdout, /nothing to delete/);
  await expect(0, ["dns", "config", "update", "--no-forwarders"]);
  await expect(0, ["vpc", "delete", "dnsv"]);
});

test("help documents exit codes; completion covers the command tree", async () => {
  let r = await expect(0, ["--help"]);
  assert.match(r.stdout, /Exit codes:/);
  assert.match(r.stdout, /5\s+failed precondition/);
  assert.match(r.stdout, /MICROVPC_SERVER/);

  r = await expect(0, ["completion", "bash"]);
  for (const w of ["vpc", "subnet", "ip", "dns", "'dns record set'", "completion", "'ip reclaim'", "allocate", "--live-file", "--dry-run", "complete -F"]) {
    assert.ok(r.stdout.includes(w), `completion lacks ${w}`);
  }
  const file = join(tmp, "completion.bash");
  writeFileSync(file, r.stdout);
  // The script must be valid bash and complete subcommands of a group.
  const out = await new Promise<string>((resolve, reject) =>
    execFile(
      "bash",
      ["-c", 'source "$1"; COMP_WORDS=(microvpc --server x ip ""); COMP_CWORD=4; _microvpc_complete; echo "${COMPREPLY[*]}"', "bash", file],
      (err, stdout, stderr) => (err ? reject(new Error(stderr)) : resolve(stdout)),
    ),
  );
  assert.match(out, /^allocate release list get usage reclaim /);
  // bash, zsh and fish (cli-fleet.test.ts checks the other two); anything else is a usage error.
  await expect(2, ["completion", "powershell"]);
});
