#!/usr/bin/env node
// The daemons' entry point runs the compiled build (`npm run build` writes
// dist/): no TypeScript loader at run time.
import { existsSync } from "node:fs";
// package.json's devEngines: npm only warns, so an older Node is refused here, at once and by name.
const major = Number(process.versions.node.split(".")[0]);
if (major < 24) {
  console.error(`microvpcd: needs Node.js 24 or newer, this is ${process.version}; \`. deploy/node.sh\` puts one on PATH`);
  process.exit(1);
}
const entry = new URL("../dist/microvpcd.js", import.meta.url);
if (!existsSync(entry)) {
  console.error("microvpcd: dist/microvpcd.js is missing; run `npm run build` first");
  process.exit(1);
}
await import(entry.href);
