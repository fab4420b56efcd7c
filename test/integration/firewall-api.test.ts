// FirewallService control plane against a real redis-server: security
// groups, NIC bindings and their member index, network ACLs, rule parsing,
// and the change events every hypervisor follows. Called in memory through
// createRouterTransport (no kernel); two FirewallApi instances stand for two
// hypervisors sharing one Redis.
import assert from "node:assert/strict";
import { create } from "@bufbuild/protobuf";
import { Code, createClient, createRouterTransport, type Client } from "@connectrpc/connect";
import type { Redis } from "ioredis";
import { afterAll, beforeAll, describe, test } from "vitest";
import { mapDomainErrors } from "../../services/common/errors.js";
import {
  AclAction,
  Direction,
  FirewallService,
  NetworkAclEntrySchema,
  Protocol,
  SecurityGroupRuleSchema,
  type NetworkAclEntry,
  type SecurityGroupRule,
} from "../../gen/microvpc/v1/firewall_pb.js";
import { SubnetService, SubnetType } from "../../gen/microvpc/v1/subnet_pb.js";
import { VpcService } from "../../gen/microvpc/v1/vpc_pb.js";
import { FirewallApi } from "../../services/firewall/service.js";
import { fwKeys, type FirewallKeys } from "../../services/firewall/keys.js";
import { CLOSED_GROUP, FirewallStore } from "../../services/firewall/store.js";
import { FlowLogConfigStore } from "../../services/firewall/flowlog-config.js";
import { FlowLogConfigApi } from "../../services/firewall/flowlog-service.js";
import { Ipam } from "../../services/ipam/service.js";
import { IpamStore } from "../../services/ipam/store.js";
import { HostStore } from "../../services/netagent/store.js";
import { naKeys } from "../../services/netagent/schema.js";
import type { NicSpec } from "../../services/netagent/plan.js";
import { rejectsWith } from "../lib/clients.js";
import { ON_CLUSTER } from "../lib/on-cluster.js";
import { connectReady, keysLike as keysOfAll, startRedis, startRedisCluster } from "../lib/redis.js";
import { vpcEvents } from "../../services/common/events.js";

let stop: (() => Promise<void>) | undefined;
let r: Redis;
let L: FirewallKeys;
let store: FirewallStore;
let flowLogs: FlowLogConfigStore;
let vpcs: Client<typeof VpcService>;
let subnets: Client<typeof SubnetService>;
let fw: Client<typeof FirewallService>;
let fw2: Client<typeof FirewallService>;

beforeAll(async () => {
  const redis = ON_CLUSTER ? await startRedisCluster() : await startRedis({ persistence: false });
  stop = () => redis.stop();
  r = await connectReady({ url: redis.url });
  L = fwKeys(r);
  const ipamStore = new IpamStore(r);
  const ipam = new Ipam(ipamStore);
  store = new FirewallStore(r);
  flowLogs = new FlowLogConfigStore(r);
  const transport = (hostId: string) =>
    createRouterTransport(
      (router) => {
        router.service(VpcService, ipam.vpcService);
        router.service(SubnetService, ipam.subnetService);
        router.service(FirewallService, { ...new FirewallApi(store, ipamStore, { hostId }).impl, ...new FlowLogConfigApi(flowLogs, store, ipamStore).impl });
      },
      { router: { interceptors: [mapDomainErrors] } },
    );
  const t1 = transport("hv1");
  vpcs = createClient(VpcService, t1);
  subnets = createClient(SubnetService, t1);
  fw = createClient(FirewallService, t1);
  fw2 = createClient(FirewallService, transport("hv2"));
}, 60_000);

afterAll(async () => {
  r?.disconnect();
  await stop?.();
}, 30_000);

function rule(dir: "in" | "out", proto: Protocol, from: number, peer: string, to = 0): SecurityGroupRule {
  return create(SecurityGroupRuleSchema, {
    direction: dir === "in" ? Direction.INGRESS : Direction.EGRESS,
    protocol: proto,
    portFrom: from,
    portTo: to,
    peer: /^[0-9]/.test(peer) ? { case: "cidr", value: peer } : { case: "securityGroupId", value: peer },
  });
}
const tcpIn = (port: number, peer: string) => rule("in", Protocol.TCP, port, peer);

function entry(n: number, dir: "in" | "out", action: AclAction, proto: Protocol, from: number, cidr: string, to = 0): NetworkAclEntry {
  return create(NetworkAclEntrySchema, {
    ruleNumber: n,
    direction: dir === "in" ? Direction.INGRESS : Direction.EGRESS,
    action,
    protocol: proto,
    portFrom: from,
    portTo: to,
    cidr,
  });
}

async function newVpc(name: string, cidr: string, subnetCidrs: Record<string, string>) {
  const vpc = (await vpcs.createVpc({ name, cidr })).vpc!;
  const sn: Record<string, string> = {};
  for (const [n, c] of Object.entries(subnetCidrs)) {
    sn[n] = (await subnets.createSubnet({ vpc: name, name: n, cidr: c, type: SubnetType.PRIVATE })).subnet!.id;
  }
  return { id: vpc.id, subnets: sn };
}

let nicSeq = 0;
function nicId(): string {
  return `nic-${(0xa00000000000 + ++nicSeq).toString(16)}`;
}

/** The events of a VPC's stream (on a single Redis the global stream has the same; a cluster has only these). */
async function events(vpcId: string, sinceId = "-"): Promise<Record<string, string>[]> {
  const entries = await r.xrange(vpcEvents(vpcId), sinceId, "+");
  return entries.map(([, f]) => {
    const o: Record<string, string> = {};
    for (let i = 0; i < f.length; i += 2) o[f[i]] = f[i + 1];
    return o;
  });
}

async function lastEventId(vpcId: string): Promise<string> {
  const e = await r.xrevrange(vpcEvents(vpcId), "+", "-", "COUNT", 1);
  return e.length ? `(${e[0][0]}` : "-";
}

/** Every key matching `pattern`, on every primary of a cluster. */
function keysLike(pattern: string): Promise<string[]> {
  return keysOfAll(r, pattern);
}

/** Every firewall key with its content and the length of every event stream, for "nothing changed" checks (both layouts). */
async function fwSnapshot(): Promise<string> {
  const out: string[] = [];
  for (const k of await keysLike("mvpc:*fw:*")) out.push(`${k}=${(await r.dumpBuffer(k))?.toString("base64")}`);
  for (const k of await keysLike("mvpc:*events")) out.push(`${k}=${await r.xlen(k)}`);
  return out.join("\n");
}

describe("security groups", () => {
  test("create, get, list, default egress, peers by name and by self", async () => {
    const v = await newVpc("sgs", "10.40.0.0/16", { web: "10.40.1.0/24" });
    const since = await lastEventId(v.id);
    const web = (
      await fw.createSecurityGroup({
        vpc: "sgs",
        name: "web",
        description: "web tier",
        rules: [tcpIn(80, "0.0.0.0/0"), tcpIn(443, "0.0.0.0/0"), tcpIn(22, "10.40.0.0/16")],
      })
    ).securityGroup!;
    assert.match(web.id, /^sg-[0-9a-f]{12}$/);
    assert.equal(web.vpcId, v.id);
    assert.equal(web.generation, 1n);
    assert.equal(web.memberCount, 0);
    assert.deepEqual(
      web.rules.map((x) => [x.direction, x.protocol, x.portFrom, x.portTo, x.peer.value]),
      [
        [Direction.INGRESS, Protocol.TCP, 80, 80, "0.0.0.0/0"],
        [Direction.INGRESS, Protocol.TCP, 443, 443, "0.0.0.0/0"],
        [Direction.INGRESS, Protocol.TCP, 22, 22, "10.40.0.0/16"],
        [Direction.EGRESS, Protocol.ALL, 0, 0, "0.0.0.0/0"],
      ],
      "no egress rule given: all:all:0.0.0.0/0 added",
    );

    const db = (
      await fw.createSecurityGroup({
        vpc: v.id,
        name: "db",
        rules: [tcpIn(5432, "web"), rule("in", Protocol.ALL, 0, "db")],
        omitDefaultEgress: true,
      })
    ).securityGroup!;
    assert.deepEqual(
      db.rules.map((x) => [x.peer.case, x.peer.value]),
      [
        ["securityGroupId", web.id],
        ["securityGroupId", db.id],
      ],
      "names stored as ids, own name included; no default egress",
    );

    assert.equal((await fw.getSecurityGroup({ ref: web.id })).securityGroup!.name, "web");
    assert.equal((await fw.getSecurityGroup({ ref: "db", vpc: "sgs" })).securityGroup!.id, db.id);
    await rejectsWith(fw.getSecurityGroup({ ref: "db" }), Code.InvalidArgument, /^vpc: is required when the security group is given by name/);
    await rejectsWith(fw.getSecurityGroup({ ref: "sg-000000000000" }), Code.NotFound, /security group "sg-000000000000" not found/);
    await rejectsWith(fw.createSecurityGroup({ vpc: "sgs", name: "web" }), Code.AlreadyExists, /already has a security group named "web"/);
    await rejectsWith(fw.createSecurityGroup({ vpc: "nope", name: "x" }), Code.NotFound, /vpc "nope" not found/);
    await rejectsWith(
      fw.createSecurityGroup({ vpc: "sgs", name: "x", rules: [tcpIn(1, "cache")] }),
      Code.NotFound,
      /security group "cache" not found; rules\[0\]\.security_group_id names it as peer/,
    );

    const a = await fw.createSecurityGroup({ vpc: "sgs", name: "cache", clientToken: "orch-1" });
    const b = await fw.createSecurityGroup({ vpc: "sgs", name: "cache", clientToken: "orch-1" });
    assert.equal(a.securityGroup!.id, b.securityGroup!.id, "a repeated client token returns the same group");

    const list = await fw.listSecurityGroups({ vpc: "sgs" });
    assert.deepEqual(
      list.securityGroups.map((g) => g.name),
      ["cache", "db", "web"],
    );
    const p1 = await fw.listSecurityGroups({ vpc: "sgs", pageSize: 2 });
    assert.deepEqual(
      p1.securityGroups.map((g) => g.name),
      ["cache", "db"],
    );
    const p2 = await fw.listSecurityGroups({ vpc: "sgs", pageSize: 2, pageToken: p1.nextPageToken });
    assert.deepEqual(
      p2.securityGroups.map((g) => g.name),
      ["web"],
    );
    assert.equal(p2.nextPageToken, "");
    assert.ok((await fw.listSecurityGroups({})).securityGroups.length >= 3);

    const ev = (await events(v.id, since)).filter((e) => e.kind === "fw.sg.created");
    assert.deepEqual(
      ev.map((e) => [e.vpc, e.sg, e.name]),
      [
        [v.id, web.id, "web"],
        [v.id, db.id, "db"],
        [v.id, a.securityGroup!.id, "cache"],
      ],
    );
    assert.ok(ev.every((e) => Number(e.gen) > 0));
  });

  test("update: set, remove, add in that order; generation; ABORTED; no-op keeps the generation", async () => {
    const v = await newVpc("upd", "10.41.0.0/16", {});
    const g0 = (await fw.createSecurityGroup({ vpc: "upd", name: "app", rules: [tcpIn(80, "0.0.0.0/0")] })).securityGroup!;
    const since = await lastEventId(v.id);
    const g1 = (await fw.updateSecurityGroup({ ref: g0.id, addRules: [tcpIn(443, "0.0.0.0/0"), tcpIn(80, "0.0.0.0/0")], expectedGeneration: 1n }))
      .securityGroup!;
    assert.equal(g1.generation, 2n);
    assert.deepEqual(
      g1.rules.filter((x) => x.direction === Direction.INGRESS).map((x) => x.portFrom),
      [80, 443],
      "a rule already present is not added twice",
    );
    const g2 = (
      await fw.updateSecurityGroup({ ref: "app", vpc: "upd", removeRules: [tcpIn(80, "0.0.0.0/0"), tcpIn(9999, "0.0.0.0/0")], description: "tls only" })
    ).securityGroup!;
    assert.equal(g2.generation, 3n);
    assert.equal(g2.description, "tls only");
    assert.deepEqual(
      g2.rules.filter((x) => x.direction === Direction.INGRESS).map((x) => x.portFrom),
      [443],
    );
    const g3 = (
      await fw.updateSecurityGroup({
        ref: g0.id,
        setRules: { rules: [rule("in", Protocol.TCP, 8000, "10.0.0.0/8", 8080)] },
        removeRules: [rule("in", Protocol.TCP, 8000, "10.0.0.0/8", 8080)],
        addRules: [tcpIn(22, "10.41.0.0/16")],
      })
    ).securityGroup!;
    assert.deepEqual(
      g3.rules.map((x) => x.portFrom),
      [22],
      "set, then remove, then add",
    );
    const g4 = (await fw.updateSecurityGroup({ ref: g0.id, setRules: { rules: [] } })).securityGroup!;
    assert.equal(g4.rules.length, 0, "an empty set_rules removes every rule");
    assert.equal(g4.generation, 5n);

    await rejectsWith(
      fw.updateSecurityGroup({ ref: g0.id, addRules: [tcpIn(1, "0.0.0.0/0")], expectedGeneration: 2n }),
      Code.Aborted,
      /is at generation 5, not 2; it changed since you read it/,
    );
    const same = (await fw.updateSecurityGroup({ ref: g0.id, setRules: { rules: [] }, expectedGeneration: 5n })).securityGroup!;
    assert.equal(same.generation, 5n, "a change that changes nothing keeps the generation");
    const logged = (await fw.updateSecurityGroup({ ref: g0.id, dropLogging: { enabled: true, ratePerSecond: 10 } })).securityGroup!;
    assert.deepEqual([logged.dropLogging?.enabled, logged.dropLogging?.ratePerSecond, logged.dropLogging?.burst], [true, 10, 10]);

    const ev = (await events(v.id, since)).filter((e) => e.kind === "fw.sg.updated");
    assert.deepEqual(
      ev.map((e) => e.sg_gen),
      ["2", "3", "4", "5", "6"],
    );
    assert.ok(ev.every((e) => e.sg === g0.id));
  });

  test("concurrent updates without expected_generation all land", async () => {
    await newVpc("race", "10.42.0.0/16", {});
    const g = (await fw.createSecurityGroup({ vpc: "race", name: "busy", omitDefaultEgress: true })).securityGroup!;
    await Promise.all(Array.from({ length: 8 }, (_, i) => (i % 2 ? fw : fw2).updateSecurityGroup({ ref: g.id, addRules: [tcpIn(1000 + i, "0.0.0.0/0")] })));
    const after = (await fw.getSecurityGroup({ ref: g.id })).securityGroup!;
    assert.deepEqual(after.rules.map((x) => x.portFrom).sort(), [1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007]);
    assert.equal(after.generation, 9n);
  });

  test("bad rules: INVALID_ARGUMENT naming the rule, and nothing stored", async () => {
    await newVpc("bad", "10.43.0.0/16", {});
    const g = (await fw.createSecurityGroup({ vpc: "bad", name: "ok" })).securityGroup!;
    const before = await fwSnapshot();
    const cases: [SecurityGroupRule[], RegExp][] = [
      [[tcpIn(80, "0.0.0.0/0"), tcpIn(70000, "0.0.0.0/0")], /^rules\[1\]\.port_from: 70000 is not a port; use 1–65535$/],
      [
        [tcpIn(80, "0.0.0.0/0"), tcpIn(80, "0.0.0.0/0"), rule("in", Protocol.TCP, 90, "0.0.0.0/0", 80)],
        /^rules\[2\]\.port_to: 80 is below port_from 90; a range is FROM-TO with FROM ≤ TO$/,
      ],
      [[tcpIn(80, "10.0.0.300/8")], /^rules\[0\]\.cidr: "10\.0\.0\.300\/8" is not an IPv4 CIDR/],
      [[tcpIn(80, "0.0.0.0/0; flush ruleset")], /^rules\[0\]\.cidr: "0\.0\.0\.0\/0; flush ruleset" is not an IPv4 CIDR/],
      [[tcpIn(80, "web;reboot")], /^rules\[0\]\.security_group_id: "web;reboot" is neither a group id/],
      [[rule("in", 42 as Protocol, 80, "0.0.0.0/0")], /^rules\[0\]\.protocol: 42 is not a protocol/],
      [[rule("in", Protocol.UNSPECIFIED, 80, "0.0.0.0/0")], /^rules\[0\]\.protocol: is required/],
    ];
    for (const [rules, re] of cases) {
      await rejectsWith(fw.createSecurityGroup({ vpc: "bad", name: "new", rules }), Code.InvalidArgument, re);
      await rejectsWith(fw.updateSecurityGroup({ ref: g.id, addRules: rules }), Code.InvalidArgument, new RegExp(re.source.replace("^rules", "^add_rules")));
    }
    await rejectsWith(fw.createSecurityGroup({ vpc: "bad", name: "Bad Name" }), Code.InvalidArgument, /^name: "Bad Name" is not a valid name/);
    await rejectsWith(
      fw.createSecurityGroup({ vpc: "bad", name: "big", rules: Array.from({ length: 10_001 }, (_, i) => tcpIn((i % 65535) + 1, "0.0.0.0/0")) }),
      Code.InvalidArgument,
      /^rules: has 10001 rules; a group holds at most 10000$/,
    );
    assert.equal(await fwSnapshot(), before, "no key and no event changed");
    assert.equal((await fw.getSecurityGroup({ ref: g.id })).securityGroup!.generation, 1n);
  });

  test("10 000 rules fit in one group", async () => {
    await newVpc("large", "10.44.0.0/16", {});
    const rules = Array.from({ length: 10_000 }, (_, i) => tcpIn((i % 65535) + 1, `10.${Math.floor(i / 256) % 256}.${i % 256}.0/24`));
    const g = (await fw.createSecurityGroup({ vpc: "large", name: "big", rules, omitDefaultEgress: true })).securityGroup!;
    assert.equal(g.rules.length, 10_000);
    await rejectsWith(
      fw.updateSecurityGroup({ ref: g.id, addRules: [tcpIn(1, "0.0.0.0/0")] }),
      Code.InvalidArgument,
      /^rules: has 10001 rules; a group holds at most 10000$/,
    );
  });
});

describe("NIC bindings", () => {
  let v: { id: string; subnets: Record<string, string> };
  let other: { id: string; subnets: Record<string, string> };
  let web: string;
  let db: string;
  beforeAll(async () => {
    v = await newVpc("bind", "10.50.0.0/16", { a: "10.50.1.0/24", b: "10.50.2.0/24" });
    other = await newVpc("bind-other", "10.50.0.0/16", { a: "10.50.1.0/24" });
    web = (await fw.createSecurityGroup({ vpc: "bind", name: "web", rules: [tcpIn(80, "0.0.0.0/0")] })).securityGroup!.id;
    db = (await fw.createSecurityGroup({ vpc: "bind", name: "db", rules: [tcpIn(5432, "web")] })).securityGroup!.id;
  });

  const bindReq = (nic: string, address: string, groups: string[], extra: Record<string, unknown> = {}) => ({
    nicId: nic,
    vpc: "bind",
    subnet: "a",
    address,
    mac: "02:00:0a:32:01:" + address.split(".")[3].padStart(2, "0").slice(-2),
    hostInterface: `t${nic.slice(-12)}`,
    securityGroups: groups,
    ...extra,
  });

  test("bind, rebind, member index, unbind", async () => {
    const n1 = nicId();
    const n2 = nicId();
    const since = await lastEventId(v.id);
    const b1 = await fw.bindNic(bindReq(n1, "10.50.1.10", ["web"]));
    assert.equal(b1.changed, true);
    assert.deepEqual(b1.binding!.securityGroupIds, [web]);
    assert.equal(b1.binding!.hostId, "hv1");
    assert.equal(b1.binding!.subnetId, v.subnets.a);
    assert.equal((await fw.bindNic(bindReq(n1, "10.50.1.10", ["web"]))).changed, false, "the same binding again changes nothing");
    await fw2.bindNic(bindReq(n2, "10.50.1.11", ["web", "db", "web"]));

    assert.deepEqual(await r.hgetall(L.sgMembers(v.id, web)), { [n1]: "10.50.1.10", [n2]: "10.50.1.11" });
    assert.deepEqual(await r.hgetall(L.sgMembers(v.id, db)), { [n2]: "10.50.1.11" });
    assert.equal((await fw.getSecurityGroup({ ref: web })).securityGroup!.memberCount, 2);
    assert.deepEqual(await store.vpcsWithBindingsOnHost("hv2"), [v.id]);

    // Rebinding replaces the set: n2 leaves web.
    const re = await fw2.bindNic(bindReq(n2, "10.50.1.11", ["db"]));
    assert.equal(re.changed, true);
    assert.deepEqual(await r.hgetall(L.sgMembers(v.id, web)), { [n1]: "10.50.1.10" });

    // The sync loop's view from hv2: db's peer group web has n1 (on hv1),
    // once hv1's netagent index lists n1 at its address (AttachNic writes
    // it); a member its host does not vouch for counts for nothing.
    const subnets = [{ subnetId: v.subnets.a, cidr: "10.50.1.0/24", bridge: "br-x" }];
    assert.deepEqual((await store.loadVpcState("hv2", v.id, subnets)).members.get(web), [], "no NIC index entry on hv1: not a member");
    await r.hset(naKeys(r).nicaddr("hv1"), `${v.id}/10.50.1.10`, n1);
    const st = await store.loadVpcState("hv2", v.id, subnets);
    assert.deepEqual(
      st.nics.map((n) => [n.nicId, n.groupIds, n.hostId]),
      [[n2, [db], "hv2"]],
    );
    assert.deepEqual([...st.groups.keys()].sort(), [db, web].sort());
    assert.deepEqual(st.members.get(web), ["10.50.1.10"]);
    assert.equal(st.members.has(db), false, "members only of groups named as peer");

    assert.deepEqual((await fw.unbindNic({ nicId: n1 })).unbound, true);
    assert.deepEqual((await fw.unbindNic({ nicId: n1 })).unbound, false, "unbinding twice succeeds");
    assert.deepEqual(await r.hgetall(L.sgMembers(v.id, web)), {});
    assert.deepEqual((await store.loadVpcState("hv2", v.id, [])).members.get(web), []);
    assert.deepEqual(await store.vpcsWithBindingsOnHost("hv1"), []);

    const ev = (await events(v.id, since)).filter((e) => e.kind.startsWith("fw.binding."));
    assert.deepEqual(
      ev.map((e) => [e.kind, e.nic, e.host, e.groups, e.prev_groups]),
      [
        ["fw.binding.changed", n1, "hv1", web, undefined],
        ["fw.binding.changed", n2, "hv2", `${web},${db}`, undefined],
        ["fw.binding.changed", n2, "hv2", db, `${web},${db}`],
        ["fw.binding.removed", n1, "hv1", web, undefined],
      ],
    );
    assert.ok(ev.every((e) => e.vpc === v.id));
    await fw2.unbindNic({ nicId: n2 });
  });

  test("a member entry counts only where the NIC's own host vouches for it, and for the groups its sig names", async () => {
    const [real, out, ghost, peer] = [nicId(), nicId(), nicId(), nicId()];
    await fw.bindNic(bindReq(real, "10.50.1.60", ["web"]));
    await fw.bindNic(bindReq(out, "10.50.1.61", []));
    await fw2.bindNic(bindReq(peer, "10.50.1.62", ["db"]));
    for (const [n, a] of [
      [real, "10.50.1.60"],
      [out, "10.50.1.61"],
    ])
      await r.hset(naKeys(r).nicaddr("hv1"), `${v.id}/${a}`, n);
    // What any host's user may write: the member list, and the shared record's fields beside the sig hv1's copy vouches for.
    await r.hset(L.sgMembers(v.id, web), out, "10.50.1.61", ghost, "10.50.1.63");
    await r.hset(L.nic(out), "groups", web);
    const subnets = [{ subnetId: v.subnets.a, cidr: "10.50.1.0/24", bridge: "br-x" }];
    const st = await store.loadVpcState("hv2", v.id, subnets);
    assert.deepEqual(st.members.get(web), ["10.50.1.60"], "only the member its host vouches for");
    // A record rewritten beside its sig (another group named in the sig itself): its host's copy differs, so neither its host nor a peer takes it.
    const forgedSig = JSON.stringify({ ...JSON.parse((await r.hget(L.nic(out), "sig"))!), groupIds: [web] });
    const realSig = (await r.hget(L.nic(out), "sig"))!;
    await r.hset(L.nic(out), "sig", forgedSig);
    assert.deepEqual((await store.loadVpcState("hv2", v.id, subnets)).members.get(web), ["10.50.1.60"], "a sig its host holds no copy of vouches for nothing");
    // The sync passes its host's NICs (netagent's desired state).
    const local = (nic: string, address: string) => ({
      nicId: nic,
      vpcId: v.id,
      subnetId: v.subnets.a,
      address,
      mac: "02:00:0a:32:01:3c",
      hostIf: `t${nic.slice(-12)}`,
    });
    const mine = [local(real, "10.50.1.60"), local(out, "10.50.1.61")];
    const own = await store.loadVpcState("hv1", v.id, subnets, mine);
    assert.deepEqual(own.nics.find((x) => x.nicId === out)?.groupIds, [CLOSED_GROUP], "its own host holds the NIC closed");
    await r.hset(L.nic(out), "sig", realSig);
    // A record whose host holds no copy: before the copies existed (single Redis) it is taken as it is; a cluster has no such bindings, and refuses it.
    await r.hdel(L.hostSigs("hv1"), real);
    const noCopy = (await store.loadVpcState("hv1", v.id, subnets, mine)).nics.find((x) => x.nicId === real)?.groupIds;
    assert.deepEqual(noCopy, ON_CLUSTER ? [CLOSED_GROUP] : [web]);
    await r.hset(L.hostSigs("hv1"), real, (await r.hget(L.nic(real), "sig"))!);
    for (const n of [real, out, peer]) await (n === peer ? fw2 : fw).unbindNic({ nicId: n });
    await r.hdel(L.sgMembers(v.id, web), ghost);
    await r.hdel(naKeys(r).nicaddr("hv1"), `${v.id}/10.50.1.60`, `${v.id}/10.50.1.61`);
  });

  test("delete refused while a NIC is bound or another group names it", async () => {
    const n = nicId();
    await fw.bindNic(bindReq(n, "10.50.1.20", ["db"]));
    await rejectsWith(fw.deleteSecurityGroup({ ref: db }), Code.FailedPrecondition, new RegExp(`still bound to 1 NIC\\(s\\): ${n}`));
    await rejectsWith(
      fw.deleteSecurityGroup({ ref: "web", vpc: "bind" }),
      Code.FailedPrecondition,
      new RegExp(`named as peer by the rules of 1 other group\\(s\\): ${db}`),
    );
    await fw.unbindNic({ nicId: n });
    assert.equal((await fw.deleteSecurityGroup({ ref: db })).deleted, true);
    assert.equal((await fw.deleteSecurityGroup({ ref: db })).deleted, false, "deleting a missing group succeeds");
    assert.equal(await r.exists(L.sgRefBy(v.id, web)), 0, "web's peer index forgot db");
    db = (await fw.createSecurityGroup({ vpc: "bind", name: "db", rules: [tcpIn(5432, "web")] })).securityGroup!.id;
  });

  test("17 groups, groups of another VPC, unknown groups, bad NIC fields: refused and nothing stored", async () => {
    const ids: string[] = [];
    for (let i = 0; i < 17; i++) ids.push((await fw.createSecurityGroup({ vpc: "bind", name: `g${i}` })).securityGroup!.id);
    const foreign = (await fw.createSecurityGroup({ vpc: "bind-other", name: "web" })).securityGroup!.id;
    const n = nicId();
    const before = await fwSnapshot();
    await rejectsWith(fw.bindNic(bindReq(n, "10.50.1.30", ids)), Code.InvalidArgument, /^security_groups: has 17 groups; a NIC can be in at most 16$/);
    await rejectsWith(
      fw.bindNic(bindReq(n, "10.50.1.30", [web, foreign])),
      Code.InvalidArgument,
      /^security_groups\[1\]: security group web \(sg-[0-9a-f]+\) belongs to VPC vpc-[0-9a-f]+, not bind/,
    );
    await rejectsWith(fw.bindNic(bindReq(n, "10.50.1.30", ["nope"])), Code.NotFound, /security group "nope" not found/);
    await rejectsWith(fw.bindNic(bindReq(n, "10.50.2.30", [web])), Code.InvalidArgument, /^address: 10\.50\.2\.30 is outside subnet a \(10\.50\.1\.0\/24\)$/);
    await rejectsWith(fw.bindNic(bindReq(n, "10.50.1.1", [web])), Code.InvalidArgument, /^address: 10\.50\.1\.1 is the gateway of subnet a/);
    await rejectsWith(
      fw.bindNic(bindReq(n, "10.50.1.30", [web], { mac: "03:00:00:00:00:01" })),
      Code.InvalidArgument,
      /^mac: "03:00:00:00:00:01" is a multicast MAC/,
    );
    await rejectsWith(
      fw.bindNic(bindReq(n, "10.50.1.30", [web], { hostInterface: "tap0; nft flush ruleset" })),
      Code.InvalidArgument,
      /^host_interface: .* is not an interface name/,
    );
    await rejectsWith(
      fw.bindNic(bindReq(n, "10.50.1.30", [web], { subnet: other.subnets.a })),
      Code.InvalidArgument,
      /^subnet: subnet a \(subnet-[0-9a-f]+\) belongs to VPC/,
    );
    await rejectsWith(fw.bindNic(bindReq("nic-1", "10.50.1.30", [web])), Code.InvalidArgument, /^nic_id: "nic-1" is not a nic id/);
    assert.equal(await fwSnapshot(), before, "no key and no event changed");
    const ok = await fw.bindNic(bindReq(n, "10.50.1.30", ids.slice(0, 16)));
    assert.equal(ok.binding!.securityGroupIds.length, 16);
    await fw.unbindNic({ nicId: n });
  });

  test("fields netagent knows are filled from, and checked against, its desired state", async () => {
    const n = nicId();
    const spec = {
      nicId: n,
      owner: "vm-1",
      vpcId: v.id,
      subnetId: v.subnets.b,
      kind: "tap",
      tap: { multiQueue: false, queues: 1 },
      hostIf: `t${n.slice(-12)}`,
      mac: "02:00:0a:32:02:28",
      address: "10.50.2.40",
      prefix: 24,
      gateway: "10.50.2.1",
      mtu: 1500,
      hostname: "vm-1",
      guestIf: "eth0",
      dns: [],
      bandwidth: { ingressMbps: 0, egressMbps: 0 },
      createdMs: Date.now(),
      clientToken: "",
    } satisfies NicSpec;
    await new HostStore(r, "hv1").putNic(spec);
    await rejectsWith(
      fw.bindNic({ nicId: n, securityGroups: [web], mac: "02:00:0a:32:02:29" }),
      Code.InvalidArgument,
      /^mac: "02:00:0a:32:02:29" does not match netagent's NIC/,
    );
    const b = (await fw.bindNic({ nicId: n, securityGroups: ["web"] })).binding!;
    assert.deepEqual([b.vpcId, b.subnetId, b.address, b.mac, b.hostInterface], [v.id, v.subnets.b, "10.50.2.40", "02:00:0a:32:02:28", spec.hostIf]);
    // The sync loop passes the local NICs; their groups come from the snapshot.
    const st = await store.loadVpcState(
      "hv1",
      v.id,
      [],
      [
        { ...spec, groupIds: [] },
        { ...spec, nicId: "nic-000000000001", address: "10.50.2.41" },
      ],
    );
    assert.deepEqual(
      st.nics.map((x) => [x.nicId, x.groupIds]),
      [
        ["nic-000000000001", []],
        [n, [web]],
      ],
    );
    assert.deepEqual([...(await store.bindingsOf([n, "nic-000000000001"])).keys()], [n]);
    await fw.unbindNic({ nicId: n });
  });

  test("ListNicBindings filters and pages, ordered by NIC id", async () => {
    const nics = [nicId(), nicId(), nicId()];
    await fw.bindNic(bindReq(nics[0], "10.50.1.50", ["web"]));
    await fw2.bindNic(bindReq(nics[1], "10.50.1.51", ["db"]));
    await fw2.bindNic(bindReq(nics[2], "10.50.1.52", ["web", "db"]));
    const all = await fw.listNicBindings({ vpc: "bind" });
    assert.deepEqual(
      all.bindings.map((b) => b.nicId),
      nics,
    );
    assert.deepEqual(
      (await fw.listNicBindings({ securityGroup: "web", vpc: "bind" })).bindings.map((b) => b.nicId),
      [nics[0], nics[2]],
    );
    assert.deepEqual(
      (await fw.listNicBindings({ hostId: "hv2" })).bindings.map((b) => b.nicId),
      [nics[1], nics[2]],
    );
    assert.deepEqual(
      (await fw.listNicBindings({ hostId: "hv2", securityGroup: web })).bindings.map((b) => b.nicId),
      [nics[2]],
    );
    assert.deepEqual(
      (await fw.listNicBindings({ nicId: nics[1] })).bindings.map((b) => b.hostId),
      ["hv2"],
    );
    const p1 = await fw.listNicBindings({ vpc: "bind", pageSize: 2 });
    assert.deepEqual(
      p1.bindings.map((b) => b.nicId),
      nics.slice(0, 2),
    );
    const p2 = await fw.listNicBindings({ vpc: "bind", pageSize: 2, pageToken: p1.nextPageToken });
    assert.deepEqual(
      p2.bindings.map((b) => b.nicId),
      nics.slice(2),
    );
    assert.equal(p2.nextPageToken, "");
    for (const n of nics) await fw.unbindNic({ nicId: n });
    assert.equal((await fw.listNicBindings({ vpc: "bind" })).bindings.length, 0);
  });
});

describe("network ACLs", () => {
  test("CRUD, associate replaces the previous ACL, delete refused while associated", async () => {
    const v = await newVpc("acl", "10.60.0.0/16", { a: "10.60.1.0/24", b: "10.60.2.0/24" });
    const other = await newVpc("acl-other", "10.61.0.0/16", { x: "10.61.1.0/24" });
    const since = await lastEventId(v.id);
    const a1 = (
      await fw.createNetworkAcl({
        vpc: "acl",
        name: "strict",
        entries: [
          entry(200, "in", AclAction.ALLOW, Protocol.TCP, 443, "0.0.0.0/0"),
          entry(100, "in", AclAction.DENY, Protocol.TCP, 22, "0.0.0.0/0"),
          entry(100, "out", AclAction.ALLOW, Protocol.ALL, 0, "0.0.0.0/0"),
        ],
        subnets: ["a"],
      })
    ).networkAcl!;
    assert.match(a1.id, /^acl-[0-9a-f]{12}$/);
    assert.deepEqual(
      a1.entries.map((e) => [e.direction, e.ruleNumber]),
      [
        [Direction.INGRESS, 100],
        [Direction.INGRESS, 200],
        [Direction.EGRESS, 100],
      ],
    );
    assert.deepEqual(a1.subnetIds, [v.subnets.a]);
    assert.equal(await r.hget(L.subnetAcl(v.id), v.subnets.a), a1.id);

    const a2 = (await fw.createNetworkAcl({ vpc: v.id, name: "open", entries: [entry(100, "in", AclAction.ALLOW, Protocol.ALL, 0, "0.0.0.0/0")] })).networkAcl!;
    const as = await fw.associateNetworkAcl({ networkAcl: a2.id, subnet: "a", vpc: "acl" });
    assert.equal(as.previousNetworkAclId, a1.id);
    assert.deepEqual(as.networkAcl!.subnetIds, [v.subnets.a]);
    const a1After = (await fw.getNetworkAcl({ ref: "strict", vpc: "acl" })).networkAcl!;
    assert.deepEqual(a1After.subnetIds, [], "the subnet left its previous ACL in the same step");
    assert.equal(a1After.generation, 2n);
    assert.equal((await fw.associateNetworkAcl({ networkAcl: a2.id, subnet: v.subnets.a })).previousNetworkAclId, "", "same ACL again: nothing changes");
    await fw.associateNetworkAcl({ networkAcl: "strict", vpc: "acl", subnet: "b" });
    await rejectsWith(fw.associateNetworkAcl({ networkAcl: a2.id, subnet: other.subnets.x }), Code.InvalidArgument, /^subnet: subnet x .* belongs to VPC/);

    await rejectsWith(fw.deleteNetworkAcl({ ref: a2.id }), Code.FailedPrecondition, new RegExp(`still associated with 1 subnet\\(s\\): ${v.subnets.a}`));

    const u = (
      await fw.updateNetworkAcl({
        ref: a1.id,
        upsertEntries: [entry(200, "in", AclAction.DENY, Protocol.TCP, 443, "0.0.0.0/0"), entry(300, "in", AclAction.ALLOW, Protocol.ICMP, 0, "10.0.0.0/8")],
        removeEntries: [{ direction: Direction.INGRESS, ruleNumber: 100 }],
        expectedGeneration: 3n,
      })
    ).networkAcl!;
    assert.deepEqual(
      u.entries.map((e) => [e.ruleNumber, e.action]),
      [
        [200, AclAction.DENY],
        [300, AclAction.ALLOW],
        [100, AclAction.ALLOW],
      ],
    );
    assert.equal(u.generation, 4n);
    await rejectsWith(fw.updateNetworkAcl({ ref: a1.id, setEntries: { entries: [] }, expectedGeneration: 3n }), Code.Aborted, /is at generation 4, not 3/);
    await rejectsWith(
      fw.updateNetworkAcl({ ref: a1.id, upsertEntries: [entry(100, "in", AclAction.ALLOW, Protocol.TCP, 90, "0.0.0.0/0", 80)] }),
      Code.InvalidArgument,
      /^upsert_entries\[0\]\.port_to: 80 is below port_from 90/,
    );
    const cleared = (await fw.updateNetworkAcl({ ref: a1.id, setEntries: { entries: [] } })).networkAcl!;
    assert.equal(cleared.entries.length, 0);

    // The sync loop sees each local subnet's ACL, keyed by subnet id.
    const st = await store.loadVpcState("hv1", v.id, [
      { subnetId: v.subnets.a, cidr: "10.60.1.0/24", bridge: "br-a" },
      { subnetId: v.subnets.b, cidr: "10.60.2.0/24", bridge: "br-b" },
    ]);
    assert.equal(st.acls.get(v.subnets.a)?.id, a2.id);
    assert.equal(st.acls.get(v.subnets.b)?.id, a1.id);

    assert.deepEqual(
      (await fw.listNetworkAcls({ vpc: "acl" })).networkAcls.map((x) => x.name),
      ["open", "strict"],
    );
    assert.equal((await fw.disassociateNetworkAcl({ subnet: "a", vpc: "acl" })).previousNetworkAclId, a2.id);
    assert.equal((await fw.disassociateNetworkAcl({ subnet: v.subnets.a })).previousNetworkAclId, "", "no ACL: succeeds");
    assert.equal((await fw.deleteNetworkAcl({ ref: "open", vpc: "acl" })).deleted, true);
    assert.equal((await fw.deleteNetworkAcl({ ref: a2.id })).deleted, false);
    await rejectsWith(fw.getNetworkAcl({ ref: a2.id }), Code.NotFound);

    const kinds = (await events(v.id, since)).filter((e) => e.kind.startsWith("fw.acl.")).map((e) => e.kind);
    assert.deepEqual(kinds, [
      "fw.acl.created",
      "fw.acl.created",
      "fw.acl.associated",
      "fw.acl.associated",
      "fw.acl.updated",
      "fw.acl.updated",
      "fw.acl.disassociated",
      "fw.acl.deleted",
    ]);
  });

  test("bad entries: INVALID_ARGUMENT and nothing stored", async () => {
    await newVpc("acl-bad", "10.62.0.0/16", { a: "10.62.1.0/24" });
    const before = await fwSnapshot();
    await rejectsWith(
      fw.createNetworkAcl({
        vpc: "acl-bad",
        name: "x",
        entries: [entry(100, "in", AclAction.ALLOW, Protocol.TCP, 80, "0.0.0.0/0"), entry(100, "in", AclAction.DENY, Protocol.TCP, 81, "0.0.0.0/0")],
      }),
      Code.InvalidArgument,
      /^entries\[1\]\.rule_number: 100 is already used by entries\[0\] for ingress/,
    );
    await rejectsWith(
      fw.createNetworkAcl({ vpc: "acl-bad", name: "x", entries: [entry(100, "in", AclAction.ALLOW, Protocol.TCP, 70000, "0.0.0.0/0")] }),
      Code.InvalidArgument,
      /^entries\[0\]\.port_from: 70000 is not a port/,
    );
    await rejectsWith(
      fw.createNetworkAcl({ vpc: "acl-bad", name: "x", entries: [entry(100, "in", AclAction.ALLOW, Protocol.TCP, 80, "garbage")] }),
      Code.InvalidArgument,
      /^entries\[0\]\.cidr: "garbage" is not an IPv4 CIDR/,
    );
    await rejectsWith(fw.createNetworkAcl({ vpc: "acl-bad", name: "x", subnets: ["nope"] }), Code.NotFound, /subnet "nope" not found/);
    assert.equal(await fwSnapshot(), before);
  });
});

describe("with IPAM and other clients", () => {
  test("DeleteSubnet is refused while an ACL is associated, DeleteVpc while groups or ACLs are left: in the VPC's own step", async () => {
    const v = await newVpc("fw-del", "10.63.0.0/16", { a: "10.63.1.0/24" });
    const g = (await fw.createSecurityGroup({ vpc: v.id, name: "g" })).securityGroup!;
    const a = (await fw.createNetworkAcl({ vpc: v.id, name: "n", subnets: ["a"] })).networkAcl!;
    await rejectsWith(subnets.deleteSubnet({ ref: v.subnets.a }), Code.FailedPrecondition, new RegExp(`network ACL ${a.id} is associated with it`));
    await fw.disassociateNetworkAcl({ subnet: v.subnets.a });
    assert.equal((await subnets.deleteSubnet({ ref: v.subnets.a })).deleted, true);
    await rejectsWith(vpcs.deleteVpc({ ref: v.id }), Code.FailedPrecondition, /still has 1 security group\(s\), 1 network ACL\(s\)/);
    await fw.deleteSecurityGroup({ ref: g.id });
    await rejectsWith(vpcs.deleteVpc({ ref: v.id }), Code.FailedPrecondition, /still has 1 network ACL\(s\)/);
    await fw.deleteNetworkAcl({ ref: a.id });
    assert.equal((await vpcs.deleteVpc({ ref: v.id })).deleted, true);
    assert.deepEqual(
      (await keysLike(`mvpc:*${v.id}*`)).filter((k) => k.includes("fw")),
      [],
      "the VPC's firewall keys went with it",
    );
    assert.equal(await r.zscore(L.allSgs, `g/${g.id}`), null, "the listing of every group forgot it");
    if (L.sgVpc) assert.equal(await r.hget(L.sgVpc, g.id), null, "the catalog forgot the group");
    if (L.aclVpc) assert.equal(await r.hget(L.aclVpc, a.id), null, "and the ACL");
  });

  test("creates of one name from two hypervisors at once: one group; one client token at once: one group", async () => {
    const v = await newVpc("fw-race", "10.64.0.0/16", { a: "10.64.1.0/24" });
    const same = await Promise.allSettled(Array.from({ length: 6 }, (_, i) => (i % 2 ? fw : fw2).createSecurityGroup({ vpc: v.id, name: "one" })));
    assert.equal(same.filter((x) => x.status === "fulfilled").length, 1, "one create of the name wins");
    for (const x of same) if (x.status === "rejected") assert.match(String(x.reason), /already has a security group named "one"/);
    const tok = await Promise.all(Array.from({ length: 6 }, (_, i) => (i % 2 ? fw : fw2).createNetworkAcl({ vpc: v.id, name: "tok", clientToken: "orch-7" })));
    assert.equal(new Set(tok.map((t) => t.networkAcl!.id)).size, 1, "every retry of the token answers the same ACL");
    assert.deepEqual(
      (await fw.listSecurityGroups({ vpc: v.id })).securityGroups.map((x) => x.name),
      ["one"],
    );
    assert.deepEqual(
      (await fw.listNetworkAcls({ vpc: v.id })).networkAcls.map((x) => x.name),
      ["tok"],
    );
    // The listing of every VPC has each once.
    const all = (await fw.listSecurityGroups({ pageSize: 1000 })).securityGroups.filter((x) => x.vpcId === v.id);
    assert.deepEqual(
      all.map((x) => x.name),
      ["one"],
    );
  });

  test("an ACL is refused a subnet of another VPC, naming that VPC, and stores nothing", async () => {
    const v = await newVpc("fw-mine", "10.65.0.0/16", { a: "10.65.1.0/24" });
    const o = await newVpc("fw-theirs", "10.66.0.0/16", { x: "10.66.1.0/24" });
    const before = await fwSnapshot();
    await rejectsWith(
      fw.createNetworkAcl({ vpc: v.id, name: "n", subnets: [o.subnets.x] }),
      Code.InvalidArgument,
      new RegExp(`^subnets\\[0\\]: subnet x \\(${o.subnets.x}\\) belongs to VPC ${o.id}, not fw-mine`),
    );
    // The store's own check, in the script (on a cluster it sees the VPC's subnets only, and the record by id names the other VPC).
    await assert.rejects(
      store.createAcl({ vpcId: v.id, name: "n", description: "", labels: [], entries: [], subnetIds: [o.subnets.x] }, ""),
      new RegExp(`subnet ${o.subnets.x} belongs to VPC ${o.id}, not ${v.id}`),
    );
    assert.equal(await fwSnapshot(), before, "no key and no event changed");
  });
});

describe("flow-log configurations", () => {
  test("per VPC, subnet and bound NIC; one per resource; deleted with their resource; each change on the VPC's stream", async () => {
    const v = await newVpc("flows", "10.67.0.0/16", { a: "10.67.1.0/24", b: "10.67.2.0/24" });
    const n = nicId();
    await fw.bindNic({
      nicId: n,
      vpc: v.id,
      subnet: "a",
      address: "10.67.1.10",
      mac: "02:00:0a:43:01:0a",
      hostInterface: `t${n.slice(-12)}`,
      securityGroups: [],
    });
    const since = await lastEventId(v.id);
    const cv = (await fw.createFlowLogConfig({ resourceId: v.id, sampleRate: 0.5 })).config!;
    const cs = (await fw.createFlowLogConfig({ resourceId: v.subnets.b })).config!;
    const cn = (await fw2.createFlowLogConfig({ resourceId: n, description: "one NIC" })).config!;
    assert.deepEqual([cv.vpcId, cs.vpcId, cn.vpcId], [v.id, v.id, v.id]);
    await rejectsWith(fw.createFlowLogConfig({ resourceId: v.subnets.b }), Code.AlreadyExists, new RegExp(`already has flow-log config ${cs.id}`));
    await rejectsWith(fw.createFlowLogConfig({ resourceId: "nic-00000000abcd" }), Code.NotFound, /must be bound/);
    assert.equal((await fw2.getFlowLogConfig({ id: cn.id })).config!.description, "one NIC");
    assert.deepEqual((await fw.listFlowLogConfigs({ vpc: v.id })).configs.map((c) => c.id).sort(), [cv.id, cs.id, cn.id].sort());
    assert.ok((await fw.listFlowLogConfigs({})).configs.some((c) => c.id === cn.id));

    // Their resources go: the NIC's binding, then the subnet; the next read deletes their configurations.
    await fw.unbindNic({ nicId: n });
    await subnets.deleteSubnet({ ref: v.subnets.b });
    assert.deepEqual(
      (await fw.listFlowLogConfigs({ vpc: v.id })).configs.map((c) => c.id),
      [cv.id],
    );
    await rejectsWith(fw.getFlowLogConfig({ id: cn.id }), Code.NotFound);
    assert.equal((await fw.deleteFlowLogConfig({ id: cv.id })).deleted, true);
    assert.equal((await fw.deleteFlowLogConfig({ id: cv.id })).deleted, false, "deleting twice succeeds");
    assert.equal((await fw.listFlowLogConfigs({})).configs.filter((c) => c.vpcId === v.id).length, 0);
    assert.deepEqual(await keysLike(`mvpc:*${v.id}*flowlog*`), [], "nothing of them is left in the VPC");

    const ev = (await events(v.id, since)).filter((e) => e.kind.startsWith("fw.flowlog.")).map((e) => [e.kind, e.flowlog, e.reason]);
    assert.deepEqual(ev.slice(0, 3), [
      ["fw.flowlog.created", cv.id, undefined],
      ["fw.flowlog.created", cs.id, undefined],
      ["fw.flowlog.created", cn.id, undefined],
    ]);
    assert.deepEqual(
      ev.slice(3, 5).sort(),
      [
        ["fw.flowlog.deleted", cs.id, "resource-gone"],
        ["fw.flowlog.deleted", cn.id, "resource-gone"],
      ].sort(),
    );
    assert.deepEqual(ev.slice(5), [["fw.flowlog.deleted", cv.id, undefined]]);
  });
});

describe("what a change stopped half-way, or another host, leaves behind", () => {
  test("a group is deleted past member entries no binding backs; a listing fills its pages past entries whose record is gone", async () => {
    const v = await newVpc("fw-left", "10.68.0.0/16", { a: "10.68.1.0/24" });
    const ids: string[] = [];
    for (const name of ["b", "c", "d"]) ids.push((await fw.createSecurityGroup({ vpc: v.id, name })).securityGroup!.id);
    // A member entry of a NIC that has no binding (a bind stopped before its record, or written by another host).
    await r.hset(L.sgMembers(v.id, ids[2]), "nic-00000000dead", "10.68.1.99");
    // Listing entries whose record is gone, before and between the live ones.
    await r.zadd(L.vpcSgs(v.id), 0, "a/sg-00000000dea1", 0, "bb/sg-00000000dea2");
    const names: string[] = [];
    let pageToken = "";
    do {
      const page = await fw.listSecurityGroups({ vpc: v.id, pageSize: 1, pageToken });
      names.push(...page.securityGroups.map((g) => g.name));
      pageToken = page.nextPageToken;
    } while (pageToken);
    assert.deepEqual(names, ["b", "c", "d"], "every live group, one a page, the dead entries skipped");
    assert.equal((await fw.deleteSecurityGroup({ ref: ids[2] })).deleted, true, "the unbacked member entry does not hold the group");
    await r.zrem(L.vpcSgs(v.id), "a/sg-00000000dea1", "bb/sg-00000000dea2");
  });

  test("a binding whose group, record or sig is gone holds its NIC closed; a counter another host broke refuses changes before writing", async () => {
    const v = await newVpc("fw-gone", "10.70.0.0/16", { a: "10.70.1.0/24" });
    const g = (await fw.createSecurityGroup({ vpc: v.id, name: "g", rules: [tcpIn(22, "0.0.0.0/0")] })).securityGroup!;
    const [n1, n2, n3] = [nicId(), nicId(), nicId()];
    const nics = [n1, n2, n3].map((n, i) => ({
      nicId: n,
      vpcId: v.id,
      subnetId: v.subnets.a,
      address: `10.70.1.${10 + i}`,
      mac: `02:00:0a:46:01:${10 + i}`,
      hostIf: `t${n.slice(-12)}`,
    }));
    for (const n of nics)
      await fw.bindNic({ nicId: n.nicId, vpc: v.id, subnet: "a", address: n.address, mac: n.mac, hostInterface: n.hostIf, securityGroups: [g.id] });
    const subnetsOf = [{ subnetId: v.subnets.a, cidr: "10.70.1.0/24", bridge: "br-a" }];
    const groupsOf = async () => new Map((await store.loadVpcState("hv1", v.id, subnetsOf, nics)).nics.map((x) => [x.nicId, x.groupIds]));
    assert.deepEqual([...(await groupsOf()).values()], [[g.id], [g.id], [g.id]]);
    // Another host empties one record's sig and deletes another record (this host keeps its copies).
    const sig1 = (await r.hget(L.nic(n1), "sig"))!;
    const rec2 = await r.hgetall(L.nic(n2));
    const rec3 = await r.hgetall(L.nic(n3));
    await r.hset(L.nic(n1), "sig", "");
    await r.del(L.nic(n2));
    await r.set(L.nic(n3), "not a hash");
    const held = await groupsOf();
    assert.deepEqual([held.get(n1), held.get(n2), held.get(n3)], [[CLOSED_GROUP], [CLOSED_GROUP], [CLOSED_GROUP]], "each held closed, not unbound");
    await r.hset(L.nic(n1), "sig", sig1);
    await r.hset(L.nic(n2), rec2);
    await r.del(L.nic(n3));
    await r.hset(L.nic(n3), rec3);
    // The group goes from under its bindings (a delete that raced a bind): the bindings still name it, and it allows nothing.
    const rec = await r.hgetall(L.sg(v.id, g.id));
    await r.del(L.sg(v.id, g.id));
    const st = await store.loadVpcState("hv1", v.id, subnetsOf, nics);
    assert.deepEqual(st.groups.get(g.id)?.rules, [], "a group that is not there has no rules");
    await r.hset(L.sg(v.id, g.id), rec);
    // The VPC's change counter, which every host's user may write, holds no integer: a change is refused before it writes.
    const gen = (await r.get(L.gen(v.id)))!;
    await r.set(L.gen(v.id), `0${gen}`);
    await rejectsWith(fw.createSecurityGroup({ vpc: v.id, name: "h" }), Code.Internal, /holds no integer/);
    await r.set(L.gen(v.id), "x");
    const before = await fwSnapshot();
    await rejectsWith(fw.createSecurityGroup({ vpc: v.id, name: "h" }), Code.Internal, /change counter .* holds no integer/);
    await rejectsWith(
      fw.bindNic({
        nicId: nicId(),
        vpc: v.id,
        subnet: "a",
        address: "10.70.1.20",
        mac: "02:00:0a:46:01:20",
        hostInterface: "tb00000000020",
        securityGroups: [],
      }),
      Code.Internal,
      /holds no integer/,
    );
    assert.equal(await fwSnapshot(), before, "nothing written");
    await r.set(L.gen(v.id), gen);
    for (const n of nics) await fw.unbindNic({ nicId: n.nicId });
  });

  test("a group's update reads its peers as stored; a subnet's ACL entry that is no id counts as none", async () => {
    const v = await newVpc("fw-stored", "10.71.0.0/16", { a: "10.71.1.0/24" });
    const p = (await fw.createSecurityGroup({ vpc: v.id, name: "p" })).securityGroup!;
    const g = (await fw.createSecurityGroup({ vpc: v.id, name: "g", rules: [tcpIn(80, p.id)] })).securityGroup!;
    // The stored peers differ from the rules' (damaged, or written by an earlier release).
    await r.hset(L.sg(v.id, g.id), "peers", "");
    const u = (await fw.updateSecurityGroup({ ref: g.id, setRules: { rules: [tcpIn(443, "0.0.0.0/0")] } })).securityGroup!;
    assert.equal(u.generation, 2n, "the update lands");
    await r.hset(L.subnetAcl(v.id), v.subnets.a, "acl-ABCDEF012345");
    const a0 = (await fw.createNetworkAcl({ vpc: v.id, name: "n0", subnets: ["a"] })).networkAcl!;
    assert.deepEqual(a0.subnetIds, [v.subnets.a], "a create takes the subnet: the entry that was no id counted as none");
    await fw.disassociateNetworkAcl({ subnet: v.subnets.a });
    await r.hset(L.subnetAcl(v.id), v.subnets.a, "acl-ABCDEF012345");
    const a = (await fw.createNetworkAcl({ vpc: v.id, name: "n" })).networkAcl!;
    assert.equal(
      (await fw.associateNetworkAcl({ networkAcl: a.id, subnet: v.subnets.a })).previousNetworkAclId,
      "",
      "the entry that was no id counted as none",
    );
    assert.equal(await r.hget(L.subnetAcl(v.id), v.subnets.a), a.id);
    await r.hset(L.subnetAcl(v.id), v.subnets.a, "");
    const st = await store.loadVpcState("hv1", v.id, [{ subnetId: v.subnets.a, cidr: "10.71.1.0/24", bridge: "br-a" }]);
    assert.equal(st.acls.get(v.subnets.a)?.name, "refused-record", "an empty entry names an ACL that is not there: it denies everything");
    await r.hdel(L.subnetAcl(v.id), v.subnets.a);
  });

  test("a subnet whose association names an ACL that is not there denies everything", async () => {
    const v = await newVpc("fw-noacl", "10.69.0.0/16", { a: "10.69.1.0/24" });
    await r.hset(L.subnetAcl(v.id), v.subnets.a, "acl-00000000dead");
    const st = await store.loadVpcState("hv1", v.id, [{ subnetId: v.subnets.a, cidr: "10.69.1.0/24", bridge: "br-a" }]);
    const acl = st.acls.get(v.subnets.a);
    assert.ok(acl, "the subnet has an ACL");
    assert.deepEqual([acl.name, acl.entries], ["refused-record", []], "one that allows nothing");
    await r.hdel(L.subnetAcl(v.id), v.subnets.a);
  });
});

describe("ParseRules", () => {
  test("rule texts and a vpcctl document", async () => {
    await newVpc("parse", "10.70.0.0/16", {});
    const web = (await fw.createSecurityGroup({ vpc: "parse", name: "web-sg" })).securityGroup!.id;
    const res = await fw.parseRules({
      vpc: "parse",
      ingressRules: ["tcp:80:0.0.0.0/0", "tcp:8000-8080:10.0.0.0/16", "icmp:8:10.0.0.0/8", "tcp:5432:web-sg", "tcp:22:10.70.0.5", "tcp:80:0.0.0.0/0"],
      egressRules: ["all:all:0.0.0.0/0", "udp:53:10.0.0.0/8"],
      vpcctlPolicyJson: JSON.stringify({
        subnet: "10.70.1.0/24",
        ingress: [
          { port: 443, protocol: "tcp", action: "allow" },
          { port: 22, protocol: "tcp", action: "deny" },
        ],
        egress: [{ port: 25, protocol: "tcp", action: "deny" }],
      }),
    });
    const show = (x: SecurityGroupRule) =>
      `${x.direction === Direction.INGRESS ? "in" : "out"} ${Protocol[x.protocol]} ${x.portFrom}-${x.portTo} ${x.icmpType ?? ""} ${x.peer.value}`;
    assert.deepEqual(res.rules.map(show), [
      "in TCP 80-80  0.0.0.0/0",
      "in TCP 8000-8080  10.0.0.0/16",
      "in ICMP 0-0 8 10.0.0.0/8",
      `in TCP 5432-5432  ${web}`,
      "in TCP 22-22  10.70.0.5/32",
      "out ALL 0-0  0.0.0.0/0",
      "out UDP 53-53  10.0.0.0/8",
      "in TCP 443-443  0.0.0.0/0",
    ]);
    assert.equal(res.subnetCidr, "10.70.1.0/24");
    assert.deepEqual(
      res.aclEntries.map((e) => `${e.direction === Direction.INGRESS ? "in" : "out"} ${e.ruleNumber} ${AclAction[e.action]}`),
      ["in 100 ALLOW", "in 110 DENY", "in 32766 ALLOW", "out 100 DENY", "out 32766 ALLOW"],
    );
    assert.deepEqual(res.warnings, [
      'ingress_rules[4]: "tcp:22:10.70.0.5": the bare address 10.70.0.5 is read as 10.70.0.5/32',
      "vpcctl_policy_json.ingress[1]: deny tcp 22 0.0.0.0/0 is kept as network ACL entry 110 only; a security group can only allow",
      "vpcctl_policy_json.egress[0]: deny tcp 25 0.0.0.0/0 is kept as network ACL entry 100 only; a security group can only allow",
      "ingress_rules[5]: repeats ingress_rules[0]; kept once",
    ]);
    const deny = await fw.parseRules({
      vpcctlPolicyJson: JSON.stringify({ subnet: "10.70.1.0/24", ingress: [{ port: 443, protocol: "tcp", action: "allow" }] }),
      vpcctlDefaultAction: AclAction.DENY,
    });
    assert.deepEqual(
      deny.aclEntries.map((e) => e.ruleNumber),
      [100],
    );
  });

  test("bad texts: INVALID_ARGUMENT naming the text", async () => {
    const before = await fwSnapshot();
    const cases: [Parameters<typeof fw.parseRules>[0], RegExp][] = [
      [{ ingressRules: ["tcp:80:0.0.0.0/0", "tcp:70000:0.0.0.0/0"] }, /^ingress_rules\[1\]: "tcp:70000:0\.0\.0\.0\/0": port 70000 is out of range/],
      [{ egressRules: ["tcp:90-80:0.0.0.0/0"] }, /^egress_rules\[0\]: "tcp:90-80:0\.0\.0\.0\/0": range 90-80 is backwards/],
      [{ ingressRules: ["tcp:80:0.0.0.0/0; flush ruleset"] }, /^ingress_rules\[0\]: .* contains ";", " "/],
      [{ ingressRules: ["sctp:80:0.0.0.0/0"] }, /protocol "sctp" is not known/],
      [{ ingressRules: ["tcp:80:10.0.0.300/8"] }, /is not an IPv4 CIDR/],
      [{ ingressRules: ["tcp:5432:web-sg"] }, /^ingress_rules\[0\]: names the security group "web-sg"; set vpc/],
      [{ ingressRules: ["tcp:5432:nope"], vpc: "parse" }, /^ingress_rules\[0\]: VPC parse has no security group named "nope"/],
      [{ vpcctlPolicyJson: "{not json" }, /^vpcctl_policy_json: is not valid JSON/],
      [
        { vpcctlPolicyJson: JSON.stringify({ subnet: "10.0.0.0/8", ingress: [{ port: 1, protocol: "tcp", action: "drop" }] }) },
        /^vpcctl_policy_json\.ingress\[0\]\.action: "drop" is not known/,
      ],
    ];
    for (const [req, re] of cases) await rejectsWith(fw.parseRules(req), Code.InvalidArgument, re);
    assert.equal(await fwSnapshot(), before, "ParseRules changes nothing");
  });
});
