// A VM record as vmm reads it back from Redis. Every read goes through
// parseVmRec: the record is input (whoever may write its key could have
// written anything), so each field is checked with the validators the API
// applies to a CreateVm request (common/validate.ts), and the record must be
// the one its key names (id and host). A record that fails is skipped and
// reported (common/invalid-records.ts), never acted on. Key layout: store.ts.
import { InvalidArgumentError } from "../common/errors.js";
import * as V from "../common/validate.js";
import { vpcNamespace } from "../netagent/schema.js";
import { ImdsHttpEndpoint, ImdsHttpTokens } from "../../gen/microvpc/v1/gateway_pb.js";
import { STEPS, type StepName, type VmRec } from "./store.js";

export const OWNER = "vmm";
export const VM_ID_RE = /^vm-[0-9a-f]{12}$/;

/** A record is one JSON text; the journal (200 lines) and user data (16 KiB) make most of it. */
const MAX_RECORD_CHARS = 1024 * 1024;
const MAX_USER_DATA_BYTES = 16384;
const UINT32_MAX = 2 ** 32 - 1;

const KINDS = ["netns", "qemu", "firecracker"] as const;
const STATES = ["pending", "running", "deleting", "failed"] as const;
const OPS = ["", "create", "delete", "rollback"] as const;

function oneOf<T extends string>(field: string, value: unknown, allowed: readonly T[]): T {
  const s = V.jsonString(field, value);
  if (!(allowed as readonly string[]).includes(s))
    throw new InvalidArgumentError(field, `${V.show(s)} is not one of ${allowed.map((a) => JSON.stringify(a)).join(", ")}`);
  return s as T;
}

function str(field: string, value: unknown, max = 4096): string {
  return V.text(field, V.jsonString(field, value), max);
}

/** Free text that may hold an error message (several lines): bounded, but newlines allowed. */
function message(field: string, value: unknown, max = 8192): string {
  const s = V.jsonString(field, value);
  if (s.length > max) throw new InvalidArgumentError(field, `is ${s.length} characters long; the limit is ${max}`);
  return s;
}

function optional(field: string, value: unknown, check: (field: string, s: string) => unknown): string {
  const s = V.jsonString(field, value);
  if (s !== "") check(field, s);
  return s;
}

function msField(field: string, value: unknown): number {
  return V.jsonInt(field, value, 0, Number.MAX_SAFE_INTEGER);
}

/**
 * Parses a stored VM record. `expect`: the id and host its key names; a
 * record claiming another id or host (a copy written under the wrong key)
 * is refused.
 */
export function parseVmRec(text: string, expect: { id: string; hostId: string }): V.Parsed<VmRec> {
  return V.attempt(() => {
    const o = V.jsonObject("record", V.storedJson("record", text, MAX_RECORD_CHARS));
    const id = V.id("id", V.jsonString("id", o.id), "vm");
    if (id !== expect.id) throw new InvalidArgumentError("id", `${V.show(id)} is not the id of its key (${V.show(expect.id)})`);
    const hostId = V.hostId("hostId", V.jsonString("hostId", o.hostId));
    if (hostId !== expect.hostId) throw new InvalidArgumentError("hostId", `${V.show(hostId)} is not the host of its key (${V.show(expect.hostId)})`);
    const vpcId = V.id("vpcId", V.jsonString("vpcId", o.vpcId), "vpc");
    const kind = oneOf("kind", o.kind, KINDS);
    const netns = V.jsonString("netns", o.netns);
    const allowedNs = kind === "netns" ? `mvpcvm-${hostId}-${id.slice(-12)}` : vpcNamespace(hostId, vpcId);
    if (netns !== "" && netns !== allowedNs) throw new InvalidArgumentError("netns", `${V.show(netns)} is not this VM's namespace (${allowedNs})`);
    const userData = V.jsonString("userData", o.userData);
    if (!/^[A-Za-z0-9+/]*={0,2}$/.test(userData) || Buffer.from(userData, "base64").length > MAX_USER_DATA_BYTES)
      throw new InvalidArgumentError("userData", `is not base64 of at most ${MAX_USER_DATA_BYTES} bytes`);
    const imds = V.jsonObject("imds", o.imds);
    const tokens = V.jsonInt("imds.tokens", imds.tokens, 0, UINT32_MAX);
    const endpoint = V.jsonInt("imds.endpoint", imds.endpoint, 0, UINT32_MAX);
    if (!(tokens in ImdsHttpTokens)) throw new InvalidArgumentError("imds.tokens", `${tokens} is not one of its values`);
    if (!(endpoint in ImdsHttpEndpoint)) throw new InvalidArgumentError("imds.endpoint", `${endpoint} is not one of its values`);
    const hopLimit = imds.hopLimit === undefined || imds.hopLimit === null ? undefined : V.jsonInt("imds.hopLimit", imds.hopLimit, 0, UINT32_MAX);
    const groups = V.jsonArray("groups", o.groups, 16).map((g, i) => V.id(`groups[${i}]`, V.jsonString(`groups[${i}]`, g), "sg"));
    const labels = V.labels(
      "labels",
      V.jsonArray("labels", o.labels, 64).map((raw, i) => {
        const l = V.jsonObject(`labels[${i}]`, raw);
        return { key: V.jsonString(`labels[${i}].key`, l.key), value: V.jsonString(`labels[${i}].value`, l.value) };
      }),
    );
    const sshKeys = V.jsonArray("sshKeys", o.sshKeys, 256).map((raw, i) => {
      const k = V.jsonObject(`sshKeys[${i}]`, raw);
      return { name: str(`sshKeys[${i}].name`, k.name), key: str(`sshKeys[${i}].key`, k.key, 16384) };
    });
    const done = V.jsonArray("done", o.done, 64).map((raw, i) => {
      const d = V.jsonObject(`done[${i}]`, raw);
      return {
        step: oneOf<StepName>(`done[${i}].step`, d.step, STEPS),
        startMs: msField(`done[${i}].startMs`, d.startMs),
        endMs: msField(`done[${i}].endMs`, d.endMs),
        detail: message(`done[${i}].detail`, d.detail),
      };
    });
    const journal = V.jsonArray("journal", o.journal, 256).map((raw, i) => {
      const j = V.jsonObject(`journal[${i}]`, raw);
      return {
        t: msField(`journal[${i}].t`, j.t),
        op: str(`journal[${i}].op`, j.op, 64),
        step: str(`journal[${i}].step`, j.step, 64),
        state: str(`journal[${i}].state`, j.state, 64),
        msg: message(`journal[${i}].msg`, j.msg),
      };
    });
    const rec: VmRec = {
      id,
      name: V.name("name", V.jsonString("name", o.name)),
      hostId,
      vpcId,
      subnetId: V.id("subnetId", V.jsonString("subnetId", o.subnetId), "subnet"),
      kind,
      state: oneOf("state", o.state, STATES),
      statusMessage: message("statusMessage", o.statusMessage),
      groups,
      wantedAddress: optional("wantedAddress", o.wantedAddress, V.ipv4),
      hostname: V.name("hostname", V.jsonString("hostname", o.hostname)),
      vcpus: V.jsonInt("vcpus", o.vcpus, 0, UINT32_MAX),
      memoryMib: V.jsonInt("memoryMib", o.memoryMib, 0, UINT32_MAX),
      userData,
      sshKeys,
      labels,
      imds: hopLimit === undefined ? { tokens, endpoint } : { tokens, endpoint, hopLimit },
      clientToken: V.token("clientToken", V.jsonString("clientToken", o.clientToken), { optional: true }),
      createdMs: msField("createdMs", o.createdMs),
      startedMs: msField("startedMs", o.startedMs),
      address: optional("address", o.address, V.ipv4),
      nicId: optional("nicId", o.nicId, (f, s) => V.id(f, s, "nic")),
      hostIf: optional("hostIf", o.hostIf, V.ifname),
      mac: optional("mac", o.mac, V.mac),
      netns,
      pid: V.jsonInt("pid", o.pid, 0, 2 ** 31 - 1),
      kernelIpArg: str("kernelIpArg", o.kernelIpArg),
      consoleLog: str("consoleLog", o.consoleLog),
      done,
      op: oneOf("op", o.op, OPS),
      journal,
    };
    if (rec.consoleLog !== "" && !rec.consoleLog.startsWith("/"))
      throw new InvalidArgumentError("consoleLog", `${V.show(rec.consoleLog)} is not an absolute path`);
    // Absent in records written before these existed.
    if (o.accel !== undefined) rec.accel = str("accel", o.accel, 64);
    if (o.accelReason !== undefined) rec.accelReason = message("accelReason", o.accelReason, 1024);
    return rec;
  });
}

/** The writer's check: what vmm stores reads back (a record the readers would refuse is never written). */
export function storedVmText(v: VmRec): string {
  // User-data is the tenant's (often secrets): it lives in the host-private
  // key VmStore keeps beside the record (mvpc-md:{host:<host>}:…), not in the
  // record, which every host's Redis user may read.
  const text = JSON.stringify({ ...v, userData: "" });
  const p = parseVmRec(text, { id: v.id, hostId: v.hostId });
  if (!p.ok) throw new Error(`vmm: refusing to store VM record ${v.id}: ${p.reason}`);
  return text;
}
