// gRPC clients for the CLI, the tests and service-to-service calls: the gRPC
// protocol over HTTP/2 (h2c for http://, TLS for https://), an optional
// bearer token, and a deadline on every call.
import type { DescService } from "@bufbuild/protobuf";
import { createClient, type Client, type Interceptor, type Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

export interface ClientOptions {
  /** "127.0.0.1:7401", "http://127.0.0.1:7401" or "https://host:7401". */
  address: string;
  token?: string;
  timeoutMs?: number;
}

export function baseUrl(address: string): string {
  return /^https?:\/\//.test(address) ? address : `http://${address}`;
}

export function grpcTransport(opts: ClientOptions): Transport {
  const interceptors: Interceptor[] = [];
  if (opts.token) {
    const value = `Bearer ${opts.token}`;
    interceptors.push((next) => (req) => {
      req.header.set("authorization", value);
      return next(req);
    });
  }
  return createGrpcTransport({
    baseUrl: baseUrl(opts.address),
    interceptors,
    defaultTimeoutMs: opts.timeoutMs ?? 10_000,
  });
}

export function grpcClient<T extends DescService>(service: T, opts: ClientOptions | Transport): Client<T> {
  const transport = "address" in opts ? grpcTransport(opts) : opts;
  return createClient(service, transport);
}
