//! The admin listener: liveness, readiness and Prometheus metrics, plus the bearer-protected
//! write API: prefetch, purge and policy reload.
//!
//! Kept off the viewer-facing port so that probes, metrics and the API are never exposed with
//! the media routes, and so a load balancer can stop sending traffic (`/readyz` turns 503)
//! while in-flight requests drain.

mod bans;
pub mod client;
mod lookup;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

use crate::api::{ProxyRequest, parse_source};
use crate::audit::Trigger;
use crate::proxy::{Proxy, PurgeReport};
use crate::response::{self, Body};
use crate::telemetry::{CacheStatus, TierLabels};

/// Largest admin request body: a prefetch of a thousand long URLs fits.
const MAX_BODY: usize = 4 << 20;
/// Most URLs one prefetch request may name.
const MAX_PREFETCH_URLS: usize = 1000;
/// Prefetches fetched at once: enough to be quick, few enough that an admin call cannot
/// flood origins or starve viewers' fills.
const PREFETCH_CONCURRENCY: usize = 4;

/// State of the admin listener.
pub struct Admin {
    /// The proxy whose state the probes, metrics and admin API report and change.
    pub proxy: Arc<Proxy>,
    /// True from the moment both listeners accept until shutdown begins.
    pub ready: AtomicBool,
    /// Re-reads the configuration (`POST /admin/reload`, like SIGHUP).
    pub reloader: Reloader,
}

/// Re-reads the configuration and applies what can change without a restart: the domain
/// policy and the moderation hash lists. Shared by `POST /admin/reload` and SIGHUP.
#[derive(Clone)]
pub struct Reloader {
    /// Weak, so a signal handler holding a `Reloader` does not keep the proxy (and with it the
    /// audit writer and the index) alive after shutdown.
    pub proxy: std::sync::Weak<Proxy>,
    /// The `--config` file the process started with (`None`: the default lookup).
    pub config_path: Option<PathBuf>,
}

impl Reloader {
    /// Re-reads the config file and applies what may change while running (the domain policy,
    /// the hash lists); what it purged as a result.
    pub async fn reload(&self) -> Result<PurgeReport, String> {
        let proxy = self.proxy.upgrade().ok_or("parasol is shutting down")?;
        let config =
            crate::config::Config::load(self.config_path.as_deref()).map_err(|e| e.to_string())?;
        let lists = &config.moderation.hash_lists;
        proxy.moderation().reload_lists(lists).await.map_err(|e| e.to_string())?;
        proxy.apply_policy(&config.policy).await.map_err(|e| e.to_string())
    }
}

/// Handles one request on the admin listener: probes, metrics, and (with the admin token)
/// the admin API.
pub async fn handle(admin: Arc<Admin>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    match path.as_str() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if admin.ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/metrics" => {
            admin.proxy.metrics().ready.set(i64::from(admin.ready.load(Ordering::Acquire)));
            metrics(&admin.proxy).await
        }
        "/admin/prefetch" | "/admin/purge" | "/admin/reload" | "/admin/ban" | "/admin/bans"
        | "/admin/origins" | "/admin/lookup" => {
            let allowed = match path.as_str() {
                "/admin/bans" | "/admin/origins" | "/admin/lookup" => "GET",
                "/admin/ban" => "POST, DELETE",
                _ => "POST",
            };
            if !allowed.split(", ").any(|m| m == req.method().as_str()) {
                let mut r = json_error(StatusCode::METHOD_NOT_ALLOWED, &format!("use {allowed}"));
                r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allowed));
                return r;
            }
            let delete = req.method() == Method::DELETE;
            if let Some(denied) = refuse(&admin.proxy.config().server.admin_token, req.headers()) {
                return denied;
            }
            let Ok(body) = Limited::new(req.into_body(), MAX_BODY).collect().await else {
                return json_error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
            };
            let body = body.to_bytes();
            match path.as_str() {
                "/admin/origins" => origins(&admin.proxy, query.as_deref()).await,
                "/admin/lookup" => lookup::lookup(&admin.proxy, query.as_deref()).await,
                "/admin/prefetch" => prefetch(&admin.proxy, &body).await,
                "/admin/purge" => purge(&admin.proxy, &body).await,
                "/admin/bans" => bans::list(&admin.proxy),
                "/admin/ban" if delete => bans::lift(&admin.proxy, &body).await,
                "/admin/ban" => bans::ban(&admin.proxy, &body).await,
                _ => match admin.reloader.reload().await {
                    Ok(purged) => json(StatusCode::OK, &serde_json::json!({ "purged": purged })),
                    Err(e) => json_error(StatusCode::BAD_REQUEST, &e),
                },
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

async fn metrics(proxy: &Proxy) -> Response<Body> {
    let m = proxy.metrics();
    let usage = proxy.usage().await;
    let memory = TierLabels { tier: "memory" };
    m.cache_bytes.get_or_create(&memory).set(usage.memory_bytes as i64);
    m.cache_entries.get_or_create(&memory).set(usage.memory_entries as i64);
    let disk = TierLabels { tier: "disk" };
    m.cache_bytes.get_or_create(&disk).set(usage.disk_bytes as i64);
    m.cache_entries.get_or_create(&disk).set(usage.disk_blobs as i64);
    m.inflight_bytes.set(usage.inflight_bytes as i64);
    m.media_origins_refused.set(proxy.media().pool().origins_refused() as i64);
    let config = proxy.config();
    m.cache_capacity.get_or_create(&memory).set(config.cache.memory_bytes.0 as i64);
    m.cache_capacity.get_or_create(&disk).set(config.cache.disk_bytes.0 as i64);
    m.media_workers.set(i64::from(config.media.workers));
    proxy.export_origin_metrics();
    let mut response = text(StatusCode::OK, m.encode());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Most rows `GET /admin/origins` answers when no `limit` is given.
const ORIGINS_LIMIT: usize = 100;

/// `GET /admin/origins?sort=stored|fetched|served|requests&limit=N`: what each origin costs,
/// largest first ([`crate::ledger`]).
async fn origins(proxy: &Proxy, query: Option<&str>) -> Response<Body> {
    let (mut by, mut limit) = (crate::ledger::SortBy::default(), ORIGINS_LIMIT);
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*name {
            "sort" => match value.parse() {
                Ok(sort) => by = sort,
                Err(e) => return json_error(StatusCode::BAD_REQUEST, &e),
            },
            "limit" => match value.parse::<usize>() {
                Ok(n) if n > 0 => limit = n,
                _ => return json_error(StatusCode::BAD_REQUEST, "limit must be a positive number"),
            },
            other => {
                let message = format!("unknown parameter {other:?}: use sort and limit");
                return json_error(StatusCode::BAD_REQUEST, &message);
            }
        }
    }
    match proxy.origins(by, limit).await {
        Ok(rows) => json(StatusCode::OK, &serde_json::json!({ "origins": rows })),
        Err(e) => {
            tracing::error!(error = %e, "cannot read the index for the origins' ledger");
            json_error(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the index")
        }
    }
}

/// Admin writes need `Authorization: Bearer <server.admin_token>`, and are refused outright
/// while no token is configured ([`crate::signing::bearer_matches`]).
/// Returns the refusal to send, or `None` when the request is authorised.
fn refuse(token: &str, headers: &HeaderMap) -> Option<Response<Body>> {
    if token.is_empty() {
        let msg = "admin writes are disabled: set server.admin_token";
        return Some(json_error(StatusCode::FORBIDDEN, msg));
    }
    if !crate::signing::bearer_matches(headers, token) {
        let mut r = json_error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return Some(r);
    }
    None
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrefetchBody {
    urls: Vec<String>,
}

/// One URL's prefetch outcome.
#[derive(Serialize)]
struct Prefetched {
    url: String,
    /// `stored` (fetched now), `cached` (already held), or `error`.
    outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
}

async fn prefetch(proxy: &Arc<Proxy>, body: &[u8]) -> Response<Body> {
    let req: PrefetchBody = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"urls\": [...]}}: {e}"),
            );
        }
    };
    if req.urls.len() > MAX_PREFETCH_URLS {
        let msg = format!("at most {MAX_PREFETCH_URLS} URLs per request");
        return json_error(StatusCode::PAYLOAD_TOO_LARGE, &msg);
    }
    let results: Vec<Prefetched> = futures_util::stream::iter(req.urls)
        .map(|url| async move {
            let outcome = match parse_source(&url) {
                Ok(source) => {
                    let request = ProxyRequest::new(source, None);
                    proxy.get(&request, Trigger::Prefetch).await.map_err(|(e, _)| e)
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok((_, CacheStatus::Miss)) => {
                    Prefetched { url, outcome: "stored", status: None, code: None }
                }
                Ok(_) => Prefetched { url, outcome: "cached", status: None, code: None },
                Err(e) => Prefetched {
                    url,
                    outcome: "error",
                    status: Some(e.status().as_u16()),
                    code: Some(e.code()),
                },
            }
        })
        .buffered(PREFETCH_CONCURRENCY)
        .collect()
        .await;
    json(StatusCode::OK, &serde_json::json!({ "results": results }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeBody {
    url: Option<String>,
    domain: Option<String>,
}

async fn purge(proxy: &Proxy, body: &[u8]) -> Response<Body> {
    let usage = "expected {\"url\": \"...\"} or {\"domain\": \"...\"}";
    let req: PurgeBody = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &format!("{usage}: {e}")),
    };
    let result = match (req.url, req.domain) {
        (Some(url), None) => match parse_source(&url) {
            Ok(source) => proxy.purge_url(&source).await,
            Err(e) => return json_error(StatusCode::BAD_REQUEST, e.public_message()),
        },
        (None, Some(domain)) => match crate::policy::normalize_domain(&domain) {
            Some(domain) => proxy.purge_domain(domain).await,
            None => return json_error(StatusCode::BAD_REQUEST, "not a domain name"),
        },
        _ => return json_error(StatusCode::BAD_REQUEST, usage),
    };
    match result {
        Ok(report) => json(StatusCode::OK, &serde_json::json!({ "purged": report })),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e.public_message()),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    with_type(status, body.into(), "text/plain; charset=utf-8")
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut body = serde_json::to_vec(value).unwrap_or_default();
    body.push(b'\n');
    with_type(status, body.into(), "application/json")
}

fn json_error(status: StatusCode, message: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message }))
}

fn with_type(status: StatusCode, body: Bytes, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(response::full(body));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
