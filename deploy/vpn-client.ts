// A VPN client as a user brings it up: the wg-quick file `microvpc vpn
// client add` prints, made into a wireguard-go interface in a namespace the
// way `wg-quick up` would (wg setconf with wg-quick's own keys taken out, the
// Address, the link up, a route per AllowedIPs). The quickstart's demo runs
// one in the internet namespace (deploy/demo.ts); test/integration/vpn.test.ts
// runs its clients with it.
//
// - parseClientConfig() reads the file strictly, with the validators that
//   guard VpnService (keys, addresses, CIDRs, the port): a file is input, and
//   nothing in it reaches a command unchecked.
// - upPlan() is pure: the `wg setconf` text and the argv of each command.
// - startVpnClient() is the one part that runs anything: wireguard-go as the
//   netagents start it (services/common/exec.ts, `-f`, detached when it must
//   outlive its caller), then the plan. On any failure it ends that
//   wireguard-go and removes its socket: nothing is left half made.
import type { ChildProcess } from "node:child_process";
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { InvalidArgumentError } from "../services/common/errors.js";
import { run, startDaemon } from "../services/common/exec.js";
import * as V from "../services/common/validate.js";
import { publicAddress, publicKey } from "../services/netagent/vpn/plan.js";

export interface ClientConfig {
  privateKey: string;
  /** The client's own address (wg-quick's Address, a /32). */
  address: string;
  peer: { publicKey: string; allowedIps: string[]; endpoint: { host: string; port: number }; keepalive: number };
}

/** Reads a wg-quick file of `microvpc vpn client add`: one [Interface] and one [Peer], every value checked. */
export function parseClientConfig(text: string): ClientConfig {
  const sections: Record<string, Record<string, string>> = {};
  let cur: Record<string, string> | undefined;
  for (const raw of text.split("\n")) {
    const line = raw.replace(/#.*$/, "").trim();
    if (line === "") continue;
    const sec = /^\[(Interface|Peer)\]$/.exec(line);
    if (sec) {
      if (sections[sec[1]]) throw new InvalidArgumentError(`[${sec[1]}]`, "appears twice; a microvpc client file has one [Interface] and one [Peer]");
      cur = sections[sec[1]] = {};
      continue;
    }
    const kv = /^([A-Za-z]+)\s*=\s*(.*)$/.exec(line);
    if (!kv || !cur) throw new InvalidArgumentError("config", `${V.show(line)} is neither a [section] nor a "Key = value" line inside one`);
    cur[kv[1]] = kv[2];
  }
  const [i, p] = [sections.Interface, sections.Peer];
  if (!i || !p) throw new InvalidArgumentError("config", "needs an [Interface] and a [Peer] section (the file `microvpc vpn client add` prints)");
  const privateKey = i.PrivateKey ?? "";
  // A private key has a public key's shape: 32 bytes in base64.
  if (privateKey.startsWith("<"))
    throw new InvalidArgumentError("PrivateKey", "is a placeholder: the client was added with --public-key; put its private key here");
  publicKey("PrivateKey", privateKey);
  const address = V.cidr("Address", i.Address ?? "", { min: 32, max: 32 }).text.replace(/\/32$/, "");
  const allowedIps = (p.AllowedIPs ?? "").split(",").map((c) => V.cidr("AllowedIPs", c.trim(), { min: 0, max: 32 }).text);
  const ep = /^(.+):([0-9]{1,5})$/.exec(p.Endpoint ?? "");
  if (!ep) throw new InvalidArgumentError("Endpoint", `${V.show(p.Endpoint ?? "")} is not HOST:PORT`);
  const keepalive = p.PersistentKeepalive === undefined ? 0 : Number(p.PersistentKeepalive);
  if (!Number.isInteger(keepalive) || keepalive < 0 || keepalive > 65535)
    throw new InvalidArgumentError("PersistentKeepalive", `${V.show(p.PersistentKeepalive ?? "")} is not 0–65535 seconds`);
  return {
    privateKey,
    address,
    peer: {
      publicKey: publicKey("PublicKey", p.PublicKey ?? ""),
      allowedIps,
      endpoint: { host: publicAddress("Endpoint", ep[1]), port: V.port("Endpoint", Number(ep[2])) },
      keepalive,
    },
  };
}

/**
 * What `wg-quick up` does, as data: the file `wg setconf` reads (wg-quick's
 * Address taken out) and the commands, in order. extraAllowed widens the
 * peer's AllowedIPs (and routes them into the tunnel): what a user could do
 * to their own file, which the endpoint must not honour.
 */
export function upPlan(
  ns: string,
  ifname: string,
  cfg: ClientConfig,
  confFile: string,
  extraAllowed: string[] = [],
): { setconf: string; commands: string[][] } {
  V.ifname("ifname", ifname);
  const allowed = [...cfg.peer.allowedIps, ...extraAllowed.map((c) => V.cidr("extraAllowed", c, { min: 0, max: 32 }).text)];
  const setconf = [
    "[Interface]",
    `PrivateKey = ${cfg.privateKey}`,
    "",
    "[Peer]",
    `PublicKey = ${cfg.peer.publicKey}`,
    `AllowedIPs = ${allowed.join(", ")}`,
    `Endpoint = ${cfg.peer.endpoint.host}:${cfg.peer.endpoint.port}`,
    ...(cfg.peer.keepalive ? [`PersistentKeepalive = ${cfg.peer.keepalive}`] : []),
    "",
  ].join("\n");
  return {
    setconf,
    commands: [
      ["ip", "netns", "exec", ns, "wg", "setconf", ifname, confFile],
      ["ip", "-n", ns, "addr", "add", `${cfg.address}/32`, "dev", ifname],
      ["ip", "-n", ns, "link", "set", ifname, "up"],
      ...allowed.map((c) => ["ip", "-n", ns, "route", "replace", c, "dev", ifname]),
    ],
  };
}

export interface VpnClientOptions {
  /** The namespace the client lives in (it must reach the endpoint's address). */
  ns: string;
  ifname: string;
  /** The wg-quick file as `microvpc vpn client add` printed it. */
  config: string;
  /** Where the `wg setconf` file (it holds the private key: 0600) is written. */
  dir: string;
  extraAllowed?: string[];
  /** Outlive the caller (the demo); otherwise it ends with the caller's process. */
  detached?: boolean;
  /** Called with wireguard-go's PID as soon as it runs, before anything can fail (to record it for cleanup). */
  onPid?: (pid: number) => void;
  /** How long wireguard-go gets to make its interface (default 10 s). */
  timeoutMs?: number;
}

export interface VpnClient {
  ifname: string;
  address: string;
  pid: number;
  /** The wireguard-go child (for tests that track it). */
  proc: ChildProcess;
}

/** wireguard-go's control socket: global, not per namespace. */
export const wgSocket = (ifname: string) => `/var/run/wireguard/${ifname}.sock`;

/** Brings the client up in o.ns (see the header); on failure ends its wireguard-go, removes its socket, and rethrows. */
export async function startVpnClient(o: VpnClientOptions): Promise<VpnClient> {
  const cfg = parseClientConfig(o.config);
  mkdirSync(o.dir, { recursive: true, mode: 0o700 });
  const file = join(o.dir, `${o.ifname}.conf`);
  const plan = upPlan(o.ns, o.ifname, cfg, file, o.extraAllowed);
  const d = await startDaemon("wireguard-go", ["-f", o.ifname], {
    netns: o.ns,
    detached: !!o.detached,
    env: { WG_PROCESS_FOREGROUND: "1", LOG_LEVEL: "error" },
  });
  o.onPid?.(d.pid);
  try {
    const end = Date.now() + (o.timeoutMs ?? 10_000);
    while ((await run("ip", ["-n", o.ns, "link", "show", o.ifname], { check: false, timeoutMs: 5_000 })).exitCode !== 0) {
      if (d.proc.exitCode !== null || d.proc.signalCode !== null)
        throw new Error(`wireguard-go -f ${o.ifname} in ${o.ns} exited (${d.proc.exitCode ?? d.proc.signalCode})`);
      if (Date.now() > end) throw new Error(`wireguard-go -f ${o.ifname} in ${o.ns} made no interface within ${o.timeoutMs ?? 10_000} ms`);
      await new Promise((r) => setTimeout(r, 50));
    }
    writeFileSync(file, plan.setconf, { mode: 0o600 });
    for (const [f, ...args] of plan.commands) await run(f, args, { timeoutMs: 10_000 });
  } catch (err) {
    d.proc.kill("SIGKILL");
    rmSync(wgSocket(o.ifname), { force: true });
    throw err;
  }
  return { ifname: o.ifname, address: cfg.address, pid: d.pid, proc: d.proc };
}
