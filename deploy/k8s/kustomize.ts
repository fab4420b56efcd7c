// A small, honest subset of kustomize, for the tests (no kustomize binary
// comes from npm without downloading one). It renders exactly the features
// our kustomizations use and throws on anything else, so a manifest that
// depends on a feature it does not implement fails loudly instead of being
// rendered differently from `kubectl kustomize`:
//
//   resources   files (multi-document YAML) and directories holding a
//               kustomization.yaml; an id (apiVersion group, kind, namespace,
//               name) may appear once
//   components  directories holding a `kind: Component` kustomization
//               (resources and patches only), applied as kustomize does:
//               after the resources, to everything accumulated so far,
//               before the kustomization's own patches
//   patches     `- path: FILE` holding a strategic-merge patch that names its
//               target by apiVersion/kind/metadata.name (no `target:`, no
//               JSON 6902, no inline `patch:`)
//   namespace   set on every namespaced resource (cluster-scoped kinds kept)
//   images      name → newName / newTag / digest, in containers and
//               initContainers
//
// Strategic merge, as kustomize (kyaml) does it for the fields we patch:
// maps merge recursively, `null` deletes a key, lists with merge keys — the
// API's x-kubernetes-list-map-keys, which kyaml uses: containers,
// initContainers and imagePullSecrets by name, env by name, volumes by name,
// volumeMounts by mountPath, container ports by containerPort+protocol,
// Service ports by port+protocol, topologySpreadConstraints by
// topologyKey+whenUnsatisfiable — merge element by element (`$patch: delete`
// removes one), every other list is replaced. Order, as kyaml: the patch's
// elements first, in the patch's order, then the base's other elements in
// theirs. Other `$patch`/`$setElementOrder`/`$retainKeys` directives are
// refused, and so is a patch element that leaves out a secondary key the
// matching base element has (kyaml then drops the patch element silently).
// test/unit/deploy-kustomize.test.ts compares every overlay with
// `kubectl kustomize` where kubectl is installed.
//
// CLI: node --import tsx deploy/k8s/kustomize.ts deploy/k8s/overlays/dev
import { existsSync, readFileSync, statSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseAllDocuments, stringify } from "yaml";

export type Obj = Record<string, unknown>;

export interface K8sObject extends Obj {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string; labels?: Record<string, string>; annotations?: Record<string, string> } & Obj;
}

const SUPPORTED_KEYS = new Set(["apiVersion", "kind", "resources", "components", "patches", "namespace", "images"]);
/** What a Component may hold here. */
const COMPONENT_KEYS = new Set(["apiVersion", "kind", "resources", "patches"]);
const CLUSTER_SCOPED = new Set([
  "Namespace",
  "ClusterRole",
  "ClusterRoleBinding",
  "PriorityClass",
  "StorageClass",
  "CustomResourceDefinition",
  "PersistentVolume",
]);

export function isObj(v: unknown): v is Obj {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** kustomize's resource id: group/version is not part of it, the group is. */
export function resId(o: K8sObject): string {
  const group = o.apiVersion.includes("/") ? o.apiVersion.split("/")[0] : "";
  return `${group}|${o.kind}|${o.metadata.namespace ?? ""}|${o.metadata.name}`;
}

export function parseYamlDocs(text: string, file: string): K8sObject[] {
  const out: K8sObject[] = [];
  // YAML 1.1, as kubectl reads manifests (0444 is octal, as in Kubernetes docs).
  for (const doc of parseAllDocuments(text, { version: "1.1" })) {
    if (doc.errors.length) throw new Error(`${file}: ${doc.errors[0].message}`);
    const v = doc.toJS({ maxAliasCount: 0 }) as unknown;
    if (v === null || v === undefined) continue;
    if (!isObj(v) || typeof v.apiVersion !== "string" || typeof v.kind !== "string" || !isObj(v.metadata) || typeof v.metadata.name !== "string") {
      throw new Error(`${file}: every document needs apiVersion, kind and metadata.name`);
    }
    out.push(v as K8sObject);
  }
  return out;
}

function readKustomization(dir: string, kind: "Kustomization" | "Component" = "Kustomization"): Obj {
  const file = join(dir, "kustomization.yaml");
  if (!existsSync(file)) throw new Error(`${dir}: no kustomization.yaml`);
  const docs = parseAllDocuments(readFileSync(file, "utf8"), { version: "1.1" });
  if (docs.length !== 1 || docs[0].errors.length) throw new Error(`${file}: one YAML document expected`);
  const k = docs[0].toJS() as Obj;
  const keys = kind === "Component" ? COMPONENT_KEYS : SUPPORTED_KEYS;
  for (const key of Object.keys(k))
    if (!keys.has(key)) throw new Error(`${file}: '${key}' is not implemented by this kustomize subset (deploy/k8s/kustomize.ts)`);
  if (k.kind !== kind) throw new Error(`${file}: kind must be ${kind}`);
  return k;
}

/** Renders the kustomization in `dir`, like `kubectl kustomize dir`. */
export function build(dir: string): K8sObject[] {
  return accumulate(resolve(dir), "Kustomization", [], new Map());
}

/** Adds dir's resources to objects, applies its components and patches (then, for a Kustomization, namespace and images). */
function accumulate(dir: string, kind: "Kustomization" | "Component", objects: K8sObject[], seen: Map<string, string>): K8sObject[] {
  const k = readKustomization(dir, kind);
  for (const r of (k.resources ?? []) as unknown[]) {
    if (typeof r !== "string") throw new Error(`${dir}: resources entries must be paths`);
    const p = join(dir, r);
    const got = statSync(p).isDirectory() ? build(p) : parseYamlDocs(readFileSync(p, "utf8"), p);
    for (const o of got) {
      const id = resId(o);
      if (seen.has(id)) throw new Error(`${dir}: may not add resource with an already registered id: ${id} (from ${r} and ${seen.get(id)})`);
      seen.set(id, r);
      objects.push(o);
    }
  }
  for (const c of (k.components ?? []) as unknown[]) {
    if (typeof c !== "string") throw new Error(`${dir}: components entries must be paths`);
    objects = accumulate(join(dir, c), "Component", objects, seen);
  }
  for (const p of (k.patches ?? []) as unknown[]) {
    if (!isObj(p) || typeof p.path !== "string" || Object.keys(p).length !== 1) {
      throw new Error(`${dir}: patches entries must be '- path: FILE' (target/inline/JSON 6902 patches are not implemented)`);
    }
    for (const patch of parseYamlDocs(readFileSync(join(dir, p.path), "utf8"), join(dir, p.path))) {
      const matches = objects.filter(
        (o) =>
          o.kind === patch.kind &&
          o.apiVersion === patch.apiVersion &&
          o.metadata.name === patch.metadata.name &&
          (patch.metadata.namespace === undefined || o.metadata.namespace === patch.metadata.namespace),
      );
      if (matches.length !== 1) throw new Error(`${dir}/${p.path}: patch target ${patch.kind}/${patch.metadata.name} matched ${matches.length} resources`);
      const i = objects.indexOf(matches[0]);
      objects[i] = strategicMerge(matches[0], patch, "") as K8sObject;
    }
  }
  if (typeof k.namespace === "string") {
    objects = objects.map((o) => (CLUSTER_SCOPED.has(o.kind) ? o : { ...o, metadata: { ...o.metadata, namespace: k.namespace as string } }));
  }
  for (const img of (k.images ?? []) as Obj[]) {
    if (typeof img.name !== "string") throw new Error(`${dir}: images entries need a name`);
    objects = objects.map((o) => setImages(o, img) as K8sObject);
  }
  const ids = new Set<string>();
  for (const o of objects) {
    if (ids.has(resId(o))) throw new Error(`${dir}: duplicate resource after transformations: ${resId(o)}`);
    ids.add(resId(o));
  }
  return objects;
}

/** splits "repo/name:tag@sha256:…" into name and tag/digest. */
export function splitImage(image: string): { name: string; tag?: string; digest?: string } {
  const at = image.indexOf("@");
  const digest = at >= 0 ? image.slice(at + 1) : undefined;
  const rest = at >= 0 ? image.slice(0, at) : image;
  const colon = rest.lastIndexOf(":");
  if (colon > rest.lastIndexOf("/")) return { name: rest.slice(0, colon), tag: rest.slice(colon + 1), digest };
  return { name: rest, digest };
}

function setImages(v: unknown, img: Obj): unknown {
  if (Array.isArray(v)) return v.map((x) => setImages(x, img));
  if (!isObj(v)) return v;
  const out: Obj = {};
  for (const [key, val] of Object.entries(v)) {
    if ((key === "containers" || key === "initContainers") && Array.isArray(val)) {
      out[key] = val.map((c) => {
        if (!isObj(c) || typeof c.image !== "string") return c;
        const cur = splitImage(c.image);
        if (cur.name !== img.name) return c;
        const name = (img.newName as string | undefined) ?? cur.name;
        if (typeof img.digest === "string") return { ...c, image: `${name}@${img.digest}` };
        const tag = (img.newTag as string | undefined) ?? cur.tag;
        return { ...c, image: `${name}${tag ? `:${tag}` : ""}${cur.digest && img.newTag === undefined ? `@${cur.digest}` : ""}` };
      });
    } else {
      out[key] = setImages(val, img);
    }
  }
  return out;
}

/** The merge keys of a list field (the first one required), or undefined for lists that are replaced. */
function mergeKeys(field: string, items: unknown[]): string[] | undefined {
  switch (field) {
    case "containers":
    case "initContainers":
    case "ephemeralContainers":
    case "imagePullSecrets":
    case "env":
    case "volumes":
      return ["name"];
    case "volumeMounts":
      return ["mountPath"];
    case "topologySpreadConstraints":
      return ["topologyKey", "whenUnsatisfiable"];
    case "ports":
      // Container ports merge by containerPort+protocol, Service ports by port+protocol.
      return items.some((x) => isObj(x) && "containerPort" in x) ? ["containerPort", "protocol"] : ["port", "protocol"];
    default:
      return undefined;
  }
}

export function strategicMerge(base: unknown, patch: unknown, field: string): unknown {
  if (isObj(patch)) {
    for (const k of Object.keys(patch)) {
      if (k.startsWith("$")) throw new Error(`patch directive ${k} is not implemented by this kustomize subset`);
    }
    if (!isObj(base)) return stripNulls(patch);
    const out: Obj = { ...base };
    for (const [k, v] of Object.entries(patch)) {
      if (v === null) delete out[k];
      else out[k] = k in base ? strategicMerge(base[k], v, k) : stripNulls(v);
    }
    return out;
  }
  if (Array.isArray(patch)) {
    const keys = mergeKeys(field, [...(Array.isArray(base) ? base : []), ...patch]);
    if (!keys || !Array.isArray(base)) {
      for (const x of patch) if (isObj(x) && "$patch" in x) throw new Error(`$patch in a list without a merge key (${field})`);
      return stripNulls(patch);
    }
    const [key, ...secondary] = keys;
    // kyaml's order: the patch's elements, then the base's others.
    const out: unknown[] = [];
    const used = new Set<number>();
    for (const item of patch) {
      if (!isObj(item) || !(key in item)) throw new Error(`${field}: every patch element needs its merge key '${key}'`);
      for (const k of secondary) {
        if (!(k in item) && base.some((b) => isObj(b) && b[key] === item[key] && k in b))
          throw new Error(`${field}: the patch element ${key}=${String(item[key])} must give '${k}' as the base does (kustomize merges by ${keys.join("+")})`);
      }
      const i = base.findIndex((b, j) => !used.has(j) && isObj(b) && keys.every((k) => b[k] === item[k]));
      if (i >= 0) used.add(i);
      if (item.$patch !== undefined) {
        if (item.$patch !== "delete") throw new Error(`$patch: ${String(item.$patch)} is not implemented by this kustomize subset`);
        continue;
      }
      out.push(i >= 0 ? strategicMerge(base[i], item, field) : stripNulls(item));
    }
    base.forEach((b, j) => {
      if (!used.has(j)) out.push(b);
    });
    return out;
  }
  return patch;
}

function stripNulls(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(stripNulls);
  if (!isObj(v)) return v;
  return Object.fromEntries(
    Object.entries(v)
      .filter(([, x]) => x !== null)
      .map(([k, x]) => [k, stripNulls(x)]),
  );
}

export function toYaml(objects: K8sObject[]): string {
  return objects.map((o) => stringify(o, { lineWidth: 0 })).join("---\n");
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const dir = process.argv[2] ?? join(dirname(fileURLToPath(import.meta.url)), "overlays", "dev");
  process.stdout.write(toYaml(build(dir)));
}
