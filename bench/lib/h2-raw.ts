// A unary gRPC caller that speaks HTTP/2 itself over plain TCP sockets, for
// load generation only: what h2load is to bench:rpc (a client whose own cost
// is small beside the server's), for a method whose every request must
// differ, which h2load cannot send (Allocate's request ids). node:http2's
// client (h2-unary.ts) spends 50–60 µs of CPU a call on these two shared
// cores, as much as half the daemon it is measuring; this one writes a call
// as two frames from a header block encoded once, and reads frames without
// HPACK decoding.
//
// What it does not decode is the answer's headers and trailers (the server's
// HPACK dynamic table is never needed: nothing here reads a header). A call
// succeeds when its stream ends with exactly one uncompressed gRPC message:
// a gRPC server answers an error with no message (trailers only), so a
// message is a success; a stream that ends without one, is reset, or a
// connection that goes away, rejects. Callers check the message itself too
// (bench:ipam: created = true, and the used counter against the calls).
//
// Flow control: the connection's and every stream's receive window are
// opened wide at the start (and the connection's topped up), the server's
// send windows are kept (a call waits for the connection's window to carry
// its DATA frame). No deadlines, no retries, no TLS: benchmarks only.
import { connect, type Socket } from "node:net";
import { grpcMessage } from "./h2-unary.js";

const PREFACE = Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "latin1");
const DATA = 0x0;
const HEADERS = 0x1;
const RST_STREAM = 0x3;
const SETTINGS = 0x4;
const PING = 0x6;
const GOAWAY = 0x7;
const WINDOW_UPDATE = 0x8;
const END_STREAM = 0x1;
const ACK = 0x1;
const END_HEADERS = 0x4;
const PADDED = 0x8;
/** Our receive windows: every stream's (SETTINGS_INITIAL_WINDOW_SIZE) and the connection's, topped up at half. */
const RECV_WINDOW = 1 << 30;
/** RFC 9113: the connection's send window before any WINDOW_UPDATE. */
const DEFAULT_WINDOW = 65_535;

function frame(type: number, flags: number, stream: number, payload: Buffer): Buffer {
  const f = Buffer.allocUnsafe(9 + payload.length);
  f.writeUIntBE(payload.length, 0, 3);
  f[3] = type;
  f[4] = flags;
  f.writeUInt32BE(stream & 0x7fffffff, 5);
  payload.copy(f, 9);
  return f;
}

/** An HPACK string literal, no Huffman coding (RFC 7541 5.2); lengths below 127 only. */
function str(s: string): Buffer {
  const b = Buffer.from(s, "latin1");
  if (b.length >= 127) throw new Error(`h2-raw: header value too long: ${s}`);
  return Buffer.concat([Buffer.from([b.length]), b]);
}

/**
 * A gRPC request's header block (RFC 7541), using only the static table and
 * literals without indexing, so that it is the same bytes on every call and
 * leaves the server's dynamic table alone: :method POST (static 3), :scheme
 * http (static 6), :path and :authority by static name, content-type by
 * static name (31), te by literal name.
 */
export function requestHeaderBlock(path: string, authority: string): Buffer {
  return Buffer.concat([
    Buffer.from([0x83, 0x86]),
    Buffer.from([0x04]), // literal without indexing, name = static 4 (:path)
    str(path),
    Buffer.from([0x01]), // name = static 1 (:authority)
    str(authority),
    Buffer.from([0x0f, 0x10]), // name = static 31 (content-type): 15 + 16
    str("application/grpc"),
    Buffer.from([0x00]), // literal name
    str("te"),
    str("trailers"),
  ]);
}

interface Pending {
  chunks: Buffer[];
  resolve: (message: Buffer) => void;
  reject: (err: Error) => void;
}

/** One HTTP/2 connection carrying unary gRPC calls. */
export class RawH2Connection {
  private readonly calls = new Map<number, Pending>();
  private readonly blocks = new Map<string, Buffer>();
  private nextStream = 1;
  private sendWindow = DEFAULT_WINDOW;
  private received = 0;
  private out: Buffer[] = [];
  private flushing = false;
  /** Calls whose DATA the connection's send window cannot carry yet, in order. */
  private held: { stream: number; data: Buffer }[] = [];
  private inbuf: Buffer = Buffer.alloc(0);
  private failed: Error | undefined;

  private constructor(
    private readonly sock: Socket,
    private readonly authority: string,
  ) {}

  static open(address: string): Promise<RawH2Connection> {
    const i = address.lastIndexOf(":");
    const host = address.slice(0, i);
    const port = Number(address.slice(i + 1));
    return new Promise((resolve, reject) => {
      const sock = connect({ host, port, noDelay: true });
      const c = new RawH2Connection(sock, address);
      let settled = false;
      sock.once("error", (e) => {
        if (!settled) reject(e);
        c.fail(e);
      });
      sock.on("close", () => {
        const e = new Error(`h2-raw: connection to ${address} closed${settled ? "" : " before the server's SETTINGS"}`);
        if (!settled) {
          settled = true;
          reject(e);
        }
        c.fail(e);
      });
      sock.on("data", (d: Buffer) => {
        c.read(d);
        if (!settled && c.gotSettings) {
          settled = true;
          resolve(c);
        }
      });
      sock.once("connect", () => {
        const settings = Buffer.alloc(12);
        settings.writeUInt16BE(0x2, 0); // ENABLE_PUSH
        settings.writeUInt32BE(0, 2);
        settings.writeUInt16BE(0x4, 6); // INITIAL_WINDOW_SIZE
        settings.writeUInt32BE(RECV_WINDOW, 8);
        const inc = Buffer.alloc(4);
        inc.writeUInt32BE(RECV_WINDOW - DEFAULT_WINDOW, 0);
        sock.write(Buffer.concat([PREFACE, frame(SETTINGS, 0, 0, settings), frame(WINDOW_UPDATE, 0, 0, inc)]));
      });
    });
  }

  private gotSettings = false;

  /** One unary call: resolves with the answer's message (unframed). */
  call(path: string, framedRequest: Buffer): Promise<Buffer> {
    if (this.failed) return Promise.reject(this.failed);
    let block = this.blocks.get(path);
    if (!block) this.blocks.set(path, (block = requestHeaderBlock(path, this.authority)));
    const stream = this.nextStream;
    this.nextStream += 2;
    const p = new Promise<Buffer>((resolve, reject) => this.calls.set(stream, { chunks: [], resolve, reject }));
    this.write(frame(HEADERS, END_HEADERS, stream, block));
    const data = frame(DATA, END_STREAM, stream, framedRequest);
    if (this.held.length === 0 && this.sendWindow >= framedRequest.length) {
      this.sendWindow -= framedRequest.length;
      this.write(data);
    } else this.held.push({ stream, data });
    return p;
  }

  close(): void {
    this.sock.destroy();
  }

  /** Frames are gathered and written once the current callbacks and their promise continuations are done: one write a tick. */
  private write(b: Buffer): void {
    this.out.push(b);
    if (this.flushing) return;
    this.flushing = true;
    process.nextTick(() => {
      this.flushing = false;
      const out = this.out;
      this.out = [];
      if (!this.sock.destroyed) this.sock.write(out.length === 1 ? out[0] : Buffer.concat(out));
    });
  }

  private fail(e: Error): void {
    this.failed ??= e;
    for (const c of this.calls.values()) c.reject(e);
    this.calls.clear();
  }

  private read(d: Buffer): void {
    let b = this.inbuf.length ? Buffer.concat([this.inbuf, d]) : d;
    while (b.length >= 9) {
      const len = b.readUIntBE(0, 3);
      if (b.length < 9 + len) break;
      this.onFrame(b[3], b[4], b.readUInt32BE(5) & 0x7fffffff, b.subarray(9, 9 + len));
      b = b.subarray(9 + len);
    }
    this.inbuf = b.length ? Buffer.from(b) : Buffer.alloc(0);
  }

  private onFrame(type: number, flags: number, stream: number, payload: Buffer): void {
    switch (type) {
      case DATA: {
        this.received += payload.length;
        if (this.received >= RECV_WINDOW / 2) {
          const inc = Buffer.alloc(4);
          inc.writeUInt32BE(this.received, 0);
          this.received = 0;
          this.write(frame(WINDOW_UPDATE, 0, 0, inc));
        }
        const c = this.calls.get(stream);
        if (!c) return;
        const body = flags & PADDED ? payload.subarray(1, payload.length - payload[0]) : payload;
        // A copy: the socket's buffer is not ours past this callback.
        if (body.length) c.chunks.push(Buffer.from(body));
        if (flags & END_STREAM) this.end(stream, c);
        return;
      }
      case HEADERS: {
        const c = this.calls.get(stream);
        if (c && flags & END_STREAM) this.end(stream, c);
        return;
      }
      case RST_STREAM: {
        const c = this.calls.get(stream);
        if (!c) return;
        this.calls.delete(stream);
        c.reject(new Error(`h2-raw: stream ${stream} reset (HTTP/2 error ${payload.readUInt32BE(0)})`));
        return;
      }
      case SETTINGS:
        if (!(flags & ACK)) {
          this.gotSettings = true;
          this.write(frame(SETTINGS, ACK, 0, Buffer.alloc(0)));
        }
        return;
      case PING:
        if (!(flags & ACK)) this.write(frame(PING, ACK, 0, Buffer.from(payload)));
        return;
      case GOAWAY:
        this.fail(new Error(`h2-raw: GOAWAY (HTTP/2 error ${payload.readUInt32BE(4)})`));
        return;
      case WINDOW_UPDATE:
        if (stream !== 0) return;
        this.sendWindow += payload.readUInt32BE(0) & 0x7fffffff;
        while (this.held.length && this.sendWindow >= this.held[0].data.length - 9) {
          const h = this.held.shift()!;
          this.sendWindow -= h.data.length - 9;
          this.write(h.data);
        }
        return;
      default:
        return; // CONTINUATION, PRIORITY, unknown: nothing to do here
    }
  }

  private end(stream: number, c: Pending): void {
    this.calls.delete(stream);
    const body = c.chunks.length === 1 ? c.chunks[0] : Buffer.concat(c.chunks);
    if (body.length === 0) return c.reject(new Error(`h2-raw: stream ${stream} ended without a message: the call failed (a gRPC error is trailers only)`));
    const message = grpcMessage(body);
    if (!message) return c.reject(new Error(`h2-raw: stream ${stream}: not one uncompressed gRPC message (${body.length} bytes)`));
    c.resolve(message);
  }
}

/** Opens n connections to host:port. */
export function rawH2Connections(address: string, n: number): Promise<RawH2Connection[]> {
  return Promise.all(Array.from({ length: n }, () => RawH2Connection.open(address)));
}
