// PeeringService (served by the ipam daemon): validates, then makes one
// atomic change through PeeringStore. The data plane is every netagent's:
// each follows peering.* events and applies what concerns its VPCs
// (services/netagent/peering.ts), then acknowledges; a peering is AVAILABLE
// once every host with NICs of either VPC has.
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { ServiceImpl } from "@connectrpc/connect";
import { FailedPreconditionError, InvalidArgumentError, NotFoundError } from "../common/errors.js";
import { decodeNameToken, encodePageToken } from "../common/paging.js";
import * as V from "../common/validate.js";
import { ResourceState } from "../../gen/microvpc/v1/common_pb.js";
import { PeeringSchema, PeeringService, type Peering } from "../../gen/microvpc/v1/peering_pb.js";
import type { IpamReader, VpcRec } from "../ipam/schema.js";
import { PeeringStore, type PeeringRec } from "./store.js";

// The record rules (allowed CIDRs among them) live with the record: schema.ts.
export { allowedCidrs } from "./schema.js";
import { allowedCidrs } from "./schema.js";

export class Peerings {
  constructor(
    readonly ipam: Pick<IpamReader, "vpcByRef">,
    readonly store: PeeringStore,
  ) {}

  async msg(p: PeeringRec): Promise<Peering> {
    const { hosts, pending } = await this.store.convergence(p);
    const shown = pending.slice(0, 5).join(", ") + (pending.length > 5 ? ` and ${pending.length - 5} more` : "");
    return create(PeeringSchema, {
      id: p.id,
      name: p.name,
      vpc1Id: p.vpc1Id,
      vpc2Id: p.vpc2Id,
      vpc1AllowedCidrs: p.vpc1Allowed,
      vpc2AllowedCidrs: p.vpc2Allowed,
      description: p.description,
      labels: p.labels,
      state: pending.length ? ResourceState.PENDING : ResourceState.AVAILABLE,
      statusMessage: pending.length ? `waiting for ${pending.length} of ${hosts.length} host(s) to apply it: ${shown}` : "",
      createTime: timestampFromMs(p.createdMs),
    });
  }

  /** ref, or vpc1 and vpc2 (in either order): what Get and Delete take. */
  private async find(req: { ref: string; vpc1: string; vpc2: string }): Promise<{ rec: PeeringRec | null; what: string }> {
    if (req.ref !== "") {
      if (req.vpc1 !== "" || req.vpc2 !== "") throw new InvalidArgumentError("ref", "give either ref or vpc1 and vpc2, not both");
      const r = V.ref("ref", req.ref, "pcx");
      const id = r.id ?? (await this.store.idByName(r.name!));
      return { rec: id ? await this.store.get(id) : null, what: req.ref };
    }
    if (req.vpc1 === "" || req.vpc2 === "")
      throw new InvalidArgumentError(req.vpc1 === "" ? "vpc1" : "vpc2", "is required: name the peering by ref, or by vpc1 and vpc2");
    const [a, b] = await Promise.all([this.ipam.vpcByRef("vpc1", req.vpc1), this.ipam.vpcByRef("vpc2", req.vpc2)]);
    const id = await this.store.idByPair(a.id, b.id);
    return { rec: id ? await this.store.get(id) : null, what: `${a.name}--${b.name}` };
  }

  readonly impl: ServiceImpl<typeof PeeringService> = {
    createPeering: async (req) => {
      const [a, b]: VpcRec[] = await Promise.all([this.ipam.vpcByRef("vpc1", req.vpc1), this.ipam.vpcByRef("vpc2", req.vpc2)]);
      if (a.id === b.id) throw new InvalidArgumentError("vpc2", `is the same VPC as vpc1 (${a.name}); a VPC cannot be peered with itself`);
      const allowed1 = allowedCidrs("vpc1_allowed_cidrs", req.vpc1AllowedCidrs, a);
      const allowed2 = allowedCidrs("vpc2_allowed_cidrs", req.vpc2AllowedCidrs, b);
      const name = req.name === "" ? "" : V.name("name", req.name);
      const description = V.text("description", req.description);
      const labels = V.labels("labels", req.labels);
      const token = V.token("client_token", req.clientToken, { optional: true });
      const ca = V.cidr("vpc1", a.cidr, { min: 0, max: 32 });
      const cb = V.cidr("vpc2", b.cidr, { min: 0, max: 32 });
      if (V.overlaps(ca, cb)) {
        throw new FailedPreconditionError(
          `VPC ${a.name} (${a.cidr}) and VPC ${b.name} (${b.cidr}) overlap; only VPCs with disjoint CIDRs can be peered (routes between them would be ambiguous)`,
        );
      }
      const fallback = `${a.name}--${b.name}`;
      const { peering } = await this.store.create(
        { vpc1Id: a.id, vpc2Id: b.id, vpc1Cidr: a.cidr, vpc2Cidr: b.cidr, vpc1Allowed: allowed1, vpc2Allowed: allowed2, description, labels },
        (id) => name || (fallback.length <= 63 ? fallback : id),
        token,
      );
      return { peering: await this.msg(peering) };
    },
    getPeering: async (req) => {
      const { rec, what } = await this.find(req);
      if (!rec) throw new NotFoundError("peering", what, "list peerings with `microvpc vpc peer list`");
      return { peering: await this.msg(rec) };
    },
    listPeerings: async (req) => {
      const size = V.pageSize("page_size", req.pageSize);
      const after = decodeNameToken(req.pageToken);
      const vpcId = req.vpc === "" ? "" : (await this.ipam.vpcByRef("vpc", req.vpc)).id;
      const recs = await this.store.list(after ?? "", size + 1, vpcId);
      const page = recs.slice(0, size);
      return {
        peerings: await Promise.all(page.map((p) => this.msg(p))),
        nextPageToken: recs.length > size ? encodePageToken(page[page.length - 1].name) : "",
      };
    },
    deletePeering: async (req) => {
      const { rec } = await this.find(req).catch((err: unknown) => {
        // Deleting by a VPC that no longer exists: nothing to delete.
        if (err instanceof NotFoundError) return { rec: null };
        throw err;
      });
      if (!rec) return { deleted: false };
      return { deleted: await this.store.delete(rec) };
    },
  };
}
