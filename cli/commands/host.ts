// `microvpc host ...`: the hypervisors of the host registry (NetAgentService
// ListHosts/GetHost, read from Redis by the netagent the CLI talks to), with
// the age of each host's WireGuard key, the overlay peers and their last
// handshake as this host's netagent sees them (GetOverlayStatus), and health:
// this host's netagent's own (GetHostStatus), and for the others the
// registry's view (a current lease, a record the other hosts accept).
// `host rotate-key` is RotateHostKey on this host's netagent.
import { Code, ConnectError } from "@connectrpc/connect";
import { Option, type Command } from "commander";
import {
  GetHostResponseSchema,
  HostHealth,
  HostHealthSchema,
  HostSchema,
  NetAgentService,
  RotateHostKeyResponseSchema,
  type GetHostStatusResponse,
  type GetOverlayStatusResponse,
  type Host,
  type OverlayPeer,
} from "../../gen/microvpc/v1/netagent_pb.js";
import { client } from "../lib/context.js";
import { integer, limitOption, vpcOption } from "../lib/options.js";
import { emit, emitValue, enumLabel, msgJson, someDetails, table, time } from "../lib/output.js";
import { collect } from "../lib/paging.js";
import { setActivity } from "../lib/progress.js";
import { age, ageSeconds, until } from "../lib/age.js";
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";

/** A call that may fail without failing the view (an older agent, overlay off). */
async function maybe<T>(p: Promise<T>): Promise<T | undefined> {
  try {
    return await p;
  } catch (e) {
    if (e instanceof ConnectError && [Code.Unimplemented, Code.Unavailable, Code.FailedPrecondition, Code.DeadlineExceeded].includes(e.code)) return undefined;
    throw e;
  }
}

/** What this host's netagent knows beyond the registry. */
export interface LocalView {
  status?: GetHostStatusResponse;
  overlay?: GetOverlayStatusResponse;
}

export async function localView(cmd: Command): Promise<LocalView> {
  const na = client(cmd, NetAgentService);
  const [status, overlay] = await Promise.all([maybe(na.getHostStatus({})), maybe(na.getOverlayStatus({}))]);
  return { status, overlay };
}

/** The overlay peers of this host that are `hostId` (one per shared VPC), or every peer when hostId is this host. */
function peersOf(v: LocalView, hostId: string): { vpcId: string; peer: OverlayPeer }[] {
  const self = v.status?.hostId === hostId;
  return (v.overlay?.vpcs ?? []).flatMap((o) => o.peers.filter((p) => self || p.hostId === hostId).map((peer) => ({ vpcId: o.vpcId, peer })));
}

function newest(ts: (Timestamp | undefined)[]): Timestamp | undefined {
  let best: Timestamp | undefined;
  for (const t of ts) if (t && (!best || timestampDate(t) > timestampDate(best))) best = t;
  return best;
}

/** Health of a host as far as this CLI can tell, and from where. */
export function hostHealth(h: Host, v: LocalView): string {
  if (h.invalidReason) return `invalid record: ${h.invalidReason}`;
  if (v.status?.hostId === h.id) {
    const s = v.status;
    const err = s.health !== HostHealth.HEALTHY && s.errors[0] ? `: ${s.errors[0].operation}: ${s.errors[0].message}` : "";
    return `${enumLabel(HostHealthSchema, s.health)}${err} (its netagent)`;
  }
  return "registered (lease current)";
}

function hostJson(h: Host, v: LocalView): unknown {
  const peers = peersOf(v, h.id);
  const hs = newest(peers.map((p) => p.peer.latestHandshakeTime));
  return {
    ...(msgJson(HostSchema, h) as object),
    keyAgeSeconds: ageSeconds(h.keyCreateTime) ?? null,
    health: hostHealth(h, v),
    self: v.status?.hostId === h.id,
    overlayPeers: peers.map((p) => ({
      vpcId: p.vpcId,
      hostId: p.peer.hostId,
      endpoint: p.peer.endpoint,
      latestHandshakeTime: p.peer.latestHandshakeTime ? time(p.peer.latestHandshakeTime) : null,
      handshakeAgeSeconds: ageSeconds(p.peer.latestHandshakeTime) ?? null,
    })),
    latestHandshakeAgeSeconds: ageSeconds(hs) ?? null,
  };
}

function hostDetails(h: Host, v: LocalView): string {
  const self = v.status?.hostId === h.id;
  const peers = peersOf(v, h.id);
  const head = someDetails([
    ["id", h.id + (self ? " (this host)" : "")],
    ["health", hostHealth(h, v)],
    ["endpoint", h.endpoint],
    ["public key", h.publicKey],
    ["key age", `${age(h.keyCreateTime, "unknown")} (made ${time(h.keyCreateTime)})`],
    ["registered", `${time(h.registerTime)} (${age(h.registerTime)} ago)`],
    ["lease expires", until(h.leaseExpireTime)],
    ["mtu", h.mtu ? `${h.mtu} (underlay ${h.underlayMtu})` : ""],
    ["vpcs", h.vpcIds.join(" ") || "(none)"],
    ["agent version", h.agentVersion],
  ]);
  const title = self ? "overlay peers of this host:" : `overlay peers: as ${v.status?.hostId ?? "this host"} sees ${h.id}:`;
  const body = peers.length
    ? table(
        ["VPC", "PEER", "ENDPOINT", "HANDSHAKE", "RX", "TX"],
        peers.map(({ vpcId, peer }) => [
          vpcId,
          peer.hostId,
          peer.endpoint,
          peer.latestHandshakeTime ? `${age(peer.latestHandshakeTime)} ago` : "none yet",
          String(peer.rxBytes),
          String(peer.txBytes),
        ]),
      )
    : v.overlay
      ? "(none)"
      : "(overlay status not available from this netagent)";
  return `${head}\n${title}\n${body}`;
}

export function register(program: Command): void {
  const host = program.command("host").description("hypervisors of the host registry: key age, overlay peers, health; rotate this host's key (netagent)");

  host
    .command("list")
    .description("list the registered hypervisors (current lease), ordered by id, with key age, overlay handshake and health")
    .addOption(vpcOption("; only hosts where this VPC is present"))
    .addOption(limitOption())
    .action(async (o, cmd: Command) => {
      const na = client(cmd, NetAgentService);
      const [{ items, next }, v] = await Promise.all([
        collect(o.limit, async (pageSize, pageToken) => {
          const r = await na.listHosts({ vpc: o.vpc, pageSize, pageToken });
          return { items: r.hosts, next: r.nextPageToken };
        }),
        localView(cmd),
      ]);
      emitValue(
        cmd,
        () => ({ hosts: items.map((h) => hostJson(h, v)), nextPageToken: next }),
        () =>
          table(
            ["HOST", "ENDPOINT", "VPCS", "KEY AGE", "REGISTERED", "LEASE", "HANDSHAKE", "VERSION", "HEALTH"],
            items.map((h) => {
              const peers = peersOf(v, h.id);
              const hs = newest(peers.map((p) => p.peer.latestHandshakeTime));
              const self = v.status?.hostId === h.id;
              return [
                h.id + (self ? " *" : ""),
                h.endpoint,
                String(h.vpcIds.length),
                age(h.keyCreateTime, "unknown"),
                `${age(h.registerTime)} ago`,
                until(h.leaseExpireTime),
                self ? "" : peers.length ? (hs ? `${age(hs)} ago` : "none yet") : "",
                h.agentVersion,
                hostHealth(h, v),
              ];
            }),
          ) + (v.status ? `\n* this host (${v.status.hostId}); HANDSHAKE is its latest with each peer` : ""),
      );
    });

  host
    .command("get [host]")
    .description("show one hypervisor of the registry (default: this host), with its overlay peers as this host sees them")
    .action(async (ref: string | undefined, _o, cmd: Command) => {
      const [res, v] = await Promise.all([client(cmd, NetAgentService).getHost({ ref: ref ?? "" }), localView(cmd)]);
      emitValue(
        cmd,
        () => ({ ...(msgJson(GetHostResponseSchema, res) as object), view: hostJson(res.host!, v) }),
        () => hostDetails(res.host!, v),
      );
    });

  host
    .command("rotate-key")
    .description("give this host a new WireGuard key pair and move every peer to it; running flows survive (RotateHostKey)")
    .option("--wait", "wait until every peer host has applied the new key (see --wait-timeout)", false)
    .addOption(new Option("--wait-timeout <seconds>", "longest wait with --wait, 1–120 (default 10)").argParser(integer(1, 120)))
    .action(async (o, cmd: Command) => {
      setActivity("rotating the host key");
      const res = await client(cmd, NetAgentService).rotateHostKey({ waitForPeers: o.wait, waitTimeoutSeconds: o.waitTimeout });
      emit(cmd, RotateHostKeyResponseSchema, res, () =>
        someDetails([
          ["host", res.host?.id ?? ""],
          ["new public key", res.host?.publicKey ?? ""],
          ["previous public key", res.previousPublicKey],
          ["peers updated", o.wait ? res.peersUpdated.join(" ") || "(none)" : ""],
          ["peers pending", o.wait ? res.peersPending.join(" ") || "(none)" : ""],
        ]),
      );
    });
}
