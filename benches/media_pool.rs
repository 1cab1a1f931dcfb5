//! What a remote poster's hostile SVGs cost everyone else: the media pool under a flood of
//! distinct bombs from one host, timed from outside against a real parasol process.
//!
//! Each round starts a fresh `parasol serve` (2 media workers, `job_timeout` 3 s) and an
//! origin with two hosts on separate /24s of loopback (127.0.0.2 for the bombs, 127.0.1.3 for
//! everyone else). First, idle: a new EXIF JPEG (a strip) and the `avatar` of another new
//! JPEG (a strip and a render) from the second host, timed alone. Then 8 distinct ~330-byte
//! SVGs that ask for four billion octaves of noise (one byte apart) from the first host at
//! once, and 0.5 s later a new EXIF JPEG and an avatar from the second, as in issue 25's first
//! row. Prints each round's times and the median over rounds.
//!
//! `BOMB=blurs` floods with SVGs that pass the screen and still cost minutes (sixty blurs over
//! two hundred full-size rectangles), which only the CPU budget and the fair queue stop.
//!
//! Run: `cargo build --release && cargo bench --bench media_pool` (`ROUNDS=n`, default 3;
//! `PARASOL_BIN=/path/to/parasol` measures another build, for a before and after).

// Benches time the wall clock by design.
#![allow(clippy::disallowed_types)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use img_parts::ImageEXIF;

const KEY: &str = "bench-signing-key-0123456789abcdef";

/// A photo with a GPS position in its EXIF; each `seed` other bytes.
fn exif_jpeg(seed: u32) -> Vec<u8> {
    let img = RgbImage::from_fn(800, 600, |x, y| {
        Rgb([(x % 256) as u8, (y % 256) as u8, ((x ^ y ^ seed) % 251) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(img).write_to(&mut out, ImageFormat::Jpeg).unwrap();
    let mut jpeg = img_parts::jpeg::Jpeg::from_bytes(out.into_inner().into()).unwrap();
    let mut exif = b"MM\0\x2a\0\0\0\x08\0\x01".to_vec();
    exif.extend_from_slice(&[0x88, 0x25, 0, 4, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
    jpeg.set_exif(Some(exif.into()));
    let mut bytes = Vec::new();
    jpeg.encoder().write_to(&mut bytes).unwrap();
    bytes
}

/// About 330 bytes that ask for four billion octaves of noise; `seed` makes each distinct.
fn bomb(seed: u32) -> Vec<u8> {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"512\" height=\"512\"><filter id=\"f\">\
         <feTurbulence baseFrequency=\"0.05\" seed=\"{seed}\" numOctaves=\"4000000000\"/>\
         </filter><rect width=\"512\" height=\"512\" filter=\"url(#f)\"/></svg>"
    )
    .into_bytes()
}

/// Sixty blurs over two hundred full-size rectangles: nothing for the screen to clamp.
fn blurs(seed: u32) -> Vec<u8> {
    let filter: String = (0..60)
        .map(|n| format!("<feGaussianBlur stdDeviation=\"{}\"/>", 20 + (n + seed) % 7))
        .collect();
    let rect = "<rect width=\"1024\" height=\"1024\" fill=\"#a35\" filter=\"url(#f)\"/>";
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1024\" height=\"1024\">\
         <!-- {seed} --><filter id=\"f\">{filter}</filter>{}</svg>",
        rect.repeat(200)
    )
    .into_bytes()
}

type Files = Arc<Mutex<std::collections::HashMap<String, Vec<u8>>>>;

/// A plain HTTP/1.1 origin on `ip`: each path of `files`, with a length, then the connection
/// closes.
fn origin(ip: &str, files: Files) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let files = files.clone();
            std::thread::spawn(move || answer(stream, &files));
        }
    });
    addr
}

fn answer(mut stream: TcpStream, files: &Files) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 << 10 {
        if stream.read(&mut byte).unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head);
    let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
    let body = files.lock().unwrap().get(&path).cloned();
    let reply = match body {
        Some(body) => {
            let mut r = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            r.extend_from_slice(&body);
            r
        }
        None => {
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_vec()
        }
    };
    let _ = stream.write_all(&reply);
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(bin: &str, dir: &std::path::Path) -> (Server, SocketAddr) {
    let (public, admin) = (free_port(), free_port());
    let child = Command::new(bin)
        .current_dir(dir)
        .env("PARASOL__SERVER__LISTEN", format!("127.0.0.1:{public}"))
        .env("PARASOL__SERVER__ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("PARASOL__CACHE__DIR", dir.join("cache"))
        .env("PARASOL__SIGNING__KEYS", format!("[\"{KEY}\"]"))
        .env("PARASOL__FETCH__ALLOW_NETWORKS", "[\"127.0.0.0/16\"]")
        .env("PARASOL__MEDIA__WORKERS", "2")
        .env("PARASOL__MEDIA__JOB_TIMEOUT", "3s")
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the parasol binary (cargo build --release, or PARASOL_BIN)");
    let server = Server(child);
    let addr: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
            let mut reply = String::new();
            let _ = s.read_to_string(&mut reply);
            if reply.starts_with("HTTP/1.1 200") {
                break;
            }
        }
        assert!(Instant::now() < deadline, "parasol did not get ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    (server, format!("127.0.0.1:{public}").parse().unwrap())
}

fn signed(public: SocketAddr, source: &str, variant: Option<&str>) -> String {
    let base = url::Url::parse(&format!("http://{public}/")).unwrap();
    let signer = parasol::signing::Signer::new([KEY]);
    parasol::api::native::sign_url(&base, &signer, source, variant)
}

/// GET `url`: its status and how long it took.
async fn timed(client: &reqwest::Client, url: String) -> (u16, Duration) {
    let started = Instant::now();
    let status = match client.get(&url).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let _ = r.bytes().await;
            status
        }
        Err(_) => 0,
    };
    (status, started.elapsed())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let bin = std::env::var("PARASOL_BIN").unwrap_or_else(|_| "target/release/parasol".into());
    let rounds: u32 = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(3);
    let files: Files = Default::default();
    let bombs = origin("127.0.0.2", files.clone());
    let others = origin("127.0.1.3", files.clone());
    let client = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
    let blurring = std::env::var("BOMB").is_ok_and(|b| b == "blurs");
    let make_bomb = if blurring { blurs } else { bomb };
    let (mut idle_photo, mut idle_avatar, mut busy_photo, mut busy_avatar) =
        (vec![], vec![], vec![], vec![]);
    let kind = if blurring { "blurs" } else { "noise" };
    println!("{bin}: 2 workers, job_timeout 3s, 8 distinct SVG bombs ({kind}) from one host");
    for round in 0..rounds {
        let dir = tempfile::tempdir().unwrap();
        let (_server, public) = start(&bin, dir.path());
        let add = |path: String, body: Vec<u8>| files.lock().unwrap().insert(path, body);
        let seed = round * 100;
        for (n, name) in ["idle-photo", "idle-avatar", "photo", "avatar"].iter().enumerate() {
            add(format!("/{name}-{round}.jpg"), exif_jpeg(seed + n as u32));
        }
        for n in 0..8 {
            add(format!("/bomb-{round}-{n}.svg"), make_bomb(seed + n));
        }
        let other = |name: &str, variant| {
            signed(public, &format!("http://{others}/{name}-{round}.jpg"), variant)
        };
        let pair = |photo: String, avatar: String| {
            let client = client.clone();
            async move { tokio::join!(timed(&client, photo), timed(&client, avatar)) }
        };
        let idle = pair(other("idle-photo", None), other("idle-avatar", Some("avatar"))).await;
        let started = Instant::now();
        let flood: Vec<_> = (0..8)
            .map(|n| {
                let url = signed(public, &format!("http://{bombs}/bomb-{round}-{n}.svg"), None);
                let client = client.clone();
                tokio::spawn(async move {
                    let (status, _) = timed(&client, url).await;
                    (status, started.elapsed())
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let busy = pair(other("photo", None), other("avatar", Some("avatar"))).await;
        let mut answered = Vec::new();
        for bomb in flood {
            let (status, at) = bomb.await.unwrap();
            answered.push(format!("{status}@{:.1}s", at.as_secs_f64()));
        }
        println!(
            "round {round}: idle photo {} {:.3}s, avatar {} {:.3}s; under the flood photo {} \
             {:.3}s, avatar {} {:.3}s; bombs {}",
            idle.0.0,
            idle.0.1.as_secs_f64(),
            idle.1.0,
            idle.1.1.as_secs_f64(),
            busy.0.0,
            busy.0.1.as_secs_f64(),
            busy.1.0,
            busy.1.1.as_secs_f64(),
            answered.join(" ")
        );
        idle_photo.push(idle.0.1.as_secs_f64());
        idle_avatar.push(idle.1.1.as_secs_f64());
        busy_photo.push(busy.0.1.as_secs_f64());
        busy_avatar.push(busy.1.1.as_secs_f64());
    }
    println!(
        "median of {rounds}: photo {:.3}s idle, {:.3}s under the flood; avatar {:.3}s idle, \
         {:.3}s under the flood",
        median(idle_photo),
        median(busy_photo),
        median(idle_avatar),
        median(busy_avatar)
    );
}
