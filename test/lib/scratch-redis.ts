// A Redis of the test file (or describe block), without persistence, emptied
// before each test: the hooks most Redis-backed tests repeat.
import { Redis } from "ioredis";
import { afterAll, beforeAll, beforeEach } from "vitest";
import { connectReady, primaryNodes, startDaemonsRedis, startRedis } from "./redis.js";

/**
 * Registers the hooks; `r` is the client once beforeAll has run. By default
 * one redis-server and a plain ioredis client. With `followSwitch`, as a
 * file's daemons get it (startDaemonsRedis): a 3+3 Redis Cluster with
 * MICROVPC_TEST_ON_CLUSTER=1, and the services' client (connectRedis);
 * every primary is emptied.
 */
export function scratchRedis(o: { followSwitch?: boolean } = {}): { readonly r: Redis } {
  let server: { stop(): Promise<void> } | undefined;
  let client: Redis | undefined;
  beforeAll(async () => {
    if (o.followSwitch) {
      const s = await startDaemonsRedis({ persistence: false });
      server = s;
      client = await connectReady({ url: s.url });
    } else {
      const s = await startRedis({ persistence: false });
      server = s;
      client = new Redis(s.url);
    }
  });
  afterAll(async () => {
    client?.disconnect();
    await server?.stop();
  });
  beforeEach(async () => {
    if (client) await Promise.all(primaryNodes(client).map((n) => n.flushall()));
  });
  return {
    get r(): Redis {
      if (!client) throw new Error("scratchRedis: the client is made in beforeAll");
      return client;
    },
  };
}
