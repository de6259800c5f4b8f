//! The rhio sync protocol (`rhio/sync/1`): its frames, and the reordering of operations that
//! arrive ahead of their predecessors.
//!
//! A session is one QUIC bidirectional stream. The subscriber sends one [`SyncRequest`]: the
//! (author, subject filters) it wants, or everything when it relays, and how far it has each log;
//! the heights come in pages ([`Frame::Have`], [`HAVE_PAGE`] logs each) so a node with any number
//! of logs can start a session. The other node answers with every operation the subscriber lacks,
//! log by log in sequence order, then [`Frame::CaughtUp`], then keeps the stream open and pushes
//! each new operation as it stores it. The cost of a session start is O(logs + missing
//! operations), never O(history): heights are looked up in a [`Heights`] index.
//!
//! After catch-up the serving side follows [`Pusher`]: bodies while the subscriber is eager,
//! [`Frame::Announce`] after it sent [`Frame::Prune`], a range and bodies again after
//! [`Frame::Graft`] (PlumTree on sessions; the node side is described in rhio's
//! `network::sync`).
//!
//! Frame layout: `u32 length (big endian) | u8 kind | content`, where a request's content is
//! CBOR, an operation's is `u32 header length | header | body`, and caught-up has none.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::identity::PublicKey;
use crate::operation::{LogId, MAX_BODY_BYTES, MAX_HEADER_BYTES, SignedOperation};

/// Largest frame a peer may send.
pub const MAX_FRAME_BYTES: usize = MAX_HEADER_BYTES + MAX_BODY_BYTES + 16;
/// Largest request (interests and log heights of one subscriber).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

const KIND_REQUEST: u8 = 1;
const KIND_OPERATION: u8 = 2;
const KIND_CAUGHT_UP: u8 = 3;
const KIND_HAVE: u8 = 4;
const KIND_PRUNE: u8 = 5;
const KIND_GRAFT: u8 = 6;
const KIND_ANNOUNCE: u8 = 7;

/// Log heights per request or [`Frame::Have`] page (~100 bytes each: well below the frame limit).
pub const HAVE_PAGE: usize = 4096;
/// Most logs one subscriber may announce in a session (memory bound of the serving side).
pub const MAX_SESSION_LOGS: usize = 4_000_000;

/// What a subscriber wants from one author.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interest {
    pub author: PublicKey,
    /// Subject filters of message logs.
    pub subjects: Vec<String>,
}

/// How far the subscriber has one log: the next sequence number it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogHeight {
    pub author: PublicKey,
    pub log: LogId,
    pub next_seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    pub interests: Vec<Interest>,
    pub have: Vec<LogHeight>,
    /// The subscriber's dataset subject prefix: it wants an author's dataset `name` when one of
    /// its subject filters for that author matches `<datasets_prefix>.<name>`. Empty: no datasets.
    #[serde(default)]
    pub datasets_prefix: String,
    /// The subscriber relays: it wants every log the server holds (except its own), whatever
    /// `interests` say. `interests` are still sent, for servers that predate relaying.
    #[serde(default)]
    pub relay: bool,
    /// More heights follow in [`Frame::Have`] pages.
    #[serde(default)]
    pub more_have: bool,
}

/// The subject a dataset is announced on under `prefix`.
pub fn dataset_subject(prefix: &str, name: &str) -> String {
    format!("{prefix}.{name}")
}

impl SyncRequest {
    /// The frames that open a session: the request with the first page of heights, then the
    /// remaining pages.
    pub fn frames(
        interests: Vec<Interest>,
        mut have: Vec<LogHeight>,
        datasets_prefix: String,
        relay: bool,
    ) -> Vec<Frame> {
        let rest = if have.len() > HAVE_PAGE {
            have.split_off(HAVE_PAGE)
        } else {
            Vec::new()
        };
        let mut frames = vec![Frame::Request(SyncRequest {
            interests,
            have,
            datasets_prefix,
            relay,
            more_have: !rest.is_empty(),
        })];
        let pages: Vec<Vec<LogHeight>> = rest.chunks(HAVE_PAGE).map(<[_]>::to_vec).collect();
        let count = pages.len();
        for (i, heights) in pages.into_iter().enumerate() {
            frames.push(Frame::Have {
                heights,
                more: i + 1 < count,
            });
        }
        frames
    }

    /// True when operations of `author` in `log` are wanted.
    pub fn wants(&self, author: &PublicKey, log: &LogId) -> bool {
        if self.relay {
            return true;
        }
        // Message logs are checked on every pushed operation: borrow their subject.
        let subject: std::borrow::Cow<'_, str> = match log {
            LogId::Message(subject) => subject.into(),
            LogId::Dataset(_) if self.datasets_prefix.is_empty() => return false,
            LogId::Dataset(name) => dataset_subject(&self.datasets_prefix, name).into(),
        };
        self.interests.iter().any(|interest| {
            interest.author == *author && crate::subject::matches_any(&interest.subjects, &subject)
        })
    }
}

/// Why a session could not start or had to end.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("the session did not start with a request")]
    NoRequest,
    #[error("unexpected {0} frame")]
    UnexpectedFrame(&'static str),
    #[error("the subscriber announced more than {MAX_SESSION_LOGS} logs")]
    TooManyLogs,
    #[error("the stream ended before the request was complete")]
    Incomplete,
}

/// How far the subscriber has each log, indexed (the request's own list is a page at most).
#[derive(Debug, Default, Clone)]
pub struct Heights {
    next: HashMap<(PublicKey, LogId), u64>,
}

impl Heights {
    /// The first sequence number to send of a log (0 when the subscriber has none of it).
    pub fn start_of(&self, author: &PublicKey, log: &LogId) -> u64 {
        // Lookups borrow nothing: the key is built once per log per session.
        self.next.get(&(*author, log.clone())).copied().unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.next.len()
    }

    pub fn is_empty(&self) -> bool {
        self.next.is_empty()
    }

    fn add(&mut self, heights: Vec<LogHeight>) -> Result<(), SessionError> {
        for height in heights {
            self.next
                .insert((height.author, height.log), height.next_seq);
        }
        if self.next.len() > MAX_SESSION_LOGS {
            return Err(SessionError::TooManyLogs);
        }
        Ok(())
    }
}

/// The serving side of a session start, without I/O: feed it the frames the subscriber sends
/// until it returns the complete request and its heights.
#[derive(Debug, Default)]
pub struct RequestReader {
    request: Option<SyncRequest>,
    heights: Heights,
}

impl RequestReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next frame; `Some` when the request is complete.
    pub fn push(&mut self, frame: Frame) -> Result<Option<(SyncRequest, Heights)>, SessionError> {
        let more = match (frame, &mut self.request) {
            (Frame::Request(mut request), None) => {
                self.heights.add(std::mem::take(&mut request.have))?;
                let more = request.more_have;
                self.request = Some(request);
                more
            }
            (Frame::Request(_), Some(_)) => return Err(SessionError::UnexpectedFrame("request")),
            (Frame::Have { heights, more }, Some(_)) => {
                self.heights.add(heights)?;
                more
            }
            (_, None) => return Err(SessionError::NoRequest),
            (Frame::Operation { .. }, Some(_)) => {
                return Err(SessionError::UnexpectedFrame("operation"));
            }
            (Frame::CaughtUp, Some(_)) => return Err(SessionError::UnexpectedFrame("caught-up")),
            (Frame::Prune | Frame::Graft { .. } | Frame::Announce(_), Some(_)) => {
                return Err(SessionError::UnexpectedFrame("control"));
            }
        };
        if more {
            return Ok(None);
        }
        let request = self.request.take().expect("a request was read");
        Ok(Some((request, std::mem::take(&mut self.heights))))
    }
}

/// One frame on a sync stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Request(SyncRequest),
    /// An operation as raw header bytes and body; the receiver verifies it.
    Operation {
        header: Vec<u8>,
        body: Vec<u8>,
    },
    CaughtUp,
    /// A further page of the subscriber's log heights; `more` when another follows.
    Have {
        heights: Vec<LogHeight>,
        more: bool,
    },
    /// Subscriber -> server: it received a copy it had already, so it gets this session's new
    /// operations from elsewhere too; announce them ([`Frame::Announce`]) instead of sending
    /// them (PlumTree's prune). Catch-up still sends bodies.
    Prune,
    /// Subscriber -> server: send this log's operations from `from.next_seq` up to (excluding)
    /// `until`, and bodies again from now on (PlumTree's graft: announced operations did not
    /// arrive from elsewhere in time).
    Graft {
        from: LogHeight,
        until: u64,
    },
    /// Server -> a pruned subscriber: the server now has these logs up to `next_seq`.
    Announce(Vec<LogHeight>),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes is larger than allowed")]
    TooLarge(usize),
    #[error("frame is truncated")]
    Truncated,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed request: {0}")]
    BadRequest(String),
}

impl Frame {
    pub fn operation(op: &SignedOperation) -> Self {
        Frame::Operation {
            header: op.header_bytes.clone(),
            body: op.body.clone(),
        }
    }

    /// Encodes the frame with its length prefix.
    pub fn encode(&self) -> Vec<u8> {
        let mut content = Vec::new();
        let kind = match self {
            Frame::Request(request) => {
                ciborium::into_writer(request, &mut content).expect("CBOR into a Vec");
                KIND_REQUEST
            }
            Frame::Operation { header, body } => {
                content.reserve(4 + header.len() + body.len());
                content.extend_from_slice(&(header.len() as u32).to_be_bytes());
                content.extend_from_slice(header);
                content.extend_from_slice(body);
                KIND_OPERATION
            }
            Frame::CaughtUp => KIND_CAUGHT_UP,
            Frame::Have { heights, more } => {
                ciborium::into_writer(&(heights, more), &mut content).expect("CBOR into a Vec");
                KIND_HAVE
            }
            Frame::Prune => KIND_PRUNE,
            Frame::Graft { from, until } => {
                ciborium::into_writer(&(from, until), &mut content).expect("CBOR into a Vec");
                KIND_GRAFT
            }
            Frame::Announce(heights) => {
                ciborium::into_writer(heights, &mut content).expect("CBOR into a Vec");
                KIND_ANNOUNCE
            }
        };
        let mut out = Vec::with_capacity(5 + content.len());
        out.extend_from_slice(&((content.len() + 1) as u32).to_be_bytes());
        out.push(kind);
        out.extend_from_slice(&content);
        out
    }

    /// Reads the length prefix: how many bytes follow it.
    pub fn decode_length(prefix: [u8; 4]) -> Result<usize, FrameError> {
        let length = u32::from_be_bytes(prefix) as usize;
        if length == 0 {
            return Err(FrameError::Truncated);
        }
        if length > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge(length));
        }
        Ok(length)
    }

    /// Decodes the bytes after the length prefix.
    pub fn decode(frame: &[u8]) -> Result<Self, FrameError> {
        let (&kind, content) = frame.split_first().ok_or(FrameError::Truncated)?;
        match kind {
            KIND_REQUEST => decode_cbor(content).map(Frame::Request),
            KIND_OPERATION => {
                let (length, rest) = content
                    .split_first_chunk::<4>()
                    .ok_or(FrameError::Truncated)?;
                let length = u32::from_be_bytes(*length) as usize;
                if length > rest.len() {
                    return Err(FrameError::Truncated);
                }
                let (header, body) = rest.split_at(length);
                Ok(Frame::Operation {
                    header: header.to_vec(),
                    body: body.to_vec(),
                })
            }
            KIND_HAVE => decode_cbor(content).map(|(heights, more)| Frame::Have { heights, more }),
            KIND_GRAFT => decode_cbor(content).map(|(from, until)| Frame::Graft { from, until }),
            KIND_ANNOUNCE => decode_cbor(content).map(Frame::Announce),
            KIND_CAUGHT_UP | KIND_PRUNE if !content.is_empty() => Err(FrameError::BadRequest(
                "caught-up or prune frame with content".into(),
            )),
            KIND_CAUGHT_UP => Ok(Frame::CaughtUp),
            KIND_PRUNE => Ok(Frame::Prune),
            other => Err(FrameError::UnknownKind(other)),
        }
    }
}

/// Decodes the CBOR content of a request-like frame (request, height page, graft, announcement).
fn decode_cbor<T: serde::de::DeserializeOwned>(content: &[u8]) -> Result<T, FrameError> {
    if content.len() > MAX_REQUEST_BYTES {
        return Err(FrameError::TooLarge(content.len()));
    }
    ciborium::from_reader(content).map_err(|err| FrameError::BadRequest(err.to_string()))
}

/// Holds operations that arrived before their predecessors until the gap is filled.
///
/// Operations of one log can reach a node out of order when several peers forward them. The
/// buffer keeps at most `capacity` operations in all; beyond that the newest arrivals are dropped
/// (a later sync session delivers them again in order).
#[derive(Debug)]
pub struct ReorderBuffer {
    pending: HashMap<(PublicKey, LogId), BTreeMap<u64, SignedOperation>>,
    held: usize,
    capacity: usize,
}

/// What to do with an arriving operation, given the log's next expected sequence number.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival {
    /// In order: store it, then call [`ReorderBuffer::take_ready`].
    Next,
    /// Already stored (or older): ignore, after checking it is the same operation.
    Old,
    /// Ahead of a gap: held back.
    Held,
    /// Ahead of a gap, but the buffer is full: dropped.
    Dropped,
}

impl ReorderBuffer {
    pub fn new(capacity: usize) -> Self {
        Self {
            pending: HashMap::new(),
            held: 0,
            capacity,
        }
    }

    pub fn held(&self) -> usize {
        self.held
    }

    /// Classifies `op` against the log's `next_seq` and holds it back when it is early.
    pub fn arrive(
        &mut self,
        op: SignedOperation,
        next_seq: u64,
    ) -> (Arrival, Option<SignedOperation>) {
        let seq = op.seq();
        if seq < next_seq {
            return (Arrival::Old, Some(op));
        }
        if seq == next_seq {
            return (Arrival::Next, Some(op));
        }
        if self.held >= self.capacity {
            return (Arrival::Dropped, None);
        }
        let slot = self
            .pending
            .entry((op.author(), op.log().clone()))
            .or_default();
        if slot.insert(seq, op).is_none() {
            self.held += 1;
        }
        (Arrival::Held, None)
    }

    /// Takes the held operation that continues the log at `next_seq`, if any.
    pub fn take_ready(
        &mut self,
        author: &PublicKey,
        log: &LogId,
        next_seq: u64,
    ) -> Option<SignedOperation> {
        let key = (*author, log.clone());
        let slot = self.pending.get_mut(&key)?;
        // Drop anything that became old meanwhile.
        while let Some((&seq, _)) = slot.first_key_value() {
            if seq >= next_seq {
                break;
            }
            slot.pop_first();
            self.held -= 1;
        }
        let op = slot.remove(&next_seq);
        if op.is_some() {
            self.held -= 1;
        }
        if slot.is_empty() {
            self.pending.remove(&key);
        }
        op
    }
}

/// The serving side of a live session, without I/O: after catch-up, the driver tells it about
/// every operation the store commits and every control frame the subscriber sends, and does
/// what it answers (send one operation, send a stored range, or queue an announcement).
#[derive(Debug)]
pub struct Pusher {
    remote: PublicKey,
    request: SyncRequest,
    heights: Heights,
    /// Per log: the next sequence number the subscriber gets (or was told about).
    sent: HashMap<(PublicKey, LogId), u64>,
    /// Bodies (true) or announcements (false, after the subscriber pruned this session).
    eager: bool,
    announce: Vec<LogHeight>,
}

/// What the driver does about a committed operation or a control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(
    clippy::large_enum_variant,
    reason = "returned by value and matched at once; a range is rare and boxing it buys nothing"
)]
pub enum Push {
    /// Nothing: not wanted, or the subscriber has it already.
    Skip,
    /// Send this operation.
    Send,
    /// Send the stored operations of this log from `from` up to (excluding) `until`, then
    /// report how far it got with [`Pusher::sent_to`].
    Range {
        author: PublicKey,
        log: LogId,
        from: u64,
        until: u64,
    },
    /// Queued as an announcement: send [`Pusher::announcements`] when no event is pending.
    Announced,
}

impl Pusher {
    pub fn new(remote: PublicKey, request: SyncRequest, heights: Heights) -> Self {
        Self {
            remote,
            request,
            heights,
            sent: HashMap::new(),
            eager: true,
            announce: Vec::new(),
        }
    }

    /// A subscriber is never sent its own operations back (it has them all).
    pub fn wants(&self, author: &PublicKey, log: &LogId) -> bool {
        *author != self.remote && self.request.wants(author, log)
    }

    pub fn is_eager(&self) -> bool {
        self.eager
    }

    /// Where catch-up starts for a log: what was sent in this session, else the subscriber's
    /// height.
    pub fn start_of(&self, author: &PublicKey, log: &LogId) -> u64 {
        self.sent
            .get(&(*author, log.clone()))
            .copied()
            .unwrap_or_else(|| self.heights.start_of(author, log))
    }

    /// Records that the subscriber now has a log up to (excluding) `next`.
    pub fn sent_to(&mut self, author: &PublicKey, log: &LogId, next: u64) {
        let entry = self.sent.entry((*author, log.clone())).or_insert(0);
        *entry = (*entry).max(next);
    }

    /// The store committed operation `seq` of a log.
    pub fn stored(&mut self, author: &PublicKey, log: &LogId, seq: u64) -> Push {
        if !self.wants(author, log) {
            return Push::Skip;
        }
        let next = self.start_of(author, log);
        if seq < next {
            return Push::Skip;
        }
        if !self.eager {
            // The subscriber gets bodies elsewhere: tell it this one exists.
            self.announce.push(LogHeight {
                author: *author,
                log: log.clone(),
                next_seq: seq + 1,
            });
            self.sent_to(author, log, seq + 1);
            return Push::Announced;
        }
        if seq == next {
            self.sent_to(author, log, seq + 1);
            return Push::Send;
        }
        Push::Range {
            author: *author,
            log: log.clone(),
            from: next,
            until: seq + 1,
        }
    }

    /// A control frame from the subscriber: prune (announce from now on) or graft (send this
    /// range, and bodies from now on).
    pub fn control(&mut self, frame: Frame) -> Result<Push, SessionError> {
        match frame {
            Frame::Prune => {
                self.eager = false;
                Ok(Push::Skip)
            }
            Frame::Graft { from, until } => {
                self.eager = true;
                if !self.wants(&from.author, &from.log) || from.next_seq >= until {
                    return Ok(Push::Skip);
                }
                Ok(Push::Range {
                    author: from.author,
                    log: from.log,
                    from: from.next_seq,
                    until,
                })
            }
            Frame::Request(_) => Err(SessionError::UnexpectedFrame("request")),
            Frame::Have { .. } => Err(SessionError::UnexpectedFrame("have")),
            Frame::Operation { .. } => Err(SessionError::UnexpectedFrame("operation")),
            Frame::CaughtUp => Err(SessionError::UnexpectedFrame("caught-up")),
            Frame::Announce(_) => Err(SessionError::UnexpectedFrame("announce")),
        }
    }

    /// The queued announcements as one frame, when there are any and either no event is
    /// pending (`idle`) or the batch is full.
    pub fn announcements(&mut self, idle: bool, batch: usize) -> Option<Frame> {
        if self.announce.is_empty() || !(idle || self.announce.len() >= batch) {
            return None;
        }
        Some(Frame::Announce(std::mem::take(&mut self.announce)))
    }
}

/// Ranges a node grafted recently, shared by all its sessions: per log, the end of the range
/// last asked for and when. An operation announced by several sessions is asked for once.
pub type RecentGrafts = HashMap<(PublicKey, LogId), (u64, std::time::Instant)>;

/// The subscribing side of a live session, without I/O: whether the session still gets
/// bodies, and which announced operations to ask for because they did not arrive from
/// elsewhere within the graft timeout.
#[derive(Debug)]
pub struct Subscriber {
    eager: bool,
    graft_timeout: std::time::Duration,
    /// Announced log heights, with when to graft them if still missing (in arrival order, so
    /// in deadline order).
    awaited: std::collections::VecDeque<(std::time::Instant, LogHeight)>,
}

impl Subscriber {
    pub fn new(graft_timeout: std::time::Duration) -> Self {
        Self {
            eager: true,
            graft_timeout,
            awaited: Default::default(),
        }
    }

    pub fn is_eager(&self) -> bool {
        self.eager
    }

    /// True when a batch with `duplicates` copies of stored operations should prune this
    /// session (the driver also makes sure another session stays eager, then calls
    /// [`Subscriber::prune`]).
    pub fn should_prune(&self, duplicates: u64) -> bool {
        self.eager && duplicates > 0
    }

    /// The frame that prunes the session.
    pub fn prune(&mut self) -> Frame {
        self.eager = false;
        Frame::Prune
    }

    /// The server announced these heights.
    pub fn announced(&mut self, heights: Vec<LogHeight>, now: std::time::Instant) {
        let at = now + self.graft_timeout;
        self.awaited
            .extend(heights.into_iter().map(|height| (at, height)));
    }

    /// When [`Subscriber::due`] has something to decide.
    pub fn next_deadline(&self) -> Option<std::time::Instant> {
        self.awaited.front().map(|(at, _)| *at)
    }

    /// The grafts for the announcements whose time is up, given how far the store has each
    /// log (`have`) and what the node's sessions grafted recently (`recent`, updated). Any
    /// graft makes the session eager again.
    pub fn due(
        &mut self,
        now: std::time::Instant,
        have: impl Fn(&PublicKey, &LogId) -> u64,
        recent: &mut RecentGrafts,
    ) -> Vec<Frame> {
        let timeout = self.graft_timeout;
        recent.retain(|_, (_, at)| now.duration_since(*at) < timeout);
        let mut grafts = Vec::new();
        while let Some((at, _)) = self.awaited.front() {
            if *at > now {
                break;
            }
            let (_, height) = self.awaited.pop_front().expect("checked above");
            let key = (height.author, height.log.clone());
            let stored = have(&height.author, &height.log);
            // What a session asked for recently is on its way.
            let from = recent
                .get(&key)
                .map_or(stored, |(until, _)| stored.max(*until));
            if from >= height.next_seq {
                continue;
            }
            recent.insert(key, (height.next_seq, now));
            self.eager = true;
            grafts.push(Frame::Graft {
                from: LogHeight {
                    author: height.author,
                    log: height.log,
                    next_seq: from,
                },
                until: height.next_seq,
            });
        }
        grafts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::PrivateKey;
    use proptest::prelude::*;

    fn chain(key: &PrivateKey, n: u64) -> Vec<SignedOperation> {
        let mut ops: Vec<SignedOperation> = Vec::new();
        for seq in 0..n {
            let backlink = ops.last().map(|op| op.hash);
            ops.push(SignedOperation::sign(
                key,
                LogId::Message("a.b".into()),
                seq,
                backlink,
                seq,
                vec![seq as u8 + 1],
            ));
        }
        ops
    }

    fn round_trip(frame: &Frame) -> Frame {
        let bytes = frame.encode();
        let length = Frame::decode_length(bytes[..4].try_into().unwrap()).unwrap();
        assert_eq!(length, bytes.len() - 4);
        Frame::decode(&bytes[4..]).unwrap()
    }

    #[test]
    fn frames_round_trip() {
        let key = PrivateKey::generate();
        let request = Frame::Request(SyncRequest {
            interests: vec![Interest {
                author: key.public_key(),
                subjects: vec!["a.>".into()],
            }],
            have: vec![LogHeight {
                author: key.public_key(),
                log: LogId::Message("a.b".into()),
                next_seq: 7,
            }],
            datasets_prefix: "datasets".into(),
            relay: true,
            more_have: false,
        });
        assert_eq!(round_trip(&request), request);
        let have = Frame::Have {
            heights: vec![LogHeight {
                author: key.public_key(),
                log: LogId::Dataset("weather".into()),
                next_seq: 2,
            }],
            more: true,
        };
        assert_eq!(round_trip(&have), have);
        let height = LogHeight {
            author: key.public_key(),
            log: LogId::Message("a.b".into()),
            next_seq: 3,
        };
        for frame in [
            Frame::Prune,
            Frame::Graft {
                from: height.clone(),
                until: 9,
            },
            Frame::Announce(vec![height.clone(), height]),
        ] {
            assert_eq!(round_trip(&frame), frame);
        }
        let op = Frame::operation(&chain(&key, 1)[0]);
        assert_eq!(round_trip(&op), op);
        assert_eq!(round_trip(&Frame::CaughtUp), Frame::CaughtUp);
    }

    #[test]
    fn bad_frames_are_rejected() {
        assert_eq!(
            Frame::decode_length([0, 0, 0, 0]),
            Err(FrameError::Truncated)
        );
        assert!(matches!(
            Frame::decode_length(u32::MAX.to_be_bytes()),
            Err(FrameError::TooLarge(_))
        ));
        assert_eq!(Frame::decode(&[]), Err(FrameError::Truncated));
        assert_eq!(Frame::decode(&[9]), Err(FrameError::UnknownKind(9)));
        assert_eq!(
            Frame::decode(&[KIND_OPERATION, 0, 0, 0, 9, 1]),
            Err(FrameError::Truncated)
        );
        assert!(Frame::decode(&[KIND_REQUEST, 0xff]).is_err());
    }

    #[test]
    fn request_selects_logs_by_author_and_subject() {
        let a = PrivateKey::generate().public_key();
        let b = PrivateKey::generate().public_key();
        let request = SyncRequest {
            interests: vec![Interest {
                author: a,
                subjects: vec!["sensors.*".into()],
            }],
            have: vec![LogHeight {
                author: a,
                log: LogId::Message("sensors.t1".into()),
                next_seq: 3,
            }],
            datasets_prefix: String::new(),
            relay: false,
            more_have: false,
        };
        assert!(request.wants(&a, &LogId::Message("sensors.t1".into())));
        assert!(!request.wants(&a, &LogId::Message("other".into())));
        assert!(!request.wants(&b, &LogId::Message("sensors.t1".into())));
        assert!(!request.wants(&a, &LogId::Dataset("sensors.t1".into())));
        let (request, heights) = RequestReader::new()
            .push(Frame::Request(request))
            .unwrap()
            .unwrap();
        assert_eq!(
            heights.start_of(&a, &LogId::Message("sensors.t1".into())),
            3
        );
        assert_eq!(
            heights.start_of(&a, &LogId::Message("sensors.t2".into())),
            0
        );
        assert!(request.have.is_empty(), "the heights moved into the index");
        // Datasets are selected by their subject under the subscriber's prefix.
        let datasets = SyncRequest {
            interests: vec![Interest {
                author: a,
                subjects: vec!["datasets.weather".into(), "sensors.*".into()],
            }],
            have: vec![],
            datasets_prefix: "datasets".into(),
            relay: false,
            more_have: false,
        };
        assert!(datasets.wants(&a, &LogId::Dataset("weather".into())));
        assert!(!datasets.wants(&a, &LogId::Dataset("climate".into())));
        assert!(!datasets.wants(&b, &LogId::Dataset("weather".into())));
        let old_peer: SyncRequest = ciborium::from_reader(
            &{
                let mut bytes = Vec::new();
                ciborium::into_writer(
                    &serde_json::json!({"interests": [], "have": []}),
                    &mut bytes,
                )
                .unwrap();
                bytes
            }[..],
        )
        .unwrap();
        assert_eq!(old_peer.datasets_prefix, "");
        assert!(!old_peer.relay && !old_peer.more_have);
        // A relaying subscriber wants every log of every author.
        let relay = SyncRequest {
            relay: true,
            ..old_peer
        };
        assert!(relay.wants(&b, &LogId::Dataset("anything".into())));
    }

    #[test]
    fn heights_of_many_logs_travel_in_pages() {
        let key = PrivateKey::generate().public_key();
        let have: Vec<LogHeight> = (0..HAVE_PAGE as u64 * 2 + 5)
            .map(|i| LogHeight {
                author: key,
                log: LogId::Message(format!("s.{i}")),
                next_seq: i + 1,
            })
            .collect();
        let frames = SyncRequest::frames(Vec::new(), have.clone(), "datasets".into(), true);
        assert_eq!(frames.len(), 3);
        let mut reader = RequestReader::new();
        let mut done = None;
        for (i, frame) in frames.into_iter().enumerate() {
            // Every page fits in a frame.
            assert!(frame.encode().len() < MAX_REQUEST_BYTES);
            let decoded = Frame::decode(&frame.encode()[4..]).unwrap();
            let result = reader.push(decoded).unwrap();
            assert_eq!(result.is_some(), i == 2);
            done = result;
        }
        let (request, heights) = done.unwrap();
        assert!(request.relay);
        assert_eq!(heights.len(), have.len());
        for height in &have {
            assert_eq!(heights.start_of(&key, &height.log), height.next_seq);
        }
    }

    #[test]
    fn a_session_must_start_with_one_request() {
        let have = Frame::Have {
            heights: Vec::new(),
            more: false,
        };
        assert_eq!(
            RequestReader::new().push(have.clone()).unwrap_err(),
            SessionError::NoRequest
        );
        assert_eq!(
            RequestReader::new().push(Frame::CaughtUp).unwrap_err(),
            SessionError::NoRequest
        );
        let mut reader = RequestReader::new();
        let first = SyncRequest::frames(Vec::new(), Vec::new(), String::new(), true).remove(0);
        let Frame::Request(mut request) = first else {
            unreachable!()
        };
        request.more_have = true;
        assert!(
            reader
                .push(Frame::Request(request.clone()))
                .unwrap()
                .is_none()
        );
        assert_eq!(
            reader.push(Frame::Request(request)).unwrap_err(),
            SessionError::UnexpectedFrame("request")
        );
    }

    #[test]
    fn a_pusher_sends_in_order_fills_gaps_and_skips_what_the_subscriber_has() {
        let (me, them, other) = (
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
        );
        let log = LogId::Message("a.b".into());
        let frames = SyncRequest::frames(
            Vec::new(),
            vec![LogHeight {
                author: other,
                log: log.clone(),
                next_seq: 2,
            }],
            String::new(),
            true,
        );
        let mut reader = RequestReader::new();
        let (request, heights) = frames
            .into_iter()
            .find_map(|frame| reader.push(frame).unwrap())
            .unwrap();
        let mut pusher = Pusher::new(them, request, heights);
        assert_eq!(pusher.stored(&them, &log, 0), Push::Skip, "its own log");
        assert_eq!(pusher.stored(&other, &log, 1), Push::Skip, "it has it");
        assert_eq!(pusher.stored(&other, &log, 2), Push::Send);
        assert_eq!(
            pusher.stored(&other, &log, 5),
            Push::Range {
                author: other,
                log: log.clone(),
                from: 3,
                until: 6
            }
        );
        pusher.sent_to(&other, &log, 6);
        assert_eq!(pusher.stored(&me, &log, 0), Push::Send, "a new log from 0");
        assert_eq!(pusher.stored(&other, &log, 6), Push::Send);
    }

    #[test]
    fn a_pruned_pusher_announces_and_a_graft_makes_it_send_again() {
        let (them, author) = (
            PrivateKey::generate().public_key(),
            PrivateKey::generate().public_key(),
        );
        let log = LogId::Message("a.b".into());
        let (request, heights) = RequestReader::new()
            .push(SyncRequest::frames(Vec::new(), Vec::new(), String::new(), true).remove(0))
            .unwrap()
            .unwrap();
        let mut pusher = Pusher::new(them, request, heights);
        assert_eq!(pusher.stored(&author, &log, 0), Push::Send);
        assert_eq!(pusher.control(Frame::Prune), Ok(Push::Skip));
        assert!(!pusher.is_eager());
        assert_eq!(pusher.stored(&author, &log, 1), Push::Announced);
        assert_eq!(pusher.stored(&author, &log, 2), Push::Announced);
        assert_eq!(
            pusher.announcements(false, 10),
            None,
            "waits while events are queued"
        );
        let Some(Frame::Announce(heights)) = pusher.announcements(true, 10) else {
            panic!("announcements");
        };
        assert_eq!(
            heights.iter().map(|h| h.next_seq).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert_eq!(pusher.announcements(true, 10), None);
        let graft = Frame::Graft {
            from: LogHeight {
                author,
                log: log.clone(),
                next_seq: 1,
            },
            until: 3,
        };
        assert_eq!(
            pusher.control(graft),
            Ok(Push::Range {
                author,
                log: log.clone(),
                from: 1,
                until: 3
            })
        );
        assert!(pusher.is_eager());
        assert_eq!(pusher.stored(&author, &log, 3), Push::Send);
        assert!(pusher.control(Frame::CaughtUp).is_err());
    }

    #[test]
    fn a_subscriber_grafts_what_did_not_arrive_in_time_once_across_sessions() {
        use std::time::{Duration, Instant};
        let author = PrivateKey::generate().public_key();
        let log = LogId::Message("a.b".into());
        let height = |next_seq| LogHeight {
            author,
            log: log.clone(),
            next_seq,
        };
        let timeout = Duration::from_secs(1);
        let start = Instant::now();
        let mut first = Subscriber::new(timeout);
        let mut second = Subscriber::new(timeout);
        assert!(!first.should_prune(0));
        assert!(first.should_prune(3));
        assert_eq!(first.prune(), Frame::Prune);
        assert!(!first.is_eager() && !first.should_prune(3));

        first.announced(vec![height(5)], start);
        second.announced(vec![height(5)], start);
        let mut recent = RecentGrafts::new();
        assert!(
            first.due(start, |_, _| 2, &mut recent).is_empty(),
            "not yet"
        );
        assert_eq!(first.next_deadline(), Some(start + timeout));
        let later = start + timeout;
        assert_eq!(
            first.due(later, |_, _| 2, &mut recent),
            vec![Frame::Graft {
                from: height(2),
                until: 5
            }]
        );
        assert!(first.is_eager(), "a graft makes the session eager");
        // The other session's announcement of the same range: already asked for.
        assert!(second.due(later, |_, _| 2, &mut recent).is_empty());
        // What arrived meanwhile is not asked for.
        second.announced(vec![height(4)], later);
        assert!(
            second
                .due(later + timeout * 2, |_, _| 4, &mut recent)
                .is_empty()
        );
        assert_eq!(second.next_deadline(), None);
    }

    proptest! {
        // Whatever order a log's operations arrive in, the buffer releases them in sequence.
        #[test]
        fn reorder_buffer_releases_in_order(order in Just((0..20u64).collect::<Vec<_>>()).prop_shuffle()) {
            let key = PrivateKey::generate();
            let ops = chain(&key, 20);
            let mut buffer = ReorderBuffer::new(100);
            let mut next = 0;
            let mut released = Vec::new();
            for i in order {
                let (arrival, op) = buffer.arrive(ops[i as usize].clone(), next);
                if arrival == Arrival::Next {
                    released.push(op.unwrap().seq());
                    next += 1;
                    while let Some(op) = buffer.take_ready(&key.public_key(), &LogId::Message("a.b".into()), next) {
                        released.push(op.seq());
                        next += 1;
                    }
                }
            }
            prop_assert_eq!(released, (0..20).collect::<Vec<_>>());
            prop_assert_eq!(buffer.held(), 0);
        }

        #[test]
        fn frame_decoder_survives_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Frame::decode(&bytes);
        }
    }

    #[test]
    fn full_buffer_drops_early_operations() {
        let key = PrivateKey::generate();
        let ops = chain(&key, 4);
        let mut buffer = ReorderBuffer::new(1);
        assert_eq!(buffer.arrive(ops[2].clone(), 0).0, Arrival::Held);
        assert_eq!(buffer.arrive(ops[3].clone(), 0).0, Arrival::Dropped);
        assert_eq!(buffer.arrive(ops[0].clone(), 1).0, Arrival::Old);
    }
}
