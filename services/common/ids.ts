import { randomBytes } from "node:crypto";

/** A new record id: "<kind>-" and 12 random hex digits (the form every id validator expects). */
export function newId(kind: string): string {
  return `${kind}-${randomBytes(6).toString("hex")}`;
}

/** Whether s is an id of that kind, as newId makes them. */
export function isId(kind: string, s: string): boolean {
  return s.length === kind.length + 13 && s.startsWith(`${kind}-`) && /^[0-9a-f]{12}$/.test(s.slice(kind.length + 1));
}

/** `raw` (read back from Redis) if it is an id of `kind`, else null: only then may it name a key. */
export function idOrNull(kind: string, raw: string | null): string | null {
  return raw !== null && isId(kind, raw) ? raw : null;
}
