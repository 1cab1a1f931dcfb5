//! The admin API from the command line (`parasol usage`, `parasol lookup`): a request to a
//! running server's admin listener, found and authorised from its configuration.

use crate::config::Config;

/// The admin listener's base URL as `config` names it (an unspecified address is asked on
/// loopback).
pub fn base_url(config: &Config) -> String {
    let mut addr = config.server.admin_listen;
    if addr.ip().is_unspecified() {
        let loopback: std::net::IpAddr = match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        };
        addr.set_ip(loopback);
    }
    format!("http://{addr}")
}

/// GETs `path_and_query` from the admin API of the server `config` describes, with its admin
/// token; the JSON it answers, or what went wrong in words for an operator.
pub async fn get_json(config: &Config, path_and_query: &str) -> Result<serde_json::Value, String> {
    if config.server.admin_token.is_empty() {
        return Err("server.admin_token is not set: the admin API is closed".into());
    }
    let url = format!("{}{path_and_query}", base_url(config));
    let client = client(30)?;
    let response =
        client.get(&url).bearer_auth(&config.server.admin_token).send().await.map_err(|e| {
            format!("cannot reach parasol's admin listener at {}: {e}", base_url(config))
        })?;
    let status = response.status();
    let bytes = response.bytes().await.map_err(|e| format!("the answer was cut short: {e}"))?;
    let body: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| format!("the admin listener answered {status} without JSON: {e}"))?;
    if !status.is_success() {
        let why = body.get("error").and_then(|e| e.as_str()).unwrap_or("no reason given");
        return Err(format!("the admin listener answered {status}: {why}"));
    }
    Ok(body)
}

/// `parasol health`: Ok when the server `config` describes answers its liveness check
/// (`/healthz`), or with `ready` its readiness check (`/readyz`); else what went wrong.
pub async fn health(config: &Config, ready: bool) -> Result<(), String> {
    let path = if ready { "/readyz" } else { "/healthz" };
    let url = format!("{}{path}", base_url(config));
    let response = client(5)?.get(&url).send().await.map_err(|e| format!("{url}: {e}"))?;
    match response.status() {
        reqwest::StatusCode::OK => Ok(()),
        status => Err(format!("{url} answered {status}")),
    }
}

/// A client for the admin listener (never through a proxy) giving up after `seconds`.
fn client(seconds: u64) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(seconds))
        .build()
        .map_err(|e| e.to_string())
}

/// The origins' ledger as a table, one origin per line.
pub fn origins_table(rows: &[crate::ledger::Row]) -> String {
    use std::fmt::Write;
    let size = |n: u64| bytesize::ByteSize(n).display().iec_short().to_string();
    let mut out = format!(
        "{:<32} {:>10} {:>8} {:>10} {:>8} {:>10} {:>9} {:>8} {:>7}  {}\n",
        "domain",
        "stored",
        "objects",
        "fetched",
        "fetches",
        "served",
        "requests",
        "hits",
        "errors",
        "last fetch"
    );
    for r in rows {
        let last = r.last_fetch.map_or_else(
            || "-".to_string(),
            |t| {
                let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t);
                humantime::format_rfc3339_seconds(at).to_string()
            },
        );
        let _ = writeln!(
            out,
            "{:<32} {:>10} {:>8} {:>10} {:>8} {:>10} {:>9} {:>8} {:>7}  {last}",
            r.domain,
            size(r.stored_bytes),
            r.stored_objects,
            size(r.fetched_bytes),
            r.fetches,
            size(r.served_bytes),
            r.requests,
            r.hits,
            r.errors,
        );
    }
    out
}

/// A lookup's answer (`GET /admin/lookup`) as text: each blob, then each URL and rendition
/// that yields it with the URLs viewers reach it by, in every scheme `config` enables
/// (signed with `signer`).
pub fn lookup_text(
    config: &Config,
    signer: &crate::signing::Signer,
    answer: &serde_json::Value,
) -> String {
    use std::fmt::Write;
    let size = |n: u64| bytesize::ByteSize(n).display().iec_short().to_string();
    let at = |t: u64| {
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t))
            .to_string()
    };
    let blobs = answer["blobs"].as_array().cloned().unwrap_or_default();
    let mut out = String::new();
    if blobs.is_empty() {
        let _ = writeln!(out, "nothing stored for {}", answer["query"].as_str().unwrap_or(""));
    }
    for b in &blobs {
        let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
        let _ = writeln!(
            out,
            "blob {}  {}  {}",
            text(&b["blake3"]),
            size(b["len"].as_u64().unwrap_or(0)),
            text(&b["content_type"])
        );
        let domains: Vec<String> =
            b["domains"].as_array().into_iter().flatten().map(text).collect();
        let pinned =
            b["pinned_until"].as_u64().map_or("no".to_string(), |t| format!("until {}", at(t)));
        let banned = b["banned"].as_str().map_or("no".to_string(), |r| format!("yes ({r})"));
        let _ =
            writeln!(out, "  origin: {}  pinned: {pinned}  banned: {banned}", domains.join(", "));
        if let Some(origin) = b["origin"].as_object() {
            let digest =
                |k: &str| origin.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_string();
            let _ = writeln!(
                out,
                "  origin's bytes: blake3 {}  sha256 {}",
                digest("blake3"),
                digest("sha256")
            );
        }
        for e in b["entries"].as_array().into_iter().flatten() {
            let url = text(&e["url"]);
            let variant = e["variant"].as_str();
            let age = std::time::Duration::from_secs(e["age_seconds"].as_u64().unwrap_or(0));
            let _ = writeln!(
                out,
                "  {url}  [{}]  stored {} ago",
                variant.unwrap_or("original"),
                humantime::format_duration(age)
            );
            for (scheme, viewed) in viewer_urls(config, signer, &url, variant) {
                let _ = writeln!(out, "    {scheme:<8} {viewed}");
            }
        }
    }
    out
}

/// The URLs viewers reach `url` (as `variant`) by, in every scheme `config` enables.
fn viewer_urls(
    config: &Config,
    signer: &crate::signing::Signer,
    url: &str,
    variant: Option<&str>,
) -> Vec<(&'static str, String)> {
    let (base, compat) = (&config.server.public_base_url, &config.compat);
    let mut urls = vec![("native", crate::api::native::sign_url(base, signer, url, variant))];
    let Ok(source) = url::Url::parse(url) else { return urls };
    if compat.misskey && variant.is_none() {
        let query: String =
            form_urlencoded::Serializer::new(String::new()).append_pair("url", url).finish();
        urls.push(("misskey", format!("{}proxy/image.webp?{query}", base.as_str())));
    }
    if !compat.camo_key.is_empty() && variant.is_none() {
        let key = compat.camo_key.as_bytes();
        urls.push(("camo", crate::api::camo::sign_url(base.as_str(), key, source.as_str())));
    }
    if !compat.akkoma_secret.is_empty() {
        let key = compat.akkoma_secret.as_bytes();
        let preview = variant.is_some();
        urls.push(("akkoma", crate::api::akkoma::sign_url(base.as_str(), key, &source, preview)));
    }
    urls
}
