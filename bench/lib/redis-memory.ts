// Redis memory by key family, for the sizing figures of docs/operations.md:
// every key of the instance (SCAN), its MEMORY USAGE (exact: SAMPLES 0),
// summed by the first family whose pattern matches its name. Taken before
// and after a bench adds N things (VMs, rules), the difference over N is the
// memory each costs, by family. Bounded: at most maxKeys keys are measured.
import type { Redis } from "ioredis";

export interface KeyFamily {
  name: string;
  match: RegExp;
}

export type FamilyBytes = Map<string, { keys: number; bytes: number }>;

/** Bytes and keys per family (a key no family matches counts under "other"). */
export async function memoryByFamily(r: Redis, families: KeyFamily[], maxKeys = 200_000): Promise<FamilyBytes> {
  const out: FamilyBytes = new Map([...families.map((f) => [f.name, { keys: 0, bytes: 0 }] as const), ["other", { keys: 0, bytes: 0 }]]);
  let cursor = "0";
  let seen = 0;
  do {
    const [next, keys] = await r.scan(cursor, "COUNT", 1000);
    cursor = next;
    const sizes = await Promise.all(keys.map((k) => r.memory("USAGE", k, "SAMPLES", 0) as Promise<number | null>));
    keys.forEach((k, i) => {
      const f = out.get(families.find((x) => x.match.test(k))?.name ?? "other")!;
      f.keys++;
      f.bytes += sizes[i] ?? 0;
    });
    seen += keys.length;
    if (seen > maxKeys) throw new Error(`memoryByFamily: more than ${maxKeys} keys; not measuring a production instance`);
  } while (cursor !== "0");
  return out;
}

/** used_memory of INFO memory: everything, the allocator's view (keys, buffers, scripts). */
export async function usedMemory(r: Redis): Promise<number> {
  return Number(/^used_memory:(\d+)/m.exec((await r.info("memory")) as string)?.[1] ?? NaN);
}

/** after − before, per family, over n things. */
export function perThing(before: FamilyBytes, after: FamilyBytes, n: number): { name: string; bytes: number; keys: number }[] {
  return [...after].map(([name, a]) => {
    const b = before.get(name) ?? { keys: 0, bytes: 0 };
    return { name, bytes: (a.bytes - b.bytes) / n, keys: (a.keys - b.keys) / n };
  });
}
