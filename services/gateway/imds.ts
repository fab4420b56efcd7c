// The instance metadata service (IMDS): an HTTP server in the hypervisor's
// host namespace that answers a VM's requests to http://169.254.169.254/
// (steered here by the data plane's DNAT) with that VM's own record, in the
// EC2 layout cloud-init expects, with IMDSv2 session tokens.
//
// Who is asking comes from the socket only: the local address is the
// host-side transit address of the VM's VPC (lookupVpc maps it to the VPC id)
// and the remote address is the VM's own address (never rewritten; the
// firewall drops spoofed sources). (vpc, address) → instance is the store's
// index. Nothing in the request — Host, X-Forwarded-For, absolute-form URLs,
// paths — takes part in choosing the record.
//
// Bounds: headers ≤ 8 KiB (431), bodies ≤ 1 KiB and discarded (413 above),
// headers within headersTimeoutMs and the whole request within
// requestTimeoutMs (408 and closed: slowloris), idle keep-alive closed after
// keepAliveTimeoutMs, a per-caller token bucket (429) checked before any
// Redis work, and a cap on concurrent connections per caller (extra
// connections are closed at once). The limits are per (vpc, address), so one
// VM flooding does not starve the others.
import { createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { Socket } from "node:net";
import { ImdsHttpEndpoint, ImdsHttpTokens, type InstanceMetadata } from "../../gen/microvpc/v1/gateway_pb.js";
import { Counter } from "prom-client";
import { metricsRegistry } from "../common/metrics.js";
import { Buckets, plainAddress, type ServerLogger as ImdsLogger } from "../common/net.js";
import { callerKey, type MetadataStore } from "./metadata-store.js";

export type { ServerLogger as ImdsLogger } from "../common/net.js";

export interface ImdsServerOptions {
  /** Host-side transit address a request arrived on → VPC id; undefined: not a VPC's address. */
  lookupVpc(localAddress: string): string | undefined;
  store: MetadataStore;
  /** The floating IP of a NIC at request time, for records whose public_ipv4 is empty. */
  publicIpOf?(vpcId: string, address: string): Promise<string | undefined>;
  /** Sustained requests per second per caller (default 50). */
  rateLimitPerSecond?: number;
  /** Bucket size per caller (default 100). */
  burst?: number;
  /** Concurrent connections per caller (default 16); more are closed on accept. */
  maxConnectionsPerCaller?: number;
  /** Concurrent connections in all (default 4096). */
  maxConnections?: number;
  /** Time to receive the request headers (default 3000 ms). */
  headersTimeoutMs?: number;
  /** Time to receive the whole request (default 5000 ms). */
  requestTimeoutMs?: number;
  /** Idle time between requests on a kept-alive connection (default 5000 ms). */
  keepAliveTimeoutMs?: number;
  /** Served when a record's placement leaves them empty. */
  defaultAvailabilityZone?: string;
  defaultRegion?: string;
  logger: ImdsLogger;
}

export interface ImdsServer {
  /** Not listening yet: call server.listen(port) (every address) yourself. */
  server: Server;
  /** Stops accepting, closes every connection, stops the timers. */
  close(): Promise<void>;
}

export const MAX_HEADER_BYTES = 8192;
export const MAX_BODY_BYTES = 1024;
export const MIN_TOKEN_TTL_S = 1;
export const MAX_TOKEN_TTL_S = 21600;
const TOKEN_TTL_HEADER = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER = "x-aws-ec2-metadata-token";

/** Metadata versions EC2 lists at "/"; every one serves the same (latest) layout. */
export const API_VERSIONS = [
  "1.0",
  "2007-01-19",
  "2007-03-01",
  "2007-08-29",
  "2007-10-10",
  "2007-12-15",
  "2008-02-01",
  "2008-09-01",
  "2009-04-04",
  "2011-01-01",
  "2011-05-01",
  "2012-01-12",
  "2014-02-25",
  "2014-11-05",
  "2015-10-20",
  "2016-04-19",
  "2016-06-30",
  "2016-09-02",
  "2018-03-28",
  "2018-08-17",
  "2018-09-24",
  "2019-10-01",
  "2020-10-27",
  "2021-01-03",
  "2021-03-23",
  "2021-07-15",
  "2022-09-24",
  "latest",
];
const VERSION_SET = new Set(API_VERSIONS);

export { plainAddress } from "../common/net.js";

// ---- the EC2 tree ----

/** A leaf (text or bytes) or a directory. */
type Node = string | Uint8Array | Dir;
interface Dir {
  /** Children in listing order. */
  entries: Map<string, Node>;
  /** List child directories with a trailing "/" (everything under meta-data/, as EC2). */
  slash: boolean;
  /** Listing lines instead of the entry names (public-keys/: "0=name"). */
  lines?: string[];
}

function dir(entries: [string, Node | undefined][], slash = true, lines?: string[]): Dir {
  const m = new Map<string, Node>();
  for (const [k, v] of entries) if (v !== undefined) m.set(k, v);
  return { entries: m, slash, lines };
}

function isDir(n: Node): n is Dir {
  return typeof n === "object" && !(n instanceof Uint8Array);
}

function listing(d: Dir): string {
  if (d.lines) return d.lines.join("\n");
  return [...d.entries].map(([k, v]) => (d.slash && isDir(v) ? `${k}/` : k)).join("\n");
}

interface Defaults {
  zone: string;
  region: string;
}

/** The tree under /<version>/ for one record (public IP resolved by the caller). */
export function metadataTree(md: InstanceMetadata, publicIp: string | undefined, d: Defaults): Dir {
  const zone = md.placement?.availabilityZone || d.zone;
  const region = md.placement?.region || d.region;
  const joinOrUndef = (xs: string[]) => (xs.length ? xs.join("\n") : undefined);
  const keys = md.publicKeys;
  const publicKeys = keys.length
    ? dir(
        keys.map((k, i) => [String(i), dir([["openssh-key", k.opensshKey]])]),
        true,
        keys.map((k, i) => `${i}=${k.name || `key-${i}`}`),
      )
    : undefined;
  const tags = md.tags.length ? dir([["instance", dir(md.tags.map((t) => [t.key, t.value]))]]) : undefined;
  const macDir = dir([
    ["device-number", "0"],
    ["local-ipv4s", md.localIpv4],
    ["mac", md.mac],
    ["public-ipv4s", publicIp],
    ["security-group-ids", joinOrUndef(md.securityGroupIds)],
    ["security-groups", joinOrUndef(md.securityGroupNames)],
    ["subnet-id", md.subnetId || undefined],
    ["vpc-id", md.vpcId],
  ]);
  const metaData = dir([
    ["hostname", md.hostname],
    ["instance-id", md.instanceId],
    ["instance-type", md.instanceType || undefined],
    ["local-hostname", md.hostname],
    ["local-ipv4", md.localIpv4],
    ["mac", md.mac],
    ["network", dir([["interfaces", dir([["macs", dir([[md.mac, macDir]])]])]])],
    [
      "placement",
      dir([
        ["availability-zone", zone],
        ["region", region],
      ]),
    ],
    ["public-ipv4", publicIp],
    ["public-keys", publicKeys],
    ["security-groups", joinOrUndef(md.securityGroupNames)],
    ["tags", tags],
  ]);
  const identity: Record<string, unknown> = {
    availabilityZone: zone,
    instanceId: md.instanceId,
    instanceType: md.instanceType || undefined,
    privateIp: md.localIpv4,
    region,
    version: "2017-09-30",
  };
  const dynamic = dir([["instance-identity", dir([["document", JSON.stringify(identity, null, 2)]])]]);
  return dir(
    [
      ["dynamic", dynamic],
      ["meta-data", metaData],
      ["user-data", md.userData.length ? md.userData : undefined],
    ],
    false,
  );
}

/**
 * Splits a request target into path segments. Absolute-form targets
 * ("http://other-host/latest/…") are reduced to their path: the authority is
 * as meaningless as Host. Returns null for targets that cannot name anything
 * (empty segments, "*").
 */
export function parseTarget(url: string | undefined): { segs: string[]; trailingSlash: boolean } | null {
  let p = url ?? "/";
  if (!p.startsWith("/")) {
    const m = /^[a-z][a-z0-9+.-]*:\/\/[^/?#]*(.*)$/i.exec(p);
    if (!m) return null;
    p = m[1] || "/";
    if (!p.startsWith("/")) p = `/${p}`;
  }
  p = p.replace(/[?#].*$/s, "");
  if (p === "/") return { segs: [], trailingSlash: true };
  const trailingSlash = p.endsWith("/");
  const segs = p.slice(1, trailingSlash ? -1 : undefined).split("/");
  if (segs.some((s) => s === "")) return null;
  return { segs, trailingSlash };
}

// ---- tokens ----

// A token is base64url(version 1 | expiry ms (8) | nonce (12) | mac (16)),
// mac = HMAC-SHA256(per-process secret, vpc, address, instance, expiry,
// nonce) cut to 16 bytes. Another VM's token fails the MAC (it names another
// vpc/address/instance); the nonce must also be live in the store, which is
// what DeleteInstanceMetadata revokes. A restart changes the secret, and
// cloud-init and the SDKs fetch a new token on 401.
const TOKEN_BYTES = 1 + 8 + 12 + 16;

class TokenMinter {
  private readonly secret = randomBytes(32);

  private mac(vpc: string, addr: string, inst: string, exp: bigint, nonce: Buffer): Buffer {
    return createHmac("sha256", this.secret)
      .update(`v1\n${vpc}\n${addr}\n${inst}\n${exp}\n${nonce.toString("hex")}`)
      .digest()
      .subarray(0, 16);
  }

  mint(vpc: string, addr: string, inst: string, expMs: number): { token: string; nonce: string } {
    const nonce = randomBytes(12);
    const exp = BigInt(expMs);
    const b = Buffer.alloc(TOKEN_BYTES);
    b[0] = 1;
    b.writeBigUInt64BE(exp, 1);
    nonce.copy(b, 9);
    this.mac(vpc, addr, inst, exp, nonce).copy(b, 21);
    return { token: b.toString("base64url"), nonce: nonce.toString("hex") };
  }

  /** The nonce and expiry of a well-formed token, before its MAC is checked. */
  parse(token: string): { nonce: string; expMs: number; raw: Buffer } | null {
    if (token.length !== Math.ceil((TOKEN_BYTES * 4) / 3) || !/^[A-Za-z0-9_-]+$/.test(token)) return null;
    const b = Buffer.from(token, "base64url");
    // Only the canonical spelling: base64 leaves spare bits in the last
    // character, and a token must not have several valid spellings.
    if (b.length !== TOKEN_BYTES || b[0] !== 1 || b.toString("base64url") !== token) return null;
    return { nonce: b.subarray(9, 21).toString("hex"), expMs: Number(b.readBigUInt64BE(1)), raw: b };
  }

  verify(raw: Buffer, vpc: string, addr: string, inst: string): boolean {
    const want = this.mac(vpc, addr, inst, raw.readBigUInt64BE(1), raw.subarray(9, 21));
    return timingSafeEqual(want, raw.subarray(21));
  }
}

// ---- per-caller limits ----

export { Buckets } from "../common/net.js";

interface Caller {
  /** undefined: the local address is no VPC's transit address. */
  vpcId?: string;
  address: string;
  key: string;
}

// ---- replies ----

/** One whole response, as EC2's metadata server sends it (HEAD: headers only). */
function reply(req: IncomingMessage, res: ServerResponse, status: number, body: string | Uint8Array, headers: Record<string, string | number> = {}): void {
  const buf = typeof body === "string" ? Buffer.from(body) : body;
  res.statusCode = status;
  res.setHeader("Server", "EC2ws");
  res.setHeader("Content-Type", "text/plain");
  for (const [k, v] of Object.entries(headers)) res.setHeader(k, v);
  res.setHeader("Content-Length", buf.length);
  if (req.method === "HEAD") res.end();
  else res.end(buf);
}

const statusText: Record<number, string> = {
  400: "Bad Request",
  401: "Unauthorized",
  403: "Forbidden",
  404: "Not Found",
  405: "Method Not Allowed",
  413: "Payload Too Large",
  429: "Too Many Requests",
  503: "Service Unavailable",
};
/** An error status with its reason phrase as the body. */
const refuse = (req: IncomingMessage, res: ServerResponse, status: number, headers: Record<string, string | number> = {}) =>
  reply(req, res, status, statusText[status] ?? String(status), headers);

/** A caller whose local address is a VPC's transit address. */
type KnownCaller = Caller & { vpcId: string };

/**
 * PUT /latest/api/token: a session token for this caller and instance, its
 * nonce recorded in the state store (so deleting the instance revokes it).
 */
async function putToken(
  req: IncomingMessage,
  res: ServerResponse,
  caller: KnownCaller,
  instanceId: string,
  minter: TokenMinter,
  store: ImdsServerOptions["store"],
  log: ImdsLogger,
): Promise<void> {
  if (req.method !== "PUT") {
    refuse(req, res, 405, { Allow: "PUT" });
    return;
  }
  // A proxy inside the guest adds X-Forwarded-For (or Forwarded): it must
  // not mint tokens for what it relays.
  if (req.headers["x-forwarded-for"] !== undefined || req.headers["forwarded"] !== undefined) {
    refuse(req, res, 403);
    return;
  }
  const ttlText = req.headers[TOKEN_TTL_HEADER];
  const ttl = typeof ttlText === "string" && /^[0-9]{1,6}$/.test(ttlText.trim()) ? Number(ttlText.trim()) : NaN;
  if (!(ttl >= MIN_TOKEN_TTL_S && ttl <= MAX_TOKEN_TTL_S)) {
    refuse(req, res, 400);
    return;
  }
  const expMs = Date.now() + ttl * 1000;
  const { token, nonce } = minter.mint(caller.vpcId, caller.address, instanceId, expMs);
  let ok: boolean;
  try {
    ok = await store.recordToken(instanceId, caller.vpcId, caller.address, nonce, expMs);
  } catch (err) {
    log.warn({ err: (err as Error).message, caller: caller.key }, "imds: cannot record a token");
    refuse(req, res, 503, { "Retry-After": 1 });
    return;
  }
  if (!ok) {
    refuse(req, res, 404);
    return;
  }
  reply(req, res, 200, token, { [TOKEN_TTL_HEADER]: ttl });
  return;
}

/**
 * Every request but the token PUT is a read: a presented token must be
 * valid whatever the mode, and REQUIRED refuses reads without one; then the
 * path in the instance's metadata tree.
 */
async function serveRead(
  req: IncomingMessage,
  res: ServerResponse,
  caller: KnownCaller,
  md: InstanceMetadata,
  /** The instance the caller's address resolved to, and whether the presented token's nonce is live for it. */
  instanceId: string,
  tokenLive: boolean,
  target: ReturnType<typeof parseTarget>,
  presented: string | undefined,
  parsed: ReturnType<TokenMinter["parse"]>,
  ctx: { minter: TokenMinter; defaults: Defaults; publicIpOf: ImdsServerOptions["publicIpOf"]; log: ImdsLogger },
): Promise<void> {
  // Every other request is a read. A presented token must be valid whatever
  // the mode; REQUIRED refuses reads without one.
  let ttlLeft: number | undefined;
  if (presented !== undefined) {
    const good = parsed !== null && tokenLive && parsed.expMs > Date.now() && ctx.minter.verify(parsed.raw, caller.vpcId, caller.address, instanceId);
    if (!good) {
      refuse(req, res, 401);
      return;
    }
    ttlLeft = Math.max(0, Math.floor((parsed!.expMs - Date.now()) / 1000));
  } else if (md.options?.httpTokens === ImdsHttpTokens.REQUIRED) {
    refuse(req, res, 401);
    return;
  }
  const extra: Record<string, string | number> = ttlLeft === undefined ? {} : { [TOKEN_TTL_HEADER]: ttlLeft };

  if (!target) {
    refuse(req, res, 404);
    return;
  }
  if (req.method !== "GET" && req.method !== "HEAD") {
    // Known or not, no path but the token one takes anything but a read.
    refuse(req, res, 405, { Allow: "GET, HEAD" });
    return;
  }
  if (target.segs.length === 0) {
    reply(req, res, 200, API_VERSIONS.join("\n"), extra);
    return;
  }
  if (!VERSION_SET.has(target.segs[0])) {
    refuse(req, res, 404);
    return;
  }
  // Only meta-data/ shows a public address; ask the data plane only then.
  let publicIp = md.publicIpv4 || undefined;
  if (!publicIp && ctx.publicIpOf && target.segs[1] === "meta-data") {
    try {
      publicIp = await ctx.publicIpOf(caller.vpcId, caller.address);
    } catch (err) {
      ctx.log.warn({ err: (err as Error).message, caller: caller.key }, "imds: publicIpOf failed; serving no public-ipv4");
    }
  }
  let node: Node | undefined = metadataTree(md, publicIp, ctx.defaults);
  for (const s of target.segs.slice(1)) {
    node = node && isDir(node) ? node.entries.get(s) : undefined;
    if (node === undefined) break;
  }
  if (node === undefined) {
    refuse(req, res, 404);
    return;
  }
  if (isDir(node)) {
    // A directory lists itself with or without the trailing slash.
    reply(req, res, 200, listing(node), extra);
    return;
  }
  // A leaf with a trailing slash names a directory that does not exist.
  if (target.trailingSlash) {
    refuse(req, res, 404);
    return;
  }
  if (node instanceof Uint8Array) reply(req, res, 200, node, { ...extra, "Content-Type": "application/octet-stream" });
  else reply(req, res, 200, node, extra);
}

// ---- throttling, counted ----

/** Why a request or connection was refused for its caller's rate. */
export type ThrottleReason = "rate" | "connections";

export const imdsThrottled = new Counter({
  name: "microvpc_imds_throttled_requests_total",
  help: "Metadata requests refused by the per-caller limits: rate (429, token bucket) or connections (a caller's connection past its cap, closed at accept).",
  labelNames: ["reason"] as const,
  registers: [metricsRegistry],
});
imdsThrottled.inc({ reason: "rate" }, 0);
imdsThrottled.inc({ reason: "connections" }, 0);

/** Totals of this process since it started (the metadata child reports them to the gateway). */
export const throttleTotals: Record<ThrottleReason, number> = { rate: 0, connections: 0 };

function throttled(reason: ThrottleReason): void {
  throttleTotals[reason]++;
  imdsThrottled.inc({ reason });
}

/** The message of the metadata child's throttle line (its totals, when they changed). */
export const THROTTLE_TOTALS_MSG = "imds throttle totals";

/**
 * The gateway's side: one of its metadata child's log lines. If it is the
 * throttle-totals line, what grew since the child's previous line is added to
 * this process's counter; `last` holds the child's previous totals (a new
 * child starts from zero: pass a fresh object). Returns whether it was one.
 */
export function reportChildThrottle(line: string, last: Record<ThrottleReason, number>): boolean {
  if (!line.includes(THROTTLE_TOTALS_MSG)) return false;
  let o: Record<string, unknown>;
  try {
    o = JSON.parse(line) as Record<string, unknown>;
  } catch {
    return false;
  }
  if (o === null || typeof o !== "object" || o.msg !== THROTTLE_TOTALS_MSG) return false;
  for (const reason of ["rate", "connections"] as const) {
    const v = o[reason];
    // The child's own output, still checked: a count, never going back.
    if (typeof v !== "number" || !Number.isSafeInteger(v) || v < last[reason]) continue;
    if (v > last[reason]) imdsThrottled.inc({ reason }, v - last[reason]);
    last[reason] = v;
  }
  return true;
}

// ---- the server ----

export function createImdsServer(opts: ImdsServerOptions): ImdsServer {
  const log = opts.logger;
  const store = opts.store;
  const requestTimeout = opts.requestTimeoutMs ?? 5000;
  const headersTimeout = Math.min(opts.headersTimeoutMs ?? 3000, requestTimeout);
  const buckets = new Buckets(opts.rateLimitPerSecond ?? 50, opts.burst ?? 100);
  const maxPerCaller = opts.maxConnectionsPerCaller ?? 16;
  const defaults: Defaults = { zone: opts.defaultAvailabilityZone ?? "microvpc-1a", region: opts.defaultRegion ?? "microvpc-1" };
  const minter = new TokenMinter();
  const callers = new WeakMap<Socket, Caller>();
  const connections = new Map<string, number>();
  /** Decoded records by caller key, with the rev they were read at. */
  const cache = new Map<string, { rev: string; md: InstanceMetadata }>();

  const server = createServer(
    {
      maxHeaderSize: MAX_HEADER_BYTES,
      requestTimeout,
      headersTimeout,
      keepAliveTimeout: opts.keepAliveTimeoutMs ?? 5000,
      // How often Node checks the two timeouts above (its default is 30 s).
      connectionsCheckingInterval: Math.max(100, Math.min(1000, Math.floor(headersTimeout / 4))),
      // A guest may leave Host out; it means nothing here anyway.
      requireHostHeader: false,
    },
    (req, res) => {
      handle(req, res).catch((err) => {
        log.error({ err: (err as Error).message }, "imds: request failed");
        if (!res.headersSent) reply(req, res, 500, "Internal Server Error");
        else res.destroy();
      });
    },
  );
  server.maxConnections = opts.maxConnections ?? 4096;
  server.maxHeadersCount = 100;
  // A guest that stops reading its responses holds a socket; cut it.
  server.setTimeout(Math.max(10_000, requestTimeout * 2));

  function identify(sock: Socket): Caller {
    let c = callers.get(sock);
    if (c) return c;
    const address = plainAddress(sock.remoteAddress);
    const local = plainAddress(sock.localAddress);
    let vpcId: string | undefined;
    try {
      vpcId = local ? opts.lookupVpc(local) : undefined;
    } catch (err) {
      log.warn({ err: (err as Error).message, local }, "imds: lookupVpc failed; treating the caller as unknown");
    }
    c = { vpcId, address, key: callerKey(vpcId ?? "-", address) };
    callers.set(sock, c);
    return c;
  }

  server.on("connection", (sock: Socket) => {
    const c = identify(sock);
    const n = (connections.get(c.key) ?? 0) + 1;
    connections.set(c.key, n);
    sock.once("close", () => {
      const left = (connections.get(c.key) ?? 1) - 1;
      if (left <= 0) connections.delete(c.key);
      else connections.set(c.key, left);
    });
    if (n > maxPerCaller) {
      throttled("connections");
      log.debug({ caller: c.key, connections: n }, "imds: too many connections from one caller; closing the new one");
      sock.destroy();
    }
  });

  const pruner = setInterval(() => {
    buckets.prune();
    if (cache.size > 10_000) cache.clear();
  }, 10_000);
  pruner.unref();

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    // Bodies mean nothing to IMDS: small ones are drained, large or chunked
    // ones refused and the connection closed rather than read.
    const len = Number(req.headers["content-length"] ?? 0);
    if (req.headers["transfer-encoding"] !== undefined || !(len <= MAX_BODY_BYTES)) {
      refuse(req, res, 413, { Connection: "close" });
      req.socket.destroySoon();
      return;
    }
    req.resume();

    const caller = identify(req.socket);
    if (!buckets.take(caller.key)) {
      throttled("rate");
      refuse(req, res, 429, { "Retry-After": 1 });
      return;
    }
    // Unknown callers get 404 for everything: the answer a missing path gets,
    // so it tells a prober nothing (not whether the address belongs to
    // anyone, nor that another VPC has it), and it is an honest "nothing
    // here for you" rather than 403 (which cloud-init reads as "IMDS
    // disabled") or 401 (which invites a token). It covers requests that did
    // not come from a VPC (lookupVpc: undefined) and VM addresses the vmm has
    // not written a record for yet, or has deleted. The vmm must therefore
    // write the record before it boots the VM: cloud-init treats a 4xx on
    // the token PUT as final.
    if (!caller.vpcId) {
      refuse(req, res, 404);
      return;
    }
    const target = parseTarget(req.url);
    const isTokenPath =
      !!target && target.segs.length === 3 && target.segs[0] === "latest" && target.segs[1] === "api" && target.segs[2] === "token" && !target.trailingSlash;

    const tokenHeader = req.headers[TOKEN_HEADER];
    const presented = typeof tokenHeader === "string" ? tokenHeader : undefined;
    const parsed = presented !== undefined && !isTokenPath ? minter.parse(presented) : null;

    let state;
    const cached = cache.get(caller.key);
    try {
      state = await store.resolveCaller(caller.vpcId, caller.address, cached?.rev ?? "", parsed?.nonce ?? "");
      if (state && !state.metadata && state.rev !== cached?.rev) {
        state = await store.resolveCaller(caller.vpcId, caller.address, "", parsed?.nonce ?? "");
      }
    } catch (err) {
      log.warn({ err: (err as Error).message, caller: caller.key }, "imds: state store unavailable");
      refuse(req, res, 503, { "Retry-After": 1 });
      return;
    }
    if (!state) {
      cache.delete(caller.key);
      refuse(req, res, 404);
      return;
    }
    let md: InstanceMetadata;
    if (state.metadata) {
      md = state.metadata;
      cache.set(caller.key, { rev: state.rev, md });
    } else md = cached!.md;

    // Disabled: 403 Forbidden to every request (token PUT included), as EC2
    // does, rather than a destroyed socket. cloud-init reads a 403 as "IMDS
    // endpoint is disabled" and stops at once; a reset connection is to it a
    // transient error it retries until max_wait (120 s by default), which
    // would slow every boot. No data is served either way. (gateway.proto
    // says "connections are refused"; this is the refusal a guest can
    // understand.)
    if (md.options?.httpEndpoint === ImdsHttpEndpoint.DISABLED) {
      refuse(req, res, 403);
      return;
    }

    if (isTokenPath) {
      await putToken(req, res, caller as KnownCaller, state.instanceId, minter, store, log);
      return;
    }

    await serveRead(req, res, caller as KnownCaller, md, state.instanceId, state.token === "live", target, presented, parsed, {
      minter,
      defaults,
      publicIpOf: opts.publicIpOf,
      log,
    });
  }

  async function close(): Promise<void> {
    clearInterval(pruner);
    await new Promise<void>((resolve) => {
      if (!server.listening) return resolve();
      server.close(() => resolve());
      server.closeAllConnections();
    });
  }

  return { server, close };
}
