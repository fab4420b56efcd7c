// Redis ACL users for a fleet (`microvpcd redis-acl`): one control-plane user
// and one user per hypervisor, so that a compromised hypervisor cannot write
// other hosts' records, IPAM, security groups, NAT/floating IPs, peerings or
// DNS — Redis answers NOPERM. docs/redis-acl.md explains the design and what
// stays shared; this module is the single place that says which keys a
// hypervisor writes, and test/integration/redis-acl.test.ts runs the agents
// under exactly these rules.
//
// Key inventory (what the per-host agents — netagent, firewall, gateway and
// its metadata child, vmm — write; they read every mvpc: key):
//   host-private (outside mvpc:, so that no other host reads them either; only
//   host H's user, and the control user, may read or write them):
//     mvpc-md:H:*          gateway: instance metadata (SetInstanceMetadata from vmm) with
//                          user-data, its indexes, and the metadata child's IMDS session tokens
//     mvpc-md:{host:H}:*   vmm: a VM's user-data (in its host's slot, with its record)
//   host-scoped (contain the host id; only host H may write them):
//     mvpc:host:H:*        netagent: VPC/subnet/NIC records, NIC address index, NIC client tokens
//                          (on a Redis Cluster under mvpc:{host:H}:, below)
//     mvpc:hosts:H         netagent overlay: registry record (lease); mvpc:{hosts}:host:H on a cluster
//     mvpc:{host:H}:*      the host's hash tag (one Redis Cluster slot): its scoped change stream
//                          (its NICs attached and detached); vmm: VM ids (:vms), those to recover
//                          (:vms:unsettled), records (:vm:<id>, with their journals) and leases
//                          (:vm:<id>:lease)
//     mvpc:fw:host:H:*     firewall: binding indexes of this host
//     mvpc:gw:host:H:*     gateway: transit indexes (and the port-forward port index); on a
//                          Redis Cluster the transit indexes are under mvpc:{host:H}:gw:, and the
//                          port index is the control plane's mvpc:{gw}:host:H:ports
//     mvpc:vm:host:H, mvpc:vm:host:H:*  vmm: where an earlier release kept them (moved from at
//                          start; a tombstone stays at each record's name, docs/redis-schema.md)
//     mvpc:vpn:host:H:*    netagent VPN endpoint: the public keys of H's endpoint interfaces, the gen applied
//   shared (any host writes them; readers validate, see docs/redis-acl.md):
//     mvpc:events          change-event stream (XADD; events only wake readers, who re-read state)
//     mvpc:{vpc-…}:events, mvpc:{hosts}:events  the scoped streams: a VPC's, the host registry's
//     mvpc:nicaddr         global NIC address claims ("<vpc>/<addr>" → "<host>/<nic>")
//     mvpc:hostindex       set of host ids with an overlay record
//     mvpc:overlay:*       per-VPC overlay members (host id field) and addresses (address → host)
//                          on a Redis Cluster: mvpc:{V}:nicaddr (with :ver, the claims' versions),
//                          mvpc:{V}:overlay:members|addrs, mvpc:{hosts}:index
//     mvpc:fw:nic:*, mvpc:fw:nics, mvpc:fw:vpc:*:nics, mvpc:fw:sg:*:members, mvpc:fw:gen
//                          firewall bindings of NICs (BindNic/UnbindNic) and their group membership;
//                          on a Redis Cluster mvpc:{V}:fw:nics, mvpc:{V}:fw:sg:<id>:members,
//                          mvpc:{V}:fw:gen (a host's own binding indexes are under mvpc:{host:H}:)
//     mvpc:gw:mdhosts      set of host ids with instance metadata (the control plane's listing)
//     mvpc:gw:lease:nat:*   which host of a VPC holds its NAT gateway's address (a lease the VPC's
//                          hosts compete for; readers accept only a registered member host);
//                          mvpc:{V}:gw:natlease on a Redis Cluster
//     mvpc:{vpc-…}:vm:byname vmm: per-VPC VM name index (name → "<host>/<id>"; only nominates),
//                          and mvpc:vm:vpc:*:byname, the earlier release's, written too until it is gone
//     mvpc:vm:hosts        vmm: host ids with VMs (a listing; each host's VMs are under its prefix)
// Everything else is the control plane's (ipam, dns, peering, and the
// cluster-wide RPCs of firewall and gateway: security groups, network ACLs,
// NAT gateways, floating IPs, port forwards): IPAM (mvpc:vpc*, mvpc:subnet*,
// mvpc:{V}:sn:*, mvpc:{V}:owner:*), mvpc:tokens, mvpc:fw:sg:<id>, mvpc:fw:acl*,
// mvpc:fw:subnet-acl, mvpc:fw:vpc:*:sg*/acl*/flowlogs, mvpc:fw:flowlog*, mvpc:gw:nat*/fip*/pf*/vpcnat,
// mvpc:pcx*, mvpc:dns:*, and on a Redis Cluster their tagged names (IPAM's and
// DNS's mvpc:{V}:vpc|subnets|subnet:*|reserved|tokens|peers|dns:*,
// mvpc:{catalog}:*, mvpc:{peerings}:*, mvpc:{hosts}:dns:defaults, the
// firewall's mvpc:{V}:fw:sg:<id>|acl*|sgs|acls|subnet-acl|sg:byname and
// mvpc:{fw}:*, and the gateway's mvpc:{gw}:* and mvpc:{V}:gw:nat-holds),
// mvpc:vpn:* but the host-scoped mvpc:vpn:host:H:* (VPN
// endpoints and clients: Set/DeleteVpnEndpoint, Create/DeleteVpnClient go to a
// netagent running as the control user). The control user also reads and
// writes every host's mvpc-md:* (gateway --api-only: Get/Delete of instance
// metadata across hosts),
// and the legacy mvpc:gw:md:* (records of versions before mvpc-md:, which
// only the operator deletes, docs/redis-acl.md).
import { createHash } from "node:crypto";
import { Option, type Command } from "commander";
import { checkHostId as checkId } from "./host.js";
import { readRedisSecrets } from "./redis.js";

export const CONTROL_USER = "microvpc-control";
export const hostUser = (hostId: string) => `microvpc-host-${hostId}`;

const checkHostId = (hostId: string) => checkId("host id", hostId);

/** Keys only this host's agents write (every host reads them, as every mvpc: key). */
export function hostScopedWritePatterns(hostId: string): string[] {
  checkHostId(hostId);
  // Each pattern ends at the id or at ":" after it: host "a" does not match host "ab"'s keys.
  return [
    `mvpc:host:${hostId}:*`,
    `mvpc:hosts:${hostId}`,
    // The same on a Redis Cluster (netagent/schema.ts NA_KEYS.cluster): its
    // records under its hash tag (below), its registry record under "{hosts}".
    `mvpc:{hosts}:host:${hostId}`,
    // Its hash tag (one slot of a Redis Cluster): its scoped change stream
    // (common/events.ts), its VMs' records, leases and id set (vmm/store.ts).
    `mvpc:{host:${hostId}}:*`,
    `mvpc:fw:host:${hostId}:*`,
    `mvpc:gw:host:${hostId}:*`,
    `mvpc:vm:host:${hostId}`,
    `mvpc:vm:host:${hostId}:*`,
    // The VPN endpoints it serves: their public keys and the gen it applied
    // (netagent/vpn/schema.ts); readers take them only from the endpoint's host.
    `mvpc:vpn:host:${hostId}:*`,
  ];
}

/**
 * Keys only this host's agents read or write: outside mvpc:, which every
 * host's user reads. Instance metadata holds tenants' user-data, and what a
 * VM reads at boot must be written by its own host alone.
 */
export function hostPrivatePatterns(hostId: string): string[] {
  checkHostId(hostId);
  // The second: a VM's user-data, under its host's hash tag (vmm/store.ts).
  return [`mvpc-md:${hostId}:*`, `mvpc-md:{host:${hostId}}:*`];
}

/** The control user's keys: every mvpc: key and every host's private keys. */
export const CONTROL_PATTERNS = ["mvpc:*", "mvpc-md:*"] as const;

/** A VPC's hash tag in a key pattern: "vpc-" and its id's 12 hex digits, each one character. */
const VPC_TAG = `vpc-${"?".repeat(12)}`;

/** Shared keys every host's agents write (the residual risk docs/redis-acl.md describes). */
export const SHARED_WRITE_PATTERNS = [
  "mvpc:events",
  // The scoped change streams (common/events.ts): a VPC's, the host registry's.
  // Twelve "?" (a VPC id's hex), not "*": a glob's "*" also matches "}" and
  // ":", and so would take in IPAM's owner index of an owner ending in
  // ":events" (mvpc:{<vpc>}:owner:<owner>), which no host may write.
  `mvpc:{${VPC_TAG}}:events`,
  "mvpc:{hosts}:events",
  "mvpc:nicaddr",
  "mvpc:hostindex",
  "mvpc:overlay:*",
  "mvpc:fw:nic:*",
  "mvpc:fw:nics",
  "mvpc:fw:vpc:*:nics",
  "mvpc:fw:sg:*:members",
  "mvpc:fw:gen",
  // The same on a Redis Cluster, in the VPC's slot (firewall/keys.ts FW_KEYS.cluster):
  // its listing of bound NICs, its groups' member indexes, its change counter.
  `mvpc:{${VPC_TAG}}:fw:nics`,
  `mvpc:{${VPC_TAG}}:fw:sg:sg-${"?".repeat(12)}:members`,
  `mvpc:{${VPC_TAG}}:fw:gen`,
  // The netagent's on a Redis Cluster (netagent/schema.ts NA_KEYS.cluster): a
  // VPC's address claims and their versions, its overlay members and
  // nominations, and the set of registered host ids.
  `mvpc:{${VPC_TAG}}:nicaddr`,
  `mvpc:{${VPC_TAG}}:nicaddr:ver`,
  `mvpc:{${VPC_TAG}}:overlay:members`,
  `mvpc:{${VPC_TAG}}:overlay:addrs`,
  "mvpc:{hosts}:index",
  "mvpc:gw:mdhosts",
  "mvpc:gw:lease:nat:*",
  // The same on a Redis Cluster, in the VPC's slot (gateway/schema.ts GW_KEYS.cluster).
  `mvpc:{${VPC_TAG}}:gw:natlease`,
  // Not mvpc:vm:*, which would take in other hosts' mvpc:vm:host:<id>:*.
  // VM records and leases are host-scoped (above); these only nominate (the
  // second is the earlier release's name index, written too until every vmm
  // runs this one).
  `mvpc:{${VPC_TAG}}:vm:byname`,
  "mvpc:vm:vpc:*:byname",
  "mvpc:vm:hosts",
] as const;

// Commands: the data commands (read, write, transactions, scripts) and the
// connection ones, minus everything administrative. @dangerous holds
// FLUSHALL, FLUSHDB, KEYS, CONFIG, DEBUG, ACL, SHUTDOWN, MODULE, MONITOR,
// SAVE, REPLICAOF, MIGRATE, RESTORE, SORT, CLIENT KILL/LIST …; @admin adds
// the rest of the server management. Scripts: EVAL/EVALSHA (ioredis's
// defineCommand) and SCRIPT LOAD/EXISTS (its pipelines load scripts), not
// SCRIPT FLUSH/KILL/DEBUG nor functions. INFO back: ioredis's ready check.
const COMMANDS = [
  "-@all",
  "+@read",
  "+@write",
  "+@transaction",
  "+@connection",
  "+eval",
  "+evalsha",
  "+eval_ro",
  "+evalsha_ro",
  "+script|load",
  "+script|exists",
  "-@dangerous",
  "-@admin",
  // Functions are @write: FUNCTION FLUSH/LOAD/DELETE would pass +@write.
  "-function",
  "-fcall",
  "-fcall_ro",
  // Redis Cluster: the change feed waits on its streams' wakes (sharded
  // pub/sub, services/common/events.ts), and writers publish them. Only
  // these three pub/sub commands, and only on the wake channels (below).
  "+ssubscribe",
  "+sunsubscribe",
  "+spublish",
  // Redis Cluster: the client's slot map (CLUSTER SLOTS) and ready check
  // (CLUSTER INFO); read-only, and no other CLUSTER subcommand.
  "+cluster|slots",
  "+cluster|info",
  "+info",
];

/**
 * The wake channels of the change streams, mvpc:{<vpc>}:wake,
 * mvpc:{host:<host>}:wake, mvpc:{hosts}:wake: the only channels any user
 * gets. Every user may publish to every one, as every user may append to
 * the shared streams: a forged wake costs a reader one XREAD, as a forged
 * event costs it a pass.
 */
export const WAKE_CHANNELS = "mvpc:{*}:wake";

/** The ACL rules (without the password) of a user. Pub/sub: the wake channels only (WAKE_CHANNELS). */
export function aclRules(who: { control: true } | { hostId: string }): string[] {
  const keys =
    "control" in who
      ? CONTROL_PATTERNS.map((p) => `~${p}`)
      : // `~` (read and write), not `%W~`: EVAL declares its keys as read-write, and
        // Redis wants one pattern granting both, so a `%R~` + `%W~` pair would refuse
        // a script on a key the host may write.
        ["%R~mvpc:*", ...[...hostScopedWritePatterns(who.hostId), ...SHARED_WRITE_PATTERNS, ...hostPrivatePatterns(who.hostId)].map((p) => `~${p}`)];
  return ["reset", "on", ...keys, "resetchannels", `&${WAKE_CHANNELS}`, ...COMMANDS];
}

/** SHA-256 of the password, as ACL's `#<hash>` rule takes it: the password itself is never printed. */
export function passwordHash(password: string): string {
  return createHash("sha256").update(password, "utf8").digest("hex");
}

export type AclFormat = "commands" | "aclfile";

/**
 * The user as one `ACL SETUSER` command (for redis-cli) or one aclfile line.
 * `reset` first, so applying it again replaces the user's rules rather than adding to them.
 */
export function aclUserLine(user: string, rules: string[], password: string, format: AclFormat): string {
  const body = [user, ...rules.slice(0, 2), `#${passwordHash(password)}`, ...rules.slice(2)].join(" ");
  return format === "commands" ? `ACL SETUSER ${body}` : `user ${body}`;
}

/** The user name and its line, for --control or --host-id. */
export function redisAclUser(who: { control: true } | { hostId: string }, password: string, format: AclFormat): { user: string; line: string } {
  const user = "control" in who ? CONTROL_USER : hostUser(who.hostId);
  return { user, line: aclUserLine(user, aclRules(who), password, format) };
}

/**
 * `microvpcd redis-acl`: prints the ACL user(s) to load into Redis. The
 * password comes from a file and only its SHA-256 is printed, so the output
 * (a terminal, a CI log, an aclfile) never holds it.
 */
export function addRedisAclCommand(program: Command): void {
  const cmd = program
    .command("redis-acl")
    .description(
      "print one Redis ACL user: --control (ipam: every mvpc: and mvpc-md: key) or --host-id ID (one hypervisor's agents: write only that host's keys and the shared ones they need, read and write its own mvpc-md:<id>:*); see docs/redis-acl.md",
    )
    .addOption(new Option("--control", "the control-plane user, microvpc-control").conflicts("hostId"))
    .addOption(new Option("--host-id <id>", "the user of this hypervisor, microvpc-host-<id>"))
    .addOption(
      new Option("--password-file <path>", "the user's own password (one line; one per user, never shared); printed only as its SHA-256").makeOptionMandatory(),
    )
    .addOption(
      new Option("--format <format>", "an ACL SETUSER command (for redis-cli) or an aclfile line").choices(["commands", "aclfile"]).default("commands"),
    )
    .action((o: { control?: boolean; hostId?: string; passwordFile: string; format: AclFormat }) => {
      // One user per run: users that shared a password could log in as each other.
      if (!o.control && o.hostId === undefined) cmd.error("error: give --control or --host-id ID");
      try {
        const password = readRedisSecrets({ passwordFile: o.passwordFile }).password!;
        process.stdout.write(redisAclUser(o.control ? { control: true } : { hostId: o.hostId! }, password, o.format).line + "\n");
      } catch (err) {
        cmd.error(`error: ${(err as Error).message}`);
      }
    });
}
