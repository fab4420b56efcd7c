// The CLI's configuration file: named contexts, each saying where a fleet's
// (or one hypervisor's) daemons are and how to reach them, kubeconfig style.
//
//   current-context: lab
//   contexts:
//     - name: lab
//       host: 10.0.0.5                 # every daemon at HOST:its port
//       server: https://ipam.lab:7401   # one daemon's own address (also netagent, firewall, gateway, vmm)
//       token-file: ~/.config/microvpc/lab.token
//       ca-cert: ~/.config/microvpc/lab-ca.pem
//
// Where: $MICROVPC_CONFIG, else $XDG_CONFIG_HOME/microvpc/config.yaml, else
// ~/.config/microvpc/config.yaml. Which context: --context (MICROVPC_CONTEXT),
// else current-context. A setting given as a flag or a variable wins over the
// context's; the context's wins over the default.
//
// The file is input like any other: every field is checked (type, form,
// unknown keys refused) before anything uses it, and the message names the
// file, the context and the field.
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { homedir } from "node:os";
import { dirname, isAbsolute, join, resolve } from "node:path";
import { parseHost } from "./context.js";
import { yamlLib } from "./yaml.js";

/** A context's settings, named as the global options are (camelCase keys of commander). */
export interface ContextSettings {
  host?: string;
  server?: string;
  netagent?: string;
  firewall?: string;
  gateway?: string;
  vmm?: string;
  tokenFile?: string;
  caCert?: string;
  clientCert?: string;
  clientKey?: string;
  insecureSendToken?: boolean;
}

export interface Context extends ContextSettings {
  name: string;
}

export interface Config {
  path: string;
  /** False where the file does not exist (no contexts then). */
  exists: boolean;
  currentContext: string;
  contexts: Context[];
}

/** The file's keys and the settings they become. */
const KEYS: Record<string, keyof ContextSettings> = {
  host: "host",
  server: "server",
  netagent: "netagent",
  firewall: "firewall",
  gateway: "gateway",
  vmm: "vmm",
  "token-file": "tokenFile",
  "ca-cert": "caCert",
  "client-cert": "clientCert",
  "client-key": "clientKey",
  "insecure-send-token": "insecureSendToken",
};

const ADDRESS_KEYS = new Set(["server", "netagent", "firewall", "gateway", "vmm"]);
const PATH_KEYS = new Set(["token-file", "ca-cert", "client-cert", "client-key"]);
const CONTEXT_NAME = /^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$/;
// host:port or an http(s) URL: printable, no spaces, no control characters.
const ADDRESS = /^(https?:\/\/)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}\/?$/;

export function configPath(env: NodeJS.ProcessEnv = process.env): string {
  if (env.MICROVPC_CONFIG) return env.MICROVPC_CONFIG;
  const base = env.XDG_CONFIG_HOME && isAbsolute(env.XDG_CONFIG_HOME) ? env.XDG_CONFIG_HOME : join(homedir(), ".config");
  return join(base, "microvpc", "config.yaml");
}

export class ConfigError extends Error {}

/** Parses and checks a config file's text; `path` is for messages and for resolving relative paths. */
export function parseConfig(text: string, path: string): Config {
  const doc = yamlLib().parseDocument(text);
  if (doc.errors.length > 0) throw new ConfigError(`${path}: not valid YAML: ${doc.errors[0].message.split("\n")[0]}`);
  const raw: unknown = doc.toJS() ?? {};
  const where = (s: string) => `${path}: ${s}`;
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) throw new ConfigError(where("expected a mapping with current-context and contexts"));
  const top = raw as Record<string, unknown>;
  for (const k of Object.keys(top))
    if (k !== "current-context" && k !== "contexts") throw new ConfigError(where(`unknown key ${JSON.stringify(k)} (known: current-context, contexts)`));
  const current = top["current-context"] ?? "";
  if (typeof current !== "string" || (current !== "" && !CONTEXT_NAME.test(current))) throw new ConfigError(where("current-context: expected a context name"));
  const list = top.contexts ?? [];
  if (!Array.isArray(list)) throw new ConfigError(where("contexts: expected a list of contexts, each with a name"));
  const contexts: Context[] = [];
  list.forEach((c: unknown, i: number) => {
    const at = `contexts[${i}]`;
    if (typeof c !== "object" || c === null || Array.isArray(c)) throw new ConfigError(where(`${at}: expected a mapping with a name`));
    const entry = c as Record<string, unknown>;
    if (typeof entry.name !== "string" || !CONTEXT_NAME.test(entry.name))
      throw new ConfigError(where(`${at}.name: expected a context name (letters, digits, _ . @ -; at most 64)`));
    const ctx: Context = { name: entry.name };
    for (const [k, v] of Object.entries(entry)) {
      if (k === "name") continue;
      const key = KEYS[k];
      const field = `context ${entry.name}: ${k}`;
      if (!key) throw new ConfigError(where(`${field}: unknown key (known: name, ${Object.keys(KEYS).join(", ")})`));
      if (k === "insecure-send-token") {
        if (typeof v !== "boolean") throw new ConfigError(where(`${field}: expected true or false`));
        ctx.insecureSendToken = v;
        continue;
      }
      // eslint-disable-next-line no-control-regex -- control characters are what it refuses
      if (typeof v !== "string" || v === "" || v.length > 1024 || /[\x00-\x1f\x7f]/.test(v))
        throw new ConfigError(where(`${field}: expected a non-empty string`));
      if (k === "host") {
        try {
          ctx.host = parseHost(v);
        } catch (e) {
          throw new ConfigError(where(`${field}: ${(e as Error).message}`));
        }
      } else if (ADDRESS_KEYS.has(k)) {
        if (!ADDRESS.test(v) || Number(/:([0-9]+)\/?$/.exec(v)![1]) > 65535)
          throw new ConfigError(where(`${field}: expected HOST:PORT or an http(s):// URL with a port, e.g. 10.0.0.5:7401`));
        ctx[key as "server"] = v;
      } else if (PATH_KEYS.has(k)) {
        ctx[key as "tokenFile"] = expandPath(v, path);
      }
    }
    if (contexts.some((x) => x.name === ctx.name)) throw new ConfigError(where(`context ${ctx.name} is defined twice`));
    contexts.push(ctx);
  });
  if (current !== "" && !contexts.some((c) => c.name === current)) throw new ConfigError(where(`current-context ${current} is not one of the contexts`));
  return { path, exists: true, currentContext: current, contexts };
}

/** ~/ is the home directory; a relative path is relative to the config file's directory. */
function expandPath(p: string, configFile: string): string {
  if (p === "~" || p.startsWith("~/")) return join(homedir(), p.slice(1));
  return isAbsolute(p) ? p : resolve(dirname(configFile), p);
}

export function loadConfig(env: NodeJS.ProcessEnv = process.env): Config {
  const path = configPath(env);
  if (!existsSync(path)) {
    if (env.MICROVPC_CONFIG) throw new ConfigError(`${path}: no such file (named by MICROVPC_CONFIG)`);
    return { path, exists: false, currentContext: "", contexts: [] };
  }
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    throw new ConfigError(`${path}: ${(e as Error).message}`);
  }
  return parseConfig(text, path);
}

/** The context to use: the one named (--context), else current-context; undefined if neither. */
export function selectContext(cfg: Config, name: string | undefined): Context | undefined {
  const want = name || cfg.currentContext;
  if (!want) return undefined;
  const ctx = cfg.contexts.find((c) => c.name === want);
  if (!ctx) {
    const known = cfg.contexts.map((c) => c.name).join(", ") || "none";
    throw new ConfigError(`context ${JSON.stringify(want)} is not in ${cfg.path} (contexts: ${known})`);
  }
  return ctx;
}

/** Rewrites current-context in the file, keeping its comments and layout. */
export function writeCurrentContext(cfg: Config, name: string): void {
  if (!cfg.contexts.some((c) => c.name === name)) {
    const known = cfg.contexts.map((c) => c.name).join(", ") || "none";
    throw new ConfigError(`context ${JSON.stringify(name)} is not in ${cfg.path} (contexts: ${known})`);
  }
  const doc = yamlLib().parseDocument(readFileSync(cfg.path, "utf8"));
  doc.set("current-context", name);
  writeFileSync(cfg.path, doc.toString());
}
