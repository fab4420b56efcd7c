// `microvpc pf ...`: port forwards — a port of a hypervisor's uplink address
// forwarded to a VM (GatewayService, on the gateway daemon).
import { create } from "@bufbuild/protobuf";
import { Option, type Command } from "commander";
import * as V from "../../services/common/validate.js";
import { ResourceStateSchema } from "../../gen/microvpc/v1/common_pb.js";
import { Protocol } from "../../gen/microvpc/v1/firewall_pb.js";
import {
  CreatePortForwardRequestSchema,
  CreatePortForwardResponseSchema,
  DeletePortForwardRequestSchema,
  DeletePortForwardResponseSchema,
  GatewayService,
  ListPortForwardsResponseSchema,
  type PortForward,
} from "../../gen/microvpc/v1/gateway_pb.js";
import { client } from "../lib/context.js";
import { clientTokenOption, descriptionOption, dryRunOption, limitOption, port, vpcOption } from "../lib/options.js";
import { details, dryRun, emit, enumLabel, table, time } from "../lib/output.js";
import { collect } from "../lib/paging.js";

const PROTOS: Record<string, Protocol> = { tcp: Protocol.TCP, udp: Protocol.UDP };
const protoWord = (p: Protocol) => (p === Protocol.TCP ? "tcp" : p === Protocol.UDP ? "udp" : "?");

function pfDetails(p: PortForward): string {
  return details([
    ["id", p.id],
    ["vpc", p.vpcId],
    ["forward", `${protoWord(p.protocol)} ${p.outsideAddress}:${p.outsidePort} → ${p.privateAddress}:${p.privatePort}`],
    ["host", p.hostId],
    ["nic", p.nicId],
    ["state", enumLabel(ResourceStateSchema, p.state)],
    ["description", p.description],
    ["created", time(p.createTime)],
  ]);
}

export function register(program: Command): void {
  const pf = program.command("pf").description("port forwards: a port of the hypervisor's uplink address forwarded to a VM (gateway daemon)");

  pf.command("create")
    .description("forward a port of the uplink address of the hypervisor holding the VM to the VM")
    .addOption(vpcOption("", true))
    .addOption(new Option("--protocol <proto>", "tcp or udp").choices(Object.keys(PROTOS)).default("tcp"))
    .addOption(new Option("--outside-port <port>", "port on the outside (1–65535)").argParser(port).makeOptionMandatory())
    .requiredOption("--address <ip>", "the VM's address in the VPC")
    .addOption(new Option("--port <port>", "the VM's port (default: --outside-port)").argParser(port))
    .addOption(descriptionOption())
    .addOption(clientTokenOption())
    .addOption(dryRunOption())
    .action(async (o, cmd: Command) => {
      const req = create(CreatePortForwardRequestSchema, {
        vpc: o.vpc,
        protocol: PROTOS[o.protocol],
        outsidePort: o.outsidePort,
        privateAddress: o.address,
        privatePort: o.port,
        description: o.description,
        clientToken: o.clientToken,
      });
      if (o.dryRun) {
        V.ref("vpc", req.vpc, "vpc");
        V.ipv4("private_address", req.privateAddress);
        V.text("description", req.description);
        V.token("client_token", req.clientToken, { optional: true });
        return dryRun(cmd, GatewayService.method.createPortForward, req);
      }
      const res = await client(cmd, GatewayService).createPortForward(req);
      emit(cmd, CreatePortForwardResponseSchema, res, () => pfDetails(res.portForward!));
    });

  pf.command("list")
    .description("list port forwards")
    .addOption(vpcOption(": only forwards into this VPC"))
    .option("--host-id <id>", "only forwards of this hypervisor", "")
    .addOption(limitOption())
    .action(async (o, cmd: Command) => {
      const c = client(cmd, GatewayService);
      const { items, next } = await collect(o.limit, async (pageSize, pageToken) => {
        const r = await c.listPortForwards({ vpc: o.vpc, hostId: o.hostId, pageSize, pageToken });
        return { items: r.portForwards, next: r.nextPageToken };
      });
      emit(cmd, ListPortForwardsResponseSchema, create(ListPortForwardsResponseSchema, { portForwards: items, nextPageToken: next }), () =>
        table(
          ["ID", "VPC", "PROTO", "OUTSIDE", "TO", "HOST", "STATE"],
          items.map((p) => [
            p.id,
            p.vpcId,
            protoWord(p.protocol),
            `${p.outsideAddress}:${p.outsidePort}`,
            `${p.privateAddress}:${p.privatePort}`,
            p.hostId,
            enumLabel(ResourceStateSchema, p.state),
          ]),
        ),
      );
    });

  pf.command("delete <id>")
    .description("delete a port forward")
    .addOption(dryRunOption())
    .action(async (id: string, o, cmd: Command) => {
      const req = create(DeletePortForwardRequestSchema, { ref: id });
      if (o.dryRun) {
        V.id("ref", id, "pf");
        return dryRun(cmd, GatewayService.method.deletePortForward, req);
      }
      const res = await client(cmd, GatewayService).deletePortForward(req);
      emit(cmd, DeletePortForwardResponseSchema, res, () =>
        res.deleted ? `deleted port forward ${id}` : `port forward ${id} does not exist; nothing to delete`,
      );
    });
}
