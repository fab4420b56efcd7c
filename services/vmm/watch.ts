// WatchVms: the VMs ListVms (or GetVm) would return, then each change, as a
// server stream. Nothing polls: every write of a VM record appends a vm.*
// event to mvpc:events (store.ts: in the same script on a single Redis, right
// after the write on a cluster, where the stream is in another slot); while a watch is open
// the vmm follows those events (a watch asks for the fleet's VMs, so it
// reads the fleet's stream; a vmm nobody watches reads none of it:
// Vmm.followInvalidations), and the hub below wakes each open stream with
// the ids that changed. An event only says "look again": the stream re-reads
// the VM's record (validated by the store as every read is) and sends it
// only if the VM as returned differs from what it sent last, so a forged or
// repeated event costs a read and sends nothing.
import { equals, type MessageInitShape } from "@bufbuild/protobuf";
import * as V from "../common/validate.js";
import { NotFoundError } from "../common/errors.js";
import { VmSchema, VmWatchEventType, type Vm, type WatchVmsRequest, WatchVmsResponseSchema } from "../../gen/microvpc/v1/vm_pb.js";
import { VM_ID_RE } from "./schema.js";
import type { VmRec, VmStore } from "./store.js";

/** Ids a stream has yet to look at beyond which it re-reads every VM instead (one listing, bounded memory). */
const MAX_DIRTY = 1000;

/** How long the fleet's VM events are still read after the last watch closed (a client that reconnects finds them read). */
export const WATCH_LINGER_MS = 30_000;

/** Starts reading the fleet's VM events; `ready` once it has its position, taken before the watch's first read. */
export type VmEventFollower = () => { ready: Promise<void>; stop: () => void };

/**
 * The open WatchVms streams of this vmm, woken with the VM ids events name.
 * The follower runs from the first watch until WATCH_LINGER_MS after the last.
 */
export class VmWatchHub {
  private readonly listeners = new Set<(id: string | null) => void>();
  private follower?: VmEventFollower;
  private running?: ReturnType<VmEventFollower>;
  private linger?: NodeJS.Timeout;

  constructor(private readonly lingerMs = WATCH_LINGER_MS) {}

  /** What reads the fleet's VM events for the watches (Vmm.followInvalidations); none: watches are woken by notify() alone. */
  setFollower(f: VmEventFollower | undefined): void {
    this.follower = f;
  }

  /** Whether the fleet's VM events are being read now. */
  get following(): boolean {
    return this.running !== undefined;
  }

  /** Resolves once the follower has its position: what a watch reads after this, and every change after, it hears of. */
  ready(): Promise<void> {
    return this.running?.ready ?? Promise.resolve();
  }

  /** Stops the follower now (the daemon is closing). */
  close(): void {
    clearTimeout(this.linger);
    this.running?.stop();
    this.running = undefined;
  }

  /** Called with the vm field of each vm.* event; ids that are not VM ids are dropped here. */
  notify(ids: string[]): void {
    for (const id of ids) {
      if (!VM_ID_RE.test(id)) continue;
      for (const l of this.listeners) l(id);
    }
  }

  /** Every stream re-reads everything (e.g. after the event follower lost its place). */
  notifyAll(): void {
    for (const l of this.listeners) l(null);
  }

  get size(): number {
    return this.listeners.size;
  }

  subscribe(l: (id: string | null) => void): () => void {
    this.listeners.add(l);
    clearTimeout(this.linger);
    if (!this.running && this.follower) this.running = this.follower();
    return () => {
      this.listeners.delete(l);
      if (this.listeners.size > 0 || !this.running) return;
      clearTimeout(this.linger);
      this.linger = setTimeout(() => {
        if (this.listeners.size === 0) this.close();
      }, this.lingerMs);
      this.linger.unref();
    };
  }
}

/** What a watch needs from the Vmm. */
export interface WatchDeps {
  store: VmStore;
  resolve(ref: string, vpcRef: string): Promise<VmRec | null>;
  vpcId(ref: string): Promise<string>;
  vmMsg(v: VmRec): Vm;
}

type Out = MessageInitShape<typeof WatchVmsResponseSchema>;

export async function* watchVms(deps: WatchDeps, hub: VmWatchHub, req: WatchVmsRequest, signal: AbortSignal): AsyncGenerator<Out> {
  // Subscribe before the first read: a change made while the listing runs
  // is then seen at least once (read again, and sent only if it differs).
  const dirty = new Set<string>();
  let all = false;
  let wake: (() => void) | undefined;
  const unsubscribe = hub.subscribe((id) => {
    if (id === null || dirty.size >= MAX_DIRTY) all = true;
    else dirty.add(id);
    wake?.();
  });
  const onAbort = () => wake?.();
  signal.addEventListener("abort", onAbort);
  try {
    await hub.ready();
    let only: string | undefined;
    let vpcId: string | undefined;
    if (req.ref) {
      const v = await deps.resolve(req.ref, req.vpc);
      if (!v) throw new NotFoundError("vm", req.ref);
      only = v.id;
    } else if (req.vpc) {
      V.ref("vpc", req.vpc, "vpc");
      vpcId = await deps.vpcId(req.vpc);
    }
    if (req.subnet) V.ref("subnet", req.subnet, "subnet");
    const matches = (v: VmRec) => (only ? v.id === only : (!vpcId || v.vpcId === vpcId) && (!req.subnet || v.subnetId === req.subnet));
    const read = async (): Promise<VmRec[]> => {
      if (only) {
        const v = await deps.store.get(only);
        return v ? [v] : [];
      }
      return (await deps.store.all()).filter(matches);
    };

    const sent = new Map<string, Vm>();
    for (const v of (await read()).sort((a, b) => a.name.localeCompare(b.name))) {
      const vm = deps.vmMsg(v);
      sent.set(v.id, vm);
      yield { type: VmWatchEventType.INITIAL, vm };
    }
    yield { type: VmWatchEventType.SYNCED };

    while (!signal.aborted) {
      if (dirty.size === 0 && !all) {
        await new Promise<void>((resolve) => (wake = resolve));
        wake = undefined;
        continue;
      }
      // What to look at now: every VM (after an overflow), or the ids named.
      let current: Map<string, VmRec>;
      let ids: string[];
      if (all) {
        all = false;
        dirty.clear();
        current = new Map((await read()).map((v) => [v.id, v]));
        ids = [...new Set([...sent.keys(), ...current.keys()])];
      } else {
        ids = [...dirty].filter((id) => !only || id === only);
        dirty.clear();
        current = new Map();
        for (const id of ids) {
          const v = await deps.store.get(id);
          if (v && matches(v)) current.set(id, v);
        }
      }
      for (const id of ids.sort()) {
        const v = current.get(id);
        const prev = sent.get(id);
        if (v) {
          const vm = deps.vmMsg(v);
          if (prev && equals(VmSchema, prev, vm)) continue;
          sent.set(id, vm);
          yield { type: prev ? VmWatchEventType.MODIFIED : VmWatchEventType.ADDED, vm };
        } else if (prev) {
          sent.delete(id);
          yield { type: VmWatchEventType.DELETED, vm: prev };
          if (only) return;
        }
      }
    }
  } finally {
    unsubscribe();
    signal.removeEventListener("abort", onAbort);
  }
}
