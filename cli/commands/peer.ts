// `microvpc vpc peer ...`: VPC peering (PeeringService, on the ipam daemon).
// A subgroup of `vpc`, registered by vpc.ts.
import { create } from "@bufbuild/protobuf";
import type { Command } from "commander";
import { InvalidArgumentError } from "../../services/common/errors.js";
import * as V from "../../services/common/validate.js";
import { ResourceStateSchema } from "../../gen/microvpc/v1/common_pb.js";
import {
  CreatePeeringRequestSchema,
  CreatePeeringResponseSchema,
  DeletePeeringRequestSchema,
  DeletePeeringResponseSchema,
  GetPeeringResponseSchema,
  ListPeeringsResponseSchema,
  PeeringService,
  type Peering,
} from "../../gen/microvpc/v1/peering_pb.js";
import { VpcService } from "../../gen/microvpc/v1/vpc_pb.js";
import { client } from "../lib/context.js";
import { EXIT } from "../lib/errors.js";
import { clientTokenOption, descriptionOption, dryRunOption, labelOption, limitOption, listOption } from "../lib/options.js";
import { details, dryRun, emit, emitList, enumLabel, labels, time } from "../lib/output.js";
import { collectSelected } from "../lib/paging.js";
import { selectorFilter, selectorOption } from "../lib/selector.js";

function peeringDetails(p: Peering): string {
  return details([
    ["id", p.id],
    ["name", p.name],
    ["vpc1", `${p.vpc1Id}: ${p.vpc1AllowedCidrs.join(" ") || "whole VPC"}`],
    ["vpc2", `${p.vpc2Id}: ${p.vpc2AllowedCidrs.join(" ") || "whole VPC"}`],
    ["state", enumLabel(ResourceStateSchema, p.state) + (p.statusMessage ? ` (${p.statusMessage})` : "")],
    ["description", p.description],
    ["labels", labels(p.labels)],
    ["created", time(p.createTime)],
  ]);
}

/** vpcctl's --allow-cidrs mixes both sides; each CIDR goes to the VPC that contains it. */
async function splitCidrs(cmd: Command, vpc1: string, vpc2: string, cidrs: string[]): Promise<{ a: string[]; b: string[] }> {
  if (cidrs.length === 0) return { a: [], b: [] };
  const c = client(cmd, VpcService);
  const [v1, v2] = await Promise.all([c.getVpc({ ref: vpc1 }), c.getVpc({ ref: vpc2 })]);
  const c1 = V.cidr("vpc1", v1.vpc!.cidr, { min: 0, max: 32 });
  const c2 = V.cidr("vpc2", v2.vpc!.cidr, { min: 0, max: 32 });
  const out = { a: [] as string[], b: [] as string[] };
  for (const text of cidrs) {
    const x = V.cidr("--allow-cidrs", text, { min: 0, max: 32 });
    if (V.contains(c1, x)) out.a.push(x.text);
    else if (V.contains(c2, x)) out.b.push(x.text);
    else throw new InvalidArgumentError("--allow-cidrs", `${x.text} is in neither VPC: ${v1.vpc!.name} is ${c1.text}, ${v2.vpc!.name} is ${c2.text}`);
  }
  return out;
}

/** REF, or --vpc1 and --vpc2: what get and delete take. */
function which(cmd: Command, ref: string | undefined, o: { vpc1?: string; vpc2?: string }): { ref: string; vpc1: string; vpc2: string } {
  const byPair = !!(o.vpc1 && o.vpc2);
  if (ref ? !!(o.vpc1 || o.vpc2) : !byPair) {
    cmd.error("error: name the peering by its id or name, or by --vpc1 and --vpc2", { exitCode: EXIT.usage });
  }
  return { ref: ref ?? "", vpc1: o.vpc1 ?? "", vpc2: o.vpc2 ?? "" };
}

export function register(vpc: Command): void {
  const peer = vpc.command("peer").description("VPC peering: connect two VPCs whose CIDRs do not overlap (ipam daemon)");

  peer
    .command("create")
    .description("peer two VPCs; either side may open connections, security groups still apply")
    .requiredOption("--vpc1 <ref>", "first VPC (id or name)")
    .requiredOption("--vpc2 <ref>", "second VPC (id or name)")
    .addOption(listOption("--allow-cidrs <cidr>", "CIDRs of either VPC allowed across (default: both whole VPCs)"))
    .option("--name <name>", "name of the peering (default: VPC1--VPC2)", "")
    .addOption(descriptionOption())
    .addOption(labelOption())
    .addOption(clientTokenOption())
    .addOption(dryRunOption())
    .action(async (o, cmd: Command) => {
      const { a, b } = await splitCidrs(cmd, o.vpc1, o.vpc2, o.allowCidrs);
      const req = create(CreatePeeringRequestSchema, {
        vpc1: o.vpc1,
        vpc2: o.vpc2,
        vpc1AllowedCidrs: a,
        vpc2AllowedCidrs: b,
        name: o.name,
        description: o.description,
        labels: o.label,
        clientToken: o.clientToken,
      });
      if (o.dryRun) {
        V.ref("vpc1", req.vpc1, "vpc");
        V.ref("vpc2", req.vpc2, "vpc");
        if (req.name) V.name("name", req.name);
        V.text("description", req.description);
        V.labels("labels", req.labels);
        V.token("client_token", req.clientToken, { optional: true });
        return dryRun(cmd, PeeringService.method.createPeering, req);
      }
      const res = await client(cmd, PeeringService).createPeering(req);
      emit(cmd, CreatePeeringResponseSchema, res, () => peeringDetails(res.peering!));
    });

  peer
    .command("list")
    .description("list peerings, ordered by name")
    .option("--vpc <ref>", "only peerings with this VPC on either side", "")
    .addOption(selectorOption())
    .addOption(limitOption())
    .action(async (o, cmd: Command) => {
      const c = client(cmd, PeeringService);
      const { items, next } = await collectSelected(o.limit, selectorFilter<Peering>(o.selector), async (pageSize, pageToken) => {
        const r = await c.listPeerings({ vpc: o.vpc, pageSize, pageToken });
        return { items: r.peerings, next: r.nextPageToken };
      });
      emitList(
        cmd,
        ListPeeringsResponseSchema,
        create(ListPeeringsResponseSchema, { peerings: items, nextPageToken: next }),
        items,
        [
          { head: "ID", get: (p) => p.id },
          { head: "NAME", get: (p) => p.name },
          { head: "VPC1", get: (p) => p.vpc1Id },
          { head: "VPC2", get: (p) => p.vpc2Id },
          { head: "ALLOWED", get: (p) => [...p.vpc1AllowedCidrs, ...p.vpc2AllowedCidrs].join(",") || "whole VPCs" },
          { head: "STATE", get: (p) => enumLabel(ResourceStateSchema, p.state) },
          { head: "LABELS", get: (p) => labels(p.labels), wide: true },
          { head: "CREATED", get: (p) => time(p.createTime), wide: true },
        ],
        (p) => `peering/${p.id}`,
      );
    });

  peer
    .command("get [ref]")
    .description("show a peering, by id or name, or by --vpc1 and --vpc2")
    .option("--vpc1 <ref>", "one VPC of the peering")
    .option("--vpc2 <ref>", "the other VPC")
    .action(async (ref: string | undefined, o, cmd: Command) => {
      const res = await client(cmd, PeeringService).getPeering(which(cmd, ref, o));
      emit(cmd, GetPeeringResponseSchema, res, () => peeringDetails(res.peering!));
    });

  peer
    .command("delete [ref]")
    .description("delete a peering (by id or name, or by --vpc1 and --vpc2); flows across it are cut")
    .option("--vpc1 <ref>", "one VPC of the peering")
    .option("--vpc2 <ref>", "the other VPC")
    .addOption(dryRunOption())
    .action(async (ref: string | undefined, o, cmd: Command) => {
      const req = create(DeletePeeringRequestSchema, which(cmd, ref, o));
      if (o.dryRun) {
        if (req.ref) V.ref("ref", req.ref, "pcx");
        else {
          V.ref("vpc1", req.vpc1, "vpc");
          V.ref("vpc2", req.vpc2, "vpc");
        }
        return dryRun(cmd, PeeringService.method.deletePeering, req);
      }
      const res = await client(cmd, PeeringService).deletePeering(req);
      const what = req.ref ? `peering ${req.ref}` : `the peering of ${req.vpc1} and ${req.vpc2}`;
      emit(cmd, DeletePeeringResponseSchema, res, () => (res.deleted ? `deleted ${what}` : `${what} does not exist; nothing to delete`));
    });
}
