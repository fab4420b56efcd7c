// An address given to a VM on this host after a VM elsewhere had it: the
// flows a local VM opened to it while it was remote must not reach the new
// VM past its security groups. The firewall's `ct state established accept`
// passed them (a UDP flow kept alive by its sender reached a VM whose group
// admitted nothing: 31 datagrams in 3 s, before the fix); the netagent's NIC
// marks now drop an established flow whose half for a NIC of this host is
// 0 (services/netagent/ct-marks.ts, nic_chk), and the next reconcile pass
// deletes its entry (the rule counted drops), so that the same 5-tuple can
// start again as a new flow the NIC's groups judge. Two hypervisors on the
// WireGuard overlay, each with its firewall; real packets both ways.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { afterAll, beforeAll, describe, test } from "vitest";
import { Direction, FirewallService, Protocol } from "../../gen/microvpc/v1/firewall_pb.js";
import { grpcClient } from "../../services/common/client.js";
import type { Daemon } from "../lib/daemon.js";
import { bindRequest, Harness, type Vm } from "../lib/harness.js";
import { scrape } from "../lib/metrics.js";
import { nsExec, sleep, trackChild, waitFor } from "../lib/netns.js";

let h: Harness;
const fwd: Daemon[] = [];
const fw: ReturnType<typeof grpcClient<typeof FirewallService>>[] = [];

/** A Node one-liner in a namespace, its stdout piped (tracked: ended with the run). */
function nodeIn(ns: string, script: string): { out: () => string; kill: () => void } {
  const p = trackChild(spawn("ip", ["netns", "exec", ns, process.execPath, "-e", script], { stdio: ["ignore", "pipe", "ignore"] }));
  let out = "";
  p.stdout!.on("data", (d) => (out += String(d)));
  return { out: () => out, kill: () => void p.kill("SIGKILL") };
}

const udp = (portFrom: number, portTo: number, cidr: string) => ({
  direction: Direction.INGRESS,
  protocol: Protocol.UDP,
  portFrom,
  portTo,
  peer: { case: "cidr" as const, value: cidr },
});

/** UDP echo servers on these ports; prints the port's last digit per datagram. */
const echoes = (ports: number[]) =>
  `for (const p of [${ports.join(",")}]) { const s=require("dgram").createSocket("udp4"); s.on("message",(m,r)=>{process.stdout.write(String(p%10)); s.send(m,r.port,r.address)}); s.bind(p) }`;

/** Sends to address:port every 100 ms from a fixed source port; prints "e" per echo. */
const sender = (address: string, port: number, sport: number) =>
  `const s=require("dgram").createSocket("udp4");s.bind(${sport});s.on("message",()=>process.stdout.write("e"));setInterval(()=>s.send("x",${port},"${address}"),100);setTimeout(()=>process.exit(0),60000)`;

beforeAll(async () => {
  h = await Harness.start({ hosts: 2, overlay: true });
  for (const i of [0, 1]) {
    const d = await h.firewall(i, { driftMs: 2000 });
    fwd.push(d);
    fw.push(grpcClient(FirewallService, { address: d.address, timeoutMs: 20_000 }));
  }
});

afterAll(async () => {
  for (const d of fwd) await d.stop();
  const left = await h?.close();
  assert.deepEqual(left ?? [], []);
});

describe("an address reused on the host of a VM that had a flow to it", () => {
  test("the old flow's packets reach the new VM neither way; what its group allows does, new and both ways", async () => {
    const vpc = await h.vpc("reuse", "10.77.0.0/16");
    const sn = await h.subnet(vpc, "s", "10.77.1.0/24");
    const group = async (name: string, rules: ReturnType<typeof udp>[]) => (await fw[0].createSecurityGroup({ vpc: vpc.id, name, rules })).securityGroup!.id;
    const open = await group("open", [udp(5000, 5001, "0.0.0.0/0")]);
    const only5001 = await group("only5001", [udp(5001, 5001, "10.77.1.0/24")]);

    // A on hv0 (no group: its egress is open); X on hv1, open to UDP 5000–5001.
    const a: Vm = await h.vm(0, vpc, sn, "a");
    await fw[0].bindNic(bindRequest(a, []));
    const oldX: Vm = await h.vm(1, vpc, sn, "oldx");
    await fw[1].bindNic(bindRequest(oldX, [open]));
    const oldEcho = nodeIn(oldX.ns, echoes([5000]));
    const old = nodeIn(a.ns, sender(oldX.address, 5000, 40000));
    assert.ok(await waitFor(() => old.out().length >= 5, { timeoutMs: 20_000 }), "A's UDP flow to X on hv1 is echoed (the overlay carries it)");

    // X's VM goes (the vmm's teardown: unbind and detach side by side); its address comes back on A's host,
    // for a VM whose group admits UDP 5001 from the subnet and nothing else. A keeps sending on the old flow.
    await Promise.all([fw[1].unbindNic({ nicId: oldX.nicId, detaching: true }), h.removeVm(oldX)]);
    oldEcho.kill();
    const newX: Vm = await h.vm(0, vpc, sn, "newx", { address: oldX.address });
    await fw[0].bindNic(bindRequest(newX, [only5001]));
    const got = nodeIn(newX.ns, echoes([5000, 5001]));
    const echoedBefore = old.out().length;
    const fresh = nodeIn(a.ns, sender(newX.address, 5001, 40001));
    try {
      assert.ok(await waitFor(() => fresh.out().length >= 5, { timeoutMs: 10_000 }), "a new flow A → new X:5001 (its group allows it) is echoed back to A");
      await sleep(2000);
      const olds = (got.out().match(/0/g) ?? []).length;
      const news = (got.out().match(/1/g) ?? []).length;
      console.log(`# address reuse: new X got ${olds} datagrams of A's old flow, ${news} of the new one`);
      assert.ok(news >= 10, `new X receives the allowed flow (${news})`);
      assert.equal(olds, 0, "the old flow's packets do not reach new X (its group admits nothing on 5000)");
      assert.equal(old.out().length, echoedBefore, "nothing of new X comes back on the old flow");
      // The drops are the check's, not the firewall's: its rule counted them.
      const chk = await nsExec(a.vpcNs, "nft", ["list", "chain", "inet", "microvpc_ct", "prerouting"], { check: false });
      assert.match(chk.stdout, /ct original ip daddr @nic_chk counter packets [1-9]\d* bytes \d+ drop/, chk.stdout);

      // The check's count grew, so the next reconcile pass (every 10 s) deletes the old flow's entry (counted as
      // "stale"): A's next datagram on the same 5-tuple is a new flow, which new X's groups judge. Once they admit
      // UDP 5000, it flows, both ways.
      const stale = async () => (await scrape(h.hosts[0].daemon.metricsPort)).get("microvpc_netagent_nic_flows_cleared_total", { when: "stale" }) ?? 0;
      assert.ok(await waitFor(async () => (await stale()) >= 1, { timeoutMs: 15_000, intervalMs: 250 }), "the old flow's entry deleted by a reconcile pass");
      await fw[0].bindNic(bindRequest(newX, [open]));
      const echoedNow = old.out().length;
      assert.ok(
        await waitFor(() => (got.out().match(/0/g) ?? []).length >= 5 && old.out().length >= echoedNow + 5, { timeoutMs: 10_000 }),
        "A's datagrams from the same source port reach new X once its group admits them, and its echoes come back",
      );
    } finally {
      old.kill();
      fresh.kill();
      got.kill();
    }
  });
});
