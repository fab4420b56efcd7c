// Progress for slow calls: when a call has been running for a second, a
// spinner with the elapsed time appears on stderr, and disappears (the line
// is cleared) when the call ends. Only when stderr is a terminal: pipes,
// files and scripts never see it. stdout is never touched.
import type { Interceptor } from "@connectrpc/connect";

export interface ProgressStream {
  isTTY?: boolean;
  write(s: string): boolean;
}

export interface ProgressOptions {
  /** How long a call runs before the spinner shows. Default 1000 ms. */
  delayMs?: number;
  /** Redraw interval. Default 100 ms. */
  intervalMs?: number;
  now?: () => number;
}

const FRAMES = ["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"];

/**
 * Tracks work in flight and draws one spinner line for all of it (a
 * command may run several calls at once, e.g. `status`).
 */
export class Progress {
  private readonly running = new Map<number, { label: string; start: number }>();
  private next = 0;
  private timer: NodeJS.Timeout | undefined;
  private frame = 0;
  private shown = false;
  private readonly delayMs: number;
  private readonly intervalMs: number;
  private readonly now: () => number;

  constructor(
    private readonly stream: ProgressStream,
    o: ProgressOptions = {},
  ) {
    this.delayMs = o.delayMs ?? 1000;
    this.intervalMs = o.intervalMs ?? 100;
    this.now = o.now ?? Date.now;
  }

  get enabled(): boolean {
    return this.stream.isTTY === true;
  }

  /** Starts tracking one piece of work; returns the function that ends it. */
  begin(label: string): () => void {
    if (!this.enabled) return () => {};
    const id = this.next++;
    this.running.set(id, { label, start: this.now() });
    if (!this.timer) {
      this.timer = setInterval(() => this.draw(), this.intervalMs);
      this.timer.unref();
    }
    return () => {
      this.running.delete(id);
      if (this.running.size === 0) this.clear();
    };
  }

  /** Runs fn, showing progress under `label` if it takes long. */
  async track<T>(label: string, fn: () => Promise<T>): Promise<T> {
    const end = this.begin(label);
    try {
      return await fn();
    } finally {
      end();
    }
  }

  private draw(): void {
    const t = this.now();
    let oldest: { label: string; start: number } | undefined;
    for (const r of this.running.values()) if (!oldest || r.start < oldest.start) oldest = r;
    if (!oldest || t - oldest.start < this.delayMs) return;
    const more = this.running.size > 1 ? ` (+${this.running.size - 1} more)` : "";
    const secs = ((t - oldest.start) / 1000).toFixed(1);
    this.stream.write(`\r\x1b[K${FRAMES[this.frame++ % FRAMES.length]} ${oldest.label}${more} … ${secs}s`);
    this.shown = true;
  }

  private clear(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    if (this.shown) this.stream.write("\r\x1b[K");
    this.shown = false;
  }
}

/** The process's progress line, on stderr. */
export const progress = new Progress(process.stderr);

let activity: string | undefined;

/** A human label for the calls that follow ("creating vm web1"), instead of the method name. */
export function setActivity(label: string | undefined): void {
  activity = label;
}

/** Shows progress for every slow gRPC call. */
export function progressInterceptor(p: Progress = progress): Interceptor {
  return (next) => (req) => p.track(activity ?? `waiting for ${req.service.typeName.replace(/^microvpc\.v1\./, "")}/${req.method.name}`, () => next(req));
}
