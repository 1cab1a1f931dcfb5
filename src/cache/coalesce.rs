//! One fill per key, however many ask at once (pingora-cache's cache lock is the model): the
//! first caller for a key leads, and its fill runs on a task of its own; every later caller
//! for that key waits on the same fill. A viewer who gives up cancels nothing: the fill goes
//! on, and what it publishes is there for the next.
//!
//! A fill publishes once it is done (an entry, or why not); a fill whose body may be read
//! as it arrives publishes that first ([`Coalescer::publish_growing`]), and callers that can
//! stream take it then. A key leaves the table however its fill ends, a panic included, after
//! the result is published, so a newcomer finds either the entry (where the fill put it) or
//! the fill, never neither.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tracing::Instrument;

use super::growing::Growing;
use super::{Entry, Key};
use crate::error::ProxyError;
use crate::telemetry::CacheStatus;

/// What a fill comes to: the entry and how it was found (disk, shared bucket, origin), or why
/// not.
pub type FillResult = Result<(Arc<Entry>, CacheStatus), ProxyError>;

/// Where a fill is, as its waiters see it.
#[derive(Clone)]
enum FillState {
    Pending,
    /// The body is arriving and may be read as it does ([`super::growing`]).
    Growing(Arc<Growing>),
    Done(FillResult),
}

/// What a caller got: the fill's result, or (having asked to stream) the body as it arrives.
pub enum Joined {
    /// The fill ended: the entry, or why not.
    Done(FillResult),
    /// The body, as it arrives.
    Growing(Arc<Growing>),
}

/// The fills in progress, by key.
#[derive(Default)]
pub struct Coalescer {
    /// A std mutex: held only to look up, insert or remove, never across an await.
    fills: Mutex<HashMap<Key, Arc<watch::Sender<FillState>>>>,
}

/// Takes a key out of the table when its fill task ends, however it ends.
struct Slot {
    coalescer: Arc<Coalescer>,
    key: Key,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.coalescer.fills.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

impl Coalescer {
    /// Joins the fill of `key`, or leads one: `fill` then runs on a task of its own. With
    /// `stream`, a fill that publishes a growing body is answered with it at once. Whether
    /// this caller led comes with the answer.
    pub async fn join<F>(self: &Arc<Self>, key: Key, fill: F, stream: bool) -> (Joined, bool)
    where
        F: Future<Output = FillResult> + Send + 'static,
    {
        let (mut rx, leader) = {
            let mut fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
            match fills.get(&key) {
                Some(tx) => (tx.subscribe(), false),
                None => {
                    let tx = Arc::new(watch::channel(FillState::Pending).0);
                    let rx = tx.subscribe();
                    fills.insert(key, tx.clone());
                    let slot = Slot { coalescer: self.clone(), key };
                    // Made here, so the fill's span is a child of the leader's request.
                    let span = crate::telemetry::traces::fill();
                    let traced = span.clone();
                    tokio::spawn(async move {
                        let result = fill.instrument(traced).await;
                        crate::telemetry::traces::outcome(&span, &result);
                        // Published before the key leaves the table (the slot's drop).
                        tx.send_replace(FillState::Done(result));
                        drop(slot);
                    });
                    (rx, true)
                }
            }
        };
        let state = rx.wait_for(|state| match state {
            FillState::Pending => false,
            FillState::Growing(_) => stream,
            FillState::Done(_) => true,
        });
        let joined = match state.await.map(|state| state.clone()) {
            Ok(FillState::Growing(growing)) => Joined::Growing(growing),
            Ok(FillState::Done(result)) => Joined::Done(result),
            // The fill's task ended without a result: it panicked.
            Ok(FillState::Pending) | Err(_) => {
                Joined::Done(Err(ProxyError::internal("fill task ended without a result")))
            }
        };
        (joined, leader)
    }

    /// Lets the waiters of `key`'s fill (those that stream) read its body as it arrives.
    pub fn publish_growing(&self, key: Key, growing: Arc<Growing>) {
        let fills = self.fills.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = fills.get(&key) {
            tx.send_if_modified(|state| match state {
                FillState::Pending => {
                    *state = FillState::Growing(growing);
                    true
                }
                _ => false,
            });
        }
    }

    /// Fills in progress.
    pub fn len(&self) -> usize {
        self.fills.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no fill is in progress.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    fn entry(n: u8) -> Arc<Entry> {
        Arc::new(Entry::new(blake3::hash(&[n]), 1, "image/png", Some(vec![n].into())))
    }

    /// A fill that counts itself, waits `for_`, and yields entry `n`.
    fn counted(
        runs: &Arc<AtomicUsize>,
        n: u8,
        for_: Duration,
    ) -> impl Future<Output = FillResult> + use<> {
        let runs = runs.clone();
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(for_).await;
            Ok((entry(n), CacheStatus::Miss))
        }
    }

    fn done(joined: Joined) -> FillResult {
        match joined {
            Joined::Done(result) => result,
            Joined::Growing(_) => panic!("a growing body where none was asked for"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_leader_many_waiters_one_fill() {
        let c = Arc::new(Coalescer::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let key = Key::new("https://a.test/x.png", None);
        let mut callers = Vec::new();
        for _ in 0..10 {
            let (c, fill) = (c.clone(), counted(&runs, 7, Duration::from_secs(1)));
            callers.push(tokio::spawn(async move { c.join(key, fill, false).await }));
        }
        let mut leaders = 0;
        for caller in callers {
            let (joined, leader) = caller.await.unwrap();
            leaders += usize::from(leader);
            assert_eq!(done(joined).unwrap().0.hash, entry(7).hash);
        }
        assert_eq!((runs.load(Ordering::SeqCst), leaders), (1, 1), "one fill, one leader");
        assert!(c.is_empty(), "the key left the table");
        // Another key is another fill.
        let other = Key::new("https://a.test/y.png", None);
        let (joined, leader) = c.join(other, counted(&runs, 8, Duration::ZERO), false).await;
        assert!(leader && done(joined).is_ok());
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_gives_up_cancels_nothing() {
        let c = Arc::new(Coalescer::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let key = Key::new("https://a.test/x.png", None);
        let leading = c.join(key, counted(&runs, 3, Duration::from_secs(5)), false);
        // The leader's viewer disconnects after a second.
        assert!(tokio::time::timeout(Duration::from_secs(1), leading).await.is_err());
        // A waiter who joins later gets the same fill's result, not a second fill.
        let (joined, leader) = c.join(key, counted(&runs, 4, Duration::ZERO), false).await;
        assert!(!leader);
        assert_eq!(done(joined).unwrap().0.hash, entry(3).hash);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fill_that_panics_fails_its_waiters_and_leaves_the_table() {
        let c = Arc::new(Coalescer::default());
        let key = Key::new("https://a.test/x.png", None);
        let boom = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            panic!("a bug in a fill");
        };
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                c.join(key, async { Ok((entry(0), CacheStatus::Miss)) }, false).await
            })
        };
        let (joined, leader) = c.join(key, boom, false).await;
        assert!(leader);
        assert!(matches!(done(joined), Err(ProxyError::Internal(_))));
        let (joined, leader) = waiter.await.unwrap();
        assert!(!leader, "it waited on the fill that panicked");
        assert!(done(joined).is_err());
        assert!(c.is_empty(), "never stuck on a fill that is gone");
        let runs = Arc::new(AtomicUsize::new(0));
        let (joined, leader) = c.join(key, counted(&runs, 1, Duration::ZERO), false).await;
        assert!(leader && done(joined).is_ok(), "the next caller leads a new fill");
    }

    #[tokio::test(start_paused = true)]
    async fn a_growing_fill_is_read_by_those_who_stream_and_awaited_by_the_others() {
        let c = Arc::new(Coalescer::default());
        let key = Key::new("https://a.test/v.mp4", None);
        let file = Arc::new(tempfile::tempfile().unwrap());
        let growing = Growing::new("video/mp4", Some(10), file);
        let (publisher, published) = (c.clone(), growing.clone());
        let fill = async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            publisher.publish_growing(key, published);
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok((entry(9), CacheStatus::Miss))
        };
        let streaming = {
            let c = c.clone();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                c.join(key, async { unreachable!("joins the running fill") }, true).await
            })
        };
        let started = tokio::time::Instant::now();
        let (joined, leader) = c.join(key, fill, false).await;
        assert!(leader);
        assert!(started.elapsed() >= Duration::from_secs(11), "waited for the stored entry");
        assert_eq!(done(joined).unwrap().0.hash, entry(9).hash);
        match streaming.await.unwrap() {
            (Joined::Growing(g), false) => assert!(Arc::ptr_eq(&g, &growing)),
            _ => panic!("the streaming caller reads the body as it arrives"),
        }
    }
}
