// `microvpc test-connectivity VM TARGET[:PORT]`: a probe from a VM through
// its own policy (VmService.TestConnectivity, on the vmm daemon). Exit 0 if
// the target answered, 8 if it did not — so scripts can build reachability
// matrices from exit codes alone.
import { create } from "@bufbuild/protobuf";
import { Option, type Command } from "commander";
import { InvalidArgumentError } from "../../services/common/errors.js";
import * as V from "../../services/common/validate.js";
import { Protocol } from "../../gen/microvpc/v1/firewall_pb.js";
import { ConnectivityResultSchema, TestConnectivityRequestSchema, TestConnectivityResponseSchema, VmService } from "../../gen/microvpc/v1/vm_pb.js";
import { probeOf } from "../../services/vmm/probe.js";
import { client } from "../lib/context.js";
import { EXIT, ExitCode } from "../lib/errors.js";
import { dryRunOption, integer, port as portArg } from "../lib/options.js";
import { dryRun, emit, enumLabel } from "../lib/output.js";
import { setActivity } from "../lib/progress.js";
import { vmTimeout } from "./vm.js";

const PROTOS: Record<string, Protocol> = { icmp: Protocol.ICMP, tcp: Protocol.TCP, udp: Protocol.UDP };

/** "10.0.2.5:5432" → target and port; a TARGET without ":PORT" has none. */
export function splitTarget(text: string): { target: string; port?: number } {
  const i = text.lastIndexOf(":");
  if (i < 0) return { target: text };
  const p = text.slice(i + 1);
  if (!/^[0-9]{1,10}$/.test(p))
    throw new InvalidArgumentError("target", `${V.show(text)}: ${V.show(p)} is not a port; write TARGET or TARGET:PORT, e.g. 10.0.2.5:5432 or db:5432`);
  return { target: text.slice(0, i), port: V.port("target", Number(p)) };
}

export function register(program: Command): void {
  program
    .command("test-connectivity <vm> <target>")
    .description("probe from a VM to an address, VM name or NAME.VPC.internal, through the VM's own security groups and ACLs (exit 0 reachable, 8 not)")
    .option("--vpc <ref>", "VPC of the VM, needed when VM or TARGET is a name", "")
    .addOption(new Option("--protocol <proto>", "icmp, tcp or udp (default: tcp with a port, else icmp)").choices(Object.keys(PROTOS)))
    .addOption(new Option("--port <port>", "destination port (same as TARGET:PORT)").argParser(portArg))
    .addOption(new Option("--wait-ms <ms>", "how long the probe waits for an answer (default 2000)").argParser(integer(100, 30000)))
    .addOption(dryRunOption())
    .addHelpText(
      "after",
      "\nExamples:\n  microvpc test-connectivity web1 10.0.2.5:5432 --vpc prod\n  microvpc test-connectivity web1 db --vpc prod --protocol icmp",
    )
    .action(async (vm: string, targetText: string, o, cmd: Command) => {
      const { target, port } = splitTarget(targetText);
      if (port !== undefined && o.port !== undefined && port !== o.port) {
        cmd.error(`error: TARGET says port ${port} and --port says ${o.port}; give one`, { exitCode: EXIT.usage });
      }
      const req = create(TestConnectivityRequestSchema, {
        source: vm,
        vpc: o.vpc,
        target,
        port: port ?? o.port,
        protocol: o.protocol ? PROTOS[o.protocol] : Protocol.UNSPECIFIED,
        timeoutMs: o.waitMs,
      });
      // The vmm's own check: a port only for TCP and UDP, one for each, the wait in range.
      probeOf(req);
      if (o.dryRun) {
        if (!V.ref("source", vm, "vm").id) V.ref("vpc", req.vpc, "vpc");
        if (target === "") throw new InvalidArgumentError("target", "is required (an address, a VM name or NAME.VPC.internal)");
        return dryRun(cmd, VmService.method.testConnectivity, req);
      }
      setActivity(`probing ${targetText} from ${vm}`);
      const res = await client(cmd, VmService).testConnectivity(req, { timeoutMs: Math.max(vmTimeout(cmd), (o.waitMs ?? 2000) + 5000) });
      emit(cmd, TestConnectivityResponseSchema, res, () => {
        const to = `${res.targetAddress || target}${req.port ? `:${req.port}` : ""}${res.targetVmId ? ` (${res.targetVmId})` : ""}`;
        const how = res.method ? ` [${res.method}]` : "";
        return res.reachable
          ? `reachable: ${res.sourceAddress} → ${to} in ${(res.latencyUs / 1000).toFixed(2)} ms${how}`
          : `not reachable: ${res.sourceAddress} → ${to}: ${enumLabel(ConnectivityResultSchema, res.result)}${res.detail ? ` (${res.detail})` : ""}${how}`;
      });
      if (!res.reachable) throw new ExitCode(EXIT.unreachable);
    });
}
