// One trust boundary, with real daemons: which listeners start, bearer
// tokens, mutual TLS, the plaintext health port, the CLI's refusal to send a
// token in clear text, and the Redis password from a file (in no daemon's
// or child's argv). Everything listens on 127.0.0.1, but for one daemon
// with a token and --insecure-plaintext on 0.0.0.0, stopped at once;
// "non-loopback" refusals happen before anything binds.
import assert from "node:assert/strict";
import { execFile, execFileSync, spawn, type ChildProcess } from "node:child_process";
import { X509Certificate } from "node:crypto";
import { readFileSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { connect as tlsConnect } from "node:tls";
import { promisify } from "node:util";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, test } from "vitest";
import { grpcClient } from "../../services/common/client.js";
import { Health, HealthCheckResponse_ServingStatus } from "../../gen/grpc/health/v1/health_pb.js";
import { VmService } from "../../gen/microvpc/v1/vm_pb.js";
import { VpcService } from "../../gen/microvpc/v1/vpc_pb.js";
import { cliRunner } from "../lib/cli.js";
import { ROOT } from "../lib/daemon.js";
import { createNetns, deleteNetns, RUN_PREFIX, tempDir } from "../lib/netns.js";
import { freePort, startRedis, type TestRedis } from "../lib/redis.js";

const pexec = promisify(execFile);
const MICROVPCD = join(ROOT, "bin", "microvpcd.js");
const PASSWORD = "pw-" + Math.random().toString(36).slice(2);

let redis: TestRedis;
let dir: string;
const procs: ChildProcess[] = [];

beforeAll(async () => {
  redis = await startRedis({ persistence: false, password: PASSWORD });
  dir = tempDir("authn");
  writeFileSync(join(dir, "redis-password"), PASSWORD + "\n", { mode: 0o600 });
  writeFileSync(join(dir, "token"), "s3cret-token\n", { mode: 0o600 });
  writeFileSync(join(dir, "empty-token"), "  \n", { mode: 0o600 });
  // A throwaway CA, a server certificate for 127.0.0.1, a client certificate
  // it signed, and one from another CA.
  const sh = (script: string) => execFileSync("sh", ["-ec", script], { cwd: dir, stdio: ["ignore", "ignore", "pipe"] });
  const key = (name: string) => `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ${name}.key`;
  sh(`
    ${key("ca")}; openssl req -x509 -new -key ca.key -out ca.pem -days 1 -subj /CN=authn-test-ca
    ${key("other-ca")}; openssl req -x509 -new -key other-ca.key -out other-ca.pem -days 1 -subj /CN=other-ca
    printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > server.ext
    printf 'extendedKeyUsage=clientAuth\\n' > client.ext
    ${key("server")}; openssl req -new -key server.key -out server.csr -subj /CN=127.0.0.1
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 1 -extfile server.ext
    ${key("client")}; openssl req -new -key client.key -out client.csr -subj /CN=operator
    openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 1 -extfile client.ext
    ${key("rogue")}; openssl req -new -key rogue.key -out rogue.csr -subj /CN=rogue
    openssl x509 -req -in rogue.csr -CA other-ca.pem -CAkey other-ca.key -CAcreateserial -out rogue.pem -days 1 -extfile client.ext
  `);
}, 60_000);

afterAll(async () => {
  for (const p of procs) if (p.exitCode === null && p.signalCode === null) p.kill("SIGKILL");
  await redis?.stop();
});

const f = (name: string) => join(dir, name);
const redisArgs = () => ["--redis", redis.url, "--redis-password-file", f("redis-password")];

/** microvpcd <service> args…, to completion (for the ones that must refuse). */
async function refuses(args: string[]): Promise<string> {
  const r = await pexec(process.execPath, [MICROVPCD, ...args], { timeout: 30_000 }).catch((e: { code?: number; stdout?: string; stderr?: string }) => e);
  assert.notEqual((r as { code?: number }).code ?? 0, 0, "microvpcd exited 0");
  return String(r.stdout) + String(r.stderr);
}

interface Running {
  proc: ChildProcess;
  port: number;
  healthPort: number;
  metricsPort: number;
  output(): string;
}

/** Starts a daemon on 127.0.0.1 with --health-listen and waits for SERVING there (plaintext, no credentials). */
async function start(service: string, extra: string[]): Promise<Running> {
  const port = await freePort();
  const healthPort = await freePort();
  const metricsPort = await freePort();
  const args = [
    MICROVPCD,
    service,
    "--listen",
    `127.0.0.1:${port}`,
    "--metrics-listen",
    `127.0.0.1:${metricsPort}`,
    "--health-listen",
    `127.0.0.1:${healthPort}`,
    "--log-level",
    "info",
    ...extra,
  ];
  const proc = spawn(process.execPath, args, { stdio: ["ignore", "pipe", "pipe"] });
  procs.push(proc);
  let out = "";
  proc.stdout!.on("data", (d) => (out += d));
  proc.stderr!.on("data", (d) => (out += d));
  const health = grpcClient(Health, { address: `127.0.0.1:${healthPort}`, timeoutMs: 1000 });
  const deadline = Date.now() + 20_000;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`microvpcd ${service} exited with ${proc.exitCode}:\n${out}`);
    const s = await health.check({}).catch(() => undefined);
    if (s?.status === HealthCheckResponse_ServingStatus.SERVING) break;
    if (Date.now() > deadline) throw new Error(`microvpcd ${service} not SERVING on its health port after 20 s:\n${out}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  return { proc, port, healthPort, metricsPort, output: () => out };
}

async function stop(d: Running): Promise<void> {
  if (d.proc.exitCode !== null || d.proc.signalCode !== null) return;
  const exited = new Promise((r) => d.proc.once("exit", r));
  d.proc.kill("SIGTERM");
  await exited;
}

function vpcs(address: string, o: { token?: string; ca?: string; cert?: string; key?: string } = {}) {
  const headers: Record<string, string> = o.token ? { authorization: `Bearer ${o.token}` } : {};
  const transport = createGrpcTransport({
    baseUrl: o.ca ? `https://${address}` : `http://${address}`,
    defaultTimeoutMs: 5000,
    nodeOptions: o.ca ? { ca: readFileSync(o.ca), ...(o.cert ? { cert: readFileSync(o.cert), key: readFileSync(o.key!) } : {}) } : {},
    interceptors: [
      (next) => (req) => {
        for (const [k, v] of Object.entries(headers)) req.header.set(k, v);
        return next(req);
      },
    ],
  });
  return createClient(VpcService, transport);
}

async function rejects(p: Promise<unknown>, code?: Code): Promise<ConnectError> {
  try {
    await p;
  } catch (e) {
    const err = ConnectError.from(e);
    if (code !== undefined) assert.equal(err.code, code, err.message);
    return err;
  }
  assert.fail("the call succeeded");
}

/** Every process whose argv mentions this file's temporary directory or redis port, with its command line. */
function cmdlines(): { pid: number; argv: string }[] {
  const out: { pid: number; argv: string }[] = [];
  for (const e of readdirSync("/proc")) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const argv = readFileSync(`/proc/${e}/cmdline`, "utf8").split("\0").join(" ");
      if (argv.includes(dir) || argv.includes(redis.socket)) out.push({ pid: Number(e), argv });
    } catch {
      // gone
    }
  }
  return out;
}

describe("daemon start-up policy", () => {
  test("a non-loopback listener with TLS alone refuses to start, saying what to add", async () => {
    const out = await refuses(["ipam", "--listen", "0.0.0.0:0", ...redisArgs(), "--tls-cert", f("server.pem"), "--tls-key", f("server.key")]);
    assert.match(out, /with TLS alone/);
    assert.match(out, /add --token-file .* or --tls-client-ca/);
  });

  test("a non-loopback listener with a token but without TLS refuses to start, unless --insecure-plaintext", async () => {
    const out = await refuses(["ipam", "--listen", "0.0.0.0:0", ...redisArgs(), "--token-file", f("token")]);
    assert.match(out, /with a bearer token but without TLS/);
    assert.match(out, /--insecure-plaintext/);
    // With the flag it starts (and says it serves); 0.0.0.0 on an ephemeral port, stopped at once.
    const port = await freePort();
    const proc = spawn(
      process.execPath,
      [
        MICROVPCD,
        "ipam",
        ...["--listen", `0.0.0.0:${port}`, "--metrics-listen", `127.0.0.1:${await freePort()}`],
        ...redisArgs(),
        ...["--token-file", f("token"), "--insecure-plaintext"],
      ],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    procs.push(proc);
    let out2 = "";
    proc.stdout!.on("data", (d) => (out2 += d));
    proc.stderr!.on("data", (d) => (out2 += d));
    try {
      const deadline = Date.now() + 20_000;
      while (!/ipam serving/.test(out2)) {
        if (proc.exitCode !== null) assert.fail(`microvpcd ipam --insecure-plaintext exited with ${proc.exitCode}:\n${out2}`);
        if (Date.now() > deadline) assert.fail(`not serving after 20 s:\n${out2}`);
        await new Promise((r) => setTimeout(r, 100));
      }
      await rejects(vpcs(`127.0.0.1:${port}`).listVpcs({}), Code.Unauthenticated);
      await vpcs(`127.0.0.1:${port}`, { token: "s3cret-token" }).listVpcs({});
    } finally {
      const exited = new Promise((r) => proc.once("exit", r));
      proc.kill("SIGTERM");
      await exited;
    }
  }, 30_000);

  test("the vmm refuses to send its service token in clear text to a non-loopback address, unless --insecure-send-token", async () => {
    // 192.0.2.1 (TEST-NET-1) is never dialled: the vmm refuses before any call.
    const out = await refuses(["vmm", "--listen", "127.0.0.1:0", ...redisArgs(), "--ipam", "192.0.2.1:7401", "--service-token-file", f("token")]);
    assert.match(out, /refusing to send the bearer token in clear text to 192\.0\.2\.1:7401/);
    assert.match(out, /--insecure-send-token/);
    // With the flag the token check passes: the start goes on to the next
    // check (a --ca-file with no https:// address), so nothing is dialled.
    const told = await refuses([
      ...["vmm", "--listen", "127.0.0.1:0", ...redisArgs(), "--ipam", "192.0.2.1:7401"],
      ...["--service-token-file", f("token"), "--insecure-send-token", "--ca-file", f("ca.pem")],
    ]);
    assert.doesNotMatch(told, /refusing to send the bearer token/);
    assert.match(told, /--ca-file\/--client-cert are for https:\/\/ service addresses/);
    // Loopback peers (the default addresses) get the token without the flag.
    const local = await start("vmm", [...redisArgs(), "--host-id", "authnloop", "--service-token-file", f("token")]);
    await stop(local);
  });

  test("an empty (blank) token file refuses to start, on loopback too", async () => {
    const out = await refuses(["ipam", "--listen", "127.0.0.1:0", ...redisArgs(), "--token-file", f("empty-token")]);
    assert.match(out, /--token-file .*empty-token is empty: refusing to start/);
  });

  test("--tls-client-ca without a server certificate refuses to start", async () => {
    const out = await refuses(["ipam", "--listen", "127.0.0.1:0", ...redisArgs(), "--tls-client-ca", f("ca.pem")]);
    assert.match(out, /--tls-client-ca needs --tls-cert/);
  });

  test("a Redis password both in the URL and in a file is refused", async () => {
    const url = `redis://:${PASSWORD}@127.0.0.1:${redis.port}/0`;
    const out = await refuses(["ipam", "--listen", "127.0.0.1:0", "--redis", url, "--redis-password-file", f("redis-password")]);
    assert.match(out, /keep the password in the file only/);
  });
});

describe("bearer token", () => {
  let d: Running;
  beforeAll(async () => {
    d = await start("ipam", [...redisArgs(), "--token-file", f("token")]);
  }, 30_000);
  afterAll(() => stop(d));

  test("a call without the token is UNAUTHENTICATED, with it OK", async () => {
    const addr = `127.0.0.1:${d.port}`;
    await rejects(vpcs(addr).listVpcs({}), Code.Unauthenticated);
    await rejects(vpcs(addr, { token: "wrong" }).listVpcs({}), Code.Unauthenticated);
    await vpcs(addr, { token: "s3cret-token" }).listVpcs({});
  });

  test("the CLI sends its token to 127.0.0.1, and refuses to send it in clear text to another address unless told to", async () => {
    const cli = cliRunner(() => [], 20_000);
    await cli.expect(0, ["vpc", "list"], ["--server", `127.0.0.1:${d.port}`, "--token", "s3cret-token"]);
    const noToken = await cli.expect(1, ["vpc", "list"], ["--server", `127.0.0.1:${d.port}`]);
    assert.match(noToken.stderr, /bearer token/);
    // 0.0.0.0 is not a loopback address, yet a connection to it stays on this host (it reaches 127.0.0.1).
    const refused = await cli.expect(1, ["vpc", "list"], ["--server", `0.0.0.0:${d.port}`, "--token", "s3cret-token"]);
    assert.match(refused.stderr, /refusing to send the bearer token in clear text to 0\.0\.0\.0:\d+/);
    assert.match(refused.stderr, /https:\/\/.*--insecure-send-token/);
    await cli.expect(0, ["vpc", "list"], ["--server", `0.0.0.0:${d.port}`, "--token", "s3cret-token", "--insecure-send-token"]);
  });

  test("the health port answers SERVING without credentials while the gRPC port wants them", async () => {
    const r = await grpcClient(Health, { address: `127.0.0.1:${d.healthPort}` }).check({});
    assert.equal(r.status, HealthCheckResponse_ServingStatus.SERVING);
    assert.equal((await grpcClient(Health, { address: `127.0.0.1:${d.healthPort}` }).check({ service: "microvpc.v1.VpcService" })).status, 1);
    // Only health is served there.
    await rejects(vpcs(`127.0.0.1:${d.healthPort}`, { token: "s3cret-token" }).listVpcs({}), Code.Unimplemented);
    await rejects(vpcs(`127.0.0.1:${d.port}`).listVpcs({}), Code.Unauthenticated);
  });
});

describe("mutual TLS", () => {
  let d: Running;
  beforeAll(async () => {
    d = await start("ipam", [...redisArgs(), "--tls-cert", f("server.pem"), "--tls-key", f("server.key"), "--tls-client-ca", f("ca.pem")]);
  }, 30_000);
  afterAll(() => stop(d));

  test("a client without a certificate, or with one another CA signed, is refused; with one the CA signed it succeeds", async () => {
    const addr = `127.0.0.1:${d.port}`;
    const ca = f("ca.pem");
    await rejects(vpcs(addr, { ca }).listVpcs({}));
    await rejects(vpcs(addr, { ca, cert: f("rogue.pem"), key: f("rogue.key") }).listVpcs({}));
    await vpcs(addr, { ca, cert: f("client.pem"), key: f("client.key") }).listVpcs({});
  });

  test("the CLI reaches it over https:// with --ca-file and --client-cert/--client-key, and is refused without a certificate", async () => {
    const cli = cliRunner(() => [], 20_000);
    const server = ["--server", `https://127.0.0.1:${d.port}`, "--ca-file", f("ca.pem")];
    await cli.expect(0, ["vpc", "list"], [...server, "--client-cert", f("client.pem"), "--client-key", f("client.key")]);
    const r = await cli.run(["vpc", "list"], server);
    assert.notEqual(r.code, 0, r.stdout);
  });

  test("the health port answers SERVING in plaintext without a certificate", async () => {
    const r = await grpcClient(Health, { address: `127.0.0.1:${d.healthPort}` }).check({});
    assert.equal(r.status, HealthCheckResponse_ServingStatus.SERVING);
  });

  test("the vmm calls it over https:// with --ca-file and --client-cert/--client-key; without a certificate its calls fail", async () => {
    // CreateVm asks ipam for the VPC first: NOT_FOUND from ipam means the call went through mutual TLS.
    const ipam = ["--ipam", `https://127.0.0.1:${d.port}`, "--ca-file", f("ca.pem")];
    const vm = { name: "mtls", vpc: "no-such-vpc", subnet: "none" };
    const withCert = await start("vmm", [...redisArgs(), "--host-id", "authnmtls", ...ipam, "--client-cert", f("client.pem"), "--client-key", f("client.key")]);
    try {
      const err = await rejects(grpcClient(VmService, { address: `127.0.0.1:${withCert.port}` }).createVm(vm), Code.NotFound);
      assert.match(err.message, /no-such-vpc/);
    } finally {
      await stop(withCert);
    }
    const without = await start("vmm", [...redisArgs(), "--host-id", "authnmtls", ...ipam]);
    try {
      const err = await rejects(grpcClient(VmService, { address: `127.0.0.1:${without.port}` }).createVm(vm));
      assert.notEqual(err.code, Code.NotFound, err.message);
    } finally {
      await stop(without);
    }
    const half = await refuses(["vmm", "--listen", "127.0.0.1:0", ...redisArgs(), ...ipam, "--client-cert", f("client.pem")]);
    assert.match(half, /--client-cert and --client-key go together/);
  }, 60_000);
});

describe("certificate renewal", () => {
  test("a renewed certificate written over the files is served to new connections without a restart; a key that does not fit it is refused and the last good pair kept; mutual TLS holds throughout", async () => {
    const rot = tempDir("authn-renew");
    const put = (from: string, to: string) => writeFileSync(join(rot, to), readFileSync(f(from)));
    put("server.pem", "tls.crt");
    put("server.key", "tls.key");
    // What a renewal brings: a new key and certificate for 127.0.0.1 from the same CA.
    execFileSync(
      "sh",
      [
        "-ec",
        `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out renewed.key
         openssl req -new -key renewed.key -out renewed.csr -subj /CN=127.0.0.1
         openssl x509 -req -in renewed.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out renewed.pem -days 2 -extfile server.ext`,
      ],
      { cwd: dir, stdio: ["ignore", "ignore", "pipe"] },
    );
    const serialOf = (pem: string) => new X509Certificate(readFileSync(f(pem))).serialNumber;
    const d = await start("ipam", [
      ...redisArgs(),
      ...["--tls-cert", join(rot, "tls.crt"), "--tls-key", join(rot, "tls.key"), "--tls-client-ca", f("ca.pem")],
      ...["--tls-reload-interval-ms", "200"],
    ]);
    try {
      const addr = `127.0.0.1:${d.port}`;
      const ca = f("ca.pem");
      /** The serial of the certificate a new TLS connection is shown. */
      const served = () =>
        new Promise<string>((resolve, reject) => {
          const sock = tlsConnect(
            {
              host: "127.0.0.1",
              port: d.port,
              ca: readFileSync(ca),
              cert: readFileSync(f("client.pem")),
              key: readFileSync(f("client.key")),
              ALPNProtocols: ["h2"],
            },
            () => {
              resolve(sock.getPeerCertificate().serialNumber);
              sock.destroy();
            },
          );
          sock.on("error", reject);
        });
      const metric = async (name: string) => {
        const text = await (await fetch(`http://127.0.0.1:${d.metricsPort}/metrics`)).text();
        return Number(new RegExp(`^${name}(?:\\{[^}]*\\})? (\\S+)$`, "m").exec(text)?.[1] ?? NaN);
      };
      const until = async (what: string, ok: () => Promise<boolean>) => {
        for (const t0 = Date.now(); !(await ok()); await new Promise((r) => setTimeout(r, 100)))
          if (Date.now() - t0 > 15_000) assert.fail(`not within 15 s: ${what}\n${d.output().slice(-1500)}`);
      };
      const expiry = (pem: string) => Date.parse(new X509Certificate(readFileSync(f(pem))).validTo) / 1000;
      assert.equal(await served(), serialOf("server.pem"));
      assert.equal(await metric("microvpc_tls_certificate_expiry_timestamp_seconds"), expiry("server.pem"));

      // The key lands first: for a moment it does not fit the certificate. Refused (counted), the old pair still served.
      put("renewed.key", "tls.key");
      await until("the mismatched pair is refused", async () => (await metric("microvpc_tls_reload_errors_total")) >= 1);
      assert.equal(await served(), serialOf("server.pem"), "the last good certificate, not a broken listener");
      await vpcs(addr, { ca, cert: f("client.pem"), key: f("client.key") }).listVpcs({});
      assert.match(d.output(), /does not fit .*keeping the last good certificate|keeping the last good certificate/s);

      // Then the certificate: the pair fits, and new connections get it.
      put("renewed.pem", "tls.crt");
      await until("the renewed certificate is served", async () => (await served()) === serialOf("renewed.pem"));
      assert.equal(await metric("microvpc_tls_certificate_expiry_timestamp_seconds"), expiry("renewed.pem"));
      await vpcs(addr, { ca, cert: f("client.pem"), key: f("client.key") }).listVpcs({});
      await rejects(vpcs(addr, { ca, cert: f("rogue.pem"), key: f("rogue.key") }).listVpcs({}));
      await rejects(vpcs(addr, { ca }).listVpcs({}));

      // A file that is not a key at all: refused the same way.
      const errors = await metric("microvpc_tls_reload_errors_total");
      writeFileSync(join(rot, "tls.key"), "not a key\n");
      await until("the garbage key is refused", async () => (await metric("microvpc_tls_reload_errors_total")) > errors);
      assert.equal(await served(), serialOf("renewed.pem"));
      await vpcs(addr, { ca, cert: f("client.pem"), key: f("client.key") }).listVpcs({});
    } finally {
      await stop(d);
    }
  }, 60_000);
});

describe("Redis over TLS", () => {
  test("a daemon reaches a rediss:// Redis that requires a client certificate and a password, all from files", async () => {
    const port = await freePort();
    const tlsRedis = spawn(
      "redis-server",
      [
        ...["--port", "0", "--tls-port", String(port), "--bind", "127.0.0.1", "--dir", dir, "--save", "", "--appendonly", "no"],
        ...["--tls-cert-file", f("server.pem"), "--tls-key-file", f("server.key"), "--tls-ca-cert-file", f("ca.pem"), "--tls-auth-clients", "yes"],
        ...["--requirepass", PASSWORD, "--loglevel", "warning", "--daemonize", "no"],
      ],
      { stdio: ["ignore", "ignore", "pipe"] },
    );
    procs.push(tlsRedis);
    let d: Running | undefined;
    try {
      const args = ["--redis", `rediss://127.0.0.1:${port}/0`, "--redis-password-file", f("redis-password"), "--redis-tls-ca", f("ca.pem")];
      // SERVING means its Redis ping passed: TLS with the client certificate, then AUTH.
      d = await start("ipam", [...args, "--redis-tls-cert", f("client.pem"), "--redis-tls-key", f("client.key")]);
      const made = (await vpcs(`127.0.0.1:${d.port}`).createVpc({ name: "tls-ok", cidr: "10.42.0.0/16" })).vpc!;
      assert.equal((await vpcs(`127.0.0.1:${d.port}`).getVpc({ ref: "tls-ok" })).vpc?.id, made.id);
    } finally {
      if (d) await stop(d);
      if (tlsRedis.exitCode === null) {
        const exited = new Promise((r) => tlsRedis.once("exit", r));
        tlsRedis.kill("SIGKILL");
        await exited;
      }
    }
  }, 60_000);
});

describe("Redis password from a file", () => {
  test("the daemons reach a password-protected Redis, and no daemon's or gateway child's argv holds the password", async () => {
    const ns = `${RUN_PREFIX}-authn`;
    await createNetns(ns);
    const started: Running[] = [];
    try {
      started.push(await start("ipam", redisArgs()));
      started.push(await start("firewall", [...redisArgs(), "--host-id", `${RUN_PREFIX}hva`]));
      // With --host-netns the gateway runs `microvpcd imds` inside it; that child reaches Redis by its unix socket.
      const gw = await start("gateway", [
        ...redisArgs(),
        "--host-id",
        `${RUN_PREFIX}hva`,
        "--host-netns",
        ns,
        "--uplink",
        "ul0",
        "--imds-redis",
        redis.socket,
        "--imds-port",
        String(await freePort()),
        "--dns-port",
        "0",
        "--drift-interval-ms",
        "600000",
      ]);
      started.push(gw);
      // SERVING means each one's Redis ping passed, so AUTH worked.
      await vpcs(`127.0.0.1:${started[0].port}`).listVpcs({});
      const seen = cmdlines();
      const child = seen.find((p) => / imds /.test(p.argv));
      assert.ok(child, `the gateway's imds child is running: ${JSON.stringify(seen)}`);
      assert.match(child.argv, /--redis-password-file \S+redis-password/);
      assert.ok(seen.filter((p) => /microvpcd\.js (ipam|firewall|gateway) /.test(p.argv)).length >= 3, JSON.stringify(seen));
      for (const p of seen) assert.ok(!p.argv.includes(PASSWORD) || /redis-server/.test(p.argv), `pid ${p.pid} has the password on its argv: ${p.argv}`);
      // The child authenticated: it would log "redis connection lost" (NOAUTH) otherwise.
      await new Promise((r) => setTimeout(r, 1500));
      assert.doesNotMatch(gw.output(), /redis connection lost|NOAUTH|WRONGPASS/);
      assert.equal(execFileSync("redis-cli", ["-s", redis.socket, "--no-auth-warning", "-a", PASSWORD, "PING"], { encoding: "utf8" }).trim(), "PONG");
    } finally {
      for (const d of started.reverse()) await stop(d);
      await deleteNetns(ns);
    }
  }, 60_000);
});
