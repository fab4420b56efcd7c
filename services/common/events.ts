// Following the change-event stream (mvpc:events) that every Lua script
// appends to: how each hypervisor's loops learn that something changed
// without anyone calling them.
import type { Redis } from "ioredis";

export const EVENTS = "mvpc:events";

/** One event's fields (kind, and what the writer added: vpc, host, nic…). */
export type EventFields = Record<string, string>;

/**
 * Calls onMatch with the events whose kind matches `kinds` whenever some
 * arrive, until stopped() is true. Uses its own connection (XREAD BLOCK holds
 * it) and keeps retrying while Redis is away.
 */
export async function followEvents(redis: Redis, kinds: RegExp, onMatch: (events: EventFields[]) => void, stopped: () => boolean): Promise<void> {
  const sub = redis.duplicate({ enableOfflineQueue: true, commandTimeout: undefined, maxRetriesPerRequest: null });
  sub.on("error", () => {});
  let last = "$";
  while (!stopped()) {
    try {
      const r = (await sub.xread("COUNT", 1000, "BLOCK", 5000, "STREAMS", EVENTS, last)) as [string, [string, string[]][]][] | null;
      if (!r) continue;
      const entries = r[0][1];
      last = entries[entries.length - 1][0];
      const matched: EventFields[] = [];
      for (const [, f] of entries) {
        const fields: EventFields = {};
        for (let i = 0; i + 1 < f.length; i += 2) fields[f[i]] = f[i + 1];
        if (kinds.test(fields.kind ?? "")) matched.push(fields);
      }
      if (matched.length) onMatch(matched);
    } catch {
      await new Promise((res) => setTimeout(res, 1000));
    }
  }
  sub.disconnect();
}
