// FirewallService, control-plane half: security groups, NIC bindings,
// network ACLs and rule parsing. Every handler validates the whole request
// first (rules.ts), resolves references through IPAM's catalog, then makes
// exactly one atomic change through FirewallStore, whose script also appends
// the change event every hypervisor's sync loop follows. GetFirewallStatus
// (read back from the kernel) lives with the sync loop, not here.
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { ServiceImpl } from "@connectrpc/connect";
import { InvalidArgumentError, NotFoundError, UnavailableError } from "../common/errors.js";
import { checkHostId } from "../common/host.js";
import { decodeNameToken, encodePageToken } from "../common/paging.js";
import * as V from "../common/validate.js";
import { ResourceState } from "../../gen/microvpc/v1/common_pb.js";
import {
  AclAction,
  Direction,
  DropLoggingSchema,
  FirewallService,
  NetworkAclSchema,
  NicBindingSchema,
  SecurityGroupSchema,
  type DropLogging,
  type NetworkAcl,
  type NicBinding,
  type SecurityGroup,
  type SecurityGroupRule,
} from "../../gen/microvpc/v1/firewall_pb.js";
import type { IpamReader, SubnetRec, VpcRec } from "../ipam/schema.js";
import type { FlowLogConfigRpcs } from "./flowlog-service.js";
import { HostReader } from "../netagent/schema.js";
import { MAX_GROUPS_PER_NIC, type BindingRec, type EnforcedChange, type NetworkAclRec, type SecurityGroupRec, type SgRule } from "./model.js";
import {
  MAX_ACL_ENTRIES,
  MAX_ACL_RULE_NUMBER,
  aclKey,
  checkRuleCount,
  normalizeRules,
  parseRuleText,
  parseVpcctlPolicy,
  ruleKey,
  sortAcl,
  validateAclEntries,
  validateSgRule,
  type SgRuleDraft,
  aclEntryMsg,
  sgRuleMsg,
} from "./rules.js";
import { loggingLimits } from "./schema.js";
import { AbortedError, FirewallStore, newId, type BindingIndex, type BindingSpec } from "./store.js";

const SG_ID_RE = /^sg-[0-9a-f]{12}$/;
const MAX_RULE_TEXTS = 10_000;
/** Tries of a read-compute-write that keeps losing races, when the client did not pin a generation. */
const CAS_ATTEMPTS = 20;

/** A short random pause before retrying a lost race, so contenders spread out. */
function backoff(attempt: number): Promise<void> {
  return new Promise((r) => setTimeout(r, Math.random() * Math.min(attempt, 10) * 2));
}

export interface FirewallApiOptions {
  /** This hypervisor's id: BindNic records it as the NIC's host. */
  hostId: string;
  /**
   * Resolves when this host's kernel enforces what Redis holds for a VPC
   * (FirewallSync.enforce): BindNic and UnbindNic return only then, so a
   * VM's network is closed or open as asked when the call returns.
   */
  enforce?: (vpcId: string, change: EnforcedChange) => Promise<void>;
}

type Logging = { ratePerSecond: number; burst: number };

// ---------- messages ----------

function loggingMsg(l: Logging | undefined): DropLogging | undefined {
  return l ? create(DropLoggingSchema, { enabled: true, ratePerSecond: l.ratePerSecond, burst: l.burst }) : undefined;
}

function groupMsg(g: SecurityGroupRec, memberCount: number): SecurityGroup {
  return create(SecurityGroupSchema, {
    id: g.id,
    vpcId: g.vpcId,
    name: g.name,
    description: g.description,
    labels: g.labels,
    rules: g.rules.map(sgRuleMsg),
    dropLogging: loggingMsg(g.dropLogging) ?? create(DropLoggingSchema, { enabled: false }),
    state: ResourceState.AVAILABLE,
    generation: BigInt(g.generation),
    memberCount,
    createTime: timestampFromMs(g.createdMs),
    updateTime: timestampFromMs(g.updatedMs),
  });
}

function aclMsg(a: NetworkAclRec): NetworkAcl {
  return create(NetworkAclSchema, {
    id: a.id,
    vpcId: a.vpcId,
    name: a.name,
    description: a.description,
    labels: a.labels,
    entries: a.entries.map(aclEntryMsg),
    subnetIds: a.subnetIds,
    state: ResourceState.AVAILABLE,
    generation: BigInt(a.generation),
    createTime: timestampFromMs(a.createdMs),
    updateTime: timestampFromMs(a.updatedMs),
  });
}

function bindingMsg(b: BindingRec, aclId: string | null): NicBinding {
  return create(NicBindingSchema, {
    nicId: b.nicId,
    vpcId: b.vpcId,
    subnetId: b.subnetId,
    address: b.address,
    mac: b.mac,
    hostId: b.hostId,
    hostInterface: b.hostIf,
    securityGroupIds: b.groupIds,
    networkAclId: aclId ?? "",
    dropLogging: loggingMsg(b.dropLogging),
    bindTime: timestampFromMs(b.boundMs),
    updateTime: timestampFromMs(b.updatedMs),
  });
}

// ---------- small validators ----------

/** undefined: not given; null: given with enabled=false; else the settings with defaults. */
function dropLogging(field: string, d: DropLogging | undefined): Logging | null | undefined {
  if (!d) return undefined;
  if (!d.enabled) {
    if (d.ratePerSecond !== undefined || d.burst !== undefined) {
      throw new InvalidArgumentError(`${field}.enabled`, "is false while a rate or burst is set; set enabled to log drops, or leave rate and burst unset");
    }
    return null;
  }
  const rate = d.ratePerSecond ?? 5;
  return loggingLimits(field, rate, d.burst ?? rate);
}

const ifname = V.ifname;

function ruleList(field: string, msgs: SecurityGroupRule[]): SgRuleDraft[] {
  checkRuleCount(field, msgs.length);
  return msgs.map((m, i) => validateSgRule(`${field}[${i}]`, m));
}

function same<T>(a: T, b: T): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

export class FirewallApi {
  private readonly host: HostReader;

  constructor(
    readonly store: FirewallStore,
    readonly ipam: IpamReader,
    readonly opts: FirewallApiOptions,
  ) {
    checkHostId("host id", opts.hostId);
    this.host = new HostReader(store.redis, opts.hostId);
  }

  // ---------- references ----------

  /**
   * The id a delete's ref names (an id, or a name within vpc), or null when
   * nothing by that name exists: deletes of what is gone succeed.
   */
  /** Waits until this host's kernel has the binding change of nicId (see FirewallApiOptions.enforce). */
  private async enforced(nicId: string, vpcId: string, what: "bind" | "unbind", gen?: string, leaving = false): Promise<void> {
    if (!this.opts.enforce) return;
    try {
      await this.opts.enforce(vpcId, { nicId, gen, leaving });
    } catch (err) {
      const meanwhile =
        what === "bind" ? "until it does, the NIC's traffic stays blocked" : "until it does, the kernel still applies the old binding's security groups";
      throw new UnavailableError(
        `the ${what === "bind" ? "binding" : "removal of the binding"} of ${nicId} is stored, but this host's firewall has not applied it: ${(err as Error).message}; it keeps retrying, and ${meanwhile}. Call again to wait for it`,
      );
    }
  }

  /** A BindNic group: its id, if it is a group of the VPC. */
  private async bindGroup(ref: string, i: number, vpc: VpcRec): Promise<string> {
    const f = `security_groups[${i}]`;
    const r = V.ref(f, ref, "sg");
    const id = r.id ?? (await this.store.resolveGroup(vpc.id, r.name!));
    const g = id ? await this.store.getGroup(id) : null;
    if (!g) throw new NotFoundError("security group", ref, `${f}: VPC ${vpc.name} has no such group`);
    if (g.vpcId !== vpc.id) {
      throw new InvalidArgumentError(
        f,
        `security group ${g.name} (${g.id}) belongs to VPC ${g.vpcId}, not ${vpc.name} (${vpc.id}); a NIC can only be in groups of its VPC`,
      );
    }
    return g.id;
  }

  private async idOfRef(
    ref: string,
    vpcRef: string,
    prefix: string,
    what: string,
    byName: (vpcId: string, name: string) => Promise<string | null>,
  ): Promise<string | null> {
    const r = V.ref("ref", ref, prefix);
    if (r.id) return r.id;
    if (vpcRef === "") throw new InvalidArgumentError("vpc", `is required when the ${what} is given by name`);
    const vpcId = await this.ipam.resolveVpc(V.ref("vpc", vpcRef, "vpc"));
    return vpcId ? byName(vpcId, r.name!) : null;
  }

  private async vpc(field: string, ref: string): Promise<VpcRec> {
    const id = await this.ipam.resolveVpc(V.ref(field, ref, "vpc"));
    const v = id ? await this.ipam.getVpc(id) : null;
    if (!v) throw new NotFoundError("vpc", ref, "list VPCs with `microvpc vpc list`");
    return v;
  }

  /** A subnet of the VPC, by id or name. */
  private async subnet(field: string, ref: string, vpc: VpcRec): Promise<SubnetRec> {
    const r = V.ref(field, ref, "subnet");
    const id = await this.ipam.resolveSubnet(r, vpc.id);
    const s = id ? await this.ipam.getSubnet(id) : null;
    if (!s) throw new NotFoundError("subnet", ref, `VPC ${vpc.name} has no such subnet`);
    if (s.vpcId !== vpc.id) throw new InvalidArgumentError(field, `subnet ${s.name} (${s.id}) belongs to VPC ${s.vpcId}, not ${vpc.name} (${vpc.id})`);
    return s;
  }

  /** A group by id, or by name with vpc; null if there is none. */
  private async findGroup(field: string, ref: string, vpcRef: string): Promise<SecurityGroupRec | null> {
    const r = V.ref(field, ref, "sg");
    if (r.id) return this.store.getGroup(r.id);
    if (vpcRef === "") throw new InvalidArgumentError("vpc", "is required when the security group is given by name");
    const vpcId = await this.ipam.resolveVpc(V.ref("vpc", vpcRef, "vpc"));
    if (!vpcId) throw new NotFoundError("vpc", vpcRef, "list VPCs with `microvpc vpc list`");
    const id = await this.store.resolveGroup(vpcId, r.name!);
    return id ? this.store.getGroup(id) : null;
  }

  private async group(field: string, ref: string, vpcRef: string): Promise<SecurityGroupRec> {
    const g = await this.findGroup(field, ref, vpcRef);
    if (!g) throw new NotFoundError("security group", ref, "list groups with `microvpc sg list`");
    return g;
  }

  private async findAcl(field: string, ref: string, vpcRef: string): Promise<NetworkAclRec | null> {
    const r = V.ref(field, ref, "acl");
    if (r.id) return this.store.getAcl(r.id);
    if (vpcRef === "") throw new InvalidArgumentError("vpc", "is required when the network ACL is given by name");
    const vpcId = await this.ipam.resolveVpc(V.ref("vpc", vpcRef, "vpc"));
    if (!vpcId) throw new NotFoundError("vpc", vpcRef, "list VPCs with `microvpc vpc list`");
    const id = await this.store.resolveAcl(vpcId, r.name!);
    return id ? this.store.getAcl(id) : null;
  }

  private async acl(field: string, ref: string, vpcRef: string): Promise<NetworkAclRec> {
    const a = await this.findAcl(field, ref, vpcRef);
    if (!a) throw new NotFoundError("network ACL", ref, "list ACLs with `microvpc acl list`");
    return a;
  }

  /**
   * Turns peer names into ids and checks every peer group is in the VPC.
   * `self` is the group being written: its own name may be a peer.
   * lenient: an unknown peer drops the rule instead of failing (remove_rules).
   */
  private async resolvePeers(
    field: string,
    drafts: SgRuleDraft[],
    vpc: { id: string; name: string },
    self?: { id: string; name: string },
    lenient = false,
  ): Promise<SgRule[]> {
    const cache = new Map<string, { id: string; vpcId: string } | null>();
    const out: SgRule[] = [];
    for (const [i, d] of drafts.entries()) {
      const { groupName, ...rule } = d;
      const ref = groupName ?? rule.group;
      if (ref === undefined) {
        out.push(rule);
        continue;
      }
      const f = `${field}[${i}].security_group_id`;
      if (self && (ref === self.name || ref === self.id)) {
        out.push({ ...rule, group: self.id });
        continue;
      }
      if (!cache.has(ref)) {
        let g: SecurityGroupRec | null;
        if (SG_ID_RE.test(ref)) g = await this.store.getGroup(ref);
        else {
          const id = await this.store.resolveGroup(vpc.id, ref);
          g = id ? await this.store.getGroup(id) : null;
        }
        cache.set(ref, g ? { id: g.id, vpcId: g.vpcId } : null);
      }
      const g = cache.get(ref);
      if (!g) {
        if (lenient) continue;
        throw new NotFoundError("security group", ref, `${f} names it as peer, but VPC ${vpc.name} has no such group`);
      }
      if (g.vpcId !== vpc.id) {
        if (lenient) continue;
        throw new InvalidArgumentError(
          f,
          `security group ${g.id} belongs to VPC ${g.vpcId}, not ${vpc.name} (${vpc.id}); a peer group must be in the same VPC`,
        );
      }
      out.push({ ...rule, group: g.id });
    }
    return out;
  }

  private async groupMsgs(groups: SecurityGroupRec[]): Promise<SecurityGroup[]> {
    const counts = await this.store.memberCounts(groups);
    return groups.map((g, i) => groupMsg(g, counts[i]));
  }

  private async bindingMsgs(bindings: BindingRec[]): Promise<NicBinding[]> {
    const acls = await this.store.aclsOfSubnets(bindings);
    return bindings.map((b, i) => bindingMsg(b, acls[i]));
  }

  // ---------- handlers ----------

  /** Every FirewallService call but GetFirewallStatus and ListFlowLogs, which read the sync half (main.ts), and the flow-log configs' (flowlog-service.ts). */
  readonly impl: Omit<ServiceImpl<typeof FirewallService>, "getFirewallStatus" | "listFlowLogs" | FlowLogConfigRpcs> = {
    createSecurityGroup: async (req) => {
      const vpc = await this.vpc("vpc", req.vpc);
      const name = V.name("name", req.name);
      const description = V.text("description", req.description);
      const labels = V.labels("labels", req.labels);
      const clientToken = V.token("client_token", req.clientToken, { optional: true });
      if (clientToken.length > 64) throw new InvalidArgumentError("client_token", `is ${clientToken.length} characters long; the limit is 64`);
      const drafts = ruleList("rules", req.rules);
      const logging = dropLogging("drop_logging", req.dropLogging);
      const id = newId("sg");
      let rules = await this.resolvePeers("rules", drafts, vpc, { id, name });
      if (!req.omitDefaultEgress && !rules.some((r) => r.dir === "egress")) {
        rules.push({ dir: "egress", proto: "all", portFrom: 0, portTo: 0, cidr: "0.0.0.0/0", description: "default egress" });
      }
      rules = normalizeRules(rules);
      checkRuleCount("rules", rules.length);
      const { group } = await this.store.createGroup(
        { id, vpcId: vpc.id, name, description, labels, rules, ...(logging ? { dropLogging: logging } : {}) },
        clientToken,
      );
      return { securityGroup: (await this.groupMsgs([group]))[0] };
    },

    getSecurityGroup: async (req) => {
      const g = await this.group("ref", req.ref, req.vpc);
      return { securityGroup: (await this.groupMsgs([g]))[0] };
    },

    listSecurityGroups: async (req) => {
      const size = V.pageSize("page_size", req.pageSize);
      const after = decodeNameToken(req.pageToken);
      const vpcId = req.vpc ? (await this.vpc("vpc", req.vpc)).id : null;
      const groups = await this.store.listGroups(vpcId, after ?? "", size + 1);
      const page = groups.slice(0, size);
      const last = page[page.length - 1];
      return {
        securityGroups: await this.groupMsgs(page),
        nextPageToken: groups.length > size ? encodePageToken(`${last.name}/${last.id}`) : "",
      };
    },

    updateSecurityGroup: async (req) => {
      const first = await this.group("ref", req.ref, req.vpc);
      const setDrafts = req.setRules ? ruleList("set_rules.rules", req.setRules.rules) : undefined;
      const removeDrafts = ruleList("remove_rules", req.removeRules);
      const addDrafts = ruleList("add_rules", req.addRules);
      const description = req.description === undefined ? undefined : V.text("description", req.description);
      const logging = dropLogging("drop_logging", req.dropLogging);
      const vpc = { id: first.vpcId, name: first.vpcId };
      const self = { id: first.id, name: first.name };
      const setRules = setDrafts ? await this.resolvePeers("set_rules.rules", setDrafts, vpc, self) : undefined;
      const removeRules = await this.resolvePeers("remove_rules", removeDrafts, vpc, self, true);
      const addRules = await this.resolvePeers("add_rules", addDrafts, vpc, self);
      const removeKeys = new Set(removeRules.map(ruleKey));

      for (let attempt = 1; ; attempt++) {
        const g = attempt === 1 ? first : await this.group("ref", first.id, "");
        if (req.expectedGeneration !== undefined && BigInt(g.generation) !== req.expectedGeneration) {
          throw new AbortedError(
            `security group ${g.name} (${g.id}) is at generation ${g.generation}, not ${req.expectedGeneration}; it changed since you read it: get it again and retry`,
          );
        }
        let rules = setRules ?? g.rules;
        rules = rules.filter((r) => !removeKeys.has(ruleKey(r)));
        rules = normalizeRules([...rules, ...addRules]);
        checkRuleCount("rules", rules.length);
        const change = {
          ...(same(rules, g.rules) ? {} : { rules }),
          ...(description !== undefined && description !== g.description ? { description } : {}),
          ...(logging !== undefined && !same(logging ?? undefined, g.dropLogging) ? { dropLogging: logging } : {}),
        };
        if (Object.keys(change).length === 0) return { securityGroup: (await this.groupMsgs([g]))[0] };
        try {
          const after = await this.store.updateGroup(g, g.generation, change);
          return { securityGroup: (await this.groupMsgs([after]))[0] };
        } catch (err) {
          if (err instanceof AbortedError && req.expectedGeneration === undefined && attempt < CAS_ATTEMPTS) {
            await backoff(attempt);
            continue;
          }
          throw err;
        }
      }
    },

    deleteSecurityGroup: async (req) => {
      const id = await this.idOfRef(req.ref, req.vpc, "sg", "security group", (vpcId, name) => this.store.resolveGroup(vpcId, name));
      return { deleted: id ? await this.store.deleteGroup(id) : false };
    },

    bindNic: async (req) => {
      const nicId = V.id("nic_id", req.nicId, "nic");
      // What netagent on this host knows of the NIC fills what the request
      // leaves out, and must agree with what it gives. The lookups that do
      // not depend on each other go out together; their errors are thrown in
      // the order of the fields.
      const knownP = this.host.getNic(nicId);
      const vpcP = req.vpc ? this.vpc("vpc", req.vpc) : undefined;
      vpcP?.catch(() => {});
      const known = await knownP;
      const agree = (field: string, given: string, theirs: string | undefined, equal = (a: string, b: string) => a === b) => {
        if (theirs !== undefined && !equal(given, theirs)) {
          throw new InvalidArgumentError(
            field,
            `${V.show(given)} does not match netagent's NIC ${nicId} on host ${this.opts.hostId} (${theirs}); leave it empty to use that`,
          );
        }
      };
      const vpc = await (vpcP ?? this.vpc("vpc", known?.vpcId || ""));
      agree("vpc", vpc.id, known?.vpcId);
      if (req.subnet === "" && !known) throw new InvalidArgumentError("subnet", "is required (a subnet id, or a subnet name of the VPC)");
      const subnetP = this.subnet("subnet", req.subnet || known!.subnetId, vpc);
      const groupsP =
        req.securityGroups.length <= MAX_GROUPS_PER_NIC ? Promise.allSettled(req.securityGroups.map((ref, i) => this.bindGroup(ref, i, vpc))) : undefined;
      const subnet = await subnetP;
      agree("subnet", subnet.id, known?.subnetId);
      const addrText = req.address || known?.address || "";
      const addr = V.ipv4("address", addrText);
      if (addr < subnet.base || addr >= subnet.base + subnet.size) {
        throw new InvalidArgumentError("address", `${addrText} is outside subnet ${subnet.name} (${subnet.cidr})`);
      }
      if (addr === subnet.base || addr === subnet.base + 1 || addr === subnet.base + subnet.size - 1) {
        const what = addr === subnet.base ? "the network address" : addr === subnet.base + 1 ? "the gateway" : "the broadcast address";
        throw new InvalidArgumentError("address", `${addrText} is ${what} of subnet ${subnet.name} (${subnet.cidr}); a NIC cannot have it`);
      }
      agree("address", addrText, known?.address);
      const macText = req.mac || known?.mac || "";
      if (macText === "") throw new InvalidArgumentError("mac", 'is required (six hex pairs like "02:00:0a:00:01:05")');
      const mac = V.mac("mac", macText);
      agree("mac", mac, known?.mac, (a, b) => a === b.toLowerCase());
      const hostIfText = req.hostInterface || known?.hostIf || "";
      if (hostIfText === "") throw new InvalidArgumentError("host_interface", "is required (the NIC's host-side interface, as AttachNic returned it)");
      const hostIf = ifname("host_interface", hostIfText);
      agree("host_interface", hostIf, known?.hostIf);

      if (req.securityGroups.length > MAX_GROUPS_PER_NIC) {
        throw new InvalidArgumentError("security_groups", `has ${req.securityGroups.length} groups; a NIC can be in at most ${MAX_GROUPS_PER_NIC}`);
      }
      const groupIds: string[] = [];
      for (const r of await groupsP!) {
        if (r.status === "rejected") throw r.reason;
        if (!groupIds.includes(r.value)) groupIds.push(r.value);
      }
      const logging = dropLogging("drop_logging", req.dropLogging);
      const spec: BindingSpec = {
        nicId,
        vpcId: vpc.id,
        subnetId: subnet.id,
        address: V.intToIp(addr),
        mac,
        hostId: this.opts.hostId,
        hostIf,
        groupIds,
        ...(logging ? { dropLogging: logging } : {}),
      };
      const { binding, changed, gen } = await this.store.bind(spec);
      // The reply's ACL is read while the kernel applies the binding, not after.
      const msg = this.bindingMsgs([binding]);
      msg.catch(() => {});
      await this.enforced(nicId, binding.vpcId, "bind", gen);
      return { binding: (await msg)[0], changed };
    },

    unbindNic: async (req) => {
      const nicId = V.id("nic_id", req.nicId, "nic");
      const { removed: unbound, gen, vpcId, hostId } = await this.store.unbind(nicId);
      // Conntrack entries are the sync loop's to clear, on the host that had the NIC
      // (a detaching NIC's are its DetachNic's: the netagent clears them by mark).
      if (unbound && vpcId && hostId === this.opts.hostId) await this.enforced(nicId, vpcId, "unbind", gen, req.detaching);
      return { unbound, conntrackEntriesCleared: 0 };
    },

    listNicBindings: async (req) => {
      const size = V.pageSize("page_size", req.pageSize);
      const after = decodeNameToken(req.pageToken);
      const vpcId = req.vpc ? (await this.vpc("vpc", req.vpc)).id : null;
      const group = req.securityGroup ? await this.group("security_group", req.securityGroup, req.vpc) : null;
      const groupId = group?.id ?? null;
      if (req.hostId !== "") V.hostId("host_id", req.hostId);
      const nicId = req.nicId ? V.id("nic_id", req.nicId, "nic") : null;
      const keep = (b: BindingRec) =>
        (!vpcId || b.vpcId === vpcId) &&
        (!groupId || b.groupIds.includes(groupId)) &&
        (!req.hostId || b.hostId === req.hostId) &&
        (!nicId || b.nicId === nicId);

      const found: BindingRec[] = [];
      let cursor = after ?? "";
      if (nicId) {
        const b = nicId > cursor ? await this.store.getBinding(nicId) : null;
        if (b && keep(b)) found.push(b);
      } else {
        const index: BindingIndex = group
          ? { kind: "group", groupId: group.id, vpcId: group.vpcId }
          : req.hostId
            ? { kind: "host", hostId: req.hostId }
            : vpcId
              ? { kind: "vpc", vpcId }
              : { kind: "all" };
        const batch = Math.max(size + 1, 200);
        while (found.length <= size) {
          const ids = await this.store.listBindingIds(index, cursor, batch);
          if (ids.length === 0) break;
          const recs = await this.store.bindingsOf(ids);
          for (const id of ids) {
            const b = recs.get(id);
            if (b && keep(b)) found.push(b);
          }
          cursor = ids[ids.length - 1];
          if (ids.length < batch) break;
        }
      }
      const page = found.slice(0, size);
      return {
        bindings: await this.bindingMsgs(page),
        nextPageToken: found.length > size ? encodePageToken(page[page.length - 1].nicId) : "",
      };
    },

    createNetworkAcl: async (req) => {
      const vpc = await this.vpc("vpc", req.vpc);
      const name = V.name("name", req.name);
      const description = V.text("description", req.description);
      const labels = V.labels("labels", req.labels);
      const clientToken = V.token("client_token", req.clientToken, { optional: true });
      if (clientToken.length > 64) throw new InvalidArgumentError("client_token", `is ${clientToken.length} characters long; the limit is 64`);
      const entries = validateAclEntries("entries", req.entries);
      const subnetIds: string[] = [];
      for (const [i, ref] of req.subnets.entries()) {
        const s = await this.subnet(`subnets[${i}]`, ref, vpc);
        if (!subnetIds.includes(s.id)) subnetIds.push(s.id);
      }
      const { acl } = await this.store.createAcl({ vpcId: vpc.id, name, description, labels, entries, subnetIds }, clientToken);
      return { networkAcl: aclMsg(acl) };
    },

    getNetworkAcl: async (req) => ({ networkAcl: aclMsg(await this.acl("ref", req.ref, req.vpc)) }),

    listNetworkAcls: async (req) => {
      const size = V.pageSize("page_size", req.pageSize);
      const after = decodeNameToken(req.pageToken);
      const vpcId = req.vpc ? (await this.vpc("vpc", req.vpc)).id : null;
      const acls = await this.store.listAcls(vpcId, after ?? "", size + 1);
      const page = acls.slice(0, size);
      const last = page[page.length - 1];
      return {
        networkAcls: page.map(aclMsg),
        nextPageToken: acls.length > size ? encodePageToken(`${last.name}/${last.id}`) : "",
      };
    },

    updateNetworkAcl: async (req) => {
      const first = await this.acl("ref", req.ref, req.vpc);
      const set = req.setEntries ? validateAclEntries("set_entries.entries", req.setEntries.entries) : undefined;
      const upsert = validateAclEntries("upsert_entries", req.upsertEntries);
      if (req.removeEntries.length > MAX_ACL_ENTRIES) {
        throw new InvalidArgumentError("remove_entries", `has ${req.removeEntries.length} entries; an ACL holds at most ${MAX_ACL_ENTRIES}`);
      }
      const remove = new Set(
        req.removeEntries.map((k, i) => {
          const f = `remove_entries[${i}]`;
          if (k.direction !== Direction.INGRESS && k.direction !== Direction.EGRESS) {
            throw new InvalidArgumentError(`${f}.direction`, "is required (DIRECTION_INGRESS or DIRECTION_EGRESS)");
          }
          if (k.ruleNumber < 1 || k.ruleNumber > MAX_ACL_RULE_NUMBER) {
            throw new InvalidArgumentError(`${f}.rule_number`, `${k.ruleNumber} is out of range; use 1–${MAX_ACL_RULE_NUMBER}`);
          }
          return aclKey({ dir: k.direction === Direction.INGRESS ? "ingress" : "egress", ruleNumber: k.ruleNumber });
        }),
      );
      const description = req.description === undefined ? undefined : V.text("description", req.description);

      for (let attempt = 1; ; attempt++) {
        const a = attempt === 1 ? first : await this.acl("ref", first.id, "");
        if (req.expectedGeneration !== undefined && BigInt(a.generation) !== req.expectedGeneration) {
          throw new AbortedError(
            `network ACL ${a.name} (${a.id}) is at generation ${a.generation}, not ${req.expectedGeneration}; it changed since you read it: get it again and retry`,
          );
        }
        const byKey = new Map((set ?? a.entries).map((e) => [aclKey(e), e]));
        for (const k of remove) byKey.delete(k);
        for (const e of upsert) byKey.set(aclKey(e), e);
        const entries = sortAcl([...byKey.values()]);
        if (entries.length > MAX_ACL_ENTRIES) {
          throw new InvalidArgumentError("upsert_entries", `the ACL would have ${entries.length} entries; an ACL holds at most ${MAX_ACL_ENTRIES}`);
        }
        const change = {
          ...(same(entries, a.entries) ? {} : { entries }),
          ...(description !== undefined && description !== a.description ? { description } : {}),
        };
        if (Object.keys(change).length === 0) return { networkAcl: aclMsg(a) };
        try {
          return { networkAcl: aclMsg(await this.store.updateAcl(a, a.generation, change)) };
        } catch (err) {
          if (err instanceof AbortedError && req.expectedGeneration === undefined && attempt < CAS_ATTEMPTS) {
            await backoff(attempt);
            continue;
          }
          throw err;
        }
      }
    },

    deleteNetworkAcl: async (req) => {
      const id = await this.idOfRef(req.ref, req.vpc, "acl", "network ACL", (vpcId, name) => this.store.resolveAcl(vpcId, name));
      return { deleted: id ? await this.store.deleteAcl(id) : false };
    },

    associateNetworkAcl: async (req) => {
      const a = await this.acl("network_acl", req.networkAcl, req.vpc);
      const vpc = req.vpc ? await this.vpc("vpc", req.vpc) : await this.ipam.getVpc(a.vpcId);
      if (!vpc) throw new NotFoundError("vpc", a.vpcId, "the ACL's VPC was deleted");
      if (a.vpcId !== vpc.id) {
        throw new InvalidArgumentError("network_acl", `network ACL ${a.name} (${a.id}) belongs to VPC ${a.vpcId}, not ${vpc.name} (${vpc.id})`);
      }
      const s = await this.subnet("subnet", req.subnet, vpc);
      const { previous } = await this.store.associate(a.id, vpc.id, s.id);
      const after = await this.store.getAcl(a.id);
      if (!after) throw new NotFoundError("network ACL", a.id, "it was deleted");
      return { networkAcl: aclMsg(after), previousNetworkAclId: previous };
    },

    disassociateNetworkAcl: async (req) => {
      const r = V.ref("subnet", req.subnet, "subnet");
      let id = r.id ?? null;
      if (!id) {
        if (req.vpc === "") throw new InvalidArgumentError("vpc", "is required when the subnet is given by name");
        const vpc = await this.vpc("vpc", req.vpc);
        id = await this.ipam.resolveSubnet(r, vpc.id);
        if (!id) throw new NotFoundError("subnet", req.subnet, `VPC ${vpc.name} has no such subnet`);
      }
      return { previousNetworkAclId: await this.store.disassociate(id) };
    },

    parseRules: async (req) => {
      for (const [field, list] of [
        ["ingress_rules", req.ingressRules],
        ["egress_rules", req.egressRules],
      ] as const) {
        if (list.length > MAX_RULE_TEXTS) throw new InvalidArgumentError(field, `has ${list.length} rule texts; the limit is ${MAX_RULE_TEXTS}`);
      }
      let defaultAction: "allow" | "deny";
      if (req.vpcctlDefaultAction === AclAction.UNSPECIFIED || req.vpcctlDefaultAction === AclAction.ALLOW) defaultAction = "allow";
      else if (req.vpcctlDefaultAction === AclAction.DENY) defaultAction = "deny";
      else throw new InvalidArgumentError("vpcctl_default_action", `${req.vpcctlDefaultAction} is not an action; use ACL_ACTION_ALLOW or ACL_ACTION_DENY`);

      const warnings: string[] = [];
      const parsed: { field: string; rule: SgRuleDraft }[] = [];
      for (const [field, dir, list] of [
        ["ingress_rules", "ingress", req.ingressRules],
        ["egress_rules", "egress", req.egressRules],
      ] as const) {
        list.forEach((text, i) => {
          const p = parseRuleText(dir, text, `${field}[${i}]`);
          warnings.push(...p.warnings);
          parsed.push({ field: `${field}[${i}]`, rule: p.rule });
        });
      }
      const policy = req.vpcctlPolicyJson === "" ? null : parseVpcctlPolicy(req.vpcctlPolicyJson, { defaultAction });
      if (policy) {
        warnings.push(...policy.warnings);
        policy.rules.forEach((rule, i) => parsed.push({ field: `vpcctl_policy_json (allow entry ${i + 1})`, rule }));
      }

      // Group names resolve in the VPC; a missing one is a parse error here.
      const names = [...new Set(parsed.flatMap((p) => (p.rule.groupName ? [p.rule.groupName] : [])))];
      const ids = new Map<string, string>();
      if (names.length > 0) {
        const withName = parsed.find((p) => p.rule.groupName)!;
        if (req.vpc === "") {
          throw new InvalidArgumentError(
            withName.field,
            `names the security group ${V.show(withName.rule.groupName!)}; set vpc so that group names resolve, or give the group id (sg-…)`,
          );
        }
        const vpc = await this.vpc("vpc", req.vpc);
        for (const n of names) {
          const id = await this.store.resolveGroup(vpc.id, n);
          if (!id) {
            const p = parsed.find((x) => x.rule.groupName === n)!;
            throw new InvalidArgumentError(p.field, `VPC ${vpc.name} has no security group named ${V.show(n)}`);
          }
          ids.set(n, id);
        }
      }
      const seen = new Map<string, string>();
      const rules: SgRule[] = [];
      for (const p of parsed) {
        const { groupName, ...rule } = p.rule;
        if (groupName) rule.group = ids.get(groupName);
        const k = ruleKey(rule);
        const first = seen.get(k);
        if (first !== undefined) {
          warnings.push(`${p.field}: repeats ${first}; kept once`);
          continue;
        }
        seen.set(k, p.field);
        rules.push(rule);
      }
      return {
        rules: rules.map(sgRuleMsg),
        aclEntries: (policy?.aclEntries ?? []).map(aclEntryMsg),
        subnetCidr: policy?.subnetCidr ?? "",
        warnings,
      };
    },
  };
}
