// microvpc: the operator CLI. Global options come first; each command group
// lives in its own file under commands/.
import { Command, Option } from "commander";
import { groups } from "./commands/index.js";
import { globals } from "./lib/context.js";
import { EXIT_HELP, report } from "./lib/errors.js";
import { integer } from "./lib/options.js";

export function buildProgram(): Command {
  const program = new Command("microvpc")
    .description("Operate microvpc: VPCs, subnets and IP addresses.\nEvery global option can also be set by the environment variable shown.")
    .addOption(new Option("--server <host:port>", "address of microvpcd ipam (http:// or https:// URL also accepted)").env("MICROVPC_SERVER").default("127.0.0.1:7401"))
    .addOption(new Option("--token <token>", "bearer token, if the daemon requires one").env("MICROVPC_TOKEN"))
    .addOption(new Option("-o, --output <format>", "output format").choices(["table", "json"]).env("MICROVPC_OUTPUT").default("table"))
    .addOption(new Option("--timeout-ms <ms>", "deadline of each call").env("MICROVPC_TIMEOUT_MS").argParser(integer(1, 3_600_000)).default(10_000))
    .addHelpText("after", `\n${EXIT_HELP}`)
    .showHelpAfterError("(add --help for usage)")
    // Commander exits by itself with code 1; we need 2 for usage errors, so
    // it throws instead and main() picks the code. Subcommands inherit this.
    .exitOverride();
  for (const g of groups) g.register(program);
  return program;
}

async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
    return 0;
  } catch (err) {
    return report(err, globals(program).server);
  }
}

const code = await main(process.argv);
// The HTTP/2 session would keep the process alive until its idle timeout.
process.stdout.write("", () => process.exit(code));
