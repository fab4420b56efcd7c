// gRPC server reflection (grpc.reflection.v1 and v1alpha), so that grpcurl,
// buf curl and Postman can list and describe our services with no .proto
// files at hand. Files are served with all their dependencies; a client asks
// again for what it does not have.
//
// Ours rather than @grpc/reflection: that one describes a proto-loader
// (protobufjs) package definition, which we do not have and which drops the
// comments; this one serves buf's image, comments included, for v1 and
// v1alpha, from the same DescService objects the handlers use.
import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { create, fromBinary, toBinary, type DescFile, type DescService } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema, FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { route, type ServiceBinding } from "./grpc-adapter.js";
import * as v1 from "../../gen/grpc/reflection/v1/reflection_pb.js";
import * as v1alpha from "../../gen/grpc/reflection/v1alpha/reflection_pb.js";

type Req = v1.ServerReflectionRequest | v1alpha.ServerReflectionRequest;

/** Every file reachable from the given services, keyed by name. */
function collectFiles(services: DescService[]): Map<string, DescFile> {
  const files = new Map<string, DescFile>();
  const visit = (f: DescFile) => {
    if (files.has(f.name + ".proto")) return;
    files.set(f.name + ".proto", f);
    f.dependencies.forEach(visit);
  };
  services.forEach((s) => visit(s.file));
  return files;
}

/** The file and its transitive dependencies, dependencies first. */
function withDeps(f: DescFile): DescFile[] {
  const out: DescFile[] = [];
  const seen = new Set<string>();
  const visit = (d: DescFile) => {
    if (seen.has(d.name)) return;
    seen.add(d.name);
    d.dependencies.forEach(visit);
    out.push(d);
  };
  visit(f);
  return out;
}

// The descriptors protoc-gen-es embeds have no comments (source_code_info is
// stripped to keep bundles small). `npm run generate` also writes a buf image
// that keeps them, so `grpcurl describe` shows every field's documentation.
// Built (dist/, this code possibly in dist/chunks/) the image sits in dist/;
// run from the sources it is gen/descriptors.binpb.
const HERE = dirname(fileURLToPath(import.meta.url));
const IMAGE = [join(HERE, "descriptors.binpb"), join(HERE, "..", "descriptors.binpb"), join(HERE, "..", "..", "gen", "descriptors.binpb")].find(existsSync);
const documented = new Map<string, Uint8Array>();
if (IMAGE) {
  for (const fd of fromBinary(FileDescriptorSetSchema, readFileSync(IMAGE)).file) {
    documented.set(fd.name, toBinary(FileDescriptorProtoSchema, fd));
  }
}

function encode(f: DescFile): Uint8Array {
  return documented.get(`${f.name}.proto`) ?? toBinary(FileDescriptorProtoSchema, f.proto);
}

function symbolIndex(files: Map<string, DescFile>): Map<string, DescFile> {
  const idx = new Map<string, DescFile>();
  for (const f of files.values()) {
    const add = (name: string) => idx.set(name, f);
    for (const s of f.services) {
      add(s.typeName);
      for (const m of s.methods) add(`${s.typeName}.${m.name}`);
    }
    const msgs = (list: typeof f.messages) => {
      for (const m of list) {
        add(m.typeName);
        for (const fld of m.fields) add(`${m.typeName}.${fld.name}`);
        m.nestedEnums.forEach((e) => add(e.typeName));
        msgs(m.nestedMessages);
      }
    };
    msgs(f.messages);
    for (const e of f.enums) {
      add(e.typeName);
      for (const v of e.values) add(`${e.typeName.split(".").slice(0, -1).join(".")}.${v.name}`);
    }
    for (const x of f.extensions) add(x.typeName);
  }
  return idx;
}

/** grpc.reflection.v1 and v1alpha, describing these services (and themselves). */
export function reflectionServices(services: DescService[]): ServiceBinding[] {
  const all = [...services, v1.ServerReflection, v1alpha.ServerReflection];
  const files = collectFiles(all);
  const symbols = symbolIndex(files);
  const serviceNames = all.map((s) => s.typeName);

  // The two versions have identical shapes; one answer function serves both.
  function answer(req: Req): { case: string; value: unknown } {
    const mr = req.messageRequest;
    switch (mr.case) {
      case "listServices":
        return { case: "listServicesResponse", value: { service: serviceNames.map((name) => ({ name })) } };
      case "fileByFilename": {
        const f = files.get(mr.value);
        if (!f) return { case: "errorResponse", value: { errorCode: 5, errorMessage: `file not found: ${mr.value}` } };
        return { case: "fileDescriptorResponse", value: { fileDescriptorProto: withDeps(f).map(encode) } };
      }
      case "fileContainingSymbol": {
        const f = symbols.get(mr.value.replace(/^\./, ""));
        if (!f) return { case: "errorResponse", value: { errorCode: 5, errorMessage: `symbol not found: ${mr.value}` } };
        return { case: "fileDescriptorResponse", value: { fileDescriptorProto: withDeps(f).map(encode) } };
      }
      case "fileContainingExtension":
        return { case: "errorResponse", value: { errorCode: 5, errorMessage: `no extensions of ${mr.value.containingType}` } };
      case "allExtensionNumbersOfType":
        return { case: "allExtensionNumbersResponse", value: { baseTypeName: mr.value, extensionNumber: [] } };
      default:
        return { case: "errorResponse", value: { errorCode: 3, errorMessage: "empty reflection request" } };
    }
  }

  return [
    route(v1.ServerReflection, {
      async *serverReflectionInfo(reqs) {
        for await (const req of reqs) {
          yield create(v1.ServerReflectionResponseSchema, {
            validHost: req.host,
            originalRequest: req,
            messageResponse: answer(req) as v1.ServerReflectionResponse["messageResponse"],
          });
        }
      },
    }),
    route(v1alpha.ServerReflection, {
      async *serverReflectionInfo(reqs) {
        for await (const req of reqs) {
          yield create(v1alpha.ServerReflectionResponseSchema, {
            validHost: req.host,
            originalRequest: req,
            messageResponse: answer(req) as v1alpha.ServerReflectionResponse["messageResponse"],
          });
        }
      },
    }),
  ];
}
