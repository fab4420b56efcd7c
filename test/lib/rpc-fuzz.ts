// The generic parts of the RPC fuzzer (test/integration/rpc-fuzz.test.ts):
// request generation from a method's input descriptor, the judge of one
// call's outcome, and the Redis and kernel snapshots a rejected call must
// leave unchanged. Pure where it can be, so test/unit/rpc-fuzz-checker.test.ts
// can show the checks do catch what they claim to.
import { create, type DescField, type DescMessage, ScalarType } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import fc from "fast-check";
import type { Cluster, Redis } from "ioredis";

// ---------------------------------------------------------------------------
// The judge

/** Codes a call may end with: success, or a client error that says what to change. */
export const ALLOWED_CODES: ReadonlySet<Code | "OK"> = new Set<Code | "OK">([
  "OK",
  Code.InvalidArgument,
  Code.NotFound,
  Code.AlreadyExists,
  Code.FailedPrecondition,
  Code.OutOfRange,
  Code.ResourceExhausted,
]);

export interface Outcome {
  /** "OK" or the gRPC status code. */
  code: Code | "OK";
  /** The status message (rawMessage: without connect's "[code]" prefix). */
  message: string;
}

/**
 * True if `path` ("rules[2].cidr", "veth.netns_path", "subnetId") names a
 * field of `desc`: each dotted segment, indexes dropped, is a field (proto,
 * JSON or TypeScript name) or a oneof of the message it walks into.
 */
export function fieldPathResolves(desc: DescMessage, path: string): boolean {
  const segs = path.replace(/\[[^\]]*\]/g, "").split(".");
  let cur: DescMessage | undefined = desc;
  for (const s of segs) {
    if (!cur || s === "") return false;
    const f: DescField | undefined = cur.fields.find((x) => x.name === s || x.jsonName === s || x.localName === s);
    if (f) {
      cur = f.fieldKind === "message" || (f.fieldKind === "list" && f.listKind === "message") ? f.message : undefined;
      continue;
    }
    const o = cur.oneofs.find((x) => x.name === s || x.localName === s);
    if (!o) return false;
    // "options.veth": the oneof's name, then one of its cases.
    cur = { ...cur, fields: o.fields, oneofs: [] } as DescMessage;
  }
  return true;
}

/**
 * The field an INVALID_ARGUMENT message names: the validators' messages are
 * "<field path>: <what is wrong>" (services/common/errors.ts). Undefined if
 * the message does not start with a path of the request.
 */
export function namedField(desc: DescMessage, message: string): string | undefined {
  const m = /^([A-Za-z_][A-Za-z0-9_]*(?:\[[^\]]*\])?(?:\.[A-Za-z_][A-Za-z0-9_]*(?:\[[^\]]*\])?)*): /.exec(message);
  if (!m) return undefined;
  return fieldPathResolves(desc, m[1]) ? m[1] : undefined;
}

/** What is wrong with one call's outcome (empty: nothing). */
export function judge(desc: DescMessage, o: Outcome, alsoAllowed: readonly Code[] = []): string[] {
  const problems: string[] = [];
  const name = o.code === "OK" ? "OK" : Code[o.code];
  if (!ALLOWED_CODES.has(o.code) && !alsoAllowed.includes(o.code as Code))
    problems.push(`code ${name} is not a client-error code (message: ${o.message.slice(0, 300)})`);
  if (o.code === Code.InvalidArgument && namedField(desc, o.message) === undefined) {
    problems.push(`INVALID_ARGUMENT message does not start with a field of ${desc.typeName}: ${JSON.stringify(o.message.slice(0, 300))}`);
  }
  return problems;
}

// ---------------------------------------------------------------------------
// Snapshots

export type Snapshot = Map<string, string>;

/** Keys whose values differ between two snapshots (added, removed or changed). */
export function diffSnapshots(a: Snapshot, b: Snapshot): string[] {
  const out: string[] = [];
  for (const [k, v] of a)
    if (!b.has(k)) out.push(`- ${k}`);
    else if (b.get(k) !== v) out.push(`~ ${k}`);
  for (const k of b.keys()) if (!a.has(k)) out.push(`+ ${k}`);
  return out.sort();
}

/**
 * Every key of a Redis database and its value, read by type (hash fields
 * and set members sorted, so encodings do not matter), except the keys
 * `skip` matches. On a Redis Cluster, every primary's keys: each primary is
 * scanned and read on its own connection (a SCAN through the cluster client
 * would see one node's keys only, and a pipeline through it may not span
 * slots; one node answers for any key of its own slots).
 */
export async function redisSnapshot(r: Redis, skip: (key: string) => boolean): Promise<Snapshot> {
  const parts = await Promise.all((r.isCluster ? primaries(r as unknown as Cluster) : [r]).map((n) => nodeSnapshot(n, skip)));
  const snap: Snapshot = new Map();
  for (const part of parts)
    for (const [k, v] of part) {
      if (snap.has(k)) throw new Error(`redisSnapshot: key ${k} read from two primaries`);
      snap.set(k, v);
    }
  return snap;
}

/** A Redis Cluster's primaries, checked to serve every slot between them (a client that has not learnt the slots yet would scan nothing). */
function primaries(c: Cluster): Redis[] {
  const nodes = c.nodes("master");
  const keys = new Set(nodes.map((n) => `${n.options.host}:${n.options.port}`));
  for (let slot = 0; slot < 16384; slot++) {
    const owner = c.slots[slot]?.[0];
    if (!owner || !keys.has(owner))
      throw new Error(`redisSnapshot: slot ${slot} is served by ${owner ?? "no node"}, not one of the primaries ${[...keys].join(", ")}`);
  }
  return nodes;
}

/** redisSnapshot of one server (a single Redis, or one primary of a cluster). */
async function nodeSnapshot(r: Redis, skip: (key: string) => boolean): Promise<Snapshot> {
  const keys: string[] = [];
  let cursor = "0";
  do {
    const [next, batch] = await r.scan(cursor, "COUNT", 1000);
    cursor = next;
    for (const k of batch) if (!skip(k)) keys.push(k);
  } while (cursor !== "0");
  keys.sort();
  const types = (await r.pipeline(keys.map((k) => ["type", k])).exec()) ?? [];
  const p = r.pipeline();
  const kinds: string[] = [];
  for (const [i, k] of keys.entries()) {
    const [err, t] = types[i] ?? [null, null];
    if (err) throw err;
    kinds.push(String(t));
    if (t === "string") p.getBuffer(k);
    else if (t === "hash") p.hgetall(k);
    else if (t === "set") p.smembers(k);
    else if (t === "zset") p.zrange(k, 0, -1, "WITHSCORES");
    else if (t === "list") p.lrange(k, 0, -1);
    else if (t === "stream") p.xrange(k, "-", "+");
    else p.type(k);
  }
  const vals = (await p.exec()) ?? [];
  const snap: Snapshot = new Map();
  for (const [i, k] of keys.entries()) {
    const [err, v] = vals[i] ?? [null, null];
    if (err) throw err;
    if (kinds[i] === "none") continue; // gone between SCAN and TYPE
    let s: string;
    if (Buffer.isBuffer(v)) s = v.toString("base64");
    else if (kinds[i] === "hash") s = JSON.stringify(Object.entries(v as Record<string, string>).sort());
    else if (kinds[i] === "set") s = JSON.stringify([...(v as string[])].sort());
    else s = JSON.stringify(v);
    snap.set(k, `${kinds[i]}:${s}`);
  }
  return snap;
}

/**
 * Kernel state that matters, one entry per line (so a difference shows the
 * very line): for each namespace its links, addresses, routes and nftables
 * ruleset (each part a dump, named as the caller likes), without what
 * changes by itself (packet counters, address lifetimes, set element expiry).
 */
export function kernelLines(perNs: Map<string, Record<string, string>>): Snapshot {
  const snap: Snapshot = new Map();
  const add = (key: string) => snap.set(key, String(Number(snap.get(key) ?? 0) + 1));
  for (const [ns, s] of perNs) {
    for (const [part, text] of Object.entries(s)) {
      for (let line of text.split("\n")) {
        line = line
          .replace(/packets \d+ bytes \d+/g, "packets bytes")
          .replace(/valid_lft \S+ preferred_lft \S+/g, "")
          .replace(/ expires \S+/g, "")
          .replace(/\s+/g, " ")
          .trim();
        if (line) add(`${ns} ${part}: ${line}`);
      }
    }
  }
  return snap;
}

// ---------------------------------------------------------------------------
// Requests

/** Strings a validator must refuse, or take without harm. */
export const HOSTILE_STRINGS: readonly string[] = [
  "",
  " ",
  "a".repeat(70 * 1024),
  "a\nb",
  'a"b',
  "a'b",
  "a\u0000b",
  "a\u0085b",
  "a\u202eb",
  "ünïcødé-名前-😀",
  "../../../etc/passwd",
  "/",
  "a/b",
  "A",
  "-a",
  "a".repeat(64),
  "a".repeat(256),
  "x;flush ruleset",
  "$(reboot)",
  "%s%n",
  "*",
  "0",
  "-1",
  "10.0.0.1",
  "0.0.0.0/0",
  "10.0.0.0/33",
  "999.1.1.1",
  "::1",
  "vpc-000000000000",
  "subnet-000000000000",
  "nic-000000000000",
  "sg-000000000000",
  "acl-000000000000",
  "fip-000000000000",
  "vm-000000000000",
  "pcx-000000000000",
  "02:00:00:00:00:01",
  "ff:ff:ff:ff:ff:ff",
];

const U32 = [0, 1, 2, 63, 64, 255, 256, 1000, 1001, 65535, 65536, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1];
const I32 = [0, 1, -1, 2 ** 31 - 1, -(2 ** 31)];
const U64 = [0n, 1n, 2n ** 53n, 2n ** 63n, 2n ** 64n - 1n];
const I64 = [0n, -1n, 2n ** 63n - 1n, -(2n ** 63n)];

function scalarArb(t: ScalarType): fc.Arbitrary<unknown> {
  switch (t) {
    case ScalarType.STRING:
      return fc.oneof({ weight: 4, arbitrary: fc.constantFrom(...HOSTILE_STRINGS) }, { weight: 1, arbitrary: fc.string({ unit: "binary", maxLength: 24 }) });
    case ScalarType.BYTES:
      return fc.oneof(fc.constant(new Uint8Array(0)), fc.uint8Array({ maxLength: 32 }), fc.constant(new Uint8Array(300 * 1024).fill(0x41)));
    case ScalarType.BOOL:
      return fc.boolean();
    case ScalarType.UINT32:
    case ScalarType.FIXED32:
      return fc.oneof(fc.constantFrom(...U32), fc.nat());
    case ScalarType.INT32:
    case ScalarType.SINT32:
    case ScalarType.SFIXED32:
      return fc.oneof(fc.constantFrom(...I32), fc.integer());
    case ScalarType.UINT64:
    case ScalarType.FIXED64:
      return fc.constantFrom(...U64);
    case ScalarType.INT64:
    case ScalarType.SINT64:
    case ScalarType.SFIXED64:
      return fc.constantFrom(...I64);
    case ScalarType.FLOAT:
    case ScalarType.DOUBLE:
      return fc.constantFrom(0, -1, 1e308, Number.NaN);
  }
}

function is64(t: ScalarType): boolean {
  return [ScalarType.INT64, ScalarType.UINT64, ScalarType.SINT64, ScalarType.FIXED64, ScalarType.SFIXED64].includes(t);
}

/** A "huge count" of list items: more than any limit a service sets. */
const HUGE = 5000;

/** Valid-looking values by field: what the fixture holds. Returns undefined for "no idea". */
export type BaseValues = (method: string, field: DescField, path: string) => unknown;

/**
 * Requests for one method: every field either its valid-looking base value
 * or (now and then) a random or boundary value of its kind; nested messages
 * present or missing; lists empty, short or huge; enums known or unknown
 * numbers; oneofs any case or none.
 */
export function requestArb(
  method: string,
  desc: DescMessage,
  base: BaseValues,
  weights: { base: number; wild: number } = { base: 3, wild: 2 },
  depth = 0,
  path = "",
): fc.Arbitrary<Record<string, unknown>> {
  const parts: Record<string, fc.Arbitrary<unknown>> = {};
  const oneofCases = new Map<string, fc.Arbitrary<unknown>[]>();
  for (const f of desc.fields) {
    const p = path ? `${path}.${f.name}` : f.name;
    const b = base(method, f, p);
    const wild = fieldArb(method, f, base, weights, depth, p);
    const arb = fc.oneof({ weight: weights.base, arbitrary: fc.constant(b) }, { weight: weights.wild, arbitrary: wild });
    if (f.oneof) {
      const list = oneofCases.get(f.oneof.localName) ?? [];
      list.push(arb.map((value) => (value === undefined ? undefined : { case: f.localName, value })));
      oneofCases.set(f.oneof.localName, list);
    } else {
      parts[f.localName] = arb;
    }
  }
  for (const [name, cases] of oneofCases) parts[name] = fc.oneof(fc.constant(undefined), ...cases);
  return fc.record(parts).map((r) => Object.fromEntries(Object.entries(r).filter(([, v]) => v !== undefined)));
}

/**
 * The request requestArb gives when it changes nothing: every field its
 * base value, a oneof its first case that has one. Valid-looking through
 * and through, so (unlike most random requests) it gets past the
 * validators to the store for nearly every method.
 */
export function baseRequest(method: string, desc: DescMessage, base: BaseValues): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const f of desc.fields) {
    const v = base(method, f, f.name);
    if (v === undefined) continue;
    if (!f.oneof) out[f.localName] = v;
    else out[f.oneof.localName] ??= { case: f.localName, value: v };
  }
  return out;
}

function fieldArb(method: string, f: DescField, base: BaseValues, weights: { base: number; wild: number }, depth: number, path: string): fc.Arbitrary<unknown> {
  switch (f.fieldKind) {
    case "scalar":
      return scalarArb(f.scalar);
    case "enum":
      return fc.oneof(fc.constantFrom(...f.enum.values.map((v) => v.number)), fc.constantFrom(-1, 99, 2 ** 31 - 1));
    case "message":
      if (f.message.typeName.startsWith("google.protobuf.")) return fc.constant(undefined);
      if (depth >= 3) return fc.constant(undefined);
      return fc.oneof(fc.constant(undefined), fc.constant({}), requestArb(method, f.message, base, weights, depth + 1, path));
    case "list": {
      let elem: fc.Arbitrary<unknown>;
      let filler: unknown;
      if (f.listKind === "scalar") {
        elem = scalarArb(f.scalar);
        filler =
          f.scalar === ScalarType.STRING
            ? "a"
            : f.scalar === ScalarType.BYTES
              ? new Uint8Array(1)
              : f.scalar === ScalarType.BOOL
                ? true
                : is64(f.scalar)
                  ? 1n
                  : 1;
      } else if (f.listKind === "enum") {
        elem = fc.constantFrom(...f.enum.values.map((v) => v.number), 99);
        filler = 1;
      } else {
        elem = depth >= 3 ? fc.constant({}) : requestArb(method, f.message, base, weights, depth + 1, `${path}[]`);
        filler = {};
      }
      return fc.oneof(
        { weight: 2, arbitrary: fc.constant([]) },
        { weight: 4, arbitrary: fc.array(elem, { minLength: 1, maxLength: 3 }) },
        { weight: 1, arbitrary: fc.constant(Array.from({ length: HUGE }, () => filler)) },
      );
    }
    case "map":
      return fc.constant(undefined);
  }
}

/** Builds the message (so a request the client cannot even encode shows up here, not as a fuzz finding). */
export function build(desc: DescMessage, init: Record<string, unknown>): unknown {
  return create(desc, init as never);
}

/** A request as one short line: long strings and lists cut. */
export function brief(v: unknown): string {
  return JSON.stringify(v, (_k, x: unknown) => {
    if (typeof x === "bigint") return `${x}n`;
    if (typeof x === "string" && x.length > 60) return `${x.slice(0, 20)}…(${x.length} chars)`;
    if (x instanceof Uint8Array) return `<${x.length} bytes>`;
    if (Array.isArray(x) && x.length > 5) return [...x.slice(0, 2), `…(${x.length} items)`];
    return x;
  });
}
