// Rule texts on the command line, parsed by the firewall's own parser
// (services/firewall/rules.ts), so what the CLI sends — and what --dry-run
// shows — is exactly what the server would make of the same text.
//
//   security group rule   PROTO:PORTS:PEER          "tcp:80:0.0.0.0/0"
//   network ACL entry     NUM:DIR:ACTION:PROTO:PORTS:CIDR
//                                                   "100:ingress:deny:tcp:22:0.0.0.0/0"
//
// Both print back in the same form (ruleText, aclEntryText).
import { readFileSync } from "node:fs";
import { create } from "@bufbuild/protobuf";
import type { Command } from "commander";
import { InvalidArgumentError } from "../../services/common/errors.js";
import * as V from "../../services/common/validate.js";
import { EXIT } from "./errors.js";
import { aclEntryMsg, dirEnum, MAX_ACL_RULE_NUMBER, parseRuleText, sgRuleMsg } from "../../services/firewall/rules.js";
import {
  AclAction,
  Direction,
  NetworkAclEntryKeySchema,
  Protocol,
  type NetworkAclEntry,
  type NetworkAclEntryKey,
  type SecurityGroupRule,
} from "../../gen/microvpc/v1/firewall_pb.js";

export type Dir = "ingress" | "egress";

/** Parses rule texts of one direction; warnings (a bare address read as /32) are returned, not printed. */
export function parseRules(dir: Dir, texts: string[], option: string): { rules: SecurityGroupRule[]; warnings: string[] } {
  const rules: SecurityGroupRule[] = [];
  const warnings: string[] = [];
  for (const text of texts) {
    const { rule, warnings: w } = parseRuleText(dir, text, option);
    warnings.push(...w);
    rules.push(sgRuleMsg(rule));
  }
  return { rules, warnings };
}

/** --inbound and --outbound together, ingress first. */
export function parseInOut(inbound: string[], outbound: string[]): { rules: SecurityGroupRule[]; warnings: string[] } {
  const i = parseRules("ingress", inbound, "--inbound");
  const o = parseRules("egress", outbound, "--outbound");
  return { rules: [...i.rules, ...o.rules], warnings: [...i.warnings, ...o.warnings] };
}

const PROTO_WORD: Record<number, string> = { [Protocol.TCP]: "tcp", [Protocol.UDP]: "udp", [Protocol.ICMP]: "icmp", [Protocol.ALL]: "all" };

function ports(m: { protocol: Protocol; portFrom: number; portTo: number; icmpType?: number; icmpCode?: number }): string {
  if (m.protocol === Protocol.ICMP) {
    if (m.icmpType === undefined) return "all";
    return m.icmpCode === undefined ? `${m.icmpType}` : `${m.icmpType}/${m.icmpCode}`;
  }
  if (m.protocol === Protocol.TCP || m.protocol === Protocol.UDP) {
    if (m.portFrom === 0) return "all";
    return m.portTo === 0 || m.portTo === m.portFrom ? `${m.portFrom}` : `${m.portFrom}-${m.portTo}`;
  }
  return "all";
}

/** A rule as its text: "tcp:80:0.0.0.0/0", "all:all:sg-…". */
export function ruleText(r: SecurityGroupRule): string {
  return `${PROTO_WORD[r.protocol] ?? "?"}:${ports(r)}:${r.peer.value ?? ""}`;
}

export function dirWord(d: Direction): string {
  return d === Direction.INGRESS ? "ingress" : d === Direction.EGRESS ? "egress" : "?";
}

// ---------- network ACL entries ----------

const ACL_SYNTAX = 'an entry is NUM:DIRECTION:ACTION:PROTO:PORTS:CIDR, e.g. "100:ingress:deny:tcp:22:0.0.0.0/0" or "200:egress:allow:all:all:0.0.0.0/0"';

function ruleNumber(field: string, text: string, s: string): number {
  if (!/^[0-9]{1,10}$/.test(s) || Number(s) < 1 || Number(s) > MAX_ACL_RULE_NUMBER) {
    throw new InvalidArgumentError(
      field,
      `${V.show(text)}: rule number ${V.show(s)} is not valid; use 1–${MAX_ACL_RULE_NUMBER} (lower numbers are evaluated first)`,
    );
  }
  return Number(s);
}

function direction(field: string, text: string, s: string): Dir {
  if (s === "ingress" || s === "egress") return s;
  throw new InvalidArgumentError(field, `${V.show(text)}: direction ${V.show(s)} is not known; use ingress or egress`);
}

/** Parses "100:ingress:deny:tcp:22:0.0.0.0/0" into an ACL entry. */
export function parseAclEntry(text: string, field = "--entry"): NetworkAclEntry {
  // Let the rule parser name bad characters first: it has the best message for them.
  if (!/^[a-z0-9.:/-]*$/.test(text)) parseRuleText("ingress", text, field);
  const parts = text.split(":");
  if (parts.length !== 6) {
    throw new InvalidArgumentError(field, `${V.show(text)} has ${parts.length} part${parts.length === 1 ? "" : "s"}; ${ACL_SYNTAX}`);
  }
  const [num, dirS, actionS, ...match] = parts;
  const n = ruleNumber(field, text, num);
  const dir = direction(field, text, dirS);
  if (actionS !== "allow" && actionS !== "deny") {
    throw new InvalidArgumentError(field, `${V.show(text)}: action ${V.show(actionS)} is not known; use allow or deny`);
  }
  const { rule } = parseRuleText(dir, match.join(":"), field);
  if (rule.cidr === undefined) {
    throw new InvalidArgumentError(field, `${V.show(text)}: an ACL entry matches a CIDR (a.b.c.d/n), not a security group`);
  }
  return aclEntryMsg({
    ruleNumber: n,
    dir,
    action: actionS,
    proto: rule.proto,
    portFrom: rule.portFrom,
    portTo: rule.portTo,
    icmpType: rule.icmpType,
    icmpCode: rule.icmpCode,
    cidr: rule.cidr,
    description: "",
  });
}

/** Parses "ingress:100" (what `acl entry remove` takes). */
export function parseAclKey(text: string, field = "--entry"): NetworkAclEntryKey {
  const m = /^([a-z]+):([0-9]{1,10})$/.exec(text);
  if (!m) {
    // A whole entry text is accepted too: its direction and number identify it.
    if (text.split(":").length === 6) {
      const e = parseAclEntry(text, field);
      return create(NetworkAclEntryKeySchema, { direction: e.direction, ruleNumber: e.ruleNumber });
    }
    throw new InvalidArgumentError(field, `${V.show(text)} does not name an entry; use DIRECTION:NUM, e.g. "ingress:100"`);
  }
  const dir = direction(field, text, m[1]);
  return create(NetworkAclEntryKeySchema, { direction: dirEnum(dir), ruleNumber: ruleNumber(field, text, m[2]) });
}

export function aclActionWord(a: AclAction): string {
  return a === AclAction.ALLOW ? "allow" : a === AclAction.DENY ? "deny" : "?";
}

/** What an entry matches: "tcp:22:0.0.0.0/0". */
export function aclMatchText(e: NetworkAclEntry): string {
  return `${PROTO_WORD[e.protocol] ?? "?"}:${ports(e)}:${e.cidr}`;
}

/** An entry as its text: "100:ingress:deny:tcp:22:0.0.0.0/0". */
export function aclEntryText(e: NetworkAclEntry): string {
  return `${e.ruleNumber}:${dirWord(e.direction)}:${aclActionWord(e.action)}:${PROTO_WORD[e.protocol] ?? "?"}:${ports(e)}:${e.cidr}`;
}

/** A policy file's text (sg import, acl import), or a usage error naming the file. */
export function readPolicyFile(cmd: Command, file: string): string {
  try {
    return readFileSync(file, "utf8");
  } catch (err) {
    cmd.error(`error: cannot read the policy file ${file}: ${(err as Error).message}`, { exitCode: EXIT.usage });
  }
}
