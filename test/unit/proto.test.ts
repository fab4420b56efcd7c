// The API contract: buf lint clean, generated code up to date, and no
// breaking change against the previous commit.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { cpSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "vitest";
import { ROOT } from "../lib/daemon.js";

const BUF = join(ROOT, "node_modules", ".bin", "buf");

function run(args: string[], cwd = ROOT): string {
  return execFileSync(BUF, args, {
    cwd,
    encoding: "utf8",
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, PATH: `${join(ROOT, "node_modules", ".bin")}:${process.env.PATH}` },
  });
}

function files(dir: string, base = dir): string[] {
  return readdirSync(dir).flatMap((f) => {
    const p = join(dir, f);
    return statSync(p).isDirectory() ? files(p, base) : [p.slice(base.length + 1)];
  });
}

test("buf lint is clean", () => {
  run(["lint"]);
});

test("gen/ is what buf generate makes from proto/", () => {
  const tmp = mkdtempSync(join(tmpdir(), "mvpc-gen-"));
  try {
    for (const f of ["buf.yaml", "buf.gen.yaml", "proto"]) cpSync(join(ROOT, f), join(tmp, f), { recursive: true });
    run(["generate"], tmp);
    run(["build", "-o", "gen/descriptors.binpb"], tmp);
    const want = files(join(tmp, "gen")).sort();
    assert.deepEqual(files(join(ROOT, "gen")).sort(), want, "run `npm run generate`");
    for (const f of want) {
      assert.ok(readFileSync(join(ROOT, "gen", f)).equals(readFileSync(join(tmp, "gen", f))), `gen/${f} is stale: run \`npm run generate\``);
    }
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});

test("no breaking change against the previous commit", (t) => {
  try {
    execFileSync("git", ["cat-file", "-e", "HEAD~1:buf.yaml"], { cwd: ROOT, stdio: "ignore" });
  } catch {
    t.skip("no previous commit with a buf module");
    return;
  }
  run(["breaking", "--against", ".git#ref=HEAD~1"]);
});
