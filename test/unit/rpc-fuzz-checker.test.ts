// The RPC fuzzer's checks (test/lib/rpc-fuzz.ts) catch what they claim to: a
// fuzz run that passes means something only if a wrong code, a message
// without the field, or a changed key would have failed it.
import assert from "node:assert/strict";
import { Code } from "@connectrpc/connect";
import fc from "fast-check";
import { test } from "vitest";
import { AttachNicRequestSchema } from "../../gen/microvpc/v1/netagent_pb.js";
import { UpdateSecurityGroupRequestSchema } from "../../gen/microvpc/v1/firewall_pb.js";
import { CreateVpcRequestSchema } from "../../gen/microvpc/v1/vpc_pb.js";
import { build, diffSnapshots, fieldPathResolves, judge, kernelLines, namedField, requestArb } from "../lib/rpc-fuzz.js";

test("judge: INTERNAL and UNKNOWN are findings, client errors and OK are not", () => {
  assert.notDeepEqual(judge(CreateVpcRequestSchema, { code: Code.Internal, message: "internal error: boom" }), []);
  assert.notDeepEqual(judge(CreateVpcRequestSchema, { code: Code.Unknown, message: "x" }), []);
  assert.notDeepEqual(judge(CreateVpcRequestSchema, { code: Code.DeadlineExceeded, message: "x" }), []);
  assert.notDeepEqual(judge(CreateVpcRequestSchema, { code: Code.Aborted, message: "x" }), [], "ABORTED only where the caller allows it");
  assert.deepEqual(judge(CreateVpcRequestSchema, { code: Code.Aborted, message: "x" }, [Code.Aborted]), []);
  assert.deepEqual(judge(CreateVpcRequestSchema, { code: "OK", message: "" }), []);
  for (const code of [Code.NotFound, Code.AlreadyExists, Code.FailedPrecondition, Code.OutOfRange, Code.ResourceExhausted]) {
    assert.deepEqual(judge(CreateVpcRequestSchema, { code, message: "anything" }), [], Code[code]);
  }
});

test("judge: INVALID_ARGUMENT must start with a field of the request", () => {
  assert.deepEqual(judge(CreateVpcRequestSchema, { code: Code.InvalidArgument, message: 'cidr: "x" is not an IPv4 CIDR' }), []);
  assert.deepEqual(judge(CreateVpcRequestSchema, { code: Code.InvalidArgument, message: 'labels[3].key: "" is not valid' }), []);
  assert.deepEqual(judge(CreateVpcRequestSchema, { code: Code.InvalidArgument, message: "clientToken: json name" }), []);
  // Not a field of CreateVpcRequest, no field at all, or the field of another service's request.
  assert.notDeepEqual(judge(CreateVpcRequestSchema, { code: Code.InvalidArgument, message: "ref: not a valid name" }), []);
  assert.notDeepEqual(judge(CreateVpcRequestSchema, { code: Code.InvalidArgument, message: "bad request" }), []);
  assert.notDeepEqual(judge(CreateVpcRequestSchema, { code: Code.InvalidArgument, message: "labels[0].nope: x" }), []);
});

test("field paths walk nested messages, lists and oneofs", () => {
  assert.ok(fieldPathResolves(AttachNicRequestSchema, "veth.netns_path"));
  assert.ok(fieldPathResolves(AttachNicRequestSchema, "options.veth.netns_path"));
  assert.ok(fieldPathResolves(AttachNicRequestSchema, "bandwidth.ingress.rate_mbps"));
  assert.ok(fieldPathResolves(UpdateSecurityGroupRequestSchema, "add_rules[2].cidr"));
  assert.ok(fieldPathResolves(UpdateSecurityGroupRequestSchema, "set_rules.rules[0].port_from"));
  assert.ok(!fieldPathResolves(AttachNicRequestSchema, "veth.nope"));
  assert.ok(!fieldPathResolves(AttachNicRequestSchema, "mac.address"));
  assert.equal(namedField(AttachNicRequestSchema, "mac: bad"), "mac");
  assert.equal(namedField(AttachNicRequestSchema, "nic: bad"), undefined);
});

test("snapshots: an added, removed or changed key is a difference; equal ones are not", () => {
  const a = new Map([
    ["k1", "string:x"],
    ["k2", "hash:[]"],
  ]);
  assert.deepEqual(diffSnapshots(a, new Map(a)), []);
  assert.deepEqual(diffSnapshots(a, new Map([...a, ["k3", "set:[]"]])), ["+ k3"]);
  assert.deepEqual(diffSnapshots(a, new Map([["k1", "string:x"]])), ["- k2"]);
  assert.deepEqual(diffSnapshots(a, new Map([...a, ["k1", "string:y"]])), ["~ k1"]);
});

test("kernel lines: counters and lifetimes are not state, a new rule or link is", () => {
  const s = (nft: string, link = "1: lo: <LOOPBACK>") => kernelLines(new Map([["ns", { link, addr: "", route: "", nft }]]));
  const before = s("table inet t {\n  chain c {\n    counter packets 1 bytes 60 accept\n  }\n}");
  assert.deepEqual(diffSnapshots(before, s("table inet t {\n  chain c {\n    counter packets 9 bytes 900 accept\n  }\n}")), []);
  assert.notDeepEqual(diffSnapshots(before, s("table inet t {\n  chain c {\n    counter packets 1 bytes 60 accept\n    drop\n  }\n}")), []);
  assert.notDeepEqual(diffSnapshots(before, s("table inet t {\n  chain c {\n    counter packets 1 bytes 60 accept\n  }\n}", "1: lo\n2: x")), []);
});

test("generated requests can all be built, and reach boundary values", () => {
  let long = false;
  let huge = false;
  fc.assert(
    fc.property(
      requestArb("AttachNic", AttachNicRequestSchema, () => undefined),
      requestArb("UpdateSecurityGroup", UpdateSecurityGroupRequestSchema, () => undefined),
      (a, b) => {
        build(AttachNicRequestSchema, a);
        build(UpdateSecurityGroupRequestSchema, b);
        if (typeof a.hostname === "string" && a.hostname.length > 64 * 1024) long = true;
        if (Array.isArray(b.addRules) && b.addRules.length >= 5000) huge = true;
      },
    ),
    { numRuns: 300, seed: 13 },
  );
  assert.ok(long, "a string longer than 64 KiB");
  assert.ok(huge, "a list of thousands");
});
