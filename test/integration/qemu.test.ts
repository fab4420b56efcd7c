// Real guests under QEMU (kind=qemu), on TAPs netagent made, in one VPC on
// one simulated hypervisor, with the firewall and gateway daemons running.
// What is proved is what the guests' own tools report on their serial
// consoles (deploy/guest/init's MVPC-CHECK lines):
//   g1 (public subnet "web") pings its gateway; reaches g2's HTTP server on
//   port 80 (and reads its page); cannot connect to a port nothing listens
//   on; cannot reach a port g2 listens on but g2's security group closes;
//   reads its own instance-id from 169.254.169.254; reaches the "internet"
//   namespace, which sees the hypervisor's address (NAT);
//   g2 (private subnet "db", no NAT gateway) serves both ports (checked from
//   inside itself), reads its instance-id, and does not reach the internet.
// Skipped, with the reason, only when qemu-system-x86_64 is missing or the
// guest cannot be built (deploy/guest/build.sh, idempotent, runs first).
// KVM or TCG is the probe's answer (services/vmm/accel.ts): KVM only where
// KVM boots this guest to its init, so the suite passes where nested KVM
// cannot (TCG, with the reason), without /dev/kvm, and with working KVM.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, test } from "vitest";
import { Direction, FirewallService, Protocol } from "../../gen/microvpc/v1/firewall_pb.js";
import { GatewayService } from "../../gen/microvpc/v1/gateway_pb.js";
import { NicKind, type Nic } from "../../gen/microvpc/v1/netagent_pb.js";
import { SubnetType, type Subnet } from "../../gen/microvpc/v1/subnet_pb.js";
import type { Vpc } from "../../gen/microvpc/v1/vpc_pb.js";
import { grpcClient } from "../../services/common/client.js";
import { qemuAccel, type AccelDecision } from "../../services/vmm/accel.js";
import { adoptQemu, guestCmdline, guestImage, parseGuestConsole, QEMU_BIN, startQemu, type GuestReport, type VmProcess } from "../../services/vmm/qemu.js";
import { ROOT, type Daemon } from "../lib/daemon.js";
import { Harness } from "../lib/harness.js";
import { linkNames, processesWith, tempDir, trackChild } from "../lib/netns.js";

const GUEST_DIR = process.env.MICROVPC_GUEST_DIR || "/var/cache/microvpc/guest";

function sh(file: string, args: string[], timeoutMs: number): Promise<{ code: number; out: string }> {
  return new Promise((resolve) => {
    execFile(file, args, { timeout: timeoutMs, killSignal: "SIGKILL", env: { ...process.env, MICROVPC_GUEST_DIR: GUEST_DIR } }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === "number" ? err.code : 1) : 0, out: `${stdout}${stderr}` });
    });
  });
}

/** Why the test cannot run here, or false. Builds the guest (a no-op when it is up to date). */
async function prerequisites(): Promise<string | false> {
  if ((await sh("sh", ["-c", `command -v ${QEMU_BIN}`], 5000)).code !== 0) return `${QEMU_BIN} is not installed (apt-get install qemu-system-x86)`;
  const t0 = Date.now();
  const b = await sh("bash", [join(ROOT, "deploy", "guest", "build.sh")], 300_000);
  if (b.code !== 0) return `the guest could not be built (deploy/guest/build.sh): ${b.out.trim().split("\n").slice(-3).join(" | ")}`;
  buildMs = Date.now() - t0;
  return guestImage(GUEST_DIR) ? false : `deploy/guest/build.sh left no guest in ${GUEST_DIR}`;
}
let buildMs = 0;
const skip = await prerequisites();
if (skip) console.log(`# skipped: ${skip}`);

describe.skipIf(skip)("real guests under QEMU on netagent's TAPs", { timeout: 150_000 }, () => {
  let h: Harness;
  let fwd: Daemon, gwd: Daemon;
  let vpc: Vpc, web: Subnet, db: Subnet;
  let hostAddr: string;
  let inetAddr: string;
  let logs: string;
  const vms: VmProcess[] = [];
  const nics: Nic[] = [];
  let g1: { vm: VmProcess; nic: Nic; report: GuestReport; bootMs: number };
  let g2: { vm: VmProcess; nic: Nic; report: GuestReport; bootMs: number };
  let accel: AccelDecision;

  /** An address from IPAM and a TAP NIC on hypervisor 0. */
  async function tapNic(subnet: Subnet, name: string, address: string): Promise<Nic> {
    const hv = h.hosts[0];
    const owner = `vm-${name}`;
    const addr = await h.allocate(subnet, owner, address);
    const nic = (
      await hv.agent.attachNic({
        vpc: vpc.id,
        subnet: subnet.id,
        kind: NicKind.TAP,
        options: { case: "tap", value: {} },
        address: addr,
        owner,
        hostname: name,
        guestInterface: "eth0",
      })
    ).nic!;
    nics.push(nic);
    return nic;
  }

  async function boot(name: string, nic: Nic, o: { checks?: string[]; listen?: number[] }): Promise<VmProcess> {
    const img = guestImage(GUEST_DIR)!;
    const vm = await startQemu({
      netns: nic.vpcNetnsPath,
      tap: nic.hostInterface,
      mac: nic.guest!.mac,
      ...img,
      // If this run dies without stopping them, the guests power off by themselves.
      cmdline: guestCmdline({ ipArg: nic.guest!.kernelIpArg, ttlSeconds: 600, ...o }),
      vcpus: 1,
      memoryMib: 256,
      consoleLog: join(logs, `${name}.log`),
      name: `mvpc-test-${name}`,
    });
    trackChild(vm.proc!);
    vms.push(vm);
    return vm;
  }

  beforeAll(async () => {
    accel = await qemuAccel();
    h = await Harness.start({ hosts: 1 });
    logs = tempDir("qemu");
    const hv = h.hosts[0];
    hostAddr = hv.underlayAddress;
    inetAddr = (await h.internet()).address;
    ({ fwd, gwd } = await h.hostServices(hv, { driftMs: 3000 }));
    const fw = grpcClient(FirewallService, { address: fwd.address, timeoutMs: 20_000 });
    const gw = grpcClient(GatewayService, { address: gwd.address, timeoutMs: 20_000 });

    vpc = await h.vpc("qemu", "10.0.0.0/16");
    web = await h.subnet(vpc, "web", "10.0.1.0/24", SubnetType.PUBLIC);
    db = await h.subnet(vpc, "db", "10.0.2.0/24", SubnetType.PRIVATE);
    await hv.agent.ensureVpc({ vpc: vpc.id });
    const n1 = await tapNic(web, "g1", "10.0.1.10");
    const n2 = await tapNic(db, "g2", "10.0.2.20");
    // g2's group: HTTP on 80 from the VPC; 8080 (where g2 also listens) stays closed.
    const sg = (
      await fw.createSecurityGroup({
        vpc: vpc.id,
        name: "db",
        rules: [{ direction: Direction.INGRESS, protocol: Protocol.TCP, portFrom: 80, portTo: 80, peer: { case: "cidr", value: "10.0.0.0/16" } }],
      })
    ).securityGroup!.id;
    for (const [nic, subnet, groups] of [
      [n1, web, []],
      [n2, db, [sg]],
    ] as const) {
      await fw.bindNic({
        nicId: nic.id,
        vpc: vpc.id,
        subnet: subnet.id,
        address: nic.guest!.address,
        mac: nic.guest!.mac,
        hostInterface: nic.hostInterface,
        securityGroups: [...groups],
      });
      await gw.setInstanceMetadata({
        metadata: { instanceId: `i-${nic.owner}`, vpcId: vpc.id, subnetId: subnet.id, localIpv4: nic.guest!.address, mac: nic.guest!.mac, hostname: nic.owner },
      });
    }

    // g2 first: g1's checks need its server. Expected failures get one try.
    const t2 = Date.now();
    const vm2 = await boot("g2", n2, {
      listen: [80, 8080],
      checks: ["http:127.0.0.1:8080/", "http:169.254.169.254/latest/meta-data/instance-id", `http:${inetAddr}/~1`],
    });
    await vm2.waitFor(/MVPC-LISTEN 8080/, 60_000);
    const boot2 = Date.now() - t2;
    const t1 = Date.now();
    const vm1 = await boot("g1", n1, {
      checks: [
        "ping:10.0.1.1",
        "tcp:10.0.2.20:80",
        "http:10.0.2.20/",
        "tcp:10.0.2.20:81~1",
        "tcp:10.0.2.20:8080~1",
        "http:169.254.169.254/latest/meta-data/instance-id",
        `http:${inetAddr}/`,
      ],
    });
    await vm1.waitFor(/MVPC-NET /, 60_000);
    const boot1 = Date.now() - t1;
    await Promise.all([vm1.waitFor(/MVPC-DONE/, 90_000), vm2.waitFor(/MVPC-DONE/, 90_000)]);
    g1 = { vm: vm1, nic: n1, report: parseGuestConsole(vm1.console()), bootMs: boot1 };
    g2 = { vm: vm2, nic: n2, report: parseGuestConsole(vm2.console()), bootMs: boot2 };
  });

  afterAll(async () => {
    await Promise.all(vms.map((vm) => vm.stop().catch(() => undefined)));
    await gwd?.stop();
    await fwd?.stop();
    const left = await h?.close();
    assert.deepEqual(left ?? [], []);
  });

  function check(g: { report: GuestReport }, kind: string, target: string) {
    const c = g.report.checks.find((x) => x.kind === kind && x.target === target);
    assert.ok(c, `no MVPC-CHECK ${kind} ${target} in ${JSON.stringify(g.report.checks)}`);
    return c;
  }

  test("both guests boot and configure eth0 from netagent's ip= argument, with netagent's MAC", async (t) => {
    await t.annotate(
      `accel ${accel.accel} (${accel.reason}); guest build ${buildMs} ms; network up after start: g2 ${g2.bootMs} ms (with its servers), g1 ${g1.bootMs} ms`,
    );
    for (const g of [g1, g2]) {
      assert.deepEqual(
        g.report.net,
        { device: "eth0", address: `${g.nic.guest!.address}/24`, gateway: g.nic.guest!.gateway, mac: g.nic.guest!.mac },
        g.vm.console(),
      );
      assert.equal(g.report.done, true);
    }
    assert.deepEqual(g2.report.listening, [80, 8080]);
  });

  test("the guests run under the accelerator the probe chose, which says why", () => {
    assert.match(accel.accel, /^(kvm|tcg)$/);
    assert.ok(accel.reason.length > 0, "a reason");
    const forced = process.env.MICROVPC_QEMU_ACCEL;
    if (forced === "kvm" || forced === "tcg") assert.deepEqual([accel.accel, accel.reason], [forced, "forced by MICROVPC_QEMU_ACCEL"]);
    else if (accel.accel === "kvm") assert.match(accel.reason, /reached init under KVM/);
    for (const g of [g1, g2]) {
      const argv = readFileSync(`/proc/${g.vm.pid}/cmdline`, "utf8").split("\0");
      assert.equal(argv[argv.indexOf("-accel") + 1], accel.accel);
    }
  });

  test("g1 pings its gateway and reaches g2's server in the other subnet", () => {
    assert.ok(check(g1, "ping", "10.0.1.1").ok, "ping the gateway");
    assert.ok(check(g1, "tcp", "10.0.2.20:80").ok, "TCP to g2:80");
    assert.equal(check(g1, "http", "10.0.2.20/").body, "microvpc guest g2", "g2's page");
  });

  test("g1 cannot reach a port nothing listens on, nor one g2's security group closes", () => {
    assert.equal(check(g1, "tcp", "10.0.2.20:81").status, "fail", "nothing listens on 81");
    assert.equal(check(g2, "http", "127.0.0.1:8080/").body, "microvpc guest g2", "g2 does listen on 8080");
    assert.equal(check(g1, "tcp", "10.0.2.20:8080").status, "fail", "the group closes 8080");
  });

  test("each guest reads its own instance-id from 169.254.169.254", () => {
    assert.equal(check(g1, "http", "169.254.169.254/latest/meta-data/instance-id").body, "i-vm-g1");
    assert.equal(check(g2, "http", "169.254.169.254/latest/meta-data/instance-id").body, "i-vm-g2");
  });

  test("the internet: g1 (public subnet) gets there seen as the hypervisor (NAT); g2 (private, no NAT gateway) does not", () => {
    assert.equal(check(g1, "http", `${inetAddr}/`).body, hostAddr);
    assert.equal(check(g2, "http", `${inetAddr}/`).status, "fail");
  });

  test("a TAP that is not there, or one QEMU cannot open: startQemu fails with the reason and leaves no process", async () => {
    const img = guestImage(GUEST_DIR)!;
    const opts = (tap: string, name: string) => ({
      netns: nics[0].vpcNetnsPath,
      tap,
      mac: "02:00:00:00:00:01",
      ...img,
      cmdline: guestCmdline({ ipArg: "ip=10.0.1.99::10.0.1.1:255.255.255.0:x:eth0:off" }),
      vcpus: 1,
      memoryMib: 128,
      consoleLog: join(logs, `${name}.log`),
      name,
    });
    // Left to itself QEMU (as root) would create the missing TAP, on no bridge.
    await assert.rejects(startQemu(opts("tnosuchtap0", "mvpc-test-bad1")), /TAP tnosuchtap0 does not exist in .*AttachNic/);
    const vpcNs = h.hosts[0].vpcNamespace(vpc.id);
    assert.ok(!(await linkNames(vpcNs)).includes("tnosuchtap0"));
    // g1's TAP is held by g1's QEMU: the second QEMU exits at start.
    await assert.rejects(startQemu(opts(nics[0].hostInterface, "mvpc-test-bad2")), /QEMU exited at start.*(busy|tap)/is);
    // Their console logs are in this test's own folder: no other QEMU on the machine has that path.
    for (const name of ["mvpc-test-bad1", "mvpc-test-bad2"]) assert.deepEqual(processesWith(join(logs, `${name}.log`)), [], `${name} left running`);
    assert.ok(!g1.vm.exited(), "g1 is unharmed");
  });

  test("a restarted vmm adopts its QEMU by PID and -name (never another process), and stops it", async () => {
    assert.equal(adoptQemu(g2.vm.pid, "mvpc-test-g1", g2.vm.consoleLog), null, "wrong name");
    assert.equal(adoptQemu(process.pid, "mvpc-test-g2", g2.vm.consoleLog), null, "not a QEMU");
    const again = adoptQemu(g2.vm.pid, "mvpc-test-g2", g2.vm.consoleLog);
    assert.ok(again && !again.exited());
    assert.match(await again.waitFor(/MVPC-DONE/, 1000), /^MVPC-DONE$/);
    const line = await again.waitFor(/MVPC-NET /, 1000);
    assert.match(line, /MVPC-NET eth0 10\.0\.2\.20\/24 /, JSON.stringify(line));
    assert.ok(!line.includes("\x1b"), `the line, without the firmware's escapes: ${JSON.stringify(line)}`);
    await again.stop();
    assert.ok(again.exited());
    for (let i = 0; i < 50 && !g2.vm.exited(); i++) await new Promise((r) => setTimeout(r, 20));
    assert.ok(g2.vm.exited());
  });

  test("stop ends QEMU by PID; the TAPs stay until DetachNic removes them", async () => {
    const vpcNs = h.hosts[0].vpcNamespace(vpc.id);
    for (const vm of vms) {
      await vm.stop();
      assert.ok(vm.exited());
    }
    const before = await linkNames(vpcNs);
    for (const nic of nics) assert.ok(before.includes(nic.hostInterface), `${nic.hostInterface} still there`);
    for (const nic of nics) await h.hosts[0].agent.detachNic({ nic: nic.id });
    const left = await linkNames(vpcNs);
    for (const nic of nics) assert.ok(!left.includes(nic.hostInterface), `${nic.hostInterface} removed`);
    assert.deepEqual(await h.rootChanges(), []);
  });
});
