//! Spreading operations through a network of peers, as a state machine without I/O: a node takes
//! events (an operation published here, a message from a neighbour, a link up or down, a clock
//! tick) and returns the messages to send. [`crate::simulator`] runs many of them.
//!
//! Two modes:
//! - [`Mode::Flood`]: every node pushes every new operation's body to every neighbour, which is
//!   what rhio's sync sessions do today (live push on every session). Fast, but each operation
//!   crosses every link: about N x degree body transmissions per operation.
//! - [`Mode::Tree`]: PlumTree (Leitão et al., "Epidemic Broadcast Trees", 2007). Bodies go eagerly
//!   to *eager* peers only; *lazy* peers get a short digest ("I have it", batched per tick). A
//!   node that receives a body it already had answers `Prune`, moving the sender to its lazy set,
//!   so the eager links converge to a spanning tree and a body crosses about N - 1 links. A node
//!   that hears of an operation only by digest asks for it with `Graft` after `graft_timeout`
//!   ticks, which also moves that link back into the tree: the tree repairs itself when a link
//!   fails.
//!
//! In both modes a link that comes up starts with an exchange of log heights, and each side sends
//! the bodies the other lacks: the catch-up of a sync session, which is what heals a partition.
//! Operations are delivered per author log in sequence order, exactly once; later ones wait for
//! the gap to close.

use std::collections::{BTreeMap, BTreeSet};

/// A node of the simulated network.
pub type NodeId = u32;

/// An operation: its author's log and position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId {
    pub author: NodeId,
    pub seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Flood,
    Tree,
}

/// What nodes send each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// An operation's body; `hops` counts the links it crossed since it was published.
    Body { id: OpId, hops: u32 },
    /// Digests: the sender has these operations.
    IHave(Vec<OpId>),
    /// Send me this operation's body, and push bodies to me eagerly from now on.
    Graft(OpId),
    /// Stop pushing bodies to me eagerly (digests are enough).
    Prune,
    /// How far the sender has each author's log (the start of a session).
    Heights(BTreeMap<NodeId, u64>),
}

/// What a node asks its driver to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send {
        to: NodeId,
        message: Message,
    },
    /// Hand an operation to the application (in log order, once).
    Deliver {
        id: OpId,
        hops: u32,
    },
}

#[derive(Debug, Clone)]
pub struct Node {
    id: NodeId,
    mode: Mode,
    /// Ticks to wait for a body after its first digest before grafting.
    graft_timeout: u64,
    eager: BTreeSet<NodeId>,
    lazy: BTreeSet<NodeId>,
    /// Per author: the next sequence number to deliver.
    next: BTreeMap<NodeId, u64>,
    /// Received ahead of a gap, with their hop counts.
    held: BTreeMap<OpId, u32>,
    /// Announced by digest but not received: when first announced (or last grafted), and who
    /// announced it.
    missing: BTreeMap<OpId, (u64, Vec<NodeId>)>,
    /// Digests to send at the next tick, per peer.
    pending_digests: BTreeMap<NodeId, Vec<OpId>>,
    /// Own operations published so far.
    published: u64,
}

impl Node {
    pub fn new(id: NodeId, mode: Mode, graft_timeout: u64) -> Self {
        Self {
            id,
            mode,
            graft_timeout,
            eager: BTreeSet::new(),
            lazy: BTreeSet::new(),
            next: BTreeMap::new(),
            held: BTreeMap::new(),
            missing: BTreeMap::new(),
            pending_digests: BTreeMap::new(),
            published: 0,
        }
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// True when this node has (delivered) `id`.
    pub fn has(&self, id: &OpId) -> bool {
        self.next.get(&id.author).is_some_and(|next| id.seq < *next)
    }

    pub fn eager_peers(&self) -> &BTreeSet<NodeId> {
        &self.eager
    }

    /// A new operation of this node's own log.
    pub fn publish(&mut self) -> Vec<Action> {
        let id = OpId {
            author: self.id,
            seq: self.published,
        };
        self.published += 1;
        let mut actions = Vec::new();
        self.accept(id, 0, None, &mut actions);
        actions
    }

    /// A link to `peer` came up (new neighbour, or one back after a failure).
    pub fn link_up(&mut self, peer: NodeId) -> Vec<Action> {
        self.lazy.remove(&peer);
        self.eager.insert(peer);
        vec![Action::Send {
            to: peer,
            message: Message::Heights(self.next.clone()),
        }]
    }

    pub fn link_down(&mut self, peer: NodeId) {
        self.eager.remove(&peer);
        self.lazy.remove(&peer);
        self.pending_digests.remove(&peer);
    }

    pub fn receive(&mut self, from: NodeId, message: Message) -> Vec<Action> {
        let mut actions = Vec::new();
        match message {
            Message::Body { id, hops } => {
                if self.has(&id) || self.held.contains_key(&id) {
                    // A copy: in a tree, the link it came over is not needed for bodies.
                    if self.mode == Mode::Tree && self.eager.remove(&from) {
                        self.lazy.insert(from);
                        actions.push(Action::Send {
                            to: from,
                            message: Message::Prune,
                        });
                    }
                } else {
                    if self.mode == Mode::Tree && self.lazy.remove(&from) {
                        self.eager.insert(from);
                    }
                    self.accept(id, hops + 1, Some(from), &mut actions);
                }
            }
            Message::IHave(ids) => {
                for id in ids {
                    if !self.has(&id) && !self.held.contains_key(&id) {
                        // The clock of a first announcement is set at the next tick.
                        let entry = self.missing.entry(id).or_insert((u64::MAX, Vec::new()));
                        if !entry.1.contains(&from) {
                            entry.1.push(from);
                        }
                    }
                }
            }
            Message::Graft(id) => {
                self.lazy.remove(&from);
                self.eager.insert(from);
                if self.has(&id) {
                    actions.push(Action::Send {
                        to: from,
                        message: Message::Body { id, hops: 0 },
                    });
                }
            }
            Message::Prune => {
                if self.eager.remove(&from) {
                    self.lazy.insert(from);
                }
            }
            Message::Heights(theirs) => {
                // Catch-up: every operation we have that they lack, per log in order.
                for (author, next) in &self.next {
                    let from_seq = theirs.get(author).copied().unwrap_or(0);
                    for seq in from_seq..*next {
                        actions.push(Action::Send {
                            to: from,
                            message: Message::Body {
                                id: OpId {
                                    author: *author,
                                    seq,
                                },
                                hops: 0,
                            },
                        });
                    }
                }
            }
        }
        actions
    }

    /// The clock: sends batched digests and grafts what was announced but not received in time.
    pub fn tick(&mut self, now: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        for (peer, ids) in std::mem::take(&mut self.pending_digests) {
            if !ids.is_empty() {
                actions.push(Action::Send {
                    to: peer,
                    message: Message::IHave(ids),
                });
            }
        }
        let timeout = self.graft_timeout;
        for (id, (since, announcers)) in self.missing.iter_mut() {
            if *since == u64::MAX {
                *since = now;
                continue;
            }
            if now < *since + timeout || announcers.is_empty() {
                continue;
            }
            // Ask the first announcer, then the next one a timeout later.
            let peer = announcers.remove(0);
            *since = now;
            self.lazy.remove(&peer);
            self.eager.insert(peer);
            actions.push(Action::Send {
                to: peer,
                message: Message::Graft(*id),
            });
        }
        actions
    }

    /// Takes a new operation: delivers it (and what it unblocks) and passes it on.
    fn accept(&mut self, id: OpId, hops: u32, from: Option<NodeId>, actions: &mut Vec<Action>) {
        self.missing.remove(&id);
        let next = self.next.entry(id.author).or_insert(0);
        if id.seq != *next {
            self.held.insert(id, hops);
        } else {
            let mut seq = id.seq;
            let mut hop_count = hops;
            loop {
                actions.push(Action::Deliver {
                    id: OpId {
                        author: id.author,
                        seq,
                    },
                    hops: hop_count,
                });
                seq += 1;
                match self.held.remove(&OpId {
                    author: id.author,
                    seq,
                }) {
                    Some(hops) => hop_count = hops,
                    None => break,
                }
            }
            *self.next.get_mut(&id.author).expect("inserted above") = seq;
        }
        // Pass it on at once, even when held: a node behind a gap still relays.
        let (push, announce): (Vec<NodeId>, Vec<NodeId>) = match self.mode {
            Mode::Flood => (
                self.eager.iter().chain(&self.lazy).copied().collect(),
                Vec::new(),
            ),
            Mode::Tree => (
                self.eager.iter().copied().collect(),
                self.lazy.iter().copied().collect(),
            ),
        };
        for peer in push.into_iter().filter(|peer| Some(*peer) != from) {
            actions.push(Action::Send {
                to: peer,
                message: Message::Body { id, hops },
            });
        }
        for peer in announce.into_iter().filter(|peer| Some(*peer) != from) {
            self.pending_digests.entry(peer).or_default().push(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duplicate_body_prunes_the_link_it_came_over() {
        let mut node = Node::new(1, Mode::Tree, 3);
        node.link_up(2);
        node.link_up(3);
        let id = OpId { author: 9, seq: 0 };
        let actions = node.receive(2, Message::Body { id, hops: 1 });
        assert!(actions.contains(&Action::Deliver { id, hops: 2 }));
        assert!(actions.contains(&Action::Send {
            to: 3,
            message: Message::Body { id, hops: 2 }
        }));
        let actions = node.receive(3, Message::Body { id, hops: 1 });
        assert_eq!(
            actions,
            vec![Action::Send {
                to: 3,
                message: Message::Prune
            }]
        );
        assert_eq!(node.eager_peers(), &BTreeSet::from([2]));
    }

    #[test]
    fn a_digest_without_a_body_is_grafted_after_the_timeout() {
        let mut node = Node::new(1, Mode::Tree, 2);
        node.link_up(2);
        let id = OpId { author: 9, seq: 0 };
        node.receive(2, Message::Prune);
        node.receive(2, Message::IHave(vec![id]));
        assert!(node.tick(10).is_empty(), "the first tick starts the clock");
        assert!(node.tick(11).is_empty());
        assert_eq!(
            node.tick(12),
            vec![Action::Send {
                to: 2,
                message: Message::Graft(id)
            }]
        );
        assert!(node.eager_peers().contains(&2), "a graft repairs the tree");
    }

    #[test]
    fn operations_are_delivered_in_log_order_once() {
        let mut node = Node::new(1, Mode::Flood, 3);
        let op = |seq| OpId { author: 9, seq };
        let delivered = |actions: Vec<Action>| -> Vec<u64> {
            actions
                .into_iter()
                .filter_map(|action| match action {
                    Action::Deliver { id, .. } => Some(id.seq),
                    _ => None,
                })
                .collect()
        };
        assert!(delivered(node.receive(2, Message::Body { id: op(1), hops: 0 })).is_empty());
        assert_eq!(
            delivered(node.receive(2, Message::Body { id: op(0), hops: 0 })),
            vec![0, 1]
        );
        assert!(delivered(node.receive(3, Message::Body { id: op(1), hops: 0 })).is_empty());
    }

    #[test]
    fn heights_bring_a_peer_up_to_date() {
        let mut node = Node::new(1, Mode::Tree, 3);
        node.publish();
        node.publish();
        let actions = node.receive(2, Message::Heights(BTreeMap::from([(1, 1)])));
        assert_eq!(
            actions,
            vec![Action::Send {
                to: 2,
                message: Message::Body {
                    id: OpId { author: 1, seq: 1 },
                    hops: 0
                }
            }]
        );
    }
}
