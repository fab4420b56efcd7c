// One way to connect to Redis for every service. Commands fail fast while
// Redis is unreachable (no offline queue, one retry) so that callers get
// UNAVAILABLE at once instead of hanging; the client keeps reconnecting in
// the background and the service recovers by itself when Redis is back.
import { Redis } from "ioredis";
import type { Logger } from "pino";

export interface RedisOptions {
  url: string;
  /** Per-command timeout; a slow Redis becomes UNAVAILABLE, not a hang. */
  commandTimeoutMs?: number;
  logger?: Logger;
}

export function connectRedis(opts: RedisOptions): Redis {
  const client = new Redis(opts.url, {
    enableOfflineQueue: false,
    maxRetriesPerRequest: 1,
    commandTimeout: opts.commandTimeoutMs ?? 2000,
    enableAutoPipelining: true,
    lazyConnect: false,
    connectTimeout: 2000,
    retryStrategy: (times) => Math.min(50 * 2 ** Math.min(times, 6), 2000),
    reconnectOnError: () => false,
  });
  let down = false;
  client.on("error", (err) => {
    if (!down) opts.logger?.warn({ err: err.message }, "redis connection lost; reconnecting");
    down = true;
  });
  client.on("ready", () => {
    if (down) opts.logger?.info("redis connection restored");
    down = false;
  });
  return client;
}

/** Resolves once the client is connected (or rejects after timeoutMs). */
export async function waitReady(client: Redis, timeoutMs = 10_000): Promise<void> {
  if (client.status === "ready") return;
  await new Promise<void>((resolve, reject) => {
    const t = setTimeout(() => {
      cleanup();
      reject(new Error(`redis not ready after ${timeoutMs} ms (status ${client.status})`));
    }, timeoutMs);
    const onReady = () => {
      cleanup();
      resolve();
    };
    const cleanup = () => {
      clearTimeout(t);
      client.off("ready", onReady);
    };
    client.on("ready", onReady);
  });
}
