//! Dataset replication between clusters, each with its own NATS (JetStream) and S3, over
//! loopback QUIC: byte-identical copies, delta versions, catch-up through a third cluster, crash
//! and resume, a peer serving rotten bytes, and an author that is not allowed.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{
    Cluster, LocalEnv, NodeSpec, RhioNode, make_parquet, metric, publish_toml, runtime, s3_client,
    stream_messages, subscribe_toml, wait_for,
};
use rhio_core::manifest::DatasetManifest;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(180);

/// Node specs for clusters 0..N of `env` (named a, b, c), each with its own data dir; node a
/// may import from `dirs.root`, and node i knows the nodes `peers[i]`, in that order.
fn specs<const N: usize>(env: &LocalEnv, dirs: &Dirs, peers: [&[usize]; N]) -> [NodeSpec; N] {
    let mut specs: Vec<NodeSpec> = (0..N)
        .map(|i| {
            let name = ["a", "b", "c"][i];
            NodeSpec::for_cluster(&env.clusters[i], &dirs.nodes.join(name))
        })
        .collect();
    specs[0].import_roots = vec![dirs.root.clone()];
    let known: Vec<Vec<(String, u16)>> = peers
        .iter()
        .map(|list| {
            list.iter()
                .map(|&j| (specs[j].public_key(), specs[j].quic_port))
                .collect()
        })
        .collect();
    for (spec, known) in specs.iter_mut().zip(known) {
        spec.known_nodes = known;
    }
    specs.try_into().unwrap_or_else(|_| unreachable!())
}

/// Starts a node per spec and waits until each is healthy.
fn start_healthy<const N: usize>(specs: [&NodeSpec; N]) -> [RhioNode; N] {
    let nodes = specs.map(|spec| RhioNode::start(spec.clone()));
    for node in &nodes {
        node.wait_healthy();
    }
    nodes
}

fn import(cluster: &Cluster, path: &Path, dataset: &str) -> Value {
    runtime().block_on(common::rhio_import_ok(&cluster.nats_url, path, dataset))
}

/// Waits until the cluster's DATASETS stream holds `count` announcements and returns them as
/// (summary JSON, author header).
fn announcements(cluster: &Cluster, count: u64) -> Vec<(Value, String)> {
    runtime().block_on(async {
        stream_messages(&cluster.nats_url, "DATASETS", count, WAIT)
            .await
            .into_iter()
            .map(|m| {
                let author = m
                    .headers
                    .get("X-Rhio-PublicKey")
                    .map(|v| v.to_string())
                    .unwrap_or_default();
                (serde_json::from_slice(&m.payload).unwrap(), author)
            })
            .collect()
    })
}

fn s3_get(cluster: &Cluster, key: &str) -> Vec<u8> {
    runtime().block_on(common::s3_object(cluster, key))
}

fn s3_keys(cluster: &Cluster, prefix: &str) -> Vec<String> {
    runtime().block_on(async {
        s3_client(cluster)
            .list_objects_v2()
            .bucket(&cluster.s3_bucket)
            .prefix(prefix)
            .send()
            .await
            .unwrap()
            .contents()
            .iter()
            .filter_map(|o| o.key().map(String::from))
            .collect()
    })
}

/// Checks that an announcement points at a byte-identical copy of `file` in `cluster`'s S3.
fn assert_copy(cluster: &Cluster, announcement: &Value, file: &Path) {
    let location = announcement["location"].as_str().unwrap();
    let copy = s3_get(cluster, &common::s3_key_of(location));
    let original = std::fs::read(file).unwrap();
    assert_eq!(copy.len(), original.len(), "size of {location}");
    assert!(
        blake3::hash(&copy) == blake3::hash(&original),
        "{location} differs from {}",
        file.display()
    );
    assert_eq!(
        announcement["file_hash"].as_str().unwrap(),
        blake3::hash(&original).to_hex().as_str()
    );
}

struct Dirs {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    nodes: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    std::fs::create_dir_all(&root).unwrap();
    Dirs {
        root,
        nodes: tmp.path().join("nodes"),
        _tmp: tmp,
    }
}

#[test]
fn a_dataset_replicates_byte_identical_and_a_new_version_moves_only_its_new_row_groups() {
    let env = LocalEnv::up(2);
    let dirs = dirs();
    let (v1, v2) = (dirs.root.join("v1.parquet"), dirs.root.join("v2.parquet"));
    // ~200 MiB in ~4 MiB row groups, then 24 MiB more.
    make_parquet(&[
        "appended",
        v1.to_str().unwrap(),
        v2.to_str().unwrap(),
        "200",
        "24",
        "4000",
    ]);
    let [a, mut b] = specs(&env, &dirs, [&[1], &[0]]);
    b.extra = subscribe_toml(&a.public_key(), &["datasets.>"], "DATASETS");
    let [_node_a, node_b] = start_healthy([&a, &b]);

    let started = Instant::now();
    let first = import(&env.clusters[0], &v1, "weather");
    let got = announcements(&env.clusters[1], 1);
    let secs = started.elapsed().as_secs_f64();
    let (summary, author) = &got[0];
    assert_eq!(author, &a.public_key());
    assert_eq!(summary["version"], 0);
    assert_eq!(summary["operation"], first["operation"]);
    let location = summary["location"].as_str().unwrap();
    assert!(
        location.ends_with(&format!("datasets/weather/{}/v0.parquet", a.public_key())),
        "{location}"
    );
    assert_copy(&env.clusters[1], summary, &v1);
    let v1_len = std::fs::metadata(&v1).unwrap().len();
    let fetched_v1 = metric(&node_b, "rhio_replication_bytes_fetched_total");
    println!(
        "v1: {v1_len} bytes, {} row groups, import + replication {secs:.2} s, {fetched_v1} bytes fetched",
        first["row_groups"]
    );
    assert!(fetched_v1 >= v1_len as f64 && fetched_v1 <= v1_len as f64 * 1.02);

    // The appended version: only row groups B lacks cross the network.
    import(&env.clusters[0], &v2, "weather");
    let got = announcements(&env.clusters[1], 2);
    let (summary, _) = &got[1];
    assert_eq!(summary["version"], 1);
    assert_copy(&env.clusters[1], summary, &v2);
    let manifest = |version| {
        DatasetManifest::decode(&s3_get(
            &env.clusters[0],
            &format!(".rhio/manifests/weather/v{version}.cbor"),
        ))
        .unwrap()
    };
    let (m1, m2) = (manifest(0), manifest(1));
    let new_bytes: u64 = m2
        .blobs
        .iter()
        .filter(|blob| !m1.blobs.iter().any(|old| old.hash == blob.hash))
        .map(|blob| blob.length)
        .sum();
    let moved = metric(&node_b, "rhio_replication_bytes_fetched_total") - fetched_v1;
    let ratio = moved / new_bytes as f64;
    println!("v2: {new_bytes} bytes of new blobs, {moved} bytes moved, ratio {ratio:.4}");
    assert!(new_bytes > 20 << 20 && new_bytes < 30 << 20, "{new_bytes}");
    assert!(
        (1.0..=1.05).contains(&ratio),
        "moved {moved} bytes for {new_bytes} new"
    );
    let reused: u64 = m2
        .blobs
        .iter()
        .filter(|blob| m1.blobs.iter().any(|old| old.hash == blob.hash))
        .map(|blob| blob.length)
        .sum();
    assert_eq!(reused + new_bytes, m2.file_size);
    assert_eq!(
        metric(&node_b, "rhio_replication_bytes_local_total"),
        reused as f64
    );

    // Status shows what B holds and that nothing is in flight.
    let (_, health) = node_b.health().unwrap();
    assert_eq!(health["datasets"]["versions_replicated"], 2, "{health}");
    assert_eq!(health["datasets"]["blobs"], m2.blobs.len() + 1, "{health}");
    assert!(
        health["datasets"]["transfers"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn rotten_local_row_groups_are_not_used_and_the_version_comes_from_peers() {
    let env = LocalEnv::up(2);
    let dirs = dirs();
    let (v1, v2) = (dirs.root.join("v1.parquet"), dirs.root.join("v2.parquet"));
    make_parquet(&[
        "appended",
        v1.to_str().unwrap(),
        v2.to_str().unwrap(),
        "24",
        "8",
        "2000",
    ]);
    let [a, mut b] = specs(&env, &dirs, [&[1], &[0]]);
    b.extra = subscribe_toml(&a.public_key(), &["datasets.>"], "DATASETS");
    let [_node_a, node_b] = start_healthy([&a, &b]);
    import(&env.clusters[0], &v1, "rot");
    let got = announcements(&env.clusters[1], 1);
    // B's copy of v0 rots in its S3; v1 shares its row groups.
    let key = common::s3_key_of(got[0].0["location"].as_str().unwrap());
    common::damage_object(&env.clusters[1], &key, |bytes| {
        for at in (500..bytes.len()).step_by(1 << 20) {
            bytes[at] ^= 0x01;
        }
    });

    import(&env.clusters[0], &v2, "rot");
    let got = announcements(&env.clusters[1], 2);
    assert_eq!(got[1].0["version"], 1);
    assert_copy(&env.clusters[1], &got[1].0, &v2);
    assert!(
        node_b.log().contains("whole-file hash mismatch"),
        "the first attempt used the rotten local blobs and noticed"
    );
}

#[test]
fn a_third_cluster_gets_the_dataset_from_a_replica_while_the_author_is_down() {
    let env = LocalEnv::up(3);
    let dirs = dirs();
    let file = dirs.root.join("sensors.parquet");
    make_parquet(&["sized", file.to_str().unwrap(), "40", "2000"]);
    let [a, mut b, mut c] = specs(&env, &dirs, [&[1, 2], &[0, 2], &[0, 1]]);
    let author = a.public_key();
    b.extra = subscribe_toml(&author, &["datasets.*"], "DATASETS");
    c.extra = subscribe_toml(&author, &["datasets.sensors"], "DATASETS");
    let [mut node_a, node_b] = start_healthy([&a, &b]);
    import(&env.clusters[0], &file, "sensors");
    let got = announcements(&env.clusters[1], 1);
    assert_copy(&env.clusters[1], &got[0].0, &file);

    node_a.signal(libc::SIGTERM);
    node_a.wait_exit(Duration::from_secs(30));
    let node_c = RhioNode::start(c.clone());
    node_c.wait_http();
    let got = announcements(&env.clusters[2], 1);
    let (summary, header_author) = &got[0];
    assert_eq!(header_author, &author);
    assert_copy(&env.clusters[2], summary, &file);
    let served_by_b = metric(&node_b, "rhio_blob_bytes_served_total");
    let file_len = std::fs::metadata(&file).unwrap().len() as f64;
    assert!(served_by_b >= file_len, "B served {served_by_b} bytes");
    // C can serve what it replicated: its outboards are in its S3.
    let (_, health) = node_c.health().unwrap();
    let blobs = health["datasets"]["blobs"].as_u64().unwrap() as usize;
    assert!(blobs > 10, "{health}");
    assert_eq!(s3_keys(&env.clusters[2], ".rhio/outboards/").len(), blobs);
}

#[test]
fn a_peer_serving_corrupt_bytes_is_detected_and_the_data_comes_from_an_honest_peer() {
    let env = LocalEnv::up(3);
    let dirs = dirs();
    let file = dirs.root.join("rot.parquet");
    make_parquet(&["sized", file.to_str().unwrap(), "40", "2000"]);
    // C asks B first for every other part.
    let [a, mut b, mut c] = specs(&env, &dirs, [&[1, 2], &[0, 2], &[1, 0]]);
    let author = a.public_key();
    b.extra = subscribe_toml(&author, &["datasets.>"], "DATASETS");
    c.extra = subscribe_toml(&author, &["datasets.>"], "DATASETS");
    let [_node_a, _node_b] = start_healthy([&a, &b]);
    import(&env.clusters[0], &file, "rot");
    let got = announcements(&env.clusters[1], 1);
    let key = common::s3_key_of(got[0].0["location"].as_str().unwrap());

    // Rot in B's S3: one byte in every MiB of its copy.
    common::damage_object(&env.clusters[1], &key, |bytes| {
        for at in (1000..bytes.len()).step_by(1 << 20) {
            bytes[at] ^= 0x40;
        }
    });

    let node_c = RhioNode::start(c.clone());
    node_c.wait_http();
    let got = announcements(&env.clusters[2], 1);
    assert_copy(&env.clusters[2], &got[0].0, &file);
    let corrupt = metric(&node_c, "rhio_replication_corrupt_ranges_total");
    assert!(corrupt >= 1.0, "C never noticed B's rotten bytes");
    assert!(
        node_c.log().contains("does not verify"),
        "the log names the peer that sent corrupt data"
    );
}

#[test]
fn a_receiver_killed_mid_transfer_resumes_and_refetches_little() {
    let env = LocalEnv::up(2);
    let dirs = dirs();
    let file = dirs.root.join("big.parquet");
    make_parquet(&["sized", file.to_str().unwrap(), "200", "4000"]);
    let file_len = std::fs::metadata(&file).unwrap().len();
    let [a, mut b] = specs(&env, &dirs, [&[1], &[0]]);
    // A kill loses at most the parts in flight: 2 x 8 MiB is under 8% of this file.
    b.extra = subscribe_toml(&a.public_key(), &["datasets.>"], "DATASETS")
        + "\n[replication]\nparts_in_flight = 2\n";
    let [node_a, mut node_b] = start_healthy([&a, &b]);
    import(&env.clusters[0], &file, "big");

    // Kill B (SIGKILL) once a few parts are in S3 and the transfer is still running.
    let (done, total) = wait_for("a transfer with parts done", WAIT, || {
        let (_, health) = node_b.health()?;
        let transfer = health["datasets"]["transfers"].as_array()?.first()?.clone();
        let done = transfer["parts_done"].as_u64()?;
        (done >= 6).then(|| (done, transfer["parts_total"].as_u64().unwrap()))
    });
    node_b.kill();
    assert!(done < total, "the transfer finished before the kill");
    let served_before = metric(&node_a, "rhio_blob_bytes_served_total");

    let node_b = RhioNode::start(b.clone());
    let got = announcements(&env.clusters[1], 1);
    assert_copy(&env.clusters[1], &got[0].0, &file);
    let served = metric(&node_a, "rhio_blob_bytes_served_total");
    let refetched = served - file_len as f64;
    println!(
        "killed at {done}/{total} parts; A served {served_before} bytes before, {served} in all for a {file_len}-byte file ({:.2}% refetched)",
        refetched * 100.0 / file_len as f64
    );
    assert!(
        served <= file_len as f64 * 1.10,
        "A served {served} bytes for a {file_len}-byte file"
    );
    let (_, health) = node_b.health().unwrap();
    assert!(
        health["datasets"]["transfers"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn messages_are_routed_while_a_dataset_replicates() {
    let env = LocalEnv::up(2);
    let dirs = dirs();
    let file = dirs.root.join("big.parquet");
    make_parquet(&["sized", file.to_str().unwrap(), "200", "4000"]);
    let [mut a, mut b] = specs(&env, &dirs, [&[1], &[0]]);
    a.extra = publish_toml(&["announcements.>"], "ANNOUNCEMENTS");
    // One part at a time: the transfer takes long enough to route messages beside it.
    b.extra = subscribe_toml(&a.public_key(), &["announcements.>"], "ANNOUNCEMENTS")
        + &subscribe_toml(&a.public_key(), &["datasets.>"], "DATASETS")
        + "\n[replication]\nparts_in_flight = 1\n";
    let [_node_a, node_b] = start_healthy([&a, &b]);
    import(&env.clusters[0], &file, "big");
    // Moving bytes already (a transfer that is only planned would prove no overlap).
    wait_for("a transfer in progress", WAIT, || {
        let (_, health) = node_b.health()?;
        let transfer = health["datasets"]["transfers"].as_array()?.first()?.clone();
        (transfer["bytes_fetched"].as_u64()? > 0).then_some(())
    });
    for i in 0..20 {
        runtime().block_on(common::js_publish(
            &env.clusters[0].nats_url,
            [(
                format!("announcements.tick.{i}"),
                async_nats::HeaderMap::new(),
                b"tick".to_vec(),
            )],
        ));
    }
    runtime().block_on(stream_messages(
        &env.clusters[1].nats_url,
        "ANNOUNCEMENTS",
        20,
        WAIT,
    ));
    // All 20 messages arrived while the 200 MiB transfer was still running.
    let (_, health) = node_b.health().unwrap();
    let transfers = health["datasets"]["transfers"].as_array().unwrap();
    assert_eq!(transfers.len(), 1, "{health}");
    assert!(
        transfers[0]["parts_done"].as_u64().unwrap()
            < transfers[0]["parts_total"].as_u64().unwrap()
    );
    assert!(transfers[0]["bytes_fetched"].as_u64().unwrap() > 0);
    assert_eq!(transfers[0]["blobs_local"], 0);
    assert!(transfers[0]["blobs_remote"].as_u64().unwrap() > 50);
    let got = announcements(&env.clusters[1], 1);
    assert_copy(&env.clusters[1], &got[0].0, &file);
}

/// B subscribes to A's dataset "public" only. Replication decides per stored operation, in the
/// order B stores them (one loop over the store's events): so once "public", stored after
/// "private", has replicated, the decision about "private" has been made, and it shows as no
/// object, no manifest and no second version in B.
#[test]
fn datasets_of_an_author_are_not_replicated_without_a_matching_subscription() {
    let env = LocalEnv::up(2);
    let dirs = dirs();
    let private = dirs.root.join("private.parquet");
    make_parquet(&["sized", private.to_str().unwrap(), "4", "500"]);
    let public = dirs.root.join("public.parquet");
    make_parquet(&["sized", public.to_str().unwrap(), "2", "500"]);
    let [a, mut b] = specs(&env, &dirs, [&[1], &[0]]);
    b.extra = subscribe_toml(&a.public_key(), &["datasets.public"], "DATASETS");
    let [_node_a, node_b] = start_healthy([&a, &b]);
    import(&env.clusters[0], &private, "private");
    // B stores (relays) A's private manifest: every member relays every member's operations.
    wait_for("B stored the private manifest", WAIT, || {
        (common::metric_present(&node_b, "rhio_operations_received_total")? >= 1.0).then_some(())
    });
    import(&env.clusters[0], &public, "public");
    let got = announcements(&env.clusters[1], 1);
    assert_eq!(
        got.len(),
        1,
        "only the subscribed dataset is announced in B"
    );
    assert_eq!(got[0].0["dataset"], "public");
    assert_copy(&env.clusters[1], &got[0].0, &public);
    assert!(s3_keys(&env.clusters[1], "datasets/private").is_empty());
    assert!(s3_keys(&env.clusters[1], ".rhio/manifests/private").is_empty());
    // A transfer of "private", had one been decided, would have started before "public"'s and
    // be listed here still (or be finished, and announced above).
    let (_, health) = node_b.health().unwrap();
    assert_eq!(
        health["datasets"]["transfers"],
        serde_json::json!([]),
        "{health}"
    );
    assert_eq!(
        health["datasets"]["failed"],
        serde_json::json!([]),
        "{health}"
    );
    assert_eq!(
        common::metric_present(&node_b, "rhio_replication_versions_total{outcome=\"done\"}"),
        Some(1.0)
    );
}

/// Stops the S3 server `service` (`s3-a`: the serving cluster's, `s3-b`: the receiving
/// cluster's) for 20 s in the middle of a replication A -> B: the transfer pauses, resumes when
/// S3 is back, and the version arrives byte-identical, announced once.
fn s3_outage_mid_replication(service: &str) {
    let env = LocalEnv::up(2);
    let dirs = dirs();
    let file = dirs.root.join("outage.parquet");
    make_parquet(&["sized", file.to_str().unwrap(), "120", "4000"]);
    let [a, mut b] = specs(&env, &dirs, [&[1], &[0]]);
    b.extra = subscribe_toml(&a.public_key(), &["datasets.>"], "DATASETS")
        + "\n[replication]\nparts_in_flight = 1\n";
    let [_node_a, node_b] = start_healthy([&a, &b]);
    import(&env.clusters[0], &file, "outage");
    let (done, total) = wait_for("a transfer with parts done", WAIT, || {
        let (_, health) = node_b.health()?;
        let transfer = health["datasets"]["transfers"].as_array()?.first()?.clone();
        let done = transfer["parts_done"].as_u64()?;
        (done >= 2).then(|| (done, transfer["parts_total"].as_u64().unwrap()))
    });
    env.stop(service);
    std::thread::sleep(Duration::from_secs(20));
    env.start(service);
    let back = Instant::now();
    let got = announcements(&env.clusters[1], 1);
    println!(
        "fault {service} down 20 s at part {done}/{total}: recovered {:.1} s after S3 returned, 0 bytes lost",
        back.elapsed().as_secs_f64()
    );
    assert!(done < total, "the transfer finished before the outage");
    assert_copy(&env.clusters[1], &got[0].0, &file);
    // Announced once: B's outbox announces in the order versions became available, so a repeat
    // of "outage" would be in the stream before a later dataset's announcement.
    let barrier = dirs.root.join("after-outage.parquet");
    make_parquet(&["sized", barrier.to_str().unwrap(), "1", "500"]);
    import(&env.clusters[0], &barrier, "after-outage");
    let datasets: Vec<Value> = announcements(&env.clusters[1], 2)
        .into_iter()
        .map(|(summary, _)| summary["dataset"].clone())
        .collect();
    assert_eq!(datasets, ["outage", "after-outage"], "announced once");
    let (code, health) = node_b.health().unwrap();
    assert_eq!(code, 200, "{health}");
    assert_eq!(health["datasets"]["announcements_pending"], 0, "{health}");
}

#[test]
fn the_receivers_s3_down_for_20_s_mid_replication_loses_nothing() {
    s3_outage_mid_replication("s3-b");
}

#[test]
fn the_serving_clusters_s3_down_for_20_s_mid_transfer_loses_nothing() {
    s3_outage_mid_replication("s3-a");
}

/// Fault: the serving node dies (SIGKILL) in the middle of a transfer while a third cluster
/// also holds the dataset: the transfer completes from the other holder.
#[test]
fn a_serving_node_killed_mid_transfer_is_replaced_by_another_holder() {
    let env = LocalEnv::up(3);
    let dirs = dirs();
    let file = dirs.root.join("holders.parquet");
    make_parquet(&["sized", file.to_str().unwrap(), "160", "4000"]);
    // A imports, C replicates first; then B (knowing A and C) replicates while A is killed.
    let [a, mut b, mut c] = specs(&env, &dirs, [&[1, 2], &[0, 2], &[0, 1]]);
    let datasets = subscribe_toml(&a.public_key(), &["datasets.>"], "DATASETS");
    c.extra = datasets.clone();
    b.extra = datasets + "\n[replication]\nparts_in_flight = 1\n";
    let [mut node_a, node_c] = start_healthy([&a, &c]);
    import(&env.clusters[0], &file, "holders");
    let at_c = announcements(&env.clusters[2], 1);
    assert_copy(&env.clusters[2], &at_c[0].0, &file);
    let [node_b] = start_healthy([&b]);
    let (done, total) = wait_for("a transfer with parts done", WAIT, || {
        let (_, health) = node_b.health()?;
        let transfer = health["datasets"]["transfers"].as_array()?.first()?.clone();
        let done = transfer["parts_done"].as_u64()?;
        (done >= 2).then(|| (done, transfer["parts_total"].as_u64().unwrap()))
    });
    node_a.signal(libc::SIGKILL);
    node_a.wait_exit(Duration::from_secs(10));
    let killed = Instant::now();
    let got = announcements(&env.clusters[1], 1);
    println!(
        "fault serving node killed at part {done}/{total}: completed from the other holder {:.1} s later",
        killed.elapsed().as_secs_f64()
    );
    assert!(done < total, "the transfer finished before the kill");
    assert_copy(&env.clusters[1], &got[0].0, &file);
    assert!(metric(&node_c, "rhio_blob_bytes_served_total") > 0.0);
}
