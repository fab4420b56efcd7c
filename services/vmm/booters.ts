// Boots real guests for kind=qemu. The QEMU runner (qemu.ts) and the guest
// image (deploy/guest/build.sh) are separate; this adapter is the only
// place the vmm touches them.
import type { Logger } from "pino";
import type { Booter } from "./service.js";

export function qemuBooter(log: Logger): Booter {
  throw Object.assign(new Error("qemu runner not built yet"), { log });
}
