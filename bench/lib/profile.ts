// Summarises a V8 .cpuprofile (node --cpu-prof) by where the CPU went: self
// time per package / area and per function, idle time excluded.
import { readFileSync } from "node:fs";

interface ProfNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
}

interface Profile {
  nodes: ProfNode[];
  samples: number[];
  timeDeltas: number[];
}

/** The area a frame belongs to: a package, a Node subsystem, or a project file. */
export function area(url: string, fn: string): string {
  if (url === "") return fn.startsWith("(") ? fn : "(native)";
  const nm = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(url);
  if (nm) return nm[1];
  const internal = /^node:internal\/([^/]+)(?:\/([^/.]+))?/.exec(url);
  if (internal) return `node:${internal[1]}${internal[2] && internal[1] !== "deps" ? `/${internal[2]}` : ""}`;
  if (url.startsWith("node:")) return url;
  const proj = /\/(services|gen|cli|bin|test)\/(.*)$/.exec(url);
  if (proj) return `${proj[1]}/${proj[2]}`;
  return url;
}

export interface ProfileSummary {
  totalMs: number;
  busyMs: number;
  /** Share of the busy time in the project's own files (services/, gen/, cli/, bin/). */
  projectShare: number;
  areas: { area: string; ms: number; share: number }[];
  functions: { fn: string; area: string; ms: number; share: number }[];
}

export function summarize(path: string, top = 15): ProfileSummary {
  const p = JSON.parse(readFileSync(path, "utf8")) as Profile;
  const byId = new Map(p.nodes.map((n) => [n.id, n]));
  const self = new Map<number, number>();
  let totalUs = 0;
  p.samples.forEach((id, i) => {
    const dt = p.timeDeltas[i] ?? 0;
    totalUs += dt;
    self.set(id, (self.get(id) ?? 0) + dt);
  });
  const areas = new Map<string, number>();
  const fns = new Map<string, { area: string; us: number }>();
  let busyUs = 0;
  for (const [id, us] of self) {
    const n = byId.get(id)!;
    const fn = n.callFrame.functionName || "(anonymous)";
    if (fn === "(idle)") continue;
    busyUs += us;
    const a = area(n.callFrame.url, fn);
    areas.set(a, (areas.get(a) ?? 0) + us);
    const key = `${fn} ${n.callFrame.url.replace(/^.*node_modules\//, "").replace(/^file:\/\/.*?\/(services|gen|cli)\//, "$1/")}:${n.callFrame.lineNumber + 1}`;
    const f = fns.get(key) ?? { area: a, us: 0 };
    f.us += us;
    fns.set(key, f);
  }
  const share = (us: number) => us / busyUs;
  let projectUs = 0;
  for (const [a, us] of areas) if (/^(services|gen|cli|bin)\//.test(a)) projectUs += us;
  return {
    totalMs: totalUs / 1000,
    busyMs: busyUs / 1000,
    projectShare: share(projectUs),
    areas: [...areas]
      .sort((a, b) => b[1] - a[1])
      .slice(0, top)
      .map(([area, us]) => ({ area, ms: us / 1000, share: share(us) })),
    functions: [...fns]
      .sort((a, b) => b[1].us - a[1].us)
      .slice(0, top)
      .map(([fn, f]) => ({ fn, area: f.area, ms: f.us / 1000, share: share(f.us) })),
  };
}
