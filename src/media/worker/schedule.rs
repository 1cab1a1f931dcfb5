//! Who gets a media worker next: a fair queue, so that one remote poster's files cannot take
//! the pool from everyone else.
//!
//! - **A share per origin.** Jobs are counted by their source's origin (its registrable
//!   domain, [`crate::policy::origin_of`]): one origin may run at most `share` of the workers
//!   and hold at most `share` of the workers and queue together. Eight costly files from one
//!   server then take at most half of two workers, and the other server's photo runs on the
//!   other half at once instead of after them.
//! - **Strips never wait behind renders.** A new original is served only once its metadata is
//!   stripped; that job is a cheap parse, never a decode. It may run on one slot of its own
//!   beyond `media.workers`, so a pool full of renders delays no new photo.
//! - **Bounded waiting.** A job waits at most `media.queue_wait` for a slot, then answers 503
//!   `media_busy`; a full queue answers at once. The queue is FIFO among the jobs that may run
//!   (a job whose origin has used its share is passed over, not blocking the rest).
//!
//! The state is one std mutex, held only to count and to hand a slot on, never across an
//! await. A job's place is a guard: dropped (the job ended, or its viewer's request was
//! cancelled while waiting), it gives its slot to the next job that may run.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

/// Which slots a job may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// A metadata strip: a parse without decoding, on which a new original waits. It may use
    /// the reserve slot.
    Strip,
    /// Everything that decodes: renders, details, rasterising, outside programs.
    Decode,
}

/// The fair queue's limits.
#[derive(Debug, Clone, Copy)]
pub struct Shares {
    /// Worker slots for every lane (`media.workers`).
    pub workers: usize,
    /// Jobs that may wait for a slot, all origins together (`media.queue`).
    pub queue: usize,
    /// The part of `workers` (running) and of `workers + queue` (held in all) one origin
    /// may have (`media.origin_share`).
    pub share: f64,
    /// Longest wait for a slot (`media.queue_wait`).
    pub wait: Duration,
}

impl Shares {
    /// Jobs one origin may run at once: its share of the workers, at least one.
    fn origin_running(&self) -> usize {
        ((self.workers as f64 * self.share).ceil() as usize).clamp(1, self.workers.max(1))
    }

    /// Jobs one origin may hold, running and waiting: its share of both, at least one.
    fn origin_held(&self) -> usize {
        let all = self.workers + self.queue;
        ((all as f64 * self.share).ceil() as usize).clamp(1, all.max(1))
    }
}

/// Why a job got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue, or the origin's share of it, is full: refused at once.
    Full,
    /// Waited `media.queue_wait` without a slot.
    Waited,
}

#[derive(Default)]
struct Load {
    running: usize,
    held: usize,
}

struct Waiter {
    id: u64,
    origin: Arc<str>,
    lane: Lane,
    granted: oneshot::Sender<Place>,
}

/// Which slot a running job took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Worker,
    Reserve,
}

#[derive(Default)]
struct State {
    /// Worker slots taken.
    running: usize,
    /// Whether the strip lane's reserve slot is taken.
    reserve: bool,
    /// By origin, jobs running and held; an origin leaves the map at zero.
    origins: HashMap<Arc<str>, Load>,
    waiting: VecDeque<Waiter>,
    next_id: u64,
}

impl State {
    /// The slot a job of `origin` in `lane` would take now, if any.
    fn place(&self, shares: &Shares, origin: &str, lane: Lane) -> Option<Place> {
        // The reserve first, so strips leave the workers to decodes; whatever the origin runs
        // (a strip never waits behind renders, not even its own origin's).
        if lane == Lane::Strip && !self.reserve {
            return Some(Place::Reserve);
        }
        let running = self.origins.get(origin).map_or(0, |l| l.running);
        match running < shares.origin_running() && self.running < shares.workers.max(1) {
            true => Some(Place::Worker),
            false => None,
        }
    }

    fn take(&mut self, origin: &str, place: Place) {
        match place {
            Place::Worker => self.running += 1,
            Place::Reserve => self.reserve = true,
        }
        if let Some(load) = self.origins.get_mut(origin) {
            load.running += 1;
        }
    }

    /// Gives a freed slot to the first waiting job that may run.
    fn hand_on(&mut self, shares: &Shares) {
        let mut at = 0;
        while at < self.waiting.len() {
            let w = &self.waiting[at];
            let Some(place) = self.place(shares, &w.origin, w.lane) else {
                at += 1;
                continue;
            };
            let waiter = self.waiting.remove(at).expect("in range");
            // A waiter that gave up already (its receiver gone) is skipped; its own guard
            // takes it out of the counts.
            if waiter.granted.send(place).is_ok() {
                self.take(&waiter.origin, place);
            }
        }
    }

    fn release(&mut self, shares: &Shares, origin: &str, place: Option<Place>) {
        match place {
            Some(Place::Worker) => self.running -= 1,
            Some(Place::Reserve) => self.reserve = false,
            None => {}
        }
        if let Some(load) = self.origins.get_mut(origin) {
            load.held -= 1;
            if place.is_some() {
                load.running -= 1;
            }
            if load.held == 0 {
                self.origins.remove(origin);
            }
        }
        self.hand_on(shares);
    }
}

/// The fair queue.
pub struct Schedule {
    shares: Shares,
    state: Arc<Mutex<State>>,
}

/// A job's slot: released (and handed on) when dropped.
pub struct Slot {
    state: Arc<Mutex<State>>,
    shares: Shares,
    origin: Arc<str>,
    place: Option<Place>,
    /// While waiting: the job's id in the queue, and where its slot arrives.
    waiting: Option<(u64, oneshot::Receiver<Place>)>,
}

impl Slot {
    /// Out of the queue; the slot it was handed meanwhile, if any.
    fn leave_queue(&mut self, state: &mut State) {
        if let Some((id, mut granted)) = self.waiting.take() {
            match state.waiting.iter().position(|w| w.id == id) {
                Some(at) => drop(state.waiting.remove(at)),
                None => self.place = granted.try_recv().ok(),
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let state = self.state.clone();
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        // Cancelled while waiting: out of the queue, or the slot handed to it just now freed.
        self.leave_queue(&mut state);
        state.release(&self.shares, &self.origin, self.place);
    }
}

impl Schedule {
    /// A queue with `shares`.
    pub fn new(shares: Shares) -> Self {
        Self { shares, state: Arc::default() }
    }

    /// Jobs running and waiting now (for tests and metrics).
    pub fn load(&self) -> (usize, usize) {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (state.running + usize::from(state.reserve), state.waiting.len())
    }

    /// A slot for a job of `origin` in `lane`: at once, after waiting its turn, or refused.
    pub async fn admit(&self, origin: &str, lane: Lane) -> Result<Slot, Refused> {
        let mut slot = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let held = state.origins.get(origin).map_or(0, |l| l.held);
            if held >= self.shares.origin_held() {
                return Err(Refused::Full);
            }
            let place = state.place(&self.shares, origin, lane);
            if place.is_none() && state.waiting.len() >= self.shares.queue {
                return Err(Refused::Full);
            }
            let origin: Arc<str> = match state.origins.get_key_value(origin) {
                Some((known, _)) => known.clone(),
                None => Arc::from(origin),
            };
            state.origins.entry(origin.clone()).or_default().held += 1;
            let mut slot = Slot {
                state: self.state.clone(),
                shares: self.shares,
                origin: origin.clone(),
                place: None,
                waiting: None,
            };
            // Runs at once unless a waiting job may take the slot first.
            if let Some(place) = place.filter(|_| !self.any_could_run(&state)) {
                state.take(&origin, place);
                slot.place = Some(place);
                return Ok(slot);
            }
            let (tx, rx) = oneshot::channel();
            let id = state.next_id;
            state.next_id += 1;
            state.waiting.push_back(Waiter { id, origin, lane, granted: tx });
            slot.waiting = Some((id, rx));
            state.hand_on(&self.shares);
            slot
        };
        let granted = &mut slot.waiting.as_mut().expect("queued").1;
        if let Ok(Ok(place)) = tokio::time::timeout(self.shares.wait, granted).await {
            slot.place = Some(place);
            slot.waiting = None;
            return Ok(slot);
        }
        // Waited too long: out of the queue, unless a slot came between the timeout and the
        // lock (then it is taken after all).
        let state = self.state.clone();
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        slot.leave_queue(&mut state);
        drop(state);
        match slot.place {
            Some(_) => Ok(slot),
            None => Err(Refused::Waited),
        }
    }

    fn any_could_run(&self, state: &State) -> bool {
        state.waiting.iter().any(|w| state.place(&self.shares, &w.origin, w.lane).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(workers: usize, queue: usize) -> Shares {
        Shares { workers, queue, share: 0.5, wait: Duration::from_secs(5) }
    }

    #[tokio::test(start_paused = true)]
    async fn one_origin_takes_its_share_and_another_runs_beside_it() {
        let s = Schedule::new(shares(2, 8));
        let a1 = s.admit("bombs.test", Lane::Decode).await.unwrap();
        // The second job of the same origin waits although a worker is free ...
        let waiting = s.admit("bombs.test", Lane::Decode);
        tokio::pin!(waiting);
        assert!(futures_util::poll!(waiting.as_mut()).is_pending());
        // ... which another origin's job takes at once.
        let b = s.admit("photos.test", Lane::Decode).await.unwrap();
        assert_eq!(s.load(), (2, 1));
        drop(b);
        assert!(futures_util::poll!(waiting.as_mut()).is_pending(), "still over its share");
        drop(a1);
        let a2 = waiting.await.unwrap();
        assert_eq!(s.load(), (1, 0));
        drop(a2);
        assert_eq!(s.load(), (0, 0));
        assert!(s.state.lock().unwrap().origins.is_empty(), "no origin left counted");
    }

    #[tokio::test(start_paused = true)]
    async fn strips_use_the_reserve_when_the_workers_are_taken() {
        let s = Schedule::new(shares(2, 8));
        let _a = s.admit("a.test", Lane::Decode).await.unwrap();
        let _b = s.admit("b.test", Lane::Decode).await.unwrap();
        let strip = s.admit("c.test", Lane::Strip).await.unwrap();
        assert_eq!(s.load(), (3, 0), "two workers and the reserve");
        // A decode does not get the reserve.
        let decode = s.admit("d.test", Lane::Decode);
        tokio::pin!(decode);
        assert!(futures_util::poll!(decode.as_mut()).is_pending());
        drop(strip);
        assert!(futures_util::poll!(decode.as_mut()).is_pending(), "the reserve is not for it");
        // An origin that has its share of the workers running still gets its strip through.
        let s = Schedule::new(shares(2, 8));
        let _render = s.admit("a.test", Lane::Decode).await.unwrap();
        let _strip = s.admit("a.test", Lane::Strip).await.unwrap();
        assert_eq!(s.load(), (2, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn an_origin_over_its_share_of_the_queue_is_refused_at_once_and_waits_are_bounded() {
        let s = Schedule::new(shares(2, 4));
        // Held at most ceil(6 * 0.5) = 3: one running, two waiting.
        let _run = s.admit("a.test", Lane::Decode).await.unwrap();
        let mut waits = Vec::new();
        for _ in 0..2 {
            let f = Box::pin(s.admit("a.test", Lane::Decode));
            waits.push(f);
        }
        for w in &mut waits {
            assert!(futures_util::poll!(w.as_mut()).is_pending());
        }
        assert_eq!(s.admit("a.test", Lane::Decode).await.err(), Some(Refused::Full));
        // Others still get in.
        let _other = s.admit("b.test", Lane::Decode).await.unwrap();
        // The waits end after media.queue_wait, refused, and leave the queue.
        for w in waits {
            assert_eq!(w.await.err(), Some(Refused::Waited));
        }
        assert_eq!(s.load(), (2, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_leaves_the_queue_and_frees_what_it_held() {
        let s = Schedule::new(shares(1, 4));
        let run = s.admit("a.test", Lane::Decode).await.unwrap();
        {
            let w = s.admit("b.test", Lane::Decode);
            tokio::pin!(w);
            assert!(futures_util::poll!(w.as_mut()).is_pending());
            assert_eq!(s.load(), (1, 1));
        }
        assert_eq!(s.load(), (1, 0), "the dropped wait left the queue");
        drop(run);
        assert_eq!(s.load(), (0, 0));
        assert!(s.state.lock().unwrap().origins.is_empty());
    }
}
