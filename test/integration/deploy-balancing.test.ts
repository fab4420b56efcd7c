// Client-side balancing over ipam replicas (deploy/k8s: vmm calls
// dns:///microvpc-ipam-headless:7401, a headless Service that resolves to
// every ready ipam pod). A DNS name resolving to two loopback addresses
// would need /etc/hosts, which the tests never touch; an ipv4: target list
// goes through the same grpc-js resolver-to-balancer path, so two real ipam
// daemons on 127.0.0.1 behind one ipv4: target must both serve calls.
import assert from "node:assert/strict";
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, test } from "vitest";
import { Health, HealthCheckResponse_ServingStatus } from "../../gen/grpc/health/v1/health_pb.js";
import { BALANCED_CHANNEL_OPTIONS, balancedChannel, grpcClient, grpcTransport } from "../../services/common/client.js";
import { grpcJsTransport } from "../../services/common/grpc-adapter.js";
import { VpcService } from "../../gen/microvpc/v1/vpc_pb.js";
import { ROOT, startDaemon, type Daemon } from "../lib/daemon.js";
import { tempDir } from "../lib/netns.js";
import { freePort, startDaemonsRedis, type DaemonsRedis } from "../lib/redis.js";

let redis: DaemonsRedis;
const daemons: Daemon[] = [];

beforeAll(async () => {
  redis = await startDaemonsRedis();
  for (let i = 0; i < 2; i++) daemons.push(await startDaemon("ipam", ["--redis", redis.url]));
}, 120_000);

const tlsProcs: ChildProcess[] = [];

afterAll(async () => {
  for (const p of tlsProcs) {
    if (p.exitCode !== null || p.signalCode !== null) continue;
    const exited = new Promise((r) => p.once("exit", r));
    p.kill("SIGTERM");
    await exited;
  }
  await Promise.all(daemons.map((d) => d.stop()));
  await redis?.stop();
});

/** microvpc_rpc_requests_total for ListVpcs on one daemon's /metrics. */
async function listCalls(d: Daemon): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${d.metricsPort}/metrics`)).text();
  return [...text.matchAll(/^microvpc_rpc_requests_total\{([^}]*)\} (\d+)/gm)]
    .filter((m) => m[1].includes('method="ListVpcs"'))
    .reduce((n, m) => n + Number(m[2]), 0);
}

test("which addresses are balanced: dns: and ipv4:/ipv6: targets get round_robin, a plain address grpc-js's default", () => {
  assert.deepEqual(JSON.parse(BALANCED_CHANNEL_OPTIONS["grpc.service_config"]), { loadBalancingConfig: [{ round_robin: {} }] });
  for (const a of [
    "dns:///microvpc-ipam-headless:7401",
    "https://dns:///microvpc-ipam-headless:7401",
    "http://ipv4:127.0.0.1:1,127.0.0.1:2",
    "ipv6:[::1]:1,[::1]:2",
  ])
    assert.equal(balancedChannel(a), BALANCED_CHANNEL_OPTIONS, a);
  for (const a of ["127.0.0.1:7401", "https://microvpc-ipam:7401", "http://[::1]:7401"]) assert.equal(balancedChannel(a), undefined, a);
});

test("round_robin over an ipv4: target spreads calls over both ipam daemons; a plain address sticks to one", async () => {
  const [a, b] = daemons;
  const before = await Promise.all([listCalls(a), listCalls(b)]);
  const transport = grpcTransport({ address: `http://ipv4:127.0.0.1:${a.port},127.0.0.1:${b.port}`, timeoutMs: 5000 });
  const vpc = grpcClient(VpcService, transport);
  // The first call may go out before the second subchannel is READY; round_robin
  // then uses both. 40 sequential calls: each daemon must get a fair share.
  for (let i = 0; i < 40; i++) await vpc.listVpcs({});
  const after = await Promise.all([listCalls(a), listCalls(b)]);
  const got = [after[0] - before[0], after[1] - before[1]];
  assert.equal(got[0] + got[1], 40, `every call counted once: ${got.join(" + ")}`);
  assert.ok(got[0] >= 10 && got[1] >= 10, `both daemons served calls: ${got.join(" / ")}`);
  (transport as unknown as { close(): void }).close();

  // The same 40 calls through one plain address all reach that daemon.
  const mid = await Promise.all([listCalls(a), listCalls(b)]);
  const single = grpcTransport({ address: a.address, timeoutMs: 5000 });
  const one = grpcClient(VpcService, single);
  for (let i = 0; i < 40; i++) await one.listVpcs({});
  const end = await Promise.all([listCalls(a), listCalls(b)]);
  assert.deepEqual([end[0] - mid[0], end[1] - mid[1]], [40, 0]);
  (single as unknown as { close(): void }).close();

  // And the balancing is the channel options' doing: the same ipv4: target
  // without them (grpc-js's default, pick_first) sends everything to one.
  const pre = await Promise.all([listCalls(a), listCalls(b)]);
  const pick = grpcJsTransport({ address: `http://ipv4:127.0.0.1:${a.port},127.0.0.1:${b.port}`, timeoutMs: 5000 });
  const first = grpcClient(VpcService, pick);
  for (let i = 0; i < 40; i++) await first.listVpcs({});
  const post = await Promise.all([listCalls(a), listCalls(b)]);
  assert.deepEqual([post[0] - pre[0], post[1] - pre[1]].sort(), [0, 40], "pick_first: one daemon only");
  pick.close();
}, 60_000);

test("vmm's path to ipam as deployed: https, a bearer token, the CA alone, round_robin over two TLS ipam daemons", async () => {
  // A throwaway CA and a certificate for 127.0.0.1 (what the headless Service's names are in a cluster).
  const dir = tempDir("balancing-tls");
  const key = (n: string) => `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ${n}.key`;
  execFileSync(
    "sh",
    [
      "-ec",
      `${key("ca")}; openssl req -x509 -new -key ca.key -out ca.pem -days 1 -subj /CN=balancing-ca
      printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > server.ext
      ${key("server")}; openssl req -new -key server.key -out server.csr -subj /CN=127.0.0.1
      openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 1 -extfile server.ext`,
    ],
    { cwd: dir, stdio: ["ignore", "ignore", "pipe"] },
  );
  writeFileSync(join(dir, "token"), "balancing-token\n", { mode: 0o600 });
  const ports: number[] = [];
  const metrics: number[] = [];
  for (let i = 0; i < 2; i++) {
    const [port, healthPort, metricsPort] = [await freePort(), await freePort(), await freePort()];
    const proc = spawn(
      process.execPath,
      [
        join(ROOT, "bin", "microvpcd.js"),
        "ipam",
        ...["--listen", `127.0.0.1:${port}`, "--metrics-listen", `127.0.0.1:${metricsPort}`, "--health-listen", `127.0.0.1:${healthPort}`],
        ...["--redis", redis.url, "--token-file", join(dir, "token"), "--tls-cert", join(dir, "server.pem"), "--tls-key", join(dir, "server.key")],
        ...["--log-level", "warn"],
      ],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    tlsProcs.push(proc);
    let out = "";
    proc.stdout!.on("data", (d) => (out += d));
    proc.stderr!.on("data", (d) => (out += d));
    // Ready on the plaintext health port, as the kubelet probes it.
    const health = grpcClient(Health, { address: `127.0.0.1:${healthPort}`, timeoutMs: 1000 });
    const deadline = Date.now() + 20_000;
    for (;;) {
      assert.equal(proc.exitCode, null, `ipam exited:\n${out}`);
      if ((await health.check({}).catch(() => undefined))?.status === HealthCheckResponse_ServingStatus.SERVING) break;
      assert.ok(Date.now() < deadline, `ipam not SERVING on its health port:\n${out}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    ports.push(port);
    metrics.push(metricsPort);
  }
  const count = (m: number) => listCalls({ metricsPort: m } as Daemon);
  const before = await Promise.all(metrics.map(count));
  const transport = grpcTransport({
    address: `https://ipv4:127.0.0.1:${ports[0]},127.0.0.1:${ports[1]}`,
    token: "balancing-token",
    tls: { ca: readFileSync(join(dir, "ca.pem")) },
    timeoutMs: 5000,
  });
  const vpc = grpcClient(VpcService, transport);
  for (let i = 0; i < 40; i++) await vpc.listVpcs({});
  const after = await Promise.all(metrics.map(count));
  const got = [after[0] - before[0], after[1] - before[1]];
  assert.ok(got[0] >= 10 && got[1] >= 10, `both TLS daemons served calls: ${got.join(" / ")}`);
  (transport as unknown as { close(): void }).close();
}, 90_000);
