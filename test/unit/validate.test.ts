import assert from "node:assert/strict";
import { Code, ConnectError } from "@connectrpc/connect";
import { test } from "vitest";
import { InvalidArgumentError, NotFoundError, toConnectError } from "../../services/common/errors.js";
import { decodePageToken, encodePageToken } from "../../services/common/paging.js";
import * as V from "../../services/common/validate.js";
import { reservedIndexes } from "../../services/ipam/store.js";

test("names: the safe character set only, with a message that says what is allowed", () => {
  assert.equal(V.name("name", "web-1"), "web-1");
  for (const bad of ["", "Web", "1web", "a_b", "a;flush ruleset", "a\nb", "a b", "a".repeat(64), "$(reboot)", "web\u0000"]) {
    assert.throws(
      () => V.name("name", bad),
      (e: unknown) => e instanceof InvalidArgumentError && e.message.startsWith("name: "),
      bad,
    );
  }
  assert.throws(() => V.name("name", "x;y"), /use 1–63 characters of lowercase letters/);
});

test("cidr: strict parsing, host bits, prefix range", () => {
  assert.deepEqual(V.cidr("cidr", "10.0.0.0/16", { min: 8, max: 28 }), { base: 0x0a000000, prefix: 16, size: 65536, text: "10.0.0.0/16" });
  assert.throws(() => V.cidr("cidr", "10.0.0.1/16", { min: 8, max: 28 }), /did you mean "10\.0\.0\.0\/16"/);
  assert.throws(() => V.cidr("cidr", "10.0.0.0/29", { min: 8, max: 28 }), /allowed are \/8 to \/28/);
  assert.throws(() => V.cidr("cidr", "10.0.0.0/7", { min: 8, max: 28 }), /allowed are/);
  for (const bad of ["10.0.0.0", "10.0.0/16", "10.0.0.256/24", "010.0.0.0/16", "a.b.c.d/8", "10.0.0.0/16 ", "::1/128", "10.0.0.0/016x"]) {
    assert.throws(() => V.cidr("cidr", bad, { min: 8, max: 28 }), InvalidArgumentError, bad);
  }
});

test("private ranges", () => {
  const c = (s: string) => V.cidr("c", s, { min: 0, max: 32 });
  assert.ok(V.isPrivate(c("10.1.0.0/16")));
  assert.ok(V.isPrivate(c("172.31.0.0/16")));
  assert.ok(V.isPrivate(c("100.64.0.0/10")));
  assert.ok(!V.isPrivate(c("172.32.0.0/16")));
  assert.ok(!V.isPrivate(c("8.8.8.0/24")));
  assert.ok(!V.isPrivate(c("10.0.0.0/7")));
});

test("overlap and containment", () => {
  const c = (s: string) => V.cidr("c", s, { min: 0, max: 32 });
  assert.ok(V.overlaps(c("10.0.0.0/16"), c("10.0.1.0/24")));
  assert.ok(!V.overlaps(c("10.0.0.0/24"), c("10.0.1.0/24")));
  assert.ok(V.contains(c("10.0.0.0/16"), c("10.0.255.0/24")));
  assert.ok(!V.contains(c("10.0.0.0/16"), c("10.1.0.0/24")));
  assert.equal(V.intToIp(V.ipToInt("255.255.255.255")), "255.255.255.255");
});

test("mac, port, token", () => {
  assert.equal(V.mac("mac", "02:AA:00:00:00:01"), "02:aa:00:00:00:01");
  assert.throws(() => V.mac("mac", "01:00:00:00:00:01"), /multicast/);
  assert.throws(() => V.mac("mac", "02:00:00:00:00"), /not a MAC/);
  assert.throws(() => V.port("port", 70000), /1–65535/);
  assert.throws(() => V.token("owner", "vm 1"), /not valid/);
  assert.equal(V.token("owner", "hv1/vm-1:eth0"), "hv1/vm-1:eth0");
});

test("page tokens round-trip and reject garbage", () => {
  assert.equal(decodePageToken(encodePageToken("web")), "web");
  assert.equal(decodePageToken(encodePageToken(42)), 42);
  assert.equal(decodePageToken(""), null);
  assert.throws(() => decodePageToken("not-a-token"), /page_token: is not a token this server issued/);
});

test("reserved addresses follow the AWS layout", () => {
  assert.deepEqual(reservedIndexes(256, 2), [0, 1, 2, 3, 255]);
  assert.deepEqual(reservedIndexes(16, 0), [0, 1, 15]);
});

test("domain errors map to gRPC codes and keep the cause", () => {
  assert.equal(toConnectError(new NotFoundError("vpc", "x")).code, Code.NotFound);
  assert.equal(toConnectError(new InvalidArgumentError("cidr", "bad")).code, Code.InvalidArgument);
  const redisDown = Object.assign(new Error("connect ECONNREFUSED 127.0.0.1:1"), { code: "ECONNREFUSED" });
  const e = toConnectError(redisDown);
  assert.equal(e.code, Code.Unavailable);
  assert.match(e.rawMessage, /Redis\) unavailable/);
  assert.equal(toConnectError(new Error("boom")).code, Code.Internal);
  const ce = new ConnectError("x", Code.Aborted);
  assert.equal(toConnectError(ce), ce);
});
