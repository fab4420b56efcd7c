// vitest setupFiles: runs in each test file's worker before the file.
//
// Under node:test each file was its own process, and the netns harness's
// 'exit' handler removed whatever a file left behind (an afterAll that threw
// before h.close(), a hook that timed out). vitest ends a worker with SIGTERM
// and SIGKILLs it 500 ms later, too soon for that cleanup when there is
// something to clean. This afterAll runs after the file's own (vitest runs
// afterAll hooks in reverse order of registration, and this one is
// registered first) and does the same cleanup while the worker still runs.
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { afterAll } from "vitest";

/** Where test/lib/netns.ts leaves "<run prefix>.pid" files (MARKER_DIR there). */
const MARKER_DIR = "/run/mvpc-test";

/** True if this process loaded the netns harness (it left a marker with our PID). */
function harnessLoaded(): boolean {
  try {
    return readdirSync(MARKER_DIR).some((f) => /^mt[0-9a-f]{4}\.pid$/.test(f) && readFileSync(join(MARKER_DIR, f), "utf8").trim() === String(process.pid));
  } catch {
    return false;
  }
}

afterAll(async () => {
  if (!harnessLoaded()) return;
  const { cleanupSync } = await import("./netns.js");
  const r = cleanupSync();
  if (r.killed > 0 || r.namespaces.length > 0) {
    console.log(`# netns cleanup after the file: ended ${r.killed} process(es), deleted ${r.namespaces.length} namespace(s): ${r.namespaces.join(" ")}`);
  }
});
