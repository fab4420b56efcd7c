// `microvpc fip ...`: floating IPs — public addresses of the gateway's pool,
// mapped 1:1 to a NIC address (GatewayService, on the gateway daemon).
import { create } from "@bufbuild/protobuf";
import type { Command } from "commander";
import * as V from "../../services/common/validate.js";
import { ResourceStateSchema } from "../../gen/microvpc/v1/common_pb.js";
import {
  AllocateFloatingIpRequestSchema,
  AllocateFloatingIpResponseSchema,
  AssociateFloatingIpRequestSchema,
  AssociateFloatingIpResponseSchema,
  DisassociateFloatingIpRequestSchema,
  DisassociateFloatingIpResponseSchema,
  GatewayService,
  GetFloatingIpResponseSchema,
  ListFloatingIpsResponseSchema,
  ReleaseFloatingIpRequestSchema,
  ReleaseFloatingIpResponseSchema,
  type FloatingIp,
} from "../../gen/microvpc/v1/gateway_pb.js";
import { client } from "../lib/context.js";
import { clientTokenOption, descriptionOption, dryRunOption, labelOption, limitOption, vpcOption } from "../lib/options.js";
import { details, dryRun, emit, enumLabel, labels, table, time } from "../lib/output.js";
import { collectSelected } from "../lib/paging.js";
import { selectorFilter, selectorOption } from "../lib/selector.js";

function fipDetails(f: FloatingIp, extra: [string, string][] = []): string {
  return details([
    ["id", f.id],
    ["address", f.address],
    ["associated", f.privateAddress ? `${f.privateAddress} in ${f.vpcId} (${f.nicId} on ${f.hostId})` : "no"],
    ["state", enumLabel(ResourceStateSchema, f.state)],
    ["description", f.description],
    ["labels", labels(f.labels)],
    ["allocated", time(f.allocateTime)],
    ["associated at", time(f.associateTime)],
    ...extra,
  ]);
}

/** A floating IP is named by its id or its public address. */
function checkFip(field: string, v: string): void {
  if (/^fip-/.test(v)) V.id(field, v, "fip");
  else V.ipv4(field, v);
}

export function register(program: Command): void {
  const fip = program.command("fip").description("floating IPs: public addresses mapped 1:1 to NIC addresses (gateway daemon)");

  fip
    .command("allocate")
    .description("allocate a floating IP from the pool: --address, or the lowest free one")
    .option("--address <ip>", "the address wanted, inside the pool", "")
    .addOption(descriptionOption())
    .addOption(labelOption())
    .addOption(clientTokenOption())
    .addOption(dryRunOption())
    .action(async (o, cmd: Command) => {
      const req = create(AllocateFloatingIpRequestSchema, { address: o.address, description: o.description, labels: o.label, clientToken: o.clientToken });
      if (o.dryRun) {
        if (req.address) V.ipv4("address", req.address);
        V.text("description", req.description);
        V.labels("labels", req.labels);
        V.token("client_token", req.clientToken, { optional: true });
        return dryRun(cmd, GatewayService.method.allocateFloatingIp, req);
      }
      const res = await client(cmd, GatewayService).allocateFloatingIp(req);
      emit(cmd, AllocateFloatingIpResponseSchema, res, () => fipDetails(res.floatingIp!));
    });

  fip
    .command("associate <fip>")
    .description("map a floating IP (id or address) to a NIC address: inbound DNAT, outbound SNAT")
    .addOption(vpcOption("", true))
    .requiredOption("--address <ip>", "the NIC's address in the VPC")
    .option("--allow-reassociation", "move it from its current association instead of refusing", false)
    .addOption(dryRunOption())
    .action(async (ref: string, o, cmd: Command) => {
      const req = create(AssociateFloatingIpRequestSchema, {
        floatingIp: ref,
        vpc: o.vpc,
        privateAddress: o.address,
        allowReassociation: o.allowReassociation,
      });
      if (o.dryRun) {
        checkFip("floating_ip", ref);
        V.ref("vpc", req.vpc, "vpc");
        V.ipv4("private_address", req.privateAddress);
        return dryRun(cmd, GatewayService.method.associateFloatingIp, req);
      }
      const res = await client(cmd, GatewayService).associateFloatingIp(req);
      emit(cmd, AssociateFloatingIpResponseSchema, res, () => fipDetails(res.floatingIp!));
    });

  fip
    .command("disassociate <fip>")
    .description("remove a floating IP's association; flows through it are cut")
    .addOption(dryRunOption())
    .action(async (ref: string, o, cmd: Command) => {
      const req = create(DisassociateFloatingIpRequestSchema, { floatingIp: ref });
      if (o.dryRun) {
        checkFip("floating_ip", ref);
        return dryRun(cmd, GatewayService.method.disassociateFloatingIp, req);
      }
      const res = await client(cmd, GatewayService).disassociateFloatingIp(req);
      emit(cmd, DisassociateFloatingIpResponseSchema, res, () =>
        res.disassociated ? `disassociated ${res.floatingIp!.address}` : `${res.floatingIp!.address} was not associated; nothing changed`,
      );
    });

  fip
    .command("release <fip>")
    .description("return a floating IP to the pool (refused while associated, unless --force)")
    .option("--force", "disassociate it first", false)
    .addOption(dryRunOption())
    .action(async (ref: string, o, cmd: Command) => {
      const req = create(ReleaseFloatingIpRequestSchema, { floatingIp: ref, force: o.force });
      if (o.dryRun) {
        checkFip("floating_ip", ref);
        return dryRun(cmd, GatewayService.method.releaseFloatingIp, req);
      }
      const res = await client(cmd, GatewayService).releaseFloatingIp(req);
      emit(cmd, ReleaseFloatingIpResponseSchema, res, () => (res.released ? `released ${ref}` : `${ref} is not allocated; nothing to release`));
    });

  fip
    .command("get <fip>")
    .description("show one floating IP (by id or address)")
    .action(async (ref: string, _o, cmd: Command) => {
      const res = await client(cmd, GatewayService).getFloatingIp({ ref });
      emit(cmd, GetFloatingIpResponseSchema, res, () => fipDetails(res.floatingIp!));
    });

  fip
    .command("list")
    .description("list allocated floating IPs, ordered by address, with the pool")
    .addOption(vpcOption(": only IPs associated with NICs of this VPC"))
    .addOption(selectorOption())
    .addOption(limitOption())
    .action(async (o, cmd: Command) => {
      const c = client(cmd, GatewayService);
      let pool: string[] = [];
      let poolFree = 0;
      const { items, next } = await collectSelected(o.limit, selectorFilter<FloatingIp>(o.selector), async (pageSize, pageToken) => {
        const r = await c.listFloatingIps({ vpc: o.vpc, pageSize, pageToken });
        pool = r.pool;
        poolFree = r.poolFree;
        return { items: r.floatingIps, next: r.nextPageToken };
      });
      const res = create(ListFloatingIpsResponseSchema, { floatingIps: items, nextPageToken: next, pool, poolFree });
      emit(
        cmd,
        ListFloatingIpsResponseSchema,
        res,
        () => {
          const t = table(
            ["ID", "ADDRESS", "VPC", "PRIVATE ADDRESS", "NIC", "HOST", "DESCRIPTION"],
            items.map((f) => [f.id, f.address, f.vpcId, f.privateAddress, f.nicId, f.hostId, f.description]),
          );
          return `${t}\npool ${pool.join(", ") || "(none configured)"}: ${poolFree} free`;
        },
        () => items.map((f) => `fip/${f.id}`),
      );
    });
}
