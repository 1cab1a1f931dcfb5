//! Name lookups through the built-in asynchronous resolver, against a real DNS server made in
//! the test (UDP on a loopback address): names resolve through `fetch.nameservers`, and a
//! nameserver that never answers costs each lookup `fetch.dns_timeout`, never a thread, while
//! everything else goes on.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType, rdata::A};
use tokio::net::UdpSocket;

use crate::util::*;

/// A DNS server answering A queries from `names`; with `silent`, it answers nothing at all.
struct Dns {
    addr: SocketAddr,
    queries: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Dns {
    async fn start(ip: &str, names: &[(&str, Ipv4Addr)], silent: bool) -> Dns {
        let socket = UdpSocket::bind((ip, 0)).await.unwrap();
        let addr = socket.local_addr().unwrap();
        let names: HashMap<String, Ipv4Addr> =
            names.iter().map(|(n, ip)| (format!("{n}."), *ip)).collect();
        let queries = Arc::new(AtomicUsize::new(0));
        let counted = queries.clone();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                counted.fetch_add(1, Ordering::SeqCst);
                let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
                if silent {
                    continue;
                }
                let mut answer = Message::new();
                answer.set_id(query.id()).set_message_type(MessageType::Response);
                answer.set_op_code(query.op_code()).set_recursion_available(true);
                answer.set_recursion_desired(query.recursion_desired());
                let mut known = false;
                for q in query.queries() {
                    answer.add_query(q.clone());
                    if let Some(ip) = names.get(&q.name().to_ascii().to_ascii_lowercase()) {
                        known = true;
                        if q.query_type() == RecordType::A {
                            answer.add_answer(Record::from_rdata(
                                q.name().clone(),
                                60,
                                RData::A(A(*ip)),
                            ));
                        }
                    }
                }
                if !known {
                    answer.set_response_code(ResponseCode::NXDomain);
                }
                let _ = socket.send_to(&answer.to_vec().unwrap(), from).await;
            }
        });
        Dns { addr, queries, task }
    }
}

/// A parasol that resolves through `dns` (no injected name table).
async fn parasol_with(dir: &std::path::Path, dns: &Dns, allow: &[&str], timeout: &str) -> Parasol {
    let toml = config_toml(dir, allow, "").replace(
        "[fetch]",
        &format!("[fetch]\nnameservers = [\"{}\"]\ndns_timeout = \"{timeout}\"", dns.addr),
    );
    let cfg = parasol::Config::from_sources("test", &toml, std::iter::empty()).unwrap();
    let options =
        parasol::Options { worker_exe: env!("CARGO_BIN_EXE_parasol").into(), ..Default::default() };
    Parasol::start_opts(cfg, options).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_resolve_through_the_configured_nameservers() {
    let origin = Origin::start("127.0.0.61").await;
    let img = png_bytes(4_000, 910);
    origin.route("/a.png", Route::ok(img.clone()));
    let dns =
        Dns::start("127.0.0.60", &[("media.dns.test", Ipv4Addr::new(127, 0, 0, 61))], false).await;
    let dir = tempfile::tempdir().unwrap();
    let p = parasol_with(dir.path(), &dns, &["127.0.0.61/32"], "2s").await;
    let url = p.url(&format!("http://media.dns.test:{}/a.png", origin.addr.port()));
    let r = get(&url).await;
    assert_eq!(r.status(), 200);
    assert_eq!(body(r).await, img);
    assert!(dns.queries.load(Ordering::SeqCst) >= 1, "asked the configured nameserver");
    // A name the server does not know is the one answer for a destination not reached.
    let r = get(&p.url(&format!("http://nowhere.dns.test:{}/a.png", origin.addr.port()))).await;
    assert_eq!(r.status(), 502);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_nameserver_costs_each_lookup_its_deadline_and_nothing_else() {
    let origin = Origin::start("127.0.0.63").await;
    let img = png_bytes(4_000, 911);
    origin.route("/cached.png", Route::ok(img.clone()));
    origin.route("/new.png", Route::ok(png_bytes(4_000, 912)));
    let dns = Dns::start("127.0.0.62", &[], true).await;
    let dir = tempfile::tempdir().unwrap();
    let p = parasol_with(dir.path(), &dns, &["127.0.0.63/32"], "500ms").await;
    assert_eq!(get(&p.url(&origin.url("/cached.png"))).await.status(), 200);
    // Two hundred lookups hang on the silent server at once...
    let started = Instant::now();
    let hanging: Vec<_> = (0..200)
        .map(|n| {
            let url = p.url(&format!("http://silent-{n}.dns.test/x.png"));
            tokio::spawn(async move { get(&url).await.status() })
        })
        .collect();
    assert!(eventually(|| dns.queries.load(Ordering::SeqCst) >= 50).await, "they are asking");
    // ...while a hit and a miss by address are served at once.
    for (path, what) in [("/cached.png", "a hit meanwhile"), ("/new.png", "a miss meanwhile")] {
        let url = p.url(&origin.url(path));
        let r = tokio::time::timeout(Duration::from_secs(2), get(&url)).await.expect(what);
        assert_eq!(r.status(), 200, "{what}");
    }
    for h in hanging {
        assert_eq!(h.await.unwrap(), 502);
    }
    // Each within its 500 ms (more than one deadline only for those waiting for a slot).
    let took = started.elapsed();
    // Generous: a machine busy beside the tests stretches everything.
    assert!(took < Duration::from_secs(30), "all answered after {took:?}");
    p.stop().await;
}
