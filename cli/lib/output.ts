// Rendering: human tables by default, protobuf JSON with `-o json` so that
// scripts get exactly the API's field names and types.
import { toJson, type DescEnum, type DescMessage, type DescMethod, type MessageShape } from "@bufbuild/protobuf";
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

/** details() without the rows whose value is empty (fields a server leaves unset). */
export function someDetails(pairs: [string, string][]): string {
  return details(pairs.filter(([, v]) => v !== ""));
}

export function print(text: string): void {
  process.stdout.write(text.endsWith("\n") ? text : `${text}\n`);
}

// Implicit defaults (0, false, "") are written too, so scripts can rely on
// every field being present.
const JSON_OPTS = { alwaysEmitImplicit: true } as const;

export function json(value: unknown): string {
  return JSON.stringify(value, null, 2);
}

/** Protobuf JSON of a message, every field present (for composite -o json output). */
export function msgJson<D extends DescMessage>(schema: D, msg: MessageShape<D>): unknown {
  return toJson(schema, msg, JSON_OPTS);
}

/** Prints a value that is not one API message (several calls' results) as JSON, or a human rendering. */
export function emitValue(cmd: Command, value: () => unknown, human: () => string): void {
  print(globals(cmd).output === "json" ? json(value()) : human());
}

/** A warning on stderr: it never mixes with the output a script parses. */
export function warn(text: string): void {
  process.stderr.write(`warning: ${text}\n`);
}

/** An enum value as a short lowercase word: VmState.RUNNING -> "running"; "" when unset. */
export function enumLabel(schema: DescEnum, value: number): string {
  const v = schema.value[value];
  if (!v) return String(value);
  return v.localName === "UNSPECIFIED" ? "" : v.localName.toLowerCase().replace(/_/g, "-");
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

/** --dry-run of a command that makes several calls, in order. */
export function dryRunMany(cmd: Command, calls: { method: DescMethod; request: unknown }[]): void {
  const list = calls.map((c) => ({ method: `${c.method.parent.typeName}/${c.method.name}`, request: toJson(c.method.input, c.request as never, JSON_OPTS) }));
  if (globals(cmd).output === "json") print(json({ dryRun: true, calls: list }));
  else print(`dry run: would call\n${list.map((c, i) => `${i + 1}. ${c.method} with\n${json(c.request)}`).join("\n")}\nnothing was sent`);
}

export function time(t: Timestamp | undefined): string {
  return t ? timestampDate(t).toISOString() : "";
}

export function labels(ls: { key: string; value: string }[]): string {
  return ls.map((l) => `${l.key}=${l.value}`).join(",");
}
