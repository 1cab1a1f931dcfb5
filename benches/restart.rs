//! Start-up time with a warm disk store of 100,000 entries, and the first hit served from disk.
//! The start reads index records only (no blob is opened), so it should stay well under a
//! second; blobs are checked lazily (small ones on load, large ones by the background scrub).
//!
//! Run: `cargo bench --bench restart`

// Benches time the wall clock by design.
#![allow(clippy::disallowed_types)]

use std::time::{Duration, Instant};

use parasol::cache::Key;
use parasol::cache::index::{Index, Record};

const ENTRIES: usize = 100_000;

async fn build_store(dir: &std::path::Path) -> Vec<String> {
    let store = parasol::cache::disk::BlobStore::open(dir, false).unwrap();
    let index = Index::open(&dir.join("index.redb")).unwrap();
    let mut urls = Vec::with_capacity(ENTRIES);
    let mut batch = Vec::new();
    for i in 0..ENTRIES {
        let mut body = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        body.extend_from_slice(format!("entry {i} ").repeat(40).as_bytes());
        let hash = blake3::hash(&body);
        let path = store.path(&hash);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &body).unwrap();
        let url = format!("https://media.example.test/{i}.png");
        let record = Record {
            hash: hash.to_hex().to_string(),
            len: body.len() as u64,
            content_type: "image/png".into(),
            url: url.clone(),
            stored_at: 1_700_000_000 + i as u64,
            final_host: None,
            origin: None,
            pinned_until: None,
            variant: None,
            at: None,
        };
        batch.push((Key::new(&url, None), record));
        if batch.len() == 10_000 {
            index.put_many(std::mem::take(&mut batch)).await.unwrap();
        }
        urls.push(url);
    }
    index.put_many(batch).await.unwrap();
    urls
}

fn config(dir: &std::path::Path) -> parasol::Config {
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [signing]\nkeys = [\"bench-key-0123456789-0123456789-01\"]\n\
         [cache]\ndir = \"{}\"\ndisk_bytes = \"10GiB\"\n",
        dir.display()
    );
    parasol::Config::from_sources("bench", &toml, std::iter::empty()).unwrap()
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let urls = build_store(dir.path()).await;
    println!("built a store of {ENTRIES} entries in {:.1?}", started.elapsed());
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let signer = parasol::signing::Signer::new(["bench-key-0123456789-0123456789-01"]);
    let (mut ready, mut first_hit) = (Vec::new(), Vec::new());
    for run in 0..3 {
        let t = Instant::now();
        let bound = parasol::Bound::bind(
            config(dir.path()),
            parasol::Options {
                worker_exe: env!("CARGO_BIN_EXE_parasol").into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        ready.push(t.elapsed());
        let base = url::Url::parse(&format!("http://{}/", bound.public_addr())).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(bound.serve(async move {
            let _ = rx.await;
        }));
        let url = parasol::api::native::sign_url(&base, &signer, &urls[run * 33_333 + 7], None);
        let t = Instant::now();
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
        first_hit.push(t.elapsed());
        let _ = tx.send(());
        server.await.unwrap();
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[1]
    };
    println!("| entries | ready (bind + budget load), median of 3 | first disk hit, median of 3 |");
    println!("|---|---|---|");
    println!("| {ENTRIES} | {:.1?} | {:.1?} |", median(ready), median(first_hit));
}
