// What a firewall delta asks of the NICs applied in one VPC namespace — is
// this interface or address taken by another NIC, which groups and shared
// chains do the NICs left out still use — kept up to date by each delta
// (FirewallSync.delta) instead of recounted from the VPC's NIC list every
// time: at 1 000 NICs the recount was most of a delta's own work. Pure.
import { sharedChainKey } from "./compile.js";
import type { BindingRec, VpcFirewallState } from "./model.js";

export class NicIndex {
  /** The applied NICs by id. */
  readonly byId = new Map<string, BindingRec>();
  private readonly ifs = new Map<string, number>();
  private readonly addrs = new Map<string, number>();
  private readonly groups = new Map<string, number>();
  private readonly shared = new Map<string, number>();
  /** Each NIC's shared-chain key as it was added (the state then decided it). */
  private readonly keys = new Map<string, string | undefined>();

  /** The index of a whole applied state. */
  static of(st: VpcFirewallState): NicIndex {
    const idx = new NicIndex();
    for (const n of st.nics) idx.add(n, st);
    return idx;
  }

  /** Adds a NIC applied with state `st` (which decides its shared chains). */
  add(n: BindingRec, st: VpcFirewallState): void {
    this.byId.set(n.nicId, n);
    inc(this.ifs, n.hostIf, 1);
    inc(this.addrs, n.address, 1);
    for (const g of new Set(n.groupIds)) inc(this.groups, g, 1);
    const k = sharedChainKey(n, st);
    this.keys.set(n.nicId, k);
    if (k !== undefined) inc(this.shared, k, 1);
  }

  /** Removes a NIC added before (by its id; a NIC not here changes nothing). */
  remove(nicId: string): void {
    const n = this.byId.get(nicId);
    if (!n) return;
    this.byId.delete(nicId);
    inc(this.ifs, n.hostIf, -1);
    inc(this.addrs, n.address, -1);
    for (const g of new Set(n.groupIds)) inc(this.groups, g, -1);
    const k = this.keys.get(nicId);
    this.keys.delete(nicId);
    if (k !== undefined) inc(this.shared, k, -1);
  }

  /** Whether a NIC other than those in `except` (NICs of this index) has this host interface. */
  ifTaken(hostIf: string, except: readonly BindingRec[]): boolean {
    return (this.ifs.get(hostIf) ?? 0) > except.filter((n) => n.hostIf === hostIf).length;
  }

  /** Whether a NIC other than those in `except` has this address. */
  addressTaken(address: string, except: readonly BindingRec[]): boolean {
    return (this.addrs.get(address) ?? 0) > except.filter((n) => n.address === address).length;
  }

  /** The groups some NIC other than those in `except` is in. */
  groupsUsed(except: readonly BindingRec[]): Set<string> {
    const out = new Set<string>();
    for (const [g, count] of this.groups) if (count > except.filter((n) => n.groupIds.includes(g)).length) out.add(g);
    return out;
  }

  /** Whether a NIC other than those in `except` jumps to the shared chains of `key`. */
  sharedUsed(key: string, except: readonly BindingRec[]): boolean {
    return (this.shared.get(key) ?? 0) > except.filter((n) => this.keys.get(n.nicId) === key).length;
  }
}

function inc(m: Map<string, number>, k: string, by: number): void {
  const v = (m.get(k) ?? 0) + by;
  if (v > 0) m.set(k, v);
  else m.delete(k);
}
