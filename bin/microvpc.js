#!/usr/bin/env node
// The CLI's entry point runs the compiled build (`npm run build` writes
// dist/): no TypeScript loader at run time.
import { existsSync } from "node:fs";
// package.json's devEngines: npm only warns, so an older Node is refused here, at once and by name.
const major = Number(process.versions.node.split(".")[0]);
if (major < 24) {
  console.error(`microvpc: needs Node.js 24 or newer, this is ${process.version}; \`. deploy/node.sh\` puts one on PATH`);
  process.exit(1);
}
const entry = new URL("../dist/microvpc.js", import.meta.url);
if (!existsSync(entry)) {
  console.error("microvpc: dist/microvpc.js is missing; run `npm run build` first");
  process.exit(1);
}
await import(entry.href);
