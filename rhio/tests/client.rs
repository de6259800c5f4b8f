//! `rhio-client` (library and CLI) against two clusters with real servers and nodes: the
//! dataset list after replication, a verified fetch from the cluster's S3 (byte-identical; a
//! tampered object fails verification and leaves no file), and the CLI's JSON and exit codes.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{LocalEnv, RhioNode, cli, make_parquet, runtime, stream_messages, subscribe_toml};
use rhio_client::{ClientError, S3Options};
use serde_json::Value;

fn s3_options(cluster: &common::Cluster) -> S3Options {
    S3Options {
        endpoint: cluster.s3_endpoint.clone(),
        bucket: cluster.s3_bucket.clone(),
        region: None,
        access_key: Some(cluster.s3_access_key.clone()),
        secret_key: Some(cluster.s3_secret_key.clone()),
    }
}

/// Files in `dir` (to prove a failed fetch left nothing, partial files included).
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn datasets_are_listed_and_fetched_verified_and_a_tampered_object_leaves_no_file() {
    let env = LocalEnv::up(2);
    let (tmp, root) = common::import_root();
    let file = root.join("weather.parquet");
    make_parquet(&["sized", file.to_str().unwrap(), "3", "500"]);
    let bytes = std::fs::read(&file).unwrap();
    let (a, mut b, key_a) = common::importer_and_peer(&env, tmp.path(), &root);
    b.extra = subscribe_toml(&key_a, &["datasets.>"], "DATASETS");
    let node_a = RhioNode::start(a.clone());
    let node_b = RhioNode::start(b.clone());
    node_a.wait_healthy();
    node_b.wait_healthy();
    runtime().block_on(common::rhio_import_ok(
        &env.clusters[0].nats_url,
        &file,
        "weather",
    ));
    runtime().block_on(stream_messages(
        &env.clusters[1].nats_url,
        "DATASETS",
        1,
        Duration::from_secs(120),
    ));

    // The library: B's cluster lists A's version, verified, at B's location; fetch is
    // byte-identical.
    let cluster_b = &env.clusters[1];
    let out_dir = tmp.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let (versions, fetched) = runtime().block_on(async {
        let client = rhio_client::Client::connect(&cluster_b.nats_url)
            .await
            .unwrap();
        let versions = client.datasets("DATASETS").await.unwrap();
        let fetched = client
            .fetch(
                &s3_options(cluster_b),
                "DATASETS",
                "weather",
                None,
                None,
                &out_dir.join("weather.parquet"),
            )
            .await
            .unwrap();
        (versions, fetched)
    });
    assert_eq!(versions.len(), 1, "{versions:?}");
    let version = &versions[0];
    assert_eq!(version.author, key_a);
    assert_eq!(version.problem, None);
    assert_eq!(version.bytes, bytes.len() as u64);
    assert!(version.location.contains(&key_a), "{}", version.location);
    assert_eq!(version.file_hash, blake3::hash(&bytes).to_hex().to_string());
    assert!(std::fs::read(&fetched.path).unwrap() == bytes);
    assert_eq!(fetched.manifest.author.to_hex(), key_a);

    // The CLI: --json parses, a text table is printed, fetch writes the file.
    let nats = cluster_b.nats_url.as_str();
    let s3_env = [
        ("RHIO_S3_ENDPOINT", cluster_b.s3_endpoint.as_str()),
        ("RHIO_S3_ACCESS_KEY", cluster_b.s3_access_key.as_str()),
        ("RHIO_S3_SECRET_KEY", cluster_b.s3_secret_key.as_str()),
    ];
    let (code, stdout, stderr) = cli(&["--nats", nats, "--json", "datasets"], &[]);
    assert_eq!(code, 0, "{stderr}");
    let listed: Vec<Value> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed[0]["dataset"], "weather");
    assert_eq!(listed[0]["problem"], Value::Null);
    let (code, stdout, _) = cli(&["--nats", nats, "datasets"], &[]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("weather") && stdout.contains("yes"),
        "{stdout}"
    );
    let cli_out = out_dir.join("cli.parquet");
    let (code, stdout, stderr) = cli(
        &[
            "--nats",
            nats,
            "--json",
            "fetch",
            "weather",
            "--out",
            cli_out.to_str().unwrap(),
        ],
        &s3_env,
    );
    assert_eq!(code, 0, "{stderr}");
    let answer: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(answer["ok"], true);
    assert_eq!(answer["version"], 0);
    assert!(std::fs::read(&cli_out).unwrap() == bytes);

    // One dataset in detail; a typed import whose refusal carries the node's code.
    let (code, stdout, _) = cli(&["--nats", nats, "datasets", "weather"], &[]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("weather v0") && stdout.contains(&version.file_hash),
        "{stdout}"
    );
    let refused = runtime().block_on(async {
        let client = rhio_client::Client::connect(&env.clusters[0].nats_url)
            .await
            .unwrap();
        client
            .import_dataset("/etc/hostname", None, None, Duration::from_secs(30))
            .await
    });
    match refused {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, "forbidden_path"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A typed import with its progress events.
    let second = root.join("tides.parquet");
    make_parquet(&["sized", second.to_str().unwrap(), "2", "500"]);
    let (reply, events) = runtime().block_on(async {
        use futures::StreamExt;
        let client = rhio_client::Client::connect(&env.clusters[0].nats_url)
            .await
            .unwrap();
        let progress = client.import_progress().await.unwrap();
        let reply = client
            .import_dataset(
                second.to_str().unwrap(),
                None,
                None,
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        let events: Vec<rhio_client::ImportProgress> = progress
            .take_until(tokio::time::sleep(Duration::from_millis(500)))
            .collect()
            .await;
        (reply, events)
    });
    assert_eq!((reply.dataset.as_str(), reply.version), ("tides", 0));
    let size = std::fs::metadata(&second).unwrap().len();
    assert_eq!(reply.bytes, size);
    assert!(
        events
            .iter()
            .any(|e| e.dataset == "tides" && e.bytes_total == size),
        "{events:?}"
    );

    // The same node and S3 from a client config file instead of flags.
    let config = tmp.path().join("client.toml");
    std::fs::write(
        &config,
        format!(
            "nats = \"{nats}\"\n[s3]\nendpoint = \"{}\"\naccess_key = \"{}\"\nsecret_key = \"{}\"\n",
            cluster_b.s3_endpoint, cluster_b.s3_access_key, cluster_b.s3_secret_key
        ),
    )
    .unwrap();
    let from_config = out_dir.join("config.parquet");
    let (code, _, stderr) = cli(
        &[
            "--config",
            config.to_str().unwrap(),
            "fetch",
            "weather",
            "--out",
            from_config.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(std::fs::read(&from_config).unwrap() == bytes);
    // status for people and for scripts, any request, completions.
    let (code, stdout, _) = cli(&["--config", config.to_str().unwrap(), "status"], &[]);
    assert_eq!(code, 0);
    assert!(stdout.contains("peers     1 of 1 connected"), "{stdout}");
    let (code, stdout, _) = cli(&["--nats", nats, "--json", "status"], &[]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&stdout).unwrap()["status"],
        "ok"
    );
    let (code, stdout, _) = cli(&["--nats", nats, "request", "rhio.status"], &[]);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<Value>(&stdout).unwrap()["peers"]["connected"],
        1
    );
    let (code, stdout, _) = cli(&["completions", "bash"], &[]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("rhio-client") && stdout.contains("fetch"),
        "{stdout}"
    );

    // Usage errors exit 2 with a code: a dataset that is not there, no S3 credentials.
    let (code, stdout, _) = cli(
        &[
            "--nats",
            nats,
            "--json",
            "fetch",
            "rain",
            "--out",
            "x.parquet",
        ],
        &s3_env,
    );
    assert_eq!(code, 2, "{stdout}");
    let error: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(error["error"]["code"], "not_found");
    let (code, _, stderr) = cli(
        &["--nats", nats, "fetch", "weather", "--out", "x.parquet"],
        &[],
    );
    assert_eq!(code, 2, "{stderr}");
    // The endpoint and bucket come from the node's status; credentials never do.
    assert!(stderr.contains("no S3 credentials"), "{stderr}");
    // A node that is not there: exit 1.
    let (code, _, _) = cli(&["--nats", "nats://127.0.0.1:1", "datasets"], &[]);
    assert_eq!(code, 1);

    // Cluster state: B sees A connected and A's dataset; the CLI prints and writes the tables.
    let state = runtime().block_on(async {
        let client = rhio_client::Client::connect(&cluster_b.nats_url)
            .await
            .unwrap();
        client.cluster_state("DATASETS").await.unwrap()
    });
    let peers = rhio_client::state::to_json_rows(&state.peers);
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0]["public_key"], key_a.as_str());
    assert_eq!(peers[0]["state"], "connected");
    let datasets = rhio_client::state::to_json_rows(&state.datasets);
    assert_eq!(datasets[0]["dataset"], "weather");
    assert_eq!(datasets[0]["verified"], true);
    assert_eq!(state.transfers.num_rows(), 0);
    let (code, stdout, stderr) = cli(&["--nats", nats, "state"], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("peers (1 rows)") && stdout.contains("connected"),
        "{stdout}"
    );
    let (code, stdout, _) = cli(&["--nats", nats, "--json", "state"], &[]);
    assert_eq!(code, 0);
    let json: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["datasets"][0]["rows"], version.rows);
    let state_dir = tmp.path().join("state");
    let (code, _, stderr) = cli(
        &[
            "--nats",
            nats,
            "state",
            "--format",
            "csv",
            "--out",
            state_dir.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    let csv = std::fs::read_to_string(state_dir.join("datasets.csv")).unwrap();
    assert!(csv.starts_with("dataset,author,version,"), "{csv}");
    // A header and a line per version (the tides import above may have replicated by now).
    assert!(
        csv.contains("\nweather,") && csv.lines().count() >= 2,
        "{csv}"
    );
    let (code, _, _) = cli(&["--nats", nats, "state", "--format", "parquet"], &[]);
    assert_eq!(code, 2, "parquet without --out is a usage error");

    // One flipped byte in B's copy: the fetch fails verification (exit 3) and leaves nothing.
    let key = version.location.strip_prefix("s3://rhio/").unwrap();
    common::damage_object(&env.clusters[1], key, |stored| stored[1000] ^= 0x01);
    let tampered_dir = tmp.path().join("tampered");
    std::fs::create_dir_all(&tampered_dir).unwrap();
    let err = runtime()
        .block_on(async {
            let client = rhio_client::Client::connect(&cluster_b.nats_url)
                .await
                .unwrap();
            client
                .fetch(
                    &s3_options(cluster_b),
                    "DATASETS",
                    "weather",
                    Some(0),
                    Some(&key_a),
                    &tampered_dir.join("weather.parquet"),
                )
                .await
        })
        .unwrap_err();
    assert!(matches!(err, ClientError::Verification(_)), "{err}");
    let (code, _, stderr) = cli(
        &[
            "--nats",
            nats,
            "fetch",
            "weather",
            "--out",
            tampered_dir.join("cli.parquet").to_str().unwrap(),
        ],
        &s3_env,
    );
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("verification failed"), "{stderr}");
    assert!(
        files_in(&tampered_dir).is_empty(),
        "{:?}",
        files_in(&tampered_dir)
    );
}
