// The static scan behind test/unit/lua-keys-declared.test.ts: which
// redis.call()s of the Lua scripts in a TypeScript source build their key
// inside Lua instead of taking it from KEYS (Redis Cluster refuses those).
import { readdirSync } from "node:fs";
import { join, relative } from "node:path";

/** Commands whose first argument is not a key. */
const NO_KEY = new Set(["TIME", "SPUBLISH", "PUBLISH", "ECHO", "PING"]);

export function tsFiles(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? tsFiles(join(dir, e.name)) : e.name.endsWith(".ts") ? [join(dir, e.name)] : [],
  );
}

/** The argument starting at i, up to the next comma or closing parenthesis at depth 0 (Lua strings skipped). */
function argAt(src: string, i: number): { text: string; end: number } {
  let depth = 0;
  let j = i;
  while (j < src.length) {
    const c = src[j];
    if (c === "'" || c === '"') {
      const close = src.indexOf(c, j + 1);
      j = close < 0 ? src.length : close + 1;
      continue;
    }
    if (c === "(" || c === "[" || c === "{") depth++;
    else if (c === ")" || c === "]" || c === "}") {
      if (depth === 0) break;
      depth--;
    } else if (c === "," && depth === 0) break;
    j++;
  }
  return { text: src.slice(i, j).trim(), end: j };
}

/**
 * The Lua locals of a script that hold a built key name: `local X = '…'` or
 * `local X = a .. b` (e.g. `local TOKENS = 'mvpc:tokens'`, `local hk = F ..
 * 'host:' .. h .. ':sig'`), in its own text and in the scripts it takes in
 * with `${NAME}`, so that a call naming such a local counts as a built key.
 */
function builtLocals(src: string, consts: { name: string; at: number; end: number }[], c: { at: number; end: number }, seen = new Set<string>()): Set<string> {
  const text = src.slice(c.at, c.end);
  const out = new Set<string>();
  for (const m of text.matchAll(/\blocal ([A-Za-z_][A-Za-z0-9_]*) = ([^\n]*)/g)) {
    // A string literal, or a concatenation: a name made here, not taken from KEYS.
    if (/^['"]/.test(m[2].trim()) || /\.\./.test(m[2])) out.add(m[1]);
  }
  for (const m of text.matchAll(/\$\{([A-Za-z_][A-Za-z0-9_]*)\}/g)) {
    const inc = consts.find((x) => x.name === m[1]);
    if (!inc || seen.has(inc.name)) continue;
    seen.add(inc.name);
    for (const l of builtLocals(src, consts, inc, seen)) out.add(l);
  }
  return out;
}

/** Per script (the nearest `const NAME =` above the call), the calls whose key is built in Lua. */
export function builtKeys(root: string, file: string, src: string): Map<string, string[]> {
  const out = new Map<string, string[]>();
  const starts = [...src.matchAll(/^(?:export )?const ([A-Za-z_][A-Za-z0-9_]*) = /gm)].map((m) => ({ name: m[1], at: m.index }));
  const consts = starts.map((c, i) => ({ ...c, end: starts[i + 1]?.at ?? src.length }));
  const locals = new Map(consts.map((c) => [c.name, builtLocals(src, consts, c)]));
  // Wrappers that hand their first two arguments on as command and key
  // (LOAD_VPC's `local function get(cmd, key, ...) … redis.pcall(cmd, key, …)`): their calls count too.
  const wrappers = [...src.matchAll(/local function ([A-Za-z_][A-Za-z0-9_]*)\(([A-Za-z_]+), ([A-Za-z_]+)[^)]*\)\s*\n[^\n]*redis\.p?call\(\2, \3\b/g)].map(
    (m) => m[1],
  );
  const calls = new RegExp(`(?:redis\\.p?call|\\b(?:${wrappers.join("|") || "(?!)"}))\\(`, "g");
  for (const m of src.matchAll(calls)) {
    const cmd = argAt(src, m.index + m[0].length);
    if (src[cmd.end] !== ",") continue;
    const name = /^['"]([A-Za-z]+)['"]$/.exec(cmd.text)?.[1]?.toUpperCase();
    if (name && NO_KEY.has(name)) continue;
    const key = argAt(src, cmd.end + 1).text;
    if (/^KEYS\[[^\]]+\]$/.test(key)) continue;
    const owner = consts.filter((c) => c.at < m.index).at(-1)?.name ?? "(module)";
    if (!/['"]|\.\./.test(key) && !locals.get(owner)?.has(key)) continue;
    const k = `${relative(root, file)}:${owner}`;
    out.set(k, [...(out.get(k) ?? []), `${name ?? cmd.text} ${key}`]);
  }
  return out;
}
