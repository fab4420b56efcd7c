// kind=qemu's pure parts: QEMU's argument list, the namespace wrapper, the
// guest's kernel command line, ip= parsing, and the guest console parser.
import assert from "node:assert/strict";
import { test } from "vitest";
import { kernelIpArg, prefixToNetmask, type NicSpec } from "../../services/netagent/plan.js";
import {
  guestCmdline,
  inNetns,
  MAX_CMDLINE,
  parseGuestConsole,
  parseKernelIpArg,
  qemuArgv,
  stripEscapes,
  validateQemuOptions,
  type QemuOptions,
} from "../../services/vmm/qemu.js";

const IP = "ip=10.0.1.4::10.0.1.1:255.255.255.0:web-1:eth0:off:10.0.1.2";
const base: QemuOptions = {
  netns: "/run/netns/mvpc-hv1-vpc-111111111111",
  tap: "tbbbbbbbbbbbb",
  mac: "02:AA:0a:00:01:04",
  kernel: "/var/cache/microvpc/guest/vmlinuz",
  initrd: "/var/cache/microvpc/guest/initrd.img",
  cmdline: `console=ttyS0 ${IP}`,
  vcpus: 1,
  memoryMib: 256,
  consoleLog: "/run/microvpc/vms/vm-1/console.log",
};

/** The value after a flag (the first occurrence). */
function opt(argv: string[], flag: string, nth = 0): string | undefined {
  const idx = argv.flatMap((a, i) => (a === flag ? [i] : []))[nth];
  return idx === undefined ? undefined : argv[idx + 1];
}

test("qemuArgv: q35 under TCG, no defaults, no display, no reboot; kernel, initrd and command line as single arguments", () => {
  const a = qemuArgv({ ...base, accel: "tcg" });
  assert.equal(opt(a, "-M"), "q35");
  assert.equal(opt(a, "-accel"), "tcg");
  assert.ok(!a.includes("-cpu"), "TCG keeps QEMU's default CPU model");
  for (const f of ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]) assert.ok(a.includes(f), f);
  assert.equal(opt(a, "-display"), "none");
  assert.equal(opt(a, "-smp"), "1");
  assert.equal(opt(a, "-m"), "256");
  assert.equal(opt(a, "-kernel"), base.kernel);
  assert.equal(opt(a, "-initrd"), base.initrd);
  assert.equal(opt(a, "-append"), base.cmdline);
  assert.equal(opt(a, "-name"), "microvpc-tbbbbbbbbbbbb");
});

test("qemuArgv: the console to a file, QMP on a socket, the TAP by name, virtio-net with the NIC's MAC", () => {
  const a = qemuArgv({ ...base, accel: "tcg" });
  assert.equal(opt(a, "-chardev", 0), "file,id=con0,path=/run/microvpc/vms/vm-1/console.log");
  assert.equal(opt(a, "-serial"), "chardev:con0");
  assert.equal(opt(a, "-chardev", 1), "socket,id=qmp0,path=/run/microvpc/vms/vm-1/console.log.qmp,server=on,wait=off");
  assert.equal(opt(a, "-mon"), "chardev=qmp0,mode=control");
  assert.equal(opt(a, "-netdev"), "tap,id=n0,ifname=tbbbbbbbbbbbb,script=no,downscript=no");
  assert.equal(opt(a, "-device"), "virtio-net-pci,netdev=n0,mac=02:aa:0a:00:01:04");
  const b = qemuArgv({ ...base, accel: "tcg", qmpSocket: "/run/microvpc/q.sock", name: "vm-1" });
  assert.match(opt(b, "-chardev", 1)!, /path=\/run\/microvpc\/q\.sock,/);
  assert.equal(opt(b, "-name"), "vm-1");
});

test("qemuArgv: KVM uses the host CPU", () => {
  const a = qemuArgv({ ...base, accel: "kvm", vcpus: 2, memoryMib: 512 });
  assert.equal(opt(a, "-accel"), "kvm");
  assert.equal(opt(a, "-cpu"), "host");
  assert.equal(opt(a, "-smp"), "2");
});

test("validation: anything QEMU would split at a comma, or the kernel would refuse, is refused with the field named", () => {
  const bad: [Partial<QemuOptions>, RegExp][] = [
    [{ tap: "t0,script=/bin/evil" }, /^Error: tap:/],
    [{ tap: "" }, /^Error: tap:/],
    [{ tap: "a-very-long-interface-name" }, /^Error: tap:/],
    [{ mac: "02:aa:0a:00:01" }, /^Error: mac:/],
    [{ mac: "03:aa:0a:00:01:04" }, /^Error: mac: .*multicast/],
    [{ kernel: "relative/vmlinuz" }, /^Error: kernel:/],
    [{ initrd: "/tmp/a,b" }, /^Error: initrd:/],
    [{ consoleLog: "/tmp/../etc/x" }, /^Error: consoleLog:/],
    [{ consoleLog: "/tmp/con sole" }, /^Error: consoleLog:/],
    [{ netns: "ns;rm" }, /^Error: netns:/],
    [{ netns: "/etc/passwd" }, /^Error: netns:/],
    [{ cmdline: "a\nb" }, /^Error: cmdline:/],
    [{ cmdline: "x".repeat(MAX_CMDLINE + 1) }, /^Error: cmdline:/],
    [{ vcpus: 0 }, /^Error: vcpus:/],
    [{ vcpus: 1.5 }, /^Error: vcpus:/],
    [{ memoryMib: 16 }, /^Error: memoryMib:/],
    [{ name: "a b" }, /^Error: name:/],
    [{ qmpSocket: "/run/" + "x".repeat(120) }, /^Error: qmpSocket:/],
    [{ accel: "hvf" as never }, /^Error: accel:/],
  ];
  for (const [over, re] of bad) assert.throws(() => validateQemuOptions({ ...base, ...over }), re, JSON.stringify(over));
  validateQemuOptions(base);
  validateQemuOptions({ ...base, netns: "mvpc-hv1-vpc-1" });
  validateQemuOptions({ ...base, netns: "/proc/1234/ns/net" });
});

test("inNetns: a name or /run/netns/NAME through `ip netns exec`, /proc/PID/ns/net through nsenter; both exec the binary itself", () => {
  assert.deepEqual(inNetns("mvpc-hv1-vpc-1", "qemu-system-x86_64", ["-M", "q35"]), {
    file: "ip",
    args: ["netns", "exec", "mvpc-hv1-vpc-1", "qemu-system-x86_64", "-M", "q35"],
  });
  assert.deepEqual(inNetns("/run/netns/mvpc-hv1-vpc-1", "q", []).args, ["netns", "exec", "mvpc-hv1-vpc-1", "q"]);
  assert.deepEqual(inNetns("/var/run/netns/x", "q", []).args, ["netns", "exec", "x", "q"]);
  assert.deepEqual(inNetns("/proc/42/ns/net", "q", ["-a"]), { file: "nsenter", args: ["--net=/proc/42/ns/net", "--", "q", "-a"] });
  assert.throws(() => inNetns("-n", "q", []), /netns/);
});

test("guestCmdline: serial console, quiet, panic ends the VM, then ip=, listeners and checks in order", () => {
  const s = guestCmdline({
    ipArg: IP,
    checks: ["ping:10.0.1.1", "tcp:10.0.2.4:5432", "http:169.254.169.254/latest/meta-data/instance-id"],
    listen: [80],
    tries: 2,
  });
  assert.equal(
    s,
    `console=ttyS0 quiet loglevel=3 panic=-1 ${IP} mvpc.check=ping:10.0.1.1 mvpc.check=tcp:10.0.2.4:5432 ` +
      "mvpc.check=http:169.254.169.254/latest/meta-data/instance-id mvpc.listen=80 mvpc.tries=2",
  );
  assert.match(guestCmdline({ ipArg: IP, done: "poweroff", extra: ["pci=off"] }), / mvpc\.done=poweroff pci=off$/);
  assert.match(guestCmdline({ ipArg: IP, checks: ["tcp:10.0.2.4:22~1"] }), / mvpc\.check=tcp:10\.0\.2\.4:22~1$/);
  assert.throws(() => guestCmdline({ ipArg: IP, checks: ["tcp:10.0.2.4:22~0"] }), /checks/);
  assert.match(guestCmdline({ ipArg: IP, ttlSeconds: 300 }), / mvpc\.ttl=300$/);
  assert.throws(() => guestCmdline({ ipArg: IP, ttlSeconds: 0 }), /ttlSeconds/);
  assert.throws(() => guestCmdline({ ipArg: "10.0.1.4" }), /ipArg/);
  assert.throws(() => guestCmdline({ ipArg: IP, checks: ["ping:10.0.1.1 init=/bin/sh"] }), /checks/);
  assert.throws(() => guestCmdline({ ipArg: IP, checks: ["udp:10.0.1.1:53"] }), /checks/);
  assert.throws(() => guestCmdline({ ipArg: IP, listen: [0] }), /listen/);
  assert.throws(() => guestCmdline({ ipArg: IP, extra: ["a b"] }), /extra/);
  assert.throws(() => guestCmdline({ ipArg: IP, checks: Array(200).fill("http:169.254.169.254/latest/meta-data/instance-id") }), /cmdline/);
});

test("parseKernelIpArg reads what netagent's kernelIpArg writes", () => {
  const n = { address: "10.0.2.9", gateway: "10.0.2.1", hostname: "db-1", dns: ["10.0.0.2"] } as NicSpec;
  const arg = kernelIpArg(n, prefixToNetmask(24));
  assert.deepEqual(parseKernelIpArg(arg), {
    client: "10.0.2.9",
    server: "",
    gateway: "10.0.2.1",
    netmask: "255.255.255.0",
    hostname: "db-1",
    device: "eth0",
    autoconf: "off",
    dns: ["10.0.0.2"],
  });
  assert.deepEqual(parseKernelIpArg(kernelIpArg({ ...n, dns: [] }, "255.255.0.0"))?.dns, []);
  assert.equal(parseKernelIpArg("ip=dhcp"), null);
  assert.equal(parseKernelIpArg("ip=10.0.0.300::10.0.0.1:255.255.255.0::eth0:off"), null);
  assert.equal(parseKernelIpArg("ip=10.0.0.3::10.0.0.1:255.255.255.0::eth0:off extra"), null);
  assert.equal(parseKernelIpArg("nfsroot=x"), null);
});

test("parseGuestConsole: MVPC- lines among kernel messages and terminal escapes", () => {
  const text = [
    "\x1bc\x1b[?7l\x1b[2JMVPC-NET eth0 10.0.1.4/24 gw 10.0.1.1 mac 02:aa:0a:00:01:04",
    "[    1.234] random kernel line",
    "MVPC-LISTEN 80",
    "MVPC-CHECK ping 10.0.1.1 ok",
    "MVPC-CHECK tcp 10.0.2.4:81 fail",
    "MVPC-CHECK http 169.254.169.254/latest/meta-data/instance-id ok i-0abc ",
    "MVPC-CHECK http 10.0.2.4/ fail",
    "MVPC-CHECK udp 10.0.0.1:53 error unsupported",
    "MVPC-DONE",
    "MVPC-CHECK tcp 10.0.2.4:8", // a partial line at the end is skipped
  ].join("\r\n");
  const r = parseGuestConsole(text);
  assert.deepEqual(r.net, { device: "eth0", address: "10.0.1.4/24", gateway: "10.0.1.1", mac: "02:aa:0a:00:01:04" });
  assert.deepEqual(r.listening, [80]);
  assert.deepEqual(
    r.checks.map((c) => [c.kind, c.target, c.status, c.body]),
    [
      ["ping", "10.0.1.1", "ok", undefined],
      ["tcp", "10.0.2.4:81", "fail", undefined],
      ["http", "169.254.169.254/latest/meta-data/instance-id", "ok", "i-0abc"],
      ["http", "10.0.2.4/", "fail", undefined],
      ["udp", "10.0.0.1:53", "error", undefined],
    ],
  );
  assert.equal(r.done, true);
  assert.equal(parseGuestConsole("MVPC-NET error bad netmask '255.0.255.0'").netError, "error bad netmask '255.0.255.0'");
  assert.equal(parseGuestConsole("").done, false);
});

test("stripEscapes: the firmware's screen reset before the first line goes", () => {
  assert.equal(
    stripEscapes("\x1bc\x1b[?7l\x1b[2JMVPC-NET eth0 10.0.1.4/24 gw 10.0.1.1 mac 02:aa:0a:00:01:04\r"),
    "MVPC-NET eth0 10.0.1.4/24 gw 10.0.1.1 mac 02:aa:0a:00:01:04",
  );
  assert.equal(stripEscapes("MVPC-DONE"), "MVPC-DONE");
});
