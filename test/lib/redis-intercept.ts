// A Redis client whose one command goes through a test's wrapper, for tests
// that make a store's steps interleave, repeat or lose their replies at a
// chosen moment (host-store, redis-acl-cluster). Every other property is the
// client's own, bound to it.
import type { Redis } from "ioredis";

type Call = (...args: unknown[]) => Promise<unknown>;

/** `redis`, whose `command` calls run `around(call, args)`, `call` being the real command. */
export function intercepted(redis: Redis, command: "eval" | "hdel", around: (call: Call, args: unknown[]) => Promise<unknown>): Redis {
  return new Proxy(redis, {
    get(t, p) {
      if (p === command) {
        const call: Call = (...a) => (t[command] as unknown as Call).apply(t, a);
        return (...args: unknown[]) => around(call, args);
      }
      const v = Reflect.get(t, p, t) as unknown;
      return typeof v === "function" ? (v as (...a: unknown[]) => unknown).bind(t) : v;
    },
  });
}

/** `redis`, whose EVALs for which `when(args)` holds wait for `wait` first. */
export function gated(redis: Redis, when: (args: unknown[]) => boolean, wait: Promise<void> | (() => Promise<void>)): Redis {
  return intercepted(redis, "eval", async (call, args) => {
    if (when(args)) await (typeof wait === "function" ? wait() : wait);
    return call(...args);
  });
}
