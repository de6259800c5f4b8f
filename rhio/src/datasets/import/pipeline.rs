//! One import, after the source is open: the footer is partitioned into row-group blobs, the file
//! is read once (each chunk feeds its blob's hash and outboard, the whole-file hash and a
//! multipart upload part), the object is completed, the manifest signed, and the steps after
//! signing (sidecar, index, announcement outbox) finish the version. Every step after signing is
//! idempotent, so a retried import finishes what a failed one left.

use bytes::Bytes;
use futures::StreamExt;
use rhio_core::manifest::DatasetManifest;
use rhio_core::operation::LogId;
use rhio_core::parquet::{Partition, PartitionError, TAIL_LEN, footer_length, partition};

use super::source::{ChunkReader, Source};
use super::{ImportError, ImportReply, Importer};
use crate::blobs::{OutboardBuilder, OutboardError};
use crate::s3::{S3Store, keys};

/// Chunk read from the source at a time.
const READ_CHUNK: usize = 1 << 20;

impl Importer {
    pub(super) async fn import(
        &self,
        mut source: Source,
        dataset: &str,
        subject: &str,
    ) -> Result<ImportReply, ImportError> {
        let file_len = source.len();
        if file_len == 0 {
            return Err(PartitionError::Empty.into());
        }
        if file_len < rhio_core::parquet::MIN_FILE_LEN {
            return Err(PartitionError::NotParquet(format!(
                "{file_len} bytes is shorter than any Parquet file"
            ))
            .into());
        }
        let tail: [u8; TAIL_LEN] = source
            .read_range(&self.s3, file_len - TAIL_LEN as u64, TAIL_LEN as u64)
            .await?
            .try_into()
            .map_err(|_| ImportError::Internal("short read".into()))?;
        let footer_len = footer_length(file_len, &tail)?;
        let footer = source
            .read_range(&self.s3, file_len - footer_len, footer_len)
            .await?;
        let head = source.read_range(&self.s3, 0, 4).await?;
        let partition = partition(file_len, &head, &footer)?;

        let versions = self.versions(dataset).await?;
        let next_version = versions.len() as u64;
        let key = keys::own_version(dataset, next_version);
        let (blob_hashes, file_hash, mut upload) =
            self.upload(&mut source, &partition, &key, dataset).await?;
        if let Some((version, op_hash, manifest)) = versions
            .iter()
            .find(|(_, _, m)| m.file_hash == file_hash.to_hex().as_str())
        {
            // Same bytes as an earlier version: nothing becomes visible, the old one is answered.
            upload.abort().await;
            let reply = self.reply(manifest, *version, op_hash, subject, true);
            // An earlier import may have failed after signing: finish every step.
            self.finish_signed(&reply, manifest).await?;
            return Ok(reply);
        }
        upload.complete().await?;
        let manifest = DatasetManifest::new(
            dataset,
            next_version,
            self.author,
            now_micros(),
            &partition,
            &blob_hashes,
            file_hash,
        )
        .map_err(|err| ImportError::Internal(err.to_string()))?;
        let ops = self
            .store
            .append_local(
                vec![(LogId::Dataset(dataset.to_string()), manifest.encode())],
                None,
            )
            .await
            .map_err(|err| ImportError::Internal(err.to_string()))?;
        let op = &ops[0];
        if op.seq() != next_version {
            return Err(ImportError::Internal(format!(
                "dataset log moved to {} while importing version {next_version}",
                op.seq()
            )));
        }
        let reply = self.reply(&manifest, next_version, &op.hash.to_hex(), subject, false);
        self.finish_signed(&reply, &manifest).await?;
        tracing::info!(
            dataset,
            version = next_version,
            bytes = file_len,
            rows = manifest.rows,
            "imported dataset"
        );
        Ok(reply)
    }

    async fn put_manifest_sidecar(&self, manifest: &DatasetManifest) -> Result<(), ImportError> {
        self.s3
            .put(
                &keys::manifest(&manifest.dataset, None, manifest.version),
                manifest.encode(),
            )
            .await
            .map_err(ImportError::Storage)
    }

    /// The steps after signing a version: its manifest sidecar, its blobs in the index, its
    /// announcement queued in the outbox. Each is idempotent, so an import retried after a
    /// failure in any of them (the sidecar PUT, say) finishes the version, and the outbox
    /// announces it exactly once.
    async fn finish_signed(
        &self,
        reply: &ImportReply,
        manifest: &DatasetManifest,
    ) -> Result<(), ImportError> {
        let sidecar = keys::manifest(&manifest.dataset, None, manifest.version);
        let present = self
            .s3
            .exists(&sidecar)
            .await
            .map_err(ImportError::Storage)?;
        if !present {
            self.put_manifest_sidecar(manifest).await?;
        }
        self.index.insert_manifest(
            manifest,
            &keys::own_version(&manifest.dataset, reply.version),
        );
        let announcement = crate::datasets::transfers::Announcement {
            id: crate::datasets::transfers::VersionId {
                author: self.author,
                dataset: manifest.dataset.clone(),
                version: reply.version,
            },
            subject: reply.subject.clone(),
            location: reply.location.clone(),
        };
        self.outbox
            .queue(&announcement)
            .await
            .map_err(|err| ImportError::Internal(format!("announcement outbox: {err}")))
    }

    /// Earlier versions of `dataset` by this node: (version, operation hash, manifest).
    async fn versions(
        &self,
        dataset: &str,
    ) -> Result<Vec<(u64, String, DatasetManifest)>, ImportError> {
        let log = LogId::Dataset(dataset.to_string());
        let ops = self
            .store
            .operations(&self.author, &log, 0, u64::MAX >> 1)
            .await
            .map_err(|err| ImportError::Internal(err.to_string()))?;
        ops.into_iter()
            .map(|op| {
                DatasetManifest::decode(&op.body)
                    .map(|m| (op.seq(), op.hash.to_hex(), m))
                    .map_err(|err| ImportError::Internal(err.to_string()))
            })
            .collect()
    }

    fn reply(
        &self,
        manifest: &DatasetManifest,
        version: u64,
        operation: &str,
        subject: &str,
        existing: bool,
    ) -> ImportReply {
        ImportReply {
            dataset: manifest.dataset.clone(),
            version,
            subject: subject.to_string(),
            author: self.author.to_hex(),
            file_hash: manifest.file_hash.clone(),
            operation: operation.to_string(),
            row_groups: manifest.blobs.len() as u64 - 1,
            rows: manifest.rows,
            bytes: manifest.file_size,
            location: format!(
                "s3://{}/{}",
                self.s3.bucket(),
                keys::own_version(&manifest.dataset, version)
            ),
            existing,
        }
    }

    /// Reads the source once, hashing blobs and the file and uploading parts as it goes. The
    /// upload is returned before completion: the caller makes the object visible or aborts it.
    async fn upload<'s>(
        &'s self,
        source: &mut Source,
        partition: &Partition,
        key: &str,
        dataset: &str,
    ) -> Result<(Vec<blake3::Hash>, blake3::Hash, MultipartUpload<'s>), ImportError> {
        let file_len = partition.file_len;
        // Large files get larger parts: S3 allows at most 10,000 per upload.
        let part_size =
            rhio_core::replication::part_size_for(file_len, self.import.part_size_mib << 20)
                as usize;
        let boundaries: Vec<u64> = partition.ranges().map(|r| r.end()).collect();
        let lengths: Vec<u64> = partition.ranges().map(|r| r.length).collect();
        let mut file_hasher = blake3::Hasher::new();
        let mut blob_hashes = Vec::with_capacity(boundaries.len());
        let mut next_boundary = 0;
        let mut outboard = Some(OutboardBuilder::start(lengths[0]));
        let mut upload = MultipartUpload::start(
            &self.s3,
            self.outbox.state(),
            key,
            self.import.upload_concurrency,
        )
        .await?;
        let mut part = Vec::with_capacity(part_size.min(file_len as usize));
        let mut offset = 0u64;
        let mut reader = ChunkReader::new(source, &self.s3);
        let mut last_progress = 0u64;
        let result: Result<(), ImportError> = async {
            while offset < file_len {
                let want = READ_CHUNK.min((file_len - offset) as usize);
                let chunk = reader.next(offset, want).await?;
                if chunk.is_empty() {
                    return Err(ImportError::Read {
                        path: reader.describe(),
                        reason: format!("ended at {offset} of {file_len} bytes (file changed?)"),
                    });
                }
                file_hasher.update(&chunk);
                let chunk = Bytes::from(chunk);
                // Split the chunk at blob boundaries: each blob's bytes feed its outboard.
                let mut position = offset;
                while position < offset + chunk.len() as u64 {
                    let boundary = boundaries[next_boundary];
                    let end = boundary.min(offset + chunk.len() as u64);
                    let piece = chunk.slice((position - offset) as usize..(end - offset) as usize);
                    outboard
                        .as_ref()
                        .expect("a blob is open while bytes remain")
                        .feed(piece)
                        .await?;
                    position = end;
                    if position == boundary {
                        let (hash, tree) =
                            outboard.take().expect("a blob is open").finish().await?;
                        self.store_outboard(&hash, tree).await?;
                        blob_hashes.push(hash);
                        next_boundary += 1;
                        if let Some(&length) = lengths.get(next_boundary) {
                            outboard = Some(OutboardBuilder::start(length));
                        }
                    }
                }
                offset += chunk.len() as u64;
                part.extend_from_slice(&chunk);
                if part.len() >= part_size {
                    upload
                        .part(std::mem::replace(&mut part, Vec::with_capacity(part_size)))
                        .await?;
                }
                if offset - last_progress >= 64 << 20 || offset == file_len {
                    last_progress = offset;
                    self.progress(dataset, offset, file_len).await;
                }
            }
            if !part.is_empty() || upload.is_empty() {
                upload.part(std::mem::take(&mut part)).await?;
            }
            Ok(())
        }
        .await;
        if let Err(err) = result {
            upload.abort().await;
            return Err(err);
        }
        Ok((blob_hashes, file_hasher.finalize(), upload))
    }

    /// Stores a blob's bao outboard beside the data; replication serves verified ranges from it.
    async fn store_outboard(
        &self,
        hash: &blake3::Hash,
        outboard: Vec<u8>,
    ) -> Result<(), ImportError> {
        self.s3
            .put(&keys::outboard(hash), outboard)
            .await
            .map_err(ImportError::Storage)
    }
}

impl From<OutboardError> for ImportError {
    fn from(err: OutboardError) -> Self {
        ImportError::Internal(err.to_string())
    }
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// An S3 multipart upload with a bounded number of parts in flight.
struct MultipartUpload<'a> {
    s3: &'a S3Store,
    /// Where the upload is recorded until it is completed or aborted, so one abandoned by a
    /// crash is aborted at the next start.
    state: &'a crate::datasets::transfers::TransferState,
    key: String,
    upload_id: String,
    /// Parts being uploaded: (number, ETag) when done.
    in_flight: futures::stream::FuturesOrdered<
        tokio::task::JoinHandle<Result<(u32, String), ImportError>>,
    >,
    done: Vec<(u32, String)>,
    concurrency: usize,
    next_part: u32,
}

impl<'a> MultipartUpload<'a> {
    async fn start(
        s3: &'a S3Store,
        state: &'a crate::datasets::transfers::TransferState,
        key: &str,
        concurrency: usize,
    ) -> Result<Self, ImportError> {
        let upload_id = s3.create_upload(key).await.map_err(ImportError::Storage)?;
        if let Err(err) = state.start_import_upload(key, &upload_id).await {
            tracing::warn!(%err, key, "cannot record an import upload; a crash would leave it behind");
        }
        Ok(Self {
            s3,
            state,
            key: key.to_string(),
            upload_id,
            in_flight: futures::stream::FuturesOrdered::new(),
            done: Vec::new(),
            concurrency,
            next_part: 1,
        })
    }

    fn is_empty(&self) -> bool {
        self.next_part == 1
    }

    async fn part(&mut self, data: Vec<u8>) -> Result<(), ImportError> {
        while self.in_flight.len() >= self.concurrency {
            self.collect_one().await?;
        }
        let s3 = self.s3.clone();
        let key = self.key.clone();
        let upload_id = self.upload_id.clone();
        let number = self.next_part;
        self.next_part += 1;
        self.in_flight.push_back(tokio::spawn(async move {
            let etag = s3
                .upload_part(&key, &upload_id, number, data)
                .await
                .map_err(ImportError::Storage)?;
            Ok((number, etag))
        }));
        Ok(())
    }

    async fn collect_one(&mut self) -> Result<(), ImportError> {
        if let Some(joined) = self.in_flight.next().await {
            let part = joined.map_err(|err| ImportError::Internal(err.to_string()))??;
            self.done.push(part);
        }
        Ok(())
    }

    async fn complete(mut self) -> Result<(), ImportError> {
        while !self.in_flight.is_empty() {
            if let Err(err) = self.collect_one().await {
                self.abort().await;
                return Err(err);
            }
        }
        self.s3
            .complete_upload(&self.key, &self.upload_id, &self.done)
            .await
            .map_err(ImportError::Storage)?;
        self.forget().await;
        Ok(())
    }

    async fn forget(&self) {
        if let Err(err) = self
            .state
            .end_import_upload(&self.key, &self.upload_id)
            .await
        {
            tracing::debug!(%err, key = %self.key, "cannot forget an import upload");
        }
    }

    async fn abort(&mut self) {
        while self.in_flight.next().await.is_some() {}
        // Forgotten only once S3 confirmed: otherwise the next start aborts it.
        if self
            .s3
            .abort_upload(&self.key, &self.upload_id)
            .await
            .is_ok()
        {
            self.forget().await;
        }
    }
}

/// Aborts the uploads of imports a crash abandoned: `uploads` is what
/// [`TransferState::import_uploads`](crate::datasets::transfers::TransferState::import_uploads) listed
/// before this start served any import (recorded when started, forgotten when completed or
/// aborted). Only rhio's own uploads are touched: nothing is listed from S3.
pub async fn sweep_abandoned_uploads(
    s3: S3Store,
    state: crate::datasets::transfers::TransferState,
    uploads: Vec<(String, String)>,
) {
    for (key, upload_id) in uploads {
        match s3.abort_upload(&key, &upload_id).await {
            Ok(()) => {
                tracing::info!(key, "aborted the upload of an import a crash left behind");
                let _ = state.end_import_upload(&key, &upload_id).await;
            }
            // S3 down: tried again at the next start.
            Err(err) => tracing::warn!(key, %err, "cannot abort an abandoned import upload yet"),
        }
    }
}
