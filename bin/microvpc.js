#!/usr/bin/env node
// The CLI's entry point runs the compiled build (`npm run build` writes
// dist/): no TypeScript loader at run time.
import { existsSync } from "node:fs";
const entry = new URL("../dist/microvpc.js", import.meta.url);
if (!existsSync(entry)) {
  console.error("microvpc: dist/microvpc.js is missing; run `npm run build` first");
  process.exit(1);
}
await import(entry.href);
