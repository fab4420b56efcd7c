// The VPN endpoint's data plane, on the host an endpoint names: one
// WireGuard interface in the VPC namespace (made like the overlay's, in the
// host namespace so that its UDP socket listens on the uplink, then moved;
// wg.ts), one peer per client (allowed-ips its /32), a route for the client
// range, and the nft table plan.ts compiles. A peer that goes has its
// conntrack entries flushed in the VPC namespace, so its flows end at once.
// An endpoint that names another host now, or is gone (DeleteVpnEndpoint,
// or its VPC deleted), is no longer served here: the pass tears its
// interface and table down and forgets this host's key and applied entries
// for it (teardown), which DeleteVpnEndpoint waits for.
// Other hosts only route the range here (overlay/sync.ts, schema.ts
// vpnRoute). Polls the VPN gen every pollMs and compares the kernel in full
// every fullEveryMs; an API call on this host kicks it at once.
import { createHash } from "node:crypto";
import { existsSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import type { Logger } from "pino";
import { run } from "../../common/exec.js";
import * as V from "../../common/validate.js";
import type { IpamReader } from "../../ipam/schema.js";
import type { Agent } from "../agent.js";
import { keyFileIn, loadOrCreateKey } from "../overlay/keyfile.js";
import { WgInterfaces } from "../overlay/wg.js";
import type { WgKernel } from "../overlay/wgkernel.js";
import { deleteTx, vpnTx, type EgressRule, type VpnEndpointRec } from "./plan.js";
import type { VpnStore } from "./store.js";

/** The VPN interface of a VPC on a host: "wg" + 13 hex like the overlay's (the same cleanup finds it), from another hash input. */
export function vpnIfName(hostId: string, vpcId: string): string {
  return `wg${createHash("sha256").update(`vpn/${hostId}/${vpcId}`).digest("hex").slice(0, 13)}`;
}

/** The VPN state directory of a host: interfaces' state files in DIR/wg, keys in DIR/keys/<vpc>. */
export function vpnStateDir(stateDir: string, hostId: string): string {
  return join(stateDir, hostId, "vpn");
}

export interface VpnSyncOptions {
  hostId: string;
  stateDir: string;
  hostNetns: string;
  mtu: number;
  /** Puts the VPC on this host (namespace, overlay membership) as EnsureVpc does. */
  ensureVpc: (vpcId: string) => Promise<void>;
  pollMs?: number;
  fullEveryMs?: number;
}

export class VpnSync {
  readonly interfaces: WgInterfaces;
  private readonly dir: string;
  private timer?: NodeJS.Timeout;
  private stopped = false;
  private running?: Promise<void>;
  private again = false;
  /** What the last pass saw of the change counters (counters().seen). */
  private lastGen = "";
  private lastFullMs = 0;
  lastError = "";

  constructor(
    private readonly agent: Agent,
    private readonly store: VpnStore,
    private readonly ipam: IpamReader,
    private readonly wgk: WgKernel,
    private readonly opts: VpnSyncOptions,
    private readonly log: Logger,
  ) {
    this.dir = vpnStateDir(opts.stateDir, opts.hostId);
    mkdirSync(join(this.dir, "wg"), { recursive: true, mode: 0o700 });
    this.interfaces = new WgInterfaces(agent, wgk, this.dir, opts.hostNetns, log);
    this.interfaces.impl = "wireguard-go";
  }

  start(): void {
    const loop = async () => {
      if (this.stopped) return;
      await this.kick(false);
      if (!this.stopped) this.timer = setTimeout(loop, this.opts.pollMs ?? 500).unref();
    };
    void loop();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    await this.running?.catch(() => undefined);
  }

  /** A pass now, or one more after the running one. */
  kick(full = true): Promise<void> {
    if (this.running) {
      this.again ||= full;
      return this.running;
    }
    this.running = (async () => {
      let f = full;
      for (let i = 0; i < 5; i++) {
        this.again = false;
        try {
          await this.pass(f);
          this.lastError = "";
        } catch (err) {
          this.lastError = (err as Error).message;
          this.log.warn({ err: this.lastError }, "vpn sync");
        }
        if (!this.again || this.stopped) break;
        f = true;
      }
    })().finally(() => (this.running = undefined));
    return this.running;
  }

  /**
   * The VPN's change counters as a pass compares them: on a single Redis the
   * one counter of every VPC (one GET a poll; the endpoints are listed only
   * when it moved), on a cluster each endpoint VPC's (VpnKeys.gen).
   */
  private async counters(): Promise<{ seen: string; vpcs?: string[]; gen: (vpcId: string) => number }> {
    if (!this.store.keys.cluster) {
      const g = await this.store.gen("");
      return { seen: String(g), gen: () => g };
    }
    const vpcs = await this.store.endpointVpcs();
    const gens = new Map(await Promise.all(vpcs.map(async (v) => [v, await this.store.gen(v)] as const)));
    return { seen: [...gens].map(([v, g]) => `${v}=${g}`).join(","), vpcs, gen: (v) => gens.get(v) ?? 0 };
  }

  private async pass(full: boolean): Promise<void> {
    const c = await this.counters();
    const due = Date.now() - this.lastFullMs > (this.opts.fullEveryMs ?? 10_000);
    if (!full && !due && c.seen === this.lastGen) return;
    const served = new Set<string>();
    const errors: string[] = [];
    for (const vpcId of c.vpcs ?? (await this.store.endpointVpcs())) {
      const vpc = await this.ipam.getVpc(vpcId);
      if (!vpc) continue;
      const ep = await this.store.endpoint(vpcId, vpc.cidr);
      if (!ep || ep.hostId !== this.opts.hostId) continue;
      served.add(vpcId);
      try {
        await this.apply(vpc.cidr, ep, c.gen(vpcId));
      } catch (err) {
        errors.push(`${vpcId}: ${(err as Error).message}`);
      }
    }
    for (const f of this.interfaces.list()) {
      if (served.has(f.vpcId)) continue;
      await this.teardown(f.vpcId, f.ifname).catch((err: Error) => errors.push(`${f.vpcId}: ${err.message}`));
    }
    this.lastGen = c.seen;
    this.lastFullMs = Date.now();
    if (errors.length) throw new Error(errors.join("; "));
  }

  private async apply(vpcCidr: string, ep: VpnEndpointRec, gen: number): Promise<void> {
    const vpcId = ep.vpcId;
    if (!existsSync(`/run/netns/${this.agent.nsOf(vpcId)}`) || !this.agent.desired.vpcs.has(vpcId)) {
      await this.opts.ensureVpc(vpcId);
      await this.store.announceHeld(this.opts.hostId, vpcId);
    }
    await this.agent.withLock(vpcId, async () => {
      const vns = this.agent.nsOf(vpcId);
      const ifname = vpnIfName(this.opts.hostId, vpcId);
      const keyDir = join(this.dir, "keys", vpcId);
      mkdirSync(keyDir, { recursive: true, mode: 0o700 });
      const key = await loadOrCreateKey(keyDir, this.wgk);
      const { dump } = await this.interfaces.ensure(vpcId, ifname, { mtu: this.opts.mtu, publicKey: key.publicKey, keyFile: keyFileIn(keyDir) });
      const range = V.cidr("client_cidr", ep.clientCidr, { min: 0, max: 32 });
      const clients = await this.store.clients(vpcId, range);
      const args: string[] = [];
      if (dump.listenPort !== ep.listenPort) args.push("listen-port", String(ep.listenPort));
      const want = new Map(clients.map((c) => [c.publicKey, `${c.address}/32`]));
      const gone: string[] = [];
      for (const p of dump.peers) {
        if (want.get(p.publicKey) === p.allowedIps.join(",")) continue;
        if (!want.has(p.publicKey)) args.push("peer", p.publicKey, "remove");
        gone.push(...p.allowedIps.map((a) => a.replace(/\/32$/, "")));
      }
      const have = new Map(dump.peers.map((p) => [p.publicKey, p.allowedIps.join(",")]));
      for (const [k, a] of want) if (have.get(k) !== a) args.push("peer", k, "allowed-ips", a);
      // The table first: a new client is confined before its peer exists.
      const withRules = await Promise.all(clients.map(async (c) => ({ id: c.id, address: c.address, rules: await this.egress(vpcId, c.groupIds) })));
      await this.agent.kernel.nft(vns, vpnTx(ifname, vpcCidr, withRules));
      if (args.length) await this.interfaces.wg(ifname, ["set", ifname, ...args]);
      for (const a of new Set(gone)) await this.flush(vns, V.intToIp(V.ipv4("address", a)));
      const routes = await this.agent.kernel.routes(vns, ["dev", ifname]);
      const lines = routes.filter((r) => r.dst !== range.text).map((r) => `route del ${r.dst} dev ${ifname}`);
      if (!routes.some((r) => r.dst === range.text)) lines.push(`route replace ${range.text} dev ${ifname}`);
      if (lines.length) await this.agent.kernel.ipBatch(vns, lines);
      if (ep.publicKey !== key.publicKey) await this.store.setEndpointKey(this.opts.hostId, vpcId, key.publicKey);
      await this.store.setApplied(this.opts.hostId, vpcId, gen);
      if (args.length) this.log.info({ vpc: vpcId, interface: ifname, clients: clients.length, flushed: gone.length }, "vpn endpoint applied");
    });
  }

  /** The egress rules of a client's groups; a group rule through its peer group's member addresses. */
  private async egress(vpcId: string, groupIds: string[]): Promise<EgressRule[]> {
    const out: EgressRule[] = [];
    for (const id of groupIds) {
      const g = await this.store.group(vpcId, id);
      for (const r of g?.rules ?? []) {
        if (r.dir !== "egress") continue;
        const peers = r.cidr ? [r.cidr] : r.group ? await this.store.members(vpcId, r.group) : [];
        out.push({ proto: r.proto, portFrom: r.portFrom, portTo: r.portTo, icmpType: r.icmpType, icmpCode: r.icmpCode, peers });
      }
    }
    return out;
  }

  /** Ends a removed client's flows: its conntrack entries, both directions. "Nothing found" is success. */
  private async flush(vns: string, address: string): Promise<void> {
    for (const dir of ["-s", "-d"]) await run("ip", ["netns", "exec", vns, "conntrack", "-D", dir, address], { check: false });
  }

  private async teardown(vpcId: string, ifname: string): Promise<void> {
    await this.interfaces.remove(vpcId, ifname);
    const vns = this.agent.nsOf(vpcId);
    if (existsSync(`/run/netns/${vns}`)) await this.agent.kernel.nft(vns, deleteTx());
    await this.store.forgetEndpoint(this.opts.hostId, vpcId);
    this.log.info({ vpc: vpcId, interface: ifname }, "vpn endpoint removed");
  }
}
