// The `microvpc` CLI's network commands end to end: a real Redis and the
// real daemons of one simulated hypervisor — ipam, netagent, firewall,
// gateway, vmm — with the CLI run as a child process, as an operator or a
// script runs it.
//
// Safety: every daemon that changes the kernel is confined. The hypervisor
// id carries the run prefix, so the namespaces netagent and vmm make
// (mvpc-<prefix>hv1-…, mvpcvm-<prefix>hv1-…) are this run's; the gateway
// gets --host-netns, a namespace made here with the run prefix, and
// --uplink lo inside it, so it never touches the root namespace (which is
// compared before and after).
import { execFile } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import assert from "node:assert/strict";
import { afterAll, beforeAll, describe, test } from "vitest";
import { startDaemon, type Daemon } from "../lib/daemon.js";
import { cliRunner, type CliRun } from "../lib/cli.js";
import {
  cleanupSync,
  createNetns,
  deleteNetns,
  diffRoot,
  listNetns,
  rootSnapshot,
  run as runCmd,
  RUN_PREFIX,
  redisUrlIn,
  tempDir,
  trackChild,
  waitFor,
  type RootSnapshot,
} from "../lib/netns.js";
import { freePort, startDaemonsRedis, type DaemonsRedis } from "../lib/redis.js";

const HOST_ID = `${RUN_PREFIX}hv1`;
const POOL = "203.0.113.0/29";

let redis: DaemonsRedis | undefined;
const daemons: Partial<Record<"ipam" | "netagent" | "firewall" | "gateway" | "vmm", Daemon>> = {};
let hostNs: string | undefined;
let rootBefore: RootSnapshot;
let tmp: string;

/** Every daemon's address, as global options. */
function addresses(): string[] {
  const a: string[] = [];
  for (const [flag, d] of [
    ["--server", "ipam"],
    ["--netagent", "netagent"],
    ["--firewall", "firewall"],
    ["--gateway", "gateway"],
    ["--vmm", "vmm"],
  ] as const) {
    if (daemons[d]) a.push(flag, daemons[d]!.address);
  }
  return a;
}

const { run, expect, json } = cliRunner(addresses, 60_000);

/** Everything the daemons hold, to show that a failed or dry command changed nothing. */
async function snapshot(): Promise<string> {
  const lists = [
    ["vpc", "list"],
    ["subnet", "list"],
    ["sg", "list"],
    ["sg", "bindings"],
    ["acl", "list"],
    ["nat", "list"],
    ["fip", "list"],
    ["pf", "list"],
    ["vm", "list"],
  ];
  return JSON.stringify(await Promise.all(lists.map((l) => json(l))));
}

const busy = async (p: Promise<unknown>) => {
  try {
    await p;
  } catch {
    // best effort
  }
};

beforeAll(async () => {
  rootBefore = await rootSnapshot();
  tmp = tempDir("cli");
  redis = await startDaemonsRedis({ persistence: false });
  for (const p of redis.procs) trackChild(p);
  hostNs = await createNetns(`${RUN_PREFIX}-clihost`);
  // The metadata server runs in hostNs, where 127.0.0.1 of the root namespace is out of reach.
  const imdsRedis = await redisUrlIn(hostNs, redis);
  const r = ["--redis", redis.url];
  daemons.ipam = await startDaemon("ipam", r);
  daemons.netagent = await startDaemon("netagent", [...r, "--host-id", HOST_ID]);
  // A short drift interval: the firewall re-checks (and clears a startup error) every second.
  daemons.firewall = await startDaemon("firewall", [...r, "--host-id", HOST_ID, "--drift-interval-ms", "1000"]);
  daemons.gateway = await startDaemon("gateway", [
    ...r,
    "--host-id",
    HOST_ID,
    "--host-netns",
    hostNs,
    "--uplink",
    "lo",
    "--public-pool",
    POOL,
    "--imds-redis",
    imdsRedis,
  ]);
  daemons.vmm = await startDaemon("vmm", [
    ...r,
    "--host-id",
    HOST_ID,
    "--ipam",
    daemons.ipam.address,
    "--netagent",
    daemons.netagent.address,
    "--firewall",
    daemons.firewall.address,
    "--gateway",
    daemons.gateway.address,
  ]);
  for (const d of Object.values(daemons)) trackChild(d!.proc);

  // The scene of the agentmetal guide: a public web subnet, a private data subnet.
  await expect(0, ["vpc", "create", "prod", "--cidr", "10.0.0.0/16"]);
  await expect(0, ["subnet", "create", "web", "--vpc", "prod", "--cidr", "10.0.1.0/24", "--type", "public"]);
  await expect(0, ["subnet", "create", "data", "--vpc", "prod", "--cidr", "10.0.2.0/24", "--type", "private"]);
});

afterAll(async () => {
  // VMs first, through the vmm, so it undoes what it did.
  if (daemons.vmm) {
    const vms = await run(["vm", "list", "-o", "json"]);
    if (vms.code === 0) for (const v of JSON.parse(vms.stdout).vms) await busy(run(["vm", "delete", v.id]));
  }
  for (const d of ["vmm", "gateway", "firewall", "netagent", "ipam"] as const) await busy(daemons[d]?.stop() ?? Promise.resolve());
  await redis?.stop();
  if (hostNs) await busy(deleteNetns(hostNs));
  // Namespaces the agents made for this hypervisor id (the id carries the run prefix).
  for (const ns of (await listNetns()).filter((n) => n.includes(`-${HOST_ID}-`))) await busy(runCmd("ip", ["netns", "delete", ns], { check: false }));
  cleanupSync();
  const left = (await listNetns()).filter((n) => n.includes(RUN_PREFIX));
  assert.deepEqual(left, [], "namespaces left behind");
  assert.deepEqual(diffRoot(rootBefore, await rootSnapshot()), [], "the root namespace changed");
});

describe("security groups", () => {
  test("sg create with the agentmetal guide's rule texts; get, list, rule add/remove; -o json", async () => {
    let r = await expect(0, [
      // The agentmetal guide's form, verbatim: --name rather than NAME.
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
    for (const t of ["tcp:80:0.0.0.0/0", "tcp:443:0.0.0.0/0", "tcp:22:10.0.0.0/16", "all:all:0.0.0.0/0"])
      assert.ok(r.stdout.includes(t), `sg create output lacks ${t}`);

    // A peer named by group (resolved by the server), an ICMP type, a range, and a bare address (warned about).
    r = await expect(0, [
      "sg",
      "create",
      "db-sg",
      "--vpc",
      "prod",
      "--inbound",
      "tcp:5432:web-sg",
      "--inbound",
      "icmp:8:10.0.0.0/8",
      "--inbound",
      "udp:8000-8100:10.0.0.7",
    ]);
    assert.match(r.stderr, /^warning: .*bare address 10\.0\.0\.7 is read as 10\.0\.0\.7\/32/m);
    const db = (await json(["sg", "get", "db-sg", "--vpc", "prod"])).securityGroup;
    const web = (await json(["sg", "get", "web-sg", "--vpc", "prod"])).securityGroup;
    assert.match(db.id, /^sg-[0-9a-f]{12}$/);
    assert.deepEqual(
      db.rules.map((x: Record<string, unknown>) => [x.direction, x.protocol, x.portFrom, x.portTo, x.icmpType, x.cidr ?? x.securityGroupId]),
      [
        ["DIRECTION_INGRESS", "PROTOCOL_TCP", 5432, 5432, undefined, web.id],
        ["DIRECTION_INGRESS", "PROTOCOL_ICMP", 0, 0, 8, "10.0.0.0/8"],
        ["DIRECTION_INGRESS", "PROTOCOL_UDP", 8000, 8100, undefined, "10.0.0.7/32"],
        // No --outbound: the default egress rule.
        ["DIRECTION_EGRESS", "PROTOCOL_ALL", 0, 0, undefined, "0.0.0.0/0"],
      ],
    );
    // --no-default-egress leaves egress closed.
    const closed = (await json(["sg", "create", "closed", "--vpc", "prod", "--inbound", "tcp:9000:10.0.0.0/16", "--no-default-egress"])).securityGroup;
    assert.deepEqual(
      closed.rules.map((x: Record<string, unknown>) => x.direction),
      ["DIRECTION_INGRESS"],
    );

    r = await expect(0, ["sg", "list", "--vpc", "prod"]);
    assert.match(r.stdout, /db-sg.*tcp:5432:sg-[0-9a-f]{12}/);
    assert.match(r.stdout, /web-sg/);
    const list = await json(["sg", "list", "--vpc", "prod"]);
    assert.deepEqual(
      list.securityGroups.map((g: Record<string, unknown>) => g.name),
      ["closed", "db-sg", "web-sg"],
    );
    assert.equal(list.nextPageToken, "");

    r = await expect(0, ["sg", "rule", "add", "web-sg", "--vpc", "prod", "--inbound", "tcp:8080:10.0.0.0/16"]);
    assert.match(r.stdout, /tcp:8080:10\.0\.0\.0\/16/);
    r = await expect(0, ["sg", "rule", "remove", web.id, "--inbound", "tcp:22:10.0.0.0/16"]);
    assert.doesNotMatch(r.stdout, /tcp:22:/);
    await expect(2, ["sg", "rule", "add", "web-sg", "--vpc", "prod"]);

    r = await expect(0, ["sg", "delete", "closed", "--vpc", "prod"]);
    assert.match(r.stdout, /deleted security group closed/);
    r = await expect(0, ["sg", "delete", "closed", "--vpc", "prod"]);
    assert.match(r.stdout, /does not exist/);
    // web-sg is named by db-sg's rule: refused, with the reason.
    r = await expect(5, ["sg", "delete", "web-sg", "--vpc", "prod"]);
    assert.match(r.stderr, /^error: /);
  });

  test("bad rule texts: exit 7, a message naming the text, nothing created", async () => {
    const before = await snapshot();
    const cases: [number, string[], RegExp][] = [
      [
        7,
        ["sg", "create", "bad1", "--vpc", "prod", "--inbound", "tcp:70000:0.0.0.0/0"],
        /--inbound: "tcp:70000:0\.0\.0\.0\/0": port 70000 is out of range; use 1–65535/,
      ],
      [7, ["sg", "create", "bad2", "--vpc", "prod", "--inbound", "tcp:80:0.0.0.0/0; flush ruleset"], /contains ";", " "; a rule text may only use a-z 0-9/],
      [7, ["sg", "create", "bad3", "--vpc", "prod", "--outbound", "TCP:80:0.0.0.0/0"], /capital letters; write it in lowercase: "tcp:80:0\.0\.0\.0\/0"/],
      [7, ["sg", "create", "bad4", "--vpc", "prod", "--inbound", "tcp:90-80:0.0.0.0/0"], /range 90-80 is backwards/],
      [7, ["sg", "create", "bad5", "--vpc", "prod", "--inbound", "tcp:80:10.0.0.1/8"], /host bits set/],
      [7, ["sg", "create", "bad6", "--vpc", "prod", "--inbound", "sctp:80:0.0.0.0/0"], /protocol "sctp" is not known/],
      [7, ["sg", "create", "bad7", "--vpc", "prod", "--inbound", "tcp:80"], /has 2 parts; a rule is PROTO:PORTS:PEER/],
      // A name the server cannot resolve: refused by the server, still nothing created.
      [3, ["sg", "create", "bad8", "--vpc", "prod", "--inbound", "tcp:80:no-such-sg"], /no-such-sg/],
      [7, ["sg", "rule", "add", "web-sg", "--vpc", "prod", "--inbound", "tcp:0:0.0.0.0/0"], /port 0 is out of range/],
      [7, ["acl", "create", "bad9", "--vpc", "prod", "--entry", "100:ingress:deny:tcp:22:0.0.0.0/0;reboot"], /contains ";"/],
      [7, ["acl", "create", "bad9", "--vpc", "prod", "--entry", "0:ingress:deny:tcp:22:0.0.0.0/0"], /rule number "0" is not valid; use 1–32766/],
      [7, ["acl", "create", "bad9", "--vpc", "prod", "--entry", "100:inward:deny:tcp:22:0.0.0.0/0"], /direction "inward" is not known/],
      [7, ["acl", "create", "bad9", "--vpc", "prod", "--entry", "100:ingress:drop:tcp:22:0.0.0.0/0"], /action "drop" is not known; use allow or deny/],
      [7, ["acl", "create", "bad9", "--vpc", "prod", "--entry", "100:ingress:deny:tcp:22:web-sg"], /an ACL entry matches a CIDR/],
      [7, ["acl", "create", "bad9", "--vpc", "prod", "--entry", "100:ingress:deny:tcp:22"], /has 5 parts; an entry is NUM:DIRECTION:ACTION/],
      [7, ["sg", "create", "Bad", "--vpc", "prod"], /name: "Bad" is not a valid name/],
      [2, ["sg", "attach", "nic-000000000000"], /--group/],
    ];
    await Promise.all(
      cases.map(async ([code, args, msg]) => {
        const r = await expect(code, args);
        assert.match(r.stderr, /^error: /m, `stderr of ${args.join(" ")}`);
        assert.match(r.stderr, msg, `stderr of ${args.join(" ")}`);
        assert.equal(r.stdout, "", `stdout of ${args.join(" ")}`);
      }),
    );
    assert.equal(await snapshot(), before);
  });

  test("sg import of a vpcctl policy file: allow entries become rules, deny entries are warned about", async () => {
    const file = join(tmp, "database_policy.json");
    // The vpcctl tutorial's database policy.
    writeFileSync(
      file,
      JSON.stringify({
        subnet: "10.0.2.0/24",
        ingress: [
          { port: 5432, protocol: "tcp", action: "allow" },
          { port: 22, protocol: "tcp", action: "deny" },
        ],
        egress: [
          { port: 80, protocol: "tcp", action: "allow" },
          { port: 443, protocol: "tcp", action: "allow" },
        ],
      }),
    );
    let r = await expect(0, ["sg", "import", "db-policy", file, "--vpc", "prod"]);
    assert.match(r.stdout, /created security group db-policy/);
    assert.match(r.stderr, /^warning: .*deny tcp 22.*a security group can only allow/m);
    assert.match(r.stderr, /microvpc acl import --vpc prod/);
    const g = (await json(["sg", "get", "db-policy", "--vpc", "prod"])).securityGroup;
    assert.deepEqual(
      g.rules.map((x: Record<string, unknown>) => `${x.direction}:${x.protocol}:${x.portFrom}:${x.cidr}`),
      ["DIRECTION_INGRESS:PROTOCOL_TCP:5432:0.0.0.0/0", "DIRECTION_EGRESS:PROTOCOL_TCP:80:0.0.0.0/0", "DIRECTION_EGRESS:PROTOCOL_TCP:443:0.0.0.0/0"],
    );
    // Again, into the existing group: idempotent; -o json for scripts.
    const again = await json(["sg", "import", "db-policy", file, "--vpc", "prod"]);
    assert.equal(again.created, false);
    assert.equal(again.subnetCidr, "10.0.2.0/24");
    assert.equal(again.securityGroup.rules.length, 3);
    assert.ok(again.warnings.some((w: string) => /deny/.test(w)));

    // A broken file: exit 7 naming the JSON path, nothing created.
    const bad = join(tmp, "bad_policy.json");
    writeFileSync(bad, JSON.stringify({ subnet: "10.0.2.0/24", ingress: [{ port: 70000, protocol: "tcp", action: "allow" }] }));
    r = await expect(7, ["sg", "import", "bad-policy", bad, "--vpc", "prod"]);
    assert.match(r.stderr, /vpcctl_policy_json\.ingress\[0\]\.port: 70000 is not a port/);
    writeFileSync(bad, "{ not json");
    r = await expect(7, ["sg", "import", "bad-policy", bad, "--vpc", "prod", "--dry-run"]);
    assert.match(r.stderr, /is not valid JSON/);
    await expect(3, ["sg", "get", "bad-policy", "--vpc", "prod"]);
    r = await expect(2, ["sg", "import", "bad-policy", join(tmp, "missing.json"), "--vpc", "prod"]);
    assert.match(r.stderr, /cannot read the policy file/);
  });
});

describe("network ACLs", () => {
  test("acl create, list, get, entries, associate, disassociate, delete", async () => {
    let r = await expect(0, [
      "acl",
      "create",
      "data-acl",
      "--vpc",
      "prod",
      "--subnet",
      "data",
      "--entry",
      "100:ingress:deny:tcp:22:0.0.0.0/0",
      "--entry",
      "200:ingress:allow:all:all:10.0.0.0/16",
      "--entry",
      "100:egress:allow:all:all:0.0.0.0/0",
    ]);
    assert.match(r.stdout, /data-acl/);
    assert.match(r.stdout, /100\s+ingress\s+deny\s+tcp:22:0\.0\.0\.0\/0/);
    const data = (await json(["subnet", "get", "data", "--vpc", "prod"])).subnet.id;
    const a = (await json(["acl", "get", "data-acl", "--vpc", "prod"])).networkAcl;
    assert.deepEqual(a.subnetIds, [data]);
    assert.deepEqual(
      a.entries.map((e: Record<string, unknown>) => [e.ruleNumber, e.direction, e.action, e.protocol, e.portFrom, e.cidr]),
      [
        [100, "DIRECTION_INGRESS", "ACL_ACTION_DENY", "PROTOCOL_TCP", 22, "0.0.0.0/0"],
        [200, "DIRECTION_INGRESS", "ACL_ACTION_ALLOW", "PROTOCOL_ALL", 0, "10.0.0.0/16"],
        [100, "DIRECTION_EGRESS", "ACL_ACTION_ALLOW", "PROTOCOL_ALL", 0, "0.0.0.0/0"],
      ],
    );
    r = await expect(0, ["acl", "list", "--vpc", "prod"]);
    assert.match(r.stdout, /data-acl.*100:ingress:deny:tcp:22:0\.0\.0\.0\/0/);
    assert.ok(r.stdout.includes(data));

    r = await expect(0, ["acl", "entry", "add", "data-acl", "--vpc", "prod", "--entry", "150:ingress:allow:tcp:5432:10.0.1.0/24"]);
    assert.match(r.stdout, /150\s+ingress\s+allow\s+tcp:5432:10\.0\.1\.0\/24/);
    r = await expect(0, ["acl", "entry", "remove", a.id, "--entry", "ingress:200"]);
    assert.doesNotMatch(r.stdout, /10\.0\.0\.0\/16/);

    // Deleting an associated ACL is refused; disassociate first.
    await expect(5, ["acl", "delete", "data-acl", "--vpc", "prod"]);
    r = await expect(0, ["acl", "disassociate", "--subnet", "data", "--vpc", "prod"]);
    assert.match(r.stdout, new RegExp(`no longer has network ACL ${a.id}`));
    r = await expect(0, ["acl", "disassociate", "--subnet", "data", "--vpc", "prod"]);
    assert.match(r.stdout, /had no network ACL/);
    r = await expect(0, ["acl", "associate", "data-acl", "--subnet", data, "--vpc", "prod"]);
    assert.ok(r.stdout.includes(data));
    await expect(0, ["acl", "disassociate", "--subnet", data]);
    r = await expect(0, ["acl", "delete", "data-acl", "--vpc", "prod"]);
    assert.match(r.stdout, /deleted network ACL data-acl/);
  });

  test("acl import applies a vpcctl policy to the subnet it names, with vpcctl's catch-all", async () => {
    const file = join(tmp, "web_policy.json");
    writeFileSync(
      file,
      JSON.stringify({
        subnet: "10.0.1.0/24",
        ingress: [
          { port: 80, protocol: "tcp", action: "allow" },
          { port: 22, protocol: "tcp", action: "deny" },
        ],
        egress: [],
      }),
    );
    let r = await expect(0, ["acl", "import", file, "--vpc", "prod"]);
    assert.match(r.stdout, /created network ACL policy-web for subnet web/);
    const web = (await json(["subnet", "get", "web", "--vpc", "prod"])).subnet.id;
    let a = (await json(["acl", "get", "policy-web", "--vpc", "prod"])).networkAcl;
    assert.deepEqual(a.subnetIds, [web]);
    assert.deepEqual(
      a.entries.map((e: Record<string, unknown>) => `${e.ruleNumber}:${e.direction}:${e.action}`),
      [
        "100:DIRECTION_INGRESS:ACL_ACTION_ALLOW",
        "110:DIRECTION_INGRESS:ACL_ACTION_DENY",
        "32766:DIRECTION_INGRESS:ACL_ACTION_ALLOW",
        "32766:DIRECTION_EGRESS:ACL_ACTION_ALLOW",
      ],
    );
    // Again with --default-action deny: the same ACL, entries replaced.
    r = await expect(0, ["acl", "import", file, "--vpc", "prod", "--default-action", "deny"]);
    assert.match(r.stdout, /replaced the entries of network ACL policy-web/);
    a = (await json(["acl", "get", "policy-web", "--vpc", "prod"])).networkAcl;
    assert.deepEqual(
      a.entries.map((e: Record<string, unknown>) => e.ruleNumber),
      [100, 110],
    );
    // A file for a subnet the VPC does not have.
    writeFileSync(file, JSON.stringify({ subnet: "10.0.9.0/24", ingress: [] }));
    r = await expect(2, ["acl", "import", file, "--vpc", "prod"]);
    assert.match(r.stderr, /VPC prod has no subnet 10\.0\.9\.0\/24.*--subnet/);
    await expect(0, ["acl", "disassociate", "--subnet", "web", "--vpc", "prod"]);
    await expect(0, ["acl", "delete", "policy-web", "--vpc", "prod"]);
  });
});

describe("gateway", () => {
  test("nat create on a public subnet; refused on a private one (exit 5); list, get, delete --vpc", async () => {
    let r = await expect(5, ["nat", "create", "--vpc", "prod", "--subnet", "data"]);
    assert.match(r.stderr, /^error: .*private.*public subnet/);
    assert.equal((await json(["nat", "list"])).natGateways.length, 0);

    r = await expect(7, ["nat", "create", "--vpc", "prod", "--subnet", "web", "--address", "198.51.100.1"]);
    assert.match(r.stderr, /outside the floating IP pool/);
    const n = (await json(["nat", "create", "--vpc", "prod", "--subnet", "web", "--address", "203.0.113.6"])).natGateway;
    assert.match(n.id, /^nat-[0-9a-f]{12}$/);
    assert.deepEqual(n.sourceSubnetIds, []);
    assert.equal(n.address, "203.0.113.6", "its own address, from the pool");
    r = await expect(0, ["nat", "list", "--vpc", "prod"]);
    assert.ok(r.stdout.includes(n.id));
    assert.match(r.stdout, /all private/);
    assert.match(r.stdout, /ADDRESS/);
    assert.match(r.stdout, /HOLDER/);
    assert.ok(r.stdout.includes("203.0.113.6"));
    assert.match((await expect(0, ["nat", "get", "--vpc", "prod"])).stdout, /address\W+203\.0\.113\.6/);
    assert.equal((await json(["nat", "get", "--vpc", "prod"])).natGateway.id, n.id);
    await expect(4, ["nat", "create", "--vpc", "prod", "--subnet", "web"]);
    await expect(2, ["nat", "delete"]);
    await expect(2, ["nat", "delete", n.id, "--vpc", "prod"]);
    r = await expect(0, ["nat", "delete", "--vpc", "prod"]);
    assert.match(r.stdout, /deleted the NAT gateway of VPC prod/);
    assert.equal((await json(["nat", "list"])).natGateways.length, 0);
  });

  test("fip allocate, list, get, release; pf needs a VM address", async () => {
    const a = (await json(["fip", "allocate", "--description", "for web"])).floatingIp;
    assert.equal(a.address, "203.0.113.1");
    const b = (await json(["fip", "allocate", "--address", "203.0.113.5"])).floatingIp;
    assert.equal(b.address, "203.0.113.5");
    let r = await expect(7, ["fip", "allocate", "--address", "198.51.100.1"]);
    assert.match(r.stderr, /outside the floating IP pool 203\.0\.113\.0\/29/);
    await expect(4, ["fip", "allocate", "--address", "203.0.113.5"]);

    const l = await json(["fip", "list"]);
    assert.deepEqual(l.floatingIps.map((f: Record<string, unknown>) => f.address).sort(), ["203.0.113.1", "203.0.113.5"]);
    assert.deepEqual(l.pool, [POOL]);
    assert.equal(l.poolFree, 4);
    r = await expect(0, ["fip", "list"]);
    assert.match(r.stdout, /203\.0\.113\.1.*for web/);
    assert.match(r.stdout, /pool 203\.0\.113\.0\/29: 4 free/);
    assert.equal((await json(["fip", "get", "203.0.113.5"])).floatingIp.id, b.id);

    r = await expect(0, ["fip", "release", b.id]);
    assert.match(r.stdout, /released/);
    r = await expect(0, ["fip", "release", "203.0.113.5"]);
    assert.match(r.stdout, /not allocated; nothing to release/);
    r = await expect(0, ["fip", "disassociate", a.address]);
    assert.match(r.stdout, /was not associated/);

    // A port forward to an address no NIC holds is refused.
    r = await expect(5, ["pf", "create", "--vpc", "prod", "--outside-port", "8080", "--address", "10.0.1.200", "--port", "80"]);
    assert.match(r.stderr, /10\.0\.1\.200/);
    await expect(2, ["pf", "create", "--vpc", "prod", "--outside-port", "70000", "--address", "10.0.1.200"]);
    assert.deepEqual((await json(["pf", "list"])).portForwards, []);
  });
});

describe("VMs", () => {
  test("vm create, list, get, inspect; test-connectivity exit codes; sg attach from the NIC id; fip and pf on the VM; vm delete", async () => {
    await expect(0, ["sg", "create", "app-sg", "--vpc", "prod", "--inbound", "tcp:80:0.0.0.0/0", "--inbound", "icmp:all:10.0.0.0/16"]);
    await expect(0, ["sg", "create", "pg-sg", "--vpc", "prod", "--inbound", "tcp:5432:app-sg"]);
    let r = await expect(0, ["vm", "create", "app1", "--vpc", "prod", "--subnet", "web", "--sg", "app-sg", "--label", "role=web"]);
    assert.match(r.stdout, /app1/);
    assert.match(r.stdout, /running/);
    const pg = (await json(["vm", "create", "pg1", "--vpc", "prod", "--subnet", "data", "--sg", "pg-sg", "--address", "10.0.2.50"])).vm;
    assert.equal(pg.nics[0].guest.address, "10.0.2.50");
    assert.equal(pg.state, "VM_STATE_RUNNING");

    r = await expect(0, ["vm", "list", "--vpc", "prod"]);
    assert.match(r.stdout, /app1.*netns.*running.*10\.0\.1\.\d+/);
    assert.match(r.stdout, /pg1.*running.*10\.0\.2\.50/);
    const app = (await json(["vm", "get", "app1", "--vpc", "prod"])).vm;
    r = await expect(0, ["vm", "inspect", app.id]);
    assert.match(r.stdout, /steps:/);
    assert.match(r.stdout, /ipam\s+done/);
    await expect(4, ["vm", "create", "app1", "--vpc", "prod", "--subnet", "web"]);
    r = await expect(3, ["vm", "get", "nosuch", "--vpc", "prod"]);
    assert.match(r.stderr, /not found/);

    // Probes: the gateway answers; pg1 is closed to ICMP; 5432 is open to app-sg but nothing listens.
    r = await expect(0, ["test-connectivity", "app1", "10.0.1.1", "--vpc", "prod"]);
    assert.match(r.stdout, /^reachable: 10\.0\.1\.\d+ → 10\.0\.1\.1/);
    r = await expect(8, ["test-connectivity", "app1", "pg1", "--vpc", "prod", "--wait-ms", "500"]);
    assert.match(r.stdout, /^not reachable: 10\.0\.1\.\d+ → 10\.0\.2\.50 \(vm-[0-9a-f]{12}\): timeout/);
    const probe = JSON.parse((await expect(8, ["test-connectivity", "app1", "10.0.2.50:5432", "--vpc", "prod", "-o", "json"])).stdout);
    assert.equal(probe.result, "CONNECTIVITY_RESULT_REFUSED");
    await expect(7, ["test-connectivity", "app1", "10.0.2.50:99999", "--vpc", "prod"]);
    await expect(2, ["test-connectivity", "app1", "10.0.2.50:80", "--port", "81", "--vpc", "prod"]);

    // sg attach with only the NIC id: the rest comes from the netagent.
    const nic = app.nics[0].id;
    r = await expect(0, ["sg", "attach", nic, "--group", "app-sg,pg-sg"]);
    assert.match(r.stdout, /changed:\s+yes/);
    const binding = (await json(["sg", "bindings", "--group", "pg-sg", "--vpc", "prod"])).bindings;
    assert.deepEqual(
      binding.map((b: Record<string, unknown>) => [b.nicId, b.address, b.hostInterface]),
      [
        [nic, app.nics[0].guest.address, app.nics[0].hostInterface],
        [pg.nics[0].id, "10.0.2.50", pg.nics[0].hostInterface],
      ].sort(),
    );
    await expect(0, ["sg", "attach", nic, "--group", "app-sg"]);

    // A floating IP and a port forward on the VM's address.
    const fip = (await json(["fip", "allocate"])).floatingIp;
    r = await expect(0, ["fip", "associate", fip.id, "--vpc", "prod", "--address", app.nics[0].guest.address]);
    assert.match(r.stdout, new RegExp(`${app.nics[0].guest.address.replace(/\./g, "\\.")} in vpc-`));
    await expect(5, ["fip", "release", fip.address]);
    await expect(0, ["fip", "release", fip.address, "--force"]);
    const pf = (await json(["pf", "create", "--vpc", "prod", "--outside-port", "8080", "--address", app.nics[0].guest.address, "--port", "80"])).portForward;
    assert.equal(pf.privatePort, 80);
    r = await expect(0, ["pf", "list"]);
    assert.match(r.stdout, /tcp.*:8080.*:80/);
    r = await expect(0, ["pf", "delete", pf.id]);
    assert.match(r.stdout, /deleted port forward/);

    r = await expect(0, ["vm", "delete", "app1", "--vpc", "prod"]);
    assert.match(r.stdout, /deleted vm app1/);
    await expect(0, ["vm", "delete", pg.id]);
    r = await expect(0, ["vm", "delete", pg.id]);
    assert.match(r.stdout, /does not exist/);
    assert.deepEqual((await json(["vm", "list"])).vms, []);
    await expect(0, ["sg", "delete", "pg-sg", "--vpc", "prod"]);
    await expect(0, ["sg", "delete", "app-sg", "--vpc", "prod"]);
  });
});

test("vpc peer: create, list, get, delete; --allow-cidrs split by VPC; refusals with exit codes", async () => {
  await expect(0, ["vpc", "create", "staging", "--cidr", "10.1.0.0/16"]);
  // --allow-cidrs is split by the VPC holding each CIDR, before anything is sent.
  const d = JSON.parse(
    (await expect(0, ["vpc", "peer", "create", "--vpc1", "prod", "--vpc2", "staging", "--allow-cidrs", "10.1.1.0/24,10.0.1.0/24", "--dry-run", "-o", "json"]))
      .stdout,
  );
  assert.deepEqual([d.request.vpc1AllowedCidrs, d.request.vpc2AllowedCidrs], [["10.0.1.0/24"], ["10.1.1.0/24"]]);
  let r = await expect(7, ["vpc", "peer", "create", "--vpc1", "prod", "--vpc2", "staging", "--allow-cidrs", "10.9.0.0/24"]);
  assert.match(r.stderr, /10\.9\.0\.0\/24 is in neither VPC/);
  r = await expect(7, ["vpc", "peer", "create", "--vpc1", "prod", "--vpc2", "prod"]);
  assert.match(r.stderr, /cannot be peered with itself/);
  const p = (await json(["vpc", "peer", "create", "--vpc1", "prod", "--vpc2", "staging", "--allow-cidrs", "10.1.1.0/24,10.0.1.0/24", "--description", "logs"]))
    .peering;
  assert.equal(p.name, "prod--staging");
  assert.deepEqual([p.vpc1AllowedCidrs, p.vpc2AllowedCidrs], [["10.0.1.0/24"], ["10.1.1.0/24"]]);
  r = await expect(4, ["vpc", "peer", "create", "--vpc1", "staging", "--vpc2", "prod"]);
  assert.match(r.stderr, /already peered/);
  r = await expect(0, ["vpc", "peer", "list"]);
  assert.match(r.stdout, /prod--staging/);
  assert.equal((await json(["vpc", "peer", "get", "--vpc1", "staging", "--vpc2", "prod"])).peering.id, p.id);
  r = await expect(0, ["vpc", "peer", "get", "prod--staging"]);
  assert.match(r.stdout, /10\.0\.1\.0\/24/);
  await expect(3, ["vpc", "peer", "get", "pcx-000000000000"]);
  await expect(2, ["vpc", "peer", "delete"]);
  await expect(5, ["vpc", "delete", "staging"]);
  r = await expect(0, ["vpc", "peer", "delete", p.id]);
  assert.match(r.stdout, /deleted peering/);
  r = await expect(0, ["vpc", "peer", "delete", p.id]);
  assert.match(r.stdout, /does not exist/);
  // Nor is a VPC deleted under its security groups, ACLs or NAT gateway (they would dangle).
  await expect(0, ["sg", "create", "stage-sg", "--vpc", "staging", "--inbound", "tcp:80:0.0.0.0/0"]);
  await expect(0, ["subnet", "create", "s1", "--vpc", "staging", "--cidr", "10.1.1.0/24", "--type", "public"]);
  // One refusal at a time (which comes first differs between one Redis and a
  // cluster, whose NAT check runs before its script): the ACL's, then the NAT's.
  await expect(0, ["acl", "create", "stage-acl", "--vpc", "staging", "--subnet", "s1", "--entry", "100:ingress:deny:tcp:22:0.0.0.0/0"]);
  r = await expect(5, ["subnet", "delete", "s1", "--vpc", "staging"]);
  assert.match(r.stderr, /network ACL acl-[0-9a-f]{12} is associated/);
  await expect(0, ["acl", "disassociate", "--subnet", "s1", "--vpc", "staging"]);
  await expect(0, ["nat", "create", "--vpc", "staging", "--subnet", "s1"]);
  r = await expect(5, ["subnet", "delete", "s1", "--vpc", "staging"]);
  // The id quoted on a cluster (read in the daemon, shown as untrusted text), bare from one Redis's script.
  assert.match(r.stderr, /NAT gateway "?nat-[0-9a-f]{12}"? sits in it/);
  await expect(0, ["nat", "delete", "--vpc", "staging"]);
  // (With the NAT gateway still there, a cluster names it first.)
  r = await expect(5, ["vpc", "delete", "staging"]);
  assert.match(r.stderr, /still has 1 subnet/);
  await expect(0, ["subnet", "delete", "s1", "--vpc", "staging"]);
  r = await expect(5, ["vpc", "delete", "staging"]);
  assert.match(r.stderr, /still has 1 security group\(s\), 1 network ACL\(s\)/);
  await expect(0, ["sg", "delete", "stage-sg", "--vpc", "staging"]);
  await expect(0, ["acl", "delete", "stage-acl", "--vpc", "staging"]);
  await expect(0, ["vpc", "delete", "staging"]);
});

test("--dry-run validates, prints the request, and changes nothing", async () => {
  await expect(0, ["sg", "create", "dry-base", "--vpc", "prod", "--inbound", "tcp:80:0.0.0.0/0"]);
  const policy = join(tmp, "dry_policy.json");
  writeFileSync(policy, JSON.stringify({ subnet: "10.0.2.0/24", ingress: [{ port: 5432, protocol: "tcp", action: "allow" }] }));
  const before = await snapshot();

  const dry: [string[], RegExp][] = [
    [["sg", "create", "dry-sg", "--vpc", "prod", "--inbound", "tcp:80:0.0.0.0/0", "--inbound", "tcp:5432:dry-base"], /FirewallService\/CreateSecurityGroup/],
    [["sg", "delete", "dry-base", "--vpc", "prod"], /FirewallService\/DeleteSecurityGroup/],
    [["sg", "rule", "add", "dry-base", "--vpc", "prod", "--outbound", "udp:53:10.0.0.2"], /FirewallService\/UpdateSecurityGroup/],
    [["sg", "rule", "remove", "dry-base", "--vpc", "prod", "--inbound", "tcp:80:0.0.0.0/0"], /FirewallService\/UpdateSecurityGroup/],
    [["sg", "import", "dry-base", policy, "--vpc", "prod"], /FirewallService\/UpdateSecurityGroup/],
    [["sg", "import", "dry-new", policy, "--vpc", "prod"], /FirewallService\/CreateSecurityGroup/],
    [["sg", "detach", "nic-0123456789ab"], /FirewallService\/UnbindNic/],
    [["sg", "detach", "nic-0123456789ab", "--detaching"], /FirewallService\/UnbindNic[\s\S]*"detaching": true/],
    [
      [
        "sg",
        "attach",
        "nic-0123456789ab",
        "--vpc",
        "prod",
        "--subnet",
        "web",
        "--address",
        "10.0.1.9",
        "--mac",
        "02:00:0a:00:01:09",
        "--host-interface",
        "veth9",
        "--group",
        "dry-base",
      ],
      /FirewallService\/BindNic/,
    ],
    [["acl", "create", "dry-acl", "--vpc", "prod", "--subnet", "data", "--entry", "100:ingress:deny:tcp:22:0.0.0.0/0"], /FirewallService\/CreateNetworkAcl/],
    [["acl", "import", policy, "--vpc", "prod"], /FirewallService\/CreateNetworkAcl/],
    [["acl", "associate", "dry-acl", "--subnet", "data", "--vpc", "prod"], /FirewallService\/AssociateNetworkAcl/],
    [["acl", "disassociate", "--subnet", "data", "--vpc", "prod"], /FirewallService\/DisassociateNetworkAcl/],
    [["acl", "delete", "dry-acl", "--vpc", "prod"], /FirewallService\/DeleteNetworkAcl/],
    [["nat", "create", "--vpc", "prod", "--subnet", "web"], /GatewayService\/CreateNatGateway/],
    [["nat", "delete", "--vpc", "prod"], /GatewayService\/DeleteNatGateway/],
    [["fip", "allocate", "--address", "203.0.113.3"], /GatewayService\/AllocateFloatingIp/],
    [["fip", "associate", "203.0.113.3", "--vpc", "prod", "--address", "10.0.1.4"], /GatewayService\/AssociateFloatingIp/],
    [["fip", "release", "203.0.113.3", "--force"], /GatewayService\/ReleaseFloatingIp/],
    [["pf", "create", "--vpc", "prod", "--outside-port", "8080", "--address", "10.0.1.4"], /GatewayService\/CreatePortForward/],
    [["pf", "delete", "pf-0123456789ab"], /GatewayService\/DeletePortForward/],
    [["vpc", "peer", "create", "--vpc1", "prod", "--vpc2", "prod"], /PeeringService\/CreatePeering/],
    [["vm", "create", "dry-vm", "--vpc", "prod", "--subnet", "web", "--sg", "dry-base", "--kind", "qemu", "--vcpus", "2"], /VmService\/CreateVm/],
    [["vm", "delete", "dry-vm", "--vpc", "prod"], /VmService\/DeleteVm/],
    [["test-connectivity", "dry-vm", "10.0.1.1:80", "--vpc", "prod"], /VmService\/TestConnectivity/],
  ];
  await Promise.all(
    dry.map(async ([args, method]) => {
      const r = await expect(0, [...args, "--dry-run"]);
      assert.match(r.stdout, method, `dry run of ${args.join(" ")}`);
      assert.match(r.stdout, /nothing was sent/, `dry run of ${args.join(" ")}`);
    }),
  );
  // -o json: one parsable document.
  const j = JSON.parse((await expect(0, ["sg", "create", "dry-sg", "--vpc", "prod", "--inbound", "icmp:8/0:10.0.0.0/8", "--dry-run", "-o", "json"])).stdout);
  assert.equal(j.method, "microvpc.v1.FirewallService/CreateSecurityGroup");
  assert.deepEqual(j.request.rules, [
    { direction: "DIRECTION_INGRESS", protocol: "PROTOCOL_ICMP", portFrom: 0, portTo: 0, icmpType: 8, icmpCode: 0, cidr: "10.0.0.0/8", description: "" },
  ]);
  // Local validation needs no daemon at all: every address points nowhere.
  const port = await freePort();
  const nowhere = ["--server", `127.0.0.1:${port}`, "--firewall", `127.0.0.1:${port}`, "--gateway", `127.0.0.1:${port}`, "--vmm", `127.0.0.1:${port}`];
  await expect(0, ["sg", "create", "x", "--vpc", "prod", "--inbound", "tcp:80:0.0.0.0/0", "--dry-run"], nowhere);
  // sg import --dry-run parses locally, but must ask whether the group exists (create or update).
  let r = await expect(6, ["sg", "import", "x", policy, "--vpc", "prod", "--dry-run"], nowhere);
  assert.match(r.stderr, /is microvpcd firewall running/);
  r = await expect(7, ["sg", "create", "x", "--vpc", "prod", "--inbound", "tcp:70000:0.0.0.0/0", "--dry-run"], nowhere);
  assert.match(r.stderr, /port 70000 is out of range/);
  r = await expect(7, ["fip", "associate", "fip-nothex", "--vpc", "prod", "--address", "10.0.1.4", "--dry-run"], nowhere);
  assert.match(r.stderr, /not a fip id/);
  r = await expect(7, ["vm", "create", "vm;1", "--vpc", "prod", "--subnet", "web", "--dry-run"], nowhere);
  assert.match(r.stderr, /name: "vm;1" is not a valid name/);
  await expect(0, ["nat", "create", "--vpc", "prod", "--subnet", "web", "--dry-run"], nowhere);

  assert.equal(await snapshot(), before);
  await expect(0, ["sg", "delete", "dry-base", "--vpc", "prod"]);
});

test("status reports each daemon; exit 0 only when all are healthy", async () => {
  // The firewall may still report its first pass (made before Redis answered) for up to its drift interval.
  let r: CliRun = { code: -1, stdout: "", stderr: "" };
  assert.ok(
    await waitFor(async () => (r = await run(["status"])).code === 0, { timeoutMs: 15_000, intervalMs: 500 }),
    `status never healthy:\n${r.stdout}\n${r.stderr}`,
  );
  for (const d of ["ipam", "netagent", "firewall", "gateway", "vmm"]) assert.match(r.stdout, new RegExp(`${d}\\s+127\\.0\\.0\\.1:\\d+\\s+serving`));
  assert.match(r.stdout, new RegExp(`host ${HOST_ID}`));
  assert.match(r.stdout, /^firewall: healthy/m);
  assert.match(r.stdout, /^gateway: \d+ NAT gateway\(s\); \d+ floating IP\(s\)/m);
  // WireGuard peers, or that no VPC here spans hosts (or, from a netagent without GetOverlayStatus, "not available").
  assert.match(r.stdout, /^overlay(: no VPC of this host spans another host| \(WireGuard\):|: not available)/m);
  assert.match(r.stdout, /^healthy$/m);

  const s = JSON.parse((await expect(0, ["status", "-o", "json"])).stdout);
  assert.equal(s.healthy, true);
  assert.deepEqual(
    s.services.map((x: Record<string, unknown>) => [x.daemon, x.status]),
    [
      ["ipam", "serving"],
      ["netagent", "serving"],
      ["firewall", "serving"],
      ["gateway", "serving"],
      ["vmm", "serving"],
    ],
  );
  assert.equal(s.hostId, HOST_ID);
  assert.equal(s.netagent.health, "HOST_HEALTH_HEALTHY");
  assert.equal(s.firewall.health, "FIREWALL_HEALTH_HEALTHY");
  assert.deepEqual(s.gateway.pool, [POOL]);
  assert.equal(typeof s.overlay.available, "boolean");
  assert.ok(Array.isArray(s.nics));

  // One daemon down: the others still reported, exit 6, the down one named.
  const gone = `127.0.0.1:${await freePort()}`;
  r = await expect(6, ["status", "--gateway", gone]);
  assert.match(r.stdout, new RegExp(`gateway\\s+${gone}\\s+unreachable: connection refused`));
  assert.match(r.stdout, /firewall\s+127\.0\.0\.1:\d+\s+serving/);
  assert.match(r.stdout, /^gateway: skipped/m);
  assert.match(r.stdout, /NOT healthy:\n {2}- gateway at/);

  // A daemon that answers UNIMPLEMENTED (here: the vmm's address given as the netagent's):
  // its sections say "not available", the overlay included, and the status is not healthy.
  r = await expect(1, ["status", "--netagent", daemons.vmm!.address]);
  assert.match(r.stdout, /^overlay: not available \(microvpcd netagent at 127\.0\.0\.1:\d+ does not offer it yet\)/m);
  assert.match(r.stdout, /^netagent: not available/m);
  assert.match(r.stdout, /^firewall: healthy/m);

  // --host takes a host, not a host:port.
  r = await expect(2, ["--host", "127.0.0.1:7403", "status"]);
  assert.match(r.stderr, /--host takes a host without a port/);
});

test("errors name the daemon that is down and how to point at it", async () => {
  const gone = `127.0.0.1:${await freePort()}`;
  let r = await expect(6, ["sg", "list", "--firewall", gone]);
  assert.match(
    r.stderr,
    new RegExp(
      `^error: cannot connect to ${gone} \\(connection refused\\); is microvpcd firewall running at ${gone}\\? \\(set --firewall or MICROVPC_FIREWALL, or --host`,
    ),
  );
  r = await expect(6, ["nat", "list", "--gateway", gone]);
  assert.match(r.stderr, /is microvpcd gateway running/);
  r = await expect(6, ["vm", "list", "--vmm", gone]);
  assert.match(r.stderr, /is microvpcd vmm running/);
  // A daemon asked for a service it does not serve (the firewall's address given as the gateway's).
  r = await expect(6, ["fip", "list", "--gateway", daemons.firewall!.address]);
  assert.match(r.stderr, /GatewayService\/ListFloatingIps is not available on this server yet: microvpcd gateway at .* answers UNIMPLEMENTED/);
});

test("help and completion cover the new command groups", async () => {
  let r = await expect(0, ["--help"]);
  for (const w of ["sg", "acl", "nat", "fip", "pf", "vm", "test-connectivity", "status", "--firewall", "MICROVPC_GATEWAY", "--host", "8  test-connectivity"]) {
    assert.ok(r.stdout.includes(w), `--help lacks ${w}`);
  }
  r = await expect(0, ["sg", "create", "--help"]);
  assert.match(r.stdout, /PROTO:PORTS:PEER/);

  r = await expect(0, ["completion", "bash"]);
  for (const w of [
    "'sg'",
    "'sg rule'",
    "'acl entry'",
    "'vpc peer'",
    "'vm create'",
    "'fip'",
    "'nat'",
    "'pf'",
    "'status'",
    "'test-connectivity'",
    "--inbound",
    "--outbound",
    "--no-default-egress",
  ]) {
    assert.ok(r.stdout.includes(w), `completion lacks ${w}`);
  }
  const file = join(tmp, "completion.bash");
  writeFileSync(file, r.stdout);
  const complete = (words: string[]) =>
    new Promise<string>((resolve, reject) =>
      execFile(
        "bash",
        [
          "-c",
          `source "$1"; COMP_WORDS=(${words.map((w) => `'${w}'`).join(" ")}); COMP_CWORD=${words.length - 1}; _microvpc_complete; echo "\${COMPREPLY[*]}"`,
          "bash",
          file,
        ],
        (err, stdout, stderr) => (err ? reject(new Error(stderr)) : resolve(stdout.trim())),
      ),
    );
  assert.match(
    await complete(["microvpc", ""]),
    /^vpc subnet ip sg acl nat fip pf vpn dns vm test-connectivity host nic flow-logs metadata status config version completion /,
  );
  assert.match(await complete(["microvpc", "vpc", "peer", ""]), /^create list get delete /);
  assert.match(await complete(["microvpc", "sg", "rule", ""]), /^add remove /);
  assert.equal(await complete(["microvpc", "vm", "create", "x", "--kind", ""]), "netns qemu firecracker");
  assert.equal(await complete(["microvpc", "acl", "list", "-o", ""]), "table wide json yaml name");
});
