// Host identity: what a hypervisor is called. Every per-host daemon takes
// --host-id (the same on all of a host's daemons); it is part of namespace
// names, Redis keys and Redis user names, so it is checked here, once.
import { hostname } from "node:os";
import { Option } from "commander";

/** A hypervisor id: 1–24 characters of [a-z0-9]. */
export const HOST_ID_RE = /^[a-z0-9]{1,24}$/;

/** The machine's hostname, lower-cased, with everything but [a-z0-9] left out (or "host"). */
export function defaultHostId(): string {
  return (
    hostname()
      .toLowerCase()
      .replace(/[^a-z0-9]/g, "")
      .slice(0, 24) || "host"
  );
}

/** Throws unless `id` is a hypervisor id; `what` names where it came from (e.g. "--host-id"). */
export function checkHostId(what: string, id: string): string {
  if (!HOST_ID_RE.test(id)) throw new Error(`${what} ${JSON.stringify(id)}: use 1–24 characters of [a-z0-9]`);
  return id;
}

/** The --host-id option (MICROVPC_HOST_ID, default defaultHostId()). */
export function hostIdOption(help = "this hypervisor's id; must match the netagent's"): Option {
  return new Option("--host-id <id>", help).env("MICROVPC_HOST_ID").default(defaultHostId());
}
