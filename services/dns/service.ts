// DnsService: VPC-internal DNS records and resolver configuration. Validates
// every request, then makes one atomic change through DnsStore (served by the
// ipam daemon, next to the catalog it checks against).
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import type { ServiceImpl } from "@connectrpc/connect";
import { InvalidArgumentError, NotFoundError } from "../common/errors.js";
import { decodeNameToken, encodePageToken } from "../common/paging.js";
import * as V from "../common/validate.js";
import { DnsConfigSchema, DnsRecordSchema, DnsRecordType, DnsService, type DnsConfig, type DnsRecord } from "../../gen/microvpc/v1/dns_pb.js";
import type { IpamReader, VpcRec } from "../ipam/schema.js";
import { DnsStore, type RecordRec } from "./store.js";

// The checks of stored and requested fields live in schema.ts, shared with the readers.
export { forwarders, label, MAX_FORWARDERS, MAX_TTL, MIN_TTL, ttl } from "./schema.js";
import { forwarders, label, LABEL_RE, ttl } from "./schema.js";

/** How a forwarder is shown: the port only if it is not 53. */
function showForwarder(f: string): string {
  return f.endsWith(":53") ? f.slice(0, -3) : f;
}

export class DnsApi {
  readonly store: DnsStore;
  /** management: CIDRs a VPC's forwarders may not name (--management-cidrs of the ipam daemon). */
  constructor(
    readonly ipam: IpamReader,
    readonly management: readonly string[] = [],
  ) {
    this.store = new DnsStore(ipam.redis);
  }

  async vpcByRef(field: string, ref: string): Promise<VpcRec> {
    const r = V.ref(field, ref, "vpc");
    const id = await this.ipam.resolveVpc(r);
    const vpc = id ? await this.ipam.getVpc(id) : null;
    if (!vpc) throw new NotFoundError("vpc", ref, "list VPCs with `microvpc vpc list`");
    return vpc;
  }

  /** An IPv4 address inside the VPC's CIDR, as an integer. */
  private inVpc(field: string, vpc: VpcRec, address: string): number {
    const n = V.ipv4(field, address);
    const size = 2 ** (32 - vpc.prefix);
    if (n < vpc.base || n >= vpc.base + size) throw new InvalidArgumentError(field, `${address} is outside VPC ${vpc.name} (${vpc.cidr})`);
    return n;
  }

  recordMsg(vpc: VpcRec, r: RecordRec): DnsRecord {
    return create(DnsRecordSchema, {
      vpcId: vpc.id,
      name: r.name,
      fqdn: `${r.name}.${vpc.name}.internal`,
      type: DnsRecordType.A,
      address: r.address,
      ttlSeconds: r.ttl,
      owner: r.owner,
      updateTime: timestampFromMs(r.updatedMs),
    });
  }

  async configMsg(vpc: VpcRec | null): Promise<DnsConfig> {
    if (!vpc) {
      const d = await this.store.getConfig("");
      return create(DnsConfigSchema, {
        forwarders: { addresses: (d.forwarders ?? []).map(showForwarder) },
        recordTtlSeconds: d.ttl ?? 60,
        updateTime: d.updatedMs ? timestampFromMs(d.updatedMs) : undefined,
      });
    }
    const e = await this.store.effective(vpc.id, vpc.base);
    return create(DnsConfigSchema, {
      vpcId: vpc.id,
      domain: `${vpc.name}.internal`,
      resolverAddress: e.resolver,
      forwarders: { addresses: e.forwarders.map(showForwarder) },
      forwardersInherited: e.inherited,
      recordTtlSeconds: e.ttl,
      updateTime: e.updatedMs ? timestampFromMs(e.updatedMs) : undefined,
    });
  }

  readonly impl: ServiceImpl<typeof DnsService> = {
    setDnsRecord: async (req) => {
      const name = label("name", req.name);
      const owner = V.token("owner", req.owner);
      const recTtl = req.ttlSeconds === undefined ? undefined : ttl("ttl_seconds", req.ttlSeconds);
      V.ipv4("address", req.address);
      const vpc = await this.vpcByRef("vpc", req.vpc);
      this.inVpc("address", vpc, req.address);
      const t = recTtl ?? (await this.store.effective(vpc.id, vpc.base)).ttl;
      const { record, created } = await this.store.setRecord({ vpcId: vpc.id, name, address: req.address, ttl: t, owner });
      return { record: this.recordMsg(vpc, record), created };
    },

    deleteDnsRecord: async (req) => {
      const name = req.name === "" ? "" : label("name", req.name);
      const owner = V.token("owner", req.owner, { optional: true });
      if (name === "" && owner === "") throw new InvalidArgumentError("name", "is required unless owner is given (to delete every record of that owner)");
      const vpc = await this.vpcByRef("vpc", req.vpc);
      return { deletedNames: await this.store.deleteRecords(vpc.id, name, owner) };
    },

    listDnsRecords: async (req) => {
      const size = V.pageSize("page_size", req.pageSize);
      const owner = V.token("owner", req.owner, { optional: true });
      const after = decodeNameToken(req.pageToken);
      if (after !== null && !LABEL_RE.test(after)) throw new InvalidArgumentError("page_token", "is not a token this server issued");
      const vpc = await this.vpcByRef("vpc", req.vpc);
      const out: RecordRec[] = [];
      let cursor = after ?? "";
      // Filtering by owner scans pages until one is full.
      while (out.length <= size) {
        const page = await this.store.listRecords(vpc.id, cursor, 1000);
        if (page.length === 0) break;
        for (const r of page) if (owner === "" || r.owner === owner) out.push(r);
        cursor = page[page.length - 1].name;
        if (page.length < 1000) break;
      }
      const page = out.slice(0, size);
      return {
        records: page.map((r) => this.recordMsg(vpc, r)),
        nextPageToken: out.length > size ? encodePageToken(page[page.length - 1].name) : "",
      };
    },

    getDnsConfig: async (req) => ({ config: await this.configMsg(req.vpc === "" ? null : await this.vpcByRef("vpc", req.vpc)) }),

    updateDnsConfig: async (req) => {
      const forVpc = req.vpc !== "";
      if (req.inheritForwarders && req.forwarders) throw new InvalidArgumentError("inherit_forwarders", "must not be combined with forwarders");
      if (!forVpc && req.inheritForwarders) throw new InvalidArgumentError("inherit_forwarders", "applies to a VPC only; the defaults inherit from nothing");
      if (!forVpc && req.resolverAddress !== undefined)
        throw new InvalidArgumentError("resolver_address", "applies to a VPC only (each VPC has its own address)");
      const fwd = req.forwarders
        ? forwarders("forwarders.addresses", req.forwarders.addresses, forVpc, this.management)
        : req.inheritForwarders
          ? ("inherit" as const)
          : undefined;
      const recTtl = req.recordTtlSeconds === undefined ? undefined : ttl("record_ttl_seconds", req.recordTtlSeconds);
      if (req.resolverAddress !== undefined) V.ipv4("resolver_address", req.resolverAddress);
      const vpc = forVpc ? await this.vpcByRef("vpc", req.vpc) : null;
      let resolver: { text: string; int: number } | undefined;
      if (vpc && req.resolverAddress !== undefined) {
        const n = this.inVpc("resolver_address", vpc, req.resolverAddress);
        const size = 2 ** (32 - vpc.prefix);
        if (n === vpc.base || n === vpc.base + size - 1) {
          throw new InvalidArgumentError("resolver_address", `${req.resolverAddress} is the network or broadcast address of ${vpc.cidr}; pick a host address`);
        }
        resolver = { text: req.resolverAddress, int: n };
      }
      await this.store.updateConfig(vpc?.id ?? "", { resolver, forwarders: fwd, ttl: recTtl });
      return { config: await this.configMsg(vpc) };
    },
  };
}
