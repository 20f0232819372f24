//! A real Prometheus scrapes the service; every PromQL expression of the
//! Grafana dashboards must parse and return data, and every alert rule must
//! evaluate without error.
//!
//! Needs the `prometheus` binary (Debian's `prometheus` package; `.ci/run`
//! installs it). Without it the test is skipped locally and fails in CI.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{event, spawn_app, spawn_app_with};

/// Stands in for Grafana's `$__rate_interval` with 1 s scrapes.
const RATE_INTERVAL: &str = "15s";

struct Prometheus {
    child: Child,
    url: String,
    _data: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts Prometheus scraping every second, with the repo's alert rules,
/// `memory` as job `eventflow` and `replica` (a nats-mode service) as job
/// `eventflow-replicas`, the jobs of prometheus.yml.
fn start_prometheus(memory: &str, replica: &str) -> Option<Prometheus> {
    let binary = std::env::var("PROMETHEUS_BIN").unwrap_or_else(|_| "prometheus".into());
    if Command::new(&binary).arg("--version").output().is_err() {
        assert!(
            std::env::var("CI").is_err(),
            "`{binary}` not found: CI must install Debian's prometheus package"
        );
        eprintln!("skipping: `{binary}` not installed (apt-get install prometheus)");
        return None;
    }
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("prometheus.yml");
    let rules = repo().join("prometheus/alerts.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: eventflow\n    static_configs:\n      - targets: ['{memory}']\n\
             \x20 - job_name: eventflow-replicas\n    static_configs:\n      - targets: ['{replica}']\n",
            rules = rules.display()
        ),
    )
    .unwrap();
    let port = free_port();
    let child = Command::new(&binary)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            data.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Some(Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _data: data,
    })
}

/// Every `expr` of every dashboard panel target (rows included).
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?").to_owned();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((title.clone(), expr.to_owned()));
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn dashboards() -> Vec<(PathBuf, Value)> {
    let dir = repo().join("grafana/dashboards");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) == Some("json") {
            let json = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            found.push((path, json));
        }
    }
    assert!(!found.is_empty(), "no dashboards in {}", dir.display());
    found
}

fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("${instance}", ".*")
        .replace("$instance", ".*")
}

async fn query(client: &reqwest::Client, prometheus: &str, expr: &str) -> Value {
    client
        .get(format!("{prometheus}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn traffic(app: &crate::helpers::TestApp, round: usize) {
    for i in 0..20 {
        app.post_event(&event(&format!("p{round}-{i}"), "scrape me"))
            .await;
    }
    app.post_event(&event(&format!("p{round}-0"), "scrape me"))
        .await;
    app.post_event(&event(&format!("p{round}-0"), "conflict"))
        .await;
    app.post_raw("/events", "application/json", "{").await;
    let batch = format!("{}\n{{}}\n", event(&format!("b{round}"), "x"));
    app.post_raw("/events/batch", "application/x-ndjson", batch)
        .await;
    app.get(&format!("/events/p{round}-1")).await;
    app.get("/events?limit=5").await;
    app.get("/healthz").await;
    // A consumer of a named subscription (memory mode serves them).
    let subscription = app.url("/subscriptions/scrape");
    app.client
        .put(&subscription)
        .json(&serde_json::json!({"start": "earliest"}))
        .send()
        .await
        .unwrap();
    let polled = app
        .client
        .post(format!("{subscription}/poll?max=5"))
        .send()
        .await
        .unwrap();
    if polled.status() == 200 {
        let polled: Value = polled.json().await.unwrap();
        let ids: Vec<Value> = polled["events"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["ack_id"].clone())
            .collect();
        app.client
            .post(format!("{subscription}/ack"))
            .json(&serde_json::json!({ "ack_ids": ids }))
            .send()
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_and_every_alert_evaluates() {
    let app = spawn_app().await;
    // A nats-mode service too, for the backend panels.
    let Some(nats) = crate::nats::server::single().await else {
        return;
    };
    let replica = spawn_app_with(
        |settings| crate::nats::nats_mode(settings, &nats.url()),
        Vec::new(),
    )
    .await;
    let Some(prometheus) = start_prometheus(&app.addr.to_string(), &replica.addr.to_string())
    else {
        return;
    };
    let client = reqwest::Client::new();
    let _subscriber = app.subscribe(None).await;
    let _replica_subscriber = replica.subscribe(None).await;

    // Traffic for several scrapes, so that rates have at least two samples.
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(6) {
        traffic(&app, round).await;
        traffic(&replica, round).await;
        round += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The target is up and scraped.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = query(&client, &prometheus.url, "up == 1").await;
        if up["data"]["result"]
            .as_array()
            .is_some_and(|r| r.len() == 2)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped the service: {up}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    traffic(&app, round).await;
    traffic(&replica, round).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut failures = Vec::new();
    let mut checked = 0;
    for (path, dashboard) in dashboards() {
        let queries = panel_queries(&dashboard);
        assert!(
            queries.len() >= 10,
            "{} has too few queries",
            path.display()
        );
        for (title, expr) in queries {
            let promql = grafana_to_promql(&expr);
            let answer = query(&client, &prometheus.url, &promql).await;
            checked += 1;
            if answer["status"] != "success" {
                failures.push(format!("{title}: `{promql}` failed: {answer}"));
            } else if answer["data"]["result"]
                .as_array()
                .is_none_or(|r| r.is_empty())
            {
                failures.push(format!("{title}: `{promql}` returned no data"));
            }
        }
        // Annotation queries must at least parse.
        for annotation in dashboard["annotations"]["list"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(expr) = annotation["expr"].as_str() {
                let answer = query(&client, &prometheus.url, &grafana_to_promql(expr)).await;
                if answer["status"] != "success" {
                    failures.push(format!("annotation `{expr}` failed: {answer}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} dashboard queries failed:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Every alert rule has been evaluated by the real server without error.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rules: Value = client
            .get(format!("{}/api/v1/rules", prometheus.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let all: Vec<&Value> = rules["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        assert!(
            all.len() >= 6,
            "expected the alert rules, got {}",
            all.len()
        );
        let evaluated = all.iter().all(|r| {
            r["lastEvaluation"]
                .as_str()
                .is_some_and(|t| !t.starts_with("0001"))
        });
        if evaluated {
            for rule in &all {
                assert_eq!(
                    rule["health"], "ok",
                    "rule {} does not evaluate: {rule}",
                    rule["name"]
                );
            }
            // With traffic flowing, nothing should be firing.
            let firing: Vec<&Value> = all
                .iter()
                .filter(|r| r["state"] == "firing")
                .copied()
                .collect();
            assert!(
                firing.is_empty(),
                "alerts firing on a healthy service: {firing:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "rules never evaluated: {rules}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
