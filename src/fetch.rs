//! Talking to origins: one reqwest client that sends a fixed, minimal set of headers, checks
//! every destination before connecting, follows redirects itself (so each hop is checked and
//! audited), and maps failures onto [`ProxyError`].

pub mod backoff;
pub mod dns;
pub mod guard;
pub mod limit;
pub mod peer;

use std::sync::{Arc, RwLock};
use tokio::time::Instant;

use http::{HeaderMap, HeaderValue, header};
use url::{Host, Url};

use crate::audit::{AuditLog, Record, Trigger};
use crate::config::FetchConfig;
use crate::error::ProxyError;
use crate::policy::Policy;
use guard::{Guard, GuardedResolver, Lookup, Refused, is_local_name};

/// What parasol asks origins for. Explicit `identity` encoding: bytes stay opaque and are
/// stored exactly as the origin sent them, and no compression bomb is ever inflated.
const ACCEPT: &str = "image/avif,image/webp,image/*,video/*,audio/*;q=0.9,*/*;q=0.5";

/// The origin-facing client.
pub struct Fetcher {
    client: reqwest::Client,
    guard: Arc<Guard>,
    /// Swapped whole on reload; readers clone the `Arc` and never hold the lock.
    policy: RwLock<Arc<Policy>>,
    max_redirects: u32,
    /// The complete outbound header set, built once; nothing from a viewer is ever added.
    headers: HeaderMap,
    /// The host viewers reach parasol at: a source there would be a request loop.
    own_host: Option<String>,
    header_timeout: std::time::Duration,
    /// `fetch.allow_insecure_redirects`: follow an https source's redirect to plain http.
    allow_insecure_redirects: bool,
    /// The resolver, also asked before a request to a port outside `fetch.ports`.
    lookup: Arc<dyn Lookup>,
    audit: AuditLog,
    /// What each origin costs: every line of the audit log counts there too.
    ledger: Arc<crate::ledger::Ledger>,
    /// Hosts left alone for a while, as they asked or by their failures.
    backoff: backoff::Backoff,
}

/// parasol's own addresses, refused as destinations so a URL cannot make it fetch from itself.
#[derive(Debug, Clone, Default)]
pub struct OwnEndpoints {
    /// The host of `server.public_base_url`.
    pub host: Option<String>,
    /// The bound listener addresses.
    pub addrs: Vec<std::net::SocketAddr>,
}

/// An origin response whose status was 200 and whose body is still to be read; carries the
/// audit record to complete once the body is done.
pub struct Origin {
    /// The origin's response, its body still to be read.
    pub response: reqwest::Response,
    /// The request's line of the audit log, written once the body is read.
    pub pending: PendingRecord,
}

impl Fetcher {
    /// A client sending `config`'s fixed headers, dialing only what `policy` and its guard
    /// allow, resolving names with `lookup`, logging every request to `audit`, never dialing
    /// `own` (parasol's own listeners).
    pub fn new(
        config: &FetchConfig,
        policy: Policy,
        lookup: Arc<dyn Lookup>,
        audit: AuditLog,
        own: OwnEndpoints,
    ) -> Result<Self, ProxyError> {
        let guard = Guard::new(config.allow_networks.clone()).with_own(own.addrs);
        let guard = Arc::new(guard.with_ports(config.ports.clone()));
        let resolver = GuardedResolver { guard: guard.clone(), lookup: lookup.clone() };
        let mut builder = reqwest::Client::builder();
        if let Some(path) = &config.ca_file {
            let bad = |e: &dyn std::fmt::Display| {
                ProxyError::internal(format!("fetch.ca_file {}: {e}", path.display()))
            };
            let pem = std::fs::read(path).map_err(|e| bad(&e))?;
            let roots = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(&e))?;
            if roots.is_empty() {
                return Err(bad(&"no PEM certificate in it"));
            }
            for root in roots {
                builder = builder.add_root_certificate(root);
            }
        }
        let client = builder
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .referer(false)
            .dns_resolver(Arc::new(resolver))
            .connector_layer(peer::PeerCheckLayer { guard: guard.clone() })
            .connect_timeout(config.connect_timeout.0)
            .timeout(config.timeout.0)
            .tcp_nodelay(true)
            .build()
            .map_err(ProxyError::internal)?;
        let mut headers = HeaderMap::new();
        let user_agent = HeaderValue::from_str(&config.user_agent).map_err(ProxyError::internal)?;
        headers.insert(header::USER_AGENT, user_agent);
        headers.insert(header::ACCEPT, HeaderValue::from_static(ACCEPT));
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        Ok(Self {
            own_host: own.host.map(|h| h.to_ascii_lowercase()),
            header_timeout: config.header_timeout.0,
            allow_insecure_redirects: config.allow_insecure_redirects,
            lookup,
            client,
            guard,
            policy: RwLock::new(Arc::new(policy)),
            max_redirects: config.max_redirects,
            headers,
            audit,
            ledger: Arc::default(),
            backoff: backoff::Backoff::default(),
        })
    }

    /// Counting every request it sends into `ledger`.
    pub fn with_ledger(mut self, ledger: Arc<crate::ledger::Ledger>) -> Self {
        self.ledger = ledger;
        self
    }

    /// Leaving hosts alone as `backoff` says (it counts the pauses it begins).
    pub fn with_backoff(mut self, backoff: backoff::Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Ok unless `host` is being left alone now ([`ProxyError::OriginBackoff`]).
    pub fn check_backoff(&self, host: &str) -> Result<(), ProxyError> {
        self.backoff.check(host)
    }

    /// Hosts being left alone now.
    pub fn backing_off(&self) -> usize {
        self.backoff.active()
    }

    /// Checks that `url` may be fetched at all: scheme, credentials, IP literals, local names
    /// and the domain policy. Runs before any DNS lookup or connection, for every hop.
    pub fn check_destination(&self, url: &Url) -> Result<(), ProxyError> {
        check_form(url)?;
        let port = url.port_or_known_default().unwrap_or(80);
        // One spelling of a name: the url crate lowercases it; a trailing dot is the same name.
        let name = |h: &str| h.trim_end_matches('.').to_string();
        if self.own_host.as_deref().is_some_and(|own| url.host_str().map(name) == Some(name(own))) {
            return Err(ProxyError::BlockedDestination("parasol's own host (loop)"));
        }
        match url.host() {
            Some(Host::Ipv4(ip)) => self.guard.check_peer((ip, port).into()).map_err(refused)?,
            Some(Host::Ipv6(ip)) => self.guard.check_peer((ip, port).into()).map_err(refused)?,
            Some(Host::Domain(d)) if is_local_name(d) => {
                return Err(ProxyError::BlockedDestination("localhost name"));
            }
            Some(Host::Domain(_)) => {}
            None => return Err(ProxyError::BadUrl("source URL has no host")),
        }
        self.policy().check(url.host_str().unwrap_or_default())
    }

    /// A port outside `fetch.ports` only on `allow_networks` addresses: a name with such a
    /// port is resolved first, and every address it has must be allowed. Checked before
    /// connecting (the connected peer is checked again after).
    pub async fn check_port(&self, url: &Url) -> Result<(), ProxyError> {
        let port = url.port_or_known_default().unwrap_or(80);
        let addrs = match url.host() {
            Some(Host::Ipv4(ip)) => vec![ip.into()],
            Some(Host::Ipv6(ip)) => vec![ip.into()],
            Some(Host::Domain(_)) if self.guard.port_listed(port) => return Ok(()),
            Some(Host::Domain(name)) => {
                self.lookup.lookup(name).await.map_err(|_| ProxyError::OriginUnreachable)?
            }
            None => return Err(ProxyError::BadUrl("source URL has no host")),
        };
        if addrs.is_empty() {
            return Err(ProxyError::OriginUnreachable);
        }
        for ip in addrs {
            self.guard.check_port(ip, port).map_err(refused)?;
        }
        Ok(())
    }

    /// The domain policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the domain policy (a reload).
    pub fn set_policy(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    }

    /// GETs `url`, following up to `fetch.max_redirects` redirects, each re-checked. Returns
    /// once a 200 arrives; every hop that ends otherwise is logged here.
    ///
    /// A hop the origin redirected to that is refused (private address, blocked domain,
    /// non-http scheme) is the origin's doing: it is reported as [`ProxyError::RedirectRefused`]
    /// and negative-cached, so every later view does not ask that origin again.
    ///
    /// `permit` is the fill's slot: each hop's request waits for a slot of that hop's host.
    /// Once a hop is `https`, no later hop may be plain `http` unless
    /// `fetch.allow_insecure_redirects` says so: the bytes would cross the network unprotected
    /// although the URL promised otherwise.
    pub async fn get(
        &self,
        url: &Url,
        trigger: Trigger,
        permit: &mut crate::fetch::limit::FillPermit,
    ) -> Result<Origin, ProxyError> {
        let mut url = url.clone();
        let mut secure = false;
        for hop in 0..=self.max_redirects {
            let by_origin = |e: ProxyError| match e {
                ProxyError::BlockedDomain
                | ProxyError::BlockedDestination(_)
                | ProxyError::RefusedUrl(_)
                | ProxyError::BadUrl(_)
                    if hop > 0 =>
                {
                    ProxyError::RedirectRefused
                }
                e => e,
            };
            self.check_destination(&url).map_err(by_origin)?;
            secure |= url.scheme() == "https";
            if secure && url.scheme() == "http" && !self.allow_insecure_redirects {
                return Err(ProxyError::InsecureRedirect);
            }
            self.check_port(&url).await.map_err(by_origin)?;
            let host = url.host_str().unwrap_or_default();
            self.backoff.check(host)?;
            permit.move_to(host, &self.policy()).await?;
            let request = self
                .client
                .get(url.clone())
                .headers(self.headers.clone())
                .build()
                .map_err(|_| by_origin(ProxyError::BadUrl("source URL cannot be requested")))?;
            let draft = self.draft(&url, &request, trigger);
            let mut pending = PendingRecord::new(draft, &self.audit, &self.ledger);
            let sent =
                tokio::time::timeout(self.header_timeout, self.client.execute(request)).await;
            let outcome = match sent {
                Ok(Ok(response)) => Ok(response),
                Ok(Err(e)) => {
                    // The whole chain, for an operator at debug level (never to a viewer), by
                    // host: the URL may be a signed one (a private bucket's), and a log line is
                    // no place for a signature or an access key id.
                    let mapped = map_reqwest(&e);
                    let e = e.without_url();
                    let mut chain = e.to_string();
                    let mut source = std::error::Error::source(&e);
                    while let Some(s) = source {
                        chain.push_str(": ");
                        chain.push_str(&s.to_string());
                        source = s.source();
                    }
                    let host = url.host_str().unwrap_or_default();
                    tracing::debug!(host, error = chain, "origin request failed");
                    Err(by_origin(mapped))
                }
                Err(_) => Err(ProxyError::OriginTimeout), // no response headers in time
            };
            let host = url.host_str().unwrap_or_default();
            let response = match outcome {
                Ok(r) => r,
                Err(err) => {
                    // No answer is a failure; a certificate refused is parasol's verdict, the
                    // same each time, and remembered per URL like other refusals.
                    if matches!(err, ProxyError::OriginUnreachable | ProxyError::OriginTimeout) {
                        self.backoff.observe(host, backoff::Answer::Failed);
                    }
                    pending.finish(None, 0, err.code()).await;
                    return Err(err);
                }
            };
            let status = response.status();
            self.backoff.observe(host, answer_of(&response));
            if let Some(record) = pending.record.as_mut() {
                record.addr = response.remote_addr().map(|a| a.to_string());
                record.status = Some(status.as_u16());
            }
            if status.is_redirection() && hop < self.max_redirects {
                let next = response
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|loc| url.join(loc).ok());
                pending.finish(None, 0, "redirect").await;
                url =
                    next.ok_or(ProxyError::OriginInvalid("redirect without a usable Location"))?;
                continue;
            }
            let err = match status.as_u16() {
                200 => return Ok(Origin { response, pending }),
                404 | 410 => ProxyError::NotFound,
                206 => ProxyError::OriginInvalid("partial content to a full request"),
                _ if status.is_redirection() => ProxyError::OriginInvalid("too many redirects"),
                s => ProxyError::OriginStatus(s),
            };
            pending.finish(None, 0, err.code()).await;
            return Err(err);
        }
        Err(ProxyError::OriginInvalid("too many redirects"))
    }

    /// The audit record of one request, before it is sent.
    fn draft(&self, url: &Url, request: &reqwest::Request, trigger: Trigger) -> Record {
        let host = url.host_str().unwrap_or_default().to_string();
        let mut headers: std::collections::BTreeMap<String, String> = request
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
            .collect();
        // hyper adds Host itself; record it as it goes on the wire.
        let host_header = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
            None => host.clone(),
        };
        headers.insert("host".into(), host_header);
        Record {
            ts: Record::now(),
            trigger,
            method: request.method().to_string(),
            url: redact_signature(url),
            host,
            addr: None,
            headers,
            status: None,
            bytes: 0,
            ms: 0,
            outcome: String::new(),
            delay_ms: match trigger {
                Trigger::Arrival { delay_ms } => Some(delay_ms),
                _ => None,
            },
        }
    }
}

/// What an origin's response means for backing off from its host.
fn answer_of(response: &reqwest::Response) -> backoff::Answer {
    let status = response.status().as_u16();
    let asked = || {
        let value = response.headers().get(header::RETRY_AFTER)?.to_str().ok()?;
        backoff::retry_after(value, std::time::SystemTime::now())
    };
    match status {
        429 | 503 => asked().map_or(backoff::Answer::Failed, backoff::Answer::RetryAfter),
        500.. => backoff::Answer::Failed,
        _ => backoff::Answer::Fine,
    }
}

/// `url` as the audit log shows it: the secret parts of a signed bucket request (an
/// `[[upstream]]` with credentials) replaced, so the log never holds a usable signature.
fn redact_signature(url: &Url) -> String {
    const SECRET: [&str; 3] = ["x-amz-signature", "x-amz-credential", "x-amz-security-token"];
    let secret = |name: &str| SECRET.iter().any(|s| name.eq_ignore_ascii_case(s));
    if !url.query_pairs().any(|(name, _)| secret(&name)) {
        return url.to_string();
    }
    let mut shown = url.clone();
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let v = if secret(&k) { "redacted".to_string() } else { v.into_owned() };
            (k.into_owned(), v)
        })
        .collect();
    shown.query_pairs_mut().clear().extend_pairs(pairs);
    shown.to_string()
}

/// The audit record of a request in flight. Written by [`finish`](Self::finish); if the fill is
/// dropped first (the total deadline fired, or shutdown), `Drop` writes it with outcome
/// `origin_timeout`, so no request sent ever goes unlogged.
pub struct PendingRecord {
    record: Option<Record>,
    started: Instant,
    audit: AuditLog,
    ledger: Arc<crate::ledger::Ledger>,
}

impl PendingRecord {
    fn new(record: Record, audit: &AuditLog, ledger: &Arc<crate::ledger::Ledger>) -> Self {
        let (audit, ledger) = (audit.clone(), ledger.clone());
        Self { record: Some(record), started: Instant::now(), audit, ledger }
    }

    /// The record as it will be written, counted in the ledger as it is.
    fn complete(&mut self, status: Option<u16>, bytes: u64, outcome: &str) -> Option<Record> {
        let mut record = self.record.take()?;
        record.status = record.status.or(status);
        record.bytes = bytes;
        record.ms = self.started.elapsed().as_millis() as u64;
        record.outcome = outcome.to_string();
        let failed = !matches!(outcome, "ok" | "redirect");
        self.ledger.fetched(&record.host, bytes, failed, crate::cache::evict::now_secs());
        Some(record)
    }

    /// Writes the request's line: its status, body bytes and outcome.
    pub async fn finish(mut self, status: Option<u16>, bytes: u64, outcome: &str) {
        if let Some(record) = self.complete(status, bytes, outcome) {
            self.audit.record(record).await;
        }
    }
}

impl Drop for PendingRecord {
    fn drop(&mut self) {
        if let Some(record) = self.complete(None, 0, "origin_timeout") {
            self.audit.record_now(record);
        }
    }
}

/// A well-formed URL parasol will not fetch, whoever wrote it: only http(s), no credentials.
/// The rustls error `e` is or wraps. The connector's errors reach reqwest boxed, and an
/// `io::Error`'s `source()` skips the error it wraps, so both are looked into.
fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
        return rustls_error(inner);
    }
    None
}

/// Why a TLS handshake with an origin failed, for the log (the viewer sees `origin_tls`).
fn tls_reason(e: &rustls::Error) -> &'static str {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "certificate expired"
        }
        rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        ) => "certificate for another name",
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => {
            "certificate from an untrusted issuer"
        }
        rustls::Error::InvalidCertificate(_) => "certificate refused",
        _ => "TLS handshake failed",
    }
}

/// Shared by source parsing and every redirect hop. Refused (403), not malformed (400).
pub fn check_form(url: &Url) -> Result<(), ProxyError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ProxyError::RefusedUrl("not an http or https URL"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ProxyError::RefusedUrl("credentials in the URL"));
    }
    Ok(())
}

fn refused(r: Refused) -> ProxyError {
    tracing::debug!(addr = %r.addr, reason = r.reason, "destination refused");
    ProxyError::BlockedDestination(r.reason)
}

/// Maps a reqwest failure; a [`Refused`] raised by the resolver anywhere in the error chain
/// becomes a 403, not a 502.
pub fn map_reqwest(e: &reqwest::Error) -> ProxyError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<Refused>() {
            return ProxyError::BlockedDestination(r.reason);
        }
        if let Some(tls) = rustls_error(s) {
            return ProxyError::OriginTls(tls_reason(tls));
        }
        source = s.source();
    }
    // A connection that was never made is unreachable, timed out or not: a filtered port and
    // a closed one give the same answer.
    if e.is_timeout() && !e.is_connect() {
        ProxyError::OriginTimeout
    } else {
        ProxyError::OriginUnreachable
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::guard::StaticLookup;

    /// The port rule, through an injected resolver: nothing here is ever dialled.
    #[tokio::test]
    async fn ports_outside_fetch_ports_only_on_allowed_networks() {
        let dir = tempfile::tempdir().unwrap();
        let rotation = crate::audit::Rotation {
            path: dir.path().join("audit.jsonl"),
            max_bytes: 1 << 20,
            keep: 1,
        };
        let (audit, _task) = AuditLog::start(rotation, Default::default()).await.unwrap();
        let config = FetchConfig {
            allow_networks: vec!["127.0.0.2/32".parse().unwrap()],
            ..FetchConfig::default()
        };
        let lookup = StaticLookup::default()
            .with("public.test", &["8.8.8.8".parse().unwrap()])
            .with("mixed.test", &["8.8.8.8".parse().unwrap(), "127.0.0.2".parse().unwrap()])
            .with("inside.test", &["127.0.0.2".parse().unwrap()]);
        let policy = Policy::new(&Default::default());
        let fetcher =
            Fetcher::new(&config, policy, Arc::new(lookup), audit, OwnEndpoints::default())
                .unwrap();
        let port = |u: &str| {
            let url = Url::parse(u).unwrap();
            let fetcher = &fetcher;
            async move { fetcher.check_port(&url).await }
        };
        for ok in ["http://public.test/", "https://public.test/", "http://inside.test:6379/"] {
            assert!(port(ok).await.is_ok(), "{ok}");
        }
        for refused in [
            "http://public.test:22/",
            "http://public.test:8080/",
            "http://mixed.test:6379/",
            "http://8.8.8.8:25/",
        ] {
            let e = port(refused).await.unwrap_err();
            assert!(matches!(e, ProxyError::BlockedDestination(_)), "{refused}: {e:?}");
        }
        assert!(port("http://127.0.0.2:6379/").await.is_ok(), "allowed address, any port");
    }
}
