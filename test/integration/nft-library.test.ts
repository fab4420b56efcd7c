// nft transactions in-process (services/common/nft/libnftables.ts, through
// LinuxNft): what lands where. The library switches this thread into the
// target namespace for each run, so the checks a user would make are that
// the rules land in that namespace and nowhere else (the root namespace's
// ruleset and this process's own namespace are the same before and after,
// also after refused scripts and a missing namespace), that a refused
// script leaves nothing half-applied and says what nft said, and that a
// large script still goes through an exec.
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync, readdirSync, readlinkSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, test } from "vitest";
import { conntrackDelete, conntrackList } from "../../services/common/conntrack.js";
import { ExecError } from "../../services/common/exec.js";
import { CONTEXT_IDLE_MS, MAX_INPROCESS_BYTES, forgetNamespace, libnftablesStatus, runInProcess } from "../../services/common/nft/libnftables.js";
import { LinuxNft } from "../../services/common/nft/linux.js";
import { metricsRegistry } from "../../services/common/metrics.js";
import { RUN_PREFIX, createNetns, deleteNetns, goneWithin, links, nsExec, vethBetween, waitFor } from "../lib/netns.js";

const A = `${RUN_PREFIX}-nftlib-a`;
const B = `${RUN_PREFIX}-nftlib-b`;
const nft = new LinuxNft({ inputInError: true });
const rootRuleset = () => execFileSync("nft", ["list", "ruleset"]).toString();
const ownNs = () => readlinkSync("/proc/thread-self/ns/net");
const linkOf = (path: string) => {
  try {
    return readlinkSync(path);
  } catch {
    return "";
  }
};
const tables = async (ns: string) => (await nsExec(ns, "nft", ["list", "tables"])).stdout;

async function metric(name: string, labels: Record<string, string>): Promise<number> {
  const m = (await metricsRegistry.getMetricsAsJSON()).find((x) => x.name === name);
  const v = (m?.values ?? []).find((x) => Object.entries(labels).every(([k, want]) => String((x.labels as Record<string, unknown>)[k]) === want));
  return Number(v?.value ?? 0);
}

let root0 = "";
let self0 = "";

beforeAll(async () => {
  root0 = rootRuleset();
  self0 = ownNs();
  await createNetns(A);
  await createNetns(B);
});

afterAll(async () => {
  await deleteNetns(A).catch(() => {});
  await deleteNetns(B).catch(() => {});
  // Whatever happened above, the root namespace and ours are as they were.
  assert.equal(rootRuleset(), root0);
  assert.equal(ownNs(), self0);
});

describe("libnftables in-process", () => {
  test("the library is loaded here (else every daemon silently pays an exec per transaction)", () => {
    assert.deepEqual(libnftablesStatus(), { available: true, reason: "libnftables.so.1 through koffi" });
  });

  test("a transaction lands in its namespace only, without an exec", async () => {
    const execs0 = await metric("microvpc_exec_total", { command: "ip netns exec nft -f" });
    const lib0 = await metric("microvpc_nft_library_runs_total", { result: "ok" });
    await nft.applyText(A, "add table inet mt\nadd chain inet mt c\nadd rule inet mt c ip saddr 10.9.9.9 drop\n");
    assert.match(await tables(A), /table inet mt/);
    assert.doesNotMatch(await tables(B), /mt/, "the other namespace got nothing");
    assert.equal(rootRuleset(), root0, "the root namespace got nothing");
    assert.equal(ownNs(), self0, "this thread is back in its own namespace");
    assert.equal(await metric("microvpc_exec_total", { command: "ip netns exec nft -f" }), execs0, "no exec");
    assert.equal(await metric("microvpc_nft_library_runs_total", { result: "ok" }), lib0 + 1);
  });

  test("the event loop runs while a transaction is in the kernel (the run is on the nft worker thread)", async () => {
    // ~1 000 elements and their deletion: a few milliseconds of nft and kernel
    // work each (a deletion also waits out an RCU grace period on some
    // kernels), during which a callback queued after the call gets its turn.
    // On the main thread (before the worker) that never happened: the call
    // held the loop until its answer. The answer may still win the race now
    // and then (a fast kernel, the message handled in the same loop turn), so
    // of six transactions at least one must see the callback run first.
    const elems = Array.from({ length: 1000 }, (_, i) => `10.8.${i >> 8}.${i & 255}`).join(", ");
    await nft.applyText(A, `add table inet loop\nadd set inet loop s { type ipv4_addr; }\nadd element inet loop s { ${elems} }\n`);
    let first = 0;
    for (let i = 0; i < 6; i++) {
      const script = i % 2 === 0 ? `delete element inet loop s { ${elems} }\n` : `add element inet loop s { ${elems} }\n`;
      let done = false;
      let ranFirst = false;
      const p = nft.applyText(A, script).then(() => (done = true));
      setImmediate(() => (ranFirst = !done));
      await p;
      await new Promise((r) => setImmediate(r));
      if (ranFirst) first++;
    }
    assert.ok(first >= 1, `a callback queued after the call ran before the transaction's answer (${first} of 6)`);
    const listed = (await nsExec(A, "nft", ["list", "set", "inet", "loop", "s"])).stdout;
    assert.match(listed, /10\.8\.3\.231/, "the last transaction landed");
    assert.equal(ownNs(), self0, "the main thread never left its namespace");
    assert.equal(rootRuleset(), root0);
  });

  test("a namespace's context is kept between runs, and never outlives its namespace", async () => {
    // Kept: closing a context's socket right after a deletion waits for an
    // RCU grace period in the kernel (libnftables.ts, "Contexts"), so four
    // runs in one namespace, deletions among them, open one context.
    const C = `${RUN_PREFIX}-nftlib-c`;
    const E = `${RUN_PREFIX}-nftlib-e`;
    try {
      await createNetns(C);
      await createNetns(E);
      // A device of C's whose other end is in E: it lives exactly as long as C does.
      await vethBetween({ ns: C, name: "c0" }, { ns: E, name: "e0" });
      const opened0 = await metric("microvpc_nft_library_contexts_total", {});
      await nft.applyText(C, "add table inet keep\nadd set inet keep s { type ipv4_addr; }\n");
      await nft.applyText(C, "add element inet keep s { 10.1.1.1, 10.1.1.2 }\n");
      await nft.applyText(C, "delete element inet keep s { 10.1.1.1 }\n");
      await nft.applyText(C, "add element inet keep s { 10.1.1.3 }\n");
      assert.equal(await metric("microvpc_nft_library_contexts_total", {}), opened0 + 1, "one context for the four runs");
      // A child started now (the exec helper, the metadata child, wireguard-go) must not inherit the
      // kept context's socket: it would keep C alive for the child's life.
      const child = spawn("sleep", ["5"], { stdio: "ignore" });
      try {
        // (Descriptors the child opens and closes meanwhile may vanish between the listing and the readlink.)
        const inherited = readdirSync(`/proc/${child.pid}/fd`).filter((fd) => /^socket:/.test(linkOf(`/proc/${child.pid}/fd/${fd}`)));
        assert.deepEqual(inherited, [], "the child holds no socket of ours");
      } finally {
        child.kill("SIGKILL");
      }
      assert.match((await nsExec(C, "nft", ["list", "set", "inet", "keep", "s"])).stdout, /10\.1\.1\.2, 10\.1\.1\.3 \}/);

      // C deleted: the kept socket must not keep it (and the veth) alive. The
      // worker lets go well before CONTEXT_IDLE_MS; without that, e0 stays.
      await deleteNetns(C);
      assert.ok(await goneWithin(E, "e0", CONTEXT_IDLE_MS / 2), "C went with its deletion: its veth's other end is gone");

      // A new C under the same name: the next run opens a context in it, not in the old one.
      await createNetns(C);
      await nft.applyText(C, "add table inet again\n");
      assert.match(await tables(C), /table inet again/, "the run landed in the new namespace");
      assert.equal(await metric("microvpc_nft_library_contexts_total", {}), opened0 + 2);

      // forgetNamespace lets go at once: the next run opens a new one.
      await forgetNamespace(C);
      await nft.applyText(C, "add table inet third\n");
      assert.equal(await metric("microvpc_nft_library_contexts_total", {}), opened0 + 3);
      assert.ok(!(await links(E)).some((l) => l.name === "e0"));
      assert.equal(ownNs(), self0);
      assert.equal(rootRuleset(), root0);
    } finally {
      await deleteNetns(C).catch(() => {});
      await deleteNetns(E).catch(() => {});
    }
  });

  test("conntrack dumps close their sockets (off the event loop: a close can wait out an RCU grace period)", async () => {
    const sockets = () => readdirSync("/proc/self/fd").filter((fd) => /^socket:/.test(linkOf(`/proc/self/fd/${fd}`))).length;
    // A deletion queued for release while the dumps run: the case whose close waits.
    await nft.applyText(A, "add table inet ctclose\nadd set inet ctclose s { type ipv4_addr; }\nadd element inet ctclose s { 10.2.2.2 }\n");
    assert.ok(Array.isArray(await conntrackList(A)), "the library is loaded here");
    const before = sockets();
    for (let i = 0; i < 20; i++) {
      await nft.applyText(A, i % 2 ? "add element inet ctclose s { 10.2.2.2 }\n" : "delete element inet ctclose s { 10.2.2.2 }\n");
      assert.equal(await conntrackDelete(A, () => false), 0);
    }
    assert.ok(await waitFor(() => sockets() <= before, { timeoutMs: 3000, intervalMs: 50 }), `20 dumps' sockets closed (${sockets()} open, ${before} before)`);
    assert.equal(ownNs(), self0);
  });

  test("a signal to the worker mid-run does not fail a transaction the kernel committed (V8's profiler signals every JS thread)", () => {
    // A child daemon-like process under --cpu-prof, sampling every 100 µs:
    // each sample is a SIGPROF to the nft worker thread. nft waits for the
    // kernel's answer in select(), which a signal interrupts; without the
    // signals held for the run, about 1 % of these runs failed with
    // "Interrupted system call" while the kernel had applied them.
    const dir = mkdtempSync(join(tmpdir(), "mvpc-nftsig-"));
    const script = `(async () => {
      const { runInProcess, libnftablesStatus } = await import("./services/common/nft/libnftables.ts");
      const ns = ${JSON.stringify(A)};
      const out = { ok: 0, failed: [] };
      const run = (text) => runInProcess(ns, text + "\\n").then(() => true, (e) => (out.failed.push(String(e.message)), false));
      await run("add table inet sig\\nadd set inet sig s { type ipv4_addr; }");
      for (let i = 0; i < 1000; i++) {
        const a = "10.9." + (i >> 8) + "." + (i & 255);
        if ((await run("add element inet sig s { " + a + " }")) && (await run("delete element inet sig s { " + a + " }"))) out.ok++;
      }
      await run("delete table inet sig");
      // In-process to the end: a worker that failed would have turned every run into an exec.
      out.status = libnftablesStatus();
      console.log(JSON.stringify(out));
      process.exit(0);
    })();`;
    try {
      const res = execFileSync(process.execPath, ["--cpu-prof", "--cpu-prof-interval", "100", "--cpu-prof-dir", dir, "--import", "tsx", "-e", script], {
        timeout: 60_000,
      }).toString();
      const out = JSON.parse(res.trim().split("\n").at(-1)!) as { ok: number; failed: string[]; status: { available: boolean; reason: string } };
      assert.equal(out.status.available, true, `the child ran without the library: ${out.status.reason}`);
      assert.deepEqual(out.failed.slice(0, 3), [], `${out.failed.length} of 2 002 runs failed under the profiler`);
      assert.equal(out.ok, 1000);
      // The profiler did run (its profile is written at exit).
      assert.ok(
        readdirSync(dir).some((f) => f.endsWith(".cpuprofile")),
        "no CPU profile written: the child ran without the profiler",
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test("a refused script is one transaction: nothing of it applies, and the error is nft's own", async () => {
    await assert.rejects(nft.applyText(B, "add table inet half\nadd chain inet half c\nadd rule inet half nochain accept\n"), (err: unknown) => {
      assert.ok(err instanceof ExecError);
      assert.match(err.message, new RegExp(`^ip netns exec ${B} nft -f -: exit code 1: .*No such file or directory`));
      assert.match(err.message, /\(input: add table inet half; /, "inputInError quotes the script");
      return true;
    });
    assert.doesNotMatch(await tables(B), /half/, "the table of the refused transaction is not there");
    assert.equal(ownNs(), self0);
    assert.equal(rootRuleset(), root0);
  });

  test("a namespace that is gone fails as `ip netns exec` does, in our own namespace", async () => {
    await assert.rejects(
      nft.applyText(`${RUN_PREFIX}-nftlib-gone`, "add table inet x\n"),
      /Cannot open network namespace ".*-nftlib-gone": No such file or directory/,
    );
    assert.equal(ownNs(), self0);
    assert.equal(rootRuleset(), root0);
  });

  test("a name that is not a namespace name cannot reach outside /run/netns", async () => {
    for (const bad of ["..", "../../proc/1/ns/net", "a/b", "x".repeat(65)]) {
      await assert.rejects(runInProcess(bad, "add table inet x\n"), /not a network namespace name/);
    }
    assert.equal(rootRuleset(), root0);
  });

  test("a script over the in-process limit is exec'd (it would hold the event loop), with the same effect", async () => {
    const execs0 = await metric("microvpc_exec_total", { command: "ip netns exec nft -f" });
    let big = "add table inet big\nadd chain inet big c\n";
    for (let i = 0; Buffer.byteLength(big) <= MAX_INPROCESS_BYTES; i++)
      big += `add rule inet big c ip saddr 10.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255} drop\n`;
    await nft.applyText(A, big);
    assert.equal(await metric("microvpc_exec_total", { command: "ip netns exec nft -f" }), execs0 + 1);
    const rules = (await nsExec(A, "nft", ["list", "chain", "inet", "big", "c"])).stdout.split("\n").filter((l) => l.includes("drop")).length;
    assert.equal(rules, big.split("\n").filter((l) => l.includes("drop")).length);
    assert.equal(rootRuleset(), root0);
  });

  test("MICROVPC_NFT_EXEC=1 turns the library off (the exec path, as before)", () => {
    const out = execFileSync(
      process.execPath,
      ["--import", "tsx", "-e", 'import("./services/common/nft/libnftables.ts").then((m) => console.log(JSON.stringify(m.libnftablesStatus())))'],
      { env: { ...process.env, MICROVPC_NFT_EXEC: "1" } },
    ).toString();
    assert.deepEqual(JSON.parse(out), { available: false, reason: "MICROVPC_NFT_EXEC=1" });
  });
});
