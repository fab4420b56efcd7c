// FlowLogConfig RPCs (Create/Get/List/DeleteFlowLogConfig): cluster-wide, so
// any firewall answers them, --api-only too. The requests are checked with
// the validators the stored records are read with (flowlog-config.ts).
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { ServiceImpl } from "@connectrpc/connect";
import { InvalidArgumentError, NotFoundError } from "../common/errors.js";
import * as V from "../common/validate.js";
import { FlowLogConfigSchema, type FirewallService, type FlowLogConfig } from "../../gen/microvpc/v1/firewall_pb.js";
import type { IpamReader } from "../ipam/schema.js";
import { checkResource, checkSampleRate, type FlowLogConfigRec, type FlowLogConfigStore } from "./flowlog-config.js";
import type { FirewallStore } from "./store.js";

export type FlowLogConfigRpcs = "createFlowLogConfig" | "getFlowLogConfig" | "listFlowLogConfigs" | "deleteFlowLogConfig";

function configMsg(c: FlowLogConfigRec): FlowLogConfig {
  return create(FlowLogConfigSchema, {
    id: c.id,
    vpcId: c.vpcId,
    resourceId: c.resourceId,
    sampleRate: c.sampleRate,
    description: c.description,
    createTime: timestampFromMs(c.createdMs),
  });
}

const configId = (field: string, v: string) => V.id(field, v, "fl");

export class FlowLogConfigApi {
  constructor(
    readonly configs: FlowLogConfigStore,
    readonly firewall: Pick<FirewallStore, "getBinding">,
    readonly ipam: Pick<IpamReader, "getVpc" | "getSubnet" | "resolveVpc">,
  ) {}

  /** The VPC a resource belongs to (and a NIC's bound time); NOT_FOUND if it is unknown (a NIC: not bound yet). */
  private async vpcOf(field: string, id: string): Promise<{ vpcId: string; nicBoundMs?: number }> {
    if (id.startsWith("vpc-")) {
      if (!(await this.ipam.getVpc(id))) throw new NotFoundError("vpc", id, "list VPCs with `microvpc vpc list`");
      return { vpcId: id };
    }
    if (id.startsWith("subnet-")) {
      const s = await this.ipam.getSubnet(id);
      if (!s) throw new NotFoundError("subnet", id, "list subnets with `microvpc subnet list`");
      return { vpcId: s.vpcId };
    }
    const b = await this.firewall.getBinding(id);
    if (!b) throw new NotFoundError("nic", id, `${field}: a NIC must be bound (BindNic) before its flows can be logged; or give its subnet or VPC`);
    return { vpcId: b.vpcId, nicBoundMs: b.boundMs };
  }

  /**
   * Deletes the configurations among `ids` (all without) whose resource is
   * gone, before an answer shows them; a caller that may not write them (a
   * hypervisor's Redis user) shows them as stored, and the control plane's
   * pass deletes them.
   */
  private async collect(ids?: string[]): Promise<void> {
    await this.configs.collectGarbage(ids).catch(() => undefined);
  }

  readonly impl: Pick<ServiceImpl<typeof FirewallService>, FlowLogConfigRpcs> = {
    createFlowLogConfig: async (req) => {
      const resourceId = checkResource("resource_id", req.resourceId);
      const sampleRate = req.sampleRate === 0 ? 1 : checkSampleRate("sample_rate", req.sampleRate);
      const description = V.text("description", req.description);
      const { vpcId, nicBoundMs } = await this.vpcOf("resource_id", resourceId);
      // A configuration left by a resource of the same id that is gone (a NIC unbound and bound again) is not in the way.
      const prev = await this.configs.idOf(resourceId, vpcId);
      if (prev) await this.collect([prev]);
      return {
        config: configMsg(await this.configs.create({ vpcId, resourceId, sampleRate, description, ...(nicBoundMs !== undefined ? { nicBoundMs } : {}) })),
      };
    },

    getFlowLogConfig: async (req) => {
      const id = configId("id", req.id);
      await this.collect([id]);
      const c = await this.configs.get(id);
      if (!c) throw new NotFoundError("flow-log config", id, "list them with `microvpc flow-logs config list`");
      return { config: configMsg(c) };
    },

    listFlowLogConfigs: async (req) => {
      let vpcId: string | undefined;
      if (req.vpc !== "") {
        const id = await this.ipam.resolveVpc(V.ref("vpc", req.vpc, "vpc"));
        if (!id) throw new NotFoundError("vpc", req.vpc, "list VPCs with `microvpc vpc list`");
        vpcId = id;
      }
      await this.collect(vpcId ? (await this.configs.list(vpcId)).map((c) => c.id) : undefined);
      return { configs: (await this.configs.list(vpcId)).map(configMsg) };
    },

    deleteFlowLogConfig: async (req) => {
      if (req.id === "") throw new InvalidArgumentError("id", 'is required ("fl-" and 12 hex digits)');
      return { deleted: await this.configs.delete(configId("id", req.id)) };
    },
  };
}
