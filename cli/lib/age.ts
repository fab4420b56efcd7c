// Ages for fleet views: "42s", "5m", "3h", "2d" since a timestamp.
import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";

/** Seconds since t (0 if in the future), or undefined when t is unset. */
export function ageSeconds(t: Timestamp | undefined, now = Date.now()): number | undefined {
  if (!t) return undefined;
  return Math.max(0, Math.round((now - timestampDate(t).getTime()) / 1000));
}

/** A short age ("42s", "5m", "3h", "2d"); `none` when t is unset. */
export function age(t: Timestamp | undefined, none = "never", now = Date.now()): string {
  const s = ageSeconds(t, now);
  if (s === undefined) return none;
  return s < 120 ? `${s}s` : s < 7200 ? `${Math.round(s / 60)}m` : s < 172_800 ? `${Math.round(s / 3600)}h` : `${Math.round(s / 86_400)}d`;
}

/** Seconds until t ("in 12s"), for leases. */
export function until(t: Timestamp | undefined, now = Date.now()): string {
  if (!t) return "";
  const s = Math.round((timestampDate(t).getTime() - now) / 1000);
  return s >= 0 ? `in ${s}s` : `${-s}s ago`;
}
