// `microvpc sg ...`: security groups — stateful allow rules per NIC
// (FirewallService, on the firewall daemon). Rules are written as texts,
// PROTO:PORTS:PEER, and parsed by the firewall's own parser.
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { type Command } from "commander";
import { InvalidArgumentError } from "../../services/common/errors.js";
import * as V from "../../services/common/validate.js";
import { parseVpcctlPolicy, sgRuleMsg, validateSgRule } from "../../services/firewall/rules.js";
import {
  AclAction,
  BindNicRequestSchema,
  BindNicResponseSchema,
  CreateSecurityGroupRequestSchema,
  CreateSecurityGroupResponseSchema,
  DeleteSecurityGroupRequestSchema,
  DeleteSecurityGroupResponseSchema,
  Direction,
  FirewallService,
  GetSecurityGroupResponseSchema,
  ListNicBindingsResponseSchema,
  ListSecurityGroupsResponseSchema,
  ParseRulesRequestSchema,
  SecurityGroupRuleListSchema,
  SecurityGroupSchema,
  UnbindNicRequestSchema,
  UnbindNicResponseSchema,
  UpdateSecurityGroupRequestSchema,
  UpdateSecurityGroupResponseSchema,
  type NicBinding,
  type SecurityGroup,
  type SecurityGroupRule,
} from "../../gen/microvpc/v1/firewall_pb.js";
import { NetAgentService } from "../../gen/microvpc/v1/netagent_pb.js";
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
import { details, dryRun, emit, emitList, emitValue, labels, msgJson, table, time, warn } from "../lib/output.js";
import { collect, collectSelected } from "../lib/paging.js";
import { selectorFilter, selectorOption } from "../lib/selector.js";
import { dirWord, parseInOut, readPolicyFile, ruleText } from "../lib/rules.js";

const IFNAME_RE = /^[A-Za-z][A-Za-z0-9_.-]{0,14}$/;

export const RULE_HELP = `
Rules are PROTO:PORTS:PEER:
  PROTO  tcp | udp | icmp | all
  PORTS  all | N | N-M (1–65535); for icmp: all | TYPE | TYPE/CODE; for all: all
  PEER   a.b.c.d/n | a.b.c.d (read as /32) | a group id sg-… | a group name of the VPC
e.g. "tcp:80:0.0.0.0/0", "tcp:8000-8080:10.0.0.0/16", "icmp:8:10.0.0.0/8",
"tcp:5432:web-sg", "all:all:0.0.0.0/0". Return traffic of an allowed flow is
always allowed (stateful).`;

export function rulesTable(rules: SecurityGroupRule[]): string {
  if (rules.length === 0) return "(no rules: ingress denied, egress denied)";
  return table(
    ["DIRECTION", "RULE", "DESCRIPTION"],
    rules.map((r) => [dirWord(r.direction), ruleText(r), r.description]),
  );
}

function groupDetails(g: SecurityGroup): string {
  const head = details([
    ["id", g.id],
    ["vpc", g.vpcId],
    ["name", g.name],
    ["members", `${g.memberCount} NIC(s)`],
    ["drop logging", g.dropLogging?.enabled ? `on, ${g.dropLogging.ratePerSecond ?? 5}/s` : "off"],
    ["generation", String(g.generation)],
    ["description", g.description],
    ["labels", labels(g.labels)],
    ["created", time(g.createTime)],
    ["updated", time(g.updateTime)],
  ]);
  return `${head}\n${rulesTable(g.rules)}`;
}

function bindingDetails(b: NicBinding, changed?: boolean): string {
  return details([
    ["nic", b.nicId],
    ["vpc", b.vpcId],
    ["subnet", b.subnetId],
    ["address", b.address],
    ["mac", b.mac],
    ["host", b.hostId],
    ["host interface", b.hostInterface],
    ["groups", b.securityGroupIds.join(" ") || "(none: ingress denied, egress allowed)"],
    ["network acl", b.networkAclId || "(none)"],
    ["bound", time(b.bindTime)],
    ...(changed === undefined ? [] : ([["changed", changed ? "yes" : "no (it was already so)"]] as [string, string][])),
  ]);
}

function printWarnings(ws: string[]): void {
  for (const w of ws) warn(w);
}

/** The API rule checks, run locally for --dry-run. */
function checkRules(field: string, rules: SecurityGroupRule[]): void {
  rules.forEach((r, i) => validateSgRule(`${field}[${i}]`, r));
}

const refVpcOption = () => vpcOption("; needed when REF is a name");

export function register(program: Command): void {
  const sg = program.command("sg").description("security groups: stateful allow rules for NICs (firewall daemon)").addHelpText("after", RULE_HELP);

  sg.command("create [name]")
    .description("create a security group")
    .addOption(vpcOption("", true))
    .addOption(repeatableOption("--inbound <rule>", 'ingress rule, e.g. "tcp:80:0.0.0.0/0"'))
    .addOption(repeatableOption("--outbound <rule>", 'egress rule, e.g. "all:all:0.0.0.0/0"'))
    .option("--no-default-egress", "without --outbound, leave egress closed (default: all:all:0.0.0.0/0 is added)")
    .option("--log-drops", "log the packets this group's NICs drop (kernel log, rate-limited)", false)
    .addOption(descriptionOption())
    .addOption(labelOption())
    .addOption(clientTokenOption())
    .addOption(dryRunOption())
    .addHelpText("after", RULE_HELP)
    .addOption(nameOption())
    .action(async (nameArg: string | undefined, o, cmd: Command) => {
      const name = createName(cmd, nameArg, o.name);
      // Parsed here, by the server's parser: a bad text stops before anything is sent.
      const { rules, warnings } = parseInOut(o.inbound, o.outbound);
      printWarnings(warnings);
      const req = create(CreateSecurityGroupRequestSchema, {
        vpc: o.vpc,
        name,
        description: o.description,
        labels: o.label,
        rules,
        omitDefaultEgress: !o.defaultEgress,
        dropLogging: o.logDrops ? { enabled: true } : undefined,
        clientToken: o.clientToken,
      });
      if (o.dryRun) {
        V.ref("vpc", req.vpc, "vpc");
        V.name("name", req.name);
        V.text("description", req.description);
        V.labels("labels", req.labels);
        V.token("client_token", req.clientToken, { optional: true });
        checkRules("rules", req.rules);
        return dryRun(cmd, FirewallService.method.createSecurityGroup, req);
      }
      const res = await client(cmd, FirewallService).createSecurityGroup(req);
      emit(cmd, CreateSecurityGroupResponseSchema, res, () => groupDetails(res.securityGroup!));
    });

  sg.command("list")
    .description("list security groups, of one VPC or of all, ordered by name")
    .addOption(vpcOption("; default: every VPC"))
    .addOption(selectorOption())
    .addOption(limitOption())
    .action(async (o, cmd: Command) => {
      const c = client(cmd, FirewallService);
      const { items, next } = await collectSelected(o.limit, selectorFilter<SecurityGroup>(o.selector), async (pageSize, pageToken) => {
        const r = await c.listSecurityGroups({ vpc: o.vpc, pageSize, pageToken });
        return { items: r.securityGroups, next: r.nextPageToken };
      });
      const rules = (g: SecurityGroup, d: Direction) =>
        g.rules
          .filter((r) => r.direction === d)
          .map(ruleText)
          .join(",");
      emitList(
        cmd,
        ListSecurityGroupsResponseSchema,
        create(ListSecurityGroupsResponseSchema, { securityGroups: items, nextPageToken: next }),
        items,
        [
          { head: "ID", get: (g) => g.id },
          { head: "VPC", get: (g) => g.vpcId },
          { head: "NAME", get: (g) => g.name },
          { head: "INBOUND", get: (g) => rules(g, Direction.INGRESS) },
          { head: "OUTBOUND", get: (g) => rules(g, Direction.EGRESS) },
          { head: "MEMBERS", get: (g) => String(g.memberCount) },
          { head: "DESCRIPTION", get: (g) => g.description },
          { head: "LABELS", get: (g) => labels(g.labels), wide: true },
          { head: "CREATED", get: (g) => time(g.createTime), wide: true },
        ],
        (g) => `sg/${g.id}`,
      );
    });

  sg.command("get <ref>")
    .description("show one security group with its rules (a name needs --vpc)")
    .addOption(refVpcOption())
    .action(async (ref: string, o, cmd: Command) => {
      const res = await client(cmd, FirewallService).getSecurityGroup({ ref, vpc: o.vpc });
      emit(cmd, GetSecurityGroupResponseSchema, res, () => groupDetails(res.securityGroup!));
    });

  sg.command("delete <ref>")
    .description("delete a security group (no NIC may be bound to it, no other group may name it)")
    .addOption(refVpcOption())
    .addOption(dryRunOption())
    .action(async (ref: string, o, cmd: Command) => {
      const req = create(DeleteSecurityGroupRequestSchema, { ref, vpc: o.vpc });
      if (o.dryRun) {
        if (!V.ref("ref", ref, "sg").id) V.ref("vpc", req.vpc, "vpc");
        return dryRun(cmd, FirewallService.method.deleteSecurityGroup, req);
      }
      const res = await client(cmd, FirewallService).deleteSecurityGroup(req);
      emit(cmd, DeleteSecurityGroupResponseSchema, res, () =>
        res.deleted ? `deleted security group ${ref}` : `security group ${ref} does not exist; nothing to delete`,
      );
    });

  const rule = sg.command("rule").description("add or remove rules of a security group");
  for (const verb of ["add", "remove"] as const) {
    rule
      .command(`${verb} <ref>`)
      .description(
        verb === "add"
          ? "add rules to a security group (a rule already present is not added twice)"
          : "remove rules from a security group (connections only they allowed are cut; absent rules are ignored)",
      )
      .addOption(refVpcOption())
      .addOption(repeatableOption("--inbound <rule>", "ingress rule"))
      .addOption(repeatableOption("--outbound <rule>", "egress rule"))
      .addOption(dryRunOption())
      .addHelpText("after", RULE_HELP)
      .action(async (ref: string, o, cmd: Command) => {
        const { rules, warnings } = parseInOut(o.inbound, o.outbound);
        if (rules.length === 0) cmd.error("error: give at least one --inbound or --outbound rule", { exitCode: EXIT.usage });
        printWarnings(warnings);
        const req = create(UpdateSecurityGroupRequestSchema, { ref, vpc: o.vpc, ...(verb === "add" ? { addRules: rules } : { removeRules: rules }) });
        if (o.dryRun) {
          if (!V.ref("ref", ref, "sg").id) V.ref("vpc", req.vpc, "vpc");
          checkRules(verb === "add" ? "add_rules" : "remove_rules", rules);
          return dryRun(cmd, FirewallService.method.updateSecurityGroup, req);
        }
        const res = await client(cmd, FirewallService).updateSecurityGroup(req);
        emit(cmd, UpdateSecurityGroupResponseSchema, res, () => groupDetails(res.securityGroup!));
      });
  }

  sg.command("attach <nic>")
    .description(
      "bind a NIC to security groups (its whole set, replacing the previous one) and turn on its anti-spoofing; " +
        "NIC details not given are read from the netagent (GetNic)",
    )
    .addOption(listOption("--group <group>", "security group id or name of the NIC's VPC, at most 16; required"))
    .option("--vpc <ref>", "VPC of the NIC (default: from the netagent)")
    .option("--subnet <ref>", "subnet of the NIC (default: from the netagent)")
    .option("--address <ip>", "the NIC's address (default: from the netagent)")
    .option("--mac <mac>", "the NIC's MAC (default: from the netagent)")
    .option("--host-interface <ifname>", "host-side interface of the NIC (default: from the netagent)")
    .addOption(dryRunOption())
    .action(async (nic: string, o, cmd: Command) => {
      if (o.group.length === 0) {
        cmd.error("error: give the NIC's groups with --group G (repeatable); to remove its binding altogether use `microvpc sg detach NIC`", {
          exitCode: EXIT.usage,
        });
      }
      const given = { vpc: o.vpc, subnet: o.subnet, address: o.address, mac: o.mac, hostInterface: o.hostInterface };
      if (Object.values(given).some((v) => v === undefined)) {
        // Fill in what was not given from the netagent of this host.
        const n = (await client(cmd, NetAgentService).getNic({ ref: nic })).nic!;
        given.vpc ??= n.vpcId;
        given.subnet ??= n.subnetId;
        given.address ??= n.guest?.address ?? "";
        given.mac ??= n.guest?.mac ?? "";
        given.hostInterface ??= n.hostInterface;
        nic = n.id;
      }
      const req = create(BindNicRequestSchema, { nicId: nic, ...given, securityGroups: o.group });
      if (o.dryRun) {
        V.id("nic_id", req.nicId, "nic");
        V.ref("vpc", req.vpc, "vpc");
        V.ipv4("address", req.address);
        V.mac("mac", req.mac);
        if (!IFNAME_RE.test(req.hostInterface))
          throw new InvalidArgumentError("host_interface", `${V.show(req.hostInterface)} is not an interface name (1–15 characters)`);
        if (req.securityGroups.length > 16)
          throw new InvalidArgumentError("security_groups", `has ${req.securityGroups.length} groups; a NIC takes at most 16`);
        return dryRun(cmd, FirewallService.method.bindNic, req);
      }
      const res = await client(cmd, FirewallService).bindNic(req);
      emit(cmd, BindNicResponseSchema, res, () => bindingDetails(res.binding!, res.changed));
    });

  sg.command("detach <nic>")
    .description("remove a NIC's binding: its rules, its anti-spoofing and its conntrack entries")
    .option(
      "--detaching",
      "the NIC is being detached (as DeleteVm does): take it out of this host's tables altogether, closed both ways, instead of leaving it attached without groups",
    )
    .addOption(dryRunOption())
    .action(async (nic: string, o, cmd: Command) => {
      const req = create(UnbindNicRequestSchema, { nicId: nic, detaching: o.detaching === true });
      if (o.dryRun) {
        V.id("nic_id", nic, "nic");
        return dryRun(cmd, FirewallService.method.unbindNic, req);
      }
      const res = await client(cmd, FirewallService).unbindNic(req);
      emit(cmd, UnbindNicResponseSchema, res, () =>
        res.unbound ? `detached ${nic} (${res.conntrackEntriesCleared} conntrack entries cleared)` : `${nic} was not bound; nothing to detach`,
      );
    });

  sg.command("bindings")
    .description("list NIC bindings (of every hypervisor), ordered by NIC id")
    .addOption(vpcOption("; default: every VPC"))
    .option("--group <ref>", "only NICs bound to this group (a name needs --vpc)", "")
    .option("--host-id <id>", "only NICs of this hypervisor", "")
    .addOption(limitOption())
    .action(async (o, cmd: Command) => {
      const c = client(cmd, FirewallService);
      const { items, next } = await collect(o.limit, async (pageSize, pageToken) => {
        const r = await c.listNicBindings({ vpc: o.vpc, securityGroup: o.group, hostId: o.hostId, pageSize, pageToken });
        return { items: r.bindings, next: r.nextPageToken };
      });
      emit(cmd, ListNicBindingsResponseSchema, create(ListNicBindingsResponseSchema, { bindings: items, nextPageToken: next }), () =>
        table(
          ["NIC", "VPC", "SUBNET", "ADDRESS", "HOST", "INTERFACE", "GROUPS", "ACL"],
          items.map((b) => [b.nicId, b.vpcId, b.subnetId, b.address, b.hostId, b.hostInterface, b.securityGroupIds.join("\n"), b.networkAclId]),
        ),
      );
    });

  sg.command("import <ref> <file>")
    .description("make a security group's rules from a vpcctl JSON policy file (creating the group if it does not exist)")
    .addOption(vpcOption("", true))
    .option("--replace", "an existing group's rules become exactly the file's (default: the file's rules are added)", false)
    .addOption(descriptionOption())
    .addOption(dryRunOption())
    .addHelpText(
      "after",
      `
The file is a vpcctl policy: {"subnet": "10.20.2.0/24", "ingress": [{"port": 5432,
"protocol": "tcp", "action": "allow"}], "egress": [...]}. A security group only
allows: the file's allow entries become the group's rules and other traffic is
denied (the usual intent of such a policy); its deny entries are reported as
warnings. A file without egress allows keeps egress open (all:all:0.0.0.0/0).
To reproduce vpcctl's literal behaviour (unlisted traffic passes, denies
apply to the subnet), use \`microvpc acl import\`.`,
    )
    .action(async (ref: string, file: string, o, cmd: Command) => {
      const text = readPolicyFile(cmd, file);
      let rules: SecurityGroupRule[];
      let warnings: string[];
      let subnetCidr: string;
      let denies: number;
      if (o.dryRun) {
        // The same parser ParseRules runs, locally: no server needed to check a file.
        const p = parseVpcctlPolicy(text);
        rules = p.rules.map(sgRuleMsg);
        ({ warnings, subnetCidr } = p);
        denies = p.aclEntries.filter((e) => e.action === "deny").length;
      } else {
        const p = await client(cmd, FirewallService).parseRules(create(ParseRulesRequestSchema, { vpcctlPolicyJson: text, vpc: o.vpc }));
        ({ rules, warnings, subnetCidr } = p);
        denies = p.aclEntries.filter((e) => e.action === AclAction.DENY).length;
      }
      printWarnings(warnings);
      if (denies > 0)
        warn(
          `the file has ${denies} deny entr${denies === 1 ? "y" : "ies"}; a security group cannot deny — apply them with \`microvpc acl import --vpc ${o.vpc} ${file}\``,
        );

      const fw = client(cmd, FirewallService);
      const existing = await notFoundIsNull(fw.getSecurityGroup({ ref, vpc: o.vpc }));
      if (!existing && /^sg-[0-9a-f]{12}$/.test(ref)) {
        throw new ConnectError(`security group ${ref} not found; give a name to create a new group from the file`, Code.NotFound);
      }
      const method = existing ? FirewallService.method.updateSecurityGroup : FirewallService.method.createSecurityGroup;
      const req = existing
        ? create(UpdateSecurityGroupRequestSchema, {
            ref: existing.securityGroup!.id,
            ...(o.replace ? { setRules: create(SecurityGroupRuleListSchema, { rules }) } : { addRules: rules }),
            ...(o.description ? { description: o.description } : {}),
          })
        : create(CreateSecurityGroupRequestSchema, { vpc: o.vpc, name: ref, description: o.description || `imported from ${subnetCidr} policy`, rules });
      if (o.dryRun) {
        checkRules("rules", rules);
        if (!existing) V.name("name", ref);
        return dryRun(cmd, method, req as never);
      }
      const res = existing ? await fw.updateSecurityGroup(req as never) : await fw.createSecurityGroup(req as never);
      const g = res.securityGroup!;
      emitValue(
        cmd,
        () => ({ securityGroup: msgJson(SecurityGroupSchema, g), created: !existing, subnetCidr, warnings }),
        () =>
          `${existing ? (o.replace ? "replaced the rules of" : "added the file's rules to") : "created"} security group ${g.name} (${g.id}) from the policy of ${subnetCidr}\n${groupDetails(g)}`,
      );
    });
}
