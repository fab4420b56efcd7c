// The kernel-module path of the overlay interface, against a recording
// kernel and fake commands (these machines have no wireguard module): a
// kernel device is made in the host namespace, given its MTU, moved into the
// VPC namespace and configured with `wg` run inside that namespace; a
// restarted agent adopts it without making another; teardown deletes the
// device (there is no process to end).
import assert from "node:assert/strict";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Redis } from "ioredis";
import { pino } from "pino";
import { afterAll, test } from "vitest";
import { Agent } from "../../services/netagent/agent.js";
import { RecordingKernel, type LinkInfo } from "../../services/netagent/kernel.js";
import { Overlay } from "../../services/netagent/overlay/sync.js";
import { wgName, type WgImpl } from "../../services/netagent/overlay/wg.js";
import { WgKernel, type WgCommands } from "../../services/netagent/overlay/wgkernel.js";
import type { RunOptions, RunResult } from "../../services/common/exec.js";
import { NA_KEYS, type HostStore } from "../../services/netagent/store.js";

const HOST = "hv1";
const VPC = "vpc-aaaaaaaaaaaa";
// A host namespace that does not exist: should the code wrongly take the
// wireguard-go path, `ip netns exec` fails at once and nothing runs.
const HNS = "mtunit-no-such-ns";
const KEY = Buffer.alloc(32, 9).toString("base64");
const dir = mkdtempSync(join(tmpdir(), "ovk-"));
mkdirSync(join(dir, HOST, "wg"), { recursive: true }); // what Overlay.init() makes
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Fake `ip`/`wg`: keeps the links in the recording kernel's state, as the kernel would. */
function fakeCommands(k: RecordingKernel): WgCommands & { log: string[] } {
  let key = "(none)";
  const log: string[] = [];
  const links = (ns: string) => {
    if (!k.linkState.has(ns)) k.linkState.set(ns, []);
    return k.linkState.get(ns)!;
  };
  const result = (stdout: string, exitCode = 0, stderr = ""): RunResult => ({ exitCode, signal: undefined, timedOut: false, stdout, stderr });
  const run = async (file: string, args: string[], o: RunOptions = {}): Promise<RunResult> => {
    const a = args.join(" ");
    if (/^netns exec \S+ wg show \S+ dump$/.test(a)) {
      log.push(`${file} ${a}`);
      return result(`PRIVATE\t${key}\t${key === "(none)" ? 0 : 51820}\toff\n`);
    }
    if (file === "wg" && args[0] === "show") {
      assert.equal(o.check, false, "wg show of a missing device is read with check: false");
      return result("", 1, "Unable to access interface: No such device");
    }
    log.push([file, ...args].join(" "));
    let m: RegExpExecArray | null;
    if ((m = /^-n (\S+) link add (\S+) type wireguard$/.exec(a))) {
      links(m[1]).push({ ifname: m[2], kind: "wireguard", mac: "", mtu: 1420, up: false, addrs: [] } as LinkInfo);
    } else if ((m = /^-n (\S+) link set dev (\S+) mtu (\d+)$/.exec(a))) {
      links(m[1]).find((l) => l.ifname === m![2])!.mtu = Number(m[3]);
    } else if ((m = /^-n (\S+) link set dev (\S+) netns (\S+)$/.exec(a))) {
      const from = links(m[1]);
      const i = from.findIndex((l) => l.ifname === m![2]);
      links(m[3]).push(...from.splice(i, 1));
    } else if ((m = /^netns exec (\S+) wg set (\S+) private-key /.exec(a))) {
      key = KEY;
    } else if (file === "wg" || (file === "ip" && args.includes("wg"))) {
      // other wg calls: accepted
    } else {
      throw new Error(`unexpected command: ${file} ${a}`);
    }
    return result("");
  };
  return { log, run };
}

function overlayWith(k: RecordingKernel, impl: WgImpl): { o: Overlay; cmd: ReturnType<typeof fakeCommands> } {
  const store = {
    load: async () => ({ vpcs: new Map(), subnets: new Map(), nics: new Map() }),
    hasVpc: async () => true,
    keys: NA_KEYS.single,
  } as unknown as HostStore;
  const agent = new Agent(k, store, HOST, pino({ level: "silent" }));
  const cmd = fakeCommands(k);
  const redis = { hdel: async () => 0, xadd: async () => "0-0" } as unknown as Redis;
  const o = new Overlay(agent, redis, { hostId: HOST, hostNetns: HNS, underlayInterface: "ul0", stateDir: dir, commands: cmd }, pino({ level: "silent" }));
  o.impl = impl;
  o.publicKey = KEY;
  o.mtu = 1440;
  return { o, cmd };
}

test("kernel path: made in the host namespace with its MTU, moved into the VPC namespace, configured there; adopted after a restart; torn down without a process", async () => {
  const k = new RecordingKernel();
  const vns = `mvpc-${HOST}-${VPC}`;
  const ifname = wgName(HOST, VPC);
  const first = overlayWith(k, "kernel");
  const r = await first.o.ensureInterface(VPC);
  assert.equal(r.ifname, ifname);
  assert.equal(r.port, 51820);
  const log = first.cmd.log;
  const at = (re: RegExp) => log.findIndex((l) => re.test(l));
  assert.ok(at(new RegExp(`^ip -n ${HNS} link add ${ifname} type wireguard$`)) >= 0, log.join("\n"));
  assert.ok(at(/ link set dev \S+ mtu 1440$/) > at(/ link add /), "MTU before the move");
  assert.ok(at(new RegExp(` link set dev ${ifname} netns ${vns}$`)) > at(/ mtu 1440$/), "then moved");
  assert.ok(at(new RegExp(`^ip netns exec ${vns} wg set ${ifname} private-key `)) > 0, "wg set from inside the VPC namespace (netlink)");
  assert.ok(!log.some((l) => l.includes("wireguard-go")), "no wireguard-go");
  const state = JSON.parse(readFileSync(join(dir, HOST, "wg", `${ifname}.pid`), "utf8")) as Record<string, unknown>;
  assert.deepEqual(state, { pid: 0, vpcId: VPC, impl: "kernel", mtu: 1440 });
  assert.equal(first.o.implementationOf(ifname), "kernel");
  assert.equal((await k.link(vns, ifname))?.kind, "wireguard");

  // A restarted agent — even one told to use wireguard-go now — adopts the
  // running kernel interface: nothing is made or moved again.
  const again = overlayWith(k, "wireguard-go");
  await again.o.ensureInterface(VPC);
  assert.ok(!again.cmd.log.some((l) => / link add | netns mvpc-| wireguard-go/.test(l)), again.cmd.log.join("\n"));
  assert.equal(again.o.implementationOf(ifname), "kernel");

  // Teardown: the device is deleted in the VPC namespace; no PID to end.
  k.calls = [];
  await again.o.teardown(VPC);
  assert.ok(
    k.calls.some((c) => c === `ip -n ${vns} -batch:\n  link del dev ${ifname}`),
    k.calls.join("\n"),
  );
  assert.ok(!existsSync(join(dir, HOST, "wg", `${ifname}.pid`)), "state file removed");
});

test("a new interface takes the host's implementation when the state file names none", async () => {
  const k = new RecordingKernel();
  const { o } = overlayWith(k, "kernel");
  assert.equal(o.implementationOf(wgName(HOST, "vpc-bbbbbbbbbbbb")), "kernel");
  const w = overlayWith(k, "wireguard-go");
  assert.equal(w.o.implementationOf(wgName(HOST, "vpc-bbbbbbbbbbbb")), "wireguard-go");
});

test("--underlay-interface auto: the interface holding the underlay address, else the default route's; none is an empty answer", async () => {
  const calls: string[][] = [];
  const answers: Record<string, string> = {
    "ip -n hns -j addr show": JSON.stringify([
      { ifname: "lo", addr_info: [{ local: "127.0.0.1" }] },
      { ifname: "ens5", addr_info: [{ local: "10.1.2.3" }, { local: "fe80::1" }] },
      { ifname: "bond0", addr_info: [{ local: "192.0.2.7" }] },
    ]),
    "ip -n hns -j route show default": JSON.stringify([{ dst: "default", gateway: "192.0.2.1", dev: "bond0" }]),
    "ip -j route show default": "[]",
    "ip -j addr show": "[]",
  };
  const cmd: WgCommands = {
    run: async (file, args) => {
      calls.push([file, ...args]);
      const out = answers[[file, ...args].join(" ")];
      if (out === undefined) throw new Error(`unexpected ${file} ${args.join(" ")}`);
      return { stdout: out, stderr: "", exitCode: 0 } as Awaited<ReturnType<WgCommands["run"]>>;
    },
  };
  const k = new WgKernel(cmd);
  assert.equal(await k.underlayInterfaceFor("hns", "10.1.2.3"), "ens5", "the address's interface, not the default route's");
  assert.equal(await k.underlayInterfaceFor("hns", undefined), "bond0", "no address: the default route's");
  assert.equal(await k.underlayInterfaceFor("hns", "203.0.113.9"), "bond0", "an address no interface holds: the default route's");
  assert.equal(await k.underlayInterfaceFor("", undefined), "", "nothing to go by");
  assert.ok(
    calls.every((c) => c[0] === "ip"),
    "only ip, as argument arrays",
  );
});
