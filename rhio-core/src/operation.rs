//! The signed operation: how rhio turns a message or a dataset manifest into a p2panda
//! operation, and how it checks one received from the network.
//!
//! An operation is a p2panda [`Header`](p2panda_core::Header) with [`RhioExtensions`] (naming
//! the log it belongs to) plus a body. Each author keeps one append-only log per [`LogId`]: the
//! first operation has `seq_num` 0 and no backlink, every later one the hash of its predecessor.
//! The operation id is the BLAKE3 hash of the header's CBOR encoding.

use p2panda_core::{Body, Hash, Header, Timestamp};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::identity::{PrivateKey, PublicKey};

/// Longest accepted header encoding. Headers are ~200 bytes plus the log name.
pub const MAX_HEADER_BYTES: usize = 4 * 1024;
/// Largest accepted body: a NATS message (up to 8 MiB payload plus headers) or a manifest.
pub const MAX_BODY_BYTES: usize = 9 * 1024 * 1024;
/// Longest log name (subject or dataset name) accepted in a header.
pub const MAX_LOG_NAME: usize = 1024;

/// The log an operation belongs to; an author has one log per id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LogId {
    /// Routed NATS messages on one concrete subject.
    Message(String),
    /// Versions of one dataset (version = position in the log).
    Dataset(String),
}

impl LogId {
    pub fn name(&self) -> &str {
        match self {
            LogId::Message(name) | LogId::Dataset(name) => name,
        }
    }

    /// A stable text form for storage keys: `m:<subject>` or `d:<dataset>`.
    pub fn to_key(&self) -> String {
        match self {
            LogId::Message(subject) => format!("m:{subject}"),
            LogId::Dataset(name) => format!("d:{name}"),
        }
    }

    pub fn from_key(key: &str) -> Option<Self> {
        match key.split_once(':')? {
            ("m", subject) => Some(LogId::Message(subject.into())),
            ("d", name) => Some(LogId::Dataset(name.into())),
            _ => None,
        }
    }
}

/// The rhio-specific fields of a header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RhioExtensions {
    pub log: LogId,
}

pub type RhioHeader = Header<RhioExtensions>;

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum OperationError {
    #[error("{what} is {size} bytes, more than the {max} allowed")]
    TooLarge {
        what: &'static str,
        size: usize,
        max: usize,
    },
    #[error("header is not valid CBOR for a rhio operation: {0}")]
    Malformed(String),
    #[error("header is not in canonical encoding")]
    NonCanonical,
    #[error("operation has no body")]
    MissingBody,
    #[error("log name is empty or longer than {MAX_LOG_NAME} bytes")]
    BadLogName,
    #[error("invalid operation: {0}")]
    Invalid(String),
    #[error("operation does not follow its predecessor: {0}")]
    BrokenChain(String),
}

/// A verified operation: decoded header, its canonical bytes, hash and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedOperation {
    pub hash: Hash,
    pub header: RhioHeader,
    pub header_bytes: Vec<u8>,
    pub body: Vec<u8>,
}

impl SignedOperation {
    /// Signs `body` as operation `seq` of `log`, following `backlink`.
    pub fn sign(
        key: &PrivateKey,
        log: LogId,
        seq: u64,
        backlink: Option<Hash>,
        timestamp_micros: u64,
        body: Vec<u8>,
    ) -> Self {
        let payload = Body::new(&body);
        let mut header = RhioHeader {
            version: 1,
            verifying_key: key.public_key().verifying_key(),
            signature: None,
            payload_size: payload.size(),
            payload_hash: Some(payload.hash()),
            timestamp: Timestamp::new(timestamp_micros),
            seq_num: seq,
            backlink,
            extensions: RhioExtensions { log },
        };
        header.sign(key.signing_key());
        let header_bytes = header.to_bytes();
        Self {
            hash: Hash::digest(&header_bytes),
            header,
            header_bytes,
            body,
        }
    }

    /// Decodes and checks a header on its own (signature, version, sizes, seq/backlink, log).
    pub fn decode_header(header_bytes: &[u8]) -> Result<RhioHeader, OperationError> {
        if header_bytes.len() > MAX_HEADER_BYTES {
            return Err(OperationError::TooLarge {
                what: "header",
                size: header_bytes.len(),
                max: MAX_HEADER_BYTES,
            });
        }
        let header: RhioHeader = p2panda_core::cbor::decode_cbor(header_bytes)
            .map_err(|err| OperationError::Malformed(err.to_string()))?;
        // The hash and the signature are over the canonical encoding; accepting another encoding
        // of the same header would give one operation two ids.
        if header.to_bytes() != header_bytes {
            return Err(OperationError::NonCanonical);
        }
        let name = header.extensions.log.name();
        if name.is_empty() || name.len() > MAX_LOG_NAME {
            return Err(OperationError::BadLogName);
        }
        p2panda_core::operation::validate_header(&header)
            .map_err(|err| OperationError::Invalid(err.to_string()))?;
        Ok(header)
    }

    /// Decodes and fully checks an operation received from elsewhere.
    pub fn decode(header_bytes: &[u8], body: Vec<u8>) -> Result<Self, OperationError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(OperationError::TooLarge {
                what: "body",
                size: body.len(),
                max: MAX_BODY_BYTES,
            });
        }
        let header = Self::decode_header(header_bytes)?;
        if header.payload_size == 0 || body.is_empty() {
            return Err(OperationError::MissingBody);
        }
        let payload = Body::new(&body);
        if header.payload_hash != Some(payload.hash()) || header.payload_size != payload.size() {
            return Err(OperationError::Invalid(
                "payload hash and size do not match the body".into(),
            ));
        }
        Ok(Self {
            hash: Hash::digest(header_bytes),
            header,
            header_bytes: header_bytes.to_vec(),
            body,
        })
    }

    /// Rebuilds an operation this node verified before (read back from its own store) without
    /// checking the signature again.
    pub fn decode_trusted(header_bytes: Vec<u8>, body: Vec<u8>) -> Result<Self, OperationError> {
        let header: RhioHeader = p2panda_core::cbor::decode_cbor(&header_bytes[..])
            .map_err(|err| OperationError::Malformed(err.to_string()))?;
        Ok(Self {
            hash: Hash::digest(&header_bytes),
            header,
            header_bytes,
            body,
        })
    }

    pub fn author(&self) -> PublicKey {
        PublicKey::from(self.header.verifying_key)
    }

    pub fn log(&self) -> &LogId {
        &self.header.extensions.log
    }

    pub fn seq(&self) -> u64 {
        self.header.seq_num
    }

    pub fn backlink(&self) -> Option<Hash> {
        self.header.backlink
    }

    pub fn timestamp_micros(&self) -> u64 {
        self.header.timestamp.into()
    }

    pub fn signature_hex(&self) -> String {
        self.header
            .signature
            .map(|signature| signature.to_hex())
            .unwrap_or_default()
    }

    /// Checks that `self` is the next operation after `previous` in the same log.
    pub fn follows(&self, previous: &SignedOperation) -> Result<(), OperationError> {
        if self.log() != previous.log() {
            return Err(OperationError::BrokenChain("different logs".into()));
        }
        p2panda_core::operation::validate_backlink(&previous.header, &self.header)
            .map_err(|err| OperationError::BrokenChain(err.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn op(key: &PrivateKey, seq: u64, backlink: Option<Hash>, body: &[u8]) -> SignedOperation {
        SignedOperation::sign(
            key,
            LogId::Message("a.b".into()),
            seq,
            backlink,
            1_700_000_000_000_000 + seq,
            body.to_vec(),
        )
    }

    #[test]
    fn sign_then_decode_round_trips() {
        let key = PrivateKey::generate();
        let first = op(&key, 0, None, b"hello");
        let decoded = SignedOperation::decode(&first.header_bytes, first.body.clone()).unwrap();
        assert_eq!(decoded, first);
        assert_eq!(decoded.author(), key.public_key());
        let second = op(&key, 1, Some(first.hash), b"world");
        second.follows(&first).unwrap();
        assert!(first.follows(&second).is_err());
        let skipping = op(&key, 2, Some(first.hash), b"gap");
        assert!(skipping.follows(&first).is_err());
    }

    #[test]
    fn rejects_oversized_and_empty_inputs() {
        let key = PrivateKey::generate();
        let first = op(&key, 0, None, b"x");
        assert!(matches!(
            SignedOperation::decode(&vec![0; MAX_HEADER_BYTES + 1], b"x".to_vec()),
            Err(OperationError::TooLarge { what: "header", .. })
        ));
        assert!(matches!(
            SignedOperation::decode(&first.header_bytes, vec![0; MAX_BODY_BYTES + 1]),
            Err(OperationError::TooLarge { what: "body", .. })
        ));
        assert!(SignedOperation::decode(&[], b"x".to_vec()).is_err());
        assert!(SignedOperation::decode(&first.header_bytes, Vec::new()).is_err());
    }

    #[test]
    fn other_authors_signature_is_rejected() {
        let key = PrivateKey::generate();
        let other = PrivateKey::generate();
        let mut forged = op(&key, 0, None, b"x").header;
        forged.verifying_key = other.public_key().verifying_key();
        let bytes = forged.to_bytes();
        assert!(matches!(
            SignedOperation::decode(&bytes, b"x".to_vec()),
            Err(OperationError::Invalid(_))
        ));
    }

    #[test]
    fn log_keys_round_trip() {
        for log in [
            LogId::Message("a.b:c".into()),
            LogId::Dataset("weather".into()),
        ] {
            assert_eq!(LogId::from_key(&log.to_key()), Some(log));
        }
        assert_eq!(LogId::from_key("x:y"), None);
    }

    proptest! {
        // Flipping any byte of the header or the body is detected.
        #[test]
        fn tampering_is_detected(body in proptest::collection::vec(any::<u8>(), 1..256),
                                 index in any::<usize>(), flip in 1u8..=255) {
            let key = PrivateKey::generate();
            let signed = op(&key, 0, None, &body);
            let mut header = signed.header_bytes.clone();
            let i = index % header.len();
            header[i] ^= flip;
            prop_assert!(SignedOperation::decode(&header, body.clone()).is_err());
            let mut tampered_body = body.clone();
            let j = index % tampered_body.len();
            tampered_body[j] ^= flip;
            prop_assert!(SignedOperation::decode(&signed.header_bytes, tampered_body).is_err());
        }

        // Truncated headers never decode.
        #[test]
        fn truncation_is_rejected(cut in 0usize..200) {
            let key = PrivateKey::generate();
            let signed = op(&key, 0, None, b"payload");
            let cut = cut % signed.header_bytes.len();
            prop_assert!(SignedOperation::decode(&signed.header_bytes[..cut], signed.body.clone()).is_err());
        }

        // Arbitrary bytes never panic the decoder.
        #[test]
        fn arbitrary_bytes_do_not_panic(header in proptest::collection::vec(any::<u8>(), 0..512),
                                        body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = SignedOperation::decode(&header, body);
        }
    }
}
