#!/usr/bin/env node
// The daemons' entry point runs the compiled build (`npm run build` writes
// dist/): no TypeScript loader at run time.
import { existsSync } from "node:fs";
const entry = new URL("../dist/microvpcd.js", import.meta.url);
if (!existsSync(entry)) {
  console.error("microvpcd: dist/microvpcd.js is missing; run `npm run build` first");
  process.exit(1);
}
await import(entry.href);
