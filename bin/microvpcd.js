#!/usr/bin/env -S node --max-semi-space-size=2
// The daemons' entry point runs the compiled build (`npm run build` writes
// dist/): no TypeScript loader at run time.
//
// --max-semi-space-size=2 (MiB): V8's young generation stays at 4 MiB. Node
// 24 lets it grow to 64 MiB on a large machine, and each scavenge of it then
// stopped a daemon for ~20 ms, several times a minute under load: the
// slowest CreateVm of a bench:vm pass waited on one (docs/operations.md,
// "Node.js heap"). Small scavenges cost ~2 ms each and no more CPU in all.
// Every way the daemons run passes it: the image, systemd and the k8s
// manifests execute this file; test/lib/daemon.ts and the quickstart read
// the flags from this line.
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
