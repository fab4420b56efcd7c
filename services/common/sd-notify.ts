// systemd readiness (deploy/systemd: Type=notify, NotifyAccess=all). Node has
// no sd_notify(3), so the daemon runs `systemd-notify --ready` — through
// exec.ts's run(), an argument array, never a shell — once, the first time
// its readiness check (the one grpc.health.v1 answers with) says ready. Not
// under systemd (NOTIFY_SOCKET unset: a container, a terminal, the tests),
// nothing is run. systemd-notify waits until the manager has read the
// message (systemd ≥ 246), so the message is not lost when it exits; with
// NotifyAccess=all the manager accepts it from this child of the service.
import type { Logger } from "pino";
import { run } from "./exec.js";

export interface NotifyOptions {
  /** The environment to look for NOTIFY_SOCKET in (default process.env). */
  env?: NodeJS.ProcessEnv;
  /** Runs a command (default exec.ts run()). */
  exec?: (file: string, args: string[]) => Promise<unknown>;
  /** How often readiness is asked again while not ready (default 500 ms). */
  intervalMs?: number;
  /** Stops waiting (the daemon is shutting down). */
  signal?: AbortSignal;
  logger?: Logger;
}

/** The command that tells systemd the service is ready. */
export const NOTIFY_READY: readonly [string, readonly string[]] = ["systemd-notify", ["--ready"]];

/**
 * Waits until ready() first says true, then tells systemd once. Resolves
 * true when systemd was told, false when there is no NOTIFY_SOCKET or the
 * wait was aborted. A failing systemd-notify is logged, not thrown: the
 * service then stays "activating" until systemd's start timeout, which says
 * more than a crash would.
 */
export async function notifyReadyWhen(ready: () => Promise<boolean>, o: NotifyOptions = {}): Promise<boolean> {
  const env = o.env ?? process.env;
  if (!env.NOTIFY_SOCKET) return false;
  const exec = o.exec ?? ((file: string, args: string[]) => run(file, args, { timeoutMs: 10_000 }));
  const interval = o.intervalMs ?? 500;
  while (!o.signal?.aborted) {
    // A check that throws (Redis down) is "not ready".
    const ok = await ready().catch(() => false);
    if (o.signal?.aborted) return false;
    if (ok) {
      try {
        await exec(NOTIFY_READY[0], [...NOTIFY_READY[1]]);
        o.logger?.info("told systemd the service is ready (systemd-notify --ready)");
        return true;
      } catch (err) {
        o.logger?.error({ err: (err as Error).message }, "systemd-notify --ready failed");
        return false;
      }
    }
    await new Promise<void>((resolve) => {
      const t = setTimeout(done, interval);
      function done() {
        clearTimeout(t);
        o.signal?.removeEventListener("abort", done);
        resolve();
      }
      o.signal?.addEventListener("abort", done, { once: true });
    });
  }
  return false;
}
