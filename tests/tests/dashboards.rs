//! The Grafana dashboards of `dashboards/` against the agent that feeds them.
//!
//! Every JSON file there must import into Grafana as it is: a dashboard of schema 39 whose
//! panels and query variables all read through the `${datasource}` (Prometheus) or `${loki}`
//! datasource variables. Then an agent is fed the way a node feeds it — OTLP spans of two
//! services calling each other (errors and a duplicate span included), OTLP logs and tailed
//! pod logs shipped to a stand-in Loki that refuses some pushes, a Jaeger stand-in that
//! refuses one export, a scrape target that answers 500, host metrics — and a real Prometheus
//! scrapes its admin `/metrics` and its pull endpoint. Each query variable is resolved from
//! Prometheus the way Grafana does (chained, regex-escaped), and every panel query, with the
//! variables set to "All" and to each concrete value, must be accepted by Prometheus and
//! return data. Every metric and label the queries read must be one the agent exposes, so a
//! renamed metric or label breaks this suite. Loki cannot run here: its queries are checked
//! for the stream labels the agent sets (the contract's "Loki streams") and for the selector
//! rule Loki enforces.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{span, status, ResourceSpans, ScopeSpans, Span, Status};
use periscope_e2e::loki::{self, Loki};
use periscope_e2e::otlp::post_protobuf;
use periscope_e2e::promserver::{Exposition, Prometheus, ScrapeTarget};
use periscope_e2e::spans::string_kv;
use periscope_e2e::{free_port, tls, Agent, Collector, Metrics, Reply, Script, DEADLINE};
use serde_json::Value;

/// The dashboards the contract promises; any further JSON file in the folder is checked too.
const EXPECTED: [&str; 4] =
    ["periscope-agent.json", "periscope-node.json", "periscope-paths.json", "periscope-logs.json"];

const NODE: &str = "dashboards-node";

/// Prometheus' job for the agents' admin endpoint, scraped as the dashboards' README says:
/// `honor_labels: false`, so the target labels of `periscope_scrape_failures_total` become
/// `exported_job` / `exported_instance`.
const ADMIN_JOB: &str = "periscope";
/// Prometheus' job for the pull endpoint, with `honor_labels: true` so host metrics keep
/// `job="node"` and `instance=<node name>`.
const PULL_JOB: &str = "periscope-metrics";

/// The stream labels of the contract's "Loki streams" (static labels are `job` here).
const LOKI_LABELS: [&str; 7] = ["job", "namespace", "pod", "container", "node", "stream", "service_name"];
/// Structured metadata the contract names, which Loki 3 lets a query group by.
const LOKI_METADATA: [&str; 1] = ["level"];

/// What Grafana substitutes for its built-in variables, for a one-hour dashboard.
const BUILTINS: [(&str, &str); 3] = [("__rate_interval", "1m"), ("__interval", "15s"), ("__range", "5m")];

/// Panel types that ship with Grafana 10 and 11 (no plugin to install).
const BUILT_IN_PANELS: [&str; 7] = ["row", "timeseries", "stat", "table", "bargauge", "nodeGraph", "logs"];

// ---------------------------------------------------------------------------------------
// The dashboards as files
// ---------------------------------------------------------------------------------------

struct Dashboard {
    file: String,
    json: Value,
}

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("dashboards")
}

/// Every `*.json` of `dashboards/`, parsed; the expected ones must be among them.
fn dashboards() -> Vec<Dashboard> {
    let dir = dashboards_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    let names: Vec<String> =
        files.iter().map(|p| p.file_name().expect("a file name").to_string_lossy().into_owned()).collect();
    for expected in EXPECTED {
        assert!(names.iter().any(|n| n == expected), "dashboards/{expected} is missing; found {names:?}");
    }
    files
        .iter()
        .zip(names)
        .map(|(path, file)| {
            let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file} is not JSON: {e}"));
            Dashboard { file, json }
        })
        .collect()
}

/// Every panel, the panels of collapsed rows included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Prometheus,
    Loki,
}

/// The source a datasource reference reads through, when it names one of the two variables.
fn source_of(reference: &Value) -> Option<Source> {
    match (reference["uid"].as_str(), reference["type"].as_str()) {
        (Some("${datasource}"), Some("prometheus")) => Some(Source::Prometheus),
        (Some("${loki}"), Some("loki")) => Some(Source::Loki),
        _ => None,
    }
}

/// One query of a panel.
#[derive(Debug, Clone)]
struct Query {
    /// `file: panel title (refId)`, for messages.
    place: String,
    source: Source,
    expr: String,
}

fn queries(dashboard: &Dashboard) -> Vec<Query> {
    let mut out = Vec::new();
    for panel in panels(&dashboard.json) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let reference = if target["datasource"].is_object() { &target["datasource"] } else { &panel["datasource"] };
            let place = format!("{}: {} ({})", dashboard.file, panel["title"], target["refId"]);
            let source = source_of(reference).unwrap_or_else(|| panic!("{place} reads from {reference}"));
            let expr = target["expr"].as_str().unwrap_or_else(|| panic!("{place} has no expr")).to_owned();
            out.push(Query { place, source, expr });
        }
    }
    out
}

/// A template variable as Grafana reads it.
#[derive(Debug, Clone)]
struct Variable {
    name: String,
    kind: String,
    /// The query of a `query` variable, the plugin type of a `datasource` one.
    query: String,
    source: Option<Source>,
    /// What the variable editor shows as the query.
    definition: Option<String>,
    multi: bool,
    include_all: bool,
    all_value: Option<String>,
}

fn variables(dashboard: &Dashboard) -> Vec<Variable> {
    dashboard.json["templating"]["list"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: templating.list is not a list", dashboard.file))
        .iter()
        .map(|v| {
            // What Grafana runs: Prometheus' editor keeps `query`, Loki's the label and stream.
            let query = match &v["query"] {
                Value::String(text) => text.clone(),
                Value::Object(object) => match (object.get("query"), object.get("label")) {
                    (Some(query), _) => query.as_str().unwrap_or_default().to_owned(),
                    (None, Some(label)) => {
                        let label = label.as_str().unwrap_or_default();
                        match object.get("stream").and_then(Value::as_str).unwrap_or_default() {
                            "" => format!("label_values({label})"),
                            stream => format!("label_values({stream}, {label})"),
                        }
                    }
                    (None, None) => String::new(),
                },
                _ => String::new(),
            };
            Variable {
                name: v["name"].as_str().unwrap_or_default().to_owned(),
                kind: v["type"].as_str().unwrap_or_default().to_owned(),
                query,
                source: source_of(&v["datasource"]),
                definition: v["definition"].as_str().map(str::to_owned),
                multi: v["multi"].as_bool().unwrap_or(false),
                include_all: v["includeAll"].as_bool().unwrap_or(false),
                all_value: v["allValue"].as_str().map(str::to_owned),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Grafana's variable interpolation
// ---------------------------------------------------------------------------------------

/// What Grafana writes into a Prometheus query for a value of a multi-value or "All"
/// variable (its `prometheusSpecialRegexEscape`): regex metacharacters escaped, with the
/// backslash doubled for the PromQL string it lands in.
fn regex_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\\\\\"),
            '$' | '^' | '*' | '{' | '}' | '[' | ']' | '\'' | '+' | '?' | '.' | '(' | ')' | '|' => {
                out.push_str("\\\\");
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out
}

/// What Grafana writes for a value of a single-value variable (`prometheusRegularEscape`).
fn plain_escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\'', "\\\\'")
}

/// `text` with `$name` and `${name}` replaced from `values`. `$1`-style references (of
/// `label_replace`) are left alone; any other unknown variable is an error.
fn substitute(text: &str, values: &BTreeMap<String, String>) -> Result<String, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '$' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let (name, end) = if chars.get(i + 1) == Some(&'{') {
            let close = chars[i..].iter().position(|&c| c == '}').ok_or_else(|| format!("unclosed ${{ in {text}"))?;
            let inner: String = chars[i + 2..i + close].iter().collect();
            (inner.split(':').next().unwrap_or_default().to_owned(), i + close + 1)
        } else {
            let mut j = i + 1;
            while j < chars.len() && (chars[j].is_ascii_alphanumeric() || chars[j] == '_') {
                j += 1;
            }
            (chars[i + 1..j].iter().collect(), j)
        };
        match values.get(&name) {
            Some(value) => out.push_str(value),
            None if !name.is_empty() && name.chars().all(|c| c.is_ascii_digit()) => {
                out.extend(&chars[i..end]);
            }
            None => return Err(format!("undefined variable ${name} in {text}")),
        }
        i = end;
    }
    Ok(out)
}

fn builtins() -> BTreeMap<String, String> {
    BUILTINS.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// `label_values(SELECTOR, LABEL)` split into its selector and label.
fn label_values(query: &str) -> Result<(String, String), String> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")
        .and_then(|rest| rest.strip_suffix(')'))
        .ok_or_else(|| format!("{query:?} is not label_values(...)"))?;
    let (selector, label) =
        inner.rsplit_once(',').ok_or_else(|| format!("{query:?} names no metric: Grafana would list every series"))?;
    Ok((selector.trim().to_owned(), label.trim().to_owned()))
}

// ---------------------------------------------------------------------------------------
// What a query reads
// ---------------------------------------------------------------------------------------

/// A label matcher: `(label, operator, value)`.
type Matcher = (String, String, String);

/// A vector selector: a metric name and its label matchers.
#[derive(Debug, Clone, Default, PartialEq)]
struct Selector {
    metric: Option<String>,
    matchers: Vec<Matcher>,
}

/// The metrics and labels a PromQL or LogQL expression reads.
#[derive(Debug, Default)]
struct Reads {
    selectors: Vec<Selector>,
    /// Labels of `by`, `without`, `on`, `ignoring`, `group_left`, `group_right`.
    grouping: BTreeSet<String>,
    /// Labels made by `label_replace` / `label_join`.
    created: BTreeSet<String>,
}

const AGGREGATIONS: [&str; 14] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
const GROUPING: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];
const KEYWORDS: [&str; 6] = ["and", "or", "unless", "bool", "inf", "nan"];

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// A string literal starting at `start` (its quote): its value and the index after it.
fn string_literal(chars: &[char], start: usize) -> Result<(String, usize), String> {
    let quote = chars[start];
    let mut value = String::new();
    let mut i = start + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if quote != '`' => {
                if let Some(&next) = chars.get(i + 1) {
                    value.push(next);
                }
                i += 2;
            }
            c if c == quote => return Ok((value, i + 1)),
            c => {
                value.push(c);
                i += 1;
            }
        }
    }
    Err("an unterminated string".to_owned())
}

fn skip_spaces(chars: &[char], mut i: usize) -> usize {
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    i
}

/// The matchers of `{...}` starting at `start`, and the index after the `}`.
fn matchers(chars: &[char], start: usize) -> Result<(Vec<Matcher>, usize), String> {
    let mut out = Vec::new();
    let mut i = start + 1;
    loop {
        i = skip_spaces(chars, i);
        match chars.get(i) {
            None => return Err("an unclosed {".to_owned()),
            Some('}') => return Ok((out, i + 1)),
            Some(',') => {
                i += 1;
                continue;
            }
            Some(_) => {}
        }
        let name_start = i;
        while i < chars.len() && is_name_char(chars[i]) {
            i += 1;
        }
        let name: String = chars[name_start..i].iter().collect();
        i = skip_spaces(chars, i);
        let op_start = i;
        while i < chars.len() && matches!(chars[i], '=' | '!' | '~') {
            i += 1;
        }
        let op: String = chars[op_start..i].iter().collect();
        i = skip_spaces(chars, i);
        if name.is_empty() || !["=", "!=", "=~", "!~"].contains(&op.as_str()) {
            return Err(format!("a malformed matcher at {:?}", chars[name_start..].iter().collect::<String>()));
        }
        match chars.get(i) {
            Some('"' | '\'' | '`') => {
                let (value, end) = string_literal(chars, i)?;
                out.push((name, op, value));
                i = end;
            }
            _ => return Err(format!("matcher {name}{op} has no quoted value")),
        }
    }
}

/// The label names of `(a, b)` starting at `start`, and the index after the `)`.
fn label_list(chars: &[char], start: usize) -> Result<(Vec<String>, usize), String> {
    let close = chars[start..].iter().position(|&c| c == ')').ok_or("an unclosed label list")? + start;
    let inner: String = chars[start + 1..close].iter().collect();
    let labels = inner.split(',').map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect();
    Ok((labels, close + 1))
}

/// Reads a PromQL expression (or LogQL: stream selectors are label matchers without a
/// metric name) closely enough to know which metrics and labels it reads. Not a parser:
/// Prometheus itself judges validity.
fn scan(expr: &str) -> Result<Reads, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut reads = Reads::default();
    let mut i = 0;
    // The selector a `{` right after belongs to (`metric{...}`).
    let mut pending: Option<usize> = None;
    // A function name waiting for its `(`; then the calls open at each depth, with how many
    // string arguments each has had (the first one of label_replace/label_join is the label
    // it creates).
    let mut function: Option<String> = None;
    let mut calls: Vec<(usize, String, usize)> = Vec::new();
    let mut depth = 0usize;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                let (value, end) = string_literal(&chars, i)?;
                if let Some((at, name, strings)) = calls.last_mut() {
                    if *at == depth {
                        *strings += 1;
                        if *strings == 1 && (name == "label_replace" || name == "label_join") {
                            reads.created.insert(value);
                        }
                    }
                }
                i = end;
                pending = None;
            }
            '{' => {
                let (found, end) = matchers(&chars, i)?;
                match pending.take() {
                    Some(index) => reads.selectors[index].matchers.extend(found),
                    None => reads.selectors.push(Selector { metric: None, matchers: found }),
                }
                i = end;
            }
            '[' => {
                let close = chars[i..].iter().position(|&c| c == ']').ok_or("an unclosed [")?;
                i += close + 1;
                pending = None;
            }
            '(' => {
                depth += 1;
                if let Some(name) = function.take() {
                    calls.push((depth, name, 0));
                }
                i += 1;
                pending = None;
            }
            ')' => {
                if calls.last().is_some_and(|(at, ..)| *at == depth) {
                    calls.pop();
                }
                depth = depth.checked_sub(1).ok_or("an unbalanced )")?;
                i += 1;
                pending = None;
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len() && is_name_char(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = skip_spaces(&chars, i);
                pending = None;
                function = None;
                if GROUPING.contains(&word.as_str()) {
                    if chars.get(next) == Some(&'(') {
                        let (labels, end) = label_list(&chars, next)?;
                        reads.grouping.extend(labels);
                        i = end;
                    }
                } else if word == "offset" {
                    i = skip_spaces(&chars, i);
                    while i < chars.len() && chars[i].is_ascii_alphanumeric() {
                        i += 1;
                    }
                } else if KEYWORDS.contains(&word.as_str()) || AGGREGATIONS.contains(&word.as_str()) {
                } else if chars.get(next) == Some(&'(') {
                    function = Some(word);
                } else {
                    reads.selectors.push(Selector { metric: Some(word), matchers: Vec::new() });
                    pending = Some(reads.selectors.len() - 1);
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
                pending = None;
            }
            c if c.is_whitespace() => i += 1,
            _ => {
                i += 1;
                pending = None;
            }
        }
    }
    if depth != 0 {
        return Err("an unclosed (".to_owned());
    }
    Ok(reads)
}

#[test]
fn the_reads_of_a_query_are_found_in_its_selectors_groupings_and_label_functions() {
    let reads = scan(
        r#"label_join(sum by (client, server) (rate(a_total{x=~"$v", y!="}"}[5m]) or rate(b_bucket[1m] offset 5m)), "id", " -> ", "client", "server") / on (client) group_left max without (le) (c) > bool 0.5 and vector(1e3)"#,
    )
    .expect("the expression scans");
    let metrics: Vec<Option<&str>> = reads.selectors.iter().map(|s| s.metric.as_deref()).collect();
    assert_eq!(metrics, vec![Some("a_total"), Some("b_bucket"), Some("c")]);
    assert_eq!(
        reads.selectors[0].matchers,
        vec![("x".to_owned(), "=~".to_owned(), "$v".to_owned()), ("y".to_owned(), "!=".to_owned(), "}".to_owned())]
    );
    assert_eq!(reads.grouping, BTreeSet::from(["client".to_owned(), "server".to_owned(), "le".to_owned()]));
    assert_eq!(reads.created, BTreeSet::from(["id".to_owned()]));
    let nested = scan(r#"label_replace(label_replace(m, "id", "$1", "a", "(.*)"), "title", "$1", "a", "(.*)")"#)
        .expect("the expression scans");
    assert_eq!(nested.created, BTreeSet::from(["id".to_owned(), "title".to_owned()]));
    let logql = scan(r#"sum by (level) (count_over_time({node=~".+", job="a"} |~ "(?i){x}" [$__interval]))"#)
        .expect("the expression scans");
    assert_eq!(logql.selectors.len(), 1);
    assert_eq!(logql.selectors[0].metric, None);
    assert_eq!(logql.selectors[0].matchers.len(), 2);
    assert!(scan("sum(rate(x[1m])").is_err());
    assert_eq!(
        substitute(
            "a{b=~\"$b\"}[$__range] $1",
            &builtins().into_iter().chain([("b".to_owned(), "c".to_owned())]).collect()
        )
        .as_deref(),
        Ok("a{b=~\"c\"}[5m] $1")
    );
    assert!(substitute("$nope", &builtins()).is_err());
    assert_eq!(regex_escape("GET /users/{id}"), "GET /users/\\\\{id\\\\}");
}

// ---------------------------------------------------------------------------------------
// (a) Importable as they are
// ---------------------------------------------------------------------------------------

#[test]
fn every_dashboard_is_a_grafana_dashboard_that_imports_as_is() {
    let mut problems = Vec::new();
    let mut uids = BTreeMap::new();
    let mut titles = BTreeSet::new();
    for dashboard in dashboards() {
        let file = &dashboard.file;
        let json = &dashboard.json;
        let mut problem = |text: String| problems.push(format!("{file}: {text}"));

        let title = json["title"].as_str().unwrap_or_default();
        if title.is_empty() || !titles.insert(title.to_owned()) {
            problem(format!("the title {:?} is missing or used by another dashboard", json["title"]));
        }
        match json["uid"].as_str() {
            Some(uid) if !uid.is_empty() && uid.len() <= 40 => {
                if let Some(other) = uids.insert(uid.to_owned(), file.clone()) {
                    problem(format!("uid {uid} is also the uid of {other}"));
                }
            }
            other => problem(format!("uid {other:?} is not 1 to 40 characters")),
        }
        if json["schemaVersion"] != 39 {
            problem(format!("schemaVersion is {}, not 39", json["schemaVersion"]));
        }
        if !json["id"].is_null() {
            problem("id must be null so that import and the HTTP API create the dashboard".to_owned());
        }
        if json.get("__inputs").is_some() {
            problem("__inputs make import ask for a datasource; the datasource variables do that".to_owned());
        }

        let vars = variables(&dashboard);
        let mut names = BTreeSet::new();
        for var in &vars {
            if !names.insert(var.name.clone()) {
                problem(format!("variable {} is defined twice", var.name));
            }
            match var.kind.as_str() {
                "datasource" | "textbox" => {}
                "query" if var.source.is_some() => {
                    if var.query.trim().is_empty() {
                        problem(format!("variable {} has no query", var.name));
                    }
                    if var.definition.as_deref().is_some_and(|d| d != var.query) {
                        problem(format!("variable {} shows {:?} but runs {:?}", var.name, var.definition, var.query));
                    }
                }
                "query" => problem(format!("variable {} does not read through a datasource variable", var.name)),
                other => problem(format!("variable {} is of type {other}", var.name)),
            }
            if var.include_all && var.all_value.is_none() {
                // Without allValue, "All" expands to every value joined with |: a regex of
                // thousands of nodes or handlers.
                problem(format!("variable {} offers All without an allValue", var.name));
            }
        }
        let datasource_var = |name: &str, plugin: &str| {
            vars.iter().any(|v| v.name == name && v.kind == "datasource" && v.query == plugin)
        };
        if !datasource_var("datasource", "prometheus") {
            problem("templating.list has no `datasource` variable of type datasource for Prometheus".to_owned());
        }

        let mut ids = BTreeSet::new();
        let all = panels(json);
        if all.iter().all(|p| p["type"] == "row") {
            problem("there are no panels".to_owned());
        }
        let mut uses_loki = false;
        for panel in all {
            let kind = panel["type"].as_str().unwrap_or_default();
            let name = panel["title"].as_str().unwrap_or_default();
            if !ids.insert(panel["id"].as_u64().unwrap_or(0)) || panel["id"].as_u64().is_none() {
                problem(format!("panel {name:?} has no id or shares its id"));
            }
            if !BUILT_IN_PANELS.contains(&kind) {
                problem(format!("panel {name:?} is of type {kind:?}, which needs a plugin"));
            }
            let grid = &panel["gridPos"];
            // Grafana's grid is 24 columns wide.
            let fits = match (grid["x"].as_u64(), grid["y"].as_u64(), grid["w"].as_u64(), grid["h"].as_u64()) {
                (Some(x), Some(_), Some(w), Some(h)) => w > 0 && h > 0 && x + w <= 24,
                _ => false,
            };
            if !fits {
                problem(format!("panel {name:?} has a bad gridPos {grid}"));
            }
            if name.is_empty() {
                problem(format!("a {kind} panel has no title"));
            }
            if kind == "row" {
                continue;
            }
            if panel["description"].as_str().unwrap_or_default().trim().is_empty() {
                problem(format!("panel {name:?} has no description"));
            }
            let Some(source) = source_of(&panel["datasource"]) else {
                problem(format!("panel {name:?} reads from {} instead of a datasource variable", panel["datasource"]));
                continue;
            };
            uses_loki |= source == Source::Loki;
            let targets = panel["targets"].as_array().cloned().unwrap_or_default();
            if targets.is_empty() {
                problem(format!("panel {name:?} has no query"));
            }
            let mut refs = BTreeSet::new();
            for target in &targets {
                if !refs.insert(target["refId"].as_str().unwrap_or_default().to_owned()) {
                    problem(format!("panel {name:?} has two queries with refId {}", target["refId"]));
                }
                if target["datasource"].is_object() && source_of(&target["datasource"]) != Some(source) {
                    problem(format!("a query of {name:?} reads from {}", target["datasource"]));
                }
                if target["expr"].as_str().unwrap_or_default().trim().is_empty() {
                    problem(format!("a query of {name:?} has no expr"));
                }
            }
        }
        if uses_loki && !datasource_var("loki", "loki") {
            problem("panels read from ${loki}, but there is no `loki` datasource variable".to_owned());
        }

        // Every variable a query uses is defined (or one of Grafana's own).
        let mut values = builtins();
        for var in &vars {
            values.insert(var.name.clone(), String::new());
        }
        let expressions = queries(&dashboard).into_iter().map(|q| (q.place, q.expr)).chain(
            vars.iter().filter(|v| v.kind == "query").map(|v| (format!("variable {}", v.name), v.query.clone())),
        );
        for (place, expr) in expressions {
            if let Err(e) = substitute(&expr, &values) {
                problems.push(format!("{place}: {e}"));
            }
            if let Err(e) = scan(&expr) {
                problems.push(format!("{place}: {e}: {expr}"));
            }
        }
    }
    assert!(problems.is_empty(), "the dashboards would not import cleanly:\n{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------
// Loki's queries, checked without a Loki
// ---------------------------------------------------------------------------------------

#[test]
fn log_queries_select_streams_only_by_the_labels_the_agent_gives_loki() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for dashboard in dashboards() {
        let vars = variables(&dashboard);
        // "All" as Grafana writes it into the query.
        let mut all = builtins();
        for var in &vars {
            let value = match var.kind.as_str() {
                "query" if var.include_all => var.all_value.clone().unwrap_or_default(),
                "query" => "value".to_owned(),
                _ => String::new(),
            };
            all.insert(var.name.clone(), value);
        }
        let mut logql: Vec<(String, String, bool)> = queries(&dashboard)
            .into_iter()
            .filter(|q| q.source == Source::Loki)
            .map(|q| (q.place, q.expr, true))
            .collect();
        for var in vars.iter().filter(|v| v.kind == "query" && v.source == Some(Source::Loki)) {
            let place = format!("{}: variable {}", dashboard.file, var.name);
            let query = var.query.trim();
            let Some(inner) = query.strip_prefix("label_values(").and_then(|r| r.strip_suffix(')')) else {
                problems.push(format!("{place}: {query:?} is not label_values(...)"));
                continue;
            };
            let (selector, label) = match inner.rsplit_once(',') {
                Some((selector, label)) => (Some(selector.trim().to_owned()), label.trim()),
                None => (None, inner.trim()),
            };
            if !LOKI_LABELS.contains(&label) {
                problems.push(format!("{place}: lists values of {label:?}, not a label the agent gives Loki"));
            }
            if let Some(selector) = selector {
                logql.push((place, selector, true));
            }
        }
        for (place, expr, needs_selector) in logql {
            checked += 1;
            let rendered = match substitute(&expr, &all) {
                Ok(rendered) => rendered,
                Err(e) => {
                    problems.push(format!("{place}: {e}"));
                    continue;
                }
            };
            let reads = match scan(&rendered) {
                Ok(reads) => reads,
                Err(e) => {
                    problems.push(format!("{place}: {e}: {expr}"));
                    continue;
                }
            };
            if needs_selector && reads.selectors.is_empty() {
                problems.push(format!("{place}: no stream selector in {expr}"));
            }
            for selector in &reads.selectors {
                if selector.metric.is_some() {
                    problems.push(format!("{place}: {:?} outside a stream selector", selector.metric));
                }
                for (label, _, _) in &selector.matchers {
                    if !LOKI_LABELS.contains(&label.as_str()) {
                        problems.push(format!("{place}: selects streams by {label:?}, not a Loki label of the agent"));
                    }
                }
                // Loki refuses a selector whose every matcher also matches the empty value
                // ("queries require at least one regexp or equality matcher that does not
                // have an empty-compatible value"), so with every variable on All one must not.
                let selective = selector.matchers.iter().any(|(_, op, value)| match op.as_str() {
                    "=" => !value.is_empty(),
                    "=~" => value == ".+" || (!value.is_empty() && !value.contains(['*', '?', '|', '(', '['])),
                    _ => false,
                });
                if !selective {
                    problems.push(format!("{place}: Loki would refuse {rendered}: every matcher matches empty"));
                }
            }
            for label in &reads.grouping {
                if !LOKI_LABELS.contains(&label.as_str()) && !LOKI_METADATA.contains(&label.as_str()) {
                    problems
                        .push(format!("{place}: groups by {label:?}, neither a Loki label nor metadata of the agent"));
                }
            }
        }
    }
    assert!(checked >= 8, "only {checked} LogQL queries were found; the logs dashboard lost its panels?");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------
// An agent fed like a node feeds it
// ---------------------------------------------------------------------------------------

/// The agent under test and the peers around it, all stopped on drop.
struct Fed {
    agent: Agent,
    pull_port: u16,
    _loki: Loki,
    _jaeger: Collector,
    _broken: ScrapeTarget,
    _logs: tempfile::TempDir,
}

impl Fed {
    fn pull_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.pull_port)
    }
}

fn nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// One span of a trace shape; times in milliseconds from the trace's start.
struct Step {
    service: &'static str,
    name: &'static str,
    kind: span::SpanKind,
    parent: Option<usize>,
    from: u64,
    to: u64,
    /// `http.request.method` and `http.route`.
    route: Option<(&'static str, &'static str)>,
    error: bool,
}

fn step(
    service: &'static str,
    name: &'static str,
    kind: span::SpanKind,
    parent: Option<usize>,
    from: u64,
    to: u64,
) -> Step {
    Step { service, name, kind, parent, from, to, route: None, error: false }
}

impl Step {
    fn route(self, method: &'static str, route: &'static str) -> Step {
        Step { route: Some((method, route)), ..self }
    }

    fn failed(self, error: bool) -> Step {
        Step { error, ..self }
    }
}

/// `feed` serving GET /api/feed/v4 (auth, a call to `users`, render) or POST /api/comment
/// (auth, a database insert); `users` serving GET /users/{id} with a database query. Every
/// third trace fails in both services.
fn trace_shape(n: u32) -> Vec<Step> {
    use span::SpanKind::{Client, Internal, Server};
    if n % 4 == 3 {
        return vec![
            step("feed", "POST /api/comment", Server, None, 0, 15).route("POST", "/api/comment"),
            step("feed", "auth", Internal, Some(0), 1, 3),
            step("feed", "INSERT comments", Client, Some(0), 4, 14),
        ];
    }
    let failed = n % 3 == 0;
    vec![
        step("feed", "GET /api/feed/v4", Server, None, 0, 40 + u64::from(n))
            .route("GET", "/api/feed/v4")
            .failed(failed),
        step("feed", "auth", Internal, Some(0), 1, 5),
        step("feed", "GET users", Client, Some(0), 6, 30).failed(failed),
        step("users", "GET /users/{id}", Server, Some(2), 7, 29).route("GET", "/users/{id}").failed(failed),
        step("users", "SELECT users", Client, Some(3), 8, 25),
        step("feed", "render", Internal, Some(0), 31, 39),
    ]
}

/// Traces `first..first+count` as one OTLP request; trace `duplicate` repeats its `auth`
/// span (same id), which the analysis counts as an anomaly.
fn traces_request(first: u32, count: u32, duplicate: Option<u32>) -> ExportTraceServiceRequest {
    let origin = nanos(SystemTime::now()) - 2_000_000_000;
    let mut by_service: BTreeMap<&str, Vec<Span>> = BTreeMap::new();
    for n in first..first + count {
        let trace_id: Vec<u8> =
            [0xda, 0x5b].into_iter().chain(std::iter::repeat_n(0x11, 10)).chain(n.to_be_bytes()).collect();
        let span_id = |i: usize| vec![0x5a, 0x11, (n >> 8) as u8, n as u8, 0, 0, 0, i as u8 + 1];
        let start = origin + u64::from(n) * 50_000_000;
        for (i, step) in trace_shape(n).iter().enumerate() {
            let mut attributes = Vec::new();
            if let Some((method, route)) = step.route {
                attributes.push(string_kv("http.request.method", method));
                attributes.push(string_kv("http.route", route));
            }
            let span = Span {
                trace_id: trace_id.clone(),
                span_id: span_id(i),
                parent_span_id: step.parent.map(span_id).unwrap_or_default(),
                name: step.name.to_owned(),
                kind: step.kind as i32,
                start_time_unix_nano: start + step.from * 1_000_000,
                end_time_unix_nano: start + step.to * 1_000_000,
                attributes,
                status: Some(Status {
                    code: if step.error { status::StatusCode::Error } else { status::StatusCode::Ok } as i32,
                    message: if step.error { "upstream failed".to_owned() } else { String::new() },
                }),
                ..Default::default()
            };
            let copies = if duplicate == Some(n) && step.name == "auth" { 2 } else { 1 };
            for _ in 0..copies {
                by_service.entry(step.service).or_default().push(span.clone());
            }
        }
    }
    ExportTraceServiceRequest {
        resource_spans: by_service
            .into_iter()
            .map(|(service, spans)| ResourceSpans {
                resource: Some(Resource { attributes: vec![string_kv("service.name", service)], ..Default::default() }),
                scope_spans: vec![ScopeSpans { spans, ..Default::default() }],
                ..Default::default()
            })
            .collect(),
    }
}

/// Log records of `feed` stamped now, with a severity.
fn logs_request(count: usize) -> ExportLogsServiceRequest {
    let now = nanos(SystemTime::now());
    let log_records = (0..count)
        .map(|i| LogRecord {
            time_unix_nano: now + i as u64,
            observed_time_unix_nano: now + i as u64,
            severity_text: "WARN".to_owned(),
            severity_number: 13,
            body: Some(AnyValue { value: Some(any_value::Value::StringValue(format!("comment {i} rejected"))) }),
            ..Default::default()
        })
        .collect();
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource { attributes: vec![string_kv("service.name", "feed")], ..Default::default() }),
            scope_logs: vec![ScopeLogs { log_records, ..Default::default() }],
            ..Default::default()
        }],
    }
}

fn indented(body: &str) -> String {
    body.lines().filter(|l| !l.trim().is_empty()).map(|l| format!("    {}\n", l.trim())).collect()
}

fn append_lines(path: &Path, lines: &[&str]) {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    for line in lines {
        writeln!(file, "{line}").expect("cannot append to the log file");
    }
}

/// Polls the pull endpoint until every name of `names` is served.
async fn wait_for_pull(fed: &Fed, names: &[&str]) {
    let started = Instant::now();
    loop {
        let metrics = Metrics::scrape(&fed.pull_url()).await;
        let missing: Vec<&&str> = names.iter().filter(|n| metrics.lookup(n, &[]).is_none()).collect();
        if missing.is_empty() {
            return;
        }
        if started.elapsed() > DEADLINE {
            panic!("the pull endpoint never served {missing:?} within {DEADLINE:?}:\n{}", metrics.text());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts the agent with every source and exporter the dashboards show, feeds it, and waits
/// until each kind of event has been counted: analysed traces and an anomaly, a refused and
/// an accepted export to Jaeger, a retried, a refused and an accepted push to Loki, failed
/// scrapes, host metrics, span metrics and the service graph.
async fn fed_agent() -> Fed {
    let loki = Loki::start().await;
    loki.answer_next(1, loki::Reply::unavailable());
    loki.answer_next(1, loki::Reply::status(400, None, "entry for stream has timestamp too old"));
    let jaeger = Collector::grpc(Script::first(1, Reply::grpc(tonic::Code::InvalidArgument, "span is invalid"))).await;
    let broken = ScrapeTarget::start(Exposition::status(500)).await;

    let logs = tempfile::Builder::new().prefix("periscope-dashboards-logs-").tempdir().expect("a temporary directory");
    let container =
        logs.path().join("pods").join("shop_checkout-7d9f_3c1e2a44-0000-4000-8000-00000000feed").join("app");
    std::fs::create_dir_all(&container).expect("cannot create the pod log directory");
    let log_file = container.join("0.log");
    append_lines(&log_file, &[r#"{"level":"info","msg":"started"}"#, r#"{"level":"error","msg":"no stock"}"#]);

    let (admin, http, pull) = (free_port(), free_port(), free_port());
    let include = serde_json::to_string(&format!("{}/pods/*/*/*.log", logs.path().display())).expect("a string");
    let mut yaml = String::new();
    let _ = writeln!(yaml, "node_name: {NODE}");
    let _ = writeln!(yaml, "data_dir: ./data");
    let _ = writeln!(yaml, "shutdown_timeout: 3s");
    let _ = writeln!(yaml, "server: {{ listen: 127.0.0.1:{admin} }}");
    let _ = writeln!(yaml, "log: {{ format: text }}");
    let _ = writeln!(yaml, "sources:");
    let _ = writeln!(yaml, "  otlp: {{ grpc: null, http: 127.0.0.1:{http} }}");
    let _ = writeln!(yaml, "  host_metrics: {{ enabled: true, interval: 1s, root: / }}");
    let _ = writeln!(yaml, "  prometheus:");
    let _ = writeln!(yaml, "    scrape_interval: 1s");
    let _ = writeln!(yaml, "    scrape_timeout: 800ms");
    let _ = writeln!(yaml, "    static_targets:");
    let _ = writeln!(yaml, "      - {{ job: broken, url: {:?}, labels: {{}} }}", broken.url());
    let _ = writeln!(yaml, "  logs:");
    let _ = writeln!(yaml, "    - include: [{include}]");
    let _ = writeln!(yaml, "      format: auto");
    let _ = writeln!(yaml, "      start_at: beginning");
    let _ = writeln!(yaml, "      labels: {{ job: pods }}");
    let _ = writeln!(yaml, "paths: {{ enabled: true, trace_timeout: 300ms }}");
    let _ = writeln!(yaml, "exporters:");
    let _ = writeln!(yaml, "  prometheus: {{ listen: 127.0.0.1:{pull} }}");
    let _ = writeln!(yaml, "  jaeger:");
    yaml.push_str(&indented(&jaeger.exporter_config(&[])));
    let _ = writeln!(yaml, "  loki:");
    yaml.push_str(&indented(&loki.exporter_config(&[])));

    let agent = Agent::start(&yaml).await;
    let fed = Fed { agent, pull_port: pull, _loki: loki, _jaeger: jaeger, _broken: broken, _logs: logs };
    let traces_url = format!("http://127.0.0.1:{http}/v1/traces");

    // Jaeger refuses the first export (dropped as permanent) and takes the next.
    let answer = post_protobuf(&traces_url, &traces_request(0, 4, Some(1))).await;
    assert_eq!(answer.status, 200, "POST /v1/traces: {}", answer.body_text());
    let agent = &fed.agent;
    agent.wait_for_metric("periscope_dropped_items_total", &[("component", "jaeger")], |v| v > 0.0).await;
    let answer = post_protobuf(&traces_url, &traces_request(4, 8, None)).await;
    assert_eq!(answer.status, 200, "POST /v1/traces: {}", answer.body_text());
    agent.wait_for_metric("periscope_sent_items_total", &[("component", "jaeger")], |v| v > 0.0).await;

    // Loki answers 503 (retried), then 400 (dropped), then takes what follows.
    agent.wait_for_metric("periscope_dropped_items_total", &[("component", "loki")], |v| v > 0.0).await;
    append_lines(&log_file, &[r#"{"level":"warn","msg":"slow payment"}"#, r#"{"level":"info","msg":"paid"}"#]);
    let answer = post_protobuf(&format!("http://127.0.0.1:{http}/v1/logs"), &logs_request(3)).await;
    assert_eq!(answer.status, 200, "POST /v1/logs: {}", answer.body_text());
    agent.wait_for_metric("periscope_sent_items_total", &[("component", "loki")], |v| v >= 5.0).await;
    agent.wait_for_metric("periscope_retried_items_total", &[("component", "loki")], |v| v > 0.0).await;

    agent.wait_for_metric("periscope_paths_traces_total", &[("outcome", "complete")], |v| v >= 12.0).await;
    agent.wait_for_metric("periscope_paths_anomalies_total", &[("kind", "duplicate_span")], |v| v > 0.0).await;
    agent.wait_for_metric("periscope_scrape_failures_total", &[("job", "broken")], |v| v > 0.0).await;
    agent.wait_for_metric("periscope_file_entries_total", &[], |v| v >= 4.0).await;
    wait_for_pull(
        &fed,
        &[
            "node_cpu_seconds_total",
            "node_disk_read_bytes_total",
            "traces_span_metrics_calls_total",
            "traces_service_graph_request_total",
            "periscope_path_traces_total",
        ],
    )
    .await;
    fed
}

/// The names of the samples of an exposition, each with the label names it carries.
fn exposed(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let metrics = Metrics::parse(text);
    let names: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    names
        .into_iter()
        .map(|name| {
            let labels = metrics.series(name, &[]).flat_map(|s| s.labels.keys().cloned()).collect();
            (name.to_owned(), labels)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// (c) Every metric and label exists
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_and_label_the_dashboards_read_is_one_the_agent_exposes() {
    let fed = fed_agent().await;
    let admin = fed.agent.metrics().await;
    let pull = Metrics::scrape(&fed.pull_url()).await;
    let mut names = exposed(admin.text());
    for (name, labels) in exposed(pull.text()) {
        names.entry(name).or_default().extend(labels);
    }

    let mut problems = Vec::new();
    let mut read = BTreeSet::new();
    for dashboard in dashboards() {
        let mut expressions: Vec<(String, String)> = queries(&dashboard)
            .into_iter()
            .filter(|q| q.source == Source::Prometheus)
            .map(|q| (q.place, q.expr))
            .collect();
        for var in variables(&dashboard) {
            if var.kind == "query" && var.source == Some(Source::Prometheus) {
                let place = format!("{}: variable {}", dashboard.file, var.name);
                match label_values(&var.query) {
                    Ok((selector, label)) => {
                        // The label listed is read from the selector's series.
                        expressions.push((place, format!("group by ({label}) ({selector})")));
                    }
                    Err(e) => problems.push(format!("{place}: {e}")),
                }
            }
        }
        for (place, expr) in expressions {
            let reads = match scan(&expr) {
                Ok(reads) => reads,
                Err(e) => {
                    problems.push(format!("{place}: {e}: {expr}"));
                    continue;
                }
            };
            // Labels of every series the expression reads: its own, plus the target labels
            // Prometheus adds, plus `exported_*` where a series' own label clashed with one.
            let mut available: BTreeSet<String> = ["job", "instance"].map(str::to_owned).into();
            available.extend(reads.created.iter().cloned());
            for selector in &reads.selectors {
                let Some(metric) = &selector.metric else {
                    problems.push(format!("{place}: a selector without a metric name reads every series: {expr}"));
                    continue;
                };
                read.insert(metric.clone());
                let labels: BTreeSet<String> = if let Some(labels) = names.get(metric) {
                    labels.clone()
                } else {
                    problems.push(format!("{place}: the agent does not expose {metric}"));
                    continue;
                };
                for (label, _, _) in &selector.matchers {
                    if !labels.contains(label) && label != "job" && label != "instance" {
                        problems.push(format!("{place}: {metric} has no label {label:?} (it has {labels:?})"));
                    }
                }
                for target in ["job", "instance"] {
                    if labels.contains(target) {
                        available.insert(format!("exported_{target}"));
                    }
                }
                available.extend(labels);
            }
            for label in &reads.grouping {
                if !available.contains(label) {
                    problems.push(format!("{place}: groups or matches on {label:?}, which no series it reads has"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The dashboards together read every family of the contract's "Names that dashboards
    // rely on" that the agent serves.
    for name in [
        "periscope_path_traces_total",
        "periscope_path_step_duration_seconds_bucket",
        "periscope_path_step_self_seconds_bucket",
        "periscope_path_critical_seconds_total",
        "traces_span_metrics_calls_total",
        "traces_span_metrics_duration_milliseconds_bucket",
        "traces_service_graph_request_total",
        "traces_service_graph_request_failed_total",
        "traces_service_graph_request_server_seconds_bucket",
        "node_cpu_seconds_total",
        "node_memory_MemAvailable_bytes",
        "node_load1",
        "node_filesystem_avail_bytes",
        "node_network_receive_bytes_total",
        "node_disk_read_bytes_total",
        "node_boot_time_seconds",
        "node_context_switches_total",
    ] {
        assert!(read.contains(name), "no dashboard reads {name}");
    }
}

// ---------------------------------------------------------------------------------------
// (b) Every query is valid PromQL and returns data
// ---------------------------------------------------------------------------------------

/// What one round of evaluation found.
#[derive(Default)]
struct Round {
    /// Queries Prometheus refused: these never get better.
    refused: Vec<String>,
    /// Queries (or variables) without data yet.
    empty: Vec<String>,
    evaluated: usize,
}

/// Evaluates `promql` now: the result's series, or what Prometheus said.
async fn evaluate(client: &reqwest::Client, prometheus: &Prometheus, promql: &str) -> Result<Vec<Value>, String> {
    let url = reqwest::Url::parse_with_params(&prometheus.url("/api/v1/query"), &[("query", promql)])
        .map_err(|e| e.to_string())?;
    let response = client.get(url).send().await.map_err(|e| format!("cannot query Prometheus: {e}"))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    let json: Value = serde_json::from_str(&body).map_err(|e| format!("{status}: {e}: {body}"))?;
    if status != reqwest::StatusCode::OK || json["status"] != "success" {
        return Err(format!("{status}: {body}"));
    }
    Ok(match &json["data"]["result"] {
        Value::Array(series) => series.clone(),
        scalar => vec![scalar.clone()],
    })
}

/// The bindings of a dashboard's Prometheus variables to try: first every variable on "All"
/// (or its first value when it has no All), then every combination of concrete values, each
/// resolved as Grafana resolves chained variables and written as Grafana writes it.
async fn bindings(
    client: &reqwest::Client,
    prometheus: &Prometheus,
    dashboard: &Dashboard,
    round: &mut Round,
) -> Vec<BTreeMap<String, String>> {
    let mut partial: Vec<(BTreeMap<String, String>, bool)> = vec![(builtins(), true), (builtins(), false)];
    for var in variables(dashboard) {
        match (var.kind.as_str(), var.source) {
            ("query", Some(Source::Prometheus)) => {}
            ("textbox", _) => {
                partial.iter_mut().for_each(|(values, _)| {
                    values.insert(var.name.clone(), String::new());
                });
                continue;
            }
            _ => continue,
        }
        let place = format!("{}: variable {}", dashboard.file, var.name);
        let escape = if var.multi || var.include_all { regex_escape } else { plain_escape };
        let mut next = Vec::new();
        for (values, all) in partial {
            let query = match substitute(&var.query, &values).and_then(|q| label_values(&q)) {
                Ok(query) => query,
                Err(e) => {
                    round.refused.push(format!("{place}: {e}"));
                    continue;
                }
            };
            let (selector, label) = query;
            round.evaluated += 1;
            let series = match evaluate(client, prometheus, &selector).await {
                Ok(series) => series,
                Err(e) => {
                    round.refused.push(format!("{place}: {selector}: {e}"));
                    continue;
                }
            };
            let found: BTreeSet<String> =
                series.iter().filter_map(|s| s["metric"][&label].as_str()).map(str::to_owned).collect();
            let Some(first) = found.iter().next() else {
                round.empty.push(format!("{place}: no values of {label} in {selector}"));
                continue;
            };
            if all {
                let mut values = values;
                let value = match (&var.all_value, var.include_all) {
                    (Some(all_value), true) => all_value.clone(),
                    _ => escape(first),
                };
                values.insert(var.name.clone(), value);
                next.push((values, true));
            } else {
                for value in found.iter().take(8) {
                    let mut values = values.clone();
                    values.insert(var.name.clone(), escape(value));
                    next.push((values, false));
                }
            }
        }
        partial = next;
    }
    partial.into_iter().map(|(values, _)| values).collect()
}

async fn evaluate_dashboards(client: &reqwest::Client, prometheus: &Prometheus) -> Round {
    let mut round = Round::default();
    for dashboard in dashboards() {
        let promql: Vec<Query> = queries(&dashboard).into_iter().filter(|q| q.source == Source::Prometheus).collect();
        for values in bindings(client, prometheus, &dashboard, &mut round).await {
            let setting: Vec<String> =
                values.iter().filter(|(k, _)| !k.starts_with("__")).map(|(k, v)| format!("{k}={v}")).collect();
            for query in &promql {
                let rendered = match substitute(&query.expr, &values) {
                    Ok(rendered) => rendered,
                    Err(e) => {
                        round.refused.push(format!("{}: {e}", query.place));
                        continue;
                    }
                };
                round.evaluated += 1;
                match evaluate(client, prometheus, &rendered).await {
                    Err(e) => round.refused.push(format!("{} [{}]: {rendered}\n  {e}", query.place, setting.join(" "))),
                    Ok(series) if series.is_empty() => {
                        round.empty.push(format!("{} [{}]: {rendered}", query.place, setting.join(" ")));
                    }
                    Ok(_) => {}
                }
            }
        }
    }
    round
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_is_valid_promql_over_the_agents_own_metrics() {
    let fed = fed_agent().await;
    let scrape = format!(
        concat!(
            "  - job_name: {admin_job}\n",
            "    static_configs:\n",
            "      - targets: ['{admin}']\n",
            "  - job_name: {pull_job}\n",
            "    honor_labels: true\n",
            "    static_configs:\n",
            "      - targets: ['127.0.0.1:{pull}']\n",
        ),
        admin_job = ADMIN_JOB,
        admin = fed.agent.admin(),
        pull_job = PULL_JOB,
        pull = fed.pull_port,
    );
    let prometheus = Prometheus::start(&scrape).await;
    tls::install_crypto_provider();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("an HTTP client");

    // Data arrives with Prometheus' scrapes: a query is looked at again until it has data
    // (a rate needs two scrapes), but one Prometheus refuses fails at once.
    let started = Instant::now();
    loop {
        let round = evaluate_dashboards(&client, &prometheus).await;
        assert!(round.refused.is_empty(), "Prometheus refused dashboard queries:\n{}", round.refused.join("\n"));
        if round.empty.is_empty() {
            assert!(round.evaluated >= 150, "only {} queries were evaluated", round.evaluated);
            return;
        }
        if started.elapsed() > DEADLINE {
            panic!(
                "these dashboard queries returned no data within {DEADLINE:?} of feeding the agent:\n{}",
                round.empty.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
