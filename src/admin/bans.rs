//! `POST /admin/ban`, `GET /admin/bans`, `DELETE /admin/ban`: bans by URL, content (blake3 or
//! SHA-256) or domain. The body names one of them, and may give a reason:
//!
//! ```json
//! {"hash": "<blake3 hex>", "reason": "reported by a moderator"}
//! {"url": "https://remote.example/a.jpg"}   {"sha256": "<hex>"}   {"domain": "bad.example"}
//! ```
//!
//! A ban purges what it covers and refuses it from then on (451 `banned`); `DELETE` with the
//! same body lifts it.

use std::sync::Arc;

use http::{Response, StatusCode};
use serde::Deserialize;

use super::{json, json_error};
use crate::moderation::{Ban, BanKind};
use crate::proxy::Proxy;
use crate::response::Body;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BanBody {
    url: Option<String>,
    hash: Option<String>,
    sha256: Option<String>,
    domain: Option<String>,
    reason: Option<String>,
}

const USAGE: &str =
    "expected one of {\"url\"|\"hash\"|\"sha256\"|\"domain\": \"...\"}, and an optional \"reason\"";

fn parse(body: &[u8]) -> Result<Ban, String> {
    let b: BanBody = serde_json::from_slice(body).map_err(|e| format!("{USAGE}: {e}"))?;
    let named = [
        (BanKind::Url, b.url),
        (BanKind::Hash, b.hash),
        (BanKind::Sha256, b.sha256),
        (BanKind::Domain, b.domain),
    ];
    let mut named = named.into_iter().filter_map(|(k, v)| v.map(|v| (k, v)));
    match (named.next(), named.next()) {
        (Some((kind, value)), None) => Ban::new(kind, &value, b.reason),
        _ => Err(USAGE.into()),
    }
}

pub async fn ban(proxy: &Arc<Proxy>, body: &[u8]) -> Response<Body> {
    let ban = match parse(body) {
        Ok(ban) => ban,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &e),
    };
    match proxy.moderation().ban(ban).await {
        Ok(report) => json(StatusCode::OK, &serde_json::json!(report)),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e.public_message()),
    }
}

pub async fn lift(proxy: &Arc<Proxy>, body: &[u8]) -> Response<Body> {
    let ban = match parse(body) {
        Ok(ban) => ban,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &e),
    };
    match proxy.moderation().lift(&ban.id()).await {
        Ok(Some(lifted)) => json(StatusCode::OK, &serde_json::json!({ "lifted": lifted })),
        Ok(None) => json_error(StatusCode::NOT_FOUND, "no such ban"),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e.public_message()),
    }
}

pub fn list(proxy: &Proxy) -> Response<Body> {
    json(StatusCode::OK, &serde_json::json!({ "bans": proxy.moderation().bans() }))
}
