// `microvpc config ...`: the contexts of the configuration file
// (cli/lib/config.ts): list them, show one, choose the current one.
import { readFileSync } from "node:fs";
import type { Command } from "commander";
import { loadConfig, selectContext, writeCurrentContext, type Context } from "../lib/config.js";
import { globals } from "../lib/context.js";
import { details, emitValue, table } from "../lib/output.js";

/** A context as the file spells it (kebab-case keys). */
function fileForm(c: Context): Record<string, unknown> {
  const out: Record<string, unknown> = { name: c.name };
  const keys: [keyof Context, string][] = [
    ["host", "host"],
    ["server", "server"],
    ["netagent", "netagent"],
    ["firewall", "firewall"],
    ["gateway", "gateway"],
    ["vmm", "vmm"],
    ["tokenFile", "token-file"],
    ["caCert", "ca-cert"],
    ["clientCert", "client-cert"],
    ["clientKey", "client-key"],
    ["insecureSendToken", "insecure-send-token"],
  ];
  for (const [k, f] of keys) if (c[k] !== undefined) out[f] = c[k];
  return out;
}

export function register(program: Command): void {
  const config = program
    .command("config")
    .description("the configuration file's contexts (where the daemons are, token file, CA)")
    .addHelpText(
      "after",
      `
The file: $MICROVPC_CONFIG, else ~/.config/microvpc/config.yaml. For example:

  current-context: lab
  contexts:
    - name: lab
      host: 10.0.0.5                  # every daemon at HOST:its port
      server: https://ipam.lab:7401   # one daemon's own address (also netagent, firewall, gateway, vmm)
      token-file: ~/.config/microvpc/lab.token
      ca-cert: ~/.config/microvpc/lab-ca.pem

--context NAME (MICROVPC_CONTEXT) picks another context for one command.
A flag or variable wins over the context, the context over the default.`,
    );

  config
    .command("get-contexts")
    .description("list the contexts; * marks the current one")
    .action((_o, cmd: Command) => {
      const cfg = loadConfig();
      const current = globals(cmd).context || cfg.currentContext;
      emitValue(
        cmd,
        () => ({ path: cfg.path, currentContext: cfg.currentContext, contexts: cfg.contexts.map(fileForm) }),
        () =>
          table(
            ["CURRENT", "NAME", "HOST", "SERVER", "TOKEN FILE"],
            cfg.contexts.map((c) => [c.name === current ? "*" : "", c.name, c.host ?? "", c.server ?? "", c.tokenFile ?? ""]),
          ),
        () => cfg.contexts.map((c) => `context/${c.name}`),
      );
    });

  config
    .command("current-context")
    .description("print the current context's name")
    .action((_o, cmd: Command) => {
      const cfg = loadConfig();
      const name = globals(cmd).context || cfg.currentContext;
      if (!name) throw new Error(`no current context: ${cfg.exists ? `${cfg.path} sets no current-context` : `${cfg.path} does not exist`}`);
      selectContext(cfg, name);
      emitValue(
        cmd,
        () => ({ currentContext: name }),
        () => name,
        () => [`context/${name}`],
      );
    });

  config
    .command("use-context <name>")
    .description("make NAME the current context (rewrites current-context in the file)")
    .action((name: string, _o, cmd: Command) => {
      const cfg = loadConfig();
      if (!cfg.exists) throw new Error(`${cfg.path} does not exist: write its contexts first (microvpc config --help shows the form)`);
      writeCurrentContext(cfg, name);
      emitValue(
        cmd,
        () => ({ currentContext: name }),
        () => `switched to context ${name}`,
        () => [`context/${name}`],
      );
    });

  config
    .command("view")
    .description("show the configuration: the file as read, or with --minify only the context in use")
    .option("--minify", "only the context in use", false)
    .action((o: { minify: boolean }, cmd: Command) => {
      const cfg = loadConfig();
      if (o.minify) {
        const ctx = selectContext(cfg, globals(cmd).context);
        emitValue(
          cmd,
          () => (ctx ? fileForm(ctx) : {}),
          () => (ctx ? details(Object.entries(fileForm(ctx)).map(([k, v]) => [k, String(v)])) : `no context in use (${cfg.path})`),
          () => (ctx ? [`context/${ctx.name}`] : []),
        );
        return;
      }
      emitValue(
        cmd,
        () => ({ currentContext: cfg.currentContext, contexts: cfg.contexts.map(fileForm) }),
        // The file itself, comments and all (it holds paths, never secrets).
        () => (cfg.exists ? readFileSync(cfg.path, "utf8") : `# ${cfg.path} does not exist`),
        () => cfg.contexts.map((c) => `context/${c.name}`),
      );
    });
}
