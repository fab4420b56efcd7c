// The ceiling of IPAM's Allocate on this stack, for bench:ipam: a bare
// @grpc/grpc-js server (no interceptors, no request id, trace scope,
// metrics, validation or logging) whose Allocate decodes the request with
// protobuf-es, runs the allocate script once through ioredis (EVALSHA of its
// SHA1, auto-pipelined, as microvpcd's client does) and answers the
// allocation. None of microvpc's serving code runs per call: what grpc-js,
// protobuf-es and ioredis alone cost, so that the bench shows which part of
// the gap between microvpcd and the raw script is the stack and which is
// ours. A subnet is read once (IpamReader) and kept. Run as its own process:
// `node --import tsx bench/lib/grpc-ipam-ceiling-server.ts PORT REDIS_URL`;
// prints "listening" when ready.
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { Redis } from "ioredis";
import { AllocateRequestSchema, AllocateResponseSchema, type AllocateRequest } from "../../gen/microvpc/v1/ipam_pb.js";
import { K } from "../../services/ipam/keys.js";
import { IpamReader, type SubnetRec } from "../../services/ipam/schema.js";
import { ALLOCATE } from "../../services/ipam/scripts.js";

const port = Number(process.argv[2]);
const redis = new Redis(process.argv[3], { enableAutoPipelining: true });
const reader = new IpamReader(redis);
const sha = (await redis.script("LOAD", ALLOCATE)) as string;
const subnets = new Map<string, SubnetRec>();

const ip = (n: number) => `${n >>> 24}.${(n >>> 16) & 255}.${(n >>> 8) & 255}.${n & 255}`;

async function allocate(req: AllocateRequest): Promise<Buffer> {
  let s = subnets.get(req.subnetId);
  if (!s) {
    const got = await reader.getSubnet(req.subnetId);
    if (!got) throw Object.assign(new Error(`no subnet ${req.subnetId}`), { code: grpc.status.NOT_FOUND });
    subnets.set(req.subnetId, (s = got));
  }
  const v = s.vpcId;
  const now = Date.now();
  const keys = [...K.state(v, s.id), K.owner(v, req.owner), K.events];
  const [code, detail] = (await redis.evalsha(sha, keys.length, ...keys, req.owner, req.requestId, -1, now, s.id, s.size)) as [number, string | number];
  if (code !== 1 && code !== 0) throw Object.assign(new Error(`allocate script returned ${code}`), { code: grpc.status.FAILED_PRECONDITION });
  const res = create(AllocateResponseSchema, {
    allocation: {
      subnetId: s.id,
      address: ip(s.base + Number(detail)),
      prefixLength: s.prefix,
      gateway: ip(s.base + 1),
      owner: req.owner,
      requestId: req.requestId,
      allocateTime: timestampFromMs(now),
    },
    created: code === 1,
  });
  return Buffer.from(toBinary(AllocateResponseSchema, res));
}

const id = (b: Buffer) => b;
const server = new grpc.Server();
server.addService(
  {
    Allocate: {
      path: "/microvpc.v1.IpamService/Allocate",
      requestStream: false,
      responseStream: false,
      requestSerialize: id,
      requestDeserialize: (b: Buffer) => fromBinary(AllocateRequestSchema, b),
      responseSerialize: id,
      responseDeserialize: id,
    },
  },
  {
    Allocate: (call: grpc.ServerUnaryCall<AllocateRequest, Buffer>, cb: grpc.sendUnaryData<Buffer>) => {
      allocate(call.request).then(
        (b) => cb(null, b),
        (e: Error & { code?: number }) => cb({ code: e.code ?? grpc.status.INTERNAL, details: e.message }),
      );
    },
  },
);
server.bindAsync(`127.0.0.1:${port}`, grpc.ServerCredentials.createInsecure(), (err) => {
  if (err) throw err;
  process.stdout.write("listening\n");
});
process.on("SIGTERM", () => {
  redis.disconnect();
  process.exit(0);
});
