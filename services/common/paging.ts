// Opaque page tokens: base64url of a small JSON cursor, {"c": <cursor>}. A
// token is the caller's input like any other: whatever it holds, it either
// decodes to a cursor of the kind the listing issued or is INVALID_ARGUMENT —
// never INTERNAL (a cursor of "NaN" or 1e400 used to reach Redis as a score
// and come back as a Redis error).
import { InvalidArgumentError } from "./errors.js";

/** Longest token accepted, and so the longest cursor (a name, "name/id" or "subnet/index"). */
export const MAX_PAGE_TOKEN = 512;

export type Cursor = string | number;

export function encodePageToken(cursor: Cursor): string {
  return Buffer.from(JSON.stringify({ c: cursor })).toString("base64url");
}

function refuse(why: string): never {
  throw new InvalidArgumentError(
    "page_token",
    `is not a token this server issued (${why}); pass the next_page_token of the previous response, or leave it empty for the first page`,
  );
}

/**
 * The cursor of a token this server issued: a string, or a non-negative
 * integer index. Only the exact encoding encodePageToken produces is
 * accepted (no padding, no stray characters, no extra fields), so a token has
 * one meaning.
 */
export function decodePageToken(token: string): Cursor | null {
  if (token === "") return null;
  if (token.length > MAX_PAGE_TOKEN) refuse(`${token.length} characters; at most ${MAX_PAGE_TOKEN}`);
  if (!/^[A-Za-z0-9_-]+$/.test(token)) refuse("not base64url");
  let v: unknown;
  try {
    v = JSON.parse(Buffer.from(token, "base64url").toString("utf8"));
  } catch {
    refuse("not JSON");
  }
  if (typeof v !== "object" || v === null || Array.isArray(v) || Object.keys(v).length !== 1 || !("c" in v)) refuse("not a cursor");
  const c = (v as { c: unknown }).c;
  if (typeof c === "number") {
    if (!Number.isSafeInteger(c) || c < 0) refuse("the index is not a non-negative integer");
  } else if (typeof c !== "string") {
    refuse("the cursor is neither a string nor an index");
  }
  if (encodePageToken(c) !== token) refuse("not in the form this server writes");
  return c;
}

/** A token of a listing that pages by a non-negative integer (an address index, a subnet base). */
export function decodeIndexToken(token: string): number | null {
  const c = decodePageToken(token);
  if (c !== null && typeof c !== "number") refuse("this listing pages by index");
  return c;
}

/** A token of a listing that pages by name or id. */
export function decodeNameToken(token: string): string | null {
  const c = decodePageToken(token);
  if (c !== null && typeof c !== "string") refuse("this listing pages by name");
  return c;
}

/**
 * Up to `limit` items of a listing read in rounds from `after`: each round
 * (`read(cursor)`) gives the items it found (null: gone, skipped) and the
 * cursor of each, in order; a round shorter than `limit` is the last.
 */
export async function pageOver<T>(after: string, limit: number, read: (cursor: string) => Promise<{ items: (T | null)[]; cursors: string[] }>): Promise<T[]> {
  const out: T[] = [];
  for (let cursor = after; ;) {
    const { items, cursors } = await read(cursor);
    for (const x of items) {
      if (x) out.push(x);
      if (out.length >= limit) return out;
    }
    if (cursors.length < limit) return out;
    cursor = cursors[cursors.length - 1];
  }
}
