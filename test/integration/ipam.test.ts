// IPAM end to end: a real redis-server (AOF, fsync always) and a real
// `microvpcd ipam` process, called over gRPC. ipam-on-cluster.test.ts runs
// the same cases against a real 3+3 Redis Cluster (ON_CLUSTER), all but those
// about one redis-server (killed, down, its command statistics) and the
// daemon's flags.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { promisify } from "node:util";
import { Code, ConnectError } from "@connectrpc/connect";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, test } from "vitest";
import { SubnetType } from "../../gen/microvpc/v1/subnet_pb.js";
import { DELETED_VPC_STREAM_TTL_MS, vpcEvents } from "../../services/common/events.js";
import { cidr as parseCidr, ipToInt } from "../../services/common/validate.js";
import { ipamKeys, K } from "../../services/ipam/keys.js";
import { vpnKeysOf } from "../../services/netagent/schema.js";
import { VpnStore } from "../../services/netagent/vpn/store.js";
import { IpamStore, MAX_EXTRA_RESERVED } from "../../services/ipam/store.js";
import { ipamClients, rejectsWith } from "../lib/clients.js";
import { ROOT, startDaemon, type Daemon } from "../lib/daemon.js";
import { connectReady, startRedis, startRedisCluster, type TestRedis, type TestRedisCluster } from "../lib/redis.js";
import { ON_CLUSTER } from "../lib/on-cluster.js";

const pexec = promisify(execFile);

let redis: TestRedis;
let cluster: TestRedisCluster | undefined;
let daemon: Daemon;
let c: ReturnType<typeof ipamClients>;

beforeAll(async () => {
  if (ON_CLUSTER) {
    cluster = await startRedisCluster();
    daemon = await startDaemon("ipam", ["--redis", cluster.url, "--redis-timeout-ms", "2000"]);
  } else {
    redis = await startRedis();
    daemon = await startDaemon("ipam", ["--redis", redis.url, "--redis-timeout-ms", "500"]);
  }
  c = ipamClients(daemon.address);
}, 60_000);

afterAll(async () => {
  await daemon?.stop();
  await redis?.stop();
  await cluster?.stop();
});

/** A test about one redis-server or the daemon itself: not run again on a cluster. */
const singleOnly = ON_CLUSTER ? test.skip : test;

async function newVpc(name: string, cidr: string) {
  return (await c.vpc.createVpc({ name, cidr })).vpc!;
}

async function newSubnet(vpc: string, name: string, cidr: string, extra?: number) {
  return (await c.subnet.createSubnet({ vpc, name, cidr, type: SubnetType.PRIVATE, extraReserved: extra })).subnet!;
}

describe("catalog", () => {
  test("VPC and subnet life cycle, with the deletes refused while in use", async () => {
    const vpc = await newVpc("life", "10.10.0.0/16");
    assert.match(vpc.id, /^vpc-[0-9a-f]{12}$/);
    assert.equal((await c.vpc.getVpc({ ref: "life" })).vpc!.id, vpc.id);
    const sn = await newSubnet("life", "web", "10.10.1.0/24");
    assert.equal(sn.gateway, "10.10.1.1");
    assert.deepEqual(sn.reservedAddresses, ["10.10.1.0", "10.10.1.1", "10.10.1.2", "10.10.1.3", "10.10.1.255"]);
    assert.equal(sn.usage!.free, 251n);
    await rejectsWith(c.vpc.deleteVpc({ ref: "life" }), Code.FailedPrecondition, /still has 1 subnet/);
    const a = await c.ipam.allocate({ subnetId: sn.id, owner: "vm-a", requestId: "r1" });
    await rejectsWith(c.subnet.deleteSubnet({ ref: sn.id }), Code.FailedPrecondition, /still has 1 allocated address/);
    await c.ipam.release({ subnetId: sn.id, address: a.allocation!.address });
    assert.equal((await c.subnet.deleteSubnet({ ref: "web", vpc: "life" })).deleted, true);
    assert.equal((await c.subnet.deleteSubnet({ ref: sn.id })).deleted, false, "second delete is a no-op");
    assert.equal((await c.vpc.deleteVpc({ ref: vpc.id })).deleted, true);
    assert.equal((await c.vpc.deleteVpc({ ref: vpc.id })).deleted, false);
    await rejectsWith(c.vpc.getVpc({ ref: "life" }), Code.NotFound);
    // The VPC's change stream ends with vpc.deleted, for its readers to take, and then goes: VPC ids are
    // never reused, and every deleted VPC would otherwise keep its stream for good.
    const r = await connectReady({ url: ON_CLUSTER ? cluster!.url : redis.url });
    try {
      const [[, last]] = await r.xrevrange(vpcEvents(vpc.id), "+", "-", "COUNT", 1);
      assert.deepEqual(last, ["kind", "vpc.deleted", "vpc", vpc.id]);
      const ttl = await r.pttl(vpcEvents(vpc.id));
      assert.ok(ttl > DELETED_VPC_STREAM_TTL_MS - 60_000 && ttl <= DELETED_VPC_STREAM_TTL_MS, `the stream's expiry: ${ttl} ms`);
    } finally {
      r.disconnect();
    }
  });

  test("the sweep gives a deleted VPC's stream left without an expiry its expiry; a live VPC's stream and an expiry already set stay", async () => {
    const r = await connectReady({ url: ON_CLUSTER ? cluster!.url : redis.url });
    try {
      const live = await newVpc("sweep-live", "10.11.0.0/16");
      await r.xadd(vpcEvents(live.id), "*", "kind", "test.live");
      // A late writer after the stream expired (a floating IP of a deleted VPC released a day later), and a cluster delete cut off before its expiry.
      const [orphan, expiring] = ["vpc-0000000000aa", "vpc-0000000000ab"];
      await r.xadd(vpcEvents(orphan), "*", "kind", "gw.fip.released", "vpc", orphan);
      await r.xadd(vpcEvents(expiring), "*", "kind", "vpc.deleted", "vpc", expiring);
      await r.pexpire(vpcEvents(expiring), 600_000);
      const { streams, expired } = await new IpamStore(r).expireOrphanStreams(2);
      assert.ok(streams >= 3, `streams looked at: ${streams}`);
      assert.equal(expired, 1);
      const ttl = await r.pttl(vpcEvents(orphan));
      assert.ok(ttl > DELETED_VPC_STREAM_TTL_MS - 60_000 && ttl <= DELETED_VPC_STREAM_TTL_MS, `the orphan's expiry: ${ttl} ms`);
      assert.equal(await r.pttl(vpcEvents(live.id)), -1, "a live VPC's stream keeps no expiry");
      const kept = await r.pttl(vpcEvents(expiring));
      assert.ok(kept > 0 && kept <= 600_000, `an expiry already set stays: ${kept} ms`);
      assert.deepEqual(await new IpamStore(r).expireOrphanStreams(), { streams, expired: 0 }, "a second sweep finds nothing to do");
      await c.vpc.deleteVpc({ ref: live.id });
      for (const v of [orphan, expiring]) await r.del(vpcEvents(v));
    } finally {
      r.disconnect();
    }
  });

  test("overlapping VPCs are allowed; overlapping subnets in one VPC are not", async () => {
    await newVpc("ov-a", "10.20.0.0/16");
    await newVpc("ov-b", "10.20.0.0/16");
    await newSubnet("ov-a", "s1", "10.20.1.0/24");
    await newSubnet("ov-b", "s1", "10.20.1.0/24");
    await rejectsWith(newSubnet("ov-a", "s2", "10.20.0.0/23"), Code.AlreadyExists, /overlaps subnet s1 \(10\.20\.1\.0\/24\)/);
    await rejectsWith(newSubnet("ov-a", "s3", "10.20.1.128/25"), Code.AlreadyExists, /overlaps/);
    await newSubnet("ov-a", "s4", "10.20.2.0/24");
    await newSubnet("ov-a", "s5", "10.20.0.0/24");
    await rejectsWith(newSubnet("ov-a", "s1", "10.20.9.0/24"), Code.AlreadyExists, /already has a subnet named "s1"/);
  });

  test("client tokens make creates retryable", async () => {
    const a = await c.vpc.createVpc({ name: "tok", cidr: "10.30.0.0/16", clientToken: "orch-42" });
    const b = await c.vpc.createVpc({ name: "tok", cidr: "10.30.0.0/16", clientToken: "orch-42" });
    assert.equal(a.vpc!.id, b.vpc!.id);
    await rejectsWith(c.vpc.createVpc({ name: "tok", cidr: "10.30.0.0/16" }), Code.AlreadyExists, /already exists/);
  });

  test("DeleteVpc is refused while the VPC has a VPN endpoint, naming the command that deletes it; then the VPC goes and leaves no VPN record", async () => {
    // The endpoint as a VpnService writes it (netagent/vpn/store.ts), on this file's Redis or cluster.
    const r = await connectReady({ url: ON_CLUSTER ? cluster!.url : redis.url });
    try {
      const vpc = await newVpc("vpn-left", "10.44.0.0/16");
      const vpn = new VpnStore(r);
      const range = parseCidr("client_cidr", "10.44.250.0/24", { min: 8, max: 30 });
      const ep = { vpcId: vpc.id, hostId: "nohost", publicAddress: "192.0.2.1", listenPort: 51820, clientCidr: range.text, updatedMs: Date.now() };
      assert.ok("gen" in (await vpn.setEndpoint(ep, range)));
      await rejectsWith(
        c.vpc.deleteVpc({ ref: vpc.id }),
        Code.FailedPrecondition,
        new RegExp(`VPC ${vpc.id} still has a VPN endpoint; delete it first \\(microvpc vpn endpoint delete --vpc ${vpc.id}`),
      );
      const k = vpnKeysOf(r);
      assert.equal((await c.vpc.getVpc({ ref: vpc.id })).vpc!.id, vpc.id, "the refused delete left the VPC");
      assert.equal(await r.exists(k.ep(vpc.id)), 1, "and its endpoint");
      assert.notEqual(await r.hget(ipamKeys(r).vpcReserved(vpc.id), "vpn"), null, "and the endpoint's reserved range");
      assert.ok("gen" in ((await vpn.deleteEndpoint(vpc.id)) ?? {}));
      assert.equal((await c.vpc.deleteVpc({ ref: vpc.id })).deleted, true);
      // The VPC's VPN keys (on a cluster also its change counter, under its tag; a single Redis has one counter for every VPC).
      const left = [k.ep(vpc.id), k.clients(vpc.id), k.keys(vpc.id), k.addrs(vpc.id), ipamKeys(r).vpcReserved(vpc.id), ...(k.cluster ? [k.gen(vpc.id)] : [])];
      for (const key of left) assert.equal(await r.exists(key), 0, `${key} is left behind`);
      assert.equal(await r.sismember(k.eps, vpc.id), 0, "the VPC is still listed as an endpoint's");
    } finally {
      r.disconnect();
    }
  });

  test("lists page through everything exactly once", async () => {
    for (let i = 0; i < 7; i++) await newVpc(`page-${i}`, "10.40.0.0/16");
    for (let i = 0; i < 5; i++) await newSubnet("page-0", `s${i}`, `10.40.${i}.0/24`);
    const names: string[] = [];
    let token = "";
    do {
      const r = await c.vpc.listVpcs({ pageSize: 2, pageToken: token });
      assert.ok(r.vpcs.length <= 2);
      names.push(...r.vpcs.map((v) => v.name));
      token = r.nextPageToken;
    } while (token);
    assert.deepEqual(
      names.filter((n) => n.startsWith("page-")),
      [0, 1, 2, 3, 4, 5, 6].map((i) => `page-${i}`),
    );
    assert.equal(new Set(names).size, names.length);
    const cidrs: string[] = [];
    token = "";
    do {
      const r = await c.subnet.listSubnets({ vpc: "page-0", pageSize: 2, pageToken: token });
      cidrs.push(...r.subnets.map((s) => s.cidr));
      token = r.nextPageToken;
    } while (token);
    assert.deepEqual(
      cidrs,
      [0, 1, 2, 3, 4].map((i) => `10.40.${i}.0/24`),
    );
  });
});

describe("bad input gets the right code, a message that says what to fix, and changes nothing", () => {
  // Under node:test each case was a subtest of the test "table"; vitest has
  // no tests inside tests, so "table" is a suite: the VPC and subnet in
  // beforeAll, a test per case (same names, same order), and the check that
  // nothing changed as its last test.
  describe("table", () => {
    let sn: Awaited<ReturnType<typeof newSubnet>>;
    let before = 0;
    let snBefore = 0;
    beforeAll(async () => {
      await newVpc("bad", "10.50.0.0/16");
      sn = await newSubnet("bad", "ok", "10.50.1.0/24");
      before = (await c.vpc.listVpcs({ pageSize: 1000 })).vpcs.length;
      snBefore = (await c.subnet.listSubnets({ vpc: "bad" })).subnets.length;
    });
    const huge = "x".repeat(100_000);
    const cases: [string, () => Promise<unknown>, Code, RegExp][] = [
      ["bad cidr", () => c.vpc.createVpc({ name: "b1", cidr: "10.0.0.300/16" }), Code.InvalidArgument, /cidr: .* is not an IPv4 CIDR/],
      ["host bits", () => c.vpc.createVpc({ name: "b1", cidr: "10.0.0.1/16" }), Code.InvalidArgument, /did you mean "10\.0\.0\.0\/16"/],
      ["too large", () => c.vpc.createVpc({ name: "b1", cidr: "10.0.0.0/7" }), Code.InvalidArgument, /allowed are \/8 to \/28/],
      ["too small", () => c.vpc.createVpc({ name: "b1", cidr: "10.0.0.0/29" }), Code.InvalidArgument, /allowed are \/8 to \/28/],
      ["public", () => c.vpc.createVpc({ name: "b1", cidr: "8.8.0.0/16" }), Code.InvalidArgument, /not in a private range.*allow_public_cidr/],
      ["empty name", () => c.vpc.createVpc({ name: "", cidr: "10.0.0.0/16" }), Code.InvalidArgument, /name: is required/],
      ["nft metachar", () => c.vpc.createVpc({ name: "a;flush ruleset", cidr: "10.0.0.0/16" }), Code.InvalidArgument, /name: .* is not a valid name/],
      ["shell metachar", () => c.vpc.createVpc({ name: "$(reboot)", cidr: "10.0.0.0/16" }), Code.InvalidArgument, /is not a valid name/],
      ["newline", () => c.vpc.createVpc({ name: "a\nb", cidr: "10.0.0.0/16" }), Code.InvalidArgument, /is not a valid name/],
      ["huge name", () => c.vpc.createVpc({ name: huge, cidr: "10.0.0.0/16" }), Code.InvalidArgument, /is not a valid name/],
      [
        "huge description",
        () => c.vpc.createVpc({ name: "b2", cidr: "10.0.0.0/16", description: huge }),
        Code.InvalidArgument,
        /description: is 100000 characters long; the limit is 255/,
      ],
      ["newline description", () => c.vpc.createVpc({ name: "b2", cidr: "10.0.0.0/16", description: "a\nb" }), Code.InvalidArgument, /control characters/],
      ["unknown vpc", () => c.subnet.createSubnet({ vpc: "nope", name: "s", cidr: "10.0.0.0/24" }), Code.NotFound, /vpc "nope" not found/],
      ["unknown vpc id", () => c.vpc.getVpc({ ref: "vpc-000000000000" }), Code.NotFound, /not found/],
      [
        "subnet outside",
        () => c.subnet.createSubnet({ vpc: "bad", name: "s", cidr: "10.51.0.0/24" }),
        Code.InvalidArgument,
        /not inside VPC bad \(10\.50\.0\.0\/16\)/,
      ],
      ["subnet bigger", () => c.subnet.createSubnet({ vpc: "bad", name: "s", cidr: "10.50.0.0/15" }), Code.InvalidArgument, /host bits|not inside/],
      [
        "extra reserved",
        () => c.subnet.createSubnet({ vpc: "bad", name: "s", cidr: "10.50.9.0/28", extraReserved: 13 }),
        Code.InvalidArgument,
        /leaves no usable address/,
      ],
      ["subnet by name w/o vpc", () => c.subnet.getSubnet({ ref: "ok" }), Code.InvalidArgument, /vpc: is required/],
      [
        "unknown subnet",
        () => c.ipam.allocate({ subnetId: "subnet-000000000000", owner: "o", requestId: "r" }),
        Code.NotFound,
        /subnet "subnet-000000000000" not found/,
      ],
      ["malformed subnet id", () => c.ipam.allocate({ subnetId: "subnet-x; rm -rf /", owner: "o", requestId: "r" }), Code.InvalidArgument, /not a subnet id/],
      ["owner metachar", () => c.ipam.allocate({ subnetId: sn.id, owner: "o wner", requestId: "r" }), Code.InvalidArgument, /owner: .* is not valid/],
      ["no request id", () => c.ipam.allocate({ subnetId: sn.id, owner: "o", requestId: "" }), Code.InvalidArgument, /request_id: is required/],
      [
        "address outside",
        () => c.ipam.allocate({ subnetId: sn.id, owner: "o", requestId: "r", address: "10.50.2.9" }),
        Code.InvalidArgument,
        /outside subnet ok/,
      ],
      [
        "address garbage",
        () => c.ipam.allocate({ subnetId: sn.id, owner: "o", requestId: "r", address: "10.50.1" }),
        Code.InvalidArgument,
        /not an IPv4 address/,
      ],
      [
        "reserved",
        () => c.ipam.allocate({ subnetId: sn.id, owner: "o", requestId: "r", address: "10.50.1.2" }),
        Code.InvalidArgument,
        /is reserved.*from 10\.50\.1\.4 to 10\.50\.1\.254/,
      ],
      ["gateway", () => c.ipam.allocate({ subnetId: sn.id, owner: "o", requestId: "r", address: "10.50.1.1" }), Code.InvalidArgument, /is reserved/],
      ["broadcast", () => c.ipam.allocate({ subnetId: sn.id, owner: "o", requestId: "r", address: "10.50.1.255" }), Code.InvalidArgument, /is reserved/],
      ["page size", () => c.vpc.listVpcs({ pageSize: 5000 }), Code.InvalidArgument, /page_size: is 5000; the limit is 1000/],
      ["page token", () => c.vpc.listVpcs({ pageToken: "garbage" }), Code.InvalidArgument, /page_token/],
      ["release nothing", () => c.ipam.release({ subnetId: sn.id }), Code.InvalidArgument, /address: is required, unless owner and request_id/],
    ];
    for (const [what, call, code, re] of cases) {
      test(what, () => rejectsWith(call(), code, re).then(() => undefined));
    }
    test("after every case: no VPC, subnet or address was created", async () => {
      assert.equal((await c.vpc.listVpcs({ pageSize: 1000 })).vpcs.length, before, "no VPC was created");
      assert.equal((await c.subnet.listSubnets({ vpc: "bad" })).subnets.length, snBefore, "no subnet was created");
      assert.equal((await c.ipam.getUtilization({ subnetId: sn.id })).usage!.used, 0n, "no address was allocated");
    });
  });
});

describe("bounds", () => {
  singleOnly("a /8 with the most extra_reserved is created fast; one more is INVALID_ARGUMENT and creates nothing", async () => {
    const vpc = await newVpc("bounds-8", "10.0.0.0/8");
    const r = new Redis(redis.url);
    try {
      await r.config("RESETSTAT");
      const t0 = performance.now();
      const sn = await newSubnet(vpc.id, "big", "10.0.0.0/8", MAX_EXTRA_RESERVED);
      const ms = performance.now() - t0;
      // A per-address build took seconds of ipam CPU and minutes of Redis time;
      // now it is a few commands (generous bound: the machine is shared).
      assert.ok(ms < 2000, `CreateSubnet of a /8 took ${ms.toFixed(0)} ms`);
      const script = /cmdstat_evalsha?:calls=\d+,usec=(\d+)/.exec(await r.info("commandstats"));
      assert.ok(script && Number(script[1]) < 200_000, `create script took ${script?.[1]} µs in Redis`);
      assert.equal(sn.extraReserved, MAX_EXTRA_RESERVED);
      assert.equal(sn.reservedAddresses.length, MAX_EXTRA_RESERVED + 3);
      assert.equal(sn.usage!.reserved, BigInt(MAX_EXTRA_RESERVED + 3));
      assert.equal(sn.usage!.free, BigInt(2 ** 24 - MAX_EXTRA_RESERVED - 3));
      const first = await c.ipam.allocate({ subnetId: sn.id, owner: "o", requestId: "r" });
      assert.equal(first.allocation!.address, `10.0.${(MAX_EXTRA_RESERVED + 2) >> 8}.${(MAX_EXTRA_RESERVED + 2) & 255}`, "first free follows the extra range");
      await rejectsWith(c.ipam.allocate({ subnetId: sn.id, owner: "o", requestId: "r2", address: "10.0.4.1" }), Code.InvalidArgument, /is reserved/);
      await c.ipam.release({ subnetId: sn.id, address: first.allocation!.address });
      await c.subnet.deleteSubnet({ ref: sn.id });

      const keysBefore = await r.dbsize();
      for (const extra of [MAX_EXTRA_RESERVED + 1, 2 ** 24 - 4]) {
        await rejectsWith(
          newSubnet(vpc.id, "over", "10.0.0.0/8", extra),
          Code.InvalidArgument,
          new RegExp(`extra_reserved: is ${extra}; the limit is ${MAX_EXTRA_RESERVED}`),
        );
      }
      assert.equal(await r.dbsize(), keysBefore, "no key was written");
      assert.equal((await c.subnet.listSubnets({ vpc: vpc.id })).subnets.length, 0);
      await c.vpc.deleteVpc({ ref: vpc.id });
    } finally {
      r.disconnect();
    }
  });

  test("page tokens that do not decode to a cursor of the listing are INVALID_ARGUMENT, never INTERNAL", async () => {
    const vpc = await newVpc("bounds-pages", "10.60.0.0/16");
    const sn = await newSubnet(vpc.id, "s", "10.60.1.0/24");
    const tok = (c: unknown) => Buffer.from(JSON.stringify({ c })).toString("base64url");
    const bad = [tok("NaN"), tok(-1), tok(1.5), tok("web"), tok(null), tok([1]), "not-a-token", "x".repeat(600), "eyJjIjoxZTQwMH0", "%%%"];
    for (const pageToken of bad) {
      await rejectsWith(c.ipam.listAllocations({ subnetId: sn.id, pageToken }), Code.InvalidArgument, /page_token: is not a token this server issued/);
      await rejectsWith(c.subnet.listSubnets({ vpc: vpc.id, pageToken }), Code.InvalidArgument, /page_token/);
    }
    for (const pageToken of [tok(7), tok(null), "eyJjIjoxZTQwMH0"]) {
      await rejectsWith(c.vpc.listVpcs({ pageToken }), Code.InvalidArgument, /page_token/);
      await rejectsWith(c.ipam.listAllocations({ owner: "o", pageToken }), Code.InvalidArgument, /page_token/);
    }
    assert.equal((await c.ipam.listAllocations({ subnetId: sn.id, pageToken: tok(3) })).allocations.length, 0);
  });
});

describe("allocation", () => {
  test("idempotent by owner and request id; wanted addresses; release is idempotent", async () => {
    await newVpc("alloc", "10.60.0.0/16");
    const sn = await newSubnet("alloc", "s", "10.60.1.0/24");
    const a1 = await c.ipam.allocate({ subnetId: sn.id, owner: "vm-1", requestId: "create-1" });
    assert.equal(a1.allocation!.address, "10.60.1.4", "first usable after the AWS-reserved .0-.3");
    assert.equal(a1.created, true);
    assert.equal(a1.allocation!.prefixLength, 24);
    assert.equal(a1.allocation!.gateway, "10.60.1.1");
    const again = await c.ipam.allocate({ subnetId: sn.id, owner: "vm-1", requestId: "create-1" });
    assert.equal(again.allocation!.address, "10.60.1.4");
    assert.equal(again.created, false);
    const w = await c.ipam.allocate({ subnetId: sn.id, owner: "vm-2", requestId: "x", address: "10.60.1.77" });
    assert.equal(w.allocation!.address, "10.60.1.77");
    await rejectsWith(
      c.ipam.allocate({ subnetId: sn.id, owner: "vm-3", requestId: "y", address: "10.60.1.77" }),
      Code.AlreadyExists,
      /already allocated to vm-2/,
    );
    await rejectsWith(
      c.ipam.allocate({ subnetId: sn.id, owner: "vm-2", requestId: "x", address: "10.60.1.78" }),
      Code.FailedPrecondition,
      /already holds 10\.60\.1\.77/,
    );
    const got = await c.ipam.getAllocation({ subnetId: sn.id, address: "10.60.1.77" });
    assert.equal(got.allocation!.owner, "vm-2");
    assert.ok(got.allocation!.allocateTime);
    await rejectsWith(c.ipam.release({ subnetId: sn.id, address: "10.60.1.77", owner: "vm-9" }), Code.FailedPrecondition, /held by vm-2/);
    assert.equal((await c.ipam.release({ subnetId: sn.id, owner: "vm-2", requestId: "x" })).released, true);
    assert.equal((await c.ipam.release({ subnetId: sn.id, address: "10.60.1.77" })).released, false);
    await rejectsWith(c.ipam.getAllocation({ subnetId: sn.id, address: "10.60.1.77" }), Code.NotFound, /free/);
    // Releasing a reserved address frees nothing.
    assert.equal((await c.ipam.release({ subnetId: sn.id, address: "10.60.1.1" })).released, false);
    await rejectsWith(c.ipam.allocate({ subnetId: sn.id, owner: "o", requestId: "r", address: "10.60.1.1" }), Code.InvalidArgument, /reserved/);
    const u = (await c.ipam.getUtilization({ subnetId: sn.id })).usage!;
    assert.deepEqual([u.total, u.reserved, u.used, u.free], [256n, 5n, 1n, 250n]);
  });

  test("list by subnet and by owner; reclaim frees only what dead owners hold", async () => {
    await newVpc("recl", "10.70.0.0/16");
    const s1 = await newSubnet("recl", "a", "10.70.1.0/24");
    const s2 = await newSubnet("recl", "b", "10.70.2.0/24");
    for (const [s, o] of [
      [s1, "hv1/vm-live"],
      [s1, "hv1/vm-dead"],
      [s2, "hv1/vm-dead"],
      [s2, "hv2/vm-other"],
      [s1, "hv1/vm-live"],
    ] as const) {
      await c.ipam.allocate({ subnetId: s.id, owner: o, requestId: `${o}-${Math.random()}` });
    }
    const byOwner = await c.ipam.listAllocations({ owner: "hv1/vm-dead" });
    assert.deepEqual(byOwner.allocations.map((a) => a.address).sort(), ["10.70.1.5", "10.70.2.4"]);
    const bySubnet = await c.ipam.listAllocations({ subnetId: s1.id });
    assert.deepEqual(
      bySubnet.allocations.map((a) => `${a.address} ${a.owner}`),
      ["10.70.1.4 hv1/vm-live", "10.70.1.5 hv1/vm-dead", "10.70.1.6 hv1/vm-live"],
    );
    const filtered = await c.ipam.listAllocations({ subnetId: s1.id, owner: "hv1/vm-live", pageSize: 1 });
    assert.equal(filtered.allocations.length, 1);
    assert.ok(filtered.nextPageToken);
    // Fresh allocations are inside the grace period: nothing is freed.
    const graced = await c.ipam.reclaim({ ownerPrefix: "hv1/", liveOwners: ["hv1/vm-live"] });
    assert.equal(graced.reclaimed.length, 0);
    const dry = await c.ipam.reclaim({ ownerPrefix: "hv1/", liveOwners: ["hv1/vm-live"], graceSeconds: 0, dryRun: true });
    assert.equal(dry.reclaimed.length, 2);
    assert.equal((await c.ipam.listAllocations({ owner: "hv1/vm-dead" })).allocations.length, 2, "dry run frees nothing");
    const r = await c.ipam.reclaim({ ownerPrefix: "hv1/", liveOwners: ["hv1/vm-live"], graceSeconds: 0 });
    assert.deepEqual(
      r.reclaimed.map((a) => a.owner),
      ["hv1/vm-dead", "hv1/vm-dead"],
    );
    assert.equal((await c.ipam.listAllocations({ owner: "hv1/vm-dead" })).allocations.length, 0);
    assert.equal((await c.ipam.listAllocations({ owner: "hv1/vm-live" })).allocations.length, 2, "live owner kept");
    assert.equal((await c.ipam.listAllocations({ owner: "hv2/vm-other" })).allocations.length, 1, "outside the prefix kept");
  });

  test("64 concurrent gRPC clients drain a /20: every usable address exactly once", async () => {
    await newVpc("drain", "10.80.0.0/16");
    const sn = await newSubnet("drain", "s", "10.80.16.0/20");
    const usable = 4096 - 5;
    const clients = Array.from({ length: 64 }, () => ipamClients(daemon.address));
    const got: string[][] = await Promise.all(
      clients.map(async (cl, i) => {
        const mine: string[] = [];
        for (let n = 0, retries = 0; n < usable; n++) {
          try {
            const r = await cl.ipam.allocate({ subnetId: sn.id, owner: `c${i}`, requestId: `r${n}` });
            mine.push(r.allocation!.address);
          } catch (e) {
            if (e instanceof ConnectError && e.code === Code.ResourceExhausted) return mine;
            // A loaded machine may time a call out; a retry with the same
            // request id is safe (that is what the id is for).
            if (e instanceof ConnectError && e.code === Code.Unavailable && retries++ < 20) {
              n--;
              continue;
            }
            throw e;
          }
        }
        return mine;
      }),
    );
    const all = got.flat();
    assert.equal(all.length, usable);
    assert.equal(new Set(all).size, usable, "no address twice");
    const lo = ipToInt("10.80.16.0");
    for (const a of all) {
      const n = ipToInt(a) - lo;
      assert.ok(n >= 4 && n <= 4094, `${a} is reserved or outside`);
    }
    assert.equal((await c.ipam.getUtilization({ subnetId: sn.id })).usage!.free, 0n);
  });

  singleOnly("a burst of Allocate calls to one subnet runs far fewer scripts than calls (they are answered together); each gets its own address", async () => {
    await newVpc("burst", "10.81.0.0/16");
    const sn = await newSubnet("burst", "s", "10.81.0.0/24");
    await c.ipam.allocate({ subnetId: sn.id, owner: "warm", requestId: "r" }); // the daemon's subnet cache and scripts
    const r = await connectReady({ url: redis.url });
    const scripts = async () => [...(await r.info("commandstats")).matchAll(/^cmdstat_eval(?:sha)?:calls=(\d+)/gm)].reduce((a, m) => a + Number(m[1]), 0);
    const groupMetrics = async () => {
      const body = await (await fetch(`http://127.0.0.1:${daemon.metricsPort}/metrics`)).text();
      const v = (name: string) => Number(new RegExp(`^microvpc_ipam_allocate_group_size_${name}\\{service="ipam"\\} (\\d+)`, "m").exec(body)?.[1] ?? NaN);
      return { groups: v("count"), calls: v("sum") };
    };
    try {
      const m0 = await groupMetrics();
      const before = await scripts();
      const got = await Promise.all(Array.from({ length: 48 }, (_, i) => c.ipam.allocate({ subnetId: sn.id, owner: `vm-${i}`, requestId: "r" })));
      const ran = (await scripts()) - before;
      assert.equal(new Set(got.map((g) => g.allocation!.address)).size, 48);
      assert.ok(got.every((g) => g.created));
      // One shared connection: the calls reach the daemon in a few reads, each read's calls one script.
      assert.ok(ran >= 1 && ran <= 24, `${ran} scripts for 48 calls`);
      // The daemon's own count of the same: 48 calls, in no more groups than scripts ran.
      const m1 = await groupMetrics();
      assert.equal(m1.calls - m0.calls, 48);
      assert.ok(m1.groups - m0.groups >= 1 && m1.groups - m0.groups <= ran, `${m1.groups - m0.groups} groups, ${ran} scripts`);
    } finally {
      r.disconnect();
    }
  });

  singleOnly("Redis killed and restarted during allocation: no address is held twice, acknowledged ones survive", async () => {
    await newVpc("crash", "10.90.0.0/16");
    const sn = await newSubnet("crash", "s", "10.90.0.0/22");
    const acked = new Map<string, string>(); // request id -> address
    let unavailable = 0;
    let stop = false;
    const workers = Array.from({ length: 16 }, async (_, w) => {
      const cl = ipamClients(daemon.address);
      for (let n = 0; n < 60 && !stop; n++) {
        const requestId = `w${w}-${n}`;
        // Retry with the same request id until it is acknowledged: the
        // idempotency key makes a retry safe even if the first try was
        // applied but its answer lost.
        for (let attempt = 0; attempt < 100; attempt++) {
          try {
            const r = await cl.ipam.allocate({ subnetId: sn.id, owner: `w${w}`, requestId });
            acked.set(requestId, r.allocation!.address);
            break;
          } catch (e) {
            if (!(e instanceof ConnectError) || (e.code !== Code.Unavailable && e.code !== Code.DeadlineExceeded)) throw e;
            unavailable++;
            await new Promise((r) => setTimeout(r, 50));
          }
        }
      }
    });
    // Kill Redis once some allocations are acknowledged and most are still to
    // come (not after a fixed time: a fast daemon could finish all 960 first).
    const killBy = Date.now() + 10_000;
    while (acked.size < 64 && Date.now() < killBy) await new Promise((r) => setTimeout(r, 2));
    await redis.kill();
    await new Promise((r) => setTimeout(r, 500));
    await redis.restart();
    await Promise.all(workers);
    stop = true;
    assert.ok(unavailable > 0, "the clients saw Redis down (else the test proved nothing)");
    assert.equal(acked.size, 16 * 60);
    const addrs = [...acked.values()];
    assert.equal(new Set(addrs).size, addrs.length, "no address acknowledged twice");
    // The store agrees: each acknowledged address is held by its requester.
    const listed = new Map<string, string>();
    let token = "";
    do {
      const r = await c.ipam.listAllocations({ subnetId: sn.id, pageSize: 1000, pageToken: token });
      for (const a of r.allocations) listed.set(a.requestId, a.address);
      token = r.nextPageToken;
    } while (token);
    assert.deepEqual(new Map([...listed].sort()), new Map([...acked].sort()));
    // Bitmap, counter and records agree.
    const r = new Redis(redis.url);
    try {
      const bits = await r.bitcount(K.bits(sn.vpcId, sn.id));
      const used = Number(await r.get(K.used(sn.vpcId, sn.id)));
      assert.equal(used, acked.size);
      assert.equal(bits, used + 5);
    } finally {
      r.disconnect();
    }
  });

  singleOnly("Redis down: UNAVAILABLE at once with a clear message, then recovery by itself", async () => {
    await newVpc("down", "10.100.0.0/16");
    const sn = await newSubnet("down", "s", "10.100.0.0/24");
    await redis.kill();
    try {
      const t0 = Date.now();
      await rejectsWith(c.ipam.allocate({ subnetId: sn.id, owner: "o", requestId: "r" }), Code.Unavailable, /Redis\) unavailable/);
      await rejectsWith(c.vpc.listVpcs({}), Code.Unavailable, /retry when Redis is back/);
      assert.ok(Date.now() - t0 < 3000, "fails fast rather than hanging");
    } finally {
      await redis.restart();
    }
    const deadline = Date.now() + 10_000;
    for (;;) {
      try {
        await c.ipam.allocate({ subnetId: sn.id, owner: "o", requestId: "r" });
        break;
      } catch (e) {
        if (Date.now() > deadline) throw e;
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  });
});

describe("batch allocation (AllocateBatch)", () => {
  test("N addresses in one call, lowest free first, each held under <request_id>/<i>; a retry gets the same ones", async () => {
    await newVpc("batch", "10.90.0.0/16");
    const sn = await newSubnet("batch", "s", "10.90.1.0/24");
    const one = await c.ipam.allocate({ subnetId: sn.id, owner: "vm-x", requestId: "solo" });
    assert.equal(one.allocation!.address, "10.90.1.4");
    const r = await c.ipam.allocateBatch({ subnetId: sn.id, owner: "pool-a", requestId: "b1", count: 20 });
    assert.equal(r.created, true);
    assert.deepEqual(
      r.allocations.map((a) => a.address),
      Array.from({ length: 20 }, (_, i) => `10.90.1.${5 + i}`),
    );
    assert.deepEqual(
      r.allocations.map((a) => a.requestId),
      Array.from({ length: 20 }, (_, i) => `b1/${i}`),
    );
    for (const a of r.allocations) assert.equal(a.owner, "pool-a");
    // Each is an allocation like any other: listed, looked up, released alone.
    assert.equal((await c.ipam.getAllocation({ subnetId: sn.id, address: "10.90.1.7" })).allocation!.requestId, "b1/2");
    assert.equal((await c.ipam.listAllocations({ owner: "pool-a" })).allocations.length, 20);
    assert.equal((await c.ipam.getUtilization({ subnetId: sn.id })).usage!.used, 21n);
    // The retry: the same addresses, created=false, nothing more taken.
    const again = await c.ipam.allocateBatch({ subnetId: sn.id, owner: "pool-a", requestId: "b1", count: 20 });
    assert.equal(again.created, false);
    assert.deepEqual(
      again.allocations.map((a) => a.address),
      r.allocations.map((a) => a.address),
    );
    assert.equal((await c.ipam.getUtilization({ subnetId: sn.id })).usage!.used, 21n);
    // One released by owner + its own request id; the retry returns the rest and takes nothing new.
    assert.equal((await c.ipam.release({ subnetId: sn.id, owner: "pool-a", requestId: "b1/3" })).address, "10.90.1.8");
    const third = await c.ipam.allocateBatch({ subnetId: sn.id, owner: "pool-a", requestId: "b1", count: 20 });
    assert.equal(third.created, false);
    assert.equal(third.allocations.length, 19);
    assert.ok(!third.allocations.some((a) => a.address === "10.90.1.8"));
    // The same request id for a smaller batch than it made is refused (it would hide addresses).
    await rejectsWith(c.ipam.allocateBatch({ subnetId: sn.id, owner: "pool-a", requestId: "b1", count: 5 }), Code.FailedPrecondition, /larger|more than 5/);
    // Another owner's same request id is another batch; the freed .8 is the lowest free.
    const other = await c.ipam.allocateBatch({ subnetId: sn.id, owner: "pool-b", requestId: "b1", count: 2 });
    assert.deepEqual(
      other.allocations.map((a) => a.address),
      ["10.90.1.8", "10.90.1.25"],
    );
  });

  test("all or nothing: a batch larger than the free addresses is RESOURCE_EXHAUSTED and takes none", async () => {
    await newVpc("batchfull", "10.91.0.0/16");
    const sn = await newSubnet("batchfull", "s", "10.91.1.0/27"); // 32 - 5 reserved = 27 usable
    await c.ipam.allocateBatch({ subnetId: sn.id, owner: "p", requestId: "first", count: 20 });
    await rejectsWith(
      c.ipam.allocateBatch({ subnetId: sn.id, owner: "p", requestId: "second", count: 8 }),
      Code.ResourceExhausted,
      /7 free.*8.*nothing was allocated/,
    );
    const u = (await c.ipam.getUtilization({ subnetId: sn.id })).usage!;
    assert.equal(u.used, 20n, "nothing taken by the refused batch");
    assert.equal((await c.ipam.listAllocations({ subnetId: sn.id, pageSize: 100 })).allocations.length, 20);
    const rest = await c.ipam.allocateBatch({ subnetId: sn.id, owner: "p", requestId: "second", count: 7 });
    assert.equal(rest.allocations.length, 7, "exactly the free ones, with the same request id as the refused call");
    await rejectsWith(c.ipam.allocateBatch({ subnetId: sn.id, owner: "p", requestId: "third", count: 1 }), Code.ResourceExhausted);
    assert.equal((await c.ipam.getUtilization({ subnetId: sn.id })).usage!.free, 0n);
  });

  test("bounds: count 0 or above 1024, a request id too long for its items, unknown subnet", async () => {
    await newVpc("batchbad", "10.92.0.0/16");
    const sn = await newSubnet("batchbad", "s", "10.92.0.0/20");
    await rejectsWith(c.ipam.allocateBatch({ subnetId: sn.id, owner: "p", requestId: "r", count: 0 }), Code.InvalidArgument, /count.*1–1024/);
    await rejectsWith(c.ipam.allocateBatch({ subnetId: sn.id, owner: "p", requestId: "r", count: 1025 }), Code.InvalidArgument, /count.*1025/);
    await rejectsWith(c.ipam.allocateBatch({ subnetId: sn.id, owner: "p", requestId: "r".repeat(124), count: 1 }), Code.InvalidArgument, /request_id.*123/);
    await rejectsWith(c.ipam.allocateBatch({ subnetId: sn.id, owner: "", requestId: "r", count: 1 }), Code.InvalidArgument, /owner/);
    await rejectsWith(c.ipam.allocateBatch({ subnetId: "subnet-000000000000", owner: "p", requestId: "r", count: 1 }), Code.NotFound);
    assert.equal((await c.ipam.getUtilization({ subnetId: sn.id })).usage!.used, 0n);
    const max = await c.ipam.allocateBatch({ subnetId: sn.id, owner: "p", requestId: "r".repeat(123), count: 1024 });
    assert.equal(max.allocations.length, 1024);
    assert.equal(max.allocations[1023].requestId, `${"r".repeat(123)}/1023`);
    assert.equal(new Set(max.allocations.map((a) => a.address)).size, 1024);
  });

  test("parallel batches from 16 clients drain a /20: every usable address exactly once, the last batch refused whole", async () => {
    await newVpc("batchpar", "10.93.0.0/16");
    const sn = await newSubnet("batchpar", "s", "10.93.16.0/20");
    const usable = 4096 - 5;
    const clients = Array.from({ length: 16 }, () => ipamClients(daemon.address));
    let refused = 0;
    const got: string[][] = await Promise.all(
      clients.map(async (cl, i) => {
        const mine: string[] = [];
        for (let n = 0, retries = 0; n < 1000; n++) {
          try {
            const r = await cl.ipam.allocateBatch({ subnetId: sn.id, owner: `c${i}`, requestId: `r${n}`, count: 50 });
            mine.push(...r.allocations.map((a) => a.address));
          } catch (e) {
            if (e instanceof ConnectError && e.code === Code.ResourceExhausted) {
              refused++;
              return mine;
            }
            if (e instanceof ConnectError && e.code === Code.Unavailable && retries++ < 20) {
              n--;
              continue;
            }
            throw e;
          }
        }
        return mine;
      }),
    );
    const all = got.flat();
    assert.equal(refused, 16, "every client ends on RESOURCE_EXHAUSTED");
    assert.equal(all.length, Math.floor(usable / 50) * 50, "whole batches only: the remainder is never handed out in part");
    assert.equal(new Set(all).size, all.length, "no address twice");
    const u = (await c.ipam.getUtilization({ subnetId: sn.id })).usage!;
    assert.equal(u.used, BigInt(all.length));
    assert.equal(u.free, BigInt(usable % 50));
  });
});

describe.skipIf(ON_CLUSTER)("operability", () => {
  test("reflection lists the services and a method is called from JSON, as grpcurl does (buf curl)", async () => {
    const buf = join(ROOT, "node_modules", ".bin", "buf");
    const url = `http://${daemon.address}`;
    const list = await pexec(buf, ["curl", "--protocol", "grpc", "--http2-prior-knowledge", "--list-services", url]);
    for (const s of ["microvpc.v1.VpcService", "microvpc.v1.SubnetService", "microvpc.v1.IpamService", "grpc.health.v1.Health"]) {
      assert.match(list.stdout, new RegExp(s.replace(/\./g, "\\.")));
    }
    const made = await pexec(buf, [
      "curl",
      "--protocol",
      "grpc",
      "--http2-prior-knowledge",
      "-d",
      JSON.stringify({ name: "from-json", cidr: "10.110.0.0/16" }),
      `${url}/microvpc.v1.VpcService/CreateVpc`,
    ]);
    assert.equal(JSON.parse(made.stdout).vpc.name, "from-json");
    const bad = await pexec(buf, [
      "curl",
      "--protocol",
      "grpc",
      "--http2-prior-knowledge",
      "-d",
      JSON.stringify({ name: "x;y", cidr: "10.110.0.0/16" }),
      `${url}/microvpc.v1.VpcService/CreateVpc`,
    ]).catch((e) => e);
    assert.match(String(bad.stdout) + String(bad.stderr), /invalid_argument/);
  });

  test("reflection v1alpha answers too, with descriptors that include dependencies", async () => {
    const { grpcClient } = await import("../../services/common/client.js");
    const { ServerReflection } = await import("../../gen/grpc/reflection/v1alpha/reflection_pb.js");
    const { fromBinary } = await import("@bufbuild/protobuf");
    const { FileDescriptorProtoSchema } = await import("@bufbuild/protobuf/wkt");
    const cl = grpcClient(ServerReflection, { address: daemon.address });
    async function* reqs() {
      yield { messageRequest: { case: "fileContainingSymbol" as const, value: "microvpc.v1.IpamService" } };
      yield { messageRequest: { case: "listServices" as const, value: "" } };
    }
    const answers = [];
    for await (const r of cl.serverReflectionInfo(reqs())) answers.push(r);
    assert.equal(answers[0].messageResponse.case, "fileDescriptorResponse");
    const names = (answers[0].messageResponse.value as { fileDescriptorProto: Uint8Array[] }).fileDescriptorProto.map(
      (b) => fromBinary(FileDescriptorProtoSchema, b).name,
    );
    assert.ok(names.includes("microvpc/v1/ipam.proto"));
    // Comments travel with the descriptors, so `grpcurl describe` documents every field.
    const ipamFd = (answers[0].messageResponse.value as { fileDescriptorProto: Uint8Array[] }).fileDescriptorProto
      .map((b) => fromBinary(FileDescriptorProtoSchema, b))
      .find((f) => f.name === "microvpc/v1/ipam.proto")!;
    const comments = ipamFd.sourceCodeInfo?.location.map((l) => l.leadingComments).join("\n") ?? "";
    assert.match(comments, /Idempotency key: a retry with the same owner and request_id/);
    assert.ok(names.includes("google/protobuf/timestamp.proto"));
    assert.equal(answers[1].messageResponse.case, "listServicesResponse");
  });

  test("metrics count RPCs and allocations", async () => {
    const body = await (await fetch(`http://127.0.0.1:${daemon.metricsPort}/metrics`)).text();
    assert.match(body, /microvpc_rpc_requests_total\{service="microvpc\.v1\.IpamService",method="Allocate",code="OK"/);
    assert.match(body, /microvpc_rpc_duration_seconds_bucket/);
    assert.match(body, /microvpc_ipam_allocations_total\{result="created"/);
    // The process metrics under the names stock Node dashboards use.
    assert.match(body, /^process_cpu_user_seconds_total\{service="ipam"\} \d/m);
    assert.match(body, /^nodejs_heap_size_used_bytes\{service="ipam"\} \d/m);
    assert.doesNotMatch(body, /microvpc_process_/);
  });

  test("a token-protected server refuses calls without the token; health stays open", async () => {
    const d = await startDaemon("ipam", ["--redis", redis.url, "--token", "s3cret"]);
    try {
      await rejectsWith(ipamClients(d.address).vpc.listVpcs({}), Code.Unauthenticated, /bearer token/);
      await rejectsWith(ipamClients(d.address, "wrong").vpc.listVpcs({}), Code.Unauthenticated);
      await ipamClients(d.address, "s3cret").vpc.listVpcs({});
    } finally {
      await d.stop();
    }
  });

  test("a non-loopback listener without a token or mutual TLS refuses to start", async () => {
    const r = await pexec(process.execPath, [join(ROOT, "bin", "microvpcd.js"), "ipam", "--listen", "0.0.0.0:0", "--redis", redis.url]).catch((e) => e);
    assert.notEqual(r.code ?? 0, 0);
    assert.match(String(r.stdout) + String(r.stderr), /non-loopback listener needs --token-file .* or --tls-cert\/--tls-key with --tls-client-ca/);
  });

  test("--help lists every flag with its environment variable", async () => {
    const r = await pexec(process.execPath, [join(ROOT, "bin", "microvpcd.js"), "ipam", "--help"]);
    for (const f of ["--listen", "--redis", "--metrics-listen", "--token", "--tls-cert", "MICROVPC_REDIS_URL", "MICROVPC_LISTEN"])
      assert.match(r.stdout, new RegExp(f));
  });
});
