// SyncLoop (services/common/sync-loop.ts), the loop FirewallSync and
// GatewaySync share, on fake timers: the first pass, whole and targeted
// passes from events, coalescing, drift, a failed pass retried a second
// later, waiters answered before the after-pass work, stop().
import assert from "node:assert/strict";
import { pino } from "pino";
import { afterEach, beforeEach, test, vi } from "vitest";
import { SyncLoop, type PassRequest } from "../../services/common/sync-loop.js";

beforeEach(() => vi.useFakeTimers({ now: 1_000_000 }));
afterEach(() => vi.useRealTimers());

function setup(driftMs = 60_000, failing = false) {
  const passes: PassRequest[] = [];
  const log: string[] = [];
  let failAt: number | undefined;
  let fail = failing;
  const errors = new Map<string, string>();
  const loop = new SyncLoop<number>({
    log: pino({ level: "silent" }),
    events: /^(fw\.|vpc\.)/,
    route: (e) => (e.kind.startsWith("fw.") && e.vpc ? { key: e.vpc } : e.kind === "vpc.ignored" ? undefined : "all"),
    pass: async (r) => {
      passes.push(r.only ? { ...r, only: new Set(r.only) } : { first: r.first, drift: r.drift });
      log.push("pass");
      failAt = fail ? Date.now() : undefined;
      return passes.length;
    },
    failedAt: () => failAt,
    errorOf: (k) => errors.get(k),
    after: async (n) => void log.push(`after ${n}`),
  });
  const done = loop.run(driftMs);
  return {
    loop,
    passes,
    log,
    errors,
    done,
    fail: (f: boolean) => void (fail = f),
    /** Lets the loop run for `ms` of fake time. */
    tick: (ms = 0) => vi.advanceTimersByTimeAsync(ms),
  };
}

test("a first pass, then nothing until asked", async () => {
  const t = setup();
  await t.tick(5000);
  assert.deepEqual(t.passes, [{ first: true, drift: false }]);
  t.loop.stop();
  await t.tick(600);
  await t.done;
});

test("events: a targeted pass over the keys they name, coalesced; any other event a whole pass; an ignored one none", async () => {
  const t = setup();
  await t.tick();
  t.loop.onEvents([
    { kind: "fw.rule", vpc: "vpc-1" },
    { kind: "fw.member", vpc: "vpc-2" },
  ]);
  await t.tick();
  assert.deepEqual(t.passes[1], { first: false, drift: false, only: new Set(["vpc-1", "vpc-2"]) });
  t.loop.onEvents([{ kind: "vpc.ignored" }]);
  await t.tick(600);
  assert.equal(t.passes.length, 2);
  t.loop.onEvents([{ kind: "fw.rule", vpc: "vpc-1" }, { kind: "vpc.create" }]);
  await t.tick();
  assert.deepEqual(t.passes[2], { first: false, drift: false }, "a whole pass covers the targets too");
  t.loop.kick();
  await t.tick();
  assert.deepEqual(t.passes[3], { first: false, drift: false });
  assert.equal(t.passes.length, 4);
  t.loop.stop();
  await t.tick(600);
  await t.done;
});

test("a drift pass every driftMs", async () => {
  const t = setup(2000);
  await t.tick(2600);
  assert.deepEqual(t.passes.at(-1), { first: false, drift: true });
  const n = t.passes.length;
  await t.tick(1000);
  assert.equal(t.passes.length, n);
  await t.tick(1600);
  assert.equal(t.passes.length, n + 1);
  t.loop.stop();
  await t.tick(600);
  await t.done;
});

test("a failed pass is retried a second later, and again until one succeeds", async () => {
  const t = setup(60_000, true);
  await t.tick();
  assert.equal(t.passes.length, 1);
  await t.tick(600);
  assert.equal(t.passes.length, 1, "not before the second");
  await t.tick(500);
  assert.equal(t.passes.length, 2);
  t.fail(false);
  await t.tick(1100);
  assert.equal(t.passes.length, 3);
  await t.tick(5000);
  assert.equal(t.passes.length, 3, "a pass that succeeded is not retried");
  t.loop.stop();
  await t.tick(600);
  await t.done;
});

test("waiters: answered with their key's error after the pass, before the after-pass work; a withdrawn one never", async () => {
  const t = setup();
  await t.tick();
  const answers: string[] = [];
  t.errors.set("vpc-2", "nft said no");
  t.loop.target("vpc-1", (err) => {
    answers.push(`vpc-1 ${err?.message ?? "ok"}`);
    t.log.push("answer vpc-1");
  });
  t.loop.target("vpc-2", (err) => void answers.push(`vpc-2 ${err?.message ?? "ok"}`));
  const withdraw = t.loop.target("vpc-3", () => void answers.push("vpc-3"));
  withdraw();
  await t.tick();
  assert.deepEqual(answers, ["vpc-1 ok", "vpc-2 nft said no"]);
  assert.deepEqual(t.passes.at(-1), { first: false, drift: false, only: new Set(["vpc-1", "vpc-2", "vpc-3"]) });
  assert.deepEqual(t.log.slice(-3), ["pass", "answer vpc-1", "after 2"]);
  t.loop.stop();
  await t.tick(600);
  await t.done;
});

/** A loop whose events carry a token (their "gen"); with `held`, every pass after the first waits for gate(). */
function tokenLoop(held: boolean) {
  const passes: PassRequest[] = [];
  const t = { passes, gate: undefined as (() => void) | undefined };
  const loop = new SyncLoop<number>({
    log: pino({ level: "silent" }),
    events: /^fw\./,
    route: (e) => (e.vpc ? { key: e.vpc } : "all"),
    tokenOf: (e) => e.gen,
    pass: async (r) => {
      passes.push(r);
      if (held && passes.length > 1) await new Promise<void>((res) => (t.gate = res));
      return passes.length;
    },
    failedAt: () => undefined,
  });
  return { passes, t, loop, done: loop.run(60_000), tick: (ms = 0) => vi.advanceTimersByTimeAsync(ms) };
}

test("a waiter with its change's token: answered by the pass its event started (no pass more), at once if that pass ended, else by the next pass", async () => {
  const { passes, t, loop, done, tick } = tokenLoop(true);
  const gate = () => t.gate!();
  await tick();
  assert.equal(passes.length, 1);
  const answers: string[] = [];
  // The change's event arrives, its pass starts (and holds); then its caller waits.
  loop.onEvents([{ kind: "fw.binding.changed", vpc: "vpc-1", gen: "7" }]);
  await tick();
  assert.equal(passes.length, 2, "the event's pass runs");
  loop.target("vpc-1", () => void answers.push("7"), "7");
  // Another change whose event arrives during that pass: its pass has not started yet.
  loop.onEvents([{ kind: "fw.binding.changed", vpc: "vpc-1", gen: "8" }]);
  loop.target("vpc-1", () => void answers.push("8"), "8");
  assert.deepEqual([...answers], []);
  gate();
  await tick();
  assert.deepEqual([...answers], ["7"], "7 answered by the pass its event started; 8 not yet");
  assert.equal(passes.length, 3, "one pass for 8's event (and 8's waiter), none for 7's waiter");
  gate();
  await tick();
  assert.deepEqual([...answers], ["7", "8"]);
  // The pass after 7's event has ended: a caller waiting on it now is answered at once.
  loop.target("vpc-1", () => void answers.push("7 again"), "7");
  assert.deepEqual([...answers], ["7", "8", "7 again"]);
  await tick(600);
  assert.equal(passes.length, 3, "no pass for it");
  // A token no event brought: the next pass, as without one.
  loop.target("vpc-1", () => void answers.push("99"), "99");
  await tick();
  assert.equal(passes.length, 4);
  gate();
  await tick();
  assert.deepEqual(answers.at(-1), "99");
  loop.stop();
  await tick(600);
  await done;
});

test("the event of a change whose caller waited before it came asks for no pass once a pass has started since", async () => {
  const { passes, loop, done, tick } = tokenLoop(false);
  await tick();
  const answers: string[] = [];
  loop.target("vpc-1", () => void answers.push("5"), "5");
  await tick();
  assert.deepEqual([...answers], ["5"]);
  assert.equal(passes.length, 2);
  // Its event, late: the pass that answered read the change already.
  loop.onEvents([{ kind: "fw.binding.removed", vpc: "vpc-1", gen: "5" }]);
  await tick(600);
  assert.equal(passes.length, 2, "no pass for the late event");
  // Another change's event still asks for one.
  loop.onEvents([{ kind: "fw.binding.removed", vpc: "vpc-1", gen: "6" }]);
  await tick();
  assert.equal(passes.length, 3);
  loop.stop();
  await tick(600);
  await done;
});
