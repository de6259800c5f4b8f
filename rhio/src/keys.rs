//! The node's private key: read from `RHIO_PRIVATE_KEY`, or from a file that is created (with
//! mode 0600) the first time the node starts.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rhio_core::identity::{KeyError, PrivateKey};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum KeyFileError {
    #[error("RHIO_PRIVATE_KEY is not a valid private key: {0}")]
    BadEnv(KeyError),
    #[error("private key file {path} is not valid: {source}")]
    BadFile { path: PathBuf, source: KeyError },
    #[error("cannot read private key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create private key file {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where the key came from, for the start-up log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Environment,
    File(PathBuf),
    Created(PathBuf),
}

#[derive(Debug)]
pub struct LoadedKey {
    pub key: PrivateKey,
    pub source: KeySource,
}

/// Loads the node key. `env_value` is the content of `RHIO_PRIVATE_KEY`, which wins over the file.
pub fn load_or_create(path: &Path, env_value: Option<&str>) -> Result<LoadedKey, KeyFileError> {
    if let Some(value) = env_value {
        let key = value.parse().map_err(KeyFileError::BadEnv)?;
        return Ok(LoadedKey {
            key,
            source: KeySource::Environment,
        });
    }
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let key = text.parse().map_err(|source| KeyFileError::BadFile {
                path: path.to_path_buf(),
                source,
            })?;
            if let Ok(meta) = std::fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{:o}", meta.permissions().mode() & 0o777),
                    "private key file is readable by group or others; chmod 600 it"
                );
            }
            Ok(LoadedKey {
                key,
                source: KeySource::File(path.to_path_buf()),
            })
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => create(path),
        Err(source) => Err(KeyFileError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn create(path: &Path) -> Result<LoadedKey, KeyFileError> {
    let fail = |source| KeyFileError::Create {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(fail)?;
    }
    let key = PrivateKey::generate();
    // create_new: never overwrite a key another process wrote in the meantime.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(fail)?;
    writeln!(file, "{}", key.to_hex()).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    Ok(LoadedKey {
        key,
        source: KeySource::Created(path.to_path_buf()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_key_file_with_mode_0600_and_reads_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/private.key");
        let created = load_or_create(&path, None).unwrap();
        assert_eq!(created.source, KeySource::Created(path.clone()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = load_or_create(&path, None).unwrap();
        assert_eq!(again.source, KeySource::File(path.clone()));
        assert_eq!(again.key.public_key(), created.key.public_key());
    }

    #[test]
    fn environment_wins_over_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private.key");
        let file_key = load_or_create(&path, None).unwrap().key;
        let env_key = PrivateKey::generate();
        let loaded = load_or_create(&path, Some(&env_key.to_hex())).unwrap();
        assert_eq!(loaded.source, KeySource::Environment);
        assert_eq!(loaded.key.public_key(), env_key.public_key());
        assert_ne!(loaded.key.public_key(), file_key.public_key());
    }

    #[test]
    fn bad_key_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private.key");
        std::fs::write(&path, "not a key").unwrap();
        let err = load_or_create(&path, None).unwrap_err().to_string();
        assert!(err.contains("private.key"), "{err}");
        let err = load_or_create(&path, Some("abc")).unwrap_err().to_string();
        assert!(err.contains("RHIO_PRIVATE_KEY"), "{err}");
    }
}
