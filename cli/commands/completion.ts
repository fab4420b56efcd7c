// `microvpc completion bash|zsh|fish`: shell completion generated from the
// command tree, and the hidden `microvpc __complete KIND` those scripts call
// to complete resource names (one per line, from the List calls; nothing,
// and exit 0, when a daemon cannot be reached: a completion never errors).
import { Argument, type Command } from "commander";
import { NetAgentService } from "../../gen/microvpc/v1/netagent_pb.js";
import { FirewallService } from "../../gen/microvpc/v1/firewall_pb.js";
import { SubnetService } from "../../gen/microvpc/v1/subnet_pb.js";
import { VmService } from "../../gen/microvpc/v1/vm_pb.js";
import { VpcService } from "../../gen/microvpc/v1/vpc_pb.js";
import { bashCompletion, fishCompletion, NAME_KINDS, zshCompletion, type NameKind } from "../lib/completion.js";
import { client } from "../lib/context.js";
import { print } from "../lib/output.js";
import { collect } from "../lib/paging.js";

const SCRIPTS = { bash: bashCompletion, zsh: zshCompletion, fish: fishCompletion };

/** At most this many names: a completion is a hint, not a listing. */
const MAX_NAMES = 1000;

async function names(cmd: Command, kind: NameKind, vpc: string): Promise<string[]> {
  const o = { timeoutMs: 2000 };
  const all = <T>(f: (pageSize: number, pageToken: string) => Promise<{ items: T[]; next: string }>) => collect(MAX_NAMES, f).then((p) => p.items);
  switch (kind) {
    case "vpc":
      return (
        await all(async (pageSize, pageToken) => {
          const r = await client(cmd, VpcService).listVpcs({ pageSize, pageToken }, o);
          return { items: r.vpcs, next: r.nextPageToken };
        })
      ).map((v) => v.name);
    case "subnet":
      return (
        await all(async (pageSize, pageToken) => {
          const r = await client(cmd, SubnetService).listSubnets({ vpc, pageSize, pageToken }, o);
          return { items: r.subnets, next: r.nextPageToken };
        })
      ).map((s) => s.name);
    case "sg":
      return (
        await all(async (pageSize, pageToken) => {
          const r = await client(cmd, FirewallService).listSecurityGroups({ vpc, pageSize, pageToken }, o);
          return { items: r.securityGroups, next: r.nextPageToken };
        })
      ).map((g) => g.name);
    case "vm":
      return (
        await all(async (pageSize, pageToken) => {
          const r = await client(cmd, VmService).listVms({ vpc, pageSize, pageToken }, o);
          return { items: r.vms, next: r.nextPageToken };
        })
      ).map((v) => v.name);
    case "host":
      return (
        await all(async (pageSize, pageToken) => {
          const r = await client(cmd, NetAgentService).listHosts({ vpc, pageSize, pageToken }, o);
          return { items: r.hosts, next: r.nextPageToken };
        })
      ).map((h) => h.id);
  }
}

export function register(program: Command): void {
  program
    .command("completion")
    .description(
      "print a shell completion script (bash: source <(microvpc completion bash); zsh: the same after compinit; fish: microvpc completion fish | source)",
    )
    .addArgument(new Argument("<shell>", "shell to complete for").choices(Object.keys(SCRIPTS)))
    .action((shell: keyof typeof SCRIPTS) => print(SCRIPTS[shell](program)));

  program
    .command("__complete", { hidden: true })
    .description("names of a kind of resource, one per line, for the completion scripts")
    .addArgument(new Argument("<kind>").choices([...NAME_KINDS]))
    .option("--vpc <ref>", "only names in this VPC", "")
    .action(async (kind: NameKind, o: { vpc: string }, cmd: Command) => {
      let list: string[] = [];
      try {
        list = await names(cmd, kind, o.vpc);
      } catch {
        // A completion prints nothing rather than an error in the middle of the command line.
      }
      const uniq = [...new Set(list)].sort();
      if (uniq.length) print(uniq.join("\n"));
    });
}
