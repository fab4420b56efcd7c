// Flow logs' pure parts: the conntrack and ulogd2 line parsers, the rotating
// writer, the deciding rule, the sample rate, and what compile() adds to a
// NIC chain when its flows are logged.
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Logger } from "pino";
import { afterAll, test } from "vitest";
import { compile } from "../../services/firewall/compile.js";
import {
  acceptedBy,
  checkSampleRate,
  filterFlowLogs,
  FLOW_LOG_GROUP,
  FlowLogCollector,
  type FlowRecord,
  parseCtEntry,
  parseCtEvent,
  parseUlogDrop,
  RotatingJsonl,
  vmOfOwner,
} from "../../services/firewall/flowlogs.js";
import { flowLogNics, flowLogRates, parseFlowLogConfig } from "../../services/firewall/flowlog-config.js";
import type { VpcFirewallState } from "../../services/firewall/model.js";

const dirs: string[] = [];
afterAll(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })));

const NIC = "nic-0123456789ab";
const SG = "sg-aaaaaaaaaaaa";
const state = (flowLogs?: VpcFirewallState["flowLogs"]): VpcFirewallState => ({
  vpcId: "vpc-000000000001",
  subnets: [{ subnetId: "subnet-000000000001", cidr: "10.0.1.0/24", bridge: "br-1" }],
  nics: [
    {
      nicId: NIC,
      vpcId: "vpc-000000000001",
      subnetId: "subnet-000000000001",
      address: "10.0.1.5",
      mac: "02:00:00:00:00:05",
      hostId: "h1",
      hostIf: "tap5",
      groupIds: [SG],
      boundMs: 0,
      updatedMs: 0,
    },
  ],
  groups: new Map([
    [
      SG,
      {
        id: SG,
        vpcId: "vpc-000000000001",
        name: "web",
        description: "",
        labels: [],
        rules: [
          { dir: "ingress", proto: "tcp", portFrom: 443, portTo: 443, cidr: "0.0.0.0/0", description: "" },
          { dir: "ingress", proto: "tcp", portFrom: 80, portTo: 80, cidr: "10.0.0.0/16", description: "" },
        ],
        generation: 1,
        createdMs: 0,
        updatedMs: 0,
      },
    ],
  ]),
  members: new Map(),
  acls: new Map(),
  ...(flowLogs ? { flowLogs } : {}),
});

test("conntrack NEW and DESTROY lines: tuple of the original direction, both directions' counts, the flow id", () => {
  const d = parseCtEvent(
    "[1796226932.507354]\t[DESTROY] ipv4     2 tcp      6 120 CLOSE src=10.0.1.4 dst=10.0.1.5 sport=46852 dport=80 packets=4 bytes=260 src=10.0.1.5 dst=10.0.1.4 sport=80 dport=46852 packets=3 bytes=200 [ASSURED] delta-time=2 id=197791212",
  );
  assert.deepEqual(d, {
    type: "DESTROY",
    id: "197791212",
    endMs: 1796226932507,
    proto: "tcp",
    src: "10.0.1.4",
    dst: "10.0.1.5",
    sport: 46852,
    dport: 80,
    packets: 7,
    bytes: 460,
    startMs: 1796226930507,
  });
  const n = parseCtEvent(
    "[1796226932.304610]\t    [NEW] ipv4     2 icmp     1 30 src=10.0.1.4 dst=10.0.1.5 type=8 code=0 id=16324 [UNREPLIED] src=10.0.1.5 dst=10.0.1.4 type=0 code=0 id=16324 id=1400747475",
  );
  assert.equal(n?.type, "NEW");
  assert.equal(n?.id, "1400747475");
  assert.equal(n?.dport, 8);
  for (const bad of [
    "",
    "conntrack v1.4.7: 4 flow events have been shown.",
    "[1.0] [DESTROY] ipv6 10 tcp 6 src=::1 dst=::1",
    "[1.0] [DESTROY] ipv4 2 tcp 6 src=10.0.0.999 dst=1.2.3.4",
  ])
    assert.equal(parseCtEvent(bad), null, bad);
});

test("ulogd2 JSON lines: the prefix and the tuple; anything else is ignored", () => {
  const line = JSON.stringify({
    "oob.prefix": "0123456789ab in sg-default-deny",
    "oob.time.sec": 1796226957,
    "oob.time.usec": 738230,
    "raw.pktlen": 60,
    "ip.protocol": 6,
    src_port: 41596,
    dest_port: 22,
    src_ip: "10.0.1.4",
    dest_ip: "10.0.1.5",
  });
  assert.deepEqual(parseUlogDrop(line), {
    timeMs: 1796226957738,
    prefix: "0123456789ab in sg-default-deny",
    proto: "tcp",
    src: "10.0.1.4",
    dst: "10.0.1.5",
    sport: 41596,
    dport: 22,
    bytes: 60,
  });
  assert.equal(parseUlogDrop("not json"), null);
  assert.equal(parseUlogDrop(JSON.stringify({ "oob.prefix": "x", src_ip: "1.2.3.4\n", dest_ip: "1.2.3.4", "ip.protocol": 6 })), null);
  assert.equal(parseUlogDrop(JSON.stringify({ "oob.prefix": "x", src_ip: "1.2.3.4", dest_ip: "1.2.3.4", "ip.protocol": 47 })), null);
});

test("the deciding rule of an accepted flow: the group and rule number, or the default", () => {
  const st = state();
  assert.equal(acceptedBy(st, "10.0.1.4", "10.0.1.5", "tcp", 80), `${SG}#2`);
  assert.equal(acceptedBy(st, "192.0.2.1", "10.0.1.5", "tcp", 443), `${SG}#1`);
  assert.equal(acceptedBy(st, "10.0.1.5", "192.0.2.1", "tcp", 443), "default");
});

test("sample rates: 0 < r ≤ 1, anything else is refused with a usable message", () => {
  assert.equal(checkSampleRate("r", "0.25"), 0.25);
  assert.equal(checkSampleRate("r", 1), 1);
  for (const bad of ["0", "1.5", "-0.1", "abc", "", 0, NaN, Infinity, null])
    assert.throws(() => checkSampleRate("--flow-logs-sample-rate", bad), /--flow-logs-sample-rate: a sample rate is a number with 0 < rate ≤ 1/);
});

test("the writer rotates by size and keeps N files", () => {
  const dir = mkdtempSync(join(tmpdir(), "flowlogs-"));
  dirs.push(dir);
  const w = new RotatingJsonl(dir, "h1", 200, 2);
  for (let i = 0; i < 20; i++) w.write({ i, pad: "x".repeat(40) });
  assert.ok(existsSync(`${w.path}.1`) && existsSync(`${w.path}.2`) && !existsSync(`${w.path}.3`));
  const last = readFileSync(w.path, "utf8").trim().split("\n");
  assert.equal(JSON.parse(last[last.length - 1]).i, 19);
  assert.ok(readFileSync(w.path).length <= 200);
});

test("compile: a NIC whose flows are logged sends its drops to the NFLOG group first, sampled and rate-limited; others are unchanged", () => {
  // The chain the NIC's ingress jumps to (shared with NICs in the same groups unless it logs).
  const inChain = (st: VpcFirewallState) => {
    const m = compile(st).model;
    const addr = st.nics.find((n) => n.nicId === NIC)!.address;
    const el = m.sets.get("inet nic_in")!.elements.find((e) => e.startsWith(`${addr} :`))!;
    return m.chains.get(el.split("jump ")[1])!;
  };
  const off = inChain(state());
  assert.ok(!off.join("\n").includes("log group"));
  const all = inChain(state({ nics: new Map([[NIC, 1]]) }));
  const log = all[all.length - 3];
  assert.equal(log, `limit rate 50/second burst 50 packets log group ${FLOW_LOG_GROUP} prefix "0123456789ab in sg-default-deny"`);
  assert.deepEqual(all.slice(-2), ["ip daddr @cnt_in_drop", "drop"], "then counted and dropped, whatever the limit did");
  const some = inChain(state({ nics: new Map([[NIC, 0.1]]) }));
  assert.match(some[some.length - 3], /^numgen random mod 1000 < 100 limit rate/);
  const other = inChain(state({ nics: new Map([["nic-ffffffffffff", 1]]) }));
  assert.deepEqual(other, off);
});

test("reading back: filters by NIC, action and time, newest last, bounded", () => {
  const rec = (nic: string, action: string, end: string) => JSON.stringify({ nic, action, end, vpc: "vpc-000000000001" });
  const lines = [
    rec("nic-a", "accept", "2026-01-01T00:00:00Z"),
    rec("nic-a", "reject", "2026-01-01T00:01:00Z"),
    "garbage",
    rec("nic-b", "reject", "2026-01-01T00:02:00Z"),
    rec("nic-a", "reject", "2026-01-01T00:03:00Z"),
  ];
  assert.equal(filterFlowLogs(lines, { nic: "nic-a", action: "reject" }).length, 2);
  assert.equal(filterFlowLogs(lines, { sinceMs: Date.parse("2026-01-01T00:01:30Z") }).length, 2);
  assert.equal(filterFlowLogs(lines, { action: "reject", limit: 1 })[0].end, "2026-01-01T00:03:00Z");
  const vm = (nic: string, v: string) => JSON.stringify({ nic, vm: v, action: "accept", end: "2026-01-01T00:00:00Z" });
  const byVm = [vm("nic-a", "vm-1"), vm("nic-b", "vm-2"), vm("nic-c", "vm-1")];
  assert.deepEqual(
    filterFlowLogs(byVm, { vms: new Set(["vm-1"]) }).map((r) => r.nic),
    ["nic-a", "nic-c"],
  );
  assert.deepEqual(
    filterFlowLogs(byVm, { vms: new Set(["vm-1"]), nics: new Set(["nic-b"]) }).map((r) => r.nic),
    ["nic-a", "nic-b", "nic-c"],
  );
});

test("the collector: a flow's NEW gives its start, DESTROY writes it once, of a logging NIC only, sampled by the rate", () => {
  const dir = mkdtempSync(join(tmpdir(), "flowlogs-"));
  dirs.push(dir);
  const st = state({ nics: new Map([[NIC, 0.25]]) });
  const log = { info() {}, warn() {} } as unknown as Logger;
  let dice = 0;
  const c = new FlowLogCollector({ dir, hostId: "h1" }, { stateOf: () => st, ownerOf: () => "h1/vm-00000000000a" }, log, () => dice);
  const flow = (id: number, dst: string, t: number) => {
    c.onCt(
      "ns",
      `[${t}.000000]\t    [NEW] ipv4     2 tcp      6 120 SYN_SENT src=10.0.1.4 dst=${dst} sport=${40000 + id} dport=80 [UNREPLIED] src=${dst} dst=10.0.1.4 sport=80 dport=${40000 + id} id=${id}`,
    );
    c.onCt(
      "ns",
      `[${t + 3}.500000]\t[DESTROY] ipv4     2 tcp      6 CLOSE src=10.0.1.4 dst=${dst} sport=${40000 + id} dport=80 packets=5 bytes=300 src=${dst} dst=10.0.1.4 sport=80 dport=${40000 + id} packets=4 bytes=200 delta-time=3 id=${id}`,
    );
  };
  flow(1, "10.0.1.5", 1796226900); // kept: 0 < 0.25
  dice = 0.5;
  flow(2, "10.0.1.5", 1796226910); // sampled out
  dice = 0;
  flow(3, "10.0.1.99", 1796226920); // no logging NIC at either end
  c.stop();
  const lines = readFileSync(c.out.path, "utf8").trim().split("\n");
  assert.equal(lines.length, 1);
  const r = JSON.parse(lines[0]);
  assert.deepEqual(
    { nic: r.nic, vm: r.vm, sport: r.sport, packets: r.packets, bytes: r.bytes, start: r.start, end: r.end, action: r.action, decided_by: r.decided_by },
    {
      nic: NIC,
      vm: "vm-00000000000a",
      sport: 40001,
      packets: 9,
      bytes: 500,
      start: new Date(1796226900_000).toISOString(),
      end: new Date(1796226903_500).toISOString(),
      action: "accept",
      decided_by: `${SG}#2`,
    },
  );
});

test("the collector: a blocked probe's logged drops (SYN and retransmissions) are one rejected record", () => {
  const dir = mkdtempSync(join(tmpdir(), "flowlogs-"));
  dirs.push(dir);
  const st = state({ nics: new Map([[NIC, 1]]) });
  const c = new FlowLogCollector({ dir, hostId: "h1", aggregateMs: 60_000 }, { stateOf: () => st, ownerOf: () => "vm-web1" }, {
    info() {},
    warn() {},
  } as unknown as Logger);
  const drop = (sec: number) =>
    JSON.stringify({
      "oob.prefix": "0123456789ab in sg-default-deny",
      "oob.time.sec": sec,
      "oob.time.usec": 0,
      "raw.pktlen": 60,
      "ip.protocol": 6,
      src_port: 41596,
      dest_port: 22,
      src_ip: "10.0.1.4",
      dest_ip: "10.0.1.5",
    });
  for (const sec of [1796226957, 1796226958, 1796226960]) c.onDrop("ns", drop(sec));
  c.onDrop("ns", drop(1796226961).replace("0123456789ab", "ffffffffffff")); // not a NIC of this namespace
  // An ACL's drop names no NIC: found by address (in: the destination); one toward an address no NIC has is not kept.
  c.onDrop("ns", drop(1796226962).replace("0123456789ab in sg-default-deny", "- in acl-00000000000c#100").replace("41596", "41597"));
  c.onDrop("ns", drop(1796226962).replace("0123456789ab in sg-default-deny", "- in acl-00000000000c#100").replace('"10.0.1.5"', '"10.0.1.77"'));
  c.stop();
  const lines = readFileSync(c.out.path, "utf8").trim().split("\n");
  assert.equal(lines.length, 2, lines.join("\n"));
  const acl = JSON.parse(lines[1]);
  assert.deepEqual([acl.nic, acl.vm, acl.decided_by, acl.sport, acl.packets], [NIC, "vm-web1", "acl-00000000000c#100", 41597, 1]);
  const r = JSON.parse(lines[0]);
  assert.equal(r.action, "reject");
  assert.equal(r.packets, 3);
  assert.equal(r.bytes, 180);
  assert.equal(r.decided_by, "sg-default-deny");
  assert.equal(r.start, new Date(1796226957_000).toISOString());
  assert.equal(r.end, new Date(1796226960_000).toISOString());
});

test("compile: a logging NIC's subnet ACL logs its deny entries and default deny (by subnet: the NIC is found by address), and its spoofed packets are logged", () => {
  const ACL = "acl-00000000000c";
  const withAcl = (flowLogs?: VpcFirewallState["flowLogs"]): VpcFirewallState => ({
    ...state(flowLogs),
    acls: new Map([
      [
        "subnet-000000000001",
        {
          id: ACL,
          vpcId: "vpc-000000000001",
          name: "a",
          description: "",
          labels: [],
          entries: [
            { ruleNumber: 100, dir: "ingress", action: "deny", proto: "tcp", portFrom: 23, portTo: 23, cidr: "0.0.0.0/0", description: "" },
            { ruleNumber: 200, dir: "ingress", action: "allow", proto: "all", portFrom: 0, portTo: 0, cidr: "0.0.0.0/0", description: "" },
          ],
          subnetIds: ["subnet-000000000001"],
          generation: 1,
          createdMs: 0,
          updatedMs: 0,
        },
      ],
    ]),
  });
  const off = compile(withAcl());
  assert.ok(!off.script.includes("log group"));
  const on = compile(withAcl({ nics: new Map([[NIC, 0.5]]) }));
  const inChain = on.model.chains.get("acl_000000000001_in")!;
  const L = `numgen random mod 1000 < 500 limit rate 50/second burst 50 packets log group ${FLOW_LOG_GROUP}`;
  assert.deepEqual(inChain, [
    `ip saddr 0.0.0.0/0 meta l4proto tcp th dport 23 ${L} prefix "- in ${ACL}#100"`,
    `ip saddr 0.0.0.0/0 meta l4proto tcp th dport 23 counter drop comment "rule 100"`,
    `ip saddr 0.0.0.0/0 return comment "rule 200"`,
    `${L} prefix "- in ${ACL}#default-deny"`,
    `counter drop comment "default deny"`,
  ]);
  assert.ok(on.script.includes(`ether type ip iifname "tap5" ${L} prefix "0123456789ab out antispoof"`), on.script);
  // The anti-spoofing log comes after the checks that accept a NIC's own frames, right before the drop.
  assert.match(on.script, /@nic_ok accept\n\s*ether type ip iifname "tap5" .* antispoof"\n\s*counter name spoofed drop/);
});

test("flow-log configs: the most specific covering a NIC decides its rate; a stored record is checked as a request", () => {
  const nics = [
    { ...state().nics[0] },
    { ...state().nics[0], nicId: "nic-0000000000b2", subnetId: "subnet-000000000002" },
    { ...state().nics[0], nicId: "nic-0000000000b3", subnetId: "subnet-000000000002" },
  ];
  const cfg = (resourceId: string, sampleRate: number) => ({
    id: "fl-000000000001",
    vpcId: "vpc-000000000001",
    resourceId,
    sampleRate,
    description: "",
    createdMs: 0,
  });
  assert.deepEqual(flowLogNics(nics, []), new Map());
  assert.deepEqual(
    flowLogNics(nics, [cfg("vpc-000000000001", 0.1), cfg("subnet-000000000002", 0.5), cfg("nic-0000000000b3", 1)]),
    new Map([
      [NIC, 0.1],
      ["nic-0000000000b2", 0.5],
      ["nic-0000000000b3", 1],
    ]),
  );
  assert.deepEqual(
    flowLogNics(nics, [cfg("nic-0000000000b2", 0.2)], { scope: new Set([NIC]), sampleRate: 1 }),
    new Map([
      ["nic-0000000000b2", 0.2],
      [NIC, 1],
    ]),
  );
  const good = { id: "fl-000000000001", vpc: "vpc-000000000001", resource: "subnet-000000000002", rate: "0.5", description: "", created: "1" };
  assert.deepEqual(parseFlowLogConfig(good, "fl-000000000001"), {
    ok: true,
    value: { id: "fl-000000000001", vpcId: "vpc-000000000001", resourceId: "subnet-000000000002", sampleRate: 0.5, description: "", createdMs: 1 },
  });
  for (const [bad, why] of [
    [{ ...good, rate: "2" }, /^rate: a sample rate/],
    [{ ...good, rate: "NaN" }, /^rate: a sample rate/],
    [{ ...good, resource: "sg-000000000001" }, /^resource: "sg-000000000001" is not a VPC, subnet or NIC id/],
    [{ ...good, resource: "vpc-000000000009" }, /^resource: .* is a VPC other than the record's/],
    [{ ...good, id: "fl-000000000002" }, /^id: .* is not the id of its key/],
    [{ ...good, extra: "x" }, /^extra: is not a field/],
  ] as const) {
    const p = parseFlowLogConfig(bad as Record<string, string>, "fl-000000000001");
    assert.ok(!p.ok && why.test(p.reason), JSON.stringify(p));
  }
  assert.equal(vmOfOwner("h1/vm-00000000000a"), "vm-00000000000a");
  assert.equal(vmOfOwner("vm-web1"), "vm-web1");
  assert.equal(vmOfOwner(undefined), "");
});

test("conntrack -L entries: id, TCP state, tuple and both directions' counts so far; anything else is ignored", () => {
  const e = parseCtEntry(
    "ipv4     2 tcp      6 431999 ESTABLISHED src=10.0.1.4 dst=10.0.1.5 sport=46852 dport=80 packets=40 bytes=2600000 src=10.0.1.5 dst=10.0.1.4 sport=80 dport=46852 packets=30 bytes=2000 [ASSURED] mark=0 use=1 id=197791212",
  );
  assert.deepEqual(e, {
    id: "197791212",
    proto: "tcp",
    state: "ESTABLISHED",
    src: "10.0.1.4",
    dst: "10.0.1.5",
    sport: 46852,
    dport: 80,
    packets: 70,
    bytes: 2602000,
  });
  const u = parseCtEntry(
    "ipv4     2 udp      17 29 src=10.0.1.4 dst=10.0.1.5 sport=5000 dport=53 packets=1 bytes=60 src=10.0.1.5 dst=10.0.1.4 sport=53 dport=5000 packets=1 bytes=80 mark=0 use=1 id=7",
  );
  assert.deepEqual([u?.state, u?.packets, u?.id], ["", 2, "7"]);
  for (const bad of [
    "",
    "conntrack v1.4.7 (conntrack-tools): 3 flow entries have been shown.",
    "ipv4     2 tcp      6 431999 ESTABLISHED src=10.0.1.4 dst=10.0.1.5 sport=1 dport=80 packets=1 bytes=1",
    "ipv6     10 tcp      6 431999 ESTABLISHED src=::1 dst=::1 sport=1 dport=80 id=3",
  ])
    assert.equal(parseCtEntry(bad), null, bad);
});

test("the collector: a flow open past the interval gets interim records counting what is new; its last record the rest; a closing or young flow none", () => {
  const dir = mkdtempSync(join(tmpdir(), "flowlogs-"));
  dirs.push(dir);
  const st = state({ nics: new Map([[NIC, 1]]) });
  const c = new FlowLogCollector({ dir, hostId: "h1", intervalMs: 2000 }, { stateOf: () => st, ownerOf: () => "vm-web1" }, {
    info() {},
    warn() {},
  } as unknown as Logger);
  const t0 = 1796226900;
  const tuple = (id: number) => `src=10.0.1.4 dst=10.0.1.5 sport=${40000 + id} dport=80`;
  const entry = (id: number, state: string, pk: number, by: number) => ({
    id: String(id),
    proto: "tcp",
    state,
    src: "10.0.1.4",
    dst: "10.0.1.5",
    sport: 40000 + id,
    dport: 80,
    packets: pk,
    bytes: by,
  });
  for (const id of [1, 2, 3]) c.onCt("ns", `[${t0}.000000]\t    [NEW] ipv4     2 tcp      6 120 SYN_SENT ${tuple(id)} [UNREPLIED] id=${id}`);
  c.onListed("ns", entry(1, "ESTABLISHED", 10, 1000), t0 * 1000 + 1000); // younger than the interval
  c.onListed("ns", entry(1, "ESTABLISHED", 20, 2000), t0 * 1000 + 2000);
  c.onListed("ns", entry(1, "ESTABLISHED", 20, 2000), t0 * 1000 + 4000); // nothing new
  c.onListed("ns", entry(1, "ESTABLISHED", 50, 5000), t0 * 1000 + 6000);
  c.onListed("ns", entry(2, "TIME_WAIT", 9, 900), t0 * 1000 + 6000); // closing: its last record covers it
  c.onListed("ns", entry(9, "ESTABLISHED", 9, 900), t0 * 1000 + 6000); // never seen NEW (or already ended)
  const end = (id: number, sec: number, pk: number, by: number) =>
    c.onCt("ns", `[${sec}.000000]\t[DESTROY] ipv4     2 tcp      6 CLOSE ${tuple(id)} packets=${pk} bytes=${by} delta-time=${sec - t0} id=${id}`);
  end(1, t0 + 7, 60, 6000);
  end(2, t0 + 7, 9, 900);
  c.stop();
  const recs = readFileSync(c.out.path, "utf8")
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l) as FlowRecord);
  const iso = (s: number) => new Date(s).toISOString();
  assert.deepEqual(
    recs.map((r) => [r.sport, r.packets, r.bytes, r.start, r.end, r.flow_start, r.interim ?? false]),
    [
      [40001, 20, 2000, iso(t0 * 1000), iso(t0 * 1000 + 2000), iso(t0 * 1000), true],
      [40001, 30, 3000, iso(t0 * 1000 + 2000), iso(t0 * 1000 + 6000), iso(t0 * 1000), true],
      [40001, 10, 1000, iso(t0 * 1000 + 6000), iso(t0 * 1000 + 7000), iso(t0 * 1000), false],
      [40002, 9, 900, iso(t0 * 1000), iso(t0 * 1000 + 7000), iso(t0 * 1000), false],
    ],
  );
});

test("compile: the VPC-wide drops (ct invalid, toward a NIC not bound yet) are logged, rate-limited, when anything of the VPC logs", () => {
  const fwd = (st: VpcFirewallState) => {
    const m = /chain forward \{[^}]*\}/.exec(compile(st).script);
    return m ? m[0] : "";
  };
  assert.ok(!fwd(state()).includes("log group"), fwd(state()));
  const L = `limit rate 50/second burst 50 packets log group ${FLOW_LOG_GROUP}`;
  for (const on of [state({ nics: new Map([[NIC, 1]]) }), state({ nics: new Map(), subnets: new Map([["subnet-000000000001", 1]]) })]) {
    const f = fwd(on);
    assert.match(f, new RegExp(`ct state invalid ${L} prefix "- any ct-invalid"\\n\\s*ct state invalid counter drop`), f);
    assert.match(f, new RegExp(`oifname "br-\\*" ${L} prefix "- in unbound-nic"\\n\\s*oifname "br-\\*" counter drop`), f);
  }
  assert.match(fwd(state({ nics: new Map([[NIC, 0.2]]) })), /numgen random mod 1000 < 200 limit rate 50\/second .* "- any ct-invalid"/);
});

test("the collector: a ct-invalid drop is kept for the logging NIC at either end; an unbound-nic drop for a logging subnet, naming no NIC", () => {
  const dir = mkdtempSync(join(tmpdir(), "flowlogs-"));
  dirs.push(dir);
  const st = state({ nics: new Map([[NIC, 1]]), subnets: new Map([["subnet-000000000001", 1]]) });
  const quietSt = state({ nics: new Map([[NIC, 1]]) });
  const c = new FlowLogCollector({ dir, hostId: "h1", aggregateMs: 60_000 }, { stateOf: (ns) => (ns === "quiet" ? quietSt : st), ownerOf: () => "vm-web1" }, {
    info() {},
    warn() {},
  } as unknown as Logger);
  const drop = (prefix: string, src: string, dst: string, sport: number) =>
    JSON.stringify({
      "oob.prefix": prefix,
      "oob.time.sec": 1796226957,
      "oob.time.usec": 0,
      "raw.pktlen": 40,
      "ip.protocol": 6,
      src_port: sport,
      dest_port: 80,
      src_ip: src,
      dest_ip: dst,
    });
  c.onDrop("ns", drop("- any ct-invalid", "10.0.1.5", "10.0.9.9", 1)); // the NIC is the source
  c.onDrop("ns", drop("- any ct-invalid", "10.0.9.8", "10.0.9.9", 2)); // no local NIC at either end
  c.onDrop("ns", drop("- in unbound-nic", "10.0.1.5", "10.0.1.77", 3)); // subnet 1 logs
  c.onDrop("ns", drop("- in unbound-nic", "10.0.1.5", "10.0.2.77", 4)); // not a local subnet
  c.onDrop("quiet", drop("- in unbound-nic", "10.0.1.5", "10.0.1.78", 5)); // the subnet does not log
  c.stop();
  const recs = readFileSync(c.out.path, "utf8")
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l) as FlowRecord);
  assert.deepEqual(
    recs.map((r) => [r.sport, r.nic, r.vm, r.decided_by, r.action]),
    [
      [1, NIC, "vm-web1", "ct-invalid", "reject"],
      [3, "", "", "unbound-nic", "reject"],
    ],
  );
});

test("flow-log configs: a NIC's applies to the binding it was made for only; subnets are covered by their own or their VPC's", () => {
  const nic = { ...state().nics[0], boundMs: 1000 };
  const cfg = { id: "fl-000000000001", vpcId: "vpc-000000000001", resourceId: NIC, sampleRate: 1, description: "", createdMs: 0, nicBoundMs: 1000 };
  assert.deepEqual(flowLogRates([nic], [], [cfg]).nics, new Map([[NIC, 1]]));
  assert.deepEqual(flowLogRates([{ ...nic, boundMs: 2000 }], [], [cfg]).nics, new Map(), "bound again: not inherited");
  assert.deepEqual(flowLogRates([{ ...nic, boundMs: 0 }], [], [cfg]).nics, new Map(), "unbound");
  const { nicBoundMs: _, ...old } = cfg;
  assert.deepEqual(flowLogRates([{ ...nic, boundMs: 2000 }], [], [old]).nics, new Map([[NIC, 1]]), "a record from before bound times");
  const subs = [
    { subnetId: "subnet-000000000001", vpcId: "vpc-000000000001" },
    { subnetId: "subnet-000000000002", vpcId: "vpc-000000000001" },
  ];
  const sub = { ...cfg, resourceId: "subnet-000000000001", sampleRate: 0.5, nicBoundMs: undefined };
  assert.deepEqual(flowLogRates([], subs, [sub]).subnets, new Map([["subnet-000000000001", 0.5]]));
  assert.deepEqual(
    flowLogRates([], subs, [sub, { ...sub, resourceId: "vpc-000000000001", sampleRate: 0.1 }]).subnets,
    new Map([
      ["subnet-000000000001", 0.5],
      ["subnet-000000000002", 0.1],
    ]),
  );
  const good = { id: "fl-000000000001", vpc: "vpc-000000000001", resource: NIC, rate: "1", description: "", created: "1", bound: "1000" };
  const p = parseFlowLogConfig(good, "fl-000000000001");
  assert.ok(p.ok && p.value.nicBoundMs === 1000);
  const q = parseFlowLogConfig({ ...good, resource: "subnet-000000000001" }, "fl-000000000001");
  assert.ok(!q.ok && /^bound: only a NIC's config/.test(q.reason), JSON.stringify(q));
});
