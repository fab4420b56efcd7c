// microvpcd <service> [flags]: the one entry point of every microvpc daemon,
// used alike by systemd units, the Kubernetes manifests and the tests.
import { Command } from "commander";
import { addServiceCommand } from "../services/common/daemon.js";
import { addRedisAclCommand } from "../services/common/redis-acl.js";
import { addMoveToClusterCommand } from "../services/migrate/move.js";
import { versionLine } from "../services/common/version.js";
import { ipamDefinition } from "../services/ipam/main.js";
import { firewallDefinition } from "../services/firewall/main.js";
import { addImdsCommand, gatewayDefinition } from "../services/gateway/main.js";
import { netagentDefinition } from "../services/netagent/main.js";
import { vmmDefinition } from "../services/vmm/main.js";
import { helpConfig } from "./lib/help.js";

const program = new Command("microvpcd")
  .description("microvpc daemons: VPC networking for microVM hypervisors.\nEvery flag can also be set by the environment variable shown.")
  .version(versionLine(), "--version", "print the version (package, commit, node) and exit")
  .configureHelp(helpConfig)
  .showHelpAfterError();
addServiceCommand(program, ipamDefinition);
for (const def of [netagentDefinition, firewallDefinition, gatewayDefinition, vmmDefinition]) addServiceCommand(program, def);
addImdsCommand(program);
addRedisAclCommand(program);
addMoveToClusterCommand(program);
await program.parseAsync(process.argv);
