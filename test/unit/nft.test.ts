// The nft transaction value (services/common/nft/tx.ts): what it refuses
// before rendering, what it renders; and FakeNft (fake.ts): nft's add /
// flush / delete semantics, atomic failure, sorted dump. Last, every
// firewall diff replayed against FakeNft must reach the same state as a
// full replace of its target.
import assert from "node:assert/strict";
import { describe, test } from "vitest";
import { FakeNft, FakeNftError } from "../../services/common/nft/fake.js";
import { NftTransaction, NftValidationError, render, type NftObject } from "../../services/common/nft/tx.js";
import { compile, elementDiff, failClosedTx, removeTx } from "../../services/firewall/compile.js";
import { hostTx, vpcTx } from "../../services/gateway/plan.js";
import { desiredPeering, peeringTx } from "../../services/netagent/peering-plan.js";
import { AB, BC, fw, gwHost, gwVpc } from "../lib/nft-fixtures.js";

const T = { family: "inet", table: "t" } as const;
const table = { kind: "table", family: "inet", name: "t" } as const;

describe("validation: a bad value throws before anything is rendered", () => {
  const refused: [string, NftObject, RegExp][] = [
    ["family", { ...table, family: "ipx" as never }, /^nft family "ipx": not one of ip, ip6, inet, arp, bridge, netdev$/],
    ["table name", { ...table, name: "1t" }, /^nft table "1t": not a name/],
    ["table name with a space", { ...table, name: "t x" }, /^nft table "t x": not a name/],
    ["chain name", { kind: "chain", ...T, name: "c;flush ruleset" }, /^nft chain name "c;flush ruleset": not a name/],
    ["set name too long", { kind: "set", ...T, name: "s".repeat(256), type: "ipv4_addr" }, /longer than 255 characters/],
    ["set type", { kind: "set", ...T, name: "s", type: "ipv4_addr; flush ruleset" }, /^nft set s type .*: not an nft type/],
    ["set with a map type", { kind: "set", ...T, name: "s", type: "ipv4_addr : verdict" }, /a set's type has no value/],
    ["map without a value", { kind: "map", ...T, name: "m", type: "ipv4_addr" }, /a map's type is "key : value"/],
    ["set flag", { kind: "set", ...T, name: "s", type: "ipv4_addr", flags: ["bogus" as never] }, /^nft set s flag "bogus": not one of/],
    ["set size", { kind: "set", ...T, name: "s", type: "ipv4_addr", size: 0 }, /size "0": not a positive integer/],
    ["elements outside a block", { kind: "set", ...T, name: "s", type: "ipv4_addr", elements: ["10.0.0.1"] }, /elements go in a table block/],
    ["element with a brace", { kind: "element", ...T, set: "s", elements: ["10.0.0.1 } flush ruleset {"] }, /^nft element of s .*: not an element/],
    ["element with a newline", { kind: "element", ...T, set: "s", elements: ["10.0.0.1\nflush ruleset"] }, /not an element/],
    ["element with a comma", { kind: "element", ...T, set: "s", elements: ["10.0.0.1, 10.0.0.2"] }, /not an element/],
    ["element with a semicolon", { kind: "element", ...T, set: "s", elements: ["10.0.0.1;"] }, /not an element/],
    ["element with a quote that is not an ifname", { kind: "element", ...T, set: "s", elements: ['"a b"'] }, /not an element/],
    ["element with an unbalanced quote", { kind: "element", ...T, set: "s", elements: ['"eth0'] }, /not an element/],
    ["no elements", { kind: "element", ...T, set: "s", elements: [] }, /no elements/],
    ["rule with a newline", { kind: "rule", ...T, chain: "c", rule: "accept\nflush ruleset" }, /^nft rule in t c .*: has a newline/],
    ["rule with ;", { kind: "rule", ...T, chain: "c", rule: "accept; flush ruleset" }, /has ";" outside quotes/],
    ["rule with #", { kind: "rule", ...T, chain: "c", rule: "accept # comment" }, /has "#" outside quotes/],
    ["rule with unbalanced braces", { kind: "rule", ...T, chain: "c", rule: "meta l4proto { tcp, udp accept" }, /unbalanced braces/],
    ["rule closing a brace first", { kind: "rule", ...T, chain: "c", rule: "accept } {" }, /unbalanced braces/],
    ["rule with unbalanced quotes", { kind: "rule", ...T, chain: "c", rule: 'accept comment "x' }, /unbalanced quotes/],
    ["empty rule", { kind: "rule", ...T, chain: "c", rule: "  " }, /empty/],
    ["chain hook", { kind: "chain", ...T, name: "c", base: { type: "filter", hook: "sideways" as never, priority: "0" } }, /hook "sideways": not one of/],
    ["chain priority", { kind: "chain", ...T, name: "c", base: { type: "filter", hook: "input", priority: "0; flush ruleset" } }, /priority .*: not a number/],
    [
      "chain policy",
      { kind: "chain", ...T, name: "c", base: { type: "filter", hook: "input", priority: "0", policy: "reject" as never } },
      /policy "reject": not accept or drop/,
    ],
    ["a rule inside a table block", { ...table, content: [{ kind: "chain", name: "c", rules: ["accept;"] }] }, /^nft rule in t c "accept;"/],
    ["an element inside a table block", { ...table, content: [{ kind: "set", name: "s", type: "ifname", elements: ['"eth0" }'] }] }, /not an element/],
  ];
  for (const [name, obj, msg] of refused) {
    test(name, () => {
      const tx = new NftTransaction();
      assert.throws(
        () => tx.add(obj),
        (err: Error) => err instanceof NftValidationError && msg.test(err.message),
      );
      assert.equal(render(tx), "", "nothing was recorded");
    });
  }

  test("verbs an object does not take", () => {
    const tx = new NftTransaction();
    assert.throws(() => tx.delete({ kind: "rule", ...T, chain: "c", rule: "accept" } as never), /nft operation "delete rule": not an nft operation we render/);
    assert.throws(() => tx.flush({ kind: "counter", ...T, name: "c" } as never), /"flush counter"/);
    assert.throws(() => tx.delete({ ...table, content: [] }), /only add takes a table's content/);
  });

  test("what our compilers write passes: quoted ifnames, anonymous sets, comments with spaces, verdict map elements", () => {
    const tx = new NftTransaction()
      .add({ kind: "rule", ...T, chain: "c", rule: 'oifname "br-*" meta l4proto { tcp, udp } counter drop comment "NIC not bound yet"' })
      .add({
        kind: "element",
        ...T,
        set: "s",
        elements: ['"v000000000001" . 02:00:0a:00:01:04 . 10.0.1.4', "10.0.1.4 : jump nic_000000000001_in", "tcp . 443 : 10.0.1.4 . 8443"],
      });
    assert.equal(tx.ops.length, 2);
  });
});

describe("render", () => {
  test("one line per operation, a table with content as a block, in order; empty renders nothing", () => {
    const tx = new NftTransaction()
      .add(table)
      .delete(table)
      .add({
        ...table,
        content: [
          { kind: "counter", name: "n" },
          { kind: "set", name: "s", type: "ipv4_addr", flags: ["interval"], autoMerge: true, elements: ["10.0.0.0/8"] },
          { kind: "set", name: "d", type: "ipv4_addr", size: 65535, flags: ["dynamic"] },
          { kind: "map", name: "m", type: "ipv4_addr : verdict" },
          { kind: "chain", name: "c", rules: ["counter name n accept"] },
          { kind: "chain", name: "forward", base: { type: "filter", hook: "forward", priority: "filter - 10", policy: "drop" }, rules: ["ip saddr @s accept"] },
        ],
      })
      .add({ kind: "element", ...T, set: "m", elements: ["10.0.0.1 : jump c"] })
      .insert({ kind: "rule", ...T, chain: "c", rule: "return" })
      .flush({ kind: "chain", ...T, name: "c" })
      .add({ kind: "set", ...T, name: "x", type: "inet_proto . inet_service", flags: ["interval"] })
      .delete({ kind: "set", ...T, name: "x", type: "inet_proto . inet_service" })
      .delete({ kind: "counter", ...T, name: "n" });
    assert.equal(
      render(tx),
      [
        "add table inet t",
        "delete table inet t",
        "table inet t {",
        "  counter n { }",
        "  set s { type ipv4_addr; flags interval; auto-merge; elements = { 10.0.0.0/8 }; }",
        "  set d { type ipv4_addr; size 65535; flags dynamic; }",
        "  map m { type ipv4_addr : verdict; }",
        "  chain c {",
        "    counter name n accept",
        "  }",
        "  chain forward {",
        "    type filter hook forward priority filter - 10; policy drop;",
        "    ip saddr @s accept",
        "  }",
        "}",
        "add element inet t m { 10.0.0.1 : jump c }",
        "insert rule inet t c return",
        "flush chain inet t c",
        "add set inet t x { type inet_proto . inet_service; flags interval; }",
        "delete set inet t x",
        "delete counter inet t n",
        "",
      ].join("\n"),
    );
    assert.equal(render(new NftTransaction()), "");
  });

  test("an op is what was validated: changing the caller's arrays afterwards changes nothing", () => {
    const elements = ["10.0.0.1"];
    const tx = new NftTransaction().add({ kind: "element", ...T, set: "s", elements });
    elements.push("10.0.0.2 } flush ruleset {");
    assert.equal(render(tx), "add element inet t s { 10.0.0.1 }\n");
  });
});

describe("FakeNft", () => {
  const base = () =>
    new NftTransaction().add({
      ...table,
      content: [
        { kind: "counter", name: "hits" },
        { kind: "set", name: "ok", type: "ipv4_addr" },
        { kind: "map", name: "to", type: "ipv4_addr : verdict" },
        { kind: "chain", name: "nic", rules: ["counter name hits accept"] },
        {
          kind: "chain",
          name: "forward",
          base: { type: "filter", hook: "forward", priority: "filter", policy: "accept" },
          rules: ["ip saddr @ok accept", "ip daddr vmap @to"],
        },
      ],
    });

  test("applies a transaction and dumps sorted text (tables, then counters, sets, chains by name; elements sorted)", () => {
    const f = new FakeNft();
    f.applySync(
      "ns1",
      base()
        .add({ kind: "element", ...T, set: "ok", elements: ["10.0.0.9", "10.0.0.1"] })
        .add({ kind: "element", ...T, set: "to", elements: ["10.0.0.5 : jump nic"] }),
    );
    f.applySync("ns1", new NftTransaction().add({ kind: "table", family: "bridge", name: "b" }));
    assert.equal(
      f.dump("ns1"),
      [
        "table bridge b {",
        "}",
        "table inet t {",
        "  counter hits { }",
        "  set ok { type ipv4_addr; elements = { 10.0.0.1, 10.0.0.9 }; }",
        "  map to { type ipv4_addr : verdict; elements = { 10.0.0.5 : jump nic }; }",
        "  chain forward {",
        "    type filter hook forward priority filter; policy accept;",
        "    ip saddr @ok accept",
        "    ip daddr vmap @to",
        "  }",
        "  chain nic {",
        "    counter name hits accept",
        "  }",
        "}",
        "",
      ].join("\n"),
    );
    assert.equal(f.dump("ns2"), "", "namespaces are apart");
    assert.deepEqual(f.namespaces(), ["ns1"]);
  });

  test("add is idempotent for tables, chains, sets and elements; create fails on what exists", () => {
    const f = new FakeNft();
    f.applySync("n", base());
    const twice = new NftTransaction()
      .add(table)
      .add({ kind: "chain", ...T, name: "nic" })
      .add({ kind: "element", ...T, set: "ok", elements: ["10.0.0.1"] });
    f.applySync("n", twice);
    f.applySync("n", twice);
    assert.match(f.dump("n"), /elements = \{ 10\.0\.0\.1 \}/);
    assert.throws(() => f.applySync("n", new NftTransaction().create(table)), /File exists/);
    assert.throws(() => f.applySync("n", new NftTransaction().create({ kind: "element", ...T, set: "ok", elements: ["10.0.0.1"] })), /File exists/);
  });

  test("a failing operation fails the whole transaction: nothing before it stays", () => {
    const f = new FakeNft();
    f.applySync("n", base());
    const before = f.dump("n");
    const tx = new NftTransaction()
      .add({ kind: "element", ...T, set: "ok", elements: ["10.0.0.7"] })
      .flush({ kind: "chain", ...T, name: "nic" })
      .delete({ kind: "element", ...T, set: "ok", elements: ["10.9.9.9"] });
    assert.throws(
      () => f.applySync("n", tx),
      (err: Error) =>
        err instanceof FakeNftError &&
        /No such file or directory \(element 10\.9\.9\.9\)/.test(err.message) &&
        err.op === "delete element inet t ok { 10.9.9.9 }",
    );
    assert.equal(f.dump("n"), before);
    assert.equal(f.applied.at(-1)?.error?.split("\n")[0], "Error: Could not process rule: No such file or directory (element 10.9.9.9)");
  });

  test("deleting or flushing what is missing fails; so does deleting what is still used", () => {
    const f = new FakeNft();
    assert.throws(() => f.applySync("n", new NftTransaction().delete(table)), /No such file or directory \(table\)/);
    f.applySync("n", base());
    const fails: [NftTransaction, RegExp][] = [
      [new NftTransaction().flush({ kind: "chain", ...T, name: "gone" }), /No such file or directory \(chain\)/],
      [new NftTransaction().delete({ kind: "set", ...T, name: "gone", type: "ipv4_addr" }), /No such file or directory \(set\)/],
      [new NftTransaction().delete({ kind: "counter", ...T, name: "gone" }), /No such file or directory \(counter\)/],
      [new NftTransaction().delete({ kind: "chain", ...T, name: "nic" }), /the chain has rules/],
      [new NftTransaction().delete({ kind: "set", ...T, name: "ok", type: "ipv4_addr" }), /a rule uses the set/],
      [new NftTransaction().delete({ kind: "counter", ...T, name: "hits" }), /a rule uses the counter/],
      [new NftTransaction().add({ kind: "rule", ...T, chain: "nic", rule: "ip saddr @nope accept" }), /No such file or directory \(set nope\)/],
      [new NftTransaction().add({ kind: "rule", ...T, chain: "nic", rule: "jump nope" }), /No such file or directory \(chain nope\)/],
      [new NftTransaction().add({ kind: "element", ...T, set: "to", elements: ["10.0.0.1 : jump nope"] }), /chain nope/],
    ];
    for (const [tx, msg] of fails) assert.throws(() => f.applySync("n", tx), msg, render(tx));
    // A chain a map element jumps to is busy until the element goes.
    f.applySync("n", new NftTransaction().add({ kind: "chain", ...T, name: "x" }).add({ kind: "element", ...T, set: "to", elements: ["10.0.0.2 : jump x"] }));
    assert.throws(() => f.applySync("n", new NftTransaction().delete({ kind: "chain", ...T, name: "x" })), /a jump refers to the chain/);
    f.applySync(
      "n",
      new NftTransaction().delete({ kind: "element", ...T, set: "to", elements: ["10.0.0.2 : jump x"] }).delete({ kind: "chain", ...T, name: "x" }),
    );
    // delete table takes everything in it.
    f.applySync("n", new NftTransaction().delete(table));
    assert.equal(f.dump("n"), "");
  });

  test("the firewall's reads: its table, its counters, conntrack", async () => {
    const f = new FakeNft();
    assert.equal(await f.tableExists("n"), false);
    await f.apply("n", failClosedTx());
    assert.equal(await f.tableExists("n"), false, "the fail-closed skeleton is not the firewall's table");
    await f.apply("n", compile(fw(0)).tx);
    assert.equal(await f.tableExists("n"), true);
    // The skeleton after the firewall's pass: created, it fails whole and adds nothing.
    const before = f.dump("n");
    await assert.rejects(f.apply("n", failClosedTx()), /File exists/);
    assert.equal(f.dump("n"), before);
    // Merged all the same (added): drift, for the next pass to replace.
    const merged = new FakeNft();
    merged.applySync("n", compile(fw(0)).tx);
    merged.applySync(
      "n",
      new NftTransaction().add({
        kind: "chain",
        family: "bridge",
        table: "microvpc",
        name: "closed",
        base: { type: "filter", hook: "forward", priority: "filter", policy: "drop" },
      }),
    );
    assert.equal(await merged.tableExists("n"), false, "a skeleton chain in the firewall's tables is drift");
    assert.deepEqual(
      [...(await f.counters("n")).keys()].sort().slice(0, 4),
      ["cnt_in_drop/10.0.1.4", "cnt_in_drop/10.0.2.4", "cnt_in_drop/10.0.2.5", "cnt_in_new/10.0.1.4"],
      "a NIC's counts are its address's element counters",
    );
    assert.ok((await f.counters("n")).has("spoofed"), "and the bridge table's spoofed counter");
    f.conntrack.set("n", [{ proto: "tcp", src: "10.0.1.4", dst: "10.0.2.4", sport: 1000, dport: 5432 }]);
    assert.equal(await f.conntrackClear("n", (e) => e.dport === 5432), 1);
    assert.deepEqual(await f.conntrackList("n"), []);
    await f.apply("n", removeTx());
    assert.equal(f.dump("n"), "");
  });
});

describe("the builders' transactions in FakeNft", () => {
  test("every firewall diff a→b applied on a's full replace gives exactly b's full replace", () => {
    for (let a = 0; a < 4; a++) {
      for (let b = 0; b < 4; b++) {
        const f = new FakeNft();
        f.applySync("inc", compile(fw(a)).tx);
        const d = elementDiff(compile(fw(a)).model, compile(fw(b)).model);
        assert.ok(d, "the skeleton never changes within one VPC");
        f.applySync("inc", d.tx);
        f.applySync("full", compile(fw(b)).tx);
        assert.equal(f.dump("inc"), f.dump("full"), `diff ${a}→${b}`);
      }
    }
  });

  test("the full replace over the fail-closed skeleton takes its place; applying it twice changes nothing", () => {
    const f = new FakeNft();
    f.applySync("a", failClosedTx());
    f.applySync("a", compile(fw(0)).tx);
    const once = f.dump("a");
    assert.doesNotMatch(once, /chain closed/);
    f.applySync("a", compile(fw(0)).tx);
    assert.equal(f.dump("a"), once);
  });

  test("the gateway's and the peering filter's replaces load, and replace (not add to) what was there", () => {
    const f = new FakeNft();
    f.applySync("vpc", vpcTx(gwVpc({ nat: true }), 8775, 53, 100));
    f.applySync("vpc", vpcTx(gwVpc(), 8775));
    const fresh = new FakeNft();
    fresh.applySync("vpc", vpcTx(gwVpc(), 8775));
    assert.equal(f.dump("vpc"), fresh.dump("vpc"));
    f.applySync("host", hostTx(gwHost()));
    assert.match(f.dump("host"), /set imds_hop_3 \{ type ipv4_addr \. ipv4_addr; elements = \{ 169\.254\.1\.1 \. 10\.0\.1\.5 \}; \}/);
    const want = desiredPeering(new Set(["vpc-aaaaaaaaaaaa", "vpc-bbbbbbbbbbbb", "vpc-cccccccccccc"]), [AB, BC], (v) => `ns-${v.slice(-4)}`);
    f.applySync("ns-bbbb", peeringTx(want.get("ns-bbbb")));
    assert.match(f.dump("ns-bbbb"), /set pc00000000000a_src \{ type ipv4_addr; flags interval; elements = \{ 10\.1\.0\.0\/16 \}; \}/);
    f.applySync("ns-bbbb", peeringTx(undefined));
    assert.equal(f.dump("ns-bbbb"), "", "no peering: the table goes");
  });
});
