// grpc.health.v1, so Kubernetes gRPC probes and grpc_health_probe work. The
// overall status ("") and each service's status follow a readiness check the
// service supplies (for most: "can I reach Redis?").
//
// The check runs at most once per interval however many callers there are:
// Check and List share one cached answer (and one probe in flight), and every
// Watch stream is fed from one periodic probe that runs only while someone
// watches. A thousand watchers must not mean a thousand Redis PINGs a second.
//
// Not grpc-health-check's HealthImplementation: it answers from a status map
// someone must keep setting (setStatus), so readiness would be probed on a
// timer whether anyone asks or not, and its Watch has no shared probe.
import { Code, ConnectError } from "@connectrpc/connect";
import { Option } from "commander";
import type { Redis } from "ioredis";
import { constantMessage, route, type ServiceBinding } from "./grpc-adapter.js";
import { reconcileDuration, reconcileErrors, reconcileLastSuccess } from "./metrics.js";
import { Health, HealthCheckResponse_ServingStatus as Status, HealthCheckResponseSchema } from "../../gen/grpc/health/v1/health_pb.js";

export type ReadyCheck = () => Promise<boolean>;

/** How often the readiness check runs at most (and while anyone watches, at least). */
export const HEALTH_INTERVAL_MS = 1000;

/**
 * How long a "not ready" answer is reused: short, so a daemon that becomes
 * ready (at start, its Redis connection up a moment after the listener)
 * says so within a tenth of a second, not a whole interval later; still at
 * most ten probes a second however many ask.
 */
export const NOT_READY_REUSE_MS = 100;

const instances = new Set<WeakRef<SharedReadiness>>();

/**
 * Something readiness reads has just changed (the gateway's metadata child
 * died or came back): every answer of this process is probed afresh at the
 * next ask, and watchers are told now, instead of up to one interval later.
 */
export function readinessChanged(): void {
  for (const ref of instances) {
    const r = ref.deref();
    if (r) r.invalidate();
    else instances.delete(ref);
  }
}

/** One readiness answer shared by every health caller of a server. */
export class SharedReadiness {
  private value: boolean | undefined;
  private at = 0;
  private inflight: Promise<boolean> | undefined;
  private readonly waiters = new Set<() => void>();
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly ready: ReadyCheck,
    private readonly intervalMs = HEALTH_INTERVAL_MS,
  ) {
    instances.add(new WeakRef(this));
  }

  /** Forget the cached answer; probe now if anyone watches. */
  invalidate(): void {
    this.at = 0;
    if (this.waiters.size) void this.probe();
  }

  /** The last answer if it is fresh, else the answer of one probe shared by all who ask now. */
  get(): Promise<boolean> {
    const v = this.fresh();
    return v === undefined ? this.probe() : Promise.resolve(v);
  }

  /** The last answer if it is still fresh (get() would reuse it), else undefined. */
  fresh(): boolean | undefined {
    const reuse = this.value ? this.intervalMs : Math.min(this.intervalMs, NOT_READY_REUSE_MS);
    return this.value !== undefined && Date.now() - this.at < reuse ? this.value : undefined;
  }

  private probe(): Promise<boolean> {
    this.inflight ??= this.ready()
      .catch(() => false)
      .then((v) => {
        this.inflight = undefined;
        const changed = v !== this.value;
        this.value = v;
        this.at = Date.now();
        if (changed) {
          const wake = [...this.waiters];
          this.waiters.clear();
          for (const w of wake) w();
        }
        return v;
      });
    return this.inflight;
  }

  /**
   * Resolves when the answer differs from seen (at once if it already
   * does), or when signal aborts. While anyone waits, one timer re-probes
   * every interval for all of them.
   */
  changed(seen: boolean, signal: AbortSignal): Promise<void> {
    return new Promise<void>((resolve) => {
      const done = () => {
        this.waiters.delete(done);
        signal.removeEventListener("abort", done);
        resolve();
      };
      if (signal.aborted || (this.value !== undefined && this.value !== seen)) return resolve();
      signal.addEventListener("abort", done);
      this.waiters.add(done);
      if (!this.timer) {
        this.timer = setInterval(() => {
          if (this.waiters.size === 0) {
            clearInterval(this.timer);
            this.timer = undefined;
            return;
          }
          void this.probe();
        }, this.intervalMs);
        this.timer.unref();
      }
    });
  }

  /** Number of Watch streams waiting (for tests). */
  get watching(): number {
    return this.waiters.size;
  }
}

/**
 * One readiness condition: undefined when it holds, else why not (for
 * /readyz and the log). A check that throws counts as not ready, with its
 * message.
 */
export type ReadyCondition = () => Promise<string | undefined> | string | undefined;

/** A daemon's readiness: every condition holds. Remembers the last answer's reasons for /readyz. */
export class ReadyChecks {
  private last: string[] = [];

  constructor(private readonly conditions: ReadyCondition[]) {}

  /** The ReadyCheck SharedReadiness probes. */
  readonly check = async (): Promise<boolean> => {
    const got = await Promise.all(
      this.conditions.map(async (c) => {
        try {
          return await c();
        } catch (err) {
          return (err as Error).message;
        }
      }),
    );
    this.last = got.filter((p): p is string => !!p);
    return this.last.length === 0;
  };

  /** Why the last answer was "not ready" (empty if it was ready). */
  problems(): string[] {
    return this.last;
  }
}

/** The condition of ipam, vmm and every other daemon: its own Redis connection answers PING. */
export function redisReachable(redis: Pick<Redis, "ping">): ReadyCondition {
  return async () => {
    const pong = await redis.ping().catch((err: Error) => `Redis: ${err.message}`);
    return pong === "PONG" ? undefined : `Redis does not answer PING (${pong})`;
  };
}

/**
 * How many reconcile periods may pass without a successful whole pass before
 * a reconciling daemon says it is not ready. 3: one slow or failed periodic
 * pass (a Redis fail-over, a busy host) is not an outage, and a failed pass
 * is retried within a second anyway; but a reconciler that has not converged
 * for three periods (90 s for the firewall and gateway, 30 s for the
 * netagent, at the default intervals) is stuck, and its host should leave
 * the rotation and page someone. --ready-stale-periods changes it.
 */
export const READY_STALE_PERIODS = 3;

/**
 * What readiness and the reconcile metrics know of one reconciler: when its
 * first whole pass succeeded, when the last one did, and its last error.
 */
export class ReconcileHealth {
  /** Unix ms of the last whole pass without an error; undefined until the first. */
  lastSuccessMs: number | undefined;
  lastError = "";
  /** Passes in a row that ended with an error. */
  failuresInRow = 0;

  constructor(
    readonly name: string,
    /** The reconciler's period (its drift or reconcile interval), ms. */
    public periodMs: number,
    public stalePeriods = READY_STALE_PERIODS,
  ) {
    // The series exist from the start: an alert on "never succeeded" needs a 0, not an absent series.
    reconcileLastSuccess.set({ reconciler: name }, 0);
    reconcileErrors.inc({ reconciler: name }, 0);
  }

  /** One pass ended: `whole` if it covered everything, `error` ("" or undefined: none). */
  observe(p: { whole: boolean; seconds: number; error?: string }): void {
    reconcileDuration.observe({ reconciler: this.name }, p.seconds);
    const wasReady = this.problem() === undefined;
    if (p.error) {
      reconcileErrors.inc({ reconciler: this.name });
      this.lastError = p.error;
      this.failuresInRow++;
    } else if (p.whole) {
      this.lastSuccessMs = Date.now();
      this.lastError = "";
      this.failuresInRow = 0;
      reconcileLastSuccess.set({ reconciler: this.name }, this.lastSuccessMs / 1000);
    }
    if (wasReady !== (this.problem() === undefined)) readinessChanged();
  }

  /** Undefined when ready: the first whole pass succeeded and the last one is younger than stalePeriods × periodMs. */
  problem(now = Date.now()): string | undefined {
    const err = this.lastError ? ` (last error: ${this.lastError.slice(0, 300)})` : "";
    if (this.lastSuccessMs === undefined) return `${this.name}: no whole reconcile pass has succeeded yet${err}`;
    const age = now - this.lastSuccessMs;
    const limit = this.stalePeriods * this.periodMs;
    if (age >= limit)
      return `${this.name}: last successful reconcile ${(age / 1000).toFixed(1)} s ago, more than ${this.stalePeriods} periods of ${this.periodMs} ms${err}`;
    return undefined;
  }

  /** As a ReadyCondition. */
  readonly condition: ReadyCondition = () => this.problem();
}

/** --ready-stale-periods, counted in `periods` (the flag whose interval a whole pass runs at least as often as). */
export function readyStalePeriodsOption(periods: string): Option {
  return new Option(
    "--ready-stale-periods <n>",
    `not ready (grpc.health NOT_SERVING, /readyz 503) when no whole reconcile pass has succeeded for this many ${periods}`,
  )
    .env("MICROVPC_READY_STALE_PERIODS")
    .default(String(READY_STALE_PERIODS));
}

/** Parses --ready-stale-periods. */
export function parseStalePeriods(text: unknown): number {
  const n = Number(text);
  if (!/^[0-9]{1,3}$/.test(String(text)) || n < 1 || n > 100) throw new Error(`--ready-stale-periods ${JSON.stringify(text)}: use 1–100`);
  return n;
}

const SERVING_REPLY = constantMessage(HealthCheckResponseSchema, { status: Status.SERVING });
const NOT_SERVING_REPLY = constantMessage(HealthCheckResponseSchema, { status: Status.NOT_SERVING });

/** grpc.health.v1 for these services, answering from one shared readiness. */
export function healthService(serviceNames: string[], ready: ReadyCheck | SharedReadiness): ServiceBinding {
  const known = new Set(["", ...serviceNames]);
  const shared = ready instanceof SharedReadiness ? ready : new SharedReadiness(ready);
  const status = async (service: string): Promise<Status> => {
    if (!known.has(service)) throw new ConnectError(`unknown service ${JSON.stringify(service)}`, Code.NotFound);
    return (await shared.get()) ? Status.SERVING : Status.NOT_SERVING;
  };
  return route(Health, {
    // A probe flood is most of what a daemon may serve: a fresh answer is
    // given at once, as one of two messages serialized once, with no promise.
    check: (req) => {
      if (!known.has(req.service)) throw new ConnectError(`unknown service ${JSON.stringify(req.service)}`, Code.NotFound);
      const v = shared.fresh();
      if (v !== undefined) return v ? SERVING_REPLY : NOT_SERVING_REPLY;
      return shared.get().then((ok) => (ok ? SERVING_REPLY : NOT_SERVING_REPLY));
    },
    list: async () => {
      const s = await status("");
      return { statuses: Object.fromEntries([...known].map((n) => [n, { status: s }])) };
    },
    async *watch(req, ctx) {
      let last: Status | undefined;
      while (!ctx.signal.aborted) {
        const s = await status(req.service);
        if (s !== last) {
          last = s;
          yield { status: s };
        }
        await shared.changed(s === Status.SERVING, ctx.signal);
      }
    },
  });
}
