// deploy/helm/microvpc, the Helm chart:
// - without helm: Chart.yaml and the values files parse, every .Values path
//   the templates read is in values.yaml, the template actions balance, and
//   every MICROVPC_* variable a template sets on a container is one that
//   `microvpcd <service> --help` lists for that container's service;
// - with helm on PATH: `helm lint`, and `helm template` with the default
//   values, values-dev.yaml and cert-manager on, each rendered object
//   checked against the Kubernetes schemas and every microvpc container's
//   variables against --help (skipped, with the reason, without helm).
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { test } from "vitest";
import { parse as parseYaml, parseAllDocuments } from "yaml";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const CHART = join(ROOT, "deploy", "helm", "microvpc");
const TEMPLATES = join(CHART, "templates");
const SERVICES = ["ipam", "netagent", "firewall", "gateway", "vmm"];
const PKG = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as { version: string; bin: Record<string, string> };

type Obj = Record<string, unknown>;
const isObj = (v: unknown): v is Obj => typeof v === "object" && v !== null && !Array.isArray(v);

function run(file: string, args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(file, args, { encoding: "utf8", timeout: 120_000, maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) =>
      resolve({ code: err ? (typeof err.code === "number" ? err.code : -1) : 0, stdout, stderr }),
    );
  });
}

/** The MICROVPC_* variables each service reads, from its live --help. */
const helpEnv: Promise<Record<string, Set<string>>> = (async () => {
  const out: Record<string, Set<string>> = {};
  for (const s of SERVICES) {
    const r = await run(process.execPath, [join(ROOT, PKG.bin.microvpcd), s, "--help"]);
    assert.equal(r.code, 0, r.stderr);
    out[s] = new Set([...r.stdout.matchAll(/\b(MICROVPC_[A-Z0-9_]+)\b/g)].map((m) => m[1]));
  }
  return out;
})();

const templates = Object.fromEntries(
  readdirSync(TEMPLATES)
    .filter((f) => /\.(yaml|tpl|txt)$/.test(f))
    .map((f) => [f, readFileSync(join(TEMPLATES, f), "utf8")]),
);
const values = parseYaml(readFileSync(join(CHART, "values.yaml"), "utf8")) as Obj;

test("Chart.yaml and the values files parse; the chart's version and appVersion are the package's", () => {
  const chart = parseYaml(readFileSync(join(CHART, "Chart.yaml"), "utf8")) as Obj;
  assert.equal(chart.apiVersion, "v2");
  assert.equal(chart.name, "microvpc");
  assert.equal(chart.version, PKG.version);
  assert.equal(chart.appVersion, PKG.version, "the image tag it defaults to");
  assert.ok(isObj(values.image) && isObj(values.ipam) && isObj(values.redis) && isObj(values.tls) && isObj(values.hypervisor));
  // values-dev.yaml only sets what values.yaml declares.
  const dev = parseYaml(readFileSync(join(CHART, "values-dev.yaml"), "utf8")) as Obj;
  const declared = (v: Obj, d: Obj, path: string) => {
    for (const [k, x] of Object.entries(d)) {
      assert.ok(k in v, `values-dev.yaml: ${path}${k} is declared in values.yaml`);
      if (isObj(x) && isObj(v[k]) && Object.keys(v[k]).length) declared(v[k], x, `${path}${k}.`);
    }
  };
  declared(values, dev, "");
});

test("every .Values path the templates read is in values.yaml", () => {
  const get = (path: string[]) => path.reduce<unknown>((v, k) => (isObj(v) ? v[k] : undefined), values);
  let n = 0;
  for (const [f, text] of Object.entries(templates)) {
    for (const m of text.matchAll(/\.Values((?:\.[A-Za-z][A-Za-z0-9]*)+)/g)) {
      n++;
      const path = m[1].slice(1).split(".");
      assert.notEqual(get(path), undefined, `${f}: .Values${m[1]} is in values.yaml`);
    }
  }
  assert.ok(n > 20, "the scan found the references");
});

test("the template actions balance: {{ }}, and every if/range/with/define has its end", () => {
  for (const [f, text] of Object.entries(templates)) {
    assert.equal((text.match(/\{\{/g) ?? []).length, (text.match(/\}\}/g) ?? []).length, `${f}: {{ and }} pair up`);
    const actions = [...text.matchAll(/\{\{-?\s*(if|range|with|define|end|else)\b/g)].map((m) => m[1]);
    let depth = 0;
    for (const a of actions) {
      if (a === "end") depth--;
      else if (a !== "else") depth++;
      assert.ok(depth >= 0, `${f}: an end without its block`);
    }
    assert.equal(depth, 0, `${f}: every block is closed`);
  }
});

/**
 * Which variables the templates set for which service. A container is a
 * `- name: X` at container indent; its service is its literal args[0]
 * (hypervisor.yaml) or, in the control plane's range over ipam, firewall
 * and gateway, all three — narrowed by `if eq $c.svc "S"`. What the shared
 * helpers (commonEnv, agentEnv) set counts for every service that includes
 * them.
 */
/** The `define` blocks of a template (name → body, nested blocks counted) and the text without them. */
function defines(text: string): { blocks: Map<string, string>; rest: string } {
  const blocks = new Map<string, string>();
  let rest = "";
  let at = 0;
  const action = /\{\{-?\s*(define "([^"]+)"|(?:if|range|with|end)\b)[^}]*\}\}/g;
  let open: { name: string; start: number; outer: number } | undefined;
  let depth = 0;
  for (const m of text.matchAll(action)) {
    if (!open) {
      if (m[2]) {
        open = { name: m[2], start: m.index + m[0].length, outer: m.index };
        depth = 0;
      }
      continue;
    }
    if (m[1] === "end") {
      if (depth === 0) {
        blocks.set(open.name, text.slice(open.start, m.index));
        rest += text.slice(at, open.outer);
        at = m.index + m[0].length;
        open = undefined;
      } else depth--;
    } else depth++;
  }
  return { blocks, rest: rest + text.slice(at) };
}

function templateEnv(): { byService: Record<string, Set<string>>; containers: string[] } {
  const byService: Record<string, Set<string>> = Object.fromEntries(SERVICES.map((s) => [s, new Set<string>()]));
  const containers: string[] = [];
  const helpers = new Map<string, Set<string>>();
  // The helpers' own variables.
  // _helpers.tpl first: the others' helpers include its.
  for (const f of Object.keys(templates).sort((a, b) => Number(b === "_helpers.tpl") - Number(a === "_helpers.tpl"))) {
    for (const [name, body] of defines(templates[f]).blocks) {
      helpers.set(name, new Set([...body.matchAll(/- name: (MICROVPC_[A-Z0-9_]+)/g)].map((x) => x[1])));
      for (const inc of body.matchAll(/include "([^"]+)"/g)) for (const v of helpers.get(inc[1]) ?? []) helpers.get(name)!.add(v);
    }
  }
  for (const f of ["control-plane.yaml", "hypervisor.yaml"]) {
    const text = defines(templates[f]).rest;
    let current: string[] = [];
    let inContainers = false;
    const narrowed: (string[] | undefined)[] = [];
    for (const line of text.split("\n")) {
      const section = /^ {6}([a-zA-Z]+):/.exec(line);
      if (section) {
        inContainers = section[1] === "containers";
        current = [];
      }
      const container = inContainers ? /^ {8}- name: (\S.*)$/.exec(line) : null;
      if (container) {
        containers.push(`${f} ${container[1]}`);
        current = f === "control-plane.yaml" ? ["ipam", "firewall", "gateway"] : [];
      }
      const args = /^\s+args: \["([a-z]+)"/.exec(line);
      if (args) current = [args[1]];
      const eq = /\{\{-? if eq \$c\.svc "([a-z]+)" -?\}\}/.exec(line);
      if (eq) narrowed.push([eq[1]]);
      else if (/\{\{-? (if|with|range)\b/.test(line)) narrowed.push(undefined);
      if (/\{\{-? end -?\}\}/.test(line)) narrowed.pop();
      const scope = narrowed.filter((x) => x).at(-1) ?? current;
      const set = (v: string) => scope.forEach((s) => byService[s].add(v));
      const env = /- name: (MICROVPC_[A-Z0-9_]+)$/.exec(line);
      if (env) {
        assert.ok(scope.length, `${f}: ${env[1]} is set in a container whose service is known`);
        set(env[1]);
      }
      for (const inc of line.matchAll(/include "([^"]+)"/g)) for (const v of helpers.get(inc[1]) ?? []) set(v);
    }
  }
  return { byService, containers };
}

test("every MICROVPC_* variable the templates set is a flag of that container's service (microvpcd SERVICE --help)", async () => {
  const help = await helpEnv;
  const { byService, containers } = templateEnv();
  assert.deepEqual(containers.sort(), [
    "control-plane.yaml {{ $c.svc }}",
    "hypervisor.yaml firewall",
    "hypervisor.yaml gateway",
    "hypervisor.yaml netagent",
    "hypervisor.yaml vmm",
  ]);
  for (const s of SERVICES) {
    assert.ok(byService[s].size >= 8, `${s}: the scan found its variables (${[...byService[s]].join(", ")})`);
    for (const v of byService[s]) assert.ok(help[s].has(v), `${s}: ${v} is in \`microvpcd ${s} --help\``);
  }
  // What the chart's choices turn into.
  for (const s of ["ipam", "firewall", "gateway"]) for (const v of ["MICROVPC_TLS_CERT", "MICROVPC_TLS_KEY"]) assert.ok(byService[s].has(v), `${s} serves TLS`);
  assert.ok(byService.ipam.has("MICROVPC_MANAGEMENT_CIDRS"));
  assert.ok(byService.netagent.has("MICROVPC_OVERLAY") && byService.netagent.has("MICROVPC_UNDERLAY_ADDRESS"));
  assert.ok(byService.vmm.has("MICROVPC_IPAM_ADDR") && byService.vmm.has("MICROVPC_CA_FILE"));
  for (const s of SERVICES) assert.ok(byService[s].has("MICROVPC_REDIS_URL") && byService[s].has("MICROVPC_TOKEN_FILE"));
  // The control plane's three containers come from one range, named by $c.svc.
  assert.match(templates["control-plane.yaml"], /- name: \{\{ \$c\.svc \}\}/);
});

// ---------- with helm

const helm: Promise<string | undefined> = run("helm", ["version", "--short"]).then((r) => (r.code === 0 ? undefined : "helm is not on PATH"));

test("helm lint passes", async (t) => {
  const why = await helm;
  if (why) return t.skip(why);
  const r = await run("helm", ["lint", "--strict", CHART]);
  assert.equal(r.code, 0, `${r.stdout}${r.stderr}`);
});

for (const [label, extra] of [
  ["default values", []],
  ["values-dev.yaml", ["-f", join(CHART, "values-dev.yaml")]],
  ["cert-manager on", ["--set", "tls.certManager.enabled=true"]],
] as const) {
  test(`helm template (${label}): objects validate, containers run microvpcd with flags --help lists`, async (t) => {
    const why = await helm;
    if (why) return t.skip(why);
    const r = await run("helm", ["template", "microvpc", CHART, "--namespace", "microvpc", ...extra]);
    assert.equal(r.code, 0, r.stderr);
    const help = await helpEnv;
    const objs = parseAllDocuments(r.stdout)
      .map((d) => d.toJS() as Obj | null)
      .filter((o): o is Obj => !!o);
    assert.ok(objs.some((o) => o.kind === "DaemonSet") && objs.some((o) => o.kind === "Deployment"));
    assert.equal(
      objs.some((o) => o.kind === "Certificate"),
      label === "cert-manager on",
    );
    for (const o of objs) {
      if (String(o.apiVersion).startsWith("cert-manager.io")) continue;
      const mod = (await import(`kubernetes-models/${String(o.apiVersion)}`)) as Record<string, new (d: unknown) => { validate(): void }>;
      new mod[String(o.kind)](o).validate();
      if (o.kind !== "Deployment" && o.kind !== "DaemonSet") continue;
      const pod = (o.spec as { template: { spec: { containers: { args: string[]; command: string[]; env: { name: string }[] }[] } } }).template.spec;
      for (const c of pod.containers) {
        assert.deepEqual(c.command, ["tini", "--", "microvpcd"]);
        for (const e of c.env) if (e.name.startsWith("MICROVPC_")) assert.ok(help[c.args[0]].has(e.name), `${c.args[0]}: ${e.name}`);
      }
    }
  });
}
