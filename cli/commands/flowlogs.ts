// `microvpc flow-logs`: a hypervisor's flow-log records (firewall
// ListFlowLogs; the firewall runs with --flow-logs, docs/flow-logs.md), and
// `microvpc flow-logs config ...`: which VPCs, subnets or NICs log
// (FlowLogConfig, cluster-wide).
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { InvalidArgumentError, Option, type Command } from "commander";
import {
  CreateFlowLogConfigResponseSchema,
  DeleteFlowLogConfigResponseSchema,
  FirewallService,
  GetFlowLogConfigResponseSchema,
  ListFlowLogConfigsResponseSchema,
  ListFlowLogsResponseSchema,
  type FlowLogConfig,
} from "../../gen/microvpc/v1/firewall_pb.js";
import { VmService } from "../../gen/microvpc/v1/vm_pb.js";
import { client } from "../lib/context.js";
import { descriptionOption, integer, vpcOption } from "../lib/options.js";
import { details, emit, emitList, table, time } from "../lib/output.js";

/** "90s", "5m", "2h", "1d" → milliseconds. */
export function parseSince(v: string): number {
  const m = /^([0-9]{1,6})(s|m|h|d)$/.exec(v);
  if (!m) throw new InvalidArgumentError(`${JSON.stringify(v)}: a duration like 90s, 5m, 2h or 1d`);
  return Number(m[1]) * { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[m[2] as "s" | "m" | "h" | "d"];
}

/** --sample-rate: 0 < r ≤ 1 (the server checks it too). */
function sampleRate(v: string): number {
  const r = Number(v);
  if (!/^[0-9.]{1,20}$/.test(v) || !Number.isFinite(r) || r <= 0 || r > 1) throw new InvalidArgumentError(`${JSON.stringify(v)}: a number with 0 < rate ≤ 1`);
  return r;
}

function configDetails(c: FlowLogConfig): string {
  return details([
    ["id", c.id],
    ["vpc", c.vpcId],
    ["resource", c.resourceId],
    ["sample rate", String(c.sampleRate)],
    ["description", c.description],
    ["created", time(c.createTime)],
  ]);
}

export function register(program: Command): void {
  const flowLogs = program
    .command("flow-logs")
    .description("flow-log records of this hypervisor's NICs, the newest last (firewall --flow-logs)")
    .addOption(new Option("--vm <ref>", "only the flows of this VM's NICs (id, or name with --vpc)"))
    .addOption(vpcOption("; with --vm NAME"))
    .option("--nic <id...>", "only the flows of these NICs")
    .addOption(new Option("--action <action>", "only accepted or rejected flows").choices(["accept", "reject"]))
    .option("--since <duration>", "only flows that ended within this long (90s, 5m, 2h, 1d)", parseSince)
    .option("--limit <n>", "at most this many records, the newest", integer(1, 1000), 100)
    .action(async (o, cmd: Command) => {
      const nicIds: string[] = [...(o.nic ?? [])];
      const vmIds: string[] = [];
      if (o.vm) {
        // The records name the VM (the NIC's owner); its current NICs are asked for too, should a record predate that.
        const vm = (await client(cmd, VmService).getVm({ ref: o.vm, vpc: o.vpc })).vm!;
        vmIds.push(vm.id);
        nicIds.push(...vm.nics.map((n) => n.id));
      }
      const r = await client(cmd, FirewallService).listFlowLogs({
        nicIds,
        vmIds,
        action: o.action ?? "",
        since: o.since ? timestampFromMs(Date.now() - o.since) : undefined,
        limit: o.limit,
      });
      emit(cmd, ListFlowLogsResponseSchema, create(ListFlowLogsResponseSchema, r), () =>
        table(
          ["END", "NIC", "VM", "PROTO", "SOURCE", "DESTINATION", "PACKETS", "BYTES", "ACTION", "DECIDED BY"],
          r.records.map((x) => [
            time(x.endTime),
            x.nicId,
            x.vmId,
            x.protocol,
            `${x.src}:${x.srcPort}`,
            `${x.dst}:${x.dstPort}`,
            String(x.packets),
            String(x.bytes),
            x.action,
            x.decidedBy,
          ]),
        ),
      );
    });

  const config = flowLogs.command("config").description("which VPCs, subnets or NICs log their flows, and the share sampled (FlowLogConfig)");
  config
    .command("create")
    .description("log the flows of a VPC's, a subnet's or one NIC's NICs on every hypervisor whose firewall runs with --flow-logs")
    .argument("<resource>", "a VPC, subnet or NIC id")
    .option("--sample-rate <r>", "the share of flows recorded, 0 < r ≤ 1", sampleRate, 1)
    .addOption(descriptionOption())
    .action(async (resource: string, o, cmd: Command) => {
      const r = await client(cmd, FirewallService).createFlowLogConfig({ resourceId: resource, sampleRate: o.sampleRate, description: o.description });
      emit(cmd, CreateFlowLogConfigResponseSchema, create(CreateFlowLogConfigResponseSchema, r), () => configDetails(r.config!));
    });
  config
    .command("get")
    .description("one flow-log configuration")
    .argument("<id>", "its id (fl-…)")
    .action(async (id: string, _o, cmd: Command) => {
      const r = await client(cmd, FirewallService).getFlowLogConfig({ id });
      emit(cmd, GetFlowLogConfigResponseSchema, create(GetFlowLogConfigResponseSchema, r), () => configDetails(r.config!));
    });
  config
    .command("list")
    .description("the flow-log configurations, of one VPC or all")
    .addOption(vpcOption())
    .action(async (o, cmd: Command) => {
      const r = await client(cmd, FirewallService).listFlowLogConfigs({ vpc: o.vpc });
      emitList(
        cmd,
        ListFlowLogConfigsResponseSchema,
        create(ListFlowLogConfigsResponseSchema, r),
        r.configs,
        [
          { head: "ID", get: (c) => c.id },
          { head: "VPC", get: (c) => c.vpcId },
          { head: "RESOURCE", get: (c) => c.resourceId },
          { head: "SAMPLE RATE", get: (c) => String(c.sampleRate) },
          { head: "DESCRIPTION", get: (c) => c.description },
        ],
        (c) => `flowlogconfig/${c.id}`,
      );
    });
  config
    .command("delete")
    .description("stop logging what a configuration covers (succeeds if it is gone)")
    .argument("<id>", "its id (fl-…)")
    .action(async (id: string, _o, cmd: Command) => {
      const r = await client(cmd, FirewallService).deleteFlowLogConfig({ id });
      emit(cmd, DeleteFlowLogConfigResponseSchema, create(DeleteFlowLogConfigResponseSchema, r), () =>
        r.deleted ? `deleted ${id}` : `${id} was already gone`,
      );
    });
}
