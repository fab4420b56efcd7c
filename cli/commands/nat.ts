// `microvpc nat ...`: NAT gateways — egress to the outside for a VPC's
// private subnets (GatewayService, on the gateway daemon).
import { create } from "@bufbuild/protobuf";
import type { Command } from "commander";
import * as V from "../../services/common/validate.js";
import { ResourceStateSchema } from "../../gen/microvpc/v1/common_pb.js";
import {
  CreateNatGatewayRequestSchema,
  CreateNatGatewayResponseSchema,
  DeleteNatGatewayRequestSchema,
  DeleteNatGatewayResponseSchema,
  GatewayService,
  GetNatGatewayResponseSchema,
  ListNatGatewaysResponseSchema,
  type NatGateway,
} from "../../gen/microvpc/v1/gateway_pb.js";
import { client } from "../lib/context.js";
import { EXIT } from "../lib/errors.js";
import { clientTokenOption, descriptionOption, dryRunOption, labelOption, limitOption, listOption, vpcOption } from "../lib/options.js";
import { details, dryRun, emit, emitList, enumLabel, labels, time } from "../lib/output.js";
import { collectSelected } from "../lib/paging.js";
import { selectorFilter, selectorOption } from "../lib/selector.js";

function natDetails(n: NatGateway): string {
  return details([
    ["id", n.id],
    ["vpc", n.vpcId],
    ["subnet", n.subnetId],
    ["address", n.address || "none (an older gateway: each VM leaves as its hypervisor)"],
    ["holder", n.holderHostId || (n.address ? "none yet" : "")],
    ["serves", n.sourceSubnetIds.join(" ") || "every private subnet of the VPC"],
    ["state", enumLabel(ResourceStateSchema, n.state) + (n.statusMessage ? ` (${n.statusMessage})` : "")],
    ["description", n.description],
    ["labels", labels(n.labels)],
    ["created", time(n.createTime)],
  ]);
}

/** REF or --vpc, exactly one: what get and delete take. */
function refOrVpc(cmd: Command, ref: string | undefined, vpc: string): { ref: string; vpc: string } {
  if ((ref ? 1 : 0) + (vpc ? 1 : 0) !== 1) {
    cmd.error("error: name the NAT gateway by its id (nat-…) or by its VPC with --vpc, not both", { exitCode: EXIT.usage });
  }
  return { ref: ref ?? "", vpc };
}

export function register(program: Command): void {
  const nat = program.command("nat").description("NAT gateways: egress for a VPC's private subnets (gateway daemon)");

  nat
    .command("create")
    .description("create the NAT gateway of a VPC, placed in one of its public subnets (a VPC has at most one)")
    .addOption(vpcOption("", true))
    .requiredOption("--subnet <ref>", "public subnet of the VPC to place it in (id or name)")
    .addOption(listOption("--source-subnet <ref>", "private subnet to serve (default: every private subnet, also later ones)"))
    .option("--address <ip>", "public address to take from the floating IP pool (default: the lowest free one)", "")
    .addOption(descriptionOption())
    .addOption(labelOption())
    .addOption(clientTokenOption())
    .addOption(dryRunOption())
    .action(async (o, cmd: Command) => {
      const req = create(CreateNatGatewayRequestSchema, {
        vpc: o.vpc,
        subnet: o.subnet,
        sourceSubnets: o.sourceSubnet,
        address: o.address,
        description: o.description,
        labels: o.label,
        clientToken: o.clientToken,
      });
      if (o.dryRun) {
        V.ref("vpc", req.vpc, "vpc");
        V.ref("subnet", req.subnet, "subnet");
        req.sourceSubnets.forEach((s, i) => V.ref(`source_subnets[${i}]`, s, "subnet"));
        if (req.address) V.ipv4("address", req.address);
        V.text("description", req.description);
        V.labels("labels", req.labels);
        V.token("client_token", req.clientToken, { optional: true });
        return dryRun(cmd, GatewayService.method.createNatGateway, req);
      }
      const res = await client(cmd, GatewayService).createNatGateway(req);
      emit(cmd, CreateNatGatewayResponseSchema, res, () => natDetails(res.natGateway!));
    });

  nat
    .command("list")
    .description("list NAT gateways, ordered by VPC name")
    .addOption(vpcOption("; default: every VPC"))
    .addOption(selectorOption())
    .addOption(limitOption())
    .action(async (o, cmd: Command) => {
      const c = client(cmd, GatewayService);
      const { items, next } = await collectSelected(o.limit, selectorFilter<NatGateway>(o.selector), async (pageSize, pageToken) => {
        const r = await c.listNatGateways({ vpc: o.vpc, pageSize, pageToken });
        return { items: r.natGateways, next: r.nextPageToken };
      });
      emitList(
        cmd,
        ListNatGatewaysResponseSchema,
        create(ListNatGatewaysResponseSchema, { natGateways: items, nextPageToken: next }),
        items,
        [
          { head: "ID", get: (n) => n.id },
          { head: "VPC", get: (n) => n.vpcId },
          { head: "SUBNET", get: (n) => n.subnetId },
          { head: "ADDRESS", get: (n) => n.address || "-" },
          { head: "HOLDER", get: (n) => n.holderHostId || "-" },
          { head: "SERVES", get: (n) => n.sourceSubnetIds.join(",") || "all private" },
          { head: "STATE", get: (n) => enumLabel(ResourceStateSchema, n.state) },
          { head: "CREATED", get: (n) => time(n.createTime) },
          { head: "LABELS", get: (n) => labels(n.labels), wide: true },
        ],
        (n) => `nat/${n.id}`,
      );
    });

  nat
    .command("get [ref]")
    .description("show a NAT gateway, by id or by --vpc")
    .addOption(vpcOption(": show this VPC's NAT gateway"))
    .action(async (ref: string | undefined, o, cmd: Command) => {
      const res = await client(cmd, GatewayService).getNatGateway(refOrVpc(cmd, ref, o.vpc));
      emit(cmd, GetNatGatewayResponseSchema, res, () => natDetails(res.natGateway!));
    });

  nat
    .command("delete [ref]")
    .description("delete a NAT gateway, by id or by --vpc: private subnets lose egress, NATed connections are cut")
    .addOption(vpcOption(": delete this VPC's NAT gateway"))
    .addOption(dryRunOption())
    .action(async (ref: string | undefined, o, cmd: Command) => {
      const req = create(DeleteNatGatewayRequestSchema, refOrVpc(cmd, ref, o.vpc));
      if (o.dryRun) {
        if (req.ref) V.id("ref", req.ref, "nat");
        else V.ref("vpc", req.vpc, "vpc");
        return dryRun(cmd, GatewayService.method.deleteNatGateway, req);
      }
      const res = await client(cmd, GatewayService).deleteNatGateway(req);
      const what = req.ref ? `NAT gateway ${req.ref}` : `the NAT gateway of VPC ${req.vpc}`;
      emit(cmd, DeleteNatGatewayResponseSchema, res, () => (res.deleted ? `deleted ${what}` : `${what} does not exist; nothing to delete`));
    });
}
