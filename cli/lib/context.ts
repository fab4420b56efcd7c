// What every command needs from the global options: a client for a service
// (on the daemon that serves it) and the chosen output format.
//
// microvpc talks to five daemons. ipam is cluster-wide (VPCs, subnets,
// addresses, peering, DNS); the other four run on every hypervisor. Each
// daemon's address is, in order of precedence: its own option or variable
// (--server/MICROVPC_SERVER for ipam, --netagent/MICROVPC_NETAGENT, …), then
// --host/MICROVPC_HOST with the daemon's default port, then 127.0.0.1 with
// that port.
import { readFileSync, statSync } from "node:fs";
import type { DescService } from "@bufbuild/protobuf";
import { ConnectError, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import { InvalidArgumentError, type Command } from "commander";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { baseUrl, grpcClient, tokenRefusal } from "../../services/common/client.js";
import { progressInterceptor } from "./progress.js";

export type Daemon = "ipam" | "netagent" | "firewall" | "gateway" | "vmm";

export const DAEMONS: Record<Daemon, { port: number; option: string; env: string; serves: string }> = {
  ipam: { port: 7401, option: "--server", env: "MICROVPC_SERVER", serves: "VPCs, subnets, addresses, peering, DNS" },
  netagent: { port: 7402, option: "--netagent", env: "MICROVPC_NETAGENT", serves: "NICs, host and overlay status" },
  firewall: { port: 7403, option: "--firewall", env: "MICROVPC_FIREWALL", serves: "security groups, network ACLs" },
  gateway: { port: 7404, option: "--gateway", env: "MICROVPC_GATEWAY", serves: "NAT gateways, floating IPs, port forwards" },
  vmm: { port: 7405, option: "--vmm", env: "MICROVPC_VMM", serves: "VMs, connectivity tests" },
};

export const DAEMON_NAMES = Object.keys(DAEMONS) as Daemon[];

export interface Globals {
  server?: string;
  netagent?: string;
  firewall?: string;
  gateway?: string;
  vmm?: string;
  host?: string;
  token?: string;
  tokenFile?: string;
  insecureSendToken?: boolean;
  caCert?: string;
  caFile?: string;
  clientCert?: string;
  clientKey?: string;
  output: "table" | "wide" | "json" | "yaml" | "name";
  headers?: boolean;
  timeoutMs?: number;
  context?: string;
}

export function globals(cmd: Command): Globals {
  return cmd.optsWithGlobals() as Globals;
}

/** True if --timeout-ms (or its variable) was given, rather than defaulted. */
export function timeoutGiven(cmd: Command): boolean {
  let root = cmd;
  while (root.parent) root = root.parent;
  const src = root.getOptionValueSource("timeoutMs");
  return src !== undefined && src !== "default";
}

/**
 * --host: a host name, IPv4 address or [IPv6] address, optionally with
 * http:// or https://, and no port (each daemon has its own).
 */
export function parseHost(value: string): string {
  const m = /^(https?:\/\/)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)\/?$/.exec(value);
  if (!m) {
    if (/^(https?:\/\/)?(\[[^\]]*\]|[^:/]+):[0-9]+\/?$/.test(value)) {
      throw new InvalidArgumentError(
        "--host takes a host without a port: each daemon keeps its own port (ipam 7401, netagent 7402, firewall 7403, gateway 7404, vmm 7405); to move one daemon, use its option, e.g. --firewall host:port",
      );
    }
    throw new InvalidArgumentError('expected a host name or address, e.g. "10.0.0.5", "hv1.example" or "https://hv1.example"');
  }
  return `${m[1] ?? ""}${m[2]}`;
}

/** The address of a daemon, from its option, --host, or the default. */
export function address(cmd: Command, daemon: Daemon): string {
  const g = globals(cmd);
  const own = daemon === "ipam" ? g.server : g[daemon];
  if (own) return own;
  return `${g.host ?? "127.0.0.1"}:${DAEMONS[daemon].port}`;
}

/** Which daemon serves a gRPC service. */
export function daemonOf(service: DescService): Daemon {
  switch (service.typeName) {
    case "microvpc.v1.NetAgentService":
    case "microvpc.v1.VpnService":
      return "netagent";
    case "microvpc.v1.FirewallService":
      return "firewall";
    case "microvpc.v1.GatewayService":
      return "gateway";
    case "microvpc.v1.VmService":
      return "vmm";
    default:
      return "ipam";
  }
}

/** Where a failed call went, so that the error message can name the daemon. */
export interface CallOrigin {
  daemon: Daemon;
  address: string;
  method: string;
}

const origins = new WeakMap<object, CallOrigin>();

export function originOf(err: unknown): CallOrigin | undefined {
  return typeof err === "object" && err !== null ? origins.get(err) : undefined;
}

function originInterceptor(daemon: Daemon, addr: string): Interceptor {
  return (next) => async (req) => {
    try {
      return await next(req);
    } catch (e) {
      if (e instanceof ConnectError) origins.set(e, { daemon, address: addr, method: `${req.service.typeName}/${req.method.name}` });
      throw e;
    }
  };
}

/** --ca-cert (or --ca-file), --client-cert/--client-key: whom to trust over https://, and the certificate for mutual TLS. */
export function tlsOptions(g: Pick<Globals, "caCert" | "caFile" | "clientCert" | "clientKey">): { ca?: Buffer; cert?: Buffer; key?: Buffer } {
  if (!!g.clientCert !== !!g.clientKey) throw new Error("--client-cert and --client-key go together");
  if (g.caCert && g.caFile && g.caCert !== g.caFile) throw new Error("--ca-cert and --ca-file are the same option; give one");
  const ca = g.caCert ?? g.caFile;
  return {
    ...(ca ? { ca: readFileSync(ca) } : {}),
    ...(g.clientCert ? { cert: readFileSync(g.clientCert), key: readFileSync(g.clientKey!) } : {}),
  };
}

/**
 * The bearer token: --token, or the first line of --token-file. A token file
 * every user of the machine may read is refused: the token is a credential.
 */
export function tokenOf(g: Pick<Globals, "token" | "tokenFile">): string | undefined {
  if (g.token && g.tokenFile) throw new Error("--token and --token-file both given; give one (--token-file keeps the token out of ps and shell history)");
  if (!g.tokenFile) return g.token || undefined;
  const st = statSync(g.tokenFile);
  if ((st.mode & 0o004) !== 0) {
    throw new Error(
      `--token-file ${g.tokenFile} is readable by every user of this machine (mode ${(st.mode & 0o777).toString(8).padStart(4, "0")}); refusing to use a token anyone could read: chmod 600 it`,
    );
  }
  const token = readFileSync(g.tokenFile, "utf8").split("\n")[0].trim();
  if (token === "") throw new Error(`--token-file ${g.tokenFile} is empty`);
  return token;
}

// One transport per daemon and process, so a command that makes several
// calls (resolve a name, then act) reuses one HTTP/2 connection. Built here
// rather than with services/common/client.ts's grpcTransport so that the
// CLI's interceptors (error origin, progress) run too; the bearer token is
// sent the same way.
const transports = new Map<string, Transport>();

export function transportFor(cmd: Command, daemon: Daemon): Transport {
  const g = globals(cmd);
  const addr = address(cmd, daemon);
  const key = `${daemon} ${addr}`;
  let t = transports.get(key);
  if (!t) {
    const interceptors: Interceptor[] = [originInterceptor(daemon, addr), progressInterceptor()];
    const token = tokenOf(g);
    const refusal = tokenRefusal(addr, token, !!g.insecureSendToken);
    if (refusal) throw new Error(refusal);
    if (token) {
      const value = `Bearer ${token}`;
      interceptors.push((next) => (req) => {
        req.header.set("authorization", value);
        return next(req);
      });
    }
    t = createGrpcTransport({ baseUrl: baseUrl(addr), interceptors, defaultTimeoutMs: g.timeoutMs ?? 10_000, nodeOptions: tlsOptions(g) });
    transports.set(key, t);
  }
  return t;
}

export function client<T extends DescService>(cmd: Command, service: T, daemon: Daemon = daemonOf(service)): Client<T> {
  return grpcClient(service, transportFor(cmd, daemon));
}
