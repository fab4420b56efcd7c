// --watch: a view redrawn when what it shows changes, until Ctrl-C. On a
// terminal each redraw replaces the screen; into a pipe or file each one is
// appended under a time line; with -o json every change is one JSON object
// on one line (NDJSON), for scripts. Ctrl-C (SIGINT) or SIGTERM ends the
// watch cleanly: the stream is cancelled and the command exits 0.
import { Code, ConnectError } from "@connectrpc/connect";

/** An AbortSignal that fires on SIGINT or SIGTERM; stop() removes the handlers. */
export function interruptSignal(): { signal: AbortSignal; stop(): void } {
  const ac = new AbortController();
  const onSignal = () => ac.abort(new ConnectError("interrupted", Code.Canceled));
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  return {
    signal: ac.signal,
    stop: () => {
      process.off("SIGINT", onSignal);
      process.off("SIGTERM", onSignal);
    },
  };
}

/** True if err is the end of a watch the user asked for (Ctrl-C), not a failure. */
export function isInterrupt(err: unknown, signal: AbortSignal): boolean {
  return signal.aborted && (!(err instanceof ConnectError) || err.code === Code.Canceled);
}

/** Draws one rendering of a watched view. */
export function redraw(text: string, out: NodeJS.WriteStream = process.stdout): void {
  const body = text.endsWith("\n") ? text : `${text}\n`;
  if (out.isTTY) out.write(`\x1b[H\x1b[2J${new Date().toISOString()}  (Ctrl-C to stop)\n${body}`);
  else out.write(`--- ${new Date().toISOString()}\n${body}`);
}

/** One JSON object on one line: a change, for scripts reading line by line. */
export function jsonLine(value: unknown): void {
  process.stdout.write(`${JSON.stringify(value)}\n`);
}

/** Waits ms, or less if signal fires. */
export function pause(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal.removeEventListener("abort", done);
      resolve();
    }
    signal.addEventListener("abort", done, { once: true });
  });
}
