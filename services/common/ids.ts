import { randomBytes } from "node:crypto";

/** A new record id: "<kind>-" and 12 random hex digits (the form every id validator expects). */
export function newId(kind: string): string {
  return `${kind}-${randomBytes(6).toString("hex")}`;
}
