// One worker process of `npm run bench:fleet`: many synthetic hypervisors,
// each with its own Redis connections, following change events with the real
// code (common/events.ts: EventFeed over its scoped streams, or followEvents
// over the global stream as today) and running the pass the sync loops run
// on a change: read the VPC's state once per batch, plan the difference
// against what it applied, apply the plan to a fake kernel (firewall's
// element diff against an in-memory element set, as FakeNft holds it).
// Reports, per change id, how many of its hosts applied it and when the last
// did. Mode "cluster": the same scoped feed on a Redis Cluster, where it
// waits on sharded pub/sub wakes (events.ts), through the services' own
// client (connectRedis of a redis-cluster:// URL).
import { Redis } from "ioredis";
import { EventFeed, followEvents, type EventFields } from "../../services/common/events.js";
import { connectRedis, isCluster, waitReady } from "../../services/common/redis.js";

export interface HostSpec {
  id: string;
}

export type FleetMode = "scoped" | "global" | "cluster";
export type ToWorker = { op: "start"; url: string; mode: FleetMode; hosts: HostSpec[] } | { op: "status" } | { op: "finish" };
export type FromWorker =
  | { op: "ready" }
  | { op: "status"; applied: number }
  | { op: "result"; applied: Record<string, [number, number]>; wakes: number; idleWakes: number; events: number; reads: number; kernelOps: number };

/** Where the bench keeps a VPC's state (a hash member → value) and a host's VPC set. */
export const simKeys = {
  state: (vpc: string) => `fleet:{${vpc}}:state`,
  hostVpcs: (host: string) => `fleet:host:${host}:vpcs`,
};

const now = () => performance.timeOrigin + performance.now();

class SimHost {
  /** What the fake kernel holds, per VPC: member → value. */
  readonly kernel = new Map<string, Map<string, string>>();
  held = new Set<string>();
  private chain: Promise<unknown> = Promise.resolve();
  /** The changes applied here. */
  private readonly done_ = new Set<string>();
  stop?: () => void;
  done?: Promise<void>;

  constructor(
    readonly id: string,
    readonly redis: Redis,
    readonly w: Worker,
  ) {}

  onEvents(evs: EventFields[]): void {
    this.w.wakes++;
    this.w.events += evs.length;
    // The VPCs this batch concerns here, and the changes it carries: one read per VPC (a targeted pass).
    const vpcs = new Map<string, string[]>();
    for (const e of evs) {
      for (const v of [e.vpc, e.vpc1, e.vpc2]) {
        if (!v || !this.held.has(v)) continue;
        if (!vpcs.has(v)) vpcs.set(v, []);
        if (e.cid) vpcs.get(v)!.push(e.cid);
      }
    }
    // Woken by nothing it holds: the waste a scoped feed must not have.
    if (!vpcs.size) {
      this.w.idleWakes++;
      return;
    }
    this.chain = this.chain.then(() => this.pass(vpcs));
  }

  /** A failed read is retried, as a sync loop retries a failed pass (bounded: 20 tries, 100 ms apart). */
  private async pass(vpcs: Map<string, string[]>): Promise<void> {
    let rs: [Error | null, unknown][];
    for (let i = 0; ; i++) {
      try {
        if (isCluster(this.redis)) {
          // One slot per VPC: no pipeline across them; the client pipelines per node itself.
          rs = await Promise.all([...vpcs.keys()].map((v) => this.redis.hgetall(simKeys.state(v)).then((x): [null, unknown] => [null, x])));
          break;
        }
        const p = this.redis.pipeline();
        for (const v of vpcs.keys()) p.hgetall(simKeys.state(v));
        rs = (await p.exec()) ?? [];
        if (rs.every(([err]) => !err)) break;
      } catch {
        // retried below
      }
      if (i >= 20) return;
      await new Promise((res) => setTimeout(res, 100));
    }
    this.w.reads += vpcs.size;
    let i = 0;
    for (const [v, cids] of vpcs) {
      const want = (rs[i++]?.[1] ?? {}) as Record<string, string>;
      const have = this.kernel.get(v) ?? new Map<string, string>();
      // The plan: elements to add or change, elements to delete.
      for (const [k, val] of Object.entries(want)) {
        if (have.get(k) !== val) {
          have.set(k, val);
          this.w.kernelOps++;
        }
      }
      for (const k of [...have.keys()]) {
        if (!(k in want)) {
          have.delete(k);
          this.w.kernelOps++;
        }
      }
      this.kernel.set(v, have);
      const t = now();
      for (const c of cids) {
        // A peering reaches a host holding both VPCs twice: it counts once.
        if (this.done_.has(c)) continue;
        this.done_.add(c);
        const a = this.w.applied.get(c);
        if (a) {
          a[0]++;
          a[1] = Math.max(a[1], t);
        } else this.w.applied.set(c, [1, t]);
        this.w.appliedTotal++;
      }
    }
  }
}

class Worker {
  applied = new Map<string, [number, number]>();
  appliedTotal = 0;
  wakes = 0;
  /** Wakes whose batch concerned no VPC the host holds. */
  idleWakes = 0;
  events = 0;
  reads = 0;
  kernelOps = 0;
  hosts: SimHost[] = [];

  async start(url: string, mode: FleetMode, specs: HostSpec[]): Promise<void> {
    for (const s of specs) {
      let redis: Redis;
      if (mode === "cluster") {
        redis = connectRedis({ url, commandTimeoutMs: 10_000 });
        await waitReady(redis, 30_000);
      } else redis = new Redis(url, { maxRetriesPerRequest: null });
      redis.on("error", () => {});
      const h = new SimHost(s.id, redis, this);
      h.held = new Set(await redis.hkeys(simKeys.hostVpcs(s.id)));
      let stopped = false;
      if (mode !== "global") {
        const feed = new EventFeed(redis, {
          host: s.id,
          vpcs: async () => (h.held = new Set(await redis.hkeys(simKeys.hostVpcs(s.id)))),
          kinds: /^fleet\./,
          onEvents: (evs) => h.onEvents(evs),
          blockMs: 5000,
        });
        h.done = feed.run();
        h.stop = () => feed.stop();
        await feed.ready;
      } else {
        h.done = followEvents(
          redis,
          /^fleet\./,
          (evs) => h.onEvents(evs),
          () => stopped,
        );
        h.stop = () => (stopped = true);
      }
      this.hosts.push(h);
    }
    // followEvents starts at "$" once its XREAD is sent: give the global readers a moment to be blocked in it.
    if (mode === "global") await new Promise((r) => setTimeout(r, 500));
  }

  async finish(): Promise<void> {
    for (const h of this.hosts) h.stop?.();
    for (const h of this.hosts) h.redis.disconnect();
  }
}

const w = new Worker();
process.on("message", (m: ToWorker) => {
  const send = (x: FromWorker) => process.send!(x);
  if (m.op === "start") {
    void w.start(m.url, m.mode, m.hosts).then(
      () => send({ op: "ready" }),
      (err: Error) => {
        process.stderr.write(`fleet worker: ${err.message}\n`);
        process.exit(1);
      },
    );
  } else if (m.op === "status") send({ op: "status", applied: w.appliedTotal });
  else {
    void w.finish().then(() => {
      send({
        op: "result",
        applied: Object.fromEntries(w.applied),
        wakes: w.wakes,
        idleWakes: w.idleWakes,
        events: w.events,
        reads: w.reads,
        kernelOps: w.kernelOps,
      });
      setTimeout(() => process.exit(0), 100).unref();
    });
  }
});
