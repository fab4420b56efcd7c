import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { test } from "vitest";
import { pino } from "pino";
import { render, type NftTransaction } from "../../services/common/nft/tx.js";
import { CtMarks, RETIRE_DELAY_MS } from "../../services/netagent/ct-mark-state.js";
import type { Kernel } from "../../services/netagent/kernel.js";
import {
  addTx,
  delTx,
  freeIndex,
  markCommands,
  markFilters,
  parseListing,
  planMarks,
  staleFlow,
  tableTx,
  type NicMark,
} from "../../services/netagent/ct-marks.js";

const a: NicMark = { address: "10.1.0.5", index: 5, adopted: false };
const b: NicMark = { address: "10.1.0.7", index: 7, adopted: true };

/** What `nft -j list table inet microvpc_ct` gives for these marks (the shape nft 1.0.6 prints); a "nicN" mark with its check unless `unchecked`. */
function listing(marks: NicMark[], extra: unknown[] = [], rules = 4, unchecked: NicMark[] = [], drops = 0): unknown[] {
  const chain = (name: string) => ({ chain: { family: "inet", table: "microvpc_ct", name } });
  // The base chains' rules; the checks (the last two) with their counters, the drops in prerouting's last.
  const rule = (c: string, packets?: number) => ({
    rule: {
      family: "inet",
      table: "microvpc_ct",
      chain: c,
      expr: packets === undefined ? [] : [{ counter: { packets, bytes: packets * 40 } }, { drop: null }],
    },
  });
  const base = (c: string) => Array.from({ length: rules }, (_, i) => rule(c, i < 2 ? undefined : c === "prerouting" && i === rules - 1 ? drops : 0));
  const checked = marks.filter((m) => !m.adopted && !unchecked.includes(m));
  return [
    { metainfo: { version: "1.0.6" } },
    { table: { family: "inet", name: "microvpc_ct" } },
    { map: { name: "nic_src", map: "mark", elem: marks.map((m) => [m.address, m.index << 16]) } },
    { map: { name: "nic_dst", map: "verdict", elem: marks.map((m) => [m.address, { jump: { target: `${m.adopted ? "adopted" : "nic"}${m.index}` } }]) } },
    ...(rules === 2 ? [] : [{ set: { name: "nic_chk", type: "ipv4_addr", elem: checked.map((m) => m.address) } }]),
    chain("prerouting"),
    ...base("prerouting"),
    chain("output"),
    ...base("output"),
    ...marks.flatMap((m) => [chain(`${m.adopted ? "adopted" : "nic"}${m.index}`), rule(`${m.adopted ? "adopted" : "nic"}${m.index}`)]),
    ...extra,
  ];
}

test("a NIC's mark: source half by map, destination half by its chain, a check of the flows older than it; cleared by two kernel-side mark filters", () => {
  assert.equal(
    render(addTx(a)),
    [
      "add chain inet microvpc_ct nic5",
      "add rule inet microvpc_ct nic5 ct mark set ct mark or 0x00000005",
      "add element inet microvpc_ct nic_src { 10.1.0.5 : 0x00050000 }",
      "add element inet microvpc_ct nic_dst { 10.1.0.5 : jump nic5 }",
      // A flow from before the mark (its half 0) neither reaches nor leaves the NIC.
      "add element inet microvpc_ct nic_chk { 10.1.0.5 }",
      "",
    ].join("\n"),
  );
  assert.doesNotMatch(render(addTx(b)), /nic_chk/, "an adopted NIC's own flows may carry no mark: no check");
  assert.equal(
    render(delTx(a)),
    [
      "delete element inet microvpc_ct nic_chk { 10.1.0.5 }",
      "delete element inet microvpc_ct nic_dst { 10.1.0.5 }",
      "delete element inet microvpc_ct nic_src { 10.1.0.5 }",
      "delete chain inet microvpc_ct nic5",
      "",
    ].join("\n"),
  );
  assert.match(
    render(delTx(b)),
    /delete element inet microvpc_ct nic_dst \{ 10.1.0.7 \}\ndelete element inet microvpc_ct nic_src \{ 10.1.0.7 \}\ndelete chain inet microvpc_ct adopted7\n/,
  );
  assert.deepEqual(markFilters(5), [
    { value: 0x50000, mask: 0xffff0000 },
    { value: 5, mask: 0xffff },
  ]);
  assert.deepEqual(markFilters(0xffff), [
    { value: 0xffff0000, mask: 0xffff0000 },
    { value: 0xffff, mask: 0xffff },
  ]);
  assert.deepEqual(markCommands(5), ["-D -m 0x00050000/0xffff0000", "-D -m 0x00000005/0x0000ffff"]);
  assert.equal(freeIndex(new Set([1, 2, 4])), 3);
  assert.equal(freeIndex(new Set(Array.from({ length: 0xffff }, (_, i) => i + 1))), 0, "all taken");
});

test("reading the table back: whole marks kept, anything inconsistent is a stray, damaged base chains replace the table", () => {
  const ok = parseListing(listing([a, b]));
  assert.equal(ok.intact, true);
  assert.deepEqual([...ok.marks.values()], [a, b]);
  assert.deepEqual(ok.strays, { dst: [], src: [], chk: [], chains: [] });
  assert.deepEqual(ok.unchecked, []);

  // A source value that disagrees with the chain, an address that is not one, a jump to a missing chain,
  // an index out of range, a chain nobody jumps to: strays, never marks (the table is input too).
  const bad = listing(
    [a],
    [
      { map: { name: "nic_src", elem: [["10.1.0.9", 0x90000]] } },
      {
        map: {
          name: "nic_dst",
          elem: [
            ["10.1.0.9", { jump: { target: "nic8" } }],
            ["10.1.0.10; drop", { jump: { target: "nic9" } }],
            ["10.1.0.11", { jump: { target: "nic70000" } }],
          ],
        },
      },
      { chain: { name: "nic8" } },
      { chain: { name: "nic9" } },
      { rule: { chain: "nic9" } },
      { chain: { name: "stray3" } },
    ],
  );
  const p = parseListing(bad);
  assert.deepEqual([...p.marks.keys()], ["10.1.0.5"]);
  assert.deepEqual(p.strays.dst.sort(), ["10.1.0.10; drop", "10.1.0.11", "10.1.0.9"]);
  assert.deepEqual(p.strays.src, ["10.1.0.9"]);
  assert.deepEqual(p.strays.chains.sort(), ["nic8", "nic9", "stray3"]);
  assert.equal(p.intact, false, "a key that is no address cannot be deleted by name: the table is replaced");
  assert.equal(parseListing(listing([a], [], 1)).intact, false, "a base chain lost a rule");
  assert.equal(parseListing(listing([a], [], 3)).intact, false, "a rule too many or too few: replaced");

  // A "nicN" mark whose address is missing from nic_chk: the mark stands and gets it back; an adopted
  // mark's address or an unknown one there is a stray.
  const missing = parseListing(listing([a, b], [], 4, [a]));
  assert.deepEqual([...missing.marks.values()], [a, b]);
  assert.deepEqual(missing.unchecked, [a]);
  assert.equal(render(planMarks(missing, [a.address, b.address], { removeOrphans: true }).tx), "add element inet microvpc_ct nic_chk { 10.1.0.5 }\n");
  assert.doesNotMatch(
    render(planMarks(missing, [b.address], { removeOrphans: true }).tx),
    /nic_chk/,
    "an orphan whose address is missing: nothing to delete there",
  );
  const extra = parseListing(listing([a, b], [{ set: { name: "nic_chk", elem: ["10.1.0.5", "10.1.0.7", "10.1.0.99"] } }]));
  assert.deepEqual(extra.unchecked, []);
  assert.deepEqual(extra.strays, { dst: [], src: [], chk: ["10.1.0.7", "10.1.0.99"], chains: [] });
  assert.match(
    render(planMarks(extra, [a.address, b.address], { removeOrphans: true }).tx),
    /^delete element inet microvpc_ct nic_chk \{ 10\.1\.0\.7, 10\.1\.0\.99 \}/,
  );
});

test("a pass: desired NICs without a mark are adopted, orphans go (only with removeOrphans), an index removed in the pass is not reused in it", () => {
  // c holds index 1, the lowest: removed as an orphan (its flows not cleared), so the new NIC gets 2.
  const c: NicMark = { address: "10.1.0.3", index: 1, adopted: false };
  const p = planMarks(parseListing(listing([a, b, c])), ["10.1.0.5", "10.1.0.9"], { removeOrphans: true });
  assert.deepEqual([...p.marks.values()], [a, { address: "10.1.0.9", index: 2, adopted: true }]);
  assert.deepEqual(p.removed, [b, c]);
  const text = render(p.tx);
  assert.match(text, /delete element inet microvpc_ct nic_dst \{ 10.1.0.7 \}/);
  assert.match(text, /add element inet microvpc_ct nic_dst \{ 10.1.0.9 : jump adopted2 \}/);
  assert.doesNotMatch(text, /10\.1\.0\.5/, "a whole mark is left alone");

  const keep = planMarks(parseListing(listing([a, b])), [], { removeOrphans: false });
  assert.equal(keep.tx.empty, true, "without removeOrphans (a first read) nothing changes");

  const none = planMarks(null, ["10.1.0.5"], { removeOrphans: true });
  assert.match(render(none.tx), /^table inet microvpc_ct \{/, "no table: made, then the NIC adopted");
  assert.deepEqual([...none.marks.values()], [{ address: "10.1.0.5", index: 1, adopted: true }]);
  const damaged = planMarks(parseListing(listing([a], [], 0)), ["10.1.0.5"], { removeOrphans: true });
  assert.match(render(damaged.tx), /^delete table inet microvpc_ct\ntable inet microvpc_ct \{/, "damaged: replaced");
  assert.equal(damaged.marks.get("10.1.0.5")!.adopted, true, "its flows may have missed the mark meanwhile");
});

test("an earlier netagent's table (two rules per base chain, no checks): its marks stay, the checks join it, in a real namespace too", () => {
  const p = parseListing(listing([a, b], [], 2, [a]));
  assert.equal(p.intact, true);
  assert.equal(p.earlier, true);
  assert.deepEqual(p.unchecked, [a], "its nicN mark gets a check");
  const text = render(planMarks(p, [a.address, b.address], { removeOrphans: true }).tx);
  assert.match(text, /^add set inet microvpc_ct nic_chk \{ type ipv4_addr; \}\n/);
  assert.equal(
    (
      text.match(
        /add rule inet microvpc_ct (prerouting|output) ct state established,related ct mark and 0x[0f]{8} == 0 ct original ip [sd]addr @nic_chk counter drop/g,
      ) ?? []
    ).length,
    4,
  );
  assert.match(text, /add element inet microvpc_ct nic_chk \{ 10\.1\.0\.5 \}/);
  assert.doesNotMatch(text, /delete|10\.1\.0\.7/, "nothing removed; the adopted mark gets no check");

  if (spawnSync("unshare", ["-n", "true"]).status !== 0) return; // not root
  // The table as the earlier netagent wrote it (tableTx without the checks' set and rules), and its marks.
  const earlier = render(tableTx())
    .split("\n")
    .filter((l) => !/nic_chk/.test(l))
    .join("\n");
  const marksText =
    render(addTx(b)) +
    render(addTx(a))
      .split("\n")
      .filter((l) => !/nic_chk/.test(l))
      .join("\n");
  const sh = (more: string) =>
    spawnSync("unshare", ["-n", "sh", "-c", `nft -f /dev/fd/3 3<<'A'\n${earlier}${marksText}A\n${more}nft -j list table inet microvpc_ct`], {
      encoding: "utf8",
    });
  const r0 = sh("");
  assert.equal(r0.status, 0, r0.stderr);
  const before = parseListing((JSON.parse(r0.stdout) as { nftables: unknown[] }).nftables);
  assert.equal(before.earlier, true, r0.stdout);
  const fix = render(planMarks(before, [a.address, b.address], { removeOrphans: true }).tx);
  const r1 = sh(`nft -f /dev/fd/4 4<<'B'\n${fix}B\n`);
  assert.equal(r1.status, 0, r1.stderr);
  const after = parseListing((JSON.parse(r1.stdout) as { nftables: unknown[] }).nftables);
  assert.equal(after.intact, true);
  assert.equal(after.earlier, false);
  assert.deepEqual(
    [...after.marks.values()].sort((x, y) => x.index - y.index),
    [a, b],
    "the marks kept, index and all",
  );
  assert.deepEqual(after.unchecked, []);
  assert.deepEqual(after.strays, { dst: [], src: [], chk: [], chains: [] });
  assert.equal(after.drops, 0);
});

test("the table in a throwaway namespace: nft takes it, and its listing reads back as the marks put in", () => {
  if (spawnSync("unshare", ["-n", "true"]).status !== 0) return; // not root
  const script = render(tableTx()) + render(addTx(a)) + render(addTx(b));
  const r = spawnSync("unshare", ["-n", "sh", "-c", `nft -f /dev/fd/3 3<<'A'\n${script}A\nnft -j list table inet microvpc_ct`], { encoding: "utf8" });
  assert.equal(r.status, 0, r.stderr);
  const back = parseListing((JSON.parse(r.stdout) as { nftables: unknown[] }).nftables);
  assert.equal(back.intact, true);
  assert.deepEqual([...back.marks.values()], [a, b]);
  assert.deepEqual(back.strays, { dst: [], src: [], chk: [], chains: [] });
  assert.deepEqual(back.unchecked, []);
});

/** The kernel as CtMarks uses it: nft transactions (deletions held until released), the table's listing (`table`), and flows cleared. */
function heldKernel(table: unknown[] | null = null) {
  const applied: string[] = [];
  const clears: string[] = [];
  let release!: () => void;
  const held = new Promise<void>((r) => (release = r));
  const kernel = {
    nft: async (_ns: string, tx: NftTransaction) => {
      const text = render(tx);
      if (text.startsWith("delete element")) await held;
      applied.push(text);
    },
    nftTable: async () => table,
    clearNic: async (_ns: string, address: string, index: number | null) => {
      clears.push(`${address} ${index ?? "by address"}`);
      return 2;
    },
    clearStale: async (ns: string, ms: NicMark[]) => {
      clears.push(`${ns} stale ${ms.map((m) => `${m.address}=${m.index}`).join(",")}`);
      return 1;
    },
  } as unknown as Kernel;
  return { kernel, applied, clears, release };
}

test("a mark left in the table without its NIC (the agent stopped before the retire): its flows go before its address has another NIC", async () => {
  // After a restart the table still holds 10.1.0.5's mark (index 5) and an adopted one (index 7); no NIC has either.
  const { kernel, applied, clears, release } = heldKernel(listing([a, b]));
  release();
  const marks = new CtMarks(kernel, pino({ level: "silent" }));
  // A new NIC of 10.1.0.5 before any reconcile pass: handed the mark only after its flows were cleared, by its index.
  const x = await marks.attach("ns1", a.address, { fresh: true });
  assert.deepEqual(x, a);
  assert.deepEqual(clears, ["10.1.0.5 5"], "the leftover mark's flows cleared first");
  // The same NIC's mark asked for again (not a new NIC): nothing cleared.
  await marks.attach("ns1", a.address);
  assert.equal(clears.length, 1);
  // A reconcile pass whose desired NICs are only 10.1.0.5: the adopted orphan goes, and its flows with it, by address.
  const changes = await marks.reconcile("ns1", [a.address], true);
  assert.deepEqual(changes, ["remove NIC mark 7 of 10.1.0.7"]);
  assert.match(applied.at(-1)!, /delete element inet microvpc_ct nic_src \{ 10\.1\.0\.7 \}/);
  assert.deepEqual(clears, ["10.1.0.5 5", "10.1.0.7 by address"], "its flows may carry no mark: found by address");
});

test("a detached NIC's mark retires after the answer: while it leaves, its index is not given out and its address waits until it is out and its flows cleared again", async () => {
  const { kernel, applied, release } = heldKernel();
  const marks = new CtMarks(kernel, pino({ level: "silent" }));
  await marks.created("ns1");
  const x = await marks.attach("ns1", "10.1.0.5");
  assert.equal(x.index, 1);
  const m = await marks.detach("ns1", "10.1.0.5");
  assert.deepEqual(m, x, "detach hands the mark over; the table is not touched yet");
  assert.ok(!applied.some((t) => t.startsWith("delete")));
  const cleared: (number | null)[] = [];
  assert.equal(
    marks.retire("ns1", m!, async (index) => (cleared.push(index), 0)),
    true,
  );

  // Its removal begins (settle takes it out now, not RETIRE_DELAY_MS later), and is held in the kernel.
  const settled = marks.settle("ns1");
  await new Promise((r) => setTimeout(r, 5));
  // While it is leaving: another NIC gets another index, the same address waits.
  const y = await marks.attach("ns1", "10.1.0.6");
  assert.equal(y.index, 2, "index 1 is not given out while its flows may still be marked");
  let reattached: NicMark | undefined;
  const again = marks.attach("ns1", "10.1.0.5").then((r) => (reattached = r));
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(reattached, undefined, "the address waits for its previous NIC's mark to be out");
  assert.deepEqual(cleared, [], "the second clear comes after the mark is out");

  release();
  await again;
  await settled;
  assert.deepEqual(cleared, [1], "then the flows that got index 1 meanwhile were cleared, by that index");
  const lastAdd = applied.reduce((k, t, i) => (t.includes("10.1.0.5 : jump nic") ? i : k), -1);
  assert.ok(applied.findIndex((t) => t.startsWith("delete element")) < lastAdd, "out before in again");
  assert.equal(reattached!.index, 1, "the index is free again once cleared");
  await marks.settle();
});

test("retiring marks wait RETIRE_DELAY_MS and leave together, in one transaction; the next NIC of a retiring address takes its mark over, flows cleared first", async () => {
  const { kernel, applied, release } = heldKernel();
  release();
  const marks = new CtMarks(kernel, pino({ level: "silent" }));
  await marks.created("ns1");
  const cleared: (number | null)[] = [];
  const clear = async (index: number | null) => (cleared.push(index), 0);
  const [a5, a6, a7] = [await marks.attach("ns1", "10.1.0.5"), await marks.attach("ns1", "10.1.0.6"), await marks.attach("ns1", "10.1.0.7")];
  for (const a of [a5, a6, a7]) marks.retire("ns1", (await marks.detach("ns1", a.address))!, clear);

  // The usual DeleteVm then CreateVm: the next NIC gets the lowest free address, the one just retired.
  const t = await marks.attach("ns1", "10.1.0.5");
  assert.deepEqual(t, a5, "the same mark, index and all");
  assert.deepEqual(cleared, [1], "the flows that got it since the detach were cleared before it was handed over");
  assert.ok(!applied.some((x) => x.startsWith("delete")), "nothing left the table for it, nothing was added again");
  assert.equal(applied.filter((x) => x.includes("10.1.0.5 : jump")).length, 1);

  // A NIC of another address: a fresh index (2 and 3 are still marked in the table).
  assert.equal((await marks.attach("ns1", "10.1.0.9")).index, 4);

  await new Promise((r) => setTimeout(r, RETIRE_DELAY_MS / 2));
  assert.ok(!applied.some((x) => x.startsWith("delete")), "not before RETIRE_DELAY_MS");
  await new Promise((r) => setTimeout(r, RETIRE_DELAY_MS / 2 + 100));
  await marks.settle();
  const deletions = applied.filter((x) => x.startsWith("delete"));
  assert.equal(deletions.length, 1, "one transaction for both");
  assert.match(deletions[0], /10\.1\.0\.6/);
  assert.match(deletions[0], /10\.1\.0\.7/);
  assert.doesNotMatch(deletions[0], /10\.1\.0\.5/, "the mark taken over stays");
  assert.deepEqual([...cleared].sort(), [1, 2, 3], "each left mark's flows cleared again, by its index");
  assert.equal((await marks.attach("ns1", "10.1.0.10")).index, 2, "their indexes are free again");
});

test("flows older than a NIC's mark: those whose half for the NIC's address is 0 (a flow that began while the address was elsewhere); an adopted mark's never", () => {
  const stale = staleFlow([a, b]);
  const e = (src: string, dst: string, mark?: number) => ({ src, dst, mark });
  // 10.1.0.5 is mark 5: as source its half is mark >>> 16, as destination mark & 0xffff.
  assert.equal(stale(e("10.1.0.9", "10.1.0.5", 0x00090000)), true, "toward it, begun while it was no NIC here (destination half 0)");
  assert.equal(stale(e("10.1.0.5", "10.1.0.9", 0x00000009)), true, "from it, begun elsewhere (source half 0)");
  assert.equal(
    stale(e("10.1.0.9", "10.1.0.5", 0x00090003)),
    false,
    "another index in its half: cannot occur (cleared before the address had this NIC), and the check passes it",
  );
  assert.equal(stale(e("10.1.0.9", "10.1.0.5", 0x00090005)), false, "its own flow");
  assert.equal(stale(e("10.1.0.5", "10.1.0.9", 0x00050000)), false, "its own flow, from it");
  assert.equal(stale(e("10.1.0.5", "10.1.0.5", 0x00050005)), false);
  assert.equal(stale(e("10.1.0.7", "10.1.0.9", 0)), false, "10.1.0.7's mark is adopted: its flows may carry none");
  assert.equal(stale(e("10.1.0.8", "10.1.0.9", 0)), false, "no NIC of these marks");
  assert.equal(stale(e("10.1.0.9", "10.1.0.5")), false, "an entry whose mark is unknown is never picked");
});

test("checks that dropped packets since the last pass: the flows older than their NIC's mark are deleted by the pass, in one dump; not again while the count stands", async () => {
  const c: NicMark = { address: "10.1.0.3", index: 3, adopted: false };
  let drops = 0;
  const { kernel, clears, release } = heldKernel();
  release();
  (kernel as unknown as { nftTable: () => Promise<unknown[]> }).nftTable = async () => listing([a, b, c], [], 4, [], drops);
  const marks = new CtMarks(kernel, pino({ level: "silent" }));
  const desired = [a.address, b.address, c.address];
  // The first read of a namespace from an attach (marksOf): it never dumps, whatever the counters say.
  drops = 3;
  await marks.attach("ns2", "10.1.0.5");
  assert.deepEqual(clears, [], "an attach does not sweep");
  drops = 0;
  assert.deepEqual(await marks.reconcile("ns1", desired, true), [], "no drops: no dump");
  drops = 5;
  assert.deepEqual(await marks.reconcile("ns1", desired, true), ["delete 1 flow(s) older than their NIC's mark"]);
  assert.deepEqual(clears, ["ns1 stale 10.1.0.5=5,10.1.0.3=3"], "one dump, for the checked NICs (not the adopted one)");
  await marks.reconcile("ns1", desired, true);
  assert.equal(clears.length, 1, "the count did not grow: nothing to delete");
  drops = 2;
  await marks.reconcile("ns1", desired, true);
  assert.equal(clears.length, 2, "below what was seen: the table counts from 0 again, and 2 were dropped");
  assert.equal(parseListing(listing([a, b, c], [], 4, [], 7)).drops, 7);
});
