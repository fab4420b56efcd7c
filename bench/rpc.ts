// The RPC floor of each daemon (`npm run bench:rpc`; not a timed test): unary
// grpc.health.v1.Health/Check calls per second under load against every
// real `microvpcd` service of a hypervisor, started as a hypervisor runs them
// (test/lib/harness.ts: ipam, the host's netagent, firewall, gateway and the
// vmm wired to them, in the run's own namespaces; compiled, dist/;
// @grpc/grpc-js through services/common/grpc-adapter.ts, with the request
// id, metrics, health's shared readiness: at most one Redis PING a second;
// the others idle beside the one under load), against a bare
// node:http2 server answering the same bytes (HealthCheckResponse{SERVING},
// gRPC-framed, grpc-status 0): what Node's HTTP/2 alone costs. Between the two,
// a bare @grpc/grpc-js server with a handler that returns the prebuilt bytes
// (no protobuf, no adapter, no request id, no metrics, grpc-js's default
// options but channelz off, as microvpcd runs it; microvpcd's node flags):
// what the library itself costs, so the
// table shows which part of the gap is grpc-js and which is ours. Each runs as
// its own process, one core's worth each at most (Node is single-threaded).
//
// The load: h2load (Debian nghttp2-client) when installed, else a Node
// load generator in this process (a node:http2 client, the same prebuilt
// request on both targets: a closed loop of --streams concurrent calls
// spread over --connections connections). The same client for both
// targets, the cases interleaved round by round; median (min–max) of
// --rounds rounds of --seconds each, after a warm-up round.
// Target (issue 14): the daemon at ≥ 0.5× the bare server. Also shown: the
// server CPU per call of each (/proc/PID/stat), which a loaded machine
// disturbs far less than calls/s.
//
// Every process is spawned by the bench and ended by PID; only 127.0.0.1
// is used; the harness's namespaces (needs root) are removed at the end, also
// on failure. About 3½ minutes.
//
// Options (after `npm run bench:rpc --`): --rounds N (default 5),
// --seconds S (default 4), --connections N (default 4), --streams N
// (default 64), --client node|h2load (default: h2load if installed),
// --daemons ipam,netagent,firewall,gateway,vmm (default: all five).
// --smoke: 1 round of 1 s, no warm-up (bench/lib/run.ts).
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { ROOT, shebangNodeFlags, type Daemon } from "../test/lib/daemon.js";
import { Harness } from "../test/lib/harness.js";
import { freePort } from "../test/lib/redis.js";
import { cpuUs, machineEnv } from "./lib/cpu.js";
import { h2Sessions, unaryCall } from "./lib/h2-unary.js";
import { check, heading, num, resultsFile, spr, table, verdictTable, writeJson, type Verdict } from "./lib/report.js";
import { benchArgs, benchClock, intOpt, pick, runBench } from "./lib/run.js";
import { interleaved, spread, type BenchCase } from "./lib/stats.js";

/** Every daemon a hypervisor runs, in the order they are shown. */
const DAEMONS = ["ipam", "netagent", "firewall", "gateway", "vmm"] as const;
type DaemonName = (typeof DAEMONS)[number];

const opt = benchArgs(
  {
    rounds: { type: "string", default: "5" },
    seconds: { type: "string", default: "4" },
    connections: { type: "string", default: "4" },
    streams: { type: "string", default: "64" },
    client: { type: "string", default: "" },
    daemons: { type: "string", default: DAEMONS.join(",") },
  },
  { rounds: "1", seconds: "1" },
);
const ROUNDS = intOpt("rounds", opt.rounds, 3, 30);
const SECONDS = intOpt("seconds", opt.seconds, 2, 60);
const CONNECTIONS = intOpt("connections", opt.connections, 1, 64);
const STREAMS = intOpt("streams", opt.streams, CONNECTIONS, 4096);
const WARMUP = pick(1, 0);
const HARD_LIMIT_MS = 480_000;
const TARGET = 0.5;

function hasH2load(): boolean {
  try {
    execFileSync("h2load", ["--version"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}
const CLIENT = String(opt.client || (hasH2load() ? "h2load" : "node"));
if (CLIENT !== "node" && CLIENT !== "h2load") throw new Error(`--client ${CLIENT}: node or h2load`);
const CHOSEN = String(opt.daemons)
  .split(",")
  .filter(Boolean)
  .map((d) => {
    if (!(DAEMONS as readonly string[]).includes(d)) throw new Error(`--daemons: ${d} is not one of ${DAEMONS.join(", ")}`);
    return d as DaemonName;
  });
if (CHOSEN.length === 0) throw new Error(`--daemons: name at least one of ${DAEMONS.join(", ")}`);

const { progress } = benchClock(HARD_LIMIT_MS);

/** The baseline: node:http2 alone, answering every stream with HealthCheckResponse{status: SERVING}. */
const BARE = `
const http2 = require("node:http2");
const reply = Buffer.from([0, 0, 0, 0, 2, 0x08, 0x01]);
const s = http2.createServer({ settings: { maxConcurrentStreams: 256 } });
s.on("stream", (st) => {
  st.on("data", () => {});
  st.on("end", () => {
    st.respond({ ":status": 200, "content-type": "application/grpc" }, { waitForTrailers: true });
    st.on("wantTrailers", () => st.sendTrailers({ "grpc-status": "0" }));
    st.end(reply);
  });
});
s.listen(Number(process.argv[1]), "127.0.0.1", () => process.stdout.write("listening\\n"));
process.on("SIGTERM", () => process.exit(0));
`;

/** The library's own floor: grpc-js serving Health/Check with the same prebuilt answer, identity (de)serializers. */
const BARE_GRPC = `
const grpc = require("@grpc/grpc-js");
const reply = Buffer.from([0x08, 0x01]);
const id = (x) => x;
// Channelz off, as services/common/server.ts runs grpc-js: the library's floor as a daemon could reach it.
const s = new grpc.Server({ "grpc.enable_channelz": 0 });
s.addService(
  { Check: { path: "/grpc.health.v1.Health/Check", requestStream: false, responseStream: false, requestSerialize: id, requestDeserialize: id, responseSerialize: id, responseDeserialize: id } },
  { Check: (_call, cb) => cb(null, reply) },
);
s.bindAsync("127.0.0.1:" + process.argv[1], grpc.ServerCredentials.createInsecure(), (err) => {
  if (err) throw err;
  process.stdout.write("listening\\n");
});
process.on("SIGTERM", () => process.exit(0));
`;

/** An empty HealthCheckRequest, gRPC-framed (uncompressed, length 0). */
const REQUEST = Buffer.alloc(5);
const PATH = "/grpc.health.v1.Health/Check";

interface Run {
  callsPerSec: number;
  errors: number;
  /** Server CPU during the run, ms per 1000 calls. */
  cpuMsPer1k: number;
}

/** One loaded run with the Node client (bench/lib/h2-unary.ts): --streams calls in flight over --connections connections. */
async function nodeLoad(port: number, ms: number): Promise<{ ok: number; errors: number; elapsedMs: number }> {
  const sessions = await h2Sessions(`127.0.0.1:${port}`, CONNECTIONS);
  let ok = 0;
  let errors = 0;
  const start = performance.now();
  const stopAt = start + ms;
  const worker = async (i: number) => {
    const s = sessions[i % sessions.length];
    while (performance.now() < stopAt && errors < 1000) {
      try {
        const m = await unaryCall(s, PATH, REQUEST);
        if (m.length >= 2) ok++;
        else errors++;
      } catch {
        errors++;
      }
    }
  };
  await Promise.all(Array.from({ length: STREAMS }, (_, i) => worker(i)));
  const elapsedMs = performance.now() - start;
  for (const s of sessions) s.destroy();
  return { ok, errors, elapsedMs };
}

let bodyFile = "";
/** The request body as a file for h2load -d (it reads the file by name: Node's stdin pipe is a socket, which /dev/stdin cannot open). */
function requestFile(): string {
  if (!bodyFile) {
    const dir = mkdtempSync(join(tmpdir(), "microvpc-rpcbench-"));
    process.once("exit", () => rmSync(dir, { recursive: true, force: true }));
    bodyFile = join(dir, "request.bin");
    writeFileSync(bodyFile, REQUEST);
  }
  return bodyFile;
}

/** One loaded run with h2load (its "finished in …, N req/s" line). */
function h2load(port: number, ms: number): Promise<{ ok: number; errors: number; elapsedMs: number }> {
  const args = [
    ...["-D", String(Math.max(1, Math.round(ms / 1000))), "-c", String(CONNECTIONS), "-m", String(Math.ceil(STREAMS / CONNECTIONS))],
    ...["-t", "1", "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", requestFile()],
    `http://127.0.0.1:${port}${PATH}`,
  ];
  return new Promise((resolve, reject) => {
    const p = spawn("h2load", args, { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    p.stdout.on("data", (d) => (out += d));
    p.stderr.on("data", (d) => (out += d));
    p.on("error", reject);
    p.on("close", () => {
      const fin = /finished in ([\d.]+)(m?s)/.exec(out);
      const reqs = /requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored/.exec(out);
      if (!fin || !reqs) return reject(new Error(`h2load: no result in its output:\n${out.slice(-2000)}`));
      const elapsedMs = Number(fin[1]) * (fin[2] === "s" ? 1000 : 1);
      resolve({ ok: Number(reqs[1]), errors: Number(reqs[2]) + Number(reqs[3]), elapsedMs });
    });
  });
}

async function measure(port: number, pid: number): Promise<Run> {
  const c0 = cpuUs(pid);
  const r = CLIENT === "h2load" ? await h2load(port, SECONDS * 1000) : await nodeLoad(port, SECONDS * 1000);
  const cpuMs = (cpuUs(pid) - c0) / 1000;
  if (r.ok === 0) throw new Error(`no successful call to 127.0.0.1:${port} (${r.errors} errors)`);
  return { callsPerSec: (r.ok / r.elapsedMs) * 1000, errors: r.errors, cpuMsPer1k: (cpuMs / r.ok) * 1000 };
}

let h: Harness | undefined;
const daemons = new Map<DaemonName, Daemon>();
let bare: ChildProcess | undefined;
let bareGrpc: ChildProcess | undefined;

/** The daemons of one hypervisor, as it runs them; only those --daemons names are measured. */
async function startDaemons(): Promise<void> {
  h = await Harness.start({ hosts: 1 });
  const hv = h.hosts[0];
  const { fwd, gwd, vmmd } = await h.hostServices(hv, { vmm: true });
  const all: Record<DaemonName, Daemon> = { ipam: h.ipamDaemon, netagent: hv.daemon, firewall: fwd, gateway: gwd, vmm: vmmd! };
  for (const d of CHOSEN) daemons.set(d, all[d]);
}

/** A baseline server as its own process: `source` run by node -e (from the repo, so that it finds @grpc/grpc-js). */
async function startBare(source: string, nodeFlags: string[] = []): Promise<{ proc: ChildProcess; port: number }> {
  const port = await freePort();
  const proc = spawn(process.execPath, [...nodeFlags, "-e", source, String(port)], { cwd: ROOT, stdio: ["ignore", "pipe", "inherit"] });
  await new Promise<void>((resolve, reject) => {
    proc.stdout!.on("data", (d: Buffer) => d.toString().includes("listening") && resolve());
    proc.once("exit", (code) => reject(new Error(`the bare server exited with ${code}`)));
  });
  return { proc, port };
}

async function main(): Promise<number> {
  const env = machineEnv();
  progress(`client: ${CLIENT}; ${ROUNDS} round(s) of ${SECONDS} s, ${STREAMS} calls in flight over ${CONNECTIONS} connection(s); daemons ${CHOSEN.join(", ")}`);
  await startDaemons();
  const b = await startBare(BARE);
  bare = b.proc;
  const g = await startBare(BARE_GRPC, shebangNodeFlags(join(ROOT, "bin", "microvpcd.js")));
  bareGrpc = g.proc;
  const cases: BenchCase<Run>[] = [
    ...[...daemons].map(([name, d]) => ({ name, run: () => measure(d.port, d.proc.pid!) })),
    { name: "grpc", run: () => measure(g.port, g.proc.pid!) },
    { name: "bare", run: () => measure(b.port, b.proc.pid!) },
  ];
  const runs = await interleaved(cases, { rounds: ROUNDS, warmupRounds: WARMUP });
  const base = runs.get("bare")!;
  const lib = runs.get("grpc")!;
  const errors = (rs: Run[]) => String(rs.reduce((a, r) => a + r.errors, 0));
  /** A target's figures beside the bare node:http2 server's of the same rounds. */
  const against = (rs: Run[]) => {
    const ratios = rs.map((r, i) => r.callsPerSec / base[i].callsPerSec);
    return { calls: spread(rs.map((r) => r.callsPerSec)), cpu: spread(rs.map((r) => r.cpuMsPer1k)), ratios, ratio: spread(ratios) };
  };
  const per = new Map([...daemons.keys()].map((n) => [n, against(runs.get(n)!)]));
  const libS = against(lib);
  const bareS = against(base);
  const p = (x: string) => process.stdout.write(x + "\n");
  p(heading("RPC floor: unary grpc.health.v1.Health/Check under load"));
  p(
    `${env.cpu}, ${env.cores} cores, Node ${env.node}; load average at start ${env.loadavgAtStart.map((x) => x.toFixed(2)).join(" ")}, at end ${loadavg()
      .map((x) => x.toFixed(2))
      .join(" ")}`,
  );
  p(`client: ${CLIENT}, ${STREAMS} calls in flight over ${CONNECTIONS} connection(s), ${ROUNDS} round(s) of ${SECONDS} s, interleaved`);
  p(
    table(
      ["target", "calls/s median (min–max)", "server CPU ms / 1000 calls", "errors"],
      [
        ...[...per].map(([n, x]) => [`microvpcd ${n} (grpc-js)`, spr(x.calls), spr(x.cpu, (v) => num(v, 1)), errors(runs.get(n)!)]),
        ["bare @grpc/grpc-js", spr(libS.calls), spr(libS.cpu, (v) => num(v, 1)), errors(lib)],
        ["bare node:http2", spr(bareS.calls), spr(bareS.cpu, (v) => num(v, 1)), errors(base)],
      ],
    ),
  );
  p(`per-round ratios vs bare node:http2:`);
  for (const [n, x] of [...per, ["bare grpc-js", libS] as const]) p(`  ${n.padEnd(12)} ${x.ratios.map((r) => r.toFixed(2)).join(" ")}`);
  p(
    `server CPU per call: grpc-js itself adds ${num(libS.cpu.median - bareS.cpu.median, 1)} µs to node:http2's ${num(bareS.cpu.median, 1)} µs; ` +
      `each daemon (protobuf-es, the adapter, request id, trace scope, metrics, two response headers, health's readiness, ` +
      `and whatever else it runs meanwhile) adds ${[...per].map(([n, x]) => `${n} ${num(x.cpu.median - libS.cpu.median, 1)}`).join(", ")} µs more.`,
  );
  const verdicts: Verdict[] = [...per].map(([n, x]) => ({
    measure: `Health/Check calls/s, ${n} vs bare node:http2`,
    value: `${num(x.calls.median)}/s`,
    baseline: `${num(bareS.calls.median)}/s bare`,
    ratio: x.ratio.median,
    ...check(x.ratio.median, { min: TARGET }),
  }));
  // The library's own ratio: the most any daemon served by grpc-js could reach here.
  const libV: Verdict = {
    measure: "  bare @grpc/grpc-js vs bare node:http2 (info)",
    value: `${num(libS.calls.median)}/s`,
    baseline: `${num(bareS.calls.median)}/s bare`,
    ratio: libS.ratio.median,
    target: "",
  };
  // On a shared machine calls/s follow whoever else runs; CPU per call does not.
  const cpu: Verdict[] = [...per].map(([n, x]) => ({
    measure: `  server CPU per call, bare / ${n} (info)`,
    value: `${num(x.cpu.median, 1)} µs`,
    baseline: `${num(bareS.cpu.median, 1)} µs bare`,
    ratio: bareS.cpu.median / x.cpu.median,
    target: "",
  }));
  p(heading("Verdict"));
  p(verdictTable([...verdicts, libV, ...cpu]));
  const file = resultsFile("rpc");
  writeJson(file, {
    env,
    client: CLIENT,
    rounds: ROUNDS,
    seconds: SECONDS,
    connections: CONNECTIONS,
    streams: STREAMS,
    runs: Object.fromEntries(runs),
    summary: { daemons: Object.fromEntries(per), grpc: libS, bare: bareS },
    verdicts,
    library: libV,
    cpu,
  });
  p(`figures written to ${file}`);
  await stopBare();
  const left = await h!.close();
  const rootDiff = await h!.rootChanges();
  if (left.length) p(`namespaces of the run left: ${left.join(" ")}`);
  if (rootDiff.length) p(`the root namespace changed during the run:\n${rootDiff.join("\n")}`);
  return left.length || rootDiff.length ? 2 : 0;
}

async function stopBare(): Promise<void> {
  for (const p of [bare, bareGrpc]) {
    if (!p || p.exitCode !== null) continue;
    const exited = new Promise((r) => p.once("exit", r));
    p.kill("SIGTERM");
    await exited;
  }
}

/** Also on failure: the bare servers by PID, the daemons, Redis and the run's namespaces (Harness.close is idempotent). */
async function cleanup(): Promise<void> {
  await stopBare();
  await h?.close();
}

runBench(
  () =>
    main().then(
      async (code) => {
        await cleanup();
        return code;
      },
      async (err: unknown) => {
        await cleanup().catch(() => {});
        throw err;
      },
    ),
  () => [...daemons],
);
