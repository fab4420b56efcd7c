// microvpcd gateway: NAT gateways, floating IPs, port forwards, the
// instance metadata service and the VPC resolver (DNS) of one hypervisor.
//
// The metadata server and the resolver must listen in the hypervisor's own
// namespace, where the transit links end. In production that is the
// daemon's namespace; when --host-netns names another one (a simulated
// hypervisor in the tests), both run as a child process inside it
// (`microvpcd imds`).
import type { ChildProcess } from "node:child_process";
import { StringDecoder } from "node:string_decoder";
import { Command, Option } from "commander";
import type { Redis } from "ioredis";
import { pino, type Logger } from "pino";
import { checkRedisUser, type ServiceDefinition } from "../common/daemon.js";
import { startDaemon } from "../common/exec.js";
import { FailedPreconditionError } from "../common/errors.js";
import { parseStalePeriods, readyStalePeriodsOption, ReadyChecks, readinessChanged, redisReachable } from "../common/health.js";
import { reportChildLine } from "../common/invalid-records.js";
import { MANAGEMENT_AUTO, managementCidrs, parseManagementCidrs, type ManagementSpec } from "../common/management.js";
import { connectRedis, isClusterUrl, isSentinelUrl, readRedisSecrets, urlHasPassword } from "../common/redis.js";
import { cidr as parseCidr } from "../common/validate.js";
import { runResolver } from "../dns/host.js";
import { IpamReader } from "../ipam/schema.js";
import { hostIdOption } from "../common/host.js";
import { HostReader } from "../netagent/schema.js";
import { createImdsServer, reportChildThrottle, THROTTLE_TOTALS_MSG, throttleTotals, type ImdsServer } from "./imds.js";
import { MetadataApi } from "./metadata-api.js";
import { FleetMetadataStore, MetadataStore } from "./metadata-store.js";
import { DEFAULT_CONNTRACK_LIMIT_PER_VM, DEFAULT_RESERVED_PORTS, parsePortRanges } from "./plan.js";
import { gatewayRoutes } from "./routes.js";
import { GatewayApi } from "./service.js";
import { GatewayStatusApi } from "./status-api.js";
import { GatewayStore } from "./store.js";
import { DEFAULT_NAT_LEASE_MS, GatewaySync } from "./sync.js";
import { BUILD } from "../common/version.js";
import { nftStartInfo } from "../common/nft/libnftables.js";

/**
 * Runs the metadata server in this process, on every address of this
 * namespace. `limits` overrides the per-caller rate limit (bench/lib/imds-server.ts).
 */
export async function runImds(
  redis: Redis,
  hostId: string,
  port: number,
  logger: Logger,
  limits: { rateLimitPerSecond?: number; burst?: number } = {},
): Promise<{ server: ImdsServer["server"]; close: () => Promise<void> }> {
  const gw = new GatewayStore(redis, logger);
  let transit = new Map<string, number>();
  let fips: { vpcId: string; private: string; address: string }[] = [];
  const refresh = async () => {
    try {
      transit = await gw.transitMap(hostId);
      fips = (await gw.listFips()).filter((f) => f.private);
    } catch (err) {
      logger.warn({ err: (err as Error).message }, "imds: cannot refresh the transit map; keeping the last one");
    }
  };
  await refresh();
  const timer = setInterval(refresh, 1000);
  timer.unref();
  const imds = createImdsServer({
    lookupVpc: (local) => GatewaySync.vpcOfTransit(transit, local),
    // This host's records only (mdKeys): its user may read no other host's.
    store: new MetadataStore(redis, hostId, logger),
    publicIpOf: async (vpcId, address) => fips.find((f) => f.vpcId === vpcId && f.private === address)?.address,
    ...limits,
    logger,
  });
  await new Promise<void>((resolve, reject) => {
    imds.server.once("error", reject);
    imds.server.listen(port, () => resolve());
  });
  logger.info({ port }, "instance metadata server listening");
  return {
    server: imds.server,
    close: async () => {
      clearInterval(timer);
      await imds.close();
    },
  };
}

/** The line (pino msg) the imds child logs once its servers listen. */
const IMDS_READY = "metadata child ready";

/**
 * The metadata server and resolver as a child inside --host-netns, kept
 * running: when it dies it is started again (0.5 s, doubling to 30 s while
 * it keeps dying young); \`up\` is false from its exit until the new one
 * says it is serving, so the gateway's health check reports NOT_SERVING.
 */
class ImdsChild {
  up = false;
  private proc?: ChildProcess;
  private stopping = false;
  private failures = 0;
  private timer?: NodeJS.Timeout;

  constructor(
    readonly args: string[],
    readonly netns: string,
    readonly log: Logger,
    /** Added to the child's environment (a Redis URL with a password goes here, never on argv). */
    readonly env: Record<string, string> = {},
  ) {}

  async start(): Promise<void> {
    const started = Date.now();
    const d = await startDaemon(process.execPath, this.args, { netns: this.netns, stdio: ["ignore", "pipe", "inherit"], env: this.env });
    this.proc = d.proc;
    let buf = "";
    let line = "";
    const utf8 = new StringDecoder("utf8");
    // This child's throttle totals so far (it starts from zero).
    const throttle = { rate: 0, connections: 0 };
    d.proc.stdout?.on("data", (chunk: Buffer) => {
      process.stdout.write(chunk);
      // Records the child skipped are this gateway's too (GetGatewayStatus, the metric).
      line += utf8.write(chunk);
      for (let i = line.indexOf("\n"); i >= 0; i = line.indexOf("\n")) {
        if (!reportChildLine(line.slice(0, i))) reportChildThrottle(line.slice(0, i), throttle);
        line = line.slice(i + 1);
      }
      if (line.length > 65536) line = "";
      if (this.up) return;
      buf = (buf + chunk.toString("utf8")).slice(-65536);
      if (buf.includes(`"msg":"${IMDS_READY}"`)) {
        this.up = true;
        readinessChanged();
        buf = "";
        this.log.info({ pid: d.pid }, "metadata child serving");
      }
    });
    void d.exited.then((r) => {
      this.up = false;
      readinessChanged();
      if (this.stopping) return;
      // A child that ran a while starts the backoff afresh.
      this.failures = Date.now() - started > 60_000 ? 1 : this.failures + 1;
      const delayMs = Math.min(30_000, 500 * 2 ** (this.failures - 1));
      this.log.error({ pid: d.pid, exitCode: r.exitCode, signal: r.signal, retryInMs: delayMs }, "metadata child exited; restarting it");
      this.schedule(delayMs);
    });
  }

  private schedule(delayMs: number): void {
    this.timer = setTimeout(() => {
      if (this.stopping) return;
      this.start().catch((err) => {
        this.failures++;
        const next = Math.min(30_000, 500 * 2 ** (this.failures - 1));
        this.log.error({ err: (err as Error).message, retryInMs: next }, "cannot start the metadata child; retrying");
        this.schedule(next);
      });
    }, delayMs);
  }

  async stop(): Promise<void> {
    this.stopping = true;
    clearTimeout(this.timer);
    const p = this.proc;
    if (p && p.exitCode === null && p.signalCode === null) {
      const exited = new Promise((r) => p.once("exit", r));
      p.kill("SIGTERM");
      await exited;
    }
  }
}

/** `microvpcd imds`: the metadata server alone (started by the gateway inside --host-netns). */
export function addImdsCommand(program: Command): void {
  program
    .command("imds", { hidden: true })
    .description("instance metadata server alone (the gateway starts it inside --host-netns)")
    .addOption(new Option("--redis <url>", "Redis URL or unix socket path").env("MICROVPC_REDIS_URL").default("redis://127.0.0.1:6379/0"))
    .addOption(hostIdOption("this hypervisor's id"))
    .addOption(new Option("--port <port>", "TCP port on every address").default("8775"))
    .addOption(new Option("--dns-port <port>", "port of the VPC resolver on each transit address (0: none)").default("0"))
    .addOption(new Option("--management-cidrs <list>", "as the gateway's: a VPC's forwarders inside it are not used").default(""))
    .addOption(new Option("--uplink <ifname>", "the uplink, for --management-cidrs auto").default("eth0"))
    .addOption(new Option("--redis-password-file <path>", "read the Redis password from a file").env("MICROVPC_REDIS_PASSWORD_FILE"))
    .addOption(
      new Option("--redis-sentinel-password-file <path>", "the sentinels' password, with a redis-sentinel:// URL (the gateway's)").env(
        "MICROVPC_REDIS_SENTINEL_PASSWORD_FILE",
      ),
    )
    .addOption(new Option("--redis-user <name>", "Redis ACL user (the gateway's)").env("MICROVPC_REDIS_USER"))
    .addOption(new Option("--redis-tls-ca <path>", "CA (PEM) of Redis over TLS").env("MICROVPC_REDIS_TLS_CA"))
    .addOption(new Option("--redis-tls-cert <path>", "client certificate (PEM) for Redis over TLS").env("MICROVPC_REDIS_TLS_CERT"))
    .addOption(new Option("--redis-tls-key <path>", "client private key (PEM) for Redis over TLS").env("MICROVPC_REDIS_TLS_KEY"))
    .action(
      async (o: {
        redis: string;
        hostId: string;
        port: string;
        dnsPort: string;
        managementCidrs: string;
        uplink: string;
        redisPasswordFile?: string;
        redisSentinelPasswordFile?: string;
        redisUser?: string;
        redisTlsCa?: string;
        redisTlsCert?: string;
        redisTlsKey?: string;
      }) => {
        const logger = pino({ base: { service: "imds", pid: process.pid, hostId: o.hostId, version: BUILD.version } });
        const secrets = readRedisSecrets({
          passwordFile: o.redisPasswordFile,
          sentinelPasswordFile: o.redisSentinelPasswordFile,
          tlsCa: o.redisTlsCa,
          tlsCert: o.redisTlsCert,
          tlsKey: o.redisTlsKey,
        });
        checkRedisUser(o.redis, o.redisUser, o.redisPasswordFile);
        const redis = connectRedis({ url: o.redis, logger, ...(o.redisUser ? { username: o.redisUser } : {}), ...secrets });
        const spec = parseManagementCidrs("--management-cidrs", o.managementCidrs);
        const { close } = await runImds(redis, o.hostId, Number(o.port), logger);
        const dns =
          Number(o.dnsPort) > 0
            ? await runResolver(redis, o.hostId, Number(o.dnsPort), logger, { management: () => managementCidrs(spec, o.uplink) })
            : undefined;
        // The gateway reads this line to know its child is serving (healthy again).
        logger.info(IMDS_READY);
        // And this one for microvpc_imds_throttled_requests_total (the child
        // serves no /metrics): the totals, when they changed, at most every 2 s.
        let said = "0/0";
        const throttleTimer = setInterval(() => {
          const now = `${throttleTotals.rate}/${throttleTotals.connections}`;
          if (now === said) return;
          said = now;
          logger.info({ rate: throttleTotals.rate, connections: throttleTotals.connections }, THROTTLE_TOTALS_MSG);
        }, 2000);
        throttleTimer.unref();
        const stop = async () => {
          await dns?.close();
          await close();
          redis.disconnect();
          process.exit(0);
        };
        process.on("SIGTERM", () => void stop());
        process.on("SIGINT", () => void stop());
      },
    );
}

/**
 * How the gateway hands Redis to its `microvpcd imds` child without putting a
 * secret on the child's command line (world-readable in /proc/<pid>/cmdline):
 * the credential files go by path; a URL that carries a password goes in the
 * child's environment (readable by its owner only), never in argv.
 */
export function imdsRedisArgs(
  url: string,
  files: { user?: unknown; passwordFile?: unknown; sentinelPasswordFile?: unknown; tlsCa?: unknown; tlsCert?: unknown; tlsKey?: unknown },
): { args: string[]; env: Record<string, string> } {
  const args: string[] = [];
  const env: Record<string, string> = {};
  if (urlHasPassword(url)) env.MICROVPC_REDIS_URL = url;
  else args.push("--redis", url);
  // The sentinels' password only with a sentinel URL (--imds-redis may name the Redis otherwise, e.g. a local
  // socket), where the child would refuse it; emptied so that the parent's environment does not hand it over.
  const sentinel = isSentinelUrl(url);
  if (!sentinel) env.MICROVPC_REDIS_SENTINEL_PASSWORD_FILE = "";
  for (const [flag, v] of [
    ["--redis-user", files.user],
    ["--redis-password-file", files.passwordFile],
    ["--redis-sentinel-password-file", sentinel ? files.sentinelPasswordFile : undefined],
    ["--redis-tls-ca", files.tlsCa],
    ["--redis-tls-cert", files.tlsCert],
    ["--redis-tls-key", files.tlsKey],
  ] as const) {
    if (v) args.push(flag, String(v));
  }
  return { args, env };
}

export const gatewayDefinition: ServiceDefinition = {
  name: "gateway",
  summary: "NAT gateways, floating IPs, port forwards and the instance metadata service (169.254.169.254)",
  defaultPort: 7404,
  startInfo: nftStartInfo,
  options: [
    hostIdOption(),
    new Option("--uplink <ifname>", "the hypervisor's interface to the outside").env("MICROVPC_UPLINK").default("eth0"),
    // Simulated hypervisors only (the tests, the quickstart): not in --help.
    new Option("--host-netns <name>", "namespace holding the uplink, if not the daemon's own (simulated hypervisors)")
      .env("MICROVPC_HOST_NETNS")
      .default("")
      .hideHelp(),
    new Option("--public-pool <cidr>", "floating IP pool, e.g. 203.0.113.0/24 (empty: no floating IPs)").env("MICROVPC_PUBLIC_POOL").default(""),
    new Option("--imds-port <port>", "port of the metadata server on the host").env("MICROVPC_IMDS_PORT").default("8775"),
    new Option(
      "--dns-port <port>",
      "port of the VPC resolver on the host's transit addresses; each VPC's resolver address :53 is forwarded there (0: no resolver)",
    )
      .env("MICROVPC_DNS_PORT")
      .default("53"),
    new Option("--imds-redis <url>", "Redis URL (or unix socket path) for the metadata server when it runs in --host-netns")
      .env("MICROVPC_IMDS_REDIS")
      .hideHelp(),
    new Option("--drift-interval-ms <ms>", "how often the kernel is re-checked").env("MICROVPC_DRIFT_INTERVAL_MS").default("30000"),
    readyStalePeriodsOption("drift intervals (--drift-interval-ms; a pass runs at least that often)"),
    new Option(
      "--nat-lease-ms <ms>",
      "TTL of the lease by which one host of a VPC holds its NAT gateway's address; the holder renews it every third, the others take it when it runs out (failover within about 4/3 of it)",
    )
      .env("MICROVPC_NAT_LEASE_MS")
      .default(String(DEFAULT_NAT_LEASE_MS)),
    new Option(
      "--api-only",
      "serve the cluster-wide API alone (NAT gateways, floating IPs from --public-pool, port forwards; instance metadata of every host: Get and Delete, not Set), no data plane, metadata server or resolver: an instance running as the control plane's Redis user (docs/redis-acl.md)",
    ).env("MICROVPC_API_ONLY"),
    new Option(
      "--reserved-ports <list>",
      "ports the hypervisor serves itself, never port-forwarded (CreatePortForward: FAILED_PRECONDITION), e.g. 22,7401-7405; empty: none",
    )
      .env("MICROVPC_RESERVED_PORTS")
      .default(DEFAULT_RESERVED_PORTS),
    new Option("--conntrack-limit-per-vm <n>", "flows one VM may hold through the host's NAT at once; new ones past it are refused (0: no limit)")
      .env("MICROVPC_CONNTRACK_LIMIT_PER_VM")
      .default(String(DEFAULT_CONNTRACK_LIMIT_PER_VM)),
    new Option(
      "--management-cidrs <list>",
      "what VMs never reach through this host (Redis, the daemons, other hypervisors): \"auto\" (the uplink's subnets and this host's own addresses, re-read every pass) or IPv4 CIDRs/addresses, e.g. 10.20.0.0/16,192.0.2.7; empty: none. The metadata server and the resolver on the transit addresses stay reachable; a VPC's DNS forwarders inside it are not used",
    )
      .env("MICROVPC_MANAGEMENT_CIDRS")
      .default(MANAGEMENT_AUTO),
  ],
  async build({ flags, redis, logger }) {
    const hostId = String(flags.hostId);
    const uplink = String(flags.uplink);
    if (!/^[A-Za-z][A-Za-z0-9_.-]{0,14}$/.test(uplink)) throw new Error(`--uplink ${JSON.stringify(uplink)} is not an interface name`);
    const hostNetns = String(flags.hostNetns);
    if (hostNetns && !/^[A-Za-z0-9_.-]{1,64}$/.test(hostNetns)) throw new Error(`--host-netns ${JSON.stringify(hostNetns)} is not a namespace name`);
    const poolText = String(flags.publicPool || "0.0.0.0/32");
    const pool = parseCidr("--public-pool", poolText, { min: 8, max: 32 });
    const imdsPort = Number(flags.imdsPort);
    const dnsPort = Number(flags.dnsPort);
    if (!Number.isInteger(dnsPort) || dnsPort < 0 || dnsPort > 65535)
      throw new Error(`--dns-port ${JSON.stringify(flags.dnsPort)}: use 1–65535, or 0 for no resolver`);
    const reservedPorts = parsePortRanges("--reserved-ports", String(flags.reservedPorts));
    const ctLimit = Number(flags.conntrackLimitPerVm);
    if (!/^[0-9]{1,10}$/.test(String(flags.conntrackLimitPerVm)) || ctLimit > 4_000_000) {
      throw new Error(`--conntrack-limit-per-vm ${JSON.stringify(flags.conntrackLimitPerVm)}: use 1–4000000 flows, or 0 for no limit`);
    }
    const natLeaseMs = Number(flags.natLeaseMs);
    if (!/^[0-9]{1,7}$/.test(String(flags.natLeaseMs)) || natLeaseMs < 600 || natLeaseMs > 600_000)
      throw new Error(`--nat-lease-ms ${JSON.stringify(flags.natLeaseMs)}: use 600–600000 ms`);
    if (flags.apiOnly) {
      // With per-host Redis users a hypervisor's gateway may not write NAT
      // gateways, floating IPs or port forwards; this instance does.
      const api = new GatewayApi(new GatewayStore(redis, logger), new IpamReader(redis), redis, {
        pool: flags.publicPool ? pool : parseCidr("pool", "0.0.0.0/32", { min: 0, max: 32 }),
        reservedPorts,
      });
      const noDataPlane = {
        impl: {
          getGatewayStatus: async () => {
            throw new FailedPreconditionError("this gateway runs with --api-only: it applies nothing; ask a hypervisor's gateway for its status");
          },
        },
      };
      // Instance metadata of every host (the control user may read them all); Set goes to the VM's hypervisor.
      return { services: gatewayRoutes(api, new MetadataApi(new FleetMetadataStore(redis, logger)), noDataPlane) };
    }
    const mgmtText = String(flags.managementCidrs);
    const mgmt: ManagementSpec = parseManagementCidrs("--management-cidrs", mgmtText);
    const management = () => managementCidrs(mgmt, uplink, hostNetns);
    logger.info(
      { managementCidrs: mgmt === MANAGEMENT_AUTO ? `auto: ${(await management().catch((e: Error) => [e.message])).join(",")}` : mgmt },
      "management network",
    );
    const store = new GatewayStore(redis, logger);
    const ipam = new IpamReader(redis);
    const meta = new MetadataStore(redis, hostId, logger);
    // This host's records under the earlier release's names move under its
    // hash tag before its API, data plane and metadata child run. A failure
    // (e.g. the Redis user not yet given mvpc-md:{host:H}:*) fails the start:
    // serving without them would leave their VMs without metadata, and an
    // address they held could be given to another instance meanwhile.
    try {
      await meta.moveFromPrevious();
    } catch (err) {
      throw new Error(
        `instance metadata: cannot move this host's records from mvpc-md:${hostId}: under its hash tag mvpc-md:{host:${hostId}}: (${(err as Error).message}); if it is NOPERM, load the ACL lines of \`microvpcd redis-acl\` first (docs/redis-acl.md)`,
        { cause: err },
      );
    }
    // Records an older version kept in the shared layout: this host's move
    // to its own keys before its API serves. A failure (e.g. the Redis user
    // not yet updated for mvpc-md:) is logged; the next start tries again.
    try {
      const { adopted, skipped } = await meta.adoptLegacy();
      if (adopted.length || skipped.length) logger.info({ adopted, skipped }, "instance metadata: legacy records of this host's NICs adopted");
    } catch (err) {
      logger.error({ err: (err as Error).message }, "instance metadata: cannot adopt the legacy records (mvpc:gw:md:); retried at the next start");
    }
    const sync = new GatewaySync(
      store,
      ipam,
      new HostReader(redis, hostId),
      {
        hostId,
        hostNetns,
        uplink,
        imdsPort,
        dnsPort,
        pool: pool.text,
        hopLimits: () => meta.hopLimits(),
        hopLimitOf: (vpcId, address) => meta.tokenHopLimitOf(vpcId, address),
        reservedPorts,
        conntrackLimitPerVm: ctLimit,
        managementCidrs: management,
        natLeaseMs,
      },
      logger,
    );
    sync.health.stalePeriods = parseStalePeriods(flags.readyStalePeriods);
    sync.start(redis, Number(flags.driftIntervalMs));
    let stopImds: () => Promise<void>;
    let childProblem = (): string | undefined => undefined;
    if (!hostNetns) {
      const { close: closeImds } = await runImds(redis, hostId, imdsPort, logger);
      const dns = dnsPort > 0 ? await runResolver(redis, hostId, dnsPort, logger, { management }) : undefined;
      stopImds = async () => {
        await dns?.close();
        await closeImds();
      };
    } else {
      // Both one Redis or both the cluster: the child reads the parent's records under the parent's layout (GatewayKeys).
      if (flags.imdsRedis !== undefined && isClusterUrl(String(flags.imdsRedis)) !== isClusterUrl(String(flags.redis)))
        throw new Error(
          `--imds-redis and --redis must name the same Redis: ${isClusterUrl(String(flags.redis)) ? "--redis names a Redis Cluster and --imds-redis does not" : "--imds-redis names a Redis Cluster and --redis does not"}, and the metadata server would look for the records where they are not`,
        );
      const redisArgs = imdsRedisArgs(String(flags.imdsRedis ?? flags.redis), {
        user: flags.redisUser,
        passwordFile: flags.redisPasswordFile,
        sentinelPasswordFile: flags.redisSentinelPasswordFile,
        tlsCa: flags.redisTlsCa,
        tlsCert: flags.redisTlsCert,
        tlsKey: flags.redisTlsKey,
      });
      const child = new ImdsChild(
        // The child is this same program (dist/microvpcd.js through bin/, or the
        // sources under a loader in tests): same node, same flags, same entry.
        [
          ...process.execArgv,
          process.argv[1] as string,
          "imds",
          ...redisArgs.args,
          "--host-id",
          hostId,
          "--port",
          String(imdsPort),
          "--dns-port",
          String(dnsPort),
          "--management-cidrs",
          mgmtText,
          "--uplink",
          uplink,
        ],
        hostNetns,
        logger,
        redisArgs.env,
      );
      await child.start();
      childProblem = () => (child.up ? undefined : "the metadata/DNS child is not serving (it is restarted with backoff)");
      stopImds = () => child.stop();
    }
    const api = new GatewayApi(store, ipam, redis, { pool: flags.publicPool ? pool : parseCidr("pool", "0.0.0.0/32", { min: 0, max: 32 }), reservedPorts });
    return {
      services: gatewayRoutes(api, new MetadataApi(meta), new GatewayStatusApi(hostId, () => sync.status)),
      // NOT_SERVING while the metadata/DNS child is down (it is restarted),
      // until the first whole pass applied, and when none has for a while.
      ready: new ReadyChecks([sync.health.condition, () => childProblem(), redisReachable(redis)]),
      close: async () => {
        sync.stop();
        // Another host of each VPC takes the NAT addresses held here at once.
        await sync.releaseNatLeases();
        await stopImds();
      },
    };
  },
};
