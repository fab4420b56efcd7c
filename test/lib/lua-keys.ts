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

/** Per script (the nearest `const NAME =` above the call), the calls whose key is built in Lua. */
export function builtKeys(root: string, file: string, src: string): Map<string, string[]> {
  const out = new Map<string, string[]>();
  const consts = [...src.matchAll(/^(?:export )?const ([A-Za-z_][A-Za-z0-9_]*) = /gm)].map((m) => ({ name: m[1], at: m.index }));
  for (const m of src.matchAll(/redis\.p?call\(/g)) {
    const cmd = argAt(src, m.index + m[0].length);
    if (src[cmd.end] !== ",") continue;
    const name = /^['"]([A-Za-z]+)['"]$/.exec(cmd.text)?.[1]?.toUpperCase();
    if (name && NO_KEY.has(name)) continue;
    const key = argAt(src, cmd.end + 1).text;
    if (/^KEYS\[[^\]]+\]$/.test(key)) continue;
    if (!/['"]|\.\./.test(key)) continue;
    const owner = consts.filter((c) => c.at < m.index).at(-1)?.name ?? "(module)";
    const k = `${relative(root, file)}:${owner}`;
    out.set(k, [...(out.get(k) ?? []), `${name ?? cmd.text} ${key}`]);
  }
  return out;
}
