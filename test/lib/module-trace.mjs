// Preloaded into a daemon under test (node --import): prints every
// @opentelemetry module the process resolves, one line each on stderr, so a
// test can tell whether the OpenTelemetry SDK was loaded at all.
import { writeSync } from "node:fs";
import { registerHooks } from "node:module";

registerHooks({
  resolve(specifier, context, nextResolve) {
    const r = nextResolve(specifier, context);
    if (r.url.includes("/node_modules/@opentelemetry/")) writeSync(2, `module-loaded ${r.url}\n`);
    return r;
  },
});
