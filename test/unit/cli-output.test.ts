// The CLI's pure output and configuration pieces: the plain table, the
// key/value listing, label selectors, the configuration file's checks, the
// build header and the skew warnings of `microvpc version`, and help that
// prints each default once.
import assert from "node:assert/strict";
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import { test } from "vitest";
import { parse as yamlParse } from "yaml";
import { VpcSchema } from "../../gen/microvpc/v1/vpc_pb.js";
import { VPC_COLUMNS } from "../../cli/commands/vpc.js";
import { skewWarnings, versionTable } from "../../cli/commands/version.js";
import { buildProgram } from "../../cli/program.js";
import { ConfigError, parseConfig, selectContext } from "../../cli/lib/config.js";
import { report, requestIdOf } from "../../cli/lib/errors.js";
import { details, listTable, table, yaml } from "../../cli/lib/output.js";
import { matches, parseSelector } from "../../cli/lib/selector.js";
import { buildHeader, parseBuildHeader } from "../../services/common/version.js";

test("tables are plain: columns three spaces apart, no borders, no trailing blanks; --no-headers drops the header", () => {
  assert.equal(
    table(
      ["ID", "NAME", "CIDR"],
      [
        ["vpc-000000000001", "prod", "10.0.0.0/16"],
        ["vpc-000000000002", "dev", ""],
      ],
    ),
    ["ID                 NAME   CIDR", "vpc-000000000001   prod   10.0.0.0/16", "vpc-000000000002   dev"].join("\n"),
  );
  assert.equal(table(["A", "B"], [["x", "y"]], { headers: false }), "x   y");
  assert.equal(table(["A", "B"], [], { headers: false }), "");
  // Several values in a cell stay on its line.
  assert.equal(table(["A", "B"], [["a\nb", "c"]], { headers: false }), "a,b   c");
});

test("a known VPC list renders exactly; -o wide adds its columns", () => {
  const t = timestampFromDate(new Date("2026-01-02T03:04:05.000Z"));
  const vpcs = [
    create(VpcSchema, { id: "vpc-0123456789ab", name: "prod", cidr: "10.0.0.0/16", subnetCount: 2, labels: [{ key: "env", value: "prod" }], createTime: t }),
    create(VpcSchema, { id: "vpc-ba9876543210", name: "staging", cidr: "10.1.0.0/16", subnetCount: 0, createTime: t, description: "for tests" }),
  ];
  assert.equal(
    listTable(VPC_COLUMNS, vpcs),
    [
      "ID                 NAME      CIDR          SUBNETS   LABELS     CREATED",
      "vpc-0123456789ab   prod      10.0.0.0/16   2         env=prod   2026-01-02T03:04:05.000Z",
      "vpc-ba9876543210   staging   10.1.0.0/16   0                    2026-01-02T03:04:05.000Z",
    ].join("\n"),
  );
  const wide = listTable(VPC_COLUMNS, vpcs, true).split("\n");
  assert.match(wide[0], /CREATED\s+PUBLIC CIDR\s+DESCRIPTION$/);
  assert.match(wide[2], /\s+no\s+for tests$/);
});

test("details: one key per line, values aligned", () => {
  assert.equal(
    details([
      ["id", "vpc-1"],
      ["description", ""],
      ["cidr", "10.0.0.0/16"],
    ]),
    ["id:           vpc-1", "description:", "cidr:         10.0.0.0/16"].join("\n"),
  );
});

test("yaml output parses back to the same value", () => {
  const v = { vpcs: [{ id: "vpc-1", subnetCount: 2, labels: [{ key: "env", value: "prod" }], big: "18446744073709551615" }], nextPageToken: "" };
  assert.deepEqual(yamlParse(yaml(v)), v);
});

test("label selectors: =, ==, !=, key, !key, comma is AND", () => {
  const ls = [
    { key: "env", value: "prod" },
    { key: "tier", value: "web" },
  ];
  const yes = ["env=prod", "env==prod", "env=prod,tier=web", "tier", "!owner", "env!=dev", "owner!=x", " env = prod "];
  const no = ["env=dev", "env=prod,tier=db", "owner", "!env", "env!=prod", "env=prod,owner"];
  for (const s of yes) assert.ok(matches(parseSelector(s), ls), s);
  for (const s of no) assert.ok(!matches(parseSelector(s), ls), s);
  for (const bad of ["", "env=prod,", "=prod", "bad key=x", "a;b"]) assert.throws(() => parseSelector(bad), /selector|label/, bad);
});

test("the configuration file: contexts checked field by field; relative paths from the file's directory", () => {
  const cfg = parseConfig(
    `current-context: lab
contexts:
  - name: lab
    host: 10.0.0.5
    token-file: lab.token
    ca-cert: /etc/microvpc/ca.pem
  - name: prod
    server: https://ipam.prod:7401
    vmm: 10.1.0.5:7405
    insecure-send-token: false
`,
    "/home/op/.config/microvpc/config.yaml",
  );
  assert.deepEqual(selectContext(cfg, undefined), {
    name: "lab",
    host: "10.0.0.5",
    tokenFile: "/home/op/.config/microvpc/lab.token",
    caCert: "/etc/microvpc/ca.pem",
  });
  assert.equal(selectContext(cfg, "prod")?.server, "https://ipam.prod:7401");
  assert.throws(() => selectContext(cfg, "nosuch"), /context "nosuch" is not in .*\(contexts: lab, prod\)/);
  const bad: [string, RegExp][] = [
    ["contexts: [{name: a, sever: x:1}]", /context a: sever: unknown key/],
    ["contexts: [{name: a, host: '10.0.0.5:7401'}]", /host: --host takes a host without a port/],
    ["contexts: [{name: a, server: 'x y:1'}]", /server: expected HOST:PORT/],
    ["contexts: [{name: a, server: 'h:99999'}]", /server: expected HOST:PORT/],
    ["contexts: [{name: a, token-file: 5}]", /token-file: expected a non-empty string/],
    ["contexts: [{name: a, insecure-send-token: 'yes'}]", /expected true or false/],
    ["contexts: [{name: 'a b'}]", /name: expected a context name/],
    ["contexts: [{name: a}, {name: a}]", /defined twice/],
    ["current-context: b\ncontexts: [{name: a}]", /current-context b is not one of the contexts/],
    ["users: []", /unknown key "users"/],
    ["contexts: {a: 1}", /contexts: expected a list/],
    ["[1, 2]", /expected a mapping/],
    ["a: [", /not valid YAML/],
  ];
  for (const [text, re] of bad)
    assert.throws(
      () => parseConfig(text, "/c.yaml"),
      (e: unknown) => e instanceof ConfigError && re.test(e.message),
      text,
    );
});

test("x-microvpc-build: written and read back; skew is a different version or commit", () => {
  const cli = { version: "0.1.0", commit: "a".repeat(40), node: "v24.1.0" };
  const h = buildHeader(cli);
  assert.equal(h, `version=0.1.0; commit=${"a".repeat(40)}; node=v24.1.0`);
  assert.deepEqual(parseBuildHeader(h), cli);
  for (const bad of [null, "", "version=1", "version=1; commit=2; node=3; version=4", "version=1; commit=a b; node=3", `${h}, ${h}`]) {
    assert.equal(parseBuildHeader(bad), undefined, String(bad));
  }
  const same = { daemon: "ipam" as const, address: "127.0.0.1:7401", reachable: true, build: cli };
  const other = { daemon: "vmm" as const, address: "127.0.0.1:7405", reachable: true, build: { ...cli, commit: "b".repeat(40) } };
  const down = { daemon: "gateway" as const, address: "127.0.0.1:7404", reachable: false, error: "connection refused" };
  assert.deepEqual(skewWarnings(cli, [same, down]), []);
  assert.deepEqual(skewWarnings(cli, [same, other, down]), [
    "version skew: microvpcd vmm at 127.0.0.1:7405 runs commit bbbbbbbbbbbb, the CLI aaaaaaaaaaaa",
    'the daemons run 2 different builds: upgrade them together (docs/operations.md "Upgrades")',
  ]);
  assert.match(versionTable(cli, [same, down]), /gateway\s+127\.0\.0\.1:7404\s+unreachable: connection refused$/m);
});

test("INTERNAL errors carry the daemon's request id", () => {
  const e = new ConnectError("boom", Code.Internal, new Headers({ "x-request-id": "req-123" }));
  assert.equal(requestIdOf(e), "req-123");
  assert.equal(requestIdOf(new ConnectError("boom", Code.Internal)), undefined);
  assert.equal(requestIdOf(new ConnectError("boom", Code.Internal, new Headers({ "x-request-id": "a b" }))), undefined);

  // What the user sees on stderr.
  const seen = (err: unknown): { code: number; text: string } => {
    let text = "";
    const write = process.stderr.write;
    process.stderr.write = ((chunk: string) => ((text += chunk), true)) as typeof process.stderr.write;
    try {
      const code = report(err, { daemon: "vmm", address: "127.0.0.1:7405", method: "microvpc.v1.VmService/CreateVm" });
      return { code, text };
    } finally {
      process.stderr.write = write;
    }
  };
  const internal = seen(new ConnectError("internal error", Code.Internal, new Headers({ "x-request-id": "0f3c-11" })));
  assert.equal(internal.code, 1);
  assert.match(internal.text, /^error: internal error \(reported by microvpcd vmm at 127\.0\.0\.1:7405\) \(internal\)\n {2}request id 0f3c-11: /);
  assert.match(internal.text, /reqId=0f3c-11/);
  // Other codes keep their one line.
  const nf = seen(new ConnectError("vm x not found", Code.NotFound, new Headers({ "x-request-id": "0f3c-12" })));
  assert.equal(nf.text, "error: vm x not found (not_found)\n");
});

test("help prints each default once, and no empty placeholder defaults", () => {
  const program = buildProgram();
  const all = (c: typeof program): (typeof program)[] => [c, ...c.commands.flatMap(all)];
  for (const c of all(program)) {
    const help = c.helpInformation();
    // An option's description can wrap; join its lines before counting.
    for (const entry of help.split(/\n(?=\s{2}-)/)) {
      assert.ok((entry.match(/\(default/g) ?? []).length <= 1, `${c.name()}: ${entry}`);
      assert.ok((entry.match(/default:/g) ?? []).length <= 1, `${c.name()}: ${entry}`);
      assert.doesNotMatch(entry, /default: (""|\[\])/, `${c.name()}: ${entry}`);
    }
  }
  const vm = program.commands.find((c) => c.name() === "vm")!.commands.find((c) => c.name() === "create")!;
  assert.match(vm.helpInformation().replace(/\s+/g, " "), /\(default: the lowest free one\) --/);
});
