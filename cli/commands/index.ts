// The command groups of `microvpc`, in help order. A new group is one file
// under commands/ exporting register(program), plus one line here.
import type { Command } from "commander";
import * as completion from "./completion.js";
import * as ip from "./ip.js";
import * as subnet from "./subnet.js";
import * as vpc from "./vpc.js";

export const groups: { register(program: Command): void }[] = [vpc, subnet, ip, completion];
