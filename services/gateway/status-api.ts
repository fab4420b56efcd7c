// GatewayService's GetGatewayStatus: the last pass of this hypervisor's
// gateway and the records it read from Redis and skipped (the netagent's
// GetHostStatus and the firewall's GetFirewallStatus report theirs the same
// way). Reads only what this process remembers (common/invalid-records.ts):
// no Redis work, so a host flooded with bad records still answers.
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { ServiceImpl } from "@connectrpc/connect";
import { invalidRecords } from "../common/invalid-records.js";
import * as V from "../common/validate.js";
import { GatewayHealth, GatewayInvalidRecordSchema, type GatewayService } from "../../gen/microvpc/v1/gateway_pb.js";
import { OWNER } from "./schema.js";
import { OWNER as DNS_OWNER } from "../dns/schema.js";
import { OWNER as IPAM_OWNER } from "../ipam/schema.js";

/** At most this many records in one answer (the count says how many there are). */
export const MAX_STATUS_RECORDS = 100;

export class GatewayStatusApi {
  constructor(
    readonly hostId: string,
    readonly status: () => { lastApplyMs: number; lastError: string },
  ) {}

  readonly impl: Pick<ServiceImpl<typeof GatewayService>, "getGatewayStatus"> = {
    getGatewayStatus: async (req) => {
      const vpc = req.vpc === "" ? "" : V.id("vpc", req.vpc, "vpc");
      const all = invalidRecords([OWNER, DNS_OWNER, IPAM_OWNER]).filter((r) => vpc === "" || r.vpcId === vpc);
      const st = this.status();
      return {
        hostId: this.hostId,
        health: st.lastError ? GatewayHealth.DEGRADED : GatewayHealth.HEALTHY,
        lastError: st.lastError,
        lastApplyTime: st.lastApplyMs ? timestampFromMs(st.lastApplyMs) : undefined,
        invalidRecords: all.slice(0, MAX_STATUS_RECORDS).map((r) =>
          create(GatewayInvalidRecordSchema, {
            owner: r.owner,
            kind: r.kind,
            key: r.key,
            field: r.field ?? "",
            vpc: r.vpcId ?? "",
            reason: r.reason,
            firstSeenTime: timestampFromMs(r.firstSeenMs),
            lastSeenTime: timestampFromMs(r.lastSeenMs),
          }),
        ),
        invalidRecordCount: all.length,
      };
    },
  };
}
