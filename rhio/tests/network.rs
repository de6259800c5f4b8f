//! Nodes of two clusters (each with its own NATS and S3) finding each other over loopback QUIC.

mod common;

use std::time::Duration;

use common::{LocalEnv, NodeSpec, RhioNode, wait_for};

/// Two node specs in two clusters, each configured with the other as a known node.
fn pair(env: &LocalEnv, dirs: &[tempfile::TempDir; 2]) -> (NodeSpec, NodeSpec) {
    let mut a = NodeSpec::for_cluster(&env.clusters[0], dirs[0].path());
    let mut b = NodeSpec::for_cluster(&env.clusters[1], dirs[1].path());
    a.known_nodes.push((b.public_key(), b.quic_port));
    b.known_nodes.push((a.public_key(), a.quic_port));
    (a, b)
}

#[test]
fn two_clusters_connect_and_reconnect_after_a_restart() {
    let env = LocalEnv::up(2);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (spec_a, spec_b) = pair(&env, &dirs);
    let node_a = RhioNode::start(spec_a.clone());
    let mut node_b = RhioNode::start(spec_b.clone());

    // Connected as soon as a hello went either way; the round trip is known once A probed B.
    let health_a = wait_for(
        "A to measure its round trip to B",
        Duration::from_secs(30),
        || {
            node_a.health().map(|(_, body)| body).filter(|body| {
                body["peers"]["connected"] == 1 && body["peers"]["nodes"][0]["rtt_ms"].is_number()
            })
        },
    );
    let health_b = node_b.wait_peers_connected(1);
    let peer_of_a = &health_a["peers"]["nodes"][0];
    assert_eq!(peer_of_a["public_key"], spec_b.public_key().as_str());
    assert_eq!(peer_of_a["connected"], true);
    assert_eq!(
        health_b["peers"]["nodes"][0]["public_key"],
        spec_a.public_key().as_str()
    );
    assert_eq!(health_a["network"]["network_id"], "rhio-test");

    // B goes away: A notices and keeps trying.
    node_b.kill();
    let health_a = wait_for(
        "A to notice that B is gone",
        Duration::from_secs(30),
        || {
            node_a.health().map(|(_, body)| body).filter(|body| {
                body["peers"]["connected"] == 0
                    && body["peers"]["nodes"][0]["last_error"].is_string()
            })
        },
    );
    assert_eq!(health_a["peers"]["nodes"][0]["connected"], false);

    // B comes back with the same key and port: A reconnects without being told.
    let node_b = RhioNode::start(spec_b);
    node_b.wait_peers_connected(1);
    node_a.wait_peers_connected(1);
}

#[test]
fn nodes_of_different_networks_do_not_connect() {
    let env = LocalEnv::up(2);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (spec_a, mut spec_b) = pair(&env, &dirs);
    spec_b.network_id = "another-network".into();
    let node_a = RhioNode::start(spec_a);
    let node_b = RhioNode::start(spec_b);
    node_b.wait_http();

    // A has tried B several times and failed each time.
    let health = wait_for("failed probes", Duration::from_secs(30), || {
        node_a
            .health()
            .map(|(_, body)| body)
            .filter(|body| body["peers"]["nodes"][0]["last_error"].is_string())
    });
    assert_eq!(health["peers"]["connected"], 0);
    // Three more attempts, each refused: a connection would have shown in one of them.
    let first = health["peers"]["nodes"][0]["failures"].as_u64().unwrap();
    wait_for("three more failed probes", Duration::from_secs(30), || {
        let (_, body) = node_a.health()?;
        (body["peers"]["nodes"][0]["failures"].as_u64()? >= first + 3).then_some(())
    });
    assert_eq!(node_a.health().unwrap().1["peers"]["connected"], 0);
    assert_eq!(node_b.health().unwrap().1["peers"]["connected"], 0);
}

#[test]
fn a_taken_quic_port_fails_the_start() {
    let env = LocalEnv::up(1);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let first = RhioNode::start(NodeSpec::for_cluster(&env.clusters[0], dirs[0].path()));
    first.wait_healthy();
    let mut spec = NodeSpec::for_cluster(&env.clusters[0], dirs[1].path());
    spec.quic_port = first.spec.quic_port;
    let mut second = RhioNode::start(spec);
    let status = second.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let log = second.log();
    assert!(
        log.contains(&format!("UDP port {}", first.spec.quic_port)),
        "{log}"
    );
}

#[test]
fn sigterm_stops_a_connected_node_promptly() {
    let env = LocalEnv::up(2);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (spec_a, spec_b) = pair(&env, &dirs);
    let mut node_a = RhioNode::start(spec_a);
    let node_b = RhioNode::start(spec_b);
    node_a.wait_peers_connected(1);
    node_b.wait_peers_connected(1);

    node_a.signal(libc::SIGTERM);
    let status = node_a.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    assert!(node_a.log().contains("rhio node stopped"));
}
