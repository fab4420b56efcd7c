// Rendering. `-o table` (the default): plain borderless columns, as kubectl
// prints them, easy to read and to cut/awk; `-o wide` adds columns; `-o json`
// and `-o yaml` print the API's messages (protobuf JSON, so scripts get exactly
// the API's field names and types); `-o name` prints kind/name lines.
// `--no-headers` drops the header line of tables.
import { toJson, type DescEnum, type DescMessage, type DescMethod, type MessageShape } from "@bufbuild/protobuf";
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import type { Command } from "commander";
import { globals } from "./context.js";
import { yamlLib } from "./yaml.js";

export const OUTPUT_FORMATS = ["table", "wide", "json", "yaml", "name"] as const;
export type OutputFormat = (typeof OUTPUT_FORMATS)[number];

/** How tables render, set once from the global options before a command runs (render()). */
const rendering = { headers: true };

export function setRendering(o: { headers: boolean }): void {
  rendering.headers = o.headers;
}

/** Columns separated by three spaces, left-aligned, no borders; header line unless --no-headers. */
export function table(head: string[], rows: string[][], o: { headers?: boolean } = {}): string {
  const all = (o.headers ?? rendering.headers) ? [head, ...rows] : rows;
  if (all.length === 0) return "";
  const widths = head.map((_, i) => Math.max(...all.map((r) => width(r[i] ?? ""))));
  return all
    .map((r) =>
      head
        .map((_, i) => {
          const cell = oneLine(r[i] ?? "");
          return i === head.length - 1 ? cell : cell + " ".repeat(widths[i] - width(cell));
        })
        .join("   ")
        .trimEnd(),
    )
    .join("\n");
}

/** Cells are one line (a newline would break every column after it): several values are comma-separated. */
function oneLine(s: string): string {
  return s.replace(/\r?\n/g, ",");
}

/** Display width: code points, which is right for the texts we print (no wide CJK in names: validate.ts allows none). */
function width(s: string): number {
  return [...oneLine(s)].length;
}

/** A vertical "key:  value" listing for one resource, values aligned. */
export function details(pairs: [string, string][]): string {
  if (pairs.length === 0) return "";
  const w = Math.max(...pairs.map(([k]) => width(k))) + 1;
  return pairs
    .map(([k, v]) => {
      const lines = v.split("\n");
      const pad = " ".repeat(w + 2);
      return (
        `${k}:${" ".repeat(w - width(k) - 1)}  ${lines[0]}`.trimEnd() +
        lines
          .slice(1)
          .map((l) => `\n${pad}${l}`.trimEnd())
          .join("")
      );
    })
    .join("\n");
}

/** details() without the rows whose value is empty (fields a server leaves unset). */
export function someDetails(pairs: [string, string][]): string {
  return details(pairs.filter(([, v]) => v !== ""));
}

/** One column of a list: its header, the cell of an item, and whether only `-o wide` shows it. */
export interface Column<T> {
  head: string;
  get: (item: T) => string;
  wide?: boolean;
}

/** The columns -o table (or, with wide, -o wide) shows. */
export function listTable<T>(columns: Column<T>[], items: T[], wide = false): string {
  const cols = columns.filter((c) => wide || !c.wide);
  return table(
    cols.map((c) => c.head),
    items.map((it) => cols.map((c) => c.get(it))),
  );
}

function format(cmd: Command): OutputFormat {
  return (globals(cmd).output ?? "table") as OutputFormat;
}

/** -o name on a command whose output names no resources: a usage error. */
function noNames(cmd: Command): never {
  cmd.error("error: -o name: this command's output has no resource names; use -o json or -o yaml", { exitCode: 2 });
}
export function print(text: string): void {
  if (text === "") return;
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

/** YAML of a JSON value; 64-bit integers are strings in protobuf JSON, and stay strings. */
export function yaml(value: unknown): string {
  return yamlLib().stringify(value, { lineWidth: 0 });
}

/**
 * Prints a value that is not one API message (several calls' results) as
 * JSON or YAML, or a human rendering; `names` gives kind/name lines for -o name.
 */
export function emitValue(cmd: Command, value: () => unknown, human: () => string, names?: () => string[]): void {
  const f = format(cmd);
  if (f === "json") print(json(value()));
  else if (f === "yaml") print(yaml(value()));
  else if (f === "name") print(names ? names().join("\n") : noNames(cmd));
  else print(human());
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

/**
 * Prints a response: as JSON or YAML, or through the command's human
 * renderer (table and wide alike); `names` gives its kind/name lines for -o name.
 */
export function emit<D extends DescMessage>(cmd: Command, schema: D, msg: MessageShape<D>, human: () => string, names?: () => string[]): void {
  emitValue(cmd, () => toJson(schema, msg, JSON_OPTS), human, names);
}

/**
 * Prints a list response: JSON/YAML of the message, or the items as a table
 * (-o wide: with the wide columns too), or one kind/name line per item.
 */
export function emitList<D extends DescMessage, T>(
  cmd: Command,
  schema: D,
  msg: MessageShape<D>,
  items: T[],
  columns: Column<T>[],
  name: (item: T) => string,
): void {
  emitValue(
    cmd,
    () => toJson(schema, msg, JSON_OPTS),
    () => listTable(columns, items, format(cmd) === "wide"),
    () => items.map(name),
  );
}

/** --dry-run: shows the call that would be made and makes none. */
export function dryRun<M extends DescMethod>(cmd: Command, method: M, req: MessageShape<M["input"]>): void {
  const name = `${method.parent.typeName}/${method.name}`;
  const request = toJson(method.input, req, JSON_OPTS);
  const f = format(cmd);
  if (f === "json") print(json({ dryRun: true, method: name, request }));
  else if (f === "yaml") print(yaml({ dryRun: true, method: name, request }));
  else print(`dry run: would call ${name} with\n${json(request)}\nnothing was sent`);
}

/** --dry-run of a command that makes several calls, in order. */
export function dryRunMany(cmd: Command, calls: { method: DescMethod; request: unknown }[]): void {
  const list = calls.map((c) => ({ method: `${c.method.parent.typeName}/${c.method.name}`, request: toJson(c.method.input, c.request as never, JSON_OPTS) }));
  const f = format(cmd);
  if (f === "json") print(json({ dryRun: true, calls: list }));
  else if (f === "yaml") print(yaml({ dryRun: true, calls: list }));
  else print(`dry run: would call\n${list.map((c, i) => `${i + 1}. ${c.method} with\n${json(c.request)}`).join("\n")}\nnothing was sent`);
}

export function time(t: Timestamp | undefined): string {
  return t ? timestampDate(t).toISOString() : "";
}

export function labels(ls: { key: string; value: string }[]): string {
  return ls.map((l) => `${l.key}=${l.value}`).join(",");
}
