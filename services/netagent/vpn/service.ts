// VpnService: validates, records in Redis, and (DeleteVpnClient,
// DeleteVpnEndpoint) waits until the endpoint host has applied the change.
// Any netagent serves it; the endpoint host's sync (sync.ts) turns the
// records into a WireGuard interface, peers and an nft table.
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { ServiceImpl } from "@connectrpc/connect";
import { AlreadyExistsError, FailedPreconditionError, InvalidArgumentError, NotFoundError, ResourceExhaustedError } from "../../common/errors.js";
import { newId } from "../../common/ids.js";
import { decodeNameToken, encodePageToken } from "../../common/paging.js";
import * as V from "../../common/validate.js";
import { VpnClientSchema, VpnEndpointSchema, VpnService, type VpnClient, type VpnEndpoint } from "../../../gen/microvpc/v1/vpn_pb.js";
import type { IpamReader, VpcRec } from "../../ipam/schema.js";
import { allocate, checkEndpoint, clientRange, MAX_CLIENT_GROUPS, publicKey, type VpnClientRec, type VpnEndpointRec } from "./plan.js";
import type { VpnStore } from "./store.js";

export interface VpnServiceOptions {
  /** How long DeleteVpnClient and DeleteVpnEndpoint wait for the endpoint host to apply (ms). */
  applyWaitMs?: number;
  /** Asks this host's sync to run now (and resolves when it ran). */
  kick?: () => Promise<void>;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export class Vpn {
  constructor(
    private readonly store: VpnStore,
    private readonly ipam: IpamReader,
    private readonly opts: VpnServiceOptions = {},
  ) {}

  private endpointMsg(e: VpnEndpointRec): VpnEndpoint {
    return create(VpnEndpointSchema, {
      vpcId: e.vpcId,
      hostId: e.hostId,
      publicAddress: e.publicAddress,
      listenPort: e.listenPort,
      clientCidr: e.clientCidr,
      publicKey: e.publicKey,
      updateTime: timestampFromMs(e.updatedMs),
    });
  }

  private clientMsg(c: VpnClientRec): VpnClient {
    return create(VpnClientSchema, {
      id: c.id,
      name: c.name,
      vpcId: c.vpcId,
      publicKey: c.publicKey,
      address: c.address,
      securityGroupIds: c.groupIds,
      createTime: timestampFromMs(c.createdMs),
    });
  }

  private async endpointOf(vpc: VpcRec): Promise<VpnEndpointRec> {
    const e = await this.store.endpoint(vpc.id, vpc.cidr);
    if (!e) throw new FailedPreconditionError(`VPC ${vpc.name} has no VPN endpoint; set one with \`microvpc vpn endpoint set --vpc ${vpc.name} …\``);
    return e;
  }

  /** A client by id, or by name with its VPC. */
  private async client(req: { client: string; vpc: string }): Promise<{ vpc: VpcRec; ep: VpnEndpointRec; client: VpnClientRec | null }> {
    const r = V.ref("client", req.client, "vpnc");
    let vpc: VpcRec;
    let name: string;
    if (r.id) {
      const at = await this.store.locate(r.id);
      if (!at) throw new NotFoundError("VPN client", req.client, "list them with `microvpc vpn client list --vpc VPC`");
      vpc = await this.ipam.vpcByRef("vpc", at.vpcId);
      if (req.vpc && (await this.ipam.vpcByRef("vpc", req.vpc)).id !== vpc.id)
        throw new InvalidArgumentError("vpc", `client ${r.id} belongs to VPC ${vpc.name}`);
      name = at.name;
    } else {
      if (!req.vpc) throw new InvalidArgumentError("vpc", "is required when the client is named rather than given by id");
      vpc = await this.ipam.vpcByRef("vpc", req.vpc);
      name = r.name!;
    }
    const ep = await this.endpointOf(vpc);
    const client = await this.store.clientByName(vpc.id, name, V.cidr("client_cidr", ep.clientCidr, { min: 0, max: 32 }));
    return { vpc, ep, client: client && (!r.id || client.id === r.id) ? client : null };
  }

  /**
   * Waits (bounded) until the endpoint host's applied gen for the VPC passes
   * `done`: at least a change's gen, or -1 (none: it tore the endpoint
   * down); false if it did not in time.
   */
  private async applied(ep: VpnEndpointRec, done: (appliedGen: number) => boolean): Promise<boolean> {
    void this.opts.kick?.();
    const until = Date.now() + (this.opts.applyWaitMs ?? 5000);
    for (let i = 0; i < 1000 && Date.now() < until; i++) {
      if (done(await this.store.applied(ep.hostId, ep.vpcId))) return true;
      await sleep(25);
    }
    return false;
  }

  readonly impl: ServiceImpl<typeof VpnService> = {
    setVpnEndpoint: async (req) => {
      const vpc = await this.ipam.vpcByRef("vpc", req.vpc);
      const subnets = await this.ipam.listSubnets(vpc.id, "", 10_000);
      const cidr = clientRange("client_cidr", req.clientCidr, vpc.cidr, subnets);
      const spec = checkEndpoint(
        { vpcId: vpc.id, hostId: req.hostId, publicAddress: req.publicAddress, listenPort: req.listenPort, clientCidr: cidr.text },
        vpc.cidr,
      );
      const r = await this.store.setEndpoint({ ...spec, updatedMs: Date.now() }, cidr);
      if ("noVpc" in r) throw new NotFoundError("vpc", req.vpc, "it was deleted meanwhile");
      if ("overlapsSubnet" in r) {
        // A subnet created since the check above: the script refused, nothing was written.
        const s = await this.ipam.getSubnet(r.overlapsSubnet);
        throw new InvalidArgumentError(
          "client_cidr",
          `${cidr.text} overlaps subnet ${s?.name ?? r.overlapsSubnet} (${s?.cidr ?? "?"}); pick a range of the VPC no subnet uses`,
        );
      }
      if ("overlapsReservation" in r)
        throw new FailedPreconditionError(`client_cidr: ${cidr.text} overlaps the VPC's reserved range ${V.show(r.overlapsReservation)}`);
      // Checked in the script, beside the clients' address index: a CreateVpnClient racing this one lands before (and is named here) or is refused.
      if ("clientsOutside" in r)
        throw new FailedPreconditionError(`clients ${r.clientsOutside} hold addresses outside ${cidr.text}; delete them first or keep a range that holds them`);
      void this.opts.kick?.();
      return { endpoint: this.endpointMsg((await this.store.endpoint(vpc.id, vpc.cidr))!) };
    },

    getVpnEndpoint: async (req) => {
      const vpc = await this.ipam.vpcByRef("vpc", req.vpc);
      const e = await this.store.endpoint(vpc.id, vpc.cidr);
      if (!e) throw new NotFoundError("VPN endpoint of VPC", vpc.name, `set one with \`microvpc vpn endpoint set --vpc ${vpc.name} …\``);
      return { endpoint: this.endpointMsg(e) };
    },

    deleteVpnEndpoint: async (req) => {
      const vpc = await this.ipam.vpcByRef("vpc", req.vpc);
      const ep = await this.store.endpoint(vpc.id, vpc.cidr);
      const r = await this.store.deleteEndpoint(vpc.id);
      if (r === null) return { deleted: false };
      if ("clients" in r) {
        const n = r.clients;
        throw new FailedPreconditionError(
          `the VPN endpoint of VPC ${vpc.name} still has ${n} client${n === 1 ? "" : "s"}; list them with \`microvpc vpn client list --vpc ${vpc.name}\` and delete each with \`microvpc vpn client delete NAME --vpc ${vpc.name}\` first`,
        );
      }
      // Bounded: the endpoint host forgets its applied gen when it has torn the interface down (sync.ts teardown).
      if (ep) await this.applied(ep, (g) => g < 0);
      return { deleted: true };
    },

    createVpnClient: async (req) => {
      const vpc = await this.ipam.vpcByRef("vpc", req.vpc);
      const name = V.name("name", req.name);
      const key = publicKey("public_key", req.publicKey);
      if (req.securityGroups.length > MAX_CLIENT_GROUPS) {
        throw new InvalidArgumentError("security_groups", `has ${req.securityGroups.length} groups; a client can be in at most ${MAX_CLIENT_GROUPS}`);
      }
      const groupIds: string[] = [];
      for (const [i, ref] of req.securityGroups.entries()) {
        const f = `security_groups[${i}]`;
        const r = V.ref(f, ref, "sg");
        const id = r.id ?? (await this.store.groupIdByName(vpc.id, r.name!));
        const g = id && /^sg-[0-9a-f]{12}$/.test(id) ? await this.store.group(vpc.id, id) : null;
        if (!g) throw new NotFoundError("security group", ref, `${f}: VPC ${vpc.name} has no such group`);
        if (g.vpcId !== vpc.id)
          throw new InvalidArgumentError(
            f,
            `security group ${g.name} (${g.id}) belongs to VPC ${g.vpcId}, not ${vpc.name}; a client can only be in groups of its VPC`,
          );
        if (!groupIds.includes(g.id)) groupIds.push(g.id);
      }
      const ep = await this.endpointOf(vpc);
      const range = V.cidr("client_cidr", ep.clientCidr, { min: 0, max: 32 });
      for (let attempt = 0; attempt < 8; attempt++) {
        const address = allocate(range, await this.store.usedAddresses(vpc.id));
        if (!address) throw new ResourceExhaustedError(`the VPN range ${range.text} of VPC ${vpc.name} is full; delete clients or set a larger range`);
        const rec: VpnClientRec = { id: newId("vpnc"), name, vpcId: vpc.id, publicKey: key, address, groupIds, createdMs: Date.now() };
        const r = await this.store.create(rec, ep.clientCidr);
        if ("gen" in r) {
          void this.opts.kick?.();
          return { client: this.clientMsg(rec), endpoint: this.endpointMsg(ep), vpcCidr: vpc.cidr };
        }
        if (r.taken === "endpoint")
          throw new FailedPreconditionError(
            `VPC ${vpc.name}'s VPN endpoint was deleted or given another client range meanwhile; retry, or set one with \`microvpc vpn endpoint set --vpc ${vpc.name} …\``,
          );
        if (r.taken === "name") throw new AlreadyExistsError(`VPC ${vpc.name} already has a VPN client named ${name}`);
        if (r.taken === "key") throw new AlreadyExistsError(`public_key: another VPN client of VPC ${vpc.name} has this key; make a new key pair per client`);
      }
      throw new ResourceExhaustedError("could not claim a client address after 8 tries (concurrent creations); retry");
    },

    getVpnClient: async (req) => {
      const { client } = await this.client(req);
      if (!client) throw new NotFoundError("VPN client", req.client, "list them with `microvpc vpn client list --vpc VPC`");
      return { client: this.clientMsg(client) };
    },

    listVpnClients: async (req) => {
      const size = V.pageSize("page_size", req.pageSize);
      const after = decodeNameToken(req.pageToken);
      const vpc = await this.ipam.vpcByRef("vpc", req.vpc);
      const ep = await this.store.endpoint(vpc.id, vpc.cidr);
      if (!ep) return { clients: [], nextPageToken: "" };
      const all = (await this.store.clients(vpc.id, V.cidr("client_cidr", ep.clientCidr, { min: 0, max: 32 }))).filter((c) => after === null || c.name > after);
      const page = all.slice(0, size);
      return { clients: page.map((c) => this.clientMsg(c)), nextPageToken: all.length > size ? encodePageToken(page[page.length - 1].name) : "" };
    },

    deleteVpnClient: async (req) => {
      let found;
      try {
        found = await this.client(req);
      } catch (err) {
        if (err instanceof NotFoundError || err instanceof FailedPreconditionError) return { deleted: false };
        throw err;
      }
      if (!found.client) return { deleted: false };
      const gen = await this.store.delete(found.client);
      if (gen === null) return { deleted: false };
      await this.applied(found.ep, (g) => g >= gen);
      return { deleted: true };
    },
  };
}
