// Generates a bash completion script from the commander tree, so a new
// command group is completed without touching this file.
import type { Command } from "commander";

function flags(cmd: Command): string[] {
  const out: string[] = [];
  for (const o of cmd.options) {
    if (o.hidden) continue;
    if (o.long) out.push(o.long);
    if (o.short) out.push(o.short);
  }
  return [...out, "--help"];
}

/** Every command path ("", "vpc", "vpc create", ...) with the words that may follow it. */
function walk(cmd: Command, path: string, globals: string[], out: Map<string, string[]>, values: Map<string, string[]>): void {
  const subs = cmd.commands.filter((c) => !(c as unknown as { _hidden?: boolean })._hidden).map((c) => c.name());
  const choices = cmd.registeredArguments.flatMap((a) => a.argChoices ?? []);
  out.set(path, [...subs, ...choices, ...flags(cmd), ...globals]);
  // Options with a fixed set of values complete those values.
  for (const o of cmd.options) {
    if (!o.argChoices) continue;
    for (const f of [o.long, o.short]) if (f) values.set(`${path}|${f}`, o.argChoices);
  }
  for (const c of cmd.commands) walk(c, path === "" ? c.name() : `${path} ${c.name()}`, globals, out, values);
}

const quote = (s: string) => `'${s.replace(/'/g, "'\\''")}'`;

export function bashCompletion(program: Command): string {
  const name = program.name();
  const fn = `_${name.replace(/[^A-Za-z0-9_]/g, "_")}_complete`;
  const paths = new Map<string, string[]>();
  const values = new Map<string, string[]>();
  // Global options are accepted after any subcommand too.
  walk(program, "", [], paths, values);
  const globalValues = [...values.entries()].filter(([k]) => k.startsWith("|"));
  const globals = flags(program).filter((f) => f !== "--help");
  const known = [...paths.keys()]
    .filter((p) => p !== "")
    .map(quote)
    .join("|");
  const cases = [...paths.entries()]
    .map(([p, words]) => `    ${quote(p)}) words=${quote([...new Set([...words, ...(p === "" ? [] : globals)])].join(" "))} ;;`)
    .join("\n");
  // A global option's values apply after any command path.
  const valueCases = [
    ...values.entries(),
    ...globalValues.flatMap(([k, v]) => [...paths.keys()].filter((p) => p !== "").map((p) => [`${p}${k}`, v] as [string, string[]])),
  ]
    .map(([k, v]) => `    ${quote(k)}) COMPREPLY=($(compgen -W ${quote(v.join(" "))} -- "$cur")); return ;;`)
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
