// `microvpc status`: the state of one hypervisor (--host, or each daemon's
// own address): which daemons are up (grpc.health.v1), the netagent's host
// status and NICs, the firewall's health, the gateway's NAT gateways and
// floating IPs, the WireGuard overlay, the VMs. Exit 0 only when every
// daemon serves and reports itself healthy.
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { Option, type Command } from "commander";
import { Health, HealthCheckResponse_ServingStatus } from "../../gen/grpc/health/v1/health_pb.js";
import { FirewallHealth, FirewallService, GetFirewallStatusResponseSchema, type GetFirewallStatusResponse } from "../../gen/microvpc/v1/firewall_pb.js";
import { GatewayHealth, GatewayService, GetGatewayStatusResponseSchema, type GetGatewayStatusResponse } from "../../gen/microvpc/v1/gateway_pb.js";
import {
  DatapathSchema,
  GetHostStatusResponseSchema,
  GetOverlayStatusResponseSchema,
  HostHealth,
  HostHealthSchema,
  NetAgentService,
  NicSchema,
  NicKindSchema,
  WireguardBackendSchema,
  WireGuardImplementation,
  type GetHostStatusResponse,
  type GetOverlayStatusResponse,
  type Nic,
} from "../../gen/microvpc/v1/netagent_pb.js";
import { ResourceStateSchema } from "../../gen/microvpc/v1/common_pb.js";
import { VmService, VmStateSchema, type Vm } from "../../gen/microvpc/v1/vm_pb.js";
import { address, client, DAEMON_NAMES, globals, timeoutGiven, type Daemon } from "../lib/context.js";
import { EXIT, ExitCode, isConnRefused } from "../lib/errors.js";
import { emitValue, someDetails, enumLabel, msgJson, table, time } from "../lib/output.js";
import { integer } from "../lib/options.js";
import { collect } from "../lib/paging.js";
import { STATUS_MODES_HELP, statusModes, type StatusModes } from "./status-fleet.js";

export type Outcome<T> = { ok: true; value: T } | { ok: false; unimplemented: boolean; unavailable: boolean; error: string };

async function attempt<T>(p: Promise<T>): Promise<Outcome<T>> {
  try {
    return { ok: true, value: await p };
  } catch (e) {
    const c = e instanceof ConnectError ? e : undefined;
    const unavailable = c?.code === Code.Unavailable || c?.code === Code.DeadlineExceeded;
    let error = c ? c.rawMessage : e instanceof Error ? e.message : String(e);
    if (c && isConnRefused(c)) error = "connection refused";
    return { ok: false, unimplemented: c?.code === Code.Unimplemented, unavailable, error };
  }
}

function ago(t: Timestamp | undefined, now = Date.now()): string {
  if (!t) return "never";
  const s = Math.max(0, Math.round((now - timestampDate(t).getTime()) / 1000));
  return s < 120 ? `${s}s ago` : s < 7200 ? `${Math.round(s / 60)}m ago` : `${Math.round(s / 3600)}h ago`;
}

interface ServiceState {
  daemon: Daemon;
  address: string;
  status: "serving" | "not-serving" | "unreachable" | "error";
  error?: string;
}

export function register(program: Command): void {
  program
    .command("status")
    .description("state of a hypervisor: daemons up, NICs, firewall health, NAT and floating IPs, WireGuard peers (exit 0 only if all healthy)")
    .addHelpText(
      "after",
      `
Which hypervisor: --host ADDR (global; every daemon at ADDR and its port), or
each daemon's own option. Exit codes: 0 every daemon serves and is healthy;
6 a daemon is unreachable or not serving; 1 all answer but one reports itself
degraded (the output says which and why).`,
    )
    .addHelpText("after", STATUS_MODES_HELP)
    .option("--all-hosts", "one row per registered hypervisor (netagent ListHosts): its daemons' health and last apply")
    .option("--watch", "redraw when the state changes, until Ctrl-C (-o json: one line per change); see below")
    .addOption(new Option("--interval <seconds>", "with --watch: also re-check this often, 1–3600").argParser(integer(1, 3600)).default(5))
    .action((o: StatusModes, cmd: Command) => statusModes(cmd, o, () => hostStatus(cmd)));
}

/** One hypervisor's status, printed; throws ExitCode unless healthy. */
async function hostStatus(cmd: Command): Promise<void> {
  // A status check should answer fast even when a daemon hangs.
  const callOpts = { timeoutMs: timeoutGiven(cmd) ? globals(cmd).timeoutMs! : 5000 };
  const health = await Promise.all(
    DAEMON_NAMES.map(async (d): Promise<ServiceState> => {
      const r = await attempt(client(cmd, Health, d).check({ service: "" }, callOpts));
      const addr = address(cmd, d);
      if (r.ok) return { daemon: d, address: addr, status: r.value.status === HealthCheckResponse_ServingStatus.SERVING ? "serving" : "not-serving" };
      return { daemon: d, address: addr, status: r.unavailable ? "unreachable" : "error", error: r.error };
    }),
  );
  const up = (d: Daemon) => health.find((h) => h.daemon === d)!.status === "serving";
  const skip = <T>(d: Daemon, p: () => Promise<T>): Promise<Outcome<T> | undefined> => (up(d) ? attempt(p()) : Promise.resolve(undefined));

  const na = client(cmd, NetAgentService);
  const gw = client(cmd, GatewayService);
  const [host, nics, overlay, fw, nats, fips, vms, gws] = await Promise.all([
    skip("netagent", () => na.getHostStatus({}, callOpts)),
    skip("netagent", () =>
      collect(undefined, async (pageSize, pageToken) => {
        const r = await na.listNics({ pageSize, pageToken }, callOpts);
        return { items: r.nics, next: r.nextPageToken };
      })),
    skip("netagent", () => na.getOverlayStatus({}, callOpts)),
    skip("firewall", () => client(cmd, FirewallService).getFirewallStatus({ pageSize: 1 }, callOpts)),
    skip("gateway", () =>
      collect(undefined, async (pageSize, pageToken) => {
        const r = await gw.listNatGateways({ pageSize, pageToken }, callOpts);
        return { items: r.natGateways, next: r.nextPageToken };
      })),
    skip("gateway", async () => {
      let pool: string[] = [];
      let poolFree = 0;
      const all = await collect(undefined, async (pageSize, pageToken) => {
        const r = await gw.listFloatingIps({ pageSize, pageToken }, callOpts);
        pool = r.pool;
        poolFree = r.poolFree;
        return { items: r.floatingIps, next: r.nextPageToken };
      });
      return { count: all.items.length, associated: all.items.filter((f) => f.privateAddress).length, pool, poolFree };
    }),
    skip("vmm", () =>
      collect(undefined, async (pageSize, pageToken) => {
        const r = await client(cmd, VmService).listVms({ pageSize, pageToken }, callOpts);
        return { items: r.vms, next: r.nextPageToken };
      })),
    skip("gateway", () => gw.getGatewayStatus({}, callOpts)),
  ]);

  // What is wrong, and how wrong: unreachable beats degraded.
  const problems: string[] = [];
  let code: number = EXIT.ok;
  for (const h of health) {
    if (h.status !== "serving") {
      problems.push(`${h.daemon} at ${h.address}: ${h.status}${h.error ? ` (${h.error})` : ""}`);
      code = EXIT.unavailable;
    }
  }
  const degrade = (what: string) => {
    problems.push(what);
    if (code === EXIT.ok) code = EXIT.error;
  };
  const failed = (name: string, r: Outcome<unknown> | undefined, optional = false) => {
    if (r && !r.ok && !(optional && r.unimplemented)) degrade(`${name}: ${r.error}`);
  };
  failed("netagent GetHostStatus", host);
  failed("netagent ListNics", nics);
  failed("netagent GetOverlayStatus", overlay, true);
  failed("firewall GetFirewallStatus", fw);
  failed("gateway ListNatGateways", nats);
  failed("gateway ListFloatingIps", fips);
  failed("vmm ListVms", vms, true);
  failed("gateway GetGatewayStatus", gws, true);
  const hs = host?.ok ? host.value : undefined;
  if (hs && hs.invalidRecords.length) degrade(`netagent: ${hs.invalidRecords.length} invalid record(s) in Redis skipped (see "invalid records")`);
  if (hs && hs.health !== HostHealth.HEALTHY)
    degrade(`netagent: ${enumLabel(HostHealthSchema, hs.health)}${hs.errors[0] ? `: ${hs.errors[0].operation}: ${hs.errors[0].message}` : ""}`);
  const gs = gws?.ok ? gws.value : undefined;
  if (gs && gs.invalidRecordCount) degrade(`gateway: ${gs.invalidRecordCount} invalid record(s) in Redis skipped (see "skipped")`);
  const fs = fw?.ok ? fw.value : undefined;
  if (fs && fs.health !== FirewallHealth.HEALTHY) degrade(`firewall: degraded${fs.lastError ? `: ${fs.lastError}` : ""}`);

  const unavailableText = (r: Outcome<unknown> | undefined, d: Daemon) =>
    r === undefined
      ? "skipped (the daemon is not serving)"
      : !r.ok && r.unimplemented
        ? `not available (microvpcd ${d} at ${address(cmd, d)} does not offer it yet)`
        : !r.ok
          ? r.error
          : "";

  emitValue(
    cmd,
    () => ({
      healthy: code === EXIT.ok,
      problems,
      hostId: hs?.hostId ?? fs?.hostId ?? "",
      services: health,
      netagent: hs ? msgJson(GetHostStatusResponseSchema, hs) : null,
      nics: nics?.ok ? nics.value.items.map((n) => msgJson(NicSchema, n)) : null,
      firewall: fs ? msgJson(GetFirewallStatusResponseSchema, fs) : null,
      gateway:
        nats?.ok && fips?.ok
          ? {
              natGateways: nats.value.items.length,
              floatingIps: fips.value.count,
              associated: fips.value.associated,
              pool: fips.value.pool,
              poolFree: fips.value.poolFree,
              status: gs ? msgJson(GetGatewayStatusResponseSchema, gs) : null,
            }
          : null,
      overlay: overlay?.ok
        ? { available: true, ...(msgJson(GetOverlayStatusResponseSchema, overlay.value) as object) }
        : { available: false, reason: unavailableText(overlay, "netagent") },
      vms: vms?.ok
        ? { available: true, count: vms.value.items.length, running: vms.value.items.filter((v) => enumLabel(VmStateSchema, v.state) === "running").length }
        : { available: false, reason: unavailableText(vms, "vmm") },
    }),
    () => {
      const out: string[] = [];
      const hostId = hs?.hostId ?? fs?.hostId;
      if (hostId) out.push(`host ${hostId}`);
      out.push(
        table(
          ["DAEMON", "ADDRESS", "STATUS"],
          health.map((h) => [h.daemon, h.address, h.status + (h.error ? `: ${h.error}` : "")]),
        ),
      );
      out.push(netagentText(hs, host, nics, unavailableText));
      out.push(firewallText(fs, fw, unavailableText));
      out.push(
        nats?.ok && fips?.ok
          ? `gateway: ${nats.value.items.length} NAT gateway(s); ${fips.value.count} floating IP(s), ${fips.value.associated} associated; pool ${fips.value.pool.join(", ") || "(none)"}: ${fips.value.poolFree} free`
          : `gateway: ${unavailableText(nats ?? fips, "gateway")}`,
      );
      if (gs) out.push(gatewayStatusText(gs));
      out.push(overlayText(overlay, unavailableText));
      out.push(vmsText(vms, unavailableText));
      out.push(code === EXIT.ok ? "healthy" : `NOT healthy:\n${problems.map((p) => `  - ${p}`).join("\n")}`);
      return out.join("\n");
    },
  );
  if (code !== EXIT.ok) throw new ExitCode(code);
}

export type Why = (r: Outcome<unknown> | undefined, d: Daemon) => string;

/** The gateway's last pass and what it skipped, per VPC (JSON-quoted: the key and field are whatever was written into Redis). */
export function gatewayStatusText(gs: GetGatewayStatusResponse): string {
  const pass = gs.health === GatewayHealth.DEGRADED ? `last pass FAILED (${ago(gs.lastApplyTime)}): ${gs.lastError}` : `last pass ${ago(gs.lastApplyTime)}`;
  if (!gs.invalidRecordCount) return `  ${pass}`;
  const byVpc = new Map<string, typeof gs.invalidRecords>();
  for (const r of gs.invalidRecords) byVpc.set(r.vpc, [...(byVpc.get(r.vpc) ?? []), r]);
  const lines = [`  ${pass}`, `  skipped ${gs.invalidRecordCount} record(s) from Redis that do not validate:`];
  for (const [vpc, rs] of [...byVpc.entries()].sort(([a], [b]) => (a === "" ? 1 : b === "" ? -1 : a.localeCompare(b)))) {
    lines.push(`    ${vpc || "(no VPC known)"}:`);
    for (const r of rs) lines.push(`      ${r.kind} ${JSON.stringify(r.key)}${r.field ? ` ${JSON.stringify(r.field)}` : ""}: ${r.reason}`);
  }
  if (gs.invalidRecordCount > gs.invalidRecords.length) lines.push(`    … and ${gs.invalidRecordCount - gs.invalidRecords.length} more`);
  return lines.join("\n");
}

function netagentText(
  hs: GetHostStatusResponse | undefined,
  host: Outcome<unknown> | undefined,
  nics: Outcome<{ items: Nic[] }> | undefined,
  why: Why,
): string {
  if (!hs) return `netagent: ${why(host, "netagent")}`;
  const head = someDetails([
    ["netagent", enumLabel(HostHealthSchema, hs.health)],
    ["datapath", enumLabel(DatapathSchema, hs.datapath)],
    ["wireguard", enumLabel(WireguardBackendSchema, hs.wireguardBackend)],
    ["version", hs.agentVersion],
    ["redis", hs.redisConnected ? "connected" : `NOT connected (last contact ${ago(hs.redisContactTime)})`],
    ["last reconcile", `${ago(hs.lastReconcileTime)}, ${hs.lastReconcileDurationMs} ms, ${hs.lastReconcileChanges} change(s)`],
    ["vpcs on host", hs.vpcs.map((v) => `${v.vpcName || v.vpcId} (${v.nicCount} NIC(s))`).join(", ") || "(none)"],
    [
      "recent errors",
      hs.errors
        .slice(0, 3)
        .map((e) => `${time(e.time)} ${e.objectId} ${e.operation}: ${e.message}`)
        .join("\n") || "(none)",
    ],
    // Records in Redis the agent refuses (and skips): empty, so not shown, on a clean host.
    [
      "invalid records",
      [
        ...hs.invalidRecords.slice(0, 5).map((x) => `${x.key} ${x.field}: ${x.reason}`),
        ...(hs.invalidRecords.length > 5 ? [`… and ${hs.invalidRecords.length - 5} more`] : []),
      ].join("\n"),
    ],
  ]);
  const list = nics?.ok
    ? nics.value.items.length === 0
      ? "NICs: (none)"
      : `NICs:\n${table(
          ["NIC", "OWNER", "VPC", "SUBNET", "ADDRESS", "KIND", "INTERFACE", "STATE"],
          nics.value.items.map((n) => [
            n.id,
            n.owner,
            n.vpcId,
            n.subnetId,
            n.guest?.address ?? "",
            enumLabel(NicKindSchema, n.kind),
            n.hostInterface,
            enumLabel(ResourceStateSchema, n.state),
          ]),
        )}`
    : `NICs: ${why(nics, "netagent")}`;
  return `${head}\n${list}`;
}

function firewallText(fs: GetFirewallStatusResponse | undefined, fw: Outcome<unknown> | undefined, why: Why): string {
  if (!fs) return `firewall: ${why(fw, "firewall")}`;
  const health = fs.health === FirewallHealth.HEALTHY ? "healthy" : "DEGRADED";
  const lag = fs.appliedGeneration < fs.desiredGeneration ? ` (applying: ${fs.appliedGeneration} of ${fs.desiredGeneration})` : "";
  return (
    `firewall: ${health}, ${fs.nicCount} NIC(s) bound here, generation ${fs.appliedGeneration}${lag}, last apply ${ago(fs.lastApplyTime)} in ${fs.lastApplyDurationMs} ms` +
    (fs.lastError ? `\n  last error (${ago(fs.lastErrorTime)}): ${fs.lastError}` : "") +
    (fs.invalidRecords.length
      ? `\n  skipped ${fs.invalidRecords.length} record(s) from Redis that do not validate:` +
        fs.invalidRecords
          .slice(0, 5)
          .map((r) => `\n    ${r.kind} ${r.key}${r.field ? ` ${JSON.stringify(r.field)}` : ""}${r.vpc ? ` (${r.vpc})` : ""}: ${r.reason}`)
          .join("")
      : "")
  );
}

const IMPL: Record<number, string> = { [WireGuardImplementation.KERNEL]: "kernel", [WireGuardImplementation.WIREGUARD_GO]: "wireguard-go" };

/** The overlay part of `status`: peers per VPC interface, which WireGuard runs it, and hosts left out (bad registry records). */
export function overlayText(overlay: Outcome<GetOverlayStatusResponse> | undefined, why: Why): string {
  if (!overlay?.ok) return `overlay: ${why(overlay, "netagent")}`;
  const vpcs = overlay.value.vpcs;
  if (vpcs.length === 0) return "overlay: no VPC of this host spans another host";
  const iface = (v: (typeof vpcs)[number]) => `${v.interface} :${v.listenPort}${IMPL[v.implementation] ? ` (${IMPL[v.implementation]})` : ""}`;
  const rows = vpcs.flatMap((v) =>
    v.peers.length === 0
      ? [[v.vpcId, iface(v), "(no peers)", "", "", "", ""]]
      : v.peers.map((p) => [v.vpcId, iface(v), p.hostId, p.endpoint, ago(p.latestHandshakeTime), String(p.rxBytes), String(p.txBytes)]),
  );
  const skipped = vpcs.flatMap((v) => [
    ...v.skippedHosts.map((s) => `  warning: ${v.vpcId}: host ${s.hostId} left out of the mesh: ${s.reason}`),
    ...v.rejectedAddresses.map((a) => `  warning: ${v.vpcId}: address ${a.address} claimed by ${a.hostId} not installed: ${a.reason}`),
  ]);
  return `overlay (WireGuard):\n${table(["VPC", "INTERFACE", "PEER", "ENDPOINT", "HANDSHAKE", "RX BYTES", "TX BYTES"], rows)}${skipped.length ? `\n${skipped.join("\n")}` : ""}`;
}

function vmsText(vms: Outcome<{ items: Vm[] }> | undefined, why: Why): string {
  if (!vms?.ok) return `vms: ${why(vms, "vmm")}`;
  const by = new Map<string, number>();
  for (const v of vms.value.items) {
    const s = enumLabel(VmStateSchema, v.state);
    by.set(s, (by.get(s) ?? 0) + 1);
  }
  return `vms: ${vms.value.items.length}${by.size ? ` (${[...by].map(([s, n]) => `${n} ${s}`).join(", ")})` : ""}`;
}
