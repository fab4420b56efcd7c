// The `microvpc` CLI's fleet views end to end: two simulated hypervisors
// joined by the WireGuard overlay (harness overlay mode: their netagents
// register in the host registry), and on the first one the firewall,
// gateway and vmm too. The CLI runs as a child process, as an operator runs
// it: host list/get/rotate-key, nic list/stats with counters that move,
// metadata set/get/delete, status --all-hosts, --watch of VMs (a WatchVms
// stream) stopped with Ctrl-C, and completion scripts with resource names.
//
// Safety: the harness builds everything in namespaces carrying the run
// prefix and checks the root namespace; the gateway gets --host-netns, a
// namespace of this run, with --uplink lo inside it.
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll, beforeAll, describe, test } from "vitest";
import { cliEnv, cliRunner } from "../lib/cli.js";
import { ROOT, startDaemon, type Daemon } from "../lib/daemon.js";
import { Harness } from "../lib/harness.js";
import { createNetns, deleteNetns, nsExec, RUN_PREFIX, tempDir, trackChild, waitFor } from "../lib/netns.js";

let h: Harness;
const extra: Partial<Record<"firewall" | "gateway" | "vmm", Daemon>> = {};
let gwNs: string | undefined;
let tmp: string;

function addresses(): string[] {
  const a = ["--server", h.ipamDaemon.address, "--netagent", h.hosts[0].daemon.address];
  if (extra.firewall) a.push("--firewall", extra.firewall.address);
  if (extra.gateway) a.push("--gateway", extra.gateway.address);
  if (extra.vmm) a.push("--vmm", extra.vmm.address);
  return a;
}

const { run, expect, json } = cliRunner(addresses, 60_000);
const BIN = join(ROOT, "bin", "microvpc.js");

const quiet = async (p: Promise<unknown> | undefined) => {
  try {
    await p;
  } catch {
    // best effort
  }
};

beforeAll(async () => {
  tmp = tempDir("clifleet");
  h = await Harness.start({ hosts: 2, overlay: true, agentArgs: ["--reconcile-interval-ms", "2000"] });
  const hv0 = h.hosts[0];
  const r = ["--redis", h.redisUrl];
  gwNs = await createNetns(`${RUN_PREFIX}-flgw`);
  // The metadata server runs inside gwNs, where 127.0.0.1 of the root namespace is out of reach.
  const imdsRedis = await h.redisFrom(gwNs);
  extra.firewall = await h.firewall(hv0, { driftMs: 1000 });
  extra.gateway = await startDaemon("gateway", [...r, "--host-id", hv0.id, "--host-netns", gwNs, "--uplink", "lo", "--imds-redis", imdsRedis]);
  trackChild(extra.gateway.proc);
  extra.vmm = await h.vmm(hv0, { fwd: extra.firewall, gwd: extra.gateway });
  await expect(0, ["vpc", "create", "fleet", "--cidr", "10.70.0.0/16"]);
  await expect(0, ["subnet", "create", "web", "--vpc", "fleet", "--cidr", "10.70.1.0/24"]);
  await expect(0, ["sg", "create", "open", "--vpc", "fleet", "--inbound", "all:all:10.70.0.0/16"]);
}, 180_000);

afterAll(async () => {
  if (extra.vmm) {
    const vms = await run(["vm", "list", "-o", "json"]);
    if (vms.code === 0) for (const v of JSON.parse(vms.stdout).vms) await quiet(run(["vm", "delete", v.id]));
  }
  for (const d of ["vmm", "gateway", "firewall"] as const) await quiet(extra[d]?.stop());
  if (gwNs) await quiet(deleteNetns(gwNs));
  const left = await h?.close();
  assert.deepEqual(left ?? [], [], "every namespace of the run is gone");
}, 120_000);

describe("hosts", () => {
  test("host list shows both registered hypervisors with their key age; host get one of them", async () => {
    const [hv0, hv1] = h.hosts;
    const r = await expect(0, ["host", "list"]);
    assert.match(r.stdout, /KEY AGE/);
    for (const hv of [hv0, hv1]) assert.match(r.stdout, new RegExp(`${hv.id}( \\*)? .*\\d+[smhd] `), `host list row of ${hv.id}:\n${r.stdout}`);
    const list = await json(["host", "list"]);
    assert.deepEqual(
      list.hosts.map((x: { id: string }) => x.id),
      [hv0.id, hv1.id],
    );
    for (const x of list.hosts) {
      assert.equal(typeof x.keyAgeSeconds, "number");
      assert.ok(x.keyAgeSeconds >= 0 && x.keyAgeSeconds < 600, `key age ${x.keyAgeSeconds}`);
      assert.match(x.publicKey, /^[A-Za-z0-9+/]{43}=$/);
    }
    assert.equal(list.hosts[0].self, true);
    assert.match(list.hosts[0].health, /healthy|degraded/);
    assert.match(list.hosts[1].health, /registered/);

    const g = await expect(0, ["host", "get", hv1.id]);
    assert.ok(g.stdout.includes(hv1.id), g.stdout);
    assert.match(g.stdout, /key age/);
    assert.match(g.stdout, /overlay peers/);
    await expect(3, ["host", "get", `${RUN_PREFIX}nohost`]);
  });

  test("host rotate-key gives this host a new key, seen in host get", async () => {
    const before = (await json(["host", "get"])).host;
    const rot = await json(["host", "rotate-key"]);
    assert.equal(rot.previousPublicKey, before.publicKey);
    assert.notEqual(rot.host.publicKey, before.publicKey);
    const after = (await json(["host", "get", h.hosts[0].id])).host;
    assert.equal(after.publicKey, rot.host.publicKey);
    // The other host's view (its own netagent reads the registry) agrees.
    const seen = await expect(0, ["host", "get", h.hosts[0].id, "-o", "json"], ["--server", h.ipamDaemon.address, "--netagent", h.hosts[1].daemon.address]);
    assert.equal(JSON.parse(seen.stdout).host.publicKey, rot.host.publicKey);
    const t = await expect(0, ["host", "rotate-key"]);
    assert.match(t.stdout, /new public key/);
  });

  test("status --all-hosts: a row per registered host, this host's daemons answering", async () => {
    const r = await run(["status", "--all-hosts", "-o", "json"]);
    // The second host's daemons listen on 127.0.0.1, not at its underlay endpoint: unreachable, so exit 6.
    assert.equal(r.code, 6, `${r.stdout}\n${r.stderr}`);
    const s = JSON.parse(r.stdout);
    assert.deepEqual(
      s.hosts.map((x: { hostId: string }) => x.hostId),
      [h.hosts[0].id, h.hosts[1].id],
    );
    const self = s.hosts[0];
    assert.equal(self.self, true);
    for (const d of ["netagent", "firewall", "gateway", "vmm"]) assert.equal(self.daemons[d].status, "serving", `${d}: ${JSON.stringify(self.daemons[d])}`);
    assert.ok(self.daemons.netagent.lastApplyTime, "the netagent's last reconcile");
    assert.equal(s.hosts[1].daemons.netagent.status, "unreachable");
    const t = await run(["status", "--all-hosts"]);
    assert.match(t.stdout, new RegExp(`${h.hosts[0].id} \\*`));
    assert.match(t.stdout, /2 host\(s\)/);
  });
});

describe("NICs", () => {
  test("nic list and nic stats of a real NIC; the counters move after traffic", async () => {
    const vpc = (await json(["vpc", "get", "fleet"])).vpc;
    const subnet = (await json(["subnet", "get", "web", "--vpc", "fleet"])).subnet;
    const a = await h.vm(0, vpc, subnet, "nica");
    const list = await json(["nic", "list", "--vpc", "fleet"]);
    assert.ok(
      list.nics.some((n: { id: string }) => n.id === a.nicId),
      `nic list has ${a.nicId}`,
    );
    const t = await expect(0, ["nic", "list"]);
    assert.ok(t.stdout.includes(a.nicId) && t.stdout.includes(a.address), t.stdout);
    const before = (await json(["nic", "stats", a.nicId])).nics[0];
    assert.equal(before.nicId, a.nicId);
    // Traffic from the VM: the host side receives it whatever the firewall makes of it.
    await nsExec(a.ns, "ping", ["-c", "5", "-i", "0.2", "-W", "1", a.gateway], { check: false, timeoutMs: 15_000 });
    const after = (await json(["nic", "stats", a.nicId])).nics[0];
    assert.ok(BigInt(after.txPackets) >= BigInt(before.txPackets) + 5n, `tx packets ${before.txPackets} -> ${after.txPackets}`);
    assert.ok(BigInt(after.txBytes) > BigInt(before.txBytes));
    const s = await expect(0, ["nic", "stats", "--vpc", "fleet"]);
    assert.match(s.stdout, new RegExp(a.nicId));
    await expect(3, ["nic", "stats", "nic-000000000000"]);
    await h.removeVm(a);
  });
});

describe("instance metadata", () => {
  test("metadata set, get (by id and by address), delete; a get after the delete is NOT_FOUND", async () => {
    const vpc = (await json(["vpc", "get", "fleet"])).vpc;
    const keyFile = join(tmp, "keys.pub");
    writeFileSync(keyFile, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFleetFleetFleetFleetFleetFleetFleetFleetFl op@fleet\n");
    const set = await json([
      "metadata",
      "set",
      "i-fleet1",
      "--vpc",
      "fleet",
      "--subnet",
      "web",
      "--address",
      "10.70.1.77",
      "--mac",
      "02:00:0a:46:01:4d",
      "--hostname",
      "fleet1",
      "--ssh-key",
      keyFile,
      "--label",
      "env=test",
    ]);
    assert.equal(set.created, true);
    assert.equal(set.metadata.vpcId, vpc.id);
    const got = (await json(["metadata", "get", "i-fleet1"])).metadata;
    assert.equal(got.localIpv4, "10.70.1.77");
    assert.equal(got.hostname, "fleet1");
    assert.deepEqual(got.tags, [{ key: "env", value: "test" }]);
    const byAddr = (await json(["metadata", "get", "--vpc", "fleet", "--address", "10.70.1.77"])).metadata;
    assert.equal(byAddr.instanceId, "i-fleet1");
    const table = await expect(0, ["metadata", "get", "i-fleet1"]);
    assert.match(table.stdout, /fleet1/);
    const del = await expect(0, ["metadata", "delete", "i-fleet1"]);
    assert.match(del.stdout, /deleted the metadata of i-fleet1/);
    const again = await expect(0, ["metadata", "delete", "i-fleet1"]);
    assert.match(again.stdout, /has no metadata; nothing to delete/);
    const gone = await expect(3, ["metadata", "get", "i-fleet1"]);
    assert.match(gone.stderr, /^error: .*i-fleet1.*not found.*\(not_found\)$/m);
    assert.equal(gone.stdout, "");
    // The server's validators: a bad MAC is INVALID_ARGUMENT naming the field.
    const bad = await expect(7, ["metadata", "set", "i-fleet2", "--vpc", "fleet", "--address", "10.70.1.78", "--mac", "zz"]);
    assert.match(bad.stderr, /mac/);
  });
});

/** Runs the CLI in the background, collecting stdout lines, for --watch. */
function background(args: string[]) {
  const child = spawn(process.execPath, [BIN, ...addresses(), ...args], { cwd: ROOT, env: cliEnv, stdio: ["ignore", "pipe", "pipe"] });
  trackChild(child);
  const lines: string[] = [];
  let buf = "";
  let stderr = "";
  child.stdout.on("data", (d: Buffer) => {
    buf += d.toString();
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      lines.push(buf.slice(0, i));
      buf = buf.slice(i + 1);
    }
  });
  child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((res) => child.once("exit", (code) => res(code)));
  return { child, lines, exited, stderr: () => stderr };
}

describe("--watch", () => {
  test("vm list --watch -o json prints another client's create within a bound, and stops cleanly on Ctrl-C", async () => {
    const w = background(["vm", "list", "--watch", "-o", "json"]);
    const events = () => w.lines.map((l) => JSON.parse(l) as { type: string; vm?: { name: string; state: string } });
    assert.ok(await waitFor(() => events().some((e) => e.type === "VM_WATCH_EVENT_TYPE_SYNCED"), { timeoutMs: 15_000 }), `no SYNCED: ${w.stderr()}`);
    await expect(0, ["vm", "create", "w1", "--vpc", "fleet", "--subnet", "web", "--sg", "open"]);
    const t0 = Date.now();
    const seen = await waitFor(() => events().some((e) => e.vm?.name === "w1" && e.vm.state === "VM_STATE_RUNNING"), { timeoutMs: 5000 });
    assert.ok(seen, `w1 RUNNING not printed within 5 s of the create: ${JSON.stringify(w.lines)}`);
    assert.ok(Date.now() - t0 < 5000);
    assert.ok(events().some((e) => e.type === "VM_WATCH_EVENT_TYPE_ADDED" && e.vm?.name === "w1"));
    w.child.kill("SIGINT");
    const code = await Promise.race([w.exited, new Promise((r) => setTimeout(() => r("timeout"), 5000))]);
    assert.equal(code, 0, `exit after Ctrl-C: ${String(code)}; stderr: ${w.stderr()}`);
  });

  test("vm get --watch redraws on change and ends by itself when the VM is deleted", async () => {
    const w = background(["vm", "get", "w1", "--vpc", "fleet", "--watch"]);
    assert.ok(await waitFor(() => w.lines.some((l) => /state/.test(l)), { timeoutMs: 15_000 }), `no drawing: ${w.stderr()}`);
    await expect(0, ["vm", "delete", "w1", "--vpc", "fleet"]);
    const code = await Promise.race([w.exited, new Promise((r) => setTimeout(() => r("timeout"), 10_000))]);
    assert.equal(code, 0, `stderr: ${w.stderr()}`);
    assert.ok(
      w.lines.some((l) => /vm w1 \(vm-[0-9a-f]{12}\) was deleted/.test(l)),
      w.lines.join("\n"),
    );
  });

  test("status --watch -o json prints a line per change and stops on SIGTERM", async () => {
    const w = background(["status", "--watch", "--interval", "1", "-o", "json"]);
    assert.ok(await waitFor(() => w.lines.length >= 1, { timeoutMs: 15_000 }), `no status: ${w.stderr()}`);
    const first = JSON.parse(w.lines[0]);
    assert.equal(typeof first.healthy, "boolean");
    assert.equal(typeof first.exitCode, "number");
    w.child.kill("SIGTERM");
    assert.equal(await w.exited, 0, w.stderr());
  });
});

describe("completion", () => {
  test("zsh and fish scripts are valid; bash too; name completion lists a created VPC", async () => {
    for (const shell of ["bash", "zsh", "fish"]) {
      const r = await expect(0, ["completion", shell]);
      const file = join(tmp, `c.${shell}`);
      writeFileSync(file, r.stdout);
      const which = spawnSync("sh", ["-c", `command -v ${shell}`]);
      if (which.status === 0) {
        const n = spawnSync(shell, ["-n", file], { encoding: "utf8" });
        assert.equal(n.status, 0, `${shell} -n: ${n.stderr}`);
      }
      // Structure: the name completion is wired to the hidden command.
      assert.match(r.stdout, /__complete vpc/, shell);
    }
    const names = await expect(0, ["__complete", "vpc"]);
    assert.ok(names.stdout.split("\n").includes("fleet"), names.stdout);
    const subnets = await expect(0, ["__complete", "subnet", "--vpc", "fleet"]);
    assert.deepEqual(subnets.stdout.trim().split("\n"), ["web"]);
    // A daemon that is down: no names, no error.
    const none = await run(["__complete", "vpc"], ["--server", "127.0.0.1:1"]);
    assert.equal(none.code, 0);
    assert.equal(none.stdout, "");
    assert.doesNotMatch((await expect(0, ["--help"])).stdout, /__complete/);
  });
});
