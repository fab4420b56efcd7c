// Every daemon starts the same way (`microvpcd <service>`), documents every
// flag with its environment variable, and serves health and reflection.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, test } from "vitest";
import { ROOT, startDaemon } from "../lib/daemon.js";
import { startDaemonsRedis, type DaemonsRedis } from "../lib/redis.js";

const pexec = promisify(execFile);
let redis: DaemonsRedis;
beforeAll(async () => {
  redis = await startDaemonsRedis({ persistence: false });
});
afterAll(async () => {
  await redis?.stop();
});

for (const svc of ["ipam", "netagent", "firewall", "gateway", "vmm"]) {
  test(`microvpcd ${svc} --help lists its flags with their environment variables`, async () => {
    const r = await pexec(process.execPath, [join(ROOT, "bin", "microvpcd.js"), svc, "--help"]);
    assert.match(r.stdout.replace(/\s+/g, " "), /--listen <host:port> .*env: MICROVPC_LISTEN/);
    assert.match(r.stdout, /MICROVPC_REDIS_URL/);
    // Every option but --help and --version names the variable that sets it.
    const meta = (l: string) => l.includes("--help") || /^\s+--version\b/.test(l);
    const options = r.stdout.split("\n").filter((l) => /^\s+--[a-z]/.test(l) && !meta(l));
    assert.ok(options.length >= 8);
    assert.match(r.stdout, /^\s+--version\s+print the version/m, "--version is listed");
    // An option's line is indented two spaces; its wrapped description deeper (and may start with "--another-flag").
    const blocks = r.stdout.split(/\n(?= {2}--)/).filter((b) => /^ {2}--[a-z]/.test(b) && !meta(b));
    for (const b of blocks) assert.match(b.replace(/\s+/g, " "), /env: MICROVPC_/, b);
  });
}

test("the vmm serves health and lists its service by reflection", async () => {
  // (netagent, firewall and gateway are started by their own data-plane tests,
  // inside namespaces: the gateway must never run against this machine's network.)
  const d = await startDaemon("vmm", ["--redis", redis.url, "--host-id", "daemonstest"]);
  try {
    const buf = join(ROOT, "node_modules", ".bin", "buf");
    const list = await pexec(buf, ["curl", "--protocol", "grpc", "--http2-prior-knowledge", "--list-services", `http://${d.address}`]);
    assert.match(list.stdout, /microvpc\.v1\.VmService/);
    assert.match(list.stdout, /grpc\.health\.v1\.Health/);
  } finally {
    await d.stop();
  }
});
