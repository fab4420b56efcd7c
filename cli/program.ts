// The `microvpc` command tree: global options, the configuration file's
// context applied before each command, and every command group (each in its
// own file under commands/). cli/microvpc.ts runs it.
import { Command, Option } from "commander";
import { versionLine } from "../services/common/version.js";
import { groups } from "./commands/index.js";
import { loadConfig, selectContext, type ContextSettings } from "./lib/config.js";
import { DAEMON_NAMES, DAEMONS, globals, parseHost } from "./lib/context.js";
import { EXIT_HELP } from "./lib/errors.js";
import { helpConfig } from "./lib/help.js";
import { integer } from "./lib/options.js";
import { OUTPUT_FORMATS, setRendering } from "./lib/output.js";

/** Where a global option's value came from counts as given: on the command line or in its variable. */
function given(program: Command, key: string): boolean {
  const src = program.getOptionValueSource(key);
  return src === "cli" || src === "env";
}

/**
 * The context's settings, under whatever the command line and the
 * environment did not set: flag > variable > context > default. An address
 * given with --host (or MICROVPC_HOST) covers every daemon, so then no
 * address comes from the context.
 */
export function applyContext(program: Command, ctx: ContextSettings): void {
  const set = (key: keyof ContextSettings, value: unknown) => {
    if (value !== undefined && !given(program, key)) program.setOptionValueWithSource(key, value, "config");
  };
  if (!given(program, "host")) {
    set("host", ctx.host);
    for (const d of ["server", "netagent", "firewall", "gateway", "vmm"] as const) set(d, ctx[d]);
  }
  if (!given(program, "token") && !given(program, "tokenFile")) set("tokenFile", ctx.tokenFile);
  if (!given(program, "caFile")) set("caCert", ctx.caCert);
  if (!given(program, "clientCert") && !given(program, "clientKey")) {
    set("clientCert", ctx.clientCert);
    set("clientKey", ctx.clientKey);
  }
  set("insecureSendToken", ctx.insecureSendToken);
}

export function buildProgram(): Command {
  const program = new Command("microvpc").description(
    "Operate microvpc: VPCs, subnets, addresses, security groups, network ACLs, NAT, floating IPs, port forwards, peering and VMs.\n" +
      "Every global option can also be set by the environment variable shown.",
  );
  program
    .addOption(new Option("--host <host>", "hypervisor whose daemons to use: every daemon defaults to HOST:its port").env("MICROVPC_HOST").argParser(parseHost))
    .addOption(
      new Option("--server <host:port>", `address of microvpcd ipam (${DAEMONS.ipam.serves}); default HOST:7401 (http:// or https:// URL also accepted)`).env(
        "MICROVPC_SERVER",
      ),
    );
  for (const d of DAEMON_NAMES.filter((n) => n !== "ipam")) {
    const { option, env, port, serves } = DAEMONS[d];
    program.addOption(new Option(`${option} <host:port>`, `address of microvpcd ${d} (${serves}); default HOST:${port}`).env(env));
  }
  program
    .addOption(
      new Option("--context <name>", "context of the configuration file to use (default: its current-context; see `microvpc config`)").env("MICROVPC_CONTEXT"),
    )
    .addOption(new Option("--token <token>", "bearer token, if the daemons require one (--token-file keeps it out of ps)").env("MICROVPC_TOKEN"))
    .addOption(
      new Option("--token-file <path>", "read the bearer token from this file (its first line); refused if every user may read it").env("MICROVPC_TOKEN_FILE"),
    )
    .addOption(
      new Option(
        "--insecure-send-token",
        "send --token over plaintext (http://) to a non-loopback address too; by default only https:// or loopback addresses get it",
      ).env("MICROVPC_INSECURE_SEND_TOKEN"),
    )
    .addOption(new Option("--ca-cert <path>", "CA certificate(s) (PEM) to trust for https:// daemons, besides the system's").env("MICROVPC_CA_CERT"))
    .addOption(new Option("--ca-file <path>", "the same as --ca-cert (its older name)").env("MICROVPC_CA_FILE"))
    .addOption(new Option("--client-cert <path>", "client certificate (PEM) for daemons that require mutual TLS (--tls-client-ca)").env("MICROVPC_CLIENT_CERT"))
    .addOption(new Option("--client-key <path>", "private key (PEM) of --client-cert").env("MICROVPC_CLIENT_KEY"))
    .addOption(
      new Option("-o, --output <format>", "output format: table, wide (more columns), json, yaml, name (kind/name lines)")
        .choices(OUTPUT_FORMATS)
        .env("MICROVPC_OUTPUT")
        .default("table"),
    )
    .addOption(new Option("--no-headers", "tables without their header line").env("MICROVPC_NO_HEADERS"))
    .addOption(
      new Option("--timeout-ms <ms>", "deadline of each call (VM calls: 120000 unless given)")
        .env("MICROVPC_TIMEOUT_MS")
        .argParser(integer(1, 3_600_000))
        .default(10_000),
    )
    .addHelpText(
      "after",
      `
Daemons and their addresses:
  Each daemon's address is its own option (or variable) if given, else
  --host (MICROVPC_HOST) with the daemon's port, else the context's address
  (microvpc config --help), else 127.0.0.1 with that port:
    ipam 7401 (--server)    netagent 7402    firewall 7403    gateway 7404    vmm 7405
  e.g. \`microvpc --host 10.0.0.5 status\` checks every daemon of hypervisor 10.0.0.5.

${EXIT_HELP}`,
    )
    .version(versionLine(), "--version", "print the CLI's version and exit (`microvpc version` asks the daemons too)")
    .configureHelp(helpConfig)
    .showHelpAfterError("(add --help for usage)")
    // Commander exits by itself with code 1; we need 2 for usage errors, so
    // it throws instead and main() picks the code. Subcommands inherit this.
    .exitOverride();
  // Before any command runs: the configuration file's context under the
  // options not given (`config` itself reads the file as it is; `completion`
  // calls no daemon), then how tables render.
  program.hook("preAction", (_root, action) => {
    let top = action;
    while (top.parent && top.parent !== program) top = top.parent;
    if (top.name() !== "config" && top.name() !== "completion") {
      const ctx = selectContext(loadConfig(), program.opts().context as string | undefined);
      if (ctx) applyContext(program, ctx);
    }
    setRendering({ headers: globals(action).headers !== false });
  });
  for (const g of groups) g.register(program);
  return program;
}
