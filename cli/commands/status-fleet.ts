// `status --all-hosts` and `status --watch`.
//
// --all-hosts: one row per hypervisor of the host registry (ListHosts on the
// netagent the CLI talks to) with its per-host daemons' health
// (grpc.health.v1) and last apply (netagent GetHostStatus, firewall
// GetFirewallStatus, gateway GetGatewayStatus). This host's daemons are
// reached at the CLI's own addresses; another host's at the address of its
// WireGuard endpoint with each daemon's default port (the registry records
// no other address), so a host whose daemons listen elsewhere shows
// "unreachable".
//
// --watch: redrawn when the output changes. VM changes arrive as they
// happen (the vmm's WatchVms stream); daemon health and reconcile times have
// no stream of their own (they are each daemon's memory, not Redis
// records), so the view is also re-checked every --interval seconds: a
// bounded poll for those, documented as such.
import { ConnectError, type Transport } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import type { Command } from "commander";
import { baseUrl, grpcClient, tokenRefusal } from "../../services/common/client.js";
import { Health, HealthCheckResponse_ServingStatus } from "../../gen/grpc/health/v1/health_pb.js";
import { FirewallHealth, FirewallService } from "../../gen/microvpc/v1/firewall_pb.js";
import { GatewayHealth, GatewayService } from "../../gen/microvpc/v1/gateway_pb.js";
import { HostHealth, NetAgentService, type Host } from "../../gen/microvpc/v1/netagent_pb.js";
import { VmService, VmWatchEventType } from "../../gen/microvpc/v1/vm_pb.js";
import { address, client, DAEMONS, globals, timeoutGiven, tlsOptions, type Daemon } from "../lib/context.js";
import { EXIT, ExitCode } from "../lib/errors.js";
import { emitValue, table, time } from "../lib/output.js";
import { collect } from "../lib/paging.js";
import { interruptSignal, jsonLine, pause, redraw } from "../lib/watch.js";
import { age } from "../lib/age.js";
import type { Timestamp } from "@bufbuild/protobuf/wkt";

export interface StatusModes {
  allHosts?: boolean;
  watch?: boolean;
  interval: number;
}

export const STATUS_MODES_HELP = `
--all-hosts: a row per registered hypervisor. Another host's daemons are
reached at its WireGuard endpoint's address with the default ports (7402–7405).
--watch: VM changes redraw at once (the vmm's WatchVms stream); daemon health
and reconcile times have no stream, so the view is also re-checked every
--interval seconds. Ctrl-C stops (exit 0).`;

export async function statusModes(cmd: Command, o: StatusModes, hostStatus: () => Promise<void>): Promise<void> {
  const once = o.allHosts ? () => allHostsStatus(cmd) : hostStatus;
  if (!o.watch) return once();
  await watchLoop(cmd, once, o.interval * 1000);
}

/** Runs fn with stdout captured: its text and the exit code it ended with. */
async function capture(fn: () => Promise<void>): Promise<{ text: string; code: number }> {
  const chunks: string[] = [];
  const orig = process.stdout.write;
  process.stdout.write = ((c: string | Uint8Array, ...rest: unknown[]) => {
    chunks.push(typeof c === "string" ? c : Buffer.from(c).toString("utf8"));
    const cb = rest.find((x) => typeof x === "function") as (() => void) | undefined;
    cb?.();
    return true;
  }) as typeof process.stdout.write;
  let code: number = EXIT.ok;
  try {
    await fn();
  } catch (e) {
    if (e instanceof ExitCode) code = e.code;
    else throw e;
  } finally {
    process.stdout.write = orig;
  }
  return { text: chunks.join(""), code };
}

async function watchLoop(cmd: Command, once: () => Promise<void>, intervalMs: number): Promise<void> {
  const json = globals(cmd).output === "json";
  const { signal, stop } = interruptSignal();
  let wake: (() => void) | undefined;
  // VM changes, as they happen; a vmm that is down or older only leaves the interval.
  void (async () => {
    while (!signal.aborted) {
      try {
        for await (const m of client(cmd, VmService).watchVms({}, { signal, timeoutMs: 0 })) {
          if (m.type !== VmWatchEventType.INITIAL && m.type !== VmWatchEventType.SYNCED) wake?.();
        }
      } catch {
        // retried below
      }
      await pause(intervalMs, signal);
    }
  })();
  let last: string | undefined;
  try {
    while (!signal.aborted) {
      const { text, code } = await capture(once);
      if (signal.aborted) break;
      if (json) {
        const value = JSON.parse(text) as object;
        const line = JSON.stringify(value);
        if (line !== last) jsonLine({ ...value, exitCode: code });
        last = line;
      } else if (text !== last) {
        redraw(text);
        last = text;
      }
      await new Promise<void>((resolve) => {
        const done = () => {
          clearTimeout(t);
          signal.removeEventListener("abort", done);
          wake = undefined;
          resolve();
        };
        const t = setTimeout(done, intervalMs);
        wake = done;
        signal.addEventListener("abort", done, { once: true });
      });
    }
  } finally {
    stop();
  }
}

type Probe = { status: "serving" | "not-serving" | "unreachable" | "skipped"; detail: string; lastApply?: Timestamp; healthy?: boolean };

const PER_HOST: Daemon[] = ["netagent", "firewall", "gateway", "vmm"];

/** The address of another host's daemon: its endpoint's IP with the daemon's default port, in the scheme the CLI uses. */
function remoteAddress(cmd: Command, h: Host, d: Daemon): string | undefined {
  // "ip:port", "[ipv6]:port", or the address alone.
  const v4 = /^([0-9]{1,3}(?:\.[0-9]{1,3}){3})(?::[0-9]+)?$/.exec(h.endpoint);
  const v6 = /^\[([0-9A-Fa-f:.]+)\](?::[0-9]+)?$/.exec(h.endpoint) ?? /^([0-9A-Fa-f]*:[0-9A-Fa-f:.]*)$/.exec(h.endpoint);
  const ip = v4 ? v4[1] : v6 ? `[${v6[1]}]` : undefined;
  if (!ip) return undefined;
  const scheme = address(cmd, "netagent").startsWith("https://") ? "https://" : "";
  return `${scheme}${ip}:${DAEMONS[d].port}`;
}

const transports = new Map<string, Transport>();

function transportAt(cmd: Command, addr: string): Transport | string {
  const g = globals(cmd);
  const refusal = tokenRefusal(addr, g.token, !!g.insecureSendToken);
  if (refusal) return "skipped: the token may not go there in clear text (--insecure-send-token, or https://)";
  let t = transports.get(addr);
  if (!t) {
    const header = g.token ? { authorization: `Bearer ${g.token}` } : undefined;
    t = createGrpcTransport({
      baseUrl: baseUrl(addr),
      defaultTimeoutMs: timeoutGiven(cmd) ? g.timeoutMs : 3000,
      nodeOptions: tlsOptions(g),
      interceptors: header
        ? [
            (next) => (req) => {
              req.header.set("authorization", header.authorization);
              return next(req);
            },
          ]
        : [],
    });
    transports.set(addr, t);
  }
  return t;
}

async function probe(cmd: Command, addr: string | undefined, d: Daemon): Promise<Probe> {
  if (!addr) return { status: "skipped", detail: "no address known" };
  const t = transportAt(cmd, addr);
  if (typeof t === "string") return { status: "skipped", detail: t };
  const why = (e: unknown) => (e instanceof ConnectError ? e.rawMessage : String(e));
  try {
    const h = await grpcClient(Health, t).check({ service: "" });
    if (h.status !== HealthCheckResponse_ServingStatus.SERVING) return { status: "not-serving", detail: "" };
  } catch (e) {
    return { status: "unreachable", detail: why(e) };
  }
  try {
    switch (d) {
      case "netagent": {
        const s = await grpcClient(NetAgentService, t).getHostStatus({});
        return {
          status: "serving",
          detail: s.health === HostHealth.HEALTHY ? "" : (s.errors[0]?.message ?? "degraded"),
          lastApply: s.lastReconcileTime,
          healthy: s.health === HostHealth.HEALTHY,
        };
      }
      case "firewall": {
        const s = await grpcClient(FirewallService, t).getFirewallStatus({ pageSize: 1 });
        return { status: "serving", detail: s.lastError, lastApply: s.lastApplyTime, healthy: s.health === FirewallHealth.HEALTHY };
      }
      case "gateway": {
        const s = await grpcClient(GatewayService, t).getGatewayStatus({});
        return { status: "serving", detail: s.lastError, lastApply: s.lastApplyTime, healthy: s.health !== GatewayHealth.DEGRADED };
      }
      default:
        return { status: "serving", detail: "", healthy: true };
    }
  } catch (e) {
    return { status: "serving", detail: `status: ${why(e)}`, healthy: false };
  }
}

function cell(p: Probe): string {
  if (p.status !== "serving") return p.status;
  const when = p.lastApply ? ` ${age(p.lastApply)} ago` : "";
  return `${p.healthy === false ? "DEGRADED" : "ok"}${when}`;
}

export async function allHostsStatus(cmd: Command): Promise<void> {
  const na = client(cmd, NetAgentService);
  const [self, hosts] = await Promise.all([
    na.getHostStatus({}).then(
      (s) => s.hostId,
      () => "",
    ),
    collect(undefined, async (pageSize, pageToken) => {
      const r = await na.listHosts({ pageSize, pageToken });
      return { items: r.hosts, next: r.nextPageToken };
    }),
  ]);
  const rows = await Promise.all(
    hosts.items.map(async (h) => {
      const local = h.id === self;
      const probes = await Promise.all(PER_HOST.map((d) => probe(cmd, local ? address(cmd, d) : remoteAddress(cmd, h, d), d)));
      return { host: h, local, probes: Object.fromEntries(PER_HOST.map((d, i) => [d, probes[i]])) as Record<Daemon, Probe> };
    }),
  );
  let code: number = EXIT.ok;
  for (const r of rows) {
    for (const p of Object.values(r.probes)) {
      if (p.status === "unreachable" || p.status === "not-serving") code = EXIT.unavailable;
      // Not checked (no address, or the token may not go there) is not healthy either.
      else if ((p.healthy === false || p.status === "skipped") && code === EXIT.ok) code = EXIT.error;
    }
    if (r.host.invalidReason && code === EXIT.ok) code = EXIT.error;
  }
  emitValue(
    cmd,
    () => ({
      healthy: code === EXIT.ok,
      hosts: rows.map((r) => ({
        hostId: r.host.id,
        self: r.local,
        endpoint: r.host.endpoint,
        invalidReason: r.host.invalidReason,
        daemons: Object.fromEntries(
          PER_HOST.map((d) => {
            const p = r.probes[d];
            return [d, { status: p.status, healthy: p.healthy ?? null, detail: p.detail, lastApplyTime: p.lastApply ? time(p.lastApply) : null }];
          }),
        ),
      })),
    }),
    () => {
      const t = table(
        ["HOST", "ENDPOINT", "NETAGENT (RECONCILE)", "FIREWALL (APPLY)", "GATEWAY (APPLY)", "VMM", "KEY AGE", "PROBLEMS"],
        rows.map((r) => [
          r.host.id + (r.local ? " *" : ""),
          r.host.endpoint,
          cell(r.probes.netagent),
          cell(r.probes.firewall),
          cell(r.probes.gateway),
          cell(r.probes.vmm),
          age(r.host.keyCreateTime, "unknown"),
          [r.host.invalidReason, ...PER_HOST.map((d) => (r.probes[d].detail ? `${d}: ${r.probes[d].detail}` : ""))].filter(Boolean).join("; "),
        ]),
      );
      return `${t}\n${rows.length} host(s)${self ? `; * this host (${self})` : ""}; ${code === EXIT.ok ? "healthy" : "NOT healthy"}`;
    },
  );
  if (code !== EXIT.ok) throw new ExitCode(code);
}
