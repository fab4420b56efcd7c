// `vm list --watch` and `vm get REF --watch`: the vmm's WatchVms stream
// (every matching VM, SYNCED, then each change), drawn as `vm list` and
// `vm get` draw, again on every change. No polling: the vmm learns of
// changes from the vm.* events every write of a VM record makes. If the
// stream breaks (the vmm restarts), the watch says so on stderr and opens a
// new one, which starts again from a full listing.
import { toJson } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import type { Command } from "commander";
import { VmService, VmWatchEventType, WatchVmsResponseSchema, type Vm, type VmState } from "../../gen/microvpc/v1/vm_pb.js";
import { client, globals } from "../lib/context.js";
import { interruptSignal, isInterrupt, jsonLine, pause, redraw } from "../lib/watch.js";
import { vmDetails, vmTable } from "./vm.js";

interface Filter {
  ref?: string;
  vpc?: string;
  subnet?: string;
  /** Client-side: the vmm's stream has no state filter (a VM moving out of the state is shown as leaving). */
  state?: VmState;
}

/**
 * Follows WatchVms and calls draw() after the initial listing and after
 * each change, with the VMs as they are. Returns when interrupted or, with
 * a ref, when the VM is deleted.
 */
async function follow(cmd: Command, f: Filter, draw: (vms: Map<string, Vm>, change?: { type: VmWatchEventType; vm?: Vm }) => void): Promise<void> {
  const json = globals(cmd).output === "json";
  const { signal, stop } = interruptSignal();
  const vms = new Map<string, Vm>();
  let opened = false;
  let backoff = 500;
  try {
    while (!signal.aborted) {
      // Each stream starts again from a full listing.
      vms.clear();
      try {
        // No deadline: the stream lasts until Ctrl-C.
        const stream = client(cmd, VmService).watchVms({ ref: f.ref ?? "", vpc: f.vpc ?? "", subnet: f.subnet ?? "" }, { signal, timeoutMs: 0 });
        for await (const m of stream) {
          opened = true;
          backoff = 500;
          const shown = (v: Vm | undefined) => !!v && (f.state === undefined || v.state === f.state);
          if (json) {
            if (m.type !== VmWatchEventType.SYNCED && !shown(m.vm) && !(m.vm && vms.has(m.vm.id))) continue;
            jsonLine(toJson(WatchVmsResponseSchema, m, { alwaysEmitImplicit: true }));
          }
          switch (m.type) {
            case VmWatchEventType.INITIAL:
              if (shown(m.vm)) vms.set(m.vm!.id, m.vm!);
              break;
            case VmWatchEventType.SYNCED:
              if (!json) draw(vms);
              break;
            case VmWatchEventType.ADDED:
            case VmWatchEventType.MODIFIED: {
              const had = vms.has(m.vm!.id);
              if (shown(m.vm)) vms.set(m.vm!.id, m.vm!);
              else vms.delete(m.vm!.id);
              if (!json && (had || shown(m.vm))) draw(vms, m);
              break;
            }
            case VmWatchEventType.DELETED:
              if (vms.delete(m.vm!.id) && !json) draw(vms, m);
              if (f.ref) return;
              break;
          }
        }
        // The server ended the stream (with a ref: the VM is gone).
        if (f.ref) return;
      } catch (err) {
        if (isInterrupt(err, signal)) return;
        const unavailable = err instanceof ConnectError && (err.code === Code.Unavailable || err.code === Code.Internal);
        if (!opened || !unavailable) throw err;
        process.stderr.write(`warning: the watch stream broke (${err.rawMessage}); reconnecting in ${backoff} ms\n`);
        await pause(backoff, signal);
        backoff = Math.min(backoff * 2, 5000);
      }
    }
  } finally {
    stop();
  }
}

export async function watchVmList(cmd: Command, f: Filter): Promise<void> {
  await follow(cmd, f, (vms) => redraw(vmTable([...vms.values()].sort((a, b) => a.name.localeCompare(b.name)))));
}

export async function watchVm(cmd: Command, ref: string, vpc: string): Promise<void> {
  await follow(cmd, { ref, vpc }, (vms, change) => {
    if (change?.type === VmWatchEventType.DELETED) redraw(`vm ${change.vm!.name} (${change.vm!.id}) was deleted`);
    else {
      const v = [...vms.values()][0];
      if (v) redraw(vmDetails(v));
    }
  });
}
