// What this build is: the package version, the git commit it was built from
// and the Node.js running it. Reported by microvpc_build_info, on every log
// line, by the daemons' --version and by `microvpc version`.
//
// A compiled build (build.mjs, the image) has both baked in by esbuild's
// `define`; the commit comes from `git rev-parse HEAD` at build time, or from
// MICROVPC_COMMIT where there is no .git (the image's build stage gets it as
// a build argument). Run from source (tsx, the tests), they are read from
// package.json and .git here, once, without starting a process.
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

declare const __MICROVPC_BUILD__: { version: string; commit: string } | undefined;

export interface BuildInfo {
  readonly version: string;
  readonly commit: string;
  readonly node: string;
}

const COMMIT = /^[0-9a-f]{7,40}$/;

function fromSource(): { version: string; commit: string } {
  let root = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 4 && !safeRead(join(root, "package.json")); i++) root = dirname(root);
  let version = "0.0.0";
  try {
    version = String((JSON.parse(safeRead(join(root, "package.json")) ?? "{}") as { version?: unknown }).version ?? version);
  } catch {
    // a package.json that does not parse leaves the placeholder
  }
  return { version, commit: process.env.MICROVPC_COMMIT ?? gitHead(join(root, ".git")) ?? "unknown" };
}

function safeRead(path: string): string | undefined {
  try {
    return readFileSync(path, "utf8");
  } catch {
    return undefined;
  }
}

/** The commit .git/HEAD points at, following one ref (loose or packed); undefined if none. */
export function gitHead(gitDir: string): string | undefined {
  const head = safeRead(join(gitDir, "HEAD"))?.trim();
  if (!head) return undefined;
  if (!head.startsWith("ref: ")) return COMMIT.test(head) ? head : undefined;
  const ref = head.slice(5);
  const loose = safeRead(join(gitDir, ref))?.trim();
  if (loose && COMMIT.test(loose)) return loose;
  for (const line of (safeRead(join(gitDir, "packed-refs")) ?? "").split("\n")) {
    const [sha, name] = line.split(" ");
    if (name === ref && sha && COMMIT.test(sha)) return sha;
  }
  return undefined;
}

const baked = typeof __MICROVPC_BUILD__ === "undefined" ? undefined : __MICROVPC_BUILD__;
const src = baked ?? fromSource();

export const BUILD: BuildInfo = { version: src.version, commit: src.commit, node: process.version };

/** "0.1.0 (commit 28a7f49, node v24.1.0)": what --version prints. */
export function versionLine(b: BuildInfo = BUILD): string {
  return `${b.version} (commit ${b.commit.slice(0, 12)}, node ${b.node})`;
}

/**
 * The x-microvpc-build response header every RPC carries:
 * "version=0.1.0; commit=28a7f49…; node=v24.1.0". Header-safe: anything
 * outside printable ASCII (or ";" "=") in a field becomes "_".
 */
export function buildHeader(b: BuildInfo = BUILD): string {
  const clean = (s: string) => s.replace(/[^\x21-\x7e]|[;=,]/g, "_").slice(0, 128);
  return `version=${clean(b.version)}; commit=${clean(b.commit)}; node=${clean(b.node)}`;
}

/** Reads an x-microvpc-build header back; undefined if it is absent or not of that form. */
export function parseBuildHeader(value: string | null | undefined): BuildInfo | undefined {
  if (!value) return undefined;
  const fields = new Map<string, string>();
  for (const part of value.split(";")) {
    const m = /^\s*(version|commit|node)=([\x21-\x7e]{1,128})\s*$/.exec(part);
    if (!m || fields.has(m[1])) return undefined;
    fields.set(m[1], m[2]);
  }
  const version = fields.get("version");
  const commit = fields.get("commit");
  const node = fields.get("node");
  return version && commit && node ? { version, commit, node } : undefined;
}
