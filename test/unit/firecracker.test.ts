// kind=firecracker's builders, and its API client against a stand-in API
// server on a unix socket (there is no firecracker binary on these machines).
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, test } from "vitest";
import { FailedPreconditionError } from "../../services/common/errors.js";
import {
  fcRequest,
  findFirecracker,
  FIRECRACKER_MISSING,
  firecrackerArgv,
  firecrackerCmdline,
  firecrackerRequests,
  isElf,
  startFirecracker,
  which,
  type FirecrackerOptions,
} from "../../services/vmm/firecracker.js";

const dir = mkdtempSync(join(tmpdir(), "mvpc-fc-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const base: FirecrackerOptions = {
  id: "vm-1",
  netns: "/run/netns/mvpc-hv1-vpc-111111111111",
  tap: "tbbbbbbbbbbbb",
  mac: "02:AA:0a:00:01:04",
  kernel: "/var/lib/microvpc/vmlinux",
  initrd: "/var/cache/microvpc/guest/initrd.img",
  cmdline: "console=ttyS0 ip=10.0.1.4::10.0.1.1:255.255.255.0:web-1:eth0:off",
  vcpus: 2,
  memoryMib: 256,
  consoleLog: "/run/microvpc/vms/vm-1/console.log",
};

test("argv: firecracker with its API socket and id, in the VPC namespace", () => {
  assert.deepEqual(firecrackerArgv(base, "/usr/local/bin/firecracker"), {
    file: "ip",
    args: ["netns", "exec", "mvpc-hv1-vpc-111111111111", "/usr/local/bin/firecracker", "--api-sock", "/run/microvpc/vms/vm-1/console.log.sock", "--id", "vm-1"],
  });
  assert.equal(firecrackerArgv({ ...base, apiSocket: "/run/fc/vm-1.sock" }).args[5], "/run/fc/vm-1.sock");
  assert.throws(() => firecrackerArgv({ ...base, id: "vm_1!" }), /^Error: id:/);
  assert.throws(() => firecrackerArgv({ ...base, tap: "t,x" }), /^Error: tap:/);
  assert.throws(() => firecrackerArgv({ ...base, vcpus: 33 }), /^Error: vcpus:/);
});

test("requests: machine, boot source, the TAP as eth0 with the NIC's MAC, then InstanceStart", () => {
  assert.deepEqual(firecrackerRequests(base), [
    { method: "PUT", path: "/machine-config", body: { vcpu_count: 2, mem_size_mib: 256, smt: false } },
    {
      method: "PUT",
      path: "/boot-source",
      body: { kernel_image_path: base.kernel, boot_args: base.cmdline, initrd_path: base.initrd },
    },
    { method: "PUT", path: "/network-interfaces/eth0", body: { iface_id: "eth0", host_dev_name: "tbbbbbbbbbbbb", guest_mac: "02:aa:0a:00:01:04" } },
    { method: "PUT", path: "/actions", body: { action_type: "InstanceStart" } },
  ]);
  const withDisk = firecrackerRequests({ ...base, initrd: undefined, rootfs: { path: "/var/lib/microvpc/rootfs.ext4", readOnly: true } });
  assert.deepEqual(withDisk[1].body, { kernel_image_path: base.kernel, boot_args: base.cmdline });
  assert.deepEqual(withDisk[2], {
    method: "PUT",
    path: "/drives/rootfs",
    body: { drive_id: "rootfs", path_on_host: "/var/lib/microvpc/rootfs.ext4", is_root_device: true, is_read_only: true },
  });
  assert.equal(withDisk.at(-1)!.path, "/actions");
  assert.throws(() => firecrackerRequests({ ...base, rootfs: { path: "disk.img" } }), /rootfs\.path/);
});

test("the guest command line for Firecracker: no PCI, no keyboard controller, reboot=k", () => {
  const s = firecrackerCmdline({ ipArg: "ip=10.0.1.4::10.0.1.1:255.255.255.0:web-1:eth0:off", checks: ["ping:10.0.1.1"] });
  assert.match(s, /^console=ttyS0 .* ip=10\.0\.1\.4::10\.0\.1\.1:255\.255\.255\.0:web-1:eth0:off mvpc\.check=ping:10\.0\.1\.1 reboot=k pci=off i8042\.noaux/);
});

test("the API client speaks HTTP over the unix socket: JSON bodies out, fault_message back", async () => {
  const sock = join(dir, "api.sock");
  const seen: { method?: string; url?: string; type?: string; body: string }[] = [];
  const srv = createServer((req, res) => {
    let body = "";
    req.on("data", (d) => (body += d));
    req.on("end", () => {
      seen.push({ method: req.method, url: req.url, type: req.headers["content-type"], body });
      if (req.url === "/network-interfaces/eth0") {
        res.writeHead(400, { "Content-Type": "application/json" });
        res.end(JSON.stringify({ fault_message: "Open tap device failed: Resource busy" }));
      } else {
        res.writeHead(204);
        res.end();
      }
    });
  });
  await new Promise<void>((r) => srv.listen(sock, r));
  try {
    const reqs = firecrackerRequests(base);
    assert.equal(await fcRequest(sock, reqs[0]), "");
    await assert.rejects(fcRequest(sock, reqs[2]), /firecracker PUT \/network-interfaces\/eth0: HTTP 400: Open tap device failed: Resource busy/);
    assert.deepEqual(seen[0], { method: "PUT", url: "/machine-config", type: "application/json", body: JSON.stringify(reqs[0].body) });
    await assert.rejects(fcRequest(join(dir, "nothing.sock"), reqs[0], 500), /ENOENT|ECONNREFUSED/);
  } finally {
    await new Promise((r) => srv.close(r));
  }
});

test("no firecracker binary: a FailedPrecondition that says what to do, and nothing started", async () => {
  assert.equal(findFirecracker("/nonexistent/firecracker"), null);
  assert.equal(which("definitely-not-a-binary-here", "/usr/bin:/bin"), null);
  assert.equal(which("sh", "/nonexistent:/bin:/usr/bin")?.endsWith("/sh"), true);
  const err = await startFirecracker({ ...base, firecracker: "/nonexistent/firecracker" }).then(
    () => null,
    (e: unknown) => e,
  );
  assert.ok(err instanceof FailedPreconditionError);
  assert.equal((err as Error).message, FIRECRACKER_MISSING);
  assert.match(FIRECRACKER_MISSING, /not on PATH.*kind=qemu works here/);
});

test("isElf: the ELF magic Firecracker needs on x86_64; a bzImage is not one", () => {
  const elf = join(dir, "vmlinux");
  writeFileSync(elf, Buffer.from([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1]));
  const bz = join(dir, "vmlinuz");
  writeFileSync(bz, Buffer.concat([Buffer.alloc(0x202), Buffer.from("HdrS")]));
  assert.equal(isElf(elf), true);
  assert.equal(isElf(bz), false);
  assert.equal(isElf(join(dir, "missing")), false);
});
