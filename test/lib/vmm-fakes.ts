// In-memory fakes of what the vmm calls — the ipam daemon (VpcService,
// SubnetService, IpamService, DnsService), netagent, firewall, gateway —
// served through createRouterTransport with the daemons' own error mapping
// (mapDomainErrors), plus a fake Booter and a fake NetnsAdapter. Each
// holds what it was asked to make, records every call in one shared log
// (in the order the calls arrived), and can be told to fail a method
// before doing its work, or after doing it (the reply lost): the vmm saga
// is tested against these, for every step and both failure points
// (test/unit/vmm-saga.test.ts).
import { Code, ConnectError, createClient, createRouterTransport, type Transport } from "@connectrpc/connect";
import { mapDomainErrors, NotFoundError } from "../../services/common/errors.js";
import { currentScope } from "../../services/common/tracing.js";
import type { Booter, Clients } from "../../services/vmm/service.js";
import type { NetnsAdapter } from "../../services/vmm/netns.js";
import { unstarted, type StepName, type VmRec } from "../../services/vmm/store.js";
import { DnsService } from "../../gen/microvpc/v1/dns_pb.js";
import { FirewallService } from "../../gen/microvpc/v1/firewall_pb.js";
import { GatewayService } from "../../gen/microvpc/v1/gateway_pb.js";
import { IpamService } from "../../gen/microvpc/v1/ipam_pb.js";
import { NetAgentService } from "../../gen/microvpc/v1/netagent_pb.js";
import { SubnetService } from "../../gen/microvpc/v1/subnet_pb.js";
import { VpcService } from "../../gen/microvpc/v1/vpc_pb.js";

export const FAKE_VPC = { id: "vpc-0000000000a1", name: "app" };
export const FAKE_SUBNET = { id: "subnet-0000000000b1", name: "web", vpcId: FAKE_VPC.id };
export const FAKE_SG = { id: "sg-0000000000c1", name: "web" };

export type FailPoint = "before" | "after";

/** The call that does each step, and the one that undoes it ("boot" and "stop" are the fake Booter's). */
export const STEP_CALLS: Record<StepName, { svc: string; do: string; undo: string }> = {
  ipam: { svc: "ipam", do: "allocate", undo: "release" },
  netagent: { svc: "netagent", do: "attachNic", undo: "detachNic" },
  firewall: { svc: "firewall", do: "bindNic", undo: "unbindNic" },
  gateway: { svc: "gateway", do: "setInstanceMetadata", undo: "deleteInstanceMetadata" },
  dns: { svc: "dns", do: "setDnsRecord", undo: "deleteDnsRecord" },
  boot: { svc: "booter", do: "boot", undo: "stop" },
};

/** What a fault throws: UNAVAILABLE before the work (a daemon down), DEADLINE_EXCEEDED after it (the reply lost). */
export const FAULT_CODE: Record<FailPoint, Code> = { before: Code.Unavailable, after: Code.DeadlineExceeded };

export function faultMessage(svc: string, method: string, at: FailPoint): string {
  return at === "before" ? `fake ${svc}: ${method} failed before doing anything` : `fake ${svc}: ${method} did its work, then the reply was lost`;
}

export interface Call {
  svc: string;
  method: string;
  /** What the call was about: the owner, NIC id or instance id. */
  key: string;
  /** "refused": the fake's own error (NOT_FOUND: nothing of that key to undo). */
  outcome: "ok" | "failed before" | "failed after" | "refused";
  /** The request id of the call being served when this one was made (tracing.ts), if any. */
  reqId?: string;
}

export class VmmFakes {
  /** Every call of a step's method or its undo, in arrival order. */
  readonly calls: Call[] = [];
  /** The `detaching` of each UnbindNic that reached the fake firewall's work. */
  readonly unbindDetaching: boolean[] = [];
  readonly allocations = new Map<string, string>();
  readonly nics = new Map<string, { id: string; address: string }>();
  readonly bindings = new Map<string, string>();
  readonly metadata = new Map<string, string>();
  readonly records = new Map<string, string>();
  readonly guests = new Map<string, number>();
  readonly namespaces = new Set<string>();
  private faults: { method: string; at: FailPoint; times: number }[] = [];
  private seq = 0;

  constructor(readonly hostId: string) {}

  /** The next `times` calls of `method` (a name in STEP_CALLS) fail at that point. */
  fail(method: string, at: FailPoint, times = 1): void {
    this.faults.push({ method, at, times });
  }

  /** What is still held anywhere, by service (empty lists: nothing). */
  held(): Record<string, string[]> {
    return {
      ipam: [...this.allocations.keys()],
      netagent: [...this.nics.keys()],
      firewall: [...this.bindings.keys()],
      gateway: [...this.metadata.keys()],
      dns: [...this.records.keys()],
      booter: [...this.guests.keys()],
      netns: [...this.namespaces],
    };
  }

  private async call<T>(svc: string, method: string, key: string, work: () => T): Promise<T> {
    // A turn of the event loop, as a real call has: the steps of a phase overlap.
    await new Promise((r) => setImmediate(r));
    const i = this.faults.findIndex((f) => f.method === method && f.times > 0);
    const f = i >= 0 ? this.faults[i] : undefined;
    if (f) f.times--;
    if (f?.at === "before") {
      this.calls.push({ svc, method, key, outcome: "failed before", reqId: currentScope()?.reqId });
      throw new ConnectError(faultMessage(svc, method, "before"), FAULT_CODE.before);
    }
    let r: T;
    try {
      r = work();
    } catch (e) {
      // The fake's own answer (NOT_FOUND for nothing to undo): recorded too.
      this.calls.push({ svc, method, key, outcome: "refused", reqId: currentScope()?.reqId });
      throw e;
    }
    this.calls.push({ svc, method, key, outcome: f ? "failed after" : "ok", reqId: currentScope()?.reqId });
    if (f) throw new ConnectError(faultMessage(svc, method, "after"), FAULT_CODE.after);
    return r;
  }

  private hex12(): string {
    return (++this.seq).toString(16).padStart(12, "0");
  }

  private router(register: Parameters<typeof createRouterTransport>[0]): Transport {
    return createRouterTransport(register, { router: { interceptors: [mapDomainErrors] } });
  }

  /** Typed clients over in-memory transports: what main.ts builds over grpc-js. */
  clients(): Clients {
    const vpcOf = (ref: string) => {
      if (ref !== FAKE_VPC.id && ref !== FAKE_VPC.name) throw new NotFoundError("vpc", ref);
      return FAKE_VPC;
    };
    const ipamT = this.router((router) => {
      router.service(VpcService, { getVpc: (req) => ({ vpc: vpcOf(req.ref) }) });
      router.service(SubnetService, {
        getSubnet: (req) => {
          vpcOf(req.vpc);
          if (req.ref !== FAKE_SUBNET.id && req.ref !== FAKE_SUBNET.name) throw new NotFoundError("subnet", req.ref);
          return { subnet: FAKE_SUBNET };
        },
      });
      router.service(IpamService, {
        allocate: (req) =>
          this.call("ipam", "allocate", req.owner, () => {
            let address = this.allocations.get(req.owner);
            if (!address) {
              address = req.address || `10.0.1.${this.allocations.size + 4}`;
              this.allocations.set(req.owner, address);
            }
            return { allocation: { address, subnetId: req.subnetId, owner: req.owner } };
          }),
        release: (req) =>
          this.call("ipam", "release", req.owner, () => {
            if (!this.allocations.delete(req.owner)) throw new NotFoundError("allocation", req.owner);
            return {};
          }),
      });
      router.service(DnsService, {
        setDnsRecord: (req) =>
          this.call("dns", "setDnsRecord", req.owner, () => {
            this.records.set(req.owner, `${req.name} ${req.address}`);
            return { record: { name: req.name, address: req.address, fqdn: `${req.name}.${FAKE_VPC.name}.internal` } };
          }),
        // By owner, as the vmm asks; nothing held is no error (the real one's NOT_FOUND is for a VPC that is gone).
        deleteDnsRecord: (req) =>
          this.call("dns", "deleteDnsRecord", req.owner, () => {
            this.records.delete(req.owner);
            return {};
          }),
      });
    });
    const netagentT = this.router((router) =>
      router.service(NetAgentService, {
        attachNic: (req) =>
          this.call("netagent", "attachNic", req.owner, () => {
            let nic = this.nics.get(req.owner);
            if (!nic) {
              nic = { id: `nic-${this.hex12()}`, address: req.address };
              this.nics.set(req.owner, nic);
            }
            return {
              nic: {
                id: nic.id,
                hostInterface: `tap${nic.id.slice(-8)}`,
                vpcNamespace: `mvpc-${this.hostId}-${req.vpc}`,
                guest: { address: nic.address, mac: `02:00:00:00:00:${nic.id.slice(-2)}`, kernelIpArg: `ip=${nic.address}::10.0.1.1:255.255.255.0::eth0:off` },
              },
            };
          }),
        // Idempotent, as the vmm relies on (it does not ignore NOT_FOUND here).
        detachNic: (req) =>
          this.call("netagent", "detachNic", req.owner, () => {
            this.nics.delete(req.owner);
            return {};
          }),
      }),
    );
    const firewallT = this.router((router) =>
      router.service(FirewallService, {
        getSecurityGroup: (req) => {
          if (req.ref !== FAKE_SG.id && req.ref !== FAKE_SG.name) throw new NotFoundError("security group", req.ref);
          return { securityGroup: { id: FAKE_SG.id, name: FAKE_SG.name, vpcId: FAKE_VPC.id } };
        },
        bindNic: (req) =>
          this.call("firewall", "bindNic", req.nicId, () => {
            this.bindings.set(req.nicId, req.address);
            return {};
          }),
        unbindNic: (req) =>
          this.call("firewall", "unbindNic", req.nicId, () => {
            this.unbindDetaching.push(req.detaching);
            if (!this.bindings.delete(req.nicId)) throw new NotFoundError("binding", req.nicId);
            return {};
          }),
      }),
    );
    const gatewayT = this.router((router) =>
      router.service(GatewayService, {
        setInstanceMetadata: (req) =>
          this.call("gateway", "setInstanceMetadata", req.metadata!.instanceId, () => {
            this.metadata.set(req.metadata!.instanceId, req.metadata!.localIpv4);
            return {};
          }),
        deleteInstanceMetadata: (req) =>
          this.call("gateway", "deleteInstanceMetadata", req.instanceId, () => {
            if (!this.metadata.delete(req.instanceId)) throw new NotFoundError("instance metadata", req.instanceId);
            return {};
          }),
      }),
    );
    return {
      vpc: createClient(VpcService, ipamT),
      subnet: createClient(SubnetService, ipamT),
      ipam: createClient(IpamService, ipamT),
      dns: createClient(DnsService, ipamT),
      netagent: createClient(NetAgentService, netagentT),
      firewall: createClient(FirewallService, firewallT),
      gateway: createClient(GatewayService, gatewayT),
    };
  }

  /** A Booter whose guests are entries here; stop finds a guest by VM id, as the real one adopts QEMU by name. */
  booter(): Booter {
    return {
      boot: (v: VmRec) =>
        this.call("booter", "boot", v.id, () => {
          const pid = 40000 + this.seq++;
          this.guests.set(v.id, pid);
          return { pid, consoleLog: `/var/lib/microvpc/vm/${v.id}.console.log`, accel: "tcg", accelReason: "fake" };
        }),
      stop: (v: VmRec) =>
        this.call("booter", "stop", v.id, () => {
          this.guests.delete(v.id);
        }),
    };
  }

  /** kind=netns namespaces as a set; probes answer nothing. */
  netns(): NetnsAdapter {
    return {
      add: async (name) => {
        this.namespaces.add(name);
      },
      del: async (name) => {
        this.namespaces.delete(name);
      },
      ping: async () => false,
      tcpProbe: async () => "unreachable",
      udpProbe: async () => "unreachable",
    };
  }
}

/** A VM record as CreateVm claims it (op "create", nothing done yet), in FAKE_VPC and FAKE_SUBNET; `over` changes fields. */
export function vmRecord(hostId: string, id: string, name: string, over: Partial<VmRec> = {}): VmRec {
  return {
    id,
    name,
    hostId,
    vpcId: FAKE_VPC.id,
    subnetId: FAKE_SUBNET.id,
    kind: "netns",
    state: "pending",
    statusMessage: "",
    groups: [],
    wantedAddress: "",
    hostname: name,
    vcpus: 1,
    memoryMib: 256,
    userData: "",
    sshKeys: [],
    labels: [],
    imds: { tokens: 0, endpoint: 0 },
    clientToken: "",
    ...unstarted(),
    ...over,
  };
}
