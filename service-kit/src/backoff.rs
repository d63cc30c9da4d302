//! Waiting between retries of a dependency that is down (Postgres, Kafka,
//! MongoDB): the delay doubles from 200 ms up to 5 s, so that an outage of a
//! second is retried at once and a long one is not hammered, and every wait
//! ends early when the service is told to stop.

use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The first wait after a failure.
pub const FIRST_DELAY: Duration = Duration::from_millis(200);
/// The longest wait between two tries.
pub const LONGEST_DELAY: Duration = Duration::from_secs(5);

/// The waits between the tries of one operation.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: FIRST_DELAY }
    }
}

impl Backoff {
    /// The wait the next [`Backoff::wait`] will make.
    pub fn delay(&self) -> Duration {
        self.next
    }

    /// Waits the current delay, then doubles it. False when `stop` fired
    /// first: the caller gives up.
    pub async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let delay = self.next;
        self.next = (self.next * 2).min(LONGEST_DELAY);
        pause(stop, delay).await
    }

    /// Starts again from the first delay, after a success.
    pub fn reset(&mut self) {
        self.next = FIRST_DELAY;
    }
}

/// Sleeps `delay` unless stopped first. False when stopped.
pub async fn pause(stop: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_delay_doubles_up_to_its_cap_and_a_stop_ends_the_wait() {
        let stop = CancellationToken::new();
        let mut backoff = Backoff::default();
        let mut delays = Vec::new();
        for _ in 0..7 {
            delays.push(backoff.delay());
            assert!(backoff.wait(&stop).await);
        }
        let ms: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [200, 400, 800, 1600, 3200, 5000, 5000]);
        backoff.reset();
        assert_eq!(backoff.delay(), FIRST_DELAY);
        stop.cancel();
        assert!(!backoff.wait(&stop).await);
    }
}
