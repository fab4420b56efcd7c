// deploy/monitoring read as Prometheus and Grafana would: the PromQL
// expressions of the PrometheusRule's alerts and of the dashboard's targets,
// and the metric names each references.
import { readFileSync } from "node:fs";
import { join } from "node:path";

/** PromQL functions, aggregations and keywords: every other identifier of an expression is a metric name. */
const PROMQL_WORDS = new Set([
  ...["sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group"],
  ...["rate", "irate", "increase", "delta", "idelta", "deriv", "time", "timestamp", "histogram_quantile", "abs", "absent", "absent_over_time"],
  ...["clamp_min", "clamp_max", "round", "ceil", "floor", "changes", "resets", "vector", "scalar", "sort", "sort_desc", "label_replace", "label_join"],
  ...["avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "count_over_time", "last_over_time", "predict_linear"],
  ...["and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "inf", "nan"],
]);

/** The metric names a PromQL expression references (label matchers, grouping labels, strings and durations left out). */
export function metricNames(expr: string): string[] {
  const stripped = expr
    .replace(/"(?:[^"\\]|\\.)*"/g, " ")
    .replace(/\{[^}]*\}/g, " ")
    .replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, " ")
    .replace(/\[[^\]]*\]/g, " ")
    .replace(/\$[A-Za-z_]\w*/g, " ")
    .replace(/\b\d+(\.\d+)?(e[+-]?\d+)?\b/gi, " ");
  const out = new Set<string>();
  for (const t of stripped.match(/[A-Za-z_:][A-Za-z0-9_:]*/g) ?? []) if (!PROMQL_WORDS.has(t.toLowerCase())) out.add(t);
  return [...out];
}

export interface AlertRule {
  alert?: string;
  record?: string;
  expr: string;
  for?: string;
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
}

export interface PrometheusRule {
  apiVersion: string;
  kind: string;
  metadata: { name: string };
  spec: { groups: { name: string; rules: AlertRule[] }[] };
}

interface Panel {
  type: string;
  title?: string;
  targets?: { expr?: string }[];
  panels?: Panel[];
}

/** Every PromQL expression of the dashboard's panels (rows' panels included), with its panel's title. */
export function dashboardExprs(dashboard: { panels?: Panel[] }): { title: string; expr: string }[] {
  const out: { title: string; expr: string }[] = [];
  const walk = (ps: Panel[] = []) => {
    for (const p of ps) {
      for (const t of p.targets ?? []) if (t.expr !== undefined) out.push({ title: p.title ?? "", expr: t.expr });
      walk(p.panels);
    }
  };
  walk(dashboard.panels);
  return out;
}

export function readMonitoring(dir: string, parseYaml: (text: string) => unknown) {
  const rule = parseYaml(readFileSync(join(dir, "prometheusrule.yaml"), "utf8")) as PrometheusRule;
  const dashboard = JSON.parse(readFileSync(join(dir, "grafana-dashboard.json"), "utf8")) as { panels?: Panel[] } & Record<string, unknown>;
  const monitors = readFileSync(join(dir, "podmonitor.yaml"), "utf8")
    .split(/^---$/m)
    .map((d) => parseYaml(d))
    .filter(Boolean) as { apiVersion: string; kind: string; metadata: { name: string }; spec: Record<string, unknown> }[];
  return { rule, dashboard, monitors };
}

/** Every metric name the alerts and the dashboard reference. */
export function metricNamesOfMonitoring(dir: string, parseYaml: (text: string) => unknown): Set<string> {
  const { rule, dashboard } = readMonitoring(dir, parseYaml);
  const exprs = [...rule.spec.groups.flatMap((g) => g.rules.map((r) => r.expr)), ...dashboardExprs(dashboard).map((d) => d.expr)];
  return new Set(exprs.flatMap(metricNames));
}
