// Options shared by several commands, so they read and parse the same way
// in every group.
import { InvalidArgumentError, Option, type Command } from "commander";

export function integer(min: number, max: number) {
  return (value: string): number => {
    const n = Number(value);
    if (!/^[0-9]+$/.test(value) || n < min || n > max) throw new InvalidArgumentError(`expected a whole number from ${min} to ${max}`);
    return n;
  };
}

function collectLabel(value: string, prev: { key: string; value: string }[]) {
  const i = value.indexOf("=");
  if (i <= 0) throw new InvalidArgumentError('expected key=value, e.g. "team=web"');
  return [...prev, { key: value.slice(0, i), value: value.slice(i + 1) }];
}

export const dryRunOption = () => new Option("--dry-run", "validate locally and print the request that would be sent; change nothing");

export const labelOption = () => new Option("--label <key=value>", "operator label (repeatable)").argParser(collectLabel).default([]);

export const descriptionOption = () => new Option("--description <text>", "free text for operators").default("");

export const clientTokenOption = () =>
  new Option("--client-token <token>", "idempotency token: repeating the create with it returns the first result").default("");

export const limitOption = () => new Option("--limit <n>", "stop after n items (default: all pages)").argParser(integer(1, Number.MAX_SAFE_INTEGER));

/** A repeatable option; each value is kept as given (rule texts, file paths). */
export const repeatableOption = (flags: string, description: string) =>
  new Option(flags, `${description} (repeatable)`).argParser((v: string, prev: string[]) => [...prev, v]).default([]);

/** A repeatable option of names or ids; "a,b" counts as two. */
export const listOption = (flags: string, description: string) =>
  new Option(flags, `${description} (repeatable, or comma-separated)`)
    .argParser((v: string, prev: string[]) => [
      ...prev,
      ...v
        .split(",")
        .map((x) => x.trim())
        .filter((x) => x !== ""),
    ])
    .default([]);

/** --vpc as most commands take it. */
export const vpcOption = (what = "", required = false) => {
  const o = new Option("--vpc <ref>", `VPC id or name${what}`);
  return required ? o.makeOptionMandatory() : o.default("");
};

export const port = (value: string): number => integer(1, 65535)(value);

/** --name, the reference guides' spelling of a create command's NAME argument. */
export const nameOption = () => new Option("--name <name>", "the name, as NAME gives it (either form; the same if both)");

/**
 * The name of a `create [name]` command: the argument or --name. Both is
 * fine when they agree; neither, or two different names, is a usage error.
 */
export function createName(cmd: Command, positional: string | undefined, option: string | undefined): string {
  if (positional !== undefined && option !== undefined && positional !== option) {
    cmd.error(`error: the name is given twice and differs: NAME ${JSON.stringify(positional)} and --name ${JSON.stringify(option)}; give one of them`, {
      exitCode: 2,
    });
  }
  const name = positional ?? option;
  if (name === undefined) cmd.error("error: missing the name: give it as the argument NAME or with --name", { exitCode: 2 });
  return name;
}
