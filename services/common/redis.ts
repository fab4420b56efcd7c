// One way to connect to Redis for every service. Commands fail fast while
// Redis is unreachable (no offline queue, one retry) so that callers get
// UNAVAILABLE at once instead of hanging; the client keeps reconnecting in
// the background and the service recovers by itself when Redis is back.
//
// Secrets (the password, TLS keys) come from files, never from the URL: a URL
// sits in an environment variable or on a command line, where ps, /proc and
// crash reports show it.
import { readFileSync } from "node:fs";
import { Redis } from "ioredis";
import type { Logger } from "pino";

/** Files holding Redis credentials (--redis-password-file, --redis-tls-*). */
export interface RedisSecretFiles {
  passwordFile?: string;
  /** CA bundle (PEM) that signed the server's certificate; implies TLS. */
  tlsCa?: string;
  /** Client certificate and key (PEM), if Redis requires them. */
  tlsCert?: string;
  tlsKey?: string;
}

export interface RedisSecrets {
  password?: string;
  tls?: { ca?: Buffer; cert?: Buffer; key?: Buffer };
}

export function readRedisSecrets(f: RedisSecretFiles): RedisSecrets {
  const out: RedisSecrets = {};
  if (f.passwordFile) {
    // One line; a trailing newline (echo, kubectl create secret --from-file) is not part of it.
    const pw = readFileSync(f.passwordFile, "utf8").replace(/\r?\n$/, "");
    if (!pw) throw new Error(`--redis-password-file ${f.passwordFile} is empty`);
    out.password = pw;
  }
  if (!!f.tlsCert !== !!f.tlsKey) throw new Error("--redis-tls-cert and --redis-tls-key go together");
  if (f.tlsCa || f.tlsCert) {
    out.tls = {
      ...(f.tlsCa ? { ca: readFileSync(f.tlsCa) } : {}),
      ...(f.tlsCert ? { cert: readFileSync(f.tlsCert), key: readFileSync(f.tlsKey!) } : {}),
    };
  }
  return out;
}

/** True if the URL names an ACL user (redis://user:pw@host). */
export function urlHasUser(url: string): boolean {
  if (!/^rediss?:\/\//.test(url)) return false;
  try {
    return new URL(url).username !== "";
  } catch {
    return false;
  }
}

/** True if the URL carries a password (redis://:pw@host or redis://user:pw@host). */
export function urlHasPassword(url: string): boolean {
  if (!/^rediss?:\/\//.test(url)) return false;
  try {
    return new URL(url).password !== "";
  } catch {
    return false;
  }
}

export interface RedisOptions extends RedisSecrets {
  url: string;
  /** ACL user (--redis-user); without it AUTH is the password alone (the "default" user). */
  username?: string;
  /** Per-command timeout; a slow Redis becomes UNAVAILABLE, not a hang. */
  commandTimeoutMs?: number;
  logger?: Logger;
}

export function connectRedis(opts: RedisOptions): Redis {
  const client = new Redis(opts.url, {
    ...(opts.username ? { username: opts.username } : {}),
    ...(opts.password !== undefined ? { password: opts.password } : {}),
    ...(opts.tls ? { tls: opts.tls } : {}),
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
