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
 * master is now `announced` ("host:port"), given its ioredis status and the
 * node it is connected to ("host:port", undefined when it is not):
 * - "stay": it is on the announced master already, or not connected at all
 *   (ended, or never started);
 * - "reconnect": it is connected (ready, or checking a fresh connection)
 *   elsewhere: drop that connection, so that it asks the sentinels again;
 * - "recheck": it is between connections ("connecting", "reconnecting",
 *   "close"): disconnecting now would end it for good (see above), and the
 *   answer it gets may predate the announcement: check where it lands.
 */
export function switchAction(status: string, connectedTo: string | undefined, announced: string): "stay" | "reconnect" | "recheck" {
  if (status === "ready" || status === "connect") return connectedTo === announced ? "stay" : "reconnect";
  if (status === "connecting" || status === "reconnecting" || status === "close") return "recheck";
  return "stay";
}

/** The node a client is connected to, as "host:port" (what +switch-master names), or undefined. */
function connectedTo(client: Redis): string | undefined {
  const s = client.stream as { remoteAddress?: string; remotePort?: number } | undefined;
  return s?.remoteAddress !== undefined && s.remotePort !== undefined ? `${s.remoteAddress}:${s.remotePort}` : undefined;
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
  logger?: Logger;
}

/**
 * Watches the sentinels of `client` for a failover of its master and moves
 * the client there (see the top of this file). One connection per sentinel
 * of the URL, reconnecting, resubscribed by ioredis after each reconnection;
 * all closed when the client ends.
 */
export function watchFailover(client: Redis, o: FailoverWatchOptions): void {
  let pending: string | undefined;
  const reconnect = (to: string, why: string) => {
    o.logger?.info({ master: o.name, to, from: connectedTo(client) ?? null }, `redis sentinels name a new master ${why}; reconnecting`);
    client.disconnect(true);
  };
  const watchers = o.sentinels.map(({ host, port }) => {
    const w = new Redis({
      host,
      port,
      ...(o.password !== undefined ? { password: o.password } : {}),
      ...(o.tls ? { tls: o.tls } : {}),
      connectTimeout: 2000,
      retryStrategy: o.retryStrategy,
      // SUBSCRIBE is queued until the connection is up, and ioredis subscribes again after a reconnection.
      enableOfflineQueue: true,
      maxRetriesPerRequest: null,
    });
    // The client's own errors tell of an outage; a sentinel that is down is one of several.
    w.on("error", () => {});
    w.subscribe(SWITCH_MASTER).catch(() => {});
    w.on("message", (_channel: string, message: string) => {
      const m = parseSwitchMaster(message);
      if (m?.name !== o.name) return;
      const action = switchAction(client.status, connectedTo(client), m.to);
      if (action === "reconnect") reconnect(m.to, "(+switch-master)");
      else if (action === "recheck") {
        pending = m.to;
        o.logger?.info({ master: o.name, to: m.to }, "redis sentinels name a new master while reconnecting; checking where the connection lands");
      }
    });
    return w;
  });
  client.on("ready", () => {
    const to = pending;
    pending = undefined;
    if (to !== undefined && connectedTo(client) !== to) reconnect(to, "(not where the reconnection landed)");
  });
  client.once("end", () => {
    for (const w of watchers) w.disconnect();
  });
}
