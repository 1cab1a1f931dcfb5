//! Hit ratio of the disk tier's eviction policy (S3-FIFO) against LRU on a Zipf(0.9) trace,
//! with the budget at 10% and 20% of the working set. Counts, not timings: the result is the
//! same on a busy machine.
//!
//! Run: `cargo bench --bench eviction`

use std::num::NonZeroUsize;

use parasol::cache::evict::S3Fifo;
use rand::SeedableRng;
use rand_distr::{Distribution, Zipf};

const OBJECTS: u64 = 20_000;
const OBJECT_BYTES: u64 = 64 * 1024;
const REQUESTS: usize = 2_000_000;

fn trace(seed: u64) -> Vec<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let zipf = Zipf::new(OBJECTS as f64, 0.9).expect("valid Zipf parameters");
    // Ranks are scattered over the key space so that key order says nothing about popularity.
    (0..REQUESTS)
        .map(|_| (zipf.sample(&mut rng) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .collect()
}

fn s3fifo(trace: &[u64], budget: u64) -> f64 {
    let mut cache = S3Fifo::new(budget);
    let mut hits = 0usize;
    for key in trace {
        match cache.touch(key) {
            Some(touch) => {
                touch.hit();
                hits += 1;
            }
            None => {
                cache.insert(*key, OBJECT_BYTES);
            }
        }
        assert!(cache.used() <= budget);
    }
    hits as f64 / trace.len() as f64
}

fn lru(trace: &[u64], budget: u64) -> f64 {
    let slots = NonZeroUsize::new((budget / OBJECT_BYTES) as usize).expect("budget holds one");
    let mut cache = lru::LruCache::new(slots);
    let mut hits = 0usize;
    for key in trace {
        if cache.get(key).is_some() {
            hits += 1;
        } else {
            cache.put(*key, ());
        }
    }
    hits as f64 / trace.len() as f64
}

fn main() {
    let working_set = OBJECTS * OBJECT_BYTES;
    println!("Zipf(0.9), {OBJECTS} objects x 64 KiB, {REQUESTS} requests, median of 3 seeds\n");
    println!("| budget | LRU hit ratio | S3-FIFO hit ratio | difference |");
    println!("|---|---|---|---|");
    for percent in [10, 20] {
        let budget = working_set * percent / 100;
        let mut runs: Vec<(f64, f64)> = (1..=3)
            .map(|seed| {
                let t = trace(seed);
                (lru(&t, budget), s3fifo(&t, budget))
            })
            .collect();
        runs.sort_by(|a, b| (a.1 - a.0).total_cmp(&(b.1 - b.0)));
        let (l, s) = runs[1];
        println!(
            "| {percent}% of working set | {:.1}% | {:.1}% | {:+.1} points |",
            l * 100.0,
            s * 100.0,
            (s - l) * 100.0
        );
    }
}
