// The VPN's pure part: validation of endpoints and clients (the API and the
// record parsers share it), address allocation from the client range, the
// wg-quick configuration a client gets, and the nft table that confines the
// clients of one VPC endpoint. Nothing here reads Redis or runs a command.
//
// What a client may reach: the egress rules of its security groups (CIDR
// rules, and group rules through the peer group's member addresses), only
// inside the VPC CIDR, never 169.254.0.0/16 (metadata, resolver) nor the
// outside; no group, nothing. Nothing may open a connection toward a client.
// The VMs' own ingress rules still apply (the firewall sees the client's
// address as a source inside the VPC CIDR).
import { InvalidArgumentError } from "../../common/errors.js";
import { NftTransaction, type Table } from "../../common/nft/tx.js";
import * as V from "../../common/validate.js";

export interface VpnEndpointRec {
  vpcId: string;
  hostId: string;
  publicAddress: string;
  listenPort: number;
  clientCidr: string;
  /** "" until the endpoint host applied it. */
  publicKey: string;
  updatedMs: number;
}

export interface VpnClientRec {
  id: string;
  name: string;
  vpcId: string;
  publicKey: string;
  address: string;
  groupIds: string[];
  createdMs: number;
}

/** An egress rule of a client's group, reduced to what the VPN table needs. */
export interface EgressRule {
  proto: "tcp" | "udp" | "icmp" | "all";
  portFrom: number;
  portTo: number;
  icmpType?: number;
  icmpCode?: number;
  /** Canonical CIDRs or addresses this rule allows toward. */
  peers: string[];
}

export const VPN_TABLE = "mvpc_vpn";
export const CLIENT_PREFIX = { min: 20, max: 29 };
export const MAX_CLIENT_GROUPS = 16;
/** A Curve25519 key in base64: 32 bytes → 43 characters and "=", the last character carrying 4 bits. */
const WG_KEY_RE = /^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$/;
const DNS_RE = /^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$/;

export function publicKey(field: string, v: string): string {
  if (v === "") throw new InvalidArgumentError(field, "is required (a WireGuard public key, `wg pubkey < private.key`)");
  if (!WG_KEY_RE.test(v)) throw new InvalidArgumentError(field, `${V.show(v)} is not a WireGuard public key (44 characters of base64 ending in "=")`);
  return v;
}

export function publicAddress(field: string, v: string): string {
  if (v === "") throw new InvalidArgumentError(field, "is required (the address clients connect to: an IPv4 address or a DNS name)");
  if (/^[0-9.]+$/.test(v)) {
    V.ipv4(field, v);
    return v;
  }
  if (!DNS_RE.test(v)) throw new InvalidArgumentError(field, `${V.show(v)} is neither an IPv4 address nor a DNS name`);
  return v;
}

/** The client range: inside the VPC CIDR, overlapping no subnet of it. */
export function clientRange(field: string, v: string, vpcCidr: string, subnets: { name: string; cidr: string }[] = []): V.Cidr {
  const c = V.cidr(field, v, CLIENT_PREFIX);
  const vpc = V.cidr("vpc cidr", vpcCidr, { min: 8, max: 30 });
  if (!V.contains(vpc, c)) throw new InvalidArgumentError(field, `${c.text} is outside the VPC CIDR ${vpc.text}; pick a range inside it that no subnet uses`);
  for (const s of subnets) {
    if (V.overlaps(c, V.cidr("subnet cidr", s.cidr, { min: 8, max: 30 }))) {
      throw new InvalidArgumentError(field, `${c.text} overlaps subnet ${s.name} (${s.cidr}); pick a range of the VPC no subnet uses`);
    }
  }
  return c;
}

export function checkEndpoint(e: Omit<VpnEndpointRec, "publicKey" | "updatedMs">, vpcCidr: string): Omit<VpnEndpointRec, "publicKey" | "updatedMs"> {
  V.id("vpc", e.vpcId, "vpc");
  V.hostId("host_id", e.hostId);
  publicAddress("public_address", e.publicAddress);
  V.port("listen_port", e.listenPort);
  clientRange("client_cidr", e.clientCidr, vpcCidr);
  return e;
}

export function checkClient(c: VpnClientRec, vpcId: string, range: V.Cidr): VpnClientRec {
  V.id("id", c.id, "vpnc");
  V.name("name", c.name);
  if (c.vpcId !== vpcId) throw new InvalidArgumentError("vpc", `${V.show(c.vpcId)} is not ${vpcId}`);
  publicKey("public_key", c.publicKey);
  const a = V.ipv4("address", c.address);
  if (a <= range.base || a >= range.base + range.size - 1) throw new InvalidArgumentError("address", `${c.address} is not a client address of ${range.text}`);
  if (c.groupIds.length > MAX_CLIENT_GROUPS) throw new InvalidArgumentError("security_groups", `has ${c.groupIds.length}; at most ${MAX_CLIENT_GROUPS}`);
  return c;
}

/** The first free client address of the range (not the network nor the broadcast address), or null when it is full. */
export function allocate(range: V.Cidr, used: ReadonlySet<string>): string | null {
  for (let a = range.base + 1; a < range.base + range.size - 1; a++) {
    const ip = V.intToIp(a);
    if (!used.has(ip)) return ip;
  }
  return null;
}

/** The wg-quick file a client uses; without a private key, a placeholder the operator fills in. */
export function clientConfig(o: {
  privateKey?: string;
  address: string;
  endpointPublicKey: string;
  endpoint: { address: string; port: number };
  vpcCidr: string;
  name: string;
  vpcName: string;
}): string {
  return [
    `# microvpc VPN client ${o.name} of VPC ${o.vpcName}`,
    "[Interface]",
    `PrivateKey = ${o.privateKey ?? "<the private key of the public key you gave>"}`,
    `Address = ${o.address}/32`,
    "",
    "[Peer]",
    `PublicKey = ${o.endpointPublicKey}`,
    `AllowedIPs = ${o.vpcCidr}`,
    `Endpoint = ${o.endpoint.address}:${o.endpoint.port}`,
    "PersistentKeepalive = 25",
    "",
  ].join("\n");
}

/** The rules an egress rule becomes in a client's chain (nothing when it has no peer left). */
export function ruleLines(r: EgressRule): string[] {
  const peers = [...new Set(r.peers)].sort();
  if (peers.length === 0) return [];
  const m = [`ip daddr { ${peers.join(", ")} }`];
  if (r.proto === "tcp" || r.proto === "udp") {
    m.push(`meta l4proto ${r.proto}`);
    if (!(r.portFrom === 0 && r.portTo === 0)) m.push(`th dport ${r.portFrom === r.portTo ? r.portFrom : `${r.portFrom}-${r.portTo}`}`);
  } else if (r.proto === "icmp") {
    m.push("meta l4proto icmp");
    if (r.icmpType !== undefined) m.push(`icmp type ${r.icmpType}`);
    if (r.icmpCode !== undefined) m.push(`icmp code ${r.icmpCode}`);
  }
  return [`${m.join(" ")} accept`];
}

/**
 * The VPN table of one VPC namespace, replaced whole in one transaction: a
 * map from client address to the client's chain, its group rules, then
 * drop. It runs before the firewall's forward chain (priority filter - 5),
 * so the VMs' own groups still decide after it accepts.
 */
export function vpnTx(ifname: string, vpcCidr: string, clients: { id: string; address: string; rules: EgressRule[] }[]): NftTransaction {
  V.ifname("ifname", ifname);
  V.cidr("vpc cidr", vpcCidr, { min: 8, max: 30 });
  const sorted = [...clients].sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
  const chains = sorted.map((c) => ({
    kind: "chain" as const,
    name: `c_${V.id("client", c.id, "vpnc").slice(-12)}`,
    rules: [...c.rules.flatMap(ruleLines), `counter drop comment "not allowed by the client's groups"`],
  }));
  const elements = sorted.map((c) => `${V.intToIp(V.ipv4("address", c.address))} : jump c_${c.id.slice(-12)}`);
  const i = `iifname "${ifname}"`;
  const o = `oifname "${ifname}"`;
  const table: Table = {
    kind: "table",
    family: "inet",
    name: VPN_TABLE,
    content: [
      { kind: "map", name: "client_out", type: "ipv4_addr : verdict", ...(elements.length ? { elements } : {}) },
      ...chains,
      {
        kind: "chain",
        name: "forward",
        base: { type: "filter", hook: "forward", priority: "filter - 5", policy: "accept" },
        rules: [
          `${i} ip daddr != ${vpcCidr} counter drop comment "a client reaches its VPC only"`,
          `${i} ip daddr 169.254.0.0/16 counter drop`,
          `${i} ct state established,related accept`,
          `${i} ip saddr vmap @client_out`,
          `${i} counter drop comment "no such client"`,
          `${o} ct state established,related accept`,
          `${o} counter drop comment "nothing opens a connection toward a client"`,
        ],
      },
      {
        kind: "chain",
        name: "input",
        base: { type: "filter", hook: "input", priority: "filter - 5", policy: "accept" },
        rules: [`${i} counter drop comment "the VPC namespace itself is no destination"`],
      },
    ],
  };
  const t0 = { kind: "table", family: "inet", name: VPN_TABLE } as const;
  return new NftTransaction().add(t0).delete(t0).add(table);
}

export function deleteTx(): NftTransaction {
  const t0 = { kind: "table", family: "inet", name: VPN_TABLE } as const;
  return new NftTransaction().add(t0).delete(t0);
}
