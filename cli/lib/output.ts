// Rendering: human tables by default, protobuf JSON with `-o json` so that
// scripts get exactly the API's field names and types.
import { toJson, type DescMessage, type DescMethod, type MessageShape } from "@bufbuild/protobuf";
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import Table from "cli-table3";
import type { Command } from "commander";
import { globals } from "./context.js";

// No colours and no padding-sensitive styling: output is often piped.
const STYLE = { head: [], border: [] };

export function table(head: string[], rows: string[][]): string {
  const t = new Table({ head, style: STYLE });
  t.push(...rows);
  return t.toString();
}

/** A vertical key/value table for one resource. */
export function details(pairs: [string, string][]): string {
  const t = new Table({ style: STYLE });
  for (const [k, v] of pairs) t.push({ [k]: v });
  return t.toString();
}

export function print(text: string): void {
  process.stdout.write(text.endsWith("\n") ? text : `${text}\n`);
}

// Implicit defaults (0, false, "") are written too, so scripts can rely on
// every field being present.
const JSON_OPTS = { alwaysEmitImplicit: true } as const;

function json(value: unknown): string {
  return JSON.stringify(value, null, 2);
}

/** Prints a response: as JSON, or through the command's human renderer. */
export function emit<D extends DescMessage>(cmd: Command, schema: D, msg: MessageShape<D>, human: () => string): void {
  print(globals(cmd).output === "json" ? json(toJson(schema, msg, JSON_OPTS)) : human());
}

/** --dry-run: shows the call that would be made and makes none. */
export function dryRun<M extends DescMethod>(cmd: Command, method: M, req: MessageShape<M["input"]>): void {
  const name = `${method.parent.typeName}/${method.name}`;
  const request = toJson(method.input, req, JSON_OPTS);
  if (globals(cmd).output === "json") print(json({ dryRun: true, method: name, request }));
  else print(`dry run: would call ${name} with\n${json(request)}\nnothing was sent`);
}

export function time(t: Timestamp | undefined): string {
  return t ? timestampDate(t).toISOString() : "";
}

export function labels(ls: { key: string; value: string }[]): string {
  return ls.map((l) => `${l.key}=${l.value}`).join(",");
}
