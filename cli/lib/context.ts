// What every command needs from the global options: a client for a service
// and the chosen output format.
import type { DescService } from "@bufbuild/protobuf";
import type { Client, Transport } from "@connectrpc/connect";
import type { Command } from "commander";
import { grpcClient, grpcTransport } from "../../services/common/client.js";

export interface Globals {
  server: string;
  token?: string;
  output: "table" | "json";
  timeoutMs?: number;
}

export function globals(cmd: Command): Globals {
  return cmd.optsWithGlobals() as Globals;
}

// One transport per process, so a command that makes several calls (resolve
// a name, then act) reuses one HTTP/2 connection.
let transport: Transport | undefined;

export function client<T extends DescService>(cmd: Command, service: T): Client<T> {
  const g = globals(cmd);
  transport ??= grpcTransport({ address: g.server, token: g.token, timeoutMs: g.timeoutMs });
  return grpcClient(service, transport);
}
