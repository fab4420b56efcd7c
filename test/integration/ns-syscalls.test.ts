// Named network namespaces made and removed in-process
// (services/common/ns-syscalls.ts, what the vmm does for every kind=netns
// VM): what `ip netns` users rely on. The namespace is a new one (not ours,
// not the root's), other processes see it under /run/netns and can work in
// it, `ip netns del` removes one we made and we remove one `ip netns add`
// made; a taken name is refused without touching the namespace behind it;
// and this process's own thread ends where it started, with the root
// namespace's links unchanged.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, readlinkSync, statSync } from "node:fs";
import { afterAll, describe, test } from "vitest";
import { NetnsError, namedNetnsAdd, namedNetnsDel } from "../../services/common/ns-syscalls.js";
import { RUN_PREFIX, deleteNetns, listNetnsSync, nsExec } from "../lib/netns.js";

const names = [`${RUN_PREFIX}-nsc-a`, `${RUN_PREFIX}-nsc-b`, `${RUN_PREFIX}-nsc-c`];
const ownNs = () => readlinkSync("/proc/thread-self/ns/net");
const rootLinks = () => execFileSync("ip", ["-o", "link", "show"]).toString();
const self0 = ownNs();
const links0 = rootLinks();

afterAll(async () => {
  for (const n of names) await deleteNetns(n).catch(() => {});
  assert.equal(ownNs(), self0);
  assert.equal(rootLinks(), links0);
});

describe("named network namespaces in-process", () => {
  test("add makes a new, empty namespace that `ip netns exec` works in; del removes it", async () => {
    const [a] = names;
    assert.equal(namedNetnsAdd(a), true);
    assert.equal(ownNs(), self0, "this thread is back in its own namespace");
    assert.ok(listNetnsSync().includes(a), "ip netns list shows it");
    const inode = statSync(`/run/netns/${a}`).ino;
    assert.notEqual(`net:[${inode}]`, self0, "it is not our namespace");
    const linksInside = (await nsExec(a, "ip", ["-o", "link", "show"])).stdout.trim().split("\n");
    assert.equal(linksInside.length, 1, `only lo inside: ${linksInside.join(" | ")}`);
    assert.match(linksInside[0], /^1: lo:/);
    // Work in it from another process: a veth pair lands there and not in the root namespace.
    await nsExec(a, "ip", ["link", "add", "nscdummy0", "type", "veth", "peer", "name", "nscdummy0p"]);
    assert.match((await nsExec(a, "ip", ["-o", "link", "show"])).stdout, /nscdummy0/);
    assert.doesNotMatch(rootLinks(), /nscdummy0/);

    assert.equal(namedNetnsDel(a), true);
    assert.ok(!existsSync(`/run/netns/${a}`));
    assert.ok(!listNetnsSync().includes(a));
    assert.equal(namedNetnsDel(a), true, "deleting what is gone is fine");
    assert.equal(rootLinks(), links0);
  });

  test("a taken name is refused and the namespace behind it is left alone", async () => {
    const [, b] = names;
    namedNetnsAdd(b);
    await nsExec(b, "ip", ["link", "add", "nscdummy1", "type", "veth", "peer", "name", "nscdummy1p"]);
    assert.throws(
      () => namedNetnsAdd(b),
      (err: unknown) => err instanceof NetnsError && err.code === "exists" && /File exists/.test(err.message),
    );
    assert.match((await nsExec(b, "ip", ["-o", "link", "show"])).stdout, /nscdummy1/, "still the same namespace");
    assert.equal(ownNs(), self0);
    // `ip netns del` removes what we made.
    execFileSync("ip", ["netns", "del", b]);
    assert.ok(!existsSync(`/run/netns/${b}`));
  });

  test("what `ip netns add` made, del removes", () => {
    const [, , c] = names;
    execFileSync("ip", ["netns", "add", c]);
    assert.equal(namedNetnsDel(c), true);
    assert.ok(!listNetnsSync().includes(c));
  });

  test("names that are not namespace names never reach a path", () => {
    for (const bad of ["", "..", ".", "../etc", "a/b", "x".repeat(65), "a b"]) {
      assert.throws(() => namedNetnsAdd(bad), /not a network namespace name/);
      assert.throws(() => namedNetnsDel(bad), /not a network namespace name/);
    }
    assert.equal(ownNs(), self0);
  });
});
