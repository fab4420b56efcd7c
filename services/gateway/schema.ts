// The gateway's records in Redis: their keys, their types, and the checks a
// record passes before it is written (GatewayStore) and after it is read
// (GatewayStore's readers, GatewaySync, IMDS). A record read back is input:
// whoever can write one key could otherwise put a newline in a floating IP
// address and have `ip -batch` run a line of their choosing on every
// hypervisor. Every field that reaches ip or nft is checked here with the
// validators the API uses (common/validate.ts).
import type { Redis } from "ioredis";
import type { Logger } from "pino";
import { InvalidArgumentError } from "../common/errors.js";
import { reportInvalid } from "../common/invalid-records.js";
import * as V from "../common/validate.js";
import { isCluster } from "../common/redis.js";
import { staleHolds, type HoldsName, type StaleHolds } from "../common/pending.js";

export const OWNER = "gateway";

export const GK = {
  nat: (id: string) => `mvpc:gw:nat:${id}`,
  /** Which host holds a VPC's NAT gateway address (a string: the host id, with a TTL). */
  natLease: (vpcId: string) => `mvpc:gw:lease:nat:${vpcId}`,
  nats: "mvpc:gw:nats",
  vpcNat: "mvpc:gw:vpcnat",
  fip: (id: string) => `mvpc:gw:fip:${id}`,
  fipByAddr: "mvpc:gw:fip:byaddr",
  fips: "mvpc:gw:fips",
  pf: (id: string) => `mvpc:gw:pf:${id}`,
  pfs: "mvpc:gw:pfs",
  hostPorts: (h: string) => `mvpc:gw:host:${h}:ports`,
  transit: (h: string) => `mvpc:gw:host:${h}:transit`,
  /** Freed transit indexes of a host, lowest reused first (zset, score = index). */
  transitFree: (h: string) => `mvpc:gw:host:${h}:transitfree`,
  tokens: "mvpc:tokens",
  events: "mvpc:events",
};

/**
 * Where the gateway's records live: GW_KEYS.single or GW_KEYS.cluster, by
 * the client (gwKeys). A single Redis keeps the names of GK. On a Redis
 * Cluster every script's keys share a slot:
 * - NAT gateways, floating IPs, port forwards, their indexes, the floating
 *   pool's address index and the client tokens of their creates under
 *   `{gw}` (`mvpc:{gw}:…`): a NAT gateway's address comes out of the pool
 *   that floating IPs allocate from, in one step, and an outside port is
 *   unique per hypervisor across the fleet's port forwards;
 * - a VPC's NAT lease under the VPC's tag (`mvpc:{V}:gw:natlease`), with the
 *   VPC's change stream, so that taking it and announcing it stay one step;
 * - a VPC's NAT gateway holds under the VPC's tag (`mvpc:{V}:gw:nat-holds`,
 *   natHolds), beside IPAM's subnet records, so that a CreateNatGateway and
 *   a DeleteSubnet of its subnet each see the other (GatewayStore.createNatInSubnet);
 * - a host's transit indexes under the host's tag (`mvpc:{host:H}:gw:…`).
 * The {gw} scripts append no event there (the VPC's stream is another
 * slot): the store appends it after the script (common/events.ts emit).
 */
export interface GatewayKeys {
  cluster: boolean;
  nat(id: string): string;
  natLease(vpcId: string): string;
  /**
   * On a Redis Cluster only (a single Redis's DELETE_SUBNET reads the NAT
   * index in its own script): a VPC's NAT gateway holds, a hash NAT id →
   * JSON {subnet, ms}, in the VPC's slot. CreateNatGateway writes its hold
   * (HOLD_NAT: only while the subnet's record stands) before its record in
   * {gw}, DeleteNatGateway removes it after the record, and DeleteSubnet
   * refuses while a hold names the subnet, but for holds without a record
   * that are PENDING_MS old by the server's clock (common/pending.ts), which
   * it sweeps: what a create that stopped between its steps left.
   */
  natHolds?(vpcId: string): string;
  nats: string;
  vpcNat: string;
  fip(id: string): string;
  fipByAddr: string;
  fips: string;
  pf(id: string): string;
  pfs: string;
  hostPorts(h: string): string;
  transit(h: string): string;
  transitFree(h: string): string;
  tokens: string;
}

const GW = "mvpc:{gw}:";
export const GW_KEYS: { single: GatewayKeys; cluster: GatewayKeys } = {
  single: { ...GK, cluster: false },
  cluster: {
    cluster: true,
    nat: (id) => `${GW}nat:${id}`,
    natLease: (v) => `mvpc:{${v}}:gw:natlease`,
    natHolds: (v) => `mvpc:{${v}}:gw:nat-holds`,
    nats: `${GW}nats`,
    vpcNat: `${GW}vpcnat`,
    fip: (id) => `${GW}fip:${id}`,
    fipByAddr: `${GW}fip:byaddr`,
    fips: `${GW}fips`,
    pf: (id) => `${GW}pf:${id}`,
    pfs: `${GW}pfs`,
    hostPorts: (h) => `${GW}host:${h}:ports`,
    transit: (h) => `mvpc:{host:${h}}:gw:transit`,
    transitFree: (h) => `mvpc:{host:${h}}:gw:transitfree`,
    tokens: `${GW}tokens`,
  },
};

/**
 * A NAT gateway's hold on subnet `subnetId` as GatewayKeys.natHolds keeps
 * it (the value DELETE_SUBNET reads): made at `ms`, by the Redis server's
 * clock. Every writer builds it here or with LUA_NAT_HOLD.
 */
export function natHold(subnetId: string, ms: number): string {
  return JSON.stringify({ subnet: subnetId, ms });
}

/** Lua: nat_hold(subnet, ms), natHold's value, for a script (HOLD_NAT). */
export const LUA_NAT_HOLD = `
local function nat_hold(subnet, ms)
  return cjson.encode({subnet = subnet, ms = ms})
end
`;

/**
 * A VPC's NAT gateway holds, for a message. Of another Redis type, the key
 * can go: no hold in it reads, DeleteSubnet also finds the VPC's NAT gateway
 * by its record, and a create or a retry of one writes its hold again.
 */
export function natHoldsName(vpcId: string): HoldsName {
  return {
    what: `the NAT gateway holds of VPC ${vpcId}`,
    repair: `remove that key (DEL ${GW_KEYS.cluster.natHolds!(vpcId)}); DeleteSubnet still finds the VPC's NAT gateway by its record`,
  };
}

/** On a cluster, the VPC's NAT gateway holds whose gateway has no record (the candidates DeleteSubnet sweeps if old: common/pending.ts). */
export function staleNatHolds(redis: Redis, vpcId: string): Promise<StaleHolds> {
  const C = GW_KEYS.cluster;
  return staleHolds(redis, C.natHolds!(vpcId), "nat", C.nat, natHoldsName(vpcId));
}

/** The gateway's key layout for this client (a Redis Cluster's or a single Redis's). */
export function gwKeys(redis: Redis): GatewayKeys {
  return isCluster(redis) ? GW_KEYS.cluster : GW_KEYS.single;
}

export interface NatRec {
  id: string;
  vpcId: string;
  subnetId: string;
  sources: string[];
  /**
   * The gateway's public address, from the floating pool (kept out of it in
   * fip:byaddr while the gateway lives). "": a record of an older version,
   * whose private egress leaves as each VM's own host (masquerade).
   */
  address: string;
  description: string;
  createdMs: number;
}

export interface FipRec {
  id: string;
  address: string;
  vpcId: string;
  private: string;
  nicId: string;
  hostId: string;
  description: string;
  allocatedMs: number;
  associatedMs: number;
}

export interface PfRec {
  id: string;
  vpcId: string;
  proto: "tcp" | "udp";
  hostId: string;
  outsidePort: number;
  private: string;
  privatePort: number;
  nicId: string;
  description: string;
  createdMs: number;
}

/** NAT source subnets: at most this many (a VPC has far fewer subnets). */
export const MAX_NAT_SOURCES = 256;
/** Transit /30s per hypervisor (common/names.ts transitAddrs). */
export const MAX_TRANSIT = 16000;

const time = (name: string, v: string | undefined) => V.storedInt(name, v ?? "0", 0);

// ---- checks shared by the writer and the readers ----

export function checkNat(n: NatRec): NatRec {
  V.id("id", n.id, "nat");
  V.id("vpc", n.vpcId, "vpc");
  V.id("subnet", n.subnetId, "subnet");
  V.jsonArray("sources", n.sources, MAX_NAT_SOURCES).forEach((s, i) => V.id(`sources[${i}]`, V.jsonString(`sources[${i}]`, s), "subnet"));
  if (n.address !== "") V.ipv4("address", n.address);
  V.text("description", n.description);
  return n;
}

export function checkFip(f: FipRec): FipRec {
  V.id("id", f.id, "fip");
  V.ipv4("address", f.address);
  V.text("description", f.description);
  // Unassociated: every target field empty; associated: every one set.
  if (f.private === "") {
    for (const [name, v] of [
      ["vpc", f.vpcId],
      ["nic", f.nicId],
      ["host", f.hostId],
    ] as const) {
      if (v !== "") throw new InvalidArgumentError(name, `${V.show(v)} is set while private is empty; an unassociated floating IP has no target`);
    }
  } else {
    V.ipv4("private", f.private);
    V.id("vpc", f.vpcId, "vpc");
    V.id("nic", f.nicId, "nic");
    V.hostId("host", f.hostId);
  }
  return f;
}

export function checkPf(p: PfRec): PfRec {
  V.id("id", p.id, "pf");
  V.id("vpc", p.vpcId, "vpc");
  if (p.proto !== "tcp" && p.proto !== "udp") throw new InvalidArgumentError("proto", `${V.show(String(p.proto))} is not tcp or udp`);
  V.hostId("host", p.hostId);
  V.port("outside", p.outsidePort);
  V.ipv4("private", p.private);
  V.port("private_port", p.privatePort);
  V.id("nic", p.nicId, "nic");
  V.text("description", p.description);
  return p;
}

// ---- readers: a hash as HGETALL returns it → a checked record or the reason ----

function sameId(h: Record<string, string>, id: string | undefined): void {
  if (id !== undefined && h.id !== id) throw new InvalidArgumentError("id", `${V.show(String(h.id))} is not the id of its key (${V.show(id)})`);
}

export function parseNat(h: Record<string, string>, id?: string): V.Parsed<NatRec> {
  return V.attempt(() => {
    sameId(h, id);
    return checkNat({
      id: V.field(h, "id"),
      vpcId: V.field(h, "vpc"),
      subnetId: V.field(h, "subnet"),
      sources: V.storedJson("sources", h.sources ?? "[]") as string[],
      address: h.address ?? "",
      description: h.description ?? "",
      createdMs: time("created", h.created),
    });
  });
}

export function parseFip(h: Record<string, string>, id?: string): V.Parsed<FipRec> {
  return V.attempt(() => {
    sameId(h, id);
    return checkFip({
      id: V.field(h, "id"),
      address: V.field(h, "address"),
      vpcId: V.field(h, "vpc", true),
      private: V.field(h, "private", true),
      nicId: V.field(h, "nic", true),
      hostId: V.field(h, "host", true),
      description: h.description ?? "",
      allocatedMs: time("allocated", h.allocated),
      associatedMs: time("associated", h.associated),
    });
  });
}

export function parsePf(h: Record<string, string>, id?: string): V.Parsed<PfRec> {
  return V.attempt(() => {
    sameId(h, id);
    return checkPf({
      id: V.field(h, "id"),
      vpcId: V.field(h, "vpc"),
      proto: V.field(h, "proto") as "tcp" | "udp",
      hostId: V.field(h, "host"),
      outsidePort: V.storedInt("outside", h.outside, 1, 65535),
      private: V.field(h, "private"),
      privatePort: V.storedInt("private_port", h.private_port, 1, 65535),
      nicId: V.field(h, "nic"),
      description: h.description ?? "",
      createdMs: time("created", h.created),
    });
  });
}

/**
 * The value of a NAT lease key: a host id, checked as the API checks one.
 * Whether that host may hold the address (a registered member of the VPC's
 * overlay) is the reader's second check (GatewayStore.natHolder).
 */
export function parseNatHolder(value: string): V.Parsed<string> {
  return V.attempt(() => V.hostId("holder", value));
}

/** One entry of a host's transit hash: VPC id → index of its /30. */
export function parseTransit(vpcId: string, value: string): V.Parsed<number> {
  return V.attempt(() => {
    V.id("vpc", vpcId, "vpc");
    return V.storedInt("transit", value, 0, MAX_TRANSIT - 1);
  });
}

/** A subnet of a VPC as the gateway routes and masquerades it. */
export function parseGwSubnet(s: { subnetId: string; cidr: string }): V.Parsed<{ subnetId: string; cidr: string }> {
  return V.attempt(() => ({
    subnetId: V.id("subnet", V.jsonString("subnet", s.subnetId), "subnet"),
    cidr: V.cidr("cidr", V.jsonString("cidr", s.cidr), { min: 0, max: 32 }).text,
  }));
}

/** A VPC id, if `v` is one (a bad record's fields are whatever was written). */
export function vpcIdOf(v: string | undefined): string | undefined {
  return v !== undefined && /^vpc-[0-9a-f]{12}$/.test(v) ? v : undefined;
}

/** What other services read of the gateway: this host's transit indexes (the VPC resolver's addresses). */
export class GatewayReader {
  /** The layout of this client's Redis. */
  readonly keys: GatewayKeys;

  /** log: where skipped records are reported (once per key and reason). */
  constructor(
    readonly redis: Redis,
    readonly log?: Pick<Logger, "warn">,
  ) {
    this.keys = gwKeys(redis);
  }

  /** vpcId → transit index of every VPC holding one on this host. */
  async transitMap(hostId: string): Promise<Map<string, number>> {
    const key = this.keys.transit(hostId);
    const h = await this.redis.hgetall(key);
    delete h["#next"];
    const out = new Map<string, number>();
    for (const [k, v] of Object.entries(h)) {
      const t = parseTransit(k, v);
      if (t.ok) out.set(k, t.value);
      else reportInvalid(OWNER, "transit", key, t.reason, this.log, { field: k, vpcId: vpcIdOf(k) });
    }
    return out;
  }
}
