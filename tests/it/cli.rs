//! The `parasol` binary as an operator runs it: defaults, `sign`, `check-config`, SIGTERM.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::util::*;

fn parasol(cwd: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_parasol"));
    cmd.current_dir(cwd).env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("PARASOL__") {
            cmd.env_remove(k);
        }
    }
    cmd
}

#[test]
fn sign_uses_one_generated_key_kept_in_the_cache_dir() {
    let dir = tempfile::tempdir().unwrap();
    let run = || {
        parasol(dir.path()).args(["sign", "https://remote.test/media/cat.jpg"]).output().unwrap()
    };
    let first = run();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let url = String::from_utf8(first.stdout.clone()).unwrap();
    assert!(url.starts_with("http://127.0.0.1:8080/m/"), "{url}");
    assert!(String::from_utf8_lossy(&first.stderr).contains("generated key"), "a warning says so");
    assert!(dir.path().join("cache/signing.key").exists());
    assert_eq!(run().stdout, first.stdout, "the key is generated once and kept");
    let bad = parasol(dir.path()).args(["sign", "ftp://remote.test/x"]).output().unwrap();
    assert!(!bad.status.success());
}

#[test]
fn check_config_redacts_secrets_and_names_bad_keys() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    std::fs::write(
        &cfg,
        "[signing]\nkeys = [\"super-secret-signing-key-0123456789\"]\n[server]\nadmin_token = \"tok-secret-0123456789-0123456789-ab\"\n",
    )
    .unwrap();
    let out = parasol(dir.path())
        .args(["check-config", "--config", cfg.to_str().unwrap()])
        .env("PARASOL__CACHE__DISK_BYTES", "20GiB")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    assert!(!text.contains("super-secret") && !text.contains("tok-secret"), "{text}");
    assert!(text.contains("<redacted>"));
    assert!(text.contains("disk_bytes = \"20GiB\""), "env override applied: {text}");

    std::fs::write(&cfg, "[cache]\ndisk_byte = \"1GiB\"\n").unwrap();
    let out = parasol(dir.path())
        .args(["check-config", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("disk_byte"), "names the bad key");

    let out = parasol(dir.path())
        .args(["check-config"])
        .env("PARASOL__FETCH__TIMEOUT", "soon")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fetch.timeout"));
}

#[test]
fn the_example_config_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/parasol.toml");
    let dir = tempfile::tempdir().unwrap();
    let out = parasol(dir.path())
        .args(["check-config", "--config", example.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A child parasol that is killed if the test fails before stopping it.
pub(crate) struct Running(pub(crate) Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    pub(crate) fn sigterm(&self) {
        let status =
            Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    pub(crate) async fn wait(mut self) -> std::process::ExitStatus {
        let mut child = std::mem::replace(&mut self.0, Command::new("true").spawn().unwrap());
        tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap()
    }
}

/// Starts the binary with JSON logs and returns it with its two listening addresses.
pub(crate) fn spawn_serving(
    cwd: &Path,
    envs: &[(&str, &str)],
    config: Option<&Path>,
) -> (Running, SocketAddr, SocketAddr) {
    let (child, public, admin, _) = spawn_serving_logged(cwd, envs, config);
    (child, public, admin)
}

/// [`spawn_serving`], also returning the log lines written before it listened.
pub(crate) fn spawn_serving_logged(
    cwd: &Path,
    envs: &[(&str, &str)],
    config: Option<&Path>,
) -> (Running, SocketAddr, SocketAddr, Vec<serde_json::Value>) {
    let (child, public, admin, before, _) = spawn_serving_kept(cwd, envs, config);
    (child, public, admin, before)
}

/// Every log line written after it listened, kept as it comes.
pub(crate) type Kept = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// [`spawn_serving_logged`], also keeping every later log line.
pub(crate) fn spawn_serving_kept(
    cwd: &Path,
    envs: &[(&str, &str)],
    config: Option<&Path>,
) -> (Running, SocketAddr, SocketAddr, Vec<serde_json::Value>, Kept) {
    let mut cmd = parasol(cwd);
    cmd.arg("serve");
    if let Some(file) = config {
        cmd.arg("--config").arg(file);
    }
    let mut child = cmd
        .env("RUST_LOG", "parasol=debug")
        .env("PARASOL_LOG_FORMAT", "json")
        .env("PARASOL__SERVER__LISTEN", "127.0.0.1:0")
        .env("PARASOL__SERVER__ADMIN_LISTEN", "127.0.0.1:0")
        .envs(envs.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let child = Running(child);
    let mut lines = BufReader::new(stderr).lines();
    let mut before = Vec::new();
    let addrs = loop {
        let line = lines.next().expect("parasol logs before exiting").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["fields"]["message"] == "listening" {
            let public = v["fields"]["public"].as_str().unwrap().parse().unwrap();
            let admin = v["fields"]["admin"].as_str().unwrap().parse().unwrap();
            break (public, admin);
        }
        before.push(v);
    };
    // Keep draining stderr so the child never blocks on a full pipe; echo it for failures.
    let kept = Kept::default();
    let keep = kept.clone();
    std::thread::spawn(move || {
        for line in lines {
            let line = line.unwrap_or_default();
            eprintln!("child: {line}");
            keep.lock().unwrap().push(line);
        }
    });
    (child, addrs.0, addrs.1, before, kept)
}

/// A missing outside program (ffmpeg, heif-convert) is named once in the start-up log, with
/// the package that brings it; the proxy starts and serves all the same.
#[tokio::test]
async fn a_missing_media_tool_is_named_once_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let envs = [
        ("PARASOL__MEDIA__FFMPEG", "/nonexistent/ffmpeg"),
        ("PARASOL__MEDIA__HEIF_CONVERT", "/nonexistent/heif-convert"),
    ];
    let (child, _public, admin, logged) = spawn_serving_logged(dir.path(), &envs, None);
    let said = |tool: &str| -> Vec<String> {
        logged
            .iter()
            .filter(|v| v["fields"]["tool"] == tool && v["level"] == "WARN")
            .map(|v| v["fields"]["message"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let ffmpeg = said("ffmpeg");
    assert_eq!(ffmpeg.len(), 1, "{logged:#?}");
    assert!(ffmpeg[0].contains("answer 415") && ffmpeg[0].contains("install ffmpeg"), "{ffmpeg:?}");
    let heif = said("heif-convert");
    assert_eq!(heif.len(), 1, "{logged:#?}");
    assert!(heif[0].contains("install libheif-examples"), "{heif:?}");
    assert_eq!(get(&format!("http://{admin}/readyz")).await.status(), 200);
    child.sigterm();
    assert!(child.wait().await.success());
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let origin = Origin::start("127.0.0.4").await;
    let img = png_bytes(50_000, 30);
    // Slow enough for the checks made while it drains (two of them start a process).
    origin.route("/slow.png", Route::ok(img.clone()).delay(Duration::from_millis(3000)));
    // A proxy in the environment must be ignored: origins are contacted directly.
    let env_proxy = Origin::start("127.0.0.5").await;
    let proxy_url = format!("http://{}", env_proxy.addr);
    let dir = tempfile::tempdir().unwrap();
    let envs = [
        ("HTTP_PROXY", proxy_url.as_str()),
        ("http_proxy", proxy_url.as_str()),
        ("ALL_PROXY", proxy_url.as_str()),
        ("PARASOL__FETCH__ALLOW_NETWORKS", "[\"127.0.0.4/32\"]"),
        ("PARASOL__SIGNING__KEYS", &format!("[\"{KEY}\"]")),
    ];
    let (child, public, admin) = spawn_serving(dir.path(), &envs, None);
    assert_eq!(get(&format!("http://{admin}/healthz")).await.status(), 200);
    assert_eq!(get(&format!("http://{admin}/readyz")).await.status(), 200);
    let metrics = get(&format!("http://{admin}/metrics")).await.text().await.unwrap();
    assert!(metrics.contains("# HELP parasol_served_bytes"), "{metrics}");
    // `parasol health`, a container's health check, asks the same listener.
    let health = |ready: bool| {
        let mut cmd = tokio::process::Command::from(parasol(dir.path()));
        cmd.arg("health").env("PARASOL__SERVER__ADMIN_LISTEN", admin.to_string());
        if ready {
            cmd.arg("--ready");
        }
        cmd.output()
    };
    assert!(health(false).await.unwrap().status.success());
    assert!(health(true).await.unwrap().status.success());

    let url = signed_url(public, &origin.url("/slow.png"));
    let in_flight = tokio::spawn(async move { get(&url).await });
    assert!(eventually(|| origin.hits("/slow.png") == 1).await, "the fill has started");
    child.sigterm();
    // While the slow request drains: no new viewer connections, and probes see 503.
    let refused = eventually(|| std::net::TcpStream::connect(public).is_err()).await;
    assert!(refused, "the public listener closes at once");
    assert!(!in_flight.is_finished(), "still draining");
    assert_eq!(get(&format!("http://{admin}/readyz")).await.status(), 503);
    assert!(health(false).await.unwrap().status.success(), "alive while it drains");
    let not_ready = health(true).await.unwrap();
    assert_eq!(not_ready.status.code(), Some(1), "not ready while it drains");
    assert!(String::from_utf8_lossy(&not_ready.stderr).contains("503"));
    let r = in_flight.await.unwrap();
    assert_eq!(r.status(), 200, "the in-flight request completes");
    assert_eq!(body(r).await, img);
    let status = child.wait().await;
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(env_proxy.connections(), 0, "HTTP_PROXY was ignored");
    assert_eq!(health(false).await.unwrap().status.code(), Some(1), "stopped: not alive");
}

#[tokio::test]
async fn defaults_start_on_a_fresh_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _public, admin) = spawn_serving(dir.path(), &[], None);
    assert_eq!(get(&format!("http://{admin}/healthz")).await.text().await.unwrap(), "ok\n");
    assert!(dir.path().join("cache/signing.key").exists());
    assert!(dir.path().join("cache/index.redb").exists());
    child.sigterm();
    assert!(child.wait().await.success());
}

#[tokio::test]
async fn sighup_applies_a_new_block_list_from_the_config_file() {
    let origin = Origin::start("127.0.0.6").await;
    let img = png_bytes(9_000, 31);
    origin.route("/m.png", Route::ok(img.clone()));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("parasol.toml");
    let cache = dir.path().join("cache");
    let allow = ["127.0.0.6/32"];
    std::fs::write(&file, config_toml(&cache, &allow, "")).unwrap();
    let (child, public, _admin) = spawn_serving(dir.path(), &[], Some(&file));
    let url = signed_url(public, &origin.url("/m.png"));
    assert_eq!(body(get(&url).await).await, img);

    std::fs::write(
        &file,
        config_toml(&cache, &allow, "[policy]\nblocked_domains = [\"127.0.0.6\"]"),
    )
    .unwrap();
    let status = Command::new("kill").args(["-HUP", &child.0.id().to_string()]).status().unwrap();
    assert!(status.success());
    let mut blocked = false;
    for _ in 0..200 {
        if get(&url).await.status() == 403 {
            blocked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(blocked, "SIGHUP applied the new policy without a restart");
    // The new policy applies first, the purge of what it blocks follows.
    let purged = eventually(|| files_under(&cache.join("blobs")) == 0).await;
    assert!(purged, "SIGHUP purged what the new policy blocks");
    assert_eq!(origin.hits("/m.png"), 1);
    child.sigterm();
    assert!(child.wait().await.success());
}

/// Settings that are choices are checked as choices: a typo is an error that names the
/// allowed values, in the config and on the command line.
#[test]
fn a_misspelt_choice_is_an_error_naming_the_allowed_values() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    for (toml, key, allowed) in [
        ("[media]\nsvg = \"rasterise\"\n", "media.svg", "`rasterize` or `refuse`"),
        (
            "[variants.thumb]\nwidth = 64\nformat = \"gif\"\n",
            "variants.thumb.format",
            "`webp`, `png`, `jpeg`",
        ),
    ] {
        std::fs::write(&cfg, toml).unwrap();
        let out = parasol(dir.path())
            .args(["check-config", "--config", cfg.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{toml}");
        assert!(err.contains(key) && err.contains(allowed), "{err}");
    }
    let out = parasol(dir.path())
        .args(["sign", "--scheme", "camoo", "https://remote.test/a.png"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("native, camo, akkoma"), "{err}");
    let out = parasol(dir.path())
        .args(["sign", "--variant", "avatr", "https://remote.test/a.png"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("avatar, avatar_static, badge"), "{err}");
}

/// What a local user could learn from the cache directory (the signing key, every URL
/// fetched, the audit log) is parasol's user's alone: the directory is 0700, even one that
/// existed with wider permissions, and its files 0600.
#[tokio::test]
async fn the_cache_directory_and_its_secrets_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(cache.join("outbound.jsonl"), "").unwrap();
    std::fs::set_permissions(cache.join("outbound.jsonl"), std::fs::Permissions::from_mode(0o644))
        .unwrap();
    let (child, _public, admin) = spawn_serving(dir.path(), &[], None);
    assert_eq!(get(&format!("http://{admin}/healthz")).await.status(), 200);
    assert_eq!(mode(&cache), 0o700, "narrowed");
    for file in ["signing.key", "index.redb", "outbound.jsonl"] {
        assert_eq!(mode(&cache.join(file)), 0o600, "{file}");
    }
    child.sigterm();
    assert!(child.wait().await.success());
    let fresh = tempfile::tempdir().unwrap();
    let out = parasol(fresh.path()).args(["sign", "https://remote.test/a.png"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(mode(&fresh.path().join("cache")), 0o700, "made private by `sign` too");
}
