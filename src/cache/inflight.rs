//! One budget for the bytes parasol holds in memory on their way into the cache: origin bodies
//! being received, bodies from the shared bucket, media workers' results. Each is held in
//! memory only while the budget has room for it (`media.inflight_bytes`); otherwise it goes to
//! a temp blob on disk as it arrives. However many fills run at once, their buffers add up
//! to at most the budget, never to fills × `cache.max_object_bytes`.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Granularity of the budget: permits are KiB, so a `u32` of them covers 4 TiB.
const UNIT: u64 = 1024;

/// Bytes fills and media results may hold in memory at once (`media.inflight_bytes`).
#[derive(Clone)]
pub struct InflightBudget {
    permits: Arc<Semaphore>,
}

/// Room for one body in memory; given back when dropped.
#[derive(Debug)]
pub struct Hold {
    _permit: OwnedSemaphorePermit,
}

impl InflightBudget {
    /// A budget of `bytes`.
    pub fn new(bytes: u64) -> Self {
        let units = (bytes / UNIT).clamp(1, Semaphore::MAX_PERMITS as u64) as usize;
        Self { permits: Arc::new(Semaphore::new(units)) }
    }

    /// Room for `bytes` now, or `None`: the caller spills to disk rather than wait.
    pub fn try_hold(&self, bytes: u64) -> Option<Hold> {
        let units = u32::try_from(bytes.div_ceil(UNIT).max(1)).ok()?;
        let permit = self.permits.clone().try_acquire_many_owned(units).ok()?;
        Some(Hold { _permit: permit })
    }

    /// Bytes of the budget free now (`parasol_inflight_bytes` is the budget less this).
    pub fn available(&self) -> u64 {
        self.permits.available_permits() as u64 * UNIT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_add_up_to_the_budget_and_come_back() {
        let budget = InflightBudget::new(3 << 20);
        let a = budget.try_hold(1 << 20).expect("room");
        let b = budget.try_hold(2 << 20).expect("room");
        assert!(budget.try_hold(1).is_none(), "full: the next body spills");
        drop(a);
        assert!(budget.try_hold(1 << 20).is_some(), "room again once a body is stored");
        drop(b);
        assert_eq!(budget.available(), 3 << 20);
        assert!(budget.try_hold(u64::MAX).is_none());
    }
}
