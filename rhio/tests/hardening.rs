//! Faults and bad input that used to stop delivery for good or lose messages, each reproduced
//! against real servers (NATS with JetStream, s3s-fs) and real rhio processes over loopback QUIC.

mod common;

use std::io::Read;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use common::{
    LocalEnv, NodeSpec, RhioNode, header_pairs, jetstream_of, js_publish, metric, publish_toml,
    runtime, stream_messages, wait_for,
};
use rhio_core::message::{HEADER_MSG_ID, verify_provenance};

fn message(subject: &str, i: usize, size: usize) -> (String, HeaderMap, Vec<u8>) {
    let mut headers = HeaderMap::new();
    headers.insert("Seq", i.to_string().as_str());
    let mut payload = format!("message {i:06} ").into_bytes();
    payload.resize(size.max(payload.len()), b'x');
    (subject.to_string(), headers, payload)
}

/// Changes the configuration of stream `name`, as an operator would.
async fn update_stream(
    nats_url: &str,
    name: &str,
    change: impl FnOnce(&mut jetstream::stream::Config),
) {
    let js = jetstream_of(nats_url).await;
    let mut config = js
        .get_stream(name)
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    change(&mut config);
    js.update_stream(config).await.expect("update the stream");
}

/// The `Seq` header of each message, in stream order, for messages on `subject`; checks that
/// every message's provenance verifies and that no operation appears twice.
fn seqs_on(messages: &[jetstream::message::StreamMessage], subject: &str) -> Vec<usize> {
    let mut ids = std::collections::HashSet::new();
    messages
        .iter()
        .filter(|m| m.subject.as_str() == subject)
        .map(|m| {
            let headers = header_pairs(&m.headers);
            verify_provenance(subject, &headers, &m.payload)
                .unwrap_or_else(|err| panic!("provenance on {subject}: {err}"));
            let id = m
                .headers
                .get(HEADER_MSG_ID)
                .expect("Nats-Msg-Id")
                .to_string();
            assert!(ids.insert(id), "operation delivered twice on {subject}");
            m.headers.get("Seq").unwrap().as_str().parse().unwrap()
        })
        .collect()
}

/// Two clusters (see `common::pair`) whose stream IN in B the test creates itself with
/// `stream`: B may not create or change it.
fn pair_with_stream(
    published: &[&str],
    subscribed: &[&str],
    stream: jetstream::stream::Config,
) -> common::Pair {
    let mut pair = common::pair(published, subscribed);
    runtime().block_on(async {
        jetstream_of(&pair.env.clusters[1].nats_url)
            .await
            .create_stream(stream)
            .await
            .expect("create IN");
    });
    pair.b.create_streams = false;
    pair
}

/// Defect: a message the receiving JetStream refused was retried forever and blocked every log
/// behind it. Now: the sender refuses what no receiver with its limits can take, the receiver
/// moves what its JetStream can never take aside (dead letter) and delivers everything else.
#[test]
fn a_message_jetstream_refuses_is_dead_lettered_and_1000_behind_it_arrive_in_order() {
    let common::Pair {
        env,
        _dirs,
        a,
        b,
        key_a,
    } = pair_with_stream(
        &["poison.>", "stray.>"],
        &["poison.>", "stray.>"],
        jetstream::stream::Config {
            name: "IN".into(),
            subjects: vec!["poison.>".into(), "stray.>".into()],
            // B's operator allows smaller messages than A's NATS does.
            max_message_size: 100 * 1024,
            ..Default::default()
        },
    );
    let node_a = RhioNode::start(a);
    let node_b = RhioNode::start(b);
    node_a.wait_peers_connected(1);
    node_b.wait_peers_connected(1);
    node_b.wait_healthy();
    let rt = runtime();
    // The operator then narrows IN: stray.> is captured by no stream any more.
    rt.block_on(update_stream(&env.clusters[1].nats_url, "IN", |config| {
        config.subjects = vec!["poison.>".into()];
    }));

    let mut published = vec![
        // Fits A's NATS (1 MiB) as published, not once B's provenance headers are added.
        message("poison.x", 9000, 1_048_064),
        // Fits A and B's NATS, but not B's stream (max_msg_size 100 KiB).
        message("poison.x", 9001, 200 * 1024),
        // No stream in B captures it any more.
        message("stray.one", 9002, 64),
    ];
    published.extend((0..1000).map(|i| message("poison.x", i, 256)));
    rt.block_on(js_publish(&env.clusters[0].nats_url, published));

    let messages = rt.block_on(stream_messages(
        &env.clusters[1].nats_url,
        "IN",
        1000,
        Duration::from_secs(120),
    ));
    assert_eq!(messages.len(), 1000);
    assert_eq!(
        seqs_on(&messages, "poison.x"),
        (0..1000).collect::<Vec<_>>()
    );

    assert_eq!(
        metric(
            &node_a,
            "rhio_messages_refused_total{reason=\"exceeds_max_payload\"}"
        ),
        1.0
    );
    assert_eq!(metric(&node_a, "rhio_operations_signed_total"), 1002.0);
    for reason in ["max_msg_size", "no_stream"] {
        let name = format!("rhio_messages_dead_lettered_total{{reason=\"{reason}\"}}");
        wait_for(&name, Duration::from_secs(30), || {
            (metric(&node_b, &name) == 1.0).then_some(())
        });
    }
    let (code, health) = node_b.health().unwrap();
    assert_eq!(code, 200, "{health}");
    assert_eq!(health["routing"]["dead_lettered"], 2, "{health}");
    assert_eq!(health["routing"]["delivered"], 1000, "{health}");
    let log_b = node_b.log();
    assert!(
        log_b.contains("dead letter") && log_b.contains("stray.one") && log_b.contains(&key_a),
        "the warning names author and subject"
    );
    assert!(node_a.log().contains("message not signed"));

    // Listed with their reasons, in log order.
    let nats_b = env.clusters[1].nats_url.clone();
    let client = rt.block_on(rhio_client::Client::connect(&nats_b)).unwrap();
    let dead = rt.block_on(client.dead_letters()).unwrap();
    let listed: Vec<(&str, u64, &str, &str)> = dead
        .iter()
        .map(|d| {
            (
                d.subject.as_str(),
                d.seq,
                d.reason.as_str(),
                d.author.as_str(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("poison.x", 0, "max_msg_size", key_a.as_str()),
            ("stray.one", 0, "no_stream", key_a.as_str())
        ]
    );
    // Replayed before the cause is fixed: refused, nothing published, nothing forgotten.
    let refused = rt
        .block_on(client.replay_dead_letters(&rhio_client::ReplayRequest::All { all: true }))
        .unwrap_err();
    assert_eq!(refused.code(), "delivery_failed", "{refused}");
    assert_eq!(rt.block_on(common::stream_count(&nats_b, "IN")), 1000);
    assert_eq!(rt.block_on(client.dead_letters()).unwrap().len(), 2);
    // The operator fixes both causes; a replay delivers both, in log order, with provenance.
    rt.block_on(update_stream(&nats_b, "IN", |config| {
        config.subjects = vec!["poison.>".into(), "stray.>".into()];
        config.max_message_size = 1024 * 1024;
    }));
    let (code, stdout, stderr) =
        common::cli(&["--nats", &nats_b, "dead-letters", "replay", "--all"], &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("2 delivered, 0 dead letters left"),
        "{stdout}"
    );
    let messages = rt.block_on(stream_messages(
        &nats_b,
        "IN",
        1002,
        Duration::from_secs(30),
    ));
    assert_eq!(messages.len(), 1002);
    let mut expected: Vec<usize> = (0..1000).collect();
    expected.push(9001);
    assert_eq!(seqs_on(&messages, "poison.x"), expected);
    assert_eq!(seqs_on(&messages, "stray.one"), [9002]);
    // Exactly once: nothing is left to replay, and a second replay publishes nothing.
    let (code, stdout, _) = common::cli(&["--nats", &nats_b, "dead-letters", "list"], &[]);
    assert_eq!((code, stdout.trim()), (0, "no dead letters"));
    let again = rt
        .block_on(client.replay_dead_letters(&rhio_client::ReplayRequest::All { all: true }))
        .unwrap();
    assert!(
        again.replayed.is_empty() && again.remaining == 0,
        "{again:?}"
    );
    assert_eq!(rt.block_on(common::stream_count(&nats_b, "IN")), 1002);
    assert_eq!(
        node_b.health().unwrap().1["routing"]["dead_lettered"],
        2,
        "the counter counts what happened, not what is left"
    );
}

/// Defect: two [[publish]] entries on one stream shared the consumer name and the cursor and
/// deleted each other's consumer: messages were lost and reordered across a restart.
#[test]
fn two_publish_entries_on_one_stream_lose_nothing_across_a_restart() {
    // Bound, not dropped: the node data dirs must outlive the nodes.
    let common::Pair {
        env,
        _dirs,
        mut a,
        b,
        ..
    } = common::pair(&["r1.>"], &["r1.>", "r2.>"]);
    a.extra += &publish_toml(&["r2.>"], "OUT");
    let mut node_a = RhioNode::start(a.clone());
    let node_b = RhioNode::start(b);
    node_b.wait_peers_connected(1);
    let rt = runtime();
    let batch = |from: usize, to: usize| {
        (from..to).flat_map(|i| [message("r1.m", i, 100), message("r2.m", i, 100)])
    };
    rt.block_on(js_publish(&env.clusters[0].nats_url, batch(0, 50)));
    wait_for("A to sign the first half", Duration::from_secs(60), || {
        (metric(&node_a, "rhio_operations_signed_total") == 100.0).then_some(())
    });
    node_a.kill();
    rt.block_on(js_publish(&env.clusters[0].nats_url, batch(50, 100)));
    let node_a = RhioNode::start(a);
    node_a.wait_peers_connected(1);
    let messages = rt.block_on(stream_messages(
        &env.clusters[1].nats_url,
        "IN",
        200,
        Duration::from_secs(120),
    ));
    assert_eq!(messages.len(), 200);
    assert_eq!(seqs_on(&messages, "r1.m"), (0..100).collect::<Vec<_>>());
    assert_eq!(seqs_on(&messages, "r2.m"), (0..100).collect::<Vec<_>>());
}

/// Defect: delivered positions are committed after JetStream's ack, so a crash in between
/// republished messages, and only JetStream's duplicate window (120 s by default) dropped them.
/// Here the window is 1 s and the receiver is killed mid-burst and restarted after 3 s.
#[test]
fn a_restart_after_the_duplicate_window_republishes_nothing() {
    let common::Pair {
        env,
        _dirs,
        a,
        b,
        key_a,
    } = pair_with_stream(
        &["burst.>"],
        &["burst.>"],
        jetstream::stream::Config {
            name: "IN".into(),
            subjects: vec!["burst.>".into()],
            duplicate_window: Duration::from_secs(1),
            ..Default::default()
        },
    );
    let _node_a = RhioNode::start(a);
    let mut node_b = RhioNode::start(b.clone());
    node_b.wait_peers_connected(1);
    let rt = runtime();
    // Enough that delivery takes seconds, so B is frozen in the middle of it.
    let count = 20_000;
    rt.block_on(js_publish(
        &env.clusters[0].nats_url,
        (0..count).map(|i| message("burst.x", i, 128)),
    ));
    // Freeze B while it delivers (SIGSTOP: what it published is stored by JetStream, but the
    // positions of the batch in flight are never written), then kill it.
    rt.block_on(stream_messages(
        &env.clusters[1].nats_url,
        "IN",
        1000,
        Duration::from_secs(120),
    ));
    node_b.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(500));
    let frozen = rt.block_on(stream_messages(
        &env.clusters[1].nats_url,
        "IN",
        1000,
        Duration::from_secs(5),
    ));
    println!(
        "B frozen with {} of {count} messages in its stream",
        frozen.len()
    );
    assert!(
        frozen.len() < count,
        "delivery finished before B was frozen"
    );
    node_b.signal(libc::SIGKILL);
    node_b.wait_exit(Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(3));
    let node_b = RhioNode::start(b);
    node_b.wait_peers_connected(1);
    // A marker published after the burst is delivered after every message of the log before
    // it, repeats included: once it is in, whatever was published twice is in too.
    rt.block_on(js_publish(
        &env.clusters[0].nats_url,
        [message("burst.x", count, 128)],
    ));
    let messages = rt.block_on(stream_messages(
        &env.clusters[1].nats_url,
        "IN",
        count as u64 + 1,
        Duration::from_secs(120),
    ));
    assert_eq!(
        messages.len(),
        count + 1,
        "{} messages delivered twice",
        messages.len() - count - 1
    );
    assert_eq!(
        seqs_on(&messages, "burst.x"),
        (0..=count).collect::<Vec<_>>()
    );
    assert!(messages.iter().all(|m| {
        let headers = header_pairs(&m.headers);
        headers
            .iter()
            .any(|(n, v)| n == "X-Rhio-PublicKey" && *v == key_a)
    }));
}

/// Accepts TCP connections and never answers: an S3 server that hangs.
fn hung_server() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    // Read the request so the client is not refused, answer nothing.
                    let _ = stream.set_read_timeout(Some(Duration::from_millis(10)));
                    let _ = stream.read(&mut [0u8; 4096]);
                    held.push(stream);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    (addr, stop)
}

/// Defect: no S3 timeouts, so a hung S3 pinned import permits and per-dataset locks forever
/// (two imports got no answer in 120 s each).
#[test]
fn imports_against_a_hung_s3_are_answered_and_the_node_keeps_running() {
    let env = LocalEnv::up(1);
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("hung.parquet");
    common::make_parquet(&["sized", file.to_str().unwrap(), "1", "64"]);
    let (addr, stop) = hung_server();
    let mut spec = NodeSpec::for_cluster(&env.clusters[0], dir.path());
    spec.s3_endpoint = format!("http://{addr}");
    spec.import_roots.push(data.path().to_path_buf());
    let node = RhioNode::start_with_sets(
        spec,
        [
            "s3.connect_timeout_secs=2",
            "s3.read_timeout_secs=2",
            "s3.operation_timeout_secs=4",
        ],
    );
    node.wait_http();
    let rt = runtime();
    for dataset in ["first", "second"] {
        let answer = rt.block_on(async {
            let client = rhio_client::Client::connect(&env.clusters[0].nats_url)
                .await
                .unwrap();
            client
                .import(
                    file.to_str().unwrap(),
                    Some(dataset),
                    None,
                    Duration::from_secs(90),
                )
                .await
                .expect("an answer while S3 hangs")
        });
        assert_eq!(answer["ok"], false, "{answer}");
        assert_eq!(answer["error"]["code"], "storage_unavailable", "{answer}");
    }
    let (code, health) = node.health().unwrap();
    assert_eq!(code, 503, "S3 is down: {health}");
    assert_eq!(health["s3"]["reachable"], false, "{health}");
    assert_eq!(
        common::http_get(node.spec.http_addr(), "/health/live")
            .unwrap()
            .0,
        200
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Defect: Kubernetes injects variables such as RHIO_HTTP_SERVICE_PORT for Services named
/// rhio-*, and the node refused to start on them.
#[test]
fn kubernetes_service_variables_do_not_stop_the_node() {
    let env = LocalEnv::up(1);
    let dir = tempfile::tempdir().unwrap();
    let mut spec = NodeSpec::for_cluster(&env.clusters[0], dir.path());
    for (name, value) in [
        ("RHIO_QUIC_SERVICE_HOST", "10.0.0.7"),
        ("RHIO_QUIC_SERVICE_PORT", "9102"),
        ("RHIO_QUIC_PORT", "udp://10.0.0.7:9102"),
        ("RHIO_QUIC_PORT_9102_UDP", "udp://10.0.0.7:9102"),
        ("RHIO_HTTP_SERVICE_HOST", "10.0.0.8"),
        ("RHIO_HTTP_SERVICE_PORT", "8080"),
        ("RHIO_HTTP_PORT_8080_TCP", "tcp://10.0.0.8:8080"),
    ] {
        spec.env.push((name.into(), value.into()));
    }
    let node = RhioNode::start(spec);
    node.wait_healthy();
    assert!(
        node.log().contains("RHIO_HTTP_SERVICE_PORT"),
        "debug line names what was ignored"
    );

    // A typo in a real key still stops the start, naming it.
    let typo = common::run_rhio(
        &["--print-config"],
        &[("RHIO_NATS__ENDPIONT", "nats://x:4222")],
    );
    assert!(!typo.status.success());
    assert!(String::from_utf8_lossy(&typo.stderr).contains("endpiont"));
}

/// Defect: an import that failed after signing (S3 refused the manifest sidecar) was retried
/// through the "existing version" path, which never wrote the sidecar, indexed the blobs or
/// announced: consumers never heard of the version.
#[test]
fn an_import_retried_after_the_sidecar_failed_finishes_and_announces_once() {
    let env = LocalEnv::up(1);
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("retry.parquet");
    common::make_parquet(&["sized", file.to_str().unwrap(), "2", "1024"]);
    let mut spec = NodeSpec::for_cluster(&env.clusters[0], dir.path());
    spec.import_roots.push(data.path().to_path_buf());
    let node = RhioNode::start(spec);
    node.wait_healthy();
    // A plain file where the sidecar's folder must go makes s3s-fs fail that one PUT.
    let blocker = env.s3_object_path(0, ".rhio/manifests/retry");
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, b"in the way").unwrap();
    let rt = runtime();
    let nats = env.clusters[0].nats_url.clone();
    let failed = rt.block_on(common::rhio_import(&nats, file.to_str().unwrap(), None));
    assert_eq!(failed["ok"], false, "{failed}");
    assert_eq!(failed["error"]["code"], "storage_unavailable", "{failed}");

    std::fs::remove_file(&blocker).unwrap();
    let retried = rt.block_on(common::rhio_import(&nats, file.to_str().unwrap(), None));
    assert_eq!(retried["ok"], true, "{retried}");
    assert_eq!(retried["version"], 0, "{retried}");
    let sidecar = rt.block_on(common::s3_object(
        &env.clusters[0],
        ".rhio/manifests/retry/v0.cbor",
    ));
    let manifest = rhio_core::manifest::DatasetManifest::decode(&sidecar).unwrap();
    assert_eq!(manifest.file_hash, retried["file_hash"].as_str().unwrap());
    let announced = rt.block_on(stream_messages(
        &nats,
        "DATASETS",
        1,
        Duration::from_secs(30),
    ));
    assert_eq!(announced.len(), 1);
    assert_eq!(announced[0].subject.as_str(), "datasets.retry");

    // A repeat of a finished version announces nothing new.
    let repeat = rt.block_on(common::rhio_import(&nats, file.to_str().unwrap(), None));
    assert_eq!(repeat["existing"], true, "{repeat}");
    // A barrier: the outbox announces in the order versions became available, so a second
    // announcement of "retry" would be in the stream before the next dataset's.
    let barrier = data.path().join("barrier.parquet");
    common::make_parquet(&["sized", barrier.to_str().unwrap(), "1", "512"]);
    let next = rt.block_on(common::rhio_import(&nats, barrier.to_str().unwrap(), None));
    assert_eq!(next["ok"], true, "{next}");
    let again = rt.block_on(stream_messages(
        &nats,
        "DATASETS",
        2,
        Duration::from_secs(30),
    ));
    let subjects: Vec<&str> = again.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(
        subjects,
        ["datasets.retry", "datasets.barrier"],
        "announced twice"
    );
}

/// Fault: 20 imports at once with `import.max_concurrent = 2`: each gets an answer (a result or
/// `busy`), nothing is half-done, and the node stays healthy.
#[test]
fn twenty_concurrent_imports_are_each_answered() {
    let env = LocalEnv::up(1);
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let files: Vec<_> = (0..20)
        .map(|i| {
            let file = data.path().join(format!("many{i}.parquet"));
            common::make_parquet(&["sized", file.to_str().unwrap(), "3", "1024"]);
            file
        })
        .collect();
    let mut spec = NodeSpec::for_cluster(&env.clusters[0], dir.path());
    spec.import_roots.push(data.path().to_path_buf());
    // [import] is rendered by the spec already: the limit goes on the command line.
    let node = RhioNode::start_with_sets(spec, ["import.max_concurrent=2"]);
    node.wait_healthy();
    let rt = runtime();
    let nats = env.clusters[0].nats_url.clone();
    let answers: Vec<serde_json::Value> = rt.block_on(async {
        let requests = files
            .iter()
            .map(|file| common::rhio_import(&nats, file.to_str().unwrap(), None));
        futures::future::join_all(requests).await
    });
    let ok: Vec<_> = answers.iter().filter(|a| a["ok"] == true).collect();
    let busy = answers
        .iter()
        .filter(|a| a["error"]["code"] == "busy")
        .count();
    println!(
        "fault 20 concurrent imports: {} imported, {busy} busy, 0 lost",
        ok.len()
    );
    assert_eq!(ok.len() + busy, 20, "{answers:?}");
    assert!(!ok.is_empty() && busy > 0, "{answers:?}");
    // Every import that said ok is there and announced; the busy ones left nothing.
    let announced = rt.block_on(stream_messages(
        &nats,
        "DATASETS",
        ok.len() as u64,
        Duration::from_secs(60),
    ));
    assert_eq!(announced.len(), ok.len());
    for answer in &ok {
        let key = format!(
            "datasets/{}/v0.parquet",
            answer["dataset"].as_str().unwrap()
        );
        let object = rt.block_on(common::s3_object(&env.clusters[0], &key));
        assert_eq!(object.len() as u64, answer["bytes"].as_u64().unwrap());
    }
    assert_eq!(node.health().unwrap().0, 200);
}

/// Fault: the author's NATS restarts while processes publish: the signing consumer is recreated
/// after the reconnect and every message reaches the other cluster once, in order.
#[test]
fn the_authors_nats_restarting_between_publishes_loses_nothing() {
    let common::Pair {
        env, _dirs, a, b, ..
    } = common::pair(&["news.>"], &["news.>"]);
    let node_a = RhioNode::start(a);
    let node_b = RhioNode::start(b);
    node_b.wait_peers_connected(1);
    let rt = runtime();
    rt.block_on(js_publish(
        &env.clusters[0].nats_url,
        (0..200).map(|i| message("news.x", i, 200)),
    ));
    env.stop("nats-a");
    std::thread::sleep(Duration::from_secs(3));
    env.start("nats-a");
    let back = std::time::Instant::now();
    rt.block_on(js_publish(
        &env.clusters[0].nats_url,
        (200..400).map(|i| message("news.x", i, 200)),
    ));
    let messages = rt.block_on(stream_messages(
        &env.clusters[1].nats_url,
        "IN",
        400,
        Duration::from_secs(120),
    ));
    println!(
        "fault nats-a restarted: all 400 delivered {:.1} s after it returned, 0 lost, {} duplicated",
        back.elapsed().as_secs_f64(),
        messages.len() - 400
    );
    assert_eq!(messages.len(), 400);
    assert_eq!(seqs_on(&messages, "news.x"), (0..400).collect::<Vec<_>>());
    assert_eq!(metric(&node_a, "rhio_operations_signed_total"), 400.0);
}

/// `rhio.retry` answers with the documented codes: a malformed request is `bad_request`, a
/// version that is not recorded as failed is `not_failed`.
#[test]
fn retry_requests_are_answered_with_their_error_codes() {
    let env = LocalEnv::up(1);
    let dir = tempfile::tempdir().unwrap();
    let node = RhioNode::start(NodeSpec::for_cluster(&env.clusters[0], dir.path()));
    node.wait_healthy();
    let author = rhio_core::identity::PrivateKey::generate().public_key();
    let rt = runtime();
    let ask = |body: String| -> serde_json::Value {
        rt.block_on(async {
            let client = async_nats::connect(&env.clusters[0].nats_url)
                .await
                .unwrap();
            let reply = client
                .request("rhio.retry", body.into())
                .await
                .expect("rhio.retry answers");
            serde_json::from_slice(&reply.payload).unwrap()
        })
    };
    let bad = ask("not json".into());
    assert_eq!(bad["error"]["code"], "bad_request", "{bad}");
    let unknown = ask(format!(
        r#"{{"author": "{author}", "dataset": "weather", "version": 3}}"#
    ));
    assert_eq!(unknown["ok"], false, "{unknown}");
    assert_eq!(unknown["error"]["code"], "not_failed", "{unknown}");
    assert_eq!(
        node.health().unwrap().1["datasets"]["failed"],
        serde_json::json!([])
    );
}

/// A file over `import.max_file_bytes` is answered `too_large` with nothing left behind, and
/// `--print-config` never prints a secret.
#[test]
fn too_large_files_are_refused_and_secrets_are_not_printed() {
    let env = LocalEnv::up(1);
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("big.parquet");
    common::make_parquet(&["sized", file.to_str().unwrap(), "2", "1024"]);
    let mut spec = NodeSpec::for_cluster(&env.clusters[0], dir.path());
    spec.import_roots.push(data.path().to_path_buf());
    let node = RhioNode::start_with_sets(spec, ["import.max_file_bytes=100000"]);
    node.wait_healthy();
    let rt = runtime();
    let answer = rt.block_on(common::rhio_import(
        &env.clusters[0].nats_url,
        file.to_str().unwrap(),
        None,
    ));
    assert_eq!(answer["error"]["code"], "too_large", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("import.max_file_bytes"),
        "{answer}"
    );
    let listed = rt.block_on(async {
        common::s3_client(&env.clusters[0])
            .list_objects_v2()
            .bucket(&env.clusters[0].s3_bucket)
            .prefix("datasets/")
            .send()
            .await
            .unwrap()
            .key_count()
    });
    assert_eq!(listed, Some(0), "nothing visible after a refused import");

    let printed = common::run_rhio(
        &[
            "--print-config",
            "--set",
            "nats.password=hunter2",
            "--set",
            "nats.user=rhio",
            "--set",
            "s3.secret_key=s3cret",
            "--set",
            "s3.access_key=key",
        ],
        &[],
    );
    assert!(printed.status.success());
    let text = String::from_utf8_lossy(&printed.stdout);
    assert!(
        !text.contains("hunter2") && !text.contains("s3cret"),
        "{text}"
    );
    assert!(text.contains("<redacted>"), "{text}");
}
