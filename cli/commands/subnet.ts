// `microvpc subnet ...`: non-overlapping slices of a VPC's CIDR.
import { create } from "@bufbuild/protobuf";
import { Option, type Command } from "commander";
import * as V from "../../services/common/validate.js";
import {
  CreateSubnetRequestSchema,
  CreateSubnetResponseSchema,
  DeleteSubnetRequestSchema,
  DeleteSubnetResponseSchema,
  GetSubnetResponseSchema,
  ListSubnetsResponseSchema,
  SubnetService,
  SubnetType,
  type Subnet,
  type SubnetUsage,
} from "../../gen/microvpc/v1/subnet_pb.js";
import { client } from "../lib/context.js";
import { clientTokenOption, createName, descriptionOption, dryRunOption, integer, labelOption, limitOption, nameOption } from "../lib/options.js";
import { details, dryRun, emit, emitList, labels, time, type Column } from "../lib/output.js";
import { collectSelected } from "../lib/paging.js";
import { selectorFilter, selectorOption } from "../lib/selector.js";

const TYPES: Record<string, SubnetType> = { public: SubnetType.PUBLIC, private: SubnetType.PRIVATE };

function typeName(t: SubnetType): string {
  return t === SubnetType.PUBLIC ? "public" : "private";
}

/** "12 used, 239 free of 256 (5 reserved), 4.8% full": shared with `ip usage`. */
export function usageLine(u: SubnetUsage | undefined): string {
  if (!u) return "";
  const usable = u.used + u.free;
  const pct = usable === 0n ? 0 : (Number(u.used) * 100) / Number(usable);
  return `${u.used} used, ${u.free} free of ${u.total} (${u.reserved} reserved), ${pct.toFixed(1)}% full`;
}

const SUBNET_COLUMNS: Column<Subnet>[] = [
  { head: "ID", get: (s) => s.id },
  { head: "VPC", get: (s) => s.vpcId },
  { head: "NAME", get: (s) => s.name },
  { head: "CIDR", get: (s) => s.cidr },
  { head: "TYPE", get: (s) => typeName(s.type) },
  { head: "GATEWAY", get: (s) => s.gateway },
  { head: "USED", get: (s) => String(s.usage?.used ?? "") },
  { head: "FREE", get: (s) => String(s.usage?.free ?? "") },
  { head: "RESERVED", get: (s) => String(s.usage?.reserved ?? ""), wide: true },
  { head: "LABELS", get: (s) => labels(s.labels), wide: true },
  { head: "CREATED", get: (s) => time(s.createTime), wide: true },
];

function subnetDetails(s: Subnet): string {
  return details([
    ["id", s.id],
    ["vpc", s.vpcId],
    ["name", s.name],
    ["cidr", s.cidr],
    ["type", typeName(s.type)],
    ["gateway", s.gateway],
    ["reserved", s.reservedAddresses.join(" ")],
    ["usage", usageLine(s.usage)],
    ["description", s.description],
    ["labels", labels(s.labels)],
    ["created", time(s.createTime)],
  ]);
}

const vpcOption = (what: string) => new Option("--vpc <ref>", `VPC id or name${what}`).default("");

export function register(program: Command): void {
  const subnet = program.command("subnet").description("subnets: slices of a VPC's CIDR, one L2 segment each");

  subnet
    .command("create [name]")
    .description("create a subnet inside a VPC")
    .requiredOption("--vpc <ref>", "VPC id or name")
    .requiredOption("--cidr <cidr>", "IPv4 CIDR inside the VPC, at most /28, e.g. 10.0.1.0/24")
    .addOption(new Option("--type <type>", "public (egress by default) or private (default)").choices(Object.keys(TYPES)))
    .addOption(
      new Option("--extra-reserved <n>", "addresses reserved after the gateway (default 2, at most 1024; the server checks)").argParser(integer(0, 2 ** 31)),
    )
    .addOption(descriptionOption())
    .addOption(labelOption())
    .addOption(clientTokenOption())
    .addOption(dryRunOption())
    .addOption(nameOption())
    .action(async (nameArg: string | undefined, o, cmd: Command) => {
      const name = createName(cmd, nameArg, o.name);
      const req = create(CreateSubnetRequestSchema, {
        vpc: o.vpc,
        name,
        cidr: o.cidr,
        type: o.type ? TYPES[o.type] : SubnetType.UNSPECIFIED,
        extraReserved: o.extraReserved,
        description: o.description,
        labels: o.label,
        clientToken: o.clientToken,
      });
      if (o.dryRun) {
        V.ref("vpc", req.vpc, "vpc");
        V.name("name", req.name);
        V.cidr("cidr", req.cidr, { min: 8, max: 28 });
        V.text("description", req.description);
        V.labels("labels", req.labels);
        V.token("client_token", req.clientToken, { optional: true });
        return dryRun(cmd, SubnetService.method.createSubnet, req);
      }
      const res = await client(cmd, SubnetService).createSubnet(req);
      emit(
        cmd,
        CreateSubnetResponseSchema,
        res,
        () => subnetDetails(res.subnet!),
        () => [`subnet/${res.subnet!.id}`],
      );
    });

  subnet
    .command("list")
    .description("list subnets, of one VPC or of all")
    .addOption(vpcOption("; default: every VPC"))
    .addOption(selectorOption())
    .addOption(limitOption())
    .action(async (o, cmd: Command) => {
      const c = client(cmd, SubnetService);
      const { items, next } = await collectSelected(o.limit, selectorFilter<Subnet>(o.selector), async (pageSize, pageToken) => {
        const r = await c.listSubnets({ vpc: o.vpc, pageSize, pageToken });
        return { items: r.subnets, next: r.nextPageToken };
      });
      const res = create(ListSubnetsResponseSchema, { subnets: items, nextPageToken: next });
      emitList(cmd, ListSubnetsResponseSchema, res, items, SUBNET_COLUMNS, (s) => `subnet/${s.id}`);
    });

  subnet
    .command("get <ref>")
    .description("show one subnet, with its usage (a name needs --vpc)")
    .addOption(vpcOption("; needed when REF is a name"))
    .action(async (ref: string, o, cmd: Command) => {
      const res = await client(cmd, SubnetService).getSubnet({ ref, vpc: o.vpc });
      emit(
        cmd,
        GetSubnetResponseSchema,
        res,
        () => subnetDetails(res.subnet!),
        () => [`subnet/${res.subnet!.id}`],
      );
    });

  subnet
    .command("delete <ref>")
    .description("delete a subnet (its addresses must be released first; a name needs --vpc)")
    .addOption(vpcOption("; needed when REF is a name"))
    .addOption(dryRunOption())
    .action(async (ref: string, o, cmd: Command) => {
      const req = create(DeleteSubnetRequestSchema, { ref, vpc: o.vpc });
      if (o.dryRun) {
        if (!V.ref("ref", ref, "subnet").id) V.ref("vpc", req.vpc, "vpc");
        return dryRun(cmd, SubnetService.method.deleteSubnet, req);
      }
      const res = await client(cmd, SubnetService).deleteSubnet(req);
      emit(cmd, DeleteSubnetResponseSchema, res, () => (res.deleted ? `deleted subnet ${ref}` : `subnet ${ref} does not exist; nothing to delete`));
    });
}
