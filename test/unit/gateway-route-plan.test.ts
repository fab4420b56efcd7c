// The gateway planner's host-namespace route diff (plan.ts: vpcHostLines,
// hostRouteDiff, transitReleaseLines): desired and applied lines in, the
// `ip -force -batch` lines to run out. GatewaySync runs what these return
// (test/unit/gateway-sync.test.ts replays it against a fake kernel).
import assert from "node:assert/strict";
import { test } from "vitest";
import { hostRouteDiff, transitReleaseLines, vpcHostLines, type GwVpc } from "../../services/gateway/plan.js";

const vpc = (fips: GwVpc["fips"], transit = 3): GwVpc => ({
  vpcId: "vpc-111111111111",
  transit,
  subnets: [],
  nat: false,
  natSources: [],
  fips,
  forwards: [],
  hopLimits: new Map(),
});

const one = vpc([{ address: "203.0.113.5", private: "10.0.1.4" }]);
const two = vpc([
  { address: "203.0.113.6", private: "10.0.1.4" },
  { address: "203.0.113.7", private: "10.0.1.5" },
]);

test("a VPC's host lines: its policy rule (re-added), its table's default route, a /32 route and proxy entry per floating IP", () => {
  assert.deepEqual(vpcHostLines(one, "eth0"), [
    "rule del pref 1003",
    "rule add from 169.254.1.13 lookup 1003 pref 1003",
    "route replace default via 169.254.1.14 dev gh111111111111 table 1003",
    "route replace 203.0.113.5/32 via 169.254.1.14 dev gh111111111111",
    "neigh replace proxy 203.0.113.5 dev eth0",
  ]);
});

test("nothing applied yet: every wanted line", () => {
  const want = vpcHostLines(one, "eth0");
  assert.deepEqual(hostRouteDiff(want, undefined), want);
  assert.deepEqual(hostRouteDiff(want, []), want);
});

test("the same lines applied: nothing to run", () => {
  assert.deepEqual(hostRouteDiff(vpcHostLines(two, "eth0"), vpcHostLines(two, "eth0")), []);
});

test("a change: the floating IPs that went are removed first, then every wanted line", () => {
  const want = vpcHostLines(two, "eth0");
  assert.deepEqual(hostRouteDiff(want, vpcHostLines(one, "eth0")), ["route del 203.0.113.5/32", "neigh del proxy 203.0.113.5 dev eth0", ...want]);
});

test("a floating IP that stays is not removed; one added is only added", () => {
  const both = vpc([...one.fips, ...two.fips.slice(1)]);
  assert.deepEqual(hostRouteDiff(vpcHostLines(both, "eth0"), vpcHostLines(one, "eth0")), vpcHostLines(both, "eth0"));
  assert.deepEqual(hostRouteDiff(vpcHostLines(one, "eth0"), vpcHostLines(both, "eth0")), [
    "route del 203.0.113.7/32",
    "neigh del proxy 203.0.113.7 dev eth0",
    ...vpcHostLines(one, "eth0"),
  ]);
});

test("another uplink: the proxy entries move (the old ones removed)", () => {
  assert.deepEqual(hostRouteDiff(vpcHostLines(one, "eth1"), vpcHostLines(one, "eth0")), ["neigh del proxy 203.0.113.5 dev eth0", ...vpcHostLines(one, "eth1")]);
});

test("a VPC that left: its floating IPs' routes and proxy entries and its rule go; the table's default route went with the link", () => {
  assert.deepEqual(transitReleaseLines(vpcHostLines(two, "eth0"), 3), [
    "route del 203.0.113.6/32",
    "neigh del proxy 203.0.113.6 dev eth0",
    "route del 203.0.113.7/32",
    "neigh del proxy 203.0.113.7 dev eth0",
    "rule del pref 1003",
  ]);
  assert.deepEqual(transitReleaseLines([], undefined), [], "nothing known, no index: nothing");
});
