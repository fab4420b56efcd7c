// `microvpc vm ...`: VMs (VmService, on the vmm daemon of a hypervisor).
// CreateVm runs ipam → netagent → firewall → gateway → dns → boot and can
// take seconds: slow calls show a spinner on a terminal, and VM calls get a
// 120 s deadline unless --timeout-ms says otherwise.
import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { create } from "@bufbuild/protobuf";
import { Option, type Command } from "commander";
import { InvalidArgumentError } from "../../services/common/errors.js";
import * as V from "../../services/common/validate.js";
import { ImdsHttpEndpoint, ImdsHttpTokens } from "../../gen/microvpc/v1/gateway_pb.js";
import {
  CreateVmRequestSchema,
  CreateVmResponseSchema,
  DeleteVmRequestSchema,
  DeleteVmResponseSchema,
  GetVmResponseSchema,
  InspectVmResponseSchema,
  ListVmsResponseSchema,
  VmKind,
  VmKindSchema,
  VmOperationSchema,
  VmService,
  VmState,
  VmStateSchema,
  VmStepSchema,
  VmStepStateSchema,
  type Vm,
} from "../../gen/microvpc/v1/vm_pb.js";
import { client, globals, timeoutGiven } from "../lib/context.js";
import { EXIT } from "../lib/errors.js";
import { createName, dryRunOption, integer, labelOption, limitOption, listOption, nameOption, repeatableOption, vpcOption } from "../lib/options.js";
import { dryRun, emit, emitList, enumLabel, labels, listTable, someDetails, table, time, type Column } from "../lib/output.js";
import { collectSelected } from "../lib/paging.js";
import { selectorFilter, selectorOption } from "../lib/selector.js";
import { setActivity } from "../lib/progress.js";
import { watchVm, watchVmList } from "./vm-watch.js";

const KINDS: Record<string, VmKind> = { netns: VmKind.NETNS, qemu: VmKind.QEMU, firecracker: VmKind.FIRECRACKER };
const STATES: Record<string, VmState> = {
  pending: VmState.PENDING,
  running: VmState.RUNNING,
  stopped: VmState.STOPPED,
  deleting: VmState.DELETING,
  failed: VmState.FAILED,
};
const MAX_USER_DATA = 16384;
const HOSTNAME_RE = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;

/** Deadline of VM calls: --timeout-ms if given, else 120 s (a create boots a VMM). */
export function vmTimeout(cmd: Command): number {
  return timeoutGiven(cmd) ? globals(cmd).timeoutMs! : 120_000;
}

function address(v: Vm): string {
  const g = v.nics[0]?.guest;
  return g ? (g.prefixLength ? `${g.address}/${g.prefixLength}` : g.address) : "";
}

export function vmDetails(v: Vm, extra: [string, string][] = []): string {
  const nic = v.nics[0];
  const g = nic?.guest;
  const rows: [string, string][] = [
    ["id", v.id],
    ["name", v.name],
    ["vpc", v.vpcId],
    ["subnet", v.subnetId],
    ["kind", enumLabel(VmKindSchema, v.kind)],
    ["state", enumLabel(VmStateSchema, v.state) + (v.statusMessage ? ` (${v.statusMessage})` : "")],
    ["host", v.hostId],
    ["address", address(v) + (g?.gateway ? ` via ${g.gateway}` : "")],
    ["mac", g?.mac ?? ""],
    ["mtu", g?.mtu ? String(g.mtu) : ""],
    ["dns", g ? [...g.dnsServers, ...g.searchDomains.map((d) => `search ${d}`)].join(" ") : ""],
    ["nic", nic ? `${nic.id} on ${nic.hostInterface}${nic.vpcNamespace ? ` in ${nic.vpcNamespace}` : ""}` : ""],
    ["kernel ip=", g?.kernelIpArg ?? ""],
    ["security groups", v.securityGroupIds.join(" ") || "(none: ingress denied, egress allowed)"],
    ["public address", v.publicAddress || "(none)"],
    ["hostname", v.hostname],
  ];
  if (v.kind === VmKind.NETNS || v.kind === VmKind.UNSPECIFIED)
    rows.push(["namespace", v.namespace ? `${v.namespace} (run in it: ip netns exec ${v.namespace} …)` : ""]);
  else {
    rows.push(
      ["vcpus / memory", `${v.vcpus} / ${v.memoryMib} MiB`],
      ["kernel", v.kernelPath],
      ["initrd", v.initrdPath],
      ["rootfs", v.rootfsPath],
      ["cmdline", v.kernelCmdline],
      ["accelerator", v.accelerator + (v.acceleratorReason ? ` (${v.acceleratorReason})` : "")],
      ["pid", v.pid ? String(v.pid) : ""],
      ["console log", v.consoleLogPath],
    );
    if (v.kind === VmKind.FIRECRACKER) rows.push(["api socket", v.apiSocketPath]);
  }
  rows.push(["labels", labels(v.labels)], ["created", time(v.createTime)], ["started", time(v.startTime)], ...extra);
  return someDetails(rows);
}

/** SSH public keys from files: one key a line; blank lines and # comments skipped. */
function sshKeys(cmd: Command, files: string[]): { name: string; opensshKey: string }[] {
  const keys: { name: string; opensshKey: string }[] = [];
  for (const f of files) {
    let text = "";
    try {
      text = readFileSync(f, "utf8");
    } catch (err) {
      cmd.error(`error: cannot read --ssh-key ${f}: ${(err as Error).message}`, { exitCode: EXIT.usage });
    }
    for (const line of text.split("\n").map((l) => l.trim())) {
      if (line === "" || line.startsWith("#")) continue;
      if (!/^(ssh-|ecdsa-|sk-)[A-Za-z0-9@.-]+ [A-Za-z0-9+/=]+( .*)?$/.test(line)) {
        throw new InvalidArgumentError("ssh_keys", `${f} has a line that is not an OpenSSH public key (expected "ssh-ed25519 AAAA… comment"): ${V.show(line)}`);
      }
      keys.push({ name: "", opensshKey: line });
    }
  }
  if (keys.length > 32) throw new InvalidArgumentError("ssh_keys", `has ${keys.length} keys; the limit is 32`);
  return keys;
}

function userData(cmd: Command, file: string | undefined): Uint8Array {
  if (file === undefined) return new Uint8Array();
  let data: Buffer;
  try {
    data = readFileSync(file);
  } catch (err) {
    cmd.error(`error: cannot read --user-data ${file}: ${(err as Error).message}`, { exitCode: EXIT.usage });
  }
  if (data.length > MAX_USER_DATA) throw new InvalidArgumentError("user_data", `${file} is ${data.length} bytes; user data is at most ${MAX_USER_DATA}`);
  return new Uint8Array(data);
}

function absPath(field: string, v: string): void {
  // eslint-disable-next-line no-control-regex -- control characters are what this refuses
  if (v !== "" && (!v.startsWith("/") || /[\u0000-\u001f]/.test(v))) throw new InvalidArgumentError(field, `${V.show(v)} must be an absolute path`);
}

const VM_COLUMNS: Column<Vm>[] = [
  { head: "ID", get: (v) => v.id },
  { head: "NAME", get: (v) => v.name },
  { head: "VPC", get: (v) => v.vpcId },
  { head: "SUBNET", get: (v) => v.subnetId },
  { head: "KIND", get: (v) => enumLabel(VmKindSchema, v.kind) },
  { head: "STATE", get: (v) => enumLabel(VmStateSchema, v.state) },
  { head: "ADDRESS", get: (v) => address(v) },
  { head: "PUBLIC", get: (v) => v.publicAddress },
  { head: "HOST", get: (v) => v.hostId },
  { head: "LABELS", get: (v) => labels(v.labels), wide: true },
  { head: "CREATED", get: (v) => time(v.createTime), wide: true },
];

/** The VM list as `vm list` prints it (and `vm list --watch` redraws it); wide: with labels and creation time. */
export function vmTable(items: Vm[], wide = false): string {
  return listTable(VM_COLUMNS, items, wide);
}

const refVpcOption = () => vpcOption("; needed when REF is a name");

export function register(program: Command): void {
  const vm = program.command("vm").description("VMs: create, list, inspect, delete (vmm daemon of the hypervisor)");

  vm.command("create [name]")
    .description("create a VM: address, NIC, security groups, metadata, DNS name, then boot; undone as a whole if a step fails")
    .addOption(vpcOption("", true))
    .requiredOption("--subnet <ref>", "subnet id, or a name of the VPC")
    .addOption(listOption("--sg <group>", "security group id or name, at most 16 (default: none: ingress denied, egress allowed)"))
    .option("--address <ip>", "fixed address in the subnet (default: the lowest free one)", "")
    .addOption(
      new Option("--kind <kind>", "netns (a namespace standing in for a VM), qemu, or firecracker (needs firecracker on PATH)")
        .choices(Object.keys(KINDS))
        .default("netns"),
    )
    .addOption(new Option("--vcpus <n>", "vCPUs, qemu and firecracker (default 1)").argParser(integer(1, 64)))
    .addOption(new Option("--memory-mib <n>", "memory in MiB, qemu and firecracker (default 256)").argParser(integer(64, 262144)))
    .option("--kernel <path>", "kernel image (default: the vmm's configured one)", "")
    .option("--initrd <path>", "initrd/initramfs", "")
    .option("--rootfs <path>", "root file system image (first virtio block device)", "")
    .option("--kernel-args <args>", "extra kernel arguments, after console= and ip=", "")
    .option("--user-data <file>", "user data served at 169.254.169.254/latest/user-data (at most 16 KiB)")
    .addOption(repeatableOption("--ssh-key <file>", "file of OpenSSH public keys served by IMDS"))
    .option("--hostname <name>", "guest hostname (default: the VM name)", "")
    .addOption(new Option("--ingress-mbps <n>", "bandwidth limit toward the VM, Mbit/s").argParser(integer(1, 100000)))
    .addOption(new Option("--egress-mbps <n>", "bandwidth limit from the VM, Mbit/s").argParser(integer(1, 100000)))
    .addOption(
      new Option("--imds-tokens <mode>", "IMDS session tokens: optional (v1 and v2) or required (v2 only)")
        .choices(["optional", "required"])
        .default("optional"),
    )
    .option("--no-imds", "do not answer this VM at 169.254.169.254")
    .addOption(labelOption())
    .option(
      "--client-token <token>",
      "idempotency token: a retry with it resumes or returns the same VM (default: a new random UUID, printed if the call fails)",
    )
    .addOption(dryRunOption())
    .addOption(nameOption())
    .action(async (nameArg: string | undefined, o, cmd: Command) => {
      const name = createName(cmd, nameArg, o.name);
      const token: string = o.clientToken ?? randomUUID();
      const rate = (mbps: number | undefined) => (mbps === undefined ? undefined : { rateMbps: mbps });
      const req = create(CreateVmRequestSchema, {
        name,
        vpc: o.vpc,
        subnet: o.subnet,
        securityGroups: o.sg,
        address: o.address,
        kind: KINDS[o.kind],
        vcpus: o.vcpus,
        memoryMib: o.memoryMib,
        kernelPath: o.kernel,
        initrdPath: o.initrd,
        rootfsPath: o.rootfs,
        kernelArgs: o.kernelArgs,
        bandwidth: o.ingressMbps || o.egressMbps ? { ingress: rate(o.ingressMbps), egress: rate(o.egressMbps) } : undefined,
        sshKeys: sshKeys(cmd, o.sshKey),
        userData: userData(cmd, o.userData),
        labels: o.label,
        imdsOptions: {
          httpTokens: o.imdsTokens === "required" ? ImdsHttpTokens.REQUIRED : ImdsHttpTokens.OPTIONAL,
          httpEndpoint: o.imds ? ImdsHttpEndpoint.ENABLED : ImdsHttpEndpoint.DISABLED,
        },
        hostname: o.hostname,
        clientToken: token,
      });
      if (o.dryRun) {
        V.name("name", req.name);
        V.ref("vpc", req.vpc, "vpc");
        V.ref("subnet", req.subnet, "subnet");
        req.securityGroups.forEach((g, i) => V.ref(`security_groups[${i}]`, g, "sg"));
        if (req.securityGroups.length > 16) throw new InvalidArgumentError("security_groups", `has ${req.securityGroups.length} groups; a VM takes at most 16`);
        if (req.address) V.ipv4("address", req.address);
        absPath("kernel_path", req.kernelPath);
        absPath("initrd_path", req.initrdPath);
        absPath("rootfs_path", req.rootfsPath);
        V.text("kernel_args", req.kernelArgs, 1024);
        if (req.hostname && !HOSTNAME_RE.test(req.hostname))
          throw new InvalidArgumentError("hostname", `${V.show(req.hostname)} is not a DNS label (1–63 of [a-z0-9-])`);
        V.labels("labels", req.labels);
        V.token("client_token", req.clientToken);
        return dryRun(cmd, VmService.method.createVm, req);
      }
      setActivity(`creating vm ${name}`);
      const res = await client(cmd, VmService)
        .createVm(req, { timeoutMs: vmTimeout(cmd) })
        .catch((err: unknown) => {
          // The VM may be half-way: the same token resumes it instead of making a second.
          if (!o.clientToken) process.stderr.write(`note: client token was ${token}; retry with --client-token ${token}\n`);
          throw err;
        });
      emit(cmd, CreateVmResponseSchema, res, () => vmDetails(res.vm!, res.created ? [] : [["created", "no (an earlier call with this client token made it)"]]));
    });

  vm.command("list")
    .description("list the VMs of this hypervisor, ordered by name")
    .addOption(vpcOption("; default: every VPC"))
    .option("--subnet <ref>", "only VMs of this subnet (a name needs --vpc)", "")
    .addOption(new Option("--state <state>", "only VMs in this state").choices(Object.keys(STATES)))
    .addOption(selectorOption())
    .addOption(limitOption())
    .option("--watch", "keep the list on screen and redraw it when a VM changes (a WatchVms stream; -o json: one line per change); Ctrl-C stops")
    .action(async (o, cmd: Command) => {
      if (o.watch) return watchVmList(cmd, { vpc: o.vpc, subnet: o.subnet, state: o.state ? STATES[o.state] : undefined });
      const c = client(cmd, VmService);
      const { items, next } = await collectSelected(o.limit, selectorFilter<Vm>(o.selector), async (pageSize, pageToken) => {
        const r = await c.listVms({ vpc: o.vpc, subnet: o.subnet, state: o.state ? STATES[o.state] : VmState.UNSPECIFIED, pageSize, pageToken });
        return { items: r.vms, next: r.nextPageToken };
      });
      emitList(cmd, ListVmsResponseSchema, create(ListVmsResponseSchema, { vms: items, nextPageToken: next }), items, VM_COLUMNS, (v) => `vm/${v.id}`);
    });

  vm.command("get <ref>")
    .description("show one VM with its network configuration (a name needs --vpc)")
    .addOption(refVpcOption())
    .option("--watch", "keep the VM on screen and redraw it when it changes, until it is deleted (-o json: one line per change); Ctrl-C stops")
    .action(async (ref: string, o, cmd: Command) => {
      if (o.watch) return watchVm(cmd, ref, o.vpc);
      const res = await client(cmd, VmService).getVm({ ref, vpc: o.vpc }, { timeoutMs: vmTimeout(cmd) });
      emit(cmd, GetVmResponseSchema, res, () => vmDetails(res.vm!));
    });

  vm.command("inspect <ref>")
    .description("show a VM with the state of each step and its journal: what is done, what failed and why, what was undone")
    .addOption(refVpcOption())
    .action(async (ref: string, o, cmd: Command) => {
      const res = await client(cmd, VmService).inspectVm({ ref, vpc: o.vpc }, { timeoutMs: vmTimeout(cmd) });
      emit(cmd, InspectVmResponseSchema, res, () => {
        const steps = table(
          ["STEP", "STATE", "TOOK", "DETAIL", "ERROR"],
          res.steps.map((s) => [
            enumLabel(VmStepSchema, s.step),
            enumLabel(VmStepStateSchema, s.state),
            s.durationUs ? `${(Number(s.durationUs) / 1000).toFixed(1)} ms` : "",
            s.detail,
            s.error,
          ]),
        );
        const journal = table(
          ["TIME", "OPERATION", "STEP", "STATE", "MESSAGE"],
          res.journal.map((j) => [
            time(j.time),
            enumLabel(VmOperationSchema, j.operation),
            enumLabel(VmStepSchema, j.step),
            enumLabel(VmStepStateSchema, j.state),
            j.message,
          ]),
        );
        const op = res.operation ? `operation in flight: ${enumLabel(VmOperationSchema, res.operation)}\n` : "";
        return `${vmDetails(res.vm!)}\n${op}steps:\n${steps}\njournal:\n${journal}`;
      });
    });

  vm.command("delete <ref>")
    .description("stop a VM and undo every step in reverse (a name needs --vpc)")
    .addOption(refVpcOption())
    .addOption(dryRunOption())
    .action(async (ref: string, o, cmd: Command) => {
      const req = create(DeleteVmRequestSchema, { ref, vpc: o.vpc });
      if (o.dryRun) {
        if (!V.ref("ref", ref, "vm").id) V.ref("vpc", req.vpc, "vpc");
        return dryRun(cmd, VmService.method.deleteVm, req);
      }
      setActivity(`deleting vm ${ref}`);
      const res = await client(cmd, VmService).deleteVm(req, { timeoutMs: vmTimeout(cmd) });
      emit(cmd, DeleteVmResponseSchema, res, () => (res.deleted ? `deleted vm ${ref}` : `vm ${ref} does not exist; nothing to delete`));
    });
}
