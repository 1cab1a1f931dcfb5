//! Turning a cached [`Entry`] (or an error) into an HTTP response: 200, 304 for a matching
//! `If-None-Match`, 206/416 for a single `Range`, all answered from the cache. A viewer's
//! conditional and range headers are read here and never forwarded anywhere.

use std::ops::RangeInclusive;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full, StreamBody};

use crate::cache::Entry;
use crate::cache::store::Store;
use crate::error::ProxyError;
use crate::server::sendfile::{self, Offers};

/// Response body type of both listeners.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

/// Most bytes of a blob a viewer's response holds in memory at once: a body or a Range from
/// disk that is not sent from the page cache with `sendfile` (which holds none) is read a
/// chunk at a time as the connection takes it (cached chunks on the serving thread, others on
/// the blocking pool), so slow viewers of large ranges pin little.
pub const DISK_CHUNK: u64 = 64 * 1024;

/// A body of `bytes`, whole.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A short `text/plain`, never-cached error page.
pub fn error(e: &ProxyError) -> Response<Body> {
    let e = &e.to_viewer();
    let mut response = plain(e.status(), format!("{}\n", e.public_message()));
    let h = response.headers_mut();
    h.insert("x-parasol-error", HeaderValue::from_static(e.code()));
    if matches!(e, ProxyError::MethodNotAllowed) {
        h.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    response
}

/// A permanent redirect to another parasol path (never to an origin).
pub fn redirect(location: &str) -> Response<Body> {
    let mut response = plain(StatusCode::MOVED_PERMANENTLY, "moved\n");
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// Misskey's `fallback=1`: a placeholder image, cached briefly, instead of an error.
pub fn placeholder(png: Bytes) -> Response<Body> {
    let len = png.len();
    let mut response = Response::new(full(png));
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=300"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(crate::cache::CSP));
    response
}

/// Serves `entry` to a request with `method` and `headers`. Returns the response and the
/// number of body bytes it will send.
pub async fn serve(
    entry: &Entry,
    store: &Store,
    method: &Method,
    headers: &HeaderMap,
    conn: Option<&Arc<Offers>>,
) -> Result<(Response<Body>, u64), ProxyError> {
    if not_modified(entry, headers) {
        let mut response = Response::new(empty());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        let h = response.headers_mut();
        for name in [header::ETAG, header::CACHE_CONTROL, header::CONTENT_SECURITY_POLICY] {
            if let Some(v) = entry.headers.get(&name) {
                h.insert(name, v.clone());
            }
        }
        return Ok((response, 0));
    }
    let (status, range) = match wanted_range(entry, headers) {
        Ok(None) => (StatusCode::OK, 0..=entry.len - 1),
        Ok(Some(r)) => (StatusCode::PARTIAL_CONTENT, r),
        Err(()) => return Ok((unsatisfiable(entry), 0)),
    };
    let len = range.end() - range.start() + 1;
    let body = match method == Method::HEAD {
        true => empty(),
        false => body(entry, store, &range, conn).await?,
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.clone_from(&entry.headers);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if status == StatusCode::PARTIAL_CONTENT {
        let value = format!("bytes {}-{}/{}", range.start(), range.end(), entry.len);
        h.insert(header::CONTENT_RANGE, HeaderValue::from_str(&value).expect("digits"));
    }
    let sent = if method == Method::HEAD { 0 } else { len };
    Ok((response, sent))
}

/// The body of `range`: from memory, or from disk a chunk at a time. On a viewer's
/// connection (`conn`), ranges the page cache holds go from the blob's file with `sendfile`
/// ([`crate::server::sendfile`]): a memory body of at least [`sendfile::MIN_LEN`], and every
/// cached chunk of a disk body, which then holds no memory at all.
async fn body(
    entry: &Entry,
    store: &Store,
    range: &RangeInclusive<u64>,
    conn: Option<&Arc<Offers>>,
) -> Result<Body, ProxyError> {
    let (start, end) = (*range.start(), *range.end());
    if let Some(bytes) = &entry.body {
        let bytes = bytes.slice(start as usize..=end as usize);
        let len = bytes.len() as u64;
        if let Some(conn) = conn.filter(|_| len >= sendfile::MIN_LEN) {
            // Only when the page cache holds every page of the range: sending it then never
            // waits for the disk.
            let at = store.file_now(entry).map(|at| at.advanced(start));
            let at = at.filter(|at| crate::cache::disk::resident(&at.file, at.offset, len));
            if let Some(at) = at {
                conn.memory(bytes.clone(), at);
            }
        }
        return Ok(full(bytes));
    }
    let vanished = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ProxyError::internal("blob vanished")
        } else {
            ProxyError::internal(e)
        }
    };
    let file = store.open_blob(entry).await.map_err(vanished)?;
    // Sized when loaded, but a file cut short since would be sent short to every viewer.
    if file.metadata().map_err(ProxyError::internal)?.len() != entry.len {
        return Err(ProxyError::internal("blob of the wrong size"));
    }
    let conn = conn.cloned();
    let chunks = futures_util::stream::try_unfold(start, move |offset| {
        let (file, conn) = (file.clone(), conn.clone());
        async move {
            if offset > end {
                return Ok(None);
            }
            let left = end - offset + 1;
            if let Some(conn) = conn {
                let n = left.min(sendfile::PLACEHOLDER_LEN as u64);
                if crate::cache::disk::resident(&file, offset, n) {
                    let frame = conn.placeholder(file, offset, n as usize);
                    return Ok(Some((hyper::body::Frame::data(frame), offset + n)));
                }
            }
            let chunk =
                crate::cache::disk::read_chunk(&file, offset, left.min(DISK_CHUNK) as usize)
                    .await?;
            let next = offset + chunk.len() as u64;
            Ok(Some((hyper::body::Frame::data(chunk), next)))
        }
    });
    Ok(StreamBody::new(chunks).boxed_unsync())
}

/// Serves a fill still arriving ([`crate::cache::growing`]): 200, or 206 for one `Range` of
/// its declared length, the body streamed as it lands. Its hash is known only at the end, so
/// the response has no ETag (and an `If-Range` gets the whole body). A body whose origin
/// declared no length is sent whole and chunked, whatever Range was asked (a server may
/// ignore Range). Its bytes are counted into `served` as they go: the length of such a body
/// is not known yet.
pub fn serve_growing(
    growing: std::sync::Arc<crate::cache::growing::Growing>,
    method: &Method,
    headers: &HeaderMap,
    served: impl Fn(u64) + Send + 'static,
) -> Response<Body> {
    let (total, content_type) = (growing.len, HeaderValue::from_static(growing.content_type));
    let range = match (headers.get(header::RANGE).and_then(|v| v.to_str().ok()), total) {
        (Some(value), Some(total)) if !headers.contains_key(header::IF_RANGE) => {
            match http_range_header::parse_range_header(value).map(|r| r.validate(total)) {
                Ok(Ok(ranges)) if ranges.len() == 1 => ranges.into_iter().next(),
                Ok(Err(_)) => {
                    let mut response =
                        plain(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable\n");
                    let value = format!("bytes */{total}");
                    response.headers_mut().insert(
                        header::CONTENT_RANGE,
                        HeaderValue::from_str(&value).expect("digits"),
                    );
                    return response;
                }
                _ => None,
            }
        }
        _ => None,
    };
    let (status, start, end) = match (&range, total) {
        (Some(r), _) => (StatusCode::PARTIAL_CONTENT, *r.start(), *r.end()),
        (None, Some(total)) => (StatusCode::OK, 0, total - 1),
        (None, None) => (StatusCode::OK, 0, u64::MAX),
    };
    let body = match method == Method::HEAD {
        true => empty(),
        false => {
            let counted = growing.stream(start, end).inspect_ok(move |frame| {
                served(frame.data_ref().map_or(0, |d| d.len() as u64));
            });
            StreamBody::new(counted).boxed_unsync()
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, content_type);
    // Unknown until the body is whole: no Content-Length, and the body goes chunked.
    if total.is_some() {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start + 1));
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(crate::cache::IMMUTABLE));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(crate::cache::CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if let (StatusCode::PARTIAL_CONTENT, Some(total)) = (status, total) {
        let value = format!("bytes {start}-{end}/{total}");
        h.insert(header::CONTENT_RANGE, HeaderValue::from_str(&value).expect("digits"));
    }
    response
}

/// `If-None-Match` naming this entry's ETag (weak comparison, as RFC 9110 asks for GET), or `*`.
fn not_modified(entry: &Entry, headers: &HeaderMap) -> bool {
    let etag = entry.etag().as_bytes();
    headers.get_all(header::IF_NONE_MATCH).iter().any(|value| {
        value.as_bytes().split(|b| *b == b',').any(|tag| {
            let tag = tag.trim_ascii();
            let tag = tag.strip_prefix(b"W/").unwrap_or(tag);
            tag == b"*" || tag == etag
        })
    })
}

/// The single range to serve: `Ok(None)` for the whole body (no Range, an unparsable one,
/// several ranges, or an `If-Range` that does not match), `Err` when unsatisfiable.
fn wanted_range(entry: &Entry, headers: &HeaderMap) -> Result<Option<RangeInclusive<u64>>, ()> {
    let Some(value) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    if let Some(if_range) = headers.get(header::IF_RANGE) {
        if if_range != entry.etag() {
            return Ok(None);
        }
    }
    let Ok(parsed) = http_range_header::parse_range_header(value) else {
        return Ok(None);
    };
    match parsed.validate(entry.len) {
        Ok(ranges) if ranges.len() == 1 => Ok(ranges.into_iter().next()),
        Ok(_) => Ok(None),
        Err(_) => Err(()),
    }
}

fn unsatisfiable(entry: &Entry) -> Response<Body> {
    let mut response = plain(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable\n");
    let value = format!("bytes */{}", entry.len);
    response
        .headers_mut()
        .insert(header::CONTENT_RANGE, HeaderValue::from_str(&value).expect("digits"));
    response
}

/// A JSON answer that is never cached.
pub fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut response = plain(status, body);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A short `text/plain` page that is never cached and never sniffed into something else.
fn plain(status: StatusCode, text: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(crate::cache::CSP));
    response
}
