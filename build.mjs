// `npm run build`: compiles the daemons' and the CLI's TypeScript into
// dist/ with esbuild — one ES module per entry point, our code bundled,
// node_modules left as imports (the image ships them as production
// dependencies). esbuild rather than tsc: it bundles each entry into one
// file that Node loads in one read (start-up is what we build for), and it
// takes ~0.3 s; `tsc --noEmit` still does the type checking in `npm test`.
// Used by `npm run build`, by the test run's global setup and by the image.
import { build as esbuild } from "esbuild";
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, readFileSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = dirname(fileURLToPath(import.meta.url));
export const DIST = join(ROOT, "dist");

/** Entry points: what bin/ runs, plus the quickstart's demo. */
const ENTRIES = { microvpcd: "cli/microvpcd.ts", demo: "deploy/demo.ts" };
/** The CLI, built apart: see CLI_BUNDLE. */
const CLI_ENTRY = { microvpc: "cli/microvpc.ts" };

/**
 * What services/common/version.ts reports for this build: package.json's
 * version, and the commit from MICROVPC_COMMIT (the image's build argument)
 * or `git rev-parse HEAD` (a checkout), else "unknown".
 */
function buildInfo(commitOverride) {
  const { version } = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8"));
  let commit = commitOverride ?? process.env.MICROVPC_COMMIT;
  if (!commit) {
    try {
      commit = execFileSync("git", ["rev-parse", "HEAD"], { cwd: ROOT, encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] }).trim();
    } catch {
      commit = "unknown";
    }
  }
  return { version, commit };
}

/**
 * The CLI is a process per command (scripts, the tests run it hundreds of
 * times), so its start-up counts: its dependencies are bundled into it too,
 * which halves the CPU of a call (one file to load instead of ~400 to
 * resolve, stat and compile: execa, grpc-js, connect, protobuf). Only the CLI:
 * some of the daemons' dependencies find files next to their own sources at
 * run time (pino's workers, ioredis). OpenTelemetry stays external, imported
 * only when tracing is on. The banner gives bundled CommonJS code the
 * require() it calls for Node's built-ins.
 */
const CLI_BUNDLE = {
  external: ["@opentelemetry/*"],
  banner: { js: 'import { createRequire as __microvpcRequire } from "node:module"; const require = __microvpcRequire(import.meta.url);' },
};

/**
 * outdir and commit are for tests that need a second, different build (the
 * CLI's version skew check): outdir must be inside this checkout, so that
 * the build finds node_modules.
 */
export async function build({ quiet = false, outdir = DIST, commit = undefined } = {}) {
  const t0 = performance.now();
  rmSync(outdir, { recursive: true, force: true });
  mkdirSync(outdir, { recursive: true });
  const common = {
    absWorkingDir: ROOT,
    outdir,
    bundle: true,
    platform: "node",
    format: "esm",
    target: "node24",
    sourcemap: "linked",
    // Shared code between the entry points goes into chunks rather than
    // into each file twice.
    splitting: true,
    logLevel: "warning",
    define: { __MICROVPC_BUILD__: JSON.stringify(buildInfo(commit)) },
  };
  await esbuild({ ...common, entryPoints: ENTRIES, packages: "external", chunkNames: "chunks/[name]-[hash]" });
  await esbuild({ ...common, ...CLI_BUNDLE, entryPoints: CLI_ENTRY, chunkNames: "chunks/cli-[name]-[hash]" });
  // Reflection serves the commented descriptors from this buf image.
  copyFileSync(join(ROOT, "gen", "descriptors.binpb"), join(outdir, "descriptors.binpb"));
  if (!quiet) console.log(`dist/ built in ${Math.round(performance.now() - t0)} ms`);
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await build();
