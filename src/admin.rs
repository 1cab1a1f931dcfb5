//! The admin listener: liveness, readiness and Prometheus metrics.
//!
//! Kept off the viewer-facing port so that probes and metrics are never exposed with the media
//! routes, and so a load balancer can stop sending traffic (`/readyz` turns 503) while
//! in-flight requests drain.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;

use crate::proxy::Proxy;
use crate::response::{self, Body};
use crate::telemetry::TierLabels;

pub struct Admin {
    pub proxy: Arc<Proxy>,
    /// True from the moment both listeners accept until shutdown begins.
    pub ready: AtomicBool,
}

pub async fn handle(admin: Arc<Admin>, req: Request<Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" if admin.ready.load(Ordering::Acquire) => text(StatusCode::OK, "ready\n".into()),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
        "/metrics" => {
            let proxy = &admin.proxy;
            let (bytes, entries) = proxy.memory.usage().await;
            let memory = TierLabels { tier: "memory" };
            proxy
                .metrics
                .cache_bytes
                .get_or_create(&memory)
                .set(bytes as i64);
            proxy
                .metrics
                .cache_entries
                .get_or_create(&memory)
                .set(entries as i64);
            let mut response = text(StatusCode::OK, proxy.metrics.encode());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(response::full(body));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
