import { test } from "vitest";
import { compile, elementDiff } from "../../services/firewall/compile.js";
test("x", () => {
  const mk = (n: number) => ({
    vpcId: "vpc-111111111111",
    subnets: [{ subnetId: "subnet-aaaaaaaaaaaa", cidr: "10.0.0.0/21", bridge: "br-aaaaaaaaaaaa" }],
    nics: Array.from({ length: n }, (_, i) => ({ nicId: `nic-${i.toString(16).padStart(12, "0")}`, vpcId: "vpc-111111111111", subnetId: "subnet-aaaaaaaaaaaa", address: `10.0.${i >> 8}.${(i & 255) + 1}`, mac: `02:00:0a:00:${(i >> 8).toString(16).padStart(2, "0")}:${(i & 255).toString(16).padStart(2, "0")}`, hostId: "hv1", hostIf: `v${i.toString(16).padStart(12, "0")}`, groupIds: ["sg-00000000000a"], boundMs: 0, updatedMs: 0 })),
    groups: new Map([["sg-00000000000a", { id: "sg-00000000000a", vpcId: "vpc-111111111111", name: "a", description: "", labels: [], rules: [{ dir: "ingress", proto: "tcp", portFrom: 80, portTo: 80, cidr: "10.0.0.0/16", description: "" }], generation: 1, createdMs: 0, updatedMs: 0 }]]),
    members: new Map([["sg-00000000000a", []]]),
    acls: new Map(),
  }) as any;
  for (const n of [1, 1000]) {
    const a = compile(mk(n)).model;
    const st = mk(n + 1);
    let t = performance.now();
    for (let i = 0; i < 20; i++) { const b = compile(st).model; elementDiff(a, b); }
    console.log(n, ((performance.now() - t) / 20).toFixed(2), "ms per compile+diff");
  }
});
