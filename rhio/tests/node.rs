//! A single node against real NATS (JetStream) and S3 servers started by `dev/localenv.py`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{LocalEnv, NodeSpec, RhioNode, http_get, run_rhio, runtime, wait_for};

#[test]
fn serves_health_metrics_and_status_then_stops_on_sigint() {
    let env = LocalEnv::up(1);
    let dir = tempfile::tempdir().unwrap();
    let mut node = RhioNode::start(NodeSpec::for_cluster(&env.clusters[0], dir.path()));
    let health = node.wait_healthy();

    assert_eq!(health["status"], "ok");
    assert_eq!(health["nats"]["connected"], true);
    assert_eq!(health["nats"]["state"], "connected");
    assert_eq!(health["s3"]["reachable"], true);
    assert_eq!(health["s3"]["bucket"], "rhio");
    assert_eq!(health["peers"]["known"], 0);

    // The key file was created with mode 0600 and is the identity the node reports.
    let key_path = dir.path().join("private.key");
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let public_key = node.spec.public_key();
    assert_eq!(health["public_key"], public_key.as_str());
    assert!(
        node.log()
            .contains(&format!("rhio public key: {public_key}"))
    );

    // rhio.status over NATS answers with the same document.
    let status = runtime().block_on(async {
        let client = rhio_client::Client::connect(&env.clusters[0].nats_url)
            .await
            .unwrap();
        client.status().await.unwrap()
    });
    // Typed: the client reads the node's own document type.
    assert_eq!(status.public_key.to_hex(), public_key);
    assert!(status.is_ok(), "{status:?}");
    assert_eq!(
        status.nats.state,
        rhio_core::api::status::NatsState::Connected
    );

    let (code, metrics) = http_get(node.spec.http_addr(), "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("rhio_nats_connected 1"), "{metrics}");
    assert!(metrics.contains("rhio_s3_reachable 1"), "{metrics}");
    assert!(
        metrics.contains("rhio_status_requests_total 1"),
        "{metrics}"
    );
    assert_eq!(
        http_get(node.spec.http_addr(), "/health/live").unwrap().0,
        200
    );
    assert_eq!(http_get(node.spec.http_addr(), "/nope").unwrap().0, 404);

    node.signal(libc::SIGINT);
    let status = node.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
}

/// Clients that connect to the HTTP port and stall (more of them than the node serves at once)
/// are dropped after the header-read timeout, and `/health` is answered meanwhile.
#[test]
fn stalled_http_clients_do_not_starve_health() {
    use std::io::{Read, Write};
    let env = LocalEnv::up(1);
    let dir = tempfile::tempdir().unwrap();
    let node = RhioNode::start(NodeSpec::for_cluster(&env.clusters[0], dir.path()));
    node.wait_healthy();
    let addr = node.spec.http_addr();
    // Twice the connection limit (64), each with half a request line and no end of headers.
    let mut stalled: Vec<std::net::TcpStream> = (0..128)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream
                .write_all(b"GET /health HTTP/1.1\r\nHost: x")
                .unwrap();
            stream
        })
        .collect();
    // Answered although every slot was taken by a stalled client when it was sent.
    let (code, _) = wait_for(
        "GET /health beside stalled clients",
        Duration::from_secs(30),
        || http_get(addr, "/health"),
    );
    assert_eq!(code, 200);
    // The stalled clients were dropped by the server (end of stream, or reset), not kept.
    for stream in &mut stalled {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buf = Vec::new();
        match stream.read_to_end(&mut buf) {
            Ok(_) => {}
            Err(err) => assert_ne!(
                err.kind(),
                std::io::ErrorKind::WouldBlock,
                "a stalled client is still connected after 30 s"
            ),
        }
    }
}

#[test]
fn warns_when_a_stream_captures_a_service_subject() {
    let env = LocalEnv::up(1);
    runtime().block_on(common::create_stream(
        &env.clusters[0].nats_url,
        "GREEDY",
        &["rhio.>"],
    ));
    let dir = tempfile::tempdir().unwrap();
    let node = RhioNode::start(NodeSpec::for_cluster(&env.clusters[0], dir.path()));
    node.wait_http();
    wait_for("a warning about GREEDY", Duration::from_secs(20), || {
        let log = node.log();
        (log.contains("captures a rhio service subject") && log.contains("GREEDY")).then_some(())
    });
}

#[test]
fn starts_while_nats_is_down_and_connects_when_it_comes_up() {
    let env = LocalEnv::up(1);
    env.stop("nats-a");
    let dir = tempfile::tempdir().unwrap();
    let node = RhioNode::start(NodeSpec::for_cluster(&env.clusters[0], dir.path()));

    let (code, health) = wait_for("degraded health", Duration::from_secs(30), || node.health());
    assert_eq!(code, 503);
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["nats"]["connected"], false);
    assert_eq!(health["s3"]["reachable"], true);

    env.start("nats-a");
    let health = node.wait_healthy();
    assert_eq!(health["nats"]["connected"], true);
    // The status service subscribed while NATS was down and answers now.
    let status = runtime().block_on(async {
        let client = rhio_client::Client::connect(&env.clusters[0].nats_url)
            .await
            .unwrap();
        wait_for_status(&client).await
    });
    assert_eq!(status["nats"]["connected"], true);
}

async fn wait_for_status(client: &rhio_client::Client) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match client.status_json().await {
            Ok(status) => return status,
            Err(err) if tokio::time::Instant::now() < deadline => {
                let _ = err;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => panic!("rhio.status never answered: {err}"),
        }
    }
}

#[test]
fn s3_down_at_start_is_degraded_then_recovers() {
    let env = LocalEnv::up(1);
    env.stop("s3-a");
    let dir = tempfile::tempdir().unwrap();
    let node = RhioNode::start(NodeSpec::for_cluster(&env.clusters[0], dir.path()));
    let (code, health) = wait_for("degraded health", Duration::from_secs(30), || node.health());
    assert_eq!(code, 503);
    assert_eq!(health["s3"]["reachable"], false);
    assert!(
        health["s3"]["error"]
            .as_str()
            .unwrap()
            .contains("unavailable"),
        "{health}"
    );
    env.start("s3-a");
    let health = node.wait_healthy();
    assert_eq!(health["s3"]["error"], serde_json::Value::Null);
}

#[test]
fn missing_bucket_fails_at_start_unless_creation_is_enabled() {
    let env = LocalEnv::up(1);
    let dir = tempfile::tempdir().unwrap();
    let mut spec = NodeSpec::for_cluster(&env.clusters[0], dir.path());
    spec.s3_bucket = "not-there".into();
    let mut node = RhioNode::start(spec.clone());
    let status = node.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let log = node.log();
    assert!(log.contains("bucket \"not-there\" does not exist"), "{log}");
    assert!(log.contains("s3.create_bucket"), "{log}");

    spec.create_bucket = true;
    let node = RhioNode::start(spec);
    let health = node.wait_healthy();
    assert_eq!(health["s3"]["bucket"], "not-there");
    assert!(node.log().contains("created S3 bucket"));
}

#[test]
fn config_errors_fail_at_start_with_the_key_named() {
    let output = run_rhio(&["--set", "nats.endpiont=nats://x:4222"], &[]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("endpiont"), "{stderr}");

    let output = run_rhio(
        &["--print-config"],
        &[("RHIO_NETWORK__BIND_PORT", "notaport")],
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("bind_port"));

    let output = run_rhio(&["-c", "/nonexistent/rhio.toml"], &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/rhio.toml"));

    // Precedence through the real binary: file < environment < command line.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(
        &file,
        "[network]\nbind_port = 1111\nnetwork_id = \"file\"\n[s3]\nregion = \"file\"\n",
    )
    .unwrap();
    let output = run_rhio(
        &[
            "-c",
            file.to_str().unwrap(),
            "--bind-port",
            "3333",
            "--print-config",
        ],
        &[
            ("RHIO_NETWORK__BIND_PORT", "2222"),
            ("RHIO_NETWORK__NETWORK_ID", "env"),
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(printed.contains("bind_port = 3333"), "{printed}");
    assert!(printed.contains("network_id = \"env\""), "{printed}");
    assert!(printed.contains("region = \"file\""), "{printed}");
}

/// A NATS server of the local environment's build, started with authentication.
struct AuthNats {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl AuthNats {
    fn start(auth: &[&str]) -> Self {
        let cache = std::env::var_os("RHIODEV_CACHE")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/rhio")
            });
        let port = common::free_tcp_port();
        let dir = tempfile::tempdir().unwrap();
        let child = std::process::Command::new(cache.join("venv/bin/nats-server"))
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path())
            .args(auth)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server from dev/localenv.py install");
        let url = format!("nats://127.0.0.1:{port}");
        wait_for("NATS to listen", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Self {
            child,
            url,
            _dir: dir,
        }
    }
}

impl Drop for AuthNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn authenticates_to_nats_with_user_password_and_token() {
    let env = LocalEnv::up(1);
    for (server_auth, good, bad) in [
        (
            vec!["--user", "rhio", "--pass", "s3cret"],
            "\nnats.user=rhio\nnats.password=s3cret",
            "\nnats.user=rhio\nnats.password=wrong",
        ),
        (
            vec!["--auth", "t0ken"],
            "\nnats.token=t0ken",
            "\nnats.token=nope",
        ),
    ] {
        let nats = AuthNats::start(&server_auth);
        for (credentials, should_connect) in [(good, true), (bad, false)] {
            let dir = tempfile::tempdir().unwrap();
            let mut spec = NodeSpec::for_cluster(&env.clusters[0], dir.path());
            spec.nats_url = nats.url.clone();
            let node =
                RhioNode::start_with_sets(spec, credentials.lines().filter(|l| !l.is_empty()));
            if should_connect {
                let health = node.wait_healthy();
                assert_eq!(health["nats"]["connected"], true);
            } else {
                let (code, health) =
                    wait_for("degraded health", Duration::from_secs(30), || node.health());
                assert_eq!(code, 503);
                assert_eq!(health["nats"]["connected"], false);
                wait_for(
                    "an authorization error in the log",
                    Duration::from_secs(20),
                    || {
                        node.log()
                            .to_lowercase()
                            .contains("authorization")
                            .then_some(())
                    },
                );
            }
        }
    }
}
