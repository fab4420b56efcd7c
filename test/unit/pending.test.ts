// recordUnderHold (common/pending.ts): the rule a create that holds in one
// slot and writes its record in another keeps about its hold's deadline
// (PENDING_MS/2 after the hold), the same for peerings and NAT gateways.
import assert from "node:assert/strict";
import { afterEach, describe, test, vi } from "vitest";
import { FailedPreconditionError, UnavailableError } from "../../services/common/errors.js";
import { PENDING_MS, recordUnderHold, type UnderHold } from "../../services/common/pending.js";

/** A create whose hold was written at 0 on a clock that reads `at()`: what it was asked to do, in order. */
function create(at: () => number, o: Partial<UnderHold<string>> = {}) {
  const did: string[] = [];
  vi.spyOn(performance, "now").mockImplementation(at);
  const opts: UnderHold<string> = {
    what: "the thing",
    heldAt: { mono: 0, wall: Date.now() },
    wrote: (r) => r === "mine",
    release: async () => void did.push("release"),
    takeBack: async () => void did.push("takeBack"),
    undo: "microvpc thing delete t-1",
    ...o,
  };
  return { did, opts };
}

const IN_TIME = PENDING_MS / 2 - 1;
const LATE = PENDING_MS / 2 + 1;

describe("recordUnderHold", () => {
  afterEach(() => void vi.restoreAllMocks());

  test("within the deadline: the record, holds kept; a refusal or another create's record: the holds go", async () => {
    const { did, opts } = create(() => IN_TIME);
    assert.equal(await recordUnderHold(async () => "mine", opts), "mine");
    assert.deepEqual(did, []);
    assert.equal(await recordUnderHold(async () => "replayed", opts), "replayed", "another create's record is the caller's to answer");
    assert.deepEqual(did, ["release"]);
    const refused = new FailedPreconditionError("name taken");
    await assert.rejects(
      recordUnderHold<string>(() => Promise.reject(refused), opts),
      (e) => e === refused,
    );
    assert.deepEqual(did, ["release", "release"]);
  });

  test("a step without an answer within the deadline: its error, and the holds stay (its record may have been written)", async () => {
    const { did, opts } = create(() => IN_TIME);
    await assert.rejects(
      recordUnderHold<string>(() => Promise.reject(new Error("Command timed out")), opts),
      /^Error: Command timed out$/,
    );
    assert.deepEqual(did, []);
  });

  test("the deadline passes on either clock: a suspended host (the monotonic clock stood still, the wall clock ran on); a wall clock stepped back does not hide it", async () => {
    // Suspended: performance.now() says no time passed, the wall clock (and the Redis server's) says 31 s.
    const suspended = create(() => IN_TIME, { heldAt: { mono: 0, wall: Date.now() - LATE } });
    let ran = false;
    await assert.rejects(
      recordUnderHold(async () => ((ran = true), "mine"), suspended.opts),
      (e: Error) => e instanceof UnavailableError && /nothing was created, retry$/.test(e.message),
    );
    assert.deepEqual([ran, suspended.did], [false, ["release"]]);
    // Suspended while the record was being written: taken back.
    let wall = Date.now();
    const during = create(() => IN_TIME, { heldAt: { mono: 0, wall } });
    vi.spyOn(Date, "now").mockImplementation(() => wall);
    await assert.rejects(
      recordUnderHold(async () => ((wall += LATE), "mine"), during.opts),
      (e: Error) => e instanceof UnavailableError && /taken back/.test(e.message),
    );
    assert.deepEqual(during.did, ["takeBack"]);
    // The wall clock stepped back a minute: the monotonic clock still counts.
    const stepped = create(() => LATE, { heldAt: { mono: 0, wall: Date.now() + 60_000 } });
    await assert.rejects(
      recordUnderHold(async () => "mine", stepped.opts),
      /nothing was created, retry$/,
    );
    assert.deepEqual(stepped.did, ["release"]);
  });

  test("past the deadline before the step: the step does not run, the holds go, UNAVAILABLE retry", async () => {
    const { did, opts } = create(() => LATE);
    let ran = false;
    await assert.rejects(
      recordUnderHold(async () => ((ran = true), "mine"), opts),
      (e: Error) => e instanceof UnavailableError && /^creating the thing took over 30 s between its steps; nothing was created, retry$/.test(e.message),
    );
    assert.deepEqual([ran, did], [false, ["release"]]);
  });

  test("past the deadline, a record `keep` holds afresh is kept (a retry by client token may have been answered with it); one it cannot hold, or a keep that fails, is taken back", async () => {
    let t = 0;
    let held: string | null = "mine";
    const { did, opts } = create(() => t, { keep: async () => (did.push("keep"), held) });
    const late = async () => ((t = LATE), "mine");
    assert.equal(await recordUnderHold(late, opts), "mine");
    assert.deepEqual(did, ["keep"]);
    t = 0;
    held = null;
    await assert.rejects(recordUnderHold(late, opts), (e: Error) => e instanceof UnavailableError && /taken back/.test(e.message));
    assert.deepEqual(did, ["keep", "keep", "takeBack"]);
    t = 0;
    opts.keep = () => Promise.reject(new Error("Connection is closed"));
    await assert.rejects(recordUnderHold(late, opts), (e: Error) => e instanceof UnavailableError && /taken back/.test(e.message));
    assert.deepEqual(did, ["keep", "keep", "takeBack", "takeBack"]);
  });

  test("`keep` is asked only for what this create wrote or may have written past the deadline: a step without an answer past it is kept by it; never within the deadline, for a refusal or another create's record, nor when the step did not run", async () => {
    let t = 0;
    const { did, opts } = create(() => t, { keep: async () => (did.push("keep"), "mine") });
    // The reply lost past the deadline: the record may have been written, and keep finds and holds it (a peering's reservations, a NAT gateway's hold).
    assert.equal(await recordUnderHold(() => ((t = LATE), Promise.reject(new Error("Command timed out"))), opts), "mine");
    assert.deepEqual(did, ["keep"]);
    t = IN_TIME;
    assert.equal(await recordUnderHold(async () => "mine", opts), "mine");
    t = 0;
    assert.equal(await recordUnderHold(async () => ((t = LATE), "replayed"), opts), "replayed");
    t = 0;
    await assert.rejects(
      recordUnderHold<string>(() => ((t = LATE), Promise.reject(new FailedPreconditionError("overlaps"))), opts),
      FailedPreconditionError,
    );
    t = LATE;
    await assert.rejects(
      recordUnderHold(async () => "mine", opts),
      /nothing was created, retry$/,
    );
    assert.deepEqual(did, ["keep", "release", "release", "release"]);
  });

  test("a record written past the deadline, or a step without an answer past it: taken back, UNAVAILABLE retry", async () => {
    let t = 0;
    const { did, opts } = create(() => t);
    const slow = (end: () => Promise<string>) => async () => {
      t = LATE;
      return end();
    };
    await assert.rejects(
      recordUnderHold(
        slow(async () => "mine"),
        opts,
      ),
      (e: Error) =>
        e instanceof UnavailableError && /took over 30 s between its steps: .*what it wrote was taken back; nothing was kept, retry$/.test(e.message),
    );
    assert.deepEqual(did, ["takeBack"]);
    t = 0;
    await assert.rejects(
      recordUnderHold(
        slow(() => Promise.reject(new Error("Connection is closed."))),
        opts,
      ),
      (e: Error) =>
        e instanceof UnavailableError && /failed without an answer \(Connection is closed\.\).*taken back; nothing was kept, retry$/.test(e.message),
    );
    assert.deepEqual(did, ["takeBack", "takeBack"]);
    // A refusal past the deadline wrote nothing: the holds go, the refusal stands.
    t = 0;
    await assert.rejects(
      recordUnderHold(
        slow(() => Promise.reject(new FailedPreconditionError("name taken"))),
        opts,
      ),
      FailedPreconditionError,
    );
    assert.deepEqual(did, ["takeBack", "takeBack", "release"]);
  });

  test("a take-back that fails names what to remove; a release that fails is not the caller's error", async () => {
    let t = 0;
    const { opts } = create(() => t, {
      takeBack: () => Promise.reject(new Error("Connection is closed.")),
      release: () => Promise.reject(new Error("Connection is closed.")),
    });
    await assert.rejects(
      recordUnderHold(async () => ((t = LATE), "mine"), opts),
      (e: Error) =>
        e instanceof UnavailableError &&
        /taking back what it may have written failed \(Connection is closed\.\): remove it once Redis answers \(microvpc thing delete t-1\), then retry$/.test(
          e.message,
        ),
    );
    t = 0;
    assert.equal(await recordUnderHold(async () => "replayed", opts), "replayed");
  });
});
