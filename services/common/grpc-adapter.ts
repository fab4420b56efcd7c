// protobuf-es services on @grpc/grpc-js, both ways.
//
// Server: a DescService (gen/*_pb.ts) and a connect-style implementation
// (`(req, ctx) => Promise<res>`, async generators for streams, ConnectError
// for failures) become a grpc-js ServiceDefinition and its handlers, so the
// services keep their code and types while grpc-js does the HTTP/2 (issue 14:
// connect-node served 3–5k unary calls/s where grpc-js serves 10–26k).
// Messages are (de)serialized with toBinary/fromBinary; every thrown value
// goes through toConnectError (errors.ts), and its code, message, metadata
// and details (grpc-status-details-bin) reach the client as connect would
// have sent them.
//
// Client: a connect Transport over a grpc-js Client, so createClient(desc,
// transport) gives the usual typed client (Client<typeof Service>) while the
// calls go through grpc-js.
import {
  create,
  fromBinary,
  toBinary,
  type DescMessage,
  type DescMethod,
  type DescService,
  type MessageInitShape,
  type MessageShape,
} from "@bufbuild/protobuf";
import {
  Code,
  ConnectError,
  createContextValues,
  type ContextValues,
  type HandlerContext,
  type ServiceImpl,
  type StreamResponse,
  type Transport,
  type UnaryResponse,
} from "@connectrpc/connect";
import { findTrailerError, setTrailerStatus } from "@connectrpc/connect/protocol-grpc";
import * as grpc from "@grpc/grpc-js";
import { toConnectError } from "./errors.js";

/** A service and its implementation; made by route(), which checks the implementation's type. */
export interface ServiceBinding {
  readonly desc: DescService;
  readonly impl: object;
}

/** Binds a service to its whole implementation: a missing RPC is a type error. */
export function route<S extends DescService>(desc: S, impl: ServiceImpl<S>): ServiceBinding {
  return { desc, impl };
}

type ServerCall = grpc.ServerUnaryCall<unknown, unknown> | grpc.ServerReadableStream<unknown, unknown> | grpc.ServerWritableStream<unknown, unknown>;

/**
 * Runs around every call: called before the handler with its context (it may
 * set response headers, or throw to refuse the call), and returns what is
 * called once when the call ends, with the error it ended with, if any.
 */
export type CallObserver = (ctx: CallContext) => (err: ConnectError | undefined) => void;

/** Runs the handler inside the call's scope (tracing.ts's ServerCall). */
interface CallScopeRunner {
  run<T>(fn: () => T): T;
}

const cancelledError = () => new ConnectError("the client cancelled the call", Code.Canceled);

/**
 * A connect HandlerContext over a grpc-js call, built lazily: the headers,
 * the AbortSignal and the context values cost nothing until a handler reads
 * them (most unary handlers read none), which is most of what a call costs
 * here besides grpc-js itself. header()/addResponseHeader() are the cheap
 * ways for the observer.
 */
export class CallContext implements HandlerContext {
  readonly requestMethod = "POST";
  readonly protocolName = "grpc";
  private ac?: AbortController;
  private reqHeader?: Headers;
  private resHeader?: Headers;
  private resTrailer?: Headers;
  private ctxValues?: ContextValues;
  private extra?: ResponseMetadata;
  /** Set by the observer: runs the handler (inside the call's request-id and trace scope, tracing.ts). */
  scope?: CallScopeRunner;
  /** Listens for the client's cancel once the signal exists (grpc-js keeps call.cancelled itself). */
  private onCancel?: () => void;

  constructor(
    readonly service: DescService,
    readonly method: DescMethod,
    readonly url: string,
    private readonly call: ServerCall,
  ) {}

  /** The first value of a request header (metadata), without building Headers. */
  header(name: string): string | undefined {
    const v = this.call.metadata.get(name)[0];
    return v === undefined ? undefined : Buffer.isBuffer(v) ? v.toString("base64") : v;
  }

  /**
   * Adds a response header without building Headers. The name must be a
   * lower-case gRPC metadata key and the value printable ASCII: both are
   * passed on unchecked (the observer's build and request id are made so).
   */
  addResponseHeader(name: string, value: string): void {
    (this.extra ??= new ResponseMetadata()).addChecked(name, value);
  }

  get signal(): AbortSignal {
    if (!this.ac) {
      const ac = (this.ac = new AbortController());
      if (this.call.cancelled) ac.abort(cancelledError());
      else {
        this.onCancel = () => ac.abort(cancelledError());
        (this.call as unknown as NodeJS.EventEmitter).once("cancelled", this.onCancel);
      }
    }
    return this.ac.signal;
  }
  get requestHeader(): Headers {
    return (this.reqHeader ??= metadataToHeaders(this.call.metadata));
  }
  get responseHeader(): Headers {
    return (this.resHeader ??= new Headers());
  }
  get responseTrailer(): Headers {
    return (this.resTrailer ??= new Headers());
  }
  get values(): ContextValues {
    return (this.ctxValues ??= createContextValues());
  }
  timeoutMs(): number | undefined {
    const d = this.call.getDeadline();
    const at = d instanceof Date ? d.getTime() : d;
    return Number.isFinite(at) ? Math.max(0, at - Date.now()) : undefined;
  }

  responseMetadata(): grpc.Metadata {
    if (!this.resHeader) return this.extra ?? new grpc.Metadata();
    const md = headersToMetadata(this.resHeader);
    if (this.extra) md.merge(this.extra);
    return md;
  }
  /** The trailers a handler set, if any (grpc-js sends none of its own then). */
  trailerMetadata(): grpc.Metadata | undefined {
    return this.resTrailer ? headersToMetadata(this.resTrailer) : undefined;
  }

  /** The call is over: stop listening, and abort the signal if anyone holds it (a stream handler still waiting). */
  finish(): void {
    if (this.onCancel) (this.call as unknown as NodeJS.EventEmitter).removeListener("cancelled", this.onCancel);
    if (this.ac && !this.ac.signal.aborted) this.ac.abort(CALL_OVER);
  }
}

const CALL_OVER = new ConnectError("the call is over", Code.Canceled);

/**
 * Metadata whose entries are added without grpc-js's per-value check (two
 * regular expressions per add(), a few per cent of a unary call's CPU): for
 * names and values that are legal by construction (addResponseHeader).
 */
class ResponseMetadata extends grpc.Metadata {
  addChecked(key: string, value: string): void {
    const vs = this.internalRepr.get(key);
    if (vs) vs.push(value);
    else this.internalRepr.set(key, [value]);
  }
}

const HEADER_SKIP = new Set(["content-type", "te", "user-agent", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding", "grpc-status", "grpc-message"]);

function metadataToHeaders(md: grpc.Metadata | undefined, into = new Headers()): Headers {
  if (!md) return into;
  for (const [k, vs] of Object.entries(md.getMap())) {
    into.append(k, Buffer.isBuffer(vs) ? vs.toString("base64") : String(vs));
  }
  // getMap keeps the first value of a key; the rest.
  for (const k of Object.keys(md.getMap())) {
    const all = md.get(k);
    for (let i = 1; i < all.length; i++) into.append(k, Buffer.isBuffer(all[i]) ? (all[i] as Buffer).toString("base64") : String(all[i]));
  }
  return into;
}

function headersToMetadata(h: Headers, md = new grpc.Metadata()): grpc.Metadata {
  h.forEach((v, k) => {
    if (HEADER_SKIP.has(k) || k.startsWith(":")) return;
    if (k.endsWith("-bin")) for (const part of v.split(/,\s*/)) md.add(k, Buffer.from(part, "base64"));
    else md.add(k, v);
  });
  return md;
}

const bytes = (u: Uint8Array): Buffer => Buffer.from(u.buffer, u.byteOffset, u.byteLength);

/** The bytes of the messages made by constantMessage(). grpc-js copies them into each frame, never changes them. */
const constantBytes = new WeakMap<object, Buffer>();

/**
 * A message that never changes (health's SERVING and NOT_SERVING answers),
 * frozen, and serialized once: a handler that returns it costs no
 * protobuf encoding per call.
 */
export function constantMessage<D extends DescMessage>(schema: D, init: MessageInitShape<D>): MessageShape<D> {
  const m = create(schema, init);
  constantBytes.set(m, bytes(toBinary(schema, m)));
  Object.freeze(m);
  return m;
}

const serializer = (schema: DescMessage) => (m: object) => constantBytes.get(m) ?? bytes(toBinary(schema, create(schema, m as never)));
const deserializer = (schema: DescMessage) => (b: Buffer) => fromBinary(schema, b);

/** The grpc-js status of an error: same code and message, metadata and details in the trailers. */
function toStatus(err: ConnectError, trailer: Headers): grpc.ServerErrorResponse {
  const t = setTrailerStatus(new Headers(trailer), err);
  const md = headersToMetadata(t);
  return Object.assign(new Error(err.rawMessage), { code: err.code as number, details: err.rawMessage, metadata: md });
}

function pathOf(service: DescService, method: DescMethod): string {
  return `/${service.typeName}/${method.name}`;
}

/** The grpc-js definition and handlers of one service. */
export function grpcService(
  binding: ServiceBinding,
  observe: CallObserver,
): { definition: grpc.ServiceDefinition; handlers: grpc.UntypedServiceImplementation } {
  const definition: Record<string, grpc.MethodDefinition<object, object>> = {};
  const handlers: grpc.UntypedServiceImplementation = {};
  const service = binding.desc;
  const impl = binding.impl as unknown as Record<string, (input: unknown, ctx: HandlerContext) => unknown>;
  for (const method of service.methods) {
    const fn = impl[method.localName];
    if (typeof fn !== "function") throw new Error(`${service.typeName}/${method.name} has no implementation`);
    const clientStreams = method.methodKind === "client_streaming" || method.methodKind === "bidi_streaming";
    const serverStreams = method.methodKind === "server_streaming" || method.methodKind === "bidi_streaming";
    definition[method.name] = {
      path: pathOf(service, method),
      requestStream: clientStreams,
      responseStream: serverStreams,
      originalName: method.localName,
      requestSerialize: serializer(method.input),
      requestDeserialize: deserializer(method.input),
      responseSerialize: serializer(method.output),
      responseDeserialize: deserializer(method.output),
    };

    const url = pathOf(service, method);
    // Everything a call needs before its handler runs, or the error that refuses it.
    const begin = (call: ServerCall) => {
      const ctx = new CallContext(service, method, url, call);
      let done: ReturnType<CallObserver> | undefined;
      let refused: ConnectError | undefined;
      try {
        done = observe(ctx);
      } catch (e) {
        refused = toConnectError(e);
      }
      let ended = false;
      const end = (err: ConnectError | undefined) => {
        if (ended) return;
        ended = true;
        // A call the client gave up on is CANCELED, whatever the handler made of it.
        done?.(call.cancelled && !err ? cancelledError() : err);
        ctx.finish();
      };
      return { ctx, refused, end, scope: ctx.scope };
    };
    const sendHeader = (call: ServerCall, ctx: CallContext) => {
      call.sendMetadata(ctx.responseMetadata());
    };

    if (!clientStreams && !serverStreams) {
      // The hot path (every unary call): no promise of its own unless the
      // handler returns one, and the observer's end and the reply in one step.
      handlers[method.name] = (call: grpc.ServerUnaryCall<unknown, unknown>, callback: grpc.sendUnaryData<unknown>) => {
        const ctx = new CallContext(service, method, url, call);
        let done: ReturnType<CallObserver>;
        try {
          done = observe(ctx);
        } catch (e) {
          return callback(toStatus(toConnectError(e), ctx.responseTrailer));
        }
        const ok = (res: unknown) => {
          // A call the client gave up on is CANCELED, whatever the handler made of it.
          done(call.cancelled ? cancelledError() : undefined);
          ctx.finish();
          sendHeader(call, ctx);
          callback(null, res, ctx.trailerMetadata());
        };
        const fail = (e: unknown) => {
          const err = toConnectError(e);
          done(err);
          ctx.finish();
          sendHeader(call, ctx);
          callback(toStatus(err, ctx.responseTrailer));
        };
        let res: unknown;
        try {
          const scope = ctx.scope;
          res = scope ? scope.run(() => fn.call(impl, call.request, ctx)) : fn.call(impl, call.request, ctx);
        } catch (e) {
          return fail(e);
        }
        if (typeof (res as PromiseLike<unknown> | undefined)?.then === "function") (res as PromiseLike<unknown>).then(ok, fail);
        else ok(res);
      };
      continue;
    }

    const input = (call: ServerCall & { request?: unknown }) => (clientStreams ? (call as unknown as AsyncIterable<unknown>) : (call.request as unknown));

    if (!serverStreams) {
      handlers[method.name] = (call: grpc.ServerReadableStream<unknown, unknown>, callback: grpc.sendUnaryData<unknown>) => {
        const { ctx, refused, end, scope } = begin(call);
        if (refused) return callback(toStatus(refused, ctx.responseTrailer));
        const run = () => fn.call(impl, input(call), ctx);
        Promise.resolve()
          .then(() => (scope ? scope.run(run) : run()))
          .then(
            (res) => {
              end(undefined);
              sendHeader(call, ctx);
              callback(null, res, ctx.trailerMetadata());
            },
            (e: unknown) => {
              const err = toConnectError(e);
              end(err);
              sendHeader(call, ctx);
              callback(toStatus(err, ctx.responseTrailer));
            },
          );
      };
      continue;
    }

    handlers[method.name] = (call: grpc.ServerWritableStream<unknown, unknown> | grpc.ServerDuplexStream<unknown, unknown>) => {
      const { ctx, refused, end, scope } = begin(call);
      if (refused) {
        call.emit("error", toStatus(refused, ctx.responseTrailer));
        return;
      }
      const serve = async () => {
        let headerSent = false;
        try {
          const out = fn.call(impl, input(call), ctx) as AsyncIterable<unknown>;
          for await (const m of out) {
            if (call.cancelled) break;
            if (!headerSent) {
              sendHeader(call, ctx);
              headerSent = true;
            }
            if (!call.write(m)) {
              await new Promise<void>((resolve) => {
                const go = () => {
                  call.off("drain", go);
                  call.off("cancelled", go);
                  resolve();
                };
                call.on("drain", go);
                call.on("cancelled", go);
              });
            }
          }
          end(undefined);
          if (call.cancelled) return;
          if (!headerSent) sendHeader(call, ctx);
          call.end(ctx.trailerMetadata());
        } catch (e) {
          const err = toConnectError(e);
          end(err);
          if (call.cancelled) return;
          if (!headerSent) sendHeader(call, ctx);
          call.emit("error", toStatus(err, ctx.responseTrailer));
        }
      };
      void (scope ? scope.run(serve) : serve());
    };
  }
  return { definition: definition as grpc.ServiceDefinition, handlers };
}

export interface GrpcJsTransportOptions {
  /** "127.0.0.1:7401", "http://127.0.0.1:7401" or "https://host:7401" (TLS). */
  address: string;
  /** Headers sent on every call (e.g. authorization). */
  header?: Record<string, string>;
  /** Deadline of a call that gives none itself; 0: none. */
  timeoutMs?: number;
  /** Over https://: the CA to trust (default: the system's), and a client certificate for mutual TLS. */
  tls?: { ca?: Buffer; cert?: Buffer; key?: Buffer };
  channelOptions?: grpc.ChannelOptions;
  /** Adds headers to every call as it is made (the request id and trace context of the call being served: tracing.ts). */
  outgoing?: (h: Headers) => void;
}

function toConnectErrorFromGrpc(e: unknown): ConnectError {
  if (e instanceof ConnectError) return e;
  const se = e as Partial<grpc.ServiceError>;
  if (typeof se?.code !== "number") return ConnectError.from(e);
  const h = metadataToHeaders(se.metadata);
  h.set("grpc-status", String(se.code));
  h.set("grpc-message", encodeURIComponent(se.details ?? ""));
  const found = findTrailerError(h);
  const err = found ?? new ConnectError(se.details ?? "", se.code as number as Code);
  // The metadata of the error (x-request-id), as connect's own transport gives it.
  const out = new ConnectError(err.rawMessage, err.code, h, undefined, e);
  out.details.push(...err.details);
  return out;
}

/** A connect Transport whose calls go through one grpc-js channel. */
export function grpcJsTransport(o: GrpcJsTransportOptions): Transport & { close(): void } {
  const m = /^(https?):\/\/(.*?)\/?$/.exec(o.address);
  const secure = m?.[1] === "https";
  const target = m ? m[2] : o.address;
  if (!secure && (o.tls?.cert || o.tls?.ca)) throw new Error(`${o.address}: a CA or client certificate needs an https:// address`);
  const creds = secure ? grpc.credentials.createSsl(o.tls?.ca ?? null, o.tls?.key ?? null, o.tls?.cert ?? null) : grpc.credentials.createInsecure();
  const client = new grpc.Client(target, creds, {
    // A daemon that is starting (or restarting) is retried within a second, not after grpc's exponential backoff of up to 2 minutes.
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.max_receive_message_length": 64 * 1024 * 1024,
    ...o.channelOptions,
  });
  const defaultTimeout = o.timeoutMs ?? 10_000;
  const prepare = (signal: AbortSignal | undefined, timeoutMs: number | undefined, header: HeadersInit | undefined) => {
    const h = new Headers(header);
    for (const [k, v] of Object.entries(o.header ?? {})) if (!h.has(k)) h.set(k, v);
    o.outgoing?.(h);
    const ms = timeoutMs ?? defaultTimeout;
    const options: grpc.CallOptions = ms > 0 ? { deadline: Date.now() + ms } : {};
    if (signal?.aborted) throw new ConnectError("the call was aborted", Code.Canceled);
    return { md: headersToMetadata(h), options };
  };
  const common = (method: DescMethod) => ({ service: method.parent, requestMethod: "POST", url: pathOf(method.parent, method) });
  return {
    close: () => client.close(),
    async unary(method, signal, timeoutMs, header, input) {
      const { md, options } = prepare(signal, timeoutMs, header);
      let responseHeader = new Headers();
      let trailer = new Headers();
      const message = await new Promise<never>((resolve, reject) => {
        const call = client.makeUnaryRequest(
          pathOf(method.parent, method),
          serializer(method.input),
          deserializer(method.output),
          input,
          md,
          options,
          (err, res) => {
            signal?.removeEventListener("abort", cancel);
            if (err) reject(toConnectErrorFromGrpc(err));
            else resolve(res as never);
          },
        );
        const cancel = () => call.cancel();
        signal?.addEventListener("abort", cancel, { once: true });
        call.on("metadata", (h) => (responseHeader = metadataToHeaders(h)));
        call.on("status", (s) => (trailer = metadataToHeaders(s.metadata)));
      });
      const res: UnaryResponse<never, never> = { stream: false, ...common(method), method, header: responseHeader, trailer, message } as never;
      return res as never;
    },
    async stream(method, signal, timeoutMs, header, input) {
      const { md, options } = prepare(signal, timeoutMs, header);
      const path = pathOf(method.parent, method);
      let call: grpc.ClientReadableStream<unknown>;
      if (method.methodKind === "server_streaming") {
        let first: unknown;
        for await (const m of input) {
          first = m;
          break;
        }
        call = client.makeServerStreamRequest(path, serializer(method.input), deserializer(method.output), first ?? {}, md, options);
      } else {
        const duplex = client.makeBidiStreamRequest<object, unknown>(path, serializer(method.input), deserializer(method.output), md, options);
        call = duplex;
        void (async () => {
          try {
            for await (const m of input) if (!duplex.write(m)) await new Promise((r) => duplex.once("drain", r));
            duplex.end();
          } catch {
            duplex.cancel();
          }
        })();
      }
      const cancel = () => call.cancel();
      signal?.addEventListener("abort", cancel, { once: true });
      const trailer = new Headers();
      call.on("status", (s: grpc.StatusObject) => metadataToHeaders(s.metadata, trailer));
      // The response headers, or the error that came instead.
      const responseHeader = await new Promise<Headers>((resolve, reject) => {
        const onError = (e: unknown) => reject(toConnectErrorFromGrpc(e));
        call.once("metadata", (h: grpc.Metadata) => {
          call.off("error", onError);
          resolve(metadataToHeaders(h));
        });
        call.once("error", onError);
      });
      // Errors after the headers reach the reader of messages(); one that
      // comes after it stopped reading (the cancel below) must not go unhandled.
      call.on("error", () => {});
      async function* messages() {
        try {
          for await (const m of call) yield m;
        } catch (e) {
          throw toConnectErrorFromGrpc(e);
        } finally {
          signal?.removeEventListener("abort", cancel);
          call.cancel();
        }
      }
      const res: StreamResponse<never, never> = { stream: true, ...common(method), method, header: responseHeader, trailer, message: messages() } as never;
      return res as never;
    },
  };
}
