// The peering planner: which namespaces a host carries, and the exact lines
// it runs, from desired and observed state. Pure; no root needed.
import assert from "node:assert/strict";
import { test } from "vitest";
import type { LinkInfo } from "../../services/netagent/kernel.js";
import {
  desiredPeering,
  linkMac,
  peeringNames,
  peeringNft,
  planPeering,
  routedPeers,
  spanOf,
  type NsObserved,
  type PeeringLike,
} from "../../services/netagent/peering-plan.js";

const AB: PeeringLike = {
  id: "pcx-00000000000a",
  vpc1Id: "vpc-aaaaaaaaaaaa",
  vpc2Id: "vpc-bbbbbbbbbbbb",
  vpc1Cidr: "10.1.0.0/16",
  vpc2Cidr: "10.2.0.0/16",
  vpc1Allowed: [],
  vpc2Allowed: ["10.2.5.0/24"],
};
const BC: PeeringLike = {
  id: "pcx-00000000000b",
  vpc1Id: "vpc-bbbbbbbbbbbb",
  vpc2Id: "vpc-cccccccccccc",
  vpc1Cidr: "10.2.0.0/16",
  vpc2Cidr: "10.3.0.0/16",
  vpc1Allowed: [],
  vpc2Allowed: [],
};
const nsOf = (v: string) => `ns-${v.slice(-4)}`;
const HOST = "h1";
const empty = (): NsObserved => ({ exists: true, links: [], routes: [], neigh: [] });
const link = (ifname: string, alias: string, mac: string): LinkInfo => ({ ifname, kind: "veth", alias, mac, mtu: 1500, up: true, addrs: [] });

test("span: the vpc1 of a peering comes along wherever its vpc2 is held, not the other way round", () => {
  assert.deepEqual(spanOf(new Set(["vpc-bbbbbbbbbbbb"]), [AB]), ["vpc-aaaaaaaaaaaa"]);
  assert.deepEqual(spanOf(new Set(["vpc-aaaaaaaaaaaa"]), [AB]), []);
  assert.deepEqual(spanOf(new Set(["vpc-aaaaaaaaaaaa", "vpc-bbbbbbbbbbbb"]), [AB]), []);
  assert.deepEqual(routedPeers("vpc-aaaaaaaaaaaa", [AB, BC]), [{ vpcId: "vpc-bbbbbbbbbbbb", cidrs: ["10.2.5.0/24"] }]);
  assert.deepEqual(routedPeers("vpc-bbbbbbbbbbbb", [AB, BC]), [{ vpcId: "vpc-cccccccccccc", cidrs: ["10.3.0.0/16"] }]);
});

test("a host holding both sides: one veth pair, pinned next hop, allowed routes, unreachable peer CIDRs, filters", () => {
  const present = new Set(["vpc-aaaaaaaaaaaa", "vpc-bbbbbbbbbbbb"]);
  const want = desiredPeering(present, [AB], nsOf);
  const obs = new Map([
    ["ns-aaaa", empty()],
    ["ns-bbbb", empty()],
  ]);
  const plan = planPeering(HOST, want, obs);
  const l = peeringNames.link(AB.id);
  assert.equal(l, "pc00000000000a");
  assert.deepEqual(plan.remove, new Map());
  assert.deepEqual(plan.create.get("ns-aaaa"), [`link add ${l} type veth peer name ${l} netns ns-bbbb`]);
  assert.deepEqual(plan.configure.get("ns-aaaa"), [
    `link set dev ${l} address ${linkMac(AB.id, 1)} alias mvpc-peering:h1:${AB.id} up`,
    `neigh replace 169.254.253.1 lladdr ${linkMac(AB.id, 2)} dev ${l} nud permanent`,
    `route replace 10.2.5.0/24 via 169.254.253.1 dev ${l} onlink proto 77`,
    `route replace unreachable 10.2.0.0/16 metric 4000 proto 77`,
  ]);
  assert.deepEqual(plan.configure.get("ns-bbbb"), [
    `link set dev ${l} address ${linkMac(AB.id, 2)} alias mvpc-peering:h1:${AB.id} up`,
    `neigh replace 169.254.253.1 lladdr ${linkMac(AB.id, 1)} dev ${l} nud permanent`,
    `route replace 10.1.0.0/16 via 169.254.253.1 dev ${l} onlink proto 77`,
    `route replace unreachable 10.1.0.0/16 metric 4000 proto 77`,
  ]);
  const nftB = plan.nft.get("ns-bbbb")!;
  assert.match(nftB, new RegExp(`set ${l}_src \\{ type ipv4_addr; flags interval; elements = \\{ 10\\.1\\.0\\.0/16 \\} \\}`));
  assert.match(nftB, new RegExp(`set ${l}_dst \\{ type ipv4_addr; flags interval; elements = \\{ 10\\.2\\.5\\.0/24 \\} \\}`));
  assert.match(nftB, new RegExp(`iifname "${l}" ip daddr != @${l}_dst counter drop`));
  assert.match(nftB, /^add table inet microvpc_peering\ndelete table inet microvpc_peering\n/);
});

test("converged state plans nothing; drift is repaired line by line", () => {
  const present = new Set(["vpc-aaaaaaaaaaaa", "vpc-bbbbbbbbbbbb"]);
  const want = desiredPeering(present, [AB], nsOf);
  const l = peeringNames.link(AB.id);
  const side = (n: 1 | 2, routes: NsObserved["routes"]): NsObserved => ({
    exists: true,
    links: [link(l, `mvpc-peering:h1:${AB.id}`, linkMac(AB.id, n))],
    routes,
    neigh: [{ dst: "169.254.253.1", dev: l, lladdr: linkMac(AB.id, n === 1 ? 2 : 1), state: ["PERMANENT"] }],
  });
  const good = new Map([
    [
      "ns-aaaa",
      side(1, [
        { dst: "10.2.5.0/24", gateway: "169.254.253.1", dev: l },
        { dst: "10.2.0.0/16", type: "unreachable", metric: 4000 },
      ]),
    ],
    [
      "ns-bbbb",
      side(2, [
        { dst: "10.1.0.0/16", gateway: "169.254.253.1", dev: l },
        { dst: "10.1.0.0/16", type: "unreachable", metric: 4000 },
      ]),
    ],
  ]);
  const quiet = planPeering(HOST, want, good);
  assert.deepEqual([quiet.remove, quiet.create, quiet.configure], [new Map(), new Map(), new Map()]);
  assert.deepEqual(quiet.changes, []);
  // A stale route (an allowed CIDR since removed) goes; a missing one comes back.
  const drift = new Map([
    [
      "ns-aaaa",
      side(1, [
        { dst: "10.2.6.0/24", gateway: "169.254.253.1", dev: l },
        { dst: "10.2.0.0/16", type: "unreachable", metric: 4000 },
      ]),
    ],
    ["ns-bbbb", good.get("ns-bbbb")!],
  ]);
  assert.deepEqual(planPeering(HOST, want, drift).configure.get("ns-aaaa"), [
    `route del 10.2.6.0/24 dev ${l} proto 77`,
    `route replace 10.2.5.0/24 via 169.254.253.1 dev ${l} onlink proto 77`,
  ]);
  // One end missing (its namespace was recreated): the pair is rebuilt.
  const half = new Map([
    ["ns-aaaa", good.get("ns-aaaa")!],
    ["ns-bbbb", empty()],
  ]);
  const p = planPeering(HOST, want, half);
  assert.deepEqual(p.remove.get("ns-aaaa"), [`link del dev ${l}`]);
  assert.deepEqual(p.create.get("ns-aaaa"), [`link add ${l} type veth peer name ${l} netns ns-bbbb`]);
});

test("a deleted peering: our link, routes and filter go; links of others and other routes are left alone", () => {
  const l = peeringNames.link(AB.id);
  const obs = new Map([
    [
      "ns-aaaa",
      {
        exists: true,
        links: [link(l, `mvpc-peering:h1:${AB.id}`, "02:00:00:00:00:01"), link("pc0123456789ab", "someone else", "02:00:00:00:00:09")],
        routes: [
          { dst: "10.2.0.0/16", type: "unreachable", metric: 4000 },
          { dst: "10.2.5.0/24", gateway: "169.254.253.1", dev: l },
        ],
        neigh: [],
      },
    ],
  ]);
  const plan = planPeering(HOST, new Map(), obs);
  assert.deepEqual(plan.remove.get("ns-aaaa"), [`link del dev ${l}`]);
  // The route through the link goes with it; the unreachable one is deleted.
  assert.deepEqual(plan.configure.get("ns-aaaa"), ["route del unreachable 10.2.0.0/16 metric 4000 proto 77"]);
  assert.equal(plan.nft.get("ns-aaaa"), "add table inet microvpc_peering\ndelete table inet microvpc_peering\n");
  assert.equal(peeringNft(undefined), plan.nft.get("ns-aaaa"));
});

test("a host holding only one side gets no link, only the unreachable route", () => {
  const want = desiredPeering(new Set(["vpc-aaaaaaaaaaaa"]), [AB], nsOf);
  const plan = planPeering(HOST, want, new Map([["ns-aaaa", empty()]]));
  assert.deepEqual(plan.create, new Map());
  assert.deepEqual(plan.configure.get("ns-aaaa"), ["route replace unreachable 10.2.0.0/16 metric 4000 proto 77"]);
});
