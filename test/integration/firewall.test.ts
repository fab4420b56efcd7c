// Security groups and network ACLs with real packets: VMs are namespaces on a
// simulated hypervisor, the firewall daemon compiles nftables into the VPC's
// namespace, and every expectation is checked both ways: what is allowed
// flows, what is forbidden does not. firewall-on-cluster.test.ts runs the
// same with the ipam, netagent and firewall daemons on a Redis Cluster.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { Code, createClient, createRouterTransport } from "@connectrpc/connect";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { afterAll, beforeAll, describe, test } from "vitest";
import { AclAction, Direction, FirewallService, Protocol } from "../../gen/microvpc/v1/firewall_pb.js";
import { SubnetType } from "../../gen/microvpc/v1/subnet_pb.js";
import { grpcClient } from "../../services/common/client.js";
import { mapDomainErrors } from "../../services/common/errors.js";
import { FirewallApi } from "../../services/firewall/service.js";
import { FirewallStore } from "../../services/firewall/store.js";
import { IpamStore } from "../../services/ipam/store.js";
import { rejectsWith } from "../lib/clients.js";
import type { Daemon } from "../lib/daemon.js";
import { bindRequest, Harness, type Vm } from "../lib/harness.js";
import { canPing, ipn, nsExec, run, sleep, startTcpServer, tcpProbe, trackChild, waitFor } from "../lib/netns.js";
import { connectReady } from "../lib/redis.js";

let h: Harness;
let fwd: Daemon;
let fw: ReturnType<typeof grpcClient<typeof FirewallService>>;
let web1: Vm, web2: Vm, db1: Vm, other: Vm;
let webSg: string, dbSg: string;

async function startFirewall(): Promise<void> {
  fwd = await h.firewall(0, { driftMs: 2000 });
  fw = grpcClient(FirewallService, { address: fwd.address, timeoutMs: 20_000 });
}

const tcp = (port: number, cidr: string) => ({
  direction: Direction.INGRESS,
  protocol: Protocol.TCP,
  portFrom: port,
  portTo: port,
  peer: { case: "cidr" as const, value: cidr },
});

async function bind(vm: Vm, groups: string[]): Promise<void> {
  await fw.bindNic(bindRequest(vm, groups));
}

/** A Node one-liner in a namespace (tracked: ended with the run); its stdout piped when `out`. */
function nodeIn(ns: string, script: string, out = false): ReturnType<typeof spawn> {
  return trackChild(spawn("ip", ["netns", "exec", ns, process.execPath, "-e", script], { stdio: out ? ["ignore", "pipe", "ignore"] : "ignore" }));
}

/** Waits until the probe gives `want` (the firewall converges in the background), then returns it. */
async function eventually(probe: () => Promise<boolean>, want: boolean, what: string): Promise<void> {
  const ok = await waitFor(async () => (await probe()) === want, { timeoutMs: 10_000, intervalMs: 200 });
  assert.ok(ok, `${what}: expected ${want ? "reachable" : "blocked"}`);
}

beforeAll(async () => {
  h = await Harness.start({ hosts: 1, underlay: false });
  const vpc = await h.vpc("shop", "10.0.0.0/16");
  const web = await h.subnet(vpc, "web", "10.0.1.0/24", SubnetType.PUBLIC);
  const db = await h.subnet(vpc, "db", "10.0.2.0/24");
  web1 = await h.vm(0, vpc, web, "web1");
  web2 = await h.vm(0, vpc, web, "web2");
  db1 = await h.vm(0, vpc, db, "db1");
  other = await h.vm(0, vpc, db, "other");
  for (const vm of [web1, web2, db1, other]) {
    for (const port of [22, 80, 443, 5432, 8080]) await startTcpServer(vm.ns, port, vm.name);
  }
  await startFirewall();
  webSg = (
    await fw.createSecurityGroup({
      vpc: vpc.id,
      name: "web",
      // 80 and 443 from anywhere, 22 only from the web subnet.
      rules: [
        tcp(80, "0.0.0.0/0"),
        tcp(443, "0.0.0.0/0"),
        tcp(22, "10.0.1.0/24"),
        { direction: Direction.INGRESS, protocol: Protocol.ICMP, peer: { case: "cidr", value: "10.0.0.0/16" } },
      ],
    })
  ).securityGroup!.id;
  dbSg = (
    await fw.createSecurityGroup({
      vpc: vpc.id,
      name: "db",
      rules: [{ direction: Direction.INGRESS, protocol: Protocol.TCP, portFrom: 5432, portTo: 5432, peer: { case: "securityGroupId", value: webSg } }],
    })
  ).securityGroup!.id;
  await bind(web1, [webSg]);
  await bind(web2, [webSg]);
  await bind(db1, [dbSg]);
  await bind(other, []);
  // Until the daemon applies the bindings everything is open: wait until
  // forbidden flows are blocked, so no test below can pass on an empty table.
  await eventually(() => tcpProbe(db1.ns, web1.address, 22, 800), false, "the web group is in force");
  await eventually(() => tcpProbe(other.ns, db1.address, 5432, 800), false, "the db group is in force");
});

afterAll(async () => {
  await fwd?.stop();
  const left = await h?.close();
  assert.deepEqual(left ?? [], []);
});

describe("security groups", () => {
  test("web: 80 and 443 from anywhere, 22 only from the web subnet; no group: ingress denied", async () => {
    // Until the daemon's first pass lands everything is open, so wait for a
    // forbidden flow to be blocked (that proves the policy is in force), then
    // check the allowed ones.
    await eventually(() => tcpProbe(db1.ns, web1.address, 22, 800), false, "db1 (db subnet) → web1:22 must be blocked");
    await eventually(() => tcpProbe(db1.ns, web1.address, 80), true, "db1 → web1:80");
    assert.ok(await tcpProbe(other.ns, web1.address, 443), "other → web1:443");
    assert.ok(await tcpProbe(web2.ns, web1.address, 22), "web2 (web subnet) → web1:22");
    assert.ok(!(await tcpProbe(db1.ns, web1.address, 22, 800)), "db1 (db subnet) → web1:22 stays blocked");
    assert.ok(!(await tcpProbe(db1.ns, web1.address, 8080, 800)), "a port no rule opens");
    assert.ok(await canPing(db1.ns, web1.address), "icmp from the VPC");
    assert.ok(!(await tcpProbe(web1.ns, other.address, 80, 800)), "a NIC without groups takes no new connection");
    assert.ok(await tcpProbe(other.ns, web1.address, 80), "…but its egress is open");
  });

  test("db: 5432 only from members of web, following membership as NICs join and leave", async () => {
    await eventually(() => tcpProbe(other.ns, db1.address, 5432, 800), false, "other (not a member) → db1:5432 blocked");
    await eventually(() => tcpProbe(web1.ns, db1.address, 5432), true, "web1 (member) → db1:5432");
    assert.ok(!(await tcpProbe(web1.ns, db1.address, 22, 800)), "web1 → db1:22 blocked");
    await bind(other, [webSg]);
    await eventually(() => tcpProbe(other.ns, db1.address, 5432), true, "other after joining web");
    await bind(other, []);
    await eventually(() => tcpProbe(other.ns, db1.address, 5432, 800), false, "other after leaving web");
    assert.ok(await tcpProbe(web1.ns, db1.address, 5432), "web1 still a member");
  });

  test("return traffic of allowed flows passes even where egress is closed", async () => {
    const closed = (await fw.createSecurityGroup({ vpc: web1.vpc.id, name: "no-egress", omitDefaultEgress: true, rules: [tcp(80, "0.0.0.0/0")] }))
      .securityGroup!.id;
    await bind(web2, [closed]);
    try {
      await eventually(() => tcpProbe(web2.ns, db1.address, 80, 800), false, "web2 cannot open connections");
      assert.ok(await tcpProbe(db1.ns, web2.address, 80), "but answers connections it accepts (established return traffic)");
    } finally {
      await bind(web2, [webSg]);
    }
  });

  test("drop logging past its rate still drops: a burst of refused connections gets none through", async () => {
    // Egress closed, drops logged at 1/s. The log's limit once sat in the
    // drop rule itself ("log … limit … drop"): past the rate the rule did not
    // match, the packet fell out of the NIC's chain, and here web1 (80 open
    // to anyone) took the connection.
    const logged = (
      await fw.createSecurityGroup({
        vpc: web2.vpc.id,
        name: "no-egress-logged",
        omitDefaultEgress: true,
        rules: [tcp(80, "0.0.0.0/0")],
        dropLogging: { enabled: true, ratePerSecond: 1, burst: 1 },
      })
    ).securityGroup!.id;
    await bind(web2, [logged]);
    try {
      await eventually(() => tcpProbe(web2.ns, web1.address, 80, 500), false, "web2 cannot open connections");
      const before = (await fw.getFirewallStatus({ nicIds: [web2.nicId] })).nics[0].egress!.droppedPackets;
      const through: number[] = [];
      for (let i = 0; i < 8; i++) if (await tcpProbe(web2.ns, web1.address, 80, 300)) through.push(i);
      assert.deepEqual(through, [], "no connection past the log's rate");
      assert.ok(await tcpProbe(db1.ns, web2.address, 80), "what the group allows still flows (db1 → web2:80)");
      const after = (await fw.getFirewallStatus({ nicIds: [web2.nicId] })).nics[0].egress!.droppedPackets;
      assert.ok(after - before >= 8n, `every refused SYN counted as a drop (${before} → ${after})`);
    } finally {
      await bind(web2, [webSg]);
    }
  });

  test("a rule removed while a TCP connection it allowed is open: the connection stops", async () => {
    // A long-lived connection from db1 to web1:8080 that echoes every 100 ms.
    const echo = nodeIn(web1.ns, `require("net").createServer((s)=>{s.on("error",()=>{});s.pipe(s)}).listen(9090)`);
    await sleep(300);
    await fw.updateSecurityGroup({ ref: webSg, addRules: [tcp(9090, "10.0.2.0/24")] });
    const client = nodeIn(
      db1.ns,
      `const s=require("net").connect(9090,"${web1.address}");let n=0;s.on("data",()=>{n++;process.stdout.write("e"+n+"\\n")});setInterval(()=>s.write("x"),100);s.on("error",()=>{});setTimeout(()=>process.exit(0),15000)`,
      true,
    );
    let echoes = 0;
    client.stdout!.on("data", (d) => (echoes += String(d).split("\n").filter(Boolean).length));
    try {
      assert.ok(await waitFor(() => echoes >= 5, { timeoutMs: 10_000 }), "the connection works while the rule exists");
      const cleared = async () => {
        const text = await (await fetch(`http://127.0.0.1:${fwd.metricsPort}/metrics`)).text();
        const n = (re: RegExp) => [...text.matchAll(re)].reduce((a, m) => a + Number(m[1]), 0);
        return {
          inProcess: n(/^microvpc_conntrack_library_runs_total\{[^}]*op="delete",result="ok"[^}]*\} (\d+)$/gm),
          execs: n(/^microvpc_exec_total\{[^}]*command="[^"]*conntrack"[^}]*\} (\d+)$/gm),
        };
      };
      const before = await cleared();
      await fw.updateSecurityGroup({ ref: webSg, removeRules: [tcp(9090, "10.0.2.0/24")] });
      // After the firewall converges, no echo comes back any more.
      await sleep(2500);
      const at = echoes;
      await sleep(1500);
      assert.equal(echoes, at, "no echo after the rule was removed: the open connection was cut");
      assert.ok(!(await tcpProbe(db1.ns, web1.address, 9090, 800)), "and a new one is refused");
      const after = await cleared();
      assert.ok(after.inProcess > before.inProcess, "the entry was deleted in-process (libnetfilter_conntrack)");
      assert.equal(after.execs, before.execs, "without a conntrack exec");
    } finally {
      client.kill("SIGKILL");
      echo.kill("SIGKILL");
    }
  });
});

describe("UnbindNic", () => {
  test("of an attached NIC: without detaching it keeps its egress; with detaching (DeleteVm's) nothing reaches it or leaves it when the call returns; bound again, it is back", async () => {
    const vpc = web1.vpc;
    const gone = await h.vm(0, vpc, web1.subnet, "gone");
    let server: Awaited<ReturnType<typeof startTcpServer>> | undefined;
    try {
      server = await startTcpServer(gone.ns, 80, gone.name);
      await bind(gone, [webSg]);
      await eventually(() => tcpProbe(web1.ns, gone.address, 80), true, "web1 → gone:80 once bound");
      assert.ok(await tcpProbe(gone.ns, web1.address, 80), "gone → web1:80");

      // A plain unbind: an attached NIC without groups (ingress closed, egress open), enforced at return.
      assert.equal((await fw.unbindNic({ nicId: gone.nicId })).unbound, true);
      assert.ok(!(await tcpProbe(web1.ns, gone.address, 80, 800)), "unbound: web1 → gone:80 blocked at return");
      assert.ok(await tcpProbe(gone.ns, web1.address, 80), "unbound: gone → web1:80 still open");

      // DeleteVm's unbind, the NIC still attached: it leaves the tables, so its port sends nothing either.
      await bind(gone, [webSg]);
      assert.ok(await tcpProbe(web1.ns, gone.address, 80), "bound again: web1 → gone:80");
      assert.equal((await fw.unbindNic({ nicId: gone.nicId, detaching: true })).unbound, true);
      const unboundAt = Date.now();
      assert.ok(!(await tcpProbe(gone.ns, web1.address, 80, 800)), "detaching: gone → web1:80 blocked at return");
      assert.ok(!(await canPing(gone.ns, web1.address)), "detaching: gone → web1 ping blocked");
      assert.ok(!(await tcpProbe(web1.ns, gone.address, 80, 800)), "detaching: web1 → gone:80 blocked");
      assert.ok(await tcpProbe(web2.ns, web1.address, 80), "the other NICs are untouched: web2 → web1:80");
      // A whole pass later (the drift check, every 2 s here; nothing else changes meanwhile) does not put it back.
      const drift = await waitFor(
        async () => {
          const t = (await fw.getFirewallStatus({})).lastApplyTime;
          return t !== undefined && timestampMs(t) > unboundAt + 1000;
        },
        { timeoutMs: 6000, intervalMs: 100 },
      );
      assert.ok(drift, "a pass ran a second or more after the unbind (the drift check)");
      assert.ok(!(await tcpProbe(gone.ns, web1.address, 80, 800)), "still blocked after the next drift check");

      // Bound again before it was detached: back in the tables, with its group.
      await bind(gone, [webSg]);
      assert.ok(await tcpProbe(gone.ns, web1.address, 80), "bound again: gone → web1:80");
      assert.ok(await tcpProbe(web1.ns, gone.address, 80), "bound again: web1 → gone:80");
      assert.ok(!(await tcpProbe(db1.ns, gone.address, 22, 800)), "and only what its group allows: db1 → gone:22 blocked");
    } finally {
      await server?.stop();
      await fw.unbindNic({ nicId: gone.nicId, detaching: true });
      await h.removeVm(gone);
    }
  });
});

describe("an address used again", () => {
  test("a VM deleted while a connection to it is open: the next VM of its address gets nothing of that connection, only what its own group allows", async () => {
    // The netagent clears a detached NIC's flows after DetachNic answers (by its mark,
    // ct-mark-state.ts) and before another NIC can have the address: were the old
    // connection's conntrack entry still there, its packets would pass as
    // "established" to the new VM, whose kernel would answer them with a reset.
    const vpc = web1.vpc;
    const old = await h.vm(0, vpc, web1.subnet, "old");
    let next: Vm | undefined;
    const echo = (ns: string) => nodeIn(ns, `require("net").createServer((s)=>{s.on("error",()=>{});s.pipe(s)}).listen(80)`);
    const oldEcho = echo(old.ns);
    let client: ReturnType<typeof spawn> | undefined;
    let server: Awaited<ReturnType<typeof startTcpServer>> | undefined;
    try {
      await bind(old, [webSg]);
      await eventually(() => tcpProbe(db1.ns, old.address, 80), true, "db1 → old:80 (the web group)");
      // db1's long-lived connection to old:80, echoed every 100 ms; "R" when it is reset or closed.
      client = nodeIn(
        db1.ns,
        `const s=require("net").connect(80,"${old.address}");s.on("data",()=>process.stdout.write("e"));setInterval(()=>s.write("x"),100);const r=()=>process.stdout.write("R");s.on("error",r);s.on("close",r);setTimeout(()=>process.exit(0),20000)`,
        true,
      );
      let out = "";
      client.stdout!.on("data", (d) => (out += String(d)));
      assert.ok(await waitFor(() => out.length >= 5, { timeoutMs: 10_000 }), "the connection echoes");

      // DeleteVm's teardown (the vmm runs the two side by side), then a new VM at once, at the same address.
      await Promise.all([fw.unbindNic({ nicId: old.nicId, detaching: true }), h.removeVm(old)]);
      oldEcho.kill("SIGKILL");
      next = await h.vm(0, vpc, web1.subnet, "next", { address: old.address });
      server = await startTcpServer(next.ns, 5432, next.name);
      await bind(next, [dbSg]);
      const at = out;
      assert.doesNotMatch(at, /R/, "the old connection was not reset before the new VM existed");

      // The client keeps sending on the old connection: nothing reaches the new VM (it would reset it), nothing comes back.
      await sleep(2000);
      assert.equal(out, at, "no echo and no reset from the new VM: the old connection's packets were dropped as new, unallowed flows");
      // What the new VM's group allows works; the rest, new connections included, does not.
      assert.ok(await tcpProbe(web1.ns, next.address, 5432), "web1 → next:5432 (the db group)");
      assert.ok(!(await tcpProbe(db1.ns, next.address, 80, 800)), "db1 → next:80 blocked");
      assert.ok(!(await tcpProbe(db1.ns, next.address, 5432, 800)), "db1 → next:5432 blocked (db1 is no web member)");
    } finally {
      client?.kill("SIGKILL");
      oldEcho.kill("SIGKILL");
      await server?.stop();
      if (h.vms.has("old")) await h.removeVm(old).catch(() => {});
      if (next) {
        await fw.unbindNic({ nicId: next.nicId, detaching: true });
        await h.removeVm(next);
      }
    }
  });
});

describe("anti-spoofing", () => {
  test("a VM sending from a forged source address or MAC gets nothing through", async () => {
    await eventually(() => canPing(db1.ns, web1.address), true, "honest ping");
    // Forged IP: a second address on eth0, used as the source.
    await ipn(db1.ns, ["addr", "add", "10.0.2.99/24", "dev", "eth0"]);
    try {
      const r = await nsExec(db1.ns, "ping", ["-c", "3", "-i", "0.2", "-W", "1", "-I", "10.0.2.99", web1.address], { check: false });
      assert.match(r.stdout, / 0 received/, "spoofed source address must not get through");
      const forgedOther = await nsExec(db1.ns, "ping", ["-c", "3", "-i", "0.2", "-W", "1", "-I", "10.0.2.99", db1.gateway], { check: false });
      assert.match(forgedOther.stdout, / 0 received/, "not even to the gateway");
    } finally {
      await ipn(db1.ns, ["addr", "del", "10.0.2.99/24", "dev", "eth0"]);
    }
    // Forged MAC.
    await ipn(db1.ns, ["link", "set", "eth0", "address", "02:de:ad:be:ef:01"]);
    try {
      await ipn(db1.ns, ["neigh", "flush", "all"]);
      const r = await nsExec(db1.ns, "ping", ["-c", "3", "-i", "0.2", "-W", "1", web1.address], { check: false });
      assert.match(r.stdout, / 0 received/, "spoofed MAC must not get through");
    } finally {
      await ipn(db1.ns, ["link", "set", "eth0", "address", db1.mac]);
      await ipn(db1.ns, ["neigh", "flush", "all"]);
    }
    assert.ok(await canPing(db1.ns, web1.address), "honest traffic flows again");
    // Counted: the bridge table's "spoofed" counter, as the VPC's series (read at most every 5 s).
    const spoofed = async () => {
      const text = await (await fetch(`http://127.0.0.1:${fwd.metricsPort}/metrics`)).text();
      const line = text
        .split("\n")
        .find((l) => l.startsWith("microvpc_firewall_vpc_dropped_packets_total{") && l.includes('reason="spoofed"') && l.includes(`vpc="${db1.vpc.id}"`));
      return Number(line?.split(" ").pop() ?? 0);
    };
    assert.ok(await waitFor(async () => (await spoofed()) >= 6, { timeoutMs: 8000, intervalMs: 500 }), `the forged packets are counted (${await spoofed()})`);
  });
});

describe("network ACLs", () => {
  test("an ACL deny beats a security-group allow, and removing it restores traffic", async () => {
    await eventually(() => tcpProbe(db1.ns, web1.address, 80), true, "before the ACL");
    const acl = await fw.createNetworkAcl({
      vpc: web1.vpc.id,
      name: "web-acl",
      entries: [
        { ruleNumber: 100, direction: Direction.INGRESS, action: AclAction.DENY, protocol: Protocol.TCP, portFrom: 80, portTo: 80, cidr: "0.0.0.0/0" },
        { ruleNumber: 200, direction: Direction.INGRESS, action: AclAction.ALLOW, protocol: Protocol.ALL, cidr: "0.0.0.0/0" },
        { ruleNumber: 100, direction: Direction.EGRESS, action: AclAction.ALLOW, protocol: Protocol.ALL, cidr: "0.0.0.0/0" },
      ],
      subnets: [web1.subnet.id],
    });
    try {
      await eventually(() => tcpProbe(db1.ns, web1.address, 80, 800), false, "80 denied by the ACL although the group allows it");
      assert.ok(await tcpProbe(db1.ns, web1.address, 443), "443 still allowed (ACL rule 200, group)");
      assert.ok(await tcpProbe(web2.ns, web1.address, 80), "inside one subnet the ACL does not apply");
    } finally {
      await fw.disassociateNetworkAcl({ subnet: web1.subnet.id, vpc: web1.vpc.id });
      await fw.deleteNetworkAcl({ ref: acl.networkAcl!.id });
    }
    await eventually(() => tcpProbe(db1.ns, web1.address, 80), true, "after the ACL is gone");
  });
});

describe("robustness", () => {
  test("bad rules are refused with INVALID_ARGUMENT and nothing changes", async () => {
    const before = (await fw.getSecurityGroup({ ref: webSg })).securityGroup!;
    await rejectsWith(fw.updateSecurityGroup({ ref: webSg, addRules: [tcp(70000, "0.0.0.0/0")] }), Code.InvalidArgument, /port/);
    await rejectsWith(fw.updateSecurityGroup({ ref: webSg, addRules: [{ ...tcp(90, "0.0.0.0/0"), portTo: 80 }] }), Code.InvalidArgument);
    await rejectsWith(fw.updateSecurityGroup({ ref: webSg, addRules: [tcp(80, "10.0.0.0/33")] }), Code.InvalidArgument);
    await rejectsWith(fw.updateSecurityGroup({ ref: webSg, addRules: [tcp(80, "0.0.0.0/0; flush ruleset")] }), Code.InvalidArgument);
    await rejectsWith(fw.parseRules({ ingressRules: ["tcp:80:0.0.0.0/0; flush ruleset"] }), Code.InvalidArgument);
    await rejectsWith(fw.parseRules({ ingressRules: ["smtp:25:0.0.0.0/0"] }), Code.InvalidArgument);
    const after = (await fw.getSecurityGroup({ ref: webSg })).securityGroup!;
    assert.equal(after.generation, before.generation, "the group is unchanged");
    assert.ok(await tcpProbe(db1.ns, web1.address, 80), "and so is the data plane");
  });

  test("status reads back from the kernel: healthy, per-NIC counters", async () => {
    await tcpProbe(db1.ns, web1.address, 8080, 500);
    const st = await fw.getFirewallStatus({ nicIds: [web1.nicId] });
    assert.equal(st.lastError, "");
    // Every change this firewall heard of (the groups and bindings above) is in its tables (a pass may still be finishing).
    assert.ok(st.desiredGeneration > 0n, "the changes' generations were heard");
    const caughtUp = async () => {
      const g = await fw.getFirewallStatus({ nicIds: [] });
      return g.appliedGeneration === g.desiredGeneration;
    };
    assert.ok(await waitFor(caughtUp, { timeoutMs: 5000, intervalMs: 100 }), "and applied");
    const n = st.nics.find((x) => x.nicId === web1.nicId)!;
    assert.ok(n.ingress!.droppedPackets > 0n, "the blocked probe is counted as a drop");
    assert.ok(n.ingress!.acceptedPackets > 0n);
  });

  test("daemon SIGKILLed and restarted: forbidden traffic never gets through meanwhile", async () => {
    await eventually(() => tcpProbe(db1.ns, web1.address, 22, 500), false, "22 blocked before");
    let leaked = 0;
    let probes = 0;
    let stop = false;
    const prober = (async () => {
      while (!stop && probes < 200) {
        probes++;
        if (await tcpProbe(db1.ns, web1.address, 22, 300)) leaked++;
      }
    })();
    await fwd.stop("SIGKILL");
    await sleep(1000);
    await startFirewall();
    await sleep(1500);
    stop = true;
    await prober;
    assert.ok(probes >= 3, "probes ran during the restart");
    assert.equal(leaked, 0, "no forbidden connection succeeded during the restart");
    assert.ok(await tcpProbe(db1.ns, web1.address, 80), "allowed traffic still flows");
    const tables = await run("ip", ["netns", "exec", web1.vpcNs, "nft", "list", "tables"]);
    assert.match(tables.stdout, /table inet microvpc/);
  });

  test("a rule removed while the daemon is down: the restarted daemon cuts the connection it allowed, and new ones are refused", async () => {
    const rule = tcp(9092, "10.0.2.0/24");
    const echo = nodeIn(web1.ns, `require("net").createServer((s)=>{s.on("error",()=>{});s.pipe(s)}).listen(9092)`);
    await sleep(300);
    await fw.updateSecurityGroup({ ref: webSg, addRules: [rule] });
    await eventually(() => tcpProbe(db1.ns, web1.address, 9092), true, "db1 → web1:9092 (the new rule)");
    const client = nodeIn(
      db1.ns,
      `const s=require("net").connect(9092,"${web1.address}");s.on("data",()=>process.stdout.write("e"));setInterval(()=>s.write("x"),100);s.on("error",()=>{});setTimeout(()=>process.exit(0),20000)`,
      true,
    );
    let out = "";
    client.stdout!.on("data", (d) => (out += String(d)));
    const r = await connectReady({ url: h.redisUrl });
    let down = false;
    try {
      assert.ok(await waitFor(() => out.length >= 5, { timeoutMs: 10_000 }), "the connection echoes while the rule exists");
      await fwd.stop("SIGKILL");
      down = true;
      // Meanwhile another host's firewall daemon serves the API: here, the same service in-process.
      const elsewhere = createClient(
        FirewallService,
        createRouterTransport(
          (router) => router.service(FirewallService, new FirewallApi(new FirewallStore(r), new IpamStore(r), { hostId: "hvelsewhere" }).impl),
          {
            router: { interceptors: [mapDomainErrors] },
          },
        ),
      );
      await elsewhere.updateSecurityGroup({ ref: webSg, removeRules: [rule] });
      const during = out.length;
      await sleep(800);
      assert.ok(out.length > during, "with no firewall here, the table the dead daemon left still stands: the connection echoes on");
      await startFirewall();
      down = false;
      await sleep(2000);
      const at = out;
      await sleep(1200);
      assert.equal(out, at, "no echo once the restarted daemon applied the change: the open connection was cut");
      assert.ok(!(await tcpProbe(db1.ns, web1.address, 9092, 800)), "a new connection is refused");
      assert.ok(await tcpProbe(db1.ns, web1.address, 80), "what the group allows still flows");
    } finally {
      client.kill("SIGKILL");
      echo.kill("SIGKILL");
      if (down) await startFirewall();
      await fw.updateSecurityGroup({ ref: webSg, removeRules: [rule] }).catch(() => {});
      r.disconnect();
    }
  });
});
