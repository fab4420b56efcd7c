// Pure rule parsing and validation: rule texts ("tcp:80:0.0.0.0/0"), vpcctl
// JSON policy documents and the API's rule messages all end up here, and
// leave as the normalized model types (model.ts). What survives is canonical
// numbers, canonical CIDRs and ids matching their patterns — nothing a
// caller typed is carried through as text, except descriptions (free text,
// checked by validate.text, never meant for an nft script).
import { InvalidArgumentError } from "../common/errors.js";
import * as V from "../common/validate.js";
import { create } from "@bufbuild/protobuf";
import {
  AclAction,
  Direction,
  NetworkAclEntrySchema,
  Protocol,
  SecurityGroupRuleSchema,
  type NetworkAclEntry,
  type SecurityGroupRule,
} from "../../gen/microvpc/v1/firewall_pb.js";
import { MAX_RULES_PER_GROUP, type AclEntry, type Dir, type Proto, type SgRule } from "./model.js";

export const MAX_ACL_ENTRIES = 1000;
export const MAX_ACL_RULE_NUMBER = 32766;
/** Longest rule text: "icmp:255/255:" and a 63-character group name fit well below. */
export const MAX_RULE_TEXT = 100;
export const MAX_POLICY_BYTES = 1024 * 1024;
/** Rule number of the catch-all entry appended to a vpcctl document's directions. */
export const VPCCTL_CATCH_ALL = 32766;

const SG_ID_RE = /^sg-[0-9a-f]{12}$/;
const NAME_RE = /^[a-z][a-z0-9-]{0,62}$/;
const RULE_CHARS_RE = /^[a-z0-9.:/-]*$/;
const SYNTAX = 'a rule is PROTO:PORTS:PEER, e.g. "tcp:80:0.0.0.0/0", "tcp:8000-8080:10.0.0.0/16", "icmp:8:10.0.0.0/8" or "all:all:0.0.0.0/0"';

/** A rule whose peer may still be a group name, which only the caller can resolve. */
export type SgRuleDraft = SgRule & {
  /** Peer given by name (group unset): resolve it in the rule's VPC. */
  groupName?: string;
};

export interface ParsedRule {
  rule: SgRuleDraft;
  warnings: string[];
}

// ---------- rule texts ----------

function portNumber(field: string, text: string, s: string): number {
  if (!/^[0-9]{1,10}$/.test(s))
    throw new InvalidArgumentError(field, `${V.show(text)}: ports ${V.show(s)} are not valid; use all, N or N-M with 1 ≤ N ≤ M ≤ 65535`);
  const n = Number(s);
  if (n < 1 || n > 65535) throw new InvalidArgumentError(field, `${V.show(text)}: port ${n} is out of range; use 1–65535 (or all)`);
  return n;
}

function icmpNumber(field: string, text: string, what: string, s: string): number {
  if (!/^[0-9]{1,10}$/.test(s))
    throw new InvalidArgumentError(field, `${V.show(text)}: ICMP ${V.show(s)} is not valid; use all, TYPE or TYPE/CODE with numbers 0–255`);
  const n = Number(s);
  if (n > 255) throw new InvalidArgumentError(field, `${V.show(text)}: ICMP ${what} ${n} is out of range; use 0–255`);
  return n;
}

/**
 * Parses one rule text of the form PROTO:PORTS:PEER (see ParseRulesRequest
 * in firewall.proto). A peer given as a group name comes back in groupName
 * for the caller to resolve; a bare address is read as /32 with a warning.
 */
export function parseRuleText(dir: Dir, text: string, field = "rule"): ParsedRule {
  if (text.length > MAX_RULE_TEXT) {
    throw new InvalidArgumentError(
      field,
      `is ${text.length} characters long; a rule text is at most ${MAX_RULE_TEXT} (PROTO:PORTS:PEER, e.g. "tcp:80:0.0.0.0/0")`,
    );
  }
  if (text === "") throw new InvalidArgumentError(field, `is empty; ${SYNTAX}`);
  if (!RULE_CHARS_RE.test(text)) {
    if (RULE_CHARS_RE.test(text.toLowerCase()))
      throw new InvalidArgumentError(field, `${V.show(text)} has capital letters; write it in lowercase: ${V.show(text.toLowerCase())}`);
    const bad = [...new Set([...text].filter((c) => !/[a-z0-9.:/-]/.test(c)))].map((c) => JSON.stringify(c));
    throw new InvalidArgumentError(
      field,
      `${V.show(text)} contains ${bad.join(", ")}; a rule text may only use a-z 0-9 . : / - (PROTO:PORTS:PEER, e.g. "tcp:80:0.0.0.0/0")`,
    );
  }
  const parts = text.split(":");
  if (parts.length !== 3) throw new InvalidArgumentError(field, `${V.show(text)} has ${parts.length} part${parts.length === 1 ? "" : "s"}; ${SYNTAX}`);
  const [p, ports, peer] = parts;
  if (!["tcp", "udp", "icmp", "all"].includes(p)) {
    throw new InvalidArgumentError(field, `${V.show(text)}: protocol ${V.show(p)} is not known; use tcp, udp, icmp or all`);
  }
  const proto = p as Proto;
  const rule: SgRuleDraft = { dir, proto, portFrom: 0, portTo: 0, description: "" };
  const warnings: string[] = [];

  if (ports === "") throw new InvalidArgumentError(field, `${V.show(text)}: PORTS is empty; use all, N or N-M (or for icmp: all, TYPE or TYPE/CODE)`);
  if (proto === "tcp" || proto === "udp") {
    if (ports !== "all") {
      const m = /^([^-]*)-([^-]*)$/.exec(ports);
      if (m) {
        const from = portNumber(field, text, m[1]);
        const to = portNumber(field, text, m[2]);
        if (to < from) {
          throw new InvalidArgumentError(
            field,
            `${V.show(text)}: range ${from}-${to} is backwards; a range is FROM-TO with FROM ≤ TO (did you mean ${to}-${from}?)`,
          );
        }
        rule.portFrom = from;
        rule.portTo = to;
      } else {
        rule.portFrom = rule.portTo = portNumber(field, text, ports);
      }
    }
  } else if (proto === "icmp") {
    if (ports !== "all") {
      const m = /^([^/]*)\/([^/]*)$/.exec(ports);
      if (m) {
        rule.icmpType = icmpNumber(field, text, "type", m[1]);
        rule.icmpCode = icmpNumber(field, text, "code", m[2]);
      } else {
        rule.icmpType = icmpNumber(field, text, "type", ports);
      }
    }
  } else if (ports !== "all") {
    throw new InvalidArgumentError(field, `${V.show(text)}: protocol all matches every port; write "all:all:PEER"`);
  }

  if (peer === "")
    throw new InvalidArgumentError(field, `${V.show(text)}: PEER is empty; give a CIDR (a.b.c.d/n), an address, a group id (sg-…) or a group name`);
  if (/^[0-9]/.test(peer)) {
    if (peer.includes("/")) {
      rule.cidr = V.cidr(field, peer, { min: 0, max: 32 }).text;
    } else {
      V.ipv4(field, peer);
      rule.cidr = `${peer}/32`;
      warnings.push(`${field}: ${V.show(text)}: the bare address ${peer} is read as ${peer}/32`);
    }
  } else if (SG_ID_RE.test(peer)) {
    rule.group = peer;
  } else if (NAME_RE.test(peer)) {
    rule.groupName = peer;
  } else {
    throw new InvalidArgumentError(field, `${V.show(text)}: peer ${V.show(peer)} is not a CIDR (a.b.c.d/n), an address, a group id (sg-…) or a group name`);
  }
  return { rule, warnings };
}

// ---------- API messages ----------

const DIRS: Record<number, Dir> = { [Direction.INGRESS]: "ingress", [Direction.EGRESS]: "egress" };
const PROTOS: Record<number, Proto> = {
  [Protocol.TCP]: "tcp",
  [Protocol.UDP]: "udp",
  [Protocol.ICMP]: "icmp",
  [Protocol.ALL]: "all",
};

export const dirEnum = (d: Dir): Direction => (d === "ingress" ? Direction.INGRESS : Direction.EGRESS);
export const protoEnum = (p: Proto): Protocol => (p === "tcp" ? Protocol.TCP : p === "udp" ? Protocol.UDP : p === "icmp" ? Protocol.ICMP : Protocol.ALL);

/**
 * A rule as the API carries it: the service's answers, and the CLI's
 * requests and dry runs. A draft's group name goes where the id goes
 * (requests accept either; the server resolves names).
 */
export function sgRuleMsg(r: SgRuleDraft): SecurityGroupRule {
  const group = r.groupName ?? r.group;
  return create(SecurityGroupRuleSchema, {
    direction: dirEnum(r.dir),
    protocol: protoEnum(r.proto),
    portFrom: r.portFrom,
    portTo: r.portTo,
    icmpType: r.icmpType,
    icmpCode: r.icmpCode,
    peer: group !== undefined ? { case: "securityGroupId", value: group } : { case: "cidr", value: r.cidr ?? "" },
    description: r.description,
  });
}

/** An ACL entry as the API shows it (the service's answers and the CLI's dry runs). */
export function aclEntryMsg(e: AclEntry): NetworkAclEntry {
  return create(NetworkAclEntrySchema, {
    ruleNumber: e.ruleNumber,
    direction: dirEnum(e.dir),
    action: e.action === "allow" ? AclAction.ALLOW : AclAction.DENY,
    protocol: protoEnum(e.proto),
    portFrom: e.portFrom,
    portTo: e.portTo,
    icmpType: e.icmpType,
    icmpCode: e.icmpCode,
    cidr: e.cidr,
    description: e.description,
  });
}

function direction(field: string, v: Direction): Dir {
  if (v === Direction.UNSPECIFIED) throw new InvalidArgumentError(field, "is required (DIRECTION_INGRESS or DIRECTION_EGRESS)");
  const d = DIRS[v];
  if (!d) throw new InvalidArgumentError(field, `${v} is not a direction; use DIRECTION_INGRESS or DIRECTION_EGRESS`);
  return d;
}

function protocol(field: string, v: Protocol): Proto {
  if (v === Protocol.UNSPECIFIED) throw new InvalidArgumentError(field, "is required (PROTOCOL_TCP, PROTOCOL_UDP, PROTOCOL_ICMP or PROTOCOL_ALL)");
  const p = PROTOS[v];
  if (!p) throw new InvalidArgumentError(field, `${v} is not a protocol; use PROTOCOL_TCP, PROTOCOL_UDP, PROTOCOL_ICMP or PROTOCOL_ALL`);
  return p;
}

interface Match {
  portFrom: number;
  portTo: number;
  icmpType?: number;
  icmpCode?: number;
}

/** Ports and ICMP fields of a rule or ACL entry, checked against the protocol. */
function match(field: string, proto: Proto, m: { portFrom: number; portTo: number; icmpType?: number; icmpCode?: number }): Match {
  const out: Match = { portFrom: 0, portTo: 0 };
  if (proto === "tcp" || proto === "udp") {
    if (m.portFrom === 0) {
      if (m.portTo !== 0) {
        throw new InvalidArgumentError(`${field}.port_from`, `is 0 while port_to is ${m.portTo}; set port_from too (0 and 0 mean every port)`);
      }
    } else {
      out.portFrom = V.port(`${field}.port_from`, m.portFrom);
      out.portTo = m.portTo === 0 ? out.portFrom : V.port(`${field}.port_to`, m.portTo);
      if (out.portTo < out.portFrom) {
        throw new InvalidArgumentError(`${field}.port_to`, `${out.portTo} is below port_from ${out.portFrom}; a range is FROM-TO with FROM ≤ TO`);
      }
    }
  } else if (m.portFrom !== 0 || m.portTo !== 0) {
    const which = m.portFrom !== 0 ? "port_from" : "port_to";
    throw new InvalidArgumentError(`${field}.${which}`, `ports apply to tcp and udp only; leave port_from and port_to 0 for ${proto}`);
  }
  if (proto === "icmp") {
    if (m.icmpType !== undefined) {
      if (m.icmpType > 255) throw new InvalidArgumentError(`${field}.icmp_type`, `${m.icmpType} is out of range; use 0–255 (e.g. 8 for echo request)`);
      out.icmpType = m.icmpType;
    }
    if (m.icmpCode !== undefined) {
      if (m.icmpType === undefined)
        throw new InvalidArgumentError(`${field}.icmp_code`, "needs icmp_type; set the type too (e.g. 3 for destination unreachable)");
      if (m.icmpCode > 255) throw new InvalidArgumentError(`${field}.icmp_code`, `${m.icmpCode} is out of range; use 0–255`);
      out.icmpCode = m.icmpCode;
    }
  } else {
    if (m.icmpType !== undefined) throw new InvalidArgumentError(`${field}.icmp_type`, `applies to icmp only; leave it unset for ${proto}`);
    if (m.icmpCode !== undefined) throw new InvalidArgumentError(`${field}.icmp_code`, `applies to icmp only; leave it unset for ${proto}`);
  }
  return out;
}

/** A CIDR field that also accepts a bare address as /32. */
function peerCidr(field: string, v: string): string {
  if (v !== "" && !v.includes("/") && /^[0-9.]+$/.test(v)) {
    V.ipv4(field, v);
    return `${v}/32`;
  }
  return V.cidr(field, v, { min: 0, max: 32 }).text;
}

/**
 * Validates one SecurityGroupRule message. A peer given by name (requests
 * accept names in security_group_id) comes back in groupName.
 */
export function validateSgRule(field: string, m: SecurityGroupRule): SgRuleDraft {
  const dir = direction(`${field}.direction`, m.direction);
  const proto = protocol(`${field}.protocol`, m.protocol);
  const r: SgRuleDraft = { dir, proto, ...match(field, proto, m), description: "" };
  switch (m.peer.case) {
    case "cidr":
      r.cidr = peerCidr(`${field}.cidr`, m.peer.value);
      break;
    case "securityGroupId": {
      const v = m.peer.value;
      if (v === "") throw new InvalidArgumentError(`${field}.security_group_id`, "is empty; give a group id (sg-…) or a group name of the VPC");
      if (SG_ID_RE.test(v)) r.group = v;
      else if (NAME_RE.test(v)) r.groupName = v;
      else throw new InvalidArgumentError(`${field}.security_group_id`, `${V.show(v)} is neither a group id (sg- and 12 hex digits) nor a group name`);
      break;
    }
    default:
      throw new InvalidArgumentError(field, 'needs a peer: set cidr (e.g. "0.0.0.0/0") or security_group_id');
  }
  r.description = V.text(`${field}.description`, m.description);
  return r;
}

/** Validates one NetworkAclEntry message. */
export function validateAclEntry(field: string, m: NetworkAclEntry): AclEntry {
  if (m.ruleNumber < 1 || m.ruleNumber > MAX_ACL_RULE_NUMBER) {
    throw new InvalidArgumentError(
      `${field}.rule_number`,
      m.ruleNumber === 0 ? `is required (1–${MAX_ACL_RULE_NUMBER})` : `${m.ruleNumber} is out of range; use 1–${MAX_ACL_RULE_NUMBER}`,
    );
  }
  const dir = direction(`${field}.direction`, m.direction);
  let action: "allow" | "deny";
  if (m.action === AclAction.ALLOW) action = "allow";
  else if (m.action === AclAction.DENY) action = "deny";
  else if (m.action === AclAction.UNSPECIFIED) throw new InvalidArgumentError(`${field}.action`, "is required (ACL_ACTION_ALLOW or ACL_ACTION_DENY)");
  else throw new InvalidArgumentError(`${field}.action`, `${m.action} is not an action; use ACL_ACTION_ALLOW or ACL_ACTION_DENY`);
  const proto = protocol(`${field}.protocol`, m.protocol);
  const e: AclEntry = { ruleNumber: m.ruleNumber, dir, action, proto, ...match(field, proto, m), cidr: "", description: "" };
  if (m.cidr === "") throw new InvalidArgumentError(`${field}.cidr`, 'is required (a CIDR such as "10.0.0.0/16"; "0.0.0.0/0" for any)');
  e.cidr = peerCidr(`${field}.cidr`, m.cidr);
  e.description = V.text(`${field}.description`, m.description);
  return e;
}

// ---------- lists ----------

/** Identity of a rule: every field but the description. */
export function ruleKey(r: SgRule): string {
  return [r.dir, r.proto, r.portFrom, r.portTo, r.icmpType ?? "", r.icmpCode ?? "", r.cidr ?? "", r.group ?? ""].join("|");
}

/** Ingress then egress, each in the given order; a duplicate keeps the first. */
export function normalizeRules<T extends SgRule>(rules: T[], onDuplicate?: (index: number, first: number) => void): T[] {
  const seen = new Map<string, number>();
  const out: T[] = [];
  rules.forEach((r, i) => {
    const k = ruleKey(r);
    const first = seen.get(k);
    if (first !== undefined) {
      onDuplicate?.(i, first);
      return;
    }
    seen.set(k, i);
    out.push(r);
  });
  return [...out.filter((r) => r.dir === "ingress"), ...out.filter((r) => r.dir === "egress")];
}

export function checkRuleCount(field: string, n: number): void {
  if (n > MAX_RULES_PER_GROUP) throw new InvalidArgumentError(field, `has ${n} rules; a group holds at most ${MAX_RULES_PER_GROUP}`);
}

export const aclKey = (e: { dir: Dir; ruleNumber: number }) => `${e.dir}/${e.ruleNumber}`;

/** Ordered by direction (ingress first) then rule number. */
export function sortAcl(entries: AclEntry[]): AclEntry[] {
  return [...entries].sort((a, b) => (a.dir === b.dir ? a.ruleNumber - b.ruleNumber : a.dir === "ingress" ? -1 : 1));
}

/** Validates a list of entries: each one, the count, and unique numbers per direction. */
export function validateAclEntries(field: string, msgs: NetworkAclEntry[]): AclEntry[] {
  if (msgs.length > MAX_ACL_ENTRIES) throw new InvalidArgumentError(field, `has ${msgs.length} entries; an ACL holds at most ${MAX_ACL_ENTRIES}`);
  const entries = msgs.map((m, i) => validateAclEntry(`${field}[${i}]`, m));
  const seen = new Map<string, number>();
  entries.forEach((e, i) => {
    const first = seen.get(aclKey(e));
    if (first !== undefined) {
      throw new InvalidArgumentError(
        `${field}[${i}].rule_number`,
        `${e.ruleNumber} is already used by ${field}[${first}] for ${e.dir}; rule numbers are unique per direction`,
      );
    }
    seen.set(aclKey(e), i);
  });
  return sortAcl(entries);
}

// ---------- vpcctl policy documents ----------

export interface VpcctlPolicy {
  /** The document's subnet, canonical. */
  subnetCidr: string;
  /** Per direction: 100, 110, … in document order, then the catch-all unless DENY. */
  aclEntries: AclEntry[];
  /** The allow entries, as security group rules. */
  rules: SgRule[];
  warnings: string[];
}

const ENTRY_KEYS = new Set(["port", "protocol", "action", "cidr", "description", "comment"]);

/**
 * Parses a vpcctl policy document ({"subnet", "ingress": [{"port",
 * "protocol", "action"}], "egress": […]}). defaultAction is what vpcctl
 * does with what the document does not list: "allow" (vpcctl's meaning,
 * and the default) appends an all:all:0.0.0.0/0 allow entry numbered 32766
 * to each direction; "deny" leaves the ACL's implicit deny.
 */
export function parseVpcctlPolicy(json: string, opts: { defaultAction?: "allow" | "deny"; field?: string } = {}): VpcctlPolicy {
  const field = opts.field ?? "vpcctl_policy_json";
  const bytes = Buffer.byteLength(json);
  if (bytes > MAX_POLICY_BYTES) throw new InvalidArgumentError(field, `is ${bytes} bytes; a policy document is at most ${MAX_POLICY_BYTES} (1 MiB)`);
  let doc: unknown;
  try {
    doc = JSON.parse(json);
  } catch (err) {
    throw new InvalidArgumentError(field, `is not valid JSON (${(err as Error).message}); expected {"subnet": "a.b.c.d/n", "ingress": [...], "egress": [...]}`);
  }
  if (typeof doc !== "object" || doc === null || Array.isArray(doc)) {
    throw new InvalidArgumentError(field, 'must be a JSON object: {"subnet": "a.b.c.d/n", "ingress": [...], "egress": [...]}');
  }
  const d = doc as Record<string, unknown>;
  const warnings: string[] = [];
  for (const k of Object.keys(d)) {
    if (!["subnet", "ingress", "egress"].includes(k)) warnings.push(`${field}: key ${V.show(k)} is not part of a vpcctl policy and was ignored`);
  }
  if (typeof d.subnet !== "string") {
    throw new InvalidArgumentError(
      `${field}.subnet`,
      d.subnet === undefined ? 'is required (the subnet\'s CIDR, e.g. "10.10.1.0/24")' : 'must be a string such as "10.10.1.0/24"',
    );
  }
  const subnetCidr = V.cidr(`${field}.subnet`, d.subnet, { min: 0, max: 32 }).text;

  const aclEntries: AclEntry[] = [];
  const rules: SgRule[] = [];
  for (const dir of ["ingress", "egress"] as const) {
    const list = d[dir] ?? [];
    if (!Array.isArray(list))
      throw new InvalidArgumentError(`${field}.${dir}`, 'must be a list of entries like {"port": 80, "protocol": "tcp", "action": "allow"}');
    list.forEach((raw: unknown, i: number) => {
      const f = `${field}.${dir}[${i}]`;
      const ruleNumber = 100 + 10 * i;
      if (ruleNumber >= VPCCTL_CATCH_ALL)
        throw new InvalidArgumentError(
          `${field}.${dir}`,
          `has ${list.length} entries; numbered from 100 in steps of 10 at most ${(VPCCTL_CATCH_ALL - 100) / 10} fit`,
        );
      const e = vpcctlEntry(f, dir, ruleNumber, raw, warnings);
      aclEntries.push(e);
      if (e.action === "allow") {
        const { ruleNumber: _n, action: _a, ...rule } = e;
        rules.push(rule);
      } else {
        warnings.push(`${f}: deny ${describeMatch(e)} is kept as network ACL entry ${ruleNumber} only; a security group can only allow`);
      }
    });
    if ((opts.defaultAction ?? "allow") === "allow") {
      aclEntries.push({
        ruleNumber: VPCCTL_CATCH_ALL,
        dir,
        action: "allow",
        proto: "all",
        portFrom: 0,
        portTo: 0,
        cidr: "0.0.0.0/0",
        description: "vpcctl default: what the policy does not match passes",
      });
    }
  }
  if (aclEntries.length > MAX_ACL_ENTRIES) {
    throw new InvalidArgumentError(field, `makes ${aclEntries.length} network ACL entries; an ACL holds at most ${MAX_ACL_ENTRIES}`);
  }
  return { subnetCidr, aclEntries: sortAcl(aclEntries), rules, warnings };
}

function describeMatch(e: { proto: Proto; portFrom: number; portTo: number; icmpType?: number; icmpCode?: number; cidr?: string }): string {
  const ports = e.portFrom === 0 ? "all" : e.portFrom === e.portTo ? `${e.portFrom}` : `${e.portFrom}-${e.portTo}`;
  const icmp = e.icmpType === undefined ? "all" : e.icmpCode === undefined ? `${e.icmpType}` : `${e.icmpType}/${e.icmpCode}`;
  return `${e.proto} ${e.proto === "tcp" || e.proto === "udp" ? ports : icmp} ${e.cidr ?? ""}`.trim();
}

function vpcctlEntry(f: string, dir: Dir, ruleNumber: number, raw: unknown, warnings: string[]): AclEntry {
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
    throw new InvalidArgumentError(f, 'must be an object like {"port": 80, "protocol": "tcp", "action": "allow"}');
  }
  const o = raw as Record<string, unknown>;
  for (const k of Object.keys(o)) if (!ENTRY_KEYS.has(k)) warnings.push(`${f}: key ${V.show(k)} is not part of a vpcctl rule and was ignored`);

  if (typeof o.protocol !== "string")
    throw new InvalidArgumentError(`${f}.protocol`, o.protocol === undefined ? "is required (tcp, udp or icmp)" : "must be a string: tcp, udp or icmp");
  const p = o.protocol.toLowerCase();
  if (!["tcp", "udp", "icmp", "all"].includes(p)) throw new InvalidArgumentError(`${f}.protocol`, `${V.show(o.protocol)} is not known; use tcp, udp or icmp`);
  const proto = p as Proto;

  if (typeof o.action !== "string")
    throw new InvalidArgumentError(`${f}.action`, o.action === undefined ? "is required (allow or deny)" : "must be a string: allow or deny");
  const a = o.action.toLowerCase();
  if (a !== "allow" && a !== "deny") throw new InvalidArgumentError(`${f}.action`, `${V.show(o.action)} is not known; use allow or deny`);

  let portFrom = 0;
  let portTo = 0;
  const port = o.port;
  if (proto === "tcp" || proto === "udp") {
    if (port === undefined) throw new InvalidArgumentError(`${f}.port`, `is required for ${proto} (a port such as 80, a range "8000-8080" or "all")`);
    if (typeof port === "number") {
      portFrom = portTo = jsonPort(`${f}.port`, port);
    } else if (typeof port === "string") {
      if (port !== "all") {
        const m = /^([0-9]{1,5})(?:-([0-9]{1,5}))?$/.exec(port);
        if (!m) throw new InvalidArgumentError(`${f}.port`, `${V.show(port)} is not valid; use a port such as 80, a range "8000-8080" or "all"`);
        portFrom = jsonPort(`${f}.port`, Number(m[1]));
        portTo = m[2] === undefined ? portFrom : jsonPort(`${f}.port`, Number(m[2]));
        if (portTo < portFrom) throw new InvalidArgumentError(`${f}.port`, `range ${portFrom}-${portTo} is backwards; a range is FROM-TO with FROM ≤ TO`);
      }
    } else {
      throw new InvalidArgumentError(`${f}.port`, 'must be a number such as 80 or a string such as "8000-8080" or "all"');
    }
  } else if (port !== undefined && port !== "all") {
    throw new InvalidArgumentError(`${f}.port`, `${proto} has no ports; leave "port" out or use "all"`);
  }

  let cidr = "0.0.0.0/0";
  if (o.cidr !== undefined) {
    if (typeof o.cidr !== "string") throw new InvalidArgumentError(`${f}.cidr`, 'must be a string such as "10.0.0.0/16"');
    cidr = peerCidr(`${f}.cidr`, o.cidr);
    if (!o.cidr.includes("/")) warnings.push(`${f}.cidr: the bare address ${o.cidr} is read as ${cidr}`);
  }
  const desc = o.description ?? o.comment ?? "";
  if (typeof desc !== "string") throw new InvalidArgumentError(`${f}.description`, "must be a string");
  return { ruleNumber, dir, action: a, proto, portFrom, portTo, cidr, description: V.text(`${f}.description`, desc) };
}

function jsonPort(field: string, n: number): number {
  if (!Number.isInteger(n) || n < 1 || n > 65535) throw new InvalidArgumentError(field, `${n} is not a port; use 1–65535 (or "all")`);
  return n;
}

// ---------- stored rules and entries (read back from Redis) ----------
// What the API stored is canonical (validateSgRule / validateAclEntry then
// JSON). Read back, a rule passes the same checks again (match, peerCidr,
// the id pattern, validate.text) and must come out unchanged: anything else
// was not written by the API.

const SG_RULE_KEYS = new Set(["dir", "proto", "portFrom", "portTo", "icmpType", "icmpCode", "cidr", "group", "description"]);
const ACL_ENTRY_KEYS = new Set(["ruleNumber", "dir", "action", "proto", "portFrom", "portTo", "icmpType", "icmpCode", "cidr", "description"]);

function storedObject(field: string, raw: unknown, keys: Set<string>): Record<string, unknown> {
  const o = V.jsonObject(field, raw);
  for (const k of Object.keys(o)) if (!keys.has(k)) throw new InvalidArgumentError(`${field}.${k}`, "is not a field of a stored rule");
  return o;
}

function storedDir(field: string, v: unknown): Dir {
  if (v !== "ingress" && v !== "egress") throw new InvalidArgumentError(field, `${V.show(String(v))} is not ingress or egress`);
  return v;
}

function storedProto(field: string, v: unknown): Proto {
  if (v !== "tcp" && v !== "udp" && v !== "icmp" && v !== "all") throw new InvalidArgumentError(field, `${V.show(String(v))} is not tcp, udp, icmp or all`);
  return v;
}

function storedMatch(field: string, proto: Proto, o: Record<string, unknown>): Match {
  return match(field, proto, {
    portFrom: V.jsonInt(`${field}.port_from`, o.portFrom, 0, 65535),
    portTo: V.jsonInt(`${field}.port_to`, o.portTo, 0, 65535),
    icmpType: o.icmpType === undefined ? undefined : V.jsonInt(`${field}.icmp_type`, o.icmpType, 0, 255),
    icmpCode: o.icmpCode === undefined ? undefined : V.jsonInt(`${field}.icmp_code`, o.icmpCode, 0, 255),
  });
}

function storedCidr(field: string, v: unknown): string {
  const s = V.jsonString(field, v);
  const c = peerCidr(field, s);
  if (c !== s) throw new InvalidArgumentError(field, `${V.show(s)} is not canonical (${c})`);
  return c;
}

/** One rule of a stored group, checked as the API checks a rule. */
export function storedSgRule(field: string, raw: unknown): SgRule {
  const o = storedObject(field, raw, SG_RULE_KEYS);
  const dir = storedDir(`${field}.direction`, o.dir);
  const proto = storedProto(`${field}.protocol`, o.proto);
  const r: SgRule = { dir, proto, ...storedMatch(field, proto, o), description: "" };
  if ((o.cidr === undefined) === (o.group === undefined)) throw new InvalidArgumentError(field, "needs exactly one peer: cidr or group");
  if (o.cidr !== undefined) r.cidr = storedCidr(`${field}.cidr`, o.cidr);
  else {
    const g = V.jsonString(`${field}.security_group_id`, o.group);
    if (!SG_ID_RE.test(g)) throw new InvalidArgumentError(`${field}.security_group_id`, `${V.show(g)} is not a group id (sg- and 12 hex digits)`);
    r.group = g;
  }
  r.description = V.text(`${field}.description`, V.jsonString(`${field}.description`, o.description ?? ""));
  return r;
}

/** One entry of a stored ACL, checked as the API checks an entry. */
export function storedAclEntry(field: string, raw: unknown): AclEntry {
  const o = storedObject(field, raw, ACL_ENTRY_KEYS);
  const ruleNumber = V.jsonInt(`${field}.rule_number`, o.ruleNumber, 1, MAX_ACL_RULE_NUMBER);
  const dir = storedDir(`${field}.direction`, o.dir);
  if (o.action !== "allow" && o.action !== "deny") throw new InvalidArgumentError(`${field}.action`, `${V.show(String(o.action))} is not allow or deny`);
  const proto = storedProto(`${field}.protocol`, o.proto);
  return {
    ruleNumber,
    dir,
    action: o.action,
    proto,
    ...storedMatch(field, proto, o),
    cidr: storedCidr(`${field}.cidr`, o.cidr),
    description: V.text(`${field}.description`, V.jsonString(`${field}.description`, o.description ?? "")),
  };
}
