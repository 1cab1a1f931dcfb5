//! Traces over OTLP: a real parasol process sends its spans to a receiver made here, which
//! speaks OTLP/HTTP with protobuf bodies as the OpenTelemetry protocol specification says
//! (opentelemetry.io/docs/specs/otlp, "OTLP/HTTP": `POST /v1/traces` carrying an
//! `ExportTraceServiceRequest`, answered 200 with an `ExportTraceServiceResponse`).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use crate::cli::spawn_serving;
use crate::feeds::serve_on;
use crate::util::*;
use crate::variants::gradient_jpeg;

/// Every span received, with the path it was posted to.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

/// An OTLP/HTTP receiver on `ip`: its address and what it received.
async fn collector(ip: &str) -> (std::net::SocketAddr, Received) {
    let received = Received::default();
    let keep = received.clone();
    let addr = serve_on(ip, move |req: Request<Incoming>| {
        let keep = keep.clone();
        async move {
            let path = req.uri().path().to_string();
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let status = match ExportTraceServiceRequest::decode(body) {
                Ok(export) => {
                    let spans = export.resource_spans.into_iter().flat_map(|r| r.scope_spans);
                    let spans = spans.flat_map(|s| s.spans);
                    keep.lock().unwrap().extend(spans.map(|s| (path.clone(), s)));
                    200
                }
                Err(_) => 400,
            };
            let response = Response::builder()
                .status(status)
                .header("content-type", "application/x-protobuf")
                .body(Full::new(Bytes::new()))
                .unwrap();
            Ok::<_, Infallible>(response)
        }
    })
    .await;
    (addr, received)
}

/// The string value of `span`'s attribute `key`.
fn attr(span: &Span, key: &str) -> Option<String> {
    let value = span.attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    match value.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// A miss that renders is one trace: the request, its fills below it, the origin fetch
/// below the original's fill and the media job below the rendition's; no attribute carries
/// the viewer's address, a header of theirs, or the URL.
#[tokio::test]
async fn a_miss_that_renders_is_one_trace_of_request_fills_fetch_and_media_job() {
    let (collector, received) = collector("127.0.0.62").await;
    let origin = Origin::start("127.0.0.61").await;
    origin.route("/photo.jpg", Route::ok(gradient_jpeg(800, 600)));
    let source = origin.url("/photo.jpg");
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("http://{collector}");
    let envs = [
        ("PARASOL__FETCH__ALLOW_NETWORKS", "[\"127.0.0.61/32\"]"),
        ("PARASOL__SIGNING__KEYS", &format!("[\"{KEY}\"]")),
        ("PARASOL__TELEMETRY__OTLP_ENDPOINT", &endpoint),
    ];
    let (child, public, _admin) = spawn_serving(dir.path(), &envs, None);
    let url = format!("{}/avatar", signed_url(public, &source));
    let response = client()
        .get(&url)
        .header("x-forwarded-for", "203.0.113.9")
        .header("cookie", "session=viewer-secret")
        .header("user-agent", "viewer-agent/1.0")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "image/webp");
    // A method of the viewer's own making is not written into a span as they spelt it.
    let brew = http::Method::from_bytes(b"BREW-COFFEE").unwrap();
    let refused = client().request(brew, &url).send().await.unwrap();
    assert_eq!(refused.status(), 405);
    // SIGTERM sends the spans still queued before the process exits.
    child.sigterm();
    assert!(child.wait().await.success());

    let received = received.lock().unwrap().clone();
    assert!(received.iter().all(|(path, _)| path == "/v1/traces"), "posted to /v1/traces");
    let all: Vec<&Span> = received.iter().map(|(_, s)| s).collect();
    let method = |s: &Span| attr(s, "http.request.method").unwrap_or_default();
    let mut methods: Vec<String> =
        all.iter().filter(|s| s.name == "request").map(|s| method(s)).collect();
    methods.sort();
    assert_eq!(methods, ["GET", "_OTHER"], "{all:#?}");
    let request = *all.iter().find(|s| s.name == "request" && method(s) == "GET").unwrap();
    let spans: Vec<&Span> =
        all.iter().copied().filter(|s| s.trace_id == request.trace_id).collect();
    let named = |name: &str| -> Vec<&Span> {
        spans.iter().copied().filter(|s| s.name == name).collect::<Vec<_>>()
    };
    assert!(request.parent_span_id.is_empty(), "the request is the trace's root");
    assert_eq!(attr(request, "http.route").as_deref(), Some("native"));
    assert_eq!(attr(request, "http.response.status_code").as_deref(), Some("200"));
    assert_eq!(attr(request, "parasol.cache").as_deref(), Some("miss"));
    let others = all.iter().filter(|s| s.trace_id != request.trace_id);
    assert!(others.clone().all(|s| s.name == "request"), "the refusal is a trace of its own");

    let fills = named("fill");
    assert_eq!(fills.len(), 2, "the original's fill and the rendition's: {fills:#?}");
    for fill in &fills {
        assert_eq!(fill.parent_span_id, request.span_id, "a fill is the request's child");
        assert_eq!(attr(fill, "parasol.outcome").as_deref(), Some("ok"));
    }
    let below = |span: &Span| fills.iter().position(|f| f.span_id == span.parent_span_id);
    let fetches = named("origin fetch");
    assert_eq!(fetches.len(), 1, "{fetches:#?}");
    assert_eq!(attr(fetches[0], "server.address").as_deref(), Some("127.0.0.61"));
    assert_eq!(attr(fetches[0], "parasol.outcome").as_deref(), Some("ok"));
    let fetched_in = below(fetches[0]).expect("the fetch is a fill's child");
    let jobs = named("media job");
    let renders: Vec<&&Span> =
        jobs.iter().filter(|j| attr(j, "parasol.task").as_deref() == Some("render")).collect();
    assert_eq!(renders.len(), 1, "{jobs:#?}");
    let rendered_in = below(renders[0]).expect("the media job is a fill's child");
    assert_ne!(fetched_in, rendered_in, "fetched in the original's fill, rendered in the other");

    // Nothing of the viewer's, and no URL, in any attribute of any span.
    let path = url::Url::parse(&url).unwrap().path().to_string();
    for span in &all {
        for kv in &span.attributes {
            let text = format!("{:?}", kv.value);
            let viewers = ["203.0.113.9", "viewer-secret", "viewer-agent", "BREW", "photo.jpg"];
            for secret in viewers.iter().chain([&path.as_str()]) {
                assert!(!text.contains(secret), "{} = {text} names {secret}", kv.key);
            }
        }
    }
}

/// The shared tier's traffic of a fill is traced below it: the lookup that missed, then the
/// publish that followed the origin's answer.
#[tokio::test]
#[cfg_attr(not(has_s3s), ignore = "needs s3s-fs: cargo install s3s-fs@0.14.1 --features binary")]
async fn the_shared_tiers_lookup_and_publish_are_spans_of_the_fill() {
    use crate::shared::{ACCESS, BUCKET, S3, SECRET};
    let s3 = S3::start_on("127.0.0.1").await;
    let (collector, received) = collector("127.0.0.64").await;
    let origin = Origin::start("127.0.0.63").await;
    origin.route("/a.png", Route::ok(png_bytes(20_000, 64)));
    let dir = tempfile::tempdir().unwrap();
    let (endpoint, bucket) =
        (format!("http://{collector}"), format!("http://127.0.0.1:{}", s3.port));
    let envs = [
        ("PARASOL__FETCH__ALLOW_NETWORKS", "[\"127.0.0.63/32\"]"),
        ("PARASOL__SIGNING__KEYS", &format!("[\"{KEY}\"]")),
        ("PARASOL__TELEMETRY__OTLP_ENDPOINT", &endpoint),
        ("PARASOL__SHARED__ENDPOINT", &bucket),
        ("PARASOL__SHARED__BUCKET", BUCKET),
        ("PARASOL__SHARED__ACCESS_KEY_ID", ACCESS),
        ("PARASOL__SHARED__SECRET_ACCESS_KEY", SECRET),
    ];
    let (child, public, admin) = spawn_serving(dir.path(), &envs, None);
    let response = get(&signed_url(public, &origin.url("/a.png"))).await;
    assert_eq!(response.status(), 200);
    let metrics = format!("http://{admin}/metrics");
    let published = "parasol_shared_tier_total{op=\"publish\",outcome=\"ok\"} 1";
    let mut done = false;
    for _ in 0..200 {
        if get(&metrics).await.text().await.unwrap().contains(published) {
            done = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(done, "the fill was published to the bucket");
    child.sigterm();
    assert!(child.wait().await.success());

    let received = received.lock().unwrap().clone();
    let spans: Vec<&Span> = received.iter().map(|(_, s)| s).collect();
    let fill = spans.iter().find(|s| s.name == "fill").expect("a fill span");
    let mut shared: Vec<(String, String)> = spans
        .iter()
        .filter(|s| s.name == "shared tier")
        .inspect(|s| assert_eq!(s.parent_span_id, fill.span_id, "below the fill: {s:#?}"))
        .map(|s| (attr(s, "parasol.op").unwrap(), attr(s, "parasol.outcome").unwrap()))
        .collect();
    shared.sort();
    let expected = [("lookup", "miss"), ("publish", "ok")].map(|(a, b)| (a.into(), b.into()));
    assert_eq!(shared, expected, "{spans:#?}");
}
