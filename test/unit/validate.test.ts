import assert from "node:assert/strict";
import { Code, ConnectError } from "@connectrpc/connect";
import fc from "fast-check";
import { test } from "vitest";
import { InvalidArgumentError, NotFoundError, toConnectError } from "../../services/common/errors.js";
import { decodeIndexToken, decodeNameToken, decodePageToken, encodePageToken } from "../../services/common/paging.js";
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

const tok = (v: unknown) => Buffer.from(JSON.stringify(v) ?? "").toString("base64url");

/** The only outcomes: a cursor of the right kind, or INVALID_ARGUMENT naming page_token. */
function outcome<T>(decode: (t: string) => T): (t: string) => T | "invalid" {
  return (t) => {
    try {
      return decode(t);
    } catch (e) {
      assert.ok(e instanceof InvalidArgumentError, `not INVALID_ARGUMENT: ${e}`);
      assert.equal(toConnectError(e).code, Code.InvalidArgument);
      assert.match(e.message, /^page_token: is not a token this server issued/);
      return "invalid";
    }
  };
}

test("page tokens: NaN, Infinity, negative, fractional, over-long, wrong-type cursors are INVALID_ARGUMENT", () => {
  const any = outcome(decodePageToken);
  for (const bad of [tok({ c: "NaN" }), tok({ c: -1 }), tok({ c: 1.5 }), tok({ c: 2 ** 53 }), tok({ c: null }), tok({ c: [1] }), tok({ c: {} })]) {
    assert.equal(outcome(decodeIndexToken)(bad), "invalid", Buffer.from(bad, "base64url").toString());
  }
  for (const bad of [tok({ c: -1 }), tok({ c: 1.5 }), tok({ c: true }), tok({}), tok({ c: 1, d: 2 }), tok([1]), tok(1), tok("c"), tok(null)]) {
    assert.equal(any(bad), "invalid", Buffer.from(bad, "base64url").toString());
  }
  assert.equal(any(Buffer.from('{"c":1e400}').toString("base64url")), "invalid", "Infinity");
  assert.equal(any(Buffer.from('{"c":NaN}').toString("base64url")), "invalid", "NaN literal");
  assert.equal(any(encodePageToken("a".repeat(400))), "invalid", "over-long");
  assert.equal(any(encodePageToken("web") + "=="), "invalid", "padding is not how tokens are written");
  assert.equal(any(encodePageToken("web") + "!"), "invalid", "stray characters");
  assert.equal(outcome(decodeIndexToken)(encodePageToken("web")), "invalid");
  assert.equal(outcome(decodeNameToken)(encodePageToken(7)), "invalid");
  assert.equal(decodeIndexToken(encodePageToken(7)), 7);
  assert.equal(decodeNameToken(encodePageToken("subnet-0123456789ab/7")), "subnet-0123456789ab/7");
});

test("page tokens (property): random strings and base64url of random JSON decode to a valid cursor or INVALID_ARGUMENT", () => {
  const valid = (c: unknown) => c === null || typeof c === "string" || (typeof c === "number" && Number.isSafeInteger(c) && c >= 0);
  const check = (t: string) => {
    const a = outcome(decodePageToken)(t);
    assert.ok(a === "invalid" || valid(a), `bad cursor ${String(a)}`);
    if (a !== "invalid" && a !== null) assert.equal(encodePageToken(a), t, "a token has one spelling");
    const i = outcome(decodeIndexToken)(t);
    assert.ok(i === "invalid" || i === null || (Number.isSafeInteger(i) && i >= 0));
    const n = outcome(decodeNameToken)(t);
    assert.ok(n === "invalid" || n === null || typeof n === "string");
  };
  fc.assert(fc.property(fc.string({ maxLength: 700 }), check), { numRuns: 3000 });
  fc.assert(fc.property(fc.string({ unit: "binary", maxLength: 100 }), check), { numRuns: 1000 });
  fc.assert(
    fc.property(fc.jsonValue(), (v) => check(tok(v))),
    { numRuns: 3000 },
  );
  fc.assert(
    fc.property(fc.jsonValue(), (v) => check(tok({ c: v }))),
    { numRuns: 3000 },
  );
  fc.assert(
    fc.property(fc.oneof(fc.string({ maxLength: 300 }), fc.nat(), fc.double(), fc.integer()), (c) => {
      // Everything the server writes reads back as itself (or, for what it never writes, is refused).
      const t = Buffer.from(JSON.stringify({ c })).toString("base64url");
      const got = outcome(decodePageToken)(t);
      if (got !== "invalid") assert.equal(got, JSON.parse(JSON.stringify(c)));
    }),
    { numRuns: 3000 },
  );
  for (const c of ["web", "a/b", "", "é☃", 0, 42, 2 ** 32]) assert.equal(decodePageToken(encodePageToken(c)), c);
});

test("texts refuse C0 and C1 control characters and bidirectional-text controls", () => {
  assert.equal(V.text("description", "web tier — 10.0.1.0/24, naïve café ☃"), "web tier — 10.0.1.0/24, naïve café ☃");
  for (const c of ["\u0000", "\u001b", "\u007f", "\u0080", "\u0085", "\u009b", "\u009f"]) {
    assert.throws(() => V.text("description", `a${c}b`), /description: must not contain control characters/, JSON.stringify(c));
  }
  for (const c of ["\u061c", "\u200e", "\u200f", "\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069"]) {
    assert.throws(() => V.text("description", `admin${c}txt.exe`), /description: must not contain bidirectional-text control characters/, JSON.stringify(c));
  }
  fc.assert(
    fc.property(fc.string({ unit: "binary", maxLength: 40 }), (s) => {
      // eslint-disable-next-line no-control-regex -- control characters are what this checks
      const refused = /[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/.test(s);
      let threw = false;
      try {
        V.text("description", s);
      } catch (e) {
        assert.ok(e instanceof InvalidArgumentError);
        threw = true;
      }
      assert.equal(threw, refused, JSON.stringify(s));
    }),
    { numRuns: 2000 },
  );
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

test("status messages are well-formed UTF-16: a lone surrogate (JSON.parse quotes half a pair) would make the call hang", () => {
  let parseError = "";
  try {
    JSON.parse("\u{10C50B}");
  } catch (e) {
    parseError = (e as Error).message;
  }
  assert.throws(() => encodeURIComponent(parseError), URIError, "the premise: V8 quotes one code unit");
  for (const thrown of [
    new InvalidArgumentError("vpcctl_policy_json", `is not valid JSON (${parseError})`),
    new Error(parseError),
    new ConnectError(parseError, Code.InvalidArgument),
  ]) {
    const e = toConnectError(thrown);
    assert.doesNotThrow(() => encodeURIComponent(e.rawMessage), e.rawMessage);
  }
  const ok = new ConnectError("fine 😀", Code.NotFound);
  assert.equal(toConnectError(ok), ok, "a well-formed message is passed on as it is");
  assert.equal(toConnectError(new InvalidArgumentError("name", "😀\ud800")).rawMessage, "name: 😀\ufffd");
});
