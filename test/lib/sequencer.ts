// Test files in the order node:test ran them: test/unit, then
// test/integration, each by file name. vitest's default order (slowest or
// last failed first) would change it between runs; some files use what an
// earlier one left (vmm.test.ts's kind=qemu test skips without the guest
// image that qemu.test.ts builds).
import { relative } from "node:path";
import type { TestSequencer, TestSpecification } from "vitest/node";

const GROUPS = ["test/unit/", "test/integration/"];

function key(s: TestSpecification): [number, string] {
  const rel = relative(s.project.config.root, s.moduleId);
  const g = GROUPS.findIndex((p) => rel.startsWith(p));
  return [g === -1 ? GROUPS.length : g, rel];
}

export class FileOrderSequencer implements TestSequencer {
  shard(files: TestSpecification[]): TestSpecification[] {
    return files;
  }

  sort(files: TestSpecification[]): TestSpecification[] {
    return [...files].sort((a, b) => {
      const [ga, ra] = key(a);
      const [gb, rb] = key(b);
      return ga - gb || (ra < rb ? -1 : ra > rb ? 1 : 0);
    });
  }
}
