// Reading a daemon's Prometheus /metrics from a benchmark: scrape the text
// format once, then sum the samples of one metric whose labels match. Used to
// learn when a daemon finished a pass (a counter moved) and how long its own
// timer says the pass took (a histogram's _sum and _count), without reading
// the kernel state back.
import { request } from "node:http";

export type Samples = { name: string; labels: Record<string, string>; value: number }[];

/** GET http://127.0.0.1:port/metrics, parsed (comments skipped). Rejects after timeoutMs. */
export function scrape(port: number, timeoutMs = 2000): Promise<Samples> {
  return new Promise((resolve, reject) => {
    const req = request({ host: "127.0.0.1", port, path: "/metrics", method: "GET", timeout: timeoutMs, agent: false }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (d) => (body += d));
      res.on("end", () => resolve(parseMetrics(body)));
    });
    req.on("timeout", () => req.destroy(new Error(`metrics on ${port}: no answer in ${timeoutMs} ms`)));
    req.on("error", reject);
    req.end();
  });
}

export function parseMetrics(text: string): Samples {
  const out: Samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels: Record<string, string> = {};
    for (const l of (m[2] ?? "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

/** Sum of the samples of `name` whose labels include every pair of `want`. */
export function sum(s: Samples, name: string, want: Record<string, string> = {}): number {
  let t = 0;
  for (const x of s) if (x.name === name && Object.entries(want).every(([k, v]) => x.labels[k] === v)) t += x.value;
  return t;
}

// ---- exec counts: microvpc_exec_total{command} and microvpc_exec_duration_seconds{command} of each daemon

/** One command a daemon ran, per CreateVm: how many times and its summed exec seconds. */
export interface ExecRow {
  daemon: string;
  command: string;
  execs: number;
  seconds: number;
}

export interface ExecCounts {
  /** Whether any daemon has microvpc_exec_total on its /metrics at all. */
  present: boolean;
  creates: number;
  rows: ExecRow[];
  /** Daemons whose /metrics could not be read before or after. */
  unreadable: string[];
}

/** Per command label: Σ microvpc_exec_total and Σ microvpc_exec_duration_seconds_sum. */
function execByCommand(s: Samples): Map<string, { n: number; s: number }> {
  const m = new Map<string, { n: number; s: number }>();
  for (const x of s) {
    const k = x.name === "microvpc_exec_total" ? "n" : x.name === "microvpc_exec_duration_seconds_sum" ? "s" : undefined;
    if (!k) continue;
    const c = x.labels.command ?? "(no command label)";
    const e = m.get(c) ?? { n: 0, s: 0 };
    e[k] += x.value;
    m.set(c, e);
  }
  return m;
}

/** What each daemon exec'd between two scrapes of every daemon (by name), per operation (`creates` of them). */
export function execCounts(before: Record<string, Samples | undefined>, after: Record<string, Samples | undefined>, creates: number): ExecCounts {
  const out: ExecCounts = { present: false, creates, rows: [], unreadable: [] };
  for (const [daemon, a] of Object.entries(after)) {
    const b = before[daemon];
    if (!a || !b) {
      out.unreadable.push(daemon);
      continue;
    }
    if (a.some((x) => x.name === "microvpc_exec_total")) out.present = true;
    const b0 = execByCommand(b);
    for (const [command, x] of execByCommand(a)) {
      const y = b0.get(command) ?? { n: 0, s: 0 };
      if (x.n - y.n > 0) out.rows.push({ daemon, command, execs: (x.n - y.n) / creates, seconds: (x.s - y.s) / creates });
    }
  }
  out.rows.sort((x, y) => y.seconds - x.seconds || y.execs - x.execs);
  return out;
}
