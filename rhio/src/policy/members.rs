//! Who belongs to the network: the allow-list of member node keys.
//!
//! Members are the nodes that may open sync sessions, fetch blobs and author operations that
//! every node relays. The list is `network.members` plus the keys in `network.members_file`
//! (read again every [`REFRESH`], so a member can be added or removed without a restart); when
//! neither is set, the configured known nodes are the members (a hand-wired network, as before
//! members existed). This node is always a member of its own network.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rhio_core::identity::PublicKey;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::NetworkConfig;

/// Why the members file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MembersError {
    #[error("network.members_file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("network.members_file {path}: line {line}: {reason}")]
    BadKey {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// How often the members file is read again.
pub const REFRESH: Duration = Duration::from_secs(2);

/// The current members; cloning is cheap and every clone sees changes.
#[derive(Debug, Clone)]
pub struct Members {
    own: PublicKey,
    fixed: Arc<BTreeSet<PublicKey>>,
    file: Option<PathBuf>,
    current: Arc<RwLock<Arc<BTreeSet<PublicKey>>>>,
    /// Bumped whenever the list changes, so long sessions can check their peer again.
    changes: watch::Sender<u64>,
}

impl Members {
    /// Reads the configured members; an unreadable or malformed members file stops the start.
    pub fn from_config(config: &NetworkConfig, own: PublicKey) -> Result<Self, MembersError> {
        let mut fixed: BTreeSet<PublicKey> = config.members.iter().copied().collect();
        if fixed.is_empty() && config.members_file.is_none() {
            fixed.extend(config.known_nodes.iter().map(|node| node.public_key));
        }
        let members = Self {
            own,
            fixed: Arc::new(fixed),
            file: config.members_file.clone(),
            current: Default::default(),
            changes: watch::channel(0).0,
        };
        let from_file = match &members.file {
            Some(path) => read_file(path)?,
            None => Vec::new(),
        };
        members.set(from_file);
        Ok(members)
    }

    /// True when `key` may take part in the network (this node included).
    pub fn contains(&self, key: &PublicKey) -> bool {
        *key == self.own || self.snapshot().contains(key)
    }

    /// The other members.
    pub fn others(&self) -> Vec<PublicKey> {
        self.snapshot()
            .iter()
            .filter(|key| **key != self.own)
            .copied()
            .collect()
    }

    /// Notified whenever the list changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn snapshot(&self) -> Arc<BTreeSet<PublicKey>> {
        self.current.read().expect("members lock").clone()
    }

    /// Replaces the list with the fixed members plus `from_file`; true when it changed.
    fn set(&self, from_file: Vec<PublicKey>) -> bool {
        let mut next: BTreeSet<PublicKey> = self.fixed.iter().copied().collect();
        next.extend(from_file);
        let mut current = self.current.write().expect("members lock");
        if **current == next {
            return false;
        }
        for added in next.difference(&current) {
            tracing::info!(member = %added, "member added");
        }
        for removed in current.difference(&next) {
            tracing::warn!(member = %removed, "member removed: its sessions end and its requests are refused");
        }
        *current = Arc::new(next);
        drop(current);
        self.changes.send_modify(|version| *version += 1);
        true
    }

    /// Reads the members file again every [`REFRESH`] until shutdown. A file that cannot be
    /// read keeps the last list (with a warning) rather than locking every member out.
    pub async fn watch_file(self, shutdown: CancellationToken) {
        let Some(path) = self.file.clone() else {
            return;
        };
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(REFRESH) => {}
            }
            let read = {
                let path = path.clone();
                tokio::task::spawn_blocking(move || read_file(&path)).await
            };
            match read {
                Ok(Ok(keys)) => {
                    failing = false;
                    self.set(keys);
                }
                Ok(Err(err)) => {
                    if !failing {
                        tracing::warn!(%err, "members file unreadable; keeping the last list");
                    }
                    failing = true;
                }
                Err(_) => return,
            }
        }
    }
}

fn read_file(path: &Path) -> Result<Vec<PublicKey>, MembersError> {
    let text = std::fs::read_to_string(path).map_err(|source| MembersError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text).map_err(|(line, reason)| MembersError::BadKey {
        path: path.to_path_buf(),
        line,
        reason,
    })
}

/// Parses a members file: one hex public key per line; blank lines and `#` comments ignored.
/// A bad line is reported as (line number from 1, why).
pub fn parse(text: &str) -> Result<Vec<PublicKey>, (usize, String)> {
    let mut keys = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let key = line
            .parse::<PublicKey>()
            .map_err(|err| (number + 1, err.to_string()))?;
        keys.push(key);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KnownNode;
    use rhio_core::identity::PrivateKey;

    fn key() -> PublicKey {
        PrivateKey::generate().public_key()
    }

    #[test]
    fn members_file_lines_and_comments() {
        let (a, b) = (key(), key());
        let text = format!("# network acme\n{a}\n\n  {b}   # cluster b\n");
        assert_eq!(parse(&text).unwrap(), vec![a, b]);
        let (line, _) = parse(&format!("{a}\nnot-a-key\n")).unwrap_err();
        assert_eq!(line, 2);
    }

    #[test]
    fn known_nodes_are_the_members_only_without_a_list() {
        let (own, known, listed) = (key(), key(), key());
        let mut config = NetworkConfig {
            known_nodes: vec![KnownNode {
                public_key: known,
                addresses: vec!["127.0.0.1:1".parse().unwrap()],
            }],
            ..Default::default()
        };
        let members = Members::from_config(&config, own).unwrap();
        assert!(members.contains(&own) && members.contains(&known));
        assert!(!members.contains(&listed));
        assert_eq!(members.others(), vec![known]);

        config.members = vec![listed];
        let members = Members::from_config(&config, own).unwrap();
        assert!(members.contains(&listed) && members.contains(&own));
        assert!(
            !members.contains(&known),
            "a bootstrap node is no member by itself"
        );
    }

    #[tokio::test]
    async fn the_members_file_is_read_again() {
        let (own, a, b) = (key(), key(), key());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("members");
        std::fs::write(&path, format!("{a}\n{b}\n")).unwrap();
        let config = NetworkConfig {
            members_file: Some(path.clone()),
            ..Default::default()
        };
        let members = Members::from_config(&config, own).unwrap();
        assert!(members.contains(&a) && members.contains(&b));
        let mut changes = members.changes();
        std::fs::write(&path, format!("{a}\n")).unwrap();
        let shutdown = CancellationToken::new();
        let watcher = tokio::spawn(members.clone().watch_file(shutdown.clone()));
        tokio::time::timeout(Duration::from_secs(10), changes.changed())
            .await
            .unwrap()
            .unwrap();
        assert!(members.contains(&a) && !members.contains(&b));
        // A broken file keeps the last list.
        std::fs::write(&path, "garbage\n").unwrap();
        tokio::time::sleep(REFRESH * 2).await;
        assert!(members.contains(&a));
        shutdown.cancel();
        watcher.await.unwrap();

        std::fs::remove_file(&path).unwrap();
        assert!(Members::from_config(&config, own).is_err());
    }
}
