// A `microvpcd <service>` started like test/lib/daemon.ts's startDaemon, but
// under `node --cpu-prof` (which NODE_OPTIONS does not allow): the profile is
// written to dir when the daemon exits (its SIGTERM handler calls
// process.exit). Summarise it with ./profile.ts. Ended by PID only; the
// caller tracks the process (trackChild) like any other daemon.
import { startDaemon, type Daemon } from "../../test/lib/daemon.js";

export function startProfiledDaemon(service: string, extra: string[], dir: string): Promise<Daemon> {
  // Writing a long profile takes a moment: more grace than the default 5 s.
  return startDaemon(service, extra, {}, undefined, { nodeArgs: ["--cpu-prof", `--cpu-prof-dir=${dir}`], stopGraceMs: 15_000 });
}
