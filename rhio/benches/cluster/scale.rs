//! How costs grow (`--only scale`) and replication from two holders over capped links
//! (`--only capped`).
//!
//! - scale: replication time and peak RSS of both nodes by file size (8 MiB row groups), the same
//!   bytes in few and in many row groups, and message latency and CPU by the number of signed
//!   logs the messages are spread over (one per subject);
//! - capped: three clusters, each in a network namespace of its own, every two joined by a veth
//!   pair capped with `tc tbf` in both directions. A and C hold the same dataset; B replicates
//!   it from both, against rclone and the SDK copy reading A's S3 from B's namespace.

use std::time::Instant;

use serde_json::{Value, json};

use super::common::{self, LocalEnv, Netns, NodeSpec, RhioNode, subscribe_toml};
use super::{
    Clusters, IMPORT_PART_MIB, Settings, cpu_seconds, median, peak_rss_mib, percentile, rclone_in,
    replicate_rhio, replicate_sdk, timed_messages,
};

type Row = (String, String, String, String, String);

/// The file sizes (MiB) of the size series.
fn sizes(quick: bool) -> &'static [u64] {
    if quick {
        &[16, 64]
    } else {
        &[64, 256, 1024, 4096]
    }
}

/// (MiB, row group counts) of the row-group series.
fn groups(quick: bool) -> (u64, [u64; 2]) {
    if quick {
        (64, [4, 64])
    } else {
        (1024, [16, 1024])
    }
}

/// The numbers of logs (subjects) of the latency series.
fn logs(quick: bool) -> &'static [u64] {
    if quick {
        &[1, 10, 100]
    } else {
        &[1, 100, 10_000]
    }
}

/// The dataset subjects node B replicates for the scale scenario.
pub(super) fn datasets() -> Vec<String> {
    let sizes = sizes(false).iter().chain(sizes(true));
    let counts = groups(false).1.into_iter().chain(groups(true).1);
    sizes
        .map(|mib| format!("datasets.size{mib}"))
        .chain(counts.map(|count| format!("datasets.groups{count}")))
        .collect()
}

/// Clears the peak RSS (`VmHWM`) of a process, so the next reading is the peak of what follows
/// (`/proc/PID/clear_refs`, value 5).
fn reset_peak_rss(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .unwrap_or_else(|err| panic!("reset the peak RSS of {pid}: {err}"));
}

/// Imports a fresh `mib` MiB file of `rows_per_group` 1 KiB rows into A as `dataset` and
/// replicates it to B; returns (seconds until B announced it, peak RSS of A and of B meanwhile).
fn replicate_fresh(
    runtime: &tokio::runtime::Runtime,
    clusters: &Clusters,
    dataset: &str,
    mib: u64,
    rows_per_group: u64,
) -> (f64, [f64; 2]) {
    let file = clusters.data.join(format!("{dataset}.parquet"));
    common::make_parquet(&[
        "sized",
        file.to_str().unwrap(),
        &mib.to_string(),
        &rows_per_group.to_string(),
    ]);
    let len = std::fs::metadata(&file).unwrap().len() as f64 / (1 << 20) as f64;
    for node in &clusters.nodes {
        reset_peak_rss(node.pid());
    }
    let rate = runtime.block_on(replicate_rhio(clusters, &file, dataset));
    let rss = [0, 1].map(|i| peak_rss_mib(clusters.nodes[i].pid()));
    let _ = std::fs::remove_file(&file);
    (len / rate, rss)
}

/// The scale scenario on the two-cluster bench setup. Resets the nodes' peak RSS: run it after
/// the scenarios whose memory rows read it.
pub(super) fn scale(
    settings: &Settings,
    runtime: &tokio::runtime::Runtime,
    clusters: &Clusters,
    rows: &mut Vec<Row>,
    results: &mut serde_json::Map<String, Value>,
) {
    let mut push = |measure: String, value: String, ratio: String| {
        rows.push(("scale".into(), measure, value, "-".into(), ratio));
    };
    // Size: 8 MiB row groups, so the number of blobs grows with the file.
    let mut previous: Option<(u64, f64)> = None;
    let mut by_size = Vec::new();
    for &mib in sizes(settings.quick) {
        let (secs, rss) = replicate_fresh(runtime, clusters, &format!("size{mib}"), mib, 8192);
        // Time per MiB against the next smaller file: 1.00x is linear, above is worse.
        let ratio = previous.map_or("-".into(), |(prev_mib, prev_secs)| {
            format!(
                "{:.2}x",
                (secs / mib as f64) / (prev_secs / prev_mib as f64)
            )
        });
        push(
            format!("replication time, {mib} MiB (per MiB vs the next smaller)"),
            format!("{secs:.1} s ({:.0} MiB/s)", mib as f64 / secs),
            ratio,
        );
        for (name, rss) in ["a (serving)", "b (receiving)"].iter().zip(rss) {
            push(
                format!("peak RSS node {name}, {mib} MiB replication"),
                format!("{rss:.0} MiB"),
                "-".into(),
            );
        }
        by_size.push(json!({"mib": mib, "secs": secs, "rss_a_mib": rss[0], "rss_b_mib": rss[1]}));
        previous = Some((mib, secs));
    }
    results.insert("scale_by_size".into(), json!(by_size));

    // Row groups: the same bytes in few and in many blobs.
    let (mib, counts) = groups(settings.quick);
    let rows_total = mib * 1024;
    let mut by_groups = Vec::new();
    let mut first: Option<f64> = None;
    for count in counts {
        let (secs, rss) = replicate_fresh(
            runtime,
            clusters,
            &format!("groups{count}"),
            mib,
            rows_total / count,
        );
        let ratio = first.map_or("-".into(), |few| format!("{:.2}x", secs / few));
        push(
            format!(
                "replication time, {mib} MiB in {count} row groups (vs {})",
                counts[0]
            ),
            format!("{secs:.1} s ({:.0} MiB/s)", mib as f64 / secs),
            ratio,
        );
        push(
            format!("peak RSS node b, {mib} MiB in {count} row groups"),
            format!("{:.0} MiB", rss[1]),
            "-".into(),
        );
        by_groups.push(
            json!({"row_groups": count, "secs": secs, "rss_a_mib": rss[0], "rss_b_mib": rss[1]}),
        );
        first.get_or_insert(secs);
    }
    results.insert("scale_by_row_groups".into(), json!(by_groups));

    // Logs: 500 msg/s spread round-robin over 1 .. 10,000 subjects, each a log of its own (new
    // logs: every subject is fresh, so the 10,000 case creates a log per message).
    let (from, to) = (
        &clusters.env.clusters[0].nats_url,
        &clusters.env.clusters[1].nats_url,
    );
    // The files written above go to disk first (an fsync behind gigabytes of dirty pages would
    // show as a latency spike here), then what the nodes burn doing nothing: the floor under the
    // CPU figures below.
    std::process::Command::new("sync")
        .status()
        .expect("sync runs");
    let idle_secs = 5.0;
    let before: Vec<f64> = clusters
        .nodes
        .iter()
        .map(|n| cpu_seconds(n.pid()))
        .collect();
    std::thread::sleep(std::time::Duration::from_secs_f64(idle_secs));
    let idle: Vec<f64> = clusters
        .nodes
        .iter()
        .zip(&before)
        .map(|(n, before)| (cpu_seconds(n.pid()) - before) * 1000.0 / idle_secs)
        .collect();
    push(
        "CPU of an idle node per second, node a / node b".into(),
        format!("{:.0} / {:.0} ms", idle[0], idle[1]),
        "-".into(),
    );
    results.insert("idle_cpu_ms_per_s".into(), json!(idle));
    let mut by_logs = Vec::new();
    let mut single: Option<(f64, f64)> = None;
    for &logs in logs(settings.quick) {
        let before: Vec<f64> = clusters
            .nodes
            .iter()
            .map(|n| cpu_seconds(n.pid()))
            .collect();
        let latencies = runtime.block_on(timed_messages(
            from,
            to,
            &format!("bench.rhio.logs{logs}"),
            logs,
            500,
            settings.latency_secs,
            &format!("latency over {logs} logs"),
        ));
        let count = (500 * settings.latency_secs) as f64;
        let cpu: Vec<f64> = clusters
            .nodes
            .iter()
            .zip(&before)
            .map(|(n, before)| (cpu_seconds(n.pid()) - before) * 1000.0 / count * 1000.0)
            .collect();
        let (p50, p99) = (percentile(&latencies, 50.0), percentile(&latencies, 99.0));
        let (base50, base99) = *single.get_or_insert((p50, p99));
        push(
            format!("latency p50 at 500 msg/s, {logs} logs (vs 1 log)"),
            format!("{p50:.2} ms"),
            format!("{:.2}x", p50 / base50),
        );
        push(
            format!("latency p99 at 500 msg/s, {logs} logs (vs 1 log)"),
            format!("{p99:.2} ms"),
            format!("{:.2}x", p99 / base99),
        );
        push(
            format!("CPU per 1,000 messages, {logs} logs, node a / node b"),
            format!("{:.0} / {:.0} ms", cpu[0], cpu[1]),
            "-".into(),
        );
        by_logs.push(json!({"logs": logs, "p50_ms": p50, "p99_ms": p99, "cpu_a_ms_per_1000": cpu[0], "cpu_b_ms_per_1000": cpu[1]}));
    }
    results.insert("scale_by_logs".into(), json!(by_logs));
}

/// The link capacity between two clusters in the capped scenario.
const CAP_MBIT: u32 = 200;

/// Replication when a second cluster also holds the dataset and every link is capped at
/// [`CAP_MBIT`]: rhio in B fetches from A and C at once, a copy tool reads from A.
pub(super) fn capped(
    settings: &Settings,
    rows: &mut Vec<Row>,
    results: &mut serde_json::Map<String, Value>,
) {
    let (namespaces, addresses) = Netns::mesh("cap", 3);
    for ns in &namespaces {
        ns.cap(CAP_MBIT);
    }
    let envs: Vec<LocalEnv> = namespaces
        .iter()
        .map(|ns| LocalEnv::up_in_reachable(1, ns))
        .collect();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let data = dirs[0].path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut specs: Vec<NodeSpec> = (0..3)
        .map(|i| {
            let mut spec =
                NodeSpec::for_cluster(&envs[i].clusters[0], &dirs[i].path().join("node"));
            spec.netns = Some(namespaces[i].name.clone());
            spec.bind_ip = "0.0.0.0".into();
            spec.part_size_mib = IMPORT_PART_MIB;
            spec
        })
        .collect();
    let keys: Vec<String> = specs.iter().map(NodeSpec::public_key).collect();
    let runs = settings.runs;
    let names: Vec<String> = (0..runs).map(|round| format!("capped{round}")).collect();
    for i in 0..3 {
        for j in (0..3).filter(|&j| j != i) {
            let address = format!("{}:{}", addresses[j][i], specs[j].quic_port);
            specs[i].known_addrs.push((keys[j].clone(), address));
        }
        specs[i].extra_network = format!("members = {keys:?}\n");
    }
    // A and C import from the same directory; only B replicates, and only A's datasets.
    specs[0].import_roots = vec![data.clone()];
    specs[2].import_roots = vec![data.clone()];
    let subjects: Vec<String> = names.iter().map(|n| format!("datasets.{n}")).collect();
    let subjects: Vec<&str> = subjects.iter().map(String::as_str).collect();
    specs[1].extra = subscribe_toml(&keys[0], &subjects, "DATASETS");
    let nodes: Vec<RhioNode> = specs.into_iter().map(RhioNode::start).collect();
    for node in &nodes {
        node.wait_peers_connected(2);
    }
    let cluster = |i: usize| envs[i].clusters[0].clone();
    // A's S3 as B sees it: over their link.
    let mut a_from_b = cluster(0);
    let port = a_from_b.s3_endpoint.rsplit(':').next().unwrap().to_string();
    a_from_b.s3_endpoint = format!("http://{}:{port}", addresses[0][1]);
    let mib: u64 = if settings.quick { 64 } else { 1024 };
    let (mut rhio, mut rclone, mut sdk) = (Vec::new(), Vec::new(), Vec::new());
    let mut shares = Vec::new();
    let served = |node: &RhioNode| common::metric(node, "rhio_blob_bytes_served_total");
    for (round, name) in names.iter().enumerate() {
        let file = data.join(format!("{name}.parquet"));
        common::make_parquet(&["sized", file.to_str().unwrap(), &mib.to_string(), "8192"]);
        let len = std::fs::metadata(&file).unwrap().len();
        // C holds the same bytes (the same row groups, so the same blobs) before A announces.
        let c_url = cluster(2).nats_url;
        let held = file.clone();
        namespaces[2].block_on(async move {
            common::rhio_import_ok(&c_url, &held, &format!("held{round}")).await
        });
        let (a_url, b_url) = (cluster(0).nats_url, cluster(1).nats_url);
        let answer =
            namespaces[0].block_on(async { common::rhio_import_ok(&a_url, &file, name).await });
        let served_before = [served(&nodes[0]), served(&nodes[2])];
        let start = Instant::now();
        let summary = namespaces[1].block_on(async { super::announced_at(&b_url, name, 0).await });
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(summary["file_hash"], answer["file_hash"]);
        rhio.push(len as f64 / (1 << 20) as f64 / secs);
        let (from_a, from_c) = (
            served(&nodes[0]) - served_before[0],
            served(&nodes[2]) - served_before[1],
        );
        shares.push(from_c / (from_a + from_c));
        let key = format!("datasets/{name}/v0.parquet");
        rclone.push(rclone_in(
            Some(&namespaces[1].name),
            &a_from_b,
            &cluster(1),
            &key,
            &format!("baseline/rclone-{round}.parquet"),
            len,
        ));
        let (from, to) = (a_from_b.clone(), cluster(1));
        let target = format!("baseline/sdk-{round}.parquet");
        sdk.push(
            namespaces[1].block_on(async move { replicate_sdk(&from, &to, &key, &target).await }),
        );
        let _ = std::fs::remove_file(&file);
    }
    let (r, rc, sd) = (
        median(rhio.clone()),
        median(rclone.clone()),
        median(sdk.clone()),
    );
    let best = rc.max(sd);
    rows.push((
        "replication".into(),
        format!(
            "{mib} MiB A -> B, links capped at {CAP_MBIT} Mbit/s, C also holds it (vs the better of rclone {rc:.0} and SDK {sd:.0} MiB/s from A)"
        ),
        format!("{r:.1} MiB/s"),
        format!("{best:.1} MiB/s"),
        format!("{:.2}x", r / best),
    ));
    results.insert("capped_mib_s".into(), json!(r));
    results.insert("capped_runs".into(), json!(rhio));
    results.insert("capped_rclone_runs".into(), json!(rclone));
    results.insert("capped_sdk_runs".into(), json!(sdk));
    results.insert("capped_link_mbit".into(), json!(CAP_MBIT));
    rows.push((
        "replication".into(),
        "  share of those bytes served by C (the second holder)".into(),
        format!("{:.0} %", median(shares.clone()) * 100.0),
        "-".into(),
        "-".into(),
    ));
    results.insert("capped_share_from_c".into(), json!(shares));
    // The nodes stop before the servers, and the servers before their namespaces go.
    drop(nodes);
    drop(envs);
}
