//! Values of more than one section: sizes, durations, redacted secrets, domain names.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::*;

/// A byte count: an integer, or a string such as `256MiB`, `20 GiB`, `1.5GB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

/// A duration: a string such as `500ms`, `30s`, `5m`, `2h`, `30d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrText {
    Num(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match NumOrText::deserialize(d)? {
            NumOrText::Num(n) => Ok(Size(n)),
            NumOrText::Text(s) => s
                .trim()
                .parse::<bytesize::ByteSize>()
                .map(|b| Size(b.as_u64()))
                .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a size ({e})"))),
        }
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        match units.iter().find(|(n, _)| self.0 >= *n && self.0 % n == 0) {
            Some((n, unit)) => write!(f, "{}{unit}", self.0 / n),
            None => write!(f, "{}", self.0),
        }
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim())
            .map(Dur)
            .map_err(|e| serde::de::Error::custom(format!("{s:?} is not a duration ({e})")))
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

pub(crate) fn redact_str<S: Serializer>(v: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if v.is_empty() { "" } else { "<redacted>" })
}

pub(crate) fn redact_map<S: Serializer>(
    v: &std::collections::BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    let redacted: std::collections::BTreeMap<&str, &str> =
        v.keys().map(|k| (k.as_str(), "<redacted>")).collect();
    redacted.serialize(s)
}

pub(crate) fn redact_list<S: Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
    let redacted: Vec<&str> = v.iter().map(|_| "<redacted>").collect();
    redacted.serialize(s)
}

/// The one check of a configured URL: `text` parses as an http(s) URL with a host. The error
/// names what it is (`"origin"`, `"shared.endpoint"`).
pub(crate) fn http_url(what: &str, text: &str) -> Result<Url, String> {
    match Url::parse(text) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => Ok(url),
        _ => Err(format!("{what} {text:?} is not an http(s) URL")),
    }
}

/// An error about `key`.
pub(crate) fn bad(key: &str, message: impl Into<String>) -> Result<(), ConfigError> {
    Err(ConfigError::Key { key: key.into(), message: message.into() })
}

/// A secret of at least 32 bytes, or empty (off): a short one can be guessed.
pub(crate) fn check_secret(key: &str, secret: &str) -> Result<(), ConfigError> {
    match secret.is_empty() || secret.len() >= 32 {
        true => Ok(()),
        false => bad(key, "needs at least 32 bytes (or empty, for off)"),
    }
}

/// Lowercases and checks a configured domain; `None` when it is not a plausible domain name.
pub fn normalize_domain(d: &str) -> Option<String> {
    let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    (!d.is_empty() && d.len() <= 253 && d.split('.').all(label_ok)).then_some(d)
}

/// Loopback, private (RFC 1918, unique local), link-local or CGNAT: reachable only from
/// inside. `0.0.0.0` and `::` (every interface) are not.
pub(crate) fn internal_address(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(100, 64, 0, 0), 10)
                    .is_ok_and(|cgnat| cgnat.contains(&v4))
        }
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unique_local()
                || v6.is_unicast_link_local()
                || v6.to_ipv4_mapped().is_some_and(|v4| internal_address(v4.into()))
        }
    }
}
