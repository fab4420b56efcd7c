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
const ENTRIES = { microvpcd: "cli/microvpcd.ts", microvpc: "cli/microvpc.ts", demo: "deploy/demo.ts" };

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
 * outdir and commit are for tests that need a second, different build (the
 * CLI's version skew check): outdir must be inside this checkout, so that
 * the build finds node_modules.
 */
export async function build({ quiet = false, outdir = DIST, commit = undefined } = {}) {
  const t0 = performance.now();
  rmSync(outdir, { recursive: true, force: true });
  mkdirSync(outdir, { recursive: true });
  await esbuild({
    absWorkingDir: ROOT,
    entryPoints: ENTRIES,
    outdir,
    bundle: true,
    packages: "external",
    platform: "node",
    format: "esm",
    target: "node24",
    sourcemap: "linked",
    // Shared code between the entry points goes into chunks rather than
    // into each file twice.
    splitting: true,
    chunkNames: "chunks/[name]-[hash]",
    logLevel: "warning",
    define: { __MICROVPC_BUILD__: JSON.stringify(buildInfo(commit)) },
  });
  // Reflection serves the commented descriptors from this buf image.
  copyFileSync(join(ROOT, "gen", "descriptors.binpb"), join(outdir, "descriptors.binpb"));
  if (!quiet) console.log(`dist/ built in ${Math.round(performance.now() - t0)} ms`);
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await build();
