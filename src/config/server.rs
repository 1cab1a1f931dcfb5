//! `[server]` (with `[signing]`) and `[audit]`: where parasol listens, how it signs, where its
//! outbound log goes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use url::Url;

use super::*;

/// `[server]`: where parasol listens and how it names itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Viewer-facing listener. Loopback by default: a TLS-terminating nginx sits in front.
    pub listen: SocketAddr,
    /// Health, readiness and metrics, plus the bearer-protected `/admin/*` API. Kept on its own
    /// port so that it is never exposed by accident together with the media routes.
    pub admin_listen: SocketAddr,
    /// The URL prefix viewers reach parasol at; `parasol sign` builds URLs under it.
    pub public_base_url: Url,
    /// Bearer token for `/admin/*` writes; empty means admin writes are refused.
    #[serde(serialize_with = "redact_str")]
    pub admin_token: String,
    /// Longest time a viewer may take to send its request headers (slowloris guard).
    pub header_timeout: Dur,
    /// How long SIGTERM waits for in-flight responses before closing them.
    pub shutdown_grace: Dur,
    /// Longest time a response may make no progress because the viewer stopped reading; the
    /// connection is then closed. A slow reader that keeps reading is never cut.
    pub send_timeout: Dur,
    /// Open viewer connections at most; a connection beyond this gets a 503 and is closed.
    pub max_connections: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            public_base_url: Url::parse("http://127.0.0.1:8080/").expect("static URL parses"),
            admin_token: String::new(),
            header_timeout: Dur(Duration::from_secs(10)),
            shutdown_grace: Dur(Duration::from_secs(20)),
            send_timeout: Dur(Duration::from_secs(60)),
            max_connections: 4096,
        }
    }
}

/// `[signing]`: HMAC keys for native `/m/` URLs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SigningConfig {
    /// The first key signs, every key verifies, so a key can be rotated without breaking URLs
    /// already handed out. Empty: a key is generated once and kept in `<cache.dir>/signing.key`.
    #[serde(serialize_with = "redact_list")]
    pub keys: Vec<String>,
}

/// `[audit]`: the outbound request log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// JSON lines file; default `<cache.dir>/outbound.jsonl`.
    pub path: Option<PathBuf>,
    /// The log is rotated (`.1`, `.2`, …) when it grows past this, so it cannot fill the disk.
    pub max_bytes: Size,
    /// Rotated files kept besides the current one; older ones are deleted.
    pub keep: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self { path: None, max_bytes: Size(100 << 20), keep: 5 }
    }
}

/// `[telemetry]`: traces of requests, fills, media jobs and shared-tier traffic, exported
/// over OTLP/HTTP (protobuf) to a collector. Off while `otlp_endpoint` is empty.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The collector's OTLP/HTTP URL (`http://collector:4318`); `/v1/traces` is added when
    /// the URL has no path of its own. Empty: no spans are made at all.
    pub otlp_endpoint: String,
    /// Headers sent with every export (a collector's API key, say); secrets.
    #[serde(serialize_with = "redact_map")]
    pub otlp_headers: std::collections::BTreeMap<String, String>,
    /// Share of requests traced, 0 to 1.
    pub sample_ratio: f64,
    /// `service.name` of the spans (one per node or deployment, say).
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            otlp_headers: Default::default(),
            sample_ratio: 1.0,
            service_name: "parasol".into(),
        }
    }
}

impl TelemetryConfig {
    /// Where spans are sent, or `None` when tracing is off.
    pub fn traces_url(&self) -> Option<Url> {
        let mut url = http_url("telemetry.otlp_endpoint", &self.otlp_endpoint).ok()?;
        if url.path() == "/" {
            url.set_path("/v1/traces");
        }
        Some(url)
    }

    pub(super) fn check(&self) -> Result<(), ConfigError> {
        if !self.otlp_endpoint.is_empty() {
            if let Err(message) = http_url("telemetry.otlp_endpoint", &self.otlp_endpoint) {
                return bad("telemetry.otlp_endpoint", message);
            }
        }
        for (name, value) in &self.otlp_headers {
            let valid = http::HeaderName::try_from(name.as_str()).is_ok()
                && http::HeaderValue::try_from(value.as_str()).is_ok();
            if !valid {
                return bad(&format!("telemetry.otlp_headers.{name}"), "is not a valid header");
            }
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return bad("telemetry.sample_ratio", "must be between 0 and 1");
        }
        if self.service_name.is_empty() {
            return bad("telemetry.service_name", "must not be empty");
        }
        Ok(())
    }
}

impl ServerConfig {
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        // A short admin token can be guessed, and lets anyone purge or ban.
        check_secret("server.admin_token", &self.admin_token)?;
        if let Err(message) = http_url("server.public_base_url", self.public_base_url.as_str()) {
            return bad("server.public_base_url", message);
        }
        if self.send_timeout.0.is_zero() || self.header_timeout.0.is_zero() {
            return bad("server", "header_timeout and send_timeout must be above zero");
        }
        Ok(())
    }
}

impl SigningConfig {
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        for (i, key) in self.keys.iter().enumerate() {
            if key.len() < 32 {
                return bad(&format!("signing.keys[{i}]"), "a key needs at least 32 bytes");
            }
        }
        Ok(())
    }
}
