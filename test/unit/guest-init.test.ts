// The guest's /init (deploy/guest/init) in dry-run mode under the host's
// busybox: what it would run for a kernel command line, with no VM.
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { test } from "vitest";
import { kernelIpArg, prefixToNetmask, type NicSpec } from "../../services/netagent/plan.js";
import { guestCmdline } from "../../services/vmm/qemu.js";

const INIT = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "deploy", "guest", "init");
const busybox = (() => {
  try {
    return execFileSync("sh", ["-c", "command -v busybox"], { encoding: "utf8" }).trim() || null;
  } catch {
    return null;
  }
})();
const skip = busybox ? false : "busybox is not installed (apt-get install busybox-static)";
if (skip) console.log(`# skipped: ${skip}`);

function dryRun(cmdline: string, modules = ""): string[] {
  const r = spawnSync(busybox!, ["sh", INIT], {
    env: { PATH: process.env.PATH, MVPC_DRYRUN: "1", MVPC_CMDLINE: cmdline, MVPC_MODULES: modules },
    encoding: "utf8",
    timeout: 10_000,
  });
  assert.equal(r.status, 0, r.stderr);
  return r.stdout.trim().split("\n");
}

test.skipIf(skip)("the network from netagent's ip= argument, modules in the given order, virtio_mmio with its devices", () => {
  const n = { address: "10.0.2.9", gateway: "10.0.2.1", hostname: "db-1", dns: ["10.0.0.2"] } as NicSpec;
  const cmdline = `${guestCmdline({ ipArg: kernelIpArg(n, prefixToNetmask(24)) })} virtio_mmio.device=4K@0xd0000000:5`;
  assert.deepEqual(dryRun(cmdline, "virtio_ring virtio virtio_mmio"), [
    "+ insmod /lib/modules/virtio_ring.ko",
    "+ insmod /lib/modules/virtio.ko",
    "+ insmod /lib/modules/virtio_mmio.ko device=4K@0xd0000000:5",
    "+ ip link set lo up",
    "+ ip link set eth0 up",
    "+ ip addr add 10.0.2.9/24 dev eth0",
    "+ ip route add default via 10.0.2.1 dev eth0",
    "+ hostname db-1",
    "MVPC-NET eth0 10.0.2.9/24 gw 10.0.2.1 mac unknown",
    "MVPC-DONE",
  ]);
});

test.skipIf(skip)("netmasks to prefixes, and bad ip= fields refused with an MVPC-NET error", () => {
  for (const [mask, prefix] of [
    ["255.255.0.0", 16],
    ["255.255.255.252", 30],
    ["255.255.255.255", 32],
    ["0.0.0.0", 0],
    ["20", 20],
  ] as const) {
    assert.ok(dryRun(`ip=10.1.2.3::10.1.0.1:${mask}:h:eth0:off`).includes(`+ ip addr add 10.1.2.3/${prefix} dev eth0`), mask);
  }
  assert.ok(dryRun("ip=10.1.2.3::::h::off").includes("+ ip addr add 10.1.2.3/32 dev eth0"), "no netmask, no gateway, any device");
  assert.ok(!dryRun("ip=10.1.2.3::::h::off").some((l) => l.includes("route")));
  assert.ok(dryRun("ip=10.1.2.3::10.1.0.1:255.0.255.0:h:eth0:off").includes("MVPC-NET error bad netmask '255.0.255.0'"));
  assert.ok(dryRun("ip=10.1.2.300::10.1.0.1:255.255.255.0:h:eth0:off").includes("MVPC-NET error bad client address '10.1.2.300'"));
  assert.ok(dryRun("ip=10.1.2.3::10.1.0.1:255.255.255.0:h:eth0:dhcp").some((l) => l.startsWith("MVPC-NET error autoconf=dhcp")));
  assert.ok(dryRun("ip=10.1.2.3::10.1.0.1:255.255.255.0:h:eth0;reboot:off").some((l) => l.startsWith("MVPC-NET error bad device")));
  assert.deepEqual(dryRun("quiet"), ["MVPC-NET none (no ip= argument)", "MVPC-DONE"]);
  assert.deepEqual(dryRun("mvpc.ttl=300").slice(-2), ["MVPC-DONE", "+ poweroff after 300 s"]);
  assert.deepEqual(dryRun("mvpc.ttl=3;reboot").slice(-1), ["MVPC-DONE"]);
});

test.skipIf(skip)("listeners and checks: valid ones run in order with the tries given, bad ones reported, never run", () => {
  const out = dryRun(
    "ip=10.0.1.4::10.0.1.1:255.255.255.0:g:eth0:off mvpc.listen=80 mvpc.listen=99999 mvpc.listen=8$(id) mvpc.tries=2 " +
      "mvpc.check=ping:10.0.1.1 mvpc.check=tcp:10.0.2.4:5432 mvpc.check=http:169.254.169.254/latest/meta-data/instance-id " +
      "mvpc.check=tcp:10.0.2.4:22~1 mvpc.check=ping:10.0.2.4~x " +
      "mvpc.check=tcp:10.0.2.4:0 mvpc.check=ping:$(reboot) mvpc.check=udp:1.2.3.4:53 mvpc.check=http:a;b",
  );
  const tail = out.slice(out.findIndex((l) => l.startsWith("MVPC-NET")) + 1);
  assert.deepEqual(tail, [
    "+ httpd -p 80 -h /www/80",
    "MVPC-LISTEN 80",
    "MVPC-LISTEN 99999 error bad port",
    "MVPC-LISTEN 8$(id) error bad port",
    "+ check ping 10.0.1.1 tries 2",
    "+ check tcp 10.0.2.4:5432 tries 2",
    "+ check http 169.254.169.254/latest/meta-data/instance-id tries 2",
    "+ check tcp 10.0.2.4:22 tries 1",
    "+ check ping 10.0.2.4 tries 2",
    "MVPC-CHECK tcp 10.0.2.4:0 error unsupported",
    "MVPC-CHECK ping $(reboot) error unsupported",
    "MVPC-CHECK udp 1.2.3.4:53 error unsupported",
    "MVPC-CHECK http a;b error unsupported",
    "MVPC-DONE",
  ]);
});
