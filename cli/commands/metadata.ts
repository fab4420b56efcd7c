// `microvpc metadata ...`: the instance metadata records IMDS serves
// (GatewayService Set/Get/DeleteInstanceMetadata on a hypervisor's gateway).
// The vmm writes them for its VMs; these commands are for operators and for
// instances the vmm does not manage. `set` replaces the whole record.
import { readFileSync } from "node:fs";
import { create } from "@bufbuild/protobuf";
import { Option, type Command } from "commander";
import {
  DeleteInstanceMetadataResponseSchema,
  GatewayService,
  GetInstanceMetadataResponseSchema,
  ImdsHttpEndpoint,
  ImdsHttpEndpointSchema,
  ImdsHttpTokens,
  ImdsHttpTokensSchema,
  SetInstanceMetadataRequestSchema,
  SetInstanceMetadataResponseSchema,
  type InstanceMetadata,
} from "../../gen/microvpc/v1/gateway_pb.js";
import { VpcService } from "../../gen/microvpc/v1/vpc_pb.js";
import { client } from "../lib/context.js";
import { EXIT } from "../lib/errors.js";
import { dryRun, emit, enumLabel, labels, someDetails, time } from "../lib/output.js";
import { dryRunOption, integer, labelOption, listOption, repeatableOption, vpcOption } from "../lib/options.js";
import { subnetId } from "../lib/resolve.js";

function mdDetails(m: InstanceMetadata, extra: [string, string][] = []): string {
  return someDetails([
    ["instance id", m.instanceId],
    ["vpc", m.vpcId],
    ["subnet", m.subnetId],
    ["local ipv4", m.localIpv4],
    ["mac", m.mac],
    ["hostname", m.hostname],
    ["public ipv4", m.publicIpv4],
    ["security groups", [...m.securityGroupNames, ...m.securityGroupIds].join(" ")],
    ["placement", m.placement ? [m.placement.region, m.placement.availabilityZone].filter(Boolean).join(" / ") : ""],
    ["instance type", m.instanceType],
    ["ssh keys", m.publicKeys.map((k) => k.opensshKey.split(" ").slice(0, 3).join(" ")).join("\n")],
    ["user data", m.userData.length ? `${m.userData.length} bytes` : ""],
    ["tags", labels(m.tags)],
    [
      "imds",
      m.options
        ? `tokens ${enumLabel(ImdsHttpTokensSchema, m.options.httpTokens) || "optional"}, endpoint ${enumLabel(ImdsHttpEndpointSchema, m.options.httpEndpoint) || "enabled"}` +
          (m.options.httpPutResponseHopLimit ? `, hop limit ${m.options.httpPutResponseHopLimit}` : "")
        : "",
    ],
    ["updated", time(m.updateTime)],
    ...extra,
  ]);
}

function readFile(cmd: Command, what: string, path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    cmd.error(`error: cannot read ${what} ${path}: ${(err as Error).message}`, { exitCode: EXIT.usage });
  }
}

export function register(program: Command): void {
  const md = program.command("metadata").description("instance metadata served by IMDS at 169.254.169.254 (gateway of the hypervisor)");

  md.command("set <instance-id>")
    .description("create or replace an instance's metadata record (the whole record: fields not given are cleared)")
    .addOption(vpcOption(" of the instance's NIC", true))
    .requiredOption("--address <ip>", "the NIC's address (local-ipv4): with --vpc it identifies the caller")
    .requiredOption("--mac <mac>", 'the NIC\'s MAC, e.g. "02:00:0a:00:01:05"')
    .option("--subnet <ref>", "subnet id, or a name of the VPC", "")
    .option("--hostname <name>", "hostname served as meta-data/hostname", "")
    .option("--public-ipv4 <ip>", "public address served (default: the floating IP associated at request time)", "")
    .addOption(listOption("--sg-name <name>", "security group name served in meta-data/security-groups"))
    .addOption(repeatableOption("--ssh-key <file>", "file of OpenSSH public keys (one per line)"))
    .option("--user-data <file>", "user data served at /latest/user-data (at most 16 KiB)")
    .option("--instance-type <type>", "instance type served, e.g. qemu.1x256", "")
    .addOption(labelOption())
    .addOption(new Option("--imds-tokens <mode>", "optional (v1 and v2) or required (v2 only)").choices(["optional", "required"]).default("optional"))
    .option("--no-imds", "do not answer this instance at 169.254.169.254")
    .addOption(new Option("--hop-limit <n>", "IP TTL of token responses, 1–64 (default 1)").argParser(integer(1, 64)))
    .addOption(dryRunOption())
    .action(async (instanceId: string, o, cmd: Command) => {
      const keys: { name: string; opensshKey: string }[] = [];
      for (const f of o.sshKey as string[]) {
        for (const line of readFile(cmd, "--ssh-key", f).toString("utf8").split("\n")) {
          const t = line.trim();
          if (t && !t.startsWith("#")) keys.push({ name: "", opensshKey: t });
        }
      }
      const vpcId = o.dryRun || /^vpc-[0-9a-f]{12}$/.test(o.vpc) ? o.vpc : (await client(cmd, VpcService).getVpc({ ref: o.vpc })).vpc!.id;
      const subnet = o.subnet && !o.dryRun ? await subnetId(cmd, o.subnet, vpcId) : o.subnet;
      const req = create(SetInstanceMetadataRequestSchema, {
        metadata: {
          instanceId,
          vpcId,
          subnetId: subnet,
          localIpv4: o.address,
          mac: o.mac,
          hostname: o.hostname,
          publicIpv4: o.publicIpv4,
          securityGroupNames: o.sgName,
          publicKeys: keys,
          userData: o.userData === undefined ? new Uint8Array() : new Uint8Array(readFile(cmd, "--user-data", o.userData)),
          instanceType: o.instanceType,
          tags: o.label,
          options: {
            httpTokens: o.imdsTokens === "required" ? ImdsHttpTokens.REQUIRED : ImdsHttpTokens.OPTIONAL,
            httpEndpoint: o.imds ? ImdsHttpEndpoint.ENABLED : ImdsHttpEndpoint.DISABLED,
            httpPutResponseHopLimit: o.hopLimit,
          },
        },
      });
      if (o.dryRun) return dryRun(cmd, GatewayService.method.setInstanceMetadata, req);
      const res = await client(cmd, GatewayService).setInstanceMetadata(req);
      emit(cmd, SetInstanceMetadataResponseSchema, res, () =>
        mdDetails(res.metadata!, [["created", res.created ? "yes" : "no (replaced the previous record)"]]),
      );
    });

  md.command("get [instance-id]")
    .description("show an instance's metadata record, by instance id or by --vpc and --address")
    .option("--vpc <ref>", "VPC id or name, with --address (instead of an instance id)", "")
    .option("--address <ip>", "the NIC's address in --vpc", "")
    .action(async (instanceId: string | undefined, o, cmd: Command) => {
      const res = await client(cmd, GatewayService).getInstanceMetadata({ instanceId: instanceId ?? "", vpc: o.vpc, address: o.address });
      emit(cmd, GetInstanceMetadataResponseSchema, res, () => mdDetails(res.metadata!));
    });

  md.command("delete <instance-id>")
    .description("delete an instance's metadata record and revoke its IMDS session tokens")
    .action(async (instanceId: string, _o, cmd: Command) => {
      const res = await client(cmd, GatewayService).deleteInstanceMetadata({ instanceId });
      emit(cmd, DeleteInstanceMetadataResponseSchema, res, () =>
        res.deleted
          ? `deleted the metadata of ${instanceId} (${res.tokensRevoked} session token(s) revoked)`
          : `instance ${instanceId} has no metadata; nothing to delete`,
      );
    });
}
