// Shell completion scripts (bash, zsh, fish) generated from the commander
// tree, so a new command group is completed without touching this file.
// Besides commands, flags and fixed option values, resource names complete
// from the live API: an option or argument that takes a VPC, subnet,
// security group, VM or host asks `microvpc __complete KIND` (a hidden
// command: one name per line from the List call, nothing on error), with
// the daemons' addresses from the environment (MICROVPC_SERVER, …).
import type { Command } from "commander";

/** Resource kinds `__complete` lists. */
export const NAME_KINDS = ["vpc", "subnet", "sg", "vm", "host"] as const;
export type NameKind = (typeof NAME_KINDS)[number];

/** Options that take a resource reference, by long flag. */
const OPTION_KINDS: Record<string, NameKind> = {
  "--vpc": "vpc",
  "--vpc1": "vpc",
  "--vpc2": "vpc",
  "--subnet": "subnet",
  "--sg": "sg",
  "--group": "sg",
  "--sg-name": "sg",
  "--vm": "vm",
};

/** The kind of a command's first argument, when it names an existing resource. */
function argumentKind(cmd: Command, path: string): NameKind | undefined {
  const arg = cmd.registeredArguments[0];
  if (!arg) return undefined;
  const group = path.split(" ")[0];
  if (arg.name() === "ref" && (NAME_KINDS as readonly string[]).includes(group)) return group as NameKind;
  if (arg.name() === "vm") return "vm";
  if (arg.name() === "host" && group === "host") return "host";
  return undefined;
}

function flags(cmd: Command): string[] {
  const out: string[] = [];
  for (const o of cmd.options) {
    if (o.hidden) continue;
    if (o.long) out.push(o.long);
    if (o.short) out.push(o.short);
  }
  return [...out, "--help"];
}

const hidden = (c: Command) => !!(c as unknown as { _hidden?: boolean })._hidden;

/** What may complete after `path|word`: fixed values, or the names of a kind. */
type Value = { words: string[] } | { kind: NameKind };

interface Tree {
  /** Every command path ("", "vpc", "vpc create", ...) with the words that may follow it. */
  paths: Map<string, string[]>;
  /** "path|previous word" → what completes after it. */
  values: Map<string, Value>;
}

function walk(cmd: Command, path: string, t: Tree): void {
  if (hidden(cmd)) return;
  const subs = cmd.commands.filter((c) => !hidden(c)).map((c) => c.name());
  const choices = cmd.registeredArguments.flatMap((a) => a.argChoices ?? []);
  t.paths.set(path, [...subs, ...choices, ...flags(cmd)]);
  for (const o of cmd.options) {
    const v: Value | undefined = o.argChoices ? { words: o.argChoices } : o.long && OPTION_KINDS[o.long] ? { kind: OPTION_KINDS[o.long] } : undefined;
    if (!v) continue;
    for (const f of [o.long, o.short]) if (f) t.values.set(`${path}|${f}`, v);
  }
  const kind = path === "" ? undefined : argumentKind(cmd, path);
  if (kind) t.values.set(`${path}|${cmd.name()}`, { kind });
  for (const c of cmd.commands) walk(c, path === "" ? c.name() : `${path} ${c.name()}`, t);
}

/** The tree with the global options (accepted after any command) folded into every path. */
function tree(program: Command): Tree {
  const t: Tree = { paths: new Map(), values: new Map() };
  walk(program, "", t);
  const globals = flags(program).filter((f) => f !== "--help");
  const globalValues = [...t.values.entries()].filter(([k]) => k.startsWith("|"));
  for (const [p, words] of t.paths) {
    if (p === "") continue;
    t.paths.set(p, [...new Set([...words, ...globals])]);
    for (const [k, v] of globalValues) if (!t.values.has(`${p}${k}`)) t.values.set(`${p}${k}`, v);
  }
  return t;
}

const quote = (s: string) => `'${s.replace(/'/g, "'\\''")}'`;
const fnName = (program: Command, shell: string) => `_${program.name().replace(/[^A-Za-z0-9_]/g, "_")}_${shell}_complete`;

export function bashCompletion(program: Command): string {
  const name = program.name();
  const fn = `_${name.replace(/[^A-Za-z0-9_]/g, "_")}_complete`;
  const t = tree(program);
  const known = [...t.paths.keys()]
    .filter((p) => p !== "")
    .map(quote)
    .join("|");
  const cases = [...t.paths.entries()].map(([p, words]) => `    ${quote(p)}) words=${quote(words.join(" "))} ;;`).join("\n");
  const valueCases = [...t.values.entries()]
    .map(([k, v]) =>
      "words" in v
        ? `    ${quote(k)}) COMPREPLY=($(compgen -W ${quote(v.words.join(" "))} -- "$cur")); return ;;`
        : `    ${quote(k)}) COMPREPLY=($(compgen -W "$("\${COMP_WORDS[0]}" __complete ${v.kind} 2>/dev/null)" -- "$cur")); return ;;`,
    )
    .join("\n");
  return `# bash completion for ${name}; load with: source <(${name} completion bash)
${fn}() {
  local cur="\${COMP_WORDS[COMP_CWORD]}" prev="" path="" next w i words
  ((COMP_CWORD > 1)) && prev="\${COMP_WORDS[COMP_CWORD-1]}"
  for ((i = 1; i < COMP_CWORD; i++)); do
    w="\${COMP_WORDS[i]}"
    next="\${path:+$path }$w"
    case "$next" in
      ${known}) path="$next" ;;
    esac
  done
  case "$path|$prev" in
${valueCases}
  esac
  case "$path" in
${cases}
    *) words="" ;;
  esac
  COMPREPLY=($(compgen -W "$words" -- "$cur"))
}
complete -F ${fn} ${name}
`;
}

export function zshCompletion(program: Command): string {
  const name = program.name();
  const fn = fnName(program, "zsh");
  const t = tree(program);
  const known = [...t.paths.keys()]
    .filter((p) => p !== "")
    .map(quote)
    .join("|");
  const cases = [...t.paths.entries()].map(([p, words]) => `    ${quote(p)}) candidates=(${words.map(quote).join(" ")}) ;;`).join("\n");
  const valueCases = [...t.values.entries()]
    .map(([k, v]) =>
      "words" in v
        ? `    ${quote(k)}) compadd -- ${v.words.map(quote).join(" ")}; return ;;`
        : `    ${quote(k)}) compadd -- \${(f)"$(\${words[1]} __complete ${v.kind} 2>/dev/null)"}; return ;;`,
    )
    .join("\n");
  // zsh: "path" is tied to PATH and "words" is the completion's own array, hence cpath.
  return `#compdef ${name}
# zsh completion for ${name}; load with: source <(${name} completion zsh)
# (after compinit), or save it as _${name} in a directory of $fpath.
${fn}() {
  local cpath="" next w i prev=""
  local -a candidates
  ((CURRENT > 2)) && prev="\${words[CURRENT-1]}"
  for ((i = 2; i < CURRENT; i++)); do
    w="\${words[i]}"
    next="\${cpath:+$cpath }$w"
    case "$next" in
      ${known}) cpath="$next" ;;
    esac
  done
  case "$cpath|$prev" in
${valueCases}
  esac
  case "$cpath" in
${cases}
    *) candidates=() ;;
  esac
  compadd -- $candidates
}
compdef ${fn} ${name}
`;
}

export function fishCompletion(program: Command): string {
  const name = program.name();
  const fn = fnName(program, "fish");
  const t = tree(program);
  // fish's switch patterns are globs: no path, flag or value here holds * ? [ (checked below).
  const glob = (s: string) => {
    if (/[*?[\\]/.test(s)) throw new Error(`completion: ${s} cannot be a fish case pattern`);
    return quote(s);
  };
  const known = [...t.paths.keys()].filter((p) => p !== "").map(quote);
  const cases = [...t.paths.entries()].map(([p, words]) => `        case ${glob(p)}\n            printf '%s\\n' ${words.map(quote).join(" ")}`).join("\n");
  const valueCases = [...t.values.entries()]
    .map(([k, v]) =>
      "words" in v
        ? `        case ${glob(k)}\n            printf '%s\\n' ${v.words.map(quote).join(" ")}\n            return`
        : `        case ${glob(k)}\n            $toks[1] __complete ${v.kind} 2>/dev/null\n            return`,
    )
    .join("\n");
  return `# fish completion for ${name}; load with: ${name} completion fish | source
# (or save it as ~/.config/fish/completions/${name}.fish)
set -g __${fn}_paths ${known.join(" ")}
function ${fn}
    set -l toks (commandline -opc)
    set -l cpath ""
    for w in $toks[2..-1]
        set -l next (string trim -- "$cpath $w")
        if contains -- $next $__${fn}_paths
            set cpath $next
        end
    end
    set -l prev ""
    if test (count $toks) -gt 1
        set prev $toks[-1]
    end
    switch "$cpath|$prev"
${valueCases}
    end
    switch "$cpath"
${cases}
    end
end
complete -c ${name} -f -a '(${fn})'
`;
}
