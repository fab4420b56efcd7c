// `microvpc vpn ...`: remote access into a VPC — its WireGuard endpoint and
// the clients registered to it (VpnService, on the netagent daemon).
// `client add` makes the client's key pair here (X25519, node:crypto) unless
// a public key is given: the private key is printed in the wg-quick file and
// never sent anywhere.
import { create } from "@bufbuild/protobuf";
import { generateKeyPairSync } from "node:crypto";
import type { Command } from "commander";
import {
  CreateVpnClientResponseSchema,
  DeleteVpnClientResponseSchema,
  DeleteVpnEndpointResponseSchema,
  GetVpnClientResponseSchema,
  GetVpnEndpointResponseSchema,
  ListVpnClientsResponseSchema,
  SetVpnEndpointResponseSchema,
  VpnService,
  type VpnClient,
  type VpnEndpoint,
} from "../../gen/microvpc/v1/vpn_pb.js";
import { clientConfig } from "../../services/netagent/vpn/plan.js";
import { client } from "../lib/context.js";
import { integer, limitOption, listOption, vpcOption } from "../lib/options.js";
import { details, emit, emitList, time } from "../lib/output.js";
import { collectSelected } from "../lib/paging.js";

/** A WireGuard key pair: the raw 32-byte X25519 keys in base64, as `wg genkey` / `wg pubkey` print them. */
export function x25519Pair(): { privateKey: string; publicKey: string } {
  const { privateKey, publicKey } = generateKeyPairSync("x25519");
  const priv = privateKey.export({ format: "jwk" }).d!;
  const pub = publicKey.export({ format: "jwk" }).x!;
  return { privateKey: Buffer.from(priv, "base64url").toString("base64"), publicKey: Buffer.from(pub, "base64url").toString("base64") };
}

function endpointDetails(e: VpnEndpoint): string {
  return details([
    ["vpc", e.vpcId],
    ["host", e.hostId],
    ["endpoint", `${e.publicAddress}:${e.listenPort}`],
    ["client range", e.clientCidr],
    ["public key", e.publicKey || "none yet (the host has not applied it)"],
    ["updated", time(e.updateTime)],
  ]);
}

function clientDetails(c: VpnClient): string {
  return details([
    ["id", c.id],
    ["name", c.name],
    ["vpc", c.vpcId],
    ["address", c.address],
    ["public key", c.publicKey],
    ["groups", c.securityGroupIds.join(" ") || "none (reaches nothing)"],
    ["created", time(c.createTime)],
  ]);
}

export function register(program: Command): void {
  const vpn = program.command("vpn").description("remote access into a VPC: WireGuard clients and the VPC's endpoint (netagent daemon)");
  const ep = vpn.command("endpoint").description("the VPC's VPN endpoint: which host runs it, where clients connect, the client range");

  ep.command("set")
    .description("create or change the VPC's VPN endpoint")
    .addOption(vpcOption("", true))
    .requiredOption("--host-id <id>", "the hypervisor that runs the endpoint (it needs an uplink clients reach)")
    .requiredOption("--address <addr>", "address clients connect to (IPv4 or DNS name)")
    .requiredOption("--port <port>", "UDP listen port", integer(1, 65535))
    .requiredOption("--client-cidr <cidr>", "client address range: /20–/29 inside the VPC CIDR, overlapping no subnet")
    .action(async (o, cmd: Command) => {
      const res = await client(cmd, VpnService).setVpnEndpoint({
        vpc: o.vpc,
        hostId: o.hostId,
        publicAddress: o.address,
        listenPort: o.port,
        clientCidr: o.clientCidr,
      });
      emit(cmd, SetVpnEndpointResponseSchema, res, () => endpointDetails(res.endpoint!));
    });

  ep.command("get")
    .description("show the VPC's VPN endpoint")
    .addOption(vpcOption("", true))
    .action(async (o, cmd: Command) => {
      const res = await client(cmd, VpnService).getVpnEndpoint({ vpc: o.vpc });
      emit(cmd, GetVpnEndpointResponseSchema, res, () => endpointDetails(res.endpoint!));
    });

  ep.command("delete")
    .description("delete the VPC's VPN endpoint and free its client range (refused while it has clients)")
    .addOption(vpcOption("", true))
    .action(async (o, cmd: Command) => {
      const res = await client(cmd, VpnService).deleteVpnEndpoint({ vpc: o.vpc });
      emit(cmd, DeleteVpnEndpointResponseSchema, res, () =>
        res.deleted ? `deleted the VPN endpoint of VPC ${o.vpc}` : `VPC ${o.vpc} has no VPN endpoint; nothing to delete`,
      );
    });

  const cl = vpn.command("client").description("VPN clients of a VPC");

  cl.command("add")
    .description("register a client and print its wg-quick configuration (the key pair is made here unless --public-key is given)")
    .addOption(vpcOption("", true))
    .requiredOption("--name <name>", "client name, unique in the VPC")
    .option("--public-key <key>", "the client's WireGuard public key; the private key then stays with you", "")
    .addOption(listOption("--security-group <ref>", "security group whose egress rules decide what the client reaches (repeatable)"))
    .option("--wait-ms <ms>", "how long to wait for the endpoint's public key", integer(0, 600_000), 15_000)
    .action(async (o, cmd: Command) => {
      const pair = o.publicKey ? undefined : x25519Pair();
      const c = client(cmd, VpnService);
      const res = await c.createVpnClient({ vpc: o.vpc, name: o.name, publicKey: o.publicKey || pair!.publicKey, securityGroups: o.securityGroup });
      let endpoint = res.endpoint!;
      // The endpoint host makes its key on its first pass: wait (bounded) for it.
      for (let i = 0; i < 200 && !endpoint.publicKey && o.waitMs > 0; i++) {
        await new Promise((r) => setTimeout(r, Math.min(100, o.waitMs / 10)));
        endpoint = (await c.getVpnEndpoint({ vpc: res.client!.vpcId })).endpoint!;
        if (i * 100 > o.waitMs) break;
      }
      const text = clientConfig({
        privateKey: pair?.privateKey,
        address: res.client!.address,
        endpointPublicKey: endpoint.publicKey || "<not applied yet: see `microvpc vpn endpoint get`>",
        endpoint: { address: endpoint.publicAddress, port: endpoint.listenPort },
        vpcCidr: res.vpcCidr,
        name: res.client!.name,
        vpcName: o.vpc,
      });
      res.endpoint = endpoint;
      emit(cmd, CreateVpnClientResponseSchema, res, () => text);
    });

  cl.command("list")
    .description("list a VPC's clients, ordered by name")
    .addOption(vpcOption("", true))
    .addOption(limitOption())
    .action(async (o, cmd: Command) => {
      const c = client(cmd, VpnService);
      const { items, next } = await collectSelected(
        o.limit,
        () => true,
        async (pageSize, pageToken) => {
          const r = await c.listVpnClients({ vpc: o.vpc, pageSize, pageToken });
          return { items: r.clients, next: r.nextPageToken };
        },
      );
      emitList(
        cmd,
        ListVpnClientsResponseSchema,
        create(ListVpnClientsResponseSchema, { clients: items, nextPageToken: next }),
        items,
        [
          { head: "ID", get: (x) => x.id },
          { head: "NAME", get: (x) => x.name },
          { head: "ADDRESS", get: (x) => x.address },
          { head: "GROUPS", get: (x) => x.securityGroupIds.join(",") || "-" },
          { head: "CREATED", get: (x) => time(x.createTime) },
          { head: "PUBLIC KEY", get: (x) => x.publicKey, wide: true },
        ],
        (x) => `vpn-client/${x.name}`,
      );
    });

  cl.command("get <client>")
    .description("show a client (id, or name with --vpc)")
    .addOption(vpcOption(""))
    .action(async (ref: string, o, cmd: Command) => {
      const res = await client(cmd, VpnService).getVpnClient({ client: ref, vpc: o.vpc ?? "" });
      emit(cmd, GetVpnClientResponseSchema, res, () => clientDetails(res.client!));
    });

  cl.command("delete <client>")
    .description("delete a client (id, or name with --vpc): its peer goes and its flows are cut")
    .addOption(vpcOption(""))
    .action(async (ref: string, o, cmd: Command) => {
      const res = await client(cmd, VpnService).deleteVpnClient({ client: ref, vpc: o.vpc ?? "" });
      emit(cmd, DeleteVpnClientResponseSchema, res, () => (res.deleted ? `deleted VPN client ${ref}` : `VPN client ${ref} does not exist; nothing to delete`));
    });
}
