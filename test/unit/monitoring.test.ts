// deploy/monitoring is what an operator applies as is: the PrometheusRule,
// the PodMonitors and the Grafana dashboard must have the shape their
// operators and Grafana read, and every alert what it needs to route and
// explain itself. (That every metric they name is served is checked against
// real daemons in test/integration/metrics-daemons.test.ts.)
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "vitest";
import { parse as parseYaml } from "yaml";
import { ROOT } from "../lib/daemon.js";
import { dashboardExprs, metricNames, metricNamesOfMonitoring, readMonitoring } from "../lib/monitoring.js";

const DIR = join(ROOT, "deploy", "monitoring");
const { rule, dashboard, monitors } = readMonitoring(DIR, parseYaml);

test("metricNames finds the metrics of an expression, not its labels, functions or durations", () => {
  assert.deepEqual(metricNames('sum by (le, reconciler) (rate(microvpc_x_bucket{a="b c", d=~"$instance"}[5m])) / on (instance) group_left foo_total > 0.9'), [
    "microvpc_x_bucket",
    "foo_total",
  ]);
  assert.deepEqual(metricNames("time() - process_start_time_seconds > 600"), ["process_start_time_seconds"]);
});

test("the PrometheusRule: the operator's shape, and every alert with expr, for, a severity, a summary and a description", () => {
  assert.equal(rule.apiVersion, "monitoring.coreos.com/v1");
  assert.equal(rule.kind, "PrometheusRule");
  assert.ok(rule.metadata.name);
  const names = new Set<string>();
  for (const g of rule.spec.groups) {
    assert.ok(g.name && g.rules.length > 0, `group ${g.name}`);
    for (const r of g.rules) {
      assert.ok(r.alert && /^[A-Z][A-Za-z0-9]+$/.test(r.alert), JSON.stringify(r));
      assert.ok(!names.has(r.alert), `alert ${r.alert} twice`);
      names.add(r.alert);
      assert.equal(typeof r.expr, "string");
      assert.ok(metricNames(r.expr).length > 0, `${r.alert}: its expression names a metric`);
      assert.equal((r.expr.match(/\(/g) ?? []).length, (r.expr.match(/\)/g) ?? []).length, `${r.alert}: balanced parentheses`);
      if (r.alert !== "MicrovpcInvalidRecords") assert.match(r.for ?? "", /^\d+[smh]$/, `${r.alert}: for`);
      assert.ok(["critical", "warning", "info"].includes(r.labels?.severity ?? ""), `${r.alert}: severity`);
      assert.ok(r.annotations?.summary && r.annotations.description, `${r.alert}: summary and description`);
    }
  }
  // What the issue asks to be alerted on.
  for (const [what, metric] of [
    ["reconcile failing", "microvpc_reconcile_last_success_timestamp_seconds"],
    ["drops rising", "microvpc_firewall_vpc_dropped_packets_total"],
    ["handshake stale", "microvpc_wireguard_peer_last_handshake_age_seconds"],
    ["IPAM nearly full", "microvpc_ipam_subnet_addresses"],
    ["Redis unreachable", "microvpc_redis_up"],
  ]) {
    assert.ok(
      rule.spec.groups.some((g) => g.rules.some((r) => metricNames(r.expr).includes(metric))),
      `an alert on ${what} (${metric})`,
    );
  }
});

test("the PodMonitors select the daemons' pods and their metrics ports as deploy/k8s names them", () => {
  const k8s = ["hypervisor.yaml", "ipam.yaml"].map((f) => readFileSync(join(ROOT, "deploy", "k8s", "base", f), "utf8")).join("\n");
  assert.ok(monitors.length >= 2);
  for (const m of monitors) {
    assert.equal(m.apiVersion, "monitoring.coreos.com/v1");
    assert.equal(m.kind, "PodMonitor");
    const spec = m.spec as { selector: { matchLabels: Record<string, string> }; podMetricsEndpoints: { port: string; path: string }[] };
    assert.ok(Object.keys(spec.selector.matchLabels).length > 0, m.metadata.name);
    for (const [k, v] of Object.entries(spec.selector.matchLabels)) assert.ok(k8s.includes(`${k}: ${v}`), `${m.metadata.name}: ${k}=${v} is a pod label`);
    for (const e of spec.podMetricsEndpoints) {
      assert.equal(e.path, "/metrics");
      assert.match(k8s, new RegExp(`- name: ${e.port}\\n\\s+containerPort: \\d+`), `${m.metadata.name}: port ${e.port} is a container port`);
    }
  }
});

test("the Grafana dashboard: a uid, a datasource variable, every panel with a query that names a metric", () => {
  assert.equal(typeof dashboard.uid, "string");
  assert.equal(typeof dashboard.title, "string");
  assert.ok(Number(dashboard.schemaVersion) >= 30);
  const vars = (dashboard.templating as { list: { name: string; type: string }[] }).list;
  assert.ok(vars.some((v) => v.name === "datasource" && v.type === "datasource"));
  const exprs = dashboardExprs(dashboard);
  assert.ok(exprs.length >= 10);
  for (const e of exprs) assert.ok(metricNames(e.expr).length > 0, `${e.title}: ${e.expr}`);
  const panels = (dashboard.panels ?? []) as { id: number; type: string; gridPos: { x: number; y: number; w: number; h: number } }[];
  assert.equal(new Set(panels.map((p) => p.id)).size, panels.length, "panel ids are unique");
  for (const p of panels) assert.ok(p.gridPos.x + p.gridPos.w <= 24, `panel ${p.id} fits the grid`);
  assert.ok(metricNamesOfMonitoring(DIR, parseYaml).size >= 10);
});
