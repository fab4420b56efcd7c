// The test runner (`npm test` runs test/run.sh, which runs `vitest run`).
// The integration tests start daemons, network namespaces and guests on a
// machine they share with others, so nothing runs in parallel: one file at a
// time, in a fixed order, and the tests of a file one after another.
import { defineConfig } from "vitest/config";
import { FileOrderSequencer } from "./test/lib/sequencer.ts";
import { SummaryReporter } from "./test/lib/summary-reporter.ts";

export default defineConfig({
  test: {
    include: ["test/unit/**/*.test.ts", "test/integration/**/*.test.ts"],
    // Builds dist/, which the daemons the tests start run, and lets workers
    // clean up their namespaces when the run is interrupted.
    globalSetup: ["test/lib/global-setup.ts"],
    // Removes what a file's hooks left behind, as node:test's per-file
    // process did on exit.
    setupFiles: ["test/lib/file-setup.ts"],
    // A process per file, as node:test ran them: the netns harness keeps
    // per-process state (run prefix, exit and signal handlers).
    pool: "forks",
    isolate: true,
    fileParallelism: false,
    sequence: { concurrent: false, sequencer: FileOrderSequencer },
    // node:test had no default limit; the longest tests set 300 s, and the
    // integration files' beforeAll hooks start whole stacks.
    testTimeout: 300_000,
    hookTimeout: 300_000,
    teardownTimeout: 60_000,
    // Every test's name as it finishes, then the summary line CI reads last.
    reporters: ["verbose", new SummaryReporter()],
  },
});
