// The gateway's one adapter to the kernel: the `ip -batch` lines its
// planner (plan.ts) returns, the two reads GatewaySync needs (does a transit
// link exist, which resolver addresses are on a VPC namespace's lo), the
// forwarding sysctl, and nft transactions (LinuxNft). Everything runs
// through services/common/exec.ts; tests use a fake (test/lib/fake-gw-kernel.ts).
import { run } from "../common/exec.js";
import { LinuxNft, type NftApplier } from "../common/nft/linux.js";
import type { RuleInfo } from "./plan.js";

export interface GatewayKernel extends NftApplier {
  /** Whether link `dev` exists in the host namespace. */
  hostLinkExists(dev: string): Promise<boolean>;
  /**
   * `ip -batch -` in the host namespace. force: `-force`, and failures are
   * not errors (removals of what may be gone already, idempotent replaces).
   */
  hostBatch(lines: string[], force?: boolean): Promise<void>;
  /** `ip -batch -` in VPC namespace `ns`: rejects at its first failing line; force: `-force`, failures are not errors. */
  vpcBatch(ns: string, lines: string[], force?: boolean): Promise<void>;
  /** The policy rules of VPC namespace `ns` (NAT steering, plan.ts natSteerLines). */
  vpcRules(ns: string): Promise<RuleInfo[]>;
  /**
   * Tells the uplink's neighbours that `address` is here now (unsolicited
   * ARP), after this host took a NAT gateway's address. Best effort: returns
   * why it could not ("" when sent).
   */
  announce?(dev: string, address: string): Promise<string>;
  /** IPv4 addresses on lo of VPC namespace `ns` that carry `label`. */
  vpcLoAddrs(ns: string, label: string): Promise<string[]>;
  /** Turns IPv4 forwarding on in the host namespace. */
  enableForwarding(): Promise<void>;
}

/** An `ip -batch -` run: the batch's first lines go into the error (ip names only the failing line's number). */
const batch = (lines: string[], netns = "") => ({ input: lines.join("\n") + "\n", inputInError: true, netns });

export class LinuxGatewayKernel implements GatewayKernel {
  constructor(
    /** Namespace of the hypervisor's uplink ("" = the daemon's own). */
    readonly hostNetns: string,
    readonly nft: NftApplier = new LinuxNft(),
  ) {}

  apply(...a: Parameters<NftApplier["apply"]>): Promise<void> {
    return this.nft.apply(...a);
  }

  async hostLinkExists(dev: string): Promise<boolean> {
    return (await run("ip", ["-j", "link", "show", "dev", dev], { netns: this.hostNetns, check: false })).exitCode === 0;
  }

  async hostBatch(lines: string[], force = false): Promise<void> {
    if (force) await run("ip", ["-force", "-batch", "-"], { ...batch(lines, this.hostNetns), check: false });
    else await run("ip", ["-batch", "-"], batch(lines, this.hostNetns));
  }

  async vpcBatch(ns: string, lines: string[], force = false): Promise<void> {
    if (force) await run("ip", ["-n", ns, "-force", "-batch", "-"], { ...batch(lines), check: false });
    else await run("ip", ["-n", ns, "-batch", "-"], batch(lines));
  }

  async vpcRules(ns: string): Promise<RuleInfo[]> {
    const { stdout } = await run("ip", ["-n", ns, "-j", "-4", "rule", "show"]);
    return JSON.parse(stdout || "[]") as RuleInfo[];
  }

  /**
   * iputils arping -U (package iputils-arping): two unsolicited ARP requests
   * for the address from the uplink, so that neighbours holding the previous
   * holder's MAC take ours at once. arping binds the address first, which
   * the kernel allows for an address not on the host only with
   * net.ipv4.ip_nonlocal_bind=1 in the uplink's namespace (docs/dataplane.md);
   * without it (or without arping) this returns the error and a neighbour
   * keeps the old MAC until its entry goes stale and its next ARP request
   * reaches our proxy entry (Linux neighbours: up to about a minute).
   */
  async announce(dev: string, address: string): Promise<string> {
    const r = await run("arping", ["-q", "-U", "-c", "2", "-w", "2", "-I", dev, address], { netns: this.hostNetns, check: false });
    return r.exitCode === 0 ? "" : (r.stderr || r.error?.message || `arping exited ${r.exitCode}`).trim();
  }

  async vpcLoAddrs(ns: string, label: string): Promise<string[]> {
    const { stdout } = await run("ip", ["-n", ns, "-j", "addr", "show", "dev", "lo"]);
    return ((JSON.parse(stdout || "[]") as { addr_info?: { local: string; label?: string; family: string }[] }[])[0]?.addr_info ?? [])
      .filter((a) => a.family === "inet" && a.label === label)
      .map((a) => a.local);
  }

  async enableForwarding(): Promise<void> {
    await run("sysctl", ["-q", "-w", "net.ipv4.ip_forward=1"], { netns: this.hostNetns });
  }
}
