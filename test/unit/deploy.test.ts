// The deployment, checked without a cluster or a docker engine:
// - deploy/k8s: every overlay renders (deploy/k8s/kustomize.ts, a kustomize
//   subset), every object validates against the Kubernetes API schemas
//   (kubernetes-models) and, strictly, against their TypeScript types (no
//   unknown field anywhere), plus the API-server rules a schema cannot say
//   (selectors, references, ports, privileges);
// - every microvpc container runs `microvpcd <service>` — the entry point the
//   integration tests start — with only flags and MICROVPC_* variables that
//   `microvpcd <service> --help` lists;
// - the overlays change what they claim, and keep Redis's durability;
// - the Dockerfile installs deploy/packages.txt (the file .ci/run installs),
//   which provides every program the services run.
import assert from "node:assert/strict";
import { execFile, execFileSync, spawn } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import ts from "typescript";
import { test } from "vitest";
import { parse as parseYaml } from "yaml";
import { build, isObj, parseYamlDocs, resId, splitImage, strategicMerge, type K8sObject, type Obj } from "../../deploy/k8s/kustomize.js";
import { isLoopback, parseListen } from "../../services/common/server.js";
import { shebangNodeFlags } from "../lib/daemon.js";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const K8S = join(ROOT, "deploy", "k8s");
const OVERLAYS = ["dev", "production"] as const;
type Overlay = (typeof OVERLAYS)[number];
const SERVICES = ["ipam", "netagent", "firewall", "gateway", "vmm"] as const;
const DEFAULT_PORT: Record<string, number> = { ipam: 7401, netagent: 7402, firewall: 7403, gateway: 7404, vmm: 7405 };
const HYPERVISOR = ["netagent", "firewall", "gateway", "vmm"];
/** The services that also run as `--api-only` next to ipam, as the control plane's Redis user (docs/redis-acl.md). */
const API_ONLY = ["firewall", "gateway"];
/** What every microvpc container runs, by its args: ipam and the --api-only pair in ipam's pod, the agents in the DaemonSet. */
const RUNS = ["firewall", "firewall --api-only", "gateway", "gateway --api-only", "ipam", "netagent", "vmm"];
const PKG = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as {
  version: string;
  bin: Record<string, string>;
  devEngines: { runtime: { name: string; version: string } };
};

const rendered: Record<Overlay, K8sObject[]> = { dev: build(join(K8S, "overlays", "dev")), production: build(join(K8S, "overlays", "production")) };
const baseObjects = build(join(K8S, "base"));

// ---------- helpers over rendered objects

interface Container extends Obj {
  name: string;
  image: string;
  command?: string[];
  args?: string[];
  env?: EnvVar[];
  ports?: { name?: string; containerPort: number; hostPort?: number; protocol?: string }[];
  volumeMounts?: { name: string; mountPath: string; mountPropagation?: string; readOnly?: boolean }[];
  securityContext?: Obj & {
    privileged?: boolean;
    allowPrivilegeEscalation?: boolean;
    runAsUser?: number;
    runAsNonRoot?: boolean;
    capabilities?: { add?: string[]; drop?: string[] };
  };
  resources?: { requests?: Record<string, string | number>; limits?: Record<string, string | number> };
  readinessProbe?: Probe;
  livenessProbe?: Probe;
  startupProbe?: Probe;
}
interface EnvVar {
  name: string;
  value?: string;
  valueFrom?: { fieldRef?: { fieldPath: string }; secretKeyRef?: { name: string; key: string }; configMapKeyRef?: { name: string; key: string } };
}
interface Probe extends Obj {
  grpc?: { port: number; service?: string };
  httpGet?: { path: string; port: number };
  tcpSocket?: { port: number };
  exec?: { command: string[] };
}
interface PodSpec extends Obj {
  containers: Container[];
  initContainers?: Container[];
  volumes?: (Obj & { name: string })[];
  hostNetwork?: boolean;
  securityContext?: Obj;
}
interface Workload {
  obj: K8sObject;
  labels: Record<string, string>;
  pod: PodSpec;
}

const WORKLOAD_KINDS = new Set(["Deployment", "StatefulSet", "DaemonSet"]);

function workloads(objs: K8sObject[]): Workload[] {
  return objs
    .filter((o) => WORKLOAD_KINDS.has(o.kind))
    .map((o) => {
      const spec = o.spec as Obj & { template: { metadata: { labels: Record<string, string> }; spec: PodSpec } };
      return { obj: o, labels: spec.template.metadata.labels, pod: spec.template.spec };
    });
}

function find(objs: K8sObject[], kind: string, name: string): K8sObject {
  const o = objs.find((x) => x.kind === kind && x.metadata.name === name);
  assert.ok(o, `${kind}/${name} is in the build`);
  return o;
}

function container(objs: K8sObject[], kind: string, name: string, c: string): Container {
  const w = workloads(objs).find((x) => x.obj.kind === kind && x.obj.metadata.name === name);
  assert.ok(w, `${kind}/${name}`);
  const got = [...w.pod.containers, ...(w.pod.initContainers ?? [])].find((x) => x.name === c);
  assert.ok(got, `${kind}/${name} has a container ${c}`);
  return got;
}

function envOf(c: Container, name: string): EnvVar | undefined {
  return (c.env ?? []).find((e) => e.name === name);
}

function matches(selector: Record<string, string>, labels: Record<string, string>): boolean {
  return Object.entries(selector).every(([k, v]) => labels[k] === v);
}

/** The image the overlay gives microvpc containers (kustomization `images:`). */
/** What every microvpc container runs: the image's ENTRYPOINT, tini as PID 1 in front of microvpcd. */
const ENTRY = ["tini", "--", "microvpcd"];

function microvpcImage(overlay: Overlay, base = "microvpc"): string {
  const k = parseYaml(readFileSync(join(K8S, "overlays", overlay, "kustomization.yaml"), "utf8")) as {
    images: { name: string; newName?: string; newTag?: string }[];
  };
  const img = k.images.find((i) => i.name === base);
  assert.ok(img, `${overlay} pins the ${base} image`);
  return `${img.newName ?? base}:${img.newTag}`;
}

function microvpcContainers(objs: K8sObject[], image: string): { w: Workload; c: Container }[] {
  return workloads(objs).flatMap((w) =>
    [...w.pod.containers, ...(w.pod.initContainers ?? [])].filter((c) => c.image === image || c.command?.includes("microvpcd")).map((c) => ({ w, c })),
  );
}

// ---------- `microvpcd <service> --help`: the flags and variables each daemon reads

interface Help {
  flags: Set<string>;
  env: Set<string>;
  logLevels: string[];
}

const helps: Promise<Record<string, Help>> = (async () => {
  const out: Record<string, Help> = {};
  await Promise.all(
    SERVICES.map(
      (s) =>
        new Promise<void>((resolve, reject) => {
          execFile(process.execPath, [join(ROOT, PKG.bin.microvpcd), s, "--help"], { encoding: "utf8", timeout: 60_000 }, (err, stdout) => {
            if (err) return reject(err);
            const flags = new Set([...stdout.matchAll(/^\s+(?:-\w, )?(--[a-z][a-z0-9-]*)/gm)].map((m) => m[1]));
            const env = new Set([...stdout.matchAll(/\b(MICROVPC_[A-Z0-9_]+)\b/g)].map((m) => m[1]));
            const levels =
              /--log-level[\s\S]*?choices: ([^)]*?), default/
                .exec(stdout)?.[1]
                .match(/"(\w+)"/g)
                ?.map((x) => x.slice(1, -1)) ?? [];
            out[s] = { flags, env, logLevels: levels };
            resolve();
          });
        }),
    ),
  );
  return out;
})();

// ---------- the kustomize subset itself

test("kustomize subset: strategic merge as the API server does it for the fields we patch", () => {
  const base = {
    spec: {
      replicas: 1,
      template: {
        spec: {
          containers: [
            {
              name: "a",
              image: "x",
              args: ["one", "two"],
              env: [
                { name: "A", value: "1" },
                { name: "B", value: "2" },
              ],
              volumeMounts: [{ name: "v", mountPath: "/v" }],
            },
            { name: "b", image: "y" },
          ],
          tolerations: [{ key: "k1" }],
        },
      },
    },
  };
  const patch = {
    spec: {
      replicas: 3,
      template: {
        spec: {
          containers: [
            {
              name: "a",
              args: ["three"],
              env: [
                { name: "B", value: "20" },
                { name: "C", value: "3" },
              ],
              volumeMounts: [{ name: "w", mountPath: "/w" }],
            },
            { name: "b", $patch: "delete" },
            { name: "c", image: "z" },
          ],
          tolerations: [{ key: "k2" }],
        },
      },
    },
  };
  assert.deepEqual(strategicMerge(base, patch, ""), {
    spec: {
      replicas: 3,
      template: {
        spec: {
          containers: [
            {
              name: "a",
              image: "x",
              args: ["three"],
              // kyaml's order: the patch's elements first, then the base's others.
              env: [
                { name: "B", value: "20" },
                { name: "C", value: "3" },
                { name: "A", value: "1" },
              ],
              volumeMounts: [
                { name: "w", mountPath: "/w" },
                { name: "v", mountPath: "/v" },
              ],
            },
            { name: "c", image: "z" },
          ],
          tolerations: [{ key: "k2" }],
        },
      },
    },
  });
  assert.deepEqual(strategicMerge({ a: 1, b: { c: 2, d: 3 } }, { b: { c: null } }, ""), { a: 1, b: { d: 3 } });
  assert.deepEqual(strategicMerge({ ports: [{ port: 1, name: "a" }] }, { ports: [{ port: 2, name: "b" }] }, ""), {
    ports: [
      { port: 2, name: "b" },
      { port: 1, name: "a" },
    ],
  });
  // Merge keys are the API's list-map keys: a spread constraint is topologyKey+whenUnsatisfiable,
  // a port port+protocol, so a different second key adds an element instead of replacing one.
  const spread = (k: string, w: string, skew = 1) => ({ topologyKey: k, whenUnsatisfiable: w, maxSkew: skew });
  assert.deepEqual(
    strategicMerge({ topologySpreadConstraints: [spread("h", "ScheduleAnyway")] }, { topologySpreadConstraints: [spread("h", "DoNotSchedule")] }, ""),
    { topologySpreadConstraints: [spread("h", "DoNotSchedule"), spread("h", "ScheduleAnyway")] },
  );
  assert.deepEqual(
    strategicMerge(
      { topologySpreadConstraints: [spread("h", "ScheduleAnyway"), spread("z", "ScheduleAnyway")] },
      { topologySpreadConstraints: [{ topologyKey: "h", whenUnsatisfiable: "ScheduleAnyway", $patch: "delete" }, spread("h", "DoNotSchedule", 2)] },
      "",
    ),
    { topologySpreadConstraints: [spread("h", "DoNotSchedule", 2), spread("z", "ScheduleAnyway")] },
  );
  assert.deepEqual(strategicMerge({ ports: [{ port: 1, protocol: "TCP" }] }, { ports: [{ port: 1, protocol: "UDP" }] }, ""), {
    ports: [
      { port: 1, protocol: "UDP" },
      { port: 1, protocol: "TCP" },
    ],
  });
  // Leaving out a secondary key the base gives is refused: kustomize would drop the patch element.
  assert.throws(
    () => strategicMerge({ ports: [{ containerPort: 1, protocol: "TCP" }] }, { ports: [{ containerPort: 1, name: "n" }] }, ""),
    /must give 'protocol'/,
  );
  assert.throws(() => strategicMerge({ a: {} }, { a: { $patch: "replace" } }, ""), /not implemented/);
  assert.throws(() => strategicMerge({ containers: [{ name: "a" }] }, { containers: [{ image: "x" }] }, ""), /merge key 'name'/);
  assert.deepEqual(splitImage("reg.example:5000/a/b:1.2@sha256:ab"), { name: "reg.example:5000/a/b", tag: "1.2", digest: "sha256:ab" });
  assert.deepEqual(splitImage("reg.example:5000/a/b"), { name: "reg.example:5000/a/b", digest: undefined });
});

test("kustomize subset: duplicate ids, unknown fields and unmatched patches are errors, not silent", () => {
  const dir = mkdtempSync(join(tmpdir(), "mvpc-kz-"));
  try {
    const cm = (n: string) => `apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ${n}\ndata:\n  a: "1"\n`;
    writeFileSync(join(dir, "a.yaml"), cm("x"));
    writeFileSync(join(dir, "b.yaml"), cm("x"));
    writeFileSync(join(dir, "kustomization.yaml"), "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [a.yaml, b.yaml]\n");
    assert.throws(() => build(dir), /already registered id: \|ConfigMap\|\|x/);
    writeFileSync(
      join(dir, "kustomization.yaml"),
      "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [a.yaml]\ncommonLabels: {a: b}\n",
    );
    assert.throws(() => build(dir), /'commonLabels' is not implemented/);
    writeFileSync(join(dir, "p.yaml"), cm("other"));
    writeFileSync(
      join(dir, "kustomization.yaml"),
      "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [a.yaml]\npatches: [{path: p.yaml}]\n",
    );
    assert.throws(() => build(dir), /matched 0 resources/);
    writeFileSync(join(dir, "ns.yaml"), "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: tns\n");
    writeFileSync(
      join(dir, "kustomization.yaml"),
      "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: tns\nresources: [a.yaml, ns.yaml]\n",
    );
    const got = build(dir);
    assert.equal(got.find((o) => o.kind === "ConfigMap")!.metadata.namespace, "tns");
    assert.equal(got.find((o) => o.kind === "Namespace")!.metadata.namespace, undefined);
    // YAML 1.1, as kubectl: a leading-zero mode is octal, and a bare n/y/no/yes is a boolean.
    assert.equal((parseYamlDocs("apiVersion: v1\nkind: X\nmetadata: {name: a}\nmode: 0440\n", "x")[0] as Obj).mode, 0o440);
    assert.throws(() => parseYamlDocs("apiVersion: v1\nkind: X\nmetadata: {name: n}\n", "x"), /metadata.name/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

// ---------- the Kubernetes API schemas

async function modelFor(o: K8sObject): Promise<new (d: unknown) => { validate(): void }> {
  const mod = (await import(`kubernetes-models/${o.apiVersion}`)) as Record<string, new (d: unknown) => { validate(): void }>;
  const M = mod[o.kind];
  assert.ok(M, `kubernetes-models knows ${o.apiVersion} ${o.kind}`);
  return M;
}

for (const overlay of OVERLAYS) {
  test(`${overlay}: every object validates against the Kubernetes API schema (kubernetes-models)`, async () => {
    assert.ok(rendered[overlay].length > 10);
    for (const o of rendered[overlay]) {
      const M = await modelFor(o);
      assert.doesNotThrow(() => new M(o).validate(), `${o.kind}/${o.metadata.name}`);
    }
  });
}

/** Type-checks each object as a literal of its kubernetes-models interface; returns the errors. */
function strictFieldErrors(objs: { label: string; obj: K8sObject }[]): string[] {
  // The JSON schemas accept unknown fields (kubectl --validate=strict does
  // not): assigning each object as a literal to its model's interface makes
  // the TypeScript compiler reject any excess property, at every depth.
  const file = join(ROOT, "test", "unit", "__deploy_strict_check__.ts");
  const source = objs
    .map(
      ({ obj }, i) => `import type { I${obj.kind} as T${i} } from "kubernetes-models/${obj.apiVersion}";\nexport const o${i}: T${i} = ${JSON.stringify(obj)};`,
    )
    .join("\n");
  const options: ts.CompilerOptions = {
    strict: true,
    noEmit: true,
    skipLibCheck: true,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    target: ts.ScriptTarget.ES2022,
    types: [],
  };
  const host = ts.createCompilerHost(options);
  const getSourceFile = host.getSourceFile.bind(host);
  host.getSourceFile = (name, lang, ...rest) => (name === file ? ts.createSourceFile(name, source, lang) : getSourceFile(name, lang, ...rest));
  const fileExists = host.fileExists.bind(host);
  host.fileExists = (name) => name === file || fileExists(name);
  const program = ts.createProgram([file], options, host);
  return ts
    .getPreEmitDiagnostics(program)
    .filter((d) => d.file?.fileName === file)
    .map(
      (d) =>
        `${objs[Math.floor(d.file!.getLineAndCharacterOfPosition(d.start!).line / 2)]?.label ?? "?"}: ${ts.flattenDiagnosticMessageText(d.messageText, "\n").split("\n")[0]}`,
    );
}

test("every object of every overlay has only fields the API knows (type-checked against kubernetes-models' types)", () => {
  const all = OVERLAYS.flatMap((overlay) => rendered[overlay].map((obj) => ({ label: `${overlay} ${obj.kind}/${obj.metadata.name}`, obj })));
  // The check itself catches a misspelt field deep down, and a wrong type.
  const ds = structuredClone(find(rendered.dev, "DaemonSet", "microvpc-hypervisor"));
  ((ds.spec as Obj & { template: { spec: PodSpec } }).template.spec.containers[0] as Obj).imagePullPolicyy = "Always";
  const svc = structuredClone(find(rendered.dev, "Service", "microvpc-ipam"));
  (svc.spec as { ports: Obj[] }).ports[0].port = "7401";
  const bad = strictFieldErrors([
    { label: "typo", obj: ds },
    { label: "type", obj: svc },
  ]);
  assert.equal(bad.length, 2, bad.join("\n"));
  assert.match(bad[0], /^typo: .*imagePullPolicyy/);
  assert.match(bad[1], /^type: .*'string' is not assignable to type 'number'/);
  assert.deepEqual(strictFieldErrors(all), []);
});

// ---------- what the API server checks beyond the schema

for (const overlay of OVERLAYS) {
  test(`${overlay}: selectors, references, ports and privileges pass the API server's rules`, () => {
    const objs = rendered[overlay];
    const ids = objs.map(resId);
    assert.equal(new Set(ids).size, ids.length, "no duplicate resource");
    const ns = objs.filter((o) => o.kind === "Namespace");
    assert.equal(ns.length, 1, "the overlay creates its namespace");
    for (const o of objs) {
      assert.match(o.metadata.name, /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/, `${o.kind}/${o.metadata.name}: a DNS-1123 name`);
      if (o.kind !== "Namespace") assert.equal(o.metadata.namespace, ns[0].metadata.name, `${o.kind}/${o.metadata.name} is in the overlay's namespace`);
    }
    const pods = workloads(objs);
    const secrets = new Map(
      objs.filter((o) => o.kind === "Secret").map((o) => [o.metadata.name, Object.keys({ ...(o.stringData as Obj), ...(o.data as Obj) })]),
    );
    const configMaps = new Map(objs.filter((o) => o.kind === "ConfigMap").map((o) => [o.metadata.name, Object.keys(o.data as Obj)]));
    const secretRefs = new Set<string>();
    const checkSecretKey = (name: string, key: string | undefined, what: string) => {
      secretRefs.add(name);
      if (overlay === "production") return; // created out of band; checked below
      assert.ok(secrets.has(name), `${what}: Secret ${name} exists`);
      if (key) assert.ok(secrets.get(name)!.includes(key), `${what}: Secret ${name} has key ${key}`);
    };
    for (const w of pods) {
      const name = `${w.obj.kind}/${w.obj.metadata.name}`;
      const spec = w.obj.spec as Obj & { selector: { matchLabels: Record<string, string> } };
      assert.ok(matches(spec.selector.matchLabels, w.labels), `${name}: the selector matches the template's labels`);
      const all = [...w.pod.containers, ...(w.pod.initContainers ?? [])];
      assert.equal(new Set(all.map((c) => c.name)).size, all.length, `${name}: container names are unique`);
      const claims = ((w.obj.spec as Obj).volumeClaimTemplates as { metadata: { name: string } }[] | undefined) ?? [];
      const volumes = new Map<string, Obj>([
        ...(w.pod.volumes ?? []).map((v) => [v.name, v] as const),
        ...claims.map((t) => [t.metadata.name, { name: t.metadata.name }] as const),
      ]);
      assert.equal(volumes.size, (w.pod.volumes ?? []).length + claims.length, `${name}: volume names are unique`);
      const portNames = new Set<string>();
      const hostPorts = new Set<number>();
      for (const v of volumes.values()) {
        if (isObj(v.configMap)) assert.ok(configMaps.has(v.configMap.name as string), `${name}: ConfigMap ${String(v.configMap.name)} exists`);
        if (isObj(v.secret)) checkSecretKey(v.secret.secretName as string, undefined, name);
      }
      for (const c of all) {
        const cn = `${name} ${c.name}`;
        const sc = c.securityContext ?? {};
        const caps = sc.capabilities?.add ?? [];
        if (sc.allowPrivilegeEscalation === false) {
          assert.ok(!sc.privileged && !caps.includes("SYS_ADMIN"), `${cn}: allowPrivilegeEscalation false cannot go with privileged or SYS_ADMIN`);
        }
        const mounts = c.volumeMounts ?? [];
        assert.equal(new Set(mounts.map((m) => m.mountPath)).size, mounts.length, `${cn}: mount paths are unique`);
        for (const m of mounts) {
          assert.ok(volumes.has(m.name), `${cn}: volume ${m.name} exists`);
          if (m.mountPropagation === "Bidirectional")
            assert.equal(sc.privileged, true, `${cn}: Bidirectional mount propagation is only for privileged containers`);
        }
        for (const p of c.ports ?? []) {
          if (p.name) {
            assert.match(p.name, /^(?=.{1,15}$)[a-z0-9]+(-[a-z0-9]+)*$/, `${cn}: port name ${p.name} is an IANA service name`);
            assert.ok(!portNames.has(p.name), `${cn}: port name ${p.name} is unique in the pod`);
            portNames.add(p.name);
          }
          if (w.pod.hostNetwork) {
            assert.ok(p.hostPort === undefined || p.hostPort === p.containerPort, `${cn}: with hostNetwork hostPort must equal containerPort`);
            assert.ok(!hostPorts.has(p.containerPort), `${cn}: host port ${p.containerPort} used once on the node`);
            hostPorts.add(p.containerPort);
          }
        }
        // $(VAR) in env values may only name variables defined earlier; in args/command any of the container's.
        const defined: string[] = [];
        const envNames = (c.env ?? []).map((e) => e.name);
        assert.equal(new Set(envNames).size, envNames.length, `${cn}: env names are unique`);
        for (const e of c.env ?? []) {
          for (const m of (e.value ?? "").matchAll(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g))
            assert.ok(defined.includes(m[1]), `${cn}: ${e.name} uses $(${m[1]}) defined before it`);
          defined.push(e.name);
          if (e.valueFrom?.secretKeyRef) checkSecretKey(e.valueFrom.secretKeyRef.name, e.valueFrom.secretKeyRef.key, cn);
          if (e.valueFrom?.configMapKeyRef)
            assert.ok(
              configMaps.get(e.valueFrom.configMapKeyRef.name)?.includes(e.valueFrom.configMapKeyRef.key),
              `${cn}: ConfigMap key ${e.valueFrom.configMapKeyRef.key}`,
            );
        }
        for (const a of [...(c.command ?? []), ...(c.args ?? [])]) {
          for (const m of a.matchAll(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g))
            assert.ok(envNames.includes(m[1]), `${cn}: argument uses $(${m[1]}), an env var of the container`);
        }
        for (const p of [c.livenessProbe, c.startupProbe])
          if (p) assert.ok(p.successThreshold === undefined || p.successThreshold === 1, `${cn}: liveness/startup successThreshold must be 1`);
        const declared = (c.ports ?? []).map((p) => p.containerPort);
        for (const p of [c.livenessProbe, c.readinessProbe, c.startupProbe]) {
          const port = p?.grpc?.port ?? p?.httpGet?.port ?? p?.tcpSocket?.port;
          if (port !== undefined) assert.ok(declared.includes(port), `${cn}: probe port ${port} is a declared container port`);
        }
      }
    }
    // Services, PDBs and NetworkPolicies select pods that exist, on ports they serve.
    for (const o of objs) {
      const spec = o.spec as Obj;
      if (o.kind === "Service") {
        const sel = spec.selector as Record<string, string>;
        const targets = pods.filter((w) => matches(sel, w.labels));
        assert.ok(targets.length > 0, `Service ${o.metadata.name} selects a workload`);
        for (const p of spec.ports as { port: number; targetPort: number }[]) {
          assert.ok(
            targets.every((w) => w.pod.containers.some((c) => (c.ports ?? []).some((cp) => cp.containerPort === p.targetPort))),
            `Service ${o.metadata.name}: targetPort ${p.targetPort} is served by every selected pod`,
          );
        }
      }
      if (o.kind === "PodDisruptionBudget" || o.kind === "NetworkPolicy") {
        const sel = ((o.kind === "NetworkPolicy" ? spec.podSelector : spec.selector) as { matchLabels: Record<string, string> }).matchLabels;
        assert.ok(
          pods.some((w) => matches(sel, w.labels)),
          `${o.kind} ${o.metadata.name} selects a workload`,
        );
      }
    }
    if (overlay === "production") {
      assert.equal(secrets.size, 0, "production ships no Secret: they are created from a secret store");
      const ops = readFileSync(join(ROOT, "docs", "operations.md"), "utf8");
      for (const s of secretRefs)
        assert.match(ops, new RegExp(`kubectl[^\\n]*create secret generic ${s}\\b`), `docs/operations.md says how to create Secret ${s}`);
    }
    // microvpc-redis: Redis's default user; -control: ipam's user; -acl: the aclfile (docs/redis-acl.md).
    // microvpc-tls: the control plane's gRPC certificate (and the CA vmm trusts).
    assert.deepEqual([...secretRefs].sort(), ["microvpc-redis", "microvpc-redis-acl", "microvpc-redis-control", "microvpc-tls", "microvpc-token"]);
  });
}

// ---------- the entry point and its flags

for (const overlay of OVERLAYS) {
  test(`${overlay}: every microvpc container runs \`microvpcd <service>\` with flags and MICROVPC_* variables the daemon reads`, async () => {
    const help = await helps;
    const objs = rendered[overlay];
    const image = microvpcImage(overlay);
    const cs = microvpcContainers(objs, image);
    const runs = cs.map(({ c }) => (c.args ?? []).join(" ")).sort();
    assert.deepEqual(
      runs,
      RUNS,
      "ipam, firewall --api-only and gateway --api-only in ipam's Deployment; netagent, firewall, gateway and vmm in the hypervisor DaemonSet",
    );
    const hostIdSources = new Set<string>();
    for (const { w, c } of cs) {
      const svc = c.args![0];
      const cn = `${w.obj.kind}/${w.obj.metadata.name} ${c.name}`;
      // The control plane's pod: ipam and the cluster-wide firewall and gateway APIs.
      const control = w.obj.kind === "Deployment" && w.obj.metadata.name === "microvpc-ipam";
      const apiOnly = c.args!.includes("--api-only");
      assert.equal(apiOnly, control && API_ONLY.includes(svc), `${cn}: --api-only exactly on the firewall and gateway of ipam's pod`);
      // The mode as a flag, never as MICROVPC_API_ONLY (any value of which, "false" too, turns it on).
      assert.equal(envOf(c, "MICROVPC_API_ONLY"), undefined, `${cn}: no MICROVPC_API_ONLY`);
      if (apiOnly) assert.deepEqual(c.args, [svc, "--api-only"], `${cn}: \`microvpcd ${svc} --api-only\``);
      // The control plane's pod runs the Dockerfile's control-plane target (no QEMU).
      assert.equal(c.image, control ? microvpcImage(overlay, "microvpc-control-plane") : image, `${cn}: the overlay's microvpc image`);
      assert.deepEqual(c.command, ENTRY, `${cn}: command is the image's ENTRYPOINT, tini then microvpcd (bin/microvpcd.js, as in test/lib/daemon.ts)`);
      assert.ok((SERVICES as readonly string[]).includes(svc), `${cn}: ${svc} is a microvpcd service`);
      assert.equal(c.name, svc, `${cn}: the container is named after its service`);
      for (const a of c.args!.slice(1)) {
        if (a.startsWith("-")) assert.ok(help[svc].flags.has(a.split("=")[0]), `${cn}: flag ${a} is in \`microvpcd ${svc} --help\``);
      }
      const env = c.env ?? [];
      const text = JSON.stringify([c.args, env.map((e) => e.value)]);
      for (const e of env) {
        if (e.name.startsWith("MICROVPC_"))
          assert.ok(help[svc].env.has(e.name), `${cn}: ${e.name} is read by microvpcd ${svc} (--help lists ${[...help[svc].env].join(", ")})`);
        else assert.ok(text.includes(`$(${e.name})`), `${cn}: ${e.name} is not a MICROVPC_* variable, so it must only be a helper used as $(${e.name})`);
      }
      const val = (n: string) => envOf(c, n)?.value?.replaceAll("$(POD_IP)", "10.1.2.3");
      // Listeners: the default ports, probes on them, and protection off loopback.
      const listen = parseListen(val("MICROVPC_LISTEN") ?? `127.0.0.1:${DEFAULT_PORT[svc]}`);
      const metrics = parseListen(val("MICROVPC_METRICS_LISTEN") ?? `127.0.0.1:${DEFAULT_PORT[svc] + 2000}`);
      assert.equal(listen.port, DEFAULT_PORT[svc], `${cn}: gRPC on the default port`);
      assert.equal(metrics.port, DEFAULT_PORT[svc] + 2000, `${cn}: metrics on port+2000`);
      // Readiness probes grpc.health.v1 on its own plaintext listener (--health-listen, port+1000),
      // which needs no token or client certificate, so it keeps working when the gRPC port wants TLS.
      const health = parseListen(val("MICROVPC_HEALTH_LISTEN") ?? "missing:0");
      assert.equal(health.port, DEFAULT_PORT[svc] + 1000, `${cn}: the health listener on port+1000`);
      assert.equal(health.host, listen.host, `${cn}: the health listener on the gRPC listener's address`);
      assert.equal(c.readinessProbe?.grpc?.port, health.port, `${cn}: readiness is grpc.health.v1 on the health port`);
      for (const p of [c.livenessProbe, c.startupProbe])
        assert.deepEqual(p?.httpGet, { path: "/healthz", port: metrics.port }, `${cn}: liveness/startup are /healthz on the metrics port`);
      assert.ok(!isLoopback(listen.host), `${cn}: listens beyond loopback (probes and peers reach it)`);
      const tokenFile = val("MICROVPC_TOKEN_FILE");
      assert.ok(
        tokenFile || (val("MICROVPC_TLS_CERT") && val("MICROVPC_TLS_KEY") && val("MICROVPC_TLS_CLIENT_CA")),
        `${cn}: a non-loopback listener needs a token file or mutual TLS`,
      );
      if (tokenFile) {
        const mount = (c.volumeMounts ?? []).find((m) => tokenFile.startsWith(`${m.mountPath}/`));
        assert.ok(mount, `${cn}: ${tokenFile} is on a mounted volume`);
        const vol = (w.pod.volumes ?? []).find((v) => v.name === mount.name) as { secret?: { secretName: string } };
        assert.equal(vol.secret?.secretName, "microvpc-token", `${cn}: the token comes from the Secret microvpc-token`);
        assert.equal(tokenFile.slice(mount.mountPath.length + 1), "token", `${cn}: the file is the Secret's key 'token'`);
      }
      assert.ok(help[svc].logLevels.includes(val("MICROVPC_LOG_LEVEL") ?? "info"), `${cn}: a log level microvpcd accepts`);
      // Redis: the in-cluster Service; the password from the Secret as a file, in no URL or variable.
      const url = new URL(envOf(c, "MICROVPC_REDIS_URL")!.value!);
      assert.equal(url.password, "", `${cn}: the Redis URL carries no password`);
      const svcObj = find(objs, "Service", url.hostname);
      assert.ok(
        (svcObj.spec as { ports: { port: number }[] }).ports.some((p) => p.port === Number(url.port)),
        `${cn}: Redis URL port is the Service's`,
      );
      assert.equal(envOf(c, "REDIS_PASSWORD"), undefined, `${cn}: no Redis password in an environment variable`);
      const pwFile = val("MICROVPC_REDIS_PASSWORD_FILE");
      assert.ok(pwFile, `${cn}: MICROVPC_REDIS_PASSWORD_FILE is set`);
      const pwMount = (c.volumeMounts ?? []).find((m) => pwFile.startsWith(`${m.mountPath}/`));
      assert.ok(pwMount, `${cn}: ${pwFile} is on a mounted volume`);
      const pwVol = (w.pod.volumes ?? []).find((v) => v.name === pwMount.name) as {
        secret?: { secretName: string; items?: { key: string; path: string }[] };
        hostPath?: { path: string; type?: string };
      };
      // Redis users (docs/redis-acl.md): ipam is microvpc-control with its own
      // Secret; each hypervisor is microvpc-host-<node name> with a password
      // file provisioned on the node — except in dev, where the agents share
      // Redis's default user (microvpc-redis), as the quickstart does.
      const user = val("MICROVPC_REDIS_USER");
      const perHost = !control && HYPERVISOR.includes(svc) && overlay !== "dev";
      if (control) assert.equal(user, "microvpc-control", `${cn}: ipam's pod runs as the control plane's Redis user`);
      else if (perHost) assert.equal(user, "microvpc-host-$(MICROVPC_HOST_ID)", `${cn}: the hypervisor's own Redis user`);
      else assert.equal(user, "", `${cn}: dev agents use Redis's default user`);
      if (perHost) {
        assert.deepEqual(pwVol.hostPath, { path: "/etc/microvpc/redis", type: "Directory" }, `${cn}: the node's own password file`);
        assert.equal(pwVol.secret, undefined);
        assert.equal(pwFile, "/etc/microvpc/redis/password");
      } else {
        const secret = control ? "microvpc-redis-control" : "microvpc-redis";
        assert.equal(pwVol.hostPath, undefined);
        assert.equal(pwVol.secret?.secretName, secret, `${cn}: the Redis password comes from the Secret ${secret}`);
        const item = pwVol.secret?.items?.find((i) => i.path === pwFile.slice(pwMount.mountPath.length + 1));
        assert.equal(item?.key ?? pwFile.slice(pwMount.mountPath.length + 1), "password", `${cn}: the file is the Secret's key 'password'`);
      }
      // Host ids: every agent that takes one gets the node name, the same for
      // all. The --api-only instances take none: there it is only a label
      // (the pod's hostname), never a hypervisor's id.
      if (apiOnly) assert.equal(envOf(c, "MICROVPC_HOST_ID"), undefined, `${cn}: no host id (not a hypervisor)`);
      else if (help[svc].env.has("MICROVPC_HOST_ID")) {
        const src = envOf(c, "MICROVPC_HOST_ID")?.valueFrom?.fieldRef?.fieldPath;
        assert.equal(src, "spec.nodeName", `${cn}: --host-id comes from the node name (downward API)`);
        hostIdSources.add(src!);
      }
      if (!control) {
        assert.ok(HYPERVISOR.includes(svc), `${cn}: an agent`);
        assert.equal(w.obj.kind, "DaemonSet");
        assert.equal(envOf(c, "POD_IP")?.valueFrom?.fieldRef?.fieldPath, "status.podIP", `${cn}: listens on the node address (hostNetwork pod IP)`);
      }
    }
    assert.equal(hostIdSources.size, 1, "netagent and firewall agree on the host id");
  });
}

test("the containers' entry point is the one the integration tests start", () => {
  assert.equal(PKG.bin.microvpcd, "bin/microvpcd.js");
  const harness = readFileSync(join(ROOT, "test", "lib", "daemon.ts"), "utf8");
  assert.match(harness, /const script = o\.script \?\? join\(ROOT, "bin", "microvpcd\.js"\);/, "test/lib/daemon.ts starts bin/microvpcd.js");
  assert.match(harness, /\.\.\.shebangNodeFlags\(script\),[\s\S]{0,80}?\bscript,\s*service\b/, "…as node <its #! flags> bin/microvpcd.js <service>");
  // The image, systemd and k8s execute the file: its #! line carries the heap flags.
  assert.deepEqual(shebangNodeFlags(join(ROOT, "bin", "microvpcd.js")), ["--max-semi-space-size=2"]);
  const df = readFileSync(join(ROOT, "Dockerfile"), "utf8");
  assert.match(df, /ln -s \/app\/bin\/microvpcd\.js \/usr\/local\/bin\/microvpcd\b/, "microvpcd on PATH is bin/microvpcd.js");
  assert.match(df, /^WORKDIR \/app$/m);
  assert.match(df, /^COPY bin \.\/bin$/m);
  assert.match(df, /^ENTRYPOINT \["tini", "--", "microvpcd"\]$/m);
});

// ---------- what the overlays claim

function redisConf(objs: K8sObject[]): Map<string, string> {
  const cm = find(objs, "ConfigMap", "microvpc-redis-config").data as Record<string, string>;
  const conf = new Map<string, string>();
  for (const line of cm["redis.conf"].split("\n")) {
    const m = /^\s*([a-z-]+)\s+(.*?)\s*$/.exec(line);
    if (m && !line.trim().startsWith("#")) {
      assert.ok(!conf.has(m[1]) || m[1] === "save", `redis.conf sets ${m[1]} once`);
      conf.set(m[1], m[2]);
    }
  }
  // Nothing appended at start may weaken it.
  assert.doesNotMatch(cm["init.sh"], /appendfsync|appendonly|CONFIG SET/i, "init.sh does not touch persistence");
  return conf;
}

for (const overlay of OVERLAYS) {
  test(`${overlay}: keeps the base's promises (durability, ipam ≥ 2 + PDB, the hypervisor DaemonSet, limits)`, () => {
    const objs = rendered[overlay];
    const conf = redisConf(objs);
    assert.equal(conf.get("appendonly"), "yes");
    assert.equal(conf.get("appendfsync"), "always", "README 'Durability': every acknowledged allocation is on disk");
    assert.equal(conf.get("maxmemory-policy"), "noeviction", "IPAM state is never evicted");
    const redis = find(objs, "StatefulSet", "microvpc-redis").spec as { volumeClaimTemplates: { metadata: { name: string } }[] };
    assert.equal(redis.volumeClaimTemplates[0].metadata.name, "data", "Redis data on a PVC");
    assert.ok(container(objs, "StatefulSet", "microvpc-redis", "redis").volumeMounts!.some((m) => m.name === "data" && m.mountPath === "/data"));

    const ipam = find(objs, "Deployment", "microvpc-ipam").spec as { replicas: number };
    assert.ok(ipam.replicas >= 2, "ipam runs at least 2 replicas");
    const pdb = find(objs, "PodDisruptionBudget", "microvpc-ipam").spec as Obj;
    assert.ok(pdb.maxUnavailable === 1 || (typeof pdb.minAvailable === "number" && pdb.minAvailable < ipam.replicas));
    find(objs, "Service", "microvpc-ipam");

    const ds = find(objs, "DaemonSet", "microvpc-hypervisor").spec as Obj & {
      updateStrategy: { type: string; rollingUpdate: { maxUnavailable: number } };
      template: { spec: PodSpec & Obj };
    };
    const pod = ds.template.spec;
    assert.equal(pod.hostNetwork, true);
    assert.equal(pod.dnsPolicy, "ClusterFirstWithHostNet", "cluster DNS (microvpc-redis) from the host network");
    assert.deepEqual(pod.nodeSelector, { "microvpc.io/hypervisor": "true" });
    assert.deepEqual(ds.updateStrategy, { type: "RollingUpdate", rollingUpdate: { maxUnavailable: 1, maxSurge: 0 } });
    assert.deepEqual(
      pod.containers.map((c) => c.name),
      ["netagent", "firewall", "gateway", "vmm"],
    );
    const hostPaths = Object.fromEntries((pod.volumes ?? []).filter((v) => isObj(v.hostPath)).map((v) => [v.name, (v.hostPath as { path: string }).path]));
    assert.deepEqual(hostPaths, {
      netns: "/run/netns",
      wireguard: "/var/run/wireguard",
      state: "/var/lib/microvpc",
      // The node's own Redis password (docs/redis-acl.md); dev uses the shared Secret.
      // The node's own Redis password (docs/redis-acl.md) and gRPC certificate; dev uses the shared Secret and plaintext.
      ...(overlay === "dev" ? {} : { "redis-password": "/etc/microvpc/redis", tls: "/etc/microvpc/tls" }),
    });
    // Privileges, exactly (deploy/k8s/README.md "Privileges").
    const [netagent, firewall, gateway, vmm] = pod.containers;
    const propagation = (c: Container) => c.volumeMounts!.find((m) => m.name === "netns")?.mountPropagation;
    assert.equal(netagent.securityContext?.privileged, true, "netagent: Bidirectional /run/netns and per-namespace sysctls need privileged");
    assert.equal(propagation(netagent), "Bidirectional", "netagent's namespaces reach the host and outlive the container");
    assert.ok(netagent.volumeMounts!.some((m) => m.name === "wireguard"));
    assert.ok(
      netagent.volumeMounts!.some((m) => m.name === "state" && m.mountPath === "/var/lib/microvpc"),
      "netagent's WireGuard key survives the pod",
    );
    // VPCs span nodes as shipped: the overlay is on, its endpoint the node's address,
    // and the underlay interface found from it (whatever the nodes call it).
    assert.ok(envOf(netagent, "MICROVPC_OVERLAY")?.value, "netagent: --overlay");
    assert.equal(envOf(netagent, "MICROVPC_UNDERLAY_ADDRESS")?.value, "$(POD_IP)", "netagent: the node's address is its WireGuard endpoint");
    assert.equal(envOf(netagent, "MICROVPC_UNDERLAY_INTERFACE"), undefined, "netagent: the interface holding that address (auto)");
    assert.ok(!firewall.securityContext?.privileged, "firewall is not privileged");
    assert.deepEqual(firewall.securityContext?.capabilities, { drop: ["ALL"], add: ["NET_ADMIN", "SYS_ADMIN"] }, "firewall: nft/conntrack + ip netns exec");
    assert.deepEqual(firewall.securityContext?.appArmorProfile, { type: "Unconfined" }, "firewall: ip netns exec mounts sysfs");
    assert.equal(propagation(firewall), "HostToContainer", "firewall sees the netagent's namespaces");
    assert.equal(gateway.securityContext?.privileged, true, "gateway: sysctl -w net.ipv4.ip_forward on the host");
    assert.equal(propagation(gateway), "HostToContainer", "gateway sees the netagent's namespaces");
    assert.equal(vmm.securityContext?.privileged, true, "vmm: ip netns add (Bidirectional) and ping in VPC namespaces");
    assert.equal(propagation(vmm), "Bidirectional", "vmm's guest namespaces reach the host (and the netagent)");
    // vmm drives the other services where they listen, with their token.
    // Over https:// where the daemon serves TLS (production: a per-node certificate), else plaintext (dev).
    const listenOf = (c: Container) => `${envOf(c, "MICROVPC_TLS_CERT") ? "https://" : ""}${envOf(c, "MICROVPC_LISTEN")?.value}`;
    for (const c of [netagent, firewall, gateway, vmm]) {
      const tls = !!envOf(c, "MICROVPC_TLS_CERT") && !!envOf(c, "MICROVPC_TLS_KEY");
      assert.equal(tls, overlay !== "dev", `${c.name}: TLS on the node address${overlay === "dev" ? " (not in dev)" : ""}`);
      assert.equal(envOf(c, "MICROVPC_INSECURE_PLAINTEXT")?.value, tls ? undefined : "true", `${c.name}: plaintext only where said`);
      assert.equal(
        c.volumeMounts!.some((m) => m.mountPath === "/etc/microvpc/tls"),
        tls,
      );
    }
    // The token goes in clear text nowhere but dev.
    assert.equal(envOf(vmm, "MICROVPC_INSECURE_SEND_TOKEN")?.value, overlay === "dev" ? "true" : undefined);
    assert.equal(envOf(vmm, "MICROVPC_NETAGENT_ADDR")?.value, listenOf(netagent));
    assert.equal(envOf(vmm, "MICROVPC_FIREWALL_ADDR")?.value, listenOf(firewall));
    assert.equal(envOf(vmm, "MICROVPC_GATEWAY_ADDR")?.value, listenOf(gateway));
    // ipam over TLS, through the headless Service, balanced over its replicas (dns:/// + round_robin).
    assert.equal(envOf(vmm, "MICROVPC_IPAM_ADDR")?.value, "https://dns:///microvpc-ipam-headless:7401");
    const caFile = envOf(vmm, "MICROVPC_CA_FILE")?.value;
    const caMount = vmm.volumeMounts!.find((m) => caFile?.startsWith(`${m.mountPath}/`));
    assert.ok(caMount, "vmm: the CA file is mounted");
    const caVol = pod.volumes!.find((v) => v.name === caMount.name) as { secret?: { secretName: string; items: { key: string; path: string }[] } };
    assert.deepEqual(caVol.secret?.secretName, "microvpc-tls", "vmm trusts the CA of ipam's certificate");
    assert.deepEqual(caVol.secret?.items, [{ key: "ca.crt", path: "ca.crt" }], "vmm gets the CA only, never the key");
    const headless = find(objs, "Service", "microvpc-ipam-headless").spec as { clusterIP: string; ports: { port: number }[]; selector: Record<string, string> };
    assert.equal(headless.clusterIP, "None");
    assert.ok(headless.ports.some((p) => p.port === 7401));
    // vmm's token for calls to the others: the mounted Secret file, not a variable.
    assert.equal(envOf(vmm, "MICROVPC_SERVICE_TOKEN"), undefined, "vmm: no token in an environment variable");
    assert.equal(
      envOf(vmm, "MICROVPC_SERVICE_TOKEN_FILE")?.value,
      envOf(vmm, "MICROVPC_TOKEN_FILE")?.value,
      "vmm: the service token is the mounted token file",
    );
    // Nothing is compiled at run time (dist/ ships built), so no container
    // gets a writable /tmp: the root file system stays read-only throughout.
    for (const w of workloads(objs)) {
      for (const c of w.pod.containers) assert.ok(!c.volumeMounts?.some((m) => m.mountPath === "/tmp"), `${w.obj.metadata.name} ${c.name}: no writable /tmp`);
    }

    for (const w of workloads(objs)) {
      for (const c of [...w.pod.containers, ...(w.pod.initContainers ?? [])]) {
        for (const r of ["cpu", "memory"]) {
          assert.ok(
            c.resources?.requests?.[r] !== undefined && c.resources?.limits?.[r] !== undefined,
            `${w.obj.metadata.name} ${c.name}: ${r} request and limit`,
          );
        }
        if (w.obj.kind !== "DaemonSet") {
          // Everything but the hypervisor agents fits Pod Security "restricted".
          const sc = { ...(w.pod.securityContext ?? {}), ...(c.securityContext ?? {}) } as Obj & {
            capabilities?: { drop?: string[] };
            seccompProfile?: { type: string };
          };
          assert.equal(sc.runAsNonRoot, true, `${w.obj.metadata.name} ${c.name}: runAsNonRoot`);
          assert.equal(sc.allowPrivilegeEscalation, false, `${w.obj.metadata.name} ${c.name}: allowPrivilegeEscalation false`);
          assert.deepEqual(sc.capabilities?.drop, ["ALL"], `${w.obj.metadata.name} ${c.name}: drops every capability`);
          assert.equal(sc.seccompProfile?.type, "RuntimeDefault", `${w.obj.metadata.name} ${c.name}: RuntimeDefault seccomp`);
        }
      }
    }
    // Only the orchestrator and the hypervisors reach ipam; only ipam and the hypervisors reach Redis.
    const np = find(objs, "NetworkPolicy", "microvpc-ipam").spec as { ingress: { from: Obj[]; ports: { port: number }[] }[] };
    const grpcRule = np.ingress.find((r) => r.ports.some((p) => p.port === 7401))!;
    assert.ok(
      grpcRule.from.some(
        (f) => isObj(f.podSelector) && (f.podSelector.matchLabels as Obj)["microvpc.io/role"] === "orchestrator" && isObj(f.namespaceSelector),
      ),
    );
    const ns = objs.find((o) => o.kind === "Namespace")!;
    assert.equal(ns.metadata.labels?.["pod-security.kubernetes.io/enforce"], "privileged", "Pod Security admits the hypervisor pod");
    // Every ipBlock in the overlay names the same hypervisor range.
    const blocks = new Set(JSON.stringify(objs.filter((o) => o.kind === "NetworkPolicy").map((o) => o.spec)).match(/"cidr":"[^"]+"/g));
    assert.ok(blocks.size >= 1 && ![...blocks].includes('"cidr":"0.0.0.0/0"'));
  });
}

// ---------- the control plane's pod: ipam and the cluster-wide firewall and gateway APIs

// With per-host Redis users a hypervisor's firewall and gateway may not write
// security groups, network ACLs, NAT gateways, floating IPs or port forwards
// (PERMISSION_DENIED): `microvpcd firewall|gateway --api-only`, as the control
// user, serve those. The base ships them as well as both overlays.
const BUILDS: [string, K8sObject[]][] = [
  ["base", baseObjects],
  ["dev", rendered.dev],
  ["production", rendered.production],
];
type Rule = { from: Obj[]; ports: { port: number; protocol: string }[] };
const ORCHESTRATOR = {
  namespaceSelector: { matchLabels: { "microvpc.io/orchestrator": "true" } },
  podSelector: { matchLabels: { "microvpc.io/role": "orchestrator" } },
};

for (const [build, objs] of BUILDS) {
  test(`${build}: ipam's pod runs \`firewall --api-only\` and \`gateway --api-only\` as microvpc-control, exactly as it runs ipam`, () => {
    const w = workloads(objs).find((x) => x.obj.kind === "Deployment" && x.obj.metadata.name === "microvpc-ipam");
    assert.ok(w);
    assert.deepEqual(
      w.pod.containers.map((c) => c.name),
      ["ipam", "firewall", "gateway"],
    );
    assert.equal(w.pod.initContainers, undefined);
    assert.equal(w.pod.hostNetwork, undefined, "no host network: they touch no kernel state");
    const podSc = w.pod.securityContext as { runAsNonRoot?: boolean; runAsUser?: number; seccompProfile?: { type: string } };
    assert.equal(podSc.runAsNonRoot, true);
    assert.ok(podSc.runAsUser !== undefined && podSc.runAsUser !== 0, "a non-root uid");
    assert.deepEqual(podSc.seccompProfile, { type: "RuntimeDefault" });
    const ipam = w.pod.containers[0];
    const dsGateway = container(objs, "DaemonSet", "microvpc-hypervisor", "gateway");
    // Probes as ipam's, moved to the container's own ports.
    const onPorts = (p: Probe | undefined, map: Record<number, number>): unknown =>
      JSON.parse(JSON.stringify(p), (k, v: unknown) => (k === "port" && typeof v === "number" ? (map[v] ?? v) : v));
    for (const svc of API_ONLY) {
      const c = container(objs, "Deployment", "microvpc-ipam", svc);
      const cn = `${build} ${svc}`;
      const port = DEFAULT_PORT[svc];
      assert.deepEqual(c.command, ENTRY, `${cn}: the image's ENTRYPOINT`);
      assert.deepEqual(c.args, [svc, "--api-only"], `${cn}: the cluster-wide API alone`);
      assert.equal(c.image, ipam.image, `${cn}: ipam's image`);
      assert.equal(c.imagePullPolicy, ipam.imagePullPolicy, `${cn}: ipam's pull policy`);
      // Listeners: the service's default ports, on every pod address, as ipam.
      assert.equal(envOf(c, "MICROVPC_LISTEN")?.value, `0.0.0.0:${port}`);
      assert.equal(envOf(c, "MICROVPC_METRICS_LISTEN")?.value, `0.0.0.0:${port + 2000}`);
      assert.equal(envOf(c, "MICROVPC_HEALTH_LISTEN")?.value, `0.0.0.0:${port + 1000}`);
      // Redis, token and TLS: ipam's, value for value.
      for (const n of [
        "MICROVPC_REDIS_URL",
        "MICROVPC_REDIS_USER",
        "MICROVPC_REDIS_PASSWORD_FILE",
        "MICROVPC_REDIS_TIMEOUT_MS",
        "MICROVPC_TOKEN_FILE",
        "MICROVPC_TLS_CERT",
        "MICROVPC_TLS_KEY",
      ]) {
        assert.ok(envOf(ipam, n), `ipam sets ${n}`);
        assert.deepEqual(envOf(c, n), envOf(ipam, n), `${cn}: ${n} as ipam's`);
      }
      assert.equal(envOf(c, "MICROVPC_REDIS_USER")?.value, "microvpc-control", `${cn}: the control plane's Redis user`);
      // The token crosses the network only over TLS: no plaintext escape hatch.
      assert.equal(envOf(c, "MICROVPC_INSECURE_PLAINTEXT"), undefined, `${cn}: TLS, not plaintext`);
      // Nothing else: no host id (not a hypervisor), no MICROVPC_API_ONLY (the flag says it).
      assert.deepEqual(
        (c.env ?? []).map((e) => e.name).sort(),
        [
          "MICROVPC_HEALTH_LISTEN",
          "MICROVPC_LISTEN",
          "MICROVPC_LOG_LEVEL",
          "MICROVPC_METRICS_LISTEN",
          ...(svc === "gateway" ? ["MICROVPC_PUBLIC_POOL"] : []),
          "MICROVPC_REDIS_PASSWORD_FILE",
          "MICROVPC_REDIS_TIMEOUT_MS",
          "MICROVPC_REDIS_URL",
          "MICROVPC_REDIS_USER",
          "MICROVPC_TLS_CERT",
          "MICROVPC_TLS_KEY",
          "MICROVPC_TOKEN_FILE",
        ],
        `${cn}: its variables`,
      );
      assert.deepEqual(c.volumeMounts, ipam.volumeMounts, `${cn}: the token and the control user's password, mounted as ipam's`);
      assert.deepEqual(
        c.ports,
        [
          { name: `grpc-${svc}`, containerPort: port, protocol: "TCP" },
          { name: `mx-${svc}`, containerPort: port + 2000, protocol: "TCP" },
          { name: `health-${svc}`, containerPort: port + 1000, protocol: "TCP" },
        ],
        `${cn}: gRPC, metrics and health ports`,
      );
      assert.deepEqual(c.startupProbe, onPorts(ipam.startupProbe, { 9401: port + 2000 }), `${cn}: ipam's startup probe, /healthz`);
      assert.deepEqual(c.readinessProbe, onPorts(ipam.readinessProbe, { 8401: port + 1000 }), `${cn}: ipam's readiness probe, grpc.health.v1`);
      assert.deepEqual(c.livenessProbe, onPorts(ipam.livenessProbe, { 9401: port + 2000 }), `${cn}: ipam's liveness probe, /healthz`);
      assert.equal(c.readinessProbe?.grpc?.port, port + 1000);
      assert.deepEqual(c.lifecycle, ipam.lifecycle, `${cn}: ipam's preStop`);
      // Restricted: non-root (the pod's uid), no capabilities, read-only root file system.
      assert.deepEqual(c.securityContext, { allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: { drop: ["ALL"] } });
      assert.deepEqual(c.securityContext, ipam.securityContext, `${cn}: ipam's security context`);
      for (const r of ["cpu", "memory"]) assert.ok(c.resources?.requests?.[r] && c.resources?.limits?.[r], `${cn}: ${r} request and limit`);
    }
    // Floating IPs are allocated here: from the pool the hypervisors' gateways use.
    const gw = container(objs, "Deployment", "microvpc-ipam", "gateway");
    assert.ok(envOf(gw, "MICROVPC_PUBLIC_POOL"), "the api-only gateway sets its pool explicitly");
    assert.ok(envOf(dsGateway, "MICROVPC_PUBLIC_POOL"), "the hypervisors' gateway sets its pool explicitly");
    assert.equal(envOf(gw, "MICROVPC_PUBLIC_POOL")?.value, envOf(dsGateway, "MICROVPC_PUBLIC_POOL")?.value, "the hypervisors' public pool");
    assert.equal(envOf(gw, "MICROVPC_RESERVED_PORTS")?.value, envOf(dsGateway, "MICROVPC_RESERVED_PORTS")?.value, "the hypervisors' reserved ports");
    // The control user's password: ipam's Secret, one volume for all three.
    const vols = Object.fromEntries((w.pod.volumes ?? []).map((v) => [v.name, v]));
    assert.deepEqual(Object.keys(vols).sort(), ["redis-password", "tls", "token"]);
    // The serving certificate and key, from the Secret cert-manager (or the operator) fills.
    assert.deepEqual(vols.tls.secret, {
      secretName: "microvpc-tls",
      items: [
        { key: "tls.crt", path: "tls.crt" },
        { key: "tls.key", path: "tls.key" },
      ],
      defaultMode: 0o440,
    });
    for (const c of w.pod.containers) {
      assert.equal(envOf(c, "MICROVPC_TLS_CERT")?.value, "/etc/microvpc/tls/tls.crt", `${c.name}: serves TLS`);
      assert.equal(envOf(c, "MICROVPC_TLS_KEY")?.value, "/etc/microvpc/tls/tls.key");
      assert.ok(c.volumeMounts?.some((m) => m.name === "tls" && m.mountPath === "/etc/microvpc/tls" && m.readOnly));
    }
    assert.deepEqual(vols["redis-password"].secret, {
      secretName: "microvpc-redis-control",
      items: [{ key: "password", path: "password" }],
      defaultMode: 0o440,
    });
    assert.deepEqual(vols.token.secret, { secretName: "microvpc-token", defaultMode: 0o440 });
    // The Service: ipam on 7401, the firewall API on 7403, the gateway API on 7404 (deploy/k8s/README.md).
    const svc = find(objs, "Service", "microvpc-ipam").spec as {
      selector: Record<string, string>;
      ports: { name: string; port: number; targetPort: number; protocol: string; appProtocol?: string }[];
    };
    assert.ok(matches(svc.selector, w.labels), "the Service selects ipam's pod");
    assert.deepEqual(
      svc.ports.map((p) => `${p.name} ${p.port}->${p.targetPort}/${p.protocol}${p.appProtocol ? ` ${p.appProtocol}` : ""}`),
      [
        "grpc 7401->7401/TCP https",
        "metrics 9401->9401/TCP",
        "grpc-firewall 7403->7403/TCP https",
        "mx-firewall 9403->9403/TCP",
        "grpc-gateway 7404->7404/TCP https",
        "mx-gateway 9404->9404/TCP",
      ],
    );
    assert.ok(
      matches(
        (find(objs, "PodDisruptionBudget", "microvpc-ipam").spec as { selector: { matchLabels: Record<string, string> } }).selector.matchLabels,
        w.labels,
      ),
    );
    // NetworkPolicy: the orchestrator reaches the APIs; the hypervisors ipam
    // only (they never call the control user's firewall and gateway);
    // Prometheus the metrics.
    const np = find(objs, "NetworkPolicy", "microvpc-ipam").spec as {
      podSelector: { matchLabels: Record<string, string> };
      policyTypes: string[];
      ingress: Rule[];
    };
    assert.ok(matches(np.podSelector.matchLabels, w.labels));
    assert.deepEqual(np.policyTypes, ["Ingress"], "egress is open: Redis's own policy admits this pod");
    const rule = (port: number): Rule => {
      const r = np.ingress.filter((x) => x.ports.some((p) => p.port === port));
      assert.equal(r.length, 1, `one rule admits port ${port}`);
      return r[0];
    };
    const grpc = rule(7401);
    assert.deepEqual(grpc.ports, [{ port: 7401, protocol: "TCP" }]);
    assert.deepEqual(grpc.from[0], ORCHESTRATOR);
    assert.ok(grpc.from.length > 1 && grpc.from.slice(1).every((f) => isObj(f.ipBlock) && Object.keys(f).length === 1), "ipam: and the hypervisors");
    const api = rule(7403);
    assert.equal(rule(7404), api);
    assert.deepEqual(api.from, [ORCHESTRATOR], "the firewall and gateway APIs: the orchestrator alone");
    assert.deepEqual(api.ports, [
      { port: 7403, protocol: "TCP" },
      { port: 7404, protocol: "TCP" },
    ]);
    const mx = rule(9401);
    assert.equal(rule(9403), mx);
    assert.equal(rule(9404), mx);
    assert.deepEqual(mx.from, [{ namespaceSelector: { matchLabels: { "microvpc.io/monitoring": "true" } } }]);
    assert.equal(np.ingress.length, 3);
    // Every port the Service publishes is admitted by the policy.
    for (const p of svc.ports) rule(p.targetPort);
    // Redis (production: HAProxy in front of it) admits this pod, so all three containers reach it.
    const redisNp = find(objs, "NetworkPolicy", build === "production" ? "microvpc-redis-proxy" : "microvpc-redis").spec as { ingress: Rule[] };
    assert.ok(
      redisNp.ingress.some(
        (r) =>
          r.ports.some((p) => p.port === 6379) &&
          r.from.some(
            (f) => isObj(f.podSelector) && !f.namespaceSelector && matches((f.podSelector as { matchLabels: Record<string, string> }).matchLabels, w.labels),
          ),
      ),
      "Redis admits the control plane's pod",
    );
    for (const o of objs.filter((x) => x.kind === "NetworkPolicy")) {
      const spec = o.spec as { podSelector: { matchLabels: Record<string, string> }; policyTypes: string[] };
      if (matches(spec.podSelector.matchLabels, w.labels)) assert.ok(!spec.policyTypes.includes("Egress"), `${o.metadata.name}: no egress rule cuts Redis off`);
    }
  });
}

test("dev: its own namespace, the local image, committed dev-only Secrets, a small Redis, debug logs", () => {
  const objs = rendered.dev;
  assert.ok(objs.every((o) => o.kind === "Namespace" || o.metadata.namespace === "microvpc-dev"));
  for (const { w, c } of microvpcContainers(objs, "microvpc:dev")) {
    assert.equal(c.image, w.obj.kind === "Deployment" ? "microvpc-control-plane:dev" : "microvpc:dev");
    assert.equal(c.imagePullPolicy, "IfNotPresent");
  }
  for (const s of objs.filter((o) => o.kind === "Secret")) assert.equal(s.metadata.labels?.["microvpc.io/dev-only"], "true");
  const redis = find(objs, "StatefulSet", "microvpc-redis").spec as {
    replicas: number;
    volumeClaimTemplates: { spec: { resources: { requests: { storage: string } } } }[];
  };
  assert.equal(redis.replicas, 1);
  assert.equal(redis.volumeClaimTemplates[0].spec.resources.requests.storage, "1Gi");
  assert.equal(envOf(container(objs, "Deployment", "microvpc-ipam", "ipam"), "MICROVPC_LOG_LEVEL")?.value, "debug");
  assert.equal(envOf(container(objs, "DaemonSet", "microvpc-hypervisor", "netagent"), "MICROVPC_LOG_LEVEL")?.value, "debug");
  for (const c of ["firewall", "gateway"]) assert.equal(envOf(container(objs, "Deployment", "microvpc-ipam", c), "MICROVPC_LOG_LEVEL")?.value, "debug");
  // The base's values where dev does not change them.
  assert.equal(envOf(container(objs, "DaemonSet", "microvpc-hypervisor", "vmm"), "MICROVPC_LOG_LEVEL")?.value, "info");
  assert.equal(container(objs, "Deployment", "microvpc-ipam", "ipam").resources?.limits?.memory, "512Mi");
});

test("production: pinned image, 3 ipam replicas, Redis with Sentinel behind HAProxy, node-critical agents, no Secrets", () => {
  const objs = rendered.production;
  assert.ok(objs.every((o) => o.kind === "Namespace" || o.metadata.namespace === "microvpc"));
  const image = microvpcImage("production");
  assert.equal(image, `registry.example.com/microvpc:${PKG.version}`, "the image tag is the package version");
  assert.equal(microvpcContainers(objs, image).length, RUNS.length);
  assert.equal((find(objs, "Deployment", "microvpc-ipam").spec as { replicas: number }).replicas, 3);
  const tsc = (
    find(objs, "Deployment", "microvpc-ipam").spec as {
      template: { spec: { topologySpreadConstraints: { topologyKey: string; whenUnsatisfiable: string }[] } };
    }
  ).template.spec.topologySpreadConstraints;
  assert.deepEqual(
    tsc.map((t) => `${t.topologyKey}=${t.whenUnsatisfiable}`),
    ["kubernetes.io/hostname=DoNotSchedule", "topology.kubernetes.io/zone=ScheduleAnyway"],
  );
  // Sentinel.
  const redis = find(objs, "StatefulSet", "microvpc-redis").spec as {
    replicas: number;
    volumeClaimTemplates: { spec: { resources: { requests: { storage: string } } } }[];
  };
  assert.equal(redis.replicas, 3);
  assert.equal(redis.volumeClaimTemplates[0].spec.resources.requests.storage, "20Gi");
  assert.deepEqual(container(objs, "StatefulSet", "microvpc-redis", "sentinel").command, ["redis-sentinel"]);
  assert.equal(envOf(container(objs, "StatefulSet", "microvpc-redis", "config"), "POD_NAME")?.valueFrom?.fieldRef?.fieldPath, "metadata.name");
  const init = (find(objs, "ConfigMap", "microvpc-redis-config").data as Record<string, string>)["init.sh"];
  for (const s of [
    "SENTINEL get-master-addr-by-name microvpc",
    "sentinel monitor microvpc $MASTER 6379 2",
    "replicaof $MASTER 6379",
    "min-replicas-to-write 1",
  ])
    assert.ok(init.includes(s), `init.sh: ${s}`);
  assert.ok((find(objs, "Service", "microvpc-redis-headless").spec as { ports: { port: number }[] }).ports.some((p) => p.port === 26379));
  // Clients reach Redis only through HAProxy, which routes to role:master.
  const sel = (find(objs, "Service", "microvpc-redis").spec as { selector: Record<string, string> }).selector;
  const selected = workloads(objs)
    .filter((w) => matches(sel, w.labels))
    .map((w) => w.obj.metadata.name);
  assert.deepEqual(selected, ["microvpc-redis-proxy"]);
  const cfg = (find(objs, "ConfigMap", "microvpc-redis-proxy").data as Record<string, string>)["haproxy.cfg"];
  assert.match(cfg, /tcp-check expect min-recv \d+ string role:master/);
  assert.match(cfg, /on-marked-down shutdown-sessions/);
  for (const i of [0, 1, 2]) assert.match(cfg, new RegExp(`server redis-${i} microvpc-redis-${i}\\.microvpc-redis-headless:6379`));
  const redisPolicy = JSON.stringify(find(objs, "NetworkPolicy", "microvpc-redis").spec);
  assert.ok(!redisPolicy.includes("ipBlock") && !redisPolicy.includes("microvpc-ipam"), "Redis pods: only the proxy and their peers");
  const proxyPolicy = JSON.stringify(find(objs, "NetworkPolicy", "microvpc-redis-proxy").spec);
  assert.ok(proxyPolicy.includes("microvpc-ipam") && proxyPolicy.includes("ipBlock"), "the proxy: ipam and the hypervisors");
  // The agents.
  const ds = find(objs, "DaemonSet", "microvpc-hypervisor").spec as { minReadySeconds: number; template: { spec: { priorityClassName: string } } };
  assert.equal(ds.template.spec.priorityClassName, "system-node-critical");
  assert.equal(ds.minReadySeconds, 30);
  // What the base had and dev changed stays the base's here.
  assert.equal(envOf(container(objs, "Deployment", "microvpc-ipam", "ipam"), "MICROVPC_LOG_LEVEL")?.value, "info");
  // The base alone (no overlay) has one Redis and no proxy: production added them.
  assert.equal((find(baseObjects, "StatefulSet", "microvpc-redis").spec as { replicas: number }).replicas, 1);
  assert.ok(!baseObjects.some((o) => o.metadata.name === "microvpc-redis-proxy"));
});

test("the shell scripts in ConfigMaps parse (sh -n), and redis-server accepts the Redis config", async (t) => {
  for (const overlay of OVERLAYS) {
    for (const cm of rendered[overlay].filter((o) => o.kind === "ConfigMap")) {
      for (const [k, v] of Object.entries(cm.data as Record<string, string>)) {
        if (k.endsWith(".sh")) execFileSync("sh", ["-n"], { input: v });
      }
    }
  }
  const redisServer = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"].find(existsSync);
  if (!redisServer) return t.skip("redis-server not installed (deploy/packages.txt installs it for CI)");
  const dir = mkdtempSync(join(tmpdir(), "mvpc-redisconf-"));
  try {
    const conf = (find(rendered.production, "ConfigMap", "microvpc-redis-config").data as Record<string, string>)["redis.conf"];
    // The rendered file, with only where it lives changed: no TCP port, a socket in a temp dir.
    writeFileSync(
      join(dir, "redis.conf"),
      conf
        .replace(/^dir .*$/m, `dir ${dir}`)
        .replace(/^bind .*$/m, "bind 127.0.0.1")
        .replace(/^port .*$/m, "port 0") + `\nunixsocket ${dir}/r.sock\nrequirepass "x"\n`,
    );
    const proc = spawn(redisServer, [join(dir, "redis.conf")], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    proc.stdout.on("data", (d) => (out += d));
    proc.stderr.on("data", (d) => (out += d));
    const exited = new Promise((r) => proc.once("exit", r));
    const deadline = Date.now() + 10_000;
    while (!existsSync(join(dir, "r.sock")) && proc.exitCode === null && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    const up = existsSync(join(dir, "r.sock"));
    proc.kill("SIGTERM");
    await exited;
    assert.ok(up, `redis-server refused the config:\n${out}`);
    assert.ok(existsSync(join(dir, "appendonlydir")), "AOF is on");
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

// ---------- the image
// ---------- the image

const DOCKERFILE = readFileSync(join(ROOT, "Dockerfile"), "utf8");
/** Instructions, with continuation lines joined and comments dropped. */
const instructions = DOCKERFILE.replace(/\\\n/g, " ")
  .split("\n")
  .filter((l) => l.trim() && !l.trimStart().startsWith("#"))
  .map((l) => l.trim());

/** deploy/packages.txt (every line .ci/run installs) and what the Dockerfile leaves out of it. */
function packageLists(): { all: string[]; leaveOut: string[] } {
  const all = readFileSync(join(ROOT, "deploy", "packages.txt"), "utf8")
    .split("\n")
    .filter((l) => l.trim() && !l.startsWith("#"))
    .map((l) => l.trim());
  const leaveOut = /^ARG LEAVE_OUT="([^"]*)"$/m.exec(DOCKERFILE)?.[1].split(/\s+/).filter(Boolean);
  assert.ok(leaveOut, "the Dockerfile names what it leaves out in ARG LEAVE_OUT");
  return { all, leaveOut };
}

/** The instructions of one stage (FROM … AS name up to the next FROM). */
function stage(name: string): string[] {
  const i = instructions.findIndex((l) => l.startsWith("FROM ") && l.endsWith(` AS ${name}`));
  assert.ok(i >= 0, `the Dockerfile has a stage (target) ${name}`);
  const j = instructions.findIndex((l, k) => k > i && l.startsWith("FROM "));
  return instructions.slice(i, j < 0 ? undefined : j);
}

/** The global ARGs (before the first FROM) with their defaults. */
function globalArgs(): Record<string, string> {
  const out: Record<string, string> = {};
  for (const l of instructions.slice(
    0,
    instructions.findIndex((x) => x.startsWith("FROM ")),
  )) {
    const m = /^ARG (\w+)=(?:"([^"]*)"|(\S*))$/.exec(l);
    if (m) out[m[1]] = m[2] ?? m[3];
  }
  return out;
}

/**
 * What a target's install step installs: its own commands, run by sh on the
 * real file with the global ARGs' defaults, plus the packages it names after
 * the list (tini). A stage built FROM another adds to that one's packages.
 */
function imagePackages(target = "hypervisor"): string[] {
  const lines = stage(target);
  const parent = /^FROM (\S+) AS/.exec(lines[0])![1];
  const inherited = parent === "${NODE_IMAGE}" ? [] : imagePackages(parent);
  const install = lines.find((l) => l.startsWith("RUN ") && l.includes("apt-get install"));
  assert.ok(install, `${target}: an apt-get install step`);
  const m =
    /^RUN (printf '%s\\n' (?:\$[A-Z_]+ ?)+ > \/tmp\/leave-out)\s+&& apt-get update\s+&& (grep -v '\^#' \/tmp\/packages\.txt \| grep -vxF -f \/tmp\/leave-out)\s+\|\s+xargs apt-get install -y --no-install-recommends ([a-z0-9 -]*?)\s+&& rm -rf /.exec(
      install,
    );
  assert.ok(m, `${target}: the package names come from the file, less what it leaves out, into apt-get install:\n${install}`);
  for (const v of m[1].match(/\$[A-Z_]+/g)!) assert.ok(lines.includes(`ARG ${v.slice(1)}`), `${target}: ${v} is declared in the stage (ARG)`);
  const dir = mkdtempSync(join(tmpdir(), "mvpc-pkgs-"));
  try {
    writeFileSync(join(dir, "packages.txt"), readFileSync(join(ROOT, "deploy", "packages.txt")));
    const script = `${m[1]}\n${m[2]}\n`.replaceAll("/tmp/", `${dir}/`);
    const out = execFileSync("sh", ["-c", script], { encoding: "utf8", env: { ...process.env, ...globalArgs() } });
    return [...new Set([...inherited, ...m[3].split(/\s+/).filter(Boolean), ...out.split(/\s+/).filter(Boolean)])];
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

test("Dockerfile: build stage (esbuild), node:24-bookworm-slim, npm ci --omit=dev, dist/ shipped, microvpcd as ENTRYPOINT, no build at start", () => {
  const arg = /^ARG NODE_IMAGE=(\S+)$/m.exec(DOCKERFILE)?.[1];
  assert.equal(arg, `node:${readFileSync(join(ROOT, ".nvmrc"), "utf8").trim()}-bookworm-slim`, "the image's Node is .nvmrc's major");
  assert.equal(PKG.devEngines.runtime.name, "node");
  assert.match(PKG.devEngines.runtime.version, new RegExp(`^>=${readFileSync(join(ROOT, ".nvmrc"), "utf8").trim()}$`), "devEngines says the same major");
  const froms = instructions.filter((l) => l.startsWith("FROM "));
  assert.deepEqual(
    froms.map((f) => /^FROM (\S+) AS ([\w-]+)$/.exec(f)?.slice(1).join(" ")),
    ["${NODE_IMAGE} build", "${NODE_IMAGE} deps", "${NODE_IMAGE} control-plane", "control-plane hypervisor"],
    "build, deps, the control plane's image and the hypervisor's on top of it (the default target, last)",
  );
  assert.ok(
    instructions.some((l) => /^RUN npm ci --no-audit --no-fund$/.test(l)),
    "the build stage installs every dependency with npm ci",
  );
  // The commit, a build argument (no .git in the context), reaches build.mjs.
  assert.ok(stage("build").includes("ARG MICROVPC_COMMIT"), "the build stage takes MICROVPC_COMMIT");
  assert.ok(stage("build").includes('RUN MICROVPC_COMMIT="$MICROVPC_COMMIT" npm run build'), "the build stage runs npm run build with the commit");
  assert.ok(
    instructions.some((l) => /^RUN npm ci --omit=dev\b/.test(l)),
    "npm ci --omit=dev for the runtime's node_modules",
  );
  assert.ok(!instructions.some((l) => /npm install/.test(l)), "no npm install fallback: the lock is what npm ci installs");
  assert.ok(
    instructions.some((l) => /^COPY --from=deps \/app\/node_modules \.\/node_modules$/.test(l)),
    "the runtime stage takes the deps stage's node_modules",
  );
  assert.ok(instructions.includes("COPY --from=build /app/dist ./dist"), "the runtime stage takes the build's dist/");
  assert.ok(instructions.includes("COPY bin ./bin"));
  const runtime = [...stage("control-plane"), ...stage("hypervisor")];
  for (const dir of ["cli", "services", "gen"]) assert.ok(!runtime.includes(`COPY ${dir} ./${dir}`), `the runtime ships no TypeScript sources (${dir}/)`);
  for (const target of ["control-plane", "hypervisor"]) {
    const lines = stage(target);
    // tini is PID 1: it forwards SIGTERM to microvpcd and reaps the ip/nft/wg children.
    assert.deepEqual(
      lines.filter((l) => l.startsWith("ENTRYPOINT")),
      ['ENTRYPOINT ["tini", "--", "microvpcd"]'],
      `${target}: tini runs microvpcd`,
    );
    assert.ok(imagePackages(target).includes("tini"), `${target}: installs tini`);
    assert.match(lines.filter((l) => l.startsWith("USER")).at(-1) ?? "", /^USER 1000(:1000)?$/, `${target}: non-root unless the manifest says otherwise`);
    // OCI labels: where it comes from, which commit and version, the licence.
    const labels = Object.fromEntries(
      lines.filter((l) => l.startsWith("LABEL ")).flatMap((l) => [...l.matchAll(/(org\.opencontainers\.image\.[a-z]+)="([^"]*)"/g)].map((m) => [m[1], m[2]])),
    );
    assert.equal(labels["org.opencontainers.image.revision"], "$MICROVPC_COMMIT", `${target}: revision label from MICROVPC_COMMIT`);
    assert.equal(labels["org.opencontainers.image.version"], "$MICROVPC_VERSION", `${target}: version label`);
    assert.equal(labels["org.opencontainers.image.source"], "$MICROVPC_SOURCE", `${target}: source label`);
    assert.equal(labels["org.opencontainers.image.licenses"], (PKG as unknown as { license: string }).license, `${target}: package.json's licence`);
    for (const a of ["MICROVPC_COMMIT", "MICROVPC_VERSION", "MICROVPC_SOURCE"]) assert.ok(lines.includes(`ARG ${a}`), `${target}: ARG ${a} in the stage`);
  }
  assert.equal(globalArgs().MICROVPC_VERSION, PKG.version, "the version label's default is package.json's version");
  // No QEMU in the control plane's image; the hypervisor's has it.
  assert.ok(!imagePackages("control-plane").some((p) => p.startsWith("qemu")), "control-plane: no QEMU");
  for (const p of ["cpio", "kmod", "busybox-static"]) assert.ok(!imagePackages("control-plane").includes(p), `control-plane: no guest tool ${p}`);
  assert.ok(imagePackages("hypervisor").includes("qemu-system-x86"), "hypervisor: QEMU for kind=qemu guests");
  const cmd = instructions.filter((l) => l.startsWith("CMD"));
  assert.ok(
    cmd.every((l) => !/npm|tsc|build|install/.test(l)),
    "nothing is built or installed when a container starts",
  );
  // The build context keeps node_modules (and the rest) out.
  const ignore = readFileSync(join(ROOT, ".dockerignore"), "utf8");
  assert.match(ignore, /^\*\*$/m);
  assert.doesNotMatch(ignore, /^!node_modules/m);
  assert.doesNotMatch(ignore, /^!dist/m);
  for (const keep of ["package.json", "package-lock.json", "build.mjs", "bin/", "cli/", "services/", "gen/", "deploy/packages.txt", "deploy/demo.ts"])
    assert.ok(ignore.includes(`!${keep}`), `the build context has ${keep}`);
  // Every file the build stage copies is in the build context.
  for (const l of instructions.filter((x) => /^COPY (?!--from)/.test(x))) {
    for (const src of l.split(/\s+/).slice(1, -1))
      assert.ok(ignore.includes(`!${src.replace(/^\.\//, "")}`) || ignore.includes(`!${src}/`), `${src} (${l}) is in the build context`);
  }
});

test("Dockerfile installs deploy/packages.txt — the file .ci/run installs — less the tools it names, read not copied", () => {
  const ci = readFileSync(join(ROOT, ".ci", "run"), "utf8");
  assert.match(ci, /apt-get install [^\n]*\$\(grep -v '\^#' deploy\/packages\.txt\)/, ".ci/run installs every line of deploy/packages.txt");
  const { all, leaveOut } = packageLists();
  assert.ok(instructions.includes("COPY deploy/packages.txt /tmp/packages.txt"));
  const image = imagePackages();
  const hypervisorOnly = globalArgs().HYPERVISOR_ONLY.split(/\s+/).filter(Boolean);
  assert.deepEqual(
    [...image].sort(),
    [...all.filter((p) => !leaveOut.includes(p)), "tini"].sort(),
    "the hypervisor image installs every listed package but LEAVE_OUT, and tini",
  );
  assert.deepEqual(
    [...imagePackages("control-plane")].sort(),
    [...all.filter((p) => !leaveOut.includes(p) && !hypervisorOnly.includes(p)), "tini"].sort(),
    "the control plane's image installs those but HYPERVISOR_ONLY",
  );
  for (const p of hypervisorOnly) assert.ok(all.includes(p) && !leaveOut.includes(p), `HYPERVISOR_ONLY names ${p}, a listed package the hypervisor installs`);
  for (const p of leaveOut) assert.ok(all.includes(p), `LEAVE_OUT names ${p}, which deploy/packages.txt does not list (stale?)`);
  for (const p of ["iproute2", "nftables", "wireguard-tools", "wireguard-go", "conntrack"]) assert.ok(image.includes(p), `the image has ${p}`);
  for (const p of ["redis-server", "iperf3"]) assert.ok(leaveOut.includes(p), `${p} stays out of the image`);
  for (const p of all) {
    const re = new RegExp(`(^|\\s)${p.replace(/[.+]/g, "\\$&")}(\\s|$)`);
    for (const l of instructions.filter((x) => x.startsWith("RUN")))
      assert.ok(!re.test(l), `${p} is read from deploy/packages.txt, not copied into a RUN line`);
  }
  // The Dockerfile says why each is left out.
  const comments = DOCKERFILE.split("\n")
    .filter((l) => l.startsWith("#"))
    .join("\n");
  for (const p of [...leaveOut, ...hypervisorOnly]) assert.ok(comments.includes(p), `the Dockerfile's comment says why ${p} is left out`);
});

test("the image's packages provide every program the services run", () => {
  const PROVIDER: Record<string, string> = {
    ip: "iproute2",
    tc: "iproute2",
    bridge: "iproute2",
    nft: "nftables",
    conntrack: "conntrack",
    nsenter: "util-linux",
    sysctl: "procps",
    ping: "iputils-ping",
    arping: "iputils-arping",
    wg: "wireguard-tools",
    "wireguard-go": "wireguard-go",
    "qemu-system-x86_64": "qemu-system-x86",
    tee: "coreutils",
    // flow logs: `sh -c "ulogd … | cat"` (services/firewall/flowlogs.ts)
    sh: "dash",
    ulogd: "ulogd2",
  };
  // Debian's Essential packages are in every image, base ones included.
  const ESSENTIAL = new Set(["coreutils", "dash"]);
  const image = imagePackages();
  const programs = new Set<string>();
  const walk = (dir: string): string[] =>
    readdirSync(dir).flatMap((f) => (statSync(join(dir, f)).isDirectory() ? walk(join(dir, f)) : f.endsWith(".ts") ? [join(dir, f)] : []));
  for (const f of walk(join(ROOT, "services"))) {
    const src = readFileSync(f, "utf8");
    for (const m of src.matchAll(/\b(?:run|exec|execFile|spawn|sh)\(\s*"([a-z][a-z0-9_-]*)"/g)) programs.add(m[1]);
    for (const m of src.matchAll(/"netns", "exec", [^,\]]+, "([a-z][a-z0-9_-]*)"/g)) programs.add(m[1]);
    for (const m of src.matchAll(/`--net=\$\{\w+\}`, "([a-z][a-z0-9_-]*)"/g)) programs.add(m[1]);
    for (const m of src.matchAll(/\binN(?:s|etns)\([^,()]+, \[?"([a-z][a-z0-9_-]*)"/g)) programs.add(m[1]);
  }
  for (const must of ["ip", "tc", "nft", "conntrack", "nsenter", "sysctl"]) assert.ok(programs.has(must), `found ${must} in services/ (the scan works)`);
  for (const p of programs) {
    assert.ok(PROVIDER[p], `services/ run ${p}: add its Debian package to deploy/packages.txt and to this map`);
    assert.ok(ESSENTIAL.has(PROVIDER[p]) || image.includes(PROVIDER[p]), `${p} comes from ${PROVIDER[p]}, which the image must install`);
  }
});
