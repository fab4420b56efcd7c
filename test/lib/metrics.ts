// Scraping a daemon's metrics listener in tests: /metrics parsed into
// samples, /readyz and /healthz as status and body.

export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

export interface Scrape {
  samples: Sample[];
  /** Every metric family the text declares (# TYPE), with or without samples. */
  families: Set<string>;
  /** The first sample of `name` whose labels include `labels`; undefined if none. */
  get(name: string, labels?: Record<string, string>): number | undefined;
  /** Every sample of `name` whose labels include `labels`. */
  all(name: string, labels?: Record<string, string>): Sample[];
}

function parseLabels(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  const re = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
  for (let m = re.exec(text); m; m = re.exec(text)) out[m[1]] = m[2].replace(/\\n/g, "\n").replace(/\\"/g, '"').replace(/\\\\/g, "\\");
  return out;
}

/** Parses the Prometheus text format (what prom-client writes). */
export function parseMetrics(text: string): Scrape {
  const samples: Sample[] = [];
  const families = new Set<string>();
  for (const line of text.split("\n")) {
    if (line.startsWith("# TYPE ")) families.add(line.split(" ")[2]);
    if (line === "" || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)$/.exec(line);
    if (!m) throw new Error(`not a sample line: ${JSON.stringify(line)}`);
    const v = m[3] === "+Inf" ? Infinity : m[3] === "-Inf" ? -Infinity : Number(m[3]);
    samples.push({ name: m[1], labels: m[2] ? parseLabels(m[2]) : {}, value: v });
  }
  const match = (s: Sample, name: string, labels: Record<string, string>) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v);
  return {
    samples,
    families,
    get: (name, labels = {}) => samples.find((s) => match(s, name, labels))?.value,
    all: (name, labels = {}) => samples.filter((s) => match(s, name, labels)),
  };
}

export async function scrape(metricsPort: number): Promise<Scrape> {
  const r = await fetch(`http://127.0.0.1:${metricsPort}/metrics`);
  if (r.status !== 200) throw new Error(`/metrics answered ${r.status}: ${await r.text()}`);
  return parseMetrics(await r.text());
}

export async function probe(metricsPort: number, path: "/readyz" | "/healthz"): Promise<{ status: number; body: string }> {
  const r = await fetch(`http://127.0.0.1:${metricsPort}${path}`);
  return { status: r.status, body: await r.text() };
}
