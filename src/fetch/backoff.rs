//! Backing off from an origin host that asked for it or keeps failing: until then new fills
//! from it are refused at once (503 `origin_backoff`), while what is cached of it is served.
//!
//! - A 429 or 503 with `Retry-After` (seconds, or an HTTP date) stops fills from that host
//!   for that long, at most [`MAX_BACKOFF`].
//! - A host whose requests fail [`FAILURES_BEFORE_BACKOFF`] times in a row (no answer, a
//!   timeout, a 5xx, a 429 without `Retry-After`) is left alone for
//!   [`FIRST_BACKOFF`], doubling with each further failure up to [`MAX_BACKOFF`].
//! - Any other answer (a 2xx, 3xx, or a 4xx such as an expired URL's 403) is a success:
//!   the host's count starts again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::telemetry::ReasonLabels;

/// The longest a host is left alone, whatever it asked.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// Failures in a row before a host is left alone.
pub const FAILURES_BEFORE_BACKOFF: u32 = 3;
/// The first pause after failures, doubled with each further one.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(5);
/// Hosts remembered at most; beyond it, those whose pause is over are forgotten first.
const MAX_HOSTS: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct State {
    /// Failures in a row.
    failures: u32,
    /// No new fills before this.
    until: Option<Instant>,
}

/// Hosts that are being left alone, and the failures that may lead there.
#[derive(Default)]
pub struct Backoff {
    hosts: Mutex<HashMap<String, State>>,
    /// `parasol_origin_backoffs_total{reason}`: pauses begun, by why.
    begun: Family<ReasonLabels, Counter>,
}

/// What an origin's answer (or its absence) means for its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// It answered usefully (anything but the failures below).
    Fine,
    /// No answer, a timeout, a 5xx, or a 429 without a usable `Retry-After`.
    Failed,
    /// A 429 or 503 asking to wait this long.
    RetryAfter(Duration),
}

impl Backoff {
    /// Counting the pauses it begins in `begun`.
    pub fn new(begun: Family<ReasonLabels, Counter>) -> Self {
        Self { hosts: Mutex::default(), begun }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, State>> {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ok unless `host` is being left alone now.
    pub fn check(&self, host: &str) -> Result<(), ProxyError> {
        let hosts = self.lock();
        match hosts.get(host).and_then(|s| s.until) {
            Some(until) if until > Instant::now() => Err(ProxyError::OriginBackoff),
            _ => Ok(()),
        }
    }

    /// Records what `host` answered.
    pub fn observe(&self, host: &str, answer: Answer) {
        let mut hosts = self.lock();
        let now = Instant::now();
        if answer == Answer::Fine {
            hosts.remove(host);
            return;
        }
        if hosts.len() >= MAX_HOSTS && !hosts.contains_key(host) {
            hosts.retain(|_, s| s.until.is_some_and(|u| u > now));
            if hosts.len() >= MAX_HOSTS {
                return;
            }
        }
        let state = hosts.entry(host.to_string()).or_insert(State { failures: 0, until: None });
        state.failures = state.failures.saturating_add(1);
        let (pause, reason) = match answer {
            Answer::RetryAfter(wait) => (Some(wait.min(MAX_BACKOFF)), "retry_after"),
            _ if state.failures >= FAILURES_BEFORE_BACKOFF => {
                let doublings = (state.failures - FAILURES_BEFORE_BACKOFF).min(16);
                (Some((FIRST_BACKOFF * 2u32.pow(doublings)).min(MAX_BACKOFF)), "failures")
            }
            _ => (None, ""),
        };
        if let Some(pause) = pause.filter(|p| !p.is_zero()) {
            let until = now + pause;
            // A pause is never shortened by a later, shorter one.
            if state.until.is_none_or(|u| u < until) {
                state.until = Some(until);
                self.begun.get_or_create(&ReasonLabels { reason }).inc();
                tracing::info!(host, seconds = pause.as_secs(), reason, "backing off from origin");
            }
        }
    }

    /// Hosts being left alone now (for `/metrics`).
    pub fn active(&self) -> usize {
        let now = Instant::now();
        self.lock().values().filter(|s| s.until.is_some_and(|u| u > now)).count()
    }
}

/// The wait a `Retry-After` value asks for: delay-seconds, or an HTTP date (a date in the past
/// asks for none). `None` when it is neither.
pub fn retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(retry_after(" 3 ", now), Some(Duration::from_secs(3)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(retry_after(&later, now), Some(Duration::from_secs(90)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("-5", now), None);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured_and_capped() {
        let b = Backoff::default();
        b.observe("a.test", Answer::RetryAfter(Duration::from_secs(3)));
        assert!(matches!(b.check("a.test"), Err(ProxyError::OriginBackoff)));
        assert!(b.check("b.test").is_ok(), "other hosts are not touched");
        tokio::time::advance(Duration::from_millis(2_900)).await;
        assert!(b.check("a.test").is_err());
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(b.check("a.test").is_ok(), "over after 3 s");
        b.observe("a.test", Answer::RetryAfter(Duration::from_secs(86_400)));
        tokio::time::advance(MAX_BACKOFF + Duration::from_secs(1)).await;
        assert!(b.check("a.test").is_ok(), "a day asked is ten minutes given");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_exponentially_until_a_success() {
        let b = Backoff::default();
        for _ in 0..FAILURES_BEFORE_BACKOFF - 1 {
            b.observe("down.test", Answer::Failed);
            assert!(b.check("down.test").is_ok(), "a failure or two is not a pattern");
        }
        let mut pauses = Vec::new();
        for _ in 0..10 {
            b.observe("down.test", Answer::Failed);
            let mut waited = Duration::ZERO;
            while b.check("down.test").is_err() && waited < Duration::from_secs(3600) {
                tokio::time::advance(Duration::from_secs(1)).await;
                waited += Duration::from_secs(1);
            }
            pauses.push(waited.as_secs());
        }
        assert_eq!(pauses, [5, 10, 20, 40, 80, 160, 320, 600, 600, 600]);
        assert_eq!(b.active(), 0);
        b.observe("down.test", Answer::Fine);
        b.observe("down.test", Answer::Failed);
        assert!(b.check("down.test").is_ok(), "a success starts the count again");
    }
}
