// deploy/systemd, checked without a running systemd:
// - `systemd-analyze security --offline=yes` scores every microvpc@ unit
//   (the template, plus ipam's drop-in) at 4.0 or better, by systemd's own
//   threshold (skipped, with the reason, where systemd-analyze is missing);
// - the hardening keeps what the daemons need (capabilities, netlink, the
//   devices, writable /proc/sys);
// - readiness: Type=notify, and the daemon's side of it
//   (services/common/sd-notify.ts) runs `systemd-notify --ready` exactly
//   once, when ready, and only under systemd (NOTIFY_SOCKET).
import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { test } from "vitest";
import { NOTIFY_READY, notifyReadyWhen } from "../../services/common/sd-notify.js";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const SYSTEMD = join(ROOT, "deploy", "systemd");
const TEMPLATE = readFileSync(join(SYSTEMD, "microvpc@.service"), "utf8");
const IPAM_DROPIN = readFileSync(join(SYSTEMD, "microvpc@ipam.service.d-override.conf"), "utf8");
const SERVICES = ["ipam", "netagent", "firewall", "gateway", "vmm"];
/** The target: exposure ≤ 4.0, which systemd-analyze's --threshold takes ×10. */
const THRESHOLD = 40;

function which(cmd: string): string | undefined {
  return ["/usr/bin", "/bin", "/usr/local/bin", "/usr/sbin", "/sbin"].map((d) => join(d, cmd)).find((p) => existsSync(p));
}

/** Settings of the [Service] section: name → every value it is given, in order. */
function serviceSettings(unit: string): Map<string, string[]> {
  const out = new Map<string, string[]>();
  let inService = false;
  for (const raw of unit.split("\n")) {
    const line = raw.trim();
    if (line.startsWith("[")) inService = line === "[Service]";
    const m = /^([A-Za-z]+)=(.*)$/.exec(line);
    if (inService && m) out.set(m[1], [...(out.get(m[1]) ?? []), m[2]]);
  }
  return out;
}

function run(file: string, args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number; out: string }> {
  return new Promise((resolve) => {
    execFile(file, args, { env, encoding: "utf8", timeout: 60_000 }, (err, stdout, stderr) =>
      resolve({ code: err ? (typeof err.code === "number" ? err.code : 1) : 0, out: `${stdout}${stderr}` }),
    );
  });
}

test("systemd-analyze security --offline scores every microvpc@ unit at most 4.0", async (t) => {
  const analyze = which("systemd-analyze");
  if (!analyze) return t.skip("systemd-analyze is not installed (Debian package systemd)");
  const version = Number(/systemd (\d+)/.exec((await run(analyze, ["--version"], process.env)).out)?.[1]);
  if (!(version >= 250)) return t.skip(`systemd-analyze ${version} lacks security --offline/--threshold (systemd 250+)`);
  // The units as installed: the template, and ipam's drop-in in its .d folder.
  const dir = mkdtempSync(join(tmpdir(), "mvpc-units-"));
  try {
    writeFileSync(join(dir, "microvpc@.service"), TEMPLATE);
    mkdirSync(join(dir, "microvpc@ipam.service.d"));
    writeFileSync(join(dir, "microvpc@ipam.service.d", "override.conf"), IPAM_DROPIN);
    // The trailing ':' keeps systemd's own unit paths after ours.
    const env = { ...process.env, SYSTEMD_UNIT_PATH: `${dir}:`, SYSTEMD_COLORS: "0", SYSTEMD_PAGER: "" };
    for (const svc of SERVICES) {
      const unit = `microvpc@${svc}.service`;
      const r = await run(analyze, ["security", "--offline=yes", "--no-pager", `--threshold=${THRESHOLD}`, unit], env);
      const m = /Overall exposure level for (\S+): (\d+\.\d)/.exec(r.out);
      assert.ok(m, `${unit}: systemd-analyze printed a score:\n${r.out}`);
      assert.equal(m[1], unit);
      assert.ok(Number(m[2]) <= THRESHOLD / 10, `${unit}: exposure ${m[2]} > ${THRESHOLD / 10}:\n${r.out}`);
      assert.equal(r.code, 0, `${unit}: systemd-analyze --threshold=${THRESHOLD} passes:\n${r.out}`);
      // The drop-in was read: ipam runs as a dynamic user without capabilities.
      if (svc === "ipam") assert.match(r.out, /✓ User=\/DynamicUser=/, "ipam's drop-in applies (DynamicUser)");
      else assert.match(r.out, /✗ User=\/DynamicUser=/, `${unit}: root with capabilities (no drop-in)`);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the hardening keeps what the agents need: capabilities, netlink, /dev/net/tun and /dev/kvm, writable /proc/sys", () => {
  const s = serviceSettings(TEMPLATE);
  const one = (k: string) => {
    const v = s.get(k);
    assert.ok(v, `[Service] sets ${k}`);
    return v.at(-1)!;
  };
  for (const k of ["ProtectClock", "ProtectKernelLogs", "ProtectHostname", "ProtectControlGroups", "LockPersonality", "RestrictRealtime", "RestrictSUIDSGID"])
    assert.equal(one(k), "yes", k);
  assert.equal(one("SystemCallArchitectures"), "native");
  assert.equal(one("UMask"), "0077");
  assert.deepEqual(one("RestrictAddressFamilies").split(/\s+/).sort(), ["AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"], "netlink for ip/nft/tc/wg");
  // Readiness: the daemon's systemd-notify, a child of the main process.
  assert.equal(one("Type"), "notify");
  assert.equal(one("NotifyAccess"), "all", "systemd-notify is a child: its message must be accepted");
  // The capabilities the data plane uses, unchanged.
  for (const k of ["CapabilityBoundingSet", "AmbientCapabilities"])
    for (const cap of ["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_ADMIN"]) assert.ok(one(k).split(/\s+/).includes(cap), `${k} keeps ${cap}`);
  // ip netns add/exec create network and mount namespaces.
  assert.deepEqual(one("RestrictNamespaces").split(/\s+/).sort(), ["mnt", "net"]);
  // Not set: the agents write sysctls, use the host's network and devices.
  for (const k of ["ProtectKernelTunables", "PrivateNetwork", "PrivateDevices", "PrivateUsers", "MemoryDenyWriteExecute", "ProcSubset", "PrivateMounts"])
    assert.equal(s.get(k), undefined, `${k} stays unset: it would take away what the daemons do`);
  // ProtectClock implies a device allow list: the devices TAPs, wireguard-go and guests open are on it.
  const devices = (s.get("DeviceAllow") ?? []).map((d) => d.split(/\s+/)[0]);
  for (const d of ["/dev/net/tun", "/dev/kvm", "/dev/vhost-net"]) assert.ok(devices.includes(d), `DeviceAllow ${d}`);
  // The system-call deny list leaves mount (ip netns), and EPERM instead of a kill.
  const filter = one("SystemCallFilter");
  assert.ok(filter.startsWith("~"), "a deny list");
  assert.ok(!/@mount|@privileged|@system-service/.test(filter), "mount, unshare and setns stay allowed");
  assert.equal(one("SystemCallErrorNumber"), "EPERM");
  // ipam: no capability at all, its own dynamic user.
  const ipam = serviceSettings(IPAM_DROPIN);
  assert.deepEqual(ipam.get("CapabilityBoundingSet"), [""]);
  assert.deepEqual(ipam.get("DynamicUser"), ["yes"]);
});

test("readiness: NOTIFY_SOCKET set → systemd-notify --ready once, after the first ready answer", async () => {
  const calls: [string, string[]][] = [];
  let asked = 0;
  const told = await notifyReadyWhen(async () => ++asked >= 3, {
    env: { NOTIFY_SOCKET: "/run/systemd/notify" },
    exec: async (file, args) => void calls.push([file, args]),
    intervalMs: 5,
  });
  assert.equal(told, true);
  assert.equal(asked, 3, "asked until ready, then no more");
  assert.deepEqual(calls, [["systemd-notify", ["--ready"]]]);
  assert.deepEqual(NOTIFY_READY, ["systemd-notify", ["--ready"]]);
  // A readiness check that throws counts as not ready.
  let n = 0;
  const calls2: string[][] = [];
  await notifyReadyWhen(
    async () => {
      if (++n === 1) throw new Error("redis down");
      return true;
    },
    { env: { NOTIFY_SOCKET: "@x" }, exec: async (_f, a) => void calls2.push(a), intervalMs: 5 },
  );
  assert.deepEqual(calls2, [["--ready"]]);
});

test("readiness: NOTIFY_SOCKET unset → nothing is run; aborted while not ready → nothing is run", async () => {
  const calls: string[] = [];
  let asked = 0;
  const exec = async (file: string) => void calls.push(file);
  assert.equal(await notifyReadyWhen(async () => (++asked, true), { env: {}, exec }), false);
  assert.equal(await notifyReadyWhen(async () => true, { env: { NOTIFY_SOCKET: "" }, exec }), false);
  assert.equal(asked, 0, "not even asked");
  const ac = new AbortController();
  const p = notifyReadyWhen(async () => false, { env: { NOTIFY_SOCKET: "/x" }, exec, intervalMs: 10_000, signal: ac.signal });
  setTimeout(() => ac.abort(), 20);
  assert.equal(await p, false);
  assert.deepEqual(calls, []);
});

test("readiness: the real systemd-notify sends READY=1 to NOTIFY_SOCKET", { timeout: 60_000 }, async (t) => {
  // A datagram socket standing in for systemd (Node has no AF_UNIX datagrams: python3 listens).
  const notify = which("systemd-notify");
  const python = which("python3");
  if (!notify || !python) return t.skip(`needs systemd-notify and python3 (${notify ? "" : "systemd-notify "}${python ? "" : "python3 "}missing)`);
  const dir = mkdtempSync(join(tmpdir(), "mvpc-notify-"));
  const sock = join(dir, "notify");
  const listener = spawn(
    python,
    [
      "-c",
      `import socket,sys
s=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM); s.bind(sys.argv[1]); print("bound",flush=True); s.settimeout(20)
while True:
    m,anc,_,_=s.recvmsg(4096,socket.CMSG_SPACE(64))
    print(m.decode(),flush=True)
    for lvl,typ,data in anc:
        import array,os
        a=array.array('i'); a.frombytes(data[:len(data)-len(data)%4]); [os.close(f) for f in a]
    if m==b"BARRIER=1": break`,
      sock,
    ],
    { stdio: ["ignore", "pipe", "inherit"] },
  );
  // Listened for from the start: the stand-in exits as soon as it has the barrier.
  const exited = new Promise((r) => listener.once("exit", r));
  let out = "";
  listener.stdout.on("data", (d) => (out += d));
  try {
    const deadline = Date.now() + 10_000;
    while (!out.includes("bound") && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    assert.ok(out.includes("bound"), "the stand-in socket is up");
    const saved = process.env.NOTIFY_SOCKET;
    process.env.NOTIFY_SOCKET = sock;
    try {
      assert.equal(await notifyReadyWhen(async () => true), true, "the default exec ran systemd-notify");
    } finally {
      if (saved === undefined) delete process.env.NOTIFY_SOCKET;
      else process.env.NOTIFY_SOCKET = saved;
    }
    await exited;
    assert.match(out, /^READY=1$/m);
  } finally {
    listener.kill();
    rmSync(dir, { recursive: true, force: true });
  }
});
