// Records read back from Redis are input. A simulated hypervisor runs the
// gateway and the firewall with one good floating IP and security group;
// hostile records are then written straight into Redis (as a compromised
// hypervisor sharing the Redis password could): a floating IP whose address
// carries `ip -batch` lines, a port forward and a rule whose ports carry nft
// syntax, a binding, a DNS config and an IMDS hop limit doing the same.
// Nothing reaches a command (no marker file, no default route, no injected
// table), the metric counts them, and the host keeps converging: the good
// floating IP still reaches the VM on the port its group allows, a port the
// group does not allow stays closed, and a port forward made afterwards works;
// a NIC whose binding was refused is shut, not opened.
// Against the code before records were checked (2754869) the same records
// created the marker file (a command run as root through `ip -batch`), put a
// default route via 6.6.6.6 on the host, inserted an nft rule opening port 22,
// and the bad port forward and hop limit failed every gateway pass.
import assert from "node:assert/strict";
import { existsSync, rmSync } from "node:fs";
import { Code } from "@connectrpc/connect";
import type { Redis } from "ioredis";
import { afterAll, beforeAll, describe, test } from "vitest";
import { Direction, FirewallService, Protocol } from "../../gen/microvpc/v1/firewall_pb.js";
import { GatewayService } from "../../gen/microvpc/v1/gateway_pb.js";
import { SubnetType } from "../../gen/microvpc/v1/subnet_pb.js";
import { grpcClient } from "../../services/common/client.js";
import { emit } from "../../services/common/events.js";
import { dnsKeys } from "../../services/dns/schema.js";
import { fwKeys } from "../../services/firewall/keys.js";
import { gwKeys } from "../../services/gateway/schema.js";
import { rejectsWith } from "../lib/clients.js";
import { type Daemon } from "../lib/daemon.js";
import { bindRequest, Harness, type Vm } from "../lib/harness.js";
import { httpGet, nsExec, startHttpServer, tcpProbe, waitFor } from "../lib/netns.js";

let h: Harness;
let gwd: Daemon;
let fwd: Daemon;
let gw: ReturnType<typeof grpcClient<typeof GatewayService>>;
let fw: ReturnType<typeof grpcClient<typeof FirewallService>>;
let redis: Redis;
let inet: { ns: string; address: string };
let pub: Vm, other: Vm;
let hvNs: string;
let hostAddr: string;
let fipAddr: string;
let sgWeb: string;
const markers = [1, 2, 3, 4].map((i) => `/tmp/mvpc-hostile-${process.pid}-${Date.now()}-${i}`);

async function eventually(probe: () => Promise<boolean>, what: string, timeoutMs = 12_000): Promise<void> {
  assert.ok(await waitFor(probe, { timeoutMs, intervalMs: 250 }), what);
}

/** Sum of microvpc_invalid_records_total samples of a daemon with these labels. */
async function invalidCount(d: Daemon, owner: string, kind: string): Promise<number> {
  const res = await fetch(`http://127.0.0.1:${d.metricsPort}/metrics`);
  let n = 0;
  for (const line of (await res.text()).split("\n")) {
    if (!line.startsWith("microvpc_invalid_records_total{")) continue;
    if (line.includes(`owner="${owner}"`) && line.includes(`kind="${kind}"`)) n += Number(line.split(" ").pop());
  }
  return n;
}

const ruleset = async (ns: string) => (await nsExec(ns, "nft", ["list", "ruleset"])).stdout;

beforeAll(async () => {
  for (const m of markers) rmSync(m, { force: true });
  h = await Harness.start({ hosts: 1 });
  const hv = h.hosts[0];
  hvNs = hv.ns;
  hostAddr = hv.underlayAddress;
  inet = await h.internet();
  ({ fwd, gwd } = await h.hostServices(hv, { driftMs: 3000 }));
  gw = grpcClient(GatewayService, { address: gwd.address, timeoutMs: 20_000 });
  fw = grpcClient(FirewallService, { address: fwd.address, timeoutMs: 20_000 });
  redis = await h.connectReady();

  const vpc = await h.vpc("hostile", "10.0.0.0/16");
  const web = await h.subnet(vpc, "web", "10.0.1.0/24", SubnetType.PUBLIC);
  pub = await h.vm(0, vpc, web, "pub");
  other = await h.vm(0, vpc, web, "other");
  sgWeb = (
    await fw.createSecurityGroup({
      vpc: vpc.id,
      name: "web",
      rules: [{ direction: Direction.INGRESS, protocol: Protocol.TCP, portFrom: 80, portTo: 80, peer: { case: "cidr", value: "0.0.0.0/0" } }],
    })
  ).securityGroup!.id;
  for (const vm of [pub, other]) {
    await fw.bindNic(bindRequest(vm, [sgWeb]));
  }
  await startHttpServer(pub.ns, "web of pub", 80);
  await startHttpServer(pub.ns, "ssh-ish", 22);
  const fip = (await gw.allocateFloatingIp({})).floatingIp!;
  fipAddr = fip.address;
  await gw.associateFloatingIp({ floatingIp: fip.id, vpc: vpc.id, privateAddress: pub.address });
  await eventually(
    async () => (await httpGet(inet.ns, `http://${fipAddr}/`, 1000)) === "web of pub",
    "the good floating IP reaches the VM before the hostile records",
  );
  await eventually(
    async () => (await httpGet(other.ns, `http://${inet.address}/`, 1000)) !== null,
    "other reaches the internet (default egress) before its binding is spoiled",
  );
}, 60_000);

afterAll(async () => {
  redis?.disconnect();
  await gwd?.stop();
  await fwd?.stop();
  for (const m of markers) rmSync(m, { force: true });
  const left = await h?.close();
  assert.deepEqual(left ?? [], []);
}, 30_000);

describe("hostile records written straight into Redis", () => {
  test("reach no command, are counted, and the host keeps converging", async () => {
    const vpcId = pub.vpc.id;
    const hvId = h.hosts[0].id;
    // Payloads that make every line valid, so that before the records were
    // checked `ip -force -batch` ran them all (the route line, then the neigh line).
    const touch = (m: string) => `netns exec ${hvNs} /bin/touch ${m}`;
    const now = String(Date.now());
    // Where this Redis keeps each record (a single Redis's names, or a cluster's hash-tagged ones).
    const G = gwKeys(redis);
    const F = fwKeys(redis);
    const D = dnsKeys(redis);
    // To the streams the VPC's and the host's daemons follow (and the global one).
    const ev = (kind: string) => emit(redis, { vpcs: [vpcId], hosts: [hvId] }, ["kind", kind, "vpc", vpcId, "gen", "0"]);

    // Gateway: floating IPs whose address carries ip -batch lines (the route
    // and neigh lines of the host namespace), a port forward whose port
    // carries nft syntax, and an IMDS hop limit doing the same.
    const fipRec = (id: string, address: string) =>
      redis
        .multi()
        .hset(G.fip(id), {
          id,
          address,
          vpc: vpcId,
          private: pub.address,
          nic: pub.nicId,
          host: hvId,
          description: "",
          allocated: now,
          associated: now,
        })
        .zadd(G.fips, 0, id)
        .exec();
    await fipRec("fip-aaaaaaaaaaa1", "192.168.100.141 dev ul0\nroute replace default via 6.6.6.6 onlink dev ul0\nroute replace 192.168.100.143");
    await fipRec("fip-aaaaaaaaaaa2", `192.168.100.142 dev ul0\n${touch(markers[0])}\nroute replace 192.168.100.144`);
    // A key of the wrong Redis type: it used to fail every read of the list.
    await redis.multi().set(G.fip("fip-aaaaaaaaaaa5"), "not a hash").zadd(G.fips, 0, "fip-aaaaaaaaaaa5").exec();
    await redis
      .multi()
      .hset(G.pf("pf-aaaaaaaaaaa3"), {
        id: "pf-aaaaaaaaaaa3",
        vpc: vpcId,
        proto: "tcp",
        host: hvId,
        outside: "9090",
        private: pub.address,
        private_port: "22 }; add table ip pwned_pf { }; #",
        nic: pub.nicId,
        description: "",
        created: now,
      })
      .zadd(G.pfs, 0, "pf-aaaaaaaaaaa3")
      .exec();
    // The host's slot, not the port forwards' (one MULTI names one slot on a cluster).
    await redis.hset(`mvpc-md:{host:${hvId}}:hop`, `${vpcId}/${pub.address}`, "1 }; add table ip pwned_hop { }; #");
    // DNS: a resolver address that reaches `ip addr` and nft in the VPC namespace.
    await redis.hset(D.config(vpcId), "resolver", `10.0.0.2/32 dev lo\n${touch(markers[1])}\naddr replace 10.0.0.3`);
    await ev("gw.fip.associated");

    // Firewall: pub's binding names a second group whose rules carry nft
    // syntax in a port and a CIDR; other's binding carries it in its interface name.
    const bad = "sg-bbbbbbbbbbb1";
    await redis.hset(F.sg(vpcId, bad), {
      id: bad,
      vpc: vpcId,
      name: "bad",
      description: "",
      labels: "[]",
      rules: JSON.stringify([
        // Each would open port 22 to everyone: a rule inserted at the top of the forward chain.
        {
          dir: "ingress",
          proto: "tcp",
          portFrom: `22-22 }\ninsert rule inet microvpc forward tcp dport 22 accept comment "pwned_rule"\nadd element inet microvpc sg_${bad.slice(-12)}_in_ports { 0.0.0.0/0 . tcp . 23`,
          portTo: 23,
          cidr: "0.0.0.0/0",
          description: "",
        },
        {
          dir: "ingress",
          proto: "tcp",
          portFrom: 25,
          portTo: 25,
          cidr: `0.0.0.0/0 . tcp . 24 }\ninsert rule inet microvpc forward tcp dport 22 accept comment "pwned_cidr"\nadd element inet microvpc sg_${bad.slice(-12)}_in_ports { 0.0.0.0/0`,
          description: "",
        },
      ]),
      peers: "",
      logging: "",
      gen: "1",
      created: now,
      updated: now,
    });
    const pubSig = JSON.parse((await redis.hget(F.nic(pub.nicId), "sig"))!);
    const wrongType = "sg-bbbbbbbbbbb2";
    await redis.set(F.sg(vpcId, wrongType), "not a hash");
    await redis.hset(F.nic(pub.nicId), {
      sig: JSON.stringify({ ...pubSig, groupIds: [sgWeb, bad, wrongType] }),
      groups: `${sgWeb},${bad},${wrongType}`,
    });
    const otherSig = JSON.parse((await redis.hget(F.nic(other.nicId), "sig"))!);
    await redis.hset(
      F.nic(other.nicId),
      "sig",
      JSON.stringify({ ...otherSig, hostIf: `${other.hostInterface}\n${touch(markers[2])}`, mac: `${other.mac}" } ; add table bridge pwned_bind { } ; #` }),
    );
    // Written as the NIC's own host would (its host-scoped copy agrees), so
    // that the parser meets them; a binding rewritten by another host is
    // refused before parsing (redis-acl.test.ts).
    for (const vm of [pub, other]) {
      await redis.hset(F.hostSigs(vm.host.id), vm.nicId, (await redis.hget(F.nic(vm.nicId), "sig"))!);
    }
    await ev("fw.binding.changed");

    // Counted (each once), by the daemon that read them.
    await eventually(
      async () =>
        (await invalidCount(gwd, "gateway", "fip")) >= 2 &&
        (await invalidCount(gwd, "gateway", "pf")) >= 1 &&
        (await invalidCount(gwd, "gateway", "imds-hop")) >= 1,
      "the gateway counts the bad floating IPs, port forward and hop limit",
    );
    await eventually(async () => (await invalidCount(gwd, "dns", "config")) >= 1, "the gateway counts the bad DNS config");
    await eventually(async () => (await invalidCount(gwd, "gateway", "fip")) >= 3, "the gateway counts the floating IP key of the wrong type");
    await eventually(
      async () =>
        (await invalidCount(fwd, "firewall", "security-group")) >= 1 &&
        (await invalidCount(fwd, "firewall", "binding")) >= 1 &&
        (await invalidCount(fwd, "firewall", "key")) >= 1,
      "the firewall counts the bad group, binding and key of the wrong type",
    );

    // Shown in the firewall's status, with the reason naming the field.
    const st = await fw.getFirewallStatus({});
    assert.ok(
      st.invalidRecords.some((r) => r.kind === "security-group" && r.key.includes(bad) && /rules\[0\]\.port_from/.test(r.reason)),
      JSON.stringify(st.invalidRecords.map((r) => [r.kind, r.reason])),
    );
    assert.ok(st.invalidRecords.some((r) => r.kind === "binding" && r.key.includes(other.nicId)));
    // With the VPC whose pass refused them and the field, as the gateway's below.
    const sgRec = st.invalidRecords.find((r) => r.kind === "security-group" && r.key.includes(bad) && r.vpc === vpcId);
    assert.ok(sgRec, JSON.stringify(st.invalidRecords.map((r) => [r.kind, r.key, r.field, r.vpc])));
    assert.equal(sgRec.field, "rules");
    const bindRec = st.invalidRecords.find((r) => r.kind === "binding" && r.key.includes(other.nicId) && r.vpc === vpcId);
    assert.equal(bindRec?.field, "sig");

    // Shown in the gateway's status, per VPC: key, field and a reason naming the field.
    const gs = await gw.getGatewayStatus({});
    const show = JSON.stringify(gs.invalidRecords.map((r) => [r.owner, r.kind, r.key, r.field, r.vpc, r.reason]));
    assert.equal(gs.hostId, hvId);
    assert.equal(gs.invalidRecordCount, gs.invalidRecords.length, show);
    const rec = (kind: string, key: string) => gs.invalidRecords.find((r) => r.kind === kind && r.key === key);
    for (const id of ["fip-aaaaaaaaaaa1", "fip-aaaaaaaaaaa2"]) {
      const r = rec("fip", G.fip(id));
      assert.ok(r, `${id} in ${show}`);
      assert.deepEqual([r.owner, r.field, r.vpc], ["gateway", "address", vpcId], show);
      assert.match(r.reason, /^address: /);
      assert.ok(r.firstSeenTime && r.lastSeenTime);
    }
    const wrong = rec("fip", G.fip("fip-aaaaaaaaaaa5"));
    assert.ok(wrong, show);
    assert.deepEqual([wrong.field, wrong.vpc, wrong.reason], ["", "", "is not a hash"], "a key of the wrong type: no field, no VPC known");
    const pf = rec("pf", G.pf("pf-aaaaaaaaaaa3"));
    assert.ok(pf, show);
    assert.equal(pf.vpc, vpcId);
    assert.match(pf.reason, /private_port/);
    const hop = rec("imds-hop", `mvpc-md:{host:${hvId}}:hop`);
    assert.ok(hop, show);
    assert.deepEqual([hop.field, hop.vpc], [`${vpcId}/${pub.address}`, vpcId], show);
    await eventually(async () => {
      const d = (await gw.getGatewayStatus({})).invalidRecords.find((r) => r.owner === "dns" && r.kind === "config");
      return d?.vpc === vpcId && d.key === D.config(vpcId) && d.field === "resolver";
    }, "the bad DNS config, with its VPC and field");
    // One VPC's records only; another VPC has none.
    const only = await gw.getGatewayStatus({ vpc: vpcId });
    assert.ok(
      only.invalidRecords.length >= 5 && only.invalidRecords.every((r) => r.vpc === vpcId),
      JSON.stringify(only.invalidRecords.map((r) => [r.kind, r.key, r.vpc])),
    );
    assert.equal((await gw.getGatewayStatus({ vpc: "vpc-000000000000" })).invalidRecordCount, 0);
    await rejectsWith(gw.getGatewayStatus({ vpc: "vpc-x\nmvpc" }), Code.InvalidArgument);

    // The host keeps converging: a port forward made now is applied.
    await gw.createPortForward({ vpc: vpcId, protocol: Protocol.TCP, outsidePort: 8080, privateAddress: pub.address, privatePort: 80 });
    await eventually(
      async () => (await httpGet(inet.ns, `http://${hostAddr}:8080/`, 1000)) === "web of pub",
      "a port forward made after the hostile records works",
    );

    // The good floating IP still reaches the VM on the port its group allows; 22 stays closed.
    assert.equal(await httpGet(inet.ns, `http://${fipAddr}/`, 1500), "web of pub");
    assert.equal(await tcpProbe(inet.ns, fipAddr, 22, 800), false, "port 22 (not allowed by the group, named by the bad one) stays closed");
    assert.equal(await tcpProbe(inet.ns, hostAddr, 9090, 800), false, "the bad port forward was not applied");

    // Fail closed: the NIC whose binding was refused is not opened, it is shut (egress too).
    await eventually(async () => (await httpGet(other.ns, `http://${inet.address}/`, 800)) === null, "a NIC with a refused binding allows nothing");

    // Nothing reached a command.
    for (const m of markers) assert.equal(existsSync(m), false, `${m} was created: a record ran a command`);
    const routes = (await nsExec(hvNs, "ip", ["route", "show", "table", "all"])).stdout;
    assert.doesNotMatch(routes, /6\.6\.6\.6/, "no route via 6.6.6.6");
    assert.doesNotMatch((await nsExec(hvNs, "ip", ["route", "show", "default"])).stdout, /6\.6\.6\.6/);
    for (const ns of [hvNs, pub.vpcNs]) {
      const rs = await ruleset(ns);
      assert.doesNotMatch(rs, /pwned/, `no injected table in ${ns}`);
      assert.doesNotMatch(rs, /192\.168\.100\.14[12]/, `no bad floating IP in ${ns}`);
    }
    assert.doesNotMatch((await nsExec(pub.vpcNs, "ip", ["addr", "show", "dev", "lo"])).stdout, /10\.0\.0\.2\/32 dev/);

    // A metadata record the gateway's metadata child refuses (it runs in the
    // host namespace, a process of its own) is in the gateway's status too.
    const imds = () => httpGet(pub.ns, "http://169.254.169.254/latest/meta-data/instance-id", 1500);
    await gw.setInstanceMetadata({
      metadata: { instanceId: "i-hostile-pub", vpcId, subnetId: pub.subnet.id, localIpv4: pub.address, mac: pub.mac, hostname: "pub" },
    });
    await eventually(async () => (await imds()) === "i-hostile-pub", "pub reads its metadata");
    await redis.hset(`mvpc-md:{host:${hvId}}:inst:i-hostile-pub`, "pb", "not base64 \n }");
    await redis.hincrby(`mvpc-md:{host:${hvId}}:inst:i-hostile-pub`, "rev", 1);
    await eventually(async () => (await imds()) === null, "a refused metadata record is served as none");
    await eventually(async () => {
      const r = (await gw.getGatewayStatus({ vpc: vpcId })).invalidRecords.find((x) => x.kind === "imds-metadata");
      return r?.key === `mvpc-md:{host:${hvId}}:inst:i-hostile-pub` && r.field === "pb" && r.vpc === vpcId && /^pb: /.test(r.reason);
    }, "the metadata child's refused record, in the gateway's status");
  }, 60_000);
});
