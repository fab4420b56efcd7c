// IMDS over real HTTP on loopback, against a real redis-server. Two "VPCs":
// the server listens on 127.0.0.1 (host-side transit address of VPC A) and a
// second listener on 127.0.0.2 hands its connections to the same server (VPC
// B). A "VM" is a client bound to a loopback source address, so the VM
// 127.0.0.1 exists in both VPCs, as with overlapping CIDRs.
import assert from "node:assert/strict";
import { request, Agent, type IncomingHttpHeaders, type Server } from "node:http";
import { connect, createServer as createNetServer, type AddressInfo, type Server as NetServer } from "node:net";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { Redis } from "ioredis";
import { afterAll, beforeAll, describe, test } from "vitest";
import { ImdsHttpEndpoint, ImdsHttpTokens, InstanceMetadataSchema, type InstanceMetadata } from "../../gen/microvpc/v1/gateway_pb.js";
import { createImdsServer, parseTarget, type ImdsServer, type ImdsServerOptions } from "../../services/gateway/imds.js";
import { MetadataStore } from "../../services/gateway/metadata-store.js";
import { startRedis, type TestRedis } from "../lib/redis.js";

const VPC_A = "vpc-aaaaaaaaaaaa";
const VPC_B = "vpc-bbbbbbbbbbbb";
const TRANSIT: Record<string, string> = { "127.0.0.1": VPC_A, "127.0.0.2": VPC_B };
const silent = { debug() {}, info() {}, warn() {}, error() {} };
const KEY0 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDyp4f0Kq8zV0Vw3e3mA alice@laptop";
const KEY1 = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7== ops";
const USER_DATA = Buffer.concat([Buffer.from("#cloud-config\nruncmd: [echo hi]\n"), Buffer.from([0xff, 0x00, 0x80])]);

let redis: TestRedis;
let r: Redis;
let store: MetadataStore;

type Init = MessageInitShape<typeof InstanceMetadataSchema>;
function record(over: Init & { instanceId: string; vpcId: string; localIpv4: string; mac: string }): InstanceMetadata {
  return create(InstanceMetadataSchema, { hostname: over.instanceId, ...over });
}

interface Reply {
  status: number;
  headers: IncomingHttpHeaders;
  body: Buffer;
  text: string;
}

interface Listeners {
  imds: ImdsServer;
  portA: number;
  portB: number;
  portX: number;
  extra: NetServer[];
}

/** Starts an IMDS server on 127.0.0.1 plus listeners on 127.0.0.2 (VPC B) and 127.0.0.6 (no VPC). */
async function startImds(over: Partial<ImdsServerOptions> = {}): Promise<Listeners> {
  const imds = createImdsServer({
    lookupVpc: (a) => TRANSIT[a],
    store,
    publicIpOf: async (vpc, addr) => (vpc === VPC_A && addr === "127.0.0.1" ? "203.0.113.7" : undefined),
    rateLimitPerSecond: 10_000,
    burst: 10_000,
    logger: silent,
    ...over,
  });
  const listen = (s: Server | NetServer, host: string) => new Promise<number>((res) => s.listen(0, host, () => res((s.address() as AddressInfo).port)));
  const portA = await listen(imds.server, "127.0.0.1");
  const forward = () => createNetServer((sock) => imds.server.emit("connection", sock));
  const b = forward();
  const x = forward();
  const portB = await listen(b, "127.0.0.2");
  const portX = await listen(x, "127.0.0.6");
  return { imds, portA, portB, portX, extra: [b, x] };
}

async function stopImds(l: Listeners): Promise<void> {
  for (const s of l.extra) s.close();
  await l.imds.close();
}

let main: Listeners;

interface Call {
  /** Which transit address the request arrives on. */
  vpc?: "a" | "b" | "none";
  /** The VM's (source) address. */
  from?: string;
  method?: string;
  path: string;
  headers?: Record<string, string>;
  agent?: Agent;
  body?: string;
  on?: Listeners;
}

function call(c: Call): Promise<Reply> {
  const l = c.on ?? main;
  const vpc = c.vpc ?? "a";
  const host = vpc === "a" ? "127.0.0.1" : vpc === "b" ? "127.0.0.2" : "127.0.0.6";
  const port = vpc === "a" ? l.portA : vpc === "b" ? l.portB : l.portX;
  return new Promise((resolve, reject) => {
    const q = request(
      {
        host,
        port,
        localAddress: c.agent ? undefined : (c.from ?? "127.0.0.1"),
        method: c.method ?? "GET",
        path: c.path,
        headers: c.headers,
        agent: c.agent ?? false,
        setHost: false,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (d: Buffer) => chunks.push(d));
        res.on("end", () => {
          const body = Buffer.concat(chunks);
          resolve({ status: res.statusCode ?? 0, headers: res.headers, body, text: body.toString("utf8") });
        });
        res.on("error", reject);
      },
    );
    q.on("error", reject);
    q.end(c.body);
  });
}

const get = (path: string, o: Omit<Call, "path"> = {}) => call({ ...o, path });
async function token(o: Omit<Call, "path" | "method"> = {}, ttl = "60"): Promise<string> {
  const res = await call({ ...o, method: "PUT", path: "/latest/api/token", headers: { "X-aws-ec2-metadata-token-ttl-seconds": ttl, ...o.headers } });
  assert.equal(res.status, 200, `token PUT: ${res.status} ${res.text}`);
  return res.text;
}

beforeAll(async () => {
  redis = await startRedis({ persistence: false });
  r = new Redis(redis.url);
  store = new MetadataStore(r, "hv1");
  await store.set(
    record({
      instanceId: "vm-a1",
      vpcId: VPC_A,
      subnetId: "subnet-0a0a0a0a0a0a",
      localIpv4: "127.0.0.1",
      mac: "02:00:7f:00:00:01",
      hostname: "web-1.prod.internal",
      securityGroupNames: ["web", "ssh"],
      securityGroupIds: ["sg-111111111111", "sg-222222222222"],
      publicKeys: [
        { $typeName: "microvpc.v1.SshPublicKey", name: "alice", opensshKey: KEY0 },
        { $typeName: "microvpc.v1.SshPublicKey", name: "", opensshKey: KEY1 },
      ],
      userData: USER_DATA,
      instanceType: "qemu.1x256",
      tags: [
        { $typeName: "microvpc.v1.Label", key: "Name", value: "web one" },
        { $typeName: "microvpc.v1.Label", key: "team", value: "infra" },
      ],
    }),
  );
  await store.set(
    record({
      instanceId: "vm-a3",
      vpcId: VPC_A,
      localIpv4: "127.0.0.3",
      mac: "02:00:7f:00:00:03",
      publicIpv4: "198.51.100.3",
      placement: { $typeName: "microvpc.v1.Placement", availabilityZone: "zone-x", region: "reg-x" },
      options: {
        $typeName: "microvpc.v1.ImdsOptions",
        httpTokens: ImdsHttpTokens.REQUIRED,
        httpEndpoint: ImdsHttpEndpoint.ENABLED,
        httpPutResponseHopLimit: 3,
      },
    }),
  );
  await store.set(
    record({
      instanceId: "vm-a4",
      vpcId: VPC_A,
      localIpv4: "127.0.0.4",
      mac: "02:00:7f:00:00:04",
      options: { $typeName: "microvpc.v1.ImdsOptions", httpTokens: ImdsHttpTokens.OPTIONAL, httpEndpoint: ImdsHttpEndpoint.DISABLED },
    }),
  );
  await store.set(record({ instanceId: "vm-b1", vpcId: VPC_B, localIpv4: "127.0.0.1", mac: "02:00:7f:00:00:b1" }));
  main = await startImds();
});

afterAll(async () => {
  if (main) await stopImds(main);
  r?.disconnect();
  await redis?.stop();
});

describe("EC2 layout", () => {
  test("version list, /latest/ and the meta-data/ listing, with and without trailing slash", async () => {
    const root = await get("/");
    assert.equal(root.status, 200);
    assert.match(root.text, /^1\.0\n/);
    assert.match(root.text, /\n2009-04-04\n/);
    assert.match(root.text, /\nlatest$/);
    for (const p of ["/latest", "/latest/"]) assert.equal((await get(p)).text, "dynamic\nmeta-data\nuser-data", p);
    const md = await get("/latest/meta-data/");
    assert.equal(md.status, 200);
    assert.equal(md.headers["content-type"], "text/plain");
    assert.equal(
      md.text,
      [
        "hostname",
        "instance-id",
        "instance-type",
        "local-hostname",
        "local-ipv4",
        "mac",
        "network/",
        "placement/",
        "public-ipv4",
        "public-keys/",
        "security-groups",
        "tags/",
      ].join("\n"),
    );
    assert.equal((await get("/latest/meta-data")).text, md.text);
    // cloud-init probes dated versions first; they serve the same tree.
    assert.equal((await get("/2021-03-23/meta-data/instance-id")).text, "vm-a1");
    assert.equal((await get("/2009-04-04/meta-data/")).text, md.text);
  });

  test("leaves", async () => {
    const want: Record<string, string> = {
      "instance-id": "vm-a1",
      hostname: "web-1.prod.internal",
      "local-hostname": "web-1.prod.internal",
      "local-ipv4": "127.0.0.1",
      mac: "02:00:7f:00:00:01",
      "public-ipv4": "203.0.113.7",
      "security-groups": "web\nssh",
      "instance-type": "qemu.1x256",
      "placement/": "availability-zone\nregion",
      "placement/availability-zone": "microvpc-1a",
      "placement/region": "microvpc-1",
      "public-keys/": "0=alice\n1=key-1",
      "public-keys/0/": "openssh-key",
      "public-keys/0": "openssh-key",
      "public-keys/0/openssh-key": KEY0,
      "public-keys/1/openssh-key": KEY1,
      "network/": "interfaces/",
      "network/interfaces/": "macs/",
      "network/interfaces/macs/": "02:00:7f:00:00:01/",
      "network/interfaces/macs/02:00:7f:00:00:01/": "device-number\nlocal-ipv4s\nmac\npublic-ipv4s\nsecurity-group-ids\nsecurity-groups\nsubnet-id\nvpc-id",
      "network/interfaces/macs/02:00:7f:00:00:01/local-ipv4s": "127.0.0.1",
      "network/interfaces/macs/02:00:7f:00:00:01/mac": "02:00:7f:00:00:01",
      "network/interfaces/macs/02:00:7f:00:00:01/security-group-ids": "sg-111111111111\nsg-222222222222",
      "network/interfaces/macs/02:00:7f:00:00:01/subnet-id": "subnet-0a0a0a0a0a0a",
      "network/interfaces/macs/02:00:7f:00:00:01/vpc-id": VPC_A,
      "network/interfaces/macs/02:00:7f:00:00:01/device-number": "0",
      "network/interfaces/macs/02:00:7f:00:00:01/public-ipv4s": "203.0.113.7",
      "tags/": "instance/",
      "tags/instance/": "Name\nteam",
      "tags/instance/Name": "web one",
      "tags/instance/team": "infra",
    };
    for (const [p, v] of Object.entries(want)) {
      const res = await get(`/latest/meta-data/${p}`);
      assert.equal(res.status, 200, p);
      assert.equal(res.text, v, p);
    }
  });

  test("user-data verbatim (bytes), identity document, HEAD", async () => {
    const ud = await get("/latest/user-data");
    assert.equal(ud.status, 200);
    assert.deepEqual(ud.body, USER_DATA);
    assert.equal(ud.headers["content-type"], "application/octet-stream");
    const doc = JSON.parse((await get("/latest/dynamic/instance-identity/document")).text);
    assert.deepEqual(doc, {
      availabilityZone: "microvpc-1a",
      instanceId: "vm-a1",
      instanceType: "qemu.1x256",
      privateIp: "127.0.0.1",
      region: "microvpc-1",
      version: "2017-09-30",
    });
    assert.equal((await get("/latest/dynamic/")).text, "instance-identity/");
    const head = await call({ method: "HEAD", path: "/latest/meta-data/instance-id" });
    assert.equal(head.status, 200);
    assert.equal(head.headers["content-length"], "5");
    assert.equal(head.body.length, 0);
  });

  test("a sparse record: no user-data (404), no public address, no keys, no tags; own placement", async () => {
    const tok = await token({ from: "127.0.0.3" });
    const h = { "X-aws-ec2-metadata-token": tok };
    assert.equal((await get("/latest/user-data", { from: "127.0.0.3", headers: h })).status, 404);
    assert.equal((await get("/latest/", { from: "127.0.0.3", headers: h })).text, "dynamic\nmeta-data");
    const md = (await get("/latest/meta-data/", { from: "127.0.0.3", headers: h })).text;
    assert.equal(md, "hostname\ninstance-id\nlocal-hostname\nlocal-ipv4\nmac\nnetwork/\nplacement/\npublic-ipv4");
    assert.equal((await get("/latest/meta-data/public-ipv4", { from: "127.0.0.3", headers: h })).text, "198.51.100.3");
    assert.equal((await get("/latest/meta-data/placement/availability-zone", { from: "127.0.0.3", headers: h })).text, "zone-x");
    assert.equal((await get("/latest/meta-data/placement/region", { from: "127.0.0.3", headers: h })).text, "reg-x");
    for (const p of ["public-keys/", "tags/instance/Name", "security-groups", "instance-type"]) {
      assert.equal((await get(`/latest/meta-data/${p}`, { from: "127.0.0.3", headers: h })).status, 404, p);
    }
    // VPC B's 127.0.0.1 has no floating IP: publicIpOf says none.
    assert.equal((await get("/latest/meta-data/public-ipv4", { vpc: "b" })).status, 404);
    assert.doesNotMatch((await get("/latest/meta-data/", { vpc: "b" })).text, /public-ipv4/);
  });

  test("unknown paths 404; leaves with a trailing slash 404; other methods 405", async () => {
    for (const p of [
      "/latest/meta-data/nope",
      "/latest/nope",
      "/nope/meta-data/",
      "/2099-01-01/meta-data/",
      "/latest//meta-data/",
      "/latest/meta-data/instance-id/",
      "/latest/meta-data/public-keys/2/openssh-key",
      "/latest/meta-data/tags/instance/nope",
      "/latest/meta-data/../meta-data/instance-id",
      "/latest/meta-data/%2e%2e/user-data",
      "/latest/user-data/",
      "/latest/api/token/",
      "/latest/dynamic/instance-identity/pkcs7",
    ]) {
      const res = await get(p);
      assert.equal(res.status, 404, p);
    }
    assert.equal((await call({ method: "POST", path: "/latest/meta-data/" })).status, 405);
    assert.equal((await call({ method: "DELETE", path: "/latest/meta-data/instance-id" })).status, 405);
    assert.equal((await call({ method: "PUT", path: "/latest/meta-data/instance-id", headers: { "X-aws-ec2-metadata-token-ttl-seconds": "60" } })).status, 405);
  });

  test("parseTarget", () => {
    assert.deepEqual(parseTarget("/latest/meta-data/?x=1"), { segs: ["latest", "meta-data"], trailingSlash: true });
    assert.deepEqual(parseTarget("http://evil.example/latest/user-data"), { segs: ["latest", "user-data"], trailingSlash: false });
    assert.equal(parseTarget("*"), null);
    assert.equal(parseTarget("/a//b"), null);
  });
});

describe("identity", () => {
  test("the same address in two VPCs reads two different instances", async () => {
    assert.equal((await get("/latest/meta-data/instance-id", { vpc: "a", from: "127.0.0.1" })).text, "vm-a1");
    assert.equal((await get("/latest/meta-data/instance-id", { vpc: "b", from: "127.0.0.1" })).text, "vm-b1");
    assert.equal((await get("/latest/meta-data/mac", { vpc: "b" })).text, "02:00:7f:00:00:b1");
    // VM A1's user data is not B1's.
    assert.equal((await get("/latest/user-data", { vpc: "b" })).status, 404);
  });

  test("Host, X-Forwarded-For, Forwarded and absolute-form targets change nothing", async () => {
    const tricks: Record<string, string>[] = [
      { Host: "169.254.169.254" },
      { Host: "127.0.0.2" },
      { "X-Forwarded-For": "127.0.0.3" },
      { "X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.3", Forwarded: "for=127.0.0.3" },
      { "X-aws-ec2-metadata-instance-id": "vm-b1", "X-Vpc-Id": VPC_B },
    ];
    for (const h of tricks) {
      assert.equal((await get("/latest/meta-data/instance-id", { vpc: "b", headers: h })).text, "vm-b1", JSON.stringify(h));
      assert.equal((await get("/latest/meta-data/instance-id", { vpc: "a", headers: h })).text, "vm-a1", JSON.stringify(h));
    }
    assert.equal((await get("http://127.0.0.3/latest/meta-data/instance-id", { vpc: "b" })).text, "vm-b1");
    // No Host header at all (HTTP/1.1 allows a server to refuse; IMDS answers).
    assert.equal((await get("/latest/meta-data/instance-id", { vpc: "b" })).status, 200);
  });

  test("unknown callers get 404 for everything", async () => {
    // 127.0.0.5 has no record in VPC A; 127.0.0.3 has none in VPC B.
    for (const c of [
      { vpc: "a" as const, from: "127.0.0.5" },
      { vpc: "b" as const, from: "127.0.0.3" },
      { vpc: "none" as const, from: "127.0.0.1" },
    ]) {
      for (const p of ["/", "/latest/meta-data/", "/latest/meta-data/instance-id", "/latest/user-data"]) {
        assert.equal((await get(p, c)).status, 404, `${JSON.stringify(c)} ${p}`);
      }
      const put = await call({ ...c, method: "PUT", path: "/latest/api/token", headers: { "X-aws-ec2-metadata-token-ttl-seconds": "60" } });
      assert.equal(put.status, 404);
    }
  });
});

describe("IMDSv2 tokens", () => {
  test("PUT mints a token; reads with it carry the remaining TTL", async () => {
    const res = await call({ method: "PUT", path: "/latest/api/token", headers: { "X-aws-ec2-metadata-token-ttl-seconds": "21600" } });
    assert.equal(res.status, 200);
    assert.equal(res.headers["x-aws-ec2-metadata-token-ttl-seconds"], "21600");
    assert.match(res.text, /^[A-Za-z0-9_-]{20,}$/);
    const md = await get("/latest/meta-data/instance-id", { headers: { "X-aws-ec2-metadata-token": res.text } });
    assert.equal(md.status, 200);
    assert.equal(md.text, "vm-a1");
    assert.ok(Number(md.headers["x-aws-ec2-metadata-token-ttl-seconds"]) >= 21598);
  });

  test("TTL bounds: 1–21600, else 400; a missing TTL is 400", async () => {
    for (const ttl of ["1", "21600", "300"]) await token({}, ttl);
    for (const ttl of ["0", "21601", "-1", "abc", "1.5", "", "99999999999"]) {
      const res = await call({ method: "PUT", path: "/latest/api/token", headers: { "X-aws-ec2-metadata-token-ttl-seconds": ttl } });
      assert.equal(res.status, 400, `ttl ${JSON.stringify(ttl)}`);
    }
    assert.equal((await call({ method: "PUT", path: "/latest/api/token" })).status, 400);
  });

  test("a GET with a TTL header is not a mint", async () => {
    const res = await get("/latest/api/token", { headers: { "X-aws-ec2-metadata-token-ttl-seconds": "60" } });
    assert.equal(res.status, 405);
    assert.equal(res.headers["x-aws-ec2-metadata-token-ttl-seconds"], undefined);
    const md = await get("/latest/meta-data/instance-id", { headers: { "X-aws-ec2-metadata-token-ttl-seconds": "60" } });
    assert.equal(md.text, "vm-a1");
    assert.equal(md.headers["x-aws-ec2-metadata-token-ttl-seconds"], undefined);
  });

  test("a PUT carrying X-Forwarded-For (or Forwarded) is refused with 403", async () => {
    const proxied: Record<string, string>[] = [{ "X-Forwarded-For": "10.0.0.9" }, { "X-Forwarded-For": "" }, { Forwarded: "for=10.0.0.9" }];
    for (const h of proxied) {
      const res = await call({ method: "PUT", path: "/latest/api/token", headers: { "X-aws-ec2-metadata-token-ttl-seconds": "60", ...h } });
      assert.equal(res.status, 403, JSON.stringify(h));
      assert.doesNotMatch(res.text, /^[A-Za-z0-9_-]{40,}$/);
    }
  });

  test("required mode: reads without a token are 401, with one 200; the token PUT needs none", async () => {
    assert.equal((await get("/latest/meta-data/instance-id", { from: "127.0.0.3" })).status, 401);
    assert.equal((await get("/latest/user-data", { from: "127.0.0.3" })).status, 401);
    assert.equal((await get("/", { from: "127.0.0.3" })).status, 401);
    const t = await token({ from: "127.0.0.3" });
    const ok = await get("/latest/meta-data/instance-id", { from: "127.0.0.3", headers: { "X-aws-ec2-metadata-token": t } });
    assert.equal(ok.status, 200);
    assert.equal(ok.text, "vm-a3");
  });

  test("invalid tokens are 401 in optional mode too", async () => {
    const good = await token();
    const flip = (t: string, i: number) => `${t.slice(0, i)}${t[i] === "A" ? "B" : "A"}${t.slice(i + 1)}`;
    // A flipped MAC, nonce or expiry character; a non-canonical last character
    // (its unused bits set) that decodes to the same bytes; junk.
    const b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    const sameBytes = `${good.slice(0, -1)}${b64[b64.indexOf(good.at(-1)!) + 1]}`;
    assert.deepEqual(Buffer.from(sameBytes, "base64url"), Buffer.from(good, "base64url"));
    assert.equal((await get("/latest/meta-data/instance-id", { headers: { "X-aws-ec2-metadata-token": good } })).status, 200);
    for (const bad of ["x", "A".repeat(50), flip(good, 40), flip(good, 20), flip(good, 5), sameBytes, `${good}=`, `${good},${good}`, ""]) {
      assert.equal((await get("/latest/meta-data/instance-id", { headers: { "X-aws-ec2-metadata-token": bad } })).status, 401, bad);
    }
  });

  test("a token of one VM does not work for another, even at the same address in another VPC", async () => {
    const tA1 = await token({ vpc: "a", from: "127.0.0.1" });
    const tB1 = await token({ vpc: "b", from: "127.0.0.1" });
    const tA3 = await token({ vpc: "a", from: "127.0.0.3" });
    const read = (vpc: "a" | "b", from: string, t: string) => get("/latest/meta-data/instance-id", { vpc, from, headers: { "X-aws-ec2-metadata-token": t } });
    assert.equal((await read("a", "127.0.0.1", tA1)).status, 200);
    assert.equal((await read("b", "127.0.0.1", tB1)).status, 200);
    assert.equal((await read("b", "127.0.0.1", tA1)).status, 401);
    assert.equal((await read("a", "127.0.0.1", tB1)).status, 401);
    assert.equal((await read("a", "127.0.0.3", tA1)).status, 401);
    assert.equal((await read("a", "127.0.0.1", tA3)).status, 401);
    // Spoofing headers do not help either.
    const spoof = await get("/latest/meta-data/instance-id", {
      vpc: "a",
      from: "127.0.0.3",
      headers: { "X-aws-ec2-metadata-token": tA1, "X-Forwarded-For": "127.0.0.1", Host: "127.0.0.1" },
    });
    assert.equal(spoof.status, 401);
  });

  test("tokens expire", async () => {
    const t = await token({}, "1");
    assert.equal((await get("/latest/meta-data/instance-id", { headers: { "X-aws-ec2-metadata-token": t } })).status, 200);
    await new Promise((res) => setTimeout(res, 1100));
    assert.equal((await get("/latest/meta-data/instance-id", { headers: { "X-aws-ec2-metadata-token": t } })).status, 401);
  });

  test("deleting the record revokes its tokens; a re-created record does not honour them", async () => {
    await store.set(record({ instanceId: "vm-a7", vpcId: VPC_A, localIpv4: "127.0.0.7", mac: "02:00:7f:00:00:07" }));
    const t = await token({ from: "127.0.0.7" });
    await token({ from: "127.0.0.7" });
    const h = { "X-aws-ec2-metadata-token": t };
    assert.equal((await get("/latest/meta-data/instance-id", { from: "127.0.0.7", headers: h })).status, 200);
    const del = await store.delete("vm-a7");
    assert.deepEqual(del, { deleted: true, tokensRevoked: 2 });
    assert.equal((await get("/latest/meta-data/instance-id", { from: "127.0.0.7", headers: h })).status, 404);
    await store.set(record({ instanceId: "vm-a7", vpcId: VPC_A, localIpv4: "127.0.0.7", mac: "02:00:7f:00:00:07" }));
    assert.equal((await get("/latest/meta-data/instance-id", { from: "127.0.0.7", headers: h })).status, 401);
    assert.equal((await get("/latest/meta-data/instance-id", { from: "127.0.0.7" })).text, "vm-a7");
  });

  test("changes to a record are served at once", async () => {
    await store.set(record({ instanceId: "vm-a8", vpcId: VPC_A, localIpv4: "127.0.0.8", mac: "02:00:7f:00:00:08", hostname: "before" }));
    assert.equal((await get("/latest/meta-data/hostname", { from: "127.0.0.8" })).text, "before");
    await store.set(record({ instanceId: "vm-a8", vpcId: VPC_A, localIpv4: "127.0.0.8", mac: "02:00:7f:00:00:08", hostname: "after" }));
    assert.equal((await get("/latest/meta-data/hostname", { from: "127.0.0.8" })).text, "after");
    await store.set(
      record({
        instanceId: "vm-a8",
        vpcId: VPC_A,
        localIpv4: "127.0.0.8",
        mac: "02:00:7f:00:00:08",
        options: { $typeName: "microvpc.v1.ImdsOptions", httpTokens: ImdsHttpTokens.REQUIRED, httpEndpoint: ImdsHttpEndpoint.UNSPECIFIED },
      }),
    );
    assert.equal((await get("/latest/meta-data/hostname", { from: "127.0.0.8" })).status, 401);
    await store.delete("vm-a8");
  });
});

describe("disabled endpoint", () => {
  test("every request of a disabled instance is 403, token PUT included", async () => {
    assert.equal((await get("/latest/meta-data/instance-id", { from: "127.0.0.4" })).status, 403);
    assert.equal((await get("/", { from: "127.0.0.4" })).status, 403);
    assert.equal(
      (await call({ from: "127.0.0.4", method: "PUT", path: "/latest/api/token", headers: { "X-aws-ec2-metadata-token-ttl-seconds": "60" } })).status,
      403,
    );
  });
});

describe("hop limits for the data plane", () => {
  test("every record's hop limit by vpc/address, default 1", async () => {
    const m = await store.hopLimits();
    assert.equal(m.get(`${VPC_A}/127.0.0.1`), 1);
    assert.equal(m.get(`${VPC_A}/127.0.0.3`), 3);
    assert.equal(m.get(`${VPC_B}/127.0.0.1`), 1);
    assert.equal(await store.tokenHopLimitOf(VPC_A, "127.0.0.3"), 3);
    assert.equal(await store.tokenHopLimitOf(VPC_A, "127.0.0.99"), undefined);
  });
});

// ---- bounds, on servers of their own so limits do not leak between tests ----

function rawExchange(
  l: Listeners,
  from: string,
  write: (s: ReturnType<typeof connect>) => void,
  timeoutMs: number,
): Promise<{ data: string; closedAfterMs: number }> {
  return new Promise((resolve, reject) => {
    const t0 = Date.now();
    const s = connect({ host: "127.0.0.1", port: l.portA, localAddress: from });
    let data = "";
    s.on("data", (d) => (data += d.toString("latin1")));
    s.on("error", () => {});
    s.on("close", () => {
      clearTimeout(timer);
      resolve({ data, closedAfterMs: Date.now() - t0 });
    });
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error(`connection still open after ${timeoutMs} ms; got ${JSON.stringify(data.slice(0, 200))}`));
    }, timeoutMs);
    s.on("connect", () => write(s));
  });
}

describe("bounds", () => {
  let lim: Listeners;
  beforeAll(async () => {
    lim = await startImds({
      rateLimitPerSecond: 20,
      burst: 40,
      maxConnectionsPerCaller: 4,
      headersTimeoutMs: 600,
      requestTimeoutMs: 1000,
      keepAliveTimeoutMs: 1000,
    });
  });
  afterAll(async () => {
    if (lim) await stopImds(lim);
  });

  test("headers over 8 KiB: 431 and closed", async () => {
    const res = await rawExchange(lim, "127.0.0.1", (s) => s.write(`GET /latest/meta-data/ HTTP/1.1\r\nX-Pad: ${"x".repeat(9000)}\r\n\r\n`), 3000);
    assert.match(res.data, /^HTTP\/1\.1 431/);
    // Many small headers add up the same way.
    const many = await rawExchange(
      lim,
      "127.0.0.1",
      (s) => s.write(`GET /latest/meta-data/ HTTP/1.1\r\n${"X-A: 0123456789012345678901234567890123456789\r\n".repeat(250)}\r\n`),
      3000,
    );
    assert.match(many.data, /^HTTP\/1\.1 431/);
  });

  test("bodies over 1 KiB, or chunked: 413", async () => {
    const big = await call({
      on: lim,
      method: "PUT",
      path: "/latest/api/token",
      headers: { "X-aws-ec2-metadata-token-ttl-seconds": "60", "Content-Length": "2000" },
      body: "x".repeat(2000),
    }).catch((e: Error) => e);
    if (!(big instanceof Error)) assert.equal(big.status, 413);
    const small = await call({
      on: lim,
      method: "PUT",
      path: "/latest/api/token",
      headers: { "X-aws-ec2-metadata-token-ttl-seconds": "60", "Content-Length": "10" },
      body: "0123456789",
    });
    assert.equal(small.status, 200);
    const chunked = await rawExchange(
      lim,
      "127.0.0.1",
      (s) => s.write("PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"),
      3000,
    );
    assert.match(chunked.data, /^HTTP\/1\.1 413/);
  });

  test("slow headers (slowloris) and silent connections are cut off", async () => {
    const slow = await rawExchange(
      lim,
      "127.0.0.1",
      (s) => {
        s.write("GET /latest/meta-data/ HTTP/1.1\r\n");
        const drip = setInterval(() => (s.writable ? s.write("X-A: b\r\n") : clearInterval(drip)), 100);
        s.on("close", () => clearInterval(drip));
      },
      5000,
    );
    assert.ok(slow.closedAfterMs < 3000, `closed after ${slow.closedAfterMs} ms`);
    assert.match(slow.data, /^HTTP\/1\.1 408/);
    const silent = await rawExchange(lim, "127.0.0.1", () => {}, 5000);
    assert.ok(silent.closedAfterMs < 3000, `closed after ${silent.closedAfterMs} ms`);
    assert.match(silent.data, /^HTTP\/1\.1 408/);
    // A slow body (headers complete) is cut at the request timeout.
    const slowBody = await rawExchange(
      lim,
      "127.0.0.1",
      (s) => {
        s.write("PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 1000\r\n\r\n");
        const drip = setInterval(() => (s.writable ? s.write("x") : clearInterval(drip)), 100);
        s.on("close", () => clearInterval(drip));
      },
      5000,
    );
    // (The body is ignored, so the token is answered at once; the connection
    // is cut when the rest of the body does not arrive in time.)
    assert.ok(slowBody.closedAfterMs < 3500, `closed after ${slowBody.closedAfterMs} ms`);
    assert.match(slowBody.data, /HTTP\/1\.1 408 Request Timeout/);
  });

  test("a flood from one VM gets 429 while other VMs (same address in another VPC, too) are served", async () => {
    const agent = new Agent({ keepAlive: true, maxSockets: 4, localAddress: "127.0.0.1" });
    const t0 = performance.now();
    const flood = Promise.all(
      Array.from({ length: 300 }, () => call({ on: lim, vpc: "a", path: "/latest/meta-data/instance-id", agent }).then((x) => x.status)),
    );
    const others: number[] = [];
    for (let i = 0; i < 10; i++) {
      others.push((await call({ on: lim, vpc: "b", from: "127.0.0.1", path: "/latest/meta-data/instance-id" })).status);
      others.push(
        (
          await call({
            on: lim,
            vpc: "a",
            from: "127.0.0.3",
            method: "PUT",
            path: "/latest/api/token",
            headers: { "X-aws-ec2-metadata-token-ttl-seconds": "5" },
          })
        ).status,
      );
    }
    const statuses = await flood;
    const seconds = (performance.now() - t0) / 1000;
    agent.destroy();
    const n429 = statuses.filter((s) => s === 429).length;
    const n200 = statuses.filter((s) => s === 200).length;
    assert.equal(n200 + n429, 300);
    // The bucket: 40 at once, then 20 a second.
    assert.ok(n200 >= 40 && n200 <= 40 + 20 * seconds + 2, `${n200} served in ${seconds.toFixed(2)} s`);
    assert.ok(n429 > 0);
    assert.deepEqual(others, Array(20).fill(200));
  });

  test("connections per caller are capped; other callers still connect", async () => {
    await new Promise((res) => setTimeout(res, 300));
    const t0 = Date.now();
    const socks = Array.from({ length: 8 }, () => connect({ host: "127.0.0.1", port: lim.portA, localAddress: "127.0.0.9" }));
    const closedAfter = await Promise.all(
      socks.map(
        (s) =>
          new Promise<number>((res) => {
            s.on("error", () => {});
            s.resume(); // read, or the server's FIN is never seen
            s.on("close", () => res(Date.now() - t0));
            setTimeout(() => res(Infinity), 4000);
          }),
      ),
    );
    // Four are closed on accept; the four admitted, silent, at the headers timeout (600 ms).
    const early = closedAfter.filter((ms) => ms < 450).length;
    assert.equal(early, 4, `closed after ${closedAfter.join(", ")} ms`);
    assert.ok(
      closedAfter.every((ms) => ms < 3000),
      `closed after ${closedAfter.join(", ")} ms`,
    );
    await new Promise((res) => setTimeout(res, 1100)); // refill the flooded buckets
    assert.equal((await call({ on: lim, vpc: "a", from: "127.0.0.1", path: "/latest/meta-data/instance-id" })).status, 200);
    for (const s of socks) s.destroy();
  });
});
