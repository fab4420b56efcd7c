// `microvpc nic ...`: the NICs of one hypervisor (its netagent: ListNics,
// GetNic) and their traffic counters (NicStats, read from the kernel at call
// time, seen from the VM: rx is what the VM received).
import { create } from "@bufbuild/protobuf";
import { Option, type Command } from "commander";
import { ResourceStateSchema } from "../../gen/microvpc/v1/common_pb.js";
import {
  GetNicResponseSchema,
  ListNicsResponseSchema,
  NetAgentService,
  NicKindSchema,
  NicStatsResponseSchema,
  type Nic,
} from "../../gen/microvpc/v1/netagent_pb.js";
import { VmService } from "../../gen/microvpc/v1/vm_pb.js";
import { client } from "../lib/context.js";
import { limitOption, vpcOption } from "../lib/options.js";
import { emit, enumLabel, someDetails, table, time } from "../lib/output.js";
import { collect } from "../lib/paging.js";

function nicDetails(n: Nic): string {
  const g = n.guest;
  return someDetails([
    ["id", n.id],
    ["owner", n.owner],
    ["vpc", n.vpcId],
    ["subnet", n.subnetId],
    ["kind", enumLabel(NicKindSchema, n.kind)],
    ["state", enumLabel(ResourceStateSchema, n.state) + (n.statusMessage ? ` (${n.statusMessage})` : "")],
    ["host", n.hostId],
    ["host interface", n.hostInterface],
    ["namespace", n.vpcNetnsPath || n.vpcNamespace],
    ["address", g ? `${g.address}/${g.prefixLength} via ${g.gateway}` : ""],
    ["mac", g?.mac ?? ""],
    ["mtu", g?.mtu ? String(g.mtu) : ""],
    [
      "bandwidth",
      [n.bandwidth?.ingress ? `in ${n.bandwidth.ingress.rateMbps} Mbit/s` : "", n.bandwidth?.egress ? `out ${n.bandwidth.egress.rateMbps} Mbit/s` : ""]
        .filter(Boolean)
        .join(", "),
    ],
    ["created", time(n.createTime)],
  ]);
}

export function register(program: Command): void {
  const nic = program.command("nic").description("NICs of a hypervisor and their traffic counters (netagent)");

  nic
    .command("list")
    .description("list the NICs of this hypervisor, ordered by id")
    .addOption(vpcOption("; default: every VPC"))
    .option("--subnet <id>", "only NICs of this subnet (a name needs --vpc)", "")
    .addOption(new Option("--vm <ref>", "only the NICs of this VM (id, or name with --vpc)"))
    .option("--owner <owner>", "only NICs of this owner (e.g. a VM id)", "")
    .addOption(limitOption())
    .action(async (o, cmd: Command) => {
      let owner: string = o.owner;
      if (o.vm) {
        // The vmm owns its NICs as "<host>/<vm id>".
        const vm = (await client(cmd, VmService).getVm({ ref: o.vm, vpc: o.vpc })).vm!;
        owner = `${vm.hostId}/${vm.id}`;
      }
      const na = client(cmd, NetAgentService);
      const { items, next } = await collect(o.limit, async (pageSize, pageToken) => {
        const r = await na.listNics({ vpc: o.vpc, subnet: o.subnet, owner, pageSize, pageToken });
        return { items: r.nics, next: r.nextPageToken };
      });
      emit(cmd, ListNicsResponseSchema, create(ListNicsResponseSchema, { nics: items, nextPageToken: next }), () =>
        table(
          ["NIC", "OWNER", "VPC", "SUBNET", "ADDRESS", "MAC", "KIND", "INTERFACE", "STATE"],
          items.map((n) => [
            n.id,
            n.owner,
            n.vpcId,
            n.subnetId,
            n.guest?.address ?? "",
            n.guest?.mac ?? "",
            enumLabel(NicKindSchema, n.kind),
            n.hostInterface,
            enumLabel(ResourceStateSchema, n.state),
          ]),
        ),
      );
    });

  nic
    .command("get <nic>")
    .description("show one NIC (id or host-side interface name)")
    .action(async (ref: string, _o, cmd: Command) => {
      const res = await client(cmd, NetAgentService).getNic({ ref });
      emit(cmd, GetNicResponseSchema, res, () => nicDetails(res.nic!));
    });

  nic
    .command("stats [nic...]")
    .description("traffic counters of NICs, seen from the VM (rx: received by the VM), read from the kernel now; default: every NIC")
    .addOption(vpcOption("; with no NIC named, only this VPC's NICs"))
    .addOption(limitOption())
    .action(async (nics: string[], o, cmd: Command) => {
      const na = client(cmd, NetAgentService);
      const { items, next } = await collect(nics.length ? undefined : o.limit, async (pageSize, pageToken) => {
        const r = await na.nicStats({ nics, vpc: nics.length ? "" : o.vpc, pageSize, pageToken });
        return { items: r.nics, next: r.nextPageToken };
      });
      emit(cmd, NicStatsResponseSchema, create(NicStatsResponseSchema, { nics: items, nextPageToken: next }), () =>
        table(
          ["NIC", "INTERFACE", "RX BYTES", "RX PKTS", "RX DROP", "RX ERR", "TX BYTES", "TX PKTS", "TX DROP", "TX ERR", "LIMITED RX/TX"],
          items.map((c) => [
            c.nicId,
            c.hostInterface,
            String(c.rxBytes),
            String(c.rxPackets),
            String(c.rxDropped),
            String(c.rxErrors),
            String(c.txBytes),
            String(c.txPackets),
            String(c.txDropped),
            String(c.txErrors),
            `${c.rxRateLimitedPackets}/${c.txRateLimitedPackets}`,
          ]),
        ),
      );
    });
}
