// `microvpc dns ...`: VPC-internal DNS — the NAME.VPC.internal records and
// each VPC's resolver configuration (DnsService, on the ipam daemon).
import { create } from "@bufbuild/protobuf";
import { Option, type Command } from "commander";
import { InvalidArgumentError } from "../../services/common/errors.js";
import * as V from "../../services/common/validate.js";
import { forwarders as checkForwarders, label, ttl } from "../../services/dns/service.js";
import {
  DeleteDnsRecordRequestSchema,
  DeleteDnsRecordResponseSchema,
  DnsService,
  GetDnsConfigResponseSchema,
  ListDnsRecordsResponseSchema,
  SetDnsRecordRequestSchema,
  SetDnsRecordResponseSchema,
  UpdateDnsConfigRequestSchema,
  UpdateDnsConfigResponseSchema,
  type DnsConfig,
  type DnsRecord,
} from "../../gen/microvpc/v1/dns_pb.js";
import { client } from "../lib/context.js";
import { EXIT } from "../lib/errors.js";
import { dryRunOption, integer, limitOption, listOption, vpcOption } from "../lib/options.js";
import { details, dryRun, emit, table, time } from "../lib/output.js";
import { collect } from "../lib/paging.js";

function recordDetails(r: DnsRecord): string {
  return details([
    ["fqdn", r.fqdn],
    ["address", r.address],
    ["ttl", `${r.ttlSeconds}s`],
    ["owner", r.owner],
    ["vpc", r.vpcId],
    ["updated", time(r.updateTime)],
  ]);
}

function configDetails(c: DnsConfig): string {
  const fwd = c.forwarders?.addresses.join(" ") || "none (names outside .internal get REFUSED)";
  return details([
    ...(c.vpcId
      ? ([
          ["vpc", c.vpcId],
          ["domain", c.domain],
          ["resolver", c.resolverAddress],
          ["forwarders", `${fwd}${c.forwardersInherited ? " (inherited from the defaults)" : ""}`],
        ] as [string, string][])
      : ([["forwarders", `${fwd} (defaults every VPC inherits)`]] as [string, string][])),
    ["record ttl", `${c.recordTtlSeconds}s`],
    ["updated", c.updateTime ? time(c.updateTime) : "never"],
  ]);
}

export function register(program: Command): void {
  const dns = program.command("dns").description("VPC-internal DNS: NAME.VPC.internal records and resolver configuration (ipam daemon)");
  const record = dns.command("record").description("records of a VPC's zone (the vmm writes one per VM)");

  record
    .command("list")
    .description("list a VPC's records, ordered by name")
    .addOption(vpcOption("", true))
    .addOption(new Option("--owner <owner>", "only records of this owner (e.g. a VM id)").default(""))
    .addOption(limitOption())
    .action(async (o, cmd: Command) => {
      const c = client(cmd, DnsService);
      const { items, next } = await collect(o.limit, async (pageSize, pageToken) => {
        const r = await c.listDnsRecords({ vpc: o.vpc, owner: o.owner, pageSize, pageToken });
        return { items: r.records, next: r.nextPageToken };
      });
      emit(cmd, ListDnsRecordsResponseSchema, create(ListDnsRecordsResponseSchema, { records: items, nextPageToken: next }), () =>
        table(
          ["NAME", "ADDRESS", "TTL", "OWNER", "UPDATED"],
          items.map((r) => [r.fqdn, r.address, String(r.ttlSeconds), r.owner, time(r.updateTime)]),
        ),
      );
    });

  record
    .command("set <name> <address>")
    .description("create or replace the A record NAME.VPC.internal → ADDRESS (a name another owner holds is refused)")
    .addOption(vpcOption("", true))
    .requiredOption("--owner <owner>", "who holds the record (e.g. a VM id, or your team); only this owner may replace it")
    .addOption(new Option("--ttl <seconds>", "TTL served with the record, 1–86400 (default: the VPC's record TTL)").argParser(integer(1, 86400)))
    .addOption(dryRunOption())
    .action(async (name: string, address: string, o, cmd: Command) => {
      const req = create(SetDnsRecordRequestSchema, { vpc: o.vpc, name, address, owner: o.owner, ttlSeconds: o.ttl });
      if (o.dryRun) {
        V.ref("vpc", req.vpc, "vpc");
        label("name", req.name);
        V.ipv4("address", req.address);
        V.token("owner", req.owner);
        if (req.ttlSeconds !== undefined) ttl("ttl_seconds", req.ttlSeconds);
        return dryRun(cmd, DnsService.method.setDnsRecord, req);
      }
      const res = await client(cmd, DnsService).setDnsRecord(req);
      emit(cmd, SetDnsRecordResponseSchema, res, () => `${res.created ? "created" : "replaced"}\n${recordDetails(res.record!)}`);
    });

  record
    .command("delete [name]")
    .description("delete a record by name, or every record of --owner")
    .addOption(vpcOption("", true))
    .addOption(new Option("--owner <owner>", "with a name: delete only if this owner holds it; alone: delete all of this owner's records").default(""))
    .addOption(dryRunOption())
    .action(async (name: string | undefined, o, cmd: Command) => {
      if (!name && !o.owner) cmd.error("error: give a record name, or --owner to delete every record of an owner", { exitCode: EXIT.usage });
      const req = create(DeleteDnsRecordRequestSchema, { vpc: o.vpc, name: name ?? "", owner: o.owner });
      if (o.dryRun) {
        V.ref("vpc", req.vpc, "vpc");
        if (req.name) label("name", req.name);
        V.token("owner", req.owner, { optional: true });
        return dryRun(cmd, DnsService.method.deleteDnsRecord, req);
      }
      const res = await client(cmd, DnsService).deleteDnsRecord(req);
      emit(cmd, DeleteDnsRecordResponseSchema, res, () =>
        res.deletedNames.length ? `deleted ${res.deletedNames.join(", ")}` : "no such record; nothing to delete",
      );
    });

  const config = dns.command("config").description("resolver configuration of a VPC, or the defaults every VPC inherits");

  config
    .command("get")
    .description("show a VPC's resolver address, domain and forwarders in force (without --vpc: the defaults)")
    .addOption(vpcOption("; default: the defaults"))
    .action(async (o, cmd: Command) => {
      const res = await client(cmd, DnsService).getDnsConfig({ vpc: o.vpc });
      emit(cmd, GetDnsConfigResponseSchema, res, () => configDetails(res.config!));
    });

  config
    .command("update")
    .description("change a VPC's resolver configuration (without --vpc: the defaults); unset options keep their value")
    .addOption(vpcOption("; default: the defaults"))
    .addOption(new Option("--resolver <address>", "VPC only: the resolver address inside the VPC (NICs attached before keep the old one)"))
    .addOption(listOption("--forwarder <a.b.c.d[:port]>", "upstream resolver, at most 4, tried in order"))
    .addOption(new Option("--no-forwarders", "forward nowhere: names outside .internal get REFUSED"))
    .addOption(new Option("--inherit-forwarders", "VPC only: drop the VPC's own forwarders and use the defaults"))
    .addOption(new Option("--record-ttl <seconds>", "TTL of records set without one, 1–86400").argParser(integer(1, 86400)))
    .addOption(dryRunOption())
    .action(async (o, cmd: Command) => {
      const setFwd = o.forwarder.length > 0 || o.forwarders === false;
      if (o.forwarder.length > 0 && o.forwarders === false) cmd.error("error: --forwarder and --no-forwarders contradict each other", { exitCode: EXIT.usage });
      const req = create(UpdateDnsConfigRequestSchema, {
        vpc: o.vpc,
        resolverAddress: o.resolver,
        forwarders: setFwd ? { addresses: o.forwarder } : undefined,
        inheritForwarders: !!o.inheritForwarders,
        recordTtlSeconds: o.recordTtl,
      });
      if (o.dryRun) {
        if (req.vpc) V.ref("vpc", req.vpc, "vpc");
        if (req.resolverAddress !== undefined) {
          if (!req.vpc) throw new InvalidArgumentError("resolver_address", "applies to a VPC only (each VPC has its own address)");
          V.ipv4("resolver_address", req.resolverAddress);
        }
        if (req.forwarders) checkForwarders("forwarders.addresses", req.forwarders.addresses, req.vpc !== "");
        if (req.inheritForwarders && req.forwarders) throw new InvalidArgumentError("inherit_forwarders", "must not be combined with forwarders");
        return dryRun(cmd, DnsService.method.updateDnsConfig, req);
      }
      const res = await client(cmd, DnsService).updateDnsConfig(req);
      emit(cmd, UpdateDnsConfigResponseSchema, res, () => configDetails(res.config!));
    });
}
