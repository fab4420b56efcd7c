// The only firewall module that talks to Redis. Every change is one Lua
// script: another client (and every hypervisor's sync loop) sees all of it or
// none of it, and each script appends its change event to "mvpc:events" in
// the same step, so an event is never lost or early. Reads are plain
// commands, except loadVpcState, which is one read-only script so that a
// hypervisor compiles from a consistent snapshot.
//
// Keys: keys.ts (and docs/redis-schema.md); scripts: scripts.ts.
import { randomBytes } from "node:crypto";
import { Code } from "@connectrpc/connect";
import { ReplyError, type Redis } from "ioredis";
import type { Logger } from "pino";
import { reportInvalid, type InvalidWhere } from "../common/invalid-records.js";
import * as V from "../common/validate.js";
import { AlreadyExistsError, DomainError, FailedPreconditionError, InvalidArgumentError, NotFoundError } from "../common/errors.js";
import {
  MAX_GROUPS_PER_NIC,
  MAX_RULES_PER_GROUP,
  type AclEntry,
  type BindingRec,
  type NetworkAclRec,
  type SecurityGroupRec,
  type SgRule,
  type VpcFirewallState,
} from "./model.js";
import {
  checkBinding,
  OWNER,
  parseAcl,
  parseBinding,
  parseGroup,
  parseMember,
  storedEntriesText,
  storedLoggingText,
  storedRulesText,
  type BindingSpec,
} from "./schema.js";

import { naKeys, parseVpnClient, parseVpnEndpoint, vpnKeysOf } from "../netagent/schema.js";
import { idOrNull, isId } from "../common/ids.js";
import { pageOver } from "../common/paging.js";
import { ipamKeys, K, type IpamKeys } from "../ipam/schema.js";
import { FK, fwKeys, type FirewallKeys } from "./keys.js";
import { defineScripts, type Reply } from "./scripts.js";

/** The resource changed since it was read (expected_generation no longer matches). */
export class AbortedError extends DomainError {
  readonly code = Code.Aborted;
}

// ---------- records ----------

export function newId(kind: "sg" | "acl"): string {
  return `${kind}-${randomBytes(6).toString("hex")}`;
}

type Logging = { ratePerSecond: number; burst: number } | undefined;

/** What LOAD_VPC returns (scripts.ts), and loadInSteps on a cluster. */
type RawVpcState = [
  [string, string, string | null, string | null, string | null][],
  string[][],
  string[][],
  [string, string[], string[]][],
  string[],
  [string, string, string, string][],
  [string, string[], string[]] | null,
];

/** The fields of a binding's sig (JSON of its BindingSpec) that say where it is, as far as they have the right types; null if it is not a JSON object. */
function sigOf(raw: string): { hostId?: string; vpcId?: string; address?: string; groupIds: string[] } | null {
  let s: unknown;
  try {
    s = JSON.parse(raw);
  } catch {
    return null;
  }
  if (typeof s !== "object" || s === null || Array.isArray(s)) return null;
  const o = s as Record<string, unknown>;
  const str = (x: unknown) => (typeof x === "string" ? x : undefined);
  return {
    hostId: str(o.hostId),
    vpcId: str(o.vpcId),
    address: str(o.address),
    groupIds: Array.isArray(o.groupIds) ? o.groupIds.filter((g): g is string => typeof g === "string") : [],
  };
}

/** A binding's shared record as bindInSteps and unbindInSteps read it: what names other keys, checked for its form. */
interface StoredBinding {
  sig: string;
  host: string | null;
  vpc: string | null;
  groups: string[];
  groupsText: string;
  addr: string;
  bound: string;
}

function flat(obj: Record<string, string | number>): (string | number)[] {
  return Object.entries(obj).flat();
}

function pairs(a: string[]): Record<string, string> {
  const h: Record<string, string> = {};
  for (let i = 0; i + 1 < a.length; i += 2) h[a[i]] = a[i + 1];
  return h;
}

export type { BindingSpec } from "./schema.js";

function bindingSig(b: BindingSpec): string {
  const s: BindingSpec = {
    nicId: b.nicId,
    vpcId: b.vpcId,
    subnetId: b.subnetId,
    address: b.address,
    mac: b.mac,
    hostId: b.hostId,
    hostIf: b.hostIf,
    groupIds: b.groupIds,
  };
  if (b.dropLogging) s.dropLogging = { ratePerSecond: b.dropLogging.ratePerSecond, burst: b.dropLogging.burst };
  return JSON.stringify(s);
}

/** Peer group ids named by rules, sorted, once each. */
export function peersOf(rules: SgRule[]): string[] {
  return [...new Set(rules.flatMap((r) => (r.group ? [r.group] : [])))].sort();
}

export interface GroupChange {
  rules?: SgRule[];
  description?: string;
  /** null turns drop logging off; undefined leaves it. */
  dropLogging?: Logging | null;
}

export interface AclChange {
  entries?: AclEntry[];
  description?: string;
}

export type BindingIndex =
  { kind: "all" } | { kind: "host"; hostId: string } | { kind: "vpc"; vpcId: string } | { kind: "group"; groupId: string; vpcId: string };

/** The subset of a NIC loadVpcState needs when the caller lists the local NICs. */
export type LocalNic = Pick<BindingRec, "nicId" | "vpcId" | "subnetId" | "address" | "mac" | "hostIf"> & Partial<BindingRec>;

/** The hash field a refused record's reason names first, if the hash has it (for status). */
function namedField(h: Record<string, string>, p: V.Parsed<unknown>): string | undefined {
  if (p.ok) return undefined;
  const named = /^([A-Za-z_][A-Za-z0-9_]*)/.exec(p.reason)?.[1];
  return named !== undefined && Object.hasOwn(h, named) ? named : undefined;
}

/** Where a binding is: its "sig" field, and the VPC it names if that reads as a VPC id. */
function bindingWhere(sig: string): InvalidWhere {
  const vpcId = sigOf(sig)?.vpcId;
  return { field: "sig", vpcId: vpcId !== undefined && isId("vpc", vpcId) ? vpcId : undefined };
}

/** How many times a change is tried again when what it read changed before its script ran (a client token, a subnet's ACL, a group's peers). */
const TOKEN_ATTEMPTS = 5;
/** How long a member entry must stay unbacked before DeleteSecurityGroup removes it (a BindNic's steps take milliseconds). */
const UNBACKED_GRACE_MS = 1000;

export class FirewallStore {
  /** Where the groups' and ACLs' keys are (keys.ts FirewallKeys). */
  private readonly L: FirewallKeys;
  /** IPAM's keys the creates check (a VPC's record, its subnets'). */
  private readonly I: IpamKeys;

  /** log: where skipped records are reported (once per key and reason). */
  constructor(
    readonly redis: Redis,
    readonly log?: Pick<Logger, "warn">,
  ) {
    defineScripts(redis);
    this.L = fwKeys(redis);
    this.I = ipamKeys(redis);
  }

  /** The value of a record that parsed; otherwise reports it (logged and counted once) and gives null. */
  private ok<T>(kind: string, key: string, p: V.Parsed<T>, where?: () => InvalidWhere): T | null {
    if (p.ok) return p.value;
    reportInvalid(OWNER, kind, key, p.reason, this.log, where?.());
    return null;
  }

  /** HGETALL that reads a key holding something other than a hash as a bad record. */
  private async hash(kind: string, key: string): Promise<Record<string, string> | null> {
    try {
      return await this.redis.hgetall(key);
    } catch (err) {
      if (!/WRONGTYPE/.test((err as Error).message)) throw err;
      reportInvalid(OWNER, kind, key, "is not a hash", this.log);
      return null;
    }
  }

  private groupError(code: number, detail: string | number, field: string, vpcId: string): never {
    const [g, other] = String(detail).split(",");
    if (code === -3) throw new NotFoundError("security group", g, `${field} names it; it was deleted`);
    if (code === -5) throw new InvalidArgumentError(field, `security group ${g} belongs to VPC ${other}, not ${vpcId}; groups must be in the same VPC`);
    if (code === -4) throw new NotFoundError("vpc", vpcId, "it was deleted");
    throw new Error(`firewall script returned ${code} ${detail}`);
  }

  // ---- security groups ----

  /** The VPC of a group or ACL: on a cluster from the catalog (null if not there); on a single Redis "" (its keys do not name the VPC). */
  private async vpcOf(kind: "sg" | "acl", id: string): Promise<string | null> {
    return (await this.catalogEntry(kind, id))?.vpc ?? null;
  }

  /**
   * A cluster's catalog entry of a group or ACL, "<vpc>/<name>" (the name:
   * so that a delete stopped before its last step can remove the listing
   * entry when it is run again). On a single Redis {vpc: ""}.
   */
  /** A cluster's catalog (id → "<vpc>/<name>") and the listing of every VPC's, of groups or ACLs; [null, …] on a single Redis. */
  private catalogKeys(kind: "sg" | "acl"): [string | null, string] {
    return kind === "sg" ? [this.L.sgVpc, this.L.allSgs] : [this.L.aclVpc, this.L.allAcls];
  }

  private async catalogEntry(kind: "sg" | "acl", id: string): Promise<{ vpc: string; name: string } | null> {
    const [catalog] = this.catalogKeys(kind);
    if (!catalog) return { vpc: "", name: "" };
    const raw = await this.redis.hget(catalog, id);
    const cut = raw?.indexOf("/") ?? -1;
    const vpc = idOrNull("vpc", cut > 0 ? raw!.slice(0, cut) : null);
    return vpc ? { vpc, name: raw!.slice(cut + 1) } : null;
  }

  /**
   * On a cluster: a group's or ACL's catalog entry and its listing entry,
   * written before the VPC's step (a create refused or stopped leaves entries
   * whose record is not there, which lists skip and a delete of the id
   * removes), and removed after a delete.
   */
  private async catalogPut(kind: "sg" | "acl", id: string, vpc: string, name: string): Promise<void> {
    const [catalog, all] = this.catalogKeys(kind);
    if (!catalog) return;
    await this.redis.hset(catalog, id, `${vpc}/${name}`);
    await this.redis.zadd(all, 0, `${name}/${id}`);
  }

  /**
   * A create's script failed: its catalog entries go only if Redis refused
   * the script (a reply error) and the record is not there. A timeout or a
   * lost connection may follow a script that ran: its entries stay (an
   * entry without a record is skipped and removed by a delete of the id).
   */
  private async dropIfRefused(err: unknown, kind: "sg" | "acl", id: string, name: string, record: string): Promise<never> {
    if (err instanceof ReplyError && (await this.redis.exists(record).catch(() => 1)) === 0) await this.catalogDrop(kind, id, name).catch(() => undefined);
    throw err;
  }

  private async catalogDrop(kind: "sg" | "acl", id: string, name: string): Promise<void> {
    const [catalog, all] = this.catalogKeys(kind);
    if (!catalog) return;
    await this.redis.zrem(all, `${name}/${id}`);
    await this.redis.hdel(catalog, id);
  }

  /** What the client token names now in the VPC, as stored ("" if nothing; the caller builds a key from it only if it is an id). */
  private async tokenHolder(vpcId: string, kind: "sg" | "acl", clientToken: string): Promise<string> {
    if (!clientToken) return "";
    return (await this.redis.hget(this.L.tokens(vpcId), `${kind}\n${clientToken}`)) ?? "";
  }

  /** Creates a group; rules must be normalized and their peers resolved to ids. */
  async createGroup(
    g: Omit<SecurityGroupRec, "generation" | "createdMs" | "updatedMs" | "id"> & { id?: string },
    clientToken: string,
  ): Promise<{ group: SecurityGroupRec; created: boolean }> {
    const id = g.id ?? newId("sg");
    if (g.rules.length > MAX_RULES_PER_GROUP)
      throw new InvalidArgumentError("rules", `has ${g.rules.length} rules; a group holds at most ${MAX_RULES_PER_GROUP}`);
    const now = Date.now();
    const peers = peersOf(g.rules);
    const fields = {
      id,
      vpc: g.vpcId,
      name: g.name,
      description: g.description,
      labels: JSON.stringify(g.labels),
      rules: storedRulesText(g.rules),
      peers: peers.join(","),
      logging: storedLoggingText(g.dropLogging),
      gen: 1,
      created: now,
      updated: now,
    };
    const L = this.L;
    const v = g.vpcId;
    // On a cluster the catalog names the group's VPC before the group exists, so that it is found by id once it does.
    await this.catalogPut("sg", id, v, g.name);
    let reply: Reply | undefined;
    for (let attempt = 0; attempt < TOKEN_ATTEMPTS && (!reply || reply[0] === -9); attempt++) {
      const held = await this.tokenHolder(v, "sg", clientToken);
      const keys = [
        L.sg(v, id),
        this.I.vpc(v),
        L.tokens(v),
        L.sgByName(v),
        L.vpcSgs(v),
        L.gen(v),
        isId("sg", held) ? L.sg(v, held) : L.sg(v, id),
        ...peers.map((p) => L.sg(v, p)),
        ...peers.map((p) => L.sgRefBy(v, p)),
        ...(L.cluster ? [] : [L.allSgs]),
      ];
      reply = await this.redis
        .mvpcFwCreateSg(keys.length, ...keys, id, v, g.name, clientToken, peers.join(","), held, ...flat(fields))
        .catch((err: unknown) => this.dropIfRefused(err, "sg", id, g.name, L.sg(v, id)));
    }
    const [code, ref] = reply!;
    if (code !== 1) await this.catalogDrop("sg", id, g.name);
    if (code === -9) throw new AbortedError(`client token ${JSON.stringify(clientToken)} is being used by another create at the same time; retry`);
    if (code === -1)
      throw new AlreadyExistsError(
        `VPC ${g.vpcId} already has a security group named ${JSON.stringify(g.name)} (${ref}); pick another name or update that group`,
      );
    if (code < 0) this.groupError(code, ref, "rules", g.vpcId);
    const group = await this.getGroup(String(ref), v);
    if (!group) throw new NotFoundError("security group", String(ref), "it was deleted while being created");
    return { group, created: code === 1 };
  }

  /** A group by id; vpcId when the caller knows it (on a cluster the catalog is read otherwise). */
  async getGroup(id: string, vpcId?: string): Promise<SecurityGroupRec | null> {
    const v = vpcId ?? (await this.vpcOf("sg", id));
    if (v === null) return null;
    const key = this.L.sg(v, id);
    const h = await this.hash("security-group", key);
    if (!h || !Object.keys(h).length) return null;
    const g = this.ok("security-group", key, parseGroup(h, id));
    if (g && this.L.cluster && g.vpcId !== v) {
      reportInvalid(OWNER, "security-group", key, `names VPC ${g.vpcId}, but is kept under ${v}`, this.log, { field: "vpc", vpcId: v });
      return null;
    }
    return g;
  }

  async resolveGroup(vpcId: string, name: string): Promise<string | null> {
    return idOrNull("sg", await this.redis.hget(this.L.sgByName(vpcId), name));
  }

  /** NICs bound to each group, on every host. */
  async memberCounts(groups: { id: string; vpcId: string }[]): Promise<number[]> {
    return Promise.all(groups.map((g) => this.redis.hlen(this.L.sgMembers(g.vpcId, g.id))));
  }

  /** Groups ordered by name (then id), after the cursor "name/id". */
  async listGroups(vpcId: string | null, after: string, limit: number): Promise<SecurityGroupRec[]> {
    const key = vpcId ? this.L.vpcSgs(vpcId) : this.L.allSgs;
    // Reads on past entries whose record is gone (a create or delete stopped half-way on a cluster), so that a page is short only at the end.
    return pageOver(after, limit, async (cursor) => {
      const members = await this.redis.zrangebylex(key, cursor ? `(${cursor}` : "-", "+", "LIMIT", 0, limit);
      return { items: await Promise.all(members.map((m) => this.getGroup(m.slice(m.lastIndexOf("/") + 1), vpcId ?? undefined))), cursors: members };
    });
  }

  /**
   * Writes a change computed from the group at generation `fromGeneration`.
   * AbortedError if the group changed meanwhile (the caller re-reads and
   * recomputes, or reports ABORTED when the client asked for a generation).
   */
  async updateGroup(g: SecurityGroupRec, fromGeneration: number, change: GroupChange): Promise<SecurityGroupRec> {
    const fields: Record<string, string | number> = { updated: Date.now() };
    let peers = peersOf(g.rules);
    if (change.rules) {
      if (change.rules.length > MAX_RULES_PER_GROUP)
        throw new InvalidArgumentError("rules", `the group would have ${change.rules.length} rules; a group holds at most ${MAX_RULES_PER_GROUP}`);
      fields.rules = storedRulesText(change.rules);
      peers = peersOf(change.rules);
      fields.peers = peers.join(",");
    }
    if (change.description !== undefined) fields.description = change.description;
    if (change.dropLogging !== undefined) fields.logging = storedLoggingText(change.dropLogging);
    const L = this.L;
    const v = g.vpcId;
    // The peers as stored (their refby sets are left): the script refuses if they changed since.
    const storedPeers = (await this.redis.hget(L.sg(v, g.id), "peers")) ?? "";
    const old = storedPeers.split(",").filter(Boolean);
    if (!old.every((p) => isId("sg", p)))
      throw new FailedPreconditionError(`security group ${g.id}: its stored peers (${V.show(storedPeers)}) are not group ids; the record is damaged`);
    const keys = [L.sg(v, g.id), L.gen(v), ...old.map((p) => L.sgRefBy(v, p)), ...peers.map((p) => L.sg(v, p)), ...peers.map((p) => L.sgRefBy(v, p))];
    const [code, detail] = await this.redis.mvpcFwUpdateSg(keys.length, ...keys, g.id, v, storedPeers, fromGeneration, peers.join(","), ...flat(fields));
    if (code === -2) {
      throw new AbortedError(
        `security group ${g.name} (${g.id}) is at generation ${detail}, not ${fromGeneration}; it changed meanwhile: get it again and retry`,
      );
    }
    if (code === -4) throw new NotFoundError("security group", g.id, "it was deleted");
    if (code < 0) this.groupError(code, detail, "rules", g.vpcId);
    const after = await this.getGroup(g.id, v);
    if (!after) throw new NotFoundError("security group", g.id, "it was deleted");
    return after;
  }

  /** FailedPreconditionError while NICs are bound to it or other groups name it. */
  async deleteGroup(id: string): Promise<boolean> {
    const L = this.L;
    for (let attempt = 0; attempt < TOKEN_ATTEMPTS; attempt++) {
      const at = await this.catalogEntry("sg", id);
      if (at === null) return false;
      const v = at.vpc;
      const [vpc, peersCsv] = await this.redis.hmget(L.sg(v, id), "vpc", "peers");
      if (vpc === null || !isId("vpc", vpc) || (L.cluster && vpc !== v)) {
        // No record: a delete stopped before its last step on a cluster (or a create refused) left the catalog's entries.
        if ((await this.redis.exists(L.sg(v, id))) === 0) await this.catalogDrop("sg", id, at.name);
        return false;
      }
      const peers = (peersCsv ?? "").split(",").filter(Boolean);
      if (!peers.every((p) => isId("sg", p))) {
        throw new FailedPreconditionError(`security group ${id}: its stored peers (${V.show(peersCsv ?? "")}) are not group ids; the record is damaged`);
      }
      const keys = [
        L.sg(vpc, id),
        L.sgMembers(vpc, id),
        L.sgRefBy(vpc, id),
        L.sgByName(vpc),
        L.vpcSgs(vpc),
        L.gen(vpc),
        ...peers.map((p) => L.sgRefBy(vpc, p)),
        ...(L.cluster ? [] : [L.allSgs]),
      ];
      const [code, list, n] = await this.redis.mvpcFwDeleteSg(keys.length, ...keys, id, vpc, peersCsv ?? "");
      if (code === -8) continue;
      // Member entries no binding backs (a bind stopped between its steps on a cluster, or written by another host) do not hold the group.
      if (code === -1 && (await this.dropUnbackedMembers(vpc, id)) > 0) continue;
      const more = (n ?? 0) > 10 ? ` and ${(n ?? 0) - 10} more` : "";
      if (code === -1) {
        throw new FailedPreconditionError(
          `security group ${id} is still bound to ${n} NIC(s): ${String(list).split(",").join(", ")}${more}; unbind them or bind them to other groups first (microvpc sg bindings --group ${id})`,
        );
      }
      if (code === -2) {
        throw new FailedPreconditionError(
          `security group ${id} is named as peer by the rules of ${n} other group(s): ${String(list).split(",").join(", ")}${more}; remove those rules first`,
        );
      }
      // On a cluster the catalog goes after the VPC's step: a delete stopped between them is run again by id.
      if (code === 1) await this.catalogDrop("sg", id, String(list));
      return code === 1;
    }
    throw new AbortedError(`security group ${id} kept changing while being deleted; retry`);
  }

  /**
   * Removes the group's member entries whose NIC's binding does not name the
   * group in this VPC (its sig, as LOAD_VPC reads it); the number removed.
   * An entry is removed only if it still holds the address that was checked.
   */
  private async dropUnbackedMembers(vpc: string, id: string): Promise<number> {
    const key = this.L.sgMembers(vpc, id);
    const unbacked = async (): Promise<Map<string, string>> => {
      const entries = Object.entries((await this.hash("member", key)) ?? {});
      const sigs = await Promise.all(entries.map(([nic]) => (isId("nic", nic) ? this.redis.hget(this.L.nic(nic), "sig") : null)));
      const out = new Map<string, string>();
      entries.forEach(([nic, addr], i) => {
        const s = sigs[i] !== null ? sigOf(sigs[i]) : null;
        if (!(s && s.vpcId === vpc && s.groupIds.includes(id))) out.set(nic, addr);
      });
      return out;
    };
    const first = await unbacked();
    if (first.size === 0) return 0;
    // A BindNic under way writes the entry before the record that backs it (on a cluster): only an entry still unbacked a while later goes.
    await new Promise((r) => setTimeout(r, UNBACKED_GRACE_MS));
    const again = await unbacked();
    let n = 0;
    for (const [nic, addr] of again) {
      if (first.get(nic) !== addr) continue;
      n += Number(
        await this.redis.eval(
          "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0",
          1,
          key,
          nic,
          addr,
        ),
      );
    }
    return n;
  }

  // ---- NIC bindings ----

  /** Upgrade step at start (ADOPT_SIGS): this host's copy of each of its older bindings' sig; the number copied. */
  async adoptOwnSigs(hostId: string): Promise<number> {
    // A cluster has no binding older than the copies (it starts with this layout).
    if (this.L.cluster) return 0;
    return this.redis.mvpcFwAdoptSigs(FK.hostNics(hostId), hostId, FK.hostSigs(hostId));
  }

  /** Binds (or rebinds) a NIC; changed=false if the binding was already exactly so. */
  /** gen: the generation of the change's event, when there was one (FirewallSync.enforce waits on it). */
  async bind(b: BindingSpec): Promise<{ binding: BindingRec; changed: boolean; gen?: string }> {
    if (b.groupIds.length > MAX_GROUPS_PER_NIC) {
      throw new InvalidArgumentError("security_groups", `has ${b.groupIds.length} groups; a NIC can be in at most ${MAX_GROUPS_PER_NIC}`);
    }
    checkBinding(b);
    let changed: boolean;
    let gen: string | undefined;
    if (this.L.cluster) {
      ({ changed, gen } = await this.bindInSteps(b, bindingSig(b)));
    } else {
      const [code, detail] = await this.redis.mvpcFwBind(
        FK.nic(b.nicId),
        b.nicId,
        bindingSig(b),
        b.hostId,
        b.vpcId,
        b.subnetId,
        b.address,
        b.groupIds.join(","),
        Date.now(),
      );
      if (code < 0) this.groupError(code, detail, "security_groups", b.vpcId);
      changed = code === 1;
      if (changed) gen = String(detail);
    }
    const binding = await this.getBinding(b.nicId);
    if (!binding) throw new NotFoundError("binding", b.nicId, "it was removed while being made");
    return { binding, changed, ...(gen !== undefined ? { gen } : {}) };
  }

  /**
   * The shared record's fields that name other keys (its host, VPC and
   * groups), each checked for its form: a field that is not is left out, and
   * no key is built from it.
   */
  private async storedBinding(nicId: string): Promise<StoredBinding | null> {
    const [sig, host, vpc, groups, addr, bound] = await this.redis.hmget(this.L.nic(nicId), "sig", "host", "vpc", "groups", "addr", "bound");
    if (sig === null) return null;
    const gs = (groups ?? "").split(",").filter(Boolean);
    return {
      sig,
      host: host !== null && V.attempt(() => V.hostId("host", host)).ok ? host : null,
      vpc: idOrNull("vpc", vpc),
      groups: gs.every((g) => isId("sg", g)) ? gs : [],
      groupsText: groups ?? "",
      addr: addr ?? "",
      bound: bound ?? "",
    };
  }

  /**
   * BindNic on a cluster, one slot per step: the VPC's member indexes (and
   * the check that the groups are the VPC's), the host's indexes and sig
   * copy, then the shared record if it is still what was read (else all
   * again), then what the NIC left in another VPC or host, then the event.
   * Readers take a member entry or an index entry only where the record
   * vouches for it (LOAD_VPC's rules), so a step that is not yet followed by
   * the others opens nothing; until the record is written this host's sync
   * sees its copy differ and holds the NIC closed.
   */
  private async bindInSteps(b: BindingSpec, sig: string): Promise<{ changed: boolean; gen?: string }> {
    const L = this.L;
    const { nicId: nic, vpcId: v, hostId: h } = b;
    for (let attempt = 0; attempt < TOKEN_ATTEMPTS; attempt++) {
      const old = await this.storedBinding(nic);
      if (old?.sig === sig) {
        await this.redis.hset(L.hostSigs(h), nic, sig);
        return { changed: false };
      }
      // Every change counter the steps end with raises, checked before the first step writes (VPC_MEMBERS checks the new VPC's again).
      for (const vpc of new Set([v, ...(old?.vpc && old.vpc !== v ? [old.vpc] : [])])) await this.redis.mvpcFwCounterOk(1, L.gen(vpc));
      // A NIC moving from another host: that host's indexes first (under per-host users, NOPERM here stops the bind before it writes).
      if (old?.host && old.host !== h && old.vpc) await this.hostIndex(old.host, nic, "", old.vpc, "");
      const leave = old?.vpc === v ? old.groups : [];
      await this.vpcMembers(v, nic, b.address, leave, b.groupIds, true);
      const left = old?.host === h && old.vpc && old.vpc !== v ? old.vpc : "";
      await this.hostIndex(h, nic, sig, v, left);
      const now = Date.now();
      const fields = {
        sig,
        host: h,
        vpc: v,
        subnet: b.subnetId,
        addr: b.address,
        groups: b.groupIds.join(","),
        bound: old?.bound || now,
        updated: now,
      };
      const [code] = await this.redis.mvpcFwRecord(1, L.nic(nic), old?.sig ?? "", ...flat(fields));
      if (code === -8) continue;
      await this.redis.zadd(L.allNics, 0, nic);
      const extra: string[] = [];
      if (old) {
        extra.push("prev_groups", old.groupsText);
        if (old.host !== h && old.host) extra.push("prev_host", old.host);
        if (old.vpc && old.vpc !== v) {
          await this.vpcMembers(old.vpc, nic, "", old.groups, [], false);
          await this.bindingEvent("fw.binding.removed", old.vpc, nic, old.host ?? "", old.addr, old.groupsText);
        }
      }
      const gen = await this.bindingEvent("fw.binding.changed", v, nic, h, b.address, b.groupIds.join(","), extra);
      return { changed: true, gen };
    }
    throw new AbortedError(`the binding of ${nic} kept changing while it was being made; retry`);
  }

  /** A binding's event in its VPC's slot (cluster), with the VPC's next change count; the count. */
  private async bindingEvent(kind: string, vpc: string, nic: string, host: string, address: string, groups: string, extra: string[] = []): Promise<string> {
    return String(await this.redis.mvpcFwVpcEvent(1, this.L.gen(vpc), kind, vpc, "nic", nic, "host", host, "address", address, "groups", groups, ...extra));
  }

  private async vpcMembers(vpc: string, nic: string, addr: string, leave: string[], join: string[], list: boolean): Promise<void> {
    const L = this.L;
    const keys = [L.vpcNics(vpc), L.gen(vpc), ...leave.map((g) => L.sgMembers(vpc, g)), ...join.map((g) => L.sgMembers(vpc, g))];
    const [code, detail] = await this.redis.mvpcFwVpcMembers(
      keys.length,
      ...keys,
      nic,
      addr,
      leave.length,
      list ? "1" : "0",
      vpc,
      L.sg(vpc, ""),
      join.join(","),
    );
    if (code < 0) this.groupError(code, detail, "security_groups", vpc);
  }

  private async hostIndex(host: string, nic: string, sig: string, vpc: string, left: string): Promise<void> {
    const L = this.L;
    const keys = [L.hostNics(host), L.hostVpcs(host), L.hostSigs(host), L.hostVpcNics(host, vpc), L.hostVpcNics(host, left || vpc)];
    await this.redis.mvpcFwHostIndex(keys.length, ...keys, nic, sig, vpc, left);
  }

  /**
   * Removes the binding. removed=false if the NIC had none; gen: the
   * generation of the removal's event; vpcId and hostId: what the shared
   * record named (each checked for its form, else left out), so that
   * UnbindNic knows whether to wait for this host's kernel without a read
   * of its own.
   */
  async unbind(nicId: string): Promise<{ removed: boolean; gen?: string; vpcId?: string; hostId?: string }> {
    if (this.L.cluster) return this.unbindInSteps(nicId);
    const [code, vpc, gen, host] = (await this.redis.mvpcFwUnbind(FK.nic(nicId), nicId)) as unknown as [number, string, string?, string?];
    if (code !== 1) return { removed: false };
    const ok = (f: () => unknown) => V.attempt(f).ok;
    return {
      removed: true,
      gen: String(gen),
      ...(ok(() => V.id("vpc", vpc, "vpc")) ? { vpcId: vpc } : {}),
      ...(host && ok(() => V.hostId("host", host)) ? { hostId: host } : {}),
    };
  }

  /**
   * UnbindNic on a cluster: the VPC's and the host's indexes first (a retry
   * after a stop half-way finds the record and does them again), then the
   * record if it is still what was read, then the event.
   */
  private async unbindInSteps(nic: string): Promise<{ removed: boolean; gen?: string; vpcId?: string; hostId?: string }> {
    const L = this.L;
    for (let attempt = 0; attempt < TOKEN_ATTEMPTS; attempt++) {
      const old = await this.storedBinding(nic);
      if (!old) return { removed: false };
      if (old.vpc) await this.vpcMembers(old.vpc, nic, "", old.groups, [], false);
      // The host's copy before the record: a record without its copy is held closed on a cluster, and a retry after a stop here finds the record and does all again.
      if (old.host && old.vpc) await this.hostIndex(old.host, nic, "", old.vpc, "");
      const [code] = await this.redis.mvpcFwRecord(1, L.nic(nic), old.sig);
      if (code === -8) continue;
      await this.redis.zrem(L.allNics, nic);
      if (!old.vpc) return { removed: true, ...(old.host ? { hostId: old.host } : {}) };
      const gen = await this.bindingEvent("fw.binding.removed", old.vpc, nic, old.host ?? "", old.addr, old.groupsText);
      return { removed: true, gen, vpcId: old.vpc, ...(old.host ? { hostId: old.host } : {}) };
    }
    throw new AbortedError(`the binding of ${nic} kept changing while it was being removed; retry`);
  }

  async getBinding(nicId: string): Promise<BindingRec | null> {
    const [sig, bound, updated] = await this.redis.hmget(this.L.nic(nicId), "sig", "bound", "updated");
    return sig ? this.ok("binding", FK.nic(nicId), parseBinding(sig, bound, updated, nicId), () => bindingWhere(sig)) : null;
  }

  /** Bindings of the given NICs that exist, by nic id (one round trip on a single Redis; one per node on a cluster). */
  async bindingsOf(nicIds: string[]): Promise<Map<string, BindingRec>> {
    const out = new Map<string, BindingRec>();
    const rows = await Promise.all(nicIds.map((id) => this.redis.hmget(this.L.nic(id), "sig", "bound", "updated")));
    rows.forEach(([sig, bound, updated], i) => {
      const b = sig ? this.ok("binding", FK.nic(nicIds[i]), parseBinding(sig, bound, updated, nicIds[i]), () => bindingWhere(sig)) : null;
      if (b) out.set(nicIds[i], b);
    });
    return out;
  }

  /** Nic ids of one index, ordered, after the cursor. */
  async listBindingIds(index: BindingIndex, after: string, limit: number): Promise<string[]> {
    const L = this.L;
    if (index.kind === "group") {
      const ids = (await this.redis.hkeys(L.sgMembers(index.vpcId, index.groupId))).sort();
      return ids.filter((id) => id > after).slice(0, limit);
    }
    const key = index.kind === "host" ? L.hostNics(index.hostId) : index.kind === "vpc" ? L.vpcNics(index.vpcId) : L.allNics;
    return await this.redis.zrangebylex(key, after ? `(${after}` : "-", "+", "LIMIT", 0, limit);
  }

  /** VPC ids with at least one NIC bound on the host, sorted. */
  async vpcsWithBindingsOnHost(hostId: string): Promise<string[]> {
    return (await this.redis.smembers(this.L.hostVpcs(hostId))).sort();
  }

  // ---- network ACLs ----

  async createAcl(
    a: Omit<NetworkAclRec, "id" | "generation" | "createdMs" | "updatedMs">,
    clientToken: string,
  ): Promise<{ acl: NetworkAclRec; created: boolean }> {
    const id = newId("acl");
    const now = Date.now();
    const fields = {
      id,
      vpc: a.vpcId,
      name: a.name,
      description: a.description,
      labels: JSON.stringify(a.labels),
      entries: storedEntriesText(a.entries),
      gen: 1,
      created: now,
      updated: now,
    };
    const subnets = [...new Set(a.subnetIds)];
    const L = this.L;
    const v = a.vpcId;
    await this.catalogPut("acl", id, v, a.name);
    let reply: Reply | undefined;
    for (let attempt = 0; attempt < TOKEN_ATTEMPTS && (!reply || reply[0] === -9 || reply[0] === -8); attempt++) {
      const [held, prev] = await Promise.all([this.tokenHolder(v, "acl", clientToken), this.previousAcls(v, subnets)]);
      const keys = [
        L.acl(v, id),
        L.aclSubnets(v, id),
        this.I.vpc(v),
        L.tokens(v),
        L.aclByName(v),
        L.vpcAcls(v),
        L.gen(v),
        L.subnetAcl(v),
        isId("acl", held) ? L.acl(v, held) : L.acl(v, id),
        ...subnets.map((s) => this.I.subnetIn(v, s)),
        ...prev.keys,
        ...(L.cluster ? [] : [L.allAcls]),
      ];
      reply = await this.redis
        .mvpcFwCreateAcl(
          keys.length,
          ...keys,
          id,
          v,
          a.name,
          clientToken,
          subnets.join(","),
          now,
          held,
          prev.was.join(","),
          prev.keys.length / 2,
          ...flat(fields),
        )
        .catch((err: unknown) => this.dropIfRefused(err, "acl", id, a.name, L.acl(v, id)));
    }
    const [code, ref] = reply!;
    if (code !== 1) await this.catalogDrop("acl", id, a.name);
    if (code === -9 || code === -8)
      throw new AbortedError(`network ACL ${a.name}: its subnets' ACLs or its client token kept changing while it was created; retry`);
    if (code === -1)
      throw new AlreadyExistsError(`VPC ${a.vpcId} already has a network ACL named ${JSON.stringify(a.name)} (${ref}); pick another name or update that ACL`);
    if (code < 0) await this.subnetError(code, ref, "subnets", a.vpcId);
    const acl = await this.getAcl(String(ref), v);
    if (!acl) throw new NotFoundError("network ACL", String(ref), "it was deleted while being created");
    return { acl, created: code === 1 };
  }

  /**
   * What CREATE_ACL and ASSOCIATE take for the subnets' current ACLs: the
   * ACL each has now ('' for none; a value that is no ACL id counts as
   * none, as the script reads it too), and a hash and a subnets set per
   * ACL, in order of first appearance.
   */
  private async previousAcls(vpcId: string, subnetIds: string[]): Promise<{ was: string[]; keys: string[] }> {
    const now = subnetIds.length ? await this.redis.hmget(this.L.subnetAcl(vpcId), ...subnetIds) : [];
    const was = now.map((x) => (x !== null && isId("acl", x) ? x : ""));
    const keys = [...new Set(was)].filter(Boolean).flatMap((x) => [this.L.acl(vpcId, x), this.L.aclSubnets(vpcId, x)]);
    return { was, keys };
  }

  private async subnetError(code: number, detail: string | number, field: string, vpcId: string): Promise<never> {
    const [s, other] = String(detail).split(",");
    if (code === -4) throw new NotFoundError("vpc", vpcId, "it was deleted");
    if (code === -6) throw new InvalidArgumentError(field, `subnet ${s} belongs to VPC ${other}, not ${vpcId}; an ACL only applies to subnets of its VPC`);
    if (code === -7) {
      // On a cluster the script sees the VPC's subnets only: the record by id says whether it is another VPC's.
      const elsewhere = this.L.cluster ? idOrNull("vpc", await this.redis.hget(K.subnet(s), "vpc")) : null;
      if (elsewhere && elsewhere !== vpcId)
        throw new InvalidArgumentError(field, `subnet ${s} belongs to VPC ${elsewhere}, not ${vpcId}; an ACL only applies to subnets of its VPC`);
      throw new NotFoundError("subnet", s, "it was deleted");
    }
    throw new Error(`firewall script returned ${code} ${detail}`);
  }

  /** An ACL by id; vpcId when the caller knows it (on a cluster the catalog is read otherwise). */
  async getAcl(id: string, vpcId?: string): Promise<NetworkAclRec | null> {
    const v = vpcId ?? (await this.vpcOf("acl", id));
    if (v === null) return null;
    const key = this.L.acl(v, id);
    const [h, subnets] = await Promise.all([this.hash("network-acl", key), this.redis.smembers(this.L.aclSubnets(v, id)).catch(() => [] as string[])]);
    if (!h || !Object.keys(h).length) return null;
    const a = this.ok("network-acl", key, parseAcl(h, subnets, id));
    if (a && this.L.cluster && a.vpcId !== v) {
      reportInvalid(OWNER, "network-acl", key, `names VPC ${a.vpcId}, but is kept under ${v}`, this.log, { field: "vpc", vpcId: v });
      return null;
    }
    return a;
  }

  async resolveAcl(vpcId: string, name: string): Promise<string | null> {
    return idOrNull("acl", await this.redis.hget(this.L.aclByName(vpcId), name));
  }

  async listAcls(vpcId: string | null, after: string, limit: number): Promise<NetworkAclRec[]> {
    const key = vpcId ? this.L.vpcAcls(vpcId) : this.L.allAcls;
    return pageOver(after, limit, async (cursor) => {
      const members = await this.redis.zrangebylex(key, cursor ? `(${cursor}` : "-", "+", "LIMIT", 0, limit);
      return { items: await Promise.all(members.map((m) => this.getAcl(m.slice(m.lastIndexOf("/") + 1), vpcId ?? undefined))), cursors: members };
    });
  }

  /** As updateGroup: AbortedError if the ACL changed since fromGeneration. */
  async updateAcl(a: NetworkAclRec, fromGeneration: number, change: AclChange): Promise<NetworkAclRec> {
    const fields: Record<string, string | number> = { updated: Date.now() };
    if (change.entries) fields.entries = storedEntriesText(change.entries);
    if (change.description !== undefined) fields.description = change.description;
    const L = this.L;
    const v = a.vpcId;
    const keys = [L.acl(v, a.id), L.aclSubnets(v, a.id), L.gen(v)];
    const [code, detail] = await this.redis.mvpcFwUpdateAcl(keys.length, ...keys, a.id, v, fromGeneration, ...flat(fields));
    if (code === -2)
      throw new AbortedError(`network ACL ${a.name} (${a.id}) is at generation ${detail}, not ${fromGeneration}; it changed meanwhile: get it again and retry`);
    if (code === -4) throw new NotFoundError("network ACL", a.id, "it was deleted");
    const after = await this.getAcl(a.id, v);
    if (!after) throw new NotFoundError("network ACL", a.id, "it was deleted");
    return after;
  }

  /** FailedPreconditionError while subnets are associated. */
  async deleteAcl(id: string): Promise<boolean> {
    const L = this.L;
    const at = await this.catalogEntry("acl", id);
    if (at === null) return false;
    const raw = await this.redis.hget(L.acl(at.vpc, id), "vpc");
    const vpc = idOrNull("vpc", raw);
    if (vpc === null || (L.cluster && vpc !== at.vpc)) {
      if ((await this.redis.exists(L.acl(at.vpc, id))) === 0) await this.catalogDrop("acl", id, at.name);
      return false;
    }
    const keys = [L.acl(vpc, id), L.aclSubnets(vpc, id), L.aclByName(vpc), L.vpcAcls(vpc), L.gen(vpc), ...(L.cluster ? [] : [L.allAcls])];
    const [code, list, n] = await this.redis.mvpcFwDeleteAcl(keys.length, ...keys, id, vpc);
    if (code === -1) {
      const more = (n ?? 0) > 10 ? ` and ${(n ?? 0) - 10} more` : "";
      throw new FailedPreconditionError(
        `network ACL ${id} is still associated with ${n} subnet(s): ${String(list).split(",").join(", ")}${more}; disassociate them (or associate them with another ACL) first`,
      );
    }
    if (code === 1) await this.catalogDrop("acl", id, String(list));
    return code === 1;
  }

  /** Associates; returns whether anything changed and the subnet's previous ACL ('' if none). */
  async associate(aclId: string, vpcId: string, subnetId: string): Promise<{ changed: boolean; previous: string }> {
    const L = this.L;
    const v = vpcId;
    for (let attempt = 0; attempt < TOKEN_ATTEMPTS; attempt++) {
      const prev = await this.previousAcls(v, [subnetId]);
      const keys = [L.acl(v, aclId), L.aclSubnets(v, aclId), L.subnetAcl(v), L.gen(v), this.I.subnetIn(v, subnetId), ...prev.keys];
      const [code, p] = await this.redis.mvpcFwAssociate(keys.length, ...keys, aclId, v, subnetId, Date.now(), prev.was[0]);
      if (code === -8) continue;
      if (code === -4) throw new NotFoundError("network ACL", aclId, "it was deleted");
      if (code < 0) await this.subnetError(code, p, "subnet", vpcId);
      return { changed: code === 1, previous: String(p) };
    }
    throw new AbortedError(`subnet ${subnetId}: its network ACL kept changing while it was associated; retry`);
  }

  /** Returns the ACL the subnet had, or ''. */
  async disassociate(subnetId: string): Promise<string> {
    const L = this.L;
    // On a cluster the association is in the subnet's VPC, which its record by id names.
    const v = L.cluster ? idOrNull("vpc", await this.redis.hget(K.subnet(subnetId), "vpc")) : "";
    if (v === null) return "";
    for (let attempt = 0; attempt < TOKEN_ATTEMPTS; attempt++) {
      const raw = await this.redis.hget(L.subnetAcl(v), subnetId);
      if (raw === null) return "";
      // A value that is no ACL id is removed all the same; no ACL's keys are built from it.
      const prev = isId("acl", raw) ? raw : CLOSED_ACL;
      const vpc = L.cluster ? v : prev === CLOSED_ACL ? "" : (idOrNull("vpc", await this.redis.hget(L.acl(v, prev), "vpc")) ?? "");
      const keys = [L.subnetAcl(v), L.gen(vpc), L.acl(v, prev), L.aclSubnets(v, prev)];
      const [code, p] = await this.redis.mvpcFwDisassociate(keys.length, ...keys, subnetId, Date.now(), vpc, raw);
      if (code === -8) continue;
      return code === 1 ? String(p) : "";
    }
    throw new AbortedError(`subnet ${subnetId}: its network ACL kept changing while it was disassociated; retry`);
  }

  /** The ACL of each subnet (null if none), by the VPC each is in. */
  async aclsOfSubnets(subnets: { vpcId: string; subnetId: string }[]): Promise<(string | null)[]> {
    return Promise.all(subnets.map((s) => this.redis.hget(this.L.subnetAcl(s.vpcId), s.subnetId)));
  }

  // ---- what a hypervisor compiles ----

  /**
   * Everything one hypervisor needs to compile one VPC, read in one atomic
   * snapshot. `nics` are the VPC's NICs on this host (e.g. from netagent's
   * desired state); each gets its binding's groups, drop logging and times
   * from the snapshot (groupIds [] if unbound), the rest as given. Without
   * `nics`, the NICs bound on this host in the VPC are used as bound.
   * `acls` is keyed by subnet id: the subnets given plus the NICs' subnets.
   * `members` holds, for every group named as peer, its members' addresses
   * on every host (sorted, once each).
   */
  async loadVpcState(
    hostId: string,
    vpcId: string,
    subnets: { subnetId: string; cidr: string; bridge: string }[],
    nics?: LocalNic[],
    /**
     * A delta (FirewallSync): `nics` are only the NICs that changed; the
     * members of the peer groups in `held` are read too where those NICs'
     * groups or `touched` name them.
     */
    delta?: { held: string[]; touched: string[] },
  ): Promise<VpcFirewallState> {
    const subnetIds = [...new Set([...subnets.map((s) => s.subnetId), ...(nics ?? []).map((n) => n.subnetId)])];
    const nicIds = nics ? nics.map((n) => n.nicId) : "*";
    const raw: RawVpcState = this.L.cluster
      ? await this.loadInSteps(hostId, vpcId, nicIds, subnetIds, delta)
      : ((await this.redis.mvpcFwLoadVpc(
          FK.hostVpcNics(hostId, vpcId),
          nicIds === "*" ? "*" : nicIds.join(","),
          subnetIds.join(","),
          hostId,
          vpcId,
          ...(delta ? [delta.held.join(","), delta.touched.join(",")] : []),
        )) as RawVpcState);
    // Fail closed: what a refused record governed is denied, not opened. A
    // NIC whose binding is refused, and a group that is refused, become the
    // empty group CLOSED_GROUP (nothing allowed either way); a refused ACL
    // becomes an ACL without entries (the subnet's default deny).
    const refusedBinding = new Set<string>();
    const [rawNics, rawGroups, rawMembers, rawAcls, wrongType, refusedMembers, rawVpn] = raw;
    for (const key of wrongType ?? []) reportInvalid(OWNER, "key", key, "holds another Redis type than its schema says", this.log, { vpcId });
    // Member entries no host vouches for (docs/redis-acl.md): left out, so
    // "from group G" admits only addresses G's members' own hosts stand for.
    for (const [gid, nic, addr, why] of refusedMembers ?? []) {
      reportInvalid(OWNER, "member", FK.sgMembers(gid), `${V.show(nic)} at ${V.show(addr)}: ${why}`, this.log, { field: nic, vpcId });
    }

    // A binding, group, member or ACL that does not validate is skipped (a
    // NIC whose binding is bad is compiled as unbound); the rest converges.
    const bound = new Map<string, BindingRec>();
    for (const [nic, sig, b, u, own] of rawNics) {
      // Another host may have rewritten the shared record (docs/redis-acl.md):
      // refused unless it is what this host bound. No copy: a binding from
      // before the copy existed, taken as it is (BindNic makes the copy).
      // On a cluster there is no binding from before the copies: no copy is refused too (a step of BindNic or UnbindNic not yet followed by the next).
      if ((own !== null || this.L.cluster) && own !== sig) {
        reportInvalid(OWNER, "binding", FK.nic(nic), `differs from this host's own copy in ${FK.hostSigs(hostId)}: rewritten by someone else`, this.log, {
          field: "sig",
          vpcId: bindingWhere(sig).vpcId ?? vpcId,
        });
        refusedBinding.add(nic);
        continue;
      }
      const rec = this.ok("binding", FK.nic(nic), parseBinding(sig, b, u, nic), () => ({ field: "sig", vpcId: bindingWhere(sig).vpcId ?? vpcId }));
      if (rec) bound.set(nic, rec);
      else refusedBinding.add(nic);
    }
    let out: BindingRec[];
    if (nics) {
      out = nics.map((n) => {
        const b = bound.get(n.nicId);
        const rec: BindingRec = {
          nicId: n.nicId,
          vpcId: n.vpcId,
          subnetId: n.subnetId,
          address: n.address,
          mac: n.mac,
          hostId,
          hostIf: n.hostIf,
          groupIds: refusedBinding.has(n.nicId) ? [CLOSED_GROUP] : (b?.groupIds ?? []),
          boundMs: b?.boundMs ?? 0,
          updatedMs: b?.updatedMs ?? 0,
        };
        if (b?.dropLogging) rec.dropLogging = b.dropLogging;
        return rec;
      });
    } else {
      out = [...bound.values()];
    }
    out.sort((a, b) => (a.nicId < b.nicId ? -1 : a.nicId > b.nicId ? 1 : 0));

    const groups = new Map<string, SecurityGroupRec>();
    for (const [gid, ...h] of rawGroups) {
      const gh = pairs(h);
      const pg = parseGroup(gh, gid);
      const g = this.ok("security-group", FK.sg(gid), pg, () => ({ field: namedField(gh, pg), vpcId }));
      if (g) groups.set(g.id, g);
      else if (SG_ID.test(gid)) groups.set(gid, closedGroup(gid, vpcId));
    }
    if (refusedBinding.size) groups.set(CLOSED_GROUP, closedGroup(CLOSED_GROUP, vpcId));
    for (const key of wrongType ?? []) {
      const m = /^mvpc:(?:\{vpc-[0-9a-f]{12}\}:)?fw:sg:(sg-[0-9a-f]{12})$/.exec(key);
      if (m && !groups.has(m[1])) groups.set(m[1], closedGroup(m[1], vpcId));
    }
    // A group a binding names that is not there (deleted while a bind was under way on a cluster, or damaged) allows
    // nothing: the NIC is not left in fewer groups (with none, its egress would be open).
    for (const b of out) {
      for (const g of b.groupIds) {
        if (groups.has(g)) continue;
        reportInvalid(OWNER, "binding", FK.nic(b.nicId), `names security group ${g}, which is not there: it allows nothing`, this.log, { field: "sig", vpcId });
        groups.set(g, closedGroup(g, vpcId));
      }
    }
    const members = new Map<string, string[]>();
    const clients = this.vpnClientMembers(vpcId, rawVpn ?? null, subnets);
    for (const [gid, ...kv] of rawMembers) {
      const addrs = new Set<string>();
      for (let i = 1; i < kv.length; i += 2) {
        const a = this.ok("member", FK.sgMembers(gid), parseMember(kv[i - 1], kv[i]), () => ({ field: kv[i - 1], vpcId }));
        if (a !== null) addrs.add(a);
      }
      for (const a of clients.get(gid) ?? []) addrs.add(a);
      members.set(gid, [...addrs].sort(compareIp));
    }
    const acls = new Map<string, NetworkAclRec>();
    for (const [subnetId, h, subs] of rawAcls) {
      if (h.length === 0) {
        reportInvalid(
          OWNER,
          "network-acl",
          this.L.subnetAcl(vpcId),
          "names an ACL that is not there: the subnet denies everything until it is disassociated",
          this.log,
          {
            field: subnetId,
            vpcId,
          },
        );
        acls.set(subnetId, closedAcl(subnetId, vpcId));
        continue;
      }
      const hh = pairs(h);
      const pa = parseAcl(hh, subs);
      const a = this.ok("network-acl", FK.acl(String(hh.id)), pa, () => ({ field: namedField(hh, pa), vpcId }));
      acls.set(subnetId, a ?? closedAcl(subnetId, vpcId));
    }
    return { vpcId, subnets, nics: out, groups, members, acls };
  }

  /**
   * LOAD_VPC's snapshot on a cluster, where the keys it reads are in several
   * slots (the host's, the VPC's, each NIC's record, each member's host):
   * the same reads and the same rules for member entries, from here, one
   * round of commands per step. It is not one atomic snapshot: a change
   * between two steps is followed by its event, and the pass it starts reads
   * again. A key of another type than its schema is named in `bad`, as the
   * script's.
   */
  private async loadInSteps(
    hostId: string,
    vpcId: string,
    nicIds: string[] | "*",
    subnetIds: string[],
    delta?: { held: string[]; touched: string[] },
  ): Promise<RawVpcState> {
    const L = this.L;
    const bad: string[] = [];
    const get = async <T>(key: string, f: (k: string) => Promise<T>): Promise<T | null> => {
      try {
        return await f(key);
      } catch (err) {
        if (!/WRONGTYPE/.test((err as Error).message)) throw err;
        bad.push(key);
        return null;
      }
    };
    const ids = nicIds === "*" ? ((await get(L.hostVpcNics(hostId, vpcId), (k) => this.redis.smembers(k))) ?? []) : nicIds;
    const mine = new Map<string, string>();
    if (ids.length) {
      const own = await get(L.hostSigs(hostId), (k) => this.redis.hmget(k, ...ids));
      own?.forEach((x, i) => x !== null && mine.set(ids[i], x));
    }
    const recs = await Promise.all(ids.map((nic) => get(L.nic(nic), (k) => this.redis.hmget(k, "sig", "bound", "updated"))));
    const rawNics: RawVpcState[0] = [];
    const used = new Set<string>();
    recs.forEach((b, i) => {
      if (b?.[0] == null) {
        // No record, but this host holds a copy: removed by someone else (UnbindNic removes the copy first). Held closed, as LOAD_VPC does.
        const own = mine.get(ids[i]);
        if (own !== undefined) rawNics.push([ids[i], "", null, null, own]);
        return;
      }
      rawNics.push([ids[i], b[0], b[1], b[2], mine.get(ids[i]) ?? null]);
      for (const g of sigOf(b[0])?.groupIds ?? []) used.add(g);
    });
    // Group ids come from records any host may write: only ids build keys.
    const groupIds = (xs: Iterable<string>) => [...xs].filter((g) => isId("sg", g));
    const groups = new Map<string, Record<string, string> | null>();
    const load = async (gs: string[]) => {
      const todo = gs.filter((g) => !groups.has(g));
      const hs = await Promise.all(todo.map((g) => get(L.sg(vpcId, g), (k) => this.redis.hgetall(k))));
      todo.forEach((g, i) => groups.set(g, hs[i]));
    };
    await load(groupIds(used));
    const peers = new Set<string>();
    for (const g of groupIds(used)) for (const p of (groups.get(g)?.peers ?? "").split(",").filter(Boolean)) peers.add(p);
    const touched = new Set([...(delta?.touched ?? []), ...used]);
    for (const p of delta?.held ?? []) if (touched.has(p)) peers.add(p);
    const peerIds = groupIds(peers);
    await load(peerIds);
    const memberHashes = await Promise.all(peerIds.map((p) => get(L.sgMembers(vpcId, p), (k) => this.redis.hgetall(k))));
    // A member entry (shared: any host may write it) counts only where the NIC's own host vouches for it (LOAD_VPC's member_problem).
    const entries = peerIds.flatMap((p, i) => Object.entries(memberHashes[i] ?? {}).map(([nic, addr]) => ({ p, nic, addr })));
    const memberNics = [...new Set(entries.map((e) => e.nic))];
    const bindings = new Map<string, (string | null)[] | null>();
    const rows = await Promise.all(memberNics.map((nic) => get(L.nic(nic), (k) => this.redis.hmget(k, "sig", "host"))));
    memberNics.forEach((nic, i) => bindings.set(nic, rows[i]));
    const validHost = (h: string | null | undefined): h is string => typeof h === "string" && /^[a-z0-9-]+$/.test(h);
    const na = naKeys(this.redis);
    const vouched = await Promise.all(
      entries.map(async ({ p, nic, addr }) => {
        const b = bindings.get(nic);
        if (!b?.[0]) return "has no binding";
        const h = b[1];
        if (!validHost(h)) return "names no valid host";
        const [copy, listed, local] = await Promise.all([
          get(L.hostSigs(h), (k) => this.redis.hget(k, nic)),
          get(na.nicaddr(h), (k) => this.redis.hget(k, `${vpcId}/${addr}`)),
          hostId && h !== hostId ? get(na.nicaddr(hostId), (k) => this.redis.hget(k, `${vpcId}/${addr}`)) : null,
        ]);
        if (copy !== b[0]) return `its host ${h} holds no such binding`;
        // The sig, which that copy vouches for, says where and in which groups the NIC is (the record's other fields are anyone's).
        const sig = sigOf(b[0]);
        if (!sig) return "has a sig that is not JSON";
        if (sig.hostId !== h) return "its sig names another host";
        if (sig.vpcId !== vpcId) return "is bound in another VPC";
        if (sig.address !== addr) return "is bound with another address";
        if (!sig.groupIds.includes(p)) return "is not bound to this group";
        if (listed !== nic) return `its host ${h} lists no such NIC at that address`;
        if (local !== null) return "the address is a NIC of this host";
        return null;
      }),
    );
    const byGroup = new Map(peerIds.map((p) => [p, [p]]));
    const refused: RawVpcState[5] = [];
    entries.forEach((e, i) => {
      const why = vouched[i];
      if (why) refused.push([e.p, e.nic, e.addr, why]);
      else byGroup.get(e.p)!.push(e.nic, e.addr);
    });
    const rawMembers: RawVpcState[2] = [...byGroup.values()];
    let vpn: RawVpcState[6] = null;
    if (peerIds.length && vpcId) {
      const [cidr, ep, clients] = await Promise.all([
        get(this.I.vpc(vpcId), (k) => this.redis.hget(k, "cidr")),
        get(vpnKeysOf(this.redis).ep(vpcId), (k) => this.redis.hgetall(k)),
        get(vpnKeysOf(this.redis).clients(vpcId), (k) => this.redis.hgetall(k)),
      ]);
      vpn = [cidr ?? "", Object.entries(ep ?? {}).flat(), Object.entries(clients ?? {}).flat()];
    }
    const aclOf = subnetIds.length ? ((await get(L.subnetAcl(vpcId), (k) => this.redis.hmget(k, ...subnetIds))) ?? []) : [];
    const rawAcls: RawVpcState[3] = [];
    await Promise.all(
      subnetIds.map(async (s, i) => {
        const a = aclOf[i];
        if (a === null) return;
        // Named but not there (not an id, or deleted between this read and the last): the subnet's ACL denies everything until the next pass.
        if (!isId("acl", a)) return void rawAcls.push([s, [], []]);
        const [h, subs] = await Promise.all([get(L.acl(vpcId, a), (k) => this.redis.hgetall(k)), get(L.aclSubnets(vpcId, a), (k) => this.redis.smembers(k))]);
        rawAcls.push([s, h && Object.keys(h).length ? Object.entries(h).flat() : [], subs ?? []]);
      }),
    );
    const rawGroups: RawVpcState[1] = [];
    for (const [g, h] of groups) if (h && Object.keys(h).length) rawGroups.push([g, ...Object.entries(h).flat()]);
    return [rawNics, rawGroups, rawMembers, rawAcls, bad, refused, vpn];
  }

  /**
   * The VPC's VPN clients by group id (a client is a member of its groups
   * for other groups' rules, as a NIC is): each record parsed with the VPN's
   * own validators against its endpoint's client range. A client that does
   * not validate, or whose address falls in a subnet of this host, is left
   * out (reported): it is admitted by no "from group" rule.
   */
  private vpnClientMembers(vpcId: string, raw: [string, string[], string[]] | null, subnets: { cidr: string }[]): Map<string, string[]> {
    const out = new Map<string, string[]>();
    if (!raw || raw[1].length === 0) return out;
    const [vpcCidr, epKv, clientKv] = raw;
    const ep = parseVpnEndpoint(pairs(epKv), vpcCidr, null);
    if (!ep.ok || ep.value.vpcId !== vpcId) {
      reportInvalid(OWNER, "vpn-endpoint", vpnKeysOf(this.redis).ep(vpcId), ep.ok ? "names another VPC" : ep.reason, this.log, { vpcId });
      return out;
    }
    const range = V.cidr("client_cidr", ep.value.clientCidr, { min: 0, max: 32 });
    const local = subnets.flatMap((s) => {
      const c = V.attempt(() => V.cidr("cidr", s.cidr, { min: 0, max: 32 }));
      return c.ok ? [c.value] : [];
    });
    for (let i = 0; i + 1 < clientKv.length; i += 2) {
      const p = parseVpnClient(clientKv[i + 1], vpcId, range);
      const c = p.ok ? p.value : null;
      const a = c ? V.ipToInt(c.address) : 0;
      const why = !p.ok
        ? p.reason
        : c!.name !== clientKv[i]
          ? `entry ${V.show(clientKv[i])} holds ${c!.name}`
          : local.some((s) => a >= s.base && a < s.base + s.size)
            ? `${c!.address} is in a subnet`
            : "";
      if (why) {
        reportInvalid(OWNER, "vpn-client", vpnKeysOf(this.redis).clients(vpcId), why, this.log, { field: clientKv[i], vpcId });
        continue;
      }
      for (const g of c!.groupIds) out.set(g, [...(out.get(g) ?? []), c!.address]);
    }
    return out;
  }
}

const SG_ID = /^sg-[0-9a-f]{12}$/;
/** The group a NIC whose binding was refused is put in: no rules, so nothing passes. */
export const CLOSED_GROUP = "sg-000000000000";
/** The id of the ACL a refused ACL record stands as (denies everything); no ACL is made with it. */
const CLOSED_ACL = "acl-000000000000";

function closedGroup(id: string, vpcId: string): SecurityGroupRec {
  return {
    id,
    vpcId,
    name: "refused-record",
    description: "stands for a record that did not validate: allows nothing",
    labels: [],
    rules: [],
    generation: 0,
    createdMs: 0,
    updatedMs: 0,
  };
}

function closedAcl(subnetId: string, vpcId: string): NetworkAclRec {
  return {
    id: CLOSED_ACL,
    vpcId,
    name: "refused-record",
    description: "stands for a record that did not validate: denies everything",
    labels: [],
    entries: [],
    subnetIds: [subnetId],
    generation: 0,
    createdMs: 0,
    updatedMs: 0,
  };
}

function compareIp(a: string, b: string): number {
  const n = (s: string) => s.split(".").reduce((acc, x) => acc * 256 + Number(x), 0);
  return n(a) - n(b);
}
