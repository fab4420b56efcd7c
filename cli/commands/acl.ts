// `microvpc acl ...`: network ACLs — numbered, stateless allow/deny entries
// on the boundary of subnets (FirewallService, on the firewall daemon).
import { create } from "@bufbuild/protobuf";
import { Option, type Command } from "commander";
import * as V from "../../services/common/validate.js";
import { aclEntryMsg, parseVpcctlPolicy, validateAclEntries } from "../../services/firewall/rules.js";
import {
  AclAction,
  AssociateNetworkAclRequestSchema,
  AssociateNetworkAclResponseSchema,
  CreateNetworkAclRequestSchema,
  CreateNetworkAclResponseSchema,
  DeleteNetworkAclRequestSchema,
  DeleteNetworkAclResponseSchema,
  DisassociateNetworkAclRequestSchema,
  DisassociateNetworkAclResponseSchema,
  FirewallService,
  GetNetworkAclResponseSchema,
  ListNetworkAclsResponseSchema,
  NetworkAclEntryListSchema,
  NetworkAclSchema,
  ParseRulesRequestSchema,
  UpdateNetworkAclRequestSchema,
  UpdateNetworkAclResponseSchema,
  type NetworkAcl,
  type NetworkAclEntry,
} from "../../gen/microvpc/v1/firewall_pb.js";
import { SubnetService, type Subnet } from "../../gen/microvpc/v1/subnet_pb.js";
import { client } from "../lib/context.js";
import { EXIT, notFoundIsNull } from "../lib/errors.js";
import {
  clientTokenOption,
  createName,
  descriptionOption,
  dryRunOption,
  labelOption,
  limitOption,
  listOption,
  nameOption,
  repeatableOption,
  vpcOption,
} from "../lib/options.js";
import { details, dryRun, dryRunMany, emit, emitList, emitValue, labels, msgJson, table, time, warn } from "../lib/output.js";
import { collect, collectSelected } from "../lib/paging.js";
import { selectorFilter, selectorOption } from "../lib/selector.js";
import { aclActionWord, aclEntryText, aclMatchText, dirWord, parseAclEntry, parseAclKey, readPolicyFile } from "../lib/rules.js";

const ENTRY_HELP = `
Entries are NUM:DIRECTION:ACTION:PROTO:PORTS:CIDR:
  NUM        1–32766; per direction, the lowest matching number decides
  DIRECTION  ingress (into the subnet) | egress (out of it)
  ACTION     allow | deny
  PROTO:PORTS:CIDR as in security group rules, e.g. tcp:22:0.0.0.0/0, all:all:10.0.0.0/8
e.g. "100:ingress:deny:tcp:22:0.0.0.0/0", "200:ingress:allow:all:all:0.0.0.0/0".
ACLs are stateless: replies need their own entries. A packet no entry
matches is denied; traffic inside one subnet is not filtered.`;

function entriesTable(es: NetworkAclEntry[]): string {
  if (es.length === 0) return "(no entries: everything crossing the subnets' boundary is denied)";
  return table(
    ["NUM", "DIRECTION", "ACTION", "MATCH", "DESCRIPTION"],
    es.map((e) => [String(e.ruleNumber), dirWord(e.direction), aclActionWord(e.action), aclMatchText(e), e.description]),
  );
}

function aclDetails(a: NetworkAcl, extra: [string, string][] = []): string {
  const head = details([
    ["id", a.id],
    ["vpc", a.vpcId],
    ["name", a.name],
    ["subnets", a.subnetIds.join(" ") || "(none)"],
    ["generation", String(a.generation)],
    ["description", a.description],
    ["labels", labels(a.labels)],
    ["created", time(a.createTime)],
    ["updated", time(a.updateTime)],
    ...extra,
  ]);
  return `${head}\n${entriesTable(a.entries)}`;
}

function entries(texts: string[]): NetworkAclEntry[] {
  return texts.map((t) => parseAclEntry(t));
}

const refVpcOption = () => vpcOption("; needed when a REF or --subnet is a name");

export function register(program: Command): void {
  const acl = program
    .command("acl")
    .description("network ACLs: ordered, stateless allow/deny entries for subnets (firewall daemon)")
    .addHelpText("after", ENTRY_HELP);

  acl
    .command("create [name]")
    .description("create a network ACL, optionally associating subnets (each loses its previous ACL)")
    .addOption(vpcOption("", true))
    .addOption(listOption("--subnet <ref>", "subnet id or name of the VPC to associate"))
    .addOption(repeatableOption("--entry <entry>", 'entry, e.g. "100:ingress:deny:tcp:22:0.0.0.0/0"'))
    .addOption(descriptionOption())
    .addOption(labelOption())
    .addOption(clientTokenOption())
    .addOption(dryRunOption())
    .addHelpText("after", ENTRY_HELP)
    .addOption(nameOption())
    .action(async (nameArg: string | undefined, o, cmd: Command) => {
      const name = createName(cmd, nameArg, o.name);
      const req = create(CreateNetworkAclRequestSchema, {
        vpc: o.vpc,
        name,
        description: o.description,
        labels: o.label,
        entries: entries(o.entry),
        subnets: o.subnet,
        clientToken: o.clientToken,
      });
      if (req.entries.length === 0) warn("an ACL without entries denies everything that crosses its subnets' boundary");
      if (o.dryRun) {
        V.ref("vpc", req.vpc, "vpc");
        V.name("name", req.name);
        V.text("description", req.description);
        V.labels("labels", req.labels);
        validateAclEntries("entries", req.entries);
        req.subnets.forEach((s, i) => V.ref(`subnets[${i}]`, s, "subnet"));
        return dryRun(cmd, FirewallService.method.createNetworkAcl, req);
      }
      const res = await client(cmd, FirewallService).createNetworkAcl(req);
      emit(cmd, CreateNetworkAclResponseSchema, res, () => aclDetails(res.networkAcl!));
    });

  acl
    .command("list")
    .description("list network ACLs, of one VPC or of all, ordered by name")
    .addOption(vpcOption("; default: every VPC"))
    .addOption(selectorOption())
    .addOption(limitOption())
    .action(async (o, cmd: Command) => {
      const c = client(cmd, FirewallService);
      const { items, next } = await collectSelected(o.limit, selectorFilter<NetworkAcl>(o.selector), async (pageSize, pageToken) => {
        const r = await c.listNetworkAcls({ vpc: o.vpc, pageSize, pageToken });
        return { items: r.networkAcls, next: r.nextPageToken };
      });
      emitList(
        cmd,
        ListNetworkAclsResponseSchema,
        create(ListNetworkAclsResponseSchema, { networkAcls: items, nextPageToken: next }),
        items,
        [
          { head: "ID", get: (a) => a.id },
          { head: "VPC", get: (a) => a.vpcId },
          { head: "NAME", get: (a) => a.name },
          { head: "ENTRIES", get: (a) => a.entries.map(aclEntryText).join(",") },
          { head: "SUBNETS", get: (a) => a.subnetIds.join(",") },
          { head: "DESCRIPTION", get: (a) => a.description },
          { head: "LABELS", get: (a) => labels(a.labels), wide: true },
          { head: "CREATED", get: (a) => time(a.createTime), wide: true },
        ],
        (a) => `acl/${a.id}`,
      );
    });

  acl
    .command("get <ref>")
    .description("show one network ACL with its entries (a name needs --vpc)")
    .addOption(refVpcOption())
    .action(async (ref: string, o, cmd: Command) => {
      const res = await client(cmd, FirewallService).getNetworkAcl({ ref, vpc: o.vpc });
      emit(cmd, GetNetworkAclResponseSchema, res, () => aclDetails(res.networkAcl!));
    });

  acl
    .command("delete <ref>")
    .description("delete a network ACL (disassociate its subnets first)")
    .addOption(refVpcOption())
    .addOption(dryRunOption())
    .action(async (ref: string, o, cmd: Command) => {
      const req = create(DeleteNetworkAclRequestSchema, { ref, vpc: o.vpc });
      if (o.dryRun) {
        if (!V.ref("ref", ref, "acl").id) V.ref("vpc", req.vpc, "vpc");
        return dryRun(cmd, FirewallService.method.deleteNetworkAcl, req);
      }
      const res = await client(cmd, FirewallService).deleteNetworkAcl(req);
      emit(cmd, DeleteNetworkAclResponseSchema, res, () =>
        res.deleted ? `deleted network ACL ${ref}` : `network ACL ${ref} does not exist; nothing to delete`,
      );
    });

  acl
    .command("associate <acl>")
    .description("associate a network ACL with a subnet, replacing the subnet's previous ACL in one step")
    .requiredOption("--subnet <ref>", "subnet id, or a name with --vpc")
    .addOption(refVpcOption())
    .addOption(dryRunOption())
    .action(async (ref: string, o, cmd: Command) => {
      const req = create(AssociateNetworkAclRequestSchema, { networkAcl: ref, subnet: o.subnet, vpc: o.vpc });
      if (o.dryRun) {
        const a = V.ref("network_acl", ref, "acl");
        const s = V.ref("subnet", o.subnet, "subnet");
        if (!a.id || !s.id) V.ref("vpc", req.vpc, "vpc");
        return dryRun(cmd, FirewallService.method.associateNetworkAcl, req);
      }
      const res = await client(cmd, FirewallService).associateNetworkAcl(req);
      emit(cmd, AssociateNetworkAclResponseSchema, res, () =>
        aclDetails(res.networkAcl!, [
          ["replaced", res.previousNetworkAclId ? `${res.previousNetworkAclId} on ${o.subnet}` : "(nothing: the subnet had no other ACL)"],
        ]),
      );
    });

  acl
    .command("disassociate")
    .description("remove a subnet's ACL: the subnet is then unfiltered by ACLs (security groups still apply)")
    .requiredOption("--subnet <ref>", "subnet id, or a name with --vpc")
    .addOption(refVpcOption())
    .addOption(dryRunOption())
    .action(async (o, cmd: Command) => {
      const req = create(DisassociateNetworkAclRequestSchema, { subnet: o.subnet, vpc: o.vpc });
      if (o.dryRun) {
        if (!V.ref("subnet", o.subnet, "subnet").id) V.ref("vpc", req.vpc, "vpc");
        return dryRun(cmd, FirewallService.method.disassociateNetworkAcl, req);
      }
      const res = await client(cmd, FirewallService).disassociateNetworkAcl(req);
      emit(cmd, DisassociateNetworkAclResponseSchema, res, () =>
        res.previousNetworkAclId
          ? `subnet ${o.subnet} no longer has network ACL ${res.previousNetworkAclId}`
          : `subnet ${o.subnet} had no network ACL; nothing changed`,
      );
    });

  const entry = acl.command("entry").description("add, replace or remove entries of a network ACL");
  entry
    .command("add <acl>")
    .description("add entries; an entry with the same direction and number is replaced")
    .addOption(refVpcOption())
    .addOption(repeatableOption("--entry <entry>", 'entry, e.g. "100:ingress:deny:tcp:22:0.0.0.0/0"'))
    .addOption(dryRunOption())
    .addHelpText("after", ENTRY_HELP)
    .action(async (ref: string, o, cmd: Command) => {
      if (o.entry.length === 0) cmd.error("error: give at least one --entry", { exitCode: EXIT.usage });
      const req = create(UpdateNetworkAclRequestSchema, { ref, vpc: o.vpc, upsertEntries: entries(o.entry) });
      if (o.dryRun) {
        if (!V.ref("ref", ref, "acl").id) V.ref("vpc", req.vpc, "vpc");
        validateAclEntries("upsert_entries", req.upsertEntries);
        return dryRun(cmd, FirewallService.method.updateNetworkAcl, req);
      }
      const res = await client(cmd, FirewallService).updateNetworkAcl(req);
      emit(cmd, UpdateNetworkAclResponseSchema, res, () => aclDetails(res.networkAcl!));
    });
  entry
    .command("remove <acl>")
    .description("remove entries, named DIRECTION:NUM (e.g. ingress:100); absent entries are ignored")
    .addOption(refVpcOption())
    .addOption(repeatableOption("--entry <dir:num>", 'entry to remove, e.g. "ingress:100"'))
    .addOption(dryRunOption())
    .action(async (ref: string, o, cmd: Command) => {
      if (o.entry.length === 0) cmd.error("error: give at least one --entry DIRECTION:NUM", { exitCode: EXIT.usage });
      const req = create(UpdateNetworkAclRequestSchema, { ref, vpc: o.vpc, removeEntries: (o.entry as string[]).map((t) => parseAclKey(t)) });
      if (o.dryRun) {
        if (!V.ref("ref", ref, "acl").id) V.ref("vpc", req.vpc, "vpc");
        return dryRun(cmd, FirewallService.method.updateNetworkAcl, req);
      }
      const res = await client(cmd, FirewallService).updateNetworkAcl(req);
      emit(cmd, UpdateNetworkAclResponseSchema, res, () => aclDetails(res.networkAcl!));
    });

  acl
    .command("import <file>")
    .description("apply a vpcctl JSON policy file to a subnet as a network ACL (created, or replaced if it exists)")
    .addOption(vpcOption("", true))
    .option("--subnet <ref>", "subnet to apply it to (default: the VPC's subnet whose CIDR is the file's \"subnet\")")
    .option("--name <name>", "name of the ACL (default: policy-SUBNET)")
    .addOption(
      new Option("--default-action <action>", "what passes when no entry matches: allow (vpcctl's meaning) or deny")
        .choices(["allow", "deny"])
        .default("allow"),
    )
    .addOption(dryRunOption())
    .addHelpText(
      "after",
      `
Each direction's entries are numbered 100, 110, 120, … in file order. vpcctl
lets through what its policy does not match, so with --default-action allow
(the default) each direction ends with entry 32766 allowing all:all:0.0.0.0/0;
with deny, unmatched traffic is dropped.`,
    )
    .action(async (file: string, o, cmd: Command) => {
      const text = readPolicyFile(cmd, file);
      const defaultAction = o.defaultAction === "deny" ? AclAction.DENY : AclAction.ALLOW;
      let aclEntries: NetworkAclEntry[];
      let warnings: string[];
      let subnetCidr: string;
      if (o.dryRun) {
        const p = parseVpcctlPolicy(text, { defaultAction: o.defaultAction });
        aclEntries = p.aclEntries.map(aclEntryMsg);
        ({ warnings, subnetCidr } = p);
      } else {
        const p = await client(cmd, FirewallService).parseRules(
          create(ParseRulesRequestSchema, { vpcctlPolicyJson: text, vpcctlDefaultAction: defaultAction }),
        );
        ({ aclEntries, warnings, subnetCidr } = p);
      }
      // A security group can only allow: that warning concerns `sg import`, not an ACL.
      for (const w of warnings) if (!/a security group can only allow/.test(w)) warn(w);

      const subnets = client(cmd, SubnetService);
      let subnet: Subnet;
      if (o.subnet) {
        subnet = (await subnets.getSubnet({ ref: o.subnet, vpc: o.vpc })).subnet!;
        if (subnet.cidr !== subnetCidr)
          warn(`the file is a policy for ${subnetCidr}, and subnet ${subnet.name} is ${subnet.cidr}; applying it to ${subnet.name} as asked`);
      } else {
        const all = await collect(undefined, async (pageSize, pageToken) => {
          const r = await subnets.listSubnets({ vpc: o.vpc, pageSize, pageToken });
          return { items: r.subnets, next: r.nextPageToken };
        });
        const match = all.items.find((s) => s.cidr === subnetCidr);
        if (!match) {
          cmd.error(`error: VPC ${o.vpc} has no subnet ${subnetCidr} (the file's "subnet"); name the subnet to apply it to with --subnet`, {
            exitCode: EXIT.usage,
          });
        }
        subnet = match;
      }
      const name = o.name ?? `policy-${subnet.name}`.slice(0, 63).replace(/-+$/, "");
      V.name("--name", name);
      const fw = client(cmd, FirewallService);
      const existing = await notFoundIsNull(fw.getNetworkAcl({ ref: name, vpc: subnet.vpcId }));
      const description = `vpcctl policy ${file.split("/").pop()} for ${subnetCidr}`.slice(0, 255);
      if (!existing) {
        const req = create(CreateNetworkAclRequestSchema, { vpc: subnet.vpcId, name, entries: aclEntries, subnets: [subnet.id], description });
        if (o.dryRun) {
          validateAclEntries("entries", req.entries);
          return dryRun(cmd, FirewallService.method.createNetworkAcl, req);
        }
        const res = await fw.createNetworkAcl(req);
        return emitValue(
          cmd,
          () => ({ networkAcl: msgJson(NetworkAclSchema, res.networkAcl!), created: true, subnetId: subnet.id, warnings }),
          () => `created network ACL ${name} for subnet ${subnet.name} (${subnet.cidr}) from ${file}\n${aclDetails(res.networkAcl!)}`,
        );
      }
      const update = create(UpdateNetworkAclRequestSchema, {
        ref: existing.networkAcl!.id,
        setEntries: create(NetworkAclEntryListSchema, { entries: aclEntries }),
        description,
      });
      const assoc = create(AssociateNetworkAclRequestSchema, { networkAcl: existing.networkAcl!.id, subnet: subnet.id });
      if (o.dryRun) {
        validateAclEntries("set_entries", aclEntries);
        return dryRunMany(cmd, [
          { method: FirewallService.method.updateNetworkAcl, request: update },
          { method: FirewallService.method.associateNetworkAcl, request: assoc },
        ]);
      }
      await fw.updateNetworkAcl(update);
      const res = await fw.associateNetworkAcl(assoc);
      emitValue(
        cmd,
        () => ({ networkAcl: msgJson(NetworkAclSchema, res.networkAcl!), created: false, subnetId: subnet.id, warnings }),
        () => `replaced the entries of network ACL ${name} and associated it with subnet ${subnet.name} (${subnet.cidr})\n${aclDetails(res.networkAcl!)}`,
      );
    });
}
