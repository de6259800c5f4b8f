//! Federation: a network defined by a members list, where every member relays, members learn
//! each other through the overlay and discovery, and only members get anything. Each cluster has
//! its own NATS (JetStream), S3 and rhio node; nodes talk over loopback QUIC.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    Cluster, LocalEnv, NodeSpec, RhioNode, assert_routed, bootstrap, cluster_specs, js_publish,
    make_parquet, metric, metric_present, numbered, publish_toml, runtime, s3_key_of, s3_object,
    stream_messages, subscribe_toml, wait_for,
};

const WAIT: Duration = Duration::from_secs(120);

fn write_members(path: &Path, keys: &[&String]) {
    let text: String = keys.iter().map(|key| format!("{key}\n")).collect();
    std::fs::write(path, format!("# the test network\n{text}")).unwrap();
}

fn stream_count(nats_url: &str, stream: &str) -> u64 {
    runtime().block_on(common::stream_count(nats_url, stream))
}

/// One spec per cluster of `env` with the bootstrap `links`, the `[network]` lines `network`,
/// and cluster 1 publishing `fed.>` and importing from `root`.
fn federation_specs(
    env: &LocalEnv,
    dir: &Path,
    root: &Path,
    links: &[(usize, usize)],
    network: impl Fn(&[String]) -> String,
) -> (Vec<NodeSpec>, Vec<String>) {
    let (mut specs, keys) = cluster_specs(env, dir);
    bootstrap(&mut specs, &keys, links);
    let network = network(&keys);
    for spec in &mut specs {
        spec.extra_network = network.clone();
    }
    specs[0].import_roots = vec![root.to_path_buf()];
    specs[0].extra = publish_toml(&["fed.>"], "OUT");
    (specs, keys)
}

/// Waits for the dataset's announcement in `cluster` and returns the bytes of the copy it
/// points at.
fn replicated(cluster: &Cluster) -> Vec<u8> {
    let rt = runtime();
    let announced = rt.block_on(stream_messages(&cluster.nats_url, "DATASETS", 1, WAIT));
    let summary: serde_json::Value = serde_json::from_slice(&announced[0].payload).unwrap();
    rt.block_on(s3_object(
        cluster,
        &s3_key_of(summary["location"].as_str().unwrap()),
    ))
}

fn received(node: &RhioNode) -> f64 {
    metric(node, "rhio_operations_received_total")
}

/// Four clusters in a line 1 - 2 - 3 - 4, each configured with one bootstrap node; 2 and 3
/// subscribe to nothing; 4 subscribes to 1's messages and datasets; a fifth node is no member.
#[test]
fn a_line_of_four_clusters_relays_discovers_repairs_and_admits_members_only() {
    let env = LocalEnv::up(6);
    let dir = tempfile::tempdir().unwrap();
    let (_root_dir, root) = common::import_root();
    let members_file = dir.path().join("members.txt");
    // Bootstrap: 1 -> 2, 2 -> 3, 3 -> 4, 4 -> 3; the stranger knows 2; the late joiner knows 3.
    let links = [(0, 1), (1, 2), (2, 3), (3, 2), (4, 1), (5, 2)];
    let (mut specs, keys) = federation_specs(&env, dir.path(), &root, &links, |_| {
        format!("members_file = {:?}\n", members_file.display().to_string())
    });
    write_members(&members_file, &keys[..4].iter().collect::<Vec<_>>());
    let subscriber = subscribe_toml(&keys[0], &["fed.>"], "IN")
        + &subscribe_toml(&keys[0], &["datasets.>"], "DATASETS");
    specs[3].extra = subscriber.clone();
    specs[4].extra = subscriber.clone();
    specs[5].extra = subscriber;
    let mut nodes: Vec<RhioNode> = specs[..5].iter().cloned().map(RhioNode::start).collect();
    for node in &nodes {
        node.wait_healthy();
    }

    // Messages of cluster 1 reach cluster 4 through two nodes that subscribe to nothing.
    let rt = runtime();
    rt.block_on(js_publish(
        &env.clusters[0].nats_url,
        (0..100).map(|i| numbered("fed.a", i, 256)),
    ));
    let at_4 = rt.block_on(stream_messages(&env.clusters[3].nats_url, "IN", 100, WAIT));
    let expected: Vec<_> = (0..100).map(|i| ("fed.a".to_string(), i)).collect();
    assert_routed(&at_4, &keys[0], &expected);
    for relay in [&nodes[1], &nodes[2]] {
        assert!(received(relay) >= 100.0, "a relay stored what it passed on");
        let (_, health) = relay.health().unwrap();
        assert_eq!(health["streams"].as_array().unwrap().len(), 0, "{health}");
    }

    // A dataset imported in cluster 1 replicates into cluster 4, which has no configured link
    // to cluster 1: the relays hold no blobs, so the bytes came from cluster 1 directly.
    let file = root.join("weather.parquet");
    make_parquet(&["sized", file.to_str().unwrap(), "20", "2000"]);
    rt.block_on(common::rhio_import_ok(
        &env.clusters[0].nats_url,
        &file,
        "weather",
    ));
    let copy = replicated(&env.clusters[3]);
    assert_eq!(copy, std::fs::read(&file).unwrap(), "byte-identical copy");
    let file_len = copy.len() as f64;
    assert!(metric(&nodes[0], "rhio_blob_bytes_served_total") >= file_len);
    for relay in [&nodes[1], &nodes[2]] {
        assert_eq!(
            metric_present(relay, "rhio_blob_bytes_served_total"),
            Some(0.0)
        );
    }

    // The node that is no member got nothing and was refused.
    wait_for("the stranger to be refused", WAIT, || {
        let refusals: f64 = nodes[1..4]
            .iter()
            .filter_map(|node| {
                metric_present(
                    node,
                    "rhio_sync_sessions_refused_total{reason=\"not_a_member\"}",
                )
            })
            .sum();
        (refusals > 0.0).then_some(())
    });
    assert_eq!(
        metric_present(&nodes[4], "rhio_operations_received_total"),
        Some(0.0)
    );
    assert_eq!(stream_count(&env.clusters[4].nats_url, "IN"), 0);
    // The failure detector sees the members alive.
    let (_, health) = nodes[1].health().unwrap();
    let peers = health["peers"]["nodes"].as_array().unwrap();
    assert!(
        peers
            .iter()
            .any(|p| p["public_key"] == keys[0].as_str() && p["state"] == "alive"),
        "{health}"
    );
    assert_eq!(health["network"]["members"], 3, "{health}");

    // Both relays stop: the overlay carries cluster 1's messages to cluster 4 directly.
    nodes[1].kill();
    nodes[2].kill();
    rt.block_on(js_publish(
        &env.clusters[0].nats_url,
        (100..130).map(|i| numbered("fed.a", i, 256)),
    ));
    let at_4 = rt.block_on(stream_messages(&env.clusters[3].nats_url, "IN", 130, WAIT));
    let expected: Vec<_> = (0..130).map(|i| ("fed.a".to_string(), i)).collect();
    assert_routed(&at_4, &keys[0], &expected);
    // They come back and catch up what they missed.
    for i in [1, 2] {
        nodes[i] = RhioNode::start(specs[i].clone());
    }
    for i in [1, 2] {
        nodes[i].wait_http();
        wait_for("a restarted relay to catch up", WAIT, || {
            (metric_present(&nodes[i], "rhio_operations_received_total")? >= 30.0).then_some(())
        });
    }

    // Cluster 4 leaves the members list: every node drops it; new messages stop reaching it.
    write_members(&members_file, &keys[..3].iter().collect::<Vec<_>>());
    for node in &nodes[..3] {
        wait_for("members file read again", WAIT, || {
            node.log().contains("member removed").then_some(())
        });
    }
    let before = received(&nodes[2]);
    rt.block_on(js_publish(
        &env.clusters[0].nats_url,
        (130..150).map(|i| numbered("fed.a", i, 256)),
    ));
    wait_for("cluster 3 to relay the new messages", WAIT, || {
        (received(&nodes[2]) >= before + 20.0).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        stream_count(&env.clusters[3].nats_url, "IN"),
        130,
        "a removed member still received messages"
    );

    // A new member joins late: its key is added to the file and it knows only cluster 3. It
    // receives the whole history (150 messages, the dataset) from whoever has it.
    write_members(&members_file, &[&keys[0], &keys[1], &keys[2], &keys[5]]);
    let late = RhioNode::start(specs[5].clone());
    late.wait_healthy();
    let at_late = rt.block_on(stream_messages(&env.clusters[5].nats_url, "IN", 150, WAIT));
    let expected: Vec<_> = (0..150).map(|i| ("fed.a".to_string(), i)).collect();
    assert_routed(&at_late, &keys[0], &expected);
    let copy = replicated(&env.clusters[5]);
    assert_eq!(
        copy,
        std::fs::read(&file).unwrap(),
        "byte-identical late copy"
    );
}

/// Eight clusters: a line 1 - 2 - ... - 8 with one chord (2 - 6), each configured with one or two
/// bootstrap nodes and the members listed inline; only 4 and 8 subscribe. Then two relays stop
/// and come back, and a ninth cluster joins late. Runs in `./dev/test-federation` (about a
/// minute of nine clusters on two cores).
#[test]
#[ignore = "nine clusters; run by ./dev/test-federation"]
fn eight_clusters_in_a_line_with_a_chord_deliver_exactly_once_and_a_late_ninth_catches_up() {
    let env = LocalEnv::up(9);
    let dir = tempfile::tempdir().unwrap();
    let (_root_dir, root) = common::import_root();
    let mut links: Vec<(usize, usize)> = (0..7).map(|i| (i, i + 1)).collect();
    links.extend([(7, 6), (1, 5), (8, 4)]);
    let (mut specs, keys) = federation_specs(&env, dir.path(), &root, &links, |keys| {
        format!("members = {keys:?}\n")
    });
    let messages = subscribe_toml(&keys[0], &["fed.>"], "IN");
    let datasets = subscribe_toml(&keys[0], &["datasets.>"], "DATASETS");
    specs[3].extra = messages.clone();
    specs[7].extra = messages.clone() + &datasets;
    specs[8].extra = messages + &datasets;
    let mut nodes: Vec<RhioNode> = specs[..8].iter().cloned().map(RhioNode::start).collect();
    for node in &nodes {
        node.wait_healthy();
    }
    let subscribers = [3, 7];

    let rt = runtime();
    rt.block_on(js_publish(
        &env.clusters[0].nats_url,
        (0..200).map(|i| numbered("fed.a", i, 256)),
    ));
    let expected: Vec<_> = (0..200).map(|i| ("fed.a".to_string(), i)).collect();
    for i in subscribers {
        let got = rt.block_on(stream_messages(&env.clusters[i].nats_url, "IN", 200, WAIT));
        assert_routed(&got, &keys[0], &expected);
    }
    let sent: f64 = nodes
        .iter()
        .map(|node| metric(node, "rhio_sync_operations_sent_total"))
        .sum();
    println!(
        "8 clusters: {:.1} transmissions per message (sum of rhio_sync_operations_sent_total / 200)",
        sent / 200.0
    );
    // Once the sessions that deliver copies are pruned, bodies follow a tree.
    rt.block_on(js_publish(
        &env.clusters[0].nats_url,
        (200..300).map(|i| numbered("fed.b", i, 256)),
    ));
    for i in subscribers {
        rt.block_on(stream_messages(&env.clusters[i].nats_url, "IN", 300, WAIT));
    }
    std::thread::sleep(Duration::from_secs(1));
    let again: f64 = nodes
        .iter()
        .map(|node| metric(node, "rhio_sync_operations_sent_total"))
        .sum();
    println!(
        "8 clusters, next 100 messages: {:.1} transmissions per message",
        (again - sent) / 100.0
    );

    let file = root.join("weather.parquet");
    make_parquet(&["sized", file.to_str().unwrap(), "20", "2000"]);
    rt.block_on(common::rhio_import_ok(
        &env.clusters[0].nats_url,
        &file,
        "weather",
    ));
    let original = std::fs::read(&file).unwrap();
    assert_eq!(replicated(&env.clusters[7]), original);

    // Two relays stop: delivery goes on through the repaired overlay; back, they catch up.
    nodes[2].kill();
    nodes[5].kill();
    rt.block_on(js_publish(
        &env.clusters[0].nats_url,
        (200..250).map(|i| numbered("fed.a", i, 256)),
    ));
    let expected: Vec<_> = (0..250)
        .map(|i| ("fed.a".to_string(), i))
        .chain((200..300).map(|i| ("fed.b".to_string(), i)))
        .collect();
    for i in subscribers {
        let got = rt.block_on(stream_messages(&env.clusters[i].nats_url, "IN", 350, WAIT));
        assert_routed(&got, &keys[0], &expected);
    }
    for i in [2, 5] {
        nodes[i] = RhioNode::start(specs[i].clone());
        nodes[i].wait_http();
    }
    for i in [2, 5] {
        wait_for("a restarted relay to catch up", WAIT, || {
            (metric_present(&nodes[i], "rhio_operations_received_total")? >= 50.0).then_some(())
        });
    }

    // A ninth cluster joins late, bootstrapped from cluster 5 only: it gets the history.
    let late = RhioNode::start(specs[8].clone());
    late.wait_healthy();
    let got = rt.block_on(stream_messages(&env.clusters[8].nats_url, "IN", 350, WAIT));
    assert_routed(&got, &keys[0], &expected);
    assert_eq!(replicated(&env.clusters[8]), original);
}

/// Six clusters in two network namespaces (three each, joined by one veth pair): the link goes
/// down, both sides publish, the link comes back: both sides converge, nothing lost, nothing
/// duplicated. Needs root (`ip netns`); everything stays inside the namespaces it creates.
#[test]
fn a_partition_of_six_clusters_three_and_three_heals_without_loss_or_duplicates() {
    use common::Netns;
    let (side_a, side_b, addresses) = Netns::pair("part");
    let envs = [LocalEnv::up_in(3, &side_a), LocalEnv::up_in(3, &side_b)];
    let dir = tempfile::tempdir().unwrap();
    let mut specs: Vec<NodeSpec> = Vec::new();
    for (side, (env, netns)) in envs.iter().zip([&side_a, &side_b]).enumerate() {
        for i in 0..3 {
            let mut spec =
                NodeSpec::for_cluster(&env.clusters[i], &dir.path().join(format!("{side}{i}")));
            spec.netns = Some(netns.name.clone());
            spec.bind_ip = "0.0.0.0".into();
            specs.push(spec);
        }
    }
    let keys: Vec<String> = specs.iter().map(NodeSpec::public_key).collect();
    // Inside a side: a line over loopback; across: the first node of each side knows the
    // other side's first node by its veth address.
    bootstrap(&mut specs, &keys, &[(0, 1), (1, 2), (3, 4), (4, 5)]);
    for side in 0..2 {
        let base = side * 3;
        let other = (1 - side) * 3;
        let address = format!("{}:{}", addresses[1 - side], specs[other].quic_port);
        specs[base].known_addrs.push((keys[other].clone(), address));
    }
    let subscriber = subscribe_toml(&keys[0], &["part.a.>"], "IN")
        + &subscribe_toml(&keys[3], &["part.b.>"], "IN");
    for spec in &mut specs {
        spec.extra_network = format!("members = {keys:?}\n");
    }
    specs[0].extra = publish_toml(&["part.a.>"], "OUT");
    specs[3].extra = publish_toml(&["part.b.>"], "OUT");
    specs[2].extra = subscriber.clone();
    specs[5].extra = subscriber;
    let nodes: Vec<RhioNode> = specs.iter().cloned().map(RhioNode::start).collect();
    for node in &nodes {
        node.wait_healthy();
    }
    let publish = |side: usize, subject: &str, range: std::ops::Range<usize>| {
        let (netns, url) = match side {
            0 => (&side_a, envs[0].clusters[0].nats_url.clone()),
            _ => (&side_b, envs[1].clusters[0].nats_url.clone()),
        };
        let subject = subject.to_string();
        netns.block_on(async move {
            js_publish(&url, range.map(|i| numbered(&subject, i, 128))).await;
        });
    };
    let messages = |side: usize, count: u64| {
        let (netns, url) = match side {
            0 => (&side_a, envs[0].clusters[2].nats_url.clone()),
            _ => (&side_b, envs[1].clusters[2].nats_url.clone()),
        };
        netns.block_on(async move { stream_messages(&url, "IN", count, WAIT).await })
    };
    let by_subject = |messages: &[async_nats::jetstream::message::StreamMessage], prefix: &str| {
        messages
            .iter()
            .filter(|m| m.subject.starts_with(prefix))
            .cloned()
            .collect::<Vec<_>>()
    };

    // Connected: both subscribers get both sides' messages.
    publish(0, "part.a.x", 0..20);
    publish(1, "part.b.x", 0..20);
    for side in 0..2 {
        assert_eq!(messages(side, 40).len(), 40);
    }

    // Partitioned: each side goes on by itself.
    side_a.set_links(false);
    side_b.set_links(false);
    publish(0, "part.a.x", 20..50);
    publish(1, "part.b.x", 20..50);
    let at_a = messages(0, 70);
    let at_b = messages(1, 70);
    std::thread::sleep(Duration::from_secs(2));
    let at_a_later = messages(0, 70);
    assert_eq!(
        by_subject(&at_a_later, "part.b.").len(),
        20,
        "side b's messages crossed the partition"
    );
    assert_eq!(by_subject(&at_a, "part.a.").len(), 50);
    assert_eq!(by_subject(&at_b, "part.b.").len(), 50);

    // Healed: both sides converge, every message once, in order, with provenance.
    side_a.set_links(true);
    side_b.set_links(true);
    for side in 0..2 {
        let all = messages(side, 100);
        let expected: Vec<_> = (0..50).map(|i| ("part.a.x".to_string(), i)).collect();
        assert_routed(&by_subject(&all, "part.a."), &keys[0], &expected);
        let expected: Vec<_> = (0..50).map(|i| ("part.b.x".to_string(), i)).collect();
        assert_routed(&by_subject(&all, "part.b."), &keys[3], &expected);
    }
    drop(nodes);
}
