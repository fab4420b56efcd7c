// `microvpc version`: which build the CLI is, and which build each daemon
// runs. Every daemon names its build in the x-microvpc-build header of every
// answer (services/common/server.ts); a grpc.health.v1 Check is the cheapest
// call that gets one, and needs no token. Daemons that differ from the CLI,
// or from each other, in version or commit are a skew: warned on stderr.
import { Code, ConnectError } from "@connectrpc/connect";
import type { Command } from "commander";
import { Health } from "../../gen/grpc/health/v1/health_pb.js";
import { BUILD, parseBuildHeader, type BuildInfo } from "../../services/common/version.js";
import { address, client, DAEMON_NAMES, globals, timeoutGiven, type Daemon } from "../lib/context.js";
import { isConnRefused } from "../lib/errors.js";
import { emitValue, table, warn } from "../lib/output.js";

export interface DaemonBuild {
  daemon: Daemon;
  address: string;
  reachable: boolean;
  /** Undefined where the daemon is unreachable, or too old to send x-microvpc-build. */
  build?: BuildInfo;
  error?: string;
}

/** The skew warnings: each daemon whose version or commit differs from the CLI's. */
export function skewWarnings(cli: BuildInfo, daemons: DaemonBuild[]): string[] {
  const out: string[] = [];
  for (const d of daemons) {
    if (!d.build) continue;
    const diffs: string[] = [];
    if (d.build.version !== cli.version) diffs.push(`version ${d.build.version}, the CLI ${cli.version}`);
    if (d.build.commit !== cli.commit) diffs.push(`commit ${short(d.build.commit)}, the CLI ${short(cli.commit)}`);
    if (diffs.length > 0) out.push(`version skew: microvpcd ${d.daemon} at ${d.address} runs ${diffs.join("; ")}`);
  }
  const commits = new Set(daemons.flatMap((d) => (d.build ? [`${d.build.version} ${d.build.commit}`] : [])));
  if (commits.size > 1) out.push(`the daemons run ${commits.size} different builds: upgrade them together (docs/operations.md "Upgrades")`);
  return out;
}

const short = (commit: string) => commit.slice(0, 12);

/** The human rendering: one row for the CLI, one per daemon. */
export function versionTable(cli: BuildInfo, daemons: DaemonBuild[]): string {
  return table(
    ["COMPONENT", "ADDRESS", "VERSION", "COMMIT", "NODE", "STATUS"],
    [
      ["microvpc (cli)", "", cli.version, short(cli.commit), cli.node, ""],
      ...daemons.map((d) =>
        d.build
          ? [d.daemon, d.address, d.build.version, short(d.build.commit), d.build.node, "ok"]
          : [d.daemon, d.address, "", "", "", d.reachable ? "answers, reports no build (older microvpcd)" : `unreachable: ${d.error ?? ""}`],
      ),
    ],
  );
}

async function daemonBuild(cmd: Command, d: Daemon, timeoutMs: number): Promise<DaemonBuild> {
  const addr = address(cmd, d);
  let header: string | null = null;
  try {
    await client(cmd, Health, d).check({ service: "" }, { timeoutMs, onHeader: (h) => (header = h.get("x-microvpc-build")) });
  } catch (e) {
    // A daemon that answered with an error still said which build it is.
    if (header === null && e instanceof ConnectError) header = e.metadata.get("x-microvpc-build");
    if (header === null) {
      const error =
        e instanceof ConnectError
          ? isConnRefused(e)
            ? "connection refused"
            : e.code === Code.DeadlineExceeded
              ? "no answer in time"
              : e.rawMessage
          : e instanceof Error
            ? e.message
            : String(e);
      return { daemon: d, address: addr, reachable: false, error };
    }
  }
  return { daemon: d, address: addr, reachable: true, build: parseBuildHeader(header) };
}

export function register(program: Command): void {
  program
    .command("version")
    .description("the CLI's version and each daemon's (version, commit, node); warns when they differ")
    .option("--client", "the CLI's version only; ask no daemon", false)
    .addHelpText(
      "after",
      `
Each daemon is asked with a grpc.health.v1 check (no token needed) and names
its build in the x-microvpc-build header of the answer. A daemon that is down
shows as unreachable. A daemon whose version or commit differs from the CLI's
is a skew, warned on stderr; the exit code is 0 either way.`,
    )
    .action(async (o: { client: boolean }, cmd: Command) => {
      const timeoutMs = timeoutGiven(cmd) ? globals(cmd).timeoutMs! : 3000;
      const daemons = o.client ? [] : await Promise.all(DAEMON_NAMES.map((d) => daemonBuild(cmd, d, timeoutMs)));
      emitValue(
        cmd,
        () => ({
          client: { ...BUILD },
          daemons: daemons.map((d) => ({
            daemon: d.daemon,
            address: d.address,
            reachable: d.reachable,
            ...(d.build ? { version: d.build.version, commit: d.build.commit, node: d.build.node } : {}),
            ...(d.error ? { error: d.error } : {}),
          })),
          skew: skewWarnings(BUILD, daemons),
        }),
        () => versionTable(BUILD, daemons),
      );
      for (const w of skewWarnings(BUILD, daemons)) warn(w);
    });
}
