// Exit codes scripts can rely on, and the one place that turns any failure
// into `error: <message>` on stderr plus one of those codes.
import { Code, ConnectError } from "@connectrpc/connect";
import { CommanderError } from "commander";
import { DomainError, toConnectError } from "../../services/common/errors.js";

export const EXIT = {
  ok: 0,
  error: 1,
  usage: 2,
  notFound: 3,
  conflict: 4,
  precondition: 5,
  unavailable: 6,
  invalid: 7,
} as const;

export const EXIT_HELP = `Exit codes:
  0  ok
  1  other error
  2  usage error (unknown command or option, missing argument)
  3  not found
  4  already exists / conflict
  5  failed precondition (e.g. deleting a VPC that still has subnets)
  6  unavailable or timed out (microvpcd or its Redis is down; safe to retry)
  7  invalid argument (the message names the field and what to change)`;

function exitFor(code: Code): number {
  switch (code) {
    case Code.NotFound:
      return EXIT.notFound;
    case Code.AlreadyExists:
    case Code.Aborted:
      return EXIT.conflict;
    case Code.FailedPrecondition:
      return EXIT.precondition;
    case Code.Unavailable:
    case Code.DeadlineExceeded:
      return EXIT.unavailable;
    case Code.InvalidArgument:
    case Code.OutOfRange:
      return EXIT.invalid;
    default:
      return EXIT.error;
  }
}

/** "FailedPrecondition" -> "failed_precondition", as gRPC spells it on the wire. */
function codeName(code: Code): string {
  return Code[code].replace(/([a-z])([A-Z])/g, "$1_$2").toLowerCase();
}

function isConnRefused(err: ConnectError): boolean {
  for (let e: unknown = err; e instanceof Error; e = e.cause) {
    if ((e as { code?: string }).code === "ECONNREFUSED" || /ECONNREFUSED/.test(e.message)) return true;
  }
  return false;
}

/** Prints the failure to stderr and returns the exit code for it. */
export function report(err: unknown, server: string): number {
  if (err instanceof CommanderError) {
    // Commander has already printed its message.
    return err.code === "commander.helpDisplayed" || err.code === "commander.version" ? EXIT.ok : EXIT.usage;
  }
  // Local validation throws the same domain errors the server would.
  const e = err instanceof DomainError ? toConnectError(err) : err;
  if (!(e instanceof ConnectError)) {
    process.stderr.write(`error: ${e instanceof Error ? e.message : String(e)}\n`);
    return EXIT.error;
  }
  let msg = e.rawMessage;
  if (e.code === Code.Unavailable && isConnRefused(e)) {
    msg = `cannot connect to ${server} (connection refused); is microvpcd ipam running at ${server}? (set --server or MICROVPC_SERVER)`;
  } else if (e.code === Code.DeadlineExceeded) {
    msg = `${msg}; no answer from ${server} in time (raise --timeout-ms, or check that microvpcd is healthy)`;
  } else if (e.code === Code.Unauthenticated) {
    msg = `${msg}; pass the daemon's token with --token or MICROVPC_TOKEN`;
  }
  process.stderr.write(`error: ${msg} (${codeName(e.code)})\n`);
  return exitFor(e.code);
}
