// services/common/exec.ts, the one way the daemons run commands, with real
// small programs. /bin/sh appears here only as the program under test (to
// print its argv, env and stdin); the adapter itself never uses a shell.
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { closeSync, openSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, test } from "vitest";
import { commandLabel, displayArgv, ExecError, run, runSync, startDaemon } from "../../services/common/exec.js";
import { metricsRegistry } from "../../services/common/metrics.js";

const dir = mkdtempSync(join(tmpdir(), "exec-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

// Prints each argument between < and >, one per line.
const ECHO_ARGS = 'for a in "$@"; do printf "<%s>\\n" "$a"; done';

test("arguments reach the program verbatim: spaces, newlines, quotes and shell syntax are not interpreted", async () => {
  const marker = join(dir, "pwned");
  const args = ["a b", "line1\nline2", "it's", '"q"', "$(touch " + marker + ")", "; touch " + marker, "*", ""];
  const r = await run("/bin/sh", ["-c", ECHO_ARGS, "sh", ...args]);
  assert.equal(r.stdout, args.map((a) => `<${a}>\n`).join(""));
  assert.equal(r.exitCode, 0);
  assert.equal(existsSync(marker), false);
});

test("stdout is kept as printed (final newline included); input is piped to stdin", async () => {
  const r = await run("cat", [], { input: "one\ntwo\n" });
  assert.equal(r.stdout, "one\ntwo\n");
  const big = "x".repeat(1 << 20);
  assert.equal((await run("wc", ["-c"], { input: big })).stdout.trim(), String(big.length));
});

test("LC_ALL=C is set, the rest of the environment is kept", async () => {
  process.env.MICROVPC_EXEC_TEST = "kept";
  try {
    const r = await run("/bin/sh", ["-c", 'printf "%s %s" "$LC_ALL" "$MICROVPC_EXEC_TEST"']);
    assert.equal(r.stdout, "C kept");
  } finally {
    delete process.env.MICROVPC_EXEC_TEST;
  }
});

test("a non-zero exit rejects with an ExecError naming the argv, the exit code and stderr", async () => {
  const err = await run("/bin/sh", ["-c", "echo 'Error: no such device' >&2; echo second line >&2; exit 3", "x y"]).then(
    () => assert.fail("should reject"),
    (e: unknown) => e,
  );
  assert.ok(err instanceof ExecError);
  assert.deepEqual(err.argv, ["/bin/sh", "-c", "echo 'Error: no such device' >&2; echo second line >&2; exit 3", "x y"]);
  assert.equal(err.exitCode, 3);
  assert.equal(err.timedOut, false);
  assert.equal(err.stderr, "Error: no such device\nsecond line\n");
  assert.equal(
    err.message,
    `/bin/sh -c 'echo '\\''Error: no such device'\\'' >&2; echo second line >&2; exit 3' 'x y': exit code 3: Error: no such device | second line`,
  );
});

test("check: false resolves with the exit code and stderr, and the error it would have thrown", async () => {
  const r = await run("/bin/sh", ["-c", "echo out; echo err >&2; exit 2"], { check: false });
  assert.equal(r.exitCode, 2);
  assert.equal(r.stdout, "out\n");
  assert.equal(r.stderr, "err\n");
  assert.ok(r.error instanceof ExecError);
  assert.match(r.error.message, /exit code 2: err$/);
  const ok = await run("true", [], { check: false });
  assert.equal(ok.exitCode, 0);
  assert.equal(ok.error, undefined);
});

test("a missing program: ExecError 'could not start'", async () => {
  await assert.rejects(
    run("/nonexistent/microvpc-no-such-program", ["a"]),
    (e: unknown) => e instanceof ExecError && e.exitCode === undefined && /could not start: .*ENOENT/.test(e.message),
  );
  const r = await run("/nonexistent/microvpc-no-such-program", [], { check: false });
  assert.equal(r.exitCode, undefined);
  assert.match(r.error!.message, /ENOENT/);
});

test("a timeout kills the command and says so", async () => {
  const t0 = Date.now();
  const err = await run("sleep", ["30"], { timeoutMs: 200 }).catch((e: unknown) => e);
  assert.ok(Date.now() - t0 < 5000, `took ${Date.now() - t0} ms`);
  assert.ok(err instanceof ExecError);
  assert.equal(err.timedOut, true);
  assert.equal(err.signal, "SIGTERM");
  assert.match(err.message, /^sleep 30: timed out after 200 ms \(killed with SIGTERM\)/);
  // A command that ignores SIGTERM (exec: no grandchild holding the pipes open): killSignal SIGKILL.
  const r = await run("/bin/sh", ["-c", "trap '' TERM; exec sleep 30"], { timeoutMs: 200, killSignal: "SIGKILL", check: false });
  assert.equal(r.timedOut, true);
  assert.equal(r.signal, "SIGKILL");
  assert.ok(Date.now() - t0 < 10_000, `took ${Date.now() - t0} ms`);
});

test("inputInError quotes the batch's first lines; otherwise input never appears in the error", async () => {
  const secret = "c2VjcmV0LWtleS1tYXRlcmlhbA==";
  const e1 = await run("/bin/sh", ["-c", "cat >/dev/null; exit 1"], { input: secret }).then(
    () => assert.fail("should reject"),
    (e: Error) => e,
  );
  assert.ok(!e1.message.includes(secret) && !JSON.stringify(e1).includes(secret));
  const e2 = await run("/bin/sh", ["-c", "cat >/dev/null; exit 1"], { input: "link add a\nlink add b\n", inputInError: true }).then(
    () => assert.fail("should reject"),
    (e: Error) => e,
  );
  assert.match(e2.message, /\(input: link add a; link add b; \)$/);
});

test('netns runs the command through `ip netns exec` (and "" in our own namespace)', async () => {
  const r = await run("true", [], { netns: "microvpc-test-no-such-ns", check: false });
  assert.deepEqual(r.error?.argv, ["ip", "netns", "exec", "microvpc-test-no-such-ns", "true"]);
  assert.equal((await run("true", [], { netns: "" })).exitCode, 0);
});

test("runSync: the same options and result, for the one synchronous caller", () => {
  assert.equal(runSync("/bin/sh", ["-c", 'printf "%s" "$LC_ALL"']).stdout, "C");
  assert.equal(runSync("/bin/sh", ["-c", "exit 4"], { check: false }).exitCode, 4);
  assert.throws(
    () => runSync("sleep", ["30"], { timeoutMs: 200, killSignal: "SIGKILL" }),
    (e: unknown) => e instanceof ExecError && e.timedOut,
  );
});

test("startDaemon: a long-lived child with stdio to a file, its exit reported; a missing program rejects", async () => {
  const log = join(dir, "daemon.log");
  const fd = openSync(log, "w");
  let d;
  try {
    d = await startDaemon("/bin/sh", ["-c", 'echo "started $LC_ALL $EXTRA"; exec sleep 30'], { stdio: ["ignore", fd, fd], env: { EXTRA: "x" } });
  } finally {
    closeSync(fd);
  }
  assert.ok(d.pid > 0);
  assert.equal(d.proc.exitCode, null);
  for (let i = 0; i < 500 && !readFileSync(log, "utf8"); i++) await new Promise((r) => setTimeout(r, 10));
  d.proc.kill("SIGTERM");
  const r = await d.exited;
  assert.equal(r.signal, "SIGTERM");
  assert.match(r.error!.message, /killed by SIGTERM/);
  assert.equal(readFileSync(log, "utf8"), "started C x\n");
  await assert.rejects(startDaemon("/nonexistent/microvpc-no-such-daemon", []), (e: unknown) => e instanceof ExecError && /could not start/.test(e.message));
});

test("displayArgv: quotes only what a shell would read differently", () => {
  assert.equal(displayArgv(["ip", "-n", "mvpc-h1-abc", "link", "set", "dev", "eth0", "mtu", "1500"]), "ip -n mvpc-h1-abc link set dev eth0 mtu 1500");
  assert.equal(displayArgv(["nft", "-f", "-", "a b", "", "x'y"]), `nft -f - 'a b' '' 'x'\\''y'`);
});

test("commandLabel: program, the subcommand for ip/tc/nft/wg, namespace wrappers as a prefix; never a name", () => {
  const cases: [string, string[], string][] = [
    ["ip", ["-n", "mvpc-h1-0123456789ab", "-batch", "-"], "ip -batch"],
    ["ip", ["-force", "-batch", "-"], "ip -batch"],
    ["ip", ["-n", "mvpc-h1-x", "-j", "-d", "addr", "show", "dev", "br0"], "ip addr"],
    ["ip", ["netns", "add", "mvpcvm-h1-abc"], "ip netns"],
    ["ip", ["-j", "netns", "list"], "ip netns"],
    ["ip", ["netns", "exec", "mvpc-h1-x", "nft", "-f", "-"], "ip netns exec nft -f"],
    ["ip", ["netns", "exec", "mvpc-h1-x", "nft", "-j", "list", "counters"], "ip netns exec nft list"],
    ["ip", ["netns", "exec", "mvpc-h1-x", "conntrack", "-D", "-s", "10.0.0.1"], "ip netns exec conntrack"],
    ["ip", ["netns", "exec", "hv1", "/usr/bin/node", "-e", "x"], "ip netns exec node"],
    ["nsenter", ["--net=/proc/123/ns/net", "ip", "-batch", "-"], "nsenter ip -batch"],
    ["nsenter", ["--net=/run/netns/x", "--", "/usr/bin/qemu-system-x86_64", "-name", "vm"], "nsenter qemu-system-x86_64"],
    ["tc", ["-n", "mvpc-h1-x", "-j", "qdisc", "show"], "tc qdisc"],
    ["tc", ["-n", "mvpc-h1-x", "-batch", "-"], "tc -batch"],
    ["wg", ["show", "wg0123456789abc", "dump"], "wg show"],
    ["wg", ["genkey"], "wg genkey"],
    ["/usr/sbin/wireguard-go", ["-f", "wg0123456789abc"], "wireguard-go"],
    ["ip", ["-V"], "ip"],
    ["ip", ["mvpc-not-a-subcommand-1"], "ip"],
  ];
  for (const [file, args, want] of cases) assert.equal(commandLabel(file, args), want, `${file} ${args.join(" ")}`);
});

test("every command is counted in microvpc_exec_total and timed in microvpc_exec_duration_seconds", async () => {
  const count = async (name: string, command: string) => {
    const m = (await metricsRegistry.getSingleMetric(name)!.get()).values.find(
      (v) => v.labels.command === command && (v.labels.le === undefined || v.labels.le === "+Inf"),
    );
    return m?.value ?? 0;
  };
  const before = await count("microvpc_exec_total", "ip");
  const beforeH = await count("microvpc_exec_duration_seconds", "ip");
  await run("ip", ["-V"]);
  await run("ip", ["-V"], { check: false });
  assert.equal(await count("microvpc_exec_total", "ip"), before + 2);
  assert.equal(await count("microvpc_exec_duration_seconds", "ip"), beforeH + 2);
  const failed = await count("microvpc_exec_total", "false");
  await run("false", [], { check: false });
  assert.equal(await count("microvpc_exec_total", "false"), failed + 1);
  const text = await metricsRegistry.metrics();
  assert.match(text, /^microvpc_exec_total\{command="ip"\} \d+/m);
  assert.match(text, /^microvpc_exec_duration_seconds_bucket\{le="0\.001",command="ip"\} \d+/m);
});
