// Change events: how each hypervisor's loops learn that something changed
// without anyone calling them. Every Lua script that changes state appends
// its event in the same step, to
//   - mvpc:events, the global stream every host used to read (kept, written
//     beside the scoped ones, so that daemons of the previous release keep
//     working during a rolling upgrade; followEvents reads it);
//   - mvpc:{<vpc>}:events, one stream per VPC the event names (a peering:
//     both), hash-tagged so that on Redis Cluster it lives in the VPC's slot;
//   - mvpc:{host:<host>}:events, one stream per host the event names (a NIC
//     attached or detached there, a binding moved to or from it): how a host
//     learns that a VPC arrived on it or left;
//   - mvpc:{hosts}:events, the fleet stream: the host registry's events (host.*)
//     and any event that names no VPC and no host (the default DNS
//     configuration); braces, so that no host id can make this name.
// A host's EventFeed reads only its own: its host stream, the registry if it
// asks, and the streams of the VPCs it holds. Per-VPC streams rather than
// keyspace notifications (pub/sub): a stream keeps a position, so a host that
// was away reads on from the last id it saw, and XREAD on a few dozen keys is
// one command, where notifications are lost to a disconnected subscriber and
// would need a resync after every blip. See docs/operations.md "Sizing".
//
// On Redis Cluster a command may name keys of one slot only, and every VPC's
// stream is a slot of its own, so the single XREAD BLOCK over all of a
// host's streams is refused (CROSSSLOT). There the feed waits on sharded
// pub/sub instead: a writer publishes to mvpc:{<vpc>}:wake (SPUBLISH, the
// stream's own slot, so it costs the node that holds the VPC only) after
// appending, the feed SSUBSCRIBEs to the wake channels of its streams and,
// on a wake, reads the streams that woke (one non-blocking XREAD each, from
// the last id it saw). A wake is only a hint: a lost one (a subscriber
// reconnecting, a failover) is made good when the subscribers are back (the
// feed then reads every stream) and, failing that, by a slow poll (pollMs); positions, trims and resyncs are the same as on
// a single Redis.
import { readFileSync, renameSync, writeFileSync } from "node:fs";
import type { Redis } from "ioredis";
import { HOST_ID_RE } from "./host.js";
import { duplicateClient, isCluster } from "./redis.js";

export const EVENTS = "mvpc:events";
/** The host registry's stream (host.registered, host.rotated, host.left). */
export const REGISTRY_EVENTS = "mvpc:{hosts}:events";
/** How many entries a scoped stream keeps (approximately: MAXLEN ~): ~110 KB for a busy VPC; a host away for more of one VPC's changes resyncs that VPC once. */
export const SCOPED_MAXLEN = 1000;
/**
 * How long a deleted VPC's stream is kept after its vpc.deleted event: long
 * enough for every reader to take that event, then the key goes (VPC ids are
 * never reused, so without this every VPC ever deleted would leave up to
 * SCOPED_MAXLEN entries behind for good). A reader that comes back later
 * finds no stream, which reads as nothing new (no resync); its whole pass at
 * start, and its periodic drift pass, remove what it held of the VPC. ipam's
 * hourly sweep (IpamStore.expireOrphanStreams) gives the same expiry to a
 * stream whose VPC is gone and that has none.
 */
export const DELETED_VPC_STREAM_TTL_MS = 24 * 3600 * 1000;
/** A VPC's change stream; `{vpc}` is the Redis Cluster hash tag it shares with the VPC's other keys. */
export const vpcEvents = (vpc: string) => `mvpc:{${vpc}}:events`;
/** A host's change stream: its NICs and bindings coming and going. */
export const hostEvents = (host: string) => `mvpc:{host:${host}}:events`;
/** The sharded pub/sub channel a writer publishes to after appending to a scoped stream, in the stream's slot (Redis Cluster: the feed waits on it). */
export const wakeChannel = (stream: string) => stream.replace(/:events$/, ":wake");

/** Redis Cluster: how long a feed waits after a wake for the other streams one change was appended to. */
const WAKE_COALESCE_MS = 2;

const VPC_ID_RE = /^vpc-[0-9a-f]{12}$/;
const STREAM_ID_RE = /^\d{1,20}-\d{1,20}$/;

/**
 * Lua, put at the top of a script: mvpc_emit(vpcs, hosts, field, value, …)
 * appends one event to the global stream, to each named VPC's stream and to
 * each named host's stream ('' and false entries are skipped; an event that
 * names neither concerns the whole fleet and goes to the fleet stream);
 * mvpc_scoped(…) only to the scoped ones (a script that already appends to
 * the global stream through a KEYS entry). The stream
 * names are derived from the event's data, as the scripts' other keys are
 * today; declaring them as KEYS is the Redis Cluster step (docs/operations.md).
 */
export const LUA_EMIT = `
local function mvpc_scoped(vpcs, hosts, ...)
  local seen, n = {}, 0
  for _, v in pairs(vpcs) do
    if v and v ~= '' and not seen[v] then seen[v] = true n = n + 1 redis.call('XADD', 'mvpc:{' .. v .. '}:events', 'MAXLEN', '~', ${SCOPED_MAXLEN}, '*', ...) end
  end
  for _, h in pairs(hosts) do
    if h and h ~= '' and not seen['host:' .. h] then seen['host:' .. h] = true n = n + 1 redis.call('XADD', 'mvpc:{host:' .. h .. '}:events', 'MAXLEN', '~', ${SCOPED_MAXLEN}, '*', ...) end
  end
  if n == 0 then redis.call('XADD', '${REGISTRY_EVENTS}', 'MAXLEN', '~', ${SCOPED_MAXLEN}, '*', ...) end
end
local function mvpc_emit(vpcs, hosts, ...)
  redis.call('XADD', '${EVENTS}', 'MAXLEN', '~', 100000, '*', ...)
  mvpc_scoped(vpcs, hosts, ...)
end
`;

/**
 * LUA_EMIT as a script that runs on a Redis Cluster uses it (scriptFor): the
 * same mvpc_emit and mvpc_scoped, appending to each named stream and
 * publishing its wake (the feed on a cluster waits on the wakes), and not to
 * the global stream, which is in another slot (what reads it there, the
 * vmm's fleet WatchVms, wants the vm.* events emit() appends from the
 * client). A script on a cluster names
 * only the streams of its own slot: its VPC, or the fleet stream with keys
 * under "{hosts}".
 */
export const LUA_EMIT_CLUSTER = `
local function mvpc_scoped(vpcs, hosts, ...)
  local f, seen, tags = {...}, {}, {}
  for _, v in pairs(vpcs) do
    if v and v ~= '' and not seen[v] then seen[v] = true tags[#tags + 1] = 'mvpc:{' .. v .. '}' end
  end
  for _, h in pairs(hosts) do
    if h and h ~= '' and not seen['host:' .. h] then seen['host:' .. h] = true tags[#tags + 1] = 'mvpc:{host:' .. h .. '}' end
  end
  if #tags == 0 then tags[1] = '${REGISTRY_EVENTS.replace(/:events$/, "")}' end
  for _, t in ipairs(tags) do
    redis.call('XADD', t .. ':events', 'MAXLEN', '~', ${SCOPED_MAXLEN}, '*', unpack(f))
    redis.call('SPUBLISH', t .. ':wake', '1')
  end
end
local function mvpc_emit(vpcs, hosts, ...)
  mvpc_scoped(vpcs, hosts, ...)
end
`;

/** A script's text for this client: on a Redis Cluster, with LUA_EMIT_CLUSTER in place of LUA_EMIT. */
export function scriptFor(redis: Redis, lua: string): string {
  return isCluster(redis) && lua.includes(LUA_EMIT) ? lua.replace(LUA_EMIT, LUA_EMIT_CLUSTER) : lua;
}

/**
 * The same from TypeScript: for the few writers that are not scripts. One
 * MULTI on a single Redis; on Redis Cluster one MULTI per stream (a MULTI may
 * not span slots), each followed by the stream's wake (SPUBLISH, see above).
 */
export async function emit(redis: Redis, scope: { vpcs?: string[]; hosts?: string[]; registry?: boolean }, fields: string[]): Promise<unknown> {
  const scoped: string[] = [];
  for (const v of new Set(scope.vpcs ?? [])) if (v) scoped.push(vpcEvents(v));
  for (const h of new Set(scope.hosts ?? [])) if (h) scoped.push(hostEvents(h));
  if (scope.registry) scoped.push(REGISTRY_EVENTS);
  if (!isCluster(redis)) {
    const m = redis.multi().xadd(EVENTS, "MAXLEN", "~", "100000", "*", ...fields);
    for (const s of scoped) m.xadd(s, "MAXLEN", "~", String(SCOPED_MAXLEN), "*", ...fields);
    return m.exec();
  }
  return Promise.all([
    redis.xadd(EVENTS, "MAXLEN", "~", "100000", "*", ...fields),
    ...scoped.map((s) =>
      redis
        .multi()
        .xadd(s, "MAXLEN", "~", String(SCOPED_MAXLEN), "*", ...fields)
        .spublish(wakeChannel(s), "1")
        .exec(),
    ),
  ]);
}

/** One event's fields (kind, and what the writer added: vpc, host, nic…). */
export type EventFields = Record<string, string>;

type XReadReply = [string, [string, string[]][]][] | null;

/** A stream entry's flat [field, value, …] list as its fields. */
export function fieldsOf(f: string[]): EventFields {
  const fields: EventFields = {};
  for (let i = 0; i + 1 < f.length; i += 2) fields[f[i]] = f[i + 1];
  return fields;
}

/**
 * Calls onMatch with the events of the global stream whose kind matches
 * `kinds` whenever some arrive, until stopped() is true. Uses its own
 * connection (XREAD BLOCK holds it) and keeps retrying while Redis is away.
 * For what is not scoped to a host (the vmm's WatchVms). `settleMs`: a
 * pause after each batch, so that a reader that wants few of the fleet's
 * events (the vmm wants a handful of kinds) reads them in a few batches
 * rather than waking for each of the dozen every VM start appends; none is
 * lost meanwhile (the next read goes on from the last id seen).
 */
export async function followEvents(
  redis: Redis,
  kinds: RegExp,
  onMatch: (events: EventFields[]) => void,
  stopped: () => boolean,
  settleMs = 0,
  /** The id to read after (streamHead's lastGenerated, taken before the caller's own read of the state); default: what comes after the first XREAD. */
  from = "$",
): Promise<void> {
  const sub = duplicateClient(redis, { enableOfflineQueue: true, commandTimeout: undefined, maxRetriesPerRequest: null });
  sub.on("error", () => {});
  let last = from;
  while (!stopped()) {
    try {
      const r = (await sub.xread("COUNT", 1000, "BLOCK", 5000, "STREAMS", EVENTS, last)) as XReadReply;
      if (!r) continue;
      const entries = r[0][1];
      last = entries[entries.length - 1][0];
      const matched = entries.map(([, f]) => fieldsOf(f)).filter((e) => kinds.test(e.kind ?? ""));
      if (matched.length) onMatch(matched);
      if (settleMs > 0) await new Promise((res) => setTimeout(res, settleMs));
    } catch {
      await new Promise((res) => setTimeout(res, 1000));
    }
  }
  sub.disconnect();
}

// ---------- the scoped feed ----------

/** A stream's first entry and last generated id ("0-0" for a stream that does not exist). */
export async function streamHead(redis: Redis, stream: string): Promise<StreamHead> {
  let info: unknown[];
  try {
    info = (await redis.xinfo("STREAM", stream)) as unknown[];
  } catch (err) {
    if (/no such key/i.test((err as Error).message)) return { lastGenerated: "0-0" };
    throw err;
  }
  const get = (k: string) => info[info.indexOf(k) + 1];
  const first = get("first-entry") as [string, string[]] | null;
  return { first: first ? first[0] : undefined, lastGenerated: String(get("last-generated-id")) };
}

/** Compares two stream ids ("ms-seq"). */
export function cmpId(a: string, b: string): number {
  const [am, as] = a.split("-").map(BigInt);
  const [bm, bs] = b.split("-").map(BigInt);
  return am !== bm ? (am < bm ? -1 : 1) : as === bs ? 0 : as < bs ? -1 : 1;
}

/** What a stream looks like now, for the trim check. */
export interface StreamHead {
  /** Id of its oldest entry; undefined when it has none. */
  first?: string;
  /** The last id it ever gave out ("0-0" for a stream that does not exist). */
  lastGenerated: string;
}

/**
 * Whether entries after `seen` may have been trimmed before this reader got
 * them: the oldest entry left is newer than `seen` (or none is left and
 * newer ones were made). May answer yes when the entry right after `seen`
 * was the one kept (a needless resync); never no when one was lost.
 */
export function lostSince(seen: string, head: StreamHead): boolean {
  if (head.first !== undefined) return cmpId(head.first, seen) > 0 && !isNext(seen, head.first);
  return cmpId(head.lastGenerated, seen) > 0;
}

/** Ids Redis hands out are increasing; "next" is only certain within one millisecond's sequence. */
function isNext(a: string, b: string): boolean {
  const [am, as] = a.split("-").map(BigInt);
  const [bm, bs] = b.split("-").map(BigInt);
  return am === bm && bs === as + 1n;
}

/** Where a feed keeps its last-seen ids between runs (a host that was away reads on from them). */
export interface PositionStore {
  load(): Map<string, string>;
  save(positions: ReadonlyMap<string, string>): void;
}

/** Positions in memory (tests, the fleet bench: a "restart" hands the same store to a new feed). */
export class MemoryPositions implements PositionStore {
  private saved = new Map<string, string>();
  load(): Map<string, string> {
    return new Map(this.saved);
  }
  save(p: ReadonlyMap<string, string>): void {
    this.saved = new Map(p);
  }
}

/** Positions in a JSON file, written whole and renamed; a bad file or entry is ignored (a resync, never a wrong read). */
export class FilePositions implements PositionStore {
  constructor(readonly path: string) {}
  load(): Map<string, string> {
    const out = new Map<string, string>();
    try {
      const j = JSON.parse(readFileSync(this.path, "utf8")) as unknown;
      if (j && typeof j === "object" && !Array.isArray(j)) {
        for (const [k, v] of Object.entries(j as Record<string, unknown>)) if (streamOk(k) && typeof v === "string" && STREAM_ID_RE.test(v)) out.set(k, v);
      }
    } catch {
      // none yet, or unreadable: every stream starts with a resync
    }
    return out;
  }
  save(p: ReadonlyMap<string, string>): void {
    writeFileSync(`${this.path}.tmp`, JSON.stringify(Object.fromEntries(p)));
    renameSync(`${this.path}.tmp`, this.path);
  }
}

function streamOk(s: string): boolean {
  const v = /^mvpc:\{(vpc-[0-9a-f]{12})\}:events$/.exec(s);
  const h = /^mvpc:\{host:([a-z0-9]{1,24})\}:events$/.exec(s);
  return Boolean(v) || Boolean(h) || s === REGISTRY_EVENTS;
}

export interface FeedSpec {
  /** This host (its stream tells it when a VPC arrives or leaves). */
  host: string;
  /** The VPCs this host holds now (read at start, after each host-stream event and every rescanMs). */
  vpcs: () => Promise<Iterable<string>>;
  /** Whether to read the host registry's stream too. */
  registry?: boolean;
  /** The kinds handed on; feed.* events (below) are always handed on. */
  kinds: RegExp;
  /**
   * Called with each batch. Besides the stored events, the feed makes
   * `feed.joined` (vpc: a VPC arrived; its stream is read from a position
   * taken before this event, so a pass that reads the VPC's state now
   * misses nothing), `feed.left` (vpc) and `feed.resync` (vpc, or no vpc:
   * the host or registry stream; entries were trimmed before this host read
   * them: read the state again).
   */
  onEvents: (events: EventFields[]) => void;
  /** Last-seen ids kept across runs; default: none (every start is a fresh read of the state). */
  positions?: PositionStore;
  rescanMs?: number;
  /** Single Redis: how long one XREAD BLOCK waits before the loop goes round (a rescan may be due). */
  blockMs?: number;
  /**
   * Redis Cluster: how often the feed reads every stream although no wake
   * came (±10 %, so that a fleet's hosts do not poll in step). A wake is lost
   * only while a subscriber reconnects, and the feed reads every stream when
   * its subscribers are back, so this is a drift check; default 30 s.
   */
  pollMs?: number;
  /** Called once per XREAD that woke with entries (the fleet bench counts wake-ups). */
  onWake?: () => void;
  /**
   * A pause after each batch before the next read, for a reader that wants
   * few of its VPCs' events or can take them a little later (a VM start
   * appends a dozen, over some 30 ms, to its VPC's stream): they come in a
   * few batches instead of one wake-up each. Nothing is lost (the next read
   * continues from the last ids); each change arrives at most this much later.
   */
  settleMs?: number;
  /** Ends the feed as stop() does, checked between reads. */
  stopped?: () => boolean;
}

/**
 * Follows a host's scoped streams until stop(): one connection, one XREAD
 * BLOCK over all of them. The set of VPCs is re-read when the host stream
 * says something changed, on hold(), and every rescanMs as a drift check.
 */
export class EventFeed {
  private readonly pos = new Map<string, string>();
  private readonly held = new Set<string>();
  private stopped = false;
  private rescan = true;
  private sub?: Redis;
  private lastScan = 0;
  private checkAll = true;
  private firstScan = true;
  private lastSave = 0;
  /** Redis Cluster: wait on wake channels instead of one XREAD BLOCK (see the top of this file). */
  private readonly cluster: boolean;
  /** Cluster: the wake channel → stream subscribed to, the streams woken since the last read, and who waits for one. */
  private readonly wakes = new Map<string, string>();
  private readonly dirty = new Set<string>();
  private onWoken?: () => void;
  /** Resolves once the first read of the VPC set is done and every stream has its position. */
  readonly ready: Promise<void>;
  private markReady!: () => void;

  constructor(
    private readonly redis: Redis,
    readonly spec: FeedSpec,
  ) {
    if (!HOST_ID_RE.test(spec.host)) throw new Error(`EventFeed: host ${JSON.stringify(spec.host)} is not a hypervisor id`);
    this.cluster = isCluster(redis);
    this.ready = new Promise((r) => (this.markReady = r));
  }

  /** The VPCs whose streams are read now. */
  vpcs(): string[] {
    return [...this.held].sort();
  }

  /** Asks for the VPC set to be read again before the next XREAD (a caller that knows a VPC arrives). */
  refresh(): void {
    this.rescan = true;
    // Cluster: the loop may be waiting for a wake; go round now.
    this.onWoken?.();
  }

  /** Runs until stop(). */
  async run(): Promise<void> {
    const { spec } = this;
    this.sub = duplicateClient(this.redis, { enableOfflineQueue: true, commandTimeout: undefined, maxRetriesPerRequest: null }, { shardedSubscribers: true });
    this.sub.on("error", () => {});
    if (this.cluster) {
      this.sub.on("smessage", (channel: string) => this.woken(channel));
      // Subscribers reconnected (a node failed over, a slot moved): wakes may have been lost meanwhile.
      this.sub.on("subscribersReady", () => this.wakeAll());
    }
    const saved = spec.positions?.load() ?? new Map<string, string>();
    const fixed = [hostEvents(spec.host), ...(spec.registry ? [REGISTRY_EVENTS] : [])];
    try {
      while (!this.stopped && !spec.stopped?.()) {
        try {
          const out: EventFields[] = [];
          for (const s of fixed) if (!this.pos.has(s)) this.pos.set(s, saved.get(s) ?? (await this.lastId(s)));
          if (this.rescan || Date.now() - this.lastScan > (spec.rescanMs ?? 30_000)) await this.scan(saved, out);
          if (this.checkAll) await this.checkTrims([...this.pos.keys()], out);
          this.checkAll = false;
          this.markReady();
          if (out.length) spec.onEvents(out);
          const streams = [...this.pos.keys()];
          const r = this.cluster ? await this.readWoken(streams) : await this.readBlocking(streams);
          if (!r || this.stopped) continue;
          spec.onWake?.();
          const events: EventFields[] = [];
          const full: string[] = [];
          for (const [stream, entries] of r) {
            if (!this.pos.has(stream) || !entries.length) continue;
            this.pos.set(stream, entries[entries.length - 1][0]);
            if (entries.length >= 1000) {
              full.push(stream);
              // Cluster: there may be more, and no wake is coming for them.
              if (this.cluster) this.dirty.add(stream);
            }
            for (const [, f] of entries) {
              const e = fieldsOf(f);
              if (stream === fixed[0]) this.rescan = true;
              if (spec.kinds.test(e.kind ?? "")) events.push(e);
            }
          }
          // A full batch: this reader may be far enough behind for a trim to pass it.
          if (full.length) await this.checkTrims(full, events);
          if (events.length) spec.onEvents(events);
          this.persist(false);
          if (spec.settleMs) await new Promise((res) => setTimeout(res, spec.settleMs));
        } catch {
          if (this.stopped) break;
          // Redis away or the connection dropped: on return, check every position against trimming.
          this.checkAll = true;
          await new Promise((res) => setTimeout(res, 500));
        }
      }
    } finally {
      this.persist(true);
      this.sub.disconnect();
    }
  }

  stop(): void {
    this.stopped = true;
    this.sub?.disconnect();
    this.onWoken?.();
  }

  /** Single Redis: one XREAD BLOCK over every stream, then the others without blocking. */
  private async readBlocking(streams: string[]): Promise<XReadReply> {
    const spec = this.spec;
    const sub = this.sub!;
    const r = (await sub.xread("COUNT", 1000, "BLOCK", spec.blockMs ?? 5000, "STREAMS", ...streams, ...streams.map((s) => this.pos.get(s)!))) as XReadReply;
    if (!r || this.stopped || streams.length === 1) return r;
    // A blocked XREAD returns with the first stream that got an entry
    // only. A script writes its event to every stream it names in one
    // step (a NIC's: its VPC's and its host's), so the copies in the
    // others are there already: read them now, without blocking, so
    // that one change is one batch (one pass), not one per stream.
    const got = new Map(r.map(([stream, entries]) => [stream, entries]));
    const rest = (await sub.xread(
      "COUNT",
      1000,
      "STREAMS",
      ...streams,
      ...streams.map((s) => (got.get(s)?.length ? got.get(s)![got.get(s)!.length - 1][0] : this.pos.get(s)!)),
    )) as XReadReply | null;
    for (const [stream, entries] of rest ?? []) if (entries.length) got.set(stream, [...(got.get(stream) ?? []), ...entries]);
    return [...got];
  }

  private wakeAll(): void {
    for (const s of this.wakes.values()) this.dirty.add(s);
    this.onWoken?.();
  }

  private woken(channel: string): void {
    const s = this.wakes.get(channel);
    if (!s) return;
    this.dirty.add(s);
    this.onWoken?.();
  }

  /**
   * Redis Cluster: subscribes to the wake channels of the streams read now
   * (a stream just subscribed to is read once, for what came before its
   * subscription), waits for a wake or pollMs (then reads every stream: a
   * lost wake costs that long, never a change), and reads the woken streams,
   * one XREAD each (each is its own slot; the client pipelines them per node).
   */
  private async readWoken(streams: string[]): Promise<XReadReply> {
    const sub = this.sub!;
    const want = new Set(streams);
    for (const [ch, s] of [...this.wakes]) {
      if (want.has(s)) continue;
      this.wakes.delete(ch);
      this.dirty.delete(s);
      await sub.sunsubscribe(ch);
    }
    for (const s of streams) {
      const ch = wakeChannel(s);
      if (this.wakes.has(ch)) continue;
      await sub.ssubscribe(ch);
      this.wakes.set(ch, s);
      this.dirty.add(s);
    }
    if (!this.dirty.size) {
      await new Promise<void>((res) => {
        const poll = this.spec.pollMs ?? 30_000;
        const t = setTimeout(
          () => {
            for (const s of streams) this.dirty.add(s);
            res();
          },
          poll * (0.9 + 0.2 * Math.random()),
        );
        this.onWoken = () => {
          clearTimeout(t);
          res();
        };
      });
      this.onWoken = undefined;
      // One change wakes each stream it was appended to (a NIC's VPC and its
      // host, in two slots, written one after the other): let the others'
      // wakes land so that it is usually one batch, not two.
      await new Promise((res) => setTimeout(res, WAKE_COALESCE_MS));
    }
    if (this.stopped) return null;
    const read = [...this.dirty].filter((s) => want.has(s));
    this.dirty.clear();
    let replies: XReadReply[];
    try {
      replies = await Promise.all(read.map((s) => this.redis.xread("COUNT", 1000, "STREAMS", s, this.pos.get(s)!) as Promise<XReadReply>));
    } catch (err) {
      for (const s of read) this.dirty.add(s);
      throw err;
    }
    const out = replies.flatMap((r) => r ?? []);
    return out.length ? out : null;
  }

  private persist(now: boolean): void {
    if (!this.spec.positions || (!now && Date.now() - this.lastSave < 1000)) return;
    this.lastSave = Date.now();
    this.spec.positions.save(this.pos);
  }

  /** The id a reader starting now reads after: the stream's last generated id. */
  private async lastId(stream: string): Promise<string> {
    return (await streamHead(this.redis, stream)).lastGenerated;
  }

  /** Reads the VPC set; a VPC that arrived gets its position (taken now, before feed.joined asks for its state), one that left is dropped. */
  private async scan(saved: ReadonlyMap<string, string>, out: EventFields[]): Promise<void> {
    this.rescan = false;
    this.lastScan = Date.now();
    const now = new Set([...(await this.spec.vpcs())].filter((v) => VPC_ID_RE.test(v)));
    for (const v of now) {
      if (this.held.has(v)) continue;
      const s = vpcEvents(v);
      const was = this.firstScan ? saved.get(s) : undefined;
      if (was) {
        // A restart with a saved position: read on from it (checkTrims says whether that is still possible).
        this.pos.set(s, was);
      } else {
        this.pos.set(s, await this.lastId(s));
        out.push({ kind: "feed.joined", vpc: v });
      }
      this.held.add(v);
    }
    this.firstScan = false;
    for (const v of [...this.held]) {
      if (now.has(v)) continue;
      this.held.delete(v);
      this.pos.delete(vpcEvents(v));
      out.push({ kind: "feed.left", vpc: v });
    }
  }

  private async checkTrims(streams: string[], out: EventFields[]): Promise<void> {
    for (const s of streams) {
      const seen = this.pos.get(s);
      if (!seen) continue;
      const head = await streamHead(this.redis, s);
      if (!lostSince(seen, head)) continue;
      // Resync from what is there now: the state is read again after this event.
      this.pos.set(s, head.lastGenerated);
      const m = /^mvpc:\{(vpc-[0-9a-f]{12})\}:events$/.exec(s);
      out.push(m ? { kind: "feed.resync", vpc: m[1] } : { kind: "feed.resync", stream: s });
    }
  }
}

/** Where a daemon's scoped feed reads: its host, the VPCs it holds, and the fleet stream if it asks. */
export interface FeedScope {
  host: string;
  vpcs: (redis: Redis) => Promise<Iterable<string>>;
  registry?: boolean;
  /** FeedSpec.settleMs. */
  settleMs?: number;
}

/**
 * followEvents over a host's scoped streams (EventFeed): the same callback,
 * which also gets the feed.* events; stop() ends it and its connection at
 * once; refresh() has the VPC set read again before the next read.
 * MICROVPC_EVENTS=global reads the global stream instead (a fleet part-way
 * through a rolling upgrade whose writers do not all write the scoped
 * streams yet: docs/operations.md).
 */
export function followScoped(
  redis: Redis,
  scope: FeedScope,
  kinds: RegExp,
  onMatch: (events: EventFields[]) => void,
  stopped: () => boolean,
): { done: Promise<void>; stop: () => void; refresh: () => void } {
  if (process.env.MICROVPC_EVENTS === "global") {
    let ended = false;
    return { done: followEvents(redis, kinds, onMatch, () => ended || stopped(), scope.settleMs), stop: () => (ended = true), refresh: () => {} };
  }
  const feed = new EventFeed(redis, {
    host: scope.host,
    vpcs: () => scope.vpcs(redis),
    registry: scope.registry,
    settleMs: scope.settleMs,
    kinds,
    onEvents: onMatch,
    stopped,
  });
  return { done: feed.run(), stop: () => feed.stop(), refresh: () => feed.refresh() };
}
