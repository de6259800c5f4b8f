//! The node's side of the one retry policy ([`rhio_core::retry`]): randomness for the jitter and
//! a sleep that ends early at shutdown. Every loop that tries again after a failure (sync
//! sessions, peer probes, replication, the announcement outbox, the mirror, NATS set-up, the
//! durable import queue) waits through here.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use rhio_core::retry::{Attempts, Backoff};
use tokio_util::sync::CancellationToken;

/// A number in `[0, 1)` for the jitter. Not for cryptography: std's `RandomState` keys are
/// random per thread and differ for every new one, which is plenty to spread retries apart.
pub fn jitter() -> f64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let bits = std::collections::hash_map::RandomState::new()
        .hash_one(COUNTER.fetch_add(1, Ordering::Relaxed));
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Records a failure and sleeps for the policy's next delay. False when `shutdown` fired first.
pub async fn after_failure(attempts: &mut Attempts, shutdown: &CancellationToken) -> bool {
    let delay = attempts.next_delay(jitter());
    sleep(delay, shutdown).await
}

/// Sleeps for `delay`; false when `shutdown` fired first.
pub async fn sleep(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

/// The delay before attempt `n + 1` under `policy`, jittered.
pub fn delay(policy: Backoff, n: u32) -> Duration {
    policy.delay(n, jitter())
}

#[cfg(test)]
mod tests {
    #[test]
    fn jitter_spreads_over_the_unit_interval() {
        let values: Vec<f64> = (0..1000).map(|_| super::jitter()).collect();
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        let low = values.iter().filter(|v| **v < 0.5).count();
        assert!((350..650).contains(&low), "{low} of 1000 below 0.5");
    }
}
