//! A deterministic simulator of [`crate::broadcast`] nodes: in-process, virtual time, no sockets.
//!
//! It builds a random connected graph (each node with `min_degree`..=`max_degree` neighbours, as
//! an overlay's active view would give), delivers messages after 1..=`max_latency` ticks, can cut
//! links and partition the network, and checks what matters: every node delivers every operation
//! exactly once, per author log in order. It counts what crossed the network, so the modes can
//! be compared: body transmissions, digests and bytes per operation, and hops to full delivery.

use std::collections::{BTreeMap, BTreeSet};

use crate::broadcast::{Action, Message, Mode, Node, NodeId, OpId};

/// Bytes a body transmission costs besides the body (signed header and framing).
pub const HEADER_BYTES: u64 = 200;
/// Bytes of one digest (author key and sequence number).
pub const DIGEST_BYTES: u64 = 40;
/// Bytes of a control message (prune, graft, frame overhead).
pub const CONTROL_BYTES: u64 = 8;

#[derive(Debug, Clone)]
pub struct Config {
    pub nodes: usize,
    pub min_degree: usize,
    pub max_degree: usize,
    pub mode: Mode,
    pub graft_timeout: u64,
    pub max_latency: u64,
    pub body_bytes: u64,
    pub seed: u64,
}

impl Config {
    pub fn new(nodes: usize, mode: Mode) -> Self {
        Self {
            nodes,
            min_degree: 3,
            max_degree: 6,
            mode,
            graft_timeout: 4,
            max_latency: 3,
            body_bytes: 256,
            seed: 1,
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub nodes: usize,
    pub links: usize,
    pub operations: usize,
    /// Body transmissions per operation, over all operations.
    pub bodies_per_op: f64,
    /// Body transmissions per operation over the second half of the operations (after a tree
    /// had time to form).
    pub steady_bodies_per_op: f64,
    pub digests_per_op: f64,
    /// Every byte sent (bodies, digests, control), per operation.
    pub bytes_per_op: f64,
    /// Largest hop count at which a node delivered an operation.
    pub max_hops: u32,
    pub mean_hops: f64,
    /// Largest number of ticks from publishing an operation to its delivery everywhere.
    pub max_ticks_to_all: u64,
    /// Deliveries missing at the end (must be 0).
    pub undelivered: usize,
    /// Deliveries out of order or repeated (must be empty).
    pub violations: Vec<String>,
}

/// A small deterministic generator (xorshift64*): runs are reproducible from the seed.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn link(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    (a.min(b), a.max(b))
}

pub struct Simulation {
    config: Config,
    nodes: Vec<Node>,
    links: BTreeSet<(NodeId, NodeId)>,
    cut: BTreeSet<(NodeId, NodeId)>,
    queue: BTreeMap<u64, Vec<(NodeId, NodeId, Message)>>,
    now: u64,
    rng: Rng,
    published: BTreeMap<OpId, u64>,
    /// Per node: the next sequence number expected per author, for the order check.
    expected: Vec<BTreeMap<NodeId, u64>>,
    /// Per operation: how many nodes delivered it, and when the last one did.
    reached: BTreeMap<OpId, (usize, u64)>,
    bodies: BTreeMap<OpId, u64>,
    digests: u64,
    bytes: u64,
    hops: Vec<u32>,
    violations: Vec<String>,
}

impl Simulation {
    /// A random connected graph: a random tree, then random links until every node has
    /// `min_degree` neighbours (none over `max_degree`).
    pub fn new(config: Config) -> Self {
        let mut rng = Rng(config.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let n = config.nodes as u64;
        let mut links = BTreeSet::new();
        let mut degree = vec![0usize; config.nodes];
        let add = |links: &mut BTreeSet<_>, degree: &mut Vec<usize>, a: u64, b: u64| {
            if a == b || !links.insert(link(a as NodeId, b as NodeId)) {
                return;
            }
            degree[a as usize] += 1;
            degree[b as usize] += 1;
        };
        for i in 1..n {
            // A parent with room, so the tree respects the degree cap.
            let mut parent = rng.below(i);
            for _ in 0..8 {
                if degree[parent as usize] < config.max_degree - 1 {
                    break;
                }
                parent = rng.below(i);
            }
            add(&mut links, &mut degree, i, parent);
        }
        for i in 0..n {
            let mut attempts = 0;
            while degree[i as usize] < config.min_degree && attempts < 64 {
                attempts += 1;
                let other = rng.below(n);
                if degree[other as usize] < config.max_degree {
                    add(&mut links, &mut degree, i, other);
                }
            }
        }
        let mut simulation = Self {
            nodes: (0..config.nodes)
                .map(|i| Node::new(i as NodeId, config.mode, config.graft_timeout))
                .collect(),
            expected: vec![BTreeMap::new(); config.nodes],
            config,
            links: BTreeSet::new(),
            cut: BTreeSet::new(),
            queue: BTreeMap::new(),
            now: 0,
            rng,
            published: BTreeMap::new(),
            reached: BTreeMap::new(),
            bodies: BTreeMap::new(),
            digests: 0,
            bytes: 0,
            hops: Vec::new(),
            violations: Vec::new(),
        };
        for (a, b) in links {
            simulation.connect(a, b);
        }
        simulation
    }

    pub fn links(&self) -> &BTreeSet<(NodeId, NodeId)> {
        &self.links
    }

    pub fn now(&self) -> u64 {
        self.now
    }

    fn connect(&mut self, a: NodeId, b: NodeId) {
        self.links.insert(link(a, b));
        let actions = self.nodes[a as usize].link_up(b);
        self.apply(a, actions);
        let actions = self.nodes[b as usize].link_up(a);
        self.apply(b, actions);
    }

    /// Cuts the link between `a` and `b`: messages on it are lost until [`Simulation::heal`].
    pub fn cut(&mut self, a: NodeId, b: NodeId) {
        if self.links.contains(&link(a, b)) && self.cut.insert(link(a, b)) {
            self.nodes[a as usize].link_down(b);
            self.nodes[b as usize].link_down(a);
        }
    }

    /// Cuts every link between `side` and the rest; returns how many.
    pub fn partition(&mut self, side: &BTreeSet<NodeId>) -> usize {
        let crossing: Vec<_> = self
            .links
            .iter()
            .filter(|(a, b)| side.contains(a) != side.contains(b))
            .copied()
            .collect();
        for (a, b) in &crossing {
            self.cut(*a, *b);
        }
        crossing.len()
    }

    /// Restores every cut link (each end starts a session: heights, then catch-up).
    pub fn heal(&mut self) {
        for (a, b) in std::mem::take(&mut self.cut) {
            self.connect(a, b);
        }
    }

    /// `node` publishes an operation of its own log.
    pub fn publish(&mut self, node: NodeId) -> OpId {
        let actions = self.nodes[node as usize].publish();
        let id = actions
            .iter()
            .find_map(|action| match action {
                Action::Deliver { id, .. } => Some(*id),
                _ => None,
            })
            .expect("a published operation is delivered locally");
        self.published.insert(id, self.now);
        self.apply(node, actions);
        id
    }

    fn apply(&mut self, node: NodeId, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Deliver { id, hops } => {
                    let expected = self.expected[node as usize].entry(id.author).or_insert(0);
                    if id.seq != *expected {
                        self.violations.push(format!(
                            "node {node} delivered {}/{} expecting {}",
                            id.author, id.seq, expected
                        ));
                    }
                    *expected = id.seq + 1;
                    let reached = self.reached.entry(id).or_insert((0, 0));
                    reached.0 += 1;
                    reached.1 = self.now;
                    if id.author != node {
                        self.hops.push(hops);
                    }
                }
                Action::Send { to, message } => {
                    match &message {
                        Message::Body { id, .. } => {
                            *self.bodies.entry(*id).or_insert(0) += 1;
                            self.bytes += HEADER_BYTES + self.config.body_bytes;
                        }
                        Message::IHave(ids) => {
                            self.digests += ids.len() as u64;
                            self.bytes += CONTROL_BYTES + DIGEST_BYTES * ids.len() as u64;
                        }
                        Message::Heights(heights) => {
                            self.bytes += CONTROL_BYTES + DIGEST_BYTES * heights.len() as u64;
                        }
                        Message::Graft(_) | Message::Prune => self.bytes += CONTROL_BYTES,
                    }
                    if self.cut.contains(&link(node, to)) {
                        continue;
                    }
                    let latency = 1 + self.rng.below(self.config.max_latency);
                    self.queue
                        .entry(self.now + latency)
                        .or_default()
                        .push((to, node, message));
                }
            }
        }
    }

    /// One tick: messages due now arrive, then every node's clock ticks.
    pub fn step(&mut self) {
        self.now += 1;
        if let Some(arrivals) = self.queue.remove(&self.now) {
            for (to, from, message) in arrivals {
                if self.cut.contains(&link(to, from)) {
                    continue;
                }
                let actions = self.nodes[to as usize].receive(from, message);
                self.apply(to, actions);
            }
        }
        for i in 0..self.nodes.len() {
            let actions = self.nodes[i].tick(self.now);
            self.apply(i as NodeId, actions);
        }
    }

    /// True when every node has every published operation.
    pub fn complete(&self) -> bool {
        self.published
            .keys()
            .all(|id| self.nodes.iter().all(|node| node.has(id)))
    }

    /// Steps until every node has everything and no message is in flight (or `limit` ticks).
    pub fn settle(&mut self, limit: u64) {
        let until = self.now + limit;
        while self.now < until && !(self.queue.is_empty() && self.complete()) {
            self.step();
        }
    }

    pub fn report(&self) -> Report {
        let operations = self.published.len();
        let per_op = |total: u64| total as f64 / operations.max(1) as f64;
        let second_half: Vec<&OpId> = self.published.keys().skip(operations / 2).collect();
        let steady: u64 = second_half
            .iter()
            .map(|id| self.bodies.get(id).copied().unwrap_or(0))
            .sum();
        let undelivered = self
            .published
            .keys()
            .map(|id| {
                self.nodes.len()
                    - self
                        .reached
                        .get(id)
                        .map_or(0, |(count, _)| *count)
                        .min(self.nodes.len())
            })
            .sum();
        let mut violations = self.violations.clone();
        for (id, (count, _)) in &self.reached {
            if *count > self.nodes.len() {
                violations.push(format!("{}/{} delivered {count} times", id.author, id.seq));
            }
        }
        Report {
            nodes: self.nodes.len(),
            links: self.links.len(),
            operations,
            bodies_per_op: per_op(self.bodies.values().sum()),
            steady_bodies_per_op: steady as f64 / second_half.len().max(1) as f64,
            digests_per_op: per_op(self.digests),
            bytes_per_op: per_op(self.bytes),
            max_hops: self.hops.iter().copied().max().unwrap_or(0),
            mean_hops: self.hops.iter().map(|h| *h as f64).sum::<f64>()
                / self.hops.len().max(1) as f64,
            max_ticks_to_all: self
                .published
                .iter()
                .filter_map(|(id, at)| {
                    let (count, last) = self.reached.get(id)?;
                    (*count >= self.nodes.len()).then_some(last - at)
                })
                .max()
                .unwrap_or(0),
            undelivered,
            violations,
        }
    }
}

/// The standard scenario: after the sessions started, node 0 publishes `operations` operations,
/// one every `interval` ticks, and the network settles.
pub fn broadcast_run(config: Config, operations: usize, interval: u64) -> Report {
    let mut simulation = Simulation::new(config);
    simulation.settle(100);
    for _ in 0..operations {
        simulation.publish(0);
        for _ in 0..interval {
            simulation.step();
        }
    }
    simulation.settle(10_000);
    simulation.report()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_exact(report: &Report) {
        assert_eq!(report.undelivered, 0, "{report:?}");
        assert!(report.violations.is_empty(), "{:?}", report.violations);
    }

    #[test]
    fn the_graph_is_connected_and_within_the_degree_bounds() {
        let simulation = Simulation::new(Config::new(200, Mode::Tree));
        let mut degree = BTreeMap::new();
        for (a, b) in simulation.links() {
            *degree.entry(*a).or_insert(0) += 1;
            *degree.entry(*b).or_insert(0) += 1;
        }
        assert_eq!(degree.len(), 200);
        assert!(degree.values().all(|d| (1..=6).contains(d)), "{degree:?}");
        let mut seen = BTreeSet::from([0]);
        let mut frontier = vec![0];
        while let Some(node) = frontier.pop() {
            for (a, b) in simulation.links() {
                let other = if *a == node {
                    *b
                } else if *b == node {
                    *a
                } else {
                    continue;
                };
                if seen.insert(other) {
                    frontier.push(other);
                }
            }
        }
        assert_eq!(seen.len(), 200);
    }

    #[test]
    fn flooding_delivers_everything_once_in_order_at_degree_cost() {
        let report = broadcast_run(Config::new(30, Mode::Flood), 40, 2);
        assert_exact(&report);
        // Every link carries the body, in one direction or both.
        assert!(report.bodies_per_op >= report.links as f64, "{report:?}");
    }

    #[test]
    fn a_tree_delivers_everything_once_in_order_with_about_one_body_per_node() {
        for seed in 1..=5 {
            let config = Config {
                seed,
                ..Config::new(50, Mode::Tree)
            };
            let report = broadcast_run(config, 60, 3);
            assert_exact(&report);
            assert!(
                report.steady_bodies_per_op <= 2.0 * 50.0,
                "seed {seed}: {report:?}"
            );
            let flood = broadcast_run(
                Config {
                    seed,
                    ..Config::new(50, Mode::Flood)
                },
                60,
                3,
            );
            assert!(report.steady_bodies_per_op < flood.steady_bodies_per_op / 1.5);
        }
    }

    #[test]
    fn a_healed_partition_converges_without_loss_or_duplicates() {
        for mode in [Mode::Flood, Mode::Tree] {
            let mut simulation = Simulation::new(Config::new(24, mode));
            simulation.settle(100);
            let side: BTreeSet<NodeId> = (0..12).collect();
            assert!(simulation.partition(&side) > 0);
            for _ in 0..10 {
                simulation.publish(0);
                simulation.publish(23);
                simulation.step();
            }
            simulation.settle(200);
            assert!(!simulation.complete(), "the sides are apart");
            simulation.heal();
            simulation.settle(10_000);
            assert!(simulation.complete(), "{mode:?}");
            assert_exact(&simulation.report());
        }
    }

    #[test]
    fn failed_links_are_routed_around() {
        let mut simulation = Simulation::new(Config::new(40, Mode::Tree));
        simulation.settle(100);
        for _ in 0..10 {
            simulation.publish(0);
            simulation.step();
        }
        simulation.settle(1_000);
        // Cut a third of the links: the tree has holes that digests and grafts repair.
        let links: Vec<_> = simulation.links().iter().copied().step_by(3).collect();
        for (a, b) in &links {
            simulation.cut(*a, *b);
        }
        for _ in 0..20 {
            simulation.publish(0);
            simulation.step();
        }
        simulation.settle(10_000);
        simulation.heal();
        simulation.settle(10_000);
        assert!(simulation.complete());
        assert_exact(&simulation.report());
    }
}
