//! Routed NATS messages: the canonical body that gets signed, and the provenance headers a
//! consumer uses to check that a message really comes from its author, unchanged.
//!
//! The body of a message operation is the CBOR array `[subject, [[name, value], ...], payload]`
//! with the routable headers sorted by name (values of one name keep their order). Headers that
//! belong to NATS itself (`Nats-*`) or to rhio (`X-Rhio-*`) are not routed and not signed.
//!
//! A receiving node publishes the message with these headers added:
//!
//! | header | value |
//! |---|---|
//! | `X-Rhio-PublicKey` | author, hex |
//! | `X-Rhio-Signature` | signature of the operation header, hex |
//! | `X-Rhio-Operation` | the signed operation header, base64 (standard, padded) |
//! | `Nats-Msg-Id` | operation hash, hex (JetStream drops duplicates by it) |
//!
//! [`verify_provenance`] rebuilds the body from what a consumer received and checks it against
//! the signed header.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ciborium::Value;
use thiserror::Error;

use crate::identity::PublicKey;
use crate::operation::{LogId, OperationError, SignedOperation};

pub const HEADER_PUBLIC_KEY: &str = "X-Rhio-PublicKey";
pub const HEADER_SIGNATURE: &str = "X-Rhio-Signature";
pub const HEADER_OPERATION: &str = "X-Rhio-Operation";
pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";

/// True for headers that travel with a routed message (everything but `Nats-*` and `X-Rhio-*`).
pub fn is_routable_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !(lower.starts_with("nats-") || lower.starts_with("x-rhio-"))
}

/// True when a message carries rhio provenance headers, i.e. it was routed already and must not
/// be signed again.
pub fn is_routed<S: AsRef<str>>(header_names: impl IntoIterator<Item = S>) -> bool {
    header_names
        .into_iter()
        .any(|name| name.as_ref().to_ascii_lowercase().starts_with("x-rhio-"))
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("message body is not a rhio message: {0}")]
    Malformed(String),
}

/// A NATS message as it is signed and routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedMessage {
    pub subject: String,
    /// Routable headers, sorted by name.
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

impl RoutedMessage {
    /// Builds the canonical form: drops non-routable headers and sorts the rest by name.
    pub fn new(
        subject: impl Into<String>,
        headers: impl IntoIterator<Item = (String, String)>,
        payload: Vec<u8>,
    ) -> Self {
        let mut headers: Vec<(String, String)> = headers
            .into_iter()
            .filter(|(name, _)| is_routable_header(name))
            .collect();
        // Stable: values of one header keep their order.
        headers.sort_by(|a, b| a.0.cmp(&b.0));
        Self {
            subject: subject.into(),
            headers,
            payload,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let headers = self
            .headers
            .iter()
            .map(|(name, value)| {
                Value::Array(vec![Value::Text(name.clone()), Value::Text(value.clone())])
            })
            .collect();
        let value = Value::Array(vec![
            Value::Text(self.subject.clone()),
            Value::Array(headers),
            Value::Bytes(self.payload.clone()),
        ]);
        let mut out = Vec::with_capacity(self.payload.len() + 64);
        ciborium::into_writer(&value, &mut out).expect("writing CBOR to a Vec cannot fail");
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, MessageError> {
        let malformed = |what: &str| MessageError::Malformed(what.to_string());
        let value: Value =
            ciborium::from_reader(bytes).map_err(|err| MessageError::Malformed(err.to_string()))?;
        let Value::Array(mut parts) = value else {
            return Err(malformed("not an array"));
        };
        if parts.len() != 3 {
            return Err(malformed("expected [subject, headers, payload]"));
        }
        let payload = match parts.pop() {
            Some(Value::Bytes(payload)) => payload,
            _ => return Err(malformed("payload is not a byte string")),
        };
        let headers = match parts.pop() {
            Some(Value::Array(headers)) => headers
                .into_iter()
                .map(|pair| match pair {
                    Value::Array(pair) => match <[Value; 2]>::try_from(pair) {
                        Ok([Value::Text(name), Value::Text(value)]) => Ok((name, value)),
                        _ => Err(malformed("header is not [name, value]")),
                    },
                    _ => Err(malformed("header is not [name, value]")),
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => return Err(malformed("headers are not an array")),
        };
        let subject = match parts.pop() {
            Some(Value::Text(subject)) => subject,
            _ => return Err(malformed("subject is not text")),
        };
        Ok(Self {
            subject,
            headers,
            payload,
        })
    }
}

/// The headers a receiving node adds to a routed message.
pub fn provenance_headers(operation: &SignedOperation) -> [(&'static str, String); 4] {
    [
        (HEADER_PUBLIC_KEY, operation.author().to_hex()),
        (HEADER_SIGNATURE, operation.signature_hex()),
        (HEADER_OPERATION, BASE64.encode(&operation.header_bytes)),
        (HEADER_MSG_ID, operation.hash.to_hex()),
    ]
}

/// Bytes a NATS server counts against its `max_payload` for a message with these headers and
/// payload: the header block (`NATS/1.0\r\n`, one `name: value\r\n` per value, `\r\n`) plus
/// the payload, as in the `HPUB` total.
pub fn nats_wire_size<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    payload_len: usize,
) -> usize {
    let mut block = b"NATS/1.0\r\n".len() + b"\r\n".len();
    let mut any = false;
    for (name, value) in headers {
        any = true;
        block += name.len() + b": ".len() + value.len() + b"\r\n".len();
    }
    if any {
        block + payload_len
    } else {
        payload_len
    }
}

/// Upper bound of [`nats_wire_size`] for `message` once a receiving node added the provenance
/// headers: what the receiver's `max_payload` must allow. A sender checks it before signing, so
/// it never hands other clusters a message that no JetStream with the same limits can take.
pub fn delivered_wire_size(message: &RoutedMessage) -> usize {
    // The provenance headers depend on the signed header only through its length; a header
    // signed with the largest sequence number and timestamp, a backlink, and an empty body is
    // at most 8 bytes shorter than any real one (the CBOR body size grows by up to 8 bytes).
    let key = crate::identity::PrivateKey::from_bytes(&[1; 32]);
    let probe = SignedOperation::sign(
        &key,
        LogId::Message(message.subject.clone()),
        u64::MAX,
        Some(p2panda_core::Hash::digest(b"")),
        u64::MAX,
        Vec::new(),
    );
    let mut provenance = provenance_headers(&probe);
    let padded = probe.header_bytes.len() + 8;
    provenance[2].1 = "A".repeat(padded.div_ceil(3) * 4);
    let pairs = message
        .headers
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .chain(
            provenance
                .iter()
                .map(|(name, value)| (*name, value.as_str())),
        );
    nats_wire_size(pairs, message.payload.len())
}

/// Author, log and sequence number named by a routed message's `X-Rhio-Operation` header,
/// without checking the signature (for a node reading back what it published itself).
pub fn routed_position(headers: &[(String, String)]) -> Option<(PublicKey, LogId, u64)> {
    let encoded = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(HEADER_OPERATION))
        .map(|(_, value)| value)?;
    let bytes = BASE64.decode(encoded).ok()?;
    let header = SignedOperation::decode_header(&bytes).ok()?;
    Some((
        PublicKey::from(header.verifying_key),
        header.extensions.log,
        header.seq_num,
    ))
}

#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ProvenanceError {
    #[error("header {0} is missing")]
    Missing(&'static str),
    #[error("header {0} is not valid: {1}")]
    Bad(&'static str, String),
    #[error("signed operation: {0}")]
    Operation(#[from] OperationError),
    #[error("{0} does not match the signed operation")]
    Mismatch(&'static str),
}

/// What a verified message proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    pub author: PublicKey,
    pub seq: u64,
    pub operation: String,
    pub timestamp_micros: u64,
}

/// The signed operation header a message or dataset announcement carries (`X-Rhio-Operation`),
/// checked: its signature verifies, and `X-Rhio-PublicKey`, `X-Rhio-Signature` and (when
/// present) `Nats-Msg-Id` agree with it. Returns the header's bytes and the decoded header; what
/// the operation signs (the message, or a dataset's manifest) is the caller's to check against
/// `payload_hash`.
pub fn operation_header(
    headers: &[(String, String)],
) -> Result<(Vec<u8>, crate::operation::RhioHeader), ProvenanceError> {
    let get = |name: &'static str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .ok_or(ProvenanceError::Missing(name))
    };
    let header_bytes = BASE64
        .decode(get(HEADER_OPERATION)?)
        .map_err(|err| ProvenanceError::Bad(HEADER_OPERATION, err.to_string()))?;
    let header = SignedOperation::decode_header(&header_bytes)?;
    let author = PublicKey::from(header.verifying_key);
    if get(HEADER_PUBLIC_KEY)? != author.to_hex() {
        return Err(ProvenanceError::Mismatch(HEADER_PUBLIC_KEY));
    }
    let signature = header.signature.map(|s| s.to_hex()).unwrap_or_default();
    if get(HEADER_SIGNATURE)? != signature {
        return Err(ProvenanceError::Mismatch(HEADER_SIGNATURE));
    }
    let hash = p2panda_core::Hash::digest(&header_bytes).to_hex();
    if let Ok(msg_id) = get(HEADER_MSG_ID)
        && msg_id != hash
    {
        return Err(ProvenanceError::Mismatch(HEADER_MSG_ID));
    }
    Ok((header_bytes, header))
}

/// Checks a received message against its `X-Rhio-*` headers: the signature, the author, the
/// subject, and that payload and routable headers are exactly what the author signed.
pub fn verify_provenance(
    subject: &str,
    headers: &[(String, String)],
    payload: &[u8],
) -> Result<Provenance, ProvenanceError> {
    let (header_bytes, header) = operation_header(headers)?;
    let author = PublicKey::from(header.verifying_key);
    let hash = p2panda_core::Hash::digest(&header_bytes).to_hex();
    if header.extensions.log != LogId::Message(subject.to_string()) {
        return Err(ProvenanceError::Mismatch("subject"));
    }
    let body = RoutedMessage::new(subject, headers.iter().cloned(), payload.to_vec()).encode();
    let body = p2panda_core::Body::new(&body);
    if header.payload_hash != Some(body.hash()) || header.payload_size != body.size() {
        return Err(ProvenanceError::Mismatch("payload or headers"));
    }
    Ok(Provenance {
        author,
        seq: header.seq_num,
        operation: hash,
        timestamp_micros: header.timestamp.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::PrivateKey;
    use proptest::prelude::*;

    fn routed(key: &PrivateKey, message: &RoutedMessage) -> Vec<(String, String)> {
        let op = SignedOperation::sign(
            key,
            LogId::Message(message.subject.clone()),
            0,
            None,
            1,
            message.encode(),
        );
        let mut headers = message.headers.clone();
        headers.extend(
            provenance_headers(&op)
                .into_iter()
                .map(|(n, v)| (n.to_string(), v)),
        );
        headers
    }

    #[test]
    fn delivered_size_bounds_what_a_receiver_publishes() {
        let key = PrivateKey::generate();
        let long = format!("{}x", "x.".repeat(199));
        for (subject, payload_len, headers) in [
            ("a", 0usize, vec![]),
            ("sensors.t1.readings", 1_048_064, vec![("Trace", "abc")]),
            (long.as_str(), 10, vec![("A", "1"), ("A", "2")]),
        ] {
            let message = RoutedMessage::new(
                subject,
                headers.iter().map(|(n, v)| (n.to_string(), v.to_string())),
                vec![7; payload_len],
            );
            let bound = delivered_wire_size(&message);
            for (seq, timestamp) in [(0, 1), (1 << 40, u64::MAX >> 1)] {
                let backlink = (seq > 0).then(|| p2panda_core::Hash::digest(b"prev"));
                let op = SignedOperation::sign(
                    &key,
                    LogId::Message(message.subject.clone()),
                    seq,
                    backlink,
                    timestamp,
                    message.encode(),
                );
                let provenance = provenance_headers(&op);
                let actual = nats_wire_size(
                    message
                        .headers
                        .iter()
                        .map(|(n, v)| (n.as_str(), v.as_str()))
                        .chain(provenance.iter().map(|(n, v)| (*n, v.as_str()))),
                    payload_len,
                );
                assert!(actual <= bound, "{subject}: {actual} > {bound}");
                assert!(
                    bound - actual <= 128,
                    "{subject}: bound {bound} far above {actual}"
                );
            }
        }
        assert_eq!(nats_wire_size([], 5), 5);
        assert_eq!(nats_wire_size([("A", "b")], 5), 10 + 2 + 6 + 5);
    }

    #[test]
    fn routed_position_reads_author_log_and_sequence() {
        let key = PrivateKey::generate();
        let message = RoutedMessage::new("a.b", [], b"p".to_vec());
        let headers = routed(&key, &message);
        assert_eq!(
            routed_position(&headers),
            Some((key.public_key(), LogId::Message("a.b".into()), 0))
        );
        assert_eq!(routed_position(&[]), None);
        assert_eq!(
            routed_position(&[(HEADER_OPERATION.to_string(), "!!".to_string())]),
            None
        );
    }

    #[test]
    fn canonical_form_drops_control_headers_and_sorts() {
        let message = RoutedMessage::new(
            "a.b",
            [
                ("Z".to_string(), "1".to_string()),
                ("Nats-Msg-Id".to_string(), "x".to_string()),
                ("A".to_string(), "2".to_string()),
                ("X-Rhio-PublicKey".to_string(), "y".to_string()),
                ("A".to_string(), "3".to_string()),
            ],
            b"p".to_vec(),
        );
        assert_eq!(
            message.headers,
            vec![
                ("A".to_string(), "2".to_string()),
                ("A".to_string(), "3".to_string()),
                ("Z".to_string(), "1".to_string())
            ]
        );
        assert_eq!(RoutedMessage::decode(&message.encode()).unwrap(), message);
        assert!(is_routed(["Content-Type", "x-rhio-operation"]));
        assert!(!is_routed(["Content-Type"]));
    }

    #[test]
    fn provenance_verifies_and_detects_changes() {
        let key = PrivateKey::generate();
        let message = RoutedMessage::new(
            "sensors.t1",
            [("Unit".to_string(), "C".to_string())],
            b"21.5".to_vec(),
        );
        let headers = routed(&key, &message);
        let proof = verify_provenance("sensors.t1", &headers, b"21.5").unwrap();
        assert_eq!(proof.author, key.public_key());

        assert_eq!(
            verify_provenance("sensors.t1", &headers, b"99.9"),
            Err(ProvenanceError::Mismatch("payload or headers"))
        );
        assert_eq!(
            verify_provenance("sensors.t2", &headers, b"21.5"),
            Err(ProvenanceError::Mismatch("subject"))
        );
        let mut changed = headers.clone();
        changed[0].1 = "F".into();
        assert_eq!(
            verify_provenance("sensors.t1", &changed, b"21.5"),
            Err(ProvenanceError::Mismatch("payload or headers"))
        );
        let other = PrivateKey::generate().public_key().to_hex();
        let forged: Vec<_> = headers
            .iter()
            .map(|(n, v)| {
                if n == HEADER_PUBLIC_KEY {
                    (n.clone(), other.clone())
                } else {
                    (n.clone(), v.clone())
                }
            })
            .collect();
        assert_eq!(
            verify_provenance("sensors.t1", &forged, b"21.5"),
            Err(ProvenanceError::Mismatch(HEADER_PUBLIC_KEY))
        );
        let without: Vec<_> = headers
            .iter()
            .filter(|(n, _)| n != HEADER_OPERATION)
            .cloned()
            .collect();
        assert_eq!(
            verify_provenance("sensors.t1", &without, b"21.5"),
            Err(ProvenanceError::Missing(HEADER_OPERATION))
        );
    }

    proptest! {
        #[test]
        fn body_round_trip(subject in "[a-z]{1,8}(\\.[a-z]{1,8}){0,3}",
                           headers in proptest::collection::vec(("[A-Za-z-]{1,12}", "[ -~]{0,20}"), 0..5),
                           payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let message = RoutedMessage::new(subject, headers, payload);
            prop_assert_eq!(RoutedMessage::decode(&message.encode()).unwrap(), message);
        }

        #[test]
        fn decoder_survives_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = RoutedMessage::decode(&bytes);
        }
    }
}
