// `microvpcd move-to-cluster`: copies a deployment's keys from one Redis (or
// Sentinel) into an empty Redis Cluster under the cluster's names
// (plan.ts). The single Redis is only read: a move that fails part-way
// leaves it as it was, and the cluster is emptied and the move run again.
//
// Run with every microvpc daemon stopped: the move refuses a source that
// other clients are connected to (CLIENT LIST), since a write during the
// copy would be lost on one side, and refuses a cluster that already holds
// microvpc keys. After the copy every key written is checked against its
// source (type and length), and the source against its snapshot.
import { Option, type Command } from "commander";
import type { Cluster, Redis } from "ioredis";
import { connectRedis, isClusterUrl, isSentinelUrl, passwordIn, SENTINEL_SCHEME, waitReady } from "../common/redis.js";
import { plan, wanted, type Op, type Plan, type Snapshot } from "./plan.js";

export interface MoveOptions {
  from: string;
  to: string;
  fromPasswordFile?: string;
  /** The sentinels' password, when --from is a redis-sentinel:// URL whose sentinels have requirepass. */
  fromSentinelPasswordFile?: string;
  toPasswordFile?: string;
  /** Print the plan, write nothing. */
  dryRun?: boolean;
  /** Go ahead although other clients are connected to the source (ones known not to be microvpc daemons: a monitor). */
  ignoreClients?: boolean;
  /** One line of progress or of the report. */
  say: (line: string) => void;
}

export interface MoveReport {
  plan: Plan;
  /** Keys read from the single Redis. */
  read: number;
  /** Keys written on the cluster (0 on a dry run or a refusal). */
  written: number;
}

/** Stops the move with a reason a person can act on; nothing was written. */
export class MoveRefused extends Error {}

const BATCH = 256;
const LENGTH: Record<string, string> = { hash: "hlen", set: "scard", zset: "zcard", list: "llen", stream: "xlen", string: "strlen" };

export async function moveToCluster(o: MoveOptions): Promise<MoveReport> {
  if (isClusterUrl(o.from)) throw new MoveRefused(`--from ${o.from} is a cluster: the move reads one Redis (or a Sentinel's primary)`);
  // (--to is not repeated: a redis:// URL given by mistake may carry a password.)
  if (!isClusterUrl(o.to))
    throw new MoveRefused(`--to is not a redis-cluster:// URL: the move writes into a Redis Cluster, named by its seeds (redis-cluster://host:port,host:port)`);
  // (--from is not repeated: a redis:// URL may carry a password.)
  if (o.fromSentinelPasswordFile && !isSentinelUrl(o.from))
    throw new MoveRefused(`--from-sentinel-password-file is for a Sentinel --from (${SENTINEL_SCHEME}…); this --from names no sentinels`);
  const src = connectRedis({
    url: o.from,
    commandTimeoutMs: 30_000,
    ...(o.fromPasswordFile ? { password: passwordIn("--from-password-file", o.fromPasswordFile) } : {}),
    ...(o.fromSentinelPasswordFile ? { sentinelPassword: passwordIn("--from-sentinel-password-file", o.fromSentinelPasswordFile) } : {}),
  });
  const dst = connectRedis({
    url: o.to,
    commandTimeoutMs: 30_000,
    ...(o.toPasswordFile ? { password: passwordIn("--to-password-file", o.toPasswordFile) } : {}),
  });
  try {
    await Promise.all([waitReady(src, 10_000), waitReady(dst, 10_000)]);
    if (!o.ignoreClients) await noOtherClients(src);
    await clusterEmpty(dst);
    await versionsMatch(src, dst);
    const snap = await snapshot(src);
    const p = plan(snap);
    const report: MoveReport = { plan: p, read: snap.types.size, written: 0 };
    o.say(`read ${snap.types.size} keys; ${p.ops.length} to write, ${p.skipped.length} left behind, ${p.refusals.length} refusals`);
    const why = new Map<string, string[]>();
    for (const s of p.skipped) why.set(s.why, [...(why.get(s.why) ?? []), s.key]);
    for (const [w, keys] of why) o.say(`left behind, ${keys.length} key(s): ${w} (${keys.slice(0, 3).join(", ")}${keys.length > 3 ? ", …" : ""})`);
    if (p.refusals.length) throw new MoveRefused(`nothing was written:\n${p.refusals.map((r) => `  ${r}`).join("\n")}`);
    if (o.dryRun) {
      for (const op of p.ops) o.say(describe(op));
      return report;
    }
    const t0 = performance.now();
    const lapsed = new Set<string>();
    let t1 = t0;
    try {
      report.written = await execute(src, dst, p.ops, snap, lapsed);
      t1 = performance.now();
      await verify(src, dst, p.ops, snap, lapsed);
      await unchanged(src, snap, lapsed);
    } catch (err) {
      throw new Error(
        `${(err as Error).message}\nThe cluster holds part of the copy: empty it (FLUSHALL on each primary) and run the move again. The single Redis was only read.`,
        { cause: err },
      );
    }
    if (lapsed.size)
      o.say(
        `left behind, ${lapsed.size} key(s) whose time to live ran out during the move (leases, tokens: their daemons make them again): ${[...lapsed].slice(0, 3).join(", ")}`,
      );
    o.say(
      `wrote ${report.written} keys on the cluster in ${Math.round(t1 - t0)} ms; each checked against its source, and the source against what was read, in ${Math.round(performance.now() - t1)} ms`,
    );
    return report;
  } finally {
    src.disconnect();
    dst.disconnect();
  }
}

function describe(op: Op): string {
  if (op.op === "copy") return `copy ${op.from} → ${op.to.join(", ")}`;
  if (op.op === "hash") return `build ${op.to} (${Object.keys(op.fields).length} fields)`;
  return `build ${op.to} = ${op.value}`;
}

/** Refuses while another client (a daemon still running) is connected to the source. */
async function noOtherClients(src: Redis): Promise<void> {
  const me = String(await src.client("ID"));
  const list = String(await src.client("LIST"));
  const others = list
    .split("\n")
    .filter((l) => l.trim())
    .map(
      (l) =>
        Object.fromEntries(
          l
            .trim()
            .split(" ")
            .map((kv) => [kv.slice(0, kv.indexOf("=")), kv.slice(kv.indexOf("=") + 1)]),
        ) as Record<string, string>,
    )
    // Replicas and Sentinels (their two connections, named sentinel-<id>-cmd and -pubsub) are not writers.
    .filter(
      (c) =>
        c.id !== me &&
        !/[SM]/.test(c.flags ?? "") &&
        !["sync", "psync", "replconf"].includes(c.cmd ?? "") &&
        !/^sentinel-[0-9a-f]{8}-(cmd|pubsub)$/.test(c.name ?? ""),
    );
  if (others.length)
    throw new MoveRefused(
      `${others.length} other client(s) are connected to the source (${others
        .slice(0, 5)
        .map((c) => `${c.addr}${c.name ? ` "${c.name}"` : ""} last ${c.cmd}`)
        .join("; ")}): stop every microvpc daemon first (a write during the copy would be lost), or give --ignore-clients if none of them writes`,
    );
}

async function clusterEmpty(dst: Redis): Promise<void> {
  for (const node of (dst as unknown as Cluster).nodes("master")) {
    let cursor = "0";
    let found: string | undefined;
    do {
      const r = await node.scan(cursor, "MATCH", "mvpc*", "COUNT", 1000);
      cursor = r[0];
      found = r[1][0];
    } while (!found && cursor !== "0");
    if (found)
      throw new MoveRefused(
        `the cluster already holds microvpc keys (${found} on ${node.options.host}:${node.options.port}): the move copies into an empty cluster; empty it (FLUSHALL on each primary) if it holds a move that failed part-way`,
      );
  }
}

/** RESTORE takes only payloads of its own RDB version or older: every primary runs the source's Redis version or a later one. */
async function versionsMatch(src: Redis, dst: Redis): Promise<void> {
  const version = async (r: Redis) =>
    /redis_version:([0-9]+)\.([0-9]+)/
      .exec(String(await r.info("server")))
      ?.slice(1)
      .map(Number) ?? [0, 0];
  const [sm, sn] = await version(src);
  for (const node of (dst as unknown as Cluster).nodes("master")) {
    const [m, n] = await version(node);
    if (m < sm || (m === sm && n < sn))
      throw new MoveRefused(
        `${node.options.host}:${node.options.port} runs Redis ${m}.${n}, older than the source's ${sm}.${sn}: its RESTORE refuses the source's DUMP payloads; upgrade the cluster first`,
      );
  }
}

/** The source as read: the plan's snapshot, and which keys had a time to live (they may lapse during the move). */
type Read = Snapshot & { expiring: Set<string> };

async function snapshot(src: Redis): Promise<Read> {
  const names = new Set<string>();
  let cursor = "0";
  do {
    const [next, keys] = await src.scan(cursor, "MATCH", "mvpc*", "COUNT", 1000);
    cursor = next;
    for (const k of keys) if (k.startsWith("mvpc:") || k.startsWith("mvpc-md:")) names.add(k);
  } while (cursor !== "0");
  const snap: Read = { types: new Map(), hashes: new Map(), strings: new Map(), sets: new Map(), expiring: new Set() };
  const all = [...names];
  for (let i = 0; i < all.length; i += BATCH) {
    const chunk = all.slice(i, i + BATCH);
    const r = await pipe(
      src,
      chunk.flatMap((k) => [
        ["type", k],
        ["pttl", k],
      ]),
    );
    chunk.forEach((k, j) => {
      if (r[2 * j] === "none") return;
      snap.types.set(k, String(r[2 * j]));
      if ((r[2 * j + 1] as number) > 0) snap.expiring.add(k);
    });
  }
  const want = [...snap.types].filter(([k, t]) => wanted(k, t));
  for (let i = 0; i < want.length; i += BATCH) {
    const chunk = want.slice(i, i + BATCH);
    const cmd = (t: string) => (t === "hash" ? "hgetall" : t === "set" ? "smembers" : t === "string" ? "get" : null);
    const replies = await pipe(
      src,
      chunk.map(([k, t]) => [cmd(t) ?? "type", k]),
    );
    chunk.forEach(([k, t], j) => {
      const r = replies[j];
      if (t === "hash") snap.hashes.set(k, pairs(r));
      else if (t === "set") snap.sets.set(k, r as string[]);
      else if (t === "string" && r !== null) snap.strings.set(k, String(r));
    });
  }
  return snap;
}

function pairs(r: unknown): Record<string, string> {
  if (!Array.isArray(r)) return (r ?? {}) as Record<string, string>;
  const out: Record<string, string> = {};
  for (let i = 0; i + 1 < r.length; i += 2) out[String(r[i])] = String(r[i + 1]);
  return out;
}

async function pipe(r: Redis, cmds: (string | Buffer | number)[][]): Promise<unknown[]> {
  const res = await r.pipeline(cmds as string[][]).exec();
  return (res ?? []).map(([err, v]) => {
    if (err) throw err;
    return v;
  });
}

async function execute(src: Redis, dst: Redis, ops: Op[], snap: Read, lapsed: Set<string>): Promise<number> {
  let written = 0;
  const copies = ops.filter((o): o is Extract<Op, { op: "copy" }> => o.op === "copy");
  for (let i = 0; i < copies.length; i += BATCH) {
    const chunk = copies.slice(i, i + BATCH);
    const p = src.pipeline();
    for (const c of chunk) p.dumpBuffer(c.from).pttl(c.from);
    const res = (await p.exec()) ?? [];
    const writes: Promise<unknown>[] = [];
    chunk.forEach((c, j) => {
      const [[e1, dump], [e2, ttl]] = [res[2 * j], res[2 * j + 1]];
      if (e1 || e2) throw e1 ?? e2;
      if (dump === null || (ttl as number) === -2) {
        if (snap.expiring.has(c.from)) return void lapsed.add(c.from);
        throw new Error(`${c.from} went away during the move (a ${snap.types.get(c.from)} without a time to live): is a daemon still running?`);
      }
      for (const to of c.to) {
        writes.push(dst.restore(to, Math.max(0, ttl as number), dump as Buffer));
        written++;
      }
    });
    await Promise.all(writes);
  }
  const builds: Promise<unknown>[] = [];
  for (const op of ops) {
    if (op.op === "hash") {
      const entries = Object.entries(op.fields);
      for (let i = 0; i < entries.length; i += 1000) builds.push(dst.hset(op.to, Object.fromEntries(entries.slice(i, i + 1000))));
      written++;
    } else if (op.op === "string") {
      builds.push(dst.set(op.to, op.value, "NX"));
      written++;
    }
    if (builds.length >= BATCH) await Promise.all(builds.splice(0));
  }
  await Promise.all(builds);
  return written;
}

/** Every key written has its source's type and length (a copy) or the fields the plan built. */
async function verify(src: Redis, dst: Redis, ops: Op[], snap: Read, lapsed: Set<string>): Promise<void> {
  const wrong: string[] = [];
  const copies = ops.filter((o): o is Extract<Op, { op: "copy" }> => o.op === "copy" && !lapsed.has(o.from));
  for (let i = 0; i < copies.length; i += BATCH) {
    const chunk = copies.slice(i, i + BATCH);
    const lens = await pipe(
      src,
      chunk.map((c) => [LENGTH[snap.types.get(c.from)!] ?? "exists", c.from]),
    );
    await Promise.all(
      chunk.flatMap((c, j) =>
        c.to.map(async (to) => {
          const t = snap.types.get(c.from)!;
          const [type, len] = await Promise.all([dst.type(to), dst.call(LENGTH[t] ?? "exists", to)]);
          // A lease copied with its time to live may lapse on either side meanwhile.
          if (snap.expiring.has(c.from) && (type === "none" || lens[j] === 0)) return;
          if (type !== t || len !== lens[j]) wrong.push(`${to}: ${type}/${String(len)} on the cluster, ${t}/${String(lens[j])} at ${c.from}`);
        }),
      ),
    );
  }
  await Promise.all(
    ops.map(async (op) => {
      if (op.op === "hash") {
        const n = await dst.hlen(op.to);
        if (n !== Object.keys(op.fields).length) wrong.push(`${op.to}: ${n} fields, ${Object.keys(op.fields).length} built`);
      } else if (op.op === "string" && (await dst.get(op.to)) !== op.value) wrong.push(`${op.to}: not ${op.value}`);
    }),
  );
  if (wrong.length) throw new Error(`the copy does not match its source (a daemon still running?):\n  ${wrong.slice(0, 20).join("\n  ")}`);
}

/** The source still holds what was read: the same keys of the same types (less leases that lapsed), and the same contents of those the plan read. */
async function unchanged(src: Redis, snap: Read, lapsed: Set<string>): Promise<void> {
  const now = await snapshot(src);
  const wrong: string[] = [];
  for (const k of now.types.keys()) if (!snap.types.has(k)) wrong.push(`${k}: written during the move`);
  for (const [k, t] of snap.types) {
    const n = now.types.get(k);
    if (n === undefined && !snap.expiring.has(k) && !lapsed.has(k)) wrong.push(`${k}: deleted during the move`);
    else if (n !== undefined && n !== t) wrong.push(`${k}: a ${t} when read, a ${n} now`);
  }
  const same = (a: unknown, b: unknown) => JSON.stringify(a) === JSON.stringify(b);
  for (const [k, h] of snap.hashes) if (now.types.has(k) && !same(h, now.hashes.get(k))) wrong.push(`${k}: changed during the move`);
  for (const [k, v] of snap.strings) if (now.types.has(k) && v !== now.strings.get(k)) wrong.push(`${k}: changed during the move`);
  for (const [k, v] of snap.sets)
    if (now.types.has(k) && !same([...v].sort(), [...(now.sets.get(k) ?? [])].sort())) wrong.push(`${k}: changed during the move`);
  if (wrong.length) throw new Error(`the single Redis changed during the move (a daemon still running?):\n  ${wrong.slice(0, 20).join("\n  ")}`);
}

export function addMoveToClusterCommand(program: Command): void {
  program
    .command("move-to-cluster")
    .description(
      'copy a deployment from one Redis (or Sentinel) into an empty Redis Cluster under the cluster\'s key names, with every microvpc daemon stopped; the single Redis is only read (docs/operations.md, "Moving to a Redis Cluster")',
    )
    .addOption(new Option("--from <url>", "the single Redis: redis://, rediss://, a Sentinel URL or a socket path").makeOptionMandatory())
    .addOption(new Option("--to <url>", "the cluster: redis-cluster://host:port,host:port (seeds)").makeOptionMandatory())
    .addOption(new Option("--from-password-file <path>", "the single Redis's password (one line)"))
    .addOption(new Option("--from-sentinel-password-file <path>", "with a Sentinel --from: the sentinels' password (one line), if they have requirepass"))
    .addOption(new Option("--to-password-file <path>", "the cluster's password (one line)"))
    .addOption(new Option("--dry-run", "print what would be written and left behind; write nothing"))
    .addOption(new Option("--ignore-clients", "go ahead although other clients are connected to the source (ones that write nothing, such as a monitor)"))
    .action(async (o: Omit<MoveOptions, "say">) => {
      try {
        await moveToCluster({ ...o, say: (l) => process.stdout.write(l + "\n") });
      } catch (err) {
        process.stderr.write(`error: ${(err as Error).message}\n`);
        process.exitCode = err instanceof MoveRefused ? 2 : 1;
      }
    });
}
