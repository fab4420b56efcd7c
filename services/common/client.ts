// gRPC clients for service-to-service calls (the vmm) and the tests: typed
// connect clients (Client<typeof Service>) whose calls go through @grpc/grpc-js
// (grpc-adapter.ts), over HTTP/2 (h2c for http://, TLS for https://), with an
// optional bearer token, an optional client certificate (mutual TLS) and a
// deadline on every call. A call made while serving one (the vmm's steps)
// carries that call's x-request-id and trace context (traceparent,
// tracestate: tracing.ts), so the daemons it reaches log the same request id
// and continue the same trace. The CLI builds its own connect-node transports
// (cli/lib/context.ts) and passes them to grpcClient.
import type { DescService } from "@bufbuild/protobuf";
import { createClient, type Client, type Transport } from "@connectrpc/connect";
import { grpcJsTransport } from "./grpc-adapter.js";
import { injectCallHeaders } from "./tracing.js";

export interface ClientOptions {
  /**
   * "127.0.0.1:7401", "http://127.0.0.1:7401" or "https://host:7401"; or a
   * grpc-js target after the scheme, balanced by balancedChannel():
   * "https://dns:///microvpc-ipam-headless:7401" (every address the name
   * resolves to), "http://ipv4:127.0.0.1:7401,127.0.0.1:7411".
   */
  address: string;
  token?: string;
  /** Deadline of each call (default 10 s; 0: none). */
  timeoutMs?: number;
  /** Over https://: the CA that signed the server's certificate (default: the system's), and a client certificate and key for mutual TLS (PEM). */
  tls?: { ca?: Buffer; cert?: Buffer; key?: Buffer };
}

/**
 * Client-side balancing. A long-lived HTTP/2 connection to a ClusterIP
 * Service sticks to the one replica kube-proxy picked when it opened; with a
 * headless Service (deploy/k8s: microvpc-ipam-headless) the name resolves to
 * every ready pod, and round_robin keeps a connection to each and spreads
 * the calls over them. grpc-js resolves again when a connection drops (a
 * pod went away), at most every 5 s.
 */
export const BALANCED_CHANNEL_OPTIONS = {
  "grpc.service_config": JSON.stringify({ loadBalancingConfig: [{ round_robin: {} }] }),
  "grpc.dns_min_time_between_resolutions_ms": 5000,
} as const;

/** Which addresses name several backends: a dns:/// (or dns://server/) target or an ipv4:/ipv6: list. */
const BALANCED_TARGET = /^(dns:|ipv4:|ipv6:)/;

/** The channel options for an address: round_robin for the targets above, grpc-js's defaults (pick_first) otherwise. */
export function balancedChannel(address: string): typeof BALANCED_CHANNEL_OPTIONS | undefined {
  return BALANCED_TARGET.test(address.replace(/^https?:\/\//, "")) ? BALANCED_CHANNEL_OPTIONS : undefined;
}

/** The hosts an address names: one, or each of an ipv4:/ipv6: list, or a dns: target's name. */
export function targetHosts(address: string): string[] {
  const t = address.replace(/^https?:\/\//, "");
  const strip = (hp: string) => hp.replace(/^\[(.*)\](:\d+)?$/, "$1").replace(/^([^:]*)(:\d+)?$/, "$1");
  if (/^ipv[46]:/.test(t)) return t.slice(5).split(",").map(strip);
  const dns = /^dns:(?:\/\/[^/]*)?\/(.*)$/.exec(t);
  if (dns) return [strip(dns[1])];
  return [];
}

export function baseUrl(address: string): string {
  return /^https?:\/\//.test(address) ? address : `http://${address}`;
}

/** Which hosts never leave this machine: the daemons' listener rule and the clients' token rule. */
export function isLoopback(host: string): boolean {
  return host === "localhost" || host === "::1" || /^127\./.test(host);
}

/**
 * Why the bearer token may not go to this address, or undefined if it may.
 * Over plaintext (http://, the default) anyone on the path reads the token
 * and can then make every call; only loopback never leaves the host. TLS
 * (https://) is fine anywhere; --insecure-send-token overrides, e.g. on a
 * network the operator trusts. Without a token there is nothing to leak.
 */
export function tokenRefusal(addr: string, token: string | undefined, insecure = false, loopback: (host: string) => boolean = isLoopback): string | undefined {
  if (!token || insecure) return undefined;
  const url = baseUrl(addr);
  if (url.startsWith("https://")) return undefined;
  let hosts = targetHosts(addr);
  if (!hosts.length) {
    try {
      hosts = [new URL(url).hostname.replace(/^\[(.*)\]$/, "$1")];
    } catch {
      hosts = [addr];
    }
  }
  if (hosts.every(loopback)) return undefined;
  return (
    `refusing to send the bearer token in clear text to ${addr}: it is not a loopback address, so anyone on the network path could read the token and reuse it; ` +
    `use https://${addr.replace(/^http:\/\//, "")} (the daemon with --tls-cert/--tls-key), or pass --insecure-send-token (MICROVPC_INSECURE_SEND_TOKEN=1) if this network is trusted`
  );
}

export function grpcTransport(opts: ClientOptions): Transport {
  return grpcJsTransport({
    address: baseUrl(opts.address),
    header: opts.token ? { authorization: `Bearer ${opts.token}` } : undefined,
    timeoutMs: opts.timeoutMs ?? 10_000,
    tls: opts.tls,
    outgoing: injectCallHeaders,
    channelOptions: balancedChannel(opts.address),
  });
}

export function grpcClient<T extends DescService>(service: T, opts: ClientOptions | Transport): Client<T> {
  const transport = "address" in opts ? grpcTransport(opts) : opts;
  return createClient(service, transport);
}
