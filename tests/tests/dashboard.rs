//! `deploy/grafana-dashboard.json` asks only for metrics the host exports,
//! with labels they carry, through `rate()`/`increase()` for counters (so a
//! host's restart, which starts its counters again at zero, is counted
//! across); and `deploy/wasmsub.yaml` lets Prometheus find `/metrics`.
//!
//! The exported names come from the host's own registry
//! (`wasmsub::metrics::Metrics`, rendered as `GET /metrics` renders it),
//! not from reading its source.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use wasmsub::metrics::Metrics;

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana-dashboard.json");
const DEPLOYMENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/wasmsub.yaml");

/// Labels Prometheus adds to every series it scrapes (the target's), which
/// the host never writes.
const TARGET_LABELS: &[&str] = &["instance", "job", "namespace", "pod"];

/// What a host's `/metrics` exposes.
struct Exported {
    /// Family name (as in `# TYPE`) → its type.
    families: BTreeMap<String, String>,
    /// Sample name (as Prometheus stores it) → its label names.
    samples: BTreeMap<String, BTreeSet<String>>,
    /// The text, for messages.
    text: String,
}

/// A host registry with one series in every family: a family nothing was
/// counted in yet is not written at all, not even its `# TYPE` line.
fn exported() -> Exported {
    let metrics = Metrics::new();
    let (tenant, handler, version): (Arc<str>, Arc<str>, Arc<str>) = (Arc::from("acme"), Arc::from("orders"), Arc::from("0123456789ab"));
    metrics.delivery(&tenant, &handler, &version, "processed", Duration::from_millis(2));
    metrics.attempt(&tenant, &handler, &version, "trap", Some("cpu_time"), Duration::from_millis(1));
    metrics.instantiation(&tenant, &handler, Duration::from_micros(40));
    metrics.made_ahead(&tenant, &handler);
    metrics.deploy("acme", "orders", "deploy");
    metrics.store_error("commit");
    let text = metrics.encode();

    let mut families = BTreeMap::new();
    let mut samples: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("a # TYPE line without a type: {line}"));
            families.insert(name.to_owned(), kind.to_owned());
        } else if !line.starts_with('#') && !line.is_empty() {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let labels = samples.entry(line[..name_end].to_owned()).or_default();
            if let Some(label_text) = line[name_end..].strip_prefix('{').and_then(|rest| rest.split_once('}')).map(|(labels, _)| labels) {
                // The values here are plain words (no commas, no quotes).
                labels.extend(label_text.split(',').filter_map(|pair| pair.split_once('=')).map(|(key, _)| key.to_owned()));
            }
        }
    }
    Exported { families, samples, text }
}

/// The family a sample name belongs to, given the families' types: a
/// counter's samples end in `_total`, a histogram's in `_bucket`, `_sum`
/// and `_count`, a gauge's are its name.
fn family_of<'a>(sample: &str, families: &'a BTreeMap<String, String>) -> Option<(&'a str, &'a str)> {
    let candidates = [
        (Some(sample), "gauge"),
        (sample.strip_suffix("_total"), "counter"),
        (sample.strip_suffix("_bucket"), "histogram"),
        (sample.strip_suffix("_sum"), "histogram"),
        (sample.strip_suffix("_count"), "histogram"),
    ];
    candidates.into_iter().find_map(|(base, kind)| {
        let (name, found) = families.get_key_value(base?)?;
        (found == kind).then_some((name.as_str(), found.as_str()))
    })
}

/// Every `wasmsub_*` name in a PromQL expression, with where it starts.
fn metric_names(expr: &str) -> Vec<(usize, &str)> {
    let is_name_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = Vec::new();
    for (start, _) in expr.match_indices("wasmsub_") {
        if expr[..start].ends_with(is_name_char) {
            continue; // inside a longer name
        }
        let end = expr[start..].find(|c: char| !is_name_char(c)).map_or(expr.len(), |n| start + n);
        names.push((start, &expr[start..end]));
    }
    names
}

/// The label names a selector's matchers use: `{a="x", b=~"$y"}` gives a, b.
fn matcher_labels(selector: &str) -> Vec<String> {
    let mut labels = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in selector.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                labels.push(std::mem::take(&mut current));
            }
            _ if !quoted => current.push(c),
            _ => {}
        }
    }
    labels.push(current);
    labels
        .into_iter()
        .filter_map(|matcher| {
            let name = matcher.split(['=', '!', '~']).next()?.trim().to_owned();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

/// The selector following a metric name (`{...}` without braces), if any.
fn selector_after(expr: &str, name_end: usize) -> Option<&str> {
    let rest = expr[name_end..].strip_prefix('{')?;
    let mut quoted = false;
    let mut escaped = false;
    for (at, c) in rest.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(&rest[..at]),
            _ => {}
        }
    }
    panic!("unclosed selector in {expr}");
}

/// The label names of every `by (...)` grouping in an expression.
fn grouping_labels(expr: &str) -> Vec<String> {
    let mut labels = Vec::new();
    for (at, _) in expr.match_indices("by") {
        if expr[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
            continue; // inside a word (`wasmsub_queue_bytes`)
        }
        let Some(rest) = expr[at + 2..].trim_start().strip_prefix('(') else { continue };
        let list = &rest[..rest.find(')').unwrap_or_else(|| panic!("unclosed by ( in {expr}"))];
        labels.extend(list.split(',').map(|label| label.trim().to_owned()).filter(|label| !label.is_empty()));
    }
    labels
}

/// Every panel, rows' nested panels included.
fn all_panels(panels: &[Value]) -> Vec<&Value> {
    let mut all = Vec::new();
    for panel in panels {
        all.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            all.extend(all_panels(nested));
        }
    }
    all
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(DASHBOARD).unwrap_or_else(|error| panic!("reading {DASHBOARD}: {error}"));
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("{DASHBOARD} is not JSON: {error}"))
}

/// Every target's `expr`, with the title of its panel.
fn expressions(dashboard: &Value) -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    for panel in all_panels(dashboard["panels"].as_array().expect("the dashboard has panels")) {
        let title = panel["title"].as_str().unwrap_or_default();
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                exprs.push((title.to_owned(), expr.to_owned()));
            }
        }
    }
    exprs
}

#[test]
fn every_panel_has_a_title_and_a_query_on_the_prometheus_variable() {
    let dashboard = dashboard();
    assert!(dashboard["title"].as_str().is_some_and(|title| !title.is_empty()), "the dashboard has no title");
    let panels = all_panels(dashboard["panels"].as_array().expect("the dashboard has panels"));
    let mut queried = 0;
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.trim().is_empty(), "a panel without a title: {panel}");
        if panel["type"] == "row" {
            continue; // a row only groups the panels under it
        }
        queried += 1;
        let targets = panel["targets"].as_array().map(Vec::as_slice).unwrap_or_default();
        assert!(!targets.is_empty(), "panel `{title}` has no target");
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(!expr.trim().is_empty(), "panel `{title}` has a target without an expr: {target}");
            assert_eq!(target["datasource"]["uid"], "${datasource}", "panel `{title}`'s target does not use the datasource variable");
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "panel `{title}` does not use the datasource variable");
        assert!(panel["description"].as_str().is_some_and(|text| !text.is_empty()), "panel `{title}` has no description");
    }
    assert!(queried >= 10, "only {queried} panels with queries");

    let variables = dashboard["templating"]["list"].as_array().expect("the dashboard has template variables");
    let variable = |name: &str| variables.iter().find(|variable| variable["name"] == name).unwrap_or_else(|| panic!("no `{name}` variable"));
    assert_eq!(variable("datasource")["type"], "datasource");
    assert_eq!(variable("datasource")["query"], "prometheus");
    for name in ["tenant", "handler"] {
        let query = variable(name)["query"].as_str().unwrap_or_default();
        assert!(query.starts_with("label_values(") && query.trim_end().ends_with(&format!("{name})")), "`{name}` is not a label_values query: {query}");
    }
}

#[test]
fn the_dashboard_queries_only_metrics_and_labels_the_host_exports() {
    let exported = exported();
    let Exported { families, samples, text } = &exported;
    // The names as prometheus-client writes them (OpenMetrics): a family's
    // `# TYPE` name, a counter's samples with `_total`.
    assert_eq!(families.get("wasmsub_deliveries").map(String::as_str), Some("counter"), "{text}");
    assert!(samples.contains_key("wasmsub_deliveries_total"), "{text}");
    assert_eq!(families.get("wasmsub_delivery_duration_seconds").map(String::as_str), Some("histogram"), "{text}");
    assert_eq!(families.get("wasmsub_queue_bytes").map(String::as_str), Some("gauge"), "{text}");

    let dashboard = dashboard();
    let mut queries = expressions(&dashboard);
    // The tenant and handler variables' label_values queries too.
    for variable in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        let query = variable["query"].as_str().or_else(|| variable["query"]["query"].as_str());
        if let Some(query) = query.filter(|query| query.contains("wasmsub_")) {
            queries.push((format!("variable {}", variable["name"]), query.to_owned()));
        }
    }
    assert!(!queries.is_empty());

    let mut used_families = BTreeSet::new();
    for (title, expr) in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "`{title}` queries no wasmsub metric: {expr}");
        let mut expr_labels: BTreeSet<&str> = TARGET_LABELS.iter().copied().collect();
        for &(start, name) in &names {
            let (family, kind) = family_of(name, families).unwrap_or_else(|| panic!("`{title}` queries `{name}`, which the host does not export.\nexpr: {expr}\nexported families: {families:?}"));
            used_families.insert(family.to_owned());
            let labels = samples.get(name).unwrap_or_else(|| panic!("`{title}`: `{name}` (family {family}) has no such sample in\n{text}"));
            expr_labels.extend(labels.iter().map(String::as_str));
            if let Some(selector) = selector_after(expr, start + name.len()) {
                for label in matcher_labels(selector) {
                    assert!(labels.contains(&label), "`{title}` matches on `{label}`, which `{name}` does not carry ({labels:?}): {expr}");
                }
            }
            // A counter (and a histogram's cumulative samples) only ever
            // climbs until the host restarts; a panel must look at its rate.
            if kind != "gauge" && !title.starts_with("variable ") {
                let before = expr[..start].trim_end();
                assert!(before.ends_with("rate(") || before.ends_with("increase("), "`{title}` reads the counter `{name}` without rate() or increase(): {expr}");
            }
        }
        for label in grouping_labels(expr) {
            assert!(expr_labels.contains(label.as_str()), "`{title}` groups by `{label}`, which none of its metrics carries: {expr}");
        }
    }

    // Every family the host exports has a panel.
    let unused: Vec<_> = families.keys().filter(|family| !used_families.contains(*family)).collect();
    assert!(unused.is_empty(), "exported but on no panel: {unused:?}");
}

#[test]
fn the_deployment_lets_prometheus_scrape_the_app_port() {
    let yaml = std::fs::read_to_string(DEPLOYMENT).unwrap_or_else(|error| panic!("reading {DEPLOYMENT}: {error}"));
    for annotation in [r#"prometheus.io/scrape: "true""#, r#"prometheus.io/path: "/metrics""#, r#"prometheus.io/port: "3000""#, r#"dapr.io/app-port: "3000""#] {
        assert!(yaml.lines().any(|line| line.trim() == annotation), "{DEPLOYMENT} lacks `{annotation}`");
    }
}
