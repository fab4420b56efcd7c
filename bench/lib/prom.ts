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
