// Boots real guests for kind=qemu: the guest image from deploy/guest/build.sh,
// QEMU started detached inside the VPC namespace on the NIC's TAP (so guests
// survive a vmm restart and are adopted again by PID and name).
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import type { Logger } from "pino";
import { FailedPreconditionError } from "../common/errors.js";
import { qemuAccel } from "./accel.js";
import { adoptQemu, guestCmdline, guestImage, startQemu } from "./qemu.js";
import type { Booter } from "./service.js";
import type { VmRec } from "./store.js";

const vmName = (v: VmRec) => `microvpc-${v.id}`;

export function qemuBooter(log: Logger, stateDir = process.env.MICROVPC_STATE_DIR ?? "/var/lib/microvpc"): Booter {
  return {
    async boot(v: VmRec, netnsPath: string) {
      const img = guestImage();
      if (!img) throw new FailedPreconditionError("no guest image: run deploy/guest/build.sh (it builds a kernel and initramfs from Debian packages)");
      const dir = join(stateDir, "vm");
      mkdirSync(dir, { recursive: true });
      const consoleLog = join(dir, `${v.id}.console.log`);
      // Probed once per vmm (at start-up; a CreateVm during the probe waits for it).
      const { accel, reason } = await qemuAccel();
      const p = await startQemu({
        accel,
        name: vmName(v),
        netns: netnsPath,
        tap: v.hostIf,
        mac: v.mac,
        kernel: img.kernel,
        initrd: img.initrd,
        cmdline: guestCmdline({ ipArg: v.kernelIpArg }),
        vcpus: v.vcpus,
        memoryMib: v.memoryMib,
        consoleLog,
      });
      log.info({ vm: v.id, pid: p.pid, accel }, "guest started");
      return { pid: p.pid, consoleLog, accel, accelReason: reason };
    },
    async stop(v: VmRec) {
      if (!v.pid) return;
      await adoptQemu(v.pid, vmName(v), v.consoleLog)?.stop();
    },
  };
}
