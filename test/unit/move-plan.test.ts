// The plan of `microvpcd move-to-cluster` (services/migrate/plan.ts), rule by
// rule, on hand-made snapshots of a single Redis: renames, the shared hashes
// split by owner, the catalogs a cluster keeps, the counters, and what stops
// the move (a record whose VPC cannot be known, a key no release knows, a
// move of an earlier release not finished, a name that would escape its
// hash tag). The whole move against real daemons: move-to-cluster.test.ts.
import assert from "node:assert/strict";
import { describe, test } from "vitest";
import { plan, wanted, type Op, type Snapshot } from "../../services/migrate/plan.js";

const V1 = "vpc-aaaaaaaaaaaa";
const V2 = "vpc-bbbbbbbbbbbb";
const SN = "subnet-111111111111";
const SG = "sg-222222222222";
const PCX = "pcx-333333333333";

function snap(keys: Record<string, string>, contents: Partial<Omit<Snapshot, "types">> = {}): Snapshot {
  return {
    types: new Map(Object.entries(keys)),
    hashes: contents.hashes ?? new Map(),
    strings: contents.strings ?? new Map(),
    sets: contents.sets ?? new Map(),
  };
}
const subnet = {
  id: SN,
  vpc: V1,
  name: "web",
  cidr: "10.0.1.0/24",
  base: String(0x0a000100),
  prefix: "24",
  size: "256",
  type: "public",
  extra: "0",
  created: "1",
};
const group = { id: SG, vpc: V1, name: "web", rules: "[]", gen: "1", created: "1", updated: "1" };
const copies = (ops: Op[]) => Object.fromEntries(ops.filter((o) => o.op === "copy").map((o) => [o.from, o.to]));
const built = (ops: Op[]) => Object.fromEntries(ops.filter((o) => o.op !== "copy").map((o) => [o.to, o.op === "hash" ? o.fields : o.value]));

describe("move-to-cluster plan", () => {
  test("renames each service's keys to the cluster's names; keys already tagged keep theirs", () => {
    const p = plan(
      snap({
        [`mvpc:vpc:${V1}`]: "hash",
        "mvpc:vpc:byname": "hash",
        [`mvpc:dns:vpc:${V1}:rec`]: "hash",
        [`mvpc:host:hv1:nics`]: "hash",
        "mvpc:hosts:hv1": "string",
        [`mvpc:gw:lease:nat:${V1}`]: "string",
        "mvpc:gw:host:hv1:transit": "hash",
        [`mvpc:{${V1}}:sn:${SN}:bits`]: "string",
        "mvpc:{host:hv1}:vms": "zset",
        "mvpc:events": "stream",
      }),
    );
    assert.deepEqual(p.refusals, []);
    assert.deepEqual(copies(p.ops), {
      [`mvpc:vpc:${V1}`]: [`mvpc:{${V1}}:vpc`],
      "mvpc:vpc:byname": ["mvpc:{catalog}:vpc:byname"],
      [`mvpc:dns:vpc:${V1}:rec`]: [`mvpc:{${V1}}:dns:rec`],
      "mvpc:host:hv1:nics": ["mvpc:{host:hv1}:nics"],
      "mvpc:hosts:hv1": ["mvpc:{hosts}:host:hv1"],
      [`mvpc:gw:lease:nat:${V1}`]: [`mvpc:{${V1}}:gw:natlease`],
      "mvpc:gw:host:hv1:transit": ["mvpc:{host:hv1}:gw:transit"],
      [`mvpc:{${V1}}:sn:${SN}:bits`]: [`mvpc:{${V1}}:sn:${SN}:bits`],
      "mvpc:{host:hv1}:vms": ["mvpc:{host:hv1}:vms"],
      "mvpc:events": ["mvpc:events"],
    });
  });

  test("a key whose cluster name needs a VPC takes it from its record; the catalogs and the split hashes are built", () => {
    const keys = {
      [`mvpc:subnet:${SN}`]: "hash",
      [`mvpc:fw:sg:${SG}`]: "hash",
      [`mvpc:fw:sg:${SG}:members`]: "hash",
      "mvpc:tokens": "hash",
      "mvpc:nicaddr": "hash",
      "mvpc:fw:gen": "string",
      [`mvpc:vpc:${V1}`]: "hash",
    };
    for (const [k, t] of Object.entries(keys)) assert.equal(wanted(k, t), !k.endsWith(":members") && k !== `mvpc:vpc:${V1}`, k);
    const p = plan(
      snap(keys, {
        hashes: new Map<string, Record<string, string>>([
          [`mvpc:subnet:${SN}`, subnet],
          [`mvpc:fw:sg:${SG}`, group],
          ["mvpc:tokens", { "vpc\nt1": V1, "subnet\nt2": SN, "sg\nt3": SG, "nat\nt4": "nat-444444444444", "subnet\nt5": "subnet-999999999999" }],
          ["mvpc:nicaddr", { [`${V1}/10.0.1.5`]: "hv1/nic-555555555555", [`${V2}/10.9.0.5`]: "hv2/nic-666666666666" }],
        ]),
        strings: new Map([["mvpc:fw:gen", "57"]]),
      }),
    );
    assert.deepEqual(p.refusals, []);
    assert.deepEqual(
      copies(p.ops)[`mvpc:subnet:${SN}`],
      [`mvpc:subnet:${SN}`, `mvpc:{${V1}}:subnet:${SN}`],
      "a subnet's record keeps its name and is copied under its VPC's tag",
    );
    assert.deepEqual(copies(p.ops)[`mvpc:fw:sg:${SG}:members`], [`mvpc:{${V1}}:fw:sg:${SG}:members`], "the group's members under the VPC its record names");
    assert.deepEqual(built(p.ops), {
      "mvpc:{fw}:sg:vpc": { [SG]: `${V1}/web` },
      "mvpc:{catalog}:tokens": { "vpc\nt1": V1 },
      [`mvpc:{${V1}}:tokens`]: { "subnet\nt2": SN, "sg\nt3": SG },
      "mvpc:{gw}:tokens": { "nat\nt4": "nat-444444444444" },
      [`mvpc:{${V1}}:nicaddr`]: { [`${V1}/10.0.1.5`]: "hv1/nic-555555555555" },
      [`mvpc:{${V1}}:nicaddr:ver`]: { [`${V1}/10.0.1.5`]: "1" },
      [`mvpc:{${V2}}:nicaddr`]: { [`${V2}/10.9.0.5`]: "hv2/nic-666666666666" },
      [`mvpc:{${V2}}:nicaddr:ver`]: { [`${V2}/10.9.0.5`]: "1" },
      [`mvpc:{${V1}}:fw:gen`]: "57",
    });
    assert.ok(
      p.skipped.some((s) => s.key.includes("t5") && /subnet-999999999999 is gone/.test(s.why)),
      "a token of a record that is gone is left behind, said",
    );
  });

  test("a VPC's set of peering ids becomes the hash of its peers' ranges; legacy acks fold into the hosts' own", () => {
    const pcx = {
      id: PCX,
      name: "p",
      vpc1: V1,
      vpc2: V2,
      cidr1: "10.0.0.0/16",
      cidr2: "10.1.0.0/16",
      allowed1: "[]",
      allowed2: "[]",
      labels: "[]",
      created: "1700",
    };
    const p = plan(
      snap(
        { [`mvpc:pcx:${PCX}`]: "hash", [`mvpc:vpc:${V1}:peerings`]: "set", [`mvpc:pcx:${PCX}:acks`]: "hash", "mvpc:host:hv1:pcxacks": "hash" },
        {
          hashes: new Map<string, Record<string, string>>([
            [`mvpc:pcx:${PCX}`, pcx],
            [`mvpc:pcx:${PCX}:acks`, { hv1: "1", hv2: "1700" }],
            ["mvpc:host:hv1:pcxacks", { [PCX]: "1700" }],
          ]),
          sets: new Map([[`mvpc:vpc:${V1}:peerings`, [PCX, "pcx-777777777777"]]]),
        },
      ),
    );
    assert.deepEqual(p.refusals, []);
    const b = built(p.ops);
    assert.deepEqual(b[`mvpc:{${V1}}:peers`], { [PCX]: JSON.stringify({ base: 0x0a010000, size: 65536, ms: 1700 }) }, "the peer's (vpc2's) range");
    assert.deepEqual(b["mvpc:{host:hv1}:pcxacks"], { [PCX]: "1700" }, "the host's own ack wins");
    assert.deepEqual(b["mvpc:{host:hv2}:pcxacks"], { [PCX]: "1700" });
    assert.ok(
      p.skipped.some((s) => s.key.endsWith("pcx-777777777777")),
      "an id without a record is left behind",
    );
  });

  test("every NAT gateway gets its hold on its subnet in its VPC's slot, where a cluster's DeleteSubnet looks; a NAT record that does not parse stops the move", () => {
    const N1 = "nat-444444444444";
    const N2 = "nat-555555555555";
    const nat = (id: string, vpc: string, sn: string) => ({ id, vpc, subnet: sn, sources: "[]", address: "203.0.113.7", description: "", created: "1800" });
    assert.equal(wanted(`mvpc:gw:nat:${N1}`, "hash"), true, "the plan reads NAT records");
    const p = plan(
      snap(
        { [`mvpc:gw:nat:${N1}`]: "hash", [`mvpc:gw:nat:${N2}`]: "hash", "mvpc:gw:vpcnat": "hash", "mvpc:gw:nats": "zset" },
        {
          hashes: new Map<string, Record<string, string>>([
            [`mvpc:gw:nat:${N1}`, nat(N1, V1, SN)],
            [`mvpc:gw:nat:${N2}`, nat(N2, V2, "subnet-666666666666")],
          ]),
        },
      ),
    );
    assert.deepEqual(p.refusals, []);
    assert.deepEqual(copies(p.ops)[`mvpc:gw:nat:${N1}`], [`mvpc:{gw}:nat:${N1}`]);
    const b = built(p.ops);
    assert.deepEqual(b[`mvpc:{${V1}}:gw:nat-holds`], { [N1]: JSON.stringify({ subnet: SN, ms: 1800 }) });
    assert.deepEqual(b[`mvpc:{${V2}}:gw:nat-holds`], { [N2]: JSON.stringify({ subnet: "subnet-666666666666", ms: 1800 }) });
    // A record whose VPC or subnet cannot be read: no hold can be made for it, so nothing moves.
    const bad = plan(
      snap(
        { [`mvpc:gw:nat:${N1}`]: "hash" },
        { hashes: new Map<string, Record<string, string>>([[`mvpc:gw:nat:${N1}`, { ...nat(N1, V1, SN), subnet: "web" }]]) },
      ),
    );
    assert.equal(bad.refusals.length, 1);
    assert.match(bad.refusals[0], new RegExp(`^mvpc:gw:nat:${N1}: .*its hold on its subnet cannot be made`));
    // The single Redis never had delete marks: a key under that name is one no release knows.
    assert.equal(plan(snap({ [`mvpc:vpc:${V1}:deleting:${SN}`]: "zset" })).refusals.length, 1);
  });

  test("stops, writing nothing, on what it cannot place: a record that does not parse, an unknown key, an unfinished move, a name escaping its tag", () => {
    const p = plan(
      snap(
        {
          [`mvpc:fw:sg:${SG}`]: "hash",
          [`mvpc:fw:sg:${SG}:refby`]: "set",
          "mvpc:fw:sg:sg-888888888888:refby": "set",
          "mvpc:something:else": "string",
          [`mvpc:{${V1}}:sn:${SN}:moving`]: "string",
          [`mvpc:vpc:${V1}}:x`]: "hash",
          [`mvpc:vm:host:hv1`]: "zset",
          "mvpc-md:hv1:insts": "zset",
        },
        { hashes: new Map([[`mvpc:fw:sg:${SG}`, { ...group, vpc: `${V1}}:evil` }]]) },
      ),
    );
    const said = p.refusals.join("\n");
    assert.match(said, new RegExp(`mvpc:fw:sg:${SG}: vpc: .* its VPC, and so its name on the cluster, cannot be known`));
    assert.match(said, /mvpc:fw:sg:sg-888888888888:refby: no record of sg-888888888888 says which VPC/);
    assert.doesNotMatch(said, new RegExp(`mvpc:fw:sg:${SG}:refby`), "the keys of a refused record are not refused again");
    assert.match(said, /mvpc:something:else: not a key this release knows/);
    assert.match(said, /:moving: .* start the ipam daemon once/);
    assert.match(said, new RegExp(`mvpc:vpc:${V1}\\}:x: not a key this release knows`), "a name that would land in another slot matches no rule");
    assert.match(said, /mvpc:vm:host:hv1: .* start that host's vmm once/);
    assert.match(said, /mvpc-md:hv1:insts: .* start that host's gateway once/);
    assert.ok(!p.ops.some((o) => o.op !== "copy" && o.to.includes("evil")), "nothing built from the hostile field");
  });

  test("a subnet's ACL association goes under the subnet's VPC as it is, also when its ACL has no record (it keeps the subnet closed)", () => {
    const p = plan(
      snap(
        { [`mvpc:subnet:${SN}`]: "hash", "mvpc:fw:subnet-acl": "hash" },
        {
          hashes: new Map<string, Record<string, string>>([
            [`mvpc:subnet:${SN}`, subnet],
            ["mvpc:fw:subnet-acl", { [SN]: "acl-999999999999" }],
          ]),
        },
      ),
    );
    assert.deepEqual(p.refusals, []);
    assert.deepEqual(built(p.ops)[`mvpc:{${V1}}:fw:subnet-acl`], { [SN]: "acl-999999999999" });
  });

  test("refuses two sources for one cluster key, a key of one kind under another's name, and a binding without its host's copy", () => {
    const sig = '{"nic":"x"}';
    const p = plan(
      snap(
        {
          [`mvpc:subnet:${SN}`]: "hash",
          "mvpc:tokens": "hash",
          [`mvpc:{${V1}}:tokens`]: "hash",
          [`mvpc:fw:sg:${SG}`]: "hash",
          [`mvpc:fw:sg:${SG}:subnets`]: "set",
          "mvpc:fw:nic:nic-555555555555": "hash",
          "mvpc:fw:host:hv1:sig": "hash",
        },
        {
          hashes: new Map<string, Record<string, string>>([
            [`mvpc:subnet:${SN}`, subnet],
            ["mvpc:tokens", { "subnet\nt2": SN }],
            [`mvpc:fw:sg:${SG}`, group],
            ["mvpc:fw:nic:nic-555555555555", { sig, host: "hv1" }],
            ["mvpc:fw:host:hv1:sig", { "nic-555555555555": '{"nic":"other"}' }],
          ]),
        },
      ),
    );
    const said = p.refusals.join("\n");
    assert.match(said, new RegExp(`mvpc:\\{${V1}\\}:tokens: both mvpc:\\{${V1}\\}:tokens and \\(built hash\\) would be written there`));
    assert.match(said, new RegExp(`mvpc:fw:sg:${SG}:subnets: not a key this release knows`), "a group has no :subnets");
    assert.match(
      said,
      /mvpc:fw:nic:nic-555555555555: its host's copy of the binding \(mvpc:fw:host:hv1:sig\) is missing or differs: start hv1's firewall once/,
    );
  });

  test("a deleted VPC's VPN records (left by DeleteVpc before it checked for an endpoint) are left behind; a living VPC's move", () => {
    const p = plan(
      snap(
        {
          [`mvpc:vpc:${V1}`]: "hash",
          [`mvpc:vpn:ep:${V1}`]: "hash",
          [`mvpc:vpn:ep:${V2}`]: "hash",
          [`mvpc:vpn:vpc:${V2}:clients`]: "hash",
          "mvpc:vpn:client:vpnc-111111111111": "string",
          "mvpc:vpn:client:vpnc-222222222222": "string",
        },
        {
          strings: new Map([
            ["mvpc:vpn:client:vpnc-111111111111", `${V1}/laptop`],
            ["mvpc:vpn:client:vpnc-222222222222", `${V2}/old`],
          ]),
        },
      ),
    );
    assert.deepEqual(p.refusals, []);
    const c = copies(p.ops);
    assert.deepEqual(c[`mvpc:vpn:ep:${V1}`], [`mvpc:{${V1}}:vpn:ep`]);
    assert.deepEqual(c["mvpc:vpn:client:vpnc-111111111111"], [`mvpc:{${V1}}:vpn:client:vpnc-111111111111`, "mvpc:{vpn}:client:vpnc-111111111111"]);
    assert.deepEqual(p.skipped.map((s) => s.key).sort(), [`mvpc:vpn:ep:${V2}`, "mvpc:vpn:client:vpnc-222222222222", `mvpc:vpn:vpc:${V2}:clients`].sort());
  });
});
