// The trust-boundary decisions, without processes: which listeners may start,
// which tokens are refused, where the CLI may send a token, and how Redis
// secrets reach the gateway's imds child (never on its argv).
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, test } from "vitest";
import { tokenRefusal } from "../../services/common/client.js";
import { checkRedisUser, readToken } from "../../services/common/daemon.js";
import { readRedisSecrets, urlHasPassword, urlHasUser } from "../../services/common/redis.js";
import { listenerRefusal } from "../../services/common/server.js";
import { imdsRedisArgs } from "../../services/gateway/main.js";

const dir = mkdtempSync(join(tmpdir(), "mvpc-authn-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const file = (name: string, text: string) => {
  const p = join(dir, name);
  writeFileSync(p, text);
  return p;
};

describe("daemon listener policy", () => {
  const off = { tls: false, clientCa: false, token: false };
  test("loopback stays as it was: no protection needed", () => {
    for (const host of ["127.0.0.1", "127.0.0.2", "::1", "localhost"]) assert.equal(listenerRefusal({ host, ...off }), undefined);
  });
  test("off loopback: nothing, or TLS alone, is refused with what to add", () => {
    assert.match(listenerRefusal({ host: "0.0.0.0", ...off })!, /needs --token-file .* or --tls-cert\/--tls-key with --tls-client-ca/);
    const tlsOnly = listenerRefusal({ host: "10.0.0.5", ...off, tls: true })!;
    assert.match(tlsOnly, /TLS alone/);
    assert.match(tlsOnly, /add --token-file .* or --tls-client-ca/);
  });
  test("off loopback: a token over TLS, or mutual TLS, is enough", () => {
    assert.equal(listenerRefusal({ host: "10.0.0.5", ...off, tls: true, token: true }), undefined);
    assert.equal(listenerRefusal({ host: "10.0.0.5", ...off, tls: true, clientCa: true }), undefined);
  });
  test("off loopback: a token without TLS is refused (it would travel in clear text) unless --insecure-plaintext", () => {
    const r = listenerRefusal({ host: "10.0.0.5", ...off, token: true })!;
    assert.match(r, /with a bearer token but without TLS/);
    assert.match(r, /clear text/);
    assert.match(r, /--tls-cert\/--tls-key.*--insecure-plaintext/);
    assert.equal(listenerRefusal({ host: "10.0.0.5", ...off, token: true, insecurePlaintext: true }), undefined);
    // The flag opens nothing else: without a token the listener is still refused.
    assert.match(listenerRefusal({ host: "10.0.0.5", ...off, insecurePlaintext: true })!, /without protection/);
    // On loopback a token without TLS stays fine.
    assert.equal(listenerRefusal({ host: "127.0.0.1", ...off, token: true }), undefined);
  });
  test("--tls-client-ca without a server certificate is refused", () => {
    assert.match(listenerRefusal({ host: "127.0.0.1", ...off, clientCa: true })!, /--tls-client-ca needs --tls-cert/);
  });
  test("the loopback classification is injectable (127.0.0.2 treated as a remote address)", () => {
    const remote127002 = (h: string) => h === "127.0.0.1";
    assert.match(listenerRefusal({ host: "127.0.0.2", ...off, tls: true }, remote127002)!, /TLS alone/);
  });
});

describe("bearer token from the daemon's flags", () => {
  test("an empty or blank --token-file refuses to start", () => {
    for (const text of ["", "\n", "  \t\n"]) assert.throws(() => readToken({ tokenFile: file("empty", text) }), /is empty: refusing to start/);
  });
  test("an empty --token is refused, an absent one means no auth", () => {
    assert.throws(() => readToken({ token: "" }), /--token is empty/);
    assert.throws(() => readToken({ tokenFile: file("empty2", "") }, "--service-token"), /--service-token-file .* is empty/);
    assert.throws(() => readToken({ token: "  " }), /is empty/);
    assert.equal(readToken({}), undefined);
  });
  test("a token file is trimmed", () => {
    assert.equal(readToken({ tokenFile: file("tok", "s3cret\n") }), "s3cret");
  });
});

describe("CLI: where the bearer token may go", () => {
  test("loopback and https:// get it; no token, nothing to refuse", () => {
    for (const a of ["127.0.0.1:7401", "http://127.0.0.1:7401", "localhost:7401", "[::1]:7401", "https://10.0.0.5:7401", "https://hv1.example:7401"])
      assert.equal(tokenRefusal(a, "t"), undefined, a);
    assert.equal(tokenRefusal("10.0.0.5:7401", undefined), undefined);
  });
  test("plaintext to a non-loopback address is refused, saying why and how", () => {
    for (const a of ["10.0.0.5:7401", "http://10.0.0.5:7401", "hv1.example:7402", "[2001:db8::1]:7401"]) {
      const r = tokenRefusal(a, "t");
      assert.ok(r, a);
      assert.match(r!, /refusing to send the bearer token in clear text/);
      assert.match(r!, /https:\/\//);
      assert.match(r!, /--insecure-send-token/);
    }
  });
  test("--insecure-send-token overrides", () => {
    assert.equal(tokenRefusal("10.0.0.5:7401", "t", true), undefined);
  });
  test("the loopback classification is injectable", () => {
    assert.ok(tokenRefusal("127.0.0.2:7401", "t", false, (h) => h === "127.0.0.1"));
  });
});

describe("Redis secrets", () => {
  test("the password comes from a file (one trailing newline dropped); an empty one is refused", () => {
    assert.equal(readRedisSecrets({ passwordFile: file("pw", "p@ss word\n") }).password, "p@ss word");
    assert.throws(() => readRedisSecrets({ passwordFile: file("pw0", "\n") }), /is empty/);
    assert.deepEqual(readRedisSecrets({}), {});
  });
  test("TLS material from files; a client cert needs its key", () => {
    const ca = file("ca.pem", "CA");
    assert.deepEqual(readRedisSecrets({ tlsCa: ca }).tls, { ca: Buffer.from("CA") });
    assert.throws(() => readRedisSecrets({ tlsCert: ca }), /go together/);
  });
  test("a password in the URL is noticed", () => {
    assert.equal(urlHasPassword("redis://:pw@h:6379/0"), true);
    assert.equal(urlHasPassword("rediss://user:pw@h:6379/0"), true);
    assert.equal(urlHasPassword("redis://h:6379/0"), false);
    assert.equal(urlHasPassword("/run/redis.sock"), false);
  });
  test("the gateway's imds child gets files by path, and a password-bearing URL only in its environment", () => {
    const plain = imdsRedisArgs("redis://h:6379/0", { passwordFile: "/etc/pw", tlsCa: "/etc/ca.pem" });
    assert.deepEqual(plain.args, ["--redis", "redis://h:6379/0", "--redis-password-file", "/etc/pw", "--redis-tls-ca", "/etc/ca.pem"]);
    // Not a sentinel URL: the parent's sentinel password file (in its environment) is not handed over.
    assert.deepEqual(plain.env, { MICROVPC_REDIS_SENTINEL_PASSWORD_FILE: "" });
    assert.ok(!imdsRedisArgs("/run/redis.sock", { sentinelPasswordFile: "/etc/spw" }).args.includes("--redis-sentinel-password-file"));
    const inline = imdsRedisArgs("redis://:hunter2@h:6379/0", {});
    assert.ok(!inline.args.join(" ").includes("hunter2"));
    assert.equal(inline.env.MICROVPC_REDIS_URL, "redis://:hunter2@h:6379/0");
    // The ACL user goes along (docs/redis-acl.md); an empty one (the default user) does not.
    const user = imdsRedisArgs("/run/redis.sock", { user: "microvpc-host-hv1", passwordFile: "/etc/pw" });
    assert.deepEqual(user.args, ["--redis", "/run/redis.sock", "--redis-user", "microvpc-host-hv1", "--redis-password-file", "/etc/pw"]);
    assert.ok(!imdsRedisArgs("/run/redis.sock", { user: "" }).args.includes("--redis-user"));
    // Behind Sentinel: the sentinels' password file goes by path too.
    const sentinel = imdsRedisArgs("redis-sentinel://h1:26379,h2:26379/microvpc", { passwordFile: "/etc/pw", sentinelPasswordFile: "/etc/spw" });
    assert.deepEqual(sentinel.args, [
      "--redis",
      "redis-sentinel://h1:26379,h2:26379/microvpc",
      "--redis-password-file",
      "/etc/pw",
      "--redis-sentinel-password-file",
      "/etc/spw",
    ]);
  });
  test("--redis-user: a plain name, not also in the URL; empty means Redis's default user", () => {
    assert.doesNotThrow(() => checkRedisUser("redis://h:6379/0", "microvpc-host-hv1", "/etc/pw"));
    assert.throws(() => checkRedisUser("redis://h:6379/0", "microvpc-host-hv1"), /needs --redis-password-file/);
    assert.doesNotThrow(() => checkRedisUser("redis://h:6379/0", ""));
    assert.doesNotThrow(() => checkRedisUser("redis://h:6379/0", undefined));
    assert.throws(() => checkRedisUser("redis://h:6379/0", "a b", "/etc/pw"), /--redis-user/);
    assert.throws(() => checkRedisUser("redis://h:6379/0", "x\nACL", "/etc/pw"), /--redis-user/);
    assert.throws(() => checkRedisUser("redis://alice@h:6379/0", "bob", "/etc/pw"), /keep the user in --redis-user only/);
    assert.equal(urlHasUser("redis://alice:pw@h:6379/0"), true);
    assert.equal(urlHasUser("redis://:pw@h:6379/0"), false);
  });
});
