// The loop a per-hypervisor sync runs (FirewallSync, GatewaySync): one pass
// at start, then passes when change events arrive (a whole pass, or one over
// just the keys — VPCs — the events name), a drift check every driftMs, a
// failed pass retried a second later, callers waiting on a key answered once
// a pass has covered it. Passes never overlap; requests made during one
// coalesce into the next. What a pass does, which events ask for which pass
// and what runs after one stay with each sync.
import type { Redis } from "ioredis";
import type { Logger } from "pino";
import { followEvents, followScoped, type EventFields, type FeedScope } from "./events.js";
import { ReconcileHealth } from "./health.js";
import { withSpan } from "./tracing.js";

/** How long a failed pass waits before it is retried (a change event or a waiter does not wait). */
export const RETRY_MS = 1000;
/** The loop's longest sleep: how often it looks at the clock for drift and retries. */
const TICK_MS = 500;

/** What a pass is asked to do. */
export interface PassRequest {
  /** The first pass after start. */
  first: boolean;
  /** The periodic drift check is due: look at the kernel, not only at what is known applied. */
  drift: boolean;
  /** A targeted pass over just these keys; undefined: a whole pass. */
  only?: ReadonlySet<string>;
}

/** What an event asks for: a targeted pass over one key, a whole pass, or nothing. */
export type EventRoute = { key: string } | "all" | undefined;

export interface SyncLoopSpec<R> {
  log: Logger;
  /** The change events (their kind) that wake the loop. */
  events: RegExp;
  /** The host's scoped streams to follow (common/events.ts); unset: the global stream. */
  scope?: FeedScope;
  /** What one matching event asks for (default: a whole pass). */
  route?: (e: EventFields) => EventRoute;
  /** One pass; its result goes to after(). */
  pass: (req: PassRequest) => Promise<R>;
  /** When the last pass failed (ms), undefined if it did not: a failed pass is retried RETRY_MS later. */
  failedAt: () => number | undefined;
  /** After a pass, the error a waiter on `key` is answered with (undefined: applied). */
  errorOf?: (key: string) => string | undefined;
  /** Whether a whole pass is due for another reason (the gateway's per-VPC backoff). */
  due?: () => boolean;
  /** Runs once the pass's waiters have their answer (the firewall's conntrack clean-ups). */
  after?: (result: R) => Promise<void>;
  /**
   * The reconciler's name in microvpc_reconcile_* and readiness (health);
   * unset: no metrics (tests).
   */
  reconciler?: string;
  /** Why the pass just run failed ("" or undefined: it did not); default: failedAt() is set. */
  errorAfterPass?: (result: R) => string | undefined;
  /**
   * A change's own mark in its event (the firewall's generation): a caller
   * that made the change and waits on its key (target's `token`) may be
   * answered by any pass that started after the event arrived, since that
   * pass read what the change wrote.
   */
  tokenOf?: (e: EventFields) => string | undefined;
}

interface Waiter {
  key: string;
  done: (err?: Error) => void;
}

/** How many event tokens the loop remembers (a caller asks within milliseconds of its change). */
const TOKENS_KEPT = 1000;

/** Sets token → n, forgetting the oldest token past TOKENS_KEPT. */
function remember(m: Map<string, number>, token: string, n: number): void {
  m.set(token, n);
  if (m.size > TOKENS_KEPT) m.delete(m.keys().next().value!);
}

export class SyncLoop<R> {
  private stopped = false;
  /** A whole pass is wanted (a change event, kick()). */
  private pending = false;
  /** Keys a targeted pass is wanted for. */
  private readonly targets = new Set<string>();
  private waiters: Waiter[] = [];
  private wake?: () => void;
  /** Passes started, passes ended (in order: passes never overlap). */
  private started = 0;
  private ended = 0;
  /** Waiters the running pass answers (their change's event arrived before it started). */
  private runningWaiters: Waiter[] = [];
  /** Event token → how many passes had started when it arrived. */
  private readonly seen = new Map<string, number>();
  /** Token → how many passes had started when a caller, its change written, waited on it before its event came. */
  private readonly awaited = new Map<string, number>();
  /** The pass metrics and the readiness condition (first whole pass succeeded, the last one recent). */
  readonly health?: ReconcileHealth;

  constructor(readonly spec: SyncLoopSpec<R>) {
    if (spec.reconciler) this.health = new ReconcileHealth(spec.reconciler, 30_000);
  }

  /** One pass, timed and counted (started/ended: see target's tokens): a whole pass without an error is a success. */
  private async timed(req: PassRequest): Promise<R> {
    const t0 = process.hrtime.bigint();
    this.started++;
    let result: R;
    try {
      result = await this.pass(req);
    } finally {
      this.ended = this.started;
    }
    if (this.health) {
      const error = this.spec.errorAfterPass ? this.spec.errorAfterPass(result) : this.spec.failedAt() !== undefined ? "the pass failed" : undefined;
      this.health.observe({ whole: !req.only, seconds: Number(process.hrtime.bigint() - t0) / 1e9, error });
    }
    return result;
  }

  /** Asks for a whole pass soon. */
  kick(): void {
    this.pending = true;
    this.wake?.();
  }

  /**
   * Asks for a pass over `key`; `done` (if given) is called with that pass's
   * error for `key` once a pass that started after this call has run.
   * `token` (spec.tokenOf of the change's event), from a caller whose change
   * is written: a pass that started after the event arrived answers it too,
   * and once a pass has started after this call the event asks for none.
   * Returns a function that withdraws the waiter (a caller's timeout).
   */
  target(key: string, done?: (err?: Error) => void, token?: string): () => void {
    let withdraw = () => {};
    const at = token === undefined ? undefined : this.seen.get(token);
    if (done && at !== undefined) {
      // The change's event arrived before a pass that has ended since: that pass read it.
      if (this.ended > at) {
        this.answer([{ key, done }]);
        return withdraw;
      }
      // Before the running pass started: it reads it; no pass more is needed.
      if (this.started > at) {
        const w = { key, done };
        this.runningWaiters.push(w);
        return () => {
          this.runningWaiters = this.runningWaiters.filter((x) => x !== w);
        };
      }
    }
    if (token !== undefined && at === undefined) remember(this.awaited, token, this.started);
    if (done) {
      const w = { key, done };
      this.waiters.push(w);
      withdraw = () => {
        this.waiters = this.waiters.filter((x) => x !== w);
      };
    }
    this.targets.add(key);
    this.wake?.();
    return withdraw;
  }

  /** Matching events, as followEvents hands them: each asks for a whole or a targeted pass. */
  onEvents(events: EventFields[]): void {
    for (const e of events) {
      const r = this.spec.route ? this.spec.route(e) : "all";
      const token = r ? this.spec.tokenOf?.(e) : undefined;
      // Its caller waited before it came, and a pass has started since: that pass read the change.
      const read = token === undefined ? undefined : this.awaited.get(token);
      if (read !== undefined && this.started > read) {
        this.awaited.delete(token!);
        continue;
      }
      if (r === "all") this.pending = true;
      else if (r) this.targets.add(r.key);
      if (token !== undefined) remember(this.seen, token, this.started);
    }
    this.wake?.();
  }

  /** Runs the loop and follows the change events until stop(). */
  start(redis: Redis, driftMs: number, prepare?: () => Promise<unknown>): void {
    void this.run(driftMs, prepare);
    const onEvents = (events: EventFields[]) => this.onEvents(events);
    if (this.spec.scope) void followScoped(redis, this.spec.scope, this.spec.events, onEvents, () => this.stopped);
    else void followEvents(redis, this.spec.events, onEvents, () => this.stopped);
  }

  /**
   * The loop alone (start() adds the events): `prepare` (retried each second
   * until it succeeds), a first pass, then passes as asked, drift and retries.
   */
  async run(driftMs: number, prepare?: () => Promise<unknown>): Promise<void> {
    const { spec } = this;
    if (this.health) this.health.periodMs = driftMs;
    while (prepare && !this.stopped) {
      try {
        await prepare();
        break;
      } catch (err) {
        if (this.health) this.health.lastError = `cannot prepare the first pass: ${(err as Error).message}`;
        spec.log.warn({ err: (err as Error).message }, "cannot prepare the first pass yet; retrying in 1 s");
        await new Promise((r) => setTimeout(r, RETRY_MS));
      }
    }
    if (this.stopped) return;
    const first = await this.timed({ first: true, drift: false });
    this.answer(this.runningWaiters.splice(0));
    await this.after(first);
    let lastDrift = Date.now();
    while (!this.stopped) {
      if (!this.pending && this.targets.size === 0) {
        await new Promise<void>((r) => {
          this.wake = r;
          setTimeout(r, TICK_MS).unref();
        });
      }
      if (this.stopped) break;
      // A failed pass (Redis not up yet, an nft error) is retried a second
      // later, not at the next drift check; callers waiting on a key never
      // wait for that second.
      const failedAt = spec.failedAt();
      const retry = failedAt !== undefined && Date.now() - failedAt >= RETRY_MS;
      const drift = Date.now() - lastDrift > driftMs;
      const due = spec.due?.() ?? false;
      if (!this.pending && !drift && !retry && !due && this.targets.size === 0) continue;
      const waiters = this.waiters.splice(0);
      const targets = new Set(this.targets);
      this.targets.clear();
      let result: R;
      if (this.pending || drift || retry || due) {
        this.pending = false;
        if (drift) lastDrift = Date.now();
        result = await this.timed({ first: false, drift });
      } else result = await this.timed({ first: false, drift: false, only: targets });
      // The kernel has the change: answer first, then what may wait.
      this.answer([...waiters, ...this.runningWaiters.splice(0)]);
      await this.after(result);
    }
  }

  /** Answers waiters with the pass's result for their key. */
  private answer(waiters: Waiter[]): void {
    for (const w of waiters) {
      const err = this.spec.errorOf?.(w.key);
      w.done(err === undefined ? undefined : new Error(err));
    }
  }

  /** One pass; a "reconcile" span when tracing is on. */
  private pass(req: PassRequest): Promise<R> {
    const kind = req.first ? "first" : req.only ? "targeted" : req.drift ? "drift" : "whole";
    return withSpan("reconcile", { "microvpc.reconcile.kind": kind, "microvpc.reconcile.keys": req.only?.size ?? 0 }, () => this.spec.pass(req));
  }

  private async after(result: R): Promise<void> {
    if (this.spec.after) await this.spec.after(result);
  }

  stop(): void {
    this.stopped = true;
    this.wake?.();
  }
}
