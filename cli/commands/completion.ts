// `microvpc completion bash`: shell completion generated from the command tree.
import { Argument, type Command } from "commander";
import { bashCompletion } from "../lib/completion.js";
import { print } from "../lib/output.js";

export function register(program: Command): void {
  program
    .command("completion")
    .description("print a shell completion script (bash: source <(microvpc completion bash))")
    .addArgument(new Argument("<shell>", "shell to complete for").choices(["bash"]))
    .action(() => print(bashCompletion(program)));
}
