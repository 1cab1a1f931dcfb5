//! Concurrency limits on fills: a global cap (beyond it, 503 at once) and a per-origin-host
//! cap (beyond it, wait), so parasol can neither be exhausted by distinct cold URLs nor be used
//! to flood one origin. A fill that is redirected moves its origin slot to each hop's host in
//! turn, so a thousand sources that all redirect to one victim still reach it at most
//! `fetch.max_per_origin` at a time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::policy::{OriginRule, Policy};

/// Fill slots: `fetch.max_fills` in all, `fetch.max_per_origin` per origin host.
pub struct FillLimits {
    global: Arc<Semaphore>,
    per_origin: usize,
    /// One semaphore per host with fills in progress; removed when its last holder leaves, so
    /// the map stays as small as the set of busy origins.
    origins: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
}

/// Held for the duration of one fill.
pub struct FillPermit {
    _global: OwnedSemaphorePermit,
    origin: Option<OwnedSemaphorePermit>,
    host: String,
    origins: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
    per_origin: usize,
    /// The fill's deadline: a paced origin's turn after it is refused at once.
    deadline: Instant,
}

impl Drop for FillPermit {
    fn drop(&mut self) {
        self.release_origin();
    }
}

impl FillPermit {
    /// Moves the origin slot to `host` (a redirect's next hop, under its rule in `policy`),
    /// waiting for one there and for its turn when the rule paces it.
    pub async fn move_to(&mut self, host: &str, policy: &Policy) -> Result<(), ProxyError> {
        if host == self.host {
            return Ok(());
        }
        let rule = policy.rule(host).map(|r| &**r);
        self.release_origin();
        let per_origin = rule.and_then(|r| r.max_concurrent).unwrap_or(self.per_origin);
        let semaphore = slot_of(&self.origins, host, per_origin);
        self.origin = Some(semaphore.acquire_owned().await.map_err(|_| ProxyError::Overloaded)?);
        self.host = host.to_string();
        if let Some(pace) = rule.and_then(|r| r.pace.as_ref()) {
            pace.turn(self.deadline).await?;
        }
        Ok(())
    }

    fn release_origin(&mut self) {
        drop(self.origin.take());
        let mut origins = self.origins.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map still holds it: nobody is filling from or waiting on this host.
        if origins.get(&self.host).is_some_and(|s| Arc::strong_count(s) == 1) {
            origins.remove(&self.host);
        }
    }
}

/// The semaphore of `host`, made on first use.
fn slot_of(
    origins: &Mutex<HashMap<String, Arc<Semaphore>>>,
    host: &str,
    per_origin: usize,
) -> Arc<Semaphore> {
    let mut origins = origins.lock().unwrap_or_else(|p| p.into_inner());
    origins.entry(host.to_string()).or_insert_with(|| Arc::new(Semaphore::new(per_origin))).clone()
}

impl FillLimits {
    /// Slots of `max_fills` in all and `per_origin` per host.
    pub fn new(max_fills: usize, per_origin: usize) -> Self {
        Self {
            global: Arc::new(Semaphore::new(max_fills.max(1))),
            per_origin: per_origin.max(1),
            origins: Arc::default(),
        }
    }

    /// A slot for `host`, waiting for one if this host already has `fetch.max_per_origin`
    /// (or its `rule`'s `max_concurrent`) fills running; then its turn when the rule paces it
    /// (before `deadline`, else [`ProxyError::OriginPaced`]); then a global slot now or
    /// [`ProxyError::Overloaded`]. In this order, fills queued behind one slow origin hold no
    /// global slot, so they cannot starve other origins.
    pub async fn acquire(
        &self,
        host: &str,
        rule: Option<&OriginRule>,
        deadline: Instant,
    ) -> Result<FillPermit, ProxyError> {
        let per_origin = rule.and_then(|r| r.max_concurrent).unwrap_or(self.per_origin);
        let semaphore = slot_of(&self.origins, host, per_origin);
        let origin = semaphore.acquire_owned().await.map_err(|_| ProxyError::Overloaded)?;
        let permit = |global| FillPermit {
            _global: global,
            origin: Some(origin),
            host: host.to_string(),
            origins: self.origins.clone(),
            per_origin: self.per_origin,
            deadline,
        };
        if let Some(pace) = rule.and_then(|r| r.pace.as_ref()) {
            pace.turn(deadline).await?;
        }
        let global = self.global.clone().try_acquire_owned().map_err(|_| ProxyError::Overloaded)?;
        Ok(permit(global))
    }

    /// Hosts with fills in progress or waiting (for tests and metrics).
    pub fn busy_origins(&self) -> usize {
        self.origins.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}
