// GatewayService: NAT gateways, floating IPs and port forwards (the metadata
// calls are MetadataApi's). Validates, resolves the catalog through IPAM and
// the NIC index, then makes one change through GatewayStore.
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { ServiceImpl } from "@connectrpc/connect";
import type { MetadataRpc } from "./metadata-api.js";
import type { Redis } from "ioredis";
import { FailedPreconditionError, InvalidArgumentError, NotFoundError } from "../common/errors.js";
import * as V from "../common/validate.js";
import { ResourceState } from "../../gen/microvpc/v1/common_pb.js";
import { Protocol } from "../../gen/microvpc/v1/firewall_pb.js";
import {
  FloatingIpSchema,
  GatewayService,
  NatGatewaySchema,
  PortForwardSchema,
  type FloatingIp,
  type NatGateway,
  type PortForward,
} from "../../gen/microvpc/v1/gateway_pb.js";
import type { IpamReader, SubnetRec, VpcRec } from "../ipam/schema.js";
import { locateNic } from "../netagent/schema.js";
import { portReserved, showPortRanges, type PortRanges } from "./plan.js";
import type { FipRec, GatewayStore, NatRec, PfRec } from "./store.js";

export interface GatewayOptions {
  /** Floating IP pool, e.g. "203.0.113.0/24". */
  pool: V.Cidr;
  /** Ports the hypervisor serves itself (SSH, the daemons): no port forward may take them. */
  reservedPorts?: PortRanges;
}

/** holder: the host holding the address now ("" none: no gateway of the VPC's hosts has taken it yet, or it is failing over). */
const natMsg = (n: NatRec, holder = ""): NatGateway =>
  create(NatGatewaySchema, {
    id: n.id,
    vpcId: n.vpcId,
    subnetId: n.subnetId,
    sourceSubnetIds: n.sources,
    description: n.description,
    state: n.address && !holder ? ResourceState.PENDING : ResourceState.AVAILABLE,
    statusMessage: n.address && !holder ? "no host of the VPC holds the address yet (a host of the VPC with a running gateway takes it)" : "",
    createTime: timestampFromMs(n.createdMs),
    address: n.address,
    holderHostId: holder,
  });

/** The usable addresses of the floating pool (network and broadcast left out of a pool wider than /31). */
export function poolRange(pool: V.Cidr): { first: number; last: number } {
  return { first: pool.base + (pool.size > 2 ? 1 : 0), last: pool.base + pool.size - (pool.size > 2 ? 2 : 1) };
}

const fipMsg = (f: FipRec): FloatingIp =>
  create(FloatingIpSchema, {
    id: f.id,
    address: f.address,
    vpcId: f.vpcId,
    privateAddress: f.private,
    nicId: f.nicId,
    hostId: f.hostId,
    description: f.description,
    state: ResourceState.AVAILABLE,
    allocateTime: timestampFromMs(f.allocatedMs),
    associateTime: f.associatedMs ? timestampFromMs(f.associatedMs) : undefined,
  });

const pfMsg = (p: PfRec): PortForward =>
  create(PortForwardSchema, {
    id: p.id,
    vpcId: p.vpcId,
    protocol: p.proto === "tcp" ? Protocol.TCP : Protocol.UDP,
    hostId: p.hostId,
    outsidePort: p.outsidePort,
    privateAddress: p.private,
    privatePort: p.privatePort,
    nicId: p.nicId,
    description: p.description,
    state: ResourceState.AVAILABLE,
    createTime: timestampFromMs(p.createdMs),
  });

export class GatewayApi {
  constructor(
    readonly store: GatewayStore,
    readonly ipam: IpamReader,
    readonly redis: Redis,
    readonly opts: GatewayOptions,
  ) {}

  private async vpc(ref: string, field = "vpc"): Promise<VpcRec> {
    const r = V.ref(field, ref, "vpc");
    const id = await this.ipam.resolveVpc(r);
    const v = id ? await this.ipam.getVpc(id) : null;
    if (!v) throw new NotFoundError("vpc", ref);
    return v;
  }

  private async subnet(ref: string, vpc: VpcRec, field: string): Promise<SubnetRec> {
    const id = await this.ipam.resolveSubnet(V.ref(field, ref, "subnet"), vpc.id);
    const s = id ? await this.ipam.getSubnet(id) : null;
    if (!s || s.vpcId !== vpc.id) throw new NotFoundError("subnet", ref, `VPC ${vpc.name} has no such subnet`);
    return s;
  }

  /** The NIC holding (vpc, address), wherever it is. */
  private async nicAt(vpc: VpcRec, field: string, address: string) {
    V.ipv4(field, address);
    const loc = await locateNic(this.redis, vpc.id, address);
    if (!loc) throw new FailedPreconditionError(`no NIC has ${address} in VPC ${vpc.name}; attach the VM first`);
    return loc;
  }

  /** A floating IP by id or address; `field` names the request field it came from. */
  private fipRef(ref: string, field = "floating_ip") {
    if (ref === "") throw new InvalidArgumentError(field, "is required (an id fip-… or the address)");
    return /^fip-[0-9a-f]{12}$/.test(ref) ? this.store.getFip(ref) : (V.ipv4(field, ref), this.store.fipByAddress(ref));
  }

  /** A NAT gateway as the API shows it: with the host holding its address (validated, GatewayStore.natHolder). */
  private async natOut(n: NatRec): Promise<NatGateway> {
    return natMsg(n, n.address ? ((await this.store.natHolder(n.vpcId)).holder ?? "") : "");
  }

  /** Checks a wanted address ("" none) against the pool: INVALID_ARGUMENT outside it. */
  private inPool(field: string, address: string): void {
    if (!address) return;
    const { first, last } = poolRange(this.opts.pool);
    const n = V.ipv4(field, address);
    if (n < first || n > last)
      throw new InvalidArgumentError(field, `${address} is outside the floating IP pool ${this.opts.pool.text}; pick one in it or leave it empty`);
  }

  /** Every GatewayService call but the instance metadata ones (MetadataApi). */
  readonly impl: Omit<ServiceImpl<typeof GatewayService>, MetadataRpc | "getGatewayStatus"> = {
    createNatGateway: async (req) => {
      const v = await this.vpc(req.vpc);
      const s = await this.subnet(req.subnet, v, "subnet");
      if (s.type !== "public") throw new FailedPreconditionError(`subnet ${s.name} is private; a NAT gateway lives in a public subnet (as in AWS)`);
      const sources: string[] = [];
      for (const [i, ref] of req.sourceSubnets.entries()) sources.push((await this.subnet(ref, v, `source_subnets[${i}]`)).id);
      this.inPool("address", req.address);
      // Made only while the subnet stands, whatever DeleteSubnet runs meanwhile (its hold on a cluster).
      const n = await this.store.createNatInSubnet(
        { vpcId: v.id, subnetId: s.id, sources, description: V.text("description", req.description) },
        V.token("client_token", req.clientToken, { optional: true }),
        poolRange(this.opts.pool),
        req.address,
      );
      return { natGateway: await this.natOut(n) };
    },
    getNatGateway: async (req) => {
      const n = /^nat-[0-9a-f]{12}$/.test(req.ref) ? await this.store.getNat(req.ref) : await this.store.natOfVpc((await this.vpc(req.vpc || req.ref)).id);
      if (!n) throw new NotFoundError("nat gateway", req.ref || req.vpc);
      return { natGateway: await this.natOut(n) };
    },
    listNatGateways: async (req) => {
      const vpcId = req.vpc ? (await this.vpc(req.vpc)).id : "";
      const all = (await this.store.listNats()).filter((n) => !vpcId || n.vpcId === vpcId);
      return { natGateways: await Promise.all(all.map((n) => this.natOut(n))), nextPageToken: "" };
    },
    deleteNatGateway: async (req) => {
      let n: NatRec | null;
      if (/^nat-[0-9a-f]{12}$/.test(req.ref)) n = await this.store.getNat(req.ref);
      else {
        const r = V.ref("vpc", req.vpc || req.ref, "vpc");
        const id = await this.ipam.resolveVpc(r);
        n = id ? await this.store.natOfVpc(id) : null;
      }
      return { deleted: n ? await this.store.deleteNat(n) : false };
    },

    allocateFloatingIp: async (req) => {
      this.inPool("address", req.address);
      const f = await this.store.allocateFip(poolRange(this.opts.pool), req.address, V.text("description", req.description));
      return { floatingIp: fipMsg(f) };
    },
    associateFloatingIp: async (req) => {
      const f = await this.fipRef(req.floatingIp);
      if (!f) throw new NotFoundError("floating ip", req.floatingIp, "allocate one first");
      const v = await this.vpc(req.vpc);
      const loc = await this.nicAt(v, "private_address", req.privateAddress);
      const sub = (await this.ipam.listSubnets(v.id, "", 1000)).find((s) => {
        const a = V.ipToInt(req.privateAddress);
        return a >= s.base && a < s.base + s.size;
      });
      if (sub && sub.type !== "public")
        throw new FailedPreconditionError(`${req.privateAddress} is in private subnet ${sub.name}; floating IPs go to NICs of public subnets`);
      if (f.private && (f.private !== req.privateAddress || f.vpcId !== v.id) && !req.allowReassociation) {
        throw new FailedPreconditionError(`${f.address} is associated with ${f.private}; disassociate it first or set allow_reassociation`);
      }
      const other = (await this.store.listFips()).find((x) => x.id !== f.id && x.vpcId === v.id && x.private === req.privateAddress);
      if (other) throw new FailedPreconditionError(`${req.privateAddress} already has floating IP ${other.address}`);
      await this.store.setFipTarget(f, { vpcId: v.id, private: req.privateAddress, nicId: loc.nicId, hostId: loc.hostId });
      return { floatingIp: fipMsg((await this.store.getFip(f.id))!) };
    },
    disassociateFloatingIp: async (req) => {
      const f = await this.fipRef(req.floatingIp);
      if (!f) throw new NotFoundError("floating ip", req.floatingIp);
      const was = !!f.private;
      if (was) await this.store.setFipTarget(f, null);
      return { floatingIp: fipMsg((await this.store.getFip(f.id))!), disassociated: was };
    },
    releaseFloatingIp: async (req) => {
      const f = await this.fipRef(req.floatingIp);
      if (!f) return { released: false };
      if (f.private && req.force) await this.store.setFipTarget(f, null);
      return { released: await this.store.releaseFip(req.force ? { ...f, private: "" } : f) };
    },
    getFloatingIp: async (req) => {
      const f = await this.fipRef(req.ref, "ref");
      if (!f) throw new NotFoundError("floating ip", req.ref);
      return { floatingIp: fipMsg(f) };
    },
    listFloatingIps: async (req) => {
      const vpcId = req.vpc ? (await this.vpc(req.vpc)).id : "";
      const all = await this.store.listFips();
      const pool = this.opts.pool;
      // NAT gateways' addresses come from the same pool.
      const nats = (await this.store.listNats()).filter((n) => n.address).length;
      return {
        floatingIps: all.filter((f) => !vpcId || f.vpcId === vpcId).map(fipMsg),
        nextPageToken: "",
        pool: [pool.text],
        poolFree: Math.max(0, pool.size - 2 - all.length - nats),
      };
    },

    createPortForward: async (req) => {
      const v = await this.vpc(req.vpc);
      if (req.protocol !== Protocol.TCP && req.protocol !== Protocol.UDP) throw new InvalidArgumentError("protocol", "must be PROTOCOL_TCP or PROTOCOL_UDP");
      const outsidePort = V.port("outside_port", req.outsidePort);
      // The forward takes the port on the hypervisor's uplink address: a port
      // the hypervisor serves (SSH, the daemons' gRPC and metrics) would hand
      // its own service to a VM.
      if (portReserved(this.opts.reservedPorts, outsidePort)) {
        throw new FailedPreconditionError(
          `outside port ${outsidePort} is reserved for the hypervisor's own services (--reserved-ports / MICROVPC_RESERVED_PORTS: ${showPortRanges(this.opts.reservedPorts ?? [])}); pick another outside port`,
        );
      }
      const privatePort = V.port("private_port", req.privatePort ?? req.outsidePort);
      const loc = await this.nicAt(v, "private_address", req.privateAddress);
      const p = await this.store.createPf(
        {
          vpcId: v.id,
          proto: req.protocol === Protocol.TCP ? "tcp" : "udp",
          hostId: loc.hostId,
          outsidePort,
          private: req.privateAddress,
          privatePort,
          nicId: loc.nicId,
          description: V.text("description", req.description),
        },
        V.token("client_token", req.clientToken, { optional: true }),
      );
      return { portForward: pfMsg(p) };
    },
    listPortForwards: async (req) => {
      const vpcId = req.vpc ? (await this.vpc(req.vpc)).id : "";
      return { portForwards: (await this.store.listPfs()).filter((p) => !vpcId || p.vpcId === vpcId).map(pfMsg), nextPageToken: "" };
    },
    deletePortForward: async (req) => {
      if (!/^pf-[0-9a-f]{12}$/.test(req.ref)) throw new InvalidArgumentError("ref", `${V.show(req.ref)} is not a port forward id (pf-…)`);
      const p = await this.store.getPf(req.ref);
      return { deleted: p ? await this.store.deletePf(p) : false };
    },
  };
}
