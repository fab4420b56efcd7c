// microvpc: the operator CLI. Global options come first; each command group
// lives in its own file under commands/ (the tree: program.ts).
import { buildProgram } from "./program.js";
import { address } from "./lib/context.js";
import { report } from "./lib/errors.js";

async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
    return 0;
  } catch (err) {
    return report(err, { daemon: "ipam", address: address(program, "ipam"), method: "" });
  }
}

const code = await main(process.argv);
// The HTTP/2 session would keep the process alive until its idle timeout.
process.stdout.write("", () => process.exit(code));
