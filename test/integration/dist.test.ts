// What the image ships, run as the image runs it: bin/ and dist/ (the
// esbuild output) beside production dependencies only — no tsx, no esbuild,
// no TypeScript. The daemon must start, serve health and reflection (its
// commented descriptors come from dist/, not gen/), and the CLI must talk to
// it. A service that imports a dev dependency, or a path that assumes the
// source tree, fails here; so does tracing's lazily imported SDK
// (services/common/otel.ts), started with an OTLP endpoint.
import assert from "node:assert/strict";
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { cpSync, existsSync, mkdirSync, mkdtempSync, rmSync, symlinkSync } from "node:fs";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, test } from "vitest";
import { grpcClient } from "../../services/common/client.js";
import { Health, HealthCheckResponse_ServingStatus } from "../../gen/grpc/health/v1/health_pb.js";
import { VpcService } from "../../gen/microvpc/v1/vpc_pb.js";
import { ROOT } from "../lib/daemon.js";
import { freePort, startRedis, type TestRedis } from "../lib/redis.js";

const pexec = promisify(execFile);
let redis: TestRedis;
let app: string;
let daemon: ChildProcess | undefined;

beforeAll(async () => {
  redis = await startRedis({ persistence: false });
  // The image's /app: package.json, bin/, dist/, and node_modules with the
  // production dependency tree only (npm's own list of it).
  app = mkdtempSync(join(tmpdir(), "mvpc-dist-"));
  for (const f of ["package.json", "bin", "dist"]) cpSync(join(ROOT, f), join(app, f), { recursive: true });
  const npm = await pexec("npm", ["ls", "--omit=dev", "--all", "--parseable"], { cwd: ROOT, maxBuffer: 16 << 20 }).catch((e) => e as { stdout: string });
  const prod = npm.stdout.split("\n").filter((p) => p.startsWith(join(ROOT, "node_modules") + "/"));
  assert.ok(prod.length > 10, `npm ls --omit=dev listed ${prod.length} packages`);
  for (const p of prod) {
    const to = join(app, relative(ROOT, p));
    if (existsSync(to)) continue;
    mkdirSync(dirname(to), { recursive: true });
    symlinkSync(p, to);
  }
});

afterAll(async () => {
  if (daemon && daemon.exitCode === null) daemon.kill("SIGKILL");
  await redis?.stop();
  if (app) rmSync(app, { recursive: true, force: true });
});

test("the image layout has no TypeScript tooling", () => {
  for (const dev of ["tsx", "esbuild", "typescript", "vitest"])
    assert.ok(!existsSync(join(app, "node_modules", dev)), `${dev} is a dev dependency, not shipped`);
  assert.ok(existsSync(join(app, "dist", "microvpcd.js")));
  assert.ok(existsSync(join(app, "dist", "descriptors.binpb")), "the commented descriptors ship in dist/");
});

test("microvpcd from dist/ with production dependencies serves health and commented reflection; the CLI talks to it", async () => {
  const help = await pexec(process.execPath, [join(app, "bin", "microvpcd.js"), "--help"]);
  assert.match(help.stdout, /ipam/);
  const port = await freePort();
  const metrics = await freePort();
  let out = "";
  // Executed as the image's ENTRYPOINT executes it (tini -- microvpcd, a
  // link to bin/microvpcd.js): through its #! line, with the node on PATH.
  daemon = spawn(
    join(app, "bin", "microvpcd.js"),
    ["ipam", "--listen", `127.0.0.1:${port}`, "--metrics-listen", `127.0.0.1:${metrics}`, "--redis", redis.url, "--log-level", "info"],
    {
      cwd: app,
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, PATH: `${dirname(process.execPath)}:${process.env.PATH ?? ""}` },
    },
  );
  daemon.stdout!.on("data", (d) => (out += d));
  daemon.stderr!.on("data", (d) => (out += d));
  const health = grpcClient(Health, { address: `127.0.0.1:${port}`, timeoutMs: 1000 });
  const deadline = Date.now() + 15_000;
  for (;;) {
    assert.equal(daemon.exitCode, null, `microvpcd exited:\n${out}`);
    const r = await health.check({}).catch(() => undefined);
    if (r?.status === HealthCheckResponse_ServingStatus.SERVING) break;
    assert.ok(Date.now() < deadline, `not serving after 15 s:\n${out}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  // The #! line's node flags reached the daemon: a 4-MiB young generation,
  // not Node 24's 64 MiB whose scavenges stopped it for ~20 ms at a time.
  const servingLine = () => out.split("\n").find((l) => l.includes('"ipam serving"'));
  for (let i = 0; i < 50 && !servingLine(); i++) await new Promise((r) => setTimeout(r, 100));
  const serving = servingLine();
  assert.ok(serving, `no start-up line:\n${out}`);
  assert.match(JSON.parse(serving).nodeFlags, /(^| )--max-semi-space-size=2( |$)/, serving);
  // Reflection with the proto comments: grpcurl's `describe` reads them.
  const buf = join(ROOT, "node_modules", ".bin", "buf");
  const list = await pexec(buf, ["curl", "--protocol", "grpc", "--http2-prior-knowledge", "--list-services", `http://127.0.0.1:${port}`]);
  assert.match(list.stdout, /microvpc\.v1\.VpcService/);
  const desc = await pexec(buf, [
    "curl",
    "--protocol",
    "grpc",
    "--http2-prior-knowledge",
    "--reflect-protocol",
    "grpc-v1",
    "--list-methods",
    `http://127.0.0.1:${port}`,
  ]);
  assert.match(desc.stdout, /microvpc\.v1\.VpcService\/CreateVpc/);
  // The CLI from the same layout.
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("MICROVPC_")));
  const created = await pexec(
    process.execPath,
    [join(app, "bin", "microvpc.js"), "--server", `127.0.0.1:${port}`, "vpc", "create", "distvpc", "--cidr", "10.77.0.0/16"],
    { env, cwd: app },
  );
  assert.match(created.stdout, /distvpc/);
  const listed = await pexec(process.execPath, [join(app, "bin", "microvpc.js"), "--server", `127.0.0.1:${port}`, "-o", "json", "vpc", "list"], {
    env,
    cwd: app,
  });
  assert.match(listed.stdout, /10\.77\.0\.0\/16/);
  // A name the API refuses is refused by the shipped CLI too, with the code.
  const bad = await pexec(
    process.execPath,
    [join(app, "bin", "microvpc.js"), "--server", `127.0.0.1:${port}`, "vpc", "create", "Bad Name!", "--cidr", "10.78.0.0/16"],
    { env, cwd: app },
  ).then(
    () => assert.fail("a bad VPC name was accepted"),
    (e: { stderr: string }) => e,
  );
  assert.match(bad.stderr, /invalid|name/i);
});

test("with an OTLP endpoint, the shipped layout loads the OpenTelemetry SDK from production dependencies and exports spans", async () => {
  const bodies: string[] = [];
  const receiver = createServer((req, res) => {
    let b = "";
    req.on("data", (c: Buffer) => (b += c.toString("utf8")));
    req.on("end", () => {
      bodies.push(`${req.url} ${b}`);
      res.writeHead(200, { "content-type": "application/json" });
      res.end("{}");
    });
  });
  await new Promise<void>((r) => receiver.listen(0, "127.0.0.1", r));
  const rport = (receiver.address() as AddressInfo).port;
  const port = await freePort();
  const metrics = await freePort();
  let out = "";
  const traced = spawn(
    process.execPath,
    [
      join(app, "bin", "microvpcd.js"),
      "ipam",
      "--listen",
      `127.0.0.1:${port}`,
      "--metrics-listen",
      `127.0.0.1:${metrics}`,
      "--redis",
      redis.url,
      "--otlp-endpoint",
      `http://127.0.0.1:${rport}`,
    ],
    { cwd: app, stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, OTEL_BSP_SCHEDULE_DELAY: "100" } },
  );
  traced.stdout!.on("data", (d) => (out += d));
  traced.stderr!.on("data", (d) => (out += d));
  try {
    const vpc = grpcClient(VpcService, { address: `127.0.0.1:${port}`, timeoutMs: 1000 });
    const deadline = Date.now() + 15_000;
    for (;;) {
      assert.equal(traced.exitCode, null, `microvpcd exited:\n${out}`);
      if (
        await vpc.listVpcs({}).then(
          () => true,
          () => false,
        )
      )
        break;
      assert.ok(Date.now() < deadline, `not serving after 15 s:\n${out}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    for (let i = 0; i < 50 && !bodies.some((b) => b.includes("microvpc.v1.VpcService/ListVpcs")); i++) await new Promise((r) => setTimeout(r, 100));
    const got = bodies.find((b) => b.includes("microvpc.v1.VpcService/ListVpcs"));
    assert.ok(got, `a span of ListVpcs reached the receiver:\n${bodies.join("\n").slice(0, 2000)}\n${out}`);
    assert.ok(got.startsWith("/v1/traces "));
    assert.match(got, /"microvpc-ipam"/);
    assert.match(out, /tracing: exporting spans over OTLP\/HTTP/);
  } finally {
    if (traced.exitCode === null) {
      const exited = new Promise((r) => traced.once("exit", r));
      traced.kill("SIGTERM");
      const t = setTimeout(() => traced.kill("SIGKILL"), 5000);
      await exited;
      clearTimeout(t);
    }
    receiver.close();
  }
});
