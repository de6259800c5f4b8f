//! `rhio.import` against real NATS and S3: files written by pyarrow, every error case, repeats,
//! concurrency and S3 sources.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{LocalEnv, NodeSpec, RhioNode, make_parquet, runtime, s3_client};
use rhio_core::manifest::DatasetManifest;
use serde_json::Value;

struct Setup {
    env: LocalEnv,
    _dir: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    node: RhioNode,
    rt: tokio::runtime::Runtime,
}

fn setup() -> Setup {
    let env = LocalEnv::up(1);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    let outside = dir.path().join("private");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let mut spec = NodeSpec::for_cluster(&env.clusters[0], &dir.path().join("node"));
    spec.import_roots = vec![root.clone()];
    let node = RhioNode::start(spec);
    node.wait_healthy();
    Setup {
        env,
        _dir: dir,
        root,
        outside,
        node,
        rt: runtime(),
    }
}

impl Setup {
    fn import(&self, path: &str, dataset: Option<&str>) -> Value {
        self.rt.block_on(common::rhio_import(
            &self.env.clusters[0].nats_url,
            path,
            dataset,
        ))
    }

    fn error_code(&self, path: &str) -> String {
        let answer = self.import(path, Some("errors"));
        assert_eq!(answer["ok"], false, "{answer}");
        answer["error"]["code"].as_str().unwrap().to_string()
    }

    fn object(&self, key: &str) -> Vec<u8> {
        self.rt
            .block_on(common::s3_object(&self.env.clusters[0], key))
    }
}

/// Checks the stored object and manifest against the original file.
fn check_stored(setup: &Setup, answer: &Value, original: &[u8]) {
    let dataset = answer["dataset"].as_str().unwrap();
    let version = answer["version"].as_u64().unwrap();
    let object = setup.object(&format!("datasets/{dataset}/v{version}.parquet"));
    assert!(
        object == original,
        "stored object differs from the original"
    );
    assert_eq!(
        answer["file_hash"],
        blake3::hash(original).to_hex().as_str()
    );
    let manifest = DatasetManifest::decode(
        &setup.object(&format!(".rhio/manifests/{dataset}/v{version}.cbor")),
    )
    .unwrap();
    assert_eq!(manifest.file_size, original.len() as u64);
    assert_eq!(
        manifest.blobs.len() as u64,
        answer["row_groups"].as_u64().unwrap() + 1
    );
    for blob in &manifest.blobs {
        let bytes = &original[blob.offset as usize..(blob.offset + blob.length) as usize];
        assert_eq!(blob.hash, blake3::hash(bytes).to_hex().as_str());
        // The stored outboard is the blob's bao tree (16 KiB groups) with the same root.
        let stored = setup.object(&format!(".rhio/outboards/{}.obao4", blob.hash));
        let mut expected = Vec::new();
        let root = bao_tree::io::sync::outboard_post_order(
            bytes,
            bao_tree::BaoTree::new(blob.length, bao_tree::BlockSize::from_chunk_log(4)),
            &mut expected,
        )
        .unwrap();
        assert_eq!(root.to_hex().as_str(), blob.hash);
        assert!(stored == expected, "outboard of blob at {}", blob.offset);
    }
}

/// Bytes under rhio's hidden prefix, against the Parquet bytes stored.
fn sidecar_overhead(setup: &Setup) -> f64 {
    setup.rt.block_on(async {
        let s3 = s3_client(&setup.env.clusters[0]);
        let size = |prefix: &'static str| {
            let s3 = s3.clone();
            async move {
                let listed = s3
                    .list_objects_v2()
                    .bucket("rhio")
                    .prefix(prefix)
                    .send()
                    .await
                    .unwrap();
                listed
                    .contents()
                    .iter()
                    .map(|o| o.size().unwrap_or(0) as f64)
                    .sum::<f64>()
            }
        };
        size(".rhio/").await / size("datasets/").await
    })
}

#[test]
fn imports_a_large_pyarrow_file_and_answers_repeats_with_the_existing_version() {
    let setup = setup();
    let path = setup.root.join("weather.parquet");
    make_parquet(&["sized", path.to_str().unwrap(), "110", "7040"]);
    let original = std::fs::read(&path).unwrap();
    assert!(original.len() > 100 << 20);

    let answer = setup.import(path.to_str().unwrap(), None);
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["dataset"], "weather");
    assert_eq!(answer["version"], 0);
    assert_eq!(answer["subject"], "datasets.weather");
    assert_eq!(answer["row_groups"], 16);
    assert_eq!(answer["rows"], 110 * 1024);
    assert_eq!(answer["bytes"], original.len());
    assert_eq!(answer["location"], "s3://rhio/datasets/weather/v0.parquet");
    assert_eq!(answer["author"], setup.node.spec.public_key().as_str());
    check_stored(&setup, &answer, &original);
    let overhead = sidecar_overhead(&setup);
    eprintln!("sidecar overhead: {:.3}%", overhead * 100.0);
    assert!(overhead < 0.02, "sidecars add {:.2}%", overhead * 100.0);

    let again = setup.import(path.to_str().unwrap(), None);
    assert_eq!(again["version"], 0, "{again}");
    assert_eq!(again["existing"], true);
    assert_eq!(again["operation"], answer["operation"]);
}

#[test]
fn every_bad_input_gets_its_error_code_and_the_node_keeps_serving() {
    let setup = setup();
    let root = &setup.root;
    make_parquet(&[
        "sized",
        root.join("good.parquet").to_str().unwrap(),
        "2",
        "512",
    ]);
    let good = std::fs::read(root.join("good.parquet")).unwrap();
    std::fs::write(root.join("empty.parquet"), b"").unwrap();
    std::fs::write(root.join("table.csv"), b"a,b,c\n1,2,3\n4,5,6\n7,8,9\n").unwrap();
    std::fs::write(root.join("truncated.parquet"), &good[..good.len() - 100]).unwrap();
    let mut corrupt = good.clone();
    let n = corrupt.len();
    let meta_len = u32::from_le_bytes(corrupt[n - 8..n - 4].try_into().unwrap()) as usize;
    for byte in &mut corrupt[n - 8 - meta_len..n - 8] {
        *byte = 0xee;
    }
    std::fs::write(root.join("corrupt.parquet"), &corrupt).unwrap();
    std::fs::create_dir(root.join("folder")).unwrap();
    std::fs::write(setup.outside.join("secret.parquet"), &good).unwrap();
    std::os::unix::fs::symlink(
        setup.outside.join("secret.parquet"),
        root.join("link.parquet"),
    )
    .unwrap();

    let p = |name: &str| root.join(name).to_str().unwrap().to_string();
    assert_eq!(setup.error_code(&p("missing.parquet")), "not_found");
    assert_eq!(setup.error_code(&p("folder")), "not_a_file");
    assert_eq!(setup.error_code(&p("empty.parquet")), "not_parquet");
    assert_eq!(setup.error_code(&p("table.csv")), "not_parquet");
    assert_eq!(setup.error_code(&p("truncated.parquet")), "not_parquet");
    assert_eq!(setup.error_code(&p("corrupt.parquet")), "corrupt_parquet");
    let outside = setup.outside.join("secret.parquet");
    assert_eq!(
        setup.error_code(outside.to_str().unwrap()),
        "forbidden_path"
    );
    let dotdot = format!("{}/../private/secret.parquet", root.display());
    assert_eq!(setup.error_code(&dotdot), "forbidden_path");
    assert_eq!(setup.error_code(&p("link.parquet")), "forbidden_path");
    assert_eq!(setup.error_code("relative/file.parquet"), "bad_request");
    assert_eq!(
        setup.error_code("s3://another-bucket/x.parquet"),
        "forbidden_path"
    );
    assert_eq!(
        setup.error_code("s3://rhio/nothing/here.parquet"),
        "not_found"
    );

    // Nothing half-written became visible.
    let listed = setup.rt.block_on(async {
        s3_client(&setup.env.clusters[0])
            .list_objects_v2()
            .bucket("rhio")
            .prefix("datasets/")
            .send()
            .await
            .unwrap()
            .key_count()
            .unwrap_or(0)
    });
    assert_eq!(listed, 0);

    // S3 down: a clear error, then the node recovers and imports.
    setup.env.stop("s3-a");
    assert_eq!(setup.error_code(&p("good.parquet")), "storage_unavailable");
    setup.env.start("s3-a");
    setup.node.wait_healthy();
    let answer = setup.import(&p("good.parquet"), None);
    assert_eq!(answer["ok"], true, "{answer}");
    check_stored(&setup, &answer, &good);
}

#[test]
fn concurrent_imports_and_imports_from_s3() {
    let setup = setup();
    let a = setup.root.join("alpha.parquet");
    let b = setup.root.join("beta.parquet");
    make_parquet(&["sized", a.to_str().unwrap(), "12", "1024"]);
    make_parquet(&["sized", b.to_str().unwrap(), "9", "1024"]);
    let (alpha, beta) = std::thread::scope(|scope| {
        let one = scope.spawn(|| setup.import(a.to_str().unwrap(), None));
        let two = scope.spawn(|| setup.import(b.to_str().unwrap(), None));
        (one.join().unwrap(), two.join().unwrap())
    });
    assert_eq!(alpha["ok"], true, "{alpha}");
    assert_eq!(beta["ok"], true, "{beta}");
    check_stored(&setup, &alpha, &std::fs::read(&a).unwrap());
    check_stored(&setup, &beta, &std::fs::read(&b).unwrap());

    // A file already in the cluster's bucket.
    let original = std::fs::read(&a).unwrap();
    setup.rt.block_on(async {
        s3_client(&setup.env.clusters[0])
            .put_object()
            .bucket("rhio")
            .key("incoming/gamma.parquet")
            .body(original.clone().into())
            .send()
            .await
            .unwrap();
    });
    let gamma = setup.import("s3://rhio/incoming/gamma.parquet", None);
    assert_eq!(gamma["ok"], true, "{gamma}");
    assert_eq!(gamma["dataset"], "gamma");
    check_stored(&setup, &gamma, &original);

    // The same dataset name again with different bytes: a new version.
    let next = setup.import(b.to_str().unwrap(), Some("alpha"));
    assert_eq!(next["version"], 1, "{next}");
    assert_eq!(next["existing"], false);
}

/// Creates the durable import queue, puts a request for `file` in it and subscribes to the
/// results: returns the client and the results subscription.
fn queue_import(
    rt: &tokio::runtime::Runtime,
    nats_url: &str,
    file: &std::path::Path,
) -> (async_nats::Client, async_nats::Subscriber) {
    queue_request(rt, nats_url, file.to_str().unwrap())
}

/// [`queue_import`] of any request body (`s3://...`, JSON).
fn queue_request(
    rt: &tokio::runtime::Runtime,
    nats_url: &str,
    request: &str,
) -> (async_nats::Client, async_nats::Subscriber) {
    rt.block_on(async {
        let client = async_nats::connect(nats_url).await.unwrap();
        let js = async_nats::jetstream::new(client.clone());
        js.get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "RHIO_IMPORTS".into(),
            subjects: vec!["rhio.import.queue".into()],
            retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .unwrap();
        let results = client.subscribe("rhio.import.results").await.unwrap();
        client.flush().await.unwrap();
        js.publish("rhio.import.queue", request.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
        (client, results)
    })
}

/// The next import result, as JSON.
fn next_result(rt: &tokio::runtime::Runtime, results: &mut async_nats::Subscriber) -> Value {
    use futures::StreamExt;
    rt.block_on(async {
        let message = tokio::time::timeout(Duration::from_secs(180), results.next())
            .await
            .expect("an import result")
            .unwrap();
        serde_json::from_slice(&message.payload).unwrap()
    })
}

#[test]
fn queued_imports_survive_a_node_that_was_down() {
    let env = LocalEnv::up(1);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    std::fs::create_dir_all(&root).unwrap();
    let file = root.join("queued.parquet");
    make_parquet(&["sized", file.to_str().unwrap(), "6", "1024"]);
    let rt = runtime();
    let nats_url = env.clusters[0].nats_url.clone();
    // The request is stored in JetStream while no node runs.
    let mut results = queue_import(&rt, &nats_url, &file);

    let mut spec = NodeSpec::for_cluster(&env.clusters[0], &dir.path().join("node"));
    spec.import_roots = vec![root.clone()];
    let node = RhioNode::start(spec);
    node.wait_healthy();
    let outcome = next_result(&rt, &mut results.1);
    assert_eq!(outcome["ok"], true, "{outcome}");
    assert_eq!(outcome["dataset"], "queued");
    assert_eq!(outcome["request"], file.to_str().unwrap());
    // Acked after the import: the work queue is empty.
    wait_queue_empty(&rt, &nats_url);
}

/// Waits until the durable import queue holds no request (an ended request is acked and
/// removed; one that is still queued would be delivered again).
fn wait_queue_empty(rt: &tokio::runtime::Runtime, nats_url: &str) {
    common::wait_for(
        "the import queue to be empty",
        Duration::from_secs(10),
        || (rt.block_on(common::stream_count(nats_url, "RHIO_IMPORTS")) == 0).then_some(()),
    );
}

/// Fault: S3 fails a queued import. A transient failure (S3 down) is retried up to
/// `import.max_attempts` and then leaves the queue as a dead letter; a permanent one (S3 answers
/// 403 because the node's credentials are refused) ends after one attempt with its code, instead
/// of being retried for good.
#[test]
fn queued_imports_end_on_permanent_s3_errors_and_dead_letter_after_max_attempts() {
    let env = LocalEnv::up(1);
    let cluster = &env.clusters[0];
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let file = dir.path().join("refused.parquet");
    make_parquet(&["sized", file.to_str().unwrap(), "2", "1024"]);
    let key = "incoming/refused.parquet";
    rt.block_on(async {
        s3_client(cluster)
            .put_object()
            .bucket(&cluster.s3_bucket)
            .key(key)
            .body(std::fs::read(&file).unwrap().into())
            .send()
            .await
            .unwrap();
    });
    let spec = NodeSpec::for_cluster(cluster, &dir.path().join("node"));
    let node = RhioNode::start_with_sets(spec, ["import.max_attempts=2"]);
    node.wait_healthy();
    let request = format!("s3://{}/{key}", cluster.s3_bucket);

    // Transient: S3 is down. Two attempts, the second one the dead letter.
    env.stop(&format!("s3-{}", cluster.name));
    let (_client, mut results) = queue_request(&rt, &cluster.nats_url, &request);
    let first = next_result(&rt, &mut results);
    assert_eq!(first["ok"], false, "{first}");
    assert_eq!(first["error"]["code"], "storage_unavailable", "{first}");
    assert_eq!(first["attempt"], 1, "{first}");
    assert_eq!(first["will_retry"], true, "{first}");
    assert_eq!(first["dead_letter"], false, "{first}");
    let last = next_result(&rt, &mut results);
    assert_eq!(last["error"]["code"], "storage_unavailable", "{last}");
    assert_eq!(last["attempt"], 2, "{last}");
    assert_eq!(last["will_retry"], false, "{last}");
    assert_eq!(last["dead_letter"], true, "{last}");
    wait_queue_empty(&rt, &cluster.nats_url);

    // Permanent: the S3 server answers again, on the same port and data, but no longer accepts
    // the node's credentials (403 on every call).
    if std::env::var("RHIODEV_S3").is_ok_and(|backend| backend != "s3s-fs") {
        eprintln!("the 403 half of this test needs s3s-fs (credentials set at its start)");
        return;
    }
    let _refusing = RefusingS3::start(&env, cluster);
    let (_client, mut results) = queue_request(&rt, &cluster.nats_url, &request);
    let refused = next_result(&rt, &mut results);
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["error"]["code"], "storage_denied", "{refused}");
    assert_eq!(refused["attempt"], 1, "{refused}");
    assert_eq!(refused["will_retry"], false, "{refused}");
    assert_eq!(refused["dead_letter"], false, "{refused}");
    // Ended in that one attempt: nothing is left to deliver again.
    wait_queue_empty(&rt, &cluster.nats_url);
    // The same request over rhio.import answers the same code at once.
    let answer = rt.block_on(common::rhio_import(&cluster.nats_url, &request, None));
    assert_eq!(answer["error"]["code"], "storage_denied", "{answer}");
    assert!(node.health().is_some(), "the node keeps running");
}

/// An s3s-fs on a cluster's S3 port and data that accepts other credentials than the node's.
struct RefusingS3(std::process::Child);

impl RefusingS3 {
    fn start(env: &LocalEnv, cluster: &common::Cluster) -> Self {
        let binary = std::env::var("RHIODEV_S3S_FS")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                let cache = std::env::var("RHIODEV_CACHE")
                    .map(PathBuf::from)
                    .unwrap_or_else(|_| {
                        PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/rhio")
                    });
                cache.join("s3s-fs/bin/s3s-fs")
            });
        let port = cluster
            .s3_endpoint
            .rsplit(':')
            .next()
            .unwrap()
            .trim_end_matches('/');
        let data = env.s3_object_path(0, "");
        let data = data.parent().unwrap();
        let child = std::process::Command::new(binary)
            .args(["--host", "127.0.0.1", "--port", port])
            .args([
                "--access-key",
                "someone-else",
                "--secret-key",
                "not-the-nodes-secret",
            ])
            .arg(data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("s3s-fs starts");
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        common::wait_for("the refusing S3 to listen", Duration::from_secs(10), || {
            std::net::TcpStream::connect(addr).ok()
        });
        Self(child)
    }
}

impl Drop for RefusingS3 {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fault: the node is killed (SIGKILL) in the middle of a queued import. The request stays in
/// the work queue, the restarted node imports it, and the multipart upload the crash abandoned
/// is aborted.
#[test]
fn a_queued_import_survives_a_sigkill_mid_import_and_its_upload_is_swept() {
    use futures::StreamExt;
    let env = LocalEnv::up(1);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    std::fs::create_dir_all(&root).unwrap();
    let file = root.join("killed.parquet");
    make_parquet(&["sized", file.to_str().unwrap(), "160", "4000"]);
    let rt = runtime();
    let nats_url = env.clusters[0].nats_url.clone();
    let mut progress = rt.block_on(async {
        let client = async_nats::connect(&nats_url).await.unwrap();
        let progress = client.subscribe("rhio.progress.killed").await.unwrap();
        client.flush().await.unwrap();
        (client, progress)
    });
    let mut results = queue_import(&rt, &nats_url, &file);
    let mut spec = NodeSpec::for_cluster(&env.clusters[0], &dir.path().join("node"));
    spec.import_roots = vec![root.clone()];
    let mut node = RhioNode::start(spec.clone());
    // Killed once the import reported progress (64 MiB in) and before it finished.
    rt.block_on(async {
        let event = tokio::time::timeout(Duration::from_secs(120), progress.1.next())
            .await
            .expect("a progress event")
            .unwrap();
        let event: Value = serde_json::from_slice(&event.payload).unwrap();
        assert!(
            event["bytes_done"].as_u64() < event["bytes_total"].as_u64(),
            "{event}"
        );
    });
    node.signal(libc::SIGKILL);
    node.wait_exit(Duration::from_secs(10));
    let node = RhioNode::start(spec);
    let outcome = next_result(&rt, &mut results.1);
    assert_eq!(outcome["ok"], true, "{outcome}");
    assert_eq!(outcome["version"], 0, "{outcome}");
    let stored = rt.block_on(common::s3_object(
        &env.clusters[0],
        "datasets/killed/v0.parquet",
    ));
    assert!(blake3::hash(&stored) == blake3::hash(&std::fs::read(&file).unwrap()));
    wait_for_log(&node, "aborted the upload of an import a crash left behind");
}

fn wait_for_log(node: &RhioNode, text: &str) {
    common::wait_for(text, Duration::from_secs(30), || {
        node.log().contains(text).then_some(())
    });
}
