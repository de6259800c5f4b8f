//! The request of `rhio/blobs/1`: a byte range of a row-group blob, by hash.
//!
//! Fixed layout, 56 bytes: `blob hash (32) | blob size (u64 BE) | start (u64 BE) | end (u64 BE)`.
//! The answer is a status byte and the bao encoding of the chunk groups covering the range; the
//! node crate produces and verifies it with bao-tree.

use thiserror::Error;

/// Length of an encoded request.
pub const REQUEST_LEN: usize = 32 + 8 + 8 + 8;
/// Largest range one request may ask for: bounds the server's memory per request.
pub const MAX_RANGE: u64 = 32 << 20;

/// A byte range `[start, end)` of the blob with BLAKE3 `hash` and `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeRequest {
    pub hash: blake3::Hash,
    pub size: u64,
    pub start: u64,
    pub end: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RangeRequestError {
    #[error("request of {0} bytes, expected {REQUEST_LEN}")]
    Length(usize),
    #[error("range {start}..{end} of a {size}-byte blob")]
    OutOfBlob { start: u64, end: u64, size: u64 },
    #[error("range of {0} bytes is larger than {MAX_RANGE}")]
    TooLarge(u64),
}

impl RangeRequest {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[..32].copy_from_slice(self.hash.as_bytes());
        out[32..40].copy_from_slice(&self.size.to_be_bytes());
        out[40..48].copy_from_slice(&self.start.to_be_bytes());
        out[48..56].copy_from_slice(&self.end.to_be_bytes());
        out
    }

    /// Decodes and checks a request: a non-empty range inside the blob, at most [`MAX_RANGE`].
    pub fn decode(bytes: &[u8]) -> Result<Self, RangeRequestError> {
        let bytes: &[u8; REQUEST_LEN] = bytes
            .try_into()
            .map_err(|_| RangeRequestError::Length(bytes.len()))?;
        let word = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let request = Self {
            hash: blake3::Hash::from_bytes(bytes[..32].try_into().expect("32 bytes")),
            size: word(32),
            start: word(40),
            end: word(48),
        };
        if request.start >= request.end || request.end > request.size {
            return Err(RangeRequestError::OutOfBlob {
                start: request.start,
                end: request.end,
                size: request.size,
            });
        }
        if request.end - request.start > MAX_RANGE {
            return Err(RangeRequestError::TooLarge(request.end - request.start));
        }
        Ok(request)
    }

    /// The byte range of the `group`-sized groups that cover the request, clipped to the blob.
    pub fn covering(&self, group: u64) -> (u64, u64) {
        let start = self.start / group * group;
        let end = self
            .end
            .div_ceil(group)
            .saturating_mul(group)
            .min(self.size);
        (start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn valid_requests_round_trip(size in 1u64..u64::MAX / 2, a in any::<u64>(), len in 1u64..=MAX_RANGE, seed in any::<u64>()) {
            let start = a % size;
            let end = (start + len).min(size);
            let request = RangeRequest { hash: blake3::hash(&seed.to_le_bytes()), size, start, end };
            prop_assert_eq!(RangeRequest::decode(&request.encode()), Ok(request));
            let (from, to) = request.covering(16384);
            prop_assert!(from <= start && end <= to && to <= size && from % 16384 == 0);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = RangeRequest::decode(&bytes);
        }
    }

    #[test]
    fn requests_outside_the_blob_or_too_large_are_refused() {
        let hash = blake3::hash(b"x");
        let check = |start, end, size| {
            RangeRequest::decode(
                &RangeRequest {
                    hash,
                    size,
                    start,
                    end,
                }
                .encode(),
            )
        };
        assert!(matches!(
            check(5, 5, 10),
            Err(RangeRequestError::OutOfBlob { .. })
        ));
        assert!(matches!(
            check(0, 11, 10),
            Err(RangeRequestError::OutOfBlob { .. })
        ));
        assert!(matches!(
            check(0, MAX_RANGE + 1, u64::MAX),
            Err(RangeRequestError::TooLarge(_))
        ));
        assert!(check(0, 10, 10).is_ok());
        assert_eq!(
            RangeRequest::decode(&[0; 55]),
            Err(RangeRequestError::Length(55))
        );
    }
}
