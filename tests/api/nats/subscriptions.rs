//! Named subscriptions in nats mode: a JetStream durable consumer each, so
//! any replica answers any poll or ack, dead letters and their redelivery
//! go through JetStream, and a subscription outlives every replica.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use super::{published_ids, replica, server};
use crate::binary;
use crate::helpers::{TestApp, event};
use crate::subscriptions::ack_ids;

/// `N` replicas in this process on the NATS at `url`.
async fn replicas<const N: usize>(url: &str) -> [TestApp; N] {
    let mut apps = Vec::with_capacity(N);
    for _ in 0..N {
        apps.push(replica(url, |_| {}).await);
    }
    let Ok(apps) = apps.try_into() else {
        unreachable!("N replicas were made")
    };
    apps
}

/// Leases `n` events of `name` through `app`, polling as often as it takes
/// (a poll answers with what JetStream has ready, on a busy machine perhaps
/// fewer than asked).
async fn lease_n(app: &TestApp, name: &str, n: usize, per_poll: usize) -> Vec<Value> {
    let mut leased = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(60);
    while leased.len() < n {
        assert!(
            Instant::now() < deadline,
            "leased only {} of {n}",
            leased.len()
        );
        let max = per_poll.min(n - leased.len());
        leased.extend(app.poll_events(name, &format!("max={max}&wait=1s")).await);
    }
    leased
}

/// Posts `ids` to `app`, each answered 202.
async fn post_all(app: &TestApp, ids: &[String]) {
    for id in ids {
        assert_eq!(app.post_event(&event(id, "x")).await.status(), 202);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_replica_answers_for_a_subscription_and_it_outlives_them_all() {
    let Some(nats) = server::single().await else {
        return;
    };
    let url = nats.url();
    let [a, b, c] = replicas::<3>(&url).await;

    let spec = json!({"start": "earliest", "ack_timeout": "3s", "max_deliver": 2});
    let made = a.put_subscription("orders", spec.clone()).await;
    assert_eq!(made.status(), 201);
    assert_eq!(b.put_subscription("orders", spec).await.status(), 200);
    let other = json!({"start": "earliest", "ack_timeout": "3s", "max_deliver": 3});
    assert_eq!(c.put_subscription("orders", other).await.status(), 409);
    assert_eq!(c.poll_subscription("missing", "").await.status(), 404);

    let ids: Vec<String> = (0..30).map(|i| format!("sub-{i:02}")).collect();
    post_all(&a, &ids).await;
    published_ids(&url, ids.len()).await;

    // Leased on B, acked on C.
    let first = lease_n(&b, "orders", 10, 10).await;
    assert_eq!(first.len(), 10);
    assert!(first.iter().all(|e| e["delivery"] == 1));
    assert!(first[0]["ack_id"].as_str().unwrap().starts_with("n1.p."));
    assert_eq!(first[0]["event"]["payload"], "X", "the published event");
    let answer: Value = c.acked("orders", json!({"ack_ids": ack_ids(&first)})).await;
    assert_eq!(answer, json!({"acked": 10, "nacked": 0, "expired": 0}));
    // The same ids again, on A: acknowledged already.
    let again: Value = a.acked("orders", json!({"ack_ids": ack_ids(&first)})).await;
    assert_eq!(again["expired"], 10);
    let state = a.subscription("orders").await;
    assert_eq!(state["committed"], 10, "{state}");
    assert_eq!(state["pending"], 20, "{state}");

    // The next event nacked twice is dead-lettered (max_deliver 2).
    let mut nacked = None;
    for delivery in 1..=2 {
        let got = c.poll_events("orders", "max=1&wait=5s").await;
        assert_eq!(got[0]["delivery"], delivery);
        nacked = Some(got[0]["sequence"].clone());
        let answer: Value = a.acked("orders", json!({"nack_ids": ack_ids(&got)})).await;
        assert_eq!(answer["nacked"], 1);
    }
    let nacked = nacked.unwrap();
    let rest = lease_n(&b, "orders", 19, 100).await;
    assert!(
        b.poll_events("orders", "max=100&wait=500ms")
            .await
            .is_empty(),
        "the dead-lettered one is not handed out"
    );
    assert!(rest.iter().all(|e| e["sequence"] != nacked));
    c.ack_subscription("orders", json!({"ack_ids": ack_ids(&rest)}))
        .await;
    let letters: Value = a
        .get("/subscriptions/orders/dead-letters")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(letters["events"].as_array().unwrap().len(), 1, "{letters}");
    assert_eq!(letters["events"][0]["sequence"], nacked);
    assert_eq!(letters["events"][0]["delivery"], 2);
    assert_eq!(letters["next"], Value::Null);
    let state = b.subscription("orders").await;
    assert_eq!(state["dead_lettered"], 1, "{state}");
    assert_eq!(state["committed"], 30, "{state}");

    // Handed out again through B, counted from 1, acked through A.
    let redelivered: Value = b.redeliver("orders", json!({})).await.json().await.unwrap();
    assert_eq!(redelivered["redelivered"], 1);
    // C learns of the redelivery within its next reading of the consumers.
    let back = lease_n(&c, "orders", 1, 10).await;
    assert_eq!(back[0]["sequence"], nacked);
    assert_eq!(back[0]["delivery"], 1);
    assert!(back[0]["ack_id"].as_str().unwrap().starts_with("n1.r."));
    let answer: Value = a.acked("orders", json!({"ack_ids": ack_ids(&back)})).await;
    assert_eq!(answer["acked"], 1);
    let state = c.subscription("orders").await;
    assert_eq!(state["dead_lettered"], 0, "{state}");
    assert_eq!(state["in_flight"], 0, "{state}");

    // Every replica gone: a new one finds the subscription where it was.
    drop((a, b, c));
    let d = replica(&url, |_| {}).await;
    let state = d.subscription("orders").await;
    assert_eq!(state["committed"], 30, "{state}");
    assert_eq!(state["start"], "earliest");
    assert_eq!(state["ack_timeout"], "3s");
    let listed: Value = d.get("/subscriptions").await.json().await.unwrap();
    assert_eq!(listed["subscriptions"].as_array().unwrap().len(), 1);
    assert_eq!(d.delete_subscription("orders").await, 204);
    assert_eq!(d.get("/subscriptions/orders").await.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latest_subscription_starts_at_the_head_and_a_long_poll_wakes_on_publication() {
    let Some(nats) = server::single().await else {
        return;
    };
    let url = nats.url();
    let [a, b] = replicas::<2>(&url).await;
    let before: Vec<String> = (0..5).map(|i| format!("old-{i}")).collect();
    post_all(&a, &before).await;
    published_ids(&url, before.len()).await;
    let made = a.put_subscription("tail", json!({})).await;
    assert_eq!(made.status(), 201);
    let state: Value = made.json().await.unwrap();
    assert_eq!(state["committed"], 5, "the head at creation: {state}");
    assert_eq!(state["pending"], 0);
    let past = a
        .put_subscription("past", json!({"start": {"after": 99}}))
        .await;
    assert_eq!(past.status(), 422);

    // A poll on B waits; an event posted on A wakes it.
    let started = Instant::now();
    let (polled, ()) = tokio::join!(b.poll_events("tail", "wait=8s"), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        post_all(&a, &["new-0".to_owned()]).await;
    });
    assert_eq!(polled.len(), 1);
    assert_eq!(polled[0]["event"]["id"], "new-0");
    assert_eq!(polled[0]["sequence"], 6);
    assert!(started.elapsed() < Duration::from_secs(7));
    // A wait that ends with nothing answers an empty list in time.
    let started = Instant::now();
    assert!(b.poll_events("tail", "wait=500ms").await.is_empty());
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// One consumer: polls through `polls` and acks through `acks`, recording
/// what it acked; stops once `done` events were acked by the group.
async fn consume(
    client: &reqwest::Client,
    polls: &[std::net::SocketAddr],
    acks: &[std::net::SocketAddr],
    acked: &std::sync::Mutex<BTreeMap<u64, (String, u64)>>,
    deliveries: &std::sync::Mutex<Vec<(u64, u64)>>,
    done: usize,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut turn = 0;
    while acked.lock().unwrap().len() < done {
        assert!(Instant::now() < deadline, "the group never finished");
        turn += 1;
        let poll = polls[turn % polls.len()];
        let Ok(response) = client
            .post(format!(
                "http://{poll}/subscriptions/group/poll?max=50&wait=1s"
            ))
            .send()
            .await
        else {
            continue;
        };
        if response.status() != 200 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let Ok(body) = response.json::<Value>().await else {
            continue;
        };
        let events = body["events"].as_array().cloned().unwrap_or_default();
        if events.is_empty() {
            continue;
        }
        for e in &events {
            deliveries.lock().unwrap().push((
                e["sequence"].as_u64().unwrap(),
                e["delivery"].as_u64().unwrap(),
            ));
        }
        // As a client would: an ack whose answer was lost (its replica
        // died) is sent again through another; one that JetStream took the
        // first time is counted `expired` then.
        let mut answered = false;
        for attempt in 0..acks.len() {
            let ack = acks[(turn + attempt) % acks.len()];
            let sent = client
                .post(format!("http://{ack}/subscriptions/group/ack"))
                .json(&json!({"ack_ids": ack_ids(&events)}))
                .send()
                .await;
            if sent.is_ok_and(|answer| answer.status() == 200) {
                answered = true;
                break;
            }
        }
        if answered {
            let mut acked = acked.lock().unwrap();
            for e in &events {
                let sequence = e["sequence"].as_u64().unwrap();
                let id = e["event"]["id"].as_str().unwrap().to_owned();
                acked.entry(sequence).or_insert((id, 0)).1 += 1;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_polling_and_acking_through_three_replicas_survives_one_being_killed() {
    let Some(nats) = server::single().await else {
        return;
    };
    let url = nats.url();
    let env = [
        ("EVENTFLOW__BACKEND__KIND", "nats"),
        ("EVENTFLOW__BACKEND__NATS_URL", url.as_str()),
        ("EVENTFLOW__PIPELINE__WORKERS", "2"),
    ];
    let (mut services, _readers) = binary::start_reading(&env, 3);
    let addrs: Vec<_> = services.iter().map(|s| s.addr).collect();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let made = client
        .put(format!("http://{}/subscriptions/group", addrs[0]))
        .json(&json!({"start": "earliest", "ack_timeout": "2s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), 201);
    // EVENTFLOW_FAULT_SCALE runs it larger (docs/reliability.md).
    let n = 600 * super::scale();
    let ids: Vec<String> = (0..n).map(|i| format!("group-{i:05}")).collect();
    let acked = std::sync::Mutex::new(BTreeMap::new());
    let deliveries = std::sync::Mutex::new(Vec::new());
    // Four consumers, each polling and acking through a different pair of
    // replicas, while the events are posted; replica 0 is killed midway
    // (consumers then go on through the others).
    let ingest = async {
        futures_util::stream::iter(ids.iter().enumerate())
            .for_each_concurrent(8, |(i, id)| {
                let client = &client;
                let addr = addrs[1 + i % 2];
                async move {
                    let status = client
                        .post(format!("http://{addr}/events"))
                        .json(&event(id, "x"))
                        .send()
                        .await
                        .unwrap()
                        .status();
                    assert_eq!(status, 202);
                }
            })
            .await;
    };
    let kill = async {
        while acked.lock().unwrap().len() < n / 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Leased through replica 0, which is then killed: the leases are
        // acknowledged through replica 1.
        let held: Value = client
            .post(format!(
                "http://{}/subscriptions/group/poll?max=10&wait=5s",
                addrs[0]
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let held = held["events"].as_array().unwrap().clone();
        assert!(!held.is_empty());
        services[0].child.kill().unwrap();
        services[0].child.wait().unwrap();
        let answer: Value = client
            .post(format!("http://{}/subscriptions/group/ack", addrs[1]))
            .json(&json!({"ack_ids": ack_ids(&held)}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["acked"], held.len(), "{answer}");
        let mut acked = acked.lock().unwrap();
        for e in &held {
            let sequence = e["sequence"].as_u64().unwrap();
            let id = e["event"]["id"].as_str().unwrap().to_owned();
            acked.entry(sequence).or_insert((id, 0)).1 += 1;
        }
    };
    let all = [addrs[0], addrs[1], addrs[2]];
    let survivors = [addrs[1], addrs[2]];
    let group = futures_util::future::join_all((0..4).map(|c| {
        let (polls, acks): (Vec<_>, Vec<_>) = match c {
            0 => (all.to_vec(), survivors.to_vec()),
            1 => (survivors.to_vec(), all.to_vec()),
            2 => (vec![addrs[1]], vec![addrs[2]]),
            _ => (vec![addrs[2]], vec![addrs[1]]),
        };
        let (client, acked, deliveries) = (&client, &acked, &deliveries);
        async move { consume(client, &polls, &acks, acked, deliveries, n).await }
    }));
    tokio::join!(ingest, kill, group);

    let published = published_ids(&url, n).await;
    let acked = acked.into_inner().unwrap();
    let acked_ids: BTreeSet<&str> = acked.values().map(|(id, _)| id.as_str()).collect();
    assert_eq!(acked.len(), n, "every publication acked at least once");
    assert!(published.iter().all(|id| acked_ids.contains(id.as_str())));
    // Handed out again: only leases whose answer or ack the killed replica
    // took with it (a poll answers at most 50).
    let redelivered = deliveries
        .into_inner()
        .unwrap()
        .iter()
        .filter(|(_, delivery)| *delivery > 1)
        .count();
    assert!(redelivered <= 4 * 50, "{redelivered} redelivered");
    let (min, max) = acked
        .values()
        .fold((u64::MAX, 0), |(lo, hi), (_, n)| (lo.min(*n), hi.max(*n)));
    assert!(min >= 1, "every event acked");
    let state: Value = client
        .get(format!("http://{}/subscriptions/group", addrs[1]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["committed"], n as u64, "{state}");
    assert_eq!(state["pending"], 0, "{state}");
    eprintln!(
        "group through 3 replicas, one killed: {n} published, each acked {min} to {max} times, \
         {redelivered} redelivered, committed {}",
        state["committed"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pollers_that_never_read_take_the_answers_budget_never_the_replicas_nats_connection() {
    let Some(nats) = server::single().await else {
        return;
    };
    let app = replica(&nats.url(), |s| {
        s.server.max_inflight_answer_bytes = 16 << 20
    })
    .await;
    let created = app
        .put_subscription("hoard", json!({"start": "earliest", "ack_timeout": "1h"}))
        .await;
    assert_eq!(created.status(), 201);
    // 400 events of 64 KiB of U+0001: 384 KiB each in a poll's answer.
    let payload = "\u{1}".repeat(64 * 1024);
    app.post_published(400, &payload).await;
    // Pollers lease ten events a poll and never read the answer: what the
    // kernel's socket buffers take leaves the service, the rest is held
    // against the answers' budget, until a poll is refused at once.
    let (pollers, refusal) = crate::readers::until_refused(app.addr, 40, |_| {
        "POST /subscriptions/hoard/poll?max=10&wait=5s HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"
            .to_owned()
    })
    .await;
    assert!(refusal.contains("retry-after: 1"), "{refusal}");
    // A writer is not refused, its events are published, and NATS never
    // had to cut the replica off.
    let writer = crate::readers::client_from([127, 0, 0, 2]);
    assert_eq!(
        crate::readers::writer_successes(&writer, app.addr, "writer", 50).await,
        50
    );
    app.wait_for_stdout_lines(450).await;
    assert_eq!(app.get("/readyz").await.status(), 200);
    assert_eq!(nats.varz("slow_consumers").await, 0);
    // The refused poll's leases went back: once the pollers leave, later
    // polls get those ten again (JetStream hands back before new, but on a
    // busy machine a hand-back that reaches it after a poll comes in a
    // later one, with new events between).
    drop(pollers);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut leased = loop {
        let response = app.poll_subscription("hoard", "max=10").await;
        if response.status() == 200 {
            let body: Value = response.json().await.unwrap();
            break body["events"].as_array().unwrap().clone();
        }
        assert!(Instant::now() < deadline, "polls never answered again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let again = |leased: &[Value]| leased.iter().filter(|e| e["delivery"] == 2).count();
    while again(&leased) < 10 && leased.len() < 60 {
        leased.extend(lease_n(&app, "hoard", 10, 10).await);
    }
    assert_eq!(
        again(&leased),
        10,
        "{:?}",
        leased.iter().map(|e| &e["delivery"]).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_reports_a_subscriptions_gauges_until_another_deletes_it() {
    let Some(nats) = server::single().await else {
        return;
    };
    let url = nats.url();
    let [a, b] = replicas::<2>(&url).await;
    let made = a
        .put_subscription("watched", json!({"start": "earliest"}))
        .await;
    assert_eq!(made.status(), 201);
    let ids: Vec<String> = (0..7).map(|i| format!("w-{i}")).collect();
    post_all(&a, &ids).await;
    published_ids(&url, ids.len()).await;
    // B polls once (and so holds the subscription's handles).
    assert_eq!(lease_n(&b, "watched", 3, 3).await.len(), 3);
    // B's /metrics shows the shared gauges (read every two seconds).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = b.get("/metrics").await.text().await.unwrap();
        let pending = text
            .lines()
            .any(|l| l == "eventflow_subscription_pending{subscription=\"watched\"} 4");
        let in_flight = text
            .lines()
            .any(|l| l == "eventflow_subscription_in_flight{subscription=\"watched\"} 3");
        if pending && in_flight {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B never showed the gauges:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Deleted through A: B answers 404 at once, and its series leave.
    assert_eq!(a.delete_subscription("watched").await, 204);
    assert_eq!(b.poll_subscription("watched", "max=1").await.status(), 404);
    let deadline = Instant::now() + Duration::from_secs(30);
    while b
        .get("/metrics")
        .await
        .text()
        .await
        .unwrap()
        .contains("subscription=\"watched\"")
    {
        assert!(
            Instant::now() < deadline,
            "B kept the deleted subscription's series"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_window_answers_polls_with_nothing_until_an_ack_makes_room() {
    let Some(nats) = server::single().await else {
        return;
    };
    let url = nats.url();
    let app = replica(&url, |_| {}).await;
    let made = app
        .put_subscription("hoard", json!({"start": "earliest", "ack_timeout": "1h"}))
        .await;
    assert_eq!(made.status(), 201);
    for batch in 0..11 {
        let events = (0..1000)
            .map(|i| event(&format!("w-{batch}-{i}"), "x"))
            .collect();
        assert_eq!(app.post_batch(events).await.status(), 202);
    }
    published_ids(&url, 11_000).await;
    let held = lease_n(&app, "hoard", 10_000, 1000).await;
    assert_eq!(held.len(), 10_000, "the window");
    // Full: an empty answer, at once or after the wait, never an error.
    assert!(app.poll_events("hoard", "max=10").await.is_empty());
    let started = Instant::now();
    assert!(app.poll_events("hoard", "max=10&wait=1s").await.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(900));
    // An ack makes room: a waiting poll gets the next event.
    let (polled, _) = tokio::join!(app.poll_events("hoard", "max=10&wait=8s"), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        app.acked("hoard", json!({"ack_ids": ack_ids(&held[..1])}))
            .await
    });
    assert_eq!(polled.len(), 1);
    assert_eq!(polled[0]["sequence"], 10_001);
}
