//! The alerts and the dashboard against Debian's Prometheus: `promtool` checks the rules and
//! runs their unit tests, and a real Prometheus scraping a running parasol under a little
//! traffic evaluates every dashboard query (each must return data) and every alert
//! expression (each must evaluate, every metric it names must exist, and Prometheus must
//! load the rules healthy).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

#[test]
#[cfg_attr(not(has_prometheus), ignore = "needs promtool: apt-get install prometheus")]
fn promtool_checks_the_rules_and_runs_a_test_per_alert() {
    let dir = config_dir().join("prometheus");
    let out = Command::new("promtool")
        .args(["check", "rules", "parasol-rules.yml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("SUCCESS: 7 rules found"));
    let out = Command::new("promtool")
        .args(["test", "rules", "parasol-rules.test.yml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // One test per alert.
    let rules = std::fs::read_to_string(dir.join("parasol-rules.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("parasol-rules.test.yml")).unwrap();
    for alert in rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        assert!(tests.contains(&format!("alertname: {alert}")), "no test for {alert}");
    }
}

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn query(base: &str, expr: &str) -> serde_json::Value {
    let url = format!("{base}/api/v1/query");
    let r = client().get(url).query(&[("query", expr)]).send().await.unwrap();
    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
}

/// Every `parasol_…` metric name (and `up`) an expression reads.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let word_start = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if word_start && expr[i..].starts_with("parasol_") {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(expr.len(), |e| i + e);
            let name = expr[i..end].trim_end_matches("_bucket").to_string();
            if !names.contains(&name) {
                names.push(name);
            }
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

#[tokio::test]
#[cfg_attr(not(has_prometheus), ignore = "needs prometheus: apt-get install prometheus")]
async fn a_real_prometheus_gets_data_for_every_panel_and_evaluates_every_alert() {
    let origin = Origin::start("127.0.0.16").await;
    for i in 0..4 {
        let jpeg = crate::variants::gradient_jpeg(64 + i * 8, 48);
        origin.route(&format!("/p{i}.jpg"), Route::ok(jpeg));
    }
    let dir = tempfile::tempdir().unwrap();
    let toml = config_toml(
        dir.path(),
        &["127.0.0.16/32"],
        "[[policy.origin]]\ndomains = [\"watched.test\"]\n",
    );
    let config = parasol::Config::from_sources("test", &toml, std::iter::empty()).unwrap();
    let p = Parasol::start(config).await;
    // Prometheus, scraping parasol's admin listener every second, with the alert rules.
    let port = crate::recipes::free_port();
    let rules = config_dir().join("prometheus/parasol-rules.yml");
    let prom_config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: parasol\n    static_configs:\n      - targets: ['{}']\n",
        rules.display(),
        p.admin
    );
    std::fs::write(dir.path().join("prometheus.yml"), prom_config).unwrap();
    let _prometheus = Prometheus(
        Command::new("prometheus")
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus runs"),
    );
    let base = format!("http://127.0.0.1:{port}");
    // A little traffic over several scrapes: misses, hits, a rendition, a 404.
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(6) {
        for i in 0..4 {
            let url = p.url(&origin.url(&format!("/p{i}.jpg?r={}", round % 3)));
            assert_eq!(get(&url).await.status(), 200);
        }
        let _ = get(&p.url(&origin.url(&format!("/missing-{round}.jpg")))).await;
        round += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let base_url = url::Url::parse(&format!("http://{}/", p.public)).unwrap();
    let signer = parasol::signing::Signer::new([KEY]);
    let source = origin.url("/p0.jpg");
    let avatar = parasol::api::native::sign_url(&base_url, &signer, &source, Some("avatar"));
    assert_eq!(get(&avatar).await.status(), 200);
    // Scraped enough for rates: wait until one has data.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = query(&base, "rate(parasol_served_bytes_total[5m]) > 0").await;
        if answer["data"]["result"].as_array().is_some_and(|r| !r.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "Prometheus never scraped parasol: {answer}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Every panel's every query returns data.
    let dashboard: serde_json::Value =
        serde_json::from_slice(&std::fs::read(config_dir().join("grafana/parasol.json")).unwrap())
            .unwrap();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let answer = query(&base, expr).await;
            assert_eq!(answer["status"], "success", "{}: {expr}: {answer}", panel["title"]);
            let result = answer["data"]["result"].as_array().unwrap();
            assert!(!result.is_empty(), "panel {}: no data for {expr}", panel["title"]);
            queries += 1;
        }
    }
    assert!(queries >= 16);
    // Every alert expression evaluates, every metric it names exists.
    let text = std::fs::read_to_string(&rules).unwrap();
    let rules_yaml: Vec<String> = text
        .split("expr: ")
        .skip(1)
        .map(|chunk| {
            // A one-line expression, or a `|` block up to the next key.
            let chunk = chunk.strip_prefix("|\n").unwrap_or(chunk);
            chunk
                .lines()
                .take_while(|l| {
                    !l.trim_start().starts_with("for:") && !l.trim_start().starts_with("labels:")
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    assert_eq!(rules_yaml.len(), 7);
    for expr in &rules_yaml {
        let answer = query(&base, expr).await;
        assert_eq!(answer["status"], "success", "{expr}: {answer}");
        for name in metric_names(expr) {
            let series = query(&base, &name).await;
            let found = series["data"]["result"].as_array().is_some_and(|r| !r.is_empty());
            assert!(found, "alert expression names {name}, which parasol does not export");
        }
    }
    // Prometheus loaded the rules and evaluates them without error.
    let r = client().get(format!("{base}/api/v1/rules")).send().await.unwrap();
    let loaded: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    let rules = loaded["data"]["groups"][0]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 7);
    for rule in rules {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
    // And none fires on a healthy parasol.
    let firing: Vec<&serde_json::Value> = rules.iter().filter(|r| r["state"] == "firing").collect();
    assert!(firing.is_empty(), "{firing:?}");
    p.stop().await;
}
