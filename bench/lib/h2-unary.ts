// A lean unary gRPC caller over node:http2, for load generation: the request
// is framed by hand (5-byte gRPC prefix, no compression) and the answer's
// message bytes are returned once the trailers say grpc-status 0. It does
// what h2load does for a fixed body, with a body per call, so a benchmark can
// drive a method whose every request must differ (Allocate's request ids)
// without measuring a gRPC client library's own cost. Not a client for
// anything but benchmarks: no deadlines, no retries, no metadata.
import http2 from "node:http2";

/** Opens n HTTP/2 connections to 127.0.0.1:port (plaintext, prior knowledge). */
export async function h2Sessions(address: string, n: number): Promise<http2.ClientHttp2Session[]> {
  return await Promise.all(
    Array.from(
      { length: n },
      () =>
        new Promise<http2.ClientHttp2Session>((resolve, reject) => {
          const s = http2.connect(`http://${address}`);
          s.once("connect", () => resolve(s));
          s.once("error", reject);
        }),
    ),
  );
}

/** The gRPC frame of an uncompressed message. */
export function grpcFrame(message: Uint8Array): Buffer {
  const b = Buffer.allocUnsafe(5 + message.length);
  b[0] = 0;
  b.writeUInt32BE(message.length, 1);
  b.set(message, 5);
  return b;
}

/** The message of a body that is exactly one uncompressed gRPC message (5-byte prefix), or undefined. */
export function grpcMessage(body: Buffer): Buffer | undefined {
  return body.length >= 5 && body[0] === 0 && body.readUInt32BE(1) === body.length - 5 ? body.subarray(5) : undefined;
}

/**
 * One unary call: resolves with the response message (unframed), rejects with
 * the grpc-status and grpc-message of a failure, or a transport error.
 */
export function unaryCall(session: http2.ClientHttp2Session, path: string, framedRequest: Buffer): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const req = session.request({ ":method": "POST", ":path": path, "content-type": "application/grpc", te: "trailers" });
    const chunks: Buffer[] = [];
    let status: string | undefined;
    let message = "";
    req.on("data", (d: Buffer) => chunks.push(d));
    // A failure may come as trailers-only: the status in the response headers.
    req.on("response", (h) => {
      if (h["grpc-status"] !== undefined) {
        status = String(h["grpc-status"]);
        message = String(h["grpc-message"] ?? "");
      }
    });
    req.on("trailers", (t) => {
      status = String(t["grpc-status"] ?? "");
      message = String(t["grpc-message"] ?? "");
    });
    req.on("error", reject);
    req.on("close", () => {
      if (status !== "0") return reject(new Error(`grpc-status ${status ?? "(none)"}: ${decodeURIComponent(message)}`));
      const body = chunks.length === 1 ? chunks[0] : Buffer.concat(chunks);
      const answer = grpcMessage(body);
      if (!answer) return reject(new Error(`not one uncompressed gRPC message (${body.length} bytes)`));
      resolve(answer);
    });
    req.end(framedRequest);
  });
}
