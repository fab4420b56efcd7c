// FakeGwKernel: the gateway's kernel adapter (services/gateway/kernel.ts) in
// memory, for GatewaySync's state-table test. nft goes to a FakeNft; the ip
// lines the planner emits are interpreted with ip's semantics where the sync
// depends on them: `add` fails on what exists, `del` on what is missing, a
// route or proxy entry needs its device, deleting a namespace takes its veth
// peers (and the routes through them) along. A batch stops at its first
// failing line and throws; with force every line is tried and nothing
// throws (the sync runs its removals so). Any line it does not know throws:
// a new kind of line in the planner needs a model here. dump() prints a
// namespace's state as sorted lines, so tests compare golden text.
import { FakeNft } from "../../services/common/nft/fake.js";
import type { NftTransaction } from "../../services/common/nft/tx.js";
import type { GatewayKernel } from "../../services/gateway/kernel.js";

interface Link {
  alias?: string;
  up: boolean;
  /** address/prefix → label ("" none). */
  addrs: Map<string, string>;
  /** A veth's peer: [namespace, link]. */
  peer?: [string, string];
}

interface Ns {
  links: Map<string, Link>;
  /** "table dst" → the route's line, as replaced. */
  routes: Map<string, string>;
  /** pref → the rule's line. */
  rules: Map<string, string>;
  /** "address dev" of proxy neighbours. */
  proxies: Set<string>;
}

export class FakeGwKernel implements GatewayKernel {
  readonly nft = new FakeNft();
  private readonly nss = new Map<string, Ns>();
  /** Every ip batch run (namespace, lines, force), in order. */
  readonly batches: { ns: string; lines: string[]; force: boolean }[] = [];
  /** Next vpcBatch/hostBatch (without force) to this namespace fails with this message (once). */
  readonly failNext = new Map<string, string>();
  forwarding = false;

  constructor(
    readonly hostNetns: string,
    /** Links the host namespace starts with (the uplink). */
    hostLinks: string[] = [],
  ) {
    for (const l of hostLinks) this.ns(hostNetns).links.set(l, { up: true, addrs: new Map() });
  }

  private ns(name: string): Ns {
    let n = this.nss.get(name);
    if (!n) {
      n = { links: new Map([["lo", { up: true, addrs: new Map([["127.0.0.1/8", ""]]) }]]), routes: new Map(), rules: new Map(), proxies: new Set() };
      this.nss.set(name, n);
    }
    return n;
  }

  /** The namespace is deleted (the netagent removed the VPC): its veths' peers and their routes go too. */
  removeNetns(name: string): void {
    const n = this.nss.get(name);
    if (!n) return;
    this.nss.delete(name);
    for (const l of n.links.values()) if (l.peer) this.dropLink(l.peer[0], l.peer[1]);
  }

  /** Deletes a link behind the gateway's back (as `ip link del` would: its peer too). */
  deleteLink(ns: string, dev: string): void {
    const l = this.nss.get(ns)?.links.get(dev);
    if (!l) return;
    this.dropLink(ns, dev);
    if (l.peer) this.dropLink(l.peer[0], l.peer[1]);
  }

  private dropLink(ns: string, dev: string): void {
    const n = this.nss.get(ns);
    if (!n) return;
    n.links.delete(dev);
    for (const [k, r] of n.routes) if (r.includes(` dev ${dev}`)) n.routes.delete(k);
  }

  async apply(ns: string, tx: NftTransaction): Promise<void> {
    await this.nft.apply(ns, tx);
  }

  async hostLinkExists(dev: string): Promise<boolean> {
    return this.nss.get(this.hostNetns)?.links.has(dev) ?? false;
  }

  async hostBatch(lines: string[], force = false): Promise<void> {
    this.batch(this.hostNetns, lines, force);
  }

  async vpcBatch(ns: string, lines: string[]): Promise<void> {
    this.batch(ns, lines, false);
  }

  /** No policy rules are modelled: the NAT steering (plan.ts natSteerLines) is tested on real namespaces. */
  async vpcRules(): Promise<[]> {
    return [];
  }

  async vpcLoAddrs(ns: string, label: string): Promise<string[]> {
    return [...(this.nss.get(ns)?.links.get("lo")?.addrs ?? [])].filter(([a, l]) => l === label && !a.includes(":")).map(([a]) => a.split("/")[0]);
  }

  async enableForwarding(): Promise<void> {
    this.forwarding = true;
  }

  private batch(ns: string, lines: string[], force: boolean): void {
    this.batches.push({ ns, lines, force });
    const fail = this.failNext.get(ns);
    if (fail !== undefined && !force) {
      this.failNext.delete(ns);
      throw new Error(`ip -batch -: ${fail}`);
    }
    lines.forEach((line, i) => {
      try {
        this.line(ns, line);
      } catch (err) {
        if (!force) throw new Error(`ip -batch -: Command failed -:${i + 1}: ${(err as Error).message}`, { cause: err });
      }
    });
  }

  private link(n: Ns, dev: string): Link {
    const l = n.links.get(dev);
    if (!l) throw new Error(`Cannot find device "${dev}"`);
    return l;
  }

  private line(name: string, line: string): void {
    const n = this.ns(name);
    let m: RegExpExecArray | null;
    if ((m = /^link add (\S+) type veth peer name (\S+) netns (\S+)$/.exec(line))) {
      const peerNs = this.ns(m[3]);
      if (n.links.has(m[1]) || peerNs.links.has(m[2])) throw new Error("RTNETLINK answers: File exists");
      n.links.set(m[1], { up: false, addrs: new Map(), peer: [m[3], m[2]] });
      peerNs.links.set(m[2], { up: false, addrs: new Map(), peer: [name, m[1]] });
    } else if ((m = /^link set dev (\S+) alias (\S+)$/.exec(line))) this.link(n, m[1]).alias = m[2];
    else if ((m = /^link set dev (\S+) up$/.exec(line))) this.link(n, m[1]).up = true;
    else if ((m = /^addr (add|replace|del) (\S+) dev (\S+)(?: label (\S+))?$/.exec(line))) {
      const l = this.link(n, m[3]);
      if (m[1] === "add" && l.addrs.has(m[2])) throw new Error("RTNETLINK answers: File exists");
      if (m[1] === "del" && !l.addrs.delete(m[2])) throw new Error("RTNETLINK answers: Cannot assign requested address");
      if (m[1] !== "del") l.addrs.set(m[2], m[4] ?? "");
    } else if ((m = /^route replace (\S+) via (\S+) dev (\S+)(?: table (\d+))?$/.exec(line))) {
      this.link(n, m[3]);
      n.routes.set(`${m[4] ?? "main"} ${m[1]}`, line.replace(/^route replace /, ""));
    } else if ((m = /^route del (\S+)(?: table (\d+))?$/.exec(line))) {
      if (!n.routes.delete(`${m[2] ?? "main"} ${m[1]}`)) throw new Error("RTNETLINK answers: No such process");
    } else if ((m = /^rule add from (\S+) lookup (\d+) pref (\d+)$/.exec(line))) {
      if (n.rules.has(m[3])) throw new Error("RTNETLINK answers: File exists");
      n.rules.set(m[3], line.replace(/^rule add /, ""));
    } else if ((m = /^rule del pref (\d+)$/.exec(line))) {
      if (!n.rules.delete(m[1])) throw new Error("RTNETLINK answers: No such file or directory");
    } else if ((m = /^neigh (replace|del) proxy (\S+) dev (\S+)$/.exec(line))) {
      this.link(n, m[3]);
      const key = `${m[2]} dev ${m[3]}`;
      if (m[1] === "replace") n.proxies.add(key);
      else if (!n.proxies.delete(key)) throw new Error("RTNETLINK answers: No such file or directory");
    } else throw new Error(`FakeGwKernel: no model for ${JSON.stringify(line)}`);
  }

  /** The namespace's links, addresses, routes, rules, proxy neighbours and nft ruleset, sorted. */
  dump(ns: string): string {
    const n = this.nss.get(ns);
    const out: string[] = [];
    if (n) {
      for (const [dev, l] of [...n.links].sort(([a], [b]) => (a < b ? -1 : 1))) {
        const peer = l.peer ? ` peer ${l.peer[1]}${l.peer[0] === ns ? "" : ` netns ${l.peer[0]}`}` : "";
        out.push(`link ${dev}${peer}${l.alias ? ` alias ${l.alias}` : ""}${l.up ? " up" : ""}`);
        for (const [a, label] of [...l.addrs].sort()) out.push(`  addr ${a}${label ? ` label ${label}` : ""}`);
      }
      out.push(...[...n.routes.values()].sort().map((r) => `route ${r}`));
      out.push(...[...n.rules.values()].sort().map((r) => `rule ${r}`));
      out.push(...[...n.proxies].sort().map((p) => `neigh proxy ${p}`));
    }
    return out.join("\n") + (out.length ? "\n" : "") + this.nft.dump(ns);
  }
}
