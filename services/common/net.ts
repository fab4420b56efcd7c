// Small helpers of the daemons' own network servers (the gateway's metadata
// server, the VPC resolver): the logger they take, the caller's plain
// address, and per-caller token buckets.

/** What a server logs through (pino's Logger fits). */
export interface ServerLogger {
  debug(obj: object, msg?: string): void;
  info(obj: object, msg?: string): void;
  warn(obj: object, msg?: string): void;
  error(obj: object, msg?: string): void;
}

/** "::ffff:10.0.0.5" (an IPv4 peer on a dual-stack socket) → "10.0.0.5". */
export function plainAddress(a: string | undefined): string {
  if (!a) return "";
  return a.startsWith("::ffff:") && a.includes(".") ? a.slice(7) : a;
}

/** Most callers tracked at once; past that, a new caller is refused until buckets refill. */
const MAX_BUCKETS = 100_000;

/** Per-caller token buckets: rate tokens a second, at most burst saved up. */
export class Buckets {
  private readonly m = new Map<string, { tokens: number; at: number }>();
  constructor(
    private readonly rate: number,
    private readonly burst: number,
  ) {}

  take(key: string, now = performance.now()): boolean {
    let b = this.m.get(key);
    if (!b) {
      if (this.m.size >= MAX_BUCKETS) {
        this.prune(now);
        if (this.m.size >= MAX_BUCKETS) return false;
      }
      b = { tokens: this.burst, at: now };
      this.m.set(key, b);
    }
    b.tokens = Math.min(this.burst, b.tokens + ((now - b.at) / 1000) * this.rate);
    b.at = now;
    if (b.tokens < 1) return false;
    b.tokens -= 1;
    return true;
  }

  /** Forgets callers whose bucket has refilled: they are indistinguishable from new ones. */
  prune(now = performance.now()): void {
    for (const [k, b] of this.m) if (b.tokens + ((now - b.at) / 1000) * this.rate >= this.burst) this.m.delete(k);
  }
}
