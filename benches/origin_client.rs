//! CPU per origin fetch of a 64 KiB body over loopback keep-alive, by client: parasol's
//! `Fetcher` (the guard, the audit line, the ledger, backoff, a fill permit), a bare reqwest
//! client built as the Fetcher builds its own, and hyper-util's pooled client, which reqwest
//! wraps. The origin is Debian's nginx in a process of its own, so this process's CPU
//! (getrusage: user + system) is the client's alone. Each client runs on one thread
//! (a current-thread runtime, as one of parasol's workers), `CONCURRENCY` fetches at a time.
//!
//!   cargo bench --bench origin_client      # ROUNDS=5 REQUESTS=20000 CONCURRENCY=8
//!   CLIENT=fetcher ...                     # one client only (fetcher, reqwest, hyper), to profile

// Benches time the wall clock by design.
#![allow(clippy::disallowed_types)]

use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use nix::sys::resource::{UsageWho, getrusage};

const BODY: usize = 64 * 1024;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Debian's nginx serving one 64 KiB file on 127.0.0.2; killed when dropped.
struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its worker too (SIGKILL would leave it running).
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

fn nginx(dir: &Path) -> (Nginx, String) {
    let port = std::net::TcpListener::bind("127.0.0.2:0").unwrap().local_addr().unwrap().port();
    let root = dir.join("www");
    std::fs::create_dir_all(&root).unwrap();
    let body: Vec<u8> = (0..BODY).map(|i| (i as u8).wrapping_mul(31)).collect();
    std::fs::write(root.join("photo.jpg"), body).unwrap();
    let conf = format!(
        "daemon off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;\n\
         events {{}}\nhttp {{ access_log off; keepalive_requests 10000000;\n\
         client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};\n\
         uwsgi_temp_path {d}; scgi_temp_path {d};\n\
         server {{ listen 127.0.0.2:{port}; root {r}; }} }}\n",
        d = dir.display(),
        r = root.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = Command::new("nginx")
        .args([
            "-c",
            &dir.join("nginx.conf").display().to_string(),
            "-p",
            &dir.display().to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("Debian's nginx (apt-get install nginx-light)");
    let up = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        std::net::TcpStream::connect(("127.0.0.2", port)).is_ok()
    });
    assert!(up, "nginx listens");
    (Nginx(child), format!("http://127.0.0.2:{port}/photo.jpg"))
}

/// User + system CPU of this process so far.
fn cpu() -> Duration {
    let usage = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    tv(usage.user_time()) + tv(usage.system_time())
}

/// One fetch, its whole body read; its length.
type Fetch = Arc<dyn Fn() -> futures_util::future::BoxFuture<'static, usize> + Send + Sync>;

/// CPU µs per fetch of `requests` fetches, `concurrency` at a time, on one thread.
fn measure(fetch: &Fetch, requests: usize, concurrency: usize) -> f64 {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let run = |n: usize| {
            let fetch = fetch.clone();
            async move {
                let mut tasks = tokio::task::JoinSet::new();
                for worker in 0..concurrency {
                    let fetch = fetch.clone();
                    tasks.spawn(async move {
                        for _ in (worker..n).step_by(concurrency) {
                            assert_eq!(fetch().await, BODY);
                        }
                    });
                }
                while tasks.join_next().await.is_some() {}
            }
        };
        run(500).await; // connections open, pools warm
        let (cpu0, wall0) = (cpu(), Instant::now());
        run(requests).await;
        let per = (cpu() - cpu0).as_secs_f64() * 1e6 / requests as f64;
        let rate = requests as f64 / wall0.elapsed().as_secs_f64();
        eprintln!("    {per:.1} µs CPU per fetch, {rate:.0} fetches/s");
        per
    })
}

fn fetcher_client(dir: &Path, url: &str) -> Fetch {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (fetcher, limits) = runtime.block_on(async {
        let config = parasol::config::FetchConfig {
            allow_networks: vec!["127.0.0.2/32".parse().unwrap()],
            ..Default::default()
        };
        let rotation = parasol::audit::Rotation {
            path: dir.join("outbound.jsonl"),
            max_bytes: 1 << 30,
            keep: 1,
        };
        let (audit, _writer) =
            parasol::audit::AuditLog::start(rotation, Default::default()).await.unwrap();
        let policy = parasol::policy::Policy::new(&Default::default());
        let lookup = Arc::new(parasol::fetch::guard::StaticLookup::default());
        let own = parasol::fetch::OwnEndpoints { host: None, addrs: Vec::new() };
        let fetcher = parasol::fetch::Fetcher::new(&config, policy, lookup, audit, own).unwrap();
        (Arc::new(fetcher), Arc::new(parasol::fetch::limit::FillLimits::new(64, 64)))
    });
    // The audit writer is a task of that runtime: keep it running beside the measured one.
    std::thread::spawn(move || runtime.block_on(std::future::pending::<()>()));
    let url = url::Url::parse(url).unwrap();
    Arc::new(move || {
        let (fetcher, limits, url) = (fetcher.clone(), limits.clone(), url.clone());
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            let host = url.host_str().unwrap().to_string();
            let mut permit = limits.acquire(&host, None, deadline).await.unwrap();
            let trigger = parasol::audit::Trigger::View;
            let origin = fetcher.get(&url, trigger, &mut permit).await.unwrap();
            let mut response = origin.response;
            let mut len = 0;
            while let Some(chunk) = response.chunk().await.unwrap() {
                len += chunk.len();
            }
            origin.pending.finish(Some(200), len as u64, "ok").await;
            len
        })
    })
}

fn reqwest_client(url: &str) -> Fetch {
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .referer(false)
        .tcp_nodelay(true)
        .build()
        .unwrap();
    let url = url::Url::parse(url).unwrap();
    Arc::new(move || {
        let (client, url) = (client.clone(), url.clone());
        Box::pin(async move {
            let mut response = client.get(url).send().await.unwrap();
            let mut len = 0;
            while let Some(chunk) = response.chunk().await.unwrap() {
                len += chunk.len();
            }
            len
        })
    })
}

fn hyper_client(url: &str) -> Fetch {
    use hyper_util::client::legacy::{Client, connect::HttpConnector};
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, http_body_util::Empty<bytes::Bytes>> =
        Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
    let uri: http::Uri = url.parse().unwrap();
    Arc::new(move || {
        let (client, uri) = (client.clone(), uri.clone());
        Box::pin(async move {
            let response = client.get(uri).await.unwrap();
            let mut body = response.into_body();
            let mut len = 0;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    len += data.len();
                }
            }
            len
        })
    })
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let (rounds, requests, concurrency) =
        (env("ROUNDS", 5), env("REQUESTS", 20_000), env("CONCURRENCY", 8));
    let dir = tempfile::tempdir().unwrap();
    let (_nginx, url) = nginx(dir.path());
    let only = std::env::var("CLIENT").ok();
    let clients: Vec<(&str, Fetch)> = [
        ("fetcher", "parasol Fetcher", fetcher_client as fn(&Path, &str) -> Fetch),
        ("reqwest", "reqwest", |_: &Path, url: &str| reqwest_client(url)),
        ("hyper", "hyper-util", |_: &Path, url: &str| hyper_client(url)),
    ]
    .into_iter()
    .filter(|(id, ..)| only.as_deref().is_none_or(|o| o == *id))
    .map(|(_, name, make)| (name, make(dir.path(), &url)))
    .collect();
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); clients.len()];
    for round in 1..=rounds {
        for (i, (name, fetch)) in clients.iter().enumerate() {
            eprintln!("round {round}, {name}:");
            results[i].push(measure(fetch, requests, concurrency));
        }
    }
    println!(
        "CPU µs per 64 KiB fetch (median of {rounds} rounds of {requests}, {concurrency} at a time):"
    );
    let hyper = clients.iter().position(|(name, _)| *name == "hyper-util");
    let hyper = hyper.map(|i| median(&mut results[i].clone()));
    for ((name, _), runs) in clients.iter().zip(&mut results) {
        let m = median(runs);
        match hyper {
            Some(h) => println!("  {name:<16} {m:7.1}   ({:.2}× hyper-util)", m / h),
            None => println!("  {name:<16} {m:7.1}"),
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
