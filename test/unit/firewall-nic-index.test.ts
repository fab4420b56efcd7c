// NicIndex (services/firewall/nic-index.ts): after any sequence of NICs
// added and removed, every answer equals the same question recounted from
// the NIC list, as the firewall's delta asked it before the index.
import assert from "node:assert/strict";
import fc from "fast-check";
import { test } from "vitest";
import { sharedChainKey } from "../../services/firewall/compile.js";
import type { BindingRec, VpcFirewallState } from "../../services/firewall/model.js";
import { NicIndex } from "../../services/firewall/nic-index.js";

const G = ["sg-00000000000a", "sg-00000000000b", "sg-00000000000c"];
const st: VpcFirewallState = {
  vpcId: "vpc-111111111111",
  subnets: [],
  nics: [],
  groups: new Map(G.slice(0, 2).map((id) => [id, { id, vpcId: "vpc-111111111111", name: id, rules: [], generation: 1, updatedMs: 0 } as never])),
  members: new Map(),
  acls: new Map(),
};

const nic = (i: number, ifn: number, addr: number, groups: string[], logs: boolean): BindingRec => ({
  nicId: `nic-${String(i).padStart(12, "0")}`,
  vpcId: st.vpcId,
  subnetId: "subnet-aaaaaaaaaaaa",
  address: `10.0.0.${addr}`,
  mac: "02:00:00:00:00:01",
  hostId: "hv1",
  hostIf: `v${ifn}`,
  groupIds: groups,
  ...(logs ? { dropLogging: { ratePerSecond: 1, burst: 1 } } : {}),
  boundMs: 0,
  updatedMs: 0,
});

test("NicIndex answers as a recount of the NIC list would, after any adds and removes", () => {
  const op = fc.oneof(
    fc.record({
      add: fc.tuple(fc.integer({ min: 1, max: 12 }), fc.integer({ min: 1, max: 4 }), fc.integer({ min: 1, max: 4 }), fc.subarray(G), fc.boolean()),
    }),
    fc.record({ remove: fc.integer({ min: 1, max: 12 }) }),
  );
  fc.assert(
    fc.property(fc.array(op, { maxLength: 40 }), fc.subarray([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]), (ops, exceptIds) => {
      const idx = new NicIndex();
      const list = new Map<string, BindingRec>();
      for (const o of ops) {
        if ("add" in o) {
          const n = nic(...o.add);
          if (list.has(n.nicId)) continue;
          idx.add(n, st);
          list.set(n.nicId, n);
        } else {
          const id = nic(o.remove, 1, 1, [], false).nicId;
          idx.remove(id);
          list.delete(id);
        }
      }
      assert.deepEqual([...idx.byId.keys()].sort(), [...list.keys()].sort());
      const except = exceptIds.flatMap((i) => list.get(nic(i, 1, 1, [], false).nicId) ?? []);
      const others = [...list.values()].filter((n) => !except.includes(n));
      for (let k = 1; k <= 4; k++) {
        assert.equal(
          idx.ifTaken(`v${k}`, except),
          others.some((n) => n.hostIf === `v${k}`),
        );
        assert.equal(
          idx.addressTaken(`10.0.0.${k}`, except),
          others.some((n) => n.address === `10.0.0.${k}`),
        );
      }
      assert.deepEqual([...idx.groupsUsed(except)].sort(), [...new Set(others.flatMap((n) => n.groupIds))].sort());
      for (const key of new Set([...list.values()].map((n) => sharedChainKey(n, st)))) {
        if (key !== undefined)
          assert.equal(
            idx.sharedUsed(key, except),
            others.some((n) => sharedChainKey(n, st) === key),
          );
      }
      assert.deepEqual(NicIndex.of({ ...st, nics: [...list.values()] }).groupsUsed(except), idx.groupsUsed(except), "as built whole");
    }),
    { numRuns: 300, seed: 18 },
  );
});
