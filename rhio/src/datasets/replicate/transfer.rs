//! One version being replicated: its parts (pieces from this cluster's S3 or from peers), the
//! range fetches with their verification, the outboards of the new blobs, and completion.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use bao_tree::io::outboard::PostOrderMemOutboard;
use bao_tree::io::sync::OutboardMut;
use bao_tree::{BaoTree, TreeNode};
use futures::StreamExt;
use rhio_core::manifest::DatasetManifest;
use rhio_core::replication::{
    PartPlan, PieceSource, ReplicationPlan, file_hash_from_parts, part_chaining_value,
};

use super::{ReplicationError, Replicator};
use crate::blobs::BAO_BLOCK_SIZE;
use crate::blobs::protocol::{FetchError, RangeRequest, fetch_range};
use crate::datasets::transfers::{DonePart, VersionId};
use crate::s3::keys;

/// Pieces of one part gathered at once (and outboards written at once). With the default 4
/// parts in flight a peer gets at most 8 requests from one transfer: the server's per-peer limit.
const PIECES_IN_FLIGHT: usize = 2;
/// Rounds over all peers before a range is given up (the version is retried later).
const FETCH_ROUNDS: usize = 20;
/// Pause between rounds over the peers for one range.
const FETCH_RETRY: crate::retry::Backoff =
    crate::retry::Backoff::new(Duration::from_millis(250), Duration::from_secs(2));

/// Verified parent hash pairs of the blobs fetched in one transfer, kept to write their
/// outboards (every range answer carries the parents above it, so ranges covering a blob carry
/// its whole outboard).
#[derive(Default)]
pub(super) struct OutboardCollector {
    blobs: HashMap<usize, (PostOrderMemOutboard, HashSet<TreeNode>)>,
}

impl OutboardCollector {
    fn add(
        &mut self,
        blob: usize,
        hash: blake3::Hash,
        size: u64,
        parents: &[(TreeNode, (blake3::Hash, blake3::Hash))],
    ) {
        let (outboard, seen) = self.blobs.entry(blob).or_insert_with(|| {
            let tree = BaoTree::new(size, BAO_BLOCK_SIZE);
            (
                PostOrderMemOutboard {
                    root: hash,
                    tree,
                    data: vec![0u8; tree.outboard_size() as usize],
                },
                HashSet::new(),
            )
        });
        for (node, pair) in parents {
            if outboard.save(*node, pair).is_ok() {
                seen.insert(*node);
            }
        }
    }

    /// The complete outboard of a blob, when every parent was seen.
    fn take(&mut self, blob: usize) -> Option<Vec<u8>> {
        let (outboard, seen) = self.blobs.remove(&blob)?;
        (seen.len() as u64 * 64 == outboard.tree.outboard_size()).then_some(outboard.data)
    }
}

/// One version being replicated.
pub(super) struct Transfer<'a> {
    pub(super) replicator: &'a Replicator,
    pub(super) id: &'a VersionId,
    pub(super) manifest: &'a DatasetManifest,
    pub(super) key: &'a str,
    pub(super) upload_id: &'a str,
    pub(super) outboards: Mutex<OutboardCollector>,
}

impl Transfer<'_> {
    pub(super) async fn run(
        &self,
        plan: &ReplicationPlan,
        done: Vec<DonePart>,
    ) -> Result<(), ReplicationError> {
        let done_numbers: HashSet<u32> = done.iter().map(|p| p.number).collect();
        let single = plan.parts.len() == 1;
        let todo: Vec<PartPlan> = plan
            .parts
            .iter()
            .filter(|p| !done_numbers.contains(&p.number))
            .cloned()
            .collect();
        let mut parts = done;
        let mut uploads = futures::stream::iter(todo)
            .map(|part| async move { self.part(&part, single).await })
            .buffer_unordered(self.replicator.config.parts_in_flight);
        while let Some(result) = uploads.next().await {
            parts.push(result?);
        }
        drop(uploads);
        parts.sort_by_key(|p| p.number);
        let hash = if single {
            blake3::Hash::from_bytes(parts[0].hash)
        } else {
            let cvs: Vec<[u8; 32]> = parts.iter().map(|p| p.hash).collect();
            file_hash_from_parts(&cvs, plan.part_size, self.manifest.file_size, None)
        };
        if hash.to_hex().as_str() != self.manifest.file_hash {
            return Err(ReplicationError::FileHash {
                expected: self.manifest.file_hash.clone(),
                actual: hash.to_hex().to_string(),
            });
        }
        let s3 = &self.replicator.s3;
        let numbered: Vec<(u32, String)> =
            parts.iter().map(|p| (p.number, p.etag.clone())).collect();
        if let Err(err) = s3
            .complete_upload(self.key, self.upload_id, &numbered)
            .await
        {
            // Completed before a crash, but not yet recorded: the object is there, verified.
            if !s3.exists(self.key).await.unwrap_or(false) {
                return Err(ReplicationError::Storage(err));
            }
        }
        self.store_outboards(plan).await?;
        s3.put(
            &keys::manifest(&self.id.dataset, Some(&self.id.author), self.id.version),
            self.manifest.encode(),
        )
        .await
        .map_err(ReplicationError::Storage)?;
        // Available and queued for announcement in one step: the outbox announces it until
        // JetStream acknowledges, also across a crash or a NATS outage.
        let announcement = crate::datasets::transfers::Announcement {
            id: self.id.clone(),
            subject: rhio_core::sync::dataset_subject(
                &self.replicator.datasets.subject_prefix,
                &self.id.dataset,
            ),
            location: format!("s3://{}/{}", s3.bucket(), self.key),
        };
        self.replicator
            .state
            .finish(self.id, self.key, &announcement)
            .await?;
        self.replicator.outbox.wake();
        self.replicator
            .index
            .insert_manifest(self.manifest, self.key);
        Ok(())
    }

    /// Writes the outboards of the blobs that came from peers, so this node can serve them
    /// ([`PIECES_IN_FLIGHT`] PUTs at a time: a version of many row groups has many).
    async fn store_outboards(&self, plan: &ReplicationPlan) -> Result<(), ReplicationError> {
        let puts: Vec<_> = plan
            .remote_blobs
            .iter()
            .map(|&blob| self.store_outboard(blob))
            .collect();
        let mut puts = futures::stream::iter(puts).buffer_unordered(PIECES_IN_FLIGHT);
        while let Some(put) = puts.next().await {
            put?;
        }
        Ok(())
    }

    async fn store_outboard(&self, blob: usize) -> Result<(), ReplicationError> {
        let entry = &self.manifest.blobs[blob];
        let hash = blake3::Hash::from_hex(&entry.hash)
            .map_err(|err| ReplicationError::Manifest(err.to_string()))?;
        let collected = self.outboards.lock().expect("outboards lock").take(blob);
        let outboard = match collected {
            Some(outboard) => outboard,
            None => self.outboard_from_object(blob, hash).await?,
        };
        self.replicator
            .s3
            .put(&keys::outboard(&hash), outboard)
            .await
            .map_err(ReplicationError::Storage)
    }

    /// The outboard of a blob whose ranges were fetched before a restart (their parents are
    /// gone with the old process): computed from the completed object in this cluster's S3.
    async fn outboard_from_object(
        &self,
        blob: usize,
        hash: blake3::Hash,
    ) -> Result<Vec<u8>, ReplicationError> {
        let entry = &self.manifest.blobs[blob];
        let builder = crate::blobs::OutboardBuilder::start(entry.length);
        let step = 8 << 20;
        let mut start = 0;
        while start < entry.length {
            let end = (start + step).min(entry.length);
            let data = self
                .replicator
                .s3
                .get_range(self.key, Some((entry.offset + start, end - start)))
                .await
                .map_err(ReplicationError::Storage)?;
            builder
                .feed(data)
                .await
                .map_err(|err| ReplicationError::Internal(err.to_string()))?;
            start = end;
        }
        let (root, outboard) = builder
            .finish()
            .await
            .map_err(|err| ReplicationError::Internal(err.to_string()))?;
        if root != hash {
            return Err(ReplicationError::Internal(format!(
                "blob {hash} in the completed object hashes to {root}"
            )));
        }
        Ok(outboard)
    }

    /// Gathers one part's bytes, uploads it and records it. The pieces of a part (one per blob
    /// it touches) are gathered [`PIECES_IN_FLIGHT`] at a time: a part of many small row groups
    /// would otherwise pay a round trip per blob in turn.
    async fn part(&self, part: &PartPlan, single: bool) -> Result<DonePart, ReplicationError> {
        let mut bytes = vec![0u8; part.length as usize];
        let mut slots = Vec::with_capacity(part.pieces.len());
        let mut rest = bytes.as_mut_slice();
        for piece in &part.pieces {
            let (slot, tail) = std::mem::take(&mut rest).split_at_mut(piece.len() as usize);
            slots.push(slot);
            rest = tail;
        }
        // The futures are made first and then run (a closure inside the stream would make the
        // worker's future not provably Send).
        let pieces: Vec<_> = (part.pieces.iter().zip(slots).enumerate())
            .map(|(i, (piece, slot))| self.piece(piece, part.number + i as u32, slot))
            .collect();
        let mut gathering = futures::stream::iter(pieces).buffer_unordered(PIECES_IN_FLIGHT);
        let mut wire_bytes = 0;
        while let Some(wire) = gathering.next().await {
            wire_bytes += wire?;
        }
        drop(gathering);
        let offset = part.offset;
        let (bytes, hash) = tokio::task::spawn_blocking(move || {
            let hash = if single {
                *blake3::hash(&bytes).as_bytes()
            } else {
                part_chaining_value(offset, &bytes)
            };
            (bytes, hash)
        })
        .await
        .map_err(|err| ReplicationError::Internal(err.to_string()))?;
        let etag = self
            .replicator
            .s3
            .upload_part(self.key, self.upload_id, part.number, bytes)
            .await
            .map_err(ReplicationError::Storage)?;
        let done = DonePart {
            number: part.number,
            etag,
            hash,
            wire_bytes,
        };
        self.replicator.state.record_part(self.id, &done).await?;
        self.replicator.transfers.update(self.id, |status| {
            status.parts_done += 1;
            status.bytes_done += part.length;
        });
        Ok(done)
    }

    /// One piece of a part into `slot`: read from this cluster's S3 when the blob is here,
    /// fetched verified from a peer otherwise. Returns the bytes that came over the wire.
    async fn piece(
        &self,
        piece: &rhio_core::replication::Piece,
        rotation: u32,
        slot: &mut [u8],
    ) -> Result<u64, ReplicationError> {
        match &piece.source {
            PieceSource::Local(local) => {
                let data = self
                    .replicator
                    .s3
                    .get_exact(&local.key, local.offset + piece.start, piece.len())
                    .await
                    .map_err(ReplicationError::Storage)?;
                self.replicator
                    .metrics
                    .replication_bytes_local
                    .inc_by(piece.len());
                slot.copy_from_slice(&data);
                Ok(0)
            }
            PieceSource::Remote => {
                self.fetch(piece.blob, piece.start, piece.end, rotation, slot)
                    .await
            }
        }
    }

    /// Fetches a verified range of a blob into `out` from whichever peer can serve it; peers are
    /// tried in an order rotated by `rotation`, so parts spread over peers. Returns the bytes
    /// that came over the wire.
    async fn fetch(
        &self,
        blob: usize,
        start: u64,
        end: u64,
        rotation: u32,
        out: &mut [u8],
    ) -> Result<u64, ReplicationError> {
        let entry = &self.manifest.blobs[blob];
        let hash = blake3::Hash::from_hex(&entry.hash)
            .map_err(|err| ReplicationError::Manifest(err.to_string()))?;
        let request = RangeRequest {
            hash,
            size: entry.length,
            start,
            end,
        };
        let peers = &self.replicator.peers;
        let timeout = Duration::from_secs(self.replicator.config.request_timeout_secs);
        let mut last = "no other member".to_string();
        for round in 0..FETCH_ROUNDS {
            // Any member may hold the blob; the list follows membership changes.
            let candidates = peers.network.members().others();
            let count = candidates.len();
            let mut tried = 0;
            for i in 0..count {
                let peer = candidates[(i + rotation as usize) % count];
                if self.replicator.bad_sources.contains(peer, hash) || peers.cooling(&peer) {
                    continue;
                }
                tried += 1;
                let connection = match peers.connection(peer).await {
                    Ok(connection) => connection,
                    Err(err) => {
                        peers.cool(peer);
                        last = format!("{peer}: {err}");
                        continue;
                    }
                };
                match fetch_range(&connection, request, timeout, out).await {
                    Ok(fetched) => {
                        let metrics = &self.replicator.metrics;
                        metrics.replication_bytes_fetched.inc_by(fetched.wire_bytes);
                        self.outboards.lock().expect("outboards lock").add(
                            blob,
                            hash,
                            entry.length,
                            &fetched.parents,
                        );
                        self.replicator.transfers.update(self.id, |status| {
                            status.bytes_fetched += fetched.wire_bytes;
                            if !status.peers.contains(&peer) {
                                status.peers.push(peer);
                            }
                        });
                        return Ok(fetched.wire_bytes);
                    }
                    Err(FetchError::Corrupt(detail)) => {
                        self.replicator.metrics.replication_corrupt_ranges.inc();
                        tracing::warn!(%peer, dataset = %self.id.dataset, blob = %hash, detail, "peer sent data that does not verify; not asking it for this blob again");
                        self.replicator.bad_sources.insert(peer, hash);
                        last = format!("{peer}: corrupt data");
                    }
                    Err(FetchError::NotFound) => last = format!("{peer}: does not have it"),
                    Err(FetchError::Refused(why)) => last = format!("{peer}: {why}"),
                    Err(FetchError::Transport(err)) => {
                        peers.forget(&peer).await;
                        peers.cool(peer);
                        last = format!("{peer}: {err}");
                    }
                }
            }
            if tried == 0 && round > 0 && self.all_bad(hash) {
                break;
            }
            tokio::time::sleep(crate::retry::delay(FETCH_RETRY, round as u32)).await;
        }
        Err(ReplicationError::NoSource {
            hash: entry.hash.clone(),
            start,
            end,
            last,
        })
    }

    fn all_bad(&self, hash: blake3::Hash) -> bool {
        let members = self.replicator.peers.network.members().others();
        self.replicator.bad_sources.all(&members, hash)
    }
}
