// VM records read back from Redis are input (services/vmm/schema.ts): a valid
// record round-trips, one written under another VM's or host's key is
// refused, and every field set to a hostile value is refused with a reason
// naming it.
import assert from "node:assert/strict";
import { test } from "vitest";
import { parseVmRec, storedVmText } from "../../services/vmm/schema.js";
import type { VmRec } from "../../services/vmm/store.js";

const HOST = "hv1";
const ID = "vm-0123456789ab";
const VPC = "vpc-0123456789ab";

const rec: VmRec = {
  id: ID,
  name: "web-1",
  hostId: HOST,
  vpcId: VPC,
  subnetId: "subnet-0123456789ab",
  kind: "netns",
  state: "running",
  statusMessage: "",
  groups: ["sg-0123456789ab"],
  wantedAddress: "",
  hostname: "web-1",
  vcpus: 1,
  memoryMib: 256,
  userData: Buffer.from("#cloud-config\n").toString("base64"),
  sshKeys: [{ name: "me", key: "ssh-ed25519 AAAA me@host" }],
  labels: [{ key: "env", value: "prod" }],
  imds: { tokens: 0, endpoint: 0 },
  clientToken: "tok-1",
  createdMs: 1700000000000,
  startedMs: 1700000000100,
  address: "10.1.2.5",
  nicId: "nic-0123456789ab",
  hostIf: "v0123456789ab",
  mac: "02:aa:0a:01:02:05",
  netns: `mvpcvm-${HOST}-0123456789ab`,
  pid: 0,
  kernelIpArg: "",
  consoleLog: "",
  done: [{ step: "ipam", startMs: 1, endMs: 2, detail: "10.1.2.5" }],
  op: "",
  journal: [{ t: 1, op: "create", step: "ipam", state: "failed", msg: "line 1\nline 2" }],
};
const expect = { id: ID, hostId: HOST };

test("a valid record round-trips; the writer's check accepts it", () => {
  const p = parseVmRec(JSON.stringify(rec), expect);
  assert.ok(p.ok, p.ok ? "" : p.reason);
  assert.deepEqual(p.value, rec);
  // Stored without its user-data, which lives in a host-private key (VmStore).
  assert.equal(storedVmText(rec), JSON.stringify({ ...rec, userData: "" }));
  const tap = { ...rec, kind: "qemu", netns: `mvpc-${HOST}-${VPC}`, pid: 4242, consoleLog: "/var/lib/microvpc/x.log", accel: "kvm", accelReason: "probe ok" };
  assert.ok(parseVmRec(JSON.stringify(tap), expect).ok);
});

test("a record under another VM's or host's key is refused", () => {
  for (const [what, e, re] of [
    ["another id", { id: "vm-ba9876543210", hostId: HOST }, /^id: /],
    ["another host", { id: ID, hostId: "hv2" }, /^hostId: /],
  ] as const) {
    const p = parseVmRec(JSON.stringify(rec), e);
    assert.ok(!p.ok, what);
    assert.match(p.reason, re, what);
  }
});

test("hostile or malformed fields are refused, naming the field", () => {
  const bad: [string, unknown][] = [
    ["name", "x;reboot"],
    ["hostId", "hv1:*"],
    ["vpcId", "vpc-x"],
    ["subnetId", ""],
    ["kind", "docker"],
    ["state", "up"],
    ["op", "rm"],
    ["groups", ["sg-0123456789ab", "x y"]],
    ["wantedAddress", "10.1.2"],
    ["hostname", "A B"],
    ["vcpus", -1],
    ["memoryMib", 1.5],
    ["userData", "not base64!"],
    ["userData", Buffer.alloc(16385).toString("base64")],
    ["labels", [{ key: "a b", value: "x" }]],
    ["clientToken", "tok\n"],
    ["createdMs", "1700000000000"],
    ["address", "10.1.2.5\nx"],
    ["nicId", "nic-1"],
    ["hostIf", "v0; rm -rf /"],
    ["mac", "01:00:5e:00:00:01"],
    ["netns", "mvpcvm-hv2-0123456789ab"],
    ["netns", "x\nnetns exec"],
    ["pid", 2 ** 40],
    ["kernelIpArg", "ip=x\u0000"],
    ["consoleLog", "relative/path"],
    ["done", [{ step: "reboot", startMs: 1, endMs: 2, detail: "" }]],
    ["journal", Array.from({ length: 300 }, () => rec.journal[0])],
    ["imds", { tokens: 99, endpoint: 0 }],
    ["sshKeys", [{ name: "x\u001b[2J", key: "k" }]],
    ["accel", 7],
  ];
  for (const [field, value] of bad) {
    const p = parseVmRec(JSON.stringify({ ...rec, [field]: value }), expect);
    assert.ok(!p.ok, `${field}=${JSON.stringify(value).slice(0, 40)} must be refused`);
    assert.ok(p.reason.startsWith(field), `${field}: ${p.reason}`);
  }
  for (const text of ["", "null", "[]", "{", '"x"', JSON.stringify({ ...rec, id: undefined })]) assert.ok(!parseVmRec(text, expect).ok, text);
  assert.throws(() => storedVmText({ ...rec, netns: "x" }), /refusing to store/);
});
