// Creates that take a client token (the shared hash mvpc:tokens, field
// "<kind>\n<token>" → the id the first create of that request made) answer a
// retry with that create's id while its record exists. The id is read from
// the client first, validated, and its record's key declared to the script
// (a key built inside Lua is refused by Redis Cluster and hidden from ACL
// review); the script checks that the token still names that id, and
// answers TOKEN_MOVED when another create of the same token landed between
// the read and the script, which withClientToken then reads again.
import type { Redis } from "ioredis";
import { UnavailableError } from "./errors.js";
import { isId } from "./ids.js";

/** A script's reply code: the token names another id than the one read. */
export const TOKEN_MOVED = -9;

/**
 * Lua: the id field `field` of the tokens hash names, if it is `seen` (the
 * id the caller read) and its record `record` exists; false if the field
 * names another id than `seen`; nil if none, or its record is gone (a create
 * of the same token goes ahead and takes the field over).
 */
export const LUA_TOKEN = `
local function token_held(tokens, field, seen, record)
  local prev = redis.call('HGET', tokens, field)
  if not prev then return nil end
  if prev ~= seen then return false end
  if redis.call('EXISTS', record) == 1 then return prev end
  return nil
end
`;

/** How often a create is tried again when the token moved under it. */
const ATTEMPTS = 4;

/**
 * Runs `call(seen, record)`: `seen` the id token field `field` names now
 * ("" none, or no token: field null), `record` that id's record key
 * (`recordOf`, only for an id of `kind`; otherwise `fresh`, the new
 * record's key, which does not exist, so that the create goes ahead and
 * takes the field over). Again while the reply's first element is
 * TOKEN_MOVED.
 */
export async function withClientToken<T extends unknown[]>(
  redis: Redis,
  tokensKey: string,
  field: string | null,
  ids: { kind: string; recordOf: (id: string) => string; fresh: string },
  call: (seen: string, record: string) => Promise<T>,
): Promise<T> {
  for (let attempt = 0; attempt < ATTEMPTS; attempt++) {
    const seen = field === null ? "" : ((await redis.hget(tokensKey, field)) ?? "");
    const reply = await call(seen, isId(ids.kind, seen) ? ids.recordOf(seen) : ids.fresh);
    if (reply[0] !== TOKEN_MOVED) return reply;
  }
  throw new UnavailableError(`other creates with the same client token kept landing while this one ran; retry`);
}
