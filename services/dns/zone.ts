// The VPC resolver's pure part: given one VPC's zone and a query, what to
// answer — or that the query goes upstream. No sockets, no Redis; the
// resolver (resolver.ts) feeds it decoded packets and sends what it returns.
//
// Scope, on purpose: the resolver is authoritative for "<vpc-name>.internal"
// of the VPC the query arrived from, and for nothing else under ".internal":
// a name of another VPC's zone is NXDOMAIN, never forwarded, so a VPC
// learns nothing about another one (not even that it exists). Everything
// outside ".internal" is forwarded verbatim.
import * as dnsPacket from "dns-packet";

export const RCODE = { NOERROR: 0, FORMERR: 1, SERVFAIL: 2, NXDOMAIN: 3, NOTIMP: 4, REFUSED: 5 } as const;
export const INTERNAL_SUFFIX = "internal";
/** Largest UDP query accepted (queries are small; a bigger one is not a query). */
export const MAX_QUERY_BYTES = 1232;
/** Largest TCP message accepted. */
export const MAX_TCP_MESSAGE_BYTES = 4096;

export interface ZoneRecord {
  address: string;
  ttl: number;
}

/** One VPC's view: its zone and where other names go. */
export interface Zone {
  vpcId: string;
  /** "<vpc-name>.internal" */
  domain: string;
  /** label → record */
  records: Map<string, ZoneRecord>;
  /** "a.b.c.d:port", tried in order; empty: REFUSED for outside names. */
  forwarders: string[];
}

export type Decision = { kind: "answer"; packet: dnsPacket.Packet } | { kind: "forward" };

const RD = dnsPacket.RECURSION_DESIRED;
const RA = dnsPacket.RECURSION_AVAILABLE;
const AA = dnsPacket.AUTHORITATIVE_ANSWER;

/** The bare response header of a query: same id, question echoed, RD copied. */
export function reply(
  q: dnsPacket.DecodedPacket | { id: number; flags?: number; questions?: dnsPacket.Question[] },
  rcode: number,
  extra: Partial<dnsPacket.Packet> = {},
  aa = false,
): dnsPacket.Packet {
  const rd = (q.flags ?? 0) & RD;
  return {
    id: q.id ?? 0,
    type: "response",
    flags: rd | RA | (aa ? AA : 0) | (rcode & 0xf),
    questions: q.questions ?? [],
    answers: [],
    ...extra,
  };
}

/** How long a resolver may cache "no such name" (RFC 2308: the SOA's minimum and TTL); short, so a new VM resolves soon. */
export const NEGATIVE_TTL = 5;

/** The SOA that goes in the authority section of a negative answer for `zone` ("<vpc>.internal", or "internal"). */
export function negativeSoa(zone: string): dnsPacket.Answer {
  return {
    type: "SOA",
    class: "IN",
    name: zone,
    ttl: NEGATIVE_TTL,
    data: { mname: `ns.${zone}`, rname: `hostmaster.${zone}`, serial: 1, refresh: 3600, retry: 600, expire: 86400, minimum: NEGATIVE_TTL },
  };
}

/** The rcode of an encoded response (low 4 bits of the flags). */
export function rcodeOf(buf: Buffer): number {
  return buf.length >= 4 ? buf.readUInt16BE(2) & 0xf : -1;
}

/** Normalizes a query name: lowercase, no trailing dot. */
export function normalizeName(n: string): string {
  return n.toLowerCase().replace(/\.$/, "");
}

/**
 * Decides the answer to one decoded query from a VM of `zone`'s VPC (zone
 * undefined: the VPC is unknown here yet — answer nothing authoritative,
 * SERVFAIL so the client retries).
 */
export function decide(q: dnsPacket.DecodedPacket, zone: Zone | undefined): Decision {
  if (q.type !== "query") return { kind: "answer", packet: reply(q, RCODE.FORMERR) };
  const opcode = ((q.flags ?? 0) >> 11) & 0xf;
  if (opcode !== 0) return { kind: "answer", packet: reply({ ...q, questions: [] }, RCODE.NOTIMP) };
  if (!q.questions || q.questions.length !== 1) return { kind: "answer", packet: reply({ ...q, questions: [] }, RCODE.FORMERR) };
  if (!zone) return { kind: "answer", packet: reply(q, RCODE.SERVFAIL) };
  const question = q.questions[0];
  const name = normalizeName(question.name);
  const inInternal = name === INTERNAL_SUFFIX || name.endsWith(`.${INTERNAL_SUFFIX}`);
  if (!inInternal) {
    if (zone.forwarders.length === 0) return { kind: "answer", packet: reply(q, RCODE.REFUSED) };
    return { kind: "forward" };
  }
  const domain = zone.domain;
  // Negative answers carry the zone's SOA, so resolvers in the guest cache them briefly (RFC 2308).
  const own = { authorities: [negativeSoa(domain)] };
  if (name === domain) return { kind: "answer", packet: reply(q, RCODE.NOERROR, own, true) };
  if (!name.endsWith(`.${domain}`)) return { kind: "answer", packet: reply(q, RCODE.NXDOMAIN, { authorities: [negativeSoa(INTERNAL_SUFFIX)] }, true) };
  const label = name.slice(0, -(domain.length + 1));
  const rec = label.includes(".") ? undefined : zone.records.get(label);
  if (!rec) return { kind: "answer", packet: reply(q, RCODE.NXDOMAIN, own, true) };
  const cls = question.class ?? "IN";
  const qtype: string = question.type;
  if ((qtype === "A" || qtype === "ANY") && (cls === "IN" || cls === "ANY")) {
    return {
      kind: "answer",
      packet: reply(q, RCODE.NOERROR, { answers: [{ type: "A", class: "IN", name: question.name.replace(/\.$/, ""), ttl: rec.ttl, data: rec.address }] }, true),
    };
  }
  // The name exists, only not with this type (AAAA, MX, …): NOERROR, no data.
  return { kind: "answer", packet: reply(q, RCODE.NOERROR, own, true) };
}

/** A FORMERR for bytes that did not decode, if at least the id can be read. */
export function formErr(buf: Buffer): Buffer | null {
  if (buf.length < 12) return null;
  if (buf.readUInt16BE(2) & 0x8000) return null; // a response: never answer one
  return dnsPacket.encode(reply({ id: buf.readUInt16BE(0), flags: buf.readUInt16BE(2) }, RCODE.FORMERR));
}

/** Parses "a.b.c.d" or "a.b.c.d:port" (port default 53). Throws on anything else. */
export function parseForwarder(s: string): { host: string; port: number } {
  const m = /^(\d{1,3}(?:\.\d{1,3}){3})(?::(\d{1,5}))?$/.exec(s);
  if (!m) throw new Error(`${JSON.stringify(s)} is not a.b.c.d or a.b.c.d:port`);
  const octets = m[1].split(".").map(Number);
  if (octets.some((o, i) => o > 255 || String(o) !== m[1].split(".")[i])) throw new Error(`${JSON.stringify(s)} is not a dotted-quad address`);
  const port = m[2] === undefined ? 53 : Number(m[2]);
  if (port < 1 || port > 65535 || (m[2] !== undefined && String(port) !== m[2])) throw new Error(`${JSON.stringify(s)} has no valid port (1–65535)`);
  return { host: m[1], port };
}
