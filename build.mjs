// `npm run build`: compiles the daemons' and the CLI's TypeScript into
// dist/ with esbuild — one ES module per entry point, our code bundled,
// node_modules left as imports (the image ships them as production
// dependencies). esbuild rather than tsc: it bundles each entry into one
// file that Node loads in one read (start-up is what we build for), and it
// takes ~0.3 s; `tsc --noEmit` still does the type checking in `npm test`.
// Used by `npm run build`, by the test run's global setup and by the image.
import { build as esbuild } from "esbuild";
import { copyFileSync, mkdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = dirname(fileURLToPath(import.meta.url));
export const DIST = join(ROOT, "dist");

/** Entry points: what bin/ runs, plus the quickstart's demo. */
const ENTRIES = { microvpcd: "cli/microvpcd.ts", microvpc: "cli/microvpc.ts", demo: "deploy/demo.ts" };

export async function build({ quiet = false } = {}) {
  const t0 = performance.now();
  rmSync(DIST, { recursive: true, force: true });
  mkdirSync(DIST, { recursive: true });
  await esbuild({
    absWorkingDir: ROOT,
    entryPoints: ENTRIES,
    outdir: DIST,
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
  });
  // Reflection serves the commented descriptors from this buf image.
  copyFileSync(join(ROOT, "gen", "descriptors.binpb"), join(DIST, "descriptors.binpb"));
  if (!quiet) console.log(`dist/ built in ${Math.round(performance.now() - t0)} ms`);
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await build();
