// `microvpcd redis-acl`: the users it prints (docs/redis-acl.md). The
// integration test (test/integration/redis-acl.test.ts) loads them into a
// real Redis and runs the daemons under them; here, the text itself.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { test } from "vitest";
import {
  aclRules,
  CONTROL_USER,
  hostPrivatePatterns,
  hostScopedWritePatterns,
  hostUser,
  redisAclUser,
  SHARED_WRITE_PATTERNS,
} from "../../services/common/redis-acl.js";

const PW = "correct horse battery staple";
const HASH = createHash("sha256").update(PW).digest("hex");

test("a host user: reads every mvpc: key, writes its own host's keys and the shared ones, reads and writes its own mvpc-md:, nothing of another host", () => {
  const { user, line } = redisAclUser({ hostId: "hv7" }, PW, "commands");
  assert.equal(user, "microvpc-host-hv7");
  assert.equal(user, hostUser("hv7"));
  const w = line.split(" ");
  assert.deepEqual(w.slice(0, 6), ["ACL", "SETUSER", "microvpc-host-hv7", "reset", "on", `#${HASH}`]);
  assert.ok(w.includes("%R~mvpc:*"));
  for (const k of ["mvpc:host:hv7:*", "mvpc:hosts:hv7", "mvpc:fw:host:hv7:*", "mvpc:gw:host:hv7:*", "mvpc:vm:host:hv7", "mvpc:vm:host:hv7:*"])
    assert.ok(w.includes(`~${k}`), k);
  // VM records and leases are host-scoped now: no shared pattern for them.
  for (const k of ["~mvpc:vm:vm-*", "~mvpc:vmlease:*", "~mvpc:vms"]) assert.ok(!w.includes(k), k);
  for (const k of SHARED_WRITE_PATTERNS) assert.ok(w.includes(`~${k}`), k);
  // Its instance metadata: read and write, outside mvpc: (which every host reads).
  assert.deepEqual(hostPrivatePatterns("hv7"), ["mvpc-md:hv7:*", "mvpc-md:{host:hv7}:*"]);
  assert.ok(w.includes("~mvpc-md:hv7:*"));
  assert.ok(!w.some((x) => /mvpc:gw:md:|mvpc-md:\*|^%R~mvpc-md/.test(x)), "no other host's metadata, nor the old shared layout");
  // Writable patterns are all either this host's or the listed shared ones.
  const writable = w.filter((x) => x.startsWith("~"));
  assert.deepEqual(writable.sort(), [...hostScopedWritePatterns("hv7"), ...SHARED_WRITE_PATTERNS, ...hostPrivatePatterns("hv7")].map((p) => `~${p}`).sort());
  // The only read pattern is mvpc:*, which does not reach mvpc-md:.
  assert.deepEqual(
    w.filter((x) => x.startsWith("%")),
    ["%R~mvpc:*"],
  );
  for (const p of writable) {
    assert.ok(!/^~mvpc:(host|hosts|fw:host|gw:host|vm:host):\*/.test(p), `${p} would cover other hosts`);
    assert.ok(!/^~mvpc:(vpc|subnet|sn|owner|tokens|pcx|dns|fw:sg:\*$|fw:acl|fw:subnet-acl|gw:(nat|fip|pf|vpcnat))/.test(p), `${p}: control-plane keys`);
  }
  assert.ok(!w.includes("~*") && !w.includes("allkeys") && !w.includes("~mvpc:*"), "not every key");
  assert.deepEqual(
    w.filter((x) => x.startsWith("&") || x === "allchannels"),
    ["&mvpc:{*}:wake"],
    "no pub/sub channel but the change streams' wakes",
  );
  assert.ok(w.indexOf("resetchannels") < w.indexOf("&mvpc:{*}:wake"));
});

test("commands: data, transactions and scripts; no administration, functions or pub/sub but the sharded wakes", () => {
  const r = aclRules({ hostId: "hv1" });
  const cmds = r.filter((x) => /^[+-]/.test(x));
  assert.equal(cmds[0], "-@all", "starts from nothing");
  for (const x of ["+@read", "+@write", "+eval", "+evalsha", "+script|load", "+script|exists", "-@dangerous", "-@admin", "-function", "-fcall"])
    assert.ok(cmds.includes(x), x);
  assert.ok(!cmds.some((x) => x === "+@all" || x === "+@scripting" || x === "+@pubsub" || x === "+@dangerous" || x === "+@admin"), cmds.join(" "));
  assert.deepEqual(
    cmds.filter((x) => /^\+(p|s)?(publish|subscribe|unsubscribe)$/.test(x)),
    ["+ssubscribe", "+sunsubscribe", "+spublish"],
    "of pub/sub, the sharded commands the cluster feed uses",
  );
  assert.deepEqual(
    cmds.filter((x) => /^\+cluster/.test(x)),
    ["+cluster|slots", "+cluster|info"],
    "of CLUSTER, what a cluster client reads: the slot map and the state",
  );
  // Removals come after the grants they narrow (ACL rules apply left to right).
  assert.ok(cmds.indexOf("-@dangerous") > cmds.indexOf("+@write"));
  assert.ok(cmds.indexOf("-function") > cmds.indexOf("+@write"));
  assert.equal(cmds.at(-1), "+info", "INFO (ioredis's ready check) back after -@dangerous");
});

test("the control user: every mvpc: and mvpc-md: key, the same commands", () => {
  const { user, line } = redisAclUser({ control: true }, PW, "commands");
  assert.equal(user, CONTROL_USER);
  const w = line.split(" ");
  assert.deepEqual(w.slice(0, 6), ["ACL", "SETUSER", "microvpc-control", "reset", "on", `#${HASH}`]);
  assert.ok(w.includes("~mvpc:*"));
  assert.ok(w.includes("~mvpc-md:*"), "every host's instance metadata (gateway --api-only)");
  assert.ok(!w.some((x) => x.startsWith("%")), "no split read/write patterns");
  assert.deepEqual(
    aclRules({ control: true }).filter((x) => /^[+-]/.test(x)),
    aclRules({ hostId: "a" }).filter((x) => /^[+-]/.test(x)),
  );
});

test("aclfile format; the password is never printed, only its SHA-256", () => {
  const { line } = redisAclUser({ hostId: "hv1" }, PW, "aclfile");
  assert.match(line, /^user microvpc-host-hv1 reset on #[0-9a-f]{64} /);
  assert.equal(line.split(" ").slice(1).join(" "), redisAclUser({ hostId: "hv1" }, PW, "commands").line.split(" ").slice(2).join(" "));
  for (const fmt of ["aclfile", "commands"] as const) {
    for (const who of [{ control: true as const }, { hostId: "hv1" }]) {
      const l = redisAclUser(who, PW, fmt).line;
      assert.ok(!l.includes(PW) && !l.includes(">"), `no clear-text password: ${l}`);
      assert.ok(!/\s{2}|\n/.test(l), "one line, single spaces (redis-cli and aclfile split on them)");
    }
  }
});

test("host ids as the agents accept them, so a pattern cannot reach another host", () => {
  for (const bad of ["", "HV1", "hv-1", "hv*", "hv1:*", "a".repeat(25), "hv 1"]) {
    assert.throws(() => redisAclUser({ hostId: bad }, PW, "commands"), /host id/, JSON.stringify(bad));
  }
  // hv1's patterns end at a separator: they do not match hv10's keys.
  for (const p of [...hostScopedWritePatterns("hv1"), ...hostPrivatePatterns("hv1")]) assert.match(p, /hv1\}?(:\*)?$/);
  // No shared pattern reaches a host-scoped key of another host.
  // Redis's glob: "*" any run of characters (also "}" and ":"), "?" one character.
  const glob = (p: string) =>
    new RegExp(
      `^${p
        .replace(/[.+^${}()|[\]\\]/g, "\\$&")
        .replace(/\*/g, ".*")
        .replace(/\?/g, ".")}$`,
    );
  const otherHostKeys = (h: string) => [
    `mvpc:host:${h}:nics`,
    `mvpc:hosts:${h}`,
    `mvpc:{hosts}:host:${h}`,
    `mvpc:{host:${h}}:nics`,
    `mvpc:{host:${h}}:nicaddr`,
    `mvpc:{host:${h}}:events`,
    `mvpc:{host:${h}}:vms`,
    `mvpc:{host:${h}}:vm:vm-0123456789ab`,
    `mvpc:{host:${h}}:vm:vm-0123456789ab:lease`,
    `mvpc:fw:host:${h}:vpcs`,
    `mvpc:gw:host:${h}:transit`,
    `mvpc:vm:host:${h}`,
    `mvpc:vm:host:${h}:vm:vm-0123456789ab`,
    `mvpc:vm:host:${h}:lease:vm-0123456789ab`,
    `mvpc:vpn:host:${h}:keys`,
    `mvpc:vpn:host:${h}:applied`,
  ];
  for (const k of otherHostKeys("hv2")) {
    for (const p of SHARED_WRITE_PATTERNS) assert.ok(!glob(p).test(k), `${p} matches ${k}`);
  }
  // The VPC-tagged shared patterns take a VPC's stream and VM name index, and
  // none of the control plane's keys in the VPC's slot, whatever an owner's name.
  const V = "vpc-0123456789ab";
  for (const k of [
    `mvpc:{${V}}:events`,
    `mvpc:{${V}}:vm:byname`,
    `mvpc:{${V}}:fw:nics`,
    `mvpc:{${V}}:fw:sg:sg-0123456789ab:members`,
    `mvpc:{${V}}:fw:gen`,
    `mvpc:{${V}}:nicaddr`,
    `mvpc:{${V}}:nicaddr:ver`,
    `mvpc:{${V}}:overlay:members`,
    `mvpc:{${V}}:overlay:addrs`,
    "mvpc:{hosts}:index",
  ])
    assert.ok(
      SHARED_WRITE_PATTERNS.some((p) => glob(p).test(k)),
      `a host writes ${k}`,
    );
  for (const k of [
    `mvpc:{${V}}:owner:lb:vm:byname`,
    `mvpc:{${V}}:owner:x:events`,
    `mvpc:{${V}}:sn:subnet-0123456789ab:used`,
    `mvpc:{vpc-0123456789abc}:events`,
    // The firewall's control-plane keys in the VPC's slot: groups, their peer indexes, ACLs, names, associations.
    `mvpc:{${V}}:fw:sg:sg-0123456789ab`,
    `mvpc:{${V}}:fw:sg:sg-0123456789ab:refby`,
    `mvpc:{${V}}:fw:sg:byname`,
    `mvpc:{${V}}:fw:sgs`,
    `mvpc:{${V}}:fw:acl:acl-0123456789ab`,
    `mvpc:{${V}}:fw:subnet-acl`,
    `mvpc:{${V}}:fw:sg:x:y:members`,
    "mvpc:{fw}:sg:vpc",
    // IPAM's owner index of an owner named like the netagent's keys; the host registry's neighbours.
    `mvpc:{${V}}:owner:nicaddr`,
    `mvpc:{${V}}:owner:x:overlay:addrs`,
    "mvpc:{hosts}:dns:defaults",
    "mvpc:{hosts}:host:hv1",
  ]) {
    assert.deepEqual(
      SHARED_WRITE_PATTERNS.filter((p) => glob(p).test(k)),
      [],
      k,
    );
  }
  // Host "hv1"'s patterns cover its own keys and none of host "hv10"'s (nor "hv"'s).
  for (const k of otherHostKeys("hv1"))
    assert.ok(
      hostScopedWritePatterns("hv1").some((p) => glob(p).test(k)),
      `hv1 may write ${k}`,
    );
  for (const other of ["hv10", "hv", "hv1x"]) {
    for (const k of otherHostKeys(other)) {
      for (const p of hostScopedWritePatterns("hv1")) assert.ok(!glob(p).test(k), `${p} matches ${k}`);
    }
  }
  // The VPN's control records (endpoints, clients, their indexes and gen) and
  // IPAM's reservation of the client range: no host writes them.
  const hostWrites = [...hostScopedWritePatterns("hv1"), ...SHARED_WRITE_PATTERNS, ...hostPrivatePatterns("hv1")];
  for (const k of [
    "mvpc:vpn:gen",
    "mvpc:vpn:eps",
    "mvpc:vpn:ep:vpc-0123456789ab",
    "mvpc:vpn:vpc:vpc-0123456789ab:clients",
    "mvpc:vpn:vpc:vpc-0123456789ab:addrs",
    "mvpc:vpn:client:vpnc-0123456789ab",
    "mvpc:vpc:vpc-0123456789ab:reserved",
  ]) {
    assert.deepEqual(
      hostWrites.filter((p) => glob(p).test(k)),
      [],
      k,
    );
  }
  // Another host's instance metadata: no pattern of hv1's user, read or write, reaches it.
  const patterns = aclRules({ hostId: "hv1" })
    .filter((x) => x.startsWith("~") || x.startsWith("%"))
    .map((x) => x.replace(/^%R~|^~/, ""));
  for (const k of [
    "mvpc-md:hv2:inst:vm-1",
    "mvpc-md:hv10:byaddr",
    "mvpc-md:hv2:tokens:vm-1",
    "mvpc-md:{host:hv2}:vm:vm-1:userdata",
    "mvpc-md:{host:hv10}:vm:vm-1:userdata",
  ]) {
    assert.deepEqual(
      patterns.filter((p) => glob(p).test(k)),
      [],
      k,
    );
  }
  // Nor does a write pattern reach the old shared layout.
  assert.deepEqual(
    aclRules({ hostId: "hv1" }).filter((x) => x.startsWith("~") && glob(x.slice(1)).test("mvpc:gw:md:inst:vm-1")),
    [],
  );
});
