// What a user of `microvpc` sees, end to end against a real Redis and a real
// `microvpcd ipam`: the reference guides' create forms verbatim, the plain
// table and the other output formats, label selectors, `version` (with a
// daemon of another build, for the skew warning), and the configuration
// file's contexts with their precedence and the token file check.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, test } from "vitest";
import { parse as yamlParse } from "yaml";
import { build, DIST } from "../../build.mjs";
import { cliEnv, cliRunner } from "../lib/cli.js";
import { ROOT, startDaemon, type Daemon } from "../lib/daemon.js";
import { freePort, startDaemonsRedis, type DaemonsRedis } from "../lib/redis.js";

let redis: DaemonsRedis | undefined;
let ipam: Daemon | undefined;
let skewed: Daemon | undefined;
let tmp: string;
const SKEW_DIST = join(DIST, `test-skew-${process.pid}`);
const SKEW_COMMIT = "0123456789abcdef0123456789abcdef01234567";

const cli = cliRunner(() => ["--server", ipam!.address], 30_000);
const { expect, json } = cli;

beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), "mvpc-cli-out-"));
  redis = await startDaemonsRedis();
  ipam = await startDaemon("ipam", ["--redis", redis.url]);
}, 60_000);

afterAll(async () => {
  await skewed?.stop();
  await ipam?.stop();
  await redis?.stop();
  rmSync(SKEW_DIST, { recursive: true, force: true });
  if (tmp) rmSync(tmp, { recursive: true, force: true });
});

test("the agentmetal guide's create forms work verbatim; NAME and --name together must agree", async () => {
  let r = await expect(0, ["vpc", "create", "--name", "prod", "--cidr", "10.0.0.0/16"]);
  assert.match(r.stdout, /^name:\s+prod$/m);
  r = await expect(0, ["subnet", "create", "--vpc", "prod", "--name", "web", "--cidr", "10.0.1.0/24", "--type", "public"]);
  assert.match(r.stdout, /^type:\s+public$/m);
  await expect(0, ["subnet", "create", "--vpc", "prod", "--name", "data", "--cidr", "10.0.2.0/24", "--type", "private"]);
  // The same name twice is fine; two names, or none, is a usage error that sends nothing.
  await expect(0, ["vpc", "create", "same", "--name", "same", "--cidr", "10.1.0.0/16"]);
  r = await expect(2, ["vpc", "create", "one", "--name", "two", "--cidr", "10.2.0.0/16"]);
  assert.match(r.stderr, /^error: the name is given twice and differs: NAME "one" and --name "two"; give one of them/);
  r = await expect(2, ["subnet", "create", "--vpc", "prod", "--cidr", "10.0.3.0/24"]);
  assert.match(r.stderr, /missing the name: give it as the argument NAME or with --name/);
  assert.deepEqual(
    (await json(["vpc", "list"])).vpcs.map((v: { name: string }) => v.name),
    ["prod", "same"],
  );
  await expect(0, ["subnet", "delete", "web", "--vpc", "prod"]);
  await expect(0, ["subnet", "delete", "data", "--vpc", "prod"]);
  await expect(0, ["vpc", "delete", "prod"]);
  await expect(0, ["vpc", "delete", "same"]);
});

test("output: a plain table, --no-headers, -o wide|name|yaml|json, and -l selectors", async () => {
  await expect(0, ["vpc", "create", "alpha", "--cidr", "10.10.0.0/16", "--label", "env=prod", "--label", "tier=web"]);
  await expect(0, ["vpc", "create", "beta", "--cidr", "10.11.0.0/16", "--label", "env=dev"]);
  await expect(0, ["vpc", "create", "gamma", "--cidr", "10.12.0.0/16", "--description", "no labels"]);
  const listed = (await json(["vpc", "list"])).vpcs as { id: string; name: string; createTime: string }[];
  const [a, b, g] = listed;
  assert.deepEqual(
    listed.map((v) => v.name),
    ["alpha", "beta", "gamma"],
  );

  // Exactly what the user sees: columns three spaces apart, no borders.
  const created = (t: string) => new Date(t).toISOString();
  let r = await expect(0, ["vpc", "list"]);
  assert.equal(
    r.stdout,
    [
      "ID                 NAME    CIDR           SUBNETS   LABELS              CREATED",
      `${a.id}   alpha   10.10.0.0/16   0         env=prod,tier=web   ${created(a.createTime)}`,
      `${b.id}   beta    10.11.0.0/16   0         env=dev             ${created(b.createTime)}`,
      `${g.id}   gamma   10.12.0.0/16   0                             ${created(g.createTime)}`,
      "",
    ].join("\n"),
  );
  assert.doesNotMatch(r.stdout, /[│┌─]/);
  r = await expect(0, ["--no-headers", "vpc", "list"]);
  assert.equal(r.stdout.split("\n")[0].split(/\s+/)[0], a.id);
  assert.equal(r.stdout.trimEnd().split("\n").length, 3);
  r = await expect(0, ["vpc", "list", "-o", "wide"]);
  assert.match(r.stdout.split("\n")[0], /CREATED\s+PUBLIC CIDR\s+DESCRIPTION$/);
  assert.match(r.stdout, /gamma .*\sno\s+no labels\n/);
  r = await expect(0, ["vpc", "list", "-o", "name"]);
  assert.equal(r.stdout, "vpc/alpha\nvpc/beta\nvpc/gamma\n");
  r = await expect(0, ["vpc", "get", "beta", "-o", "name"]);
  assert.equal(r.stdout, "vpc/beta\n");
  // YAML and JSON are the same message.
  r = await expect(0, ["vpc", "list", "-o", "yaml"]);
  assert.deepEqual(yamlParse(r.stdout), await json(["vpc", "list"]));
  r = await expect(0, ["vpc", "get", "alpha", "-o", "yaml"]);
  assert.deepEqual(yamlParse(r.stdout), await json(["vpc", "get", "alpha"]));
  // A command whose output names no resource says so.
  r = await expect(2, ["version", "--client", "-o", "name"]);
  assert.match(r.stderr, /^error: -o name: this command's output has no resource names; use -o json or -o yaml/);

  // Selectors: in and out.
  const names = async (sel: string[]) => (await expect(0, ["vpc", "list", "-o", "name", ...sel])).stdout.trim().split("\n").filter(Boolean);
  assert.deepEqual(await names(["-l", "env=prod"]), ["vpc/alpha"]);
  assert.deepEqual(await names(["-l", "env!=prod"]), ["vpc/beta", "vpc/gamma"]);
  assert.deepEqual(await names(["-l", "env"]), ["vpc/alpha", "vpc/beta"]);
  assert.deepEqual(await names(["-l", "!env"]), ["vpc/gamma"]);
  assert.deepEqual(await names(["-l", "env=prod,tier=web"]), ["vpc/alpha"]);
  assert.deepEqual(await names(["-l", "env=prod,tier=db"]), []);
  assert.deepEqual(await names(["-l", "env=prod", "-l", "tier=web"]), ["vpc/alpha"]);
  assert.deepEqual(await names(["--selector", "env", "--limit", "1"]), ["vpc/alpha"]);
  const j = await json(["vpc", "list", "-l", "env=dev"]);
  assert.deepEqual([j.vpcs.map((v: { name: string }) => v.name), j.nextPageToken], [["beta"], ""]);
  r = await expect(2, ["vpc", "list", "-l", "bad key=x"]);
  assert.match(r.stderr, /is not a label key/);
  // Subnets too.
  await expect(0, ["subnet", "create", "s1", "--vpc", "alpha", "--cidr", "10.10.1.0/24", "--label", "role=db"]);
  await expect(0, ["subnet", "create", "s2", "--vpc", "alpha", "--cidr", "10.10.2.0/24"]);
  const sj = await json(["subnet", "list", "--vpc", "alpha", "-l", "role=db"]);
  assert.deepEqual(
    sj.subnets.map((s: { name: string }) => s.name),
    ["s1"],
  );
  r = await expect(0, ["--no-headers", "subnet", "list", "--vpc", "alpha", "-l", "!role"]);
  assert.match(r.stdout.trimEnd(), /^subnet-[0-9a-f]{12}\s+vpc-[0-9a-f]{12}\s+s2\s+10\.10\.2\.0\/24\s+private\s+10\.10\.2\.1\s+0\s+251$/);
  for (const s of ["s1", "s2"]) await expect(0, ["subnet", "delete", s, "--vpc", "alpha"]);
  for (const v of ["alpha", "beta", "gamma"]) await expect(0, ["vpc", "delete", v]);
});

/** What a binary prints for `[sub] --version` (or other arguments: the last one replaces --version). */
async function versionOf(bin: string, ...args: string[]): Promise<string> {
  const argv = args.at(-1)?.startsWith("--") ? args : [...args, "--version"];
  return new Promise((resolve, reject) =>
    execFile(process.execPath, [join(ROOT, "bin", bin), ...argv], { env: cliEnv }, (err, stdout) => (err ? reject(err) : resolve(stdout))),
  );
}

test("--version on both binaries; `microvpc version` reads each daemon's build and warns on skew", { timeout: 120_000 }, async () => {
  const line = /^\d+\.\d+\.\d+\S* \(commit ([0-9a-f]{7,12}|unknown), node v\d+\.\d+\.\d+\)\n$/;
  const cliLine = await versionOf("microvpc.js");
  assert.match(cliLine, line);
  assert.equal(await versionOf("microvpcd.js"), cliLine);
  assert.equal(await versionOf("microvpcd.js", "gateway"), cliLine);
  // Daemon help: each default once; the simulated-hypervisor flags are not shown.
  const help = await versionOf("microvpcd.js", "gateway", "--help");
  for (const entry of help.split(/\n(?=\s{2}-)/)) assert.ok((entry.match(/\(default/g) ?? []).length <= 1, entry);
  assert.doesNotMatch(help, /--host-netns|--imds-redis/);
  const nowhere = `127.0.0.1:${await freePort()}`;
  const down = ["--netagent", nowhere, "--firewall", nowhere, "--gateway", nowhere, "--vmm", nowhere];

  // Same build: no warning; daemons that are down are shown as such, not a crash.
  let r = await expect(0, ["version"], ["--server", ipam!.address, ...down]);
  assert.equal(r.stderr, "");
  assert.match(r.stdout, /^COMPONENT\s+ADDRESS\s+VERSION\s+COMMIT\s+NODE\s+STATUS$/m);
  assert.match(r.stdout, new RegExp(`^ipam\\s+${ipam!.address}\\s+\\S+\\s+[0-9a-f]{7,12}\\s+v\\d+\\S*\\s+ok$`, "m"));
  assert.match(r.stdout, new RegExp(`^vmm\\s+${nowhere}\\s+unreachable: connection refused$`, "m"));
  const same = JSON.parse((await expect(0, ["version", "-o", "json"], ["--server", ipam!.address, ...down])).stdout);
  assert.deepEqual(same.daemons[0].commit, same.client.commit);
  assert.deepEqual(same.skew, []);
  assert.equal(same.daemons.filter((d: { reachable: boolean }) => !d.reachable).length, 4);

  // A second build from another commit, as a daemon of an older or newer release would be.
  await build({ quiet: true, outdir: SKEW_DIST, commit: SKEW_COMMIT });
  skewed = await startDaemon("ipam", ["--redis", redis!.url], {}, undefined, { script: join(SKEW_DIST, "microvpcd.js") });
  r = await expect(0, ["version"], ["--server", skewed.address, ...down]);
  assert.match(r.stdout, new RegExp(`^ipam\\s+${skewed.address}\\s+\\S+\\s+${SKEW_COMMIT.slice(0, 12)}\\s`, "m"));
  assert.match(
    r.stderr,
    new RegExp(`^warning: version skew: microvpcd ipam at ${skewed.address} runs commit ${SKEW_COMMIT.slice(0, 12)}, the CLI [0-9a-f]{7,12}`, "m"),
  );
  // Two daemons of different builds: also said.
  r = await expect(0, ["version"], ["--server", skewed.address, "--netagent", ipam!.address, "--firewall", nowhere, "--gateway", nowhere, "--vmm", nowhere]);
  assert.match(r.stderr, /the daemons run 2 different builds/);
});

test("config: contexts, flag > env > context > default, use-context, and the token file's mode", async () => {
  const file = join(tmp, "config.yaml");
  const token = join(tmp, "token");
  writeFileSync(token, "s3cret\n", { mode: 0o600 });
  const nowhere = `127.0.0.1:${await freePort()}`;
  writeFileSync(
    file,
    `# two contexts
current-context: lab
contexts:
  - name: lab
    server: ${ipam!.address}
    token-file: ${token}
  - name: broken
    server: ${nowhere}
`,
  );
  const env = { MICROVPC_CONFIG: file };
  // The context gives the address (no --server).
  await expect(0, ["vpc", "list"], [], env);
  // A flag wins over the context, and so does a variable.
  let r = await expect(6, ["vpc", "list"], ["--server", nowhere], env);
  assert.match(r.stderr, new RegExp(`cannot connect to ${nowhere}`));
  r = await expect(6, ["vpc", "list"], [], { ...env, MICROVPC_SERVER: nowhere });
  assert.match(r.stderr, new RegExp(nowhere));
  await expect(6, ["vpc", "list"], ["--context", "broken"], env);
  await expect(0, ["vpc", "list"], ["--context", "broken", "--server", ipam!.address], env);
  r = await expect(1, ["vpc", "list"], ["--context", "nosuch"], env);
  assert.match(r.stderr, /context "nosuch" is not in .*\(contexts: lab, broken\)/);

  r = await expect(0, ["config", "get-contexts"], [], env);
  assert.match(r.stdout, /^CURRENT\s+NAME\s+HOST\s+SERVER\s+TOKEN FILE$/m);
  assert.match(r.stdout, new RegExp(`^\\*\\s+lab\\s+${ipam!.address}\\s+${token}$`, "m"));
  r = await expect(0, ["config", "use-context", "broken"], [], env);
  assert.match(r.stdout, /switched to context broken/);
  assert.match(readFileSync(file, "utf8"), /^# two contexts\ncurrent-context: broken\n/);
  assert.equal((await expect(0, ["config", "current-context"], [], env)).stdout, "broken\n");
  await expect(6, ["vpc", "list"], [], env);
  await expect(0, ["config", "use-context", "lab"], [], env);
  r = await expect(0, ["config", "view", "-o", "yaml"], [], env);
  assert.equal(yamlParse(r.stdout).contexts[0]["token-file"], token);
  await expect(1, ["config", "use-context", "nosuch"], [], env);

  // A token file anyone may read is refused; --token-file and --token together too.
  chmodSync(token, 0o644);
  r = await expect(1, ["vpc", "list"], [], env);
  assert.match(r.stderr, /--token-file .* is readable by every user of this machine \(mode 0644\); .*chmod 600/);
  chmodSync(token, 0o600);
  r = await expect(1, ["vpc", "list"], ["--token", "x", "--token-file", token]);
  assert.match(r.stderr, /--token and --token-file both given/);
  // A broken file says where and what.
  writeFileSync(join(tmp, "bad.yaml"), "contexts:\n  - name: lab\n    sever: 127.0.0.1:7401\n");
  r = await expect(1, ["vpc", "list"], [], { MICROVPC_CONFIG: join(tmp, "bad.yaml") });
  assert.match(r.stderr, /bad\.yaml: context lab: sever: unknown key/);
  // --ca-cert is --ca-file's new name: both read the file.
  r = await expect(1, ["vpc", "list"], ["--server", `https://${ipam!.address}`, "--ca-cert", join(tmp, "missing.pem")]);
  assert.match(r.stderr, /missing\.pem/);
});
