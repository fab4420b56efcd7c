// The firewall's records in Redis as their readers see them: security
// groups and their rules, network ACLs and their entries, NIC bindings
// (whose interface name, MAC and address become nft set elements), group
// member addresses and drop-logging limits. Each parse returns the typed
// record or the reason it was refused, using the checks the API applies to
// a request (rules.ts for rules and entries, common/validate.ts for the
// rest); the store checks a binding with the same function before writing
// it. Key layout: store.ts (FK).
import { InvalidArgumentError } from "../common/errors.js";
import * as V from "../common/validate.js";
import { MAX_GROUPS_PER_NIC, MAX_RULES_PER_GROUP, type AclEntry, type BindingRec, type NetworkAclRec, type SecurityGroupRec, type SgRule } from "./model.js";
import { MAX_ACL_ENTRIES, storedAclEntry, storedSgRule } from "./rules.js";

// The firewall's public module: its keys (keys.ts holds them with the layout),
// the limits other services apply to its records, and the record checks.
export { EVENT_KINDS, F, FK, FW_KEYS, fwKeys, NICADDR, type FirewallKeys } from "./keys.js";
export { MAX_GROUPS_PER_NIC } from "./model.js";

export const OWNER = "firewall";

export const MAX_LABELS = 64;
export const LOG_RATE = { min: 1, max: 1000 };
export const LOG_BURST = { min: 1, max: 10_000 };

export type Logging = { ratePerSecond: number; burst: number };

/** Drop-logging limits: they are printed into an nft `limit rate` statement. */
export function loggingLimits(field: string, rate: number, burst: number): Logging {
  if (!Number.isInteger(rate) || rate < LOG_RATE.min || rate > LOG_RATE.max) {
    throw new InvalidArgumentError(`${field}.rate_per_second`, `${rate} is out of range; use ${LOG_RATE.min}–${LOG_RATE.max} log lines per second`);
  }
  if (!Number.isInteger(burst) || burst < LOG_BURST.min || burst > LOG_BURST.max) {
    throw new InvalidArgumentError(`${field}.burst`, `${burst} is out of range; use ${LOG_BURST.min}–${LOG_BURST.max}`);
  }
  return { ratePerSecond: rate, burst };
}

function storedLogging(field: string, raw: unknown): Logging {
  const o = V.jsonObject(field, raw);
  for (const k of Object.keys(o)) if (k !== "ratePerSecond" && k !== "burst") throw new InvalidArgumentError(`${field}.${k}`, "is not a field of drop logging");
  return loggingLimits(
    field,
    V.jsonInt(`${field}.rate_per_second`, o.ratePerSecond, LOG_RATE.min, LOG_RATE.max),
    V.jsonInt(`${field}.burst`, o.burst, LOG_BURST.min, LOG_BURST.max),
  );
}

function sameId(h: Record<string, string>, id: string | undefined): void {
  if (id !== undefined && h.id !== id) throw new InvalidArgumentError("id", `${V.show(String(h.id))} is not the id of its key (${V.show(id)})`);
}

/**
 * The writer's check of what it stores: rules, entries and drop logging go
 * through the same parsers a reader uses, so whatever the API writes reads
 * back (and anything the readers would refuse is never written).
 */
export function storedRulesText(rules: SgRule[]): string {
  const text = JSON.stringify(rules);
  V.jsonArray("rules", JSON.parse(text), MAX_RULES_PER_GROUP).forEach((r, i) => storedSgRule(`rules[${i}]`, r));
  return text;
}

export function storedEntriesText(entries: AclEntry[]): string {
  const text = JSON.stringify(entries);
  V.jsonArray("entries", JSON.parse(text), MAX_ACL_ENTRIES).forEach((e, i) => storedAclEntry(`entries[${i}]`, e));
  return text;
}

export function storedLoggingText(l: Logging | undefined | null): string {
  if (!l) return "";
  const text = JSON.stringify({ ratePerSecond: l.ratePerSecond, burst: l.burst });
  storedLogging("drop_logging", JSON.parse(text));
  return text;
}

/** A group hash as HGETALL returns it. */
export function parseGroup(h: Record<string, string>, id?: string): V.Parsed<SecurityGroupRec> {
  return V.attempt(() => {
    sameId(h, id);
    const rules: SgRule[] = V.jsonArray("rules", V.storedJson("rules", h.rules ?? "[]"), MAX_RULES_PER_GROUP).map((r, i) => storedSgRule(`rules[${i}]`, r));
    const g: SecurityGroupRec = {
      id: V.id("id", V.field(h, "id"), "sg"),
      vpcId: V.id("vpc", V.field(h, "vpc"), "vpc"),
      name: V.name("name", V.field(h, "name")),
      description: V.text("description", h.description ?? ""),
      labels: V.storedLabels("labels", h.labels),
      rules,
      generation: V.storedInt("gen", h.gen, 0),
      createdMs: V.storedInt("created", h.created ?? "0", 0),
      updatedMs: V.storedInt("updated", h.updated ?? "0", 0),
    };
    if (h.logging) g.dropLogging = storedLogging("drop_logging", V.storedJson("drop_logging", h.logging));
    return g;
  });
}

/** An ACL hash and the members of its subnet set. */
export function parseAcl(h: Record<string, string>, subnetIds: string[], id?: string): V.Parsed<NetworkAclRec> {
  return V.attempt(() => {
    sameId(h, id);
    return {
      id: V.id("id", V.field(h, "id"), "acl"),
      vpcId: V.id("vpc", V.field(h, "vpc"), "vpc"),
      name: V.name("name", V.field(h, "name")),
      description: V.text("description", h.description ?? ""),
      labels: V.storedLabels("labels", h.labels),
      entries: V.jsonArray("entries", V.storedJson("entries", h.entries ?? "[]"), MAX_ACL_ENTRIES).map((e, i): AclEntry => storedAclEntry(`entries[${i}]`, e)),
      subnetIds: subnetIds.map((s, i) => V.id(`subnets[${i}]`, s, "subnet")).sort(),
      generation: V.storedInt("gen", h.gen, 0),
      createdMs: V.storedInt("created", h.created ?? "0", 0),
      updatedMs: V.storedInt("updated", h.updated ?? "0", 0),
    };
  });
}

/** A binding without its times: what is stored as "sig" and what "changed" is judged on. */
export type BindingSpec = Omit<BindingRec, "boundMs" | "updatedMs">;

const SPEC_KEYS = new Set(["nicId", "vpcId", "subnetId", "address", "mac", "hostId", "hostIf", "groupIds", "dropLogging"]);

/** Every field of a binding that reaches nft, checked as BindNic checks it. Written and read with this. */
export function checkBinding(b: BindingSpec): BindingSpec {
  V.id("nic_id", V.jsonString("nic_id", b.nicId), "nic");
  V.id("vpc", V.jsonString("vpc", b.vpcId), "vpc");
  V.id("subnet", V.jsonString("subnet", b.subnetId), "subnet");
  V.ipv4("address", V.jsonString("address", b.address));
  if (V.mac("mac", V.jsonString("mac", b.mac)) !== b.mac) throw new InvalidArgumentError("mac", `${V.show(b.mac)} is not in lower case`);
  V.hostId("host_id", V.jsonString("host_id", b.hostId));
  V.ifname("host_interface", V.jsonString("host_interface", b.hostIf));
  V.jsonArray("security_groups", b.groupIds, MAX_GROUPS_PER_NIC).forEach((g, i) =>
    V.id(`security_groups[${i}]`, V.jsonString(`security_groups[${i}]`, g), "sg"),
  );
  if (b.dropLogging !== undefined) storedLogging("drop_logging", b.dropLogging);
  return b;
}

/** A binding: its sig (JSON BindingSpec) and times. */
export function parseBinding(sig: string, bound: string | null, updated: string | null, nicId?: string): V.Parsed<BindingRec> {
  return V.attempt(() => {
    const o = V.jsonObject("sig", V.storedJson("sig", sig, 64 * 1024));
    for (const k of Object.keys(o)) if (!SPEC_KEYS.has(k)) throw new InvalidArgumentError(`sig.${k}`, "is not a field of a binding");
    const spec = checkBinding(o as unknown as BindingSpec);
    if (nicId !== undefined && spec.nicId !== nicId)
      throw new InvalidArgumentError("nic_id", `${V.show(spec.nicId)} is not the NIC of its key (${V.show(nicId)})`);
    return { ...spec, boundMs: V.storedInt("bound", bound ?? "0"), updatedMs: V.storedInt("updated", updated ?? "0") };
  });
}

/** One member of a group's member index: nic id → address (a set element of the peer's members). */
export function parseMember(nicId: string, address: string): V.Parsed<string> {
  return V.attempt(() => {
    V.id("nic", V.jsonString("nic", nicId), "nic");
    V.ipv4("address", V.jsonString("address", address));
    return address;
  });
}

/** A subnet of this host as the firewall compiles it (the netagent's record). */
export function parseLocalSubnet(s: { subnetId: string; cidr: string }): V.Parsed<{ subnetId: string; cidr: string }> {
  return V.attempt(() => ({
    subnetId: V.id("subnet", V.jsonString("subnet", s.subnetId), "subnet"),
    cidr: V.cidr("cidr", V.jsonString("cidr", s.cidr), { min: 0, max: 32 }).text,
  }));
}

// Flow-log configurations (their store and service: flowlog-config.ts, flowlog-service.ts).

export interface FlowLogConfigRec {
  id: string;
  vpcId: string;
  /** A VPC, subnet or NIC id. */
  resourceId: string;
  sampleRate: number;
  description: string;
  createdMs: number;
  /**
   * A NIC's config: the bound time of the binding it was made for. It applies
   * to that binding only: a NIC unbound and bound again (a new binding, a new
   * bound time) does not inherit it, and the garbage collection deletes it.
   */
  nicBoundMs?: number;
}

export const RESOURCE_RE = /^(vpc|subnet|nic)-[0-9a-f]{12}$/;

/** Checks a sample rate as the flag, the API or a stored record gives it: a number with 0 < r ≤ 1. */
export function checkSampleRate(field: string, v: unknown): number {
  const r = typeof v === "string" && /^[0-9]{0,3}\.?[0-9]{1,17}$/.test(v) ? Number(v) : v;
  if (typeof r !== "number" || !Number.isFinite(r) || r <= 0 || r > 1)
    throw new InvalidArgumentError(field, `a sample rate is a number with 0 < rate ≤ 1, got ${V.show(String(v))}`);
  return r;
}

/** The resource id of a request or record: a VPC, subnet or NIC id. */
export function checkResource(field: string, v: string): string {
  if (!RESOURCE_RE.test(v))
    throw new InvalidArgumentError(field, `${V.show(v)} is not a VPC, subnet or NIC id ("vpc-…", "subnet-…" or "nic-…" and 12 hex digits)`);
  return v;
}

/** A configuration hash as HGETALL returns it, checked as CreateFlowLogConfig checks a request. */
export function parseFlowLogConfig(h: Record<string, string>, id?: string): V.Parsed<FlowLogConfigRec> {
  return V.attempt(() => {
    const rec: FlowLogConfigRec = {
      id: V.id("id", V.field(h, "id"), "fl"),
      vpcId: V.id("vpc", V.field(h, "vpc"), "vpc"),
      resourceId: checkResource("resource", V.field(h, "resource")),
      sampleRate: checkSampleRate("rate", V.field(h, "rate")),
      description: V.text("description", h.description ?? ""),
      createdMs: V.storedInt("created", h.created ?? "0", 0),
      ...(h.bound !== undefined ? { nicBoundMs: V.storedInt("bound", h.bound, 0) } : {}),
    };
    if (rec.nicBoundMs !== undefined && !rec.resourceId.startsWith("nic-"))
      throw new InvalidArgumentError("bound", `only a NIC's config has a bound time (${V.show(rec.resourceId)} is not a NIC)`);
    if (id !== undefined && rec.id !== id) throw new InvalidArgumentError("id", `${V.show(rec.id)} is not the id of its key (${V.show(id)})`);
    if (rec.resourceId.startsWith("vpc-") && rec.resourceId !== rec.vpcId)
      throw new InvalidArgumentError("resource", `${V.show(rec.resourceId)} is a VPC other than the record's (${rec.vpcId})`);
    for (const k of Object.keys(h))
      if (!["id", "vpc", "resource", "rate", "description", "created", "bound"].includes(k))
        throw new InvalidArgumentError(k, "is not a field of a flow-log config");
    return rec;
  });
}
