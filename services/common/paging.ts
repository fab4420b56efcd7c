// Opaque page tokens: base64url of a small JSON cursor. A token that does not
// decode is the caller's mistake, so it is INVALID_ARGUMENT, not INTERNAL.
import { InvalidArgumentError } from "./errors.js";

export function encodePageToken(cursor: string | number): string {
  return Buffer.from(JSON.stringify({ c: cursor })).toString("base64url");
}

export function decodePageToken(token: string): string | number | null {
  if (token === "") return null;
  try {
    if (token.length > 512) throw new Error("too long");
    const v = JSON.parse(Buffer.from(token, "base64url").toString("utf8"));
    if (typeof v?.c === "string" || typeof v?.c === "number") return v.c;
  } catch {
    // fall through
  }
  throw new InvalidArgumentError(
    "page_token",
    "is not a token this server issued; pass the next_page_token of the previous response, or leave it empty for the first page",
  );
}
