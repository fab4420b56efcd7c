// vitest's globalSetup: builds dist/ once per run, before any test file
// loads. The daemons the integration tests start run bin/microvpcd.js, which
// runs dist/microvpcd.js, so a single `npx vitest run test/integration/x.test.ts`
// needs no separate `npm run build`.
import { build } from "../../build.mjs";

export default async function setup(): Promise<void> {
  await build({ quiet: true });
}
