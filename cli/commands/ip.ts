// `microvpc ip ...`: address allocation inside subnets.
import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { create } from "@bufbuild/protobuf";
import { Option, type Command } from "commander";
import * as V from "../../services/common/validate.js";
import {
  AllocateBatchRequestSchema,
  AllocateBatchResponseSchema,
  AllocateRequestSchema,
  AllocateResponseSchema,
  GetAllocationResponseSchema,
  GetUtilizationResponseSchema,
  IpamService,
  ListAllocationsResponseSchema,
  ReclaimRequestSchema,
  ReclaimResponseSchema,
  ReleaseRequestSchema,
  ReleaseResponseSchema,
  type Allocation,
} from "../../gen/microvpc/v1/ipam_pb.js";
import { client } from "../lib/context.js";
import { EXIT } from "../lib/errors.js";
import { dryRunOption, integer, limitOption } from "../lib/options.js";
import { details, dryRun, emit, table, time } from "../lib/output.js";
import { collect } from "../lib/paging.js";
import { subnetId } from "../lib/resolve.js";
import { usageLine } from "./subnet.js";

const subnetOption = (required: boolean) => {
  const o = new Option("--subnet <id>", "subnet id (or a name, with --vpc)");
  return required ? o.makeOptionMandatory() : o;
};
const vpcOption = () => new Option("--vpc <ref>", "VPC id or name, to look up --subnet by name");

function allocTable(as: Allocation[]): string {
  return table(
    ["ADDRESS", "SUBNET", "OWNER", "REQUEST ID", "ALLOCATED"],
    as.map((a) => [`${a.address}/${a.prefixLength}`, a.subnetId, a.owner, a.requestId, time(a.allocateTime)]),
  );
}

function allocDetails(a: Allocation, extra: [string, string][] = []): string {
  return details([
    ["address", `${a.address}/${a.prefixLength}`],
    ["gateway", a.gateway],
    ["subnet", a.subnetId],
    ["owner", a.owner],
    ["request id", a.requestId],
    ["allocated", time(a.allocateTime)],
    ...extra,
  ]);
}

/** --live and --live-file together; a file holds one owner a line, # comments allowed. */
function liveOwners(cmd: Command, live: string[] | undefined, file: string | undefined): string[] {
  if (live === undefined && file === undefined) {
    cmd.error(
      "error: say which owners are alive with --live OWNER... or --live-file FILE (an empty file means none is); reclaim frees every other address in scope",
      {
        exitCode: EXIT.usage,
      },
    );
  }
  let text = "";
  try {
    if (file !== undefined) text = readFileSync(file, "utf8");
  } catch (err) {
    cmd.error(`error: cannot read --live-file: ${(err as Error).message}`, { exitCode: EXIT.usage });
  }
  const fromFile = text
    .split("\n")
    .map((l) => l.replace(/#.*/, "").trim())
    .filter((l) => l !== "");
  return [...(live ?? []), ...fromFile];
}

export function register(program: Command): void {
  const ip = program.command("ip").description("addresses: allocate, release, inspect, reclaim leaks");

  ip.command("allocate")
    .description("allocate an address (the lowest free one, or --address); retrying with the same --owner and --request-id returns the same address")
    .addOption(subnetOption(true))
    .addOption(vpcOption())
    .requiredOption("--owner <owner>", 'who holds the address, e.g. "vm-1234" or "hv1/vm-1234"')
    .option("--request-id <id>", "idempotency key (default: a new random UUID, printed)")
    .option("--address <ip>", "the address wanted, inside the subnet and not reserved", "")
    .option("--count <n>", 'allocate n addresses at once, all or none (AllocateBatch): each held under request id "<request id>/<i>"', integer(1, 1024))
    .addOption(dryRunOption())
    .action(async (o, cmd: Command) => {
      if (o.count !== undefined) {
        if (o.address) cmd.error("error: --count and --address do not go together", { exitCode: EXIT.usage });
        const breq = create(AllocateBatchRequestSchema, {
          subnetId: await subnetId(cmd, o.subnet, o.vpc),
          owner: o.owner,
          requestId: o.requestId ?? randomUUID(),
          count: o.count,
        });
        if (o.dryRun) {
          V.token("owner", breq.owner);
          V.token("request_id", breq.requestId);
          return dryRun(cmd, IpamService.method.allocateBatch, breq);
        }
        const bres = await client(cmd, IpamService)
          .allocateBatch(breq)
          .catch((err: unknown) => {
            if (!o.requestId) process.stderr.write(`note: request id was ${breq.requestId}; retry with --request-id ${breq.requestId}\n`);
            throw err;
          });
        return emit(cmd, AllocateBatchResponseSchema, bres, () =>
          [allocTable(bres.allocations), bres.created ? "" : "(an earlier call with this owner and request id made them)"].filter(Boolean).join("\n"),
        );
      }
      const req = create(AllocateRequestSchema, {
        subnetId: await subnetId(cmd, o.subnet, o.vpc),
        owner: o.owner,
        requestId: o.requestId ?? randomUUID(),
        address: o.address,
      });
      if (o.dryRun) {
        V.token("owner", req.owner);
        V.token("request_id", req.requestId);
        if (req.address !== "") V.ipv4("address", req.address);
        return dryRun(cmd, IpamService.method.allocate, req);
      }
      const res = await client(cmd, IpamService)
        .allocate(req)
        .catch((err: unknown) => {
          // The call may have taken an address before failing; only the same
          // request id gets that one back instead of a second.
          if (!o.requestId) process.stderr.write(`note: request id was ${req.requestId}; retry with --request-id ${req.requestId}\n`);
          throw err;
        });
      emit(cmd, AllocateResponseSchema, res, () =>
        allocDetails(res.allocation!, [["created", res.created ? "yes" : "no (an earlier call with this owner and request id made it)"]]),
      );
    });

  ip.command("release")
    .description("release an address, by --address or by --owner and --request-id; releasing a free address succeeds")
    .addOption(subnetOption(true))
    .addOption(vpcOption())
    .option("--address <ip>", "the address to release")
    .option("--owner <owner>", "release only if this owner holds it")
    .option("--request-id <id>", "with --owner and no --address: release what that allocation took")
    .addOption(dryRunOption())
    .action(async (o, cmd: Command) => {
      if (!o.address && !(o.owner && o.requestId)) cmd.error("error: give --address, or --owner and --request-id", { exitCode: EXIT.usage });
      const req = create(ReleaseRequestSchema, {
        subnetId: await subnetId(cmd, o.subnet, o.vpc),
        address: o.address ?? "",
        owner: o.owner ?? "",
        requestId: o.requestId ?? "",
      });
      if (o.dryRun) {
        if (req.address !== "") V.ipv4("address", req.address);
        V.token("owner", req.owner, { optional: true });
        V.token("request_id", req.requestId, { optional: true });
        return dryRun(cmd, IpamService.method.release, req);
      }
      const res = await client(cmd, IpamService).release(req);
      emit(cmd, ReleaseResponseSchema, res, () =>
        res.released
          ? `released ${res.address} in ${req.subnetId}`
          : `nothing to release: ${req.address || "the allocation"} is already free in ${req.subnetId}`,
      );
    });

  ip.command("list")
    .description("list allocations of a subnet (in address order) or of an owner")
    .addOption(subnetOption(false))
    .addOption(vpcOption())
    .option("--owner <owner>", "only this owner's allocations")
    .addOption(limitOption())
    .action(async (o, cmd: Command) => {
      if (!o.subnet && !o.owner) cmd.error("error: give --subnet, --owner, or both", { exitCode: EXIT.usage });
      const sid = o.subnet ? await subnetId(cmd, o.subnet, o.vpc) : "";
      const c = client(cmd, IpamService);
      const { items, next } = await collect(o.limit, async (pageSize, pageToken) => {
        const r = await c.listAllocations({ subnetId: sid, owner: o.owner ?? "", pageSize, pageToken });
        return { items: r.allocations, next: r.nextPageToken };
      });
      emit(cmd, ListAllocationsResponseSchema, create(ListAllocationsResponseSchema, { allocations: items, nextPageToken: next }), () => allocTable(items));
    });

  ip.command("get <address>")
    .description("show who holds an address")
    .addOption(subnetOption(true))
    .addOption(vpcOption())
    .action(async (address: string, o, cmd: Command) => {
      const res = await client(cmd, IpamService).getAllocation({ subnetId: await subnetId(cmd, o.subnet, o.vpc), address });
      emit(cmd, GetAllocationResponseSchema, res, () => allocDetails(res.allocation!));
    });

  ip.command("usage")
    .description("show how many addresses of a subnet are used and free")
    .addOption(subnetOption(true))
    .addOption(vpcOption())
    .action(async (o, cmd: Command) => {
      const res = await client(cmd, IpamService).getUtilization({ subnetId: await subnetId(cmd, o.subnet, o.vpc) });
      const u = res.usage!;
      emit(cmd, GetUtilizationResponseSchema, res, () =>
        details([
          ["subnet", res.subnetId],
          ["total", String(u.total)],
          ["reserved", String(u.reserved)],
          ["used", String(u.used)],
          ["free", String(u.free)],
          ["summary", usageLine(u)],
        ]),
      );
    });

  ip.command("reclaim")
    .description("free the addresses of owners that are gone: those in scope whose owner is not live and that are older than the grace period")
    .addOption(subnetOption(false))
    .addOption(vpcOption())
    .option("--owner-prefix <prefix>", 'only owners starting with this, e.g. "hv1/"', "")
    .option("--live <owner...>", "owners that are alive; their addresses are kept")
    .option("--live-file <file>", "file of live owners, one a line")
    .addOption(new Option("--grace-seconds <n>", "keep allocations younger than this (server default 60)").argParser(integer(0, 2 ** 32 - 1)))
    // Unlike other commands, the server does reclaim's dry run: only it knows what is held.
    .option("--dry-run", "list what would be freed; free nothing", false)
    .action(async (o, cmd: Command) => {
      const req = create(ReclaimRequestSchema, {
        subnetId: o.subnet ? await subnetId(cmd, o.subnet, o.vpc) : "",
        ownerPrefix: o.ownerPrefix,
        liveOwners: liveOwners(cmd, o.live, o.liveFile),
        graceSeconds: o.graceSeconds,
        dryRun: o.dryRun,
      });
      const res = await client(cmd, IpamService).reclaim(req);
      emit(cmd, ReclaimResponseSchema, res, () => {
        const verb = req.dryRun ? "would reclaim" : "reclaimed";
        const summary = `${verb} ${res.reclaimed.length} address(es), kept ${res.kept}`;
        return res.reclaimed.length === 0 ? summary : `${allocTable(res.reclaimed)}\n${summary}`;
      });
    });
}
