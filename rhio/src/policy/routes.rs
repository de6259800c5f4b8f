//! Which authors and subjects this node accepts, and which it sends: the `[[publish]]` and
//! `[[subscribe]]` configuration as plain policy, asked by routing, the sync sessions, relay
//! retention and replication.

use std::collections::BTreeMap;

use rhio_core::identity::PublicKey;
use rhio_core::operation::LogId;
use rhio_core::sync::Interest;

use crate::config::{Config, PublishConfig};

/// Which authors and subjects this node accepts, and which it sends.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    pub publish: Vec<PublishConfig>,
    subscribe: BTreeMap<PublicKey, Vec<String>>,
    /// Stream name -> subjects it must capture (for creating streams).
    pub subscribe_streams: BTreeMap<String, Vec<String>>,
    /// Datasets of an author are accepted when a subject filter for that author matches
    /// `<datasets_prefix>.<name>`, the subject this node announces them on.
    pub datasets_prefix: String,
}

impl Routes {
    pub fn from_config(config: &Config) -> Self {
        // One publisher per stream: several [[publish]] entries on one stream share its durable
        // consumer and its cursor, so they are read as one route with all their subjects (two
        // consumers of one name would delete each other, and one cursor cannot serve two).
        let mut publish: Vec<PublishConfig> = Vec::new();
        for entry in &config.publish {
            match publish.iter_mut().find(|p| p.stream == entry.stream) {
                Some(route) => route.subjects.extend(entry.subjects.iter().cloned()),
                None => publish.push(entry.clone()),
            }
        }
        let mut subscribe: BTreeMap<PublicKey, Vec<String>> = BTreeMap::new();
        let mut subscribe_streams: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for entry in &config.subscribe {
            subscribe
                .entry(entry.public_key)
                .or_default()
                .extend(entry.subjects.iter().cloned());
            subscribe_streams
                .entry(entry.stream.clone())
                .or_default()
                .extend(entry.subjects.iter().cloned());
        }
        Self {
            publish,
            subscribe,
            subscribe_streams,
            datasets_prefix: config.datasets.subject_prefix.clone(),
        }
    }

    /// True when operations of `author` in `log` are accepted here.
    pub fn accepts(&self, author: &PublicKey, log: &LogId) -> bool {
        match log {
            LogId::Message(subject) => self
                .subscribe
                .get(author)
                .is_some_and(|filters| rhio_core::subject::matches_any(filters, subject)),
            LogId::Dataset(name) => self.subscribe.get(author).is_some_and(|filters| {
                rhio_core::subject::matches_any(
                    filters,
                    &rhio_core::sync::dataset_subject(&self.datasets_prefix, name),
                )
            }),
        }
    }

    pub fn accepts_author(&self, author: &PublicKey) -> bool {
        self.subscribe.contains_key(author)
    }

    /// What this node asks every peer for.
    pub fn interests(&self) -> Vec<Interest> {
        self.subscribe
            .iter()
            .map(|(author, subjects)| Interest {
                author: *author,
                subjects: subjects.clone(),
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.publish.is_empty() && self.subscribe.is_empty()
    }
}
