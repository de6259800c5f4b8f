//! Signed message routing between clusters, each with its own NATS (JetStream) and S3, over
//! loopback QUIC.

mod common;

use std::time::Duration;

use async_nats::HeaderMap;
use common::{
    LocalEnv, NodeSpec, RhioNode, assert_routed, js_publish, metric, numbered, publish_toml,
    runtime, stream_messages, subscribe_toml, wait_for,
};

/// Cluster A publishes `subjects` (stream OUT); cluster B subscribes to A on them (stream IN).
/// Waits until B's stream `IN` holds messages 0..count on `subject`, and checks that they
/// arrived exactly once, in order, with A's provenance.
fn assert_all_routed(
    rt: &tokio::runtime::Runtime,
    pair: &common::Pair,
    subject: &str,
    count: usize,
) {
    let messages = rt.block_on(stream_messages(
        &pair.env.clusters[1].nats_url,
        "IN",
        count as u64,
        Duration::from_secs(120),
    ));
    let expected: Vec<_> = (0..count).map(|i| (subject.to_string(), i)).collect();
    assert_routed(&messages, &pair.key_a, &expected);
}

fn pair(subjects: &[&str]) -> common::Pair {
    common::pair(subjects, subjects)
}

#[test]
fn burst_of_5000_arrives_exactly_once_in_order_with_provenance() {
    let pair = pair(&["burst.>"]);
    let node_a = RhioNode::start(pair.a.clone());
    let node_b = RhioNode::start(pair.b.clone());
    node_a.wait_peers_connected(1);
    node_b.wait_peers_connected(1);
    // Status lists the streams and reports routing through them as running.
    let health_a = node_a.wait_healthy();
    assert_eq!(health_a["streams"][0]["name"], "OUT");
    assert_eq!(health_a["streams"][0]["role"], "publish");
    let health_b = node_b.wait_healthy();
    assert_eq!(health_b["streams"][0]["name"], "IN");
    assert_eq!(health_b["streams"][0]["active"], true);

    let rt = runtime();
    let count = 5000;
    // Two subjects interleaved: order is per (author, subject).
    let expected: Vec<(String, usize)> = (0..count)
        .map(|i| (format!("burst.{}", i % 2), i))
        .collect();
    rt.block_on(js_publish(
        &pair.env.clusters[0].nats_url,
        expected
            .iter()
            .map(|(subject, i)| numbered(subject, *i, 1024)),
    ));
    let messages = rt.block_on(stream_messages(
        &pair.env.clusters[1].nats_url,
        "IN",
        count as u64,
        Duration::from_secs(180),
    ));
    assert_routed(&messages, &pair.key_a, &expected);
    assert_eq!(
        metric(&node_a, "rhio_operations_signed_total"),
        count as f64
    );
    // Nothing more trickles in later: a marker published after the burst on each subject is
    // delivered after anything of the burst that could still come (each log is delivered in
    // order), and then the stream holds the burst exactly once plus the markers.
    let markers = [
        ("burst.0".to_string(), count),
        ("burst.1".to_string(), count + 1),
    ];
    rt.block_on(js_publish(
        &pair.env.clusters[0].nats_url,
        markers
            .iter()
            .map(|(subject, i)| numbered(subject, *i, 1024)),
    ));
    let again = rt.block_on(stream_messages(
        &pair.env.clusters[1].nats_url,
        "IN",
        count as u64 + 2,
        Duration::from_secs(60),
    ));
    let with_markers: Vec<(String, usize)> = expected.iter().cloned().chain(markers).collect();
    assert_routed(&again, &pair.key_a, &with_markers);
}

#[test]
fn messages_up_to_the_nats_payload_limit_arrive() {
    let pair = pair(&["big.*"]);
    let node_a = RhioNode::start(pair.a.clone());
    let node_b = RhioNode::start(pair.b.clone());
    node_a.wait_peers_connected(1);
    node_b.wait_peers_connected(1);
    let rt = runtime();
    // NATS' default max_payload is 1 MiB; leave room for the headers rhio adds in B.
    let size = 1024 * 1024 - 2048;
    rt.block_on(js_publish(
        &pair.env.clusters[0].nats_url,
        (0..3).map(|i| numbered("big.blob", i, size)),
    ));
    let messages = rt.block_on(stream_messages(
        &pair.env.clusters[1].nats_url,
        "IN",
        3,
        Duration::from_secs(60),
    ));
    assert!(messages.iter().all(|m| m.payload.len() == size));
    let expected: Vec<_> = (0..3).map(|i| ("big.blob".to_string(), i)).collect();
    assert_routed(&messages, &pair.key_a, &expected);
}

/// The signing node is killed (SIGKILL) in the middle of a burst, while it pushes operations
/// before their messages are fsynced and acked, and started again: it resumes at its stored
/// cursor and signs any unacked message again as the same operation, so the other cluster gets
/// every message exactly once, in order, and refuses nothing as a conflict.
#[test]
fn a_signing_node_killed_mid_burst_resumes_without_forking_its_log() {
    let pair = pair(&["burst.*"]);
    let mut node_a = RhioNode::start(pair.a.clone());
    let node_b = RhioNode::start(pair.b.clone());
    node_b.wait_peers_connected(1);
    let rt = runtime();
    let a_nats = pair.env.clusters[0].nats_url.clone();
    rt.block_on(js_publish(
        &a_nats,
        (0..3000).map(|i| numbered("burst.x", i, 512)),
    ));
    wait_for(
        "B to receive part of the burst",
        Duration::from_secs(60),
        || {
            let received = common::metric_present(&node_b, "rhio_operations_received_total")?;
            (received >= 200.0).then_some(())
        },
    );
    node_a.kill();
    node_a = RhioNode::start(pair.a.clone());
    node_a.wait_http();
    assert_all_routed(&rt, &pair, "burst.x", 3000);
    assert_eq!(
        common::metric_present(
            &node_b,
            "rhio_operations_rejected_total{reason=\"conflict\"}"
        ),
        Some(0.0),
        "{}",
        node_b.log()
    );
    // Every message was acked in A once it was durably signed.
    wait_for(
        "A's consumer to have nothing pending",
        Duration::from_secs(30),
        || {
            let pending = rt.block_on(common::consumer_pending(&a_nats, "OUT", "rhio-publish"));
            (pending == 0).then_some(())
        },
    );
}

#[test]
fn stopped_node_catches_up_and_receiving_nats_restart_loses_nothing() {
    let pair = pair(&["news.*"]);
    let node_a = RhioNode::start(pair.a.clone());
    let mut node_b = RhioNode::start(pair.b.clone());
    node_b.wait_peers_connected(1);
    let rt = runtime();
    let a_nats = pair.env.clusters[0].nats_url.clone();
    let b_nats = pair.env.clusters[1].nats_url.clone();

    rt.block_on(js_publish(
        &a_nats,
        (0..10).map(|i| numbered("news.x", i, 100)),
    ));
    rt.block_on(stream_messages(&b_nats, "IN", 10, Duration::from_secs(60)));

    // B is down while 1,000 messages are published in A.
    node_b.kill();
    rt.block_on(js_publish(
        &a_nats,
        (10..1010).map(|i| numbered("news.x", i, 100)),
    ));
    wait_for("A to sign while B is down", Duration::from_secs(60), || {
        (metric(&node_a, "rhio_operations_signed_total") == 1010.0).then_some(())
    });
    let node_b = RhioNode::start(pair.b.clone());
    assert_all_routed(&rt, &pair, "news.x", 1010);

    // B's NATS goes down while A publishes: B holds the operations and delivers them later.
    pair.env.stop("nats-b");
    rt.block_on(js_publish(
        &a_nats,
        (1010..1510).map(|i| numbered("news.x", i, 100)),
    ));
    wait_for(
        "B to store what it cannot deliver",
        Duration::from_secs(60),
        || (metric(&node_b, "rhio_operations_received_total") >= 1500.0).then_some(()),
    );
    pair.env.start("nats-b");
    let messages = rt.block_on(stream_messages(
        &b_nats,
        "IN",
        1510,
        Duration::from_secs(120),
    ));
    let expected: Vec<_> = (0..1510).map(|i| ("news.x".to_string(), i)).collect();
    assert_routed(&messages, &pair.key_a, &expected);
}

#[test]
fn three_clusters_in_a_line_forward_the_first_authors_messages() {
    let env = LocalEnv::up(3);
    let dirs = [
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    ];
    let mut a = NodeSpec::for_cluster(&env.clusters[0], dirs[0].path());
    let mut b = NodeSpec::for_cluster(&env.clusters[1], dirs[1].path());
    let mut c = NodeSpec::for_cluster(&env.clusters[2], dirs[2].path());
    let (key_a, key_b, key_c) = (a.public_key(), b.public_key(), c.public_key());
    // A - B - C: C only knows B.
    a.known_nodes.push((key_b.clone(), b.quic_port));
    b.known_nodes.push((key_a.clone(), a.quic_port));
    b.known_nodes.push((key_c.clone(), c.quic_port));
    c.known_nodes.push((key_b.clone(), b.quic_port));
    a.extra = publish_toml(&["line.>"], "OUT");
    b.extra = subscribe_toml(&key_a, &["line.>"], "IN");
    c.extra = subscribe_toml(&key_a, &["line.>"], "IN");
    let _a = RhioNode::start(a);
    let node_b = RhioNode::start(b);
    let node_c = RhioNode::start(c);
    node_b.wait_peers_connected(2);
    node_c.wait_peers_connected(1);

    let rt = runtime();
    // A message that was routed already (it carries rhio headers) is never signed again.
    let mut routed = HeaderMap::new();
    routed.insert("X-Rhio-PublicKey", key_b.as_str());
    rt.block_on(js_publish(
        &env.clusters[0].nats_url,
        std::iter::once(("line.loop".to_string(), routed, b"echo".to_vec()))
            .chain((0..200).map(|i| numbered("line.a", i, 512))),
    ));
    let expected: Vec<_> = (0..200).map(|i| ("line.a".to_string(), i)).collect();
    let at_c = rt.block_on(stream_messages(
        &env.clusters[2].nats_url,
        "IN",
        200,
        Duration::from_secs(120),
    ));
    assert_routed(&at_c, &key_a, &expected);
    let at_b = rt.block_on(stream_messages(
        &env.clusters[1].nats_url,
        "IN",
        200,
        Duration::from_secs(60),
    ));
    assert_routed(&at_b, &key_a, &expected);
}

#[test]
fn unknown_streams_fail_the_start_when_creation_is_off() {
    let env = LocalEnv::up(1);
    let dir = tempfile::tempdir().unwrap();
    let mut spec = NodeSpec::for_cluster(&env.clusters[0], dir.path());
    spec.create_streams = false;
    spec.extra = publish_toml(&["x.>"], "MISSING");
    let mut node = RhioNode::start(spec);
    let status = node.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let log = node.log();
    assert!(log.contains("\"MISSING\" does not exist"), "{log}");
    assert!(log.contains("nats.create_streams"), "{log}");
}

/// A peer that answers a sync request with the frames it was given, then stays connected.
#[derive(Debug, Clone)]
struct ForgingPeer {
    frames: std::sync::Arc<Vec<rhio_core::sync::Frame>>,
}

impl iroh::protocol::ProtocolHandler for ForgingPeer {
    async fn accept(
        &self,
        connection: iroh::endpoint::Connection,
    ) -> Result<(), iroh::protocol::AcceptError> {
        use rhio::network::sync::{read_frame, write_frame};
        let (mut send, mut recv) = connection.accept_bi().await?;
        let _request = read_frame(&mut recv).await;
        for frame in self.frames.iter() {
            if write_frame(&mut send, frame).await.is_err() {
                return Ok(());
            }
        }
        let _ = write_frame(&mut send, &rhio_core::sync::Frame::CaughtUp).await;
        connection.closed().await;
        Ok(())
    }
}

#[test]
fn forged_tampered_and_unauthorized_operations_are_rejected() {
    use rhio_core::identity::PrivateKey;
    use rhio_core::message::RoutedMessage;
    use rhio_core::operation::{LogId, SignedOperation};
    use rhio_core::sync::Frame;

    let env = LocalEnv::up(1);
    let dir = tempfile::tempdir().unwrap();
    let forger = PrivateKey::generate();
    let stranger = PrivateKey::generate();
    let forger_port = common::free_udp_port();
    let mut spec = NodeSpec::for_cluster(&env.clusters[0], dir.path());
    spec.known_nodes
        .push((forger.public_key().to_hex(), forger_port));
    spec.extra = subscribe_toml(&forger.public_key().to_hex(), &["allowed.>"], "IN");

    let message = |subject: &str, i: usize| {
        let (subject, headers, payload) = numbered(subject, i, 64);
        RoutedMessage::new(subject, common::header_pairs(&headers), payload).encode()
    };
    let sign = |key: &PrivateKey, subject: &str, seq: u64, backlink, body: Vec<u8>| {
        SignedOperation::sign(key, LogId::Message(subject.into()), seq, backlink, 1, body)
    };
    let first = sign(&forger, "allowed.x", 0, None, message("allowed.x", 0));
    let second = sign(
        &forger,
        "allowed.x",
        1,
        Some(first.hash),
        message("allowed.x", 1),
    );
    let mut tampered = Frame::operation(&second);
    if let Frame::Operation { body, .. } = &mut tampered {
        let last = body.len() - 1;
        body[last] ^= 1;
    }
    let frames = vec![
        Frame::operation(&first),
        tampered,
        Frame::operation(&sign(
            &stranger,
            "allowed.x",
            0,
            None,
            message("allowed.x", 0),
        )),
        Frame::operation(&sign(&forger, "other.y", 0, None, message("other.y", 0))),
        Frame::operation(&sign(
            &forger,
            "allowed.z",
            0,
            None,
            b"not a message".to_vec(),
        )),
        Frame::operation(&second),
    ];

    let rt = runtime();
    let _endpoint = rt.block_on(async {
        use p2panda_net::iroh_endpoint::IrohConfig;
        let address_book = p2panda_net::AddressBook::builder().spawn().await.unwrap();
        let endpoint = p2panda_net::Endpoint::builder(address_book)
            .network_id(rhio_core::network::network_id("rhio-test"))
            .signing_key(forger.signing_key().clone())
            .config(IrohConfig {
                bind_ip_v4: std::net::Ipv4Addr::LOCALHOST,
                bind_port_v4: forger_port,
                bind_ip_v6: std::net::Ipv6Addr::LOCALHOST,
                bind_port_v6: 0,
            })
            .spawn()
            .await
            .unwrap();
        endpoint
            .accept(
                rhio::network::sync::SYNC_ALPN,
                ForgingPeer {
                    frames: std::sync::Arc::new(frames),
                },
            )
            .await
            .unwrap();
        endpoint
    });

    // Where a delivery of the relayed operation would show.
    rt.block_on(common::create_stream(
        &env.clusters[0].nats_url,
        "OTHER",
        &["other.>"],
    ));
    let node = RhioNode::start(spec);
    node.wait_healthy();
    let messages = rt.block_on(stream_messages(
        &env.clusters[0].nats_url,
        "IN",
        2,
        Duration::from_secs(60),
    ));
    let expected: Vec<_> = (0..2).map(|i| ("allowed.x".to_string(), i)).collect();
    assert_routed(&messages, &forger.public_key().to_hex(), &expected);
    // The forger is a known node, so a member: its operation on a subject this node does not
    // subscribe to is relayed (stored and served on), not rejected, and never delivered here.
    for reason in ["invalid", "author_not_allowed", "malformed_body"] {
        let name = format!("rhio_operations_rejected_total{{reason=\"{reason}\"}}");
        wait_for(&name, Duration::from_secs(30), || {
            (metric(&node, &name) >= 1.0).then_some(())
        });
    }
    // The node keeps running and healthy, and published nothing else. No wait is needed: the
    // forger sent every other frame before the second allowed one, and the node stores and
    // delivers in the order it receives, so anything wrongly delivered would be in the streams
    // before that second message, which is in already.
    assert_eq!(node.health().unwrap().0, 200);
    let again = rt.block_on(stream_messages(
        &env.clusters[0].nats_url,
        "IN",
        2,
        Duration::from_secs(5),
    ));
    assert_eq!(again.len(), 2);
    assert!(node.log().contains("rejected operation"));
    let relayed = rt.block_on(common::stream_count(&env.clusters[0].nats_url, "OTHER"));
    assert_eq!(relayed, 0, "a relayed message was delivered");
    assert!(
        metric(&node, "rhio_operations_received_total") >= 3.0,
        "the relayed operation is stored beside the two delivered ones"
    );
}
