//! The registry mirror against a real OCI registry (Debian's docker-registry, CNCF
//! Distribution, Harbor's core), anonymous and behind Harbor's bearer-token flow: pushed after
//! import and after replication, pulled back with our client and with `oras` (PyPI), deduplicated
//! blobs, an outage and a restart that lose nothing, wrong credentials that degrade nothing else.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{
    LocalEnv, NodeSpec, Registries, RhioNode, make_parquet, metric, metric_present, publish_toml,
    runtime, stream_messages, subscribe_toml, wait_for,
};
use rhio::mirror::registry::{Credentials, Registry};
use rhio_core::manifest::SignedManifest;
use rhio_core::oci::{self, ImageManifest};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(120);

fn mirror_toml(registry: &str, extra: &str) -> String {
    format!(
        "\n[mirror]\nenabled = true\nregistry = \"{registry}\"\nproject = \"rhio\"\nmax_retry_interval_secs = 2\nchunk_size_mib = 1\n{extra}"
    )
}

/// Waits until the node's mirror has pushed `count` versions (all time) and returns /health.
fn wait_pushed(node: &RhioNode, count: u64) -> Value {
    wait_for(&format!("{count} versions pushed"), WAIT, || {
        let (_, health) = node.health()?;
        (health["mirror"]["pushed"].as_u64()? >= count).then_some(health)
    })
}

fn client(url: &str, credentials: Option<(&str, &str)>) -> Registry {
    Registry::new(
        url,
        credentials.map(|(user, password)| Credentials {
            user: user.into(),
            password: password.into(),
        }),
        Duration::from_secs(30),
    )
    .unwrap()
}

/// An artifact pulled back with our client: its manifest, Parquet file and signed manifest.
struct Pulled {
    manifest: ImageManifest,
    digest: String,
    parquet: Vec<u8>,
    signed: SignedManifest,
    config: Value,
}

fn pull(registry: &Registry, repository: &str, tag: &str) -> Pulled {
    runtime().block_on(async {
        let bytes = registry
            .get_manifest(repository, tag)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{repository}:{tag} is not in the registry"));
        let manifest: ImageManifest = serde_json::from_slice(&bytes).unwrap();
        let blob = |digest: String| async move {
            let data = registry.get_blob(repository, &digest).await.unwrap();
            assert_eq!(rhio::mirror::sha256_digest(&data), digest);
            data.to_vec()
        };
        let parquet = blob(manifest.layers[0].digest.clone()).await;
        let signed = SignedManifest::decode(&blob(manifest.layers[1].digest.clone()).await)
            .expect("the signed manifest layer verifies");
        let config = serde_json::from_slice(&blob(manifest.config.digest.clone()).await).unwrap();
        Pulled {
            digest: rhio::mirror::sha256_digest(&bytes),
            manifest,
            parquet,
            signed,
            config,
        }
    })
}

/// `oras pull` (PyPI oras, an independent client) of `reference` into `out`.
fn oras_pull(reference: &str, out: &Path, credentials: Option<(&str, &str)>) {
    let script = r#"
import sys, oras.client
reference, out = sys.argv[1], sys.argv[2]
client = oras.client.OrasClient(insecure=True)
if len(sys.argv) > 3:
    client.auth.set_basic_auth(sys.argv[3], sys.argv[4])
print(client.pull(target=reference, outdir=out))
"#;
    let mut command = Command::new(common::venv_python());
    command.args(["-c", script, reference, out.to_str().unwrap()]);
    if let Some((user, password)) = credentials {
        command.args([user, password]);
    }
    let output = command.output().expect("the venv's python runs");
    assert!(
        output.status.success(),
        "oras pull {reference}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Requests of `method` on blob uploads in a registry access log (`"PATCH /v2/...`).
fn upload_requests(log: &str, method: &str) -> usize {
    log.lines()
        .filter(|line| {
            line.contains(&format!("\"{method} /v2/")) && line.contains("/blobs/uploads/")
        })
        .count()
}

fn host(url: &str) -> &str {
    rhio::mirror::registry_host(url)
}

fn assert_layout(pulled: &Pulled, file: &[u8], author: &str, version: u64) {
    let manifest = &pulled.manifest;
    assert_eq!(
        manifest.artifact_type.as_deref(),
        Some("application/vnd.apache.parquet")
    );
    assert_eq!(manifest.media_type, oci::IMAGE_MANIFEST_MEDIA_TYPE);
    assert_eq!(
        manifest.config.media_type,
        "application/vnd.rhio.dataset.config.v1+json"
    );
    assert_eq!(
        manifest.layers[0].media_type,
        "application/vnd.apache.parquet"
    );
    assert_eq!(
        manifest.layers[0].annotations[oci::annotation::TITLE],
        "weather.parquet"
    );
    assert_eq!(
        manifest.layers[1].media_type,
        "application/vnd.rhio.signed-manifest.v1+cbor"
    );
    assert_eq!(
        manifest.layers[1].annotations[oci::annotation::TITLE],
        "weather.rhio-manifest"
    );
    let file_hash = blake3::hash(file).to_hex().to_string();
    let annotations = &manifest.annotations;
    assert_eq!(annotations[oci::annotation::AUTHOR], author);
    assert_eq!(annotations[oci::annotation::FILE_BLAKE3], file_hash);
    assert_eq!(annotations[oci::annotation::VERSION], version.to_string());
    assert!(annotations[oci::annotation::CREATED].ends_with('Z'));
    assert!(annotations[oci::annotation::SOURCE].starts_with("rhio://"));
    assert!(
        annotations[oci::annotation::ROW_GROUPS]
            .parse::<u64>()
            .unwrap()
            > 1
    );
    // Byte-identical file, and the signed manifest (verified by decoding) signs exactly it.
    assert!(pulled.parquet == file, "the pulled Parquet file differs");
    let signed = &pulled.signed.manifest;
    assert_eq!(signed.file_hash, file_hash);
    assert_eq!(signed.version, version);
    assert_eq!(signed.author.to_hex(), author);
    assert_eq!(pulled.config["file_blake3"], file_hash);
    assert_eq!(pulled.config["version"], version);
}

#[test]
fn imported_and_replicated_versions_are_pushed_pulled_back_identical_and_deduplicated() {
    let env = LocalEnv::with_registry(2, Registries::Anonymous);
    let url = env.registry.clone().unwrap();
    let (tmp, root) = common::import_root();
    let file = root.join("weather.parquet");
    let second = root.join("weather-2.parquet");
    // Version 2 = version 1's row groups and one more.
    make_parquet(&[
        "appended",
        file.to_str().unwrap(),
        second.to_str().unwrap(),
        "3",
        "1",
        "500",
    ]);
    let bytes = std::fs::read(&file).unwrap();

    let (mut a, mut b, key_a) = common::importer_and_peer(&env, tmp.path(), &root);
    a.extra = mirror_toml(&url, "");
    b.extra = subscribe_toml(&key_a, &["datasets.>"], "DATASETS") + &mirror_toml(&url, "");

    // Imported in A: pushed to rhio/weather:v0 and :latest.
    let mut node_a = RhioNode::start(a.clone());
    node_a.wait_healthy();
    runtime().block_on(common::rhio_import_ok(
        &env.clusters[0].nats_url,
        &file,
        "weather",
    ));
    let health = wait_pushed(&node_a, 1);
    assert_eq!(health["mirror"]["pending"], 0, "{health}");
    assert_eq!(health["mirror"]["state"], "idle", "{health}");
    let registry = client(&url, None);
    let pulled = pull(&registry, "rhio/weather", "v0");
    assert_layout(&pulled, &bytes, &key_a, 0);
    assert_eq!(
        pull(&registry, "rhio/weather", "latest").digest,
        pulled.digest
    );
    assert!(metric(&node_a, "rhio_mirror_bytes_pushed_total") >= bytes.len() as f64);
    assert_eq!(
        metric(&node_a, "rhio_mirror_pushes_total{outcome=\"pushed\"}"),
        1.0
    );

    // Replicated into B: pushed where A's tags cannot be overwritten, the Parquet layer
    // mounted from A's repository instead of uploaded again.
    let node_b = RhioNode::start(b.clone());
    node_b.wait_healthy();
    wait_pushed(&node_b, 1);
    let replica = format!("rhio/weather/{key_a}");
    let pulled_b = pull(&registry, &replica, "v0");
    assert_layout(&pulled_b, &bytes, &key_a, 0);
    assert_eq!(
        pulled_b.manifest.layers[0].digest,
        pulled.manifest.layers[0].digest
    );
    assert_eq!(
        metric(&node_b, "rhio_mirror_blobs_total{outcome=\"mounted\"}"),
        1.0
    );
    assert!(
        metric_present(&node_b, "rhio_mirror_bytes_pushed_total").expect("B's byte counter")
            < 64.0 * 1024.0,
        "B uploaded the file again"
    );

    // An independent client pulls both: the titled layers, byte-identical.
    for (reference, dir) in [
        (format!("{}/rhio/weather:v0", host(&url)), "pull-a"),
        (format!("{}/{replica}:v0", host(&url)), "pull-b"),
    ] {
        let out = tmp.path().join(dir);
        oras_pull(&reference, &out, None);
        assert!(std::fs::read(out.join("weather.parquet")).unwrap() == bytes);
        let signed =
            SignedManifest::decode(&std::fs::read(out.join("weather.rhio-manifest")).unwrap())
                .unwrap();
        assert_eq!(
            signed.manifest.file_hash,
            blake3::hash(&bytes).to_hex().to_string()
        );
        // What a consumer holding the pulled files does: `rhio-client verify`.
        let (parquet, manifest) = (
            out.join("weather.parquet"),
            out.join("weather.rhio-manifest"),
        );
        let (code, stdout, stderr) = common::cli(
            &[
                "verify",
                parquet.to_str().unwrap(),
                manifest.to_str().unwrap(),
            ],
            &[],
        );
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains(&key_a), "{stdout}");
        let mut changed = bytes.clone();
        changed[bytes.len() / 2] ^= 0x01;
        std::fs::write(&parquet, changed).unwrap();
        let (code, _, stderr) = common::cli(
            &[
                "verify",
                parquet.to_str().unwrap(),
                manifest.to_str().unwrap(),
            ],
            &[],
        );
        assert_eq!(code, 3, "{stderr}");
    }

    // A second version: its three blobs (config, file, signed manifest) are uploaded once.
    let uploaded = metric(&node_a, "rhio_mirror_blobs_total{outcome=\"uploaded\"}");
    assert_eq!(uploaded, 3.0);
    let answer = runtime().block_on(common::rhio_import_ok(
        &env.clusters[0].nats_url,
        &second,
        "weather",
    ));
    assert_eq!(answer["version"], 1, "{answer}");
    wait_pushed(&node_a, 2);
    assert_eq!(
        metric(&node_a, "rhio_mirror_blobs_total{outcome=\"uploaded\"}"),
        6.0
    );
    let second_bytes = std::fs::read(&second).unwrap();
    let v1 = pull(&registry, "rhio/weather", "v1");
    assert_layout(&v1, &second_bytes, &key_a, 1);
    assert_eq!(pull(&registry, "rhio/weather", "latest").digest, v1.digest);

    // Re-pushing unchanged versions (their record lost, as in a crash before it was written)
    // uploads no blob: the registry's log shows no upload request after the restart.
    node_a.signal(libc::SIGTERM);
    node_a.wait_exit(Duration::from_secs(20));
    let db = a.data_dir.join("replication.sqlite");
    let output = Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('DELETE FROM mirror_pushes'); c.commit()",
            db.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let before = env.service_log("registry").lines().count();
    let node_a = RhioNode::start(a.clone());
    node_a.wait_healthy();
    wait_pushed(&node_a, 2);
    let log = env.service_log("registry");
    let after: String = log.lines().skip(before).collect::<Vec<_>>().join("\n");
    assert!(
        after.contains("\"PUT /v2/rhio/weather/manifests/v1"),
        "no re-push seen: {after}"
    );
    assert_eq!(upload_requests(&after, "POST"), 0, "{after}");
    assert_eq!(upload_requests(&after, "PATCH"), 0, "{after}");
    assert_eq!(
        metric_present(&node_a, "rhio_mirror_blobs_total{outcome=\"present\"}"),
        Some(6.0)
    );
    assert_eq!(
        metric_present(&node_a, "rhio_mirror_blobs_total{outcome=\"uploaded\"}"),
        None
    );
    assert_eq!(
        metric_present(&node_a, "rhio_mirror_bytes_pushed_total"),
        Some(0.0)
    );
    // The registry never saw B upload a file: one chunked upload of each version, by A.
    let patches = upload_requests(&log, "PATCH");
    let chunks = bytes.len().div_ceil(1 << 20) + second_bytes.len().div_ceil(1 << 20);
    assert_eq!(
        patches, chunks,
        "{patches} PATCH requests for {chunks} chunks"
    );
}

#[test]
fn a_registry_outage_across_a_restart_delays_pushes_and_loses_none() {
    let env = LocalEnv::with_registry(1, Registries::Anonymous);
    let url = env.registry.clone().unwrap();
    let (tmp, root) = common::import_root();
    let file = root.join("weather.parquet");
    make_parquet(&["sized", file.to_str().unwrap(), "2", "500"]);
    let mut spec = NodeSpec::for_cluster(&env.clusters[0], &tmp.path().join("a"));
    spec.import_roots = vec![root.clone()];
    spec.extra = mirror_toml(&url, "");
    let mut node = RhioNode::start(spec.clone());
    node.wait_healthy();

    env.stop("registry");
    runtime().block_on(common::rhio_import_ok(
        &env.clusters[0].nats_url,
        &file,
        "weather",
    ));
    // Retrying, with the reason; the node is otherwise fine and the version was announced.
    let health = wait_for("a failed push", WAIT, || {
        let (code, health) = node.health()?;
        (health["mirror"]["state"] == "retrying").then_some((code, health))
    });
    let (code, health) = health;
    assert_eq!(code, 200, "{health}");
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["mirror"]["pending"], 1, "{health}");
    let version = &health["mirror"]["versions"][0];
    assert_eq!(version["state"], "failed", "{health}");
    assert!(
        version["reason"].as_str().unwrap().contains(host(&url)),
        "{health}"
    );
    runtime().block_on(async {
        stream_messages(&env.clusters[0].nats_url, "DATASETS", 1, WAIT).await;
    });
    assert!(metric(&node, "rhio_mirror_pushes_total{outcome=\"failed\"}") >= 1.0);
    assert_eq!(metric(&node, "rhio_mirror_queue"), 1.0);

    // Killed while the registry is still down: the push is still queued after the restart.
    node.kill();
    let node = RhioNode::start(spec.clone());
    node.wait_healthy();
    let health = wait_for("the queued push after the restart", WAIT, || {
        let (_, health) = node.health()?;
        (health["mirror"]["state"] == "retrying").then_some(health)
    });
    assert_eq!(health["mirror"]["pushed"], 0, "{health}");
    assert!(
        health["mirror"]["versions"][0]["attempts"]
            .as_u64()
            .unwrap()
            >= 2,
        "{health}"
    );

    env.start("registry");
    wait_pushed(&node, 1);
    let bytes = std::fs::read(&file).unwrap();
    let pulled = pull(&client(&url, None), "rhio/weather", "v0");
    assert_layout(&pulled, &bytes, &spec.public_key(), 0);
    let health = node.wait_healthy();
    assert_eq!(health["mirror"]["state"], "idle", "{health}");
    assert_eq!(health["mirror"]["pending"], 0, "{health}");
    assert!(health["mirror"]["last_error"].is_null(), "{health}");
}

#[test]
fn harbor_token_auth_works_for_a_robot_account_and_wrong_credentials_degrade_nothing_else() {
    let env = LocalEnv::with_registry(2, Registries::AnonymousAndToken);
    let auth = env.registry_auth.clone().unwrap();
    let (robot, robot_password) = auth
        .users
        .iter()
        .find(|(user, _)| user.starts_with("robot$"))
        .cloned()
        .unwrap();
    let (tmp, root) = common::import_root();
    let file = root.join("weather.parquet");
    make_parquet(&["sized", file.to_str().unwrap(), "2", "500"]);
    let bytes = std::fs::read(&file).unwrap();

    let (mut a, mut b, key_a) = common::importer_and_peer(&env, tmp.path(), &root);
    // A: the robot account from the environment (its '$' intact) and the password from a file.
    let password_file = tmp.path().join("registry-password");
    std::fs::write(&password_file, format!("{robot_password}\n")).unwrap();
    a.extra = publish_toml(&["news.>"], "OUT")
        + &mirror_toml(
            &auth.url,
            &format!("password_file = \"{}\"\n", password_file.display()),
        );
    a.env.push(("RHIO_MIRROR__USER".into(), robot.clone()));
    // B: a user with a wrong password.
    b.extra = subscribe_toml(&key_a, &["datasets.>"], "DATASETS")
        + &subscribe_toml(&key_a, &["news.>"], "IN")
        + &mirror_toml(
            &auth.url,
            "user = \"rhio-dev\"\npassword = \"not-the-password\"\n",
        );
    let node_a = RhioNode::start(a.clone());
    let node_b = RhioNode::start(b.clone());
    node_a.wait_healthy();
    node_b.wait_healthy();

    runtime().block_on(common::rhio_import_ok(
        &env.clusters[0].nats_url,
        &file,
        "weather",
    ));
    wait_pushed(&node_a, 1);
    let registry = client(&auth.url, Some((&robot, &robot_password)));
    assert_layout(&pull(&registry, "rhio/weather", "v0"), &bytes, &key_a, 0);
    // Without credentials the registry gives nothing.
    assert!(
        runtime()
            .block_on(client(&auth.url, None).get_manifest("rhio/weather", "v0"))
            .is_err()
    );
    let out = tmp.path().join("pull");
    oras_pull(
        &format!("{}/rhio/weather:v0", host(&auth.url)),
        &out,
        Some((&robot, &robot_password)),
    );
    assert!(std::fs::read(out.join("weather.parquet")).unwrap() == bytes);

    // Tokens came from the token service for the robot account, and were reused.
    let tokens = env.service_log("token");
    let issued: Vec<Value> = tokens
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .filter(|entry: &Value| entry["user"] == robot.as_str() && entry["status"] == 200)
        .collect();
    assert!(!issued.is_empty(), "no token for {robot}: {tokens}");
    let registry_requests = env
        .service_log("registry-auth")
        .lines()
        .filter(|line| line.contains("\"HEAD /v2/") || line.contains("/blobs/uploads/"))
        .count();
    assert!(
        issued.len() * 3 < registry_requests,
        "{} tokens for {registry_requests} requests: tokens are not reused",
        issued.len()
    );

    // B replicated the dataset and routes messages; its mirror says what is wrong, once.
    runtime().block_on(async {
        stream_messages(&env.clusters[1].nats_url, "DATASETS", 1, WAIT).await;
        let news = (0..5).map(|i| {
            (
                "news.eu".to_string(),
                async_nats::HeaderMap::new(),
                format!("n{i}").into_bytes(),
            )
        });
        common::js_publish(&env.clusters[0].nats_url, news).await;
        stream_messages(&env.clusters[1].nats_url, "IN", 5, WAIT).await;
    });
    let health = wait_for("B's mirror to report the refusal", WAIT, || {
        let (_, health) = node_b.health()?;
        (health["mirror"]["state"] == "unauthorized").then_some(health)
    });
    assert_eq!(health["status"], "ok", "{health}");
    let error = health["mirror"]["last_error"].as_str().unwrap();
    assert!(
        error.contains(&auth.url) && error.contains("rhio-dev"),
        "{error}"
    );
    assert!(!health.to_string().contains("not-the-password"), "{health}");
    assert_eq!(health["mirror"]["pending"], 1, "{health}");
    let log = node_b.log();
    assert!(
        !log.contains("not-the-password"),
        "the password is in B's log"
    );
    let refusals = log
        .lines()
        .filter(|line| line.contains("ERROR") && line.contains("refuses our credentials"))
        .count();
    assert_eq!(refusals, 1, "{log}");
}

#[test]
fn http_basic_auth_pushes_as_a_robot_account_with_the_password_from_the_environment() {
    let env = LocalEnv::with_registry(1, Registries::AnonymousAndToken);
    let url = env.registry_basic.clone().unwrap();
    let (robot, password) = env
        .registry_auth
        .as_ref()
        .unwrap()
        .users
        .iter()
        .find(|(user, _)| user.starts_with("robot$"))
        .cloned()
        .unwrap();
    let (tmp, root) = common::import_root();
    let file = root.join("weather.parquet");
    make_parquet(&["sized", file.to_str().unwrap(), "2", "500"]);
    let mut spec = NodeSpec::for_cluster(&env.clusters[0], &tmp.path().join("a"));
    spec.import_roots = vec![root.clone()];
    // The robot name with its '$' in the TOML file, the password from the environment.
    spec.extra = mirror_toml(&url, &format!("user = \"{robot}\"\n"));
    spec.env
        .push(("RHIO_MIRROR__PASSWORD".into(), password.clone()));
    let node = RhioNode::start(spec.clone());
    node.wait_healthy();
    runtime().block_on(common::rhio_import_ok(
        &env.clusters[0].nats_url,
        &file,
        "weather",
    ));
    let health = wait_pushed(&node, 1);
    assert_eq!(
        health["mirror"]["user"],
        format!("user {robot:?}"),
        "{health}"
    );
    let pulled = pull(
        &client(&url, Some((&robot, &password))),
        "rhio/weather",
        "v0",
    );
    assert_layout(
        &pulled,
        &std::fs::read(&file).unwrap(),
        &spec.public_key(),
        0,
    );
    assert!(
        runtime()
            .block_on(client(&url, None).get_manifest("rhio/weather", "v0"))
            .unwrap_err()
            .is_auth()
    );
    assert!(
        !node.log().contains(&password),
        "the password is in the log"
    );
    // A dataset name rhio accepts but OCI does not: listed as invalid, never retried.
    runtime().block_on(common::rhio_import_ok(
        &env.clusters[0].nats_url,
        &file,
        "_private",
    ));
    let health = wait_for("the invalid version in the status", WAIT, || {
        let (_, health) = node.health()?;
        let versions = health["mirror"]["versions"].as_array()?.clone();
        versions
            .iter()
            .any(|v| v["dataset"] == "_private" && v["state"] == "invalid")
            .then_some(health)
    });
    assert_eq!(health["mirror"]["pending"], 0, "{health}");
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(metric_present(&node, "rhio_mirror_queue"), Some(0.0));
}
