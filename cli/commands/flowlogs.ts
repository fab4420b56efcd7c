// `microvpc flow-logs`: a hypervisor's flow-log records (firewall
// ListFlowLogs; the firewall runs with --flow-logs, docs/flow-logs.md).
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { InvalidArgumentError, Option, type Command } from "commander";
import { FirewallService, ListFlowLogsResponseSchema } from "../../gen/microvpc/v1/firewall_pb.js";
import { VmService } from "../../gen/microvpc/v1/vm_pb.js";
import { client } from "../lib/context.js";
import { integer, vpcOption } from "../lib/options.js";
import { emit, table, time } from "../lib/output.js";

/** "90s", "5m", "2h", "1d" → milliseconds. */
export function parseSince(v: string): number {
  const m = /^([0-9]{1,6})(s|m|h|d)$/.exec(v);
  if (!m) throw new InvalidArgumentError(`${JSON.stringify(v)}: a duration like 90s, 5m, 2h or 1d`);
  return Number(m[1]) * { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[m[2] as "s" | "m" | "h" | "d"];
}

export function register(program: Command): void {
  program
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
      if (o.vm) {
        const vm = (await client(cmd, VmService).getVm({ ref: o.vm, vpc: o.vpc })).vm!;
        nicIds.push(...vm.nics.map((n) => n.id));
      }
      const r = await client(cmd, FirewallService).listFlowLogs({
        nicIds,
        action: o.action ?? "",
        since: o.since ? timestampFromMs(Date.now() - o.since) : undefined,
        limit: o.limit,
      });
      emit(cmd, ListFlowLogsResponseSchema, create(ListFlowLogsResponseSchema, r), () =>
        table(
          ["END", "NIC", "PROTO", "SOURCE", "DESTINATION", "PACKETS", "BYTES", "ACTION", "DECIDED BY"],
          r.records.map((x) => [
            time(x.endTime),
            x.nicId,
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
}
