// Request validation shared by every service. Every field that can reach a
// kernel object, an nft script, a Redis key or a log line passes one of these
// first. They throw InvalidArgumentError naming the field and saying what to
// change.
import ipaddr from "ipaddr.js";
import { InvalidArgumentError } from "./errors.js";
import { HOST_ID_RE } from "./host.js";

const NAME_RE = /^[a-z][a-z0-9-]{0,62}$/;
const TOKEN_RE = /^[A-Za-z0-9_.:/-]{1,128}$/;
const LABEL_KEY_RE = /^[A-Za-z0-9_.-]{1,63}$/;

/** Shows a rejected value safely: quoted, control characters escaped, cut short. */
export function show(value: string): string {
  const cut = value.length > 40 ? `${value.slice(0, 40)}…` : value;
  return JSON.stringify(cut);
}

export function name(field: string, value: string): string {
  if (value === "") throw new InvalidArgumentError(field, "is required");
  if (!NAME_RE.test(value)) {
    throw new InvalidArgumentError(
      field,
      `${show(value)} is not a valid name: use 1–63 characters of lowercase letters, digits and '-', starting with a letter (e.g. "prod", "web-1")`,
    );
  }
  return value;
}

/** Owner and request ids: opaque keys chosen by the caller. */
export function token(field: string, value: string, opts: { optional?: boolean } = {}): string {
  if (value === "") {
    if (opts.optional) return value;
    throw new InvalidArgumentError(field, "is required");
  }
  if (!TOKEN_RE.test(value)) {
    throw new InvalidArgumentError(field, `${show(value)} is not valid: use 1–128 characters of letters, digits and _ . : / -`);
  }
  return value;
}

export function text(field: string, value: string, max = 255): string {
  if (value.length > max) throw new InvalidArgumentError(field, `is ${value.length} characters long; the limit is ${max}`);
  // C0 and C1 controls: newlines, NUL, terminal escape sequences.
  // eslint-disable-next-line no-control-regex -- control characters are what this refuses
  if (/[\u0000-\u001f\u007f-\u009f]/.test(value)) throw new InvalidArgumentError(field, "must not contain control characters or newlines");
  // Bidi overrides, embeddings, isolates and marks make a name read as
  // another one in a terminal or a review ("Trojan Source").
  if (/[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/.test(value))
    throw new InvalidArgumentError(field, "must not contain bidirectional-text control characters (U+200E, U+200F, U+202A–U+202E, U+2066–U+2069, U+061C)");
  return value;
}

/** Labels as a store keeps them (JSON text of [{key, value}]), read back: checked as the API checks them. */
export function storedLabels(field: string, value: string | undefined): { key: string; value: string }[] {
  const list = jsonArray(field, storedJson(field, value ?? "[]"), 64).map((raw, i) => {
    const o = jsonObject(`${field}[${i}]`, raw);
    return { key: jsonString(`${field}[${i}].key`, o.key), value: jsonString(`${field}[${i}].value`, o.value) };
  });
  return labels(field, list);
}

export function labels(field: string, value: { key: string; value: string }[]): { key: string; value: string }[] {
  if (value.length > 64) throw new InvalidArgumentError(field, `has ${value.length} labels; the limit is 64`);
  const seen = new Set<string>();
  for (const [i, l] of value.entries()) {
    if (!LABEL_KEY_RE.test(l.key)) throw new InvalidArgumentError(`${field}[${i}].key`, `${show(l.key)} is not valid: use 1–63 characters of [A-Za-z0-9_.-]`);
    if (seen.has(l.key)) throw new InvalidArgumentError(`${field}[${i}].key`, `${show(l.key)} appears twice`);
    seen.add(l.key);
    text(`${field}[${i}].value`, l.value);
  }
  return value;
}

export function id(field: string, value: string, prefix: string): string {
  if (value === "") throw new InvalidArgumentError(field, "is required");
  if (!new RegExp(`^${prefix}-[0-9a-f]{12}$`).test(value)) {
    throw new InvalidArgumentError(field, `${show(value)} is not a ${prefix} id (expected "${prefix}-" and 12 hex digits)`);
  }
  return value;
}

/** An id ("vpc-…") or a name: what `ref` fields accept. */
export function ref(field: string, value: string, prefix: string): { id?: string; name?: string } {
  if (value === "") throw new InvalidArgumentError(field, `is required (a ${prefix} id or name)`);
  if (new RegExp(`^${prefix}-[0-9a-f]{12}$`).test(value)) return { id: value };
  return { name: name(field, value) };
}

/** Parses a dotted-quad IPv4 address; returns it as a 32-bit unsigned integer. */
export function ipv4(field: string, value: string): number {
  if (value === "") throw new InvalidArgumentError(field, "is required (an IPv4 address such as 10.0.1.5)");
  if (!ipaddr.IPv4.isValidFourPartDecimal(value)) {
    throw new InvalidArgumentError(field, `${show(value)} is not an IPv4 address in dotted-quad form (e.g. 10.0.1.5)`);
  }
  return ipToInt(value);
}

export interface Cidr {
  /** Network address as an unsigned 32-bit integer. */
  base: number;
  prefix: number;
  /** Number of addresses, 2^(32-prefix). */
  size: number;
  text: string;
}

/** Parses "a.b.c.d/n" strictly: canonical dotted quad, host bits zero. */
export function cidr(field: string, value: string, range: { min: number; max: number }): Cidr {
  if (value === "") throw new InvalidArgumentError(field, 'is required (a CIDR such as "10.0.0.0/16")');
  const m = /^([0-9.]+)\/([0-9]{1,2})$/.exec(value);
  if (!m || !ipaddr.IPv4.isValidFourPartDecimal(m[1])) {
    throw new InvalidArgumentError(field, `${show(value)} is not an IPv4 CIDR (expected a.b.c.d/n, e.g. "10.0.0.0/16")`);
  }
  const prefix = Number(m[2]);
  if (prefix < range.min || prefix > range.max) {
    throw new InvalidArgumentError(field, `${show(value)} has prefix /${prefix}; allowed are /${range.min} to /${range.max}`);
  }
  const addr = ipToInt(m[1]);
  const size = 2 ** (32 - prefix);
  const base = addr - (addr % size);
  if (base !== addr) {
    throw new InvalidArgumentError(field, `${show(value)} has host bits set; did you mean "${intToIp(base)}/${prefix}"?`);
  }
  return { base, prefix, size, text: `${intToIp(base)}/${prefix}` };
}

export function ipToInt(ip: string): number {
  const p = ip.split(".").map(Number);
  return ((p[0] << 24) >>> 0) + (p[1] << 16) + (p[2] << 8) + p[3];
}

export function intToIp(n: number): string {
  return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join(".");
}

export function contains(outer: Cidr, inner: Cidr): boolean {
  return inner.base >= outer.base && inner.base + inner.size <= outer.base + outer.size;
}

export function overlaps(a: Cidr, b: Cidr): boolean {
  return a.base < b.base + b.size && b.base < a.base + a.size;
}

const PRIVATE_RANGES = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"].map((c) => cidr("private", c, { min: 0, max: 32 }));

export function isPrivate(c: Cidr): boolean {
  return PRIVATE_RANGES.some((r) => contains(r, c));
}

export function pageSize(field: string, value: number): number {
  if (value === 0) return 100;
  if (value > 1000) throw new InvalidArgumentError(field, `is ${value}; the limit is 1000`);
  return value;
}

export function mac(field: string, value: string): string {
  if (!/^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/i.test(value)) {
    throw new InvalidArgumentError(field, `${show(value)} is not a MAC address (expected six hex pairs like 02:00:0a:00:01:05)`);
  }
  const lower = value.toLowerCase();
  if (parseInt(lower.slice(0, 2), 16) & 1) throw new InvalidArgumentError(field, `${show(value)} is a multicast MAC; a NIC needs a unicast one`);
  return lower;
}

export function port(field: string, value: number): number {
  if (!Number.isInteger(value) || value < 1 || value > 65535) throw new InvalidArgumentError(field, `${value} is not a port; use 1–65535`);
  return value;
}

const IFNAME_RE = /^[A-Za-z][A-Za-z0-9_.-]{0,14}$/;

/** A hypervisor id: part of every namespace name, so 1–24 of [a-z0-9]. */
export function hostId(field: string, value: string): string {
  if (value === "") throw new InvalidArgumentError(field, "is required (a hypervisor id)");
  if (!HOST_ID_RE.test(value)) throw new InvalidArgumentError(field, `${show(value)} is not a hypervisor id: use 1–24 characters of [a-z0-9]`);
  return value;
}

/** A network interface name as the kernel takes it, and nothing nft or ip could read as syntax. */
export function ifname(field: string, value: string): string {
  if (!IFNAME_RE.test(value)) {
    throw new InvalidArgumentError(field, `${show(value)} is not an interface name: 1–15 characters of letters, digits and _ . -, starting with a letter`);
  }
  return value;
}

// ---- records read back from Redis ----
// Everything in a hash is a string and everything in it may have been
// written by someone else: these read a stored field strictly.

/** A parse of a stored record: its typed value, or why it was refused. */
export type Parsed<T> = { ok: true; value: T } | { ok: false; reason: string };

/** Runs a validator; an error (InvalidArgumentError naming the field, or any other) becomes the reason. */
export function attempt<T>(f: () => T): Parsed<T> {
  try {
    return { ok: true, value: f() };
  } catch (err) {
    return { ok: false, reason: err instanceof Error ? err.message : String(err) };
  }
}

/** A stored field that must be present (a string; "" allowed only when `empty`). */
export function field(h: Record<string, string | undefined>, name: string, empty = false): string {
  const v = h[name];
  if (v === undefined || v === null) throw new InvalidArgumentError(name, "is missing");
  if (typeof v !== "string") throw new InvalidArgumentError(name, `must be a string, not ${typeof v}`);
  if (v === "" && !empty) throw new InvalidArgumentError(name, "is empty");
  return v;
}

/** A stored decimal integer in [min, max]; nothing else ("1e3", " 5", "5;"). */
export function storedInt(name: string, value: string | undefined, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  if (value === undefined) throw new InvalidArgumentError(name, "is missing");
  if (typeof value !== "string" || !/^-?[0-9]{1,16}$/.test(value)) throw new InvalidArgumentError(name, `${show(String(value))} is not an integer`);
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < min || n > max) throw new InvalidArgumentError(name, `${n} is out of range ${min}–${max}`);
  return n;
}

/** A JSON integer in [min, max]. */
export function jsonInt(name: string, value: unknown, min: number, max: number): number {
  if (typeof value !== "number" || !Number.isInteger(value))
    throw new InvalidArgumentError(name, `must be an integer, not ${value === null ? "null" : typeof value}`);
  if (value < min || value > max) throw new InvalidArgumentError(name, `${value} is out of range ${min}–${max}`);
  return value;
}

/** A JSON string. */
export function jsonString(name: string, value: unknown): string {
  if (typeof value !== "string")
    throw new InvalidArgumentError(name, `must be a string, not ${value === null ? "null" : Array.isArray(value) ? "array" : typeof value}`);
  return value;
}

/** Parses a stored JSON field; the caller checks the shape. */
export function storedJson(name: string, value: string | undefined, maxChars = 4 * 1024 * 1024): unknown {
  if (value === undefined) throw new InvalidArgumentError(name, "is missing");
  if (value.length > maxChars) throw new InvalidArgumentError(name, `is ${value.length} characters long; the limit is ${maxChars}`);
  try {
    return JSON.parse(value);
  } catch {
    throw new InvalidArgumentError(name, `${show(value)} is not valid JSON`);
  }
}

/** A JSON array (of at most max items). */
export function jsonArray(name: string, value: unknown, max: number): unknown[] {
  if (!Array.isArray(value)) throw new InvalidArgumentError(name, `must be a list, not ${value === null ? "null" : typeof value}`);
  if (value.length > max) throw new InvalidArgumentError(name, `has ${value.length} items; the limit is ${max}`);
  return value;
}

/** A JSON object (not null, not a list). */
export function jsonObject(name: string, value: unknown): Record<string, unknown> {
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new InvalidArgumentError(name, `must be an object, not ${value === null ? "null" : Array.isArray(value) ? "array" : typeof value}`);
  }
  return value as Record<string, unknown>;
}
