// `microvpc vpc ...`: VPCs, the isolated address spaces everything else lives in.
import { create } from "@bufbuild/protobuf";
import type { Command } from "commander";
import { InvalidArgumentError } from "../../services/common/errors.js";
import * as V from "../../services/common/validate.js";
import {
  CreateVpcRequestSchema,
  CreateVpcResponseSchema,
  DeleteVpcRequestSchema,
  DeleteVpcResponseSchema,
  GetVpcResponseSchema,
  ListVpcsResponseSchema,
  VpcService,
  type Vpc,
} from "../../gen/microvpc/v1/vpc_pb.js";
import { client } from "../lib/context.js";
import { clientTokenOption, createName, descriptionOption, dryRunOption, labelOption, limitOption, nameOption } from "../lib/options.js";
import { details, dryRun, emit, emitList, labels, time, type Column } from "../lib/output.js";
import { collectSelected } from "../lib/paging.js";
import { selectorFilter, selectorOption } from "../lib/selector.js";
import * as peer from "./peer.js";

export const VPC_COLUMNS: Column<Vpc>[] = [
  { head: "ID", get: (v) => v.id },
  { head: "NAME", get: (v) => v.name },
  { head: "CIDR", get: (v) => v.cidr },
  { head: "SUBNETS", get: (v) => String(v.subnetCount) },
  { head: "LABELS", get: (v) => labels(v.labels) },
  { head: "CREATED", get: (v) => time(v.createTime) },
  { head: "PUBLIC CIDR", get: (v) => (v.publicCidr ? "yes" : "no"), wide: true },
  { head: "DESCRIPTION", get: (v) => v.description, wide: true },
];

function vpcDetails(v: Vpc): string {
  return details([
    ["id", v.id],
    ["name", v.name],
    ["cidr", v.cidr + (v.publicCidr ? " (public space)" : "")],
    ["subnets", String(v.subnetCount)],
    ["description", v.description],
    ["labels", labels(v.labels)],
    ["created", time(v.createTime)],
  ]);
}

export function register(program: Command): void {
  const vpc = program.command("vpc").description("VPCs: isolated private IPv4 address spaces");

  vpc
    .command("create [name]")
    .description("create a VPC")
    .requiredOption("--cidr <cidr>", "IPv4 CIDR from /8 to /28, e.g. 10.0.0.0/16")
    .addOption(descriptionOption())
    .addOption(labelOption())
    .option("--allow-public-cidr", "permit a CIDR outside the private ranges", false)
    .addOption(clientTokenOption())
    .addOption(dryRunOption())
    .addOption(nameOption())
    .action(async (nameArg: string | undefined, o, cmd: Command) => {
      const name = createName(cmd, nameArg, o.name);
      const req = create(CreateVpcRequestSchema, {
        name,
        cidr: o.cidr,
        description: o.description,
        labels: o.label,
        allowPublicCidr: o.allowPublicCidr,
        clientToken: o.clientToken,
      });
      if (o.dryRun) {
        V.name("name", req.name);
        const c = V.cidr("cidr", req.cidr, { min: 8, max: 28 });
        if (!req.allowPublicCidr && !V.isPrivate(c))
          throw new InvalidArgumentError("cidr", `${c.text} is not in a private range; add --allow-public-cidr to use public space`);
        V.text("description", req.description);
        V.labels("labels", req.labels);
        V.token("client_token", req.clientToken, { optional: true });
        return dryRun(cmd, VpcService.method.createVpc, req);
      }
      const res = await client(cmd, VpcService).createVpc(req);
      emit(
        cmd,
        CreateVpcResponseSchema,
        res,
        () => vpcDetails(res.vpc!),
        () => [`vpc/${res.vpc!.name}`],
      );
    });

  vpc
    .command("list")
    .description("list VPCs, ordered by name")
    .addOption(selectorOption())
    .addOption(limitOption())
    .action(async (o, cmd: Command) => {
      const c = client(cmd, VpcService);
      const { items, next } = await collectSelected(o.limit, selectorFilter<Vpc>(o.selector), async (pageSize, pageToken) => {
        const r = await c.listVpcs({ pageSize, pageToken });
        return { items: r.vpcs, next: r.nextPageToken };
      });
      const res = create(ListVpcsResponseSchema, { vpcs: items, nextPageToken: next });
      emitList(cmd, ListVpcsResponseSchema, res, items, VPC_COLUMNS, (v) => `vpc/${v.name}`);
    });

  vpc
    .command("get <ref>")
    .description("show one VPC (by id or name)")
    .action(async (ref: string, _o, cmd: Command) => {
      const res = await client(cmd, VpcService).getVpc({ ref });
      emit(
        cmd,
        GetVpcResponseSchema,
        res,
        () => vpcDetails(res.vpc!),
        () => [`vpc/${res.vpc!.name}`],
      );
    });

  vpc
    .command("delete <ref>")
    .description("delete a VPC (its subnets must be deleted first)")
    .addOption(dryRunOption())
    .action(async (ref: string, o, cmd: Command) => {
      if (o.dryRun) {
        V.ref("ref", ref, "vpc");
        return dryRun(cmd, VpcService.method.deleteVpc, create(DeleteVpcRequestSchema, { ref }));
      }
      const res = await client(cmd, VpcService).deleteVpc({ ref });
      emit(cmd, DeleteVpcResponseSchema, res, () => (res.deleted ? `deleted vpc ${ref}` : `vpc ${ref} does not exist; nothing to delete`));
    });

  peer.register(vpc);
}
