// VPC-internal DNS with real packets: VMs made by the real vmm (which
// registers NAME.VPC.internal), the resolver served by the real gateway in
// the simulated hypervisor's host namespace, queried from inside the VM
// namespaces with busybox nslookup and a small dns-packet client; names
// forwarded to an upstream resolver in the "internet" namespace. Two VPCs
// with the same CIDR: each sees only its own names.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createRequire } from "node:module";
import { Code } from "@connectrpc/connect";
import type { Cluster } from "ioredis";
import { afterAll, beforeAll, describe, test } from "vitest";
import { DnsService } from "../../gen/microvpc/v1/dns_pb.js";
import { FirewallService } from "../../gen/microvpc/v1/firewall_pb.js";
import { SubnetType } from "../../gen/microvpc/v1/subnet_pb.js";
import { VmService, type Vm } from "../../gen/microvpc/v1/vm_pb.js";
import { grpcClient } from "../../services/common/client.js";
import { isCluster } from "../../services/common/redis.js";
import { dnsKeys, vpcDnsKeys } from "../../services/dns/schema.js";
import { rejectsWith } from "../lib/clients.js";
import { type Daemon } from "../lib/daemon.js";
import { Harness } from "../lib/harness.js";
import { addresses, nsExec, sleep, trackChild, waitFor } from "../lib/netns.js";
import { keysLike } from "../lib/redis.js";

const DNS_PACKET = createRequire(import.meta.url).resolve("dns-packet");

/** A UDP DNS server answering every A query with `answer` (the "internet's" resolver). */
const UPSTREAM = `
const p = require(${JSON.stringify(DNS_PACKET)});
const [port, answer] = process.argv.slice(1);
const s = require("node:dgram").createSocket("udp4");
s.on("message", (m, r) => {
  let q; try { q = p.decode(m); } catch { return; }
  const qq = q.questions[0];
  const answers = qq && qq.type === "A" && qq.name.endsWith("example.test") ? [{ type: "A", name: qq.name, ttl: 30, data: answer }] : [];
  s.send(p.encode({ id: q.id, type: "response", flags: p.RECURSION_DESIRED | p.RECURSION_AVAILABLE | (answers.length ? 0 : 3), questions: q.questions, answers }), r.port, r.address);
});
s.bind(Number(port), "0.0.0.0");
process.on("SIGTERM", () => process.exit(0));
`;

/** One query; prints {rcode, answers, id}. Exit 3 on timeout. */
const QUERY = `
const p = require(${JSON.stringify(DNS_PACKET)});
const [server, port, name, type, proto] = process.argv.slice(1);
const id = Math.floor(Math.random() * 65536);
const q = { type: "query", id, flags: p.RECURSION_DESIRED, questions: [{ type, name, class: "IN" }] };
const done = (b) => { const r = p.decode(b); process.stdout.write(JSON.stringify({ rcode: r.rcode, answers: r.answers.filter((a) => a.type === "A").map((a) => a.data), sameId: r.id === id, aa: r.flag_aa })); process.exit(0); };
setTimeout(() => process.exit(3), 3000);
if (proto === "tcp") {
  const c = require("node:net").connect(Number(port), server, () => c.write(p.streamEncode(q)));
  let buf = Buffer.alloc(0);
  c.on("data", (d) => { buf = Buffer.concat([buf, d]); if (buf.length >= 2 && buf.length >= 2 + buf.readUInt16BE(0)) done(buf.subarray(2, 2 + buf.readUInt16BE(0))); });
  c.on("error", () => process.exit(4));
} else {
  const s = require("node:dgram").createSocket("udp4");
  s.on("message", done);
  s.send(p.encode(q), Number(port), server);
}
`;

interface Answer {
  rcode: string;
  answers: string[];
  sameId: boolean;
  aa: boolean;
}

let h: Harness;
let fwd: Daemon, gwd: Daemon, vmmd: Daemon;
let dns: ReturnType<typeof grpcClient<typeof DnsService>>;
let vmm: ReturnType<typeof grpcClient<typeof VmService>>;
let inet: { ns: string; address: string };
let alphaWeb: Vm, alphaApi: Vm, betaDb: Vm, betaWeb: Vm;

/** Queries `name` from inside ns; null on timeout. */
async function query(ns: string, server: string, name: string, type = "A", proto: "udp" | "tcp" = "udp", port = 53): Promise<Answer | null> {
  const r = await nsExec(ns, process.execPath, ["-e", QUERY, server, String(port), name, type, proto], { check: false, timeoutMs: 10_000 });
  if (r.code !== 0) return null;
  return JSON.parse(r.stdout);
}

/** The A answers for name, or the rcode if there are none. */
async function resolve(vm: Vm, name: string, server = "10.0.0.2"): Promise<string> {
  const a = await query(vm.namespace, server, name);
  if (!a) return "timeout";
  assert.ok(a.sameId, "the answer carries the query's id");
  return a.answers.length ? a.answers.join(",") : a.rcode;
}

async function eventually(probe: () => Promise<string>, want: string, what: string): Promise<void> {
  let last = "";
  const ok = await waitFor(async () => (last = await probe()) === want, { timeoutMs: 12_000, intervalMs: 250 });
  assert.ok(ok, `${what}: expected ${want}, last ${last}`);
}

/** Every command Redis runs from now until stop() (MONITOR on each primary). */
async function monitorCommands(): Promise<{ commands: string[][]; stop: () => Promise<void> }> {
  // Ready first: a cluster client knows its primaries only once it is.
  const r = await h.connectReady();
  const commands: string[][] = [];
  const nodes = isCluster(r) ? (r as unknown as Cluster).nodes("master") : [r];
  const monitors = await Promise.all(nodes.map((n) => n.monitor()));
  for (const m of monitors) m.on("monitor", (_t: string, args: string[]) => commands.push(args));
  return {
    commands,
    stop: async () => {
      for (const m of monitors) m.disconnect();
      r.disconnect();
    },
  };
}

async function startUpstream(port: number, answer: string): Promise<void> {
  const child = trackChild(spawn("ip", ["netns", "exec", inet.ns, process.execPath, "-e", UPSTREAM, String(port), answer], { stdio: "ignore" }));
  const ok = await waitFor(async () => (await query(inet.ns, "127.0.0.1", "probe.example.test", "A", "udp", port))?.answers[0] === answer, {
    timeoutMs: 5000,
    intervalMs: 100,
  });
  assert.ok(ok && child.exitCode === null, `upstream :${port} answers`);
}

beforeAll(async () => {
  h = await Harness.start({ hosts: 1 });
  const hv = h.hosts[0];
  inet = await h.internet();
  await startUpstream(53, "198.51.100.1");
  await startUpstream(5353, "198.51.100.2");
  let started: Daemon | undefined;
  ({ fwd, gwd, vmmd: started } = await h.hostServices(hv, { vmm: true, driftMs: 3000 }));
  vmmd = started!;
  dns = grpcClient(DnsService, { address: h.ipamDaemon.address, timeoutMs: 20_000 });
  vmm = grpcClient(VmService, { address: vmmd.address, timeoutMs: 60_000 });
  await dns.updateDnsConfig({ forwarders: { addresses: [inet.address] } });

  // alpha: a private subnet (no NAT gateway) that does not hold the
  // resolver address 10.0.0.2: VMs route to it through their gateway.
  const alpha = await h.vpc("alpha", "10.0.0.0/16");
  await h.subnet(alpha, "web", "10.0.1.0/24", SubnetType.PRIVATE);
  // beta: the same CIDR; its subnet holds 10.0.0.2, so VMs ARP for it.
  const beta = await h.vpc("beta", "10.0.0.0/16");
  await h.subnet(beta, "web", "10.0.0.0/24", SubnetType.PRIVATE);
  // Security groups with no rules at all: the resolver is not theirs to filter.
  const fw = grpcClient(FirewallService, { address: fwd.address, timeoutMs: 20_000 });
  for (const v of ["alpha", "beta"]) await fw.createSecurityGroup({ vpc: v, name: "closed" });
  const mk = async (name: string, vpc: string) => (await vmm.createVm({ name, vpc, subnet: "web", securityGroups: ["closed"] })).vm!;
  alphaWeb = await mk("web1", "alpha");
  alphaApi = await mk("api", "alpha");
  betaDb = await mk("db1", "beta");
  betaWeb = await mk("web1", "beta");
});

afterAll(async () => {
  for (const d of [vmmd, gwd, fwd]) await d?.stop().catch(() => undefined);
  const left = await h?.close();
  assert.deepEqual(left ?? [], []);
});

describe("names inside a VPC", () => {
  test("the NIC's DNS server is the VPC's resolver (VPC base + 2), its search domain the VPC's zone", async () => {
    assert.match(alphaWeb.nics[0].guest!.kernelIpArg, /:off:10\.0\.0\.2$/);
    assert.match(betaDb.nics[0].guest!.kernelIpArg, /:off:10\.0\.0\.2$/);
    const nics = (await h.hosts[0].agent.listNics({ pageSize: 100 })).nics;
    const g = nics.find((n) => n.id === betaDb.nics[0].id)!.guest!;
    assert.deepEqual([g.dnsServers, g.searchDomains], [["10.0.0.2"], ["beta.internal"]]);
  });

  test("VM names resolve inside their VPC: routed to the resolver (alpha) and on-link with ARP (beta)", async () => {
    const aWeb = alphaWeb.nics[0].guest!.address;
    const bWeb = betaWeb.nics[0].guest!.address;
    assert.notEqual(aWeb, bWeb);
    await eventually(() => resolve(alphaWeb, "web1.alpha.internal"), aWeb, "alpha web1 from alpha");
    assert.equal(await resolve(alphaWeb, "api.alpha.internal"), alphaApi.nics[0].guest!.address);
    assert.equal(await resolve(alphaApi, "WEB1.Alpha.Internal."), aWeb, "case-insensitive, trailing dot");
    await eventually(() => resolve(betaDb, "web1.beta.internal"), bWeb, "beta web1 from beta: the same name, beta's VM");
    assert.equal(await resolve(betaWeb, "db1.beta.internal"), betaDb.nics[0].guest!.address);
    // The answer is authoritative; over TCP too.
    const a = await query(alphaWeb.namespace, "10.0.0.2", "api.alpha.internal", "A", "tcp");
    assert.deepEqual([a?.rcode, a?.answers, a?.aa], ["NOERROR", [alphaApi.nics[0].guest!.address], true]);
  });

  test("busybox nslookup (a real client) resolves a VM name", async () => {
    const r = await nsExec(alphaApi.namespace, "busybox", ["nslookup", "web1.alpha.internal", "10.0.0.2"], { check: false, timeoutMs: 10_000 });
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.match(r.stdout, new RegExp(`Address:? *${alphaWeb.nics[0].guest!.address.replace(/\./g, "\\.")}`));
  });

  test("a name of another VPC is NXDOMAIN, even with the same CIDR and resolver address", async () => {
    assert.equal(await resolve(betaDb, "api.alpha.internal"), "NXDOMAIN", "alpha's api from beta");
    assert.equal(await resolve(betaDb, "web1.alpha.internal"), "NXDOMAIN", "alpha's web1 from beta");
    assert.equal(await resolve(alphaWeb, "db1.beta.internal"), "NXDOMAIN", "beta's db1 from alpha");
    assert.equal(await resolve(alphaWeb, "nope.alpha.internal"), "NXDOMAIN");
    const aaaa = await query(alphaWeb.namespace, "10.0.0.2", "web1.alpha.internal", "AAAA");
    assert.deepEqual([aaaa?.rcode, aaaa?.answers], ["NOERROR", []], "an existing name without AAAA: NOERROR, no data");
  });

  test("a record set over the API appears; a deleted VM's name stops resolving", async () => {
    // The resolver reads the changed name (HMGET of the VPC's records with it), not the whole zone: seen with MONITOR.
    const seen = await monitorCommands();
    try {
      await dns.setDnsRecord({ vpc: "alpha", name: "legacy", address: "10.0.1.200", owner: "operator" });
      await eventually(() => resolve(alphaWeb, "legacy.alpha.internal"), "10.0.1.200", "an operator's record");
    } finally {
      await seen.stop();
    }
    const r = h.connect();
    const records = dnsKeys(r).records(alphaWeb.vpcId);
    r.disconnect();
    assert.ok(
      seen.commands.some((c) => c[0].toLowerCase() === "hmget" && c[1] === records && c.includes("legacy")),
      `the resolver read the new name alone: ${JSON.stringify(seen.commands.filter((c) => c[1] === records))}`,
    );
    await vmm.deleteVm({ ref: alphaApi.id });
    await eventually(() => resolve(alphaWeb, "api.alpha.internal"), "NXDOMAIN", "deleted VM's name");
    const names = (await dns.listDnsRecords({ vpc: "alpha" })).records.map((r) => `${r.name}=${r.owner}`);
    assert.deepEqual(names, ["legacy=operator", `web1=${alphaWeb.id}`]);
  });
});

describe("forwarding", () => {
  test("other names go to the upstream (the defaults); a VPC's own forwarders take effect; inherit restores", async () => {
    await eventually(() => resolve(alphaWeb, "www.example.test"), "198.51.100.1", "forwarded to the default upstream");
    await dns.updateDnsConfig({ vpc: "alpha", forwarders: { addresses: [`${inet.address}:5353`] } });
    await eventually(() => resolve(alphaWeb, "www.example.test"), "198.51.100.2", "alpha's own forwarder");
    assert.equal(await resolve(betaDb, "www.example.test"), "198.51.100.1", "beta still inherits");
    const c = (await dns.getDnsConfig({ vpc: "alpha" })).config!;
    assert.deepEqual([c.forwarders?.addresses, c.forwardersInherited, c.domain], [[`${inet.address}:5353`], false, "alpha.internal"]);
    await dns.updateDnsConfig({ vpc: "alpha", inheritForwarders: true });
    await eventually(() => resolve(alphaWeb, "www.example.test"), "198.51.100.1", "inherited again");
    // Upstream NXDOMAIN passes through unchanged.
    assert.equal(await resolve(alphaWeb, "nothing.invalid"), "NXDOMAIN");
  });

  test("no forwarders: REFUSED; a dead forwarder: SERVFAIL", async () => {
    await dns.updateDnsConfig({ vpc: "beta", forwarders: { addresses: [] } });
    await eventually(() => resolve(betaDb, "www.example.test"), "REFUSED", "nothing to forward to");
    assert.equal(await resolve(betaDb, "db1.beta.internal"), betaDb.nics[0].guest!.address, "internal names still answered");
    await dns.updateDnsConfig({ vpc: "beta", forwarders: { addresses: [`${inet.address}:5399`] } });
    await eventually(() => resolve(betaDb, "www.example.test"), "SERVFAIL", "the forwarder does not answer");
    await dns.updateDnsConfig({ vpc: "beta", inheritForwarders: true });
  });
});

describe("resolver address", () => {
  test("moving it: the new address answers, the old one stops", async () => {
    await dns.updateDnsConfig({ vpc: "alpha", resolverAddress: "10.0.200.53" });
    await eventually(() => resolve(alphaWeb, "web1.alpha.internal", "10.0.200.53"), alphaWeb.nics[0].guest!.address, "new resolver address");
    await eventually(() => resolve(alphaWeb, "web1.alpha.internal", "10.0.0.2"), "timeout", "old address no longer served");
    const lo = (await addresses(h.hosts[0].vpcNamespace(alphaWeb.vpcId))).filter((a) => a.ifname === "lo").map((a) => a.local);
    assert.ok(lo.includes("10.0.200.53") && !lo.includes("10.0.0.2"), `lo of alpha's namespace: ${lo}`);
    assert.equal((await dns.getDnsConfig({ vpc: "alpha" })).config!.resolverAddress, "10.0.200.53");
    await dns.updateDnsConfig({ vpc: "alpha", resolverAddress: "10.0.0.2" });
    await eventually(() => resolve(alphaWeb, "web1.alpha.internal"), alphaWeb.nics[0].guest!.address, "back at base + 2");
  });
});

describe("bad input", () => {
  test("each mistake gets its gRPC code and changes nothing", async () => {
    const before = (await dns.listDnsRecords({ vpc: "alpha" })).records.map((r) => `${r.name}=${r.address}`);
    const cfgBefore = (await dns.getDnsConfig({ vpc: "alpha" })).config!;
    const I = Code.InvalidArgument;
    await rejectsWith(dns.setDnsRecord({ vpc: "alpha", name: "Bad_Name", address: "10.0.1.9", owner: "x" }), I, /name/);
    await rejectsWith(dns.setDnsRecord({ vpc: "alpha", name: "a.b", address: "10.0.1.9", owner: "x" }), I, /name/);
    await rejectsWith(dns.setDnsRecord({ vpc: "alpha", name: "ok", address: "10.1.0.9", owner: "x" }), I, /outside VPC alpha/);
    await rejectsWith(dns.setDnsRecord({ vpc: "alpha", name: "ok", address: "10.0.1.999", owner: "x" }), I, /address/);
    await rejectsWith(dns.setDnsRecord({ vpc: "alpha", name: "ok", address: "10.0.1.9", owner: "" }), I, /owner/);
    await rejectsWith(dns.setDnsRecord({ vpc: "alpha", name: "ok", address: "10.0.1.9", owner: "a b" }), I, /owner/);
    await rejectsWith(dns.setDnsRecord({ vpc: "alpha", name: "ok", address: "10.0.1.9", owner: "x", ttlSeconds: 0 }), I, /ttl_seconds/);
    await rejectsWith(dns.setDnsRecord({ vpc: "alpha", name: "ok", address: "10.0.1.9", owner: "x", ttlSeconds: 86401 }), I, /ttl_seconds/);
    await rejectsWith(dns.setDnsRecord({ vpc: "gamma", name: "ok", address: "10.0.1.9", owner: "x" }), Code.NotFound, /vpc/);
    await rejectsWith(dns.setDnsRecord({ vpc: "alpha", name: "web1", address: "10.0.1.9", owner: "intruder" }), Code.AlreadyExists, new RegExp(alphaWeb.id));
    await rejectsWith(dns.deleteDnsRecord({ vpc: "alpha", name: "web1", owner: "intruder" }), Code.FailedPrecondition);
    await rejectsWith(dns.deleteDnsRecord({ vpc: "alpha" }), I, /name/);
    await rejectsWith(dns.listDnsRecords({ vpc: "" }), I, /vpc/);
    await rejectsWith(dns.listDnsRecords({ vpc: "alpha", pageToken: "garbage" }), I, /page_token/);
    await rejectsWith(
      dns.updateDnsConfig({ vpc: "alpha", forwarders: { addresses: ["1.1.1.1", "8.8.8.8", "9.9.9.9", "1.0.0.1", "8.8.4.4"] } }),
      I,
      /at most 4/,
    );
    await rejectsWith(dns.updateDnsConfig({ vpc: "alpha", forwarders: { addresses: ["dns.example:53"] } }), I, /forwarders/);
    await rejectsWith(dns.updateDnsConfig({ vpc: "alpha", forwarders: { addresses: ["1.1.1.1:70000"] } }), I, /port/);
    await rejectsWith(dns.updateDnsConfig({ vpc: "alpha", forwarders: { addresses: ["127.0.0.53"] } }), I, /hypervisor/);
    await rejectsWith(dns.updateDnsConfig({ vpc: "alpha", forwarders: { addresses: ["1.1.1.1"] }, inheritForwarders: true }), I, /inherit_forwarders/);
    await rejectsWith(dns.updateDnsConfig({ vpc: "alpha", resolverAddress: "10.1.0.2" }), I, /outside/);
    await rejectsWith(dns.updateDnsConfig({ vpc: "alpha", resolverAddress: "10.0.255.255" }), I, /broadcast/);
    await rejectsWith(dns.updateDnsConfig({ vpc: "alpha", resolverAddress: "10.0.1.0" }), Code.FailedPrecondition, /network or broadcast address of subnet/);
    await rejectsWith(dns.updateDnsConfig({ vpc: "alpha", resolverAddress: alphaWeb.nics[0].guest!.address }), Code.FailedPrecondition, /allocated to/);
    await rejectsWith(dns.updateDnsConfig({ resolverAddress: "10.0.0.2" }), I, /VPC only/);
    await rejectsWith(dns.updateDnsConfig({ vpc: "alpha", recordTtlSeconds: 0 }), I, /record_ttl_seconds/);
    await rejectsWith(dns.getDnsConfig({ vpc: "gamma" }), Code.NotFound);
    // A failed update is all-or-nothing: a good TTL with a bad address changes neither.
    await rejectsWith(dns.updateDnsConfig({ vpc: "alpha", recordTtlSeconds: 5, resolverAddress: alphaWeb.nics[0].guest!.address }), Code.FailedPrecondition);
    assert.deepEqual(
      (await dns.listDnsRecords({ vpc: "alpha" })).records.map((r) => `${r.name}=${r.address}`),
      before,
    );
    const cfgAfter = (await dns.getDnsConfig({ vpc: "alpha" })).config!;
    assert.deepEqual(
      [cfgAfter.resolverAddress, cfgAfter.recordTtlSeconds, cfgAfter.forwarders?.addresses],
      [cfgBefore.resolverAddress, cfgBefore.recordTtlSeconds, cfgBefore.forwarders?.addresses],
    );
  });

  test("owners racing for one name: exactly one wins, the others get ALREADY_EXISTS", async () => {
    const owners = Array.from({ length: 20 }, (_, i) => `racer-${i}`);
    const results = await Promise.allSettled(owners.map((owner, i) => dns.setDnsRecord({ vpc: "beta", name: "race", address: `10.0.0.${100 + i}`, owner })));
    const won = results.flatMap((r, i) => (r.status === "fulfilled" ? [i] : []));
    assert.equal(won.length, 1, `winners: ${won}`);
    for (const r of results) if (r.status === "rejected") assert.equal((r.reason as { code: Code }).code, Code.AlreadyExists);
    const rec = (await dns.listDnsRecords({ vpc: "beta", owner: owners[won[0]] })).records;
    assert.deepEqual(
      rec.map((x) => [x.name, x.address]),
      [["race", `10.0.0.${100 + won[0]}`]],
    );
    await dns.deleteDnsRecord({ vpc: "beta", owner: owners[won[0]] });
  });

  test("a VM whose name another owner holds is refused and rolled back; DeleteVpc leaves no records", async () => {
    await dns.setDnsRecord({ vpc: "beta", name: "taken", address: "10.0.0.77", owner: "operator" });
    const err = await rejectsWith(vmm.createVm({ name: "taken", vpc: "beta", subnet: "web" }), Code.AlreadyExists, /step dns/);
    assert.match(err.rawMessage, /every step done before it was undone/);
    assert.equal((await vmm.listVms({ vpc: "beta" })).vms.length, 2);
    // A VPC deleted with records: they go with it (a new VPC of the same name starts empty).
    const tmp = await h.vpc("tmp", "10.5.0.0/16");
    await dns.setDnsRecord({ vpc: "tmp", name: "x", address: "10.5.0.9", owner: "operator" });
    await h.ipam.vpc.deleteVpc({ ref: tmp.id });
    await h.vpc("tmp", "10.5.0.0/16");
    assert.deepEqual((await dns.listDnsRecords({ vpc: "tmp" })).records, []);
    const r = await h.connectReady();
    try {
      // Where this Redis keeps a VPC's DNS state (under the VPC's hash tag on a cluster).
      assert.equal(await r.exists(...vpcDnsKeys(tmp.id, dnsKeys(r))), 0, "no DNS key of the deleted VPC");
      assert.deepEqual(await keysLike(r, `mvpc:dns:vpc:${tmp.id}:*`), [], "no DNS key of the deleted VPC (single layout)");
      assert.deepEqual(await keysLike(r, `mvpc:{${tmp.id}}:dns:*`), [], "no DNS key of the deleted VPC (cluster layout)");
    } finally {
      r.disconnect();
    }
  });

  test("the root namespace is unchanged", async () => {
    await sleep(10);
    assert.deepEqual(await h.rootChanges(), []);
  });
});
