//! Ed25519 identities: a node's private key and the public key that names it.
//!
//! Keys are written as lowercase hex (64 characters for both halves). A key file holds the private
//! key in hex followed by an optional newline; surrounding whitespace is ignored when reading.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Length of an Ed25519 private or public key in bytes.
pub const KEY_LEN: usize = 32;

/// Why a key could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key is not hex: {0}")]
    NotHex(String),
    #[error("key has {actual} bytes, expected {KEY_LEN} (64 hex characters)")]
    WrongLength { actual: usize },
    #[error("bytes are not a valid Ed25519 public key")]
    InvalidPublicKey,
}

/// A node's Ed25519 signing key. Its `Debug` output never shows the secret.
#[derive(Clone)]
pub struct PrivateKey(p2panda_core::SigningKey);

/// An Ed25519 public key: the identity of a node and the author of what it signs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(p2panda_core::VerifyingKey);

fn decode_key_hex(text: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let bytes = hex::decode(text.trim()).map_err(|err| KeyError::NotHex(err.to_string()))?;
    let actual = bytes.len();
    bytes
        .try_into()
        .map_err(|_| KeyError::WrongLength { actual })
}

impl PrivateKey {
    pub fn generate() -> Self {
        Self(p2panda_core::SigningKey::generate())
    }

    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Self {
        Self(p2panda_core::SigningKey::from_bytes(bytes))
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// The secret as hex, for writing a key file.
    pub fn to_hex(&self) -> String {
        self.0.to_hex()
    }

    /// The p2panda signing key, for the network and operation layers.
    pub fn signing_key(&self) -> &p2panda_core::SigningKey {
        &self.0
    }
}

impl FromStr for PrivateKey {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<Self, KeyError> {
        Ok(Self::from_bytes(&decode_key_hex(text)?))
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public={})", self.public_key())
    }
}

impl PublicKey {
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Result<Self, KeyError> {
        p2panda_core::VerifyingKey::from_bytes(bytes)
            .map(Self)
            .map_err(|_| KeyError::InvalidPublicKey)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        self.0.as_bytes()
    }

    pub fn to_hex(&self) -> String {
        self.0.to_hex()
    }

    /// The first 10 hex characters, for logs.
    pub fn short(&self) -> String {
        self.to_hex()[..10].to_string()
    }

    pub fn verifying_key(&self) -> p2panda_core::VerifyingKey {
        self.0
    }
}

impl From<p2panda_core::VerifyingKey> for PublicKey {
    fn from(key: p2panda_core::VerifyingKey) -> Self {
        Self(key)
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<Self, KeyError> {
        Self::from_bytes(&decode_key_hex(text)?)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.short())
    }
}

impl serde::Serialize for PublicKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn private_key_round_trips_through_hex() {
        let key = PrivateKey::generate();
        let again: PrivateKey = format!("  {}\n", key.to_hex()).parse().unwrap();
        assert_eq!(again.public_key(), key.public_key());
    }

    #[test]
    fn debug_output_hides_the_secret() {
        let key = PrivateKey::generate();
        assert!(!format!("{key:?}").contains(&key.to_hex()));
    }

    #[test]
    fn rejects_bad_hex_and_wrong_length() {
        assert!(matches!(
            "zz".parse::<PublicKey>(),
            Err(KeyError::NotHex(_))
        ));
        assert_eq!(
            "abcd".parse::<PrivateKey>().unwrap_err(),
            KeyError::WrongLength { actual: 2 }
        );
    }

    proptest! {
        #[test]
        fn public_key_hex_round_trip(seed in any::<[u8; 32]>()) {
            let public = PrivateKey::from_bytes(&seed).public_key();
            prop_assert_eq!(public.to_hex().parse::<PublicKey>().unwrap(), public);
            let json = serde_json::to_string(&public).unwrap();
            prop_assert_eq!(&json, &format!("\"{}\"", public.to_hex()));
            prop_assert_eq!(serde_json::from_str::<PublicKey>(&json).unwrap(), public);
        }
    }
}
