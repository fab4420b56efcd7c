// The CLI's pure pieces: rule and ACL entry texts (parsed by the firewall's
// own parser, printed back in the same form), TARGET[:PORT], --host, and the
// progress line for slow calls.
import assert from "node:assert/strict";
import { test } from "vitest";
import { DomainError } from "../../services/common/errors.js";
import { AclAction, Direction, Protocol } from "../../gen/microvpc/v1/firewall_pb.js";
import { splitTarget } from "../../cli/commands/connectivity.js";
import { parseHost } from "../../cli/lib/context.js";
import { Progress } from "../../cli/lib/progress.js";
import { aclEntryText, parseAclEntry, parseAclKey, parseInOut, ruleText } from "../../cli/lib/rules.js";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function throwsInvalid(fn: () => unknown, re: RegExp): void {
  assert.throws(fn, (e: unknown) => e instanceof DomainError && re.test(e.message));
}

test("rule texts parse into the API's rules and print back the same", () => {
  const texts = [
    "tcp:80:0.0.0.0/0",
    "tcp:8000-8080:10.0.0.0/16",
    "udp:53:10.0.0.2/32",
    "icmp:8:10.0.0.0/8",
    "icmp:3/4:0.0.0.0/0",
    "icmp:all:0.0.0.0/0",
    "all:all:0.0.0.0/0",
    "tcp:5432:web-sg",
    "tcp:22:sg-0123456789ab",
  ];
  const { rules, warnings } = parseInOut(texts, ["all:all:0.0.0.0/0"]);
  assert.deepEqual(warnings, []);
  assert.deepEqual(rules.map(ruleText), [...texts, "all:all:0.0.0.0/0"]);
  assert.deepEqual(
    rules.map((r) => r.direction),
    [...texts.map(() => Direction.INGRESS), Direction.EGRESS],
  );
  // A group name goes to the server as a name, in security_group_id.
  assert.deepEqual(rules[7].peer, { case: "securityGroupId", value: "web-sg" });
  assert.deepEqual([rules[0].protocol, rules[0].portFrom, rules[0].portTo], [Protocol.TCP, 80, 80]);

  const bare = parseInOut(["tcp:80:10.0.0.9"], []);
  assert.equal(ruleText(bare.rules[0]), "tcp:80:10.0.0.9/32");
  assert.match(bare.warnings[0], /bare address 10\.0\.0\.9 is read as 10\.0\.0\.9\/32/);

  throwsInvalid(() => parseInOut(["tcp:70000:0.0.0.0/0"], []), /^--inbound: .*port 70000 is out of range/);
  throwsInvalid(() => parseInOut([], ["tcp:80:0.0.0.0/0; flush ruleset"]), /^--outbound: .*contains ";", " "/);
  throwsInvalid(() => parseInOut(["tcp:80:0.0.0.0/0 $(reboot)"], []), /contains/);
  throwsInvalid(() => parseInOut(["all:80:0.0.0.0/0"], []), /protocol all matches every port/);
});

test("ACL entry texts parse and print back; keys name entries", () => {
  for (const t of [
    "100:ingress:deny:tcp:22:0.0.0.0/0",
    "200:egress:allow:all:all:10.0.0.0/8",
    "32766:ingress:allow:icmp:8/0:0.0.0.0/0",
    "5:egress:deny:udp:1000-2000:192.168.0.0/16",
  ]) {
    assert.equal(aclEntryText(parseAclEntry(t)), t);
  }
  const e = parseAclEntry("100:ingress:deny:tcp:22:0.0.0.0/0");
  assert.deepEqual(
    [e.ruleNumber, e.direction, e.action, e.protocol, e.portFrom, e.portTo, e.cidr],
    [100, Direction.INGRESS, AclAction.DENY, Protocol.TCP, 22, 22, "0.0.0.0/0"],
  );
  throwsInvalid(() => parseAclEntry("0:ingress:deny:tcp:22:0.0.0.0/0"), /rule number "0" is not valid/);
  throwsInvalid(() => parseAclEntry("32767:ingress:deny:tcp:22:0.0.0.0/0"), /rule number "32767" is not valid/);
  throwsInvalid(() => parseAclEntry("100:in:deny:tcp:22:0.0.0.0/0"), /direction "in" is not known/);
  throwsInvalid(() => parseAclEntry("100:ingress:reject:tcp:22:0.0.0.0/0"), /action "reject" is not known/);
  throwsInvalid(() => parseAclEntry("100:ingress:deny:tcp:22:web-sg"), /matches a CIDR/);
  throwsInvalid(() => parseAclEntry("100:ingress:deny:tcp:22"), /has 5 parts/);
  throwsInvalid(() => parseAclEntry("100:ingress:deny:tcp:22:0.0.0.0/0;ls"), /^--entry: "100:ingress:deny:tcp:22:0\.0\.0\.0\/0;ls" contains ";"/);

  assert.deepEqual([parseAclKey("egress:300").direction, parseAclKey("egress:300").ruleNumber], [Direction.EGRESS, 300]);
  assert.equal(parseAclKey("100:ingress:deny:tcp:22:0.0.0.0/0").ruleNumber, 100);
  throwsInvalid(() => parseAclKey("ingress"), /use DIRECTION:NUM/);
});

test("TARGET[:PORT] and --host", () => {
  assert.deepEqual(splitTarget("10.0.2.5:5432"), { target: "10.0.2.5", port: 5432 });
  assert.deepEqual(splitTarget("db.prod.internal"), { target: "db.prod.internal" });
  assert.deepEqual(splitTarget("db:80"), { target: "db", port: 80 });
  throwsInvalid(() => splitTarget("db:http"), /"http" is not a port/);
  throwsInvalid(() => splitTarget("db:0"), /0 is not a port/);

  assert.equal(parseHost("10.0.0.5"), "10.0.0.5");
  assert.equal(parseHost("hv1.example"), "hv1.example");
  assert.equal(parseHost("https://hv1.example"), "https://hv1.example");
  assert.equal(parseHost("[fd00::5]"), "[fd00::5]");
  assert.throws(() => parseHost("10.0.0.5:7401"), /without a port/);
  assert.throws(() => parseHost("a b"), /expected a host name/);
});

class FakeStream {
  out = "";
  constructor(readonly isTTY: boolean) {}
  write(s: string): boolean {
    this.out += s;
    return true;
  }
}

test("progress: a spinner with elapsed time after the delay, only on a terminal, cleared at the end", async () => {
  const tty = new FakeStream(true);
  const p = new Progress(tty, { delayMs: 60, intervalMs: 10 });
  // A fast call shows nothing.
  await p.track("fast", () => sleep(5));
  assert.equal(tty.out, "");
  // A slow one shows its label and the elapsed seconds, then clears its line.
  const v = await p.track("creating vm web1", async () => {
    await sleep(200);
    return 42;
  });
  assert.equal(v, 42);
  // eslint-disable-next-line no-control-regex -- the terminal escape is what is checked
  assert.match(tty.out, /\r\x1b\[K. creating vm web1 … 0\.\ds/);
  assert.ok(tty.out.endsWith("\r\x1b[K"), "the line is cleared");
  // Several at once: one line, the oldest shown, the others counted.
  tty.out = "";
  await Promise.all([p.track("a", () => sleep(150)), p.track("b", () => sleep(150))]);
  assert.match(tty.out, /a \(\+1 more\)/);
  // Errors pass through, and the line is still cleared.
  tty.out = "";
  await assert.rejects(
    p.track("failing", async () => {
      await sleep(100);
      throw new Error("boom");
    }),
    /boom/,
  );
  assert.ok(tty.out.endsWith("\r\x1b[K"));

  // Not a terminal: never a byte.
  const pipe = new FakeStream(false);
  await new Progress(pipe, { delayMs: 10, intervalMs: 5 }).track("slow", () => sleep(80));
  assert.equal(pipe.out, "");
});
