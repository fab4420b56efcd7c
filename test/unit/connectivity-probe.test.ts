// TestConnectivity's request, checked before anything resolves or runs
// (vmm/probe.ts probeOf, which the CLI runs too): the API's ranges and combinations, each refusal
// naming its field.
import assert from "node:assert/strict";
import { test } from "vitest";
import { InvalidArgumentError } from "../../services/common/errors.js";
import { probeOf } from "../../services/vmm/probe.js";
import { Protocol } from "../../gen/microvpc/v1/firewall_pb.js";

const refused = (field: string, re: RegExp) => (e: unknown) => e instanceof InvalidArgumentError && e.message.includes(field) && re.test(e.message);

test("the protocol: unset is TCP with a port, else ICMP; ICMP, TCP and UDP as asked", () => {
  assert.deepEqual(probeOf({ protocol: Protocol.UNSPECIFIED }), { proto: "icmp", port: 0, timeoutMs: 2000 });
  assert.deepEqual(probeOf({ protocol: Protocol.UNSPECIFIED, port: 443 }), { proto: "tcp", port: 443, timeoutMs: 2000 });
  assert.deepEqual(probeOf({ protocol: Protocol.ICMP, timeoutMs: 100 }), { proto: "icmp", port: 0, timeoutMs: 100 });
  assert.deepEqual(probeOf({ protocol: Protocol.TCP, port: 22, timeoutMs: 30_000 }), { proto: "tcp", port: 22, timeoutMs: 30_000 });
  assert.deepEqual(probeOf({ protocol: Protocol.UDP, port: 53 }), { proto: "udp", port: 53, timeoutMs: 2000 });
});

test("refused, naming the field: a wait outside 100–30000 ms (it was silently cut to 10 s), ALL, a port on ICMP, none on TCP or UDP, port 0", () => {
  for (const timeoutMs of [0, 99, 30_001, 4_000_000_000])
    assert.throws(() => probeOf({ protocol: Protocol.ICMP, timeoutMs }), refused("timeout_ms", /100–30000/), String(timeoutMs));
  assert.throws(() => probeOf({ protocol: Protocol.ALL }), refused("protocol", /not ALL/));
  assert.throws(() => probeOf({ protocol: 99 as Protocol, port: 1 }), refused("protocol", /ICMP, TCP or UDP/));
  assert.throws(() => probeOf({ protocol: Protocol.ICMP, port: 80 }), refused("port", /ICMP probe has no port/));
  assert.throws(() => probeOf({ protocol: Protocol.TCP }), refused("port", /required for a TCP probe/));
  assert.throws(() => probeOf({ protocol: Protocol.UDP }), refused("port", /required for a UDP probe/));
  assert.throws(() => probeOf({ protocol: Protocol.UDP, port: 0 }), refused("port", /./));
  assert.throws(() => probeOf({ protocol: Protocol.TCP, port: 70_000 }), refused("port", /./));
});
