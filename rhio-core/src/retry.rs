//! One retry policy for every loop of the node that tries again: exponential backoff with a cap
//! and jitter, without I/O (the caller sleeps and supplies the randomness).
//!
//! Jitter matters when many loops fail at the same moment (an S3 or NATS restart): without it,
//! every loop of every node comes back in the same millisecond and knocks the server over again.
//! The delay is "equal jitter": half of the exponential step is fixed, the other half random, so a
//! delay is never shorter than half its step (no busy loop) and never longer than the cap.
//!
//! ```
//! use std::time::Duration;
//! use rhio_core::retry::Backoff;
//!
//! let policy = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
//! let mut attempts = policy.attempts();
//! let first = attempts.next_delay(0.5);
//! assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
//! attempts.reset(); // after a success
//! ```

use std::time::Duration;

/// Exponential backoff from `initial`, doubling up to `max`, with equal jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max }
    }

    /// The un-jittered step of attempt `n` (from 0): `initial * 2^n`, at most `max`.
    pub fn step(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay before attempt `n + 1`, with `random` in `[0, 1)`: between half the step and the
    /// whole step.
    pub fn delay(&self, n: u32, random: f64) -> Duration {
        let step = self.step(n);
        let random = if random.is_finite() {
            random.clamp(0.0, 1.0)
        } else {
            0.0
        };
        step / 2 + step.mul_f64(random / 2.0)
    }

    /// A counter of consecutive failures under this policy.
    pub fn attempts(self) -> Attempts {
        Attempts {
            policy: self,
            failures: 0,
        }
    }
}

/// Consecutive failures of one loop: each failure lengthens the next delay, a success resets it.
#[derive(Debug, Clone)]
pub struct Attempts {
    policy: Backoff,
    failures: u32,
}

impl Attempts {
    /// Records a failure and returns how long to wait before the next try.
    pub fn next_delay(&mut self, random: f64) -> Duration {
        let delay = self.policy.delay(self.failures, random);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn steps_double_up_to_the_cap() {
        let policy = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let steps: Vec<_> = (0..6).map(|n| policy.step(n).as_millis()).collect();
        assert_eq!(steps, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(policy.step(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn a_success_starts_over() {
        let mut attempts =
            Backoff::new(Duration::from_millis(10), Duration::from_secs(1)).attempts();
        for _ in 0..5 {
            attempts.next_delay(0.0);
        }
        assert_eq!(attempts.failures(), 5);
        attempts.reset();
        assert_eq!(attempts.next_delay(0.0), Duration::from_millis(5));
    }

    proptest! {
        #[test]
        fn delays_stay_between_half_the_step_and_the_cap(
            initial_ms in 1u64..10_000,
            max_ms in 1u64..600_000,
            n in 0u32..100,
            random in proptest::num::f64::ANY,
        ) {
            let policy = Backoff::new(
                Duration::from_millis(initial_ms),
                Duration::from_millis(max_ms),
            );
            let step = policy.step(n);
            let delay = policy.delay(n, random);
            prop_assert!(delay >= step / 2);
            prop_assert!(delay <= step);
            prop_assert!(delay <= policy.max);
        }
    }
}
