// The firewall's incremental transactions against the kernel: from any
// applied state, elementDiff(prev, next) applied by nft must leave exactly
// the tables that a full replace with `next` builds (same chains and rules,
// sets with the same elements, counters, maps). Random sequences of VPC
// states (NICs bound and unbound, groups joined and left, rules and members
// changed, ACLs set and cleared) are replayed in one namespace by diff and
// compared, step by step, with a second namespace rebuilt in full.
import assert from "node:assert/strict";
import fc from "fast-check";
import { afterAll, beforeAll, test } from "vitest";
import { compile, elementDiff, type FwModel } from "../../services/firewall/compile.js";
import type { AclEntry, BindingRec, SecurityGroupRec, SgRule, VpcFirewallState } from "../../services/firewall/model.js";
import { cleanupSync, createNetns, installCleanupHandlers, nsExec, RUN_PREFIX } from "../lib/netns.js";

const VPC = "vpc-111111111111";
const SUBNETS = [
  { subnetId: "subnet-aaaaaaaaaaaa", cidr: "10.0.1.0/24", bridge: "br-aaaaaaaaaaaa" },
  { subnetId: "subnet-bbbbbbbbbbbb", cidr: "10.0.2.0/24", bridge: "br-bbbbbbbbbbbb" },
];
const GROUPS = ["sg-00000000000a", "sg-00000000000b", "sg-00000000000c"];

interface Spec {
  nics: { n: number; groups: number[] }[];
  rules: { g: number; dir: "ingress" | "egress"; proto: "tcp" | "udp" | "icmp" | "all"; port: number; peer: number | null }[];
  acl: boolean;
}

function state(s: Spec): VpcFirewallState {
  const nics: BindingRec[] = s.nics.map(({ n, groups }) => ({
    nicId: `nic-${n.toString(16).padStart(12, "0")}`,
    vpcId: VPC,
    subnetId: SUBNETS[n % 2].subnetId,
    address: `10.0.${(n % 2) + 1}.${n + 4}`,
    mac: `02:00:0a:00:${(n % 2) + 1}:${(n + 4).toString(16).padStart(2, "0")}`,
    hostId: "hv1",
    hostIf: `v${n.toString(16).padStart(12, "0")}`,
    groupIds: groups.map((g) => GROUPS[g]),
    boundMs: 0,
    updatedMs: 0,
  }));
  const groups = new Map<string, SecurityGroupRec>();
  GROUPS.forEach((id, i) => {
    const rules: SgRule[] = s.rules
      .filter((r) => r.g === i)
      .map((r) => ({
        dir: r.dir,
        proto: r.proto,
        portFrom: r.proto === "tcp" || r.proto === "udp" ? r.port : 0,
        portTo: r.proto === "tcp" || r.proto === "udp" ? r.port : 0,
        description: "",
        ...(r.peer === null ? { cidr: `10.${r.port % 256}.0.0/16` } : { group: GROUPS[r.peer] }),
      }));
    groups.set(id, { id, vpcId: VPC, name: id, description: "", labels: [], rules, generation: 1, createdMs: 0, updatedMs: 0 });
  });
  const members = new Map<string, string[]>(GROUPS.map((g) => [g, nics.filter((n) => n.groupIds.includes(g)).map((n) => n.address)]));
  const entries: AclEntry[] = [
    { ruleNumber: 100, dir: "ingress", action: "deny", proto: "tcp", portFrom: 22, portTo: 22, cidr: "0.0.0.0/0", description: "" },
    { ruleNumber: 200, dir: "ingress", action: "allow", proto: "all", portFrom: 0, portTo: 0, cidr: "0.0.0.0/0", description: "" },
  ];
  const acls = new Map(
    s.acl
      ? [
          [
            SUBNETS[1].subnetId,
            {
              id: "acl-000000000001",
              vpcId: VPC,
              name: "a",
              description: "",
              labels: [],
              subnetIds: [SUBNETS[1].subnetId],
              generation: 1,
              createdMs: 0,
              updatedMs: 0,
              entries,
            },
          ],
        ]
      : [],
  );
  return { vpcId: VPC, subnets: SUBNETS, nics, groups, members, acls };
}

const specArb: fc.Arbitrary<Spec> = fc.record({
  nics: fc.uniqueArray(fc.record({ n: fc.integer({ min: 1, max: 12 }), groups: fc.uniqueArray(fc.integer({ min: 0, max: 2 }), { maxLength: 2 }) }), {
    maxLength: 6,
    selector: (x) => x.n,
  }),
  rules: fc.array(
    fc.record({
      g: fc.integer({ min: 0, max: 2 }),
      dir: fc.constantFrom("ingress" as const, "egress" as const),
      proto: fc.constantFrom("tcp" as const, "udp" as const, "icmp" as const, "all" as const),
      port: fc.integer({ min: 1, max: 300 }),
      peer: fc.option(fc.integer({ min: 0, max: 2 }), { nil: null }),
    }),
    { maxLength: 6 },
  ),
  acl: fc.boolean(),
});

/** A table as comparable data: chains with their rules in order, sets and maps with sorted elements (element counters without their counts), counter names. */
async function tables(ns: string): Promise<unknown> {
  const out: Record<string, unknown> = {};
  for (const family of ["inet", "bridge"]) {
    const r = await nsExec(ns, "nft", ["-j", "list", "table", family, "microvpc"]);
    const objs = (JSON.parse(r.stdout).nftables as Record<string, Record<string, unknown>>[]).slice(1);
    const chains: Record<string, unknown[]> = {};
    const sets: Record<string, unknown> = {};
    const counters: string[] = [];
    for (const o of objs) {
      if (o.chain) chains[o.chain.name as string] ??= [];
      else if (o.rule) (chains[o.rule.chain as string] ??= []).push(JSON.stringify(o.rule.expr));
      else if (o.set || o.map) {
        const s = (o.set ?? o.map) as { name: string; type: unknown; flags?: unknown; map?: unknown; elem?: unknown[] };
        sets[s.name] = {
          type: s.type,
          flags: s.flags,
          map: s.map,
          elem: (s.elem ?? []).map((e) => JSON.stringify(e).replace(/"counter":\{"packets":\d+,"bytes":\d+\}/g, '"counter":{}')).sort(),
        };
      } else if (o.counter) counters.push(o.counter.name as string);
    }
    out[family] = {
      chains: Object.fromEntries(Object.entries(chains).sort()),
      sets: Object.fromEntries(Object.entries(sets).sort()),
      counters: counters.sort(),
    };
  }
  return out;
}

const INC = `${RUN_PREFIX}-fwinc`;
const FULL = `${RUN_PREFIX}-fwfull`;

beforeAll(async () => {
  installCleanupHandlers();
  await createNetns(INC);
  await createNetns(FULL);
});
afterAll(() => {
  cleanupSync();
});

const apply = (ns: string, script: string) => nsExec(ns, "nft", ["-f", "-"], { input: script });

test("any sequence of changes applied incrementally equals a full replace, and never replaces the table", async () => {
  let steps = 0;
  let incremental = 0;
  await fc.assert(
    fc.asyncProperty(fc.array(specArb, { minLength: 2, maxLength: 6 }), async (seq) => {
      let prev: FwModel | null = null;
      for (const spec of seq) {
        const { model, script } = compile(state(spec));
        if (prev === null) await apply(INC, script);
        else {
          const d = elementDiff(prev, model);
          assert.ok(d, "the skeleton never changes within one VPC");
          if (d.script) await apply(INC, d.script);
          incremental++;
        }
        await apply(FULL, script);
        assert.deepEqual(await tables(INC), await tables(FULL));
        prev = model;
        steps++;
      }
    }),
    { numRuns: 25, seed: Number(process.env.FC_SEED ?? 4242) },
  );
  assert.ok(incremental >= 25, `${incremental} incremental steps of ${steps}`);
}, 240_000);

test("a new NIC whose groups are already in use adds elements only (it shares their chains), and revokes nothing", () => {
  const a = compile(state({ nics: [{ n: 1, groups: [0] }], rules: [{ g: 0, dir: "ingress", proto: "tcp", port: 80, peer: 0 }], acl: false })).model;
  const b = compile(
    state({
      nics: [
        { n: 1, groups: [0] },
        { n: 2, groups: [0] },
      ],
      rules: [{ g: 0, dir: "ingress", proto: "tcp", port: 80, peer: 0 }],
      acl: false,
    }),
  ).model;
  const d = elementDiff(a, b)!;
  assert.equal(d.revokes, false);
  assert.doesNotMatch(d.script, /chain|rule|delete|flush/, "no chain of its own");
  assert.match(d.script, /^add element inet microvpc nic_in \{ \S+ : jump grp_[0-9a-f]{16}_in \}$/m);
  const back = elementDiff(b, a)!;
  assert.equal(back.revokes, true, "unbinding takes access away");
  assert.match(back.script, /^delete element inet microvpc nic_in /m);
  assert.doesNotMatch(back.script, /chain/, "the chains stay: NIC 1 still uses them");
});
