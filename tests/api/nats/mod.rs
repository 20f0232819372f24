//! The `nats` backend against a real `nats-server`: replicas sharing one
//! pipeline, exactly-once publication, reads and SSE across replicas, and
//! faults (a replica killed, NATS stopped, a cluster node lost).

mod bounds;
mod fault_table;
mod faults;
mod retry;
pub(crate) mod server;
mod subscriptions;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use eventflow::config::{BackendKind, NatsPersistMode, Settings};
use futures_util::StreamExt;
use serde_json::Value;

use crate::binary;
use crate::helpers::{TestApp, event, spawn_app_with};

/// How many times CI's load the fault tests put on: `EVENTFLOW_FAULT_SCALE`
/// (default 1; `scripts/nats-faults.sh` runs longer versions).
fn scale() -> usize {
    std::env::var("EVENTFLOW_FAULT_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// Points `settings` at the NATS at `url` (the nats backend).
pub(crate) fn nats_mode(settings: &mut Settings, url: &str) {
    settings.backend.kind = BackendKind::Nats;
    settings.backend.nats_url = url.to_owned();
}

/// A replica in this process on the NATS at `url`.
async fn replica(url: &str, configure: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_with(
        |settings| {
            nats_mode(settings, url);
            configure(settings);
        },
        Vec::new(),
    )
    .await
}

/// Why a nats-mode service on `url` refuses to start (it must refuse).
async fn start_error(url: &str) -> String {
    let mut settings = crate::helpers::test_settings();
    nats_mode(&mut settings, url);
    match eventflow::app::App::build(settings).await {
        Ok(_) => panic!("the service started"),
        Err(error) => error.to_string(),
    }
}

/// A JetStream context on the NATS at `url`.
pub(crate) async fn jetstream(url: &str) -> async_nats::jetstream::Context {
    async_nats::jetstream::new(async_nats::connect(url).await.unwrap())
}

/// The ids on the published stream, in publication order, once it holds at
/// least `expected` messages (bounded wait).
async fn published_ids(url: &str, expected: usize) -> Vec<String> {
    let js = jetstream(url).await;
    let deadline = Instant::now() + Duration::from_secs(60 * scale() as u64);
    // A cluster that just lost a node may take a moment to answer.
    let stream = loop {
        match js.get_stream("EVENTFLOW_PUBLISHED").await {
            Ok(stream) => break stream,
            Err(error) => {
                assert!(Instant::now() < deadline, "published stream: {error}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    loop {
        let held = stream
            .get_info()
            .await
            .map_or(0, |info| info.state.messages);
        if held >= expected as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the published stream holds {held} messages, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Read from the start again after any error (a cluster electing a
    // new leader), until every message was read in one go.
    'read: loop {
        assert!(
            Instant::now() < deadline,
            "the published stream was not readable"
        );
        let Ok(info) = stream.get_info().await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let held = info.state.messages;
        let config = pull::OrderedConfig {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        };
        let messages = match stream.create_consumer(config).await {
            Ok(consumer) => consumer.messages().await,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Ok(mut messages) = messages else { continue };
        let mut ids = Vec::new();
        while (ids.len() as u64) < held {
            match tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
                Ok(Some(Ok(message))) => {
                    let line: Value = serde_json::from_slice(&message.payload).unwrap();
                    ids.push(line["id"].as_str().unwrap().to_owned());
                }
                _ => continue 'read,
            }
        }
        return ids;
    }
}

/// Every id of `accepted` is on the published stream (bounded wait), and no
/// id twice.
///
/// The wait is for the ids, not a count: events whose answer a killed
/// replica never sent were stored and get published too, so the stream can
/// reach `accepted.len()` messages while an accepted event still waits for
/// its redelivery.
async fn assert_each_published_once(url: &str, accepted: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(60 * scale() as u64);
    loop {
        let on_stream = published_ids(url, accepted.len()).await;
        let published: HashSet<&str> = on_stream.iter().map(String::as_str).collect();
        assert_eq!(
            published.len(),
            on_stream.len(),
            "no id twice on the stream"
        );
        let lost: Vec<&String> = accepted
            .iter()
            .filter(|id| !published.contains(id.as_str()))
            .collect();
        if lost.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "accepted but never published: {lost:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How often each id occurs.
fn counts<'a>(ids: impl IntoIterator<Item = &'a str>) -> HashMap<&'a str, usize> {
    let mut counts = HashMap::new();
    for id in ids {
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

/// Waits (bounded) until the replicas' stdouts hold `n` lines in all.
async fn stdout_ids(replicas: &[TestApp], n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(60 * scale() as u64);
    loop {
        let lines: Vec<Value> = replicas.iter().flat_map(|r| r.stdout.lines()).collect();
        if lines.len() >= n || Instant::now() > deadline {
            return lines
                .iter()
                .map(|line| line["id"].as_str().unwrap().to_owned())
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A worker's pass goes to the published stream as one fast-ingest batch;
/// when one of its events is there already (its chunk was delivered
/// before), the batch stops there and the pass goes again one by one: the
/// others are published once, and the one already there is not again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_with_an_event_published_before_publishes_the_others_once() {
    let Some(nats) = server::single().await else {
        return;
    };
    let app = replica(&nats.url(), |_| {}).await;
    // What an earlier delivery of arrival sequence 2 published.
    let js = jetstream(&nats.url()).await;
    let earlier = async_nats::jetstream::message::PublishMessage::build()
        .payload(r#"{"id":"earlier-2"}"#.into())
        .expected_last_subject_sequence(0);
    js.send_publish("eventflow.published.2", earlier)
        .await
        .unwrap()
        .await
        .unwrap();

    let ids = ["pass-1", "pass-2", "pass-3", "pass-4"];
    let batch = ids.iter().map(|id| event(id, "p")).collect();
    assert_eq!(app.post_batch(batch).await.status(), 202);
    for id in ["pass-1", "pass-3", "pass-4"] {
        app.wait_for_status(id, "processed").await;
    }
    app.wait_until_idle().await;
    let on_stream = published_ids(&nats.url(), 4).await;
    let per_id = counts(on_stream.iter().map(String::as_str));
    assert_eq!(on_stream.len(), 4, "{on_stream:?}");
    for id in ["earlier-2", "pass-1", "pass-3", "pass-4"] {
        assert_eq!(per_id.get(id), Some(&1), "{id} once: {on_stream:?}");
    }
    let errors = app.metric("eventflow_publish_errors_total").await;
    assert_eq!(errors.unwrap_or(0.0), 0.0, "publish errors");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_pipeline_and_publish_each_event_exactly_once() {
    let Some(nats) = server::single().await else {
        return;
    };
    let replicas = vec![
        replica(&nats.url(), |_| {}).await,
        replica(&nats.url(), |_| {}).await,
        replica(&nats.url(), |_| {}).await,
    ];
    let ids: Vec<String> = (0..3000 * scale()).map(|i| format!("rr-{i}")).collect();
    let statuses: Vec<u16> = futures_util::stream::iter(ids.iter().enumerate())
        .map(|(i, id)| {
            let app = &replicas[i % 3];
            async move { app.post_event(&event(id, "p")).await.status().as_u16() }
        })
        .buffer_unordered(24)
        .collect()
        .await;
    assert!(
        statuses.iter().all(|&s| s == 202),
        "{:?}",
        counts_of(&statuses)
    );

    // Published exactly once: across the replicas' stdout, and on the stream.
    let written = stdout_ids(&replicas, ids.len()).await;
    let per_id = counts(written.iter().map(String::as_str));
    assert_eq!(written.len(), ids.len(), "stdout lines across replicas");
    assert!(ids.iter().all(|id| per_id.get(id.as_str()) == Some(&1)));
    let busy = replicas
        .iter()
        .filter(|r| !r.stdout.lines().is_empty())
        .count();
    assert!(busy >= 2, "the work is shared: {busy} replicas published");
    let on_stream = published_ids(&nats.url(), ids.len()).await;
    assert_eq!(on_stream.len(), ids.len());
    assert_eq!(
        on_stream.iter().collect::<HashSet<_>>().len(),
        ids.len(),
        "no id twice on the published stream"
    );

    // Any replica answers for any event.
    for id in ids.iter().step_by(251) {
        for app in &replicas {
            let record: Value = app
                .get(&format!("/events/{id}"))
                .await
                .json()
                .await
                .unwrap();
            assert_eq!(record["status"], "processed", "{record}");
            assert_eq!(record["result"]["payload"], "P");
        }
    }

    // The same id at two replicas at once: one is accepted, one is a duplicate.
    for k in 0..20 {
        let racing = event(&format!("race-{k}"), "same");
        let (a, b) = tokio::join!(
            replicas[k % 3].post_event(&racing),
            replicas[(k + 1) % 3].post_event(&racing)
        );
        let mut both = [a.status().as_u16(), b.status().as_u16()];
        both.sort_unstable();
        assert_eq!(both, [200, 202], "race-{k}");
    }
    // And other content under a taken id is a conflict on every replica.
    for app in &replicas {
        let response = app.post_event(&event("race-0", "different")).await;
        assert_eq!(response.status(), 409);
    }
}

/// The event id of an SSE message's data.
fn data_id(data: &str) -> String {
    let event: Value = serde_json::from_str(data).unwrap();
    event["id"].as_str().unwrap().to_owned()
}

fn counts_of(statuses: &[u16]) -> HashMap<u16, usize> {
    let mut counts = HashMap::new();
    for status in statuses {
        *counts.entry(*status).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_one_replica_sees_events_ingested_on_another_and_resumes_on_a_third() {
    let Some(nats) = server::single().await else {
        return;
    };
    let a = replica(&nats.url(), |_| {}).await;
    let b = replica(&nats.url(), |_| {}).await;
    let c = replica(&nats.url(), |_| {}).await;
    let mut on_a = a.subscribe(None).await;
    for i in 0..8 {
        assert_eq!(
            b.post_event(&event(&format!("sse-{i}"), "x"))
                .await
                .status(),
            202
        );
    }
    // Publication order is the workers' (two of them), not arrival order:
    // the ids are B's, the sequences 1..=8 without a gap.
    let mut seen = Vec::new();
    while seen.len() < 8 {
        let message = on_a
            .next(Duration::from_secs(10))
            .await
            .expect("A's subscriber gets B's events");
        seen.push((message.id.clone(), data_id(&message.data)));
    }
    let sequences: Vec<&str> = seen.iter().map(|(seq, _)| seq.as_str()).collect();
    assert_eq!(sequences, ["1", "2", "3", "4", "5", "6", "7", "8"]);
    let ids: HashSet<String> = seen.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(ids, (0..8).map(|i| format!("sse-{i}")).collect());
    // Resumed on C after publication 3: exactly what A saw after it.
    let mut on_c = c.subscribe(Some(3)).await;
    let mut resumed = Vec::new();
    while resumed.len() < 5 {
        let message = on_c
            .next(Duration::from_secs(10))
            .await
            .expect("C replays what followed");
        resumed.push((message.id.clone(), data_id(&message.data)));
    }
    assert_eq!(resumed, seen[3..]);
    assert!(
        on_c.next(Duration::from_millis(300)).await.is_none(),
        "nothing more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_nats_is_down_ingest_gets_503_in_time_and_the_service_recovers_by_itself() {
    let Some(mut nats) = server::single().await else {
        return;
    };
    let app = replica(&nats.url(), |settings| {
        settings.server.request_timeout = Duration::from_secs(2);
    })
    .await;
    let mut accepted = Vec::new();
    for i in 0..50 * scale() {
        let id = format!("before-{i}");
        assert_eq!(app.post_event(&event(&id, "x")).await.status(), 202);
        accepted.push(id);
    }

    nats.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.get("/readyz").await.status() != 503 {
        assert!(
            Instant::now() < deadline,
            "readiness turns 503 without NATS"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let readiness: Value = app.get("/readyz").await.json().await.unwrap();
    assert_eq!(readiness["status"], "backend_unavailable", "{readiness}");
    for i in 0..10 {
        let started = Instant::now();
        let response = app.post_event(&event(&format!("during-{i}"), "x")).await;
        assert_eq!(response.status(), 503, "ingest during the outage");
        assert!(response.headers().contains_key("retry-after"));
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        let batch = app
            .post_batch(vec![event(&format!("during-batch-{i}"), "x")])
            .await;
        assert_eq!(batch.status(), 503, "batch ingest during the outage");
    }
    // Whether an event exists is unknown meanwhile: 503, not 404.
    let lookup = app.get("/events/before-0").await;
    assert_eq!(lookup.status(), 503, "a lookup during the outage");
    let page = app.get("/events?after=1000000").await;
    assert_eq!(page.status(), 503, "a page during the outage");

    nats.start();
    nats.wait_healthy().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.get("/readyz").await.status() != 200 {
        assert!(Instant::now() < deadline, "ready again once NATS is back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..50 * scale() {
        let id = format!("after-{i}");
        assert_eq!(app.post_event(&event(&id, "x")).await.status(), 202);
        accepted.push(id);
    }
    for id in &accepted {
        app.wait_for_status(id, "processed").await;
    }
    let on_stream = published_ids(&nats.url(), accepted.len()).await;
    assert_eq!(
        on_stream.len(),
        accepted.len(),
        "each accepted event published once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_loses_a_node_under_load_and_no_accepted_event_is_lost() {
    let Some(mut nodes) = server::cluster().await else {
        return;
    };
    let urls = nodes.iter().map(|n| n.url()).collect::<Vec<_>>().join(",");
    let app = replica(&urls, |settings| {
        settings.backend.nats.replicas = 3;
        settings.server.request_timeout = Duration::from_secs(4);
    })
    .await;
    let mut accepted = Vec::new();
    let mut refused = 0;
    let mut accepted_after_kill = 0;
    let deadline = Instant::now() + Duration::from_secs(60 * scale() as u64);
    // Load before the kill, then on until the cluster has accepted 300
    // more (a new stream leader is elected meanwhile).
    for round in 0.. {
        if round == 4 {
            // The first node of the service's list, in the middle of the load.
            nodes[0].kill();
        }
        if round > 4 && accepted_after_kill >= 300 * scale() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cluster never accepted again"
        );
        let statuses: Vec<(String, u16)> = futures_util::stream::iter(0..100)
            .map(|i| {
                let id = format!("cluster-{round}-{i}");
                let app = &app;
                async move {
                    let status = app.post_event(&event(&id, "x")).await.status().as_u16();
                    (id, status)
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        for (id, status) in statuses {
            match status {
                202 => {
                    accepted.push(id);
                    if round >= 4 {
                        accepted_after_kill += 1;
                    }
                }
                503 => refused += 1,
                other => panic!("{id}: {other} (only 202 or 503 are expected)"),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "cluster: {} accepted ({accepted_after_kill} after a node was killed), {refused} refused meanwhile",
        accepted.len()
    );
    assert_each_published_once(&nodes[1].url(), &accepted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_load_loses_nothing_its_survivors_finish_its_deliveries() {
    let Some(nats) = server::single().await else {
        return;
    };
    let url = nats.url();
    let env = [
        ("EVENTFLOW__BACKEND__KIND", "nats"),
        ("EVENTFLOW__BACKEND__NATS_URL", url.as_str()),
        ("EVENTFLOW__BACKEND__NATS__ACK_WAIT", "2s"),
        ("EVENTFLOW__PIPELINE__WORKERS", "2"),
        ("EVENTFLOW__PIPELINE__QUEUE_CAPACITY", "1024"),
    ];
    let (mut services, readers) = binary::start_reading(&env, 3);
    let addrs: Vec<_> = services.iter().map(|s| s.addr).collect();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut accepted = Vec::new();
    let mut killed = Some(&mut services[0].child);
    for round in 0..6 * scale() {
        let load = futures_util::stream::iter(0..600)
            .map(|i| {
                let id = format!("kill-{round}-{i}");
                let addr = addrs[i % 3];
                let client = &client;
                async move {
                    let status = client
                        .post(format!("http://{addr}/events"))
                        .json(&event(&id, "x"))
                        .send()
                        .await
                        .ok()
                        .map(|r| r.status().as_u16());
                    (id, status)
                }
            })
            .buffer_unordered(24)
            .collect::<Vec<(String, Option<u16>)>>();
        // In the middle of the third round, while it holds deliveries.
        let kill = async {
            if round == 2
                && let Some(child) = killed.take()
            {
                tokio::time::sleep(Duration::from_millis(150)).await;
                child.kill().unwrap();
                child.wait().unwrap();
            }
        };
        let (results, ()) = tokio::join!(load, kill);
        accepted.extend(
            results
                .into_iter()
                .filter(|(_, status)| *status == Some(202))
                .map(|(id, _)| id),
        );
    }
    // After `ack_wait` the survivors finish what the killed replica held.
    assert_each_published_once(&url, &accepted).await;

    let mut redeliveries = 0.0;
    for service in &services[1..] {
        redeliveries += service
            .metric(&client, "eventflow_nats_redeliveries_total")
            .await
            .unwrap_or(0.0);
    }
    for service in &mut services[1..] {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(service.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        assert_eq!(
            binary::wait_exit(&mut service.child, Duration::from_secs(30)),
            0
        );
    }
    let mut lines = Vec::new();
    for reader in readers {
        lines.extend(reader.join().unwrap().lines().map(str::to_owned));
    }
    let ids: Vec<String> = lines
        .iter()
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let repeats: usize = counts(ids.iter().map(String::as_str))
        .values()
        .map(|n| n - 1)
        .sum();
    eprintln!(
        "killed replica: {} accepted, {} stdout lines across replicas, {repeats} repeated on stdout, \
         {redeliveries} redeliveries taken by the survivors",
        accepted.len(),
        ids.len()
    );
    // Only what the killed replica held unacknowledged can repeat: at most
    // its permits (pipeline.queue_capacity).
    assert!(repeats <= 1024, "{repeats} repeats");
    assert!(
        accepted.iter().all(|id| ids.contains(id)),
        "every accepted event reached some replica's stdout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_mode_the_nats_sink_publishes_each_event_to_its_subject() {
    let Some(mut nats) = server::single().await else {
        return;
    };
    let listener = async_nats::connect(nats.url()).await.unwrap();
    let mut received = listener.subscribe("eventflow.published").await.unwrap();
    listener.flush().await.unwrap();
    let client = eventflow::nats::connect(&nats.url(), "test-sink")
        .await
        .unwrap();
    let sink = std::sync::Arc::new(eventflow::sink::NatsSink::new(
        client,
        "eventflow.published",
    ));
    let app = spawn_app_with(|_| {}, vec![sink]).await;
    for i in 0..20 {
        let status = app
            .post_event(&event(&format!("sink-{i}"), "hi"))
            .await
            .status();
        assert_eq!(status, 202);
    }
    let mut ids = Vec::new();
    while ids.len() < 20 {
        let message = tokio::time::timeout(Duration::from_secs(10), received.next())
            .await
            .expect("the subject gets every published event")
            .unwrap();
        let line: Value = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(line["payload"], "HI");
        ids.push(line["id"].as_str().unwrap().to_owned());
    }
    let mut expected: Vec<String> = (0..20).map(|i| format!("sink-{i}")).collect();
    ids.sort();
    expected.sort();
    assert_eq!(ids, expected);

    // Without its server the sink cannot write: readiness says so.
    nats.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = app.get("/readyz").await;
        if response.status() == 503 {
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["status"], "sink_broken", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "readiness turns 503");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backlog_refuses_new_events_with_503_and_drops_none() {
    let Some(nats) = server::single().await else {
        return;
    };
    // Room for a few dozen events; the workers are held back by a closed
    // gate so that the backlog fills.
    let gate = crate::helpers::Gate::closed();
    let app = spawn_app_with(
        |settings| {
            nats_mode(settings, &nats.url());
            settings.backend.nats.backlog_max_bytes = 16 * 1024;
        },
        vec![std::sync::Arc::new(gate.clone())],
    )
    .await;
    let mut accepted = Vec::new();
    let mut refused = None;
    for i in 0..1000 {
        let id = format!("full-{i}");
        let response = app.post_event(&event(&id, &"x".repeat(100))).await;
        match response.status().as_u16() {
            202 => accepted.push(id),
            503 => {
                assert!(response.headers().contains_key("retry-after"));
                let problem: Value = response.json().await.unwrap();
                refused = Some(problem);
                break;
            }
            other => panic!("{id}: {other}"),
        }
    }
    let problem = refused.expect("a full backlog answers 503");
    assert_eq!(problem["status"], 503, "{problem}");
    assert!(!accepted.is_empty() && accepted.len() < 1000);
    // Nothing accepted was dropped to make room: once the sinks write
    // again, every one is published.
    gate.open_all();
    for id in &accepted {
        app.wait_for_status(id, "processed").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_replica_leaves_the_backlog_in_jetstream_for_the_others() {
    let Some(nats) = server::single().await else {
        return;
    };
    // A replica whose sink lets nothing through holds its deliveries; it is
    // told to stop while thousands wait in the stream behind them.
    let gate = crate::helpers::Gate::closed();
    let a = spawn_app_with(
        |settings| {
            nats_mode(settings, &nats.url());
            settings.server.shutdown_grace = Duration::from_secs(20);
        },
        vec![std::sync::Arc::new(gate.clone())],
    )
    .await;
    let ids: Vec<String> = (0..20_000).map(|i| format!("backlog-{i}")).collect();
    for chunk in ids.chunks(1000) {
        let batch = chunk.iter().map(|id| event(id, "x")).collect();
        assert_eq!(a.post_batch(batch).await.status(), 202);
    }
    let stopping = tokio::spawn(a.shutdown());
    // It finishes what it holds (the gate opens) and stops pulling; it does
    // not work through the backlog.
    tokio::time::sleep(Duration::from_millis(200)).await;
    gate.open_all();
    let started = Instant::now();
    stopping.await.unwrap().expect("the replica stops cleanly");
    eprintln!("replica stopped in {:?}", started.elapsed());
    // Another replica takes the rest; each is published once.
    let b = replica(&nats.url(), |_| {}).await;
    let on_stream = published_ids(&nats.url(), ids.len()).await;
    assert_eq!(on_stream.len(), ids.len());
    assert_eq!(on_stream.iter().collect::<HashSet<_>>().len(), ids.len());
    let by_b = b.stdout.lines().len();
    eprintln!("the second replica published {by_b} of {}", ids.len());
    assert!(by_b > 0, "the backlog was left for the other replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_exists_with_other_settings_stops_the_start_naming_the_key() {
    let Some(nats) = server::single().await else {
        return;
    };
    // The ids stream made elsewhere (by this layout), in memory; eventflow
    // is told `file`.
    let js = jetstream(&nats.url()).await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "EVENTFLOW_IDS".into(),
        subjects: vec!["eventflow.ids.>".into()],
        storage: async_nats::jetstream::stream::StorageType::Memory,
        metadata: [("eventflow_layout".to_owned(), "2".to_owned())].into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let error = start_error(&nats.url()).await;
    assert!(error.contains("backend.nats.ids_stream"), "{error}");
    assert!(error.contains("storage"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_of_the_earlier_layout_stop_the_start_saying_how_to_move() {
    let Some(nats) = server::single().await else {
        return;
    };
    // The published stream as the earlier version made it (no layout mark).
    let js = jetstream(&nats.url()).await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "EVENTFLOW_PUBLISHED".into(),
        subjects: vec!["eventflow.published.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let error = start_error(&nats.url()).await;
    assert!(error.contains("earlier eventflow"), "{error}");
    assert!(error.contains("nats stream rm"), "{error}");
    assert!(error.contains("backend.nats.subject_prefix"), "{error}");
}

/// The build before made the published stream without `allow_batched`:
/// a replica starting on it turns it on, and publishes in fast batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_stream_without_fast_ingest_is_given_it_at_start() {
    let Some(nats) = server::single().await else {
        return;
    };
    let first = replica(&nats.url(), |_| {}).await;
    let js = jetstream(&nats.url()).await;
    let mut config = js
        .get_stream("EVENTFLOW_PUBLISHED")
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    assert!(config.allow_batch_publish, "made with fast ingest");
    config.allow_batch_publish = false;
    js.update_stream(&config).await.unwrap();
    drop(first);

    let app = replica(&nats.url(), |_| {}).await;
    let info = js.get_stream("EVENTFLOW_PUBLISHED").await.unwrap();
    assert!(info.cached_info().config.allow_batch_publish);
    let ids: Vec<String> = (0..50).map(|i| format!("upgraded-{i}")).collect();
    let batch = ids.iter().map(|id| event(id, "p")).collect();
    assert_eq!(app.post_batch(batch).await.status(), 202);
    assert_each_published_once(&nats.url(), &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_written_behind_their_acks_keep_that_mode_and_a_change_is_refused_naming_the_key() {
    let Some(nats) = server::single().await else {
        return;
    };
    let app = replica(&nats.url(), |settings| {
        settings.backend.nats.persist_mode = NatsPersistMode::Async;
    })
    .await;
    let js = jetstream(&nats.url()).await;
    for stream in ["EVENTFLOW_IDS", "EVENTFLOW_BACKLOG", "EVENTFLOW_PUBLISHED"] {
        let info = js.get_stream(stream).await.unwrap();
        assert_eq!(
            info.cached_info().config.persist_mode,
            Some(async_nats::jetstream::stream::PersistenceMode::Async),
            "{stream}"
        );
    }
    let ids: Vec<String> = (0..50).map(|i| format!("behind-{i}")).collect();
    let batch = ids.iter().map(|id| event(id, "p")).collect();
    assert_eq!(app.post_batch(batch).await.status(), 202);
    assert_each_published_once(&nats.url(), &ids).await;
    drop(app);

    // nats-server cannot change a stream's persist mode: the default
    // settings meet async streams and say which key differs.
    let error = start_error(&nats.url()).await;
    assert!(error.contains("backend.nats.persist_mode"), "{error}");
    assert!(error.contains(r#"persist_mode (backend.nats.persist_mode; a stream's is fixed when it is made) = "async""#), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_room_for_the_streams_stops_the_start_naming_the_settings() {
    // JetStream reserves each stream's max_bytes (3 GiB in all by default)
    // when it is made: 1 GB of storage cannot hold them.
    let Some(nats) = server::single_with_storage("1GB").await else {
        return;
    };
    let error = start_error(&nats.url()).await;
    assert!(error.contains("insufficient storage"), "{error}");
    assert!(error.contains("backend.nats.backlog_max_bytes"), "{error}");
    assert!(error.contains("max_file_store"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_full_load_exits_0_and_another_replica_publishes_the_rest() {
    let Some(nats) = server::single().await else {
        return;
    };
    let url = nats.url();
    let env = [
        ("EVENTFLOW__BACKEND__KIND", "nats"),
        ("EVENTFLOW__BACKEND__NATS_URL", url.as_str()),
    ];
    let mut first = binary::start(&env);
    // Its stdout is read (a pipe nobody reads would hold the workers).
    let _first_stdout = binary::stdout_reader(&mut first.child);
    let client = reqwest::Client::new();
    let target = format!("http://{}/events/batch", first.addr);
    // 8 senders posting NDJSON batches of 250 back to back, as fast as
    // answers come, until the replica stops taking them.
    let senders: Vec<_> = (0..8)
        .map(|sender| {
            let (client, target) = (client.clone(), target.clone());
            tokio::spawn(async move {
                let mut accepted = Vec::new();
                for round in 0..40 {
                    let ids: Vec<String> = (0..250)
                        .map(|i| format!("full-{sender}-{round}-{i}"))
                        .collect();
                    let body: String = ids
                        .iter()
                        .map(|id| format!("{}\n", event(id, "x")))
                        .collect();
                    match client
                        .post(&target)
                        .header("content-type", "application/x-ndjson")
                        .body(body)
                        .send()
                        .await
                    {
                        Ok(response) if response.status() == 202 => accepted.extend(ids),
                        Ok(response) => assert_eq!(response.status(), 503),
                        Err(_) => break,
                    }
                }
                accepted
            })
        })
        .collect();
    // Under load: some thousands accepted, then SIGTERM.
    let deadline = Instant::now() + Duration::from_secs(30);
    while first
        .metric(&client, "eventflow_events_accepted_total")
        .await
        .unwrap_or(0.0)
        < 4_000.0
    {
        assert!(Instant::now() < deadline, "the load never built up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut accepted = Vec::new();
    for sender in senders {
        accepted.extend(sender.await.unwrap());
    }
    let (code, first) = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if let Some(status) = first.child.try_wait().unwrap() {
                return (status.code(), first);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (None, first)
    })
    .await
    .unwrap();
    if code != Some(0) {
        for line in first.stderr.try_iter() {
            eprintln!("replica: {line}");
        }
    }
    assert_eq!(code, Some(0), "the replica stops cleanly under load");
    // The backlog it left in JetStream is another replica's to publish.
    let mut second = binary::start(&env);
    let _second_stdout = binary::stdout_reader(&mut second.child);
    eprintln!(
        "full load: {} events accepted before SIGTERM",
        accepted.len()
    );
    assert_each_published_once(&url, &accepted).await;
}
