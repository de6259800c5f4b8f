//! The life of one dataset version in one cluster, as a state machine without I/O.
//!
//! One owner decides what happens next to a version: it feeds every event (a manifest stored,
//! a transfer result, an announcement acknowledged, a signed deprecation or deletion, a local
//! eviction, a restart) into [`VersionLife::apply`] and carries out the [`Action`]s it returns.
//! Import, replication, the outbox, the mirror and the garbage collector then only react to
//! transitions instead of each reading the others' tables.
//!
//! The rule that matters most: a deleted version is never available again. `Deleted` is
//! terminal, whatever arrives after it (a late transfer result, a peer offering the bytes, a
//! restart, a retry request); it only asks for its objects and tags to be removed.
//!
//! ```
//! use rhio_core::lifecycle::{Action, Event, Origin, Phase, VersionLife};
//!
//! let mut life = VersionLife::new(Origin::Replica);
//! assert_eq!(life.apply(Event::ManifestStored).unwrap(), vec![Action::StartTransfer]);
//! life.apply(Event::TransferDone).unwrap();
//! life.apply(Event::Deleted { reason: "personal data".into() }).unwrap();
//! assert!(life.apply(Event::TransferDone).is_err());
//! assert_eq!(life.phase(), &Phase::Deleted { reason: "personal data".into() });
//! ```

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Whether this cluster made the version (its own import) or copies it from another author.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Own,
    Replica,
}

/// Where a version is in its life here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Known from its manifest, nothing done yet.
    Known,
    /// This node's import is running (own versions).
    Importing,
    /// Being copied from peers (replicas).
    Transferring,
    /// The verified file is in this cluster's S3.
    Available,
    /// Removed here by local retention (`replication.keep_last`); can be fetched again.
    Evicted,
    /// Cannot be made available (its blobs do not make the signed file); can be retried.
    Failed { reason: String },
    /// Deleted by its author: terminal, never available again.
    Deleted { reason: String },
}

/// What happened to the version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Its signed manifest is in the store (an own import signed it, or it was received).
    ManifestStored,
    /// The file is complete and verified in this cluster's S3.
    TransferDone,
    /// The file cannot be made available.
    TransferFailed { reason: String },
    /// JetStream acknowledged the event announcing the current state.
    Announced,
    /// The registry holds the artifact (or its tags were removed, after a deletion).
    Mirrored,
    /// The author deprecated it (a signed operation): it stays available.
    Deprecated { reason: String },
    /// The author deleted it (a signed operation, kept as a tombstone).
    Deleted { reason: String },
    /// Local retention removed the copy here.
    Evicted,
    /// Fetch it again (`rhio.retry`, or a client asking for an evicted version).
    Retry,
    /// The node started again: work that was in flight is resumed.
    Restarted,
    /// The objects of a deleted or evicted version are gone from S3.
    ObjectsRemoved,
}

/// What the owner must do after a transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Start (or resume) copying the version from peers.
    StartTransfer,
    /// Stop a transfer in progress and abort its upload.
    StopTransfer,
    /// Announce the current state on the dataset subject (available, deprecated, deleted).
    Announce(Announcement),
    /// Push the version to the registry.
    Mirror,
    /// Remove the version's tags from the registry (`latest` moves to the newest live version).
    Unmirror,
    /// Remove the version's Parquet object; blobs, outboards and the manifest sidecar once no
    /// live version references them (the garbage collector decides, after the grace period).
    RemoveObjects,
}

/// The kind of event announced on the dataset subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Announcement {
    Available,
    Deprecated,
    Deleted,
}

/// An event that makes no sense in the current phase. The owner logs it and changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{event} while the version is {phase}")]
pub struct Illegal {
    pub phase: String,
    pub event: String,
}

/// One version's life here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionLife {
    origin: Origin,
    phase: Phase,
    /// Set by the author's deprecation; kept through eviction and retry.
    deprecated: Option<String>,
    /// The announcement JetStream has not acknowledged yet, if any.
    unannounced: Option<Announcement>,
    /// The registry has the version (or, after a deletion, still has its tags).
    mirrored: bool,
    /// A mirror push or tag removal was asked for and not confirmed yet.
    mirror_pending: bool,
}

impl VersionLife {
    pub fn new(origin: Origin) -> Self {
        Self {
            origin,
            phase: Phase::Known,
            deprecated: None,
            unannounced: None,
            mirrored: false,
            mirror_pending: false,
        }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// The author's reason, when the version is deprecated.
    pub fn deprecated(&self) -> Option<&str> {
        self.deprecated.as_deref()
    }

    /// True when the file may be served, read and mirrored: available and not deleted.
    pub fn is_live(&self) -> bool {
        self.phase == Phase::Available
    }

    /// The announcement waiting for JetStream's acknowledgement.
    pub fn unannounced(&self) -> Option<Announcement> {
        self.unannounced
    }

    pub fn is_mirrored(&self) -> bool {
        self.mirrored
    }

    /// Applies `event`: the new state and what to do, or [`Illegal`] (nothing changes).
    pub fn apply(&mut self, event: Event) -> Result<Vec<Action>, Illegal> {
        let illegal = |phase: &Phase, event: &Event| Illegal {
            phase: format!("{phase:?}"),
            event: format!("{event:?}"),
        };
        let mut actions = Vec::new();
        match (&self.phase, event) {
            // Deleted is terminal: only the clean-up it asked for is confirmed.
            (Phase::Deleted { .. }, Event::Announced) => {
                self.unannounced = None;
            }
            (Phase::Deleted { .. }, Event::Mirrored) => {
                self.mirrored = false;
                self.mirror_pending = false;
            }
            (Phase::Deleted { .. }, Event::ObjectsRemoved) => {}
            (Phase::Deleted { .. }, Event::Restarted) => {
                if let Some(kind) = self.unannounced {
                    actions.push(Action::Announce(kind));
                }
                if self.mirrored || self.mirror_pending {
                    actions.push(Action::Unmirror);
                }
                actions.push(Action::RemoveObjects);
            }
            (Phase::Deleted { .. }, Event::Deleted { .. }) => {}
            (phase @ Phase::Deleted { .. }, event) => return Err(illegal(phase, &event)),

            (phase, Event::Deleted { reason }) => {
                if matches!(phase, Phase::Transferring | Phase::Importing) {
                    actions.push(Action::StopTransfer);
                }
                let was_here = matches!(phase, Phase::Available | Phase::Evicted)
                    || matches!(phase, Phase::Transferring | Phase::Importing);
                if self.mirrored || self.mirror_pending {
                    actions.push(Action::Unmirror);
                    self.mirror_pending = true;
                }
                if was_here {
                    actions.push(Action::RemoveObjects);
                }
                self.phase = Phase::Deleted { reason };
                self.unannounced = Some(Announcement::Deleted);
                actions.push(Action::Announce(Announcement::Deleted));
            }

            (Phase::Known, Event::ManifestStored) => match self.origin {
                Origin::Own => self.phase = Phase::Importing,
                Origin::Replica => {
                    self.phase = Phase::Transferring;
                    actions.push(Action::StartTransfer);
                }
            },
            (Phase::Importing | Phase::Transferring, Event::ManifestStored) => {}
            (Phase::Importing | Phase::Transferring, Event::TransferDone) => {
                self.phase = Phase::Available;
                let kind = if self.deprecated.is_some() {
                    Announcement::Deprecated
                } else {
                    Announcement::Available
                };
                self.unannounced = Some(kind);
                actions.push(Action::Announce(kind));
                self.mirror_pending = true;
                actions.push(Action::Mirror);
            }
            (Phase::Importing | Phase::Transferring, Event::TransferFailed { reason }) => {
                self.phase = Phase::Failed { reason };
            }
            (Phase::Importing | Phase::Transferring, Event::Restarted) => {
                if self.origin == Origin::Replica {
                    actions.push(Action::StartTransfer);
                }
            }
            (Phase::Available, Event::Announced) => self.unannounced = None,
            (Phase::Available, Event::Mirrored) => {
                self.mirrored = true;
                self.mirror_pending = false;
            }
            (
                Phase::Available | Phase::Importing | Phase::Transferring,
                Event::Deprecated { reason },
            ) => {
                self.deprecated = Some(reason);
                if self.phase == Phase::Available {
                    self.unannounced = Some(Announcement::Deprecated);
                    actions.push(Action::Announce(Announcement::Deprecated));
                }
            }
            (
                Phase::Known | Phase::Evicted | Phase::Failed { .. },
                Event::Deprecated { reason },
            ) => {
                self.deprecated = Some(reason);
            }
            (Phase::Available, Event::Evicted) if self.origin == Origin::Replica => {
                self.phase = Phase::Evicted;
                actions.push(Action::RemoveObjects);
            }
            (Phase::Available, Event::Restarted) => {
                if let Some(kind) = self.unannounced {
                    actions.push(Action::Announce(kind));
                }
                if self.mirror_pending {
                    actions.push(Action::Mirror);
                }
            }
            (Phase::Evicted | Phase::Failed { .. }, Event::Retry)
                if self.origin == Origin::Replica =>
            {
                self.phase = Phase::Transferring;
                actions.push(Action::StartTransfer);
            }
            (Phase::Evicted, Event::ObjectsRemoved | Event::Restarted) => {}
            (Phase::Failed { .. }, Event::Restarted) => {}
            (Phase::Known, Event::Restarted) => {}
            (phase, event) => return Err(illegal(phase, &event)),
        }
        Ok(actions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn events() -> Vec<Event> {
        vec![
            Event::ManifestStored,
            Event::TransferDone,
            Event::TransferFailed {
                reason: "hash".into(),
            },
            Event::Announced,
            Event::Mirrored,
            Event::Deprecated {
                reason: "old".into(),
            },
            Event::Deleted {
                reason: "gone".into(),
            },
            Event::Evicted,
            Event::Retry,
            Event::Restarted,
            Event::ObjectsRemoved,
        ]
    }

    /// Every phase reachable from a fresh version, for both origins.
    fn reachable() -> Vec<VersionLife> {
        let mut seen: Vec<VersionLife> = Vec::new();
        let mut todo = vec![
            VersionLife::new(Origin::Own),
            VersionLife::new(Origin::Replica),
        ];
        while let Some(life) = todo.pop() {
            if seen.contains(&life) {
                continue;
            }
            for event in events() {
                let mut next = life.clone();
                if next.apply(event).is_ok() && !seen.contains(&next) {
                    todo.push(next);
                }
            }
            seen.push(life);
        }
        seen
    }

    #[test]
    fn every_event_in_every_reachable_state_is_a_transition_or_an_error_that_changes_nothing() {
        let states = reachable();
        assert!(states.len() >= 20, "{} states", states.len());
        for life in &states {
            for event in events() {
                let mut next = life.clone();
                match next.apply(event.clone()) {
                    Ok(_) => {}
                    Err(err) => {
                        assert_eq!(&next, life, "{err} changed the state");
                        assert!(!err.to_string().is_empty());
                    }
                }
            }
        }
    }

    #[test]
    fn a_replica_goes_from_known_to_available_announced_and_mirrored() {
        let mut life = VersionLife::new(Origin::Replica);
        assert_eq!(
            life.apply(Event::ManifestStored),
            Ok(vec![Action::StartTransfer])
        );
        assert_eq!(
            life.apply(Event::TransferDone),
            Ok(vec![
                Action::Announce(Announcement::Available),
                Action::Mirror
            ])
        );
        assert!(life.is_live());
        assert_eq!(life.unannounced(), Some(Announcement::Available));
        // A restart before the acknowledgements asks again.
        assert_eq!(
            life.apply(Event::Restarted),
            Ok(vec![
                Action::Announce(Announcement::Available),
                Action::Mirror
            ])
        );
        life.apply(Event::Announced).unwrap();
        life.apply(Event::Mirrored).unwrap();
        assert_eq!(life.apply(Event::Restarted), Ok(vec![]));
        assert!(life.is_mirrored() && life.unannounced().is_none());
    }

    #[test]
    fn an_own_import_is_never_transferred_nor_evicted() {
        let mut life = VersionLife::new(Origin::Own);
        assert_eq!(life.apply(Event::ManifestStored), Ok(vec![]));
        assert_eq!(life.phase(), &Phase::Importing);
        assert_eq!(life.apply(Event::Restarted), Ok(vec![]));
        life.apply(Event::TransferDone).unwrap();
        assert!(life.apply(Event::Evicted).is_err());
        assert!(life.apply(Event::Retry).is_err());
    }

    #[test]
    fn deprecation_keeps_the_version_and_announces_it() {
        let mut life = VersionLife::new(Origin::Replica);
        life.apply(Event::ManifestStored).unwrap();
        // Deprecated while still transferring: announced as deprecated once available.
        assert_eq!(
            life.apply(Event::Deprecated {
                reason: "v2 is out".into()
            }),
            Ok(vec![])
        );
        assert_eq!(
            life.apply(Event::TransferDone),
            Ok(vec![
                Action::Announce(Announcement::Deprecated),
                Action::Mirror
            ])
        );
        assert!(life.is_live());
        assert_eq!(life.deprecated(), Some("v2 is out"));
    }

    #[test]
    fn a_delete_mid_transfer_stops_it_and_cleans_up() {
        let mut life = VersionLife::new(Origin::Replica);
        life.apply(Event::ManifestStored).unwrap();
        assert_eq!(
            life.apply(Event::Deleted {
                reason: "licence".into()
            }),
            Ok(vec![
                Action::StopTransfer,
                Action::RemoveObjects,
                Action::Announce(Announcement::Deleted)
            ])
        );
        // The transfer's own result arrives late: refused, nothing changes.
        assert!(life.apply(Event::TransferDone).is_err());
        assert!(!life.is_live());
    }

    #[test]
    fn a_deleted_mirrored_version_loses_its_tags_also_across_a_restart() {
        let mut life = VersionLife::new(Origin::Replica);
        for event in [
            Event::ManifestStored,
            Event::TransferDone,
            Event::Announced,
            Event::Mirrored,
        ] {
            life.apply(event).unwrap();
        }
        assert_eq!(
            life.apply(Event::Deleted { reason: "x".into() }),
            Ok(vec![
                Action::Unmirror,
                Action::RemoveObjects,
                Action::Announce(Announcement::Deleted)
            ])
        );
        assert_eq!(
            life.apply(Event::Restarted),
            Ok(vec![
                Action::Announce(Announcement::Deleted),
                Action::Unmirror,
                Action::RemoveObjects
            ])
        );
        life.apply(Event::Announced).unwrap();
        life.apply(Event::Mirrored).unwrap();
        assert_eq!(
            life.apply(Event::Restarted),
            Ok(vec![Action::RemoveObjects])
        );
    }

    #[test]
    fn an_evicted_replica_can_be_fetched_again_but_a_deleted_one_cannot() {
        let mut life = VersionLife::new(Origin::Replica);
        for event in [Event::ManifestStored, Event::TransferDone] {
            life.apply(event).unwrap();
        }
        assert_eq!(life.apply(Event::Evicted), Ok(vec![Action::RemoveObjects]));
        assert_eq!(life.apply(Event::Retry), Ok(vec![Action::StartTransfer]));
        life.apply(Event::Deleted { reason: "x".into() }).unwrap();
        assert!(life.apply(Event::Retry).is_err());
        assert!(life.apply(Event::ManifestStored).is_err());
    }

    proptest! {
        /// Whatever the order of operations, transfer results, retries and restarts, once the
        /// deletion arrived the version is never live again and nothing asks to fetch,
        /// announce it as available or mirror it.
        #[test]
        fn a_deleted_version_never_becomes_available_again(
            origin in prop_oneof![Just(Origin::Own), Just(Origin::Replica)],
            before in proptest::collection::vec(0usize..11, 0..12),
            after in proptest::collection::vec(0usize..11, 0..24),
        ) {
            let all = events();
            let mut life = VersionLife::new(origin);
            for i in before {
                let _ = life.apply(all[i].clone());
            }
            life.apply(Event::Deleted { reason: "gone".into() }).unwrap();
            for i in after {
                let actions = life.apply(all[i].clone()).unwrap_or_default();
                prop_assert!(!life.is_live());
                let deleted = matches!(life.phase(), Phase::Deleted { .. });
                prop_assert!(deleted, "left the deleted phase: {:?}", life.phase());
                for action in actions {
                    prop_assert!(
                        !matches!(
                            action,
                            Action::StartTransfer
                                | Action::Mirror
                                | Action::Announce(Announcement::Available)
                                | Action::Announce(Announcement::Deprecated)
                        ),
                        "{action:?} after the deletion"
                    );
                }
            }
        }
    }
}
