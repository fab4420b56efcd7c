// Domain errors. Services throw these; one function at the RPC boundary
// (toConnectError) maps them to gRPC status codes and keeps the cause, so a
// handler never picks a status code by hand.
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";

export abstract class DomainError extends Error {
  abstract readonly code: Code;
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** A request field is malformed. `field` names it, so the message can too. */
export class InvalidArgumentError extends DomainError {
  readonly code = Code.InvalidArgument;
  constructor(
    readonly field: string,
    message: string,
  ) {
    super(`${field}: ${message}`);
  }
}

export class NotFoundError extends DomainError {
  readonly code = Code.NotFound;
  constructor(
    readonly kind: string,
    readonly ref: string,
    hint?: string,
  ) {
    super(`${kind} ${JSON.stringify(ref)} not found${hint ? `; ${hint}` : ""}`);
  }
}

export class AlreadyExistsError extends DomainError {
  readonly code = Code.AlreadyExists;
}

export class FailedPreconditionError extends DomainError {
  readonly code = Code.FailedPrecondition;
}

export class ResourceExhaustedError extends DomainError {
  readonly code = Code.ResourceExhausted;
}

/** A dependency (Redis, the kernel) cannot be reached; retrying later may work. */
export class UnavailableError extends DomainError {
  readonly code = Code.Unavailable;
}

export class UnimplementedError extends DomainError {
  readonly code = Code.Unimplemented;
}

/** Errors ioredis raises when Redis is down, unreachable or too slow. */
function isRedisUnavailable(err: unknown): boolean {
  if (!(err instanceof Error)) return false;
  const msg = err.message ?? "";
  const code = (err as { code?: string }).code ?? "";
  return (
    err.name === "MaxRetriesPerRequestError" ||
    ["ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "EPIPE", "ENOTCONN"].includes(code) ||
    /Stream isn't writeable|Connection is closed|Command timed out|enableOfflineQueue|LOADING|MASTERDOWN|READONLY|BUSY /.test(msg)
  );
}

/**
 * Redis refused the command to this daemon's ACL user (--redis-user): plain
 * NOPERM, or a script's command on a key outside the user's patterns.
 */
export function isRedisNoPerm(err: unknown): boolean {
  if (!(err instanceof Error)) return false;
  return /^NOPERM |user executing the script can't access|has no permissions to (run|access)/.test(err.message ?? "");
}

/**
 * The message with every unpaired UTF-16 surrogate replaced by U+FFFD. A
 * status message is percent-encoded into the grpc-message trailer with
 * encodeURIComponent, which throws on a lone surrogate: the call then never
 * ends (the client waits for its deadline). Messages quote request values
 * and parser errors (JSON.parse quotes one code unit of a character), so one
 * half of a pair can get in.
 */
export function wellFormed(message: string): string {
  return message.replace(/[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g, "\uFFFD");
}

/** Maps any thrown value to the ConnectError the client sees. */
export function toConnectError(err: unknown): ConnectError {
  if (err instanceof ConnectError) {
    const raw = err.rawMessage;
    return wellFormed(raw) === raw ? err : new ConnectError(wellFormed(raw), err.code, err.metadata, undefined, err.cause);
  }
  if (err instanceof DomainError) return new ConnectError(wellFormed(err.message), err.code, undefined, undefined, err);
  if (isRedisUnavailable(err)) {
    return new ConnectError(
      `state store (Redis) unavailable: ${wellFormed((err as Error).message)}. The change may or may not have been applied; retry when Redis is back — with the same request id or client token a retry is safe`,
      Code.Unavailable,
      undefined,
      undefined,
      err,
    );
  }
  if (isRedisNoPerm(err)) {
    // A hypervisor's agents run as microvpc-host-<id> (docs/redis-acl.md): they
    // may change their own host's records, not cluster-wide ones.
    return new ConnectError(
      `this daemon's Redis user may not make this change (${(err as Error).message}); with per-host Redis users, cluster-wide changes (security groups, network ACLs, NAT gateways, floating IPs, port forwards, VPN endpoints and clients) go to a daemon running as the control user: see docs/redis-acl.md`,
      Code.PermissionDenied,
      undefined,
      undefined,
      err,
    );
  }
  const message = wellFormed(err instanceof Error ? err.message : String(err));
  return new ConnectError(`internal error: ${message}`, Code.Internal, undefined, undefined, err);
}

/**
 * What the daemons' server does with a handler's error (grpc-adapter.ts),
 * as a connect interceptor: for serving the same handlers over an in-memory
 * router transport (tests), so they see exactly the codes and messages a
 * gRPC client would.
 */
export const mapDomainErrors: Interceptor = (next) => async (req) => {
  try {
    return await next(req);
  } catch (e) {
    throw toConnectError(e);
  }
};
