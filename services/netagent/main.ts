// microvpcd netagent: the data plane of one hypervisor.
import { Option } from "commander";
import type { ServiceDefinition } from "../common/daemon.js";
import { parseStalePeriods, readyStalePeriodsOption, ReadyChecks, redisReachable } from "../common/health.js";
import { checkHostId, hostIdOption } from "../common/host.js";
import { IpamReader } from "../ipam/schema.js";
import { Agent } from "./agent.js";
import { LinuxKernel } from "./kernel.js";
import { NetAgent } from "./service.js";
import { addressProblem } from "./overlay/registry.js";
import { DEFAULT_MAX_PEER_SERIES, registerWireguardMetrics } from "./overlay/metrics.js";
import { Overlay } from "./overlay/sync.js";
import type { WgMode } from "./overlay/wg.js";
import { PeeringSync } from "./peering.js";
import { netagentRoutes } from "./routes.js";
import { HostStore } from "./store.js";
import { Vpn } from "./vpn/service.js";
import { VpnStore } from "./vpn/store.js";
import { VpnSync } from "./vpn/sync.js";
import { WG_LOG_LEVELS, WgKernel, type WgLogLevel } from "./overlay/wgkernel.js";
import { nftStartInfo } from "../common/nft/libnftables.js";
import { rtnlStartInfo } from "../common/rtnl.js";
import { conntrackStartInfo } from "../common/conntrack.js";

const AGENT_VERSION = "0.1.0";
const WG_MODES = ["auto", "kernel", "wireguard-go"];

export const netagentDefinition: ServiceDefinition = {
  name: "netagent",
  summary: "per-hypervisor data plane: a network namespace per VPC, a bridge per subnet, TAP/veth NICs, bandwidth limits",
  defaultPort: 7402,
  startInfo: () => ({ ...nftStartInfo(), ...rtnlStartInfo(), ...conntrackStartInfo() }),
  options: [
    hostIdOption("this hypervisor's id (1–24 of [a-z0-9]); part of every namespace name, so unique per machine"),
    new Option("--mtu <bytes>", "MTU of subnet bridges and NICs").env("MICROVPC_MTU").default("1500"),
    new Option("--reconcile-interval-ms <ms>", "how often the kernel is compared with the desired state")
      .env("MICROVPC_RECONCILE_INTERVAL_MS")
      .default("10000"),
    readyStalePeriodsOption("reconcile intervals (--reconcile-interval-ms)"),
    new Option("--overlay", "join VPCs across hypervisors with a WireGuard interface per VPC (full mesh between the hosts of the VPC)")
      .env("MICROVPC_OVERLAY")
      .default(false),
    new Option("--host-netns <name>", 'network namespace holding the underlay, where WireGuard sockets live ("" = the agent\'s own)')
      .env("MICROVPC_HOST_NETNS")
      .default(""),
    new Option(
      "--underlay-interface <if>",
      'underlay interface: its MTU minus the WireGuard overhead (60 over IPv4, 80 over IPv6) is the overlay MTU; "auto": the one holding the underlay address, else the one the default route leaves by',
    )
      .env("MICROVPC_UNDERLAY_INTERFACE")
      .default("auto"),
    new Option("--underlay-address <ip>", "this host's WireGuard endpoint address (default: the first global IPv4 of the underlay interface)").env(
      "MICROVPC_UNDERLAY_ADDRESS",
    ),
    new Option(
      "--wireguard <impl>",
      "WireGuard implementation: auto (the kernel module when this host can create a kernel device, else wireguard-go), kernel, or wireguard-go",
    )
      .env("MICROVPC_WIREGUARD")
      .default("auto"),
    new Option(
      "--wireguard-log <level>",
      "wireguard-go's log, to STATE_DIR/<host-id>/wg/<interface>.log (the previous process's as .log.1): off, error, or verbose (every handshake and keepalive: for debugging a tunnel, it grows)",
    )
      .env("MICROVPC_WIREGUARD_LOG")
      .default("error"),
    new Option("--state-dir <dir>", "where the WireGuard private key lives (DIR/<host-id>/wg.key, mode 0600)")
      .env("MICROVPC_STATE_DIR")
      .default("/var/lib/microvpc"),
    new Option(
      "--open-until-firewall",
      "a new VPC namespace forwards everything until the firewall applies (labs and tests without a firewall); default: it forwards nothing until then",
    )
      .env("MICROVPC_OPEN_UNTIL_FIREWALL")
      .default(false),
  ],
  async build({ flags, redis, logger }) {
    const hostId = String(flags.hostId);
    checkHostId("--host-id", hostId);
    let mtu = Number(flags.mtu);
    if (!Number.isInteger(mtu) || mtu < 576 || mtu > 9000) throw new Error(`--mtu ${flags.mtu}: use 576–9000`);
    const stalePeriods = parseStalePeriods(flags.readyStalePeriods);
    const kernel = new LinuxKernel();
    const agent = new Agent(kernel, new HostStore(redis, hostId), hostId, logger);
    agent.health.stalePeriods = stalePeriods;
    agent.failClosed = !flags.openUntilFirewall;
    const wireguardLog = String(flags.wireguardLog ?? "error") as WgLogLevel;
    if (!WG_LOG_LEVELS.includes(wireguardLog)) throw new Error(`--wireguard-log ${JSON.stringify(wireguardLog)}: use one of ${WG_LOG_LEVELS.join(", ")}`);
    let overlay: Overlay | undefined;
    if (flags.overlay) {
      const hostNetns = String(flags.hostNetns ?? "");
      if (hostNetns && !/^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/.test(hostNetns)) throw new Error(`--host-netns ${JSON.stringify(hostNetns)}: not a namespace name`);
      const underlayInterface = String(flags.underlayInterface);
      if (!/^[A-Za-z][A-Za-z0-9_.-]{0,14}$/.test(underlayInterface)) {
        throw new Error(
          `--underlay-interface ${JSON.stringify(underlayInterface)}: not an interface name (1–15 characters of letters, digits and _ . -, starting with a letter; see \`ip link\`)`,
        );
      }
      const underlayAddress = flags.underlayAddress !== undefined ? String(flags.underlayAddress) : undefined;
      if (underlayAddress !== undefined) {
        const bad = addressProblem(underlayAddress);
        if (bad)
          throw new Error(
            `--underlay-address ${JSON.stringify(underlayAddress)} ${bad}: give this host's IPv4 or IPv6 address on the underlay (e.g. 192.168.100.10), or leave it out to use the first global IPv4 of --underlay-interface`,
          );
      }
      const wireguard = String(flags.wireguard ?? "auto");
      if (!WG_MODES.includes(wireguard)) throw new Error(`--wireguard ${JSON.stringify(wireguard)}: use one of ${WG_MODES.join(", ")}`);
      overlay = new Overlay(
        agent,
        redis,
        {
          hostId,
          hostNetns,
          underlayInterface,
          underlayAddress,
          stateDir: String(flags.stateDir),
          agentVersion: AGENT_VERSION,
          wireguard: wireguard as WgMode,
          wireguardLog,
        },
        logger,
      );
      await overlay.init();
      registerWireguardMetrics(overlay, DEFAULT_MAX_PEER_SERIES);
      // Nothing may be bigger than the tunnel carries: bridges and NICs get the overlay MTU.
      mtu = Math.min(mtu, overlay.mtu);
      agent.overlay = overlay;
      logger.info(
        {
          mtu: overlay.mtu,
          underlayMtu: overlay.underlayMtu,
          address: overlay.address,
          publicKey: overlay.publicKey,
          wireguard: overlay.impl,
          why: overlay.implWhy,
        },
        "overlay enabled",
      );
    }
    const peering = new PeeringSync(agent, redis, logger);
    agent.peering = peering;
    const ipam = new IpamReader(redis);
    const svc = new NetAgent(agent, kernel, ipam, { hostId, mtu, overlay });
    // The VPN endpoints this host runs (vpn/sync.ts): WireGuard, so only with the overlay.
    const vpnStore = new VpnStore(redis);
    const vpnSync = overlay
      ? new VpnSync(
          agent,
          vpnStore,
          ipam,
          new WgKernel(undefined, wireguardLog),
          {
            hostId,
            stateDir: String(flags.stateDir),
            hostNetns: String(flags.hostNetns ?? ""),
            mtu: overlay.mtu,
            ensureVpc: async (vpcId) => void (await svc.impl.ensureVpc!({ vpc: vpcId } as never, undefined as never)),
          },
          logger,
        )
      : undefined;
    const vpn = new Vpn(vpnStore, ipam, { kick: vpnSync ? () => vpnSync.kick() : undefined });
    // Adopt what the kernel has before answering: the first pass only
    // changes what differs from the desired state.
    agent.start(Number(flags.reconcileIntervalMs));
    overlay?.start();
    peering.start();
    vpnSync?.start();
    return {
      services: netagentRoutes(svc, vpn),
      // Ready once a whole reconcile has succeeded, and while the last one is recent.
      ready: new ReadyChecks([agent.health.condition, redisReachable(redis)]),
      close: async () => {
        agent.stop();
        peering.stop();
        await vpnSync?.stop();
        await overlay?.stop();
        // Devices DetachNic left deleting, and the marks it left retiring, finish before the process ends.
        await agent.marks.settle();
        await kernel.settle();
      },
    };
  },
};
