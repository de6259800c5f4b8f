//! Where an import's bytes come from: a local file under one of the import roots (symlinks and
//! `..` resolved before the check, and the opened file checked again by its real path) or an
//! object in the cluster's own bucket, read in order in large pieces.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{ImportError, Importer};
use crate::s3::{S3Store, keys};

/// Where the bytes come from.
pub(super) enum Source {
    File {
        path: PathBuf,
        file: tokio::fs::File,
        len: u64,
    },
    S3 {
        key: String,
        len: u64,
    },
}

impl Source {
    pub(super) fn len(&self) -> u64 {
        match self {
            Source::File { len, .. } | Source::S3 { len, .. } => *len,
        }
    }

    fn describe(&self) -> String {
        match self {
            Source::File { path, .. } => path.display().to_string(),
            Source::S3 { key, .. } => format!("s3 key {key}"),
        }
    }

    pub(super) async fn read_range(
        &mut self,
        s3: &S3Store,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, ImportError> {
        let describe = self.describe();
        match self {
            Source::File { file, .. } => {
                let mut buf = vec![0u8; len as usize];
                file.seek(std::io::SeekFrom::Start(offset))
                    .await
                    .map_err(|err| ImportError::Read {
                        path: describe.clone(),
                        reason: err.to_string(),
                    })?;
                file.read_exact(&mut buf)
                    .await
                    .map_err(|err| ImportError::Read {
                        path: describe,
                        reason: err.to_string(),
                    })?;
                Ok(buf)
            }
            Source::S3 { key, .. } => s3
                .get_range(key, Some((offset, len)))
                .await
                .map(|bytes| bytes.to_vec())
                .map_err(ImportError::Storage),
        }
    }
}

impl Importer {
    /// Resolves and opens the source, enforcing the import roots and the cluster's bucket.
    pub(super) async fn open(&self, path: &str) -> Result<Source, ImportError> {
        if let Some(rest) = path.strip_prefix("s3://") {
            let (bucket, key) = rest
                .split_once('/')
                .filter(|(_, key)| !key.is_empty())
                .ok_or_else(|| {
                    ImportError::BadRequest(format!("{path} is not s3://<bucket>/<key>"))
                })?;
            if bucket != self.s3.bucket() {
                return Err(ImportError::ForbiddenPath(format!(
                    "{path} is not in this cluster's bucket {:?}",
                    self.s3.bucket()
                )));
            }
            if key.starts_with(keys::SIDECAR_PREFIX) {
                return Err(ImportError::ForbiddenPath(format!(
                    "{path} is one of rhio's own objects"
                )));
            }
            let len = self
                .s3
                .object_size(key)
                .await
                .map_err(ImportError::Storage)?
                .ok_or_else(|| ImportError::NotFound(path.to_string()))?;
            return Ok(Source::S3 {
                key: key.to_string(),
                len,
            });
        }
        let requested = Path::new(path);
        if !requested.is_absolute() {
            return Err(ImportError::BadRequest(format!(
                "{path} is not an absolute path"
            )));
        }
        let resolved = match tokio::fs::canonicalize(requested).await {
            Ok(resolved) => resolved,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImportError::NotFound(path.to_string()));
            }
            Err(err) => {
                return Err(ImportError::Read {
                    path: path.to_string(),
                    reason: err.to_string(),
                });
            }
        };
        let roots = self.canonical_roots().await;
        if !roots.iter().any(|root| resolved.starts_with(root)) {
            return Err(ImportError::ForbiddenPath(format!(
                "{path} is outside the import roots {:?}",
                self.import.roots
            )));
        }
        let read_error = |err: std::io::Error| ImportError::Read {
            path: path.to_string(),
            reason: err.to_string(),
        };
        // Checked before opening too: opening a FIFO would block.
        let meta = tokio::fs::metadata(&resolved).await.map_err(read_error)?;
        if !meta.is_file() {
            return Err(ImportError::NotAFile(path.to_string()));
        }
        let file = match tokio::fs::File::open(&resolved).await {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImportError::NotFound(path.to_string()));
            }
            Err(err) => return Err(read_error(err)),
        };
        // The path was checked before it was opened; a symlink swapped in between could point
        // anywhere. What counts is the file that is open: check where it really is.
        let opened = opened_path(&file).map_err(read_error)?;
        if !roots.iter().any(|root| opened.starts_with(root)) {
            return Err(ImportError::ForbiddenPath(format!(
                "{path} led to {} outside the import roots {:?} when it was opened",
                opened.display(),
                self.import.roots
            )));
        }
        let meta = file.metadata().await.map_err(read_error)?;
        if !meta.is_file() {
            return Err(ImportError::NotAFile(path.to_string()));
        }
        Ok(Source::File {
            path: resolved,
            file,
            len: meta.len(),
        })
    }

    /// The import roots with symlinks resolved (roots that do not exist are left out).
    async fn canonical_roots(&self) -> Vec<PathBuf> {
        let mut roots = Vec::with_capacity(self.import.roots.len());
        for root in &self.import.roots {
            if let Ok(root) = tokio::fs::canonicalize(root).await {
                roots.push(root);
            }
        }
        roots
    }
}

/// Where an open file really is (Linux: the kernel's name for the descriptor).
fn opened_path(file: &tokio::fs::File) -> std::io::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Sequential reads of the source: a file is read in order, an S3 object in large ranged GETs.
pub(super) struct ChunkReader<'a> {
    source: &'a mut Source,
    s3: &'a S3Store,
    buffered: Bytes,
    buffered_at: u64,
    started: bool,
}

/// Bytes fetched per ranged GET when the source is in S3.
const S3_READ: u64 = 16 << 20;

impl<'a> ChunkReader<'a> {
    pub(super) fn new(source: &'a mut Source, s3: &'a S3Store) -> Self {
        Self {
            source,
            s3,
            buffered: Bytes::new(),
            buffered_at: 0,
            started: false,
        }
    }

    pub(super) fn describe(&self) -> String {
        self.source.describe()
    }

    pub(super) async fn next(&mut self, offset: u64, want: usize) -> Result<Vec<u8>, ImportError> {
        let describe = self.source.describe();
        match &mut *self.source {
            Source::File { file, .. } => {
                if !self.started {
                    file.seek(std::io::SeekFrom::Start(0))
                        .await
                        .map_err(|err| ImportError::Read {
                            path: describe.clone(),
                            reason: err.to_string(),
                        })?;
                    self.started = true;
                }
                let mut buf = vec![0u8; want];
                let mut filled = 0;
                while filled < want {
                    let n =
                        file.read(&mut buf[filled..])
                            .await
                            .map_err(|err| ImportError::Read {
                                path: describe.clone(),
                                reason: err.to_string(),
                            })?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                buf.truncate(filled);
                Ok(buf)
            }
            Source::S3 { len, .. } => {
                let len = *len;
                let end_buffered = self.buffered_at + self.buffered.len() as u64;
                if offset < self.buffered_at || offset >= end_buffered {
                    let fetch = S3_READ.min(len - offset);
                    let data = self.source.read_range(self.s3, offset, fetch).await?;
                    self.buffered = Bytes::from(data);
                    self.buffered_at = offset;
                }
                let start = (offset - self.buffered_at) as usize;
                let end = (start + want).min(self.buffered.len());
                Ok(self.buffered.slice(start..end).to_vec())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_opened_file_is_judged_by_where_it_really_is() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let secret = outside.path().join("secret.parquet");
        std::fs::write(&secret, b"PAR1").unwrap();
        let link = root.path().join("swapped.parquet");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let opened = runtime.block_on(async {
            let file = tokio::fs::File::open(&link).await.unwrap();
            opened_path(&file).unwrap()
        });
        assert_eq!(opened, std::fs::canonicalize(&secret).unwrap());
        assert!(!opened.starts_with(std::fs::canonicalize(root.path()).unwrap()));
    }
}
