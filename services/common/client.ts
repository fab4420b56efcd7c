// gRPC clients for service-to-service calls (the vmm) and the tests: typed
// connect clients (Client<typeof Service>) whose calls go through @grpc/grpc-js
// (grpc-adapter.ts), over HTTP/2 (h2c for http://, TLS for https://), with an
// optional bearer token, an optional client certificate (mutual TLS) and a
// deadline on every call. The CLI builds its own connect-node transports
// (cli/lib/context.ts) and passes them to grpcClient.
import type { DescService } from "@bufbuild/protobuf";
import { createClient, type Client, type Transport } from "@connectrpc/connect";
import { grpcJsTransport } from "./grpc-adapter.js";

export interface ClientOptions {
  /** "127.0.0.1:7401", "http://127.0.0.1:7401" or "https://host:7401". */
  address: string;
  token?: string;
  /** Deadline of each call (default 10 s; 0: none). */
  timeoutMs?: number;
  /** Over https://: the CA that signed the server's certificate (default: the system's), and a client certificate and key for mutual TLS (PEM). */
  tls?: { ca?: Buffer; cert?: Buffer; key?: Buffer };
}

export function baseUrl(address: string): string {
  return /^https?:\/\//.test(address) ? address : `http://${address}`;
}

export function grpcTransport(opts: ClientOptions): Transport {
  return grpcJsTransport({
    address: baseUrl(opts.address),
    header: opts.token ? { authorization: `Bearer ${opts.token}` } : undefined,
    timeoutMs: opts.timeoutMs ?? 10_000,
    tls: opts.tls,
  });
}

export function grpcClient<T extends DescService>(service: T, opts: ClientOptions | Transport): Client<T> {
  const transport = "address" in opts ? grpcTransport(opts) : opts;
  return createClient(service, transport);
}
