//! Loading, layering and every refusal naming its key.
use std::time::Duration;

use super::*;

fn load(env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    Settings::load_from(
        None,
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

/// The defaults load and pass every check (a default its own checks
/// refuse would stop every start that does not set it).
#[test]
fn the_defaults_load_and_pass_their_checks() {
    let s = load(&[]).unwrap();
    assert!(!s.auth.enabled());
    assert!(s.pipeline.workers >= 1);
}

/// Keys with no default: unset, or (`pipeline.workers`) the machine's cores.
const WITHOUT_DEFAULT: [&str; 4] = [
    "server.admin_addr",
    "auth.tokens_file",
    "telemetry.otlp_endpoint",
    "pipeline.workers",
];

/// Every default of `defaults.toml` as `(dotted key, TOML text)`.
fn flat_defaults() -> Vec<(String, String)> {
    fn render(value: &config::Value) -> String {
        match &value.kind {
            config::ValueKind::String(text) => format!("{text:?}"),
            config::ValueKind::Float(x) => format!("{x:?}"),
            config::ValueKind::Array(items) => {
                let items: Vec<String> = items.iter().map(render).collect();
                format!("[{}]", items.join(", "))
            }
            other => other.to_string(),
        }
    }
    fn walk(
        prefix: &str,
        table: &config::Map<String, config::Value>,
        out: &mut Vec<(String, String)>,
    ) {
        for (key, value) in table {
            let key = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            match &value.kind {
                config::ValueKind::Table(inner) => walk(&key, inner, out),
                _ => out.push((key, render(value))),
            }
        }
    }
    let defaults = config::Config::builder()
        .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
        .build()
        .unwrap();
    let mut out = Vec::new();
    let table: config::Map<String, config::Value> = defaults.try_deserialize().unwrap();
    walk("", &table, &mut out);
    out.sort();
    out
}

/// docs/configuration.md's table lists every key, each with the default
/// `defaults.toml` gives it; keys without one say so in words.
#[test]
fn the_documented_defaults_are_the_defaults() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let start = doc
        .find("<!-- settings:begin -->")
        .expect("the begin marker");
    let end = doc.find("<!-- settings:end -->").expect("the end marker");
    let mut documented: Vec<(String, String)> = doc[start..end]
        .lines()
        .filter_map(|row| {
            let mut cells = row.split(" | ");
            let key = cells.next()?.strip_prefix("| `")?.strip_suffix('`')?;
            let default = cells.next()?;
            Some((key.to_owned(), default.to_owned()))
        })
        .collect();
    documented.sort();
    let defaults = flat_defaults();
    for (key, default) in &defaults {
        let row = documented.iter().find(|(k, _)| k == key);
        let cell = row.unwrap_or_else(|| panic!("docs/configuration.md lacks `{key}`"));
        let shown = cell
            .1
            .strip_prefix('`')
            .and_then(|rest| rest.split('`').next());
        assert_eq!(
            shown,
            Some(default.as_str()),
            "`{key}`'s default in docs/configuration.md"
        );
    }
    for (key, cell) in &documented {
        if WITHOUT_DEFAULT.contains(&key.as_str()) {
            assert!(
                !cell.starts_with('`'),
                "`{key}` has no default, the docs show {cell}"
            );
        } else {
            assert!(
                defaults.iter().any(|(k, _)| k == key),
                "docs/configuration.md documents `{key}`, which has no default"
            );
        }
    }
    for key in WITHOUT_DEFAULT {
        assert!(
            documented.iter().any(|(k, _)| k == key),
            "docs/configuration.md lacks `{key}`"
        );
    }
}

#[test]
fn environment_overrides_with_lists_and_durations() {
    let s = load(&[
        ("EVENTFLOW__PIPELINE__WORKERS", "3"),
        ("EVENTFLOW__PUBLISH__SINKS", "stdout,log"),
        ("EVENTFLOW__PIPELINE__TRANSFORMS", "enrich"),
        ("EVENTFLOW__SERVER__SHUTDOWN_GRACE", "2s"),
        ("EVENTFLOW__TELEMETRY__LOG_FORMAT", "pretty"),
    ])
    .unwrap();
    assert_eq!(s.pipeline.workers, 3);
    assert_eq!(s.publish.sinks, vec![SinkKind::Stdout, SinkKind::Log]);
    assert_eq!(s.pipeline.transforms, vec![TransformKind::Enrich]);
    assert_eq!(s.server.shutdown_grace, Duration::from_secs(2));
    assert_eq!(s.telemetry.log_format, LogFormat::Pretty);
    let s = load(&[
        (
            "EVENTFLOW__TELEMETRY__OTLP_ENDPOINT",
            "http://127.0.0.1:4317",
        ),
        ("EVENTFLOW__TELEMETRY__SAMPLE_RATIO", "0.01"),
    ])
    .unwrap();
    assert_eq!(
        s.telemetry.otlp_endpoint.as_deref(),
        Some("http://127.0.0.1:4317")
    );
    assert_eq!(s.telemetry.sample_ratio, 0.01);
    let s = load(&[("EVENTFLOW__PUBLISH__SINKS", "")]).unwrap();
    assert!(
        s.publish.sinks.is_empty(),
        "an empty list variable is an empty list"
    );
    let s = load(&[("EVENTFLOW__TELEMETRY__OTLP_ENDPOINT", "")]).unwrap();
    assert_eq!(s.telemetry.otlp_endpoint, None, "empty means unset");
}

#[test]
fn file_is_layered_under_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eventflow.toml");
    std::fs::write(
        &path,
        "[pipeline]\nworkers = 7\nqueue_capacity = 10\n[server]\naddr = \"127.0.0.1:9999\"\n",
    )
    .unwrap();
    let s = Settings::load_from(
        Some(&path),
        [("EVENTFLOW__PIPELINE__WORKERS".to_string(), "2".to_string())],
    )
    .unwrap();
    assert_eq!(s.pipeline.workers, 2);
    assert_eq!(s.pipeline.queue_capacity, 10);
    assert_eq!(s.server.addr, "127.0.0.1:9999");
}

#[test]
fn errors_name_the_key() {
    let cases: [(&str, &str, &str); 22] = [
        ("EVENTFLOW__PIPELINE__WORKERS", "lots", "pipeline.workers"),
        (
            "EVENTFLOW__PIPELINE__QUEUE_CAPACITY",
            "0",
            "pipeline.queue_capacity",
        ),
        ("EVENTFLOW__SERVER__ADDR", "not an address", "server.addr"),
        (
            "EVENTFLOW__SERVER__SHUTDOWN_GRACE",
            "soon",
            "server.shutdown_grace",
        ),
        ("EVENTFLOW__PUBLISH__SINKS", "stdout,kafka", "publish.sinks"),
        (
            "EVENTFLOW__PIPELINE__TRANSFORMS",
            "reverse",
            "pipeline.transforms",
        ),
        ("EVENTFLOW__STORE__MAX_EVENTS", "10", "store.max_events"),
        (
            "EVENTFLOW__TELEMETRY__LOG_FORMAT",
            "xml",
            "telemetry.log_format",
        ),
        (
            "EVENTFLOW__TELEMETRY__SAMPLE_RATIO",
            "1.5",
            "telemetry.sample_ratio",
        ),
        (
            "EVENTFLOW__TELEMETRY__OTLP_ENDPOINT",
            "jaeger:4317",
            "telemetry.otlp_endpoint",
        ),
        (
            "EVENTFLOW__SERVER__IDLE_TIMEOUT",
            "0s",
            "server.idle_timeout",
        ),
        (
            "EVENTFLOW__SERVER__SHUTDOWN_DELAY",
            "30s",
            "server.shutdown_delay",
        ),
        (
            "EVENTFLOW__SERVER__TRUSTED_PROXIES",
            "10.0.0.0/8,nginx",
            "server.trusted_proxies",
        ),
        (
            "EVENTFLOW__SERVER__ADMIN_ADDR",
            "localhost",
            "server.admin_addr",
        ),
        (
            "EVENTFLOW__SERVER__ADMIN_ADDR",
            "0.0.0.0:8080",
            "server.admin_addr",
        ),
        (
            "EVENTFLOW__SERVER__IDLE_TIMEOUT",
            "2days",
            "server.idle_timeout",
        ),
        (
            "EVENTFLOW__SERVER__REQUEST_TIMEOUT",
            "2days",
            "server.request_timeout",
        ),
        (
            "EVENTFLOW__SERVER__MAX_INFLIGHT_BODY_BYTES",
            "1000",
            "server.max_inflight_body_bytes",
        ),
        (
            "EVENTFLOW__SERVER__MAX_INFLIGHT_ANSWER_BYTES",
            "0",
            "server.max_inflight_answer_bytes",
        ),
        (
            "EVENTFLOW__SERVER__MAX_INFLIGHT_ANSWER_BYTES",
            "100000",
            "server.max_inflight_answer_bytes",
        ),
        (
            "EVENTFLOW__SERVER__SUBSCRIBER_BUFFER_BYTES",
            "0",
            "server.subscriber_buffer_bytes",
        ),
        (
            "EVENTFLOW__SERVER__MAX_CONNECTIONS_PER_CLIENT",
            "0",
            "server.max_connections_per_client",
        ),
    ];
    for (var, value, key) in cases {
        let err = load(&[(var, value)]).unwrap_err().to_string();
        assert!(
            err.contains(key),
            "{var}={value}: `{err}` does not name {key}"
        );
    }
}

#[test]
fn errors_speak_the_users_language() {
    let message = |env: &[(&str, &str)]| load(env).unwrap_err().to_string();
    let err = message(&[("EVENTFLOW__PIPELINE__TRANSFORMS", "uppercase,rot13")]);
    assert!(
        err.contains("unknown transform `rot13`; valid values: uppercase, enrich, json"),
        "{err}"
    );
    let err = message(&[("EVENTFLOW__PUBLISH__SINKS", "kafka")]);
    assert!(err.contains("valid values: stdout, log"), "{err}");
    let err = message(&[("EVENTFLOW__TELEMETRY__LOG_FORMAT", "xml")]);
    assert!(err.contains("valid values: json, pretty"), "{err}");
    // The real minimum: three times the 16 MiB batch limit.
    let err = message(&[("EVENTFLOW__SERVER__MAX_INFLIGHT_BODY_BYTES", "1000")]);
    assert!(err.contains("must be at least 50331648"), "{err}");
    let err = message(&[("EVENTFLOW__SERVER__REQUEST_TIMEOUT", "5")]);
    assert!(err.contains(r#"durations are strings like "5s""#), "{err}");
    assert!(err.contains("server.request_timeout"), "{err}");
}

#[test]
fn a_bare_number_for_a_duration_in_toml_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eventflow.toml");
    std::fs::write(&path, "[server]\nrequest_timeout = 5\n").unwrap();
    let err = Settings::load_from(Some(&path), std::iter::empty())
        .unwrap_err()
        .to_string();
    assert!(err.contains(r#"durations are strings like "5s""#), "{err}");
    assert!(err.contains("request_timeout"), "{err}");
    std::fs::write(&path, "[server]\nrequest_timeout = \"2s 500ms\"\n").unwrap();
    let s = Settings::load_from(Some(&path), std::iter::empty()).unwrap();
    assert_eq!(s.server.request_timeout, Duration::from_millis(2500));
}

#[test]
fn unknown_keys_are_rejected() {
    let err = load(&[("EVENTFLOW__PIPELINE__WORKRES", "2")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("workres"), "{err}");
}

#[test]
fn the_backend_is_memory_unless_nats_is_chosen() {
    let settings = load(&[]).unwrap();
    assert_eq!(settings.backend.kind, BackendKind::Memory);
    assert_eq!(settings.backend.nats.max_deliver, 10);
    let settings = load(&[
        ("EVENTFLOW__BACKEND__KIND", "nats"),
        (
            "EVENTFLOW__BACKEND__NATS_URL",
            "nats://a:4222,nats://b:4222",
        ),
        ("EVENTFLOW__BACKEND__NATS__ACK_WAIT", "10s"),
        ("EVENTFLOW__BACKEND__NATS__REPLICAS", "3"),
    ])
    .unwrap();
    assert_eq!(settings.backend.kind, BackendKind::Nats);
    assert_eq!(settings.backend.nats.ack_wait, Duration::from_secs(10));
    assert_eq!(settings.backend.nats.replicas, 3);
    let error = load(&[("EVENTFLOW__BACKEND__KIND", "kafka")]).unwrap_err();
    assert!(
        error.to_string().contains("valid values: memory, nats"),
        "{error}"
    );
}

#[test]
fn the_nats_sink_is_refused_in_nats_mode_with_the_reason() {
    assert!(load(&[("EVENTFLOW__PUBLISH__SINKS", "stdout,nats")]).is_ok());
    let error = load(&[
        ("EVENTFLOW__BACKEND__KIND", "nats"),
        ("EVENTFLOW__PUBLISH__SINKS", "stdout,nats"),
    ])
    .unwrap_err()
    .to_string();
    assert!(error.contains("publish.sinks"), "{error}");
    assert!(error.contains("EVENTFLOW_PUBLISHED"), "{error}");
}

#[test]
fn bad_nats_settings_name_their_key() {
    for (key, value, named) in [
        (
            "EVENTFLOW__BACKEND__NATS__REPLICAS",
            "2",
            "backend.nats.replicas",
        ),
        (
            "EVENTFLOW__BACKEND__NATS__IDS_STREAM",
            "a.b",
            "backend.nats.ids_stream",
        ),
        (
            "EVENTFLOW__BACKEND__NATS__BACKLOG_STREAM",
            "EVENTFLOW_PUBLISHED",
            "five different names",
        ),
        (
            "EVENTFLOW__BACKEND__NATS__SUBJECT_PREFIX",
            "a b",
            "backend.nats.subject_prefix",
        ),
        (
            "EVENTFLOW__BACKEND__NATS__MAX_DELIVER",
            "0",
            "backend.nats.max_deliver",
        ),
        (
            "EVENTFLOW__BACKEND__NATS__ACK_WAIT",
            "500ms",
            "backend.nats.ack_wait",
        ),
        (
            "EVENTFLOW__BACKEND__NATS_URL",
            "nats://a:1,",
            "backend.nats_url",
        ),
        (
            "EVENTFLOW__PUBLISH__NATS__SUBJECT",
            "x.>",
            "publish.nats.subject",
        ),
    ] {
        let error = load(&[(key, value)]).unwrap_err().to_string();
        assert!(error.contains(named), "{key}={value}: {error}");
    }
}

#[test]
fn async_persistence_is_for_one_copy_on_file() {
    let settings = load(&[("EVENTFLOW__BACKEND__NATS__PERSIST_MODE", "async")]).unwrap();
    assert_eq!(settings.backend.nats.persist_mode, NatsPersistMode::Async);
    for (key, value) in [
        ("EVENTFLOW__BACKEND__NATS__REPLICAS", "3"),
        ("EVENTFLOW__BACKEND__NATS__STORAGE", "memory"),
    ] {
        let error = load(&[
            ("EVENTFLOW__BACKEND__NATS__PERSIST_MODE", "async"),
            (key, value),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("backend.nats.persist_mode"),
            "{key}: {error}"
        );
    }
    let error = load(&[("EVENTFLOW__BACKEND__NATS__PERSIST_MODE", "later")])
        .unwrap_err()
        .to_string();
    assert!(error.contains("valid values: default, async"), "{error}");
}

#[test]
fn keys_of_the_earlier_nats_layout_are_refused_naming_their_replacements() {
    for (variable, key, replacement) in [
        (
            "EVENTFLOW__BACKEND__NATS__MAX_BYTES",
            "backend.nats.max_bytes",
            "backend.nats.backlog_max_bytes",
        ),
        (
            "EVENTFLOW__BACKEND__NATS__MAX_AGE",
            "backend.nats.max_age",
            "backend.nats.idempotency_window",
        ),
        (
            "EVENTFLOW__BACKEND__NATS__PUBLISHED_MAX_BYTES",
            "backend.nats.published_max_bytes",
            "backend.nats.history_max_bytes",
        ),
        (
            "EVENTFLOW__BACKEND__NATS__PUBLISHED_MAX_AGE",
            "backend.nats.published_max_age",
            "backend.nats.history_max_age",
        ),
        (
            "EVENTFLOW__BACKEND__NATS__EVENTS_STREAM",
            "backend.nats.events_stream",
            "backend.nats.ids_stream",
        ),
        (
            "EVENTFLOW__BACKEND__NATS__DUPLICATE_WINDOW",
            "backend.nats.duplicate_window",
            "fenced",
        ),
    ] {
        let error = load(&[(variable, "7d")]).unwrap_err().to_string();
        assert!(error.contains(key), "{variable}: {error}");
        assert!(error.contains("was removed"), "{variable}: {error}");
        assert!(error.contains(replacement), "{variable}: {error}");
    }
    // In a file as well.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eventflow.toml");
    std::fs::write(&path, "[backend.nats]\nmax_bytes = 1024\n").unwrap();
    let error = Settings::load_from(Some(&path), std::iter::empty())
        .unwrap_err()
        .to_string();
    assert!(error.contains("backend.nats.backlog_max_bytes"), "{error}");
}

#[test]
fn a_log_level_that_names_no_level_is_refused() {
    for bad in ["verbose", "infoo", "info,eventflow", "eventflow=loud"] {
        let error = load(&[("EVENTFLOW__TELEMETRY__LOG_LEVEL", bad)])
            .unwrap_err()
            .to_string();
        assert!(error.contains("telemetry.log_level"), "{bad}: {error}");
        assert!(error.contains("names no level"), "{bad}: {error}");
    }
    for good in [
        "info",
        "WARN",
        "info,eventflow=debug",
        "eventflow::api=trace,off",
    ] {
        assert!(
            load(&[("EVENTFLOW__TELEMETRY__LOG_LEVEL", good)]).is_ok(),
            "{good}"
        );
    }
}

#[test]
fn a_token_given_where_a_list_belongs_is_not_shown_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eventflow.toml");
    let secret = "s3cret-token-value-0123456789";
    std::fs::write(&path, format!("[auth]\ntokens = \"{secret}\"\n")).unwrap();
    let error = Settings::load_from(Some(&path), std::iter::empty())
        .unwrap_err()
        .to_string();
    assert!(error.contains("auth.tokens"), "{error}");
    assert!(!error.contains(secret), "the token leaked: {error}");
}
