//! `GET /admin/lookup?q=<url | blake3 | sha256>`: every stored entry that yields the blobs the
//! query names (a source URL: the blobs stored for it, its renditions' too; a blake3 of the
//! bytes served or of the origin's; a SHA-256 of the origin's bytes), with each blob's
//! size, type, origin domains, age, pin and ban state. `parasol lookup` prints it
//! (Mastodon's `tootctl media lookup` is the model).

use std::collections::BTreeMap;

use http::{Response, StatusCode};
use serde::Serialize;

use super::{json, json_error};
use crate::cache::index::Record;
use crate::proxy::Proxy;
use crate::response::Body;

/// One stored entry of a blob.
#[derive(Debug, Serialize)]
struct Found {
    url: String,
    /// The rendition, when the entry is one.
    variant: Option<String>,
    /// Where a redirect took the fill, when elsewhere.
    final_host: Option<String>,
    stored_at: u64,
    age_seconds: u64,
}

/// One blob and every entry naming it.
#[derive(Debug, Serialize)]
struct Blob {
    blake3: String,
    len: u64,
    content_type: String,
    /// The origin domains of its entries' sources.
    domains: Vec<String>,
    /// Digests of the origin's bytes, when they are not these bytes.
    origin: Option<crate::cache::index::OriginDigests>,
    /// Not evicted before this (Unix seconds), when its origin's rule pins it.
    pinned_until: Option<u64>,
    /// The rule that refuses it now (`hash`, `url`, `domain`, `sha256`, `hash_list`), if any.
    banned: Option<&'static str>,
    entries: Vec<Found>,
}

type Matcher<'a> = Box<dyn Fn(&Record) -> bool + Send + Sync + 'a>;

/// What the query `q` names: records matching it.
fn matches<'a>(proxy: &'a Proxy, q: &str) -> Result<Matcher<'a>, &'static str> {
    if q.starts_with("http://") || q.starts_with("https://") {
        let source = crate::api::parse_source(q).map_err(|e| e.public_message())?;
        let wanted = proxy.cache_url(&source);
        let exact = source.to_string();
        return Ok(Box::new(move |r: &Record| {
            r.url == exact || url::Url::parse(&r.url).is_ok_and(|u| proxy.cache_url(&u) == wanted)
        }));
    }
    let hex = q.to_ascii_lowercase();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("q must be a source URL, a blake3 or a SHA-256 (64 hex digits)");
    }
    Ok(Box::new(move |r: &Record| {
        r.hash == hex
            || r.origin
                .as_ref()
                .is_some_and(|o| o.blake3 == hex || o.sha256.as_deref() == Some(hex.as_str()))
    }))
}

/// `GET /admin/lookup?q=…`.
pub async fn lookup(proxy: &Proxy, query: Option<&str>) -> Response<Body> {
    let q = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "q")
        .map(|(_, v)| v.into_owned());
    let Some(q) = q.filter(|q| !q.is_empty()) else {
        return json_error(StatusCode::BAD_REQUEST, "give q: a source URL, a blake3 or a SHA-256");
    };
    let wanted = match matches(proxy, q.trim()) {
        Ok(wanted) => wanted,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, e),
    };
    let records = match proxy.records().await {
        Ok(records) => records,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the index for a lookup");
            return json_error(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the index");
        }
    };
    let hashes: std::collections::BTreeSet<String> =
        records.iter().filter(|(_, r)| wanted(r)).map(|(_, r)| r.hash.clone()).collect();
    let mut blobs: BTreeMap<String, Vec<Record>> = BTreeMap::new();
    for (_, record) in records {
        if hashes.contains(&record.hash) {
            blobs.entry(record.hash.clone()).or_default().push(record);
        }
    }
    let now = crate::cache::evict::now_secs();
    let found: Vec<Blob> = blobs.into_values().map(|records| blob(proxy, records, now)).collect();
    json(StatusCode::OK, &serde_json::json!({ "query": q, "blobs": found }))
}

/// The blob all of `records` name, as the lookup answers it.
fn blob(proxy: &Proxy, mut records: Vec<Record>, now: u64) -> Blob {
    records.sort_by(|a, b| (&a.variant, &a.url).cmp(&(&b.variant, &b.url)));
    let first = &records[0];
    let moderation = proxy.moderation();
    let hash = blake3::Hash::from_hex(&first.hash).ok();
    let mut banned = hash.and_then(|h| moderation.check_hash(&h).err());
    if let Some(origin) = &first.origin {
        let by_origin = blake3::Hash::from_hex(&origin.blake3).ok();
        banned = banned
            .or_else(|| by_origin.and_then(|h| moderation.check_hash(&h).err()))
            .or_else(|| moderation.check_origin_digests(origin).err());
    }
    let mut domains = std::collections::BTreeSet::new();
    for r in &records {
        let (source, landed) = r.hosts();
        if let Some(host) = &source {
            domains.insert(crate::policy::origin_of(host));
        }
        if let Ok(url) = url::Url::parse(&r.url) {
            let checked = moderation.check_request(&url, &proxy.cache_url(&url));
            banned = banned.or_else(|| checked.err());
        }
        if let Some(host) = landed.or(source.as_deref()) {
            banned = banned.or_else(|| moderation.check_host(host).err());
        }
    }
    let rule = |e: crate::error::ProxyError| match e {
        crate::error::ProxyError::Banned(rule) => Some(rule),
        _ => None,
    };
    Blob {
        blake3: first.hash.clone(),
        len: first.len,
        content_type: first.content_type.clone(),
        domains: domains.into_iter().collect(),
        origin: first.origin.clone(),
        pinned_until: records.iter().filter_map(|r| r.pinned_until).max(),
        banned: banned.and_then(rule),
        entries: records
            .iter()
            .map(|r| Found {
                url: r.url.clone(),
                variant: r.variant.clone(),
                final_host: r.final_host.clone(),
                stored_at: r.stored_at,
                age_seconds: now.saturating_sub(r.stored_at),
            })
            .collect(),
    }
}
