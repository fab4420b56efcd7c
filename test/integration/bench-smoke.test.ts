// Every benchmark (`npm run bench:*`) in smoke mode (bench/lib/run.ts): tiny
// counts through the same code paths and baselines, so that a bench that no
// longer runs to its end fails here rather than when someone next wants a
// figure. The figures of a smoke run mean nothing and are not checked; exit
// code 0 (no error, no namespace left, root namespace unchanged) and the
// result lines are. Needs root, redis-server, iperf3, wireguard-go and a
// built dist/ (the daemons run from it), like the other integration tests.
// One bench at a time: each loads the machine; all of them take 2–2½
// minutes on a shared 2-core machine (bench:gateway's smoke about 22 s).
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "vitest";
import { ROOT } from "../lib/daemon.js";

/** A smoke run stops itself after 90 s (SMOKE_LIMIT_MS); past this the test ends it. */
const KILL_AFTER_MS = 120_000;

/** The lines each bench prints at the end of a run that measured everything. */
const BENCHES: Record<string, RegExp[]> = {
  ipam: [/^Verdict$/m, /^ +64 +lean +/m, /^ +64 +frames +/m, /^ +64 +together +/m, /^errors or calls that did not allocate: 0$/m, /^figures written to /m],
  netagent: [/^Verdict$/m, /^figures written to /m],
  firewall: [/^Verdict$/m, /diff\(\) picks: /, /^figures written to /m],
  fwdelta: [/^Verdict$/m, /^figures written to /m],
  fwstore: [/^Verdict$/m, /^BindNic on a cluster/m, /^figures written to /m],
  hoststore: [/^Verdict$/m, /^AttachNic on a cluster/m, /^figures written to /m],
  gwstore: [/^Verdict$/m, /^CreateNatGateway on a cluster/m, /^figures written to /m],
  flowlogs: [/^Verdict$/m, /^flow records written during the run: [1-9]/m, /^figures written to /m],
  gateway: [/^Summary$/m, /^figures written to /m],
  vm: [/^Verdict$/m, /^(exec counts: n\/a|3b\. Execs per CreateVm)/m, /^figures written to /m],
  dns: [/^resolver \/ bare: /m, /^ +\d+ vs \d+ records: /m, /^figures written to /m],
  overlay: [/^Verdict$/m, /^figures written to /m],
  startup: [/^Verdict$/m, /^figures written to /m],
  rpc: [
    /^Verdict$/m,
    ...["ipam", "netagent", "firewall", "gateway", "vmm"].map((d) => new RegExp(`^Health/Check calls/s, ${d} vs bare node:http2 `, "m")),
    /^server CPU per call: grpc-js itself adds /m,
    /^figures written to /m,
  ],
  conntrack: [/^Verdict$/m, /^figures written to /m],
  exec: [/^execFile +wall /m, /^execa +wall /m, /^run\(\) +wall /m],
  move: [/^Verdict$/m, /^move of \d+ VMs/m, /^figures written to /m],
  fleet: [
    /^Verdict$/m,
    /^N=\d+: changes not applied on every holder +0 /m,
    /^N=\d+ cluster: changes not applied on every holder +0 /m,
    /^figures written to /m,
  ],
};

test("every bench:* script of package.json has a smoke test here", () => {
  const scripts = Object.keys((JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as { scripts: Record<string, string> }).scripts);
  const benches = scripts.filter((s) => s.startsWith("bench:")).map((s) => s.slice("bench:".length));
  assert.deepEqual([...benches].sort(), Object.keys(BENCHES).sort());
});

function runSmoke(name: string): Promise<{ code: number | null; signal: NodeJS.Signals | null; out: string; err: string; ms: number }> {
  return new Promise((resolve, reject) => {
    const t0 = Date.now();
    // A bench measures the deployment it documents (one redis-server beside its
    // baseline; bench:fleet, bench:move and the *store benches start their own
    // clusters): MICROVPC_TEST_ON_CLUSTER, which moves a test's harness to a
    // cluster, is not passed on.
    const { MICROVPC_TEST_ON_CLUSTER: _onCluster, ...env } = process.env;
    const child = spawn(process.execPath, ["--import", "tsx", join("bench", `${name}.ts`), "--smoke"], { cwd: ROOT, env, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    child.stdout.on("data", (d) => (out += d));
    child.stderr.on("data", (d) => (err += d));
    // SIGINT first: the bench's handlers end its processes and namespaces; SIGKILL if it does not go.
    const stop = setTimeout(() => {
      child.kill("SIGINT");
      setTimeout(() => child.kill("SIGKILL"), 10_000).unref();
    }, KILL_AFTER_MS);
    child.on("error", reject);
    child.on("close", (code, signal) => {
      clearTimeout(stop);
      resolve({ code, signal, out, err, ms: Date.now() - t0 });
    });
  });
}

for (const [name, lines] of Object.entries(BENCHES)) {
  test(`bench:${name} --smoke runs to its end`, { timeout: KILL_AFTER_MS + 20_000 }, async () => {
    assert.ok(existsSync(join(ROOT, "dist", "microvpcd.js")), "dist/ is missing: run `node build.mjs` first");
    const r = await runSmoke(name);
    const tail = `\n--- stdout (tail):\n${r.out.slice(-3000)}\n--- stderr (tail):\n${r.err.slice(-3000)}`;
    assert.equal(r.code, 0, `bench:${name} --smoke exited with ${r.code ?? r.signal} after ${(r.ms / 1000).toFixed(0)} s${tail}`);
    for (const re of lines) assert.match(r.out, re, `bench:${name} --smoke did not print ${re}${tail}`);
    console.log(`bench:${name} --smoke: ${(r.ms / 1000).toFixed(1)} s`);
  });
}
