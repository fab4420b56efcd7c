// Following a Sentinel failover at once (redis-sentinel:// URLs, issue #18).
//
// The sentinels announce a new master on their "+switch-master" channel. A
// client of the master must then leave the old one even when it is still up
// (a switchover, a partition that heals): until the sentinels demote it, the
// old master takes writes that its resync will throw away.
//
// ioredis has this built in (failoverDetector), but its detector disconnects
// whatever the client is doing. A +switch-master that arrives while the
// client is between connections, asking the sentinels for the master, ends
// the client for good: ioredis' connect gives up with "Connection is closed."
// and sets the status to "end", so every command fails until the process is
// restarted. That is what a failover looks like to the client (its
// connection to the dead master drops, then the sentinels announce the new
// one), and it is what the redis-sentinel test hit about one run in four.
// ioredis 5.11 and 6.1 alike. So the clients here run with failoverDetector
// off, and this watch does the job: it subscribes to the sentinels of the
// URL, and on an announcement for its own master name
// - a connected client not on the new master is disconnected and reconnects
//   (asking the sentinels again);
// - a client between connections is left alone, and where it lands is
//   checked once it is ready: not the announced master, it reconnects once
//   more (the sentinel it asked may have answered before it heard of the
//   failover).
import { lookup } from "node:dns/promises";
import { isIP } from "node:net";
import { Redis, type RedisOptions as IoRedisOptions } from "ioredis";
import type { Logger } from "pino";

/** The sentinels' channel announcing a new master. */
export const SWITCH_MASTER = "+switch-master";

/** The master a +switch-master message announces: "<name> <old ip> <old port> <new ip> <new port>"; undefined for anything else. */
export function parseSwitchMaster(message: string): { name: string; to: string } | undefined {
  const f = message.split(" ");
  if (f.length !== 5 || !/^\d{1,5}$/.test(f[4])) return undefined;
  return { name: f[0], to: `${f[3]}:${f[4]}` };
}

/**
 * What a client of the master does when its sentinels announce that the
 * master is now at one of `announced` ("ip:port": the announced address, or
 * what its host name resolves to), given its ioredis status and the node it
 * is connected to ("ip:port", undefined when it is not):
 * - "stay": it is on the announced master already, or not connected at all
 *   (ended, or never started);
 * - "reconnect": it is connected (ready, or checking a fresh connection)
 *   elsewhere: drop that connection, so that it asks the sentinels again;
 * - "recheck": it is between connections ("connecting", "reconnecting",
 *   "close"): disconnecting now would end it for good (see above), and the
 *   answer it gets may predate the announcement: check where it lands.
 */
export function switchAction(status: string, connectedTo: string | undefined, announced: string[]): "stay" | "reconnect" | "recheck" {
  if (status === "ready" || status === "connect") return connectedTo !== undefined && announced.includes(connectedTo) ? "stay" : "reconnect";
  if (status === "connecting" || status === "reconnecting" || status === "close") return "recheck";
  return "stay";
}

/** The node a client is connected to, as "ip:port", or undefined. */
function connectedTo(client: Redis): string | undefined {
  const s = client.stream as { remoteAddress?: string; remotePort?: number } | undefined;
  return s?.remoteAddress !== undefined && s.remotePort !== undefined ? `${s.remoteAddress}:${s.remotePort}` : undefined;
}

/**
 * "host:port" as the "ip:port" forms a socket to it can have: itself for an
 * IP; for a host name (sentinels with announce-hostnames) each address it
 * resolves to, as ioredis would connect to one of them. A name that does not
 * resolve: itself (no socket matches, so the client asks the sentinels again).
 */
export async function addressesOf(hostPort: string): Promise<string[]> {
  const i = hostPort.lastIndexOf(":");
  const host = hostPort.slice(0, i);
  const port = hostPort.slice(i + 1);
  if (isIP(host)) return [hostPort];
  try {
    return (await lookup(host, { all: true })).map((a) => `${a.address}:${port}`);
  } catch {
    return [hostPort];
  }
}

const watched = new WeakMap<Redis, () => number>();

/**
 * How many sentinels a client's failover watch is subscribed to now
 * (microvpc_redis_sentinels_watched); undefined for a client without one (not
 * behind Sentinel). 0 means a failover whose old master stays up goes
 * unseen until that master is demoted.
 */
export function sentinelsWatched(client: object): number | undefined {
  return watched.get(client as Redis)?.();
}

export interface FailoverWatchOptions {
  sentinels: { host: string; port: number }[];
  /** The master's name, as the sentinels monitor it. */
  name: string;
  /** The sentinels' password (none: no AUTH). */
  password?: string;
  tls?: IoRedisOptions["tls"];
  /** Reconnect delays of the watch's connections to the sentinels. */
  retryStrategy: (times: number) => number;
  /**
   * How often each subscribed connection is PINGed (default 5 s); one that
   * does not answer within this time is dropped and made again. A
   * subscription sends nothing by itself, and a link that died silently (a
   * sentinel's host powered off) would otherwise count as watched for the
   * hours TCP takes to notice.
   */
  pingMs?: number;
  logger?: Logger;
}

/**
 * Watches the sentinels of `client` for a failover of its master and moves
 * the client there (see the top of this file). One connection per sentinel
 * of the URL, reconnecting, subscribed again at each (re)connection; all
 * closed when the client ends or is disconnected for good. Returns what
 * closes them (connectSentinel calls it from the client's disconnect).
 */
export function watchFailover(client: Redis, o: FailoverWatchOptions): () => void {
  const subscribed = new Set<Redis>();
  watched.set(client, () => subscribed.size);
  const pingMs = o.pingMs ?? 5000;
  let pending: string[] | undefined;
  let stopped = false;
  const reconnect = (to: string[], why: string) => {
    o.logger?.info({ master: o.name, to: to[0], from: connectedTo(client) ?? null }, `redis sentinels name a new master ${why}; reconnecting`);
    client.disconnect(true);
  };
  const onAnnouncement = async (message: string) => {
    const m = parseSwitchMaster(message);
    if (m?.name !== o.name) return;
    const to = await addressesOf(m.to);
    if (stopped) return;
    const action = switchAction(client.status, connectedTo(client), to);
    if (action === "reconnect") reconnect(to, "(+switch-master)");
    else if (action === "recheck") {
      pending = to;
      o.logger?.info({ master: o.name, to: m.to }, "redis sentinels name a new master while reconnecting; checking where the connection lands");
    }
  };
  const watchers = o.sentinels.map(({ host, port }) => {
    const w = new Redis({
      host,
      port,
      ...(o.password !== undefined ? { password: o.password } : {}),
      ...(o.tls ? { tls: o.tls } : {}),
      connectTimeout: 2000,
      commandTimeout: pingMs,
      retryStrategy: o.retryStrategy,
      enableOfflineQueue: false,
      maxRetriesPerRequest: null,
    });
    // Subscribed at every connection, not once: ioredis re-subscribes only what a connection already held,
    // and a first connection that failed (AUTH refused, a sentinel down at start) would leave this one deaf.
    let failing = false;
    w.on("ready", () => {
      failing = false;
      w.subscribe(SWITCH_MASTER).then(
        () => subscribed.add(w),
        (err: Error) => o.logger?.warn({ sentinel: `${host}:${port}`, err: err.message }, "redis sentinel: cannot watch for failovers"),
      );
    });
    w.on("close", () => subscribed.delete(w));
    // Said once per outage of this sentinel; one down is one of several.
    w.on("error", (err: Error) => {
      if (!failing) o.logger?.warn({ sentinel: `${host}:${port}`, err: err.message }, "redis sentinel unreachable for the failover watch; retrying");
      failing = true;
    });
    w.on("message", (_channel: string, message: string) => void onAnnouncement(message));
    return w;
  });
  client.on("ready", () => {
    const to = pending;
    pending = undefined;
    if (to !== undefined && switchAction(client.status, connectedTo(client), to) === "reconnect") reconnect(to, "(not where the reconnection landed)");
  });
  // Each subscribed connection answers a PING in time, or is dropped (uncounted) and made again.
  const pings = setInterval(() => {
    for (const w of subscribed)
      w.ping().catch(() => {
        if (stopped || !subscribed.delete(w)) return;
        o.logger?.warn({ sentinel: `${w.options.host}:${w.options.port}` }, "redis sentinel did not answer the failover watch's PING; reconnecting");
        w.disconnect(true);
      });
  }, pingMs);
  pings.unref();
  const stop = () => {
    if (stopped) return;
    stopped = true;
    clearInterval(pings);
    for (const w of watchers) w.disconnect();
    subscribed.clear();
  };
  client.once("end", stop);
  return stop;
}
