// The yaml package, loaded on first use: only -o yaml and an existing
// configuration file need it, and loading it costs every other command's
// start-up ~50–80 ms.
import { createRequire } from "node:module";

type Yaml = typeof import("yaml");
let mod: Yaml | undefined;

export function yamlLib(): Yaml {
  return (mod ??= createRequire(import.meta.url)("yaml") as Yaml);
}
