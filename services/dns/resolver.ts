// The VPC resolver: UDP and TCP DNS in the hypervisor's host namespace, one
// socket pair per VPC transit address (169.254.k.1). Each VPC namespace
// DNATs its resolver address :53 to its own transit address (gateway/plan.ts),
// so the address a query arrived on names the VPC — a VM cannot ask in
// another VPC's name — and the source address is the VM's own (anti-spoofed).
// Binding per address rather than a wildcard is what makes the arrival
// address known (Node has no IP_PKTINFO) and leaves :53 of the host's other
// addresses to whatever else runs there (systemd-resolved, a local cache).
//
// Bounds: UDP queries ≤ MAX_QUERY_BYTES, TCP messages ≤ MAX_TCP_MESSAGE_BYTES,
// a token bucket per (vpc, VM address) checked before any work (over it:
// dropped, as DNS rate limiting does), in-flight forwards per caller and in
// all, TCP connections per caller, TCP idle timeout.
import { randomInt } from "node:crypto";
import { createSocket, type Socket as UdpSocket } from "node:dgram";
import { createServer, type Server, type Socket } from "node:net";
import * as dnsPacket from "dns-packet";
import { Counter } from "prom-client";
import { metricsRegistry } from "../common/metrics.js";
import { Buckets, plainAddress, type ServerLogger } from "../common/net.js";
import { decide, formErr, MAX_QUERY_BYTES, MAX_TCP_MESSAGE_BYTES, parseForwarder, RCODE, reply, type Zone } from "./zone.js";

export interface ResolverOptions {
  port: number;
  /** Transit host address a query arrived on → that VPC's zone (undefined: none known). */
  zoneOf(localAddress: string): Zone | undefined;
  logger: ServerLogger;
  /** Sustained queries per second per VM (default 200). */
  rateLimitPerSecond?: number;
  /** Bucket size per VM (default 400). */
  burst?: number;
  /** Time to wait for each forwarder (default 1500 ms). */
  forwardTimeoutMs?: number;
  /** Forwards in flight per VM (default 64) and in all (default 4096). */
  maxInflightPerCaller?: number;
  maxInflight?: number;
  /** TCP connections per VM (default 8); idle timeout (default 10 s). */
  maxTcpPerCaller?: number;
  tcpIdleMs?: number;
}

const queries = new Counter({
  name: "microvpc_dns_queries_total",
  help: "VPC resolver queries by result (answered, forwarded, refused, servfail, dropped). Exported where the resolver runs in the gateway's own process (no --host-netns).",
  labelNames: ["result"] as const,
  registers: [metricsRegistry],
});

export interface Stats {
  answered: number;
  forwarded: number;
  refused: number;
  servfail: number;
  dropped: number;
}

/** Sends query to one upstream over UDP; resolves with its answer or null on timeout. */
function askUpstream(query: Buffer, host: string, port: number, timeoutMs: number): Promise<Buffer | null> {
  return new Promise((resolve) => {
    const sock = createSocket("udp4");
    // A fresh id and source port per query: an off-path answer must guess both.
    const id = randomInt(0, 65536);
    const out = Buffer.from(query);
    out.writeUInt16BE(id, 0);
    let done = false;
    const finish = (b: Buffer | null) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      sock.close();
      resolve(b);
    };
    const timer = setTimeout(() => finish(null), timeoutMs);
    sock.on("error", () => finish(null));
    sock.on("message", (msg, rinfo) => {
      if (rinfo.address !== host || rinfo.port !== port || msg.length < 12 || msg.readUInt16BE(0) !== id || !(msg.readUInt16BE(2) & 0x8000)) return;
      finish(msg);
    });
    sock.send(out, port, host, (err) => {
      if (err) finish(null);
    });
  });
}

export class Resolver {
  private readonly counts: Stats = { answered: 0, forwarded: 0, refused: 0, servfail: 0, dropped: 0 };
  readonly stats: Readonly<Stats> = this.counts;
  private readonly sockets = new Map<string, { udp: UdpSocket; tcp: Server }>();
  private readonly buckets: Buckets;
  private readonly inflight = new Map<string, number>();
  private inflightAll = 0;
  private readonly tcpConns = new Map<string, number>();
  private readonly conns = new Set<Socket>();
  private readonly pruneTimer: NodeJS.Timeout;

  constructor(readonly opts: ResolverOptions) {
    this.buckets = new Buckets(opts.rateLimitPerSecond ?? 200, opts.burst ?? 400);
    this.pruneTimer = setInterval(() => this.buckets.prune(), 10_000);
    this.pruneTimer.unref();
  }

  private count(k: keyof Stats): void {
    this.counts[k]++;
    queries.inc({ result: k });
  }

  /** Addresses with sockets bound. */
  bound(): string[] {
    return [...this.sockets.keys()];
  }

  /** Binds UDP and TCP on address:port. Rejects (binding nothing) if either fails. */
  async bind(address: string): Promise<void> {
    if (this.sockets.has(address)) return;
    const udp = createSocket({ type: "udp4" });
    try {
      await new Promise<void>((resolve, reject) => {
        udp.once("error", reject);
        udp.bind({ address, port: this.opts.port, exclusive: true }, () => {
          udp.off("error", reject);
          resolve();
        });
      });
    } catch (e) {
      udp.close();
      throw e;
    }
    udp.on("error", (err) => this.opts.logger.warn({ err: err.message, address }, "dns: udp socket error"));
    udp.on("message", (msg, rinfo) => void this.onUdp(udp, address, msg, rinfo.address, rinfo.port));
    const tcp = createServer((c) => this.onTcp(address, c));
    try {
      await new Promise<void>((resolve, reject) => {
        tcp.once("error", reject);
        tcp.listen({ host: address, port: this.opts.port, exclusive: true }, () => {
          tcp.off("error", reject);
          resolve();
        });
      });
    } catch (e) {
      udp.close();
      throw e;
    }
    tcp.on("error", (err) => this.opts.logger.warn({ err: err.message, address }, "dns: tcp server error"));
    this.sockets.set(address, { udp, tcp });
  }

  unbind(address: string): void {
    const s = this.sockets.get(address);
    if (!s) return;
    this.sockets.delete(address);
    s.udp.close();
    s.tcp.close();
  }

  async close(): Promise<void> {
    clearInterval(this.pruneTimer);
    for (const a of [...this.sockets.keys()]) this.unbind(a);
    for (const c of this.conns) c.destroy();
  }

  /** The answer to one query from (local, remote), or null to send nothing. */
  async handle(local: string, remote: string, msg: Buffer, maxBytes: number): Promise<Buffer | null> {
    const zone = this.opts.zoneOf(local);
    const key = `${zone?.vpcId ?? local}/${remote}`;
    if (!this.buckets.take(key)) {
      this.count("dropped");
      return null;
    }
    if (msg.length > maxBytes) {
      this.count("dropped");
      return null;
    }
    let q: dnsPacket.DecodedPacket;
    try {
      q = dnsPacket.decode(msg);
    } catch {
      return formErr(msg);
    }
    if (q.type === "response") {
      this.count("dropped");
      return null;
    }
    const d = decide(q, zone);
    if (d.kind === "answer") {
      this.count(((d.packet.flags ?? 0) & 0xf) === RCODE.REFUSED ? "refused" : "answered");
      return dnsPacket.encode(d.packet);
    }
    const n = this.inflight.get(key) ?? 0;
    if (n >= (this.opts.maxInflightPerCaller ?? 64) || this.inflightAll >= (this.opts.maxInflight ?? 4096)) {
      this.count("dropped");
      return null;
    }
    this.inflight.set(key, n + 1);
    this.inflightAll++;
    try {
      for (const f of zone!.forwarders) {
        const { host, port } = parseForwarder(f);
        const a = await askUpstream(msg, host, port, this.opts.forwardTimeoutMs ?? 1500);
        if (a) {
          a.writeUInt16BE(q.id ?? 0, 0);
          this.count("forwarded");
          return a;
        }
      }
      this.count("servfail");
      return dnsPacket.encode(reply(q, RCODE.SERVFAIL));
    } finally {
      const m = (this.inflight.get(key) ?? 1) - 1;
      if (m <= 0) this.inflight.delete(key);
      else this.inflight.set(key, m);
      this.inflightAll--;
    }
  }

  private async onUdp(udp: UdpSocket, local: string, msg: Buffer, remote: string, port: number): Promise<void> {
    try {
      const a = await this.handle(local, remote, msg, MAX_QUERY_BYTES);
      if (a && this.sockets.get(local)?.udp === udp) udp.send(a, port, remote);
    } catch (err) {
      this.opts.logger.warn({ err: (err as Error).message }, "dns: query failed");
    }
  }

  private onTcp(local: string, c: Socket): void {
    const remote = plainAddress(c.remoteAddress);
    const key = `${local}/${remote}`;
    const n = this.tcpConns.get(key) ?? 0;
    if (n >= (this.opts.maxTcpPerCaller ?? 8)) {
      c.destroy();
      return;
    }
    this.tcpConns.set(key, n + 1);
    this.conns.add(c);
    c.setTimeout(this.opts.tcpIdleMs ?? 10_000, () => c.destroy());
    c.on("error", () => undefined);
    c.on("close", () => {
      this.conns.delete(c);
      const m = (this.tcpConns.get(key) ?? 1) - 1;
      if (m <= 0) this.tcpConns.delete(key);
      else this.tcpConns.set(key, m);
    });
    let buf = Buffer.alloc(0);
    let busy = Promise.resolve();
    c.on("data", (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      while (buf.length >= 2) {
        const len = buf.readUInt16BE(0);
        if (len > MAX_TCP_MESSAGE_BYTES) {
          c.destroy();
          return;
        }
        if (buf.length < 2 + len) break;
        const msg = buf.subarray(2, 2 + len);
        buf = buf.subarray(2 + len);
        // Answers go back in order, one query at a time per connection.
        busy = busy.then(async () => {
          const a = await this.handle(local, remote, msg, MAX_TCP_MESSAGE_BYTES).catch(() => null);
          if (a && !c.destroyed) {
            const len2 = Buffer.alloc(2);
            len2.writeUInt16BE(a.length);
            c.write(Buffer.concat([len2, a]));
          }
        });
      }
      if (buf.length > MAX_TCP_MESSAGE_BYTES + 2) c.destroy();
    });
  }
}
