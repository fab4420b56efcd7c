// A redis-server of the test file (or describe block), without persistence,
// emptied before each test: the hooks most Redis-backed tests repeat.
import { Redis } from "ioredis";
import { afterAll, beforeAll, beforeEach } from "vitest";
import { startRedis, type TestRedis } from "./redis.js";

/** Registers the hooks; `r` is the client once beforeAll has run. */
export function scratchRedis(): { readonly r: Redis } {
  let server: TestRedis | undefined;
  let client: Redis | undefined;
  beforeAll(async () => {
    server = await startRedis({ persistence: false });
    client = new Redis(server.url);
  });
  afterAll(async () => {
    client?.disconnect();
    await server?.stop();
  });
  beforeEach(async () => {
    await client?.flushall();
  });
  return {
    get r(): Redis {
      if (!client) throw new Error("scratchRedis: the client is made in beforeAll");
      return client;
    },
  };
}
