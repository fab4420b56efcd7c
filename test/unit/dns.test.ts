// The resolver's pure parts (answer building, forwarder parsing, request
// validation, the gateway's DNS lines) and the Resolver class over real UDP
// and TCP sockets on loopback: 127.0.0.1 stands for VPC A's transit address
// and 127.0.0.2 for VPC B's, an "upstream" on 127.0.0.3. No root needed.
import assert from "node:assert/strict";
import { createSocket, type Socket } from "node:dgram";
import { connect } from "node:net";
import * as dnsPacket from "dns-packet";
import { afterAll, beforeAll, describe, test } from "vitest";
import { InvalidArgumentError } from "../../services/common/errors.js";
import { zoneWork } from "../../services/dns/host.js";
import { Resolver } from "../../services/dns/resolver.js";
import { forwarders, label, ttl } from "../../services/dns/service.js";
import { decide, formErr, parseForwarder, rcodeOf, type Zone } from "../../services/dns/zone.js";
import { freePort } from "../lib/redis.js";
import { hostNft, resolverAddrLines, transitAddrs, vpcNft, type GwVpc } from "../../services/gateway/plan.js";

const zoneA: Zone = {
  vpcId: "vpc-aaaaaaaaaaaa",
  domain: "prod.internal",
  records: new Map([
    ["web1", { address: "10.0.1.4", ttl: 60 }],
    ["db", { address: "10.0.2.9", ttl: 5 }],
  ]),
  forwarders: ["127.0.0.3:5399"],
};
const zoneB: Zone = { vpcId: "vpc-bbbbbbbbbbbb", domain: "dev.internal", records: new Map([["web1", { address: "10.0.1.7", ttl: 60 }]]), forwarders: [] };

function q(name: string, type = "A", extra: Partial<dnsPacket.Packet> = {}): dnsPacket.DecodedPacket {
  return dnsPacket.decode(
    dnsPacket.encode({ type: "query", id: 4242, flags: dnsPacket.RECURSION_DESIRED, questions: [{ type: type as "A", name, class: "IN" }], ...extra }),
  );
}

type Loose = { rcode?: string; answers?: { data?: unknown; ttl?: number }[]; flag_aa: boolean; id?: number };
const dec = (b: Buffer) => dnsPacket.decode(b) as unknown as Loose;

/** Encodes the decision's packet and decodes it again, as a client would see it. */
function answer(name: string, zone: Zone | undefined, type = "A"): { rcode: string; data: string[]; ttl: number[]; aa: boolean; id: number } | "forward" {
  const d = decide(q(name, type), zone);
  if (d.kind === "forward") return "forward";
  const r = dec(dnsPacket.encode(d.packet));
  return { rcode: r.rcode!, data: (r.answers ?? []).map((a) => String(a.data)), ttl: (r.answers ?? []).map((a) => a.ttl!), aa: r.flag_aa, id: r.id! };
}

describe("answers", () => {
  test("A of a VM name in the VPC's own zone: authoritative, with the record's TTL and the query's id", () => {
    assert.deepEqual(answer("web1.prod.internal", zoneA), { rcode: "NOERROR", data: ["10.0.1.4"], ttl: [60], aa: true, id: 4242 });
    assert.deepEqual(answer("DB.Prod.Internal.", zoneA), { rcode: "NOERROR", data: ["10.0.2.9"], ttl: [5], aa: true, id: 4242 });
  });

  test("names of another VPC, unknown names and deeper names are NXDOMAIN; never forwarded", () => {
    for (const n of ["web1.dev.internal", "nope.prod.internal", "a.web1.prod.internal", "internal", "x.internal"]) {
      const a = answer(n, zoneA);
      assert.ok(a !== "forward" && a.rcode === "NXDOMAIN" && a.data.length === 0, `${n}: ${JSON.stringify(a)}`);
    }
    // The same label in B's zone is B's VM.
    assert.deepEqual(answer("web1.dev.internal", zoneB), { rcode: "NOERROR", data: ["10.0.1.7"], ttl: [60], aa: true, id: 4242 });
  });

  test('negative answers carry an SOA (RFC 2308): the VPC\'s own zone for its names, "internal" for the rest; nothing of another VPC', () => {
    const soa = (name: string, type = "A") => {
      const d = decide(q(name, type), zoneA);
      assert.ok(d.kind === "answer");
      const r = dnsPacket.decode(dnsPacket.encode(d.packet)) as unknown as {
        authorities: { type: string; name: string; ttl: number; data: { minimum: number } }[];
      };
      return r.authorities.map((a) => `${a.type} ${a.name} ttl=${a.ttl} min=${a.data.minimum}`);
    };
    assert.deepEqual(soa("nope.prod.internal"), ["SOA prod.internal ttl=5 min=5"]);
    assert.deepEqual(soa("web1.prod.internal", "AAAA"), ["SOA prod.internal ttl=5 min=5"]);
    assert.deepEqual(soa("web1.dev.internal"), ["SOA internal ttl=5 min=5"], "another VPC's zone is not named");
    assert.deepEqual(soa("web1.prod.internal"), [], "a positive answer has none");
  });

  test("other types of an existing name and the zone apex: NOERROR, no data", () => {
    for (const [n, t] of [
      ["web1.prod.internal", "AAAA"],
      ["web1.prod.internal", "MX"],
      ["prod.internal", "A"],
    ]) {
      const a = answer(n, zoneA, t);
      assert.ok(a !== "forward" && a.rcode === "NOERROR" && a.data.length === 0, `${t} ${n}: ${JSON.stringify(a)}`);
    }
  });

  test("outside .internal: forwarded, or REFUSED with no forwarders; unknown VPC: SERVFAIL", () => {
    assert.equal(answer("example.com", zoneA), "forward");
    assert.equal(answer("internal.example.com", zoneA), "forward");
    assert.equal((answer("example.com", zoneB) as { rcode: string }).rcode, "REFUSED");
    assert.equal((answer("web1.prod.internal", undefined) as { rcode: string }).rcode, "SERVFAIL");
  });

  test("not a standard query: NOTIMP; several questions: FORMERR; garbage with an id: FORMERR; responses: ignored", () => {
    const notify = decide(q("x.prod.internal", "A", { flags: 4 << 11 }), zoneA);
    assert.equal(notify.kind === "answer" && notify.packet.flags! & 0xf, 4);
    const two = dnsPacket.decode(
      dnsPacket.encode({
        type: "query",
        id: 1,
        questions: [
          { type: "A", name: "a" },
          { type: "A", name: "b" },
        ],
      }),
    );
    const d = decide(two, zoneA);
    assert.equal(d.kind === "answer" && d.packet.flags! & 0xf, 1);
    const junk = Buffer.alloc(14, 0xff);
    junk.writeUInt16BE(7, 0);
    junk.writeUInt16BE(0x0100, 2);
    const fe = formErr(junk)!;
    assert.equal(fe.readUInt16BE(0), 7);
    assert.equal(rcodeOf(fe), 1);
    assert.equal(formErr(Buffer.alloc(5)), null, "too short for an id: no answer");
    junk.writeUInt16BE(0x8000, 2);
    assert.equal(formErr(junk), null, "never answer a response");
  });
});

describe("zone updates from events (zoneWork)", () => {
  const rec = (vpc: string, names?: string) => ({ kind: "dns.record", vpc, ...(names === undefined ? {} : { names }) });
  test("dns.record events that name their records read those names again, by VPC", () => {
    const w = zoneWork([rec("vpc-aaaaaaaaaaaa", "web1"), rec("vpc-aaaaaaaaaaaa", "db,web1"), rec("vpc-bbbbbbbbbbbb", "api")]);
    assert.equal(w.full, false);
    assert.deepEqual(
      [...(w.full ? [] : w.names)].map(([v, n]) => [v, [...n].sort()]),
      [
        ["vpc-aaaaaaaaaaaa", ["db", "web1"]],
        ["vpc-bbbbbbbbbbbb", ["api"]],
      ],
    );
  });
  test("anything else reloads whole: other kinds, feed events, no names, and names or VPC ids that are not what a script writes", () => {
    const full = (events: Record<string, string>[]) => zoneWork(events).full;
    assert.equal(full([rec("vpc-aaaaaaaaaaaa", "web1"), { kind: "dns.config", vpc: "vpc-aaaaaaaaaaaa" }]), true);
    assert.equal(full([{ kind: "feed.resync", vpc: "vpc-aaaaaaaaaaaa" }]), true);
    assert.equal(full([{ kind: "vpc.deleted", vpc: "vpc-aaaaaaaaaaaa" }]), true);
    assert.equal(full([rec("vpc-aaaaaaaaaaaa")]), true, "an earlier release's event, without names");
    assert.equal(full([rec("vpc-aaaaaaaaaaaa", "")]), true);
    assert.equal(full([rec("vpc-aaaaaaaaaaaa", "web1,bad name")]), true);
    assert.equal(full([rec("vpc-aaaaaaaaaaaa", "a.b")]), true, "a label, not a dotted name");
    assert.equal(full([rec("mvpc:{x}:dns", "web1")]), true, "the VPC id is an id: it never names a key");
    assert.equal(full([rec("vpc-aaaaaaaaaaaa", Array.from({ length: 65 }, (_, i) => `n${i}`).join(","))]), true, "more names than a script lists");
    assert.equal(full([rec("vpc-aaaaaaaaaaaa", Array.from({ length: 64 }, (_, i) => `n${i}`).join(","))]), false);
  });
});

describe("validation", () => {
  const throwsField = (f: () => unknown, field: RegExp) => assert.throws(f, (e: unknown) => e instanceof InvalidArgumentError && field.test(e.field));

  test("labels, TTLs", () => {
    assert.equal(label("name", "web-1"), "web-1");
    assert.equal(label("name", "1st"), "1st");
    for (const bad of ["", "Web", "-a", "a.b", "a_b", "a".repeat(64), "é"]) throwsField(() => label("name", bad), /^name$/);
    assert.equal(ttl("t", 1), 1);
    assert.equal(ttl("t", 86400), 86400);
    for (const bad of [0, 86401, 1.5]) throwsField(() => ttl("t", bad), /^t$/);
  });

  test("forwarders: a.b.c.d[:port], at most 4, unicast; a VPC's never the hypervisor's own", () => {
    assert.deepEqual(parseForwarder("192.0.2.1"), { host: "192.0.2.1", port: 53 });
    assert.deepEqual(parseForwarder("192.0.2.1:5353"), { host: "192.0.2.1", port: 5353 });
    for (const bad of ["192.0.2", "192.0.2.256", "192.0.2.01", "192.0.2.1:0", "192.0.2.1:65536", "192.0.2.1:053", "dns.example", " 192.0.2.1"]) {
      assert.throws(() => parseForwarder(bad), Error, bad);
    }
    assert.deepEqual(forwarders("f", ["192.0.2.1", "192.0.2.2:5353"], true), ["192.0.2.1:53", "192.0.2.2:5353"]);
    throwsField(() => forwarders("f", ["1.1.1.1", "1.1.1.2", "1.1.1.3", "1.1.1.4", "1.1.1.5"], true), /^f$/);
    throwsField(() => forwarders("f", ["1.1.1.1", "1.1.1.1:53"], true), /^f\[1\]$/);
    for (const bad of ["0.0.0.0", "224.0.0.1", "255.255.255.255"]) throwsField(() => forwarders("f", [bad], false), /^f\[0\]$/);
    for (const own of ["127.0.0.53", "169.254.1.1"]) {
      throwsField(() => forwarders("f", [own], true), /^f\[0\]$/);
      assert.deepEqual(forwarders("f", [own], false), [`${own}:53`], "the defaults may name a host-local resolver");
    }
  });

  test("forwarders: a VPC's never inside the management network (--management-cidrs); the defaults may", () => {
    const mgmt = ["10.20.0.0/16", "192.0.2.7/32"];
    for (const bad of ["10.20.9.9", "10.20.0.1:5353", "192.0.2.7"]) throwsField(() => forwarders("f", ["198.51.100.1", bad], true, mgmt), /^f\[1\]$/);
    assert.deepEqual(forwarders("f", ["10.21.0.1", "192.0.2.8"], true, mgmt), ["10.21.0.1:53", "192.0.2.8:53"]);
    assert.deepEqual(forwarders("f", ["10.20.9.9"], false, mgmt), ["10.20.9.9:53"], "the defaults are the operator's");
  });
});

describe("gateway lines", () => {
  const v: GwVpc = {
    vpcId: "vpc-aaaaaaaaaaaa",
    transit: 3,
    subnets: [],
    nat: false,
    natSources: [],
    fips: [],
    forwards: [],
    hopLimits: new Map(),
    resolver: "10.0.0.2",
  };
  const t = transitAddrs(3);

  test("the VPC namespace DNATs resolver:53 (udp and tcp) to its transit address and lets it out without NAT", () => {
    const text = vpcNft(v, 8775, 53);
    assert.ok(text.includes(`ip daddr 10.0.0.2 udp dport 53 dnat to ${t.host}:53`));
    assert.ok(text.includes(`ip daddr 10.0.0.2 tcp dport 53 dnat to ${t.host}:53`));
    const accept = text.indexOf(`ip daddr ${t.host} meta l4proto { tcp, udp } th dport 53 accept`);
    assert.ok(accept > 0 && accept < text.indexOf("private subnet without NAT gateway"), "accepted before the no-NAT drop");
    assert.ok(!vpcNft(v, 8775, 0).includes("dport 53"), "--dns-port 0: no resolver");
    assert.ok(!vpcNft({ ...v, resolver: undefined }, 8775, 53).includes("dport 53"));
    const moved = vpcNft(v, 8775, 5300);
    assert.ok(moved.includes(`udp dport 53 dnat to ${t.host}:5300`), "VMs always ask :53; the host port is configurable");
  });

  test("the host lets the resolver port in from transit links only", () => {
    const text = hostNft({ hostId: "h", uplink: "eth0", imdsPort: 8775, dnsPort: 53, pool: "0.0.0.0/32", vpcs: [v] });
    const drop = text.indexOf(`ip daddr 169.254.0.0/16 meta l4proto { tcp, udp } th dport 53 iifname != @transit_ifs iifname != "lo" drop`);
    const acceptAll = text.indexOf(`    iifname != @transit_ifs accept`);
    const accept = text.indexOf(`    meta l4proto { tcp, udp } th dport 53 accept`);
    assert.ok(drop > 0 && drop < acceptAll && acceptAll < accept && accept < text.indexOf("    counter drop\n"), text);
    assert.ok(!hostNft({ hostId: "h", uplink: "eth0", imdsPort: 8775, pool: "0.0.0.0/32", vpcs: [v] }).includes("th dport 53"));
  });

  test("the resolver address on lo: added once, moved, removed; only our label is touched", () => {
    assert.deepEqual(resolverAddrLines([], "10.0.0.2"), ["addr replace 10.0.0.2/32 dev lo label lo:mvpcdns"]);
    assert.deepEqual(resolverAddrLines(["10.0.0.2"], "10.0.0.2"), []);
    assert.deepEqual(resolverAddrLines(["10.0.0.2"], "10.0.9.9"), ["addr del 10.0.0.2/32 dev lo", "addr replace 10.0.9.9/32 dev lo label lo:mvpcdns"]);
    assert.deepEqual(resolverAddrLines(["10.0.0.2"], undefined), ["addr del 10.0.0.2/32 dev lo"]);
  });
});

describe("the resolver over loopback sockets", () => {
  let resolver: Resolver;
  let upstream: Socket;
  let upstreamSeen = 0;
  const zones = new Map([
    ["127.0.0.1", zoneA],
    ["127.0.0.2", zoneB],
  ]);

  beforeAll(async () => {
    upstream = createSocket("udp4");
    upstream.on("message", (m, r) => {
      upstreamSeen++;
      const qq = dnsPacket.decode(m);
      if (qq.questions![0].name === "slow.example") return; // never answers
      upstream.send(
        dnsPacket.encode({
          id: qq.id,
          type: "response",
          flags: dnsPacket.RECURSION_AVAILABLE,
          questions: qq.questions,
          answers: [{ type: "A", name: qq.questions![0].name, ttl: 9, data: "192.0.2.99" }],
        }),
        r.port,
        r.address,
      );
    });
    await new Promise<void>((r) => upstream.bind(5399, "127.0.0.3", r));
    resolver = new Resolver({
      port: 0,
      zoneOf: (l) => zones.get(l),
      logger: { debug() {}, info() {}, warn() {}, error() {} },
      forwardTimeoutMs: 300,
      rateLimitPerSecond: 5,
      burst: 20,
    });
  });
  afterAll(async () => {
    await resolver.close();
    upstream.close();
  });

  const ask = async (local: string, remote: string, name: string) => {
    const b = await resolver.handle(
      local,
      remote,
      dnsPacket.encode({ type: "query", id: 777, flags: dnsPacket.RECURSION_DESIRED, questions: [{ type: "A", name }] }),
      512,
    );
    if (!b) return null;
    const r = dec(b);
    return { rcode: r.rcode, id: r.id, data: (r.answers ?? []).map((a) => String(a.data)) };
  };

  test("the arrival address picks the zone: the same VM address in two VPCs sees two zones", async () => {
    assert.deepEqual(await ask("127.0.0.1", "10.0.1.50", "web1.prod.internal"), { rcode: "NOERROR", id: 777, data: ["10.0.1.4"] });
    assert.deepEqual(await ask("127.0.0.2", "10.0.1.50", "web1.prod.internal"), { rcode: "NXDOMAIN", id: 777, data: [] });
    assert.deepEqual(await ask("127.0.0.2", "10.0.1.50", "web1.dev.internal"), { rcode: "NOERROR", id: 777, data: ["10.0.1.7"] });
    assert.equal(upstreamSeen, 0, "names in (or under) a VPC zone never reach the upstream");
  });

  test("forwarding keeps the client's id (upstream sees another); a silent upstream gives SERVFAIL", async () => {
    assert.deepEqual(await ask("127.0.0.1", "10.0.1.51", "www.example"), { rcode: "NOERROR", id: 777, data: ["192.0.2.99"] });
    assert.equal((await ask("127.0.0.1", "10.0.1.51", "slow.example"))?.rcode, "SERVFAIL");
    assert.equal((await ask("127.0.0.2", "10.0.1.51", "www.example"))?.rcode, "REFUSED");
    assert.ok(upstreamSeen >= 2, `the upstream was asked (${upstreamSeen})`);
  });

  test("a VM over its rate is dropped; another VM is not", async () => {
    let answered = 0;
    for (let i = 0; i < 40; i++) if (await ask("127.0.0.1", "10.0.1.60", "web1.prod.internal")) answered++;
    assert.ok(answered >= 20 && answered < 25, `burst 20 (+ refill): ${answered}`);
    assert.ok(await ask("127.0.0.1", "10.0.1.61", "web1.prod.internal"), "another VM still answered");
    assert.ok(resolver.stats.dropped >= 15);
  });

  test("oversized queries are dropped", async () => {
    const big = dnsPacket.encode({ type: "query", id: 1, questions: [{ type: "A", name: `${"a".repeat(60)}.`.repeat(9) + "x" }] });
    assert.ok(big.length > 512);
    assert.equal(await resolver.handle("127.0.0.1", "10.0.1.70", big, 512), null);
  });

  test("real sockets: UDP and TCP on a bound transit address", async () => {
    const port = await freePort();
    const r2 = new Resolver({ port, zoneOf: (l) => zones.get(l), logger: { debug() {}, info() {}, warn() {}, error() {} } });
    await r2.bind("127.0.0.1");
    try {
      const c = createSocket("udp4");
      const udp = await new Promise<Buffer>((res) => {
        c.on("message", (m) => res(m));
        c.send(dnsPacket.encode({ type: "query", id: 9, questions: [{ type: "A", name: "db.prod.internal" }] }), port, "127.0.0.1");
      });
      c.close();
      assert.deepEqual(
        dec(udp).answers!.map((a) => a.data),
        ["10.0.2.9"],
      );
      const tcp = await new Promise<Buffer>((res, rej) => {
        const s = connect(port, "127.0.0.1", () =>
          s.write(dnsPacket.streamEncode({ type: "query", id: 10, questions: [{ type: "A", name: "web1.prod.internal" }] })),
        );
        let buf = Buffer.alloc(0);
        s.on("data", (d) => {
          buf = Buffer.concat([buf, d]);
          if (buf.length >= 2 && buf.length >= 2 + buf.readUInt16BE(0)) {
            s.destroy();
            res(buf.subarray(2));
          }
        });
        s.on("error", rej);
      });
      assert.deepEqual(
        dec(tcp).answers!.map((a) => a.data),
        ["10.0.1.4"],
      );
      const r3 = new Resolver({ port, zoneOf: () => undefined, logger: console });
      await assert.rejects(r3.bind("127.0.0.1"), /EADDRINUSE/, "a second resolver on the same address and port");
      assert.deepEqual(r3.bound(), []);
      await r3.close();
    } finally {
      await r2.close();
    }
  });
});
