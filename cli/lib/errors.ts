// Exit codes scripts can rely on, and the one place that turns any failure
// into `error: <message>` on stderr plus one of those codes.
import { Code, ConnectError } from "@connectrpc/connect";
import { CommanderError } from "commander";
import { DomainError, toConnectError } from "../../services/common/errors.js";
import { DAEMONS, originOf, type CallOrigin } from "./context.js";

export const EXIT = {
  ok: 0,
  error: 1,
  usage: 2,
  notFound: 3,
  conflict: 4,
  precondition: 5,
  unavailable: 6,
  invalid: 7,
  unreachable: 8,
} as const;

/**
 * Ends a command with an exit code after it has printed what it had to say
 * (e.g. `status` with an unhealthy service); report() prints nothing for it.
 */
export class ExitCode extends Error {
  constructor(readonly code: number) {
    super(`exit ${code}`);
  }
}

export const EXIT_HELP = `Exit codes:
  0  ok
  1  other error
  2  usage error (unknown command or option, missing argument)
  3  not found
  4  already exists / conflict
  5  failed precondition (e.g. deleting a VPC that still has subnets)
  6  unavailable: a daemon is down, timed out, or does not offer that call yet
     (the message names the daemon and its address)
  7  invalid argument (the message names the field and what to change)
  8  test-connectivity: the probe ran, and the target is not reachable`;

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
    case Code.Unimplemented:
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

/**
 * True if the connection to the daemon itself was refused. Only the local
 * cause chain counts: an error the daemon sent back (its own call to another
 * daemon was refused) has no cause, and its message is shown as it is.
 */
export function isConnRefused(err: ConnectError): boolean {
  for (let e: unknown = err.cause; e instanceof Error; e = e.cause) {
    if ((e as { code?: string }).code === "ECONNREFUSED" || /ECONNREFUSED/.test(e.message)) return true;
  }
  return false;
}

/**
 * The request id the daemon gave the failed call (its x-request-id response
 * header, repeated in the trailers of an error), or undefined if none came
 * back (the call never reached a daemon). Every daemon log line about the
 * call carries it as reqId.
 */
export function requestIdOf(err: ConnectError): string | undefined {
  const v = err.metadata.get("x-request-id");
  if (!v) return undefined;
  const id = v.split(",")[0].trim();
  return /^[A-Za-z0-9_.:-]{1,64}$/.test(id) ? id : undefined;
}

/** How to point the CLI at a daemon, for messages. */
function howToSet(o: CallOrigin): string {
  const d = DAEMONS[o.daemon];
  return `set ${d.option} or ${d.env}${o.daemon === "ipam" ? "" : ", or --host for all of a hypervisor's daemons"}`;
}

/**
 * Prints the failure to stderr and returns the exit code for it. `fallback`
 * is the daemon assumed when the error does not say where it came from.
 */
export function report(err: unknown, fallback: CallOrigin): number {
  if (err instanceof ExitCode) return err.code;
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
  const o = originOf(e) ?? fallback;
  const at = o.address;
  let msg = e.rawMessage;
  if (e.code === Code.Unavailable && isConnRefused(e)) {
    msg = `cannot connect to ${at} (connection refused); is microvpcd ${o.daemon} running at ${at}? (${howToSet(o)})`;
  } else if (e.code === Code.DeadlineExceeded) {
    msg = `${msg}; no answer from microvpcd ${o.daemon} at ${at} in time (raise --timeout-ms, or check that it is healthy)`;
  } else if (e.code === Code.Unauthenticated) {
    msg = `${msg}; pass the daemon's token with --token or MICROVPC_TOKEN`;
  } else if ((e.code === Code.Unavailable || e.code === Code.Internal) && o.method !== "" && !e.cause) {
    // The daemon answered: the failure is behind it (its Redis, or a daemon it calls).
    msg = `${msg} (reported by microvpcd ${o.daemon} at ${at})`;
  } else if (e.code === Code.Unimplemented) {
    msg = `${o.method.replace(/^microvpc\.v1\./, "")} is not available on this server yet: microvpcd ${o.daemon} at ${at} answers UNIMPLEMENTED (it needs a newer microvpcd, or ${DAEMONS[o.daemon].option} points at another daemon)`;
  }
  // An internal error is a bug or a broken dependency behind the daemon: the
  // request id is what finds its log line (and stack) there.
  const reqId = e.code === Code.Internal || e.code === Code.Unknown || e.code === Code.DataLoss ? requestIdOf(e) : undefined;
  const ref = reqId ? `\n  request id ${reqId}: the daemon's log line for this call has reqId=${reqId} (microvpcd ${o.daemon} at ${at})` : "";
  process.stderr.write(`error: ${msg} (${codeName(e.code)})${ref}\n`);
  return exitFor(e.code);
}

/** The call's answer, or null where it answered NOT_FOUND (other errors are thrown). */
export async function notFoundIsNull<T>(p: Promise<T>): Promise<T | null> {
  try {
    return await p;
  } catch (e) {
    if (e instanceof ConnectError && e.code === Code.NotFound) return null;
    throw e;
  }
}
