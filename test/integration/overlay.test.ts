// The WireGuard overlay end to end: three simulated hypervisors (harness
// overlay mode: every netagent runs with --overlay, its wireguard-go
// interfaces start in the hypervisor's host namespace and move into the VPC
// namespace), real Redis, real packets. Needs root. The root namespace is
// only read; the last test checks it did not change. overlay-on-cluster.test.ts
// runs the same on a Redis Cluster, but for Redis going down (one
// redis-server here) and the throughput against a raw tunnel (no Redis in it).
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { Code } from "@connectrpc/connect";
import { afterAll, beforeAll, describe, test } from "vitest";
import type { Subnet } from "../../gen/microvpc/v1/subnet_pb.js";
import type { Vpc } from "../../gen/microvpc/v1/vpc_pb.js";
import { rejectsWith } from "../lib/clients.js";
import { emit } from "../../services/common/events.js";
import { naKeys } from "../../services/netagent/schema.js";
import { interfacesIn, wgName } from "../../services/netagent/overlay/wg.js";
import { WireGuardImplementation } from "../../gen/microvpc/v1/netagent_pb.js";
import { startDaemon } from "../lib/daemon.js";
import { Harness, type Hypervisor, type Vm } from "../lib/harness.js";
import { ON_CLUSTER } from "../lib/on-cluster.js";
import { httpGet, iperf3, ipn, nsExec, ping, run, startHttpServer, tcpConnect, tempDir, trackChild, waitFor } from "../lib/netns.js";

const UNDERLAY_MTU = 1500;
const OVERLAY_MTU = UNDERLAY_MTU - 60;

let h: Harness;
let hv: Hypervisor[];
let vpcA: Vpc;
let vpcB: Vpc;
const a: Vm[] = [];
const b: Vm[] = [];

beforeAll(async () => {
  // wireguard-go's verbose log (its handshakes), which a failed meshUp prints.
  h = await Harness.start({ hosts: 3, overlay: true, agentArgs: ["--reconcile-interval-ms", "2000", "--wireguard-log", "verbose"] });
  hv = h.hosts;
});

afterAll(async () => {
  const names = h ? wgSockets() : [];
  const left = await h?.close();
  assert.deepEqual(left ?? [], [], "every namespace of the run is gone");
  for (const n of names) assert.ok(!existsSync(`/var/run/wireguard/${n}.sock`), `control socket of ${n} removed`);
});

// ---------------------------------------------------------------------------
// helpers

/** The wireguard-go interfaces of this run (from the agents' state directories). */
function wgSockets(): string[] {
  return h.hosts.flatMap((x) => interfacesIn(h.stateDir!, x.id).map((i) => i.ifname));
}

/** A host's WireGuard state directory (the agent's --state-dir/<host>/wg). */
const wgDir = (x: Hypervisor): string => join(h.stateDir!, x.id, "wg");

/**
 * Each host's wireguard-go log for a VPC's interface (--wireguard-log), by
 * the name the netagent gives it, <wg dir>/<wgName(host, VPC)>.log: host
 * id → its text ("" if none).
 */
function wgLogs(vpcId: string): Map<string, string> {
  return new Map(
    h.hosts.map((x) => {
      const log = join(wgDir(x), `${wgName(x.id, vpcId)}.log`);
      return [x.id, existsSync(log) ? readFileSync(log, "utf8") : ""];
    }),
  );
}

async function reaches(from: Vm, to: Vm): Promise<boolean> {
  return (await ping(from.ns, to.address, { count: 2, intervalS: 0.1, deadlineS: 2 })).received > 0;
}

/**
 * Every VM of `vms` pings every other. The default wait is WireGuard's own
 * bound for a first contact, not ours: the peers are configured within a
 * pass (about a second here), but a handshake that crosses one from the
 * other side, or data sent on a session the peer dropped, is retried by
 * wireguard-go only after REKEY_TIMEOUT (5 s), or after KEEPALIVE_TIMEOUT +
 * REKEY_TIMEOUT (15 s) of data without an answer. Seen once in about 20 runs
 * of this file: one direction between two hosts of a new VPC silent for
 * 17 s with both peers configured, then a fresh handshake and no loss since.
 * Convergence times are printed, so a slow one shows.
 */
async function meshUp(vms: Vm[], timeoutMs = 25_000): Promise<boolean> {
  const up = await waitFor(
    async () => {
      for (const x of vms) for (const y of vms) if (x !== y && !(await reaches(x, y))) return false;
      return true;
    },
    { timeoutMs, intervalMs: 300 },
  );
  if (!up) console.log(await meshReport(vms));
  return up;
}

/** What a failed meshUp prints: the pairs that do not reach, and each host's overlay status and member entry for the VPC. */
async function meshReport(vms: Vm[]): Promise<string> {
  const lines: string[] = [];
  for (const x of vms) for (const y of vms) if (x !== y && !(await reaches(x, y))) lines.push(`# mesh: ${x.name} → ${y.name} does not reach`);
  const vpc = vms[0].vpc;
  const r = await h.connectReady();
  try {
    lines.push(`# mesh: members of ${vpc.id}: ${JSON.stringify(await r.hgetall(naKeys(r).overlayMembers(vpc.id)))}`);
  } finally {
    r.disconnect();
  }
  for (const x of hv) {
    const st = (await x.agent.getOverlayStatus({ vpc: vpc.id }).catch((e: Error) => ({ vpcs: [], error: e.message }))) as { vpcs: unknown[] };
    lines.push(`# mesh: ${x.id}: ${JSON.stringify(st, (_k, v: unknown) => (typeof v === "bigint" ? String(v) : v))}`);
  }
  for (const x of hv) lines.push(`# daemon ${x.id}:\n${x.daemon.output()}`);
  for (const [id, log] of wgLogs(vpc.id)) lines.push(`# wireguard-go ${id} (last 40 lines):\n${log.split("\n").slice(-40).join("\n")}`);
  return lines.join("\n");
}

async function peerHosts(x: Hypervisor, vpc: Vpc): Promise<string[]> {
  const st = await x.agent.getOverlayStatus({ vpc: vpc.id });
  return (st.vpcs[0]?.peers ?? []).map((p) => p.hostId).sort();
}

/** IP fragments created so far in a namespace (its IpFragCreates counter). */
async function fragCreates(ns: string): Promise<number> {
  const r = await nsExec(ns, "nstat", ["-a", "-s", "-z", "-j", "IpFragCreates"], { check: false });
  // Without history (-a), nstat reports the absolute counter; -z keeps zero.
  const j = JSON.parse(r.stdout || "{}") as { kernel?: { IpFragCreates?: number } };
  return j.kernel?.IpFragCreates ?? 0;
}

/** ping with DF set and a payload of `size` bytes (IP packet = size + 28). */
async function pingDf(from: Vm, to: string, size: number): Promise<{ code: number; out: string }> {
  const r = await nsExec(from.ns, "ping", ["-n", "-c", "2", "-i", "0.2", "-W", "1", "-w", "3", "-M", "do", "-s", String(size), to], {
    check: false,
    timeoutMs: 10_000,
  });
  return { code: r.code, out: r.stdout + r.stderr };
}

// ---------------------------------------------------------------------------

describe("host registry", () => {
  test("every host registers its public key, endpoint and the derived MTU; the private key stays in a 0600 file", async () => {
    assert.ok(await waitFor(async () => (await hv[0].agent.listHosts({})).hosts.length === 3, { timeoutMs: 5000 }), "three hosts registered");
    const list = await hv[0].agent.listHosts({});
    assert.deepEqual(
      list.hosts.map((x) => x.id),
      hv.map((x) => x.id).sort(),
    );
    for (const x of hv) {
      const { host } = await hv[0].agent.getHost({ ref: x.id });
      assert.match(host!.publicKey, /^[A-Za-z0-9+/]{43}=$/);
      assert.equal(host!.endpoint, x.underlayAddress);
      assert.equal(host!.underlayMtu, UNDERLAY_MTU);
      assert.equal(host!.mtu, OVERLAY_MTU);
      assert.ok(host!.leaseExpireTime, "lease");
      const st = statSync(join(h.stateDir!, x.id, "wg.key"));
      assert.equal(st.mode & 0o777, 0o600, "key file mode");
      assert.ok(!Object.keys(host!).some((k) => /private/i.test(k)), "no private key in the answer");
    }
    const self = await hv[1].agent.getHost({});
    assert.equal(self.host!.id, hv[1].id);
    await rejectsWith(hv[0].agent.getHost({ ref: "nohost" }), Code.NotFound);
    await rejectsWith(hv[0].agent.getHost({ ref: "Bad Host!" }), Code.InvalidArgument);
    await rejectsWith(hv[0].agent.listHosts({ vpc: "vpc-000000000000" }), Code.NotFound);
  });
});

describe("overlay mesh", () => {
  test("VMs of one VPC on three hosts reach each other (same subnet and across subnets); another VPC's VMs reach none of them", async () => {
    vpcA = await h.vpc("ova", "10.50.0.0/16");
    const sA1: Subnet = await h.subnet(vpcA, "s1", "10.50.1.0/24");
    const sA2: Subnet = await h.subnet(vpcA, "s2", "10.50.2.0/24");
    vpcB = await h.vpc("ovb", "10.60.0.0/16");
    const sB1 = await h.subnet(vpcB, "s1", "10.60.1.0/24");
    a.push(await h.vm(0, vpcA, sA1, "a0"), await h.vm(1, vpcA, sA1, "a1"), await h.vm(2, vpcA, sA2, "a2"));
    b.push(await h.vm(0, vpcB, sB1, "b0"), await h.vm(1, vpcB, sB1, "b1"), await h.vm(2, vpcB, sB1, "b2"));
    for (const vm of [...a, ...b]) await startHttpServer(vm.ns, vm.name, 80);
    const t0 = Date.now();
    assert.ok(await meshUp(a), "VPC A: full mesh");
    const convergedMs = Date.now() - t0;
    for (const [id, log] of wgLogs(vpcA.id)) {
      assert.match(log, /handshake/i, `${id}: wireguard-go's verbose log (--wireguard-log verbose) shows its handshakes`);
    }
    for (const x of hv) {
      const d = wgDir(x);
      for (const f of readdirSync(d).filter((f) => f.endsWith(".log"))) assert.equal(statSync(join(d, f)).mode & 0o777, 0o600, `${x.id}: ${f} is 0600`);
    }
    const t1 = Date.now();
    assert.ok(await meshUp(b), "VPC B: full mesh");
    console.log(`# overlay: VPC B mesh converged ${Date.now() - t1} ms after VPC A's`);
    for (const x of a) for (const y of a) if (x !== y) assert.equal(await httpGet(x.ns, `http://${y.address}/`), y.name, `${x.name} → ${y.name} over TCP`);
    // Every pair's probes at once: each keeps its own count and deadline (the reaches() that passed above).
    await Promise.all(
      a.flatMap((x) =>
        b.map(async (y) => {
          const [xy, yx, tcp] = await Promise.all([reaches(x, y), reaches(y, x), tcpConnect(y.ns, x.address, 80, 1000)]);
          assert.ok(!xy, `${x.name} must not reach ${y.name}`);
          assert.ok(!yx, `${y.name} must not reach ${x.name}`);
          assert.notEqual(tcp, "connected", `${y.name} → ${x.name}:80`);
        }),
      ),
    );
    for (const x of hv) {
      assert.deepEqual(
        await peerHosts(x, vpcA),
        hv
          .filter((y) => y !== x)
          .map((y) => y.id)
          .sort(),
        `${x.id}: peers of VPC A`,
      );
      const st = (await x.agent.getOverlayStatus({ vpc: vpcA.id })).vpcs[0];
      assert.equal(st.mtu, OVERLAY_MTU);
      assert.ok(st.interface.length <= 15);
      for (const p of st.peers) {
        assert.equal(p.persistentKeepaliveSeconds, 25);
        assert.ok(p.allowedIps.every((c) => c.endsWith("/32")));
        assert.ok(p.latestHandshakeTime, `${x.id} has a handshake with ${p.hostId}`);
      }
    }
    // Each NIC and bridge runs at the overlay MTU.
    assert.equal(a[0].nic.guest?.mtu, OVERLAY_MTU);
    console.log(`# overlay: VPC A mesh converged ${convergedMs} ms after the last VM was attached`);
  });

  test("the largest packet passes at the derived MTU; one byte more gets an error, not silence", async () => {
    const max = OVERLAY_MTU - 28;
    for (const [x, y] of [
      [a[0], a[1]],
      [a[1], a[2]],
    ]) {
      const ok = await pingDf(x, y.address, max);
      assert.equal(ok.code, 0, `${x.name} → ${y.name} -M do -s ${max}:\n${ok.out}`);
      assert.match(ok.out, /2 received/);
      const big = await pingDf(x, y.address, max + 1);
      assert.notEqual(big.code, 0);
      assert.match(big.out, /message too long|mtu ?= ?1440|Frag needed/i, `an error, not silence:\n${big.out}`);
    }
  });
});

describe("bad input", () => {
  test("malformed registry records of other hosts are skipped and reported; the good hosts still converge and pass traffic", async () => {
    const r = await h.connectReady();
    const K = naKeys(r);
    const good = (await hv[0].agent.getHost({})).host!;
    const base = { mtu: OVERLAY_MTU, underlayMtu: UNDERLAY_MTU, vpcIds: [vpcA.id], registeredMs: Date.now(), keyCreatedMs: Date.now(), agentVersion: "evil" };
    // Each bad host is a member of VPC A with one thing wrong. Keys other
    // than hv0's are valid Curve25519 keys, so only the named field is bad.
    const key = (n: number) => Buffer.alloc(32, n).toString("base64");
    const bad: Record<string, { rec: string; member: string; reason: RegExp }> = {
      [`${h.prefix}badkey`]: {
        rec: JSON.stringify({ ...base, id: `${h.prefix}badkey`, publicKey: "not-a-key", address: "192.168.100.77" }),
        member: JSON.stringify({ port: 51820 }),
        reason: /public key "not-a-key"/,
      },
      [`${h.prefix}badaddr`]: {
        rec: JSON.stringify({ ...base, id: `${h.prefix}badaddr`, publicKey: key(1), address: "192.168.100.78:1 allowed-ips 0.0.0.0/0" }),
        member: JSON.stringify({ port: 51820 }),
        reason: /underlay address .* is not an IPv4 or IPv6 literal/,
      },
      [`${h.prefix}badport`]: {
        rec: JSON.stringify({ ...base, id: `${h.prefix}badport`, publicKey: key(2), address: "192.168.100.79" }),
        member: JSON.stringify({ port: 70000 }),
        reason: /listen port 70000/,
      },
      [`${h.prefix}badjson`]: { rec: "{not json", member: JSON.stringify({ port: 51820 }), reason: /not JSON/ },
    };
    let a3: Vm | undefined;
    try {
      for (const [id, b] of Object.entries(bad)) {
        await r.set(K.overlayHost(id), b.rec, "PX", 120_000);
        await r.sadd(K.hostIndex, id);
        await r.hset(K.overlayMembers(vpcA.id), id, b.member);
      }
      await emit(r, { registry: true }, ["kind", "host.registered", "host", `${h.prefix}badkey`]);
      // A new VM while the bad records are there: the mesh must still converge to it.
      a3 = await h.vm(2, vpcA, a[0].subnet, "a3");
      await startHttpServer(a3.ns, "a3", 80);
      assert.ok(await meshUp([...a, a3], 20_000), "VPC A (with a3) converges despite the bad records");
      for (const x of hv) {
        assert.deepEqual(
          await peerHosts(x, vpcA),
          hv
            .filter((y) => y !== x)
            .map((y) => y.id)
            .sort(),
          `${x.id}: only the good hosts are peers`,
        );
        const st = (await x.agent.getOverlayStatus({ vpc: vpcA.id })).vpcs[0];
        assert.deepEqual(
          st.skippedHosts.map((s) => s.hostId),
          Object.keys(bad).sort(),
          `${x.id} reports every bad host as skipped`,
        );
        for (const s of st.skippedHosts) assert.match(s.reason, bad[s.hostId].reason, `${x.id}: reason for ${s.hostId}`);
        assert.equal(st.implementation, WireGuardImplementation.WIREGUARD_GO, "no kernel module on these machines: wireguard-go");
      }
      const list = await hv[0].agent.listHosts({});
      for (const id of Object.keys(bad).filter((id) => !id.endsWith("badport"))) {
        const e = list.hosts.find((x) => x.id === id);
        assert.ok(e, `ListHosts shows ${id}`);
        assert.match(e.invalidReason, bad[id].reason, `ListHosts: why ${id} is invalid`);
        assert.match((await hv[1].agent.getHost({ ref: id })).host!.invalidReason, bad[id].reason);
      }
      assert.ok(
        list.hosts.filter((x) => hv.some((y) => y.id === x.id)).every((x) => x.invalidReason === ""),
        "good hosts are valid",
      );
      assert.equal(good.invalidReason, "");
      const out = hv.map((x) => x.daemon.output()).join("\n");
      const warned = out.split("\n").filter((l) => l.includes("skipping a malformed host registry entry") && l.includes(`${h.prefix}badkey`));
      assert.ok(warned.length >= 1 && warned.length <= hv.length, `logged once per host, not every sync (${warned.length} lines)`);
    } finally {
      for (const id of Object.keys(bad)) {
        await r.del(K.overlayHost(id));
        await r.srem(K.hostIndex, id);
        await r.hdel(K.overlayMembers(vpcA.id), id);
      }
      r.disconnect();
      if (a3) await h.removeVm(a3);
    }
    for (const x of hv)
      assert.ok(
        await waitFor(async () => (await x.agent.getOverlayStatus({ vpc: vpcA.id })).vpcs[0].skippedHosts.length === 0, { timeoutMs: 5000 }),
        `${x.id}: nothing skipped once the records are gone`,
      );
  });

  test("GetOverlayStatus and GetHost: INVALID_ARGUMENT for a malformed id, NOT_FOUND for an unknown one", async () => {
    await rejectsWith(hv[0].agent.getOverlayStatus({ vpc: "Bad VPC!" }), Code.InvalidArgument);
    await rejectsWith(hv[0].agent.getOverlayStatus({ vpc: "vpc-000000000000" }), Code.NotFound);
    await rejectsWith(hv[0].agent.getOverlayStatus({ vpc: "nosuchvpc" }), Code.NotFound);
    await rejectsWith(hv[0].agent.getHost({ ref: "Bad Host!" }), Code.InvalidArgument);
    await rejectsWith(hv[0].agent.getHost({ ref: `${h.prefix}nohost` }), Code.NotFound);
  });

  test("malformed overlay flags stop the daemon at start with a message a person can act on", async () => {
    const cases: [string[], RegExp][] = [
      [["--underlay-address", "hv0.example"], /--underlay-address "hv0.example" is not an IPv4 or IPv6 literal: give this host's IPv4 or IPv6 address/],
      [["--underlay-address", "0.0.0.0"], /--underlay-address "0.0.0.0" is the unspecified address, not a host's/],
      [["--underlay-interface", "ul0;reboot"], /--underlay-interface "ul0;reboot": not an interface name/],
      [["--underlay-interface", "nosuchdev"], /--underlay-interface nosuchdev: no such device in namespace/],
      [["--wireguard", "boringtun"], /--wireguard "boringtun": use one of auto, kernel, wireguard-go/],
      [["--wireguard-log", "loud"], /--wireguard-log "loud": use one of off, error, verbose/],
    ];
    // Where the module is missing (as here), asking for it must fail at start, not fall back silently.
    if (!existsSync("/sys/module/wireguard")) cases.push([["--wireguard", "kernel"], /--wireguard kernel: cannot create a kernel WireGuard device/]);
    const state = tempDir("badflags");
    for (const [flags, want] of cases) {
      const args = [
        "--redis",
        h.redisUrl,
        "--host-id",
        `${h.prefix}flags`,
        "--overlay",
        "--host-netns",
        hv[0].ns,
        "--underlay-interface",
        "ul0",
        "--state-dir",
        state,
        ...flags,
      ];
      await assert.rejects(startDaemon("netagent", args), (err: Error) => {
        assert.match(err.message, /exited with [1-9]/, flags.join(" "));
        // The log line is JSON: read its quotes back.
        assert.match(err.message.replaceAll('\\"', '"'), want, flags.join(" "));
        return true;
      });
    }
  });
});

describe("key rotation", () => {
  test("RotateHostKey during a TCP stream: the stream survives and peers pick up the new key", async () => {
    const before = (await hv[0].agent.getHost({})).host!.publicKey;
    const stream = iperf3(a[1].ns, a[0].ns, a[0].address, { seconds: 8 });
    await new Promise((r) => setTimeout(r, 2500));
    const t0 = Date.now();
    const rot = await hv[0].agent.rotateHostKey({ waitForPeers: true, waitTimeoutSeconds: 10 });
    const rotMs = Date.now() - t0;
    assert.equal(rot.previousPublicKey, before);
    assert.notEqual(rot.host!.publicKey, before);
    const res = await stream;
    assert.ok(res.gbps > 0, "the stream completed");
    const newKey = rot.host!.publicKey;
    for (const x of [hv[1], hv[2]]) {
      const ok = await waitFor(
        async () => (await x.agent.getOverlayStatus({ vpc: vpcA.id })).vpcs[0].peers.some((p) => p.hostId === hv[0].id && p.publicKey === newKey),
        { timeoutMs: 5000 },
      );
      assert.ok(ok, `${x.id} uses hv0's new key`);
    }
    assert.ok(await meshUp(a, 10_000), "mesh after rotation");
    console.log(
      `# overlay: rotation answered in ${rotMs} ms (updated ${rot.peersUpdated.join(",")}; pending ${rot.peersPending.join(",") || "none"}); iperf3 across it ${res.gbps.toFixed(3)} Gbit/s, ${res.retransmits} retransmits`,
    );
  });
});

describe("hosts leaving and coming back", () => {
  test("a stopped host drops out of every peer list; back with a new key, traffic resumes", async () => {
    const gone = hv[2];
    const oldKey = (await hv[0].agent.getHost({ ref: gone.id })).host!.publicKey;
    await gone.stop();
    for (const x of [hv[0], hv[1]]) {
      const ok = await waitFor(async () => !(await peerHosts(x, vpcA)).includes(gone.id), { timeoutMs: 5000 });
      assert.ok(ok, `${x.id} removed ${gone.id}`);
    }
    await rejectsWith(hv[0].agent.getHost({ ref: gone.id }), Code.NotFound);
    assert.ok(!(await reaches(a[0], a[2])), "no path to a host that left");
    rmSync(join(h.stateDir!, gone.id, "wg.key"));
    await gone.start();
    assert.ok(
      await waitFor(async () => (await hv[0].agent.listHosts({})).hosts.some((x) => x.id === gone.id), { timeoutMs: 5000 }),
      `${gone.id} registered again`,
    );
    const { host } = await hv[0].agent.getHost({ ref: gone.id });
    assert.notEqual(host!.publicKey, oldKey, "a new key after the key file was deleted");
    // Its record lists the VPCs it holds once its first pass has read them (start() returns then), not at the
    // next lease renewal 5 s later (which is how it was: ListHosts showed a returned host with no VPCs).
    const vpcsListed = async () => {
      const ids = (await hv[0].agent.getHost({ ref: gone.id })).host?.vpcIds ?? [];
      return ids.includes(vpcA.id) && ids.includes(vpcB.id);
    };
    assert.ok(await waitFor(vpcsListed, { timeoutMs: 1000, intervalMs: 50 }), `${gone.id}'s record lists ${vpcA.id} and ${vpcB.id} within 1 s of its start`);
    assert.ok(await meshUp(a, 15_000), "mesh with the returned host");
    assert.ok(await meshUp(b, 15_000), "VPC B too");
  });

  test("a crashed host (SIGKILL) keeps forwarding, drops out when its lease expires, and rejoins with the same interface", async () => {
    const dead = hv[1];
    const port = (await dead.agent.getOverlayStatus({ vpc: vpcA.id })).vpcs[0].listenPort;
    await dead.kill();
    const t0 = Date.now();
    assert.ok(await reaches(a[0], a[1]), "forwarding continues while the agent is down");
    for (const x of [hv[0], hv[2]]) {
      const ok = await waitFor(async () => !(await peerHosts(x, vpcA)).includes(dead.id), { timeoutMs: 25_000, intervalMs: 500 });
      assert.ok(ok, `${x.id} removed ${dead.id} after its lease`);
    }
    console.log(`# overlay: crashed host removed ${Date.now() - t0} ms after SIGKILL (lease 15 s)`);
    await dead.start();
    assert.ok(await meshUp(a, 15_000), "mesh after the crashed host returned");
    assert.equal((await dead.agent.getOverlayStatus({ vpc: vpcA.id })).vpcs[0]?.listenPort, port, "the running wireguard-go was adopted");
  });

  test.skipIf(ON_CLUSTER)("while Redis is down (longer than a lease) the mesh keeps forwarding, and it stays after Redis returns", async () => {
    await h.redis.kill();
    try {
      const deadline = Date.now() + 17_000;
      for (let i = 0; i < 100 && Date.now() < deadline; i++) {
        assert.ok(await reaches(a[0], a[2]), "a0 → a2 with Redis down");
        assert.ok(await reaches(a[1], a[0]), "a1 → a0 with Redis down");
        await new Promise((r) => setTimeout(r, 1000));
      }
      // The outage is visible: the VPC's overlay says its registry was not read, and the host is degraded.
      // (Every VPC's, by no name: naming one would have it looked up in Redis.)
      const st = (await hv[0].agent.getOverlayStatus({})).vpcs.find((v) => v.vpcId === vpcA.id)!;
      assert.match(st.syncError, /host registry not read, the peers applied before kept/);
      assert.equal(st.peers.length, 2, "the peers applied before are kept");
      const hs = await hv[0].agent.getHostStatus({});
      assert.ok(
        hs.errors.some((e) => e.message.startsWith("overlay: ")),
        JSON.stringify(hs.errors),
      );
    } finally {
      await h.redis.restart();
    }
    // Right after Redis returns every lease has expired; nobody drops anybody.
    for (let i = 0; i < 8; i++) {
      assert.ok(await reaches(a[0], a[2]), "a0 → a2 after Redis returned");
      await new Promise((r) => setTimeout(r, 500));
    }
    assert.ok(await waitFor(async () => (await hv[0].agent.listHosts({})).hosts.length === 3, { timeoutMs: 5000 }), "every host registered again");
    assert.ok(await meshUp(a, 10_000));
    assert.ok(
      await waitFor(async () => (await hv[0].agent.getOverlayStatus({ vpc: vpcA.id })).vpcs[0].syncError === "", { timeoutMs: 5000 }),
      "the sync error is gone once the registry is read again",
    );
  });
});

describe("VPC removal", () => {
  test("DeleteVpc ends that VPC's wireguard-go and removes its control socket; the others drop the host", async () => {
    const x = hv[2];
    const st = (await x.agent.getOverlayStatus({ vpc: vpcB.id })).vpcs[0];
    assert.ok(existsSync(`/var/run/wireguard/${st.interface}.sock`));
    await h.removeVm(b[2]);
    await x.agent.deleteVpc({ vpc: vpcB.id, force: true });
    assert.ok(!existsSync(`/var/run/wireguard/${st.interface}.sock`), "socket removed");
    for (const y of [hv[0], hv[1]]) {
      const ok = await waitFor(async () => !(await peerHosts(y, vpcB)).includes(x.id), { timeoutMs: 5000 });
      assert.ok(ok, `${y.id} dropped ${x.id} from VPC B`);
    }
    assert.ok(await reaches(b[0], b[1]), "the rest of VPC B still works");
  });
});

describe("throughput", () => {
  test.skipIf(ON_CLUSTER)("overlay VM↔VM TCP vs a raw wireguard-go tunnel between the same two host namespaces", async (t) => {
    // The raw tunnel: one wireguard-go per host namespace, names unique to the run.
    const dir = tempDir("rawwg");
    const ends = [hv[0], hv[1]].map((x, i) => ({ x, name: `${h.prefix}raw${i}`, addr: `10.255.0.${i + 1}`, key: join(dir, `k${i}`), pub: "" }));
    const procs: ReturnType<typeof spawn>[] = [];
    try {
      for (const e of ends) {
        const child = trackChild(
          spawn("ip", ["netns", "exec", e.x.ns, "wireguard-go", "-f", e.name], { stdio: "ignore", env: { ...process.env, WG_PROCESS_FOREGROUND: "1" } }),
        );
        assert.ok(await waitFor(() => existsSync(`/var/run/wireguard/${e.name}.sock`), { timeoutMs: 3000, intervalMs: 20 }), `${e.name} started`);
        procs.push(child);
        writeFileSync(e.key, (await run("wg", ["genkey"])).stdout, { mode: 0o600 });
        e.pub = (await run("wg", ["pubkey"], { input: readFileSync(e.key, "utf8") })).stdout.trim();
      }
      for (const [i, e] of ends.entries()) {
        const o = ends[1 - i];
        await run("wg", [
          "set",
          e.name,
          "private-key",
          e.key,
          "listen-port",
          String(51900 + i),
          "peer",
          o.pub,
          "endpoint",
          `${o.x.underlayAddress}:${51900 + 1 - i}`,
          "allowed-ips",
          `${o.addr}/32`,
        ]);
        await ipn(e.x.ns, ["addr", "add", `${e.addr}/24`, "dev", e.name]);
        await ipn(e.x.ns, ["link", "set", e.name, "mtu", String(OVERLAY_MTU), "up"]);
      }
      const raw: number[] = [];
      const ovl: number[] = [];
      const frags0 = await fragCreates(hv[0].ns);
      for (let i = 0; i < 3; i++) {
        raw.push((await iperf3(ends[0].x.ns, ends[1].x.ns, ends[1].addr, { seconds: 3 })).gbps);
        ovl.push((await iperf3(a[0].ns, a[1].ns, a[1].address, { seconds: 3 })).gbps);
      }
      // wireguard-go pads packets up to the MTU it knows; if it did not learn
      // the interface's MTU, every full-size packet is fragmented here.
      assert.equal((await fragCreates(hv[0].ns)) - frags0, 0, "no IP fragments made on the sender's underlay");
      // The receiving interface hands each decrypted packet to RPS (another CPU forwards it).
      const st = (await hv[1].agent.getOverlayStatus({ vpc: vpcA.id })).vpcs[0];
      const rps = await nsExec(a[1].vpcNs, "cat", [`/sys/class/net/${st.interface}/queues/rx-0/rps_cpus`]);
      assert.notEqual(Number.parseInt(rps.stdout.replaceAll(",", "").trim(), 16), 0, `RPS on ${st.interface}`);
      const med = (v: number[]) => [...v].sort((p, q) => p - q)[Math.floor(v.length / 2)];
      const msg = `raw wireguard-go tunnel ${med(raw).toFixed(3)} Gbit/s (${raw.map((v) => v.toFixed(3)).join(", ")}); overlay VM↔VM ${med(ovl).toFixed(3)} Gbit/s (${ovl.map((v) => v.toFixed(3)).join(", ")}); ratio ${((100 * med(ovl)) / med(raw)).toFixed(0)}%`;
      await t.annotate(msg);
      console.log(`# overlay: ${msg}`);
      assert.ok(med(ovl) > 0);
    } finally {
      for (const p of procs) p.kill("SIGKILL");
      for (const e of ends) {
        await ipn(e.x.ns, ["link", "del", e.name], { check: false });
        rmSync(`/var/run/wireguard/${e.name}.sock`, { force: true });
      }
    }
  });
});

describe("root namespace", () => {
  test("was not changed", async () => {
    assert.deepEqual(await h.rootChanges(), []);
  });
});
