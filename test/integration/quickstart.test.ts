// The README's first command, as a user runs it: `up` starts three simulated
// hypervisors joined by the WireGuard overlay and runs the demo, whose key
// lines must hold — cross-host reach through the overlay, isolation between
// two VPCs with the same CIDR, every host's private VMs seen by the internet
// as the NAT gateway's one address, a VPN client (wireguard-go in the
// internet namespace, from the wg-quick file the CLI printed) reaching
// web-1:80 and neither web-1:22 nor the other VPC, the reachability matrix
// with allowed and denied pairs — within a time bound; `down` and Ctrl-C
// leave no namespace (so no interface), no process and no wireguard-go
// socket behind.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "vitest";
import { ROOT } from "../lib/daemon.js";
import { listNetns, waitFor } from "../lib/netns.js";

const SCRIPT = join(ROOT, "deploy", "quickstart.sh");
const RUN = join(ROOT, ".run");
/** What `up` (package check, build, three hypervisors, demo) may take here: "about a minute", with room for a loaded machine. */
const UP_BOUND_MS = 90_000;

function runScript(arg: string, onOutput?: (all: string, child: ReturnType<typeof spawn>) => void): Promise<{ code: number | null; out: string; ms: number }> {
  const t0 = Date.now();
  return new Promise((resolve) => {
    const child = spawn("bash", [SCRIPT, arg], { cwd: ROOT, detached: true, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    const on = (d: Buffer) => {
      out += d;
      onOutput?.(out, child);
    };
    child.stdout!.on("data", on);
    child.stderr!.on("data", on);
    const t = setTimeout(() => process.kill(-child.pid!, "SIGKILL"), 240_000);
    child.on("exit", (code) => {
      clearTimeout(t);
      resolve({ code, out, ms: Date.now() - t0 });
    });
  });
}

const leftovers = async () => (await listNetns()).filter((n) => /^(mvpcqs-|mvpc-qs[23]?-|mvpcvm-qs[23]?-)/.test(n));

/** The VPN client's wireguard-go interface in mvpcqs-inet (deploy/quickstart.sh VPN_IF). */
const VPN_IF = "mvpcqs-laptop";

/**
 * What `up` started, read from its run directory: the daemons' PIDs, and the
 * wireguard-go interfaces and PIDs of the netagents (overlay, VPN endpoint)
 * and of the demo's VPN client.
 */
function started(): { pids: number[]; wg: { ifname: string; pid: number }[] } {
  const pids: number[] = [];
  const wg: { ifname: string; pid: number }[] = [];
  if (!existsSync(RUN)) return { pids, wg };
  for (const f of readdirSync(RUN).filter((x) => x.endsWith(".pid"))) pids.push(Number(readFileSync(join(RUN, f), "utf8").trim()));
  const state = join(RUN, "state");
  for (const host of existsSync(state) ? readdirSync(state) : []) {
    for (const dir of [join(state, host, "wg"), join(state, host, "vpn", "wg")]) {
      for (const f of existsSync(dir) ? readdirSync(dir) : []) {
        const m = /^(wg[0-9a-f]+)\.pid$/.exec(f);
        if (m) wg.push({ ifname: m[1], pid: (JSON.parse(readFileSync(join(dir, f), "utf8")) as { pid: number }).pid });
      }
    }
  }
  const client = join(RUN, "vpn", `${VPN_IF}.pid`);
  if (existsSync(client)) wg.push({ ifname: VPN_IF, pid: Number(readFileSync(client, "utf8").trim()) });
  return { pids, wg };
}

/** Whether pid is a running process (a zombie, ended but not yet reaped by whoever inherited it, is not). */
const alive = (pid: number) => {
  try {
    return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, "utf8"));
  } catch {
    return false;
  }
};

/** Nothing of `up` is left: no namespace, none of the PIDs, no wireguard-go process or socket. */
async function assertNothingLeft(s: ReturnType<typeof started>): Promise<void> {
  assert.deepEqual(await leftovers(), []);
  assert.deepEqual(
    s.pids.filter((p) => p > 0 && alive(p)),
    [],
    "no daemon of up is alive",
  );
  for (const { ifname, pid } of s.wg) {
    assert.ok(!(pid > 0 && alive(pid)), `wireguard-go ${pid} (${ifname}) is gone`);
    assert.ok(!existsSync(`/var/run/wireguard/${ifname}.sock`), `no socket of ${ifname}`);
  }
  assert.ok(!existsSync(RUN), "no state directory");
}

test("quickstart up: three hypervisors, the demo's key lines hold within the bound; down leaves nothing", { timeout: 300_000 }, async () => {
  const up = await runScript("up");
  const tail = up.out.slice(-6000);
  assert.equal(up.code, 0, tail);
  console.log(`quickstart up took ${up.ms} ms`);
  assert.ok(up.ms <= UP_BOUND_MS, `up took ${up.ms} ms, bound ${UP_BOUND_MS} ms`);
  // Host 1 keeps its names, addresses and ports; hosts 2 and 3 are new.
  assert.match(up.out, /hypervisor 1 mvpcqs-host \(qs, uplink 192\.168\.250\.10\): netagent :7402 · firewall :7403 · gateway :7404 · vmm :7405/);
  assert.match(up.out, /hypervisor 2 mvpcqs-host2 \(qs2, uplink 192\.168\.250\.11\): netagent :7412/);
  assert.match(up.out, /hypervisor 3 mvpcqs-host3 \(qs3, uplink 192\.168\.250\.12\): netagent :7422/);
  // The matrix: every check as designed, both allowed and denied pairs.
  assert.equal((up.out.match(/✓ as designed/g) ?? []).length, 13, tail);
  assert.doesNotMatch(up.out, /UNEXPECTED/);
  const counts = /(\d+) allowed, (\d+) denied/.exec(up.out);
  assert.ok(counts && Number(counts[1]) > 0 && Number(counts[2]) > 0, `allowed and denied pairs: ${counts?.[0]}`);
  // Cross-host reach, and traffic on every host's WireGuard interface of the VPC.
  assert.match(up.out, /web-1@qs\s+│ db-1@qs2 10\.0\.2\.\d+:5432\s+│ allowed/);
  assert.match(up.out, /db-1@qs2\s+│ web-1@qs 10\.0\.1\.\d+:80\s+│ allowed/);
  assert.match(up.out, /db-2@qs3\s+│ db-1@qs2 10\.0\.2\.\d+:5432\s+│ denied/);
  for (const id of ["qs", "qs2", "qs3"])
    assert.match(up.out, new RegExp(`│ ${id}\\s+│ 2 peers, [1-9]\\d* B sent, [1-9]\\d* B received`), `${id}'s overlay carried traffic`);
  // Two VPCs with the same CIDR: the other VPC's VM reaches nothing of blog.
  assert.match(up.out, /shop-1@qs \(shop\)\s+│ web-1@qs 10\.0\.1\.\d+:80\s+│ denied/);
  assert.match(up.out, /Overlapping CIDRs: shop-1 \(VPC shop\) is 10\.0\.2\.\d+ and db-\d \(VPC blog\) is 10\.0\.2\.\d+, both in 10\.0\.0\.0\/16/);
  // The NAT gateway's one address, from private VMs on every host.
  const nat = /private VMs on qs, qs2, qs3 leave as one address, the NAT gateway's own (192\.168\.250\.\d+) \(held by (qs[23]?)\)/.exec(up.out);
  assert.ok(nat, tail);
  const last = Number(nat[1].split(".")[3]);
  assert.ok(last >= 128 && last < 192, `${nat[1]} is from the pool`);
  for (const [vm, host] of [
    ["db-1", "qs2"],
    ["db-2", "qs3"],
    ["db-3", "qs"],
  ])
    assert.match(up.out, new RegExp(`│ ${vm}\\s+│ ${host}\\s+│ ${nat[1].replace(/\./g, "\\.")}\\s+│`), `the internet sees ${vm} as ${nat[1]}`);
  assert.match(up.out, /instance-id from 169\.254\.169\.254/);
  // The VPN client: web-1:80 (its group's one port) through the endpoint on qs2; not web-1:22, which web opens to the VPC; not shop.
  assert.match(up.out, /VPN laptop 10\.0\.250\.1\s+│ web-1@qs 10\.0\.1\.\d+:80\s+│ allowed\s+│ ✓/);
  assert.match(up.out, /VPN laptop 10\.0\.250\.1\s+│ web-1@qs 10\.0\.1\.\d+:22\s+│ denied\s+│ ✓/);
  assert.match(up.out, /VPN laptop 10\.0\.250\.1\s+│ shop-1@qs \(shop\) 10\.0\.2\.\d+:80\s+│ denied\s+│ ✓/);
  assert.match(
    up.out,
    /`microvpc vpn client add --vpc blog --name laptop --security-group vpn-web` printed a wg-quick file \(Address 10\.0\.250\.1\/32, AllowedIPs 10\.0\.0\.0\/16, Endpoint 192\.168\.250\.11:51820\); wireguard-go brought it up as mvpcqs-laptop in mvpcqs-inet: peer 192\.168\.250\.11:51820, handshake \d+ s ago, [1-9]\d* B sent, [1-9]\d* B received/,
  );
  assert.match(up.out, /laptop reached web-1:80 on qs through the endpoint on qs2 and the overlay; not web-1:22/);
  const s = started();
  assert.ok(s.wg.length >= 3, `a wireguard-go per VPC and host, blog's on all three (${s.wg.map((w) => w.ifname).join(", ")})`);
  assert.ok(
    s.wg.some((w) => w.ifname === VPN_IF && alive(w.pid)),
    "the VPN client's wireguard-go runs after up",
  );
  assert.ok(existsSync(`/var/run/wireguard/${VPN_IF}.sock`));
  const down = await runScript("down");
  assert.equal(down.code, 0);
  await assertNothingLeft(s);
});

test("Ctrl-C during up leaves nothing behind", { timeout: 300_000 }, async () => {
  let sent = false;
  let s: ReturnType<typeof started> = { pids: [], wg: [] };
  const r = await runScript("up", (out, child) => {
    // Interrupted mid-demo: the VMs, the overlay's, the VPN endpoint's and the VPN client's wireguard-go exist.
    if (!sent && out.includes("VPN client laptop up")) {
      sent = true;
      s = started();
      process.kill(-child.pid!, "SIGINT");
    }
  });
  assert.ok(sent, `the demo was running before the interrupt: ${r.out.slice(-3000)}`);
  assert.notEqual(r.code, 0);
  assert.ok(s.pids.length >= 14, `up had started its processes (${s.pids.length})`);
  assert.ok(
    s.wg.some((w) => w.ifname === VPN_IF),
    "the VPN client was up",
  );
  // up's trap has ended everything when it exits; its last processes may still be reaped (was a fixed 1.5 s).
  await waitFor(
    () =>
      assertNothingLeft(s).then(
        () => true,
        () => false,
      ),
    { timeoutMs: 10_000, intervalMs: 100 },
  );
  await assertNothingLeft(s);
});
