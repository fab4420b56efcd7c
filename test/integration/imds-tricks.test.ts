// The metadata service (IMDS) against a VM that tries to read another VM's
// record, with real VMs (namespaces) and raw HTTP on the wire: headers that
// name another caller (X-Forwarded-For, Forwarded, X-Real-IP, …), a Host or
// an absolute-form target naming another VM, path tricks (dot segments,
// percent-encoding, double slashes), pipelining, very long paths and headers,
// another VM's IMDSv2 token, and a VM of another VPC at the same address.
// The caller is the socket (VPC namespace of arrival + anti-spoofed source
// address; services/gateway/imds.ts): every request of VM A gets A's own
// data or an error, never B's. The allowed flow (A reading its own record)
// is asserted in the same tests.
import assert from "node:assert/strict";
import { afterAll, beforeAll, describe, test } from "vitest";
import { FirewallService } from "../../gen/microvpc/v1/firewall_pb.js";
import { GatewayService } from "../../gen/microvpc/v1/gateway_pb.js";
import { SubnetType } from "../../gen/microvpc/v1/subnet_pb.js";
import { grpcClient } from "../../services/common/client.js";
import { type Daemon } from "../lib/daemon.js";
import { Harness, type Vm } from "../lib/harness.js";
import { nsExec, waitFor } from "../lib/netns.js";

let h: Harness;
let gwd: Daemon;
let fwd: Daemon;
/** A and B share a subnet of VPC X; C (same address as A) and D (same as B, no record) are in VPC Y, same CIDR. */
let a: Vm, b: Vm, c: Vm, d: Vm;

const SECRET_B = "user-data-of-b-7f3a";
const SECRET_A = "user-data-of-a-19c2";
const SECRET_C = "user-data-of-c-5e80";

/**
 * Sends raw HTTP requests, one connection each (in order), to
 * 169.254.169.254:80 from inside a namespace; returns each connection's whole
 * answer, its first status and its first body.
 */
const RAW_CLIENT = `
const net = require("node:net");
const reqs = JSON.parse(require("node:fs").readFileSync(0, "utf8"));
(async () => {
  const out = [];
  for (const raw of reqs) {
    out.push(await new Promise((resolve) => {
      const s = net.connect(80, "169.254.169.254");
      let buf = Buffer.alloc(0);
      const t = setTimeout(() => s.destroy(), 4000);
      s.on("connect", () => s.write(raw, "latin1"));
      s.on("data", (d) => (buf = Buffer.concat([buf, d])));
      s.on("error", () => undefined);
      s.on("close", () => {
        clearTimeout(t);
        const text = buf.toString("latin1");
        const m = /^HTTP\\/1\\.[01] (\\d{3})/.exec(text);
        const i = text.indexOf("\\r\\n\\r\\n");
        const head = i >= 0 ? text.slice(0, i) : text;
        const len = /\\r\\ncontent-length: *(\\d+)/i.exec(head);
        const body = i >= 0 ? text.slice(i + 4, len ? i + 4 + Number(len[1]) : undefined) : "";
        resolve({ status: m ? Number(m[1]) : 0, body, raw: text });
      });
    }));
  }
  process.stdout.write(JSON.stringify(out));
})();
`;

interface Answer {
  status: number;
  body: string;
  raw: string;
}

async function raw(vm: Vm, reqs: string[]): Promise<Answer[]> {
  const r = await nsExec(vm.ns, process.execPath, ["-e", RAW_CLIENT], { input: JSON.stringify(reqs), timeoutMs: 60_000 });
  return JSON.parse(r.stdout) as Answer[];
}

/** A GET with the given target and extra header lines (Host first if given, else 169.254.169.254). */
function get(target: string, headers: string[] = [], method = "GET"): string {
  const host = headers.some((l) => /^host:/i.test(l)) ? [] : ["Host: 169.254.169.254"];
  return [`${method} ${target} HTTP/1.1`, ...host, ...headers, "Connection: close", "", ""].join("\r\n");
}

/** Nothing of VM B's record (instance id, hostname, address, user data, MAC) is in an answer to another VM. */
function assertNoB(ans: Answer, what: string): void {
  for (const secret of ["i-imds-b", "host-b", SECRET_B, b.address, b.mac]) {
    assert.ok(!ans.raw.includes(secret), `${what}: the answer carries B's ${secret}:\n${ans.raw.slice(0, 600)}`);
  }
}

beforeAll(async () => {
  h = await Harness.start({ hosts: 1 });
  ({ fwd, gwd } = await h.hostServices(0, { driftMs: 3000 }));
  const gw = grpcClient(GatewayService, { address: gwd.address, timeoutMs: 20_000 });
  const fw = grpcClient(FirewallService, { address: fwd.address, timeoutMs: 20_000 });
  const vx = await h.vpc("imds-x", "10.6.0.0/16");
  const sx = await h.subnet(vx, "s", "10.6.1.0/24", SubnetType.PUBLIC);
  a = await h.vm(0, vx, sx, "a");
  b = await h.vm(0, vx, sx, "b");
  const vy = await h.vpc("imds-y", "10.6.0.0/16");
  const sy = await h.subnet(vy, "s", "10.6.1.0/24", SubnetType.PUBLIC);
  c = await h.vm(0, vy, sy, "c", { address: a.address });
  d = await h.vm(0, vy, sy, "d", { address: b.address });
  for (const vm of [a, b, c, d]) {
    await fw.bindNic({
      nicId: vm.nicId,
      vpc: vm.vpc.id,
      subnet: vm.subnet.id,
      address: vm.address,
      mac: vm.mac,
      hostInterface: vm.hostInterface,
      securityGroups: [],
    });
  }
  const md = (vm: Vm, id: string, host: string, userData: string) =>
    gw.setInstanceMetadata({
      metadata: {
        instanceId: id,
        vpcId: vm.vpc.id,
        subnetId: vm.subnet.id,
        localIpv4: vm.address,
        mac: vm.mac,
        hostname: host,
        userData: new TextEncoder().encode(userData),
      },
    });
  await md(a, "i-imds-a", "host-a", SECRET_A);
  await md(b, "i-imds-b", "host-b", SECRET_B);
  await md(c, "i-imds-c", "host-c", SECRET_C);
  // The allowed flow first: each VM with a record reads its own.
  const own = async (vm: Vm, id: string) => (await raw(vm, [get("/latest/meta-data/instance-id")]))[0].body === id;
  // Each VM's path (C's VPC has its own namespace and transit link) may reach
  // the kernel at a later gateway pass than A's: wait for each.
  for (const [vm, id, who] of [
    [a, "i-imds-a", "A"],
    [b, "i-imds-b", "B"],
    [c, "i-imds-c", "C"],
  ] as const)
    assert.ok(await waitFor(() => own(vm, id), { timeoutMs: 30_000, intervalMs: 500 }), `${who} reads its own instance id`);
}, 180_000);

afterAll(async () => {
  await gwd?.stop();
  await fwd?.stop();
  const root = h ? await h.rootChanges() : [];
  const left = await h?.close();
  assert.deepEqual(root, [], "the root namespace was not changed");
  assert.deepEqual(left, [], "no namespace of the run is left");
});

describe("IMDS: a VM reads its own record whatever the request says", () => {
  test("headers naming another caller (X-Forwarded-For, Forwarded, X-Real-IP, …) change nothing", async () => {
    const tricks = [
      [`X-Forwarded-For: ${b.address}`],
      [`X-Forwarded-For: ${b.address}, ${a.address}`],
      [`X-Forwarded-For: ${a.address}`, `X-Forwarded-For: ${b.address}`],
      [`Forwarded: for=${b.address}`],
      [`Forwarded: for="${b.address}:1234";proto=http;by=169.254.169.254`],
      [`X-Real-IP: ${b.address}`],
      [`X-Client-IP: ${b.address}`, `True-Client-IP: ${b.address}`, `CF-Connecting-IP: ${b.address}`, `X-Originating-IP: ${b.address}`],
      [`X-Forwarded-Host: ${b.address}`, `X-Original-URL: /latest/meta-data/instance-id`, `X-Rewrite-URL: /latest/user-data`],
      [`X-aws-ec2-metadata-instance-id: i-imds-b`, `X-Vpc-Id: ${b.vpc.id}`],
    ];
    const targets = ["/latest/meta-data/instance-id", "/latest/meta-data/local-ipv4", "/latest/user-data", "/latest/meta-data/hostname"];
    const want = ["i-imds-a", a.address, SECRET_A, "host-a"];
    const reqs = tricks.flatMap((t) => targets.map((p) => get(p, t)));
    const got = await raw(a, reqs);
    got.forEach((ans, i) => {
      const what = `${targets[i % targets.length]} with ${JSON.stringify(tricks[Math.floor(i / targets.length)])}`;
      assertNoB(ans, what);
      assert.equal(ans.status, 200, `${what}: ${ans.raw.slice(0, 200)}`);
      assert.equal(ans.body, want[i % targets.length], what);
    });
  });

  test("a Host naming another VM, the hypervisor or nothing, and absolute-form targets naming B, change nothing", async () => {
    const reqs = [
      get("/latest/meta-data/instance-id", [`Host: ${b.address}`]),
      get("/latest/meta-data/instance-id", [`Host: ${b.address}:80`]),
      get("/latest/meta-data/instance-id", ["Host: host-b"]),
      get("/latest/meta-data/instance-id", ["Host: i-imds-b.internal"]),
      get("/latest/meta-data/instance-id", ["Host: 127.0.0.1"]),
      get("/latest/meta-data/instance-id", ["Host: 169.254.169.254", `Host: ${b.address}`]),
      ["GET /latest/meta-data/instance-id HTTP/1.0", "", ""].join("\r\n"),
      get(`http://${b.address}/latest/meta-data/instance-id`),
      get(`http://${b.address}:80/latest/meta-data/instance-id`, [`Host: ${b.address}`]),
      get(`http://i-imds-b/latest/meta-data/instance-id`),
      get(`http://169.254.169.254/latest/meta-data/instance-id`),
      get(`http://${b.address}@169.254.169.254/latest/meta-data/instance-id`),
      get(`http://169.254.169.254@${b.address}/latest/meta-data/instance-id`),
    ];
    for (const [i, ans] of (await raw(a, reqs)).entries()) {
      const what = reqs[i].split("\r\n").slice(0, 3).join(" | ");
      assertNoB(ans, what);
      // Either A's own id, or an error (a duplicated Host may be refused): never B's.
      assert.ok((ans.status === 200 && ans.body === "i-imds-a") || ans.status >= 400 || ans.status === 0, `${what}: ${ans.status} ${ans.body}`);
      if (i !== 5) assert.equal(ans.body, "i-imds-a", `${what}: ${ans.status}`);
    }
  });

  test("path tricks: dot segments, percent-encoding, double slashes, a pipelined second request, huge paths and headers", async () => {
    const paths = [
      "/latest/meta-data/../meta-data/instance-id",
      "/latest/meta-data/./instance-id",
      "/latest/meta-data/%2e%2e/meta-data/instance-id",
      "/latest/meta-data/%2E%2E/%2E%2E/latest/user-data",
      "/latest/meta-data/..%2f..%2flatest/user-data",
      "/latest/meta-data/instance-id%00",
      "/%6catest/meta-data/instance-id",
      "//latest/meta-data/instance-id",
      "/latest//meta-data/instance-id",
      "//169.254.169.254/latest/meta-data/instance-id",
      `//${b.address}/latest/meta-data/instance-id`,
      "/latest/meta-data/instance-id/..",
      "/latest/meta-data/instance-id?vpc=" + b.vpc.id + "&address=" + b.address,
      "/latest/meta-data/instance-id#" + b.address,
      "/latest\\meta-data\\instance-id",
      "/../../../latest/meta-data/instance-id",
      "*",
      "/" + "a/".repeat(3000) + "instance-id",
    ];
    const reqs = [
      ...paths.map((p) => get(p)),
      get("/latest/meta-data/instance-id", [`X-Long: ${"x".repeat(9000)}`]),
      get(
        "/latest/meta-data/instance-id",
        Array.from({ length: 300 }, (_, i) => `X-H${i}: ${b.address}`),
      ),
      // Pipelined: the second request of the connection names B every way it can.
      [
        "GET /latest/meta-data/instance-id HTTP/1.1",
        "Host: 169.254.169.254",
        "",
        `GET http://${b.address}/latest/meta-data/local-ipv4 HTTP/1.1`,
        `Host: ${b.address}`,
        `X-Forwarded-For: ${b.address}`,
        "Connection: close",
        "",
        "",
      ].join("\r\n"),
    ];
    const got = await raw(a, reqs);
    for (const [i, ans] of got.entries()) {
      const what = i < paths.length ? `path ${JSON.stringify(paths[i].slice(0, 80))}` : `request ${i}`;
      assertNoB(ans, what);
      assert.ok(!ans.raw.includes(SECRET_C) && !ans.raw.includes("i-imds-c"), `${what}: C's data`);
      if (ans.status === 200)
        assert.ok(
          ["i-imds-a", SECRET_A, a.address].some((x) => ans.body.startsWith(x)),
          `${what}: 200 with ${ans.body.slice(0, 100)}`,
        );
    }
    // Path tricks the server resolves are A's or 404, never a 2xx listing of something else; the huge ones are refused.
    assert.ok(
      got.slice(0, paths.length).every((x) => x.status === 200 || (x.status >= 400 && x.status < 500)),
      JSON.stringify(got.map((x) => x.status)),
    );
    assert.ok(got[paths.length - 1].status >= 400, "a 6 KB path is refused");
    assert.equal(got[paths.length].status, 431, "a 9 KB header is refused");
    assert.ok(got[paths.length + 1].status === 431 || got[paths.length + 1].body === "i-imds-a", "300 headers naming B");
    // The pipelined pair: A's id, then A's address.
    const pipe = got[paths.length + 2].raw;
    assert.ok(pipe.includes("i-imds-a") && pipe.includes(a.address), pipe.slice(0, 600));
  });

  test("another VM's IMDSv2 token reads nothing; a token PUT carrying X-Forwarded-For is refused", async () => {
    const put = (headers: string[] = []) => get("/latest/api/token", ["X-aws-ec2-metadata-token-ttl-seconds: 60", "Content-Length: 0", ...headers], "PUT");
    const [tokB] = await raw(b, [put()]);
    assert.equal(tokB.status, 200, tokB.raw.slice(0, 300));
    const [withB, xff, ownPut] = await raw(a, [
      get("/latest/meta-data/instance-id", [`X-aws-ec2-metadata-token: ${tokB.body}`]),
      put([`X-Forwarded-For: ${b.address}`]),
      put(),
    ]);
    assertNoB(withB, "B's token");
    assert.equal(withB.status, 401, "B's token is not A's");
    assert.equal(xff.status, 403, "a token PUT through a proxy (X-Forwarded-For) is refused");
    assert.equal(ownPut.status, 200);
    const [own] = await raw(a, [get("/latest/meta-data/instance-id", [`X-aws-ec2-metadata-token: ${ownPut.body}`])]);
    assert.equal(own.body, "i-imds-a", "A's own token reads A's record");
  });

  test("a VM of another VPC at the same address reads its own record, or nothing; never the other VPC's", async () => {
    const tricks = [[], [`X-Forwarded-For: ${a.address}`], [`Host: ${a.address}`], [`Forwarded: for=${b.address}`], [`X-Vpc-Id: ${a.vpc.id}`]];
    const targets = ["/latest/meta-data/instance-id", "/latest/user-data"];
    const reqs = tricks.flatMap((t) => targets.map((p) => get(p, t)));
    // C holds A's address in VPC Y and has its own record.
    for (const [i, ans] of (await raw(c, reqs)).entries()) {
      const what = `C: ${reqs[i].split("\r\n").slice(0, 3).join(" | ")}`;
      assert.ok(!ans.raw.includes("i-imds-a") && !ans.raw.includes(SECRET_A) && !ans.raw.includes("i-imds-b"), `${what}: ${ans.raw.slice(0, 300)}`);
      assert.equal(ans.body, i % 2 === 0 ? "i-imds-c" : SECRET_C, what);
    }
    // D holds B's address in VPC Y and has no record: nothing, whatever it says.
    for (const [i, ans] of (await raw(d, reqs)).entries()) {
      const what = `D: ${reqs[i].split("\r\n").slice(0, 3).join(" | ")}`;
      assertNoB(ans, what);
      assert.ok(!ans.raw.includes("i-imds-a") && !ans.raw.includes("i-imds-c"), `${what}: ${ans.raw.slice(0, 300)}`);
      assert.equal(ans.status, 404, what);
    }
  });
});
