// Following the change-event stream (mvpc:events) that every Lua script
// appends to: how each hypervisor's loops learn that something changed
// without anyone calling them.
import type { Redis } from "ioredis";

export const EVENTS = "mvpc:events";

/**
 * Calls onMatch whenever events whose kind matches `kinds` arrive, until
 * stopped() is true. Uses its own connection (XREAD BLOCK holds it) and keeps
 * retrying while Redis is away.
 */
export async function followEvents(redis: Redis, kinds: RegExp, onMatch: () => void, stopped: () => boolean): Promise<void> {
  const sub = redis.duplicate({ enableOfflineQueue: true, commandTimeout: undefined, maxRetriesPerRequest: null });
  sub.on("error", () => {});
  let last = "$";
  while (!stopped()) {
    try {
      const r = (await sub.xread("COUNT", 1000, "BLOCK", 5000, "STREAMS", EVENTS, last)) as [string, [string, string[]][]][] | null;
      if (!r) continue;
      const entries = r[0][1];
      last = entries[entries.length - 1][0];
      if (entries.some(([, f]) => kinds.test(f[f.indexOf("kind") + 1] ?? ""))) onMatch();
    } catch {
      await new Promise((res) => setTimeout(res, 1000));
    }
  }
  sub.disconnect();
}
