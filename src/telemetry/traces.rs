//! Traces: a span for each viewer request, its fill, the origin fetch, a media job and the
//! shared tier's traffic, exported over OTLP/HTTP when `[telemetry] otlp_endpoint` is set.
//!
//! Every span is made under the target [`TARGET`], which the log never shows. With no
//! exporter no layer wants that target, so each span site costs one cached check and makes
//! nothing. Attributes name routes, statuses, outcomes and origin hosts: never a viewer's
//! address or header, nor a URL (a signed URL is a capability). parasol starts its own traces
//! and sends no trace context anywhere, least of all to an origin.

use bytes::Bytes;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};

use crate::config::TelemetryConfig;

/// The target of every span meant for traces.
pub const TARGET: &str = "parasol::trace";

/// The running export: spans still queued are sent by [`Exporter::shutdown`].
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Sends what is queued (a second at most: a container is killed 10 s after SIGTERM, and
    /// the drain had 8 of them) and stops exporting.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown_with_timeout(std::time::Duration::from_secs(1)) {
            tracing::warn!(error = %e, "traces: the last spans were not all exported");
        }
    }
}

/// The layer that turns parasol's spans into OpenTelemetry's.
pub type Layer = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

/// The OpenTelemetry layer for `config`, with the exporter that sends its spans, or `None`
/// when tracing is off. Exports run as tasks on `runtime`.
pub fn layer(
    config: &TelemetryConfig,
    runtime: &tokio::runtime::Handle,
) -> Result<Option<(Layer, Exporter)>, String> {
    let Some(url) = config.traces_url() else { return Ok(None) };
    let client = Client::new(runtime.clone())?;
    let headers = config.otlp_headers.clone().into_iter().collect();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(url.as_str())
        .with_headers(headers)
        .with_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| format!("telemetry.otlp_endpoint: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder_empty()
        .with_attributes([
            opentelemetry::KeyValue::new("service.name", config.service_name.clone()),
            opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        ])
        .build();
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio)));
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("parasol");
    use tracing_subscriber::Layer as _;
    let only_traces = tracing_subscriber::filter::Targets::new()
        .with_target(TARGET, tracing::Level::TRACE)
        .with_default(tracing_subscriber::filter::LevelFilter::OFF);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_filter(only_traces)
        .boxed();
    Ok(Some((layer, Exporter { provider })))
}

/// The span of one viewer request, until its response's head is ready.
pub fn request(method: &http::Method) -> tracing::Span {
    // A method of the viewer's own invention is a text of theirs: `_OTHER`, as OpenTelemetry's
    // HTTP conventions have it.
    let method = match *method {
        http::Method::GET | http::Method::HEAD | http::Method::POST | http::Method::PUT => {
            method.as_str()
        }
        http::Method::DELETE | http::Method::OPTIONS | http::Method::PATCH => method.as_str(),
        _ => "_OTHER",
    };
    tracing::info_span!(
        target: TARGET,
        "request",
        otel.kind = "server",
        http.request.method = method,
        http.route = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        parasol.cache = tracing::field::Empty,
    )
}

/// Records on a request's `span` how it ended.
pub fn answered(span: &tracing::Span, route: &str, status: u16, cache: &str) {
    span.record("http.route", route);
    span.record("http.response.status_code", status);
    span.record("parasol.cache", cache);
}

/// The span of one fill (the disk, the shared tier, then the origin, or a rendering).
pub fn fill() -> tracing::Span {
    tracing::info_span!(target: TARGET, "fill", parasol.outcome = tracing::field::Empty)
}

/// The span of one origin fetch of `host` (redirect hops included).
pub fn origin_fetch(host: &str, trigger: &'static str) -> tracing::Span {
    tracing::info_span!(
        target: TARGET,
        "origin fetch",
        otel.kind = "client",
        server.address = host,
        parasol.trigger = trigger,
        parasol.outcome = tracing::field::Empty,
    )
}

/// The span of one media job (`task`: strip, variant, details, ...).
pub fn media_job(task: &'static str) -> tracing::Span {
    tracing::info_span!(
        target: TARGET,
        "media job",
        parasol.task = task,
        parasol.outcome = tracing::field::Empty,
    )
}

/// The span of one exchange with the shared tier (`op`: lookup or publish).
pub fn shared(op: &'static str) -> tracing::Span {
    tracing::info_span!(
        target: TARGET,
        "shared tier",
        otel.kind = "client",
        parasol.op = op,
        parasol.outcome = tracing::field::Empty,
    )
}

/// Records on `span` how its work ended: `ok`, or the error's code.
pub fn outcome<T>(span: &tracing::Span, result: &Result<T, crate::error::ProxyError>) {
    span.record("parasol.outcome", result.as_ref().map_or_else(|e| e.code(), |_| "ok"));
}

/// The exporter's HTTP client: the SDK's batch thread has no runtime of its own, so each
/// export runs as a task on parasol's.
#[derive(Debug)]
struct Client {
    http: reqwest::Client,
    runtime: tokio::runtime::Handle,
    /// When a failed export was last logged (Unix seconds).
    warned: std::sync::atomic::AtomicU64,
}

/// A collector's answer is a few bytes; more is not read.
const MAX_ANSWER: usize = 64 << 10;

impl Client {
    fn new(runtime: tokio::runtime::Handle) -> Result<Self, String> {
        // The collector is the operator's: no proxy from the environment, no redirects.
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| format!("telemetry: cannot make the exporter's client: {e}"))?;
        Ok(Self { http, runtime, warned: Default::default() })
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Client {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let http = self.http.clone();
        let task = self.runtime.spawn(async move {
            let mut response = http.execute(request).await?;
            let mut answer = http::Response::builder().status(response.status());
            if let Some(headers) = answer.headers_mut() {
                *headers = std::mem::take(response.headers_mut());
            }
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                if body.len() + chunk.len() > MAX_ANSWER {
                    break;
                }
                body.extend_from_slice(&chunk);
            }
            Ok::<_, opentelemetry_http::HttpError>(answer.body(Bytes::from(body))?)
        });
        let answered = task.await.map_err(|e| e.to_string())?;
        // The SDK logs nothing of its own here: an operator learns of a wrong endpoint or key
        // from this, once a minute at most.
        let failed = match &answered {
            Ok(answer) if answer.status().is_success() => None,
            Ok(answer) => Some(format!("the collector answered {}", answer.status())),
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = failed {
            let now = crate::cache::evict::now_secs();
            let last = self.warned.load(std::sync::atomic::Ordering::Relaxed);
            if now >= last + 60 {
                self.warned.store(now, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %why, "traces: an export failed");
            }
        }
        answered
    }
}
