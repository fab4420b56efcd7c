// Coalescer (services/common/coalesce.ts): the calls made in one turn of the
// event loop under one key go to `run` together, in order, each answered
// with its own item; a full group is handed over and the next call starts
// another; a later turn, or another key, is another group.
import assert from "node:assert/strict";
import { test } from "vitest";
import { Coalescer, type Settled } from "../../services/common/coalesce.js";

/** A Coalescer whose run records its groups and answers item i with f(item) (or its error). */
function recording(max: number, f: (x: number) => Settled<string> = (x) => ({ ok: true, value: `v${x}` })) {
  const groups: { key: string; items: number[] }[] = [];
  const sizes: number[] = [];
  const c = new Coalescer<number, string>(
    async (key, items) => {
      groups.push({ key, items: [...items] });
      return items.map(f);
    },
    max,
    (n) => sizes.push(n),
  );
  return { c, groups, sizes };
}

const turn = () => new Promise((r) => setImmediate(r));

test("calls in one turn, also after promise continuations, go in one group in their order; each gets its own answer", async () => {
  const { c, groups, sizes } = recording(64);
  const first = [c.add("s", 1), c.add("s", 2)];
  // A call made in a promise continuation of the same turn (a handler after an awaited cache hit).
  const late = Promise.resolve().then(() => c.add("s", 3));
  assert.deepEqual(await Promise.all([...first, late]), ["v1", "v2", "v3"]);
  assert.deepEqual(groups, [{ key: "s", items: [1, 2, 3] }]);
  assert.deepEqual(sizes, [3]);
});

test("a lone call is a group of one, run in its own turn; a call in a later turn is another group", async () => {
  const { c, groups } = recording(64);
  assert.equal(await c.add("s", 1), "v1");
  assert.equal(await c.add("s", 2), "v2");
  assert.deepEqual(
    groups.map((g) => g.items),
    [[1], [2]],
  );
});

test("other keys are other groups; a full group is handed over and the next call starts another", async () => {
  const { c, groups } = recording(2);
  const all = await Promise.all([c.add("a", 1), c.add("b", 2), c.add("a", 3), c.add("a", 4), c.add("a", 5)]);
  assert.deepEqual(all, ["v1", "v2", "v3", "v4", "v5"]);
  assert.deepEqual(
    groups.map((g) => `${g.key}:${g.items.join(",")}`),
    ["a:1,3", "b:2", "a:4,5"],
  );
  await turn();
  assert.equal(groups.length, 3, "no empty group left behind");
});

test("one item's error is that caller's alone; the others are answered", async () => {
  const { c } = recording(64, (x) => (x === 2 ? { ok: false, error: new Error("two is taken") } : { ok: true, value: `v${x}` }));
  const r = await Promise.allSettled([c.add("s", 1), c.add("s", 2), c.add("s", 3)]);
  assert.deepEqual(
    r.map((x) => (x.status === "fulfilled" ? x.value : (x.reason as Error).message)),
    ["v1", "two is taken", "v3"],
  );
});

test("run rejecting, or answering the wrong number of items, fails every caller of the group with it; the next group runs", async () => {
  let mode: "down" | "short" | "ok" = "down";
  const c = new Coalescer<number, number>(async (_k, items) => {
    if (mode === "down") throw new Error("Redis unavailable");
    if (mode === "short") return [{ ok: true, value: 0 }];
    return items.map((x) => ({ ok: true, value: x * 10 }));
  }, 64);
  const down = await Promise.allSettled([c.add("s", 1), c.add("s", 2)]);
  assert.deepEqual(
    down.map((x) => x.status === "rejected" && (x.reason as Error).message),
    ["Redis unavailable", "Redis unavailable"],
  );
  mode = "short";
  const short = await Promise.allSettled([c.add("s", 1), c.add("s", 2)]);
  assert.ok(short.every((x) => x.status === "rejected" && /answered 1 items/.test((x.reason as Error).message)));
  mode = "ok";
  assert.deepEqual(await Promise.all([c.add("s", 1), c.add("s", 2)]), [10, 20]);
});

test("max below 1 is refused", () => {
  assert.throws(() => new Coalescer(async () => [], 0), /max 0 < 1/);
});

test("IPAM's groups (allocationGroups): a group whose script fails is run again call by call, each caller with its own outcome; a lone call is never grouped", async () => {
  const { allocationGroups } = await import("../../services/ipam/service.js");
  const many: number[] = [];
  const alone: string[] = [];
  const fake = {
    allocateMany: async (_s: unknown, items: unknown[]) => {
      many.push(items.length);
      throw new Error("Command timed out");
    },
    allocate: async (_s: unknown, owner: string) => {
      alone.push(owner);
      if (owner === "vm-2") throw new Error("vm-2's own failure");
      return { alloc: { owner }, created: owner !== "vm-1" };
    },
  };
  const g = allocationGroups(fake as never);
  const s = { id: "sn-000000000001" } as never;
  const got = await Promise.allSettled(["vm-1", "vm-2", "vm-3"].map((owner) => g.add("sn-000000000001", { s, owner, requestId: "r", wanted: -1 })));
  assert.deepEqual(many, [3]);
  assert.deepEqual(alone, ["vm-1", "vm-2", "vm-3"]);
  assert.deepEqual(
    got.map((x) => (x.status === "fulfilled" ? `${(x.value.alloc as { owner: string }).owner} ${x.value.created}` : (x.reason as Error).message)),
    ["vm-1 false", "vm-2's own failure", "vm-3 true"],
  );
  await g.add("sn-000000000001", { s, owner: "vm-4", requestId: "r", wanted: -1 });
  assert.deepEqual(many, [3], "one call: ALLOCATE, not ALLOCATE_MANY");
});
