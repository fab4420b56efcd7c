// microvpcd firewall: security groups and network ACLs. The API half stores
// desired state in Redis (any host may answer); the sync half compiles this
// host's VPC namespaces into nftables and follows change events.
import { create } from "@bufbuild/protobuf";
import { timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import type { ServiceImpl } from "@connectrpc/connect";
import { Option } from "commander";
import { hostIdOption } from "../common/host.js";
import type { ServiceDefinition } from "../common/daemon.js";
import { parseStalePeriods, readyStalePeriodsOption, ReadyChecks, redisReachable } from "../common/health.js";
import { FailedPreconditionError, InvalidArgumentError } from "../common/errors.js";
import { invalidRecords } from "../common/invalid-records.js";
import * as V from "../common/validate.js";
import {
  FirewallCountersSchema,
  FirewallHealth,
  FirewallInvalidRecordSchema,
  FirewallService,
  FlowLogRecordSchema,
  NicFirewallStatusSchema,
} from "../../gen/microvpc/v1/firewall_pb.js";
import { IpamReader, OWNER as IPAM_OWNER } from "../ipam/schema.js";
import { HostReader } from "../netagent/schema.js";
import { nicCounter } from "./compile.js";
import { bridgeNfProblems, LinuxNft } from "./apply.js";
import { DEFAULT_MAX_NIC_SERIES, registerDropMetrics } from "./metrics.js";
import { firewallRoutes } from "./routes.js";
import { FirewallApi } from "./service.js";
import { OWNER } from "./schema.js";
import { FirewallStore } from "./store.js";
import { FirewallSync } from "./sync.js";
import { checkSampleRate, filterFlowLogs, FlowLogCollector, tailLines } from "./flowlogs.js";
import { FlowLogConfigStore, flowLogRates, RESOURCE_RE, startFlowLogGc } from "./flowlog-config.js";
import { FlowLogConfigApi } from "./flowlog-service.js";
import { nftStartInfo } from "../common/nft/libnftables.js";
import { conntrackStartInfo } from "../common/conntrack.js";

export const firewallDefinition: ServiceDefinition = {
  name: "firewall",
  summary: "security groups and network ACLs, compiled into one nftables transaction per VPC namespace",
  defaultPort: 7403,
  startInfo: () => ({ ...nftStartInfo(), ...conntrackStartInfo() }),
  options: [
    hostIdOption(),
    new Option("--drift-interval-ms <ms>", "how often the kernel is checked against the desired firewall").env("MICROVPC_DRIFT_INTERVAL_MS").default("30000"),
    readyStalePeriodsOption("drift intervals (--drift-interval-ms; a pass runs at least that often)"),
    new Option(
      "--metrics-max-nic-series <n>",
      "most NICs with their own drop series on /metrics (the lowest NIC ids); the others count in their VPC's series only",
    )
      .env("MICROVPC_METRICS_MAX_NIC_SERIES")
      .default(String(DEFAULT_MAX_NIC_SERIES)),
    new Option(
      "--flow-logs <dir>",
      "log the flows of this host's NICs (accepted: conntrack events; rejected: nft log group + ulogd2) as JSON lines to DIR/<host-id>.jsonl, rotated by size (docs/flow-logs.md)",
    ).env("MICROVPC_FLOW_LOGS"),
    new Option(
      "--flow-logs-scope <ids>",
      "comma-separated VPC, subnet or NIC ids whose NICs log flows on this host besides those of the FlowLogConfigs (`microvpc flow-logs config create`)",
    ).env("MICROVPC_FLOW_LOGS_SCOPE"),
    new Option("--flow-logs-sample-rate <r>", "the share of the flows of --flow-logs-scope logged, 0 < r ≤ 1")
      .env("MICROVPC_FLOW_LOGS_SAMPLE_RATE")
      .default("1"),
    new Option("--flow-logs-max-bytes <n>", "rotate the flow log past this size; 5 rotated files are kept")
      .env("MICROVPC_FLOW_LOGS_MAX_BYTES")
      .default("67108864"),
    new Option("--flow-logs-aggregate-ms <ms>", "the logged drops of one 5-tuple with gaps shorter than this are one record (at most ten windows long)")
      .env("MICROVPC_FLOW_LOGS_AGGREGATE_MS")
      .default("5000"),
    new Option("--flow-logs-interval-ms <ms>", "an accepted flow open this long gets an interim record every interval (its packets and bytes since the last)")
      .env("MICROVPC_FLOW_LOGS_INTERVAL_MS")
      .default("60000"),
    new Option(
      "--api-only",
      "serve the cluster-wide API alone (security groups, network ACLs), no data plane: an instance running as the control plane's Redis user (docs/redis-acl.md)",
    ).env("MICROVPC_API_ONLY"),
  ],
  async build({ flags, redis, logger }) {
    const hostId = String(flags.hostId);
    const store = new FirewallStore(redis, logger);
    const configStore = new FlowLogConfigStore(redis);
    const flowLogConfigs = new FlowLogConfigApi(configStore, store, new IpamReader(redis));
    // A config whose VPC, subnet or NIC binding is gone is deleted (a recreated resource does not inherit it).
    const flowLogGc = startFlowLogGc(configStore, logger, Number(flags.driftIntervalMs));
    // With per-host Redis users a hypervisor's firewall may not write groups or
    // ACLs; this instance does, and compiles nothing (no nft, no namespaces).
    if (flags.apiOnly) {
      const noDataPlane: Pick<ServiceImpl<typeof FirewallService>, "getFirewallStatus" | "listFlowLogs"> = {
        getFirewallStatus: async () => {
          throw new FailedPreconditionError("this firewall runs with --api-only: it applies nothing; ask a hypervisor's firewall for its status");
        },
        listFlowLogs: async () => {
          throw new FailedPreconditionError("this firewall runs with --api-only: it logs no flows; ask a hypervisor's firewall");
        },
      };
      return {
        services: firewallRoutes(new FirewallApi(store, new IpamReader(redis), { hostId }), noDataPlane, flowLogConfigs),
        close: async () => flowLogGc.stop(),
      };
    }
    const nft = new LinuxNft({ timeoutMs: 60_000 });
    const host = new HostReader(redis, hostId);
    const sync = new FirewallSync(nft, store, host, hostId, logger);
    sync.health.stalePeriods = parseStalePeriods(flags.readyStalePeriods);
    const maxNicSeries = Number(flags.metricsMaxNicSeries);
    if (!/^[0-9]{1,6}$/.test(String(flags.metricsMaxNicSeries)))
      throw new Error(`--metrics-max-nic-series ${JSON.stringify(flags.metricsMaxNicSeries)}: use 0–999999`);
    registerDropMetrics(sync, nft, maxNicSeries);
    let flowLogs: FlowLogCollector | undefined;
    if (flags.flowLogs) {
      const sampleRate = checkSampleRate("--flow-logs-sample-rate", String(flags.flowLogsSampleRate));
      const scope = new Set(
        String(flags.flowLogsScope ?? "")
          .split(",")
          .map((x) => x.trim())
          .filter(Boolean),
      );
      for (const id of scope) if (!RESOURCE_RE.test(id)) throw new Error(`--flow-logs-scope: ${JSON.stringify(id)} is not a VPC, subnet or NIC id`);
      const int = (flag: string, v: unknown) => {
        if (!/^[0-9]{1,12}$/.test(String(v)) || Number(v) < 1) throw new Error(`${flag} ${JSON.stringify(v)}: a positive integer`);
        return Number(v);
      };
      const maxBytes = int("--flow-logs-max-bytes", flags.flowLogsMaxBytes);
      const aggregateMs = int("--flow-logs-aggregate-ms", flags.flowLogsAggregateMs);
      const intervalMs = int("--flow-logs-interval-ms", flags.flowLogsIntervalMs);
      if (intervalMs < 1000) throw new Error(`--flow-logs-interval-ms ${intervalMs}: at least 1000 (each interval lists the conntrack table once)`);
      // Read in every pass (a config made while this daemon was down, or whose
      // event it missed, is applied by the next pass).
      sync.flowLogs = async (st) =>
        flowLogRates(
          st.nics,
          st.subnets.map((s) => ({ subnetId: s.subnetId, vpcId: st.vpcId })),
          await configStore.list(st.vpcId),
          { scope, sampleRate },
        );
      // The NICs' owners (their VMs), for the records: the netagent's NIC records, re-read after each pass.
      let owners = new Map<string, string>();
      const collector = new FlowLogCollector(
        { dir: String(flags.flowLogs), hostId, maxBytes, aggregateMs, intervalMs },
        { stateOf: (ns) => sync.applied.get(ns)?.state, ownerOf: (nic) => owners.get(nic) },
        logger,
      );
      sync.onPass = async (namespaces) => {
        owners = new Map([...(await host.load()).nics.values()].map((n) => [n.nicId, n.owner]));
        await collector.ensure(namespaces);
      };
      flowLogs = collector;
    }
    const api = new FirewallApi(store, new IpamReader(redis), {
      hostId,
      enforce: (vpcId, change) => sync.enforce(vpcId, undefined, change),
    });
    sync.start(redis, Number(flags.driftIntervalMs), async () => {
      const adopted = await store.adoptOwnSigs(hostId);
      if (adopted) logger.info({ adopted }, "kept this host's own copy of older bindings (group membership needs it)");
    });
    // Bridged traffic must reach nft, or VMs of one subnet bypass the
    // security groups: checked in every VPC namespace of this host every few
    // seconds and at each health check; while any fails, the daemon is not
    // ready (grpc.health NOT_SERVING) and GetFirewallStatus says why.
    const own = new RegExp(`^mvpc-${hostId}-vpc-[0-9a-f]{12}$`);
    let brNf: string[] = [];
    const checkBrNf = async () => {
      const next = await bridgeNfProblems(own).catch((e: Error) => [`cannot check bridge-nf-call-iptables: ${e.message}`]);
      for (const p of next) if (!brNf.includes(p)) logger.error({ problem: p }, "not ready: bridged traffic does not reach the firewall");
      if (brNf.length && !next.length) logger.info("bridge-nf-call-iptables is 1 in every VPC namespace again");
      brNf = next;
      return next;
    };
    const brNfTimer = setInterval(() => void checkBrNf(), 5000);
    brNfTimer.unref();
    await checkBrNf();
    const status: Pick<ServiceImpl<typeof FirewallService>, "getFirewallStatus" | "listFlowLogs"> = {
      listFlowLogs: async (req) => {
        if (!flowLogs) throw new FailedPreconditionError("flow logs are off on this host (microvpcd firewall --flow-logs DIR)");
        for (const [i, id] of req.nicIds.entries())
          if (!/^nic-[0-9a-f]{12}$/.test(id))
            throw new InvalidArgumentError(`nic_ids[${i}]`, `${JSON.stringify(id.slice(0, 40))} is not a NIC id (nic-<12 hex>)`);
        if (req.nicIds.length > 1000) throw new InvalidArgumentError("nic_ids", `${req.nicIds.length} ids: at most 1000`);
        if (req.vmIds.length > 1000) throw new InvalidArgumentError("vm_ids", `${req.vmIds.length} ids: at most 1000`);
        for (const [i, id] of req.vmIds.entries()) V.token(`vm_ids[${i}]`, id);
        if (req.action !== "" && req.action !== "accept" && req.action !== "reject")
          throw new InvalidArgumentError("action", `${JSON.stringify(req.action.slice(0, 40))}: use "accept", "reject" or leave it empty`);
        if (req.limit > 1000) throw new InvalidArgumentError("limit", `${req.limit}: at most 1000`);
        const recs = filterFlowLogs(tailLines(flowLogs.out.path), {
          action: req.action === "" ? undefined : req.action,
          sinceMs: req.since ? Number(timestampMs(req.since)) : undefined,
          nics: new Set(req.nicIds),
          vms: new Set(req.vmIds),
        });
        const ms = (t: string) => {
          const v = Date.parse(t);
          return Number.isFinite(v) ? timestampFromMs(v) : undefined;
        };
        const n = (v: unknown) => (typeof v === "number" && Number.isSafeInteger(v) && v >= 0 ? v : 0);
        const str = (v: unknown) => (typeof v === "string" ? v.slice(0, 64) : "");
        return {
          path: flowLogs.out.path,
          records: recs.slice(-(req.limit || 100)).map((r) =>
            create(FlowLogRecordSchema, {
              vpcId: str(r.vpc),
              nicId: str(r.nic),
              src: str(r.src),
              dst: str(r.dst),
              srcPort: n(r.sport),
              dstPort: n(r.dport),
              protocol: str(r.proto),
              packets: BigInt(n(r.packets)),
              bytes: BigInt(n(r.bytes)),
              startTime: ms(r.start),
              endTime: ms(r.end),
              action: str(r.action),
              decidedBy: str(r.decided_by),
              vmId: str(r.vm),
            }),
          ),
        };
      },
      getFirewallStatus: async (req) => {
        const st = { ...sync.status };
        const gens = sync.generations();
        if (brNf.length) {
          st.lastError = [st.lastError, ...brNf].filter(Boolean).join("; ");
          st.lastErrorMs ||= Date.now();
        }
        const wanted = new Set(req.nicIds);
        const nics = [];
        for (const [ns, applied] of sync.applied) {
          const counters = await nft.counters(ns);
          const c = (name: string) => counters.get(name) ?? { packets: 0n, bytes: 0n };
          for (const n of applied.state.nics) {
            if (wanted.size && !wanted.has(n.nicId)) continue;
            const inNew = c(nicCounter("cnt_in_new", n.address));
            const inDrop = c(nicCounter("cnt_in_drop", n.address));
            const outNew = c(nicCounter("cnt_out_new", n.address));
            const outDrop = c(nicCounter("cnt_out_drop", n.address));
            nics.push(
              create(NicFirewallStatusSchema, {
                nicId: n.nicId,
                hostInterface: n.hostIf,
                address: n.address,
                // New flows evaluated minus those dropped; established packets bypass the policy.
                ingress: create(FirewallCountersSchema, {
                  acceptedPackets: inNew.packets - inDrop.packets,
                  acceptedBytes: inNew.bytes - inDrop.bytes,
                  droppedPackets: inDrop.packets,
                  droppedBytes: inDrop.bytes,
                }),
                egress: create(FirewallCountersSchema, {
                  acceptedPackets: outNew.packets - outDrop.packets,
                  acceptedBytes: outNew.bytes - outDrop.bytes,
                  droppedPackets: outDrop.packets,
                  droppedBytes: outDrop.bytes,
                }),
                loggingDrops: !!n.dropLogging || n.groupIds.some((g) => applied.state.groups.get(g)?.dropLogging),
              }),
            );
          }
        }
        return {
          hostId,
          health: st.lastError ? FirewallHealth.DEGRADED : FirewallHealth.HEALTHY,
          lastError: st.lastError,
          lastErrorTime: st.lastErrorMs ? timestampFromMs(st.lastErrorMs) : undefined,
          lastApplyTime: st.lastApplyMs ? timestampFromMs(st.lastApplyMs) : undefined,
          lastApplyDurationMs: st.lastApplyDurationMs,
          desiredGeneration: BigInt(gens.desired),
          appliedGeneration: BigInt(gens.applied),
          table: "inet microvpc",
          nicCount: nics.length,
          nics,
          invalidRecords: invalidRecords([OWNER, IPAM_OWNER])
            .slice(0, 100)
            .map((r) =>
              create(FirewallInvalidRecordSchema, {
                kind: r.kind,
                key: JSON.stringify(r.key),
                reason: r.reason,
                field: r.field ?? "",
                vpc: r.vpcId ?? "",
                firstSeenTime: timestampFromMs(r.firstSeenMs),
                lastSeenTime: timestampFromMs(r.lastSeenMs),
              }),
            ),
        };
      },
    };
    return {
      services: firewallRoutes(api, status, flowLogConfigs),
      // Ready once every local VPC's tables are applied (a whole pass without
      // an error), while the last such pass is recent, bridged traffic reaches
      // nft, and Redis answers.
      ready: new ReadyChecks([
        sync.health.condition,
        async () => {
          const p = await checkBrNf();
          return p.length ? p.join("; ") : undefined;
        },
        redisReachable(redis),
      ]),
      close: async () => {
        clearInterval(brNfTimer);
        flowLogGc.stop();
        sync.stop();
        flowLogs?.stop();
      },
    };
  },
};
