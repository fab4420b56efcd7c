// GatewayService's instance metadata calls (Set/Get/DeleteInstanceMetadata):
// the vmm writes what IMDS serves. Validates every request, then makes
// exactly one atomic change through the store: a hypervisor's gateway uses
// its own host's MetadataStore, the control plane's (--api-only) a
// FleetMetadataStore (Get/Delete across hosts, Set refused). gateway.proto has
// no list call for metadata; the stores' list serves operators' tools directly.
import type { ServiceImpl } from "@connectrpc/connect";
import { InvalidArgumentError, NotFoundError } from "../common/errors.js";
import * as V from "../common/validate.js";
import type { GatewayService } from "../../gen/microvpc/v1/gateway_pb.js";
import { instanceId, type MetadataView } from "./metadata-store.js";

/** The GatewayService calls MetadataApi implements; GatewayApi implements the rest. */
export type MetadataRpc = "setInstanceMetadata" | "getInstanceMetadata" | "deleteInstanceMetadata";

export class MetadataApi {
  constructor(readonly store: MetadataView) {}

  private async vpcId(field: string, ref: string): Promise<string> {
    const r = V.ref(field, ref, "vpc");
    if (r.id) return r.id;
    const id = await this.store.resolveVpcName(r.name!);
    if (!id) throw new NotFoundError("vpc", ref, "list VPCs with `microvpc vpc list`");
    return id;
  }

  readonly impl: Pick<ServiceImpl<typeof GatewayService>, MetadataRpc> = {
    setInstanceMetadata: async (req) => {
      if (!req.metadata) throw new InvalidArgumentError("metadata", "is required (the whole record of the instance)");
      const { metadata, created } = await this.store.set(req.metadata);
      return { metadata, created };
    },

    getInstanceMetadata: async (req) => {
      const byAddress = req.vpc !== "" || req.address !== "";
      if (req.instanceId !== "" && byAddress) {
        throw new InvalidArgumentError("instance_id", "give either instance_id, or vpc and address, not both");
      }
      if (req.instanceId !== "") {
        const id = instanceId("instance_id", req.instanceId);
        const md = await this.store.get(id);
        if (!md) throw new NotFoundError("instance metadata", id, "the vmm writes it with SetInstanceMetadata");
        return { metadata: md };
      }
      if (!byAddress) throw new InvalidArgumentError("instance_id", "is required, unless vpc and address name the instance");
      if (req.vpc === "") throw new InvalidArgumentError("vpc", "is required with address (a VPC id or name)");
      if (req.address === "") throw new InvalidArgumentError("address", "is required with vpc (the NIC's address, e.g. 10.0.1.5)");
      V.ipv4("address", req.address);
      const vpcId = await this.vpcId("vpc", req.vpc);
      const md = await this.store.getByAddress(vpcId, req.address);
      if (!md) throw new NotFoundError("instance metadata", `${vpcId}/${req.address}`, "no instance of that VPC has metadata for this address");
      return { metadata: md };
    },

    deleteInstanceMetadata: async (req) => {
      const id = instanceId("instance_id", req.instanceId);
      const { deleted, tokensRevoked } = await this.store.delete(id);
      return { deleted, tokensRevoked };
    },
  };
}
