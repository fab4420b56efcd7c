// deploy/k8s/kustomize.ts (the subset test/unit/deploy.test.ts renders with)
// against the real thing: every kustomization under deploy/k8s, and a fixture
// of the merge rules the subset implements, rendered both ways by
// `kubectl kustomize` and by build(), must give the same objects. Resources
// are matched by id (kustomize orders them by kind); everything inside an
// object, list order included, must be equal. Skipped, with the reason, where
// kubectl is missing or its kustomize is older than v4 (Debian bookworm's
// kubernetes-client is kubectl 1.20, whose kustomize v2.0.3 predates the
// `patches:` field, so it is not in deploy/packages.txt).
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { createPrivateKey, X509Certificate } from "node:crypto";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import { test } from "vitest";
import { build, parseYamlDocs, resId, type K8sObject } from "../../deploy/k8s/kustomize.js";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const K8S = join(ROOT, "deploy", "k8s");

function kubectl(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile("kubectl", args, { encoding: "utf8", timeout: 120_000, maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) =>
      resolve({ code: err ? (typeof err.code === "number" ? err.code : -1) : 0, stdout, stderr }),
    );
  });
}

/** Why the cross-check cannot run here, or undefined when it can. */
const unavailable: Promise<string | undefined> = (async () => {
  const r = await kubectl(["version", "--client", "-o", "json"]);
  if (r.code !== 0) return `kubectl is not on PATH (${(r.stderr || "not found").trim().split("\n")[0]})`;
  const v = (JSON.parse(r.stdout) as { kustomizeVersion?: string }).kustomizeVersion ?? "";
  const major = Number(/^v?(\d+)/.exec(v)?.[1]);
  if (!(major >= 4)) return `kubectl's kustomize is ${v || "unknown"}; the cross-check needs v4 or later (the patches: field)`;
  return undefined;
})();

/** Every directory under deploy/k8s holding a kustomization.yaml (components are rendered through the overlays that use them). */
function kustomizations(dir: string): string[] {
  const file = join(dir, "kustomization.yaml");
  const here = existsSync(file) && !/^kind: Component$/m.test(readFileSync(file, "utf8")) ? [dir] : [];
  return [
    ...here,
    ...readdirSync(dir)
      .filter((f) => statSync(join(dir, f)).isDirectory())
      .flatMap((f) => kustomizations(join(dir, f))),
  ];
}

/** Each object by id, with its content as JSON (key order of maps does not matter, list order does). */
function byId(objs: K8sObject[]): Map<string, unknown> {
  const sortKeys = (v: unknown): unknown =>
    Array.isArray(v)
      ? v.map(sortKeys)
      : v && typeof v === "object"
        ? Object.fromEntries(
            Object.keys(v)
              .sort()
              .map((k) => [k, sortKeys((v as Record<string, unknown>)[k])]),
          )
        : v;
  return new Map(objs.map((o) => [resId(o), sortKeys(o)]));
}

async function compare(dir: string): Promise<void> {
  const real = await kubectl(["kustomize", dir]);
  assert.equal(real.code, 0, `kubectl kustomize ${dir}:\n${real.stderr}`);
  const theirs = byId(parseYamlDocs(real.stdout, `kubectl kustomize ${dir}`));
  const ours = byId(build(dir));
  assert.deepEqual([...ours.keys()].sort(), [...theirs.keys()].sort(), `${dir}: the same resources`);
  for (const [id, o] of ours) assert.deepEqual(o, theirs.get(id), `${relative(ROOT, dir)}: ${id} renders as kubectl kustomize renders it`);
}

for (const dir of kustomizations(K8S)) {
  test(`${relative(ROOT, dir)}: kustomize.ts renders what \`kubectl kustomize\` renders`, async (t) => {
    const why = await unavailable;
    if (why) return t.skip(why);
    await compare(dir);
  });
}

test("the merge rules of the subset, on a fixture, as `kubectl kustomize` applies them", async (t) => {
  const why = await unavailable;
  if (why) return t.skip(why);
  const dir = mkdtempSync(join(tmpdir(), "mvpc-kz-x-"));
  try {
    mkdirSync(join(dir, "base"));
    mkdirSync(join(dir, "overlay"));
    writeFileSync(
      join(dir, "base", "d.yaml"),
      `apiVersion: apps/v1
kind: Deployment
metadata: {name: d, labels: {a: b}}
spec:
  replicas: 1
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      topologySpreadConstraints:
        - {topologyKey: h, whenUnsatisfiable: ScheduleAnyway, maxSkew: 1}
        - {topologyKey: z, whenUnsatisfiable: ScheduleAnyway, maxSkew: 1}
      containers:
        - name: a
          image: x
          args: [one, two]
          env: [{name: A, value: "1"}, {name: B, value: "2"}, {name: C, value: "3"}]
          ports: [{containerPort: 1, protocol: TCP, name: p1}]
          volumeMounts: [{name: v, mountPath: /v}]
        - name: b
          image: yy
        - name: gone
          image: yy
      volumes: [{name: v, emptyDir: {}}]
---
apiVersion: v1
kind: Service
metadata: {name: s}
spec:
  selector: {a: b}
  ports: [{port: 1, protocol: TCP, name: one}]
`,
    );
    const head = "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n";
    writeFileSync(join(dir, "base", "kustomization.yaml"), `${head}resources: [d.yaml]\n`);
    writeFileSync(
      join(dir, "overlay", "p.yaml"),
      `apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
spec:
  replicas: 3
  template:
    spec:
      topologySpreadConstraints:
        - {topologyKey: h, whenUnsatisfiable: ScheduleAnyway, $patch: delete}
        - {topologyKey: h, whenUnsatisfiable: DoNotSchedule, maxSkew: 2}
      containers:
        - name: c
          image: z
        - name: a
          args: [three]
          env: [{name: C, value: "30"}, {name: D, value: "4"}, {name: A, value: "10"}]
          ports: [{containerPort: 1, protocol: UDP, name: p1u}, {containerPort: 2, protocol: TCP, name: p2}]
          volumeMounts: [{name: w, mountPath: /w}]
        - name: gone
          $patch: delete
      volumes: [{name: w, emptyDir: {}}]
---
apiVersion: v1
kind: Service
metadata: {name: s}
spec:
  ports: [{port: 2, protocol: TCP, name: two}]
`,
    );
    writeFileSync(
      join(dir, "overlay", "kustomization.yaml"),
      `${head}namespace: ns\nresources: [../base]\npatches: [{path: p.yaml}]\nimages: [{name: x, newName: reg/x, newTag: '1'}]\n`,
    );
    await compare(join(dir, "overlay"));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("production-cert-manager: production plus a CA issuer chain and the control plane's certificate in Secret microvpc-tls", () => {
  const prod = build(join(K8S, "overlays", "production"));
  const objs = build(join(K8S, "overlays", "production-cert-manager"));
  const added = objs.filter((o) => !prod.some((p) => resId(p) === resId(o)));
  assert.deepEqual(added.map((o) => `${o.kind}/${o.metadata.name}`).sort(), [
    "Certificate/microvpc-ca",
    "Certificate/microvpc-tls",
    "Issuer/microvpc-ca",
    "Issuer/microvpc-selfsigned",
  ]);
  assert.equal(objs.length, prod.length + added.length, "production's objects, unchanged in number");
  for (const o of added) {
    assert.equal(o.apiVersion, "cert-manager.io/v1");
    assert.equal(o.metadata.namespace, "microvpc", `${o.kind}/${o.metadata.name} is in production's namespace`);
  }
  const get = (kind: string, name: string) => added.find((o) => o.kind === kind && o.metadata.name === name)!.spec as Record<string, unknown>;
  const tls = get("Certificate", "microvpc-tls") as { secretName: string; dnsNames: string[]; issuerRef: { name: string; kind: string }; usages: string[] };
  assert.equal(tls.secretName, "microvpc-tls", "the Secret the control plane mounts");
  assert.deepEqual(tls.issuerRef, { name: "microvpc-ca", kind: "Issuer", group: "cert-manager.io" });
  assert.ok(tls.usages.includes("server auth"));
  // Every name a client reaches the TLS ports by: the Services, short and in the namespace.
  const services = objs.filter((o) => o.kind === "Service" && (o.spec as { ports: { port: number }[] }).ports.some((p) => p.port === 7401));
  assert.deepEqual(services.map((o) => o.metadata.name).sort(), ["microvpc-ipam", "microvpc-ipam-headless"]);
  for (const svc of services)
    for (const n of [
      svc.metadata.name,
      `${svc.metadata.name}.microvpc`,
      `${svc.metadata.name}.microvpc.svc`,
      `${svc.metadata.name}.microvpc.svc.cluster.local`,
    ])
      assert.ok(tls.dnsNames.includes(n), `the certificate names ${n}`);
  // The vmm's ipam address names one of them.
  const ds = objs.find((o) => o.kind === "DaemonSet")!.spec as {
    template: { spec: { containers: { name: string; env: { name: string; value?: string }[] }[] } };
  };
  const vmm = ds.template.spec.containers.find((c) => c.name === "vmm")!;
  const host = /^https:\/\/dns:\/\/\/([^:]+):/.exec(vmm.env.find((e) => e.name === "MICROVPC_IPAM_ADDR")!.value!)![1];
  assert.ok(tls.dnsNames.includes(host), `vmm's ${host} is on the certificate`);
  // The chain: the CA issuer signs with the CA certificate's Secret, bootstrapped self-signed.
  assert.equal(
    (get("Issuer", "microvpc-ca").ca as { secretName: string }).secretName,
    (get("Certificate", "microvpc-ca") as { secretName: string }).secretName,
  );
  assert.equal(get("Certificate", "microvpc-ca").isCA, true);
  assert.deepEqual((get("Certificate", "microvpc-ca") as { issuerRef: object }).issuerRef, {
    name: "microvpc-selfsigned",
    kind: "Issuer",
    group: "cert-manager.io",
  });
  assert.deepEqual(get("Issuer", "microvpc-selfsigned").selfSigned, {});
});

test("dev's TLS Secret: the certificate matches its key, is signed by ca.crt, and names the Services vmm and the orchestrator use", () => {
  const objs = build(join(K8S, "overlays", "dev"));
  const secret = objs.find((o) => o.kind === "Secret" && o.metadata.name === "microvpc-tls")!;
  assert.equal(secret.type, "kubernetes.io/tls");
  const data = secret.stringData as Record<string, string>;
  const cert = new X509Certificate(data["tls.crt"]);
  const ca = new X509Certificate(data["ca.crt"]);
  assert.ok(cert.checkPrivateKey(createPrivateKey(data["tls.key"])), "tls.key is tls.crt's key");
  assert.ok(cert.verify(ca.publicKey) && cert.checkIssued(ca), "ca.crt signed tls.crt");
  assert.ok(ca.ca && !cert.ca);
  assert.ok(new Date(cert.validTo).getTime() > Date.now() + 365 * 86_400_000, "valid for more than a year from now");
  const ns = objs.find((o) => o.kind === "Namespace")!.metadata.name;
  for (const svc of ["microvpc-ipam", "microvpc-ipam-headless"])
    for (const n of [svc, `${svc}.${ns}`, `${svc}.${ns}.svc`, `${svc}.${ns}.svc.cluster.local`])
      assert.ok(cert.checkHost(n, { subject: "never" }), `the certificate names ${n}`);
});
