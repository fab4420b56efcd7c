// What the layout tests expect of a create whose record step ran late past
// its hold (services/common/pending.ts recordUnderHold), for the NAT
// gateway's and the peering's create alike.
import { UnavailableError } from "../../services/common/errors.js";

/** The error of a late create that took back what it wrote: its record landed late, or its reply was lost after the deadline. */
export function takenBack(way: "reply lost" | string): (e: Error) => boolean {
  return (e) =>
    e instanceof UnavailableError &&
    e.message.includes(way === "reply lost" ? "failed without an answer (Command timed out)" : "took over 30 s between its steps:") &&
    /what it wrote was taken back; nothing was kept, retry/.test(e.message);
}
