// GatewayService's instance metadata calls against a real redis-server,
// called in memory through createRouterTransport: CRUD, the (vpc, address)
// index, validation of every field, token revocation and the events; the
// control plane's view of every host's records (--api-only) and the adoption
// of records an older version kept in the shared layout.
import assert from "node:assert/strict";
import { create, toBinary, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, createClient, createRouterTransport, type Client } from "@connectrpc/connect";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, test } from "vitest";
import { mapDomainErrors } from "../../services/common/errors.js";
import { GatewayService, ImdsHttpEndpoint, ImdsHttpTokens, InstanceMetadataSchema } from "../../gen/microvpc/v1/gateway_pb.js";
import { VpcService } from "../../gen/microvpc/v1/vpc_pb.js";
import { MetadataApi } from "../../services/gateway/metadata-api.js";
import { FleetMetadataStore, LEGACY_MK, MD_HOSTS, MetadataStore } from "../../services/gateway/metadata-store.js";
import { Ipam } from "../../services/ipam/service.js";
import { IpamStore } from "../../services/ipam/store.js";
import { rejectsWith } from "../lib/clients.js";
import { startRedis, type TestRedis } from "../lib/redis.js";

let redis: TestRedis;
let r: Redis;
let store: MetadataStore;
let gw: Client<typeof GatewayService>;
let vpcs: Client<typeof VpcService>;

beforeAll(async () => {
  redis = await startRedis({ persistence: false });
  r = new Redis(redis.url);
  store = new MetadataStore(r, HOST);
  const ipam = new Ipam(new IpamStore(r));
  const transport = createRouterTransport(
    (router) => {
      router.service(VpcService, ipam.vpcService);
      router.service(GatewayService, new MetadataApi(store).impl);
    },
    { router: { interceptors: [mapDomainErrors] } },
  );
  gw = createClient(GatewayService, transport);
  vpcs = createClient(VpcService, transport);
});

afterAll(async () => {
  r?.disconnect();
  await redis?.stop();
});

type Init = MessageInitShape<typeof InstanceMetadataSchema>;
const VPC = "vpc-0123456789ab";
const VPC2 = "vpc-ba9876543210";
/** The hypervisor whose gateway these calls go to. */
const HOST = "hv1";

function md(over: Init = {}): Init {
  const base: Init = {
    instanceId: "vm-1",
    vpcId: VPC,
    subnetId: "subnet-aaaaaaaaaaaa",
    localIpv4: "10.0.1.5",
    mac: "02:00:0A:00:01:05",
    hostname: "web-1",
    securityGroupNames: ["web"],
    securityGroupIds: ["sg-0123456789ab"],
    placement: { availabilityZone: "microvpc-1a", region: "microvpc-1" },
    publicKeys: [{ name: "alice", opensshKey: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI alice@laptop" }],
    userData: new TextEncoder().encode("#cloud-config\n"),
    instanceType: "qemu.1x256",
    tags: [{ key: "Name", value: "web one" }],
    options: { httpTokens: ImdsHttpTokens.REQUIRED, httpEndpoint: ImdsHttpEndpoint.ENABLED, httpPutResponseHopLimit: 2 },
  };
  return { ...base, ...over } as Init;
}

async function events(sinceId = "-"): Promise<Record<string, string>[]> {
  const entries = await r.xrange("mvpc:events", sinceId, "+");
  return entries.map(([, f]) => {
    const o: Record<string, string> = {};
    for (let i = 0; i < f.length; i += 2) o[f[i]] = f[i + 1];
    return o;
  });
}

describe("CRUD", () => {
  test("set creates, replaces; get by id and by vpc id, vpc name and address; delete", async () => {
    const set = await gw.setInstanceMetadata({ metadata: md() });
    assert.equal(set.created, true);
    assert.equal(set.metadata?.mac, "02:00:0a:00:01:05", "MAC stored lower case");
    assert.ok(set.metadata?.updateTime, "update_time set by the server");
    assert.equal(set.metadata?.options?.httpPutResponseHopLimit, 2);

    const byId = (await gw.getInstanceMetadata({ instanceId: "vm-1" })).metadata!;
    assert.equal(byId.hostname, "web-1");
    assert.deepEqual(byId.userData, new TextEncoder().encode("#cloud-config\n"));
    assert.equal(byId.publicKeys[0].name, "alice");
    assert.equal(byId.tags[0].value, "web one");
    assert.equal(byId.options?.httpTokens, ImdsHttpTokens.REQUIRED);
    const byAddr = (await gw.getInstanceMetadata({ vpc: VPC, address: "10.0.1.5" })).metadata!;
    assert.equal(byAddr.instanceId, "vm-1");

    // A VPC by name resolves through IPAM's index.
    const vpc = (await vpcs.createVpc({ name: "prod", cidr: "10.9.0.0/16" })).vpc!;
    await gw.setInstanceMetadata({ metadata: md({ instanceId: "vm-named", vpcId: vpc.id, localIpv4: "10.9.0.5" }) });
    assert.equal((await gw.getInstanceMetadata({ vpc: "prod", address: "10.9.0.5" })).metadata?.instanceId, "vm-named");
    await rejectsWith(gw.getInstanceMetadata({ vpc: "nope", address: "10.9.0.5" }), Code.NotFound, /vpc "nope" not found/);

    const again = await gw.setInstanceMetadata({ metadata: md({ hostname: "web-1b" }) });
    assert.equal(again.created, false);
    assert.equal((await gw.getInstanceMetadata({ instanceId: "vm-1" })).metadata?.hostname, "web-1b");

    assert.deepEqual(await store.list({ limit: 10 }).then((l) => l.map((m) => m.instanceId)), ["vm-1", "vm-named"]);
    assert.deepEqual(await store.list({ vpcId: vpc.id, limit: 10 }).then((l) => l.map((m) => m.instanceId)), ["vm-named"]);

    const del = await gw.deleteInstanceMetadata({ instanceId: "vm-1" });
    assert.equal(del.deleted, true);
    assert.equal((await gw.deleteInstanceMetadata({ instanceId: "vm-1" })).deleted, false);
    await rejectsWith(gw.getInstanceMetadata({ instanceId: "vm-1" }), Code.NotFound, /vm-1/);
    await rejectsWith(gw.getInstanceMetadata({ vpc: VPC, address: "10.0.1.5" }), Code.NotFound);
    await gw.deleteInstanceMetadata({ instanceId: "vm-named" });
    assert.equal((await store.hopLimits()).size, 0);
  });

  test("the (vpc, address) index: one instance per address; the same address in another VPC is another instance", async () => {
    await gw.setInstanceMetadata({ metadata: md({ instanceId: "vm-a" }) });
    await rejectsWith(
      gw.setInstanceMetadata({ metadata: md({ instanceId: "vm-b" }) }),
      Code.FailedPrecondition,
      /instance vm-a already holds 10\.0\.1\.5 in vpc-0123456789ab/,
    );
    await gw.setInstanceMetadata({ metadata: md({ instanceId: "vm-b", vpcId: VPC2 }) });
    assert.equal((await gw.getInstanceMetadata({ vpc: VPC, address: "10.0.1.5" })).metadata?.instanceId, "vm-a");
    assert.equal((await gw.getInstanceMetadata({ vpc: VPC2, address: "10.0.1.5" })).metadata?.instanceId, "vm-b");

    // Moving vm-a to another address frees the old one, keeps the index right.
    await gw.setInstanceMetadata({ metadata: md({ instanceId: "vm-a", localIpv4: "10.0.1.6", options: {} }) });
    await rejectsWith(gw.getInstanceMetadata({ vpc: VPC, address: "10.0.1.5" }), Code.NotFound);
    await gw.setInstanceMetadata({ metadata: md({ instanceId: "vm-c" }) });
    const hops = await store.hopLimits();
    assert.deepEqual(Object.fromEntries(hops), { [`${VPC}/10.0.1.6`]: 1, [`${VPC2}/10.0.1.5`]: 2, [`${VPC}/10.0.1.5`]: 2 });
    for (const id of ["vm-a", "vm-b", "vm-c"]) await gw.deleteInstanceMetadata({ instanceId: id });
    assert.equal(await r.exists(store.keys.byAddr, store.keys.hop, store.keys.all), 0, "indexes empty again");
    assert.equal(await r.sismember(MD_HOSTS, HOST), 0, "a host without records leaves the host index");
  });

  test("events: gw.metadata.set (with the old address on a move) and gw.metadata.deleted with revoked tokens", async () => {
    const last = await r.xrevrange("mvpc:events", "+", "-", "COUNT", 1);
    const since = last.length ? `(${last[0][0]}` : "-";
    await gw.setInstanceMetadata({ metadata: md({ instanceId: "vm-e" }) });
    await gw.setInstanceMetadata({ metadata: md({ instanceId: "vm-e", localIpv4: "10.0.1.7" }) });
    assert.equal(await store.recordToken("vm-e", VPC, "10.0.1.7", "00112233445566778899aabb", Date.now() + 60_000), true);
    assert.equal(await store.recordToken("vm-e", VPC, "10.0.1.5", "ffff2233445566778899aabb", Date.now() + 60_000), false, "not at its old address");
    const del = await gw.deleteInstanceMetadata({ instanceId: "vm-e" });
    assert.equal(del.tokensRevoked, 1);
    const ev = (await events(since)).filter((e) => e.kind.startsWith("gw.metadata."));
    assert.deepEqual(ev, [
      { kind: "gw.metadata.set", host: HOST, instance: "vm-e", vpc: VPC, address: "10.0.1.5", hop_limit: "2", created: "1" },
      {
        kind: "gw.metadata.set",
        host: HOST,
        instance: "vm-e",
        vpc: VPC,
        address: "10.0.1.7",
        hop_limit: "2",
        created: "0",
        old_vpc: VPC,
        old_address: "10.0.1.5",
      },
      { kind: "gw.metadata.deleted", host: HOST, instance: "vm-e", vpc: VPC, address: "10.0.1.7", tokens_revoked: "1" },
    ]);
  });
});

describe("keys of one host; the control plane's view of every host", () => {
  test("records are under mvpc-md:{host:<host>}:, the host is in the index, and another host's store does not see them", async () => {
    await gw.setInstanceMetadata({ metadata: md({ instanceId: "vm-k" }) });
    assert.ok(await r.exists(`mvpc-md:{host:${HOST}}:inst:vm-k`));
    assert.equal(await r.hget(`mvpc-md:{host:${HOST}}:byaddr`, `${VPC}/10.0.1.5`), "vm-k");
    assert.deepEqual(await r.smembers(MD_HOSTS), [HOST]);
    assert.equal((await r.keys("mvpc:gw:md:*")).length, 0, "nothing in the old shared layout");
    const other = new MetadataStore(r, "hv2");
    assert.equal(await other.get("vm-k"), null);
    assert.equal(await other.getByAddress(VPC, "10.0.1.5"), null);
    assert.equal((await other.hopLimits()).size, 0);
    assert.equal(await other.resolveCaller(VPC, "10.0.1.5", "", ""), null);
    assert.equal((await other.delete("vm-k")).deleted, false, "another host cannot delete it through its store");
    assert.ok(await store.get("vm-k"));
    await gw.deleteInstanceMetadata({ instanceId: "vm-k" });
  });

  test("FleetMetadataStore (gateway --api-only): Get, List and Delete across hosts; Set refused", async () => {
    const hv2 = new MetadataStore(r, "hv2");
    const fleet = new FleetMetadataStore(r);
    const ctl = createClient(
      GatewayService,
      createRouterTransport((router) => router.service(GatewayService, new MetadataApi(fleet).impl), { router: { interceptors: [mapDomainErrors] } }),
    );
    await store.set(create(InstanceMetadataSchema, md({ instanceId: "vm-f1" })));
    await hv2.set(create(InstanceMetadataSchema, md({ instanceId: "vm-f2", localIpv4: "10.0.1.9" })));
    assert.deepEqual(await fleet.hosts(), [HOST, "hv2"].sort());
    await rejectsWith(ctl.setInstanceMetadata({ metadata: md({ instanceId: "vm-f3" }) }), Code.FailedPrecondition, /--api-only.*that hypervisor's gateway/);
    assert.equal((await ctl.getInstanceMetadata({ instanceId: "vm-f2" })).metadata?.localIpv4, "10.0.1.9");
    assert.equal((await ctl.getInstanceMetadata({ vpc: VPC, address: "10.0.1.5" })).metadata?.instanceId, "vm-f1");
    await rejectsWith(ctl.getInstanceMetadata({ instanceId: "vm-nope" }), Code.NotFound);
    assert.deepEqual(
      (await fleet.list({ limit: 10 })).map((m) => m.instanceId),
      ["vm-f1", "vm-f2"],
    );
    assert.deepEqual(
      (await fleet.list({ after: "vm-f1", limit: 10 })).map((m) => m.instanceId),
      ["vm-f2"],
    );
    // The same instance on two hosts (a stale record): Get says where, Delete removes both.
    await hv2.set(create(InstanceMetadataSchema, md({ instanceId: "vm-f1", localIpv4: "10.0.1.10" })));
    await rejectsWith(ctl.getInstanceMetadata({ instanceId: "vm-f1" }), Code.FailedPrecondition, /on 2 hypervisors \(hv1, hv2\)/);
    assert.deepEqual(
      (await fleet.list({ limit: 1 })).map((m) => m.instanceId),
      ["vm-f1", "vm-f1"],
      "a page does not end between them",
    );
    assert.equal((await ctl.deleteInstanceMetadata({ instanceId: "vm-f1" })).deleted, true);
    assert.equal(await store.get("vm-f1"), null);
    assert.equal(await hv2.get("vm-f1"), null);
    assert.equal((await ctl.deleteInstanceMetadata({ instanceId: "vm-f2" })).deleted, true);
    assert.deepEqual(await r.smembers(MD_HOSTS), []);
    // A forged host index entry is not a host: reported and skipped.
    await r.sadd(MD_HOSTS, "../x*");
    assert.deepEqual(await fleet.hosts(), []);
    await r.del(MD_HOSTS);
  });

  test("adoptLegacy: records of the shared layout whose address is a NIC of this host move to its keys", async () => {
    const old = (m: Init) => Buffer.from(toBinary(InstanceMetadataSchema, create(InstanceMetadataSchema, m))).toString("base64");
    // What an older version left: three instances, the first two at NICs of HOST.
    await r
      .multi()
      .hset(LEGACY_MK.inst("vm-l1"), "pb", old(md({ instanceId: "vm-l1", localIpv4: "10.0.2.1" })))
      .hset(LEGACY_MK.inst("vm-l2"), "pb", old(md({ instanceId: "vm-l2", localIpv4: "10.0.2.2" })))
      .hset(LEGACY_MK.inst("vm-l3"), "pb", old(md({ instanceId: "vm-l3", localIpv4: "10.0.2.3" })))
      .hset(LEGACY_MK.byAddr, `${VPC}/10.0.2.1`, "vm-l1", `${VPC}/10.0.2.2`, "vm-l2", `${VPC}/10.0.2.3`, "vm-l3")
      .hset(`mvpc:host:${HOST}:nicaddr`, `${VPC}/10.0.2.1`, "nic-000000000001", `${VPC}/10.0.2.2`, "nic-000000000002")
      .hset(`mvpc:host:hv2:nicaddr`, `${VPC}/10.0.2.3`, "nic-000000000003")
      .exec();
    // vm-l2 was already set again on this host: kept as it is.
    await store.set(create(InstanceMetadataSchema, md({ instanceId: "vm-l2", localIpv4: "10.0.2.2", hostname: "newer" })));
    const res = await store.adoptLegacy();
    assert.deepEqual(res, { adopted: ["vm-l1"], skipped: [] });
    assert.equal((await store.getByAddress(VPC, "10.0.2.1"))?.instanceId, "vm-l1");
    assert.equal((await store.get("vm-l2"))?.hostname, "newer");
    assert.equal(await store.get("vm-l3"), null, "not this host's NIC");
    assert.deepEqual((await new MetadataStore(r, "hv2").adoptLegacy()).adopted, ["vm-l3"]);
    assert.deepEqual((await store.adoptLegacy()).adopted, [], "done once");
    for (const id of ["vm-l1", "vm-l2"]) await store.delete(id);
    await new MetadataStore(r, "hv2").delete("vm-l3");
    await r.del(
      LEGACY_MK.inst("vm-l1"),
      LEGACY_MK.inst("vm-l2"),
      LEGACY_MK.inst("vm-l3"),
      LEGACY_MK.byAddr,
      `mvpc:host:${HOST}:nicaddr`,
      "mvpc:host:hv2:nicaddr",
    );
  });
});

describe("bad input: INVALID_ARGUMENT naming the field, nothing stored", () => {
  const cases: [string, Init, RegExp][] = [
    ["instance id missing", { instanceId: "" }, /^metadata\.instance_id: is required/],
    ["instance id chars", { instanceId: "vm 1/../x" }, /^metadata\.instance_id: .* letters, digits and _ \. : -/],
    ["instance id length", { instanceId: "v".repeat(129) }, /^metadata\.instance_id/],
    ["vpc id", { vpcId: "prod" }, /^metadata\.vpc_id: "prod" is not a vpc id/],
    ["subnet id", { subnetId: "subnet-1" }, /^metadata\.subnet_id/],
    ["address", { localIpv4: "10.0.1.256" }, /^metadata\.local_ipv4: .* dotted-quad/],
    ["address missing", { localIpv4: "" }, /^metadata\.local_ipv4: is required/],
    ["mac missing", { mac: "" }, /^metadata\.mac: is required/],
    ["mac multicast", { mac: "01:00:00:00:00:01" }, /^metadata\.mac: .*multicast/],
    ["hostname missing", { hostname: "" }, /^metadata\.hostname: is required/],
    ["hostname bad label", { hostname: "web_1.internal" }, /^metadata\.hostname: .*not a DNS name/],
    ["hostname trailing dot", { hostname: "web-1." }, /^metadata\.hostname/],
    ["hostname too long", { hostname: `${"a".repeat(63)}.`.repeat(4) + "a" }, /^metadata\.hostname/],
    ["public ipv4", { publicIpv4: "1.2.3" }, /^metadata\.public_ipv4/],
    ["group name", { securityGroupNames: ["Web"] }, /^metadata\.security_group_names\[0\]: "Web" is not a valid name/],
    ["group name twice", { securityGroupNames: ["web", "web"] }, /^metadata\.security_group_names\[1\]: "web" appears twice/],
    [
      "too many group names",
      { securityGroupNames: Array.from({ length: 17 }, (_, i) => `g${i}`) },
      /^metadata\.security_group_names: has 17 names; a NIC has at most 16/,
    ],
    ["group id", { securityGroupIds: ["sg-xyz"] }, /^metadata\.security_group_ids\[0\]: "sg-xyz" is not a sg id/],
    ["zone", { placement: { availabilityZone: "Zone A" } }, /^metadata\.placement\.availability_zone/],
    ["region", { placement: { region: "r".repeat(64) } }, /^metadata\.placement\.region/],
    [
      "too many keys",
      { publicKeys: Array.from({ length: 33 }, (_, i) => ({ name: `k${i}`, opensshKey: "ssh-ed25519 AAAA" })) },
      /^metadata\.public_keys: has 33 keys; the limit is 32/,
    ],
    ["key name", { publicKeys: [{ name: "a b", opensshKey: "ssh-ed25519 AAAA" }] }, /^metadata\.public_keys\[0\]\.name/],
    [
      "key names clash",
      {
        publicKeys: [
          { name: "", opensshKey: "ssh-ed25519 AAAA" },
          { name: "key-0", opensshKey: "ssh-ed25519 AAAA" },
        ],
      },
      /^metadata\.public_keys\[1\]\.name: "key-0" names two keys/,
    ],
    ["key missing", { publicKeys: [{ name: "a", opensshKey: "" }] }, /^metadata\.public_keys\[0\]\.openssh_key: is required/],
    [
      "key two lines",
      { publicKeys: [{ name: "a", opensshKey: "ssh-ed25519 AAAA\nssh-ed25519 BBBB" }] },
      /^metadata\.public_keys\[0\]\.openssh_key: must be one line/,
    ],
    [
      "key options",
      { publicKeys: [{ name: "a", opensshKey: 'command="rm -rf /" ssh-ed25519 AAAA' }] },
      /^metadata\.public_keys\[0\]\.openssh_key: .*not an OpenSSH public key/,
    ],
    [
      "key too long",
      { publicKeys: [{ name: "a", opensshKey: `ssh-rsa ${"A".repeat(16400)}` }] },
      /^metadata\.public_keys\[0\]\.openssh_key: is 16408 characters long; the limit is 16384/,
    ],
    ["user data", { userData: new Uint8Array(16385) }, /^metadata\.user_data: is 16385 bytes; the limit is 16384/],
    ["instance type", { instanceType: "a\nb" }, /^metadata\.instance_type/],
    ["instance type long", { instanceType: "t".repeat(64) }, /^metadata\.instance_type/],
    ["too many tags", { tags: Array.from({ length: 51 }, (_, i) => ({ key: `k${i}`, value: "v" })) }, /^metadata\.tags: has 51 tags; the limit is 50/],
    ["tag key", { tags: [{ key: "a/b", value: "v" }] }, /^metadata\.tags\[0\]\.key/],
    ["tag key ..", { tags: [{ key: "..", value: "v" }] }, /^metadata\.tags\[0\]\.key: "\.\." cannot be served/],
    [
      "tag twice",
      {
        tags: [
          { key: "a", value: "1" },
          { key: "a", value: "2" },
        ],
      },
      /^metadata\.tags\[1\]\.key: "a" appears twice/,
    ],
    ["tag value", { tags: [{ key: "a", value: "x\ny" }] }, /^metadata\.tags\[0\]\.value/],
    ["hop 0", { options: { httpPutResponseHopLimit: 0 } }, /^metadata\.options\.http_put_response_hop_limit: 0 is out of range; use 1–64/],
    ["hop 65", { options: { httpPutResponseHopLimit: 65 } }, /^metadata\.options\.http_put_response_hop_limit: 65/],
    ["tokens enum", { options: { httpTokens: 7 as ImdsHttpTokens } }, /^metadata\.options\.http_tokens: 7 is not/],
    ["endpoint enum", { options: { httpEndpoint: 9 as ImdsHttpEndpoint } }, /^metadata\.options\.http_endpoint: 9 is not/],
  ];
  for (const [what, over, re] of cases) {
    test(what, async () => {
      await rejectsWith(gw.setInstanceMetadata({ metadata: md({ instanceId: "vm-bad", ...over }) }), Code.InvalidArgument, re);
      assert.equal(await store.get("vm-bad"), null);
    });
  }

  test("limits themselves are accepted", async () => {
    const full = md({
      instanceId: "vm-max",
      userData: new Uint8Array(16384),
      publicKeys: Array.from({ length: 32 }, (_, i) => ({ name: "", opensshKey: `ssh-ed25519 ${"A".repeat(100 + i)} k${i}` })),
      tags: Array.from({ length: 50 }, (_, i) => ({ key: `k${i}`, value: "v".repeat(255) })),
      securityGroupNames: Array.from({ length: 16 }, (_, i) => `g${i}`),
      options: { httpPutResponseHopLimit: 64 },
      hostname: `${"a".repeat(63)}.${"b".repeat(63)}.${"c".repeat(63)}.${"d".repeat(61)}`,
    });
    const res = await gw.setInstanceMetadata({ metadata: full });
    assert.equal(res.metadata?.publicKeys.length, 32);
    assert.equal(await store.tokenHopLimitOf(VPC, "10.0.1.5"), 64);
    await gw.deleteInstanceMetadata({ instanceId: "vm-max" });
  });

  test("request shape", async () => {
    await rejectsWith(gw.setInstanceMetadata({}), Code.InvalidArgument, /^metadata: is required/);
    await rejectsWith(gw.getInstanceMetadata({}), Code.InvalidArgument, /^instance_id: is required, unless vpc and address/);
    await rejectsWith(gw.getInstanceMetadata({ instanceId: "vm-1", vpc: VPC }), Code.InvalidArgument, /^instance_id: give either/);
    await rejectsWith(gw.getInstanceMetadata({ vpc: VPC }), Code.InvalidArgument, /^address: is required with vpc/);
    await rejectsWith(gw.getInstanceMetadata({ address: "10.0.0.1" }), Code.InvalidArgument, /^vpc: is required with address/);
    await rejectsWith(gw.getInstanceMetadata({ vpc: VPC, address: "10.0.0" }), Code.InvalidArgument, /^address: /);
    await rejectsWith(gw.getInstanceMetadata({ vpc: "Bad Name", address: "10.0.0.1" }), Code.InvalidArgument, /^vpc: /);
    await rejectsWith(gw.getInstanceMetadata({ instanceId: "a b" }), Code.InvalidArgument, /^instance_id: /);
    await rejectsWith(gw.deleteInstanceMetadata({}), Code.InvalidArgument, /^instance_id: is required/);
    await rejectsWith(gw.deleteInstanceMetadata({ instanceId: "x/y" }), Code.InvalidArgument, /^instance_id: /);
  });

  test("calls of the data plane's half are not answered by this impl", async () => {
    await rejectsWith(gw.listNatGateways({}), Code.Unimplemented);
  });
});

test("records round-trip whole", async () => {
  const input = create(InstanceMetadataSchema, md({ instanceId: "vm-rt", userData: new Uint8Array([0, 255, 1, 128]) }));
  await gw.setInstanceMetadata({ metadata: input });
  const got = (await gw.getInstanceMetadata({ instanceId: "vm-rt" })).metadata!;
  delete got.updateTime;
  input.mac = input.mac.toLowerCase();
  assert.deepEqual(got, input);
  await gw.deleteInstanceMetadata({ instanceId: "vm-rt" });
});
